"""Benchmark the streaming merge (warp_scale/merge.py) against plain read + write of the same bytes.

    python experiments/bench/merge.py                    # 3 x 1 GB bf16 (init + 2 policies), the default
    python experiments/bench/merge.py --profile          # + where the time goes, stage by stage
    python experiments/bench/merge.py --cold             # inputs dropped from the page cache first
    python experiments/bench/merge.py --size-gb 0.25 --dtype f32 --policies 3 --granularity tensor

Creates synthetic sharded HF-style checkpoints (Gemma-like names and shapes; policies = init +
a shared and an own small perturbation, so the angle between task vectors is realistic, ~75 deg)
in a temporary directory, then runs, each in its own subprocess so peak RSS is per run, and
--repeat times, interleaved (the machine may be shared: ratios are taken within one run):

  (a) baseline: read every tensor of the M + 1 inputs (pread, blocks of 2^19 elements as when the
      goal was set) and write one output of the same size (streaming writer, fsync);
  (b) the merge, warp_scale.merge.merge_checkpoints, once per --granularity (2 read passes over
      the inputs, 1 write; with --max-group-mb, groups that fit are read once and held);
  (c) with --floor: the merge's own I/O without its arithmetic -- both read passes as the merge
      does them (mapped, widened to fp32 a sub-block at a time), the init written as the output:
      what a two-pass merge of this design costs before any arithmetic;
  (d) python + torch + safetensors + warp_min imported, nothing else: the interpreter overhead.

Prints wall times, the ratio (b)/(a) (goal: <= 1.5; the best of the repeats against the best
baseline, and the median) and peak RSS (goal: <= 1 GiB). By default the files are in the page
cache (written just before, and RAM is larger than the data): the comparison is of the compute
and copy overhead, not of the disk. --cold drops the inputs from the page cache
(posix_fadvise DONTNEED) before every run; --evict-between-passes also drops them between the
merge's two passes, which is what a model larger than the page cache would see -- the case
--max-group-mb is for. --profile adds a single-threaded merge timed stage by stage (reads,
widening bf16 -> fp32, deltas, Gram, combine, narrowing fp32 -> bf16, finiteness checks,
releases of the mapped pages, writes, fsyncs). Everything is deleted at the end unless --keep.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DTYPES = {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}


def gemma_like_shapes(size_gb, itemsize, d=2048, ff=5632, vocab=32000):
    """Names/shapes of a Gemma/Llama-like model with about size_gb of weights."""
    embed = vocab * d
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    n_layer = max(1, round((size_gb * 1e9 / itemsize - embed - d) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (ff, d)
        shapes[p + "mlp.up_proj.weight"] = (ff, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ff)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    return shapes, n_layer


def make_checkpoints(workdir, size_gb, dtype_name, n_policies, shard_gb=0.25, seed=0):
    """init + policies, sharded at ~shard_gb, one tensor at a time (bounded memory here too)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[dtype_name])
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes, n_layer = gemma_like_shapes(size_gb, itemsize)
    # shard assignment, in name order, as HF does (a new shard when the current one is full)
    shard_of, shard, filled = {}, 0, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if filled and filled + nbytes > shard_gb * 1e9:
            shard, filled = shard + 1, 0
        shard_of[name], filled = shard, filled + nbytes
    n_shards = shard + 1
    files = {s: f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" for s in range(n_shards)}
    dirs = [os.path.join(workdir, n) for n in ["init"] + [f"policy{m}" for m in range(n_policies)]]
    for d in dirs:
        os.makedirs(d)
    g = torch.Generator().manual_seed(seed)
    for s in range(n_shards):
        parts = [{} for _ in dirs]
        for name in (n for n in shapes if shard_of[n] == s):
            init = 0.02 * torch.randn(shapes[name], generator=g)
            shared = torch.randn(shapes[name], generator=g)
            parts[0][name] = init.to(dtype)
            for m in range(n_policies):
                # task vector = 1e-3 * (0.6 shared + own): cos ~ 0.36/1.36, Omega ~ 75 deg
                own = torch.randn(shapes[name], generator=g)
                parts[m + 1][name] = (init + 1e-3 * (0.6 * shared + own)).to(dtype)
            del init, shared
        for d, part in zip(dirs, parts):
            save_file(part, os.path.join(d, files[s]), metadata={"format": "pt"})
        del parts
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    for d in dirs:
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {n: files[shard_of[n]] for n in shapes}}, f)
        with open(os.path.join(d, "config.json"), "w") as f:   # a valid Llama config (mergekit reads it)
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": n_layer,
                       "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                       "tie_word_embeddings": True, "torch_dtype": DTYPES[dtype_name]}, f, indent=1)
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    return dirs, total, n_shards, largest


# ----------------------------------------------------------------------------- child processes

BASELINE_BLOCK = 1 << 19        # the baseline's pread blocks, as when the goal was set


def child_baseline(init_dir, policy_dirs, out_dir, opts):
    """Read every tensor of every input; write the init's tensors as one output (same layout)."""
    from warp_scale import merge as ck
    inputs = [ck.Checkpoint(p) for p in [init_dir] + policy_dirs]
    os.makedirs(out_dir)
    for file, names in inputs[0].files_in_order().items():
        writer = ck.ShardWriter(os.path.join(out_dir, file), [inputs[0].tensors[n] for n in names],
                                inputs[0].metadata)
        for name in names:
            for blocks in zip(*(c.blocks(name, opts.get("block", BASELINE_BLOCK)) for c in inputs)):
                writer.write(blocks[0])
        writer.close()


def child_merge(init_dir, policy_dirs, out_dir, opts):
    from warp_scale import merge as ck
    if opts.get("evict_between_passes"):
        write_merged = ck._write_merged

        def evict_then_write(*args, **kwargs):      # pass 1 is done: forget what it read
            drop_from_page_cache([init_dir] + policy_dirs)
            return write_merged(*args, **kwargs)
        ck._write_merged = evict_then_write
    budget = opts.get("max_group_mb", "0")
    report = ck.merge_checkpoints(init_dir, policy_dirs, out_dir, progress=opts.get("show", False),
                                  granularity=opts.get("granularity", "layer"),
                                  workers=opts.get("workers"), profile=opts.get("profile", False),
                                  max_group_mb=budget if budget == "auto" else float(budget))
    if opts.get("profile"):
        print("profile " + json.dumps({"stages": report["profile_s"], "cpu": report["profile_cpu_s"],
                                       "timings": report["timings"], "params": report["params_in"]}))


def child_floor(init_dir, policy_dirs, out_dir, opts):
    """The merge's I/O without its arithmetic: both read passes as merge.py does them (mapped
    blocks widened to fp32 a sub-block at a time, pages released), the init written as the output."""
    import torch
    from warp_scale import merge as ck
    torch.set_num_threads(1)
    ck._retain_freed_memory()
    inputs = [ck.Checkpoint(p) for p in [init_dir] + policy_dirs]
    init = inputs[0]

    def touch(name, start, rows, out=None):
        blocks = [c.view(name, start, rows) for c in inputs]
        pieces = None if out is None else out.reshape(-1).split(ck.SUB_ELEMS)
        for views, i, _ in ck._sub_blocks(blocks[0], blocks[1:], torch.float32, ck._NO_PROFILE):
            if pieces is not None:
                pieces[i].copy_(views[1][0])              # the init, narrowed back
        del blocks
        for c in inputs:
            c.release(name, start, rows)

    for name in init.tensors:                                   # pass 1
        for start, rows in init.block_rows(name):
            touch(name, start, rows)
    os.makedirs(out_dir)
    for file, names in init.files_in_order().items():           # pass 2
        writer = ck.ShardWriter(os.path.join(out_dir, file), [init.tensors[n] for n in names],
                                init.metadata)
        for name in names:
            for start, rows in init.block_rows(name):
                out = torch.empty((rows,) + init.tensors[name].shape[1:],
                                  dtype=ck.TORCH_DTYPES[init.tensors[name].dtype])
                touch(name, start, rows, out)
                writer.write(out)
        writer.close()


def child_idle():
    from warp_scale import merge  # noqa: F401  (torch, safetensors, warp_min)


def drop_from_page_cache(dirs):
    """posix_fadvise(DONTNEED) on every file: the next read of them comes from the disk."""
    for d in dirs:
        for f in os.listdir(d):
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss_mb():
    """VmHWM of this process. (ru_maxrss of a child would include the parent's RSS at fork.)"""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))


def run_child(kind, paths, opts=None, show=False):
    """One measurement in a fresh interpreter; returns {seconds, peak_rss_mb[, profile]}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, json.dumps(opts or {}), *paths]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          stderr=None if show else subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with status {proc.returncode}")
    out = {"seconds": wall}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("seconds", "peak_rss_mb"):
            out[key] = float(value)
        elif key == "profile":
            out["profile"] = json.loads(value)
        elif show:
            print(line)
    return out


def print_profile(prof, wall, label):
    """The stage table of a profiled merge: wall and CPU seconds, CPU ns per parameter, share."""
    n, t = prof["params"], prof["timings"]
    cpu_total = sum(prof["cpu"].values())
    print(f"\n{label}: {wall:.2f} s wall (pass 1 {t['pass1_s']:.2f} s, pass 2 {t['pass2_s']:.2f} s), "
          f"{n / 1e6:.0f} M parameters. Per stage, summed over threads: wall seconds (on a shared "
          f"core they include the other threads' turns) and the thread's CPU seconds (not the "
          f"waits on the disk); the share is of all the CPU time in the stages, {cpu_total:.2f} s")
    print(f"    {'stage':34s} {'wall s':>7s} {'CPU s':>7s} {'CPU ns/param':>12s} {'CPU share':>9s}")
    for stage, sec in sorted(prof["cpu"].items(), key=lambda kv: -kv[1]):
        print(f"    {stage:34s} {prof['stages'][stage]:7.2f} {sec:7.2f} {sec / n * 1e9:12.2f} "
              f"{100 * sec / cpu_total:8.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (GB)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--policies", type=int, default=2, help="M, number of policies")
    ap.add_argument("--shard-gb", type=float, default=0.25, help="shard size of the synthetic files")
    ap.add_argument("--granularity", nargs="+", default=["layer", "tensor"],
                    choices=["layer", "tensor", "model"], help="merges to time (default: layer tensor)")
    ap.add_argument("--workers", type=int, default=None, help="the merge's --workers (default: its own)")
    ap.add_argument("--repeat", type=int, default=2, help="measurements of each, interleaved")
    ap.add_argument("--profile", action="store_true", help="also a single-threaded merge, stage by stage")
    ap.add_argument("--floor", action="store_true", help="also the merge's I/O without its arithmetic")
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each run")
    ap.add_argument("--evict-between-passes", action="store_true",
                    help="with --cold: drop them again between the merge's passes (model > page cache)")
    ap.add_argument("--workdir", default=None, help="where to put the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--reuse", default=None, metavar="DIR",
                    help="checkpoints kept by an earlier --keep run (DIR/init, DIR/policy0, ...)")
    ap.add_argument("--max-group-mb", default="0", help="the merge's --max-group-mb (0 = two read passes)")
    ap.add_argument("--baseline-block", type=int, default=BASELINE_BLOCK,
                    help="elements per pread block of the baseline (default 2^19; smaller blocks "
                         "made it up to ~15%% faster here: a stricter baseline)")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, opts, *paths = args._child
        opts = json.loads(opts)
        if kind == "idle":
            child_idle()
        else:
            fn = {"baseline": child_baseline, "merge": child_merge, "floor": child_floor}[kind]
            from warp_scale import merge  # noqa: F401  (imports outside the timed region)
            t0 = time.perf_counter()
            fn(paths[0], paths[1:-1], paths[-1], opts)
            print(f"seconds {time.perf_counter() - t0:.3f}")
        print(f"peak_rss_mb {peak_rss_mb():.1f}")
        return

    workdir = args.reuse or tempfile.mkdtemp(prefix="warp-merge-bench-", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        if args.reuse:
            dirs = [os.path.join(workdir, "init")] + [os.path.join(workdir, f"policy{m}")
                                                      for m in range(args.policies)]
            from warp_scale import merge as ck
            init = ck.Checkpoint(dirs[0])
            total, n_shards = init.nbytes, len(init.files)
            big = max(init.tensors.values(), key=lambda t: t.numel)
            big_name, big_shape, dtype = big.name, big.shape, big.dtype
        else:
            dirs, total, n_shards, (big_name, big_shape) = make_checkpoints(
                workdir, args.size_gb, args.dtype, args.policies, args.shard_gb)
            dtype = args.dtype
            os.sync()               # its writeback would otherwise compete with the first runs
        print(f"synthetic: {len(dirs)} checkpoints x {total / 1e9:.2f} GB {dtype}, {n_shards} "
              f"shards each, in {workdir} (ready in {time.perf_counter() - t0:.0f}s)"
              + ("; inputs dropped from the page cache before each run" if args.cold else ""))
        largest_fp64_mb = math.prod(big_shape) * 8 / 2**20
        idle = run_child("idle", [])
        scratch = os.path.join(workdir, "out")

        def measure(kind, opts=None, show=False):
            if args.cold:
                drop_from_page_cache(dirs)
            result = run_child(kind, dirs + [scratch], opts, show)
            shutil.rmtree(scratch, ignore_errors=True)
            return result

        merge_opts = {g: {"granularity": g, "max_group_mb": args.max_group_mb, "workers": args.workers,
                          "evict_between_passes": args.evict_between_passes} for g in args.granularity}
        runs = {"baseline": []}
        for rep in range(args.repeat):
            runs["baseline"].append(measure("baseline", {"block": args.baseline_block}))
            for g, opts in merge_opts.items():
                show = rep == 0 and g == args.granularity[0]      # one merge's progress and report
                runs.setdefault(g, []).append(measure("merge", {**opts, "show": show}, show=show))
            if args.floor:
                runs.setdefault("floor", []).append(measure("floor"))
        runs["baseline"].append(measure("baseline", {"block": args.baseline_block}))  # once more

        seconds = {k: [r["seconds"] for r in v] for k, v in runs.items()}
        best_base = min(seconds["baseline"])
        med = lambda xs: sorted(xs)[len(xs) // 2]
        n_in = len(dirs)
        reads = 2 if args.max_group_mb == "0" else 1
        print(f"\nall times (s, in run order): " + "; ".join(
            f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in seconds.items()))
        print(f"(a) read {n_in} x {total / 1e9:.2f} GB + write {total / 1e9:.2f} GB: best {best_base:6.2f} s "
              f"({(n_in + 1) * total / 1e9 / best_base:.2f} GB/s moved), peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs['baseline']):5.0f} MB")
        for g in args.granularity:
            best = min(seconds[g])
            print(f"(b) merge, granularity {g:6s} ({reads} read{'s' * (reads > 1)} + 1 write, "
                  f"--max-group-mb {args.max_group_mb}): best {best:6.2f} s, peak RSS "
                  f"{max(r['peak_rss_mb'] for r in runs[g]):5.0f} MB; ratio merge / read+write = "
                  f"{best / best_base:.2f} (median {med(seconds[g]) / med(seconds['baseline']):.2f}; "
                  f"goal <= 1.5)")
        if args.floor:
            best = min(seconds["floor"])
            print(f"(c) the merge's I/O alone (2 mapped read passes + 1 write, no arithmetic): best "
                  f"{best:6.2f} s = {best / best_base:.2f} x read+write")
        print(f"(d) interpreter (python + torch + safetensors) alone: peak RSS {idle['peak_rss_mb']:.0f} MB "
              f"(startup {idle['seconds']:.1f} s, not in the times above)")
        worst_rss = max(r["peak_rss_mb"] for g in args.granularity for r in runs[g])
        print(f"    largest tensor {big_name} {list(big_shape)}: {largest_fp64_mb:.0f} MB in fp64; "
              f"merge peak RSS {worst_rss:.0f} MB: goal <= 1024 MB "
              f"{'met' if worst_rss <= 1024 else 'NOT met'}")
        if args.profile:
            for workers in (1, None):
                prof_run = measure("merge", {"granularity": args.granularity[0], "profile": True,
                                             "workers": workers, "max_group_mb": args.max_group_mb})
                print_profile(prof_run["profile"], prof_run["seconds"],
                              f"profile, granularity {args.granularity[0]}, "
                              f"{'1 worker' if workers == 1 else 'default workers'}")
    finally:
        if args.keep or args.reuse:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
