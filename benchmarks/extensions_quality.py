"""Quality vs bits of the opt-in KIVI extensions (issue 8) on SmolLM2-135M, CPU, float32.

For each configuration: perplexity with the cache in the loop (the first token is the
prompt; every later token goes through the model's decode call, teacher-forced, so it is
appended to the cache and attends over what the cache holds) on the first N tokens of each
text, the mean KL(dense || config) of the next-token distributions over the same steps, and
the bits per cached number of a 4k-token cache with fp16 scales (the actual buffer sizes:
cache.nbytes * 8 / (2 * layers * kv_heads * tokens * head_dim); the residual and the sinks
are included, the lengths/overflow flags are not).

    python -m benchmarks.extensions_quality [--tokens 1024] [--texts essays,wiki]

Writes benchmarks/results/extensions-<date>.json and .md after every configuration.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from benchmarks import common
from kivi_jax import KIVICache, KIVIConfig

SIM = {  # issue 8: transformers fake-quant simulation, first 1024 essay tokens
    "dense": 25.68, "kivi-2": 30.72, "+4 sinks": 27.46, "+hadamard kv": 28.58, "+4 sinks +hadamard kv": 27.08,
    "k4/v2": 26.25, "k2/v4": 28.64, "key groups 16": 28.48,
}

CONFIGS = {
    "dense": None,
    "kivi-2": KIVIConfig(),
    "+4 sinks": KIVIConfig(sink_tokens=4),
    "+hadamard kv": KIVIConfig(rotate="kv"),
    "+4 sinks +hadamard kv": KIVIConfig(sink_tokens=4, rotate="kv"),
    "k4/v2": KIVIConfig(k_bits=4, v_bits=2),
    "k2/v4": KIVIConfig(k_bits=2, v_bits=4),
    "key groups 16": KIVIConfig(key_group_size=16),
    "+4 sinks +hadamard kv (R=64)": KIVIConfig(sink_tokens=4, rotate="kv", residual_length=64),
    "+4 sinks (R=64)": KIVIConfig(sink_tokens=4, residual_length=64),
    # the rotation spreads outliers, so coarser groups may cost little: their bits buy a longer window
    "+4 sinks +hadamard kv (G=64 R=192)": KIVIConfig(sink_tokens=4, rotate="kv", group_size=64,
                                                          residual_length=192),
    "+4 sinks +hadamard kv (value G=64)": KIVIConfig(sink_tokens=4, rotate="kv", group_size=64,
                                                         key_group_size=32),
    "+16 sinks +hadamard kv (value G=64)": KIVIConfig(sink_tokens=16, rotate="kv", group_size=64,
                                                          key_group_size=32),
    "+64 sinks +hadamard kv (value G=64)": KIVIConfig(sink_tokens=64, rotate="kv", group_size=64,
                                                          key_group_size=32),
}


def bits_per_number(cfg, *, layers, kv_heads, head_dim, tokens=4096, dtype=jnp.float16) -> float:
    if cfg is None:
        return 8.0 * jnp.dtype(dtype).itemsize
    one = jax.eval_shape(lambda: KIVICache.init(cfg, batch=1, num_kv_heads=kv_heads, head_dim=head_dim,
                                                max_length=tokens, dtype=dtype))
    nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for name, x in vars(one).items()
                 if name not in ("lengths", "overflow") and hasattr(x, "shape"))
    return nbytes * 8 / (2 * kv_heads * tokens * head_dim)  # per layer = the same for all layers


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, ids, dense_logp, cache):
    """ids [B, N]; dense_logp [N-1, B, V] or None. Prefill token 0, then N-2 teacher-forced decode
    steps. Returns NLL [B, N-1], KL [B, N-1] (0 without dense_logp), logp [N-1, B, V] (dense only)."""
    model = nnx.merge(graphdef, state)
    b, n = ids.shape
    logits, cache = model(ids[:, :1], cache, lengths=jnp.ones((b,), jnp.int32))
    lp0 = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), -1)

    def score(lp, tgt, ref):
        nll = -jnp.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0]
        kl = jnp.zeros_like(nll) if ref is None else jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1)
        return nll, kl

    def step(cache, xs):
        tok, tgt, ref = xs
        logits, cache = model(tok[:, None], cache)
        lp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), -1)
        nll, kl = score(lp, tgt, ref)
        return cache, (nll, kl, lp if ref is None else None)

    nll0, kl0 = score(lp0, ids[:, 1], None if dense_logp is None else dense_logp[0])
    refs = None if dense_logp is None else dense_logp[1:]
    _, (nll, kl, lps) = lax.scan(step, cache, (ids[:, 1:-1].T, ids[:, 2:].T, refs))
    nll = jnp.concatenate([nll0[None], nll], 0).T
    kl = jnp.concatenate([kl0[None], kl], 0).T
    logp = None if dense_logp is not None else jnp.concatenate([lp0[None], lps], 0)
    return nll, kl, logp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--texts", default="essays,wiki")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS, comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import models
    from kivi_jax.eval import data

    model, tok = models.load_model("smollm2-135m", dtype=jnp.float32)
    mc = model.config
    texts = [t for t in args.texts.split(",") if t]
    ids = np.concatenate([data.token_chunks(tok, data.load_text(t), num_chunks=1, chunk_len=args.tokens)
                          for t in texts], axis=0)
    ids = jnp.asarray(ids, jnp.int32)
    graphdef, state = nnx.split(model)
    env = common.environment()
    payload = dict(env, model="SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", tokens=args.tokens, texts=texts,
                   protocol="prefill token 0, then teacher-forced decode steps through the cache; KL(dense||cfg) "
                            "mean over the same next-token predictions",
                   bits_note="bits per cached number at a 4096-token cache, fp16 scales/mins/residual/sinks, "
                             "from the buffer sizes (KIVICache.init shapes)",
                   versions=common.package_versions("jax", "flax", "numpy"), simulation_essays_1024=SIM, rows=[])
    dense_logp = None
    names = [n for n in args.configs.split(",") if n]
    if "dense" in names:
        names.remove("dense")
    names = ["dense"] + names  # dense first: the KL reference
    for name in names:
        cfg = CONFIGS[name]
        t0 = time.time()
        cache = model.init_cache(ids.shape[0], args.tokens, kivi=cfg)
        nll, kl, logp = _run(graphdef, state, ids, dense_logp, cache)
        nll, kl = np.asarray(nll, np.float64), np.asarray(kl, np.float64)
        if cfg is None:
            dense_logp = logp
        row = {"config": name, "bits@4k": round(bits_per_number(cfg, layers=mc.num_layers, kv_heads=mc.num_kv_heads,
                                                                head_dim=mc.head_dim), 4),
               "settings": None if cfg is None else {k: v for k, v in vars(cfg).items()}}
        for i, t in enumerate(texts):
            row[f"ppl {t}"] = round(float(np.exp(nll[i].mean())), 3)
            row[f"KL {t}"] = round(float(kl[i].mean()), 5)
        if name in SIM:
            row["sim essays"] = SIM[name]
        row["seconds"] = round(time.time() - t0, 1)
        dense_ppl = payload["rows"][0] if payload["rows"] else row
        for t in texts:
            row[f"vs dense {t}"] = f"{100 * (row[f'ppl {t}'] / dense_ppl[f'ppl {t}'] - 1):+.1f}%"
        payload["rows"].append(row)
        cols = ["config", "bits@4k"] + [c for t in texts for c in (f"ppl {t}", f"vs dense {t}", f"KL {t}")] + \
               ["sim essays", "seconds"]
        table = (f"# Quality vs bits: KIVI extensions on SmolLM2-135M (CPU, float32, first {args.tokens} tokens)\n\n"
                 f"commit {env['commit']}, {env['device']}, jax {env['jax_version']}. "
                 f"{payload['protocol']}. Bits: {payload['bits_note']}.\n\n"
                 + common.markdown(payload["rows"], cols))
        path = common.write_results("extensions", payload, table, args.out)
        print(table.splitlines()[-1], flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
