"""Timing of the window kernel (pallas_kernels.kivi_window: the residual ring, R = 128
full-precision tokens) for its knobs, next to the plain-JAX window it replaces and the dense
flash-decoding kernel over the same R tokens (the same bytes: the floor to aim at), all in one
run. Paper batch B=96, Llama-2-7B heads (Hkv=32, D=128), KIVI-2, rows holding 300 tokens (a
full ring whose oldest keys are in the block flushed last). Random words: speed only, plus each
configuration's relative error against the plain-JAX window.

    PYTHONPATH=. python -m benchmarks.window_tuning
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax as kj
from benchmarks import common
from benchmarks.check_kernel_gpu import random_cache
from kivi_jax import attention_pallas as ap
from pallas_kernels import dense_decode, kivi_window

CONFIGS = [
    {"chunk": 32, "num_splits": 1}, {"chunk": 32, "num_splits": 2}, {"chunk": 32, "num_splits": 4},
    {"chunk": 64, "num_splits": 1}, {"chunk": 64, "num_splits": 2}, {"chunk": 128, "num_splits": 1},
    {"chunk": 128, "num_splits": 1, "num_warps": 8}, {"chunk": 32, "num_splits": 2, "num_stages": 3},
    {"chunk": 16, "num_splits": 2},
]


def main(argv=None):
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--batch", type=int, default=96)
    ap_.add_argument("--kv-heads", type=int, default=32)
    ap_.add_argument("--length", type=int, default=300)
    args = ap_.parse_args(argv)
    b, hkv, d, hq = args.batch, args.kv_heads, 128, 32
    cfg = kj.KIVIConfig()
    r = cfg.residual_length
    cache = random_cache(cfg, batch=b, kv_heads=hkv, tokens=512, length=args.length, key=5)
    q = jax.random.normal(jax.random.key(6), (b, hq, 1, d), jnp.bfloat16)
    qg = ap._grouped_queries(q, hkv)
    qp = ap._pad_rows(qg)
    g = hq // hkv
    start = jnp.zeros((b,), jnp.int32)
    lb, n = cache.body_lengths, cache._body_quantized_keys()
    ring_bytes = 2 * cache.k_res[:, :, :r].nbytes
    rows = []

    def add(impl, fn, *xs, out=None):
        ms = common.time_fn(jax.jit(fn), *xs)
        rows.append({"B": b, "Hkv": hkv, "R": r, "impl": impl, "median_ms": ms, "bytes": ring_bytes,
                     "tbps": ring_bytes / ms / 1e9})
        print(rows[-1], flush=True)

    xla = jax.jit(lambda qg, c: ap._combine([ap._split_axis(*ap._window_partials(qg, c, start))], g))
    want = np.asarray(xla(qg, cache), np.float64)
    add("xla_window", lambda qg, c: ap._window_partials(qg, c, start), qg, cache)
    kd = jax.random.normal(jax.random.key(7), (2, b, hkv, r, d), jnp.bfloat16)
    full = jnp.full((b,), r, jnp.int32)
    add("dense_kernel_same_bytes", lambda qp, k, v: dense_decode.dense_decode_partials(
        qp, k, v, start, full // 64, start, full, num_splits=2), qp, kd[0], kd[1])
    for conf in CONFIGS:
        def fn(qp, c, conf=conf):
            return kivi_window.kivi_window_partials(qp, c.k_res, c.v_res, c.k_codes, c.k_scale, c.k_min, lb, n,
                                                    start, r=r, k_bits=cfg.k_bits, key_group_size=cfg.key_group,
                                                    **conf)
        got = np.asarray(ap._combine([jax.jit(fn)(qp, cache)], g), np.float64)
        add("kernel " + ",".join(f"{k}={v}" for k, v in conf.items()), fn, qp, cache)
        rows[-1]["rel_err_vs_xla"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    env = common.environment()
    cols = ["B", "Hkv", "R", "impl", "median_ms", "tbps", "rel_err_vs_xla"]
    table = common.markdown(rows, cols)
    print(table)
    common.write_results("window-tuning", {**env, "hbm_copy_tbps": common.hbm_copy_tbps(), "rows": rows}, table)


if __name__ == "__main__":
    main()
