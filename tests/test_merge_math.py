"""Merge math of warp-min: EMA anchor, SLERP of task vectors, LERP, LITI (shared/WARP.md).

Each test states one property in its docstring. The oracles are written here, independently of
warp_min: float64 numpy closed forms that concatenate a group's task vectors into one vector (fine
in a test; the implementation streams per tensor through a Gram matrix instead). Tolerances are
explicit and chosen from the arithmetic: ~1e-12 for fp64 in, fp32 rounding for fp32 in, half a
bf16 ulp (2^-8 relative) for bf16 in.

Notation: d_m = theta_m - theta_init (task vectors), Omega = arccos(<d1, d2> / (|d1| |d2|)) per group,
    slerp = init + sin((1 - lam) Omega) / sin Omega * d1 + sin(lam Omega) / sin Omega * d2.
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import warp_min as wm
from model import ModelConfig, Transformer

# ---------------------------------------------------------------------------------------------
# Test data: a tiny state dict with Hugging Face Gemma names (embedding, 2 blocks, final norm)
# ---------------------------------------------------------------------------------------------

GEMMA_SHAPES = {
    "model.embed_tokens.weight": (11, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (12, 8),
    "model.layers.1.input_layernorm.weight": (8,),
    "model.norm.weight": (8,),
}
GRANULARITIES = ("layer", "tensor", "model")
BF16_HALF_ULP = 2.0 ** -8  # round-to-nearest into bf16 (8 significant bits) errs by <= 2^-8 relative


def to_torch(np_sd, dtype=torch.float64):
    return {k: torch.from_numpy(np.array(v, dtype=np.float64)).to(dtype) for k, v in np_sd.items()}


def to_numpy(sd):
    """float64 numpy copy of a state dict (bf16/fp32 upcast exactly)."""
    return {k: v.detach().to(torch.float64).numpy().copy() for k, v in sd.items()}


def random_problem(seed, M=2, dtype=torch.float64, delta_scale=0.1, shapes=GEMMA_SHAPES):
    """init ~ N(0, 1) and M policies init + delta_scale * N(0, 1) (numpy RNG: torch's RNG untouched).

    init is far from zero on purpose: SLERP of full weights instead of task vectors would differ.
    """
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    deltas = [{k: delta_scale * rng.standard_normal(s) for k, s in shapes.items()} for _ in range(M)]
    return from_deltas(init, deltas, dtype)


def from_deltas(init_np, deltas_np, dtype=torch.float64):
    """(init, [init + d_m]) as torch state dicts."""
    init = to_torch(init_np, dtype)
    return init, [to_torch({k: init_np[k] + d[k] for k in init_np}, dtype) for d in deltas_np]


# ---------------------------------------------------------------------------------------------
# Oracles (float64 numpy, independent of warp_min)
# ---------------------------------------------------------------------------------------------


def oracle_group(name, granularity):
    """WARP.md grouping, re-stated: a block `model.layers.N.*` is one group, anything else its own."""
    if granularity == "tensor":
        return name
    if granularity == "model":
        return "<whole model>"
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return ".".join(parts[:3])
    return name


def groups(names, granularity):
    out = {}
    for n in names:
        out.setdefault(oracle_group(n, granularity), []).append(n)
    return out


def concat(sd_np, names):
    return np.concatenate([np.ravel(sd_np[n]) for n in names])


def split_like(vec, names, like):
    out, i = {}, 0
    for n in names:
        size = np.size(like[n])
        out[n] = vec[i:i + size].reshape(np.shape(like[n]))
        i += size
    return out


def slerp_coefficients_oracle(d1, d2, lam):
    """(a, b) with slerp = init + a d1 + b d2; LERP (1 - lam, lam) for a zero or (anti-)colinear pair.

    Tests keep well away from the fallback threshold, so its exact value (1e-6 on sin Omega) is moot.
    """
    n1, n2 = np.linalg.norm(d1), np.linalg.norm(d2)
    if n1 == 0.0 or n2 == 0.0:
        return 1.0 - lam, lam
    omega = np.arccos(np.clip(d1 @ d2 / (n1 * n2), -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return 1.0 - lam, lam
    return np.sin((1.0 - lam) * omega) / np.sin(omega), np.sin(lam * omega) / np.sin(omega)


def merge_oracle(init, policies, lam=None, granularity="layer", method="slerp"):
    """Per group, on concatenated float64 task vectors. M = 2: lam on the second (None = 0.5);
    M > 2: the m-th policy (1-based) merged into the running result with lam = 1/m."""
    init_np, pols_np = to_numpy(init), [to_numpy(p) for p in policies]
    M, out = len(pols_np), {}
    for names in groups(list(init_np), granularity).values():
        base = concat(init_np, names)
        deltas = [concat(p, names) - base for p in pols_np]
        merged = deltas[0]
        for m in range(2, M + 1):
            step = (0.5 if lam is None else lam) if M == 2 else 1.0 / m
            d = deltas[m - 1]
            a, b = slerp_coefficients_oracle(merged, d, step) if method == "slerp" else (1 - step, step)
            merged = a * merged + b * d
        out.update(split_like(base + merged, names, init_np))
    return out


def assert_sd_close(got, expected_np, rtol, atol, dtype=None):
    assert set(got) == set(expected_np)
    for k, want in expected_np.items():
        if dtype is not None:
            assert got[k].dtype == dtype, (k, got[k].dtype)
        assert got[k].shape == tuple(np.shape(want)), k
        np.testing.assert_allclose(got[k].to(torch.float64).numpy(), want, rtol=rtol, atol=atol, err_msg=k)


def max_abs_diff(sd_a, sd_b):
    return max(float((sd_a[k].double() - sd_b[k].double()).abs().max()) for k in sd_a)


def group_norms(sd_np, init_np, granularity):
    return {g: np.linalg.norm(concat(sd_np, names) - concat(init_np, names))
            for g, names in groups(list(init_np), granularity).items()}


def orthonormal_group_deltas(seed, M, norms=None, granularity="layer"):
    """init and M task vectors that are orthogonal within every group (Gram-Schmidt on the
    concatenated group vector), with |d_m|_g = norms[m] (default 1) in every group."""
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    norms = norms or [1.0] * M
    deltas = [dict() for _ in range(M)]
    for names in groups(list(init), granularity).values():
        q, _ = np.linalg.qr(rng.standard_normal((sum(np.size(init[n]) for n in names), M)))
        for m in range(M):
            deltas[m].update(split_like(norms[m] * q[:, m], names, init))
    return init, deltas


# ---------------------------------------------------------------------------------------------
# 1. SLERP / LERP / LITI equal their float64 closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.8])
def test_slerp_equals_float64_closed_form(lam):
    """fp64 in: slerp = init + sin((1-lam)Omega)/sin Omega d1 + sin(lam Omega)/sin Omega d2 per block, to 1e-12."""
    init, pols = random_problem(seed=1)
    got = wm.slerp(init, pols, lam)
    assert_sd_close(got, merge_oracle(init, pols, lam), rtol=1e-12, atol=1e-12, dtype=torch.float64)
    # the oracle discriminates: SLERP of near-orthogonal task vectors is far from LERP
    assert max_abs_diff(got, wm.lerp(init, pols, lam)) > 1e-2


def test_slerp_fp32_matches_float64_oracle_to_fp32_rounding():
    """fp32 in -> fp32 out, within fp32 rounding (|values| ~ 1, so 2e-6 absolute) of the fp64 oracle."""
    init, pols = random_problem(seed=2, dtype=torch.float32)
    assert_sd_close(wm.slerp(init, pols, 0.3), merge_oracle(init, pols, 0.3), rtol=1e-6, atol=2e-6, dtype=torch.float32)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_lerp_equals_closed_form(lam):
    """lerp = init + (1 - lam) d1 + lam d2, to 1e-12 (fp64 in)."""
    init, pols = random_problem(seed=3)
    i, p1, p2 = to_numpy(init), to_numpy(pols[0]), to_numpy(pols[1])
    want = {k: i[k] + (1 - lam) * (p1[k] - i[k]) + lam * (p2[k] - i[k]) for k in i}
    assert_sd_close(wm.lerp(init, pols, lam), want, rtol=1e-12, atol=1e-12, dtype=torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_liti_equals_closed_form(eta, dtype, tol):
    """liti = (1 - eta) init + eta merged, per tensor, dtype kept (fp64: 1e-15, fp32: 1e-6)."""
    init, (merged,) = random_problem(seed=4, M=1, dtype=dtype)
    i, m = to_numpy(init), to_numpy(merged)
    want = {k: (1 - eta) * i[k] + eta * m[k] for k in i}
    assert_sd_close(wm.liti(init, merged, eta), want, rtol=tol, atol=tol, dtype=dtype)


def test_default_lam_is_one_half():
    """slerp/lerp with lam=None (M = 2) is lam = 0.5, the paper's default."""
    init, pols = random_problem(seed=5)
    for fn in (wm.slerp, wm.lerp):
        assert_sd_close(fn(init, pols), to_numpy(fn(init, pols, 0.5)), rtol=0, atol=0)
    assert_sd_close(wm.slerp(init, pols), merge_oracle(init, pols, 0.5), rtol=1e-12, atol=1e-12)


def test_merges_do_not_modify_their_inputs():
    """slerp, lerp and liti are pure: the input state dicts are bit-for-bit unchanged."""
    for dtype in (torch.float32, torch.bfloat16):
        init, pols = random_problem(seed=6, dtype=dtype)
        before = [{k: v.clone() for k, v in sd.items()} for sd in [init, *pols]]
        merged = wm.slerp(init, pols, 0.3)
        wm.lerp(init, pols, 0.3)
        wm.liti(init, merged, 0.3)
        for sd, ref in zip([init, *pols], before):
            assert all(torch.equal(sd[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------
# 2. Endpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [wm.slerp, wm.lerp], ids=["slerp", "lerp"])
def test_lam_endpoints_give_the_policies(fn):
    """lam = 0 gives policy 1, lam = 1 gives policy 2 (to 1e-14: init + (p - init) in fp64)."""
    init, pols = random_problem(seed=7)
    for lam, want in [(0.0, pols[0]), (1.0, pols[1])]:
        assert_sd_close(fn(init, pols, lam), to_numpy(want), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_liti_endpoints_are_exact(dtype):
    """eta = 0 gives init and eta = 1 gives merged, bit for bit, in every dtype."""
    init, (merged,) = random_problem(seed=8, M=1, dtype=dtype)
    at0, at1 = wm.liti(init, merged, 0.0), wm.liti(init, merged, 1.0)
    assert all(torch.equal(at0[k], init[k]) and at0[k].dtype == dtype for k in init)
    assert all(torch.equal(at1[k], merged[k]) and at1[k].dtype == dtype for k in init)


# ---------------------------------------------------------------------------------------------
# 3. Norm lemma
# ---------------------------------------------------------------------------------------------


def equal_norm_problem(seed):
    """Random d1, d2 with |d1| = |d2| in every tensor (hence in every group of every granularity)."""
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    d1 = {k: 0.1 * rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    d2 = {k: 0.1 * rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    d2 = {k: v * np.linalg.norm(d1[k]) / np.linalg.norm(v) for k, v in d2.items()}
    return init, [d1, d2]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_norm_lemma_slerp_keeps_norm_lerp_shrinks_it(granularity):
    """|d1| = |d2| = r per group: |slerp - init| = r for every lam, while
    |lerp - init| = r sqrt(1 - 2 (1 - cos Omega)(lam - lam^2)) exactly (to 1e-12 relative)."""
    init_np, deltas = equal_norm_problem(seed=9)
    init, pols = from_deltas(init_np, deltas)
    i, p1, p2 = to_numpy(init), to_numpy(pols[0]), to_numpy(pols[1])
    gs = groups(list(i), granularity)
    d1 = {g: concat(p1, n) - concat(i, n) for g, n in gs.items()}
    d2 = {g: concat(p2, n) - concat(i, n) for g, n in gs.items()}
    for lam in [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]:
        s_norms = group_norms(to_numpy(wm.slerp(init, pols, lam, granularity)), i, granularity)
        l_norms = group_norms(to_numpy(wm.lerp(init, pols, lam, granularity)), i, granularity)
        for g in gs:
            r = np.linalg.norm(d1[g])
            np.testing.assert_allclose(np.linalg.norm(d2[g]), r, rtol=1e-12)  # premise of the lemma
            cos = d1[g] @ d2[g] / (r * np.linalg.norm(d2[g]))
            np.testing.assert_allclose(s_norms[g], r, rtol=1e-12, err_msg=f"slerp {g} lam={lam}")
            shrink = math.sqrt(1 - 2 * (1 - cos) * (lam - lam ** 2))
            np.testing.assert_allclose(l_norms[g], r * shrink, rtol=1e-12, err_msg=f"lerp {g} lam={lam}")
            if lam == 0.5 and abs(cos) < 0.5:  # the shrink is real, not a rounding artefact
                assert l_norms[g] < 0.9 * r


# ---------------------------------------------------------------------------------------------
# 4. Orthogonal task vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("lam", [0.5, 0.25])
def test_orthogonal_task_vectors(lam, granularity):
    """<d1, d2> = 0 in every group: Omega = pi/2, so slerp = init + cos(lam pi/2) d1 + sin(lam pi/2) d2
    whatever the norms; at lam = 0.5 that is init + (d1 + d2) / sqrt(2) (sin(pi/4) / 1 on each)."""
    init_np, deltas = orthonormal_group_deltas(seed=10, M=2, norms=[0.3, 2.0])  # orthogonal per block
    init, pols = from_deltas(init_np, deltas)
    i, p1, p2 = to_numpy(init), to_numpy(pols[0]), to_numpy(pols[1])
    a, b = math.cos(lam * math.pi / 2), math.sin(lam * math.pi / 2)
    want = {k: i[k] + a * (p1[k] - i[k]) + b * (p2[k] - i[k]) for k in i}
    if lam == 0.5:
        want = {k: i[k] + (p1[k] - i[k] + p2[k] - i[k]) / math.sqrt(2) for k in i}
    assert_sd_close(wm.slerp(init, pols, lam, granularity), want, rtol=1e-12, atol=1e-12)


def test_slerp_pair_weights_closed_form():
    """slerp_pair_weights: orthogonal -> (sin(pi/4), sin(pi/4)) at lam 0.5; 60 degrees at lam 0.5 ->
    sin(pi/6)/sin(pi/3) each; a zero vector or an anti-colinear pair -> LERP flagged as a fallback."""
    w_a, w_b, omega, used_lerp = wm.slerp_pair_weights(0.0, 1.0, 3.0, 0.5)
    assert (w_a, w_b, used_lerp) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5), False), abs=1e-15)
    assert omega == pytest.approx(math.pi / 2, abs=1e-15)
    w_a, w_b, _, used_lerp = wm.slerp_pair_weights(0.5 * 2.0 * 2.0, 2.0, 2.0, 0.5)
    expected = math.sin(math.pi / 6) / math.sin(math.pi / 3)
    assert (w_a, w_b, used_lerp) == pytest.approx((expected, expected, False), abs=1e-15)
    for dot, norm_a, norm_b in [(0.0, 0.0, 1.0), (-4.0, 2.0, 2.0)]:  # zero d_a; d_b = -d_a
        w_a, w_b, _, used_lerp = wm.slerp_pair_weights(dot, norm_a, norm_b, 0.3)
        assert (w_a, w_b) == pytest.approx((0.7, 0.3), abs=1e-15) and used_lerp


# ---------------------------------------------------------------------------------------------
# 5. Degenerate pairs: colinear, anti-colinear, identical, zero -> finite and equal to LERP
# ---------------------------------------------------------------------------------------------


def degenerate_case(kind):
    rng = np.random.default_rng(11)
    init = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    d1 = {k: 0.1 * rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    zero = {k: np.zeros(s) for k, s in GEMMA_SHAPES.items()}
    second = {
        "colinear": {k: 2.5 * v for k, v in d1.items()},
        "anti-colinear": {k: -0.7 * v for k, v in d1.items()},
        "identical": d1,
        "near-colinear": {k: v + 1e-11 * rng.standard_normal(v.shape) for k, v in d1.items()},
        "second zero": zero,
        "first zero": d1,
        "both zero": zero,
    }[kind]
    first = zero if kind in ("first zero", "both zero") else d1
    return from_deltas(init, [first, second])


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("kind", ["colinear", "anti-colinear", "identical", "near-colinear",
                                  "second zero", "first zero", "both zero"])
def test_degenerate_pairs_fall_back_to_lerp(kind, granularity):
    """sin Omega ~ 0 or a zero task vector: SLERP is finite (no NaN) and equals LERP,
    init + (1 - lam) d1 + lam d2, to 1e-12."""
    init, pols = degenerate_case(kind)
    lam = 0.3
    got = wm.slerp(init, pols, lam, granularity)
    assert all(torch.isfinite(v).all() for v in got.values())
    i, p1, p2 = to_numpy(init), to_numpy(pols[0]), to_numpy(pols[1])
    want = {k: i[k] + (1 - lam) * (p1[k] - i[k]) + lam * (p2[k] - i[k]) for k in i}
    assert_sd_close(got, want, rtol=1e-12, atol=1e-12)
    assert_sd_close(got, to_numpy(wm.lerp(init, pols, lam, granularity)), rtol=1e-12, atol=1e-12)


def test_zero_task_vector_in_one_block_only_changes_that_block():
    """Policy 2 left block 1 untouched (a policy whose training never wrote back part of the weights):
    block 1 falls back to LERP, every other group still gets its own SLERP angle, all finite."""
    init, pols = random_problem(seed=12)
    for k in pols[1]:
        if k.startswith("model.layers.1."):
            pols[1][k] = init[k].clone()
    got = wm.slerp(init, pols, 0.5)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_sd_close(got, merge_oracle(init, pols, 0.5), rtol=1e-12, atol=1e-12)
    i, p1 = to_numpy(init), to_numpy(pols[0])
    for k in i:
        if k.startswith("model.layers.1."):  # LERP with d2 = 0: init + d1 / 2
            np.testing.assert_allclose(got[k].numpy(), i[k] + 0.5 * (p1[k] - i[k]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. M > 2 policies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [3, 4])
def test_m_policies_slerp_equals_sequential_oracle(M):
    """M > 2: merging the m-th policy into the running SLERP with lam = 1/m, done here on the actual
    concatenated vectors (warp_min does it through the Gram matrix), to 1e-12."""
    init, pols = random_problem(seed=13, M=M)
    assert_sd_close(wm.slerp(init, pols), merge_oracle(init, pols, None), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("M", [3, 4])
def test_m_policies_lerp_is_the_plain_average(M):
    """LERP with M > 2 (lam = 1/m sequentially) is the plain average of the M policies: equal weights."""
    init, pols = random_problem(seed=14, M=M)
    want = {k: np.mean([to_numpy(p)[k] for p in pols], axis=0) for k in init}
    assert_sd_close(wm.lerp(init, pols), want, rtol=1e-12, atol=1e-12)


ORTHO_SLERP_COEFS = {
    # Orthogonal unit task vectors: each sequential step merges a unit vector into a unit running
    # result orthogonal to it (Omega = pi/2), so the step with lam = 1/m multiplies the running
    # coefficients by sin((1 - 1/m) pi/2) and gives sin(pi/(2m)) to the new policy.
    3: [math.sqrt(3 / 8), math.sqrt(3 / 8), 0.5],
    4: [math.sqrt(3 / 8) * math.sin(3 * math.pi / 8)] * 2 + [0.5 * math.sin(3 * math.pi / 8), math.sin(math.pi / 8)],
}


@pytest.mark.parametrize("M", [3, 4])
def test_m_orthogonal_equal_norm_slerp_coefficients(M):
    """Orthogonal task vectors of equal norm r: sequential SLERP with lam = 1/m keeps the norm r, and
    its coefficients are the closed form in ORTHO_SLERP_COEFS -- which are NOT equal (M = 3:
    sqrt(3/8) = 0.612, 0.612, 0.5). "Each policy ends with equal weight" holds for LERP only."""
    r = 0.2
    init_np, deltas = orthonormal_group_deltas(seed=15, M=M, norms=[r] * M)
    init, pols = from_deltas(init_np, deltas)
    i, ps = to_numpy(init), [to_numpy(p) for p in pols]
    c = ORTHO_SLERP_COEFS[M]
    want = {k: i[k] + sum(c[m] * (ps[m][k] - i[k]) for m in range(M)) for k in i}
    got = wm.slerp(init, pols)
    assert_sd_close(got, want, rtol=1e-12, atol=1e-12)
    for g, norm in group_norms(to_numpy(got), i, "layer").items():
        np.testing.assert_allclose(norm, r, rtol=1e-12, err_msg=g)
    assert max(c) - min(c) > 0.1  # the coefficients are measurably unequal


@pytest.mark.xfail(strict=True, reason="lam = 1/m sequential SLERP does not give equal coefficients "
                   "(WARP.md and merge_coefficients' docstring claim 'each policy ends with equal weight')")
def test_m3_orthogonal_slerp_equal_weight_claim():
    """The claim in WARP.md / merge_coefficients: for orthogonal equal-norm task vectors the M = 3
    SLERP has equal coefficients 1/sqrt(3) on each. False for lam = 1/m (see the test above); strict,
    so it fails loudly if the schedule is ever changed to one that does give equal weights."""
    init_np, deltas = orthonormal_group_deltas(seed=16, M=3)
    init, pols = from_deltas(init_np, deltas)
    i, ps = to_numpy(init), [to_numpy(p) for p in pols]
    want = {k: i[k] + sum((ps[m][k] - i[k]) / math.sqrt(3) for m in range(3)) for k in i}
    assert_sd_close(wm.slerp(init, pols), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", [wm.slerp, wm.lerp], ids=["slerp", "lerp"])
def test_lam_with_more_than_two_policies_raises(fn):
    """lam is only defined for M = 2; with M = 3 it must raise ValueError (M > 2 uses 1/m)."""
    init, pols = random_problem(seed=17, M=3)
    with pytest.raises(ValueError):
        fn(init, pols, 0.5)
    assert all(torch.isfinite(v).all() for v in fn(init, pols).values())  # lam=None is fine


def test_m3_order_dependence_slerp_not_lerp():
    """Non-orthogonal task vectors: sequential SLERP depends on the order of the policies (measurably),
    LERP (the plain average) does not. Each order still matches the oracle for that order."""
    rng = np.random.default_rng(18)
    init = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    shared = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}  # cos ~ 0.5 between runs
    scales = [0.05, 0.1, 0.3]  # unequal norms make the order matter even more
    deltas = [{k: s * (shared[k] + rng.standard_normal(shared[k].shape)) for k in shared} for s in scales]
    init, pols = from_deltas(init, deltas)
    reordered = [pols[2], pols[0], pols[1]]
    a, b = wm.slerp(init, pols), wm.slerp(init, reordered)
    assert_sd_close(b, merge_oracle(init, reordered), rtol=1e-12, atol=1e-12)
    assert max_abs_diff(a, b) > 1e-2
    assert max_abs_diff(wm.lerp(init, pols), wm.lerp(init, reordered)) < 1e-12


def test_m3_orthogonal_slerp_is_still_order_dependent():
    """Even orthogonal equal-norm task vectors give an order-dependent M = 3 SLERP under lam = 1/m:
    the last policy gets 0.5, the first two sqrt(3/8). (WARP.md's "unless orthogonal" does not hold.)"""
    init_np, deltas = orthonormal_group_deltas(seed=19, M=3, norms=[0.2] * 3)
    init, pols = from_deltas(init_np, deltas)
    assert max_abs_diff(wm.slerp(init, pols), wm.slerp(init, [pols[2], pols[0], pols[1]])) > 1e-3


def test_m3_with_a_zero_task_vector_is_finite():
    """A policy that never moved (zero task vector) among M = 3 gives a finite merge equal to the oracle."""
    init, pols = random_problem(seed=20, M=3)
    pols[1] = {k: v.clone() for k, v in init.items()}
    got = wm.slerp(init, pols)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_sd_close(got, merge_oracle(init, pols), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 7. dtypes: bf16 in -> bf16 out, close to the fp64 oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_bf16_in_bf16_out_within_bf16_rounding(method):
    """bf16 state dicts merge to bf16, within half a bf16 ulp (2^-8 relative, plus 1e-6 for fp32
    accumulation near zero) of the float64 oracle evaluated on the same bf16 values."""
    init, pols = random_problem(seed=21, dtype=torch.bfloat16, delta_scale=0.05)
    got = getattr(wm, method)(init, pols, 0.3)
    assert_sd_close(got, merge_oracle(init, pols, 0.3, method=method), rtol=BF16_HALF_ULP, atol=1e-6,
                    dtype=torch.bfloat16)


def test_liti_bf16_in_bf16_out_within_bf16_rounding():
    """LITI keeps bf16 and is within half a bf16 ulp of (1 - eta) init + eta merged in float64."""
    init, (merged,) = random_problem(seed=22, M=1, dtype=torch.bfloat16)
    i, m = to_numpy(init), to_numpy(merged)
    want = {k: 0.7 * i[k] + 0.3 * m[k] for k in i}
    assert_sd_close(wm.liti(init, merged, 0.3), want, rtol=BF16_HALF_ULP, atol=1e-6, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_equals_input_dtype(dtype):
    """slerp, lerp and liti return tensors of the input dtype (fp64 stays fp64, bf16 stays bf16)."""
    init, pols = random_problem(seed=23, dtype=dtype)
    merged = wm.slerp(init, pols)
    for out in (merged, wm.lerp(init, pols), wm.liti(init, merged, 0.3)):
        assert {v.dtype for v in out.values()} == {dtype}


def test_mixed_dtypes_are_kept_per_tensor():
    """A checkpoint with bf16 matrices and fp32 norms: every output tensor keeps its own dtype."""
    init, pols = random_problem(seed=24)
    want_dtype = {k: torch.float32 if k.endswith("norm.weight") else torch.bfloat16 for k in init}
    init, *pols = [{k: v.to(want_dtype[k]) for k, v in sd.items()} for sd in [init, *pols]]
    merged = wm.slerp(init, pols)
    for out in (merged, wm.lerp(init, pols), wm.liti(init, merged, 0.3)):
        assert {k: v.dtype for k, v in out.items()} == want_dtype


# ---------------------------------------------------------------------------------------------
# 8. Property tests (hypothesis): random shapes, tensor counts, lam, granularity
# ---------------------------------------------------------------------------------------------


@st.composite
def merge_problems(draw):
    """(init, [p1, p2], lam, granularity) with 1-5 tensors of random shapes, some inside blocks."""
    names, shapes = [], {}
    for i in range(draw(st.integers(1, 5))):
        block = draw(st.one_of(st.none(), st.integers(0, 2)))
        name = f"model.layers.{block}.mlp.w{i}.weight" if block is not None else f"model.extra_{i}.weight"
        shapes[name] = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    s1, s2 = draw(st.sampled_from([1e-3, 1.0, 1e3])), draw(st.sampled_from([1e-3, 1.0, 1e3]))
    second_zero = draw(st.sampled_from([False, False, False, True]))
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    d1 = {k: s1 * rng.standard_normal(s) for k, s in shapes.items()}
    d2 = {k: (0.0 if second_zero else s2) * rng.standard_normal(s) for k, s in shapes.items()}
    init_t, pols = from_deltas(init, [d1, d2])
    return init_t, pols, draw(st.floats(0.0, 1.0)), draw(st.sampled_from(GRANULARITIES))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problem=merge_problems())
def test_property_slerp_is_finite_in_span_with_closed_form_coefficients(problem):
    """For any shapes / tensor count / lam / granularity: the output is finite, out - init lies in
    span{d1, d2} of each group (least-squares residual ~ 0), and equals a d1 + b d2 with the
    closed-form (a, b) of that group (1e-10 of the terms' size)."""
    init, pols, lam, granularity = problem
    got = wm.slerp(init, pols, lam, granularity)
    assert all(torch.isfinite(v).all() for v in got.values())
    i, o, p1, p2 = to_numpy(init), to_numpy(got), to_numpy(pols[0]), to_numpy(pols[1])
    for names in groups(list(i), granularity).values():
        base = concat(i, names)
        y, d1, d2 = concat(o, names) - base, concat(p1, names) - base, concat(p2, names) - base
        roundoff = 1e-13 * np.abs(base).max()  # out - init recovered from fp64 out
        basis = np.stack([d1, d2], axis=1)
        residual = y - basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
        assert np.abs(residual).max() <= 1e-9 * np.abs(y).max() + roundoff
        a, b = slerp_coefficients_oracle(d1, d2, lam)
        tol = 1e-10 * (abs(a) * np.abs(d1).max() + abs(b) * np.abs(d2).max()) + roundoff
        np.testing.assert_allclose(y, a * d1 + b * d2, rtol=0, atol=tol)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problem=merge_problems())
def test_property_endpoints(problem):
    """For any problem: lam = 0 returns policy 1 and lam = 1 policy 2 (slerp and lerp, to fp64 roundoff)."""
    init, pols, _, granularity = problem
    for fn in (wm.slerp, wm.lerp):
        for lam, want in [(0.0, pols[0]), (1.0, pols[1])]:
            w = to_numpy(want)
            scale = max(np.abs(v).max() for v in w.values()) + max(np.abs(v).max() for v in to_numpy(init).values())
            assert_sd_close(fn(init, pols, lam, granularity), w, rtol=0, atol=4e-16 * scale)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problem=merge_problems(), eta=st.floats(0.0, 1.0))
def test_property_liti_is_the_convex_combination(problem, eta):
    """For any eta in [0, 1]: liti = (1 - eta) init + eta merged (fp64, 1e-15), hence between the two."""
    init, (merged, _), _, _ = problem
    got, i, m = to_numpy(wm.liti(init, merged, eta)), to_numpy(init), to_numpy(merged)
    for k in i:
        np.testing.assert_allclose(got[k], (1 - eta) * i[k] + eta * m[k], rtol=1e-15, atol=1e-15 * np.abs(m[k]).max())
        slack = 1e-15 * (np.abs(i[k]) + np.abs(m[k]))
        assert np.all(got[k] >= np.minimum(i[k], m[k]) - slack) and np.all(got[k] <= np.maximum(i[k], m[k]) + slack)


# ---------------------------------------------------------------------------------------------
# 9. Granularity: layer / tensor / model, and group_of
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,granularity,group", [
    ("model.layers.0.self_attn.q_proj.weight", "layer", "model.layers.0"),
    ("model.layers.0.mlp.up_proj.weight", "layer", "model.layers.0"),
    ("model.layers.1.input_layernorm.weight", "layer", "model.layers.1"),
    ("model.layers.10.mlp.down_proj.weight", "layer", "model.layers.10"),
    ("model.embed_tokens.weight", "layer", "model.embed_tokens.weight"),
    ("model.norm.weight", "layer", "model.norm.weight"),
    ("model.layers.0.self_attn.q_proj.weight", "tensor", "model.layers.0.self_attn.q_proj.weight"),
    ("model.norm.weight", "tensor", "model.norm.weight"),
])
def test_group_of_names(name, granularity, group):
    """group_of: block tensors -> "model.layers.N" (layer), every other tensor -> its own name;
    "tensor" -> the name itself."""
    assert wm.group_of(name, granularity) == group


def test_group_of_model_is_one_group_and_blocks_1_and_10_differ():
    """"model" puts every tensor in one group; under "layer", blocks 1 and 10 are different groups."""
    assert len({wm.group_of(n, "model") for n in GEMMA_SHAPES}) == 1
    block_1, block_10 = "model.layers.1.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight"
    assert wm.group_of(block_1, "layer") != wm.group_of(block_10, "layer")
    assert len({wm.group_of(n, "layer") for n in GEMMA_SHAPES}) == 4  # embed, block 0, block 1, norm


def test_unknown_granularity_raises():
    """An unknown granularity is an error (ValueError), in group_of and in slerp/lerp."""
    with pytest.raises(ValueError):
        wm.group_of("model.norm.weight", "block")
    init, pols = random_problem(seed=25)
    for fn in (wm.slerp, wm.lerp):
        with pytest.raises(ValueError):
            fn(init, pols, 0.5, granularity="per-layer")


def granularity_problem():
    """Task vectors whose pairwise correlation and norm ratio differ per tensor (rho from -0.9 to 0.9),
    so per-tensor, per-block and global angles are all different."""
    rng = np.random.default_rng(26)
    init = {k: rng.standard_normal(s) for k, s in GEMMA_SHAPES.items()}
    rhos = [0.9, -0.6, 0.0, 0.5, -0.9, 0.2, 0.7, -0.3]
    ratios = [1.0, 3.0, 0.5, 2.0, 0.3, 1.5, 4.0, 0.8]
    d1, d2 = {}, {}
    for (k, s), rho, ratio in zip(GEMMA_SHAPES.items(), rhos, ratios):
        u, v = rng.standard_normal(s), rng.standard_normal(s)
        d1[k] = 0.1 * u
        d2[k] = 0.1 * ratio * (rho * u + math.sqrt(1 - rho ** 2) * v)
    return from_deltas(init, [d1, d2])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_each_granularity_matches_its_own_oracle(granularity):
    """One angle per block (+ embed, + norm) / per tensor / for the model: each equals its oracle
    to 1e-12 and is measurably different (> 1e-3) from the two other granularities' oracles."""
    init, pols = granularity_problem()
    got = wm.slerp(init, pols, 0.4, granularity)
    assert_sd_close(got, merge_oracle(init, pols, 0.4, granularity), rtol=1e-12, atol=1e-12)
    for other in GRANULARITIES:
        if other != granularity:
            assert max_abs_diff(got, to_torch(merge_oracle(init, pols, 0.4, other))) > 1e-3, other


def test_granularities_give_measurably_different_results():
    """On the constructed problem, layer, tensor and model SLERP differ pairwise by > 1e-3 (the task
    vectors are ~0.1), so ignoring the granularity argument cannot go unnoticed."""
    init, pols = granularity_problem()
    outs = {g: wm.slerp(init, pols, 0.4, g) for g in GRANULARITIES}
    for a, b in [("layer", "tensor"), ("layer", "model"), ("tensor", "model")]:
        assert max_abs_diff(outs[a], outs[b]) > 1e-3, (a, b)


def test_default_granularity_is_layer():
    """slerp/lerp default to the paper's per-layer angles."""
    init, pols = granularity_problem()
    assert max_abs_diff(wm.slerp(init, pols, 0.4), wm.slerp(init, pols, 0.4, "layer")) == 0.0
    assert_sd_close(wm.slerp(init, pols, 0.4), merge_oracle(init, pols, 0.4, "layer"), rtol=1e-12, atol=1e-12)


def test_block_tensors_share_one_angle_and_blocks_are_independent():
    """"layer": every tensor of block 0 gets the same coefficients (a, b); changing policy 2's block 1
    leaves block 0's merge untouched, whereas under "model" (one global angle) it changes it."""
    init, pols = granularity_problem()
    i, o = to_numpy(init), to_numpy(wm.slerp(init, pols, 0.4, "layer"))
    p1, p2 = to_numpy(pols[0]), to_numpy(pols[1])
    block0 = [k for k in i if k.startswith("model.layers.0.")]
    coefs = [np.linalg.lstsq(np.stack([(p1[k] - i[k]).ravel(), (p2[k] - i[k]).ravel()], 1),
                             (o[k] - i[k]).ravel(), rcond=None)[0] for k in block0]
    for c in coefs[1:]:
        np.testing.assert_allclose(c, coefs[0], rtol=1e-10)
    changed = [pols[0], {k: v * 1.5 - 0.5 * init[k] if k.startswith("model.layers.1.") else v
                         for k, v in pols[1].items()}]
    for granularity, should_change in [("layer", False), ("model", True)]:
        before, after = wm.slerp(init, pols, 0.4, granularity), wm.slerp(init, changed, 0.4, granularity)
        diff = max(float((before[k] - after[k]).abs().max()) for k in block0)
        assert (diff > 1e-4) == should_change, (granularity, diff)


# ---------------------------------------------------------------------------------------------
# 10. mergekit's nuslerp as an independent peer (granularity="tensor")
# ---------------------------------------------------------------------------------------------


def nuslerp_oracle(init, policies, weights):
    """mergekit's nuslerp with a base model, re-stated in float64 numpy.

    Source: arcee-ai/mergekit, mergekit/merge_methods/nuslerp.py (commit 0853a11a), NuSlerpTask.execute
    and nuslerp(): the base model is popped, the two remaining models keep their order, and
        t = weights[1] / sum(weights)            (t = 0.5 if |sum(weights)| < 1e-6)
        v0 = model_0 - base, v1 = model_1 - base, flattened (nuslerp_flatten defaults to True)
        theta = acos(clamp(<v0/max(|v0|,1e-7), v1/max(|v1|,1e-7)>, -1, 1))
        res = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta, LERP (1-t) v0 + t v1 if |sin theta| < 1e-8
        out = base + res
    Mapping to warp_min: weights (1 - lam, lam) normalise to t = lam (their sum is 1; any positive
    multiple gives the same t), and t multiplies the *second* model's task vector -- the same
    convention as warp_min's lam weighting the second policy. Per-tensor flattening = "tensor".
    (mergekit computes in the tensor dtype; this re-statement is float64.)
    """
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    base, m0, m1 = to_numpy(init), to_numpy(policies[0]), to_numpy(policies[1])
    out = {}
    for k in base:
        v0, v1 = (m0[k] - base[k]).ravel(), (m1[k] - base[k]).ravel()
        v0_u = v0 / max(np.linalg.norm(v0), 1e-7)
        v1_u = v1 / max(np.linalg.norm(v1), 1e-7)
        theta = np.arccos(np.clip(np.sum(v0_u * v1_u), -1.0, 1.0))
        if abs(np.sin(theta)) < 1e-8:
            res = (1 - t) * v0 + t * v1
        else:
            res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
        out[k] = base[k] + res.reshape(base[k].shape)
    return out


@pytest.mark.parametrize("weight_scale", [1.0, 4.0])
@pytest.mark.parametrize("lam", [0.2, 0.5, 0.9])
def test_tensor_granularity_equals_mergekit_nuslerp(lam, weight_scale):
    """slerp(granularity="tensor", lam) == base + nuslerp with weights (1 - lam, lam) (any scale:
    nuslerp normalises them), to 1e-12; the per-layer default measurably differs from it."""
    init, pols = granularity_problem()
    weights = (weight_scale * (1 - lam), weight_scale * lam)
    peer = nuslerp_oracle(init, pols, weights)
    assert_sd_close(wm.slerp(init, pols, lam, "tensor"), peer, rtol=1e-12, atol=1e-12)
    assert max_abs_diff(wm.slerp(init, pols, lam, "layer"), to_torch(peer)) > 1e-3


# ---------------------------------------------------------------------------------------------
# 11. EMA anchor
# ---------------------------------------------------------------------------------------------


def test_ema_update_state_dicts_in_place_closed_form():
    """ema_update(anchor, online, mu) sets anchor <- (1 - mu) anchor + mu online in place (same tensor
    objects), fp64 to 1e-15; online is untouched."""
    init, (anchor, online) = random_problem(seed=27)
    a0, o0 = to_numpy(anchor), to_numpy(online)
    ids = {k: id(v) for k, v in anchor.items()}
    wm.ema_update(anchor, online, 0.37)
    assert {k: id(v) for k, v in anchor.items()} == ids
    assert_sd_close(anchor, {k: 0.63 * a0[k] + 0.37 * o0[k] for k in a0}, rtol=1e-15, atol=1e-15)
    assert_sd_close(online, o0, rtol=0, atol=0)


def test_ema_update_mu_zero_and_one():
    """mu = 0 leaves the anchor bit-for-bit unchanged; mu = 1 copies the online weights exactly."""
    for dtype in (torch.float32, torch.bfloat16):
        _, (anchor, online) = random_problem(seed=28, dtype=dtype)
        before = {k: v.clone() for k, v in anchor.items()}
        wm.ema_update(anchor, online, 0.0)
        assert all(torch.equal(anchor[k], before[k]) for k in anchor)
        wm.ema_update(anchor, online, 1.0)
        assert all(torch.equal(anchor[k], online[k]) for k in anchor)


def test_ema_update_on_modules():
    """nn.Modules (the Gemma-named Transformer) are updated in place through their parameters:
    every parameter equals (1 - mu) a + mu o; Parameter objects and requires_grad are kept."""
    cfg = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, head_dim=8,
                      d_ff=32, max_seq_len=16)
    anchor = Transformer(cfg, generator=torch.Generator().manual_seed(0))
    online = Transformer(cfg, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # norms start at zero in both; make them differ too
        for p in online.parameters():
            p.add_(0.01)
    a0 = {k: v.detach().double().clone() for k, v in anchor.named_parameters()}
    o0 = {k: v.detach().double().clone() for k, v in online.named_parameters()}
    params_before = {k: id(p) for k, p in anchor.named_parameters()}
    wm.ema_update(anchor, online, 0.25)
    assert {k: id(p) for k, p in anchor.named_parameters()} == params_before
    for k, p in anchor.named_parameters():
        assert p.requires_grad
        np.testing.assert_allclose(p.detach().double().numpy(), (0.75 * a0[k] + 0.25 * o0[k]).numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=k)


def test_ema_update_fp32_anchor_with_bf16_online_moves_by_mu_times_difference():
    """fp32 anchor, bf16 policy, mu = 0.01: the anchor moves by mu * (online - anchor) = 6.25e-4,
    which a bf16 anchor would round away (bf16 ulp at 1 is 2^-7 = 7.8e-3)."""
    anchor = {"w": torch.ones(64, dtype=torch.float32)}
    online = {"w": torch.full((64,), 1.0625, dtype=torch.bfloat16)}  # 1 + 2^-4, exact in bf16
    wm.ema_update(anchor, online, 0.01)
    assert anchor["w"].dtype == torch.float32
    np.testing.assert_allclose(anchor["w"].numpy(), 1.0 + 0.01 * 0.0625, rtol=1e-7)
    bf16_anchor = {"w": torch.ones(64, dtype=torch.bfloat16)}  # why the anchor is kept in fp32
    wm.ema_update(bf16_anchor, online, 0.01)
    assert torch.equal(bf16_anchor["w"], torch.ones(64, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# 12. Large-tensor accuracy of the float64 Gram matrix
# ---------------------------------------------------------------------------------------------


def test_tensor_gram_chunked_equals_unchunked():
    """tensor_gram with chunks smaller than the tensor (and not dividing it) equals one chunk and a
    float64 numpy Gram matrix, to 1e-13 relative."""
    rng = np.random.default_rng(29)
    init = rng.standard_normal((37, 29)).astype(np.float32)
    pols = [init + 0.1 * rng.standard_normal(init.shape).astype(np.float32) for _ in range(3)]
    d = np.stack([p.astype(np.float64).ravel() - init.astype(np.float64).ravel() for p in pols])
    want = d @ d.T
    t_init, t_pols = torch.from_numpy(init), [torch.from_numpy(p) for p in pols]
    whole = wm.tensor_gram(t_init, t_pols, chunk=1 << 30)
    assert whole.dtype == torch.float64
    for chunk in (1, 7, 100, init.size - 1):
        np.testing.assert_allclose(wm.tensor_gram(t_init, t_pols, chunk=chunk).numpy(), whole.numpy(), rtol=1e-13)
    np.testing.assert_allclose(whole.numpy(), want, rtol=1e-13)


@functools.lru_cache(maxsize=1)
def large_fp32_problem(n=4_000_037):
    """A ~4e6-element fp32 tensor and two policies; Gram matrix of their task vectors by float64 numpy."""
    rng = np.random.default_rng(30)
    init = rng.standard_normal(n).astype(np.float32)
    noise = rng.standard_normal((2, n)).astype(np.float32)
    p1 = init + np.float32(0.01) * noise[0]
    p2 = init + np.float32(0.005) * noise[0] + np.float32(0.01) * noise[1]  # cos(d1, d2) ~ 0.45
    d1 = p1.astype(np.float64) - init.astype(np.float64)
    d2 = p2.astype(np.float64) - init.astype(np.float64)
    want = np.array([[d1 @ d1, d1 @ d2], [d1 @ d2, d2 @ d2]])
    return torch.from_numpy(init), [torch.from_numpy(p1), torch.from_numpy(p2)], want


@pytest.mark.parametrize("chunk", [None, 1 << 20, 1 << 18], ids=["default-chunk", "chunk-2^20", "chunk-2^18"])
def test_tensor_gram_large_fp32_tensor_matches_float64_numpy(chunk):
    """A 4e6-element fp32 tensor: every Gram entry matches a float64 numpy dot to 1e-12 relative
    (numpy's dot is itself within 6e-14 of math.fsum here) -- which an fp32 reduction does not reach."""
    t_init, t_pols, want = large_fp32_problem()
    kwargs = {} if chunk is None else {"chunk": chunk}
    np.testing.assert_allclose(wm.tensor_gram(t_init, t_pols, **kwargs).numpy(), want, rtol=1e-12)
    fp32_dot = float(torch.dot(t_pols[0] - t_init, t_pols[1] - t_init))
    assert abs(fp32_dot - want[0, 1]) / abs(want[0, 1]) > 1e-12  # the tolerance discriminates
