"""One decode token appended to a layer of a stacked Mosaic-layout KIVI-2 cache, in one Pallas
(Triton) kernel, in place.

What ``kivi_jax.MosaicKIVICache.append_writes`` writes, but the value leaving the window is
quantized inside the kernel: in XLA that is a dozen small kernels a layer around the row-writes
kernel (the leaving value's slice, its group min/max, its codes, their bits in a 512-word row, its
scale/min tile row, the ring's select; 0.93 ms of a 32-layer B=96 step on the H200 against
dense's 0.28, results/decode-step-ab-2026-12-02-p330.md). One program per (row b, KV head h):

* k -> k_res[slot], v -> v_res[slot] (slot = Lb % R with Lb = L - S the row's body, after its
  S sinks; a row still filling its sinks writes sink slot R + L instead, and nothing else; a row
  at max_length writes nothing),
* the value leaving the ring (body token p = Lb - R, from v_res[slot] before v lands there), where
  Lb >= R: quantized per token in groups of 32 channels by ``quantize`` (the caller's exact
  rounding, the same function as XLA's path), its 2-bit codes added into the zero bits of row
  p // 64 of ``vn`` (channel c's word 4c + j, j = p % 8 // 2, at bit ``code_bit``), its 4 scales
  and 4 mins into the zero columns 8e .. 8e + 7 of ``vt``'s row (p // 128) * 64 + p % 64
  (e = p % 128 // 64).

The key flush (one step in R) stays with the cache (``cc.WritesIf``).

Inputs: k_res, v_res [L, B, Hkv, R + S, D], vn [L, B, Hkv, Tc/64, 4 D] uint32, vt [L, B, Hkv, Tc/2,
16] (aliased to the outputs), k, v [B, Hkv, 1, D], lengths [B] int32 (before the append), layer
(int32 scalar). D = 32 G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import clamp_layer
from pallas_kernels.kivi_append import launch, ring_slots
from pallas_kernels.mosaic_layout import CHUNK, GROUP, VALUE_BLOCK, code_bit


def _kernel(layer_ref, k_ref, v_ref, len_ref, *refs, r, sinks, max_length, quantize):
    kr_ref, vr_ref, vn_ref, vt_ref = refs[4:]  # (refs[:4]: the same buffers as inputs, aliased)
    at = (clamp_layer(layer_ref[0], kr_ref.shape[0]), pl.program_id(0), pl.program_id(1))  # (flash.clamp_layer)
    live, spill, slot, dest, p = ring_slots(len_ref[()], r=r, sinks=sinks, max_length=max_length)

    @pl.when(spill)
    def _():
        leaving = vr_ref[at + (slot, slice(None), slice(None))].astype(jnp.float32)  # [G, 32]
        codes, scale, mn = quantize(leaving)  # [G, 32] uint32, [G, 1] in the cache dtype
        u = lax.rem(p, CHUNK)
        shift = code_bit(u // 32, lax.rem(u, 32) // 8, lax.rem(u, 2)).astype(jnp.uint32)
        word = jnp.arange(4, dtype=jnp.int32)[None, None, :] == lax.rem(u, 8) // 2  # [1, 1, 4]
        row = at + (p // CHUNK, slice(None), slice(None), slice(None))  # [G, 32, 4]: channel 32 g + i's 4 words
        vn_ref[row] = vn_ref[row] + jnp.where(word, (codes << shift)[:, :, None], jnp.uint32(0))
        e = lax.rem(p, VALUE_BLOCK) // CHUNK
        col = jnp.arange(16, dtype=jnp.int32)[None, :]
        g = jnp.arange(scale.shape[0], dtype=jnp.int32)[:, None]
        tile = jnp.sum(jnp.where(col == 8 * e + g, scale.astype(jnp.float32), 0.0)
                       + jnp.where(col == 8 * e + 4 + g, mn.astype(jnp.float32), 0.0), axis=0)  # [16]
        trow = at + ((p // VALUE_BLOCK) * CHUNK + lax.rem(p, CHUNK), slice(None))
        vt_ref[trow] = vt_ref[trow] + tile.astype(vt_ref.dtype)

    @pl.when(live)
    def _():
        kr_ref[at + (dest, slice(None), slice(None))] = k_ref[...].astype(kr_ref.dtype)
        vr_ref[at + (dest, slice(None), slice(None))] = v_ref[...].astype(vr_ref.dtype)


@functools.partial(jax.jit, static_argnames=("max_length", "quantize", "residual", "interpret"))
def append(k_res, v_res, vn, vt, k, v, lengths, layer, *, max_length: int, quantize, residual: int | None = None,
           interpret: bool = False):
    """(k_res, v_res, vn, vt) with the token appended (module doc), written in place at layer
    ``layer``. quantize(x [G, 32] float32) -> (codes [G, 32] uint32, scale, min [G, 1] in the
    cache dtype): a token's values in groups of 32 channels, exactly as the cache quantizes.
    residual: R (default: all of k_res's slots; the slots past R are the sinks)."""
    lyr, b, h, rs, d = k_res.shape
    r = residual or rs
    if not 0 < r <= rs:
        raise ValueError(f"append: residual={residual} must be in 1..{rs} (k_res's slots)")
    if d % GROUP or v_res.shape != k_res.shape or k.shape != (b, h, 1, d) or v.shape != k.shape:
        raise ValueError(f"append: k_res, v_res [L, B, Hkv, R, D] (D a multiple of {GROUP}) and k, v [B, Hkv, 1, D]; "
                         f"got {k_res.shape}, {v_res.shape}, {k.shape}, {v.shape}")
    if vn.shape[:3] != (lyr, b, h) or vn.shape[4] != 4 * d or vt.shape[:3] != (lyr, b, h) or vt.shape[4] != 16:
        raise ValueError(f"append: vn [L, B, Hkv, Tc/64, 4 D] and vt [L, B, Hkv, Tc/2, 16]; got {vn.shape}, {vt.shape}")
    g = d // GROUP
    grouped = (lyr, b, h, rs, g, GROUP)
    bufs = (k_res.reshape(grouped), v_res.reshape(grouped), vn.reshape(vn.shape[:4] + (g, GROUP, 4)), vt)
    kernel = functools.partial(_kernel, r=r, sinks=rs - r, max_length=max_length, quantize=quantize)
    out = launch(kernel, "mosaic_append", bufs, k, v, lengths, layer, (g, GROUP), interpret)
    return out[0].reshape(k_res.shape), out[1].reshape(v_res.shape), out[2].reshape(vn.shape), out[3]
