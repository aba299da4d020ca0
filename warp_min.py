"""warp-min: WARP (Weight Averaged Rewarded Policies, Rame et al. 2024, arXiv 2406.16768), minimal.

Read top to bottom; each section is one step of the paper's Algorithm 1:

    theta_init <- theta_sft
    for i in 1..I:                                        # iterations          -> warp()
        for m in 1..M (independent seeds):                # M RL fine-tunings   -> train_policy()
            theta_m <- theta_init ; theta_ema <- theta_init
            for t in 1..T:
                y ~ pi_theta_m(.|x)                                             -> rl_step()
                r_beta = r(x, y) - beta * log(pi_theta_m(y|x) / pi_theta_ema(y|x))   -> reinforce_loss()
                REINFORCE step on r_beta
                theta_ema <- (1 - mu) * theta_ema + mu * theta_m                -> ema_update()
        theta_slerp <- SLERP(theta_init, {theta_m}, lambda)   # per layer          -> slerp()
        theta_init  <- (1 - eta) * theta_init + eta * theta_slerp                  -> liti()

Every choice the paper leaves open is marked "choice:". The network is model.py, the reward reward.py, the
reviews, tokenizer and SFT toy_tasks/. `python warp_min.py [--help]` runs the demo through warp_scale/, which
scales these same functions up (Hugging Face checkpoints, streaming merge, torchrun, resume, bf16).
"""

import dataclasses
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from model import ModelConfig, Transformer, completion_logprobs, completion_mask
from reward import quality, reward, reward_breakdown
from toy_tasks import reviews, sft
from toy_tasks.tokenizer import ToyTokenizer

# ---- Weight-space operations: EMA, SLERP of task vectors, LITI. Pure functions on state dicts. ----
@torch.no_grad()
def ema_update(anchor, online, mu):
    """theta_ema <- (1 - mu) * theta_ema + mu * theta, in place (paper Sec. 3.1, the EMA anchor), on modules
    or state dicts. The anchor may be wider than the policy (in bf16, mu = 0.01 rounds away: keep it fp32)."""
    anchor_sd = anchor.state_dict() if hasattr(anchor, "state_dict") else anchor
    online_sd = online.state_dict() if hasattr(online, "state_dict") else online
    for name, a in anchor_sd.items():
        a.mul_(1.0 - mu).add_(online_sd[name].to(a.dtype), alpha=mu)


def group_of(name, granularity):
    """Which tensors share one SLERP angle. "layer" (the paper's: "SLERP is applied layer by layer, each
    having a different angle"): the tensors of a block `...layers.N.*`; each tensor outside the blocks
    is a group of its own. "tensor": one angle per tensor (mergekit's nuslerp). "model": one angle."""
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
    """G[a, b] = <delta_a, delta_b> for one tensor's task vectors delta_m = theta_m - theta_init, in
    float64 (fp32 sums over ~1e8 elements drift by ~1e-2), `chunk` elements at a time (bounded memory).
    choice: chunks of 2^18 keep the float64 matmul's own rounding below 1e-13 relative."""
    M = len(policies)
    gram = torch.zeros(M, M, dtype=torch.float64)
    flat_init, flat_pols = init.reshape(-1), [p.reshape(-1) for p in policies]
    for start in range(0, flat_init.numel(), chunk):
        base = flat_init[start:start + chunk].to(torch.float64)
        deltas = torch.empty(M, base.numel(), dtype=torch.float64, device=base.device)
        for m, p in enumerate(flat_pols):
            deltas[m].copy_(p[start:start + chunk]).sub_(base)
        gram += (deltas @ deltas.T).cpu()
    return gram


def task_vector_gram(init, policies, granularity="layer"):
    """{group: Gram matrix of the task vectors over all of the group's tensors}, summed in name order."""
    grams = {}
    for name in sorted(init):
        group = group_of(name, granularity)
        grams[group] = grams.get(group, 0) + tensor_gram(init[name], [p[name] for p in policies])
    return grams


def slerp_pair_weights(dot, norm_a, norm_b, lam, eps=1e-6):
    """SLERP of two task vectors as coefficients (w_a, w_b) of d_a and d_b (paper Eq. 3):

        Omega = arccos(<d_a, d_b> / (|d_a| |d_b|))
        slerp = theta_init + sin((1 - lam) Omega) / sin Omega * d_a + sin(lam Omega) / sin Omega * d_b

    lam = 0 gives d_a, lam = 1 gives d_b. A zero or (anti-)colinear pair (sin Omega < eps) falls back
    to LERP (1 - lam, lam): never a division by zero. Returns (w_a, w_b, omega, used_lerp)."""
    if norm_a <= 0.0 or norm_b <= 0.0:
        return 1.0 - lam, lam, float("nan"), True
    omega = math.acos(max(-1.0, min(1.0, dot / (norm_a * norm_b))))
    if math.sin(omega) < eps:
        return 1.0 - lam, lam, omega, True
    return math.sin((1.0 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega), omega, False


def merge_coefficients(gram, lam=None, method="slerp"):
    """c (float64, one per policy) with merged = theta_init + sum_m c_m delta_m, from a group's Gram matrix.

    M = 2: lam weights the second policy (None = 0.5). M > 2: the paper merges sequentially, the m-th
    policy into the running result with lam = 1/m -- not an equal-weight merge under SLERP (orthogonal,
    equal-norm task vectors with M = 3 get 0.612, 0.612, 0.5), and order-dependent. The running result
    is a combination of task vectors: every dot it needs is in G. Returns (c, omegas, fallbacks)."""
    M = gram.shape[0]
    if lam is not None and M != 2:
        raise ValueError(f"lam is only defined for M = 2 policies (got M = {M}); M > 2 uses 1/m")
    c = torch.zeros(M, dtype=torch.float64)
    c[0] = 1.0
    omegas, fallbacks = [], 0
    for m in range(1, M):
        step_lam = (0.5 if lam is None else lam) if M == 2 else 1.0 / (m + 1)
        w_a, w_b = 1.0 - step_lam, step_lam
        if method == "slerp":   # the running merge c . delta against delta_m
            w_a, w_b, omega, used_lerp = slerp_pair_weights(
                float(c @ gram[:, m]), math.sqrt(max(float(c @ gram @ c), 0.0)),
                math.sqrt(max(float(gram[m, m]), 0.0)), step_lam)
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


def slerp(init, policies, lam=None, granularity="layer", method="slerp"):
    """SLERP of task vectors (paper Sec. 3.2), {name: tensor} state dicts in, a new one out: per group
    (group_of), the coefficients of slerp_pair_weights' formula from the group's float64 Gram matrix, then
    theta_init + sum_m c_m delta_m per tensor in the input dtype. method="lerp": linear, for comparison."""
    coefficients = {g: merge_coefficients(G, lam, method)[0]
                    for g, G in task_vector_gram(init, policies, granularity).items()}
    return {name: combine(t, [p[name] for p in policies], coefficients[group_of(name, granularity)])
            for name, t in init.items()}


def lerp(init, policies, lam=None, granularity="layer"):
    """theta_init + (1 - lam) d_1 + lam d_2 (M > 2: the average). SLERP shrinks nothing; this does."""
    return slerp(init, policies, lam, granularity, method="lerp")


@torch.no_grad()
def liti(init, merged, eta):
    """LITI (paper Sec. 3.3): theta_eta = (1 - eta) * theta_init + eta * theta_merged, per tensor."""
    out = {}
    for name, t in init.items():
        acc = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        out[name] = ((1.0 - eta) * acc + eta * merged[name].to(acc.dtype)).to(t.dtype)
    return out


def cosine_report(init, policies, granularity):
    """Cosine between the task vectors of the first two policies, per group."""
    report = {}
    for group, G in task_vector_gram(init, policies[:2], granularity).items():
        denom = math.sqrt(float(G[0, 0]) * float(G[1, 1]))
        report[group] = float(G[0, 1]) / denom if denom > 0 else float("nan")
    return report


# ---- Configuration (every field is a flag of `python warp_min.py`), the task, the network. ----
def arg(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    seed: int = arg(0, "master seed: SFT, each run's sampling and the evaluation all derive from it")
    device: str = arg("auto", "cpu, cuda or auto")
    # the policy network (model.py) and its supervised pre-training on the toy corpus -> theta_sft
    n_layer: int = arg(4, "transformer blocks (= SLERP groups under granularity=layer)")
    d_model: int = arg(128, "residual width")
    n_head: int = arg(4, "query heads")
    n_kv_head: int = arg(4, "key/value heads (= n_head: multi-head, as Gemma 7B; 1 = multi-query, as Gemma 2B)")
    head_dim: int = arg(32, "width of one attention head")
    d_ff: int = arg(512, "GeGLU hidden width")
    sft_steps: int = arg(500, "SFT optimizer steps (theta_sft quality 0.97 at 500 steps and at 800)")
    sft_lr: float = arg(3e-3, "SFT peak learning rate (AdamW, linear warmup then cosine decay)")
    sft_batch: int = arg(32, "SFT windows per step")
    sft_seq_len: int = arg(64, "SFT window length in tokens")
    sft_docs: int = arg(20000, "reviews in the SFT corpus")
    # WARP (paper Algorithm 1)
    iterations: int = arg(2, "I: WARP iterations (each: M runs -> SLERP -> LITI)")
    runs: int = arg(2, "M: independent RL runs per iteration")
    steps: int = arg(200, "T: RL steps per run")
    beta: float = arg(0.3, "beta: KL weight in r_beta = r - beta log(pi / pi_ema) (paper 0.1; docs/regime-rule.md)")
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
    eval_every: int = arg(50, "evaluate each run every N steps (its trajectory on the Pareto plot; 0: never)")
    etas: str = arg("0,0.1,0.3,0.5,0.8,1", "eta values of the LITI front drawn for each iteration")
    baseline: bool = arg(True, "also train plain RL with the SFT anchor (I*T steps) for comparison")


@dataclass
class Task:
    """What the RL loop needs from a task; toy_task() is the reviews, warp_scale/tasks.py builds yours."""
    tokenizer: object            # encode_prompt(text) -> ids; decode(ids) -> text; stop_ids end a completion
    train_prompts: callable      # (n, rng: random.Random) -> n prompts
    eval_prompts: callable       # n -> the first n prompts of a fixed evaluation set
    reward: callable             # (prompts, completions) -> (B,) float tensor: r(x, y)
    quality: callable = None     # (prompts, completions, finished) -> (B,): a held-out measure, never optimised
    breakdown: callable = None   # (prompts, completions) -> {part: mean}, logged


def toy_task():
    """The toy: short product reviews, the proxy reward r of reward.py, grammaticality as quality."""
    return Task(ToyTokenizer(), reviews.train_prompts, reviews.eval_prompts, reward, quality, reward_breakdown)


def toy_network(cfg: Config) -> ModelConfig:
    return ModelConfig(vocab_size=ToyTokenizer().vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, d_model=cfg.d_model, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                       max_seq_len=cfg.sft_seq_len + cfg.max_new_tokens + 16)


def toy_theta_sft(cfg: Config, cache_dir=None, log=print):
    """theta_sft: the toy network pre-trained on the review corpus (toy_tasks/sft.py), cached on disk."""
    return sft.pretrain(toy_network(cfg), steps=cfg.sft_steps, lr=cfg.sft_lr, batch=cfg.sft_batch,
                        seq_len=cfg.sft_seq_len, docs=cfg.sft_docs, seed=cfg.seed,
                        batch_seed=run_seed(cfg.seed, -1, 0), cache_dir=cache_dir,
                        device=resolve_device(cfg.device), log=log)


build_model = Transformer.from_state   # (net, state, device, dtype) -> a network holding `state`


def cpu_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_seed(seed, iteration, run):
    """Each run's seed depends only on (seed, iteration, run index) -- never on process layout."""
    return seed * 1_000_003 + iteration * 1_009 + run


def resolve_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ---- Sampling and scoring: shared by the RL step and evaluation. ----
def sample(policy, prompts, task: Task, cfg: Config, generator, device):
    """y ~ pi(.|x): returns tokens (B, T), completion mask (B, T), completion texts, finished flags. Prompts
    are sampled in groups of one token length (the toy's all have one), then right-padded: the model is
    causal, so padding never changes a row's log-probs."""
    tok = task.tokenizer
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    policy.eval()
    rows = [None] * len(prompts)
    for length in dict.fromkeys(map(len, prompt_ids)):                   # in order of first appearance
        index = [i for i, ids in enumerate(prompt_ids) if len(ids) == length]
        batch = torch.tensor([prompt_ids[i] for i in index], dtype=torch.long, device=device)     # (b, T0)
        sampled = policy.generate(batch, cfg.max_new_tokens, temperature=cfg.temperature,
                                  generator=generator, stop_ids=tok.stop_ids)
        for i, row in zip(index, sampled):
            rows[i] = row
    pad = tok.stop_ids[0]
    tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)      # (B, T)
    prompt_len = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    sampled_len = torch.tensor([len(row) for row in rows], device=device)
    positions = torch.arange(tokens.shape[1], device=device)
    mask = completion_mask(tokens, prompt_len, tok.stop_ids) * (positions[None, :] < sampled_len[:, None])
    texts, finished = [], []
    for row, start in zip(rows, prompt_len.tolist()):
        completion = row[start:].tolist()
        end = next((i for i, t in enumerate(completion) if t in tok.stop_ids), len(completion))
        texts.append(tok.decode(completion[:end]).strip())
        finished.append(end < len(completion))
    return tokens, mask, texts, finished


def sequence_logprob(model, tokens, mask, cfg: Config):
    """log pi(y|x) (B,), summed over the completion at the sampling temperature; and per-token entropies."""
    logp, entropy = completion_logprobs(model, tokens, 0, mask, cfg.temperature)
    return logp.sum(-1), entropy


@torch.no_grad()
def kl_to(policy, other, tokens, mask, cfg: Config):
    """k1 estimate of KL(pi || other) per sequence, log pi(y|x) - log other(y|x), on y sampled from pi."""
    return sequence_logprob(policy, tokens, mask, cfg)[0] - sequence_logprob(other, tokens, mask, cfg)[0]


@torch.no_grad()
def evaluate(policy, sft_model, task: Task, cfg: Config, device):
    """Reward, KL(pi || pi_sft) and quality on the fixed evaluation set, every model with the same random
    numbers (a private generator: evaluating never changes training). KL: kl_to, nats per completion."""
    prompts = [p for p in task.eval_prompts(cfg.eval_prompts) for _ in range(cfg.eval_samples)]
    gen = torch.Generator(device=device).manual_seed(run_seed(cfg.seed, -2, 0))
    tokens, mask, texts, finished = sample(policy, prompts, task, cfg, gen, device)
    kl = kl_to(policy, sft_model, tokens, mask, cfg).cpu()
    r, n = task.reward(prompts, texts), len(prompts)
    point = {"reward": r.mean().item(), "reward_se": r.std().item() / math.sqrt(n),
             "kl": kl.mean().item(), "kl_se": kl.std().item() / math.sqrt(n)}
    if task.quality is not None:
        point["quality"] = task.quality(prompts, texts, finished).mean().item()
    if task.breakdown is not None:
        point.update({f"r_{k}": v for k, v in task.breakdown(prompts, texts).items()})
    return point


# ---- One RL fine-tuning (Algorithm 1's inner loop): REINFORCE on r_beta, the EMA anchor every step. ----
def reinforce_loss(policy, anchor, tokens, mask, r, cfg: Config):
    """The policy-gradient loss of one batch of k samples per prompt (paper Eq. 2, Sec. 3.1):

        r_beta(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ema(y|x))    sequence-level, whole completion
        A_i = r_beta_i - mean_{j != i} r_beta_j                        over the k samples of one prompt
        loss = -mean_i[ A_i * log pi(y_i|x_i) ]                        REINFORCE

    r_beta and A are constants (detached): the gradient is sum_i A_i grad log pi(y_i|x_i) / B. Returns
    (loss, stats)."""
    policy.train()
    logp, entropy = sequence_logprob(policy, tokens, mask, cfg)             # (B,), with gradient
    with torch.no_grad():
        logp_anchor, _ = sequence_logprob(anchor, tokens, mask, cfg)
    kl_to_anchor = (logp - logp_anchor).detach()            # k1 estimate of KL(pi || pi_ema), per sequence
    reward_shaped = r - cfg.beta * kl_to_anchor
    # choice: REINFORCE baseline = leave-one-out mean of the other k-1 samples of the same prompt
    # (RLOO). It is unbiased (b_i does not depend on y_i) and needs no value network.
    k = cfg.samples_per_prompt
    grouped = reward_shaped.view(-1, k)                       # (prompts, k): samples of a prompt are adjacent
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    advantage = (grouped - baseline).view(-1)
    loss = -(advantage * logp).mean()
    stats = {"reward": r.mean().item(), "reward_shaped": reward_shaped.mean().item(),
             "kl_anchor": kl_to_anchor.mean().item(), "entropy": (entropy.sum() / mask[:, 1:].sum()).item()}
    return loss, stats


def rl_step(policy, anchor, optimizer, prompts, task: Task, cfg: Config, generator, device, sft_model=None):
    """Sample, score, one optimizer step on reinforce_loss, then the EMA anchor. Returns stats
    (with sft_model: also the KL to theta_sft of this batch, for the log)."""
    t0 = time.time()
    tokens, mask, texts, finished = sample(policy, prompts, task, cfg, generator, device)     # y ~ pi(.|x)
    r = task.reward(prompts, texts).to(device)                                               # r(x, y)
    loss, stats = reinforce_loss(policy, anchor, tokens, mask, r, cfg)
    if sft_model is not None:                                 # logged: this batch's KL to theta_sft
        stats["kl_sft"] = kl_to(policy, sft_model, tokens, mask, cfg).mean().item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    ema_update(anchor, policy, cfg.mu)                        # theta_ema <- (1-mu) theta_ema + mu theta
    stats |= {"grad_norm": grad_norm.item(), "tok_s": int(mask.sum().item()) / (time.time() - t0)}
    return stats


def train_policy(cfg: Config, task: Task, net, theta_init, theta_sft, seed, steps=None, anchor="ema", tag=None,
                 log=print, emit=None):
    """One independent RL run from theta_init, everything built from `seed` (no state shared with other runs);
    returns (theta_m, theta_ema) as CPU state dicts. anchor="ema": KL towards the EMA of the policy (WARP);
    "sft": towards the fixed theta_sft (plain RLHF; mu = 0)."""
    device, steps, tag, emit = resolve_device(cfg.device), steps or cfg.steps, tag or {}, emit or (lambda row: None)
    policy = build_model(net, theta_init, device)
    anchor_model = build_model(net, theta_init if anchor == "ema" else theta_sft, device).requires_grad_(False)
    sft_model = build_model(net, theta_sft, device).requires_grad_(False)
    step_cfg = dataclasses.replace(cfg, mu=cfg.mu if anchor == "ema" else 0.0)   # an SFT anchor never moves
    # choice: Adam with linear warmup then a constant rate, as the paper (no decay).
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    prompt_rng, sample_gen = random.Random(seed), torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        prompts = [p for p in task.train_prompts(cfg.prompts_per_step, prompt_rng) for _ in range(cfg.samples_per_prompt)]
        logging = step % cfg.log_every == 0 or step == steps
        stats = rl_step(policy, anchor_model, optimizer, prompts, task, step_cfg, sample_gen, device,
                        sft_model if logging else None)
        schedule.step()
        if logging:
            log_train(log, emit, tag, step, steps, stats, (time.time() - t0) / step * (steps - step))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
            emit({"kind": "trajectory", **tag, "step": step, **evaluate(policy, sft_model, task, cfg, device)})
    return cpu_state(policy), cpu_state(anchor_model)


def log_train(log, emit, tag, step, steps, stats, eta_s):
    name = " ".join(f"{k}={v}" for k, v in tag.items())
    log(f"  {name} step {step:4d}/{steps}  reward {stats['reward']:6.3f}  kl_anchor {stats['kl_anchor']:6.2f}  "
        f"kl_sft {stats['kl_sft']:6.2f}  entropy {stats['entropy']:.2f}  {stats['tok_s']:6.0f} tok/s  ETA {eta_s:4.0f}s")
    emit({"kind": "train", **tag, "step": step, **stats})


# ---- WARP: I iterations of (M runs -> SLERP -> LITI), and what is measured at the end of each. ----
def warp(cfg: Config, task: Task, net, theta_sft, log=print, emit=None):
    """Algorithm 1 from theta_sft; returns the final model (the last LITI model) as a state dict.
    Metrics (every run's trajectory, every iteration's merges and LITI front) go to emit(row)."""
    emit, device = emit or (lambda row: None), resolve_device(cfg.device)

    def build(state):
        return build_model(net, state, device)

    sft_model = build(theta_sft)
    emit({"kind": "eval", "label": "theta_sft", "iteration": 0, **evaluate(sft_model, sft_model, task, cfg, device)})
    theta_init = theta_sft
    for it in range(1, cfg.iterations + 1):
        log(f"iteration {it}/{cfg.iterations}: {cfg.runs} RL runs of {cfg.steps} steps from theta_init")
        policies = [train_policy(cfg, task, net, theta_init, theta_sft, run_seed(cfg.seed, it, m),
                                 tag={"iteration": it, "run": m}, log=log, emit=emit)[0]
                    for m in range(cfg.runs)]                                    # M independent RL runs
        theta_slerp = slerp(theta_init, policies, cfg.lam if cfg.runs == 2 else None, cfg.granularity)
        theta_next = liti(theta_init, theta_slerp, cfg.eta)                      # LITI towards theta_init
        measure_iteration(cfg, task, build, it, theta_init, theta_sft, policies, theta_slerp, theta_next,
                          sft_model, log, emit)
        theta_init = theta_next                                                  # the next iteration's init
    return theta_init


def plain_rl(cfg: Config, task: Task, net, theta_sft, log=print, emit=None):
    """The baseline: RL with the fixed SFT anchor, as many steps as one WARP run over all iterations."""
    log(f"baseline: plain RL with the SFT anchor, {cfg.iterations * cfg.steps} steps")
    return train_policy(cfg, task, net, theta_sft, theta_sft, run_seed(cfg.seed, 0, cfg.runs),
                        cfg.iterations * cfg.steps, anchor="sft", tag={"iteration": 0, "run": "sft-anchor"},
                        log=log, emit=emit)[0]


def measure_iteration(cfg, task, build, it, theta_init, theta_sft, policies, theta_slerp, theta_next, sft_model,
                      log, emit):
    """What the paper plots after an iteration: task-vector cosines (~orthogonal task vectors, ~identical
    weights), the LITI front (1 - eta) theta_sft + eta theta_slerp, the SLERP and the next theta_init."""
    device = resolve_device(cfg.device)

    def evaluate_state(state):   # build(state) -> the network holding a state, on the device
        return evaluate(build(state), sft_model, task, cfg, device)

    if cfg.runs >= 2:
        cos = {g: cosine_report(theta_init, policies, g) for g in ("model", "layer")}
        full = cosine_report({k: torch.zeros_like(v) for k, v in theta_init.items()}, policies, "model")["model"]
        log(f"  task-vector cosine(run 0, run 1): model {cos['model']['model']:.3f}, per group "
            f"{min(cos['layer'].values()):.3f}..{max(cos['layer'].values()):.3f}; full-weight cosine {full:.4f}")
        emit({"kind": "cosine", "iteration": it, "task_vector": cos["model"]["model"],
              "task_vector_per_group": cos["layer"], "full_weights": full})
    for eta in [float(e) for e in cfg.etas.split(",")]:
        emit({"kind": "front", "iteration": it, "eta": eta, **evaluate_state(liti(theta_sft, theta_slerp, eta))})
    for label, state in ((f"iter {it} SLERP", theta_slerp), (f"iter {it} LITI (eta={cfg.eta})", theta_next)):
        row = {"kind": "eval", "label": label, "iteration": it, **evaluate_state(state)}
        emit(row)
        log(f"  {label}: reward {row['reward']:.3f}, KL {row['kl']:.2f}"
            + (f", quality {row['quality']:.2f}" if "quality" in row else ""))


if __name__ == "__main__":   # the demo and every other command: warp_scale/cli.py (flags, checks, outputs)
    from warp_scale.cli import main
    sys.exit(main())
