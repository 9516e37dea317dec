"""Fused Pallas (Triton) decode attention over a KIVI-packed KV cache.

One program per (batch row b, KV head h, sequence split s) walks its share of the row's
*bulk* — the leading tokens whose keys and values are both quantized, the last chunk masked
at the row's end — in chunks of ``chunk`` tokens: it unpacks key codes, scores all query heads
that share KV head h at once (GQA: no repeated K/V), runs an online softmax, unpacks value
codes and accumulates p·V. With ``ring`` one split of each (row, head) also walks the
residual ring, the R newest tokens, whose values are in full precision
(:mod:`pallas_kernels.kivi_window`):
the first one, or one of its own after the bulk's (``ring_split``). It returns
flash-decoding partials (o, m, l) per split; the caller combines them.

Codes are packed 32/bits consecutive tokens to a word (:mod:`kivi_jax.packing`), so a chunk is
``chunk * bits / 32`` whole word rows [n, D], each loaded once. The inner loop transposes them
to [D, n] and unpacks every word in its thread's registers by joins (stack on a new last axis +
merge: code i of a word lands next to code i - 1), giving K^T and V^T tiles [D, chunk] with
tokens minor; it dequantizes them (code * scale + min, rounded once to the dot dtype: on a GPU
with 16-bit caches by magic numbers in inline PTX, two codes per instruction, see
:func:`_magic_fma`; else in float32 after integer->float conversions) and uses one dot for
q·K̂ᵀ and one for p·V̂ (``variant="dequant"``), or the same dots with their operands swapped,
the dequantized tiles first (``variant="swap"``: 1.33 vs 1.65 ms at B=64, T=4096, Hq=Hkv=32 on
the H200, kernel-tuning-2026-11-30; what the glue uses); the other formulations measured slower
on the H200 and live in git history, with their numbers in ``pallas_kernels/NOTES.md``).

Inputs (one row b and head h are selected by the BlockSpecs; with ``layer`` given, the six
cache arrays carry a leading [L] axis and the kernel reads layer ``layer``'s row b, head h in
place: a per-layer slice of a layer-stacked cache would be copied by XLA before the call):
  q        [B, Hkv, G, D] float32: the scores are (q·k̂)·``scale`` (the glue passes q unscaled and
           scale = 1/sqrt(D): flash.online_softmax_step says why); G a power of two (the query
           heads of KV head h, padded; repeated in registers to the 16 rows a dot needs)
  k_codes  [B, Hkv, Tc*k_bits/32, D] uint32;  k_scale, k_min [B, Hkv, Tc/Gk, D]  (Gk: key_group_size)
  v_codes  [B, Hkv, Tc*v_bits/32, D] uint32;  v_scale, v_min [B, Hkv, Tc, D/G]   (G: group_size;
           [B, Hkv, D/G, Tc] with v_scales_t=True)
  lo, hi   [B] int32: the row's bulk is chunks [lo, hi)
  start, end [B] int32: only tokens [start, end) count (a sliding window's start, 0 otherwise;
           end: where the row's quantized values stop, inside the last chunk)
Outputs: o [B, Hkv, S, G, D] f32 (unnormalized), m, l [B, Hkv, S, G] f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import kivi_window
from pallas_kernels.flash import (NEG, clamp_layer, in_range, online_softmax_step, partials_call, program_bounds,
                                  query_rows, store_partials)

# "swap": the dots' operands swapped (the dequantized tiles first, which Hopper's wgmma takes
# from registers), 19-24% faster than "dequant" on the H200 (NOTES.md). A Mosaic GPU kernel
# would be another variant here.
VARIANTS = ("dequant", "swap")
RING_SPLITS = ("first", "own")
DEQUANTS = ("auto", "magic", "convert")


def _join_minor(a, b):
    """[D, n] x 2 -> [D, 2n] with a's and b's columns interleaved (a first): a join on a new
    last axis plus a merge of the two minor axes, which stays in each thread's registers."""
    x = jnp.stack([a, b], axis=-1)
    return x.reshape(x.shape[0], x.shape[1] * 2)


def _unpack_pairs(w_t, bits):
    """[D, n] uint32 words (:mod:`kivi_jax.packing`: even codes in the low half, odd codes in
    the high half) -> [D, n*16/bits] words, element j holding codes 2j and 2j + 1 of its word's
    run at bits 0 and 16 (not masked).

    Halving shifts: after the join with ``x >> s``, element 2i + 1 holds the pair s/bits
    places after element 2i's."""
    x, s = w_t, 8
    while s >= bits:
        x = _join_minor(x, x >> jnp.uint32(s))
        s //= 2
    return x


def _unpack_minor(w_t, bits):
    """[D, n] uint32 words, each holding 32/bits consecutive codes -> codes [D, n*32/bits]."""
    x = _unpack_pairs(w_t, bits)
    return _join_minor(x, x >> jnp.uint32(16)) & jnp.uint32((1 << bits) - 1)


def _repeat_minor(x, times):
    """[D, n] -> [D, n*times]: each column repeated ``times`` (a power of two) times, in registers."""
    while times > 1:
        x = _join_minor(x, x)
        times //= 2
    return x


# Magic-number dequantization of a pair of codes at bits 0 and 16 of a word (its two halves
# are two 16-bit floats): OR-ing them under the exponent of M (128 in bfloat16, 1024 in float16,
# whose mantissa step is 1) gives the floats M + code exactly; subtracting M and one fused
# multiply-add with the (scale, min) pair round code*scale + min once, as the reference does.
# Per two codes: one LOP3, one packed sub and one packed FMA in place of two shift/extracts,
# two integer->float conversions, two FMAs and a float32->16-bit pack (pallas_kernels/NOTES.md).
_MAGIC = {"bfloat16": ("bf16x2", 0x4300), "float16": ("f16x2", 0x6400)}
MAGIC_BITS = (1, 2, 4)  # codes < 2**bits must be exact above M: 8-bit codes are not in bfloat16


def magic_supported(bits: int, dtype) -> bool:
    """Whether codes of ``bits`` bits with scales of ``dtype`` can take :func:`_magic_fma`."""
    return bits in MAGIC_BITS and jnp.dtype(dtype).name in _MAGIC


# Compiled on an H100, tiles of at most 2 code words a channel ([D, 2] words: 32 tokens of 2-bit
# keys, 16 of 4-bit) came out of _magic_fma wrong for head_dim 32 (flushed ring keys off by
# 0.2-1.1; right at D = 64, at 4 words and with "convert"): elementwise_inline_asm's pack=2 pairs
# each thread's elements in its layout's order, which for such small tiles need not be the
# (word, repeated word) pairs _repeat_minor lays out. "auto" dequantizes those tiles by conversion.
MAGIC_MIN_BITS = 4 * 32  # a tile's tokens x bits: at least 4 words a channel for "auto" to take magic


def magic_tile(tokens: int, bits: int) -> bool:
    """Whether "auto" dequantizes a tile of ``tokens`` codes of ``bits`` bits a channel by magic numbers."""
    return tokens * bits >= MAGIC_MIN_BITS


def _magic_fma(pairs, scale, mn, bits):
    """pairs [D, n] uint32 (codes 2j, 2j + 1 at bits 0 and 16: :func:`_unpack_pairs`), scale and
    min [D, 2n] in a 16-bit float dtype -> code * scale + min [D, 2n] in that dtype."""
    from jax.experimental.pallas import triton as plgpu  # GPU lowering only: never interpreted

    kind, magic = _MAGIC[scale.dtype.name]
    asm = (f"{{ .reg .b32 c, m; mov.b32 m, {magic * 0x10001:#x}; "
           f"lop3.b32 c, $1, {((1 << bits) - 1) * 0x10001:#x}, m, 0xea; "  # (word & mask) | M
           f"sub.{kind} c, c, m; fma.rn.{kind} $0, c, $3, $4; }}")
    # pack=2: one asm per element pair; the word is repeated so both elements see it
    [out] = plgpu.elementwise_inline_asm(asm, args=[_repeat_minor(pairs, 2), scale, mn], constraints="=r,r,r,r,r",
                                         pack=2, result_shape_dtypes=[jax.ShapeDtypeStruct(scale.shape, scale.dtype)])
    return out


def _dequant_t(words_t, scale, mn, bits, magic):
    """words [D, n] uint32 -> code * scale + min [D, n*32/bits]: float32, or with ``magic`` the
    scale's 16-bit dtype (rounded once)."""
    if magic:
        return _magic_fma(_unpack_pairs(words_t, bits), scale, mn, bits)
    return _unpack_minor(words_t, bits).astype(jnp.float32) * scale.astype(jnp.float32) + mn.astype(jnp.float32)


def _scales(x, magic):
    """A tile of scales or mins in the dequantization's dtype: float32, or with ``magic`` its own."""
    return x.astype(x.dtype if magic else jnp.float32)


def _words_t(words_ref, t0, chunk, bits, at=()):
    """Word rows of tokens [t0, t0 + chunk) as a [D, chunk*bits/32] tile from words [W, D]
    (``words_ref[at]``: ``at`` = (layer, b, h) for a layer-stacked ref, () for a row block)."""
    per = 32 // bits
    return words_ref[at + (pl.ds(t0 // per, chunk // per), slice(None))].T


def key_hat_t(kc_ref, ks_ref, km_ref, t0, chunk, k_bits, key_group_size, at=(), magic=False):
    """K̂ᵀ [D, chunk]: keys [t0, t0 + chunk) dequantized (code * scale + min) from the packed
    codes and the per-channel scale/min rows (``at`` as in :func:`_words_t`); float32, or the
    scales' dtype with ``magic``."""
    words = _words_t(kc_ref, t0, chunk, k_bits, at)  # loaded before the scales (the order Triton pipelines them in)
    rows = max(chunk // key_group_size, 1)  # key groups in the chunk (a chunk shorter than a group: one)
    ks, km = (_repeat_minor(_scales(x[at + (pl.ds(t0 // key_group_size, rows), slice(None))], magic).T, chunk // rows)
              for x in (ks_ref, km_ref))  # [D, chunk]
    return _dequant_t(words, ks, km, k_bits, magic)


def _kernel(layer_ref, q_ref, *refs, k_bits, v_bits, group_size, key_group_size, chunk, chunks_per_split,
            compute_dtype, precision, stacked, variant="dequant", v_scales_t=False, ring_len=0, ring_program=0,
            sink_len=0, magic=False, ring_magic=False, relative=False, scale=1.0):
    # refs: the six cache arrays [, k_res, v_res], lo, hi, start, end [, lengths, quantized
    # [, sink_lo, sink_hi]], o, m, l
    kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref = refs[:6]
    n_arrays = 8 if ring_len else 6
    ring_refs = refs[6:8]
    lo_ref, hi_ref, start_ref, end_ref = refs[n_arrays:n_arrays + 4]
    o_ref, m_ref, l_ref = refs[-3:]
    g, kg = group_size, key_group_size  # value channels per scale, key tokens per scale
    # one indexer per load (the Triton lowering takes no ref views of views)
    # (clamped as lax.dynamic_index_in_dim would: a traced layer is unchecked, and past the stack a GPU
    # reads another buffer's memory)
    at = (clamp_layer(layer_ref[0], kc_ref.shape[0]), pl.program_id(0), pl.program_id(1)) if stacked else ()
    lo, hi, start, end = program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split, relative)
    q = query_rows(q_ref, compute_dtype)  # [M, D]
    m_rows, d = q.shape
    n_vgroups = d // g
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)

    def k_hat_t(t0):  # K̂ᵀ [D, chunk] float32 (magic: the cache dtype)
        return key_hat_t(kc_ref, ks_ref, km_ref, t0, chunk, k_bits, kg, at, magic)

    def value_scales_t(x_ref, t0):  # [D/G, chunk]
        if v_scales_t:  # stored tokens-minor: no transpose
            return _scales(x_ref[at + (slice(None), pl.ds(pl.multiple_of(t0, chunk), chunk))], magic)
        return _scales(x_ref[at + (pl.ds(t0, chunk), slice(None))], magic).T

    def value_hat_t(t0):  # V̂ᵀ [D, chunk] float32 (magic: the cache dtype)
        words = _words_t(vc_ref, t0, chunk, v_bits, at)
        vs, vm = (jnp.broadcast_to(value_scales_t(x, t0)[:, None, :], (n_vgroups, g, chunk)).reshape(d, chunk)
                  for x in (vs_ref, vm_ref))  # [D, chunk]: row d has group d // G's scale
        return _dequant_t(words, vs, vm, v_bits, magic)

    # swap: the dequantized tiles are the dots' *first* operands (scoresᵀ = K̂·qᵀ, (p·V̂)ᵀ = V̂ᵀ·pᵀ),
    # which a Hopper wgmma may take from registers; only qᵀ and pᵀ (M = 16 columns) are second
    # operands, staged through shared memory. dequant: q·K̂ᵀ and p·V̂ (the tiles are second operands).
    swap = variant == "swap"
    q_t = q.T  # [D, M]

    def body(c, carry):  # acc: [M, D] (dequant) or [D, M] (swap)
        t0 = c * chunk
        keep = in_range(t0, chunk, start, end)
        if swap:  # scoresᵀ [chunk, M]; (p·V̂)ᵀ [D, M]
            s_t = dot(k_hat_t(t0).astype(compute_dtype).T, q_t)
            return online_softmax_step(carry, s_t, keep, lambda p_t: dot(value_hat_t(t0).astype(compute_dtype), p_t),
                                       slots_axis=0, scale=scale, p_dtype=compute_dtype)
        s = dot(q, k_hat_t(t0).astype(compute_dtype))  # [M, chunk]
        return online_softmax_step(carry, s, keep,
                                   lambda p: dot(p, value_hat_t(t0).astype(compute_dtype).T), scale=scale,
                                   p_dtype=compute_dtype)

    init = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((d, m_rows) if swap else (m_rows, d), jnp.float32))
    carry = lax.fori_loop(lo, hi, body, init)
    if ring_len:  # the full-precision window: split ``ring_program`` of each (row, head) walks the ring
        rc = kivi_window.ring_chunk(ring_len, chunk)
        len_ref, n_ref = refs[n_arrays + 4:n_arrays + 6]
        step = functools.partial(
            kivi_window.ring_step, q=q_t if swap else q, refs=ring_refs, at=at, lengths=len_ref[()],
            quantized=n_ref[()], start=start, r=ring_len, chunk=rc, dot=dot, compute_dtype=compute_dtype, swap=swap,
            scale=scale, key_hat_t=lambda t0: key_hat_t(kc_ref, ks_ref, km_ref, t0, rc, k_bits, kg, at, ring_magic))
        # a product, not jnp.where(first, n, 0): the Triton lowering typed that select's
        # literal operands i1 (scf.for then rejects bounds of mixed types)
        ring_here = (pl.program_id(2) == ring_program).astype(jnp.int32)
        carry = lax.fori_loop(0, ring_here * (ring_len // rc), lambda c, carry: step(pl.multiple_of(c * rc, rc), carry),
                              carry)
        if sink_len:  # the S sinks, slots R .. R + S of the same buffers, by the same program
            steps, first = kivi_window.sink_steps(sink_len)
            lo_s, hi_s = (x[()] for x in refs[n_arrays + 6:n_arrays + 8])
            sink = functools.partial(kivi_window.sink_step, q=q_t if swap else q, refs=ring_refs, at=at, lo=lo_s,
                                     hi=hi_s, r=ring_len, first=first, dot=dot, compute_dtype=compute_dtype, swap=swap,
                                     scale=scale)
            carry = lax.fori_loop(0, ring_here * steps, sink, carry)
    m_i, l_i, acc = carry
    store_partials(o_ref, m_ref, l_ref, acc.T if swap else acc, m_i, l_i)


@functools.partial(
    jax.jit,
    static_argnames=("k_bits", "v_bits", "group_size", "key_group_size", "chunk", "num_splits", "variant",
                     "interpret", "num_warps", "num_stages", "dot_dtype", "v_scales_t", "ring_len", "ring_split", "dequant",
                     "span_chunks", "sink_len", "scale"))
def kivi_decode_partials(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lo, hi, start, end, *,
                         k_bits: int, v_bits: int, group_size: int, key_group_size: int | None = None,
                         layer=None,
                         chunk: int = 64,  # the fastest measured on the H200 (what the glue passes)
                         num_splits: int = 1, variant: str = "swap", interpret: bool = False,
                         num_warps: int = 4,
                         num_stages: int = 3,  # 1.24 / 0.33 / 0.64 ms vs 1.27 / 0.36 / 0.67 at 2 (kernel-tuning-2026-11-30-run3)
                         dot_dtype: str | None = None, v_scales_t: bool = False, ring=None, ring_len: int = 0,
                         ring_split: str = "first", dequant: str = "auto", span_chunks: int = 0, sink_len: int = 0,
                         scale: float = 1.0):
    """Flash-decoding partials over chunks [lo[b], hi[b]) of each row (see module doc), and
    with ``ring`` over the residual ring too (:mod:`pallas_kernels.kivi_window`).
    span_chunks: 0 (the splits partition all the cache's chunks), or a bound on every row's
    hi - lo (a sliding window: :func:`pallas_kernels.flash.window_chunks`), which the splits
    then partition from each row's lo (``flash.program_bounds(relative=True)``).

    ring: None, or (k_res, v_res, lengths, quantized): the residual ring [B, Hkv, R', D] (or
    [L, ...] with ``layer``; slots past R are read only as sinks, with ``sink_len``), the row's
    body tokens Lb and quantized keys n [B] int32; then ``ring_len`` = R > 0 and one split of each
    (row, head) also attends the ring's R slots (``start`` masks them too): the first
    (``ring_split="first"``), or one more after the bulk's (``"own"``: S + 1 splits out).
    sink_len: 0, or the S attention sinks in slots R .. R + S of k_res / v_res, attended by the
    ring's program in steps of 16 slots (:func:`kivi_window.sink_steps`); ring then ends in
    (sink_lo, sink_hi) [B] int32: sink t is attended where sink_lo <= t < sink_hi (a sliding
    window's first token and the row's length, both absolute).

    group_size: value channels per scale/min; key_group_size: key tokens per scale/min
    (default: group_size). dot_dtype: operand dtype of the dots (default: the cache dtype).
    layer: None, or a traced int32 scalar when the six cache arrays are layer-stacked
    ([L, B, Hkv, ...]): they are then read in place at that layer. Any size: the Triton
    lowering computes a ref's element offsets in 64 bits once the array exceeds 2**32 bytes
    (tests/test_pallas_kernels.py checks the lowered IR).
    scale: the scores are (q·k̂)·scale (a static float; module doc).
    dequant: "convert" (codes to float32, code * scale + min in float32, rounded to the dot
    dtype), "magic" (16-bit caches with 1, 2 or 4 bits, compiled only: :func:`_magic_fma`,
    inline PTX, tiles of >= 4 code words a channel), or "auto": magic where it applies, tile by
    tile (the bulk's chunk, the ring's step: :func:`magic_tile`), else convert.
    v_scales_t: v_scale and v_min come tokens-minor, [B, Hkv, D/G, Tc] (a candidate cache
    layout, untimed): a thread's 16 consecutive tokens of one group are then one 32-byte run,
    which offline SASS loads with 4 LDS.128 per chunk instead of 32 LDS.U16 (NOTES.md).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")
    b, hkv, _, d = q.shape
    kg = key_group_size or group_size
    stacked = layer is not None
    cache_arrays = (k_codes, k_scale, k_min, v_codes, v_scale, v_min)
    if stacked and any(x.ndim != 5 or x.shape[1:3] != (b, hkv) for x in cache_arrays):
        raise ValueError(f"with layer=, the cache arrays must be [L, B={b}, Hkv={hkv}, ., .]; "
                         f"got {[x.shape for x in cache_arrays]}")
    tc = k_scale.shape[-2] * kg
    want = (d // group_size, tc) if v_scales_t else (tc, d // group_size)
    if v_scale.shape[-2:] != want or v_min.shape[-2:] != want:
        raise ValueError(f"v_scale and v_min must end in {want} (v_scales_t={v_scales_t}); "
                         f"got {v_scale.shape} and {v_min.shape}")
    for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
        # whole words per chunk, and a power of two dividing the 16-word block stores are rounded to
        if chunk < max(16, 32 // bits) or chunk & (chunk - 1) or (16 * 32 // bits) % chunk:
            raise ValueError(f"chunk={chunk} must be a power of two >= max(16, {32 // bits}) dividing the "
                             f"{16 * 32 // bits}-token block of {name}={bits}")
    if (ring is None) != (ring_len == 0):
        raise ValueError(f"ring and ring_len={ring_len} go together (ring_len = residual_length > 0 with a ring)")
    if ring_split not in RING_SPLITS:
        raise ValueError(f"ring_split={ring_split!r}; allowed: {RING_SPLITS}")
    if ring is not None:
        if not kivi_window.supported(ring_len, k_bits, kg, tc, chunk):
            raise ValueError(f"ring_len={ring_len} with chunk={chunk}, k_bits={k_bits}, key_group_size={kg} and "
                             f"capacity={tc}: the ring's steps (the largest power of two dividing it, at most chunk) must be >= 16 tokens of whole code words and key groups, and capacity >= it "
                             f"(see kivi_window.supported)")
        k_res, v_res = ring[:2]
        if k_res.shape != v_res.shape or k_res.shape[-2] < ring_len + sink_len or k_res.shape[-1] != d:
            raise ValueError(f"k_res and v_res must be [..., R' >= {ring_len + sink_len}, D={d}] (ring_len + sink_len); "
                             f"got {k_res.shape}, {v_res.shape}")
        if len(ring) != (6 if sink_len else 4):
            raise ValueError(f"ring must be (k_res, v_res, lengths, quantized{', sink_lo, sink_hi' if sink_len else ''}) "
                             f"with sink_len={sink_len}; got {len(ring)} items")
    if sink_len and (ring is None or not kivi_window.sinks_supported(sink_len, ring_len)):
        raise ValueError(f"sink_len={sink_len} needs a ring of ring_len={ring_len} >= "
                         f"{-kivi_window.sink_steps(sink_len)[1]} slots (its first step of "
                         f"{kivi_window.SINK_STEP} reads the ring's last ones): see kivi_window.sinks_supported")
    if dequant not in DEQUANTS:
        raise ValueError(f"dequant={dequant!r}; allowed: {DEQUANTS}")
    n_chunks = tc // chunk
    if not 0 <= span_chunks <= n_chunks:
        raise ValueError(f"span_chunks={span_chunks}; allowed: 0 (all chunks) .. n_chunks={n_chunks}")
    per_split = -(-(span_chunks or n_chunks) // num_splits)
    # dot operands: the cache's own 16-bit dtype (half the shared-memory traffic of float32
    # tiles; the reference dequantizes to that dtype too), IEEE float32 for float32 caches
    compute_dtype = jnp.dtype(dot_dtype) if dot_dtype else jnp.dtype(k_scale.dtype)
    precision = (lax.Precision.HIGHEST if k_scale.dtype == jnp.float32 else lax.Precision.DEFAULT)
    magic_ok = (all(magic_supported(bits, x.dtype) for bits, x in ((k_bits, k_scale), (v_bits, v_scale)))
                and k_scale.dtype == v_scale.dtype == compute_dtype and not interpret)
    if dequant == "magic" and not magic_ok:
        raise ValueError(f"dequant='magic' needs bits in {MAGIC_BITS} (k_bits={k_bits}, v_bits={v_bits}), "
                         f"16-bit scales of the dot dtype (scales {k_scale.dtype}/{v_scale.dtype}, dots "
                         f"{compute_dtype}) and a compiled kernel (interpret={interpret}): inline PTX")
    rc = kivi_window.ring_chunk(ring_len, chunk) if ring is not None else chunk
    tiles = ((chunk, k_bits), (chunk, v_bits)) + (((rc, k_bits),) if ring is not None else ())
    small = [f"{n} tokens x {bits} bits" for n, bits in tiles if not magic_tile(n, bits)]
    if dequant == "magic" and small:  # (wrong numbers compiled: see MAGIC_MIN_BITS)
        raise ValueError(f"dequant='magic' needs tiles of >= {MAGIC_MIN_BITS} bits a channel (4 code words); "
                         f"chunk={chunk} and ring_len={ring_len} give {', '.join(small)}: use 'auto' or 'convert'")
    bulk_magic = dequant != "convert" and magic_ok and magic_tile(chunk, k_bits) and magic_tile(chunk, v_bits)
    ring_magic = dequant != "convert" and magic_ok and magic_tile(rc, k_bits)
    kernel = functools.partial(
        _kernel, k_bits=k_bits, v_bits=v_bits, group_size=group_size, key_group_size=kg, chunk=chunk,
        chunks_per_split=per_split, compute_dtype=compute_dtype, precision=precision, stacked=stacked,
        variant=variant, v_scales_t=v_scales_t, ring_len=ring_len,
        ring_program=num_splits if ring_split == "own" else 0, sink_len=sink_len, magic=bulk_magic,
        ring_magic=ring_magic, relative=span_chunks > 0, scale=float(scale))
    arrays, scalars = cache_arrays, (lo, hi, start, end)
    if ring is not None:
        arrays, scalars = arrays + tuple(ring[:2]), scalars + tuple(ring[2:])
    grid_splits = num_splits + (ring is not None and ring_split == "own")  # the bulk gives the last one no chunk
    return partials_call(kernel, q, arrays, scalars, layer=layer, num_splits=grid_splits,
                         interpret=interpret, num_warps=num_warps, num_stages=num_stages, name=f"kivi_decode_{variant}")
