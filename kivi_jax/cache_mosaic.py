"""MosaicKIVICache: KIVI-2 with the quantized tokens stored the way the Mosaic GPU kernel reads them.

The same algorithm and the same quantized numbers as :class:`~kivi_jax.cache_kivi.KIVICache`
with 2-bit keys and values, groups of 32 and D = 128 (Algorithm 1: keys per channel, flushed R
at a time; values per token, quantized as they leave the R-window; with ``KIVIConfig.rotate``
the keys and/or values stored as x·H, and with ``sink_tokens`` = S the first S tokens of a row
in full precision in ring slots R .. R + S - 1, as KIVICache stores them; the stores and the
ring's first R slots then hold the body, the tokens after the sinks), but the quantized stores
are :func:`pallas_kernels.kivi_mosaic.repack`'s layout, kept as uint32 words and scale tiles:

* ``kn`` [B, Hkv, Tc, 8] uint32: token t's key codes, 16 a word
  (:func:`pallas_kernels.kivi_mosaic.key_words`: channel 64 o + 32 s + 8 k + 2 j + e at bits
  16 e + 8 o + 2 k of word 4 s + j, each row's 16-byte halves swapped where t & 4);
* ``kt`` [B, Hkv, Tc/256 * D, 16]: key block i's tile in rows i*D .. i*D + D - 1 (channel c):
  columns 0-7 the scales of its 8 groups, 8-15 the mins;
* ``vn`` [B, Hkv, Tc/64, D * 4] uint32: chunk i (64 tokens), channel c's 4 words at 4c ..
  4c + 3: token 64 i + 32 o + 8 k + 2 j + e at bits 16 e + 8 o + 2 k of word j;
* ``vt`` [B, Hkv, Tc/128 * 64, 16]: token t's 4 scales and 4 mins in row (t // 128) * 64 +
  t % 64, columns 8e .. 8e + 7 with e = (t % 128) // 64.

The scales and mins are KIVICache's own, in the cache dtype. The ring ``k_res`` holds, in a slot
whose token is already quantized (the block of R keys flushed last, tokens [n - R, n) while
they are still in the window), that key dequantized, as ``materialize`` gives it: the window's
attention then reads every key it needs from the ring, as dense attention reads its cache,
instead of scoring the flushed keys from their codes each step. ``materialize`` and the reference
attention read it like any cache; ``kivi_jax.decode_attention`` on a GPU runs the Mosaic kernel
over the quantized tokens (kivi_jax.attention_mosaic).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from kivi_jax import cache_common as cc
from kivi_jax import packing
from kivi_jax import quant
from kivi_jax import rotation
from kivi_jax import switches
from kivi_jax.cache_kivi import KIVICache, quant_keys, quant_values, stored, token_quantizer
from kivi_jax.config import KIVIConfig
from kivi_jax.eager import jit_when_eager

from pallas_kernels import kivi_append
from pallas_kernels.kivi_mosaic import HEADS
from pallas_kernels.mosaic_layout import (CHUNK, D, GROUP, KEY_BLOCK, VALUE_BLOCK, code_bit, kernel_arrays, key_codes,
                                          key_tiles, key_words, value_codes, value_tiles, value_words)


APPEND_IMPLS = ("xla", "pallas")
#: how a stacked cache's decode append is written, read at trace time: "xla" (``append_writes``'
#: values computed in XLA, the row-writes kernel or scatters writing them), "pallas" (one kernel,
#: the leaving value quantized inside it: pallas_kernels/mosaic_append.py) or None (the default:
#: "pallas" on a GPU, "xla" elsewhere, where the kernel would run interpreted). On the H200 at the
#: paper's setting the append took 0.37-0.41 vs 0.88-0.94 ms of GPU time a 32-layer step, 11.86 vs
#: 12.87 ms wall (results/decode-step-ab-2026-12-02-run49-p330-rare-append.json). e2e's children
#: read KIVI_MOSAIC_APPEND.
APPEND_IMPL = os.environ.get("KIVI_MOSAIC_APPEND") or None


def append_impl() -> str:
    """APPEND_IMPL resolved for this backend (named error when it is not one of APPEND_IMPLS)."""
    return switches.resolve("cache_mosaic.APPEND_IMPL", APPEND_IMPL, APPEND_IMPLS, gpu="pallas", other="xla")


def check_config(config: KIVIConfig, head_dim: int) -> KIVIConfig:
    """The cases the layout holds -> config with layout "mosaic". layout "mosaic" or "auto"; KIVI-2
    (KIVIConfig(layout="mosaic") checks that itself, "auto" here); head_dim 128."""
    if config.layout not in ("mosaic", "auto"):
        raise ValueError(f"MosaicKIVICache needs KIVIConfig(layout='mosaic'); got layout={config.layout!r}")
    if config.mosaic_conflicts():
        raise ValueError("MosaicKIVICache takes KIVI-2 only; got " + "; ".join(config.mosaic_conflicts()))
    if head_dim != D:
        raise ValueError(f"MosaicKIVICache takes head_dim={D}; got head_dim={head_dim}")
    return dataclasses.replace(config, layout="mosaic")


#: KIVIConfig(layout="auto") with grouped-query attention picks the Mosaic layout from this many
#: tokens of capacity (max_length): rows of one or two 256-token steps leave the Mosaic path's
#: window and append the larger share. The Mistral-7B shape's 32-layer step at batch 64, Mosaic vs
#: token layout (dense), on the H200: 6.89 vs 6.66 ms (6.35) at 512 tokens, 6.74 vs 6.85 (6.32) at
#: 576, 6.74 vs 7.02 (6.67) at 768 (results/decode-step-ab-h200-run155-156-gqa-layouts; 7.30 vs 7.54
#: at 1024 and 7.97 vs 9.06 at 2048 in -run93, which set this at 1024 from 512 and 1024 alone); on an
#: H100 80GB 8.45 vs 8.27 (8.08) at 512, 8.25 vs 8.38 (8.12) at 576, 8.33 vs 8.60 at 640, 8.31 vs 8.67
#: at 768, 9.66 vs 10.58 at 2048 (decode-step-ab-h100-run151-154-gqa-layouts). The paper's 498 tokens,
#: batch 96, stay with the token layout; at 4352 tokens, batch 256, 42.08 vs 45.92 ms even before
#: the narrow operands (e2e-2026-12-02-run56-mistral4k).
AUTO_GQA_MIN_LENGTH = 576

#: On an H100 (its name in the device's device_kind) multi-head attention too picks the Mosaic
#: layout only from this many tokens: the Llama-2-7B shape's 32-layer step at batch 96 on an H100
#: 80GB took 11.93 ms in the Mosaic layout vs 11.49 in the token layout at 576 tokens, 12.01 vs
#: 12.27 at 640, 12.86 vs 13.84 at 768 (results/decode-step-ab-h100-run151-mha-layouts; 11.69 vs
#: 10.71 at 498 and 13.75 vs 17.07 at 1024 in -run150), where the H200 had the Mosaic layout ahead
#: at 498 already (10.44 vs 11.49 ms, e2e-2026-12-04-run125).
AUTO_MHA_MIN_LENGTH_H100 = 640


def resolve_layout(config: KIVIConfig, *, num_heads: int, num_kv_heads: int, head_dim: int, max_length: int,
                   dtype=jnp.bfloat16, devices=None) -> KIVIConfig:
    """config with layout "auto" resolved for one model's cache ("tokens" / "mosaic" returned as
    they are): "mosaic" where the Mosaic GPU kernel runs and was measured faster end to end, else
    "tokens". The Mosaic kernel runs on one Hopper GPU (compute capability 9.0: wgmma/TMA; not
    under a mesh of several devices) over a bf16 cache of plain KIVI-2 with head_dim 128 and 1, 2
    or 4 query heads a KV head. Faster: multi-head attention at every length measured on the H200
    (Llama-2-7B shape: 10.30 vs 12.09 ms steps at the paper's setting, e2e-2026-12-02-run53; 55.6
    vs 78.4 ms at 4096 tokens, batch 128, e2e-2026-12-01-run11), from AUTO_MHA_MIN_LENGTH_H100
    tokens on an H100; grouped-query attention from AUTO_GQA_MIN_LENGTH tokens.
    devices: the devices the cache will live on; default: where a new cache lands, i.e. a context
    mesh's devices (``jax.set_mesh``; ``generate(mesh=...)`` traces under one) or else JAX's
    default device (one GPU of a multi-GPU host)."""
    if config.layout != "auto":
        return config
    g = num_heads // num_kv_heads if num_kv_heads and num_heads % num_kv_heads == 0 else 0
    hopper = _one_hopper(devices)
    runs = (hopper is not None and not config.mosaic_conflicts() and head_dim == D
            and jnp.dtype(dtype) == jnp.bfloat16 and g in HEADS)
    if g == 1:
        h100 = "H100" in str(getattr(hopper, "device_kind", ""))
        faster = not h100 or max_length >= AUTO_MHA_MIN_LENGTH_H100
    else:
        faster = max_length >= AUTO_GQA_MIN_LENGTH
    return dataclasses.replace(config, layout="mosaic" if runs and faster else "tokens")


def _one_hopper(devices):
    """The GPU of compute capability 9.0 a cache on ``devices`` (None: see resolve_layout) sits
    on, if it sits on one such GPU alone; else None."""
    if devices is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and math.prod(mesh.shape.values()) > 1:  # sharded over several devices
            return None
        default = jax.config.jax_default_device  # None, a Device, or a platform name
        devices = [jax.devices(default)[0] if isinstance(default, str) else default or jax.devices()[0]]
    one = (len(devices) == 1 and devices[0].platform == "gpu"
           and getattr(devices[0], "compute_capability", None) == "9.0")
    return devices[0] if one else None


def store_capacity(config: KIVIConfig, max_length: int) -> int:
    """Tc: body tokens the stores of a cache of ``max_length`` tokens hold, the max_length - S
    tokens after the sinks rounded up to whole key blocks (the kernel's pipeline steps)."""
    return -(-(max_length - config.sink_tokens) // KEY_BLOCK) * KEY_BLOCK


def untile(kt, vt, tc):
    """Inverse of kivi_mosaic.key_tiles / value_tiles: the tiles -> plain (k_scale, k_min [..., Tc/32, D], v_scale, v_min [..., Tc, D/32]) in float32."""
    lead = kt.shape[:-2]
    tile = kt.reshape(lead + (tc // KEY_BLOCK, D, 16)).astype(jnp.float32)
    ks = jnp.swapaxes(tile[..., :8], -1, -2).reshape(lead + (tc // GROUP, D))
    km = jnp.swapaxes(tile[..., 8:], -1, -2).reshape(lead + (tc // GROUP, D))
    per = jnp.swapaxes(vt.reshape(lead + (tc // VALUE_BLOCK, CHUNK, 2, 8)), -2, -3).reshape(lead + (tc, 8))
    per = per.astype(jnp.float32)
    return ks, km, per[..., :4], per[..., 4:]


def dequantized_block(kn, kt, n0, r, dtype):
    """Keys n0 .. n0 + r - 1 of each row (n0 [B], a multiple of r; r a multiple of 32 dividing
    256) dequantized from the stores: kn [B, H, Tc, 8], kt [B, H, Tc/256 * D, 16] -> [B, H, r, D]."""
    codes = key_codes(cc.take_row(kn, n0, r, 1))  # [B, H, r, D]
    tile = cc.take_row(kt, (n0 // KEY_BLOCK) * D, D, 1)  # [B, H, D, 16]: s | m of the block's 8 groups
    col = ((n0 % KEY_BLOCK) // GROUP)[:, None] + jnp.arange(r // GROUP)[None, :]  # [B, r/32]

    def per_token(off):  # [B, H, r, D]: column off + col of the tile, each group's 32 tokens
        x = jnp.swapaxes(jnp.take_along_axis(tile, (col + off)[:, None, None, :], axis=3), 2, 3)
        return jnp.repeat(x, GROUP, axis=2)

    return quant.dequantize_codes(codes, per_token(0), per_token(8), dtype)


@cc.pytree_dataclass
class MosaicKIVICache(cc.CacheShape, cc.SinksAndWindow):
    """Buffers (Tc: the body's max_length - S tokens rounded up to 256; R = residual_length,
    S = sink_tokens): kn [B, Hkv, Tc, 8] uint32; kt [B, Hkv, Tc/256 * 128, 16]; k_res [B, Hkv,
    R + S, D]; vn [B, Hkv, Tc/64, 512] uint32; vt [B, Hkv, Tc/2, 16]; v_res [B, Hkv, R + S, D]
    (the ring, then the sinks); lengths [B] int32 (all tokens, sinks included); overflow [B]
    bool. See the module doc for the layout."""

    shape_field = "k_res"

    kn: jax.Array
    kt: jax.Array
    k_res: jax.Array
    vn: jax.Array
    vt: jax.Array
    v_res: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    config: KIVIConfig = cc.static()
    max_length: int = cc.static()

    @classmethod
    def init(cls, config: KIVIConfig, *, batch: int, num_kv_heads: int, head_dim: int, max_length: int,
             dtype=jnp.bfloat16) -> "MosaicKIVICache":
        cc.check_sizes(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, max_length=max_length)
        cc.check_init(config, KIVIConfig, max_length, dtype)
        config = check_config(config, head_dim)
        tc = store_capacity(config, max_length)
        bh, r = (batch, num_kv_heads), config.residual_length + config.sink_tokens
        return cls(kn=jnp.zeros(bh + (tc, 8), jnp.uint32), kt=jnp.zeros(bh + (tc // KEY_BLOCK * D, 16), dtype),
                   k_res=jnp.zeros(bh + (r, head_dim), dtype), vn=jnp.zeros(bh + (tc // CHUNK, D * 4), jnp.uint32),
                   vt=jnp.zeros(bh + (tc // 2, 16), dtype), v_res=jnp.zeros(bh + (r, head_dim), dtype),
                   lengths=jnp.zeros((batch,), jnp.int32), overflow=jnp.zeros((batch,), bool),
                   config=config, max_length=max_length)

    capacity = property(lambda self: self.kn.shape[2])  # body tokens the stores hold, Tc
    prefix_unit = KEY_BLOCK  # a prefix is whole key blocks (the tiles' unit)

    def prefix(self, tokens: int) -> "MosaicKIVICache":
        """A view for reading (materialize, attention) with the stores cut to their first ``tokens``
        body tokens (a multiple of KEY_BLOCK): the same numbers for every row holding at most that
        many (sinks and ring kept whole). Not for writing."""
        tokens = cc.check_prefix(self, tokens)
        return dataclasses.replace(self, kn=self.kn[:, :, :tokens], kt=self.kt[:, :, :tokens // KEY_BLOCK * D],
                                   vn=self.vn[:, :, :tokens // CHUNK], vt=self.vt[:, :, :tokens // 2])

    def _check(self, k, v, tokens=None):
        cc.check_writable(self, store_capacity(self.config, self.max_length))  # (every write checks here)
        return cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads, head_dim=self.head_dim,
                           tokens=tokens)

    def _kivi(self) -> KIVICache:
        """An empty KIVICache of the same shape: its quantization helpers (the same numbers)."""
        return KIVICache.init(dataclasses.replace(self.config, layout="tokens"), batch=self.batch_size, num_kv_heads=self.num_kv_heads,
                              head_dim=self.head_dim, max_length=self.max_length, dtype=self.dtype)

    @jit_when_eager(validate=cc.check_prefill)
    def prefill(self, k, v, lengths=None) -> "MosaicKIVICache":
        """As KIVICache.prefill (same quantized numbers), stored in this layout."""
        # (the conversion traced in place, as the prefill-memory fix was measured: no nested jit)
        return self._convert(self._kivi().prefill(k, v, lengths), self.config)

    @classmethod
    def from_kivi(cls, c: KIVICache, config: KIVIConfig | None = None) -> "MosaicKIVICache":
        """The same cache state (a plain KIVI-2 KIVICache's) in this layout. One jitted
        computation: run op by op, the codes' unpacking materialized 4 bytes a code (a 32 GiB
        transpose for 2^33 codes, out of memory on the H200: results/decode-attention-mha-run69),
        which XLA fuses away inside a jit (as in the prefill)."""
        return _from_kivi(c, check_config(config or dataclasses.replace(c.config, layout="mosaic"), c.head_dim))

    @staticmethod
    def _convert(c: KIVICache, config: KIVIConfig) -> "MosaicKIVICache":
        # the body's capacity: KIVICache rounds it to its packed blocks, this layout to 256
        tc, tk = store_capacity(config, c.max_length), c.capacity

        def pad(x, axis=2, per=1):
            return jnp.pad(x, [(0, 0)] * axis + [(0, (tc - tk) // per)] + [(0, 0)] * (x.ndim - axis - 1))

        out = MosaicKIVICache(
            kn=key_words(pad(packing.unpack(c.k_codes, 2, 2, tk))),
            kt=key_tiles(pad(c.k_scale, per=GROUP), pad(c.k_min, per=GROUP)), k_res=c.k_res,
            vn=value_words(pad(packing.unpack(c.v_codes, 2, 2, tk))), vt=value_tiles(pad(c.v_scale), pad(c.v_min)),
            v_res=c.v_res,
            lengths=c.lengths, overflow=c.overflow, config=config, max_length=c.max_length)
        # the window's flushed slots hold their keys dequantized (module doc): slot j holds token
        # m + (j - m) mod R, from the block [n - R, n) when that is below n
        r, n, mq = config.residual_length, out._body_quantized_keys(), out._body_quantized_values()
        flushed = dequantized_block(out.kn, out.kt, jnp.maximum(n - r, 0), r, out.dtype)
        t = mq[:, None] + (jnp.arange(r)[None, :] - mq[:, None]) % r  # [B, R] body positions
        # both rings' layout pinned: left free, XLA gave a stacked ring cuDNN's prompt layout [.., R, H, D]
        # and transposed it at the prefill's end, an 8 GiB copy at batch 256 x 4352 tokens that ran a
        # 4096-token batch out of memory (results/prefill-memory-run59-*: temp 9.45 vs 1.71 GiB)
        k_ring = jnp.where((t < n[:, None])[:, None, :, None], flushed, out.k_res[:, :, :r])
        k_res = cc.row_major(jnp.concatenate([k_ring, out.k_res[:, :, r:]], axis=2) if config.sink_tokens
                             else k_ring)
        return dataclasses.replace(out, k_res=k_res, v_res=cc.row_major(out.v_res))

    @jit_when_eager
    def append(self, k, v, active=None) -> "MosaicKIVICache":
        """Appends one token k, v [B, Hkv, 1, D] per row (Algorithm 1, as KIVICache.append;
        active [B] bool: only these rows append)."""
        return cc.apply_writes(self, *self.append_writes(k, v, active))

    def append_writes(self, k, v, active=None):
        """What :meth:`append` changes, as (writes, lengths, overflow) for ``cc.apply_writes``:
        the key at residual slot Lb % R (Lb = L - S, the body; a row still filling its sinks:
        sink slot R + L, and nothing else); the value leaving the window quantized into its words
        (bits added) and its tile row (added: its columns are still zero); the new value in the
        ring; a key flush (R keys: their rows of ``kn``, their columns of one ``kt`` tile, and
        the ring's keys replaced by their dequantized values)."""
        self._check(k, v, tokens=1)
        c = self.config
        r, sk = c.residual_length, c.sink_tokens
        k, v = stored(k, self.dtype, c.rotate_keys), stored(v, self.dtype, c.rotate_values)
        L = cc.write_lengths(self, active)  # (an inactive row shows as full: it writes nothing)
        # one k_res / v_res write a row: the ring slot, or sink slot R + L while the sinks fill
        live, spill, slot, at, p = kivi_append.ring_slots(L, r=r, sinks=sk, max_length=self.max_length)
        live_body, Lb = live & (L >= sk), self.body_lengths
        writes = [cc.RowWrite(k, at, "k_res", 1, keep=live)]
        leaving = cc.take_row(self.v_res, slot, 1, axis=1)  # [B, H, 1, D]: body token Lb - R
        codes, scale, mn = quant_values(self.config, self.dtype, leaving)  # [B, H, 1, D], [B, H, 1, 4]
        u = p % CHUNK  # = 32 o + 8 k + 2 j + e: in the channel's word j
        shift = code_bit(u // 32, u % 32 // 8, u % 2).astype(jnp.uint32)
        word = u % 8 // 2
        onehot = (jnp.arange(4)[None, :] == word[:, None]).astype(jnp.uint32)  # [B, 4]
        bits = (codes[:, :, 0].astype(jnp.uint32) << shift[:, None, None])[..., None] * onehot[:, None, None, :]
        sm = jnp.concatenate([scale[:, :, 0], mn[:, :, 0]], -1)  # [B, H, 8]
        e = ((p % VALUE_BLOCK) // CHUNK)[:, None, None]
        tile_row = jnp.concatenate([jnp.where(e == 0, sm, 0), jnp.where(e == 1, sm, 0)], axis=-1)  # [B, H, 16]
        writes += [
            cc.RowWrite(bits.reshape(bits.shape[:2] + (1, D * 4)), p // CHUNK, "vn", 1, add=True, keep=spill),
            cc.RowWrite(tile_row[:, :, None].astype(self.dtype), (p // VALUE_BLOCK) * CHUNK + p % CHUNK, "vt", 1,
                        add=True, keep=spill),
            cc.RowWrite(jnp.where(live[:, None, None, None], v, leaving), at, "v_res", 1, keep=live),
        ]
        flush = live_body & ((Lb + 1) % r == 0)
        n0 = jnp.where(flush, Lb + 1 - r, 0)

        def flush_writes(view):  # view: this cache with the new key in its residual
            # the ring read and rewritten in this one branch, its layout pinned: left free, XLA:GPU
            # laid the stacked ring out slot-minor for the reductions and transposed every layer's
            # ring every layer (122-174 ms steps, results/decode-step-ab-2026-12-02-p330.md, run41)
            codes, s, m = quant_keys(self.config, self.dtype, cc.row_major(view.k_res[:, :, :r]))  # [B, H, R, D], [B, H, R/32, D]
            g0 = (n0 % KEY_BLOCK) // GROUP  # the flush's first group within its tile
            col = g0[:, None] + jnp.arange(r // GROUP)[None, :]  # [B, R/32]
            onehot = jnp.arange(8)[None, None, :] == col[:, :, None]  # [B, R/32, 8]: group g -> tile column n

            def columns(x):  # [B, H, R/32, D] -> [B, H, D, 8], exactly: a select, not a one-hot dot (which
                # XLA:GPU ran in TF32, rounding a float32 cache's scales to 10 bits of mantissa)
                return jnp.sum(jnp.where(onehot[:, None, :, None, :], x[..., None], 0), axis=2)

            tile = jnp.concatenate([columns(s), columns(m)], axis=-1)
            # the ring keeps the block's keys dequantized while they stay in the window (module doc)
            k_hat = quant.dequantize_codes(codes, jnp.repeat(s, GROUP, axis=2), jnp.repeat(m, GROUP, axis=2), self.dtype)
            return (cc.RowWrite(key_words(codes), n0, "kn", 1, keep=flush),
                    cc.RowWrite(tile.astype(self.dtype), (n0 // KEY_BLOCK) * D, "kt", 1, add=True, keep=flush),
                    cc.RowWrite(cc.row_major(k_hat), jnp.zeros_like(n0), "k_res", 1, keep=flush))

        writes.append(cc.WritesIf(jnp.any(flush), flush_writes))
        return (tuple(writes), *cc.appended(self, live, active))

    @jit_when_eager(validate=cc.check_extend)
    def extend(self, k, v, lengths=None) -> "MosaicKIVICache":
        """Appends k, v [B, Hkv, T, D]: row b its first lengths[b] tokens (None: all T), in
        order, exactly as that many :meth:`append` calls would, in a few writes (as
        KIVICache.extend)."""
        return cc.apply_writes(self, *self.extend_writes(k, v, lengths))

    def extend_writes(self, k, v, lengths=None):
        """What :meth:`extend` changes, as (writes, lengths, overflow): KIVICache.extend_writes'
        numbers (kivi_jax.cache_extend.pending) in this layout. A row that fills a key block
        also gets the ring's keys replaced by the last such block's keys dequantized (as its
        flush leaves them), then only the input tokens after that block go into the ring."""
        from kivi_jax import cache_extend as ce

        self._check(k, v)
        e = ce.pending(self, k, v, lengths)
        r, kg = self.config.residual_length, self.config.key_group
        last = jnp.maximum(e.n_after - r - e.k_start, 0)  # the last filled block's first position in e.k_*
        scale, mn = (jnp.repeat(cc.take_row(x, last // kg, r // kg, 1), kg, axis=2) for x in (e.k_scale, e.k_min))
        k_hat = quant.dequantize_codes(cc.take_row(e.k_codes, last, r, 1), scale, mn, self.dtype)
        flushed = jnp.broadcast_to((e.n_after > e.k_start)[:, None], (self.batch_size, r))
        k_slot = jnp.where((e.body < 0) | (e.body >= e.n_after[:, None]), e.slot, -1)
        writes = [cc.RowsWrite(cc.row_major(k_hat), ce.rows_from(jnp.zeros_like(last), r, flushed), "k_res"),
                  cc.RowsWrite(e.k, k_slot, "k_res"), cc.RowsWrite(e.v, e.slot, "v_res")]
        key_ok = jnp.repeat(e.k_ok, kg, axis=1)
        writes.append(cc.RowsWrite(key_words(e.k_codes), ce.rows_from(e.k_start, key_ok.shape[1], key_ok), "kn"))
        (ks, km), first = zip(*(ce.aligned(x, e.k_start // GROUP, KEY_BLOCK // GROUP) for x in (e.k_scale, e.k_min)))
        tiles = key_tiles(ks, km)
        writes.append(cc.RowsWrite(tiles, ce.rows_from(first[0] * D, tiles.shape[2]), "kt", add=True))
        words, first = ce.aligned(e.v_codes, e.v_start, CHUNK)
        words = value_words(words)
        writes.append(cc.RowsWrite(words, ce.rows_from(first, words.shape[2]), "vn", add=True))
        (vs, vm), first = zip(*(ce.aligned(x, e.v_start, VALUE_BLOCK) for x in (e.v_scale, e.v_min)))
        tiles = value_tiles(vs, vm)
        writes.append(cc.RowsWrite(tiles, ce.rows_from(first[0] * CHUNK, tiles.shape[2]), "vt", add=True))
        return writes, e.lengths, e.overflow

    def stacked_append(self, stacked: "MosaicKIVICache", layer, k, v, rare=None, active=None) -> "MosaicKIVICache":
        """``stacked`` (this cache's layers, leaves [L, ...]) with :meth:`append` applied to layer
        ``layer`` in place (``cc.apply_writes``; rare: its). With append_impl() "pallas" the plain
        writes are one kernel launch that also quantizes the leaving value
        (:mod:`pallas_kernels.mosaic_append`); the key flush stays a conditional write."""
        if append_impl() == "pallas":
            return cc.kernel_append(MosaicKIVICache._append_kernel, self, stacked, layer, k, v, active, rare)
        return cc.apply_writes(stacked, *self.append_writes(k, v, active), layer=layer, rare=rare)

    def _append_kernel(self, stacked, layer, k, v, active):
        """``stacked`` with :meth:`append_writes`' plain writes made by pallas_kernels.mosaic_append."""
        from pallas_kernels import mosaic_append

        c = self.config
        bufs = mosaic_append.append(
            stacked.k_res, stacked.v_res, stacked.vn, stacked.vt, stored(k, self.dtype, c.rotate_keys),
            stored(v, self.dtype, c.rotate_values), cc.write_lengths(self, active), layer,
            max_length=self.max_length,
            quantize=token_quantizer(c.v_bits, jnp.dtype(self.dtype)), residual=c.residual_length,
            interpret=jax.default_backend() != "gpu")
        return dataclasses.replace(stacked, **dict(zip(("k_res", "v_res", "vn", "vt"), bufs)))

    def materialize(self, rotated: bool = False):
        """(K_hat, V_hat) [B, Hkv, S + Tc, D] in the cache dtype: position t is token t (the S
        sinks, then the body), dequantized where quantized, full precision where not; positions
        >= lengths hold junk. rotated: as KIVICache.materialize's (the stored basis, or rotated
        back)."""
        k_hat, v_hat = self._materialize()
        c = self.config
        if c.sink_tokens:
            k_sink, v_sink = self.sinks()
            k_hat, v_hat = jnp.concatenate([k_sink, k_hat], axis=2), jnp.concatenate([v_sink, v_hat], axis=2)
        if not rotated and c.rotate_keys:
            k_hat = rotation.rotate(k_hat, transpose=True).astype(self.dtype)
        if not rotated and c.rotate_values:
            v_hat = rotation.rotate(v_hat, transpose=True).astype(self.dtype)
        return k_hat, v_hat

    def _materialize(self):  # the stored basis
        tc, r = self.capacity, self.config.residual_length
        ks, km, vs, vm = untile(self.kt, self.vt, tc)
        kq = quant.dequantize_codes(key_codes(self.kn), jnp.repeat(ks, GROUP, axis=2), jnp.repeat(km, GROUP, axis=2),
                                    self.dtype)
        vq = quant.dequantize_codes(value_codes(self.vn), jnp.repeat(vs, GROUP, axis=3),
                                    jnp.repeat(vm, GROUP, axis=3), self.dtype)
        t = jnp.arange(tc)
        k_r, v_r = jnp.take(self.k_res, t % r, axis=2), jnp.take(self.v_res, t % r, axis=2)
        kq_mask = (t[None, :] < self._body_quantized_keys()[:, None])[:, None, :, None]
        vq_mask = (t[None, :] < self._body_quantized_values()[:, None])[:, None, :, None]
        return jnp.where(kq_mask, kq, k_r), jnp.where(vq_mask, vq, v_r)

    def kernel_arrays(self):
        """The stores as the Mosaic kernel takes them, R = B x Hkv rows (see :func:`kernel_arrays`)."""
        return kernel_arrays(self.kn, self.kt, self.vn, self.vt)


# jitted once; from_kivi checks the config outside the trace
_from_kivi = jax.jit(MosaicKIVICache._convert, static_argnums=1)
