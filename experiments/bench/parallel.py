"""Wall time of the demo with the M runs of each iteration on 1 vs 2 processes, measured in one run.

    python experiments/bench/parallel.py                    # quick and default presets
    python experiments/bench/parallel.py --presets quick

theta_sft is trained once first (a warm cache), so the times compare the WARP part itself: SFT is not
parallelised. Each configuration runs in a fresh process with its default threads: one process gets
--threads 2, two workers get one thread each (no oversubscription on 2 cores).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "warp_min.py"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: warp_min.py {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="quick,default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for preset in args.presets.split(","):
            common = ["--preset", preset, "--cache-dir", cache]
            run([*common, "--out", os.path.join(tmp, f"{preset}-warm"), "--iterations", "1", "--steps", "1",
                 "--runs", "1", "--no-baseline", "--eval-every", "0"])        # trains and caches theta_sft
            one = run([*common, "--out", os.path.join(tmp, f"{preset}-1")])
            two = run([*common, "--out", os.path.join(tmp, f"{preset}-2"), "--workers", "2"])
            print(f"demo --preset {preset}: 1 process {one:6.1f} s, 2 workers {two:6.1f} s, "
                  f"ratio {two / one:.2f} (SFT cached)", flush=True)


if __name__ == "__main__":
    main()
