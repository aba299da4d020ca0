"""Why merging helps (or does not): the geometry of two runs' task vectors, and the reward along it.

    python -m experiments.why_merging                 # the demo's settings, seed 0 -> docs/why-merging.png
    python -m experiments.why_merging --seed 1 --out runs/why

Trains the two RL runs of WARP's first iteration from theta_sft (the demo's settings and seeds), then:

- splits each task vector into the part the runs share and their own: delta_m = s + n_m, with
  s = (delta_1 + delta_2) / 2 and n_m = delta_m - s (so n_2 = -n_1), and reports |s|, |n_m|, their cosines;
- compares the norms of SLERP(0.5) and LERP(0.5) of the task vectors: LERP is s itself, shrunk by the
  cancelling n_m; SLERP rescales it to the runs' norm;
- evaluates the reward and KL along the shared direction, theta_sft + t * s_hat (s_hat = s / |s|), and marks
  where each run, LERP and SLERP sit on it (their projections t = <delta, s_hat>), the runs' own
  (evaluated) points, the reward ceiling of grammatical text and the optimal front at the same KL.

Writes the figure, and the numbers as JSON next to it.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

import warp_min as W
from toy_tasks.report import along
from warp_scale import driver
from experiments.reproduce import COMMITTED_SFT
from warp_scale.cli import PRESETS, RunConfig


# Vectors in weight space as {tensor name: float64 tensor}: never one concatenated vector (a real model would
# not fit twice in memory), dot products summed tensor by tensor in float64.
def sub(a, b):
    return {n: a[n].double() - b[n].double() for n in a}


def dot(a, b):
    return sum(float((a[n] * b[n]).sum()) for n in a)


def norm(a):
    return dot(a, a) ** 0.5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--out", default="docs", help="directory for why-merging.png and why-merging.json")
    parser.add_argument("--front-samples", type=int, default=400, help="samples of theta_sft per prompt for the front")
    parser.add_argument("--points", type=int, default=9, help="evaluations along the shared direction")
    args = parser.parse_args(argv)
    for flag, value, low in (("--front-samples", args.front_samples, 2), ("--points", args.points, 2),
                             ("--seed", args.seed, 0)):
        if value < low:
            print(f"error: {flag} {value}: must be >= {low}", file=sys.stderr)
            return 2
    cfg = RunConfig(**{**PRESETS[args.preset], "seed": args.seed, "device": "cpu", "checkpoint_every": 0,
                       "eval_every": 0, **(COMMITTED_SFT if args.preset == "default" else {})})
    task, net = W.toy_task(), W.toy_network(cfg)
    theta_sft = W.toy_theta_sft(cfg, cfg.cache_dir)
    sft_model = W.build_model(net, theta_sft)
    runs = [W.train_policy(cfg, task, net, theta_sft, theta_sft, W.run_seed(cfg.seed, 1, m), log=print)[0]
            for m in range(2)]
    deltas = [sub(r, theta_sft) for r in runs]
    shared = {n: (deltas[0][n] + deltas[1][n]) / 2 for n in deltas[0]}
    own = [sub(d, shared) for d in deltas]
    shared_norm = norm(shared)
    s_hat = {n: v / shared_norm for n, v in shared.items()}
    merged = {"slerp": W.slerp(theta_sft, runs, 0.5), "lerp": W.lerp(theta_sft, runs, 0.5)}
    merged_delta = {k: sub(v, theta_sft) for k, v in merged.items()}

    def evaluate(delta):
        state = {n: (theta_sft[n].double() + delta[n]).float() for n in theta_sft}
        return W.evaluate(W.build_model(net, state), sft_model, task, cfg, "cpu")

    projections = {**{f"run {m}": dot(d, s_hat) for m, d in enumerate(deltas)},
                   **{k: dot(v, s_hat) for k, v in merged_delta.items()}}
    t_max = 1.6 * max(projections.values())
    line = [{"t": t, **evaluate({n: t * v for n, v in s_hat.items()})}
            for t in torch.linspace(0, t_max, args.points).tolist()]
    points = {**{f"run {m}": evaluate(d) for m, d in enumerate(deltas)},
              **{k: evaluate(v) for k, v in merged_delta.items()}}
    front = driver.optimal_front_rows(cfg, task, sft_model, args.front_samples, "cpu")
    rewards, quality = driver.sample_sft(cfg, task, sft_model, 64, "cpu")
    ceiling = float(rewards[quality > 0].max())      # the best grammatical review among theta_sft's samples
    numbers = {
        "settings": dataclasses.asdict(cfg),
        "norms": {"|delta_1|": norm(deltas[0]), "|delta_2|": norm(deltas[1]),
                  "|s| (shared)": norm(shared), "|n_m| (own)": norm(own[0]),
                  "|SLERP - init|": norm(merged_delta["slerp"]), "|LERP - init|": norm(merged_delta["lerp"])},
        "cosines": {"delta_1, delta_2": dot(deltas[0], deltas[1]) / (norm(deltas[0]) * norm(deltas[1])),
                    "n_1, s": dot(own[0], shared) / (norm(own[0]) * norm(shared))},
        "projections on s_hat": projections, "along s_hat": line, "points": points, "optimal_front": front,
        "ceiling": ceiling}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "why-merging.json"), "w") as f:
        json.dump(numbers, f, indent=1)
    plot(numbers, os.path.join(args.out, "why-merging.png"))
    for k, v in {**numbers["norms"], **numbers["cosines"]}.items():
        print(f"{k:>16}: {v:.4f}")
    for k, v in points.items():
        print(f"{k:>16}: reward {v['reward']:.3f} ± {v['reward_se']:.3f}, KL {v['kl']:.2f}, quality {v['quality']:.2f}, "
              f"t on s_hat {projections[k]:.4f}")
    return 0


def plot(numbers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    line, points, proj = numbers["along s_hat"], numbers["points"], numbers["projections on s_hat"]
    left.plot([p["t"] for p in line], [p["reward"] for p in line], "k-o", ms=3, label="theta_sft + t * s_hat (shared direction)")
    styles = {"run 0": ("C0", "o"), "run 1": ("C1", "o"), "lerp": ("C2", "s"), "slerp": ("C3", "D")}
    sft_point = {"kl": 0.0, "reward": line[0]["reward"]}
    for name, (color, marker) in styles.items():
        left.axvline(proj[name], color=color, ls=":", lw=1)
        left.plot(proj[name], points[name]["reward"], marker, color=color, label=f"{name} (its own reward, at its projection)")
        optimum = along([sft_point] + numbers["optimal_front"], points[name]["kl"])
        if optimum:
            left.plot(proj[name], optimum[0], "x", color=color, ms=8,
                      label=f"optimal front at {name}'s KL" if name == "slerp" else None)
    for ax in (left, right):
        ax.axhline(numbers["ceiling"], color="gray", ls="--", lw=1,
                   label="ceiling: best grammatical review among 64 x 128 samples of theta_sft")
    left.set(xlabel="t = <delta, s_hat>  (distance along the shared direction)", ylabel="reward")
    best = [r for r in numbers["optimal_front"] if r["trusted"]]
    right.plot([p["kl"] for p in line], [p["reward"] for p in line], "k-o", ms=3, label="along s_hat")
    for name, (color, marker) in styles.items():
        right.plot(points[name]["kl"], points[name]["reward"], marker, color=color, label=name)
    right.plot([r["kl"] for r in numbers["optimal_front"]], [r["reward"] for r in numbers["optimal_front"]], color="gray",
               ls=":", label="optimal front (dotted: lower bound)")
    right.plot([r["kl"] for r in best], [r["reward"] for r in best], color="gray", label="optimal front (trusted)")
    right.set(xlabel="KL(pi || pi_sft)  [nats per completion]", ylabel="reward")
    norms = numbers["norms"]
    fig.suptitle(f"Why merging helps: delta_m = s + n_m; |s| = {norms['|s| (shared)']:.3f}, |n_m| = {norms['|n_m| (own)']:.3f}; "
                 f"|LERP| = {norms['|LERP - init|']:.3f} < |SLERP| = {norms['|SLERP - init|']:.3f} ~ |delta_m|", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
