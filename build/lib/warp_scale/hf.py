"""Hugging Face checkpoint directories: config.json <-> ModelConfig, and the safetensors files.

`Transformer.from_pretrained(dir)` / `.save_pretrained(dir)` (model.py) call load_model / save_model
here. A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
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

from model import FULL, SLIDING, ModelConfig

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


def load_model(cls, path, dtype=None, device=None, max_seq_len=None):
    """Transformer.from_pretrained: the network of config.json with the checkpoint's weights, shapes checked."""
    cfg = config_from_hf(read_config(path), max_seq_len)
    with torch.device("meta"):  # no random init, no memory: every parameter is overwritten below
        model = cls(cfg)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # "bfloat16" works too
    model = model.to(dtype or torch.float32).to_empty(device=device or "cpu")
    model.build_rope_tables(device)
    params = dict(model.named_parameters())
    loaded, lm_head = set(), None
    with torch.no_grad():
        for file_name, tensor in iter_tensors(path, select=lambda name: our_tensor_name(name) is not None):
            name = our_tensor_name(file_name)
            if name == "lm_head.weight":
                lm_head = tensor
                continue
            if name not in params:
                raise ValueError(f"unexpected tensor {file_name} in {path} (not in a {cfg_type(cfg)})")
            if tensor.shape != params[name].shape:
                raise ValueError(f"shape mismatch for {file_name}: checkpoint has {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    embedding = model.model.embed_tokens.weight
    if lm_head is not None and not torch.equal(lm_head.to(embedding), embedding):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight: warp-min ties the "
                         "output projection to the embedding and cannot represent an untied head")
    return model


def save_model(model, path, max_shard_size="2GB"):
    """Transformer.save_pretrained: config.json (transformers 5.x spelling) + safetensors shards."""
    config = config_to_hf(model.cfg)
    config["dtype"] = dtype_name(model.model.embed_tokens.weight.dtype)
    write_config(config, path)
    save_tensors(model.state_dict(), path, max_shard_size)


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig, and checkpoint tensor names -> ours
# ----------------------------------------------------------------------------------------------

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
# multimodal Gemma 3 config.json files leave most text_config keys at transformers' defaults
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                            num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                            max_position_embeddings=131_072)


def cfg_type(cfg: ModelConfig):
    """The HF model_type of a config: its family is told by which norms it has."""
    return "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.sandwich_norms else "gemma"


def config_from_hf(hf: dict, max_seq_len=None) -> ModelConfig:
    """Map a config.json (transformers 4.x or 5.x spelling) to ModelConfig; refuse what we can't run."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal Gemma 3: keep its language model;
        # HF's Gemma3ForConditionalGeneration never soft-caps the final logits (real configs: null)
        hf, model_type = {**hf["text_config"], "final_logit_softcapping": None}, "gemma3_text"
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}: warp-min loads gemma, gemma2, gemma3_text "
                         "and the language model of gemma3")
    gemma1, gemma3 = model_type == "gemma", model_type == "gemma3_text"
    hf = {**GEMMA3_TEXT_DEFAULTS, **hf} if gemma3 else hf
    missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    activation = hf.get("hidden_activation") or (hf.get("hidden_act") if gemma1 else None)
    if activation not in ("gelu_pytorch_tanh", None) and not (gemma1 and activation == "gelu"):
        raise ValueError(f"unsupported activation {activation!r} (Gemma uses gelu_pytorch_tanh)")
    for key, refused in (("attention_bias", True), ("tie_word_embeddings", False),
                         ("use_bidirectional_attention", True)):
        if hf.get(key) == refused:
            raise ValueError(f"unsupported config: {key}={refused}")
    # RoPE: 5.x nests rope_parameters ({"full_attention": ..., "sliding_attention": ...} in Gemma 3);
    # 4.x had rope_theta, rope_scaling and (Gemma 3) rope_local_base_freq at the top level
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 1e6 if gemma3 else 1e4),
                                         **(hf.get("rope_scaling") or {})}
    full, local = rope, None
    if gemma3:
        full = rope.get(FULL, rope)
        local = (rope.get(SLIDING) or {}).get("rope_theta", hf.get("rope_local_base_freq", 1e4))
    rope_type = full.get("rope_type", full.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"unsupported rope type {rope_type!r}: warp-min implements 'default' and 'linear'")
    n_layer = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None and not gemma1:  # 4.x configs: every `pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)) if gemma3 else 2
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layer)]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads", hf["num_attention_heads"]), d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim", 256),  # transformers' default for all three families
        d_ff=hf["intermediate_size"], rope_theta=full["rope_theta"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=max_seq_len or min(hf.get("max_position_embeddings", 8192), 8192),
        query_pre_attn_scalar=None if gemma1 else hf.get("query_pre_attn_scalar", 256),
        # HF's Gemma 3 attention ignores attn_logit_softcapping, so we do too
        attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0) if model_type == "gemma2" else None,
        final_logit_softcap=None if gemma1 else hf.get("final_logit_softcapping", None if gemma3 else 30.0),
        sliding_window=None if gemma1 else hf.get("sliding_window", 4096),
        layer_types=layer_types, sandwich_norms=not gemma1, qk_norm=gemma3, rope_local_theta=local,
        rope_scaling_factor=full.get("factor", 1.0) if rope_type == "linear" else 1.0,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> config.json dict in transformers 5.x spelling; refuse features the family lacks."""
    model_type = cfg_type(cfg)
    lost = {"gemma": ["attn_logit_softcap", "final_logit_softcap", "sliding_window", "rope_local_theta"],
            "gemma2": ["rope_local_theta"], "gemma3_text": ["attn_logit_softcap"]}[model_type]
    lost = [name for name in lost if getattr(cfg, name) is not None]
    if model_type != "gemma3_text" and cfg.rope_scaling_factor != 1.0:
        lost.append("rope_scaling_factor")
    if model_type == "gemma" and cfg.query_pre_attn_scalar not in (None, cfg.head_dim):
        lost.append("query_pre_attn_scalar")
    if cfg.qk_norm and not cfg.sandwich_norms:
        lost.append("qk_norm without sandwich_norms")
    if lost:
        raise ValueError(f"a {model_type} config.json cannot express {', '.join(lost)}")
    hf = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
          "max_position_embeddings": cfg.max_seq_len, "attention_bias": False, "tie_word_embeddings": True}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if model_type == "gemma":
        return {**hf, "hidden_act": "gelu_pytorch_tanh", "rope_parameters": rope}
    hf.update(hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
              final_logit_softcapping=cfg.final_logit_softcap, attn_logit_softcapping=cfg.attn_logit_softcap,
              sliding_window=cfg.sliding_window or cfg.max_seq_len,  # HF builds a local mask even if unused
              layer_types=list(cfg.layer_types or [FULL] * cfg.n_layer), rope_parameters=rope)
    if model_type == "gemma3_text":
        if cfg.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor, "rope_theta": cfg.rope_theta}
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        hf["rope_parameters"] = {FULL: rope, SLIDING: local}
    return hf


def our_tensor_name(name):
    """Checkpoint tensor name -> ours; None for tensors we skip (vision tower, multimodal projector)."""
    for prefix, ours in (("language_model.model.", "model."), ("model.language_model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    if "vision_tower." in name or "multi_modal_projector." in name or name.endswith("rotary_emb.inv_freq"):
        return None
    return name
