"""The token-layout append kernel (pallas_kernels/kivi_append.py, interpreted here) behind
``KIVICache.stacked_append`` with ``cache_kivi.APPEND_IMPL = "pallas"``: the same bits as the
per-layer ``KIVICache.append`` (Algorithm 1 in XLA) over spills, flushes, sinks, rotation, 4-bit
codes and a row refused at max_length; under vmap; lowered for CUDA; the switch's resolution
and the shapes it falls back on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kivi_jax import KIVICache, KIVIConfig
from kivi_jax import cache_common, cache_kivi
from models.cache import StackedCache
from pallas_kernels import kivi_append

FIELDS = ("k_codes", "k_scale", "k_min", "k_res", "v_codes", "v_scale", "v_min", "v_res", "lengths", "overflow")


def _prefilled(cfg, lengths, max_length, d=64, heads=2, dtype=jnp.float32, seed=0):
    b, t = len(lengths), max(lengths)
    k = jax.random.normal(jax.random.key(seed), (b, heads, t, d)) * (
        1 + 4 * jax.random.bernoulli(jax.random.key(seed + 1), 0.1, (d,)))
    v = jax.random.normal(jax.random.key(seed + 2), (b, heads, t, d)) * 3
    init = KIVICache.init(cfg, batch=b, num_kv_heads=heads, head_dim=d, max_length=max_length, dtype=dtype)
    return jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(init, k.astype(dtype), v.astype(dtype),
                                                          jnp.asarray(lengths, jnp.int32))


def _step(stacked, k, v):  # layer 1 of a 2-layer stack appends (k, v)
    return jax.tree.map(lambda x: x[1], stacked).stacked_append(stacked, jnp.int32(1), k, v)


CASES = {
    # name: (config, prompt lengths, max_length, head_dim, dtype)
    "kivi2_bf16": (KIVIConfig(residual_length=32), [3, 20, 60, 95], 100, 64, jnp.bfloat16),
    "kivi4_f32": (KIVIConfig(k_bits=4, v_bits=4, residual_length=32), [1, 31, 32, 64], 120, 64, jnp.float32),
    "sinks_rotated": (KIVIConfig(residual_length=32, sink_tokens=4, rotate="kv"),
                      [2, 4, 35, 70], 110, 64, jnp.float32),
    "group64_keygroup64": (KIVIConfig(residual_length=64, group_size=64, key_group_size=64), [10, 63, 64, 130],
                           200, 128, jnp.bfloat16),
    "r96_bf16": (KIVIConfig(residual_length=96), [5, 95, 96, 150], 200, 64, jnp.bfloat16),  # R not a power of two
}


@pytest.mark.parametrize("case", list(CASES))
def test_append_kernel_equals_the_per_layer_append(case, monkeypatch):
    """40 appends to layer 1 of a stack through the kernel (quantizing each value leaving the
    window itself) leave every buffer bit for bit as KIVICache.append on that layer alone: rows
    before R (nothing leaves), values leaving at every word position, key flushes, rows still
    filling their sinks, and a row reaching max_length (refused, flagged); layer 0 untouched."""
    cfg, lengths, max_length, d, dtype = CASES[case]
    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", "pallas")
    cache = _prefilled(cfg, lengths, max_length, d=d, dtype=dtype)
    b, h = cache.batch_size, cache.num_kv_heads
    new = jax.random.normal(jax.random.key(5), (2, 40, b, h, 1, d)) * 2
    stacked = StackedCache.stack(cache, 2).layers
    step, one = jax.jit(_step), jax.jit(lambda c, k, v: c.append(k, v))
    want = cache
    for i in range(40):
        stacked = step(stacked, new[0, i], new[1, i])
        want = one(want, new[0, i], new[1, i])
    assert int(want.lengths[0]) == lengths[0] + 40 and bool(want.overflow[-1]) == (lengths[-1] + 40 > max_length)
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(stacked, name)[1]), np.asarray(getattr(want, name)),
                                      err_msg=name)
        np.testing.assert_array_equal(np.asarray(getattr(stacked, name)[0]), np.asarray(getattr(cache, name)),
                                      err_msg=f"layer 0 {name}")


def test_append_kernel_under_vmap(monkeypatch):
    """jax.vmap over requests (batched decoding experiments): each member gets the writes it gets
    alone, across a value leaving the ring and a key flush."""
    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", "pallas")
    cfg = KIVIConfig(residual_length=32)
    stacks = [StackedCache.stack(_prefilled(cfg, lens, 96, seed=s), 2).layers for lens, s in (([33, 31], 0),
                                                                                               ([63, 40], 3))]
    new = jax.random.normal(jax.random.key(9), (2, 2, 2, 2, 1, 64))  # [member, step, B, Hkv, 1, D]
    batched = jax.tree.map(lambda *xs: jnp.stack(xs), *stacks)
    for i in range(2):
        batched = jax.jit(jax.vmap(lambda st, k: _step(st, k, k * 3)))(batched, new[:, i])
        stacks = [jax.jit(lambda st, k: _step(st, k, k * 3))(st, new[j, i]) for j, st in enumerate(stacks)]
    for j, st in enumerate(stacks):
        for name in FIELDS:
            np.testing.assert_array_equal(np.asarray(getattr(batched, name)[j]), np.asarray(getattr(st, name)),
                                          err_msg=name)


@pytest.mark.parametrize("append,writes", [("pallas", "xla"), ("xla", "pallas")])
def test_grad_through_the_append_and_row_writes_kernels(append, writes, monkeypatch):
    """jax.grad through decode appends made by the kernels (a pallas_call that aliases its buffers
    has no JVP: "JVP with aliasing not supported") equals the gradient through the XLA writes, in
    the new keys and values and in every float leaf of the stack, across a value leaving the
    window and a key flush."""
    cfg = KIVIConfig(residual_length=32, sink_tokens=2)
    stacked = StackedCache.stack(_prefilled(cfg, [33, 31, 2], 96, d=32), 2).layers
    new = jax.random.normal(jax.random.key(9), (2, 2, 3, 2, 1, 32))  # [k/v, step, B, Hkv, 1, D]
    t = 2 + jax.tree.map(lambda x: x[1], stacked).capacity  # what materialize returns: the sinks, then the stores
    w = jax.random.normal(jax.random.key(10), (2, 3, 2, t, 32))

    def loss(new, stacked):
        for i in range(2):
            stacked = _step(stacked, new[0, i], new[1, i])
        kh, vh = jax.tree.map(lambda x: x[1], stacked).materialize()
        return jnp.sum(kh * w[0]) + jnp.sum(vh ** 2 * w[1])

    grads = {}
    for impls in ((append, writes), ("xla", "xla")):
        monkeypatch.setattr(cache_kivi, "APPEND_IMPL", impls[0])
        monkeypatch.setattr(cache_common, "DEFAULT_WRITES_IMPL", impls[1])
        grads[impls] = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(new, stacked)
    got, want = grads[append, writes], grads["xla", "xla"]
    assert float(jnp.abs(want[0]).max()) > 0
    # (float32 rounding apart: the two programs fuse differently; on an H100 v_res's differed by
    # up to 3e-5 relative, gpu-tests-run144-paths; a wrong derivative is off by O(1))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-4, atol=1e-5)
    for name in ("k_res", "v_res", "k_scale", "k_min", "v_scale", "v_min"):
        np.testing.assert_allclose(np.asarray(getattr(got[1], name)), np.asarray(getattr(want[1], name)), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


@pytest.mark.parametrize("bits,dtype", [(2, jnp.bfloat16), (4, jnp.float16)])
def test_append_kernel_lowers_for_cuda(bits, dtype):
    """The kernel (exact rounding included) lowers to Triton IR for a GPU."""
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    lyr, b, h, r, tc, d = 3, 2, 2, 128, 512, 128
    args = (s((lyr, b, h, r, d), dtype), s((lyr, b, h, r, d), dtype), s((lyr, b, h, tc // (32 // bits), d), jnp.uint32),
            s((lyr, b, h, tc, d // 32), dtype), s((lyr, b, h, tc, d // 32), dtype), s((b, h, 1, d), dtype),
            s((b, h, 1, d), dtype), s((b,), jnp.int32))
    ir = lower_to_ttir(lambda *a: kivi_append.append(
        *a, jnp.int32(1), residual=r, group_size=32, bits=bits, max_length=500,
        quantize=cache_kivi.token_quantizer(bits, jnp.dtype(dtype))), *args)
    assert "tt.store" in ir


def test_append_impl_resolution_and_fallback(monkeypatch):
    """None (the default): the kernel on a GPU, XLA's writes elsewhere; a value not allowed is a
    named error. A shape the kernel's tiles do not take (head_dim 96: D / G = 3) falls back to the
    XLA writes, and the kernel itself refuses it by name."""
    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", None)
    for backend, impl in (("cpu", "xla"), ("gpu", "pallas")):
        monkeypatch.setattr(cache_kivi.jax, "default_backend", lambda b=backend: b)
        assert cache_kivi.append_impl() == impl
    monkeypatch.undo()
    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", "triton")
    with pytest.raises(ValueError, match=r"cache_kivi.APPEND_IMPL='triton'; allowed: \('xla', 'pallas'\) or None"):
        cache_kivi.append_impl()
    assert not kivi_append.supported(96, 32) and kivi_append.supported(128, 32) and not kivi_append.supported(128, 24)

    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", "pallas")
    cfg = KIVIConfig(residual_length=32)
    cache = _prefilled(cfg, [40, 7], 80, d=96)
    k = jax.random.normal(jax.random.key(2), (2, 2, 1, 96))
    got = jax.jit(_step)(StackedCache.stack(cache, 2).layers, k, -k)
    want = cache.append(k, -k)
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)[1]), np.asarray(getattr(want, name)), err_msg=name)
    layers = StackedCache.stack(cache, 2).layers
    with pytest.raises(ValueError, match=r"group_size=32 and head_dim / group_size=3 must be powers of two"):
        kivi_append.append(layers.k_res, layers.v_res, layers.v_codes, layers.v_scale, layers.v_min, k, k,
                           cache.lengths, 1, residual=32, group_size=32, bits=2, max_length=80,
                           quantize=cache_kivi.token_quantizer(2, jnp.dtype(jnp.float32)))
