"""One decode step of a few Llama-2-7B-shaped layers with a KIVI-2 cache, timed for each
residual-window formulation, with the optimized HLO's copies of stacked cache buffers counted.

The e2e profile at 1d6c7c7 put 165 of a 179 ms step outside attention and cache writes; the
window's partials (plain JAX over slices of the loop-carried stacked residuals) are the suspect.

    PYTHONPATH=. python -m benchmarks.decode_step_ab [--layers 4 --batch 96]
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp

import kivi_jax as kj
import models
from benchmarks import common
from kivi_jax import attention_pallas


def _partials_dot(qg, k, v, valid):  # the 1d6c7c7 formulation: dot_general on the slices
    dt = k.dtype
    s = jnp.einsum("bhgd,bhwd->bhgw", qg.astype(dt), k, preferred_element_type=jnp.float32)
    s = jnp.where(valid[:, None, None, :], s, -1e30)
    m = jnp.max(s, axis=-1)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bhgw,bhwd->bhgd", p.astype(dt), v, preferred_element_type=jnp.float32)
    return o, m, jnp.sum(p, axis=-1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=498)
    ap.add_argument("--only-current", action="store_true", help="just the library's formulation")
    a = ap.parse_args(argv)
    cfg = models.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=a.layers,
                             num_heads=32, num_kv_heads=32, head_dim=128)
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    apply, params = models.functional(model)
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 0, cfg.vocab_size)
    tok = ids[:, :1]
    rows = []
    original = attention_pallas._partials
    variants = (("padded", original), ("dot", _partials_dot))
    for name, fn in variants[: 1 if a.only_current else 2]:
        attention_pallas._partials = fn
        cache = model.init_cache(a.batch, a.max_length, kivi=kj.KIVIConfig())
        _, cache = jax.jit(apply)(params, ids, cache)
        step = jax.jit(lambda p, t, c: apply(p, t, c), donate_argnums=(2,))
        compiled = step.lower(params, tok, cache).compile()
        hlo = compiled.as_text()
        shapes = {",".join(map(str, x.shape)) for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim == 5}
        copies = [ln.strip()[:160] for ln in hlo.splitlines()
                  if re.search(r"\b(copy|transpose)\(", ln) and any(f"[{s}]" in ln for s in shapes)]
        for _ in range(3):
            _, cache = step(params, tok, cache)
        jax.block_until_ready(cache)
        import time
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            _, cache = step(params, tok, cache)
        jax.block_until_ready(cache)
        ms = (time.perf_counter() - t) * 1e3 / n
        mem = compiled.memory_analysis()
        rows.append({"window_partials": name, "layers": a.layers, "batch": a.batch, "step_ms": ms,
                     "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "stacked_copies": len(copies),
                     "examples": copies[:4], "cache_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))})
        print(json.dumps(rows[-1]), flush=True)
        (common.out_dir() / f"decode-step-{name}.hlo.txt").write_text(hlo)
        del cache
    attention_pallas._partials = original
    (common.out_dir() / "decode-step-ab.json").write_text(json.dumps({**common.environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
