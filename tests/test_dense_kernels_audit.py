"""Audit of the dense-side kernels and helpers against float64 NumPy written here:

* pallas_kernels.dense_decode.dense_decode_partials called directly (the per-split partials
  (o, m, l) and their combination), on the kernel's own contract: ragged rows, empty splits,
  sliding windows with relative splits, GQA 1 / 4 / 8, a cache that is no multiple of the chunk,
  a layer-stacked cache, float32 / bfloat16 / float16, scores in the thousands, jit and vmap,
  bounds past the cache, bad arguments; the CUDA lowering's offset widths above 2^31 elements;
* pallas_kernels.flash's helpers (online_softmax_step, window_chunks) by brute force;
* pallas_kernels.stacked_matmul and kivi_jax.matmul.layer_matmul against x @ w[layer];
* kivi_jax.rotation against a Hadamard matrix built here another way (H[i, j] =
  (-1)^popcount(i & j) / sqrt(D), not the block recursion);
* kivi_jax.prefill_attention (the dense prompt attention: there is no Pallas prefill kernel;
  flash.py is the decode kernels' plumbing) with GQA 8, windows and rows that see nothing.

Kernels run compiled on a GPU and interpreted elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import kivi_jax as kj
from kivi_jax import matmul as kj_matmul
from kivi_jax import rotation
from pallas_kernels import flash
from pallas_kernels.dense_decode import dense_decode_partials
from pallas_kernels.stacked_matmul import stacked_matmul

INTERPRET = jax.default_backend() != "gpu"
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
NEG32 = float(np.float32(-1e30))  # an empty split's m (the kernels' finite minus infinity)


def _np(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _rounded(x, dtype):
    """float64 x rounded into ``dtype`` (what the kernel's inputs hold)."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def _attend64(q, k, v):
    """q [G, D] over k, v [n, D] (n >= 1): softmax(q k^T) v in float64 (q already scaled)."""
    s = q @ k.T
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p @ v) / p.sum(-1, keepdims=True)


# ---- dense_decode_partials -----------------------------------------------------------------

def _split_chunks(lo, hi, s, c, relative, n_chunks):
    """Split s's chunks as the module doc defines them: of all the cache's chunks [s·c, (s+1)·c)
    (or with a sliding window's relative splits the row's own from lo: [lo + s·c, lo + (s+1)·c)),
    within [lo, hi) and the cache."""
    a, z = (lo + s * c, lo + (s + 1) * c) if relative else (s * c, (s + 1) * c)
    return max(a, lo, 0), min(z, hi, n_chunks)


def ref_partials(q, k, v, lo, hi, start, end, *, chunk, splits, span=0):
    """float64 (o [B, H, S, G, D], m, l [B, H, S, G]) of the module doc: split s of row b covers
    its chunks' tokens in [start, min(end, T)); none: m = NEG, l = 0, o = 0."""
    b, h, g, d = q.shape
    t = k.shape[2]
    n_chunks = -(-t // chunk)
    c = -(-(span or n_chunks) // splits)
    o, m, l = np.zeros((b, h, splits, g, d)), np.full((b, h, splits, g), NEG32), np.zeros((b, h, splits, g))
    for i in range(b):
        for s in range(splits):
            a, z = _split_chunks(int(lo[i]), int(hi[i]), s, c, span > 0, n_chunks)
            toks = [x for x in range(a * chunk, z * chunk) if int(start[i]) <= x < min(int(end[i]), t)]
            if not toks:
                continue
            for j in range(h):
                sc = q[i, j] @ k[i, j, toks].T
                m[i, j, s] = sc.max(-1)
                p = np.exp(sc - m[i, j, s][:, None])
                l[i, j, s], o[i, j, s] = p.sum(-1), p @ v[i, j, toks]
    return o, m, l


def combine64(o, m, l):
    """Normalized [B, H, G, D] from partials; a row with no token gives 0."""
    o, m, l = (np.asarray(x, np.float64) for x in (o, m, l))
    w = np.exp(m - m.max(axis=2, keepdims=True))
    den = (l * w).sum(axis=2)
    return (o * w[..., None]).sum(axis=2) / np.where(den > 0, den, 1.0)[..., None]


def ref_attention(q, k, v, start, end):
    """[B, H, G, D] float64 softmax attention of each row over tokens [start, min(end, T))."""
    out = np.zeros(q.shape)
    for i in range(q.shape[0]):
        a, z = int(start[i]), min(int(end[i]), k.shape[2])
        if z > a:
            for j in range(q.shape[1]):
                out[i, j] = _attend64(q[i, j], k[i, j, a:z], v[i, j, a:z])
    return out


def check_partials(got, want, tol, what):
    o, m, l = (np.asarray(x, np.float64) for x in got)
    wo, wm, wl = want
    assert np.isfinite(o).all() and np.isfinite(m).all() and np.isfinite(l).all(), what
    empty = wl == 0
    # no token: exactly the documented (NEG, 0, 0)
    assert (m[empty] == NEG32).all() and (l[empty] == 0).all() and (o[empty] == 0).all(), what
    full = ~empty
    # the split's mass log(l) + m (invariant to which max the kernel took) and its normalized o / l
    mass, wmass = np.log(l[full]) + m[full], np.log(wl[full]) + wm[full]
    np.testing.assert_allclose(mass, wmass, rtol=0, atol=tol * (1 + np.abs(wmass).max()), err_msg=str(what))
    ratio, wratio = o[full] / l[full][:, None], wo[full] / wl[full][:, None]
    assert np.abs(ratio - wratio).max() <= tol * np.abs(wratio).max(), what


def _kv_inputs(rng, b, h, g, t, d, dtype, *, q_scale=1.0, kv_scale=1.0):
    q = rng.standard_normal((b, h, g, d)) * q_scale / np.sqrt(d)  # pre-scaled, with the kernel's default scale=1
    k = np.clip(rng.standard_normal((b, h, t, d)), -2, 2) * kv_scale  # (float16: |x| <= 6e4 < 65504)
    v = np.clip(rng.standard_normal((b, h, t, d)), -2, 2) * kv_scale
    q, k, v = jnp.asarray(q, jnp.float32), jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    # reference operands: what the kernel holds; a 16-bit cache's dots take q in its dtype (module doc)
    return (q, k, v), (_rounded(q, dtype), _np(k), _np(v))


def _bounds(lengths, chunk, window=None):
    end = np.asarray(lengths, np.int32)
    start = np.zeros_like(end) if window is None else np.maximum(end - window, 0)
    return start // chunk, -(-end // chunk), start, end


PARTIAL_CASES = [
    # (dtype, G, T, D, lengths, window, splits, relative, q_scale, kv_scale)
    # GQA 1 (repeated to 16 rows); T a whole number of chunks; split 2 of 3 is empty for every row
    ("float32", 1, 64, 16, [0, 1, 16, 17, 64], None, 3, False, 1.0, 1.0),
    # GQA 4, a last partial chunk (70 = 4 x 16 + 6), a window with relative splits
    ("bfloat16", 4, 70, 32, [70, 69, 33, 1, 0], 20, 2, True, 1.0, 1.0),
    # GQA 8, float16 keys and values near its top (3e4) and scores in the thousands
    ("float16", 8, 48, 16, [48, 47, 16, 2, 0], 17, 1, False, 0.02, 3e4),
    # float32 scores of +-1e4 (a softmax far from uniform; no overflow)
    ("float32", 4, 40, 16, [40, 39, 17], None, 2, False, 300.0, 10.0),
]


@pytest.mark.parametrize("dtype,g,t,d,lengths,window,splits,relative,q_scale,kv_scale", PARTIAL_CASES)
def test_dense_partials_against_float64(dtype, g, t, d, lengths, window, splits, relative, q_scale, kv_scale):
    chunk = 16
    rng = np.random.default_rng(t + g)
    (q, k, v), (q64, k64, v64) = _kv_inputs(rng, len(lengths), 2, g, t, d, dtype, q_scale=q_scale, kv_scale=kv_scale)
    lo, hi, start, end = _bounds(lengths, chunk, window)
    span = flash.window_chunks(window, chunk, -(-t // chunk)) if relative else 0
    got = dense_decode_partials(q, k, v, *(jnp.asarray(x) for x in (lo, hi, start, end)), chunk=chunk,
                                num_splits=splits, span_chunks=span, interpret=INTERPRET)
    assert [x.shape for x in got] == [(len(lengths), 2, splits, g, d)] + [(len(lengths), 2, splits, g)] * 2
    want = ref_partials(q64, k64, v64, lo, hi, start, end, chunk=chunk, splits=splits, span=span)
    assert (want[2] == 0).any() and (want[2] > 0).any()  # the case has empty and non-empty splits
    tol = TOL[dtype]
    check_partials(got, want, tol, dtype)
    out, ref = combine64(*got), ref_attention(q64, k64, v64, start, end)
    for i, n in enumerate(lengths):
        if n == 0:
            assert np.abs(out[i]).max() == 0.0  # a row with no token: 0, not NaN
        else:
            assert np.abs(out[i] - ref[i]).max() <= tol * np.abs(ref[i]).max(), (dtype, i)
    if q_scale * kv_scale > 100:  # the scores really are large (the case tests what it says)
        assert np.abs(np.einsum("bhgd,bhtd->bhgt", q64, k64)).max() > 1e3


def test_dense_partials_stacked_layer_jit_and_out_of_range_layers():
    """A layer of an [L, B, Hkv, T, D] stack read in place (T = 40: a partial last chunk) under jit
    with a traced layer: that layer's numbers, not another's; a traced layer past the stack reads
    what lax.dynamic_index_in_dim reads (wrapped, then clamped), never memory past the stack; a
    concrete one is a named error (interpret mode used to wrap or clamp it silently)."""
    rng = np.random.default_rng(3)
    b, h, g, t, d, chunk = 3, 2, 4, 40, 16, 16
    layers = [_kv_inputs(rng, b, h, g, t, d, jnp.bfloat16) for _ in range(3)]
    q, q64 = layers[0][0][0], layers[0][1][0]
    k = jnp.stack([x[0][1] for x in layers])
    v = jnp.stack([x[0][2] for x in layers])
    bounds = _bounds([40, 17, 1], chunk)
    run = jax.jit(lambda layer: combine_jnp(dense_decode_partials(
        q, k, v, *(jnp.asarray(x) for x in bounds), layer=layer, chunk=chunk, num_splits=2, interpret=INTERPRET)))
    want = [ref_attention(q64, x[1][1], x[1][2], bounds[2], bounds[3]) for x in layers]
    for layer, which in ((1, 1), (2, 2), (5, 2), (-1, 2), (-3, 0), (-9, 0)):
        got = np.asarray(run(jnp.int32(layer)), np.float64)
        assert np.abs(got - want[which]).max() <= 1e-2 * np.abs(want[which]).max(), layer
        other = want[(which + 1) % 3]
        assert np.abs(got - other).max() > 0.1 * np.abs(other).max()  # not another layer's
    z = jnp.asarray(bounds[0])
    for layer in (3, -1, np.int64(7), jnp.int32(3)):
        with pytest.raises(ValueError, match=rf"layer={int(layer)} must be in \[0, L=3\)"):
            dense_decode_partials(q, k, v, z, z, z, z, layer=layer, chunk=chunk, interpret=INTERPRET)
    for layer in (1.0, True, jnp.float32(1)):
        with pytest.raises(ValueError, match=r"layer must be an integer scalar in \[0, L=3\); got"):
            dense_decode_partials(q, k, v, z, z, z, z, layer=layer, chunk=chunk, interpret=INTERPRET)


def combine_jnp(parts):
    o, m, l = parts
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    den = jnp.sum(l * w, axis=2)
    return jnp.sum(o * w[..., None], axis=2) / jnp.where(den > 0, den, 1.0)[..., None]


@pytest.mark.parametrize("t", [48, 40])
def test_dense_partials_bounds_past_the_cache_stay_inside_it(t):
    """lo, hi, end are traced, so the kernel cannot raise on them: given lo < 0, hi past the last
    chunk and end past T, it attends tokens [start, T) of the cache and reads nothing outside it.
    Before, interpret mode re-read the last chunk as tokens T.. (T = 48: counted twice) or took the
    masked load's zeros as tokens (T = 40: scores 0 in the softmax), and a GPU read past the row."""
    rng = np.random.default_rng(t)
    chunk = 16
    (q, k, v), (q64, k64, v64) = _kv_inputs(rng, 2, 2, 2, t, 16, jnp.float32)
    lo, hi = np.asarray([-1, 1], np.int32), np.asarray([-(-t // chunk) + 2] * 2, np.int32)
    start, end = np.asarray([0, 20], np.int32), np.asarray([t + 9, t + 40], np.int32)
    got = dense_decode_partials(q, k, v, *(jnp.asarray(x) for x in (lo, hi, start, end)), chunk=chunk, num_splits=2,
                                interpret=INTERPRET)
    want = ref_attention(q64, k64, v64, start, np.minimum(end, t))
    out = combine64(*got)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def test_dense_partials_vmap_and_jit():
    """vmap over a leading axis of caches (the pallas_call's batching rule), under jit: each
    cache's float64 attention."""
    rng = np.random.default_rng(11)
    chunk = 16
    items = [_kv_inputs(rng, 2, 2, 4, 33, 16, jnp.float32) for _ in range(3)]
    lens = np.asarray([[33, 5], [16, 0], [1, 32]], np.int32)
    stack = [jnp.stack([x[0][i] for x in items]) for i in range(3)]
    zero = jnp.zeros_like(jnp.asarray(lens))

    def f(q, k, v, n, z):
        return combine_jnp(dense_decode_partials(q, k, v, z, (n + chunk - 1) // chunk, z, n, chunk=chunk,
                                                 num_splits=2, interpret=INTERPRET))

    got = np.asarray(jax.jit(jax.vmap(f))(*stack, jnp.asarray(lens), zero), np.float64)
    for i, (_, (q64, k64, v64)) in enumerate(items):
        want = ref_attention(q64, k64, v64, np.zeros(2, np.int32), lens[i])
        assert np.abs(got[i] - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0), i
    assert np.abs(got[1, 1]).max() == 0.0  # the empty row of the second cache


def test_dense_partials_bad_arguments():
    """Each a named error at trace time. Before: num_splits=0 ZeroDivisionError, -1 an MLIR error;
    a float32 v beside a bf16 k was rounded to bf16; D = 24 ran interpreted and failed only in
    the Triton lowering; lo of the wrong length or dtype was read or truncated silently."""
    b, h, g, t, d = 2, 2, 4, 32, 16
    q, k = jnp.ones((b, h, g, d)), jnp.ones((b, h, t, d))
    z = jnp.zeros((b,), jnp.int32)
    call = lambda *a, **kw: dense_decode_partials(*a, **{"chunk": 16, "interpret": INTERPRET, **kw})  # noqa: E731
    for splits in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"num_splits={splits!r} must be an integer >= 1"):
            call(q, k, k, z, z, z, z, num_splits=splits)
    with pytest.raises(ValueError, match="k and v must have one dtype; got k bfloat16, v float32"):
        call(q, k.astype(jnp.bfloat16), k, z, z, z, z)
    with pytest.raises(ValueError, match="D=24 must be a power of two"):
        call(jnp.ones((b, h, g, 24)), jnp.ones((b, h, t, 24)), jnp.ones((b, h, t, 24)), z, z, z, z)
    with pytest.raises(ValueError, match=r"q must be \[B, Hkv, G, D\]; got shape \(2, 8, 16\)"):
        call(jnp.ones((b, h * g, d)), k, k, z, z, z, z)
    with pytest.raises(ValueError, match=r"lo must be an integer array \[B=2\]; got int32 of shape \(3,\)"):
        call(q, k, k, jnp.zeros((3,), jnp.int32), z, z, z)
    with pytest.raises(ValueError, match=r"end must be an integer array \[B=2\]; got float32 of shape \(2,\)"):
        call(q, k, k, z, z, z, jnp.full((b,), 31.7))
    # the checks name what they should and let a good call through: it attends (q = 1, k = v = 1)
    o, m, l = call(q, k, k, z, jnp.full((b,), 2, jnp.int32), z, jnp.full((b,), 32, jnp.int32))
    np.testing.assert_allclose(np.asarray(combine_jnp((o, m, l))), 1.0, rtol=1e-6)


@pytest.mark.parametrize("stacked", [False, True])
def test_dense_kernel_offsets_are_64_bit_past_2_pow_31_elements(stacked):
    """Index arithmetic: the CUDA lowering (no GPU needed, nothing allocated) of a cache with more
    than 2^31 elements (B·Hkv·T·D = 2^32 bf16; a stack of 2^33) loads K and V with 64-bit offsets;
    a smaller one (2^28, 2^29) with 32-bit ones. jax picks 64 bits above 2^32 bytes, so 2-byte and wider
    dtypes never need an offset past 2^31 - 1 in 32 bits."""
    from pallas_kernels.triton_ir import load_offset_widths, lower_to_ttir

    s = jax.ShapeDtypeStruct
    for shape, wide in (((256, 16, 8192, 128), True), ((64, 8, 4096, 128), False)):
        if stacked:
            shape = (8,) + shape[:2] + (shape[2] // 4,) + shape[3:]  # 2^33 and 2^30 elements
        b, h = shape[-4], shape[-3]
        z = s((b,), jnp.int32)
        q, kv = s((b, h, 4, 128), jnp.float32), s(shape, jnp.bfloat16)
        if stacked:
            ttir = lower_to_ttir(lambda q, k, v, a, c, e, f, i: dense_decode_partials(q, k, v, a, c, e, f, layer=i),
                                 q, kv, kv, z, z, z, z, s((), jnp.int32))
        else:
            ttir = lower_to_ttir(lambda q, k, v, a, c, e, f: dense_decode_partials(q, k, v, a, c, e, f),
                                 q, kv, kv, z, z, z, z)
        assert (np.prod(shape) > 2 ** 31) == wide
        assert load_offset_widths(ttir)["bf16"] == ({64} if wide else {32}), shape


# ---- pallas_kernels.flash helpers --------------------------------------------------------------

def test_window_chunks_is_the_most_chunks_a_window_touches():
    """Brute force over every start offset: the chunks [start, end) touches for end - start <= window."""
    for chunk in (16, 64):
        for n_chunks in (1, 3, 9):
            for window in (1, 2, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 5, 40 * chunk):
                most = 0
                for start in range(chunk * n_chunks):
                    end = min(start + window, chunk * n_chunks)
                    most = max(most, (end - 1) // chunk - start // chunk + 1)
                assert flash.window_chunks(window, chunk, n_chunks) == most, (window, chunk, n_chunks)


@pytest.mark.parametrize("slots_axis", [1, 0])
def test_online_softmax_step_streams_to_the_softmax(slots_axis):
    """Chunks of scores in the thousands, a first chunk with no valid slot (mask_p keeps it out),
    ragged masks: the carried (m, l, acc) equal float64's max, sum of exp and p·V."""
    rng = np.random.default_rng(7 + slots_axis)
    rows, chunk, d, n = 4, 8, 5, 4
    s = rng.standard_normal((n, rows, chunk)) * 2000.0
    v = rng.standard_normal((n, chunk, d))
    keep = rng.random((n, chunk)) < 0.6
    keep[0] = False
    keep[1, 0] = True
    carry = (jnp.full((rows,), flash.NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d) if slots_axis == 1 else (d, rows), jnp.float32))
    for c in range(n):
        sc = jnp.asarray(s[c] if slots_axis == 1 else s[c].T, jnp.float32)
        vc = jnp.asarray(v[c], jnp.float32)
        pv = (lambda p, vc=vc: p @ vc) if slots_axis == 1 else (lambda p, vc=vc: vc.T @ p)
        carry = flash.online_softmax_step(carry, sc, jnp.asarray(keep[c]), pv, slots_axis=slots_axis, mask_p=True)
    m, l, acc = (np.asarray(x, np.float64) for x in carry)
    acc = acc if slots_axis == 1 else acc.T
    sv = np.concatenate([s[c][:, keep[c]] for c in range(n)], axis=1)  # valid slots only
    vv = np.concatenate([v[c][keep[c]] for c in range(n)])
    wm = sv.max(-1)
    p = np.exp(sv - wm[:, None])
    np.testing.assert_allclose(m, wm, rtol=1e-6)
    np.testing.assert_allclose(np.log(l) + m, np.log(p.sum(-1)) + wm, rtol=0, atol=1e-3)
    np.testing.assert_allclose(acc / l[:, None], (p @ vv) / p.sum(-1)[:, None], rtol=1e-4, atol=1e-5)


def test_online_softmax_step_scales_the_products_and_sums_the_rounded_p():
    """scale multiplies the products before everything (m in scaled units); with p_dtype=bfloat16,
    p_dot_v gets p in bfloat16 and l sums exactly those weights (float64 replay of the stream with
    the same rounding), so acc / l is a convex combination of the values."""
    rng = np.random.default_rng(46)
    rows, chunk, d, n, scale = 4, 16, 3, 3, 128 ** -0.5
    x = rng.standard_normal((n, rows, chunk)) * 40.0  # q·k products; the scores are x·scale
    v = rng.standard_normal((n, chunk, d))
    bf16 = np.dtype(jnp.bfloat16)
    carry = (jnp.full((rows,), flash.NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))
    seen = []

    def pv(p, vc):
        seen.append(p.dtype)
        return jnp.dot(p, vc.astype(p.dtype), preferred_element_type=jnp.float32)

    m_w, l_w, acc_w = np.full(rows, -np.inf), np.zeros(rows), np.zeros((rows, d))
    for c in range(n):
        carry = flash.online_softmax_step(carry, jnp.asarray(x[c], jnp.float32), jnp.ones(chunk, bool),
                                          lambda p, vc=jnp.asarray(v[c]): pv(p, vc), scale=scale, p_dtype=jnp.bfloat16)
        s = x[c].astype(np.float32) * np.float32(scale)
        m_new = np.maximum(m_w, s.max(-1))
        p = np.exp(s - m_new[:, None]).astype(bf16).astype(np.float64)
        corr = np.exp(m_w - m_new)
        m_w, l_w = m_new, l_w * corr + p.sum(-1)
        acc_w = acc_w * corr[:, None] + p @ v[c].astype(bf16).astype(np.float64)
    assert seen == [jnp.bfloat16] * n
    m, l, acc = (np.asarray(t, np.float64) for t in carry)
    np.testing.assert_allclose(m, m_w, rtol=1e-6)
    np.testing.assert_allclose(l, l_w, rtol=1e-6)  # (l from the unrounded p: 6.6e-4 off here)
    np.testing.assert_allclose(acc / l[:, None], acc_w / l_w[:, None], rtol=1e-2, atol=1e-2)
    # float32 p: the softmax of the scaled products itself
    ref = np.exp(x.transpose(1, 0, 2).reshape(rows, -1) * scale)
    carry32 = (jnp.full((rows,), flash.NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
               jnp.zeros((rows, d), jnp.float32))
    for c in range(n):
        carry32 = flash.online_softmax_step(carry32, jnp.asarray(x[c], jnp.float32), jnp.ones(chunk, bool),
                                            lambda p, vc=jnp.asarray(v[c], jnp.float32): p @ vc, scale=scale)
    want = (ref / ref.sum(-1, keepdims=True)) @ v.reshape(-1, d)
    np.testing.assert_allclose(np.asarray(carry32[2]) / np.asarray(carry32[1])[:, None], want, rtol=1e-5, atol=1e-5)


# ---- stacked_matmul / layer_matmul -------------------------------------------------------------

MATMUL_CASES = [  # (M, dtype, scale): M = 1 and 33 pad to 16 and 64; M = 16 exactly one tile of rows
    (1, "float16", 1.0), (16, "bfloat16", 1.0), (33, "float32", 1e17),  # float32 products up to 1e36
]


@pytest.mark.parametrize("m,dtype,scale", MATMUL_CASES)
def test_stacked_matmul_odd_rows_smallest_tiles(m, dtype, scale):
    """16 x 16 tiles, K = 48 in three K-blocks over 3 splits, the last layer of the stack."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, 48)) * scale, dtype)
    w = jnp.asarray(rng.standard_normal((3, 48, 32)) * scale, dtype)
    got = stacked_matmul(x, w, jnp.int32(2), block_k=16, block_n=16, splits=3, interpret=INTERPRET)
    assert got.shape == (m, 32) and got.dtype == x.dtype
    want = _np(x) @ _np(w[2])
    got = _np(got)
    assert np.isfinite(got).all()
    # float32 accumulation, the result rounded into x's dtype once
    assert np.abs(got - want).max() <= TOL[dtype] * np.abs(want).max(), (m, dtype)


def test_stacked_matmul_layers_jit_scan_vmap():
    """The model's use: lax.scan over the layers with a traced index; vmap over x; a traced layer
    past the stack read as lax.dynamic_index_in_dim would (never memory past the stack); concrete
    bad layers named (interpret mode wrapped -1 to the last layer, 1.7 was truncated to 1)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 32, 16)), jnp.float32)
    mm = lambda x, i: stacked_matmul(x, w, i, block_k=16, block_n=16, interpret=INTERPRET)  # noqa: E731
    _, ys = jax.jit(lambda x: lax.scan(lambda c, i: (c, mm(x, i)), 0, jnp.arange(3, dtype=jnp.int32)))(x)
    for i in range(3):
        np.testing.assert_allclose(_np(ys[i]), _np(x) @ _np(w[i]), rtol=1e-5, atol=1e-5)
    xs = jnp.stack([x, 2 * x + 1])
    got = jax.jit(jax.vmap(lambda x: mm(x, jnp.int32(1))))(xs)
    for j in range(2):
        np.testing.assert_allclose(_np(got[j]), _np(xs[j]) @ _np(w[1]), rtol=1e-5, atol=1e-5)
    traced = jax.jit(mm)
    for layer, which in ((5, 2), (-1, 2), (-3, 0), (-8, 0)):
        np.testing.assert_allclose(_np(traced(x, jnp.int32(layer))), _np(x) @ _np(w[which]), rtol=1e-5, atol=1e-5)
    for layer in (3, -1, np.int32(9)):
        with pytest.raises(ValueError, match=rf"layer={int(layer)} must be in \[0, L=3\)"):
            mm(x, layer)
    for layer in (1.7, True, jnp.float32(1.0)):
        with pytest.raises(ValueError, match=r"layer must be an integer scalar in \[0, L=3\); got"):
            mm(x, layer)
    with pytest.raises(ValueError, match=r"layer must be an integer scalar .* got float32 array of shape \(\)"):
        jax.jit(mm)(x, jnp.float32(1.0))  # traced: its dtype is still checked


def test_layer_matmul_mixed_dtypes_and_layer_types():
    """A float32 x times bf16 weights: impl="pallas" rounded x to bf16 in the kernel (relative
    errors ~4e-3) where impl="xla" promotes to float32; both now give float32 x @ w[layer].
    A float layer was truncated (1.5 -> 1) by the range check's int()."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 64, 32)), jnp.bfloat16)
    want = _np(x) @ _np(w[1])
    for impl in ("xla", "pallas"):
        got = kj_matmul.layer_matmul(x, w, 1, impl=impl)
        assert got.dtype == jnp.float32
        assert np.abs(_np(got) - want).max() <= 1e-5 * np.abs(want).max(), impl
    for impl in ("xla", "pallas"):
        for layer in (1.5, True, np.float32(0)):
            with pytest.raises(ValueError, match=r"layer must be an integer scalar in \[0, L=2\)"):
                kj_matmul.layer_matmul(x, w, layer, impl=impl)


# ---- rotation ----------------------------------------------------------------------------------

def _hadamard64(d):
    """H[i, j] = (-1)^popcount(i & j) / sqrt(d): Sylvester's matrix from its closed form."""
    i = np.arange(d)
    bits = np.vectorize(lambda n: bin(n).count("1"))(i[:, None] & i[None, :])
    return (-1.0) ** bits / np.sqrt(d)


@pytest.mark.parametrize("impl", rotation.ROTATE_IMPLS)
def test_rotation_dtypes_large_magnitudes_jit_vmap(impl, monkeypatch):
    """x·H for float16 / bfloat16 / float32 x (D = 16: 2^e = sqrt(D); D = 32: not), under jit and
    vmap, with float32 x of 1e37 at D = 128. Before, "bf16x6" / "bf16x3" (the GPU's default)
    summed x·S (+-1 entries: up to D·|x|) before the 1/sqrt(D) and gave inf where x·H fits."""
    monkeypatch.setattr(rotation, "ROTATE_IMPL", impl)
    rng = np.random.default_rng(6)
    f = jax.jit(jax.vmap(lambda x: rotation.rotate(x)))  # a fresh function: traced with impl
    for d, dtype, scale in ((16, jnp.float16, 3e3), (32, jnp.bfloat16, 1.0), (32, jnp.float32, 1.0),
                            (128, jnp.float32, 1e37)):
        x = np.clip(rng.standard_normal((2, 3, d)), -2.5, 2.5)
        if scale > 1e30:  # all of one sign: x·S's first column is sum(x) ~ 128e37 (inf), x·H's 1.1e38
            x = 1 + 0.2 * x
        x = jnp.asarray(x * scale, dtype)
        out = f(x)
        assert out.dtype == jnp.float32 and out.shape == x.shape
        got = np.asarray(out, np.float64)
        assert np.isfinite(got).all(), (d, dtype)
        want = _np(x) @ _hadamard64(d)
        # float32 sums of d terms (bf16x3 on a GPU: x's bits past two bf16 parts, ~2^-16 |x|)
        ulp = 2.0 ** -15 if impl == "bf16x3" and not INTERPRET else 8 * np.finfo(np.float32).eps
        assert np.abs(got - want).max() <= ulp * np.abs(_np(x)).max() * np.sqrt(d), (d, dtype)
    # and back: H H = I, so rotating twice is the identity to float32 rounding
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    back = np.asarray(rotation.rotate(rotation.rotate(x), transpose=True), np.float64)
    assert np.abs(back - _np(x)).max() <= 2.0 ** -14 * np.abs(_np(x)).max()


def test_cached_hadamard_matrices_are_read_only():
    """signs_numpy / hadamard_numpy are lru-cached and returned as is: an in-place edit by a caller
    changed every later rotation of that D. Now read-only; the rotation still equals H."""
    for fn in (rotation.signs_numpy, rotation.hadamard_numpy):
        a = fn(16)
        with pytest.raises(ValueError, match="read-only"):
            a[0, 0] = 7.0
    np.testing.assert_array_equal(rotation.hadamard_numpy(16), _hadamard64(16))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(rotation.rotate(x)), _np(x) @ _hadamard64(16), rtol=0, atol=1e-5)


def test_rotation_bad_inputs():
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., D\] .* got a scalar"):
        rotation.rotate(jnp.float32(3.0))
    for d in (24, 12, 0):  # (below 16 the einsum path, from 16 the Sylvester path: both name it)
        with pytest.raises(ValueError, match=rf"needs head_dim a power of two .* got head_dim={d}"):
            rotation.rotate(jnp.ones((2, d)))


# ---- prefill_attention (the dense prompt attention) ----------------------------------------------

def _prefill64(q, k, v, lengths, window):
    """[B, Hq, T, D] float64: query i of row b over keys j <= i, j < lengths[b], j > i - window;
    head h on KV head h // (Hq / Hkv); a query with no such key gives 0."""
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    out = np.zeros(q.shape)
    for r in range(b):
        for i in range(t):
            lo = 0 if window is None else max(0, i - window + 1)
            hi = min(i + 1, int(lengths[r]))
            if hi > lo:
                for h in range(hq):
                    kv = k[r, h // rep, lo:hi], v[r, h // rep, lo:hi]
                    out[r, h, i] = _attend64(q[r, h, i][None] / np.sqrt(d), *kv)[0]
    return out


@pytest.mark.parametrize("dtype,scale", [("float32", 12.0), ("bfloat16", 1.0)])
def test_prefill_attention_gqa8_windows_and_rows_that_see_nothing(dtype, scale):
    """GQA 8 (Hq 8, Hkv 1) and 2, rows of 13, 5, 1 and 0 tokens, windows 1 and 4: each query's float64
    attention; a query that sees no key (past its row's length + window, or in a row of 0: padding)
    is finite, and 0 on the XLA path (attend_dense's rule). cuDNN's path (bf16 on a GPU) gave a
    nonzero padding row (a row of 0 tokens, window 1; H100): padding outputs are junk by the
    docs, so only their finiteness is held there. float32 scores reach the hundreds. Under jit
    and vmap over a leading axis."""
    rng = np.random.default_rng(9)
    b, t, d = 4, 13, 16
    lengths = np.asarray([13, 5, 1, 0], np.int32)
    xla_path = INTERPRET or dtype == "float32"  # ("auto" takes cuDNN for 16-bit operands on a GPU)
    f = jax.jit(jax.vmap(lambda q, k, v, n, window: kj.prefill_attention(q, k, v, n, window=window),
                         in_axes=(0, 0, 0, 0, None)), static_argnums=4)
    for hq, hkv, window in ((8, 1, 4), (4, 2, 1)):
        q, k, v = (jnp.asarray(rng.standard_normal((2, b, h, t, d)) * scale, dtype) for h in (hq, hkv, hkv))
        got = np.asarray(f(q, k, v, jnp.asarray(np.stack([lengths, lengths[::-1]])), window).astype(jnp.float32))
        assert np.isfinite(got).all()
        for j, n in enumerate((lengths, lengths[::-1])):
            want = _prefill64(_np(q[j]), _np(k[j]), _np(v[j]), n, window)
            for r in range(b):
                for i in range(t):
                    sees = min(i + 1, int(n[r])) > max(0, i - window + 1)
                    if not sees and xla_path:
                        assert np.abs(got[j, r, :, i]).max() == 0.0, (hq, r, i)
                    elif i < n[r]:  # (queries past the length but seeing keys: padding, not compared)
                        err = np.abs(got[j, r, :, i] - want[r, :, i]).max()
                        assert err <= TOL[dtype] * 3 * np.abs(want[r, :, i]).max(), (hq, window, r, i, err)
        if scale > 1:
            assert np.abs(np.einsum("btd,bsd->bts", _np(q[0][:, 0]), _np(k[0][:, 0]))).max() / np.sqrt(d) > 200
