"""Attention over a cache: decode (one query token per row) and causal prompt attention.

``decode_attention`` dispatches between the plain-JAX reference (dequantize, then dense
attention) and the fused Pallas kernel (``pallas_kernels``). Both take q [B, Hq, 1, D]
with Hq a multiple of Hkv (GQA), mask each row by its length, and do softmax in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import cache_common, derivatives, rotation
from kivi_jax.cache_dense import DenseCache
from kivi_jax.cache_kivi import KIVICache, rounded
from kivi_jax.cache_mosaic import HEADS as MOSAIC_HEADS, MosaicKIVICache
from kivi_jax.checks import check_float, check_window
from kivi_jax.eager import jit_when_eager

IMPLS = ("auto", "pallas", "reference", "xla")
# the reference must be exact float32 math: GPUs default float32 matmuls to TF32
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_cache(cache):
    """A cache decode_attention can read: a KIVICache, MosaicKIVICache or DenseCache (or another
    format with their reading interface: ``materialize()``, ``lengths`` [B] and the shape
    properties) of ONE layer. A StackedCache, None or an array failed with an AttributeError on
    whatever was read first, and a layer-stacked cache (``StackedCache.layers``, leaves [L, ...])
    with a broadcasting TypeError deep in the dequantization (its shape properties read L as B)."""
    needed = ("materialize", "lengths", "num_kv_heads", "head_dim", "batch_size")
    array = isinstance(cache, (jax.Array, jax.core.Tracer))
    if array or not all(hasattr(cache, a) for a in needed):
        hint = "; pass one layer, stacked.layer(i)" if hasattr(cache, "layer") else ""
        got = f"an array of shape {cache.shape}" if array else type(cache).__name__
        raise TypeError(f"cache must be a KIVICache, MosaicKIVICache or DenseCache (one layer); got {got}{hint}")
    if jnp.ndim(cache.lengths) != 1:
        raise ValueError(f"cache holds lengths of shape {jnp.shape(cache.lengths)}, not [B]: a cache with a leading "
                         "axis (a layer-stacked cache's .layers?); pass one layer (StackedCache.layer(i)), or "
                         "jax.vmap over that axis")


def _no_window_past(window, limit):
    """window, or None where it is at least ``limit`` (a window no row can exceed masks nothing:
    one of 2**31 or more overflowed int32 in the mask with an error naming no parameter)."""
    return None if window is not None and limit is not None and window >= limit else window


def _check_q(q, num_kv_heads: int, head_dim: int, batch: int):
    if not isinstance(q, (jax.Array, jax.core.Tracer, np.ndarray)):  # (a list: "no attribute ndim")
        raise TypeError(f"q must be an array [B, Hq, 1, D]; got {type(q).__name__}")
    if q.ndim != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, D]; got shape {q.shape}")
    check_float("q", q.dtype)  # (an integer q was attended as if cast)
    b, hq, _, d = q.shape
    if b != batch or d != head_dim:
        raise ValueError(f"q shape {q.shape} does not match the cache (B={batch}, D={head_dim})")
    if hq < 1:  # (Hq=0 passed the multiple check and attended nothing)
        raise ValueError(f"q shape {q.shape}: query heads Hq={hq} must be >= 1")
    if hq % num_kv_heads:
        raise ValueError(f"query heads Hq={hq} must be a multiple of the cache's Hkv={num_kv_heads}")


def _gqa_scores(q, k, exact: bool):
    """q [B, Hq, Tq, D], k [B, Hkv, Tk, D] -> scores [B, Hq, Tq, Tk] in float32, no K repeat."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, tq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32,
                   precision=_HIGHEST if exact else None)
    return s.reshape(b, hq, tq, k.shape[2])


def _gqa_values(p, v, exact: bool):
    """p [B, Hq, Tq, Tk] (float32, or v's dtype when not exact), v [B, Hkv, Tk, D] -> [B, Hq, Tq, D] float32."""
    b, hq, tq, tk = p.shape
    hkv = v.shape[1]
    pg = p.reshape(b, hkv, hq // hkv, tq, tk)
    if exact:
        o = jnp.einsum("bhgqk,bhkd->bhgqd", pg, v.astype(jnp.float32), precision=_HIGHEST)
    else:
        o = jnp.einsum("bhgqk,bhkd->bhgqd", pg.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, hq, tq, v.shape[3])


def attend_dense(q, k, v, mask, scale=None, *, exact: bool = True):
    """Softmax attention with a boolean mask [B, 1|Hq, Tq, Tk]; float32 softmax; q's dtype out.

    exact=True: float32 operands at HIGHEST precision (the reference, an oracle for tests).
    exact=False: operands in k/v's own dtype (bf16 tensor cores on a GPU) with float32
    accumulation, p cast to v's dtype for p·V -- what a serving path does. Identical for
    float32 caches.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    exact = exact or k.dtype == jnp.float32
    if exact:
        s = _gqa_scores(q.astype(jnp.float32), k.astype(jnp.float32), True) * scale
    else:
        s = _gqa_scores(q.astype(k.dtype), k, False) * scale
    s = jnp.where(mask, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)  # a row with nothing to attend gives 0, not NaN
    p = jnp.exp(s - mx)
    if not exact:  # the weights p·V gets (its dtype), summed as they are: a convex combination of the values
        p = rounded(p, v.dtype)  # (the barrier: XLA:GPU folds a cast pair away)
    denom = jnp.sum(p.astype(jnp.float32), axis=-1, keepdims=True)
    o = _gqa_values(p, v, exact) / jnp.where(denom > 0, denom, 1.0)
    return o.astype(q.dtype)


def decode_mask(lengths, num_tokens: int, window: int | None = None):
    """[B, 1, 1, T] True where token t < lengths[b] (and t >= lengths[b] - window)."""
    t = jnp.arange(num_tokens)[None, :]
    m = t < lengths[:, None]
    if window is not None:
        m &= t >= lengths[:, None] - window
    return m[:, None, None, :]


def reference_decode_attention(q, cache, *, window: int | None = None, exact: bool = True):
    """Dequantize the whole cache, then dense attention. q [B, Hq, 1, D] -> [B, Hq, 1, D].

    A KIVICache with ``config.rotate`` is read in its stored basis: scores (q·H)·(K·H)^T, output
    (p·(V·H))·H^T -- only q and the output are rotated, never the dequantized K or V.
    """
    rot_k = rot_v = False
    if isinstance(cache, (KIVICache, MosaicKIVICache)):
        rot_k, rot_v = cache.config.rotate_keys, cache.config.rotate_values
    if not (rot_k or rot_v):
        k, v = cache.materialize()
        return attend_dense(q, k, v, decode_mask(cache.lengths, k.shape[2], window), exact=exact)
    k, v = cache.materialize(rotated=True)
    qr = rotation.rotate(q) if rot_k else q.astype(jnp.float32)
    o = attend_dense(qr, k, v, decode_mask(cache.lengths, k.shape[2], window), exact=exact)
    if rot_v:
        o = rotation.rotate(o, transpose=True)
    return o.astype(q.dtype)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@jit_when_eager(static_argnames=("impl", "window"))
def decode_attention(q, cache, *, impl: str = "auto", window: int | None = None, stack=None):
    """Attention of one new query token per row over everything in ``cache``.

    q [B, Hq, 1, D]; cache a DenseCache or KIVICache holding [B, Hkv, ., D];
    impl: "reference" (plain JAX, float32), "xla" (the same math with the dots in the cache
    dtype: XLA's own attention, the dense baseline before the kernels), "pallas" (fused
    kernel; interpret mode off-GPU), or
    "auto" (the kernel on GPU, for a DenseCache too: its flash-decoding kernel; elsewhere the
    reference, which for a DenseCache is XLA's attention in the cache dtype). window: attend
    only to the newest ``window`` tokens (Mistral's sliding window). Returns [B, Hq, 1, D] in
    q's dtype. stack: optional (stacked, i) when ``cache`` is layer i of a layer-stacked cache
    (``models.StackedCache.layers``): the Pallas kernels then read the cache arrays in place
    from the stack rather than from copies of the slices. Same result.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {IMPLS}")
    _check_cache(cache)
    _check_q(q, cache.num_kv_heads, cache.head_dim, cache.batch_size)
    check_window(window)
    window = _no_window_past(window, getattr(cache, "max_length", None))  # (a row holds at most max_length)
    if isinstance(cache, MosaicKIVICache):
        return _mosaic(q, cache, impl, window, stack)
    kernel_cache = isinstance(cache, (KIVICache, DenseCache))
    if impl == "auto":
        if _on_gpu() and kernel_cache:  # the kernels, dense too: they read a layer-stacked cache in
            # place (XLA's attention in the model's layer scan: 15.6 vs 22.4 ms Llama-2-7B steps at
            # B=96 on the H200, decode-step-ab-2026-11-30-cb, arms pallasattn vs scan). Any other
            # cache (the eval's SimQuantCache ablations, a user's own) has no kernel: its reference.
            impl = "pallas"
        elif kernel_cache:  # over the part of the stores in use: the reference, or for a dense
            # cache (nothing to dequantize) XLA's attention in the cache dtype
            return _bounded_reference(q, cache, window, stack, exact=isinstance(cache, KIVICache))
        else:
            impl = "reference"
    if impl in ("reference", "xla"):
        return reference_decode_attention(q, cache, window=window, exact=impl == "reference")
    if not kernel_cache:
        raise ValueError(f"impl='pallas' runs the kernels of a KIVICache, MosaicKIVICache or DenseCache; got a "
                         f"{type(cache).__name__}; use impl='reference' (or 'auto', which picks it for this cache)")
    from kivi_jax import attention_pallas  # the kernel path is optional at import time

    kernel = functools.partial(attention_pallas.decode_attention, window=window, interpret=not _on_gpu())
    return _with_reference_derivative(kernel, q, cache, stack, window)


def _with_reference_derivative(kernel, q, cache, stack, window):
    """kernel(q, cache, stack=stack), differentiated as :func:`reference_decode_attention` (the
    same function in float32, before rounding). The derivative reaches a layer-stacked cache
    through ``cache`` (its layer's slice), not through ``stack``."""
    return derivatives.with_reference_derivative(
        lambda q, cache, stack: kernel(q, cache, stack=stack),
        lambda q, cache, stack: reference_decode_attention(q, cache, window=window).astype(q.dtype), q, cache, stack)


#: the smallest prefix of a cache's stores the bounded paths read (then doubling)
BOUNDED_MIN_TOKENS = 256


def prefix_sizes(cache) -> list[int]:
    """Body-token counts of the prefixes ``over_prefix`` picks from: BOUNDED_MIN_TOKENS rounded up
    to the format's ``prefix_unit``, doubling, then the whole capacity."""
    tc, unit = cache.capacity, cache.prefix_unit
    sizes, size = [], -(-BOUNDED_MIN_TOKENS // unit) * unit
    while size < tc:
        sizes.append(size)
        size *= 2
    return sizes + [tc]


def over_prefix(fn, cache, need, stack=None):
    """fn(view) on the shortest prefix of ``cache``'s stores (``cache.prefix``, one of
    prefix_sizes) holding ``need`` positions (an int scalar, sinks included), picked by a
    lax.switch; fn(cache) for a format with no ``prefix`` (e.g. the eval's SimQuantCache). A
    cache sized for a long chat otherwise costs its whole capacity at every read: ``kivi-jax
    chat`` (SmolLM2, KIVI-2, 2-core CPU, 86-151 tokens held) decoded 24.4 tokens/s at
    --max-length 2048 against 45.8 at 256; with the prefixes 39.4 at 2048 (45.3 at 256), same
    machine, back to back. Under vmap ``need`` is the longest request's. stack (stacked, i), as
    decode_attention's: the switch takes the stack and each branch slices layer i's prefix from
    it (given the layer's slices instead, XLA copies each layer's cache into the switch)."""
    if not hasattr(cache, "prefix"):
        return fn(cache)
    sizes = prefix_sizes(cache)
    if len(sizes) == 1:
        return fn(cache)
    stacked, layer = (cache, None) if stack is None else stack
    sinks = cache.config.sink_tokens if hasattr(cache, "config") else 0

    def branch(operand, n):
        c = operand if layer is None else jax.tree.map(lambda x: x[layer], operand)
        return fn(c.prefix(n))

    body = cache_common.max_in_batch(jnp.asarray(need) - sinks)
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), body),
                          [functools.partial(branch, n=n) for n in sizes], stacked)


def _bounded_reference(q, cache, window, stack=None, exact=True):
    """Decode off a GPU: the reference's math (exact=False: XLA's attention in the cache dtype) on
    the shortest prefix of the stores holding every row's tokens (``over_prefix``)."""
    return over_prefix(lambda c: reference_decode_attention(q, c, window=window, exact=exact), cache,
                       jnp.max(cache.lengths), stack)


def _mosaic(q, cache, impl, window, stack):
    """A MosaicKIVICache: the Mosaic GPU kernel (impl "pallas", or "auto" on a GPU over a bf16
    cache), else the reference. The kernel's operands are bf16 (wgmma), so a float32 or float16
    cache (exact checks; resolve_layout never picks this layout for one) takes the reference.
    Under a mesh of several devices the kernel does not run yet: "auto" takes XLA's path there
    (GSPMD partitions it; the cache's writes fall back to XLA the same way) where it raised."""
    from kivi_jax import sharding

    if impl == "auto":
        impl = "pallas" if _on_gpu() and cache.dtype == jnp.bfloat16 else "reference"
        # XLA's path where the kernel does not run: under a mesh of several devices, and for a
        # GQA ratio it does not take (HEADS: 1, 2 or 4 query heads a KV head; 3 or 8 raised "the
        # Mosaic kernel takes ..." from impl="auto" on a GPU, the call the models make)
        if impl == "pallas" and (sharding.active_mesh()[0] is not None
                                 or q.shape[1] // cache.num_kv_heads not in MOSAIC_HEADS):
            impl = "xla"
    if impl in ("reference", "xla"):
        return reference_decode_attention(q, cache, window=window, exact=impl == "reference")
    if not _on_gpu():
        raise ValueError("impl='pallas' on a MosaicKIVICache runs the Mosaic GPU kernel, which needs a GPU (its "
                         "interpret mode does not run it); use impl='reference' or 'auto' here")
    if cache.dtype != jnp.bfloat16:
        raise ValueError(f"impl='pallas' on a MosaicKIVICache runs the Mosaic GPU kernel, which takes a bfloat16 "
                         f"cache; this one's dtype is {jnp.dtype(cache.dtype).name}; use impl='reference' or "
                         "'auto', or KIVIConfig(layout='tokens') for the Triton kernel in this dtype")
    if sharding.active_mesh()[0] is not None:  # (None for one device)
        raise ValueError("impl='pallas' on a MosaicKIVICache: the Mosaic kernel does not run under a mesh of "
                         "several devices yet; use impl='auto' (XLA's path there) or KIVIConfig(layout='tokens') "
                         "(its kernels run per shard)")
    from kivi_jax import attention_mosaic

    kernel = functools.partial(attention_mosaic.decode_attention, window=window)
    return _with_reference_derivative(kernel, q, cache, stack, window)


PREFILL_BLOCK = 512  # query rows per block: bounds the [B, H, block, T] score buffer


PREFILL_IMPLS = ("auto", "xla", "cudnn")
#: prefill_attention's impl when none is passed (the models pass none); read at trace time
DEFAULT_PREFILL_IMPL = "auto"


def prefill_attention(q, k, v, lengths=None, *, window: int | None = None, exact: bool = False,
                      impl: str | None = None):
    """Causal full-precision prompt attention. q [B, Hq, T, D], k, v [B, Hkv, T, D].

    lengths [B] (default T): keys at positions >= lengths[b] are masked. window: each query
    sees at most the ``window`` newest keys (itself included). Returns [B, Hq, T, D].

    impl="xla": queries go in blocks of PREFILL_BLOCK, each against the keys it can see
    (causal), so the float32 scores never exceed [B, Hq, PREFILL_BLOCK, T]. Operands stay in
    the inputs' dtype with float32 accumulation (``exact=True``: float32 at HIGHEST precision;
    float32 inputs always are). impl="cudnn": cuDNN's fused flash attention
    (``jax.nn.dot_product_attention``; GPU, bf16/fp16, D <= 128, no scores in memory: at a
    4096-token prompt the blocked path writes and reads [B, Hq, 512, T] float32 scores a block).
    "auto": cudnn on one GPU where it applies (not exact, no mesh of several devices), else xla.
    None: DEFAULT_PREFILL_IMPL.
    """
    impl = DEFAULT_PREFILL_IMPL if impl is None else impl
    if impl not in PREFILL_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {PREFILL_IMPLS}")
    _check_prefill_args(q, k, v, lengths)
    check_window(window)
    if q.shape[2] == 0:  # no queries: nothing to attend (a turn with no new tokens)
        return jnp.zeros(q.shape, q.dtype)
    if window is not None and window >= q.shape[2]:
        window = None  # no query sees more than the window: plain causal
    cudnn_ok = _cudnn_applies(q, k.dtype == q.dtype == v.dtype, exact)
    if impl == "cudnn" and not (_on_gpu() and cudnn_ok):
        raise ValueError(f"impl='cudnn' needs a GPU and bf16/fp16 q, k, v with D <= 128 (a multiple of 8), not "
                         f"exact; got backend {jax.default_backend()}, {q.dtype} q {q.shape}, exact={exact}")
    if impl == "cudnn" or (impl == "auto" and _on_gpu() and cudnn_ok and not _under_mesh()):
        return _prefill_cudnn(q, k, v, lengths, window)
    return _prefill_blocked(q, k, v, lengths, window, exact)


#: extend_attention's impl when none is passed (the models pass none); read at trace time
DEFAULT_EXTEND_IMPL = "auto"


def extend_attention(q, k, v, cache, lengths=None, *, window: int | None = None, exact: bool = False,
                     impl: str | None = None):
    """Attention of T new tokens a row that continue ``cache`` (a chunked prefill): q [B, Hq, T, D],
    k, v [B, Hkv, T, D] the new tokens' own; new token j of row b sits at position
    ``cache.lengths[b] + j``. Each query sees the tokens the cache holds, as decode_attention
    reads them (dequantized), and the new tokens up to itself in full precision, as a prompt's
    attention does. lengths [B] (default T): new tokens past lengths[b] are masked. window: only
    the ``window`` newest positions (itself included). The cache is read as it is, before the new
    tokens are appended. Returns [B, Hq, T, D] in q's dtype.

    The cache is materialized only as far as its longest row needs (``over_prefix``: a prefix of
    its stores, doubling from BOUNDED_MIN_TOKENS), not over its whole capacity. impl="xla":
    queries in blocks of PREFILL_BLOCK against that prefix and the new keys (precision as
    prefill_attention's "xla" path). impl="cudnn": the new keys and values written into the
    materialized prefix at their positions, then cuDNN's flash attention with a [B, 1, T, C]
    mask (GPU, bf16/fp16, D <= 128; no scores in memory). "auto": cudnn on one GPU where it
    applies, else xla (as prefill_attention). None: DEFAULT_EXTEND_IMPL."""
    impl = DEFAULT_EXTEND_IMPL if impl is None else impl
    if impl not in PREFILL_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {PREFILL_IMPLS}")
    _check_prefill_args(q, k, v, lengths)
    check_window(window)
    b, _, t, d = q.shape
    # (no query sits past max_length + T - 1: a window that long masks nothing)
    window = _no_window_past(window, None if getattr(cache, "max_length", None) is None else cache.max_length + t)
    if (cache.batch_size, cache.num_kv_heads, cache.head_dim) != (b, k.shape[1], d):
        raise ValueError(f"q {q.shape} and k {k.shape} do not match the cache (B={cache.batch_size}, "
                         f"Hkv={cache.num_kv_heads}, D={cache.head_dim})")
    if t == 0:  # no queries: nothing to attend (a turn with no new tokens)
        return jnp.zeros(q.shape, q.dtype)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths)
    cudnn = False
    if impl == "cudnn" or (impl == "auto" and _on_gpu() and not _under_mesh()):
        cudnn = _cudnn_applies(q, cache.dtype == q.dtype, exact)
        if impl == "cudnn" and not (_on_gpu() and cudnn):
            raise ValueError(f"impl='cudnn' needs a GPU, a bf16/fp16 cache and q with D <= 128 (a multiple of 8), "
                             f"not exact; got backend {jax.default_backend()}, {q.dtype} q {q.shape}, "
                             f"{jnp.dtype(cache.dtype).name} cache, exact={exact}")

    def attend(c):
        kc, vc = c.materialize()  # [B, Hkv, C, D]: position t is token t (in the original basis)
        if cudnn:
            return _extend_cudnn(q, k, v, kc, vc, c.lengths, window)
        return _extend_blocked(q, k, v, kc, vc, c.lengths, lengths, window, exact)

    # cuDNN's path writes the new tokens into the prefix, so it must hold them too
    need = jnp.max(cache.lengths + lengths) if cudnn else jnp.max(cache.lengths)
    return over_prefix(attend, cache, need)


def _extend_blocked(q, k, v, kc, vc, held, lengths, window, exact):
    """extend_attention in XLA: queries in blocks of PREFILL_BLOCK against the materialized kc, vc
    [B, Hkv, C, D] (slots < held[b] valid) and the new k, v (tokens < lengths[b] valid)."""
    b, _, t, _ = q.shape
    c = kc.shape[2]
    held, slot, new = held[:, None], jnp.arange(c)[None, :], jnp.arange(t)[None, :]
    kpos = jnp.concatenate([jnp.broadcast_to(slot, (b, c)), held + new], axis=1)  # [B, C + T]
    valid = jnp.concatenate([slot < held, new < lengths[:, None]], axis=1)
    k, v = k.astype(kc.dtype), v.astype(vc.dtype)
    outs = []
    for q0 in range(0, t, PREFILL_BLOCK):
        q1 = min(q0 + PREFILL_BLOCK, t)
        # causal: the block's queries see the new tokens before q1 only (half the scores of a long chunk)
        keys, values = (jnp.concatenate([x, y[:, :, :q1]], axis=2) for x, y in ((kc, k), (vc, v)))
        qpos = held + jnp.arange(q0, q1)[None, :]  # [B, tq]
        kp = kpos[:, :c + q1]
        mask = valid[:, None, :c + q1] & (kp[:, None, :] <= qpos[:, :, None])
        if window is not None:
            mask &= kp[:, None, :] > qpos[:, :, None] - window
        outs.append(attend_dense(q[:, :, q0:q1], keys, values, mask[:, None], exact=exact))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _cudnn_applies(q, same_dtype: bool, exact: bool) -> bool:
    """Whether cuDNN's flash attention takes these operands: bf16/fp16 q with keys and values in
    its dtype (``same_dtype``), D <= 128 a multiple of 8, and not ``exact`` (float32 at HIGHEST)."""
    d = q.shape[-1]
    return not exact and q.dtype in (jnp.bfloat16, jnp.float16) and same_dtype and d <= 128 and d % 8 == 0


def _extend_cudnn(q, k, v, kc, vc, held, window, implementation="cudnn"):
    """extend_attention through cuDNN: new token j of row b written at position held[b] + j of
    the materialized kc, vc [B, Hkv, C, D] (positions past C dropped: only tokens past a row's
    length can land there, whose outputs are junk anyway), query j seeing positions <= held[b] + j
    (and > held[b] + j - window). implementation: jax.nn.dot_product_attention's (the tests run
    this on a CPU with "xla")."""
    b, _, t, _ = q.shape
    c = kc.shape[2]
    rows = held[:, None] + jnp.arange(t)[None, :]
    keys = cache_common.put_rows(kc, k.astype(kc.dtype), rows)
    values = cache_common.put_rows(vc, v.astype(vc.dtype), rows)
    pos = jnp.arange(c)[None, None, :]
    mask = pos <= rows[:, :, None]  # [B, T, C]
    if window is not None:
        mask &= pos > rows[:, :, None] - window
    return _batch_folded_attention(implementation)(q, keys, values, mask[:, None])


@functools.cache
def _batch_folded_attention(implementation):
    """Flash attention over q [B, Hq, T, D], k, v [B, Hkv, C, D] (the caches' own layout), mask
    [B, 1, T, C] -> [B, Hq, T, D], whose jax.vmap folds the mapped axis into B. jax 0.11.2's own
    batching of the cuDNN path with GQA failed: it reshaped the vmapped [V, B, 1, T, C] mask to
    [V * B, Hq, T, C] (a TypeError on the H200, gpu-tests-run135). "cudnn": :func:`_cudnn_bnth`;
    "xla": jax.nn.dot_product_attention's XLA path (the tests' stand-in off a GPU)."""

    @jax.custom_batching.custom_vmap
    def attend(q, k, v, mask):
        if implementation == "cudnn":
            return _cudnn_bnth(q, k, v, mask)
        return _jax_nn_bnth(q, k, v, mask, implementation)

    @attend.def_vmap
    def _(axis_size, in_batched, *args):
        args = [x if b else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, b in zip(args, in_batched)]
        out = attend(*(x.reshape(-1, *x.shape[2:]) for x in args))  # (attend: a vmap around this one folds too)
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return attend


def _cudnn_bnth(q, k, v, mask):
    """cuDNN's flash attention on [B, heads, T, D] operands as they are (BNTH). jax.nn's takes
    [B, T, heads, D] only, and its transposes of a stacked cache's layer let XLA's layout
    assignment give the whole loop-carried stack cuDNN's layout: two transposed copies of every
    layer, 64 GiB of temporaries for a dense Llama-2-7B-shape cache of 16384 tokens at batch 8,
    which ran out of the H200's memory (results/extend-memory-run142). That function is private
    in jax; where it is not found, jax.nn's path with its transposes, k and v pinned in the
    cache's layout first (``cache_common.row_major``, as the prefill's writes are)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    except ImportError:  # (a jax that moved it)
        cudnn_attention = None
    if cudnn_attention is None:
        return _jax_nn_bnth(q, cache_common.row_major(k), cache_common.row_major(v), mask, "cudnn")
    return cudnn_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]), qkv_layout="BNTH")


def _jax_nn_bnth(q, k, v, mask, implementation):
    """jax.nn.dot_product_attention on [B, heads, T, D] operands, through its [B, T, heads, D]."""
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, implementation=implementation))


def _under_mesh() -> bool:
    """A mesh of several devices is active. auto keeps prefill in XLA there: cuDNN's path was
    checked on one GPU (results/prefill-attention-run13), not partitioned across several."""
    from kivi_jax import sharding

    return sharding.active_mesh()[0] is not None


def _prefill_cudnn(q, k, v, lengths, window):
    """prefill_attention through cuDNN's flash attention ([B, T, heads, D] operands)."""
    t = q.shape[2]
    o = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=True,
        key_value_seq_lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
        query_seq_lengths=None if lengths is None else jnp.full((q.shape[0],), t, jnp.int32),
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
    return o.transpose(0, 2, 1, 3)


def _check_prefill_args(q, k, v, lengths):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, Hq, T, D] and k, v [B, Hkv, T, D]; got {q.shape}, {k.shape}, {v.shape}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree (B, T, D equal; Hq a multiple of Hkv)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x.dtype)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an integer array of shape ({b},); got {lengths.shape} {lengths.dtype}")
        # (a length past T masked nothing and a negative one everything, silently)
        cache_common.check_lengths_range(lengths, t)


def _prefill_blocked(q, k, v, lengths, window, exact):
    """prefill_attention in XLA, PREFILL_BLOCK queries at a time."""
    t = q.shape[2]
    lengths = None if lengths is None else jnp.asarray(lengths)
    outs = []
    for q0 in range(0, t, PREFILL_BLOCK):
        q1 = min(q0 + PREFILL_BLOCK, t)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        qpos = jnp.arange(q0, q1)[:, None]
        kpos = jnp.arange(k0, q1)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        mask = mask[None, None]
        if lengths is not None:
            mask = mask & (kpos[0][None, :] < lengths[:, None])[:, None, None, :]
        outs.append(attend_dense(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], mask, exact=exact))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
