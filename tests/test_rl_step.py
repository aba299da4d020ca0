"""The RL step pinned by an independent computation.

warp_min.reinforce_loss must have the gradient of REINFORCE on the *detached* KL-shaped reward
r_beta = r - beta * (log pi(y|x) - log pi_ema(y|x)) with the leave-one-out baseline over the k samples
of a prompt, log-probabilities taken at the sampling temperature:

    g = -(1/B) sum_i A_i grad log pi(y_i|x_i),   A_i = r_beta_i - mean_{j != i, same prompt} r_beta_j.

The reference below recomputes it from scratch in float64 -- log pi(y|x) by an explicit loop over
the completion's tokens, A_i by Python loops, grad log pi(y_i|x_i) one sample at a time -- with
k = 3, beta = 0.5 and temperature 0.7. Parametrised with three plausible bugs (a baseline that
includes the sample's own reward, a KL term that is not detached, log-probabilities at temperature
1 instead of the sampling temperature), the same comparison fails: the test can tell them apart.
"""

import copy
import dataclasses

import pytest
import torch

import warp_min as W
from model import ModelConfig, Transformer
from toy_tasks import reviews

K, BETA, TEMPERATURE = 3, 0.5, 0.7
CFG = W.Config(samples_per_prompt=K, beta=BETA, temperature=TEMPERATURE, max_new_tokens=8, device="cpu",
               grad_clip=float("inf"), mu=0.05)
TASK = W.toy_task()


def tiny_models():
    net = ModelConfig(vocab_size=TASK.tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                      head_dim=16, d_ff=64, max_seq_len=64, init_std=0.2)
    policy = Transformer(net, generator=torch.Generator().manual_seed(0))
    anchor = copy.deepcopy(policy)
    with torch.no_grad():            # the anchor differs from the policy, so the KL term is not zero
        for p in anchor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy, anchor.requires_grad_(False)


def batch(policy, seed=1):
    """2 prompts x k samples (adjacent); the first seed from `seed` on whose completions end at different
    lengths (some at <|endoftext|>), so masking is exercised."""
    prompts = [p for p in reviews.eval_prompts(2) for _ in range(K)]
    for s in range(seed, seed + 50):
        tokens, mask, texts, _ = W.sample(policy, prompts, TASK, CFG, torch.Generator().manual_seed(s), "cpu")
        if len(set(mask.sum(1).tolist())) > 1:
            return prompts, tokens, mask, texts, s
    raise AssertionError("no batch with unequal completion lengths")


def seq_logprob64(model, tokens, mask, i, temperature):
    """log pi(y_i|x_i) in float64, token by token over the completion (mask), at a temperature."""
    logp = torch.log_softmax(model(tokens[i:i + 1, :-1])[0].double() / temperature, dim=-1)   # (T-1, V)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(tokens.shape[1] - 1):
        if mask[i, t + 1]:
            total = total + logp[t, tokens[i, t + 1]]
    return total


def reference_gradient(policy, anchor, tokens, mask, r, variant="correct"):
    """{parameter name: float64 gradient} of the REINFORCE step, computed independently of warp_min."""
    policy64, anchor64 = copy.deepcopy(policy).double(), copy.deepcopy(anchor).double()
    temperature = 1.0 if variant == "temperature 1" else TEMPERATURE
    B = tokens.shape[0]
    logp = [seq_logprob64(policy64, tokens, mask, i, temperature) for i in range(B)]        # with gradient
    with torch.no_grad():
        logp_anchor = [float(seq_logprob64(anchor64, tokens, mask, i, temperature)) for i in range(B)]
    if variant == "KL not detached":     # r_beta keeps its gradient through log pi
        r_beta = [float(r[i]) - BETA * (logp[i] - logp_anchor[i]) for i in range(B)]
    else:
        r_beta = [float(r[i]) - BETA * (float(logp[i].detach()) - logp_anchor[i]) for i in range(B)]
    advantage = []
    for i in range(B):
        group = range(i - i % K, i - i % K + K)
        others = [r_beta[j] for j in group if j != i or variant == "baseline includes own reward"]
        advantage.append(r_beta[i] - sum(others) / len(others))
    loss = -sum(advantage[i] * logp[i] for i in range(B)) / B
    grads = torch.autograd.grad(loss, list(policy64.parameters()))
    return {name: g for (name, _), g in zip(policy64.named_parameters(), grads)}


def relative_difference(grads, reference):
    num = sum(float((grads[n].double() - reference[n]).pow(2).sum()) for n in reference)
    den = sum(float(reference[n].pow(2).sum()) for n in reference)
    return (num / den) ** 0.5


@pytest.mark.parametrize("variant", ["correct", "baseline includes own reward", "KL not detached", "temperature 1"])
def test_reinforce_gradient_equals_independent_reinforce(variant):
    """The loss's gradient is the reference's to fp32 accuracy (1e-4 relative); against each of the
    three wrong references it differs by more than 1e-2 -- each of those bugs would be caught."""
    policy, anchor = tiny_models()
    prompts, tokens, mask, texts, _ = batch(policy)
    assert mask.sum(1).min() >= 2                                           # real completions
    r = torch.tensor([0.3, -1.2, 2.0, 0.7, 0.1, -0.4])                     # any rewards will do
    loss, stats = W.reinforce_loss(policy, anchor, tokens, mask, r, CFG)
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters()}
    assert abs(stats["kl_anchor"]) > 1e-3                                  # the KL term is in play
    error = relative_difference(grads, reference_gradient(policy, anchor, tokens, mask, r, variant))
    if variant == "correct":
        assert error < 1e-4, error
    else:
        assert error > 1e-2, error


def test_rl_step_applies_that_gradient_then_the_ema():
    """rl_step = sample, r(x, y), the optimizer on that same gradient (plain SGD here, no clipping),
    then theta_ema <- (1 - mu) theta_ema + mu theta with the new theta."""
    policy, anchor = tiny_models()
    before, anchor_before = copy.deepcopy(policy), copy.deepcopy(anchor)
    prompts, tokens, mask, texts, seed = batch(policy, seed=5)                # the batch rl_step will draw
    reference = reference_gradient(policy, anchor, tokens, mask, TASK.reward(prompts, texts))
    lr = 0.1
    W.rl_step(policy, anchor, torch.optim.SGD(policy.parameters(), lr=lr), prompts, TASK, CFG,
              torch.Generator().manual_seed(seed), "cpu")
    after = dict(policy.named_parameters())
    for name, p0 in before.named_parameters():
        torch.testing.assert_close(after[name].double(), p0.double() - lr * reference[name], rtol=0, atol=1e-5)
    for name, a0 in anchor_before.state_dict().items():
        want = (1 - CFG.mu) * a0.double() + CFG.mu * after[name].double()
        torch.testing.assert_close(anchor.state_dict()[name].double(), want, rtol=0, atol=1e-6)


def test_samples_of_a_prompt_must_be_adjacent():
    """The baseline groups rows k at a time: a batch that is not a multiple of k is refused."""
    policy, anchor = tiny_models()
    _, tokens, mask, _, _ = batch(policy)
    with pytest.raises(RuntimeError):
        W.reinforce_loss(policy, anchor, tokens[:5], mask[:5], torch.zeros(5), dataclasses.replace(CFG))
