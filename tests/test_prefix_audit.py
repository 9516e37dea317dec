"""Reading a cache over the prefix of its stores that its longest row needs (``cache.prefix``,
``attention.over_prefix``), against an independent float64 NumPy model of DESIGN.md section 1.

The model (``_held`` / ``_attend`` below) is written from the design, not from the library:
Algorithm 1 with the README's storage rule (scale and min stored in the cache dtype, the min
rounded down and the scale up, codes round-half-even from the stored numbers), sinks (the first
S tokens in full precision; groups, key flushes and the value window count from token S), the
Hadamard rotation (K·H / V·H stored, rounded into the cache dtype), and the sliding window (the
newest ``window`` tokens). Rows sit just below, at and just above each prefix size (256, 512, ...
body tokens), at key-flush boundaries, at the capacity and past it (a refused write).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import attention
from models.cache import StackedCache

_BF16 = np.dtype(ml_dtypes.bfloat16)


# ---- the float64 model ---------------------------------------------------------------------------
def _np_dtype(dtype):
    return _BF16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(np.float32)


def _cast(x, dt):
    """Nearest value of float64 x in dt, as float64."""
    return np.asarray(x, np.float64).astype(dt).astype(np.float64)


def _directed(x, dt, up: bool):
    """float64 x rounded into dt toward +inf (up) or -inf, as float64 (finite values)."""
    x = np.asarray(x, np.float64)
    c = x.astype(dt)
    wrong = c.astype(np.float64) < x if up else c.astype(np.float64) > x
    if dt == np.float32:
        stepped = np.nextafter(c, np.float32(np.inf if up else -np.inf))
    else:  # bfloat16: the sign-magnitude bit pattern on an ordered line, one step
        u = c.view(np.uint16).astype(np.int32)
        ordered = np.where(u & 0x8000, -(u & 0x7FFF), u & 0x7FFF) + (1 if up else -1)
        stepped = np.where(ordered < 0, (-ordered) | 0x8000, ordered).astype(np.uint16).view(_BF16)
    return np.where(wrong, stepped.astype(np.float64), c.astype(np.float64))


def _quant(x, bits: int, dt):
    """Asymmetric min/max groups along the last axis of float64 x -> (x_hat, scale) float64."""
    levels = 2**bits - 1
    mn = _directed(x.min(-1, keepdims=True), dt, up=False)
    scale = _directed((x.max(-1, keepdims=True) - mn) / levels, dt, up=True)
    code = np.where(scale > 0, np.clip(np.rint((x - mn) / np.where(scale > 0, scale, 1.0)), 0, levels), 0)
    return code * scale + mn, np.broadcast_to(scale, x.shape)


def _hadamard(d):
    s = np.ones((1, 1))
    while s.shape[0] < d:
        s = np.block([[s, s], [s, -s]])
    return s / np.sqrt(d)


def _held(cfg: kj.KIVIConfig, dtype, k, v, basis="original"):
    """One row's tokens k, v [H, L, D] as fed -> (K_hat, V_hat, K step, V step) [H, L, D] float64:
    what the cache holds for them (basis "original", or "stored": rotated as stored), and the
    quantization step (scale) of each number (0 where it is held in full precision)."""
    dt = _np_dtype(dtype)
    h, n_tok, d = k.shape
    s, r, g, gk = cfg.sink_tokens, cfg.residual_length, cfg.group_size, cfg.key_group
    hm = _hadamard(d)
    ks, vs = _cast(k, dt), _cast(v, dt)
    ks = _cast(ks @ hm, dt) if cfg.rotate_keys else ks
    vs = _cast(vs @ hm, dt) if cfg.rotate_values else vs
    kh, vh, k_step, v_step = ks.copy(), vs.copy(), np.zeros_like(ks), np.zeros_like(vs)
    body = max(n_tok - s, 0)
    nk = body - body % r  # keys quantized: whole residuals of R flushed
    nv = max(body - r, 0)  # values quantized: those that left the R-window
    if nk:
        grp = ks[:, s:s + nk].reshape(h, nk // gk, gk, d).swapaxes(2, 3)  # per channel, Gk tokens
        x, st = (a.swapaxes(2, 3).reshape(h, nk, d) for a in _quant(grp, cfg.k_bits, dt))
        kh[:, s:s + nk], k_step[:, s:s + nk] = _cast(x, dt), st
    if nv:
        x, st = (a.reshape(h, nv, d) for a in _quant(vs[:, s:s + nv].reshape(h, nv, d // g, g), cfg.v_bits, dt))
        vh[:, s:s + nv], v_step[:, s:s + nv] = _cast(x, dt), st
    if basis == "original":
        kh = kh @ hm.T if cfg.rotate_keys else kh
        vh = vh @ hm.T if cfg.rotate_values else vh
    return kh, vh, k_step, v_step


def _attend(q, kh, vh, window=None):
    """q [Hq, D], kh / vh [Hkv, L, D] -> softmax(q K^T / sqrt(D)) V [Hq, D] (GQA: query head j reads
    KV head j // (Hq / Hkv)); window: the newest ``window`` tokens only."""
    hq, d = q.shape
    hkv, n_tok, _ = kh.shape
    lo = 0 if window is None else max(n_tok - window, 0)
    out = np.zeros((hq, d))
    for j in range(hq if n_tok else 0):
        kk, vv = kh[j // (hq // hkv), lo:], vh[j // (hq // hkv), lo:]
        sc = kk @ q[j] / np.sqrt(d)
        p = np.exp(sc - sc.max())
        out[j] = p @ vv / p.sum()
    return out


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# ---- driving the caches ----------------------------------------------------------------------
_CASES = {  # name: (KIVIConfig, dtype, max_length, window); max_length gives several prefixes
    "tokens-2bit": (kj.KIVIConfig(layout="tokens"), jnp.float32, 600, None),
    "tokens-4bit-sinks-rot-kg16-window": (kj.KIVIConfig(layout="tokens", k_bits=4, v_bits=4, sink_tokens=3, rotate="kv",
                                                        key_group_size=16, residual_length=64), jnp.float32, 603, 100),
    "mosaic-sinks-rot-bf16": (kj.KIVIConfig(layout="mosaic", sink_tokens=4, rotate="k"), jnp.bfloat16, 516, None),
}


def _init(cfg, dtype, max_length, batch, hkv=1):
    cls = kj.MosaicKIVICache if cfg.layout == "mosaic" else kj.KIVICache
    d = 128 if cfg.layout == "mosaic" else 32
    return cls.init(cfg, batch=batch, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)


def _tokens(x, at):
    """x [B, H, T, D] -> the tokens at positions at[b] + j, j < w: [B, H, w, D] (at [B, w])."""
    return np.take_along_axis(x, np.clip(at, 0, x.shape[2] - 1)[:, None, :, None], axis=2)


@pytest.mark.parametrize("case", list(_CASES))
def test_decode_at_prefix_and_group_boundaries_matches_float64(case):
    """decode_attention (impl "auto": the prefix read off a GPU; and "reference") over caches whose
    longest row sits just below, at and above each prefix size, with the other rows at 0 tokens,
    inside the sinks, at a key flush and one past it; filled by prefill and appends (fresh
    random tokens each; rows not appending are inactive), up to the capacity and one refused append past it. Tolerances: float32
    caches 2e-5 (float32 softmax over <= 600 tokens of O(1) numbers; the quantized numbers agree
    to an ulp), bf16 2e-2 (q and the full-precision tokens rounded to 8 bits)."""
    cfg, dtype, max_length, window = _CASES[case]
    s, r = cfg.sink_tokens, cfg.residual_length
    b, hq = 4, 2
    cache0 = _init(cfg, dtype, max_length, b)
    d = cache0.head_dim
    sizes = attention.prefix_sizes(cache0)
    assert len(sizes) >= 2 and sizes[0] == 256, sizes
    rng = np.random.default_rng(len(case))
    hist_k = rng.standard_normal((b, 1, max_length + 1, d)) * np.where(rng.random(d) < 0.1, 5.0, 1.0)
    hist_v = rng.standard_normal((b, 1, max_length + 1, d))
    prefill = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))
    append = jax.jit(lambda c, k, v, active: c.append(k, v, active))
    # (impl "auto" off a GPU reads a MosaicKIVICache whole: its prefix read, extend_attention's, is
    # attention._bounded_reference, called here as auto calls it for the token layout)
    decode = jax.jit(lambda q, c: {
        "reference": kj.decode_attention(q, c, impl="reference", window=window),
        "prefix": (attention._bounded_reference(q, c, window) if cfg.layout == "mosaic"
                   else kj.decode_attention(q, c, impl="auto", window=window))})
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    others = [0, max(s - 1, 1), s + r, s + r + 1]  # empty, in the sinks, a key flush, one past it
    longest = [s + n + e for n in sizes[:-1] for e in (-1, 0, 1)] + [max_length]
    for top in longest:
        want_len = np.array([top] + others[1:])
        if top == longest[0]:
            want_len[1] = others[0]
        # prefill to 2 fewer (row 2: to its own length), then append
        lens = np.where(np.arange(b) == 2, want_len, np.maximum(want_len - 2, 0))
        c = prefill(cache0, jnp.asarray(hist_k[:, :, :max_length], dtype), jnp.asarray(hist_v[:, :, :max_length], dtype),
                    jnp.asarray(lens, jnp.int32))
        while (lens < want_len).any():  # append until each row holds its tokens (the others inactive)
            at = np.minimum(lens, max_length)[:, None]
            active = lens < want_len
            c = append(c, jnp.asarray(_tokens(hist_k, at), dtype), jnp.asarray(_tokens(hist_v, at), dtype),
                       jnp.asarray(active))
            lens = lens + active
        if top == max_length:  # one more append: row 0 is full, its write refused and flagged
            at = np.minimum(lens, max_length)[:, None]
            c = append(c, jnp.asarray(_tokens(hist_k, at), dtype), jnp.asarray(_tokens(hist_v, at), dtype),
                       jnp.ones((b,), bool))
            lens = np.minimum(lens + 1, max_length)
            np.testing.assert_array_equal(np.asarray(c.overflow), [True, False, False, False])
        np.testing.assert_array_equal(np.asarray(c.lengths), lens)
        q = jnp.asarray(rng.standard_normal((b, hq, 1, d)), dtype)
        got = {impl: _f64(out) for impl, out in decode(q, c).items()}
        for row in range(b):
            kh, vh, _, _ = _held(cfg, dtype, hist_k[row, :, :lens[row]], hist_v[row, :, :lens[row]])
            want = _attend(_f64(q)[row, :, 0], kh, vh, window)
            for impl, out in got.items():
                np.testing.assert_allclose(out[row, :, 0], want, **tol, err_msg=f"{case} {impl} lengths {lens} row {row}")


_PREFIX_CASES = {  # name: (KIVIConfig, max_length): every prefix size, 2 and 4 bits, both layouts
    "tokens-2bit": (kj.KIVIConfig(layout="tokens"), 700),
    "tokens-4bit-sinks-rot": (kj.KIVIConfig(layout="tokens", k_bits=4, v_bits=4, sink_tokens=5, rotate="kv"), 645),
    "mosaic-sinks-rot": (kj.KIVIConfig(layout="mosaic", sink_tokens=5, rotate="kv"), 645),
}


@pytest.mark.parametrize("case", list(_PREFIX_CASES))
def test_prefix_views_are_the_first_positions_of_the_full_materialization(case):
    """For every n in prefix_sizes, prefix(n).materialize() (both bases) is exactly the first S + n
    positions of the whole cache's (every row: the ring and sinks are shared, the stores cut; a
    constant group, scale 0, is exactly its value, never 0/0), and
    the whole cache holds the float64 model's numbers for every row's tokens (float32 cache: within
    an ulp-level 1e-5; under the rotation a float32 sum in another order may move a number across a
    rounding boundary, so up to 0.1% of the quantized numbers may differ by one step)."""
    cfg, max_length = _PREFIX_CASES[case]
    s = cfg.sink_tokens
    rng = np.random.default_rng(len(case) + 100)
    cache = _init(cfg, jnp.float32, max_length, 3, hkv=2)
    d = cache.head_dim
    lens = np.array([max_length, s + 257, s + 129])  # the longest at the capacity, one past a prefix, past a flush
    k = rng.standard_normal((3, 2, max_length, d)) * np.where(rng.random(d) < 0.1, 5.0, 1.0)
    v = rng.standard_normal((3, 2, max_length, d))
    if cfg.rotate == "none":  # constant groups (scale 0): a key channel over a group, a value token's group
        k[1, 0, s + 32:s + 64, 5] = 1.25
        v[1, 1, s + 10, 32:64] = -0.75
    cache = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(cache, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                                           jnp.asarray(lens, jnp.int32))
    sizes = attention.prefix_sizes(cache)
    assert sizes[:2] == [256, 512] and sizes[-1] == cache.capacity >= max_length - s and len(sizes) == 3, sizes
    assert [cache.prefix(n).capacity for n in sizes] == sizes
    both = jax.jit(lambda c: [v.materialize() + v.materialize(rotated=True) for v in [c] + [c.prefix(n) for n in sizes]])
    full, *views = [[np.asarray(x) for x in m] for m in both(cache)]
    for n, view in zip(sizes, views):
        for f, p in zip(full, view):
            assert p.shape[2] == s + n
            np.testing.assert_array_equal(np.asarray(p), f[:, :, :s + n], err_msg=f"{case} prefix({n})")
        if cfg.rotate == "none":  # the constant groups are exactly their value, no 0/0
            np.testing.assert_array_equal(view[0][1, 0, s + 32:s + 64, 5], 1.25)
            np.testing.assert_array_equal(view[1][1, 1, s + 10, 32:64], -0.75)
    assert np.isfinite(np.asarray(full)).all()
    for row in range(3):
        kh, vh, k_step, v_step = _held(cfg, jnp.float32, k[row, :, :lens[row]], v[row, :, :lens[row]], basis="stored")
        for got, want, step in ((full[2], kh, k_step), (full[3], vh, v_step)):
            diff = np.abs(got[row, :, :lens[row]] - want)
            close = diff <= 1e-5 * (1 + np.abs(want))
            if cfg.rotate == "none":
                assert close.all(), f"{case} row {row}: {diff.max()}"
            else:
                one_step = np.abs(diff - step) <= 1e-5 * (1 + np.abs(want))
                assert (close | one_step).all() and (~close).mean() <= 1e-3, f"{case} row {row}: {diff.max()}"


def test_stacked_cache_writes_and_in_place_reads_match_float64():
    """The model's path: a StackedCache filled per layer by prefill_layer, write_rows (a row
    taken from another stack), extend_all, extend_layer and append_layer, read by decode_attention on
    layer(i) with stack=(layers, i) (the prefix sliced from the stack in the switch), with rows at
    a prefix size and at the capacity (its next write refused), and under jax.vmap (the longest
    request picks the prefix): each layer's own float64 attention (float32 cache: 2e-5)."""
    cfg, dtype, max_length, nl, b, hq = kj.KIVIConfig(layout="tokens", sink_tokens=2), jnp.float32, 520, 2, 3, 2
    one = _init(cfg, dtype, max_length, b)
    d = one.head_dim
    rng = np.random.default_rng(11)
    hk = rng.standard_normal((nl, b, 1, max_length + 2, d))
    hv = rng.standard_normal((nl, b, 1, max_length + 2, d))
    lens = np.array([250, 37, 130])  # row 1 prefilled alone, written in with write_rows
    add = np.array([max_length - 2 - 250, 3, 128])  # row 0 to 2 below the capacity, row 2 past a key flush
    at = lens[:, None] + np.arange(add.max())[None, :]
    more_k, more_v = (jnp.asarray(np.stack([_tokens(h[i], at) for i in range(nl)]), dtype) for h in (hk, hv))

    prefill = jax.jit(lambda st, i, n: st.prefill_layer(i, jnp.asarray(hk[:, :, :, :260], dtype)[i],
                                                        jnp.asarray(hv[:, :, :, :260], dtype)[i], n))
    st = other = StackedCache.stack(one, nl)
    for i in range(nl):
        st = prefill(st, jnp.int32(i), jnp.asarray([250, 0, 130]))
        other = prefill(other, jnp.int32(i), jnp.asarray([0, 37, 0]))
    st = st.write_rows(1, StackedCache(jax.tree.map(lambda x: x[:, 1:2], other.layers)))
    st = jax.jit(lambda st, k, v: st.extend_all(k, v, jnp.asarray(add, jnp.int32)))(st, more_k, more_v)
    lens = lens + add
    write = {"extend": jax.jit(lambda st, i, k, v: st.extend_layer(i, k, v)),
             "append": jax.jit(lambda st, i, k, v: st.append_layer(i, k, v))}
    decode = jax.jit(lambda q, layers, i: (  # as the model reads layer i; and per request under vmap
        kj.decode_attention(q, jax.tree.map(lambda x: x[i], layers), stack=(layers, i)),
        jax.vmap(lambda q1, c1: kj.decode_attention(q1[None], c1)[0])(q, jax.tree.map(lambda x: x[i][:, None], layers))))
    for step in range(3):  # extend_layer, append_layer, append_layer (row 0: 518 -> 519 -> 520 -> refused)
        at = np.minimum(lens, max_length)[:, None]
        for i in range(nl):
            kt, vt = (jnp.asarray(_tokens(h[i], at), dtype) for h in (hk, hv))
            st = write["extend" if step == 0 else "append"](st, jnp.int32(i), kt, vt)
        lens = np.minimum(lens + 1, max_length)
        np.testing.assert_array_equal(np.asarray(st.lengths), lens)
        assert np.asarray(st.overflow).tolist() == [step == 2, False, False]
        q = jnp.asarray(rng.standard_normal((nl, b, hq, 1, d)), dtype)
        for i in range(nl):
            got, each = (_f64(x) for x in decode(q[i], st.layers, jnp.int32(i)))
            for row in range(b):
                kh, vh, _, _ = _held(cfg, dtype, hk[i, row, :, :lens[row]], hv[i, row, :, :lens[row]])
                want = _attend(_f64(q[i])[row, :, 0], kh, vh)
                np.testing.assert_allclose(got[row, :, 0], want, rtol=2e-5, atol=2e-5, err_msg=f"step {step} layer {i}")
                np.testing.assert_allclose(each[row, :, 0], want, rtol=2e-5, atol=2e-5)


# ---- errors ----------------------------------------------------------------------------------
def _formats():
    return {"dense": kj.DenseCache.init(batch=1, num_kv_heads=1, head_dim=32, max_length=600, dtype=jnp.float32),
            "kivi": _init(kj.KIVIConfig(layout="tokens", residual_length=32), jnp.float32, 600, 1),
            "mosaic": _init(kj.KIVIConfig(layout="mosaic", residual_length=32), jnp.float32, 600, 1)}


@pytest.mark.parametrize("fmt", ["dense", "kivi", "mosaic"])
def test_prefix_takes_a_static_integer(fmt):
    """prefix(tokens) sets array shapes: a bool (taken as 1 token), a float (a TypeError from a
    slice) or a traced count (a TracerBoolConversionError) is a named error; a NumPy integer works."""
    cache = _formats()[fmt]
    for bad in (True, 256.0, np.float32(256)):
        with pytest.raises(ValueError, match=re.escape(f"tokens={bad!r} must be a static integer")):
            cache.prefix(bad)
    with pytest.raises(ValueError, match=r"tokens=a traced int32\[\] must be a static integer"):
        jax.jit(lambda n: cache.prefix(n).capacity)(256)
    for bad in (0, 1000, -256):
        with pytest.raises(ValueError, match=rf"tokens={bad}: a prefix is a static integer"):
            cache.prefix(bad)
    assert cache.prefix(np.int64(256)).capacity == 256


@pytest.mark.parametrize("fmt", ["dense", "kivi", "mosaic"])
def test_writes_into_a_prefix_view_are_refused(fmt):
    """A prefix view keeps the full max_length over shorter stores: appends into it wrote past its
    stores (dynamic_update_slice clamped them onto its last slots, scatters dropped them) while its
    lengths counted them. append, extend and a stacked append now name the view."""
    cache = _formats()[fmt]
    tok = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, 1, cache.head_dim)), jnp.float32)
    view = cache.prefix(256)
    match = rf"this {type(cache).__name__} is a prefix view \(256 of the \d+ tokens its max_length=600 needs"
    with pytest.raises(ValueError, match=match):
        view.append(tok, tok)
    with pytest.raises(ValueError, match=match):
        view.extend(jnp.concatenate([tok] * 3, 2), jnp.concatenate([tok] * 3, 2))
    with pytest.raises(ValueError, match=match):
        StackedCache.stack(view, 2).append_layer(1, tok, tok)


def test_stacked_cache_checks_its_indices_and_operands():
    """A concrete layer index outside [0, L) was clamped (layer(3) of 3 read layer 2, and
    append_layer / extend_layer / prefill_layer / set_layer(3) wrote layer 2): a named error now.
    stack's num_layers, write_rows' start and extend_all's [L, ...] operands are checked too, and
    write_rows takes rows of the cache's own dtype only (a cast would round a float32 cache's
    scales into bf16)."""
    one = _init(kj.KIVIConfig(layout="tokens"), jnp.float32, 300, 2)
    st = StackedCache.stack(one, 3)
    tok = jnp.ones((2, 1, 1, 32), jnp.float32)
    five = jnp.ones((2, 1, 5, 32), jnp.float32)
    for bad in (3, -1, -4, jnp.int32(3)):
        for call in (lambda: st.layer(bad), lambda: st.set_layer(bad, one), lambda: st.append_layer(bad, tok, tok),
                     lambda: st.extend_layer(bad, five, five), lambda: st.prefill_layer(bad, five, five)):
            with pytest.raises(ValueError, match=re.escape(f"i={bad!r} must be a layer index in [0, 3)")):
                call()
    with pytest.raises(ValueError, match=r"i=1.0 must be a layer index in \[0, 3\)"):
        st.layer(1.0)
    assert st.layer(2).k_res.shape == one.k_res.shape
    np.testing.assert_array_equal(  # a traced index is the model loop's
        np.asarray(jax.jit(lambda i: st.append_layer(i, tok, tok).layers.lengths)(1)), [[0, 0], [1, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"num_layers=2.0 must be an integer >= 1"):
        StackedCache.stack(one, 2.0)
    with pytest.raises(ValueError, match=r"ks has shape \(2, 2, 1, 5, 32\); expected \[L=3, B, Hkv, T, D\]"):
        st.extend_all(jnp.ones((2, 2, 1, 5, 32)), jnp.ones((2, 2, 1, 5, 32)))
    sub = StackedCache.stack(_init(kj.KIVIConfig(layout="tokens"), jnp.float32, 300, 1), 3)
    for bad in (True, 0.5):
        with pytest.raises(ValueError, match=rf"start={bad!r} must be an integer in \[0, 1\]"):
            st.write_rows(bad, sub)
    with pytest.raises(ValueError, match="rows holds a bfloat16 buffer where this cache's is float32"):
        st.write_rows(0, StackedCache.stack(_init(kj.KIVIConfig(layout="tokens"), jnp.bfloat16, 300, 1), 3))
