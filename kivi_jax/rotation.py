"""A fixed orthonormal Hadamard rotation of the head dimension (``KIVIConfig.rotate``).

H = Sylvester's Hadamard matrix of order D (D a power of two) divided by sqrt(D): symmetric
and orthonormal, so H^T = H and H H^T = I. Quantizing K·H (or V·H) instead of K spreads an
outlier channel over all channels, so min/max groups see flatter numbers; attention is
unchanged because (q·H)·(K·H)^T = q·K^T and (p·(V·H))·H^T = p·V.

The cache rotates each token once, when it is stored; attention rotates the one query
vector before the scores and the one output vector after p·V (kivi_jax.attention,
kivi_jax.attention_pallas), so no dequantized tensor is ever rotated in full.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import switches

ROTATE_CHOICES = ("none", "k", "v", "kv")
#: how :func:`rotate` multiplies, read at trace time. "f32": a float32 einsum with H at HIGHEST
#: precision (exact float32 products; on a GPU a float32 GEMM without tensor cores).
#: "bf16x6" / "bf16x3": x times the +-1 Sylvester matrix S (exact in bf16) with XLA's bf16
#: tensor-core algorithms (x split into 3 / 2 bf16 parts), then the 1/sqrt(D): float32 inputs
#: to ~2^-24 / ~2^-16 of |x|; a bf16 input takes one exact pass. In the 32-layer paper step on
#: the H200 the rotations cost 0.86-0.93 ms with "f32", 0.46-0.49 with "bf16x6" (run107).
#: ("butterfly", a fast Walsh-Hadamard transform in elementwise stages, was timed slower on the
#: H200: XLA split its stages over ~40 more fusions a layer; results/decode-step-ab-rotimpl-run105.)
#: None: the backend's pick (:func:`rotate_impl`); children read KIVI_ROTATE.
ROTATE_IMPLS = ("f32", "bf16x6", "bf16x3")
_ALGORITHMS = {"bf16x6": "BF16_BF16_F32_X6", "bf16x3": "BF16_BF16_F32_X3"}
ROTATE_IMPL = os.environ.get("KIVI_ROTATE") or None


def is_power_of_two(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 1 and not (d & (d - 1))


def check_head_dim(head_dim: int, rotate: str = "kv") -> None:
    if rotate != "none" and not is_power_of_two(head_dim):
        raise ValueError(f"rotate={rotate!r} needs head_dim a power of two (Hadamard matrix); got head_dim={head_dim}")


@functools.lru_cache(maxsize=None)
def signs_numpy(d: int) -> np.ndarray:
    """[D, D] float64 +-1: Sylvester's construction S_{2n} = [[S, S], [S, -S]] (S = sqrt(D) H)."""
    check_head_dim(d)
    s = np.ones((1, 1))
    while s.shape[0] < d:
        s = np.block([[s, s], [s, -s]])
    s.setflags(write=False)  # (cached and shared: a caller's in-place edit changed every later rotation)
    return s


@functools.lru_cache(maxsize=None)
def hadamard_numpy(d: int) -> np.ndarray:
    """[D, D] float64: the orthonormal H = S / sqrt(D) (:func:`signs_numpy`); read-only (cached)."""
    h = signs_numpy(d) / np.sqrt(d)
    h.setflags(write=False)
    return h


def hadamard(d: int, dtype=jnp.float32) -> jax.Array:
    """The orthonormal Hadamard matrix of order d as a jax constant."""
    return jnp.asarray(hadamard_numpy(d), dtype)


def rotate_impl() -> str:
    """ROTATE_IMPL resolved for this backend (named error when it is not one of ROTATE_IMPLS)."""
    return switches.resolve("rotation.ROTATE_IMPL", ROTATE_IMPL, ROTATE_IMPLS, gpu="bf16x6", other="f32")


def rotate(x, transpose: bool = False) -> jax.Array:
    """x [..., D] -> x·H (or x·H^T, which is the same: H is symmetric; the flag is kept so callers
    say which they mean) in float32, by :data:`ROTATE_IMPL`'s arithmetic (one trace uses one:
    they may differ in the last bits)."""
    del transpose  # H^T = H
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"x must be [..., D] (D the head_dim); got a scalar of dtype {x.dtype}")
    bf16 = x.dtype == jnp.bfloat16
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    # (head dims below 16, toy models only, keep the einsum: XLA lowers such tiny dots with its
    # elemental emitter, which has no bf16 algorithms: "Algorithm not supported", CPU, d = 1)
    if rotate_impl() == "f32" or d < 16:
        return jnp.einsum("...d,de->...e", x, hadamard(d), precision=jax.lax.Precision.HIGHEST)
    check_head_dim(d)
    # a bf16 x is one bf16 part: its products with +-1 are exact in one tensor-core pass
    algorithm = "BF16_BF16_F32" if bf16 else _ALGORITHMS[rotate_impl()]
    s = jnp.asarray(signs_numpy(d), jnp.float32)
    # x·S reaches D·|x| where x·H is only sqrt(D)·|x|: scaled by 2^-e (exact; 2^e ~ sqrt(D)) first, it
    # does not overflow where the result fits (|x| > 2.6e36 at D = 128 gave inf where "f32" did not);
    # 2^e · fl(1/sqrt(D)) is exact too, so the numbers are the same bits as x·S·fl(1/sqrt(D))
    e = (d.bit_length() - 1 + 1) // 2
    y = jnp.einsum("...d,de->...e", x * np.float32(2.0 ** -e), s,
                   precision=getattr(jax.lax.DotAlgorithmPreset, algorithm))
    return y * (np.float32(2.0 ** e) * np.float32(1 / np.sqrt(d)))
