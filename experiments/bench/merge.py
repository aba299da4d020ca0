"""Benchmark the streaming merge (warp_scale/merge.py) against plain read + write of the same bytes.

    python experiments/bench/merge.py                    # 3 x 1 GB bf16 (init + 2 policies), the default
    python experiments/bench/merge.py --size-gb 0.25 --dtype f32 --policies 3

Creates synthetic sharded HF-style checkpoints (Gemma-like names and shapes; policies = init +
a shared and an own small perturbation, so the angle between task vectors is realistic, ~75 deg)
in a temporary directory, then runs, each in its own subprocess so peak RSS is per run:

  (a) baseline: read every tensor of the M + 1 inputs (safe_open) and write one output of the
      same size (streaming writer, fsync) -- the I/O floor of any merge;
  (b) the merge: warp_scale.merge.merge_checkpoints (2 read passes over the inputs, 1 write; with
      --max-group-mb, groups that fit are read once and held);
  (c) python + torch + safetensors + warp_min imported, nothing else: the interpreter overhead.

Prints wall times, the ratio (b)/(a) (goal: <= 2) and peak RSS against the largest tensor in
float64 (goal: peak RSS < 2 x that + interpreter overhead). The files are in the page cache
for both (a) and (b) (written just before, and RAM is larger than the data): the comparison is
of the compute/copy overhead, not of the disk. Everything is deleted at the end unless --keep.
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

def child_baseline(init_dir, policy_dirs, out_dir):
    """Read every tensor of every input; write the init's tensors as one output (same layout)."""
    from warp_scale import merge as ck
    inputs = [ck.Checkpoint(p) for p in [init_dir] + policy_dirs]
    os.makedirs(out_dir)
    for file, names in inputs[0].files_in_order().items():
        writer = ck.ShardWriter(os.path.join(out_dir, file), [inputs[0].tensors[n] for n in names],
                                inputs[0].metadata)
        for name in names:
            for blocks in zip(*(c.blocks(name) for c in inputs)):
                writer.write(blocks[0])
        writer.close()


def child_merge(init_dir, policy_dirs, out_dir):
    from warp_scale import merge as ck
    budget = os.environ.get("WARP_BENCH_MAX_GROUP_MB", "0")
    ck.merge_checkpoints(init_dir, policy_dirs, out_dir, progress=True,
                         max_group_mb=budget if budget == "auto" else float(budget))


def child_idle():
    from warp_scale import merge  # noqa: F401  (torch, safetensors, warp_min)


def peak_rss_mb():
    """VmHWM of this process. (ru_maxrss of a child would include the parent's RSS at fork.)"""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))


def run_child(kind, *paths, show=False):
    """Run one measurement in a fresh interpreter; returns (wall seconds, peak RSS MB)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, *paths]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          stderr=None if show else subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with status {proc.returncode}")
    values = dict(l.split() for l in proc.stdout.splitlines() if l.startswith(("seconds", "peak_rss_mb")))
    if show:
        print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith(("seconds", "peak_rss"))))
    return float(values.get("seconds", wall)), float(values["peak_rss_mb"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (GB)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--policies", type=int, default=2, help="M, number of policies")
    ap.add_argument("--shard-gb", type=float, default=0.25, help="shard size of the synthetic files")
    ap.add_argument("--workdir", default=None, help="where to put the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--max-group-mb", default="0", help="the merge's --max-group-mb (0 = two read passes)")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, *paths = args._child
        if kind == "idle":
            child_idle()
        else:
            fn = {"baseline": child_baseline, "merge": child_merge}[kind]
            from warp_scale import merge  # noqa: F401  (imports outside the timed region)
            t0 = time.perf_counter()
            fn(paths[0], paths[1:-1], paths[-1])
            print(f"seconds {time.perf_counter() - t0:.3f}")
        print(f"peak_rss_mb {peak_rss_mb():.1f}")
        return

    workdir = tempfile.mkdtemp(prefix="warp-merge-bench-", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        dirs, total, n_shards, (big_name, big_shape) = make_checkpoints(
            workdir, args.size_gb, args.dtype, args.policies, args.shard_gb)
        print(f"synthetic: {len(dirs)} checkpoints x {total / 1e9:.2f} GB {args.dtype}, {n_shards} "
              f"shards each, in {workdir} (made in {time.perf_counter() - t0:.0f}s)")
        largest_fp64_mb = math.prod(big_shape) * 8 / 2**20
        idle_wall, idle_rss = run_child("idle")
        base_wall, base_rss = run_child("baseline", *dirs, os.path.join(workdir, "baseline_out"))
        shutil.rmtree(os.path.join(workdir, "baseline_out"))
        os.environ["WARP_BENCH_MAX_GROUP_MB"] = args.max_group_mb
        merge_wall, merge_rss = run_child("merge", *dirs, os.path.join(workdir, "merged"), show=True)
        # the machine may be shared: measure the baseline again after the merge, keep the faster
        base_wall2, _ = run_child("baseline", *dirs, os.path.join(workdir, "baseline_out"))
        print(f"baseline runs: {base_wall:.1f} s before the merge, {base_wall2:.1f} s after")
        base_wall = min(base_wall, base_wall2)
        n_in = len(dirs)
        print(f"\n(a) read {n_in} x {total / 1e9:.2f} GB + write {total / 1e9:.2f} GB: "
              f"{base_wall:6.1f} s  ({(n_in + 1) * total / 1e9 / base_wall:.2f} GB/s moved), "
              f"peak RSS {base_rss:6.0f} MB")
        reads = 2 if args.max_group_mb == "0" else 1       # held groups: read once (if they fit)
        print(f"(b) merge ({reads} read{'s' * (reads > 1)} + 1 write, --max-group-mb {args.max_group_mb}): "
              f"{merge_wall:6.1f} s  ({(reads * n_in + 1) * total / 1e9 / merge_wall:.2f} GB/s moved), "
              f"peak RSS {merge_rss:6.0f} MB")
        print(f"    ratio merge / read+write = {merge_wall / base_wall:.2f}  (goal <= 2)")
        print(f"    interpreter (python + torch + safetensors) alone: peak RSS {idle_rss:.0f} MB "
              f"(startup {idle_wall:.1f} s, not in the times above)")
        print(f"    largest tensor {big_name} {list(big_shape)}: {largest_fp64_mb:.0f} MB in fp64; "
              f"merge RSS above interpreter = {merge_rss - idle_rss:.0f} MB; goal: peak RSS < "
              f"2 x {largest_fp64_mb:.0f} + {idle_rss:.0f} = {2 * largest_fp64_mb + idle_rss:.0f} MB "
              f"-> {'met' if merge_rss < 2 * largest_fp64_mb + idle_rss else 'NOT met'}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
