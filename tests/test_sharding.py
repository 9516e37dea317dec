"""Sharded decoding (kivi_jax.sharding) on 8 virtual CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before jax starts, so
the checks run in one child process (this file run as a script) and report JSON; the tests
assert on it. Child checks, on a small random Llama (3 layers, 4 KV heads, 8 query heads)
over a data=2 x model=4 mesh:

* generate with the mesh gives the same tokens as one device (KIVI and dense caches;
  reference attention, and the Pallas kernel in interpret mode under shard_map);
* the returned cache and the parameters carry the expected NamedShardings;
* generate_stream with the mesh gives generate's tokens;
* the compiled decode loop and prefill have no collective whose result has the shape (and dtype) of a
  cache array, global or per shard (the checker is shown to catch a forced gather);
* the Pallas decode attention under shard_map equals the reference (plain window and
  sliding window).

The rules' spec logic (divisibility fallback, unknown axes) is tested in this process on
an AbstractMesh, which needs no devices.
"""

from __future__ import annotations

import sys

import pytest

import devices8

MESH = dict(data=2, model=4)
L, B, HKV, HQ, D, V, T, N = 3, 6, 4, 8, 16, 96, 100, 10
LENGTHS = [100, 90, 77, 85, 96, 81]  # > R + chunk: the Pallas kernel walks quantized chunks
COLLECTIVE_OPS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


# ---- child process ---------------------------------------------------------------------------------

def _collectives(hlo: str):
    """[(op, [(dtype, shape), ...])] for every collective instruction in compiled HLO text."""
    import re

    out = []
    pat = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
    for line in hlo.splitlines():
        m = pat.search(line)
        if m:
            shapes = [(dt, tuple(int(x) for x in dims.split(",") if x))
                      for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))]
            out.append((m.group(2), shapes))
    return out


def _cache_shapes(cache, mesh_shape):
    """(dtype, shape) of every cache array: stacked and per-layer, global, per shard and
    half-gathered (batch or heads alone split)."""
    import jax
    import numpy as np

    names = {np.dtype("float32"): "f32", np.dtype("bfloat16"): "bf16", np.dtype("uint32"): "u32",
             np.dtype("int32"): "s32", np.dtype("bool"): "pred"}
    out = set()
    bs = (B, B // mesh_shape["data"])
    hs = (HKV, HKV // mesh_shape["model"])
    for x in jax.tree.leaves(cache):
        dt = names[np.dtype(x.dtype)]
        shape = tuple(x.shape)  # [L, B, ...]
        for b in bs:
            if len(shape) == 2:
                cands = [(shape[0], b)]
            else:
                cands = [(shape[0], b, h) + shape[3:] for h in hs]
            for c in cands:
                out.add((dt, c))
                out.add((dt, c[1:]))
    return out


def _gathered_cache(hlo: str, cache_shapes) -> list:
    return [(op, s) for op, shapes in _collectives(hlo) for s in shapes if s in cache_shapes]


def _child() -> dict:
    import importlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import kivi_jax
    import models
    from kivi_jax import attention_pallas, sharding
    from kivi_jax.attention import reference_decode_attention

    gen = importlib.import_module("kivi_jax.generate")
    res: dict = {"devices": jax.device_count()}
    mesh = sharding.make_mesh(**MESH)
    cfg = models.ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=L, num_heads=HQ,
                             num_kv_heads=HKV, head_dim=D)
    model = models.init_random(cfg, jax.random.key(3), init_std=0.2)
    ids = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)
    lens = np.asarray(LENGTHS, np.int32)
    kivi = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=16)
    common = dict(lengths=lens, max_new_tokens=N)

    # -- tokens: one device vs the mesh ---------------------------------------------------------------
    one = {name: gen.generate(model, ids, kivi=kv, attn_impl="reference", **common)
           for name, kv in (("kivi", kivi), ("dense", None))}
    sharded = {name: gen.generate(model, ids, kivi=kv, attn_impl="reference", mesh=mesh, **common)
               for name, kv in (("kivi", kivi), ("dense", None))}
    sharded["kivi_pallas"] = gen.generate(model, ids, kivi=kivi, attn_impl="pallas", mesh=mesh, **common)
    res["tokens_one"] = {k: np.asarray(v.tokens).tolist() for k, v in one.items()}
    res["tokens_sharded"] = {k: np.asarray(v.tokens).tolist() for k, v in sharded.items()}
    stream = gen.generate_stream(model, ids, kivi=None, attn_impl="reference", mesh=mesh, **common)
    steps = list(stream)
    res["stream_tokens"] = np.stack([np.where(st.emitted, st.tokens, 0) for st in steps], axis=1).tolist()
    res["lengths_equal"] = {k: bool((np.asarray(v.lengths) == np.asarray(one[k.split("_")[0]].lengths)).all())
                            for k, v in sharded.items()}

    # -- shardings of the returned cache and of the parameters -----------------------------------------
    def specs(tree):
        return {"/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path): leaf.sharding
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def described(tree):
        out = {}
        for name, s in specs(tree).items():
            out[name] = {"named": isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape,
                         "spec": list(map(lambda a: a if a is None or isinstance(a, str) else list(a),
                                          s.spec)) if isinstance(s, NamedSharding) else None}
        return out

    res["cache_specs"] = {k: described(v.cache) for k, v in sharded.items()}
    # normalised equality against the expected shardings (trailing Nones do not matter)
    res["cache_equivalent"] = {}
    for k, v in sharded.items():
        expected = sharding.cache_shardings(v.cache, mesh)
        res["cache_equivalent"][k] = all(
            a.sharding.is_equivalent_to(e, a.ndim)
            for a, e in zip(jax.tree.leaves(v.cache), jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, NamedSharding))))
    sharding.shard_model(model, mesh)
    res["param_specs"] = {k: v["spec"] for k, v in described(nnx_state(model)).items()}

    # -- HLO of the sharded decode step: no cache array gathered ------------------------------------------
    res["hlo"] = {}
    for name, kv, impl in (("kivi_reference", kivi, "reference"), ("kivi_pallas", kivi, "pallas"),
                           ("dense", None, "reference")):
        g, st, i, ln, keys, knobs, c = gen._prepare(
            model, ids, kivi=kv, temperature=0.0, top_k=None, top_p=None, eos_id=None, key=None, pad_id=0,
            max_length=None, cache_dtype=None, attn_impl=impl, mesh=mesh, rules=None, **common)
        carry = gen._run_prompt(g, st, i, ln, keys, knobs, c)
        shapes = _cache_shapes(carry.cache, mesh.shape)
        with gen._on_mesh(c):  # the programs generate runs: the decode loop and the prefill
            hlos = {"loop": gen._run(gen._decode_loop, g, st, carry, keys, knobs, c, lower=True).compile().as_text(),
                    "prefill": gen._prefill.lower(g, st, i, ln, keys, knobs, cfg=c).compile().as_text()}
        for part, hlo in hlos.items():
            res["hlo"][f"{name}/{part}"] = {"gathered": [[op, list(s)] for op, s in _gathered_cache(hlo, shapes)],
                                            "collectives": len(_collectives(hlo))}
        if name == "kivi_reference":  # negative control: a forced gather is caught
            forced = jax.jit(lambda cc: jax.lax.with_sharding_constraint(
                cc.layers.k_codes, NamedSharding(mesh, P(None, "data"))))
            res["hlo"]["control_gathered"] = len(_gathered_cache(forced.lower(carry.cache).compile().as_text(),
                                                                 shapes))

    # -- Pallas under shard_map vs the reference, on one layer's cache --------------------------------
    layer0 = sharded["kivi"].cache.layer(0)
    q = jax.random.normal(jax.random.key(7), (B, HQ, 1, D), jnp.float32)
    res["pallas_err"] = {}
    for window in (None, 40):
        ref = reference_decode_attention(q, jax.device_get(layer0), window=window)
        f = jax.jit(lambda q, c, w=window: attention_pallas.decode_attention(q, c, window=w, interpret=True,
                                                                             mesh=mesh))
        out = f(q, layer0)
        res["pallas_err"][str(window)] = float(jnp.max(jnp.abs(out - ref)))
        res["pallas_out_spec"] = list(out.sharding.spec)
        hlo = f.lower(q, layer0).compile().as_text()
        shapes = _cache_shapes(jax.tree.map(lambda x: x[None], layer0), mesh.shape)
        res["pallas_kernel_gathered"] = len(_gathered_cache(hlo, shapes))
    # the dense flash-decoding kernel under the same shard_map
    dense0 = sharded["dense"].cache.layer(0)
    out = jax.jit(lambda q, c: attention_pallas.decode_attention(q, c, window=40, interpret=True, mesh=mesh))(q, dense0)
    res["dense_pallas_err"] = float(jnp.max(jnp.abs(out - reference_decode_attention(q, jax.device_get(dense0),
                                                                                     window=40))))
    res["dense_pallas_out_spec"] = list(out.sharding.spec)

    # -- a continued cache (last: continuing donates the cache): the mesh gives one device's tokens --------
    nxt = np.random.default_rng(1).integers(0, V, (B, 4)).astype(np.int32)
    # (the caches hold lengths + N - 1 of T + N slots: row 0 has room for its 1 token, the others fill up too)
    more = dict(lengths=np.asarray([1, 4, 3, 2, 4, 1], np.int32), max_new_tokens=N, attn_impl="reference")
    cont_one = gen.generate(model, nxt, cache=one["kivi"].cache, **more)
    cont = gen.generate(model, nxt, cache=sharded["kivi"].cache, mesh=mesh, **more)
    expected = jax.tree.leaves(sharding.cache_shardings(cont.cache, mesh), is_leaf=lambda x: isinstance(x, NamedSharding))
    res["continued"] = {"one": np.asarray(cont_one.tokens).tolist(), "sharded": np.asarray(cont.tokens).tolist(),
                        "equivalent": all(a.sharding.is_equivalent_to(e, a.ndim)
                                          for a, e in zip(jax.tree.leaves(cont.cache), expected))}
    return res


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


# ---- tests -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def child(tmp_path_factory, worker_id):
    """The 8-device child's results, computed once per test run: under pytest-xdist the workers
    share one run through a file (the child takes about a minute; each worker that ran a test of
    this module ran it again)."""
    return devices8.shared_child(__file__, "sharding-child", tmp_path_factory, worker_id)


def test_eight_devices(child):
    assert child["devices"] == 8


@pytest.mark.parametrize("name", ["kivi", "dense", "kivi_pallas"])
def test_sharded_tokens_equal_one_device(child, name):
    base = name.split("_")[0]
    assert child["tokens_sharded"][name] == child["tokens_one"][base]
    assert child["lengths_equal"][name]


def test_sharded_stream_equals_generate(child):
    assert child["stream_tokens"] == child["tokens_one"]["dense"]


def test_continued_cache_on_the_mesh_equals_one_device(child):
    got = child["continued"]
    assert got["sharded"] == got["one"] and got["equivalent"]


def test_kivi_and_dense_differ(child):
    # the comparison above is not vacuous: 2-bit KIVI changes some greedy tokens here
    assert child["tokens_one"]["kivi"] != child["tokens_one"]["dense"]


@pytest.mark.parametrize("name", ["kivi", "dense", "kivi_pallas"])
def test_returned_cache_shardings(child, name):
    got = child["cache_specs"][name]
    assert all(v["named"] for v in got.values())
    assert child["cache_equivalent"][name]
    # stacked cache: [L, B, Hkv, ...] -> layers replicated, batch on data, KV heads on model
    bh = [None, "data", "model"]
    if name == "dense":
        expected = {"layers/k": bh, "layers/v": bh, "layers/lengths": [None, "data"], "layers/overflow": [None, "data"]}
    else:
        expected = {f"layers/{f}": bh for f in ("k_codes", "k_scale", "k_min", "k_res", "v_codes", "v_scale",
                                                  "v_min", "v_res")}
        expected.update({"layers/lengths": [None, "data"], "layers/overflow": [None, "data"]})
    assert {k: v["spec"] for k, v in got.items()} == expected


def test_param_shardings(child):
    p = {k.removesuffix("/value"): v for k, v in child["param_specs"].items()}
    assert p["layers/q_proj"] == [None, None, "model"]
    assert p["layers/k_proj"] == [None, None, "model"]
    assert p["layers/v_proj"] == [None, None, "model"]
    assert p["layers/o_proj"] == [None, "model"]
    assert p["layers/gate_proj"] == [None, None, "model"]
    assert p["layers/up_proj"] == [None, None, "model"]
    assert p["layers/down_proj"] == [None, "model"]
    assert p["embed"] == ["model"] and p["lm_head"] == [None, "model"]
    assert p["final_norm"] == [] and p["layers/attn_norm"] == [] and p["layers/mlp_norm"] == []


@pytest.mark.parametrize("name", ["kivi_reference", "kivi_pallas", "dense"])
@pytest.mark.parametrize("part", ["loop", "prefill"])
def test_compiled_programs_gather_no_cache_array(child, name, part):
    h = child["hlo"][f"{name}/{part}"]
    assert h["gathered"] == []
    assert h["collectives"] > 0  # tensor parallelism does communicate (activations)


def test_gather_checker_catches_a_gather(child):
    assert child["hlo"]["control_gathered"] > 0


def test_pallas_under_shard_map_matches_reference(child):
    assert child["pallas_err"]["None"] < 1e-5
    assert child["pallas_err"]["40"] < 1e-5
    assert child["pallas_out_spec"][:2] == ["data", "model"]
    assert child["pallas_kernel_gathered"] == 0
    assert child["dense_pallas_err"] < 1e-5
    assert child["dense_pallas_out_spec"][:2] == ["data", "model"]


# ---- rules (no devices needed) --------------------------------------------------------------------

def _abstract_mesh(shape=(2, 4), names=("data", "model")):
    import jax

    try:
        return jax.sharding.AbstractMesh(shape, names)
    except TypeError:  # older signature: a tuple of (name, size)
        return jax.sharding.AbstractMesh(tuple(zip(names, shape)))


def test_rules_spec_divisibility_and_missing_axes():
    from jax.sharding import PartitionSpec as P

    from kivi_jax.sharding import DEFAULT_RULES, ShardingRules

    mesh = _abstract_mesh()
    r = DEFAULT_RULES
    assert r.spec(("batch", "kv_heads", "sequence", "head_dim"), (4, 8, 64, 16), mesh) == P("data", "model")
    assert r.spec(("batch", "kv_heads", "sequence", "head_dim"), (3, 2, 64, 16), mesh) == P()  # neither divides
    assert r.spec(("embed", "heads"), (64, 3 * 16), mesh, units={"heads": 3}) == P()  # 3 heads on 4 shards
    assert r.spec(("embed", "heads"), (64, 4 * 16), mesh, units={"heads": 4}) == P(None, "model")
    assert r.spec(("batch",), (4,), _abstract_mesh((8,), ("x",))) == P()  # the mesh lacks "data"
    both = ShardingRules(batch=("data", "model"), kv_heads="model")
    assert both.spec(("batch", "kv_heads"), (8, 4), mesh) == P(("data", "model"))  # "model" used once
    with pytest.raises(ValueError, match="logical axis"):
        r.spec(("tokens",))
    with pytest.raises(ValueError, match="ShardingRules.batch"):
        ShardingRules(batch=3)


def test_given_rules_must_name_the_meshs_axes():
    """Rules passed to generate are meant: a mesh axis they name that the mesh lacks (a typo)
    would replicate that array silently, and rules without a mesh would be dropped."""
    import numpy as np

    from kivi_jax import generate
    from kivi_jax.sharding import ShardingRules, make_mesh

    model = lambda ids, cache, lengths=None: (None, cache)  # noqa: E731 (rejected before any call)
    model.init_cache = lambda b, n, kivi=None: None
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"rules name mesh axes \['modle'\] that mesh= lacks \(its axes: "
                                         r"\['data', 'model'\]\)"):
        generate(model, ids, max_new_tokens=2, mesh=make_mesh(1, 1), rules=ShardingRules(kv_heads="modle"))
    with pytest.raises(ValueError, match=r"rules= maps logical axes onto a mesh: pass mesh= too"):
        generate(model, ids, max_new_tokens=2, rules=ShardingRules())


def test_query_heads_follow_kv_heads():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import models
    from kivi_jax.sharding import param_specs

    # SmolLM2-like: 9 query heads over 3 KV heads do not split 4 ways: both replicated
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=12,
                             num_kv_heads=3, head_dim=8)
    state = {"layers": {"q_proj": jnp.zeros((2, 32, 96)), "k_proj": jnp.zeros((2, 32, 24)),
                        "gate_proj": jnp.zeros((2, 32, 64))}}
    s = param_specs(state, _abstract_mesh(), config=cfg)
    assert s["layers"]["q_proj"] == P() and s["layers"]["k_proj"] == P()
    assert s["layers"]["gate_proj"] == P(None, None, "model")


if __name__ == "__main__" and "--child" in sys.argv:
    devices8.child_main(__file__, _child)
