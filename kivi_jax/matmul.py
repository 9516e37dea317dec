"""layer_matmul: x @ w[layer] for layer-stacked weights, with the Pallas kernel as an option.

The models keep their layers' weights stacked [L, K, N] and scan over layers. In a decode
step (M = batch rows, bound by reading the weights) XLA:GPU copies each layer's matrices
out of the stack before its GEMM; ``impl="pallas"`` reads the slice in place
(:mod:`pallas_kernels.stacked_matmul`): on the H200, 0.63 / 1.32 / 1.22 ms for 32 layers of
q_proj / gate_proj / down_proj at M=96 vs XLA's 1.26 / 2.97 / 3.28 ms
(stacked-matmul-2026-11-30). ``kivi_jax.generate`` uses it on one GPU.
"""

from __future__ import annotations

import math

import jax
from jax import lax

from pallas_kernels.flash import check_layer
from pallas_kernels.stacked_matmul import stacked_matmul

MATMUL_IMPLS = ("xla", "pallas")
# rows above which impl="pallas" runs XLA's GEMM: a program of the kernel holds all the rows
# (made for decode's M <= 128; timed at M = 96 and, end to end, 256), and from here the GEMM
# has enough rows to be bound by its arithmetic rather than by the weights' one read
ROWS = 256


def kernel_blocks(k: int, n: int) -> tuple[int, int] | None:
    """(block_k, block_n) for a [K, N] matrix: powers of two dividing K and N (at most 64
    and 64: the fastest tiling measured on the H200, 4 stages; 128-wide blocks spill or
    measured slower), or None when one is below 16."""
    bk, bn = math.gcd(k, 64), math.gcd(n, 64)
    return (bk, bn) if min(bk, bn) >= 16 else None


def layer_matmul(x, w, layer, *, impl: str = "xla"):
    """x [..., K] @ w[layer] with w [L, K, N] -> [..., N] in x's dtype.

    impl: "xla" (slice, then jnp.matmul) or "pallas" (the kernel reads the slice in place;
    interpret mode off-GPU; more than :data:`ROWS` rows, shapes with no power-of-two tile
    of at least 16 dividing K and N, or x and w of different dtypes fall back to "xla").
    layer: an integer scalar; a concrete one must be in [0, L).
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {MATMUL_IMPLS}")
    # (the slice would clamp it, and the kernel's unblocked read would leave the stack; a float
    # layer was truncated by int())
    check_layer(layer, w.shape[0])
    blocks = kernel_blocks(*w.shape[1:])
    # x and w of two dtypes: jnp.matmul promotes (float32 x times bf16 w in float32), the kernel
    # would round x to w's dtype, so the impls would not agree
    if impl == "xla" or blocks is None or math.prod(x.shape[:-1]) > ROWS or x.dtype != w.dtype:
        return (x @ lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)).astype(x.dtype)
    lead = x.shape[:-1]
    y = stacked_matmul(x.reshape(-1, x.shape[-1]), w, layer, block_k=blocks[0], block_n=blocks[1],
                       interpret=jax.default_backend() != "gpu")
    return y.reshape(*lead, w.shape[2])


class StackedMatrix:
    """w[layer] of a stacked [L, K, N] weight, read only through ``x @ StackedMatrix(...)``:
    lets a layer written as ``h @ p["q_proj"]`` run on the stack without slicing it."""

    def __init__(self, w, layer, impl: str):
        self.w, self.layer, self.impl = w, layer, impl

    def __rmatmul__(self, x):
        return layer_matmul(x, self.w, self.layer, impl=self.impl)
