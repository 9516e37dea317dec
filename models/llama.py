"""Flax NNX Llama and Mistral causal LMs over a KV cache that is an argument, never module state.

Shapes: B batch, T tokens in this call, H hidden size, Hq / Hkv query / key-value heads,
D head_dim, I intermediate size, V vocab, L layers.

    logits, cache = model(input_ids, cache)      input_ids [B, T] int32 -> logits [B, T, V] float32

* T > 1 (or any T when ``lengths`` is given) is a prompt (prefill): positions 0..T-1,
  causal full-precision attention over the prompt itself, then ``cache.prefill(k, v,
  lengths)`` *replaces* what the cache held. ``lengths`` [B] marks right-padded rows
  (default: all T tokens are real).
* T == 1 without ``lengths`` is a decode step: the token sits at position
  ``cache.lengths[b]``; layer i does ``cache.append_layer(i, k, v)`` (= ``append`` on its
  cache, writing only the changed slabs in place) then ``decode_attention(q, cache.layer(i))``.
* ``extend=True``: the T tokens continue the cache (a chunked prefill) at positions
  ``cache.lengths[b]`` on: attention over the cache and themselves, then appended in order.
* ``cache=None``: one full causal forward pass (training, scoring), returns ``(logits, None)``.

The cache is a :class:`~models.cache.StackedCache` from :meth:`Llama.init_cache`: one
``DenseCache`` or ``KIVICache`` with a leading layer axis. The model never looks at its
format. The layers' weights are stacked too ([L, ...]) and run with one ``lax.scan``, so a
32-layer model compiles one layer body.

To jit: ``apply, params = functional(model)`` then ``jax.jit(apply, donate_argnames="cache")``
(``nnx.split`` / ``nnx.merge`` underneath), or ``nnx.jit`` on the module.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import kivi_jax
from kivi_jax import matmul as kj_matmul
from kivi_jax import switches
from kivi_jax.checks import check_token_ids, is_int
from models.cache import StackedCache
from models.config import ModelConfig

ATTN_IMPLS = kivi_jax.attention.IMPLS


# ---- pure pieces -------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float):
    """x [..., H] -> [..., H] in x's dtype; statistics in float32 (as transformers does)."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_cos_sin(positions, config: ModelConfig):
    """positions [B, T] int -> cos, sin [B, T, 1, D] float32 (half-split layout: freqs repeated)."""
    inv = jnp.asarray(config.rope_inv_freq())  # [D/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D] rotated by position (rotate-half form); float32 math, x's dtype out."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


RARE_WRITES_MODES = ("layer", "step")
#: where a decode step decides KIVI's rare writes (the key flush, one step in R), read at trace time:
#: "layer": a lax.cond in every layer; "step": once for the step, two conditionals around the
#: layer loop (StackedCache.rare_writes_due); None (the default): "step" on a GPU, "layer"
#: elsewhere (the same numbers bit for bit; "step" compiles the layer loop twice). XLA:GPU reads
#: each conditional's predicate back to the host: on the H200 at the paper's setting "step" took
#: a 32-layer KIVI-2 step from 12.87 to 11.52 ms wall (Mosaic layout; 14.13 -> 13.16 tokens
#: layout; results/decode-step-ab-2026-12-02-run49-p330-rare-append.json). e2e's children read
#: KIVI_RARE_WRITES
RARE_WRITES = os.environ.get("KIVI_RARE_WRITES") or None


def rare_writes_mode() -> str:
    """RARE_WRITES resolved for this backend (named error when it is not a mode)."""
    return switches.resolve("models.llama.RARE_WRITES", RARE_WRITES, RARE_WRITES_MODES, gpu="step", other="layer")


EXTEND_WRITES_MODES = ("after", "in_loop")
#: where a continuation (extend=True) writes each layer's new tokens, read at trace time: "after"
#: the layer loop, every layer's extend at once (StackedCache.extend_all; the loop only reads the
#: cache), or "in_loop" after each layer's attention (StackedCache.extend_layer). XLA copies a
#: stacked buffer that a loop body reads before writing it: on the CPU two copies of every stacked
#: buffer a layer (a dense SmolLM2 cache of 8192 tokens: 1.2 s of a 16-token extend, 0.13 s
#: "after"; results/continuation-cpu-writes-after-loop-2026-12-04). "after" holds the layers' new
#: k, v ([L, B, Hkv, T, D] twice) until the writes. None (the default): "after" off a GPU; on a GPU
#: "in_loop": the two took the same time there (continuation-gpu-run140-kivi2m) and "in_loop" the
#: fewer temporaries (3.2 vs 3.6 GiB for a dense Llama-2-7B-shape extend at 16384 tokens, batch 8,
#: results/extend-memory-run143).
EXTEND_WRITES = os.environ.get("KIVI_EXTEND_WRITES") or None


def extend_writes_mode() -> str:
    """EXTEND_WRITES resolved for this backend (named error when it is not a mode)."""
    return switches.resolve("models.llama.EXTEND_WRITES", EXTEND_WRITES, EXTEND_WRITES_MODES, gpu="in_loop",
                            other="after")


def _layer(p, x, cos, sin, cache, i, *, config: ModelConfig, lengths, attn_impl: str, decode: bool, rare=None,
           active=None, extend: bool = False, defer: bool = False):
    """One decoder layer. p: this layer's weights; x [B, T, H]; cache: the StackedCache (or
    None), of which this layer reads and writes layer ``i`` in place. rare: the step's
    decision on the cache's rare writes, active: the rows that append (``StackedCache.append_layer``).
    extend: the T tokens continue the cache (attention over it and them, then appended in order).
    defer (with extend): the layer's k, v [B, Hkv, T, D] are returned in the cache's place, for the
    caller to write (``StackedCache.extend_all``)."""
    b, t, _ = x.shape
    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    window = config.sliding_window

    # named scopes: the parts of a step a profile attributes time to (benchmarks.common.trace_kernels)
    with jax.named_scope("qkv"):
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q = apply_rope((h @ p["q_proj"]).reshape(b, t, hq, d), cos, sin)
        k = apply_rope((h @ p["k_proj"]).reshape(b, t, hkv, d), cos, sin)
        v = (h @ p["v_proj"]).reshape(b, t, hkv, d)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, heads, T, D]

    if decode:
        with jax.named_scope("cache_append"):
            cache = cache.append_layer(i, k, v, rare=rare, active=active)  # only the new token's slabs are written
        with jax.named_scope("attention"):
            # stack=: the kernel reads the quantized arrays in place (a sliced operand is a copy)
            o = kivi_jax.decode_attention(q, cache.layer(i), impl=attn_impl, window=window, stack=(cache.layers, i))
    elif extend:
        with jax.named_scope("attention"):
            o = kivi_jax.extend_attention(q, k, v, cache.layer(i), lengths, window=window)
        if defer:
            cache = (k, v)
        else:
            with jax.named_scope("cache_append"):  # as if appended one at a time (rows past lengths: none)
                cache = cache.extend_layer(i, k, v, lengths)
    else:
        with jax.named_scope("attention"):
            o = kivi_jax.prefill_attention(q, k, v, lengths, window=window)
        if cache is not None:
            with jax.named_scope("cache_prefill"):
                cache = cache.prefill_layer(i, k, v, lengths)
    with jax.named_scope("o_proj"):
        o = o.transpose(0, 2, 1, 3).reshape(b, t, hq * d).astype(x.dtype)
        x = x + o @ p["o_proj"]

    with jax.named_scope("mlp"):
        h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["gate_proj"]) * (h @ p["up_proj"])) @ p["down_proj"]
    return x, cache


def lm_loss(logits, input_ids, mask=None):
    """Mean next-token cross-entropy. logits [B, T, V] predict input_ids[:, 1:] [B, T-1];
    mask [B, T] (1 = real token) drops padded targets, whatever id they hold (a pad id >= V,
    Hugging Face's -100). Returns a float32 scalar (0 when no target is unmasked)."""
    logits, ids = jnp.asarray(logits), jnp.asarray(input_ids)
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T] of the same B, T; got logits "
                         f"{logits.shape}, input_ids {ids.shape} (logits_at= logits [B, 1, V] have no next tokens)")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids; got dtype {ids.dtype}")
    if mask is not None and jnp.shape(mask) != ids.shape:
        raise ValueError(f"mask must have input_ids' shape {ids.shape} (1 = real token); got {jnp.shape(mask)}")
    tgt = ids[:, 1:].astype(jnp.int32)
    m = jnp.ones(tgt.shape, jnp.float32) if mask is None else jnp.asarray(mask)[:, 1:].astype(jnp.float32)
    live = m != 0
    # a masked target's id is never gathered: an id >= V gathers NaN, and NaN * 0 is NaN
    tgt = jnp.where(live, tgt, 0)
    check_token_ids("input_ids (the unmasked targets)", jnp.where(live, ids[:, 1:], 0), logits.shape[-1])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(live, nll * m, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


# ---- modules ---------------------------------------------------------------------------------
def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """The L decoder layers' weights, stacked: attn_norm, mlp_norm [L, H]; q_proj [L, H, Hq*D];
    k_proj, v_proj [L, H, Hkv*D]; o_proj [L, Hq*D, H]; gate_proj, up_proj [L, H, I];
    down_proj [L, I, H]. Matrices are [in, out] (x @ W)."""

    NAMES = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm", "gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, init_std: float):
        for name, shape in self.shapes(config).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            else:
                value = _normal(rngs, shape, init_std, dtype)
            setattr(self, name, nnx.Param(value))

    @staticmethod
    def shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
        L, H, I = c.num_layers, c.hidden_size, c.intermediate_size
        return dict(
            attn_norm=(L, H), q_proj=(L, H, c.num_heads * c.head_dim), k_proj=(L, H, c.num_kv_heads * c.head_dim),
            v_proj=(L, H, c.num_kv_heads * c.head_dim), o_proj=(L, c.num_heads * c.head_dim, H),
            mlp_norm=(L, H), gate_proj=(L, H, I), up_proj=(L, H, I), down_proj=(L, I, H),
        )

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.NAMES}


class Llama(nnx.Module):
    """Llama causal LM (also any config with ``sliding_window``, which it applies).

    Params: embed [V, H]; layers (:class:`DecoderLayers`); final_norm [H]; lm_head [H, V]
    (None when ``tie_word_embeddings``: logits use embed). ``dtype`` is the weights' and
    activations' dtype; norms, RoPE and softmax run in float32; logits are float32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, init_std: float = 0.02):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig; got {type(config).__name__}")
        if not isinstance(rngs, nnx.Rngs):  # (an int was "'int' object has no attribute 'params'")
            raise TypeError(f"rngs must be an nnx.Rngs, e.g. nnx.Rngs(0); got {type(rngs).__name__} {rngs!r}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"dtype={self.dtype} must be a floating dtype (float32, bfloat16, float16)")
        self.embed = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), init_std, dtype))
        self.layers = DecoderLayers(config, rngs=rngs, dtype=dtype, init_std=init_std)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.lm_head = (None if config.tie_word_embeddings else
                        nnx.Param(_normal(rngs, (config.hidden_size, config.vocab_size), init_std, dtype)))

    # ---- cache -------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, kivi: kivi_jax.KIVIConfig | None = None,
                   dtype=None) -> StackedCache:
        """An empty cache for all layers: a DenseCache (kivi=None) or a KIVICache (kivi a
        KIVIConfig; a MosaicKIVICache with layout="mosaic", or "auto" where
        ``kivi_jax.cache_mosaic.resolve_layout`` picks it for this model), stacked along a leading
        layer axis; leaves are [L, B, Hkv, ...].
        dtype: of the full-precision parts (default: the model's dtype)."""
        c = self.config
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        dtype = self.dtype if dtype is None else dtype
        kw = dict(batch=batch_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, max_length=max_length, dtype=dtype)
        if kivi is None:
            one = kivi_jax.DenseCache.init(**kw)
        elif isinstance(kivi, kivi_jax.KIVIConfig):  # its layout picks the cache class
            kivi = kivi_jax.resolve_layout(kivi, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                                           head_dim=c.head_dim, max_length=max_length, dtype=dtype)
            one = (kivi_jax.MosaicKIVICache if kivi.layout == "mosaic" else kivi_jax.KIVICache).init(kivi, **kw)
        else:
            raise TypeError(f"kivi must be None or a KIVIConfig; got {type(kivi).__name__}")
        return StackedCache.stack(one, c.num_layers)

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids, cache: StackedCache | None = None, *, lengths=None, attn_impl: str = "auto",
                 logits_at=None, matmul_impl: str = "xla", active=None, extend: bool = False):
        """input_ids [B, T] int -> (logits [B, T, V] float32, new cache).

        Prompt (T > 1, or any T when ``lengths`` is given): positions 0..T-1, replaces the
        cache content; lengths [B] = real tokens of right-padded rows (default T); the padding
        after them may hold any id (-100, a pad id >= V): it is never read. Decode
        (T == 1 with a cache and no lengths): one step at position cache.lengths.
        attn_impl goes to ``kivi_jax.decode_attention``.
        logits_at [B] int: only row b's position logits_at[b] goes through the LM head, and
        logits are [B, 1, V] (a prefill that samples from its last token: full-prompt logits
        are B x T x V float32, 0.5 GB per 4096-token row at a 32k vocabulary).
        matmul_impl: "xla" or "pallas": in a decode step, the layers' matrices are read in
        place from the stacked weights by the Pallas kernel (``kivi_jax.matmul``) instead of
        being sliced out of the stack; prefill always uses XLA. On an H200, 32 layers at B=96,
        with the attention kernels: dense 9.2 vs 15.6 ms steps. Not with attn_impl="xla" on a
        dense cache: XLA then copies the whole stacked dense cache every layer (1.2 s steps;
        pallas_kernels/NOTES.md). ``kivi_jax.generate`` passes "pallas" on one GPU.
        active [B] bool (decode steps only; None: every row): the rows whose token is appended
        to the cache; the others' cache rows and lengths are left as they are (their logits
        are computed and meaningless). ``kivi_jax.generate`` passes the rows still running, so
        its final cache holds exactly each row's tokens, ready to be continued.
        extend=True: input_ids continue the cache (a chunked prefill; ``kivi_jax.generate(...,
        cache=)`` passes it): row b's first lengths[b] tokens (default T) at positions
        cache.lengths[b] on attend to the cache as decode steps read it and to each other in full
        precision (``kivi_jax.extend_attention``), then are appended (``StackedCache.extend_layer``:
        a few writes a layer, the state as many appends would leave).
        """
        c = self.config
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [B, T]; got shape {ids.shape} dtype {ids.dtype}")
        rare_mode = rare_writes_mode()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; allowed: {ATTN_IMPLS}")
        if matmul_impl not in kj_matmul.MATMUL_IMPLS:
            raise ValueError(f"matmul_impl={matmul_impl!r}; allowed: {kj_matmul.MATMUL_IMPLS}")
        b, t = ids.shape
        if logits_at is not None:
            logits_at = jnp.asarray(logits_at)
            if logits_at.shape != (b,) or not jnp.issubdtype(logits_at.dtype, jnp.integer):
                raise ValueError(f"logits_at must be an integer array of shape ({b},) (a position per row); "
                                 f"got {logits_at.dtype} array of shape {logits_at.shape}")
            if not isinstance(logits_at, jax.core.Tracer) and not ((logits_at >= 0) & (logits_at < t)).all():
                raise ValueError(f"logits_at={logits_at.tolist()} out of range: each position must be in [0, T={t})")
        if cache is not None:
            if not isinstance(cache, StackedCache):
                raise TypeError(f"cache must be the StackedCache of model.init_cache(); got {type(cache).__name__}")
            if cache.num_layers != c.num_layers or cache.batch_size != b:
                raise ValueError(f"cache holds L={cache.num_layers}, B={cache.batch_size}; "
                                 f"the model has L={c.num_layers} and input_ids B={b}")
        if lengths is not None:  # checked here: inside the layer scan the attention's own check sees a tracer
            lengths = jnp.asarray(lengths)
            if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise ValueError(f"lengths must be an integer array of shape ({b},); got {lengths.dtype} array of "
                                 f"shape {lengths.shape}")
            if not isinstance(lengths, jax.core.Tracer):  # (a length past T masked nothing, a negative one all)
                bad = sorted({int(n) for n in np.asarray(lengths) if not 0 <= n <= t})
                if bad:
                    raise ValueError(f"lengths={bad} out of range: each row's length must be in [0, T={t}]")
        if extend:
            if cache is None:
                raise ValueError("extend=True continues a cache: pass the cache to continue")
            lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        decode = cache is not None and t == 1 and lengths is None
        if active is not None and not decode:
            raise ValueError("active= is for decode steps (T == 1 with a cache and no lengths); a prompt "
                             "writes every row's first lengths[b] tokens")
        check_token_ids("input_ids", ids, c.vocab_size, lengths, active)
        if decode:
            positions = cache.lengths[:, None]
        elif extend:
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        else:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(positions, c)

        if lengths is not None:
            # the padding past a row's lengths[b] is not read and may hold anything (-100, a pad id >= V):
            # gathered, such an id was a NaN row whose keys and values reached the row's real tokens
            # through 0 * NaN in the masked attention (NaN logits, loss and gradients). Read ids are
            # gathered as given (a traced out-of-range one still shows as NaN)
            ids = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], ids, jnp.zeros((), ids.dtype))
        x = jnp.take(self.embed[...], ids, axis=0)

        # the stacked cache is part of the carry, not a scanned input/output: each layer
        # updates its slice in place (scan outputs would be fresh buffers written in full)
        # in place: the scan slices only the norms; the matrices stay stacked and are read
        # as w[i] by the kernel (XLA copies every scanned slice before its GEMM)
        weights = self.layers.arrays()
        in_place = decode and matmul_impl == "pallas"
        scanned = {k: v for k, v in weights.items() if not in_place or k.endswith("norm")}

        # (EXTEND_WRITES "after": the layers' new k, v leave the loop as scan outputs, written after it)
        defer = extend and cache.extends_all and extend_writes_mode() == "after"

        def layers(carry, rare=None):
            def body(carry, xs):
                x, cache = carry
                p, i = xs
                if in_place:
                    p = {**p, **{k: kj_matmul.StackedMatrix(w, i, "pallas") for k, w in weights.items() if k not in p}}
                x, out = _layer(p, x, cos, sin, cache, i, config=c, lengths=lengths, attn_impl=attn_impl,
                                decode=decode, rare=rare, active=active, extend=extend, defer=defer)
                return ((x, cache), out) if defer else ((x, out), None)  # (defer: out is the layer's k, v)

            (x, cache), kv = lax.scan(body, carry, (scanned, jnp.arange(c.num_layers, dtype=jnp.int32)))
            if defer:
                with jax.named_scope("cache_append"):
                    cache = cache.extend_all(*kv, lengths)
            return x, cache

        due = cache.rare_writes_due(active) if decode and rare_mode == "step" else None
        if due is None:  # (RARE_WRITES "layer": each layer's rare writes in a conditional of their own)
            x, cache = layers((x, cache))
        else:  # KIVI's key flush (one step in R): decided once for the step, not in a cond a layer
            # (each conditional makes XLA:GPU read its predicate back to the host, draining the stream).
            # Two conditionals, each with the identity as its false branch: XLA's copy insertion orders
            # a conditional's branches, so a branch that updates the cache in place while a later one
            # still reads it copies it (one cond picking between the two layer loops copied every
            # written stacked buffer each step); an update in the last branch after an identity does not.
            # The second's predicate is the first's own output ("flushed"), so exactly one loop runs. It
            # was not(due), which XLA:GPU's rematerialization (under memory pressure: Llama-2-7B, batch
            # 256 x 4352 tokens) could recompute from the lengths the flush loop had just advanced: both
            # loops ran, every layer appended the token twice and rows stopped a token short (run60/61).
            def skip(carry):
                return carry

            def flush_loop(carry):
                return (*layers(carry, rare=True), jnp.bool_(True))

            def no_flush(carry):
                return (*carry, jnp.bool_(False))

            x, cache, flushed = lax.cond(due, flush_loop, no_flush, (x, cache))
            x, cache = lax.cond(jnp.logical_not(flushed), functools.partial(layers, rare=False), skip, (x, cache))
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, H]
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        if self.lm_head is None:
            logits = jnp.einsum("bth,vh->btv", x, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bth,hv->btv", x, self.lm_head[...], preferred_element_type=jnp.float32)
        return logits, cache


class Mistral(Llama):
    """Mistral causal LM: Llama with ``config.sliding_window`` (applied in prefill and decode)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, init_std: float = 0.02):
        if isinstance(config, ModelConfig) and config.model_type != "mistral":
            raise ValueError(f"Mistral needs model_type='mistral'; got model_type={config.model_type!r}")
        super().__init__(config, rngs=rngs, dtype=dtype, init_std=init_std)


def model_class(config: ModelConfig) -> type[Llama]:
    """Llama or Mistral, by ``config.model_type``."""
    return Mistral if config.model_type == "mistral" else Llama


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStruct leaves (nothing allocated): a target to fill with weights."""
    cls = model_class(config)
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))


def init_random(config: ModelConfig, key=None, dtype=jnp.float32, *, init_std: float = 0.02) -> Llama:
    """A model with random weights (normal(0, init_std) matrices, unit norms), initialized in
    one jitted call on the default device (a Llama-2-7B shape in bf16 for GPU benchmarks).
    key: a jax.random key, or an int seed (as nnx.Rngs takes); None: 0."""
    key = 0 if key is None else key
    if is_int(key):  # (traced into the jitted init, an int seed failed with "Invalid rng value: JitTracer")
        key = jax.random.key(key)
    graphdef, _ = nnx.split(abstract_model(config, dtype))
    return nnx.merge(graphdef, _random_state(key, config, jnp.dtype(dtype), float(init_std)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_state(key, config: ModelConfig, dtype, init_std: float):
    cls = model_class(config)
    return nnx.split(cls(config, rngs=nnx.Rngs(params=key), dtype=dtype, init_std=init_std))[1]


def from_params(config: ModelConfig, params: dict, dtype=jnp.float32) -> Llama:
    """A model from a pure dict of arrays laid out as :func:`param_shapes` says (cast to dtype)."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    expected = param_shapes(config)
    got = {k: tuple(v.shape) for k, v in _flatten(params).items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(f"params do not fit the config: missing {missing}, unexpected {extra}, "
                         f"wrong shape {[(k, got[k], expected[k]) for k in wrong]}")
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b' names -> shapes of the pure parameter dict."""
    out = {"embed": (config.vocab_size, config.hidden_size), "final_norm": (config.hidden_size,)}
    out.update({f"layers/{k}": v for k, v in DecoderLayers.shapes(config).items()})
    if not config.tie_word_embeddings:
        out["lm_head"] = (config.hidden_size, config.vocab_size)
    return out


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_of(model: Llama) -> dict:
    """The model's parameters as a pure nested dict of arrays (see :func:`param_shapes`)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def functional(model: Llama):
    """(apply, params): apply(params, input_ids, cache=None, *, lengths=None, attn_impl="auto", logits_at=None,
    matmul_impl="xla", active=None, extend=False) -> (logits, cache) is a pure function, ready for jax.jit /
    jax.grad; params is an nnx.State. The keywords are the model call's."""
    graphdef, params = nnx.split(model)

    def apply(params, input_ids, cache=None, *, lengths=None, attn_impl: str = "auto", logits_at=None,
              matmul_impl: str = "xla", active=None, extend: bool = False):
        return nnx.merge(graphdef, params)(input_ids, cache, lengths=lengths, attn_impl=attn_impl, logits_at=logits_at,
                                           matmul_impl=matmul_impl, active=active, extend=extend)

    return apply, params
