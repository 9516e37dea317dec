"""A KIVI cache extended by many tokens a row at once, as that many appends would leave it.

Continuing a cache (``generate(..., cache=...)``, a chat turn) appends T new tokens a row. One
``append`` a token is T launches a layer; here the T tokens' writes are a few scatters a layer.
Algorithm 1 gives the same numbers either way, because what the appends quantize does not
depend on when: a value is quantized alone (per token) when it leaves the R-window, and keys
R at a time (per channel) when the residual fills. So with L tokens held and L' = L + T_b after:

* values: body positions [m, m') with m = max(Lb - R, 0), m' = max(Lb' - R, 0), each from the
  old ring (position < Lb) or the input, quantized per token into their words and scale rows;
* keys: the R-blocks [n, n') with n = Lb - Lb % R, n' = Lb' - Lb' % R, each from the old
  residual or the input, quantized per channel;
* rings: slot s gets the newest input token of the body congruent to s mod R (the slots no
  input token reaches keep what they hold, as the appends leave them); sink slot R + t gets
  input token t while t < S.

:func:`pending` computes those numbers once for both layouts; each cache's ``extend_writes``
lays them out as ``cache_common.RowsWrite`` s (rows a write does not reach are dropped).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kivi_jax import cache_common as cc
from kivi_jax.cache_kivi import quant_keys, quant_values, stored


@dataclasses.dataclass(frozen=True)
class Pending:
    """What an extend of a KIVI cache writes (B rows, T input tokens, P = (T // R + 1) R).

    lengths, overflow [B]: after the extend. slot [B, T]: where input token j goes in k_res /
    v_res (sink slot R + t, else ring slot p % R for the last R body tokens; -1: nowhere).
    body [B, T]: its body position p. v_start [B] = m; v_codes [B, H, T, D], v_scale, v_min
    [B, H, T, D/G] of positions m + i (zeros from m' on); v_ok [B, T]: position m + i is
    quantized here. k_start [B] = n; k_codes [B, H, P, D] of positions n + i, k_scale, k_min
    [B, H, P/Gk, D] of groups n / Gk + i (zeros from n' on); k_ok [B, P / Gk]: group i is
    quantized here. n_after [B] = n' (a key block was filled where n' > n).
    k, v: the input in the stored basis.
    """

    lengths: jax.Array
    overflow: jax.Array
    slot: jax.Array
    body: jax.Array
    v_start: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    v_ok: jax.Array
    k_start: jax.Array
    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    k_ok: jax.Array
    n_after: jax.Array
    k: jax.Array
    v: jax.Array


def pending(cache, k, v, lengths=None) -> Pending:
    """The numbers an extend of ``cache`` (a KIVICache or MosaicKIVICache) by k, v [B, Hkv, T, D]
    writes, row b appending its first lengths[b] tokens (None: all T)."""
    t = cc.check_kv("k", k, "v", v, batch=cache.batch_size, heads=cache.num_kv_heads, head_dim=cache.head_dim)
    c = cache.config
    r, sk, kg = c.residual_length, c.sink_tokens, c.key_group
    k, v = stored(k, cache.dtype, c.rotate_keys), stored(v, cache.dtype, c.rotate_values)
    written, overflow = cc.extended(cache, lengths, t)
    L, L1 = cache.lengths, cache.lengths + written
    Lb, Lb1 = cache.body_lengths, jnp.maximum(L1 - sk, 0)

    j = jnp.arange(t)[None, :]
    p = L[:, None] + j - sk  # body position of input token j (negative: a sink)
    new = j < written[:, None]
    ring = new & (p >= 0) & (p >= Lb1[:, None] - r)  # the last R body tokens: no two share a slot
    slot = jnp.where(new & (p < 0), r + L[:, None] + j, jnp.where(ring, p % r, -1))

    def gather(old, x, pos):  # pos [B, W] body positions -> [B, H, W, D]: old ring (pos < Lb) or input
        src = jnp.where(pos < Lb[:, None], pos % r, r + pos + sk - L[:, None])
        both = jnp.concatenate([old[:, :, :r], x], axis=2)
        return jnp.take_along_axis(both, jnp.clip(src, 0, r + t - 1)[:, None, :, None], axis=2)

    m, m1 = jnp.maximum(Lb - r, 0), jnp.maximum(Lb1 - r, 0)
    pv = m[:, None] + jnp.arange(t)[None, :]  # (m' - m <= T)
    v_ok = pv < m1[:, None]
    v_codes, v_scale, v_min = (jnp.where(v_ok[:, None, :, None], x, 0)
                               for x in quant_values(c, cache.dtype, gather(cache.v_res, v, pv)))

    n, n1 = Lb - Lb % r, Lb1 - Lb1 % r
    pk = n[:, None] + jnp.arange((t // r + 1) * r)[None, :]  # (n' - n <= R - 1 + T: whole blocks)
    k_codes, k_scale, k_min = quant_keys(c, cache.dtype, gather(cache.k_res, k, pk))
    k_codes = jnp.where((pk < n1[:, None])[:, None, :, None], k_codes, 0)
    k_ok = pk[:, ::kg] < n1[:, None]
    k_scale, k_min = (jnp.where(k_ok[:, None, :, None], x, 0) for x in (k_scale, k_min))
    return Pending(L1, overflow, slot, p, m, v_codes, v_scale, v_min, v_ok, n, k_codes, k_scale, k_min, k_ok, n1,
                   k, v)


def aligned(x, start, unit: int):
    """x [B, H, W, ...] holding positions start[b] + i -> (y [B, H, W', ...], first [B]): y holds
    position unit * first + i' (zeros where x has none), W' a multiple of ``unit``: what a
    layout that stores ``unit`` positions together writes from row ``first`` on."""
    w = x.shape[2]
    wa = -(-(w + unit - 1) // unit) * unit
    i = jnp.arange(wa)[None, :] - (start % unit)[:, None]  # [B, W']
    idx = jnp.clip(i, 0, w - 1).reshape(i.shape[:2] + (1,) * (x.ndim - 3))
    y = jnp.take_along_axis(x, jnp.expand_dims(idx, 1), axis=2)
    ok = ((i >= 0) & (i < w)).reshape(idx.shape)
    return jnp.where(jnp.expand_dims(ok, 1), y, 0).astype(x.dtype), start // unit


def rows_from(first, count: int, ok=None):
    """[B, count] rows first[b] + i (-1 where ``ok`` [B, count] is False: not written)."""
    rows = first[:, None] + jnp.arange(count)[None, :]
    return rows if ok is None else jnp.where(ok, rows, -1)
