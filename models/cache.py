"""StackedCache: one KV cache per decoder layer, stored as a single cache with a leading layer axis.

The model scans its layers with ``lax.scan``; a scan slices its inputs along axis 0, so a
``DenseCache`` or ``KIVICache`` whose every leaf carries a leading ``[L]`` axis hands each
layer an ordinary per-layer cache. The wrapper only adds what callers need at model level
(``lengths``, ``overflow``) and never looks at the cache format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StackedCache:
    """layers: a DenseCache / KIVICache whose leaves all have a leading [L] (layer) axis,
    e.g. DenseCache.k [L, B, Hkv, max_length, D]."""

    layers: Any

    @classmethod
    def stack(cls, one_layer, num_layers: int) -> "StackedCache":
        """``num_layers`` copies of a freshly initialized per-layer cache."""
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        return cls(jax.tree.map(lambda x: jnp.broadcast_to(x, (num_layers,) + x.shape), one_layer))

    @property
    def num_layers(self) -> int:
        return jax.tree_util.tree_leaves(self.layers)[0].shape[0]

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: tokens held per row (every layer holds the same number)."""
        return self.layers.lengths[0]

    @property
    def overflow(self) -> jax.Array:
        """[B] bool: some layer refused a write (row full) or got an invalid input."""
        return jnp.any(self.layers.overflow, axis=0)

    @property
    def max_length(self) -> int:
        return self.layers.max_length

    @property
    def batch_size(self) -> int:
        return self.layers.lengths.shape[1]

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self.layers)))

    def layer(self, i: int):
        """The per-layer cache of layer ``i`` (a DenseCache / KIVICache without the layer axis)."""
        return jax.tree.map(lambda x: x[i], self.layers)


jax.tree_util.register_dataclass(StackedCache, data_fields=["layers"], meta_fields=[])
