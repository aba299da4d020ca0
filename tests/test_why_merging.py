"""experiments/why_merging.py on the quick preset: the geometry it reports obeys the identities of the
decomposition delta_m = s + n_m (LERP(0.5) is s itself; n_2 = -n_1; the runs' projections on s_hat are
|s| + <n_m, s_hat>), and the figure and JSON are written."""
import json

import pytest

from experiments import why_merging


def test_why_merging_geometry(tmp_path, capsys):
    assert why_merging.main(["--preset", "quick", "--out", str(tmp_path), "--front-samples", "8",
                             "--points", "3"]) == 0
    numbers = json.loads((tmp_path / "why-merging.json").read_text())
    assert (tmp_path / "why-merging.png").stat().st_size > 10_000
    norms, proj = numbers["norms"], numbers["projections on s_hat"]
    s, n = norms["|s| (shared)"], norms["|n_m| (own)"]
    # LERP(0.5) of the two task vectors is their mean s: same norm, all of it along s_hat
    assert norms["|LERP - init|"] == pytest.approx(s, rel=1e-5)
    assert proj["lerp"] == pytest.approx(s, rel=1e-5)
    # |delta_m|^2 = |s|^2 + |n|^2 + 2 <s, n_m>, and the two runs' projections average to |s| (n_2 = -n_1)
    cos_ns = numbers["cosines"]["n_1, s"]
    assert norms["|delta_1|"] ** 2 == pytest.approx(s * s + n * n + 2 * s * n * cos_ns, rel=1e-5)
    assert (proj["run 0"] + proj["run 1"]) / 2 == pytest.approx(s, rel=1e-5)
    # SLERP keeps the runs' norms where LERP shrinks them: it is the longer of the two
    assert norms["|SLERP - init|"] > norms["|LERP - init|"]
    assert [p["t"] for p in numbers["along s_hat"]][0] == 0.0


def test_why_merging_flags_are_checked_before_any_work(capsys):
    for args in (["--points", "1"], ["--front-samples", "0"], ["--seed", "-1"]):
        assert why_merging.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {args[0]} {args[1]}")
