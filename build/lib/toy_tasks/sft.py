"""theta_sft of the toy: next-token prediction on the review corpus (nanoGPT-style), cached on disk.

WARP starts from a supervised model; on the toy we make one. Random windows of the corpus, AdamW with
linear warmup then cosine decay, gradient clipping at 1. The result is cached as a safetensors file
keyed by everything that determines it, so the demo trains it once per setting.
"""

import dataclasses
import hashlib
import json
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer
from toy_tasks.reviews import corpus
from toy_tasks.tokenizer import encode


def warmup_cosine(step, warmup, total):
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def cache_path(cache_dir, net: ModelConfig, **settings):
    key = json.dumps({"net": dataclasses.asdict(net), **settings}, sort_keys=True)
    return os.path.join(cache_dir, f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")


def pretrain(net: ModelConfig, *, steps, lr, batch, seq_len, docs, seed, batch_seed, cache_dir=None,
             device="cpu", log=print):
    """theta_sft as a CPU state dict: the network `net` initialised from `seed`, trained for `steps`
    on `batch` windows of `seq_len` tokens of a `docs`-review corpus (drawn with `batch_seed`).
    With cache_dir, a cached result is returned instead of training again."""
    path = None
    if cache_dir:
        path = cache_path(cache_dir, net, steps=steps, lr=lr, batch=batch, seq_len=seq_len, docs=docs, seed=seed,
                          batch_seed=batch_seed)
        if os.path.exists(path):
            log(f"theta_sft: cached {path}")
            return load_file(path)
    gen = torch.Generator().manual_seed(batch_seed)
    data = torch.tensor(encode(corpus(docs, seed=seed)), dtype=torch.long)
    model = Transformer(net, generator=torch.Generator().manual_seed(seed)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps // 10, steps))
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).to(device)   # (B, T + 1)
        logits = model(windows[:, :-1])                                                       # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"sft step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:5.1f}s")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if path:   # written beside, then renamed: a killed run never leaves a half-written cache entry
        os.makedirs(cache_dir, exist_ok=True)
        save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    return state
