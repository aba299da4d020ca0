"""bf16 policies with fp32 master weights and an fp32 EMA anchor.

A bf16 weight has 8 significant bits: a step of Adam at the paper's lr 1e-6 is far below its
resolution (~0.4% of the weight), and the EMA update theta_ema + mu (theta - theta_ema) with mu = 0.01
rounds back to theta_ema. So Adam updates `master`, an fp32 copy of the policy's parameters, which is
then copied (rounded) into the bf16 policy, and the anchor theta_ema is kept in fp32 as `ema`. Between
runs and iterations everything is carried in fp32 too (theta_init, the merges, LITI: driver.py), and
rounded only for forward passes and the saved model.
"""

import torch

import warp_min as W


class MixedPrecision:
    """fp32 master weights (what Adam steps) and the fp32 EMA anchor of one bf16 RL run.

    choice: the EMA averages the fp32 master weights (the optimizer's theta), not their bf16 copy.
    choice: forward passes of the anchor use a bf16 copy of `ema`, refreshed every step, so the KL
    compares two models computed at the same precision (an fp32 anchor against a bf16 policy would
    show a KL made of rounding noise at step 1, when both hold the same weights).
    """

    def __init__(self, theta_init, theta_anchor):
        """theta_init, theta_anchor: the run's fp32 starting weights and anchor (not their bf16 copies)."""
        self.master = {name: t.detach().float().clone().requires_grad_() for name, t in theta_init.items()}
        self.ema = {name: t.detach().float().clone() for name, t in theta_anchor.items()}

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
        W.ema_update(self.ema, self.master, mu)             # theta_ema <- (1-mu) theta_ema + mu theta, fp32
        for name, a in anchor.state_dict().items():
            a.copy_(self.ema[name])
        return grad_norm
