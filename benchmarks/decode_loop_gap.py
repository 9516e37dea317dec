"""Where ``generate``'s decode loop spends a step, against the same step driven from Python.

e2e's paper-setting step (``generate``'s jitted ``lax.while_loop``: 12.5 ms KIVI-2, 10.4 dense in
e2e-2026-12-01-run15-paper) and decode_step_ab's (the model's step jitted alone and called from
Python, cache donated: 10.2 / 8.5 ms with command buffers) are not comparable: e2e averages
contexts of 160 to 498 tokens, decode_step_ab's steps run at about 170. This runs the same
steps from the same prefilled cache, in one process, three ways:

- ``loop``: generate's decode loop (``_decode_loop``: every step in one while_loop), prefill
  excluded;
- ``python_steps``: generate's own step (``_decode_step``: the same body, sampling and
  bookkeeping included) called N times from Python, no host sync in between;
- ``model_steps``: the model's step alone (``models.functional``, as decode_step_ab), N times;
- ``loop_kernels``: the GPU time of the loop's kernels per step, from a profiler trace
  (``common.trace_kernels``): the loop's wall time minus this is the GPU's idle time a step.
  Run it twice, as is and with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=``: inside a command
  buffer the trace sees the buffer, not its kernels.

``same_tokens``: the loop and the Python-driven steps emit the same tokens (greedy), so they ran
the same computation.

    PYTHONPATH=. python -m benchmarks.decode_loop_gap [--caches dense,kivi2 --batch 96 --layers 32]
    PYTHONPATH=. python -m benchmarks.decode_loop_gap --dry-run     # tiny model on CPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import kivi_jax
import models
from benchmarks import common
from benchmarks.e2e import KIVI, model_config
from kivi_jax.generate import _decode_loop, _decode_step, _prepare, _run, _run_prompt


def measure(model, ids, kivi, new_tokens: int, reps: int, trace: bool) -> dict:
    """The four numbers of the module doc for one cache, ms per decode step."""
    graphdef, state, ids, lens, keys, knobs, cfg = _prepare(
        model, ids, max_new_tokens=new_tokens, kivi=kivi, lengths=None, temperature=0.0, top_k=None, top_p=None,
        eos_id=None, key=None, pad_id=0, max_length=None, cache_dtype=None, attn_impl=None)
    steps = new_tokens - 1
    prefill = lambda: jax.block_until_ready(_run_prompt(graphdef, state, ids, lens, keys, knobs, cfg))  # noqa: E731
    carry, tokens = {}, {}

    def fresh():  # each timed run gets its own prefilled carry (the loop and the steps donate it)
        carry["c"] = prefill()

    def loop():
        out = _run(_decode_loop, graphdef, state, carry.pop("c"), keys, knobs, cfg)
        tokens["loop"] = jax.block_until_ready(out.tokens)
        assert int(out.num_new.min()) == new_tokens, "a row stopped early: the steps would not be comparable"

    def python_steps():
        c = carry.pop("c")
        for _ in range(steps):
            c = _run(_decode_step, graphdef, state, c, keys, knobs, cfg)
        tokens["python_steps"] = jax.block_until_ready(c.tokens)

    apply, params = models.functional(model)
    kw = {} if cfg.matmul_impl is None else {"matmul_impl": cfg.matmul_impl}  # what generate's steps pass
    step = jax.jit(lambda p, t, c: apply(p, t, c, **kw), donate_argnums=2)

    def model_steps():
        c = carry.pop("c")
        cache, tok = c.cache, c.token[:, None]
        for _ in range(steps):
            _, cache = step(params, tok, cache)
        jax.block_until_ready(cache)

    row = {"steps": steps, "matmul_impl": cfg.matmul_impl}
    for name, fn in (("loop", loop), ("python_steps", python_steps), ("model_steps", model_steps)):
        best = float("inf")
        for _ in range(reps + 1):  # the first compiles
            fresh()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        row[f"{name}_ms"] = best / steps * 1e3
    row["same_tokens"] = bool(jnp.array_equal(tokens["loop"], tokens["python_steps"]))  # greedy: one program, two drivers
    if trace:
        fresh()
        c = carry["c"]
        hlo = _run(_decode_loop, graphdef, state, c, keys, knobs, cfg, lower=True).compile().as_text()
        gpu = jax.default_backend() == "gpu"
        kernels = common.trace_kernels(loop, hlo, steps, **({} if gpu else dict(plane_prefix="/host:CPU",
                                                                                  line_prefix="tf_XLA")))
        row["loop_kernels_ms"] = sum(k["ms_per_step"] for k in kernels)
        row["loop_idle_ms"] = row["loop_ms"] - row["loop_kernels_ms"]
        row["launches_per_step"] = sum(k["launches_per_step"] for k in kernels)
        row["top_kernels"] = kernels[:12]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", default="dense,kivi2", help="comma list of benchmarks.e2e.KIVI names")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=65, help="N: N - 1 decode steps are timed")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, tiny shapes (CPU)")
    ap.add_argument("--name", default="decode-loop-gap")
    a = ap.parse_args(argv)
    if a.dry_run:
        cfg = model_config("tiny-llama")
        a.batch, a.prompt, a.new_tokens, a.reps = 2, 40, 6, 1
    else:
        cfg = model_config("llama2-7b", num_layers=a.layers)
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 0, cfg.vocab_size)
    rows = []
    for name in a.caches.split(","):
        kivi = None if KIVI[name] is None else kivi_jax.KIVIConfig(**KIVI[name])
        row = {"cache": name, "batch": a.batch, "prompt_len": a.prompt, "new_tokens": a.new_tokens,
               "layers": cfg.num_layers, **measure(model, ids, kivi, a.new_tokens, a.reps, not a.no_trace)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    cols = ["cache", "batch", "layers", "steps", "loop_ms", "python_steps_ms", "model_steps_ms", "loop_kernels_ms",
            "loop_idle_ms", "launches_per_step"]
    table = common.markdown(rows, cols)
    common.write_results(a.name, {**common.environment(), "settings": vars(a), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
