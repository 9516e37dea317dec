"""Passkey retrieval: a 5-digit key hidden at a given depth in filler text, asked for at the end.

Prompt (Mohtashami & Jaggi's format)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    it. I will quiz you about the important information there. <filler ... needle ... filler>
    What is the pass key? The pass key is

with the needle " The pass key is 12345. Remember it. 12345 is the pass key." inserted at
the sentence boundary nearest to ``depth`` of the filler (0 = first, 1 = last). Fillers:
``synthetic`` ("The grass is green. The sky is blue. ..." repeated) and ``essays`` (the
Paul Graham essays, sentence by sentence from the start). A prompt is at most ``length``
tokens; whole filler sentences only, so rows are ragged (the batch carries lengths). A length
with no room for one whole sentence, or for more filler than there is, is an error.

How it runs, per batch of prompts of one length:

1. the context (header + filler + needle) is prefilled once into a dense cache (prompt
   attention is full precision whatever the cache, so this part is shared by all methods);
2. for each method, that dense K, V is stored into the method's empty cache with its own
   ``prefill`` (vmapped over layers: exactly what the model's prefill would have stored);
3. the question tokens are fed through the decode call one at a time, then 8 tokens are
   generated greedily (one jitted ``lax.scan`` each). So every question and answer token
   attends over the cache -- quantized for KIVI. (Had the question been part of the
   prefill, the first answer digit would come from full-precision prompt attention and
   never read the quantized cache.)

A prompt is answered correctly when the first run of digits in the answer is the key.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from kivi_jax.checks import is_int
from kivi_jax.eval import data
from kivi_jax.eval.methods import Method, init_cache

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
SYNTHETIC = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
FILLERS = ("synthetic", "essays")
ANSWER_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """context_ids [T] int32 (header + filler with the needle) and question_ids [Q] int32.
    The needle occupies context_ids[needle_start:needle_end]; the filler starts at
    filler_start and has filler_len tokens (needle excluded)."""

    context_ids: np.ndarray
    question_ids: np.ndarray
    key: str
    depth: float
    needle_start: int
    needle_end: int
    filler_start: int
    filler_len: int

    @property
    def length(self) -> int:
        """Prompt tokens: context + question."""
        return len(self.context_ids) + len(self.question_ids)

    @property
    def actual_depth(self) -> float:
        """Filler tokens before the needle / all filler tokens."""
        return (self.needle_start - self.filler_start) / max(self.filler_len, 1)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=8)
def _filler_units(tokenizer, filler: str, max_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Token ids of the filler's sentences, each with its leading space, at least max_tokens in all."""
    if filler == "synthetic":
        units = [tuple(_ids(tokenizer, " " + s)) for s in SYNTHETIC]
        per = sum(map(len, units))
        return tuple(units * (max_tokens // per + 1))
    if filler == "essays":
        full = data.essays_text()
        chars = 8 * max_tokens + 1000
        while True:  # (a slice that holds too few tokens is doubled: the prompt came out short, silently)
            text = re.sub(r"\s+", " ", full[:chars])
            sents = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
            enc = tokenizer([" " + s for s in sents], add_special_tokens=False)["input_ids"]
            units, total = [], 0
            for e in enc:
                units.append(tuple(e))
                total += len(e)
                if total >= max_tokens:
                    break
            if total >= max_tokens or chars >= len(full):
                return tuple(units)
            chars *= 2
    raise ValueError(f"filler={filler!r}; allowed: {FILLERS}")


def random_key(rng: random.Random) -> str:
    """A 5-digit key, 10000..99999."""
    return str(rng.randint(10000, 99999))


def build_prompt(tokenizer, *, length: int, depth: float, key: str, filler: str = "synthetic") -> PasskeyPrompt:
    """The passkey prompt of at most ``length`` tokens with ``key`` at ``depth`` of the filler.
    ValueError where ``length`` leaves no room for a whole filler sentence, or the filler runs out."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    if not re.fullmatch(r"\d+", key):
        raise ValueError(f"key={key!r} must be digits")
    header, question = _ids(tokenizer, HEADER), _ids(tokenizer, QUESTION)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    budget = length - len(header) - len(question) - len(needle)
    if budget < 16:
        raise ValueError(f"length={length} leaves {budget} tokens of filler; it must be at least "
                         f"{len(header) + len(question) + len(needle) + 16}")
    avail = _filler_units(tokenizer, filler, budget)
    units, used = [], 0
    for u in avail:
        if used + len(u) > budget:
            break
        units.append(u)
        used += len(u)
    fixed = len(header) + len(question) + len(needle)
    # a prompt must hold filler, and as much as was asked for: length=90 with the essays (a first
    # sentence of 32 SmolLM2 tokens) gave the needle right after the header at every depth, and a
    # filler shorter than the budget gave a short prompt under the requested length's name
    if len(units) == len(avail) and used < budget:
        raise ValueError(f"length={length} needs {budget} tokens of filler; the {filler} filler has only {used}")
    if not units:
        raise ValueError(f"length={length} leaves {budget} tokens of filler, fewer than the first {filler} "
                         f"filler sentence's {len(avail[0])}; it must be at least {fixed + len(avail[0])}")
    cum = np.concatenate([[0], np.cumsum([len(u) for u in units])])
    i = int(np.argmin(np.abs(cum - depth * used)))  # sentence boundary nearest the requested depth
    before = [t for u in units[:i] for t in u]
    after = [t for u in units[i:] for t in u]
    ctx = header + before + needle + after
    start = len(header) + len(before)
    return PasskeyPrompt(np.asarray(ctx, np.int32), np.asarray(question, np.int32), key, float(depth),
                         start, start + len(needle), len(header), used)


def answer_correct(answer: str, key: str) -> bool:
    """The first run of digits in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


# ---- jitted pieces -----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _prefill_context(graphdef, state, ids, lengths, cache):
    """Dense prefill of right-padded contexts ids [B, T]; only the cache is kept (no logits)."""
    _, cache = nnx.merge(graphdef, state)(ids, cache, lengths=lengths)
    return cache


@functools.partial(jax.jit, static_argnames=("num_tokens",))
def _restore(dense, empty, lengths, *, num_tokens: int):
    """The method's cache holding what its own prefill would store: dense K, V [L, B, H, T, D]
    of the first num_tokens positions, put through ``empty.prefill`` layer by layer."""
    from models.cache import StackedCache

    k = dense.layers.k[:, :, :, :num_tokens]
    v = dense.layers.v[:, :, :, :num_tokens]
    layers = jax.vmap(lambda e, k_l, v_l: e.prefill(k_l, v_l, lengths))(empty.layers, k, v)
    return StackedCache(layers)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_answer",))
def _ask(graphdef, state, cache, question, *, num_answer: int):
    """Feeds question [Q] (the same for every row) through the decode call, then greedy-decodes
    num_answer tokens. Returns tokens [B, num_answer] and the cache overflow flags [B]."""
    model = nnx.merge(graphdef, state)
    b = cache.batch_size

    def feed(c, tok):
        logits, c = model(jnp.full((b, 1), tok, jnp.int32), c)
        return c, logits[:, 0]

    cache, logits = lax.scan(feed, cache, question)
    first = jnp.argmax(logits[-1], axis=-1).astype(jnp.int32)

    def gen(carry, _):
        c, tok = carry
        lg, c = model(tok[:, None], c)
        return (c, jnp.argmax(lg[:, 0], axis=-1).astype(jnp.int32)), tok

    (cache, last), toks = lax.scan(gen, (cache, first), None, length=num_answer - 1)
    toks = jnp.concatenate([toks, last[None]], axis=0).T
    return toks, cache.overflow


def answer_batch(model, prompts: Sequence[PasskeyPrompt], methods: Sequence[Method], *,
                 num_answer: int = ANSWER_TOKENS, bucket: int = 256) -> dict[str, np.ndarray]:
    """Greedy answer tokens [B, num_answer] per method name for a batch of prompts that share
    the question. Contexts are right-padded to a multiple of ``bucket`` (fewer compiles)."""
    q = prompts[0].question_ids
    if any(not np.array_equal(p.question_ids, q) for p in prompts):
        raise ValueError("prompts in one batch must share the question")
    n = max(len(p.context_ids) for p in prompts)
    t = -(-n // bucket) * bucket
    ids = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p.context_ids)] = p.context_ids
    lengths = jnp.asarray([len(p.context_ids) for p in prompts], jnp.int32)
    max_length = t + len(q) + num_answer
    graphdef, state = nnx.split(model)
    dense = _prefill_context(graphdef, state, jnp.asarray(ids), lengths,
                             init_cache(model, Method("dense"), len(prompts), max_length))
    out = {}
    for m in methods:
        cache = _restore(dense, init_cache(model, m, len(prompts), max_length), lengths, num_tokens=t)
        toks, overflow = _ask(graphdef, state, cache, jnp.asarray(q), num_answer=num_answer)
        if np.asarray(overflow).any():
            raise RuntimeError(f"cache overflow ({m.name}); max_length={max_length} is too small")
        out[m.name] = np.asarray(toks)
    return out


def run_passkey(model, tokenizer, *, lengths: Sequence[int], depths: Sequence[float], fillers: Sequence[str],
                methods: Sequence[Method], trials: int = 1, seed: int = 0, max_batch_tokens: int = 8192,
                on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """One record per (filler, length, depth, trial, method): key, answer, correct, ..."""
    rng = random.Random(seed)
    jobs = []
    for filler in fillers:
        for length in lengths:
            prompts = [build_prompt(tokenizer, length=length, depth=d, key=random_key(rng), filler=filler)
                       for d in depths for _ in range(trials)]
            # equal batches (one compiled shape per length): the last is padded with a repeated prompt
            per = max(1, max_batch_tokens // length)
            nb = -(-len(prompts) // per)
            size = -(-len(prompts) // nb)
            for s in range(0, len(prompts), size):
                jobs.append((filler, length, prompts[s:s + size], size))
    records = []
    for filler, length, batch, size in jobs:
        answers = answer_batch(model, batch + [batch[-1]] * (size - len(batch)), methods)
        for m in methods:
            for p, toks in zip(batch, answers[m.name]):
                text = tokenizer.decode(toks.tolist(), skip_special_tokens=True)
                records.append(dict(filler=filler, length=length, prompt_tokens=p.length, depth=p.depth,
                                    actual_depth=round(p.actual_depth, 4), key=p.key, method=m.name,
                                    label=m.label, answer=text, correct=answer_correct(text, p.key)))
        if on_batch is not None:
            on_batch(len(batch))
    return records


def accuracy_table(records: list[dict]) -> dict:
    """{(filler, length, method): (correct, total)}."""
    acc: dict = {}
    for r in records:
        k = (r["filler"], r["length"], r["method"])
        c, n = acc.get(k, (0, 0))
        acc[k] = (c + int(r["correct"]), n + 1)
    return acc


# ---- the evaluation: a result dict and a markdown table ------------------------------------------
def run(model, tokenizer, methods: Sequence[Method], *, lengths: Sequence[int], depths: Sequence[float],
        fillers: Sequence[str] = FILLERS, trials: int = 1, seed: int = 0, max_batch_tokens: int = 8192,
        progress: bool = True, model_name: str = "model") -> dict:
    """Passkey accuracy per (filler, length, method) with every answer recorded."""
    import time

    from tqdm.auto import tqdm

    limit = model.config.max_position_embeddings
    # (depths=[] raised a ZeroDivisionError while batching; empty lengths, fillers or methods gave empty tables)
    for name, seq in (("lengths", lengths), ("depths", depths), ("fillers", fillers), ("methods", methods)):
        if isinstance(seq, str) or len(seq) == 0:
            raise ValueError(f"{name}={seq!r} must be a non-empty sequence")
        if name != "methods" and len(set(seq)) != len(seq):  # (a repeat merged into one row, its totals doubled)
            raise ValueError(f"{name}={list(seq)!r} repeats a value; each must appear once")
    for n in lengths:
        if not is_int(n) or n < 1 or n + ANSWER_TOKENS > limit:
            raise ValueError(f"length={n!r} must be an integer with length + {ANSWER_TOKENS} answer tokens "
                             f"<= the model's context of {limit} positions")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth={d!r} must be in [0, 1]")
    for f in fillers:
        if f not in FILLERS:
            raise ValueError(f"filler={f!r}; allowed: {FILLERS}")
    if not is_int(trials) or trials < 1:
        raise ValueError(f"trials={trials!r} must be an integer >= 1")
    total = len(fillers) * len(lengths) * len(depths) * trials
    t0 = time.perf_counter()
    with tqdm(total=total, desc="passkey", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        records = run_passkey(model, tokenizer, lengths=lengths, depths=depths, fillers=fillers, methods=methods,
                              trials=trials, seed=seed, max_batch_tokens=max_batch_tokens, on_batch=bar.update)
    acc = accuracy_table(records)
    accuracy = [dict(filler=f, length=n, method=m, correct=c, total=t, accuracy=c / t)
                for (f, n, m), (c, t) in acc.items()]
    return dict(
        benchmark="passkey", model=model_name,
        settings=dict(lengths=list(lengths), depths=list(depths), fillers=list(fillers), trials=trials, seed=seed,
                      answer_tokens=ANSWER_TOKENS, dtype=str(np.dtype(model.dtype)),
                      methods=[m.settings() for m in methods], header=HEADER, needle=NEEDLE, question=QUESTION,
                      synthetic_filler=" ".join(SYNTHETIC),
                      protocol="context prefilled (full-precision prompt attention) into the method's cache; "
                               "question fed through decode steps; greedy answer; correct when the first run of "
                               "digits equals the key"),
        seconds=round(time.perf_counter() - t0, 1), accuracy=accuracy, records=records)


def markdown(result: dict) -> str:
    """One table per filler: rows = prompt length, columns = caches (correct / total)."""
    from kivi_jax.eval.report import markdown_table

    s = result["settings"]
    labels = {m["name"]: m["label"] for m in s["methods"]}
    acc = {(a["filler"], a["length"], a["method"]): a for a in result["accuracy"]}
    out = []
    for f in s["fillers"]:
        rows = [[str(n)] + [f"{acc[(f, n, m)]['correct']}/{acc[(f, n, m)]['total']}" for m in labels]
                for n in s["lengths"]]
        out.append(f"**{f} filler** (depths {', '.join(str(d) for d in s['depths'])}; {s['trials']} key(s) each)\n\n"
                   + markdown_table(["prompt tokens"] + [labels[m] for m in labels], rows))
    return "\n\n".join(out) + (f"\n\n{result['model']}, {s['dtype']}; passkeys retrieved by greedy decoding "
                                 f"(question and answer decoded through the cache).")
