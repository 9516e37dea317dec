"""KIVIConfig: the paper's knobs (k_bits, v_bits, group_size, residual_length), checked eagerly."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kivi_jax import packing


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
    """Settings of a KIVI cache. Defaults are the paper's KIVI-2: 2 bits, G=32, R=128.

    k_bits / v_bits: bits per key / value code, in {1, 2, 4, 8}.
    group_size: G, numbers sharing one scale and min (keys: G tokens of one channel;
      values: G channels of one token). A power of two >= 16: the packed layout hands the
      kernel 16 tokens at a time, and a key group must hold whole 16-token slots.
    residual_length: R, newest tokens kept in full precision; a multiple of group_size.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self):
        packing.check_bits("k_bits", self.k_bits)
        packing.check_bits("v_bits", self.v_bits)
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g & (g - 1):
            raise ValueError(f"group_size={g!r} must be a power of two >= 16")
        r = self.residual_length
        if not isinstance(r, int) or r < g or r % g:
            raise ValueError(f"residual_length={r!r} must be a positive multiple of group_size={g}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide head_dim={head_dim}")

    def capacity(self, max_length: int) -> int:
        """Token capacity of the quantized stores: max_length rounded up to whole packed blocks."""
        unit = max(packing.block_len(self.k_bits), packing.block_len(self.v_bits), self.group_size)
        return -(-max_length // unit) * unit

    def bytes_per_token(self, *, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> float:
        """Analytic bytes one more token costs in the quantized stores (codes + scales + mins).

        The fixed full-precision residual (2 R tokens of K and V per head) is
        :meth:`residual_bytes`; a cache of n tokens holds about
        ``n * bytes_per_token + residual_bytes``.
        """
        self.check_head_dim(head_dim)
        sb = jnp.dtype(dtype).itemsize
        per_head = head_dim * (self.k_bits + self.v_bits) / 8 + 2 * 2 * sb * head_dim / self.group_size
        return per_head * num_kv_heads * num_layers

    def residual_bytes(self, *, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> int:
        sb = jnp.dtype(dtype).itemsize
        return 2 * self.residual_length * head_dim * sb * num_kv_heads * num_layers


def dense_bytes_per_token(*, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> int:
    """Bytes per token of a full-precision K/V cache."""
    return 2 * head_dim * jnp.dtype(dtype).itemsize * num_kv_heads * num_layers
