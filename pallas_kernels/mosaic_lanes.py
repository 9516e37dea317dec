"""The Mosaic GPU kernel's register-level pieces (pallas_kernels.kivi_mosaic), inline Mosaic GPU.

What the WGMMA fragment makes static a thread at a time: the codes unpacked in registers
(:func:`_codes_operands`), a chunk's scores picked from the lane holding them (:func:`_lane_pick`),
the key accumulators' starts, the value operands, the narrow GQA operands (every query row in one
N = 16 operand) and the softmax kept in the key accumulator's layout (lane_softmax). Each
``ctx``-first function runs inside ``plgpu.inline_mgpu`` on FragmentedArrays' registers.
"""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp
import numpy as np

from pallas_kernels.mosaic_layout import CHUNK, D, KEY_BLOCK, MAGIC, N, unpack_constants

# ---- kernel --------------------------------------------------------------------------------------

@functools.cache
def _load_takes_index() -> bool:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def load(ref, layout):
    """The whole of ``ref`` (shared memory) as an array in ``layout``. jax 0.10's plgpu.load takes
    the index (here ()) as an argument; jax 0.11 deprecates it (the ref is indexed instead)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.load(ref, (), layout=layout) if _load_takes_index() else plgpu.load(ref, layout=layout)


def _codes_operands(ref, offset=False):
    """[rows, 32 S] int4 nibbles in shared memory (:func:`_pack`'s words) -> the A operands of
    the K halves (bf16 codes 0..3, WGMMA layout [rows, 32 S] each).

    Loaded in WGMMA_UPCAST_4X (a thread holds one 32-bit word of each span) and unpacked in
    registers, two instructions a pair of codes: a LOP3 puts a code pair's bits under the
    exponent of 128 (``(w >> 6i) & mask | MAGIC``: 128 + 4^f c in each half, f the field's
    offset within its 6 bits) and a bf16x2 FMA takes it to c exactly (x 4^-f - 128 4^-f).
    Mosaic's own int4 -> bf16 cast (a PRMT, a LOP3 and a subtraction a pair, after our two
    masks for the two codes of a nibble) was 46% of a step's instructions
    (results/mosaic-attention-ncu-2026-12-01.md); this took the kernel from 0.539 to 0.430 ms
    (-run22). offset: leave out the FMA; the operands hold 128 + 4^f c (:func:`key_field_scale`
    gives the keys' 4^-f), which the caller folds into its other operand and constant."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = load(ref, plgpu.Layout.WGMMA_UPCAST_4X)
    out = plgpu.ShapeDtypeStruct(c.shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA)
    unpack = functools.partial(_unpack_in_registers, offset=offset)
    return plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,), return_type=(out, out))(unpack)(c)


def _unpack_in_registers(ctx, a, offset=False):
    """(inline Mosaic GPU) the UPCAST_4X int4 array's words -> two WGMMA-layout bf16 arrays."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    regs = [np.empty(mgpu.WGMMA_LAYOUT.registers_shape(a.shape), dtype=object) for _ in range(2)]
    for idx, reg in np.ndenumerate(a.registers):
        word = mgpu_utils.bitcast(reg, i32)
        shifted = {0: word}
        for o in range(2):
            for k in range(4):
                base, mask, scale, bias = unpack_constants(o, k)
                if base not in shifted:
                    shifted[base] = arith.shrui(word, arith.constant(i32, base))
                lop3 = f"lop3.b32 t, $1, {mask:#x}, {MAGIC:#x}, 0xea;"  # (w & mask) | MAGIC
                fma = f"mov.b32 sc, {scale:#x}; mov.b32 bi, {bias:#x}; fma.rn.bf16x2 $0, t, sc, bi;"
                x = llvm.inline_asm(i32, [shifted[base]], "{ .reg .b32 t, sc, bi; " + lop3 + (
                    " mov.b32 $0, t;" if offset else " " + fma) + " }", "=r,r")
                regs[o][_wgmma_index(idx, k)] = mgpu_utils.bitcast(x, pair)
    return tuple(_fragmented(r) for r in regs)


def _fragmented(registers, layout=None):
    """(inline) a register array -> a Mosaic GPU FragmentedArray (default: the WGMMA layout)."""
    from jax.experimental.mosaic import gpu as mgpu
    return mgpu.FragmentedArray(_registers=registers, _layout=layout or mgpu.WGMMA_LAYOUT, _is_signed=None)


def _wgmma_index(idx, k):
    """UPCAST_4X register ``idx`` (row tile, 32-column span, ...) -> the WGMMA register (8-column
    tile 4 x span + k, ...) of the same thread: its columns 8 (4 span + k) + 2 j + (0, 1)."""
    return (idx[0], 4 * idx[1] + k) + idx[2:]


# ---- work by lane (inline Mosaic GPU): what a [64, 16] WGMMA array's column structure makes static
# A thread of warp w, lane l holds rows 16 w + l // 4 (+ 8: row half h) and columns 8 t + 2 (l % 4)
# + e of a [64, 16 n] array: register (0, t, 0, 0, h, ...) element e. A chunk's rows r of one
# warp all lie in key group r // 32 = w // 2, so a row's score column 2u + w // 2 sits in lane
# u % 4 of each quad, element w // 2 % 2: no select over columns, no sum across lanes.

def _mlir():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    return ir, arith, gpu, llvm, vector, mgpu


def _pairs():
    """(inline) the register types the operand builders use: (f32 pair, bf16 pair, i32, a bf16 pair of zeros)."""
    ir, arith, _, _, _, _ = _mlir()
    f32, bf16 = ir.F32Type.get(), ir.BF16Type.get()
    pair, bf16_pair = ir.VectorType.get((2,), f32), ir.VectorType.get((2,), bf16)
    zero = arith.constant(bf16_pair, ir.DenseElementsAttr.get_splat(bf16_pair, ir.FloatAttr.get(bf16, 0.0)))
    return pair, bf16_pair, ir.IntegerType.get_signless(32), zero


def _thread_bit(bit):
    """(inline) bit ``bit`` of this thread's index as an i1 (64: the row's key group in a chunk; 2:
    lane % 4 >= 2)."""
    ir, arith, gpu, _, _, _ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    return arith.cmpi(arith.CmpIPredicate.ne, arith.andi(tid, arith.constant(i32, bit)), arith.constant(i32, 0))


def _wgmma_reg(t, h):
    """A [64, 8 n] WGMMA array's register of column tile t, row half h."""
    return (0, t, 0, 0, h, 0, 0, 0, 0)


def wgmma_position(warp, lane, t, h, e):
    """(row, column) of element e of register :func:`_wgmma_reg` (t, h) that lane ``lane`` of warp
    ``warp`` holds in a [64, 8 n] WGMMA-layout array (PTX's wgmma accumulator fragment)."""
    return 16 * warp + 8 * h + lane // 4, 8 * t + 2 * (lane % 4) + e


def score_source(u, row):
    """Where chunk u's row ``row`` finds its score, column 2 u + row // 32 of its 16-column block:
    (the lane of the row's quad, the element). The element is bit 6 of the thread index (the
    warp's half of the chunk), which :func:`_lane_pick` selects on."""
    return u % 4, row // 32 % 2


def _row_array(values):
    """Two f32 scalars (row halves) -> a [64] array in the WGMMA row layout."""
    ir, _, _, _, vector, _ = _mlir()
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    regs = np.empty(fa.WGMMA_ROW_LAYOUT.registers_shape((CHUNK,)), dtype=object)
    for h, v in enumerate(values):
        regs[0, 0, h, 0, 0] = vector.broadcast(ir.VectorType.get((1,), ir.F32Type.get()), v)
    return _fragmented(regs, fa.WGMMA_ROW_LAYOUT)


def _lane_pick(ctx, acc, *, u, tile):
    """(inline) chunk u's [64] scores (WGMMA row layout) from its accumulator [64, 16 n]: row r's
    column 8 tile + 2 u + r // 32, taken from lane u of its quad (a select and a shuffle a row half)."""
    del ctx
    _, arith, _, _, vector, _ = _mlir()
    lane, _ = score_source(u, 0)
    upper = _thread_bit(64)  # score_source's element: rows 32-63 of the chunk (key group 2u + 1)
    picked = []
    for h in range(2):
        reg = acc.registers[_wgmma_reg(tile, h)]
        picked.append(_quad_shuffle(arith.select(upper, vector.extract(reg, [], [1]), vector.extract(reg, [], [0])),
                                    lane))
    return _row_array(picked)


def _key_start(ctx, *cs, offset=False):
    """(inline) [64, 16] arrays c_i (every row Bk_i's column sums: q · s_g | q · m_g) -> the key
    accumulators' start [64, 16 n]: column g of block i holds q · m_g (c_i's column g + 8; with
    offset, less 128 times its column g), so the product adds the key constant to the score
    column. Register moves (offset: one FMA a number)."""
    del ctx
    ir, arith, _, _, vector, mgpu = _mlir()
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, N * len(cs))), dtype=object)
    pair = ir.VectorType.get((2,), ir.F32Type.get())
    minus128 = vector.broadcast(pair, arith.constant(ir.F32Type.get(), -128.0))
    for i, c in enumerate(cs):
        for h in range(2):
            lo, hi = c.registers[_wgmma_reg(0, h)], c.registers[_wgmma_reg(1, h)]
            regs[_wgmma_reg(2 * i, h)] = arith.addf(hi, arith.mulf(minus128, lo)) if offset else hi
            regs[_wgmma_reg(2 * i + 1, h)] = lo  # (columns the pick never reads)
    return _fragmented(regs)


def _value_operand(ctx, p, *rest, u, offset=False, sums_only=False):
    """(inline) chunk u's Bv [64, 16] bf16 and the running column sums mc2 + (columns 0-3 of
    chunk u's half: p, or with offset bf16(y); 4-7: y) from p [64] (row layout), with offset
    p 4^-f [64], the value tile vt [64, 16] bf16 (two chunks' s | m) and mc2 [64, 16] f32.
    y = p s (offset: p 4^-f s) | p m in the 8 columns of chunk u % 2 (a static half: no selects
    over columns), zeros in the other's. So Σ p is columns 0 and 8 of mc2 together (offset: the
    caller sums p itself). sums_only: only mc2 (narrow operands build Bv on their own)."""
    del ctx
    pf, vt, mc2 = rest if offset else (p, *rest)
    _, arith, _, _, vector, mgpu = _mlir()
    pair, bf16_pair, _, zero = _pairs()
    right = _thread_bit(2)  # lanes 2, 3 of a quad hold columns 4-7 (m) of a half
    y_regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, N)), dtype=object)
    mc_regs = mc2.registers.copy()
    t = u % 2
    for h in range(2):
        ph = vector.extract(p.registers[0, 0, h, 0, 0], [], [0])
        ps = arith.select(right, ph, vector.extract(pf.registers[0, 0, h, 0, 0], [], [0])) if offset else ph
        y = arith.mulf(vector.broadcast(pair, ps), arith.extf(pair, vt.registers[_wgmma_reg(t, h)]))
        yb = arith.truncf(bf16_pair, y)
        y_regs[_wgmma_reg(t, h)] = yb
        y_regs[_wgmma_reg(1 - t, h)] = zero
        # offset: the s columns' sum as the tensor cores take them (it cancels 128 times its own)
        add = arith.extf(pair, yb) if offset else vector.broadcast(pair, ph)
        mc_regs[_wgmma_reg(t, h)] = arith.addf(mc_regs[_wgmma_reg(t, h)], arith.select(right, y, add))
    return _fragmented(mc_regs) if sums_only else (_fragmented(y_regs), _fragmented(mc_regs))


# ---- narrow operands (G > 1): only the columns a chunk's products are read in -------------------
# The fused operands hold each query row's 16 columns (N = 16 G): of a key chunk's 16 G product
# columns the picks read 2 G (the chunk's two key groups a row), of a value chunk's 4 G. Narrow
# operands hold only those, for every row at once in N = 16 (wgmma's least for a bf16 operand in
# shared memory: swizzle 16, 8 columns, is not supported): key chunk u's Bk_u column
# :func:`narrow_key_column` (h, e) = q_h ∘ s_{2u+e}, Bv column :func:`narrow_value_column` (h, g)
# = p_h ∘ s_g, so at G = 4 a chunk's products are 4x narrower. Each thread builds the columns its
# WGMMA fragment holds (:func:`wgmma_position`), its scales fetched from the quad's lane that
# loaded them with one shuffle a register.

def narrow_key_column(h, e):
    """Key operand column of query row h, key group 2u + e of chunk u (lane h of a quad, element e)."""
    return 2 * h + e


def narrow_value_column(h, g):
    """Value operand (and o accumulator) column of query row h, channel group g."""
    return 4 * h + g


def _lane():
    """(inline) this thread's lane within its quad (lane % 4) as an i32."""
    ir, arith, gpu, _, _, _ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    return arith.andi(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), arith.constant(i32, 3))


def _quad_shuffle(reg, src):
    """(inline) a 32-bit register (a bf16 pair) from lane ``src`` (an int or an i32 value) of this quad."""
    ir, _, _, llvm, _, _ = _mlir()
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    i32 = ir.IntegerType.get_signless(32)
    word = mgpu_utils.bitcast(reg, i32)
    if isinstance(src, int):
        x = llvm.inline_asm(i32, [word], f"shfl.sync.idx.b32 $0, $1, {src}, 0x1c1f, 0xffffffff;", "=r,r",
                            has_side_effects=False)
    else:
        x = llvm.inline_asm(i32, [word, src], "shfl.sync.idx.b32 $0, $1, $2, 0x1c1f, 0xffffffff;", "=r,r,r",
                            has_side_effects=False)
    return mgpu_utils.bitcast(x, reg.type)


def _narrow_keys(ctx, kt, *qs):
    """(inline) a step's narrow key operands from its key tile kt [128, 16] bf16 (s | m) and the
    query rows q_h [128] f32 (row layout): Bk_u [128, 16] bf16 for its four chunks (column
    :func:`narrow_key_column` (h, e) = q_h ∘ s_{2u+e}, columns 2G.. zero) and M [128, 32] f32,
    column 8u + (h, e) = q_h ∘ m_{2u+e}, whose column sums are the chunks' key constants. A
    thread holds Bk's columns 2 (lane % 4) + e: query row lane % 4 and the pair (s_{2u}, s_{2u+1}),
    which lane u of its quad loaded (kt's columns 2u + e)."""
    del ctx
    ir, arith, _, _, vector, mgpu = _mlir()
    pair, bf16_pair, i32, zero = _pairs()
    f32 = ir.F32Type.get()
    lane = _lane()
    shape = mgpu.WGMMA_LAYOUT.registers_shape((D, N))
    bks = [np.empty(shape, dtype=object) for _ in range(KEY_BLOCK // CHUNK)]
    mk = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((D, 8 * len(bks))), dtype=object)
    for rt, h in np.ndindex(2, 2):  # 64-row tile, row half
        q = arith.constant(f32, 0.0)  # this lane's query row (none past G)
        for g, qg in enumerate(qs):
            q = arith.select(arith.cmpi(arith.CmpIPredicate.eq, lane, arith.constant(i32, g)),
                             vector.extract(qg.registers[rt, 0, h, 0, 0], [], [0]), q)
        q = vector.broadcast(pair, q)
        s_reg, m_reg = (kt.registers[(rt, t) + _wgmma_reg(t, h)[2:]] for t in (0, 1))
        for u, bk in enumerate(bks):
            bk[(rt, 0) + _wgmma_reg(0, h)[2:]] = arith.truncf(bf16_pair, arith.mulf(q, arith.extf(pair, _quad_shuffle(
                s_reg, u))))
            bk[(rt, 1) + _wgmma_reg(1, h)[2:]] = zero
            mk[(rt, u) + _wgmma_reg(u, h)[2:]] = arith.mulf(q, arith.extf(pair, _quad_shuffle(m_reg, u)))
    return tuple(_fragmented(r) for r in bks) + (_fragmented(mk),)


def _narrow_starts(ctx, c):
    """(inline) the key constants c [64, 32] (every row M's column sums) -> each chunk u's key
    accumulator start [64, 16]: its columns 8u.. moved to columns 0.. (register moves)."""
    del ctx
    _, _, _, _, _, mgpu = _mlir()
    starts = []
    for u in range(KEY_BLOCK // CHUNK):
        regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, N)), dtype=object)
        for t, h in np.ndindex(2, 2):
            regs[_wgmma_reg(t, h)] = c.registers[_wgmma_reg(u, h)]  # (columns 8.. the pick never reads)
        starts.append(_fragmented(regs))
    return tuple(starts)


def _narrow_value_operand(ctx, vt, *ps, u):
    """(inline) chunk u's narrow Bv [64, 16] bf16 from the value tile vt [64, 16] bf16 (two
    chunks' s | m) and the query rows' p_h [64] f32 (row layout): column
    :func:`narrow_value_column` (h, g) = p_h ∘ s_g. A thread holds columns 8 t + 2 (lane % 4) + e:
    query row 2t + (lane % 4) // 2, groups 2 (lane % 2) + e, whose scales lane lane % 2 of its
    quad loaded (vt's columns 8 (u % 2) + 2 (lane % 2) + e)."""
    del ctx
    _, arith, _, _, vector, mgpu = _mlir()
    pair, bf16_pair, i32, zero = _pairs()
    right = _thread_bit(2)  # lanes 2, 3 of a quad: the odd query row of a column tile
    src = arith.andi(_lane(), arith.constant(i32, 1))
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, N)), dtype=object)
    assert len(ps) in (2, 4), "narrow operands take G = 2 or 4 query rows"
    for h in range(2):
        s = arith.extf(pair, _quad_shuffle(vt.registers[_wgmma_reg(u % 2, h)], src))
        p = [vector.extract(x.registers[0, 0, h, 0, 0], [], [0]) for x in ps]
        for t in range(2):
            if 2 * t < len(p):
                pt = vector.broadcast(pair, arith.select(right, p[2 * t + 1], p[2 * t]))
                regs[_wgmma_reg(t, h)] = arith.truncf(bf16_pair, arith.mulf(pt, s))
            else:  # (G = 2: columns 8.. hold no row)
                regs[_wgmma_reg(t, h)] = zero
    return _fragmented(regs)


# ---- the softmax in the key accumulator's layout (lane_softmax; narrow operands) ----------------
# A thread of chunk u's narrow key accumulator [64, 16] already holds, in column tile 0, query row
# lane % 4's score of its two tokens (the element: the token's key group, bit 6 of the thread
# index). Kept there, as S [64, 8] (both elements the thread's own score; column 2j + e: row j),
# every query row's mask, exp and running sums are one op a thread for all G rows, and one column
# max across the warpgroup gives every lane its row's step max; only the operands that mix rows
# fetch a quad lane's value: Bv's p_h, o's alpha_h and the value mins m_g.

def lane_row_source(lane, t):
    """The quad lane holding the p (and alpha) of the query row whose value columns a thread of
    lane ``lane`` holds in column tile t (:func:`narrow_value_column`: row 2t + bit 1 of the lane)."""
    return 2 * t + (lane % 4) // 2


def lane_min_source(k):
    """The quad lane holding a value tile's mins m_{2k}, m_{2k+1} (its columns 8 (u % 2) + 4 + 2k + e)."""
    return 2 + k


def _own_scores(ctx, acc):
    """(inline) chunk u's narrow key accumulator [64, 16] -> S [64, 8]: this thread's own query
    row's (lane % 4) score of each of its two tokens, in both elements (no shuffle)."""
    del ctx
    _, arith, _, _, vector, mgpu = _mlir()
    pair = _pairs()[0]
    upper = _thread_bit(64)  # the token's key group in the chunk (score_source's element)
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, 8)), dtype=object)
    for h in range(2):
        reg = acc.registers[_wgmma_reg(0, h)]
        regs[_wgmma_reg(0, h)] = vector.broadcast(
            pair, arith.select(upper, vector.extract(reg, [], [1]), vector.extract(reg, [], [0])))
    return _fragmented(regs)


def _lane_shift(t):
    """(inline) :func:`lane_row_source` (this lane, t) as an i32."""
    ir, arith, _, _, _, _ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    return arith.addi(arith.shrui(_lane(), arith.constant(i32, 1)), arith.constant(i32, 2 * t))


def _lane_value_operand(ctx, vt, p, *, u, heads):
    """(inline) chunk u's narrow Bv [64, 16] bf16 (column :func:`narrow_value_column` (h, g) =
    p_h ∘ s_g) from the value tile vt [64, 16] bf16 and p [64, 8] f32 in the lane layout: a thread
    takes p of row 2t + bit 1 of its lane from that quad lane (:func:`lane_row_source`), s_g as
    :func:`_narrow_value_operand` does."""
    del ctx
    ir, arith, _, _, vector, mgpu = _mlir()
    pair, bf16_pair, i32, zero = _pairs()
    src = arith.andi(_lane(), arith.constant(i32, 1))
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, N)), dtype=object)
    for h in range(2):
        s = arith.extf(pair, _quad_shuffle(vt.registers[_wgmma_reg(u % 2, h)], src))
        own = vector.extract(p.registers[_wgmma_reg(0, h)], [], [0])
        for t in range(2):
            if 2 * t < heads:
                pt = vector.broadcast(pair, _quad_shuffle(own, _lane_shift(t)))
                regs[_wgmma_reg(t, h)] = arith.truncf(bf16_pair, arith.mulf(pt, s))
            else:  # (G = 2: columns 8.. hold no row)
                regs[_wgmma_reg(t, h)] = zero
    return _fragmented(regs)


def _lane_min_sums(ctx, p, vt, mm0, mm1, *, u):
    """(inline) the running Σ p m_g of this thread's own query row: mm_k [64, 8] f32, element e
    Σ p m_{2k+e} over its tokens, plus chunk u's p [64, 8] times the mins that quad lane
    :func:`lane_min_source` (k) loaded with the value tile vt [64, 16] bf16."""
    del ctx
    _, arith, _, _, vector, _ = _mlir()
    pair = _pairs()[0]
    out = [mm0.registers.copy(), mm1.registers.copy()]
    for h in range(2):
        own = vector.broadcast(pair, vector.extract(p.registers[_wgmma_reg(0, h)], [], [0]))
        reg = vt.registers[_wgmma_reg(u % 2, h)]
        for k in range(2):
            m = arith.extf(pair, _quad_shuffle(reg, lane_min_source(k)))
            out[k][_wgmma_reg(0, h)] = arith.addf(out[k][_wgmma_reg(0, h)], arith.mulf(own, m))
    return tuple(_fragmented(r) for r in out)


def _lane_alpha_scale(ctx, alpha, *, heads):
    """(inline) alpha [64, 8] f32 in the lane layout (every element of a thread its row's) -> the
    o accumulator's rescale [128, 16]: column 4h + g takes alpha_h from quad lane
    :func:`lane_row_source` (columns of no row: 1)."""
    del ctx
    ir, arith, _, _, vector, mgpu = _mlir()
    pair = _pairs()[0]
    a = vector.extract(alpha.registers[_wgmma_reg(0, 0)], [], [0])
    one = vector.broadcast(pair, arith.constant(ir.F32Type.get(), 1.0))
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((D, N)), dtype=object)
    for t in range(2):
        v = vector.broadcast(pair, _quad_shuffle(a, _lane_shift(t))) if 2 * t < heads else one
        for rt, h in np.ndindex(2, 2):
            regs[(rt, t) + _wgmma_reg(t, h)[2:]] = v
    return _fragmented(regs)
