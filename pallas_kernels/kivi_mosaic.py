"""Decode attention over a 2-bit KIVI cache's quantized tokens in Mosaic GPU (Hopper wgmma).

The Triton kernel (:mod:`pallas_kernels.kivi_decode`) dequantizes each chunk into shared memory
before its dots; here the codes go to the tensor cores as they are and the scales and mins fold
into the small operands (pallas_kernels/NOTES.md, session 9-10):

- keys, per 64-token chunk: scoresᵀ [64 tokens, 16] = K̂ [64, 128] · Bk [128, 16], K̂'s codes
  packed 16 to a 32-bit word (:func:`_pack`) so that each thread's loaded words hold exactly
  its wgmma A fragments, unpacked in registers (:func:`_codes_operands`: two instructions a pair
  of codes, no shuffles). Bk's columns are q ∘ s for the 8 key groups of a 256-token block and
  q ∘ m for their mins; a token's score is column g(t) of the product plus the column sum of
  q ∘ m_g(t).
- values: (p·V̂)ᵀ [128 channels, 16] = V̂ᵀ [128, 64 tokens] · Bv [64, 16], V̂ᵀ's codes packed
  likewise over the chunk's tokens, Bv's columns p ∘ s_g (4 channel groups); Σ_t p_t m_tg from
  Bv's column sums.
- online softmax across chunks in registers; one program (one warpgroup) per (row, KV head)
  and sequence split, 256-token blocks streamed by TMA (a pipeline by hand).

One, two or four query rows a KV head, D = 128, groups of 32, 2-bit keys and values. Inputs in
the layout :func:`repack` makes (or a MosaicKIVICache stores); outputs flash-decoding partials
(o unnormalized, m, l).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import flash
# the layout (and the float64 reference), re-exported: the kernel's inputs are made there
from pallas_kernels.mosaic_layout import (CHUNK, D, GROUP, KEY_BLOCK, N, VALUE_BLOCK, WIDE, WIDE_ROWS,  # noqa: F401
                                          _per_query_row, kernel_arrays, key_codes, key_field_scale, key_tiles,
                                          key_words, reference, repack, value_codes, value_field_scale, value_tiles,
                                          value_words, words_of)
from pallas_kernels.mosaic_lanes import (_codes_operands, _key_start, _lane_alpha_scale, _lane_min_sums, _lane_pick,
                                         _lane_value_operand, _narrow_keys, _narrow_starts, _narrow_value_operand,
                                         _own_scores, _value_operand, load, narrow_value_column)

try:  # jax 0.11 registers Mosaic GPU's lowering only once this is imported
    import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401
except ImportError:  # pragma: no cover
    pass

@functools.lru_cache(maxsize=None)
def _build(rows: int, tokens: int, stages: int, splits: int = 1, heads: int = 1, group: int | None = None,
           fused: bool | None = None, compute: bool = True,
           smem_pad: int = 0, warpgroups: int = 1, key_offset: bool = False, value_offset: bool = False,
           ones_constant: bool = False, prefetch_bk: bool = False, rows_per_program: int = 1, compact_q: bool = True,
           sliding: bool = False, span: int = 0, narrow: bool | None = None, lane_softmax: bool | None = None,
           profile_dir: str = ""):
    """The kernel for R rows of T tokens, ``heads`` query rows (G) a KV head: one CTA (one
    warpgroup) a row. A pipeline step is one key block (256 tokens, four 64-token chunks). Each
    query row h gets its own Bk_h = q_h ∘ [s | m] a step and its own Bv_h, accumulators and
    online softmax; the codes' register operands are built once and shared by the G rows' wgmmas.
    The key products issue ``group`` chunks to a wgmma group (default 2 for one row, 1 for more:
    their register A operands live until its wait). Work goes by lane where the WGMMA layout
    makes a column static (:func:`_lane_pick`; 0.413 vs 0.467 ms, GQA 4 0.406 vs 0.708,
    results/mosaic-attention-run26): the key constant q_h · m_g (Bk_h's column sums across the
    warpgroup) starts the key accumulators (:func:`_key_start`), a token's score is one select
    and one shuffle from the lane holding it, picked after each wgmma group (no [64, 16] selects
    and sums across lanes), Bv and the running sums are built on the chunk's own half only
    (:func:`_value_operand`), and the value products accumulate into o itself (``ACC.init``).
    One max across the warpgroup a step and row. fused (G > 1 with narrow=False; the default
    before narrow, at GQA 4 0.85 vs 0.97 ms, results/mosaic-attention-run13): the G rows' Bk (and Bv) side by side
    in one operand, row h in columns 16h .. 16h + 15, so a chunk is one wgmma with N = 16 G
    instead of G with N = 16, and one value accumulator [128, 16 G]. A row runs ceil(n / 256)
    steps, cut into ``splits`` ranges (programs) of ceil(T / 256 / splits) steps.
    compute=False (an ablation) only streams the tiles.
    A step's key and value codes are each copied as one [64, 256] int4 box (128-byte rows, as
    they lie in memory): the keys into a raw alias (a RefUnion) of the tiled, swizzled buffer
    the loads read, which is why the stores hold the keys' swizzled image (:func:`key_words`).
    key_offset: the key operands hold 128 + 4^f c (:func:`_codes_operands` without its FMA); q's
    s columns carry 4^-f (:func:`key_field_scale`; bulk_partials scales them) and the key
    constant -128 times Bk's s column sums.
    value_offset: likewise the value operands; Bv's s columns carry 4^-f of their token
    (:func:`value_field_scale`), the running sums hold those columns as the tensor cores take
    them (bf16) and o subtracts 128 times them at the end; Σ p is summed by row on its own.
    ones_constant (G = 1): the key constant from ones · Bk on the tensor cores (as at W > 1)
    instead of a reduction across the warpgroup's warps (shared memory and a barrier a step);
    its mins then enter as bf16 products, like the scales (with the lanes, slower: 0.468 ms,
    -run26).
    The tile stream alone runs at 0.22-0.23 ms this way against 0.32 with the 32- and 16-byte
    rows of the tiles' own shapes; the kernel 0.55 against 0.58 (results/mosaic-attention-run19;
    reading the keys unswizzled instead, 2-way bank conflicts, took 0.69: -run17).
    Pallas's automatic barriers (around each shared-memory store, before each copy: 14 of a
    step's 20 warpgroup barriers) are left out (0.540 vs 0.551 ms): what a store overwrites (Bk,
    Bv) was last read by wgmmas every warp waited on before the barrier of the commit_smem that
    comes between, and each store is read only after its own commit_smem; a slot is refilled
    after one barrier (``refill``; added after that timing, not yet timed on its own).
    warpgroups (W, MHA only): W warpgroups a CTA, each its own row with its own scratch, so that
    ptxas caps the registers at 65536 / (128 W) (168 at W = 3: 12 warps an SM instead of 8). Mosaic's
    reductions across a warpgroup's warps use one scratch buffer for the whole CTA, so at W > 1
    the kernel makes none: the key constant comes from a wgmma of ones over Bk, the step's max
    from a per-warpgroup buffer read back in a layout every warp holds whole, and the epilogue's
    column sums row by row from another.
    prefetch_bk (G rows by reduction, not ones_constant): the next step's Bk and key constant are
    built while this step's last value wgmmas run (its tiles waited for there, two Bk buffers,
    the key accumulators' start carried through the loop), so that work leaves the step's chain
    of dependent phases. Correct, but within noise of the default (0.983x MHA, 1.015x GQA 4 in
    turns: results/mosaic-ab-run37-*).
    rows_per_program (K, warpgroups = 1, not with prefetch_bk; bulk_partials' default from
    :func:`default_rows_per_program`): each program
    takes K consecutive rows one after another, their steps one stream through the pipeline's
    slots, so the next row's first tiles load while this row's last steps compute and a row
    pays no launch, q load or pipeline fill of its own: at the paper's setting (B=96, about 200
    quantized tokens a row) every program runs a single step and the kernel takes 1.9 ms of a
    step for 1.9 GB (results/decode-step-ab-2026-12-02-p330.md). A row with no steps in a split
    runs one, all masked (its partial is the empty one).
    compact_q (the default but with key_offset, which scales Bk's s columns of q): q comes as
    [R, G, 128] and each step's Bk broadcasts it across its 16 columns in registers, instead of
    bulk_partials writing q broadcast, [R, G, 128, 16] (12.6 MB a layer at the paper's batch,
    0.27 ms of a 32-layer step: decode-step-ab-2026-12-02-run43). GQA 4 at B=64, T=4k: 0.267 vs
    0.376 ms (0.71x; dense 0.295), MHA 0.381 vs 0.390, in turns (results/mosaic-ab-run45-4k): the
    broadcast q tile was a [128, 16] shared-memory load per query row a step.
    narrow (G > 1; the default there but with fused=False, compact_q=False, key_offset,
    value_offset or prefetch_bk, which it does not take): a key chunk's wgmma takes only the 2 G columns its picks
    read and a value chunk's the 4 G it needs, all rows in one N = 16 operand (:func:`_narrow_keys`,
    :func:`_narrow_value_operand`) instead of the fused 16 G: at G = 4 the products are 4x
    narrower, and the kernel 0.61-0.64x the fused one's time over 4k-16k tokens (B=64, T=4k:
    0.166 vs 0.263 ms), with the same errors against the float64 reference to every printed digit
    (results/mosaic-narrow-run81).
    lane_softmax (narrow): the softmax in the key accumulator's own layout (see
    :func:`_own_scores`): no picks; masks, exps, Σ p and Σ p m_g once a thread for all G rows in
    [64, 8] arrays, one column max a step for every row's maximum; Bv's p_h, o's alpha_h and the
    mins m_g by quad shuffles (:func:`_lane_value_operand`, :func:`_lane_alpha_scale`,
    :func:`_lane_min_sums`). The default with narrow (lane_softmax=False: each row's scores picked
    from the lanes holding them, as before): 0.87x the picks' time at B=64, T=4k (0.150 vs 0.172
    ms), 0.91x at 16k, 0.88x at B=8, T=16k, in turns, with the same errors against the float64
    reference (results/mosaic-lane-run90).
    sliding (rows_per_program 1): each row attends its tokens [start, n) only, start from the
    row table (a sliding window: Mistral's); the steps wholly before start are not run, and the
    first one's tokens below start are masked. span (sliding only): the splits partition each
    row's ``span`` steps from its first one (:func:`split_bounds`) instead of all T/256 steps.
    smem_pad (an ablation): that many more bytes of shared memory a CTA, unused; with 60 KiB
    more (about 130 KiB) one CTA fits a multiprocessor instead of two, which shows how the time
    scales with the warps an SM has (registers allow two).
    profile_dir: Mosaic's profiler writes a trace of the step's named phases there
    (benchmarks/mosaic_attention.py --profile)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles, swizzle = plgpu.TilingTransform, plgpu.SwizzleTransform
    b_op = (tiles((8, N)), swizzle(2 * N))  # a [K, 16] bf16 operand / tile: 32-byte rows
    codes_op = (tiles((8, 64)), swizzle(32))  # a [64, 64] int4 A tile
    wg = plgpu.Layout.WGMMA
    every = wg.reduce(0)  # a vector each warp holds whole (WGMMA's column vector): no reduction across warps
    f32, bf16 = jnp.float32, jnp.bfloat16
    chunks = KEY_BLOCK // CHUNK  # 4 a step
    per_split = -(-(span or tokens // KEY_BLOCK) // splits)  # (as split_range's)
    half = CHUNK // 2
    group = group or (2 if heads == 1 else 1)
    if narrow is None:
        narrow = heads > 1 and fused is not False and compact_q and not (key_offset or value_offset or prefetch_bk)
    if lane_softmax is None:
        lane_softmax = narrow
    fused = heads > 1 if fused is None else fused and heads > 1
    hs = range(heads)
    # B operands / value accumulators, and their columns
    nb, nbc = (1, N) if narrow else (1, N * heads) if fused else (heads, N)

    def blk(h):  # (operand, column block) of query row h
        return (0, h) if fused else (h, 0)

    def cols(ref, h, rows=None):  # query row h's [rows (all), 16] of operand ref [nb, K, nbc]
        b, k = blk(h)
        if fused:
            return ref.at[b, slice(None) if rows is None else rows, pl.ds(N * k, N)]
        return ref.at[b] if rows is None else ref.at[b, rows]

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wg)

    def inline(fn, args, out, layouts=None, **kw):  # fn (Mosaic GPU, ctx first) on arrays, through inline_mgpu
        layouts = layouts or tuple(wg for _ in args)
        return plgpu.inline_mgpu(arg_types=layouts, return_type=out)(functools.partial(fn, **kw))(*args)

    def from_start(fn, starts, extra=()):  # fn(*accumulators, *extra refs) from `starts`, `extra` -> their ends
        def run(refs):
            fn(*refs)  # (its reads of the accumulators are dropped: run_state returns their ends)

        return list(pl.run_state(run)(tuple(plgpu.ACC.init(x) for x in starts) + tuple(extra)))

    def mgpu_out(shape, dtype, layout=wg):
        return plgpu.ShapeDtypeStruct(shape, dtype, layout=layout)

    def body(q_gmem, n_gmem, kn_gmem, kt_gmem, vn_gmem, vt_gmem, o_gmem, ml_gmem,
             q_smem, n_smem, bk_smem, bv_smem, o_smem, ml_smem, q_bar, n_bar, kn_buf, kt_buf, vn_buf, vt_buf,
             tile_bar, *extra):
        r, sp = lax.axis_index("r"), lax.axis_index("s")
        kn_buf, kn_raw = kn_buf  # a union: the keys' buffer tiled + swizzled (loads), and raw (copies)
        if multi:  # this warpgroup's row and its share of every scratch buffer
            w = lax.axis_index("wg")
            r = r * warpgroups + w
            (q_smem, n_smem, bk_smem, bv_smem, o_smem, ml_smem, q_bar, n_bar, kn_buf, kn_raw, kt_buf, vn_buf, vt_buf,
             red_smem, mc_smem) = (x.at[w] for x in (q_smem, n_smem, bk_smem, bv_smem, o_smem, ml_smem, q_bar, n_bar,
                                                    kn_buf, kn_raw, kt_buf, vn_buf, vt_buf) + tuple(extra[:2]))
            tile = lambda slot: tile_bar.at[w * stages + slot]  # noqa: E731
        else:
            tile = lambda slot: tile_bar.at[slot]  # noqa: E731
        r0 = r * rows_per_program if persist else r  # this program's (first) row
        rows_here = pl.ds(r0, rows_per_program) if persist else r
        plgpu.copy_gmem_to_smem(q_gmem.at[rows_here], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(n_gmem.at[rows_here], n_smem, n_bar)  # [32] int32 a row: Mosaic copies multiples of 128 bytes
        plgpu.barrier_wait(q_bar)
        plgpu.barrier_wait(n_bar)
        first = (0,) if persist else ()  # (rows_per_program: n and r_in below are the first row's)
        n = n_smem[first + (0,)]
        r_in = r0 + n_smem[first + (1,)]  # this row's position in the (possibly layer-stacked) cache arrays
        start = n_smem[first + (2,)] if sliding else 0  # the row's first attended token
        lo, end = split_bounds(start, sp, tokens=tokens, splits=splits, span=span)  # this program's steps [lo, hi)

        def split_steps(n):  # a row of length n's steps in this split: hi - lo (negative: none; split_range's)
            return split_end(n, end, tokens) - lo

        steps = jnp.maximum(split_steps(n), 0)
        # Only what is used: a value no op uses fails Mosaic's layout inference (jax 0.11.2's
        # backtracks over every other unknown layout first: lane_softmax's lowering never ended).
        # col: finish_rows' Σ p columns; tok: a chunk's rows, as picked
        col = iota((CHUNK, N), 1) if not (lane_softmax or multi or value_offset) else None
        tok = (plgpu.broadcasted_iota(jnp.int32, (CHUNK,), 0, layout=wg.reduce(1)) if compute and not lane_softmax
               else None)
        if value_offset and compute:  # Bv's s columns carry 4^-f of their token's field (the codes read 128 + 4^f c)
            value_scale = value_field_scale(tok)
        vrow, vcol = iota((D, N), 0), iota((D, N), 1)
        vrowb, vcolb = vrow, vcol  # over the fused columns (narrow: N of them, vcol's; fused only: nbc)
        if fused and not narrow:
            vrowb, vcolb = iota((D, nbc), 0), iota((D, nbc), 1)

        def key_constant(bk_smem, acc):  # warpgroups > 1 or ones_constant: ones [64, 128] · Bk, every row Bk's column sums
            ones = plgpu.layout_cast(jnp.full((CHUNK, D // 2), 1.0, bf16), wg)
            plgpu.wgmma(acc, ones, bk_smem.at[0, pl.ds(0, D // 2)])
            plgpu.wgmma(acc, ones, bk_smem.at[0, pl.ds(D // 2, D // 2)])
            plgpu.wgmma_wait(0)
            return acc[...]

        def q_tile(ref):  # q_h [128] -> [128, 16] float32, each channel's q across the row
            if not compact_q:  # q came broadcast (key_offset: its s columns scaled; bulk_partials)
                return load(ref, wg).astype(f32)
            return lax.broadcast_in_dim(load(ref, wg.reduce(1)).astype(f32), (D, N), (0,))

        def build_bk(kt_ref, bk_smem, q_ref=q_smem):  # Bk_h = q_h ∘ [s | m] into bk_smem -> the key accumulators' starts
            if narrow:
                return build_narrow_bk(kt_ref, bk_smem, q_ref)
            with jax.named_scope("bk"):
                kt = load(kt_ref, wg).astype(f32)  # s | m  [128, 16]
                c = []  # Bk's column sums, every row (q_h · s_g | q_h · m_g)
                for h in hs:
                    # q_h ∘ s | q_h ∘ m [128, 16] (key_offset: q's s columns carry 4^-f, bulk_partials)
                    x = q_tile(q_ref.at[h]) * kt
                    xb = x.astype(bf16)
                    cols(bk_smem, h)[...] = xb
                    if key_offset and not ones_c:  # the s columns' sums from the operand as the tensor cores take it
                        x = jnp.where(vcol < 8, xb.astype(f32), x)
                    if not ones_c:
                        c.append(lax.broadcast_in_dim(jnp.sum(x, axis=0), (CHUNK, N), (1,)))
                plgpu.commit_smem()
                if ones_c:  # every row of ones · Bk holds Bk's column sums (no reduction across warps)
                    c.append(pl.run_scoped(functools.partial(key_constant, bk_smem), plgpu.ACC((CHUNK, N), f32)))
                # each operand's key accumulators start at their rows' key constants: column g
                # q · m_g (and -128 q' · s_g with key_offset)
                start = functools.partial(_key_start, offset=key_offset)
                return ([inline(start, c, mgpu_out((CHUNK, nbc), f32))] if fused else
                        [inline(start, [c[h]], mgpu_out((CHUNK, N), f32)) for h in hs])

        @jax.named_scope("bk")
        def build_narrow_bk(kt_ref, bk_smem, q_ref):  # each chunk's Bk_u into bk_smem.at[u] -> its key accumulator's start
            qs = [load(q_ref.at[h], wg.reduce(1)).astype(f32) for h in hs]
            *bks, mk = inline(_narrow_keys, [load(kt_ref, wg), *qs],
                              tuple(mgpu_out((D, N), bf16) for _ in range(chunks)) + (mgpu_out((D, 8 * chunks), f32),),
                              layouts=(wg,) + (wg.reduce(1),) * heads)
            for u, bk in enumerate(bks):
                bk_smem.at[u][...] = bk
            plgpu.commit_smem()
            c = lax.broadcast_in_dim(jnp.sum(mk, axis=0), (CHUNK, 8 * chunks), (1,))  # the key constants, every row
            return list(inline(_narrow_starts, [c], tuple(mgpu_out((CHUNK, N), f32) for _ in range(chunks))))

        def step(j, kn_ref, kt_ref, vn_ref, vt_ref, carry, bk_smem=bk_smem, starts=None, prefetch=None, n=n,
                 q_ref=q_smem):
            # -> the carry (with prefetch: and the next step's starts, which prefetch() builds);
            # n, q_ref: the row's length and query rows
            if not compute:
                return carry
            if starts is None:
                starts = build_bk(kt_ref, bk_smem, q_ref)

            def keys(first, *accs):  # scoresᵀ [64, 16] of chunks first .. first + group, each row h
                for i, u in enumerate(range(first, first + group)):
                    a_lo, a_hi = _codes_operands(kn_ref.at[pl.ds(u * CHUNK, CHUNK)], offset=key_offset)
                    if narrow:  # chunk u's own operand
                        plgpu.wgmma(accs[i], a_lo, bk_smem.at[u, pl.ds(0, D // 2)])
                        plgpu.wgmma(accs[i], a_hi, bk_smem.at[u, pl.ds(D // 2, D // 2)])
                        continue
                    for b in range(nb):
                        plgpu.wgmma(accs[i * nb + b], a_lo, bk_smem.at[b, pl.ds(0, D // 2)])
                        plgpu.wgmma(accs[i * nb + b], a_hi, bk_smem.at[b, pl.ds(D // 2, D // 2)])
                plgpu.wgmma_wait(0)

            scores = []  # [chunk * heads + h]: chunk u's [64] scores of query row h
            with jax.named_scope("keys"):
                for first in range(0, chunks, group):
                    if narrow:  # row h's score of a token in column narrow_key_column(h, e): lane h
                        part = from_start(functools.partial(keys, first), starts[first:first + group])
                        if lane_softmax:  # each thread keeps its own row's (lane % 4)
                            scores += [mask(j, first + i, inline(_own_scores, [part[i]], mgpu_out((CHUNK, 8), f32)),
                                            n, iota((CHUNK, 8), 0)) for i in range(group)]
                            continue
                        scores += [pick(j, first + i, part[i], 0, n, lane=h) for i in range(group) for h in hs]
                        continue
                    part = from_start(functools.partial(keys, first), [starts[b] for _ in range(group) for b in range(nb)])
                    scores += [pick(j, first + i, part[i * nb + blk(h)[0]], blk(h)[1], n) for i in range(group) for h in hs]
            return softmax_and_values(j, scores, vn_ref, vt_ref, *carry, prefetch=prefetch, starts=starts)

        def pick(j, u, acc, k, n, lane=None):  # chunk u's [64] scores (column block k of acc; the constant is in), masked
            # (narrow: the scores of row ``lane`` lie in acc's columns 2 lane + e as chunk ``lane``'s
            # do in a wide block)
            s = inline(_lane_pick, [acc], mgpu_out((CHUNK,), f32, wg.reduce(1)), u=u if lane is None else lane,
                       tile=2 * k)
            return mask(j, u, s, n, tok)

        def mask(j, u, s, n, rows):  # chunk u's scores s with the tokens not attended at -inf (rows: s's token iota)
            t = j * KEY_BLOCK + u * CHUNK + rows
            return jnp.where(((t >= n) | (t < start)) if sliding else t >= n, -jnp.inf, s)

        def step_max(top):  # the max of a step's [64] scores
            if not multi:
                return jnp.max(top)
            red_smem[...] = top
            plgpu.commit_smem()  # (red_smem's last reads were before the previous step's Bv commit)
            return jnp.max(load(red_smem, every))

        def lane_operands(scores, vt_ref, m, o1, sums):
            # (lane_softmax) scores: the chunks' S [64, 8]; m [64, 8] and sums (Σ p, Σ p m_{0,1}
            # | m_{2,3}) [64, 8] each a thread's own row's; Bv into bv_smem -> (m, o1 rescaled, sums)
            (m,), (o1,), (l, mm0, mm1) = m, o1, sums
            with jax.named_scope("bv"):
                vts = [load(vt_ref.at[i], wg) for i in range(chunks // 2)]  # two chunks' s | m each
                top = lax.broadcast_in_dim(jnp.max(functools.reduce(jnp.maximum, scores), axis=0), (CHUNK, 8), (1,))
                m_new = jnp.maximum(m, top)
                alpha = jnp.exp(m - m_new)
                l, mm0, mm1 = l * alpha, mm0 * alpha, mm1 * alpha
                for u, s in enumerate(scores):
                    p = jnp.exp(s - m_new)
                    l = l + p
                    mm0, mm1 = inline(functools.partial(_lane_min_sums, u=u), [p, vts[u // 2], mm0, mm1],
                                      (mgpu_out((CHUNK, 8), f32),) * 2)
                    bv_smem.at[0, pl.ds(u * CHUNK, CHUNK)][...] = inline(
                        functools.partial(_lane_value_operand, u=u, heads=heads), [vts[u // 2], p],
                        mgpu_out((CHUNK, N), bf16))
                plgpu.commit_smem()
            scale = inline(functools.partial(_lane_alpha_scale, heads=heads), [alpha], mgpu_out((D, N), f32))
            return (m_new,), [o1 * scale], (l, mm0, mm1)

        @jax.named_scope("softmax")
        def softmax_and_values(j, scores, vn_ref, vt_ref, m, o1, mc2, ls, prefetch=None, starts=()):
            if lane_softmax:
                m, o1, mc2 = lane_operands(scores, vt_ref, m, o1, mc2)
            else:
                m, o1, mc2, ls = row_operands(scores, vt_ref, m, o1, mc2, ls)
            return values_into(vn_ref, m, o1, mc2, ls, prefetch, starts)

        def row_operands(scores, vt_ref, m, o1, mc2, ls):  # one query row at a time, each [64] score a row
            m, o1, mc2, ls = list(m), list(o1), list(mc2), list(ls)  # each a tuple over the query rows
            alpha, ps = [], {}  # (narrow: each chunk's p of every query row)
            with jax.named_scope("bv"):
                vts = [load(vt_ref.at[i], wg) for i in range(chunks // 2)]  # two chunks' s | m each
                by_row = [[scores[u * heads + h] for u in range(chunks)] for h in hs]
                tops = [functools.reduce(jnp.maximum, s) for s in by_row]
                # one reduction across the warpgroup a row (all G rows' in one reduction, git 6857c93
                # stack_max, was 1.04x slower: results/mosaic-stack-max-run84)
                maxima = [step_max(top) for top in tops]
                for h, s in zip(hs, by_row):
                    m_new = jnp.maximum(m[h], maxima[h])
                    alpha.append(jnp.exp(m[h] - m_new))
                    m[h] = m_new
                    mc2[h] = mc2[h] * alpha[h]
                    if value_offset:
                        ls[h] = ls[h] * alpha[h]
                    for u in range(chunks):
                        p = jnp.exp(s[u] - m_new)
                        if value_offset:
                            ls[h] = ls[h] + p
                            args, layouts = [p, p * value_scale, vts[u // 2], mc2[h]], (wg.reduce(1),) * 2 + (wg, wg)
                        else:
                            args, layouts = [p, vts[u // 2], mc2[h]], (wg.reduce(1), wg, wg)
                        if narrow:  # the running sums here, the rows' Bv below
                            mc2[h] = inline(functools.partial(_value_operand, sums_only=True), args,
                                            mgpu_out((CHUNK, N), f32), layouts=layouts, u=u)
                            ps.setdefault(u, []).append(p)
                            continue
                        y, mc2[h] = inline(functools.partial(_value_operand, offset=value_offset), args,
                                           (mgpu_out((CHUNK, N), bf16), mgpu_out((CHUNK, N), f32)), layouts=layouts, u=u)
                        cols(bv_smem, h, pl.ds(u * CHUNK, CHUNK))[...] = y
                for u, pu in ps.items():
                    bv_smem.at[0, pl.ds(u * CHUNK, CHUNK)][...] = inline(
                        _narrow_value_operand, [vts[u // 2], *pu], mgpu_out((CHUNK, N), bf16),
                        layouts=(wg,) + (wg.reduce(1),) * heads, u=u)
                plgpu.commit_smem()
            if narrow or fused:  # one accumulator: row h's columns (from its first) rescaled by alpha_h
                scale = alpha[0]
                for h in hs[1:]:
                    scale = jnp.where(vcolb >= (narrow_value_column(h, 0) if narrow else N * h), alpha[h], scale)
                o1 = [o1[0] * scale]
            else:
                o1 = [o1[h] * alpha[h] for h in hs]
            return m, o1, mc2, ls

        def values_into(vn_ref, m, o1, mc2, ls, prefetch, starts):  # the value products into o -> the carry
            def values(first, *refs, build_next=None):
                accs = refs[:nb]
                for u in range(first, first + group):
                    a_lo, a_hi = _codes_operands(vn_ref.at[u], offset=value_offset)
                    for b in range(nb):
                        plgpu.wgmma(accs[b], a_lo, bv_smem.at[b, pl.ds(u * CHUNK, half)])
                        plgpu.wgmma(accs[b], a_hi, bv_smem.at[b, pl.ds(u * CHUNK + half, half)])
                if build_next is not None:  # while the tensor cores work: the next step's Bk and starts
                    for ref, x in zip(refs[nb:], build_next()):
                        ref[...] = x
                plgpu.wgmma_wait(0)

            with jax.named_scope("values"):
                for first in range(0, chunks, group):
                    if prefetch is not None and first + group == chunks:
                        ends = from_start(functools.partial(values, first, build_next=prefetch), o1, starts)
                        o1, starts = ends[:nb], ends[nb:]
                    else:
                        o1 = from_start(functools.partial(values, first), o1)  # the products accumulate into o
            carry = tuple(m), tuple(o1), tuple(mc2), tuple(ls)
            return carry if prefetch is None else (carry, tuple(starts))

        # The pipeline by hand (a row's own trip count): slot i holds step i mod stages.
        def fetch(i, slot, r_in=r_in):
            bar = tile(slot)
            # the stores as [Tc / 4, 256] nibbles, a step 64 rows of each
            plgpu.copy_gmem_to_smem(kn_gmem.at[r_in, pl.ds(i * WIDE_ROWS, WIDE_ROWS)],
                                    kn_raw.at[slot].reshape(WIDE_ROWS, WIDE), bar)
            plgpu.copy_gmem_to_smem(vn_gmem.at[r_in, pl.ds(i * WIDE_ROWS, WIDE_ROWS)],
                                    vn_buf.at[slot].reshape(WIDE_ROWS, WIDE), bar)
            plgpu.copy_gmem_to_smem(kt_gmem.at[r_in, i], kt_buf.at[slot], bar)
            plgpu.copy_gmem_to_smem(vt_gmem.at[r_in, pl.ds(i * 2, 2)], vt_buf.at[slot], bar)

        for i in range(0 if persist else min(stages, per_split)):
            pl.when(i < steps)(functools.partial(fetch, lo + i, i))

        def loop(i, carry):  # i: the step within this split
            slot = lax.rem(i, stages)
            if prefetching:  # this step's tiles were waited for, its Bk and starts built, in the step before
                carry, starts = carry
                nxt = lax.rem(i + 1, stages)

                def prefetch():  # (the last step builds from a slot no copy fills: unused)
                    pl.when(i + 1 < steps)(lambda: plgpu.barrier_wait(tile(nxt)))
                    return build_bk(kt_buf.at[nxt], bk_smem.at[lax.rem(i + 1, 2)])

                carry = step(lo + i, kn_buf.at[slot], kt_buf.at[slot], vn_buf.at[slot], vt_buf.at[slot], carry,
                             bk_smem=bk_smem.at[lax.rem(i, 2)], starts=list(starts), prefetch=prefetch)
            else:
                with jax.named_scope("tma_wait"):
                    plgpu.barrier_wait(tile(slot))
                carry = step(lo + i, kn_buf.at[slot], kt_buf.at[slot], vn_buf.at[slot], vt_buf.at[slot], carry)
            pl.when(i + stages < steps)(lambda: refill(lo + i + stages, slot))
            return carry

        def refill(i, slot, r_in=r_in):
            # Every warp has read the slot (its wgmmas waited on took the codes from registers
            # loaded from it) before one thread's copies overwrite it: one barrier, where Pallas's
            # automatic ones put one before each of the four copies.
            plgpu.commit_smem()
            fetch(i, slot, r_in)

        zeros = plgpu.layout_cast(jnp.zeros((D, nbc), f32), wg)
        if lane_softmax:  # m and the sums [64, 8], a thread's own query row's (lane_operands)
            zeros8 = plgpu.layout_cast(jnp.zeros((CHUNK, 8), f32), wg)
            carry = ((zeros8 - 1e30,), (zeros,), (zeros8,) * 3, ())
        else:
            zeros_c = plgpu.layout_cast(jnp.zeros((CHUNK, N), f32), wg)
            # m starts as a traced value: jax 0.11.2's Mosaic takes no literal through the loop
            m0 = (n * 0).astype(f32) - 1e30
            # Σ p by row (value_offset)
            ls0 = (plgpu.layout_cast(jnp.zeros((CHUNK,), f32), wg.reduce(1)),) * heads if value_offset else ()
            carry = ((m0,) * heads, (zeros,) * nb, (zeros_c,) * heads, ls0)
        empty = carry  # a row's partial before its first step
        if prefetching:  # the first step's tiles and Bk (a split with no steps builds from nothing: unused)
            pl.when(steps > 0)(lambda: plgpu.barrier_wait(tile(0)))
            carry = carry, tuple(build_bk(kt_buf.at[0], bk_smem.at[0]))

        def finish(m, o1, mc2, ls, r_out):  # a row's partials (o, m, l) -> its outputs [r_out, sp]
            if lane_softmax:
                finish_lanes(m, o1, mc2)
            else:
                finish_rows(m, o1, mc2, ls)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[r_out, sp])
            plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[r_out, sp])

        def finish_rows(m, o1, mc2, ls):  # the partials into o_smem and ml_smem, a query row at a time
            g = vrow // GROUP
            for h in hs:
                if multi:  # column sums row by row from shared memory (no reduction across warps)
                    mc_smem[...] = mc2[h]
                    plgpu.commit_smem()
                    sums = lax.fori_loop(0, CHUNK, lambda i, a: a + load(mc_smem.at[i], every),
                                         plgpu.layout_cast(jnp.zeros((N,), f32), every))
                    mc = lax.broadcast_in_dim(sums, (D, N), (1,))
                    l = jnp.sum(jnp.where(plgpu.broadcasted_iota(jnp.int32, (N,), 0, layout=every) % 8 == 0, sums, 0.0))
                else:
                    mc = lax.broadcast_in_dim(jnp.sum(mc2[h], axis=0), (D, N), (1,))  # by column, over the tokens
                    # Σ p: columns 0 and 8 (each its half's chunks); value_offset: the row sums ls
                    l = jnp.sum(ls[h]) if value_offset else jnp.sum(jnp.sum(jnp.where(col % 8 == 0, mc2[h], 0.0), axis=1))
                # Σ p m of g's two halves; value_offset: less 128 Σ p s 4^-f (the offset's product)
                own_cols = (vcol == g) | (vcol == g + 8) if value_offset or not fused else None
                mc = jnp.where((vcol == g + 4) | (vcol == g + 12), mc, jnp.where(own_cols, -128.0 * mc, 0.0)
                               if value_offset else 0.0)
                if narrow:
                    o_smem.at[h][...] = (jnp.sum(jnp.where(vcol == narrow_value_column(h, g), o1[0], 0.0), axis=1)
                                         + jnp.sum(mc, axis=1))
                elif fused:
                    gb = N * h + vrowb // GROUP  # row h's column block
                    o_smem.at[h][...] = (jnp.sum(jnp.where((vcolb == gb) | (vcolb == gb + 8), o1[0], 0.0), axis=1)
                                         + jnp.sum(mc, axis=1))
                else:
                    o_smem.at[h][...] = jnp.sum(jnp.where(own_cols, o1[h], 0.0) + mc, axis=1)  # [128]
                ml_smem.at[h, 0][...] = jnp.sum(jnp.where(vcol == 0, m[h], 0.0), axis=1)  # m down the row
                ml_smem.at[h, 1][...] = jnp.sum(jnp.where(vcol == 0, l, 0.0), axis=1)

        def finish_lanes(m, o1, sums):  # (lane_softmax) column h of the [64, 8] carries' totals is row h's
            col8, g8 = iota((D, 8), 1), iota((D, 8), 0) // GROUP

            def totals(x, reduce):  # [64, 8] -> [D, 8], every row the column totals over the tokens
                return lax.broadcast_in_dim(reduce(x, axis=0), (D, 8), (1,))

            (m,), (o1,), (l, mm0, mm1) = m, o1, sums
            mb, lb, mmb0, mmb1 = totals(m, jnp.max), totals(l, jnp.sum), totals(mm0, jnp.sum), totals(mm1, jnp.sum)
            mins = jnp.where(g8 < 2, mmb0, mmb1)  # Σ p m_g: element g % 2 of mm_{g // 2}
            for h in hs:
                o_smem.at[h][...] = (jnp.sum(jnp.where(vcol == narrow_value_column(h, vrow // GROUP), o1, 0.0), axis=1)
                                     + jnp.sum(jnp.where(col8 == 2 * h + g8 % 2, mins, 0.0), axis=1))
                ml_smem.at[h, 0][...] = jnp.sum(jnp.where(col8 == 2 * h, mb, 0.0), axis=1)
                ml_smem.at[h, 1][...] = jnp.sum(jnp.where(col8 == 2 * h, lb, 0.0), axis=1)

        def persistent():
            # rows_per_program rows one after another, their steps one stream through the slots:
            # the next row's first tiles are in flight while this row's last steps compute, and
            # a row costs no launch, q load or pipeline fill of its own. Global step g belongs to
            # row k = #{j >= 1: g >= first_j} at its step g - first_k; a row with no steps here
            # runs one, all masked, whose partial is the empty one (m = -1e30, l = 0).
            k_rows, last_step = rows_per_program, tokens // KEY_BLOCK - 1
            ns = [n_smem[k, 0] for k in range(k_rows)]
            counts = [jnp.maximum(split_steps(nk), 1) for nk in ns]
            firsts = [counts[0] * 0]  # each row's first global step
            for c in counts[:-1]:
                firsts.append(firsts[-1] + c)
            total = firsts[-1] + counts[-1]

            def of_row(values, k):  # values[k] for a traced row k
                out = values[0]
                for j in range(1, k_rows):
                    out = jnp.where(k == j, values[j], out)
                return out

            def place(g):  # global step g -> (its row, the row's step)
                k = functools.reduce(lambda a, j: a + (g >= firsts[j]).astype(jnp.int32), range(1, k_rows), g * 0)
                return k, g - of_row(firsts, k)

            def fetch_global(g, slot, copy=fetch):  # (a row with no steps here reads its last step, masked)
                k, i = place(g)
                copy(jnp.minimum(lo + i, last_step), slot, r_in + k)

            for g in range(stages):
                pl.when(g < total)(functools.partial(fetch_global, g, g))

            def loop_rows(g, carry):
                slot = lax.rem(g, stages)
                k, i = place(g)
                fresh = i == 0  # a row's first step starts from the empty partial
                keep = 1.0 - fresh.astype(f32)
                m, o1, mc2, ls = carry
                # (m: a scalar a row, or lane_softmax's [64, 8], which jax 0.11.2's Mosaic selects by no scalar)
                carry = (tuple(jnp.where(fresh, a, x) if jnp.ndim(x) == 0 else x * keep + a * (1.0 - keep)
                               for a, x in zip(empty[0], m)), tuple(x * keep for x in o1),
                         tuple(x * keep for x in mc2), tuple(x * keep for x in ls))
                with jax.named_scope("tma_wait"):
                    plgpu.barrier_wait(tile(slot))
                carry = step(lo + i, kn_buf.at[slot], kt_buf.at[slot], vn_buf.at[slot], vt_buf.at[slot], carry,
                             n=of_row(ns, k), q_ref=q_smem.at[k])

                pl.when(g + stages < total)(lambda: fetch_global(g + stages, slot, refill))

                @pl.when(i == of_row(counts, k) - 1)
                def _():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the row before's outputs have left o_smem
                    finish(*carry, r0 + k)

                return carry

            lax.fori_loop(0, total, loop_rows, carry)

        if persist:
            persistent()
        else:
            carry = lax.fori_loop(0, steps, loop, carry)
            finish(*(carry[0] if prefetching else carry), r)
        plgpu.wait_smem_to_gmem(0)

    multi = warpgroups > 1
    persist = rows_per_program > 1
    ones_c = multi or ones_constant
    prefetching = prefetch_bk and compute  # (the stream alone builds nothing)
    if value_offset and multi:
        raise ValueError("value_offset needs the sums across a warpgroup's warps that warpgroups > 1 leaves out")
    if prefetch_bk and ones_c:
        raise ValueError("prefetch_bk builds the key constant by reduction; not with ones_constant or warpgroups > 1")
    if span and not sliding:
        raise ValueError(f"span={span} partitions a sliding window's steps; it needs sliding=True")
    if rows_per_program < 1 or (persist and (multi or prefetch_bk or sliding)):
        raise ValueError(f"rows_per_program={rows_per_program}; allowed: 1, or more with warpgroups=1, no prefetch_bk "
                         "and no sliding window")
    if narrow and (heads == 1 or key_offset or value_offset or prefetch_bk or not compact_q):
        raise ValueError(f"narrow=True takes G = 2 or 4 query rows a KV head (got G={heads}), compact_q and no "
                         "key_offset, value_offset or prefetch_bk")
    if lane_softmax and not narrow:
        raise ValueError("lane_softmax=True works in the narrow operands' layout; it needs narrow (G = 2 or 4, "
                         "compact_q, no key_offset, value_offset or prefetch_bk)")
    if ones_constant and heads > 1:
        raise ValueError(f"ones_constant takes G = 1 query row a KV head; got G={heads}")
    if warpgroups not in (1, 2, 3) or (multi and heads > 1):
        raise ValueError(f"warpgroups={warpgroups} (with G={heads} query rows a KV head); allowed: 1, 2 or 3, "
                         "and more than 1 only with G = 1 (their scratch fills an SM's shared memory at 3)")
    assert rows % (warpgroups * rows_per_program) == 0, "bulk_partials pads the rows"

    def own(shape, dtype, transforms=()):  # a scratch buffer, one a warpgroup
        return plgpu.SMEM(((warpgroups,) if multi else ()) + tuple(shape), dtype, transforms=transforms)

    params = {"profile_space": 512, "profile_dir": profile_dir} if profile_dir else {}
    if multi:  # no scratch for Mosaic's reductions across warps: one would now fail to lower
        params["reduction_scratch_bytes"] = 0
    kn_shape = (stages, KEY_BLOCK, D // 2)
    per_row = (rows_per_program,) if persist else ()  # q and n of each row a program takes
    kn_smem = own(kn_shape, jnp.int4, codes_op)

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((rows, splits, heads, D), f32),
                  jax.ShapeDtypeStruct((rows, splits, heads, 2, D), f32)),
        scratch_types=[own(per_row + (heads, D), bf16) if compact_q else own(per_row + (heads, D, N), bf16, b_op),
                       own(per_row + (32,), jnp.int32),
                       own(((2,) if prefetch_bk else ()) + ((chunks, D, N) if narrow else (nb, D, nbc)), bf16, b_op),
                       own((nb, KEY_BLOCK, nbc), bf16, b_op),
                       own((heads, D), f32), own((heads, 2, D), f32),
                       plgpu.Barrier(num_arrivals=1, num_barriers=warpgroups),
                       plgpu.Barrier(num_arrivals=1, num_barriers=warpgroups),
                       plgpu.RefUnion(kn_smem, own(kn_shape, jnp.int4)),
                       own((stages, D, N), bf16, b_op),
                       own((stages, chunks, D, half), jnp.int4),
                       own((stages, KEY_BLOCK // VALUE_BLOCK, CHUNK, N), bf16, b_op),
                       plgpu.Barrier(num_arrivals=4, num_barriers=stages * warpgroups)]
                      + ([own((CHUNK,), f32), own((CHUNK, N), f32)] if multi else [])
                      + ([plgpu.SMEM((smem_pad,), jnp.int8)] if smem_pad else []),
        grid=(rows // (warpgroups * rows_per_program), splits), grid_names=("r", "s"),
        **({"num_threads": warpgroups, "thread_name": "wg"} if multi else {}),
        compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True, **params))


def window_span(window: int, tokens: int) -> int:
    """The most 256-token steps a row's attended tokens [start, n) touch when n - start <= window
    (capped at the T/256 steps there are): a sliding window's span for :func:`split_bounds`."""
    return flash.window_chunks(window, KEY_BLOCK, tokens // KEY_BLOCK)


def split_bounds(start, sp, *, tokens: int, splits: int, span: int = 0):
    """Split ``sp``'s first 256-token step and the step its share ends before, (lo, end), for a
    row attended from token ``start``: the splits partition steps [0, T/256) (span 0; steps
    before start are skipped), or under a sliding window the ``span`` steps from the row's first,
    start // 256 (:func:`window_span`): at 16k tokens with a 4k window all the splits then have
    work, not the few that hold the window. Python ints, NumPy or traced scalars (the kernel's)."""
    first, per = start // KEY_BLOCK, -(-(span or tokens // KEY_BLOCK) // splits)
    lo0 = first + sp * per if span else sp * per
    # (lo0 >= first with a span; no window (start 0): the kernel's module as before, no max)
    no_max = span or (isinstance(start, int) and start == 0)
    return (lo0 if no_max else jnp.maximum(lo0, first)), lo0 + per


def split_range(n, start, sp, *, tokens: int, splits: int, span: int = 0):
    """Split ``sp``'s steps [lo, hi) of a row with n quantized tokens (hi <= lo: none); see
    :func:`split_bounds`."""
    lo, end = split_bounds(start, sp, tokens=tokens, splits=splits, span=span)
    return lo, split_end(n, end, tokens)


def split_end(n, end, tokens: int):
    """The step a split's share of a row with n quantized tokens ends before: its bound ``end``
    (:func:`split_bounds`), the row's last step + 1 or the T/256 steps there are, whichever is first."""
    return jnp.minimum(jnp.minimum((n + KEY_BLOCK - 1) // KEY_BLOCK, tokens // KEY_BLOCK), end)


def default_splits(rows: int, tokens: int, slots: int = 264) -> int:
    """Sequence splits a row: about as many as fill the GPU twice over (rows x splits programs,
    ``slots`` of them at once: two on each of an H200's 132 multiprocessors), at least one
    256-token step a split and none left empty at full length. Between half that count and
    that count, the one that takes the fewest waves x steps a program, ceil(rows s / slots)
    ceil(steps / s) (ties: the larger). B=8, T=4k, 32 heads runs 2 splits (2 waves of 8 steps)
    where it ran 3 (3 waves of 6): 0.077 vs 0.096 ms in -sweep-run29, 0.073 both in -sweep-run33
    (at 0.1 ms a call varies that much between calls); GQA 4, B=32, T=4k 0.208 vs 0.223 ms,
    T=16k 0.712 vs 0.691 (-run33)."""
    steps = tokens // KEY_BLOCK
    want = max(1, min(steps, -(-2 * slots // rows)))

    def cost(s):
        per = -(-steps // s)
        return (s - 1) * per >= steps, -(-rows * s // slots) * per, -s  # (an empty split, waves x steps, more)

    return min(range(-(-want // 2), want + 1), key=cost)


#: A program's fixed cost (q load, pipeline fill, epilogue, its share of the combine) in 256-token
#: steps, for :func:`window_splits`: fitted to results/mosaic-sliding-splits-run67 (splits 1-17 a
#: row over a 4096-token window at 16k/32k tokens).
WINDOW_FIXED_STEPS = 3


def window_splits(rows: int, span: int, slots: int = 264) -> int:
    """Sequence splits a row under a sliding window's partition (each row's ``span`` steps,
    :func:`split_range`): the count that takes the fewest waves x (steps a program + a
    program's fixed cost), ceil(rows s / slots) (ceil(span / s) + WINDOW_FIXED_STEPS); ties:
    the fewer. Where many programs already fill the GPU it is 1 (their fixed cost is what more
    splits add): at 16k tokens, a 4096-token window, 512 rows of GQA 4 (B=64) 1 split 0.263-0.272
    vs 0.290 ms over all the steps; 256 MHA rows 1 (0.066 vs 0.074); 64 GQA rows 4 (0.067 vs
    0.081); results/mosaic-sliding-splits-run67, where default_splits' counts (9-17 for few rows)
    were up to 1.2x slower than all the steps' partition (-run66)."""
    return min(range(1, span + 1), key=lambda s: (-(-rows * s // slots) * (-(-span // s) + WINDOW_FIXED_STEPS), s))


def default_rows_per_program(rows: int, tokens: int, splits: int, slots: int = 264, **options) -> int:
    """4 where rows are short (at most two 256-token steps: the paper's setting) and many (4
    rows a program still fill the GPU twice over), else 1: each row then pays no program launch,
    q load or pipeline fill of its own. At B=96, 32 heads, ~200 quantized tokens a row: 0.075 vs
    0.082 ms (0.92x, rows2 0.95x); at B=64, T=4k it is 1.04x and slower with mixed lengths
    (0.38 vs 0.31 ms), where a program's rows take unequal time (results/mosaic-ab-run42-*,
    mosaic-attention-run42)."""
    if options.get("warpgroups", 1) > 1 or options.get("prefetch_bk"):
        return 1
    return 4 if tokens <= 2 * KEY_BLOCK and splits == 1 and rows >= 4 * 2 * slots else 1


def gpu_slots(programs_an_sm: int = 2) -> int:
    """Programs of the kernel that run at once on the default device (two a multiprocessor:
    registers and shared memory); 264 (an H200) where the device does not say."""
    return programs_an_sm * getattr(jax.devices()[0], "core_count", 132)


HEADS = (1, 2, 4)  # query rows a KV head the kernel takes (more: registers; use the Triton kernel)


def bulk_partials(q, lengths, kn, kt, vn, vt, *, row_offset=0, stages: int = 2, splits: int | None = None,
                  starts=None, window: int | None = None, **options):
    """Flash-decoding partials of R (row, KV head) pairs over their quantized tokens [0, n)
    (with ``starts`` [R] int32: [start, n), a sliding window; the steps before it are not run).
    window (with starts; static): every row has n - start <= window (its caller's guarantee:
    start = max(L - window, 0) and n <= L); the splits then partition each row's window steps
    from its first (:func:`window_span`), not all T/256 steps.

    q [R, D] or [R, G, D] (G query rows a KV head, G in :data:`HEADS`; softmax scale applied);
    lengths [R] int32; kn, kt, vn, vt from :func:`repack`, with R rows or more: row r reads
    their row r + ``row_offset`` (an int or traced scalar: a layer of a stacked cache read in
    place). splits: sequence splits (programs a row; default :func:`default_splits`), combined here.
    options: :func:`_build`'s; rows_per_program defaults to :func:`default_rows_per_program`.
    -> (o [R, (G,) D] float32 unnormalized, m [R, (G)], l [R, (G)]); a row with n = 0 gives l = 0."""
    rows, tokens = q.shape[0], kn.shape[1]
    if kn.shape[0] < rows:
        raise ValueError(f"the cache arrays hold {kn.shape[0]} rows; q has R={rows}")
    heads = 1 if q.ndim == 2 else q.shape[1]
    if q.ndim not in (2, 3) or q.shape[0] != rows or q.shape[-1] != D or heads not in HEADS:
        raise ValueError(f"q must be [R, D={D}] or [R, G, D={D}] with G in {HEADS} (R <= the cache's {kn.shape[0]} "
                         f"rows); got {q.shape}")
    if tokens % KEY_BLOCK:
        raise ValueError(f"tokens={tokens} must be a multiple of {KEY_BLOCK}")
    if lengths.shape != (rows,):
        raise ValueError(f"lengths must be [R={rows}]; got {lengths.shape}")
    if window is not None and (starts is None or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window={window!r} must be an int >= 1 given with starts (got starts={starts is not None})")
    span = 0 if window is None else window_span(int(window), tokens)
    if splits is None:
        splits = window_splits(rows, span, gpu_slots()) if span else default_splits(rows, tokens, gpu_slots())
    if not 1 <= splits <= (span or tokens // KEY_BLOCK):
        raise ValueError(f"splits={splits}; allowed: 1 .. {span or tokens // KEY_BLOCK} (one 256-token step a split "
                         f"at least{'' if window is None else f' of the {span} a window={window} spans'})")
    if options.get("compact_q") and options.get("key_offset"):
        raise ValueError("compact_q loads q as one column; key_offset scales Bk's s columns of it (q comes broadcast)")
    if options.get("compact_q") is None:
        options["compact_q"] = not options.get("key_offset")
    if starts is not None:
        if starts.shape != (rows,):
            raise ValueError(f"starts must be [R={rows}]; got {starts.shape}")
        options["sliding"], options["span"] = True, span
    if options.get("rows_per_program") is None:
        options["rows_per_program"] = (1 if starts is not None else
                                       default_rows_per_program(rows, tokens, splits, gpu_slots(), **options))
    unit = options.get("warpgroups", 1) * max(options["rows_per_program"], 1)  # (_build names a bad one)
    padded = -(-rows // unit) * unit  # rows a multiple of the rows a CTA takes (padding rows: n = 0)
    qb = jnp.pad(q.reshape(rows, heads, D).astype(jnp.bfloat16), ((0, padded - rows), (0, 0), (0, 0)))
    if not options["compact_q"]:  # q broadcast over Bk's 16 columns (compact_q: the kernel does it)
        qb = jnp.broadcast_to(qb[..., None], (padded, heads, D, N))
    if options.get("key_offset"):  # Bk's s columns carry 4^-f of their channel's field (exact: powers of 2)
        qb = qb * jnp.where(jnp.arange(N) < 8, key_field_scale(jnp.arange(D))[:, None], 1.0).astype(qb.dtype)
    # a row's length, where it sits in the cache arrays (and its first attended token), 128 bytes a
    # row (Mosaic's copies)
    n32 = jnp.concatenate([jnp.pad(lengths.astype(jnp.int32), (0, padded - rows))[:, None],
                           jnp.broadcast_to(jnp.asarray(row_offset, jnp.int32), (padded, 1))]
                          + ([jnp.pad(starts.astype(jnp.int32), (0, padded - rows))[:, None]] if starts is not None else [])
                          + [jnp.zeros((padded, 30 - (starts is not None)), jnp.int32)], axis=1)
    kn, vn = kn.reshape(kn.shape[0], -1, WIDE), vn.reshape(vn.shape[0], -1, WIDE)  # 128-byte rows (bitcasts)
    o, ml = _build(padded, tokens, stages, splits, heads, **options)(qb, n32, kn, kt, vn, vt)
    o, m, l = combine_splits(o[:rows], ml[:rows, ..., 0, 0], ml[:rows, ..., 1, 0])
    return (o, m, l) if q.ndim == 3 else (o[:, 0], m[:, 0], l[:, 0])


def combine_splits(o, m, l):
    """Partials of S sequence splits (o [R, S, ..., D], m, l [R, S, ...]; an empty split has
    m = -1e30, l = 0) -> one partial (o [R, ..., D], m [R, ...], l [R, ...])."""
    top = jnp.max(m, axis=1)
    w = jnp.exp(m - top[:, None])
    return jnp.sum(w[..., None] * o, axis=1), top, jnp.sum(w * l, axis=1)


def kernel_model(q, lengths, kn, kt, vn, vt, key_offset=False, value_offset=False, starts=None, splits=1,
                 window=None):
    """float64 NumPy statement of what the kernel computes from :func:`repack`'s layout, step by
    step (chunk products, the column selection, the online softmax): tests check it against
    :func:`reference`, so a compiled mismatch is Mosaic's, not the arithmetic's. q [R, (G,) D];
    starts, window, splits: as :func:`bulk_partials`' (each split's steps from
    :func:`split_range`, its partials combined as there)."""
    if np.ndim(q) == 3:  # every query row of a KV head runs the same steps with its own q
        return _per_query_row(functools.partial(kernel_model, key_offset=key_offset, value_offset=value_offset,
                                                starts=starts, splits=splits, window=window), q, lengths, kn, kt, vn, vt)
    starts = np.zeros(np.shape(lengths), np.int64) if starts is None else np.asarray(starts)
    q = np.asarray(q, np.float64)
    # the A operands as the kernel unpacks them: the codes, K columns in channel / token order
    kc = np.asarray(key_codes(words_of(kn)), np.float64)  # [R, T, D]
    vc = np.asarray(value_codes(words_of(vn).reshape(vn.shape[:2] + (D * 4,))), np.float64)
    kt, vt = (np.asarray(x, np.float64) for x in (kt, vt))
    rows, tokens = kc.shape[:2]
    if key_offset:  # the operand 128 + 4^f c, Bk's s columns times 4^-f
        f = np.where(np.arange(N) < 8, np.asarray(key_field_scale(np.arange(D)))[:, None], 1.0)  # [128, 16]
        kc, kt = 128 + kc / f[None, None, :, 0], kt * f
    if value_offset:  # likewise, by token: the operand 128 + 4^f c, Bv's s columns times 4^-f
        fv = np.asarray(value_field_scale(np.arange(CHUNK)), np.float64)[:, None]  # [64, 1]
        vc = 128 + vc / np.tile(fv[:, 0], tokens // CHUNK)[None, :, None]
        s_cols = np.arange(N) % 8 < 4
    span = 0 if window is None else window_span(window, tokens)

    def partial(r, sp):  # row r's partial over split sp's steps
        lo, hi = (int(x) for x in split_range(int(lengths[r]), int(starts[r]), sp, tokens=tokens, splits=splits,
                                              span=span))
        m, l, o1, mc = -1e30, 0.0, np.zeros((D, N)), np.zeros((D, N))
        for j in range(lo * (KEY_BLOCK // CHUNK), hi * (KEY_BLOCK // CHUNK)):
            x = q[r][:, None] * kt[r, j // (KEY_BLOCK // CHUNK)]  # [128, 16]
            acc = kc[r, j * CHUNK:(j + 1) * CHUNK] @ x  # [64, 16]
            g = 2 * (j % (KEY_BLOCK // CHUNK)) + np.arange(CHUNK) // GROUP
            const = x.sum(0)[g + 8] - (128 * x.sum(0)[g] if key_offset else 0)
            s = acc[np.arange(CHUNK), g] + const
            t = j * CHUNK + np.arange(CHUNK)
            s = np.where((t < lengths[r]) & (t >= starts[r]), s, -np.inf)
            m_new = max(m, s.max())
            alpha, p = np.exp(m - m_new), np.exp(s - m_new)
            l = l * alpha + p.sum()
            y = np.where(np.arange(N)[None] // 8 == j % 2, p[:, None] * vt[r, j // (VALUE_BLOCK // CHUNK)], 0)
            if value_offset:
                y = np.where(s_cols[None], y * fv, y)
            o1 = o1 * alpha + vc[r, j * CHUNK:(j + 1) * CHUNK].T @ y  # V̂ᵀ [128, 64] · Bv
            mc = mc * alpha + y.sum(0)[None]
            m = m_new
        g = np.arange(D) // GROUP
        o = o1[np.arange(D), g] + o1[np.arange(D), g + 8] + mc[np.arange(D), g + 4] + mc[np.arange(D), g + 12]
        if value_offset:  # less the offset's product, 128 Σ_t y_t in the s columns
            o = o - 128 * (mc[np.arange(D), g] + mc[np.arange(D), g + 8])
        return o, m, l

    o, m, l = (np.stack(x) for x in zip(*[partial(r, sp) for r in range(rows) for sp in range(splits)]))
    top = m.reshape(rows, splits).max(1)
    w = np.exp(m.reshape(rows, splits) - top[:, None])  # combine_splits
    return (np.einsum("rs,rsd->rd", w, o.reshape(rows, splits, D)), top, (w * l.reshape(rows, splits)).sum(1))
