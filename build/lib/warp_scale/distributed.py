"""The M runs of a WARP iteration on separate processes, with PyTorch's own distributed runtime.

    torchrun --nproc-per-node 2 warp_min.py ...           # one process (rank) per run
    python warp_min.py --workers 2 ...                    # the same, launched for you

Run m of every iteration trains on rank m % world_size; each run's seed depends only on
(seed, iteration, m), so the result does not depend on how many processes there are: with the
same threads per process a parallel run gives the same weights and metrics as a sequential one,
bit for bit on CPU. The plain-RL baseline trains on the last rank after its WARP runs. The weights
meet through collectives: after its runs, every rank broadcasts
the runs it owns (tensor by tensor, from the owning rank); rank 0 -- the only one that writes
files -- merges, applies LITI, evaluates, and broadcasts the next theta_init. The metric rows of
every run are gathered to rank 0 and written in run order, as a sequential run writes them.

The gloo backend is used on CPU, nccl when the policy is on a GPU (each rank then uses its local
GPU). If a rank fails, torchrun stops the others and exits non-zero with a report naming the failed
rank and its error; collectives also time out (WARP_MIN_DIST_TIMEOUT seconds, default 600) rather
than hang forever.
"""

import contextlib
import datetime
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist


def world():
    """(rank, world_size): (0, 1) unless this process was started by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    timeout = datetime.timedelta(seconds=float(os.environ.get("WARP_MIN_DIST_TIMEOUT", "600")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if os.environ.get("WARP_MIN_TEST_KILL_RANK") == str(dist.get_rank()):   # tests: a rank that dies
        os.kill(os.getpid(), signal.SIGKILL)
    return world()


@contextlib.contextmanager
def using_threads(n):
    """Run a block with n torch threads: rank 0 uses every core while the other ranks wait for it
    (SFT, merge and evaluation), and its share of them while all ranks train."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish():
    """Leave the process group together: a barrier first, so no rank tears down its connections while
    another is still using them (gloo then aborts the process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def owner(run, world_size):
    """The rank that trains run `run` of an iteration."""
    return run % world_size


@torch.no_grad()
def share_state(state, src, template, device="cpu"):
    """Broadcast a state dict from rank `src` to every rank. `template` (same names, shapes and
    dtypes, e.g. theta_init) gives the receiving ranks their buffers. Returns the state on every rank."""
    out = {}
    for name, like in template.items():
        t = (state[name] if dist.get_rank() == src else torch.empty_like(like)).to(device).contiguous()
        dist.broadcast(t, src=src)
        out[name] = t.cpu()
    return out


def gather_rows(rows_by_run):
    """{run: [rows]} of every rank, merged on every rank (small: metrics only)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows_by_run)
    return {run: rows for part in everyone for run, rows in part.items()}


def launch(workers, argv):
    """`--workers N`: re-run this command under torchrun with N processes; returns its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", "warp_scale.cli", *argv]
    status = subprocess.call(command)
    if status != 0:
        print(f"error: the distributed run failed (exit status {status}); torchrun's report above names the "
              f"failed rank and its error", file=sys.stderr)
    return status
