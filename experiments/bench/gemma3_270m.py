"""WARP on a real-shaped checkpoint: a randomly initialised Gemma 3 270M, bf16, on the CPU.

    python experiments/bench/gemma3_270m.py              # build it (offline), time RL steps, run the CLI end to end
    python experiments/bench/gemma3_270m.py --steps 1    # fewer RL steps per run

The checkpoint has the released Gemma 3 270M configuration (vocab 262144, hidden 640, 18 layers, 4 query heads
and 1 key/value head of width 256, intermediate 2048, five sliding-window layers (window 512) per global
layer, RoPE bases 1e4 local / 1e6 global), random weights from transformers, saved in bf16, with a small
BPE tokenizer.json trained on the toy corpus, a chat template and two stop ids. It prints:

1. seconds per RL step of one run (sample 8 completions of 32 tokens, policy + anchor forward, backward, the
   fp32 master step and EMA) and the memory that run holds, per parameter, against the arithmetic in
   docs/own-model.md (bf16 policy, anchor and theta_sft: 6 bytes; fp32 master weights, EMA and gradients:
   12; Adam's two moments: 8; theta_init carried in fp32: 4 -- 30 bytes per parameter);
2. the whole CLI run -- `warp_min.py --init DIR --prompts FILE --reward FILE:fn --chat-template`, I = 1,
   M = 2 -- its wall time and peak RSS per parameter, and that its output loads in transformers with
   our logits.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import warp_min as W  # noqa: E402
from toy_tasks import reviews  # noqa: E402

CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def build(path):
    """The Gemma 3 270M-shaped checkpoint, bf16, and its tokenizer files; returns the parameter count."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    os.makedirs(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                                  "<end_of_turn>"])
    tok.train_from_iterator([d for d in reviews.corpus(2000).split(reviews.EOT) if d], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)
    config = transformers.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, query_pre_attn_scalar=256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [1, 5]                       # <eos>, <end_of_turn>
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def time_rl_steps(path, steps):
    """Seconds per RL step of one bf16 run, and the memory the run holds (RSS after its first step)."""
    from warp_scale import driver, tasks
    from warp_scale.cli import RunConfig
    from warp_scale.mixed import MixedPrecision
    cfg = RunConfig(init=path, chat_template=True, device="cpu", prompts_per_step=2, samples_per_prompt=4,
                    max_new_tokens=32, lr=1e-6)
    task, net = tasks.make_task(cfg), driver.network(cfg)
    before = rss_mb()
    theta_init = driver.load_theta_sft(cfg, log=lambda s: None)            # fp32, as the driver carries it
    policy = W.build_model(net, theta_init, dtype=torch.bfloat16)
    anchor = W.build_model(net, theta_init, dtype=torch.bfloat16).requires_grad_(False)
    sft_model = W.build_model(net, theta_init, dtype=torch.bfloat16).requires_grad_(False)
    mixed = MixedPrecision(theta_init, theta_init)
    optimizer = torch.optim.Adam(mixed.master.values(), lr=cfg.lr)
    gen, rng = torch.Generator().manual_seed(0), __import__("random").Random(0)
    times = []
    for step in range(steps + 1):
        prompts = [p for p in task.train_prompts(cfg.prompts_per_step, rng) for _ in range(cfg.samples_per_prompt)]
        t0 = time.perf_counter()
        stats, skipped = driver.rl_step(policy, anchor, optimizer, prompts, task, cfg, gen, "cpu", sft_model, mixed)
        times.append(time.perf_counter() - t0)
        if step == 0:
            held = rss_mb() - before
    return times[1:], held, stats        # the first step allocates Adam's moments: not timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="RL steps to time (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gemma3-270m")
        t0 = time.perf_counter()
        n = build(path)
        print(f"built a random Gemma 3 270M-shaped checkpoint: {n / 1e6:.1f}M parameters, bf16, "
              f"{sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6:.0f} MB "
              f"({time.perf_counter() - t0:.0f} s)")

        times, held, stats = time_rl_steps(path, args.steps)
        print(f"one RL run (8 sequences x 32 new tokens, {args.threads} threads): "
              f"{sum(times) / len(times):.1f} s per step (steps: {', '.join(f'{t:.1f}' for t in times)}); "
              f"memory held {held:.0f} MB = {held * 2**20 / n:.1f} bytes/parameter "
              f"(arithmetic: 30 = 6 bf16 + 12 fp32 master/EMA/grad + 8 Adam + 4 fp32 theta_init)")

        out = os.path.join(tmp, "run")
        with open(os.path.join(tmp, "reward.py"), "w") as f:
            f.write("def brevity(prompts, completions):\n    return [-0.1 * len(c.split()) for c in completions]\n")
        with open(os.path.join(tmp, "prompts.txt"), "w") as f:
            f.write("\n".join(reviews.all_prompts()) + "\n")
        command = [sys.executable, os.path.join(ROOT, "warp_min.py"), "--init", path, "--prompts",
                   os.path.join(tmp, "prompts.txt"), "--reward", os.path.join(tmp, "reward.py") + ":brevity",
                   "--chat-template", "--out", out, "--iterations", "1", "--runs", "2", "--steps", str(args.steps),
                   "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "32",
                   "--eval-prompts", "8", "--eval-samples", "1", "--eval-every", "0", "--log-every", "1",
                   "--etas", "0,1", "--lr", "1e-6", "--no-baseline", "--front-samples", "0", "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"the CLI failed:\n{proc.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"CLI end to end (I = 1, M = 2, T = {args.steps}, evaluations, merge, LITI front, save): {wall:.0f} s, "
              f"peak RSS {peak:.0f} MB = {peak * 2**20 / n:.1f} bytes/parameter")

        from transformers import AutoModelForCausalLM

        from model import Transformer
        theirs = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"), dtype=torch.float32)
        ours = Transformer.from_pretrained(os.path.join(out, "final"), dtype=torch.float32)
        ids = torch.tensor([[2] + list(range(10, 40))])
        with torch.no_grad():
            diff = (theirs(ids).logits - ours(ids)).abs().max().item()
        print(f"the output (OUT/final, {json.load(open(os.path.join(out, 'final', 'config.json')))['dtype']}) "
              f"loads in transformers: max |logit difference| vs ours {diff:.2e}")


if __name__ == "__main__":
    main()
