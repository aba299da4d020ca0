"""Speed of the toy pipeline, measured in one run (ratios are what to compare across machines).

    python experiments/bench/speed.py              # KV-cache ratio, training tokens/s, quick + default demo times
    python experiments/bench/speed.py --no-demos   # only the micro-benchmarks (a few seconds)

Prints: sampling tokens/s with and without the KV cache (and their ratio), RL training tokens/s
(one full rl_step: sample + three forward passes + backward), and the wall time of
`python warp_min.py --preset quick` and of the default demo, each in a fresh process.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import warp_min as W  # noqa: E402
from toy_tasks import reviews  # noqa: E402


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-demos", action="store_true", help="skip the demo wall-time measurements")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    cfg, task = W.Config(device="cpu"), W.toy_task()
    net = W.toy_network(cfg)
    model = W.Transformer(net, generator=torch.Generator().manual_seed(0)).eval()
    tok = task.tokenizer
    prompts = torch.tensor([tok.encode_prompt(p) for p in reviews.eval_prompts(16) for _ in range(4)])  # (64, 6)
    n_new = cfg.max_new_tokens
    for use_cache in (True, False):  # no eos: every row generates n_new tokens
        seconds, _ = best_of(lambda: model.generate(prompts, n_new, generator=torch.Generator().manual_seed(0),
                                                    use_cache=use_cache))
        rate = prompts.shape[0] * n_new / seconds
        print(f"sampling {'with' if use_cache else 'without'} KV cache: {rate:8.0f} tok/s  ({seconds * 1e3:.0f} ms "
              f"for {prompts.shape[0]}x{n_new} tokens)")
        if use_cache:
            cached = rate
    print(f"KV-cache speed-up: {cached / rate:.1f}x")

    policy = W.Transformer(net, generator=torch.Generator().manual_seed(0))
    anchor = W.Transformer(net, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-4)
    batch = [p for p in reviews.eval_prompts(cfg.prompts_per_step) for _ in range(cfg.samples_per_prompt)]
    gen = torch.Generator().manual_seed(0)
    seconds, stats = best_of(lambda: W.rl_step(policy, anchor, opt, batch, task, cfg, gen, torch.device("cpu")), 5)
    print(f"RL step ({len(batch)} sequences, d_model {cfg.d_model}, {cfg.n_layer} layers): {seconds * 1e3:.0f} ms, "
          f"{stats['tok_s']:.0f} completion tok/s")

    if not args.no_demos:
        for preset in ("quick", "default"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, os.path.join(ROOT, "warp_min.py"), "--preset", preset, "--out",
                                os.path.join(tmp, "run"), "--cache-dir", os.path.join(tmp, "cache")],
                               check=True, stdout=subprocess.DEVNULL)
                print(f"demo --preset {preset}: {time.perf_counter() - t0:.0f} s wall (including SFT, no cache)")


if __name__ == "__main__":
    main()
