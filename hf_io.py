"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors), nothing else.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json` ({"weight_map":
{tensor name: shard file}}). Only safetensors is read or written: never pickle / torch.load.
Tensors are read one at a time, so peak memory is one tensor beyond what the caller keeps.
"""

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def save_atomic(tensors, path, metadata=None):
    """One safetensors file written atomically: into PATH.tmp, fsync'ed, renamed into place. A kill
    at any moment leaves the previous file or the new one, never a torn one."""
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(path):
    """config.json of a checkpoint directory as a dict."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_file) as f:
        return json.load(f)


def shard_files(path):
    """The safetensors files of a checkpoint, in index order (or the single file)."""
    index_file = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def iter_tensors(path, select=None):
    """Yield (name, tensor) for the checkpoint's tensors (those whose name passes `select`, if
    given), reading one tensor at a time; unselected tensors are never read."""
    for file in shard_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if select is None or select(name):
                    yield name, f.get_tensor(name)


def parse_size(size):
    """Bytes from an int or a string like "500MB", "2GB" (powers of 1000) or "1GiB" (powers of 1024)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use bytes or e.g. '500MB', '2GB')")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_tensors(state_dict, path, max_shard_size="2GB"):
    """Write tensors as one model.safetensors, or as shards of at most max_shard_size plus an index.

    Shards are filled greedily in state-dict order; a tensor larger than max_shard_size gets a shard
    of its own. Safetensors files left in `path` by an earlier save are removed first, so the
    directory never mixes two checkpoints.
    """
    limit = parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        if SHARD_PATTERN.match(old) or old == INDEX_NAME:
            os.remove(os.path.join(path, old))
    shards, current, current_bytes = [], {}, 0
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file_name), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def write_config(config, path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def dtype_name(dtype: torch.dtype):
    """torch.bfloat16 -> "bfloat16", the spelling config.json uses."""
    return str(dtype).removeprefix("torch.")


# what a fine-tuned copy of a checkpoint shares with it, beyond the weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json")
KEPT_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def carry_over(source, path):
    """Make the checkpoint just written to `path` a drop-in for `source`: copy source's tokenizer
    files and generation config, and the config.json keys ModelConfig does not hold (token ids, and
    max_position_embeddings, which ModelConfig caps to bound its rotary tables)."""
    import shutil
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    original = read_config(source)
    original = {**(original.get("text_config") or {}), **original}   # multimodal Gemma 3 nests these
    config = read_config(path)
    config.update({key: original[key] for key in KEPT_CONFIG_KEYS if key in original})
    write_config(config, path)
