"""Audit of KIVIConfig's extensions (sinks, rotation, key groups, mixed / 4-bit widths, other G
and R) and decode_attention's sliding window, in both cache layouts, against a float64 model of
DESIGN.md §1's Algorithm 1 written here from the spec text alone (not tests/reference_kivi.py).

The model (:class:`Algo1`) keeps per row Python lists, as the algorithm reads: the S sinks; the
quantized keys Kq and the key residual Kr (flushed, R keys at once in groups of Gk tokens per
channel, when it fills); the quantized values Vq and the value window Vr (the token leaving the
R-window quantized alone, per token in groups of G channels). Quantization is the spec's plain
float64 min/max: scale = (max - min) / (2^b - 1), code = clip(round_half_even((x - min) / scale)),
a constant group exactly its value. The library stores scale and min in the cache dtype (rounded),
so a code may differ where (x - min) / scale sits within that rounding of a half: the model marks
those elements and allows them one level; everywhere else it asks for the dtype's rounding.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kivi_jax import KIVICache, KIVIConfig, MosaicKIVICache, decode_attention

HKV, HQ = 2, 4


# ---- the model -----------------------------------------------------------------------------------


def sylvester(d):
    """The orthonormal Hadamard matrix of order d (Sylvester's doubling), float64."""
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d)


def cast(x, dtype):
    """float64 ``x`` rounded into the cache dtype, back as float64."""
    nd = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)
    return np.asarray(x, np.float64).astype(nd).astype(np.float64)


def unrotate(x, h):
    """x [..., D] (stored basis) -> x·H^T (as a 2-D product: numpy's stacked matmul skips BLAS)."""
    return (x.reshape(-1, x.shape[-1]) @ np.ascontiguousarray(h.T)).reshape(x.shape)


def quantize(x, e, bits, axis, group, dtype):
    """Spec quantization of float64 x over groups of ``group`` along ``axis`` -> (x_hat, tol, tie).

    e: a bound on how far the library's stored x may be from ours (x·H summed in float32 in
    another order; 0 unrotated). tie: (x - min) / scale within what that and the library's
    storage (scale and min rounded into the dtype, a step outward at most) can move it of a
    half, so either neighbouring code is right. tol: the error the library may show per element:
    those roundings (x_hat's into the dtype included), plus one level at a tie."""
    x, e = (np.moveaxis(np.asarray(a, np.float64), axis, -1) for a in (x, e))
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    e = e.reshape(g.shape)
    levels = 2 ** bits - 1
    mn, mx = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (mx - mn) / levels
    pos = scale > 0
    q = np.where(pos, (g - mn) / np.where(pos, scale, 1), 0.0)
    code = np.clip(np.round(q), 0, levels)  # np.round: half to even
    xhat = np.where(pos, code * scale + mn, mn)  # a constant group: exactly its value
    eps = 2.0 ** -7 if jnp.dtype(dtype) == jnp.bfloat16 else 2.0 ** -22  # one ulp, relative
    err = 1.1 * (eps * (levels * scale + np.abs(mn)) + e + e.max(-1, keepdims=True))  # of x - min
    shift = np.where(pos, err / np.where(pos, scale, 1), 0) + 1e-9
    tie = pos & (np.abs(q - np.floor(q) - 0.5) < shift)
    tol = err + eps * np.abs(g) + np.where(tie, scale * (1 + 4 * eps), 0)
    back = lambda a: np.moveaxis(np.broadcast_to(a, g.shape).reshape(x.shape), -1, axis)  # noqa: E731
    return back(xhat), back(tol), back(tie)


class Row:
    """One row's state: lists of [H, D] tokens (stored basis) with their tolerances (see quantize)."""

    def __init__(self):
        self.sink, self.kq, self.kr, self.vq, self.vr = [], [], [], [], []  # (x, tol, tie) each
        self.length = 0


class Algo1:
    """Algorithm 1 (DESIGN.md §1) with the extensions, per row, in float64."""

    def __init__(self, cfg, batch, head_dim, max_length, dtype):
        self.cfg, self.d, self.max_length, self.dtype = cfg, head_dim, max_length, dtype
        self.S, self.R = cfg.sink_tokens, cfg.residual_length
        self.Gk = cfg.group_size if cfg.key_group_size is None else cfg.key_group_size
        self.H = sylvester(head_dim)
        self.rot_k, self.rot_v = cfg.rotate in ("k", "kv"), cfg.rotate in ("v", "kv")
        self.rows = [Row() for _ in range(batch)]
        self.overflow = np.zeros(batch, bool)

    def _stored(self, x, rot):
        """The cache holds x in its dtype, then (rotate) x·H rounded into it -> (x, tol, tie): tol
        bounds the library's float32 sum of x·H in another order (a few ulps of the token's norm),
        in bf16 rounded to the neighbour of ours at worst (a double rounding)."""
        x = cast(x, self.dtype)
        if not rot:
            return x, np.zeros_like(x), np.zeros(x.shape, bool)
        y = cast(x @ self.H, self.dtype)
        tol = 2.0 ** -18 * np.linalg.norm(y, axis=-1, keepdims=True) + (
            2.0 ** -7 * np.abs(y) if jnp.dtype(self.dtype) == jnp.bfloat16 else 0)
        tol = np.broadcast_to(tol, y.shape)
        return y, tol, np.zeros(y.shape, bool)

    def _quant_keys(self, block):  # R (x, tol, tie) -> R quantized: per channel, Gk tokens a group
        xs, es = np.stack([b[0] for b in block]), np.stack([b[1] for b in block])
        return list(zip(*quantize(xs, es, self.cfg.k_bits, 0, self.Gk, self.dtype)))

    def _quant_value(self, tok):  # per token, G channels a group
        return quantize(tok[0], tok[1], self.cfg.v_bits, 1, self.cfg.group_size, self.dtype)

    def append_row(self, b, k, v):
        """k, v [H, D] (input basis): Algorithm 1's append, the sinks first."""
        row = self.rows[b]
        if row.length >= self.max_length:
            self.overflow[b] = True  # refused
            return
        k, v = self._stored(k, self.rot_k), self._stored(v, self.rot_v)
        row.length += 1
        if len(row.sink) < self.S:
            row.sink.append((k, v))
            return
        row.kr.append(k)
        if len(row.kr) == self.R:  # Kr full: quantized per channel, emptied
            row.kq += self._quant_keys(row.kr)
            row.kr = []
        row.vr.append(v)
        if len(row.vr) > self.R:  # the token leaving the R-window is quantized
            row.vq.append(self._quant_value(row.vr.pop(0)))

    def prefill(self, k, v, lengths):
        """Algorithm 1's prefill, literally (sinks first, then the body), per row."""
        for b, length in enumerate(lengths):
            self.rows[b] = row = Row()
            ks = [self._stored(k[b, :, t], self.rot_k) for t in range(length)]
            vs = [self._stored(v[b, :, t], self.rot_v) for t in range(length)]
            s = min(self.S, length)
            row.sink, ks, vs = list(zip(ks[:s], vs[:s])), ks[s:], vs[s:]
            tb = len(ks)
            n, m = tb - tb % self.R, max(tb - self.R, 0)
            row.kq = self._quant_keys(ks[:n]) if n else []
            row.kr = ks[n:]
            row.vq = [self._quant_value(x) for x in vs[:m]]
            row.vr = vs[m:]
            row.length = length

    def append(self, k, v):
        for b in range(len(self.rows)):
            self.append_row(b, k[b, :, 0], v[b, :, 0])

    def extend(self, k, v, lengths):  # that many appends a row
        for b, n in enumerate(lengths):
            for j in range(n):
                self.append_row(b, k[b, :, j], v[b, :, j])

    def contents(self, b):
        """(K_hat, k_tol, k_tie, V_hat, v_tol, v_tie) [H, L, D] of row b in the stored basis and
        the numbers of quantized keys and values (sinks counted)."""
        row = self.rows[b]
        ks = [k for k, _ in row.sink] + row.kq + row.kr
        vs = [v for _, v in row.sink] + row.vq + row.vr
        out = []
        for toks in (ks, vs):
            for i in range(3):
                out.append(np.stack([t[i] for t in toks], axis=1) if toks else np.zeros((HKV, 0, self.d)))
        ns = len(row.sink)
        return out, (ns + len(row.kq), ns + len(row.vq))

    def attend(self, q, lib_k, lib_v, windows):
        """softmax(q K^T / sqrt(d)) V per row over the last W tokens for each W of ``windows``
        (None: all), in float64, on the model's K_hat, V_hat (the library's own number where it is
        within the model's tolerance), rotated back to the input basis. q [B, Hq, 1, D]; lib_k,
        lib_v: the library's stored-basis materialization [B, H, >= L, D]. -> [B, Hq, 1, D] each."""
        outs = [np.zeros(q.shape) for _ in windows]
        rep = q.shape[1] // HKV
        for b, row in enumerate(self.rows):
            L = row.length
            if L == 0:
                continue  # nothing to attend: 0
            (kh, kt, _, vh, vt, _), _ = self.contents(b)
            # the library's number where it is within the model's tolerance (a near-tie's other
            # code, the dtype's rounding); anywhere else the model's, so that a wrong one shows
            kh = np.where(np.abs(lib_k[b, :, :L] - kh) <= kt, lib_k[b, :, :L], kh)
            vh = np.where(np.abs(lib_v[b, :, :L] - vh) <= vt, lib_v[b, :, :L], vh)
            if self.rot_k:
                kh = unrotate(kh, self.H)
            if self.rot_v:
                vh = unrotate(vh, self.H)
            kh, vh = np.repeat(kh, rep, axis=0), np.repeat(vh, rep, axis=0)  # query head j: KV head j // rep
            s = np.einsum("hld,hd->hl", kh, q[b, :, 0].astype(np.float64)) / math.sqrt(self.d)
            for out, w in zip(outs, windows):
                lo = 0 if w is None else max(L - w, 0)
                p = np.exp(s[:, lo:] - s[:, lo:].max(-1, keepdims=True))
                out[b, :, 0] = np.einsum("hl,hld->hd", p / p.sum(-1, keepdims=True), vh[:, lo:])
        return outs


def check(cache, model):
    """The cache's lengths, overflow flags, quantized counts and stored-basis materialization
    equal the model's; returns the library's materialization (float64) for ``attend``."""
    kh, vh, nk, nv, lengths, overflow = jax.device_get(_read(cache))
    kh, vh = kh.astype(np.float64), vh.astype(np.float64)
    np.testing.assert_array_equal(lengths, [r.length for r in model.rows])
    np.testing.assert_array_equal(overflow, model.overflow)
    for b in range(len(model.rows)):
        (mk, kt, _, mv, vt, _), counts = model.contents(b)
        L = model.rows[b].length
        assert (int(nk[b]), int(nv[b])) == counts, f"row {b}: quantized counts"
        for name, got, want, tol in (("K", kh[b, :, :L], mk, kt), ("V", vh[b, :, :L], mv, vt)):
            # (unrotated full-precision tokens, tol 0: the inputs bit for bit)
            bad = np.abs(got - want) > tol
            assert not bad.any(), (f"row {b} {name}: {bad.sum()} elements off, first at "
                                   f"{np.argwhere(bad)[0]}: {got[bad][0]} vs {want[bad][0]}")
    return kh, vh


@jax.jit
def _read(c):
    """The stored-basis K_hat, V_hat (as float32), quantized counts, lengths and overflow flags."""
    k, v = c.materialize(rotated=True)
    return (k.astype(jnp.float32), v.astype(jnp.float32), c.num_quantized_keys, c.num_quantized_values,
            c.lengths, c.overflow)


_mat = jax.jit(lambda c: [x.astype(jnp.float32) for x in c.materialize()])  # the original basis
_extend = jax.jit(lambda c, k, v, n: c.extend(k, v, n))


@functools.partial(jax.jit, static_argnums=range(6))
def _start(cls, cfg, b, d, max_length, dtype, k, v, lengths):
    """A new cache (cls.init) with the prompt k, v [B, H, T, D] prefilled, row b its lengths[b] tokens."""
    cache = cls.init(cfg, batch=b, num_kv_heads=HKV, head_dim=d, max_length=max_length, dtype=dtype)
    return cache.prefill(k, v, lengths)


WINDOWS = (None, 7, 40)


@jax.jit
def _step(cache, k, v, q):
    """append, then reference attention with each of WINDOWS; and the new cache's stored-basis K_hat, V_hat."""
    cache = cache.append(k, v)
    outs = [decode_attention(q, cache, impl="reference", window=w) for w in WINDOWS]
    return cache, outs, _read(cache)[:2]


def _inputs(rng, b, t, d):
    """Keys with an offset per channel and one outlier channel (what rotation is for); values N(0, 1)."""
    scale = np.ones(d)
    scale[3] = 12.0
    k = rng.standard_normal((b, HKV, t, d)) * scale + rng.normal(0, 1.5, d)
    v = rng.standard_normal((b, HKV, t, d))
    return k.astype(np.float32), v.astype(np.float32)


# Each case: (cache class, config, dtype, head_dim, max_length, prompt lengths, extend lengths). Prompt
# lengths put rows at 0, inside the sinks, at S, at S + R (a flush at prefill) and past it; the
# extend carries rows across S, S + R and further flushes and spills.
CASES = {
    # sinks + rotation of both + 4-bit values + key groups longer than value groups + R = 64
    "tokens-s5-kv-k2v4-kg32": (KIVICache, KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=64,
                                                     key_group_size=32, sink_tokens=5, rotate="kv"),
                               jnp.float32, 32, 5 + 64 * 2 + 9, [0, 3, 5, 69, 77], [70, 66, 64, 21, 55]),
    # sinks + rotated keys + 4-bit keys + key groups of 16 under value groups of 32, bf16
    "tokens-s3-k-k4v2-kg16-bf16": (KIVICache, KIVIConfig(k_bits=4, v_bits=2, group_size=32, residual_length=32,
                                                         key_group_size=16, sink_tokens=3, rotate="k"),
                                   jnp.bfloat16, 64, 3 + 32 * 3 + 5, [0, 2, 3, 35, 50], [34, 40, 33, 33, 45]),
    # 2 unrotated sinks (keys and values exact forever), rotated values, R = 48 (not a power of two), G = 16
    "tokens-s2-r48-v": (KIVICache, KIVIConfig(group_size=16, residual_length=48, rotate="v", sink_tokens=2),
                        jnp.float32, 32, 2 + 48 * 3 + 2, [0, 1, 2, 50, 60], [49, 96, 60, 50, 76]),
    # the Mosaic layout (KIVI-2, G = 32, D = 128) with sinks, rotation of both and R = 32
    "mosaic-s5-kv-r32": (MosaicKIVICache, KIVIConfig(sink_tokens=5, rotate="kv", residual_length=32, layout="mosaic"),
                         jnp.float32, 128, 5 + 32 * 3 + 4, [0, 3, 5, 37, 45], [33, 40, 40, 20, 50]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_caches_follow_algorithm_1(name):
    """prefill (ragged) -> appends -> extend (ragged) -> appends into max_length (the full row
    refused and flagged) -> an extend one row takes in part (flagged): after each phase the
    stored-basis K_hat, V_hat, the quantized counts, lengths and flags equal the model's (the
    original basis: the stored one rotated back); every step's reference attention (no window,
    windows of 7 and 40 tokens) equals the model's float64 attention over the last W tokens."""
    cls, cfg, dtype, d, max_length, lens, ext = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    b = len(lens)
    model = Algo1(cfg, b, d, max_length, dtype)
    t = max(lens)
    k, v = _inputs(rng, b, t, d)
    pad = np.arange(t)[None, None, :, None] >= np.asarray(lens)[:, None, None, None]
    k, v = np.where(pad, 3e4, k), np.where(pad, -3e4, v)  # padding never enters a group, sink or ring
    cache = _start(cls, cfg, b, d, max_length, dtype, k, v, np.asarray(lens, np.int32))
    model.prefill(k, v, lens)
    check(cache, model)

    def steps(cache, n):
        for _ in range(n):
            kt, vt = _inputs(rng, b, 1, d)
            q = rng.standard_normal((b, HQ, 1, d)).astype(np.float32)
            cache, outs, lib = _step(cache, kt, vt, q)
            model.append(kt, vt)
            lk, lv = (np.asarray(x, np.float64) for x in jax.device_get(lib))
            for w, out, want in zip(WINDOWS, outs, model.attend(q, lk, lv, WINDOWS)):
                np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-5, atol=2e-5,
                                           err_msg=f"window={w}, lengths {[r.length for r in model.rows]}")
        return cache

    def extend(cache, lengths):  # (one input width for both extends: one compile)
        k, v = _inputs(rng, b, te, d)
        cache = _extend(cache, k, v, np.asarray(lengths, np.int32))
        model.extend(k, v, lengths)
        return cache

    cache = steps(cache, 2)
    check(cache, model)
    te = max(ext)
    cache = extend(cache, ext)
    check(cache, model)
    # into max_length: the longest row fills up and is refused (flagged), the others go on
    cache = steps(cache, max_length - max(r.length for r in model.rows) + 2)
    check(cache, model)
    assert model.overflow.sum() == 1
    # an extend that the next longest row takes only in part (flagged)
    part = max_length - sorted(r.length for r in model.rows)[-2] + 3
    assert part <= te
    cache = extend(cache, [part, 0, part, part, part])
    lk, lv = check(cache, model)
    assert model.overflow.sum() == 2
    # every row crossed a key flush; the run crossed S, S + R, several flushes and spills
    assert min(len(r.kq) for r in model.rows) >= cfg.residual_length
    # the original basis: the stored one rotated back
    ko, vo = (np.asarray(x, np.float64) for x in _mat(cache))
    hm = sylvester(d)
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for got, stored, rot in ((ko, lk, cfg.rotate in ("k", "kv")), (vo, lv, cfg.rotate in ("v", "kv"))):
        want = unrotate(stored, hm) if rot else stored
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_pallas_window_starting_inside_the_sinks():
    """The Triton kernel (interpreted) with S = 8 sinks (not a whole 16-slot sink step), rotation,
    4-bit values and key groups of 16, a window of 85 tokens: a row of 91 tokens attends sinks
    6 and 7 but not 0-5, one of 122 no sink, shorter rows everything -- the model's numbers."""
    cfg = KIVIConfig(v_bits=4, group_size=16, residual_length=32, key_group_size=16, sink_tokens=8, rotate="kv")
    d, lens, max_length = 32, [3, 20, 90, 121], 8 + 32 * 4
    b = len(lens)
    rng = np.random.default_rng(11)
    model = Algo1(cfg, b, d, max_length, jnp.float32)
    k, v = _inputs(rng, b, max(lens), d)
    cache = _start(KIVICache, cfg, b, d, max_length, jnp.float32, k, v, np.asarray(lens, np.int32))
    model.prefill(k, v, lens)
    k, v = _inputs(rng, b, 1, d)
    q = rng.standard_normal((b, HQ, 1, d)).astype(np.float32)
    cache, (_, _, out40), _ = _step(cache, k, v, q)  # (the ring wrapped: one spill a row past R + S)
    model.append(k, v)
    lk, lv = check(cache, model)
    got = np.asarray(jax.jit(lambda q, c: decode_attention(q, c, impl="pallas", window=85))(q, cache))
    want, want40 = model.attend(q, lk, lv, [85, 40])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out40), want40, rtol=2e-5, atol=2e-5)  # the reference's window
    # (the window matters here: without it the row of 91 tokens attends other numbers)
    assert np.abs(want[2] - model.attend(q, lk, lv, [None])[0][2]).max() > 1e-2


def test_rotation_changes_nothing_before_quantization():
    """While every token is in full precision (L < S + R), rotate="kv" gives the unrotated
    attention, (q·H)(K·H)^T = q K^T and (p V H) H^T = p V, to float32 rounding, with and without a
    window; the stored keys do hold K·H."""
    cfg = KIVIConfig(group_size=16, residual_length=32, sink_tokens=3)
    rng = np.random.default_rng(5)
    d, lens = 32, [1, 3, 20, 34]  # 34 = S + R - 1: nothing quantized yet (at S + R the keys flush)
    b = len(lens)
    k, v = _inputs(rng, b, max(lens), d)
    q = rng.standard_normal((b, HQ, 1, d)).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def run(c, k, v, q):
        cache = KIVICache.init(c, batch=b, num_kv_heads=HKV, head_dim=d, max_length=64, dtype=jnp.float32)
        cache = cache.prefill(k, v, jnp.asarray(lens, jnp.int32))
        return ([decode_attention(q, cache, impl="reference", window=w) for w in (None, 4)],
                cache.materialize(rotated=True)[0], cache.num_quantized_keys, cache.num_quantized_values)

    plain, k_plain, nk, nv = run(cfg, k, v, q)
    rotated, k_rot, nk_rot, nv_rot = run(dataclasses.replace(cfg, rotate="kv"), k, v, q)
    for n in (nk, nv, nk_rot, nv_rot):
        np.testing.assert_array_equal(n, [1, 3, 3, 3])  # the sinks only
    np.testing.assert_array_equal(np.asarray(k_plain)[3, :, :34], k[3])
    np.testing.assert_allclose(np.asarray(k_rot)[3, :, :34], unrotate(k[3].astype(np.float64), sylvester(d)),
                               rtol=1e-5, atol=1e-4)
    for got, want in zip(rotated, plain):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    # a power of two that does not divide R
    (lambda: KIVIConfig(residual_length=96, key_group_size=64),
     r"key_group_size=64 must be a power of two >= 16 dividing residual_length=96"),
    (lambda: MosaicKIVICache.init(KIVIConfig(sink_tokens=300, layout="mosaic"), batch=1, num_kv_heads=1,
                                  head_dim=128, max_length=300), r"sink_tokens=300 must be < max_length=300"),
    (lambda: KIVICache.init(KIVIConfig(rotate="v", group_size=16), batch=1, num_kv_heads=1, head_dim=96,
                            max_length=64), r"rotate='v' needs head_dim a power of two .*got head_dim=96"),
    (lambda: MosaicKIVICache.init(KIVIConfig(rotate="k"), batch=1, num_kv_heads=1, head_dim=64, max_length=64),
     r"MosaicKIVICache takes head_dim=128; got head_dim=64"),
    # a config's capacity for a max_length its sinks fill has no body: the same error as init's
    # (it returned a whole block of 256 tokens)
    (lambda: KIVIConfig(sink_tokens=5).capacity(5), r"sink_tokens=5 must be < max_length=5"),
    (lambda: KIVIConfig(sink_tokens=5).capacity(3), r"sink_tokens=5 must be < max_length=3"),
    (lambda: KIVIConfig(key_group_size=16, layout="mosaic"), r"key_group_size=16 \(allowed: 32\)"),
])
def test_bad_extension_settings_name_the_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_capacity_counts_the_body_after_the_sinks():
    """capacity(max_length): the max_length - S body tokens rounded up to whole blocks (256 for
    KIVI-2) -- one body token is one block, 257 two; a KIVICache's prefix unit is that block."""
    cfg = KIVIConfig(sink_tokens=5)
    assert (cfg.capacity(6), cfg.capacity(5 + 256), cfg.capacity(5 + 257)) == (256, 256, 512)
    cache = jax.eval_shape(lambda: KIVICache.init(cfg, batch=1, num_kv_heads=1, head_dim=32, max_length=6))
    assert cache.prefix_unit == 256 and cache.capacity == 256


@pytest.mark.parametrize("window", [0, -2, True, 3.0])
def test_bad_window_is_named(window):
    cache = KIVICache.init(KIVIConfig(group_size=16, residual_length=16, sink_tokens=2), batch=1, num_kv_heads=HKV,
                           head_dim=16, max_length=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match=rf"window={window!r} must be None or an integer >= 1"):
        decode_attention(jnp.zeros((1, HQ, 1, 16)), cache, impl="reference", window=window)
