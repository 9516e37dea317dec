"""Audit of the Pallas decode kernels (pallas_kernels.kivi_decode / kivi_window / dense_decode,
dispatched by kivi_jax.attention_pallas) at their boundaries, in interpret mode, against a
float64 NumPy model written here from DESIGN.md §1 (not from kivi_jax):

* the cache is built by prefill + appends from inputs kept on the side; the model decides per
  row which tokens Algorithm 1 has quantized (keys: the first n = Lb - Lb % R body tokens,
  values: the first max(Lb - R, 0)), takes every other token (sinks, key residual, value window)
  from the *inputs* in full precision, and dequantizes the quantized ones from the stored codes
  with its own unpacking of the documented layout (element e of a word row e // c at bit
  bits*((e % c) // 2) + 16*(e % 2)); each dequantized number is checked to lie within scale/2
  of its input (the codes belong to the right tokens);
* softmax over the tokens a row sees (the newest ``window``), GQA by head groups, a row with
  nothing to see gives 0.

Boundaries: lengths 0, 1, R - 1, R, R + 1, chunk multiples +-1, a full cache, ragged batches and
batch 1; num_splits above the chunk count; windows at and around every boundary; sinks with
windows; k_bits != v_bits, 1/2/4/8 bits, GQA 1-16 (3 and 12 padded), head_dim 32-256 and
head_dims that are not powers of two; float32 / bfloat16 / float16; the dense kernel at a
capacity that is no multiple of its chunk; large magnitudes, constant groups; jit and vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import attention_pallas as ap

_DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def _np_dt(dtype):
    return np.dtype(_DT[jnp.dtype(dtype).name])


# ---- the float64 model -----------------------------------------------------------------------

def _code(words, p, bits):
    """Code [D] of element p from packed word rows [W, D] (pair-split layout, design-notes)."""
    c = 32 // bits
    shift = bits * ((p % c) // 2) + 16 * (p % 2)
    return ((words[p // c].astype(np.uint64) >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.float64)


def _held(arrays, k_in, v_in, length, cfg, dtype):
    """Row's keys and values [L, D] float64 as Algorithm 1 holds them (see module doc)."""
    kc, ks, km, vc, vs, vm = arrays
    r, sk, g, kg = cfg.residual_length, cfg.sink_tokens, cfg.group_size, cfg.key_group
    dt = _np_dt(dtype)
    keys = k_in[:length].astype(dt).astype(np.float64)
    values = v_in[:length].astype(dt).astype(np.float64)
    lb = max(length - sk, 0)
    n, m = lb - lb % r, max(lb - r, 0)
    for p in range(lb):
        t = sk + p
        for stored, is_key in ((p < n, True), (p < m, False)):
            if not stored:
                continue
            if is_key:
                scale, mn = ks[p // kg], km[p // kg]
                x = _code(kc, p, cfg.k_bits) * scale + mn
            else:
                scale, mn = np.repeat(vs[p], g), np.repeat(vm[p], g)
                x = _code(vc, p, cfg.v_bits) * scale + mn
            x = x.astype(dt).astype(np.float64)  # rounded once into the cache dtype
            orig = keys[t] if is_key else values[t]
            # the code is that token's: within half a step (plus the dtype's rounding of x)
            slack = scale / 2 + np.abs(orig) * 2.0 ** -(ml_dtypes.finfo(dt).nmant) + 1e-30
            assert np.all(np.abs(x - orig) <= slack * (1 + 1e-6)), (p, is_key)
            if is_key:
                keys[t] = x
            else:
                values[t] = x
    return keys, values


def _attend(q, keys, values, length, window):
    lo = 0 if window is None else max(length - window, 0)
    if length <= lo:
        return np.zeros_like(q)
    s = q @ keys[lo:length].T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p @ values[lo:length]) / p.sum(-1, keepdims=True)


def kivi_model(q, cache, k_in, v_in, lengths, window=None):
    """q [B, Hq, 1, D] -> [B, Hq, 1, D] float64 over what the cache should hold of k_in, v_in."""
    cfg = cache.config
    arrays = [np.asarray(getattr(cache, f)) for f in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")]
    arrays = [a if a.dtype == np.uint32 else a.astype(np.float64) for a in arrays]
    q, k_in, v_in = (np.asarray(x, np.float64) for x in (q, k_in, v_in))
    b, hq, _, d = q.shape
    hkv = k_in.shape[1]
    g = hq // hkv
    out = np.zeros((b, hq, 1, d))
    for i in range(b):
        for h in range(hkv):
            keys, values = _held([a[i, h] for a in arrays], k_in[i, h], v_in[i, h], int(lengths[i]), cfg, cache.dtype)
            out[i, h * g:(h + 1) * g, 0] = _attend(q[i, h * g:(h + 1) * g, 0], keys, values, int(lengths[i]), window)
    return out


def dense_model(q, k_in, v_in, lengths, dtype, window=None):
    dt = _np_dt(dtype)
    q = np.asarray(q, np.float64)
    k_in, v_in = (np.asarray(x, np.float64).astype(dt).astype(np.float64) for x in (k_in, v_in))
    b, hq, _, d = q.shape
    g = hq // k_in.shape[1]
    out = np.zeros((b, hq, 1, d))
    for i in range(b):
        for h in range(k_in.shape[1]):
            out[i, h * g:(h + 1) * g, 0] = _attend(q[i, h * g:(h + 1) * g, 0], k_in[i, h], v_in[i, h],
                                                   int(lengths[i]), window)
    return out


# ---- building caches -------------------------------------------------------------------------

_prefill = jax.jit(lambda c, k, v, n: c.prefill(k, v, lengths=n))
_append = jax.jit(lambda c, k, v, a: c.append(k, v, active=a))


def _inputs(rng, b, hkv, t, d, dtype, scale=1.0):
    outliers = 1.0 + 6.0 * (rng.random(d) < 0.1)  # KIVI's outlier key channels
    k = rng.standard_normal((b, hkv, t, d)) * outliers * scale
    v = rng.standard_normal((b, hkv, t, d)) * scale
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _build(cache, k, v, lengths, appends):
    """Row b: a prefill of max(L_b - appends, 0) tokens, then appends up to L_b (its own tokens)."""
    lengths = np.asarray(lengths)
    cur = np.maximum(lengths - appends, 0)
    cache = _prefill(cache, k[:, :, :max(int(cur.max()), 1)], v[:, :, :max(int(cur.max()), 1)],
                     jnp.asarray(cur, jnp.int32))
    while (cur < lengths).any():
        idx = jnp.asarray(np.minimum(cur, k.shape[2] - 1))[:, None, None, None]
        act = cur < lengths
        cache = _append(cache, jnp.take_along_axis(k, idx, axis=2), jnp.take_along_axis(v, idx, axis=2),
                        jnp.asarray(act))
        cur = cur + act
    assert (np.asarray(cache.lengths) == lengths).all()
    return cache


def _kivi(cfg, lengths, max_length, *, hkv=2, gqa=2, d=32, dtype=jnp.float32, seed=0, appends=2, scale=1.0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    k, v = _inputs(rng, b, hkv, max(max(lengths), 1), d, dtype, scale)
    cache = kj.KIVICache.init(cfg, batch=b, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)
    cache = _build(cache, k, v, lengths, appends)
    q = jnp.asarray(rng.standard_normal((b, hkv * gqa, 1, d)), dtype)
    return cache, q, k, v


def _dense(lengths, max_length, *, hkv=2, gqa=2, d=32, dtype=jnp.float32, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    k, v = _inputs(rng, b, hkv, max_length, d, dtype, scale)
    cache = kj.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)
    cache = _prefill(cache, k, v, jnp.asarray(lengths, jnp.int32))
    q = jnp.asarray(rng.standard_normal((b, hkv * gqa, 1, d)) * scale, dtype)
    return cache, q, k, v


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (nb if nb > 0 else 1.0)


def _check_rows(out, want, lengths, dtype, what):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), what
    tol = TOL[jnp.dtype(dtype).name]
    for i, n in enumerate(lengths):
        if n == 0:  # nothing to attend: exactly 0, not NaN
            assert np.abs(out[i]).max() == 0.0, (what, i)
        else:
            assert _rel(out[i], want[i]) <= tol, (what, i, n, _rel(out[i], want[i]))


# ---- KIVI kernel ----------------------------------------------------------------------------

KIVI_BOUNDARIES = [
    # (name, config, lengths, max_length, windows, decode_attention kwargs)
    ("r32-splits8", kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32),
     [0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256], 256, (None, 33), dict(num_splits=8)),
    ("full-4bit-own", kj.KIVIConfig(k_bits=4, v_bits=4, group_size=16, residual_length=32),
     [128, 127, 96, 97, 0], 128, (None, 31), dict(num_splits=5, ring_program="own")),
    ("sinks-launch", kj.KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=32, sink_tokens=4),
     [0, 3, 4, 5, 36, 37, 68, 69, 104, 260], 260, (None, 5, 40), dict(num_splits=3, ring_program="launch")),
    ("sinks17-first", kj.KIVIConfig(k_bits=4, v_bits=2, group_size=16, residual_length=32, sink_tokens=17),
     [0, 16, 17, 18, 49, 50, 145], 200, (17, 50), dict(num_splits=9, ring_program="first")),
    ("1bit-keys-xla-ring", kj.KIVIConfig(k_bits=1, v_bits=8, group_size=16, residual_length=16),
     [0, 15, 16, 17, 495, 496, 497, 512], 512, (17,), {}),
    ("capacity-equals-R", kj.KIVIConfig(k_bits=4, v_bits=4, group_size=32, residual_length=128),
     [128, 127, 64, 1], 128, (100,), {}),
    ("key-groups-64-chunk32", kj.KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=64, key_group_size=64),
     [0, 63, 64, 65, 128, 129, 200], 256, (70,), dict(chunk=32)),
]


@pytest.mark.parametrize("name,cfg,lengths,max_length,windows,kw", KIVI_BOUNDARIES, ids=[c[0] for c in KIVI_BOUNDARIES])
def test_kivi_kernel_at_boundaries(name, cfg, lengths, max_length, windows, kw):
    cache, q, k, v = _kivi(cfg, lengths, max_length, seed=len(name))
    for window in windows:
        out = ap.decode_attention(q, cache, window=window, interpret=True, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        _check_rows(out, kivi_model(q, cache, k, v, lengths, window), lengths, q.dtype, (name, window))


def test_kivi_kernel_when_capacity_is_below_the_residual():
    """4-bit capacity 128 with R = 256: no key is ever flushed (the plain-JAX ring, k_res only).
    Prefilled only: an append into such a cache fails to trace (cache_kivi's flush, reported)."""
    cfg = kj.KIVIConfig(k_bits=4, v_bits=4, group_size=32, residual_length=256)
    lengths = [0, 1, 100, 128]
    cache, q, k, v = _kivi(cfg, lengths, 128, appends=0, seed=5)
    for window in (50,):
        _check_rows(ap.decode_attention(q, cache, window=window, interpret=True),
                    kivi_model(q, cache, k, v, lengths, window), lengths, q.dtype, window)


DTYPE_CASES = [  # (k_bits, v_bits, gqa, head_dim, dtype)
    (4, 2, 8, 64, jnp.bfloat16), (2, 2, 4, 128, jnp.float16), (2, 4, 3, 64, jnp.bfloat16),
    (4, 4, 1, 256, jnp.float32), (2, 8, 12, 32, jnp.float16),
]


@pytest.mark.parametrize("k_bits,v_bits,gqa,d,dtype", DTYPE_CASES)
def test_kivi_kernel_bits_gqa_head_dim_dtype(k_bits, v_bits, gqa, d, dtype):
    cfg = kj.KIVIConfig(k_bits=k_bits, v_bits=v_bits, group_size=32, residual_length=64)
    lengths = [0, 1, 64, 65, 191, 256] if d < 256 else [130]  # (batch 1 at head_dim 256)
    cache, q, k, v = _kivi(cfg, lengths, 256, hkv=1 if gqa > 4 or d > 64 else 2, gqa=gqa, d=d, dtype=dtype,
                           seed=k_bits * 7 + gqa)
    window = 65 if gqa % 2 == 0 else None
    _check_rows(ap.decode_attention(q, cache, window=window, interpret=True),
                kivi_model(q, cache, k, v, lengths, window), lengths, dtype, window)


def test_head_dim_not_a_power_of_two():
    """head_dim 96 / 80 / 100 (group_size 16 divides 80 and 96): the dispatch pads D to a power of
    two for the kernels. Before, the Triton lowering raised for these ("all operations have array
    arguments and results whose size is a power of 2": a [4, 96] array), so decode on a GPU failed
    for such a model while interpret mode (no such rule) hid it. Results against the model, and
    the CUDA lowering (no GPU needed) of both kernels."""
    from pallas_kernels.triton_ir import lower_to_ttir

    cfg = kj.KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=32, sink_tokens=3)
    lengths = [0, 1, 36, 100, 200]
    for d, gqa, dtype, kw in ((96, 3, jnp.float32, {}), (80, 2, jnp.bfloat16, dict(ring_program="launch"))):
        cache, q, k, v = _kivi(cfg, lengths, 256, d=d, gqa=gqa, dtype=dtype, seed=d)
        for window in (40,):
            out = ap.decode_attention(q, cache, window=window, interpret=True, **kw)
            assert out.shape == q.shape
            _check_rows(out, kivi_model(q, cache, k, v, lengths, window), lengths, dtype, (d, window))
    dense, qd, kd, vd = _dense([0, 1, 65, 99], 99, d=100, seed=3)
    _check_rows(ap.decode_attention(qd, dense, window=40, interpret=True),
                dense_model(qd, kd, vd, [0, 1, 65, 99], jnp.float32, 40), [0, 1, 65, 99], jnp.float32, "dense")
    kivi16 = kj.KIVICache.init(cfg, batch=2, num_kv_heads=2, head_dim=96, max_length=256, dtype=jnp.bfloat16)
    dense16 = kj.DenseCache.init(batch=2, num_kv_heads=2, head_dim=80, max_length=100, dtype=jnp.bfloat16)
    for cache in (kivi16, dense16):
        q = jax.ShapeDtypeStruct((2, 6, 1, cache.head_dim), jnp.bfloat16)
        ir = lower_to_ttir(lambda q, c: ap.decode_attention(q, c, interpret=False), q, cache)
        assert "tt.dot" in ir and "x128x" in ir  # the padded head_dim in its tiles


# ---- dense kernel ---------------------------------------------------------------------------

DENSE_CASES = [  # (lengths, max_length, gqa, d, dtype, windows, num_splits)
    ([0, 1, 63, 64, 65, 99, 100], 100, 2, 32, jnp.float32, (None, 1, 37, 65), None),
    ([0, 1, 63, 64, 65, 127, 128], 128, 2, 32, jnp.float32, (64,), 8),
    ([17, 16, 0], 17, 8, 16, jnp.float32, (5,), 3),
    ([0, 1, 65, 130], 130, 3, 64, jnp.bfloat16, (65,), None),
    ([200], 200, 1, 128, jnp.float16, (None,), 4),
]


@pytest.mark.parametrize("lengths,max_length,gqa,d,dtype,windows,splits", DENSE_CASES)
def test_dense_kernel_at_boundaries(lengths, max_length, gqa, d, dtype, windows, splits):
    cache, q, k, v = _dense(lengths, max_length, gqa=gqa, d=d, dtype=dtype, seed=max_length)
    for window in windows:
        out = ap.decode_attention(q, cache, window=window, interpret=True, num_splits=splits)
        assert out.shape == q.shape and out.dtype == q.dtype
        _check_rows(out, dense_model(q, k, v, lengths, dtype, window), lengths, dtype, window)


# ---- extreme inputs ----------------------------------------------------------------------------

def test_large_magnitudes_and_constant_groups():
    """Scores in the hundreds (online softmax far from one-hot), float16 keys and values of 200
    (scores and p·V in float32), and caches whose every key and value is one vector (every group
    constant: scale 0): finite, and the model's answer."""
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    lengths = [200, 65, 33]
    for dtype, scale in ((jnp.float32, 30.0), (jnp.float16, 200.0)):
        cache, q, k, v = _kivi(cfg, lengths, 256, d=64, dtype=dtype, scale=scale, seed=int(scale))
        q = (q.astype(jnp.float32) * (3.0 / scale)).astype(dtype)  # |q·k| / sqrt(D) ~ 3 * 8 * outliers
        _check_rows(ap.decode_attention(q, cache, interpret=True), kivi_model(q, cache, k, v, lengths),
                    lengths, dtype, (dtype, scale))
        dense, qd, kd, vd = _dense(lengths, 200, d=64, dtype=dtype, scale=scale, seed=1)
        qd = (qd.astype(jnp.float32) / scale ** 2 * 3.0).astype(dtype)
        _check_rows(ap.decode_attention(qd, dense, interpret=True), dense_model(qd, kd, vd, lengths, dtype),
                    lengths, dtype, ("dense", dtype))
    rng = np.random.default_rng(4)
    for dtype in (jnp.float16,):
        k = jnp.asarray(np.broadcast_to(rng.standard_normal(32), (3, 1, 200, 32)), dtype)
        # values: groups of G = 16 equal channels (per-token groups constant too)
        v = jnp.asarray(np.broadcast_to(np.repeat(rng.standard_normal(2), 16), (3, 1, 200, 32)), dtype)
        cache = _build(kj.KIVICache.init(cfg, batch=3, num_kv_heads=1, head_dim=32, max_length=256, dtype=dtype),
                       k, v, [199, 64, 33], appends=2)
        q = jnp.asarray(rng.standard_normal((3, 2, 1, 32)), dtype)
        out = ap.decode_attention(q, cache, interpret=True)
        _check_rows(out, kivi_model(q, cache, k, v, [199, 64, 33]), [199, 64, 33], dtype, "constant")
        # every token is the same vector v: attention returns it whatever the scores
        want = np.broadcast_to(np.asarray(v[:, :, :1], np.float64).repeat(2, axis=1), out.shape)
        assert _rel(out, want) <= TOL[jnp.dtype(dtype).name]


def test_float16_groups_spanning_the_whole_range_stay_finite():
    """float16 keys and values whose groups span [-65504, 65504]: the top code's min + 3 * scale
    must round below inf in the kernel's own float16 arithmetic (before, scale 43680 made it
    65536 -> inf in the kernel, while the reference clipped it to 65504); the stored scale is one
    ulp smaller now (quant.group_params)."""
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    lengths = [120, 70]
    top = 65504.0
    rng = np.random.default_rng(9)
    k = rng.standard_normal((2, 1, 120, 32))
    v = rng.standard_normal((2, 1, 120, 32))
    k[:, :, ::16, :] = top  # every key group (16 tokens of a channel) spans [-max, max]
    k[:, :, 1::16, :] = -top
    v[:, :, :, ::16] = top  # every value group (16 channels of a token) likewise
    v[:, :, :, 1::16] = -top
    k, v = jnp.asarray(k, jnp.float16), jnp.asarray(v, jnp.float16)
    cache = _build(kj.KIVICache.init(cfg, batch=2, num_kv_heads=1, head_dim=32, max_length=128, dtype=jnp.float16),
                   k, v, lengths, appends=2)
    q = jnp.asarray(rng.standard_normal((2, 2, 1, 32)) * 1e-5, jnp.float16)  # scores stay moderate
    _check_rows(ap.decode_attention(q, cache, interpret=True), kivi_model(q, cache, k, v, lengths),
                lengths, jnp.float16, "float16 range")
    scale = np.asarray(cache.v_scale, np.float64)[:, :, :80]
    assert (np.asarray(cache.v_min, np.float64)[:, :, :80] + 3 * scale < top + 16).all()  # (16: half an ulp)


@pytest.mark.parametrize("kind", ["dense", "kivi"])
def test_16_bit_outputs_are_convex_combinations_of_the_values(kind):
    """A value channel at float16's max (+-65504) in every token attends to exactly +-65504 through
    the kernels (interpreted; KIVI: rows within the full-precision window) and XLA's 16-bit path:
    l sums p as rounded for p·V. With l summed from the unrounded p, keys of +-65504 every 16th
    token and queries of 1e-5 (scores of about +-1, float16 q exact) put 6 outputs past the max,
    which float16 rounds to inf (the float16-range test above as well)."""
    rng = np.random.default_rng(2)
    b, h, t, d = 3, 2, 120, 32
    k = rng.standard_normal((b, h, t, d))
    v = rng.standard_normal((b, h, t, d))
    k[:, :, ::16, :], k[:, :, 1::16, :] = 65504.0, -65504.0
    v[..., 0], v[..., 1] = 65504.0, -65504.0
    k, v = jnp.asarray(k, jnp.float16), jnp.asarray(v, jnp.float16)
    lengths = jnp.asarray([120, 77, 1], jnp.int32)
    if kind == "dense":
        cache = kj.DenseCache.init(batch=b, num_kv_heads=h, head_dim=d, max_length=t, dtype=jnp.float16)
    else:  # R = 128: nothing quantized, the kernel's ring program and its XLA fallback
        cache = kj.KIVICache.init(kj.KIVIConfig(), batch=b, num_kv_heads=h, head_dim=d, max_length=t,
                                  dtype=jnp.float16)
    cache = cache.prefill(k, v, lengths=lengths)
    for size in (1e-5, 1e-3, 1.0):
        q = jnp.asarray(rng.standard_normal((b, 2 * h, 1, d)) * size, jnp.float16)
        # (compiled on a GPU: interpreted there, XLA:GPU may fold the kernel's p cast pair away)
        interpret = jax.default_backend() != "gpu"
        outs = {"xla": kj.decode_attention(q, cache, impl="xla"),
                "pallas": ap.decode_attention(q, cache, interpret=interpret)}
        if kind == "kivi":
            outs["pallas, ring in XLA"] = ap.decode_attention(q, cache, interpret=interpret, ring_program="xla")
        for name, out in outs.items():
            out = np.asarray(out, np.float64)
            assert (out[..., 0] == 65504.0).all() and (out[..., 1] == -65504.0).all(), (name, size, out[..., :2])


# ---- jit and vmap ------------------------------------------------------------------------------

def test_jit_and_vmap_agree_with_eager():
    """kj.decode_attention(impl="pallas") eager, jitted, vmapped over a stack of caches and
    jit(vmap): the same numbers as each cache alone, and the model's (KIVI with sinks and a
    window; dense)."""
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32, sink_tokens=2)
    lens = [[0, 40], [100, 33], [200, 1]]
    kivis = [_kivi(cfg, n, 256, seed=20 + i) for i, n in enumerate(lens)]
    denses = [_dense(n, 200, seed=30 + i) for i, n in enumerate(lens)]
    for items, model in ((kivis, kivi_model), (denses, lambda q, c, k, v, n, w: dense_model(q, k, v, n, c.dtype, w))):
        caches = jax.tree.map(lambda *x: jnp.stack(x), *[c for c, *_ in items])
        qs = jnp.stack([q for _, q, *_ in items])
        for window in (35,):
            f = lambda q, c: kj.decode_attention(q, c, impl="pallas", window=window)  # noqa: E731
            vm, jvm = jax.vmap(f)(qs, caches), jax.jit(jax.vmap(f))(qs, caches)
            for i, (cache, q, k, v) in enumerate(items):
                eager = np.asarray(f(q, cache))
                _check_rows(eager, model(q, cache, k, v, lens[i], window), lens[i], jnp.float32, (i, window))
                for got in (jax.jit(f)(q, cache), vm[i], jvm[i]):
                    np.testing.assert_allclose(np.asarray(got), eager, rtol=1e-6, atol=1e-6)
