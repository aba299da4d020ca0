"""The command line: `python warp_min.py [demo] [--flag value ...]` (console script: `warp-min`).

    python warp_min.py                          the toy demo (SFT, WARP, plain RL, plot and table)
    python warp_min.py --preset quick           a one-minute version
    python warp_min.py --resume OUT             continue a killed run from OUT/checkpoint.safetensors
    python warp_min.py --workers 2              the M runs of each iteration on torchrun ranks
    python warp_min.py --init DIR ...           WARP from a Hugging Face Gemma checkpoint
    python warp_min.py merge ...                = warp-min-merge: the streaming merge (merge.py)

Every flag comes from a field of RunConfig (warp_min.Config plus the fields below) and is checked
before any work starts: a bad value is one line naming the flag, exit status 2, nothing written.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import warp_min as W
from warp_scale import distributed, driver, merge, tasks
from warp_scale.tasks import TaskError

arg = W.arg


@dataclass
class RunConfig(W.Config):
    """warp_min.Config (the algorithm, the toy model, evaluation) plus how and where a run runs."""
    out: str = arg("", "output directory (default: runs/<preset>)")
    cache_dir: str = arg("runs/.cache", "where theta_sft is cached, keyed by the SFT config")
    threads: int = arg(2, "torch CPU threads per process (under torchrun at most cores / processes)")
    workers: int = arg(1, "processes for the M runs of an iteration (launches torchrun; 1 = one after the other)")
    checkpoint_every: int = arg(50, "write OUT/checkpoint.safetensors every N RL steps and after every run "
                                "(0: only after runs); `--resume OUT` continues from it")
    max_skips: int = arg(10, "stop after this many consecutive steps with a non-finite loss or gradient")
    allow_extrapolation: bool = arg(False, "allow --eta / --etas above 1 (LITI then extrapolates past the merge)")
    front_samples: int = arg(64, "completions of theta_sft per evaluation prompt for the optimal KL-reward front "
                             "on the plot (0: not drawn); more samples reach further (docs/reproducing.md)")
    # your own model, prompts and reward (tasks.py)
    init: str = arg("", "Hugging Face Gemma checkpoint directory (config.json, safetensors, tokenizer.json) used as "
                    "theta_sft: SFT is skipped and the model and --sft-* flags are ignored")
    dtype: str = arg("auto", "policy weights for forward passes: float32, bfloat16 (Adam, the EMA anchor, "
                     "theta_init and the merges then stay fp32), or auto = float32 for the toy, the checkpoint's "
                     "dtype if bfloat16 with --init")
    save_dtype: str = arg("auto", "dtype of the saved final model: auto (= the policy's), float32 or bfloat16")
    prompts: str = arg("", "prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...} per line); shuffled "
                       "with seed 0, its first --eval-prompts prompts are held out for evaluation, RL trains on "
                       "the rest (default: the toy's review prompts)")
    reward: str = arg("", "reward function module:function or path/to/file.py:function, called as "
                      "f(prompts, completions) -> list of floats (default: the toy reward)")
    reward_model: str = arg("", "Hugging Face sequence-classification reward model directory (needs transformers)")
    chat_template: bool = arg(False, "wrap each prompt in the --init checkpoint's chat template (needs transformers)")


PRESETS = {
    # tests and a first look: must finish within ~60 s on 2 CPU cores
    "quick": dict(n_layer=2, d_model=64, head_dim=16, d_ff=256, sft_steps=150, sft_docs=3000,
                  iterations=1, steps=40, lr=1e-3, log_every=10, eval_every=20, eval_prompts=32, eval_samples=2,
                  etas="0,0.5,1", front_samples=16),
    # the README demo: within 5 minutes on 2 CPU cores
    "default": dict(),
}


class UsageError(Exception):
    """A user mistake: reported as one line on stderr with exit status 2, never a traceback."""


def validate(cfg: RunConfig):
    """Every setting's range, before any work or write; a UsageError names the first bad one."""
    unit = (0.0, math.inf if cfg.allow_extrapolation else 1.0)
    checks = [
        (cfg.n_layer >= 1, "--n-layer", cfg.n_layer, "must be >= 1"),
        (cfg.d_model >= 1, "--d-model", cfg.d_model, "must be >= 1"),
        (cfg.n_head >= 1, "--n-head", cfg.n_head, "must be >= 1"),
        (cfg.n_kv_head >= 1 and cfg.n_head % cfg.n_kv_head == 0, "--n-kv-head", cfg.n_kv_head,
         "must be >= 1 and divide --n-head"),
        (cfg.head_dim >= 2 and cfg.head_dim % 2 == 0, "--head-dim", cfg.head_dim, "must be even and >= 2 (RoPE)"),
        (cfg.d_ff >= 1, "--d-ff", cfg.d_ff, "must be >= 1"),
        (cfg.sft_steps >= 1, "--sft-steps", cfg.sft_steps, "must be >= 1"),
        (0 < cfg.sft_lr < math.inf, "--sft-lr", cfg.sft_lr, "must be > 0"),
        (cfg.sft_batch >= 1, "--sft-batch", cfg.sft_batch, "must be >= 1"),
        (cfg.sft_seq_len >= 2, "--sft-seq-len", cfg.sft_seq_len, "must be >= 2"),
        (cfg.sft_docs >= 10, "--sft-docs", cfg.sft_docs, "must be >= 10"),
        (cfg.iterations >= 1, "--iterations", cfg.iterations, "must be >= 1"),
        (cfg.runs >= 1, "--runs", cfg.runs, "must be >= 1"),
        (cfg.steps >= 1, "--steps", cfg.steps, "must be >= 1"),
        (0 <= cfg.beta < math.inf, "--beta", cfg.beta, "must be >= 0"),
        (0 <= cfg.mu <= 1, "--mu", cfg.mu, "must be in [0, 1]"),
        (0 <= cfg.lam <= 1, "--lam", cfg.lam, "must be in [0, 1]"),
        (unit[0] <= cfg.eta <= unit[1], "--eta", cfg.eta,
         "must be in [0, 1] (above 1 LITI extrapolates: pass --allow-extrapolation)"),
        (cfg.granularity in ("layer", "tensor", "model"), "--granularity", cfg.granularity,
         "must be layer, tensor or model"),
        (0 <= cfg.lr < math.inf, "--lr", cfg.lr, "must be >= 0"),
        (cfg.warmup >= 0, "--warmup", cfg.warmup, "must be >= 0"),
        (0 < cfg.grad_clip <= math.inf, "--grad-clip", cfg.grad_clip, "must be > 0"),
        (cfg.prompts_per_step >= 1, "--prompts-per-step", cfg.prompts_per_step, "must be >= 1"),
        (cfg.samples_per_prompt >= 2, "--samples-per-prompt", cfg.samples_per_prompt,
         "must be >= 2 (the leave-one-out baseline needs two samples per prompt)"),
        (0 < cfg.temperature < math.inf, "--temperature", cfg.temperature, "must be > 0"),
        (cfg.max_new_tokens >= 1, "--max-new-tokens", cfg.max_new_tokens, "must be >= 1"),
        (cfg.log_every >= 1, "--log-every", cfg.log_every, "must be >= 1"),
        (cfg.eval_prompts >= 2, "--eval-prompts", cfg.eval_prompts, "must be >= 2"),
        (cfg.eval_samples >= 1, "--eval-samples", cfg.eval_samples, "must be >= 1"),
        (cfg.eval_every >= 0, "--eval-every", cfg.eval_every, "must be >= 0 (0: no trajectory evaluations)"),
        (cfg.seed >= 0, "--seed", cfg.seed, "must be >= 0"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "--device", cfg.device,
         "must be cpu, cuda, cuda:N or auto"),
        (cfg.threads >= 1, "--threads", cfg.threads, "must be >= 1"),
        (cfg.workers >= 1, "--workers", cfg.workers, "must be >= 1"),
        (cfg.checkpoint_every >= 0, "--checkpoint-every", cfg.checkpoint_every, "must be >= 0"),
        (cfg.max_skips >= 1, "--max-skips", cfg.max_skips, "must be >= 1"),
        (cfg.front_samples >= 0, "--front-samples", cfg.front_samples, "must be >= 0 (0: no optimal front)"),
        (cfg.dtype in ("auto", "float32", "bfloat16"), "--dtype", cfg.dtype, "must be float32, bfloat16 or auto"),
        (cfg.save_dtype in ("auto", "float32", "bfloat16"), "--save-dtype", cfg.save_dtype,
         "must be float32, bfloat16 or auto"),
        (bool(cfg.cache_dir), "--cache-dir", repr(cfg.cache_dir), "must not be empty"),
    ]
    for ok, flag, value, why in checks:
        if not ok:
            raise UsageError(f"{flag} {value}: {why}")
    try:
        etas = [float(e) for e in cfg.etas.split(",")]
    except ValueError:
        raise UsageError(f"--etas {cfg.etas!r}: must be comma-separated numbers") from None
    if not all(unit[0] <= e <= unit[1] for e in etas):
        raise UsageError(f"--etas {cfg.etas!r}: every eta must be in [0, 1] (or pass --allow-extrapolation)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise UsageError(f"--cache-dir {cfg.cache_dir}: exists and is not a directory")
    if cfg.init:
        validate_checkpoint(cfg)
    elif cfg.sft_seq_len + cfg.max_new_tokens + 16 > 8192:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: with --sft-seq-len {cfg.sft_seq_len} the toy's "
                         f"context would exceed 8192 tokens")


def validate_checkpoint(cfg: RunConfig):
    """--init DIR: a Gemma checkpoint we can run, whose context holds a prompt and a completion."""
    if not os.path.isdir(cfg.init):
        raise UsageError(f"--init {cfg.init}: not a directory")
    try:
        net = driver.network(cfg)          # config.json exists and is a Gemma warp-min runs
        driver.hf.shard_files(cfg.init)    # the weights exist (shapes are checked when they are loaded)
    except (OSError, ValueError) as e:
        raise UsageError(f"--init {cfg.init}: {e}") from None
    if cfg.max_new_tokens + 8 > net.max_seq_len:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: more than the checkpoint's context of "
                         f"{net.max_seq_len} tokens allows")


def check_task(cfg: RunConfig, task):
    """What needs the task: every token id fits the embedding, every prompt + completion the context."""
    net = driver.network(cfg)
    tok = task.tokenizer
    if tok.vocab_size > net.vocab_size or max(tok.stop_ids) >= net.vocab_size:
        raise UsageError(f"--init {cfg.init}: the tokenizer has {tok.vocab_size} tokens (stop ids {list(tok.stop_ids)}), "
                         f"more than the model's vocab_size {net.vocab_size}")
    prompts = task.eval_prompts(cfg.eval_prompts) + task.train_prompts(64, random.Random(0))
    longest = max(len(tok.encode_prompt(p)) for p in prompts) + cfg.max_new_tokens
    if longest > net.max_seq_len:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: prompt + completion ({longest} tokens) "
                         f"exceeds the model's context of {net.max_seq_len}")


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)   # --prompts must not mean --prompts-per-step

    def error(self, message):   # argparse's own errors (bad type, unknown flag) as one line too
        raise UsageError(message)


def build_parser():
    parser = ArgumentParser(
        prog="warp_min.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="WARP on the toy review task: SFT, then I x (M RL runs -> SLERP -> LITI), evaluation, a "
        "Pareto plot and a summary table. `python warp_min.py merge --help` (= warp-min-merge): merge "
        "safetensors checkpoints. The reproduction of the paper's claims: python -m experiments.reproduce.",
        epilog="--init DIR starts from a Hugging Face Gemma checkpoint instead of the toy SFT model: theta_sft = "
        "its weights, the network comes from DIR/config.json, prompts are encoded and completions decoded with "
        "DIR/tokenizer.json (optional tokenizers package), every stop id of config.json and generation_config.json "
        "ends a completion, and the final model is written as a Hugging Face directory OUT/final/. Your prompts: "
        "--prompts FILE; your reward: --reward module:function or --reward-model DIR (docs/own-model.md).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting settings: quick (~1 min, for tests) or default (the README demo)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into an existing --out")
    parser.add_argument("--resume", metavar="OUT", help="continue the killed run in OUT from its last checkpoint "
                        "(settings come from OUT/config.json; pass no other flag)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['doc']} (default: {f.default!r})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, help=f"{f.metadata['doc']} (default: {f.default!r})")
    return parser


def parse_config(argv):
    """Settings from the command line -> (RunConfig, resume?). Raises UsageError for any user mistake."""
    args = build_parser().parse_args(argv)
    if args.resume:
        return resume_config(args.resume, argv), True
    settings = {**PRESETS[args.preset], **{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
                                           if getattr(args, f.name) is not None}}
    cfg = RunConfig(**settings)
    cfg.out = cfg.out or os.path.join("runs", args.preset)
    validate(cfg)
    first_rank = int(os.environ.get("RANK", "0")) == 0    # under torchrun, rank 0 may have created it already
    if first_rank and os.path.isdir(cfg.out) and os.listdir(cfg.out) and not args.overwrite:
        raise UsageError(f"--out {cfg.out}: directory exists and is not empty (pass --overwrite, or --resume it)")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: exists and is not a directory")
    return cfg, False


def resume_config(out, argv):
    """The RunConfig of the run in `out`, which must have something left to resume."""
    if [a for a in argv if a not in ("--resume", out, f"--resume={out}")]:
        raise UsageError("--resume OUT takes every setting from OUT/config.json: pass no other flag")
    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = RunConfig(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--resume {out}: no readable warp_min config.json ({e})") from None
    if os.path.exists(os.path.join(out, "summary.md")) and not os.path.exists(os.path.join(out, "checkpoint.safetensors")):
        raise UsageError(f"--resume {out}: this run is already complete")
    cfg.out = out
    validate(cfg)
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge.main(argv[1:])
    if argv[:1] == ["reproduce"]:
        print("error: the reproduction moved out of the package: run `python -m experiments.reproduce` from a "
              "checkout of the repository (docs/reproducing.md)", file=sys.stderr)
        return 2
    if argv[:1] == ["demo"]:
        argv = argv[1:]
    try:
        cfg, resume = parse_config(argv)
        task = tasks.make_task(cfg)
        check_task(cfg, task)
    except (UsageError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.workers > 1 and processes == 1 and not resume:
        return distributed.launch(cfg.workers, argv)          # the same command, under torchrun
    # choice: denormals are not flushed. With torch.set_flush_denormal (the calling thread's mode) and 2
    # threads, about 1 run in 10 gave other bits (measured, cause not pinned down: docs/architecture.md);
    # the 0.02 init keeps the toy's weights far from denormals anyway.
    torch.set_num_threads(max(1, min(cfg.threads, (os.cpu_count() or 1) // processes)))  # no oversubscription
    t0 = time.time()
    try:
        driver.run(cfg, task, resume=resume)
    except (driver.TrainingError, tasks.RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    distributed.finish()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {time.time() - t0:.0f}s; outputs in {cfg.out}/")
    return 0


if __name__ == "__main__":   # what torchrun starts on every rank (distributed.launch)
    sys.exit(main())
