"""The fused Pallas decode kernel, run with interpret=True on CPU, against the reference.

Fresh random caches built through prefill + append (so stores, residual and window are
real), keys with outlier channels, odd and ragged lengths, GQA 1/4/8, 2 and 4 bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import jaxpr_walk
import kivi_jax as kj
from kivi_jax import attention_pallas


def _cache(cfg, lengths, hkv, d, dtype, seed, appends=2):
    b, t = len(lengths), max(lengths)
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    outliers = 1.0 + 6.0 * jax.random.bernoulli(k3, 0.1, (d,))
    k = (jax.random.normal(k1, (b, hkv, t + appends, d)) * outliers).astype(dtype)
    v = jax.random.normal(k2, (b, hkv, t + appends, d)).astype(dtype)
    cache = kj.KIVICache.init(cfg, batch=b, num_kv_heads=hkv, head_dim=d, max_length=t + appends + 3, dtype=dtype)
    # jitted: eager prefill compiles op by op (4x slower on CI's CPU); eager equals jit is test_quant's
    cache = jax.jit(lambda c, k, v, n: c.prefill(k, v, lengths=n))(cache, k[:, :, :t], v[:, :, :t],
                                                                   jnp.asarray(lengths, jnp.int32))
    append = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(appends):
        cache = append(cache, k[:, :, t + i:t + i + 1], v[:, :, t + i:t + i + 1])
    return cache


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


CASES = [
    # (k_bits, v_bits, gqa, dtype, variant)
    (2, 2, 1, jnp.float32, "dequant"),
    (4, 4, 4, jnp.float32, "dequant"),
    (2, 4, 8, jnp.float32, "dequant"),
    (2, 2, 4, jnp.bfloat16, "dequant"),
    (4, 4, 1, jnp.float16, "dequant"),
    (2, 4, 4, jnp.bfloat16, "dequant"),
    (4, 2, 8, jnp.float16, "dequant"),
    (2, 2, 1, jnp.float32, "swap"),
    (2, 4, 4, jnp.bfloat16, "swap"),
]


@pytest.mark.parametrize("k_bits,v_bits,gqa,dtype,variant", CASES)
def test_kernel_matches_reference(k_bits, v_bits, gqa, dtype, variant):
    cfg = kj.KIVIConfig(k_bits=k_bits, v_bits=v_bits, group_size=16, residual_length=32)
    hkv, d = 2, 32
    cache = _cache(cfg, [301, 190, 37, 1], hkv, d, dtype, seed=k_bits * 10 + gqa)
    q = jax.random.normal(jax.random.key(gqa), (4, hkv * gqa, 1, d)).astype(dtype)
    ref = kj.decode_attention(q, cache, impl="reference")
    out = attention_pallas.decode_attention(q, cache, interpret=True, variant=variant)
    assert out.shape == ref.shape and out.dtype == q.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(out, ref) <= tol
    # each row alone gives the same result as in the batch
    one = jax.tree_util.tree_map(lambda x: x[1:2], cache)
    out1 = attention_pallas.decode_attention(q[1:2], one, interpret=True, variant=variant)
    np.testing.assert_allclose(np.asarray(out1, np.float32), np.asarray(out[1:2], np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sinks,ring_program,kernel_sinks", [
    (0, "first", True), (3, "first", True), (0, "own", True), (3, "own", True), (0, "launch", True),
    (3, "launch", True), (16, "first", True), (16, "own", True), (21, "launch", True), (3, "first", False)])
def test_kernel_rows_around_residual_boundaries(sinks, ring_program, kernel_sinks, monkeypatch):
    """Rows whose lengths sit just below, at and above multiples of R and of the chunk (the
    kernel's masked last chunk, the ring's split between key residual and flushed keys), with
    and without a sliding window, the ring walked by the first split or a split of its own:
    every row against the reference. The sinks are the ring program's too (kivi_window.sink_step,
    16 slots a step: 3 and 21 sinks also read ring slots, masked), or with KERNEL_SINKS off
    plain-JAX partials: rows shorter than the sinks, windows starting inside them."""
    monkeypatch.setattr(attention_pallas, "KERNEL_SINKS", kernel_sinks)
    if sinks and kernel_sinks:  # nothing of the sinks may be attended outside the kernel
        monkeypatch.setattr(attention_pallas, "_partials", None)
    cfg = kj.KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=32, sink_tokens=sinks)
    lengths = [l + sinks for l in (5, 31, 32, 33, 47, 63, 64, 65, 95, 96, 97, 130)] + ([2, sinks] if sinks else [])
    cache = _cache(cfg, lengths, 2, 32, jnp.float32, seed=7, appends=1)
    q = jax.random.normal(jax.random.key(3), (len(lengths), 4, 1, 32))
    for window in (None, 40, 70):
        ref = kj.decode_attention(q, cache, impl="reference", window=window)
        out = attention_pallas.decode_attention(q, cache, interpret=True, window=window, ring_program=ring_program)
        for i in range(len(lengths)):
            assert _rel(out[i], ref[i]) <= 1e-5, (lengths[i], window)


def test_sliding_window_splits_share_each_rows_window():
    """Under a sliding window the splits partition each row's own chunks from its first
    (span_chunks = flash.window_chunks), not all the cache's: rows far past the window, at it
    and inside it, a sink, the ring in the first split or its own, the default and explicit
    splits, against the reference (KIVI and dense); a span that does not cover a row's chunks
    loses tokens (the bound is what the partition rests on)."""
    from pallas_kernels import dense_decode, flash
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32, sink_tokens=2)
    lengths = [600, 451, 140, 90, 33]
    cache = _cache(cfg, lengths, 2, 32, jnp.float32, seed=21, appends=1)
    q = jax.random.normal(jax.random.key(8), (len(lengths), 4, 1, 32))
    for window, splits, ring_program in ((100, None, "first"), (130, 3, "own"), (100, 4, "first")):
        ref = kj.decode_attention(q, cache, impl="reference", window=window)
        out = attention_pallas.decode_attention(q, cache, interpret=True, window=window, num_splits=splits,
                                                ring_program=ring_program)
        assert _rel(out, ref) <= 1e-5, (window, splits, ring_program)
    splits = 3
    dense, qd = _dense([600, 451, 140, 90, 0], 4, 2, 600, 32, jnp.float32, 22)
    want = kj.decode_attention(qd, dense, impl="reference", window=100)
    got = attention_pallas.decode_attention(qd, dense, window=100, interpret=True, num_splits=splits)
    assert _rel(got[:4], want[:4]) <= 1e-5
    # 100 tokens touch at most 3 chunks of 64 (a window not aligned to them): 2 would drop some
    assert flash.window_chunks(100, 64, 10) == 3 and flash.window_chunks(64, 64, 10) == 2
    assert flash.window_chunks(1, 64, 10) == 1 and flash.window_chunks(5000, 64, 10) == 10
    lo, hi = jnp.asarray([7, 0, 5, 1, 0], jnp.int32), jnp.asarray([10, 2, 8, 2, 0], jnp.int32)  # rows of 3, 2, 3, 1 chunks
    start, end = lo * 64 + 3, jnp.minimum(hi * 64 - 1, jnp.asarray([600, 451, 140, 90, 0], jnp.int32))
    qp = attention_pallas._pad_rows(attention_pallas.grouped_queries(qd, 2))
    short = dense_decode.dense_decode_partials(qp, dense.k, dense.v, lo, hi, start, end, chunk=64,
                                               num_splits=1, interpret=True, span_chunks=2)
    full = dense_decode.dense_decode_partials(qp, dense.k, dense.v, lo, hi, start, end, chunk=64,
                                              num_splits=1, interpret=True, span_chunks=3)
    assert float(jnp.abs(short[2] - full[2]).max()) > 1e-3  # a row's third chunk went missing


def test_kernel_one_bit_keys_with_half_word_flushes():
    """1-bit keys with R = 48: a flush covers 1.5 words of 32 codes (written as 16-code halves at
    bit 0 or 16) and the window reads the flushed keys from mid-word; 8-bit values (4 a word)."""
    cfg = kj.KIVIConfig(k_bits=1, v_bits=8, group_size=16, residual_length=48)
    lengths = [47, 48, 49, 95, 96, 97, 143, 144, 150, 300]
    cache = _cache(cfg, lengths, 2, 32, jnp.float32, seed=11, appends=1)
    q = jax.random.normal(jax.random.key(4), (len(lengths), 2, 1, 32))
    ref = kj.decode_attention(q, cache, impl="reference")
    out = attention_pallas.decode_attention(q, cache, interpret=True)
    for i in range(len(lengths)):
        assert _rel(out[i], ref[i]) <= 1e-5, lengths[i]
    # R = 496 in a 512-token store (16 words of 32 codes): the flushed block is the whole store
    cfg = kj.KIVIConfig(k_bits=1, v_bits=2, group_size=16, residual_length=496)
    cache = _cache(cfg, [499, 300], 1, 32, jnp.float32, seed=12, appends=1)
    assert cache.k_codes.shape[2] == 16
    q = jax.random.normal(jax.random.key(6), (2, 1, 1, 32))
    assert _rel(attention_pallas.decode_attention(q, cache, interpret=True),
                kj.decode_attention(q, cache, impl="reference")) <= 1e-5


def test_kernel_sliding_window_and_public_dispatch():
    cfg = kj.KIVIConfig(group_size=16, residual_length=32)
    cache = _cache(cfg, [400, 300], 1, 32, jnp.float32, seed=3)
    q = jax.random.normal(jax.random.key(5), (2, 2, 1, 32))
    for window in (None, 200):
        ref = kj.decode_attention(q, cache, impl="reference", window=window)
        out = kj.decode_attention(q, cache, impl="pallas", window=window)  # interpret mode on CPU
        assert _rel(out, ref) <= 1e-5
    # the window changes the answer (the test would notice a kernel ignoring it)
    assert _rel(kj.decode_attention(q, cache, impl="reference", window=200),
                kj.decode_attention(q, cache, impl="reference")) > 1e-3


def test_kernel_bad_arguments():
    from pallas_kernels import kivi_decode

    cfg = kj.KIVIConfig(group_size=16, residual_length=32)
    cache = _cache(cfg, [100], 1, 32, jnp.float32, seed=0, appends=0)
    q = jnp.ones((1, 1, 1, 32))
    with pytest.raises(ValueError, match="variant='nope'"):
        attention_pallas.decode_attention(q, cache, interpret=True, variant="nope")
    with pytest.raises(ValueError, match="chunk=48"):
        attention_pallas.decode_attention(q, cache, interpret=True, variant="dequant", chunk=48)
    with pytest.raises(ValueError, match="ring_program='last'"):
        attention_pallas.decode_attention(q, cache, interpret=True, ring_program="last")
    assert "dequant" in kivi_decode.VARIANTS
    with pytest.raises(ValueError, match="dequant='fast'"):
        attention_pallas.decode_attention(q, cache, interpret=True, dequant="fast")
    # the magic-number path is inline PTX: no interpreter runs it, and float32 scales have no magic
    with pytest.raises(ValueError, match="dequant='magic'.*interpret=True"):
        attention_pallas.decode_attention(q, cache, interpret=True, dequant="magic")


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_magic_number_pairs_give_exact_codes(bits, dtype):
    """What the kernel's inline PTX computes, stated in NumPy: the pairs the kernel unpacks from
    packed words (codes 2j and 2j + 1 of a word at bits 0 and 16), masked and ORed under the
    magic exponent, are two 16-bit floats M + code; minus M, exactly the codes, in order."""
    from kivi_jax import packing
    from pallas_kernels import kivi_decode

    kind, magic = kivi_decode._MAGIC[dtype]
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (4 * 32 // bits, 8)).astype(np.uint32)  # [T, D], 4 word rows
    words_t = packing.pack(jnp.asarray(codes), bits, axis=0).T  # [D, 4]
    pairs = np.asarray(kivi_decode._unpack_pairs(words_t, bits))  # [D, T/2]
    mask = ((1 << bits) - 1) * 0x10001
    halves = ((pairs & mask) | magic * 0x10001).astype("<u4").view("<u2").reshape(*pairs.shape, 2)  # lo, hi
    floats = halves.view(jnp.dtype(dtype)).astype(np.float64) - float(np.array(magic, "<u2").view(jnp.dtype(dtype)))
    np.testing.assert_array_equal(floats.reshape(pairs.shape[0], -1), codes.T.astype(np.float64))


def test_cuda_lowering_uses_magic_dequantization_where_it_applies():
    """Compiled for a GPU, 16-bit caches take the magic-number PTX (kivi_decode._magic_fma) for
    keys and values; dequant="convert" and float32 scales keep integer->float conversions."""
    from pallas_kernels import kivi_decode
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    b, h, t, d = 2, 2, 256, 128

    def ttir(dtype, **kw):
        args = (s((b, h, 1, d), jnp.float32), s((b, h, t // 16, d), jnp.uint32), s((b, h, t // 32, d), dtype),
                s((b, h, t // 32, d), dtype), s((b, h, t // 16, d), jnp.uint32), s((b, h, t, d // 32), dtype),
                s((b, h, t, d // 32), dtype)) + (s((b,), jnp.int32),) * 4
        return lower_to_ttir(lambda *a: kivi_decode.kivi_decode_partials(
            *a, k_bits=2, v_bits=2, group_size=32, **kw), *args)

    assert ttir(jnp.bfloat16).count("lop3.b32") == 2  # one asm for keys, one for values
    assert "fma.rn.f16x2" in ttir(jnp.float16, dequant="magic")
    assert "lop3.b32" not in ttir(jnp.bfloat16, dequant="convert")
    assert "lop3.b32" not in ttir(jnp.float32)


@pytest.mark.parametrize("r,k_bits,ring_asm", [(128, 2, 1), (64, 2, 1), (32, 2, 0), (32, 4, 1), (16, 4, 0)])
def test_cuda_lowering_takes_magic_only_for_tiles_of_four_words(r, k_bits, ring_asm):
    """dequant="auto" dequantizes a tile by magic numbers only where it has >= 4 code words a
    channel: compiled on an H100, the ring's flushed keys in steps of 2 words (R = 32 with 2-bit
    keys) came out wrong by 0.2-1.1 at head_dim 32. The bulk's 64-token chunks (4 and 8 words)
    keep theirs; an explicit "magic" over a small tile is a named error."""
    from pallas_kernels import kivi_decode
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    b, h, t, d = 2, 2, 256, 32
    kw, vw = 32 // k_bits, 16  # codes a word (values 2-bit)

    def ttir(dequant="auto"):
        args = (s((b, h, 1, d), jnp.float32), s((b, h, t // kw, d), jnp.uint32), s((b, h, t // 32, d), jnp.bfloat16),
                s((b, h, t // 32, d), jnp.bfloat16), s((b, h, t // vw, d), jnp.uint32),
                s((b, h, t, d // 32), jnp.bfloat16), s((b, h, t, d // 32), jnp.bfloat16)) + (s((b,), jnp.int32),) * 4
        ring = (s((b, h, r, d), jnp.bfloat16),) * 2 + (s((b,), jnp.int32),) * 2
        return lower_to_ttir(lambda *a: kivi_decode.kivi_decode_partials(
            *a[:11], ring=a[11:], ring_len=r, k_bits=k_bits, v_bits=2, group_size=32, chunk=64,
            dequant=dequant), *args, *ring)

    assert ttir().count("lop3.b32") == 2 + ring_asm  # bulk keys and values, then the ring's keys
    assert "lop3.b32" not in ttir("convert")
    if not ring_asm:
        with pytest.raises(ValueError, match=r"dequant='magic' needs tiles of >= 128 bits.*32 tokens x 2 bits"
                           if k_bits == 2 else r"16 tokens x 4 bits"):
            ttir("magic")


@pytest.mark.parametrize("layer", [None, 1])
def test_cuda_lowering_of_the_ring_with_sinks(layer):
    """Compiled for a GPU, the sinks add a pair of dots to the ring's program (a sink step's
    scores and p·V; 16 or 5 sinks: one step), stacked or not; the buffers must hold R + S slots."""
    from pallas_kernels import kivi_decode
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    b, h, t, d, r = 2, 2, 256, 128, 128
    lead = (b, h) if layer is None else (3, b, h)

    def ttir(sink_len, slots=None):
        slots = slots or r + sink_len
        args = (s((b, h, 1, d), jnp.float32), s(lead + (t // 16, d), jnp.uint32), s(lead + (t // 32, d), jnp.bfloat16),
                s(lead + (t // 32, d), jnp.bfloat16), s(lead + (t // 16, d), jnp.uint32),
                s(lead + (t, d // 32), jnp.bfloat16), s(lead + (t, d // 32), jnp.bfloat16)) + (s((b,), jnp.int32),) * 4
        ring = (s(lead + (slots, d), jnp.bfloat16),) * 2 + (s((b,), jnp.int32),) * (4 if sink_len else 2)
        return lower_to_ttir(lambda *a: kivi_decode.kivi_decode_partials(
            *a[:11], ring=a[11:], ring_len=r, sink_len=sink_len, k_bits=2, v_bits=2, group_size=32,
            layer=None if layer is None else jnp.int32(layer)), *args, *ring)

    plain = ttir(0).count("tt.dot")
    assert ttir(16).count("tt.dot") == ttir(5).count("tt.dot") == plain + 2
    with pytest.raises(ValueError, match="R' >= 144"):
        ttir(16, slots=r + 8)


def test_kernel_reads_a_traced_layer_past_the_stack_as_dynamic_index_does():
    """A traced layer cannot be checked: past the stack (5 of 3) or negative (-1) the kernel reads
    the layer lax.dynamic_index_in_dim reads (clamped, wrapped: flash.clamp_layer), the bulk's and
    the ring's, never memory outside the stack (compiled, such a read would reach another buffer's)."""
    cfg = kj.KIVIConfig(group_size=32, residual_length=32)
    layers = [_cache(cfg, [300, 77], 1, 64, jnp.float32, seed) for seed in (31, 32, 33)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    q = jax.random.normal(jax.random.key(34), (2, 2, 1, 64), jnp.float32)

    @jax.jit
    def run(stacked, i):
        view = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, keepdims=False), stacked)
        return attention_pallas.decode_attention(q, view, interpret=jax.default_backend() != "gpu", stack=(stacked, i))

    for i, which in ((5, 2), (-1, 2), (-3, 0)):
        want = kj.decode_attention(q, layers[which], impl="reference")
        assert _rel(run(stacked, jnp.int32(i)), want) <= 1e-5, i


@pytest.mark.parametrize("ring_program,sinks", [("first", 0), ("own", 0), ("launch", 0), ("launch", 16)])
def test_kernel_reads_a_layer_stacked_cache_in_place(ring_program, sinks):
    """stack=(stacked, i): the kernel takes the whole [L, ...] arrays and layer i (no slice of
    the stack reaches the pallas_call) and gives layer i's attention, the ring's (and 16
    sinks') too."""
    cfg = kj.KIVIConfig(group_size=32, residual_length=32, sink_tokens=sinks)
    layers = [_cache(cfg, [300, 77, 190, 9], 2, 64, jnp.float32, seed) for seed in (21, 22, 23)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    q = jax.random.normal(jax.random.key(24), (4, 8, 1, 64), jnp.float32)

    def run(stacked, i):
        view = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, keepdims=False), stacked)
        return attention_pallas.decode_attention(q, view, interpret=True, stack=(stacked, i),
                                                 ring_program=ring_program)

    for i in (0, 2):
        want = kj.decode_attention(q, layers[i], impl="reference")
        got = jax.jit(run)(stacked, jnp.int32(i))
        assert _rel(got, want) <= 1e-5, i
        assert _rel(got, kj.decode_attention(q, layers[1], impl="reference")) > 1e-2  # not another layer's
    jaxpr = jax.make_jaxpr(run)(stacked, jnp.int32(1))
    calls = jaxpr_walk.pallas_calls(jaxpr.jaxpr)
    shapes = [v.aval.shape for v in calls[0].invars]
    assert stacked.k_codes.shape in shapes and stacked.v_scale.shape in shapes, shapes
    # the residual ring is attended in the same kernel (or, "launch", in a second one of its
    # own with no ring in the first), read in place from the stack too
    def has_k_res(call):  # shape and dtype: k_res and k_codes can share a shape
        return any((v.aval.shape, v.aval.dtype) == (stacked.k_res.shape, stacked.k_res.dtype) for v in call.invars)

    assert len(calls) == (2 if ring_program == "launch" else 1) and has_k_res(calls[-1])
    assert has_k_res(calls[0]) == (ring_program != "launch")


@pytest.mark.parametrize("launch_from,launches", [(512, 2), (513, 1)])
def test_auto_ring_program_by_capacity(monkeypatch, launch_from, launches):
    """ring_program="auto" (the default): the ring in a launch of its own from LAUNCH_RING_FROM
    tokens of capacity (measured faster at 4096), in the bulk's launch below; same numbers."""
    monkeypatch.setattr(attention_pallas, "LAUNCH_RING_FROM", launch_from)
    cfg = kj.KIVIConfig(group_size=32, residual_length=32)
    cache = _cache(cfg, [300, 77, 190], 2, 64, jnp.float32, 25)
    assert cache.capacity == 512
    q = jax.random.normal(jax.random.key(26), (3, 8, 1, 64), jnp.float32)
    run = functools.partial(attention_pallas.decode_attention, interpret=True)
    assert attention_pallas.DEFAULT_RING_PROGRAM == "auto"
    assert _rel(run(q, cache), kj.decode_attention(q, cache, impl="reference")) <= 1e-5
    calls = jaxpr_walk.pallas_calls(jax.make_jaxpr(run)(q, cache).jaxpr)
    assert len(calls) == launches


@pytest.mark.parametrize("launch_from,short,asked,stages", [(4096, 2, None, 2), (512, 2, None, 3), (4096, None, None, 3),
                                                         (4096, 2, 4, 4)])
def test_kernel_stages_by_capacity(monkeypatch, launch_from, short, asked, stages):
    """The KIVI kernel runs SHORT_NUM_STAGES pipeline stages below LAUNCH_RING_FROM tokens of
    capacity (rows of a few chunks: measured faster there), its own default (3) from there on or
    when SHORT_NUM_STAGES is None, and any num_stages asked for (traced for a GPU: the Triton
    compiler parameters of each launch)."""
    monkeypatch.setattr(attention_pallas, "LAUNCH_RING_FROM", launch_from)
    monkeypatch.setattr(attention_pallas, "SHORT_NUM_STAGES", short)
    cache = _cache(kj.KIVIConfig(group_size=32, residual_length=32), [300, 77], 2, 64, jnp.float32, 25)
    assert cache.capacity == 512
    q = jnp.ones((2, 4, 1, 64), jnp.float32)
    run = functools.partial(attention_pallas.decode_attention, num_stages=asked)
    calls = jaxpr_walk.pallas_calls(jax.make_jaxpr(run)(q, cache).jaxpr)
    assert calls and all(e.params["compiler_params"].num_stages == stages for e in calls)


def test_ring_in_the_kernel_only_where_supported():
    """The residual ring goes into the kernel when its steps (the largest power of two dividing
    R, at most a chunk) are whole code words (else plain JAX: R = 48 with 1-bit keys, 16-slot
    steps of half words, as in the half-word test above)."""
    from pallas_kernels import kivi_decode, kivi_window

    def kernel_inputs(cfg):
        cache = _cache(cfg, [150, 60], 1, 32, jnp.float32, seed=0, appends=1)
        q = jnp.ones((2, 1, 1, 32))
        jaxpr = jax.make_jaxpr(lambda q, c: attention_pallas.decode_attention(q, c, interpret=True))(q, cache)
        calls = jaxpr_walk.pallas_calls(jaxpr.jaxpr)
        assert len(calls) == 1
        return cache, [v.aval.shape for v in calls[0].invars]

    cache, shapes = kernel_inputs(kj.KIVIConfig(group_size=16, residual_length=32))
    assert cache.k_res.shape in shapes
    cache, shapes = kernel_inputs(kj.KIVIConfig(k_bits=1, group_size=16, residual_length=48))
    assert cache.k_res.shape not in shapes and cache.k_res[:, :, :48].shape not in shapes
    assert kivi_window.supported(128, 2, 32, 4096, 64) and not kivi_window.supported(128, 2, 32, 64, 64)
    assert not kivi_window.supported(48, 1, 16, 4096, 16)
    z = jnp.zeros((1, 1, 16, 32))
    codes = jnp.zeros((1, 1, 8, 32), jnp.uint32)
    sc = jnp.zeros((1, 1, 16, 32))
    i = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="ring_len=48"):
        kivi_decode.kivi_decode_partials(z, codes, sc, sc, codes, jnp.zeros((1, 1, 256, 2)), jnp.zeros((1, 1, 256, 2)),
                                         i, i, i, i, k_bits=1, v_bits=1, group_size=16, chunk=32,
                                         ring=(z[:, :, :1].repeat(48, 2), z[:, :, :1].repeat(48, 2), i, i), ring_len=48,
                                         interpret=True)
    with pytest.raises(ValueError, match="ring and ring_len"):
        kivi_decode.kivi_decode_partials(z, codes, sc, sc, codes, jnp.zeros((1, 1, 256, 2)), jnp.zeros((1, 1, 256, 2)),
                                         i, i, i, i, k_bits=1, v_bits=1, group_size=16, chunk=32, ring_len=32,
                                         interpret=True)


@pytest.mark.parametrize("r,g,sinks,layers", [(96, 32, 0, 0), (48, 16, 3, 0), (96, 32, 0, 2)])
def test_rings_not_a_power_of_two_in_the_kernel(r, g, sinks, layers):
    """R = 96 or 48 (a multiple of the group, not a power of two) is walked by the kernel in
    steps of 32 or 16 slots, rows around multiples of R against the reference, read in place
    from a layer stack too; ring_program="xla" (the ring in plain JAX, how such rings ran
    before) gives the same numbers with no ring in the kernel."""
    from pallas_kernels import kivi_window

    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=g, residual_length=r, sink_tokens=sinks)
    assert kivi_window.ring_chunk(r, 64) == g and kivi_window.supported(r, 2, g, 4096, 64)
    lengths = [l + sinks for l in (5, r - 1, r, r + 1, 2 * r - 1, 2 * r + 3, 3 * r + 7)]
    caches = [_cache(cfg, lengths, 2, 32, jnp.float32, seed=31 + i, appends=1) for i in range(max(layers, 1))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *caches) if layers else None
    cache = caches[-1]
    q = jax.random.normal(jax.random.key(32), (len(lengths), 4, 1, 32))

    def run(q, cache, ring_program=None):
        stack = (stacked, jnp.int32(layers - 1)) if layers else None
        return attention_pallas.decode_attention(q, cache, interpret=True, stack=stack, ring_program=ring_program)

    ref = kj.decode_attention(q, cache, impl="reference")
    for ring_program in (None, "xla"):
        out = run(q, cache, ring_program)
        for i in range(len(lengths)):
            assert _rel(out[i], ref[i]) <= 1e-5, (lengths[i], ring_program)
        calls = jaxpr_walk.pallas_calls(jax.make_jaxpr(functools.partial(run, ring_program=ring_program))(q, cache).jaxpr)
        ring_shape = (stacked or cache).k_res.shape  # the whole buffer, sink slots included: no copy
        assert any(v.aval.shape == ring_shape for c in calls for v in c.invars) == (ring_program is None)


def test_unsupported_ring_with_the_launch_program(monkeypatch):
    """A ring the kernel does not take (1-bit keys, R = 48) in a cache past LAUNCH_RING_FROM
    tokens (where "auto" means "launch"): the ring in plain JAX, the bulk in the kernel (the
    ring program's name once reached the kernel as its ring split, which refused it)."""
    monkeypatch.setattr(attention_pallas, "LAUNCH_RING_FROM", 64)
    cfg = kj.KIVIConfig(k_bits=1, v_bits=2, group_size=16, residual_length=48)
    cache = _cache(cfg, [150, 60], 1, 32, jnp.float32, seed=33, appends=1)
    q = jax.random.normal(jax.random.key(34), (2, 2, 1, 32))
    ref = kj.decode_attention(q, cache, impl="reference")
    for ring_program in (None, "launch"):
        assert _rel(attention_pallas.decode_attention(q, cache, interpret=True, ring_program=ring_program), ref) <= 1e-5


@pytest.mark.parametrize("ring_split", ["first", "own"])
def test_ring_walked_by_the_split_asked(ring_split):
    """The ring alone (every row's bulk empty): its partial comes from split 0, or from the
    extra last split with ring_split="own" (the other splits hold no token), and it is the
    softmax over the window's tokens in float64 from the materialized cache (keys of the
    flushed block dequantized, the newer ones as given)."""
    from pallas_kernels import kivi_decode

    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    lengths = [150, 60, 20]  # a full ring with flushed keys, one without, a short one
    cache = _cache(cfg, lengths, 2, 32, jnp.float32, seed=5, appends=1)
    b, h, d, r = 3, 2, 32, 32
    q = jax.random.normal(jax.random.key(8), (b, h, 1, d))
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, 15), (0, 0)))
    z = jnp.zeros((b,), jnp.int32)
    o, m, l = kivi_decode.kivi_decode_partials(
        qp, cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes, cache.v_scale, cache.v_min, z, z, z, z,
        k_bits=2, v_bits=2, group_size=16, chunk=16, num_splits=2, interpret=True,
        ring=(cache.k_res, cache.v_res, cache.lengths, cache.num_quantized_keys), ring_len=r, ring_split=ring_split)
    at = 2 if ring_split == "own" else 0
    assert l.shape[2] == (3 if ring_split == "own" else 2)
    l = np.asarray(l)
    assert np.all(l[:, :, at, 0] > 0) and np.all(np.delete(l, at, axis=2) == 0)
    k_hat, v_hat = (np.asarray(x, np.float64) for x in cache.materialize(rotated=True))
    for row, n in enumerate(np.asarray(cache.lengths)):
        w = slice(max(n - r, 0), n)  # the window's tokens
        s = np.einsum("hd,htd->ht", np.asarray(q[row, :, 0], np.float64), k_hat[row, :, w])
        p = np.exp(s - s.max(axis=1, keepdims=True))
        want = np.einsum("ht,htd->hd", p, v_hat[row, :, w]) / p.sum(axis=1, keepdims=True)
        got = np.asarray(o[row, :, at, 0], np.float64) / l[row, :, at, 0][:, None]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _stacked_shapes(layers, batch, heads=32, tokens=4096, d=128, g=32):
    """ShapeDtypeStructs of the kernel's inputs over a layer-stacked 2-bit bf16 cache."""
    s = jax.ShapeDtypeStruct
    b, h, t = batch, heads, tokens
    arrays = ((t * 2 // 32, d, jnp.uint32), (t // g, d, jnp.bfloat16), (t // g, d, jnp.bfloat16),
              (t * 2 // 32, d, jnp.uint32), (t, d // g, jnp.bfloat16), (t, d // g, jnp.bfloat16))
    return ((s((b, h, 16, d), jnp.float32),) + tuple(s((layers, b, h, n, m), dt) for n, m, dt in arrays)
            + tuple(s((b,), jnp.int32) for _ in range(4)))


@pytest.mark.parametrize("layers, batch, code_bits", [(2, 2, 32), (32, 64, 64)])
def test_stacked_cache_of_any_size_lowers_with_wide_enough_offsets(layers, batch, code_bits):
    """Reading a stack of more than 2**31 codes in place (Llama-2-7B, 4096 tokens, B=64: 8 GiB
    of key codes) needs 64-bit element offsets; the Triton lowering switches to them past
    2**32 bytes. Lowered for CUDA on this machine, nothing allocated."""
    from pallas_kernels import kivi_decode
    from pallas_kernels.triton_ir import load_offset_widths, lower_to_ttir

    args = _stacked_shapes(layers, batch)
    assert (args[1].size >= 2**31) == (code_bits == 64)
    ttir = lower_to_ttir(lambda layer, *a: kivi_decode.kivi_decode_partials(
        *a, layer=layer, k_bits=2, v_bits=2, group_size=32, chunk=64), jax.ShapeDtypeStruct((), jnp.int32), *args)
    widths = load_offset_widths(ttir)
    assert widths["i32"] == {code_bits}, widths  # the uint32 codes' loads
    assert widths["bf16"] == {32}, widths  # scales/mins: < 2**31 elements even at B=64


@pytest.mark.parametrize("variant", ["swap", "dequant"])
def test_kernel_takes_value_scales_tokens_minor(variant):
    """v_scales_t=True (v_scale, v_min as [B, Hkv, D/G, Tc], a candidate layout): the same
    partials as the cache's own [B, Hkv, Tc, D/G] layout, and the layout is checked."""
    from pallas_kernels import kivi_decode

    cfg = kj.KIVIConfig(group_size=32, residual_length=32)
    cache = _cache(cfg, [300, 77, 190], 2, 64, jnp.float32, 31)
    q = jax.random.normal(jax.random.key(32), (3, 2, 16, 64), jnp.float32)
    end, zero, chunk = cache.num_quantized_values, jnp.zeros((3,), jnp.int32), 32
    kw = dict(k_bits=2, v_bits=2, group_size=32, chunk=chunk, num_splits=2, variant=variant, interpret=True)
    args = (q, cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes)

    def run(v_scale, v_min, **extra):
        return kivi_decode.kivi_decode_partials(*args, v_scale, v_min, zero, -(-end // chunk), zero, end, **kw, **extra)

    want = run(cache.v_scale, cache.v_min)
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    got = run(t(cache.v_scale), t(cache.v_min), v_scales_t=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    o_flipped = run(t(cache.v_scale)[:, :, ::-1], t(cache.v_min)[:, :, ::-1], v_scales_t=True)[0]
    assert _rel(o_flipped, want[0]) > 1e-2  # the groups' scales are really read per group
    with pytest.raises(ValueError, match=r"v_scale and v_min must end in \(2, "):
        run(cache.v_scale, cache.v_min, v_scales_t=True)


def _dense(lengths, hq, hkv, t, d, dtype, seed):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    cache = kj.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=t, dtype=dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), dtype) for _ in range(2))
    cache = cache.prefill(k, v, lengths=jnp.asarray(lengths, jnp.int32))
    return cache, jnp.asarray(rng.standard_normal((b, hq, 1, d)), dtype)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("gqa", [1, 4])
def test_dense_kernel_matches_reference(dtype, tol, gqa):
    """The dense flash-decoding kernel (interpret mode): ragged rows, a capacity that is no
    multiple of the chunk (masked last chunk), a sliding window, an empty row (zeros)."""
    cache, q = _dense([203, 77, 5, 0], 2 * gqa, 2, 203, 32, dtype, 41)  # Hkv = 2, Hq = 2 * gqa
    for window in (None, 50):
        want = kj.decode_attention(q, cache, impl="reference", window=window)
        got = attention_pallas.decode_attention(q, cache, window=window, interpret=True, num_splits=2)
        assert got.shape == want.shape and got.dtype == q.dtype
        assert _rel(got[:3], want[:3]) <= tol, window
        assert float(jnp.abs(got[3].astype(jnp.float32)).max()) == 0.0  # nothing to attend: 0, not NaN
    # the window really changes the answer (a kernel ignoring start would pass the above only by luck)
    assert _rel(kj.decode_attention(q, cache, impl="reference", window=50)[:2],
                kj.decode_attention(q, cache, impl="reference")[:2]) > 1e-2


def test_dense_kernel_reads_a_layer_stacked_cache_in_place():
    layers = [_dense([130, 64, 7], 4, 2, 130, 32, jnp.float32, seed)[0] for seed in (51, 52, 53)]
    q = _dense([1, 1, 1], 4, 2, 130, 32, jnp.float32, 54)[1]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

    def run(stacked, i):
        view = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, keepdims=False), stacked)
        return attention_pallas.decode_attention(q, view, interpret=True, stack=(stacked, i))

    for i in (0, 2):
        got = jax.jit(run)(stacked, jnp.int32(i))
        assert _rel(got, kj.decode_attention(q, layers[i], impl="reference")) <= 1e-5, i
        assert _rel(got, kj.decode_attention(q, layers[1], impl="reference")) > 1e-2  # not another layer's
    call = jaxpr_walk.pallas_calls(jax.make_jaxpr(run)(stacked, jnp.int32(1)).jaxpr)[0]
    assert stacked.k.shape in [v.aval.shape for v in call.invars]


@pytest.mark.parametrize("dense", [False, True])
def test_wrapper_checks_window_and_splits(dense):
    """attention_pallas.decode_attention (tests and benchmarks call it directly): window=0 gave
    all-zero outputs, num_splits=0 was taken as the default and -1 failed inside NumPy."""
    cfg = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    cache = _dense([40, 7], 4, 2, 64, 32, jnp.float32, 3)[0] if dense else _cache(cfg, [40, 7], 2, 32, jnp.float32, 3)
    q = jnp.ones((2, 4, 1, 32))
    for window in (0, -5, 2.0):
        with pytest.raises(ValueError, match=rf"window={window!r} must be None or an integer >= 1"):
            attention_pallas.decode_attention(q, cache, window=window, interpret=True)
    for splits in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"num_splits={splits!r} must be None .* or an integer >= 1"):
            attention_pallas.decode_attention(q, cache, num_splits=splits, interpret=True)


def test_dense_kernel_bad_arguments():
    from pallas_kernels.dense_decode import dense_decode_partials

    z = jnp.zeros((2,), jnp.int32)
    q, k = jnp.zeros((2, 2, 16, 32)), jnp.zeros((2, 2, 64, 32))
    with pytest.raises(ValueError, match=r"k and v must both be \[B=2, Hkv=2, T, D=32\]"):
        dense_decode_partials(q, k, jnp.zeros((2, 2, 64, 16)), z, z, z, z, interpret=True)
    with pytest.raises(ValueError, match="q rows G=12 must be a power of two"):
        dense_decode_partials(q[:, :, :12], k, k, z, z, z, z, interpret=True)
    with pytest.raises(ValueError, match="chunk=48 must be a power of two >= 16"):
        dense_decode_partials(q, k, k, z, z, z, z, chunk=48, interpret=True)
