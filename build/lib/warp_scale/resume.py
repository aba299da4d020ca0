"""Crash-safe progress for `python warp_min.py`: one checkpoint file, written atomically.

`OUT/checkpoint.safetensors` holds everything needed to continue a killed run exactly where its last
checkpoint left it: the loop's position (phase, iteration, finished runs, number of metric rows
already written), the current iteration's theta_init, the finished runs' weights and -- in the middle
of a run -- that run's policy, EMA anchor, Adam state, learning-rate schedule and random generators.
Tensors go into the safetensors body, everything else into its JSON metadata (no pickle anywhere).
The file is written beside its target, fsync'ed and renamed into place, so a kill at any moment
leaves the previous checkpoint or the new one, never a torn one.
"""

import json

import torch
from safetensors import safe_open

from warp_scale import hf


def pack_run(step, policy, anchor, optimizer, schedule, prompt_rng, sample_gen, skips, mixed=None):
    """One RL run's full state as (json-able dict, {name: tensor})."""
    tensors = {f"policy/{k}": v for k, v in policy.state_dict().items()}
    tensors |= {f"anchor/{k}": v for k, v in anchor.state_dict().items()}
    opt = optimizer.state_dict()
    opt_meta = {"param_groups": opt["param_groups"], "state": {}}
    for index, state in opt["state"].items():
        opt_meta["state"][str(index)] = sorted(state)
        tensors |= {f"optimizer/{index}/{k}": torch.as_tensor(v) for k, v in state.items()}
    tensors["sample_gen"] = sample_gen.get_state()
    if mixed is not None:
        tensors |= {f"master/{k}": v for k, v in mixed.master.items()}
        tensors |= {f"ema/{k}": v for k, v in mixed.ema.items()}
    meta = {"step": step, "optimizer": opt_meta, "schedule": schedule.state_dict(),
            "prompt_rng": prompt_rng.getstate(), "skips": skips}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def unpack_run(meta, tensors, policy, anchor, optimizer, schedule, prompt_rng, sample_gen, mixed=None):
    """Restore what pack_run saved into freshly built objects; returns (step, skips)."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    with torch.no_grad():
        policy.load_state_dict(part("policy/"))
        anchor.load_state_dict(part("anchor/"))
        if mixed is not None:
            for k, v in part("master/").items():
                mixed.master[k].copy_(v)
            for k, v in part("ema/").items():
                mixed.ema[k].copy_(v)
    state = {int(i): {k: tensors[f"optimizer/{i}/{k}"] for k in keys} for i, keys in meta["optimizer"]["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    version, internal, gauss = meta["prompt_rng"]
    prompt_rng.setstate((version, tuple(internal), gauss))
    sample_gen.set_state(tensors["sample_gen"])
    return meta["step"], meta["skips"]


def save(path, progress, state_dicts, run=None):
    """Write the checkpoint atomically. progress: json-able loop position; state_dicts: {prefix: state};
    run: (meta, tensors) from pack_run, or None between runs."""
    tensors = {f"{prefix}/{k}": v.detach().cpu().contiguous()
               for prefix, sd in state_dicts.items() for k, v in sd.items()}
    meta = {"progress": progress, "run": None}
    if run is not None:
        meta["run"] = run[0]
        tensors |= {f"run/{k}": v for k, v in run[1].items()}
    hf.save_atomic(tensors, path, metadata={"warp_min": json.dumps(meta)})


def load(path):
    """(progress, {prefix: state dict}, run or None) as saved by `save`."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["warp_min"])
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}   # clone: torch-aligned memory, so float64
        # reductions (MKL picks kernels by alignment) give the same bits as in the uninterrupted run
    groups = {}
    for key, value in tensors.items():
        prefix, name = key.split("/", 1)
        if prefix == "run":
            continue
        groups.setdefault(prefix, {})[name] = value
    run = None
    if meta["run"] is not None:
        run = (meta["run"], {k[len("run/"):]: v for k, v in tensors.items() if k.startswith("run/")})
    return meta["progress"], groups, run
