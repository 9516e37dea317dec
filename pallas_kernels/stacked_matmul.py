"""y = x @ w[layer]: one layer's matrix read in place from layer-stacked weights.

Why: the models run their decoder layers with one ``lax.scan`` over weights stacked [L, K, N].
Inside that loop XLA:GPU (jax 0.11.2) copies each layer's matrices out of the stack before
cuBLAS reads them (async dynamic-slice fusions; a one-layer temporary of 0.42 GB for a
Llama-2-7B shape; results/decode-step-ab-2026-11-30*, decode-loop-memory-2026-11-30), and
``--xla_gpu_enable_dynamic_slice_fusion`` does not remove the copy. A decode step's matmuls
have M = batch rows, so they are bound by reading the weights, and the copy adds two passes
over them. This kernel takes the whole stack and the layer index (a traced scalar) and
streams the slice itself.

Split-K: program (n, s) multiplies x [M, K-range s] by w[layer, K-range s, N-block n] with
float32 accumulation and writes a partial [M, block_n]; the wrapper sums the splits. Enough
programs (N / block_n x splits) keep every SM streaming for the M <= 128 rows of decode.

Shapes: x [M, K]; w [L, K, N]; layer () int32; out [M, N] in x's dtype. K and N must be
multiples of block_k and block_n (powers of two); M is padded to a power of two >= 16 and a
program holds all of it (:data:`MAX_ROWS` at most: a decode step's rows). The pipeline keeps
as many stages as fit a multiprocessor's shared memory (4 x (512 x 64 + 64 x 64) bf16 did
not at M = 512: Mistral-7B shape, batch 512, e2e-2026-12-02-run34-mistral). Any
size of w: the Triton lowering computes offsets in 64 bits once w exceeds 2**32 bytes (a 13B
model's [40, 5120, 13824] stack; tests/test_stacked_matmul.py checks the lowered IR).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import check_layer, clamp_layer, triton_params


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, block_k: int, block_n: int, blocks: int, per_split: int,
            precision):
    n, s = pl.program_id(0), pl.program_id(1)
    layer = clamp_layer(layer_ref[0], w_ref.shape[0])  # (a traced layer is unchecked: never read past the stack)
    lo = s * per_split
    hi = jnp.minimum(lo + per_split, blocks)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    def body(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        xb = x_ref[:, pl.ds(k0, block_k)]
        wb = w_ref[layer, pl.ds(k0, block_k), cols]
        return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32, precision=precision)

    o_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(o_ref.shape, jnp.float32))


SMEM_BYTES = 227 * 1024  # shared memory a CTA may take on Hopper (the H200 reports 232448)
MAX_ROWS = 512  # padded rows a program holds: its float32 accumulator [M, block_n] lives in registers


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pipeline_stages(rows: int, block_k: int, block_n: int, itemsize: int, num_stages: int) -> int:
    """The stages (at most ``num_stages``) whose x [rows, block_k] and w [block_k, block_n] tiles
    fit :data:`SMEM_BYTES`; Triton's pipeline keeps one of each a stage."""
    per_stage = (rows + block_n) * block_k * itemsize
    fit = SMEM_BYTES // per_stage
    if fit < 1:
        raise ValueError(f"stacked_matmul: M={rows} padded rows with block_k={block_k}, block_n={block_n} need "
                         f"{per_stage} bytes of shared memory a stage; at most {SMEM_BYTES} fit")
    return min(num_stages, fit)


def stacked_matmul(x, w, layer, **kw):
    """x [M, K] @ w[layer] ([L, K, N]) -> [M, N] (x's dtype; float32 accumulation). x is rounded to
    w's dtype first (the dot takes one dtype): a float32 x times bf16 w has bf16 products.

    layer: an integer scalar; a concrete one must be in [0, L), a traced one is read as
    lax.dynamic_index_in_dim would (negative from the end, then clamped), never past the stack.
    splits: K-ranges per output block (default: enough programs, N / block_n x splits, for
    about 256 in flight, at most K / block_k).
    Keywords: block_n=64, block_k=64, splits=None, num_warps=4, num_stages=4, interpret=False.
    """
    if jnp.ndim(w) == 3:  # (outside the jit: a concrete layer is checked, not clamped)
        check_layer(layer, jnp.shape(w)[0])
    return _stacked_matmul(x, w, layer, **kw)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps", "num_stages", "interpret"))
def _stacked_matmul(x, w, layer, *, block_n: int = 64, block_k: int = 64, splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 4, interpret: bool = False):
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [L, K, N] with the same K; got x {x.shape}, w {w.shape}")
    m, k = x.shape
    n_layers, _, n = w.shape
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if not _pow2(v) or v < 16:
            raise ValueError(f"{name}={v} must be a power of two >= 16")
    if n % block_n or k % block_k:
        raise ValueError(f"N={n} must be a multiple of block_n={block_n} and K={k} of block_k={block_k}")
    blocks = k // block_k
    if splits is None:
        splits = max(1, min(blocks, 256 // (n // block_n)))
    if not 1 <= splits <= blocks:
        raise ValueError(f"splits={splits} must be in [1, K / block_k = {blocks}]")
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)  # no empty split
    mp = max(16, 1 << (m - 1).bit_length())
    if mp > MAX_ROWS:
        raise ValueError(f"stacked_matmul: x has M={m} rows ({mp} padded); at most {MAX_ROWS} (a decode step's "
                         "batch): use x @ w[layer] (kivi_jax.matmul.layer_matmul does above its ROWS)")
    num_stages = pipeline_stages(mp, block_k, block_n, jnp.dtype(w.dtype).itemsize, num_stages)
    xp = jnp.pad(x.astype(w.dtype), ((0, mp - m), (0, 0)))
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, block_k=block_k, block_n=block_n, blocks=blocks, per_split=per_split,
                               precision=precision)
    partials = pl.pallas_call(
        kernel, grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), pl.BlockSpec((mp, k), lambda i, j: (0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, mp, block_n), lambda i, j: (j, 0, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        interpret=interpret, name="stacked_matmul", **triton_params(interpret, num_warps, num_stages),
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), xp, w)
    return jnp.sum(partials, axis=0)[:m].astype(x.dtype)
