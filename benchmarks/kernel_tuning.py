"""Kernel-only timing of the decode kernel's tuning knobs (chunk, warps, stages), on random words.

Times ``kivi_decode_partials`` alone (no cache, no residual window) at the record shapes for
each configuration, next to dense bf16 XLA attention in the same run. The words are random:
this measures speed only. Writes JSON + markdown. (At a13b1d0, as kernel_layouts.py, it compared packed
layouts: benchmarks/results/kernel-layouts-2026-11-30.*.)

    PYTHONPATH=. python -m benchmarks.kernel_tuning
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.decode_attention import dense_attention
from kivi_jax.attention_pallas import default_splits
from pallas_kernels import kivi_decode

D, G = 128, 32

CONFIGS = [
    {"variant": "dequant", "chunk": 64},
    {"variant": "dequant", "chunk": 32},
    {"variant": "dequant", "chunk": 128, "num_warps": 8},
    {"variant": "dequant", "chunk": 64, "num_stages": 3},
]


def inputs(b, hkv, t, bits=2, key=0):
    ks = jax.random.split(jax.random.key(key), 8)
    c = 32 // bits
    kshape = (b, hkv, t // c, D)
    words = lambda k, s: jax.random.bits(k, s, jnp.uint32)  # noqa: E731
    scale = lambda k, s: (jax.random.uniform(k, s) * 0.1).astype(jnp.bfloat16)  # noqa: E731
    q = jax.random.normal(ks[0], (b, hkv, 16, D))
    return (q, words(ks[1], kshape), scale(ks[2], (b, hkv, t // G, D)), scale(ks[3], (b, hkv, t // G, D)),
            words(ks[4], (b, hkv, t // c, D)), scale(ks[5], (b, hkv, t, D // G)), scale(ks[6], (b, hkv, t, D // G)))


def main():
    env = common.environment()
    rows = []
    for b, t, hkv in ((64, 4096, 32), (64, 4096, 8), (8, 16384, 32)):
        hq = 32
        kq = jax.random.split(jax.random.key(9), 3)
        q = jax.random.normal(kq[0], (b, hq, 1, D), jnp.bfloat16)
        k = jax.random.normal(kq[1], (b, hkv, t, D), jnp.bfloat16)
        v = jax.random.normal(kq[2], (b, hkv, t, D), jnp.bfloat16)
        dense_ms = common.time_fn(jax.jit(dense_attention), q, k, v)
        del k, v
        rows.append({"B": b, "T": t, "Hkv": hkv, "impl": "dense_bf16", "median_ms": dense_ms})
        print(rows[-1], flush=True)
        zeros = jnp.zeros((b,), jnp.int32)
        for opts in CONFIGS:
            opts = dict(opts)
            chunk = opts["chunk"]
            splits = default_splits(b, hkv, t // chunk, False)
            args = inputs(b, hkv, t)
            fn = jax.jit(lambda *a, o=tuple(opts.items()), s=splits: kivi_decode.kivi_decode_partials(
                *a, zeros, zeros + t // dict(o)["chunk"], zeros, zeros + t, k_bits=2, v_bits=2, group_size=G,
                num_splits=s, **dict(o)))
            try:
                ms = common.time_fn(fn, *args)
                err = None
            except Exception as e:  # a configuration that does not compile is a result too
                ms, err = None, f"{type(e).__name__}: {str(e)[:300]}"
            rows.append({"B": b, "T": t, "Hkv": hkv, "impl": json.dumps(opts), "median_ms": ms,
                         "ratio_to_dense": ms / dense_ms if ms else None, "error": err})
            print(rows[-1], flush=True)
            del args
    out = common.out_dir()
    (out / "kernel-tuning.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    lines = ["| B | T | Hkv | impl | ms | / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] else r.get("error", "")[:60]
        ratio = f"{r['ratio_to_dense']:.2f}" if r.get("ratio_to_dense") else ""
        lines.append(f"| {r['B']} | {r['T']} | {r['Hkv']} | `{r['impl']}` | {ms} | {ratio} |")
    (out / "kernel-tuning.md").write_text(f"{env}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
