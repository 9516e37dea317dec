"""ModelConfig parsing, random init, cache construction, call contract and compile cost."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
import models

TINY = models.ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16)


def test_smollm2_gguf_config_matches_the_published_shape(smollm2_gguf):
    c = models.ModelConfig.from_gguf(smollm2_gguf)
    # EVAL-DATA.md: 30 layers, hidden 576, intermediate 1536, 9 heads, 3 KV heads, head_dim 64,
    # vocab 49152, rope_theta 100000, 8192 positions, eps 1e-5, tied, 134.5M parameters
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.rms_norm_eps) == (49152, 1e5, 8192, 1e-5)
    assert c.tie_word_embeddings and c.model_type == "llama" and c.sliding_window is None
    assert round(c.num_params / 1e6, 1) == 134.5


def test_hf_dict_spellings_agree():
    old = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5,
               rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192), max_position_embeddings=131072)
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192)
    a, b = models.ModelConfig.from_hf_dict(old), models.ModelConfig.from_hf_dict(new)
    assert a == b and a.head_dim == 8 and a.rope_type == "llama3" and a.rope_factor == 8.0
    assert models.ModelConfig.from_dict(a.to_dict()) == a
    hash(a)  # static: it sits in the jitted graph definition


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_config_round_trips_through_transformers(model_type):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    kw = dict(sliding_window=16) if model_type == "mistral" else dict(rope_type="llama3", rope_factor=4.0)
    cfg = models.ModelConfig(**{**TINY.to_dict(), "model_type": model_type, "tie_word_embeddings": True, **kw})
    hf_cls = transformers.MistralConfig if model_type == "mistral" else transformers.LlamaConfig
    hf_cfg = hf_cls(**cfg.to_hf_dict())
    assert models.ModelConfig.from_hf_dict(hf_cfg.to_dict()) == cfg
    model_cls = transformers.MistralForCausalLM if model_type == "mistral" else transformers.LlamaForCausalLM
    assert model_cls(hf_cfg).num_parameters() == cfg.num_params


@pytest.mark.parametrize("bad, match", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4)), "rope_type='yarn'"),
    (dict(num_key_value_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(intermediate_size=None), r"config.json lacks the required key\(s\) \['intermediate_size'\]"),
    (dict(vocab_size=None, num_hidden_layers=None), r"lacks the required key\(s\) \['vocab_size', 'num_hidden_layers'\]"),
])
def test_config_errors_name_the_value(bad, match):
    d = {**TINY.to_hf_dict(), **bad}
    d = {k: v for k, v in d.items() if v is not None or k not in bad}  # bad None: the key is absent
    with pytest.raises(ValueError, match=match):
        models.ModelConfig.from_hf_dict(d)


def test_init_random_shapes_scale_and_determinism():
    m1 = models.init_random(TINY, jax.random.key(0), jnp.bfloat16, init_std=0.05)
    m2 = models.init_random(TINY, jax.random.key(0), jnp.bfloat16, init_std=0.05)
    p = models.params_of(m1)
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in jax.tree_util.tree_leaves_with_path(p)}
    assert {k: tuple(v.shape) for k, v in flat.items()} == models.param_shapes(TINY)
    assert all(v.dtype == jnp.bfloat16 for v in flat.values())
    assert sum(v.size for v in flat.values()) == TINY.num_params
    np.testing.assert_allclose(float(jnp.std(flat["layers/gate_proj"].astype(jnp.float32))), 0.05, rtol=0.05)
    assert np.all(np.asarray(flat["layers/mlp_norm"]) == 1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(models.params_of(m2))))


def test_init_cache_formats_and_shapes():
    m = models.init_random(TINY, jax.random.key(0))
    dense = m.init_cache(3, 40)
    assert isinstance(dense.layers, kivi_jax.DenseCache) and dense.layers.k.shape == (2, 3, 2, 40, 16)
    assert dense.layers.k.dtype == jnp.float32 and np.array_equal(np.asarray(dense.lengths), [0, 0, 0])
    q = m.init_cache(3, 1024, kivi=kivi_jax.KIVIConfig(group_size=16, residual_length=32), dtype=jnp.bfloat16)
    assert isinstance(q.layers, kivi_jax.KIVICache) and q.layers.k_res.shape == (2, 3, 2, 32, 16)
    assert q.layer(1).k_res.shape == (3, 2, 32, 16) and q.max_length == 1024
    assert q.nbytes < m.init_cache(3, 1024, dtype=jnp.bfloat16).nbytes / 3
    with pytest.raises(TypeError, match="kivi must be None or a KIVIConfig"):
        m.init_cache(1, 8, kivi={"k_bits": 2})


def test_call_contract_errors():
    m = models.init_random(TINY, jax.random.key(0))
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="attn_impl='fast'"):
        m(ids, attn_impl="fast")
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        m(ids.astype(np.float32))
    with pytest.raises(ValueError, match="B=3"):
        m(ids, m.init_cache(3, 8))
    with pytest.raises(TypeError, match="StackedCache"):
        m(ids, kivi_jax.DenseCache.init(batch=2, num_kv_heads=2, head_dim=16, max_length=8))


def test_token_ids_outside_the_vocabulary_are_refused():
    """An id >= V gave NaN logits, a negative one wrapped around: concrete ids are checked
    (those the call reads); traced ids are not (no host read under jit)."""
    m = models.init_random(TINY, jax.random.key(0))
    v = TINY.vocab_size
    ok = np.array([[0, 1, v - 1]], np.int32)
    assert np.all(np.isfinite(np.asarray(m(ok)[0])))
    for bad, shown in [([[v, 1, 2]], [v]), ([[-1, 1, v + 7]], [-1, v + 7])]:
        for ids in (np.array(bad, np.int32), jnp.array(bad, jnp.int32)):
            with pytest.raises(ValueError, match=re.escape(f"input_ids hold {len(shown)} token id(s) outside "
                                                           f"[0, vocab_size={v}), e.g. {shown}")):
                m(ids)
    cache = m.init_cache(2, 8)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=53\), e.g. \[99\]"):
        m(np.array([[1], [99]], np.int32), cache)  # a decode step
    # the padding after each row's lengths[b] and inactive rows are not read: not checked
    padded = np.array([[3, 4, -1], [5, -1, -1]], np.int32)
    lg, cache = m(padded, cache, lengths=np.array([2, 1], np.int32))
    assert np.all(np.isfinite(np.asarray(lg)[0, :2])) and np.isfinite(np.asarray(lg)[1, 0]).all()
    m(np.array([[2], [-1]], np.int32), cache, active=np.array([True, False]))
    with pytest.raises(ValueError, match=r"e.g. \[-1\]"):
        m(padded, m.init_cache(2, 8), lengths=np.array([3, 1], np.int32))
    # traced: no check, no error (the caller's business, as kivi_jax.generate checks its prompts)
    apply, params = models.functional(m)
    assert jax.jit(apply)(params, np.array([[v]], np.int32))[0].shape == (1, 1, v)


def test_one_token_prompt_with_lengths_then_decode_equals_full_forward():
    """The generate protocol: a prompt is any call with lengths= (here T == 1), decode has none."""
    m = models.init_random(TINY, jax.random.key(0), init_std=0.2)
    ids = np.random.default_rng(0).integers(0, 53, (2, 6)).astype(np.int32)
    apply, params = models.functional(m)
    full = np.asarray(jax.jit(apply)(params, ids)[0])
    cache = m.init_cache(2, 8)
    lg, cache = jax.jit(apply)(params, ids[:, :1], cache, lengths=np.array([1, 1], np.int32))
    out = [np.asarray(lg)]
    step = jax.jit(apply, static_argnames="attn_impl", donate_argnames="cache")
    for t in range(1, 6):
        lg, cache = step(params, ids[:, t:t + 1], cache, attn_impl="reference")
        out.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(out, 1), full, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(cache.lengths), [6, 6])


def test_decode_compile_cost_does_not_grow_with_depth():
    """Layers run in one lax.scan: a 32-layer Llama-2-7B shape lowers to the same program size
    as a 2-layer one (abstract shapes, nothing allocated)."""
    sizes = {}
    for layers in (2, 32):
        cfg = models.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=layers,
                                 num_heads=32, num_kv_heads=32, head_dim=128)
        m = models.abstract_model(cfg, jnp.bfloat16)
        apply, params = models.functional(m)
        cache = jax.eval_shape(lambda: m.init_cache(4, 4096, kivi=kivi_jax.KIVIConfig()))
        ids = jax.ShapeDtypeStruct((4, 1), jnp.int32)
        sizes[layers] = len(jax.jit(apply, donate_argnames="cache").lower(params, ids, cache).as_text())
    assert abs(sizes[32] - sizes[2]) <= 0.01 * sizes[2]
