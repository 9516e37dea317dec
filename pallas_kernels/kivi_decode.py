"""Fused Pallas (Triton) decode attention over a KIVI-packed KV cache.

One program per (batch row b, KV head h, sequence split s) walks its share of the row's
*bulk* — the leading tokens whose keys and values are both quantized, the last chunk masked
at the row's end — in chunks of ``chunk`` tokens: it unpacks key codes (packed along tokens,
:mod:`kivi_jax.packing`), scores all query heads that share KV head h at once (GQA: no
repeated K/V), runs an online softmax, unpacks value codes and accumulates p·V. It returns flash-decoding
partials (o, m, l) per split; the caller adds the R newest tokens (the full-precision value
window) and combines.

The inner loop dequantizes each chunk to a tile (code * scale + min, float32, rounded once to
the dot dtype) and uses one dot for q·K̂ᵀ and one for p·V̂ (``variant="dequant"``, the only one;
the fold / fma / mma / tv / gather formulations measured slower on the H200 and live in git
history, with their numbers in ``pallas_kernels/NOTES.md``).

Inputs (one row b and head h are selected by the BlockSpecs):
  q        [B, Hkv, M, D] float32, pre-scaled by 1/sqrt(D); M >= 16 (padded query heads)
  k_codes  [B, Hkv, Wk, D] uint32;  k_scale, k_min [B, Hkv, Tc/Gk, D]  (Gk: key_group_size)
  v_codes  [B, Hkv, Wv, D] uint32;  v_scale, v_min [B, Hkv, Tc, D/G]   (G: group_size)
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

try:  # the Triton lowering's compiler params (the default GPU lowering in jax 0.10-0.12)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

VARIANTS = ("dequant", "seq", "seq2", "seq3")  # one wrapper: a Mosaic GPU kernel would be another variant here
_NEG = -1e30  # finite "minus infinity": exp(_NEG - x) == 0 and no inf - inf


def _program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split):
    """This program's chunk range [lo, hi) (its split of the row's bulk) and the row's token
    range [start, end): tokens outside it (a sliding window's start, the last partial chunk's
    end) are masked."""
    split = pl.program_id(2)
    lo = jnp.maximum(lo_ref[()], split * chunks_per_split)
    hi = jnp.maximum(lo, jnp.minimum(hi_ref[()], (split + 1) * chunks_per_split))
    return lo, hi, start_ref[()], end_ref[()]


def _unpack_chunk(words_ref, rows, slot0, bits, slots):
    """Codes of ``slots`` consecutive 16-token slots starting at slot ``slot0`` of one block.

    words_ref [W, D]; rows: first word row of the block. Returns uint32 [16*slots, D].
    """
    w = words_ref[pl.ds(rows, 16), :]
    shifts = (bits * (slot0 + jnp.arange(slots, dtype=jnp.int32))).astype(jnp.uint32)
    mask = jnp.uint32((1 << bits) - 1)
    codes = (w[None, :, :] >> shifts[:, None, None]) & mask
    return codes.reshape(slots * 16, w.shape[-1])


def _unpack_minor(w_t, bits):
    """[D, n] uint32 words, each holding 32/bits consecutive codes -> uint32 codes [D, n*32/bits].

    Each join (stack on a new last axis) + merge stays in the thread's registers."""
    x, s = w_t, 16
    while s >= bits:
        x = jnp.stack([x, x >> jnp.uint32(s)], axis=-1)
        x = x.reshape(x.shape[0], x.shape[1] * 2)
        s //= 2
    return x & jnp.uint32((1 << bits) - 1)


def _repeat_minor(x, times):
    """[D, n] -> [D, n*times]: each column repeated ``times`` (a power of two) times, in registers."""
    while times > 1:
        x = jnp.stack([x, x], axis=-1)
        x = x.reshape(x.shape[0], x.shape[1] * 2)
        times //= 2
    return x


def _kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref,
            start_ref, end_ref, o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, key_group_size, chunk,
            chunks_per_split, compute_dtype, precision, seq=False):
    g, kg = group_size, key_group_size  # value channels per scale, key tokens per scale
    m_rows, d = q_ref.shape
    n_vgroups = d // g
    slots = chunk // 16
    k_blk, v_blk = 16 * (32 // k_bits), 16 * (32 // v_bits)  # tokens per packed block
    lo, hi, start, end = _program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split)
    q = q_ref[...].astype(compute_dtype)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)

    def key_scores(t0):  # [M, chunk]
        k_codes = _unpack_chunk(kc_ref, 16 * (t0 // k_blk), (t0 % k_blk) // 16, k_bits, slots)
        rows = max(chunk // kg, 1)  # key groups in the chunk (a chunk shorter than a group: one)
        ks = ks_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32)
        km = km_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32)
        if chunk > kg:
            ks = jnp.broadcast_to(ks[:, None, :], (rows, kg, d)).reshape(chunk, d)
            km = jnp.broadcast_to(km[:, None, :], (rows, kg, d)).reshape(chunk, d)
        k_hat = k_codes.astype(jnp.float32) * ks + km
        return dot(q, k_hat.astype(compute_dtype).T)

    def value_sum(t0, p):  # p [M, chunk] -> p·V̂ [M, D]
        v_codes = _unpack_chunk(vc_ref, 16 * (t0 // v_blk), (t0 % v_blk) // 16, v_bits, slots)
        vs = vs_ref[pl.ds(t0, chunk), :].astype(jnp.float32)  # [chunk, D/G]
        vm = vm_ref[pl.ds(t0, chunk), :].astype(jnp.float32)
        vs = jnp.broadcast_to(vs[:, :, None], (chunk, n_vgroups, g)).reshape(chunk, d)
        vm = jnp.broadcast_to(vm[:, :, None], (chunk, n_vgroups, g)).reshape(chunk, d)
        v_hat = v_codes.astype(jnp.float32) * vs + vm
        return dot(p.astype(compute_dtype), v_hat.astype(compute_dtype))

    if seq:
        def key_scores(t0):  # noqa: F811
            ck = 32 // k_bits
            if seq == 3:  # keys packed along channels: words [T, D/ck]
                codes = _unpack_minor(kc_ref[pl.ds(t0, chunk), :], k_bits)  # [chunk, D]
                rows = max(chunk // kg, 1)
                ks = ks_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32)
                km = km_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32)
                if chunk > kg:
                    ks = jnp.broadcast_to(ks[:, None, :], (rows, kg, d)).reshape(chunk, d)
                    km = jnp.broadcast_to(km[:, None, :], (rows, kg, d)).reshape(chunk, d)
                k_hat = codes.astype(jnp.float32) * ks + km
                return lax.dot_general(q, k_hat.astype(compute_dtype), (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32, precision=precision)
            w = kc_ref[pl.ds(t0 // ck, chunk // ck), :]
            codes = _unpack_minor(w.T, k_bits)  # [D, chunk]
            rows = max(chunk // kg, 1)
            ks = ks_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32).T
            km = km_ref[pl.ds(t0 // kg, rows), :].astype(jnp.float32).T
            ks, km = _repeat_minor(ks, chunk // rows), _repeat_minor(km, chunk // rows)
            k_hat = codes.astype(jnp.float32) * ks + km
            if seq == 2:
                return lax.dot_general(k_hat.astype(compute_dtype), q, (((0,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32, precision=precision).T
            return dot(q, k_hat.astype(compute_dtype))

        def value_sum(t0, p):  # noqa: F811
            cv = 32 // v_bits
            w = vc_ref[pl.ds(t0 // cv, chunk // cv), :]
            codes = _unpack_minor(w.T, v_bits)  # [D, chunk]
            vs = vs_ref[pl.ds(t0, chunk), :].astype(jnp.float32).T  # [D/G, chunk]
            vm = vm_ref[pl.ds(t0, chunk), :].astype(jnp.float32).T
            vs = jnp.broadcast_to(vs[:, None, :], (n_vgroups, g, chunk)).reshape(d, chunk)
            vm = jnp.broadcast_to(vm[:, None, :], (n_vgroups, g, chunk)).reshape(d, chunk)
            v_hat = codes.astype(jnp.float32) * vs + vm
            return dot(p.astype(compute_dtype), v_hat.astype(compute_dtype).T)

    def body(c, carry):
        m_prev, l_prev, acc = carry
        t0 = c * chunk
        tok = (t0 + jnp.arange(chunk))[None, :]
        s = jnp.where((tok >= start) & (tok < end), key_scores(t0), _NEG)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = l_prev * corr + jnp.sum(p, axis=1)
        return m_next, l_next, acc * corr[:, None] + value_sum(t0, p)

    init = (jnp.full((m_rows,), _NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
    m_i, l_i, acc = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = acc
    m_ref[...] = m_i
    l_ref[...] = l_i


@functools.partial(
    jax.jit,
    static_argnames=("k_bits", "v_bits", "group_size", "key_group_size", "chunk", "num_splits", "variant",
                     "interpret", "num_warps", "num_stages", "dot_dtype"))
def kivi_decode_partials(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lo, hi, start, end, *,
                         k_bits: int, v_bits: int, group_size: int, key_group_size: int | None = None,
                         chunk: int = 32,
                         num_splits: int = 1, variant: str = "dequant", interpret: bool = False,
                         num_warps: int = 4, num_stages: int = 2, dot_dtype: str | None = None):
    """Flash-decoding partials over chunks [lo[b], hi[b]) of each row (see module doc).

    group_size: value channels per scale/min; key_group_size: key tokens per scale/min
    (default: group_size). dot_dtype: operand dtype of the dots (default: the cache dtype).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")
    b, hkv, m_rows, d = q.shape
    kg = key_group_size or group_size
    tc = k_scale.shape[2] * kg
    if m_rows < 16 or m_rows & (m_rows - 1):
        raise ValueError(f"q rows M={m_rows} must be a power of two >= 16 (pad the query heads)")
    for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
        if (16 * 32 // bits) % chunk or chunk % 16:
            raise ValueError(f"chunk={chunk} must be a multiple of 16 dividing the {16 * 32 // bits}-token "
                             f"packed block of {name}={bits}")
    n_chunks = tc // chunk
    per_split = -(-n_chunks // num_splits)
    # dot operands: the cache's own 16-bit dtype (half the shared-memory traffic of float32
    # tiles; the reference dequantizes to that dtype too), IEEE float32 for float32 caches
    compute_dtype = jnp.dtype(dot_dtype) if dot_dtype else jnp.dtype(k_scale.dtype)
    precision = (lax.Precision.HIGHEST if k_scale.dtype == jnp.float32 else lax.Precision.DEFAULT)
    kernel = functools.partial(
        _kernel, k_bits=k_bits, v_bits=v_bits, group_size=group_size, key_group_size=kg, chunk=chunk,
        chunks_per_split=per_split, compute_dtype=compute_dtype, precision=precision,
        seq={"seq": 1, "seq2": 2, "seq3": 3}.get(variant, 0))

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
