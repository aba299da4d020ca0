"""Parity with Hugging Face transformers, the independent oracle for model.py (after minGPT's
tests/test_huggingface_import.py).

For each family (gemma, gemma2, gemma3_text) a tiny random transformers model is built offline,
its norm weights randomized too (they init to zero, which would hide a wrong (1 + w) convention),
and saved sharded. Our Transformer loads it and must give the same logits (fp32, 1e-4 absolute)
and the same 20-token greedy generation, with and without KV cache. The tiny configs turn every
family feature on: GQA, head_dim != d_model / n_head, query_pre_attn_scalar != head_dim, soft-
capping, a sliding window shorter than the sequences, Gemma 3's q/k norms, local RoPE base and
linear RoPE scaling; `test_features_are_exercised` checks each one changes the logits, so parity
is not vacuous.
"""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from model import FULL, SLIDING, ModelConfig, Transformer  # noqa: E402
from warp_scale.hf import config_to_hf  # noqa: E402

VOCAB, PROMPT_LEN, NEW_TOKENS, SEQ_LEN = 128, 6, 20, 40   # SEQ_LEN, PROMPT_LEN + NEW_TOKENS > window 8
SHARD = "30KB"  # the tiny models are ~0.3 MB in fp32, so this makes ~10 shards

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
LOCAL_GLOBAL = [SLIDING, FULL, SLIDING]
FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        query_pre_attn_scalar=20, sliding_window=8, layer_types=LOCAL_GLOBAL,
        attn_logit_softcapping=1.0, final_logit_softcapping=2.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        query_pre_attn_scalar=20, sliding_window=8, layer_types=LOCAL_GLOBAL,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=1.0,  # stored but unused by HF's Gemma 3 attention; we must ignore it too
        rope_parameters={FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 100.0}})),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning
    makes them ~50x slower; restored afterwards for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(model, seed):
    """Every parameter ~ N(0, 0.1), norm offsets ~ N(0, 0.5): the zero init would hide norm bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.1))
    return model


def hf_model(family, seed=0):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    return randomize_(getattr(transformers, model_cls)(config), seed).eval()


def tokens(batch=2, length=SEQ_LEN, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    """(family, transformers model, directory it was saved to, sharded)."""
    family = request.param
    model = hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path, max_shard_size=SHARD)
    return family, model, path


def test_checkpoint_is_sharded(family_checkpoint):
    """The fixture really exercises the sharded (index + several files) loading path."""
    _, _, path = family_checkpoint
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2


def test_logits_match_transformers(family_checkpoint):
    """Same weights, same input: fp32 logits agree within 1e-4 absolute."""
    _, hf, path = family_checkpoint
    ours = Transformer.from_pretrained(path).eval()
    idx = tokens()
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(family_checkpoint):
    """20 greedy tokens past the sliding window: ours with KV cache == ours without == transformers."""
    _, hf, path = family_checkpoint
    ours = Transformer.from_pretrained(path).eval()
    prompt = tokens(length=PROMPT_LEN, seed=1)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                           do_sample=False)
    with_cache = ours.generate(prompt, NEW_TOKENS, temperature=0)
    without_cache = ours.generate(prompt, NEW_TOKENS, temperature=0, use_cache=False)
    assert with_cache.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, expected)


def test_features_are_exercised(family_checkpoint):
    """Switching off any one Gemma 2/3 feature changes the logits, so the parity above tests it."""
    family, _, path = family_checkpoint
    ours = Transformer.from_pretrained(path).eval()
    switches = {"gemma": {},
                "gemma2": dict(attn_logit_softcap=None, final_logit_softcap=None, query_pre_attn_scalar=None,
                               sliding_window=None, layer_types=None),
                "gemma3_text": dict(final_logit_softcap=None, query_pre_attn_scalar=None, sliding_window=None,
                                    layer_types=None, rope_local_theta=None, rope_scaling_factor=1.0,
                                    qk_norm=False)}[family]
    idx = tokens()
    with torch.no_grad():
        reference = ours(idx)
        for field, off in switches.items():
            changes = {field: off}
            if field in ("sliding_window", "layer_types"):  # only meaningful together
                changes = dict(sliding_window=None, layer_types=None)
            variant = Transformer(dataclasses.replace(ours.cfg, **changes))
            variant.load_state_dict(ours.state_dict(), strict=(field != "qk_norm"))
            assert (variant(idx) - reference).abs().max() > 1e-3, f"{field} has no effect on the logits"


def test_save_pretrained_loads_in_transformers(family_checkpoint, tmp_path):
    """Our save_pretrained -> transformers AutoModelForCausalLM -> same logits; sharded, no lm_head."""
    family, _, path = family_checkpoint
    ours = Transformer.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path, max_shard_size=SHARD)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not any("lm_head" in name for name in index["weight_map"])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.model_type == family
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ours(idx), atol=1e-4, rtol=0)


def test_legacy_config_spelling(family_checkpoint, tmp_path):
    """Hub checkpoints use the transformers 4.x config.json spelling (rope_theta, rope_scaling,
    rope_local_base_freq, sliding_window_pattern, no layer_types): ours reads it as transformers 5.x does."""
    family, _, path = family_checkpoint
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    if family == "gemma3_text":
        full, local = rope[FULL], rope[SLIDING]
        config.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"],
                      rope_scaling={"rope_type": "linear", "factor": full["factor"]}, sliding_window_pattern=2)
    else:
        config.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    config.pop("layer_types", None)  # 4.x: gemma2 alternates local/global, gemma3 every pattern-th is global
    config.pop("_sliding_window_pattern", None)
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Transformer.from_pretrained(tmp_path).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    if family != "gemma":
        assert ours.cfg.layer_types == tuple(theirs.config.layer_types) == tuple(LOCAL_GLOBAL)
    if family == "gemma3_text":
        assert (ours.cfg.rope_theta, ours.cfg.rope_local_theta, ours.cfg.rope_scaling_factor) == (1000, 100, 2)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=0)


def test_bf16_load(family_checkpoint):
    """dtype=bfloat16: bf16 parameters, finite logits close to fp32 and to transformers in bf16."""
    _, _, path = family_checkpoint
    ours32 = Transformer.from_pretrained(path).eval()
    ours16 = Transformer.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    idx = tokens()
    with torch.no_grad():
        got = ours16(idx).float()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ours32(idx), atol=0.25, rtol=0)          # bf16 has ~3 digits
        torch.testing.assert_close(got, hf16(idx).logits.float(), atol=5e-2, rtol=0)


# ----------------------------------------------------------------------------------------------
# Multimodal Gemma 3: we load its language model and skip the vision tower
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multimodal_gemma3():
    text = transformers.Gemma3TextConfig(**COMMON, **FAMILIES["gemma3_text"][2])
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    return randomize_(transformers.Gemma3ForConditionalGeneration(config), seed=3).eval()


@pytest.mark.parametrize("prefix", ["as_saved", "model.language_model."])
def test_multimodal_gemma3_language_model(multimodal_gemma3, tmp_path, prefix):
    """Text-only logits of Gemma3ForConditionalGeneration == ours loaded from its checkpoint. transformers
    saves the language model under `language_model.model.`; its 5.x module names (also accepted) are
    `model.language_model.`."""
    multimodal_gemma3.save_pretrained(tmp_path, max_shard_size=SHARD)
    if prefix != "as_saved":  # rewrite the checkpoint with transformers 5.x module names
        state = {}
        for file in tmp_path.glob("*.safetensors"):
            state.update(load_file(file))
            file.unlink()
        (tmp_path / "model.safetensors.index.json").unlink()
        renamed = {name.replace("language_model.model.", prefix): t for name, t in state.items()}
        save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.cfg.qk_norm and ours.cfg.n_layer == 3
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), multimodal_gemma3(input_ids=idx).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Refusals: each names what is wrong in one line
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def single_file_checkpoint(tmp_path):
    """A one-file gemma2 checkpoint (state dict in memory, so tests can tamper with it)."""
    hf_model("gemma2").save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_bad_shape_names_the_tensor(single_file_checkpoint):
    path, state = single_file_checkpoint
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(90, 64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.1\.self_attn\.q_proj\.weight: "
                                         r"checkpoint has \(90, 64\), config\.json implies \(96, 64\)"):
        Transformer.from_pretrained(path)


def test_missing_tensor(single_file_checkpoint):
    path, state = single_file_checkpoint
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e\.g\. model\.norm\.weight"):
        Transformer.from_pretrained(path)


def test_unknown_model_type(single_file_checkpoint):
    path, _ = single_file_checkpoint
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'"):
        Transformer.from_pretrained(path)


def test_unsupported_rope_type(single_file_checkpoint):
    path, _ = single_file_checkpoint
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported rope type 'yarn'"):
        Transformer.from_pretrained(path)


def test_lm_head_equal_to_embedding_is_accepted(single_file_checkpoint):
    path, state = single_file_checkpoint
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    Transformer.from_pretrained(path)


def test_untied_lm_head_is_refused(single_file_checkpoint):
    path, state = single_file_checkpoint
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        Transformer.from_pretrained(path)


def test_save_refuses_what_the_family_cannot_express(tmp_path):
    """A Gemma-1-shaped config (no sandwich norms) with soft-capping has no faithful config.json."""
    with pytest.raises(ValueError, match=r"a gemma config\.json cannot express final_logit_softcap"):
        config_to_hf(ModelConfig(final_logit_softcap=30.0))


def test_save_pretrained_single_file_and_reload(tmp_path):
    """Below max_shard_size: one model.safetensors, no index; our reload is bit-identical."""
    model = Transformer(ModelConfig(), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    reloaded = Transformer.from_pretrained(tmp_path)
    assert reloaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)


# ----------------------------------------------------------------------------------------------
# KV cache == no cache, for our own configs (no transformers involved)
# ----------------------------------------------------------------------------------------------

OUR_CONFIGS = {
    "toy_default": ModelConfig(),
    "gemma2_like": ModelConfig(n_layer=3, n_kv_head=2, sandwich_norms=True, attn_logit_softcap=5.0,
                               final_logit_softcap=3.0, query_pre_attn_scalar=16, sliding_window=5,
                               layer_types=LOCAL_GLOBAL),
    "gemma3_like": ModelConfig(n_layer=3, n_kv_head=2, sandwich_norms=True, qk_norm=True,
                               final_logit_softcap=3.0, sliding_window=5, layer_types=LOCAL_GLOBAL,
                               rope_local_theta=100.0, rope_scaling_factor=4.0),
}


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_kv_cache_equals_full_forward(name):
    """Prefill + one-token decode steps with caches give the full forward's logits (1e-5), and
    greedy generation with cache == without, well past the sliding window."""
    cfg = OUR_CONFIGS[name]
    if name != "toy_default":  # larger weights make attention far from uniform; capped logits stay O(1)
        cfg = dataclasses.replace(cfg, init_std=0.2)
    model = Transformer(cfg, generator=torch.Generator().manual_seed(0)).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        for prefill in (4, 8):   # a prompt shorter and longer than the sliding window (5)
            caches = [dict() for _ in range(cfg.n_layer)]
            steps = [model(idx[:, :prefill], caches, start_pos=0)]
            steps += [model(idx[:, t:t + 1], caches, start_pos=t) for t in range(prefill, idx.shape[1])]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    prompt = idx[:, :3]
    assert torch.equal(model.generate(prompt, 30, temperature=0),
                       model.generate(prompt, 30, temperature=0, use_cache=False))
