"""Checks the compiled Pallas decode kernel against the plain-JAX reference on the GPU.

Fresh random caches (keys with outlier channels, like real LLM keys), built through the
cache's own prefill + append; ragged rows; GQA 1/4/8; 2 and 4 bits (mixed too); bf16,
fp16, fp32; a sliding window; one cache with B*H*T*D > 2**31 numbers, and that cache read in
place as the last layer of a stack whose key codes exceed 2**32 bytes.
Prints a table; exits non-zero if any check fails. Run: python -m benchmarks.check_kernel_gpu [--quick]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax as kj
from kivi_jax import attention_pallas
from benchmarks import common

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def random_kv(key, shape, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    k = jax.random.normal(k1, shape)
    outlier = jax.random.bernoulli(k3, 0.05, (shape[-1],)) * 8.0 + 1.0  # a few large channels
    return (k * outlier).astype(dtype), jax.random.normal(k2, shape).astype(dtype)


def build_cache(cfg, b, hkv, d, lengths, dtype, key, appends=3, max_length=None):
    t = int(max(lengths))
    max_length = max_length or t + appends + 5
    cache = kj.KIVICache.init(cfg, batch=b, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)
    k, v = random_kv(key, (b, hkv, t, d), dtype)
    cache = cache.prefill(k, v, lengths=jnp.asarray(lengths, jnp.int32))
    step = jax.jit(lambda c, k, v: c.append(k, v))
    for i in range(appends):
        ka, va = random_kv(jax.random.fold_in(key, i), (b, hkv, 1, d), dtype)
        cache = step(cache, ka, va)
    return cache


def build_dense(b, hkv, d, lengths, dtype, key, appends=3):
    """A DenseCache holding random prompts of ``lengths`` plus ``appends`` decoded tokens."""
    t = int(max(lengths))
    cache = kj.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=t + appends + 5, dtype=dtype)
    k, v = random_kv(key, (b, hkv, t, d), dtype)
    cache = cache.prefill(k, v, lengths=jnp.asarray(lengths, jnp.int32))
    for i in range(appends):
        cache = cache.append(*random_kv(jax.random.fold_in(key, i), (b, hkv, 1, d), dtype))
    return cache


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def kernel_kw(variant: str) -> dict:
    """decode_attention keywords of a check's variant: "dense" (a DenseCache's kernel), a KIVI
    kernel variant ("swap"), with its ring program ("swap+own") and/or its dequantization
    ("swap/convert", "swap+own/magic")."""
    if variant == "dense":
        return {}
    variant, _, dequant = variant.partition("/")
    v, _, ring_program = variant.partition("+")
    return {"variant": v, **({"ring_program": ring_program} if ring_program else {}),
            **({"dequant": dequant} if dequant else {})}


def check(name, q, cache, variant, window=None, dtype="bfloat16"):
    ref = kj.decode_attention(q, cache, impl="reference", window=window)
    kw = kernel_kw(variant)
    out = jax.jit(lambda q, c: attention_pallas.decode_attention(q, c, window=window, **kw))(q, cache)
    err = rel_err(out, ref)
    finite = bool(np.isfinite(np.asarray(out, np.float32)).all())
    ok = finite and err <= TOL[dtype]
    return {"check": name, "variant": variant, "dtype": dtype, "rel_err": err, "tol": TOL[dtype], "ok": ok}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="swap",
                    help="comma list of KIVI kernel variants, each optionally +ring program (swap+own)")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one case per dtype/bits/GQA pattern (fewer compiles)")
    ap.add_argument("--only", default=None, help="comma list of check-name substrings to run (e.g. 'G64,2^31')")
    ap.add_argument("--name", default="kernel-check", help="results file name (without the date)")
    args = ap.parse_args(argv)

    def wanted(name):
        return args.only is None or any(w in name for w in args.only.split(","))
    variants = args.variants.split(",")
    rows = []
    key = jax.random.key(0)
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        for (kb, vb) in ((2, 2), (4, 4), (2, 4), (4, 2)):
            for (hq, hkv) in ((8, 8), (16, 4), (16, 2)):
                if dtype != "bfloat16" and (hq, hkv) != (16, 4):
                    continue
                if args.quick and (kb, vb, hq // hkv) not in ((2, 2, 1), (4, 4, 4), (2, 4, 8), (4, 2, 4)):
                    continue
                cases.append((dtype, kb, vb, hq, hkv))
    def case_name(kb, vb, hq, hkv):
        return f"k{kb}v{vb} gqa{hq // hkv} ragged"

    cases = [c for c in cases if wanted(case_name(*c[1:]))]
    for i, (dtype, kb, vb, hq, hkv) in enumerate(cases):
        cfg = kj.KIVIConfig(k_bits=kb, v_bits=vb)
        lengths = [1500, 777, 129, 3]  # odd, ragged, tiny
        cache = build_cache(cfg, 4, hkv, 128, lengths, jnp.dtype(dtype), jax.random.fold_in(key, i))
        q = jax.random.normal(jax.random.fold_in(key, 1000 + i), (4, hq, 1, 128)).astype(dtype)
        for variant in variants:
            rows.append(check(case_name(kb, vb, hq, hkv), q, cache, variant, dtype=dtype))
            print(rows[-1], flush=True)
    # sliding window and group size 64, head_dim 64
    cfg = kj.KIVIConfig(group_size=64, residual_length=128)
    cache = build_cache(cfg, 2, 3, 64, [2100, 1000], jnp.bfloat16, jax.random.key(7))
    q = jax.random.normal(jax.random.key(8), (2, 9, 1, 64)).astype(jnp.bfloat16)
    for variant in variants if wanted("G64 D64 gqa3") else ():
        rows.append(check("G64 D64 gqa3 window=700", q, cache, variant, window=700))
        print(rows[-1], flush=True)
        rows.append(check("G64 D64 gqa3", q, cache, variant))
        print(rows[-1], flush=True)
    # the KIVIConfig extensions on the kernel path (sinks and rotation live in the glue)
    # and residual windows that are not a power of two (the ring in steps of 32 slots)
    for name, extra in (("sinks4 rotate=kv", dict(sink_tokens=4, rotate="kv")), ("key groups 16", dict(key_group_size=16)),
                        ("sinks4 window=300", dict(sink_tokens=4)), ("R=96", dict(residual_length=96)),
                        ("R=192 sinks4", dict(residual_length=192, sink_tokens=4)),
                        ("R=96 G16 key groups 32", dict(residual_length=96, group_size=16, key_group_size=32)),
                        # 16 sinks: attended by the ring's program (kivi_window.sink_step)
                        ("sinks16 window=300", dict(sink_tokens=16)), ("sinks16 rotate=kv", dict(sink_tokens=16, rotate="kv")),
                        ("recommended", dict(sink_tokens=16, rotate="kv", group_size=64, key_group_size=32))):
        if not wanted(name):
            continue
        cfg = kj.KIVIConfig(**extra)
        cache = build_cache(cfg, 4, 4, 128, [1300, 517, 130, 2], jnp.bfloat16, jax.random.key(11))
        q = jax.random.normal(jax.random.key(12), (4, 16, 1, 128)).astype(jnp.bfloat16)
        window = 300 if "window" in name else None
        for variant in variants:
            rows.append(check(name, q, cache, variant, window=window))
            print(rows[-1], flush=True)
    # the dense flash-decoding kernel (decode_attention(impl="pallas") on a DenseCache)
    for i, dtype in enumerate(("bfloat16", "float16", "float32")):
        for hq, hkv in ((8, 8), (16, 4), (16, 2)):
            name = f"dense gqa{hq // hkv} ragged"
            if not wanted(name) or (dtype != "bfloat16" and hkv != 4):
                continue
            lengths = [1500, 777, 129, 3]
            cache = build_dense(4, hkv, 128, lengths, jnp.dtype(dtype), jax.random.key(20 + i))
            q = jax.random.normal(jax.random.key(30 + i), (4, hq, 1, 128)).astype(dtype)
            rows.append(check(name, q, cache, "dense", dtype=dtype))
            print(rows[-1], flush=True)
            if hkv == 4 and dtype == "bfloat16":
                rows.append(check(name.replace("ragged", "window=700"), q, cache, "dense", window=700))
                print(rows[-1], flush=True)
    if wanted("dense stack"):  # layer 2 of a 3-layer stack, read in place (the model's path)
        stack = [build_dense(4, 4, 128, [1500, 777, 129, 3], jnp.bfloat16, jax.random.key(40 + s)) for s in range(3)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stack)
        q = jax.random.normal(jax.random.key(44), (4, 16, 1, 128)).astype(jnp.bfloat16)
        out = jax.jit(lambda q, st: attention_pallas.decode_attention(
            q, jax.tree.map(lambda x: x[2], st), stack=(st, jnp.int32(2))))(q, stacked)
        err = rel_err(out, kj.decode_attention(q, stack[2], impl="reference"))
        rows.append({"check": "dense stack, layer 2 in place", "variant": "dense", "dtype": "bfloat16",
                     "rel_err": err, "tol": TOL["bfloat16"], "ok": err <= TOL["bfloat16"]})
        print(rows[-1], flush=True)
    if not args.skip_large and wanted("2^31"):
        # B*H*T*D = 64*32*8448*128 > 2**31: filled at random, compared on a few rows
        b, h, t, d = 64, 32, 8448, 128
        cache = random_cache(kj.KIVIConfig(), batch=b, kv_heads=h, tokens=t, head_dim=d, length=t - 5, key=9)
        q = jax.random.normal(jax.random.key(10), (b, h, 1, d)).astype(jnp.bfloat16)
        for variant in variants:
            out = jax.jit(lambda q, c: attention_pallas.decode_attention(q, c, **kernel_kw(variant)))(q, cache)
            pick = jnp.array([0, 31, 63])
            sub = jax.tree_util.tree_map(lambda x: x[pick], cache)
            ref = kj.decode_attention(q[pick], sub, impl="reference")
            err = rel_err(out[pick], ref)
            rows.append({"check": f"B*H*T*D={b * h * t * d} > 2^31", "variant": variant, "dtype": "bfloat16",
                         "rel_err": err, "tol": 1e-2, "ok": err <= 1e-2})
            print(rows[-1], flush=True)
        # the same cache as layer 7 of an 8-layer stack read in place (the model's path): the
        # stacked key codes are 4.3 GiB, so the kernel's loads need 64-bit offsets
        other = random_cache(kj.KIVIConfig(), batch=b, kv_heads=h, tokens=t, head_dim=d, length=t - 5, key=13)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *([other] * 7 + [cache]))
        del other
        for variant in variants:
            out = jax.jit(lambda q, st: attention_pallas.decode_attention(
                q, jax.tree.map(lambda x: x[7], st), stack=(st, jnp.int32(7)), **kernel_kw(variant)))(q, stacked)
            err = rel_err(out[pick], ref)
            rows.append({"check": f"layer 7 of a stack, {stacked.k_codes.nbytes / 2**30:.1f} GiB of key codes",
                         "variant": variant, "dtype": "bfloat16", "rel_err": err, "tol": 1e-2, "ok": err <= 1e-2})
            print(rows[-1], flush=True)
    env = common.environment()
    table = (f"Compiled checks against the reference, {env['device']}, jax {env['jax_version']}, commit {env['commit']}\n\n"
             + common.markdown(rows, ["check", "variant", "dtype", "rel_err", "tol", "ok"]))
    print(table)
    common.write_results(args.name, {**env, "rows": rows}, table)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def random_cache(cfg, *, batch, kv_heads, tokens, head_dim=128, length=None, key=4):
    """A bf16 KIVICache of ``tokens`` capacity per row, every row holding ``length`` (default:
    ``tokens``; or [B] per row) random tokens (:func:`fill_random`): a benchmark's cache without
    a prefill."""
    cache = kj.KIVICache.init(cfg, batch=batch, num_kv_heads=kv_heads, head_dim=head_dim, max_length=tokens,
                              dtype=jnp.bfloat16)
    lengths = jnp.broadcast_to(jnp.asarray(tokens if length is None else length, jnp.int32), (batch,))
    return fill_random(cache, jax.random.key(key), lengths)


def fill_random(cache, key, lengths):
    """A valid cache state with random codes/scales/mins/residuals (no prefill needed)."""
    ks = jax.random.split(key, 8)
    dt = cache.dtype

    def words(k, x):
        return jax.random.bits(k, x.shape, jnp.uint32)

    return cache.__class__(
        k_codes=words(ks[0], cache.k_codes),
        k_scale=jax.random.uniform(ks[1], cache.k_scale.shape, minval=0.01, maxval=0.3).astype(dt),
        k_min=(-1.5 + 0.3 * jax.random.normal(ks[2], cache.k_min.shape)).astype(dt),
        k_res=jax.random.normal(ks[3], cache.k_res.shape).astype(dt),
        v_codes=words(ks[4], cache.v_codes),
        v_scale=jax.random.uniform(ks[5], cache.v_scale.shape, minval=0.01, maxval=0.3).astype(dt),
        v_min=(-1.5 + 0.3 * jax.random.normal(ks[6], cache.v_min.shape)).astype(dt),
        v_res=jax.random.normal(ks[7], cache.v_res.shape).astype(dt),
        lengths=lengths, overflow=cache.overflow, config=cache.config, max_length=cache.max_length)


if __name__ == "__main__":
    sys.exit(main())
