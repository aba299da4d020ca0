"""`python -m experiments.reproduce`: each claim of the WARP paper tested on the toy task.

Kept out of warp_min.py so the algorithm reads without it; everything here calls warp_min's own
functions (slerp, lerp, liti, evaluate; the runs through warp_scale.driver.train_run, which is
warp_min.train_policy plus the checkpoints claim 5 needs), nothing is re-implemented.

How it runs (see `collect`): the experiments share work. One theta_sft per model width (cached),
then RL runs in worker processes (one thread each, so a run's numbers never depend on how many
workers there are), merges in the main process, and evaluations back in the workers, every model
scored on the same prompts with the same random numbers. A run is cached on disk under its full
description, so an interrupted reproduction continues where it stopped.

  phase 1  claim 10: two runs per (regime, seed) for the regimes around the preset's, one factor changed at a
           time (width, batch size, beta, run length); the optimal KL-reward front of the preset's theta_sft
  phase 2  in the preset's regime ("full": the one the rule of docs/regime-rule.md chose before any verdict
           was seen -- the demo's settings at width 256; "converged": the demo's settings before that rule,
           whose runs reach the reward ceiling): two more runs (M = 4), the anchor/beta runs of claim 1,
           plain RL at several beta (claim 11's envelope), iteration 2
  phase 3+ iterations 3..I of the WARP loop (claim 7)

Then `CLAIMS` turns the numbers into one verdict per claim. Each claim's rule is code next to its
statement: a few checks, each a function of that seed's numbers; the verdict is
    reproduced      every check holds in every seed
    partly          some check holds in most seeds
    not reproduced  otherwise.
Outputs in --out: claims.json, claims.md (the table in README), raw.json (every measurement) and one
PNG per claim.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch

import warp_min as W
from warp_scale import hf
from warp_scale.cli import PRESETS as CLI_PRESETS
from warp_scale.cli import ArgumentParser, RunConfig, UsageError
from warp_scale import driver
from warp_scale.driver import train_run

# ----------------------------------------------------------------------------------------------
# Presets: what is run. "full" is what experiments/results/ holds, "converged" experiments/results/converged/;
# "quick" is a 1.5-minute smoke test of the same code.
# ----------------------------------------------------------------------------------------------

# theta_sft of the committed results (here, experiments/results/regimes/ and docs/why-merging.*): 800 SFT steps
# (the demo's default became 500 afterwards, for speed)
COMMITTED_SFT = dict(sft_steps=800)
CONVERGED = dict(lr=3e-4, prompts_per_step=2, beta=0.1, steps=200, eval_every=50,   # the demo before the rule
                 n_layer=4, d_model=128, head_dim=32, d_ff=512, **COMMITTED_SFT)
CONVERGED_CELLS = {   # claim 10's regimes: one factor at a time around those settings
    "batch 4": dict(prompts_per_step=1),
    "batch 8": dict(),                                        # 2 prompts x 4 samples per step
    "batch 32": dict(prompts_per_step=8),
    "width 64": dict(d_model=64, head_dim=16, d_ff=256),
    "width 256": dict(d_model=256, head_dim=64, d_ff=1024),
    "50 steps": dict(steps=50, eval_every=10),                # runs stopped far below the reward ceiling
    "lr 1e-3": dict(lr=1e-3),                                 # gradient noise through the step size
}


# The reproduction's regime: what docs/regime-rule.md's rule chose (the demo's settings at width 256), and
# claim 10's regimes around it, one factor at a time -- among them the demo itself (width 128).
RULE = dict(CLI_PRESETS["default"], d_model=256, head_dim=64, d_ff=1024, **COMMITTED_SFT)
RULE_CELLS = {
    "rule": dict(),                                           # width 256, lr 3e-4, 8 seq/step, beta 0.3, T 200
    "width 128 (demo)": dict(d_model=128, head_dim=32, d_ff=512),
    "4 seq/step": dict(prompts_per_step=1),
    "beta 0.1": dict(beta=0.1),
    "T / 2": dict(steps=100, eval_every=25),
}


PRESETS = {
    "full": dict(base=RULE, regime="rule", cells=RULE_CELLS,
                 seeds=[0, 1, 2], iterations=4, beta_large=1.0, envelope=[0.5, 1, 3, 10], front_samples=400,
                 lambdas=[round(0.1 * i, 1) for i in range(11)], etas=[0, 0.1, 0.3, 0.5, 0.8, 1]),
    "converged": dict(base=CONVERGED, regime="batch 8", cells=CONVERGED_CELLS, seeds=[0, 1, 2], iterations=4,
                      beta_large=1.0, envelope=[0.5, 1, 3, 10], front_samples=400,
                      lambdas=[round(0.1 * i, 1) for i in range(11)], etas=[0, 0.1, 0.3, 0.5, 0.8, 1]),
    "quick": dict(base=CLI_PRESETS["quick"],
                  cells={"batch 4": dict(prompts_per_step=1), "batch 8": dict(), "batch 32": dict(prompts_per_step=8),
                         "width 32": dict(d_model=32, head_dim=8, d_ff=128),
                         "width 128": dict(d_model=128, head_dim=32, d_ff=512), "10 steps": dict(steps=10, eval_every=5),
                         "lr 3e-3": dict(lr=3e-3)},
                  regime="batch 8", seeds=[0, 1, 2], iterations=3, beta_large=1.0, envelope=[0.5, 1, 3],
                  front_samples=32, lambdas=[0, 0.25, 0.5, 0.75, 1], etas=[0, 0.1, 0.3, 0.5, 0.8, 1]),
}
RESULTS = os.path.join(os.path.dirname(os.path.relpath(__file__)), "results")


# ----------------------------------------------------------------------------------------------
# Worker side: one RL run or one evaluation per task, one thread per process.
# ----------------------------------------------------------------------------------------------


def _worker_init():
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)   # safe on one thread: every kernel runs in this mode (docs/architecture.md)
    # Ctrl-C: the main process says what happened; a worker leaves quietly (a run it was training is
    # simply not cached: its files are written atomically, the .json last)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


SFT_KEYS = ("seed", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "sft_steps", "sft_lr",
            "sft_batch", "sft_seq_len", "sft_docs", "max_new_tokens")


@functools.lru_cache(maxsize=8)
def _sft(cfg_json, cache_dir):
    cfg = RunConfig(**json.loads(cfg_json))
    return W.toy_theta_sft(cfg, cache_dir, log=lambda s: None)


def sft_task(cfg_json, cache_dir):
    _sft(cfg_json, cache_dir)   # trains theta_sft into the cache (or finds it there)
    return cfg_json


def run_task(cfg_json, cache_dir, spec, init_state, path):
    """One RL run (warp_min.train_policy) -> PATH.safetensors (final weights, + checkpoints) and PATH.json."""
    cfg = RunConfig(**json.loads(cfg_json))
    cfg = dataclasses.replace(cfg, beta=spec["beta"],
                              checkpoint_every=spec["steps"] // 4 if spec["checkpoints"] else 0)
    sft = _sft(cfg_json, cache_dir)
    rows, saved = [], {}

    def keep(run):   # the policy's weights at every quarter of the run (claim 5's control)
        meta, tensors = run
        saved.update({f"step{meta['step']}/{k[7:]}": v.clone() for k, v in tensors.items() if k.startswith("policy/")})

    final, _ = train_run(cfg, W.toy_task(), W.toy_network(cfg), init_state if init_state is not None else sft, sft,
                         spec["seed"], spec["steps"], anchor=spec["anchor"], log=lambda s: None, emit=rows.append,
                         on_checkpoint=keep if spec["checkpoints"] else None)
    hf.save_atomic({**{f"final/{k}": v for k, v in final.items()}, **saved}, path + ".safetensors")
    trajectory = [{k: r[k] for k in ("step", "reward", "reward_se", "kl", "kl_se", "quality")}
                  for r in rows if r["kind"] == "trajectory"]
    _write_json({"spec": spec, "trajectory": trajectory}, path + ".json")   # written last: marks the run done
    return path


def front_task(cfg_json, cache_dir, n):
    """The optimal KL-reward front of a regime's theta_sft (warp_scale.driver.optimal_front_rows)."""
    cfg = RunConfig(**json.loads(cfg_json))
    sft_model = W.build_model(W.toy_network(cfg), _sft(cfg_json, cache_dir))
    rows = driver.optimal_front_rows(cfg, W.toy_task(), sft_model, n, "cpu", log=lambda s: None)
    return [{k: r[k] for k in ("beta", "reward", "kl", "ess_mean", "trusted", "quality", "samples")} for r in rows]


def eval_task(cfg_json, cache_dir, state):
    cfg = RunConfig(**json.loads(cfg_json))
    net = W.toy_network(cfg)
    sft_model = W.build_model(net, _sft(cfg_json, cache_dir))
    point = W.evaluate(W.build_model(net, state), sft_model, W.toy_task(), cfg, "cpu")
    return {k: point[k] for k in ("reward", "reward_se", "kl", "kl_se", "quality")}


def _finite(obj):
    """NaN/inf (e.g. the cosine of a zero task vector) -> None: JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def _write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(_finite(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Main side: schedules runs and evaluations, merges.
# ----------------------------------------------------------------------------------------------


class Run:
    def __init__(self, path):
        from safetensors.torch import load_file
        tensors = load_file(path + ".safetensors")
        self.final = {k[6:]: v for k, v in tensors.items() if k.startswith("final/")}
        steps = sorted({int(k[4:k.index("/")]) for k in tensors if k.startswith("step")})
        self.checkpoints = [{k[len(f"step{s}/"):]: v for k, v in tensors.items() if k.startswith(f"step{s}/")}
                            for s in steps] + [self.final]
        with open(path + ".json") as f:
            self.trajectory = json.load(f)["trajectory"]


class Lab:
    """The worker pool, the run cache, and one Config per regime ("cell")."""

    def __init__(self, preset, cache, workers, log):
        self.preset, self.cache, self.log = preset, cache, log
        self.sft_dir = os.path.join(os.path.dirname(os.path.abspath(cache)), "sft")   # shared by the presets
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        self.cfgs = {}
        for name, overrides in preset["cells"].items():
            cfg = RunConfig(**{**preset["base"], **overrides, "seed": 0, "baseline": False})
            self.cfgs[name] = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        os.makedirs(os.path.join(cache, "runs"), exist_ok=True)
        self.sft_states = {}
        self.submitted = self.done = 0       # runs trained in this invocation (cached ones are not counted)

    def cfg(self, cell):
        return RunConfig(**json.loads(self.cfgs[cell]))

    def start_sft(self):
        """Train theta_sft of every width in the workers (choice: one theta_sft for all seeds: the seeds
        vary the RL runs); returns {cell: future}. Regimes of one width share it (same cache entry)."""
        by_path = {}
        for cell in self.cfgs:
            by_path.setdefault(str([getattr(self.cfg(cell), k) for k in SFT_KEYS]), []).append(cell)
        # the widest first: its SFT is the longest, the other worker meanwhile trains the rest and starts runs
        order = sorted(by_path.values(), key=lambda cells: -self.cfg(cells[0]).d_model)
        futures = {}
        for cells in order:
            future = self.pool.submit(sft_task, self.cfgs[cells[0]], self.sft_dir)
            futures.update({cell: future for cell in cells})
        return futures

    def sft(self, cell, futures):
        """theta_sft of a regime, once its training is done."""
        if cell not in self.sft_states:
            futures[cell].result()
            self.sft_states[cell] = _sft(self.cfgs[cell], self.sft_dir)
        return self.sft_states[cell]

    def run(self, cell, seed, iteration, run, init=None, init_name="theta_sft", anchor="ema", beta=None,
            steps=None, checkpoints=False):
        """A future of Run. Seeds: warp_min.run_seed(seed, iteration, run), as in the demo."""
        spec = {"cell": cell, "seed": W.run_seed(seed, iteration, run), "init": init_name, "anchor": anchor,
                "beta": self.cfg(cell).beta if beta is None else beta, "steps": steps or self.cfg(cell).steps,
                "checkpoints": checkpoints}
        digest = hashlib.sha256((self.cfgs[cell] + json.dumps(spec, sort_keys=True)).encode())
        for name in sorted(init or {}):           # a later iteration's init: keyed by its bits, never stale
            digest.update(name.encode() + init[name].contiguous().view(torch.uint8).numpy().tobytes())
        key = digest.hexdigest()[:20]
        path = os.path.join(self.cache, "runs", key)
        if os.path.exists(path + ".json"):
            done = concurrent.futures.Future()
            done.set_result(path)
            future = done
        else:
            future = self.pool.submit(run_task, self.cfgs[cell], self.sft_dir, spec, init, path)
            self.submitted += 1
            future.add_done_callback(lambda f: self._finished(f, cell, spec))
        return _Then(future, Run)

    def _finished(self, future, cell, spec):
        self.done += 1
        if not future.cancelled() and future.exception() is None:
            self.log(f"  run {self.done}/{self.submitted} done: {cell}, {spec['init']}, {spec['anchor']} anchor, "
                     f"beta {spec['beta']:g}, seed {spec['seed']}")

    def evaluate(self, cell, state):
        return self.pool.submit(eval_task, self.cfgs[cell], self.sft_dir, state)

    def front(self, cell, n):
        return self.pool.submit(front_task, self.cfgs[cell], self.sft_dir, n)


class _Then:
    """future.result() passed through a function (loading a finished run from disk), once."""

    def __init__(self, future, fn):
        self.future, self.fn, self.value = future, fn, None

    def result(self):
        if self.value is None:
            self.value = self.fn(self.future.result())
        return self.value


def get(tree):
    """Wait for every future in a nested dict/list and return the same structure with results."""
    if isinstance(tree, dict):
        return {k: get(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [get(v) for v in tree]
    return tree.result() if hasattr(tree, "result") else tree


def cosines(init, policies):
    """Task-vector and full-weight cosine of every pair of policies (model level), and per tensor for the first pair."""
    zeros = {k: torch.zeros_like(v) for k, v in init.items()}
    pairs = [(a, b) for a in range(len(policies)) for b in range(a + 1, len(policies))]
    task = [W.cosine_report(init, [policies[a], policies[b]], "model")["model"] for a, b in pairs]
    full = [W.cosine_report(zeros, [policies[a], policies[b]], "model")["model"] for a, b in pairs]
    return {"task_vector": task, "full_weights": full,
            "per_tensor_task_vector": W.cosine_report(init, policies, "tensor"),
            "per_tensor_full_weights": W.cosine_report(zeros, policies, "tensor")}


def trajectory(start, run):
    """A run's evaluated trajectory with its starting point (step 0) in front."""
    return [{"step": 0, **start}] + run.trajectory


def collect(preset, cache, workers, log=print):
    """Run every experiment; returns raw measurements (json-able), the input of every claim."""
    lab = Lab(preset, cache, workers, log)
    seeds, cells = preset["seeds"], list(preset["cells"])
    t0 = time.time()

    def phase(name):
        log(f"[{time.time() - t0:6.0f}s] {name}")

    try:
        phase(f"theta_sft for {len(cells)} regimes, then phase 1: {2 * len(cells) * len(seeds)} runs "
              "(claim 10's regimes)")
        sft_futures = lab.start_sft()
        cells_by_cost = sorted(cells, key=lambda c: lab.cfg(c).d_model)      # runs whose theta_sft is ready first
        sft_eval, pairs = {}, {}
        for c in cells_by_cost:   # phase 1 -- claim 10: two independent runs per regime and seed, and their SLERP
            sft_eval[c] = lab.evaluate(c, lab.sft(c, sft_futures))
            pairs[c] = {s: [lab.run(c, s, 1, m, checkpoints=(m == 0)) for m in (0, 1)] for s in seeds}
        raw = {"preset": preset, "sft": get(sft_eval), "cells": {}}
        for c in cells:
            raw["cells"][c] = {}
            for s in seeds:
                runs = get(pairs[c][s])
                merged = W.slerp(lab.sft_states[c], [r.final for r in runs], 0.5)
                raw["cells"][c][s] = {"trajectories": [trajectory(raw["sft"][c], r) for r in runs],
                                      "cosine": W.cosine_report(lab.sft_states[c], [r.final for r in runs],
                                                                "model")["model"],
                                      "slerp": lab.evaluate(c, merged)}
        regime = raw["regime"] = preset["regime"]
        front = lab.front(regime, preset["front_samples"])
        raw["cells"] = get(raw["cells"])
        phase(f"phase 2 in the preset's regime ({regime}): M = 4, claim 1's and 11's runs, iteration 2")

        # phase 2 -- in that regime: M = 4, claim 1's anchors and betas, plain RL's envelope, WARP iteration 2
        sft, cfg = lab.sft_states[regime], lab.cfg(regime)
        raw["steps"], raw["eval_every"], T = cfg.steps, cfg.eval_every, cfg.steps
        first = {s: get(pairs[regime][s]) for s in seeds}
        more = {s: [lab.run(regime, s, 1, m) for m in (2, 3)] for s in seeds}
        anchors = {s: {"ema, beta=%g" % cfg.beta: None,   # = run 0 of iteration 1 (same seed: paired comparison)
                       "sft, beta=%g" % cfg.beta: lab.run(regime, s, 1, 0, anchor="sft", steps=2 * T),
                       "beta=0": lab.run(regime, s, 1, 0, beta=0.0),
                       "ema, beta=%g" % preset["beta_large"]: lab.run(regime, s, 1, 0, beta=preset["beta_large"]),
                       "sft, beta=%g" % preset["beta_large"]: lab.run(regime, s, 1, 0, anchor="sft",
                                                                      beta=preset["beta_large"])}
                   for s in seeds}
        # claim 11: plain RL (SFT anchor) for 2T steps -- the steps of one WARP run over two iterations -- at
        # several beta; the demo's beta is claim 1's "sft" run
        envelope = {s: {f"{f:g}x beta": (lab.run(regime, s, 1, 0, anchor="sft", beta=f * cfg.beta, steps=2 * T)
                                          if f != 1 else anchors[s]["sft, beta=%g" % cfg.beta])
                        for f in preset["envelope"]} for s in seeds}
        theta_init = {s: {1: sft} for s in seeds}
        merged = {s: {} for s in seeds}
        iteration_runs = {s: {1: first[s]} for s in seeds}
        evals = {s: {} for s in seeds}
        for it in range(1, preset["iterations"] + 1):
            if it > 1:
                phase(f"phase {it}: WARP iteration {it}, {2 * len(seeds)} runs"
                      + (" (+ M = 4 and claim 1's runs)" if it == 2 else ""))
                pending = {s: [lab.run(regime, s, it, m, init=theta_init[s][it], init_name=f"iteration {it}")
                               for m in (0, 1)] for s in seeds}
                for s in seeds:
                    iteration_runs[s][it] = get(pending[s])
            for s in seeds:
                runs = iteration_runs[s][it]
                merged[s][it] = W.slerp(theta_init[s][it], [r.final for r in runs], cfg.lam)
                theta_init[s][it + 1] = W.liti(theta_init[s][it], merged[s][it], cfg.eta)
                evals[s][f"front {it}"] = [lab.evaluate(regime, W.liti(sft, merged[s][it], eta)) for eta in preset["etas"]]
                evals[s][f"liti {it}"] = lab.evaluate(regime, theta_init[s][it + 1])
        phase("merges and evaluations (claims 2-9)")
        raw["seeds"] = {}
        for s in seeds:
            r0, r1 = first[s]
            runs4 = first[s] + get(more[s])
            finals = [r.final for r in runs4]
            e = evals[s]
            for lam in preset["lambdas"]:
                e[f"slerp {lam}"] = lab.evaluate(regime, W.slerp(sft, finals[:2], lam))
                e[f"lerp {lam}"] = lab.evaluate(regime, W.lerp(sft, finals[:2], lam))
            e["M=4"] = lab.evaluate(regime, W.slerp(sft, finals))
            e["checkpoint average"] = lab.evaluate(regime, W.lerp(sft, r0.checkpoints))   # M > 2 LERP = the mean
            for granularity in ("tensor", "model"):
                e[f"granularity {granularity}"] = lab.evaluate(regime, W.slerp(sft, finals[:2], 0.5, granularity))
            raw["seeds"][s] = {
                "cosine": cosines(sft, finals),
                "anchors": {k: trajectory(raw["sft"][regime], v.result() if v else r0) for k, v in anchors[s].items()},
                "run trajectories": [trajectory(raw["sft"][regime], r) for r in (r0, r1)],
                "envelope": {k: trajectory(raw["sft"][regime], v.result()) for k, v in envelope[s].items()},
                "iteration trajectories": {it: [r.trajectory for r in iteration_runs[s][it]]
                                           for it in range(1, preset["iterations"] + 1)},
                "evals": e}
        raw["seeds"] = get(raw["seeds"])
        raw["optimal_front"] = front.result()
        for s in seeds:   # run endpoints = their trajectories' last evaluation (same weights, same seed)
            raw["seeds"][s]["evals"]["M=1"] = raw["seeds"][s]["run trajectories"][0][-1]
            raw["seeds"][s]["evals"]["M=2"] = raw["seeds"][s]["evals"]["slerp 0.5"]
        phase("done")
    finally:
        lab.pool.shutdown(cancel_futures=True)
    return json.loads(json.dumps(_finite(raw)))   # as when read back: int keys become strings, no NaN


# ----------------------------------------------------------------------------------------------
# Small numeric helpers for the rules (None = "not measurable", and every comparison with it fails).
# ----------------------------------------------------------------------------------------------


def at(points, x, key_x="kl", key_y="reward"):
    """y at the first point where the polyline through `points` (in order) reaches x; None if never."""
    for a, b in zip(points, points[1:]):
        lo, hi = sorted((a[key_x], b[key_x]))
        if lo <= x <= hi:
            t = 0.0 if hi == lo else (x - a[key_x]) / (b[key_x] - a[key_x])
            return a[key_y] + t * (b[key_y] - a[key_y])
    return points[0][key_y] if points and points[0][key_x] == x else None


def gt(a, b):
    return a is not None and b is not None and a > b


def lt(a, b):
    return gt(b, a)


def diff(a, b):
    return None if a is None or b is None else a - b


def spearman(x, y):
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def r_squared(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = ((y - (slope * x + intercept)) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - residual / total) if total > 0 else None


def above_chord(xs, ys):
    """min over interior points of y - (the straight line from the first point to the last)."""
    chord = [ys[0] + (x - xs[0]) / (xs[-1] - xs[0]) * (ys[-1] - ys[0]) for x in xs]
    return min(y - c for y, c in zip(ys[1:-1], chord[1:-1])) if len(xs) > 2 else None


# ----------------------------------------------------------------------------------------------
# The claims: statement, per-seed numbers, checks (the rule). Figures: FIGURES below.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Claim:
    id: int
    title: str
    paper: str
    values: callable          # (raw, seed) -> {name: number or None}
    checks: dict              # {description: values -> bool}
    shown: tuple              # the values the Markdown table shows


def verdict(check_results):
    """{check: [bool per seed]} -> reproduced / partly / not reproduced (see the module docstring).
    choice: checks are strict comparisons without a noise margin; the spread over seeds is reported next to them."""
    if all(all(v) for v in check_results.values()):
        return "reproduced"
    if any(sum(v) > len(v) / 2 for v in check_results.values()):
        return "partly"
    return "not reproduced"


def anchor_values(raw, s):
    a, p = raw["seeds"][s]["anchors"], raw["preset"]
    beta = W.Config(**p["base"]).beta
    ema, sft = a[f"ema, beta={beta:g}"], a[f"sft, beta={beta:g}"]
    kl = min(ema[-1]["kl"], max(r["kl"] for r in sft))
    large = a[f"ema, beta={p['beta_large']:g}"]
    start = ema[0]["reward"]
    return {"matched_kl": kl, "reward_ema_at_matched_kl": at(ema, kl), "reward_sft_at_matched_kl": at(sft, kl),
            "kl_ema": ema[-1]["kl"], "kl_beta0": a["beta=0"][-1]["kl"], "quality_beta0": a["beta=0"][-1]["quality"],
            "reward_gain_ema": ema[-1]["reward"] - start, "reward_gain_ema_beta_large": large[-1]["reward"] - start}


def cosine_values(raw, s):
    c = raw["seeds"][s]["cosine"]
    tensors = list(c["per_tensor_task_vector"].values())
    return {"task_vector_cosine": float(np.mean(c["task_vector"])), "task_vector_cosine_max": max(c["task_vector"]),
            "full_weight_cosine": float(np.mean(c["full_weights"])),
            "per_tensor_task_vector_min": min(tensors), "per_tensor_task_vector_max": max(tensors)}


def lam_values(raw, s):
    e, lams = raw["seeds"][s]["evals"], raw["preset"]["lambdas"]
    rewards = [e[f"slerp {lam}"]["reward"] for lam in lams]
    return {"reward_slerp_0.5": e["slerp 0.5"]["reward"], "reward_lerp_0.5": e["lerp 0.5"]["reward"],
            "kl_slerp_0.5": e["slerp 0.5"]["kl"], "kl_lerp_0.5": e["lerp 0.5"]["kl"],
            "reward_endpoint_0": rewards[0], "reward_endpoint_1": rewards[-1],
            "best_endpoint": max(rewards[0], rewards[-1]), "slerp_above_chord_min": above_chord(lams, rewards),
            "slerp_minus_lerp_mean_interior": float(np.mean([e[f"slerp {lam}"]["reward"] - e[f"lerp {lam}"]["reward"]
                                                             for lam in lams[1:-1]]))}


def m_values(raw, s):
    e = raw["seeds"][s]["evals"]
    return {"reward_M1": e["M=1"]["reward"], "reward_M2": e["M=2"]["reward"], "reward_M4": e["M=4"]["reward"],
            "reward_checkpoint_average": e["checkpoint average"]["reward"],
            "kl_M1": e["M=1"]["kl"], "kl_M2": e["M=2"]["kl"], "kl_M4": e["M=4"]["kl"],
            "kl_checkpoint_average": e["checkpoint average"]["kl"]}


def liti_values(raw, s):
    d = raw["seeds"][s]
    front, etas = d["evals"]["front 1"], raw["preset"]["etas"]
    gaps = [diff(at(front, p["kl"]), p["reward"]) for t in d["run trajectories"] for p in t[1:]]
    gaps = [g for g in gaps if g is not None]
    return {"kl_linear_r2": r_squared(etas, [p["kl"] for p in front]),
            "reward_above_chord_min": above_chord(etas, [p["reward"] for p in front]),
            "front_minus_trajectory": float(np.mean(gaps)) if gaps else None, "trajectory_points_compared": len(gaps)}


def iteration_values(raw, s):
    e, n = raw["seeds"][s]["evals"], raw["preset"]["iterations"]
    kl_ref = e["front 1"][-1]["kl"]
    out = {"kl_ref": kl_ref}
    for it in range(1, n + 1):
        out[f"reward_at_kl_ref_{it}"] = at(e[f"front {it}"], kl_ref)
        out[f"best_reward_{it}"] = max(p["reward"] for p in e[f"front {it}"])
    return out


def knowledge_values(raw, s):
    d, beta = raw["seeds"][s], W.Config(**raw["preset"]["base"]).beta
    warp_model, plain = d["evals"]["liti 2"], d["anchors"][f"sft, beta={beta:g}"]
    target = min(warp_model["reward"], max(p["reward"] for p in plain))   # plain's best if it never gets there
    return {"reward_warp": warp_model["reward"], "quality_warp": warp_model["quality"], "kl_warp": warp_model["kl"],
            "reward_plain_matched": target, "quality_plain": at(plain, target, "reward", "quality"),
            "kl_plain": at(plain, target, "reward", "kl")}


def granularity_values(raw, s):
    e = raw["seeds"][s]["evals"]
    return {f"{k}_{g}": e["slerp 0.5" if g == "layer" else f"granularity {g}"][k]
            for g in ("layer", "tensor", "model") for k in ("reward", "kl")}


def regime_values(raw, s):
    out, cos, gain = {}, [], []
    for c, per_seed in raw["cells"].items():
        v = per_seed[str(s)]
        best = max(t[-1]["reward"] for t in v["trajectories"])
        out[f"cosine[{c}]"], out[f"gain[{c}]"] = v["cosine"], v["slerp"]["reward"] - best
        cos.append(v["cosine"])
        gain.append(v["slerp"]["reward"] - best)
    out["spearman_cosine_gain"] = spearman(cos, gain)
    return out


def front_at(raw, kl):
    """(reward of the optimal front at kl, trusted there?) from the regime's theta_sft samples; (None, False) beyond."""
    sft = raw["sft"][raw["regime"]]
    curve = [{"kl": 0.0, "reward": sft["reward"], "trusted": True}] + raw["optimal_front"]
    point = at(curve, kl)
    trusted_kl = max([p["kl"] for p in curve if p["trusted"]])
    return point, point is not None and kl <= trusted_kl


def envelope_values(raw, s):
    d, beta = raw["seeds"][s], RunConfig(**raw["preset"]["base"]).beta
    warp_model = d["evals"]["liti 2"]
    kl = warp_model["kl"]
    best = {}
    for name, traj in d["envelope"].items():       # a plain run at its best along its trajectory up to WARP's KL
        reach = [p for p in traj if p["kl"] <= kl]
        best[name] = max(p["reward"] for p in reach) if reach else None
    envelope = max((v for v in best.values() if v is not None), default=None)
    optimum, trusted = front_at(raw, kl)
    demo = d["envelope"]["1x beta"]
    return {"kl_warp": kl, "reward_warp": warp_model["reward"], "reward_plain_envelope": envelope,
            "reward_plain_same_beta": best["1x beta"], "reward_plain_same_beta_end": demo[-1]["reward"],
            "kl_plain_same_beta_end": demo[-1]["kl"], "reward_optimal_front": optimum,
            "optimal_front_trusted": float(trusted), "gap_warp": diff(optimum, warp_model["reward"]),
            "gap_plain_envelope": diff(optimum, envelope), **{f"plain[{k}]": v for k, v in best.items()},
            "beta": beta}


CLAIMS = [
    Claim(1, "EMA anchor vs SFT anchor",
          "At equal KL, EMA-anchored runs reach higher reward; beta = 0 reward-hacks (KL explodes); very large beta stalls.",
          anchor_values,
          {"EMA anchor has higher reward than the SFT anchor at matched KL (demo beta)":
               lambda v: gt(v["reward_ema_at_matched_kl"], v["reward_sft_at_matched_kl"]),
           "beta = 0 hacks: final KL > 3x the demo-beta EMA run's, grammatical quality < 0.5":
               lambda v: gt(v["kl_beta0"], 3 * v["kl_ema"]) and lt(v["quality_beta0"], 0.5),
           "large beta stalls: reward gain < half the demo-beta EMA run's gain":
               lambda v: lt(v["reward_gain_ema_beta_large"], 0.5 * v["reward_gain_ema"])},
          ("matched_kl", "reward_ema_at_matched_kl", "reward_sft_at_matched_kl", "kl_beta0", "quality_beta0",
           "reward_gain_ema", "reward_gain_ema_beta_large")),
    Claim(2, "Task vectors orthogonal, weights identical",
          "Task vectors of independent runs are nearly orthogonal (cos ~ 0) while full weights are nearly identical "
          "(cos ~ 1).",
          cosine_values,
          {"task vectors nearly orthogonal: mean pairwise cosine < 0.2": lambda v: lt(v["task_vector_cosine"], 0.2),
           "full weights nearly identical: cosine > 0.9": lambda v: gt(v["full_weight_cosine"], 0.9)},
          ("task_vector_cosine", "full_weight_cosine", "per_tensor_task_vector_min", "per_tensor_task_vector_max")),
    Claim(3, "SLERP vs LERP",
          "SLERP beats LERP in reward at the same lambda; LERP gives lower KL (it shrinks the update).",
          lam_values,
          {"SLERP reward > LERP reward at lambda = 0.5": lambda v: gt(v["reward_slerp_0.5"], v["reward_lerp_0.5"]),
           "LERP KL < SLERP KL at lambda = 0.5": lambda v: lt(v["kl_lerp_0.5"], v["kl_slerp_0.5"])},
          ("reward_slerp_0.5", "reward_lerp_0.5", "kl_slerp_0.5", "kl_lerp_0.5", "slerp_minus_lerp_mean_interior")),
    Claim(4, "Reward concave in lambda",
          "Reward is concave in lambda: the merge scores above both endpoints.",
          lam_values,
          {"SLERP(0.5) reward > the better endpoint's": lambda v: gt(v["reward_slerp_0.5"], v["best_endpoint"]),
           "SLERP reward above the chord between the endpoints at every interior lambda":
               lambda v: gt(v["slerp_above_chord_min"], 0.0)},
          ("reward_slerp_0.5", "reward_endpoint_0", "reward_endpoint_1", "slerp_above_chord_min")),
    Claim(5, "More policies (M)",
          "More policies (larger M) give a better merged model; averaging checkpoints of one run does not help much.",
          m_values,
          {"M = 2 merge has higher reward than a single run": lambda v: gt(v["reward_M2"], v["reward_M1"]),
           "M = 4 merge has higher reward than M = 2": lambda v: gt(v["reward_M4"], v["reward_M2"]),
           "averaging 4 checkpoints of one run gains less than merging 4 runs":
               lambda v: lt(diff(v["reward_checkpoint_average"], v["reward_M1"]), diff(v["reward_M4"], v["reward_M1"]))},
          ("reward_M1", "reward_M2", "reward_M4", "reward_checkpoint_average", "kl_M1", "kl_M2", "kl_M4")),
    Claim(6, "LITI front",
          "LITI: KL roughly linear and reward concave in eta; the eta-front is above the runs' own training "
          "trajectories (better reward at the same KL).",
          liti_values,
          {"KL roughly linear in eta: R^2 of a straight-line fit >= 0.95":
               lambda v: v["kl_linear_r2"] is not None and v["kl_linear_r2"] >= 0.95,
           "reward concave in eta: above the chord from eta = 0 to 1 at every interior eta":
               lambda v: gt(v["reward_above_chord_min"], 0.0),
           "front above the training trajectories: mean reward gap at equal KL > 0":
               lambda v: gt(v["front_minus_trajectory"], 0.0)},
          ("kl_linear_r2", "reward_above_chord_min", "front_minus_trajectory")),
    Claim(7, "Iterations",
          "Iterating (I > 1) moves the front up, with diminishing returns after a few iterations.",
          iteration_values,
          {"iteration 2's front above iteration 1's at KL_ref (= iteration 1's SLERP KL)":
               lambda v: gt(v["reward_at_kl_ref_2"], v["reward_at_kl_ref_1"]),
           "last iteration's front above iteration 1's at KL_ref":
               lambda v: gt(v[_last(v, "reward_at_kl_ref_")], v["reward_at_kl_ref_1"]),
           "diminishing returns: the last iteration gains less than iteration 2 did (at KL_ref)":
               lambda v: lt(diff(v[_last(v, "reward_at_kl_ref_")], v[_last(v, "reward_at_kl_ref_", 1)]),
                            diff(v["reward_at_kl_ref_2"], v["reward_at_kl_ref_1"]))},
          ("kl_ref", "reward_at_kl_ref_*", "best_reward_*")),
    Claim(8, "Knowledge kept",
          "The final model keeps pre-training knowledge better than a run of equal reward (paper: benchmarks, "
          "Table 2). Here: grammatical quality (never rewarded) of WARP after 2 iterations vs plain SFT-anchored "
          "RL (2T steps) at the same reward.",
          knowledge_values,
          {"WARP's quality > plain RL's quality at equal reward": lambda v: gt(v["quality_warp"], v["quality_plain"])},
          ("reward_warp", "reward_plain_matched", "quality_warp", "quality_plain", "kl_warp", "kl_plain")),
    Claim(9, "SLERP granularity (ours)",
          "One angle per layer (the paper's choice) merges better than one angle per tensor or one for the whole model "
          "(lambda = 0.5).",
          granularity_values,
          {"per layer > per tensor in reward": lambda v: gt(v["reward_layer"], v["reward_tensor"]),
           "per layer > whole model in reward": lambda v: gt(v["reward_layer"], v["reward_model"])},
          ("reward_layer", "reward_tensor", "reward_model", "kl_layer", "kl_tensor", "kl_model")),
    Claim(10, "When merging helps (ours)",
          "Merging helps where task vectors are nearly orthogonal: across regimes of batch size, width, run "
          "length and learning rate, the SLERP gain over the better run grows as the task-vector cosine falls.",
          regime_values,
          {"Spearman rank correlation(cosine, SLERP gain) < 0 across regimes":
               lambda v: lt(v["spearman_cosine_gain"], 0.0)},
          ("spearman_cosine_gain", "cosine[*", "gain[*")),
    Claim(11, "Closer to the optimal front (ours)",
          "WARP gets closer to the optimal KL-reward front than plain RL: after two iterations its model has a "
          "higher reward than plain SFT-anchored RL at the same KL, whatever plain RL's beta (its envelope over "
          "0.5, 1, 3 and 10 times the demo's beta, each run 2T steps, taken at its best up to WARP's KL).",
          envelope_values,
          {"WARP above plain RL's envelope over beta at equal KL":
               lambda v: gt(v["reward_warp"], v["reward_plain_envelope"]),
           "WARP above plain RL with the same beta and RL steps per run, at equal KL":
               lambda v: gt(v["reward_warp"], v["reward_plain_same_beta"])},
          ("kl_warp", "reward_warp", "reward_plain_envelope", "reward_plain_same_beta", "reward_optimal_front",
           "gap_warp", "gap_plain_envelope")),
]


def _last(v, prefix, back=0):
    n = max(int(k[len(prefix):]) for k in v if k.startswith(prefix))
    return f"{prefix}{n - back}"


def evaluate_claims(raw):
    """Per claim: per-seed values, their mean and spread, each check per seed, the verdict."""
    seeds = sorted(raw["seeds"], key=int)
    out = []
    for claim in CLAIMS:
        per_seed = {s: claim.values(raw, s) for s in seeds}
        names = list(per_seed[seeds[0]])
        mean, spread = {}, {}
        for name in names:
            xs = [per_seed[s][name] for s in seeds if per_seed[s][name] is not None]
            mean[name] = float(np.mean(xs)) if xs else None
            spread[name] = float(np.std(xs, ddof=1)) if len(xs) > 1 else None
        checks = {text: [bool(fn(per_seed[s])) for s in seeds] for text, fn in claim.checks.items()}
        out.append({"id": claim.id, "title": claim.title, "paper": claim.paper,
                    "rule": "reproduced if every check holds in every seed; partly if some check holds in most "
                            "seeds; not reproduced otherwise",
                    "checks": [{"check": text, "per_seed": v} for text, v in checks.items()],
                    "seeds": [int(s) for s in seeds], "per_seed": per_seed, "mean": mean, "spread": spread,
                    "verdict": verdict(checks), "figure": f"claim{claim.id:02d}.png"})
    return out


def recheck(claim_json):
    """The verdict of a claims.json entry recomputed from its per-seed numbers (tests use this)."""
    claim = next(c for c in CLAIMS if c.id == claim_json["id"])
    seeds = [str(s) for s in claim_json["seeds"]]
    checks = {text: [bool(fn(claim_json["per_seed"][s])) for s in seeds] for text, fn in claim.checks.items()}
    return checks, verdict(checks)


# ----------------------------------------------------------------------------------------------
# Figures (one per claim, every seed drawn) and the Markdown table.
# ----------------------------------------------------------------------------------------------

MARKERS = ["o", "s", "^", "D", "v", "P"]


def _axes(n=1, width=6.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(width * n, 4.4), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, axes, path, title):
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})   # no version stamp: same numbers, same bytes
    plt.close(fig)


def _xy(points, x="kl", y="reward"):
    return [p[x] for p in points], [p[y] for p in points]


def _seeds(raw):
    return sorted(raw["seeds"], key=int)


def _optimal_front(ax, raw):
    """The optimal KL-reward front of the regime's theta_sft: solid where trusted, dotted where a lower bound."""
    sft = raw["sft"][raw["regime"]]
    rows = raw.get("optimal_front") or []
    trusted = [{"kl": 0.0, "reward": sft["reward"]}] + [r for r in rows if r["trusted"]]
    beyond = trusted[-1:] + [r for r in rows if not r["trusted"]]
    ax.plot(*_xy(trusted), color="black", lw=1.5, label="optimal front: the best any method can do")
    if len(beyond) > 1:
        ax.plot(*_xy(beyond), color="black", lw=1.2, ls=":", label="optimal front, lower bound (too few samples)")


def figure_anchors(raw, path):
    plt, fig, (ax,) = _axes(width=7.5)
    names = list(raw["seeds"][_seeds(raw)[0]]["anchors"])
    colors = plt.cm.tab10(range(len(names)))
    for i, s in enumerate(_seeds(raw)):
        for name, color in zip(names, colors):
            label = (name.replace("ema,", "EMA anchor,").replace("sft,", "SFT anchor,") if "," in name
                     else f"{name} (no KL term: either anchor)")
            ax.plot(*_xy(raw["seeds"][s]["anchors"][name]), color=color, marker=MARKERS[i], ms=3, lw=1,
                    label=label if i == 0 else None)
    _optimal_front(ax, raw)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(xlabel="KL(pi || pi_sft)  [nats per completion; symlog]", ylabel="reward")
    _save(plt, fig, [ax], path, "Claim 1: RL trajectories by anchor and beta (markers: seeds; points every "
          f"{raw['eval_every']} steps)")


def figure_cosine(raw, path):
    plt, fig, axes = _axes(2)
    for i, s in enumerate(_seeds(raw)):
        c = raw["seeds"][s]["cosine"]
        names = list(c["per_tensor_task_vector"])
        axes[0].plot(range(len(names)), list(c["per_tensor_task_vector"].values()), MARKERS[i], ms=3, color="C0",
                     label="task vectors" if i == 0 else None)
        axes[0].plot(range(len(names)), list(c["per_tensor_full_weights"].values()), MARKERS[i], ms=3, color="C1",
                     label="full weights" if i == 0 else None)
        axes[1].plot([i] * len(c["task_vector"]), c["task_vector"], MARKERS[i], color="C0",
                     label="task vectors (6 pairs of 4 runs)" if i == 0 else None)
        axes[1].plot([i] * len(c["full_weights"]), c["full_weights"], MARKERS[i], color="C1",
                     label="full weights" if i == 0 else None)
    axes[0].set(xlabel="tensor (state-dict order)", ylabel="cosine(run 0, run 1)", ylim=(-0.1, 1.05))
    axes[1].set(xlabel="seed", ylabel="cosine, whole model", ylim=(-0.1, 1.05), xticks=range(len(_seeds(raw))))
    _save(plt, fig, axes, path, "Claim 2: cosine between independent runs (markers: seeds)")


def figure_lambda(raw, path, claim):
    plt, fig, axes = _axes(2)
    lams = raw["preset"]["lambdas"]
    for i, s in enumerate(_seeds(raw)):
        e = raw["seeds"][s]["evals"]
        for method, style in (("slerp", "-"), ("lerp", "--")):
            if claim == 4 and method == "lerp":
                continue
            pts = [e[f"{method} {lam}"] for lam in lams]
            for ax, key in zip(axes, ("reward", "kl")):
                ax.plot(lams, [p[key] for p in pts], style, marker=MARKERS[i], ms=3, color=f"C{i}",
                        label=f"{method.upper()}, seed {s}")
        if claim == 4:
            axes[0].plot([lams[0], lams[-1]], [e[f"slerp {lams[0]}"]["reward"], e[f"slerp {lams[-1]}"]["reward"]],
                         ":", color=f"C{i}", lw=1)
    axes[0].set(xlabel="lambda (weight of run 1)", ylabel="reward of the merged model")
    axes[1].set(xlabel="lambda (weight of run 1)", ylabel="KL(pi || pi_sft)")
    title = ("Claim 3: SLERP (solid) vs LERP (dashed) of two runs' task vectors" if claim == 3 else
             "Claim 4: reward along SLERP(lambda); dotted: the chord between the two runs")
    _save(plt, fig, axes, path, title)


def figure_m(raw, path):
    plt, fig, (ax,) = _axes(width=7)
    for i, s in enumerate(_seeds(raw)):
        e = raw["seeds"][s]["evals"]
        for j, key in enumerate(("M=1", "M=2", "M=4", "checkpoint average")):
            ax.plot(e[key]["kl"], e[key]["reward"], MARKERS[i], color=f"C{j}", label=key if i == 0 else None)
    ax.set(xlabel="KL(pi || pi_sft)", ylabel="reward")
    _save(plt, fig, [ax], path, "Claim 5: SLERP of M runs vs the mean of 4 checkpoints of run 0 (markers: seeds)")


def figure_liti(raw, path):
    plt, fig, (ax,) = _axes(width=7.5)
    for i, s in enumerate(_seeds(raw)):
        d = raw["seeds"][s]
        ax.plot(*_xy(d["evals"]["front 1"]), "-", marker=MARKERS[i], color=f"C{i}", label=f"LITI eta-front, seed {s}")
        for t in d["run trajectories"]:
            ax.plot(*_xy(t), ":", marker=MARKERS[i], ms=2, color=f"C{i}", lw=1)
    _optimal_front(ax, raw)
    ax.set(xlabel="KL(pi || pi_sft)", ylabel="reward")
    _save(plt, fig, [ax], path, "Claim 6: LITI front (eta = " + ", ".join(f"{e:g}" for e in raw["preset"]["etas"])
          + ") vs the two runs' training trajectories (dotted)")


def figure_iterations(raw, path):
    plt, fig, (ax,) = _axes(width=7.5)
    n = raw["preset"]["iterations"]
    colors = plt.cm.viridis([0.1 + 0.8 * k / max(1, n - 1) for k in range(n)])
    for i, s in enumerate(_seeds(raw)):
        for it in range(1, n + 1):
            ax.plot(*_xy(raw["seeds"][s]["evals"][f"front {it}"]), marker=MARKERS[i], ms=3, color=colors[it - 1],
                    label=f"iteration {it}" if i == 0 else None)
    _optimal_front(ax, raw)
    ax.set(xlabel="KL(pi || pi_sft)", ylabel="reward")
    _save(plt, fig, [ax], path, "Claim 7: the LITI front of each iteration, from theta_sft (markers: seeds)")


def figure_knowledge(raw, path):
    plt, fig, (ax,) = _axes(width=7)
    beta = W.Config(**raw["preset"]["base"]).beta
    for i, s in enumerate(_seeds(raw)):
        d = raw["seeds"][s]
        ax.plot(*_xy(d["anchors"][f"sft, beta={beta:g}"], "reward", "quality"), "--", marker=MARKERS[i], ms=3,
                color="gray", label="plain RL (SFT anchor), trajectory" if i == 0 else None)
        for it in range(1, raw["preset"]["iterations"] + 1):
            p = d["evals"][f"liti {it}"]
            ax.plot(p["reward"], p["quality"], MARKERS[i], color=f"C{it}",
                    label=f"WARP after iteration {it}" if i == 0 else None)
    ax.set(xlabel="reward", ylabel="grammatical quality (held out, never rewarded)")
    _save(plt, fig, [ax], path, "Claim 8: quality at equal reward (markers: seeds)")


def figure_granularity(raw, path):
    plt, fig, axes = _axes(2, width=4.5)
    grans = ("layer", "tensor", "model")
    for i, s in enumerate(_seeds(raw)):
        e = raw["seeds"][s]["evals"]
        pts = [e["slerp 0.5"]] + [e[f"granularity {g}"] for g in grans[1:]]
        for ax, key in zip(axes, ("reward", "kl")):
            ax.plot(range(3), [p[key] for p in pts], "-", marker=MARKERS[i], color=f"C{i}", label=f"seed {s}")
    for ax, key in zip(axes, ("reward", "KL(pi || pi_sft)")):
        ax.set(xticks=range(3), xticklabels=["per layer\n(paper)", "per tensor\n(nuslerp)", "whole model"], ylabel=key)
    _save(plt, fig, axes, path, "Claim 9: SLERP(0.5) of two runs, one angle per ...")


def figure_regimes(raw, path):
    plt, fig, (ax,) = _axes(width=7.5)
    cells = list(raw["cells"])
    for i, s in enumerate(_seeds(raw)):
        v = regime_values(raw, s)
        for j, c in enumerate(cells):
            ax.plot(v[f"cosine[{c}]"], v[f"gain[{c}]"], MARKERS[i], color=f"C{j}", label=c if i == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="task-vector cosine of two independent runs", ylabel="SLERP(0.5) reward - better run's reward")
    _save(plt, fig, [ax], path, f"Claim 10: when does merging help? (markers: seeds; claims 1-9: {raw['regime']})")


def figure_envelope(raw, path):
    plt, fig, (ax,) = _axes(width=7.5)
    names = list(raw["seeds"][_seeds(raw)[0]]["envelope"])
    for i, s in enumerate(_seeds(raw)):
        d = raw["seeds"][s]
        for j, name in enumerate(names):
            ax.plot(*_xy(d["envelope"][name]), "--", marker=MARKERS[i], ms=2, lw=1, color=f"C{j}", alpha=0.7,
                    label=f"plain RL, SFT anchor, {name}" if i == 0 else None)
        for it in (1, 2):
            p = d["evals"][f"liti {it}"]
            ax.plot(p["kl"], p["reward"], MARKERS[i], color="black" if it == 2 else "gray", ms=7,
                    label=f"WARP after iteration {it}" if i == 0 else None)
    _optimal_front(ax, raw)
    ax.set(xlabel="KL(pi || pi_sft)  [nats per completion]", ylabel="reward")
    _save(plt, fig, [ax], path, "Claim 11: WARP against plain RL at several beta (2T steps each), and the optimal front")


FIGURES = {1: figure_anchors, 2: figure_cosine, 3: lambda raw, path: figure_lambda(raw, path, 3),
           4: lambda raw, path: figure_lambda(raw, path, 4), 5: figure_m, 6: figure_liti, 7: figure_iterations,
           8: figure_knowledge, 9: figure_granularity, 10: figure_regimes, 11: figure_envelope}


def _fmt(x):
    return "n/a" if x is None else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(claims, raw):
    cfg = RunConfig(**{**raw["preset"]["base"], **raw["preset"]["cells"][raw["regime"]]})
    lines = [f"Regime of claims 1-9 and 11: **{raw['regime']}** (lr {cfg.lr:g}, {cfg.prompts_per_step * cfg.samples_per_prompt} "
             f"sequences per step, beta {cfg.beta:g}, width {cfg.d_model}); {len(raw['seeds'])} seeds; T = {raw['steps']} "
             f"RL steps per run. Values: mean ± sd over seeds.", "",
             "| # | claim (paper) | measured (mean ± sd over seeds) | checks (seeds where it holds) | verdict |",
             "|---|---|---|---|---|"]
    for c in claims:
        claim = next(k for k in CLAIMS if k.id == c["id"])
        names = [n for pattern in claim.shown for n in c["mean"]
                 if n == pattern or (pattern.endswith("*") and n.startswith(pattern[:-1]))]
        measured = "<br>".join(f"{n} {_fmt(c['mean'][n])}" + (f" ± {_fmt(c['spread'][n])}" if c["spread"][n] is not None
                                                              else "") for n in names)
        checks = "<br>".join(f"{k['check']}: {sum(k['per_seed'])}/{len(k['per_seed'])}" for k in c["checks"])
        lines.append(f"| {c['id']} | **{c['title']}**: {c['paper']} | {measured} | {checks} | "
                     f"**{c['verdict']}** ([fig]({c['figure']})) |")
    return "\n".join(lines) + "\n"


def write_outputs(raw, out):
    """claims.json, claims.md, raw.json and the figures, written into a fresh directory that then
    replaces the files of `out`: a reproduction that fails half-way changes nothing there."""
    claims = evaluate_claims(raw)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_json(raw, os.path.join(tmp, "raw.json"))
    _write_json(claims, os.path.join(tmp, "claims.json"))
    with open(os.path.join(tmp, "claims.md"), "w") as f:
        f.write(markdown(claims, raw))
    for c in claims:
        FIGURES[c["id"]](raw, os.path.join(tmp, c["figure"]))
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    return claims


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv):
    parser = ArgumentParser(prog="python -m experiments.reproduce",
                              description="Test each claim of the WARP paper on the toy task (docs/reproducing.md).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="full (the regime docs/regime-rule.md chose before any verdict: the demo's settings at width 256; "
                             "experiments/results/), converged "
                             "(the demo's settings before that rule, whose runs reach the reward ceiling; "
                             "experiments/results/converged/) or quick (the quick demo's model: a smoke test whose "
                             "verdicts mean little)")
    parser.add_argument("--out", help="output directory (default: experiments/results/, experiments/results/converged/ "
                        "or runs/reproduce-quick)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--cache", default="runs/.reproduce-cache",
                        help="theta_sft and finished runs, reused by a rerun (default runs/.reproduce-cache)")
    try:
        args = parser.parse_args(argv)
        if args.workers < 1:
            raise UsageError(f"--workers {args.workers}: must be at least 1")
        out = args.out or {"full": RESULTS, "converged": os.path.join(RESULTS, "converged")}.get(
            args.preset, "runs/reproduce-quick")
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a directory")
        if os.path.isdir(out) and [f for f in os.listdir(out) if f != "converged"] and \
                not os.path.exists(os.path.join(out, "claims.json")):
            raise UsageError(f"--out {out}: a non-empty directory that holds no earlier reproduction (claims.json)")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)          # the main process merges; the workers do the rest
    t0 = time.time()
    preset = PRESETS[args.preset]
    cache = os.path.join(args.cache, args.preset)
    try:
        raw = collect(preset, cache, args.workers, log=functools.partial(print, flush=True))
    except KeyboardInterrupt:
        print(f"interrupted: {out}/ is unchanged; finished runs are kept in {cache}/ and the same command "
              "continues from them", file=sys.stderr)
        return 130
    claims = write_outputs(raw, out)
    for c in claims:
        print(f"claim {c['id']:2d} {c['title']:45s} {c['verdict']}")
    print(f"done in {time.time() - t0:.0f}s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
