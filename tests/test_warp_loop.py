"""The WARP loop: the sanity checks that published re-implementations fail, reproducibility,
the tokenizer, the reward and the CLI's handling of bad settings.

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
    settings = dict(out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), n_layer=2, d_model=32,
                    n_head=2, n_kv_head=1, head_dim=16, d_ff=64, sft_steps=20, sft_docs=300, steps=4,
                    prompts_per_step=2, samples_per_prompt=2, log_every=2, eval_every=0, eval_prompts=4,
                    eval_samples=1, max_new_tokens=12, etas="0,1", iterations=1, runs=2, device="cpu")
    settings.update(overrides)
    return W.Config(**settings)


@pytest.fixture(scope="module")
def sft_state(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("sft"))
    return W.train_sft(cfg, torch.device("cpu"), log=lambda *a: None)


def run(cfg, init, sft, seed):
    return W.train_policy(cfg, init, sft, seed, cfg.steps, log=lambda *a: None)


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
    _, anchor = W.train_policy(cfg, sft_state, sft_state, 3, cfg.steps, anchor="sft", log=lambda *a: None)
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
    policy = W.build_model(cfg, sft_state)
    anchor = W.build_model(cfg, sft_state)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    prompts = [p for p in reviews.eval_prompts(2) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    stats = W.rl_step(policy, anchor, opt, prompts, cfg, gen, torch.device("cpu"), sft_model=anchor)
    missing = [n for n, p in policy.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert abs(stats["kl_anchor"]) < 1e-5 and abs(stats["kl_sft"]) < 1e-5   # policy == anchor == sft here


def test_sft_is_cached(tmp_path, sft_state):
    """A second call with the same SFT config loads theta_sft from the cache instead of training."""
    cfg = tiny_config(tmp_path)
    first = W.train_sft(cfg, torch.device("cpu"), log=lambda *a: None)
    messages = []
    second = W.train_sft(cfg, torch.device("cpu"), log=messages.append)
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


@pytest.mark.parametrize("flag,value,fragment", [
    ("--beta", "-1", "--beta -1.0: must be >= 0"),
    ("--mu", "1.5", "--mu 1.5: must be in [0, 1]"),
    ("--lam", "5", "--lam 5.0: must be in [0, 1]"),
    ("--eta", "2", "--eta 2.0: must be in [0, 1]"),
    ("--runs", "0", "--runs 0: must be >= 1"),
    ("--samples-per-prompt", "1", "--samples-per-prompt 1: must be >= 2"),
    ("--temperature", "0", "--temperature 0.0: must be > 0"),
    ("--device", "tpu", "--device tpu: must be cpu, cuda or auto"),
    ("--granularity", "block", "--granularity block: must be layer, tensor or model"),
])
def test_bad_settings_give_one_line_errors(tmp_path, flag, value, fragment):
    """A bad hyperparameter: exit status 2, one line naming the flag and value, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "warp_min.py", "--preset", "quick", "--out", str(out), flag, value],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_quick_demo_end_to_end(tmp_path):
    """`python warp_min.py demo --preset quick` writes every output, and WARP's final model has a
    higher reward than theta_sft on the evaluation set."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "warp_min.py", "demo", "--preset", "quick", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
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
    cfg = W.Config(**json.loads((out / "config.json").read_text()))
    W.build_model(cfg, load_file(str(out / "final.safetensors")))
