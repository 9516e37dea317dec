"""What generate's jitted decode loop allocates besides its (donated) inputs, compiled only:
no weights or cache are materialized, so any shape compiles on any machine.

Written when the 4096-token sweep (results/e2e-2026-11-30-run7) ran out of memory at KIVI-2
batch 128 with an error naming the decode loop. On the H200 the loop's temporaries are
0.41-0.43 GB for dense and KIVI-2, prompt 160 or 4096 (results/decode-loop-memory-2026-11-30):
no cache copy; about one layer's weights (0.42 GB), consistent with the per-layer copy out
of the stacked parameters. The memory went to the prefill's activations (now bounded by prefill_rows).
Prints, per (cache, prompt, batch), the loop's temp bytes next to the cache's bytes and the
HLO ops that write a whole stacked cache buffer (the in-place row writes are among them).

    PYTHONPATH=. python -m benchmarks.decode_loop_memory [--layers 32 --batch 8 --prompts 160,4096]
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax as kj
import models
from benchmarks import common
from benchmarks.e2e import KIVI, model_config

gen = importlib.import_module("kivi_jax.generate")  # the module (kivi_jax.generate is also the function)


def whole_buffer_ops(hlo: str, shapes: set[str]) -> list[str]:
    """HLO instructions (not parameters/tuples/bitcasts) whose result is a whole stacked cache buffer."""
    skip = ("parameter(", "get-tuple-element(", "tuple(", "bitcast(", "while(", "opt-barrier(")
    out = []
    for ln in hlo.splitlines():
        if "=" not in ln or any(s in ln for s in skip):
            continue
        head = ln.split("=", 1)[1].lstrip()[:120]
        if any(head.startswith(s) or head.startswith("(" + s) for s in shapes):
            out.append(ln.strip()[:220])
    return out


def one(model, cache_name, prompt, new, batch, keep_hlo=None):
    ids = np.zeros((batch, prompt), np.int32)
    kivi = None if KIVI[cache_name] is None else kj.KIVIConfig(**KIVI[cache_name])
    graphdef, state, ids, lens, keys, knobs, cfg = gen._prepare(
        model, ids, max_new_tokens=new, kivi=kivi, lengths=None, temperature=0.0, top_k=None, top_p=None,
        eos_id=None, key=None, pad_id=0, max_length=None, cache_dtype=None, attn_impl=None)
    carry = jax.eval_shape(lambda s, i, n, k, kn: gen._prefill(graphdef, s, i, n, k, kn, cfg=cfg),
                           state, ids, lens, keys, knobs)
    compiled = gen._run(gen._decode_loop, graphdef, state, carry, keys, knobs, cfg, lower=True).compile()
    hlo = compiled.as_text()
    leaves = [x for x in jax.tree_util.tree_leaves(carry.cache) if len(x.shape) >= 4]
    shapes = {f"{jnp.dtype(x.dtype).name.replace('bfloat16', 'bf16').replace('uint32', 'u32').replace('float32', 'f32')}"
              f"[{','.join(map(str, x.shape))}]" for x in leaves}
    ops = whole_buffer_ops(hlo, shapes)
    mem = compiled.memory_analysis()
    cache_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(carry.cache))
    if keep_hlo:
        (common.out_dir() / f"decode-loop-{cache_name}-T{prompt}-B{batch}.hlo.txt").write_text(hlo)
    return {"cache": cache_name, "prompt_len": prompt, "new_tokens": new, "batch": batch, "cache_bytes": cache_bytes,
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "alias_bytes": getattr(mem, "alias_size_in_bytes", None),
            "temp_over_cache": round(getattr(mem, "temp_size_in_bytes", 0) / cache_bytes, 3),
            "whole_buffer_ops": len(ops), "examples": ops[:6]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", default="160,4096")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--caches", default="dense,kivi2")
    ap.add_argument("--keep-hlo", action="store_true")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    cfg = model_config("llama2-7b", num_layers=a.layers)
    model = models.abstract_model(cfg, dtype=jnp.bfloat16)
    rows = []
    for prompt in map(int, a.prompts.split(",")):
        for name in a.caches.split(","):
            row = one(model, name, prompt, a.new_tokens, a.batch, a.keep_hlo)
            print(json.dumps(row), flush=True)
            rows.append(row)
    (common.out_dir() / f"decode-loop-memory{a.tag}.json").write_text(
        json.dumps({**common.environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
