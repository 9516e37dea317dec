"""Perplexity with the cache in the loop: teacher-forced decoding, one token at a time.

A single prefill never reads the quantized cache (prompt attention is full precision), so
perplexity of a prefill says nothing about KIVI. Here the first ``prefill_len`` tokens are a
prompt and every later token goes through the model's decode call: it is appended to the
cache, attends over everything the cache holds (quantized where KIVI quantized it), and
its logits score the true next token. The decode steps run as a jitted ``lax.scan`` (the
cache is the carry) over chunks of ``chunk`` steps, donated between chunks; the host only
sees the chunk boundaries (progress bars) and the per-token NLLs.

    nll = teacher_forced_nll(model, ids, method)   # ids [B, N] -> [B, N - 1] float64
    ppl = exp(mean(nll))
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from kivi_jax.checks import check_token_ids, is_int
from kivi_jax.eval.methods import Method, init_cache


def _token_nll(logits, targets):
    """logits [B, T, V], targets [B, T] -> [B, T] float32 negative log-likelihoods."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _prefill(graphdef, state, ids, targets, cache):
    """Prompt ids [B, P] into the empty cache; NLL of targets [B, P] (= ids shifted by one)."""
    model = nnx.merge(graphdef, state)
    lengths = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
    logits, cache = model(ids, cache, lengths=lengths)
    return _token_nll(logits, targets), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _decode_chunk(graphdef, state, tokens, targets, cache):
    """tokens, targets [S, B]: S decode steps through the cache; returns NLLs [S, B] and the cache."""
    model = nnx.merge(graphdef, state)

    def step(cache, xs):
        tok, tgt = xs
        logits, cache = model(tok[:, None], cache)
        return cache, _token_nll(logits, tgt[:, None])[:, 0]

    cache, nll = lax.scan(step, cache, (tokens, targets))
    return nll, cache


def teacher_forced_nll(model, ids, method: Method | None = None, *, prefill_len: int = 1, chunk: int = 128,
                       on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
    """Per-token NLLs [B, N - 1] (float64) of ids [B, N] under ``model`` with ``method``'s cache.

    Tokens [0, prefill_len) are a prompt (their next-token NLLs come from the prefill
    logits); tokens prefill_len .. N-2 are fed one per decode step and score the next one.
    Column j is the NLL of token j + 1. ``on_chunk(n)`` is called after each chunk of n steps.
    """
    method = Method("dense") if method is None else method
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be an integer array [B, N]; got {ids.dtype} array of shape {ids.shape}")
    b, n = ids.shape
    vocab = model.config.vocab_size
    check_token_ids("ids", ids, vocab)  # (the jitted calls would not see them: NaN or a wrapped id)
    if not is_int(prefill_len) or not 1 <= prefill_len <= n - 1:
        raise ValueError(f"prefill_len={prefill_len!r} must be an integer in [1, N-1={n - 1}]")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an integer >= 1")
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(ids, jnp.int32)
    cache = init_cache(model, method, b, n)
    nll0, cache = _prefill(graphdef, state, ids[:, :prefill_len], ids[:, 1:prefill_len + 1], cache)
    out = [np.asarray(nll0, np.float64)]
    for s in range(prefill_len, n - 1, chunk):
        e = min(s + chunk, n - 1)
        nll, cache = _decode_chunk(graphdef, state, ids[:, s:e].T, ids[:, s + 1:e + 1].T, cache)
        out.append(np.asarray(nll, np.float64).T)
        if on_chunk is not None:
            on_chunk(e - s)
    overflow = np.asarray(cache.overflow)
    if overflow.any():  # cannot happen with max_length = N; a guard against silent clamping
        raise RuntimeError(f"cache overflow in rows {np.nonzero(overflow)[0].tolist()}")
    return np.concatenate(out, axis=1)


def full_forward_nll(model, ids) -> np.ndarray:
    """[B, N - 1] float64 NLLs from one causal forward pass without a cache (the reference)."""
    ids = jnp.asarray(ids, jnp.int32)
    logits, _ = model(ids)
    return np.asarray(_token_nll(logits[:, :-1], ids[:, 1:]), np.float64)


def perplexity(nll) -> float:
    m = float(np.mean(nll))
    return math.inf if m > 709.0 else math.exp(m)  # (math.exp raised OverflowError past e^709)


# ---- the evaluation: methods x texts, a result dict, a markdown table ---------------------------
REFERENCE = {  # ../shared/EVAL-DATA.md: transformers float32, first 1024 essay tokens, token by token
    "source": "transformers float32 on CPU, first 1024 tokens of the essays, decoded one token at a time",
    "essays_first_1024": {"dense": 25.68, "kivi-2": 30.7, "kivi-4": 25.65},
}
# the settings the reference figures were taken with: a row is compared with them only if it has them
REFERENCE_KIVI = dict(group_size=32, residual_length=128, sink_tokens=0, rotate="none", key_group_size=None,
                      key_axis="channel", value_axis="token")


def _has_reference_settings(method: dict, settings: dict) -> bool:
    """Whether a method row of ``markdown`` ran as the REFERENCE figures did (float32, one prompt
    token, and for KIVI G = 32, R = 128 and none of the extensions)."""
    if settings["dtype"] != "float32" or settings["prefill_len"] != 1:
        return False
    return method["cache"] == "dense" or (method["cache"] == "KIVICache" and all(
        method.get(k) == v for k, v in REFERENCE_KIVI.items()))


def run(model, tokenizer, methods: list[Method], *, texts=("essays", "wiki"), num_chunks: int = 2,
        chunk_len: int = 1024, prefill_len: int = 1, chunk_steps: int = 128, bin_size: int = 64,
        progress: bool = True, model_name: str = "model") -> dict:
    """Teacher-forced perplexity of each method on ``num_chunks`` windows of ``chunk_len`` tokens
    from the start of each text (window 0 of the essays is the reference figure's text).
    All windows of all texts run as one batch per method.

    A row's ``ppl`` pools the text's windows: exp of the mean NLL over all their scored tokens
    (tokens 1..chunk_len-1 of each window, the first prefill_len of them scored by the prefill's
    full-precision logits), not a mean of per-window perplexities (``ppl_per_window``)."""
    from tqdm.auto import tqdm

    from kivi_jax.eval import data

    if not is_int(num_chunks) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r} must be an integer >= 1")
    if not is_int(chunk_len) or chunk_len < 2:
        raise ValueError(f"chunk_len={chunk_len!r} must be an integer >= 2")
    limit = model.config.max_position_embeddings
    if chunk_len > limit:
        raise ValueError(f"chunk_len={chunk_len} exceeds the model's context of {limit} positions")
    # checked before any text is tokenized or any method runs (empty texts raised NumPy's "need at
    # least one array to concatenate", bin_size=0 a ZeroDivisionError after every method had run)
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"texts={texts!r} must be a non-empty sequence of names from {sorted(data.SOURCES)}")
    if len(methods) == 0:
        raise ValueError("methods=[] must name at least one method")
    if not is_int(prefill_len) or not 1 <= prefill_len <= chunk_len - 1:
        raise ValueError(f"prefill_len={prefill_len!r} must be an integer in [1, chunk_len-1={chunk_len - 1}]")
    if not is_int(bin_size) or bin_size < 1:
        raise ValueError(f"bin_size={bin_size!r} must be an integer >= 1")
    chunks = []
    for t in texts:
        try:
            chunks.append(data.token_chunks(tokenizer, data.load_text(t), num_chunks=num_chunks, chunk_len=chunk_len))
        except ValueError as e:  # (too short: say which text)
            raise ValueError(f"texts: {t!r}: {e}") from None
    ids = np.concatenate(chunks)
    steps = chunk_len - 1 - prefill_len
    results = []
    with tqdm(total=steps * len(methods), desc="ppl", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
        for m in methods:
            bar.set_postfix_str(m.label)
            t0 = time.perf_counter()
            nll = teacher_forced_nll(model, ids, m, prefill_len=prefill_len, chunk=chunk_steps, on_chunk=bar.update)
            secs = time.perf_counter() - t0
            for i, text in enumerate(texts):
                rows = nll[i * num_chunks:(i + 1) * num_chunks]
                nb = -(-rows.shape[1] // bin_size)
                results.append(dict(
                    method=m.name, label=m.label, text=text, windows=num_chunks, tokens_scored=int(rows.size),
                    ppl=perplexity(rows), ppl_first_window=perplexity(rows[0]),
                    ppl_per_window=[perplexity(r) for r in rows],
                    nll_bins=[float(rows[:, j * bin_size:(j + 1) * bin_size].mean()) for j in range(nb)],
                    seconds_all_texts=round(secs, 1)))
    dense = {r["text"]: r["ppl"] for r in results if r["method"] == "dense"}
    for r in results:
        if r["text"] in dense:
            r["vs_dense"] = r["ppl"] / dense[r["text"]] - 1.0
    kivis = [m.kivi for m in methods if m.kivi is not None]
    return dict(
        benchmark="ppl", model=model_name,
        settings=dict(texts=list(texts), windows_per_text=num_chunks, chunk_len=chunk_len, prefill_len=prefill_len,
                      decode_steps_per_window=steps, bin_size=bin_size, dtype=str(np.dtype(model.dtype)),
                      group_size=kivis[0].group_size if kivis else None,
                      residual_length=kivis[0].residual_length if kivis else None,
                      methods=[m.settings() for m in methods],
                      scoring="NLL of tokens 1..N-1 of each window; token 1..prefill_len from the prefill logits, "
                              "the rest from decode steps that append the true token and attend over the cache"),
        results=results, reference=REFERENCE)


def markdown(result: dict) -> str:
    """A table: one row per cache, one column per text (+ the reference window)."""
    from kivi_jax.eval.report import markdown_table

    s = result["settings"]
    res = result["results"]
    methods = [m["name"] for m in s["methods"]]
    labels = {m["name"]: m["label"] for m in s["methods"]}
    comparable = {m["name"]: _has_reference_settings(m, s) for m in s["methods"]}
    texts = s["texts"]
    by = {(r["method"], r["text"]): r for r in res}

    def cell(r, key="ppl"):
        v = r[key]
        if "vs_dense" in r and key == "ppl":
            return f"{v:.2f} ({100 * r['vs_dense']:+.1f}%)"
        return f"{v:.2f}"

    header = ["cache"]
    ref = result.get("reference", {}).get("essays_first_1024", {})
    first = "essays" in texts and s["chunk_len"] == 1024
    if first:
        header += ["essays, first 1024 tokens", "reference (transformers)"]
    header += [f"{t} ({s['windows_per_text']} x {s['chunk_len']} tokens)" for t in texts]
    rows = []
    for m in methods:
        row = [labels[m]]
        if first:
            row += [f"{by[(m, 'essays')]['ppl_first_window']:.2f}",
                    f"{ref[m]:.2f}" if m in ref and comparable[m] else "-"]
        row += [cell(by[(m, t)]) for t in texts]
        rows.append(row)
    g, r_ = s.get("group_size"), s.get("residual_length")
    p = s["prefill_len"]  # (a longer prompt's tokens count too, scored from full-precision logits: say so)
    prefill = "prefill 1 token" if p == 1 else f"prefill {p} tokens, whose next-token NLLs count too"
    note = (f"\n\n{result['model']}, {s['dtype']}; KIVI G={g}, R={r_}; perplexity teacher-forced one token at a "
            f"time through the cache ({prefill}); in parentheses: change vs dense.")
    return markdown_table(header, rows) + note
