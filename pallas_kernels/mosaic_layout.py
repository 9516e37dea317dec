"""The Mosaic GPU kernel's cache layout (pallas_kernels.kivi_mosaic), both ways, and its float64 reference.

Keys: the codes of a token packed 16 to a 32-bit word in the order each thread's wgmma A
fragments want them (:func:`key_words`), the rows swizzled as the kernel's shared memory reads
them; per 256-token block a tile [128 channels, 16] of the 8 key groups' scales | mins
(:func:`key_tiles`). Values: a 64-token chunk's codes packed over its tokens per channel
(:func:`value_words`); per 128 tokens a tile [64, 16] of the two chunks' scales | mins
(:func:`value_tiles`). :func:`repack` takes plain codes and scales there; a MosaicKIVICache
(kivi_jax.cache_mosaic) stores the same words and tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

D = 128
CHUNK = 64  # tokens a pipeline step (keys: wgmma M)
GROUP = 32  # key tokens / value channels per scale and min
KEY_BLOCK = 256  # tokens a key scale/min tile covers (8 key groups; its 16 columns: 8 s, 8 m)
VALUE_BLOCK = 128  # tokens a value scale/min tile covers ([64, 16]: two chunks' 8 numbers a token)
N = 16  # wgmma N of both small operands
WIDE = 256  # nibbles a row of the codes' copies (128 bytes)
WIDE_ROWS = KEY_BLOCK * D // 2 // WIDE  # such rows a step, keys and values alike (64)


# ---- the layout, both ways (the cache, kivi_jax.cache_mosaic, stores the words and tiles) --------
MAGIC = 0x43004300  # a bf16 pair (128, 128): its mantissa bits 0-1, 2-3, 4-5 then count 1, 4, 16


def code_bit(o, k, e):
    """The bit of a word where the code of (operand o, 8-column tile k, element e) starts."""
    return 16 * e + 8 * o + 2 * k


def _field_offset(o, k):
    """f: where field (o, k)'s pair lies within its 6 bits once the word is shifted by 6 (bit // 6)."""
    return code_bit(o, k, 0) % 6 // 2


# every field's bit, broadcast over a packed row's axes (o, s, k, j, e)
_SHIFTS = code_bit(*np.ix_(range(2), range(4), range(2))).astype(np.uint32)[:, None, :, None, :]


def _pack(codes):
    """codes [..., K] (0..3, K = 64 S) -> [..., 4 S] uint32: code K' = K/2 o + 32 s + 8 k + 2 j + e
    at bits :func:`code_bit` (o, k, e) of word 4 s + j. Thread j of a row's four loads word 4 s + j
    of each 32-nibble span s (Mosaic's WGMMA_UPCAST_4X) and needs exactly those codes: the A
    operands' K columns 8 (4 s + k) + 2 j + e of the low (o = 0) and high (o = 1) K halves."""
    k_all = codes.shape[-1]
    s = k_all // 64
    c = codes.astype(jnp.uint32).reshape(codes.shape[:-1] + (2, s, 4, 4, 2))  # o, s, k, j, e
    words = jnp.sum(c << _SHIFTS, axis=(-5, -3, -1), dtype=jnp.uint32)  # disjoint bit fields: the sum is an OR
    return words.reshape(codes.shape[:-1] + (4 * s,))


def _unpack(words):
    """Inverse of :func:`_pack`: [..., 4 S] uint32 -> codes [..., 64 S] int32."""
    s = words.shape[-1] // 4
    w = words.astype(jnp.uint32).reshape(words.shape[:-1] + (1, s, 1, 4, 1))
    return ((w >> _SHIFTS) & 3).astype(jnp.int32).reshape(words.shape[:-1] + (64 * s,))


def key_words(codes):
    """codes [..., T, D] (0..3; T rows from a multiple of 8) -> [..., T, 8] uint32 (:func:`_pack`
    over the channels: channel 64 o + 32 s + 8 k + 2 j + e in word 4 s + j), each row as a
    32-byte swizzle lays it out in shared memory (:func:`swizzle_key_rows`): the kernel copies a
    step's rows as they are."""
    return swizzle_key_rows(_pack(codes))


def swizzle_key_rows(kn):
    """Key words or nibbles [..., T, 8 | 64] (T rows from a multiple of 8) <-> the image a 32-byte
    swizzle (Mosaic's, on the kernel's [256, 64] int4 key tiles) makes of them: rows t with
    t & 4 have their two 16-byte halves swapped (an involution)."""
    t, w = kn.shape[-2:]
    flip = (jnp.arange(t) & 4) > 0
    halves = kn.reshape(kn.shape[:-1] + (2, w // 2))
    return jnp.where(flip[:, None, None], halves[..., ::-1, :], halves).reshape(kn.shape)


def key_codes(words):
    """[..., T, 8] uint32 (T rows from a multiple of 8) -> codes [..., T, D] int32 (inverse of
    :func:`key_words`)."""
    return _unpack(swizzle_key_rows(words))


def value_words(codes):
    """codes [..., T, D] (T a multiple of 64) -> [..., T/64, D * 4] uint32: chunk i, channel c's
    words 4c..4c+3, :func:`_pack` over its 64 tokens (token 64 i + 32 o + 8 k + 2 j + e in word j)."""
    c = codes.astype(jnp.uint32)
    lead, t = c.shape[:-2], c.shape[-2]
    c = jnp.swapaxes(c.reshape(lead + (t // CHUNK, CHUNK, D)), -1, -2)  # [..., chunks, D, 64]
    return _pack(c).reshape(lead + (t // CHUNK, D * 4))


def value_codes(words):
    """[..., T/64, D * 4] uint32 -> codes [..., T, D] int32 (inverse of :func:`value_words`)."""
    lead, chunks = words.shape[:-2], words.shape[-2]
    c = _unpack(words.reshape(lead + (chunks, D, 4)))  # [..., chunks, D, 64]
    return jnp.swapaxes(c, -1, -2).reshape(lead + (chunks * CHUNK, D))


def words_of(nibbles):
    """int4 [..., 8 W] (as :func:`kernel_arrays` views the words) -> [..., W] uint32."""
    return jax.lax.bitcast_convert_type(nibbles.reshape(nibbles.shape[:-1] + (-1, 8)), jnp.uint32)


def key_tiles(scale, mn):
    """Key scale/min [..., T/32, D] -> [..., T/256 * D, 16]."""
    lead, g = scale.shape[:-2], scale.shape[-2]

    def cols(x):  # [..., T/256, D, 8]
        return jnp.swapaxes(x.reshape(lead + (g // 8, 8, D)), -1, -2)

    return jnp.concatenate([cols(scale), cols(mn)], axis=-1).reshape(lead + (g // 8 * D, 16))


def value_tiles(scale, mn):
    """Value scale/min [..., T, D/32] -> [..., T/128 * 64, 16]."""
    lead, t = scale.shape[:-2], scale.shape[-2]
    per = jnp.concatenate([scale, mn], axis=-1)  # [..., T, 8]
    per = jnp.swapaxes(per.reshape(lead + (t // VALUE_BLOCK, 2, CHUNK, 8)), -2, -3)
    return per.reshape(lead + (t // VALUE_BLOCK * CHUNK, 16))


def kernel_arrays(kn, kt, vn, vt):
    """Stores with any leading axes ([B, Hkv] or a stack's [L, B, Hkv]) as the Mosaic kernel
    takes them, the leading axes flattened into R rows: kn [R, Tc, 64] int4, kt [R, Tc/256, D, 16],
    vn [R, Tc/64, D, 32] int4, vt [R, Tc/128, 64, 16] (bitcasts and reshapes, no copies)."""
    tc = kn.shape[-2]

    def int4(words, shape):
        return jax.lax.bitcast_convert_type(words, jnp.int4).reshape(shape)

    return (int4(kn, (-1, tc, D // 2)), kt.reshape(-1, tc // KEY_BLOCK, D, 16),
            int4(vn, (-1, tc // CHUNK, D, CHUNK // 2)), vt.reshape(-1, tc // VALUE_BLOCK, CHUNK, 16))


def repack(k_codes, k_scale, k_min, v_codes, v_scale, v_min):
    """Codes and scales of R (row, KV head) pairs -> the kernel's layout.

    k_codes, v_codes: [R, T, D] integers 0..3; k_scale, k_min: [R, T/32, D]; v_scale, v_min:
    [R, T, D/32]; T a multiple of 256. Returns (kn [R, T, 64] int4, kt [R, T/256, 128, 16],
    vn [R, T/64, 128, 32] int4, vt [R, T/128, 64, 16]) with the scale dtype:
    kn[r, t] holds :func:`key_words` (k[r, t]) and vn[r, i, c] :func:`value_words`'s channel c
    of chunk i (their words as int4 nibbles, 8 a word, low bits first); kt[r, b, c, g] =
    s[8b + g, c] (g < 8), m[8b + g - 8, c] (g >= 8); vt[r, i, u, 8e + g] = s[128i + 64e + u, g],
    vt[r, i, u, 8e + 4 + g] = m[...]."""
    r, t, d = k_codes.shape
    if d != D or t % KEY_BLOCK:
        raise ValueError(f"codes [R, T, D] need D={D} and T a multiple of {KEY_BLOCK}; got {k_codes.shape}")
    return kernel_arrays(key_words(k_codes), key_tiles(k_scale, k_min), value_words(v_codes),
                         value_tiles(v_scale, v_min))


# (4^-f, -128 4^-f) as bf16 pairs, f = 0, 1, 2: (128 + 4^f c) 4^-f - 128 4^-f = c
_BF16_POW4 = ((0x3F803F80, 0xC300C300), (0x3E803E80, 0xC200C200), (0x3D803D80, 0xC100C100))


def unpack_constants(o, k):
    """The register unpacking of field (o, k) (its pair of codes at bits 8 o + 2 k and 16 more):
    (right shift of the word, LOP3 mask, FMA scale, FMA bias); the last two as bf16 pairs."""
    f = _field_offset(o, k)
    return 6 * (code_bit(o, k, 0) // 6), 0x30003 << 2 * f, *_BF16_POW4[f]


def field_scale(o, k):
    """4^-f of field (o, k) (int32 arrays): an offset operand (:func:`_codes_operands`) holds
    128 + 4^f c there, f = (8 o + 2 k) mod 6 / 2."""
    f = _field_offset(o, k)
    return jnp.where(f == 0, 1.0, jnp.where(f == 1, 0.25, 0.0625))


def key_field_scale(d):
    """4^-f of key channel d (:func:`_pack`: d = 64 o + 32 s + 8 k + 2 j + e)."""
    return field_scale(d // 64, d % 32 // 8)


def value_field_scale(t):
    """4^-f of a value chunk's token t (:func:`value_words`: t = 32 o + 8 k + 2 j + e)."""
    return field_scale(t // 32, t % 32 // 8)


def reference(q, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, starts=None):
    """float64 NumPy: the partials the kernel returns, from the plain codes and scales (as
    :func:`repack` takes them) by dequantize-then-attend. q [R, (G,) D] (already scaled);
    starts: each row's first attended token (default 0) -> (o [R, (G,) D] unnormalized,
    m [R, (G)], l [R, (G)]; a row with no token: m = -1e30, l = 0)."""
    if np.ndim(q) == 3:
        return _per_query_row(functools.partial(reference, starts=starts), q, lengths, k_codes, k_scale, k_min,
                              v_codes, v_scale, v_min)
    q = np.asarray(q, np.float64)
    kc, vc = np.asarray(k_codes, np.float64), np.asarray(v_codes, np.float64)
    k = kc * np.repeat(np.asarray(k_scale, np.float64), GROUP, 1) + np.repeat(np.asarray(k_min, np.float64), GROUP, 1)
    v = vc * np.repeat(np.asarray(v_scale, np.float64), GROUP, 2) + np.repeat(np.asarray(v_min, np.float64), GROUP, 2)
    s = np.einsum("rd,rtd->rt", q, k)
    t = np.arange(s.shape[1])[None]
    starts = np.zeros(np.shape(lengths), np.int64) if starts is None else np.asarray(starts)
    s = np.where((t < np.asarray(lengths)[:, None]) & (t >= starts[:, None]), s, -np.inf)
    m = np.maximum(s.max(1), -1e30)
    p = np.exp(s - m[:, None])
    return np.einsum("rt,rtd->rd", p, v), m, p.sum(1)


def _per_query_row(fn, q, *args):
    """fn over each query row q[:, h] -> its outputs stacked on axis 1."""
    outs = [fn(np.asarray(q)[:, h], *args) for h in range(np.shape(q)[1])]
    return tuple(np.stack(x, axis=1) for x in zip(*outs))
