"""Decode-attention benchmark on one GPU: the fused KIVI kernel vs the plain-JAX reference
vs dense bf16 XLA attention, all timed in the same run; for 2-bit caches also the same tokens
as a MosaicKIVICache (impl ``mosaic_cache``: the Mosaic GPU kernel, Hopper).

Rows: B x T x (Hq, Hkv) x bits x impl with median ms, bytes moved, achieved TB/s and the
ratio to dense bf16 at the same shape; the measured HBM copy bandwidth sits at the top. Bytes:
the buffers the call reads (KIVI: codes, scales, mins and the whole ring; dense: K and V) plus q
and the output. A configuration that raises is a row with its error (``oom`` when memory ran out).
Run on the device: python -m benchmarks.decode_attention [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax as kj
from kivi_jax import attention_mosaic, attention_pallas
from benchmarks import common
from benchmarks.check_kernel_gpu import random_cache
from pallas_kernels import kivi_mosaic

D = 128


def dense_attention(q, k, v):
    """XLA bf16 decode attention, GQA without repeating K/V; float32 softmax."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, hq, 1, d).astype(q.dtype)


def qo_bytes(b, hq, dtype=jnp.bfloat16):
    """The query read and the output written: [B, Hq, 1, D] each (every impl moves them too)."""
    return 2 * b * hq * D * jnp.dtype(dtype).itemsize


def kv_bytes(b, hkv, t, dtype=jnp.bfloat16):
    """A dense cache's K and V [B, Hkv, T, D]."""
    return 2 * b * hkv * t * D * jnp.dtype(dtype).itemsize


def dense_bytes_moved(b, hq, hkv, t, dtype=jnp.bfloat16):
    """Dense decode attention's bytes: K and V, plus q and the output."""
    return kv_bytes(b, hkv, t, dtype) + qo_bytes(b, hq, dtype)


def kivi_bytes(cfg, b, hkv, t, dtype=jnp.bfloat16, hq=None):
    """The cache's buffers a KIVI call reads (codes, scales, mins of the capacity, the whole
    residual ring) plus q and the output when ``hq`` is given (bytes_per_token and
    residual_bytes cover the cache alone; the q/o term was missing from the rows' bytes)."""
    per_tok = cfg.bytes_per_token(num_kv_heads=hkv, head_dim=D, dtype=dtype)
    cache = b * (cfg.capacity(t) * per_tok + cfg.residual_bytes(num_kv_heads=hkv, head_dim=D, dtype=dtype))
    return int(cache) + (qo_bytes(b, hq, dtype) if hq else 0)


#: top-level fields of the results file (environment, hbm_copy_tbps), set by main() before the
#: sweep, so that the checkpoint is a results file of the same schema, not a bare list of rows
PARTIAL_TOP: dict = {}


def _checkpoint(rows):
    """Keep every measured row on disk as we go: a run cut short still leaves its numbers, as
    an object with the results file's top-level fields (commit, device, jax_version,
    hbm_copy_tbps) and ``partial: true`` (a bare list of rows had none of them)."""
    import json
    import os

    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "partial-rows.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**PARTIAL_TOP, "partial": True, "rows": rows}, f)
        os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous checkpoint whole


def _failed_row(base, bits, impl, nbytes, e):
    """A configuration that raised: a row (median_ms None, its error, oom when the device ran
    out of memory) instead of nothing, so the table shows it was tried."""
    text = f"{type(e).__name__}: {e}"
    return {**base, "bits": bits, "impl": impl, "median_ms": None, "bytes": nbytes, "tbps": None,
            "ratio_to_dense": None, "oom": any(m in text for m in ("RESOURCE_EXHAUSTED", "out of memory",
                                                                 "Out of memory")), "error": text[:300]}


def run(batches, lengths, heads, bits_list, impls, variants_opts, ref_max_bytes, dense_max_bytes, rows=None,
        residues=False, deadline=math.inf):
    """Times every configuration; appends to (and returns) ``rows``, saved after each one.
    deadline (time.monotonic()): shapes not begun by then are listed as skipped rows (a device
    call's time limit then still leaves its results written).
    residues: the KIVI rows hold T - (37 b mod R) tokens rather than T, so that the ring's
    split between fresh and flushed keys (Lb mod R) takes every value across the batch, as in
    a real decode (T itself, a multiple of R, is the ring's easiest case)."""
    rows = [] if rows is None else rows
    for hq, hkv in heads:
        for t in lengths:
            for b in batches:
                base = {"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": D}
                if time.monotonic() > deadline:  # every required field, None: still a valid row
                    rows.append({**base, "bits": None, "impl": "skipped_time_budget", "median_ms": None,
                                 "bytes": None, "tbps": None, "ratio_to_dense": None})
                    _checkpoint(rows)
                    continue
                # K/V bytes decide whether dense runs (as before); the row's bytes add q and o
                kv = kv_bytes(b, hkv, t)
                dense_bytes = dense_bytes_moved(b, hq, hkv, t)
                q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
                dense_ms = None
                dense_row = {**base, "bits": 16, "impl": "dense_bf16_xla", "median_ms": None, "bytes": dense_bytes,
                             "tbps": None, "ratio_to_dense": None}
                if kv <= dense_max_bytes:
                    k = v = None
                    try:
                        k = jax.random.normal(jax.random.key(2), (b, hkv, t, D), jnp.bfloat16)
                        v = jax.random.normal(jax.random.key(3), (b, hkv, t, D), jnp.bfloat16)
                        dense_ms = common.time_fn(jax.jit(dense_attention), q, k, v)
                    except Exception as e:  # noqa: BLE001 - report OOM and carry on
                        print("dense failed", b, t, hkv, type(e).__name__, str(e)[:200])
                        dense_row = _failed_row(base, 16, "dense_bf16_xla", dense_bytes, e)
                    finally:  # (a failed call kept K/V alive into the KIVI timings of this shape)
                        k = v = None
                    gc.collect()
                else:  # not attempted by design: no error, no OOM
                    dense_row["skipped"] = f"K/V {kv} bytes > dense_max_bytes {dense_max_bytes}"
                if dense_ms:
                    dense_row.update(median_ms=dense_ms, tbps=dense_bytes / dense_ms / 1e9, ratio_to_dense=1.0)
                rows.append(dense_row)
                _checkpoint(rows)
                for bits in bits_list:
                    cfg = kj.KIVIConfig(k_bits=bits, v_bits=bits)
                    try:
                        r = cfg.residual_length
                        length = t - (37 * jnp.arange(b)) % r if residues else None
                        cache = random_cache(cfg, batch=b, kv_heads=hkv, tokens=t, head_dim=D, length=length)
                    except Exception as e:  # noqa: BLE001
                        print("cache alloc failed", b, t, hkv, bits, type(e).__name__)
                        rows.append(_failed_row(base, bits, "cache_alloc", None, e))
                        _checkpoint(rows)
                        continue
                    nbytes = kivi_bytes(cfg, b, hkv, t, hq=hq)
                    todo = []  # (name, fn, the KIVICache -> what fn takes)
                    if "pallas" in impls:
                        for name, opts in variants_opts:
                            todo.append((name, jax.jit(lambda q, c, o=opts: attention_pallas.decode_attention(q, c, **o)),
                                         None))
                    if "reference" in impls and kv <= ref_max_bytes:  # (K/V alone, as before)
                        todo.append(("reference_xla", jax.jit(lambda q, c: kj.decode_attention(q, c, impl="reference")),
                                     None))
                    if "mosaic" in impls and bits == 2 and hq // hkv in kivi_mosaic.HEADS:
                        # the same tokens as a MosaicKIVICache (KIVIConfig(layout="mosaic")), converted
                        # before the timing: the Mosaic kernel + its window in JAX, the whole call
                        todo.append(("mosaic_cache", jax.jit(lambda q, c: kj.decode_attention(q, c, impl="pallas")),
                                     kj.MosaicKIVICache.from_kivi))
                    for name, fn, make in todo:
                        arg = None
                        try:
                            arg = cache if make is None else jax.block_until_ready(make(cache))
                            t_c = time.perf_counter()
                            jax.block_until_ready(fn(q, arg))
                            print(f"  {name}: first call (compile) {time.perf_counter() - t_c:.1f} s", flush=True)
                            ms = common.time_fn(fn, q, arg)
                        except Exception as e:  # noqa: BLE001
                            print("failed", name, b, t, hkv, bits, type(e).__name__, str(e)[:300])
                            rows.append(_failed_row(base, bits, name, nbytes, e))  # (was dropped silently)
                            _checkpoint(rows)
                            continue
                        finally:  # (a failed conversion kept its converted cache alive)
                            arg = None
                        row = {**base, "bits": bits, "impl": name, "median_ms": ms, "bytes": nbytes,
                               "tbps": nbytes / ms / 1e9, "ratio_to_dense": ms / dense_ms if dense_ms else None}
                        rows.append(row)
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                        _checkpoint(rows)
                    del cache
                    gc.collect()
    return rows


def breakdown(b=64, t=4096, hq=32, hkv=32, bits=2):
    """Where the time of one KIVI decode_attention call goes: the kernel over the quantized
    bulk alone, the same kernel with the residual ring (what the call runs; before 781aff9 the
    ring was a plain-JAX "window_only" row), and the whole call."""
    from kivi_jax.attention_pallas import _default_chunk, _ring
    from pallas_kernels import kivi_decode

    cfg = kj.KIVIConfig(k_bits=bits, v_bits=bits)
    cache = random_cache(cfg, batch=b, kv_heads=hkv, tokens=t, head_dim=D)
    gq = hq // hkv
    chunk = _default_chunk(cfg)
    qg = jax.random.normal(jax.random.key(1), (b, hkv, gq, D))
    qp = attention_pallas._pad_rows(qg)
    end = cache.num_quantized_values
    zero = jnp.zeros_like(cache.lengths)
    splits = attention_pallas.default_splits(b, hkv, cache.capacity // chunk, False)

    def kernel(qp, cache, with_ring, dequant="auto"):
        ring, ring_len, _ = _ring(cache, None, None, chunk, zero) if with_ring else (None, 0, 0)
        return kivi_decode.kivi_decode_partials(
            qp, cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes, cache.v_scale, cache.v_min,
            zero, -(-end // chunk), zero, end, k_bits=bits, v_bits=bits, group_size=cfg.group_size,
            chunk=chunk, num_splits=splits, variant=attention_pallas.DEFAULT_VARIANT, ring=ring, ring_len=ring_len,
            dequant=dequant, scale=attention_pallas.score_scale(D))  # (q unscaled, as the glue passes it)

    q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
    rows = []
    for name, fn, args in (("kernel_only", lambda qp, c: kernel(qp, c, False), (qp, cache)),
                           ("kernel_only_convert", lambda qp, c: kernel(qp, c, False, "convert"), (qp, cache)),
                           ("kernel_with_ring", lambda qp, c: kernel(qp, c, True), (qp, cache)),
                           ("whole_call", lambda q, c: attention_pallas.decode_attention(q, c), (q, cache))):
        ms = common.time_fn(jax.jit(fn), *args)
        rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": D, "bits": bits, "impl": f"breakdown_{name}",
                     "median_ms": ms, "bytes": None, "tbps": None, "ratio_to_dense": None})
        print(rows[-1], flush=True)
    return rows


EXTENSIONS = (  # name -> KIVIConfig settings (over plain KIVI-2)
    ("plain", {}), ("sinks4", dict(sink_tokens=4)), ("sinks4_xla_sinks", dict(sink_tokens=4)),
    ("rotate_kv", dict(rotate="kv")),
    ("sinks4_rotate_kv", dict(sink_tokens=4, rotate="kv")), ("k4v2", dict(k_bits=4)),
    ("key_group16", dict(key_group_size=16)), ("r32", dict(residual_length=32)), ("r64", dict(residual_length=64)),
    ("r96", dict(residual_length=96)), ("r96_xla_window", dict(residual_length=96)),
    ("r192", dict(residual_length=192)),
    # 16 sinks: in the ring's program (kivi_window.sink_step) / in plain JAX, combined after (before)
    ("sinks16", dict(sink_tokens=16)), ("sinks16_xla_sinks", dict(sink_tokens=16)),
    # the README's recommended 2-bit setting (value groups of 64: the token layout)
    ("recommended", dict(sink_tokens=16, rotate="kv", group_size=64, key_group_size=32)),
    ("recommended_xla_sinks", dict(sink_tokens=16, rotate="kv", group_size=64, key_group_size=32)),
    # the Mosaic layout (kivi_jax.decode_attention's kernel for it; a GPU only), with the rotation too
    ("mosaic", dict(layout="mosaic")), ("mosaic_rotate_kv", dict(layout="mosaic", rotate="kv")),
    ("mosaic_sinks4", dict(layout="mosaic", sink_tokens=4)),
    ("mosaic_sinks4_kernel_sinks", dict(layout="mosaic", sink_tokens=4)),
    ("mosaic_sinks4_rotate_kv", dict(layout="mosaic", sink_tokens=4, rotate="kv")))


def extensions(shapes=((64, 4096, 4096, 32), (96, 512, 330, 32), (96, 512, 330, 8)), rounds=5, hq=32, names=None):
    """Cost of the KIVIConfig extensions and residual lengths on the default kernel path, next to
    plain KIVI-2, in turns over ``rounds`` (shapes: B, capacity, tokens a row, Hkv; the paper's
    short rows are mostly ring). r96_xla_window: R = 96 with its ring attended in plain JAX
    (``ring_program="xla"``), as every R that is not a power of two was before; *_xla_sinks: the
    sinks' partials in plain JAX (``attention_pallas.KERNEL_SINKS`` off), as every S was before;
    *_kernel_sinks: the Mosaic layout's sinks in the window kernel (``attention_mosaic.KERNEL_SINKS``).
    Each arm is traced under its switches. names: only these of EXTENSIONS ("plain" always)."""
    rows = []
    for b, t, length, hkv in shapes:
        q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
        caches, fns = {}, {}
        for name, extra in EXTENSIONS:
            if names and name not in names and name != "plain":
                continue
            cfg = kj.KIVIConfig(**{"k_bits": 2, "v_bits": 2, **extra})
            if cfg.layout == "mosaic":  # random stores in the token layout, converted
                if jax.default_backend() != "gpu":
                    continue
                caches[name] = kj.MosaicKIVICache.from_kivi(random_cache(
                    dataclasses.replace(cfg, layout="tokens"), batch=b, kv_heads=hkv, tokens=t, head_dim=D,
                    length=length), cfg)
                fns[name] = jax.jit(lambda q, c: kj.decode_attention(q, c, impl="pallas"))
            else:
                caches[name] = random_cache(cfg, batch=b, kv_heads=hkv, tokens=t, head_dim=D, length=length)
                ring = "xla" if name.endswith("_xla_window") else None
                fns[name] = jax.jit(lambda q, c, ring=ring: attention_pallas.decode_attention(
                    q, c, ring_program=ring, interpret=jax.default_backend() != "gpu"))  # (a CPU dry run: interpreted)
            with common.switched((attention_pallas, "KERNEL_SINKS", not name.endswith("_xla_sinks")),
                                 (attention_mosaic, "KERNEL_SINKS", name.endswith("_kernel_sinks"))):
                jax.block_until_ready(fns[name](q, caches[name]))  # traced now, with the switches
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(common.time_fn(fn, q, caches[name]))
        plain = float(np.median(times["plain"]))
        for name, ms in times.items():
            med = float(np.median(ms))
            rows.append({"B": b, "T": t, "length": length, "Hq": hq, "Hkv": hkv, "impl": f"ext_{name}",
                         "residual_length": caches[name].config.residual_length, "median_ms": med,
                         "ratio_to_plain_kivi": med / plain, "rounds_ms": [round(x, 4) for x in ms]})
            print(rows[-1], flush=True)
        del caches, fns
        gc.collect()
    return rows


def sliding(rounds=5, window=4096, hq=32,
            shapes=((1, 16384, 8), (8, 16384, 8), (64, 16384, 8), (1, 32768, 32), (8, 16384, 32))):
    """A sliding window at long context (Mistral's 4096 tokens, every row full) on the Triton
    kernels: the splits over each row's window chunks (attention_pallas.RELATIVE_WINDOW_SPLITS,
    the default) vs over all the cache's (before), KIVI-2 and dense bf16, in turns on the same
    inputs; dense bf16 XLA attention over the window's tokens alone next to them."""
    rows = []
    for b, t, hkv in shapes:
        q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
        kd = jax.random.normal(jax.random.key(2), (b, hkv, window, D), jnp.bfloat16)
        base = common.time_fn(jax.jit(dense_attention), q, kd, kd)
        del kd
        caches = {"kivi2": random_cache(kj.KIVIConfig(), batch=b, kv_heads=hkv, tokens=t, head_dim=D)}
        dense = kj.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=D, max_length=t, dtype=jnp.bfloat16)
        kv = [jax.random.normal(jax.random.key(s), dense.k.shape, jnp.bfloat16) for s in (3, 4)]
        caches["dense"] = dataclasses.replace(dense, k=kv[0], v=kv[1], lengths=jnp.full((b,), t, jnp.int32))
        del kv
        for name, cache in caches.items():
            fns = {}
            for relative in (False, True):  # traced (first call) with the switch as it then is
                attention_pallas.RELATIVE_WINDOW_SPLITS = relative
                fns[relative] = jax.jit(lambda q, c: attention_pallas.decode_attention(
                    q, c, window=window, interpret=jax.default_backend() != "gpu"))  # (a CPU dry run: interpreted)
                jax.block_until_ready(fns[relative](q, cache))
            attention_pallas.RELATIVE_WINDOW_SPLITS = True
            times = {r: [] for r in fns}
            for _ in range(rounds):
                for r, fn in fns.items():
                    times[r].append(common.time_fn(fn, q, cache))
            err = float(jnp.abs(fns[True](q, cache).astype(jnp.float32) - fns[False](q, cache).astype(jnp.float32)).max())
            old = float(np.median(times[False]))
            for r, ms in times.items():
                med = float(np.median(ms))
                rows.append({"B": b, "T": t, "window": window, "Hq": hq, "Hkv": hkv, "cache": name,
                             "impl": "pallas_window_splits" if r else "pallas_all_splits", "median_ms": med,
                             "rounds_ms": [round(x, 4) for x in ms], "ratio_to_all_splits": med / old,
                             "ratio_to_dense_window": med / base, "max_abs_diff": err})
                print(rows[-1], flush=True)
        rows.append({"B": b, "T": t, "window": window, "Hq": hq, "Hkv": hkv, "impl": "dense_bf16_xla_window_tokens",
                     "median_ms": base})
        del caches
        gc.collect()
    return rows


SHORT_VARIANTS = {  # name -> attention_pallas.decode_attention's knobs
    "default": {}, "ring_own": dict(ring_program="own"), "ring_launch": dict(ring_program="launch"),
    "splits2": dict(num_splits=2), "splits2_ring_own": dict(num_splits=2, ring_program="own"),
    "warps8": dict(num_warps=8), "warps2": dict(num_warps=2), "chunk32": dict(chunk=32), "chunk128": dict(chunk=128),
    "stages2": dict(num_stages=2)}


def short_rows(rounds=5, shapes=((96, 384, 8), (96, 384, 32)), hq=32, variants=None):
    """The paper's setting (batch 96, rows of 257-384 tokens: most of a row in the ring) on the
    Triton KIVI-2 kernel: its knobs (``variants``, SHORT_VARIANTS' names) timed in turns on the
    same cache, next to the dense Pallas kernel over a dense cache of the same lengths (what the
    model's dense decode runs) and dense bf16 XLA attention."""
    rows = []
    for b, t, hkv in shapes:
        q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
        r = kj.KIVIConfig().residual_length
        length = t - (37 * jnp.arange(b)) % r  # every split of a row between ring and quantized tokens
        cache = random_cache(kj.KIVIConfig(), batch=b, kv_heads=hkv, tokens=t, head_dim=D, length=length)
        dense = kj.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=D, max_length=t, dtype=jnp.bfloat16)
        kd, vd = (jax.random.normal(jax.random.key(s), dense.k.shape, jnp.bfloat16) for s in (3, 4))
        dense = dataclasses.replace(dense, k=kd, v=vd, lengths=length.astype(jnp.int32))
        arms = {name: (jax.jit(lambda q, c, o=SHORT_VARIANTS[name]: attention_pallas.decode_attention(q, c, **o)),
                       (cache,)) for name in variants or SHORT_VARIANTS}  # name -> (fn, its arguments after q)
        arms["dense_pallas"] = (jax.jit(lambda q, c: attention_pallas.decode_attention(q, c)), (dense,))
        arms["dense_bf16_xla"] = (jax.jit(lambda q, k, v: dense_attention(q, k, v)), (kd, vd))  # (all t tokens)
        outs = {}
        for name, (fn, arg) in list(arms.items()):
            try:
                outs[name] = jax.block_until_ready(fn(q, *arg))
            except Exception as e:  # noqa: BLE001 - a knob this shape refuses: listed, not timed
                print("failed", name, b, t, hkv, type(e).__name__, str(e)[:300], flush=True)
                rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "impl": name, "median_ms": None,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
                del arms[name]
        times = {name: [] for name in arms}
        for _ in range(rounds):
            for name, (fn, arg) in arms.items():
                times[name].append(common.time_fn(fn, q, *arg))
        base = float(np.median(times["dense_pallas"]))
        for name, ms in times.items():
            diff = None if name.startswith("dense") else float(
                jnp.abs(outs[name].astype(jnp.float32) - outs["default"].astype(jnp.float32)).max())
            rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "impl": name, "median_ms": float(np.median(ms)),
                         "ratio_to_dense_pallas": float(np.median(ms)) / base, "max_abs_diff_to_default": diff,
                         "rounds_ms": [round(x, 4) for x in ms]})
            print(rows[-1], flush=True)
        del cache, dense, kd, vd, arms, outs
        gc.collect()
    return rows


def trace_calls(shapes=((1, 4096, 32), (1, 16384, 8), (8, 16384, 8), (64, 4096, 32), (64, 4096, 8)), calls=20,
                hq=32, option_sets=(("", {}),)):
    """Where one whole decode_attention call's GPU time goes, kernel by kernel (a profiler trace
    of ``calls`` calls back to back): dense bf16 XLA attention, the Triton kernel over a
    KIVICache and the Mosaic path over the same tokens, with each call's wall time next to
    them (run73/74: at B = 1 every path's 0.05-0.10 ms call is mostly dispatch, GPU 0.02-0.06
    ms; at B=64, T=4k the Mosaic path is its kernel 0.351 + the ring's window 0.040 ms).
    option_sets: (suffix, XLA compiler options) pairs; every arm is compiled with each (the
    arm's name gets the suffix), e.g. ("+concurrent", {"xla_gpu_command_buffer_scheduling_mode":
    "CONCURRENT"}) to let a command buffer run independent kernels side by side."""
    rows = []
    for b, t, hkv in shapes:
        q = jax.random.normal(jax.random.key(1), (b, hq, 1, D)).astype(jnp.bfloat16)
        cache = random_cache(kj.KIVIConfig(), batch=b, kv_heads=hkv, tokens=t, head_dim=D)
        kd = jax.random.normal(jax.random.key(2), (b, hkv, t, D), jnp.bfloat16)
        arms = [("dense_bf16_xla", jax.jit(dense_attention), (q, kd, kd)),
                ("pallas", jax.jit(lambda q, c: attention_pallas.decode_attention(q, c)), (q, cache)),
                ("mosaic_cache", jax.jit(lambda q, c: kj.decode_attention(q, c, impl="pallas")),
                 (q, jax.block_until_ready(kj.MosaicKIVICache.from_kivi(cache))))]
        for (name, jitted, args), (suffix, options) in itertools.product(arms, option_sets):
            name += suffix
            fn = jitted.lower(*args).compile(options or None)  # one compile: timed, traced, its HLO read
            wall = common.time_fn(fn, *args)
            hlo = fn.as_text()

            def run(fn=fn, args=args):
                out = None
                for _ in range(calls):
                    out = fn(*args)
                jax.block_until_ready(out)

            kernels = common.trace_kernels(run, hlo, steps=calls)
            gpu = sum(k["ms_per_step"] for k in kernels)
            rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "impl": name, "median_ms": wall, "gpu_ms": gpu,
                         "launches": sum(k["launches_per_step"] for k in kernels),
                         "kernels": "; ".join(f"{k['kernel'][:40]} {k['ms_per_step'] * 1e3:.1f}us"
                                              for k in kernels[:6])})
            print(rows[-1], flush=True)
        del cache, kd, arms
        gc.collect()
    return rows


def _trace_shapes(text):  # "1x4096x32,8x16384x8" -> [(1, 4096, 32), (8, 16384, 8)]
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = None
    if not shapes or any(len(s) != 3 or min(s) < 1 or 32 % s[2] for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated BxTxHkv, positive integers, Hkv dividing 32")
    return shapes


def _option_set(text):  # "+cc:a=1;b=X" -> ("+cc", {"a": "1", "b": "X"})
    suffix, _, pairs = text.partition(":")
    items = [pair for pair in pairs.split(";") if pair]
    if not items or any("=" not in pair for pair in items):
        raise argparse.ArgumentTypeError(f"{text!r}: SUFFIX:KEY=VALUE[;KEY=VALUE]")
    return suffix, dict(pair.split("=", 1) for pair in items)


def _report(name, env, title, rows, cols, note="", **top):
    """Prints the rows' markdown table under a header naming the device, versions and commit,
    and writes it with the JSON (``env``, ``top`` and the rows) under ``name``."""
    table = (f"{title}, {env['device']}, jax {env['jax_version']}, commit {env['commit']}{note}\n\n"
             + common.markdown(rows, cols))
    print(table)
    common.write_results(name, {**env, **top, "rows": rows}, table)


def finish_rows(rows, hbm):
    """Each row's fraction of the measured HBM copy bandwidth and its oom / oom_or_error flags."""
    for r in rows:
        r["frac_of_hbm_copy"] = r["tbps"] / hbm if r.get("tbps") else None
        # not run by design (the time budget, a dense K/V over dense_max_bytes) is no error
        r["oom_or_error"] = (r.get("median_ms") is None and r["impl"] != "skipped_time_budget"
                             and not r.get("skipped"))
        r.setdefault("oom", False)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the target shape plus tuning variants only")
    ap.add_argument("--name", default="decode-attention")
    ap.add_argument("--sliding", action="store_true",
                    help="only the sliding-window split partitions (each row's window chunks vs all), timed in turns")
    ap.add_argument("--rounds", type=common.at_least(1), default=5)
    ap.add_argument("--extensions", action="store_true",
                    help="sinks, rotation, key groups and residual lengths next to plain KIVI-2 (extensions())")
    ap.add_argument("--only", default="", help="--extensions: only these EXTENSIONS names (comma list)")
    ap.add_argument("--target-only", action="store_true", help="--extensions: only B=64, T=4096, 32 KV heads")
    ap.add_argument("--trace", action="store_true", help="only the kernels of whole calls, traced (trace_calls)")
    ap.add_argument("--short", action="store_true",
                    help="only the Triton kernel's knobs on the paper setting's short rows, in turns (short_rows)")
    ap.add_argument("--trace-shapes", type=_trace_shapes,
                    default="1x4096x32,1x16384x8,8x16384x8,64x4096x32,64x4096x8",
                    help="--trace's shapes, BxTxHkv comma-separated")
    ap.add_argument("--xla-options", action="append", default=[], type=_option_set,
                    metavar="SUFFIX:KEY=VALUE[;KEY=VALUE]",
                    help="--trace: also compile every arm with these XLA options (repeatable), named with SUFFIX")
    ap.add_argument("--kv-heads", default="32,8",
                    type=common.int_list("divisors of Hq = 32", lambda n: n >= 1 and 32 % n == 0),
                    help="the sweep's KV heads (Hq = 32), comma-separated")
    ap.add_argument("--batches", default="1,8,32,64,128", type=common.int_list())
    ap.add_argument("--lengths", default="1024,4096,16384,32768", type=common.int_list())
    ap.add_argument("--bits-mha", default="2,4", type=common.int_list("bits in {2, 4}", lambda n: n in (2, 4)),
                    help="bits swept with 32 KV heads (8 KV heads: 2)")
    ap.add_argument("--no-breakdown", action="store_true", help="the sweep alone (no Triton breakdown / variants)")
    ap.add_argument("--budget-s", type=common.at_least(0, float), default=math.inf,
                    help="begin no shape after this many seconds; the rest are listed as skipped")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    env = common.environment()
    if args.trace:
        shapes = args.trace_shapes
        option_sets = [("", {})] + list(args.xla_options)
        rows = trace_calls(shapes, option_sets=option_sets)
        cols = ["B", "T", "Hkv", "impl", "median_ms", "gpu_ms", "launches", "kernels"]
        _report(args.name, env, "Whole decode_attention calls kernel by kernel", rows, cols,
                note=" (median_ms: wall per call; gpu_ms: kernels' GPU time per call)")
        return
    if args.short:
        rows = short_rows(rounds=args.rounds)
        cols = ["B", "T", "Hkv", "impl", "median_ms", "ratio_to_dense_pallas", "max_abs_diff_to_default", "rounds_ms"]
        _report(args.name, env, "Triton KIVI-2 kernel's knobs on short rows (lengths T - 37 b mod 128), in turns",
                rows, cols)
        return
    if args.extensions:
        rows = extensions(rounds=args.rounds, names=args.only.split(",") if args.only else None,
                          **({"shapes": ((64, 4096, 4096, 32),)} if args.target_only else {}))
        cols = ["B", "T", "length", "Hkv", "impl", "residual_length", "median_ms", "ratio_to_plain_kivi", "rounds_ms"]
        _report(args.name, env, "The KIVIConfig extensions and residual lengths on the default kernel path, in turns",
                rows, cols)
        return
    if args.sliding:
        rows = sliding(rounds=args.rounds)
        cols = ["B", "T", "window", "Hkv", "cache", "impl", "median_ms", "ratio_to_all_splits", "ratio_to_dense_window",
                "max_abs_diff", "rounds_ms"]
        _report(args.name, env, "Triton decode kernels under a sliding window", rows, cols)
        return
    hbm = common.hbm_copy_tbps()
    print(f"HBM copy: {hbm:.3f} TB/s", flush=True)
    PARTIAL_TOP.clear()
    PARTIAL_TOP.update(env, hbm_copy_tbps=hbm)
    if args.quick:
        # the target shape, then rows of mixed lengths (every split of the ring between fresh
        # and flushed keys) at the target shape and at short contexts (the paper's setting:
        # most of a row in the ring). Magic vs conversions, 8 warps and chunk 128:
        # decode-attention-quick-magic-2026-12-01; the ring's keys read by one loop per key
        # source: decode-attention-quick-ringkeys-2026-12-01 (slower, not kept)
        # The ring in a launch of its own ("launch": the bulk's launch without the ring's
        # registers) next to the default.
        variants = [("pallas", {}), ("pallas_ring_launch", dict(ring_program="launch"))]
        rows = run([64], [4096], [(32, 32), (32, 8)], [2], ("pallas", "mosaic"), variants,
                   ref_max_bytes=8 << 30, dense_max_bytes=80 << 30)
        mixed = [(name + "_mixed_lengths", opts) for name, opts in variants]
        rows = run([64], [4096], [(32, 32)], [2], ("pallas",), mixed, ref_max_bytes=0, dense_max_bytes=0, rows=rows,
                   residues=True)
        rows = run([96], [256, 512], [(32, 32)], [2], ("pallas",), mixed, ref_max_bytes=0,
                   dense_max_bytes=80 << 30, rows=rows, residues=True)
        rows += breakdown()
    else:
        rows = []
        if not args.no_breakdown:
            rows = breakdown()
            run([64], [4096], [(32, 32)], [2], ("pallas",),
                [("pallas_dequant", dict(variant="dequant")),
                 ("pallas_swap_f32dots", dict(variant="swap", dot_dtype="float32")),
                 ("pallas_swap_c32", dict(variant="swap", chunk=32))],
                ref_max_bytes=0, dense_max_bytes=80 << 30, rows=rows)
        for hkv in args.kv_heads:
            run(args.batches, args.lengths, [(32, hkv)], args.bits_mha if hkv == 32 else [2],
                ("pallas", "reference", "mosaic"), [("pallas", dict())], ref_max_bytes=1 << 30,
                dense_max_bytes=80 << 30, rows=rows, deadline=deadline)
    finish_rows(rows, hbm)
    cols = ["B", "T", "Hq", "Hkv", "bits", "impl", "median_ms", "bytes", "tbps", "frac_of_hbm_copy", "ratio_to_dense",
            "oom_or_error"]
    if any("ratio_to_plain_kivi" in r for r in rows):
        cols.append("ratio_to_plain_kivi")
    _report(args.name, env, "Decode attention", rows, cols, note=f"; HBM copy {hbm:.2f} TB/s (read+write)",
            hbm_copy_tbps=hbm)


if __name__ == "__main__":
    main()
