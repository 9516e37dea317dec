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

import jax
import jax.numpy as jnp
import numpy as np

ROTATE_CHOICES = ("none", "k", "v", "kv")


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


def rotate(x, transpose: bool = False) -> jax.Array:
    """x [..., D] -> x·H (or x·H^T; the same matrix, kept for clarity) in float32, exact float32 math."""
    h = hadamard(x.shape[-1])
    if transpose:
        h = h.T
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
