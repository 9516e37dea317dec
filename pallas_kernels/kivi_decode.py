"""Fused Pallas (Triton) decode attention over a KIVI-packed KV cache.

One program per (batch row b, KV head h, sequence split s) walks its share of the row's
*bulk* — the leading tokens whose keys and values are both quantized, the last chunk masked
at the row's end — in chunks of ``chunk`` tokens: it unpacks key codes (packed along tokens,
:mod:`kivi_jax.packing`), scores all query heads that share KV head h at once (GQA: no
repeated K/V), runs an online softmax, unpacks value codes and accumulates p·V. It returns flash-decoding
partials (o, m, l) per split; the caller adds the R newest tokens (the full-precision value
window) and combines.

Two variants of the inner loop (``variant``):

* ``"dequant"`` — dequantize each chunk to a float tile (code * scale + min) and use one
  dot for q·K̂ᵀ and one for p·V̂.
* ``"fold"`` — never build a dequantized tile: codes become floats with the exponent
  trick (code | 0x4B000000 is the float 2**23 + code, one integer op instead of a slow
  int->float conversion), the per-channel key scale is folded into q
  (q·k̂ = (q*scale)·code + q·min) and the per-token value scale into p
  (p·v̂ = (p*scale)·code + p·min, per channel group).

Inputs (one row b and head h are selected by the BlockSpecs):
  q        [B, Hkv, M, D] float32, pre-scaled by 1/sqrt(D); M >= 16 (padded query heads)
  k_codes  [B, Hkv, Wk, D] uint32;  k_scale, k_min [B, Hkv, Tc/G, D]
  v_codes  [B, Hkv, Wv, D] uint32;  v_scale, v_min [B, Hkv, Tc, D/G]
  lo, hi   [B] int32: the row's bulk is chunks [lo, hi)
  start, end [B] int32: only tokens [start, end) count (a sliding window's start, 0 otherwise;
           end: where the row's quantized values stop, inside the last chunk)
Outputs: o [B, Hkv, S, M, D] f32 (unnormalized), m, l [B, Hkv, S, M] f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import kivi_decode_fma

try:  # the Triton lowering's compiler params (the default GPU lowering in jax 0.10-0.12)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

VARIANTS = ("fma", "mma", "dequant", "fold")
BLOCK_VARIANTS = ("fma", "mma")  # walk whole packed blocks (chunk = the larger block)
_NEG = -1e30  # finite "minus infinity": exp(_NEG - x) == 0 and no inf - inf


def _codes_to_f32(codes_u32, magic: bool):
    """uint32 codes (< 2**23) -> exact float32, by conversion or by the exponent trick."""
    return kivi_decode_fma.as_float(codes_u32) if magic else codes_u32.astype(jnp.float32)


def _unpack_chunk(words_ref, rows, slot0, bits, slots, cols=None):
    """Codes of ``slots`` consecutive 16-token slots starting at slot ``slot0`` of one block.

    words_ref [W, D]; rows: first word row of the block. Returns uint32 [16*slots, D or G].
    """
    w = words_ref[pl.ds(rows, 16), :] if cols is None else words_ref[pl.ds(rows, 16), cols]
    shifts = (bits * (slot0 + jnp.arange(slots, dtype=jnp.int32))).astype(jnp.uint32)
    mask = jnp.uint32((1 << bits) - 1)
    codes = (w[None, :, :] >> shifts[:, None, None]) & mask
    return codes.reshape(slots * 16, w.shape[-1])


def _kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref,
            start_ref, end_ref, o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, chunk, chunks_per_split,
            variant, compute_dtype, precision):
    g = group_size
    m_rows, d = q_ref.shape
    n_vgroups = d // g
    slots = chunk // 16
    k_blk, v_blk = 16 * (32 // k_bits), 16 * (32 // v_bits)  # tokens per packed block
    lo, hi, start, end = kivi_decode_fma.program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split)
    q = q_ref[...].astype(jnp.float32)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)

    def key_scores(t0):
        k_codes = _unpack_chunk(kc_ref, 16 * (t0 // k_blk), (t0 % k_blk) // 16, k_bits, slots)
        if chunk >= g:
            rows = chunk // g
            ks = ks_ref[pl.ds(t0 // g, rows), :].astype(jnp.float32)
            km = km_ref[pl.ds(t0 // g, rows), :].astype(jnp.float32)
        else:
            ks = ks_ref[pl.ds(t0 // g, 1), :].astype(jnp.float32)
            km = km_ref[pl.ds(t0 // g, 1), :].astype(jnp.float32)
        if variant == "dequant":
            if chunk >= g:
                ks = jnp.broadcast_to(ks[:, None, :], (rows, g, d)).reshape(chunk, d)
                km = jnp.broadcast_to(km[:, None, :], (rows, g, d)).reshape(chunk, d)
            k_hat = _codes_to_f32(k_codes, magic=False) * ks + km
            return dot(q.astype(compute_dtype), k_hat.astype(compute_dtype).T)
        # fold: per key group r of the chunk, (q * scale_r) . code + q . min_r
        cf = _codes_to_f32(k_codes, magic=True)
        if chunk <= g:
            s = dot((q * ks).astype(compute_dtype), cf.astype(compute_dtype).T)
            return s + jnp.sum(q * km, axis=1, keepdims=True)
        # several key groups per chunk: scale the codes (one multiply) instead
        ks_e = jnp.broadcast_to(ks[:, None, :], (rows, g, d)).reshape(chunk, d)
        km_e = jnp.broadcast_to(km[:, None, :], (rows, g, d)).reshape(chunk, d)
        return dot(q.astype(compute_dtype), (cf * ks_e + km_e).astype(compute_dtype).T)

    def value_update(t0, p, accs):
        rows, slot0 = 16 * (t0 // v_blk), (t0 % v_blk) // 16
        if variant == "dequant":
            v_codes = _unpack_chunk(vc_ref, rows, slot0, v_bits, slots)
            vs = vs_ref[pl.ds(t0, chunk), :].astype(jnp.float32)  # [chunk, D/G]
            vm = vm_ref[pl.ds(t0, chunk), :].astype(jnp.float32)
            vs = jnp.broadcast_to(vs[:, :, None], (chunk, n_vgroups, g)).reshape(chunk, d)
            vm = jnp.broadcast_to(vm[:, :, None], (chunk, n_vgroups, g)).reshape(chunk, d)
            v_hat = _codes_to_f32(v_codes, magic=False) * vs + vm
            return (accs[0] + dot(p.astype(compute_dtype), v_hat.astype(compute_dtype)),)
        out = []
        for gi in range(n_vgroups):
            codes = _unpack_chunk(vc_ref, rows, slot0, v_bits, slots, cols=pl.ds(gi * g, g))
            vs = vs_ref[pl.ds(t0, chunk), pl.ds(gi, 1)].astype(jnp.float32).reshape(1, chunk)
            vm = vm_ref[pl.ds(t0, chunk), pl.ds(gi, 1)].astype(jnp.float32).reshape(1, chunk)
            pv = dot((p * vs).astype(compute_dtype), _codes_to_f32(codes, magic=True).astype(compute_dtype))
            out.append(accs[gi] + pv + jnp.sum(p * vm, axis=1, keepdims=True))
        return tuple(out)

    def body(c, carry):
        m_prev, l_prev, accs = carry
        t0 = c * chunk
        s = key_scores(t0)  # [M, chunk] float32
        tok = (t0 + jnp.arange(chunk))[None, :]
        s = jnp.where((tok >= start) & (tok < end), s, _NEG)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = l_prev * corr + jnp.sum(p, axis=1)
        accs = value_update(t0, p, tuple(a * corr[:, None] for a in accs))
        return m_next, l_next, accs

    n_acc, acc_w = (1, d) if variant == "dequant" else (n_vgroups, g)
    init = (jnp.full((m_rows,), _NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            tuple(jnp.zeros((m_rows, acc_w), jnp.float32) for _ in range(n_acc)))
    m_i, l_i, accs = lax.fori_loop(lo, hi, body, init)
    for i, a in enumerate(accs):
        o_ref[:, pl.ds(i * acc_w, acc_w)] = a
    m_ref[...] = m_i
    l_ref[...] = l_i


@functools.partial(
    jax.jit,
    static_argnames=("k_bits", "v_bits", "group_size", "chunk", "num_splits", "variant",
                     "interpret", "num_warps", "num_stages", "num_queries", "dot_dtype"))
def kivi_decode_partials(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lo, hi, start, end, *,
                         k_bits: int, v_bits: int, group_size: int, chunk: int = 64,
                         num_splits: int = 1, variant: str = "fold", interpret: bool = False,
                         num_warps: int = 4, num_stages: int = 2, num_queries: int | None = None,
                         dot_dtype: str | None = None):
    """Flash-decoding partials over chunks [lo[b], hi[b]) of each row (see module doc).

    dot_dtype: operand dtype of the dequant/fold variants' dots (default: the cache dtype).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")
    b, hkv, m_rows, d = q.shape
    tc = k_scale.shape[2] * group_size
    if variant != "fma" and (m_rows < 16 or m_rows & (m_rows - 1)):
        raise ValueError(f"q rows M={m_rows} must be a power of two >= 16 (pad the query heads)")
    for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
        if variant not in BLOCK_VARIANTS and ((16 * 32 // bits) % chunk or chunk % 16):
            raise ValueError(f"chunk={chunk} must be a multiple of 16 dividing the {16 * 32 // bits}-token "
                             f"packed block of {name}={bits}")
    if variant in BLOCK_VARIANTS:
        unit = 16 * 32 // min(k_bits, v_bits)
        if chunk != unit:
            raise ValueError(f"variant='fma' walks whole packed blocks: chunk must be {unit}, got {chunk}")
    n_chunks = tc // chunk
    per_split = -(-n_chunks // num_splits)
    # dot operands: the cache's own 16-bit dtype (half the shared-memory traffic of float32
    # tiles; the reference dequantizes to that dtype too), IEEE float32 for float32 caches
    compute_dtype = jnp.dtype(dot_dtype) if dot_dtype else jnp.dtype(k_scale.dtype)
    precision = (lax.Precision.HIGHEST if k_scale.dtype == jnp.float32 else lax.Precision.DEFAULT)
    if variant == "fma":
        if k_bits != v_bits:
            raise ValueError(f"variant='fma' needs k_bits == v_bits; got {k_bits} and {v_bits}")
        kernel = functools.partial(
            kivi_decode_fma.kernel, bits=k_bits, group_size=group_size,
            chunks_per_split=per_split, num_queries=num_queries or m_rows)
    elif variant == "mma":
        if k_bits != v_bits:
            raise ValueError(f"variant='mma' needs k_bits == v_bits; got {k_bits} and {v_bits}")
        kernel = functools.partial(
            kivi_decode_fma.kernel_mma, bits=k_bits, group_size=group_size,
            chunks_per_split=per_split, precision=precision)
    else:
      kernel = functools.partial(
        _kernel, k_bits=k_bits, v_bits=v_bits, group_size=group_size, chunk=chunk,
        chunks_per_split=per_split, variant=variant, compute_dtype=compute_dtype, precision=precision)

    def row(*tail):
        return pl.BlockSpec((None, None) + tail, lambda i, j, s: (i, j) + (0,) * len(tail))

    in_specs = [
        row(m_rows, d), row(*k_codes.shape[2:]), row(*k_scale.shape[2:]), row(*k_min.shape[2:]),
        row(*v_codes.shape[2:]), row(*v_scale.shape[2:]), row(*v_min.shape[2:]),
    ] + [pl.BlockSpec((None,), lambda i, j, s: (i,))] * 4
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
    params = {}
    if not interpret and plgpu is not None:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel, grid=(b, hkv, num_splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name=f"kivi_decode_{variant}", **params,
    )(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lo.astype(jnp.int32), hi.astype(jnp.int32),
      start.astype(jnp.int32), end.astype(jnp.int32))
