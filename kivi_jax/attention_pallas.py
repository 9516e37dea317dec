"""Glue between KIVICache and the fused Pallas decode kernels (pallas_kernels.kivi_decode,
pallas_kernels.kivi_window).

The kernel covers each row's tokens below m = max(L - R, 0), where keys and values are both
quantized (in ``chunk``-token chunks, the last one masked at m), and then the R newest tokens —
the value window, whose keys are in the key residual or in the block flushed last — straight
from the residual ring (pallas_kernels.kivi_window; plain JAX here for configs it does not
take: see kivi_window.supported); the partial softmaxes are combined.

Extensions (KIVIConfig): with ``sink_tokens=S`` the quantized stores index the tokens after
the sinks (store position p = token S + p), so the kernels and the window work on that body
exactly as on a plain cache (body lengths, a sliding window's start shifted by S), and the S
sink tokens (slots R .. R + S of the ring buffers) are attended by the ring's program too
(kivi_window.sink_step; a plain-JAX partial of their own where the kernel does not take the ring
or KERNEL_SINKS is off). With ``rotate``, q is rotated (q·H) before the
kernel and the window, and the combined output is rotated back (o·H^T) after: one D x D
product per query, none per cached token. ``key_group_size`` != ``group_size`` is a kernel
parameter: the scales are passed as stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from kivi_jax import packing, rotation, sharding
from kivi_jax.cache_dense import DenseCache
from kivi_jax.cache_kivi import KIVICache, rounded
from kivi_jax.checks import check_window, is_int
from kivi_jax.eager import jit_when_eager
from pallas_kernels import dense_decode, flash, kivi_decode, kivi_window

TARGET_PROGRAMS = 528  # ~4 programs per H200 SM (132 SMs)


def default_splits(batch: int, heads: int, n_chunks: int, interpret: bool) -> int:
    if interpret:
        return min(2, n_chunks)
    return max(1, min(n_chunks, -(-TARGET_PROGRAMS // (batch * heads)), 64))


def _split_axis(o, m, l):
    """Partials [B, Hkv, g, ...] -> [B, Hkv, 1, g, ...] (one split)."""
    return o[:, :, None], m[:, :, None], l[:, :, None]


def _ring(cache: KIVICache, stack, layer, chunk, start):
    """(ring, ring_len, sink_len) for kivi_decode_partials: the residual ring (k_res, v_res, body
    lengths, quantized keys; and with sink_len = S the sinks' bounds, ``start`` [B] (a sliding
    window's first token, absolute) and the lengths), read in place from the stack when the bulk
    arrays are (``layer``), or (None, 0, 0) when the kernel does not take this config
    (kivi_window.supported; the sinks: kivi_window.sinks_supported, else sink_len 0 and they
    are attended in XLA)."""
    c = cache.config
    r, sk = c.residual_length, c.sink_tokens
    if not kivi_window.supported(r, c.k_bits, c.key_group, cache.capacity, chunk):
        return None, 0, 0
    # whole buffers, the S sink slots past R included (the kernel reads the ring's R slots and,
    # with sink_len, the sinks'): a slice of the ring was a copy of it every call, the sinks'
    # main cost (B=96, 330 tokens, 32 KV heads: 0.357 vs 0.197 ms without sinks,
    # decode-attention-extensions-run99)
    k_res, v_res = (stack[0].k_res, stack[0].v_res) if layer is not None else (cache.k_res, cache.v_res)
    ring = (k_res, v_res, cache.body_lengths, cache._body_quantized_keys())
    if sk and KERNEL_SINKS and kivi_window.sinks_supported(sk, r):
        return ring + (start, cache.lengths), r, sk
    return ring, r, 0


def _full_precision_parts(qg, cache: KIVICache, start, ring_in_kernel: bool, sinks_in_kernel: bool = False,
                          scale: float = 1.0):
    """Partials (as a list for _combine) over the full-precision tokens the kernel left out:
    the S sink tokens when it took the ring (and not them), else the ring and the sinks
    (_window_partials)."""
    if not ring_in_kernel:
        return [_split_axis(*_window_partials(qg, cache, start, scale))]
    c = cache.config
    r, sk = c.residual_length, c.sink_tokens
    if not sk or sinks_in_kernel:
        return []
    s = jnp.arange(sk)[None, :]
    valid = (s < cache.lengths[:, None]) & (s >= start[:, None])
    return [_split_axis(*_partials(qg, cache.k_res[:, :, r:], cache.v_res[:, :, r:], valid, scale))]


def _window_partials(qg, cache: KIVICache, start, scale: float = 1.0):
    """Softmax partials over every full-precision token, in plain JAX: the R slots of the
    residual ring — body tokens [max(Lb - R, 0), Lb), whose values are in full precision
    (everything the kernel leaves out) — and the S sink tokens.

    Body coordinates for the ring (store positions; token S + p). Ring slot j holds token
    t_j = Lb - R + (j - Lb) mod R (negative: an empty slot) in v_res, and in k_res too when
    t_j >= n (the keys not quantized yet); a key below n is in the block flushed last,
    tokens [n - R, n), where token n - R + j is the one in slot j. Sink s sits in slot R + s.
    The slots are gathered (ring oldest first, then the sinks) before the dots: softmax does not
    care about the order, but XLA does about the buffer. Read directly (f2e0fb7 and before), the
    model's layer-stacked, loop-carried v_res got the slot-minor layout of the p·v reduction on
    XLA:GPU and was copied whole every layer (H200, Llama-2-7B, B=96: 166 of a 179 ms step);
    the gather-then-dot shape is the one measured without that copy (a256a3d: 39.5 ms steps).
    qg [B, Hkv, g, D] float32 (in the keys' stored basis; the scores are (q·k)·scale); start [B]:
    a sliding window's first token (absolute), 0 without one.
    Returns o [B, Hkv, g, D], m, l [B, Hkv, g].
    """
    c = cache.config
    r, sk = c.residual_length, c.sink_tokens
    lb, n = cache.body_lengths[:, None], cache._body_quantized_keys()[:, None]
    j = jnp.arange(r)[None, :]
    t_slot = lb - r + (j - lb) % r  # [B, R] body token of ring slot j
    k = cache.k_res
    if cache.capacity >= r:  # else no key is ever flushed: every ring slot's key is in k_res
        k_ring = jnp.where((t_slot >= n)[:, None, :, None], k[:, :, :r], _flushed_keys(cache))
        k = k_ring if sk == 0 else jnp.concatenate([k_ring, k[:, :, r:]], axis=2)
    t = lb - r + j  # body token at position j of the gathered ring, oldest first
    order = (lb + j) % r  # its slot
    valid = (t >= 0) & (t >= jnp.maximum(start - sk, 0)[:, None])
    if sk:
        s = jnp.arange(sk)[None, :]
        order = jnp.concatenate([order, r + jnp.broadcast_to(s, order.shape[:1] + s.shape[1:])], axis=1)
        valid = jnp.concatenate([valid, (s < cache.lengths[:, None]) & (s >= start[:, None])], axis=1)

    def gather(x):  # [B, H, R + S, D] in slot order -> [B, H, R + S, D] in gathered order
        return jnp.take_along_axis(x, order[:, None, :, None], axis=2)

    return _partials(qg, gather(k), gather(cache.v_res), valid, scale)


def _rows(x, start, size):
    """x [B, H, N, E], start [B] -> x[b, :, start[b] : start[b] + size] as [B, H, size, E]:
    one contiguous slice per batch row (XLA gathers whole slabs, not one index per element)."""
    return jax.vmap(lambda xb, s: lax.dynamic_slice_in_dim(xb, s, size, axis=1))(x, start)


def _flushed_keys(cache: KIVICache):
    """k̂ [B, H, R, D] (cache dtype): the dequantized keys of the block flushed last, tokens
    [n - R, n) (body positions), token n - R + j in slot j; zeros' dequantization when n = 0.

    Reads the R tokens' words as one contiguous slab per row (words hold 32/bits consecutive
    tokens; one extra word when R is not a whole number of words) and their R/Gk scale rows."""
    c = cache.config
    r, kg, bits = c.residual_length, c.key_group, c.k_bits
    per = packing.codes_per_word(bits)
    b, h, _, d = cache.k_res.shape
    t0 = jnp.maximum(cache._body_quantized_keys() - r, 0)  # [B], a multiple of R
    # words that hold R tokens starting mid-word (never more than the store: then it is all of it)
    n_rows = min(-(-r // per) + (r % per > 0), cache.k_codes.shape[2])
    row0 = jnp.clip(t0 // per, 0, cache.k_codes.shape[2] - n_rows)
    words = _rows(cache.k_codes, row0, n_rows)
    codes = packing.unpack(words, bits, 2, n_rows * per)  # tokens [row0 per, (row0 + n_rows) per)
    codes = _rows(codes, t0 - row0 * per, r) if n_rows * per != r else codes
    scale, mn = (jnp.repeat(_rows(x, t0 // kg, r // kg).astype(jnp.float32), kg, axis=2)
                 for x in (cache.k_scale, cache.k_min))
    # dequantized in float32 and rounded once to the cache dtype, like the kernel
    return (codes.astype(jnp.float32) * scale + mn).astype(cache.dtype)


def _partials(qg, k, v, valid, scale: float = 1.0):
    """qg [B, Hkv, g, D] float32, k, v [B, Hkv, W, D] (cache dtype), valid [B, W]
    -> o [B, Hkv, g, D], m, l [B, Hkv, g] float32 of the scores (q·k)·scale.

    Like the kernel: 16-bit caches multiply in their dtype with float32 accumulation,
    float32 caches in full float32 (HIGHEST: no TF32), and the query rows padded to 16 (a
    matmul, not a one-row reduction over the tokens; see _window_partials)."""
    g = qg.shape[2]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, max(16, g) - g), (0, 0)))
    if k.dtype == jnp.float32:
        dt, prec = jnp.float32, jax.lax.Precision.HIGHEST
    else:
        dt, prec = k.dtype, jax.lax.Precision.DEFAULT
    s = jnp.einsum("bhgd,bhwd->bhgw", qg.astype(dt), k, precision=prec, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[:, None, None, :], s, flash.NEG)
    m = jnp.max(s, axis=-1)
    # l sums the weights o gets (behind a barrier: XLA:GPU would fold the casts back, cache_kivi.rounded)
    p = rounded(jnp.where(valid[:, None, None, :], jnp.exp(s - m[..., None]), 0.0), dt)
    o = jnp.einsum("bhgw,bhwd->bhgd", p, v, precision=prec, preferred_element_type=jnp.float32)
    return o[:, :, :g], m[:, :, :g], jnp.sum(p.astype(jnp.float32), axis=-1)[:, :, :g]


def _default_chunk(config) -> int:
    # 64: the fastest measured on the H200 (kernel-layouts-2026-11-30: 1.66 ms vs 1.97 at 32)
    return min(64, packing.block_len(config.k_bits), packing.block_len(config.v_bits))


# the fastest variant measured on the H200 for every shape so far (pallas_kernels/NOTES.md):
# swap, chunk 64, 4 warps, 3 stages -- kernel-only 1.24 / 0.33 / 0.64 ms vs dequant's 1.62 /
# 0.43 / 0.86 ms (kernel-tuning-2026-11-30-run3); with magic-number dequantization (the kernel's
# dequant="auto") 1.11 ms kernel-only (decode-attention-quick-magic-2026-12-01); compiled check
# 22/22 (kernel-check-2026-12-01-run1). At 8 warps swap degrades, so num_warps stays 4.
DEFAULT_VARIANT = "swap"
# which programs walk the residual ring: split 0 of each (row, KV head), after its share of the
# bulk ("first"), a split of its own ("own"), or a launch of its own ("launch": the bulk's launch
# then has no ring code, 128 registers instead of 167 offline, 4 programs an SM instead of 3;
# the ring's launch walks only the ring)
# "auto": "launch" from LAUNCH_RING_FROM tokens of capacity, else "first". Measured on the H200
# (decode-attention-quick-launch-2026-12-01, decode-step-ab-launch): at B=64, T=4096 "launch" took
# 1.138 / 0.303 ms vs 1.279 / 0.340 (32 / 8 KV heads), mixed lengths 1.125 vs 1.247; at the
# paper's setting (capacity 512) the 32-layer step 10.40 vs 10.20 ms and B=96 T=256 0.150 vs
# 0.142 (its extra launch costs more than the registers save). Between 512 and 4096: untimed.
# "xla": no program; the ring is attended in plain JAX next to the kernel (_window_partials), as
# it is for the rings the kernel does not take (an A/B arm: benchmarks/decode_attention.py --extensions)
RING_PROGRAMS = kivi_decode.RING_SPLITS + ("launch", "auto", "xla")
DEFAULT_RING_PROGRAM = "auto"
LAUNCH_RING_FROM = 4096
# the KIVI kernel's pipeline stages below LAUNCH_RING_FROM tokens of capacity, where a row is a few
# chunks and most of it the ring (None: the kernel's default, 3, measured at long context). On the
# H200 at batch 96, rows of 257-384 tokens, in turns: 0.0631 vs 0.0655 ms (8 KV heads), 0.184 vs
# 0.198 (32) (decode-attention-short-run78); traced 32-layer steps at 330 tokens: kernel 5.53 vs
# 6.07 ms (Llama), 1.51 vs 1.70 (Mistral) (decode-step-ab-2026-12-03-run79-*). At B=64, T=4096 3
# stages were 2% faster (1.24 vs 1.27 ms).
SHORT_NUM_STAGES = 2
#: whether the ring's program also attends the S sinks (kivi_window.sink_step), read at trace
#: time; False: their partials in plain JAX, combined after the kernel (as before; the A/B arm
#: of benchmarks/decode_attention.py --extensions). The Mosaic layout's: attention_mosaic.KERNEL_SINKS
KERNEL_SINKS = True


@jit_when_eager(static_argnames=("window", "interpret", "variant", "chunk", "num_splits", "num_warps", "num_stages",
                                 "dot_dtype", "mesh", "rules", "ring_program", "dequant"))
def decode_attention(q, cache, *, window=None, interpret=False, variant="auto", chunk=None,
                     num_splits=None, num_warps=4, num_stages=None, dot_dtype=None, mesh=None, rules=None,
                     stack=None, ring_program=None, dequant="auto"):
    """q [B, Hq, 1, D] -> [B, Hq, 1, D]; see kivi_jax.decode_attention.

    stack: None, or (stacked, i) when ``cache`` is layer i of ``stacked`` (a KIVICache whose
    leaves carry a leading layer axis): the kernel reads the quantized arrays in place from
    the stack (a slice passed to a custom call is a copy: 1.5 x the layer's quantized bytes of
    extra traffic), at any size (64-bit offsets past 2**32 bytes; see kivi_decode_partials).

    A DenseCache goes to the dense flash-decoding kernel (:mod:`pallas_kernels.dense_decode`),
    which reads a layer-stacked cache in place too (``stack``; ``kivi_jax.decode_attention``'s
    "auto" uses it on GPU). num_stages: None for each kernel's measured default (KIVI 3, or
    SHORT_NUM_STAGES below LAUNCH_RING_FROM tokens of capacity; dense 2). ring_program: who
    attends a KIVI cache's residual ring (:data:`RING_PROGRAMS`;
    None: :data:`DEFAULT_RING_PROGRAM`). dequant: how the KIVI kernel turns codes into numbers
    (:data:`pallas_kernels.kivi_decode.DEQUANTS`; "auto": magic-number PTX where it applies).

    Sharded: with a mesh (``mesh``, else :func:`kivi_jax.sharding.use_mesh`'s, else jax's
    context mesh) the kernel and its tail run under ``shard_map`` over batch x kv_heads
    (``rules``, default :data:`kivi_jax.sharding.DEFAULT_RULES`): every cache array is split
    on batch and kv_heads, q on batch and heads, lengths on batch, so each device attends
    over its own rows and KV heads and no cache array is gathered.
    """
    if ring_program is not None and ring_program not in RING_PROGRAMS:
        raise ValueError(f"ring_program={ring_program!r}; allowed: {RING_PROGRAMS} (or None: "
                         f"{DEFAULT_RING_PROGRAM!r})")
    check_window(window)
    if num_splits is not None and (not is_int(num_splits) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r} must be None (the default for the shape) or an integer >= 1")
    # the kernel's own num_stages default unless one is given
    knobs = dict(num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    if isinstance(cache, DenseCache):
        local = functools.partial(_dense_local, window=window, interpret=interpret, chunk=chunk,
                                  num_splits=num_splits, knobs=knobs)
    elif isinstance(cache, KIVICache):
        local = functools.partial(_decode_attention_local, window=window, interpret=interpret, variant=variant,
                                  chunk=chunk, num_splits=num_splits, dot_dtype=dot_dtype, knobs=knobs,
                                  ring_program=ring_program or DEFAULT_RING_PROGRAM, dequant=dequant)
    else:
        raise TypeError(f"cache must be a KIVICache or DenseCache; got {type(cache).__name__}")
    mesh, rules = sharding.active_mesh(mesh, rules)
    if mesh is None:
        return local(q, cache, stack=stack)
    # shards are whole rows x whole KV heads: only batch and kv_heads are split
    specs = sharding.cache_specs(cache, mesh, dataclasses.replace(rules, sequence=None, head_dim=None))
    kv = tuple(getattr(specs, _KERNEL_ARRAYS[type(cache)][0])) + (None, None)
    q_spec = P(kv[0], kv[1])  # query heads follow their KV heads (Hq = g * Hkv, contiguous)
    if kv[0] is None and kv[1] is None:
        return local(q, cache)
    # (an Explicit-axes mesh: shard_map takes only inputs already in its in_specs)
    q, cache = sharding.to_in_specs((q, cache), (q_spec, specs), mesh)
    return sharding.shard_map(local, mesh=mesh, in_specs=(q_spec, specs), out_specs=q_spec)(q, cache)


# the cache arrays each kernel reads (the first one's sharding is the kernel's shard_map spec)
_KERNEL_ARRAYS = {KIVICache: ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"), DenseCache: ("k", "v")}


def _in_place(stack, cache):
    """(the arrays the kernel reads, layer or None): the stack's when its layers match ``cache``."""
    names = _KERNEL_ARRAYS[type(cache)]
    if stack is not None:
        stacked, i = stack
        arrays = tuple(getattr(stacked, n) for n in names)
        if all(x.shape[1:] == getattr(cache, n).shape for x, n in zip(arrays, names)):
            return arrays, i
    return tuple(getattr(cache, n) for n in names), None


DENSE_CHUNK = 64  # tokens per step of the dense kernel's loop (untimed; KIVI's measured best)


def grouped_queries(q, hkv: int, rotate: bool = False):
    """q [B, Hq, 1, D] -> [B, Hkv, g, D] float32, unscaled (the kernels' q: they scale the float32
    products by :func:`score_scale`, so a 16-bit q enters their 16-bit dots exactly; q/sqrt(D)
    rounded to bf16 cost up to 3x the output's own rounding with outlier channels,
    flash.online_softmax_step); rotate: q·H first (rotation.rotate, on q as it comes: a bf16 q's
    rotation is exact), the scores then in the stored basis, (q·H)·(K·H)^T = q·K^T."""
    b, hq, _, d = q.shape
    x = rotation.rotate(q[:, :, 0]) if rotate else q[:, :, 0].astype(jnp.float32)
    return x.reshape(b, hkv, hq // hkv, d)


def score_scale(head_dim: int) -> float:
    """1/sqrt(D): attention's scale of the q·k products (of the unpadded head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pad_minor(x, n: int):
    """x zero-padded along its last axis to n."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])]) if x.shape[-1] != n else x


def _pad_head_dim(cache, dp: int):
    """``cache`` with head_dim D zero-padded to ``dp`` (a power of two) in every array a kernel
    reads: the Triton lowering takes only arrays of power-of-two sizes, and [chunk, D] tiles with
    D = 80, 96, 100, ... raised in it ("all operations have array arguments ... whose size is a
    power of 2"), so decode on a GPU failed for such a head_dim. A padded channel has q = 0, key
    and value codes 0 with scale 0 and min 0 (a KIVI value group of its own: dp is a multiple of
    G), so it adds nothing to a score and its output column is dropped. A copy of the layer's
    arrays each call: correct, not fast (a kernel with masked D loads would read them in place)."""
    if isinstance(cache, DenseCache):
        return dataclasses.replace(cache, k=_pad_minor(cache.k, dp), v=_pad_minor(cache.v, dp))
    groups = dp // cache.config.group_size
    return dataclasses.replace(
        cache, **{f: _pad_minor(getattr(cache, f), dp) for f in ("k_codes", "k_scale", "k_min", "k_res", "v_codes",
                                                                  "v_res")},
        **{f: _pad_minor(getattr(cache, f), groups) for f in ("v_scale", "v_min")})


def _pad_rows(qg):
    """[B, Hkv, g, D] -> [B, Hkv, G, D] with G = g rounded up to a power of two (the kernels
    repeat the rows to the 16 a tensor-core dot needs themselves, in registers: padded here,
    q and the partials were 16 float32 rows a (row, KV head), 0.28 ms of a 32-layer MHA step
    at B=96 for the pad alone on the H200, decode-step-ab-ring-trace)."""
    g = qg.shape[2]
    pad = (1 << (g - 1).bit_length()) - g
    return jnp.pad(qg, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else qg


#: Under a sliding window the kernels' splits share each row's own chunks (True) or all the
#: cache's, as before (False); read at trace time (benchmarks/decode_attention.py --sliding A/Bs it).
RELATIVE_WINDOW_SPLITS = True


def _window_span(window, chunk: int, n_chunks: int) -> int:
    """0 without a window (or RELATIVE_WINDOW_SPLITS off), else the chunks a row's attended
    tokens can touch (end - start <= window): the kernels' splits then share each row's own
    chunks (flash.program_bounds)."""
    return 0 if window is None or not RELATIVE_WINDOW_SPLITS else flash.window_chunks(window, chunk, n_chunks)


def _window_start(lengths, window):
    """[B] first token a row attends to: 0, or a sliding window's start."""
    return jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)


def _dense_local(q, cache: DenseCache, *, window, interpret, chunk, num_splits, knobs, stack=None):
    """:func:`decode_attention` over a DenseCache (one shard's rows and KV heads)."""
    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    gq = hq // hkv
    chunk = chunk or DENSE_CHUNK
    dp = _pow2(d)
    if dp != d:  # (the stack's arrays are not padded: the padded layer is read instead)
        cache, stack = _pad_head_dim(cache, dp), None
    qp = _pad_rows(_pad_minor(grouped_queries(q, hkv), dp))  # padded; the kernel scales the products
    end = cache.lengths
    start = _window_start(end, window)
    n_chunks = -(-cache.max_length // chunk)
    span = _window_span(window, chunk, n_chunks)
    splits = num_splits or default_splits(b, hkv, span or n_chunks, interpret)
    (k, v), layer = _in_place(stack, cache)
    o, m, l = dense_decode.dense_decode_partials(
        qp, k, v, start // chunk, -(-end // chunk), start, end, layer=layer, chunk=chunk, num_splits=splits,
        interpret=interpret, span_chunks=span, scale=score_scale(d), **knobs)
    out = _combine([(o, m, l)], gq)[..., :d]
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def _combine(parts, g):
    """Normalized attention from flash-decoding partials: parts [(o [B, Hkv, S, M, D], m, l
    [B, Hkv, S, M])] (splits S of any number, rows M >= g: the first g are the query heads)
    -> [B, Hkv, g, D] float32; a row with no token gets 0."""
    o, m, l = (jnp.concatenate([p[i][:, :, :, :g] for p in parts], axis=2) for i in range(3))
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    den = jnp.sum(l * w, axis=2)
    return jnp.sum(o * w[..., None], axis=2) / jnp.where(den > 0, den, 1.0)[..., None]


def _decode_attention_local(q, cache, *, window, interpret, variant, chunk, num_splits, dot_dtype, knobs,
                            ring_program=DEFAULT_RING_PROGRAM, stack=None, dequant="auto"):
    """The body of :func:`decode_attention` on one shard's rows and KV heads."""
    c = cache.config
    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    gq = hq // hkv
    variant = DEFAULT_VARIANT if variant == "auto" else variant
    chunk = chunk or _default_chunk(c)
    dp = _pow2(d)  # (rotate needs a power-of-two head_dim: never padded)
    if dp != d:  # (the stack's arrays are not padded: the padded layer is read instead)
        cache, stack = _pad_head_dim(cache, dp), None
    qg = _pad_minor(grouped_queries(q, hkv, c.rotate_keys), dp)  # padded; the products scaled by `scale`
    scale = score_scale(d)
    qp = _pad_rows(qg)
    start = _window_start(cache.lengths, window)
    sk = c.sink_tokens
    start_b = start if sk == 0 else jnp.maximum(start - sk, 0)  # the window's start in body positions
    end = cache._body_quantized_values()  # [B] body tokens: the kernel covers [start, end)
    n_chunks = cache.capacity // chunk
    span = _window_span(window, chunk, n_chunks)  # (body tokens [start_b, end) span at most the window too)
    splits = num_splits or default_splits(b, hkv, span or n_chunks, interpret)
    arrays, layer = _in_place(stack, cache)
    ring, ring_len, sink_len = (None, 0, 0) if ring_program == "xla" else _ring(cache, stack, layer, chunk, start)
    if ring_program == "auto":
        ring_program = "launch" if cache.capacity >= LAUNCH_RING_FROM else "first"
    if "num_stages" not in knobs and SHORT_NUM_STAGES and cache.capacity < LAUNCH_RING_FROM:
        knobs = dict(knobs, num_stages=SHORT_NUM_STAGES)
    kernel = functools.partial(
        kivi_decode.kivi_decode_partials, qp, *arrays, layer=layer, k_bits=c.k_bits, v_bits=c.v_bits,
        group_size=c.group_size, key_group_size=c.key_group, chunk=chunk, variant=variant, interpret=interpret,
        dot_dtype=dot_dtype, dequant=dequant, span_chunks=span, scale=scale, **knobs)
    with jax.named_scope("kivi_kernel"):  # the quantized bulk, and the residual ring when the kernel takes it
        if ring is not None and ring_program == "launch":
            bulk = kernel(start_b // chunk, -(-end // chunk), start_b, end, num_splits=splits)
            none = jnp.zeros_like(end)  # the ring's launch: no bulk chunk
            kernel_parts = [bulk, kernel(none, none, start_b, end, num_splits=1, ring=ring, ring_len=ring_len,
                                         sink_len=sink_len)]
        else:
            kernel_parts = [kernel(start_b // chunk, -(-end // chunk), start_b, end, num_splits=splits, ring=ring,
                                   ring_len=ring_len, sink_len=sink_len,
                                   ring_split=ring_program if ring is not None else "first")]
    with jax.named_scope("kivi_window"):  # the full-precision tokens the kernel left out
        parts = _full_precision_parts(qg, cache, start, ring is not None, sink_len > 0, scale)
    out = _combine(kernel_parts + parts, gq)[..., :d]
    if c.rotate_values:  # (p·(V·H))·H^T
        out = rotation.rotate(out, transpose=True)
    return out.reshape(b, hq, 1, d).astype(q.dtype)
