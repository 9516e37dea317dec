"""MosaicKIVICache (kivi_jax/cache_mosaic.py): KIVI-2 stored in the Mosaic GPU kernel's layout.

Against KIVICache, the reference implementation of the same algorithm: the same dequantized
numbers after prefill and appends (flushes, spills, ragged and full rows), the kernel's views
equal to the layout the compiled kernel was checked on (kivi_mosaic.repack of the KIVICache),
the ring holding the window's keys (dequantized once flushed), the attention glue (window +
combine) against the reference, a model's logits, the stacked
row writes through the Pallas kernel (interpreted), and the bad configurations.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpr_walk
import kivi_jax as kj
import models
from benchmarks.mosaic_attention import from_cache
from kivi_jax import attention_mosaic
from kivi_jax import cache_common as cc
from kivi_jax import cache_mosaic
from kivi_jax.cache_mosaic import MosaicKIVICache
from models.cache import StackedCache
from models.config import ModelConfig
from pallas_kernels import kivi_mosaic as km
from pallas_kernels import mosaic_window

D = 128
MOSAIC = kj.KIVIConfig(layout="mosaic")
TOKENS = kj.KIVIConfig(layout="tokens")
# a 2-layer Llama with the Mosaic layout's head_dim
HD128 = ModelConfig(vocab_size=97, hidden_size=256, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=2,
                    head_dim=128)


def _pair(lengths, extra, max_length=700, heads=2, seed=0, **config):
    """A KIVICache and a MosaicKIVICache (KIVIConfig ``config`` besides the layout) prefilled with
    the same prompt, and ``extra`` more tokens."""
    b, t = len(lengths), max(lengths)
    k = jax.random.normal(jax.random.key(seed), (b, heads, t + extra, D)) * (
        1 + 4 * jax.random.bernoulli(jax.random.key(seed + 1), 0.1, (D,)))
    v = jax.random.normal(jax.random.key(seed + 2), (b, heads, t + extra, D))
    lens = jnp.asarray(lengths, jnp.int32)
    kw = dict(batch=b, num_kv_heads=heads, head_dim=D, max_length=max_length, dtype=jnp.float32)
    prefill = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))  # eager compiles op by op: slow on CI
    a = prefill(kj.KIVICache.init(dataclasses.replace(TOKENS, **config), **kw), k[:, :, :t], v[:, :, :t], lens)
    m = prefill(MosaicKIVICache.init(dataclasses.replace(MOSAIC, **config), **kw), k[:, :, :t], v[:, :, :t], lens)
    return a, m, k[:, :, t:], v[:, :, t:]


def _same_tokens(a, m):
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(m.lengths))
    np.testing.assert_array_equal(np.asarray(a.overflow), np.asarray(m.overflow))
    (ka, va), (kb, vb) = a.materialize(), m.materialize()
    for row, n in enumerate(np.asarray(a.lengths)):
        # the same codes, scales and mins: the same numbers, bit for bit
        np.testing.assert_array_equal(np.asarray(kb[row, :, :n]), np.asarray(ka[row, :, :n]))
        np.testing.assert_array_equal(np.asarray(vb[row, :, :n]), np.asarray(va[row, :, :n]))


def _ring_holds_the_window(a, m):
    """Every key of the window [max(L - R, 0), L) sits in ring slot t % R as the KIVICache's
    materialize gives it (in the stored basis): dequantized where its block was flushed (t < n),
    as given after."""
    r, sk = m.config.residual_length, m.config.sink_tokens
    ka = np.asarray(a.materialize(rotated=True)[0])
    for row, n in enumerate(np.asarray(m.body_lengths)):  # body positions (after the sinks: token sk + t)
        t = np.arange(max(n - r, 0), n)
        np.testing.assert_array_equal(np.asarray(m.k_res[row][:, t % r]), ka[row][:, sk + t])


def _kernel_views_match(a, m):
    pad = m.capacity - a.capacity
    plain = from_cache(a)
    plain = [jnp.pad(x, [(0, 0), (0, pad // (32 if i == 1 or i == 2 else 1)), (0, 0)]) for i, x in enumerate(plain)]
    for got, want in zip(m.kernel_arrays(), km.repack(*plain)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_prefill_and_appends_hold_kivis_numbers():
    """Ragged rows (one shorter than R, one at a flush boundary), 300 appends: every flush and
    spill, and a row reaching max_length (then refused and flagged, like KIVICache)."""
    a, m, k, v = _pair([400, 255, 5, 127], 300, max_length=560)
    _same_tokens(a, m)
    _ring_holds_the_window(a, m)
    _kernel_views_match(a, m)
    step = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(k.shape[2]):
        a, m = step(a, k[:, :, i:i + 1], v[:, :, i:i + 1]), step(m, k[:, :, i:i + 1], v[:, :, i:i + 1])
        if i in (0, 127, 299):
            _same_tokens(a, m)
            _ring_holds_the_window(a, m)
    assert np.asarray(m.lengths).tolist() == [560, 555, 305, 427] and np.asarray(m.overflow).tolist()[0]
    _kernel_views_match(a, m)


def test_from_kivi_converts_in_one_computation_without_unpacked_codes():
    """from_kivi outside a jit: the same state as the KIVICache (tokens, ring, kernel views), and
    one compiled conversion whose temporaries stay far below the 4 bytes a code that its
    op-by-op unpacking allocated (a 32 GiB transpose for 2^33 codes ran the H200 out of memory)."""
    a, _, _, _ = _pair([700, 301, 44], 0, max_length=700, heads=4)
    m = MosaicKIVICache.from_kivi(a)
    _same_tokens(a, m)
    _ring_holds_the_window(a, m)
    _kernel_views_match(a, m)
    unpacked = 2 * a.k_codes.size * 16 * 4  # keys' and values' codes as uint32, one a code
    temp = cache_mosaic._from_kivi.lower(a, m.config).compile().memory_analysis().temp_size_in_bytes
    assert temp < unpacked / 8, (temp, unpacked)


def _bulk(rows, lengths, *arrays, row_offset=0, kh, vh, starts=None, window=None):
    """A plain-JAX stand-in for the kernel's bulk partials: tokens [0, lengths) (and >= starts)
    of each (row, KV head) of kh, vh [R, T, D]."""
    q = rows if rows.ndim == 3 else rows[:, None]
    s = jnp.einsum("rgd,rtd->rgt", q, kh, precision="highest")  # (not TF32 on a GPU)
    t = jnp.arange(kh.shape[1])[None, None]
    valid = t < lengths[:, None, None]
    if starts is not None:
        valid &= t >= starts[:, None, None]
    s = jnp.where(valid, s, -jnp.inf)
    top = s.max(-1)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(s - safe[..., None])
    out = jnp.einsum("rgt,rtd->rgd", p, vh, precision="highest"), jnp.where(jnp.isfinite(top), top, -1e30), p.sum(-1)
    return out if rows.ndim == 3 else tuple(x[:, 0] for x in out)


def _stand_in(c):  # the stand-in bulk over the materialized cache's body (past the sinks; the stored basis, as
    # the kernel reads the stores)
    b, h, sk = c.lengths.shape[0], c.num_kv_heads, c.config.sink_tokens
    return functools.partial(_bulk, **dict(zip(("kh", "vh"), (x[:, :, sk:].reshape(b * h, -1, D)
                                                              for x in c.materialize(rotated=True)))))


def test_attention_glue_matches_the_reference():
    """The Mosaic path's window (tokens [m, L): keys and values from the ring, flushed keys held
    there dequantized) and combine, with a plain-JAX stand-in for the kernel's bulk
    partials, against the reference over the KIVICache (MHA and 4 query heads a KV head)."""
    a, m, k, v = _pair([400, 333, 5], 140)

    # jitted (eager compiles op by op)
    glue = jax.jit(lambda q, c: attention_mosaic.decode_attention(q, c, bulk=_stand_in(c)))
    ref = jax.jit(lambda q, c: kj.decode_attention(q, c, impl="reference"))
    auto = jax.jit(lambda q, c: kj.decode_attention(q, c))
    # the Triton window kernel (interpreted here): its partials combined in XLA (the GPU default),
    # and going on from the bulk's partials
    glue_kernels = [jax.jit(lambda q, c, w=w: attention_mosaic.decode_attention(q, c, window_impl=w, bulk=_stand_in(c)))
                    for w in ("pallas", "pallas_continued")]
    step = jax.jit(lambda c, k, v: c.append(k, v))
    # rows at L % R == 0 (every window key flushed: n = L) and 1 after: i = 112, 113 (row 0) and
    # 123, 124 (row 2); the first and last appends
    for i in range(k.shape[2] + 1):
        if i in (0, 1, 112, 113, 123, 124, 140):
            for hq in (2, 8):
                q = jax.random.normal(jax.random.key(5), (3, hq, 1, D))
                want = ref(q, a)
                np.testing.assert_allclose(np.asarray(glue(q, m)), np.asarray(want), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(np.asarray(auto(q, m)), np.asarray(want), rtol=1e-5, atol=1e-5)
                if i in (0, 112, 113, 140):
                    for glue_kernel in glue_kernels:
                        np.testing.assert_allclose(np.asarray(glue_kernel(q, m)), np.asarray(want), rtol=1e-5,
                                                   atol=1e-5)
        if i < k.shape[2]:
            a, m = step(a, k[:, :, i:i + 1], v[:, :, i:i + 1]), step(m, k[:, :, i:i + 1], v[:, :, i:i + 1])


@pytest.mark.parametrize("rotate", ["k", "v", "kv"])
def test_rotation_in_the_mosaic_layout(rotate):
    """KIVIConfig(rotate=...) in the Mosaic layout: the stores hold K·H and/or V·H as KIVICache's
    do (the same numbers bit for bit in both bases, the kernel views equal to repack's of the
    KIVICache, the ring's keys in the stored basis) through prefill and 140 appends, and the
    attention glue (q rotated before the bulk and window, the output after; a plain-JAX stand-in
    for the kernel) and the reference on the Mosaic cache match the reference on the KIVICache."""
    a, m, k, v = _pair([400, 255, 5], 140, rotate=rotate)
    assert m.config.rotate == rotate
    glue = jax.jit(lambda q, c: attention_mosaic.decode_attention(q, c, bulk=_stand_in(c)))
    ref = jax.jit(lambda q, c: kj.decode_attention(q, c, impl="reference"))
    step = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(k.shape[2] + 1):
        if i in (0, 113, 140):
            _same_tokens(a, m)
            (ka, va), (kb, vb) = a.materialize(rotated=True), m.materialize(rotated=True)
            for row, n in enumerate(np.asarray(a.lengths)):
                np.testing.assert_array_equal(np.asarray(kb[row, :, :n]), np.asarray(ka[row, :, :n]))
                np.testing.assert_array_equal(np.asarray(vb[row, :, :n]), np.asarray(va[row, :, :n]))
            _ring_holds_the_window(a, m)
            _kernel_views_match(a, m)
            for hq in (2, 8):
                q = jax.random.normal(jax.random.key(6 + i), (3, hq, 1, D))
                want = ref(q, a)
                np.testing.assert_allclose(np.asarray(glue(q, m)), np.asarray(want), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(np.asarray(ref(q, m)), np.asarray(want), rtol=1e-5, atol=1e-5)
                # not the unrotated arithmetic: the rotation matters to these numbers
                plain = kj.decode_attention(q, dataclasses.replace(a, config=dataclasses.replace(a.config, rotate="none")),
                                            impl="reference")
                assert float(jnp.abs(plain - want).max()) > 1e-2
        if i < k.shape[2]:
            a, m = step(a, k[:, :, i:i + 1], v[:, :, i:i + 1]), step(m, k[:, :, i:i + 1], v[:, :, i:i + 1])


@pytest.mark.parametrize("rotate,kernel_sinks", [("none", False), ("kv", False), ("kv", True)])
def test_sinks_in_the_mosaic_layout(rotate, kernel_sinks, monkeypatch):
    """KIVIConfig(sink_tokens=4) in the Mosaic layout: the first 4 tokens of a row in full
    precision in ring slots R .. R + 3 and the stores holding the body, the same numbers as
    KIVICache's through prefill and 140 appends (rows shorter than, at and past the sinks; a row
    filling its sinks by appends), the ring's window and the kernel views; the attention glue
    (the plain-JAX window with the sinks' partials; the Triton window kernel interpreted, next
    to the sinks' partials or, with attention_mosaic.KERNEL_SINKS, attending them in its
    program, and that kernel going on from the bulk's partials), with sliding windows that do
    and do not reach the sinks, against the reference on the KIVICache; the reference on the
    Mosaic cache too."""
    monkeypatch.setattr(attention_mosaic, "KERNEL_SINKS", kernel_sinks)  # read when the glue is traced below
    a, m, k, v = _pair([2, 4, 5, 400, 255], 140, rotate=rotate, sink_tokens=4)
    assert m.k_res.shape[2] == 128 + 4 and m.config.sink_tokens == 4
    ref = jax.jit(lambda q, c, w: kj.decode_attention(q, c, impl="reference", window=w), static_argnums=2)
    glues = {w: jax.jit(lambda q, c, w=w, window=None: attention_mosaic.decode_attention(
        q, c, bulk=_stand_in(c), window_impl=w, window=window), static_argnames="window")
        for w in ("jax", "pallas", "pallas_continued")}
    step = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(k.shape[2] + 1):
        if i in (0, 2, 113, 140):
            _same_tokens(a, m)
            _ring_holds_the_window(a, m)
            _kernel_views_match(a, m)
            for hq, window in ((2, None), (8, None), (2, 100), (8, 300)):
                q = jax.random.normal(jax.random.key(7 + i), (5, hq, 1, D))
                want = ref(q, a, window)
                np.testing.assert_allclose(np.asarray(ref(q, m, window)), np.asarray(want), rtol=1e-5, atol=1e-5)
                for name in ("jax",) if i in (2, 113) else glues:
                    got = glues[name](q, m, window=window)
                    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                                               err_msg=f"{name} after {i}, window {window}")
        if i < k.shape[2]:
            a, m = step(a, k[:, :, i:i + 1], v[:, :, i:i + 1]), step(m, k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert np.asarray(m.lengths).tolist() == [142, 144, 145, 540, 395]


def test_window_kernel_matches_the_jax_window():
    """attention_mosaic.window_kernel_partials (pallas_kernels.mosaic_window, interpreted) gives window_partials' partials, float32 and
    bf16 rings, MHA and 4 query heads a KV head, rows: every window key flushed (L % R == 0),
    one token after a flush, shorter than R, in mid-block, and empty."""
    _, m, k, v = _pair([384, 385, 5, 300, 200], 0, heads=2)
    m = dataclasses.replace(m, lengths=m.lengths.at[4].set(0))  # (its quantized counts follow the length)
    for dtype in (jnp.float32, jnp.bfloat16):
        c = dataclasses.replace(m, k_res=m.k_res.astype(dtype), v_res=m.v_res.astype(dtype))
        for g in (1, 4):
            qg = jax.random.normal(jax.random.key(g), (5, 2, g, D))  # unscaled: the scores are (q·k)/sqrt(D)
            want = attention_mosaic.window_partials(qg, c, scale=1 / np.sqrt(D))
            got = attention_mosaic.window_kernel_partials(qg, c, scale=1 / np.sqrt(D))  # interpreted here
            tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: q rounded for the dot, p for p·V
            np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=tol, atol=tol)
            o_got, o_want = (np.asarray(o) / np.maximum(np.asarray(l), 1e-30)[..., None] for o, _, l in (got, want))
            np.testing.assert_allclose(o_got, o_want, rtol=tol, atol=tol)
            np.testing.assert_allclose(np.asarray(got[2])[:4] / np.asarray(want[2])[:4], 1.0, rtol=tol)
            assert np.all(np.asarray(got[2])[4] == 0) and np.all(np.asarray(got[1])[4] <= -1e29)  # the empty row


@pytest.mark.parametrize("sinks", [3, 5, 21])
def test_window_kernel_attends_the_sinks(sinks):
    """The window kernel's program attends the S sinks after the ring (mosaic_window's
    sink_len, 16 slots a step, the first step reading and masking the ring's last slots when S
    is not a multiple of 16): its partials equal the plain-JAX window's merged with the plain-JAX
    sinks', float32, MHA and 4 query heads a KV head, rows shorter than, at and past the sinks
    and past a flush, with and without a sliding window that drops some sinks, and read in place
    as layer 1 of a stack."""
    _, m, _, _ = _pair([2, sinks, sinks + 3, 300, 400], 0, heads=2, sink_tokens=sinks)
    L = m.lengths
    for g in (1, 4):
        qg = jax.random.normal(jax.random.key(g + sinks), (5, 2, g, D))  # unscaled: scores (q·k)·sc
        sc = 1 / np.sqrt(D)
        for window in (None, sinks + 1, 200):
            starts = None if window is None else jnp.maximum(L - window, 0)  # absolute
            body = None if starts is None else jnp.maximum(starts - sinks, 0)
            want = attention_mosaic._merged([attention_mosaic.window_partials(qg, m, body, sc),
                                             attention_mosaic.sink_partials(qg, m, starts, sc)])
            bounds = (jnp.zeros_like(L) if starts is None else starts, L)
            got = attention_mosaic.window_kernel_partials(qg, m, starts=body, sinks=bounds, scale=sc)  # interpreted
            if window == 200:  # layer 1 of a stack of two, read in place
                stack = dataclasses.replace(m, k_res=jnp.stack([m.k_res + 1, m.k_res]),
                                            v_res=jnp.stack([m.v_res - 1, m.v_res]))
                got = attention_mosaic.window_kernel_partials(qg, m, stack=(stack, jnp.int32(1)), starts=body,
                                                              sinks=bounds, scale=sc)
            np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
            o_got, o_want = (np.asarray(o) / np.asarray(l)[..., None] for o, _, l in (got, want))
            np.testing.assert_allclose(o_got, o_want, rtol=1e-5, atol=1e-5, err_msg=f"G={g}, window {window}")
            np.testing.assert_allclose(np.asarray(got[2]) / np.asarray(want[2]), 1.0, rtol=1e-5)
    ring = jnp.zeros((1, 1, 128 + 4, D))
    with pytest.raises(ValueError, match=r"sink_len=4 and sinks=None: pass the sinks' bounds"):
        mosaic_window.window_partials(jnp.zeros((1, 1, 1, D)), ring, ring, jnp.ones((1,), jnp.int32),
                                      jnp.zeros((1,), jnp.int32), residual=128, sink_len=4, interpret=True)
    with pytest.raises(ValueError, match=r"sink_len=-1 must be >= 0"):
        mosaic_window.window_partials(jnp.zeros((1, 1, 1, D)), ring, ring, jnp.ones((1,), jnp.int32),
                                      jnp.zeros((1,), jnp.int32), residual=128, sink_len=-1, interpret=True)
    with pytest.raises(ValueError, match=r"R' >= R \+ S = 128 \+ 8"):
        mosaic_window.window_partials(jnp.zeros((1, 1, 1, D)), ring, ring, jnp.ones((1,), jnp.int32),
                                      jnp.zeros((1,), jnp.int32), sinks=(jnp.zeros((1,), jnp.int32),) * 2,
                                      residual=128, sink_len=8, interpret=True)


def test_window_kernel_lowers_for_cuda_reading_the_stack_in_place():
    """Lowered for a GPU (Triton IR, no GPU needed), with the stacked ring read in place: per
    64-slot chunk one q·k and one p·v dot, 4 for R = 128, for 1 and 4 query heads a KV head."""
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    layers, b, h, r = 3, 4, 2, 128
    for g in (1, 4):
        args = (s((b, h, g, D), jnp.float32), s((layers, b, h, r, D), jnp.bfloat16),
                s((layers, b, h, r, D), jnp.bfloat16)) + (s((b,), jnp.int32),) * 2
        ir = lower_to_ttir(lambda *a: mosaic_window.window_partials(*a, layer=jnp.int32(1)), *args)
        assert ir.count("tt.dot") == 4
        # going on from the bulk's partials (window_attention): the same dots, the partials loaded
        parts = (s((b, h, g, D), jnp.float32), s((b, h, g), jnp.float32), s((b, h, g), jnp.float32))
        ir = lower_to_ttir(lambda *a: mosaic_window.window_attention(*a[:5], a[5:], layer=jnp.int32(1)), *args, *parts)
        assert ir.count("tt.dot") == 4
        # a sliding window: each row's start read too
        ir = lower_to_ttir(lambda *a: mosaic_window.window_partials(*a[:5], starts=a[5], layer=jnp.int32(1)), *args,
                           s((b,), jnp.int32))
        assert ir.count("tt.dot") == 4
        # 5 sinks past the ring (slots R .. R + 5 of buffers of R + 5): one loop of two dots more
        sunk = args[:1] + (s((layers, b, h, r + 5, D), jnp.bfloat16),) * 2 + args[3:]
        ir = lower_to_ttir(lambda *a: mosaic_window.window_partials(*a[:5], sinks=a[5:], layer=jnp.int32(1),
                                                                    residual=r, sink_len=5), *sunk,
                           *(s((b,), jnp.int32),) * 2)
        assert ir.count("tt.dot") == 6


@pytest.mark.parametrize("extra", [{}, dict(sink_tokens=4, rotate="kv")])
def test_model_logits_match_the_tokens_layout(extra):
    """A Llama with head_dim 128: prompt and 6 decode steps, the two layouts' logits agree (plain
    KIVI-2, and with sinks and the rotation)."""
    cfg = HD128
    model = models.init_random(cfg, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (2, 150), 0, cfg.vocab_size)
    lengths = jnp.array([150, 131])
    outs = []
    prompt, step = jax.jit(lambda ids, c, n: model(ids, c, lengths=n)), jax.jit(lambda ids, c: model(ids, c))
    for kivi in (dataclasses.replace(TOKENS, **extra), dataclasses.replace(MOSAIC, **extra)):
        cache = model.init_cache(2, 300, kivi=kivi)
        assert isinstance(cache.layers, MosaicKIVICache if kivi.layout == "mosaic" else kj.KIVICache)
        logits, cache = prompt(ids, cache, lengths)
        steps = [logits[jnp.arange(2), lengths - 1]]
        tok = jnp.argmax(steps[0], -1)[:, None]
        for _ in range(6):
            logits, cache = step(tok, cache)
            steps.append(logits[:, 0])
            tok = jnp.argmax(logits[:, 0], -1)[:, None]
        outs.append(np.stack([np.asarray(x) for x in steps]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_stacked_writes_through_the_row_writes_kernel():
    """A layer-stacked MosaicKIVICache's append as one Pallas launch (interpreted) equals XLA's."""
    _, m, k, v = _pair([300, 127], 3, heads=2)
    stacked = StackedCache.stack(m, 2).layers
    for i in range(3):
        one = jax.tree.map(lambda x: x[1], stacked)
        writes = one.append_writes(k[:, :, i:i + 1], v[:, :, i:i + 1])
        xla = cc.apply_writes(stacked, *writes, layer=1, impl="xla")
        pallas = cc.apply_writes(stacked, *writes, layer=1, impl="pallas")
        for x, y in zip(jax.tree_util.tree_leaves(xla), jax.tree_util.tree_leaves(pallas)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        stacked = xla
    np.testing.assert_array_equal(np.asarray(stacked.kn[0]), np.asarray(m.kn))  # layer 0 untouched


class _Device:
    """What resolve_layout reads of a jax Device."""

    def __init__(self, platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200"):
        self.platform, self.compute_capability, self.device_kind = platform, compute_capability, device_kind


H100 = _Device(device_kind="NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("case, want", [
    (dict(), "mosaic"),  # Llama-2-7B's heads on one H100/H200
    (dict(devices=[_Device("cpu", None)]), "tokens"),
    (dict(devices=[_Device(), _Device()]), "tokens"),  # a cache over two devices: no kernel under a mesh
    (dict(devices=[_Device(compute_capability="8.0")]), "tokens"),  # no wgmma
    (dict(devices=[_Device(compute_capability="10.0")]), "tokens"),
    (dict(dtype=jnp.float32), "tokens"),
    (dict(dtype=jnp.float16), "tokens"),
    (dict(head_dim=64), "tokens"),
    (dict(config=kj.KIVIConfig(k_bits=4)), "tokens"),
    (dict(config=kj.KIVIConfig(sink_tokens=4)), "mosaic"),  # sinks in the glue, as for "tokens"
    (dict(config=kj.KIVIConfig(rotate="kv")), "mosaic"),  # the rotation lives in the glue, as for "tokens"
    (dict(config=kj.KIVIConfig(residual_length=96)), "tokens"),
    (dict(num_kv_heads=8), "tokens"),  # GQA 4 at a short capacity: measured slower (run51)
    (dict(num_kv_heads=8, max_length=4096), "mosaic"),  # measured faster at 4352 (run56)
    (dict(num_kv_heads=8, max_length=2048), "mosaic"),  # and at 2048 (run82: narrow operands)
    (dict(num_kv_heads=8, max_length=1024), "mosaic"),  # and at 1024 (run93: lane_softmax)
    (dict(num_kv_heads=8, max_length=576), "mosaic"),  # and from 576 (run155)
    (dict(num_kv_heads=8, max_length=575), "tokens"),  # slower at 512 (run93, run156)
    (dict(num_kv_heads=4, max_length=8192), "tokens"),  # 8 query heads a KV head: not the kernel's
    (dict(devices=[H100]), "tokens"),  # the H100: MHA measured slower at 498 tokens (run150)
    (dict(devices=[H100], max_length=1024), "mosaic"),  # and faster at 1024 (run150)
    (dict(devices=[H100], max_length=639), "tokens"),  # slower at 576 (run151)
    (dict(devices=[H100], max_length=640), "mosaic"),  # faster at 640 and 768 (run151)
    (dict(devices=[H100], num_kv_heads=8), "tokens"),  # GQA on the H100 as on the H200: slower at 512 (run152)
    (dict(devices=[H100], num_kv_heads=8, max_length=575), "tokens"),
    (dict(devices=[H100], num_kv_heads=8, max_length=576), "mosaic"),  # faster from 576 (run154)
    (dict(config=TOKENS), "tokens"),  # an explicit layout is kept
    (dict(config=MOSAIC, devices=[_Device("cpu", None)]), "mosaic"),
])
def test_auto_layout_resolution(case, want):
    """KIVIConfig(layout="auto") picks the Mosaic layout only where its kernel runs and was
    measured faster; everything else of the config is kept."""
    kw = dict(config=kj.KIVIConfig(), num_heads=32, num_kv_heads=32, head_dim=D, max_length=512,
              dtype=jnp.bfloat16, devices=[_Device()])
    kw.update(case)
    config = kw.pop("config")
    got = kj.resolve_layout(config, **kw)
    assert got == dataclasses.replace(config, layout=want)


def test_model_init_cache_resolves_auto(monkeypatch):
    """model.init_cache with the default config: a KIVICache off the GPU, a MosaicKIVICache on one
    Hopper GPU (jax.devices stood in), each cache's config naming its layout."""
    cfg = HD128
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device("cpu", None)])
    cache = jax.eval_shape(lambda: model.init_cache(2, 300, kivi=kj.KIVIConfig()))
    assert type(cache.layers) is kj.KIVICache and cache.layers.config == TOKENS
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device()])
    cache = jax.eval_shape(lambda: model.init_cache(2, 300, kivi=kj.KIVIConfig()))
    assert type(cache.layers) is MosaicKIVICache and cache.layers.config == MOSAIC
    cache = jax.eval_shape(lambda: model.init_cache(2, 300, kivi=kj.KIVIConfig(), dtype=jnp.float32))
    assert type(cache.layers) is kj.KIVICache


class _Mesh:
    """What resolve_layout reads of a context mesh (jax.sharding.get_abstract_mesh())."""

    def __init__(self, **shape):
        self.shape, self.empty = shape, not shape


@pytest.mark.parametrize("hosts, mesh, default, want", [
    ([_Device()] * 8, _Mesh(), None, "mosaic"),  # one H200 of eight: generate without a mesh uses one
    ([_Device("cpu", None), _Device()], _Mesh(), None, "tokens"),  # jax.devices()[0] is the default
    ([_Device("cpu", None), _Device()], _Mesh(), 1, "mosaic"),  # jax_default_device set to the GPU
    ([_Device()] * 8, _Mesh(data=2, model=4), None, "tokens"),  # generate(mesh=...) shards the cache
    ([_Device()] * 8, _Mesh(data=1, model=1), None, "mosaic"),
])
def test_auto_layout_default_devices(monkeypatch, hosts, mesh, default, want):
    """resolve_layout's default devices are where a new cache lands: the context mesh's, else
    JAX's default device, not all of jax.devices()."""
    monkeypatch.setattr(jax, "devices", lambda *a: hosts)
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: mesh)
    with contextlib.nullcontext() if default is None else jax.default_device(hosts[default]):
        got = kj.resolve_layout(kj.KIVIConfig(), num_heads=32, num_kv_heads=32, head_dim=D, max_length=512)
    assert got.layout == want


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match=r"layout='mosaic' takes KIVI-2 only; got k_bits=4 \(allowed: 2\)"):
        kj.KIVIConfig(layout="mosaic", k_bits=4)
    with pytest.raises(ValueError, match=r"residual_length=96 \(allowed: 32, 64, 128, 256\)"):
        kj.KIVIConfig(layout="mosaic", residual_length=96)
    with pytest.raises(ValueError, match=r"layout='rows'; allowed: \('auto', 'tokens', 'mosaic'\)"):
        kj.KIVIConfig(layout="rows")
    kw = dict(batch=1, num_kv_heads=1, max_length=256)
    with pytest.raises(ValueError, match="MosaicKIVICache takes head_dim=128; got head_dim=64"):
        MosaicKIVICache.init(MOSAIC, head_dim=64, **kw)
    with pytest.raises(ValueError, match="MosaicKIVICache needs KIVIConfig\\(layout='mosaic'\\)"):
        MosaicKIVICache.init(TOKENS, head_dim=128, **kw)
    with pytest.raises(ValueError, match="KIVICache stores layout='tokens'; got layout='mosaic'"):
        kj.KIVICache.init(MOSAIC, head_dim=128, **kw)
    # "auto" asked of the Mosaic class directly: its own checks, each setting named
    with pytest.raises(ValueError, match=r"MosaicKIVICache takes KIVI-2 only; got k_bits=4 \(allowed: 2\); "
                                         r"group_size=16 \(allowed: 32\)"):
        MosaicKIVICache.init(kj.KIVIConfig(k_bits=4, group_size=16), head_dim=128, **kw)
    with pytest.raises(ValueError, match=r"sink_tokens=256 must be < max_length=256"):
        MosaicKIVICache.init(kj.KIVIConfig(sink_tokens=256, layout="mosaic"), head_dim=128, **kw)
    assert MosaicKIVICache.init(kj.KIVIConfig(), head_dim=128, **kw).config == MOSAIC
    cache = MosaicKIVICache.init(MOSAIC, head_dim=128, **kw)
    q = jnp.zeros((1, 1, 1, D))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            kj.decode_attention(q, cache, impl="pallas")
    with pytest.raises(ValueError, match=r"takes \(1, 2, 4\) query heads a KV head; got Hq=8, Hkv=1"):
        attention_mosaic.decode_attention(jnp.zeros((1, 8, 1, D)), cache)
    ring = jnp.zeros((1, 1, 128, D))
    with pytest.raises(ValueError, match=r"partials must be o \[B=1, Hkv=1, G=1, D=128\], m and l \[B, Hkv, G\]"):
        mosaic_window.window_attention(jnp.zeros((1, 1, 1, D)), ring, ring, jnp.ones((1,), jnp.int32),
                                       jnp.zeros((1,), jnp.int32), (jnp.zeros((1, 1, 1, D)),) + (jnp.zeros((1, 1)),) * 2,
                                       interpret=True)
    with pytest.raises(ValueError, match=r"window_impl='triton'; allowed: \('jax', 'pallas', 'pallas_continued'\)"):
        attention_mosaic.decode_attention(q, cache, window_impl="triton")
    assert dataclasses.replace(MOSAIC, layout="tokens") == TOKENS


def test_layer_of_a_stack_is_read_in_place():
    """stack=(stacked, i): the kernel gets the whole stacked stores and row offset i x B x Hkv
    (here its float64 model, kivi_mosaic.kernel_model, reads exactly those rows) and gives layer
    i's attention, not another layer's; with a sliding window too (the kernel's starts)."""
    layers = [_pair([300, 70], 0, max_length=512, seed=s)[1] for s in (0, 10, 20)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    seen = []

    def bulk(rows, lengths, *arrays, row_offset=0, starts=None, window=None):
        seen.append((arrays[0].shape[0], int(row_offset)))
        sl = [np.asarray(a)[int(row_offset): int(row_offset) + rows.shape[0]] for a in arrays]
        return tuple(jnp.asarray(x) for x in km.kernel_model(rows, lengths, *(jnp.asarray(x) for x in sl),
                                                             starts=None if starts is None else np.asarray(starts),
                                                             window=window, splits=2))  # (window: its 2 steps)

    q = jax.random.normal(jax.random.key(7), (2, 2, 1, D))
    # pallas*: the ring kernel reads layer i in place too
    for i, window, sliding in ((0, "jax", None), (2, "jax", None), (2, "pallas", None), (2, "pallas_continued", None),
                               (2, "jax", 100), (2, "pallas", 200), (2, "pallas_continued", 60)):
        view = jax.tree.map(lambda x: x[i], stacked)
        got = attention_mosaic.decode_attention(q, view, stack=(stacked, jnp.int32(i)), bulk=bulk, window_impl=window,
                                                window=sliding)
        want = kj.decode_attention(q, layers[i], impl="reference", window=sliding)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        other = kj.decode_attention(q, layers[1], impl="reference")
        assert float(jnp.abs(got - other).max()) > 1e-2
    assert seen == [(12, 0)] + [(12, 8)] * 6


def test_sliding_window_matches_the_reference(monkeypatch):
    """A sliding window (Mistral's) on the Mosaic path: the bulk gets each (row, KV head)'s first
    attended token max(L - W, 0), and the window's partials mask below it, so windows inside the
    ring, at R, across the quantized tokens and none (W >= max_length) give the reference's
    attention (MHA and 4 query heads a KV head; every window implementation; ragged rows across
    flushes). kj.decode_attention routes a window to this path on a GPU."""
    from kivi_jax import attention

    a, m, k, v = _pair([400, 333, 5], 12)
    windows = (1, 129, 300, 700)  # the current token only, just past the ring, across the quantized tokens, none
    cases = [(1, 8), (129, 2), (300, 2), (300, 8), (700, 8)]  # (window, query heads: MHA or GQA 4)
    calls = {(impl, w): jax.jit(lambda q, c, impl=impl, w=w: attention_mosaic.decode_attention(
        q, c, window_impl=impl, bulk=_stand_in(c), window=w)) for impl in attention_mosaic.WINDOW_IMPL_NAMES
        for w in windows}
    step = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(k.shape[2] + 1):
        if i in (0, 12):  # (row 1 flushes at 333 + 11)
            for window, hq in cases:
                q = jax.random.normal(jax.random.key(5 + i), (3, hq, 1, D))
                want = kj.decode_attention(q, a, impl="reference", window=window)
                for impl in attention_mosaic.WINDOW_IMPL_NAMES:
                    np.testing.assert_allclose(np.asarray(calls[impl, window](q, m)), np.asarray(want), rtol=1e-5,
                                               atol=1e-5, err_msg=f"append {i}, window {window}, Hq {hq}, {impl}")
        if i < k.shape[2]:
            a, m = step(a, k[:, :, i:i + 1], v[:, :, i:i + 1]), step(m, k[:, :, i:i + 1], v[:, :, i:i + 1])
    # the bulk gets each row's first attended token, repeated over its 2 KV heads, and the window
    # its splits share (neither for W >= max_length)
    for window in windows:
        seen = []
        attention_mosaic.decode_attention(q, m, window_impl="jax", window=window,
                                          bulk=lambda *x, starts=None, **kw: seen.append((starts, kw.get("window")))
                                          or _stand_in(m)(*x, starts=starts, **kw))
        want = None if window >= 700 else np.repeat(np.maximum(np.asarray(m.lengths) - window, 0), 2).tolist()
        assert (seen[0][0] if want is None else np.asarray(seen[0][0]).tolist()) == want, window
        assert seen[0][1] == (None if window >= 700 else window)
    # kj.decode_attention takes a window to the kernel path on a GPU (here its stand-in)
    seen = []
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention_mosaic, "decode_attention",
                        lambda q, cache, stack=None, window=None: seen.append(window) or q)
    q = jnp.ones((3, 2, 1, D))
    m = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, m)  # the kernel's dtype
    assert np.array_equal(kj.decode_attention(q, m, impl="pallas", window=511), q) and seen == [511]
    with pytest.raises(ValueError, match="window=0 must be None or an integer >= 1"):
        kj.decode_attention(q, m, impl="pallas", window=0)


def test_a_float32_cache_on_a_gpu_takes_the_reference(monkeypatch):
    """The Mosaic kernel's operands are bf16: on a GPU (stood in) a float32 MosaicKIVICache's
    "auto" attention is the reference's, and impl="pallas" is a named error, not a Mosaic
    lowering failure (what the H200 raised before)."""
    from kivi_jax import attention

    a, m, _, _ = _pair([300, 140], 0)
    q = jax.random.normal(jax.random.key(3), (2, 8, 1, D))
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention_mosaic, "decode_attention", lambda *a, **k: pytest.fail("the kernel path ran"))
    np.testing.assert_allclose(np.asarray(kj.decode_attention(q, m)),
                               np.asarray(kj.decode_attention(q, a, impl="reference")), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes a bfloat16 cache; this one's dtype is float32"):
        kj.decode_attention(q, m, impl="pallas")


def test_auto_under_a_mesh_takes_xlas_path(monkeypatch):
    """On a GPU (stood in) under a mesh of several devices (stood in) the Mosaic kernel does not
    run: "auto" attention is XLA's reference path (it raised), impl="pallas" a named error."""
    from kivi_jax import attention, sharding

    a, m, _, _ = _pair([300, 140], 0)
    m = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, m)
    q = jax.random.normal(jax.random.key(4), (2, 8, 1, D), jnp.bfloat16)
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention_mosaic, "decode_attention", lambda *a, **k: pytest.fail("the kernel path ran"))
    monkeypatch.setattr(sharding, "active_mesh", lambda *a, **k: ("a mesh of 2", sharding.DEFAULT_RULES))
    want = kj.decode_attention(q, m, impl="xla")
    np.testing.assert_array_equal(np.asarray(kj.decode_attention(q, m), np.float32), np.asarray(want, np.float32))
    ref = kj.decode_attention(q.astype(jnp.float32), a, impl="reference")
    np.testing.assert_allclose(np.asarray(want, np.float32), np.asarray(ref), rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="the Mosaic kernel does not run under a mesh of several devices yet"):
        kj.decode_attention(q, m, impl="pallas")


@pytest.mark.parametrize("dtype,rotate,sinks", [(jnp.float32, "none", 0), (jnp.bfloat16, "none", 0),
                                               (jnp.bfloat16, "kv", 0), (jnp.float32, "none", 3)])
def test_append_kernel_equals_the_xla_writes(dtype, rotate, sinks, monkeypatch):
    """cache_mosaic.APPEND_IMPL "pallas": a layer-stacked MosaicKIVICache's append in one kernel
    that quantizes the leaving value itself (pallas_kernels.mosaic_append, interpreted) leaves
    every buffer as the XLA writes do, bit for bit: rows before R (no value leaves), spilling at
    every position of a 64-token chunk and both halves of a 128-token tile, a row reaching
    max_length (refused, flagged), across a key flush; layer 0 untouched."""
    from kivi_jax import cache_mosaic

    b, heads, max_length, steps = 4, 2, 320, 70
    kw = dict(batch=b, num_kv_heads=heads, head_dim=D, max_length=max_length, dtype=dtype)
    ks = jax.random.split(jax.random.key(3), 3)
    k = jax.random.normal(ks[0], (b, heads, max_length, D)).astype(dtype)
    v = (jax.random.normal(ks[1], (b, heads, max_length, D)) * 3).astype(dtype)
    # row 3 reaches max_length and is refused; with sinks row 0 fills them by appends
    lens = jnp.asarray([1 if sinks else 5, 120, 250, 300], jnp.int32)
    config = dataclasses.replace(MOSAIC, rotate=rotate, sink_tokens=sinks)
    m = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(MosaicKIVICache.init(config, **kw), k, v, lens)
    stacked = {impl: StackedCache.stack(m, 2).layers for impl in cache_mosaic.APPEND_IMPLS}
    new = jax.random.normal(ks[2], (steps, b, heads, 1, D)).astype(dtype)
    for impl in cache_mosaic.APPEND_IMPLS:
        monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", impl)
        step = jax.jit(lambda st, k: jax.tree.map(lambda x: x[1], st).stacked_append(st, jnp.int32(1), k, k * 2))
        for i in range(steps):
            stacked[impl] = step(stacked[impl], new[i])
    got, want = stacked["pallas"], stacked["xla"]
    assert int(want.lengths[1, 0]) == int(lens[0]) + steps and bool(want.overflow[1, 3])
    for name in ("k_res", "v_res", "vn", "vt", "kn", "kt", "lengths", "overflow"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
    np.testing.assert_array_equal(np.asarray(got.vn[0]), np.asarray(m.vn))  # layer 0 untouched
    np.testing.assert_array_equal(np.asarray(got.v_res[0]), np.asarray(m.v_res))
    # None (the default): the kernel on a GPU, where it was measured faster; XLA's writes elsewhere
    monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", None)
    for backend, impl in (("cpu", "xla"), ("gpu", "pallas")):
        monkeypatch.setattr(cache_mosaic.jax, "default_backend", lambda b=backend: b)
        assert cache_mosaic.append_impl() == impl
    monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", "triton")
    with pytest.raises(ValueError, match=r"cache_mosaic.APPEND_IMPL='triton'; allowed: \('xla', 'pallas'\) or None"):
        cache_mosaic.append_impl()


def test_grad_through_the_append_kernel(monkeypatch):
    """jax.grad through the Mosaic layout's append kernel (it aliases its buffers, so a
    pallas_call JVP raised "JVP with aliasing not supported") equals the gradient through the
    XLA writes, in the new keys and values and in every float leaf, across a value leaving the
    window and a key flush."""
    from kivi_jax import cache_mosaic

    b, heads, max_length = 2, 1, 200
    ks = jax.random.split(jax.random.key(4), 3)
    k = jax.random.normal(ks[0], (b, heads, 140, D))
    m = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(
        MosaicKIVICache.init(MOSAIC, batch=b, num_kv_heads=heads, head_dim=D, max_length=max_length,
                             dtype=jnp.float32), k, k * 3, jnp.asarray([127, 130], jnp.int32))
    stacked = StackedCache.stack(m, 2).layers
    new = jax.random.normal(ks[1], (2, b, heads, 1, D))

    def loss(new, stacked):
        for i in range(2):
            stacked = jax.tree.map(lambda x: x[1], stacked).stacked_append(stacked, jnp.int32(1), new[i], new[i] * 2)
        kh, vh = jax.tree.map(lambda x: x[1], stacked).materialize()
        return jnp.sum(kh * jnp.cos(kh)) + jnp.sum(vh ** 2)

    grads = {}
    for impl in cache_mosaic.APPEND_IMPLS:
        monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", impl)
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(new, stacked)
    got, want = grads["pallas"], grads["xla"]
    assert float(jnp.abs(want[0]).max()) > 0
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    for name in ("k_res", "v_res", "vt", "kt"):
        np.testing.assert_allclose(np.asarray(getattr(got[1], name)), np.asarray(getattr(want[1], name)), rtol=1e-6,
                                   atol=1e-6, err_msg=name)


def test_append_kernel_lowers_for_cuda():
    """The append kernel (exact rounding included: quant.next_after steps 16-bit floats by their
    bits, Triton's nextafter takes float32 only) lowers to Triton IR for a GPU."""
    from kivi_jax import cache_mosaic
    from pallas_kernels import mosaic_append
    from pallas_kernels.triton_ir import lower_to_ttir

    s = jax.ShapeDtypeStruct
    lyr, b, h, r, tc = 3, 2, 2, 128, 512
    args = (s((lyr, b, h, r, D), jnp.bfloat16), s((lyr, b, h, r, D), jnp.bfloat16), s((lyr, b, h, tc // 64, 4 * D), jnp.uint32),
            s((lyr, b, h, tc // 2, 16), jnp.bfloat16), s((b, h, 1, D), jnp.bfloat16), s((b, h, 1, D), jnp.bfloat16),
            s((b,), jnp.int32))
    ir = lower_to_ttir(lambda *a: mosaic_append.append(
        *a, jnp.int32(1), max_length=500, quantize=cache_mosaic.token_quantizer(2, jnp.dtype(jnp.bfloat16))), *args)
    assert "tt.store" in ir


def test_append_kernel_under_vmap(monkeypatch):
    """Batched experiments vmap the decode step: the append kernel (interpreted here) under
    jax.vmap gives each member the writes it gets alone, across a value leaving the ring and a
    key flush (member 1's rows start at other lengths)."""
    from kivi_jax import cache_mosaic

    monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", "pallas")
    members = [_pair(lens, 0, max_length=512, seed=s)[1] for lens, s in (([130, 60], 0), ([255, 127], 5))]
    stacks = [StackedCache.stack(m, 2).layers for m in members]
    new = jax.random.normal(jax.random.key(9), (2, 2, 2, 2, 1, D))  # [member, step, B, Hkv, 1, D]

    def append(st, k):
        return jax.tree.map(lambda x: x[1], st).stacked_append(st, jnp.int32(1), k, k * 3)

    batched = jax.tree.map(lambda *xs: jnp.stack(xs), *stacks)
    for i in range(2):
        batched = jax.jit(jax.vmap(append))(batched, new[:, i])
        stacks = [jax.jit(append)(st, new[j, i]) for j, st in enumerate(stacks)]
    for j, st in enumerate(stacks):
        for name in ("k_res", "v_res", "vn", "vt", "kn", "kt", "lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(batched, name)[j]), np.asarray(getattr(st, name)),
                                          err_msg=f"member {j} {name}")
    assert np.asarray(stacks[1].lengths[1]).tolist() == [257, 129]  # (member 1 row 1 flushed at 128)


@pytest.mark.parametrize("layout", ["tokens", "mosaic"])
def test_cache_writes_hold_no_dot(layout):
    """Prefill and append move a float32 cache's numbers with selects, adds and casts only: no
    dot_general, which XLA:GPU runs in TF32 for float32 operands (a one-hot einsum in the Mosaic
    key flush rounded a float32 cache's scales to 10 bits of mantissa on the H200, which the CPU
    cannot show: its dots are exact)."""
    cls = MosaicKIVICache if layout == "mosaic" else kj.KIVICache
    config = MOSAIC if layout == "mosaic" else TOKENS
    cache = cls.init(config, batch=2, num_kv_heads=2, head_dim=D, max_length=512, dtype=jnp.float32)
    k = jax.ShapeDtypeStruct((2, 2, 300, D), jnp.float32)
    one = jax.ShapeDtypeStruct((2, 2, 1, D), jnp.float32)
    n = jax.ShapeDtypeStruct((2,), jnp.int32)
    for fn, args in [(lambda c, k, v, n: c.prefill(k, v, n), (cache, k, k, n)),
                     (lambda c, k, v: c.append(k, v), (cache, one, one))]:
        prims = {e.primitive.name for e in jaxpr_walk.eqns(jax.make_jaxpr(fn)(*args).jaxpr)}
        assert "dot_general" not in prims, (layout, sorted(prims))
