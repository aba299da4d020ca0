"""A Gemma-style decoder-only transformer, small enough to read in one sitting.

The architecture follows Gemma (Gemma Team, 2024), the policy family of the WARP paper:

- token embedding multiplied by sqrt(d_model) and tied to the output projection,
- RMSNorm that multiplies by (1 + weight) (weights are stored as offsets from 1),
- rotary position embedding (RoPE) on queries and keys,
- multi-query / grouped-query attention (n_kv_head <= n_head),
- a GeGLU MLP with the tanh approximation of GELU.

Gemma 2 and Gemma 3 add features that are all off in the default (toy, Gemma 1) config and cost
nothing when off: tanh soft-capping of attention scores and of the final logits, sliding-window
("local") attention layers interleaved with global ones, "sandwich" norms around each sublayer,
a query scale set by `query_pre_attn_scalar`, and (Gemma 3) RMSNorm on query/key heads with a
separate RoPE base for local layers and linear RoPE scaling for global ones.

Parameter names are exactly Hugging Face Gemma's tensor names (`model.embed_tokens.weight`,
`model.layers.N.self_attn.q_proj.weight`, ...), so a state dict of this model *is* a Gemma
checkpoint's state dict: `from_pretrained` / `save_pretrained` are a short loop with shape checks
plus a mapping between config.json and ModelConfig, both in warp_scale/hf.py (reached only when
called, so this file needs nothing but torch).

Next to the model: `generate` (sampling with a KV cache) and `completion_logprobs` (per-token
log-probabilities of completions, masked to the completion), the two things RL needs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SLIDING, FULL = "sliding_attention", "full_attention"  # layer type names used by HF configs


@dataclass
class ModelConfig:
    vocab_size: int = 512
    n_layer: int = 2          # number of transformer blocks
    n_head: int = 4           # query heads
    n_kv_head: int = 1        # key/value heads: 1 = multi-query (Gemma 2B), n_head = multi-head
    d_model: int = 128        # residual stream width ("hidden_size")
    head_dim: int = 32        # Gemma decouples head_dim from d_model / n_head
    d_ff: int = 512           # GeGLU hidden width ("intermediate_size")
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 256    # longest sequence the rotary table is built for
    init_std: float = 0.02    # N(0, 0.02) init; N(0, 1) creates denormals that slow CPU matmuls
    # --- Gemma 2 / Gemma 3 features; the defaults switch every one of them off (= Gemma 1) ---
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; None = head_dim
    attn_logit_softcap: float | None = None     # Gemma 2: scores -> c * tanh(scores / c) before softmax
    final_logit_softcap: float | None = None    # Gemma 2/3: logits -> c * tanh(logits / c)
    sliding_window: int | None = None           # local layers see this many positions (incl. own)
    layer_types: tuple | None = None            # per layer sliding_attention/full_attention; None = all full
    sandwich_norms: bool = False                # Gemma 2/3: RMSNorm each sublayer's output too
    qk_norm: bool = False                       # Gemma 3: RMSNorm on every query and key head before RoPE
    rope_local_theta: float | None = None       # Gemma 3: RoPE base of sliding layers; None = rope_theta
    rope_scaling_factor: float = 1.0            # Gemma 3 "linear" RoPE scaling of full layers: pos / factor

    def __post_init__(self):
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            assert len(self.layer_types) == self.n_layer, "need one layer type per layer"
            assert set(self.layer_types) <= {SLIDING, FULL}, f"layer types are {SLIDING!r} or {FULL!r}"
            assert SLIDING not in self.layer_types or self.sliding_window, "sliding layers need a window"

    def is_sliding(self, layer):
        return self.layer_types is not None and self.layer_types[layer] == SLIDING


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32 as Gemma does."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero offset: the norm starts as identity scale

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) * (1 + w) in one call (the same bits as the two steps, forward and backward)
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim, max_seq_len, theta, scaling_factor=1.0, device=None):
    """cos and signed sin tables, (max_seq_len, head_dim), for rotary embedding in HF's layout, where
    dimension i pairs with i + d/2. Linear RoPE scaling rotates position p as p / factor."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = inv_freq / scaling_factor
    pos = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)               # (T, head_dim/2)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x, cos, signed_sin):
    """Rotate each pair (x_i, x_{i+d/2}) by its position's angle. x: (B, H, T, hd).

    HF writes it x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); with the sign folded
    into the table that is roll(x, d/2) * (-sin, sin): the same numbers, one kernel instead of four.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def softcap(x, cap):
    """Gemma 2's tanh soft-capping: smoothly squashes x into (-cap, cap)."""
    return torch.tanh(x / cap) * cap


def causal_mask(T, window, device):
    """(T, T) bool, True where query i may attend key j: j <= i, and i - j < window if windowed."""
    pos = torch.arange(T, device=device)
    distance = pos[:, None] - pos[None, :]            # query position - key position
    return (distance >= 0) & (distance < window) if window else distance >= 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding=False):
        super().__init__()
        assert cfg.n_head % cfg.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_logit_softcap
        self.window = cfg.sliding_window if sliding else None
        self.max_seq_len = cfg.max_seq_len

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys/values of every position so far, in buffers allocated once
            if "k" not in cache:  # (writing in place: concatenating would copy the whole cache every token)
                size = (B, self.n_kv_head, cache.get("max_len", self.max_seq_len), self.head_dim)
                cache["k"], cache["v"], cache["len"] = k.new_empty(size), v.new_empty(size), 0
            start, end = cache["len"], cache["len"] + T
            assert start == 0 or T == 1, "with a filled cache, decode one token at a time"
            assert end <= cache["k"].shape[2], f"the KV cache holds {cache['k'].shape[2]} positions, not {end}"
            cache["k"][:, :, start:end], cache["v"][:, :, start:end], cache["len"] = k, v, end
            # a new token of a local layer sees only the last `window` positions (the prompt: by its mask)
            keep_from = max(0, end - self.window) if self.window is not None and T == 1 else 0
            k, v = cache["k"][:, :, keep_from:end], cache["v"][:, :, keep_from:end]
        # one new token may see every key kept above; otherwise causal, and banded for a local layer
        mask = causal_mask(T, self.window, x.device) if T > 1 and (self.window or self.softcap) else None
        if self.softcap is None:  # enable_gqa: each kv head serves n_head / n_kv_head query heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and mask is None),
                                               scale=self.scale, enable_gqa=True)
        else:  # soft-capped scores need the explicit form (as HF's eager attention)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)               # (B, H, Tk, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            scores = softcap((q @ k.transpose(-2, -1)) * self.scale, self.softcap)       # (B, H, T, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """GeGLU: down( gelu_tanh(gate(x)) * up(x) )."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding=False):
        super().__init__()
        self.sliding, self.sandwich = sliding, cfg.sandwich_norms
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, sliding)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None):
        if not self.sandwich:  # Gemma 1 pre-norm; HF calls the norm in front of the MLP "post_attention"
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        # Gemma 2/3: norm before and after each sublayer, then the residual add
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaBody(nn.Module):
    """Holds the tensors under the `model.` prefix of a Gemma checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_sliding(i)) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = GemmaBody(cfg)
        self.build_rope_tables()
        # explicit generator: building a model must never consume the global RNG (see TOY_NOTES)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std, generator=generator)

    def build_rope_tables(self, device=None):
        """(Re)build the non-persistent cos/sin buffers; the local pair exists only if Gemma 3 asks for it."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling_factor, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Gemma scales embeddings by sqrt(d) rounded to the model's dtype (a buffer, so .to(dtype) rounds it)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(cfg.d_model), device=device), persistent=False)
        if cfg.rope_local_theta is not None:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_local_theta, 1.0, device)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def forward(self, idx, caches=None, start_pos=0):
        """idx: (B, T) token ids -> logits (B, T, vocab). With `caches`, positions start at start_pos."""
        B, T = idx.shape
        assert start_pos + T <= self.cfg.max_seq_len, f"sequence length {start_pos + T} > max_seq_len"
        x = self.model.embed_tokens(idx)                                       # (B, T, C)
        x = x * self.embed_scale.to(x.dtype)                                   # Gemma: scale by sqrt(d)
        pos = slice(start_pos, start_pos + T)
        rope = rope_local = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))
        if self.cfg.rope_local_theta is not None:  # Gemma 3: sliding layers rotate with their own base
            rope_local = (self.rope_local_cos[pos].to(x.dtype), self.rope_local_sin[pos].to(x.dtype))
        for i, block in enumerate(self.model.layers):
            cos, sin = rope_local if block.sliding else rope
            x = block(x, cos, sin, None if caches is None else caches[i])
        x = self.model.norm(x)
        logits = x @ self.model.embed_tokens.weight.T                          # tied output: (B, T, V)
        if self.cfg.final_logit_softcap is not None:
            logits = softcap(logits, self.cfg.final_logit_softcap)
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                 stop_ids=(), use_cache=True):
        """Sample continuations of prompts idx (B, T0) -> (B, T0 + max_new_tokens).

        Each step samples from softmax(logits / temperature), optionally restricted to the top_k
        logits; temperature 0 means greedy. A row is finished once it produces one of stop_ids (an
        instruction-tuned Gemma ends a turn with <end_of_turn>, not <eos>); later tokens of that row
        are stop_ids[0], and generation ends once every row is finished. With use_cache, keys/values
        of past positions are kept so each step only runs the newest token through the network.
        """
        stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        caches = [{"max_len": idx.shape[1] + max_new_tokens} for _ in self.model.layers] if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        new_tokens = []
        with torch.inference_mode():   # no autograd bookkeeping at all: ~10% faster per token than no_grad
            logits = self(idx, caches)[:, -1, :]                   # the prompt, all positions at once
            for step in range(max_new_tokens):
                next_token = sample_from_logits(logits.float(), temperature, top_k, generator)
                if len(stop):
                    next_token = torch.where(done, stop[0], next_token)
                    done = done | torch.isin(next_token, stop)
                new_tokens.append(next_token)
                if step == max_new_tokens - 1 or (len(stop) and bool(done.all())):
                    break
                if use_cache:   # only the new token goes through the network; earlier keys/values are cached
                    logits = self(next_token[:, None], caches, start_pos=idx.shape[1] + step)[:, -1, :]
                else:
                    logits = self(torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1))[:, -1, :]
        return torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1)   # outside inference mode: a normal tensor

    @classmethod
    def from_state(cls, cfg: ModelConfig, state, device="cpu", dtype=torch.float32):
        """A network holding `state` (copied, rounded to `dtype`), without a wasted random init."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)
        model.build_rope_tables(device)   # the rotary tables are not in the state dict
        model.load_state_dict(state)
        return model

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, max_seq_len=None):
        """Load a Hugging Face Gemma checkpoint directory (gemma, gemma2, gemma3_text, or the language
        model of a multimodal gemma3). dtype defaults to float32 (choice: not the file's dtype);
        max_seq_len defaults to min(max_position_embeddings, 8192) to bound the rotary tables.
        The config mapping and the shard reading are warp_scale/hf.py's.
        """
        from warp_scale import hf
        return hf.load_model(cls, path, dtype, device, max_seq_len)

    def save_pretrained(self, path, max_shard_size="2GB"):
        """Write config.json + safetensors (sharded with an index above max_shard_size) that
        transformers' AutoModelForCausalLM loads. The tied head is not written: there is no lm_head tensor."""
        from warp_scale import hf
        hf.save_model(self, path, max_shard_size)


def sample_from_logits(logits, temperature=1.0, top_k=None, generator=None):
    """logits (B, V) -> token ids (B,) drawn from softmax(logits / temperature); temperature 0 = argmax.

    By inverting the CDF: the first token whose cumulative probability reaches u, uniform in (0, total]
    (exact; a zero-probability token is never drawn; ~7x cheaper than torch.multinomial for one draw).
    A diverged policy (non-finite logits) draws token 0; its RL step is then skipped for its loss.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)                                       # (B, V)
    u = (1.0 - torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)) * cdf[:, -1:]
    return (cdf < u).sum(dim=-1)


def completion_mask(tokens, prompt_len, stop_ids):
    """1.0 on completion tokens up to and including the first stop id, 0.0 on the prompt and after.

    prompt_len: an int (every row's prompt has that length) or a (B,) tensor of per-row lengths;
    stop_ids: one token id or several.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    prompt_len = torch.as_tensor(prompt_len, device=tokens.device).reshape(-1, 1)   # (B, 1) or (1, 1)
    in_completion = positions[None, :] >= prompt_len                                # (B, T)
    stop = torch.as_tensor(stop_ids, device=tokens.device).reshape(-1)
    is_eos = (torch.isin(tokens, stop) & in_completion).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0          # strictly after the first eos
    return (in_completion & ~after_eos).float()


def completion_logprobs(model, tokens, prompt_len, mask, temperature=1.0):
    """Per-token log pi(y_t | x, y_<t) of the completion, and the per-token entropy.

    tokens: (B, T) prompt + completion; mask: (B, T) from completion_mask. Returns
    (logp, entropy), both (B, T-1) aligned with tokens[:, 1:] and zero outside the mask; the
    sequence log-probability log pi(y|x) is logp.sum(-1). Logits are divided by the sampling
    temperature so these are the log-probabilities of the distribution that was sampled.
    """
    logits = model(tokens[:, :-1]).float() / temperature                  # (B, T-1, V)
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)            # (B, T-1)
    with torch.no_grad():                 # a diagnostic (logged): the loss never differentiates it
        entropy = -(logp_all.exp() * logp_all).sum(-1)                    # (B, T-1)
    m = mask[:, 1:]
    return logp * m, entropy * m
