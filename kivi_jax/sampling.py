"""Next-token selection: greedy argmax, or temperature / top-k / top-p (nucleus) sampling.

Everything runs on float32 logits. Ties are broken deterministically toward the lower
token id: greedy takes the first maximum (NaN above all, as torch.argmax; one reduction whose
order does not matter, see :func:`_first_argmax`), ``lax.top_k`` puts the lower index
first among equal values, and the top-p sort is stable. The order of the filters is the
usual one (as in Hugging Face's warpers): divide by the temperature, keep the ``top_k``
largest, then keep the smallest prefix of the rest (sorted by probability, descending)
whose probability mass reaches ``top_p`` -- the token that crosses ``top_p`` is kept.

The nucleus test is computed as Hugging Face's TopPLogitsWarper computes it: token i stays when
the mass of it and every less likely token, summed from the least likely up, exceeds
``1 - top_p`` (the same rule as "the mass before it is below top_p"), with ``1 - top_p`` taken
in float64 on the host (:func:`top_p_rest`). Summed from the most likely token in float32, the
mass before a token near the edge of a top_p >= 0.999 nucleus is off by more than the tokens
there weigh, and 1 - float32(top_p) by up to 1.3% at 0.999999: that rule kept or dropped 1123
tokens over 240 random cases (V 97 to 49152, top_p 0.9 to 0.999999) where a float64 sum did
not; this one (as HF's) 1.

Randomness is per row: row b samples with its own key, so a row's draw does not depend on
which other rows share its batch (``jax.vmap`` of one row gives the same token).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class SamplingConfig(NamedTuple):
    """Static (hashable) shape of the sampler: what jit compiles for.

    greedy: argmax (temperature == 0). top_k: None or k >= 1 (clamped to the vocabulary).
    use_top_p: whether the nucleus filter runs (top_p < 1). The temperature and top_p
    *values* are traced arguments, so changing them does not recompile.
    """

    greedy: bool
    top_k: int | None
    use_top_p: bool


def check_sampling(temperature, top_k, top_p) -> SamplingConfig:
    """Validates the sampling knobs eagerly; raises ValueError naming the bad one."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature={temperature!r} must be a real number >= 0 (0 = greedy)")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if temperature > 0 and np.float32(temperature) == 0:
        raise ValueError(f"temperature={temperature!r} is 0 in float32 (below ~1.4e-45): pass 0 for greedy")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
        top_k = int(top_k)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")
    greedy = float(temperature) == 0.0
    return SamplingConfig(greedy=greedy, top_k=None if greedy else top_k,
                          use_top_p=(not greedy) and top_p is not None and float(top_p) < 1.0)


def top_p_rest(top_p) -> jax.Array:
    """() float32 ``1 - top_p``: the probability mass the nucleus may leave out (0 for None).

    A concrete number is subtracted in float64 before the cast: ``1 - float32(0.999999)`` is
    1.3% off. A traced top_p is subtracted in float32."""
    if top_p is None:
        return jnp.zeros((), jnp.float32)
    if isinstance(top_p, numbers.Real):
        return jnp.asarray(1.0 - float(top_p), jnp.float32)
    return 1.0 - jnp.asarray(top_p, jnp.float32)


def _first_argmax(logits, axis=-1):
    """The index of the maximum along ``axis``, NaN above everything, the lowest index on ties
    (NaNs tie with each other): torch.argmax's pick, on every backend. ``jnp.argmax``'s reducer
    keeps whichever NaN it sees second, so XLA:GPU's tree reduction returned index 50 of a row
    with NaN at 5 and 50 (H100, run145). This reducer orders (is NaN, value, -index) totally, so
    the order of the reduction does not matter, and it stays one reduction (a vocabulary split
    over devices costs the same collectives as jnp.argmax's)."""
    axis = axis % logits.ndim
    index = lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
    return lax.reduce((logits, index), init, _keep_first, (axis,))[1]


def _keep_first(a, b):
    """_first_argmax's reducer: of two (value, index) pairs the larger value, NaN the largest,
    on a tie (NaN with NaN included) the lower index. Associative and commutative."""
    (av, ai), (bv, bi) = a, b
    an, bn = jnp.isnan(av), jnp.isnan(bv)
    a_wins = (an & ~bn) | (av > bv) | (((av == bv) | (an & bn)) & (ai < bi))
    return jnp.where(a_wins, av, bv), jnp.where(a_wins, ai, bi)


def _sample_row(logits, key, temperature, rest, cfg: SamplingConfig):
    """logits [V] float32, key a typed PRNG key, rest = 1 - top_p -> token id (int32 scalar)."""
    if cfg.greedy:
        return _first_argmax(logits)
    vocab = logits.shape[-1]
    if cfg.top_k is None and not cfg.use_top_p:
        # (the best logit subtracted first: a tiny temperature leaves it at 0 and the rest at -inf
        # instead of overflowing to inf - inf)
        return jax.random.categorical(key, (logits - jnp.max(logits)) / temperature).astype(jnp.int32)
    if cfg.top_k is not None:
        # -0.0 made +0.0 first: lax.top_k orders floats totally (+0 above -0, whatever their ids),
        # where == (and argmax, argsort, HF's warpers) has them equal: a tie, to the lower id
        logits = jnp.where(logits == 0, jnp.float32(0), logits)
        vals, idx = lax.top_k(logits, min(cfg.top_k, vocab))  # descending; lower id first on ties
    else:
        idx = jnp.argsort(-logits, stable=True)  # descending; lower id first on ties
        vals = logits[idx]
    vals = (vals - vals[0]) / temperature  # (vals[0] is the best: as above)
    if cfg.use_top_p:
        probs = jax.nn.softmax(vals)
        # tail[i]: the mass of token i and of every less likely one, summed from the least likely
        # (mass before i < top_p  <=>  tail[i] > 1 - top_p; see the module docstring)
        tail = lax.cumsum(probs, reverse=True)
        first = jnp.arange(vals.shape[0]) == 0  # (always stays, as HF's min_tokens_to_keep=1)
        vals = jnp.where((tail > rest) | first, vals, -jnp.inf)
    return idx[jax.random.categorical(key, vals)].astype(jnp.int32)


def sample(logits, keys, *, temperature, cfg: SamplingConfig, top_p=None, rest=None):
    """Picks one token per row. logits [B, V] (any float dtype; computed in float32);
    keys [B] typed PRNG keys (unused when greedy); temperature scalar (traced ok). The nucleus
    as ``top_p`` (a number, or a traced scalar: see :func:`top_p_rest`) or as ``rest`` =
    ``top_p_rest(top_p)`` made beforehand (a traced () float32, as generate passes it); not both.
    Returns [B] int32."""
    if top_p is not None and rest is not None:
        raise ValueError(f"top_p={top_p!r} and rest={rest!r}: pass the nucleus one way (rest = 1 - top_p)")
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    rest = top_p_rest(top_p) if rest is None else jnp.asarray(rest, jnp.float32)
    if cfg.greedy:
        return _first_argmax(logits)
    return jax.vmap(lambda lg, k: _sample_row(lg, k, temperature, rest, cfg))(logits, keys)


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
    """Convenience form of :func:`sample` for one batch of logits [B, V].

    ``key`` is a single PRNG key (row b draws with ``fold_in(key, b)``) or a batch of B
    keys; ignored when ``temperature == 0``. Returns [B] int32.
    """
    cfg = check_sampling(temperature, top_k, top_p)
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [B, V] with V >= 1; got shape {logits.shape}")
    keys = row_keys(key, logits.shape[0], required=not cfg.greedy)
    return _sample_jit(logits, keys, jnp.float32(temperature if not cfg.greedy else 1.0), top_p_rest(top_p), cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sample_jit(logits, keys, temperature, rest, *, cfg):
    return sample(logits, keys, temperature=temperature, rest=rest, cfg=cfg)


def _as_typed(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] != 2:
        raise ValueError(f"key must be a PRNG key (jax.random.key or PRNGKey) or a batch of them; "
                         f"got {key.dtype} array of shape {key.shape}")
    return jax.random.wrap_key_data(key)


def row_keys(key, batch: int, *, required: bool):
    """Per-row typed keys [B]: from a single key, row b gets ``fold_in(key, b)``; a batch of
    B keys is used as is. ``key=None`` gives fixed dummy keys (only allowed when not
    ``required``, i.e. for greedy decoding)."""
    if key is None:
        if required:
            raise ValueError("key=None: sampling (temperature > 0) needs a PRNG key, e.g. jax.random.key(0)")
        key = jax.random.key(0)
    key = _as_typed(key)
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch, dtype=jnp.uint32))
    if key.shape != (batch,):
        raise ValueError(f"key must be one PRNG key or a batch of {batch} keys; got key shape {key.shape}")
    return key
