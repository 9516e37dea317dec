"""Prompt attention on the GPU: cuDNN's flash attention (``prefill_attention(impl="cudnn")``, what
"auto" picks there) next to the blocked XLA path, both checked against float32 at HIGHEST
precision on the same random bf16 inputs (ragged lengths, GQA, a sliding window).

    python -m benchmarks.prefill_attention [--name prefill-attention]

Writes <name>-<date>.json (rows: B, T, Hq, Hkv, window, impl, median_ms, max_rel_err) and .md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from kivi_jax import prefill_attention

D = 128
SHAPES = [  # (B, T, Hq, Hkv, window, ragged)
    (8, 4096, 32, 32, None, False),
    (8, 4096, 32, 8, None, False),
    (8, 4096, 32, 32, None, True),
    (4, 4096, 32, 8, 1024, True),
    (32, 160, 32, 32, None, True),
]


def rows_for(b, t, hq, hkv, window, ragged):
    ks = jax.random.split(jax.random.key(b * t + hkv), 3)
    q = jax.random.normal(ks[0], (b, hq, t, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, hkv, t, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, hkv, t, D), jnp.bfloat16)
    lengths = (t - (jnp.arange(b, dtype=jnp.int32) * 997) % (t // 2)) if ragged else None
    want = prefill_attention(q, k, v, lengths, window=window, impl="xla", exact=True).astype(jnp.float32)
    # positions >= a row's length are padding (never read): compared only below it
    valid = (jnp.ones((b, 1, t, 1), bool) if lengths is None
             else (jnp.arange(t)[None, None, :, None] < lengths[:, None, None, None]))
    rows = []
    for impl in ("xla", "cudnn"):
        fn = jax.jit(lambda q, k, v, n, impl=impl: prefill_attention(q, k, v, n, window=window, impl=impl))
        got = fn(q, k, v, lengths).astype(jnp.float32)
        err = float(jnp.max(jnp.where(valid, jnp.abs(got - want), 0)) / jnp.max(jnp.abs(want)))
        ms = common.time_fn(fn, q, k, v, lengths)
        rows.append({"B": b, "T": t, "Hq": hq, "Hkv": hkv, "window": window, "ragged": ragged, "impl": impl,
                     "median_ms": ms, "max_rel_err": err})
        print(rows[-1], flush=True)
    rows[-1]["speedup_vs_xla"] = rows[0]["median_ms"] / rows[-1]["median_ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="prefill-attention")
    a = ap.parse_args(argv)
    env = common.environment()
    rows = [r for shape in SHAPES for r in rows_for(*shape)]
    cols = ["B", "T", "Hq", "Hkv", "window", "ragged", "impl", "median_ms", "max_rel_err", "speedup_vs_xla"]
    table = (f"prefill_attention, bf16, D={D}: cuDNN flash attention vs the blocked XLA path, errors against "
             f"float32 HIGHEST; {env['device']}, jax {env['jax_version']}, commit {env['commit']}\n\n"
             + common.markdown(rows, cols))
    print(table)
    common.write_results(a.name, {**env, "rows": rows}, table)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
