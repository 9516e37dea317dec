"""decode_attention (reference impl) and prefill_attention against float64 NumPy attention."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_kivi as ref
from kivi_jax import (DenseCache, KIVICache, KIVIConfig, MosaicKIVICache, decode_attention, extend_attention,
                      prefill_attention)

D = 32


@functools.partial(jax.jit, static_argnames=("impl", "window"))
def _decode(q, cache, impl="reference", window=None):
    return decode_attention(q, cache, impl=impl, window=window)


@functools.partial(jax.jit, static_argnames=("window",))
def _prefill_attn(q, k, v, lengths, window=None):
    return prefill_attention(q, k, v, lengths, window=window)


def dense_cache(rng, b, hkv, t, lengths, dtype=jnp.float32, max_length=None):
    k = rng.standard_normal((b, hkv, t, D)) * np.where(rng.random(D) < 0.2, 4.0, 1.0)
    v = rng.standard_normal((b, hkv, t, D))
    cache = DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=D, max_length=max_length or t, dtype=dtype)
    cache = cache.prefill(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(lengths, jnp.int32))
    return cache, np.asarray(cache.k.astype(jnp.float32), np.float64), np.asarray(cache.v.astype(jnp.float32), np.float64)


def reference_decode(q, k, v, lengths, window=None):
    out = np.zeros(q.shape)
    for r, length in enumerate(lengths):
        lo = 0 if window is None else max(0, length - window)
        out[r, :, 0] = ref.attend(np.asarray(q[r, :, 0], np.float64), k[r, :, lo:length], v[r, :, lo:length])
    return out


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2), (3, 1)])
def test_decode_dense_matches_reference_gqa_ragged(hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    lengths = [24, 1, 0, 13]
    cache, k, v = dense_cache(rng, 4, hkv, 24, lengths)
    q = rng.standard_normal((4, hq, 1, D)).astype(np.float32)
    out = _decode(jnp.asarray(q), cache)
    assert out.shape == (4, hq, 1, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference_decode(q, k, v, lengths), rtol=1e-5, atol=1e-6)
    # "auto" is the reference off-GPU
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(_decode(jnp.asarray(q), cache, impl="auto")), np.asarray(out))


def test_decode_xla_impl_is_the_reference_in_the_cache_dtype():
    """impl="xla" (the dense baseline e2e times) is the reference's math with the dots in the
    cache dtype: bf16-close to float64 attention, and further from it than the float32
    reference (a wrong path would be far off; an exact one would not differ at all)."""
    rng = np.random.default_rng(9)
    lengths = [24, 7]
    cache, k, v = dense_cache(rng, 2, 2, 24, lengths, dtype=jnp.bfloat16)
    q = rng.standard_normal((2, 4, 1, D)).astype(np.float32)
    want = reference_decode(np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32)), k, v, lengths)
    xla = np.asarray(_decode(jnp.asarray(q, jnp.bfloat16), cache, impl="xla"), np.float64)
    exact = np.asarray(_decode(jnp.asarray(q, jnp.bfloat16), cache, impl="reference"), np.float64)
    err = np.linalg.norm(xla - want) / np.linalg.norm(want)
    assert err < 2e-2
    assert np.linalg.norm(exact - want) / np.linalg.norm(want) <= err


def test_decode_masks_by_length_not_by_content():
    """Whatever sits after a row's length (stale or huge values) does not change its output."""
    rng = np.random.default_rng(1)
    lengths = [10, 3]
    cache, k, v = dense_cache(rng, 2, 2, 16, lengths)
    junk_k = cache.k.at[0, :, 10:].set(1e4).at[1, :, 3:].set(-1e4)
    junk_v = cache.v.at[0, :, 10:].set(1e6).at[1, :, 3:].set(-1e6)
    junk = DenseCache(junk_k, junk_v, cache.lengths, cache.overflow, cache.max_length)
    q = jnp.asarray(rng.standard_normal((2, 4, 1, D)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_decode(q, junk)), np.asarray(_decode(q, cache)))
    np.testing.assert_allclose(np.asarray(_decode(q, junk)), reference_decode(np.asarray(q), k, v, lengths),
                               rtol=1e-5, atol=1e-6)


def test_decode_softmax_in_float32_for_half_inputs():
    """bf16 q and cache; logits far beyond bf16's comfortable range; output in q's dtype."""
    rng = np.random.default_rng(2)
    lengths = [20, 7]
    cache, k, v = dense_cache(rng, 2, 2, 20, lengths, dtype=jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((2, 4, 1, D)) * 30.0, jnp.bfloat16)  # logits in the hundreds
    out = _decode(q, cache)
    assert out.dtype == jnp.bfloat16
    want = reference_decode(np.asarray(q.astype(jnp.float32), np.float64), k, v, lengths)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    out32 = _decode(q.astype(jnp.float32), cache)  # float32 q: no output rounding
    np.testing.assert_allclose(np.asarray(out32), want, rtol=1e-4, atol=1e-4)


def test_decode_window():
    rng = np.random.default_rng(3)
    lengths = [24, 5, 0]
    cache, k, v = dense_cache(rng, 3, 2, 24, lengths)
    q = rng.standard_normal((3, 4, 1, D)).astype(np.float32)
    for window in (1, 6, 100):
        out = _decode(jnp.asarray(q), cache, window=window)
        np.testing.assert_allclose(np.asarray(out), reference_decode(q, k, v, lengths, window=window),
                                   rtol=1e-5, atol=1e-6)


def test_grad_through_the_kernels():
    """jax.grad through decode_attention(impl="pallas") (a pallas_call has no autodiff rule: it
    raised a bare AssertionError): a dense cache with a window against central differences of the
    float64 model, a KIVI cache with sinks and the rotation against the reference's own gradient in
    every float leaf."""
    rng = np.random.default_rng(41)
    lengths = [24, 5]
    cache, k, v = dense_cache(rng, 2, 2, 24, lengths)
    q = rng.standard_normal((2, 4, 1, D))
    w = rng.standard_normal((2, 4, 1, D))
    loss = lambda q, c: jnp.sum(decode_attention(q, c, impl="pallas", window=6) * w)  # noqa: E731
    g = np.asarray(jax.grad(loss)(jnp.asarray(q, jnp.float32), cache), np.float64)
    fd, h = np.zeros_like(q), 1e-5
    for i in np.ndindex(q.shape):
        e = np.zeros_like(q)
        e[i] = h
        fd[i] = np.sum((reference_decode(q + e, k, v, lengths, window=6) - reference_decode(q - e, k, v, lengths, window=6))
                       * w) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)

    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=16, sink_tokens=2, rotate="kv")
    kv = jnp.asarray(rng.standard_normal((2, 2, 2, 70, D)), jnp.float32)
    kc = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(
        KIVICache.init(cfg, batch=2, num_kv_heads=2, head_dim=D, max_length=80, dtype=jnp.float32), kv[0], kv[1],
        jnp.asarray([70, 33], jnp.int32))
    qj = jnp.asarray(q, jnp.float32)

    def grads(impl, q, c):
        return jax.grad(lambda q, c: jnp.sum(decode_attention(q, c, impl=impl) ** 2), argnums=(0, 1), allow_int=True)(q, c)

    want, got = grads("reference", qj, kc), grads("pallas", qj, kc)
    for name in ("k_res", "v_res", "k_scale", "k_min", "v_scale", "v_min"):  # (the sinks sit in k_res / v_res)
        a, b = np.asarray(getattr(want[1], name)), np.asarray(getattr(got[1], name))
        assert np.abs(a).max() > 0, name
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=name)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-4, atol=1e-6)


def test_decode_same_call_for_kivi_and_dense():
    """One call for both caches; at 8 bits with nothing quantized yet (T < R) they agree exactly."""
    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.standard_normal((2, 2, 24, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 2, 24, D)), jnp.float32)
    lengths = jnp.asarray([24, 9], jnp.int32)
    prefill = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))
    kc = prefill(KIVICache.init(KIVIConfig(k_bits=8, v_bits=8, group_size=16, residual_length=32), batch=2,
                                num_kv_heads=2, head_dim=D, max_length=64, dtype=jnp.float32), k, v, lengths)
    dc = prefill(DenseCache.init(batch=2, num_kv_heads=2, head_dim=D, max_length=64, dtype=jnp.float32), k, v, lengths)
    q = jnp.asarray(rng.standard_normal((2, 4, 1, D)), jnp.float32)
    np.testing.assert_allclose(np.asarray(_decode(q, kc)), np.asarray(_decode(q, dc)), rtol=1e-6, atol=1e-6)


def test_decode_bad_inputs():
    cache = DenseCache.init(batch=2, num_kv_heads=2, head_dim=D, max_length=8, dtype=jnp.float32)
    q = jnp.zeros((2, 4, 1, D))
    with pytest.raises(ValueError, match=r"Hq=3 must be a multiple of the cache's Hkv=2"):
        decode_attention(jnp.zeros((2, 3, 1, D)), cache, impl="reference")
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, 1, D\]"):
        decode_attention(jnp.zeros((2, 4, 2, D)), cache, impl="reference")
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, 1, D\]"):
        decode_attention(jnp.zeros((2, 4, D)), cache, impl="reference")
    with pytest.raises(ValueError, match=r"does not match the cache \(B=2, D=32\)"):
        decode_attention(jnp.zeros((3, 4, 1, D)), cache, impl="reference")
    with pytest.raises(ValueError, match=r"does not match the cache \(B=2, D=32\)"):
        decode_attention(jnp.zeros((2, 4, 1, 64)), cache, impl="reference")
    with pytest.raises(ValueError, match=r"impl='fast'"):
        decode_attention(q, cache, impl="fast")
    # an integer q was attended as if cast to float; the caches' dtypes are the ones allowed
    with pytest.raises(ValueError, match=r"^q dtype int32 is not supported; allowed: float32, bfloat16, float16"):
        decode_attention(jnp.ones((2, 4, 1, D), jnp.int32), cache, impl="reference")
    # a window: None or an integer >= 1 (a float or a bool became another mask, silently)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match=rf"^window={bad!r} must be None or an integer >= 1"):
            decode_attention(q, cache, impl="reference", window=bad)
        with pytest.raises(ValueError, match=rf"^window={bad!r} must be None"):
            prefill_attention(jnp.ones((2, 4, 3, D)), jnp.ones((2, 2, 3, D)), jnp.ones((2, 2, 3, D)), window=bad)


# ---- prefill_attention -------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (3, 1)])
def test_prefill_attention_causal_matches_reference(hq, hkv):
    rng = np.random.default_rng(5 + hq)
    b, t = 3, 12
    q = rng.standard_normal((b, hq, t, D)).astype(np.float32)
    k = rng.standard_normal((b, hkv, t, D)).astype(np.float32)
    v = rng.standard_normal((b, hkv, t, D)).astype(np.float32)
    out = prefill_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert out.shape == (b, hq, t, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref.causal_attention(q, k, v), rtol=1e-5, atol=1e-6)
    # ragged rows: keys at positions >= lengths[b] are masked (queries past the length are junk)
    lengths = np.array([12, 5, 0])
    out = np.asarray(_prefill_attn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32)))
    want = ref.causal_attention(q, k, v, lengths)
    for r, length in enumerate(lengths):
        np.testing.assert_allclose(out[r, :, :length], want[r, :, :length], rtol=1e-5, atol=1e-6)
    # the first query sees only itself: its output is v[0] of its KV head
    np.testing.assert_allclose(out[0, :, 0], np.repeat(v[0, :, 0], hq // hkv, axis=0), rtol=1e-6)


def test_prefill_attention_window():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 10, D)).astype(np.float32) for _ in range(3))
    out = np.asarray(_prefill_attn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, window=3))
    for i in range(10):
        lo = max(0, i - 2)
        want = ref.attend(q[0, :, i].astype(np.float64), k[0, :, lo:i + 1].astype(np.float64),
                          v[0, :, lo:i + 1].astype(np.float64))
        np.testing.assert_allclose(out[0, :, i], want, rtol=1e-5, atol=1e-6)


def test_prefill_attention_bad_inputs():
    z = lambda *s: jnp.zeros(s)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, T, D\]"):
        prefill_attention(z(1, 2, 4), z(1, 2, 4, D), z(1, 2, 4, D))
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, T, D\]"):
        prefill_attention(z(1, 2, 4, D), z(1, 2, 4, D), z(1, 2, 5, D))
    with pytest.raises(ValueError, match=r"disagree"):
        prefill_attention(z(1, 3, 4, D), z(1, 2, 4, D), z(1, 2, 4, D))
    with pytest.raises(ValueError, match=r"disagree"):
        prefill_attention(z(1, 2, 5, D), z(1, 2, 4, D), z(1, 2, 4, D))
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(1,\)"):
        prefill_attention(z(1, 2, 4, D), z(1, 2, 4, D), z(1, 2, 4, D), lengths=jnp.asarray([4, 4]))
    with pytest.raises(ValueError, match=r"lengths must be an integer array"):
        prefill_attention(z(1, 2, 4, D), z(1, 2, 4, D), z(1, 2, 4, D), lengths=jnp.asarray([4.0]))
    for name, i in (("q", 0), ("k", 1), ("v", 2)):  # integers were attended as if cast
        args = [z(1, 2, 4, D), z(1, 2, 4, D), z(1, 2, 4, D)]
        args[i] = args[i].astype(jnp.int8)
        with pytest.raises(ValueError, match=rf"^{name} dtype int8 is not supported; allowed: float32, bfloat16"):
            prefill_attention(*args)
    for bad in (5, -1):  # 5 > T masked nothing and -1 everything, silently
        with pytest.raises(ValueError, match=rf"lengths=\[{bad}\] out of range: each must be in \[0, T=4\]"):
            prefill_attention(z(2, 2, 4, D), z(2, 2, 4, D), z(2, 2, 4, D), lengths=jnp.asarray([4, bad]))
    # traced lengths are the caller's (the models' jitted prefill): no check, no error
    got = jax.jit(lambda n: prefill_attention(z(1, 2, 4, D), z(1, 2, 4, D), z(1, 2, 4, D), lengths=n))(jnp.array([3]))
    assert got.shape == (1, 2, 4, D)


def test_prefill_attention_impls():
    """auto is the blocked XLA path off the GPU (cuDNN's on one: the same numbers to bf16's
    rounding); cudnn off the GPU or for float32 is a named error; an unknown impl is named."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 40, D)), jnp.bfloat16) for _ in range(3))
    lengths = jnp.asarray([40, 23])
    same = (functools.partial(np.testing.assert_allclose, rtol=2e-2, atol=2e-2) if jax.default_backend() == "gpu"
            else np.testing.assert_array_equal)
    same(np.asarray(prefill_attention(q, k, v, lengths, impl="auto"), np.float32),
         np.asarray(prefill_attention(q, k, v, lengths, impl="xla"), np.float32))
    # a window as long as the prompt is plain causal attention
    np.testing.assert_array_equal(np.asarray(prefill_attention(q, k, v, lengths, window=40), np.float32),
                                  np.asarray(prefill_attention(q, k, v, lengths), np.float32))
    with pytest.raises(ValueError, match=r"impl='cudnn' needs a GPU and bf16/fp16"):
        prefill_attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="cudnn")
    with pytest.raises(ValueError, match=r"impl='flash'; allowed: \('auto', 'xla', 'cudnn'\)"):
        prefill_attention(q, k, v, impl="flash")


@pytest.mark.parametrize("hq, window, block", [(4, None, 512), (2, None, 2), (4, 9, 512), (4, 40, 3)])
def test_extend_attention_matches_float64(hq, window, block, monkeypatch):
    """New tokens continuing a KIVI cache (R=32: rows with quantized keys and values, one still
    all residual, one empty): each attends to the cache's dequantized tokens (the float64
    Algorithm-1 model's) and to the new tokens up to itself, at positions cache.lengths[b] + j;
    a sliding window counts both. Also with queries in blocks smaller than the chunk."""
    from kivi_jax import attention

    monkeypatch.setattr(attention, "PREFILL_BLOCK", block)
    rng = np.random.default_rng(hq * 7 + block)
    b, hkv, t, held = 4, 2, 5, [70, 33, 5, 0]
    cfg = dict(k_bits=2, v_bits=2, group_size=32, residual_length=32)
    k0, v0 = ref.keys_values(rng, b, hkv, max(held), D)
    cache = KIVICache.init(KIVIConfig(**cfg), batch=b, num_kv_heads=hkv, head_dim=D, max_length=96,
                           dtype=jnp.float32).prefill(jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(held))
    want_cache = ref.ReferenceKIVICache(**cfg, batch=b, num_kv_heads=hkv, head_dim=D, dtype=jnp.float32)
    want_cache.prefill(k0, v0, held)
    q = rng.standard_normal((b, hq, t, D))
    k, v = ref.keys_values(rng, b, hkv, t, D)
    lengths = np.array([5, 3, 1, 5])
    out = jax.jit(lambda q, k, v, c, n: extend_attention(q, k, v, c, n, window=window))(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), cache, jnp.asarray(lengths))
    assert out.shape == (b, hq, t, D) and out.dtype == jnp.float32
    assert want_cache.length(0) == 70 and want_cache.rows[0].kq and want_cache.rows[0].vq  # quantized parts
    for r in range(b):
        keys = np.concatenate([want_cache.keys(r), k[r]], axis=1)  # [Hkv, held + T, D]
        values = np.concatenate([want_cache.values(r), v[r]], axis=1)
        for j in range(lengths[r]):
            end = held[r] + j + 1
            lo = 0 if window is None else max(0, end - window)
            want = ref.attend(q[r, :, j], keys[:, lo:end], values[:, lo:end])
            np.testing.assert_allclose(np.asarray(out[r, :, j]), want, rtol=1e-5, atol=1e-6, err_msg=f"row {r} j {j}")


@pytest.mark.parametrize("window", [None, 9])
def test_extend_attention_cudnn_path_matches_float64(window):
    """The cudnn path (new tokens written into the materialized cache, a [B, 1, T, C] mask), bf16:
    compiled through cuDNN on a GPU; off one, the same writes and mask through
    jax.nn.dot_product_attention's XLA implementation. Against float64 attention over what the
    cache materializes and the new tokens, to bf16's precision (the cache's own fidelity is
    test_cache's and test_extend_attention_matches_float64's); rows past their length are not
    compared (their outputs are junk)."""
    from kivi_jax import attention

    rng = np.random.default_rng(5)
    b, hkv, hq, t, held = 4, 2, 4, 6, [70, 33, 5, 0]
    cfg = dict(k_bits=2, v_bits=2, group_size=32, residual_length=32)
    k0, v0 = ref.keys_values(rng, b, hkv, max(held), D)
    cache = KIVICache.init(KIVIConfig(**cfg), batch=b, num_kv_heads=hkv, head_dim=D, max_length=74,
                           dtype=jnp.bfloat16).prefill(jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(held))
    q = rng.standard_normal((b, hq, t, D))
    k, v = ref.keys_values(rng, b, hkv, t, D)
    lengths = np.array([4, 3, 1, 6])
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    if jax.default_backend() == "gpu":
        fn = lambda q, k, v, c, n: extend_attention(q, k, v, c, n, window=window, impl="cudnn")  # noqa: E731
    else:
        def fn(q, k, v, c, n):
            kc, vc = c.materialize()
            return attention._extend_cudnn(q, k, v, kc, vc, c.lengths, window, implementation="xla")
    out = np.asarray(jax.jit(fn)(qb, kb, vb, cache, jnp.asarray(lengths)).astype(jnp.float32))
    assert out.shape == (b, hq, t, D)
    f64 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)  # noqa: E731
    kc, vc = (f64(x) for x in cache.materialize())
    kr, vr, qr = f64(kb), f64(vb), f64(qb)
    for r in range(b):
        keys = np.concatenate([kc[r, :, :held[r]], kr[r]], axis=1)
        values = np.concatenate([vc[r, :, :held[r]], vr[r]], axis=1)
        for j in range(lengths[r]):
            end = held[r] + j + 1
            lo = 0 if window is None else max(0, end - window)
            want = ref.attend(qr[r, :, j], keys[:, lo:end], values[:, lo:end])
            np.testing.assert_allclose(out[r, :, j], want, rtol=2e-2, atol=2e-2, err_msg=f"row {r} j {j}")


def test_no_new_tokens_attend_to_nothing():
    """A chunk of zero tokens (a turn with nothing new) gives an empty output, as cache.extend
    takes it, instead of failing to concatenate no query blocks."""
    cache = KIVICache.init(KIVIConfig(), batch=2, num_kv_heads=2, head_dim=D, max_length=64, dtype=jnp.float32)
    q, k = jnp.ones((2, 4, 0, D), jnp.float32), jnp.ones((2, 2, 0, D), jnp.float32)
    for out in (extend_attention(q, k, k, cache), prefill_attention(q, k, k, lengths=jnp.zeros((2,), jnp.int32))):
        assert out.shape == (2, 4, 0, D) and out.dtype == jnp.float32
    assert np.asarray(cache.extend(k, k).lengths).tolist() == [0, 0]


def test_extend_attention_bad_inputs():
    cache = KIVICache.init(KIVIConfig(), batch=2, num_kv_heads=2, head_dim=D, max_length=64)
    x = jnp.zeros((2, 2, 3, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="do not match the cache"):
        extend_attention(x, x[:, :1], x[:, :1], cache)
    with pytest.raises(ValueError, match=r"lengths=\[4\] out of range"):
        extend_attention(x, x, x, cache, jnp.asarray([3, 4]))
    with pytest.raises(ValueError, match="window=0"):
        extend_attention(x, x, x, cache, window=0)
    with pytest.raises(ValueError, match=r"impl='flash'; allowed: \('auto', 'xla', 'cudnn'\)"):
        extend_attention(x, x, x, cache, impl="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"impl='cudnn' needs a GPU"):
            extend_attention(x, x, x, cache, impl="cudnn")
    with pytest.raises(ValueError, match=r"impl='cudnn' needs a GPU, a bf16/fp16 cache"):  # (any backend)
        extend_attention(x, x, x, cache, impl="cudnn", exact=True)


@pytest.mark.parametrize("extras", [{}, dict(sink_tokens=4, rotate="kv")])
def test_auto_off_gpu_reads_only_the_stores_in_use(extras):
    """impl="auto" off a GPU on a KIVICache: the reference's math on the shortest prefix of the
    stores holding every row (256, 512, 1024 or all 1280 body slots here), equal to the reference
    over the whole capacity for rows that need each prefix, a sliding window, and under jax.vmap
    (one prefix for the batch: the longest request's)."""
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU impl='auto' runs the kernels")
    rng = np.random.default_rng(5)
    cfg = KIVIConfig(residual_length=128, **extras)
    k, v = ref.keys_values(rng, 3, 2, 1100, D)
    q = jnp.asarray(rng.standard_normal((3, 4, 1, D)), jnp.float32)
    for lengths in ([5, 200, 140], [5, 300, 700], [1100, 3, 64]):
        cache = KIVICache.init(cfg, batch=3, num_kv_heads=2, head_dim=D, max_length=1100 + cfg.sink_tokens,
                               dtype=jnp.float32).prefill(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths))
        assert cache.capacity == 1280  # (whole 256-token blocks)
        _assert_auto_equals(q, cache, cache, "reference", 1e-5)


def _assert_auto_equals(q, read, cache, oracle, tol):
    """decode_attention(impl="auto") over ``read`` equals impl=``oracle`` over ``cache``, with a
    sliding window too, and for each request under jax.vmap."""
    for window in (None, 50):
        want = np.asarray(_decode(q, cache, oracle, window))
        np.testing.assert_allclose(np.asarray(_decode(q, read, "auto", window)), want, rtol=tol, atol=tol)
    per_row = jax.vmap(lambda qq, c: decode_attention(qq[None], c, impl="auto")[0])(
        q, jax.tree.map(lambda x: x[:, None], read))
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(_decode(q, cache, oracle)), rtol=tol, atol=tol)


def test_auto_off_gpu_reads_only_the_dense_positions_in_use():
    """A DenseCache off a GPU: impl="auto" is XLA's attention over the shortest prefix (256, 512,
    1024 or all 1100 positions) holding every row, as for a KIVICache: positions past 512 hold NaN
    here, which attention over the whole capacity turns into NaN outputs. Equal to impl="xla" over
    the clean cache, for a sliding window too and under jax.vmap."""
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU impl='auto' runs the kernels")
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((3, 4, 1, D)), jnp.float32)
    for lengths in ([5, 200, 140], [5, 500, 30], [1100, 3, 64]):
        cache, _, _ = dense_cache(rng, 3, 2, 1100, lengths)
        poisoned = cache
        if max(lengths) <= 512:
            poisoned = dataclasses.replace(cache, k=cache.k.at[:, :, 512:].set(jnp.nan),
                                           v=cache.v.at[:, :, 512:].set(jnp.nan))
        _assert_auto_equals(q, poisoned, cache, "xla", 1e-6)


_PREFIX_FORMATS = {  # name: (init, head_dim); max_length 1100 (+ sinks): several prefixes to pick from
    "dense": (DenseCache.init, D),
    "kivi": (functools.partial(KIVICache.init, KIVIConfig()), D),
    "kivi_sinks_rotated": (functools.partial(KIVICache.init, KIVIConfig(sink_tokens=4, rotate="kv")), D),
    "mosaic": (functools.partial(MosaicKIVICache.init, KIVIConfig(layout="mosaic")), 128),
}


@pytest.mark.parametrize("path", ["xla", "cudnn"])
@pytest.mark.parametrize("fmt", list(_PREFIX_FORMATS))
def test_extend_attention_reads_only_the_prefix_it_needs(fmt, path, monkeypatch):
    """A cache sized for a long chat: extend_attention materializes the shortest prefix of the
    stores (256, 512, 1024 body tokens, or all) that holds the longest row's tokens, and, on the
    cudnn path (which writes the new tokens into it), the new tokens too: held 250 + 10 new needs
    512 there, 256 on the XLA path. Against float64 attention over the whole materialized cache;
    dense positions past 512 hold NaN in the first case, which a read of the whole capacity would
    turn into NaN outputs. Off a GPU the cudnn path runs with jax.nn.dot_product_attention's XLA
    implementation; under jax.vmap (one prefix for all requests) each request's own result."""
    from kivi_jax import attention

    init, d = _PREFIX_FORMATS[fmt]
    dtype = jnp.bfloat16 if path == "cudnn" or fmt == "mosaic" else jnp.float32
    if path == "cudnn" and jax.default_backend() != "gpu":
        monkeypatch.setattr(attention, "_on_gpu", lambda: True)
        monkeypatch.setattr(attention, "_extend_cudnn", functools.partial(attention._extend_cudnn, implementation="xla"))
    elif path == "xla":
        monkeypatch.setattr(attention, "DEFAULT_EXTEND_IMPL", "xla")
    rng = np.random.default_rng(len(fmt) + 3 * len(path))
    b, hkv, hq, t = 3, 2, 4, 10
    sinks = 4 if "sinks" in fmt else 0
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    fn = jax.jit(lambda q, k, v, c, n: extend_attention(q, k, v, c, n))
    f64 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)  # noqa: E731
    for held, lengths in (([250 + sinks, 3, 0], [10, 4, 7]), ([700, 20, 5], [10, 10, 1]),
                          ([1090 + sinks, 0, 5], [10, 2, 10])):
        k0, v0 = ref.keys_values(rng, b, hkv, max(held), d)
        cache = init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=1100 + sinks, dtype=dtype).prefill(
            jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(held))
        assert attention.prefix_sizes(cache)[:3] == [256, 512, 1024]
        read = cache
        if fmt == "dense" and held[0] == 250:  # junk the read must not reach
            read = dataclasses.replace(cache, k=cache.k.at[:, :, 512:].set(jnp.nan), v=cache.v.at[:, :, 512:].set(jnp.nan))
        q = jnp.asarray(rng.standard_normal((b, hq, t, d)), dtype)
        k, v = (jnp.asarray(x, dtype) for x in ref.keys_values(rng, b, hkv, t, d))
        out = np.asarray(fn(q, k, v, read, jnp.asarray(lengths)).astype(jnp.float32))
        kc, vc = (f64(x) for x in cache.materialize())
        for r in range(b):
            keys = np.concatenate([kc[r, :, :held[r]], f64(k[r])], axis=1)
            values = np.concatenate([vc[r, :, :held[r]], f64(v[r])], axis=1)
            for j in range(lengths[r]):
                want = ref.attend(f64(q[r, :, j]), keys[:, :held[r] + j + 1], values[:, :held[r] + j + 1])
                np.testing.assert_allclose(out[r, :, j], want, **tol, err_msg=f"held {held} row {r} j {j}")
    per_request = jax.vmap(lambda q, k, v, c, n: extend_attention(q[None], k[None], v[None], c, n[None])[0])(
        q, k, v, jax.tree.map(lambda x: x[:, None], cache), jnp.asarray(lengths))
    for r in range(b):
        np.testing.assert_allclose(np.asarray(per_request[r, :, :lengths[r]].astype(jnp.float32)),
                                   out[r, :, :lengths[r]], rtol=1e-5, atol=1e-5)


def test_prefix_views_are_checked():
    """prefix(tokens) takes whole units of the format, within the capacity: a named error otherwise."""
    kivi = KIVICache.init(KIVIConfig(), batch=1, num_kv_heads=1, head_dim=D, max_length=1024)
    mosaic = MosaicKIVICache.init(KIVIConfig(layout="mosaic"), batch=1, num_kv_heads=1, head_dim=128, max_length=1024)
    dense = DenseCache.init(batch=1, num_kv_heads=1, head_dim=D, max_length=100)
    assert kivi.prefix(512).capacity == 512 and mosaic.prefix(256).capacity == 256 and dense.prefix(7).capacity == 7
    for cache, bad in ((kivi, 100), (kivi, 2048), (mosaic, 128), (mosaic, 0), (dense, 101), (dense, 0)):
        with pytest.raises(ValueError, match=rf"tokens={bad}: a prefix"):
            cache.prefix(bad)


def test_cudnn_attention_under_nested_vmap_folds_into_the_batch():
    """The extend's cuDNN attention under jax.vmap (twice, the mask mapped or shared) equals one
    call over the flattened batch: jax's own batching of the cuDNN path with GQA and a [B, 1, T, C]
    mask raised on the H200. cuDNN on a GPU (bf16), XLA's implementation elsewhere. Its operands are
    [B, heads, T, D] (the caches' layout); the reference, jax.nn's, takes [B, T, heads, D]."""
    from kivi_jax import attention

    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    attend = attention._batch_folded_attention("cudnn" if gpu else "xla")
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((2, 3, 1, 5, 4, 64), (2, 3, 1, 7, 2, 64),
                                                                     (2, 3, 1, 7, 2, 64)))
    mask = jnp.asarray(rng.random((2, 3, 1, 1, 5, 7)) < 0.7).at[..., 0].set(True)
    flat = lambda x: x.reshape(6 * x.shape[2], *x.shape[3:])  # noqa: E731 (the two mapped axes and B=1)
    want = np.asarray(jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=flat(mask)).astype(jnp.float32))
    bnth = lambda x: jnp.swapaxes(x, -3, -2)  # noqa: E731 ([..., T, heads, D] <-> [..., heads, T, D])
    got = bnth(jax.jit(jax.vmap(jax.vmap(attend)))(bnth(q), bnth(k), bnth(v), mask))
    np.testing.assert_allclose(np.asarray(flat(got).astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)
    shared = bnth(jax.vmap(jax.vmap(attend, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None))(
        bnth(q), bnth(k), bnth(v), mask[0, 0]))
    want = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=jnp.broadcast_to(mask[0, 0], (6, 1, 5, 7)))
    np.testing.assert_allclose(np.asarray(flat(shared).astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                               rtol=2e-2, atol=2e-2)
