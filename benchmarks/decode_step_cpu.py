"""One jitted decode step of the model (cache donated, as ``kivi_jax.generate`` does) on CPU:
ms per step and what the optimized HLO does with the cache buffers.

A mid-size shape where the cache dominates the bytes (default: 4 layers, hidden 256, 4 heads,
4 KV heads, head_dim 64, batch 8, bf16; dense cache 512 MiB at max_length 16384). For each
cache (dense, KIVI-2) and each max_length it prints

* ``ms``: wall time of one step (median of ``--steps`` calls after a warm-up),
* ``temp_MiB``: the compiled program's temporary buffers (``memory_analysis``): a step that
  copies the cache needs temporaries the size of the cache (or of one layer's cache),
* ``big ops``: instructions of the optimized HLO whose result is at least as large as one
  layer's slice of the smallest big cache leaf, by opcode (fusions by their root op) and
  whether they sit in the layer loop (``x L``): ``copy`` of a cache-sized buffer is what a
  step that updates the cache in place must not have.

A step that writes only the new token's slabs should be nearly independent of max_length
for the dense cache write; attention reads still scale with it (the reference attention
reads the whole buffer, and on CPU the KIVI reference dequantizes the whole cache).

    PYTHONPATH=. python benchmarks/decode_step_cpu.py                       # 4096 and 16384
    PYTHONPATH=. python benchmarks/decode_step_cpu.py --max-lengths 16384 --caches dense --hlo
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax
import models
from models.config import ModelConfig

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\(?[^=]*?\)?)\s+([\w\-]+)\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def _nbytes(shape_text: str) -> int:
    m = _SHAPE.search(shape_text)  # first array of the result (tuples: the first element)
    if not m:
        return 0
    dims = [int(x) for x in m.group(2).split(",") if x]
    return _BYTES[m.group(1)] * int(np.prod(dims, dtype=np.int64))


def big_ops(hlo: str, threshold: int):
    """{(opcode, where): count} of instructions whose (first) result is >= threshold bytes.

    where: 'loop' for computations reached from a while body, else 'top'. A fusion counts as
    its root's opcode (``fusion:dynamic-update-slice``) when the fused computation is known.
    """
    comps, cur = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$", line)  # unindented: a computation
        if head:
            cur = head.group(2).lstrip("%")
            comps[cur] = []
            continue
        if cur is not None and line.strip() == "}":
            cur = None
            continue
        if cur is not None:
            comps[cur].append(line)
    roots = {}
    for name, lines in comps.items():
        for ln in lines:
            if ln.strip().startswith("ROOT"):
                m = _INSTR.match(ln)
                if m:
                    roots[name] = m.group(3)
    # computations called from while bodies (transitively)
    in_loop, todo = set(), []
    for lines in comps.values():
        for ln in lines:
            m = re.search(r"body=%?([\w.\-]+)", ln)
            if m:
                todo.append(m.group(1))
    while todo:
        c = todo.pop()
        if c in in_loop or c not in comps:
            continue
        in_loop.add(c)
        for ln in comps[c]:
            for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", ln):
                todo.append(callee)
            m = re.search(r"branch_computations=\{([^}]*)\}", ln)
            if m:
                todo.extend(x.strip().lstrip("%") for x in m.group(1).split(","))
    counts = collections.Counter()
    fused = {c for lines in comps.values() for ln in lines if " fusion(" in ln
             for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    for name, lines in comps.items():
        if name in fused:  # counted through its fusion instruction
            continue
        for ln in lines:
            m = _INSTR.match(ln)
            if not m:
                continue
            op = m.group(3)
            if op in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional"):
                continue
            if _nbytes(m.group(2)) < threshold:
                continue
            if op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", ln)
                op = f"fusion:{roots.get(callee.group(1), '?')}" if callee else op
            counts[(op, "loop" if name in in_loop else "top")] += 1
    return counts


def make(config: ModelConfig, batch: int, max_length: int, kivi, dtype, fill: int):
    model = models.init_random(config, dtype=dtype)
    apply, params = models.functional(model)
    cache = model.init_cache(batch, max_length, kivi=kivi)
    # pretend `fill` tokens are held (zeros): the step appends at position `fill`
    layers = cache.layers
    layers = type(layers)(**{**{f: getattr(layers, f) for f in layers.__dataclass_fields__},
                             "lengths": jnp.full_like(layers.lengths, fill)})
    cache = models.cache.StackedCache(layers)

    def step(params, ids, cache):
        logits, cache = apply(params, ids, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    return jax.jit(step, donate_argnums=(2,)), params, cache


def run_one(config, batch, max_length, kivi, dtype, steps: int, show_hlo: bool):
    step, params, cache = make(config, batch, max_length, kivi, dtype, fill=max_length // 2)
    ids = jnp.zeros((batch, 1), jnp.int32)
    compiled = step.lower(params, ids, cache).compile()
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    leaves = [x for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim >= 4]
    # one layer's slice of the smallest big leaf: anything this size or more is "cache-sized"
    threshold = min(x.nbytes for x in leaves if x.nbytes >= (1 << 20)) // config.num_layers if any(
        x.nbytes >= (1 << 20) for x in leaves) else min(x.nbytes for x in leaves) // config.num_layers
    counts = big_ops(hlo, threshold)
    if show_hlo:
        print(hlo)
    ids, cache = step(params, ids, cache)  # warm-up
    jax.block_until_ready(cache)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ids, cache = step(params, ids, cache)
        jax.block_until_ready(cache)
        times.append(time.perf_counter() - t0)
    cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache.layers))
    return dict(ms=1e3 * statistics.median(times), cache_MiB=cache_bytes / 2**20,
                temp_MiB=(mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan"),
                threshold_KiB=threshold / 1024, counts=counts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--caches", nargs="+", default=["dense", "kivi2"], choices=["dense", "kivi2", "kivi4"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hlo", action="store_true", help="print the optimized HLO")
    a = ap.parse_args(argv)
    config = ModelConfig(vocab_size=512, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                         num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                         head_dim=a.head_dim, max_position_embeddings=max(a.max_lengths))
    kivis = dict(dense=None, kivi2=kivi_jax.KIVIConfig(2, 2), kivi4=kivi_jax.KIVIConfig(4, 4))
    print(f"backend={jax.default_backend()} L={a.layers} hidden={a.hidden} Hq={a.heads} Hkv={a.kv_heads} "
          f"D={a.head_dim} B={a.batch} dtype={a.dtype}")
    for name in a.caches:
        for n in a.max_lengths:
            r = run_one(config, a.batch, n, kivis[name], jnp.dtype(a.dtype), a.steps, a.hlo)
            ops = ", ".join(f"{op}{' x L' if where == 'loop' else ''}: {k}"
                            for (op, where), k in sorted(r["counts"].items()))
            print(f"{name:6s} max_length={n:6d} cache={r['cache_MiB']:7.1f} MiB  step={r['ms']:8.2f} ms  "
                  f"temp={r['temp_MiB']:7.1f} MiB  big ops (>= {r['threshold_KiB']:.0f} KiB): {ops or 'none'}",
                  flush=True)


if __name__ == "__main__":
    main()
