"""Decode attention over a MosaicKIVICache: the Mosaic GPU kernel on the quantized tokens, a
Triton kernel (on a GPU; pallas_kernels/mosaic_window.py) or plain JAX on the newest ones.

Row b holds L tokens; values [0, m) are quantized (m = max(L - R, 0)), and so are their keys
(keys [0, n) with n = L - L % R >= m). The kernel (:func:`pallas_kernels.kivi_mosaic.bulk_partials`)
attends tokens [0, m) from the stores as they are. The window, tokens [m, L) (at most R), is
attended here, slot by slot, keys and values both from the ring (slot t % R; a key in [m, n) is
held there dequantized since its block was flushed, so no key is scored from its codes here).
The window's partials (the Triton window kernel on a GPU, plain JAX elsewhere) are combined with
the kernel's here. A sliding window (Mistral's) gives each row a first attended token, max(L - W, 0):
the kernel skips the steps before it and both windows mask below it. With S sink tokens all of
this is the body's (tokens S.., body position t - S), and the sinks (slots R .. R + S of the
ring buffers) join the combine as plain-JAX partials (or, with :data:`KERNEL_SINKS`, are
attended by the Triton window kernel's program after the ring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kivi_jax import rotation, switches
from kivi_jax.attention_pallas import grouped_queries, score_scale
from kivi_jax.cache_mosaic import MosaicKIVICache
from kivi_jax.checks import check_window
from pallas_kernels.mosaic_layout import kernel_arrays
from pallas_kernels import kivi_mosaic, kivi_window, mosaic_window


def window_partials(qg, cache: MosaicKIVICache, starts=None, scale: float = 1.0):
    """qg [B, Hkv, G, D] float32 (the scores are (q·k)·scale) -> partials (o [B, Hkv, G, D], m, l [B, Hkv, G]) over
    body tokens [m, L) of each row (and >= starts [B], a sliding window's first body token), slot by slot:
    slot j holds token t_j = m + (j - m) mod R, its value in v_res and its key in k_res
    (dequantized there once its block was flushed: the cache's module doc). Products and sums
    over the R slots are elementwise reductions, not dots: a dot over the model's loop-carried
    v_res made XLA:GPU pick a slot-minor layout for it and copy it whole every layer (see
    attention_pallas._window_partials)."""
    r = cache.config.residual_length
    L, mq = cache.body_lengths[:, None], cache._body_quantized_values()[:, None]
    t = mq + (jnp.arange(r)[None, :] - mq) % r  # [B, R]
    valid = t < L if starts is None else (t < L) & (t >= starts[:, None])
    return _slot_partials(qg, cache.k_res[:, :, :r], cache.v_res[:, :, :r], valid, scale)


def sink_partials(qg, cache: MosaicKIVICache, starts=None, scale: float = 1.0):
    """Partials over each row's S sink tokens (0 .. S - 1, held: < L, and >= starts [B], the
    absolute first attended token), plain JAX: a few slots."""
    r, sk = cache.config.residual_length, cache.config.sink_tokens
    s = jnp.arange(sk)[None, :]
    valid = s < cache.lengths[:, None] if starts is None else (s < cache.lengths[:, None]) & (s >= starts[:, None])
    return _slot_partials(qg, cache.k_res[:, :, r:], cache.v_res[:, :, r:], valid, scale)


def _slot_partials(qg, k, v, valid, scale: float = 1.0):
    """Partials of qg [B, Hkv, G, D] over slots k, v [B, Hkv, N, D] where valid [B, N] (scores (q·k)·scale)."""
    s = jnp.sum(qg[:, :, :, None, :] * k[:, :, None].astype(jnp.float32), axis=-1) * scale  # [B, H, G, N]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])  # 0 on invalid slots
    o = jnp.sum(p[..., None] * v[:, :, None].astype(jnp.float32), axis=3)
    return o, jnp.where(jnp.isfinite(m), m, -1e30), jnp.sum(p, axis=-1)


def _merged(parts):
    """One unnormalized partial (o, m, l) from several (flash-decoding's combine)."""
    top = functools.reduce(jnp.maximum, [m for _, m, _ in parts])
    w = [jnp.exp(m - top) for _, m, _ in parts]
    return (sum(o * x[..., None] for (o, _, _), x in zip(parts, w)), top,
            sum(l * x for (_, _, l), x in zip(parts, w)))


def window_kernel_partials(qg, cache: MosaicKIVICache, stack=None, starts=None, sinks=None, scale: float = 1.0):
    """:func:`window_partials` in one Triton launch (:mod:`pallas_kernels.mosaic_window`).
    stack: as :func:`decode_attention`'s, the ring then read in place. sinks: None, or the sink
    bounds (sink_lo, sink_hi) [B] (absolute tokens): the S sinks are attended in the same program
    too. Interpreted off the GPU."""
    ring, layer = (cache, None) if stack is None else stack
    return mosaic_window.window_partials(qg, ring.k_res, ring.v_res, cache.body_lengths,
                                         cache._body_quantized_values(), layer=layer, starts=starts, sinks=sinks,
                                         residual=cache.config.residual_length,
                                         sink_len=0 if sinks is None else cache.config.sink_tokens, scale=scale,
                                         interpret=jax.default_backend() != "gpu")


WINDOW_IMPLS = {"jax": lambda qg, cache, stack, starts=None, sinks=None, scale=1.0: window_partials(qg, cache, starts,
                                                                                                    scale),
                "pallas": window_kernel_partials}
#: decode_attention's window_impl values: WINDOW_IMPLS' partials (combined with the bulk's in XLA)
#: or "pallas_continued" (:func:`pallas_kernels.mosaic_window.window_attention`: the Triton kernel
#: starts from the bulk's partials and normalizes, no combine after it; 0.2 ms slower a 32-layer
#: step at the paper's setting on the H200: its kernel 1.98 vs 1.89 ms and three small fusions
#: around it, results/decode-step-ab-2026-12-02-run49-p330-rare-append.json vs -run48-)
WINDOW_IMPL_NAMES = (*WINDOW_IMPLS, "pallas_continued")
#: decode_attention's window when none is passed; read at trace time (benchmarks A/B it). None:
#: "pallas" on a GPU (the ring read as dense attention reads its cache), else "jax" (off the GPU
#: the Triton kernel would run interpreted)
DEFAULT_WINDOW_IMPL = None


#: whether the Triton window kernel's program also attends the S sinks after the ring
#: (pallas_kernels.kivi_window.sink_step, as the token layout's ring program does), read at trace
#: time; off: their partials in plain JAX, combined with the others'. Off by default: on the H200
#: the paper-setting step (Llama-2-7B shape, batch 96, 32 layers, 4 sinks, rotation) took 10.70 ms
#: with it on against 10.60 off (decode-step-ab-ksinks-masked-run113; 10.68 vs 10.57 in run112,
#: before the sinks' masked loads); a whole call on the paper's rows (batch 96, 330 tokens, 32
#: KV heads) 0.1427 vs 0.1358 ms (decode-attention-extensions-mosaic-sinks-run114). The window
#: kernel's programs each walk their (row, KV head)'s ring in two dependent steps; a third, for
#: 4 slots, adds its latency to every program.
KERNEL_SINKS = False


def window_impl_name(window_impl: str | None = None) -> str:
    """window_impl, else DEFAULT_WINDOW_IMPL, else this backend's default (named error when it is
    not one of WINDOW_IMPL_NAMES)."""
    return switches.resolve("window_impl", window_impl or DEFAULT_WINDOW_IMPL, WINDOW_IMPL_NAMES, gpu="pallas",
                            other="jax")


def decode_attention(q, cache: MosaicKIVICache, *, stack=None, bulk=None, window_impl: str | None = None,
                     window: int | None = None):
    """q [B, Hq, 1, D] -> [B, Hq, 1, D] in q's dtype. stack: None, or (stacked, i) when
    ``cache`` is layer i of ``stacked`` (leaves [L, B, Hkv, ...]): the kernel then reads the
    stores in place (a slice handed to a custom call is a copy). bulk: the partials over the
    quantized tokens, ``bulk(qrows [R, (G,) D], lengths [R], *arrays, row_offset=)`` with qrows
    already scaled by 1/sqrt(D) (the Mosaic kernel's contract), with
    ``starts=`` [R] too under a sliding window (default: the Mosaic kernel, which needs a GPU;
    tests pass a plain-JAX one). window_impl: the newest
    tokens' partials in plain JAX (:func:`window_partials`) or in one Triton launch ("pallas",
    :func:`window_kernel_partials`), then combined with the bulk's; or "pallas_continued"
    (WINDOW_IMPL_NAMES); None: DEFAULT_WINDOW_IMPL. window: attend only a row's newest ``window``
    tokens (Mistral's sliding window; the kernel skips the 256-token steps wholly before them)."""
    window_impl = window_impl_name(window_impl)
    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    if g not in kivi_mosaic.HEADS:
        raise ValueError(f"the Mosaic kernel takes {kivi_mosaic.HEADS} query heads a KV head; got Hq={hq}, Hkv={hkv}")
    c = cache.config
    qg, scale = grouped_queries(q, hkv, c.rotate_keys), score_scale(d)
    # the bulk kernel takes q scaled (it rounds q·s, the key scales folded in, to bf16 once either way)
    rows = (qg * scale).reshape((b * hkv, g, d) if g > 1 else (b * hkv, d))
    bulk = bulk or kivi_mosaic.bulk_partials
    check_window(window)
    # a row's first attended token (None: a window no row can exceed masks nothing), and its
    # first body token (past the S sinks)
    sk = c.sink_tokens
    starts = None if window is None or window >= cache.max_length else jnp.maximum(cache.lengths - window, 0)
    body_starts = None if starts is None else jnp.maximum(starts - sk, 0)
    # (window: the kernel's splits share each row's window steps, not all the capacity's)
    sliding = {} if starts is None else {"starts": jnp.repeat(body_starts, hkv), "window": window}
    if stack is None:
        arrays, offset = cache.kernel_arrays(), 0
    else:
        stacked, layer = stack
        arrays, offset = kernel_arrays(stacked.kn, stacked.kt, stacked.vn, stacked.vt), layer * b * hkv
    ob, mb, lb = (x.reshape(b, hkv, g, *x.shape[2 if g > 1 else 1:])
                  for x in bulk(rows, jnp.repeat(cache._body_quantized_values(), hkv), *arrays, row_offset=offset,
                                **sliding))
    # the sinks in the window kernel's program (bounds in absolute tokens), else plain-JAX partials
    sinks = None
    if sk and window_impl != "jax" and KERNEL_SINKS and kivi_window.sinks_supported(sk, c.residual_length):
        sinks = (jnp.zeros_like(cache.lengths) if starts is None else starts, cache.lengths)
    parts = [(ob, mb, lb)] + ([sink_partials(qg, cache, starts, scale)] if sk and sinks is None else [])
    if window_impl == "pallas_continued":  # the window kernel goes on from the other partials and normalizes
        ring, layer = (cache, None) if stack is None else stack
        out = mosaic_window.window_attention(qg, ring.k_res, ring.v_res, cache.body_lengths,
                                             cache._body_quantized_values(), _merged(parts), layer=layer,
                                             starts=body_starts, sinks=sinks, residual=c.residual_length,
                                             sink_len=0 if sinks is None else sk, scale=scale,
                                             interpret=jax.default_backend() != "gpu")
        return _unrotated(out, c).reshape(b, hq, 1, d).astype(q.dtype)
    o, _, den = _merged(parts + [WINDOW_IMPLS[window_impl](qg, cache, stack, starts=body_starts, sinks=sinks,
                                                           scale=scale)])
    out = o / jnp.where(den > 0, den, 1.0)[..., None]
    return _unrotated(out, c).reshape(b, hq, 1, d).astype(q.dtype)


def _unrotated(out, config):
    """The attention output [B, Hkv, G, D] in the original basis: (p·(V·H))·H^T when values are stored rotated."""
    return rotation.rotate(out, transpose=True) if config.rotate_values else out
