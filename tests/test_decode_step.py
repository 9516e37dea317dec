"""The model's decode step updates the stacked cache in place: no copy of a whole cache buffer.

The layer scan carries the StackedCache; each layer writes only the new token's slabs
(``append_writes`` + ``cache_common.apply_writes(..., layer=i)``). Checked on the optimized
HLO of a jitted, cache-donated step (what ``kivi_jax.generate`` runs), so a regression to
scan-output caches (a fresh buffer per step, plus a copy back into the donated one) fails.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax
import models
from kivi_jax import cache_common as cc
from models.cache import StackedCache
from models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2,
                  num_kv_heads=2, head_dim=32)


def _compiled_step(batch=2, max_length=1024):
    model = models.init_random(CFG, dtype=jnp.float32)
    apply, params = models.functional(model)
    cache = model.init_cache(batch, max_length)

    def step(params, ids, cache):
        return apply(params, ids, cache)

    ids = jnp.zeros((batch, 1), jnp.int32)
    return jax.jit(step, donate_argnums=(2,)).lower(params, ids, cache).compile(), cache


def test_dense_decode_step_writes_cache_in_place():
    compiled, cache = _compiled_step()
    hlo = compiled.as_text()
    full = cache.layers.k  # [L, B, Hkv, max_length, D]
    shape = "f32[" + ",".join(map(str, full.shape)) + "]"
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    # outside the layer loop, nothing but parameters / tuples may produce a whole stacked buffer
    producers = [re.search(r"\s([\w\-]+)\(", ln.split("=", 1)[1]).group(1)
                 for ln in entry.splitlines()[1:] if "=" in ln and ln.split("=", 1)[1].lstrip().startswith(shape)]
    assert set(producers) <= {"parameter", "get-tuple-element"}, producers
    # no copy of a stacked buffer anywhere (the donated input is the output)
    assert not re.search(r"= " + re.escape(shape) + r"\{[\d,]*\} copy\(", hlo)
    # temporaries stay below one stacked buffer (a copying step needs at least two)
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < full.nbytes, (mem.temp_size_in_bytes, full.nbytes)


def test_put_row_layer_matches_per_layer():
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.normal(size=(3, 2, 2, 8, 4)), jnp.float32)  # [L, B, H, T, D]
    x = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)  # two rows per batch row
    index = jnp.asarray([1, 6], jnp.int32)
    got = cc.put_row(buf, x, index, axis=1, layer=jnp.int32(2))
    want = buf.at[2].set(cc.put_row(buf[2], x, index, axis=1))
    np.testing.assert_array_equal(got, want)
    # per-layer put_row is dynamic_update_slice per row (clamped like it)
    for b in range(2):
        np.testing.assert_array_equal(want[2, b], jax.lax.dynamic_update_slice_in_dim(buf[2, b], x[b], int(index[b]), 1))


def _stacked_append_matches(one, num_layers=3, steps=5):
    st = StackedCache.stack(one, num_layers)
    rng = np.random.default_rng(1)
    b, h, d = one.batch_size, one.num_kv_heads, one.head_dim
    for _ in range(steps):
        for i in range(num_layers):
            k = jnp.asarray(rng.normal(size=(b, h, 1, d)), jnp.float32)
            v = jnp.asarray(rng.normal(size=(b, h, 1, d)), jnp.float32)
            want = st.layer(i).append(k, v)
            st = jax.jit(lambda st, i, k, v: st.append_layer(i, k, v))(st, jnp.int32(i), k, v)
            jax.tree.map(np.testing.assert_array_equal, st.layer(i), want)


def test_stacked_append_dense():
    one = kivi_jax.DenseCache.init(batch=2, num_kv_heads=2, head_dim=32, max_length=4, dtype=jnp.float32)
    _stacked_append_matches(one)  # includes full rows (max_length 4 < 5 steps): flagged, unchanged


def test_stacked_append_kivi():
    cfg = kivi_jax.KIVIConfig(2, 2, group_size=32, residual_length=32)
    one = kivi_jax.KIVICache.init(cfg, batch=2, num_kv_heads=2, head_dim=32, max_length=256, dtype=jnp.float32)
    _stacked_append_matches(one, steps=3)
