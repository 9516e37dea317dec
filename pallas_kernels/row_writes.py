"""A decode step's cache writes in one Pallas (Triton) kernel, in place.

Appending one token changes a few slabs per (row, KV head) of the cache buffers: a key and a
value row, and for KIVI the packed code word, scale and min of the value leaving the window.
Written by XLA, each slab write into the layer-stacked, loop-carried buffers is a kernel of its
own (a scatter, plus the gathers and selects that keep the old slab of a row that writes
nothing): 13 small kernels a layer for a KIVI-2 cache, 8 for a dense one, 0.88 / 0.47 ms of a
32-layer B=96 Llama-2-7B step on the H200 (results/decode-step-ab-2026-12-01-magic-trace),
mostly launch-bound. Here one program per (row b, KV head h) does all of them.

Inputs:
  buffers  W arrays [L, B, Hkv, N_i, X_i] (read and written in place at layer ``layer``;
           [B, Hkv, N_i, X_i] without it), aliased to the outputs
  values   W arrays [B, Hkv, 1, X_i]: the slab of write i for row b, head h
  indices  W arrays [B] int32: write i puts row b's slab at position indices[i][b] of N_i
  keeps    W arrays [B] bool: rows whose keep is False write nothing
           (nor does a write whose index is outside [0, N_i) or a layer outside [0, L): dropped,
           as XLA's FILL_OR_DROP scatter drops it; Triton's stores are not bounds-checked, so an
           unmasked one would land in another row's or layer's memory)
  adds     W static bools: add the slab to what is there (packed code bits into zero bits)
Outputs: the buffers, updated. X_i must be powers of two (Triton tiles); see :func:`supported`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash import triton_params


def supported(buffers) -> bool:
    """Whether the kernel takes these buffers: every slab's minor size a power of two."""
    return all(x.shape[-1] > 0 and not x.shape[-1] & (x.shape[-1] - 1) for x in buffers)


def _kernel(layer_ref, *refs, n, adds, stacked):
    # refs: n buffers (inputs, unused: aliased), n values, n indices, n keeps, n buffers (outputs)
    values, indices, keeps, outs = refs[n:2 * n], refs[2 * n:3 * n], refs[3 * n:4 * n], refs[4 * n:]
    b, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    at = (layer, b, h) if stacked else (b, h)
    for value_ref, index_ref, keep_ref, out_ref, add in zip(values, indices, keeps, outs, adds):
        index = index_ref[()]
        slab = at + (pl.ds(index, 1), slice(None))
        inside = (index >= 0) & (index < out_ref.shape[-2])
        if stacked:
            inside &= (layer >= 0) & (layer < out_ref.shape[0])

        @pl.when((keep_ref[()] != 0) & inside)
        def _(value_ref=value_ref, out_ref=out_ref, slab=slab, add=add):
            x = value_ref[...].astype(out_ref.dtype)  # [1, X]
            out_ref[slab] = out_ref[slab] + x if add else x


@functools.partial(jax.jit, static_argnames=("adds", "interpret"))
def row_writes(buffers, values, indices, keeps, *, adds, layer=None, interpret: bool = False):
    """The buffers with every write applied (see the module doc); one launch, in place."""
    n = len(buffers)
    if not (len(values) == len(indices) == len(keeps) == len(adds) == n) or n == 0:
        raise ValueError(f"row_writes: {n} buffers need as many values, indices, keeps and adds; got "
                         f"{len(values)}, {len(indices)}, {len(keeps)}, {len(adds)}")
    lead = 3 if layer is not None else 2
    b, h = buffers[0].shape[lead - 2:lead]
    for i, (buf, x) in enumerate(zip(buffers, values)):
        if buf.ndim != lead + 2 or buf.shape[lead - 2:lead] != (b, h) or x.shape != (b, h, 1, buf.shape[-1]):
            raise ValueError(f"row_writes: write {i}: buffer {buf.shape} ({'[L, ' if layer is not None else '['}B, "
                             f"Hkv, N, X]) and value {x.shape} ([B, Hkv, 1, X]) do not fit")
    if not supported(buffers):
        raise ValueError(f"row_writes: slab sizes {[x.shape[-1] for x in buffers]} must be powers of two")
    row = pl.BlockSpec((None,), lambda i, j: (i,))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = ([pl.BlockSpec((1,), lambda i, j: (0,))] + [any_spec] * n
                + [pl.BlockSpec((None, None, 1, x.shape[-1]), lambda i, j: (i, j, 0, 0)) for x in values]
                + [row] * (2 * n))
    kernel = functools.partial(_kernel, n=n, adds=tuple(adds), stacked=layer is not None)
    return pl.pallas_call(
        kernel, grid=(b, h), in_specs=in_specs, out_specs=[any_spec] * n,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in buffers],
        input_output_aliases={1 + i: i for i in range(n)}, interpret=interpret, name="row_writes",
        **triton_params(interpret, num_warps=1, num_stages=1),
    )(jnp.reshape(0 if layer is None else layer, (1,)).astype(jnp.int32), *buffers, *values,
      *(jnp.asarray(i, jnp.int32) for i in indices), *(jnp.asarray(k).astype(jnp.int32) for k in keeps))
