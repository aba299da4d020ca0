"""WARP on your own model, prompts and reward (warp_scale/tasks.py, docs/own-model.md), and bf16 done right.

A Gemma 3-shaped checkpoint (sliding/global layers, q/k norms, one key/value head, head_dim != hidden /
heads, bf16) is built offline with transformers, with a small tokenizer.json, a chat template and an
instruction-tuned model's two stop ids; the loop runs on it with a reward function and a prompt file,
and its output must load in transformers with our logits.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import warp_min as W
from model import ModelConfig, Transformer
from warp_scale import tasks
from warp_scale.cli import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, EOS, BOS, END_OF_TURN = 0, 1, 2, 5
CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TINY_RUN = ["--iterations", "1", "--runs", "2", "--steps", "2", "--prompts-per-step", "1", "--samples-per-prompt", "2",
            "--max-new-tokens", "6", "--eval-prompts", "3", "--eval-samples", "1", "--eval-every", "0", "--log-every", "1",
            "--etas", "0,1", "--device", "cpu", "--threads", "1", "--no-baseline"]


def cli(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, "warp_min.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def build_gemma3(path, dtype=torch.bfloat16):
    """A random Gemma 3 text model (transformers) with a BPE tokenizer.json, a chat template and
    eos_token_id [<eos>, <end_of_turn>] in generation_config.json, as instruction-tuned Gemmas have."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from toy_tasks import reviews
    path.mkdir(parents=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                                 "<end_of_turn>"])
    tok.train_from_iterator([d for d in reviews.corpus(300).split(reviews.EOT) if d], trainer)
    assert tok.token_to_id("<end_of_turn>") == END_OF_TURN
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT, "bos_token": "<bos>",
                                                            "eos_token": "<eos>", "pad_token": "<pad>"}))
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = [EOS, END_OF_TURN]
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return build_gemma3(tmp_path_factory.mktemp("own") / "gemma3")


@pytest.fixture()
def plugin(tmp_path):
    """A reward function in a file and a prompt file, as a practitioner would write them."""
    (tmp_path / "my_reward.py").write_text(
        "def brevity(prompts, completions):\n"
        "    return [1.0 - 0.1 * len(c.split()) for c in completions]\n\n"
        "def constant(prompts, completions):\n"
        "    return [0.25] * len(completions)\n\n"
        "def broken(prompts, completions):\n"
        "    if len(completions) > 2:\n"
        "        raise KeyError('no score for this batch')\n"
        "    return [0.0] * len(completions)\n\n"
        "def too_short(prompts, completions):\n"
        "    return [1.0]\n")
    lines = [json.dumps({"prompt": f"question {i}: what about the {w}?"})
             for i, w in enumerate(["battery", "screen", "room", "pool", "staff", "camera", "speaker", "breakfast"])]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_own_checkpoint_reward_and_prompts_end_to_end(gemma3, plugin, tmp_path):
    """--init (Gemma 3 shape, bf16) + --prompts .jsonl + --reward file.py:function + --chat-template: the loop
    runs, the reward is the plug-in's, the saved model (--save-dtype float32) is θ_init carried in fp32 and
    loads in transformers with our logits."""
    out = tmp_path / "run"
    proc = cli("--init", str(gemma3), "--prompts", str(plugin / "prompts.jsonl"), "--reward",
               f"{plugin / 'my_reward.py'}:brevity", "--chat-template", "--save-dtype", "float32", "--out", str(out),
               *TINY_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] in ("eval", "front")]
    # the plug-in's reward, 1 - 0.1 * words, averaged over 3 samples: 30 * (1 - r) is a whole number of words
    assert evals and all(abs(30 * (1 - r["reward"]) - round(30 * (1 - r["reward"]))) < 1e-4 for r in evals)
    assert all("quality" not in r for r in evals)                      # the toy's grammar does not apply
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["dtype"] == "float32"
    final = load_file(str(out / "final" / "model.safetensors"))
    weights = final["model.layers.0.mlp.up_proj.weight"]
    assert (weights != weights.to(torch.bfloat16).float()).float().mean() > 0.5   # fp32 carried, not bf16-rounded
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ours = Transformer.from_pretrained(str(out / "final"))
    ids = torch.tensor([[BOS, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])        # longer than the sliding window
    torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_prompt_files_and_the_held_out_split(plugin, tmp_path):
    """.txt and .jsonl prompt files; the first --eval-prompts after a seed-0 shuffle are held out: the
    evaluation prompts are never among the training prompts, and the split does not depend on the run."""
    (tmp_path / "p.txt").write_text("a b\n\nc d\ne f\ng h\n")
    assert tasks.read_prompts(str(tmp_path / "p.txt")) == ["a b", "c d", "e f", "g h"]
    jsonl = tasks.read_prompts(str(plugin / "prompts.jsonl"))
    assert len(jsonl) == 8 and jsonl[0].startswith("question 0")
    cfg = RunConfig(prompts=str(plugin / "prompts.jsonl"), eval_prompts=3)
    task = tasks.make_task(cfg)
    held_out = task.eval_prompts(3)
    trained = {p for seed in range(20) for p in task.train_prompts(4, __import__("random").Random(seed))}
    assert len(held_out) == 3 and not trained & set(held_out) and len(trained) == 5
    assert tasks.make_task(cfg).eval_prompts(3) == held_out
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(tasks.TaskError, match="line 2 is not a JSON object with a \"prompt\" field"):
        tasks.read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(tasks.TaskError, match="need more than --eval-prompts 8"):
        tasks.make_task(RunConfig(prompts=str(plugin / "prompts.jsonl"), eval_prompts=8))


@pytest.mark.parametrize("spec, status, fragment", [
    ("my_reward:too_short", 2, "--reward my_reward:too_short returned 1 values for 2 completions"),
    ("my_reward:nothing", 2, "--reward my_reward:nothing: my_reward has no function nothing"),
    ("my_reward:broken", 1, "--reward my_reward:broken raised KeyError: 'no score for this batch'"),
])
def test_reward_plugin_errors_are_one_line(plugin, tmp_path, spec, status, fragment):
    """A reward found by import path (module:function, PYTHONPATH): its mistakes are one line -- before any
    work (exit 2, nothing written) when the first call shows them, else when training meets them (exit 1)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(plugin))
    proc = cli("--preset", "quick", "--reward", spec, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               *TINY_RUN, env=env)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert out.exists() == (status == 1)


def test_every_stop_id_ends_a_completion(gemma3):
    """Stop ids are every id of config.json's and generation_config.json's eos_token_id; generate
    finishes a row at any of them (an instruction-tuned Gemma ends its turn with <end_of_turn>)."""
    from warp_scale import tokenizer
    assert tokenizer.load(str(gemma3)).stop_ids == (EOS, END_OF_TURN)
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, d_model=8, n_head=1, n_kv_head=1, head_dim=8, d_ff=8))
    with torch.no_grad():                      # every position predicts token END_OF_TURN
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[END_OF_TURN, 0] = 1.0
        model.model.norm.weight.fill_(1e3)
    prompt = torch.tensor([[3, 4, END_OF_TURN]])
    assert model.generate(prompt, 5, temperature=0, stop_ids=(EOS, END_OF_TURN)).shape[1] == 4
    assert model.generate(prompt, 5, temperature=0, stop_ids=(EOS,)).shape[1] == 8


def test_chat_template_wraps_each_prompt(gemma3):
    """--chat-template: a prompt becomes the template's user turn and the opening of the model's turn."""
    from warp_scale import tokenizer
    plain, chat = tokenizer.load(str(gemma3)), tokenizer.load(str(gemma3), chat_template=True)
    ids = chat.encode_prompt("the battery")
    assert ids[:2] == [BOS, 4] and ids.count(BOS) == 1               # <bos><start_of_turn>
    text = chat.tokenizer.decode(ids, skip_special_tokens=False).replace("▁", " ")   # (this BPE has no "\n")
    assert "<start_of_turn> user" in text and "the battery<end_of_turn>" in text
    assert text.rindex("<start_of_turn> model") > text.index("<end_of_turn>")
    assert plain.encode_prompt("the battery")[0] == BOS and 4 not in plain.encode_prompt("the battery")


def test_reward_model_scores_in_batches_in_its_dtype(tmp_path):
    """--reward-model DIR: a transformers sequence-classification model, its one logit per text, batched,
    in bf16 when the checkpoint is; equal to transformers' own scores, whatever the batch size."""
    transformers = pytest.importorskip("transformers")
    path = build_gemma3(tmp_path / "base")
    config = transformers.GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_labels=1,
                                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    torch.manual_seed(1)
    rm_dir = tmp_path / "rm"
    transformers.GemmaForSequenceClassification(config).to(torch.bfloat16).save_pretrained(str(rm_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (rm_dir / name).write_bytes((path / name).read_bytes())
    prompts = ["phone review : the battery", "hotel review : the room", "phone review : i think"]
    completions = [" is good .", " is very bad and the staff is okay .", ""]
    scorer = tasks.RewardModel(str(rm_dir), "cpu", batch_size=2)
    assert scorer.model.dtype == torch.bfloat16
    ours = scorer(prompts, completions)
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(rm_dir))
    tok = transformers.AutoTokenizer.from_pretrained(str(rm_dir))
    for p, c, score in zip(prompts, completions, ours):
        with torch.no_grad():
            want = theirs_model(**tok([p + c], return_tensors="pt")).logits[0, 0].float().item()
        assert score == pytest.approx(want, abs=1e-6)
    task = tasks.make_task(RunConfig(reward_model=str(rm_dir)))
    assert task.reward(prompts, completions).tolist() == pytest.approx(ours)


def test_bf16_merges_carried_in_fp32_keep_small_updates():
    """Weights ~N(0, 0.03) stored in bf16, two runs whose task vectors spread s = 1e-5 per weight, SLERP(0.5)
    then LITI(0.3). Rounded to bf16 between iterations (the old path: theta_init kept in the policy's bf16,
    so slerp and liti return bf16) only a few percent of the intended update survives and most weights do
    not move; carried in fp32 (what warp_scale/driver.py now does) all of it does."""
    g = torch.Generator().manual_seed(0)
    init_bf16 = {"w": (0.03 * torch.randn(200_000, generator=g)).to(torch.bfloat16)}
    init32 = {"w": init_bf16["w"].float()}                                  # bf16 -> fp32 is exact
    runs = [{"w": init32["w"] + 1e-5 * torch.randn(200_000, generator=g)} for _ in range(2)]   # fp32 masters
    d1, d2 = (r["w"].double() - init32["w"].double() for r in runs)
    omega = torch.arccos(d1 @ d2 / (d1.norm() * d2.norm()))
    intended = 0.3 * torch.sin(omega / 2) / torch.sin(omega) * (d1 + d2)      # LITI(0.3) of SLERP(0.5), float64

    def kept(new):
        update = new["w"].double() - init32["w"].double()
        return float(update @ intended / (intended @ intended)), float((update == 0).double().mean())

    old_kept, old_unchanged = kept(W.liti(init_bf16, W.slerp(init_bf16, runs), 0.3))
    new_kept, new_unchanged = kept(W.liti(init32, W.slerp(init32, runs), 0.3))
    assert old_kept < 0.2 and old_unchanged > 0.9, (old_kept, old_unchanged)
    assert abs(new_kept - 1) < 1e-3 and new_unchanged < 1e-3, (new_kept, new_unchanged)


@pytest.mark.parametrize("source", ["toy", "checkpoint"])
def test_bf16_with_two_workers_equals_sequential(source, gemma3, tmp_path):
    """A bf16 policy on torchrun ranks (the toy with --dtype bfloat16, and a bf16 --init checkpoint) writes
    the same final model, byte for byte, and the same metrics as the sequential run. (The bf16 broadcast of
    fp32 master weights used to crash at the end of iteration 1.)"""
    common = ["--steps", "2", "--iterations", "2", "--eval-prompts", "2", "--eval-samples", "1", "--eval-every", "0",
              "--max-new-tokens", "8", "--etas", "1", "--threads", "1", "--device", "cpu"]
    if source == "toy":
        common += ["--preset", "quick", "--dtype", "bfloat16", "--sft-steps", "5", "--sft-docs", "200",
                   "--cache-dir", str(tmp_path / "cache"), "--save-dtype", "float32"]
    else:
        common += ["--init", str(gemma3), "--samples-per-prompt", "2", "--prompts-per-step", "1"]
    for name, extra in (("sequential", []), ("parallel", ["--workers", "2"])):
        proc = cli(*common, "--out", str(tmp_path / name), *extra, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    final = "final.safetensors" if source == "toy" else "final/model.safetensors"
    assert (tmp_path / "parallel" / final).read_bytes() == (tmp_path / "sequential" / final).read_bytes()

    def untimed(path):
        return [{k: v for k, v in json.loads(line).items() if k != "tok_s"} for line in open(path)]
    assert untimed(tmp_path / "parallel" / "metrics.jsonl") == untimed(tmp_path / "sequential" / "metrics.jsonl")
