"""One decode token appended to a layer of a stacked token-layout KIVI cache
(``kivi_jax.KIVICache``), in one Pallas (Triton) kernel, in place.

What ``KIVICache.append_writes`` writes, but the value leaving the R-window is quantized inside
the kernel. In XLA that is half a dozen small launch-bound kernels a layer around the row-writes
kernel (the leaving value's slice, its group min/max, its codes shifted into their word, the
ring's select). The Mosaic layout has its own (``mosaic_append``, 0.37 vs 0.88 ms of a 32-layer
B=96 step on the H200); this one serves the layout every other GPU and configuration uses.
One program per (row b, KV head h), with L = lengths[b] (before the append), S sink tokens,
body length Lb = max(L - S, 0):

* k -> k_res[at], v -> v_res[at]: at = Lb % R, or sink slot R + L while L < S (a row at
  max_length writes nothing);
* the value leaving the ring (body token p = Lb - R, read from v_res[Lb % R] before v lands
  there), where the row is past its sinks and Lb >= R: quantized per token in groups of G
  channels by ``quantize`` (the caller's exact rounding, the function XLA's path uses), its codes
  added into the zero bits of word row p // c of ``v_codes`` (c = 32 // bits codes a word, code
  i = p % c at bit bits (i // 2) + 16 (i % 2): ``packing.word_row_and_shift``), its D/G scales
  and mins into row p of ``v_scale`` / ``v_min``.

The key flush (one step in R) stays with the cache (``cc.WritesIf``).

Inputs: k_res, v_res [L, B, Hkv, R + S, D], v_codes [L, B, Hkv, Tc / c, D] uint32, v_scale, v_min
[L, B, Hkv, Tc, D / G] (aliased to the outputs), k, v [B, Hkv, 1, D] (as stored: in the cache
dtype, rotated if the cache rotates), lengths [B] int32, layer (int32 scalar). G and D / G powers
of two (Triton tiles): :func:`supported`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import clamp_layer, triton_params


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def supported(head_dim: int, group_size: int) -> bool:
    """Whether the kernel takes this shape: G and D / G powers of two."""
    return head_dim % group_size == 0 and _pow2(group_size) and _pow2(head_dim // group_size)


def ring_slots(length, *, r, sinks, max_length):
    """Where a row of ``length`` tokens (before the append) writes its new token: (live: it is
    below max_length; spill: a body value leaves the R-slot ring; slot: the ring slot Lb % R,
    Lb = L - S the body, whose value leaves; dest: the slot the new k and v go to, sink slot
    R + L while the S sinks fill; p: the body token leaving). Both append kernels' arithmetic."""
    live = length < max_length
    body = jnp.maximum(length - sinks, 0)  # Lb
    slot = lax.rem(jnp.minimum(body, max_length - sinks - 1), r)  # (in range for a refused row)
    if sinks:
        spill = live & (length >= sinks) & (body >= r)
        dest = jnp.where(length < sinks, r + jnp.clip(length, 0, sinks - 1), slot)
    else:
        spill, dest = live & (body >= r), slot
    return live, spill, slot, dest, jnp.where(spill, body - r, 0)


def _kernel(layer_ref, k_ref, v_ref, len_ref, *refs, r, sinks, max_length, bits, quantize):
    kr_ref, vr_ref, vc_ref, vs_ref, vm_ref = refs[5:]  # (refs[:5]: the same buffers as inputs, aliased)
    # (a traced layer is unchecked: clamped as lax.dynamic_update_slice would, never written past the stack)
    at = (clamp_layer(layer_ref[0], kr_ref.shape[0]), pl.program_id(0), pl.program_id(1))
    live, spill, slot, dest, p = ring_slots(len_ref[()], r=r, sinks=sinks, max_length=max_length)

    @pl.when(spill)
    def _():
        leaving = vr_ref[at + (slot, slice(None), slice(None))].astype(jnp.float32)  # [D/G, G]
        codes, scale, mn = quantize(leaving)  # [D/G, G] uint32, [D/G, 1] in the cache dtype
        per_word = 32 // bits
        i = lax.rem(p, per_word)
        shift = (bits * (i // 2) + 16 * lax.rem(i, 2)).astype(jnp.uint32)
        row = at + (p // per_word, slice(None), slice(None))
        vc_ref[row] = vc_ref[row] + (codes << shift)
        vs_ref[at + (p, slice(None))] = scale[:, 0].astype(vs_ref.dtype)
        vm_ref[at + (p, slice(None))] = mn[:, 0].astype(vm_ref.dtype)

    @pl.when(live)
    def _():
        kr_ref[at + (dest, slice(None), slice(None))] = k_ref[...].astype(kr_ref.dtype)
        vr_ref[at + (dest, slice(None), slice(None))] = v_ref[...].astype(vr_ref.dtype)


def launch(kernel, name, bufs, k, v, lengths, layer, grouped, interpret):
    """One program per (row b, KV head h) of k, v [B, Hkv, 1, D]: ``kernel(layer_ref, k_ref, v_ref,
    len_ref, *bufs (in, aliased), *bufs (out))`` with k and v as [grouped] blocks (D split into
    channel groups), the buffers whole in place -> the buffers, updated."""
    b, h = k.shape[:2]
    block = pl.BlockSpec((None, None) + grouped, lambda i, j: (i, j, 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    w = len(bufs)
    return pl.pallas_call(
        kernel, grid=(b, h),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), block, block, pl.BlockSpec((None,), lambda i, j: (i,))]
        + [any_spec] * w,
        out_specs=[any_spec] * w, out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in bufs],
        input_output_aliases={4 + i: i for i in range(w)}, interpret=interpret, name=name,
        **triton_params(interpret, num_warps=1, num_stages=1),
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), k.reshape((b, h) + grouped), v.reshape((b, h) + grouped),
      lengths.astype(jnp.int32), *bufs)


@functools.partial(jax.jit, static_argnames=("residual", "group_size", "bits", "max_length", "quantize", "interpret"))
def append(k_res, v_res, v_codes, v_scale, v_min, k, v, lengths, layer, *, residual: int, group_size: int, bits: int,
           max_length: int, quantize, interpret: bool = False):
    """(k_res, v_res, v_codes, v_scale, v_min) with the token appended (module doc), written in
    place at layer ``layer``. residual: R (the buffers' slots past R are the sinks). quantize(x
    [D/G, G] float32) -> (codes [D/G, G] uint32, scale, min [D/G, 1] in the cache dtype): a
    token's values in groups of G channels, exactly as the cache quantizes."""
    lyr, b, h, rs, d = k_res.shape
    g = group_size
    if not supported(d, g):
        raise ValueError(f"append: group_size={g} and head_dim / group_size={d / g:g} must be powers of two")
    if v_res.shape != k_res.shape or k.shape != (b, h, 1, d) or v.shape != k.shape or rs < residual:
        raise ValueError(f"append: k_res, v_res [L, B, Hkv, R + S, D] (R={residual}) and k, v [B, Hkv, 1, D]; "
                         f"got {k_res.shape}, {v_res.shape}, {k.shape}, {v.shape}")
    tc = v_scale.shape[3]
    if (v_codes.shape != (lyr, b, h, -(-tc // (32 // bits)), d) or v_scale.shape != (lyr, b, h, tc, d // g)
            or v_min.shape != v_scale.shape):
        raise ValueError(f"append: v_codes [L, B, Hkv, Tc/{32 // bits}, D], v_scale and v_min [L, B, Hkv, Tc, D/G]; "
                         f"got {v_codes.shape}, {v_scale.shape}, {v_min.shape}")
    grouped = (d // g, g)
    bufs = (k_res.reshape(k_res.shape[:4] + grouped), v_res.reshape(v_res.shape[:4] + grouped),
            v_codes.reshape(v_codes.shape[:4] + grouped), v_scale, v_min)
    kernel = functools.partial(_kernel, r=residual, sinks=rs - residual, max_length=max_length, bits=bits,
                               quantize=quantize)
    out = launch(kernel, "kivi_append", bufs, k, v, lengths, layer, grouped, interpret)
    return out[0].reshape(k_res.shape), out[1].reshape(v_res.shape), out[2].reshape(v_codes.shape), out[3], out[4]
