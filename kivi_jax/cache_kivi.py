"""KIVICache: the KIVI cache of one attention layer as a pytree (Algorithm 1, functional).

Per row b with L = lengths[b] tokens held:

* keys: tokens [0, n) with n = L - L % R are quantized per-channel (groups of G tokens);
  tokens [n, L) sit in ``k_res`` at slot t - n (= t % R). When the residual fills up, all R
  keys are quantized together and the residual empties.
* values: tokens [0, m) with m = max(L - R, 0) are quantized per-token (groups of G
  channels); the newest min(L, R) tokens sit in the ring ``v_res`` at slot t % R. The token
  leaving the window is quantized as it leaves.

Codes of keys and values are packed along the token axis (:mod:`kivi_jax.packing`) into
stores of static capacity ``config.capacity(max_length)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kivi_jax import cache_common as cc
from kivi_jax import packing
from kivi_jax import quant
from kivi_jax.config import KIVIConfig


@cc.pytree_dataclass
class KIVICache:
    """Buffers (Tc = config.capacity(max_length), G = group_size, R = residual_length):

    k_codes [B, Hkv, packed_len(Tc, k_bits), D] uint32; k_scale, k_min [B, Hkv, Tc/G, D]
    k_res [B, Hkv, R, D]; v_codes [B, Hkv, packed_len(Tc, v_bits), D] uint32;
    v_scale, v_min [B, Hkv, Tc, D/G]; v_res [B, Hkv, R, D] (ring); lengths [B] int32;
    overflow [B] bool (a write was refused because the row was full, or an input was invalid).
    """

    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    k_res: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    v_res: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    config: KIVIConfig = cc.static()
    max_length: int = cc.static()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def init(cls, config: KIVIConfig, *, batch: int, num_kv_heads: int, head_dim: int, max_length: int,
             dtype=jnp.bfloat16) -> "KIVICache":
        if not isinstance(config, KIVIConfig):
            raise TypeError(f"config must be a KIVIConfig; got {type(config).__name__}")
        config.check_head_dim(head_dim)
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        quant._check_float("cache", dtype)
        g, r, tc = config.group_size, config.residual_length, config.capacity(max_length)
        bh = (batch, num_kv_heads)
        return cls(
            k_codes=jnp.zeros(bh + (packing.packed_len(tc, config.k_bits), head_dim), jnp.uint32),
            k_scale=jnp.zeros(bh + (tc // g, head_dim), dtype),
            k_min=jnp.zeros(bh + (tc // g, head_dim), dtype),
            k_res=jnp.zeros(bh + (r, head_dim), dtype),
            v_codes=jnp.zeros(bh + (packing.packed_len(tc, config.v_bits), head_dim), jnp.uint32),
            v_scale=jnp.zeros(bh + (tc, head_dim // g), dtype),
            v_min=jnp.zeros(bh + (tc, head_dim // g), dtype),
            v_res=jnp.zeros(bh + (r, head_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            overflow=jnp.zeros((batch,), bool),
            config=config,
            max_length=max_length,
        )

    batch_size = property(lambda self: self.k_res.shape[0])
    num_kv_heads = property(lambda self: self.k_res.shape[1])
    head_dim = property(lambda self: self.k_res.shape[3])
    dtype = property(lambda self: self.k_res.dtype)
    capacity = property(lambda self: self.k_scale.shape[2] * self.config.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds."""
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

    @property
    def num_quantized_keys(self):
        """n [B]: keys [0, n) are quantized."""
        r = self.config.residual_length
        return self.lengths - self.lengths % r

    @property
    def num_quantized_values(self):
        """m [B]: values [0, m) are quantized."""
        return jnp.maximum(self.lengths - self.config.residual_length, 0)

    def _check(self, k, v, tokens=None):
        return cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads,
                           head_dim=self.head_dim, tokens=tokens)

    # ---- quantization helpers ---------------------------------------------------------
    def _quant_keys(self, k):
        """Per-channel: k [B, H, T, D] (T multiple of G) -> codes [B,H,T,D], scale/min [B,H,T/G,D]."""
        c = self.config
        b, h, t, d = k.shape
        xg = k.astype(jnp.float32).reshape(b, h, t // c.group_size, c.group_size, d)
        scale, mn = quant.group_params(xg, c.k_bits, self.dtype, reduce_axis=3)
        codes = quant.quantize_codes(xg, scale, mn, c.k_bits).reshape(b, h, t, d)
        return codes, scale[:, :, :, 0], mn[:, :, :, 0]

    def _quant_values(self, v):
        """Per-token: v [B, H, T, D] -> codes [B,H,T,D], scale/min [B,H,T,D/G]."""
        c = self.config
        b, h, t, d = v.shape
        xg = v.astype(jnp.float32).reshape(b, h, t, d // c.group_size, c.group_size)
        scale, mn = quant.group_params(xg, c.v_bits, self.dtype, reduce_axis=4)
        codes = quant.quantize_codes(xg, scale, mn, c.v_bits).reshape(b, h, t, d)
        return codes, scale[..., 0], mn[..., 0]

    @staticmethod
    def _or_tokens(words, codes, start, bits):
        """ORs codes [B, H, n, D] (n a multiple of 16) of tokens [start, start + n) into words.

        start [B] int32, a multiple of 16 (so each 16-token chunk is one slot of 16 word rows).
        """
        blk = packing.block_len(bits)
        for a in range(codes.shape[2] // packing.ROWS):
            t = start + a * packing.ROWS
            row, shift = packing.ROWS * (t // blk), bits * ((t % blk) // packing.ROWS)
            chunk = codes[:, :, a * packing.ROWS:(a + 1) * packing.ROWS] << shift.astype(jnp.uint32)[:, None, None, None]
            cur = cc.take_row(words, row, packing.ROWS, axis=1)
            words = cc.put_row(words, cur | chunk, row, axis=1)
        return words

    # ---- Algorithm 1 ----------------------------------------------------------------------
    def prefill(self, k, v, lengths=None) -> "KIVICache":
        """Stores a (padded) prompt k, v [B, Hkv, T, D] into an empty cache.

        Row b keeps its first lengths[b] tokens (default T): keys [0, n_b) quantized
        per-channel, values [0, m_b) per-token, the rest in the residuals. Padding never
        enters a group. Replaces whatever the cache held.
        """
        c = self.config
        g, r = c.group_size, c.residual_length
        t = self._check(k, v)
        lengths, invalid = cc.prompt_lengths(lengths, self.batch_size, t, self.max_length)
        # the cache holds K, V in its dtype: quantize those numbers, exactly as append does
        k, v = jnp.asarray(k).astype(self.dtype), jnp.asarray(v).astype(self.dtype)
        n = lengths - lengths % r
        m = jnp.maximum(lengths - r, 0)
        new = self.init(c, batch=self.batch_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                        max_length=self.max_length, dtype=self.dtype)
        k_codes, k_scale, k_min = new.k_codes, new.k_scale, new.k_min
        tf = (t // r) * r
        if tf:
            codes, scale, mn = self._quant_keys(k[:, :, :tf])
            grp_ok = (jnp.arange(tf // g)[None, :] * g < n[:, None])[:, None, :, None]
            tok_ok = (jnp.arange(tf)[None, :] < n[:, None])[:, None, :, None]
            words = packing.pack(jnp.where(tok_ok, codes, 0), c.k_bits, axis=2)
            k_codes = k_codes.at[:, :, : words.shape[2]].set(words)
            k_scale = k_scale.at[:, :, : tf // g].set(jnp.where(grp_ok, scale, 0))
            k_min = k_min.at[:, :, : tf // g].set(jnp.where(grp_ok, mn, 0))
        codes, scale, mn = self._quant_values(v)
        tok_ok = (jnp.arange(t)[None, :] < m[:, None])[:, None, :, None]
        words = packing.pack(jnp.where(tok_ok, codes, 0), c.v_bits, axis=2)
        v_codes = new.v_codes.at[:, :, : words.shape[2]].set(words)
        v_scale = new.v_scale.at[:, :, :t].set(jnp.where(tok_ok, scale, 0))
        v_min = new.v_min.at[:, :, :t].set(jnp.where(tok_ok, mn, 0))

        slot = jnp.arange(r)[None, :]
        k_tok = n[:, None] + slot  # key residual slot i holds token n + i
        v_tok = m[:, None] + (slot - m[:, None]) % r  # value ring slot i holds the window token = i mod R
        k_res = self._gather_tokens(k, k_tok, k_tok < lengths[:, None])
        v_res = self._gather_tokens(v, v_tok, v_tok < lengths[:, None])
        return KIVICache(k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res,
                         lengths, invalid, c, self.max_length)

    def _gather_tokens(self, x, tok, ok):
        """x [B, H, T, D], tok/ok [B, R] -> [B, H, R, D] with x[b, :, tok] where ok else 0."""
        idx = jnp.clip(tok, 0, x.shape[2] - 1)[:, None, :, None]
        got = jnp.take_along_axis(x, idx, axis=2)
        return jnp.where(ok[:, None, :, None], got, 0).astype(self.dtype)

    def append(self, k, v) -> "KIVICache":
        """Appends one token k, v [B, Hkv, 1, D] per row (Algorithm 1, the paper's order).

        A row already holding max_length tokens is left unchanged and flagged in ``overflow``.
        """
        self._check(k, v, tokens=1)
        c = self.config
        r, g = c.residual_length, c.group_size
        L = self.lengths
        full = L >= self.max_length
        live = ~full
        Lc = jnp.minimum(L, self.max_length - 1)  # in-range index for masked rows

        # keys: Kr += k; a full residual (R keys) is quantized per-channel and emptied
        k_res = cc.put_row(self.k_res, jnp.where(live[:, None, None, None], k.astype(self.dtype),
                                                cc.take_row(self.k_res, Lc % r, 1, axis=1)), Lc % r, axis=1)
        flush = live & ((L + 1) % r == 0)
        n0 = jnp.where(flush, L + 1 - r, 0)

        def do_flush(state):
            k_codes, k_scale, k_min = state
            codes, scale, mn = self._quant_keys(k_res)
            f4 = flush[:, None, None, None]
            codes = jnp.where(f4, codes, 0)
            k_codes = self._or_tokens(k_codes, codes, n0, c.k_bits)
            old_s = cc.take_row(k_scale, n0 // g, r // g, axis=1)
            old_m = cc.take_row(k_min, n0 // g, r // g, axis=1)
            k_scale = cc.put_row(k_scale, jnp.where(f4, scale, old_s), n0 // g, axis=1)
            k_min = cc.put_row(k_min, jnp.where(f4, mn, old_m), n0 // g, axis=1)
            return k_codes, k_scale, k_min

        k_codes, k_scale, k_min = lax.cond(jnp.any(flush), do_flush, lambda s: s,
                                           (self.k_codes, self.k_scale, self.k_min))

        # values: the token leaving the R-window (token L - R, ring slot L % R) is quantized
        slot = Lc % r
        leaving = cc.take_row(self.v_res, slot, 1, axis=1)  # [B, H, 1, D]
        spill = live & (L >= r)
        t_out = jnp.where(spill, L - r, 0)
        codes, scale, mn = self._quant_values(leaving)
        codes = jnp.where(spill[:, None, None, None], codes, 0)
        row, shift = packing.word_row_and_shift(t_out, c.v_bits)
        cur = cc.take_row(self.v_codes, row, 1, axis=1)
        v_codes = cc.put_row(self.v_codes, cur | (codes << shift.astype(jnp.uint32)[:, None, None, None]), row, axis=1)
        s4 = spill[:, None, None, None]
        v_scale = cc.put_row(self.v_scale, jnp.where(s4, scale, cc.take_row(self.v_scale, t_out, 1, axis=1)), t_out, axis=1)
        v_min = cc.put_row(self.v_min, jnp.where(s4, mn, cc.take_row(self.v_min, t_out, 1, axis=1)), t_out, axis=1)
        v_res = cc.put_row(self.v_res, jnp.where(live[:, None, None, None], v.astype(self.dtype), leaving), slot, axis=1)

        return KIVICache(k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res,
                         L + live, self.overflow | full, c, self.max_length)

    # ---- reading ------------------------------------------------------------------------------
    def materialize(self):
        """(K_hat, V_hat) [B, Hkv, Tc, D] in the cache dtype: dequantized where quantized, the
        residual where not. Positions >= lengths hold junk; attention masks them."""
        c = self.config
        tc = self.capacity
        t = jnp.arange(tc)
        kq = quant.dequantize_codes(packing.unpack(self.k_codes, c.k_bits, 2, tc),
                                    jnp.repeat(self.k_scale, c.group_size, axis=2),
                                    jnp.repeat(self.k_min, c.group_size, axis=2), self.dtype)
        vq = quant.dequantize_codes(packing.unpack(self.v_codes, c.v_bits, 2, tc),
                                    jnp.repeat(self.v_scale, c.group_size, axis=3),
                                    jnp.repeat(self.v_min, c.group_size, axis=3), self.dtype)
        r = c.residual_length
        k_r = jnp.take(self.k_res, t % r, axis=2)
        v_r = jnp.take(self.v_res, t % r, axis=2)
        kq_mask = (t[None, :] < self.num_quantized_keys[:, None])[:, None, :, None]
        vq_mask = (t[None, :] < self.num_quantized_values[:, None])[:, None, :, None]
        return jnp.where(kq_mask, kq, k_r), jnp.where(vq_mask, vq, v_r)
