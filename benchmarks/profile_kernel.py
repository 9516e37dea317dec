"""One KIVI decode-attention call at the kernel target shape, for Nsight Compute on the device:

    ncu --clock-control none -k regex:kivi_decode --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python -m benchmarks.profile_kernel [--variant dequant]

(B=64, T=4096, Hq=Hkv=32, D=128, 2-bit, bf16: the shape of the issue's target.)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import kivi_jax as kj
from kivi_jax import attention_pallas
from benchmarks.check_kernel_gpu import random_cache


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--kv-heads", type=int, default=32)
    args = ap.parse_args(argv)
    cache = random_cache(kj.KIVIConfig(), batch=args.batch, kv_heads=args.kv_heads, tokens=args.tokens)
    q = jax.random.normal(jax.random.key(1), (args.batch, 32, 1, 128)).astype(jnp.bfloat16)
    fn = jax.jit(lambda q, c: attention_pallas.decode_attention(q, c, variant=args.variant))
    for _ in range(4):  # the profiler skips the first launches (compile, warm-up)
        jax.block_until_ready(fn(q, cache))


if __name__ == "__main__":
    main()
