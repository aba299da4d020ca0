"""Streaming checkpoint merge (warp_scale/merge.py): checked against an independent float64 oracle.

The oracle below does not use warp_min: it concatenates each group's task vectors into one
float64 vector and applies the closed-form SLERP (paper Eq. 3), sequentially for M > 2.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from warp_scale import merge as checkpoints  # noqa: E402

D, V, FF, N_LAYER = 16, 40, 24, 3


# --------------------------------------------------------------------------- synthetic checkpoints

def gemma_like(n_layer=N_LAYER, d=D, seed=0):
    """A state dict with Hugging Face Gemma names: embeddings, N blocks, final norm (no lm_head)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(V, d, generator=g)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{proj}_proj.weight"] = torch.randn(d, d, generator=g)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(FF, d, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(FF, d, generator=g)
        sd[p + "mlp.down_proj.weight"] = torch.randn(d, FF, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(d, generator=g)
        sd[p + "post_attention_layernorm.weight"] = torch.randn(d, generator=g)
    sd["model.norm.weight"] = torch.randn(d, generator=g)
    return sd


def policies_from(init, M, seed=1, shared=0.05, own=0.05):
    """Policies = init + a shared direction + their own noise, so angles are neither 0 nor 90 deg."""
    g = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
    return [{k: v + shared * common[k] + own * (1 + m) * torch.randn(v.shape, generator=g)
             for k, v in init.items()} for m in range(M)]


def write_ckpt(path, sd, n_shards=3, dtype=None, config=True):
    """An HF-style directory: shards + model.safetensors.index.json (or one file if n_shards=1)."""
    os.makedirs(path, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}
    names = list(sd)
    if n_shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = math.ceil(len(names) / n_shards)
        for s in range(n_shards):
            file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            part = {k: sd[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    if config:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "gemma", "hidden_size": D, "tie_word_embeddings": True}, f)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 256}, f)
    return path


def make_set(tmp_path, M=2, dtype=None, n_shards=3, seed=0):
    init = gemma_like(seed=seed)
    pols = policies_from(init, M, seed=seed + 1)
    init_dir = write_ckpt(str(tmp_path / "init"), init, n_shards, dtype)
    pol_dirs = [write_ckpt(str(tmp_path / f"pol{m}"), p, n_shards, dtype) for m, p in enumerate(pols)]
    if dtype is not None:   # the oracle sees what is on disk
        init = {k: v.to(dtype) for k, v in init.items()}
        pols = [{k: v.to(dtype) for k, v in p.items()} for p in pols]
    return init, pols, init_dir, pol_dirs


def load_dir(path):
    if os.path.isfile(path):
        return load_file(path)
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


# --------------------------------------------------------------------------- float64 oracle

def oracle_group(name, granularity):
    if granularity == "tensor":
        return name
    if granularity == "model":
        return "model"
    m = re.match(r"(model\.layers\.\d+)\.", name)
    return m.group(1) if m else name


def oracle_merge(init, pols, lam=None, granularity="layer", eta=None, method="slerp"):
    """Closed-form SLERP on each group's concatenated float64 task vectors; returns (sd, angles)."""
    groups = {}
    for k in init:
        groups.setdefault(oracle_group(k, granularity), []).append(k)
    out, angles = {}, {}
    for g, keys in groups.items():
        base = torch.cat([init[k].double().reshape(-1) for k in keys])
        deltas = [torch.cat([p[k].double().reshape(-1) for k in keys]) - base for p in pols]
        d1, d2 = deltas[0], deltas[1] if len(deltas) > 1 else None
        if d2 is not None:
            angles[g] = math.degrees(math.acos(float(d1 @ d2 / (d1.norm() * d2.norm()))))
        running = deltas[0]
        for m in range(1, len(deltas)):
            t = (0.5 if lam is None else lam) if len(deltas) == 2 else 1.0 / (m + 1)
            a, b = running, deltas[m]
            omega = math.acos(float(a @ b / (a.norm() * b.norm())))
            if method == "lerp" or math.sin(omega) < 1e-6:
                running = (1 - t) * a + t * b
            else:
                running = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
        merged = base + running
        if eta is not None:
            merged = (1 - eta) * base + eta * merged
        offset = 0
        for k in keys:
            n = init[k].numel()
            out[k] = merged[offset:offset + n].reshape(init[k].shape)
            offset += n
    return out, angles


def rel_err(ours, ref):
    return float((ours.double() - ref).norm() / ref.norm())


def run(argv, capsys=None):
    code = checkpoints.main(argv)
    err = capsys.readouterr().err if capsys else ""
    return code, err


def base_argv(init_dir, pol_dirs, out):
    return ["--init", init_dir, "--policies", *pol_dirs, "--out", out, "--quiet"]


# --------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("granularity", ["layer", "tensor", "model"])
def test_fp32_merge_matches_float64_oracle(tmp_path, granularity):
    """Each tensor of the streamed fp32 merge is within 1e-6 (relative) of the float64 oracle."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    code, _ = run(base_argv(init_dir, pol_dirs, out) + ["--lam", "0.3", "--granularity", granularity])
    assert code == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols, 0.3, granularity)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == torch.float32
        assert rel_err(ours[k], ref[k]) <= 1e-6, k


def test_liti_eta(tmp_path):
    """--eta applies LITI after the merge: (1 - eta) init + eta merged."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out) + ["--eta", "0.3"])[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols, eta=0.3)
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k


def test_eta_above_one_needs_flag(tmp_path, capsys):
    """eta > 1 extrapolates past the merged model: refused unless --allow-extrapolation."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    code, err = run(base_argv(init_dir, pol_dirs, out) + ["--eta", "1.5"], capsys)
    assert code == 2 and "--allow-extrapolation" in err and not os.path.exists(out)
    assert run(base_argv(init_dir, pol_dirs, out) + ["--eta", "1.5", "--allow-extrapolation"])[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols, eta=1.5)
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k


def test_three_policies_sequential(tmp_path):
    """M = 3: sequential SLERP with lam = 1/m, exactly as the concatenated oracle computes it."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path, M=3)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out))[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols)
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k
    report = json.load(open(os.path.join(out, "merge_report.json")))
    g = report["groups"]["model.layers.0"]
    assert set(g["cosines"]) == {"0-1", "0-2", "1-2"} and len(g["sequential_omega_deg"]) == 2


def test_lerp_method(tmp_path):
    """--method lerp: init + (1 - lam) d1 + lam d2."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out) + ["--method", "lerp", "--lam", "0.7"])[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols, 0.7, method="lerp")
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k


def test_bf16_stays_bf16(tmp_path):
    """bf16 inputs give bf16 outputs, within bf16 rounding of the float64 oracle."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path, dtype=torch.bfloat16)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out))[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols)
    for k in ref:
        assert ours[k].dtype == torch.bfloat16
        assert rel_err(ours[k], ref[k]) <= 2 ** -8, k
        assert torch.equal(ours[k], ref[k].to(torch.bfloat16)) or rel_err(ours[k], ref[k]) < 4e-3


def test_block_size_and_workers_do_not_change_the_result(tmp_path):
    """Block size only regroups float64 sums (results agree to rounding); the number of worker
    threads changes nothing at all (blocks are summed in a fixed order): bitwise identical."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    ra = checkpoints.merge_checkpoints(init_dir, pol_dirs, a, progress=False, workers=1)
    checkpoints.merge_checkpoints(init_dir, pol_dirs, b, progress=False, block_elems=7, workers=1)
    rc = checkpoints.merge_checkpoints(init_dir, pol_dirs, c, progress=False, block_elems=7, workers=3)
    sa, sb, sc = load_dir(a), load_dir(b), load_dir(c)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(sb[k], sc[k])
    assert abs(ra["groups"]["model.layers.1"]["omega_deg"] - rc["groups"]["model.layers.1"]["omega_deg"]) < 1e-9


def _shard_bytes(path):
    return {f: open(os.path.join(path, f), "rb").read()
            for f in sorted(os.listdir(path)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("granularity", ["layer", "tensor", "model"])
def test_held_groups_give_the_same_bytes_as_two_passes(tmp_path, granularity):
    """--max-group-mb: groups read once and held in memory give byte-identical shards (and the
    same angles) as streaming every group in two passes -- all held, none held, or a budget that
    holds some groups and streams the others; whatever the number of workers. (For a given block
    size: the blocks group the Gram's fp32 partial sums, so another block size agrees to rounding,
    as in test_block_size_and_workers_do_not_change_the_result.)"""
    _, _, init_dir, pol_dirs = make_set(tmp_path, M=3, dtype=torch.bfloat16)
    for block in (7, 64):
        runs = {}
        for label, budget, workers in [("stream", 0, 1), ("auto", "auto", 3), ("all", 1.0, 2),
                                       ("some", 0.002, 2)]:
            out = str(tmp_path / f"{label}-{block}")
            report = checkpoints.merge_checkpoints(init_dir, pol_dirs, out, progress=False, eta=0.7,
                                                   granularity=granularity, block_elems=block,
                                                   workers=workers, max_group_mb=budget)
            runs[label] = (report, _shard_bytes(out))
        n_groups = len(runs["stream"][0]["groups"])
        assert runs["stream"][0]["held_groups"] == 0 and runs["all"][0]["held_groups"] == n_groups
        if granularity != "model":                  # 0.002 MiB holds the small groups only
            assert 0 < runs["some"][0]["held_groups"] < n_groups
        assert runs["all"][0]["bytes_read"] * 2 == runs["stream"][0]["bytes_read"]
        for label, (report, shards) in runs.items():
            assert shards == runs["stream"][1], (label, block)
            assert report["groups"] == runs["stream"][0]["groups"], (label, block)


def test_default_holds_groups_only_when_the_inputs_do_not_fit_in_memory(tmp_path, monkeypatch):
    """max_group_mb=None (the CLI's default): "auto" when the M + 1 inputs are larger than the memory
    available (a second pass would read the disk), 0 when they fit or the system does not say. The
    report names the choice; the bytes are the same. (What "auto" holds: test_held_groups_... above.)"""
    _, _, init_dir, pol_dirs = make_set(tmp_path, M=2, dtype=torch.bfloat16)
    input_bytes = 3 * checkpoints.Checkpoint(init_dir).nbytes
    runs = {}
    for label, available in [("fits", input_bytes), ("too big", input_bytes - 1), ("unknown", None)]:
        monkeypatch.setattr(checkpoints, "memory_available", lambda: available)
        assert checkpoints.default_group_budget(input_bytes) == ("auto" if label == "too big" else 0)
        out = str(tmp_path / label)
        runs[label] = (checkpoints.merge_checkpoints(init_dir, pol_dirs, out, progress=False), _shard_bytes(out))
    assert runs["fits"][0]["max_group_mb"] == runs["unknown"][0]["max_group_mb"] == "0 (default)"
    assert runs["too big"][0]["max_group_mb"] == "auto (default)"
    assert runs["fits"][1] == runs["too big"][1] == runs["unknown"][1]
    auto = checkpoints.merge_checkpoints(init_dir, pol_dirs, str(tmp_path / "auto"), progress=False,
                                         max_group_mb="auto")        # an explicit value is used as given
    assert auto["max_group_mb"] == "auto" and auto["group_budget_mb"] == runs["too big"][0]["group_budget_mb"]
    assert isinstance(checkpoints.memory_available(), (int, type(None)))


def test_group_budget_plan():
    """A group is held only if it fits in what the budget has left when its first tensor comes
    up; its tensors give their bytes back as they are written (M + 1 inputs counted)."""
    class Ckpt:
        tensors = {n: checkpoints.TensorInfo(n, "F32", (k,), "f", 0) for n, k in
                   [("embed", 100), ("layers.0.a", 50), ("layers.0.b", 50), ("layers.1.a", 300), ("norm", 10)]}
    names = list(Ckpt.tensors)
    plan = lambda budget: checkpoints._plan_held_groups(Ckpt(), names, "layer", 2, budget)
    assert plan(0) == (set(), 0)
    assert plan(1200) == ({"embed", "layers.0", "norm"}, 1200)       # 3 inputs x 4 bytes x 100
    assert plan(3600) == ({"embed", "layers.0", "layers.1", "norm"}, 3600)
    assert plan(1199) == ({"norm"}, 120)                                # nothing else fits
    # groups interleaved in output order: the second is held only if both fit at once
    Ckpt.tensors = {n: checkpoints.TensorInfo(n, "F32", (50,), "f", 0) for n in
                    ["layers.0.a", "layers.1.a", "layers.0.b", "layers.1.b"]}
    names = list(Ckpt.tensors)
    assert plan(1200) == ({"layers.0"}, 1200)
    assert plan(1799) == ({"layers.0"}, 1200)
    assert plan(1800) == ({"layers.0", "layers.1"}, 1800)        # layers.0.a written first


def test_background_writer_error_is_raised():
    """A failing write (disk full...) on the writer thread is raised in the merging thread."""
    def fail(_piece):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        with checkpoints._BackgroundWrites() as background:
            background.put(fail, torch.zeros(1))
            for _ in range(200):                   # later puts (or the exit) raise it
                background.put(lambda p: None, torch.zeros(1))


def test_layout_index_and_side_files_mirrored(tmp_path):
    """Same shard files holding the same tensors, index total_size correct, config copied."""
    _, _, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out))[0] == 0
    idx_in = json.load(open(os.path.join(init_dir, "model.safetensors.index.json")))
    idx_out = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert idx_out["weight_map"] == idx_in["weight_map"]
    shards = sorted(set(idx_out["weight_map"].values()))
    assert len(shards) == 3
    assert idx_out["metadata"]["total_size"] == idx_in["metadata"]["total_size"]
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f, \
                safe_open(os.path.join(init_dir, shard), "pt") as g:
            assert sorted(f.keys()) == sorted(g.keys())
            assert f.metadata() == g.metadata()
    for side in ("config.json", "tokenizer_config.json"):
        assert open(os.path.join(out, side)).read() == open(os.path.join(init_dir, side)).read()
    assert sorted(os.listdir(tmp_path)) == ["init", "out", "pol0", "pol1"]   # no temp left over


def test_single_file_in_single_file_out(tmp_path):
    """A .safetensors file in gives one .safetensors file out (report written beside it)."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path, n_shards=1, seed=3)
    files = [os.path.join(d, "model.safetensors") for d in [init_dir] + pol_dirs]
    out = str(tmp_path / "merged.safetensors")
    assert run(["--init", files[0], "--policies", *files[1:], "--out", out, "--quiet"])[0] == 0
    assert os.path.isfile(out) and os.path.isfile(str(tmp_path / "merged.merge_report.json"))
    ours, (ref, _) = load_file(out), oracle_merge(init, pols)
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k


def test_dry_run_writes_nothing(tmp_path, capsys):
    """--dry-run validates and prints the plan; no file or directory is created."""
    _, _, init_dir, pol_dirs = make_set(tmp_path)
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "out")
    code = checkpoints.main(["--init", init_dir, "--policies", *pol_dirs, "--out", out, "--dry-run"])
    captured = capsys.readouterr().out
    assert code == 0 and sorted(os.listdir(tmp_path)) == before
    n_tensors = 1 + N_LAYER * 9 + 1
    assert f"{n_tensors} tensors" in captured and f"{N_LAYER + 2} groups" in captured
    assert "estimated peak memory" in captured and "nothing written" in captured


def test_overwrite_replaces_only_when_asked(tmp_path, capsys):
    """An existing --out is refused; --overwrite replaces it with the new complete output."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out) + ["--lam", "0.2"])[0] == 0
    code, err = run(base_argv(init_dir, pol_dirs, out), capsys)
    assert code == 2 and "already exists" in err
    assert run(base_argv(init_dir, pol_dirs, out) + ["--overwrite"])[0] == 0
    ours, (ref, _) = load_dir(out), oracle_merge(init, pols, 0.5)
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= 1e-6, k
    assert sorted(os.listdir(tmp_path)) == ["init", "out", "pol0", "pol1"]


def test_report_angles_norms_and_counts(tmp_path):
    """merge_report.json: per-group angle and norms match the oracle; counts, ties, timings present."""
    init, pols, init_dir, pol_dirs = make_set(tmp_path)
    out = str(tmp_path / "out")
    assert run(base_argv(init_dir, pol_dirs, out))[0] == 0
    report = json.load(open(os.path.join(out, "merge_report.json")))
    _, angles = oracle_merge(init, pols)
    assert set(report["groups"]) == set(angles)
    for g, e in report["groups"].items():
        assert abs(e["omega_deg"] - angles[g]) < 1e-6, g
        assert 10 < e["omega_deg"] < 85 and e["lerp_fallback"] is False
        keys = [k for k in init if oracle_group(k, "layer") == g]
        d1 = torch.cat([(pols[0][k].double() - init[k].double()).reshape(-1) for k in keys])
        assert abs(e["norms"][0] - float(d1.norm())) < 1e-9 * float(d1.norm())
    n_params = sum(v.numel() for v in init.values())
    assert report["params_in"] == report["params_out"] == n_params
    assert report["lerp_fallbacks"] == 0 and report["nonfinite"]["input_nonfinite"] == 0
    assert any("tied" in note for note in report["tied"])
    assert report["copied_files"] == ["config.json", "tokenizer_config.json"]
    assert {"pass1_s", "pass2_s", "total_s"} <= set(report["timings"])


def test_identical_policies_fall_back_to_lerp(tmp_path):
    """Colinear task vectors (sin Omega ~ 0): LERP fallback, reported, no NaN."""
    init = gemma_like()
    pol = policies_from(init, 1)[0]
    init_dir = write_ckpt(str(tmp_path / "init"), init)
    p_dir = write_ckpt(str(tmp_path / "pol"), pol)
    out = str(tmp_path / "out")
    assert run(["--init", init_dir, "--policies", p_dir, p_dir, "--out", out, "--quiet"])[0] == 0
    report = json.load(open(os.path.join(out, "merge_report.json")))
    assert report["lerp_fallbacks"] == len(report["groups"])
    ours = load_dir(out)
    for k in pol:
        torch.testing.assert_close(ours[k], pol[k])


# --------------------------------------------------------------------------- bad inputs

def _truncate(path):
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    p = os.path.join(path, shard)
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-100])


def _drop_shard(path):
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(path, shard))


def _reshape_one(path):
    sd = gemma_like(d=D)
    sd["model.norm.weight"] = torch.zeros(D + 1)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(FF, D + 1)
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    write_ckpt(path, sd)


def _nan_in_one(path):
    sd = load_dir(path)
    sd["model.layers.2.mlp.down_proj.weight"][3, 4] = float("nan")
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    write_ckpt(path, sd)


def _pickle(path):
    torch.save({"w": torch.zeros(2)}, os.path.join(path, "pytorch_model.bin"))
    for f in os.listdir(path):
        if f.startswith("model"):
            os.remove(os.path.join(path, f))


BAD_CASES = {
    # name: (how to break the set-up, extra argv or argv transform, expected message fragment)
    "missing_path": (None, lambda a, i, p, o: ["--init", i + "-nope", "--policies", *p, "--out", o], "no such file"),
    "pickle_bin": (("pol0", _pickle), None, "convert it to safetensors"),
    "truncated": (("pol1", _truncate), None, "truncated or corrupt"),
    "index_missing_shard": (("init", _drop_shard), None, "which is missing"),
    "shape_mismatch": (("pol1", _reshape_one), None, "model.layers.1.mlp.up_proj.weight shape"),
    "non_finite": (("pol1", _nan_in_one), None, "non-finite values (nan/inf) in tensor model.layers.2.mlp.down_proj.weight"),
    "out_is_input": (None, lambda a, i, p, o: ["--init", i, "--policies", *p, "--out", p[0], "--overwrite"], "is (or contains"),
    "out_contains_input": (None, lambda a, i, p, o: ["--init", i, "--policies", *p, "--out", os.path.dirname(i), "--overwrite"], "is (or contains"),
    "out_exists": (None, lambda a, i, p, o: (os.makedirs(o), a)[1], "already exists"),
    "lam_range": (None, lambda a, i, p, o: a + ["--lam", "1.5"], "--lam 1.5 is outside [0, 1]"),
    "eta_negative": (None, lambda a, i, p, o: a + ["--eta", "-0.1"], "--eta -0.1 is outside"),
    "bad_granularity": (None, lambda a, i, p, o: a + ["--granularity", "block"], "invalid choice"),
    "no_init": (None, lambda a, i, p, o: ["--policies", *p, "--out", o], "--init"),
    "group_budget": (None, lambda a, i, p, o: a + ["--max-group-mb", "-5"], "--max-group-mb -5.0: needs"),
    "group_budget_word": (None, lambda a, i, p, o: a + ["--max-group-mb", "lots"], "not a number of MiB"),
    "non_finite_held": (("pol1", _nan_in_one), lambda a, i, p, o: a + ["--max-group-mb", "auto"],
                        "non-finite values (nan/inf) in tensor model.layers.2.mlp.down_proj.weight"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case):
    """Every user mistake: exit status 2, one line on stderr naming the problem, nothing written."""
    breaker, argv_fn, fragment = BAD_CASES[case]
    _, _, init_dir, pol_dirs = make_set(tmp_path)
    if breaker:
        target, fn = breaker
        fn(str(tmp_path / target))
    out = str(tmp_path / "out")
    argv = base_argv(init_dir, pol_dirs, out)
    if argv_fn:
        argv = argv_fn(argv, init_dir, pol_dirs, out)
    before = {d: sorted(os.listdir(tmp_path / d)) for d in os.listdir(tmp_path)}
    capsys.readouterr()
    code = checkpoints.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    after = {d: sorted(os.listdir(tmp_path / d)) for d in os.listdir(tmp_path)}
    assert after == before            # nothing written (no out, no temporary left behind)


def test_cli_help_exits_0(capsys):
    assert checkpoints.main(["--help"]) == 0
    assert "--granularity" in capsys.readouterr().out


# --------------------------------------------------------------------------- crash safety

def test_sigkill_mid_merge_leaves_no_partial_output(tmp_path):
    """SIGKILL while the output is being written: --out is absent (never half-written); the next
    merge sweeps the dead run's temporary and produces a complete output."""
    g = torch.Generator().manual_seed(0)
    init = {f"model.layers.{i}.mlp.w": torch.randn(256, 1024, generator=g) for i in range(48)}
    pols = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(2)]
    init_dir = write_ckpt(str(tmp_path / "init"), init, n_shards=4)
    pol_dirs = [write_ckpt(str(tmp_path / f"pol{m}"), p, n_shards=4) for m, p in enumerate(pols)]
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-c", "import sys; from warp_scale import merge; sys.exit(merge.main(sys.argv[1:]))",
           "--init", init_dir, "--policies", *pol_dirs, "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_name = f".out.warp-tmp-{proc.pid}"
    deadline = time.time() + 30
    tmp_dir = tmp_path / tmp_name
    while time.time() < deadline and proc.poll() is None:      # kill once the first shard is started
        if os.path.isdir(tmp_dir) and any(f.endswith(".safetensors") for f in os.listdir(tmp_dir)):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_mid_write = os.path.exists(tmp_path / tmp_name)
    if os.path.exists(out):           # finished before the kill: then it must be complete
        assert len(load_dir(out)) == len(init)
    assert killed_mid_write, "the merge finished before it could be killed; make it slower"
    assert not os.path.exists(out)
    assert run(base_argv(init_dir, pol_dirs, out))[0] == 0
    assert len(load_dir(out)) == len(init) and not os.path.exists(tmp_path / tmp_name)
