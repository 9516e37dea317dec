"""DenseCache: full-precision K/V with per-row lengths, the baseline KIVI is compared to."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kivi_jax import cache_common as cc
from kivi_jax.eager import jit_when_eager


@cc.pytree_dataclass
class DenseCache(cc.CacheShape):
    """k, v: [B, Hkv, max_length, D]; lengths [B] int32 tokens held per row;
    overflow [B] bool, set when a write was refused (row full) or an input was out of range."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    max_length: int = cc.static()

    @classmethod
    def init(cls, *, batch: int, num_kv_heads: int, head_dim: int, max_length: int, dtype=jnp.bfloat16):
        cc.check_sizes(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, max_length=max_length)
        dtype = cc.check_float("cache", dtype)
        shape = (batch, num_kv_heads, max_length, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            overflow=jnp.zeros((batch,), bool),
            max_length=max_length,
        )

    capacity = property(lambda self: self.k.shape[2])  # tokens the buffers hold
    prefix_unit = 1  # prefix(tokens) takes any count

    def prefix(self, tokens: int) -> "DenseCache":
        """A view for reading (materialize, attention) of positions [0, tokens): the same numbers
        there for rows holding at most that many. Not for writing: its max_length is the full one."""
        tokens = cc.check_prefix(self, tokens)
        return dataclasses.replace(self, k=self.k[:, :, :tokens], v=self.v[:, :, :tokens])

    def _check(self, k, v, tokens=None):
        cc.check_writable(self, self.max_length)  # (every write checks its inputs here first)
        return cc.check_kv("k", k, "v", v, batch=self.batch_size, heads=self.num_kv_heads,
                           head_dim=self.head_dim, tokens=tokens)

    @jit_when_eager(validate=cc.check_prefill)
    def prefill(self, k, v, lengths=None) -> "DenseCache":
        """Stores a (padded) prompt k, v [B, Hkv, T, D]; row b keeps its first lengths[b] tokens."""
        t = self._check(k, v)
        lengths, invalid = cc.prompt_lengths(lengths, self.batch_size, t, self.max_length)
        keep = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, :, None]
        k_new = self.k.at[:, :, :t].set(cc.row_major(jnp.where(keep, k, 0).astype(self.dtype)))
        v_new = self.v.at[:, :, :t].set(cc.row_major(jnp.where(keep, v, 0).astype(self.dtype)))
        return DenseCache(k_new, v_new, lengths, invalid, self.max_length)

    @jit_when_eager
    def append(self, k, v, active=None) -> "DenseCache":
        """Appends one token k, v [B, Hkv, 1, D] per row; a full row is left as is and flagged.
        active [B] bool (None: all): only these rows append; the others are left as they are."""
        return cc.apply_writes(self, *self.append_writes(k, v, active))

    def append_writes(self, k, v, active=None):
        """What :meth:`append` changes, as (writes, lengths, overflow) for ``cc.apply_writes``:
        the [B, Hkv, 1, D] token slab of k and of v (a row that does not write keeps its slot)."""
        self._check(k, v, tokens=1)
        L = cc.write_lengths(self, active)
        live = L < self.max_length
        at = jnp.minimum(L, self.max_length - 1)
        writes = (cc.RowWrite(k.astype(self.dtype), at, "k", 1, keep=live),
                  cc.RowWrite(v.astype(self.dtype), at, "v", 1, keep=live))
        return (writes, *cc.appended(self, live, active))

    @jit_when_eager(validate=cc.check_extend)
    def extend(self, k, v, lengths=None) -> "DenseCache":
        """Appends k, v [B, Hkv, T, D]: row b its first lengths[b] tokens (None: all T), as that
        many :meth:`append` calls would (a row that fills up takes what fits, flagged)."""
        return cc.apply_writes(self, *self.extend_writes(k, v, lengths))

    def extend_writes(self, k, v, lengths=None):
        """What :meth:`extend` changes, as (writes, lengths, overflow): token j of row b at
        position lengths[b] + j, for the tokens it takes."""
        t = self._check(k, v)
        written, overflow = cc.extended(self, lengths, t)
        j = jnp.arange(t)[None, :]
        rows = jnp.where(j < written[:, None], self.lengths[:, None] + j, -1)
        writes = (cc.RowsWrite(k.astype(self.dtype), rows, "k"), cc.RowsWrite(v.astype(self.dtype), rows, "v"))
        return writes, self.lengths + written, overflow

    def materialize(self):
        """(K, V) [B, Hkv, max_length, D] in the cache dtype; positions >= lengths are junk/zero."""
        return self.k, self.v
