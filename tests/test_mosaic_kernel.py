"""The Mosaic GPU bulk kernel (pallas_kernels/kivi_mosaic.py) on a machine without a GPU.

Mosaic GPU's interpret mode does not run the kernel (its loads from tiled, swizzled shared
memory fail there), so CI checks what can be checked off the GPU: the layout against its
definition, the kernel's arithmetic step by step (``kernel_model``, float64) against
dequantize-then-attend on fresh random data and on a prefilled cache, the split combine, bad
arguments, and that the kernel lowers for CUDA (Mosaic's layout inference runs at lowering).
The compiled numbers: benchmarks/mosaic_attention.py on the GPU (results/mosaic-attention-*).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax as kj
from benchmarks.mosaic_attention import errors, from_cache, random_inputs, random_q
from benchmarks.mosaic_modules import abstract_inputs
from jaxpr_walk import dead_arrays, kernel_bodies
from pallas_kernels import kivi_mosaic as km
from pallas_kernels import mosaic_lanes as ml
from pallas_kernels import mosaic_layout as mlay

D = km.D


def _float32(xs):
    return [x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs]


def test_repack_layout_matches_its_definition():
    rows, t = 2, 512
    kc, ks, kmin, vc, vs, vm = (np.asarray(x, np.float64) if x.dtype != jnp.int32 else np.asarray(x)
                                for x in _float32(random_inputs(rows, t, key=1)))
    kn, kt, vn, vt = km.repack(*_float32(random_inputs(rows, t, key=1)))
    # the int4 views' nibbles, low first, back into 32-bit words by hand
    nibbles = lambda x: np.asarray(x.astype(jnp.int32)).astype(np.int64) & 15  # noqa: E731
    kw = (nibbles(kn).reshape(rows, t, 8, 8) << (4 * np.arange(8))).sum(-1)
    vw = (nibbles(vn).reshape(rows, t // 64, D, 4, 8) << (4 * np.arange(8))).sum(-1)
    kt, vt = np.asarray(kt, np.float64), np.asarray(vt, np.float64)

    rng = np.random.default_rng(0)
    for _ in range(300):
        r, tok, c = rng.integers(rows), rng.integers(t), rng.integers(D)
        # keys: channel c = 64 o + 32 s + 8 k + 2 j + e, rows t with t & 4 with their two
        # 16-byte halves (words 0-3, 4-7) swapped (the 32-byte swizzle's image)
        o, s, k, j, e = c // 64, c % 64 // 32, c % 32 // 8, c % 8 // 2, c % 2
        word = (4 * s + j) ^ (4 if tok & 4 else 0)
        assert (kw[r, tok, word] >> (16 * e + 8 * o + 2 * k)) & 3 == kc[r, tok, c]
        # values: token 64 i + u, u = 32 o + 8 k + 2 j + e, in channel c's word j
        i, u = divmod(tok, 64)
        o, k, j, e = u // 32, u % 32 // 8, u % 8 // 2, u % 2
        assert (vw[r, i, c, j] >> (16 * e + 8 * o + 2 * k)) & 3 == vc[r, tok, c]
        g = tok // 32
        assert kt[r, g // 8, c, g % 8] == pytest.approx(ks[r, g, c], rel=1e-6)
        assert kt[r, g // 8, c, 8 + g % 8] == pytest.approx(kmin[r, g, c], rel=1e-6)
        e, u2 = divmod(tok % 128, 64)
        assert vt[r, tok // 128, u2, 8 * e + c // 32] == pytest.approx(vs[r, tok, c // 32], rel=1e-6)
        assert vt[r, tok // 128, u2, 8 * e + 4 + c // 32] == pytest.approx(vm[r, tok, c // 32], rel=1e-6)


def test_key_field_scale_is_where_the_unpacking_leaves_each_code():
    """The LOP3 of field (o, k) keeps bits 2f, 2f + 1 of the word shifted by 6 (bit // 6)."""
    for d in range(D):
        o, k = d // 64, d % 32 // 8
        bit = 8 * o + 2 * k  # mlay.code_bit(o, k, 0)
        assert bit == mlay.code_bit(o, k, 0)
        assert float(km.key_field_scale(jnp.int32(d))) == 4.0 ** -((bit - 6 * (bit // 6)) // 2)
    for t in range(km.CHUNK):  # a value chunk's tokens: t = 32 o + 8 k + 2 j + e (km.value_words)
        bit = mlay.code_bit(t // 32, t % 32 // 8, 0)
        assert float(km.value_field_scale(jnp.int32(t))) == 4.0 ** -((bit - 6 * (bit // 6)) // 2)


def test_register_unpacking_gives_the_codes():
    """The kernel's LOP3 + FMA on each word (:func:`ml.unpack_constants`), emulated bit for bit in
    NumPy on words packed from random codes: the A operands' K columns hold the codes, and the
    LOP3 alone (key_offset) holds 128 + 4^f c."""
    import ml_dtypes

    codes = np.asarray(jax.random.randint(jax.random.key(6), (16, 128), 0, 4))
    words = np.asarray(mlay._pack(jnp.asarray(codes))).astype(np.uint32)  # [16, 8]: row r's words 4 s + j
    as_bf16 = lambda x: x.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    for o in range(2):
        for k in range(4):
            base, mask, scale, bias = ml.unpack_constants(o, k)
            t = ((words >> np.uint32(base)) & np.uint32(mask)) | np.uint32(mlay.MAGIC)
            lo, hi = as_bf16(t & 0xFFFF), as_bf16(t >> 16)  # elements e = 0, 1 of the register
            s, b = as_bf16(np.uint32(scale & 0xFFFF)), as_bf16(np.uint32(bias & 0xFFFF))
            assert scale >> 16 == scale & 0xFFFF and bias >> 16 == bias & 0xFFFF
            for s_, j in np.ndindex(2, 4):  # word 4 s + j holds K columns 8 (4 s + k) + 2 j + e of half o
                col = 64 * o + 8 * (4 * s_ + k) + 2 * j
                for e, x in enumerate((lo, hi)):
                    np.testing.assert_array_equal(x[:, 4 * s_ + j] * s + b, codes[:, col + e])
                    f = float(km.key_field_scale(jnp.int32(col + e)))
                    np.testing.assert_array_equal(x[:, 4 * s_ + j], 128 + codes[:, col + e] / f)


def test_work_by_lane_reads_the_right_elements():
    """The lanes helpers' index facts, against the wgmma accumulator fragment (PTX ISA: row
    16 warp + 8 h + lane / 4, column 8 t + 2 (lane % 4) + e): the pick's shuffle source (same
    quad, lane u; element = bit 6 of the thread index) holds column 16 k + 2 u + row // 32 of the
    row, the token's key group in the 256-token block (kernel_model: 2 (j % 4) + t // 32); the
    value operand's lanes with bit 1 set hold columns 4-7 of each half (the mins)."""
    for u, k in np.ndindex(4, 4):
        for w, lane, h in np.ndindex(4, 32, 2):
            row = ml.wgmma_position(w, lane, 0, h, 0)[0]
            src, e = ml.score_source(u, row)
            assert e == (32 * w + lane) >> 6 & 1
            got = ml.wgmma_position(w, lane // 4 * 4 + src, 2 * k, h, e)  # shfl.sync.idx, segment mask 0x1c
            assert got == (row, 16 * k + 2 * u + row // 32)
    for w, lane, t, h, e in np.ndindex(4, 32, 2, 2, 2):
        col = ml.wgmma_position(w, lane, t, h, e)[1]
        assert (col % 8 >= 4) == bool((32 * w + lane) & 2)
        assert col // 8 == t  # _key_start and _value_operand move whole registers between halves


def test_narrow_operands_columns_are_where_each_thread_builds_them():
    """Narrow operands (kivi_mosaic._narrow_keys / _narrow_value_operand), against the wgmma
    fragment: a key operand's thread (any warp, lane, row half) holds in column tile 0 query row
    lane % 4's two key groups (narrow_key_column (h, e)), which is where the pick of row h reads
    them (score_source (h, row): lane h, element = the row's group in the chunk), and their scales sit
    in kt's columns 2u + e of lane u of its quad; a value operand's thread holds query row
    2t + bit 1 of its lane and groups 2 (lane % 2) + e, whose scales lane lane % 2 of its quad
    holds in the value tile (columns 8 (u % 2) + g)."""
    for w, lane, h, e in np.ndindex(4, 32, 2, 2):
        row, col = ml.wgmma_position(w, lane, 0, h, e)
        assert col == ml.narrow_key_column(lane % 4, e)
        for u in range(4):  # u: a chunk, and the query row the pick (every thread) reads
            src, el = ml.score_source(u, row)
            assert ml.wgmma_position(w, lane // 4 * 4 + src, 0, h, el) == (row, ml.narrow_key_column(u, row // 32))
            assert ml.wgmma_position(w, lane // 4 * 4 + u, 0, h, e)[1] == 2 * u + e  # kt's s_{2u+e}
            assert ml.wgmma_position(w, lane // 4 * 4 + u, 1, h, e)[1] == 8 + 2 * u + e  # kt's m_{2u+e}
        for t, u in np.ndindex(2, 4):
            col = ml.wgmma_position(w, lane, t, h, e)[1]
            qrow, g = 2 * t + (lane >> 1 & 1), 2 * (lane % 2) + e
            assert col == km.narrow_value_column(qrow, g)
            # the value tile's s_g of chunk u: columns 8 (u % 2) + g, in lane lane % 2 of the quad
            assert ml.wgmma_position(w, lane // 4 * 4 + lane % 2, u % 2, h, e)[1] == 8 * (u % 2) + g


@pytest.mark.parametrize("heads", [2, 4])
def test_lane_softmax_threads_compute_the_partials(heads):
    """A thread-by-thread NumPy model of lane_softmax (kivi_mosaic._own_scores,
    _lane_value_operand, _lane_min_sums, _lane_alpha_scale, finish_lanes) over two 256-token
    steps: each of the 128 threads reads only the WGMMA fragment positions it holds
    (wgmma_position) and the quad lanes the kernel shuffles from (lane_row_source,
    lane_min_source); the partials (o, m, l) it assembles equal float64 attention over the same
    scores, codes, scales and mins."""
    rng = np.random.default_rng(heads)
    threads = list(np.ndindex(4, 32))  # (warp, lane)

    def at(w, lane, t, h, e):  # what thread (w, lane) holds of a [64, 8 n] WGMMA array: (row, column)
        return ml.wgmma_position(w, lane, t, h, e)

    m = {(w, lane): -1e30 for w, lane in threads}  # a thread's own row's (lane % 4) running max
    l = {k: 0.0 for k in threads}
    mm = {k: np.zeros(4) for k in threads}  # Σ p m_g (mm_0's two elements, then mm_1's)
    o = np.zeros((D, 16))  # the value accumulator [128 channels, 16 columns]
    want_scores, want_codes, want_s, want_m = [], [], [], []
    for step in range(2):
        acc = rng.normal(size=(4, 64, 16)) * (1 + 3 * step)  # chunk u's key accumulator (scores + constant)
        vts = rng.normal(size=(2, 64, 16))  # two chunks' value tile: s_g | m_g of each chunk, 8 columns each
        codes = rng.integers(0, 4, (4, 64, D))  # chunk u's value codes [token, channel]
        own = {(w, lane, u, h): acc[(u,) + at(w, lane, 0, h, int(w >= 2))] for w, lane in threads
               for u, h in np.ndindex(4, 2)}  # _own_scores: element = bit 6 of the thread index
        top = {j: max(own[w, lane, u, h] for w, lane in threads if lane % 4 == j for u, h in np.ndindex(4, 2))
               for j in range(4)}  # the column max across the warpgroup
        alpha = {}
        for w, lane in threads:
            m_new = max(m[w, lane], top[lane % 4])
            alpha[w, lane] = np.exp(m[w, lane] - m_new)
            l[w, lane] *= alpha[w, lane]
            mm[w, lane] *= alpha[w, lane]
            m[w, lane] = m_new
        p = {(w, lane, u, h): np.exp(own[w, lane, u, h] - m[w, lane]) for w, lane, u, h in own}
        # o rescaled: column tile t of thread (w, lane) by the alpha quad lane lane_row_source holds
        scale = np.zeros((D, 16))
        for (w, lane), rt, t, h, e in itertools.product(threads, range(2), range(2), range(2), range(2)):
            row, col = at(w, lane, t, h, e)
            src = lane // 4 * 4 + ml.lane_row_source(lane, t)
            scale[64 * rt + row, col] = alpha[w, src] if 2 * t < heads else 1.0
        o *= scale
        for u in range(4):
            vt = vts[u // 2]
            bv = np.zeros((64, 16))
            for (w, lane), t, h, e in itertools.product(threads, range(2), range(2), range(2)):
                row, col = at(w, lane, t, h, e)
                s_g = vt[at(w, lane // 4 * 4 + lane % 2, u % 2, h, e)]  # _narrow_value_operand's scale
                pt = p[w, lane // 4 * 4 + ml.lane_row_source(lane, t), u, h]
                bv[row, col] = pt * s_g if 2 * t < heads else 0.0
            o += codes[u].T @ bv
            for (w, lane), h in itertools.product(threads, range(2)):
                l[w, lane] += p[w, lane, u, h]
                for k, e in np.ndindex(2, 2):
                    mm[w, lane][2 * k + e] += p[w, lane, u, h] * vt[at(w, lane // 4 * 4 + ml.lane_min_source(k),
                                                                     u % 2, h, e)]
        # what it means: row j's scores, the tokens' scales and mins, in token order
        want_scores.append(np.stack([np.concatenate([acc[u, np.arange(64), 2 * j + np.arange(64) // 32]
                                                     for u in range(4)]) for j in range(4)]))  # [row, token]
        want_codes.append(np.concatenate(list(codes)))
        want_s.append(np.concatenate([vts[u // 2][:, 8 * (u % 2):8 * (u % 2) + 4] for u in range(4)]))
        want_m.append(np.concatenate([vts[u // 2][:, 8 * (u % 2) + 4:8 * (u % 2) + 8] for u in range(4)]))
    codes, s, mn = (np.concatenate(x) for x in (want_codes, want_s, want_m))  # [512 tokens, ...]
    scores = np.concatenate(want_scores, axis=1)  # [4, 512]
    g = np.arange(D) // 32
    for h in range(heads):  # finish_lanes: column totals over the threads of lane % 4 == h
        rows = [k for k in threads if k[1] % 4 == h]
        got_m, got_l = m[rows[0]], sum(l[k] for k in rows)  # (32 threads, two token rows each)
        got_mm = sum(mm[k] for k in rows)
        got_o = o[np.arange(D), km.narrow_value_column(h, g)] + got_mm[g]
        want_m_h = scores[h].max()
        p_h = np.exp(scores[h] - want_m_h)
        assert abs(got_m - want_m_h) < 1e-12
        np.testing.assert_allclose(got_l, p_h.sum(), rtol=1e-12)
        np.testing.assert_allclose(got_o, (p_h[:, None] * (s[:, g] * codes + mn[:, g])).sum(0), rtol=1e-10)


def test_layout_round_trips():
    codes = jax.random.randint(jax.random.key(5), (3, 256, D), 0, 4)
    np.testing.assert_array_equal(np.asarray(km.key_codes(km.key_words(codes))), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(km.value_codes(km.value_words(codes))), np.asarray(codes))
    kn = km.kernel_arrays(km.key_words(codes), jnp.zeros((3, D, 16)), km.value_words(codes), jnp.zeros((3, 128, 16)))[0]
    np.testing.assert_array_equal(np.asarray(km.words_of(kn)), np.asarray(km.key_words(codes)))


@pytest.mark.parametrize("heads,key_offset,value_offset", [(1, False, False), (4, False, False), (1, True, False),
                                                          (2, True, False), (1, False, True), (4, True, True)])
def test_kernel_arithmetic_matches_dequantize_then_attend(heads, key_offset, value_offset):
    """Every row length class: one token, inside a chunk, chunk and block edges, full; one
    query row a KV head and four (GQA); the key and value codes as they are and offset
    (128 + 4^f c, the offset's product taken out again)."""
    rows, t = 8, 512
    plain = _float32(random_inputs(rows, t, key=2))
    lengths = jnp.asarray([1, 33, 64, 255, 256, 300, 511, 512], jnp.int32)
    q = random_q(rows, heads)
    err = errors(km.kernel_model(q, lengths, *km.repack(*plain), key_offset=key_offset, value_offset=value_offset),
                 km.reference(q, lengths, *plain))
    assert err["out_rel_err"] < 1e-9 and err["m_abs_err"] < 1e-9 and err["l_rel_err"] < 1e-9, err


@pytest.mark.parametrize("heads", [1, 4])
def test_sliding_window_arithmetic_matches_dequantize_then_attend(heads):
    """starts (a sliding window's first token): the kernel's arithmetic, which skips the
    256-token steps wholly before a row's start and masks the rest below it, against
    dequantize-then-attend over tokens [start, n); starts at 0, inside a chunk, on chunk and
    block edges, in the last step; a row whose start is past its length is the empty partial."""
    rows, t = 9, 768
    plain = _float32(random_inputs(rows, t, key=4))
    lengths = jnp.asarray([33, 300, 300, 512, 700, 768, 768, 600, 40], jnp.int32)
    starts = jnp.asarray([0, 1, 64, 256, 257, 511, 767, 599, 100], jnp.int32)
    q = random_q(rows, heads)
    got = km.kernel_model(q, lengths, *km.repack(*plain), starts=starts)
    want = km.reference(q, lengths, *plain, starts=starts)
    err = errors(tuple(x[:-1] for x in got), tuple(x[:-1] for x in want))
    assert err["out_rel_err"] < 1e-9 and err["m_abs_err"] < 1e-9 and err["l_rel_err"] < 1e-9, err
    assert np.all(got[2][-1] == 0) and np.all(want[2][-1] == 0) and np.all(got[1][-1] == -1e30)
    # and not the same as without the window (the masking is exercised)
    assert np.abs(km.kernel_model(q, lengths, *km.repack(*plain))[2] - got[2]).max() > 1e-3


def _covered(n, start, *, tokens, splits, span):
    """The steps the splits of one row take, in order, and how many splits have any."""
    ranges = [tuple(int(x) for x in km.split_range(n, start, sp, tokens=tokens, splits=splits, span=span))
              for sp in range(splits)]
    return [j for lo, hi in ranges for j in range(lo, hi)], sum(hi > lo for lo, hi in ranges)


def test_split_range_partitions_each_rows_steps():
    """The splits take each step a row needs (start // 256 .. ceil(n / 256) - 1) exactly once,
    over all T/256 steps and, under a sliding window (span), over the window's; with the span
    a long row's window is spread over the splits instead of the one or two that hold it."""
    rng = np.random.default_rng(3)
    kb = km.KEY_BLOCK
    for tokens, window in ((1024, None), (4096, None), (4096, 300), (4096, 256), (4096, 257), (16384, 4096),
                           (2048, 2048), (2048, 5000), (2048, 1)):
        span = 0 if window is None else km.window_span(window, tokens)
        for splits in range(1, (span or tokens // kb) + 1):
            for _ in range(40):
                n = int(rng.integers(0, tokens + 1))
                start = (int(rng.integers(0, n + 1)) if window is None else
                         max(n + int(rng.integers(0, 40)) - window, 0))  # L - window, with L >= n
                steps, _ = _covered(n, start, tokens=tokens, splits=splits, span=span)
                assert steps == list(range(start // kb, -(-n // kb))), (tokens, window, splits, n, start)
    # 16k tokens, a 4k window, 8 splits, a full row: 6 splits share its 17 steps, where the
    # partition of all 64 steps (8 a split) leaves them to 3
    full = dict(n=16384, start=16384 - 4096 - 100, tokens=16384, splits=8)
    assert _covered(**full, span=km.window_span(4096, 16384))[1] == 6
    assert _covered(**full, span=0)[1] == 3
    assert km.window_span(4096, 16384) == 17 and km.window_span(256, 4096) == 2 and km.window_span(1, 4096) == 1
    assert km.window_span(5000, 2048) == 8


def test_window_splits_counts_a_programs_fixed_cost():
    """A sliding window's split count: waves x (steps a program + WINDOW_FIXED_STEPS), ties the
    fewer; the counts measured fastest in results/mosaic-sliding-splits-run67 (17 steps of a
    4096-token window)."""
    assert km.window_splits(512, 17, 264) == 1  # B=64, 8 KV heads: 1 wave of 17 steps + 3 vs 4 waves of 9 + 3
    assert km.window_splits(256, 17, 264) == 1  # B=8, 32 KV heads
    assert km.window_splits(64, 17, 264) == 4  # B=8, 8 KV heads: 256 programs, one wave of 5 steps
    assert km.window_splits(8, 17, 264) == 17
    assert km.window_splits(2048, 1, 264) == 1
    # the cost it minimizes, by hand, for 64 rows: 1 wave x (17 + 3), (9 + 3), (6 + 3), (5 + 3), then 2 waves x (4 + 3)
    assert [-(-64 * s // 264) * (-(-17 // s) + km.WINDOW_FIXED_STEPS) for s in range(1, 6)] == [20, 12, 9, 8, 14]


@pytest.mark.parametrize("heads", [1, 4])
def test_sliding_window_splits_arithmetic_matches_dequantize_then_attend(heads):
    """window= (each split takes part of a row's window steps, from its first) and splits:
    the kernel's arithmetic, split by split and combined, against dequantize-then-attend over
    tokens [max(L - window, 0), n) of rows of every length class."""
    rows, t, window = 8, 2048, 600
    plain = _float32(random_inputs(rows, t, key=5))
    lengths = jnp.asarray([2048, 2047, 1500, 700, 601, 600, 257, 30], jnp.int32)
    starts = jnp.maximum(lengths + jnp.asarray([0, 1, 100, 5, 0, 0, 40, 0], jnp.int32) - window, 0)
    q = random_q(rows, heads, key=6)
    want = km.reference(q, lengths, *plain, starts=starts)
    for splits in (1, 2, 4):
        got = km.kernel_model(q, lengths, *km.repack(*plain), starts=starts, window=window, splits=splits)
        err = errors(got, want)
        assert err["out_rel_err"] < 1e-9 and err["m_abs_err"] < 1e-9 and err["l_rel_err"] < 1e-9, (splits, err)


def test_kernel_arithmetic_on_a_prefilled_cache():
    """The kernel's arithmetic over a real KIVI-2 cache's quantized tokens equals attention over
    the cache's own dequantized keys and values (materialize), on a ragged batch."""
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=128)
    b, h, t = 2, 2, 400
    k = jax.random.normal(jax.random.key(0), (b, h, t, D)) * (1 + 4 * jax.random.bernoulli(jax.random.key(2), 0.1, (D,)))
    v = jax.random.normal(jax.random.key(1), (b, h, t, D))
    cache = kj.KIVICache.init(cfg, batch=b, num_kv_heads=h, head_dim=D, max_length=512, dtype=jnp.float32)
    cache = cache.prefill(k, v, lengths=jnp.array([400, 333]))
    n = jnp.repeat(cache.num_quantized_values, h)
    q = random_q(b * h)
    o, m, l = km.kernel_model(q, n, *km.repack(*from_cache(cache)))
    k_hat, v_hat = (np.asarray(x, np.float64).reshape(b * h, -1, D) for x in cache.materialize())
    qf = np.asarray(q, np.float64)
    for r in range(b * h):
        s = k_hat[r, :n[r]] @ qf[r]
        p = np.exp(s - s.max())
        np.testing.assert_allclose(o[r] / l[r], p @ v_hat[r, :n[r]] / p.sum(), rtol=1e-5, atol=1e-5)
    assert np.asarray(n).tolist() == [272, 272, 205, 205]


@pytest.mark.parametrize("rows", [1, 8, 33, 256, 2048])
@pytest.mark.parametrize("tokens", [256, 1024, 4096, 16384, 65536])
def test_default_splits_fill_the_gpu_and_leave_no_split_empty(rows, tokens):
    steps = tokens // km.KEY_BLOCK
    s = km.default_splits(rows, tokens)
    per = -(-steps // s)  # steps a split (_build's per_split)
    assert 1 <= s <= steps and (s - 1) * per < steps  # the last split still has a step
    want = min(steps, -(-528 // rows))  # as many as fill 528 programs, at most one a step
    assert want <= 2 * s and s <= want  # between half of what fills the GPU twice over and that
    waves = -(-rows * s // 264)  # 264 programs at once
    for t in range(-(-want // 2), want + 1):  # no other such count takes fewer waves x steps
        pt = -(-steps // t)
        if (t - 1) * pt < steps:
            assert waves * per <= -(-rows * t // 264) * pt


def test_default_splits_whole_waves():
    """B=8, T=4k, 32 heads: 2 splits (2 waves of 8 steps) rather than 3 (3 waves of 6, 25% slower:
    results/mosaic-attention-sweep-run29); the slots follow the GPU's multiprocessors."""
    assert km.default_splits(8 * 32, 4096) == 2
    assert km.default_splits(64 * 32, 4096) == 1 and km.default_splits(32, 4096) == 16
    assert km.default_splits(8 * 32, 4096, slots=528) == 4  # twice the slots: 1024 programs, 2 waves of 4 steps
    assert km.gpu_slots() == 2 * getattr(jax.devices()[0], "core_count", 132)


def test_combine_splits_equals_one_pass():
    rows, t, d = 3, 96, 8
    rng = np.random.default_rng(4)
    s, v = rng.normal(size=(rows, t)) * 3, rng.normal(size=(rows, t, d))
    parts = []
    for lo, hi in ((0, 40), (40, 41), (41, 96)):
        m = s[:, lo:hi].max(1)
        p = np.exp(s[:, lo:hi] - m[:, None])
        parts.append((np.einsum("rt,rtd->rd", p, v[:, lo:hi]), m, p.sum(1)))
    parts.append((np.zeros((rows, d)), np.full(rows, -1e30), np.zeros(rows)))  # an empty split
    o, m, l = km.combine_splits(*(jnp.asarray(np.stack(x, 1)) for x in zip(*parts)))
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(o) / np.asarray(l)[:, None],
                               np.einsum("rt,rtd->rd", p, v) / p.sum(1)[:, None], rtol=1e-5)


@pytest.mark.parametrize("heads,options", [(1, {}), (1, {"splits": 3}), (1, {"group": 1, "stages": 3}),
                                           (2, {}), (4, {"splits": 2}), (4, {"group": 2}), (4, {"fused": False}),
                                           (1, {"compute": False}), (1, {"warpgroups": 3}),
                                           (1, {"warpgroups": 2, "smem_pad": 4096}),
                                           (1, {"key_offset": True}), (4, {"key_offset": True, "value_offset": True}),
                                           (1, {"warpgroups": 3, "key_offset": True}), (1, {"value_offset": True}),
                                           (2, {"fused": False, "key_offset": True, "value_offset": True}),
                                           (1, {"ones_constant": True}), (1, {"ones_constant": True, "key_offset": True}),
                                           (1, {"prefetch_bk": True}), (1, {"prefetch_bk": True, "stages": 3, "splits": 3}),
                                           (4, {"prefetch_bk": True}), (2, {"prefetch_bk": True, "fused": False}),
                                           (1, {"prefetch_bk": True, "key_offset": True, "value_offset": True}),
                                           (1, {"prefetch_bk": True, "compute": False}),
                                           (1, {"rows_per_program": 2}), (1, {"rows_per_program": 4, "splits": 3}),
                                           (4, {"rows_per_program": 3, "stages": 3}),
                                           (2, {"rows_per_program": 2, "fused": False, "key_offset": True,
                                                "value_offset": True}),
                                           (1, {"compact_q": False}), (4, {"compact_q": False}),
                                           (2, {"compact_q": True, "fused": False, "value_offset": True}),
                                           (1, {"compact_q": True, "rows_per_program": 2}),
                                           (1, {"compact_q": True, "warpgroups": 2}),
                                           (1, {"compact_q": True, "prefetch_bk": True}),
                                           (4, {"narrow": False}), (2, {"narrow": False, "splits": 2}),
                                           (4, {"narrow": True, "group": 2}),
                                           (4, {"narrow": True, "rows_per_program": 3, "stages": 3}),
                                           (4, {"lane_softmax": False}), (2, {"lane_softmax": False, "splits": 2}),
                                           (4, {"lane_softmax": False, "group": 2}),
                                           (4, {"lane_softmax": False, "rows_per_program": 3, "stages": 3})])
def test_kernel_lowers_for_cuda(heads, options):
    """Mosaic GPU lowers the kernel for CUDA on this CPU machine (layouts, transforms, wgmma
    operands are checked there): what the GPU then compiles (results/mosaic-attention-*); and its
    body computes no array it then drops (jaxpr_walk.dead_arrays: jax 0.11.2's Mosaic never
    finished lowering lane_softmax while two unused iotas were in it)."""
    traced = jax.jit(lambda *a: km.bulk_partials(*a, **options)).trace(*abstract_inputs(6, 1024, heads))
    _assert_no_dead_arrays(traced)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def _assert_no_dead_arrays(traced):
    [body] = kernel_bodies(traced.jaxpr.jaxpr)
    assert [(e.primitive.name, e.outvars[0].aval.shape) for e in dead_arrays(body)] == []


@pytest.mark.parametrize("heads,options", [(1, {}), (4, {"splits": 3}), (2, {"fused": False, "stages": 3}),
                                           (1, {"key_offset": True, "value_offset": True}),
                                           (1, {"window": 300}), (4, {"window": 600, "splits": 3}),
                                           (4, {"window": 600, "narrow": True}), (2, {"narrow": True}),
                                           (4, {"window": 600, "lane_softmax": False})])
def test_sliding_window_kernel_lowers_for_cuda(heads, options):
    """bulk_partials with starts (the row table's third column) lowers for CUDA, one row a
    program; with window=, its splits over each row's window steps."""
    args = abstract_inputs(6, 1024, heads) + (jax.ShapeDtypeStruct((6,), jnp.int32),)
    traced = jax.jit(lambda *a: km.bulk_partials(*a[:6], starts=a[6], **options)).trace(*args)
    _assert_no_dead_arrays(traced)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("options", [{"warpgroups": 3}, {"rows_per_program": 4}])
def test_rows_a_cta_pad_the_rows(options):
    """Rows not a multiple of the rows a CTA takes (warpgroups, rows_per_program) are padded with
    empty rows (n = 0) and cut off."""
    lowered = jax.jit(lambda *a: km.bulk_partials(*a, **options)).trace(*abstract_inputs(7, 512)).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    outs = jax.eval_shape(lambda *a: km.bulk_partials(*a, **options), *abstract_inputs(7, 512))
    assert [x.shape for x in outs] == [(7, D), (7,), (7,)]


def test_default_rows_per_program_takes_four_short_rows_only_when_they_fill_the_gpu():
    """4 rows a program for at most two 256-token steps a row and rows enough for 2 x slots
    programs of 4; else 1 (long rows: unequal lengths leave a program's rows unbalanced)."""
    assert km.default_rows_per_program(96 * 32, 512, 1, 264) == 4  # the paper's batch
    assert km.default_rows_per_program(96 * 32, 768, 1, 264) == 1  # three steps a row
    assert km.default_rows_per_program(64 * 32, 4096, 1, 264) == 1  # the kernel's target shape
    assert km.default_rows_per_program(8 * 264 - 1, 256, 1, 264) == 1  # too few programs of 4
    assert km.default_rows_per_program(8 * 264, 256, 1, 264) == 4
    assert km.default_rows_per_program(96 * 32, 512, 2, 264) == 1  # split rows
    assert km.default_rows_per_program(96 * 32, 512, 1, 264, warpgroups=2) == 1
    assert km.default_rows_per_program(96 * 32, 512, 1, 264, prefetch_bk=True) == 1
    # bulk_partials uses it: 3072 rows pad to a multiple of 4 and lower
    outs = jax.eval_shape(lambda *a: km.bulk_partials(*a), *abstract_inputs(3070, 512))
    assert [x.shape for x in outs] == [(3070, D), (3070,), (3070,)]


def test_bad_arguments_are_named():
    q, n, kn, kt, vn, vt = (jnp.zeros(x.shape, x.dtype) for x in abstract_inputs(2, 512))
    with pytest.raises(ValueError, match=r"q must be \[R, D=128\] or \[R, G, D=128\] with G in \(1, 2, 4\)"):
        km.bulk_partials(q[:, :64], n, kn, kt, vn, vt)
    with pytest.raises(ValueError, match=r"got \(2, 8, 128\)"):
        km.bulk_partials(jnp.zeros((2, 8, D), jnp.bfloat16), n, kn, kt, vn, vt)
    with pytest.raises(ValueError, match="the cache arrays hold 2 rows; q has R=3"):
        km.bulk_partials(jnp.zeros((3, D), jnp.bfloat16), jnp.zeros((3,), jnp.int32), kn, kt, vn, vt)
    with pytest.raises(ValueError, match=r"lengths must be \[R=2\]"):
        km.bulk_partials(q, n[:1], kn, kt, vn, vt)
    with pytest.raises(ValueError, match=r"warpgroups=3 \(with G=2 query rows a KV head\); allowed: 1, 2 or 3"):
        km.bulk_partials(jnp.zeros((2, 2, D), jnp.bfloat16), n, kn, kt, vn, vt, warpgroups=3)
    with pytest.raises(ValueError, match="value_offset needs the sums across a warpgroup's warps"):
        km.bulk_partials(q, n, kn, kt, vn, vt, warpgroups=2, value_offset=True)
    with pytest.raises(ValueError, match="prefetch_bk builds the key constant by reduction"):
        km.bulk_partials(q, n, kn, kt, vn, vt, prefetch_bk=True, ones_constant=True)
    with pytest.raises(ValueError, match="rows_per_program=2; allowed: 1, or more with warpgroups=1, no prefetch_bk "
                                         "and no sliding window"):
        km.bulk_partials(q, n, kn, kt, vn, vt, rows_per_program=2, warpgroups=2)
    with pytest.raises(ValueError, match="rows_per_program=2; allowed"):
        km.bulk_partials(q, n, kn, kt, vn, vt, rows_per_program=2, starts=n)
    with pytest.raises(ValueError, match=r"window=300 must be an int >= 1 given with starts \(got starts=False\)"):
        km.bulk_partials(q, n, kn, kt, vn, vt, window=300)
    with pytest.raises(ValueError, match=r"window=0 must be an int >= 1"):
        km.bulk_partials(q, n, kn, kt, vn, vt, window=0, starts=n)
    with pytest.raises(ValueError, match=r"splits=3; allowed: 1 .. 2 \(one 256-token step a split at least of the 2 a "
                                         r"window=300 spans\)"):
        km.bulk_partials(q, n, kn, kt, vn, vt, window=300, starts=n, splits=3)
    with pytest.raises(ValueError, match=r"span=2 partitions a sliding window's steps; it needs sliding=True"):
        km._build(2, 512, 2, span=2)
    with pytest.raises(ValueError, match=r"starts must be \[R=2\]; got \(1,\)"):
        km.bulk_partials(q, n, kn, kt, vn, vt, starts=n[:1])
    with pytest.raises(ValueError, match="rows_per_program=0; allowed"):
        km.bulk_partials(q, n, kn, kt, vn, vt, rows_per_program=0)
    with pytest.raises(ValueError, match="compact_q loads q as one column; key_offset"):
        km.bulk_partials(q, n, kn, kt, vn, vt, compact_q=True, key_offset=True)
    with pytest.raises(ValueError, match=r"narrow=True takes G = 2 or 4 query rows a KV head \(got G=1\)"):
        km.bulk_partials(q, n, kn, kt, vn, vt, narrow=True)
    with pytest.raises(ValueError, match=r"narrow=True takes .* \(got G=4\), compact_q and no key_offset"):
        km.bulk_partials(jnp.zeros((2, 4, D), jnp.bfloat16), n, kn, kt, vn, vt, narrow=True, key_offset=True)
    with pytest.raises(ValueError, match=r"lane_softmax=True works in the narrow operands' layout"):
        km.bulk_partials(jnp.zeros((2, 4, D), jnp.bfloat16), n, kn, kt, vn, vt, lane_softmax=True, narrow=False)
    with pytest.raises(ValueError, match="warpgroups=4"):
        km.bulk_partials(q, n, kn, kt, vn, vt, warpgroups=4)
    with pytest.raises(ValueError, match="splits=3; allowed: 1 .. 2"):
        km.bulk_partials(q, n, kn, kt, vn, vt, splits=3)
    with pytest.raises(ValueError, match="tokens=320 must be a multiple of 256"):
        km.bulk_partials(q, n, kn[:, :320], kt, vn, vt)
    codes = jnp.zeros((1, 300, D), jnp.int32)
    with pytest.raises(ValueError, match="T a multiple of 256"):
        km.repack(codes, None, None, codes, None, None)
