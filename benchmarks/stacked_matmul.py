"""The decode step's matmuls alone: x [B, K] @ w[layer] for the stacked [L, K, N] weights of a
Llama-2-7B shape, run for every layer in a lax.scan (as the model does), three ways in one run:

- ``xla_scan``: XLA slices w[i] in the scan (it copies the slice before cuBLAS);
- ``pallas_scan``: the Pallas kernel reads w[i] in place (one row per tiling in ``--configs``);
- ``xla_unstacked``: cuBLAS on L separate matrices (no slicing at all): the GEMM's own speed.

Reports ms per scan (L layers), the weight bytes read and TB/s. Run on a GPU:

    PYTHONPATH=. python -m benchmarks.stacked_matmul [--batch 96]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import common
from kivi_jax.matmul import layer_matmul
from pallas_kernels.stacked_matmul import stacked_matmul

SHAPES = {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)}
# shared memory per stage: (Mp x block_k + block_k x block_n) x 2 bytes, Mp = 128 rows for a
# batch of 96; all of these stay under the H200's 227 KB (block_k 256 at 3 stages would not)
CONFIGS = [dict(block_n=64, block_k=128, num_warps=4, num_stages=3),
           dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
           dict(block_n=64, block_k=64, num_warps=4, num_stages=4),
           dict(block_n=32, block_k=128, num_warps=4, num_stages=4),
           dict(block_n=64, block_k=128, num_warps=8, num_stages=3),
           dict(block_n=128, block_k=64, num_warps=8, num_stages=4)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", default=None, help="JSON list of kernel configs (default: a small sweep)")
    ap.add_argument("--dry-run", action="store_true", help="shapes / 8, 2 layers, interpret mode: checks the script")
    a = ap.parse_args(argv)
    shapes = {k: (kk // 8, n // 8) for k, (kk, n) in SHAPES.items()} if a.dry_run else SHAPES
    layers = 2 if a.dry_run else a.layers
    interpret = jax.default_backend() != "gpu"
    configs = json.loads(a.configs) if a.configs else CONFIGS
    rows = []
    for name, (k, n) in shapes.items():
        key = jax.random.key(sum(map(ord, name)))
        w = (jax.random.normal(key, (layers, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        x = jax.random.normal(jax.random.key(1), (a.batch, k), jnp.bfloat16)
        nbytes = w.size * 2

        def scan_of(mm):
            def run(x, w):
                def body(acc, i):
                    return acc + mm(x, w, i)[:, :8].astype(jnp.float32), None
                return lax.scan(body, jnp.zeros((x.shape[0], 8), jnp.float32), jnp.arange(layers))[0]
            return jax.jit(run)

        ref = scan_of(lambda x, w, i: layer_matmul(x, w, i, impl="xla"))
        want = ref(x, w)
        arms = [("xla_scan", {}, ref)]
        for cfg in configs:
            arms.append(("pallas_scan", cfg, scan_of(lambda x, w, i, cfg=cfg: stacked_matmul(x, w, i, interpret=interpret, **cfg))))
        ws = [w[i] for i in range(layers)]
        unstacked = jax.jit(lambda x, ws: sum((x @ wi)[:, :8].astype(jnp.float32) for wi in ws))
        for impl, cfg, fn in arms + [("xla_unstacked", {}, None)]:
            try:
                args = (x, ws) if fn is None else (x, w)
                fn = unstacked if fn is None else fn
                err = float(jnp.max(jnp.abs(fn(*args) - want)) / jnp.max(jnp.abs(want)))
                ms = common.time_fn(fn, *args)
                row = {"matrix": name, "K": k, "N": n, "B": a.batch, "L": layers, "impl": impl, **cfg,
                       "median_ms": ms, "bytes": nbytes, "tbps": nbytes / ms / 1e9, "rel_err": err}
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a row
                row = {"matrix": name, "impl": impl, **cfg, "error": f"{type(e).__name__}: {e}"[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del w, ws
    cols = ["matrix", "impl", "block_n", "block_k", "num_warps", "num_stages", "median_ms", "tbps", "rel_err"]
    table = common.markdown(rows, cols)
    print(table)
    common.write_results("stacked-matmul", {**common.environment(), "rows": rows}, table)


if __name__ == "__main__":
    main()
