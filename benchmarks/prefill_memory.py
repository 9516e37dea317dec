"""The memory of ``generate``'s jitted prefill, compiled but not run: XLA's own account
(``memory_analysis``) and the largest buffers of the optimized HLO, for each cache with
``prefill_attention``'s XLA and cuDNN paths side by side.

Why: in e2e run14 (cuDNN prefill) dense's peak at batch 32 x 4096 tokens rose from 85.9 to 117.4
GiB while its cache stayed 68 GiB (kivi2m's peak did not move). Nothing is allocated here
(abstract weights), so a 7B shape compiles in a minute on one GPU. A copy of a stacked cache
shows up as a ``copy`` (or a fusion) whose result is [L, B, Hkv, T, D]; a layout that differs
from the cache's own ({4,3,2,1,0}) is what forces one.

    PYTHONPATH=. python -m benchmarks.prefill_memory [--caches dense,kivi2m --batch 32 --prompt 4096]
    PYTHONPATH=. python -m benchmarks.prefill_memory --dry-run   # tiny shapes on CPU (XLA path only)

``--extend-writes after,in_loop``: instead of the prefill, one continuation call (``extend=True``,
``--new-tokens`` ids into a donated cache of ``--capacity`` holding ``--prompt`` tokens) for each
``models.llama.EXTEND_WRITES`` mode: a dense Llama-2-7B-shape cache of 16384 tokens ran out of the
H200's memory in both modes (continuation-gpu-run141) where the KIVI caches did not.

    PYTHONPATH=. python -m benchmarks.prefill_memory --extend-writes after,in_loop --batch 8 --capacity 16384 \
        --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax
import models
from benchmarks import common
from benchmarks.e2e import KIVI, model_config
from kivi_jax import attention
from kivi_jax.generate import _on_mesh, _prefill, _prepare

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# `%name = type[dims]{layout} op(` (a tuple-shaped result starts with "(" and is skipped)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\](\{[^}]*\})? ([\w\-]+)\(")
_SKIP_OPS = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "while", "call", "conditional"}


def largest_buffers(hlo: str, top: int = 12) -> list[dict]:
    """The ``top`` largest instruction results of an optimized HLO module (bytes, op, shape,
    layout, computation), parameters / tuples / bitcasts left out."""
    found, comp = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line.split(" ", 2)[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m or m.group(5) in _SKIP_OPS or m.group(2) not in _BYTES:
            continue
        dims = [int(x) for x in m.group(3).split(",") if x]
        nbytes = int(np.prod(dims, dtype=np.int64) * _BYTES[m.group(2)])
        kind = re.search(r"kind=(\w+)", line)
        found.append(dict(bytes=nbytes, gib=round(nbytes / 2**30, 3), op=m.group(5) + (f":{kind.group(1)}" if kind else ""),
                          name=m.group(1), shape=f"{m.group(2)}{dims}", layout=m.group(4) or "", computation=comp))
    return sorted(found, key=lambda r: -r["bytes"])[:top]


def compile_prefill(model, batch: int, prompt: int, new_tokens: int, kivi, impl: str):
    """generate's prefill program for [batch, prompt] ids, lowered and compiled (not run)."""
    ids = jnp.zeros((batch, prompt), jnp.int32)
    graphdef, state, ids, lens, keys, knobs, cfg = _prepare(
        model, ids, max_new_tokens=new_tokens, kivi=kivi, lengths=None, temperature=0.0, top_k=None, top_p=None,
        eos_id=None, key=None, pad_id=0, max_length=None, cache_dtype=None, attn_impl=None)
    before, attention.DEFAULT_PREFILL_IMPL = attention.DEFAULT_PREFILL_IMPL, impl  # read while traced:
    _prefill.clear_cache()  # no cached trace may be reused
    try:
        with _on_mesh(cfg):
            compiled = _prefill.lower(graphdef, state, ids, lens, keys, knobs, cfg=cfg).compile()
    finally:
        attention.DEFAULT_PREFILL_IMPL = before
    return compiled, cfg


def compile_extend(model, batch: int, capacity: int, new_tokens: int, kivi, writes: str | None = None):
    """One jitted ``model(ids [batch, new_tokens], cache, lengths, extend=True)`` over a donated
    cache of ``capacity`` with EXTEND_WRITES = ``writes`` (None: as it is set), lowered and compiled
    from shapes (nothing allocated, the weights an argument)."""
    from models import llama

    apply, params = models.functional(model)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    cache = jax.eval_shape(lambda: model.init_cache(batch, capacity, kivi=kivi))
    ids, lens = jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(lambda p, x, c, n: apply(p, x, c, lengths=n, extend=True), donate_argnums=2)
    before = llama.EXTEND_WRITES
    llama.EXTEND_WRITES = before if writes is None else writes  # read while traced
    try:
        return step.lower(shapes(params), ids, cache, lens).compile()
    finally:
        llama.EXTEND_WRITES = before


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", default="dense,kivi2m", help="comma list of benchmarks.e2e.KIVI names")
    ap.add_argument("--impls", default="xla,cudnn", help="comma list of prefill_attention impls")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--extend-writes", default=None,
                    help="comma list of EXTEND_WRITES modes: a continuation call's memory instead of the prefill's")
    ap.add_argument("--capacity", type=int, default=None, help="the continued cache's capacity (--extend-writes; "
                    "default prompt + new tokens)")
    ap.add_argument("--dry-run", action="store_true", help="2 small layers, tiny shapes (CPU)")
    ap.add_argument("--name", default="prefill-memory")
    a = ap.parse_args(argv)
    if a.dry_run:
        cfg = models.ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
                                 num_kv_heads=2, head_dim=128)
        a.batch, a.prompt, a.new_tokens = 4, 96, 8
    else:
        cfg = model_config("llama2-7b", num_layers=a.layers)
    model = models.abstract_model(cfg, jnp.bfloat16)
    rows, texts = [], {}
    for name in a.caches.split(","):
        kivi = None if KIVI[name] is None else kivi_jax.KIVIConfig(**KIVI[name])
        capacity = a.capacity or a.prompt + a.new_tokens
        shapes = jax.eval_shape(lambda: model.init_cache(a.batch, capacity, kivi=kivi))
        for impl in (a.extend_writes or a.impls).split(","):
            row = dict(cache=name, prefill_impl=impl, batch=a.batch, prompt_len=a.prompt, new_tokens=a.new_tokens,
                       layers=cfg.num_layers,
                       cache_bytes=int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))))
            try:
                if a.extend_writes:
                    row.update(program="extend", capacity=capacity)
                    compiled, gcfg = compile_extend(model, a.batch, capacity, a.new_tokens, kivi, impl), None
                else:
                    compiled, gcfg = compile_prefill(model, a.batch, a.prompt, a.new_tokens, kivi, impl)
            except ValueError as e:  # impl="cudnn" off a GPU
                row["error"] = str(e)[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            ma = compiled.memory_analysis()
            for f in ("argument", "output", "alias", "temp", "generated_code"):
                row[f"{f}_bytes"] = int(getattr(ma, f"{f}_size_in_bytes"))
            row["prefill_rows"] = gcfg and gcfg.prefill_rows
            # what the program needs at once besides its (donated or not) inputs
            row["peak_estimate_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
            text = compiled.as_text()
            buffers = largest_buffers(text, top=200)  # one pass over the HLO for both lists
            row["largest"] = buffers[:12]
            row["big_copies"] = [r for r in buffers if r["op"].startswith("copy") and r["bytes"] >= row["cache_bytes"] // 16]
            texts[f"{name}-{impl}"] = text
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("largest",)}), flush=True)
            for r in row["largest"]:
                print(f"    {r['gib']:9.3f} GiB  {r['op']:<24} {r['shape']:<34} {r['layout']:<18} {r['computation']}",
                      flush=True)
    table = render_markdown(rows)
    path = common.write_results(a.name, {**common.environment(), "rows": rows}, table)
    for key, text in texts.items():  # the optimized HLO, to read the buffers' users
        path.with_name(f"{path.stem}-{key}.hlo.txt").write_text(text)
    print(table)


def render_markdown(rows: list[dict]) -> str:
    lines = ["| cache | prefill impl (extend: writes) | cache GiB | arguments | outputs | aliased | temp | estimate | largest copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    g = lambda r, k: f"{r[k] / 2**30:.2f}" if k in r else ""  # noqa: E731
    for r in rows:
        copy = r.get("big_copies") or [{}]
        lines.append(f"| {r['cache']} | {r['prefill_impl']} | {g(r, 'cache_bytes')} | {g(r, 'argument_bytes')} | "
                     f"{g(r, 'output_bytes')} | {g(r, 'alias_bytes')} | {g(r, 'temp_bytes')} | "
                     f"{g(r, 'peak_estimate_bytes')} | {copy[0].get('shape', '') + ' ' + copy[0].get('layout', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
