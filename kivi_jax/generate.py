"""Autoregressive generation over any model with the cache protocol, jitted end to end.

Model protocol (``models/`` implements it; ``tests/toy_model.py`` is a small example)::

    cache = model.init_cache(batch_size, max_length, kivi=None | KIVIConfig[, dtype=...])
    logits, cache = model(input_ids, cache, lengths=lengths[, attn_impl=...][, logits_at=...])  # prefill
    logits, cache = model(token[:, None], cache[, attn_impl=...][, matmul_impl=...][, active=...])  # decode

Prefill: input_ids [B, T] right-padded, row b's prompt is its first ``lengths[b]`` tokens,
the cache is empty; ``generate`` always passes ``lengths=`` here (also when T == 1).
Decode: one token per row at position ``cache.lengths``; no ``lengths`` argument. Logits
are [B, T, vocab]. A model whose call takes ``logits_at`` ([B] positions -> logits
[B, 1, vocab]) gets ``lengths - 1`` in the prefill: only each prompt's last position goes
through the LM head (full-prompt logits are B x T x vocab float32, more than a 2-bit cache).
``dtype=``, ``attn_impl=`` and ``matmul_impl=`` are passed only when the caller sets them
(``matmul_impl`` in decode steps only). A model whose call takes ``active`` ([B] bool) gets
it in every decode step: only those rows' tokens are appended to the cache (the rows still
running; with ``cache=``, the rows whose input goes on), so the final cache holds exactly each
row's tokens and can be continued.
The cache is an opaque pytree (a tuple of per-layer caches, or a stacked one). A cache with
``write_rows(start, sub) -> cache`` (rows start.. replaced by the smaller cache ``sub``, as
``models.StackedCache`` has) gets its prefill in slices of ``prefill_rows`` rows.

How it runs:

* ``generate``: one jitted prefill (it also creates the cache, so no empty cache is ever
  copied in) that samples the first new token, then one jitted ``lax.while_loop`` over the
  decode steps with the loop state -- cache included -- donated, so buffers are updated in
  place and no token goes back to the host until the end.
* The prefill's activations grow with B x T (about 0.25 MB per prompt token for a
  Llama-2-7B shape on an H200: 1 GB per 4096-token row, twice a 2-bit cache row), so
  long prompts are prefilled ``prefill_rows`` rows at a time (default: as many as fit in
  ``PREFILL_TOKENS`` tokens), each slice written into the full cache in place. Rows do
  not interact, so the tokens are those of one whole-batch call. Only for prompts of at least
  half the cache: each slice also holds its own cache rows.
* ``generate_stream``: the same prefill and the same decode step, but the step is called
  from Python once per token so tokens can be shown as they come. Same tokens as
  ``generate`` (greedy and seeded sampling alike).
* ``mesh=``: parameters, prompts and the cache are placed with NamedShardings
  (:mod:`kivi_jax.sharding`); the cache is pinned with ``with_sharding_constraint`` after
  the prefill and in every decode step, so the loop carry keeps its sharding; the jitted
  functions are traced inside ``sharding.use_mesh`` so the Pallas kernel runs under
  ``shard_map``. Without a mesh nothing changes.
* Flax NNX models are split once per call (``nnx.split``) and merged inside the jitted
  functions; the graphdef is a static (hashable) argument. The jitted functions live at
  module level, so repeated calls with the same shapes and static settings reuse the
  compiled code (``TRACE_COUNTS`` counts traces; the tests check it does not grow).

Stopping, per row: after its EOS token (which is kept and counted), after
``max_new_tokens``, or when the cache is full (``max_length`` tokens held: the row keeps the
token computed from a full cache but cannot append it). A row whose cache reports
``overflow`` (a write was refused) stops without emitting the token computed from it.
Rows that stopped keep being fed token 0 while others run, and the cache never writes past its
capacity (a full row's append is refused by the cache itself). A model that takes ``active``
appends nothing for them; with one that does not, their slots in the final cache hold that
filler past their real tokens.

Multi-turn: ``generate(model, next_ids, cache=out.cache, ...)`` goes on from a returned cache
(``_feed``: the new tokens in one ``model(ids, cache, lengths=, extend=True)`` call where the
model takes ``extend``, else through decode steps; then the same decode loop).

Sampling: see :mod:`kivi_jax.sampling`. Row b's token at step s (s = 0 is the token after
the prompt) is drawn with ``fold_in(row_key[b], s)``, with ``row_key[b] = fold_in(key, b)``
for a single ``key`` (or ``key[b]`` when a batch of B keys is given). A row's draws do not
depend on the rest of the batch, which is what makes ``jax.vmap`` over single requests give
the batched tokens.

``jax.vmap`` over single requests is the same computation as the batched path::

    def one(ids, n):                     # ids [T], n: this request's prompt length
        out = generate(model, ids[None], lengths=n[None], max_new_tokens=16)
        return out.tokens[0], out.lengths[0]

    tokens, num = jax.vmap(one)(input_ids, lengths)   # == generate(model, input_ids, lengths=lengths, ...)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from kivi_jax import sampling, sharding
from kivi_jax.checks import check_token_ids, is_int as _is_int
from kivi_jax.config import KIVIConfig

#: Default prefill slice: as many rows as fit in this many prompt tokens (activations of a
#: Llama-2-7B-shaped prefill are ~0.25 MB per token: ~2 GB at 8192 tokens).
PREFILL_TOKENS = 8192

#: How many times each jitted function was traced (incremented at trace time only).
TRACE_COUNTS: collections.Counter = collections.Counter()


class GenerateOutput(NamedTuple):
    """tokens [B, max_new_tokens] int32: the new tokens of row b are ``tokens[b, :lengths[b]]``;
    the rest of the row is ``pad_id``. lengths [B] int32: new tokens per row, EOS included.
    cache: the final cache pytree (e.g. for memory reporting)."""

    tokens: jax.Array
    lengths: jax.Array
    cache: Any


class StreamStep(NamedTuple):
    """One step of :func:`generate_stream` (host NumPy arrays).

    tokens [B] int32: the token each row emitted at this step, ``pad_id`` where none;
    emitted [B] bool: which rows emitted one (a row stops emitting once it has stopped)."""

    tokens: np.ndarray
    emitted: np.ndarray


# ---- static / traced settings ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything jit specializes on besides shapes and the model's graphdef."""

    max_new_tokens: int
    max_length: int
    kivi: KIVIConfig | None
    cache_dtype: Any  # a numpy dtype, or None for the model's default
    attn_impl: str | None
    matmul_impl: str | None
    sampler: sampling.SamplingConfig
    mesh: Any = None  # a jax.sharding.Mesh (Auto axes) or None: one device
    rules: Any = None  # sharding.ShardingRules used with the mesh
    logits_at: bool = False  # the model's call takes logits_at= (prefill: last positions only)
    prefill_rows: int | None = None  # rows per prefill call (None: the whole batch at once)
    active: bool = False  # the model's call takes active= (decode: only running rows append)
    extend: bool = False  # the model's call takes extend= (a continued cache's input in one call)
    prefill_chunk: int | None = None  # prompt tokens per model call (None: the whole prompt in one call)


class _Knobs(NamedTuple):
    """Traced settings: changing their values does not recompile."""

    temperature: jax.Array  # () float32
    top_p_rest: jax.Array  # () float32: 1 - top_p, taken in float64 (sampling.top_p_rest)
    eos_ids: jax.Array  # [E] int32, padded with -1 to a power of two >= 8 (one shape for all EOS lists)
    pad_id: jax.Array  # () int32


class _Carry(NamedTuple):
    """Decode-loop state. All rows advance together; ``step`` is the next output column."""

    cache: Any
    token: jax.Array  # [B] int32: the last emitted token, fed to the next step (0 once stopped)
    tokens: jax.Array  # [B, N] int32 output buffer
    num_new: jax.Array  # [B] int32 tokens emitted so far
    cache_len: jax.Array  # [B] int32 real tokens in the cache (our own count)
    done: jax.Array  # [B] bool
    step: jax.Array  # () int32


@dataclasses.dataclass(frozen=True)
class _StaticModel:
    """A model that is not an NNX module: passed to jit as a static (hashable) callable."""

    fn: Any


def _split(model):
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    return _StaticModel(model), None


def _merge(graphdef, state):
    if isinstance(graphdef, _StaticModel):
        return graphdef.fn
    return nnx.merge(graphdef, state)


def _call_model(model, ids, cache, cfg: _Config, lengths=None, logits_at=None, active=None, extend=False):
    kw = {} if cfg.attn_impl is None else {"attn_impl": cfg.attn_impl}
    if cfg.matmul_impl is not None and lengths is None:  # a decode step
        kw["matmul_impl"] = cfg.matmul_impl
    if cfg.active and active is not None:  # (a decode step: the rows whose token the cache appends)
        kw["active"] = active
    if extend:  # (tokens that continue the cache: cfg.extend)
        kw["extend"] = True
    if lengths is not None:
        kw["lengths"] = lengths
    if logits_at is not None:
        kw["logits_at"] = logits_at
    logits, cache = model(ids, cache, **kw)
    b, t = ids.shape
    t = 1 if logits_at is not None else t
    if logits.ndim != 3 or logits.shape[:2] != (b, t):
        raise ValueError(f"model returned logits of shape {logits.shape}; expected [B={b}, T={t}, vocab]")
    return logits, cache


def _takes(model, name: str) -> bool:
    """Whether the model's call accepts keyword ``name`` (an optional part of the protocol)."""
    fn = model.__call__ if isinstance(model, nnx.Module) else model
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: use the required protocol only
        return False


def _default_matmul_impl(model, mesh) -> str | None:
    """matmul_impl=None: "pallas" on one GPU when the model takes the keyword, else the
    model's default. Measured on the H200 (32 Llama-2-7B layers, B=96, 498 slots), with the
    attention kernels reading the stacked cache in place: dense steps 9.2 ms with the in-place
    stacked matmul vs 15.6 ms with XLA's, which copies each layer's matrices out of the stack
    (decode-step-ab-2026-11-30-cb); KIVI-2 19.0 vs 23.8 ms (-smoke)."""
    if mesh is not None or jax.default_backend() != "gpu" or not _takes(model, "matmul_impl"):
        return None
    return "pallas"


def _cache_objects(cache):
    """The cache objects in a cache pytree: anything with ``.overflow`` and ``.lengths``."""
    is_cache = lambda x: hasattr(x, "overflow") and hasattr(x, "lengths")  # noqa: E731
    return [x for x in jax.tree_util.tree_leaves(cache, is_leaf=is_cache) if is_cache(x)]


def _cache_lengths(cache, batch: int):
    """[B] int32: the tokens each row of the cache holds (its first cache object's lengths; a
    stacked one's layer 0: every layer holds the same)."""
    objs = [o for o in _cache_objects(cache) if getattr(o.lengths, "ndim", 0) >= 1 and o.lengths.shape[-1] == batch]
    if not objs:
        raise ValueError(f"cache has no object with per-row lengths [..., B={batch}] (a cache made by "
                         f"model.init_cache, or returned by generate, for a batch of {batch})")
    return objs[0].lengths.reshape(-1, batch)[0].astype(jnp.int32)


def _cache_overflow(cache, batch: int):
    """[B] bool: any cache object in the pytree (anything with ``.overflow`` and
    ``.lengths``) flagged a refused write for the row; None if no such object is found.
    ``overflow`` may carry leading axes (a stacked per-layer cache): batch is its last axis."""
    flags = [o.overflow for o in _cache_objects(cache)]
    flags = [f for f in flags if getattr(f, "ndim", 0) >= 1 and f.shape[-1] == batch]
    if not flags:
        return None
    return functools.reduce(jnp.logical_or, [jnp.any(f.reshape(-1, batch), axis=0) for f in flags])


def _step_keys(keys, step):
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def _emit(c: _Carry, tok, ok, knobs: _Knobs, cfg: _Config) -> _Carry:
    """Writes tok [B] at column c.step for rows with ok; updates counts and stop flags."""
    n = cfg.max_new_tokens
    tok = tok.astype(jnp.int32)
    col = jnp.arange(n, dtype=jnp.int32)[None, :] == c.step  # no dynamic_update_slice: no clamping
    tokens = jnp.where(col & ok[:, None], tok[:, None], c.tokens)
    num_new = c.num_new + ok.astype(jnp.int32)
    is_eos = jnp.any(tok[:, None] == knobs.eos_ids[None, :], axis=1)
    done = c.done | ~ok | (ok & is_eos) | (num_new >= n) | (c.cache_len >= cfg.max_length)
    return c._replace(token=jnp.where(done, 0, tok), tokens=tokens, num_new=num_new, done=done, step=c.step + 1)


def _sample(logits, keys, step, knobs: _Knobs, cfg: _Config):
    keys = keys if cfg.sampler.greedy else _step_keys(keys, step)
    return sampling.sample(logits, keys, temperature=knobs.temperature, rest=knobs.top_p_rest, cfg=cfg.sampler)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg",))
def _prefill(graphdef, state, input_ids, lengths, keys, knobs: _Knobs, *, cfg: _Config) -> _Carry:
    """Creates the cache, runs the prompt, samples the first new token (column 0)."""
    TRACE_COUNTS["prefill"] += 1
    model = _merge(graphdef, state)
    b, _ = input_ids.shape
    if cfg.prefill_rows is None:  # _resolve_prefill_rows: None unless fewer rows than B
        last, cache = _prefill_batch(model, input_ids, lengths, cfg)
    else:
        last, cache = _prefill_in_slices(model, input_ids, lengths, cfg.prefill_rows, cfg)
    return _first_token(cache, last, lengths, keys, knobs, cfg)


def _first_token(cache, last, cache_len, keys, knobs: _Knobs, cfg: _Config, fed=None) -> _Carry:
    """The carry after a prompt: column 0 sampled from last [B, V], the logits of each row's
    last prompt token; cache_len [B]: the rows' real tokens in the cache. fed [B] bool (a
    continuation): the rows that took tokens; the others emit nothing and are done."""
    b = cache_len.shape[0]
    cache = sharding.constrain_cache(cache, cfg.mesh, cfg.rules)
    overflow = _cache_overflow(cache, b)
    ok = jnp.ones((b,), bool) if overflow is None else ~overflow
    if fed is not None:
        ok = ok & fed
    c = _Carry(cache=cache, token=jnp.zeros((b,), jnp.int32),
               tokens=jnp.full((b, cfg.max_new_tokens), knobs.pad_id, jnp.int32),
               num_new=jnp.zeros((b,), jnp.int32), cache_len=cache_len, done=jnp.zeros((b,), bool),
               step=jnp.zeros((), jnp.int32))
    return _emit(c, _sample(last, keys, c.step, knobs, cfg), ok, knobs, cfg)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg", "treedef"), donate_argnames=("buffers",))
def _feed(graphdef, state, buffers, counters, input_ids, lengths, keys, knobs: _Knobs, last=None, fed=None, *,
          cfg: _Config, treedef) -> _Carry:
    """A prompt that continues a cache (its buffers donated), row b's first lengths[b] tokens at
    its positions cache.lengths[b] on; then column 0 is sampled from the logits of each row's
    last token. A model that takes ``extend`` gets them in one call (a chunked prefill: they
    attend to the cache and to each other, then are appended in order); otherwise they go
    through decode steps one by one (a row past its length appends nothing). last [B, V]: the
    last chunk of a prompt fed in chunks (:func:`_feed_chunks`): the logits of rows whose
    tokens ended in an earlier chunk (lengths[b] == 0 here). fed [B] bool: the rows that took
    any tokens (default lengths > 0); a row that took none sits the call out (emits nothing)."""
    TRACE_COUNTS["feed"] += 1
    fed = lengths > 0 if fed is None else fed
    model = _merge(graphdef, state)
    cache = sharding.constrain_cache(_join_carry(buffers, counters, treedef), cfg.mesh, cfg.rules)
    held = _cache_lengths(cache, input_ids.shape[0])
    if cfg.extend:
        cache, last = _extend(model, cache, input_ids, lengths, last, cfg)
        return _first_token(cache, last, held + lengths, keys, knobs, cfg, fed)

    def step(i, state):
        cache, last = state
        logits, cache = _call_model(model, lax.dynamic_index_in_dim(input_ids, i, 1), cache, cfg,
                                    active=i < lengths)
        cache = sharding.constrain_cache(cache, cfg.mesh, cfg.rules)
        return cache, jnp.where((i == lengths - 1)[:, None], logits[:, -1], last)

    shape = jax.eval_shape(lambda c: _call_model(model, input_ids[:, :1], c, cfg, active=lengths > 0)[0], cache)
    init = (cache, jnp.zeros((shape.shape[0], shape.shape[2]), shape.dtype))
    cache, last = lax.fori_loop(0, jnp.max(lengths), step, init)
    return _first_token(cache, last, held + lengths, keys, knobs, cfg, fed)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg", "treedef"), donate_argnames=("buffers",))
def _feed_chunk(graphdef, state, buffers, counters, input_ids, lengths, last=None, *, cfg: _Config, treedef):
    """A chunk of a prompt fed in chunks, all but the last (:func:`_feed_chunks`): -> (the
    cache, [B, V] logits of each row's last token so far)."""
    TRACE_COUNTS["feed_chunk"] += 1
    cache = sharding.constrain_cache(_join_carry(buffers, counters, treedef), cfg.mesh, cfg.rules)
    cache, last = _extend(_merge(graphdef, state), cache, input_ids, lengths, last, cfg)
    return sharding.constrain_cache(cache, cfg.mesh, cfg.rules), last


def _extend(model, cache, input_ids, lengths, last, cfg: _Config):
    """The model's extend call: (the cache, [B, V] logits of each row's last token; a row with
    no tokens here, lengths[b] == 0, keeps last[b])."""
    at = jnp.maximum(lengths, 1)  # (a row with no tokens: position 0's logits, not used)
    logits, cache = _call_model(model, input_ids, cache, cfg, lengths=lengths, logits_at=_logits_at(at, cfg),
                                extend=True)
    out = _last_logits(logits, at, cfg)
    return cache, out if last is None else jnp.where((lengths > 0)[:, None], out, last)


def _feed_chunks(graphdef, state, cache, input_ids, lengths, keys, knobs, cfg: _Config) -> _Carry:
    """A prompt fed ``cfg.prefill_chunk`` tokens a model call (a chunked prefill): chunk i is
    columns [i c, (i + 1) c) of input_ids (the last padded), row b's part of it the first
    clip(lengths[b] - i c, 0, c) tokens; each chunk attends to the cache as the chunks before
    it left it. All chunks have one shape, so the same three programs (first, middle, last
    chunk) serve any prompt length."""
    c = cfg.prefill_chunk
    n = -(-input_ids.shape[1] // c)
    ids = jnp.pad(input_ids, ((0, 0), (0, n * c - input_ids.shape[1])))
    last = None
    for i in range(n):
        chunk, lens = ids[:, i * c:(i + 1) * c], jnp.clip(lengths - i * c, 0, c)
        buffers, counters, treedef = _split_carry(cache, input_ids)
        if i == n - 1:
            return _feed(graphdef, state, buffers, counters, chunk, lens, keys, knobs, last, lengths > 0, cfg=cfg,
                         treedef=treedef)
        cache, last = _feed_chunk(graphdef, state, buffers, counters, chunk, lens, last, cfg=cfg, treedef=treedef)


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=("cfg",))
def _empty_cache(graphdef, state, b: int, *, cfg: _Config):
    """A new cache for b rows holding nothing (a chunked prefill's start)."""
    return sharding.constrain_cache(_new_cache(_merge(graphdef, state), b, cfg), cfg.mesh, cfg.rules)


def _new_cache(model, b: int, cfg: _Config):
    kw = {} if cfg.cache_dtype is None else {"dtype": cfg.cache_dtype}
    return model.init_cache(b, cfg.max_length, kivi=cfg.kivi, **kw)


def _prefill_batch(model, input_ids, lengths, cfg: _Config):
    """input_ids [b, T] -> (logits of each row's last prompt token [b, V], a new b-row cache)."""
    cache = sharding.constrain_cache(_new_cache(model, input_ids.shape[0], cfg), cfg.mesh, cfg.rules)
    logits, cache = _call_model(model, input_ids, cache, cfg, lengths=lengths, logits_at=_logits_at(lengths, cfg))
    return _last_logits(logits, lengths, cfg), cache


def _logits_at(lengths, cfg: _Config):
    """Each row's last prompt position, where the model's LM head can run on those only."""
    return lengths - 1 if cfg.logits_at else None


def _last_logits(logits, lengths, cfg: _Config):
    """[B, V]: the logits of each row's last prompt token."""
    return logits[:, 0] if cfg.logits_at else jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _prefill_in_slices(model, input_ids, lengths, rows: int, cfg: _Config):
    """_prefill_batch over slices of ``rows`` rows (a lax.fori_loop), each written into the
    full cache in place: peak activations are those of ``rows`` rows. The last slice starts
    at B - rows, so it may redo rows of the one before; they come out the same."""
    b = input_ids.shape[0]
    starts = jnp.asarray([min(i * rows, b - rows) for i in range(-(-b // rows))], jnp.int32)
    take = functools.partial(lax.dynamic_slice_in_dim, slice_size=rows, axis=0)
    last = jax.eval_shape(lambda ids, lens: _prefill_batch(model, ids, lens, cfg)[0], input_ids[:rows], lengths[:rows])

    def body(i, state):
        last, cache = state
        l_i, sub = _prefill_batch(model, take(input_ids, starts[i]), take(lengths, starts[i]), cfg)
        return lax.dynamic_update_slice_in_dim(last, l_i, starts[i], axis=0), cache.write_rows(starts[i], sub)

    init = (jnp.zeros((b,) + last.shape[1:], last.dtype), _new_cache(model, b, cfg))
    return lax.fori_loop(0, len(starts), body, init)


def _decode_body(model, c: _Carry, keys, knobs: _Knobs, cfg: _Config) -> _Carry:
    """One decode step for every row (stopped rows are fed token 0 and emit nothing)."""
    b = c.token.shape[0]
    active = ~c.done
    logits, cache = _call_model(model, c.token[:, None], sharding.constrain_cache(c.cache, cfg.mesh, cfg.rules), cfg,
                                active=active)  # (a stopped row's filler token is not appended)
    cache = sharding.constrain_cache(cache, cfg.mesh, cfg.rules)  # the loop carry keeps its sharding
    overflow = _cache_overflow(cache, b)
    ok = active if overflow is None else active & ~overflow
    tok = _sample(logits[:, -1], keys, c.step, knobs, cfg)
    c = c._replace(cache=cache, cache_len=c.cache_len + active.astype(jnp.int32))
    return _emit(c, tok, ok, knobs, cfg)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg",))
def _decode_probe(graphdef, state, token, cache, *, cfg: _Config):
    """One decode step's logits on ``cache`` (token [B, 1]): only ever traced, see _prepare."""
    return _call_model(_merge(graphdef, state), token, cache, cfg, active=jnp.ones(token.shape[:1], bool))[0]


# The carry's buffers are donated (the cache is updated in place); its per-row counters are not.
# Under jax.vmap a counter that is equal across the requests (every prompt of one length, the
# scalar step) comes in unbatched and goes out batched, so its donated buffer could not be reused
# and jax warned "Some donated buffers were not usable". The counters are a few ints a row.
_COUNTERS = ("token", "num_new", "cache_len", "done", "step", "lengths", "overflow")


def _is_counter(path) -> bool:
    """A carry leaf named by _COUNTERS: a _Carry field, or a cache's ``lengths`` / ``overflow``."""
    return any(getattr(k, "name", None) in _COUNTERS for k in path)


def _split_carry(carry: _Carry, *inputs):
    """carry -> (buffers, counters, treedef): two lists of the flat leaves, each None where the
    other holds it (None is an empty pytree: jit passes it through). Under an eager
    transformation (the leaves that depend on its inputs are tracers, or one of ``inputs`` is) a
    leaf that is a plain array depends on none of them, e.g. KIVI's key stores after prompts
    shorter than R, or a new empty cache: under jax.vmap it comes in unbatched and goes out
    batched, so it is passed, not donated."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(carry)
    traced = any(isinstance(x, jax.core.Tracer) for x in [x for _, x in flat] + list(inputs))
    leaves = [(x, _is_counter(path) or (traced and not isinstance(x, jax.core.Tracer))) for path, x in flat]
    return [None if c else x for x, c in leaves], [x if c else None for x, c in leaves], treedef


def _join_carry(buffers, counters, treedef) -> _Carry:
    return jax.tree_util.tree_unflatten(treedef, [c if b is None else b for b, c in zip(buffers, counters)])


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg", "treedef"), donate_argnames=("buffers",))
def _decode_loop(graphdef, state, buffers, counters, keys, knobs: _Knobs, *, cfg: _Config, treedef) -> _Carry:
    """All remaining decode steps in one lax.while_loop."""
    TRACE_COUNTS["decode_loop"] += 1
    model = _merge(graphdef, state)
    return lax.while_loop(lambda c: (c.step < cfg.max_new_tokens) & ~jnp.all(c.done),
                          lambda c: _decode_body(model, c, keys, knobs, cfg), _join_carry(buffers, counters, treedef))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg", "treedef"), donate_argnames=("buffers",))
def _decode_step(graphdef, state, buffers, counters, keys, knobs: _Knobs, *, cfg: _Config, treedef) -> _Carry:
    """One decode step (streaming)."""
    TRACE_COUNTS["decode_step"] += 1
    return _decode_body(_merge(graphdef, state), _join_carry(buffers, counters, treedef), keys, knobs, cfg)


def _run(fn, graphdef, state, carry: _Carry, keys, knobs, cfg, *, lower: bool = False):
    """fn (_decode_loop or _decode_step) on the carry; lower=True: its jax Lowered instead (the
    program generate runs, for HLO checks and benchmarks)."""
    buffers, counters, treedef = _split_carry(carry)
    with _on_mesh(cfg):
        return (fn.lower if lower else fn)(graphdef, state, buffers, counters, keys, knobs, cfg=cfg, treedef=treedef)


def _on_mesh(cfg: _Config):
    """The mesh context the jitted functions are traced and run in (kernels shard over it)."""
    return contextlib.nullcontext() if cfg.mesh is None else sharding.use_mesh(cfg.mesh, cfg.rules)


def _run_prompt(graphdef, state, ids, lens, keys, knobs, cfg: _Config, cache=None) -> _Carry:
    """The prompt's carry: a prefill into a new cache, or fed into ``cache`` (donated); with
    ``prefill_chunk`` shorter than the prompt, in chunks (into a new empty cache, or ``cache``)."""
    with _on_mesh(cfg):
        if cfg.prefill_chunk is not None and cfg.prefill_chunk < ids.shape[1]:
            if cache is None:
                cache = _empty_cache(graphdef, state, ids.shape[0], cfg=cfg)
            return _feed_chunks(graphdef, state, cache, ids, lens, keys, knobs, cfg)
        if cache is None:
            return _prefill(graphdef, state, ids, lens, keys, knobs, cfg=cfg)
        buffers, counters, treedef = _split_carry(cache)
        return _feed(graphdef, state, buffers, counters, ids, lens, keys, knobs, cfg=cfg, treedef=treedef)


# ---- argument checks ------------------------------------------------------------------------

def _eos_slots(n: int) -> int:
    """EOS ids are padded (with -1, never a token) to a power of two >= 8: one compiled shape."""
    return max(8, 1 << max(n - 1, 0).bit_length())


def _concrete(x):
    """x as a NumPy array, or None when it is a tracer (inside jit / vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _vocab_size(model) -> int | None:
    """The model's vocabulary size where it says (``config.vocab_size``, ``vocab_size`` or
    ``vocab``, as models/ and tests/toy_model.py do), else None (nothing to check against)."""
    for v in (getattr(getattr(model, "config", None), "vocab_size", None), getattr(model, "vocab_size", None),
              getattr(model, "vocab", None)):
        if _is_int(v) and v > 0:
            return int(v)
    return None


def _check_int32(name: str, x) -> None:
    """Concrete integers that fit int32 (what generate computes in): a NumPy int64 id or length
    past it would wrap on conversion (2**32 + 5 -> 5) before any range check saw it."""
    x = _concrete(x)
    if x is not None and np.issubdtype(x.dtype, np.integer) and x.size:
        bad = x[(x < -2**31) | (x >= 2**31)]
        if bad.size:
            raise ValueError(f"{name} hold {bad.size} value(s) outside int32, e.g. {bad[:3].tolist()}")


def _as_array(name: str, x, allowed: str):
    """x (input_ids or lengths) as a jax array, its concrete integers checked to fit int32. What
    is not an array of numbers (a ragged list, a None in a list, strings) is a ValueError naming
    ``name`` and ``allowed``: NumPy's and jax's own errors there ("inhomogeneous shape", "None
    is not a valid value for jnp.array") named no parameter."""
    if not isinstance(x, (jax.Array, jax.core.Tracer)):
        try:
            x = np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            pass  # (a list holding traced values, e.g. lengths=[n] under vmap: jnp.asarray stacks them)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be {allowed}; got a {type(x).__name__} that is not one ({e})") from None
        if isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be {allowed}; got {x.dtype} array of shape {x.shape}")
    _check_int32(name, x)
    return jnp.asarray(x)


def _check_token_ids(model, input_ids, lengths, eos) -> None:
    """Prompt tokens (each row's first lengths[b]; the padding after them is never read) and EOS
    ids inside the model's vocabulary: an embedding lookup of an id outside it is clamped by
    XLA's gather, a silent wrong answer. Skipped for traced ids or lengths, or an unknown vocab."""
    vocab = _vocab_size(model)
    if vocab is None:
        return
    ids, lens = _concrete(input_ids), _concrete(lengths)
    if ids is not None and lens is not None:
        check_token_ids("input_ids (within the prompts' lengths)", ids, vocab, lens)
    if any(e >= vocab for e in eos):
        raise ValueError(f"eos_id={[e for e in eos if e >= vocab]} outside the model's vocabulary [0, vocab_size={vocab})")


def _cache_max_length(cache) -> int:
    """A continued cache's capacity: its (first) cache object's static ``max_length``."""
    for o in _cache_objects(cache):
        if _is_int(getattr(o, "max_length", None)):
            return int(o.max_length)
    raise ValueError("cache has no max_length: pass a cache made by model.init_cache or returned by generate")


def _check_continuation(model, cache, input_ids, lengths, max_length, **unset):
    """generate(cache=...): the model appends selected rows (active=), the cache fits the batch
    and has room for each row's new tokens; settings that make a new cache are left unset."""
    if not _cache_objects(cache):
        raise ValueError(f"cache={type(cache).__name__} object is not a cache: pass one made by model.init_cache "
                         f"or returned by generate (GenerateOutput.cache)")
    if any(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
           for x in jax.tree_util.tree_leaves(cache)):
        raise ValueError("cache= holds deleted buffers: it was donated to an earlier generate call (which reused "
                         "them in place); continue from that call's returned cache (its .cache)")
    if not _takes(model, "active"):
        raise ValueError("cache= needs a model whose decode call takes active= (the rows that append; the "
                         "models in models/ do): without it, rows could not feed prompts of different lengths")
    for name, value in unset.items():
        if value is not None:
            raise ValueError(f"{name}={value!r} must be None with cache=: the cache given decides it")
    b = input_ids.shape[0]
    held, cap = _concrete(_cache_lengths(cache, b)), _cache_max_length(cache)
    if max_length is not None and max_length != cap:
        raise ValueError(f"max_length={max_length!r} differs from the cache's capacity {cap}; leave it None")
    overflow, lens = _concrete(_cache_overflow(cache, b)), _concrete(lengths)
    if overflow is not None and overflow.any():
        raise ValueError(f"cache rows {np.flatnonzero(overflow).tolist()} have overflow set (a write was refused: "
                         f"their content is incomplete); continue from a cache whose rows all fit")
    if held is not None and lens is not None and (held + lens > cap).any():
        rows = np.flatnonzero(held + lens > cap).tolist()
        raise ValueError(f"input_ids do not fit the cache: rows {rows} hold {held[rows].tolist()} of "
                         f"max_length={cap} tokens and add {lens[rows].tolist()}; start a new cache with a larger "
                         f"max_length")
    return cap


def _prepare(model, input_ids, *, max_new_tokens, kivi, lengths, temperature, top_k, top_p, eos_id, key,
             pad_id, max_length, cache_dtype, attn_impl, mesh=None, rules=None, prefill_rows=None,
             matmul_impl=None, cache=None, prefill_chunk=None):
    """Validates eagerly (ValueError naming parameter, value and what is allowed)."""
    # (< 2**31: generate counts tokens in int32; a larger count failed deep in jit with an OverflowError)
    if not _is_int(max_new_tokens) or not 1 <= max_new_tokens < 2**31:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1 (and < 2**31)")
    sampler = sampling.check_sampling(temperature, top_k, top_p)
    if kivi is not None and not isinstance(kivi, KIVIConfig):
        raise ValueError(f"kivi={kivi!r} must be None (dense cache) or a KIVIConfig")
    if not _is_int(pad_id) or not -2**31 <= pad_id < 2**31:
        raise ValueError(f"pad_id={pad_id!r} must be an int32 integer (e.g. 0, or -1 to mark 'no token')")
    if attn_impl is not None and not isinstance(attn_impl, str):
        raise ValueError(f"attn_impl={attn_impl!r} must be None (the model's default) or a string")
    if matmul_impl is not None and not isinstance(matmul_impl, str):
        raise ValueError(f"matmul_impl={matmul_impl!r} must be None (the model's default) or a string")
    if cache_dtype is not None:
        cache_dtype = jnp.dtype(cache_dtype)
        if not jnp.issubdtype(cache_dtype, jnp.floating):
            raise ValueError(f"cache_dtype={cache_dtype} must be a floating dtype (or None for the model's default)")

    input_ids = _as_array("input_ids", input_ids, "an integer array [B, T] with B, T >= 1")
    # (B >= 1 here too: an empty batch was refused later as the cache's "batch=0", not as input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer) or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be an integer array [B, T] with B, T >= 1; got {input_ids.dtype} "
                         f"array of shape {input_ids.shape}")
    input_ids = input_ids.astype(jnp.int32)
    b, t = input_ids.shape
    if cache is None and max_length is None:
        max_length = t + max_new_tokens
        if max_length >= 2**31:
            raise ValueError(f"max_new_tokens={max_new_tokens} with T={t}: the default max_length=T + max_new_tokens "
                             f"= {max_length} is past int32 (positions are int32); pass a smaller max_new_tokens")
    # (< 2**31: cache positions are int32; a larger one failed deep in jit with an OverflowError)
    if max_length is not None and (not _is_int(max_length) or not 1 <= max_length < 2**31):
        raise ValueError(f"max_length={max_length!r} must be an integer >= 1 (and < 2**31)")
    if cache is None and t > max_length:
        raise ValueError(f"max_length={max_length} is shorter than the prompt: input_ids has T={t} tokens "
                         f"(max_length must be >= T)")

    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    else:
        lengths = _as_array("lengths", lengths, f"an integer array of shape ({b},)")
        if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an integer array of shape ({b},); got {lengths.dtype} "
                             f"array of shape {lengths.shape}")
        concrete = _concrete(lengths)
        lo = 0 if cache is not None else 1  # (continuing a cache, a row may sit the call out: 0 tokens)
        if concrete is not None:  # traced lengths (under jit / vmap) are the caller's business
            bad = [int(x) for x in concrete if not lo <= int(x) <= t]
            if bad:
                raise ValueError(f"lengths={bad} out of range: each prompt length must be in [{lo}, T={t}]"
                                 + (" (0: the row sits this continuation out)" if lo == 0 else ""))
        lengths = lengths.astype(jnp.int32)

    if eos_id is None:
        eos = []
    elif _is_int(eos_id):
        eos = [eos_id]
    elif isinstance(eos_id, (np.ndarray, np.generic, jax.Array)) and not isinstance(eos_id, jax.core.Tracer) \
            and np.ndim(eos_id) <= 1 and np.issubdtype(np.asarray(eos_id).dtype, np.integer):
        eos = np.asarray(eos_id).reshape(-1).tolist()  # (a 0-d or jax array of ids: list() refused those)
    else:
        try:
            eos = list(eos_id)
        except TypeError:
            raise ValueError(f"eos_id={eos_id!r} must be None, a token id, or a sequence of token ids") from None
    # (< 2**31: the ids are compared in int32; past it, with no vocab_size to check against, the
    # int32 conversion raised an OverflowError naming no parameter)
    if not all(_is_int(e) and 0 <= e < 2**31 for e in eos):
        raise ValueError(f"eos_id={eos_id!r} must be None, a token id, or a sequence of token ids (integers in "
                         f"[0, 2**31))")
    _check_token_ids(model, input_ids, lengths, eos)
    if cache is not None:
        max_length = _check_continuation(model, cache, input_ids, lengths, max_length, kivi=kivi,
                                         cache_dtype=cache_dtype, prefill_rows=prefill_rows)

    keys = sampling.row_keys(key, b, required=not sampler.greedy)
    knobs = _Knobs(temperature=jnp.asarray(1.0 if sampler.greedy else float(temperature), jnp.float32),
                   top_p_rest=sampling.top_p_rest(top_p),
                   eos_ids=jnp.asarray(eos + [-1] * (_eos_slots(len(eos)) - len(eos)), jnp.int32),
                   pad_id=jnp.asarray(pad_id, jnp.int32))
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh={mesh!r} must be None (one device) or a jax.sharding.Mesh")
    if rules is not None and not isinstance(rules, sharding.ShardingRules):
        raise ValueError(f"rules={rules!r} must be None (the default rules) or a kivi_jax.sharding.ShardingRules")
    if rules is not None and mesh is None:
        raise ValueError("rules= maps logical axes onto a mesh: pass mesh= too (or leave rules=None)")
    if rules is not None:  # (the default rules drop axes a mesh lacks; given ones are meant: a typo is not)
        named = {a for name in sharding.LOGICAL_AXES for a in rules.mesh_axes(name)}
        missing = sorted(named - set(mesh.axis_names))
        if missing:
            raise ValueError(f"rules name mesh axes {missing} that mesh= lacks (its axes: {list(mesh.axis_names)}): "
                             f"they would be replicated silently")
    if mesh is not None and matmul_impl not in (None, "xla"):
        raise ValueError(f"matmul_impl={matmul_impl!r} runs on one device (the kernel has no shard_map); "
                         f"with mesh= leave matmul_impl=None")
    if mesh is not None:
        mesh = sharding.auto_mesh(mesh)
        rules = sharding.DEFAULT_RULES if rules is None else rules
    else:
        rules = None
    if matmul_impl is None:
        matmul_impl = _default_matmul_impl(model, mesh)
    cfg = _Config(max_new_tokens=int(max_new_tokens), max_length=int(max_length), kivi=kivi,
                  cache_dtype=cache_dtype, attn_impl=attn_impl, matmul_impl=matmul_impl, sampler=sampler,
                  mesh=mesh, rules=rules,
                  logits_at=_takes(model, "logits_at"), active=_takes(model, "active"),
                  extend=_takes(model, "extend"))
    # the new cache's own checks (e.g. sink_tokens < max_length) now, not at the first step
    new_cache = jax.eval_shape(lambda: _new_cache(model, b, cfg)) if cache is None else None
    cfg = dataclasses.replace(cfg, prefill_chunk=_check_prefill_chunk(prefill_chunk, prefill_rows, t, cfg))
    if cache is None and cfg.prefill_chunk is None:
        cfg = dataclasses.replace(cfg, prefill_rows=_resolve_prefill_rows(new_cache, prefill_rows, b, t, cfg))
    graphdef, state = _split(model)
    if mesh is not None:  # parameters and prompts onto the mesh (a no-op for ones already there)
        if state is not None:
            state = sharding.shard_params(state, mesh, rules, getattr(model, "config", None))
        input_ids = jax.device_put(input_ids, rules.sharding(mesh, ("batch",), input_ids.shape))
        lengths = jax.device_put(lengths, rules.sharding(mesh, ("batch",), lengths.shape))
    return graphdef, state, input_ids, lengths, keys, knobs, cfg


def _continued(graphdef, state, cache, b: int, cfg: _Config):
    """A cache to continue (None: none), ready for the prompt's call: on generate's mesh (batch and
    kv_heads split; no copy where it is already there: one on other devices, e.g. another mesh's,
    made jit refuse the mix), and one decode step on it traced (nothing runs; jit-cached per shape
    and settings). The cache is donated to the prompt's call (_feed), and decode steps were first
    traced after it ran: a decode step the model refuses (matmul_impl="bogus": only decode steps
    get it) raised with the caller's cache already deleted; the trace raises such an error first."""
    if cache is None:
        return None
    if cfg.mesh is not None:
        cache = sharding.shard_cache(cache, cfg.mesh, cfg.rules)
    with _on_mesh(cfg):
        _decode_probe.trace(graphdef, state, jnp.zeros((b, 1), jnp.int32), cache, cfg=cfg)
    return cache


def _check_prefill_chunk(prefill_chunk, prefill_rows, t: int, cfg: _Config) -> int | None:
    """Prompt tokens per model call, or None for the whole prompt in one call (also when the
    prompt fits one chunk)."""
    if prefill_chunk is None:
        return None
    if not _is_int(prefill_chunk) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk!r} must be None (the whole prompt in one call) or an "
                         f"integer >= 1")
    if not cfg.extend:
        raise ValueError(f"prefill_chunk={prefill_chunk} needs a model whose call takes extend= (each chunk "
                         f"continues the cache; the models in models/ do)")
    if prefill_rows is not None:
        raise ValueError(f"prefill_rows={prefill_rows!r} must be None with prefill_chunk={prefill_chunk} (a chunk "
                         f"takes every row); bound a prompt's activations with one or the other")
    return int(prefill_chunk) if prefill_chunk < t else None


def _resolve_prefill_rows(new_cache, prefill_rows, b: int, t: int, cfg: _Config) -> int | None:
    """Rows per prefill call, or None for the whole batch in one call; new_cache: the new cache's
    shape (jax.eval_shape)."""
    if prefill_rows is not None and (not _is_int(prefill_rows) or prefill_rows < 1):
        raise ValueError(f"prefill_rows={prefill_rows!r} must be None (automatic) or an integer >= 1")
    if prefill_rows is None and 2 * t < cfg.max_length:
        # a short prompt's activations are small next to the slice's own cache (max_length
        # slots per row): slicing raised the H200 peak at prompt 160 / 498 slots, B=96, from
        # 37.4 to 49.2 GiB dense (e2e-2026-11-30-run6 vs run9)
        return None
    rows = max(1, PREFILL_TOKENS // t) if prefill_rows is None else int(prefill_rows)
    if rows >= b:
        return None
    if cfg.mesh is not None:  # slices of rows would leave the batch's "data" sharding
        if prefill_rows is None:
            return None
        raise ValueError(f"prefill_rows={prefill_rows} < B={b} is not supported with mesh= (the batch is sharded "
                         f"over the mesh); leave prefill_rows=None")
    if not hasattr(new_cache, "write_rows"):
        if prefill_rows is None:
            return None
        raise ValueError(f"prefill_rows={prefill_rows} < B={b} needs a cache with write_rows(start, sub) "
                         f"(models.StackedCache has it); this model's cache is a {type(new_cache).__name__}")
    return rows


# ---- public API -----------------------------------------------------------------------------

def generate(model, input_ids, *, max_new_tokens: int, kivi: KIVIConfig | None = None, lengths=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id=None, key=None, pad_id: int = 0, max_length: int | None = None,
             cache_dtype=None, attn_impl: str | None = None, mesh=None, rules=None,
             prefill_rows: int | None = None, matmul_impl: str | None = None, cache=None,
             prefill_chunk: int | None = None) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens per row after a (ragged) batch of prompts.

    Args:
      model: a model with the cache protocol (module docstring); Flax NNX or any callable.
      input_ids: [B, T] integer prompts, right-padded; row b uses its first lengths[b] tokens.
      max_new_tokens: N >= 1, the most tokens generated per row (and the width of ``tokens``).
      kivi: None for a full-precision cache, or a KIVIConfig for a KIVI cache.
      lengths: [B] prompt lengths, each in [1, T] (default: all T); continuing ``cache``, 0 lets
        a row sit the call out (it feeds and emits nothing: num_new 0, its cache unchanged).
      temperature: 0 = greedy argmax; > 0 samples from softmax(logits / temperature).
      top_k: keep the k most likely tokens (None = all). top_p: nucleus mass in (0, 1].
      eos_id: None, a token id, or several; a row stops after emitting one (EOS kept).
      key: PRNG key (single, or one per row), required when temperature > 0. Step s draws with
        the key folded with s, from 0 in every call: continuing a cache, pass a new key (e.g.
        ``jax.random.fold_in(key, turn)``, as ``kivi-jax chat`` does), or a turn repeats the draws.
      pad_id: fills ``tokens`` after a row stops (any int32, e.g. -1; never fed to the model).
      max_length: cache capacity in tokens (default T + max_new_tokens); T <= max_length.
      cache_dtype: dtype of the cache's full-precision parts (default: the model's).
      attn_impl: passed to the model as ``attn_impl=`` (e.g. "reference" | "pallas").
      matmul_impl: passed to the model's decode steps as ``matmul_impl=`` (the models here:
        "xla" | "pallas", the layers' matrices read in place from the stacked weights).
        None: "pallas" on one GPU (measured faster there, dense and KIVI caches alike), else the
        model's default ("xla" for the models here).
      mesh: None (one device, unchanged) or a ``jax.sharding.Mesh`` (e.g.
        ``kivi_jax.sharding.make_mesh(data=2, model=4)``): parameters and the cache carry
        NamedShardings from ``rules`` (default ``kivi_jax.sharding.DEFAULT_RULES``: batch on
        "data", heads on "model"), kept across decode steps; the Pallas kernel runs under
        ``shard_map``. Same tokens as one device.
      rules: a ``kivi_jax.sharding.ShardingRules`` (only with a mesh).
      prefill_rows: rows per prefill call (the prompt's activations are those of this many
        rows; the cache is written slice by slice). None: as many as fit in
        ``PREFILL_TOKENS`` prompt tokens when T >= max_length / 2, else (and under a mesh, or for a cache
        without ``write_rows``) the whole batch. Same tokens for any value.
      cache: None (a new cache for the prompts), or a cache to continue (multi-turn): one
        returned by ``generate`` (``GenerateOutput.cache``) or a model call, for B rows. Row b's
        input_ids then follow what it holds, at positions ``cache.lengths[b]`` on: in one call
        where the model takes ``extend=`` (the models here: a chunked prefill, the new tokens
        attending to the cache as decode steps read it and to each other in full precision,
        then appended in Algorithm 1's order), else through decode steps one token at a time.
        ``generate``'s cache holds each row's
        prompt and new tokens except the last one (never fed back): start the next input_ids
        with it. The cache decides the capacity and format, so ``kivi``, ``cache_dtype``,
        ``max_length`` and ``prefill_rows`` stay None; every row must fit (held + lengths[b]
        <= max_length). Its buffers are donated (reused in place: the array passed in is
        deleted). Needs a model whose decode call takes ``active=`` (the models here).
      prefill_chunk: None (the prompt in one model call), or the most prompt tokens a call: a
        longer prompt (new, or continuing ``cache``) goes in chunks of this many tokens, each
        attending to the cache as the chunks before it left it (their tokens quantized once out
        of the window, as decode steps read them) and to itself in full precision; peak
        activations, and the new keys and values a model holds before writing them, are those
        of one chunk. Needs a model that takes ``extend=`` (the models here). With a chunk the
        tokens may differ slightly from one call's, which attends to the whole prompt in full
        precision. Not with ``prefill_rows``.

    Returns:
      GenerateOutput(tokens [B, N] int32, lengths [B] int32, cache). Deterministic: greedy
      always, sampling for a given key. ``cache`` holds exactly each row's tokens (a row that
      stopped appends nothing more), ready to be continued.
    """
    graphdef, state, ids, lens, keys, knobs, cfg = _prepare(
        model, input_ids, max_new_tokens=max_new_tokens, kivi=kivi, lengths=lengths, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, key=key, pad_id=pad_id, max_length=max_length,
        cache_dtype=cache_dtype, attn_impl=attn_impl, mesh=mesh, rules=rules, prefill_rows=prefill_rows,
        matmul_impl=matmul_impl, cache=cache, prefill_chunk=prefill_chunk)
    cache = _continued(graphdef, state, cache, ids.shape[0], cfg)
    carry = _run_prompt(graphdef, state, ids, lens, keys, knobs, cfg, cache)
    if cfg.max_new_tokens > 1:
        carry = _run(_decode_loop, graphdef, state, carry, keys, knobs, cfg)
    return GenerateOutput(tokens=carry.tokens, lengths=carry.num_new, cache=carry.cache)


def generate_stream(model, input_ids, *, max_new_tokens: int, kivi: KIVIConfig | None = None, lengths=None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id=None, key=None, pad_id: int = 0, max_length: int | None = None,
                    cache_dtype=None, attn_impl: str | None = None, mesh=None, rules=None,
                    prefill_rows: int | None = None, matmul_impl: str | None = None,
                    cache=None, prefill_chunk: int | None = None) -> Iterator[StreamStep]:
    """Like :func:`generate`, but yields a :class:`StreamStep` (host arrays [B]) per step.

    Runs the same jitted prefill and decode step as ``generate`` (the step is called from
    Python once per token), so the tokens are the same as ``generate``'s for the same
    arguments. Stops when every row has stopped; the generator's return value
    (``StopIteration.value``, or ``out = yield from ...``) is the :class:`GenerateOutput`.
    Arguments are checked at the call, before the generator is returned.
    """
    prepared = _prepare(
        model, input_ids, max_new_tokens=max_new_tokens, kivi=kivi, lengths=lengths, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, key=key, pad_id=pad_id, max_length=max_length,
        cache_dtype=cache_dtype, attn_impl=attn_impl, mesh=mesh, rules=rules, prefill_rows=prefill_rows,
        matmul_impl=matmul_impl, cache=cache, prefill_chunk=prefill_chunk)
    graphdef, state, ids = prepared[:3]
    return _stream(*prepared, _continued(graphdef, state, cache, ids.shape[0], prepared[-1]))


def _stream(graphdef, state, ids, lens, keys, knobs, cfg: _Config, cache=None) -> Iterator[StreamStep]:
    carry = _run_prompt(graphdef, state, ids, lens, keys, knobs, cfg, cache)
    for s in range(cfg.max_new_tokens):
        if s:
            carry = _run(_decode_step, graphdef, state, carry, keys, knobs, cfg)
        tok, num_new, done = jax.device_get((carry.tokens[:, s], carry.num_new, carry.done))
        emitted = num_new > s
        if not emitted.any():
            break
        yield StreamStep(tokens=np.asarray(tok, np.int32), emitted=np.asarray(emitted))
        if done.all():
            break
    return GenerateOutput(tokens=carry.tokens, lengths=carry.num_new, cache=carry.cache)
