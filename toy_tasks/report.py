"""Plumbing for the demo's outputs: the Pareto plot, the summary table and sample completions.

Kept out of warp_min.py so the algorithm reads without it. Everything here is recomputable from
metrics.jsonl (see `plot_pareto`), so figures can be redrawn without re-running training.
"""

import json
import math
import os

import torch


def load_rows(path):
    """The rows of a metrics.jsonl; [] if there is none. Only complete lines: a run killed mid-write
    may leave a partial last line (and --resume truncates the file to its checkpoint's rows)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def plot_pareto(rows, path, title="WARP on the toy review task"):
    """KL-reward plane: each iteration's LITI front (eta markers), training trajectories faintly behind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    sft = next(r for r in rows if r.get("label") == "theta_sft")
    iterations = sorted({r["iteration"] for r in rows if r["kind"] == "front"})
    colors = plt.cm.viridis([0.15 + 0.7 * i / max(1, len(iterations) - 1) for i in range(len(iterations))])
    for it, color in zip(iterations, colors):
        traj = [r for r in rows if r["kind"] == "trajectory" and r["iteration"] == it]
        for run in sorted({r["run"] for r in traj}, key=str):
            start = [r for r in rows if r["kind"] == "eval" and r["iteration"] == it - 1][-1]   # theta_init
            pts = [(start["kl"], start["reward"])]
            pts += [(r["kl"], r["reward"]) for r in traj if r["run"] == run]
            ax.plot(*zip(*pts), color=color, alpha=0.3, lw=1, marker=".", ms=3)
        front = sorted((r for r in rows if r["kind"] == "front" and r["iteration"] == it), key=lambda r: r["eta"])
        ax.plot([r["kl"] for r in front], [r["reward"] for r in front], color=color, lw=2, marker="o",
                label=f"iteration {it}: LITI front from theta_sft (eta = 0..1)")
        for r in front:
            ax.annotate(f"{r['eta']:g}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    base = [r for r in rows if r["kind"] == "trajectory" and r.get("run") == "sft-anchor"]
    if base:
        ax.plot([0.0] + [r["kl"] for r in base], [sft["reward"]] + [r["reward"] for r in base], color="gray",
                ls="--", lw=1.2, marker="x", ms=4, label="plain RL, SFT anchor (trajectory)")
    best = sorted((r for r in rows if r["kind"] == "optimal_front"), key=lambda r: r["kl"])
    if best:
        trusted = [r for r in best if r["trusted"]]
        beyond = trusted[-1:] + [r for r in best if not r["trusted"]]
        ax.plot([0.0] + [r["kl"] for r in trusted], [sft["reward"]] + [r["reward"] for r in trusted], color="black",
                lw=1.5, label=f"optimal front pi_sft exp(r/beta)/Z: the best any method can do "
                              f"({best[0]['samples']} samples/prompt)")
        if len(beyond) > 1:
            ax.plot([r["kl"] for r in beyond], [r["reward"] for r in beyond], color="black", lw=1.2, ls=":",
                    label="optimal front beyond its trusted range: a lower bound (too few samples)")
    ax.scatter([0], [sft["reward"]], color="black", zorder=5, label="theta_sft")
    ax.set_xlabel("KL(pi || pi_sft)  [nats per completion, k1 estimate on 256 samples]")
    ax.set_ylabel("reward r(x, y)  [mean over evaluation samples]")
    ax.set_title(title + "\n(faint: training trajectories of the M runs of each iteration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def closest_kl(rows, kl):
    return min(rows, key=lambda r: abs(r["kl"] - kl)) if rows else None


def table(rows):
    """Markdown summary: theta_sft, each run's endpoint, each iteration's SLERP and LITI models, baseline."""
    lines = ["| model | reward | KL(pi‖pi_sft) | quality (grammatical) |", "|---|---|---|---|"]

    def line(name, r):
        quality = f"{r['quality']:.2f}" if "quality" in r else "n/a"
        lines.append(f"| {name} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                     f"| {quality} |")

    evals = [r for r in rows if r["kind"] == "eval"]
    line("theta_sft", evals[0])
    for it in sorted({r["iteration"] for r in evals if r["iteration"] > 0}):
        traj = [r for r in rows if r["kind"] == "trajectory" and r["iteration"] == it]
        for run in sorted({r["run"] for r in traj}, key=str):
            line(f"iter {it} run {run} (EMA anchor, end)", [r for r in traj if r["run"] == run][-1])
        for r in evals:
            if r["iteration"] == it:
                line(r["label"], r)
    warp_final = evals[-1]
    base = [r for r in rows if r["kind"] == "trajectory" and r.get("run") == "sft-anchor"]
    if base:
        near = closest_kl(base, warp_final["kl"])
        line(f"plain RL, SFT anchor, step {near['step']} (KL closest to WARP's)", near)
        line(f"plain RL, SFT anchor, step {base[-1]['step']} (end)", base[-1])
    return "\n".join(lines), warp_final, (closest_kl(base, warp_final["kl"]) if base else None)


def along(points, kl):
    """(reward, se) at `kl` on the polyline through `points` sorted by KL, linearly interpolated; None outside."""
    points = sorted(points, key=lambda r: r["kl"])
    for a, b in zip(points, points[1:]):
        if a["kl"] <= kl <= b["kl"]:
            t = 0.0 if b["kl"] == a["kl"] else (kl - a["kl"]) / (b["kl"] - a["kl"])
            return (a["reward"] + t * (b["reward"] - a["reward"]),
                    math.hypot((1 - t) * a.get("reward_se", 0.0), t * b.get("reward_se", 0.0)))
    return None


def verdicts(rows):
    """The demo's checks (issue 12), each as (statement, holds, numbers). A difference counts only if it is
    larger than two standard errors of the evaluation, 2 * sqrt(se_a^2 + se_b^2): every model is scored on the
    same 256 samples, so this is the noise of the comparison, not of the seed."""
    evals = [r for r in rows if r["kind"] == "eval"]
    iterations = sorted({r["iteration"] for r in evals if r["iteration"] > 0})
    out = []

    def above(name, a, b, a_name, b_name):
        margin = 2 * math.hypot(a[1], b[1])
        out.append((name, a[0] - b[0] > margin, f"{a_name} {a[0]:.3f} vs {b_name} {b[0]:.3f}: "
                                                f"{a[0] - b[0]:+.3f}, two SE {margin:.3f}"))

    for it in sorted({iterations[0], iterations[-1]}):
        slerp = next(r for r in evals if r["iteration"] == it and "SLERP" in r["label"])
        traj = [r for r in rows if r["kind"] == "trajectory" and r["iteration"] == it]
        ends = [[r for r in traj if r["run"] == run][-1] for run in sorted({r["run"] for r in traj}, key=str)]
        if ends:
            best = max(ends, key=lambda r: r["reward"])
            above(f"iteration {it}: SLERP above both runs", (slerp["reward"], slerp["reward_se"]),
                  (best["reward"], best["reward_se"]), "SLERP", "the better run")
    final = evals[-1]
    plain = [evals[0]] + [r for r in rows if r["kind"] == "trajectory" and r.get("run") == "sft-anchor"]
    if len(plain) > 1:
        reachable = [r for r in plain if r["kl"] <= final["kl"]]
        best = max(reachable, key=lambda r: r["reward"])
        above("the final model above plain RL at equal KL", (final["reward"], final["reward_se"]),
              (best["reward"], best["reward_se"]), f"WARP (KL {final['kl']:.2f})",
              f"plain RL's best at KL <= {final['kl']:.2f} (step {best.get('step', 0)}, KL {best['kl']:.2f})")
    fronts = {it: [r for r in rows if r["kind"] == "front" and r["iteration"] == it] for it in iterations}
    if len(iterations) > 1 and fronts[iterations[0]] and fronts[iterations[-1]]:
        first, last = fronts[iterations[0]], fronts[iterations[-1]]
        kl_ref = min(max(r["kl"] for r in first), max(r["kl"] for r in last))
        name = f"iteration {iterations[-1]}'s LITI front above iteration {iterations[0]}'s"
        a, b = along(last, kl_ref), along(first, kl_ref)
        if a is None or b is None:  # the two fronts do not share a KL: nothing to compare
            lo = max(min(r["kl"] for r in first), min(r["kl"] for r in last))
            out.append((name, False, f"the fronts share no KL (their ranges meet only above {lo:.2f} "
                                     f"and end by {kl_ref:.2f})"))
        else:
            above(f"{name} (at KL {kl_ref:.2f})", a, b, f"iteration {iterations[-1]}", f"iteration {iterations[0]}")
    if "quality" in final:
        out.append(("the final model stays grammatical (quality >= 0.9)", final["quality"] >= 0.9,
                    f"quality {final['quality']:.2f}"))
    return out


def front_curve(rows):
    """The optimal front as a polyline from theta_sft (KL 0) and the KL up to which it is trusted; None if the
    run did not estimate it."""
    best = [r for r in rows if r["kind"] == "optimal_front"]
    if not best:
        return None
    sft = next(r for r in rows if r.get("label") == "theta_sft")
    return [{"kl": 0.0, "reward": sft["reward"]}] + best, max([r["kl"] for r in best if r["trusted"]], default=0.0)


def distance_to_optimum(rows):
    """Lines saying how far each key model is below the optimal front at its own KL (or that the front is
    only a lower bound there): the room merging had, which a failed check is read against."""
    front = front_curve(rows)
    if front is None:
        return []
    curve, trusted_kl = front
    lines = []
    evals = [r for r in rows if r["kind"] == "eval" and r["iteration"] > 0]
    traj = [r for r in rows if r["kind"] == "trajectory"]
    picks = [(r["label"], r) for r in evals]
    picks += [(f"plain RL, end (step {r['step']})", r) for r in traj if r.get("run") == "sft-anchor"][-1:]
    for name, r in picks:
        point = along(curve, r["kl"])
        if point is None:
            lines.append(f"- {name}: KL {r['kl']:.2f} is beyond the front's estimate")
            continue
        kind = "the optimum" if r["kl"] <= trusted_kl else "a lower bound on the optimum"
        lines.append(f"- {name}: reward {r['reward']:.3f} at KL {r['kl']:.2f}; {kind} there {point[0]:.3f} "
                     f"(gap {point[0] - r['reward']:+.3f})")
    return lines


def reading(rows, checks):
    """One paragraph saying why failed checks may have to fail: how close WARP's final model and plain RL's
    end already are to the optimal front (the room any method had). Empty when every check holds."""
    front = front_curve(rows)
    failed = [name for name, ok, _ in checks if not ok]
    plain = [r for r in rows if r["kind"] == "trajectory" and r.get("run") == "sft-anchor"]
    if not (front and failed and plain):
        return []
    final = [r for r in rows if r["kind"] == "eval"][-1]
    optimum = [along(front[0], r["kl"]) for r in (final, plain[-1])]
    if None in optimum:
        return []
    gap_warp, gap_plain = optimum[0][0] - final["reward"], optimum[1][0] - plain[-1]["reward"]
    spread = final["reward_se"] * 2
    return ["", f"Reading: {len(failed)} check(s) did not hold. At their own KL, WARP's final model is "
                f"{gap_warp:.3f} and plain RL's end {gap_plain:.3f} below the optimal front (at least: "
                f"a lower bound beyond its trusted range), against an evaluation noise of about {spread:.3f} (two "
                "standard errors). When both are this close to the best any policy can reach, neither can be "
                "much better than the other; WARP has room to win where plain RL stops far below the front "
                "(fewer steps, a smaller learning rate, a larger model)."]


@torch.no_grad()
def completions(prompts, models, build, sample, seed):
    """The completions of `prompts` by each model, with the same sampling seed.
    sample(model, prompts, generator) -> (tokens, mask, texts, finished), e.g. warp_min.sample."""
    out = {}
    for name, state in models.items():
        model = build(state)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        _, _, texts, finished = sample(model, prompts, gen)
        out[name] = [(p, t + ("" if f else " …")) for p, t, f in zip(prompts, texts, finished)]
    return out


def summarize(cfg, rows, models, build, sample, eval_prompts, seed, log=print, n=3):
    """Write pareto.png and summary.md into cfg.out, print the table and completions of the first
    n evaluation prompts; return the results."""
    plot_pareto(rows, os.path.join(cfg.out, "pareto.png"))
    md, warp_final, plain_near = table(rows)
    names = {"sft": "theta_sft", "plain": "plain RL (SFT anchor, end)", "warp": "WARP (final LITI model)"}
    models = {k: models[k] for k in names if k in models}   # fixed order: sft, plain, warp
    samples = completions(eval_prompts[:n], models, build, sample, seed)
    text = [md, "", "Checks (a difference counts when it exceeds two standard errors of the evaluation):", ""]
    checks = verdicts(rows)
    text += [f"- {'holds' if ok else 'does not hold'}: {name} — {numbers}" for name, ok, numbers in checks]
    gaps = distance_to_optimum(rows)
    if gaps:
        text += ["", "Below the optimal KL-reward front (the best any policy can do for this reward at its KL):", ""]
        text += gaps + reading(rows, checks)
    text += ["", "Completions (same prompts, same sampling seed):", ""]
    for key, pairs in samples.items():
        for prompt, completion in pairs:
            text.append(f"- **{names[key]}** — `{prompt}` → {completion}")
    summary = "\n".join(text)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    log("\n" + summary)
    return {"rows": rows, "warp": warp_final, "plain_at_same_kl": plain_near, "summary": summary}
