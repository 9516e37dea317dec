"""Timing of the decode kernel's tuning knobs (chunk, warps, stages, splits), on random words.

Times ``kivi_decode_partials`` alone (no cache, no residual window) at the record shapes for
each configuration, and the whole ``decode_attention`` call (ring included) with the same
knobs, next to dense bf16 XLA attention in the same run. The words are random: this measures
speed only (each configuration's output is compared with the first's). Writes JSON +
markdown. (At a13b1d0, as kernel_layouts.py, it compared packed layouts:
benchmarks/results/kernel-layouts-2026-11-30.*.)

    PYTHONPATH=. python -m benchmarks.kernel_tuning [--shapes N]
    python -m benchmarks.kernel_tuning --dry-run   # tiny, interpret mode: checks the script on CPU
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

import kivi_jax as kj
from benchmarks import common
from benchmarks.check_kernel_gpu import random_cache
from benchmarks.decode_attention import dense_attention
from kivi_jax import attention_pallas
from kivi_jax.attention_pallas import default_splits
from pallas_kernels import kivi_decode

D = 128
CFG = kj.KIVIConfig()  # KIVI-2, G = 32

# kernel-tuning-2026-11-30: swap at chunk 64 fastest (1.33 vs dequant 1.65 ms at B=64 T=4k Hkv=32);
# v_scales_t (value scales tokens-minor) measured slower: 1.42 / 0.38 / 0.73 ms vs swap's
# (kernel-tuning-2026-11-30-run2); chunk 128 at 8 warps too (1.37 / 0.52 / 1.02); 3 stages beat 2
# and 4 (run2, run3). kernel-tuning-2026-12-01: 1-2 warps (mma.sync) 1.4-1.9x slower.
# Now: sequence splits. With the ring in the kernel it holds 167 registers, 3 programs an SM
# (396 on an H200), and B=64 x 32 heads x 1 split is 2048 programs, 5.2 waves: the last one a
# fifth full. More splits make more, shorter programs (the tail shrinks; more partials to combine).
CONFIGS = [
    {"variant": "swap", "chunk": 64},  # the default (4 warps, 3 stages, splits by default_splits)
    {"variant": "swap", "chunk": 64, "num_splits": 2},
    {"variant": "swap", "chunk": 64, "num_splits": 4},
    {"variant": "swap", "chunk": 64, "num_splits": 8},
]
SHAPES = ((64, 4096, 32), (64, 4096, 8), (8, 16384, 32))
DRY_SHAPES = ((2, 512, 4), (2, 512, 1))  # --dry-run: interpret mode on CPU, Hq = 4 (checks the script)


def combined(o, m, l):
    """Flash-decoding partials [B, Hkv, S, M, (D)] -> the normalized bulk output [B, Hkv, M, D]
    (comparable across chunk sizes and split counts)."""
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    return jnp.sum(o * w[..., None], axis=2) / jnp.sum(l * w, axis=2)[..., None]


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N of SHAPES only")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in interpret mode: checks the script on CPU")
    cli = ap.parse_args(argv)
    env = common.environment()
    interpret = cli.dry_run
    hq, d = (4, 32) if interpret else (32, D)
    rows = []
    for b, t, hkv in (DRY_SHAPES if interpret else SHAPES)[:cli.shapes]:
        kq = jax.random.split(jax.random.key(9), 3)
        q = jax.random.normal(kq[0], (b, hq, 1, d), jnp.bfloat16)
        k = jax.random.normal(kq[1], (b, hkv, t, d), jnp.bfloat16)
        v = jax.random.normal(kq[2], (b, hkv, t, d), jnp.bfloat16)
        dense_ms = common.time_fn(jax.jit(dense_attention), q, k, v)
        del k, v
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": "dense_bf16", "median_ms": dense_ms})
        print(rows[-1], flush=True)
        zeros = jnp.zeros((b,), jnp.int32)
        cache = random_cache(CFG, batch=b, kv_heads=hkv, tokens=t, head_dim=d)  # random words: speed only
        g = 1 << (hq // hkv - 1).bit_length()  # the kernel's q rows: the query heads of a KV head
        args = (jax.random.normal(kq[0], (b, hkv, g, d)), cache.k_codes, cache.k_scale, cache.k_min,
                cache.v_codes, cache.v_scale, cache.v_min)
        first = None
        for opts in CONFIGS:
            opts = dict(opts)
            chunk = opts["chunk"]
            splits = opts.pop("num_splits", None) or default_splits(b, hkv, t // chunk, interpret)
            fn = jax.jit(lambda *a, o=tuple(opts.items()), s=splits: kivi_decode.kivi_decode_partials(
                *a, zeros, zeros + t // dict(o)["chunk"], zeros, zeros + t, k_bits=CFG.k_bits, v_bits=CFG.v_bits,
                group_size=CFG.group_size, num_splits=s, interpret=interpret, scale=attention_pallas.score_scale(d),
                **dict(o)))  # (q unscaled with the scale on the products, as the glue calls it)
            # the whole call with the same knobs: the residual ring walked in the kernel too
            call_kw = {k: opts[k] for k in ("variant", "chunk", "num_warps", "num_stages") if k in opts}
            call_kw["num_splits"] = splits
            whole = jax.jit(lambda q, c, kw=tuple(call_kw.items()): attention_pallas.decode_attention(
                q, c, interpret=interpret, **dict(kw)))
            rel, whole_ms = None, None
            try:
                a = args
                if opts.get("v_scales_t"):  # the candidate layout, built outside the timed call
                    a = args[:5] + tuple(jnp.swapaxes(x, -1, -2).copy() for x in args[5:])
                ms = common.time_fn(fn, *a)
                whole_ms = common.time_fn(whole, q, cache)
                err = None
                out = combined(*fn(*a))  # the first configuration is the yardstick of the others
                first = out if first is None else first
                rel = float(jnp.linalg.norm(out - first) / jnp.linalg.norm(first))
            except Exception as e:  # a configuration that does not compile is a result too
                ms, err = None, f"{type(e).__name__}: {str(e)[:300]}"
            rows.append({"B": b, "T": t, "Hkv": hkv, "impl": json.dumps({**opts, "num_splits": splits}), "median_ms": ms,
                         "ratio_to_dense": ms / dense_ms if ms else None, "whole_call_ms": whole_ms,
                         "rel_err_vs_first": rel, "error": err})
            print(rows[-1], flush=True)
        del cache, args
    out = common.out_dir()
    (out / "kernel-tuning.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    lines = ["| B | T | Hkv | impl | kernel ms | / dense | whole call ms | rel. diff vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] else r.get("error", "")[:60]
        ratio = f"{r['ratio_to_dense']:.2f}" if r.get("ratio_to_dense") else ""
        rel = "" if r.get("rel_err_vs_first") is None else f"{r['rel_err_vs_first']:.1e}"
        whole = f"{r['whole_call_ms']:.3f}" if r.get("whole_call_ms") else ""
        lines.append(f"| {r['B']} | {r['T']} | {r['Hkv']} | `{r['impl']}` | {ms} | {ratio} | {whole} | {rel} |")
    (out / "kernel-tuning.md").write_text(f"{env}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
