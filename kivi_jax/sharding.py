"""Sharded decoding: logical axis names mapped to a device mesh by one rules object.

Every array the library holds names its axes with logical names — ``batch``, ``kv_heads``,
``heads``, ``sequence``, ``head_dim``, ``embed``, ``mlp``, ``vocab``, ``layers`` — and one
:class:`ShardingRules` maps each name to mesh axes (or to nothing: replicated)::

    mesh = make_mesh(data=2, model=4)                 # 8 devices: batch x heads
    model = shard_model(model, mesh)                  # q/k/v/o heads and the MLP on "model"
    out = kivi_jax.generate(model, ids, max_new_tokens=64, kivi=cfg, mesh=mesh)
    out.cache.layers.k_codes.sharding                 # NamedSharding(mesh, P(None, 'data', 'model', None, None))

Default rules (:data:`DEFAULT_RULES`): batch -> "data"; kv_heads, heads, mlp, vocab ->
"model"; sequence, head_dim, embed, layers -> replicated. A dimension is split only when
the mesh has the axis and the dimension divides evenly (heads count, not heads x head_dim,
for fused projections); otherwise it is replicated, so any model runs on any mesh. Query
heads are split only when the KV heads are (attention then needs no communication: each
shard holds whole GQA groups).

The cache is split on batch and kv_heads only: every step's append and attention are local
to a shard, and the Pallas decode kernel runs under ``shard_map`` over batch x kv_heads
(:mod:`kivi_jax.attention_pallas`), so no cache array is ever gathered. The plain-JAX
reference path relies on GSPMD propagation from these shardings.

jax versions: ``jax.shard_map`` (0.10+) or ``jax.experimental.shard_map.shard_map``
(older), see :func:`shard_map`. Meshes are built with ``AxisType.Auto`` axes (GSPMD
propagation; ``jax.make_mesh`` defaults to Explicit axes in jax >= 0.10).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kivi_jax.cache_dense import DenseCache
from kivi_jax.cache_kivi import KIVICache
from kivi_jax.cache_mosaic import MosaicKIVICache

LOGICAL_AXES = ("batch", "kv_heads", "heads", "sequence", "head_dim", "embed", "mlp", "vocab", "layers")

MeshAxes = Any  # None | str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name(s): None (replicated), a name, or a tuple of names.

    Frozen and hashable (jit specializes on it). ``rules.spec(("batch", "kv_heads"), shape,
    mesh)`` gives the PartitionSpec an array of that shape gets on that mesh.
    """

    batch: MeshAxes = "data"
    kv_heads: MeshAxes = "model"
    heads: MeshAxes = "model"
    sequence: MeshAxes = None
    head_dim: MeshAxes = None
    embed: MeshAxes = None
    mlp: MeshAxes = "model"
    vocab: MeshAxes = "model"
    layers: MeshAxes = None

    def __post_init__(self):
        for name in LOGICAL_AXES:
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, v := tuple(v))
            ok = v is None or isinstance(v, str) or (isinstance(v, tuple) and all(isinstance(a, str) for a in v))
            if not ok:
                raise ValueError(f"ShardingRules.{name}={v!r} must be None, a mesh axis name or a tuple of names")
            # an empty name matches no mesh axis (replicated silently); a repeated one gave a
            # PartitionSpec that NamedSharding refuses (DuplicateSpecError) only when placed
            names = (v,) if isinstance(v, str) else v or ()
            if "" in names or len(set(names)) != len(names):
                raise ValueError(f"ShardingRules.{name}={v!r} must name each mesh axis once, by a non-empty name")

    def named_mesh_axes(self) -> set[str]:
        """Every mesh axis name the rules use."""
        return {a for name in LOGICAL_AXES for a in self.mesh_axes(name)}

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes a logical axis maps to (empty: replicated). None -> replicated."""
        if logical is None:
            return ()
        if logical not in LOGICAL_AXES:
            raise ValueError(f"logical axis {logical!r} unknown; allowed: {LOGICAL_AXES} or None")
        v = getattr(self, logical)
        return () if v is None else (v,) if isinstance(v, str) else tuple(v)

    def spec(self, logical_axes, shape=None, mesh: Mesh | None = None, units: dict | None = None) -> P:
        """PartitionSpec for an array whose axes have the given logical names.

        With ``shape`` and ``mesh``: mesh axes the mesh lacks are dropped, a dimension that
        does not divide by its mesh axes' size is replicated, and no mesh axis is used twice.
        units: logical name -> count that must divide instead of the dimension (e.g.
        {"heads": Hq} for a fused [H, Hq*D] projection).
        """
        units = units or {}
        used: set[str] = set()
        out = []
        for i, name in enumerate(logical_axes):
            axes = self.mesh_axes(name)
            if mesh is not None:
                axes = tuple(a for a in axes if a in mesh.shape and a not in used)
                size = math.prod(mesh.shape[a] for a in axes)
                n = units.get(name, None if shape is None else shape[i])
                if axes and n is not None and n % size:
                    axes = ()
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def sharding(self, mesh: Mesh, logical_axes, shape=None, units: dict | None = None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh, units))


DEFAULT_RULES = ShardingRules()


def check_mesh(mesh, *, abstract: bool = False):
    """``mesh`` if it is a jax.sharding.Mesh (``abstract``: or an AbstractMesh, e.g. jax's context
    mesh inside jit), else a TypeError naming it (a string or a device list failed deep inside
    with "'str' object has no attribute 'shape'")."""
    kinds = (Mesh, jax.sharding.AbstractMesh) if abstract else (Mesh,)
    if not isinstance(mesh, kinds):
        allowed = "a jax.sharding.Mesh" + (" or AbstractMesh" if abstract else "")
        raise TypeError(f"mesh={mesh!r} must be {allowed} (e.g. kivi_jax.sharding.make_mesh(data=2, model=4)); "
                        f"got a {type(mesh).__name__}")
    return mesh


def check_rules(rules, mesh=None) -> ShardingRules:
    """``rules`` resolved: None -> :data:`DEFAULT_RULES` (which drop the mesh axes a mesh lacks);
    rules given must be a ShardingRules naming only axes ``mesh`` has: a typo ("modle") would
    replicate its arrays silently (``generate`` refuses such rules too)."""
    if rules is None:
        return DEFAULT_RULES
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"rules={rules!r} must be None (the default rules) or a kivi_jax.sharding.ShardingRules; "
                        f"got a {type(rules).__name__}")
    if mesh is not None and rules is not DEFAULT_RULES:
        missing = sorted(rules.named_mesh_axes() - set(mesh.axis_names))
        if missing:
            raise ValueError(f"rules name mesh axes {missing} that mesh lacks (its axes: {list(mesh.axis_names)}): "
                             f"they would be replicated silently")
    return rules


# ---- meshes --------------------------------------------------------------------------------

def _auto_axis_types(n: int):
    return (jax.sharding.AxisType.Auto,) * n


def make_mesh(data: int = 1, model: int = 1, *, devices=None) -> Mesh:
    """A ("data", "model") mesh of data x model devices (the first data*model of ``devices``,
    default ``jax.devices()``), with Auto axes (GSPMD propagates shardings)."""
    for name, v in (("data", data), ("model", model)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    n = data * model
    if n > len(devices):
        raise ValueError(f"data={data} x model={model} = {n} devices; only {len(devices)} available")
    return jax.make_mesh((data, model), ("data", "model"), axis_types=_auto_axis_types(2), devices=devices[:n])


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis Auto (our model code relies on GSPMD propagation, which
    Explicit axes turn off)."""
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == jax.sharding.AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=_auto_axis_types(len(mesh.axis_names)))


# ---- the active mesh (what the Pallas kernel wraps itself in) -----------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kivi_jax_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules | None = None):
    """Context in which the kernels shard themselves over ``mesh`` with ``rules``; it also
    enters ``jax.set_mesh(mesh)``. Trace (first call of a jitted function) inside it."""
    rules = check_rules(rules, check_mesh(mesh))
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh(mesh=None, rules: ShardingRules | None = None):
    """(mesh, rules) to shard a kernel over: ``mesh`` if given, else the one of
    :func:`use_mesh`, else jax's context mesh (``jax.set_mesh``) with the default rules;
    (None, rules) when there is none or it has a single device."""
    given = rules
    if mesh is not None:
        check_mesh(mesh, abstract=True)
    ctx = _ACTIVE.get()
    if mesh is None and ctx is not None:
        mesh, ctx_rules = ctx
        rules = rules or ctx_rules
    if mesh is None:
        am = jax.sharding.get_abstract_mesh()
        # inside a caller's shard_map (manual axes) the arrays are already per-shard
        mesh = None if am.empty or getattr(am, "manual_axes", ()) else am
    if given is not None:  # (its type; with a mesh, also the axes it names)
        check_rules(given, mesh)
    rules = rules or DEFAULT_RULES
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return None, rules
    return mesh, rules


def has_explicit_axes(mesh) -> bool:
    """Whether ``mesh`` (a Mesh or AbstractMesh) has an Explicit axis (``jax.make_mesh``'s default
    in jax >= 0.10)."""
    return any(t == jax.sharding.AxisType.Explicit for t in (getattr(mesh, "axis_types", None) or ()))


def to_in_specs(tree, specs, mesh):
    """``tree`` resharded to ``specs`` (a matching pytree of PartitionSpecs) on ``mesh`` when the
    mesh has Explicit axes, else as it is. Over Auto axes shard_map reshards its inputs itself;
    over Explicit ones it refuses any input whose sharding differs from its in_spec ("in_specs
    passed to shard_map: P('data', 'model', None, None) does not match the specs of the input:
    P(None, None, None, None)"), so the decode kernel under ``jax.set_mesh(jax.make_mesh(...))``
    raised where the reference path ran."""
    if not has_explicit_axes(mesh):
        return tree
    return jax.sharding.reshard(tree, _to_shardings(specs, mesh))


# ---- shard_map across jax versions ----------------------------------------------------------------

def shard_map(f, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.6: check_vma) or the experimental one (check_rep), with
    the replication check off (pallas_call has no replication rule)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _sm  # pragma: no cover (jax < 0.6)

    return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ---- caches --------------------------------------------------------------------------------------

B, H, S, D = "batch", "kv_heads", "sequence", "head_dim"
#: Logical axes of each per-layer cache array (a stacked cache adds "layers" in front).
CACHE_AXES = {
    KIVICache: dict(k_codes=(B, H, S, D), k_scale=(B, H, S, D), k_min=(B, H, S, D), k_res=(B, H, None, D),
                    v_codes=(B, H, S, D), v_scale=(B, H, S, None), v_min=(B, H, S, None), v_res=(B, H, None, D),
                    lengths=(B,), overflow=(B,)),
    DenseCache: dict(k=(B, H, S, D), v=(B, H, S, D), lengths=(B,), overflow=(B,)),
    # the kernel's layout: words and tiles stay whole (their minor axes mix channels and tokens)
    MosaicKIVICache: dict(kn=(B, H, S, None), kt=(B, H, None, None), k_res=(B, H, None, D), vn=(B, H, S, None),
                          vt=(B, H, None, None), v_res=(B, H, None, D), lengths=(B,), overflow=(B,)),
}


def _is_cache(x) -> bool:
    return type(x) in CACHE_AXES


def cache_specs(cache, mesh: Mesh | None = None, rules: ShardingRules | None = None):
    """The cache pytree with a PartitionSpec per array (same structure: usable as shard_map
    specs). Works on a KIVICache / DenseCache, on one with leading axes on every leaf (the
    stacked per-layer cache of models/cache.py: "layers" in front), and on any pytree holding
    them (other leaves: replicated). Leaves may be arrays or ShapeDtypeStructs."""
    rules = check_rules(rules)
    if mesh is not None:
        check_mesh(mesh, abstract=True)

    def one(c):
        if not _is_cache(c):
            return P()
        axes = CACHE_AXES[type(c)]
        specs = {}
        for name, logical in axes.items():
            x = getattr(c, name)
            extra = x.ndim - len(logical)
            if extra < 0:
                raise ValueError(f"{type(c).__name__}.{name} has shape {x.shape}; expected axes {logical}")
            specs[name] = rules.spec(("layers",) * extra + logical, x.shape, mesh)
        return dataclasses.replace(c, **specs)

    return jax.tree.map(one, cache, is_leaf=_is_cache)


def _to_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def cache_shardings(cache, mesh: Mesh, rules: ShardingRules | None = None):
    """The cache pytree with a NamedSharding per array (see :func:`cache_specs`): for
    ``jax.device_put``, ``jax.lax.with_sharding_constraint`` or jit's ``out_shardings``."""
    return _to_shardings(cache_specs(cache, mesh, rules), mesh)


def shard_cache(cache, mesh: Mesh, rules: ShardingRules | None = None):
    """``cache`` placed on ``mesh``: batch and kv_heads split, the rest replicated."""
    rules = check_rules(rules, check_mesh(mesh))
    return jax.device_put(cache, cache_shardings(cache, auto_mesh(mesh), rules))


def constrain_cache(cache, mesh: Mesh | None, rules: ShardingRules | None = None):
    """Inside jit: pins the cache's shardings (so a loop carry keeps them). No-op without a mesh."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh, rules))


# ---- model parameters ------------------------------------------------------------------------------

#: Logical axes of the parameters of models.Llama (by name; stacked layer weights get "layers"
#: in front). Matrices are [in, out]. Anything not named here is replicated.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name"):
            v = getattr(k, attr, None)
            if isinstance(v, str):
                out.append(v)
                break
    return out


def param_specs(state, mesh: Mesh | None = None, rules: ShardingRules | None = None, config=None):
    """PartitionSpecs for a parameter pytree (an ``nnx.State`` or a pure dict), by parameter
    name (:data:`PARAM_AXES`). config (a models.ModelConfig or anything with num_heads and
    num_kv_heads) makes head-dimension splits follow whole heads."""
    rules = check_rules(rules)
    if mesh is not None:
        check_mesh(mesh, abstract=True)
    units = {}
    if config is not None and mesh is not None:
        hq, hkv = config.num_heads, config.num_kv_heads
        kv_split = rules.spec(("kv_heads",), (hkv,), mesh) != P()
        # query heads split only with the KV heads (then whole GQA groups sit on each shard);
        # a count of -1 never divides: replicated
        units = {"heads": hq if kv_split else -1, "kv_heads": hkv}

    def one(path, x):
        names = _path_names(path)
        name = next((n for n in reversed(names) if n in PARAM_AXES), None)
        if name is None or not hasattr(x, "ndim"):
            return P()
        logical = PARAM_AXES[name]
        extra = x.ndim - len(logical)
        if extra < 0:
            return P()
        return rules.spec(("layers",) * extra + logical, x.shape, mesh, units)

    return jax.tree_util.tree_map_with_path(one, state)


def param_shardings(state, mesh: Mesh, rules: ShardingRules | None = None, config=None):
    """NamedShardings for a parameter pytree (see :func:`param_specs`)."""
    return _to_shardings(param_specs(state, mesh, rules, config), mesh)


def shard_params(state, mesh: Mesh, rules: ShardingRules | None = None, config=None):
    """``jax.device_put`` of a parameter pytree with :func:`param_shardings`."""
    rules = check_rules(rules, check_mesh(mesh))
    mesh = auto_mesh(mesh)
    return jax.device_put(state, param_shardings(state, mesh, rules, config))


def shard_model(model, mesh: Mesh, rules: ShardingRules | None = None):
    """Places a Flax NNX model's parameters on ``mesh`` (in place; returns the model):
    q/k/v/o projections split by heads and the MLP by its intermediate axis on "model",
    embeddings by vocab, norms replicated."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, shard_params(state, mesh, rules, getattr(model, "config", None)))
    return model
