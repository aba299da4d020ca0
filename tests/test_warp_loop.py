"""The WARP loop: the sanity checks that published re-implementations fail, reproducibility,
the tokenizer, the reward, crash safety and the CLI's one-line errors (every flag: test_cli.py).

Everything runs on a tiny model (d_model 32) for a handful of steps, so these are about
mechanics, not learning; the smoke test at the bottom runs the real quick demo end to end.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import warp_min as W
from toy_tasks import reviews, tokenizer
from warp_scale.cli import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TASK = W.toy_task()


def tiny_config(tmp_path=None, **overrides):
    settings = dict(n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_ff=64, sft_steps=20, sft_docs=300,
                    steps=4, prompts_per_step=2, samples_per_prompt=2, log_every=2, eval_every=0, eval_prompts=4,
                    eval_samples=1, max_new_tokens=12, etas="0,1", iterations=1, runs=2, device="cpu")
    settings.update(overrides)
    return W.Config(**settings)


NET = W.toy_network(tiny_config())


@pytest.fixture(scope="module")
def sft_state(tmp_path_factory):
    return W.toy_theta_sft(tiny_config(), str(tmp_path_factory.mktemp("sft")), log=lambda *a: None)


def run(cfg, init, sft, seed):
    return W.train_policy(cfg, TASK, NET, init, sft, seed, cfg.steps, log=lambda *a: None)


def max_abs_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_training_writes_back_nonzero_task_vectors(tmp_path, sft_state):
    """After RL, every tensor group of every run has moved: the task vector is non-zero."""
    cfg = tiny_config(tmp_path)
    for m in range(2):
        policy, _ = run(cfg, sft_state, sft_state, W.run_seed(0, 1, m))
        norms = W.task_vector_gram(sft_state, [policy], "layer")
        assert all(float(G[0, 0]) > 0 for G in norms.values()), norms


def test_ema_anchor_moves_between_init_and_policy(tmp_path, sft_state):
    """The EMA anchor is updated every step: it differs from theta_init and from the policy,
    and lies between them (closer to theta_init, since mu is small)."""
    cfg = tiny_config(tmp_path, mu=0.1)
    policy, anchor = run(cfg, sft_state, sft_state, 7)
    assert max_abs_diff(anchor, sft_state) > 0
    assert max_abs_diff(anchor, policy) > 0
    d_anchor = sum(float((anchor[k] - sft_state[k]).norm()) for k in anchor)
    d_policy = sum(float((policy[k] - sft_state[k]).norm()) for k in policy)
    assert 0 < d_anchor < d_policy


def test_sft_anchor_never_moves(tmp_path, sft_state):
    """The plain-RL baseline keeps its anchor at theta_sft (mu forced to 0)."""
    cfg = tiny_config(tmp_path)
    _, anchor = W.train_policy(cfg, TASK, NET, sft_state, sft_state, 3, cfg.steps, anchor="sft", log=lambda *a: None)
    assert max_abs_diff(anchor, sft_state) == 0


def test_runs_start_from_the_same_init_and_differ(tmp_path, sft_state):
    """All M runs start from the same theta_init (a run with 0 learning rate returns it exactly),
    and different seeds give different task vectors."""
    frozen = tiny_config(tmp_path, lr=0.0)
    for m in range(2):
        assert max_abs_diff(run(frozen, sft_state, sft_state, W.run_seed(0, 1, m))[0], sft_state) == 0
    cfg = tiny_config(tmp_path)
    a, _ = run(cfg, sft_state, sft_state, W.run_seed(0, 1, 0))
    b, _ = run(cfg, sft_state, sft_state, W.run_seed(0, 1, 1))
    assert max_abs_diff(a, b) > 0


def test_same_seed_same_weights(tmp_path, sft_state):
    """Same seed -> bit-identical weights; evaluating during training does not change them."""
    a, _ = run(tiny_config(tmp_path), sft_state, sft_state, 11)
    b, _ = run(tiny_config(tmp_path, eval_every=2), sft_state, sft_state, 11)
    assert max_abs_diff(a, b) == 0


def test_policy_gradient_reaches_every_parameter(tmp_path, sft_state):
    """The REINFORCE loss is not detached: one step gives a gradient to every parameter."""
    cfg = tiny_config(tmp_path)
    policy = W.build_model(NET, sft_state)
    anchor = W.build_model(NET, sft_state)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    prompts = [p for p in reviews.eval_prompts(2) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    stats = W.rl_step(policy, anchor, opt, prompts, TASK, cfg, gen, torch.device("cpu"), sft_model=anchor)
    missing = [n for n, p in policy.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert abs(stats["kl_anchor"]) < 1e-5 and abs(stats["kl_sft"]) < 1e-5   # policy == anchor == sft here


def test_sft_is_cached(tmp_path, sft_state):
    """A second call with the same SFT config loads theta_sft from the cache instead of training."""
    cfg = tiny_config(tmp_path)
    first = W.toy_theta_sft(cfg, str(tmp_path / "cache"), log=lambda *a: None)
    messages = []
    second = W.toy_theta_sft(cfg, str(tmp_path / "cache"), log=messages.append)
    assert any("cached" in m for m in messages)
    assert max_abs_diff(first, second) == 0


def test_tokenizer_round_trip_and_hash():
    """Encode/decode round-trips; every grammar word is one token; prompts share one length;
    the ranks file is loaded against its SHA-256 (an edited file is refused)."""
    text = reviews.corpus(50, seed=3)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for word in reviews.ADJECTIVES + sum(reviews.DOMAINS.values(), []):
        assert len(tokenizer.encode(" " + word)) == 1, word
    assert len({len(tokenizer.encode(reviews.EOT + p)) for p in reviews.all_prompts()}) == 1
    import tiktoken.load
    with pytest.raises(ValueError):
        tiktoken.load.load_tiktoken_bpe(tokenizer.RANKS_FILE, expected_hash="0" * 64)


def test_ranks_file_is_what_training_produces():
    """The shipped ranks are exactly what train_ranks() rebuilds (the file is not hand-edited)."""
    assert tokenizer.train_ranks() == tokenizer.get_tokenizer()._mergeable_ranks


def test_worked_examples_in_the_toy_task_docstring():
    """The rewards quoted in toy_tasks/__init__.py's worked examples are what reward.py computes."""
    import doctest

    import toy_tasks
    result = doctest.testmod(toy_tasks, verbose=False)
    assert result.attempted >= 8 and result.failed == 0, result


def test_grammar_accepts_the_corpus_and_rejects_spam():
    """is_grammatical accepts every generated review and rejects a degenerate one."""
    docs = [d for d in reviews.corpus(200, seed=5).split(reviews.EOT) if d]
    assert all(reviews.is_grammatical(d) for d in docs)
    assert not reviews.is_grammatical("phone review : the battery is great great great .")


def test_quick_demo_end_to_end(tmp_path):
    """`python warp_min.py demo --preset quick` writes every output, and WARP's final model has a
    higher reward than theta_sft on the evaluation set."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "warp_min.py", "demo", "--preset", "quick", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache"), "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ["config.json", "metrics.jsonl", "pareto.png", "final.safetensors", "summary.md"]:
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[0]["label"] == "theta_sft"
    assert {r["kind"] for r in rows} >= {"train", "trajectory", "front", "eval", "cosine"}
    assert evals[-1]["reward"] > evals[0]["reward"], (evals[0], evals[-1])
    assert "| theta_sft |" in proc.stdout and "plain RL" in proc.stdout
    # the saved final model is the last LITI model and loads into a fresh Transformer
    from safetensors.torch import load_file
    cfg = RunConfig(**json.loads((out / "config.json").read_text()))
    W.build_model(W.toy_network(cfg), load_file(str(out / "final.safetensors")))


def test_the_cli_keeps_denormals_so_threads_round_alike(tmp_path):
    """A run on several threads gives the same bits every time only if every thread rounds alike.
    With torch.set_flush_denormal(True) (the calling thread's mode; which kernel differed was not pinned
    down), about 1 in 10 fresh two-thread trainings of the same theta_sft ended with other weights
    (docs/architecture.md). So after a tiny demo on 2 threads, in its own process, a denormal times 1.5
    is still non-zero in every element of a tensor large enough to be split across the threads."""
    code = ("import sys, torch\nfrom warp_scale import cli\nrc = cli.main(sys.argv[1:])\n"
            "x = torch.full((1 << 20,), 1e-39) * 1.5\nprint('rc', rc, 'kept', bool(x.ne(0).all()))")
    tiny = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--head-dim", "16",
            "--d-ff", "64", "--sft-steps", "5", "--sft-docs", "300", "--steps", "2", "--log-every", "1",
            "--eval-every", "0", "--eval-prompts", "4", "--eval-samples", "1", "--max-new-tokens", "8",
            "--etas", "0,1", "--iterations", "1", "--no-baseline"]
    proc = subprocess.run([sys.executable, "-c", code, "--preset", "quick", *tiny, "--threads", "2",
                           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "rc 0 kept True", proc.stdout[-500:]


def _checkpoint_progress(path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["warp_min"])
    except Exception:          # not written yet
        return None


def _metrics_without_timing(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tok_s"} for row in rows]


def test_killed_demo_resumes_bit_for_bit(tmp_path):
    """A quick demo killed (SIGKILL) in the middle of an RL run and continued with --resume ends with
    the same final.safetensors, byte for byte, and the same metrics (timings aside) as an
    uninterrupted run with the same seed."""
    import signal
    import time
    common = ["--preset", "quick", "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "5", "--threads", "1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.run([sys.executable, "warp_min.py", *common, "--out", str(ref)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (ref / "checkpoint.safetensors").exists()       # removed once the run is complete

    victim = subprocess.Popen([sys.executable, "warp_min.py", *common, "--out", str(killed)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:               # wait for a checkpoint taken in the middle of run 1
        meta = _checkpoint_progress(killed / "checkpoint.safetensors")
        if meta and meta["progress"]["finished"] == 1 and meta["run"] is not None:
            break
        time.sleep(0.05)
    else:
        victim.kill()
        pytest.fail("no mid-run checkpoint appeared")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (killed / "final.safetensors").exists()

    proc = subprocess.run([sys.executable, "warp_min.py", "demo", "--resume", str(killed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout
    assert (killed / "final.safetensors").read_bytes() == (ref / "final.safetensors").read_bytes()
    assert _metrics_without_timing(killed / "metrics.jsonl") == _metrics_without_timing(ref / "metrics.jsonl")


def test_resume_refuses_extra_flags_and_finished_runs(tmp_path):
    """--resume takes its settings from the run's config.json; a complete run has nothing to resume."""
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"out": str(out)}))
    (out / "summary.md").write_text("done")
    for argv, fragment in [(["--resume", str(out), "--beta", "0"], "pass no other flag"),
                           (["--resume", str(out)], "already complete"),
                           (["--resume", str(tmp_path / "missing")], "no readable warp_min config.json")]:
        proc = subprocess.run([sys.executable, "warp_min.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and fragment in proc.stderr, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    """A diverged run (lr 1e30 makes every later loss non-finite) skips those steps, logs them, and
    stops after --max-skips in a row with a one-line error; its last checkpoint stays loadable."""
    out = tmp_path / "diverged"
    proc = subprocess.run([sys.executable, "warp_min.py", "--preset", "quick", "--out", str(out), "--cache-dir",
                           str(tmp_path / "cache"), "--lr", "1e30", "--warmup", "1", "--max-skips", "3",
                           "--checkpoint-every", "1", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3 consecutive steps with a non-finite loss or gradient" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "skipped" for r in rows) == 3
    meta = _checkpoint_progress(out / "checkpoint.safetensors")
    assert meta is not None and meta["run"] is not None


def test_argparse_errors_are_one_line(tmp_path):
    """A malformed value or an unknown flag: one line, exit status 2 (argparse's usage block suppressed)."""
    for argv in (["--beta", "abc"], ["--no-such-flag"], ["--eta", "1.5"]):
        proc = subprocess.run([sys.executable, "warp_min.py", "--out", str(tmp_path / "x"), *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (argv, proc.stderr)
    assert not (tmp_path / "x").exists()


def test_existing_out_is_refused_without_overwrite(tmp_path):
    """An existing, non-empty --out is left untouched unless --overwrite is given."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = subprocess.run([sys.executable, "warp_min.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
