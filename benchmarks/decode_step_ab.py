"""One decode step of N Llama-2-7B-shaped (or Mistral-7B-shaped: ``--model``) layers: its time,
and what the optimized HLO copies (stacked cache buffers, per-layer weights), for a few ways of
running the layers.

Arms (``--arms``):
- ``scan``: the library's step (``models.functional``: one ``lax.scan`` over stacked weights).
- ``static``: the same layers unrolled in Python, weights sliced statically from the stack.
- ``list``: unrolled, each layer's weights passed as their own buffers (no slicing at all).
- ``pallas``: the library's step with ``matmul_impl="pallas"`` (matrices read in place from
  the stack by ``pallas_kernels.stacked_matmul``).
- ``sliced``: the library's step, but the KIVI kernel is fed per-layer slices of the stacked
  cache (what it did before it read the stack in place; XLA copies those slices).
- ``allpallas``: ``pallas`` plus ``attn_impl="pallas"``: for a dense cache, the dense Pallas
  attention reading the stacked cache in place (same as ``pallas`` for KIVI caches).
- ``pallasattn``: ``scan`` (XLA's matmuls) with ``attn_impl="pallas"``.

History: at 1d6c7c7 the e2e profile put 165 of a 179 ms step outside attention and cache
writes; this script found the cause, the stacked v_res copied every layer
(results/decode-step-ab-2026-11-30*): ``stacked_copies`` should be 0. ``weight_copies``
counts HLO ops that write one layer's weight matrix (a copy out of the stack, 2 extra passes
over the weights per step when nonzero). Run twice, with and without
``XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true``, to see what that flag changes.

    PYTHONPATH=. python -m benchmarks.decode_step_ab [--layers 32 --batch 96 --caches dense,kivi2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time

import jax
import jax.numpy as jnp

import kivi_jax as kj
import models
from benchmarks import common
from benchmarks.e2e import KIVI, model_config
from kivi_jax import attention_mosaic, attention_pallas, cache_kivi, cache_mosaic, rotation
from kivi_jax import cache_common as cc
from models import llama

_IN_PLACE = attention_pallas._in_place
#: XLA:GPU's command buffer (CUDA graph) kinds by default (xla/debug_options_flags.cc)
DEFAULT_COMMAND_BUFFER = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION")
#: --command-buffers presets: the step jitted with compiler_options xla_gpu_enable_command_buffer set
#: to these kinds (None: not set). XLA:GPU reads a conditional's predicate (and a while loop's) back
#: to the host, draining the stream; inside a command buffer (CONDITIONAL, WHILE: CUDA graph
#: conditional nodes) it stays on the device. KIVI's step has two conditionals (the rare writes)
#: that dense's has not. "listed": the defaults spelled out, a control for the option itself.
COMMAND_BUFFERS = {"default": None, "listed": DEFAULT_COMMAND_BUFFER,
                   "conditional": DEFAULT_COMMAND_BUFFER + ("CONDITIONAL",),
                   "conditional_while": DEFAULT_COMMAND_BUFFER + ("CONDITIONAL", "WHILE"), "off": ()}


def compiler_options(command_buffer: str | None) -> dict:
    """The jit compiler_options of a COMMAND_BUFFERS preset (named error for another name)."""
    if command_buffer is None:
        return {}
    if command_buffer not in COMMAND_BUFFERS:
        raise ValueError(f"command buffer preset {command_buffer!r}; allowed: {', '.join(COMMAND_BUFFERS)}")
    kinds = COMMAND_BUFFERS[command_buffer]
    return {} if kinds is None else {"xla_gpu_enable_command_buffer": ",".join(kinds)}


def _unrolled_step(model, per_layer: bool):
    """A decode step with the layers unrolled in Python. per_layer: weights arrive as a list of
    per-layer dicts (own buffers); else stacked and sliced with static indices."""
    c = model.config

    def step(layers, rest, tok, cache):
        positions = cache.lengths[:, None]
        cos, sin = llama.rope_cos_sin(positions, c)
        x = jnp.take(rest["embed"], tok, axis=0)
        for i in range(c.num_layers):
            p = layers[i] if per_layer else {k: v[i] for k, v in layers.items()}
            x, cache = llama._layer(p, x, cos, sin, cache, i, config=c, lengths=None, attn_impl="auto", decode=True)
        x = llama.rms_norm(x, rest["final_norm"], c.rms_norm_eps)
        return jnp.einsum("bth,hv->btv", x, rest["lm_head"], preferred_element_type=jnp.float32), cache

    return step


def _count(hlo: str, shapes: set[str], ops=r"copy|transpose") -> list[str]:
    """The instructions (``ops``) of the optimized HLO that produce an array of one of
    ``shapes``. Inside a fused computation whose root is smaller (a slice of it, say) the
    instruction is computed element by element for the root alone: no copy, not counted."""
    def big(line):
        return "=" in line and any(s in line.split("=")[1][:80] for s in shapes)

    found = []
    for comp in re.split(r"\n(?=[%A-Z])", hlo):  # computations start at column 0
        lines = comp.splitlines()
        fused = lines[0].startswith("%fused") if lines else False
        if fused and not any(big(ln) for ln in lines if ln.strip().startswith("ROOT")):
            continue
        found += [ln.strip()[:200] for ln in lines if re.search(rf"\b({ops})[.\d]*\(", ln) and big(ln)]
    return found


def run_arm(arm, model, cache, tok, layers_stacked, layers_list, rest, trace=False, command_buffer=None):
    options = compiler_options(command_buffer)
    if arm in ("scan", "pallas", "sliced", "allpallas", "pallasattn"):
        apply, params = models.functional(model)
        impl = "pallas" if arm in ("pallas", "allpallas") else "xla"
        attn = "pallas" if arm in ("allpallas", "pallasattn") else "auto"
        if arm == "sliced":  # traced below, inside this arm only
            attention_pallas._in_place = lambda stack, cache: _IN_PLACE(None, cache)
        step = jax.jit(lambda p, t, c: apply(p, t, c, matmul_impl=impl, attn_impl=attn), donate_argnums=(2,),
                       compiler_options=options)
        args = (params, tok)
    else:
        fn = _unrolled_step(model, per_layer=arm == "list")
        step = jax.jit(lambda w, t, c: fn(w, rest, t, c), donate_argnums=(2,), compiler_options=options)
        args = (layers_list if arm == "list" else layers_stacked, tok)
    t0 = time.perf_counter()
    try:
        compiled = step.lower(*args, cache).compile()
    finally:
        attention_pallas._in_place = _IN_PLACE
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    cache_shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim == 5}
    w_shapes = set()
    for v in layers_stacked.values():
        if v.ndim == 3:
            w_shapes |= {"[" + ",".join(map(str, v.shape[1:])) + "]", "[1," + ",".join(map(str, v.shape[1:])) + "]"}
    stacked = _count(hlo, cache_shapes)
    weights = _count(hlo, w_shapes, ops=r"copy|fusion|fusion-start|dynamic-slice|slice")
    # timed by hand, not common.time_fn: the step donates its cache, so each call takes the last one's
    for _ in range(3):
        _, cache = step(*args, cache)
    jax.block_until_ready(cache)
    n, t = 10, time.perf_counter()
    for _ in range(n):
        _, cache = step(*args, cache)
    jax.block_until_ready(cache)
    step_ms = (time.perf_counter() - t) * 1e3 / n
    kernels = None
    if trace:  # GPU time per kernel over 5 more steps, with the named scope each came from
        # (run with XLA_FLAGS=--xla_gpu_enable_command_buffer= : in a command buffer the
        # kernels are traced under the buffer's name)
        def run():
            nonlocal cache
            for _ in range(5):
                _, cache = step(*args, cache)
            jax.block_until_ready(cache)
        kernels = common.trace_kernels(run, hlo, steps=5)
    mem = compiled.memory_analysis()
    row = {"arm": arm, "step_ms": step_ms, "compile_s": compile_s,
           "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "stacked_copies": len(stacked),
           "weight_copies": len(weights), "examples": (stacked + weights)[:4]}
    if kernels is not None:
        row["kernels"] = kernels
    return row, cache, hlo


SCOPES = ("kivi_kernel", "kivi_window", "cache_append", "attention", "qkv", "o_proj", "mlp")  # models/llama.py


def _kernel_table(kernels, step_ms, top=25) -> str:
    """The top kernels and the GPU time per named scope (the innermost of SCOPES that a
    kernel's op_name holds; "other" for none)."""
    total = sum(r["ms_per_step"] for r in kernels)
    scopes = {}
    for r in kernels:
        scope = next((s for s in SCOPES if f"/{s}/" in r["source"] or r["source"].endswith(f"/{s}")), "other")
        scopes[scope] = scopes.get(scope, 0.0) + r["ms_per_step"]
    head = (f"GPU kernel time {total:.2f} ms per step (step {step_ms:.2f} ms wall), {len(kernels)} kernels; "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(scopes.items(), key=lambda kv: -kv[1])) + f"; top {top}:")
    return head + "\n" + common.markdown(kernels[:top], ["kernel", "ms_per_step", "launches_per_step", "source"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b", help="a benchmarks.e2e.MODELS shape (llama2-7b, mistral-7b)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=498)
    ap.add_argument("--caches", default="kivi2", help="comma list of benchmarks.e2e.KIVI names: dense, kivi2, kivi4, kivi2m, ...")
    ap.add_argument("--arms", default="scan", help="comma list of scan, static, list, pallas, sliced, allpallas, pallasattn")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--trace", action="store_true", help="also the GPU time per kernel of each arm's step")
    ap.add_argument("--ring-programs", default=None,
                    help="comma list of attention_pallas.RING_PROGRAMS to run each KIVI arm with (default: the default)")
    ap.add_argument("--writes", default=None,
                    help="comma list of cache_common.WRITES_IMPLS to run each arm with (default: the default)")
    ap.add_argument("--mosaic-windows", default=None,
                    help="comma list of attention_mosaic.WINDOW_IMPL_NAMES to run each kivi2m arm with (default: the default)")
    ap.add_argument("--mosaic-appends", default=None,
                    help="comma list of cache_mosaic.APPEND_IMPLS to run each kivi2m arm with (default: the default)")
    ap.add_argument("--kivi-appends", default=None,
                    help="comma list of cache_kivi.APPEND_IMPLS to run each token-layout KIVI arm with (default: the default)")
    ap.add_argument("--short-stages", default=None,
                    help="comma list of attention_pallas.SHORT_NUM_STAGES values (0: the kernel's default) for "
                         "token-layout KIVI arms (default: the default)")
    ap.add_argument("--rare-writes", default=None,
                    help="comma list of models.llama.RARE_WRITES_MODES to run each KIVI arm with (default: the default)")
    ap.add_argument("--rotations", default=None,
                    help="comma list of rotation.ROTATE_IMPLS to run each rotating KIVI arm with (default: the default)")
    ap.add_argument("--kernel-sinks", default=None,
                    help="comma list of on/off: attention_pallas.KERNEL_SINKS and attention_mosaic.KERNEL_SINKS for "
                         "each KIVI arm with sinks (the ring's or window kernel's program attends them, or plain-JAX "
                         "partials; default: each layout's default)")
    ap.add_argument("--command-buffers", default=None,
                    help=f"comma list of COMMAND_BUFFERS presets ({', '.join(COMMAND_BUFFERS)}) to jit each arm's "
                         "step with (default: XLA's own setting)")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"[\w.-]*", a.tag, re.ASCII):
        # the device tool returns no file whose name holds other characters (run96 lost its files to a comma)
        ap.error(f"--tag {a.tag!r}: letters, digits, '.', '_' and '-' only (it ends the result files' names)")
    buffers = a.command_buffers.split(",") if a.command_buffers else [None]
    for b in buffers:
        compiler_options(b)  # a wrong name fails before any model is built
    cfg = model_config(a.model, num_layers=a.layers)
    model = models.init_random(cfg, dtype=jnp.bfloat16)
    apply, params = models.functional(model)
    ids = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 0, cfg.vocab_size)
    tok = ids[:, :1]
    layers_stacked = model.layers.arrays()
    arms = a.arms.split(",")
    layers_list = ([{k: v[i].copy() for k, v in layers_stacked.items()} for i in range(a.layers)]
                   if "list" in arms else None)
    rest = {"embed": model.embed[...], "final_norm": model.final_norm[...],
            "lm_head": model.lm_head[...] if model.lm_head is not None else model.embed[...].T}
    rows = []
    write_impls = a.writes.split(",") if a.writes else [None]
    for name in a.caches.split(","):
        kivi = None if KIVI[name] is None else kj.KIVIConfig(**KIVI[name])
        mosaic = kivi is not None and kivi.layout == "mosaic"
        rings = a.ring_programs.split(",") if kivi is not None and a.ring_programs else [None]
        windows = a.mosaic_windows.split(",") if mosaic and a.mosaic_windows else [None]
        rares = a.rare_writes.split(",") if kivi is not None and a.rare_writes else [None]
        appends = a.mosaic_appends.split(",") if mosaic and a.mosaic_appends else [None]
        tokens = kivi is not None and not mosaic
        token_appends = a.kivi_appends.split(",") if tokens and a.kivi_appends else [None]
        stage_counts = [int(x) for x in a.short_stages.split(",")] if tokens and a.short_stages else [None]
        rotating = kivi is not None and kivi.rotate != "none"
        rotations = a.rotations.split(",") if rotating and a.rotations else [None]
        sinking = kivi is not None and kivi.sink_tokens > 0
        kernel_sinks = [x == "on" for x in a.kernel_sinks.split(",")] if sinking and a.kernel_sinks else [None]
        for arm, ring, writes, window, rare, append, token_append, stages, rot, ksinks, buffer in itertools.product(
                arms, rings, write_impls, windows, rares, appends, token_appends, stage_counts, rotations,
                kernel_sinks, buffers):
            # the switches are read when the step is traced; None: the module's default
            with common.switched((attention_pallas, "DEFAULT_RING_PROGRAM", ring), (cc, "DEFAULT_WRITES_IMPL", writes),
                           (attention_mosaic, "DEFAULT_WINDOW_IMPL", window), (llama, "RARE_WRITES", rare),
                           (cache_mosaic, "APPEND_IMPL", append), (cache_kivi, "APPEND_IMPL", token_append),
                           (attention_pallas, "SHORT_NUM_STAGES", stages), (rotation, "ROTATE_IMPL", rot),
                           (attention_pallas, "KERNEL_SINKS", ksinks), (attention_mosaic, "KERNEL_SINKS", ksinks)):
                cache = model.init_cache(a.batch, a.max_length, kivi=kivi)
                # (the empty cache donated: two dense caches of the paper setting next to the weights
                # did not fit an 80 GB card at jax's default 75% of it, run145)
                _, cache = jax.jit(apply, donate_argnums=2)(params, ids, cache)
                row, cache, hlo = run_arm(arm, model, cache, tok, layers_stacked, layers_list, rest, trace=a.trace,
                                          command_buffer=buffer)
                ring, writes = attention_pallas.DEFAULT_RING_PROGRAM, cc.DEFAULT_WRITES_IMPL
                rare, append = llama.rare_writes_mode(), cache_mosaic.append_impl()
                token_append, stages = cache_kivi.append_impl(), attention_pallas.SHORT_NUM_STAGES
                window = attention_mosaic.window_impl_name()
                rot = rotation.rotate_impl() if rotating else None
                ksinks = (attention_mosaic if mosaic else attention_pallas).KERNEL_SINKS if sinking else None
            row.update(cache=name, model=a.model, layers=a.layers, batch=a.batch,
                       xla_flags=os.environ.get("XLA_FLAGS", ""), command_buffer=buffer or "default", writes=writes,
                       cache_bytes=sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)),
                       **({"ring_program": ring, "rare_writes": rare} if kivi is not None else {}),
                       **({"mosaic_window": window, "mosaic_append": append} if mosaic else {}),
                       **({"kivi_append": token_append, "short_num_stages": stages} if tokens else {}),
                       **({"rotate_impl": rot} if rotating else {}),
                       **({"kernel_sinks": ksinks} if sinking else {}))
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
            if "kernels" in row:
                print(_kernel_table(row["kernels"], row["step_ms"]), flush=True)
            rows.append(row)
            suffix = ((f"-{window}-append-{append}" if mosaic else "") + (f"-rare-{rare}" if kivi is not None else "")
                      + (f"-append-{token_append}-stages-{stages}" if tokens else "") + (f"-rot-{rot}" if rot else "")
                      + (f"-ksinks-{'on' if ksinks else 'off'}" if sinking else "") + (f"-cb-{buffer}" if buffer else ""))
            (common.out_dir() / f"decode-step-{name}-{arm}-{ring}-{writes}{suffix}{a.tag}.hlo.txt").write_text(hlo)
            del cache
    env = common.environment()
    (common.out_dir() / f"decode-step-ab{a.tag}.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    (common.out_dir() / f"decode-step-ab{a.tag}.md").write_text(summary(rows, env, a))


def summary(rows, env, a) -> str:
    """The rows as a markdown table, each step next to dense's with the same arm and command
    buffers (ratio_to_dense), under a line naming the shape, device, jax version and commit."""
    dense = {(r["arm"], r["command_buffer"]): r["step_ms"] for r in rows if r["cache"] == "dense"}
    table = []
    for r in rows:
        base = dense.get((r["arm"], r["command_buffer"]))
        switches = ", ".join(f"{k}={r[k]}" for k in ("ring_program", "rare_writes", "mosaic_window", "mosaic_append",
                                                     "kivi_append", "short_num_stages", "rotate_impl", "kernel_sinks")
                             if k in r)
        table.append({"cache": r["cache"], "arm": r["arm"], "command_buffer": r["command_buffer"],
                      "step_ms": r["step_ms"], "ratio_to_dense": r["step_ms"] / base if base else None,
                      "switches": switches or "-"})
    head = (f"Decode step, {a.model} shape, {a.layers} layers, batch {a.batch}, prompt {a.prompt}, capacity "
            f"{a.max_length}; {env['device']}, jax {env['jax_version']}, commit {env['commit']}"
            + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else "") + "\n\n")
    return head + common.markdown(table, ["cache", "arm", "command_buffer", "step_ms", "ratio_to_dense", "switches"])


if __name__ == "__main__":
    main()
