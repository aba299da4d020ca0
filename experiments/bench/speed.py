"""Speed of the toy pipeline against a pinned baseline commit, measured side by side in one run.

    python experiments/bench/speed.py                      # RL step, sampling, SFT step: ours vs the baseline
    python experiments/bench/speed.py --demos              # + the quick and default demos, fresh processes, no cache
    python experiments/bench/speed.py --threads 2 --baseline 908b23d

The baseline is the code of a pinned commit (default 908b23d: main before the speed work of issue 14),
extracted with `git archive` into a temporary directory (so this needs a git checkout). Each measurement
runs in a fresh subprocess, alternating baseline and ours for --rounds rounds; the medians are compared, so
a machine that gets busier or quieter during the run affects both sides alike. Also printed: where one RL
step of ours spends its time (sampling, the policy's and the anchor's forward passes and the backward pass,
the optimizer step and the EMA).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs inside a subprocess with the code under test first on sys.path; prints one JSON line. Works with
# the baseline's API (warp_min.build_model(cfg, seed=...), rl_step(..., cfg, ...)) and today's.
WORKER = r'''
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2])); torch.set_flush_denormal(True)
import warp_min as W
from toy_tasks import reviews
new = hasattr(W, "toy_task")
cfg = W.Config(device="cpu")
if new:
    task, net = W.toy_task(), W.toy_network(cfg)
    make = lambda: W.Transformer(net, generator=torch.Generator().manual_seed(0))
    step = lambda p, a, o, b, g: W.rl_step(p, a, o, b, task, cfg, g, "cpu")
    tok = task.tokenizer
    stop = dict(stop_ids=tok.stop_ids)
else:
    make = lambda: W.build_model(cfg, seed=0)
    step = lambda p, a, o, b, g: W.rl_step(p, a, o, b, cfg, g, torch.device("cpu"))
    tok = W.load_tokenizer()
    stop = dict(eos_id=tok.eos_id)
def timed(fn, n):
    fn(); fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n
out = {}
policy, anchor = make(), make().requires_grad_(False)
opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
batch = [p for p in reviews.eval_prompts(cfg.prompts_per_step) for _ in range(cfg.samples_per_prompt)]
gen = torch.Generator().manual_seed(0)
out["rl_step_ms"] = 1e3 * timed(lambda: step(policy, anchor, opt, batch, gen), 20)
model = make().eval()
prompts = torch.tensor([tok.encode_prompt(p) for p in reviews.eval_prompts(16) for _ in range(4)])   # (64, 6)
for cache in (True, False):
    s = timed(lambda: model.generate(prompts, cfg.max_new_tokens, generator=torch.Generator().manual_seed(0),
                                     use_cache=cache), 3)
    out["sample_tok_s" if cache else "sample_nocache_tok_s"] = prompts.shape[0] * cfg.max_new_tokens / s
sft_model = make()
sft_opt = torch.optim.AdamW(sft_model.parameters(), lr=3e-3, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
def sft_step():
    windows = torch.randint(0, 398, (cfg.sft_batch, cfg.sft_seq_len + 1), generator=g)
    loss = torch.nn.functional.cross_entropy(sft_model(windows[:, :-1]).flatten(0, 1).float(), windows[:, 1:].flatten())
    sft_opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(sft_model.parameters(), 1.0); sft_opt.step()
out["sft_step_ms"] = 1e3 * timed(sft_step, 10)
if new:   # where one RL step of ours goes
    tokens, mask, texts, _ = W.sample(policy, batch, task, cfg, gen, "cpu")
    r = task.reward(batch, texts)
    out["part_sample_ms"] = 1e3 * timed(lambda: W.sample(policy, batch, task, cfg, gen, "cpu"), 20)
    def loss_backward():
        loss, _ = W.reinforce_loss(policy, anchor, tokens, mask, r, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    out["part_forward_backward_ms"] = 1e3 * timed(loss_backward, 20)
    def update():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        W.ema_update(anchor, policy, cfg.mu)
    out["part_optimizer_ema_ms"] = 1e3 * timed(update, 20)
    out["part_reward_ms"] = 1e3 * timed(lambda: task.reward(batch, texts), 20)
print(json.dumps(out))
'''


def measure(code_dir, threads):
    proc = subprocess.run([sys.executable, "-c", WORKER, code_dir, str(threads)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the worker failed on {code_dir}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def demo_seconds(code_dir, preset, threads):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(code_dir, "warp_min.py"), "--preset", preset, "--threads",
                        str(threads), "--out", os.path.join(tmp, "run"), "--cache-dir", os.path.join(tmp, "cache")],
                       check=True, stdout=subprocess.DEVNULL, cwd=code_dir)
        return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="908b23d", help="the commit to compare against (default 908b23d)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every measurement (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    parser.add_argument("--demos", action="store_true", help="also time the quick and default demos (minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = os.path.join(tmp, "baseline")
        os.makedirs(base_dir)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base_dir], input=archive.stdout, check=True)
        runs = {"baseline": [], "ours": []}
        for _ in range(args.rounds):
            for name, code in (("baseline", base_dir), ("ours", ROOT)):
                runs[name].append(measure(code, args.threads))
        median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        b, o = median["baseline"], median["ours"]
        print(f"ours vs {args.baseline}, {args.threads} thread(s), medians of {args.rounds} alternating rounds:")
        print(f"  RL step (8 sequences x {32} new tokens, 3 passes + backward): {b['rl_step_ms']:.1f} -> "
              f"{o['rl_step_ms']:.1f} ms  = {b['rl_step_ms'] / o['rl_step_ms']:.2f}x faster")
        print(f"  sampling 64 x 32 tokens, KV cache: {b['sample_tok_s']:.0f} -> {o['sample_tok_s']:.0f} tok/s = "
              f"{o['sample_tok_s'] / b['sample_tok_s']:.2f}x; without the cache {o['sample_nocache_tok_s']:.0f} tok/s "
              f"(the cache: {o['sample_tok_s'] / o['sample_nocache_tok_s']:.1f}x)")
        print(f"  SFT step (32 x 64 tokens, forward + backward + AdamW): {b['sft_step_ms']:.1f} -> "
              f"{o['sft_step_ms']:.1f} ms = {b['sft_step_ms'] / o['sft_step_ms']:.2f}x")
        parts = {k[5:]: v for k, v in o.items() if k.startswith("part_")}
        total = sum(parts.values())
        print("  where one RL step of ours goes: " + ", ".join(
            f"{k.removesuffix('_ms').replace('_', ' ')} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
        if args.demos:
            for preset in ("quick", "default"):
                seconds = {name: demo_seconds(code, preset, args.threads) for name, code in
                           (("baseline", base_dir), ("ours", ROOT))}
                print(f"  demo --preset {preset} (fresh process, SFT included, no cache): {seconds['baseline']:.0f} -> "
                      f"{seconds['ours']:.0f} s = {seconds['baseline'] / seconds['ours']:.2f}x")


if __name__ == "__main__":
    main()
