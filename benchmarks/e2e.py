"""End-to-end decode throughput and peak memory on one GPU: dense bf16 vs KIVI-2 vs KIVI-4
through the library's own ``kivi_jax.generate``, next to Hugging Face transformers' ``generate``.

Random-weight Llama-2-7B shape (32 layers, hidden 4096, 32 heads, head_dim 128, intermediate
11008, vocab 32000, bf16); optionally a Mistral-7B shape (8 KV heads, sliding window 4096).

Sections, in priority order (each configuration runs in its own fresh subprocess, so peak
memory is per configuration and an OOM or a crash is a row, not the end of the run):

1. paper   -- the paper's setting: prompt 160, 338 new tokens, batch 96: dense, kivi2, kivi4.
2. hf      -- transformers ``generate`` (PyTorch, random init) at the same setting: dense cache,
              and the quanto quantized cache (int2, int4) when ``import optimum.quanto`` works.
3. compile -- cold jit lower + compile of one 32-layer decode step (KIVI-2 and dense caches).
4. profile -- (``--profile-step``) one decode step vs the attention call and the cache append.
5. sweep   -- prompt 4096, ``--sweep-new-tokens`` new tokens, batch doubling from 8 until OOM
              (cap 512), dense and kivi2 interleaved so both series get points if time runs out.

Timing: wall clock around a blocked call, after a warm-up call with the same shapes (its
excess over the timed call is reported as ``compile_s``). ``tokens_per_s`` = batch *
new_tokens / total time (prefill + decode); prefill alone is timed with the same compiled
program by making every row stop at its first token (identical prompt rows, that token as
EOS: EOS ids are traced, so nothing recompiles), which gives ``decode_tokens_per_s`` and
``step_ms``. Peak memory: the allocator's ``peak_bytes_in_use`` (weights included) of the
configuration's own process; for HF ``torch.cuda.max_memory_allocated``.

A time budget (``--budget-s``) skips what would not finish; the JSON and the Markdown table
are rewritten after every row, the plot after every subprocess, so a killed run still leaves
results. Files (in $OUT if set, else benchmarks/results/): e2e-<date>.json, .md, .png, .log.

    PYTHONPATH=. python -m benchmarks.e2e                    # the full run (GPU)
    PYTHONPATH=. python -m benchmarks.e2e --compile-check    # compile time of a decode step only
    OUT=/tmp/e2e_dry python -m benchmarks.e2e --dry-run      # tiny 2-layer model on CPU
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback

from benchmarks import common  # imports jax but initializes no backend (the parent never does)

GiB = 2**30

MODELS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
                      model_type="llama"),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=32768,
                       sliding_window=4096, model_type="mistral"),
    # --dry-run: same code paths, CPU-sized (head_dim 64 so group_size 32 divides it)
    "tiny-llama": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, model_type="llama"),
    "tiny-mistral": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5, sliding_window=200, model_type="mistral"),
}
# kivi2 / kivi4: the tokens layout (KIVICache, the Triton kernel) pinned, whatever KIVIConfig's
# default layout ("auto") would pick on this GPU
KIVI = {"dense": None, "dense_xla": None,
        "kivi2": dict(k_bits=2, v_bits=2, layout="tokens"), "kivi4": dict(k_bits=4, v_bits=4, layout="tokens"),
        # KIVI-2 stored in the Mosaic GPU kernel's layout (MosaicKIVICache; Llama MHA / GQA 2 or 4)
        "kivi2m": dict(k_bits=2, v_bits=2, layout="mosaic"),
        # a residual window that is not a power of two (the kernel walks it in steps of 32)
        "kivi2r96": dict(k_bits=2, v_bits=2, residual_length=96, layout="tokens"),
        # the Hadamard rotation of keys and values (KIVIConfig.rotate) in each layout
        "kivi2rot": dict(k_bits=2, v_bits=2, rotate="kv", layout="tokens"),
        "kivi2mrot": dict(k_bits=2, v_bits=2, rotate="kv", layout="mosaic"),
        # sinks with the rotation in the Mosaic layout (value groups of 32)
        "kivi2ms4rot": dict(k_bits=2, v_bits=2, sink_tokens=4, rotate="kv", layout="mosaic"),
        "kivi2ms16rot": dict(k_bits=2, v_bits=2, sink_tokens=16, rotate="kv", layout="mosaic"),
        # the README's recommended 2-bit setting (value groups of 64: the token layout)
        "kivi2rec": dict(k_bits=2, v_bits=2, sink_tokens=16, rotate="kv", group_size=64, key_group_size=32)}
# caches run with non-default implementations: dense_xla is a dense cache with XLA's attention
# and matmuls (generate's dense default before 2026-11-30's in-place kernels: 22 ms steps at
# the paper setting vs 9.2)
IMPLS = {"dense_xla": dict(attn_impl="xla", matmul_impl="xla")}
HF_CACHES = ("hf_dense", "hf_quanto2", "hf_quanto4")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OutOfMemory", "CUDA_ERROR_OUT_OF_MEMORY")
# targets of the issue ("End-to-end decode throughput and memory on one GPU")
ABSL_INFO = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")
TARGETS = {"paper_peak_dense_over_kivi2": 2.6, "paper_tps_kivi2_over_hf_best": 5.0,
           "sweep_max_batch_kivi2_over_dense": 4.0, "sweep_best_tps_kivi2_over_dense": 3.5,
           "paper_step_ms_kivi2_over_dense": 1.0,  # "at equal batch a KIVI-2 decode step is no slower"
           # the same targets for KIVI-2 in the Mosaic layout (KIVIConfig()'s pick for the Llama shape)
           "paper_peak_dense_over_kivi2m": 2.6, "paper_step_ms_kivi2m_over_dense": 1.0,
           "paper_tps_kivi2m_over_hf_best": 5.0, "sweep_max_batch_kivi2m_over_dense": 4.0,
           "sweep_best_tps_kivi2m_over_dense": 3.5}


def _emit(tag: str, obj) -> None:
    print(f"@@{tag} {json.dumps(obj)}", flush=True)


def _is_oom(text: str) -> bool:
    """Device memory ran out (XLA says RESOURCE_EXHAUSTED for a kernel's shared memory too: that
    is a kernel that does not fit a multiprocessor at this shape, an error, not the batch's OOM)."""
    return any(m in text for m in OOM_MARKERS) and "Shared memory size limit exceeded" not in text


def _base_row(spec: dict, cache: str) -> dict:
    return {"section": spec["section"], "model": spec["model"], "cache": cache, "prompt_len": spec["prompt_len"],
            "new_tokens": spec["new_tokens"], "batch": spec["batch"], "tokens_per_s": None, "peak_bytes": None,
            "oom": False, "matmul_impl": spec.get("matmul_impl")}


# =============================================================================================
# children: one configuration each, run as ``python -m benchmarks.e2e --one '<json spec>'``
# =============================================================================================

def _jax_env() -> dict:
    import jax

    env = common.environment()
    env.update(common.package_versions("jaxlib", "flax"))
    env["num_devices"] = jax.device_count()
    from models import llama

    from kivi_jax import cache_kivi, cache_mosaic

    env["rare_writes"] = llama.rare_writes_mode()  # (KIVI_RARE_WRITES, which the children inherit)
    env["mosaic_append"] = cache_mosaic.append_impl()  # (KIVI_MOSAIC_APPEND)
    env["kivi_append"] = cache_kivi.append_impl()  # (KIVI_APPEND)
    return env


def _memory_stats() -> dict:
    import jax

    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has allocator stats
        return {}


def model_config(name: str, **overrides):
    """A ``models.ModelConfig`` of one of MODELS' shapes (e.g. num_layers=4 for a shorter stack)."""
    import models

    return models.ModelConfig(**{**MODELS[name], **overrides})


def _model(spec: dict):
    import jax
    import jax.numpy as jnp

    import models

    cfg = models.ModelConfig(**spec["config"])
    t = time.perf_counter()
    model = models.init_random(cfg, jax.random.key(spec.get("seed", 0)), jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(models.params_of(model)))
    return cfg, model, time.perf_counter() - t


def _short_rows(out) -> str:
    """Why rows stopped short, from the final cache: which layers flagged an overflow (a refused
    write) and each layer's cache lengths."""
    import numpy as np

    layers = getattr(out.cache, "layers", None)
    if layers is None or not hasattr(layers, "overflow"):
        return ""
    overflow = np.asarray(layers.overflow).reshape(-1, out.tokens.shape[0])  # [L, B]
    lengths = np.asarray(layers.lengths).reshape(overflow.shape)
    return (f"; overflow in layers {np.flatnonzero(overflow.any(1)).tolist()} of {len(overflow)} (rows "
            f"{int(overflow.any(0).sum())}); cache lengths {int(lengths.min())}..{int(lengths.max())}, per layer "
            f"min {lengths.min(1).tolist()}")


def child_generate(spec: dict) -> None:
    """One (model, cache, prompt, new tokens, batch) through kivi_jax.generate: one row."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kivi_jax
    import models
    from kivi_jax.generate import TRACE_COUNTS, _default_matmul_impl

    _emit("ENV", _jax_env())
    row = _base_row(spec, spec["cache"])
    phase = "init"
    try:
        cfg, model, row["init_s"] = _model(spec)
        row["weights_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(models.params_of(model))))
        row["peak_bytes_after_init"] = _memory_stats().get("peak_bytes_in_use")
        kivi = None if KIVI[spec["cache"]] is None else kivi_jax.KIVIConfig(**KIVI[spec["cache"]])
        b, t, n = spec["batch"], spec["prompt_len"], spec["new_tokens"]
        rng = np.random.default_rng(spec.get("seed", 0))
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
        ids_same = jnp.tile(ids[:1], (b, 1))  # every row the same prompt: one first token
        shapes = jax.eval_shape(lambda: model.init_cache(b, t + n, kivi=kivi))  # nothing allocated
        row["cache_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
        # what generate runs its decode matmuls with (None: the model's default, xla)
        impls = IMPLS.get(spec["cache"], {})
        row["matmul_impl"] = (spec.get("matmul_impl") or impls.get("matmul_impl")
                              or _default_matmul_impl(model, None) or "xla")

        def gen(x, eos=None):
            out = kivi_jax.generate(model, x, max_new_tokens=n, kivi=kivi, eos_id=eos,
                                    attn_impl=impls.get("attn_impl"),
                                    matmul_impl=spec.get("matmul_impl") or impls.get("matmul_impl"))
            jax.block_until_ready(out.tokens)
            return out

        phase = "warmup"  # compiles prefill + decode loop, runs them once
        if spec.get("simulate_oom"):
            raise RuntimeError("RESOURCE_EXHAUSTED: simulated out of memory (--simulate-oom-batch, dry run)")
        t0 = time.perf_counter()
        out = gen(ids_same)
        row["warmup_s"] = time.perf_counter() - t0
        # a whole generate ran at this batch: it fits, whatever happens to the timing after
        row.update(fits=True, peak_bytes=_memory_stats().get("peak_bytes_in_use"))
        _emit("PARTIAL", row)
        traces = dict(TRACE_COUNTS)
        first = sorted({int(x) for x in np.asarray(out.tokens[:, 0])})
        del out

        phase = "timed"
        times = []
        for _ in range(max(1, spec.get("reps", 1))):
            t0 = time.perf_counter()
            out = gen(ids)
            times.append(time.perf_counter() - t0)
            got = np.asarray(out.lengths)
            why = _short_rows(out) if int(got.min()) != n else ""
            del out
            if int(got.min()) != n:
                raise RuntimeError(f"rows generated {int(got.min())}..{int(got.max())} tokens, expected {n}{why}")
        total = min(times)
        row.update(total_s=total, times_s=times, tokens_per_s=b * n / total, compile_s=row["warmup_s"] - total,
                   retraced=dict(TRACE_COUNTS) != traces)
        stats = _memory_stats()
        row["peak_bytes"] = stats.get("peak_bytes_in_use")
        row["bytes_limit"] = stats.get("bytes_limit")
        _emit("PARTIAL", row)

        phase = "prefill"  # the same compiled program; every row stops after its first token
        row["prefill_s"], prefill_times = None, []
        try:
            if len(first) <= 8:  # EOS ids are padded to 8 slots: up to 8 ids keep the compiled shapes
                for _ in range(max(1, spec.get("prefill_reps", 1))):
                    t0 = time.perf_counter()
                    out = gen(ids_same, eos=first)
                    prefill_times.append(time.perf_counter() - t0)
                    stopped = int(np.max(np.asarray(out.lengths))) == 1
                    del out
                    if not stopped:
                        prefill_times = []
                        break
            if prefill_times:
                row.update(prefill_s=min(prefill_times), prefill_times_s=prefill_times)
            else:
                row["prefill_note"] = f"one prompt in every row gave {len(first)} distinct first tokens: not timed"
        except Exception as e:  # noqa: BLE001 - the throughput row stands without the split
            row["prefill_error"] = f"{type(e).__name__}: {e}"[:300]
        row["retraced"] = dict(TRACE_COUNTS) != traces  # True would mean a timed call compiled
        if row["prefill_s"] is not None and n > 1 and total > row["prefill_s"]:
            decode = total - row["prefill_s"]
            row.update(decode_s=decode, decode_tokens_per_s=b * (n - 1) / decode, step_ms=decode / (n - 1) * 1e3)
        row["peak_bytes"] = _memory_stats().get("peak_bytes_in_use", row["peak_bytes"])
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        text = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()
        row.update(oom=_is_oom(text), error=text[:600], phase=phase)
        if "_decode_loop" in text or "_decode_loop" in tb:
            row["failed_in"] = "decode_loop"
        elif "_prefill" in text or "_prefill" in tb:
            row["failed_in"] = "prefill"
        print(tb[-3000:], file=sys.stderr, flush=True)
        row["peak_bytes_at_failure"] = _memory_stats().get("peak_bytes_in_use")
    _emit("ROW", row)


def child_hf(spec: dict) -> None:
    """transformers generate (PyTorch) at one shape: one row per cache in spec['caches']."""
    caches = spec["caches"]

    def skip_all(reason):
        for c in caches:
            _emit("ROW", {**_base_row(spec, c), "skipped": True, "reason": reason})

    try:
        import torch
        import transformers
    except Exception as e:  # noqa: BLE001
        return skip_all(f"torch/transformers not importable: {type(e).__name__}: {e}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not spec.get("allow_cpu"):
        return skip_all("no CUDA device visible to torch")
    device = "cuda" if on_gpu else "cpu"
    env = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "torch_device": torch.cuda.get_device_name(0) if on_gpu else "cpu"}
    try:
        import optimum.quanto  # noqa: F401

        quanto_error = None
        env["optimum_quanto_version"] = common.package_versions("optimum-quanto")["optimum-quanto"]
    except Exception as e:  # noqa: BLE001
        quanto_error = f"import optimum.quanto failed: {type(e).__name__}: {e}"
    _emit("HFENV", env)

    import models

    cfg = models.ModelConfig(**spec["config"])
    hf_cls = transformers.MistralConfig if cfg.model_type == "mistral" else transformers.LlamaConfig
    model_cls = transformers.MistralForCausalLM if cfg.model_type == "mistral" else transformers.LlamaForCausalLM
    t0 = time.perf_counter()
    try:
        torch.manual_seed(spec.get("seed", 0))
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):  # initialize on the device (a 7B init on the host takes minutes)
                model = model_cls(hf_cls(**cfg.to_hf_dict()))
        finally:
            torch.set_default_dtype(prev)
        model = model.to(device=device, dtype=torch.bfloat16).eval()
        if on_gpu:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return skip_all(f"model init failed: {type(e).__name__}: {e}"[:600])
    init_s = time.perf_counter() - t0
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    b, t, n = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    gen_rng = torch.Generator(device="cpu").manual_seed(spec.get("seed", 0))
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen_rng).to(device)
    mask = torch.ones_like(ids)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for cache in caches:
        row = {**_base_row(spec, cache), "init_s": init_s, "weights_bytes": weights_bytes}
        if cache != "hf_dense" and quanto_error:
            _emit("ROW", {**row, "skipped": True, "reason": quanto_error[:600]})
            continue
        nbits = {"hf_quanto2": 2, "hf_quanto4": 4}.get(cache)
        api = ["generate_kwargs"]  # transformers' documented spelling; a Cache object as fallback

        def cache_kwargs():
            if nbits is None:
                return {}
            if api[0] == "generate_kwargs":
                return {"cache_implementation": "quantized", "cache_config": {"backend": "quanto", "nbits": nbits}}
            from transformers.cache_utils import QuantizedCache

            return {"past_key_values": QuantizedCache(backend="quanto", config=model.config, nbits=nbits)}

        def gen(num):
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num, min_new_tokens=num,
                                     do_sample=False, pad_token_id=0, **cache_kwargs())
            sync()
            return out

        phase = "warmup"
        t_warm = time.perf_counter()
        try:
            try:
                gen(4)
            except Exception as e:  # noqa: BLE001
                if nbits is None or _is_oom(str(e)) or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                print(f"[hf] {cache}: generate(cache_implementation='quantized') failed ({type(e).__name__}: "
                      f"{str(e)[:300]}); retrying with past_key_values=QuantizedCache(...)", flush=True)
                api[0] = "cache_object"
                gen(4)
            row["hf_cache_api"] = api[0] if nbits else None
            row["warmup_s"] = time.perf_counter() - t_warm
            print(f"[hf] {cache}: warm-up generate(4 tokens) {row['warmup_s']:.1f} s", flush=True)
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            phase = "prefill"
            t0 = time.perf_counter()
            gen(1)
            row["prefill_s"] = time.perf_counter() - t0
            phase = "timed"
            times = []
            for _ in range(max(1, spec.get("reps", 1))):
                t0 = time.perf_counter()
                out = gen(n)
                times.append(time.perf_counter() - t0)
                if out.shape[1] != t + n:
                    raise RuntimeError(f"generated {out.shape[1] - t} tokens, expected {n}")
                del out
            total = min(times)
            row.update(total_s=total, times_s=times, tokens_per_s=b * n / total)
            decode = total - row["prefill_s"]
            if n > 1 and decode > 0:
                row.update(decode_s=decode, decode_tokens_per_s=b * (n - 1) / decode, step_ms=decode / (n - 1) * 1e3)
            if on_gpu:
                row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
                row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        except Exception as e:  # noqa: BLE001
            text = f"{type(e).__name__}: {e}"
            row.update(oom=isinstance(e, torch.cuda.OutOfMemoryError) or _is_oom(text), error=text[:600], phase=phase)
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
        _emit("ROW", row)
        if on_gpu:
            torch.cuda.empty_cache()


def child_compile(spec: dict) -> None:
    """Cold jit lower + compile of one decode step of the full-depth model (abstract weights:
    nothing is allocated). The models issue wants this well under a minute on the GPU."""
    import jax
    import jax.numpy as jnp

    import kivi_jax
    import models

    _emit("ENV", _jax_env())
    cfg = models.ModelConfig(**spec["config"])
    model = models.abstract_model(cfg, jnp.bfloat16)
    apply, params = models.functional(model)
    b, max_len = spec["batch"], spec["prompt_len"] + spec["new_tokens"]
    for cache in spec["caches"]:
        row = {"model": spec["model"], "cache": cache, "batch": b, "max_length": max_len,
               "num_layers": cfg.num_layers}
        try:
            kivi = None if KIVI[cache] is None else kivi_jax.KIVIConfig(**KIVI[cache])
            cache_shape = jax.eval_shape(lambda: model.init_cache(b, max_len, kivi=kivi))
            ids = jax.ShapeDtypeStruct((b, 1), jnp.int32)
            step = jax.jit(lambda p, x, c: apply(p, x, c), donate_argnums=2)
            t0 = time.perf_counter()
            lowered = step.lower(params, ids, cache_shape)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            row.update(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0)
            try:
                ma = compiled.memory_analysis()
                row["temp_bytes"] = int(ma.temp_size_in_bytes)
            except Exception:  # noqa: BLE001
                pass
            print(f"[compile-check] {spec['model']} {cache} decode step (L={cfg.num_layers}, B={b}, "
                  f"max_length={max_len}): lower {t1 - t0:.2f} s + compile {t2 - t1:.2f} s = {t2 - t0:.2f} s",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:600]
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
        _emit("COMPILE", row)


def child_profile(spec: dict) -> None:
    """One decode step of the full model vs its parts (times L): the attention call on one layer's
    cache and that layer's cache append; the rest is matmuls, norms, RoPE, logits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kivi_jax
    import models
    from kivi_jax.generate import _default_matmul_impl

    _emit("ENV", _jax_env())
    row = {"model": spec["model"], "cache": spec["cache"], "batch": spec["batch"]}
    try:
        cfg, model, _ = _model(spec)
        kivi = None if KIVI[spec["cache"]] is None else kivi_jax.KIVIConfig(**KIVI[spec["cache"]])
        apply, params = models.functional(model)
        b, steps = spec["batch"], 16
        ctx = spec["prompt_len"] + spec["new_tokens"] // 2  # mid-generation context
        row["context"] = ctx
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, ctx)), jnp.int32)
        cache = model.init_cache(b, ctx + 4 * steps, kivi=kivi)
        prefill = jax.jit(lambda p, x, c, n: apply(p, x, c, lengths=n), donate_argnums=2)
        _, cache = prefill(params, ids, cache, jnp.full((b,), ctx, jnp.int32))
        # the decode matmuls generate would use (the stacked-matmul kernel for KIVI on a GPU)
        row["matmul_impl"] = impl = spec.get("matmul_impl") or _default_matmul_impl(model, None) or "xla"
        step = jax.jit(lambda p, x, c: apply(p, x, c, matmul_impl=impl), donate_argnums=2)
        tok = ids[:, -1:]
        logits, cache = step(params, tok, cache)
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = step(params, tok, cache)
        jax.block_until_ready(logits)
        step_ms = (time.perf_counter() - t0) / steps * 1e3

        layer = cache.layer(0)
        del cache
        key = jax.random.key(1)
        q = jax.random.normal(key, (b, cfg.num_heads, 1, cfg.head_dim), jnp.bfloat16)
        attend = jax.jit(lambda q, c: kivi_jax.decode_attention(q, c, window=cfg.sliding_window))
        attn_ms = common.time_fn(attend, q, layer)
        k = jax.random.normal(key, (b, cfg.num_kv_heads, 1, cfg.head_dim), jnp.bfloat16)
        append = jax.jit(lambda c, k, v: c.append(k, v), donate_argnums=0)
        layer = append(layer, k, k)
        jax.block_until_ready(layer)
        t0 = time.perf_counter()
        for _ in range(steps):
            layer = append(layer, k, k)
        jax.block_until_ready(layer)
        append_ms = (time.perf_counter() - t0) / steps * 1e3
        L = cfg.num_layers
        row.update(step_ms=step_ms, attention_ms=attn_ms * L, append_ms=append_ms * L,
                   other_ms=step_ms - (attn_ms + append_ms) * L, attention_ms_per_layer=attn_ms,
                   append_ms_per_layer=append_ms, layer_cache_bytes=int(layer.nbytes))
        print(f"[profile] {spec['model']} {spec['cache']} B={b} ctx={ctx}: step {step_ms:.2f} ms; "
              f"attention {attn_ms * L:.2f} ms, append {append_ms * L:.2f} ms (x{L} layers, each timed alone); "
              f"rest {row['other_ms']:.2f} ms", flush=True)
    except Exception as e:  # noqa: BLE001
        text = f"{type(e).__name__}: {e}"
        row.update(error=text[:600], oom=_is_oom(text))
        print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
    _emit("PROFILE", row)


CHILDREN = {"generate": child_generate, "hf": child_hf, "compile": child_compile, "profile": child_profile}


# =============================================================================================
# parent: plans the configurations, runs each in a subprocess, collects and writes results
# =============================================================================================

@dataclasses.dataclass
class Child:
    rows: list
    rc: int | None
    timed_out: bool
    tail: list
    partial: dict | None = None  # the last PARTIAL row: what a child killed later had measured


class Runner:
    def __init__(self, args, name: str = "e2e"):
        self.args = args
        self.name = name
        self.t_start = time.monotonic()
        self.date = datetime.date.today().isoformat()
        self.outdir = common.out_dir(args.out)
        self.stem = f"{name}-{self.date}"
        self.log = open(self.outdir / f"{self.stem}.log", "w")
        self.payload = {
            "name": name, "commit": common.commit(), "date": self.date, "device": None, "platform": None,
            # (from the package: known even when no child reports; the children's ENV agrees)
            "jax_version": common.jax.__version__, "python": sys.version.split()[0],
            **{f"{k.replace('-', '_')}_version": v for k, v in common.package_versions(
                "jaxlib", "flax", "torch", "transformers", "optimum-quanto").items()},
            "dry_run": bool(args.dry_run), "argv": sys.argv[1:], "settings": self._settings(),
            "rows": [], "compile_check": [], "profile": [], "summary": {}, "notes": [],
        }

    def _settings(self) -> dict:
        a = self.args
        keys = ("paper_prompt", "paper_new_tokens", "paper_batch", "paper_caches", "sweep_prompts",
                "sweep_new_tokens", "sweep_start", "sweep_cap", "sweep_caches", "reps", "budget_s", "mistral",
                "only_mistral")
        return {k: getattr(a, k) for k in keys}

    # ---- bookkeeping ----------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def add_row(self, row: dict) -> None:
        row.setdefault("oom", False)
        row["t_since_start_s"] = round(self.elapsed(), 1)
        self.payload["rows"].append(row)
        tps, peak = row.get("tokens_per_s"), row.get("peak_bytes")
        status = ("SKIPPED " + row.get("reason", "")) if row.get("skipped") else (
            "OOM" if row["oom"] else ("ERROR " + row["error"][:160]) if row.get("error") else "ok")
        self.say(f"  -> {row['section']:6s} {row['model']} {row['cache']:10s} T={row['prompt_len']} "
                 f"N={row['new_tokens']} B={row['batch']}: "
                 f"{'%.0f tok/s' % tps if tps else '-'}, peak {'%.2f GiB' % (peak / GiB) if peak else '-'} [{status}]")
        self.write()

    def write(self, plot: bool = False) -> None:
        self.payload["summary"] = summarize(self.payload)
        self.payload["elapsed_s"] = round(self.elapsed(), 1)
        common.write_results(self.name, self.payload, render_markdown(self.payload), str(self.outdir))
        if plot:
            try:
                render_plot(self.payload, self.outdir / f"{self.stem}.png")
            except Exception as e:  # noqa: BLE001 - a plot failure must not lose the numbers
                self.say(f"plot failed: {type(e).__name__}: {e}")

    # ---- one subprocess -------------------------------------------------------------------
    def child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(self.args.mem_fraction))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        if self.args.dry_run:
            env["JAX_PLATFORMS"] = "cpu"
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        return env

    def run_child(self, spec: dict, timeout: float) -> Child:
        cmd = [sys.executable, "-m", "benchmarks.e2e", "--one", json.dumps(spec)]
        self.say(f"[{self.elapsed():6.1f}s] start {spec['kind']} {spec.get('model')} "
                 f"{spec.get('cache', spec.get('caches', ''))} T={spec.get('prompt_len')} N={spec.get('new_tokens')} "
                 f"B={spec.get('batch')} (timeout {timeout:.0f}s)")
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=self.child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines: queue.Queue = queue.Queue()

        def reader():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        res = Child(rows=[], rc=None, timed_out=False, tail=[])
        tail = collections.deque(maxlen=30)
        while True:
            try:
                line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    res.timed_out = True
                    proc.kill()  # our own child, by its handle
                    thread.join(timeout=10)
                    while not lines.empty():  # rows printed just before the kill still count
                        line = lines.get()
                        if line is not None:
                            self._line(line, res, tail)
                    break
                continue
            if line is None:
                break
            self._line(line, res, tail)
        res.rc = proc.wait()
        res.tail = list(tail)
        self.say(f"[{self.elapsed():6.1f}s] done rc={res.rc}{' (timed out)' if res.timed_out else ''}")
        return res

    def _line(self, line: str, res: Child, tail) -> None:
        self.log.write(line)
        self.log.flush()
        if line.startswith("@@"):
            tag, _, body = line[2:].partition(" ")
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                tail.append(line)
                return
            if tag == "ROW":
                res.rows.append(obj)
                self.add_row(obj)
            elif tag == "PARTIAL":
                res.partial = obj
            elif tag == "ENV":
                if self.payload["device"] is None:
                    self.payload.update({k: obj[k] for k in ("device", "platform", "jax_version")})
                    self.payload["num_devices"] = obj.get("num_devices")
                    self.payload["rare_writes"] = obj.get("rare_writes")
                    self.payload["mosaic_append"] = obj.get("mosaic_append")
                    self.payload["kivi_append"] = obj.get("kivi_append")
            elif tag == "HFENV":
                self.payload["hf_env"] = obj
                if self.payload["device"] is None:
                    self.payload["device"] = obj.get("torch_device")
            elif tag in ("COMPILE", "PROFILE"):
                self.payload["compile_check" if tag == "COMPILE" else "profile"].append(obj)
                self.write()
            return
        tail.append(line)
        if self.args.verbose or not ABSL_INFO.match(line):  # absl INFO/WARNING lines only in the log
            print("    | " + line, end="", flush=True)

    def missing_rows(self, spec: dict, caches: list, res: Child) -> None:
        """Rows the child never reported (killed, crashed): what its last PARTIAL row had
        measured when there is one (after the warm-up the batch is known to fit; after the
        timed call its throughput is known), else an error row."""
        got = {r["cache"] for r in res.rows}
        text = "".join(res.tail)
        for c in caches:
            if c in got:
                continue
            if res.timed_out:
                err = "timeout: child killed at the time budget / --child-timeout"
            else:
                err = f"child exited rc={res.rc} without a result; output tail: {text[-400:]}"
            part = res.partial if res.partial and res.partial.get("cache") == c else None
            if part is None:
                self.add_row({**_base_row(spec, c), "oom": _is_oom(text), "error": err})
            elif part.get("tokens_per_s"):  # only the prefill/decode split is missing
                self.add_row({**part, "note": f"prefill not timed: {err}"})
            else:
                self.add_row({**part, "error": f"{err} (after the warm-up: the batch fits, not timed)"})

    def budget_for(self, est: float) -> float | None:
        """Timeout for the next child, or None when fewer than ``est`` seconds are left."""
        left = self.remaining()
        if left < est:
            return None
        return min(self.args.child_timeout, left - 2)

    # ---- sections -------------------------------------------------------------------------
    def spec(self, kind, section, model, prompt_len, new_tokens, batch, **kw) -> dict:
        return dict(kind=kind, section=section, model=model, config=MODELS[model], prompt_len=prompt_len,
                    new_tokens=new_tokens, batch=batch, reps=self.args.reps, seed=0,
                    prefill_reps=1 if section == "sweep" else 2, matmul_impl=self.args.matmul_impl, **kw)

    def generate_one(self, section, model, cache, prompt_len, new_tokens, batch) -> dict:
        simulate = self.args.simulate_oom_batch and cache == "dense" and section == "sweep" and \
            batch >= self.args.simulate_oom_batch
        spec = self.spec("generate", section, model, prompt_len, new_tokens, batch, cache=cache,
                         simulate_oom=bool(simulate))
        timeout = self.budget_for(self.args.min_child_s)
        if timeout is None:
            row = {**_base_row(spec, cache), "skipped": True,
                   "reason": f"time budget: {self.remaining():.0f}s left of --budget-s {self.args.budget_s}"}
            self.add_row(row)
            return row
        before = len(self.payload["rows"])
        res = self.run_child(spec, timeout)
        self.missing_rows(spec, [cache], res)
        self.write(plot=True)
        return self.payload["rows"][before:][-1]

    def section_paper(self, model: str) -> None:
        a = self.args
        self.say(f"== paper setting: {model}, prompt {a.paper_prompt}, {a.paper_new_tokens} new, batch {a.paper_batch}")
        for cache in a.paper_caches:
            self.generate_one("paper", model, cache, a.paper_prompt, a.paper_new_tokens, a.paper_batch)

    def section_hf(self, model: str) -> None:
        a = self.args
        self.say("== HF transformers generate at the paper setting")
        spec = self.spec("hf", "hf", model, a.paper_prompt, a.paper_new_tokens, a.paper_batch,
                         caches=list(HF_CACHES), allow_cpu=bool(a.dry_run))
        timeout = self.budget_for(a.min_child_s)
        if timeout is None:
            for c in HF_CACHES:
                self.add_row({**_base_row(spec, c), "skipped": True, "reason": "time budget"})
            return
        res = self.run_child(spec, timeout)
        self.missing_rows(spec, list(HF_CACHES), res)
        self.write(plot=True)

    def section_compile(self, model: str) -> None:
        a = self.args
        self.say("== compile check: lower + compile one decode step")
        spec = self.spec("compile", "compile", model, a.paper_prompt, a.paper_new_tokens, a.paper_batch,
                         caches=["kivi2", "dense"])
        timeout = self.budget_for(20)
        if timeout is None:
            self.payload["notes"].append("compile check skipped: time budget")
            return
        res = self.run_child(spec, timeout)
        if not self.payload["compile_check"]:
            self.payload["compile_check"].append({"model": model, "error": f"rc={res.rc} timed_out={res.timed_out}: "
                                                  + "".join(res.tail)[-400:]})
        self.write()

    def section_profile(self, model: str) -> None:
        a = self.args
        self.say("== profile of one decode step")
        for cache in ("dense", "kivi2"):
            spec = self.spec("profile", "profile", model, a.paper_prompt, a.paper_new_tokens, a.profile_batch,
                             cache=cache)
            timeout = self.budget_for(a.min_child_s)
            if timeout is None:
                self.payload["notes"].append(f"profile {cache} skipped: time budget")
                continue
            res = self.run_child(spec, timeout)
            if not any(p.get("cache") == cache for p in self.payload["profile"]):
                self.payload["profile"].append({"model": model, "cache": cache, "batch": a.profile_batch,
                                                "error": f"rc={res.rc} timed_out={res.timed_out}"})
            self.write()

    def section_sweep(self, model: str) -> None:
        a = self.args
        for prompt in a.sweep_prompts:
            self.say(f"== sweep: {model}, prompt {prompt}, {a.sweep_new_tokens} new, batch x2 from "
                     f"{a.sweep_start} to <= {a.sweep_cap}, caches {a.sweep_caches}")
            nxt = {c: a.sweep_start for c in a.sweep_caches}
            while nxt:
                for cache in list(nxt):  # interleaved: every series advances one batch per round
                    b = nxt[cache]
                    row = self.generate_one("sweep", model, cache, prompt, a.sweep_new_tokens, b)
                    fits = row.get("fits") and not row.get("oom")  # a larger batch may still fit (or OOM fast)
                    if (row.get("oom") or row.get("error") or row.get("skipped")) and not fits or 2 * b > a.sweep_cap:
                        if not (row.get("oom") or row.get("error") or row.get("skipped")):
                            self.payload["notes"].append(f"sweep {model} T={prompt} {cache}: reached the cap "
                                                         f"B={b} without OOM")
                        del nxt[cache]
                    else:
                        nxt[cache] = 2 * b

    def run(self) -> None:
        a = self.args
        self.say(f"e2e benchmark -> {self.outdir}/{self.stem}.* (budget {a.budget_s}s, dry_run={a.dry_run})")
        base, extra = ("tiny-llama", "tiny-mistral") if a.dry_run else ("llama2-7b", "mistral-7b")
        if not a.only_mistral:
            if not a.skip_paper:
                self.section_paper(base)
            if not a.skip_hf:
                self.section_hf(base)
            if not a.skip_compile_check:
                self.section_compile(base)
            if a.profile_step:
                self.section_profile(base)
            if not a.skip_sweep:
                self.section_sweep(base)
        if a.mistral or a.only_mistral:
            if not a.skip_paper:
                self.section_paper(extra)
            if not a.skip_sweep:
                self.section_sweep(extra)
        self.write(plot=True)
        self.say(f"done in {self.elapsed():.0f}s")
        self.say(render_markdown(self.payload))
        self.log.close()


# =============================================================================================
# summary, table, plot
# =============================================================================================

def _ok(r: dict) -> bool:
    return bool(r.get("tokens_per_s")) and not r.get("oom") and not r.get("error") and not r.get("skipped")


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def summarize(p: dict) -> dict:
    rows = p["rows"]
    out: dict = {"targets": TARGETS}
    for model in sorted({r["model"] for r in rows}):
        s: dict = {}
        paper = {r["cache"]: r for r in rows if r["model"] == model and r["section"] in ("paper", "hf") and _ok(r)}
        dense, k2 = paper.get("dense"), paper.get("kivi2")
        hf = [r for c, r in paper.items() if c.startswith("hf_")]
        if dense and k2:
            s["paper_peak_dense_over_kivi2"] = _ratio(dense.get("peak_bytes"), k2.get("peak_bytes"))
            s["paper_tps_kivi2_over_dense"] = _ratio(k2["tokens_per_s"], dense["tokens_per_s"])
            s["paper_step_ms_kivi2_over_dense"] = _ratio(k2.get("step_ms"), dense.get("step_ms"))
        k2m = paper.get("kivi2m")  # the same KIVI-2 numbers in the Mosaic kernel's layout
        if dense and k2m:
            s["paper_peak_dense_over_kivi2m"] = _ratio(dense.get("peak_bytes"), k2m.get("peak_bytes"))
            s["paper_tps_kivi2m_over_dense"] = _ratio(k2m["tokens_per_s"], dense["tokens_per_s"])
            s["paper_step_ms_kivi2m_over_dense"] = _ratio(k2m.get("step_ms"), dense.get("step_ms"))
        if hf:  # (KIVI-2 in each layout: KIVIConfig() picks the Mosaic one for the Llama shape here)
            best = max(hf, key=lambda r: r["tokens_per_s"])
            s["paper_hf_best"] = best["cache"]
            for name, r in (("kivi2", k2), ("kivi2m", k2m)):
                if r:
                    s[f"paper_tps_{name}_over_hf_best"] = _ratio(r["tokens_per_s"], best["tokens_per_s"])
        for prompt in sorted({r["prompt_len"] for r in rows if r["model"] == model and r["section"] == "sweep"}):
            sw = [r for r in rows if r["model"] == model and r["section"] == "sweep" and r["prompt_len"] == prompt]
            per = {}
            for cache in sorted({r["cache"] for r in sw}):
                ok = [r for r in sw if r["cache"] == cache and _ok(r)]
                fit = [r["batch"] for r in sw if r["cache"] == cache and (_ok(r) or r.get("fits")) and not r.get("oom")]
                ooms = sorted(r["batch"] for r in sw if r["cache"] == cache and r.get("oom"))
                per[cache] = {
                    "max_batch": max(fit, default=None),  # a batch whose warm-up generate ran fits
                    "first_oom_batch": ooms[0] if ooms else None,
                    "best_tokens_per_s": max((r["tokens_per_s"] for r in ok), default=None),
                    "best_at_batch": max(ok, key=lambda r: r["tokens_per_s"])["batch"] if ok else None,
                }
            key = f"sweep_T{prompt}"
            s[key] = per
            for name in ("kivi2", "kivi2m"):  # KIVI-2 in each layout, as in the paper setting
                if "dense" not in per or name not in per:
                    continue
                d, k = per["dense"], per[name]
                s[f"{key}_max_batch_{name}_over_dense"] = _ratio(k["max_batch"], d["max_batch"])
                s[f"{key}_best_tps_{name}_over_dense"] = _ratio(k["best_tokens_per_s"], d["best_tokens_per_s"])
                eq = {}
                for r in sw:
                    if r["cache"] == name and _ok(r):
                        m = [x for x in sw if x["cache"] == "dense" and x["batch"] == r["batch"] and _ok(x)]
                        if m and r.get("step_ms") and m[0].get("step_ms"):
                            eq[str(r["batch"])] = r["step_ms"] / m[0]["step_ms"]
                s[f"{key}_step_ms_{name}_over_dense_by_batch"] = eq
        out[model] = s
    return out


def _rounded(v):
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


def _fmt_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r2 = {k: v for k, v in r.items() if v is not None}
        for k in ("peak_bytes", "weights_bytes", "cache_bytes"):
            if r.get(k):
                r2[k.replace("_bytes", "_GiB")] = r[k] / GiB
        status = "skipped: " + r.get("reason", "") if r.get("skipped") else (
            "OOM" + (f" ({r['failed_in']})" if r.get("failed_in") else "") if r.get("oom") else
            "fits (its warm-up generate ran); killed before the timed call" if r.get("error") and r.get("fits") else
            ("error: " + r["error"][:100] if r.get("error") else "ok"))
        r2["status"] = status.replace("|", "/").replace("\n", " ")
        out.append(r2)
    return out


def _switches(p: dict) -> str:
    """The decode step's trace-time switches the run used, for the table's header."""
    parts = []
    if p.get("rare_writes"):
        where = "once a step" if p["rare_writes"] == "step" else "in each layer"
        parts.append(f"KIVI flush decided {where} (RARE_WRITES={p['rare_writes']})")
    for key, layout, switch in (("mosaic_append", "Mosaic-layout", "APPEND_IMPL"),
                                ("kivi_append", "token-layout", "cache_kivi.APPEND_IMPL")):
        if p.get(key):
            how = "in one kernel" if p[key] == "pallas" else "in XLA"
            parts.append(f"{layout} appends {how} ({switch}={p[key]})")
    return "".join(", " + x for x in parts)


def render_markdown(p: dict) -> str:
    head = (f"# End-to-end decode: kivi_jax.generate vs HF transformers\n\n"
            f"commit `{p['commit']}`, {p['date']}, device {p['device']} ({p.get('platform')}), jax {p['jax_version']}, "
            f"flax {p.get('flax_version')}, torch {p.get('torch_version')}, "
            f"transformers {p.get('transformers_version')}, optimum-quanto {p.get('optimum_quanto_version')}"
            f"{_switches(p)}"
            f"{', DRY RUN (tiny model, CPU)' if p['dry_run'] else ''}\n\n"
            "tokens/s = batch x new tokens / (prefill + decode) wall time; decode tok/s excludes the prefill; "
            "peak = allocator peak of the configuration's own process, weights included.\n\n")
    cols = ["model", "cache", "prompt_len", "new_tokens", "batch", "tokens_per_s", "decode_tokens_per_s", "step_ms",
            "prefill_s", "peak_GiB", "cache_GiB", "compile_s", "status"]
    rows = _fmt_rows(p["rows"])
    parts = [head, "## Paper setting (and HF transformers)\n\n",
             common.markdown([r for r in rows if r["section"] in ("paper", "hf")], cols), "\n"]
    sweep = [r for r in rows if r["section"] == "sweep"]
    if sweep:
        parts += ["## Long-context sweep\n\n", common.markdown(sweep, cols), "\n"]
    summ = p.get("summary", {})
    lines = []
    for model, s in summ.items():
        if model == "targets":
            continue
        for k, v in s.items():
            t = TARGETS.get(re.sub(r"^sweep_T\d+_", "sweep_", k))  # sweep keys carry the prompt length
            if isinstance(v, float):
                lower = "step_ms" in k  # a time ratio: lower is better
                met = "" if t is None else (f" (target {'<=' if lower else '>='} {t}: "
                                            f"{'met' if (v <= t if lower else v >= t) else 'MISSED'})")
                lines.append(f"- {model} {k}: {v:.3g}{met}")
            elif isinstance(v, dict) and v:
                lines.append(f"- {model} {k}: " + json.dumps(_rounded(v)))
            elif v is not None and not isinstance(v, dict):
                lines.append(f"- {model} {k}: {v}")
    if lines:
        parts += ["## Summary vs the issue's targets\n\n", "\n".join(lines), "\n\n"]
    if p.get("profile"):
        parts += ["## One decode step (attention and append timed alone on one layer, x layers)\n\n",
                  common.markdown(p["profile"], ["model", "cache", "matmul_impl", "batch", "context", "step_ms",
                                                 "attention_ms", "append_ms", "other_ms", "error"]), "\n"]
    if p.get("compile_check"):
        parts += ["## Compile check: one decode step, cold lower + compile\n\n",
                  common.markdown(p["compile_check"], ["model", "cache", "num_layers", "batch", "max_length",
                                                       "lower_s", "compile_s", "total_s", "error"]), "\n"]
    if p.get("notes"):
        parts += ["## Notes\n\n"] + [f"- {n}\n" for n in p["notes"]]
    return "".join(parts)


def render_plot(p: dict, path) -> None:
    """tokens/s vs batch for the sweep (a line per cache) and the paper setting's bars; a run with
    one section only (e.g. --skip-paper) gets that panel alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in p["rows"] if r["section"] == "sweep"]
    paper = [r for r in p["rows"] if r["section"] in ("paper", "hf")]
    panels = [(_plot_sweep, sweep), (_plot_paper, paper)]
    panels = [(draw, rows) for draw, rows in panels if rows] or panels  # nothing measured: both say so
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for ax, (draw, rows) in zip(axes[0], panels):
        draw(ax, rows)
    fig.suptitle(f"kivi-jax e2e decode, {p.get('device')}, commit {p['commit']}"
                 + (" (DRY RUN)" if p["dry_run"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(ax1, sweep: list) -> None:
    series = sorted({(r["model"], r["prompt_len"], r["cache"]) for r in sweep})
    for model, prompt, cache in series:
        rs = sorted((r for r in sweep if (r["model"], r["prompt_len"], r["cache"]) == (model, prompt, cache)),
                    key=lambda r: r["batch"])
        ok = [r for r in rs if _ok(r)]
        label = f"{cache} ({model}, prompt {prompt})"
        if ok:
            line, = ax1.plot([r["batch"] for r in ok], [r["tokens_per_s"] for r in ok], marker="o", label=label)
            color = line.get_color()
        else:
            color = None
        oom = [r["batch"] for r in rs if r.get("oom")]
        if oom:
            ax1.scatter(oom, [0] * len(oom), marker="x", s=80, color=color,
                        label=f"{cache} OOM" if ok else f"{label} OOM")
    ax1.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in sweep})
    if batches:
        ax1.set_xticks(batches, [str(x) for x in batches])
    ax1.set_xlabel("batch")
    ax1.set_ylabel("tokens/s (prefill + decode)")
    n = ", ".join(str(x) for x in sorted({r["new_tokens"] for r in sweep}))
    ax1.set_title(f"Long-context sweep ({n} new tokens; x = OOM)" if sweep else "Long-context sweep: no data")
    ax1.grid(True, alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)


def _plot_paper(ax2, paper: list) -> None:
    names, tps, labels = [], [], []
    for r in paper:
        names.append(f"{r['cache']}\n{r['model']}" if len({x['model'] for x in paper}) > 1 else r["cache"])
        tps.append(r["tokens_per_s"] if _ok(r) else 0)
        if _ok(r):
            labels.append(f"{r['peak_bytes'] / GiB:.1f} GiB" if r.get("peak_bytes") else "")
        else:
            labels.append("skipped" if r.get("skipped") else "OOM" if r.get("oom") else "error")
    if paper:
        bars = ax2.bar(range(len(names)), tps, color=["tab:gray" if c.startswith("hf") else "tab:blue"
                                                      for c in (r["cache"] for r in paper)])
        ax2.set_xticks(range(len(names)), names, fontsize=8)
        for bar, lab in zip(bars, labels):
            ax2.annotate(lab, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize=8)
        r0 = paper[0]
        ax2.set_title(f"Paper setting: prompt {r0['prompt_len']}, {r0['new_tokens']} new, batch {r0['batch']} "
                      "(label: peak memory)", fontsize=10)
    else:
        ax2.set_title("Paper setting: no data")
    ax2.set_ylabel("tokens/s")
    ax2.grid(True, axis="y", alpha=0.3)


# =============================================================================================

def _caches(s: str) -> list[str]:
    out = [x for x in s.split(",") if x]
    bad = [x for x in out if x not in KIVI]
    if bad:
        raise argparse.ArgumentTypeError(f"caches {bad}; allowed: {sorted(KIVI)}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny 2-layer model on CPU, tiny shapes: checks the script")
    ap.add_argument("--compile-check", action="store_true",
                    help="only time lower+compile of one 32-layer decode step (KIVI-2, dense) and print it")
    ap.add_argument("--profile-step", action="store_true", help="also profile one decode step (dense, kivi2)")
    ap.add_argument("--profile-batch", type=common.at_least(1), default=None,
                    help="batch of --profile-step (default: paper batch)")
    ap.add_argument("--paper-prompt", type=common.at_least(1), default=160)
    ap.add_argument("--paper-new-tokens", type=common.at_least(1), default=338)
    ap.add_argument("--paper-batch", type=common.at_least(1), default=96)
    ap.add_argument("--paper-caches", type=_caches, default=["dense", "kivi2", "kivi4"])
    ap.add_argument("--sweep-prompts", type=common.int_list(), default=[4096], help="comma list, e.g. 4096,16384")
    ap.add_argument("--sweep-new-tokens", type=common.at_least(1), default=256)
    ap.add_argument("--sweep-start", type=common.at_least(1), default=8)
    ap.add_argument("--sweep-cap", type=common.at_least(1), default=512)
    ap.add_argument("--sweep-caches", type=_caches, default=["dense", "kivi2"])
    ap.add_argument("--matmul-impl", choices=["xla", "pallas"], default=None,
                    help="kivi-jax decode steps' matmuls (default: generate's: pallas for KIVI caches on a GPU, "
                         "else xla); pallas reads the stacked weights in place")
    ap.add_argument("--mistral", action="store_true", help="also the Mistral-7B shape (8 KV heads), after the rest")
    ap.add_argument("--only-mistral", action="store_true",
                    help="only the Mistral-7B shape's paper setting and sweep (each device call is at most 10 min)")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-compile-check", action="store_true")
    ap.add_argument("--reps", type=common.at_least(1), default=1, help="timed generate calls per configuration (best is kept)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run in seconds (default 470; 900 with --dry-run): "
                         "configurations that would start later are skipped, a running one is killed at the end")
    ap.add_argument("--min-child-s", type=float, default=45.0,
                    help="do not start a 7B configuration with fewer seconds than this left in the budget")
    ap.add_argument("--child-timeout", type=float, default=300.0, help="kill one configuration after this long")
    ap.add_argument("--mem-fraction", type=float, default=0.95,
                    help="XLA_PYTHON_CLIENT_MEM_FRACTION for the JAX children (unless already set)")
    ap.add_argument("--simulate-oom-batch", type=common.at_least(1), default=None,
                    help="testing: dense sweep rows at batch >= this raise a fake OOM (set by --dry-run)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results)")
    ap.add_argument("--verbose", action="store_true", help="echo absl log lines of the children too")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one child spec
    a = ap.parse_args(argv)
    if a.dry_run:
        # prompt stays 160 (> R = 128, so KIVI quantizes in prefill and flushes during decode)
        a.paper_new_tokens, a.paper_batch = 24, 2
        a.sweep_prompts, a.sweep_new_tokens, a.sweep_start, a.sweep_cap = [256], 8, 2, 8
        a.simulate_oom_batch = a.simulate_oom_batch or 4
        a.min_child_s = 5.0
    if a.budget_s is None:
        a.budget_s = 900.0 if a.dry_run else 470.0
    if a.profile_batch is None:
        a.profile_batch = a.paper_batch
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.one is not None:
        spec = json.loads(a.one)
        CHILDREN[spec["kind"]](spec)
        return
    runner = Runner(a, "e2e-compile" if a.compile_check else "e2e")
    if a.compile_check:
        runner.say("compile check only")
        runner.section_compile("tiny-llama" if a.dry_run else "llama2-7b")
        for r in runner.payload["compile_check"]:
            runner.say(json.dumps(r))
        runner.log.close()
        return
    runner.run()


if __name__ == "__main__":
    main()
