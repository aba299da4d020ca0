"""The streaming merge's block kernels (warp_scale/merge.py: block_gram, block_combine) against
exact and float64 references, on adversarial inputs.

block_gram's docstring proves, for the Gram matrix of a block's task vectors,
    bf16/f16: |Ĝ_ab - G_ab| <= (gamma_{b+2} + gamma'_L (1 + gamma_{b+2})) S_ab + n 2^-149
    fp32:     |Ĝ_ab - G_ab| <= gamma'_{L+3} S_ab
with S_ab = sum_i |delta_a,i delta_b,i|, b = GRAM_CHUNK, gamma_k = k u / (1 - k u), u = 2^-24
(fp32), gamma'_k the same with u' = 2^-53 (float64). Here G is exact: the deltas are formed in
float64 (checked exact with TwoSum), each product is split exactly into two doubles (Dekker's
TwoProduct) and the sum is math.fsum (correctly rounded). The merged outputs are then checked
against the float64 oracle of tests/test_streaming_merge.py: fp32 within 1e-6 relative per
tensor, bf16 within one bf16 ulp per element.
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import warp_min  # noqa: E402
from warp_scale import merge  # noqa: E402
from test_streaming_merge import load_dir, oracle_merge, rel_err, write_ckpt  # noqa: E402

U32, U64 = 2.0 ** -24, 2.0 ** -53
N = 2 * merge.SUB_ELEMS + 1237          # three sub-blocks, the last one ragged, a partial chunk


def gamma(k, u):
    assert k * u < 1
    return k * u / (1 - k * u)


# --------------------------------------------------------------------------- exact Gram oracle

def _exact_deltas(init, policy):
    """policy - init in float64, asserted exact (Knuth's TwoSum error term is zero)."""
    a, b = policy.double().numpy(), -init.double().numpy()
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    assert not err.any(), "deltas not exact in float64: pick other test inputs"
    return s


def _two_product(a, b):
    """Dekker: a * b == hi + lo exactly (no FMA needed; no overflow for |a|, |b| < 1e140)."""
    def split(x):
        c = 134217729.0 * x                       # 2^27 + 1
        hi = c - (c - x)
        return hi, x - hi
    hi = a * b
    a1, a2 = split(a)
    b1, b2 = split(b)
    return hi, ((a1 * b1 - hi) + a1 * b2 + a2 * b1) + a2 * b2


def exact_gram(init, policies):
    """(G correctly rounded to float64, S = sum |delta_a delta_b| rounded up) for one block."""
    deltas = [_exact_deltas(init.reshape(-1), p.reshape(-1)) for p in policies]
    M = len(deltas)
    G, S = np.zeros((M, M)), np.zeros((M, M))
    for a in range(M):
        for b in range(M):
            hi, lo = _two_product(deltas[a], deltas[b])
            G[a, b] = math.fsum(np.concatenate([hi, lo]))
            S[a, b] = (math.fsum(np.abs(hi)) + math.fsum(np.abs(lo))) * (1 + 4 * U64)
    return G, S


def proven_bound(S, n, dtype):
    """block_gram's bound for one block of n elements (L: depth of its float64 sums)."""
    b = merge.GRAM_CHUNK
    if dtype == torch.float32:
        L = merge.SUB_ELEMS + -(-n // merge.SUB_ELEMS)
        return gamma(L + 3, U64) * S
    L = -(-n // merge.SUB_ELEMS) * (merge.SUB_ELEMS // b)
    g = gamma(b + 2, U32)
    return (g + gamma(L, U64) * (1 + g)) * S + n * 2.0 ** -149


# --------------------------------------------------------------------------- adversarial inputs

def _in(dtype, x):
    return x.to(dtype)


def _nudge(x, frac, gen):
    """x with a random fraction of its elements moved by one ulp of their dtype."""
    bits = x.view(torch.int16 if x.element_size() == 2 else torch.int32).clone()
    pick = torch.rand(x.shape, generator=gen) < frac
    bits[pick] += 1
    return bits.view(x.dtype)


def adversarial(kind, dtype, n=N, seed=0):
    """(init, [policy_0, policy_1]) as 1-D tensors of `dtype`, exactly as stored on disk."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, generator=g, dtype=torch.float64)   # noqa: E731
    big = 1e4 if dtype == torch.float16 else 1e17
    if kind == "realistic":                       # the bench's: ~75 degrees apart
        theta, s = 0.02 * r(), r()
        pols = [theta + 1e-3 * (0.6 * s + r()) for _ in range(2)]
    elif kind == "large_norms":                   # products near the top of fp32's range
        theta, s = big * r(), r()
        pols = [theta + 0.05 * big * (0.6 * s + r()) for _ in range(2)]
    elif kind == "nearly_colinear":               # the same task vector but a few ulps
        theta = _in(dtype, r())
        p0 = _in(dtype, theta.double() + 0.01 * r())
        return theta, [p0, _nudge(p0, 1e-3, g)]
    elif kind == "nearly_orthogonal":             # independent directions: cos ~ 1/sqrt(n)
        theta = r()
        pols = [theta + 0.01 * r(), theta + 0.01 * r()]
    elif kind == "exactly_orthogonal":            # <d0, d1> = 0 exactly (init 0: deltas exact)
        v = _in(dtype, 0.1 * r()[: n // 2])
        zero = torch.zeros(n, dtype=dtype)
        return zero, [torch.cat([v, v, zero[: n % 2]]), torch.cat([v, -v, zero[: n % 2]])]
    elif kind == "tiny_on_large":                 # one-ulp task vectors on weights ~1e3
        theta = _in(dtype, 1e3 * r())
        return theta, [_nudge(theta, 0.1, g), _nudge(theta, 0.1, g)]
    elif kind == "mixed_magnitudes":              # 10^-20 .. 10^20 within one tensor (f16: 10^-4 .. 10^4)
        span = 4 if dtype == torch.float16 else 20
        theta = r() * 10 ** (span * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1))
        s = r()
        pols = [theta * (1 + 0.01 * (0.6 * s + r())) for _ in range(2)]
    elif kind == "full_width_deltas":             # p tiny, init 1: deltas need ~24 bits, and
        scale = {torch.bfloat16: 2.0 ** -16, torch.float16: 2.0 ** -10}.get(dtype, 2.0 ** -20)
        theta = torch.ones(n, dtype=torch.float64)    # their products ~48: every fp32 add rounds
        pols = [scale * (1 + torch.rand(n, generator=g, dtype=torch.float64)) for _ in range(2)]
    elif kind == "one_zero_task_vector":          # a policy that never moved
        theta = 0.02 * r()
        pols = [theta + 1e-3 * r(), theta]
    else:
        raise ValueError(kind)
    return _in(dtype, theta), [_in(dtype, p) for p in pols]


KINDS = ["realistic", "large_norms", "nearly_colinear", "nearly_orthogonal", "exactly_orthogonal",
         "tiny_on_large", "mixed_magnitudes", "full_width_deltas", "one_zero_task_vector"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# --------------------------------------------------------------------------- the Gram bound

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_block_gram_within_proven_bound(kind, dtype):
    """block_gram is within its proven bound of the exact Gram (and so of warp_min.tensor_gram,
    whose own error is gamma'_n S) on every adversarial input, every dtype."""
    init, pols = adversarial(kind, dtype)
    G, S = exact_gram(init, pols)
    fast = merge.block_gram(init, pols).numpy()
    bound = proven_bound(S, init.numel(), dtype)
    err = np.abs(fast - G)
    assert (err <= bound).all(), (err, bound)
    ref = warp_min.tensor_gram(init, pols).numpy()
    assert (np.abs(fast - ref) <= bound + gamma(init.numel(), U64) * S).all()


def test_the_bound_is_not_vacuous():
    """On ordinary bf16 inputs the fp32 chunk sums really round (the error is not zero) and stay
    far inside the bound; a single fp32 sum over the whole block would be much worse."""
    init, pols = adversarial("realistic", torch.bfloat16, n=4 * merge.SUB_ELEMS)
    G, S = exact_gram(init, pols)
    err = np.abs(merge.block_gram(init, pols).numpy() - G)
    bound = proven_bound(S, init.numel(), torch.bfloat16)
    assert err.max() > 0 and (err <= 0.1 * bound).all()
    d = torch.stack([p.float() - init.float() for p in pols])
    naive = np.abs((d @ d.T).double().numpy() - G)             # fp32 over 2^18 terms at once
    assert naive.max() > 10 * err.max()


def test_gram_fallbacks_are_the_reference():
    """fp32 products that overflow (|delta| ~1e20), task vectors too small for fp32 products
    (mean square below GRAM_FLOOR) and non-finite inputs all go to warp_min.tensor_gram; an exactly
    zero task vector stays on the fast path, whose products with it are exact zeros."""
    g = torch.Generator().manual_seed(3)
    theta = (1e20 * torch.randn(N, generator=g)).bfloat16()
    pols = [(theta.float() + 1e20 * torch.randn(N, generator=g)).bfloat16() for _ in range(2)]
    assert torch.isfinite(merge.block_gram(theta, pols)).all()
    assert torch.equal(merge.block_gram(theta, pols), warp_min.tensor_gram(theta, pols))
    theta = (1e-20 * torch.randn(N, generator=g)).bfloat16()
    pols = [_nudge(theta, 0.5, g), _nudge(theta, 0.5, g)]
    assert torch.equal(merge.block_gram(theta, pols), warp_min.tensor_gram(theta, pols))
    nan = pols[0].clone()
    nan[17] = float("nan")
    assert not torch.isfinite(merge.block_gram(theta, [nan, pols[1]])).all()
    init, pols = adversarial("one_zero_task_vector", torch.bfloat16)
    fast = merge.block_gram(init, pols)
    assert fast[1, 1] == 0 and fast[0, 1] == 0 and fast[1, 0] == 0 and fast[0, 0] > 0


# --------------------------------------------------------------------------- combine

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_combine_is_warp_min_combine_bit_for_bit(dtype):
    """Same fp32 operations in the same order: identical output bits, for every length (ragged
    sub-blocks, shorter than a chunk), M = 1..3 and coefficients of either sign or large (LITI
    folds eta into them); finiteness reported."""
    g = torch.Generator().manual_seed(1)
    for n in [1, 255, 256, 257, merge.SUB_ELEMS - 1, merge.SUB_ELEMS, N]:
        for M in (1, 2, 3):
            init = (0.02 * torch.randn(n, generator=g)).to(dtype)
            pols = [(init.float() + 1e-3 * torch.randn(n, generator=g)).to(dtype) for _ in range(M)]
            for c in ([0.63] * M, [1.7, -0.4, 0.25][:M], [3.0 * x for x in [0.6, 0.6, 0.5][:M]]):
                c = torch.tensor(c, dtype=torch.float64)
                out, finite = merge.block_combine(init, pols, c)
                assert finite and out.dtype == dtype
                assert torch.equal(out, warp_min.combine(init, pols, c)), (n, M, c)


@pytest.mark.parametrize("dtype,top", [(torch.bfloat16, 3.0e38), (torch.float16, 6.0e4)], ids=str)
def test_block_combine_reports_overflow(dtype, top):
    """An output beyond the dtype's range is reported (bf16: via fp32 squares overflowing; f16,
    which overflows at 65504, checked directly), like an overflowing fp32 intermediate."""
    init = torch.full((1000,), top / 3, dtype=dtype)
    pols = [torch.full((1000,), top, dtype=dtype)] * 2
    ok, finite = merge.block_combine(init, pols, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert finite and torch.isfinite(ok).all()
    big, finite = merge.block_combine(init, pols, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert not finite and not torch.isfinite(big).all()


# --------------------------------------------------------------------------- merged outputs

def bf16_ulp(x):
    """The spacing of bf16 numbers at |x| (x float64): 2^(e - 8) for |x| in [2^(e-1), 2^e)."""
    _, e = torch.frexp(x.abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(x), e - 8)


MERGE_KINDS = [k for k in KINDS if k != "one_zero_task_vector"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_merged_outputs_within_tolerance(tmp_path, dtype):
    """Whole merges of adversarial checkpoints (one transformer block per kind of input, several
    blocks and workers) against the float64 oracle. fp32: within 1e-6 relative per tensor. bf16:
    within one bf16 ulp of the oracle per element, beyond the fp32 rounding of the arithmetic
    itself, 4u (|theta| + sum_m |c_m delta_m|) -- which warp_min.combine shares, and which is all
    an element is made of where the terms cancel (exactly_orthogonal: its exact zeros come out as
    ~1e-9, in fp32 too, where relative error then means nothing) -- plus 1e-4 sum_m |c_m delta_m|
    for the coefficients' error (the Gram's bound, 1.54e-5 relative, times |dc/dcos| <= ~2 here).
    The same bytes with 1 and 3 workers."""
    sds = [{}, {}, {}]
    for i, kind in enumerate(MERGE_KINDS):
        init, pols = adversarial(kind, dtype, n=3 * 40000 + 17, seed=i)
        for sd, t in zip(sds, [init] + pols):
            sd[f"model.layers.{i}.mlp.w"] = t.reshape(-1, 1)[: 3 * 40000].reshape(3, 40000)
            sd[f"model.layers.{i}.norm.w"] = t[3 * 40000:]
    dirs = [write_ckpt(str(tmp_path / n), sd, n_shards=2, config=False)
            for n, sd in zip(["init", "pol0", "pol1"], sds)]
    outs = {}
    for workers in (1, 3):
        out = str(tmp_path / f"out{workers}")
        merge.merge_checkpoints(dirs[0], dirs[1:], out, progress=False, workers=workers,
                                block_elems=50000)
        outs[workers] = load_dir(out)
    ours, (ref, _) = outs[1], oracle_merge(sds[0], sds[1:])
    for k in ref:
        assert torch.equal(outs[1][k], outs[3][k]), k
        group = k.rsplit(".", 2)[0]
        keys = [n for n in sds[0] if n.startswith(group + ".")]
        gram = sum(warp_min.tensor_gram(sds[0][n].double(), [sd[n].double() for sd in sds[1:]])
                   for n in keys)
        c = warp_min.merge_coefficients(gram)[0]
        theta = sds[0][k].double()
        terms = sum(abs(float(cm)) * (sd[k].double() - theta).abs() for cm, sd in zip(c, sds[1:]))
        arithmetic = 4 * U32 * (theta.abs() + terms) + 1e-4 * terms
        err = (ours[k].double() - ref[k]).abs()
        if dtype == torch.bfloat16:
            assert (err <= bf16_ulp(ref[k]) + arithmetic).all(), k
        elif ref[k].norm() > 1e-3 * (theta.abs() + terms).norm():
            assert rel_err(ours[k], ref[k]) <= 1e-6, k
        else:                                   # the terms cancel: relative error means nothing
            assert (err <= arithmetic).all(), k
