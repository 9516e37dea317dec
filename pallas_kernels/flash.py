"""Flash-decoding plumbing shared by the Pallas decode kernels (:mod:`pallas_kernels.kivi_decode`,
:mod:`pallas_kernels.dense_decode`): the grid (row b, KV head h, split s) with per-row chunk
bounds, the online-softmax step, and the pallas_call that returns unnormalized partials; and
the Triton compiler parameters every kernel here passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # the Triton lowering's compiler params and masked loads (the GPU lowering in jax 0.10-0.12)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

def triton_params(interpret: bool, num_warps: int, num_stages: int) -> dict:
    """pallas_call keywords for the Triton lowering (none in interpret mode)."""
    if interpret or plgpu is None:
        return {}
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def check_layer(layer, n_layers: int) -> None:
    """A kernel's ``layer`` into a stack of ``n_layers``: an integer scalar, in [0, L) where it is
    concrete (a traced one is only clamped, :func:`clamp_layer`). Named errors: a float layer was
    truncated and an out-of-range one read past the stack (interpret mode wrapped or clamped it)."""
    dtype = getattr(layer, "dtype", None)
    integer = (isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(layer) == 0)
    if not integer:
        got = f"{dtype} array of shape {jnp.shape(layer)}" if dtype is not None else repr(layer)
        raise ValueError(f"layer must be an integer scalar in [0, L={n_layers}); got {got}")
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < n_layers:
        raise ValueError(f"layer={int(layer)} must be in [0, L={n_layers})")


def clamp_layer(layer, n_layers: int):
    """A layer as lax.dynamic_index_in_dim reads it (negative from the end, then clamped into
    [0, L)), for a kernel to apply to the layer it loads (scalar ops in the kernel, no XLA op
    a call): a traced layer cannot be checked, and on a GPU a layer past the stack reads memory
    outside it (another buffer's, or a fault)."""
    layer = jnp.asarray(layer, jnp.int32)
    return jnp.clip(jnp.where(layer < 0, layer + n_layers, layer), 0, n_layers - 1)


NEG = -1e30  # finite "minus infinity": exp(NEG - x) == 0 and no inf - inf
DOT_ROWS = 16  # a tensor-core dot's fewest rows


def query_rows(q_ref, dtype):
    """q [G, D] (this (row, KV head)'s G query heads, a power of two) -> [M, D] in ``dtype``,
    M = max(G, 16): the rows repeated up to the 16 a tensor-core dot needs, in registers (the
    caller's q and the partials stay G rows: for MHA 1/16 of the padded traffic)."""
    return repeat_rows(q_ref[...].astype(dtype), max(q_ref.shape[0], DOT_ROWS))


def repeat_rows(x, rows: int):
    """x [G, ...] -> [rows, ...] (rows a multiple of G): row r is x[r mod G], as
    :func:`query_rows` lays out the query heads (for per-head operands next to them)."""
    g = x.shape[0]
    if rows == g:
        return x
    return jnp.broadcast_to(x[None], (rows // g,) + x.shape).reshape((rows,) + x.shape[1:])


def store_partials(o_ref, m_ref, l_ref, o, m, l):
    """Writes o [M, D], m, l [M] (rows of :func:`query_rows`) as the refs' G rows: row r·G + j
    repeats query head j, and the repeats are equal (same inputs, same dots), so any one will
    do; the max over them picks one without a strided slice."""
    g, m_rows = m_ref.shape[0], m.shape[0]
    if m_rows > g:
        o = jnp.max(o.reshape(m_rows // g, g, o.shape[-1]), axis=0)
        m, l = (jnp.max(x.reshape(m_rows // g, g), axis=0) for x in (m, l))
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split, relative: bool = False):
    """This program's chunk range [lo, hi) (its split of the row's bulk) and the row's token
    range [start, end): tokens outside it (a sliding window's start, the last partial chunk's
    end) are masked. The splits partition all the cache's chunks (split s: chunks s·c .. s·c +
    c - 1, c = chunks_per_split), or with ``relative`` (a sliding window) the row's own range
    from its first chunk (lo + s·c ..; the caller sizes c so the splits cover hi - lo): a 4k
    window at 16k tokens then spreads over every split, not the quarter that holds it."""
    split = pl.program_id(2)
    if relative:
        lo = lo_ref[()] + split * chunks_per_split
        return lo, jnp.maximum(lo, jnp.minimum(hi_ref[()], lo + chunks_per_split)), start_ref[()], end_ref[()]
    lo = jnp.maximum(lo_ref[()], split * chunks_per_split)
    hi = jnp.maximum(lo, jnp.minimum(hi_ref[()], (split + 1) * chunks_per_split))
    return lo, hi, start_ref[()], end_ref[()]


def window_chunks(window: int, chunk: int, n_chunks: int) -> int:
    """The most chunks a row's tokens [start, end) touch when end - start <= window (at most
    the n_chunks there are): the span a sliding window's relative partition splits."""
    return min(n_chunks, -(-(window - 1) // chunk) + 1)


def in_range(t0, n: int, start, end):
    """[n] bool: which of tokens t0.. lie in [start, end)."""
    tok = t0 + jnp.arange(n)
    return (tok >= start) & (tok < end)


def online_softmax_step(carry, s, keep, p_dot_v, *, slots_axis: int = 1, mask_p: bool = False,
                        scale: float = 1.0, p_dtype=jnp.float32):
    """One chunk of flash-decoding. carry (m [M], l [M], acc) float32; s: the chunk's q·k products,
    [M, chunk] with acc [M, D] (``slots_axis=1``) or transposed, [chunk, M] with acc [D, M]
    (``slots_axis=0``), the scores s·scale; keep [chunk] bool: masked slots score NEG;
    p_dot_v(p) -> acc's shape, with p in ``p_dtype``.
    mask_p: also zero the masked slots' p, for a program that may see no valid slot at all
    (else exp(NEG - NEG) = 1 would count them; the bulk loops only visit chunks in range).
    scale: a static float, applied to the float32 products: the kernels take q unscaled with
    scale = 1/sqrt(D), because q/sqrt(D) rounded to a 16-bit dot operand moved bf16 outputs by up
    to 0.09 against float64 where outlier channels make q·k large, 3x the output's own rounding
    (pallas_kernels/NOTES.md, session 46); a 16-bit q itself is exact in its dtype.
    p_dtype: the p·V operand's dtype (the compute dtype): l sums p rounded to it, the weights p·V
    gets, so the output is a convex combination of the values; with p rounded in the numerator
    only, float16 values at the dtype's max came out past it, as inf."""
    m_prev, l_prev, acc = carry
    if scale != 1.0:
        s = s * scale
    lift = (lambda x: x[None, :]) if slots_axis == 1 else (lambda x: x[:, None])  # a [chunk] vector
    per_row = (lambda x: x[:, None]) if slots_axis == 1 else (lambda x: x[None, :])  # an [M] vector
    s = jnp.where(lift(keep), s, NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=slots_axis))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - per_row(m_next))
    if mask_p:
        p = jnp.where(lift(keep), p, 0.0)
    p_op = p.astype(p_dtype)
    if p_op.dtype != jnp.float32:
        p = p_op.astype(jnp.float32)
    l_next = l_prev * corr + jnp.sum(p, axis=slots_axis)
    pv = p_dot_v(p_op)
    return m_next, l_next, acc * per_row(corr) + pv


def partials_call(kernel, q, arrays, scalars, *, layer, num_splits, interpret, num_warps, num_stages, name,
                  blocked=()):
    """pallas_call of a flash-decoding ``kernel`` over grid (B, Hkv, splits): q [B, Hkv, G, D];
    ``arrays`` [B, Hkv, ...] blocked per (b, h), or whole [L, B, Hkv, ...] refs read in place
    when ``layer`` is given; ``blocked``: [B, Hkv, ...] arrays blocked per (b, h) either way;
    ``scalars``: per-row [B] int32 arrays (lo, hi, start, end, ...). The kernel takes
    (layer_ref, q_ref, *array_refs, *blocked_refs, *scalar_refs, o_ref, m_ref, l_ref) and the
    outputs are o [B, Hkv, S, G, D], m, l [B, Hkv, S, G] float32 (:func:`query_rows` and
    :func:`store_partials` inside)."""
    b, hkv, m_rows, d = q.shape
    if m_rows & (m_rows - 1):
        raise ValueError(f"q rows G={m_rows} must be a power of two (pad the query heads of a KV head)")

    def row(*tail):
        return pl.BlockSpec((None, None) + tail, lambda i, j, s: (i, j) + (0,) * len(tail))

    if layer is not None:  # whole stacked arrays: the kernel indexes (layer, b, h) itself
        array_specs = [pl.BlockSpec(memory_space=pl.ANY)] * len(arrays)
    else:
        array_specs = [row(*x.shape[2:]) for x in arrays]
    in_specs = ([pl.BlockSpec((1,), lambda i, j, s: (0,)), row(m_rows, d)] + array_specs
                + [row(*x.shape[2:]) for x in blocked] + [pl.BlockSpec((None,), lambda i, j, s: (i,))] * len(scalars))
    out_specs = [
        pl.BlockSpec((None, None, None, m_rows, d), lambda i, j, s: (i, j, s, 0, 0)),
        pl.BlockSpec((None, None, None, m_rows), lambda i, j, s: (i, j, s, 0)),
        pl.BlockSpec((None, None, None, m_rows), lambda i, j, s: (i, j, s, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, num_splits, m_rows, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, m_rows), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, m_rows), jnp.float32),
    ]
    return pl.pallas_call(
        kernel, grid=(b, hkv, num_splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name=name, **triton_params(interpret, num_warps, num_stages),
    )(jnp.reshape(0 if layer is None else layer, (1,)).astype(jnp.int32), q, *arrays, *blocked,
      *(x.astype(jnp.int32) for x in scalars))
