"""``append(k, v, active)``: only the rows ``active`` [B] bool append; the others are left exactly
as they were (buffers, length, overflow flag). How ``generate`` keeps a stopped row's filler
out of the cache, and feeds prompts of different lengths into a cache it continues.

The expectation is independent of the batch: each row prefilled alone in a one-row cache, then
given plain appends (no ``active``) of exactly the tokens for which it was active. The batched
cache's row b must equal it bit for bit, across value spills, key flushes, sinks, a row that
fills up while active (refused and flagged) and a full row that is never active (not flagged),
for every format, per layer and layer-stacked (XLA writes, the row-writes kernel, and both
append kernels, interpreted).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import cache_common as cc
from kivi_jax import cache_kivi, cache_mosaic
from kivi_jax.eval.ablation import SimQuantCache
from models.cache import StackedCache

KIVI = kj.KIVIConfig(residual_length=32)
# name: (init(batch, max_length) -> cache, head_dim, prompt lengths, max_length). Row 3 fills up
# within the steps while active; row 4 starts full and is never active.
FORMATS = {
    "dense": (lambda **kw: kj.DenseCache.init(**kw), 64, [3, 20, 60, 97, 100], 100),
    "kivi": (functools.partial(kj.KIVICache.init, KIVI), 64, [3, 20, 60, 97, 100], 100),
    "kivi_sinks_rotated": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(residual_length=32, sink_tokens=4,
                                                                               rotate="kv")),
                           64, [1, 4, 35, 107, 110], 110),
    "mosaic": (functools.partial(kj.MosaicKIVICache.init, kj.KIVIConfig(layout="mosaic")), 128,
               [5, 120, 250, 317, 320], 320),
    "simquant": (functools.partial(SimQuantCache.init, KIVI), 64, [3, 20, 60, 97, 100], 100),
}
STEPS, HEADS = 40, 2


def _prompt(name, seed=0):
    init, d, lengths, max_length = FORMATS[name]
    b, t = len(lengths), max(lengths)
    ks = jax.random.split(jax.random.key(seed), 4)
    k = jax.random.normal(ks[0], (b, HEADS, t, d)) * (1 + 4 * jax.random.bernoulli(ks[1], 0.1, (d,)))
    v = jax.random.normal(ks[2], (b, HEADS, t, d)) * 3
    new = jax.random.normal(ks[3], (2, STEPS, b, HEADS, 1, d)) * 2
    # multiples of 1/16: a rotation's products and sums are then exact in float32 whatever the
    # shape (a GPU's bf16x6 Hadamard GEMM rounds a 5-row and a 1-row batch differently)
    k, v, new = (jnp.round(x * 16) / 16 for x in (k, v, new))
    active = np.random.default_rng(seed).random((STEPS, b)) < 0.6
    active[:8, 3] = True  # row 3 reaches max_length while active, then is refused
    active[:, 4] = False  # row 4 is full from the start and never appends
    return init, d, np.asarray(lengths, np.int32), max_length, k, v, new, active


def _prefilled(init, d, max_length, k, v, lengths):
    cache = init(batch=len(lengths), num_kv_heads=HEADS, head_dim=d, max_length=max_length, dtype=jnp.float32)
    return jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(cache, k, v, jnp.asarray(lengths))


def _alone(init, d, max_length, k, v, new, active, lengths, b):
    """Row b in a cache of its own, given plain appends of the tokens it was active for."""
    cache = _prefilled(init, d, max_length, k[b:b + 1, :, :lengths[b]], v[b:b + 1, :, :lengths[b]], lengths[b:b + 1])
    append = jax.jit(lambda c, k, v: c.append(k, v))
    for i in np.flatnonzero(active[:, b]):
        cache = append(cache, new[0, i, b:b + 1], new[1, i, b:b + 1])
    return cache


def _check_rows(got, init, d, max_length, k, v, new, active, lengths, row=lambda x, b: x[b]):
    for b in range(len(lengths)):
        want = _alone(init, d, max_length, k, v, new, active, lengths, b)
        for path, (g, w) in zip(jax.tree_util.tree_leaves_with_path(got),
                                zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))):
            np.testing.assert_array_equal(np.asarray(row(g, b)), np.asarray(w[0]),
                                          err_msg=f"row {b} {jax.tree_util.keystr(path[0])}")
    n = active.sum(0)
    lens = np.asarray(row(got.lengths, slice(None)))
    np.testing.assert_array_equal(lens, np.minimum(lengths + n, max_length))
    assert lens[3] == max_length and bool(row(got.overflow, 3)) and not bool(row(got.overflow, 4))


@pytest.mark.parametrize("name", list(FORMATS))
def test_per_layer_append_appends_the_active_rows_only(name):
    init, d, lengths, max_length, k, v, new, active = _prompt(name)
    cache = _prefilled(init, d, max_length, k, v, lengths)
    append = jax.jit(lambda c, k, v, a: c.append(k, v, a))
    for i in range(STEPS):
        cache = append(cache, new[0, i], new[1, i], jnp.asarray(active[i]))
    _check_rows(cache, init, d, max_length, k, v, new, active, lengths)


@pytest.mark.parametrize("name, impl", [("dense", "xla"), ("dense", "row_writes"), ("kivi", "xla"),
                                        ("kivi", "pallas"), ("kivi_sinks_rotated", "pallas"),
                                        ("mosaic", "xla"), ("mosaic", "pallas")])
def test_stacked_append_appends_the_active_rows_only(name, impl, monkeypatch):
    """Layer 1 of a 2-layer stack, as a model's decode step writes it (``StackedCache.append_layer``):
    impl "pallas" is the format's append kernel (it reads the lengths ``active`` makes),
    "row_writes" the row-writes kernel (it reads the writes' keep masks); layer 0 untouched."""
    monkeypatch.setattr(cache_kivi, "APPEND_IMPL", "pallas" if impl == "pallas" else "xla")
    monkeypatch.setattr(cache_mosaic, "APPEND_IMPL", "pallas" if impl == "pallas" else "xla")
    monkeypatch.setattr(cc, "DEFAULT_WRITES_IMPL", "pallas" if impl == "row_writes" else "xla")
    init, d, lengths, max_length, k, v, new, active = _prompt(name, seed=1)
    one = _prefilled(init, d, max_length, k, v, lengths)
    stacked = StackedCache.stack(one, 2)
    due = []

    @jax.jit
    def step(st, k, v, a):
        # (rare_writes_due reads layer 0, which a model step appends too; here layer 1 does)
        return st.append_layer(jnp.int32(1), k, v, active=a), StackedCache.stack(st.layer(1), 1).rare_writes_due(a)

    for i in range(STEPS):
        stacked, d_i = step(stacked, new[0, i], new[1, i], jnp.asarray(active[i]))
        due.append(d_i)
    _check_rows(stacked.layer(1), init, d, max_length, k, v, new, active, lengths)
    for g, w in zip(jax.tree_util.tree_leaves(stacked.layer(0)), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if name != "dense":  # a flush is due exactly when an active row's body reaches a multiple of R
        r, s = one.config.residual_length, one.config.sink_tokens
        held = lengths + np.concatenate([np.zeros((1, len(lengths)), int), np.cumsum(active, 0)[:-1]])
        body = held - s
        want = ((active & (held < max_length) & (held >= s) & ((body + 1) % r == 0)).any(1))
        np.testing.assert_array_equal(np.asarray(due), want)
        assert want.any()


@pytest.mark.parametrize("active, words", [
    (np.ones(3, bool), "shape (5,)"),
    (np.ones(5, np.int32), "bool array of shape (5,)"),
])
def test_bad_active_raises(active, words):
    cache = kj.KIVICache.init(KIVI, batch=5, num_kv_heads=HEADS, head_dim=64, max_length=64)
    token = jnp.ones((5, HEADS, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="active must be None or a bool array") as e:
        cache.append(token, token, jnp.asarray(active))
    assert words in str(e.value)
