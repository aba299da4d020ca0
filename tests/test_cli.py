"""Every flag of `python warp_min.py --help`, given a bad value, is refused before any work: one line
naming the flag, exit status 2, nothing written. The table below must cover every flag --help lists,
so a new flag without a range check fails this test."""

import contextlib
import io
import re

import pytest

from warp_scale import cli

NOT_A_DIR = "warp_min.py"    # an existing file where a directory is expected (tests run from anywhere: see below)

BAD = {   # flag: (bad value or None for a bare flag, fragment of the expected message)
    "--preset": ("huge", "invalid choice"),
    "--overwrite": ("=yes", "ignored explicit argument"),
    "--resume": ("/nonexistent/run", "no readable warp_min config.json"),
    "--seed": ("-1", "--seed -1: must be >= 0"),
    "--device": ("tpu", "--device tpu: must be"),
    "--n-layer": ("0", "--n-layer 0: must be >= 1"),
    "--d-model": ("0", "--d-model 0: must be >= 1"),
    "--n-head": ("0", "--n-head 0: must be >= 1"),
    "--n-kv-head": ("3", "--n-kv-head 3: must be >= 1 and divide --n-head"),
    "--head-dim": ("7", "--head-dim 7: must be even"),
    "--d-ff": ("0", "--d-ff 0: must be >= 1"),
    "--sft-steps": ("0", "--sft-steps 0: must be >= 1"),
    "--sft-lr": ("0", "--sft-lr 0.0: must be > 0"),
    "--sft-batch": ("0", "--sft-batch 0: must be >= 1"),
    "--sft-seq-len": ("1", "--sft-seq-len 1: must be >= 2"),
    "--sft-docs": ("3", "--sft-docs 3: must be >= 10"),
    "--iterations": ("0", "--iterations 0: must be >= 1"),
    "--runs": ("0", "--runs 0: must be >= 1"),
    "--steps": ("0", "--steps 0: must be >= 1"),
    "--beta": ("-1", "--beta -1.0: must be >= 0"),
    "--mu": ("1.5", "--mu 1.5: must be in [0, 1]"),
    "--lam": ("5", "--lam 5.0: must be in [0, 1]"),
    "--eta": ("1.5", "--eta 1.5: must be in [0, 1] (above 1 LITI extrapolates: pass --allow-extrapolation)"),
    "--granularity": ("block", "--granularity block: must be layer, tensor or model"),
    "--lr": ("-1", "--lr -1.0: must be >= 0"),
    "--warmup": ("-1", "--warmup -1: must be >= 0"),
    "--grad-clip": ("0", "--grad-clip 0.0: must be > 0"),
    "--prompts-per-step": ("0", "--prompts-per-step 0: must be >= 1"),
    "--samples-per-prompt": ("1", "--samples-per-prompt 1: must be >= 2"),
    "--temperature": ("0", "--temperature 0.0: must be > 0"),
    "--max-new-tokens": ("0", "--max-new-tokens 0: must be >= 1"),
    "--log-every": ("0", "--log-every 0: must be >= 1"),
    "--eval-prompts": ("1", "--eval-prompts 1: must be >= 2"),
    "--eval-samples": ("0", "--eval-samples 0: must be >= 1"),
    "--eval-every": ("-5", "--eval-every -5: must be >= 0"),
    "--etas": ("0,2", "--etas '0,2': every eta must be in [0, 1]"),
    "--baseline": ("=1", "ignored explicit argument"),
    "--no-baseline": ("=1", "ignored explicit argument"),
    "--out": (NOT_A_DIR, "exists and is not a directory"),
    "--cache-dir": (NOT_A_DIR, "--cache-dir warp_min.py: exists and is not a directory"),
    "--threads": ("0", "--threads 0: must be >= 1"),
    "--workers": ("0", "--workers 0: must be >= 1"),
    "--checkpoint-every": ("-1", "--checkpoint-every -1: must be >= 0"),
    "--max-skips": ("0", "--max-skips 0: must be >= 1"),
    "--allow-extrapolation": ("=x", "ignored explicit argument"),
    "--front-samples": ("-1", "--front-samples -1: must be >= 0"),
    "--no-allow-extrapolation": ("=x", "ignored explicit argument"),
    "--init": ("/nonexistent/gemma", "--init /nonexistent/gemma: not a directory"),
    "--dtype": ("float16", "--dtype float16: must be float32, bfloat16 or auto"),
    "--save-dtype": ("int8", "--save-dtype int8: must be float32, bfloat16 or auto"),
    "--prompts": ("/nonexistent/prompts.txt", "--prompts /nonexistent/prompts.txt: no such file"),
    "--reward": ("no_such_module_xyz:score", "--reward no_such_module_xyz:score: cannot import no_such_module_xyz"),
    "--reward-model": ("/nonexistent/rm", "--reward-model /nonexistent/rm: no config.json"),
    "--chat-template": (None, "--chat-template needs --init DIR"),
    "--no-chat-template": ("=1", "ignored explicit argument"),
}


def help_flags():
    """The option strings --help documents (each one is in its text)."""
    parser = cli.build_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    text = parser.format_help()
    assert all(re.search(rf"{f}\b", text) for f in flags)
    return sorted(flags)


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(argv)
    return status, err.getvalue()


def test_the_table_covers_every_flag_of_help():
    flags = help_flags()
    assert len(flags) > 50
    assert set(flags) == set(BAD), (sorted(set(flags) - set(BAD)), sorted(set(BAD) - set(flags)))


@pytest.mark.parametrize("flag", sorted(BAD))
def test_every_flag_rejects_a_bad_value_in_one_line(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(cli.os.path.dirname(cli.os.path.dirname(cli.__file__)))   # NOT_A_DIR is in the repo root
    value, fragment = BAD[flag]
    out = tmp_path / "out"
    argv = ["--preset", "quick", "--cache-dir", str(tmp_path / "cache")] if flag != "--cache-dir" else ["--preset", "quick"]
    argv += ["--out", str(out)] if flag != "--out" else []
    argv += [flag] if value is None else [flag + value] if value.startswith("=") else [flag, value]
    if flag == "--resume":
        argv = [flag, value]
    status, err = run_cli(argv)
    assert status == 2, (flag, err)
    assert fragment in err and "Traceback" not in err, (flag, err)
    assert len(err.strip().splitlines()) == 1, (flag, err)
    assert err.startswith("error: ")
    assert not out.exists() and not (tmp_path / "cache").exists()
