"""How much faster could sampling get in eager PyTorch? model.py's decode step against the fastest one we
could write for the same network, measured side by side in one run.

    python experiments/bench/decode_ceiling.py               # the demo's RL batch: 8 sequences x 32 tokens
    python experiments/bench/decode_ceiling.py --batch 64 --threads 1

The "ceiling" decoder below is written for speed, not for reading: q/k/v and gate/up fused into one matrix
each, every weight pre-transposed (for 8 rows, x @ W^T through F.linear is ~2x slower than x @ W_t with
W_t contiguous), no nn.Module calls, one preallocated KV buffer per layer. It is checked against
Transformer.forward (same logits within 1e-5) before it is timed. Printed: both decode steps, a whole
32-token sampling of the batch with each, and what that would make of one RL step of ours -- the step
measured here minus our sampling plus the ceiling's. That bounds what any readable change to model.py
could buy; issue 14 asked for an RL step 2x faster than 908b23d's.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import warp_min as W  # noqa: E402
from model import sample_from_logits  # noqa: E402
from toy_tasks import reviews  # noqa: E402


class CeilingDecoder:
    """The toy network (Gemma 1 features only) as a few fused matrices; decode(tokens, pos) -> logits."""

    def __init__(self, model, batch, max_len):
        cfg = model.cfg
        assert not (cfg.sandwich_norms or cfg.qk_norm or cfg.sliding_window or cfg.attn_logit_softcap
                    or cfg.final_logit_softcap), "the ceiling decoder covers the toy's Gemma 1 network only"
        self.cfg, self.B = cfg, batch
        t = lambda w: w.detach().t().contiguous()   # noqa: E731
        self.layers = []
        for block in model.model.layers:
            a, mlp = block.self_attn, block.mlp
            self.layers.append(dict(
                norm1=1.0 + block.input_layernorm.weight.detach(), norm2=1.0 + block.post_attention_layernorm.weight.detach(),
                qkv=t(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), o=t(a.o_proj.weight),
                gate_up=t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), down=t(mlp.down_proj.weight),
                k=torch.zeros(batch, cfg.n_kv_head, max_len, cfg.head_dim),
                v=torch.zeros(batch, cfg.n_kv_head, max_len, cfg.head_dim)))
        self.embed, self.head = model.model.embed_tokens.weight.detach(), t(model.model.embed_tokens.weight)
        self.norm, self.embed_scale = 1.0 + model.model.norm.weight.detach(), model.embed_scale
        self.scale, self.cos, self.sin = model.model.layers[0].self_attn.scale, model.rope_cos, model.rope_sin
        self.sizes = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)

    def decode(self, tokens, pos):
        """tokens (B,) at position pos -> logits (B, V); fills the cache at pos."""
        cfg, B = self.cfg, self.B
        eps = cfg.norm_eps
        x = self.embed[tokens] * self.embed_scale
        cos, sin = self.cos[pos], self.sin[pos]
        for L in self.layers:
            q, k, v = (F.rms_norm(x, (cfg.d_model,), L["norm1"], eps) @ L["qkv"]).split(self.sizes, dim=-1)
            q, k = q.view(B, cfg.n_head, 1, cfg.head_dim), k.view(B, cfg.n_kv_head, cfg.head_dim)
            q = q * cos + q.roll(cfg.head_dim // 2, dims=-1) * sin
            L["k"][:, :, pos] = k * cos + k.roll(cfg.head_dim // 2, dims=-1) * sin
            L["v"][:, :, pos] = v.view(B, cfg.n_kv_head, cfg.head_dim)
            y = F.scaled_dot_product_attention(q, L["k"][:, :, :pos + 1], L["v"][:, :, :pos + 1], scale=self.scale,
                                               enable_gqa=True)
            x = x + y.view(B, -1) @ L["o"]
            gate, up = (F.rms_norm(x, (cfg.d_model,), L["norm2"], eps) @ L["gate_up"]).chunk(2, dim=-1)
            x = x + (F.gelu(gate, approximate="tanh") * up) @ L["down"]
        return F.rms_norm(x, (cfg.d_model,), self.norm, eps) @ self.head


def sample_ours(model, prompt, n_new, gen):
    return model.generate(prompt, n_new, generator=gen)


def sample_ceiling(dec, prompt, n_new, gen):
    for pos in range(prompt.shape[1] - 1):   # the prompt, token by token (prompts are a few tokens)
        dec.decode(prompt[:, pos], pos)
    token, out = prompt[:, -1], []
    for pos in range(prompt.shape[1] - 1, prompt.shape[1] - 1 + n_new):
        token = sample_from_logits(dec.decode(token, pos), 1.0, None, gen)
        out.append(token)
    return torch.stack(out, dim=1)


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--batch", type=int, default=8, help="sequences sampled together (default 8: one RL step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions, medians reported")
    args = parser.parse_args()
    for flag in ("batch", "threads", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = W.Config(device="cpu")
    task, net = W.toy_task(), W.toy_network(cfg)
    model = W.Transformer(net, generator=torch.Generator().manual_seed(0)).eval()
    prompts = [p for p in reviews.eval_prompts(-(-args.batch // 4)) for _ in range(4)][:args.batch]
    prompt = torch.tensor([task.tokenizer.encode_prompt(p) for p in prompts])
    n_new, max_len = cfg.max_new_tokens, prompt.shape[1] + cfg.max_new_tokens
    dec = CeilingDecoder(model, args.batch, max_len)

    with torch.inference_mode():   # the check: both decoders are the same function
        caches = [{"max_len": max_len} for _ in model.model.layers]
        ours = model(prompt, caches)[:, -1]
        for pos in range(prompt.shape[1]):
            ceiling = dec.decode(prompt[:, pos], pos)
        gap = (ours - ceiling).abs().max().item()
        assert gap < 1e-5, f"the ceiling decoder disagrees with model.py: max |logit difference| {gap:.2e}"
        token, pos = torch.zeros(args.batch, dtype=torch.long), prompt.shape[1]

        def step_ours():
            for c in caches:
                c["len"] = pos
            return model(token[:, None], caches, start_pos=pos)

        results = {"decode step, model.py": median_ms(step_ours, 20 * args.repeats),
                   "decode step, ceiling": median_ms(lambda: dec.decode(token, pos), 20 * args.repeats)}
    results["sampling, model.py"] = median_ms(
        lambda: sample_ours(model, prompt, n_new, torch.Generator().manual_seed(0)), args.repeats)
    with torch.inference_mode():
        results["sampling, ceiling"] = median_ms(
            lambda: sample_ceiling(dec, prompt, n_new, torch.Generator().manual_seed(0)), args.repeats)

    policy, anchor = W.Transformer(net, generator=torch.Generator().manual_seed(0)), model.requires_grad_(False)
    optimizer, gen = torch.optim.Adam(policy.parameters(), lr=1e-4), torch.Generator().manual_seed(0)
    rl_step = median_ms(lambda: W.rl_step(policy, anchor, optimizer, prompts, task, cfg, gen, "cpu"), args.repeats)

    print(f"{args.batch} sequences x {n_new} new tokens, {args.threads} thread(s), medians of {args.repeats} runs; "
          f"max |logit difference| {gap:.1e}")
    for name, ms in results.items():
        print(f"  {name:24} {ms:8.3f} ms")
    d = results["decode step, model.py"] / results["decode step, ceiling"]
    s = results["sampling, model.py"] / results["sampling, ceiling"]
    bound = rl_step - results["sampling, model.py"] + results["sampling, ceiling"]
    print(f"  the ceiling decodes {d:.2f}x and samples {s:.2f}x faster than model.py")
    print(f"  one RL step of ours: {rl_step:.1f} ms; with the ceiling's sampling it would be {bound:.1f} ms "
          f"({rl_step / bound:.2f}x faster; the passes, Adam and the EMA unchanged)")


if __name__ == "__main__":
    main()
