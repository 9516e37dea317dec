"""StackedCache: one KV cache per decoder layer, stored as a single cache with a leading layer axis.

The model scans its layers with ``lax.scan`` and carries the stacked cache through the scan
(not as scanned inputs/outputs: those would make XLA write every layer's whole buffer into a
fresh output each step). Layer ``l`` reads ``layer(l)``, an ordinary per-layer
``DenseCache`` / ``KIVICache`` view, and writes through ``append_layer`` (only the slabs the
new token changes, in place) or ``prefill_layer``. The wrapper never looks at the format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kivi_jax import cache_common as cc
from kivi_jax.checks import concrete_int


@dataclasses.dataclass(frozen=True)
class StackedCache:
    """layers: a DenseCache / KIVICache whose leaves all have a leading [L] (layer) axis,
    e.g. DenseCache.k [L, B, Hkv, max_length, D]."""

    layers: Any

    @classmethod
    def stack(cls, one_layer, num_layers: int) -> "StackedCache":
        """``num_layers`` copies of a freshly initialized per-layer cache."""
        if concrete_int("num_layers", num_layers, "an integer >= 1") < 1:
            raise ValueError(f"num_layers={num_layers} must be an integer >= 1")
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
        """Bytes of every layer's buffers (of an abstract cache too: jax.eval_shape's leaves)."""
        return cc.leaf_bytes(self.layers)

    def _check_layer(self, i) -> None:
        """A concrete layer index must be in [0, L): indexing clamped one past the end onto the last
        layer (and -L - 1 onto the first), and the writes' dynamic_update_slice and scatters clamp
        too, so append_layer(L, ...) wrote layer L - 1. A traced index is the caller's (the model's
        layer loop)."""
        if isinstance(i, jax.core.Tracer):
            return
        n = self.num_layers
        if not 0 <= concrete_int("i", i, f"a layer index in [0, {n})") < n:
            raise ValueError(f"i={i!r} must be a layer index in [0, {n})")

    def layer(self, i):
        """The per-layer cache of layer ``i`` (int in [0, L) or traced scalar): a DenseCache /
        KIVICache without the layer axis."""
        self._check_layer(i)
        return jax.tree.map(lambda x: x[i], self.layers)

    def set_layer(self, i, one_layer) -> "StackedCache":
        """Layer ``i`` replaced by the per-layer cache ``one_layer`` (whole buffers written)."""
        self._check_layer(i)
        return StackedCache(jax.tree.map(lambda s, x: lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), i, 0),
                                         self.layers, one_layer))

    def append_layer(self, i, k, v, rare=None, active=None) -> "StackedCache":
        """``layer(i).append(k, v, active)`` stored back as layer ``i``, writing only the slabs the
        token changes (the format's ``append_writes``) into the stacked buffers, in place. rare:
        ``cache_common.apply_writes``'s (None: a conditional per rare write; True / False: the
        value :meth:`rare_writes_due` had before this step's appends). active [B] bool (None:
        every row): the rows that append; the others are left as they are."""
        one = self.layer(i)
        kw = {} if active is None else {"active": active}
        if not hasattr(one, "append_writes"):  # a format without row writes: whole-layer write
            return self.set_layer(i, one.append(k, v, **kw))
        if hasattr(one, "stacked_append"):  # a format that may write its appends its own way
            return StackedCache(one.stacked_append(self.layers, i, k, v, rare=rare, **kw))
        return StackedCache(cc.apply_writes(self.layers, *one.append_writes(k, v, **kw), layer=i, rare=rare))

    def extend_layer(self, i, k, v, lengths=None) -> "StackedCache":
        """``layer(i).extend(k, v, lengths)`` stored back as layer ``i``: k, v [B, Hkv, T, D], row b
        appending its first lengths[b] tokens (None: all T), in place through the format's
        ``extend_writes``. A format without it gets the tokens as appends, one at a time."""
        one = self.layer(i)
        if hasattr(one, "extend_writes"):
            return StackedCache(cc.apply_writes(self.layers, *one.extend_writes(k, v, lengths), layer=i))
        return self.append_each(i, k, v, lengths)

    @property
    def extends_all(self) -> bool:
        """Whether :meth:`extend_all` takes this cache's format (it has ``extend``)."""
        return hasattr(self.layers, "extend")

    def extend_all(self, ks, vs, lengths=None) -> "StackedCache":
        """Every layer's ``extend``: ks, vs [L, B, Hkv, T, D], layer l appending ks[l], vs[l] (row b
        its first lengths[b] tokens), all layers in one computation (jax.vmap over the layer axis)."""
        n = self.num_layers
        for name, x in (("ks", ks), ("vs", vs)):
            if jnp.ndim(x) != 5 or jnp.shape(x)[0] != n:
                raise ValueError(f"{name} has shape {jnp.shape(x)}; expected [L={n}, B, Hkv, T, D]: one slab per layer")
        extend = lambda one, k, v: one.extend(k, v, lengths)  # noqa: E731
        return StackedCache(jax.vmap(extend)(self.layers, ks, vs))

    def append_each(self, i, k, v, lengths=None) -> "StackedCache":
        """What :meth:`extend_layer` does, as one ``append_layer`` a token (a loop of max(lengths)
        steps, row b active for its first lengths[b]): for formats without ``extend_writes``, and
        the baseline benchmarks/continuation.py times the extend against."""
        lengths = jnp.full((self.batch_size,), k.shape[2], jnp.int32) if lengths is None else lengths

        def put(j, cache):
            kj, vj = (lax.dynamic_slice_in_dim(a, j, 1, axis=2) for a in (k, v))
            return cache.append_layer(i, kj, vj, active=j < lengths)

        return lax.fori_loop(0, jnp.max(lengths), put, self)

    def rare_writes_due(self, active=None):
        """A bool scalar: whether the next token's appends make rare writes (KIVI's key flush)
        in any row, or None for a format that never does. Every layer appends each token, so
        their lengths move together and layer 0 answers for all: a model step decides once
        (conditionals around its layer loop, ``Llama.__call__``) instead of one in every layer. Under
        ``jax.vmap``: whether any request of the batch does (``cache_common.any_in_batch``)."""
        one = self.layer(0)
        if not hasattr(one, "append_writes"):
            return None
        token = jnp.zeros((one.batch_size, one.num_kv_heads, 1, one.head_dim), one.dtype)  # (only the predicates are used)
        kw = {} if active is None else {"active": active}  # (rows that do not append make no rare write)
        preds = [w.pred for w in one.append_writes(token, token, **kw)[0] if isinstance(w, cc.WritesIf)]
        return cc.any_in_batch(jnp.any(jnp.stack(preds))) if preds else None

    def write_rows(self, start, rows: "StackedCache") -> "StackedCache":
        """Batch rows start .. start + rows.batch_size replaced by ``rows`` (a StackedCache of
        the same format, layers and capacity), in place: how a prefill done a few rows at a
        time fills the whole batch's cache. start: int or traced scalar; a concrete one must be in
        [0, B - rows.batch_size] (dynamic_update_slice would clamp it silently, overwriting rows
        that were meant to stay); a traced one is the caller's to keep in range."""
        if jax.tree_util.tree_structure(rows.layers) != jax.tree_util.tree_structure(self.layers):
            raise ValueError("rows must be a StackedCache of the same format and settings (cache type, KIVIConfig, "
                             "max_length) as this one")
        for s, x in zip(jax.tree_util.tree_leaves(self.layers), jax.tree_util.tree_leaves(rows.layers)):
            if s.shape[:1] + s.shape[2:] != x.shape[:1] + x.shape[2:] or x.shape[1] > s.shape[1]:
                raise ValueError(f"rows holds a buffer of shape {x.shape}; this cache's is {s.shape} "
                                 f"(same layers and per-row shape, at most {s.shape[1]} rows)")
            if s.dtype != x.dtype:  # (a cast would round a float32 cache's scales into bf16 silently)
                raise ValueError(f"rows holds a {x.dtype} buffer where this cache's is {s.dtype} (same dtype)")
        if not isinstance(start, jax.core.Tracer):
            last = self.batch_size - rows.batch_size
            where = f"in [0, {last}]: {rows.batch_size} rows written into a batch of {self.batch_size}"
            if not 0 <= concrete_int("start", start, "an integer " + where) <= last:
                raise ValueError(f"start={int(start)} must be {where}")
        return StackedCache(jax.tree.map(lambda s, x: lax.dynamic_update_slice_in_dim(s, x.astype(s.dtype), start, 1),
                                         self.layers, rows.layers))

    def prefill_layer(self, i, k, v, lengths=None) -> "StackedCache":
        """``layer(i).prefill(k, v, lengths)`` stored back as layer ``i``."""
        return self.set_layer(i, self.layer(i).prefill(k, v, lengths))


jax.tree_util.register_dataclass(StackedCache, data_fields=["layers"], meta_fields=[])
