"""KIVIConfig, KIVICache and DenseCache: Algorithm 1 step by step against the float64 NumPy
model (tests/reference_kivi.py), ragged batches, the packed stores, capacity and memory.

Small configs keep CPU time low: G = 16, R = 32, head_dim 32; enough decode steps to cross
several key flushes (every R tokens) and value spills (every token once a row holds R).
"""


import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cache_jit
import reference_kivi as ref
from reference_kivi import keys_values
from kivi_jax import DenseCache, KIVICache, KIVIConfig, dense_bytes_per_token, packing

def examples(n):
    """n examples in CI; the profile's count when a longer profile is loaded (conftest.py)."""
    return settings(max_examples=max(n, settings.default.max_examples) if settings.default.max_examples > 25 else n)


G, R, D = 16, 32, 32
HKV, HQ = 2, 4  # GQA: 2 query heads per KV head

_prefill = cache_jit.prefill
_step = cache_jit.step
_attend = cache_jit.attend
_materialize = cache_jit.materialize


@jax.jit
def _run(cache, k, v, lengths, k_new, v_new):
    """prefill, then append k_new/v_new [S, B, H, 1, D] one token at a time (lax.scan)."""
    cache = cache.prefill(k, v, lengths)

    def body(c, kv):
        return c.append(*kv), None

    return jax.lax.scan(body, cache, (k_new, v_new))[0]



@jax.jit
def _unpack_codes(cache):
    c = cache.config
    return (packing.unpack(cache.k_codes, c.k_bits, 2, cache.capacity),
            packing.unpack(cache.v_codes, c.v_bits, 2, cache.capacity))


def stored_codes(cache):
    """Unpacked key / value codes [B, H, Tc, D] of a KIVICache."""
    kc, vc = _unpack_codes(cache)
    return np.asarray(kc).astype(np.int64), np.asarray(vc).astype(np.int64)


def check_stores(cache, rf):
    """The cache's packed stores hold exactly the reference's codes, scales and mins."""
    c = cache.config
    kc, vc = stored_codes(cache)
    # the words are exactly the documented layout of these codes: no stray bits anywhere
    np.testing.assert_array_equal(np.asarray(cache.k_codes), packing.pack_numpy_reference(kc, c.k_bits, 2))
    np.testing.assert_array_equal(np.asarray(cache.v_codes), packing.pack_numpy_reference(vc, c.v_bits, 2))
    exact = np.dtype(cache.dtype) != np.float32  # float32: the scale may be one ulp above (see test_quant)
    nq_k, nq_v = np.asarray(cache.num_quantized_keys), np.asarray(cache.num_quantized_values)
    k_scale, k_min, v_scale, v_min = (np.asarray(a.astype(jnp.float32), np.float64)
                                      for a in (cache.k_scale, cache.k_min, cache.v_scale, cache.v_min))
    for r in range(cache.batch_size):
        n, m = len(rf.rows[r].kq), len(rf.rows[r].vq)
        assert nq_k[r] == n and nq_v[r] == m
        for got, want, scale, ref_scale, ref_min, mins in (
            (kc[r][:, :n], rf.key_codes(r), k_scale[r, :, : n // G], *rf.key_params(r), k_min[r, :, : n // G]),
            (vc[r][:, :m], rf.value_codes(r), v_scale[r, :, :m], *rf.value_params(r), v_min[r, :, :m]),
        ):
            np.testing.assert_array_equal(mins, ref_min)
            if exact:
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(scale, ref_scale)
            else:
                assert (got != want).sum() <= 1e-3 * got.size and np.abs(got - want).max(initial=0) <= 1
                np.testing.assert_allclose(scale, ref_scale, rtol=2.0**-23)
        assert (kc[r][:, n:] == 0).all() and (vc[r][:, m:] == 0).all()  # nothing beyond what is quantized


# ---- Algorithm 1 step by step against the float64 model ---------------------------------


@pytest.mark.parametrize(
    "k_bits,v_bits,dtype,tol",
    [
        (2, 2, jnp.float32, 2e-5),
        (2, 2, jnp.bfloat16, 1e-3),
        (4, 4, jnp.float16, 1e-3),
        (1, 8, jnp.float32, 2e-5),
    ],
)
def test_decode_matches_reference_step_by_step(k_bits, v_bits, dtype, tol):
    rng = np.random.default_rng(100 * k_bits + v_bits)
    b, t, steps = 4, 80, 110
    lengths = np.array([0, 5, 40, 77])
    cfg = KIVIConfig(k_bits=k_bits, v_bits=v_bits, group_size=G, residual_length=R)
    cache = KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=D, max_length=t + steps, dtype=dtype)
    rf = ref.ReferenceKIVICache(k_bits=k_bits, v_bits=v_bits, group_size=G, residual_length=R, batch=b,
                                num_kv_heads=HKV, head_dim=D, dtype=dtype)
    k, v = keys_values(rng, b, HKV, t, D)
    pad = np.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    k, v = np.where(pad, 1e4, k), np.where(pad, -1e4, v)  # padding must never enter a group
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    rf.prefill(k, v, lengths)
    check_stores(cache, rf)
    q = rng.standard_normal((b, HQ, 1, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_attend(cache, jnp.asarray(q))), rf.attend(q), rtol=tol, atol=tol)

    for s in range(steps):
        kt, vt = keys_values(rng, b, HKV, 1, D)
        q = rng.standard_normal((b, HQ, 1, D)).astype(np.float32)
        cache, out = _step(cache, jnp.asarray(kt), jnp.asarray(vt), jnp.asarray(q))
        rf.append(kt, vt)
        assert out.shape == (b, HQ, 1, D) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), rf.attend(q), rtol=tol, atol=tol, err_msg=f"step {s}")
        if s % 37 == 36:
            check_stores(cache, rf)
    check_stores(cache, rf)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)
    assert not np.asarray(cache.overflow).any()
    # the run crossed several key flushes and value spills in every row
    assert [len(row.kq) // R for row in rf.rows] == [3, 3, 4, 5]
    assert min(len(row.vq) for row in rf.rows) >= steps - R


def test_materialize_is_quantized_prefix_then_residual():
    """materialize(): dequantized keys [0, n), residual keys [n, L); values [0, m) then the window."""
    rng = np.random.default_rng(5)
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    lengths = np.array([70, 31])
    k, v = keys_values(rng, 2, HKV, 70, D)
    cache = _prefill(KIVICache.init(cfg, batch=2, num_kv_heads=HKV, head_dim=D, max_length=128, dtype=jnp.float32),
                     jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    kh, vh = (np.asarray(a) for a in _materialize(cache))
    assert kh.shape == (2, HKV, cache.capacity, D)
    # row 0: n = 64 keys quantized, keys 64..69 exact; m = 38 values quantized, 38..69 exact
    np.testing.assert_array_equal(kh[0, :, 64:70], k[0, :, 64:70])
    np.testing.assert_array_equal(vh[0, :, 38:70], v[0, :, 38:70])
    assert not np.array_equal(kh[0, :, :64], k[0, :, :64]) and not np.array_equal(vh[0, :, :38], v[0, :, :38])
    # row 1 (31 < R tokens): nothing quantized
    np.testing.assert_array_equal(kh[1, :, :31], k[1, :, :31])
    np.testing.assert_array_equal(vh[1, :, :31], v[1, :, :31])
    assert list(np.asarray(cache.num_quantized_keys)) == [64, 0]
    assert list(np.asarray(cache.num_quantized_values)) == [38, 0]


# ---- ragged batches ------------------------------------------------------------------------


def test_row_alone_equals_row_in_batch():
    rng = np.random.default_rng(11)
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    b, t, steps = 4, 72, 45
    lengths = np.array([72, 0, 33, 64])
    k, v = keys_values(rng, b, HKV, t, D)
    kn, vn = keys_values(rng, steps, b, HKV, 1, D)
    init = lambda n: KIVICache.init(cfg, batch=n, num_kv_heads=HKV, head_dim=D, max_length=t + steps,
                                    dtype=jnp.bfloat16)
    batch = _run(init(b), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), kn, vn)
    kb, vb = (np.asarray(a.astype(jnp.float32)) for a in _materialize(batch))
    for r in range(b):
        alone = _run(init(1), jnp.asarray(k[r:r + 1]), jnp.asarray(v[r:r + 1]),
                     jnp.asarray(lengths[r:r + 1], jnp.int32), kn[:, r:r + 1], vn[:, r:r + 1])
        assert int(alone.lengths[0]) == int(batch.lengths[r]) == lengths[r] + steps
        for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(batch)):
            np.testing.assert_array_equal(np.asarray(leaf_a)[0], np.asarray(leaf_b)[r])  # every buffer
        ka, va = (np.asarray(a.astype(jnp.float32)) for a in _materialize(alone))
        L = lengths[r] + steps
        np.testing.assert_array_equal(ka[0, :, :L], kb[r, :, :L])
        np.testing.assert_array_equal(va[0, :, :L], vb[r, :, :L])


@examples(12)
@given(bits=st.sampled_from([(2, 2), (4, 1)]), lengths=st.lists(st.integers(0, 48), min_size=3, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_ragged_lengths_property(bits, lengths, seed):
    """Any per-row prompt lengths, then 40 appends: every row's K_hat, V_hat equal the model's."""
    rng = np.random.default_rng(seed)
    k_bits, v_bits = bits
    cfg = KIVIConfig(k_bits=k_bits, v_bits=v_bits, group_size=G, residual_length=R)
    b, t, steps = 3, 48, 40
    k, v = keys_values(rng, b, HKV, t, D)
    kn, vn = keys_values(rng, steps, b, HKV, 1, D)
    init = KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=D, max_length=t + steps, dtype=jnp.bfloat16)
    cache = _run(init, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), kn, vn)
    rf = ref.ReferenceKIVICache(k_bits=k_bits, v_bits=v_bits, group_size=G, residual_length=R, batch=b,
                                num_kv_heads=HKV, head_dim=D, dtype=jnp.bfloat16)
    rf.prefill(k, v, lengths)
    for i in range(steps):
        rf.append(kn[i], vn[i])
    check_stores(cache, rf)
    kh, vh = (np.asarray(a.astype(jnp.float32), np.float64) for a in _materialize(cache))
    for r in range(b):
        L = lengths[r] + steps
        assert np.asarray(cache.lengths)[r] == L == rf.length(r)
        # equal up to the final rounding into bfloat16 (float32 x_hat, then the cast)
        np.testing.assert_allclose(kh[r, :, :L], rf.keys(r), rtol=2.0**-7, atol=0)
        np.testing.assert_allclose(vh[r, :, :L], rf.values(r), rtol=2.0**-7, atol=0)


def test_prefill_equals_token_by_token_appends():
    """Prefill of T tokens == an empty prefill and T appends (same quantization, same layout)."""
    rng = np.random.default_rng(12)
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    b, t, steps = 4, 72, 45
    k, v = keys_values(rng, b, HKV, t, D)
    kn, vn = keys_values(rng, steps, b, HKV, 1, D)
    init = KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=D, max_length=t + steps, dtype=jnp.bfloat16)
    full = _run(init, jnp.asarray(k), jnp.asarray(v), jnp.asarray([t] * b, jnp.int32), kn, vn)
    # the same tokens all through append: prompt of length 0, then the prompt, then the new tokens
    k_all = np.concatenate([np.moveaxis(k, 2, 0)[:, :, :, None], kn], axis=0)
    v_all = np.concatenate([np.moveaxis(v, 2, 0)[:, :, :, None], vn], axis=0)
    stepwise = _run(init, jnp.asarray(k), jnp.asarray(v), jnp.zeros(b, jnp.int32), k_all, v_all)
    np.testing.assert_array_equal(np.asarray(stepwise.lengths), np.asarray(full.lengths))
    for name in ("k_codes", "k_scale", "k_min", "k_res", "v_codes", "v_scale", "v_min", "v_res"):
        np.testing.assert_array_equal(np.asarray(getattr(stepwise, name)), np.asarray(getattr(full, name)), err_msg=name)


def test_appends_when_the_capacity_is_below_the_residual_length():
    """A cache smaller than R (KIVI-4, R = 256, 128 tokens) never flushes a key block: appends
    fill the residual exactly as prefill does (the flush's R/8 word rows used to be traced into a
    16-row store and fail: 'Slice size ... out of range')."""
    rng = np.random.default_rng(21)
    cfg = KIVIConfig(k_bits=4, v_bits=4, group_size=G, residual_length=256)
    b, t = 2, 128
    init = KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=D, max_length=t, dtype=jnp.float32)
    assert init.capacity < cfg.residual_length
    k, v = keys_values(rng, b, HKV, t, D)
    full = _prefill(init, jnp.asarray(k), jnp.asarray(v), jnp.asarray([t, 100], jnp.int32))
    steps = np.moveaxis(np.stack([k, v]), 3, 0)[:, :, :, :, None]  # [t, 2, B, H, 1, D]
    stepwise = init
    for i in range(t):
        stepwise = stepwise.append(jnp.asarray(steps[i, 0]), jnp.asarray(steps[i, 1]), active=jnp.asarray([True, i < 100]))
    np.testing.assert_array_equal(np.asarray(stepwise.lengths), [t, 100])
    for name in ("k_codes", "k_scale", "k_min", "k_res", "v_codes", "v_scale", "v_min", "v_res"):
        np.testing.assert_array_equal(np.asarray(getattr(stepwise, name)), np.asarray(getattr(full, name)), err_msg=name)
    # every token still in the full-precision window: nothing flushed or spilled
    kh, vh = (np.asarray(x) for x in stepwise.materialize())
    np.testing.assert_array_equal(kh[0, :, :t], k[0])
    np.testing.assert_array_equal(vh[1, :, :100], v[1, :, :100])


def test_padding_never_enters_a_group():
    """Garbage (NaN, huge) after each row's length changes nothing in the cache or attention."""
    rng = np.random.default_rng(13)
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    lengths = np.array([64, 5, 40, 33])
    k, v = keys_values(rng, 4, HKV, 80, D)
    pad = np.arange(80)[None, None, :, None] >= lengths[:, None, None, None]
    init = KIVICache.init(cfg, batch=4, num_kv_heads=HKV, head_dim=D, max_length=96, dtype=jnp.float16)
    clean = _prefill(init, jnp.asarray(np.where(pad, 0, k)), jnp.asarray(np.where(pad, 0, v)),
                     jnp.asarray(lengths, jnp.int32))
    dirty = _prefill(init, jnp.asarray(np.where(pad, np.nan, k)), jnp.asarray(np.where(pad, 6e4, v)),
                     jnp.asarray(lengths, jnp.int32))
    for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = jnp.asarray(rng.standard_normal((4, HQ, 1, D)), jnp.float32)
    out = np.asarray(_attend(dirty, q))
    assert np.isfinite(out).all()


def test_zero_length_rows():
    """Length-0 prompts: nothing to attend (zero output); the first appended token is all there is."""
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    rng = np.random.default_rng(14)
    k, v = keys_values(rng, 2, HKV, 8, D)
    cache = KIVICache.init(cfg, batch=2, num_kv_heads=HKV, head_dim=D, max_length=64, dtype=jnp.float32)
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray([0, 0], jnp.int32))
    q = jnp.asarray(rng.standard_normal((2, HQ, 1, D)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_attend(cache, q)), 0.0)
    kt, vt = keys_values(rng, 2, HKV, 1, D)
    cache, out = _step(cache, jnp.asarray(kt), jnp.asarray(vt), q)
    # softmax over one token is 1: the output is that token's value, per KV head group
    np.testing.assert_allclose(np.asarray(out), np.repeat(vt, HQ // HKV, axis=1), rtol=1e-6)
    # an empty prompt array (T = 0) works too
    z, n = jnp.zeros((2, HKV, 0, D)), jnp.zeros(2, jnp.int32)
    assert list(np.asarray(_prefill(cache, z, z, n).lengths)) == [0, 0]
    dense = DenseCache.init(batch=2, num_kv_heads=HKV, head_dim=D, max_length=8, dtype=jnp.float32)
    assert list(np.asarray(_prefill(dense, z, z, n).lengths)) == [0, 0]


# ---- DenseCache ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-3)])
def test_dense_cache_matches_reference(dtype, tol):
    rng = np.random.default_rng(21)
    b, t, steps = 3, 20, 12
    lengths = np.array([20, 0, 7])
    cache = DenseCache.init(batch=b, num_kv_heads=HKV, head_dim=D, max_length=t + steps, dtype=dtype)
    rf = ref.ReferenceDenseCache(batch=b, num_kv_heads=HKV, head_dim=D, dtype=dtype)
    k, v = keys_values(rng, b, HKV, t, D)
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    rf.prefill(k, v, lengths)
    for s in range(steps):
        kt, vt = keys_values(rng, b, HKV, 1, D)
        q = rng.standard_normal((b, HQ, 1, D)).astype(np.float32)
        cache, out = _step(cache, jnp.asarray(kt), jnp.asarray(vt), jnp.asarray(q))
        rf.append(kt, vt)
        np.testing.assert_allclose(np.asarray(out), rf.attend(q), rtol=tol, atol=tol, err_msg=f"step {s}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)
    assert cache.k.dtype == dtype and cache.v.dtype == dtype


def test_dense_prefill_pins_the_layout_of_what_it_writes():
    """DenseCache.prefill's two writes carry a row-major layout constraint (cc.row_major): with
    cuDNN's prompt attention next to them on a GPU, XLA otherwise gave the whole stacked cache
    its [.., T, H, D] order and a 34 GiB transposed copy (results/prefill-memory-2026-12-01-run1
    vs -run2). The stored numbers are the prompt's."""
    cache = DenseCache.init(batch=2, num_kv_heads=HKV, head_dim=D, max_length=16, dtype=jnp.bfloat16)
    k, v = (jax.random.normal(jax.random.key(i), (2, HKV, 5, D)) for i in (0, 1))
    fn = jax.jit(lambda c, k, v: c.prefill(k, v))
    assert fn.lower(cache, k, v).as_text().count("LayoutConstraint") == 2
    out = fn(cache, k, v)
    np.testing.assert_array_equal(np.asarray(out.k[:, :, :5]), np.asarray(k.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(out.v[:, :, :5]), np.asarray(v.astype(jnp.bfloat16)))


def test_kivi_close_to_dense_at_8_bits():
    """Sanity of the whole path: 8-bit KIVI attention is close to full-precision attention."""
    rng = np.random.default_rng(22)
    b, t = 2, 100
    k, v = keys_values(rng, b, HKV, t, D)
    lengths = jnp.asarray([100, 61], jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, HQ, 1, D)), jnp.float32)
    cfg = KIVIConfig(k_bits=8, v_bits=8, group_size=G, residual_length=R)
    kc = _prefill(KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=D, max_length=t, dtype=jnp.float32),
                  jnp.asarray(k), jnp.asarray(v), lengths)
    dc = _prefill(DenseCache.init(batch=b, num_kv_heads=HKV, head_dim=D, max_length=t, dtype=jnp.float32),
                  jnp.asarray(k), jnp.asarray(v), lengths)
    ok, od = np.asarray(_attend(kc, q)), np.asarray(_attend(dc, q))
    np.testing.assert_allclose(ok, od, atol=0.03)
    assert not np.array_equal(ok, od)


# ---- capacity and overflow -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kivi", "dense"])
def test_append_past_max_length_is_refused_and_flagged(kind):
    rng = np.random.default_rng(31)
    max_length = 40
    if kind == "kivi":
        cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
        cache = KIVICache.init(cfg, batch=2, num_kv_heads=HKV, head_dim=D, max_length=max_length, dtype=jnp.float32)
    else:
        cache = DenseCache.init(batch=2, num_kv_heads=HKV, head_dim=D, max_length=max_length, dtype=jnp.float32)
    k, v = keys_values(rng, 2, HKV, 38, D)
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray([38, 10], jnp.int32))
    q = jnp.asarray(rng.standard_normal((2, HQ, 1, D)), jnp.float32)
    outs, states = [], []
    for i in range(4):
        kt, vt = keys_values(rng, 2, HKV, 1, D)
        cache, out = _step(cache, jnp.asarray(kt), jnp.asarray(vt), q)
        outs.append(np.asarray(out))
        states.append(jax.tree_util.tree_map(np.asarray, cache))
        assert list(np.asarray(cache.lengths)) == [min(39 + i, max_length), 11 + i]
        assert list(np.asarray(cache.overflow)) == [i >= 2, False]
    # refused appends left row 0 exactly as it was (and row 1 kept going)
    for name, a in vars(states[1]).items():
        if isinstance(a, np.ndarray) and name not in ("lengths", "overflow"):
            np.testing.assert_array_equal(a[0], getattr(states[3], name)[0], err_msg=name)
    np.testing.assert_array_equal(outs[1][0], outs[3][0])
    # traced prompt lengths out of range: clamped, nothing out of bounds, flagged
    bad = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray([39, -1], jnp.int32))
    assert list(np.asarray(bad.overflow)) == [True, True]
    assert list(np.asarray(bad.lengths)) == [38, 0]


@pytest.mark.parametrize("kind", ["kivi", "dense"])
def test_capacity_errors_at_trace_time(kind):
    if kind == "kivi":
        cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
        cache = KIVICache.init(cfg, batch=2, num_kv_heads=HKV, head_dim=D, max_length=40, dtype=jnp.float32)
    else:
        cache = DenseCache.init(batch=2, num_kv_heads=HKV, head_dim=D, max_length=40, dtype=jnp.float32)
    z = lambda t, b=2, h=HKV, d=D: jnp.zeros((b, h, t, d), jnp.float32)
    with pytest.raises(ValueError, match="max_length=40"):
        cache.prefill(z(41), z(41))
    with pytest.raises(ValueError, match="max_length=40"):
        jax.jit(lambda c, k, v: c.prefill(k, v))(cache, z(48), z(48))
    # eager lengths out of range
    with pytest.raises(ValueError, match=r"lengths=\[11\] out of range"):
        cache.prefill(z(10), z(10), lengths=jnp.asarray([3, 11]))
    with pytest.raises(ValueError, match=r"lengths=\[-1\] out of range"):
        cache.prefill(z(10), z(10), lengths=np.array([-1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(2,\)"):
        cache.prefill(z(10), z(10), lengths=jnp.asarray([3, 4, 5]))
    with pytest.raises(ValueError, match=r"lengths must be an integer array"):
        cache.prefill(z(10), z(10), lengths=jnp.asarray([3.0, 4.0]))
    # shapes
    with pytest.raises(ValueError, match="expected 1"):
        cache.append(z(2), z(2))
    with pytest.raises(ValueError, match=r"B=2, Hkv=2, D=32"):
        cache.append(z(1, b=3), z(1, b=3))
    with pytest.raises(ValueError, match=r"B=2, Hkv=2, D=32"):
        cache.prefill(z(4, h=4), z(4, h=4))
    with pytest.raises(ValueError, match=r"B=2, Hkv=2, D=32"):
        cache.append(z(1, d=64), z(1, d=64))
    with pytest.raises(ValueError, match=r"\[B, Hkv, T, D\]"):
        cache.append(jnp.zeros((2, HKV, D)), jnp.zeros((2, HKV, D)))
    with pytest.raises(ValueError, match=r"v has 2 tokens; expected 1|differs from"):
        cache.append(z(1), z(2))
    # integer k / v would be cast into the cache silently (0.7 -> 0)
    ints = jnp.ones((2, HKV, 3, D), jnp.int32)
    with pytest.raises(ValueError, match=r"k must be a floating array .*; got int32"):
        cache.prefill(ints, z(3))
    with pytest.raises(ValueError, match=r"v must be a floating array .*; got int32"):
        cache.append(z(1), ints[:, :, :1])
    with pytest.raises(ValueError, match=r"k must be a floating array .*; got int32"):
        cache.extend(ints, ints)
    with pytest.raises(ValueError, match=r"cache dtype int32 is not supported; allowed: float32, bfloat16, float16"):
        type(cache).init(*([cache.config] if kind == "kivi" else []), batch=2, num_kv_heads=HKV, head_dim=D,
                         max_length=40, dtype=jnp.int32)


# ---- config and init validation ------------------------------------------------------------


def test_config_defaults_and_static():
    c = KIVIConfig()
    assert (c.k_bits, c.v_bits, c.group_size, c.residual_length) == (2, 2, 32, 128)
    assert hash(c) == hash(KIVIConfig(2, 2, 32, 128)) and c == KIVIConfig()
    with pytest.raises(Exception):
        c.k_bits = 4  # frozen
    assert c.capacity(1) == 256 and c.capacity(256) == 256 and c.capacity(257) == 512
    assert KIVIConfig(k_bits=1).capacity(100) == 512  # whole 1-bit blocks
    assert KIVIConfig(k_bits=8, v_bits=8, group_size=128, residual_length=128).capacity(100) == 128


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_bits=3), r"k_bits=3"),
        (dict(k_bits=0), r"k_bits=0"),
        (dict(k_bits=2.0), r"k_bits=2\.0"),
        (dict(v_bits=16), r"v_bits=16"),
        (dict(v_bits=None), r"v_bits=None"),
        (dict(group_size=48), r"group_size=48"),
        (dict(group_size=8, residual_length=32), r"group_size=8"),
        (dict(group_size=0), r"group_size=0"),
        (dict(group_size=32.0), r"group_size=32\.0"),
        (dict(residual_length=48), r"residual_length=48.*group_size=32"),
        (dict(residual_length=16), r"residual_length=16"),
        (dict(residual_length=0), r"residual_length=0"),
        (dict(residual_length=-128), r"residual_length=-128"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KIVIConfig(**kwargs)


def test_init_validation():
    cfg = KIVIConfig()
    with pytest.raises(ValueError, match=r"group_size=32 must divide head_dim=48"):
        KIVICache.init(cfg, batch=1, num_kv_heads=1, head_dim=48, max_length=16)
    with pytest.raises(ValueError, match=r"group_size=32 must divide head_dim=48"):
        cfg.bytes_per_token(num_kv_heads=1, head_dim=48)
    with pytest.raises(ValueError, match=r"max_length=0"):
        KIVICache.init(cfg, batch=1, num_kv_heads=1, head_dim=64, max_length=0)
    with pytest.raises(ValueError, match=r"max_length=0"):
        DenseCache.init(batch=1, num_kv_heads=1, head_dim=64, max_length=0)
    # every size an integer >= 1, named, in every cache (batch=-1 was a TypeError from jnp.zeros;
    # head_dim=0 passed the group check and made empty buffers)
    from kivi_jax import MosaicKIVICache
    from kivi_jax.eval.ablation import SimQuantCache

    inits = [functools.partial(KIVICache.init, cfg), functools.partial(MosaicKIVICache.init, cfg), DenseCache.init,
             functools.partial(SimQuantCache.init, cfg)]
    for name, bad in (("batch", -1), ("num_kv_heads", 0), ("head_dim", 0), ("batch", 2.0), ("max_length", True)):
        sizes = dict(batch=1, num_kv_heads=1, head_dim=128, max_length=256) | {name: bad}
        for init in inits:
            with pytest.raises(ValueError, match=rf"^{name}={bad!r} must be an integer >= 1$"):
                init(**sizes)
    with pytest.raises(ValueError, match=r"dtype"):
        KIVICache.init(cfg, batch=1, num_kv_heads=1, head_dim=64, max_length=16, dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"KIVIConfig"):
        KIVICache.init(dict(k_bits=2), batch=1, num_kv_heads=1, head_dim=64, max_length=16)


# ---- memory --------------------------------------------------------------------------------


def test_nbytes_and_bytes_per_token():
    cfg = KIVIConfig()  # the paper's KIVI-2
    b, h, d, max_length = 2, 4, 128, 1000
    cache = KIVICache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=max_length, dtype=jnp.bfloat16)
    tc = cache.capacity
    assert tc == 1024
    assert cache.nbytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    per_tok = cfg.bytes_per_token(num_kv_heads=h, head_dim=d, dtype=jnp.bfloat16)
    res = cfg.residual_bytes(num_kv_heads=h, head_dim=d, dtype=jnp.bfloat16)
    # per head and token: 2-bit K and V codes (2 * 128 * 2 / 8 = 64 B) + bf16 scale and min for
    # K and V per 32 numbers (4 * 2 * 128 / 32 = 32 B) = 96 B; residual: K and V, R = 128 tokens
    assert per_tok == 96 * h
    assert res == 2 * 128 * d * 2 * h
    assert cache.nbytes == b * (tc * per_tok + res) + b * (4 + 1)  # + lengths int32, overflow bool
    dense = DenseCache.init(batch=b, num_kv_heads=h, head_dim=d, max_length=max_length, dtype=jnp.bfloat16)
    dpt = dense_bytes_per_token(num_kv_heads=h, head_dim=d, dtype=jnp.bfloat16)
    assert dpt == 2 * d * 2 * h
    assert dense.nbytes == b * max_length * dpt + b * (4 + 1)
    assert dpt / per_tok == pytest.approx(16 / 3)  # 5.3x smaller per token, as the paper says
    # other widths and layers
    c4 = KIVIConfig(k_bits=4, v_bits=2, group_size=64, residual_length=64)
    assert c4.bytes_per_token(num_kv_heads=2, head_dim=128, dtype=jnp.float16, num_layers=3) == \
        3 * 2 * (128 * 6 / 8 + 4 * 2 * 128 / 64)
    assert dense_bytes_per_token(num_kv_heads=2, head_dim=64, dtype=jnp.float32, num_layers=3) == 3 * 2 * 2 * 64 * 4


def test_cache_is_a_pytree_with_static_config():
    cfg = KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R)
    cache = KIVICache.init(cfg, batch=1, num_kv_heads=HKV, head_dim=D, max_length=64, dtype=jnp.float32)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 10
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    # the config's default layout "auto" resolved: a KIVICache's config names the layout it stores
    assert cfg.layout == "auto" and back.config == dataclasses.replace(cfg, layout="tokens") and back.max_length == 64
    other = KIVICache.init(KIVIConfig(k_bits=4, group_size=G, residual_length=R), batch=1, num_kv_heads=HKV,
                           head_dim=D, max_length=64, dtype=jnp.float32)
    assert jax.tree_util.tree_structure(other) != treedef


def test_bf16_prefill_with_outlier_channels_materializes_the_float64_model():
    """A bf16 cache, one value group a token (G = D = 32), keys with outlier channels
    (keys_values), rows of 70 / 33 / 5 / 0 tokens: what materialize gives equals the float64
    model exactly. (On the H200 in session 36, a probe of exactly this prefill gave row 0's
    values up to 1.55 away from the model while its keys matched: XLA:GPU had removed the pair of
    casts bf16 -> float32 around the values' quantization (the keys' went through a slice), so
    it quantized unrounded numbers; cache_kivi.rounded keeps them apart since. This test, run on
    a GPU, says whether that was all.)"""
    rng = np.random.default_rng(5)
    b, held = 4, [70, 33, 5, 0]
    cfg = dict(k_bits=2, v_bits=2, group_size=32, residual_length=32)
    k0, v0 = keys_values(rng, b, HKV, max(held), D)
    cache = KIVICache.init(KIVIConfig(**cfg), batch=b, num_kv_heads=HKV, head_dim=D, max_length=74,
                           dtype=jnp.bfloat16).prefill(jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(held))
    rf = ref.ReferenceKIVICache(**cfg, batch=b, num_kv_heads=HKV, head_dim=D, dtype=jnp.bfloat16)
    rf.prefill(k0, v0, held)
    kh, vh = (np.asarray(a.astype(jnp.float32), np.float64) for a in _materialize(cache))
    for r in range(b):
        np.testing.assert_array_equal(kh[r, :, :held[r]], rf.keys(r), err_msg=f"keys of row {r}")
        np.testing.assert_array_equal(vh[r, :, :held[r]], rf.values(r), err_msg=f"values of row {r}")


def test_stored_keeps_its_rounding_apart_from_later_casts():
    """cache_kivi.stored casts into a 16-bit cache dtype behind an optimization barrier: XLA:GPU
    removes convert(convert(x, bf16), f32) pairs (xla_allow_excess_precision), which let a
    prompt's quantization read unrounded values there. The barrier is what the jaxpr carries for
    16-bit dtypes (and its values are the plain cast's); float32 needs none."""
    from kivi_jax.cache_kivi import stored

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 32)), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        for rotate in (False, True):
            jaxpr = str(jax.make_jaxpr(lambda a: stored(a, dtype, rotate).astype(jnp.float32))(x))
            assert jaxpr.count("optimization_barrier") == 1 + rotate, jaxpr
        np.testing.assert_array_equal(np.asarray(stored(x, dtype, False)), np.asarray(x.astype(dtype)))
    assert "optimization_barrier" not in str(jax.make_jaxpr(lambda a: stored(a, jnp.float32, True))(x))
    xb = x.astype(jnp.bfloat16)  # already in the cache dtype (a bf16 model's RoPE output): still kept apart
    assert "optimization_barrier" in str(jax.make_jaxpr(lambda a: stored(a, jnp.bfloat16, False))(xb))
