"""Small random Mistral / Llama models against transformers' PyTorch classes with the same
weights, and the weight loaders (live torch model, safetensors directories, plain and sharded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _randomize(m, seed):
    """Weights large enough that attention is peaked (so a window changes the output), and
    norm weights away from 1 (so a missing norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return m.eval()


def hf_mistral(sliding_window=8, seed=0):
    cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=sliding_window, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    return _randomize(transformers.MistralForCausalLM(cfg), seed)


def hf_llama3(tie=False, seed=1):
    cfg = transformers.LlamaConfig(
        vocab_size=89, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=500000.0, attn_implementation="eager",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))
    return _randomize(transformers.LlamaForCausalLM(cfg), seed)


def ref_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 89, size=(2, 40)).astype(np.int32)


def test_mistral_sliding_window_matches_transformers():
    hf = hf_mistral(sliding_window=8)
    model, tok = models.load_model(hf)
    assert tok is None and isinstance(model, models.Mistral) and model.config.sliding_window == 8
    ref = ref_logits(hf, IDS)
    ours, _ = model(IDS)
    err = rel_err(ours, ref)
    # the same weights without the window: the test input is long enough for the window to matter
    nowin = models.from_params(models.ModelConfig(**{**model.config.to_dict(), "sliding_window": None}),
                               models.params_of(model))
    err_nowin = rel_err(nowin(IDS)[0], ref)
    print(f"\nMistral (window 8, 40 tokens) vs transformers: rel err {err:.3g}; without the window {err_nowin:.3g}")
    assert err <= 1e-4
    assert err_nowin > 1e-2


def test_mistral_prefill_then_decode_with_window_matches_transformers():
    """Prefill 12 tokens, decode 28 more one at a time (far past the window of 8): equal to
    transformers' full forward pass. KIVI caches (G=16, R=16) give the dense logits exactly
    until the first 16 keys are quantized (decode of position 15), then differ, less with
    more bits."""
    hf = hf_mistral(sliding_window=8)
    model, _ = models.load_model(hf)
    ref = ref_logits(hf, IDS)
    apply, params = models.functional(model)
    step = jax.jit(apply)
    out = {}
    for bits in (None, 4, 2):
        kivi = None if bits is None else kivi_jax.KIVIConfig(bits, bits, 16, 16)
        cache = model.init_cache(2, 40, kivi=kivi)
        lg, cache = step(params, IDS[:, :12], cache)
        got = [lg]
        for t in range(12, 40):
            lg, cache = step(params, IDS[:, t:t + 1], cache)
            got.append(lg)
        out[bits] = np.concatenate([np.asarray(g) for g in got], 1)
        assert np.array_equal(np.asarray(cache.lengths), [40, 40])
        assert not np.any(np.asarray(cache.overflow))
        assert np.all(np.isfinite(out[bits]))
    err = rel_err(out[None], ref)
    late = {b: rel_err(out[b][:, 15:], out[None][:, 15:]) for b in (4, 2)}
    early = max(rel_err(out[b][:, :15], out[None][:, :15]) for b in (4, 2))
    print(f"\nMistral prefill 12 + decode 28, window 8: dense rel err {err:.3g}; KIVI vs dense before any "
          f"quantization {early:.2g}, after: 4-bit {late[4]:.3g}, 2-bit {late[2]:.3g}")
    assert err <= 1e-4
    assert early <= 1e-5
    assert 1e-4 < late[4] < late[2] < 1.0


def test_llama3_rope_scaling_untied_matches_transformers():
    hf = hf_llama3(tie=False)
    model, _ = models.load_model(hf)
    c = model.config
    assert (c.rope_type, c.rope_factor, c.rope_original_max_position_embeddings, c.tie_word_embeddings) == \
        ("llama3", 8.0, 64, False)
    np.testing.assert_allclose(c.rope_inv_freq(), hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    ids = np.random.default_rng(1).integers(0, 89, size=(1, 96)).astype(np.int32)
    err = rel_err(model(ids)[0], ref_logits(hf, ids))
    print(f"\nLlama (llama3 rope scaling, untied, GQA 4:1) vs transformers: rel err {err:.3g}")
    assert err <= 1e-4


def test_llama_tied_embeddings_matches_transformers():
    hf = hf_llama3(tie=True, seed=2)
    model, _ = models.load_model(hf)
    assert model.lm_head is None and "lm_head" not in models.params_of(model)
    ids = IDS[:1, :24]
    assert rel_err(model(ids)[0], ref_logits(hf, ids)) <= 1e-4


def _flat(p):
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(p)}


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_safetensors_directory_equals_live_model(tmp_path, shard):
    hf = hf_mistral(sliding_window=8)
    kw = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, **kw)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    from_dir, tok = models.load_model(tmp_path)
    live = models.from_torch(hf)
    assert tok is None and from_dir.config == live.config
    a, b = _flat(models.params_of(from_dir)), _flat(models.params_of(live))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the layout: q_proj of layer 1 is HF's weight transposed
    np.testing.assert_array_equal(a["layers/q_proj"][1], hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)


def test_bfloat16_weights_load_bit_exact(tmp_path):
    hf = hf_llama3(tie=False).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, _ = models.load_model(tmp_path, dtype=jnp.bfloat16)
    got = np.asarray(models.params_of(model)["layers"]["down_proj"][0]).view(np.uint16)
    want = hf.model.layers[0].mlp.down_proj.weight.detach().view(torch.int16).numpy().view(np.uint16).T
    assert model.dtype == jnp.bfloat16 and np.array_equal(got, want)
    live = _flat(models.params_of(models.from_torch(hf, jnp.bfloat16)))
    disk = _flat(models.params_of(model))
    assert all(np.array_equal(live[k].view(np.uint16), disk[k].view(np.uint16)) for k in live)


def test_loader_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download nonexistent-org/no-such-model-xyz"):
        models.load_model("nonexistent-org/no-such-model-xyz")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)
    cfg = models.ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=4, tie_word_embeddings=True)
    sd = {f"model.{k}": np.zeros(1) for k in ["embed_tokens.weight", "norm.weight"]}
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight' is missing"):
        models.loading.params_from_hf(cfg, sd.__getitem__, sd.keys(), jnp.float32)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        models.ModelConfig.from_hf_dict({"model_type": "gpt2"})
