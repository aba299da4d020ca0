"""The WARP loop on a Hugging Face checkpoint: `python warp_min.py --init DIR`.

The checkpoint is built offline: a BPE tokenizer trained with the `tokenizers` library on the toy
corpus, with a vocabulary small enough that words split into different numbers of tokens (so the
prompts differ in token length and sampling must pad), and a random transformers Gemma whose
vocabulary is exactly that tokenizer's, saved with save_pretrained.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import warp_min as W
from model import Transformer, completion_mask
from toy_tasks import reviews
from warp_scale import driver, tasks
from warp_scale.cli import RunConfig
from warp_scale.mixed import MixedPrecision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, EOS, BOS = 0, 1, 2           # Gemma's ids for these tokens, kept here too
SMALL_RUN = ["--steps", "2", "--iterations", "1", "--runs", "2", "--prompts-per-step", "2",
             "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-prompts", "4", "--eval-samples", "1",
             "--eval-every", "2", "--log-every", "1", "--etas", "0,1", "--device", "cpu", "--no-baseline"]


def build_tokenizer(path, vocab_size=64):
    """BPE (SentencePiece-style spaces, as Gemma's) trained on the toy corpus; <bos> added to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.train_from_iterator([d for d in reviews.corpus(300).split(reviews.EOT) if d], trainer)
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<eos>"), tok.token_to_id("<bos>")) == (PAD, EOS, BOS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.save(str(path / "tokenizer.json"))
    return tok


def build_checkpoint(path, dtype=torch.float32, with_tokenizer=True):
    """A random 2-layer Gemma (transformers) whose vocabulary is the tokenizer's, saved to `path`."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    path.mkdir(parents=True)
    tok = build_tokenizer(path)
    config = transformers.GemmaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    torch.manual_seed(0)
    transformers.GemmaForCausalLM(config).to(dtype).save_pretrained(str(path))
    if not with_tokenizer:
        os.remove(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "gemma")


@pytest.fixture(scope="module")
def checkpoint_bf16(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "gemma-bf16", dtype=torch.bfloat16)


def cli(*args, timeout=120, pre=""):
    """`python warp_min.py ARGS`; with `pre`, that Python code runs first (in a -c wrapper)."""
    command = ["warp_min.py"] if not pre else ["-c", f"import sys; {pre}from warp_scale.cli import main; sys.exit(main())"]
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_completion_mask_per_row_prompt_lengths():
    """completion_mask with per-row prompt lengths starts each row's mask at its own length, and
    equals the int form when all lengths are equal."""
    tokens = torch.tensor([[5, 6, 7, 8, 1, 1], [5, 6, 7, 1, 9, 1]])
    assert completion_mask(tokens, torch.tensor([2, 3]), stop_ids=1).tolist() == [[0, 0, 1, 1, 1, 0],
                                                                                [0, 0, 0, 1, 0, 0]]
    assert torch.equal(completion_mask(tokens, torch.tensor([2, 2]), 1), completion_mask(tokens, 2, 1))


def test_padded_sampling_matches_each_row_alone(checkpoint):
    """Prompts of different token lengths are sampled in groups and right-padded into one batch: each
    row's mask starts at its own prompt length, and its log-probability in the padded batch equals
    the one computed on the row alone (the model is causal; padding never leaks into valid positions)."""
    cfg = RunConfig(init=str(checkpoint), max_new_tokens=8, device="cpu")
    model = W.build_model(driver.network(cfg), driver.load_theta_sft(cfg, log=lambda *a: None))
    task = tasks.make_task(cfg)
    tok = task.tokenizer
    prompts = reviews.all_prompts()
    lengths = [len(tok.encode_prompt(p)) for p in prompts]
    assert len(set(lengths)) > 1, "the test tokenizer must give prompts of different lengths"
    assert all(tok.encode_prompt(p)[0] == BOS for p in prompts)
    tokens, mask, texts, finished = W.sample(model, prompts, task, cfg, torch.Generator().manual_seed(0), "cpu")
    logp, _ = W.sequence_logprob(model, tokens, mask, cfg)
    for i, n in enumerate(lengths):
        assert mask[i, :n].sum() == 0 and mask[i, n] == 1
        length = int(mask[i].nonzero().max()) + 1                 # through the last completion token
        alone, _ = W.sequence_logprob(model, tokens[i:i + 1, :length], mask[i:i + 1, :length], cfg)
        torch.testing.assert_close(logp[i], alone[0], rtol=0, atol=1e-5)
        completion = tokens[i, n:length].tolist()
        assert finished[i] == (completion[-1] == EOS)
        assert texts[i] == tok.decode(completion[:-1] if finished[i] else completion).strip()


def test_two_warp_steps_from_a_checkpoint(checkpoint, tmp_path):
    """`demo --init DIR` runs the loop on the checkpoint (no SFT) and writes its outputs, the final
    model as a Hugging Face directory that transformers loads, with the tokenizer and token ids."""
    out = tmp_path / "run"
    proc = cli("demo", "--init", str(checkpoint), "--out", str(out), *SMALL_RUN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SFT skipped" in proc.stdout
    for name in ["config.json", "metrics.jsonl", "pareto.png", "summary.md",
                 "final/config.json", "final/model.safetensors", "final/tokenizer.json"]:
        assert (out / name).stat().st_size > 0, name
    assert not (out / "final.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} >= {"train", "trajectory", "front", "eval", "cosine"}
    config = json.loads((out / "final/config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["max_position_embeddings"]) == (EOS, BOS, 64)
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ours = Transformer.from_pretrained(str(out / "final"))
    ids = torch.tensor([[BOS, 5, 6, 7]])
    torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_bf16_policy_has_fp32_master_weights_and_fp32_ema(checkpoint_bf16):
    """A bf16 checkpoint runs as a bf16 policy; Adam updates fp32 master weights (copied, rounded,
    into the policy) and the EMA anchor is kept in fp32. One step at the paper's lr 1e-6 moves every
    master weight and every fp32 EMA weight, but few bf16 policy weights; and the same EMA update
    done in bf16, theta_ema + mu (theta - theta_ema), rounds back to theta_ema for all but weights
    within a few ulps of zero (~1%): a bf16 anchor would barely move."""
    cfg = RunConfig(init=str(checkpoint_bf16), device="cpu", prompts_per_step=2, samples_per_prompt=2,
                    max_new_tokens=8, lr=1e-6, mu=0.01)
    assert driver.policy_dtype(cfg) == torch.bfloat16        # auto: the checkpoint's config.json dtype
    theta_init = driver.load_theta_sft(cfg, log=lambda *a: None)
    assert all(t.dtype == torch.float32 for t in theta_init.values())   # carried in fp32 (bf16 -> fp32: exact)
    net = driver.network(cfg)
    policy = W.build_model(net, theta_init, dtype=torch.bfloat16)
    anchor = W.build_model(net, theta_init, dtype=torch.bfloat16).requires_grad_(False)
    mixed = MixedPrecision(theta_init, theta_init)
    optimizer = torch.optim.Adam(mixed.master.values(), lr=cfg.lr)
    prompts = [p for p in reviews.eval_prompts(2) for _ in range(2)]
    stats, skipped = driver.rl_step(policy, anchor, optimizer, prompts, tasks.make_task(cfg), cfg,
                                    torch.Generator().manual_seed(0), "cpu", mixed=mixed)
    assert not skipped
    assert stats["kl_anchor"] == 0                      # step 1: the anchor's bf16 copy is the policy
    assert all(t.dtype == torch.float32 for t in [*mixed.master.values(), *mixed.ema.values()])
    assert all(t.dtype == torch.bfloat16 for t in [*policy.state_dict().values(), *anchor.state_dict().values()])
    policy_state, n = policy.state_dict(), sum(t.numel() for t in theta_init.values())

    def moved(state, reference=theta_init):
        return sum(int((state[k] != reference[k].to(state[k].dtype)).sum()) for k in reference) / n

    for name, master in mixed.master.items():
        assert torch.equal(policy_state[name], master.detach().to(torch.bfloat16))   # policy = rounded master
    assert moved({k: v.detach() for k, v in mixed.master.items()}) > 0.99 and moved(policy_state) < 0.05
    assert moved(mixed.ema) > 0.99
    bf16 = {k: t.to(torch.bfloat16) for k, t in theta_init.items()}
    bf16_ema = {k: t + cfg.mu * (policy_state[k] - t) for k, t in bf16.items()}   # all in bf16
    assert moved(bf16_ema) < 0.02


def test_missing_tokenizer_json_is_a_one_line_error(tmp_path):
    """--init DIR without DIR/tokenizer.json: exit status 2, one line, nothing written."""
    ckpt = build_checkpoint(tmp_path / "no-tok", with_tokenizer=False)
    out = tmp_path / "out"
    proc = cli("demo", "--init", str(ckpt), "--out", str(out), *SMALL_RUN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no tokenizer.json" in proc.stderr
    assert not out.exists()


def test_tokenizers_package_missing_is_a_one_line_error(checkpoint, tmp_path):
    """Without the optional tokenizers package: exit status 2 and one line saying how to install it."""
    proc = cli("demo", "--init", str(checkpoint), "--out", str(tmp_path / "out"), *SMALL_RUN,
               pre="sys.modules['tokenizers'] = None; ")            # makes `import tokenizers` fail
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install tokenizers" in proc.stderr


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint"])
def test_bad_init_path_is_a_one_line_error(tmp_path, case):
    """--init naming no directory, or a directory without config.json: exit status 2, one line."""
    init = tmp_path / "nowhere"
    if case == "not-a-checkpoint":
        init.mkdir()
    proc = cli("demo", "--init", str(init), "--out", str(tmp_path / "out"), *SMALL_RUN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"error: --init {init}")
    assert ("not a directory" if case == "missing" else "config.json") in proc.stderr


def test_eos_from_config_list_or_tokenizer(checkpoint, tmp_path):
    """Stop ids: every id of config.json's eos_token_id (an int or a list), else the tokenizer's <eos>."""
    from warp_scale import tokenizer as hf_tokenizer
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "eos_token_id": [EOS, 7]}))
    assert hf_tokenizer.load(str(ckpt)).stop_ids == (EOS, 7)
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token_id"}))
    assert hf_tokenizer.load(str(ckpt)).stop_ids == (EOS,)   # found as <eos> in the tokenizer
