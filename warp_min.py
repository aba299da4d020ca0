"""warp-min: WARP (Weight Averaged Rewarded Policies, Rame et al. 2024, arXiv 2406.16768), minimal.

Read top to bottom; each section is one step of the paper's Algorithm 1:

    theta_init <- theta_sft
    for i in 1..I:                                        # iterations          -> warp()
        for m in 1..M (independent seeds):                # M RL fine-tunings   -> train_policy()
            theta_m <- theta_init ; theta_ema <- theta_init
            for t in 1..T:
                y ~ pi_theta_m(.|x)                                             -> rl_step()
                r_beta = r(x, y) - beta * log(pi_theta_m(y|x) / pi_theta_ema(y|x))
                REINFORCE step on r_beta
                theta_ema <- (1 - mu) * theta_ema + mu * theta_m                -> ema_update()
        theta_slerp <- SLERP(theta_init, {theta_m}, lambda)   # per layer          -> slerp()
        theta_init  <- (1 - eta) * theta_init + eta * theta_slerp                  -> liti()

Every choice the paper leaves open is marked "choice:" (grep for it). The CLI is at the bottom:
`python warp_min.py` runs the toy demo; `--help` lists every setting; `--init DIR` starts the same
loop from a Hugging Face Gemma checkpoint instead of the toy SFT model (theta_sft_of()).
`python warp_min.py merge` merges real checkpoints (checkpoints.py); `python warp_min.py reproduce`
tests each claim of the paper on the toy task (reproduce.py).
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import torch

import hf_io
import parallel
import resume as resume_io
from model import ModelConfig, Transformer, completion_logprobs, completion_mask, config_from_hf
from reward import quality, reward, reward_breakdown
from toy_tasks import reviews
from toy_tasks.report import load_rows
from toy_tasks.tokenizer import ToyTokenizer, encode, eot_id

# ----------------------------------------------------------------------------------------------
# Weight-space operations: EMA, SLERP of task vectors, LITI. Pure functions on state dicts.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(anchor, online, mu):
    """theta_ema <- (1 - mu) * theta_ema + mu * theta, in place (paper Sec. 3.1, the EMA anchor).

    anchor, online: nn.Modules with the same parameter names (or state dicts of tensors). The
    anchor may be kept in a wider dtype than the policy (bf16 policy, fp32 anchor): a bf16 update
    with mu = 0.01 would round to zero.
    """
    anchor_sd = anchor.state_dict() if hasattr(anchor, "state_dict") else anchor
    online_sd = online.state_dict() if hasattr(online, "state_dict") else online
    for name, a in anchor_sd.items():
        a.mul_(1.0 - mu).add_(online_sd[name].to(a.dtype), alpha=mu)


def group_of(name, granularity):
    """Which SLERP group a tensor belongs to.

    "layer" (the paper's: "SLERP is applied layer by layer, each having a different angle"): all
    tensors of one transformer block `...layers.N.*` share an angle; every tensor outside the
    blocks (embeddings, final norm) is a group of its own. "tensor": one angle per tensor (what
    mergekit's nuslerp does). "model": one angle for the whole network.
    """
    if granularity == "tensor":
        return name
    if granularity == "model":
        return "model"
    if granularity == "layer":
        block = re.match(r"^(.*\blayers\.\d+)\.", name)
        return block.group(1) if block else name
    raise ValueError(f"unknown granularity {granularity!r} (choose layer, tensor or model)")


@torch.no_grad()
def tensor_gram(init, policies, chunk=1 << 18):
    """Gram matrix G[a, b] = <delta_a, delta_b> of one tensor's task vectors delta_m = theta_m - theta_init.

    Accumulated in float64, `chunk` elements at a time, so memory stays bounded for huge tensors
    (fp32 reductions over ~1e8 elements drift by ~1e-2 relative). choice: chunks of 2^18 keep the
    float64 matmul's own rounding below 1e-13 relative (it grows with the chunk length).
    """
    M = len(policies)
    gram = torch.zeros(M, M, dtype=torch.float64)
    flat_init = init.reshape(-1)
    flat_pols = [p.reshape(-1) for p in policies]
    for start in range(0, flat_init.numel(), chunk):
        base = flat_init[start:start + chunk].to(torch.float64)
        deltas = torch.empty(M, base.numel(), dtype=torch.float64, device=base.device)
        for m, p in enumerate(flat_pols):          # fill in place: no per-policy temporaries
            deltas[m].copy_(p[start:start + chunk]).sub_(base)
        gram += (deltas @ deltas.T).cpu()
    return gram


def task_vector_gram(init, policies, granularity="layer"):
    """{group: G} with G the float64 Gram matrix of the task vectors, summed over the group's tensors.

    Summed in sorted name order, so the bits do not depend on the order of the dict (a state dict
    read back from a file comes out sorted).
    """
    grams = {}
    for name, t in sorted(init.items()):
        g = group_of(name, granularity)
        grams[g] = grams.get(g, 0) + tensor_gram(t, [p[name] for p in policies])
    return grams


def slerp_pair_weights(dot, norm_a, norm_b, lam, eps=1e-6):
    """Coefficients (w_a, w_b) of SLERP between two task vectors (paper Eq. 3):

        Omega = arccos(<d_a, d_b> / (|d_a| |d_b|))
        slerp = theta_init + sin((1 - lam) Omega) / sin Omega * d_a + sin(lam Omega) / sin Omega * d_b

    lam = 0 gives d_a, lam = 1 gives d_b. Falls back to LERP (1 - lam, lam) when a task vector is
    zero or the two are (anti-)colinear (sin Omega < eps): never a division by zero.
    Returns (w_a, w_b, omega, used_lerp).
    """
    if norm_a <= 0.0 or norm_b <= 0.0:
        return 1.0 - lam, lam, float("nan"), True
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    omega = math.acos(cos)
    if math.sin(omega) < eps:
        return 1.0 - lam, lam, omega, True
    s = math.sin(omega)
    return math.sin((1.0 - lam) * omega) / s, math.sin(lam * omega) / s, omega, False


def merge_coefficients(gram, lam=None, method="slerp"):
    """Coefficients c (float64, one per policy) such that merged = theta_init + sum_m c_m delta_m.

    M = 2: lam weights the second policy (None = 0.5). M > 2: sequential merging as in the paper,
    the m-th policy (1-based) merged into the running result with lam = 1/m. Under LERP that gives
    every policy weight 1/M, whatever the order. Under SLERP it does not: for orthogonal task vectors
    of equal norm, M = 3 gives coefficients (0.612, 0.612, 0.5) -- the norm is kept, the weights are
    not equal -- so the result depends on the order of the policies, orthogonal or not.
    Because the running result is a linear combination of task vectors, every dot product it needs
    comes from the Gram matrix alone -- which is what lets a streaming merge read each tensor twice
    and never hold a whole model.
    Returns (c, omegas, n_lerp_fallbacks).
    """
    M = gram.shape[0]
    if lam is not None and M != 2:
        raise ValueError(f"lam is only defined for M = 2 policies (got M = {M}); M > 2 uses 1/m")
    c = torch.zeros(M, dtype=torch.float64)
    c[0] = 1.0
    omegas, fallbacks = [], 0
    for m in range(1, M):
        step_lam = (0.5 if lam is None else lam) if M == 2 else 1.0 / (m + 1)
        if method == "lerp":
            w_a, w_b = 1.0 - step_lam, step_lam
        else:
            dot = float(c @ gram[:, m])
            norm_a = math.sqrt(max(float(c @ gram @ c), 0.0))
            norm_b = math.sqrt(max(float(gram[m, m]), 0.0))
            w_a, w_b, omega, used_lerp = slerp_pair_weights(dot, norm_a, norm_b, step_lam)
            omegas.append(omega)
            fallbacks += used_lerp
        c = c * w_a
        c[m] += w_b
    return c, omegas, fallbacks


@torch.no_grad()
def combine(init, policies, coefficients):
    """theta_init + sum_m c_m (theta_m - theta_init) for one tensor, returned in the input dtype."""
    acc_dtype = torch.float64 if init.dtype == torch.float64 else torch.float32
    base = init.to(acc_dtype)
    out, delta = base.clone(), torch.empty_like(base)
    for c, p in zip(coefficients.tolist(), policies):
        out.add_(delta.copy_(p).sub_(base), alpha=c)
    return out.to(init.dtype)


def _merge(init, policies, lam, granularity, method):
    grams = task_vector_gram(init, policies, granularity)
    coefs = {g: merge_coefficients(G, lam, method)[0] for g, G in grams.items()}
    return {name: combine(t, [p[name] for p in policies], coefs[group_of(name, granularity)])
            for name, t in init.items()}


def slerp(init, policies, lam=None, granularity="layer"):
    """SLERP of task vectors (paper Sec. 3.2): state dicts in (name -> tensor), a new state dict out.

    One angle per group (see group_of); dot products and norms in float64 (task_vector_gram);
    coefficients from merge_coefficients; output in the input dtype.
    """
    return _merge(init, policies, lam, granularity, "slerp")


def lerp(init, policies, lam=None, granularity="layer"):
    """Linear interpolation of task vectors, same signature as slerp (for comparison).

    M = 2: theta_init + (1 - lam) d_1 + lam d_2; M > 2: the plain average of the policies.
    """
    return _merge(init, policies, lam, granularity, "lerp")


@torch.no_grad()
def liti(init, merged, eta):
    """LITI (paper Sec. 3.3): theta_eta = (1 - eta) * theta_init + eta * theta_merged, per tensor."""
    out = {}
    for name, t in init.items():
        acc = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        out[name] = ((1.0 - eta) * acc + eta * merged[name].to(acc.dtype)).to(t.dtype)
    return out


def cosine_report(init, policies, granularity):
    """Cosine similarity between the task vectors of the first two policies, per group."""
    report = {}
    for group, G in task_vector_gram(init, policies[:2], granularity).items():
        denom = math.sqrt(float(G[0, 0]) * float(G[1, 1]))
        report[group] = float(G[0, 1]) / denom if denom > 0 else float("nan")
    return report


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass; every field becomes a CLI flag whose help is the field's doc.
# ----------------------------------------------------------------------------------------------


def arg(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    # run
    out: str = arg("", "output directory (default: runs/<preset>)")
    cache_dir: str = arg("runs/.cache", "where theta_sft is cached, keyed by the SFT config")
    seed: int = arg(0, "master seed: model init, data order, sampling and evaluation all derive from it")
    device: str = arg("auto", "cpu, cuda or auto")
    threads: int = arg(2, "torch CPU threads per process (SFT's larger batches use two; RL steps are as fast "
                       "with one); under torchrun at most cores / processes")
    workers: int = arg(1, "processes for the M runs of an iteration (launches torchrun; 1 = one after the other)")
    # the policy network (model.py)
    n_layer: int = arg(4, "transformer blocks (= SLERP groups under granularity=layer)")
    d_model: int = arg(128, "residual width")
    n_head: int = arg(4, "query heads")
    n_kv_head: int = arg(4, "key/value heads (= n_head: multi-head, as Gemma 7B; 1 = multi-query, as Gemma 2B)")
    head_dim: int = arg(32, "width of one attention head")
    d_ff: int = arg(512, "GeGLU hidden width")
    # supervised pre-training on the toy corpus -> theta_sft
    sft_steps: int = arg(800, "SFT optimizer steps")
    sft_lr: float = arg(3e-3, "SFT peak learning rate (AdamW, linear warmup then cosine decay)")
    sft_batch: int = arg(32, "SFT windows per step")
    sft_seq_len: int = arg(64, "SFT window length in tokens")
    sft_docs: int = arg(20000, "reviews in the SFT corpus")
    # WARP (paper Algorithm 1)
    iterations: int = arg(2, "I: WARP iterations (each: M runs -> SLERP -> LITI)")
    runs: int = arg(2, "M: independent RL runs per iteration")
    steps: int = arg(200, "T: RL steps per run")
    beta: float = arg(0.1, "beta: KL coefficient in r_beta = r - beta * log(pi / pi_ema)")
    mu: float = arg(0.01, "mu: EMA rate of the anchor, theta_ema <- (1-mu) theta_ema + mu theta")
    lam: float = arg(0.5, "lambda: SLERP interpolation weight of the second policy (M = 2)")
    eta: float = arg(0.3, "eta: LITI step, theta_init <- (1-eta) theta_init + eta theta_slerp")
    granularity: str = arg("layer", "SLERP angle per: layer (paper), tensor (mergekit nuslerp) or model")
    # the RL step
    lr: float = arg(3e-4, "Adam learning rate after warmup")
    warmup: int = arg(20, "linear learning-rate warmup steps")
    grad_clip: float = arg(1.0, "gradient norm clipping")
    prompts_per_step: int = arg(2, "distinct prompts per RL step (small batches: noisier, more diverse runs)")
    samples_per_prompt: int = arg(4, "k completions per prompt (leave-one-out baseline needs k >= 2)")
    temperature: float = arg(1.0, "sampling temperature (paper: 0.9)")
    max_new_tokens: int = arg(32, "completion length limit in tokens")
    log_every: int = arg(25, "print and log a training line every N steps")
    # evaluation
    eval_prompts: int = arg(128, "size of the fixed evaluation prompt set")
    eval_samples: int = arg(2, "completions per evaluation prompt")
    eval_every: int = arg(50, "evaluate each run every N steps (its trajectory on the Pareto plot)")
    etas: str = arg("0,0.1,0.3,0.5,0.8,1", "eta values of the LITI front drawn for each iteration")
    baseline: bool = arg(True, "also train plain RL with the SFT anchor (I*T steps) for comparison")
    # crash safety
    checkpoint_every: int = arg(50, "write OUT/checkpoint.safetensors every N RL steps and after every run "
                                "(0: only after runs); `demo --resume OUT` continues from it")
    max_skips: int = arg(10, "stop after this many consecutive steps with a non-finite loss or gradient")
    allow_extrapolation: bool = arg(False, "allow --eta / --etas above 1 (LITI then extrapolates past the merge)")
    # starting from a real checkpoint instead of the toy SFT model
    init: str = arg("", "Hugging Face Gemma checkpoint directory (config.json, safetensors, tokenizer.json) "
                    "used as theta_sft: SFT is skipped, the model flags (--n-layer .. --d-ff) and the --sft-* "
                    "flags are ignored, prompts are encoded with its tokenizer; the task stays the toy reviews")
    dtype: str = arg("auto", "policy weights: float32, bfloat16 (Adam and the EMA anchor then keep fp32 copies), "
                     "or auto = float32 for the toy, the checkpoint's own dtype if bfloat16 with --init")


PRESETS = {
    # tests and a first look: must finish within ~60 s on 2 CPU cores
    "quick": dict(n_layer=2, d_model=64, head_dim=16, d_ff=256, sft_steps=150, sft_docs=3000,
                  iterations=1, steps=40, lr=1e-3, log_every=10, eval_every=20, eval_prompts=32, eval_samples=2,
                  etas="0,0.5,1"),
    # the README demo: within 5 minutes on 2 CPU cores
    "default": dict(),
}


def run_seed(seed, iteration, run):
    """Each run's seed depends only on (seed, iteration, run index) -- never on process layout."""
    return seed * 1_000_003 + iteration * 1_009 + run


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config(cfg: Config) -> ModelConfig:
    """The policy network's shape: the toy flags, or with --init the checkpoint's config.json."""
    if cfg.init:
        return config_from_hf(hf_io.read_config(cfg.init))
    return ModelConfig(vocab_size=len_vocab(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, d_model=cfg.d_model, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                       max_seq_len=cfg.sft_seq_len + cfg.max_new_tokens + 16)


def len_vocab():
    return eot_id() + 1


@functools.lru_cache(maxsize=None)
def load_tokenizer(init=""):
    """The toy BPE, or with --init the checkpoint's tokenizer.json (hf_tokenizer.py). Both offer
    encode_prompt(text), decode(ids) and eos_id, which is all sampling and evaluation use."""
    if not init:
        return ToyTokenizer()
    import hf_tokenizer
    return hf_tokenizer.load(init)


def tokenizer(cfg: Config):
    return load_tokenizer(cfg.init)


def policy_dtype(cfg: Config):
    """--dtype. choice: auto = float32 for the toy; with --init the checkpoint's dtype if it is
    bfloat16 (released Gemmas are; the paper trains in bf16), else float32 (an fp16 policy would need
    loss scaling, which warp-min does not do)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if cfg.init:
        hf = hf_io.read_config(cfg.init)
        saved = hf.get("dtype") or hf.get("torch_dtype") or (hf.get("text_config") or {}).get("dtype")
        return torch.bfloat16 if saved == "bfloat16" else torch.float32
    return torch.float32


def build_model(cfg: Config, state=None, device="cpu", seed=0):
    """A network holding `state`, in the policy dtype (--dtype); or, without a state, a random fp32
    one from `seed` (the toy SFT's starting point)."""
    if state is None:
        return Transformer(model_config(cfg), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.device("meta"):  # no random init that load_state_dict would overwrite (billions, for a real model)
        model = Transformer(model_config(cfg))
    model = model.to(policy_dtype(cfg)).to_empty(device=device)
    model.build_rope_tables(device)   # the rotary tables are not in the state dict
    model.load_state_dict(state)      # copies, rounding fp32 weights (master weights, EMA) to a bf16 policy
    return model


# ----------------------------------------------------------------------------------------------
# theta_sft: supervised pre-training on the toy corpus (cached).
# ----------------------------------------------------------------------------------------------


def sft_cache_path(cfg: Config):
    keys = ["seed", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff",
            "sft_steps", "sft_lr", "sft_batch", "sft_seq_len", "sft_docs", "max_new_tokens"]
    key = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True)
    return os.path.join(cfg.cache_dir, f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")


def warmup_cosine(step, warmup, total):
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_sft(cfg: Config, device, log=print):
    """Next-token prediction on random windows of the corpus (nanoGPT-style). Returns theta_sft."""
    from safetensors.torch import load_file
    path = sft_cache_path(cfg)
    if os.path.exists(path):
        log(f"theta_sft: cached {path}")
        return load_file(path)
    gen = torch.Generator().manual_seed(run_seed(cfg.seed, -1, 0))
    data = torch.tensor(encode(reviews.corpus(cfg.sft_docs, seed=cfg.seed)), dtype=torch.long)
    model = build_model(cfg, device=device, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.sft_steps // 10, cfg.sft_steps))
    t0 = time.time()
    for step in range(cfg.sft_steps):
        starts = torch.randint(0, len(data) - cfg.sft_seq_len - 1, (cfg.sft_batch,), generator=gen)
        batch = torch.stack([data[s:s + cfg.sft_seq_len + 1] for s in starts.tolist()]).to(device)
        logits = model(batch[:, :-1])                                             # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.sft_steps - 1:
            log(f"sft step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:5.1f}s")
    state = cpu_state(model)
    os.makedirs(cfg.cache_dir, exist_ok=True)
    hf_io.save_atomic(state, path)   # a killed run never leaves a half-written cache entry
    return state


def theta_sft_of(cfg: Config, device, log=print):
    """theta_sft in the policy dtype: the toy SFT model (trained or cached), or with --init the
    checkpoint's weights as they are (it is taken to be SFT'd already; no SFT is run)."""
    if cfg.init:
        log(f"theta_sft: the checkpoint {cfg.init} ({str(policy_dtype(cfg)).removeprefix('torch.')}; SFT skipped)")
        model = Transformer.from_pretrained(cfg.init, dtype=policy_dtype(cfg))   # on the CPU, as every state
        return {name: t.detach() for name, t in model.state_dict().items()}
    return {name: t.to(policy_dtype(cfg)) for name, t in train_sft(cfg, device, log).items()}


# ----------------------------------------------------------------------------------------------
# Sampling and scoring: the pieces shared by the RL step and evaluation.
# ----------------------------------------------------------------------------------------------


def sample(policy, prompts, cfg: Config, generator, device):
    """Sample completions; returns tokens (B, T), mask (B, T), completion texts, finished flags.

    A real tokenizer gives prompts of different token lengths. They are sampled in groups of one
    length, and the rows right-padded with eos into one batch whose mask starts at each row's own
    prompt length and stops at its first eos or its last sampled token. No attention mask is
    needed: the model is causal, so padding after a row never changes the log-probabilities of the
    row's own tokens. (The toy prompts all have one token length: one group, no padding.)
    """
    tok = tokenizer(cfg)
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    groups = {}                                                           # prompt length -> row indices
    for i, ids in enumerate(prompt_ids):
        groups.setdefault(len(ids), []).append(i)
    policy.eval()
    rows = [None] * len(prompts)
    for index in groups.values():
        batch = torch.tensor([prompt_ids[i] for i in index], dtype=torch.long, device=device)     # (b, T0)
        sampled = policy.generate(batch, cfg.max_new_tokens, temperature=cfg.temperature,
                                  generator=generator, eos_id=tok.eos_id)
        for i, row in zip(index, sampled):
            rows[i] = row
    tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tok.eos_id)  # (B, T)
    prompt_len = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    sampled_len = torch.tensor([len(row) for row in rows], device=device)
    positions = torch.arange(tokens.shape[1], device=device)
    mask = completion_mask(tokens, prompt_len, tok.eos_id) * (positions[None, :] < sampled_len[:, None])
    texts, finished = [], []
    for row, start in zip(rows, prompt_len.tolist()):
        completion = row[start:].tolist()
        end = completion.index(tok.eos_id) if tok.eos_id in completion else len(completion)
        texts.append(tok.decode(completion[:end]).strip())
        finished.append(end < len(completion))
    return tokens, mask, texts, finished


def sequence_logprob(model, tokens, mask, cfg: Config):
    """log pi(y|x): completion log-probabilities summed over tokens, (B,). Also per-token entropy."""
    logp, entropy = completion_logprobs(model, tokens, 0, mask, cfg.temperature)
    return logp.sum(-1), entropy


@torch.no_grad()
def evaluate(policy, sft_model, cfg: Config, device, prompts=None):
    """Score a policy on the fixed evaluation set, with a fixed sampling seed.

    Every model is scored on the same prompts with the same random numbers (so differences
    between models are not sampling noise), and the generator is private: evaluating more or
    less often never changes training. KL(pi || pi_sft) is the k1 estimator summed over the
    completion's tokens, log pi(y|x) - log pi_sft(y|x) with y ~ pi, reported per sequence.
    """
    prompts = prompts or [p for p in reviews.eval_prompts(cfg.eval_prompts) for _ in range(cfg.eval_samples)]
    gen = torch.Generator(device=device).manual_seed(run_seed(cfg.seed, -2, 0))
    tokens, mask, texts, finished = sample(policy, prompts, cfg, gen, device)
    logp, _ = sequence_logprob(policy, tokens, mask, cfg)
    logp_sft, _ = sequence_logprob(sft_model, tokens, mask, cfg)
    r, kl, q = reward(prompts, texts), (logp - logp_sft).cpu(), quality(prompts, texts, finished)
    n = len(prompts)
    return {"reward": r.mean().item(), "reward_se": r.std().item() / math.sqrt(n),
            "kl": kl.mean().item(), "kl_se": kl.std().item() / math.sqrt(n), "quality": q.mean().item(),
            **{f"r_{k}": v for k, v in reward_breakdown(prompts, texts).items()}}


# ----------------------------------------------------------------------------------------------
# One RL fine-tuning (the inner loop of Algorithm 1): REINFORCE on the KL-shaped reward,
# with the EMA anchor updated after every step.
# ----------------------------------------------------------------------------------------------


class MixedPrecision:
    """fp32 master weights and an fp32 EMA anchor for a bf16 policy.

    Adam updates `master`, an fp32 copy of the policy's parameters, which is then copied (rounded)
    into the bf16 policy: a step of lr 1e-6 is far below bf16's resolution (~0.4% of a weight) and
    applied to bf16 weights would mostly round away. `ema` is the anchor theta_ema in fp32, for the
    same reason: in bf16, theta_ema + mu (theta - theta_ema) with mu = 0.01 rounds back to theta_ema.
    choice: the EMA averages the fp32 master weights (the optimizer's theta), not their bf16 copy.
    choice: forward passes of the anchor use a bf16 copy of `ema`, refreshed every step, so the KL
    compares two models computed at the same precision (an fp32 anchor against a bf16 policy would
    show a KL made of rounding noise at step 1, when both hold the same weights).
    """

    def __init__(self, policy, anchor):
        self.master = {name: p.detach().float().clone().requires_grad_() for name, p in policy.named_parameters()}
        self.ema = {name: t.detach().float().clone() for name, t in anchor.state_dict().items()}

    @torch.no_grad()
    def step(self, policy, anchor, optimizer, grad_clip, mu):
        """Clip and Adam-step in fp32, copy into the policy, EMA in fp32, refresh the anchor; returns the grad norm."""
        for name, p in policy.named_parameters():
            self.master[name].grad = None if p.grad is None else p.grad.float()
            p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.master.values()), grad_clip)
        if not torch.isfinite(grad_norm):                  # skipped step: nothing changes
            return grad_norm
        optimizer.step()
        for name, p in policy.named_parameters():
            p.copy_(self.master[name])
        ema_update(self.ema, self.master, mu)                 # theta_ema <- (1-mu) theta_ema + mu theta, fp32
        for name, a in anchor.state_dict().items():
            a.copy_(self.ema[name])
        return grad_norm


def rl_step(policy, anchor, optimizer, prompts, cfg: Config, generator, device, sft_model=None, mixed=None):
    """One policy-gradient step (paper Eq. 2 with the EMA anchor of Sec. 3.1). Returns stats.

    r_beta(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ema(y|x))      sequence-level, whole completion
    loss = -mean_i[ (r_beta_i - b_i) * log pi(y_i|x_i) ]              REINFORCE

    mixed: a MixedPrecision when the policy is bf16 (the optimizer then holds its fp32 master weights).
    """
    t0 = time.time()
    tokens, mask, texts, finished = sample(policy, prompts, cfg, generator, device)
    policy.train()
    logp, entropy = sequence_logprob(policy, tokens, mask, cfg)             # (B,), with gradient
    with torch.no_grad():
        logp_anchor, _ = sequence_logprob(anchor, tokens, mask, cfg)
        kl_to_sft = (logp - sequence_logprob(sft_model, tokens, mask, cfg)[0]) if sft_model else None
    r = reward(prompts, texts).to(device)
    kl_to_anchor = (logp - logp_anchor).detach()            # k1 estimate of KL(pi || pi_ema), per sequence
    reward_shaped = r - cfg.beta * kl_to_anchor
    # choice: REINFORCE baseline = leave-one-out mean of the other k-1 samples of the same prompt
    # (RLOO). It is unbiased (b_i does not depend on y_i) and needs no value network.
    k = cfg.samples_per_prompt
    grouped = reward_shaped.view(-1, k)                       # (prompts, k): samples of a prompt are adjacent
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    advantage = (grouped - baseline).view(-1)
    loss = -(advantage * logp).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if mixed is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:                                       # a non-finite step changes nothing
            optimizer.step()
            ema_update(anchor, policy, cfg.mu)                # theta_ema <- (1-mu) theta_ema + mu theta
    else:                                                     # bf16 policy: the same three lines in fp32
        grad_norm = mixed.step(policy, anchor, optimizer, cfg.grad_clip, cfg.mu)
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
    n_tokens = int(mask.sum().item())
    return {"reward": r.mean().item(), "reward_shaped": reward_shaped.mean().item(),
            "kl_anchor": kl_to_anchor.mean().item(),
            "kl_sft": kl_to_sft.mean().item() if kl_to_sft is not None else None,
            "entropy": (entropy.sum() / mask[:, 1:].sum()).item(), "grad_norm": grad_norm.item(), "skipped": skipped,
            "tok_s": n_tokens / (time.time() - t0)}


def train_policy(cfg: Config, init_state, sft_state, seed, steps, anchor="ema", tag=None, log=print, emit=None,
                 resume=None, on_checkpoint=None):
    """One independent RL run from theta_init; returns its final weights and its final anchor
    (for a bf16 policy: the fp32 master weights and the fp32 EMA, see MixedPrecision).

    No state is shared with other runs: models, optimizer and random generators are built here from
    `seed`, so the M runs of an iteration can go to separate processes and give the same result.
    anchor="ema": KL towards the EMA of the policy (WARP). anchor="sft": KL towards the fixed
    theta_sft (plain RLHF, the baseline; mu is then 0). `emit(row)` receives logged metrics.
    Crash safety (resume.py): every cfg.checkpoint_every steps the run's whole state goes to
    `on_checkpoint`; `resume` is such a state, from which the run continues bit for bit.
    """
    tag = tag or {}
    device = resolve_device(cfg.device)
    policy = build_model(cfg, init_state, device)
    anchor_model = build_model(cfg, init_state if anchor == "ema" else sft_state, device).requires_grad_(False)
    sft_model = build_model(cfg, sft_state, device).requires_grad_(False)
    step_cfg = dataclasses.replace(cfg, mu=cfg.mu if anchor == "ema" else 0.0)
    low_precision = policy.model.embed_tokens.weight.dtype != torch.float32
    mixed = MixedPrecision(policy, anchor_model) if low_precision else None
    # choice: Adam with linear warmup then a constant rate, as the paper (no decay).
    optimizer = torch.optim.Adam(mixed.master.values() if mixed else policy.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    prompt_rng = random.Random(seed)
    sample_gen = torch.Generator(device=device).manual_seed(seed)
    done, skips = 0, 0
    if resume is not None:
        done, skips = resume_io.unpack_run(*resume, policy, anchor_model, optimizer, schedule, prompt_rng,
                                           sample_gen, mixed)
    t0 = time.time()
    for step in range(done + 1, steps + 1):
        prompts = [p for p in reviews.train_prompts(cfg.prompts_per_step, prompt_rng)
                   for _ in range(cfg.samples_per_prompt)]
        logging = step % cfg.log_every == 0 or step == steps
        stats = rl_step(policy, anchor_model, optimizer, prompts, step_cfg, sample_gen, device,
                        sft_model if logging else None, mixed)
        schedule.step()
        skips = skips + 1 if stats["skipped"] else 0
        if stats["skipped"]:
            log(f"  {tag_str(tag)} step {step}: non-finite loss or gradient, step skipped ({skips} in a row)")
            emit and emit({"kind": "skipped", **tag, "step": step})
        if skips >= cfg.max_skips:
            raise TrainingError(f"{tag_str(tag)}: {skips} consecutive steps with a non-finite loss or gradient "
                                f"(last at step {step}); the last checkpoint before them is intact")
        if logging:
            eta_s = (time.time() - t0) / (step - done) * (steps - step)
            log(f"  {tag_str(tag)} step {step:4d}/{steps}  reward {stats['reward']:6.3f}  "
                f"kl_anchor {stats['kl_anchor']:6.2f}  kl_sft {stats['kl_sft']:6.2f}  "
                f"entropy {stats['entropy']:.2f}  {stats['tok_s']:6.0f} tok/s  ETA {eta_s:4.0f}s")
            emit and emit({"kind": "train", **tag, "step": step, **stats})
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
            emit and emit({"kind": "trajectory", **tag, "step": step, **evaluate(policy, sft_model, cfg, device)})
        if on_checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            on_checkpoint(resume_io.pack_run(step, policy, anchor_model, optimizer, schedule, prompt_rng,
                                             sample_gen, skips, mixed))
    if mixed:  # choice: a bf16 run's theta_m is its fp32 master weights, so its task vector (lr 1e-6
        # steps) is not swamped by bf16 rounding; merges still come out in theta_init's dtype (bf16)
        return ({k: v.detach().cpu().clone() for k, v in mixed.master.items()},
                {k: v.cpu().clone() for k, v in mixed.ema.items()})
    return cpu_state(policy), cpu_state(anchor_model)


class TrainingError(Exception):
    """Training cannot go on (e.g. only non-finite steps): one line on stderr, exit status 1."""


def cpu_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def tag_str(tag):
    return " ".join(f"{k}={v}" for k, v in tag.items())


# ----------------------------------------------------------------------------------------------
# WARP: I iterations of (M runs -> SLERP -> LITI), plus the evaluation of every stage.
# ----------------------------------------------------------------------------------------------


def warp(cfg: Config, log=print, resume=False):
    """Run the whole procedure on the toy task (from the toy SFT model, or from the --init checkpoint);
    returns a dict of results and writes cfg.out. resume=True continues from OUT/checkpoint.safetensors.
    Under torchrun the M runs of each iteration are spread over the ranks (parallel.py); rank 0
    does everything else and is the only one that writes files."""
    device = resolve_device(cfg.device)
    rank, world_size = parallel.init_from_env(device)
    lead = rank == 0
    checkpoint_path = os.path.join(cfg.out, "checkpoint.safetensors")
    saved, saved_states, saved_run = {}, {}, None   # progress, weights and run state of a checkpoint
    if resume and os.path.exists(checkpoint_path):
        saved, saved_states, saved_run = resume_io.load(checkpoint_path)
        log(f"resuming {cfg.out}: iteration {saved['iteration']}, {saved['finished']} finished run(s)"
            + (f", run in progress at step {saved_run[0]['step']}" if saved_run else ""))
    # metrics written after the checkpoint are dropped: the resumed run writes them again
    rows = load_rows(os.path.join(cfg.out, "metrics.jsonl"))[:saved["n_rows"]] if saved else []
    metrics_file = None
    if lead:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "w")
        metrics_file.writelines(json.dumps(row) + "\n" for row in rows)

    def emit(row):
        rows.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def checkpoint(iteration, finished, run=None):   # the loop's position + whatever resuming needs
        if lead:
            progress = {"iteration": iteration, "finished": len(finished), "n_rows": len(rows)}
            states = {"theta_init": theta_init, **{f"finished{m}": p for m, p in enumerate(finished)}}
            resume_io.save(checkpoint_path, progress, states, run)

    def all_cores():                      # rank 0 alone at work (others wait): every core it may use
        return parallel.using_threads(max(1, min(cfg.threads, os.cpu_count() or 1)))
    with all_cores():
        theta_sft = theta_sft_of(cfg, device, log) if lead or cfg.init else None  # toy SFT or the --init checkpoint
    if world_size > 1 and not cfg.init:
        template = {k: v.to(policy_dtype(cfg)) for k, v in cpu_state(build_model(cfg)).items()}
        theta_sft = parallel.share_state(theta_sft, 0, template, device)
    sft_model = build_model(cfg, theta_sft, device)
    models = {"sft": theta_sft}
    if not saved and lead:   # (the other ranks are already training: rank 0 keeps to its share of cores)
        emit({"kind": "eval", "label": "theta_sft", "iteration": 0, **evaluate(sft_model, sft_model, cfg, device)})
    etas = [float(e) for e in cfg.etas.split(",")]
    theta_init = saved_states.get("theta_init", theta_sft)
    for it in range(saved.get("iteration", 1), cfg.iterations + 1):
        log(f"iteration {it}/{cfg.iterations}: {cfg.runs} RL runs of {cfg.steps} steps from theta_init")
        policies = [saved_states[f"finished{m}"] for m in range(saved.pop("finished", 0))]   # after a resume
        trained, rows_by_run = {}, {}
        for m in range(len(policies), cfg.runs):
            if parallel.owner(m, world_size) != rank:
                continue
            finished = lambda: policies + [trained[k] for k in sorted(trained)]  # noqa: E731
            trained[m] = train_policy(
                cfg, theta_init, theta_sft, run_seed(cfg.seed, it, m), cfg.steps, tag={"iteration": it, "run": m},
                log=log, emit=emit if world_size == 1 else rows_by_run.setdefault(m, []).append,
                resume=saved_run, on_checkpoint=(lambda run: checkpoint(it, finished(), run)) if world_size == 1 else None)[0]
            saved_run = None                # only the first run after a resume continues a saved one
            if world_size == 1:             # under torchrun: checkpoints at iteration boundaries only
                checkpoint(it, finished())
        if world_size > 1:                  # the runs' weights meet on every rank, their metrics on rank 0
            for m in range(len(policies), cfg.runs):
                trained[m] = parallel.share_state(trained.get(m), parallel.owner(m, world_size), theta_init, device)
            for m, run_rows in sorted(parallel.gather_rows(rows_by_run).items()):
                for row in run_rows:
                    emit(row)
        policies += [trained[m] for m in sorted(trained)]
        if lead:
            with all_cores():
                theta_next = merge_and_evaluate(cfg, it, theta_init, theta_sft, policies, sft_model, etas, emit, log, rows)
        if world_size > 1:
            theta_next = parallel.share_state(theta_next if lead else None, 0, theta_init, device)
        theta_init = theta_next             # next iteration's init
        checkpoint(it + 1, [])
    if lead:
        models["warp"] = theta_init
        if cfg.init:  # choice: a checkpoint run writes a Hugging Face directory (instead of final.safetensors)
            save_checkpoint(build_model(cfg, theta_init), cfg.init, os.path.join(cfg.out, "final"))
        else:
            hf_io.save_atomic(theta_init, os.path.join(cfg.out, "final.safetensors"))

    if cfg.baseline:  # plain RL: fixed SFT anchor, same total number of steps as all WARP iterations
        baseline_rank, baseline_rows = world_size - 1, []    # under torchrun: the last rank trains it
        baseline_phase = cfg.iterations + 1      # the checkpoint's "iteration" while the baseline trains
        if rank == baseline_rank:
            log(f"baseline: plain RL with the SFT anchor, {cfg.iterations * cfg.steps} steps")
            models["plain"] = train_policy(
                cfg, theta_sft, theta_sft, run_seed(cfg.seed, 0, cfg.runs), cfg.iterations * cfg.steps,
                anchor="sft", tag={"iteration": 0, "run": "sft-anchor"}, log=log,
                emit=emit if world_size == 1 else baseline_rows.append, resume=saved_run,
                on_checkpoint=(lambda run: checkpoint(baseline_phase, [], run)) if world_size == 1 else None)[0]
        if world_size > 1:
            models["plain"] = parallel.share_state(models.get("plain"), baseline_rank, theta_sft, device)
            for row in parallel.gather_rows({"baseline": baseline_rows} if rank == baseline_rank else {}).get("baseline", []):
                emit(row)
    if not lead:
        return None                         # rank 0 writes the outputs
    metrics_file.close()
    from toy_tasks.report import summarize
    with all_cores():
        result = summarize(cfg, rows, models, lambda state: build_model(cfg, state, device), sample,
                           run_seed(cfg.seed, -3, 0), log)
    if os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)   # the run is complete: nothing left to resume
    return result


def merge_and_evaluate(cfg, it, theta_init, theta_sft, policies, sft_model, etas, emit, log, rows):
    """The end of an iteration: task-vector cosines, SLERP, the LITI front, and the next theta_init."""
    device = resolve_device(cfg.device)
    if cfg.runs >= 2:  # the paper's observation: task vectors ~orthogonal, full weights ~identical
        cos = {g: cosine_report(theta_init, policies, g) for g in ("model", "layer")}
        cos_full = cosine_report({k: torch.zeros_like(v) for k, v in theta_init.items()}, policies, "model")
        layer_cos = list(cos["layer"].values())
        log(f"  task-vector cosine(run 0, run 1): model {cos['model']['model']:.3f}, per group "
            f"{min(layer_cos):.3f}..{max(layer_cos):.3f}; full-weight cosine {cos_full['model']:.4f}")
        emit({"kind": "cosine", "iteration": it, "task_vector": cos["model"]["model"],
              "task_vector_per_group": cos["layer"], "full_weights": cos_full["model"]})
    theta_slerp = slerp(theta_init, policies, cfg.lam if cfg.runs == 2 else None, cfg.granularity)
    # the LITI front of this iteration, drawn from theta_sft as in the paper's figures
    for eta in etas:
        point = evaluate(build_model(cfg, liti(theta_sft, theta_slerp, eta), device), sft_model, cfg, device)
        emit({"kind": "front", "iteration": it, "eta": eta, **point})
    emit({"kind": "eval", "label": f"iter {it} SLERP", "iteration": it,
          **evaluate(build_model(cfg, theta_slerp, device), sft_model, cfg, device)})
    theta_next = liti(theta_init, theta_slerp, cfg.eta)   # LITI: the next iteration's init
    emit({"kind": "eval", "label": f"iter {it} LITI (eta={cfg.eta})", "iteration": it,
          **evaluate(build_model(cfg, theta_next, device), sft_model, cfg, device)})
    log(f"  iteration {it}: " + row_str(rows[-2]) + " | " + row_str(rows[-1]))
    return theta_next


def row_str(row):
    return f"{row['label']}: reward {row['reward']:.3f}, KL {row['kl']:.2f}, quality {row['quality']:.2f}"


def save_checkpoint(model, source, path):
    """The final model of an --init run as a Hugging Face directory that transformers loads:
    config.json + safetensors in the policy dtype, with the tokenizer files and token ids of `source`.
    Written into PATH.tmp, fsync'ed, then renamed into place: never a half-written directory."""
    import shutil
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    hf_io.carry_over(source, tmp)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line: `python warp_min.py [demo] [--preset quick] [--flag value ...]`,
#               `python warp_min.py merge --init A --policies B C --out D` (checkpoints.py).
# ----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A user mistake: reported as one line on stderr with exit status 2, never a traceback."""


def validate(cfg: Config):
    """One-line messages for settings that cannot work (checked before any work or write)."""
    checks = [
        (cfg.beta >= 0, "--beta", cfg.beta, "must be >= 0"),
        (0 <= cfg.mu <= 1, "--mu", cfg.mu, "must be in [0, 1]"),
        (0 <= cfg.lam <= 1, "--lam", cfg.lam, "must be in [0, 1]"),
        (0 <= cfg.eta <= (math.inf if cfg.allow_extrapolation else 1), "--eta", cfg.eta,
         "must be in [0, 1] (above 1 LITI extrapolates: pass --allow-extrapolation)"),
        (cfg.runs >= 1, "--runs", cfg.runs, "must be >= 1"),
        (cfg.iterations >= 1, "--iterations", cfg.iterations, "must be >= 1"),
        (cfg.steps >= 1, "--steps", cfg.steps, "must be >= 1"),
        (cfg.prompts_per_step >= 1, "--prompts-per-step", cfg.prompts_per_step, "must be >= 1"),
        (cfg.samples_per_prompt >= 2, "--samples-per-prompt", cfg.samples_per_prompt,
         "must be >= 2 (the leave-one-out baseline needs two samples per prompt)"),
        (cfg.temperature > 0, "--temperature", cfg.temperature, "must be > 0"),
        (cfg.threads >= 1, "--threads", cfg.threads, "must be >= 1"),
        (cfg.workers >= 1, "--workers", cfg.workers, "must be >= 1"),
        (cfg.sft_steps >= 1 and cfg.sft_batch >= 1, "--sft-batch", cfg.sft_batch, "and --sft-steps must be >= 1"),
        (cfg.checkpoint_every >= 0, "--checkpoint-every", cfg.checkpoint_every, "must be >= 0"),
        (cfg.max_skips >= 1, "--max-skips", cfg.max_skips, "must be >= 1"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "--device", cfg.device,
         "must be cpu, cuda or auto"),
        (cfg.granularity in ("layer", "tensor", "model"), "--granularity", cfg.granularity,
         "must be layer, tensor or model"),
        (cfg.n_head % max(cfg.n_kv_head, 1) == 0 and cfg.n_kv_head >= 1, "--n-kv-head", cfg.n_kv_head,
         "must be >= 1 and divide --n-head"),
        (cfg.eval_prompts >= 2 and cfg.eval_samples >= 1, "--eval-prompts", cfg.eval_prompts, "must be >= 2"),
        (cfg.dtype in ("auto", "float32", "bfloat16"), "--dtype", cfg.dtype, "must be float32, bfloat16 or auto"),
    ]
    for ok, flag, value, why in checks:
        if not ok:
            raise UsageError(f"{flag} {value}: {why}")
    try:
        etas = [float(e) for e in cfg.etas.split(",")]
    except ValueError:
        raise UsageError(f"--etas {cfg.etas!r}: must be comma-separated numbers")
    if not all(0 <= e <= (math.inf if cfg.allow_extrapolation else 1) for e in etas):
        raise UsageError(f"--etas {cfg.etas!r}: every eta must be in [0, 1] (or pass --allow-extrapolation)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.init:
        validate_checkpoint(cfg)


def validate_checkpoint(cfg: Config):
    """--init DIR: a Gemma checkpoint we can run, with a tokenizer whose ids fit its embedding."""
    if not os.path.isdir(cfg.init):
        raise UsageError(f"--init {cfg.init}: not a directory")
    try:
        model_cfg = model_config(cfg)      # config.json exists and is a Gemma warp-min runs
        hf_io.shard_files(cfg.init)        # the weights exist (shapes are checked when they are loaded)
        tok = tokenizer(cfg)               # tokenizer.json, the tokenizers package and an eos id
    except (OSError, ValueError) as e:
        raise UsageError(f"--init {cfg.init}: {e}") from None
    if tok.vocab_size > model_cfg.vocab_size or tok.eos_id >= model_cfg.vocab_size:
        raise UsageError(f"--init {cfg.init}: the tokenizer has {tok.vocab_size} tokens (eos {tok.eos_id}), "
                         f"more than the model's vocab_size {model_cfg.vocab_size}")
    longest = max(len(tok.encode_prompt(p)) for p in reviews.all_prompts()) + cfg.max_new_tokens
    if longest > model_cfg.max_seq_len:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens}: prompt + completion ({longest} tokens) "
                         f"exceeds the checkpoint's context of {model_cfg.max_seq_len}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):   # argparse's own errors (bad type, unknown flag) as one line too
        raise UsageError(message)


def parse_config(argv):
    """Settings from the command line -> (Config, resume?). Raises UsageError for any user mistake."""
    parser = ArgumentParser(
        prog="warp_min.py demo", description="WARP on the toy review task: SFT, then I x (M RL runs -> "
        "SLERP -> LITI), evaluation, a Pareto plot and a summary table. "
        "(`python warp_min.py merge --help`: merge real safetensors checkpoints; `python warp_min.py reproduce "
        "--help`: test each claim of the paper.)",
        epilog="--init DIR starts from a Hugging Face Gemma checkpoint instead of the toy SFT model: "
        "theta_sft = its weights (no SFT), the network comes from DIR/config.json (the model flags --n-layer "
        ".. --d-ff and the --sft-* flags are ignored), prompts are encoded and completions decoded with "
        "DIR/tokenizer.json (needs the optional tokenizers package), the task and reward stay the toy reviews, "
        "and the final model is written as a Hugging Face directory OUT/final/.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting settings: quick (~1 min, for tests) or default (the README demo)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into an existing --out")
    parser.add_argument("--resume", metavar="OUT", help="continue the killed run in OUT from its last checkpoint "
                        "(settings come from OUT/config.json; pass no other flag)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['doc']} (default: {f.default!r})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, help=f"{f.metadata['doc']} (default: {f.default!r})")
    args = parser.parse_args(argv)
    if args.resume:
        return resume_config(args.resume, argv), True
    settings = {**PRESETS[args.preset],
                **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}}
    cfg = Config(**settings)
    if not cfg.out:
        cfg.out = os.path.join("runs", args.preset)
    validate(cfg)
    first_rank = int(os.environ.get("RANK", "0")) == 0    # under torchrun, rank 0 may have created it already
    if first_rank and os.path.isdir(cfg.out) and os.listdir(cfg.out) and not args.overwrite:
        raise UsageError(f"--out {cfg.out}: directory exists and is not empty (pass --overwrite, or --resume it)")
    return cfg, False


def resume_config(out, argv):
    """The Config of the run in `out`, which must have something left to resume."""
    if [a for a in argv if a not in ("--resume", out, f"--resume={out}")]:
        raise UsageError("--resume OUT takes every setting from OUT/config.json: pass no other flag")
    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = Config(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--resume {out}: no readable warp_min config.json ({e})") from None
    if os.path.exists(os.path.join(out, "summary.md")) and not os.path.exists(os.path.join(out, "checkpoint.safetensors")):
        raise UsageError(f"--resume {out}: this run is already complete")
    cfg.out = out
    validate(cfg)
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        import checkpoints
        return checkpoints.merge_cli(argv[1:])
    if argv and argv[0] == "reproduce":
        import reproduce
        return reproduce.main(argv[1:])
    if argv and argv[0] == "demo":
        argv = argv[1:]
    try:
        cfg, resume = parse_config(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.workers > 1 and processes == 1 and not resume:
        return parallel.launch(cfg.workers, argv)          # the same command, under torchrun
    torch.set_flush_denormal(True)   # tiny weights make denormals; they slow CPU matmuls many-fold
    torch.set_num_threads(max(1, min(cfg.threads, (os.cpu_count() or 1) // processes)))  # no oversubscription
    t0 = time.time()
    try:
        warp(cfg, resume=resume)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    parallel.finish()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {time.time() - t0:.0f}s; outputs in {cfg.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
