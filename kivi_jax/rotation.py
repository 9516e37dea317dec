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
#: how :func:`rotate` multiplies, read at trace time: "matmul" (one float32 einsum with H at
#: HIGHEST precision: a GEMM launch of its own on a GPU) or "butterfly" (the fast Walsh-Hadamard
#: transform: log2 D add/subtract stages, elementwise, so XLA fuses it with its neighbours).
#: None: the backend's pick (:func:`rotate_impl`); children read KIVI_ROTATE.
ROTATE_IMPLS = ("matmul", "butterfly")
ROTATE_IMPL = os.environ.get("KIVI_ROTATE") or None


def is_power_of_two(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 1 and not (d & (d - 1))


def check_head_dim(head_dim: int, rotate: str = "kv") -> None:
    if rotate != "none" and not is_power_of_two(head_dim):
        raise ValueError(f"rotate={rotate!r} needs head_dim a power of two (Hadamard matrix); got head_dim={head_dim}")


@functools.lru_cache(maxsize=None)
def hadamard_numpy(d: int) -> np.ndarray:
    """[D, D] float64: Sylvester's construction H_{2n} = [[H, H], [H, -H]], divided by sqrt(D)."""
    check_head_dim(d)
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def hadamard(d: int, dtype=jnp.float32) -> jax.Array:
    """The orthonormal Hadamard matrix of order d as a jax constant."""
    return jnp.asarray(hadamard_numpy(d), dtype)


def rotate_impl() -> str:
    """ROTATE_IMPL resolved for this backend (named error when it is not one of ROTATE_IMPLS).
    On the CPU the einsum compiles and runs cheaper than the stages."""
    return switches.resolve("rotation.ROTATE_IMPL", ROTATE_IMPL, ROTATE_IMPLS, gpu="butterfly", other="matmul")


def rotate(x, transpose: bool = False) -> jax.Array:
    """x [..., D] -> x·H (or x·H^T: H is symmetric, kept for clarity) in float32.

    Both implementations (:data:`ROTATE_IMPL`) are float32 math to a few roundings of the
    exact product; they may differ in the last bits, so one trace uses one of them throughout."""
    x = jnp.asarray(x).astype(jnp.float32)
    if rotate_impl() == "butterfly":
        return butterfly(x)
    h = hadamard(x.shape[-1])
    if transpose:
        h = h.T
    return jnp.einsum("...d,de->...e", x, h, precision=jax.lax.Precision.HIGHEST)


def butterfly(x) -> jax.Array:
    """x [..., D] float32 -> x·H by the fast Walsh-Hadamard transform: stage s pairs entries
    i and i + 2^s of each block of 2^(s+1) into (a + b, a - b), which is Sylvester's recursion
    H_2n = [[H_n, H_n], [H_n, -H_n]] applied from the inside out; then one scale by 1/sqrt(D).
    D log2 D additions instead of D^2 products, and only elementwise ops and reshapes."""
    d = x.shape[-1]
    check_head_dim(d)
    lead, h = x.shape[:-1], 1
    while h < d:
        y = x.reshape(lead + (d // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (d,))
        h *= 2
    return x * np.float32(1 / np.sqrt(d))
