"""The Mosaic GPU bulk kernel (pallas_kernels/kivi_mosaic.py) on the GPU: checked, then timed.

1. Compiled check against float64 NumPy (:func:`kivi_mosaic.reference`) on fresh random codes,
   scales and mins, rows of mixed lengths (1, odd, chunk and block edges, full).
2. The target shape (B=64, T=4096, 32 KV heads, 2-bit) from one random KIVICache: the Mosaic
   kernel on a repacked copy of its quantized tokens next to, in the same run, the Triton
   kernel over the same tokens (kernel only, with the ring, the whole call:
   ``decode_attention.breakdown``) and dense bf16 XLA attention; rows of the cache compared with
   NumPy too. Writes JSON + markdown (``--name``).

    PYTHONPATH=. python -m benchmarks.mosaic_attention [--name mosaic-attention]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax as kj
from benchmarks import common
from benchmarks.check_kernel_gpu import random_cache
from benchmarks.decode_attention import breakdown, dense_attention
from kivi_jax import attention_mosaic, packing
from pallas_kernels import kivi_mosaic as km

D = km.D
# the kernel at each --stages, then the tile stream alone (an ablation: wrong numbers). Earlier:
# chunks a wgmma group 1 / 2 / 4 (mosaic-attention-run4-2026-12-01), several rows' warpgroups a
# CTA (slower, and a race: -run5), per-chunk steps (-run2), the key constant from an all-ones
# wgmma (-run6, -run8: within noise of the column sum, less exact; removed).
# early_pick at one query row: 0.728 vs 0.723 ms (-run11, within noise; not the default there).
# Removed after they lost (both in git at ad8b080): relayout="mosaic", the codes moved into
# wgmma's layout by Mosaic's shuffles (0.725 vs 0.564 ms, -run15; 0.731 vs 0.559, -run13), and
# offset, the codes as 128 + c / 128 + 4c with the offsets cancelled through the key constant and
# a third accumulator (0.585 vs 0.564 ms; GQA 4: 1.275 vs 0.840, -run15).
# Since session 14 every variant copies a step's codes as 128-byte rows and leaves Pallas's
# automatic barriers out; before (git 313a961): 0.584 ms, the wide copies 0.551, both 0.540, the
# stream alone 0.317 -> 0.223 (mosaic-attention-run19).
# one_cta_an_sm: 60 KiB of unused shared memory, so one CTA (4 warps) a multiprocessor instead of two;
# warpgroups2/3: 2 or 3 rows' warpgroups a CTA (registers capped at 255 / 168: 8 or 12 warps an SM).
# Both slower or no faster (run21, run22: one_cta_an_sm 0.62, warpgroups2 0.45, warpgroups3 0.54 vs
# 0.43 ms), so they are no longer timed by default.
# Since -run26 the kernel works by lane (mosaic_lanes._lane_pick): 0.413 vs 0.467 ms, GQA 4 0.406
# vs 0.708 (lean_pick, a leaner select chain, and the other pick variants of -run25 are gone:
# 0.43-0.45 ms; ones_constant with lanes 0.468; warpgroups 2/3 with lanes 0.61/0.53 vs 0.418).
# key_offset / value_offset: the key / value codes unpacked without their FMA (128 + 4^f c), the
# offset folded into q's s columns and the key constant / Bv's s columns and o's epilogue
# (before the lanes: key_offset 0.459 vs 0.463 with spills at 255 registers, -run23; now 193).
# (measured: no faster, 0.400-0.418 vs 0.393-0.410 with both, -run28 / -run32).
# prefetch_bk: the next step's Bk and key constant built while the value wgmmas run (correct; in
# turns over five rounds 0.983x MHA, 1.015x GQA 4: mosaic-ab-run37-*); group4: all four chunks a
# wgmma group (1.001x). rows2 / rows4: 2 or 4 rows a program, their steps one stream (0.92x at
# the paper's batch, 1.04x at the target: mosaic-ab-run42-*); broadcast_q: q written broadcast by
# XLA, as before compact_q (GQA 4 0.376 vs 0.267 ms: mosaic-ab-run45-4k).
VARIANTS = [("default", {}), ("stream_only", dict(compute=False)), ("group1", dict(group=1)),
            ("key_offset", dict(key_offset=True)), ("value_offset", dict(value_offset=True)),
            ("key_value_offset", dict(key_offset=True, value_offset=True)),
            ("prefetch_bk", dict(prefetch_bk=True)), ("prefetch_bk_stages3", dict(prefetch_bk=True, stages=3)),
            ("group4", dict(group=4)), ("prefetch_bk_group4", dict(prefetch_bk=True, group=4)),
            ("rows1", dict(rows_per_program=1)), ("rows2", dict(rows_per_program=2)), ("rows4", dict(rows_per_program=4)),
            ("broadcast_q", dict(compact_q=False)), ("rows4_broadcast_q", dict(rows_per_program=4, compact_q=False))]
QUICK = ("default", "broadcast_q")
MORE_VARIANTS = [("one_cta_an_sm", dict(smem_pad=60 << 10)), ("warpgroups2", dict(warpgroups=2)),
                 ("warpgroups3", dict(warpgroups=3)), ("ones_constant", dict(ones_constant=True))]
# GQA (4 query rows a KV head): one chunk a wgmma group (the default there) and two;
# fused (the default since -run13, 0.85 vs 0.97 ms): the G rows in one wgmma operand (N = 16 G);
# unfused: each row its own N = 16 operand; the default since -run81 is narrow (every row's
# needed columns in one N = 16 operand, a chunk's products 4x narrower at G = 4: 0.61-0.64x the
# fused kernel at 4k-16k tokens); wide: the fused operand (N = 16 G) as before
GQA_VARIANTS = [("default", {}), ("unfused", dict(fused=False)),
                ("key_value_offset", dict(key_offset=True, value_offset=True)), ("prefetch_bk", dict(prefetch_bk=True)),
                ("rows2", dict(rows_per_program=2)), ("rows3", dict(rows_per_program=3)),
                ("rows4", dict(rows_per_program=4)), ("broadcast_q", dict(compact_q=False)),
                ("wide", dict(narrow=False)), ("group2", dict(group=2)), ("picks", dict(lane_softmax=False))]
GQA_QUICK = ("default", "broadcast_q")
# the default GQA softmax since -run90 is in the key accumulator's layout (lane_softmax: 0.87-0.91x
# the picks' time); picks: each row's scores picked from the lanes holding them, as before. G = 4
# and 2, rows a program, groups, sliding windows
PICKS_CHECKS = [("gqa4_picks", dict(heads=4, lane_softmax=False)), ("gqa2_picks", dict(heads=2, lane_softmax=False)),
                ("gqa4_picks_rows3_stages3", dict(heads=4, lane_softmax=False, rows_per_program=3, stages=3)),
                ("gqa4_picks_group2_sliding_splits3",
                 dict(heads=4, lane_softmax=False, group=2, sliding=True, splits=3)),
                ("gqa2_picks_window600_tokens2048", dict(heads=2, lane_softmax=False, window=600, tokens=2048))]


def random_inputs(rows, tokens, key=0):
    """Codes 0..3, bf16 scales in [0.01, 0.3] and mins around -1.5 (as random_cache draws them)."""
    ks = jax.random.split(jax.random.key(key), 7)
    g = tokens // km.GROUP
    bf = jnp.bfloat16
    return (jax.random.randint(ks[0], (rows, tokens, D), 0, 4),
            jax.random.uniform(ks[1], (rows, g, D), minval=0.01, maxval=0.3).astype(bf),
            (-1.5 + 0.3 * jax.random.normal(ks[2], (rows, g, D))).astype(bf),
            jax.random.randint(ks[3], (rows, tokens, D), 0, 4),
            jax.random.uniform(ks[4], (rows, tokens, D // km.GROUP), minval=0.01, maxval=0.3).astype(bf),
            (-1.5 + 0.3 * jax.random.normal(ks[5], (rows, tokens, D // km.GROUP))).astype(bf))


def random_q(rows, heads=1, key=3):
    """Query rows [R, D] (or [R, G, D] for G > 1 query rows a KV head), softmax scale applied, bf16."""
    shape = (rows,) + (heads,) * (heads > 1) + (D,)
    return (jax.random.normal(jax.random.key(key), shape) / np.sqrt(D)).astype(jnp.bfloat16)


def errors(got, want):
    """Normalized outputs o / l and m against the reference; l compared at the reference's m."""
    (o, m, l), (ro, rm, rl) = [tuple(np.asarray(x, np.float64) for x in t) for t in (got, want)]
    out, ref = o / l[..., None], ro / rl[..., None]
    return {"out_rel_err": float(np.abs(out - ref).max() / np.abs(ref).max()),
            "m_abs_err": float(np.abs(m - rm).max()),
            "l_rel_err": float(np.abs(l * np.exp(m - rm) - rl).max() / np.abs(rl).max())}


def check(rows=64, tokens=1024, stages=2, heads=1, sliding=False, window=None, **options):
    """The compiled kernel against the float64 reference on rows of every length class;
    sliding: each row also starts at a token of every class below its length (starts); with
    window: at max(L - window, 0) for an L a little past its length (the splits then share
    each row's window steps)."""
    plain = random_inputs(rows, tokens)
    lengths = jnp.asarray(np.minimum(np.resize([1, 2, 31, 33, 63, 64, 65, 127, 129, 255, 256, 257, 511, 700, 1500,
                                                tokens - 1, tokens], rows), tokens), jnp.int32)
    starts = (jnp.minimum(jnp.asarray(np.resize([0, 1, 30, 64, 255, 256, 300, 513, 767], rows), jnp.int32), lengths - 1)
              if sliding else None)
    if window is not None:
        starts = jnp.maximum(lengths + jnp.asarray(np.resize([0, 1, 7, 100, 255], rows), jnp.int32) - window, 0)
    q = random_q(rows, heads, key=9)
    got = jax.jit(lambda q, n, s, *x: km.bulk_partials(q, n, *km.repack(*x), stages=stages, starts=s, window=window,
                                                       **options))(q, lengths, starts, *plain)
    return errors(got, km.reference(q, lengths, *plain, starts=starts))


def _prefilled_mosaic(lengths, prompt, tokens, kv_heads, key, rotate="none", sinks=0):
    """A bf16 MosaicKIVICache of max_length ``tokens`` (KIVIConfig ``rotate``, ``sinks`` sink tokens) prefilled with rows
    of ``lengths`` from the first ``prompt`` of random k, v [B, Hkv, tokens, D] -> (cache, k, v,
    a key for q)."""
    b = len(lengths)
    ks = jax.random.split(jax.random.key(key), 3)
    k = jax.random.normal(ks[0], (b, kv_heads, tokens, D), jnp.bfloat16)
    v = jax.random.normal(ks[1], (b, kv_heads, tokens, D), jnp.bfloat16)
    cache = kj.MosaicKIVICache.init(kj.KIVIConfig(layout="mosaic", rotate=rotate, sink_tokens=sinks), batch=b,
                                    num_kv_heads=kv_heads, head_dim=D, max_length=tokens)
    return cache.prefill(k[:, :, :prompt], v[:, :, :prompt], jnp.asarray(lengths, jnp.int32)), k, v, ks[2]


def check_cache(heads=(2, 8), kv_heads=2, key=11, windows=(None,), rotate="none", sinks=0):
    """The integrated path compiled: a MosaicKIVICache prefilled with ragged rows and appended
    to (flushes, spills), ``kivi_jax.decode_attention`` (the kernel on the quantized tokens, the
    window kernel on the ring) against the reference over the same cache, bf16, MHA and GQA 4;
    and with each sliding window of ``windows`` (None: none); ``rotate``, ``sinks``: the cache's."""
    b, t, extra = 4, 700, 140
    cache, k, v, q_key = _prefilled_mosaic([700, 513, 129, 3], t, t + extra, kv_heads, key, rotate=rotate, sinks=sinks)
    step = jax.jit(lambda c, k, v: c.append(k, v))
    out = {}
    for i in range(extra + 1):
        if i in (0, 70, extra):
            for hq, w in itertools.product(heads, windows):
                q = jax.random.normal(q_key, (b, hq, 1, D), jnp.bfloat16)
                got = jax.jit(lambda q, c: kj.decode_attention(q, c, impl="pallas", window=w))(q, cache)
                want = kj.decode_attention(q, cache, impl="reference", window=w).astype(jnp.float32)
                err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
                out[f"after{i}_hq{hq}{'' if w is None else f'_window{w}'}_rel_err"] = err
        if i < extra:
            cache = step(cache, k[:, :, t + i:t + i + 1], v[:, :, t + i:t + i + 1])
    return out


def check_vmap(members=3, rows=16, tokens=512, heads=1, kv_heads=2):
    """jax.vmap over requests (batched decoding experiments), compiled: the kernel under vmap
    against the float64 reference of each member, and the whole path over MosaicKIVICaches
    stacked on a leading member axis against the same rows' unbatched call -> max errors."""
    plain = [random_inputs(rows, tokens, key=20 + i) for i in range(members)]
    lengths = jnp.asarray(np.stack([np.roll(np.resize([1, 100, 256, 300, 511, 512, 33, 257], rows), i)
                                    for i in range(members)]), jnp.int32)
    qs = jnp.stack([random_q(rows, heads, key=30 + i) for i in range(members)])
    batched = jax.tree.map(lambda *x: jnp.stack(x), *[km.repack(*p) for p in plain])
    got = jax.jit(jax.vmap(lambda q, n, *x: km.bulk_partials(q, n, *x)))(qs, lengths, *batched)
    errs = [errors(tuple(x[i] for x in got), km.reference(qs[i], lengths[i], *plain[i])) for i in range(members)]
    out = {f"kernel_{k}": max(e[k] for e in errs) for k in errs[0]}
    # the whole call: a 4-row cache as 2 members of 2 rows (every leaf has the batch axis first)
    b = 4
    cache, _, _, q_key = _prefilled_mosaic([700, 513, 129, 300], 700, 700, kv_heads, 12)
    q = jax.random.normal(q_key, (b, kv_heads * heads, 1, D), jnp.bfloat16)
    split = jax.tree.map(lambda x: x.reshape((2, b // 2) + x.shape[1:]), cache)
    got = jax.jit(jax.vmap(lambda q, c: kj.decode_attention(q, c, impl="pallas")))(q.reshape(2, b // 2, *q.shape[1:]),
                                                                                   split)
    want = jax.jit(lambda q, c: kj.decode_attention(q, c, impl="pallas"))(q, cache).astype(jnp.float32)
    got = got.reshape(want.shape).astype(jnp.float32)
    out["whole_call_rel_err_vs_unbatched"] = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    return out


def check_auto_layout(prompt=150, new_tokens=40):
    """KIVIConfig()'s layout ("auto") as this machine resolves it for the benchmarked shapes, and
    generate with it on a random 2-layer model (head_dim 128, bf16) against layout="mosaic" (the
    same program: the same tokens) and "tokens" (other kernels: greedy picks may differ where two
    logits are within rounding) -> dict."""
    import models
    from models.config import ModelConfig

    out = {"compute_capability": getattr(jax.devices()[0], "compute_capability", None)}
    shapes = {"llama2_7b_paper": (32, 32, 498), "mistral_7b_paper": (32, 8, 498), "mistral_7b_4k": (32, 8, 4352)}
    for name, (hq, hkv, max_length) in shapes.items():
        out[f"layout_{name}"] = kj.resolve_layout(kj.KIVIConfig(), num_heads=hq, num_kv_heads=hkv, head_dim=D,
                                                  max_length=max_length).layout
    cfg = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=D)
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(3), (4, prompt), 0, cfg.vocab_size)
    lengths = jnp.array([prompt, prompt * 7 // 8, 7, prompt * 2 // 3])
    runs = {layout: kj.generate(model, ids, lengths=lengths, max_new_tokens=new_tokens, kivi=kj.KIVIConfig(layout=layout))
            for layout in ("auto", "mosaic", "tokens")}
    out["auto_cache"] = type(runs["auto"].cache.layers).__name__
    out["auto_tokens_equal_mosaic"] = bool((runs["auto"].tokens == runs["mosaic"].tokens).all())
    out["mosaic_tokens_agree_with_tokens_layout"] = float((runs["mosaic"].tokens == runs["tokens"].tokens).mean())
    return out


def from_cache(cache):
    """A KIVI-2 cache's quantized tokens as [R, T, ...] codes and scales (R = B x Hkv)."""
    b, h = cache.k_scale.shape[:2]
    tc = cache.capacity

    def flat(x):
        return x.reshape((b * h,) + x.shape[2:])

    return (flat(packing.unpack(cache.k_codes, 2, 2, tc)), flat(cache.k_scale), flat(cache.k_min),
            flat(packing.unpack(cache.v_codes, 2, 2, tc)), flat(cache.v_scale), flat(cache.v_min))


def profile(rows=264, tokens=4096):
    """Mosaic's profiler on ``rows`` rows (two a streaming multiprocessor): the time each named
    phase of a step takes, summed over the warpgroups' events -> {phase: fraction, ...}."""
    import glob
    import os
    import tempfile

    plain = random_inputs(rows, tokens)
    packed = jax.jit(km.repack)(*plain)
    q = random_q(rows)
    n = jnp.full((rows,), tokens, jnp.int32)
    with tempfile.TemporaryDirectory() as tmp:
        jax.block_until_ready(jax.jit(lambda q, n, *x: km.bulk_partials(q, n, *x, profile_dir=tmp))(q, n, *packed))
        files = glob.glob(os.path.join(tmp, "**", "*"), recursive=True)
        events = []
        for f in files:
            if os.path.isfile(f):
                with open(f) as fh:
                    data = json.load(fh)
                events += data["traceEvents"] if isinstance(data, dict) else data
    print("trace files:", [os.path.basename(f) for f in files], "events:", len(events), events[:3], flush=True)
    total, stacks = {}, {}
    for e in events:
        name = e.get("name", "?")
        if "dur" in e:
            total[name] = total.get(name, 0.0) + float(e["dur"])
        elif e.get("ph") in ("B", "E"):
            key = (e.get("pid"), e.get("tid"), name)
            if e["ph"] == "B":
                stacks[key] = float(e["ts"])
            elif key in stacks:
                total[name] = total.get(name, 0.0) + float(e["ts"]) - stacks.pop(key)
    whole = max(total.values()) if total else 1.0
    return {k: {"sum": v, "fraction_of_largest": v / whole} for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def random_packed(rows, tokens, key=5):
    """Random words in the kernel's layout (speed only): int4 codes, bf16 scale tiles."""
    ks = jax.random.split(jax.random.key(key), 4)
    codes = lambda k, shape: jax.random.randint(k, shape, -8, 8, jnp.int32).astype(jnp.int4)  # noqa: E731
    return (codes(ks[0], (rows, tokens, D // 2)),
            jax.random.uniform(ks[1], (rows, tokens // km.KEY_BLOCK, D, km.N), jnp.bfloat16, 0.01, 0.3),
            codes(ks[2], (rows, tokens // km.CHUNK, D, km.CHUNK // 2)),
            jax.random.uniform(ks[3], (rows, tokens // km.VALUE_BLOCK, km.CHUNK, km.N), jnp.bfloat16, 0.01, 0.3))


def packed_bytes(packed) -> int:
    """Bytes of the kernel's arrays (int4 codes at half a byte)."""
    return int(sum(x.size * (0.5 if x.dtype == jnp.int4 else jnp.dtype(x.dtype).itemsize) for x in packed))


def sweep(hbm, batches=(1, 8, 32, 64, 128), lengths=(1024, 4096, 16384, 32768), heads=((32, 32), (32, 8)),
          dense_max_bytes=48 << 30, splits=()):
    """The issue's grid (2-bit; Hq = 32 with 32 and 8 KV heads): the Mosaic bulk kernel (default
    splits) next to dense bf16 XLA attention over the same T, on random words; and with each
    of ``splits`` sequence splits too (impl mosaic_bulk_splits<S>)."""
    rows = []
    for hq, hkv in heads:
        g = hq // hkv
        for b in batches:
            for t in lengths:
                r = b * hkv
                dense_bytes = 2 * r * t * D * 2
                dense_ms = None
                if dense_bytes <= dense_max_bytes:
                    kd = jax.random.normal(jax.random.key(2), (b, hkv, t, D), jnp.bfloat16)
                    q4 = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
                    dense_ms = common.time_fn(jax.jit(dense_attention), q4, kd, kd)
                    del kd
                    rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": D, "bits": 16, "impl": "dense_bf16_xla",
                                 "median_ms": dense_ms, "bytes": dense_bytes, "tbps": dense_bytes / dense_ms / 1e9,
                                 "frac_of_hbm_copy": dense_bytes / dense_ms / 1e9 / hbm, "ratio_to_dense": 1.0})
                packed = random_packed(r, t)
                nbytes = packed_bytes(packed)
                q = random_q(r, g)
                default = km.default_splits(r, t, km.gpu_slots())
                for s in [default] + [s for s in splits if s != default and s <= t // km.KEY_BLOCK]:
                    ms = common.time_fn(jax.jit(functools.partial(km.bulk_partials, splits=s)), q,
                                        jnp.full((r,), t, jnp.int32), *packed)
                    rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": D, "bits": 2,
                                 "impl": "mosaic_bulk" if s == default else f"mosaic_bulk_splits{s}",
                                 "splits": s, "median_ms": ms, "bytes": nbytes,
                                 "tbps": nbytes / ms / 1e9, "frac_of_hbm_copy": nbytes / ms / 1e9 / hbm,
                                 "ratio_to_dense": ms / dense_ms if dense_ms else None})
                    print(rows[-1], flush=True)
                del packed
    return rows


def target(b, t, hq, hkv, variants, stages, hbm, quick=False):
    """One shape from one random KIVICache: dense bf16, the Triton kernel (breakdown), the
    Mosaic kernel's variants on a repacked copy (first rows checked against NumPy), rows of
    mixed lengths. quick: only dense and the variants, then mixed lengths with each."""
    g = hq // hkv
    q4 = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
    kd = jax.random.normal(jax.random.key(2), (b, hkv, t, D), jnp.bfloat16)
    dense_ms = common.time_fn(jax.jit(dense_attention), q4, kd, kd)
    del kd
    rows = [{"B": b, "T": t, "Hkv": hkv, "impl": "dense_bf16_xla", "median_ms": dense_ms, "bytes": 2 * b * hkv * t * D * 2}]
    if not quick:
        rows += [{"Hkv": hkv, **{k: r[k] for k in ("B", "T", "impl", "median_ms")}} for r in breakdown(b, t, hq, hkv)]
    cache = random_cache(kj.KIVIConfig(), batch=b, kv_heads=hkv, tokens=t, head_dim=D)
    plain = from_cache(cache)
    packed = jax.jit(km.repack)(*plain)
    nbytes = packed_bytes(packed)
    lengths = jnp.repeat(cache.num_quantized_values, hkv)
    q = random_q(b * hkv, g)
    named = [(f"{name}_stages{s}", {**opts, "stages": s}) for name, opts in variants[:1]
             for s in map(int, stages.split(","))] + variants[1:]
    for name, opts in named:
        fn = jax.jit(lambda q, n, *x, o=opts: km.bulk_partials(q, n, *x, **o))
        ms = common.time_fn(fn, q, lengths, *packed)
        sub = slice(0, 4)
        err = errors([x[sub] for x in fn(q, lengths, *packed)],
                     km.reference(q[sub], lengths[sub], *[x[sub] for x in plain]))
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": f"mosaic_bulk_{name}", "median_ms": ms, "bytes": nbytes,
                     "tbps": nbytes / ms / 1e9, "frac_of_hbm_copy": nbytes / ms / 1e9 / hbm,
                     "ratio_to_dense": ms / dense_ms, **err})
        print(rows[-1], flush=True)
    # rows of mixed lengths, T/2 .. T (each row runs its own number of steps): the default, or
    # (quick) each variant but the stream alone
    mixed = lengths - (jnp.arange(b * hkv, dtype=jnp.int32) * 37) % (t // 2)
    for name, opts in [(n, o) for n, o in variants if n != "stream_only"] if quick else [("default", {})]:
        ms = common.time_fn(jax.jit(lambda q, n, *x, o=opts: km.bulk_partials(q, n, *x, **o)), q, mixed, *packed)
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": f"mosaic_bulk_{name}_mixed_lengths", "median_ms": ms,
                     "ratio_to_dense": ms / dense_ms})
        print(rows[-1], flush=True)
    if quick:
        return rows
    # the whole call on the same tokens as a MosaicKIVICache (kernel + window + combine), the
    # window in plain JAX (the default) and in its Triton kernel (pallas_kernels/mosaic_window.py)
    mcache = kj.MosaicKIVICache.from_kivi(cache)
    want = kj.decode_attention(q4[:2], jax.tree.map(lambda x: x[:2] if x.ndim and x.shape[0] == b else x, cache),
                               impl="reference").astype(jnp.float32)
    for window in attention_mosaic.WINDOW_IMPL_NAMES:
        call = jax.jit(lambda q, c, w=window: attention_mosaic.decode_attention(q, c, window_impl=w))
        ms = common.time_fn(call, q4, mcache)
        got = call(q4, mcache)[:2].astype(jnp.float32)
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": f"mosaic_cache_whole_call_window_{window}", "median_ms": ms,
                     "ratio_to_dense": ms / dense_ms, "out_rel_err": float(jnp.abs(got - want).max() / jnp.abs(want).max())})
        print(rows[-1], flush=True)
    qg = q4[:, :, 0].astype(jnp.float32).reshape(b, hkv, g, D) / np.sqrt(D)
    ring = 2 * mcache.k_res.size * mcache.k_res.dtype.itemsize  # k_res and v_res, read once
    for window, fn in attention_mosaic.WINDOW_IMPLS.items():
        ms = common.time_fn(jax.jit(lambda qg, c, fn=fn: fn(qg, c, None)), qg, mcache)
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": f"mosaic_cache_window_only_{window}", "median_ms": ms,
                     "bytes": ring, "tbps": ring / ms / 1e9})
        print(rows[-1], flush=True)
    del mcache
    return rows


SLIDING_CHECKS = [("sliding_window600_tokens2048_splits3", dict(tokens=2048, window=600, splits=3)),
                  ("sliding_window600_tokens2048", dict(tokens=2048, window=600)),
                  ("gqa4_sliding_window300_splits2", dict(heads=4, window=300, splits=2)),
                  ("gqa2_unfused_sliding_window1000_tokens2048_stages3", dict(heads=2, fused=False, window=1000,
                                                                              tokens=2048, stages=3))]


def sliding_windows(hbm, rounds=5, window=4096, hq=32,
                    shapes=((1, 16384, 8), (8, 16384, 8), (64, 16384, 8), (1, 32768, 32), (8, 16384, 32)), splits=()):
    """A sliding window at long context (Mistral's 4096 tokens; every row full, start = T - window):
    the kernel's splits over each row's window steps (window=) vs over all T/256 steps (as before
    it), in turns on the same inputs, next to dense bf16 attention over the window's tokens; and
    the window's partition with each of ``splits`` too."""
    rows = []
    for b, t, hkv in shapes:
        r, g = b * hkv, hq // hkv
        packed, q = random_packed(r, t), random_q(r, g)
        n = jnp.full((r,), t, jnp.int32)
        starts = n - window
        kd = jax.random.normal(jax.random.key(2), (b, hkv, window, D), jnp.bfloat16)
        q4 = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
        dense_ms = common.time_fn(jax.jit(dense_attention), q4, kd, kd)
        del kd
        span = km.window_span(window, t)
        arms = {"all_steps": (None, km.default_splits(r, t, km.gpu_slots())),
                "window_steps": (window, km.window_splits(r, span, km.gpu_slots()))}
        arms.update({f"window_steps_splits{x}": (window, x) for x in splits if x <= span})
        fns = {name: jax.jit(functools.partial(km.bulk_partials, starts=starts, window=w, splits=x))
               for name, (w, x) in arms.items()}
        times = {name: [] for name in arms}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(common.time_fn(fn, q, n, *packed))
        nbytes = packed_bytes(packed)
        nbytes = nbytes * (span * km.KEY_BLOCK) // t  # the window's steps only are read
        base = float(np.median(times["all_steps"]))
        for name, (_, s) in arms.items():
            ms = float(np.median(times[name]))
            rows.append({"B": b, "T": t, "window": window, "Hkv": hkv, "impl": f"mosaic_bulk_sliding_{name}",
                         "splits": s, "median_ms": ms, "rounds_ms": [round(x, 4) for x in times[name]],
                         "ratio_to_all_steps": ms / base, "ratio_to_dense_window": ms / dense_ms,
                         "tbps": nbytes / ms / 1e9, "frac_of_hbm_copy": nbytes / ms / 1e9 / hbm})
            print(rows[-1], flush=True)
        rows.append({"B": b, "T": t, "window": window, "Hkv": hkv, "impl": "dense_bf16_xla_window_tokens",
                     "median_ms": dense_ms})
        del packed
    return rows


def interleaved(names, hkv, rounds, b=64, t=4096, hq=32, length=None):
    """Variants ``names`` of one shape (default the target's) timed in turns, ``rounds`` times
    over (each turn a median of 5 batches): a change of a few percent is within what one
    configuration moves between calls, so A and B take turns on the same inputs -> rows, one a
    variant, with every round's time and the median over rounds, and the ratio of each to the
    first's. length: every row's quantized tokens (default t)."""
    variants = dict({32: VARIANTS, 8: GQA_VARIANTS}[hkv])
    r, g = b * hkv, hq // hkv
    packed, q = random_packed(r, t), random_q(r, g)
    n = jnp.full((r,), t if length is None else length, jnp.int32)
    fns = {name: jax.jit(functools.partial(km.bulk_partials, **variants[name])) for name in names}
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(common.time_fn(fns[name], q, n, *packed))
    base = float(np.median(times[names[0]]))
    rows = [{"B": b, "T": t, "length": int(n[0]), "Hkv": hkv, "impl": f"mosaic_bulk_{name}", "median_ms": float(np.median(ms)),
             "rounds_ms": [round(x, 4) for x in ms], "ratio_to_first": float(np.median(ms)) / base}
            for name, ms in times.items()]
    for row in rows:
        print(row, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="only the issue's B x T grid, Mosaic kernel next to dense")
    ap.add_argument("--profile", action="store_true", help="only Mosaic's profile of the default kernel's phases")
    ap.add_argument("--name", default="mosaic-attention")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--kv-heads", default="32,8",
                    help="KV heads (comma list of 32, 8): the target shape's, or with --sweep the grid's (each takes ~3-4 min)")
    ap.add_argument("--skip-checks", action="store_true", help="only the timings")
    ap.add_argument("--quick", action="store_true", help="only the QUICK variants' checks and timings")
    ap.add_argument("--checks-only", action="store_true", help="the compiled checks, no timings")
    ap.add_argument("--cache-checks", action="store_true",
                    help="of the checks, only the whole path's (cache, vmap, sliding, rotation); with --checks-only")
    ap.add_argument("--cache-only", default="",
                    help="with --cache-checks: only the whole-path checks whose names hold one of these (comma list)")
    ap.add_argument("--sliding", action="store_true",
                    help="only the sliding-window checks and timings (splits over a row's window steps vs all)")
    ap.add_argument("--auto-layout", action="store_true", help="only check_auto_layout (KIVIConfig()'s layout here)")
    ap.add_argument("--picks", action="store_true",
                    help="only the GQA picks (lane_softmax=False): their compiled checks (PICKS_CHECKS), then timed "
                         "in turns with the default (lane_softmax) at B=64 T=4k/16k and B=8 T=16k, --rounds rounds")
    ap.add_argument("--batches", default="1,8,32,64,128", help="--sweep's batch sizes (comma list)")
    ap.add_argument("--lengths", default="1024,4096,16384,32768", help="--sweep's sequence lengths (comma list)")
    ap.add_argument("--splits", default="", help="--sweep: also these sequence splits a row (comma list), e.g. 2,4,8")
    ap.add_argument("--once", action="store_true",
                    help="only one kernel call on random words of the target shape (B=64, T=4096, 32 heads), "
                         "for Nsight Compute: ncu --kernel-name regex:body_mosaic --launch-count 1 ...")
    ap.add_argument("--variant", default="default", choices=[name for name, _ in VARIANTS + MORE_VARIANTS],
                    help="--once's kernel (VARIANTS, MORE_VARIANTS)")
    ap.add_argument("--ab", default="",
                    help="only these variants (comma list, the first the baseline) of one shape (--ab-shape), timed "
                         "in turns over --rounds rounds, for each of --kv-heads")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ab-shape", default="64,4096",
                    help="--ab's B,T[,length] (e.g. 96,512,200: the paper's batch, one 256-token step a row)")
    a = ap.parse_args(argv)
    if a.ab:
        env = common.environment()
        b, t, *length = map(int, a.ab_shape.split(","))
        rows = [row for hkv in map(int, a.kv_heads.split(",")) for row in interleaved(
            a.ab.split(","), hkv, a.rounds, b=b, t=t, length=length[0] if length else None)]
        table = (f"Mosaic GPU bulk kernel, variants in turns ({a.rounds} rounds), {env['device']}, jax "
                 f"{env['jax_version']}, commit {env['commit']}\n\n"
                 + common.markdown(rows, ["B", "T", "length", "Hkv", "impl", "median_ms", "ratio_to_first", "rounds_ms"]))
        print(table)
        common.write_results(a.name, {**env, "rows": rows}, table)
        return
    if a.sliding:
        env, hbm = common.environment(), common.hbm_copy_tbps()
        rows = []
        for name, opts in [] if a.skip_checks else SLIDING_CHECKS:
            rows.append({"impl": f"mosaic_check_{name}", **check(**opts)})
            print(rows[-1], flush=True)
        if not a.skip_checks:
            rows.append({"impl": "mosaic_cache_check_sliding", **check_cache(windows=(100, 300, 600))})
            print(rows[-1], flush=True)
        rows += sliding_windows(hbm, rounds=a.rounds, splits=tuple(int(x) for x in a.splits.split(",") if x))
        cols = ["B", "T", "window", "Hkv", "impl", "splits", "median_ms", "ratio_to_all_steps", "ratio_to_dense_window",
                "tbps", "frac_of_hbm_copy", "out_rel_err", "m_abs_err", "l_rel_err"]
        table = (f"Mosaic GPU bulk kernel under a sliding window, {env['device']}, jax {env['jax_version']}, commit "
                 f"{env['commit']}; HBM copy {hbm:.2f} TB/s\n\n" + common.markdown(rows, cols))
        print(table)
        common.write_results(a.name, {**env, "hbm_copy_tbps": hbm, "rows": rows}, table)
        return
    if a.picks:  # the softmax's two layouts, checked and timed in turns
        rows, env = [], common.environment()

        def save():  # after every row: a call cut off by its time limit still returns what it measured
            common.write_results(a.name, {**env, "rows": rows},
                                 common.markdown(rows, list(dict.fromkeys(k for r in rows for k in r))))

        for name, opts in [("gqa4", dict(heads=4))] + PICKS_CHECKS:
            rows.append({"impl": f"mosaic_check_{name}", **check(**opts)})
            print(rows[-1], flush=True)
            save()
        for b, t in ((64, 4096), (64, 16384), (8, 16384)):
            rows += interleaved(["picks", "default"], 8, a.rounds, b=b, t=t)
            save()
        return
    if a.auto_layout:
        row = {"impl": "auto_layout_check", **check_auto_layout()}
        print(row, flush=True)
        common.write_results(a.name, {**common.environment(), "rows": [row]}, common.markdown([row], list(row)))
        return
    if a.once:
        rows, t = 64 * 32, 4096
        q = random_q(rows)
        options = dict(VARIANTS + MORE_VARIANTS)[a.variant]
        jax.block_until_ready(jax.jit(functools.partial(km.bulk_partials, **options))(
            q, jnp.full((rows,), t, jnp.int32), *random_packed(rows, t)))
        return
    env = common.environment()
    if a.sweep:
        hbm = common.hbm_copy_tbps()
        rows = sweep(hbm, batches=tuple(map(int, a.batches.split(","))), lengths=tuple(map(int, a.lengths.split(","))),
                     heads=tuple((32, int(h)) for h in a.kv_heads.split(",")),
                     splits=tuple(int(s) for s in a.splits.split(",") if s))
        cols = ["B", "T", "Hkv", "impl", "splits", "median_ms", "bytes", "tbps", "frac_of_hbm_copy", "ratio_to_dense"]
        table = (f"Mosaic GPU bulk kernel (2-bit, Hq=32, quantized tokens only) vs dense bf16, {env['device']}, "
                 f"jax {env['jax_version']}, commit {env['commit']}; HBM copy {hbm:.2f} TB/s\n\n" + common.markdown(rows, cols))
        print(table)
        common.write_results(a.name, {**env, "hbm_copy_tbps": hbm, "rows": rows}, table)
        return
    if a.profile:
        phases = profile()
        print(phases, flush=True)
        (common.out_dir() / f"{a.name}-profile.json").write_text(json.dumps({**env, "phases": phases}, indent=1))
        return
    hbm = common.hbm_copy_tbps()
    rows = []
    checks = [("default", {}), ("splits1", dict(splits=1)), ("gqa2", dict(heads=2)), ("gqa4", dict(heads=4)),
              ("gqa4_group2", dict(heads=4, group=2)), ("gqa2_unfused", dict(heads=2, fused=False)),
              ("gqa4_unfused", dict(heads=4, fused=False)), ("warpgroups2", dict(warpgroups=2)),
              ("warpgroups3_splits1", dict(warpgroups=3, splits=1)), ("ones_constant", dict(ones_constant=True)),
              ("key_offset", dict(key_offset=True)), ("value_offset", dict(value_offset=True)),
              ("key_value_offset", dict(key_offset=True, value_offset=True)),
              ("gqa4_key_value_offset", dict(heads=4, key_offset=True, value_offset=True)),
              ("gqa2_unfused_key_value_offset", dict(heads=2, fused=False, key_offset=True, value_offset=True)),
              ("warpgroups2_key_offset", dict(warpgroups=2, key_offset=True)),
              ("splits1_key_value_offset", dict(splits=1, key_offset=True, value_offset=True)),
              ("prefetch_bk", dict(prefetch_bk=True)), ("prefetch_bk_stages3_splits1", dict(prefetch_bk=True, stages=3, splits=1)),
              ("gqa4_prefetch_bk", dict(heads=4, prefetch_bk=True)),
              ("gqa2_unfused_prefetch_bk", dict(heads=2, fused=False, prefetch_bk=True)),
              ("key_value_offset_prefetch_bk", dict(key_offset=True, value_offset=True, prefetch_bk=True)),
              ("rows2", dict(rows_per_program=2)), ("rows4_splits3", dict(rows_per_program=4, splits=3)),
              ("gqa4_rows3_stages3", dict(heads=4, rows_per_program=3, stages=3)),
              ("gqa2_unfused_rows2_key_value_offset", dict(heads=2, fused=False, rows_per_program=2, key_offset=True,
                                                           value_offset=True)),
              ("broadcast_q", dict(compact_q=False)), ("gqa4_broadcast_q", dict(heads=4, compact_q=False)),
              # the paper's batch at 512 tokens: bulk_partials picks 4 rows a program itself
              ("paper_rows_auto", dict(rows=96 * 32, tokens=512)),
              # a sliding window (starts): one row a program
              ("sliding", dict(sliding=True)), ("gqa4_sliding_splits3", dict(heads=4, sliding=True, splits=3)),
              ("gqa2_unfused_sliding_stages3", dict(heads=2, fused=False, sliding=True, stages=3)),
              ("gqa4_wide", dict(heads=4, narrow=False)), ("gqa2_wide_rows2", dict(heads=2, narrow=False, rows_per_program=2)),
              ("gqa4_narrow_group2_splits1", dict(heads=4, narrow=True, group=2, splits=1)),
              ("gqa4_narrow_rows3_stages3", dict(heads=4, narrow=True, rows_per_program=3, stages=3)),
              ("gqa4_narrow_sliding_splits3", dict(heads=4, narrow=True, sliding=True, splits=3)),
              ("gqa2_narrow_window600_tokens2048", dict(heads=2, narrow=True, window=600, tokens=2048))
              ] + SLIDING_CHECKS
    if a.quick:
        checks = [(name, opts) for name, opts in checks
                  if "broadcast" in name or "auto" in name or "sliding" in name or name in ("default", "gqa4", "rows2")]
    # the whole path and jax.vmap; sliding windows inside the ring (100), across the quantized tokens (300, 600)
    whole = [("mosaic_cache_check", check_cache), ("mosaic_vmap_check", check_vmap),
             ("mosaic_vmap_check_gqa4", functools.partial(check_vmap, heads=4)),
             ("mosaic_cache_check_sliding", functools.partial(check_cache, windows=(100, 300, 600))),
             ("mosaic_cache_check_rotate_kv", functools.partial(check_cache, rotate="kv")),
             ("mosaic_cache_check_sinks4_rotate_kv", functools.partial(check_cache, rotate="kv", sinks=4,
                                                                       windows=(None, 100, 600))),
             # sink counts past one 16-slot step of the window kernel's (the first reads the ring's last slots)
             ("mosaic_cache_check_sinks21", functools.partial(check_cache, sinks=21, windows=(None, 300)))]
    if a.cache_checks:
        checks = []
    if a.cache_only:
        whole = [(name, fn) for name, fn in whole if any(w in name for w in a.cache_only.split(","))]
    for name, opts in [] if a.skip_checks else checks:
        rows.append({"impl": f"mosaic_check_{name}", **check(**opts)})
        print(rows[-1], flush=True)
    for name, fn in [] if a.skip_checks else whole:
        rows.append({"impl": name, **fn()})
        print(rows[-1], flush=True)
    if a.checks_only:
        common.write_results(a.name, {**env, "rows": rows}, (
            f"Compiled checks, {env['device']}, jax {env['jax_version']}, commit {env['commit']}\n\n"
            + common.markdown(rows, list(dict.fromkeys(k for r in rows for k in r)))))
        return
    for hkv in map(int, a.kv_heads.split(",")):
        variants = {32: VARIANTS, 8: GQA_VARIANTS}[hkv]
        if a.quick:
            variants = [(name, opts) for name, opts in variants if name in {32: QUICK, 8: GQA_QUICK}[hkv]]
        rows += target(64, 4096, 32, hkv, variants, a.stages, hbm, quick=a.quick)
    cols = ["B", "T", "Hkv", "impl", "median_ms", "bytes", "tbps", "frac_of_hbm_copy", "ratio_to_dense", "out_rel_err",
            "m_abs_err", "l_rel_err"]
    table = (f"Mosaic GPU bulk kernel vs Triton, {env['device']}, jax {env['jax_version']}, commit {env['commit']}; "
             f"HBM copy {hbm:.2f} TB/s\n\n" + common.markdown(rows, cols))
    print(table)
    common.write_results(a.name, {**env, "hbm_copy_tbps": hbm, "rows": rows}, table)


if __name__ == "__main__":
    main()
