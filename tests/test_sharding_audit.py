"""Audit of kivi_jax.sharding beyond tests/test_sharding.py: hand-derived PartitionSpecs, meshes whose
axes do not divide the batch or the KV heads, GQA ratios 1 / 4 / 8, the Mosaic cache layout, a
one-device cache continued on a data-only mesh, an Explicit-axes mesh, and bad inputs.

Multi-device checks run in ONE child process on 8 virtual CPU devices (as in test_sharding.py:
the device count is fixed when jax starts); its expectations are one device's float32 results
in the same process: the same greedy tokens, and the same cache (counters exact; full-precision
parts to float32 rounding: a projection split over the mesh rounds its last bit differently on
XLA:CPU; quantized code words all but the rare code a rounding moves across a level).
"""

from __future__ import annotations

import sys

import pytest

import devices8

V = 64


# ---- child process (8 CPU devices) -------------------------------------------------------------------

def _child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kivi_jax
    import models
    from kivi_jax import sharding
    from kivi_jax.attention import reference_decode_attention

    gen = kivi_jax.generate
    rng = np.random.default_rng(0)
    res: dict = {"devices": jax.device_count()}

    def model_of(hq, hkv, d=16):
        cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=hq,
                                 num_kv_heads=hkv, head_dim=d)
        return models.init_random(cfg, jax.random.key(3), init_std=0.3)

    def cache_diff(a, b):
        """(counters equal, max |float difference| / (1 + |x|), fraction of uint32 words equal)."""
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb)
        counters, err, words = True, 0.0, []
        for x, y in zip(la, lb):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype == np.uint32:
                words.append(x == y)
            elif np.issubdtype(x.dtype, np.floating):
                err = max(err, float(np.max(np.abs(x.astype(np.float64) - y) / (1 + np.abs(x)))))
            else:
                counters &= bool(np.array_equal(x, y))
        same = float(np.mean(np.concatenate([w.ravel() for w in words]))) if words else 1.0
        return counters, err, same

    def specs(cache, names):
        return {n: [s if s is None or isinstance(s, str) else list(s) for s in getattr(cache.layers, n).sharding.spec]
                for n in names}

    def compare(one, sharded):
        return {"one": np.asarray(one.tokens).tolist(), "sharded": np.asarray(sharded.tokens).tolist(),
                "cache": cache_diff(one.cache, sharded.cache)}

    # -- GQA 8:1, a mesh that divides neither B=3 (data=2) nor Hkv=1 (model=4): all replicated ------------
    kivi = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=16, layout="tokens")
    m = model_of(8, 1)
    ids = rng.integers(0, V, (3, 24)).astype(np.int32)
    kw = dict(lengths=np.asarray([24, 19, 7], np.int32), max_new_tokens=3, kivi=kivi, attn_impl="pallas")
    out = gen(m, ids, mesh=sharding.make_mesh(2, 4), **kw)
    res["gqa8"] = compare(gen(m, ids, **kw), out)
    res["gqa8"]["specs"] = specs(out.cache, ("k_codes", "v_scale", "k_res", "lengths"))

    # -- the Mosaic layout (head_dim 128; reference attention off the GPU) on a 2 x 2 mesh ---------------
    mm = model_of(4, 2, d=128)
    mk = kivi_jax.KIVIConfig(residual_length=32, layout="mosaic")
    ids = rng.integers(0, V, (4, 40)).astype(np.int32)
    kw = dict(lengths=np.asarray([40, 35, 12, 33], np.int32), max_new_tokens=3, kivi=mk, max_length=48)
    one = gen(mm, ids, **kw)
    out = gen(mm, ids, mesh=sharding.make_mesh(2, 2), **kw)
    res["mosaic"] = compare(one, out)
    res["mosaic"]["type"] = type(out.cache.layers).__name__
    res["mosaic"]["specs"] = specs(out.cache, ("kn", "kt", "k_res", "vn", "vt", "v_res", "lengths"))
    on_2x2 = out.cache

    # -- that one-device cache continued on a data-only mesh (4 x 1) vs on one device ---------------------
    nxt = rng.integers(0, V, (4, 2)).astype(np.int32)
    # (one token: the prompt fed into the cache is what is checked, not the decode loop again)
    more = dict(lengths=np.asarray([1, 2, 2, 1], np.int32), max_new_tokens=1)
    copy = jax.tree.map(jnp.copy, one.cache)  # (continuing donates the cache it is given)
    out = gen(mm, nxt, cache=copy, mesh=sharding.make_mesh(4, 1), **more)
    res["continued"] = compare(gen(mm, nxt, cache=one.cache, **more), out)
    res["continued"]["specs"] = specs(out.cache, ("kn", "vt", "lengths"))

    # -- the 2 x 2 mesh's cache continued on another mesh (4 x 2, all 8 devices): generate places it there --
    try:
        out = gen(mm, nxt, cache=on_2x2, mesh=sharding.make_mesh(4, 2), **more)
        res["moved"] = {"tokens": np.asarray(out.tokens).tolist(), "specs": specs(out.cache, ("kn", "lengths")),
                        "devices": len(out.cache.layers.kn.sharding.device_set)}
    except Exception as e:  # (reported, asserted on below)
        res["moved"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    # -- the decode kernel under jax.set_mesh of jax.make_mesh's default (Explicit) axes -------------------
    # (the dense kernel: the shard_map wrapper is the KIVI kernel's too, and it compiles faster)
    b, hkv, hq, d = 4, 2, 4, 16
    k, v = (jnp.asarray(rng.normal(size=(b, hkv, 40, d)), jnp.float32) for _ in range(2))
    cache = kivi_jax.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=48,
                                     dtype=jnp.float32).prefill(k, v, jnp.asarray([40, 33, 17, 21], jnp.int32))
    q = jnp.asarray(rng.normal(size=(b, hq, 1, d)), jnp.float32)
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    res["explicit_axes"] = [t.name for t in mesh.axis_types]
    try:
        with jax.set_mesh(mesh):
            got = jax.jit(lambda q, c: kivi_jax.decode_attention(q, c, impl="pallas"))(q, cache)
        res["explicit"] = {"err": float(jnp.max(jnp.abs(got - reference_decode_attention(q, cache)))),
                           "spec": [s for s in got.sharding.spec]}
    except Exception as e:  # (reported, asserted on below)
        res["explicit"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


@pytest.fixture(scope="module")
def child(tmp_path_factory, worker_id):
    """The child's results, once per run (under pytest-xdist shared through a file)."""
    return devices8.shared_child(__file__, "sharding-audit-child", tmp_path_factory, worker_id)


def _nontrivial(tokens):
    # the equality below is not vacuous: the greedy tokens vary
    return len({t for row in tokens for t in row}) > 1


@pytest.mark.parametrize("case", ["gqa8", "mosaic", "continued"])
def test_mesh_equals_one_device_float32(child, case):
    got = child[case]
    assert child["devices"] == 8
    assert got["sharded"] == got["one"] and _nontrivial(got["one"])
    counters, err, words = got["cache"]
    assert counters and err < 1e-5 and words > 0.99


def test_non_dividing_mesh_replicates(child):
    # B=3 on data=2 and Hkv=1 on model=4: nothing divides, so no cache array is split
    assert child["gqa8"]["specs"] == {"k_codes": [], "v_scale": [], "k_res": [], "lengths": []}


def test_mosaic_cache_shardings(child):
    assert child["mosaic"]["type"] == "MosaicKIVICache"
    bh = [None, "data", "model"]  # [L, B, Hkv, ...]: B=4 on data=2, Hkv=2 on model=2
    expected = {n: bh for n in ("kn", "kt", "k_res", "vn", "vt", "v_res")}
    assert child["mosaic"]["specs"] == dict(expected, lengths=[None, "data"])


def test_continued_on_data_only_mesh_shardings(child):
    assert child["continued"]["specs"] == {"kn": [None, "data"], "vt": [None, "data"], "lengths": [None, "data"]}


def test_cache_continued_on_another_mesh_is_placed_there(child):
    """A cache living on a 2 x 2 mesh's four devices, continued with mesh= a 4 x 2 mesh of all eight:
    generate puts it on the new mesh (jit refused "incompatible devices" before) and its first token
    is one device's."""
    moved = child["moved"]
    assert "error" not in moved, moved
    assert moved["tokens"] == child["continued"]["one"]
    assert moved["devices"] == 8 and moved["specs"] == {"kn": [None, "data", "model"], "lengths": [None, "data"]}


def test_kernel_under_explicit_axes_mesh(child):
    """jax.make_mesh defaults to Explicit axes in jax >= 0.10; shard_map refuses inputs not already in
    its in_specs there (it raised "in_specs passed to shard_map ... does not match"): the kernel
    reshards them first."""
    assert child["explicit_axes"] == ["Explicit", "Explicit"]
    got = child["explicit"]
    assert "error" not in got, got
    assert got["err"] < 1e-5
    assert got["spec"][:2] == ["data", "model"]


# ---- hand-derived specs (AbstractMesh: no devices) -------------------------------------------------------

def _abstract_mesh(shape=(2, 4), names=("data", "model")):
    import jax

    try:
        return jax.sharding.AbstractMesh(shape, names)
    except TypeError:  # older signature
        return jax.sharding.AbstractMesh(tuple(zip(names, shape)))


def _stacked_shapes(cls, b, hkv, d=16, layers=2, **kw):
    import jax
    import jax.numpy as jnp

    import kivi_jax

    if cls == "dense":
        fn = lambda: kivi_jax.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=64)  # noqa: E731
    else:
        layout = "mosaic" if cls == "mosaic" else "tokens"
        cfg = kivi_jax.KIVIConfig(group_size=16 if layout == "tokens" else 32, residual_length=32, layout=layout)
        cache_cls = kivi_jax.MosaicKIVICache if cls == "mosaic" else kivi_jax.KIVICache
        fn = lambda: cache_cls.init(cfg, batch=b, num_kv_heads=hkv, head_dim=d, max_length=64,  # noqa: E731
                                    dtype=jnp.float32)
    one = jax.eval_shape(fn)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((layers,) + x.shape, x.dtype), one)


@pytest.mark.parametrize("cls", ["kivi", "dense", "mosaic"])
@pytest.mark.parametrize("b,hkv,mesh,bh", [
    (6, 4, ((2, 4), ("data", "model")), [None, "data", "model"]),
    (6, 2, ((2, 4), ("data", "model")), [None, "data"]),  # 2 KV heads on 4 shards: replicated
    (3, 8, ((2, 4), ("data", "model")), [None, None, "model"]),  # 3 rows on 2 shards: replicated
    (3, 1, ((2, 4), ("data", "model")), []),
    (8, 4, ((8,), ("data",)), [None, "data"]),  # data-only mesh
    (8, 4, ((2, 4), ("x", "y")), []),  # the default rules name neither axis
])
def test_cache_specs_hand_derived(cls, b, hkv, mesh, bh):
    from jax.sharding import PartitionSpec as P

    from kivi_jax.sharding import cache_specs

    d = 128 if cls == "mosaic" else 16
    shapes = _stacked_shapes(cls, b, hkv, d)
    specs = cache_specs(shapes, _abstract_mesh(*mesh))
    arrays = [f for f in vars(specs) if f not in ("lengths", "overflow", "config", "max_length")]
    assert len(arrays) == {"kivi": 8, "dense": 2, "mosaic": 6}[cls]
    for f in arrays:
        assert getattr(specs, f) == P(*bh), f
    lengths = bh[:2] if bh[1:2] != [None] else []  # [L, B]: (a PartitionSpec keeps trailing Nones in ==)
    assert specs.lengths == specs.overflow == P(*lengths)


def test_cache_specs_tuple_rules_use_each_mesh_axis_once():
    from jax.sharding import PartitionSpec as P

    from kivi_jax.sharding import ShardingRules, cache_specs

    specs = cache_specs(_stacked_shapes("kivi", 8, 4), _abstract_mesh(), ShardingRules(batch=("data", "model")))
    assert specs.k_codes == P(None, ("data", "model")) and specs.lengths == P(None, ("data", "model"))
    # 4 rows do not split 8 ways: the batch is replicated and the KV heads take "model" again
    specs = cache_specs(_stacked_shapes("kivi", 4, 4), _abstract_mesh(), ShardingRules(batch=("data", "model")))
    assert specs.k_codes == P(None, None, "model") and specs.lengths == P()


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_param_specs_gqa_ratios(hq, hkv):
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import models
    from kivi_jax.sharding import param_specs

    d, h = 16, 32
    cfg = models.ModelConfig(vocab_size=V, hidden_size=h, intermediate_size=64, num_layers=2, num_heads=hq,
                             num_kv_heads=hkv, head_dim=d)
    state = {"embed": jnp.zeros((V, h)), "layers": {
        "q_proj": jnp.zeros((2, h, hq * d)), "k_proj": jnp.zeros((2, h, hkv * d)),
        "v_proj": jnp.zeros((2, h, hkv * d)), "o_proj": jnp.zeros((2, hq * d, h)),
        "up_proj": jnp.zeros((2, h, 64)), "attn_norm": jnp.zeros((2, h))}}
    s = param_specs(state, _abstract_mesh(), config=cfg)["layers"]
    heads = hkv % 4 == 0  # KV heads split 4 ways only when they divide; query heads follow them
    assert s["k_proj"] == s["v_proj"] == (P(None, None, "model") if heads else P())
    assert s["q_proj"] == (P(None, None, "model") if heads else P())
    assert s["o_proj"] == (P(None, "model") if heads else P())
    assert s["up_proj"] == P(None, None, "model") and s["attn_norm"] == P()
    # a data-only mesh splits no parameter
    only = param_specs(state, _abstract_mesh((8,), ("data",)), config=cfg)
    assert all(x == P() for x in [only["embed"]] + list(only["layers"].values()))


# ---- bad inputs: named errors (one device) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_mesh():
    from kivi_jax.sharding import make_mesh

    return make_mesh(1, 1)


@pytest.fixture(scope="module")
def small_cache():
    import kivi_jax

    return kivi_jax.DenseCache.init(batch=2, num_kv_heads=2, head_dim=16, max_length=8)


def test_make_mesh_errors():
    import jax

    from kivi_jax.sharding import make_mesh

    with pytest.raises(ValueError, match=r"data=0 must be a positive integer"):
        make_mesh(0, 1)
    with pytest.raises(ValueError, match=r"model=2\.0 must be a positive integer"):
        make_mesh(1, 2.0)
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"data={n + 1} x model=1 = {n + 1} devices; only {n} available"):
        make_mesh(n + 1, 1)


def test_rules_refuse_empty_and_repeated_axis_names():
    from kivi_jax.sharding import ShardingRules

    # ("data", "data") was accepted and failed only when placed (DuplicateSpecError); "" replicated silently
    with pytest.raises(ValueError, match=r"ShardingRules\.batch=\('data', 'data'\) must name each mesh axis once"):
        ShardingRules(batch=("data", "data"))
    with pytest.raises(ValueError, match=r"ShardingRules\.kv_heads='' must name each mesh axis once"):
        ShardingRules(kv_heads="")
    with pytest.raises(TypeError, match="tokens"):  # a logical axis the rules do not know
        ShardingRules(tokens="data")


def test_placement_refuses_bad_mesh_and_rules(one_mesh, small_cache):
    """shard_cache / shard_model raised AttributeError on a non-mesh or non-rules argument, and
    replicated silently where the rules name a mesh axis the mesh lacks (generate refuses those)."""
    import jax

    import models
    from kivi_jax.sharding import ShardingRules, shard_cache, shard_model, use_mesh

    with pytest.raises(TypeError, match=r"mesh='mesh' must be a jax.sharding.Mesh .*got a str"):
        shard_cache(small_cache, "mesh")
    with pytest.raises(TypeError, match=r"rules=\{'batch': 'data'\} must be None .* or a kivi_jax.sharding."
                                        r"ShardingRules; got a dict"):
        shard_cache(small_cache, one_mesh, {"batch": "data"})
    with pytest.raises(ValueError, match=r"rules name mesh axes \['modle'\] that mesh lacks \(its axes: "
                                         r"\['data', 'model'\]\)"):
        shard_cache(small_cache, one_mesh, ShardingRules(kv_heads="modle"))
    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=8)
    model = models.init_random(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"rules name mesh axes \['dp'\]"):
        shard_model(model, one_mesh, ShardingRules(batch="dp"))
    with pytest.raises(TypeError, match=r"mesh=\[.*\] must be a jax.sharding.Mesh"):
        shard_model(model, jax.devices())
    with pytest.raises(TypeError, match=r"mesh='x' must be a jax.sharding.Mesh"):
        with use_mesh("x"):
            pass
    with pytest.raises(TypeError, match=r"rules=3 must be None"):
        with use_mesh(one_mesh, 3):
            pass


def test_decode_attention_refuses_bad_mesh_and_rules(one_mesh, small_cache):
    import jax.numpy as jnp

    from kivi_jax import attention_pallas
    from kivi_jax.sharding import ShardingRules

    q = jnp.zeros((2, 4, 1, 16), jnp.float32)
    with pytest.raises(TypeError, match=r"mesh='x' must be a jax.sharding.Mesh or AbstractMesh"):
        attention_pallas.decode_attention(q, small_cache, mesh="x", interpret=True)
    with pytest.raises(TypeError, match=r"rules=\{'batch': 'data'\} must be None"):
        attention_pallas.decode_attention(q, small_cache, mesh=one_mesh, rules={"batch": "data"}, interpret=True)
    with pytest.raises(ValueError, match=r"rules name mesh axes \['modle'\] that mesh lacks"):
        attention_pallas.decode_attention(q, small_cache, mesh=one_mesh, rules=ShardingRules(kv_heads="modle"),
                                          interpret=True)


if __name__ == "__main__" and "--child" in sys.argv:
    devices8.child_main(__file__, _child)
