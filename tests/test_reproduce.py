"""`python -m experiments.reproduce` at a tiny budget: claims.json is complete and well-formed, every verdict
follows from its numbers by the rule in reproduce.CLAIMS, and the same seeds give the same bytes
whatever the number of worker processes."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import reproduce as R
from warp_scale.cli import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(base=dict(n_layer=1, d_model=32, head_dim=8, d_ff=64, sft_steps=20, sft_docs=300, steps=8, lr=1e-3,
                      eval_every=4, eval_prompts=4, eval_samples=2, max_new_tokens=24),
            cells={"batch 4": dict(prompts_per_step=1), "batch 8": dict(), "width 16": dict(d_model=16, head_dim=4, d_ff=32),
                   "4 steps": dict(steps=4, eval_every=2)},
            regime="batch 8", seeds=[0, 1, 2], iterations=3, beta_large=1.0, envelope=[0.5, 1, 3], front_samples=8,
            lambdas=[0, 0.5, 1], etas=[0, 0.5, 1])
VERDICTS = {"reproduced", "partly", "not reproduced"}


def reproduce_tiny(tmp, workers):
    raw = R.collect(TINY, str(tmp / "cache"), workers, log=lambda s: None)
    R.write_outputs(raw, str(tmp / "out"))
    return tmp / "out"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return reproduce_tiny(tmp_path_factory.mktemp("two-workers"), workers=2)


@pytest.fixture(scope="module")
def claims(outputs):
    with open(outputs / "claims.json") as f:
        return json.load(f)


def test_every_claim_is_there_with_its_numbers_and_figure(outputs, claims):
    assert [c["id"] for c in claims] == list(range(1, 12))
    for c in claims:
        assert set(c) >= {"id", "title", "paper", "rule", "checks", "seeds", "per_seed", "mean", "spread",
                          "verdict", "figure"}
        assert c["paper"] and c["checks"] and c["verdict"] in VERDICTS
        assert c["seeds"] == [0, 1, 2] and sorted(c["per_seed"]) == ["0", "1", "2"]
        names = set(c["per_seed"]["0"])
        assert names and all(set(v) == names for v in c["per_seed"].values())
        for name in names:                    # mean and spread are those of the per-seed values
            xs = [v[name] for v in c["per_seed"].values() if v[name] is not None]
            if xs:
                assert math.isclose(c["mean"][name], np.mean(xs), rel_tol=1e-12, abs_tol=1e-12)
                if len(xs) > 1:
                    assert math.isclose(c["spread"][name], np.std(xs, ddof=1), rel_tol=1e-9, abs_tol=1e-12)
                else:
                    assert c["spread"][name] is None
        for check in c["checks"]:
            assert len(check["per_seed"]) == 3 and all(isinstance(b, bool) for b in check["per_seed"])
        with open(outputs / c["figure"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (outputs / "claims.md").read_text()
    assert sum(line.startswith("| ") and line[2:].split(" ")[0].isdigit() for line in table.splitlines()) == 11


def test_each_verdict_follows_from_its_numbers(claims):
    for c in claims:
        checks, verdict = R.recheck(c)
        assert [{"check": k, "per_seed": v} for k, v in checks.items()] == c["checks"]
        assert verdict == c["verdict"]


def test_verdicts_change_with_the_numbers(claims):
    """The rule reads the numbers: SLERP below LERP in every seed fails claim 3's first check."""
    c = json.loads(json.dumps(next(c for c in claims if c["id"] == 3)))
    for v in c["per_seed"].values():
        v["reward_slerp_0.5"], v["reward_lerp_0.5"] = 1.0, 2.0
        v["kl_slerp_0.5"], v["kl_lerp_0.5"] = 2.0, 1.0
    checks, verdict = R.recheck(c)
    assert list(checks.values()) == [[False] * 3, [True] * 3] and verdict == "partly"
    for v in c["per_seed"].values():
        v["kl_slerp_0.5"], v["kl_lerp_0.5"] = 1.0, 2.0
    assert R.recheck(c)[1] == "not reproduced"
    for v in c["per_seed"].values():
        v["reward_slerp_0.5"], v["reward_lerp_0.5"], v["kl_lerp_0.5"] = 3.0, 2.0, 0.5
    assert R.recheck(c)[1] == "reproduced"


def test_same_seeds_same_bytes_whatever_the_workers(outputs, tmp_path):
    again = reproduce_tiny(tmp_path, workers=1)      # fresh cache: everything retrained, in one process
    for name in ("claims.json", "raw.json", "claims.md", "claim01.png", "claim07.png"):
        assert (again / name).read_bytes() == (outputs / name).read_bytes(), name


def test_verdict_rule():
    assert R.verdict({"a": [True, True, True], "b": [True, True, True]}) == "reproduced"
    assert R.verdict({"a": [True, True, False], "b": [False, False, False]}) == "partly"
    assert R.verdict({"a": [True, False, False], "b": [False, True, False]}) == "not reproduced"


def test_rule_helpers():
    points = [{"kl": 0.0, "reward": 0.0}, {"kl": 2.0, "reward": 1.0}, {"kl": 4.0, "reward": 1.5}]
    assert R.at(points, 1.0) == 0.5 and R.at(points, 3.0) == 1.25 and R.at(points, 5.0) is None
    assert R.at(points, 0.75, "reward", "kl") == 1.5
    assert R.gt(None, 0) is False and R.lt(0, None) is False and R.diff(None, 1) is None
    assert R.above_chord([0, 0.5, 1], [0, 1, 0]) == 1.0 and R.above_chord([0, 0.5, 1], [0, -1, 0]) == -1.0
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert R.spearman([1, 2], [1, 2]) is None and R.spearman([1, 2, 3], [5, 5, 5]) is None
    assert R.r_squared([0, 1, 2], [1, 3, 5]) == pytest.approx(1.0)
    assert R._finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


def test_the_regime_is_the_presets_and_every_preset_has_its_runs(outputs):
    """Claims 1-9 and 11 run in the preset's regime (fixed in advance: docs/regime-rule.md), not one chosen
    from the results; the optimal front and claim 11's plain-RL envelope are recorded."""
    raw = json.load(open(outputs / "raw.json"))
    assert raw["regime"] == TINY["regime"]
    assert raw["optimal_front"] and {"beta", "reward", "kl", "trusted"} <= set(raw["optimal_front"][0])
    assert sorted(raw["seeds"]["0"]["envelope"]) == sorted(f"{f:g}x beta" for f in TINY["envelope"])
    assert R.PRESETS["converged"]["base"] == R.CONVERGED


def test_full_preset_and_demo_are_the_regime_rules_choice():
    """docs/regime-rule.md: the reproduction runs the candidate the rule chose (regimes.json), the demo the
    same settings at width 128; only the width differs between them, and theta_sft's SFT steps (the committed
    results were made with 800; the demo's 500 came later, for speed)."""
    regimes = json.load(open(os.path.join(ROOT, "experiments", "results", "regimes", "regimes.json")))
    chosen = next(c for c in regimes["candidates"] if c["id"] == regimes["chosen"])
    full = RunConfig(**{**R.PRESETS["full"]["base"], **R.PRESETS["full"]["cells"][R.PRESETS["full"]["regime"]]})
    demo = RunConfig(**R.CLI_PRESETS["default"])
    for cfg, width in ((full, chosen["settings"]["d_model"]), (demo, 128)):
        assert (cfg.d_model, cfg.lr, cfg.prompts_per_step, cfg.beta, cfg.steps) == \
            (width, chosen["settings"]["lr"], chosen["settings"]["prompts_per_step"], chosen["settings"]["beta"],
             chosen["T"])
    assert (full.head_dim, full.d_ff) == (full.d_model // 4, 4 * full.d_model)
    assert (full.sft_steps, demo.sft_steps) == (800, 500)
    assert dataclasses.replace(full, d_model=128, head_dim=32, d_ff=512, sft_steps=500) == demo


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--preset", "huge"], "invalid choice"),
    (["--out", "README.md"], "--out README.md: exists and is not a directory"),
    (["--out", "tests"], "--out tests: a non-empty directory that holds no earlier reproduction"),
])
def test_cli_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_old_spelling_says_where_the_reproduction_went():
    result = subprocess.run([sys.executable, "warp_min.py", "reproduce"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "python -m experiments.reproduce" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_committed_results_follow_their_rules_and_docs_show_them():
    """experiments/results/ (the full preset) is consistent with today's rules, and docs/reproducing.md
    quotes its table verbatim."""
    with open(os.path.join(ROOT, "experiments", "results", "claims.json")) as f:
        committed = json.load(f)
    assert [c["id"] for c in committed] == list(range(1, 12)) and all(len(c["seeds"]) >= 3 for c in committed)
    for c in committed:
        checks, verdict = R.recheck(c)
        assert verdict == c["verdict"] and [k["per_seed"] for k in c["checks"]] == list(checks.values()), c["id"]
        assert os.path.exists(os.path.join(ROOT, "experiments", "results", c["figure"]))
    with open(os.path.join(ROOT, "experiments", "results", "raw.json")) as f:
        raw = json.load(f)
    assert json.loads(json.dumps(R.evaluate_claims(raw))) == committed    # claims.json = the rules applied to raw.json
    assert R.markdown(committed, raw) == open(os.path.join(ROOT, "experiments", "results", "claims.md")).read()
    readme = open(os.path.join(ROOT, "docs", "reproducing.md")).read()
    start = readme.index("<!-- results/claims.md")
    start = readme.index("\n", start) + 1
    table = open(os.path.join(ROOT, "experiments", "results", "claims.md")).read()
    assert readme[start:readme.index("<!-- end of results/claims.md -->")] == \
        table.replace("](claim", "](../experiments/results/claim")          # figure links from docs/
