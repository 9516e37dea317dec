"""SimQuantCache: KIVI's quantization simulated in full-precision buffers, with a choice of axis.

The paper's ablation asks *which axis* each tensor should be quantized along: keys
per-channel and values per-token (KIVI) versus keys per-token (the usual choice, and the
wrong one for keys: a few key channels carry large outliers that then set the scale of
every group they fall in). This cache answers it with the real timing of Algorithm 1 but
no packed layout: it keeps K and V in dense ``[B, Hkv, T, D]`` buffers and overwrites the
tokens that KIVI would quantize with ``dequantize(quantize(x))`` (``kivi_jax.quant``), at the
moment KIVI quantizes them:

* keys: the newest ``L % R`` tokens stay in full precision; each time R keys have
  gathered they are quantized together (a block of R tokens);
* values (per-token): the newest ``min(L, R)`` tokens stay in full precision; the token
  leaving the window is quantized as it leaves;
* values per-channel (a further ablation) need G tokens per group, so they follow the
  keys' block rule.

Per-channel groups are G consecutive tokens of one channel; per-token groups are G
consecutive channels of one token. With ``key_axis="channel", value_axis="token"`` the
materialized K, V equal :class:`kivi_jax.KIVICache`'s exactly (tested), so any difference
the other axes make is the axis alone. It is a measuring device, not a memory saver: it
stores as much as a dense cache.

Protocol (what the model and ``kivi_jax.decode_attention``'s reference path use): ``init``,
``prefill(k, v, lengths)``, ``append(k, v)``, ``materialize()``, ``lengths``, ``overflow``,
``num_kv_heads``, ``head_dim``, ``batch_size``. ``models.StackedCache.stack`` stacks it
per layer like the built-in caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kivi_jax import cache_common as cc
from kivi_jax import quant
from kivi_jax.checks import check_float
from kivi_jax.config import KIVIConfig

AXES = ("channel", "token")


@cc.pytree_dataclass
class SimQuantCache(cc.CacheShape):
    """k, v [B, Hkv, Tc, D] in the cache dtype (Tc = max(max_length, R)): full-precision
    tokens as given, quantized tokens as their dequantized values. lengths [B] int32;
    overflow [B] bool (a write was refused because the row was full, or bad prompt lengths)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    config: KIVIConfig = cc.static()
    key_axis: str = cc.static()
    value_axis: str = cc.static()
    max_length: int = cc.static()

    @classmethod
    def init(cls, config: KIVIConfig, *, batch: int, num_kv_heads: int, head_dim: int, max_length: int,
             dtype=jnp.float32, key_axis: str = "token", value_axis: str = "token") -> "SimQuantCache":
        if not isinstance(config, KIVIConfig):
            raise TypeError(f"config must be a KIVIConfig; got {type(config).__name__}")
        for name, axis in (("key_axis", key_axis), ("value_axis", value_axis)):
            if axis not in AXES:
                raise ValueError(f"{name}={axis!r}; allowed: {AXES}")
        extras = {k: getattr(config, k) for k, off in (("sink_tokens", 0), ("rotate", "none"), ("key_group_size", None))
                  if getattr(config, k, off) != off}
        if extras:  # the simulation models plain KIVI only: refuse rather than ignore
            raise ValueError(f"SimQuantCache supports plain KIVI settings only; got {extras}")
        cc.check_sizes(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, max_length=max_length)
        config.check_head_dim(head_dim)
        check_float("cache", dtype)
        tc = max(max_length, config.residual_length)  # room for a whole R-token block
        shape = (batch, num_kv_heads, tc, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32),
                   overflow=jnp.zeros((batch,), bool), config=config, key_axis=key_axis, value_axis=value_axis,
                   max_length=max_length)



    # ---- quantization ------------------------------------------------------------------
    def _fake(self, x, axis: str, bits: int):
        """dequantize(quantize(x)) for x [B, H, T, D]: groups of G tokens ('channel') or of G
        channels ('token'), scale and min in the cache dtype (as KIVICache stores them)."""
        x = x.astype(self.dtype)
        return quant.dequantize(quant.quantize(x, bits=bits, group_size=self.config.group_size,
                                               axis=2 if axis == "channel" else 3))

    def _k_args(self):
        return self.key_axis, self.config.k_bits

    def _v_args(self):
        return self.value_axis, self.config.v_bits

    @property
    def _v_block(self) -> bool:
        """Values follow the keys' block rule when per-channel (a group needs G tokens)."""
        return self.value_axis == "channel"

    # ---- Algorithm 1 ---------------------------------------------------------------------
    def prefill(self, k, v, lengths=None) -> "SimQuantCache":
        """Stores a (padded) prompt k, v [B, Hkv, T, D] into the cache (replacing its content):
        row b's keys [0, n_b) (n = L - L % R) quantized, values [0, m_b) (m = max(L - R, 0))
        quantized (per-channel values: [0, n_b)), the rest full precision."""
        c = self.config
        r = c.residual_length
        t = cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads, head_dim=self.head_dim)
        lengths, invalid = cc.prompt_lengths(lengths, self.batch_size, t, self.max_length)
        k, v = jnp.asarray(k).astype(self.dtype), jnp.asarray(v).astype(self.dtype)
        n = lengths - lengths % r
        m = n if self._v_block else jnp.maximum(lengths - r, 0)
        pos = jnp.arange(t)[None, :]
        keep = (pos < lengths[:, None])[:, None, :, None]
        tf = (t // r) * r  # whole R-blocks: every quantized group lies inside them
        if tf:
            kq = jnp.concatenate([self._fake(k[:, :, :tf], *self._k_args()), k[:, :, tf:]], axis=2)
            k = jnp.where((pos < n[:, None])[:, None, :, None], kq, k)
        if self._v_block:
            if tf:
                vq = jnp.concatenate([self._fake(v[:, :, :tf], *self._v_args()), v[:, :, tf:]], axis=2)
                v = jnp.where((pos < m[:, None])[:, None, :, None], vq, v)
        else:
            v = jnp.where((pos < m[:, None])[:, None, :, None], self._fake(v, *self._v_args()), v)
        k_buf = jnp.zeros_like(self.k).at[:, :, :t].set(jnp.where(keep, k, 0))
        v_buf = jnp.zeros_like(self.v).at[:, :, :t].set(jnp.where(keep, v, 0))
        return SimQuantCache(k_buf, v_buf, lengths, invalid, c, self.key_axis, self.value_axis, self.max_length)

    def append(self, k, v, active=None) -> "SimQuantCache":
        """Appends one token k, v [B, Hkv, 1, D] per row, then quantizes what KIVI would: a full
        R-block of keys (and of per-channel values), the value token leaving the R-window.
        A row already holding max_length tokens is left unchanged and flagged in ``overflow``;
        active [B] bool (None: all rows): only these rows append."""
        cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads, head_dim=self.head_dim, tokens=1)
        r = self.config.residual_length
        L = cc.write_lengths(self, active)  # (an inactive row shows as full: it writes nothing)
        live = L < self.max_length
        at = jnp.minimum(L, self.max_length - 1)
        live4 = live[:, None, None, None]
        k_buf = cc.put_row(self.k, jnp.where(live4, k.astype(self.dtype), cc.take_row(self.k, at, 1, axis=1)), at, axis=1)
        v_buf = cc.put_row(self.v, jnp.where(live4, v.astype(self.dtype), cc.take_row(self.v, at, 1, axis=1)), at, axis=1)

        flush = live & ((L + 1) % r == 0)
        n0 = jnp.where(flush, L + 1 - r, 0)
        f4 = flush[:, None, None, None]

        def block(buf, axis, bits):
            blk = cc.take_row(buf, n0, r, axis=1)
            return cc.put_row(buf, jnp.where(f4, self._fake(blk, axis, bits), blk), n0, axis=1)

        def do_flush(bufs):
            kb, vb = bufs
            kb = block(kb, *self._k_args())
            if self._v_block:
                vb = block(vb, *self._v_args())
            return kb, vb

        k_buf, v_buf = lax.cond(jnp.any(flush), do_flush, lambda b: b, (k_buf, v_buf))

        if not self._v_block:  # the value token leaving the window (token L - R) is quantized
            spill = live & (L >= r)
            t_out = jnp.where(spill, L - r, 0)
            tok = cc.take_row(v_buf, t_out, 1, axis=1)
            v_buf = cc.put_row(v_buf, jnp.where(spill[:, None, None, None], self._fake(tok, *self._v_args()), tok),
                               t_out, axis=1)
        return SimQuantCache(k_buf, v_buf, *cc.appended(self, live, active), self.config, self.key_axis,
                             self.value_axis, self.max_length)

    def materialize(self):
        """(K_hat, V_hat) [B, Hkv, Tc, D]: positions >= lengths hold junk; attention masks them."""
        return self.k, self.v
