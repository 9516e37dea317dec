"""Sharded decoding on two GPUs vs one: decode tokens/s and max batch, Llama-2-7B shape.

Random weights (``models.init_random``, bf16; 32 layers, hidden 4096, 32 heads = 32 KV heads,
head_dim 128, intermediate 11008, vocab 32000) through ``kivi_jax.generate(..., mesh=...)``.
Mesh configurations (``--meshes``):

  1    one GPU, no mesh (the baseline every ratio is taken against)
  tp2  data=1 x model=2: weights split by heads / MLP columns / vocab, cache split by KV heads
  dp2  data=2 x model=1: weights replicated, cache and batch split by rows

and caches (``--caches``): kivi2 (KIVI-2, G=32, R=128) and dense (bf16). Per (mesh, cache):

* throughput at a fixed batch (``--batch``, ``--prompt-len``, ``--new-tokens``): the jitted
  prefill and decode loop ``generate`` runs, timed apart (first repetition = compile + run,
  the best later one is reported): ``decode_tps`` = batch x (new - 1) / decode time,
  ``step_ms``, ``e2e_tps`` (prefill included); the tokens are compared with one GPU's.
* max batch for a cache of ``--max-length`` tokens per row: an estimate from the exact
  per-device cache bytes (``kivi_jax.sharding.cache_specs``), the allocator's limit and the
  weights per device, then verified by running generate at that batch (short prompt
  ``--mb-prompt-len``, ``--mb-new-tokens`` new tokens; the whole cache is allocated whatever
  it holds); on out-of-memory the batch shrinks by 15% (at most 5 tries). ``mb_decode_tps``
  is the decode throughput there (short context: the cache holds few tokens).

Each (mesh, cache) runs in a fresh subprocess (per-configuration peak memory, an OOM is a
row, not the end of the run). NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0, set
below before anything imports jax). Files: sharded-<date>[-tag].json and .md in ``--outdir``,
else $OUT, else benchmarks/results/, rewritten after every row.

    python benchmarks/sharded.py                             # 2 GPUs (nvidia-h200-x2)
    python benchmarks/sharded.py --meshes 1,tp2 --caches kivi2 --tag tp   # a part of it
    python benchmarks/sharded.py --dry-run                   # tiny shapes, 2 virtual CPU devices
"""

from __future__ import annotations

import os
import sys

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (device README: hangs/instability)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # the allocator's pool: max batch
if "--dry-run" in sys.argv or os.environ.get("KIVI_SHARDED_DRY") == "1":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

GiB = 2**30
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=64, rms_norm_eps=1e-5)
MESHES = {"1": None, "tp2": dict(data=1, model=2), "dp2": dict(data=2, model=1)}
CACHES = {"kivi2": dict(k_bits=2, v_bits=2, group_size=32, residual_length=128, layout="tokens"), "dense": None}
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OutOfMemory")


def _emit(tag: str, obj) -> None:
    print(f"@@{tag} {json.dumps(obj)}", flush=True)


# =============================================================================================
# child: one (mesh, cache) configuration
# =============================================================================================

def _is_oom(e: BaseException) -> bool:
    return any(m in str(e) for m in OOM_MARKERS)


def _device_stats(devices) -> dict:
    peak, limit, in_use = [], [], []
    for d in devices:
        try:
            s = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - CPU has no allocator stats
            s = {}
        peak.append(s.get("peak_bytes_in_use"))
        limit.append(s.get("bytes_limit"))
        in_use.append(s.get("bytes_in_use"))
    ok = lambda xs: None if any(x is None for x in xs) else max(xs)  # noqa: E731
    return {"peak_bytes": ok(peak), "bytes_limit": ok(limit), "bytes_in_use": ok(in_use)}


def _bytes_per_device(tree, specs, mesh) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs with these specs."""
    import math

    import jax
    from jax.sharding import PartitionSpec as P

    total = 0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for x, s in zip(leaves, spec_leaves):
        split = 1
        if mesh is not None:
            for a in s:
                for name in (() if a is None else (a,) if isinstance(a, str) else a):
                    split *= mesh.shape[name]
        total += math.prod(x.shape) * x.dtype.itemsize // split
    return total


def child(spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import importlib

    import kivi_jax
    import models
    from kivi_jax import sharding

    gen = importlib.import_module("kivi_jax.generate")
    env = {"jax_version": jax.__version__, "device": getattr(jax.devices()[0], "device_kind", "?"),
           "platform": jax.devices()[0].platform, "num_devices": jax.device_count(),
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
    try:
        import flax

        env["flax_version"] = flax.__version__
    except Exception:  # noqa: BLE001
        pass
    _emit("ENV", env)
    row = {"mesh": spec["mesh"], "cache": spec["cache"], "batch": spec["batch"], "prompt_len": spec["prompt_len"],
           "new_tokens": spec["new_tokens"], "max_length": spec["max_length"], "error": None}
    phase = "setup"
    try:
        mshape = MESHES[spec["mesh"]]
        ndev = 1 if mshape is None else mshape["data"] * mshape["model"]
        if jax.device_count() < ndev:
            raise RuntimeError(f"mesh {spec['mesh']} needs {ndev} devices; {jax.device_count()} present")
        mesh = None if mshape is None else sharding.make_mesh(**mshape)
        devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
        dtype = jnp.dtype(spec["dtype"])
        cfg = models.ModelConfig(**spec["config"])
        kivi = None if CACHES[spec["cache"]] is None else kivi_jax.KIVIConfig(**CACHES[spec["cache"]])
        impl = spec.get("attn_impl")

        phase = "init"
        t0 = time.perf_counter()
        model = models.init_random(cfg, jax.random.key(0), dtype)
        if mesh is not None:
            sharding.shard_model(model, mesh)
        params = models.params_of(model)
        jax.block_until_ready(jax.tree.leaves(params))
        row["init_s"] = time.perf_counter() - t0
        pspecs = sharding.param_specs(params, mesh, config=cfg) if mesh is not None else None
        row["weights_bytes_per_device"] = (_bytes_per_device(params, pspecs, mesh) if mesh is not None
                                           else int(sum(x.nbytes for x in jax.tree.leaves(params))))
        del params
        base = _device_stats(devices)

        def run(b, t, n, reps, seed=0, max_length=None):
            """prefill + decode loop of generate (the same jitted programs), timed apart;
            returns ([(prefill_s, decode_s, cache_sharding_kept)] per repetition, tokens)."""
            if spec.get("sim_oom_batch") and b > spec["sim_oom_batch"]:  # dry run: the backoff path
                raise RuntimeError(f"RESOURCE_EXHAUSTED: simulated out of memory at batch {b} (--sim-oom-batch)")
            ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
            prep = gen._prepare(model, ids, max_new_tokens=n, kivi=kivi, lengths=None, temperature=0.0, top_k=None,
                                top_p=None, eos_id=None, key=None, pad_id=0, max_length=max_length or t + n,
                                cache_dtype=None, attn_impl=impl, mesh=mesh, rules=None)
            g, st, i, ln, keys, knobs, c = prep
            out = []
            tokens = None
            for _ in range(reps):
                t0 = time.perf_counter()
                carry = gen._run_prompt(g, st, i, ln, keys, knobs, c)
                jax.block_until_ready(carry)
                t1 = time.perf_counter()
                carry = gen._run(gen._decode_loop, g, st, carry, keys, knobs, c)
                jax.block_until_ready(carry)
                t2 = time.perf_counter()
                got = np.asarray(carry.num_new)
                if int(got.min()) != n:
                    raise RuntimeError(f"rows generated {int(got.min())}..{int(got.max())} tokens; expected {n}")
                tokens = np.asarray(carry.tokens)
                specs_ok = all(
                    a.sharding.is_equivalent_to(e, a.ndim) for a, e in zip(
                        jax.tree.leaves(carry.cache),
                        jax.tree.leaves(sharding.cache_shardings(carry.cache, mesh), is_leaf=lambda x: hasattr(x, "spec"))
                    )) if mesh is not None else True
                del carry
                out.append((t1 - t0, t2 - t1, specs_ok))
            return out, tokens

        # ---- throughput at a fixed batch -----------------------------------------------------------
        phase = "throughput"
        b, t, n = spec["batch"], spec["prompt_len"], spec["new_tokens"]
        times, tokens = run(b, t, n, spec["reps"] + 1)
        prefill_s = min(x[0] for x in times[1:])
        decode_s = min(x[1] for x in times[1:])
        row.update(compile_s=times[0][0] + times[0][1] - prefill_s - decode_s, prefill_s=prefill_s,
                   decode_s=decode_s, step_ms=decode_s / max(n - 1, 1) * 1e3,
                   decode_tps=b * (n - 1) / decode_s, e2e_tps=b * n / (prefill_s + decode_s),
                   cache_sharding_kept=all(x[2] for x in times), tokens=tokens.tolist())
        row.update({f"tp_{k}": v for k, v in _device_stats(devices).items()})
        _emit("PARTIAL", row)
        gc.collect()

        # ---- max batch ----------------------------------------------------------------------------------
        if spec["max_batch"]:
            phase = "max_batch"
            ml, mt, mn = spec["max_length"], spec["mb_prompt_len"], spec["mb_new_tokens"]
            data = 1 if mshape is None else mshape["data"]
            one = jax.eval_shape(lambda: model.init_cache(data, ml, kivi=kivi))  # `data` rows
            cspecs = sharding.cache_specs(one, mesh) if mesh is not None else None
            per_row = (_bytes_per_device(one, cspecs, mesh) if mesh is not None
                       else int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(one)))) / data
            model_split = 1 if mshape is None else mshape["model"]
            vocab_split = model_split if cfg.vocab_size % model_split == 0 else 1
            # prefill activations per row and device: float32 logits [T, V] twice (logits + softmax slack)
            act_row = 2 * mt * cfg.vocab_size * 4 / vocab_split / data
            limit = base["bytes_limit"] or int(spec["sim_mem_gib"] * GiB)
            free = limit * 0.97 - row["weights_bytes_per_device"] - spec["headroom_gib"] * GiB
            est = int(free // (per_row + act_row))
            est = min(est, spec["mb_cap"]) if spec["mb_cap"] else est
            est = max(data, est - est % (8 * data if est >= 64 * data else data))
            row.update(mb_cache_bytes_per_row_per_device=per_row, mb_bytes_limit=limit, mb_estimate=est)
            tries = []
            bb = est
            for _ in range(5):
                try:
                    times, _ = run(bb, mt, mn, 2, seed=1, max_length=ml)
                    decode_s = times[1][1]
                    tries.append({"batch": bb, "ok": True})
                    row.update(max_batch=bb, mb_decode_s=decode_s, mb_step_ms=decode_s / max(mn - 1, 1) * 1e3,
                               mb_decode_tps=bb * (mn - 1) / decode_s)
                    row.update({f"mb_{k}": v for k, v in _device_stats(devices).items()})
                    break
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    tries.append({"batch": bb, "ok": False, "error": str(e).splitlines()[0][:200]})
                    gc.collect()
                    nb = int(bb * 0.85)
                    bb = max(data, nb - nb % data)
            row["mb_tries"] = tries
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{phase}: {type(e).__name__}: {str(e)[:1500]}"
        row["oom"] = _is_oom(e)
        traceback.print_exc()
    _emit("ROW", row)


# =============================================================================================
# parent
# =============================================================================================

def _commit() -> str:
    if os.environ.get("KIVI_COMMIT"):  # the device copy's .git, if any, is not the tree that ran
        return os.environ["KIVI_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - no git
        return "unknown"


def _fmt(v, digits=4):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(payload: dict) -> str:
    e = payload["environment"]
    lines = [f"# Sharded decoding, {payload['model']} shape ({payload['date']})", "",
             f"commit {payload['commit']}, {e.get('device')} x {e.get('num_devices')}, jax {e.get('jax_version')}, "
             f"NCCL_NVLS_ENABLE={e.get('NCCL_NVLS_ENABLE')}, dtype {payload['settings']['dtype']}", "",
             f"Throughput: batch {payload['settings']['batch']}, prompt {payload['settings']['prompt_len']}, "
             f"{payload['settings']['new_tokens']} new tokens. Max batch: cache of "
             f"{payload['settings']['max_length']} tokens per row (verified by running it; prompt "
             f"{payload['settings']['mb_prompt_len']}, {payload['settings']['mb_new_tokens']} new tokens).", "",
             "| mesh | cache | decode tok/s | x 1 GPU | step ms | e2e tok/s | tokens = 1 GPU | max batch | x 1 GPU "
             "| tok/s @ max batch | x 1 GPU | weights GiB/dev | peak GiB/dev | error |",
             "|" + "---|" * 14]
    for r in payload["rows"]:
        lines.append("| " + " | ".join([
            r["mesh"], r["cache"], _fmt(r.get("decode_tps")), _fmt(r.get("decode_tps_vs_1")), _fmt(r.get("step_ms")),
            _fmt(r.get("e2e_tps")), _fmt(r.get("tokens_match_1")), _fmt(r.get("max_batch")),
            _fmt(r.get("max_batch_vs_1")), _fmt(r.get("mb_decode_tps")), _fmt(r.get("mb_decode_tps_vs_1")),
            _fmt(None if r.get("weights_bytes_per_device") is None else r["weights_bytes_per_device"] / GiB),
            _fmt(None if r.get("tp_peak_bytes") is None else r["tp_peak_bytes"] / GiB),
            (r.get("error") or "")[:80].replace("|", "/").replace("\n", " ")]) + " |")
    return "\n".join(lines) + "\n"


def _ratios(rows: list) -> None:
    base = {r["cache"]: r for r in rows if r["mesh"] == "1" and not r.get("error")}
    for r in rows:
        b = base.get(r["cache"])
        if b is None or r.get("error"):
            continue
        for k in ("decode_tps", "max_batch", "mb_decode_tps", "e2e_tps"):
            if r.get(k) and b.get(k):
                r[f"{k}_vs_1"] = r[k] / b[k]
        if r.get("tokens") is not None and b.get("tokens") is not None:
            import numpy as np

            x, y = np.asarray(r["tokens"]), np.asarray(b["tokens"])
            r["tokens_match_1"] = float((x == y).mean()) if x.shape == y.shape else None


def parent(args) -> int:
    dry = args.dry_run
    config = TINY if dry else LLAMA2_7B
    settings = dict(dtype=args.dtype or ("float32" if dry else "bfloat16"), batch=args.batch, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, max_length=args.max_length, mb_prompt_len=args.mb_prompt_len,
                    mb_new_tokens=args.mb_new_tokens, reps=args.reps, attn_impl=args.attn_impl,
                    max_batch=not args.no_max_batch, mb_cap=args.mb_cap, sim_mem_gib=args.sim_mem_gib,
                    headroom_gib=args.headroom_gib, sim_oom_batch=args.sim_oom_batch)
    outdir = pathlib.Path(args.outdir or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    outdir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = f"sharded-{date}" + (f"-{args.tag}" if args.tag else "") + ("-dry" if dry else "")
    payload = {"name": "sharded", "date": date, "commit": _commit(), "model": "tiny-llama" if dry else "llama2-7b",
               "config": config, "settings": settings, "environment": {}, "rows": [], "dry_run": dry}
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["KIVI_SHARDED_DRY"] = "1"
    deadline = time.monotonic() + args.budget_s
    for mesh in args.meshes.split(","):
        for cache in args.caches.split(","):
            if mesh not in MESHES or cache not in CACHES:
                raise SystemExit(f"unknown mesh {mesh!r} (allowed {list(MESHES)}) or cache {cache!r} "
                                 f"(allowed {list(CACHES)})")
            left = deadline - time.monotonic()
            spec = dict(settings, mesh=mesh, cache=cache, config=config)
            if left < 30:
                payload["rows"].append({"mesh": mesh, "cache": cache, "error": "skipped: time budget"})
                continue
            print(f"== {mesh} {cache} (budget left {left:.0f} s)", flush=True)
            row = {"mesh": mesh, "cache": cache, "error": "no result"}
            try:
                p = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--one", json.dumps(spec)],
                                   env=env, cwd=ROOT, capture_output=True, text=True, timeout=left)
                out = p.stdout
                if p.returncode:
                    row["error"] = f"exit {p.returncode}: {p.stderr[-800:]}"
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                row["error"] = "timeout (budget)"
            for line in out.splitlines():
                if line.startswith("@@ENV "):
                    payload["environment"] = json.loads(line[6:])
                elif line.startswith("@@PARTIAL "):
                    row = dict(json.loads(line[10:]), error=row["error"])
                elif line.startswith("@@ROW "):
                    row = json.loads(line[6:])
            payload["rows"].append(row)
            _ratios(payload["rows"])
            short = {k: v for k, v in row.items() if k not in ("tokens", "mb_tries")}
            print(json.dumps(short), flush=True)
            (outdir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
            (outdir / f"{stem}.md").write_text(_table(payload))
    print(_table(payload))
    print(f"wrote {outdir / (stem + '.json')} and .md")
    return 1 if any(r.get("error") for r in payload["rows"]) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model, 2 virtual CPU devices")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--meshes", default="1,tp2,dp2")
    ap.add_argument("--caches", default="kivi2,dense")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--max-length", type=int, help="cache tokens per row for the max-batch search")
    ap.add_argument("--mb-prompt-len", type=int)
    ap.add_argument("--mb-new-tokens", type=int)
    ap.add_argument("--mb-cap", type=int, default=0, help="cap on the max-batch estimate (0: none)")
    ap.add_argument("--no-max-batch", action="store_true")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions after the compiling one")
    ap.add_argument("--attn-impl", default=None, help="auto (None): the Pallas kernel on GPU | pallas | reference")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--sim-mem-gib", type=float, default=0.02, help="memory per device when the backend reports "
                    "none (CPU dry run)")
    ap.add_argument("--sim-oom-batch", type=int, default=0, help="dry run: batches above this raise a simulated "
                    "out-of-memory error (exercises the max-batch backoff)")
    ap.add_argument("--headroom-gib", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.one:
        child(json.loads(args.one))
        return 0
    defaults = (dict(batch=4, prompt_len=80, new_tokens=8, max_length=320, mb_prompt_len=16, mb_new_tokens=4,
                     headroom_gib=0.0, mb_cap=64) if args.dry_run else
                dict(batch=32, prompt_len=2048, new_tokens=128, max_length=4096, mb_prompt_len=64, mb_new_tokens=16,
                     headroom_gib=2.0, mb_cap=0))
    for k, v in defaults.items():
        if getattr(args, k) in (None, 0):
            setattr(args, k, v)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
