"""Cross-check the streaming merge against mergekit's nuslerp (a public peer), side by side.

    python experiments/bench/compare_mergekit.py                                  # mergekit importable here
    python experiments/bench/compare_mergekit.py --mergekit-python /tmp/mk/bin/python   # or in its own venv

mergekit's `nuslerp` with a base model and weights (1 - lam, lam), flattened per tensor, is SLERP
of task vectors with one angle per tensor -- our `--granularity tensor`. Both merge the same
synthetic checkpoints (experiments/bench/merge.py's generator, Llama config); we report the max abs and
relative difference per run, wall time and peak RSS. mergekit computes in float32 (we use float64
for dot products); both are compared with an independent float64 oracle. mergekit's float32
reductions drift on big tensors (WARP.md: "fp32 reductions over millions of elements drift").

mergekit is never a dependency of warp-min. Without it this script says how to get it, exits 0.
Install it in a throwaway venv, with a CPU build of torch installed first (an unpinned torch may
pull a multi-GB CUDA build):
    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "bench"))

INSTALL = __doc__.split("mergekit is never")[1]

# Runs inside the mergekit interpreter: the merge through its Python API, then time and VmHWM.
MERGEKIT_DRIVER = textwrap.dedent("""
    import json, sys, time
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
    t0 = time.perf_counter()
    run_merge(config, sys.argv[2], options=MergeOptions(copy_tokenizer=False, write_model_card=False,
              quiet=True, lazy_unpickle=True, out_shard_size=int(sys.argv[3])))
    seconds = time.perf_counter() - t0
    hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm}))
""")

OURS_DRIVER = textwrap.dedent("""
    import json, sys, time
    from warp_scale import merge as checkpoints
    t0 = time.perf_counter()
    code = checkpoints.main(sys.argv[1:] + ["--quiet"])
    seconds = time.perf_counter() - t0
    hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm, "code": code}))
""")


def find_mergekit(explicit):
    """An interpreter that can import mergekit: --mergekit-python, else this one, else None."""
    candidates = [explicit] if explicit else [sys.executable]
    for python in candidates:
        if python == sys.executable and importlib.util.find_spec("mergekit") is not None:
            return python
        if python != sys.executable and os.path.exists(python):
            ok = subprocess.run([python, "-c", "import mergekit, yaml"], capture_output=True)
            if ok.returncode == 0:
                return python
    return None


def run_json(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:3])} ...\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ours_dir, theirs_dir, init_dir, pol_dirs, lam):
    """Both outputs against an independent float64 oracle: per-tensor closed-form SLERP of the
    task vectors (paper Eq. 3), dot products accumulated in float64 block by block. `floor` is the
    oracle's own rounding to the output dtype: the best any implementation can do."""
    import torch
    from warp_scale import merge as ck
    ours, theirs, init = ck.Checkpoint(ours_dir), ck.Checkpoint(theirs_dir), ck.Checkpoint(init_dir)
    pols = [ck.Checkpoint(p) for p in pol_dirs]
    missing = sorted(set(ours.tensors) ^ set(theirs.tensors))
    stats = {"ours": 0.0, "mergekit": 0.0, "ours_vs_mergekit": 0.0, "floor": 0.0,
             "max_task_vector": 0.0}
    worst = {"ours": None, "mergekit": None}
    for name in ours.tensors:
        if name not in theirs.tensors:
            continue
        g00 = g11 = g01 = 0.0
        for i, p0, p1 in zip(init.blocks(name), pols[0].blocks(name), pols[1].blocks(name)):
            d0, d1 = p0.double() - i.double(), p1.double() - i.double()
            g00, g11, g01 = g00 + float((d0 * d0).sum()), g11 + float((d1 * d1).sum()), g01 + float((d0 * d1).sum())
        omega = math.acos(max(-1.0, min(1.0, g01 / math.sqrt(g00 * g11))))
        w0, w1 = math.sin((1 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega)
        for i, p0, p1, a, b in zip(init.blocks(name), pols[0].blocks(name), pols[1].blocks(name),
                                   ours.blocks(name), theirs.blocks(name)):
            i64 = i.double()
            ref = i64 + w0 * (p0.double() - i64) + w1 * (p1.double() - i64)
            for key, out in (("ours", a), ("mergekit", b)):
                err = float((out.double() - ref).abs().max())
                if err > stats[key]:
                    stats[key], worst[key] = err, name
            stats["ours_vs_mergekit"] = max(stats["ours_vs_mergekit"], float((a.double() - b.double()).abs().max()))
            stats["floor"] = max(stats["floor"], float((ref.to(a.dtype).double() - ref).abs().max()))
            stats["max_task_vector"] = max(stats["max_task_vector"], float((ref - i64).abs().max()))
    return {**stats, "worst": worst, "only_in_one": missing,
            "dtype_ours": next(iter(ours.tensors.values())).dtype,
            "dtype_theirs": next(iter(theirs.tensors.values())).dtype}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-python", default=None,
                    help="interpreter with mergekit installed (default: this one)")
    ap.add_argument("--size-gb", type=float, default=0.5, help="size of each synthetic checkpoint")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    python = find_mergekit(args.mergekit_python)
    if python is None:
        print("mergekit is not installed (it is not a warp-min dependency); nothing compared.\n"
              "To run this comparison, install it in a throwaway venv:" + INSTALL.split(":", 1)[1]
              + "then: python experiments/bench/compare_mergekit.py --mergekit-python /tmp/mk/bin/python")
        return 0

    from merge import make_checkpoints          # experiments/bench/merge.py's generator
    workdir = tempfile.mkdtemp(prefix="warp-vs-mergekit-")
    try:
        dirs, total, n_shards, _ = make_checkpoints(workdir, args.size_gb, args.dtype, 2)
        init, pol0, pol1 = dirs
        print(f"synthetic: 3 checkpoints x {total / 1e9:.2f} GB {args.dtype}, {n_shards} shards; "
              f"lam = {args.lam}; mergekit from {python}")
        dtype = {"bf16": "bfloat16", "f32": "float32"}[args.dtype]
        config = {"merge_method": "nuslerp", "base_model": init, "dtype": "float32",
                  "out_dtype": dtype, "parameters": {"nuslerp_flatten": True},
                  "models": [{"model": pol0, "parameters": {"weight": 1 - args.lam}},
                             {"model": pol1, "parameters": {"weight": args.lam}}]}
        config_path = os.path.join(workdir, "mergekit.yml")
        with open(config_path, "w") as f:
            json.dump(config, f)                  # JSON is YAML
        theirs_dir, ours_dir = os.path.join(workdir, "mergekit_out"), os.path.join(workdir, "ours_out")
        theirs = run_json([python, "-c", MERGEKIT_DRIVER, config_path, theirs_dir,
                           str(int(0.25e9))])
        ours = run_json([sys.executable, "-c", OURS_DRIVER, "--init", init, "--policies", pol0, pol1,
                         "--out", ours_dir, "--granularity", "tensor", "--lam", str(args.lam)])
        diff = compare(ours_dir, theirs_dir, init, [pol0, pol1], args.lam)
        print(f"\n{'':36}{'warp-min (tensor)':>20}{'mergekit nuslerp':>20}")
        print(f"{'wall time (s)':36}{ours['seconds']:>20.1f}{theirs['seconds']:>20.1f}")
        print(f"{'peak RSS (MB)':36}{ours['peak_rss_mb']:>20.0f}{theirs['peak_rss_mb']:>20.0f}")
        print(f"{'output dtype':36}{diff['dtype_ours']:>20}{diff['dtype_theirs']:>20}")
        print(f"{'max |out - float64 oracle|':36}{diff['ours']:>20.3g}{diff['mergekit']:>20.3g}")
        print(f"\nmax |ours - mergekit| = {diff['ours_vs_mergekit']:.3g}; rounding floor (oracle rounded to "
              f"{diff['dtype_ours']}) = {diff['floor']:.3g}; max |merged - init| = {diff['max_task_vector']:.3g}; "
              f"worst tensor: ours {diff['worst']['ours']}, mergekit {diff['worst']['mergekit']}")
        if diff["only_in_one"]:
            print(f"tensors in only one output: {diff['only_in_one'][:5]}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
