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

Extensions (``KIVIConfig``; all off by default, and then everything above holds bit for bit):

* ``sink_tokens=S``: tokens [0, S) of a row are *sinks*, kept in full precision forever in
  slots [R, R + S) of ``k_res`` / ``v_res`` (slot R + t holds token t). Everything above
  then applies to the *body*, the tokens after the sinks, counted from S: body token
  p = t - S, body length Lb = max(L - S, 0); the quantized stores index body tokens (store
  position p holds token S + p), so groups, flushes and spills start after the sinks. A row
  shorter than S holds only sinks. (The sinks live inside the residual buffers rather than
  in new fields so the pytree, and the sharding rules written for it, stay as they were.)
* ``rotate``: keys and/or values are rotated by the Hadamard matrix H once, when stored:
  every buffer (quantized stores, residuals, sinks) holds K·H / V·H (rounded into the
  cache dtype). ``materialize()`` returns the original basis; attention reads the stored
  basis (``materialize(rotated=True)``) with a rotated query and rotates the output back.
* ``key_group_size``: key scales/mins per ``config.key_group`` tokens (values still per
  ``group_size`` channels).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from kivi_jax import cache_common as cc
from kivi_jax import packing
from kivi_jax import quant
from kivi_jax import rotation
from kivi_jax import switches
from kivi_jax.config import KIVIConfig
from kivi_jax.eager import jit_when_eager
from pallas_kernels import kivi_append

APPEND_IMPLS = ("xla", "pallas")
#: how a layer-stacked KIVICache's decode append is written, read at trace time: "xla"
#: (``append_writes``' values computed in XLA, the row-writes kernel or scatters writing them),
#: "pallas" (one kernel that also quantizes the value leaving the window:
#: pallas_kernels/kivi_append.py; shapes it does not take fall back to "xla") or None (the
#: default: "pallas" on a GPU, "xla" elsewhere, where the kernel would run interpreted). e2e's
#: children read KIVI_APPEND. (The Mosaic layout's switch is ``cache_mosaic.APPEND_IMPL``.)
APPEND_IMPL = os.environ.get("KIVI_APPEND") or None


def append_impl() -> str:
    """APPEND_IMPL resolved for this backend (named error when it is not one of APPEND_IMPLS)."""
    return switches.resolve("cache_kivi.APPEND_IMPL", APPEND_IMPL, APPEND_IMPLS, gpu="pallas", other="xla")


@functools.lru_cache(maxsize=None)
def token_quantizer(bits: int, dtype):
    """x [D/G, G] float32 (a token's values by channel group) -> (codes [D/G, G] uint32, scale,
    min [D/G, 1] in ``dtype``): ``quant_values``' numbers, for the append kernels (one function
    object per (bits, dtype): the kernels' jit caches on it)."""
    return functools.partial(quant.quantize_groups, bits=bits, dtype=dtype, reduce_axis=1)


@cc.pytree_dataclass
class KIVICache(cc.CacheShape, cc.SinksAndWindow):
    """Buffers (Tc = config.capacity(max_length), G = group_size, Gk = config.key_group,
    R = residual_length, S = sink_tokens):

    k_codes [B, Hkv, packed_len(Tc, k_bits), D] uint32; k_scale, k_min [B, Hkv, Tc/Gk, D]
    k_res [B, Hkv, R + S, D] (residual, then sinks); v_codes [B, Hkv, packed_len(Tc, v_bits), D]
    uint32; v_scale, v_min [B, Hkv, Tc, D/G]; v_res [B, Hkv, R + S, D] (ring, then sinks);
    lengths [B] int32 (all tokens, sinks included);
    overflow [B] bool (a write was refused because the row was full, or an input was invalid).
    """

    shape_field = "k_res"  # CacheShape reads B, Hkv, D, dtype from the residual buffer

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
        cc.check_sizes(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, max_length=max_length)
        cc.check_init(config, KIVIConfig, max_length, dtype)
        config.check_head_dim(head_dim)
        if config.layout == "mosaic":
            raise ValueError(f"KIVICache stores layout='tokens'; got layout={config.layout!r} "
                             "(kivi_jax.MosaicKIVICache stores 'mosaic')")
        config = dataclasses.replace(config, layout="tokens")  # "auto" resolved: this class stores tokens
        g, kg, tc = config.group_size, config.key_group, config.capacity(max_length)
        rs = config.residual_length + config.sink_tokens
        bh = (batch, num_kv_heads)
        return cls(
            k_codes=jnp.zeros(bh + (packing.packed_len(tc, config.k_bits), head_dim), jnp.uint32),
            k_scale=jnp.zeros(bh + (tc // kg, head_dim), dtype),
            k_min=jnp.zeros(bh + (tc // kg, head_dim), dtype),
            k_res=jnp.zeros(bh + (rs, head_dim), dtype),
            v_codes=jnp.zeros(bh + (packing.packed_len(tc, config.v_bits), head_dim), jnp.uint32),
            v_scale=jnp.zeros(bh + (tc, head_dim // g), dtype),
            v_min=jnp.zeros(bh + (tc, head_dim // g), dtype),
            v_res=jnp.zeros(bh + (rs, head_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            overflow=jnp.zeros((batch,), bool),
            config=config,
            max_length=max_length,
        )

    #: tokens the quantized stores can hold (the body, after the sinks), Tc
    capacity = property(lambda self: self.k_scale.shape[2] * self.config.key_group)

    @property
    def prefix_unit(self) -> int:
        """Body tokens a :meth:`prefix` counts in: whole packed words and key groups."""
        return self.config.capacity_unit  # (capacity(1) raises for a config with sinks)

    def prefix(self, tokens: int) -> "KIVICache":
        """A view for reading (materialize, attention) with the quantized stores cut to their first
        ``tokens`` body tokens (a multiple of prefix_unit): the same numbers for every row holding at
        most that many (sinks and ring are kept whole). Not for writing."""
        c = self.config
        tokens = cc.check_prefix(self, tokens)
        words_k, words_v = packing.packed_len(tokens, c.k_bits), packing.packed_len(tokens, c.v_bits)
        groups = tokens // c.key_group
        return dataclasses.replace(self, k_codes=self.k_codes[:, :, :words_k], k_scale=self.k_scale[:, :, :groups],
                                   k_min=self.k_min[:, :, :groups], v_codes=self.v_codes[:, :, :words_v],
                                   v_scale=self.v_scale[:, :, :tokens], v_min=self.v_min[:, :, :tokens])

    def _store(self, x, rotate: bool):
        return stored(x, self.dtype, rotate)

    def _check(self, k, v, tokens=None):
        cc.check_writable(self, self.config.capacity(self.max_length))  # (every write checks its inputs here)
        return cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads,
                           head_dim=self.head_dim, tokens=tokens)

    # ---- quantization helpers ---------------------------------------------------------
    def _key_code_writes(self, codes, start):
        """codes [B, H, R, D] of tokens [start, start + R) (start [B] int32, a multiple of R)
        as RowWrites that add their bits into k_codes (whose bits there are still zero).

        Words hold c = 32 / bits consecutive tokens: R a multiple of c (every case but 1-bit
        keys with R = 16 mod 32) is R / c whole words from row start / c, one slab. Otherwise
        the 16-token halves of 1-bit words are written one by one at bit 0 or 16.
        """
        c = self.config
        b, h, r, d = codes.shape
        per = packing.codes_per_word(c.k_bits)
        if r % per == 0:
            return [cc.RowWrite(packing.pack(codes, c.k_bits, axis=2), start // per, "k_codes", 1, add=True)]
        half = packing.pack(codes.reshape(b, h, r // 16, 16, d), c.k_bits, axis=3)[:, :, :, 0]  # 16 codes a word
        t = start[:, None] + 16 * jnp.arange(r // 16)
        row, shift = packing.word_row_and_shift(t, c.k_bits)
        return [cc.RowWrite(half[:, :, j:j + 1] << shift[:, j].astype(jnp.uint32)[:, None, None, None],
                            row[:, j], "k_codes", 1, add=True) for j in range(r // 16)]

    # ---- Algorithm 1 ----------------------------------------------------------------------
    @jit_when_eager(validate=cc.check_prefill)
    def prefill(self, k, v, lengths=None) -> "KIVICache":
        """Stores a (padded) prompt k, v [B, Hkv, T, D] into an empty cache.

        Row b keeps its first lengths[b] tokens (default T): keys [0, n_b) quantized
        per-channel, values [0, m_b) per-token, the rest in the residuals (with sinks: tokens
        [0, S) in the sink slots, and all of this for the tokens after them). Padding never
        enters a group. Replaces whatever the cache held.
        """
        c = self.config
        sk = c.sink_tokens
        t = self._check(k, v)
        lengths, invalid = cc.prompt_lengths(lengths, self.batch_size, t, self.max_length)
        # the cache holds K, V in its dtype: quantize those numbers, exactly as append does
        k, v = self._store(k, c.rotate_keys), self._store(v, c.rotate_values)
        new = self.init(c, batch=self.batch_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                        max_length=self.max_length, dtype=self.dtype)
        if sk == 0:
            body = self._prefill_body(new, k, v, lengths, t)
            return KIVICache(*body, lengths, invalid, c, self.max_length)
        r = c.residual_length
        tb = max(t - sk, 0)
        lb = jnp.maximum(lengths - sk, 0)
        if tb:
            k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res = self._prefill_body(
                new, k[:, :, sk:], v[:, :, sk:], lb, tb)
        else:
            k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res = (
                new.k_codes, new.k_scale, new.k_min, new.k_res[:, :, :r], new.v_codes, new.v_scale, new.v_min,
                new.v_res[:, :, :r])
        tok = jnp.broadcast_to(jnp.arange(sk)[None, :], (self.batch_size, sk))
        ok = tok < lengths[:, None]
        k_res = jnp.concatenate([k_res, self._gather_tokens(k, tok, ok)], axis=2)
        v_res = jnp.concatenate([v_res, self._gather_tokens(v, tok, ok)], axis=2)
        return KIVICache(k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res,
                         lengths, invalid, c, self.max_length)

    def _prefill_body(self, new, k, v, lengths, t):
        """Algorithm 1's prefill of k, v [B, H, t, D] (stored basis) with per-row lengths into
        the empty stores of ``new``; returns the 8 buffers (residuals of R slots)."""
        c = self.config
        kg, r = c.key_group, c.residual_length
        n = lengths - lengths % r
        m = jnp.maximum(lengths - r, 0)
        k_codes, k_scale, k_min = new.k_codes, new.k_scale, new.k_min
        tf = (t // r) * r
        if tf:
            codes, scale, mn = quant_keys(self.config, self.dtype, k[:, :, :tf])
            grp_ok = (jnp.arange(tf // kg)[None, :] * kg < n[:, None])[:, None, :, None]
            tok_ok = (jnp.arange(tf)[None, :] < n[:, None])[:, None, :, None]
            words = packing.pack(jnp.where(tok_ok, codes, 0), c.k_bits, axis=2)
            k_codes = k_codes.at[:, :, : words.shape[2]].set(words)
            k_scale = k_scale.at[:, :, : tf // kg].set(jnp.where(grp_ok, scale, 0))
            k_min = k_min.at[:, :, : tf // kg].set(jnp.where(grp_ok, mn, 0))
        codes, scale, mn = quant_values(self.config, self.dtype, v)
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
        return k_codes, k_scale, k_min, k_res, v_codes, v_scale, v_min, v_res

    def _gather_tokens(self, x, tok, ok):
        """x [B, H, T, D], tok/ok [B, R] -> [B, H, R, D] with x[b, :, tok] where ok else 0."""
        idx = jnp.clip(tok, 0, x.shape[2] - 1)[:, None, :, None]
        got = jnp.take_along_axis(x, idx, axis=2)
        return jnp.where(ok[:, None, :, None], got, 0).astype(self.dtype)

    @jit_when_eager
    def append(self, k, v, active=None) -> "KIVICache":
        """Appends one token k, v [B, Hkv, 1, D] per row (Algorithm 1, the paper's order).

        A row already holding max_length tokens is left unchanged and flagged in ``overflow``.
        With sinks, a row holding L < S tokens writes the token into sink slot L instead.
        active [B] bool (None: all rows): only these rows append; the others are left as they
        are (a finished request in a batch that goes on decoding).
        """
        return cc.apply_writes(self, *self.append_writes(k, v, active))

    def append_writes(self, k, v, active=None):
        """What :meth:`append` changes, as (writes, lengths, overflow) for ``cc.apply_writes``.

        Slabs per row b (a row that writes nothing there is left out by the write's ``keep``):

        * k_res [B, H, 1, D]: the key at residual slot Lb % R (with sinks: at sink slot R + L
          while L < S);
        * the value leaving the R-window, quantized per-token: one v_codes word row (added),
          one v_scale and one v_min row; the new value at ring slot Lb % R of v_res (or the sink slot);
        * a key flush, when some row's residual fills up (under lax.cond: once per R steps):
          the R keys' code words (added) and R/Gk rows of k_scale and k_min.

        Code words are added, not read and OR-ed: their bits there are zero until written once.
        """
        self._check(k, v, tokens=1)
        c = self.config
        r, kg, sk = c.residual_length, c.key_group, c.sink_tokens
        k, v = self._store(k, c.rotate_keys), self._store(v, c.rotate_values)
        L = cc.write_lengths(self, active)  # (an inactive row shows as full: it writes nothing)
        # residual slots are [0, R) of k_res / v_res (sink slots [R, R + S) follow). One k_res /
        # v_res write per row: the residual slot, or the sink slot R + L of a row still filling
        # its sinks (a second write would read the buffer after the first: XLA copies it)
        live, spill, slot, at, t_out = kivi_append.ring_slots(L, r=r, sinks=sk, max_length=self.max_length)
        live_body, Lb = live & (L >= sk), self.body_lengths

        # keys: Kr += k (a full residual is quantized and emptied by the flush, last below)
        writes = [cc.RowWrite(k, at, "k_res", 1, keep=live)]
        # values: the token leaving the R-window (token L - R, ring slot L % R) is quantized
        leaving = cc.take_row(self.v_res, slot, 1, axis=1)  # [B, H, 1, D]
        codes, scale, mn = quant_values(self.config, self.dtype, leaving)
        row, shift = packing.word_row_and_shift(t_out, c.v_bits)
        writes += [
            cc.RowWrite(codes << shift.astype(jnp.uint32)[:, None, None, None], row, "v_codes", 1, add=True,
                        keep=spill),
            cc.RowWrite(scale, t_out, "v_scale", 1, keep=spill),
            cc.RowWrite(mn, t_out, "v_min", 1, keep=spill),
            # a dead row's value is the leaving one it holds: the write then depends on the read of
            # ``leaving`` (without that, XLA copies the whole stacked v_res to keep the read before it)
            cc.RowWrite(jnp.where(live[:, None, None, None], v, leaving), at, "v_res", 1, keep=live),
        ]

        # the key flush, when some row's residual fills up (R keys quantized per-channel). Last:
        # it reads k_res (with the new key) and writes k_codes, k_scale and k_min, which no value
        # write touches, so the writes above are one run (one kernel launch on a GPU)
        flush = live_body & ((Lb + 1) % r == 0)
        n0 = jnp.where(flush, Lb + 1 - r, 0)

        def flush_writes(view):  # view: this cache with the new key in its residual
            codes, scale, mn = quant_keys(self.config, self.dtype, view.k_res[:, :, :r])
            return (*view._key_code_writes(jnp.where(flush[:, None, None, None], codes, 0), n0),
                    cc.RowWrite(scale, n0 // kg, "k_scale", 1, keep=flush),
                    cc.RowWrite(mn, n0 // kg, "k_min", 1, keep=flush))

        if self.capacity >= r:  # (else no row ever holds R body tokens: the flush's R rows do not fit the stores)
            writes.append(cc.WritesIf(jnp.any(flush), flush_writes))
        return (tuple(writes), *cc.appended(self, live, active))

    @jit_when_eager(validate=cc.check_extend)
    def extend(self, k, v, lengths=None) -> "KIVICache":
        """Appends k, v [B, Hkv, T, D]: row b its first lengths[b] tokens (None: all T), in
        order, exactly as that many :meth:`append` calls would (a row that fills up takes what
        fits and is flagged in ``overflow``), in a few writes (kivi_jax.cache_extend)."""
        return cc.apply_writes(self, *self.extend_writes(k, v, lengths))

    def extend_writes(self, k, v, lengths=None):
        """What :meth:`extend` changes, as (writes, lengths, overflow) for ``cc.apply_writes``:
        the rings' and sinks' new tokens; the values leaving the window, quantized per token,
        their words (bits added) and scale/min rows; the filled key blocks, quantized per
        channel, their words (added) and scale/min rows."""
        from kivi_jax import cache_extend as ce  # (it imports this module)

        self._check(k, v)
        e = ce.pending(self, k, v, lengths)
        c = self.config
        writes = [cc.RowsWrite(e.k, e.slot, "k_res"), cc.RowsWrite(e.v, e.slot, "v_res")]
        for field, codes, start, bits in (("v_codes", e.v_codes, e.v_start, c.v_bits),
                                          ("k_codes", e.k_codes, e.k_start, c.k_bits)):
            x, first = ce.aligned(codes, start, packing.codes_per_word(bits))
            words = packing.pack(x, bits, axis=2)
            writes.append(cc.RowsWrite(words, ce.rows_from(first, words.shape[2]), field, add=True))
        rows = ce.rows_from(e.v_start, e.v_ok.shape[1], e.v_ok)
        writes += [cc.RowsWrite(e.v_scale, rows, "v_scale"), cc.RowsWrite(e.v_min, rows, "v_min")]
        rows = ce.rows_from(e.k_start // c.key_group, e.k_ok.shape[1], e.k_ok)
        writes += [cc.RowsWrite(e.k_scale, rows, "k_scale"), cc.RowsWrite(e.k_min, rows, "k_min")]
        return writes, e.lengths, e.overflow

    def stacked_append(self, stacked: "KIVICache", layer, k, v, rare=None, active=None) -> "KIVICache":
        """``stacked`` (this cache's layers, leaves [L, ...]) with :meth:`append` applied to layer
        ``layer`` in place (``cc.apply_writes``; rare: its). With append_impl() "pallas" (and a
        shape :mod:`pallas_kernels.kivi_append` takes) the plain writes are one kernel launch that
        also quantizes the value leaving the window; the key flush stays a conditional write."""
        if append_impl() == "pallas" and kivi_append.supported(self.head_dim, self.config.group_size):
            return cc.kernel_append(KIVICache._append_kernel, self, stacked, layer, k, v, active, rare)
        return cc.apply_writes(stacked, *self.append_writes(k, v, active), layer=layer, rare=rare)

    def _append_kernel(self, stacked, layer, k, v, active):
        """``stacked`` with :meth:`append_writes`' plain writes made by pallas_kernels.kivi_append."""
        c = self.config
        fields = ("k_res", "v_res", "v_codes", "v_scale", "v_min")
        bufs = kivi_append.append(
            *(getattr(stacked, f) for f in fields), self._store(k, c.rotate_keys), self._store(v, c.rotate_values),
            cc.write_lengths(self, active), layer, residual=c.residual_length, group_size=c.group_size,
            bits=c.v_bits,
            max_length=self.max_length, quantize=token_quantizer(c.v_bits, jnp.dtype(self.dtype)),
            interpret=jax.default_backend() != "gpu")
        return dataclasses.replace(stacked, **dict(zip(fields, bufs)))

    # ---- reading ------------------------------------------------------------------------------
    def materialize(self, rotated: bool = False):
        """(K_hat, V_hat) [B, Hkv, S + Tc, D] in the cache dtype: position t is token t (sinks,
        then the body): dequantized where quantized, full precision where not. Positions >=
        lengths hold junk; attention masks them.

        rotated=False: in the original basis (a rotated store is rotated back, in full: for
        inspection and tests). rotated=True: the stored basis, what attention reads.
        """
        c = self.config
        tc = self.capacity
        t = jnp.arange(tc)
        kq = quant.dequantize_codes(packing.unpack(self.k_codes, c.k_bits, 2, tc),
                                    jnp.repeat(self.k_scale, c.key_group, axis=2),
                                    jnp.repeat(self.k_min, c.key_group, axis=2), self.dtype)
        vq = quant.dequantize_codes(packing.unpack(self.v_codes, c.v_bits, 2, tc),
                                    jnp.repeat(self.v_scale, c.group_size, axis=3),
                                    jnp.repeat(self.v_min, c.group_size, axis=3), self.dtype)
        r = c.residual_length
        k_r = jnp.take(self.k_res, t % r, axis=2)
        v_r = jnp.take(self.v_res, t % r, axis=2)
        kq_mask = (t[None, :] < self._body_quantized_keys()[:, None])[:, None, :, None]
        vq_mask = (t[None, :] < self._body_quantized_values()[:, None])[:, None, :, None]
        k_hat, v_hat = jnp.where(kq_mask, kq, k_r), jnp.where(vq_mask, vq, v_r)
        if c.sink_tokens:
            k_sink, v_sink = self.sinks()
            k_hat = jnp.concatenate([k_sink, k_hat], axis=2)
            v_hat = jnp.concatenate([v_sink, v_hat], axis=2)
        if not rotated:
            if c.rotate_keys:
                k_hat = rotation.rotate(k_hat, transpose=True).astype(self.dtype)
            if c.rotate_values:
                v_hat = rotation.rotate(v_hat, transpose=True).astype(self.dtype)
        return k_hat, v_hat


def stored(x, dtype, rotate: bool):
    """Inputs as a cache stores them: in its dtype, then (rotate) x·H rounded into it."""
    x = rounded(jnp.asarray(x), dtype)
    return rounded(rotation.rotate(x), dtype) if rotate else x


def rounded(x, dtype):
    """x cast to ``dtype``, the rounding kept wherever the result is read. XLA:GPU removes a pair
    convert(convert(x, bf16), f32) under its default xla_allow_excess_precision (openxla/xla
    #41605), so quantizing a prompt's stored values (cast to float32 again) can read their
    unrounded numbers there: codes one step off the float64 model and off what appends quantize
    (they read the rounded buffer), as a bf16 prefill on the H200 showed (pallas_kernels/NOTES.md,
    session 36; with this fix it matches there, gpu-tests-run134, at no visible step cost,
    e2e-2026-12-04-run134-paper-barrier). An optimization barrier after the
    cast keeps it apart from later ones (lax.reduce_precision would too, but flushes float16
    subnormals), also when x is already in ``dtype``: a bf16 model's k is the cast of a float32
    RoPE, which XLA may pair with the quantization's cast back just the same."""
    y = x.astype(dtype)
    return jax.lax.optimization_barrier(y) if y.dtype.itemsize < 4 else y


def quant_keys(config: KIVIConfig, dtype, k):
    """Per-channel (KIVI's keys): k [B, H, T, D] (T a multiple of Gk) -> codes [B, H, T, D],
    scale / min [B, H, T/Gk, D] in ``dtype``."""
    b, h, t, d = k.shape
    xg = k.astype(jnp.float32).reshape(b, h, t // config.key_group, config.key_group, d)
    codes, scale, mn = quant.quantize_groups(xg, config.k_bits, dtype, reduce_axis=3)
    return codes.reshape(b, h, t, d), scale[:, :, :, 0], mn[:, :, :, 0]


def quant_values(config: KIVIConfig, dtype, v):
    """Per-token (KIVI's values): v [B, H, T, D] -> codes [B, H, T, D], scale / min
    [B, H, T, D/G] in ``dtype``."""
    b, h, t, d = v.shape
    xg = v.astype(jnp.float32).reshape(b, h, t, d // config.group_size, config.group_size)
    codes, scale, mn = quant.quantize_groups(xg, config.v_bits, dtype, reduce_axis=4)
    return codes.reshape(b, h, t, d), scale[..., 0], mn[..., 0]
