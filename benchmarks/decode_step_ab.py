"""One decode step of a few Llama-2-7B-shaped layers with a KIVI-2 cache: its time, and the
optimized HLO's copies of stacked cache buffers (written next to the JSON).

At 1d6c7c7 the e2e profile put 165 of a 179 ms step outside attention and cache writes; this
script (then with a second arm, the one-row einsum window, in git at f2e0fb7) found the cause:
the stacked v_res copied every layer (results/decode-step-ab-2026-11-30*). Run it on a GPU to
check a step has no stacked copy: ``stacked_copies`` should be 0.

    PYTHONPATH=. python -m benchmarks.decode_step_ab [--layers 4 --batch 96]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp

import kivi_jax as kj
import models
from benchmarks import common


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=498)
    a = ap.parse_args(argv)
    cfg = models.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=a.layers,
                             num_heads=32, num_kv_heads=32, head_dim=128)
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    apply, params = models.functional(model)
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 0, cfg.vocab_size)
    tok = ids[:, :1]
    cache = model.init_cache(a.batch, a.max_length, kivi=kj.KIVIConfig())
    _, cache = jax.jit(apply)(params, ids, cache)
    step = jax.jit(lambda p, t, c: apply(p, t, c), donate_argnums=(2,))
    compiled = step.lower(params, tok, cache).compile()
    hlo = compiled.as_text()
    shapes = {",".join(map(str, x.shape)) for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim == 5}
    copies = [ln.strip()[:160] for ln in hlo.splitlines()
              if re.search(r"\b(copy|transpose)\(", ln) and any(f"[{s}]" in ln for s in shapes)]
    # timed by hand, not common.time_fn: the step donates its cache, so each call takes the last one's
    for _ in range(3):
        _, cache = step(params, tok, cache)
    jax.block_until_ready(cache)
    n, t = 10, time.perf_counter()
    for _ in range(n):
        _, cache = step(params, tok, cache)
    jax.block_until_ready(cache)
    mem = compiled.memory_analysis()
    rows = [{"layers": a.layers, "batch": a.batch, "step_ms": (time.perf_counter() - t) * 1e3 / n,
             "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "stacked_copies": len(copies),
             "examples": copies[:4], "cache_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))}]
    print(json.dumps(rows[0]), flush=True)
    (common.out_dir() / "decode-step.hlo.txt").write_text(hlo)
    (common.out_dir() / "decode-step-ab.json").write_text(json.dumps({**common.environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
