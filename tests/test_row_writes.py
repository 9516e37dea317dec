"""The row-writes kernel (pallas_kernels.row_writes, interpret mode here) and the decode step's
writes through it (cache_common.apply_writes with impl="pallas"): the same bits as a NumPy
statement of the writes and as the XLA scatters, one launch for a step's plain writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpr_walk
from kivi_jax import DenseCache, KIVICache, KIVIConfig
from kivi_jax import cache_common as cc
from models.cache import StackedCache
from pallas_kernels.row_writes import row_writes


def _expected(buf, value, index, keep, add, layer):
    out = np.array(buf).copy()
    view = out if layer is None else out[layer]
    for b in range(value.shape[0]):
        if keep[b]:
            slab = np.array(value[b, :, 0])
            view[b, :, int(index[b])] = view[b, :, int(index[b])] + slab if add else slab
    return out


@pytest.mark.parametrize("layer", [None, 2])
def test_row_writes_match_numpy(layer):
    rng = np.random.default_rng(7)
    b, h = 5, 3
    lead = (b, h) if layer is None else (4, b, h)
    bufs = (jnp.asarray(rng.standard_normal(lead + (9, 16)), jnp.bfloat16),
            jnp.asarray(rng.integers(0, 2**31, lead + (6, 16)), jnp.uint32),
            jnp.asarray(rng.standard_normal(lead + (11, 4)), jnp.float32))
    vals = (jnp.asarray(rng.standard_normal((b, h, 1, 16)), jnp.bfloat16),
            jnp.asarray(rng.integers(0, 2**20, (b, h, 1, 16)), jnp.uint32),
            jnp.asarray(rng.standard_normal((b, h, 1, 4)), jnp.float32))
    idx = tuple(jnp.asarray(rng.integers(0, x.shape[-2], b), jnp.int32) for x in bufs)
    keep = tuple(jnp.asarray(k) for k in ([1, 0, 1, 1, 0], [1, 1, 0, 1, 1], [0, 1, 1, 1, 1]))
    keep = tuple(k.astype(bool) for k in keep)
    adds = (False, True, False)
    out = row_writes(bufs, vals, idx, keep, adds=adds, layer=None if layer is None else jnp.int32(layer),
                     interpret=True)
    for got, *args in zip(out, bufs, vals, idx, keep, adds):
        want = _expected(*args, layer)
        assert got.dtype == args[0].dtype
        np.testing.assert_array_equal(np.asarray(got), want)
        assert not np.array_equal(want, np.asarray(args[0]))  # something was written


@pytest.mark.parametrize("layer", [None, 2])
def test_row_writes_out_of_range_write_nothing(layer):
    """An index outside [0, N) or a layer outside [0, L) is dropped, as XLA's FILL_OR_DROP
    scatter drops it: Triton stores are not bounds-checked (the interpreter would clamp the
    slab onto the last slot or layer instead)."""
    rng = np.random.default_rng(11)
    b, h, n = 4, 2, 6
    lead = (b, h) if layer is None else (3, b, h)
    buf = jnp.asarray(rng.standard_normal(lead + (n, 16)), jnp.float32)
    val = jnp.asarray(rng.standard_normal((b, h, 1, 16)), jnp.float32)
    idx = jnp.asarray([n, -1, 2, n + 5], jnp.int32)  # only row 2 is in range
    keep = jnp.ones(b, bool)
    lay = None if layer is None else jnp.int32(layer)
    out, = row_writes((buf,), (val,), (idx,), (keep,), adds=(False,), layer=lay, interpret=True)
    want = _expected(buf, val, jnp.asarray([0, 0, 2, 0], jnp.int32), jnp.asarray([0, 0, 1, 0], bool), False, layer)
    np.testing.assert_array_equal(np.asarray(out), want)
    if layer is not None:  # a layer past the stack (or before it) writes nothing at all
        for bad in (3, -1):
            out, = row_writes((buf,), (val,), (jnp.zeros(b, jnp.int32),), (keep,), adds=(True,),
                              layer=jnp.int32(bad), interpret=True)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(buf))


def test_row_writes_bad_arguments():
    buf = jnp.zeros((2, 3, 8, 16))
    val = jnp.ones((2, 3, 1, 16))
    i = jnp.zeros(2, jnp.int32)
    k = jnp.ones(2, bool)
    with pytest.raises(ValueError, match="need as many"):
        row_writes((buf,), (val, val), (i,), (k,), adds=(False,), interpret=True)
    with pytest.raises(ValueError, match=r"value \(2, 3, 1, 8\)"):
        row_writes((buf,), (val[..., :8],), (i,), (k,), adds=(False,), interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        row_writes((buf[..., :12],), (val[..., :12],), (i,), (k,), adds=(False,), interpret=True)
    with pytest.raises(ValueError, match="writes impl='fast'"):
        cc.apply_writes(StackedCache.stack(DenseCache.init(batch=2, num_kv_heads=3, head_dim=16, max_length=8),
                                           2).layers, (cc.RowWrite(val, i, "k", 1),), i, k, layer=0, impl="fast")


def _appends(cache: StackedCache, impl, steps, layer, seed):
    """``steps`` appends into layer ``layer`` of a stacked cache with the writes ``impl``."""
    rng = np.random.default_rng(seed)
    one = cache.layer(layer)
    shape = (one.batch_size, one.num_kv_heads, 1, one.head_dim)

    @jax.jit
    def step(layers, k, v):
        one = jax.tree.map(lambda x: x[layer], layers)
        return cc.apply_writes(layers, *one.append_writes(k, v), layer=jnp.int32(layer), impl=impl)

    layers = cache.layers
    for _ in range(steps):
        k, v = (jnp.asarray(rng.standard_normal(shape), one.dtype) for _ in range(2))
        layers = step(layers, k, v)
    return layers


@pytest.mark.parametrize("kind", ["kivi", "kivi_sinks", "dense"])
def test_decode_writes_through_the_kernel_equal_xla(kind):
    """Appends past flushes, window spills and full rows (max_length reached) give the same
    cache bit for bit through the kernel and through XLA's scatters."""
    b, h, d, max_len = 3, 2, 64, 80
    rng = np.random.default_rng(3)
    if kind == "dense":
        one = DenseCache.init(batch=b, num_kv_heads=h, head_dim=d, max_length=max_len, dtype=jnp.bfloat16)
    else:
        cfg = KIVIConfig(2, 2, group_size=32, residual_length=32, sink_tokens=3 if kind == "kivi_sinks" else 0)
        one = KIVICache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=max_len, dtype=jnp.bfloat16)
    t = 40
    kv = [jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.bfloat16) for _ in range(2)]
    one = one.prefill(*kv, lengths=jnp.array([40, 5, 30]))
    cache = StackedCache(jax.tree.map(lambda x: jnp.stack([jnp.zeros_like(x), x, jnp.zeros_like(x)]), one))
    got = _appends(cache, "pallas", 60, 1, seed=11)  # row 0 reaches max_length and overflows
    want = _appends(cache, "xla", 60, 1, seed=11)
    assert bool(got.overflow[1, 0]) and not bool(got.overflow[1, 1])
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(got.lengths[1]), [max_len, 65, 80])


def test_a_decode_step_writes_with_one_launch():
    """A KIVI append's plain writes (key, value, the leaving value's word, scale and min) are
    one pallas_call; the key flush (under its cond) stays with XLA."""
    cfg = KIVIConfig(2, 2, group_size=32, residual_length=32)
    one = KIVICache.init(cfg, batch=2, num_kv_heads=2, head_dim=64, max_length=128)
    layers = StackedCache.stack(one, 2).layers
    k = jnp.ones((2, 2, 1, 64), jnp.bfloat16)

    def step(layers, impl):
        one = jax.tree.map(lambda x: x[1], layers)
        return cc.apply_writes(layers, *one.append_writes(k, k), layer=jnp.int32(1), impl=impl)

    def calls(impl):
        jaxpr = jax.make_jaxpr(lambda l: step(l, impl))(layers).jaxpr
        return jaxpr_walk.pallas_calls(jaxpr)

    assert len(calls("pallas")) == 1
    assert calls("xla") == []
    assert len(calls("auto")) == (jax.default_backend() == "gpu" and jax.device_count() == 1)


def test_row_writes_under_vmap():
    """Batched experiments vmap the decode step: the kernel's batching gives each member its own writes."""
    rng = np.random.default_rng(5)
    n, b, h = 3, 2, 2
    buf = jnp.asarray(rng.standard_normal((n, 4, b, h, 8, 16)), jnp.float32)  # [vmap, L, B, H, N, X]
    val = jnp.asarray(rng.standard_normal((n, b, h, 1, 16)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 8, (n, b)), jnp.int32)
    keep = jnp.asarray([[1, 0], [1, 1], [0, 1]], bool)

    def one(buf, val, idx, keep):
        return row_writes((buf,), (val,), (idx,), (keep,), adds=(False,), layer=jnp.int32(1), interpret=True)[0]

    out = jax.vmap(one)(buf, val, idx, keep)
    for i in range(n):
        np.testing.assert_array_equal(np.asarray(out[i]), _expected(buf[i], val[i], idx[i], keep[i], False, 1))
