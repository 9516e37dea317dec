"""Cache settings compared by the evaluations, named on the command line.

    dense                 full-precision cache (the baseline)
    kivi-2, kivi-4        KIVICache, keys per-channel and values per-token, 2 / 4 bits
    kivi-2/4              k_bits=2, v_bits=4 (any of 1, 2, 4, 8 on each side)
    kivi-2-ktoken         ablation: keys per-token (the wrong axis), values per-token
    kivi-2-vchannel       ablation: keys per-channel, values per-channel
    kivi-2-sim            KIVI's own axes in the simulated cache (equals kivi-2: a check)

Group size G and residual R come from the caller (default the paper's G=32, R=128).
Ablations run in :class:`kivi_jax.eval.ablation.SimQuantCache`.
"""

from __future__ import annotations

import dataclasses
import re

from kivi_jax.config import KIVIConfig

_SPEC = re.compile(r"^kivi-(\d+)(?:/(\d+))?(-ktoken|-vchannel|-sim)?$")


@dataclasses.dataclass(frozen=True)
class Method:
    """name: the spec it was parsed from; kivi: None for dense; key_axis / value_axis:
    'channel' or 'token'; simulated: runs in SimQuantCache instead of KIVICache."""

    name: str
    kivi: KIVIConfig | None = None
    key_axis: str = "channel"
    value_axis: str = "token"
    simulated: bool = False

    @property
    def label(self) -> str:
        if self.kivi is None:
            return "dense"
        c = self.kivi
        bits = f"{c.k_bits}" if c.k_bits == c.v_bits else f"K{c.k_bits}/V{c.v_bits}"
        extra = {("token", "token"): ", K per-token", ("channel", "channel"): ", V per-channel",
                 ("token", "channel"): ", K per-token, V per-channel"}.get((self.key_axis, self.value_axis), "")
        # the extensions beyond the paper, so that a table's rows say which cache they are
        ext = [f"{c.sink_tokens} sinks"] if c.sink_tokens else []
        ext += [f"rotate {c.rotate}"] if c.rotate != "none" else []
        ext += [f"key groups {c.key_group}"] if c.key_group != c.group_size else []
        ext += ["sim"] if self.name.endswith("-sim") else []
        return f"KIVI-{bits}{extra}" + (f" ({', '.join(ext)})" if ext else "")

    def settings(self) -> dict:
        d = {"name": self.name, "label": self.label, "cache": "dense" if self.kivi is None else
             ("SimQuantCache" if self.simulated else "KIVICache")}
        if self.kivi is not None:
            d.update(dataclasses.asdict(self.kivi), key_axis=self.key_axis, value_axis=self.value_axis)
        return d


def parse_method(spec: str, *, group_size: int = 32, residual_length: int = 128) -> Method:
    """A :class:`Method` from its name (module docstring); ValueError naming what is allowed."""
    s = spec.strip().lower()
    if s == "dense":
        return Method("dense")
    m = _SPEC.match(s)
    if not m:
        raise ValueError(f"method {spec!r} is not one of: dense, kivi-B, kivi-KB/VB, kivi-B-ktoken, "
                         f"kivi-B-vchannel, kivi-B-sim (B in 1, 2, 4, 8)")
    kb = int(m.group(1))
    vb = int(m.group(2) or kb)
    try:
        cfg = KIVIConfig(k_bits=kb, v_bits=vb, group_size=group_size, residual_length=residual_length)
    except ValueError as e:
        raise ValueError(f"method {spec!r}: {e}") from None
    suffix = m.group(3)
    if suffix == "-ktoken":
        return Method(s, cfg, key_axis="token", value_axis="token", simulated=True)
    if suffix == "-vchannel":
        return Method(s, cfg, key_axis="channel", value_axis="channel", simulated=True)
    return Method(s, cfg, simulated=suffix == "-sim")


def parse_methods(specs, **kw) -> list[Method]:
    """Methods from a comma-separated string or a list of names (duplicates dropped)."""
    if isinstance(specs, str):
        specs = [x for x in specs.split(",") if x.strip()]
    out, seen = [], set()
    for spec in specs:
        m = parse_method(spec, **kw)
        if m.name not in seen:
            seen.add(m.name)
            out.append(m)
    if not out:
        raise ValueError("no method given")
    return out


def init_cache(model, method: Method, batch_size: int, max_length: int):
    """An empty per-layer-stacked cache for ``model`` (a models.Llama) with ``method``'s format."""
    if not method.simulated:
        return model.init_cache(batch_size, max_length, kivi=method.kivi)
    from models.cache import StackedCache  # application layer: models only when asked
    from kivi_jax.eval.ablation import SimQuantCache

    c = model.config
    one = SimQuantCache.init(method.kivi, batch=batch_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                             max_length=max_length, dtype=model.dtype, key_axis=method.key_axis,
                             value_axis=method.value_axis)
    return StackedCache.stack(one, c.num_layers)
