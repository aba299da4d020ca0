"""The production loop: warp_min's Algorithm 1 with what long runs on real models need.

warp_min.warp / train_policy are the algorithm as a learner reads it. This file runs the same
functions (sample, reinforce_loss, ema_update, slerp, liti, evaluate, measure_iteration) and adds:

- crash-safe checkpoints and `--resume` (resume.py): a killed run continues bit for bit;
- the M runs of an iteration on torchrun ranks (distributed.py), equal to the sequential run;
- bf16 policies: fp32 master weights and EMA anchor (mixed.py), and theta_init, the merges and LITI
  carried in fp32 between runs and iterations -- rounded only for forward passes and the saved model;
- steps with a non-finite loss or gradient skipped, and a run stopped after --max-skips in a row;
- the outputs: config.json, metrics.jsonl, the final model, pareto.png and summary.md.

On the CPU in fp32 with one process, run() gives the same bits -- weights and metrics -- as
warp_min.warp followed by warp_min.plain_rl (tests/test_layout.py checks it).
"""

import dataclasses
import json
import math
import os
import random
import shutil
import time

import torch

import warp_min as W
from toy_tasks import optimal_front
from toy_tasks.report import load_rows, summarize
from warp_scale import distributed, hf
from warp_scale import resume as resume_io
from warp_scale.mixed import MixedPrecision


class TrainingError(Exception):
    """Training cannot go on (e.g. only non-finite steps): one line on stderr, exit status 1."""


# ----------------------------------------------------------------------------------------------
# The network, its dtype and theta_sft: the toy's, or those of a Hugging Face checkpoint (--init).
# ----------------------------------------------------------------------------------------------


def policy_dtype(cfg):
    """--dtype. choice: auto = float32 for the toy; with --init the checkpoint's dtype if it is
    bfloat16 (released Gemmas are; the paper trains in bf16), else float32 (an fp16 policy would need
    loss scaling, which warp-min does not do)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if cfg.init:
        config = hf.read_config(cfg.init)
        saved = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return torch.bfloat16 if saved == "bfloat16" else torch.float32
    return torch.float32


def save_dtype(cfg):
    """--save-dtype: the final model's dtype (auto = the policy's)."""
    return policy_dtype(cfg) if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)


def network(cfg):
    """The policy network's shape: the toy flags, or with --init the checkpoint's config.json."""
    return hf.config_from_hf(hf.read_config(cfg.init)) if cfg.init else W.toy_network(cfg)


def load_theta_sft(cfg, log=print):
    """theta_sft as fp32 CPU tensors: the toy SFT model (trained or cached), or with --init the
    checkpoint's weights as they are (taken to be SFT'd already; no SFT is run). bf16 -> fp32 is exact."""
    if cfg.init:
        log(f"theta_sft: the checkpoint {cfg.init} ({hf.dtype_name(policy_dtype(cfg))}; SFT skipped)")
        model = W.Transformer.from_pretrained(cfg.init, dtype=torch.float32)   # on the CPU, shapes checked
        return {name: t.detach() for name, t in model.state_dict().items()}
    return W.toy_theta_sft(cfg, cfg.cache_dir, log)


# ----------------------------------------------------------------------------------------------
# One RL run: warp_min.train_policy, plus bf16, skipped steps and checkpoints.
# ----------------------------------------------------------------------------------------------


def rl_step(policy, anchor, optimizer, prompts, task, cfg, generator, device, sft_model=None, mixed=None):
    """warp_min.rl_step, except that a step whose loss or gradient is not finite changes nothing,
    and a bf16 policy steps its fp32 master weights and EMA (mixed). Returns (stats, skipped)."""
    t0 = time.time()
    tokens, mask, texts, finished = W.sample(policy, prompts, task, cfg, generator, device)
    r = task.reward(prompts, texts).to(device)
    loss, stats = W.reinforce_loss(policy, anchor, tokens, mask, r, cfg)
    if sft_model is not None:
        stats["kl_sft"] = W.kl_to(policy, sft_model, tokens, mask, cfg).mean().item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if mixed is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
            W.ema_update(anchor, policy, cfg.mu)
    else:
        grad_norm = mixed.step(policy, anchor, optimizer, cfg.grad_clip, cfg.mu)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
    stats |= {"grad_norm": grad_norm.item(), "tok_s": int(mask.sum().item()) / (time.time() - t0)}
    return stats, skipped


def train_run(cfg, task, net, theta_init, theta_sft, seed, steps=None, anchor="ema", tag=None, log=print,
              emit=None, resume=None, on_checkpoint=None):
    """warp_min.train_policy with bf16 master weights, skipped steps and crash safety: every
    cfg.checkpoint_every steps the run's whole state goes to `on_checkpoint`; `resume` is such a state,
    from which the run continues bit for bit. Returns (theta_m, theta_ema) in fp32 on the CPU."""
    device, steps, tag, emit = W.resolve_device(cfg.device), steps or cfg.steps, tag or {}, emit or (lambda r: None)
    dtype = policy_dtype(cfg)
    theta_anchor = theta_init if anchor == "ema" else theta_sft
    policy = W.build_model(net, theta_init, device, dtype)
    anchor_model = W.build_model(net, theta_anchor, device, dtype).requires_grad_(False)
    sft_model = W.build_model(net, theta_sft, device, dtype).requires_grad_(False)
    step_cfg = dataclasses.replace(cfg, mu=cfg.mu if anchor == "ema" else 0.0)
    mixed = MixedPrecision(theta_init, theta_anchor) if dtype != torch.float32 else None
    optimizer = torch.optim.Adam(mixed.master.values() if mixed else policy.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    prompt_rng, sample_gen = random.Random(seed), torch.Generator(device=device).manual_seed(seed)
    done, skips = 0, 0
    if resume is not None:
        done, skips = resume_io.unpack_run(*resume, policy, anchor_model, optimizer, schedule, prompt_rng,
                                           sample_gen, mixed)
    name, t0 = " ".join(f"{k}={v}" for k, v in tag.items()), time.time()
    for step in range(done + 1, steps + 1):
        prompts = [p for p in task.train_prompts(cfg.prompts_per_step, prompt_rng) for _ in range(cfg.samples_per_prompt)]
        logging = step % cfg.log_every == 0 or step == steps
        stats, skipped = rl_step(policy, anchor_model, optimizer, prompts, task, step_cfg, sample_gen, device,
                                 sft_model if logging else None, mixed)
        schedule.step()
        skips = skips + 1 if skipped else 0
        if skipped:
            log(f"  {name} step {step}: non-finite loss or gradient, step skipped ({skips} in a row)")
            emit({"kind": "skipped", **tag, "step": step})
        if skips >= cfg.max_skips:
            raise TrainingError(f"{name}: {skips} consecutive steps with a non-finite loss or gradient "
                                f"(last at step {step}); the last checkpoint before them is intact")
        if logging:
            W.log_train(log, emit, tag, step, steps, stats, (time.time() - t0) / (step - done) * (steps - step))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
            emit({"kind": "trajectory", **tag, "step": step, **W.evaluate(policy, sft_model, task, cfg, device)})
        if on_checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            on_checkpoint(resume_io.pack_run(step, policy, anchor_model, optimizer, schedule, prompt_rng,
                                             sample_gen, skips, mixed))
    if mixed:  # a bf16 run's theta_m is its fp32 master weights: its task vector is not rounding noise
        return ({k: v.detach().cpu().clone() for k, v in mixed.master.items()},
                {k: v.cpu().clone() for k, v in mixed.ema.items()})
    return W.cpu_state(policy), W.cpu_state(anchor_model)


# ----------------------------------------------------------------------------------------------
# WARP: warp_min.warp + plain_rl, with checkpoints, ranks and the outputs.
# ----------------------------------------------------------------------------------------------


def run(cfg, task, log=print, resume=False):
    """The whole demo (or a run from --init): theta_sft, I iterations, the plain-RL baseline, the
    outputs in cfg.out. resume=True continues from OUT/checkpoint.safetensors. Under torchrun the M runs
    of each iteration are spread over the ranks; rank 0 does everything else and writes every file."""
    device = W.resolve_device(cfg.device)
    rank, world_size = distributed.init_from_env(device)
    lead, net, dtype = rank == 0, network(cfg), policy_dtype(cfg)

    def build(state):
        return W.build_model(net, state, device, dtype)

    checkpoint_path = os.path.join(cfg.out, "checkpoint.safetensors")
    saved, saved_states, saved_run = {}, {}, None   # progress, weights and run state of a checkpoint
    if resume and os.path.exists(checkpoint_path):
        saved, saved_states, saved_run = resume_io.load(checkpoint_path)
        log(f"resuming {cfg.out}: iteration {saved['iteration']}, {saved['finished']} finished run(s)"
            + (f", run in progress at step {saved_run[0]['step']}" if saved_run else ""))
    # metrics written after the checkpoint are dropped: the resumed run writes them again
    rows = load_rows(os.path.join(cfg.out, "metrics.jsonl"))[:saved["n_rows"]] if saved else []
    metrics_file = None
    if lead:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "w")
        metrics_file.writelines(json.dumps(row) + "\n" for row in rows)

    def emit(row):
        rows.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def checkpoint(iteration, finished, run=None):   # the loop's position + whatever resuming needs
        if lead:
            progress = {"iteration": iteration, "finished": len(finished), "n_rows": len(rows)}
            states = {"theta_init": theta_init, **{f"finished{m}": p for m, p in enumerate(finished)}}
            resume_io.save(checkpoint_path, progress, states, run)

    def all_cores():                      # rank 0 alone at work (others wait): every core it may use
        return distributed.using_threads(max(1, min(cfg.threads, os.cpu_count() or 1)))

    with all_cores():
        theta_sft = load_theta_sft(cfg, log) if lead or cfg.init else None
    if world_size > 1 and not cfg.init:
        with torch.device("meta"):
            shapes = W.Transformer(net).state_dict()
        template = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in shapes.items()}
        theta_sft = distributed.share_state(theta_sft, 0, template, device)
    sft_model = build(theta_sft)
    models = {"sft": theta_sft}
    if not saved and lead:   # (under torchrun the other ranks are training: rank 0 keeps to its share of cores)
        emit({"kind": "eval", "label": "theta_sft", "iteration": 0, **W.evaluate(sft_model, sft_model, task, cfg, device)})
        if cfg.front_samples:
            for row in optimal_front_rows(cfg, task, sft_model, cfg.front_samples, device, log):
                emit(row)
    theta_init = saved_states.get("theta_init", theta_sft)     # fp32 from here on, whatever the policy dtype
    for it in range(saved.get("iteration", 1), cfg.iterations + 1):
        log(f"iteration {it}/{cfg.iterations}: {cfg.runs} RL runs of {cfg.steps} steps from theta_init")
        policies = [saved_states[f"finished{m}"] for m in range(saved.pop("finished", 0))]   # after a resume
        trained, rows_by_run = {}, {}
        for m in range(len(policies), cfg.runs):
            if distributed.owner(m, world_size) != rank:
                continue
            finished = lambda: policies + [trained[k] for k in sorted(trained)]  # noqa: E731
            trained[m] = train_run(
                cfg, task, net, theta_init, theta_sft, W.run_seed(cfg.seed, it, m), tag={"iteration": it, "run": m},
                log=log, emit=emit if world_size == 1 else rows_by_run.setdefault(m, []).append, resume=saved_run,
                on_checkpoint=(lambda run: checkpoint(it, finished(), run)) if world_size == 1 else None)[0]
            saved_run = None                # only the first run after a resume continues a saved one
            if world_size == 1:             # under torchrun: checkpoints at iteration boundaries only
                checkpoint(it, finished())
        if world_size > 1:                  # the runs' weights meet on every rank, their metrics on rank 0
            for m in range(len(policies), cfg.runs):
                trained[m] = distributed.share_state(trained.get(m), distributed.owner(m, world_size), theta_init, device)
            for m, run_rows in sorted(distributed.gather_rows(rows_by_run).items()):
                for row in run_rows:
                    emit(row)
        policies += [trained[m] for m in sorted(trained)]
        theta_next = None
        if lead:
            with all_cores():
                theta_slerp = W.slerp(theta_init, policies, cfg.lam if cfg.runs == 2 else None, cfg.granularity)
                theta_next = W.liti(theta_init, theta_slerp, cfg.eta)
                W.measure_iteration(cfg, task, build, it, theta_init, theta_sft, policies, theta_slerp, theta_next,
                                    sft_model, log, emit)
        if world_size > 1 and it < cfg.iterations:   # (after the last one only rank 0 needs it: the others
            theta_next = distributed.share_state(theta_next, 0, theta_init, device)   # go on to the baseline)
        theta_init = theta_next             # next iteration's init
        checkpoint(it + 1, [])
    if lead:
        models["warp"] = theta_init
        save_final(cfg, net, theta_init)

    if cfg.baseline:  # plain RL: fixed SFT anchor, same total number of steps as all WARP iterations
        baseline_rank, baseline_rows = world_size - 1, []    # under torchrun: the last rank trains it
        if rank == baseline_rank:
            log(f"baseline: plain RL with the SFT anchor, {cfg.iterations * cfg.steps} steps")
            models["plain"] = train_run(
                cfg, task, net, theta_sft, theta_sft, W.run_seed(cfg.seed, 0, cfg.runs), cfg.iterations * cfg.steps,
                anchor="sft", tag={"iteration": 0, "run": "sft-anchor"}, log=log,
                emit=emit if world_size == 1 else baseline_rows.append, resume=saved_run,
                on_checkpoint=(lambda run: checkpoint(cfg.iterations + 1, [], run)) if world_size == 1 else None)[0]
        if world_size > 1:
            models["plain"] = distributed.share_state(models.get("plain"), baseline_rank, theta_sft, device)
            for row in distributed.gather_rows({"baseline": baseline_rows} if rank == baseline_rank else {}).get("baseline", []):
                emit(row)
    if not lead:
        return None                         # rank 0 writes the outputs
    metrics_file.close()
    with all_cores():
        result = summarize(cfg, rows, models, build, lambda model, prompts, gen: W.sample(model, prompts, task, cfg, gen, device),
                           task.eval_prompts(cfg.eval_prompts), W.run_seed(cfg.seed, -3, 0), log)
    if os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)   # the run is complete: nothing left to resume
    return result


@torch.no_grad()
def sample_sft(cfg, task, sft_model, n, device):
    """n completions of theta_sft for each evaluation prompt: (rewards, quality or None), each (prompts, n)."""
    prompts = task.eval_prompts(cfg.eval_prompts)
    gen = torch.Generator(device=device).manual_seed(W.run_seed(cfg.seed, -4, 0))
    per_call = max(1, 1024 // n)                                   # ~1024 sequences per sampling call
    rewards, quality = [], []
    for start in range(0, len(prompts), per_call):
        batch = [p for p in prompts[start:start + per_call] for _ in range(n)]
        _, _, texts, finished = W.sample(sft_model, batch, task, cfg, gen, device)
        rewards.append(task.reward(batch, texts).double().view(-1, n))
        if task.quality is not None:
            quality.append(task.quality(batch, texts, finished).double().view(-1, n))
    return torch.cat(rewards), (torch.cat(quality) if quality else None)


def optimal_front_rows(cfg, task, sft_model, n, device, log=print, min_ess=10):
    """The optimal KL-reward front of this reward (toy_tasks/optimal_front.py): n completions of theta_sft per
    evaluation prompt, weighted by exp(r / beta). Rows {"kind": "optimal_front", beta, reward, kl, trusted, ...}:
    trusted where the effective sample size is >= min_ess for 90% of the prompts; beyond, a lower bound.
    choice: min_ess = 10 (measured on the toy: KL ~5% and reward ~3% low at the last trusted point)."""
    t0 = time.time()
    rewards, quality = sample_sft(cfg, task, sft_model, n, device)
    last = optimal_front.last_trusted_beta(rewards, min_ess)
    betas = optimal_front.beta_grid(rewards, num=10, min_ess=min_ess)          # trusted, from KL 0.05 down
    betas += torch.logspace(math.log10(last), math.log10(last / 5), 7, dtype=torch.float64).tolist()[1:]
    rows = []
    for point in optimal_front.front_from_rewards(rewards, betas, min_ess):
        if quality is not None:
            point["quality"] = optimal_front.tilted_mean(quality, rewards, point["beta"])
        rows.append({"kind": "optimal_front", "samples": n, **point})
    trusted = [r for r in rows if r["trusted"]]
    log(f"optimal front: {n} samples of theta_sft per prompt ({time.time() - t0:.0f}s); trusted up to KL "
        f"{trusted[-1]['kl']:.2f} (reward {trusted[-1]['reward']:.2f}), a lower bound beyond" if trusted else
        f"optimal front: {n} samples per prompt are too few for any trusted point")
    return rows


def save_final(cfg, net, theta):
    """The final LITI model: OUT/final.safetensors for the toy; for an --init run a Hugging Face
    directory OUT/final/ that transformers loads (choice), in --save-dtype, with the checkpoint's
    tokenizer files and token ids. Written beside and renamed: never a half-written output."""
    state = {k: v.to(save_dtype(cfg)) for k, v in theta.items()}
    if not cfg.init:
        hf.save_atomic(state, os.path.join(cfg.out, "final.safetensors"))
        return
    path = os.path.join(cfg.out, "final")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    W.build_model(net, state, "cpu", save_dtype(cfg)).save_pretrained(tmp)
    hf.carry_over(cfg.init, tmp)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
