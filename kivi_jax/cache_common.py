"""Pieces shared by the cache formats: argument checks, per-row lengths, row-wise writes."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from kivi_jax import derivatives
from kivi_jax.checks import check_float, concrete_int, is_int
from pallas_kernels import row_writes


def pytree_dataclass(cls):
    """Frozen dataclass registered as a pytree; fields with metadata static=True are aux data."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        (meta if f.metadata.get("static") else data).append(f.name)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


class SinksAndWindow:
    """A KIVI cache's token counts (``lengths`` [B]; config's residual_length R and sink_tokens
    S; the ring ``k_res`` / ``v_res`` [B, Hkv, R + S, D] with the sinks past R). Mixed into
    KIVICache and MosaicKIVICache, which keep tokens the same way."""

    @property
    def body_lengths(self):
        """Lb [B] = max(L - S, 0): tokens after the sinks (what the quantized stores and ring index)."""
        s = self.config.sink_tokens
        return self.lengths if s == 0 else jnp.maximum(self.lengths - s, 0)

    @property
    def num_quantized_keys(self):
        """n [B]: keys [0, n) are sinks or quantized, keys [n, L) in the residual.
        n = S + Lb - Lb % R (plain KIVI: L - L % R); n = L for a row shorter than S."""
        return self._body_quantized_keys() + jnp.minimum(self.lengths, self.config.sink_tokens)

    @property
    def num_quantized_values(self):
        """m [B]: values [0, m) are sinks or quantized, values [m, L) in the window.
        m = S + max(Lb - R, 0) (plain KIVI: max(L - R, 0)); m = L for a row shorter than S."""
        return self._body_quantized_values() + jnp.minimum(self.lengths, self.config.sink_tokens)

    # body-relative counts: store positions [0, n_b) of the keys / [0, m_b) of the values are quantized
    def _body_quantized_keys(self):
        lb = self.body_lengths
        return lb - lb % self.config.residual_length

    def _body_quantized_values(self):
        return jnp.maximum(self.body_lengths - self.config.residual_length, 0)

    def sinks(self):
        """(k_sink, v_sink) [B, Hkv, S, D] in the stored basis; slots >= lengths hold zeros."""
        r = self.config.residual_length
        return self.k_res[:, :, r:], self.v_res[:, :, r:]


def leaf_bytes(tree) -> int:
    """Bytes of a pytree's arrays, from shapes and dtypes (jax.ShapeDtypeStruct leaves have no nbytes)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


class CacheShape:
    """Shape facts of a cache whose field ``shape_field`` is a [B, Hkv, T, D] buffer, and the
    bytes of every buffer it holds. Mixed into the cache dataclasses."""

    shape_field = "k"

    batch_size = property(lambda self: getattr(self, self.shape_field).shape[0])
    num_kv_heads = property(lambda self: getattr(self, self.shape_field).shape[1])
    head_dim = property(lambda self: getattr(self, self.shape_field).shape[3])
    dtype = property(lambda self: getattr(self, self.shape_field).dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (also of an abstract one, ``jax.eval_shape(init)``:
        what it will take before it is allocated)."""
        return leaf_bytes(self)


def static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def check_sizes(**sizes) -> None:
    """A cache's ``init`` sizes (batch, num_kv_heads, head_dim, max_length): each an integer >= 1,
    checked before any buffer is shaped from them (a negative batch reached jnp.zeros as a
    TypeError about broadcast_in_dim; head_dim=0 passed the group check and made empty buffers)."""
    for name, n in sizes.items():
        if not is_int(n) or n < 1:
            raise ValueError(f"{name}={n!r} must be an integer >= 1")


def check_prefix(cache, tokens) -> int:
    """``cache.prefix(tokens)``'s argument as an int: a concrete positive multiple of the format's
    ``prefix_unit``, at most its ``capacity`` (it sets array shapes: a traced count cannot; a bool
    was taken as 1 token and a float failed inside a slice)."""
    unit, cap = cache.prefix_unit, cache.capacity
    allowed = (f"a static integer in [1, {cap}] (the capacity)" if unit == 1 else
               f"a static integer, a positive multiple of {unit} body tokens, at most the capacity {cap}")
    n = concrete_int("tokens", tokens, allowed)
    if n % unit or not 0 < n <= cap:
        raise ValueError(f"tokens={n}: a prefix is {allowed}")
    return n


def check_writable(cache, full: int) -> None:
    """A cache about to be written holds stores of its whole capacity ``full``: a prefix view
    (``cache.prefix``, shorter stores under the same max_length) is for reading only; writes into
    one would land past its stores (dynamic_update_slice clamps them onto the last slots, the
    scatters drop them) while its lengths counted them."""
    if cache.capacity != full:
        raise ValueError(f"this {type(cache).__name__} is a prefix view ({cache.capacity} of the {full} tokens its "
                         f"max_length={cache.max_length} needs; cache.prefix): views are for reading; write to "
                         "the cache it was taken from")


def check_init(config, config_cls, max_length: int, dtype):
    """A quantized cache's ``init`` arguments: the config's type, max_length >= 1 (and above its
    sink tokens), a float dtype."""
    if not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}; got {type(config).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    sinks = getattr(config, "sink_tokens", 0)
    if sinks >= max_length:
        raise ValueError(f"sink_tokens={sinks} must be < max_length={max_length}")
    check_float("cache", dtype)


def check_kv(name_k: str, k, name_v: str, v, *, batch: int, heads: int, head_dim: int, tokens: int | None = None):
    """Shape and dtype checks at trace time for k, v [B, Hkv, T, D] (floats: an integer array
    would be cast into the cache silently); returns T."""
    for name, a in ((name_k, k), (name_v, v)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array (float32, bfloat16, float16); got {a.dtype}")
        if a.ndim != 4:
            raise ValueError(f"{name} must be [B, Hkv, T, D]; got shape {a.shape}")
        b, h, t, d = a.shape
        if (b, h, d) != (batch, heads, head_dim):
            raise ValueError(
                f"{name} has shape {a.shape}; the cache holds B={batch}, Hkv={heads}, D={head_dim}"
            )
        if tokens is not None and t != tokens:
            raise ValueError(f"{name} has {t} tokens; expected {tokens}")
    if k.shape != v.shape:
        raise ValueError(f"{name_k} shape {k.shape} differs from {name_v} shape {v.shape}")
    return k.shape[2]


def check_lengths_range(lengths, tokens: int) -> None:
    """Concrete per-row lengths each in [0, T]; traced ones are the caller's (it flags or masks them)."""
    if not isinstance(lengths, jax.core.Tracer):
        bad = [int(x) for x in jax.device_get(lengths) if not 0 <= int(x) <= tokens]
        if bad:
            raise ValueError(f"lengths={bad} out of range: each must be in [0, T={tokens}]")


def prompt_lengths(lengths, batch: int, tokens: int, max_length: int):
    """Validated per-row prompt lengths [B] int32 and a per-row 'invalid' flag.

    Static misuse raises; traced values outside [0, T] are clamped *and flagged* so the
    caller's overflow flag reports them (nothing is written out of bounds).
    """
    if tokens > max_length:
        raise ValueError(f"prompt of {tokens} tokens does not fit max_length={max_length}")
    if lengths is None:
        return jnp.full((batch,), tokens, jnp.int32), jnp.zeros((batch,), bool)
    if not isinstance(lengths, jax.core.Tracer):  # checked on the host before int32: 2**32 + 5 wrapped to 5
        lengths = np.asarray(jax.device_get(lengths))
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({batch},); got {lengths.shape} {lengths.dtype}")
    check_lengths_range(lengths, tokens)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    invalid = (lengths < 0) | (lengths > tokens)
    return jnp.clip(lengths, 0, tokens), invalid


def check_prefill(cache, k, v, lengths=None):
    """A cache's prefill arguments, checked where they are concrete (eager.jit_when_eager's
    validate: the jitted prefill sees lengths traced, which it would only flag)."""
    t = check_kv("k", k, "v", v, batch=cache.batch_size, heads=cache.num_kv_heads, head_dim=cache.head_dim)
    prompt_lengths(lengths, cache.batch_size, t, cache.max_length)


def check_extend(cache, k, v, lengths=None):
    """A cache's extend arguments, checked where they are concrete (as :func:`check_prefill`)."""
    t = check_kv("k", k, "v", v, batch=cache.batch_size, heads=cache.num_kv_heads, head_dim=cache.head_dim)
    prompt_lengths(lengths, cache.batch_size, t, t)


def write_lengths(cache, active):
    """The row lengths an append's writes see: ``cache.lengths``, with a row that is not
    ``active`` shown full (max_length), so it writes nothing, exactly as a full row; its length
    and overflow flag then stay as they were (:func:`appended`). active: None (every row
    appends) or [B] bool. Both append kernels take these lengths as they are."""
    if active is None:
        return cache.lengths
    active = jnp.asarray(active)
    if active.shape != (cache.batch_size,) or active.dtype != jnp.bool_:
        raise ValueError(f"active must be None or a bool array of shape ({cache.batch_size},) (the rows that "
                         f"append); got {active.dtype} array of shape {active.shape}")
    return jnp.where(active, cache.lengths, cache.max_length)


def appended(cache, live, active):
    """(lengths, overflow) [B] after an append in which the rows ``live`` wrote their token: an
    active row that could not was full (its write refused and flagged)."""
    refused = ~live if active is None else ~live & active
    return cache.lengths + live, cache.overflow | refused


def extended(cache, lengths, tokens: int):
    """An extend's per-row token counts: (written [B], overflow [B]). lengths [B] integers in
    [0, T] (None: T every row), the input tokens each row appends in order; a row takes what
    fits below max_length (``written``) and is flagged in ``overflow`` when that is fewer, as
    that many appends would leave it. Concrete counts out of range raise; traced ones are
    clamped and flagged."""
    counts, invalid = prompt_lengths(lengths, cache.batch_size, tokens, tokens)
    written = jnp.minimum(counts, jnp.maximum(cache.max_length - cache.lengths, 0))
    return written, cache.overflow | invalid | (written < counts)


def put_row(buf, x, index, axis, layer=None, add=False, keep=None):
    """Per batch row b: buf[b] with x[b] written at index[b] along ``axis`` (of the row).

    buf [B, ...], x [B, ...] (same rank, smaller along axis), index [B] int32 in range.
    layer: buf is [L, B, ...] (a stacked cache leaf) and only layer ``layer`` (a scalar,
    traced or not) is written -- an in-place scatter of x's slabs, never a copy of buf.
    add: x[b] is added to the slab instead of replacing it (code bits put into the still-zero
    bits of packed words, without reading the words first).
    keep: None, or [B] bool: rows where it is False leave their slab as it is.
    """
    if layer is None:
        if keep is not None:  # dynamic_update_slice writes every row: the others write back what they hold
            kb = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
            x = jnp.where(kb, x, 0 if add else take_row(buf, index, x.shape[1 + axis], axis))
        # a vmap of dynamic_update_slice: GSPMD partitions it over batch/head shards without
        # gathering (the scatter below, on a single cache, made it all-gather the slabs)
        def one(buf_b, x_b, i):
            x_b = x_b.astype(buf_b.dtype)
            if add:
                x_b = x_b + lax.dynamic_slice_in_dim(buf_b, i, x_b.shape[axis], axis)
            return lax.dynamic_update_slice_in_dim(buf_b, x_b, i, axis)

        return jax.vmap(one)(buf, x, jnp.asarray(index, jnp.int32))
    # stacked leaf: one scatter (batch row b -> slab at index[b]), written directly rather than
    # as a vmap of dynamic_update_slice so that the buffers keep their layout (no relayout copy).
    # The batch axis is a scatter batching dim, so GSPMD sees the rows are independent (an
    # iota index column was not recognised inside a lax.cond: it all-gathered the slabs)
    nb = buf.shape[1]
    if x.ndim != buf.ndim - 1 or x.shape[0] != nb:
        raise ValueError(f"put_row: x {x.shape} does not fit buf {buf.shape} (layer={layer is not None})")
    index = jnp.asarray(index, jnp.int32)
    if keep is not None:  # a row that keeps its slab points its write past the end: dropped, nothing read
        index = jnp.where(keep, index, buf.shape[2 + axis])
    idx = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (nb,)), index], axis=1)  # [B, 2]: (layer, index)
    dnums = lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, x.ndim)),
        inserted_window_dims=(0,),
        scatter_dims_to_operand_dims=(0, 2 + axis),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    scatter = lax.scatter_add if add else lax.scatter
    mode = lax.GatherScatterMode.CLIP if keep is None else lax.GatherScatterMode.FILL_OR_DROP
    return scatter(buf, idx, x.astype(buf.dtype), dnums, indices_are_sorted=True, unique_indices=True, mode=mode)


def row_major(x):
    """x with XLA's default (row-major) memory layout pinned. A prompt's k / v [B, H, T, D] feed
    both cuDNN's attention, which wants them [B, T, H, D] in memory, and a cache buffer. Left
    free, XLA's layout assignment gave the whole stacked dense cache that [.., T, H, D] order
    and transposed it at the prefill's end: 34 GiB more memory at batch 32 x 4352 tokens
    (results/prefill-memory-2026-12-01-run1 vs -run2). Pinning the written operand keeps the
    buffer as it is."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def take_row(buf, index, size, axis):
    """Per batch row b: buf[b][index[b] : index[b] + size] along ``axis`` of the row."""
    return jax.vmap(lambda buf_b, i: lax.dynamic_slice_in_dim(buf_b, i, size, axis))(buf, index)


# ---- appends as row writes ---------------------------------------------------------------------
# A cache's ``append_writes(k, v)`` says what one appended token changes: a few per-row slabs
# (RowWrite, or WritesIf for rare ones) plus the new lengths and overflow. ``apply_writes``
# applies them to the cache itself (that is ``append``) or to one layer of a stacked cache
# (leaves [L, B, ...]): the model's layer scan carries the stacked cache and writes only
# these slabs in place, so a decode step never copies or rewrites a whole cache buffer.
@pytree_dataclass
class RowWrite:
    """Row b of cache field ``field`` gets value[b] at index[b] along ``axis`` of the row
    (add=True: value[b] is added to what the slab holds, see :func:`put_row`); with ``keep``
    [B] bool, only the rows where it holds write (the others keep their slab as it is).

    value [B, ...] (a row's slab: same rank as a row of the field), index [B] int32 in range.
    Writes are computed from the cache before the append and applied in order.
    """

    value: jax.Array
    index: jax.Array
    field: str = static()
    axis: int = static()
    add: bool = static(default=False)
    keep: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class WritesIf:
    """Writes needed only when ``pred`` (a scalar bool) holds, e.g. KIVI's key flush.

    ``make(view)`` returns them (a RowWrite sequence) from ``view``, the per-layer cache as the
    writes before this one left it. apply_writes reads the view, computes and applies them
    inside one lax.cond, so a step without them neither computes nor writes anything.
    """

    pred: jax.Array
    make: Callable


@pytree_dataclass
class RowsWrite:
    """Row b of cache field ``field`` (a [B, Hkv, N, X] buffer) gets value[b, :, j] at row
    rows[b, j] for every j (add=True: added to what the row holds; several j may then name one
    row). value [B, Hkv, W, X], rows [B, W] int32; a row outside [0, N) (e.g. -1) is not written:
    how an extend (many tokens a row, :func:`put_rows`) says which of its slabs land."""

    value: jax.Array
    rows: jax.Array
    field: str = static()
    add: bool = static(default=False)


def put_rows(buf, x, rows, layer=None, add=False):
    """buf [B, H, N, X] (with ``layer``: [L, B, H, N, X], only layer ``layer`` written) with
    x [B, H, W, X] written (added) at rows [B, W] of axis 2; rows outside [0, N) are dropped.
    One scatter whose batch and head axes are batching dims: GSPMD keeps it on each shard."""
    b, h, w = x.shape[:3]
    n = buf.shape[-2]
    rows = jnp.asarray(rows, jnp.int32)
    rows = jnp.broadcast_to(jnp.where((rows >= 0) & (rows < n), rows, n)[:, None, :], (b, h, w))
    lead = 0 if layer is None else 1
    idx = rows[..., None]
    if layer is not None:
        idx = jnp.concatenate([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (b, h, w, 1)), idx], axis=-1)
    dnums = lax.ScatterDimensionNumbers(
        update_window_dims=(3,),
        inserted_window_dims=((0,) if layer is not None else ()) + (lead + 2,),
        scatter_dims_to_operand_dims=((0,) if layer is not None else ()) + (lead + 2,),
        operand_batching_dims=(lead, lead + 1),
        scatter_indices_batching_dims=(0, 1),
    )
    scatter = lax.scatter_add if add else lax.scatter
    return scatter(buf, idx, x.astype(buf.dtype), dnums, mode=lax.GatherScatterMode.FILL_OR_DROP)


def _put(cache, writes, layer):
    new = {}
    for w in writes:
        buf = new.get(w.field, getattr(cache, w.field))
        if isinstance(w, RowsWrite):
            new[w.field] = put_rows(buf, w.value, w.rows, layer=layer, add=w.add)
        else:
            new[w.field] = put_row(buf, w.value, w.index, w.axis, layer=layer, add=w.add, keep=w.keep)
    return dataclasses.replace(cache, **new)


# How a stacked cache's row writes are applied (:func:`apply_writes` with ``layer``): "xla"
# (a scatter per write), "pallas" (one kernel for each run of plain writes,
# pallas_kernels.row_writes; interpreted off a GPU) or "auto" (pallas on a single GPU with no
# mesh, else xla).
WRITES_IMPLS = ("auto", "xla", "pallas")
DEFAULT_WRITES_IMPL = "auto"


def _kernel_writes(buffers, writes, layer, impl):
    """Whether ``writes`` (plain RowWrites into a stacked cache's ``buffers``, one each) go to
    the row-writes kernel (a per-layer cache's, ``layer=None``, never do: they are ``append``'s)."""
    if impl not in WRITES_IMPLS:
        raise ValueError(f"writes impl={impl!r}; allowed: {WRITES_IMPLS}")
    if impl == "xla" or layer is None:
        return False
    fits = (len({w.field for w in writes}) == len(writes) and row_writes.supported(buffers)
            and all(w.axis == 1 and b.ndim == 5 and w.value.shape == b.shape[1:3] + (1, b.shape[-1])
                    for w, b in zip(writes, buffers)))
    if impl == "pallas":
        if not fits:
            raise ValueError("writes impl='pallas' takes [L, B, Hkv, N, X] buffers (X a power of two) written one "
                             "[B, Hkv, 1, X] slab per row, each field once a run")
        return True
    if not fits or jax.default_backend() != "gpu" or jax.device_count() != 1:
        return False
    from kivi_jax import sharding  # a lazy import: sharding imports the cache modules

    return sharding.active_mesh()[0] is None  # a sharded cache stays with XLA (GSPMD partitions its scatters)


def _put_run(cache, writes, layer, impl):
    """A run of plain RowWrites: one kernel launch (:func:`_kernel_writes`; differentiated as the
    scatters), else a scatter each."""
    buffers = tuple(getattr(cache, w.field) for w in writes)
    if not _kernel_writes(buffers, writes, layer, impl):
        return _put(cache, writes, layer)
    return derivatives.with_reference_derivative(_kernel_run, _put, cache, tuple(writes), layer)


def _kernel_run(cache, writes, layer):
    buffers = tuple(getattr(cache, w.field) for w in writes)
    keeps = [jnp.ones(w.index.shape, bool) if w.keep is None else w.keep for w in writes]
    out = row_writes.row_writes(buffers, tuple(w.value for w in writes),
                                tuple(w.index for w in writes), tuple(keeps), adds=tuple(w.add for w in writes),
                                layer=layer, interpret=jax.default_backend() != "gpu")
    return dataclasses.replace(cache, **{w.field: x for w, x in zip(writes, out)})


def kernel_append(kernel, view, stacked, layer, k, v, active, rare):
    """A layer-stacked cache's decode append whose plain writes one kernel makes:
    ``kernel(view, stacked, layer, k, v, active)`` returns ``stacked`` with them written (view:
    layer ``layer``'s cache, whose ``append_writes`` say what changes); the conditional writes
    (KIVI's key flush) follow as :func:`apply_writes` does them (rare: its). Differentiated as
    the same writes in XLA (the kernels alias their buffers, which a pallas_call's JVP refuses)."""

    def run(view, stacked, layer, k, v, active):
        writes, lengths, overflow = view.append_writes(k, v, active)
        stacked = kernel(view, stacked, layer, k, v, active)
        rest = [w for w in writes if isinstance(w, WritesIf)]
        return apply_writes(stacked, rest, lengths, overflow, layer=layer, rare=rare)

    def reference(view, stacked, layer, k, v, active):
        return apply_writes(stacked, *view.append_writes(k, v, active), layer=layer, rare=rare, impl="xla")

    return derivatives.with_reference_derivative(run, reference, view, stacked, layer, k, v, active)


def _across_batch(reduce):
    """A function that returns its scalar argument as it is, and under ``jax.vmap`` returns
    ``reduce`` of it across the batch, unbatched: a ``lax.cond`` / ``lax.switch`` on the result
    then stays one (a batched predicate or index makes XLA run every branch)."""
    @jax.custom_batching.custom_vmap
    def f(x):
        return x

    @f.def_vmap
    def _(axis_size, in_batched, x):
        (batched,) = in_batched
        return (reduce(x) if batched else x), False

    return f


#: pred (a bool scalar); under vmap, whether it holds for any request of the batch
any_in_batch = _across_batch(jnp.any)
#: x (an int scalar); under vmap, its largest value across the batch
max_in_batch = _across_batch(jnp.max)


def apply_writes(cache, writes, lengths, overflow, layer=None, impl=None, rare=None):
    """``cache`` with ``writes`` (RowWrite / RowsWrite / WritesIf sequence) applied in order and
    lengths/overflow [B] replaced.

    rare: None: each WritesIf in a ``lax.cond`` of its own. True / False: the caller has
    decided every WritesIf's predicate (a model step decides once for all its layers:
    ``models.StackedCache.rare_writes_due``): True applies their writes (rows that need none
    keep their slabs through the writes' ``keep``), False leaves them out.

    layer=None: cache is a per-layer cache (this is what ``append`` does). Otherwise every leaf
    of cache has a leading layer axis and only layer ``layer`` changes: the slabs are
    written into the stacked buffers in place and lengths/overflow into row ``layer``; each run
    of consecutive plain RowWrites is one launch of the row-writes kernel where ``impl``
    (:data:`WRITES_IMPLS`; None: :data:`DEFAULT_WRITES_IMPL`) picks it.
    """
    impl = DEFAULT_WRITES_IMPL if impl is None else impl
    run = []
    for w in tuple(writes) + (None,):
        if isinstance(w, RowWrite):
            run.append(w)
            continue
        if run:
            cache, run = _put_run(cache, run, layer, impl), []
        if isinstance(w, RowsWrite):
            cache = _put(cache, [w], layer)
        if isinstance(w, WritesIf) and rare is not False:
            def write(c, make=w.make):
                # the view is sliced inside the branch: a step that skips it reads nothing
                view = c if layer is None else jax.tree.map(lambda x: x[layer], c)
                return _put(c, make(view), layer)

            with jax.named_scope("rare_writes"):  # (the HLO checks of tests/test_decode_step.py find them by it)
                cache = write(cache) if rare else lax.cond(w.pred, write, lambda c: c, cache)
    new = {}
    if layer is None:
        new["lengths"], new["overflow"] = lengths, overflow
    else:
        new["lengths"] = lax.dynamic_update_index_in_dim(cache.lengths, lengths.astype(cache.lengths.dtype), layer, 0)
        new["overflow"] = lax.dynamic_update_index_in_dim(cache.overflow, overflow, layer, 0)
    return dataclasses.replace(cache, **new)
