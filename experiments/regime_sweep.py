"""The pre-registered regime sweep of docs/regime-rule.md: measure the individual iteration-1 RL runs
of every candidate regime, apply the rule, write out/regimes.json and out/regimes.md.

Per setting (lr x prompts/step x beta x width) and seed s in {0, 1}: theta_sft (trained with seed s,
cached) and the demo's two iteration-1 runs m = 0, 1 (seeds run_seed(s, 1, m)). Only T = 200 is
trained: with a constant lr after warmup, the first 100 steps of a 200-step run are the 100-step run
(`--check-prefix` verifies this bit for bit), so the T = 100 candidate is read off the same runs (its
weights come from train_policy's on_checkpoint at step 100). No merge, no plain-RL baseline and no
other evaluation than the runs' own and theta_sft's is made here: the verdicts must not pick the regime.

    python -m experiments.regime_sweep [--check-prefix]    # continues from its cache after a crash or a restart

The committed experiments/results/regimes/ were measured with this script at commit c6f1ed9 (the code of
2026-11-30 before the sampler and the layout changed; a copy of it, importing warp_min's functions of that
day, ran in a separate checkout). Today's functions draw different random numbers (inverse-CDF sampling,
issue 14), so a rerun gives statistically similar but not identical numbers.
"""
import argparse
import itertools
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

import warp_min as wm
from experiments.reproduce import COMMITTED_SFT
from warp_scale.cli import PRESETS, RunConfig
from warp_scale.driver import train_run as production_run

LRS, PROMPTS, BETAS, WIDTHS, TS, SEEDS = (5e-5, 1e-4, 2e-4, 3e-4), (1, 2), (0.1, 0.3), (128, 256), (100, 200), (0, 1)
EVERY = 25                                       # evaluations every 25 steps: T/4 for T = 100, every T/8 for T = 200
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE, OUT = os.path.join("runs", ".regime-cache"), os.path.join(HERE, "results", "regimes")
TASK = wm.toy_task()
RULE = dict(quality=0.9, gain=0.5, rise=0.04, tie=0.02)


def quiet(*_):
    pass


def settings():                                  # width 128 first: the cheap candidates finish first
    for d, lr, p, beta in itertools.product(WIDTHS, LRS, PROMPTS, BETAS):
        yield dict(d_model=d, lr=lr, prompts_per_step=p, beta=beta)


def config(setting, seed, steps=max(TS)):
    d = setting["d_model"]
    return RunConfig(**{**PRESETS["default"], **setting, "head_dim": d // 4, "d_ff": 4 * d, "n_layer": 4,
                        "seed": seed, "steps": steps, **COMMITTED_SFT, "threads": 1, "device": "cpu", "baseline": False,
                        "cache_dir": os.path.join(CACHE, "sft"), "checkpoint_every": 100, "eval_every": EVERY,
                        # a "train" row is emitted just before each evaluation and its "trajectory" row just
                        # after: their time stamps give the evaluation time exactly (the cost excludes it)
                        "log_every": EVERY})


def name(setting, seed):
    return "d{d_model}-lr{lr:g}-p{prompts_per_step}-b{beta:g}".format(**setting) + f"-s{seed}"


def save_atomic(write, path):                    # a kill never leaves a half-written cache entry
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    save_atomic(write, path)


def theta_sft_and_eval(cfg):
    """theta_sft for (seed, width), trained once and cached; its evaluation, cached beside it."""
    theta_sft = wm.toy_theta_sft(cfg, cfg.cache_dir, log=quiet)
    path = os.path.join(cfg.cache_dir, f"sft-eval-d{cfg.d_model}-s{cfg.seed}.json")
    if not os.path.exists(path):
        sft = wm.build_model(wm.toy_network(cfg), theta_sft)
        write_json(wm.evaluate(sft, sft, TASK, cfg, "cpu"), path)
    return theta_sft, json.load(open(path))


def train_run(cfg, theta_sft, m, steps):
    """One iteration-1 run: ({"t100": weights at step 100, "t<steps>": final weights}, its record)."""
    rows, stamps, at_100 = [], [], {}

    def emit(row):
        rows.append(row)
        stamps.append(time.perf_counter())

    def keep(run_state):                         # the tensors alias the live weights: clone them
        meta, tensors = run_state
        if meta["step"] == 100:
            at_100.update({k[len("policy/"):]: v.clone() for k, v in tensors.items() if k.startswith("policy/")})
    t0 = time.perf_counter()
    final, _ = production_run(cfg, TASK, wm.toy_network(cfg), theta_sft, theta_sft, wm.run_seed(cfg.seed, 1, m), steps,
                              log=quiet, emit=emit, on_checkpoint=keep)
    wall = time.perf_counter() - t0
    eval_s = sum(stamps[i] - stamps[i - 1] for i, row in enumerate(rows) if row["kind"] == "trajectory")
    record = {"run_seed": wm.run_seed(cfg.seed, 1, m), "wall_s": wall, "eval_s": eval_s,
              "s_per_step": (wall - eval_s) / steps, "skipped_steps": sum(r["kind"] == "skipped" for r in rows),
              "trajectory": [{k: r[k] for k in ("step", "reward", "reward_se", "kl", "kl_se", "quality")}
                             for r in rows if r["kind"] == "trajectory"]}
    return {"t100": at_100, f"t{steps}": final} if steps > 100 else {"t100": final}, record


def seed_result(setting, seed):
    """The two runs of one seed (cached on disk), theta_sft's evaluation and the task-vector cosines."""
    path = os.path.join(CACHE, "runs", name(setting, seed))
    if os.path.exists(path + ".json"):
        return json.load(open(path + ".json"))
    cfg = config(setting, seed)
    theta_sft, sft_eval = theta_sft_and_eval(cfg)
    runs, weights = [], []
    for m in (0, 1):
        w, record = train_run(cfg, theta_sft, m, cfg.steps)
        runs.append(record)
        weights.append(w)
    result = {"theta_sft": sft_eval, "runs": runs,
              "cosine": {f"t{T}": wm.cosine_report(theta_sft, [w[f"t{T}"] for w in weights], "model")["model"]
                         for T in TS}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {f"run{m}/t{T}/{k}": v.contiguous() for m, w in enumerate(weights) for T in TS for k, v in w[f"t{T}"].items()}
    save_atomic(lambda tmp: save_file(tensors, tmp), path + ".safetensors")
    write_json(result, path + ".json")           # written last: its presence marks the seed as done
    return result


def measure(per_seed, T):
    """The rule's measurements of candidate (setting, T), per seed (the mean of its two runs) and over seeds."""
    def at(run, step):
        return next(r for r in run["trajectory"] if r["step"] == step)
    seeds = {}
    for seed, res in per_seed.items():
        runs = res["runs"]
        seeds[seed] = {"quality": sum(at(r, T)["quality"] for r in runs) / 2,
                       "gain": sum(at(r, T)["reward"] for r in runs) / 2 - res["theta_sft"]["reward"],
                       "rise": sum(at(r, T)["reward"] - at(r, 3 * T // 4)["reward"] for r in runs) / 2,
                       "cosine": res["cosine"][f"t{T}"],
                       "s_per_step": sum(r["s_per_step"] for r in runs) / 2}
    mean = {k: sum(s[k] for s in seeds.values()) / len(seeds) for k in seeds[0]}
    mean["cost_s"] = mean["s_per_step"] * T
    why = [f"{k} {mean[k]:.3f} < {RULE[k]}" for k in ("quality", "gain", "rise") if not mean[k] >= RULE[k]]
    return {"per_seed": seeds, "mean": mean, "eligible": not why, "why_not": why}


def choose(candidates):
    eligible = [c for c in candidates if c["eligible"]]
    if not eligible:
        return None
    lowest = min(c["mean"]["cosine"] for c in eligible)
    tied = [c for c in eligible if c["mean"]["cosine"] <= lowest + RULE["tie"]]
    return min(tied, key=lambda c: c["mean"]["cost_s"])["id"]


def report(candidates, sft_evals, chosen, complete):
    os.makedirs(OUT, exist_ok=True)
    write_json({"rule": "docs/regime-rule.md", "thresholds": RULE, "complete": complete, "chosen": chosen,
                "theta_sft": sft_evals, "candidates": candidates}, os.path.join(OUT, "regimes.json"))
    lines = [f"# Regime sweep (docs/regime-rule.md){'' if complete else ' -- PARTIAL'}", "",
             f"Chosen: **{chosen}**" if chosen else "Chosen: none", "",
             "| id | d | lr | seq/step | beta | T | quality | gain | rise | cosine | s/step | eligible |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in candidates:
        s, m = c["settings"], c["mean"]
        verdict = "**chosen**" if c["id"] == chosen else "yes" if c["eligible"] else "no: " + "; ".join(c["why_not"])
        lines.append(f"| {c['id']} | {s['d_model']} | {s['lr']:g} | {4 * s['prompts_per_step']} | {s['beta']:g} "
                     f"| {c['T']} | {m['quality']:.3f} | {m['gain']:.3f} | {m['rise']:.3f} | {m['cosine']:.3f} "
                     f"| {m['s_per_step']:.3f} | {verdict} |")
    lines += ["", "theta_sft: " + ", ".join(f"{k}: reward {v['reward']:.3f}, quality {v['quality']:.3f}"
                                            for k, v in sft_evals.items())]
    save_atomic(lambda tmp: open(tmp, "w").write("\n".join(lines) + "\n"), os.path.join(OUT, "regimes.md"))


def check_prefix(setting=dict(d_model=128, lr=3e-4, prompts_per_step=1, beta=0.1), seed=0):
    """Is step 100 of the cached 200-step run bit-identical to a real 100-step run (run m = 0)?"""
    seed_result(setting, seed)
    cached = load_file(os.path.join(CACHE, "runs", name(setting, seed) + ".safetensors"))
    cfg = config(setting, seed, steps=100)
    w, record = train_run(cfg, wm.toy_theta_sft(cfg, cfg.cache_dir, log=quiet), 0, 100)
    same = all(torch.equal(v, cached[f"run0/t100/{k}"]) for k, v in w["t100"].items())
    rows = json.load(open(os.path.join(CACHE, "runs", name(setting, seed) + ".json")))["runs"][0]["trajectory"]
    same_rows = record["trajectory"] == [r for r in rows if r["step"] <= 100]
    write_json({"setting": setting, "seed": seed, "weights_identical": same, "trajectory_identical": same_rows},
               os.path.join(OUT, "prefix_check.json"))
    print(f"prefix check: weights identical {same}, trajectory rows identical {same_rows}")


def main():
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-prefix", action="store_true", help="only verify the 100-of-200-steps shortcut")
    if parser.parse_args().check_prefix:
        return check_prefix()
    candidates, sft_evals, t0 = [], {}, time.time()
    all_settings = list(settings())
    for i, setting in enumerate(all_settings):
        per_seed = {seed: seed_result(setting, seed) for seed in SEEDS}
        for seed, res in per_seed.items():
            sft_evals[f"d{setting['d_model']}-s{seed}"] = res["theta_sft"]
        for T in TS:
            candidates.append({"id": f"{name(setting, 0)[:-3]}-T{T}", "settings": setting, "T": T,
                               **measure(per_seed, T)})
        report(candidates, sft_evals, choose(candidates), complete=i + 1 == len(all_settings))
        print(f"[{time.time() - t0:7.0f}s] {i + 1}/{len(all_settings)} {name(setting, 0)[:-3]}: " + "  ".join(
            f"T{c['T']} q {c['mean']['quality']:.3f} gain {c['mean']['gain']:.3f} rise {c['mean']['rise']:.3f} "
            f"cos {c['mean']['cosine']:.3f}" for c in candidates[-2:]), flush=True)


if __name__ == "__main__":
    main()
