"""An independent float64 NumPy model of KIVI (DESIGN.md §1, Algorithm 1 of the paper).

Written from the algorithm, not from kivi_jax: per row, Python lists of quantized key
tokens / value tokens and of full-precision residual tokens, quantized group by group in
float64. The one implementation choice it shares with the library is the *storage* rule
that the issue fixes: scale and min are stored in the cache dtype, rounded outward (min
down, scale up), and codes are computed from the stored values. The directed rounding is
done here by stepping the bit pattern of the nearest cast (no jax involved).

Conventions: arrays are [B, H, T, D]; keys are quantized per channel over groups of G
consecutive tokens, values per token over groups of G consecutive channels.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def np_dtype(dtype) -> np.dtype:
    """NumPy dtype for float32 / float16 / bfloat16 given by name, numpy or jax dtype."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name])


def finfo(dtype):
    dt = np_dtype(dtype)
    return ml_dtypes.finfo(dt) if dt == np.dtype(ml_dtypes.bfloat16) else np.finfo(dt)


def to_dtype(x, dtype) -> np.ndarray:
    """Nearest cast of float64 ``x`` into ``dtype`` (values, not bits)."""
    return np.asarray(x, np.float64).astype(np_dtype(dtype))


def step(c: np.ndarray, up: bool) -> np.ndarray:
    """The neighbour of each (finite) value of ``c`` in its own dtype, up or down.

    Maps the sign-magnitude bit pattern onto an ordered integer line, steps by one, maps back.
    """
    c = np.asarray(c)
    ut = _UINT[c.dtype.itemsize]
    nbits = 8 * c.dtype.itemsize
    sign = np.int64(1) << (nbits - 1)
    raw = c.view(ut).astype(np.int64)
    ordered = np.where(raw & sign, -(raw & (sign - 1)), raw)
    ordered = ordered + (1 if up else -1)
    back = np.where(ordered < 0, (-ordered) | sign, ordered)
    return back.astype(ut).view(c.dtype)


def round_directed(x, dtype, up: bool) -> np.ndarray:
    """Float64 ``x`` rounded into ``dtype`` toward +inf (up) or -inf (down); returned as float64."""
    x = np.asarray(x, np.float64)
    c = to_dtype(x, dtype)
    wrong = (c.astype(np.float64) < x) if up else (c.astype(np.float64) > x)
    c = np.where(wrong, step(c, up), c)
    return c.astype(np.float64)


def quant_groups(x, bits: int, dtype):
    """KIVI asymmetric min/max quantization of groups along the *last* axis of float64 ``x``.

    Returns (codes int64 like x, scale [..., 1], min [..., 1], x_hat like x): scale and min
    are the stored values (``dtype``, outward rounding) as float64; x_hat = code * scale + min
    in float64 (no cast). Constant groups get scale 0, code 0, x_hat = min = their value.
    """
    x = np.asarray(x, np.float64)
    levels = 2**bits - 1
    fmax = float(finfo(dtype).max)
    mn = x.min(axis=-1, keepdims=True)
    mx = x.max(axis=-1, keepdims=True)
    mn_s = round_directed(np.maximum(mn, -fmax), dtype, up=False)
    scale = np.minimum((mx - mn_s) / levels, fmax)
    scale_s = np.minimum(round_directed(scale, dtype, up=True), fmax)
    safe = np.where(scale_s > 0, scale_s, 1.0)
    codes = np.where(scale_s > 0, np.clip(np.round((x - mn_s) / safe), 0, levels), 0).astype(np.int64)
    return codes, scale_s, mn_s, codes * scale_s + mn_s


def quantize_reference(x, *, bits: int, group_size: int, axis: int, dtype):
    """quant_groups over groups of ``group_size`` consecutive elements along ``axis`` of x.

    Returns (codes, scale, min, x_hat): codes and x_hat shaped like x; scale/min shaped like
    x with ``axis`` divided by group_size. All float64 / int64.
    """
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    g = x.reshape(*x.shape[:-1], n // group_size, group_size)
    codes, scale, mn, xhat = quant_groups(g, bits, dtype)
    back = lambda a: np.moveaxis(a.reshape(*x.shape[:-1], -1), -1, axis)
    return back(codes), back(scale[..., 0]), back(mn[..., 0]), back(xhat)


def attend(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64 for one row. q [Hq, D], k, v [Hkv, L, D] -> [Hq, D]."""
    hq, d = q.shape
    hkv, length = k.shape[0], k.shape[1]
    out = np.zeros((hq, d))
    if length == 0:
        return out  # nothing to attend to: zero output (the library's convention)
    rep = hq // hkv
    for j in range(hq):
        h = j // rep  # query head j uses KV head j // (Hq / Hkv), as Llama's repeat_kv
        s = k[h] @ q[j] / math.sqrt(d)
        p = np.exp(s - s.max())
        out[j] = (p / p.sum()) @ v[h]
    return out


def causal_attention(q, k, v, lengths=None):
    """Causal prompt attention in float64: q [B, Hq, T, D], k, v [B, Hkv, T, D] -> [B, Hq, T, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, t, d = q.shape
    out = np.zeros_like(q)
    for r in range(b):
        length = t if lengths is None else int(lengths[r])
        for i in range(t):
            seen = min(i + 1, length)
            out[r, :, i] = attend(q[r, :, i], k[r, :, :seen], v[r, :, :seen])
    return out


def keys_values(rng, *shape):
    """Keys like a real LLM's: per-channel offsets and a few large-magnitude outlier channels."""
    d = shape[-1]
    chan = np.where(rng.random(d) < 0.15, 8.0, 1.0)
    k = rng.standard_normal(shape) * chan + rng.normal(0, 2, d)
    v = rng.standard_normal(shape)
    return k.astype(np.float32), v.astype(np.float32)


class _Row:
    def __init__(self):
        self.kq = []  # quantized keys, one [H, D] per token: (codes, x_hat)
        self.kq_params = []  # per flushed block of G tokens: (scale [H, D], min [H, D])
        self.kr = []  # key residual, full precision [H, D] per token
        self.vq = []  # quantized values per token: (codes [H, D], x_hat [H, D], scale, min)
        self.vr = []  # value window, full precision [H, D] per token


class ReferenceKIVICache:
    """Algorithm 1, row by row, in float64 (the cache dtype applied to what is stored)."""

    def __init__(self, *, k_bits: int, v_bits: int, group_size: int, residual_length: int,
                 batch: int, num_kv_heads: int, head_dim: int, dtype):
        assert residual_length % group_size == 0 and head_dim % group_size == 0
        self.k_bits, self.v_bits = k_bits, v_bits
        self.G, self.R = group_size, residual_length
        self.KG = group_size  # key tokens per quantization group (the Ext cache may change it)
        self.H, self.D = num_kv_heads, head_dim
        self.dtype = np_dtype(dtype)
        self.rows = [_Row() for _ in range(batch)]

    # what the cache holds: inputs stored in the cache dtype
    def _stored(self, x):
        return to_dtype(x, self.dtype).astype(np.float64)

    def _deq(self, xhat):
        """Dequantized numbers as the cache materializes them (cast into the cache dtype)."""
        fmax = float(finfo(self.dtype).max)
        return self._stored(np.clip(xhat, -fmax, fmax))

    def _quant_keys(self, row: _Row, keys):
        """Per-channel quantization of keys [H, n, D] (n a multiple of KG), appended to row."""
        h, n, d = keys.shape
        g = keys.reshape(h, n // self.KG, self.KG, d).transpose(0, 1, 3, 2)  # [H, n/KG, D, KG]
        codes, scale, mn, xhat = quant_groups(g, self.k_bits, self.dtype)
        codes = codes.transpose(0, 1, 3, 2).reshape(h, n, d)
        xhat = self._deq(xhat.transpose(0, 1, 3, 2).reshape(h, n, d))
        for i in range(n):
            row.kq.append((codes[:, i], xhat[:, i]))
        for j in range(n // self.KG):
            row.kq_params.append((scale[:, j, :, 0], mn[:, j, :, 0]))

    def _quant_value(self, row: _Row, value):
        """Per-token quantization of one value token [H, D], appended to row."""
        g = value.reshape(self.H, self.D // self.G, self.G)
        codes, scale, mn, xhat = quant_groups(g, self.v_bits, self.dtype)
        row.vq.append((codes.reshape(self.H, self.D), self._deq(xhat.reshape(self.H, self.D)),
                       scale[..., 0], mn[..., 0]))

    def prefill(self, k, v, lengths=None):
        """k, v [B, H, T, D]; row b keeps its first lengths[b] tokens. Replaces all content."""
        k, v = self._stored(k), self._stored(v)
        b, _, t, _ = k.shape
        lengths = [t] * b if lengths is None else [int(x) for x in lengths]
        self.rows = [_Row() for _ in range(b)]
        for r, row in enumerate(self.rows):
            length = lengths[r]
            n = length - length % self.R
            self._quant_keys(row, k[r, :, :n])
            row.kr = [k[r, :, i] for i in range(n, length)]
            m = max(length - self.R, 0)
            for i in range(m):
                self._quant_value(row, v[r, :, i])
            row.vr = [v[r, :, i] for i in range(m, length)]
        return self

    def append(self, k, v):
        """k, v [B, H, 1, D]: Kr += k (flush when R); Vr += v (quantize the oldest when > R)."""
        k, v = self._stored(k), self._stored(v)
        for r, row in enumerate(self.rows):
            self._append_row(row, k[r, :, 0], v[r, :, 0])
        return self

    def _append_row(self, row, k, v):
        """One token of one row, Algorithm 1: k, v [H, D]."""
        row.kr.append(k)
        if len(row.kr) == self.R:
            self._quant_keys(row, np.stack(row.kr, axis=1))
            row.kr = []
        row.vr.append(v)
        if len(row.vr) > self.R:
            self._quant_value(row, row.vr.pop(0))

    # ---- reading ----------------------------------------------------------------------
    def length(self, r: int) -> int:
        row = self.rows[r]
        return len(row.kq) + len(row.kr)

    def keys(self, r: int) -> np.ndarray:
        """[H, L, D]: dequantized keys, then the residual."""
        row = self.rows[r]
        toks = [xh for _, xh in row.kq] + row.kr
        return np.stack(toks, axis=1) if toks else np.zeros((self.H, 0, self.D))

    def values(self, r: int) -> np.ndarray:
        row = self.rows[r]
        toks = [x[1] for x in row.vq] + row.vr
        return np.stack(toks, axis=1) if toks else np.zeros((self.H, 0, self.D))

    def key_codes(self, r: int) -> np.ndarray:
        """[H, n, D] codes of the quantized keys of row r."""
        row = self.rows[r]
        return np.stack([c for c, _ in row.kq], axis=1) if row.kq else np.zeros((self.H, 0, self.D), np.int64)

    def key_params(self, r: int):
        """(scale, min) [H, n/G, D] of the quantized keys of row r."""
        row = self.rows[r]
        if not row.kq_params:
            z = np.zeros((self.H, 0, self.D))
            return z, z
        return tuple(np.stack([p[i] for p in row.kq_params], axis=1) for i in (0, 1))

    def value_codes(self, r: int) -> np.ndarray:
        row = self.rows[r]
        return np.stack([x[0] for x in row.vq], axis=1) if row.vq else np.zeros((self.H, 0, self.D), np.int64)

    def value_params(self, r: int):
        """(scale, min) [H, m, D/G] of the quantized values of row r."""
        row = self.rows[r]
        if not row.vq:
            z = np.zeros((self.H, 0, self.D // self.G))
            return z, z
        return tuple(np.stack([x[i] for x in row.vq], axis=1) for i in (2, 3))

    def attend(self, q) -> np.ndarray:
        """q [B, Hq, 1, D] -> [B, Hq, 1, D] float64: softmax(q K_hat^T / sqrt(d)) V_hat per row."""
        q = np.asarray(q, np.float64)
        out = np.zeros(q.shape)
        for r in range(len(self.rows)):
            out[r, :, 0] = attend(q[r, :, 0], self.keys(r), self.values(r))
        return out


class ReferenceDenseCache:
    """Full-precision K/V per row (in the cache dtype), float64 attention."""

    def __init__(self, *, batch: int, num_kv_heads: int, head_dim: int, dtype):
        self.dtype = np_dtype(dtype)
        self.H, self.D = num_kv_heads, head_dim
        self.k = [[] for _ in range(batch)]
        self.v = [[] for _ in range(batch)]

    def _stored(self, x):
        return to_dtype(x, self.dtype).astype(np.float64)

    def prefill(self, k, v, lengths=None):
        k, v = self._stored(k), self._stored(v)
        t = k.shape[2]
        lengths = [t] * k.shape[0] if lengths is None else [int(x) for x in lengths]
        self.k = [[k[r, :, i] for i in range(lengths[r])] for r in range(k.shape[0])]
        self.v = [[v[r, :, i] for i in range(lengths[r])] for r in range(k.shape[0])]
        return self

    def append(self, k, v):
        k, v = self._stored(k), self._stored(v)
        for r in range(len(self.k)):
            self.k[r].append(k[r, :, 0])
            self.v[r].append(v[r, :, 0])
        return self

    def attend(self, q):
        q = np.asarray(q, np.float64)
        out = np.zeros(q.shape)
        for r in range(len(self.k)):
            kk = np.stack(self.k[r], 1) if self.k[r] else np.zeros((self.H, 0, self.D))
            vv = np.stack(self.v[r], 1) if self.v[r] else np.zeros((self.H, 0, self.D))
            out[r, :, 0] = attend(q[r, :, 0], kk, vv)
        return out


# ---- extensions (issue 8): attention sinks, Hadamard rotation, a separate key group size ----------


def hadamard_reference(d: int) -> np.ndarray:
    """Orthonormal Hadamard matrix from its closed form H[i, j] = (-1)^popcount(i & j) / sqrt(d)
    (the Sylvester matrix, written independently of kivi_jax.rotation)."""
    i = np.arange(d)
    bits = np.vectorize(lambda x: bin(int(x)).count("1"))(i[:, None] & i[None, :])
    return np.where(bits % 2, -1.0, 1.0) / math.sqrt(d)


class ReferenceKIVICacheExt(ReferenceKIVICache):
    """Algorithm 1 with the opt-in extensions, row by row in float64:

    * sink_tokens S: the first S tokens of a row go to a full-precision sink list forever; all
      of Algorithm 1 (key flushes every R tokens, the R-token value window) then runs on the
      tokens after them, as if the sequence started at token S.
    * rotate: keys / values are stored as x·H (H orthonormal Hadamard), rounded into the cache
      dtype; reads rotate back with H^T in float64 (``keys``/``values`` are in the original basis,
      ``keys_stored``/``values_stored`` in the stored one).
    * key_group_size: keys quantized per channel over groups of that many tokens.
    """

    def __init__(self, *, sink_tokens: int = 0, rotate: str = "none", key_group_size=None, **kw):
        super().__init__(**kw)
        self.S = sink_tokens
        self.KG = key_group_size or self.G
        assert self.R % self.KG == 0
        self.rot_k, self.rot_v = rotate in ("k", "kv"), rotate in ("v", "kv")
        self.Hm = hadamard_reference(self.D)
        self.sinks = [([], []) for _ in self.rows]

    def _store(self, x, rot: bool):
        x = self._stored(x)
        return self._stored(np.einsum("...d,de->...e", x, self.Hm)) if rot else x

    def prefill(self, k, v, lengths=None):
        k, v = self._store(k, self.rot_k), self._store(v, self.rot_v)
        b, _, t, _ = k.shape
        lengths = [t] * b if lengths is None else [int(x) for x in lengths]
        self.rows = [_Row() for _ in range(b)]
        self.sinks = [([], []) for _ in range(b)]
        for r in range(b):
            ns = min(lengths[r], self.S)
            self.sinks[r] = ([k[r, :, i] for i in range(ns)], [v[r, :, i] for i in range(ns)])
        body_k, body_v = k[:, :, self.S:], v[:, :, self.S:]  # the base prefill stores them as given
        if body_k.shape[2]:
            ReferenceKIVICache.prefill(self, body_k, body_v, [max(x - self.S, 0) for x in lengths])
        return self

    def append(self, k, v):
        k, v = self._store(k, self.rot_k), self._store(v, self.rot_v)
        for r, row in enumerate(self.rows):
            sk, sv = self.sinks[r]
            if len(sk) < self.S:
                sk.append(k[r, :, 0])
                sv.append(v[r, :, 0])
                continue
            self._append_row(row, k[r, :, 0], v[r, :, 0])
        return self

    def length(self, r: int) -> int:
        return len(self.sinks[r][0]) + super().length(r)

    def num_quantized(self, r: int):
        """(n, m): keys [0, n) / values [0, m) are sinks or quantized (absolute positions)."""
        ns = len(self.sinks[r][0])
        return ns + len(self.rows[r].kq), ns + len(self.rows[r].vq)

    def keys_stored(self, r: int) -> np.ndarray:
        sk = self.sinks[r][0]
        body = ReferenceKIVICache.keys(self, r)
        return np.concatenate([np.stack(sk, 1), body], axis=1) if sk else body

    def values_stored(self, r: int) -> np.ndarray:
        sv = self.sinks[r][1]
        body = ReferenceKIVICache.values(self, r)
        return np.concatenate([np.stack(sv, 1), body], axis=1) if sv else body

    def keys(self, r: int) -> np.ndarray:
        k = self.keys_stored(r)
        return k @ self.Hm.T if self.rot_k else k

    def values(self, r: int) -> np.ndarray:
        v = self.values_stored(r)
        return v @ self.Hm.T if self.rot_v else v
