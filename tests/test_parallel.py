"""The M runs of an iteration on separate processes (torchrun, gloo): same result, and no hang on failure."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics_without_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tok_s"} for line in open(path)]


def test_two_workers_equal_sequential_bit_for_bit(tmp_path):
    """`--workers 2` (runs on two ranks) writes the same final weights, byte for byte, and the same
    metrics (timings aside) as the sequential run with the same seed and threads per process."""
    common = ["--preset", "quick", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    for name, extra in (("sequential", []), ("parallel", ["--workers", "2"])):
        proc = subprocess.run([sys.executable, "warp_min.py", *common, "--out", str(tmp_path / name), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    seq, par = tmp_path / "sequential", tmp_path / "parallel"
    assert (par / "final.safetensors").read_bytes() == (seq / "final.safetensors").read_bytes()
    assert metrics_without_timing(par / "metrics.jsonl") == metrics_without_timing(seq / "metrics.jsonl")
    config = json.loads((par / "config.json").read_text())
    assert config["workers"] == 2


def test_a_dead_rank_fails_the_job_quickly(tmp_path):
    """If one rank dies (SIGKILL), the whole job exits non-zero within a bounded time, with a report
    naming the failed rank, instead of the other rank waiting forever in a collective."""
    env = dict(os.environ, WARP_MIN_TEST_KILL_RANK="1", WARP_MIN_DIST_TIMEOUT="60")
    start = time.time()
    proc = subprocess.run([sys.executable, "warp_min.py", "--preset", "quick", "--out", str(tmp_path / "run"),
                           "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert time.time() - start < 120
    assert "rank      : 1" in proc.stderr and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert "error: the distributed run failed" in proc.stderr
