"""Decode attention over a MosaicKIVICache: the Mosaic GPU kernel on the quantized tokens, plain
JAX on the newest ones.

Row b holds L tokens; values [0, m) are quantized (m = max(L - R, 0)), and so are their keys
(keys [0, n) with n = L - L % R >= m). The kernel (:func:`pallas_kernels.kivi_mosaic.bulk_partials`)
attends tokens [0, m) from the stores as they are. The window, tokens [m, L) (at most R), is
attended here: values from the ring (slot t % R), keys from the residual (t >= n) or, for
t in [m, n), dequantized from the last flushed block (one key block's tile and R rows of codes
gathered per row). The two partials are combined.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kivi_jax import cache_common as cc
from kivi_jax import quant
from kivi_jax.cache_mosaic import MosaicKIVICache
from pallas_kernels.kivi_mosaic import D, GROUP, KEY_BLOCK, kernel_arrays, key_codes
from pallas_kernels import kivi_mosaic


def _flushed_keys(cache: MosaicKIVICache):
    """The last flushed block's R keys, dequantized: [B, H, R, D] (token n - R + j at j)."""
    r = cache.config.residual_length
    n0 = jnp.maximum(cache.num_quantized_keys - r, 0)  # the block's first token (a multiple of R)
    codes = key_codes(cc.take_row(cache.kn, n0, r, 1))  # [B, H, R, D]
    tile = cc.take_row(cache.kt, (n0 // KEY_BLOCK) * D, D, 1).astype(jnp.float32)  # [B, H, D, 16]
    col = ((n0 % KEY_BLOCK) // GROUP)[:, None] + jnp.arange(r)[None, :] // GROUP  # [B, R]: the token's group column
    onehot = (jnp.arange(8)[None, None, :] == col[:, :, None]).astype(jnp.float32)  # [B, R, 8]
    s = jnp.einsum("bjn,bhcn->bhjc", onehot, tile[..., :8])
    m = jnp.einsum("bjn,bhcn->bhjc", onehot, tile[..., 8:])
    hi = jnp.arange(D) >= D // 2
    s, m = jnp.where(hi, 4 * s, s), jnp.where(hi, m - 8 * s, m)  # unfold: s = 4 s', m = m' - 2 s
    return quant.dequantize_codes(codes, s, m, cache.dtype)


def window_partials(qg, cache: MosaicKIVICache):
    """qg [B, Hkv, G, D] float32 (scaled) -> partials (o [B, Hkv, G, D], m, l [B, Hkv, G]) over
    tokens [m, L) of each row."""
    r = cache.config.residual_length
    L, n, mq = cache.lengths, cache.num_quantized_keys, cache.num_quantized_values
    pos = mq[:, None] + jnp.arange(r)[None, :]  # [B, R]
    valid = pos < L[:, None]
    flushed = _flushed_keys(cache)
    in_block = jnp.clip(pos - (n[:, None] - r), 0, r - 1)
    in_res = jnp.clip(pos - n[:, None], 0, r - 1)
    pick = lambda x, idx: jnp.take_along_axis(x, idx[:, None, :, None], axis=2)  # noqa: E731 - per-row gather
    k = jnp.where((pos < n[:, None])[:, None, :, None], pick(flushed, in_block), pick(cache.k_res, in_res))
    v = pick(cache.v_res, pos % r)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k.astype(jnp.float32))
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    return jnp.einsum("bhgt,bhtd->bhgd", p, v.astype(jnp.float32)), jnp.where(jnp.isfinite(m), m, -1e30), p.sum(-1)


def decode_attention(q, cache: MosaicKIVICache, *, stack=None, bulk=None):
    """q [B, Hq, 1, D] -> [B, Hq, 1, D] in q's dtype. stack: None, or (stacked, i) when
    ``cache`` is layer i of ``stacked`` (leaves [L, B, Hkv, ...]): the kernel then reads the
    stores in place (a slice handed to a custom call is a copy). bulk: the partials over the
    quantized tokens, ``bulk(qrows [R, (G,) D], lengths [R], *arrays, row_offset=)`` (default:
    the Mosaic kernel, which needs a GPU; tests pass a plain-JAX one)."""
    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    if g not in kivi_mosaic.HEADS:
        raise ValueError(f"the Mosaic kernel takes {kivi_mosaic.HEADS} query heads a KV head; got Hq={hq}, Hkv={hkv}")
    qg = q[:, :, 0].astype(jnp.float32).reshape(b, hkv, g, d) / math.sqrt(d)
    rows = qg.reshape(b * hkv, g, d) if g > 1 else qg.reshape(b * hkv, d)
    bulk = bulk or kivi_mosaic.bulk_partials
    if stack is None:
        arrays, offset = cache.kernel_arrays(), 0
    else:
        stacked, layer = stack
        arrays, offset = kernel_arrays(stacked.kn, stacked.kt, stacked.vn, stacked.vt), layer * b * hkv
    ob, mb, lb = (x.reshape(b, hkv, g, *x.shape[2 if g > 1 else 1:])
                  for x in bulk(rows, jnp.repeat(cache.num_quantized_values, hkv), *arrays, row_offset=offset))
    ow, mw, lw = window_partials(qg, cache)
    top = jnp.maximum(mb, mw)
    wb, ww = jnp.exp(mb - top), jnp.exp(mw - top)
    den = lb * wb + lw * ww
    out = (ob * wb[..., None] + ow * ww[..., None]) / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, hq, 1, d).astype(q.dtype)
