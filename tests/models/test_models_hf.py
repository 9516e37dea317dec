"""Small random Mistral / Llama models against transformers' PyTorch classes with the same
weights, and the weight loaders (live torch model, safetensors directories, plain and sharded)."""

import json
import re

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


# ---- config.json read as transformers 5 reads it ----------------------------------------------
_BASE_CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _hf_config_from_json(d, tmp_path):
    """transformers' config read from a config.json holding d, and its rotary inv_freq."""
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf_cfg)
    assert rot.attention_scaling == 1.0  # the rope types we read leave the attention scale alone
    return hf_cfg, rot.inv_freq.numpy()


@pytest.mark.parametrize("edit", [
    # a non-empty rope_scaling replaces rope_parameters whole, its theta included (10000 here)
    dict(rope_parameters=dict(rope_type="default", rope_theta=5e5), rope_scaling=dict(type="linear", factor=4.0)),
    # ... and then the theta is the top-level rope_theta
    dict(rope_theta=1234.0, rope_parameters=dict(rope_type="default", rope_theta=5e5),
         rope_scaling=dict(type="linear", factor=4.0)),
    dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=5e5),
         rope_scaling={**_LLAMA3, "original_max_position_embeddings": 64}),
    dict(rope_scaling={}, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=5e5)),
    dict(rope_theta=777.0, rope_parameters=dict(rope_type="default", rope_theta=888.0)),
    dict(rope_theta=777.0, rope_parameters=dict(rope_type="default")),
    # llama3 without original_max_position_embeddings: max_position_embeddings (256)
    dict(rope_theta=5e5, rope_scaling=dict(_LLAMA3)),
    dict(rope_parameters={**_LLAMA3, "rope_theta": 5e5}),
    # ... and without max_position_embeddings either: LlamaConfig's 2048
    dict(rope_theta=5e5, rope_scaling=dict(_LLAMA3), max_position_embeddings=None),
], ids=["params-default+scaling-linear", "same+top-theta", "params-linear+scaling-llama3", "empty-scaling",
        "params-theta-wins", "top-theta", "llama3-no-orig", "llama3-no-orig-tf5", "llama3-no-orig-no-max"])
def test_rope_config_variants_read_as_transformers(edit, tmp_path):
    d = {"model_type": "llama", **_BASE_CFG, **edit}
    d = {k: v for k, v in d.items() if v is not None}  # None: the key is absent
    hf_cfg, inv_freq = _hf_config_from_json(d, tmp_path)
    ours = models.ModelConfig.from_hf_dict(d)
    np.testing.assert_allclose(ours.rope_inv_freq(), inv_freq, rtol=1e-6)
    assert ours.rope_type == hf_cfg.rope_parameters["rope_type"]
    assert ours.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert ours.max_position_embeddings == hf_cfg.max_position_embeddings
    if ours.rope_type == "llama3":
        assert ours.rope_original_max_position_embeddings == hf_cfg.rope_parameters["original_max_position_embeddings"]


@pytest.mark.parametrize("edit, window", [({}, 4096), (dict(sliding_window=None), None), (dict(sliding_window=7), 7)])
def test_mistral_defaults_for_absent_keys_are_transformers(edit, window, tmp_path):
    """No sliding_window key: MistralConfig's 4096 (an explicit null: no window); no
    num_key_value_heads: 8; no max_position_embeddings: 131072."""
    d = {"model_type": "mistral", **_BASE_CFG, "hidden_size": 128, "num_attention_heads": 16, **edit}
    for k in ("num_key_value_heads", "max_position_embeddings"):
        d.pop(k)
    hf_cfg, inv_freq = _hf_config_from_json(d, tmp_path)
    ours = models.ModelConfig.from_hf_dict(d)
    assert (ours.sliding_window, ours.num_kv_heads, ours.max_position_embeddings) == \
        (hf_cfg.sliding_window, hf_cfg.num_key_value_heads, hf_cfg.max_position_embeddings) == (window, 8, 131072)
    np.testing.assert_allclose(ours.rope_inv_freq(), inv_freq, rtol=1e-6)


def _edited_hf_dir(tmp_path, edit, **kw):
    cfg = transformers.LlamaConfig(**{**_BASE_CFG, "attn_implementation": "eager", **kw})
    hf = _randomize(transformers.LlamaForCausalLM(cfg), seed=3)
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    edit(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def _drop_original_max(d):
    d["rope_parameters"].pop("original_max_position_embeddings")


def _add_legacy_linear(d):
    assert d["rope_parameters"]["rope_type"] == "default"
    d["rope_scaling"] = {"type": "linear", "factor": 4.0}


@pytest.mark.parametrize("edit, kw, want", [
    (_drop_original_max, dict(rope_parameters={**_LLAMA3, "rope_theta": 1e4, "original_max_position_embeddings": 64}),
     dict(rope_type="llama3", rope_original_max_position_embeddings=256)),
    (_add_legacy_linear, {}, dict(rope_type="linear", rope_factor=4.0)),
], ids=["llama3-without-original-max", "rope_parameters-default+rope_scaling-linear"])
def test_edited_config_json_logits_match_transformers(edit, kw, want, tmp_path):
    """A directory whose config.json transformers reads with a fallback: our logits are its logits."""
    hf = _edited_hf_dir(tmp_path, edit, **kw)
    model, _ = models.load_model(tmp_path)
    c = model.config
    assert {k: getattr(c, k) for k in want} == want
    ids = np.random.default_rng(4).integers(0, 97, size=(1, 48)).astype(np.int32)
    ref = ref_logits(hf, ids)
    err = rel_err(model(ids)[0], ref)
    # the reading the loader had before (the llama3 fallback 8192; rope_parameters over rope_scaling)
    before = {"llama3": dict(rope_original_max_position_embeddings=8192), "linear": dict(rope_type="default")}[c.rope_type]
    old = models.from_params(models.ModelConfig(**{**c.to_dict(), **before}), models.params_of(model))
    err_old = rel_err(old(ids)[0], ref)
    print(f"\n{c.rope_type}: rel err {err:.3g} (the old reading: {err_old:.3g})")
    assert err <= 1e-4
    assert err_old > 1e-3


# ---- unreadable files name themselves ----------------------------------------------------------
def test_corrupt_hf_directory_files_name_the_file(tmp_path):
    hf = hf_llama3(tie=False)
    good = tmp_path / "good"
    hf.save_pretrained(good)
    blob = (good / "model.safetensors").read_bytes()
    cfg_text = (good / "config.json").read_text()

    def variant(name, files):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg_text)
        (d / "model.safetensors").write_bytes(blob)
        for f, content in files.items():
            (d / f).write_bytes(content) if isinstance(content, bytes) else (d / f).write_text(content)
        return d

    d = variant("badjson", {"config.json": "{oops"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'config.json'))}: not readable JSON \(JSONDecodeError") as e:
        models.load_model(d)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    d = variant("nokey", {"config.json": json.dumps({k: v for k, v in json.loads(cfg_text).items()
                                                     if k != "intermediate_size"})})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'config.json'))}: config.json lacks the required "
                                         r"key\(s\) \['intermediate_size'\]"):
        models.load_model(d)
    for name, content in [("truncated", blob[:len(blob) // 2]), ("garbage", b"hello world garbage")]:
        d = variant(name, {"model.safetensors": content})
        with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'model.safetensors'))}: not a readable "
                                             r"safetensors file \(SafetensorError: .*re-download it") as e:
            models.load_model(d)
        assert type(e.value.__cause__).__name__ == "SafetensorError"
    d = variant("badindex", {"model.safetensors.index.json": json.dumps({"metadata": {}})})
    with pytest.raises(ValueError, match=rf"{re.escape(str(d / 'model.safetensors.index.json'))}: no 'weight_map'"):
        models.load_model(d)
    assert models.load_model(good)[0].config.intermediate_size == 96  # the control loads


@pytest.mark.parametrize("source", ["/no/such/dir", "./no-such-dir", "~/no-such-model.gguf", "no-such.gguf", "a/b/c"])
def test_missing_path_is_not_taken_for_a_hub_id(source):
    with pytest.raises(FileNotFoundError, match=rf"^source={re.escape(repr(source))}: no such file or directory") as e:
        models.load_model(source)
    assert "huggingface-cli" not in str(e.value)
