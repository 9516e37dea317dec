"""``extend(k, v, lengths)``: many tokens a row in a few writes, exactly as that many appends.

The expectation is the cache's own Algorithm-1 path, independent of the extend's arithmetic:
the same cache given the tokens one at a time, ``append(k_j, v_j, active=j < lengths)``. Every
buffer must match bit for bit (the rings' stale slots included) across value spills, several
key flushes in one extend, sinks filling up, rotation, 1-bit keys whose residual is not a whole
number of words, 4-bit values, key groups smaller than value groups, rows that take nothing,
rows that fill up (flagged), per layer and layer-stacked, and a second extend after the first.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kivi_jax as kj
import reference_kivi as ref
from reference_kivi import keys_values
from test_cache import D, G, R, _materialize, check_stores
from kivi_jax.eval.ablation import SimQuantCache
from models.cache import StackedCache

# name: (init(**kw) -> cache, head_dim, prompt lengths, max_length)
FORMATS = {
    "dense": (kj.DenseCache.init, 64, [3, 20, 60, 97, 30, 0], 100),
    "kivi": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(residual_length=32)), 64,
             [3, 20, 60, 97, 30, 0], 100),
    "kivi_default_4bit": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(v_bits=4)), 64,
                          [3, 127, 128, 250, 300, 0], 400),
    "kivi_1bit_keys_r48": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(k_bits=1, v_bits=4, group_size=16,
                                                                                residual_length=48)),
                           64, [3, 47, 48, 95, 130, 0], 200),
    "kivi_key_groups_16": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(residual_length=32, key_group_size=16)),
                           64, [5, 31, 33, 64, 70, 0], 120),
    "kivi_sinks_rotated": (functools.partial(kj.KIVICache.init, kj.KIVIConfig(residual_length=32, sink_tokens=4,
                                                                               rotate="kv")),
                           64, [1, 4, 35, 107, 2, 0], 110),
    "mosaic": (functools.partial(kj.MosaicKIVICache.init, kj.KIVIConfig(layout="mosaic")), 128,
               [5, 120, 250, 317, 127, 0], 320),
    "mosaic_sinks_rotated": (functools.partial(kj.MosaicKIVICache.init,
                                               kj.KIVIConfig(layout="mosaic", sink_tokens=6, rotate="k")), 128,
                             [2, 133, 255, 300, 6, 0], 330),
    "simquant": (functools.partial(SimQuantCache.init, kj.KIVIConfig(residual_length=32)), 64,
                 [3, 20, 60, 97, 30, 0], 100),
}
HEADS = 2


def _setup(name, t, counts, seed=0):
    init, d, lengths, max_length = FORMATS[name]
    b = len(lengths)
    ks = jax.random.split(jax.random.key(seed), 5)
    k = jax.random.normal(ks[0], (b, HEADS, max(lengths), d)) * (1 + 4 * jax.random.bernoulli(ks[1], 0.1, (d,)))
    v = jax.random.normal(ks[2], (b, HEADS, max(lengths), d)) * 3
    new_k = jax.random.normal(ks[3], (b, HEADS, t, d)) * 2 + 0.5
    new_v = jax.random.normal(ks[4], (b, HEADS, t, d))
    # multiples of 1/16: a rotation's products and sums are then exact in float32 whatever the
    # shape (a GPU's bf16x6 Hadamard GEMM rounds a [.., 1, D] and a [.., T, D] input differently)
    k, v, new_k, new_v = (jnp.round(x * 16) / 16 for x in (k, v, new_k, new_v))
    cache = init(batch=b, num_kv_heads=HEADS, head_dim=d, max_length=max_length, dtype=jnp.float32)
    cache = jax.jit(lambda c, k, v, n: c.prefill(k, v, n))(cache, k, v, jnp.asarray(lengths, jnp.int32))
    return cache, new_k, new_v, jnp.asarray(counts, jnp.int32)


@jax.jit
def _appended(cache, k, v, counts):
    """The expectation: the tokens one append at a time, row b taking its first counts[b]."""
    def step(j, c):
        kj_, vj = (jax.lax.dynamic_slice_in_dim(a, j, 1, axis=2) for a in (k, v))
        return c.append(kj_, vj, active=j < counts)

    return jax.lax.fori_loop(0, k.shape[2], step, cache)


def _assert_same(got, want, what=""):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = functools.reduce(lambda x, p: getattr(x, p.name), path, want)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{what} {jax.tree_util.keystr(path)}")


# per format: (T, counts) pairs. Counts past R cross several flushes; a row near max_length overflows.
CASES = {
    "dense": [(40, [40, 0, 17, 40, 5, 1])],
    "kivi": [(40, [40, 0, 17, 40, 33, 1]), (75, [75, 64, 2, 3, 70, 75])],
    "kivi_default_4bit": [(150, [150, 1, 0, 149, 100, 129])],
    "kivi_1bit_keys_r48": [(100, [100, 45, 1, 2, 70, 97])],
    "kivi_key_groups_16": [(60, [60, 1, 31, 56, 50, 33])],
    "kivi_sinks_rotated": [(40, [40, 1, 30, 5, 3, 40])],
    "mosaic": [(140, [140, 0, 7, 5, 129, 140])],
    "mosaic_sinks_rotated": [(150, [150, 140, 1, 31, 130, 5])],
    "simquant": [(40, [40, 0, 17, 40, 33, 1])],
}


@pytest.mark.parametrize("name,t,counts", [(n, t, c) for n, cases in CASES.items() for t, c in cases])
def test_extend_equals_appends(name, t, counts):
    cache, k, v, n = _setup(name, t, counts)
    want = _appended(cache, k, v, n)
    if hasattr(cache, "extend"):
        got = jax.jit(lambda c, k, v, n: c.extend(k, v, n))(cache, k, v, n)
        _assert_same(got, want, name)
    # layer-stacked, written in place into layer 1 of 2 (a format without extend: appends)
    stacked = StackedCache(jax.tree.map(lambda x: jnp.stack([x, x]), cache))
    got = jax.jit(lambda s, k, v, n: s.extend_layer(1, k, v, n))(stacked, k, v, n)
    _assert_same(got.layer(1), want, f"{name} stacked")
    _assert_same(got.layer(0), cache, f"{name} stacked layer 0 untouched")
    if stacked.extends_all:  # every layer at once (the models' extend off a GPU), each its own tokens
        got = jax.jit(lambda s, ks, vs, n: s.extend_all(ks, vs, n))(stacked, jnp.stack([v, k]), jnp.stack([k, v]), n)
        _assert_same(got.layer(1), want, f"{name} extend_all layer 1")
        _assert_same(got.layer(0), _appended(cache, v, k, n), f"{name} extend_all layer 0")
    lengths = np.asarray(cache.lengths)
    np.testing.assert_array_equal(np.asarray(want.lengths), np.minimum(lengths + np.asarray(counts), cache.max_length))
    assert np.asarray(want.overflow).any() == any(lengths + np.asarray(counts) > cache.max_length)


@pytest.mark.parametrize("name", ["kivi", "mosaic_sinks_rotated"])
def test_second_extend_continues_the_first(name):
    """A cache extended twice (the rings' stale slots and half-filled words of the first extend
    are what the second one reads and adds to) equals the appends of both."""
    cache, k, v, n = _setup(name, 50, [50, 3, 20, 1, 44, 50])
    _, k2, v2, n2 = _setup(name, 33, [33, 30, 1, 2, 0, 33], seed=1)
    ext = jax.jit(lambda c, k, v, n: c.extend(k, v, n))
    _assert_same(ext(ext(cache, k, v, n), k2, v2, n2), _appended(_appended(cache, k, v, n), k2, v2, n2), name)


def test_extend_without_lengths_takes_every_token():
    cache, k, v, _ = _setup("kivi", 9, [9] * 6)
    _assert_same(cache.extend(k, v), _appended(cache, k, v, jnp.full((6,), 9, jnp.int32)), "lengths=None")


@pytest.mark.parametrize("bad,match", [([1, 2, 3, 4, 5, 10], r"lengths=\[10\] out of range"),
                                       (np.zeros((5,), np.int32), r"shape \(6,\)"),
                                       (np.zeros((6,), np.float32), "integer array")])
def test_extend_bad_lengths_is_a_named_error(bad, match):
    cache, k, v, _ = _setup("kivi", 9, [9] * 6)
    with pytest.raises(ValueError, match=match):
        cache.extend(k, v, jnp.asarray(bad))
    with pytest.raises(ValueError, match="k has shape"):
        cache.extend(k[:, :1], v[:, :1])


def test_traced_lengths_out_of_range_are_flagged_and_write_nothing_wrong():
    """Under jit a count past T cannot raise: the row takes its T tokens and is flagged."""
    cache, k, v, _ = _setup("kivi", 9, [9] * 6)
    got = jax.jit(lambda c, k, v, n: c.extend(k, v, n))(cache, k, v, jnp.asarray([9, 12, 9, 9, 9, 9]))
    want = _appended(cache, k, v, jnp.full((6,), 9, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got.overflow), np.asarray(want.overflow) | (np.arange(6) == 1))
    _assert_same(got.k_codes, want.k_codes, "codes")


@pytest.mark.parametrize("name", ["kivi", "kivi_sinks_rotated", "mosaic"])
def test_no_two_tokens_of_a_row_share_a_ring_slot(name):
    """The ring writes are one scatter: two input tokens naming one slot would leave which one
    lands to the backend (a CPU happens to apply them in order, a GPU need not). Only the
    newest R body tokens of a row write (and sinks, each its own slot)."""
    from kivi_jax import cache_extend

    (t, counts), = CASES[name][:1]
    cache, k, v, n = _setup(name, t, counts)
    slot = np.asarray(cache_extend.pending(cache, k, v, n).slot)
    for row in slot:
        used = row[row >= 0]
        assert len(used) == len(set(used.tolist())), row
    assert (slot >= 0).sum() > 0


@settings(max_examples=8, deadline=None)
@given(bits=st.sampled_from([(2, 2), (4, 1), (1, 4)]), prompt=st.lists(st.integers(0, 48), min_size=3, max_size=3),
       chunks=st.lists(st.tuples(st.sampled_from([8, 40, 70]), st.lists(st.integers(0, 70), min_size=3, max_size=3)),
                       min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_extends_against_the_float64_algorithm(bits, prompt, chunks, seed):
    """Any prompt lengths, then extends of any per-row sizes: the stores hold exactly the codes,
    scales and mins of the float64 model of Algorithm 1 fed the same tokens one at a time, and
    materialize its keys and values (tests/reference_kivi.py, independent of the cache code)."""
    rng = np.random.default_rng(seed)
    cfg = kj.KIVIConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R)
    k, v = keys_values(rng, 3, HEADS, 48, D)
    cache = kj.KIVICache.init(cfg, batch=3, num_kv_heads=HEADS, head_dim=D, max_length=48 + 70 * 3,
                              dtype=jnp.bfloat16).prefill(jnp.asarray(k), jnp.asarray(v), jnp.asarray(prompt))
    rf = ref.ReferenceKIVICache(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R, batch=3,
                                num_kv_heads=HEADS, head_dim=D, dtype=jnp.bfloat16).prefill(k, v, prompt)
    ext = jax.jit(lambda c, k, v, n: c.extend(k, v, n))
    for t, counts in chunks:
        counts = [min(n, t) for n in counts]
        kn, vn = keys_values(rng, 3, HEADS, t, D)
        cache = ext(cache, jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(counts, jnp.int32))
        for r, row in enumerate(rf.rows):
            for j in range(counts[r]):
                rf._append_row(row, rf._stored(kn[r, :, j]), rf._stored(vn[r, :, j]))
    check_stores(cache, rf)
    kh, vh = (np.asarray(a.astype(jnp.float32), np.float64) for a in _materialize(cache))
    for r in range(3):
        n = rf.length(r)
        assert int(cache.lengths[r]) == n
        np.testing.assert_allclose(kh[r, :, :n], rf.keys(r), rtol=2.0**-7, atol=0)
        np.testing.assert_allclose(vh[r, :, :n], rf.values(r), rtol=2.0**-7, atol=0)


@pytest.mark.parametrize("name", ["dense", "kivi", "mosaic"])
def test_an_extend_longer_than_the_cache(name):
    """T far past max_length (its key blocks and value rows run past the stores: dropped, not
    clamped onto other rows): the row fills up and is flagged, the other takes its few tokens,
    exactly as the appends."""
    init, d, _, max_length = FORMATS[name]
    k = jax.random.normal(jax.random.key(3), (2, HEADS, 3 * max_length, d))
    cache = init(batch=2, num_kv_heads=HEADS, head_dim=d, max_length=max_length, dtype=jnp.float32)
    cache = cache.prefill(k[:, :, :10], k[:, :, :10] * 2)
    n = jnp.asarray([3 * max_length, 3], jnp.int32)
    got = jax.jit(lambda c, k, v, n: c.extend(k, v, n))(cache, k, k * 2, n)
    _assert_same(got, _appended(cache, k, k * 2, n), name)
    assert got.lengths.tolist() == [max_length, 13] and got.overflow.tolist() == [True, False]


def test_extend_under_vmap_equals_each_request_alone():
    """jax.vmap over requests (a leading axis on every cache leaf): each request's extend is the
    one it gets alone (the scatters' batching rule, not a loop)."""
    cache, _, _, _ = _setup("mosaic", 1, [1] * 6)
    caches = jax.tree.map(lambda x: jnp.stack([x, x * (2 if x.dtype == jnp.float32 else 1)]), cache)
    k = jax.random.normal(jax.random.key(4), (2,) + (6, HEADS, 140, 128))
    n = jnp.asarray([[140, 0, 7, 5, 129, 140], [3, 140, 0, 1, 2, 64]], jnp.int32)
    got = jax.jit(jax.vmap(lambda c, k, n: c.extend(k, -k, n)))(caches, k, n)
    for i in range(2):
        one = jax.tree.map(lambda x: x[i], caches).extend(k[i], -k[i], n[i])
        _assert_same(jax.tree.map(lambda x: x[i], got), one, f"request {i}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA:GPU's layout assignment around cuDNN's attention")
def test_dense_stacked_extend_does_not_copy_the_stack():
    """A continuation over a dense stacked cache on a GPU (cuDNN's attention, both write modes)
    needs temporaries of about a layer, not of the stack: when cuDNN took its operands as
    [B, T, heads, D], XLA laid the whole loop-carried stack out that way, two transposed copies
    of every layer (64 GiB at Llama-2-7B shape, 16384 tokens, batch 8: results/extend-memory-run142)."""
    import models
    from benchmarks.prefill_memory import compile_extend

    cfg = models.ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=512, num_layers=6, num_heads=8,
                             num_kv_heads=8, head_dim=128)
    model = models.abstract_model(cfg, jnp.bfloat16)
    stack = 2 * 6 * 2 * 8 * 8192 * 128 * 2  # k and v: [L, B, Hkv, C, D] bf16
    for writes in ("after", "in_loop"):
        temp = compile_extend(model, 2, 8192, 64, None, writes).memory_analysis().temp_size_in_bytes
        assert temp < stack / 2, (writes, temp, stack)
