"""kivi_jax.generate / generate_stream / sampling on a real (tiny) attention LM.

Expectations come from elsewhere than the code under test: the toy model's cache-free
full-sequence forward re-run on the growing sequence, an eager Python step loop over the
model's own cache calls, rows run alone, NumPy sampling distributions.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import toy_model  # noqa: E402

import kivi_jax  # noqa: E402
import importlib  # noqa: E402

gen = importlib.import_module("kivi_jax.generate")  # the module (kivi_jax.generate is the function)
from kivi_jax.generate import GenerateOutput, generate, generate_stream  # noqa: E402
from kivi_jax.sampling import sample_logits  # noqa: E402
from flax import nnx  # noqa: E402

V = 97
N = 12
F32 = dict(cache_dtype=jnp.float32)
KIVI = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=16)
# Few static configurations on purpose (each is a compile): temperature, top_p, EOS ids,
# pad_id, key are traced values, so tests that vary only those share compiled code.
SAMPLED = dict(temperature=1.0, top_k=8, top_p=0.8)
KIVI_SAMPLED = dict(kivi=KIVI, temperature=0.9, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    return toy_model.ToyLM(vocab=V, seed=0)


@pytest.fixture(scope="module")
def last(model):
    return last_logits_fn(model)


@pytest.fixture(scope="module")
def prompts():
    """Right-padded ragged prompts [3, 20] and lengths [20, 7, 1] (padding is a real token id,
    so a leak of padding into attention would change the tokens)."""
    ids = np.random.default_rng(0).integers(0, V, (3, 20)).astype(np.int32)
    return ids, np.array([20, 7, 1], np.int32)


WIDTH = 48  # the naive references run every sequence padded to this many tokens


def jitted(fn, model):
    """fn(model, *args) jitted, the model split into (graphdef, state) once (no retrace per call)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
    return lambda *a: f(state, *a)


def last_logits_fn(model, forward=lambda m, ids: m.forward(ids)):
    """seq (a list) -> float64 logits [V] after it, from the cache-free full-sequence forward.

    The sequence is right-padded to WIDTH: the forward is causal, so position len-1 does not
    see the padding, and one compiled program serves every length."""
    f = jitted(lambda m, ids, n: forward(m, ids)[0, n - 1], model)

    def last(seq):
        ids = np.zeros((1, WIDTH), np.int32)
        ids[0, : len(seq)] = seq
        return np.asarray(f(jnp.asarray(ids), len(seq)), np.float64)

    return last


def naive_greedy(last_logits, prompt, n, eos=None):
    """Re-runs the full forward on the growing sequence; argmax each time."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(np.argmax(last_logits(seq)))
        out.append(t)
        seq.append(t)
        if eos is not None and t == eos:
            break
    return out


def eager_cached_greedy(model, ids, lens, n, kivi):
    """Plain Python loop over the model's own prefill / decode calls on the batch (each call
    jitted alone; no while_loop, no generate machinery). Returns [B, n] tokens."""
    prefill = jitted(lambda m, x, c, ln: m(x, c, lengths=ln), model)
    decode = jitted(lambda m, x, c: m(x, c), model)
    b = ids.shape[0]
    cache = model.init_cache(b, ids.shape[1] + n, kivi=kivi, dtype=jnp.float32)
    logits, cache = prefill(jnp.asarray(ids), cache, jnp.asarray(lens))
    tok = np.asarray(jnp.argmax(logits[np.arange(b), np.asarray(lens) - 1], axis=-1))
    out = [tok]
    for _ in range(n - 1):
        logits, cache = decode(jnp.asarray(tok[:, None], jnp.int32), cache)
        tok = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        out.append(tok)
    return np.stack(out, 1).tolist()


def rows(out: GenerateOutput):
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[b, : lens[b]].tolist() for b in range(toks.shape[0])]


# ---- greedy correctness ------------------------------------------------------------------

def test_toy_model_depends_on_context(last, prompts):
    """Fixture sanity: the continuation depends on more than the last token, so the tests
    below would see a cache that loses or corrupts context."""
    ids, _ = prompts
    a = naive_greedy(last, ids[0], 8)
    changed = ids[0].copy()
    changed[0] = (changed[0] + 1) % V
    assert naive_greedy(last, changed, 8) != a


def test_greedy_equals_naive_full_forward(model, last, prompts):
    ids, lens = prompts
    out = generate(model, ids, lengths=lens, max_new_tokens=N, **F32)
    assert out.tokens.shape == (3, N) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [N, N, N])
    for b in range(3):
        assert rows(out)[b] == naive_greedy(last, ids[b, : lens[b]], N), f"row {b}"


def test_kivi_greedy_equals_eager_cached_loop(model, prompts):
    """KIVI cache through prefill + while_loop (key flushes at 16 and 32 tokens, values
    leaving the 16-token window) equals a Python step loop over the same cache calls."""
    ids, lens = prompts
    out = generate(model, ids, lengths=lens, max_new_tokens=N, kivi=KIVI, **F32)
    np.testing.assert_array_equal(out.lengths, [N, N, N])
    assert rows(out) == eager_cached_greedy(model, ids, lens, N, KIVI)
    dense = generate(model, ids, lengths=lens, max_new_tokens=N, **F32)
    assert rows(out) != rows(dense)  # 2-bit keys/values really are in the loop


@pytest.mark.parametrize("kivi", [None, KIVI], ids=["dense", "kivi"])
def test_ragged_rows_equal_rows_alone(model, prompts, kivi):
    ids, lens = prompts
    out = generate(model, ids, lengths=lens, max_new_tokens=N, kivi=kivi, **F32)
    for b in range(3):
        alone = generate(model, ids[b: b + 1, : lens[b]], max_new_tokens=N, kivi=kivi, max_length=20 + N, **F32)
        assert rows(out)[b] == rows(alone)[0], f"row {b}"


# ---- stopping ----------------------------------------------------------------------------

def test_eos_stops_each_row(model, prompts):
    ids, lens = prompts
    free = rows(generate(model, ids, lengths=lens, max_new_tokens=N, **F32))
    eos = free[0][3]  # row 0 stops at step <= 3; other rows wherever (or never) they meet it
    pad = 5
    out = generate(model, ids, lengths=lens, max_new_tokens=N, eos_id=eos, pad_id=pad, **F32)
    toks = np.asarray(out.tokens)
    for b in range(3):
        stop = free[b].index(eos) + 1 if eos in free[b] else N
        assert int(out.lengths[b]) == stop, f"row {b}"
        assert toks[b, :stop].tolist() == free[b][:stop]
        assert (toks[b, stop:] == pad).all()
    assert int(out.lengths[0]) <= 4
    # several EOS ids: the first of either ends the row
    eos2 = free[1][2]
    out2 = generate(model, ids, lengths=lens, max_new_tokens=N, eos_id=[eos, eos2], **F32)
    for b in range(3):
        hits = [i for i, t in enumerate(free[b]) if t in (eos, eos2)]
        assert int(out2.lengths[b]) == (hits[0] + 1 if hits else N)


def test_eos_rows_match_naive_with_eos(model, last, prompts):
    ids, lens = prompts
    free = naive_greedy(last, ids[1, : lens[1]], N)
    eos = free[5]
    out = generate(model, ids, lengths=lens, max_new_tokens=N, eos_id=eos, **F32)
    assert rows(out)[1] == naive_greedy(last, ids[1, : lens[1]], N, eos=eos)


def test_full_cache_stops_row_without_writing_past_capacity(model, prompts):
    ids, lens = prompts
    max_length = 23  # row 0 (20 prompt tokens) can append 3 more
    out = generate(model, ids, lengths=lens, max_new_tokens=N, max_length=max_length, **F32)
    free = rows(generate(model, ids, lengths=lens, max_new_tokens=N, **F32))
    expect_len = [min(N, max_length - int(n) + 1) for n in lens]  # + the token computed from a full cache
    np.testing.assert_array_equal(out.lengths, expect_len)
    assert expect_len[0] == 4
    for b in range(3):
        assert rows(out)[b] == free[b][: expect_len[b]]
    for c in out.cache:
        assert c.max_length == max_length
        assert (np.asarray(c.lengths) <= max_length).all()


class SmallCacheLM(toy_model.ToyLM):
    """A model whose cache is 2 tokens smaller than asked: generate's own count can't see
    it coming, so only the cache's overflow flag can stop the row."""

    def init_cache(self, batch_size, max_length, kivi=None, dtype=jnp.float32):
        return super().init_cache(batch_size, max_length - 2, kivi=kivi, dtype=dtype)


def test_cache_overflow_stops_row_and_drops_its_token(prompts):
    ids, lens = prompts
    small = SmallCacheLM(vocab=V, seed=0)
    out = generate(small, ids, lengths=lens, max_new_tokens=N, max_length=20 + N, **F32)
    free = rows(generate(toy_model.ToyLM(vocab=V, seed=0), ids, lengths=lens, max_new_tokens=N, **F32))
    # row 0: capacity 20 + N - 2 -> N - 2 appends succeed, the refused one's token is dropped
    np.testing.assert_array_equal(out.lengths, [N - 1, N, N])
    assert rows(out) == [free[0][: N - 1], free[1], free[2]]


# ---- sampling ----------------------------------------------------------------------------

def test_seeded_sampling_reproducible_and_seed_dependent(model, prompts):
    ids, lens = prompts
    kw = dict(lengths=lens, max_new_tokens=N, **SAMPLED, **F32)
    a = generate(model, ids, key=jax.random.key(1), **kw)
    b = generate(model, ids, key=jax.random.key(1), **kw)
    c = generate(model, ids, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).mean() > 0.3
    greedy = generate(model, ids, lengths=lens, max_new_tokens=N, **F32)
    assert (np.asarray(a.tokens) != np.asarray(greedy.tokens)).any()
    # raw uint32 keys work too and equal the typed key
    d = generate(model, ids, key=jax.random.key_data(jax.random.key(1)), **kw)
    np.testing.assert_array_equal(a.tokens, d.tokens)


def test_top_k_1_equals_greedy(model, prompts):
    ids, lens = prompts
    greedy = generate(model, ids, lengths=lens, max_new_tokens=N, **F32)
    k1 = generate(model, ids, lengths=lens, max_new_tokens=N, temperature=0.7, top_k=1, key=jax.random.key(3), **F32)
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)


def test_sampled_tokens_lie_in_the_filtered_set(model, last, prompts):
    """Each sampled token is in the top-k-then-nucleus set of the full forward's float64
    softmax (the filters one by one are checked on exact frequencies below)."""
    ids, lens = prompts
    top_k, top_p = SAMPLED["top_k"], SAMPLED["top_p"]
    out = generate(model, ids, lengths=lens, max_new_tokens=N, **{**SAMPLED, "temperature": 1.3},
                   key=jax.random.key(7), **F32)
    seen_rank = []
    for b, toks in enumerate(rows(out)):
        seq = ids[b, : lens[b]].tolist()
        for t in toks:
            lg = last(seq) / 1.3
            order = np.argsort(-lg, kind="stable")
            keep = len(order) if top_k is None else top_k
            if top_p is not None:
                p = np.exp(lg[order[:keep]] - lg[order[0]])
                p /= p.sum()
                before = np.cumsum(p) - p
                keep = int((before < top_p + 1e-6).sum())
            rank = int(np.where(order == t)[0][0])
            assert rank < keep, (b, t, rank, keep)
            seen_rank.append(rank)
            seq.append(t)
    assert max(seen_rank) > 0  # it sampled, not just argmax


def _filtered_probs(logits, temperature, top_k, top_p):
    lg = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-lg, kind="stable")
    keep = np.zeros(lg.shape, bool)
    k = len(lg) if top_k is None else top_k
    p = np.exp(lg[order[:k]] - lg[order[0]])
    p /= p.sum()
    n = k if top_p is None else int(((np.cumsum(p) - p) < top_p).sum())
    keep[order[:n]] = True
    q = np.where(keep, np.exp(lg - lg.max()), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.5, None, None), (1.0, 3, None), (1.0, None, 0.6), (2.0, 4, 0.7)])
def test_sampler_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    logits = jnp.asarray([2.0, 1.5, 1.5, 0.2, -1.0, 0.9])  # a tie at ranks 2-3
    n = 20000
    toks = sample_logits(jnp.broadcast_to(logits, (n, 6)), jax.random.key(0),
                         temperature=temperature, top_k=top_k, top_p=top_p)
    freq = np.bincount(np.asarray(toks), minlength=6) / n
    want = _filtered_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(freq, want, atol=0.015)
    assert (freq[want == 0] == 0).all()


def test_sampler_ties_are_deterministic():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(sample_logits(logits, None), [1, 0])  # greedy: lower id
    for seed in range(5):  # top_k=1 / a tiny nucleus keep only the lower id of a tie
        key = jax.random.key(seed)
        np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_k=1), [1, 0])
        np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_p=0.01), [1, 0])
    # top_k=2 keeps exactly the tied pair {1, 2} / {0, 1}
    toks = np.asarray(sample_logits(jnp.tile(logits, (500, 1)), jax.random.key(0), temperature=1.0, top_k=2))
    assert set(toks[0::2]) == {1, 2} and set(toks[1::2]) == {0, 1}


@pytest.mark.parametrize("filters", [{}, dict(top_k=5), dict(top_p=0.9)])
def test_sampler_tiny_temperature_is_greedy(filters):
    """logits / 1e-38 overflows float32 (inf - inf in the softmax: garbage tokens before the best
    logit was subtracted first); the limit T -> 0 is the argmax."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 50)) * 4, jnp.float32)
    for t in (1e-20, 1e-38, 1e-45):
        np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1), temperature=t, **filters),
                                      np.argmax(np.asarray(logits), -1))


def test_sampler_top_p_keeps_the_crossing_token():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
    toks = np.asarray(sample_logits(jnp.broadcast_to(logits, (20000, 3)), jax.random.key(1),
                                    temperature=1.0, top_p=0.6))
    freq = np.bincount(toks, minlength=3) / len(toks)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0.0], atol=0.015)


# ---- vmap, streaming -----------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{}, KIVI_SAMPLED], ids=["dense-greedy", "kivi-sampled"])
def test_vmap_of_single_sequence_equals_batched(model, prompts, sampling):
    """jax.vmap of a one-request generate (B=1 prefill, B=1 decode steps in the while_loop)
    gives the batched tokens; per-row keys make sampled rows independent of the batch."""
    ids, lens = prompts
    keys = jax.random.split(jax.random.key(4), 3)
    kw = dict(max_new_tokens=N, eos_id=7, max_length=20 + N, **sampling, **F32)

    def one(ids_1, n_1, key_1):  # a single request: ids [T], its length, its key
        o = generate(model, ids_1[None], lengths=n_1[None], key=key_1[None], **kw)
        return o.tokens[0], o.lengths[0]

    tv, lv = jax.jit(jax.vmap(one))(jnp.asarray(ids), jnp.asarray(lens), keys)
    batched = generate(model, ids, lengths=lens, key=keys, **kw)
    np.testing.assert_array_equal(tv, batched.tokens)
    np.testing.assert_array_equal(lv, batched.lengths)
    assert int(np.min(lv)) < N or 7 not in np.asarray(tv)  # EOS handled the same way inside vmap


@pytest.mark.parametrize("sampling", [{}, dict(KIVI_SAMPLED, key=jax.random.key(11))],
                         ids=["dense-greedy", "kivi-sampled"])
def test_stream_equals_generate(model, prompts, sampling):
    ids, lens = prompts
    kw = dict(lengths=lens, max_new_tokens=N, eos_id=None, pad_id=-1, **sampling, **F32)
    free = rows(generate(model, ids, **kw))
    kw["eos_id"] = free[1][4]  # make a row stop early
    out = generate(model, ids, **kw)
    stream = generate_stream(model, ids, **kw)
    steps = []
    while True:
        try:
            steps.append(next(stream))
        except StopIteration as stop:
            final = stop.value
            break
    toks = np.stack([s.tokens for s in steps], 1)
    emitted = np.stack([s.emitted for s in steps], 1)
    width = toks.shape[1]
    assert width == int(np.max(out.lengths))  # stops as soon as every row has stopped
    np.testing.assert_array_equal(toks, np.asarray(out.tokens)[:, :width])
    np.testing.assert_array_equal(emitted.sum(1), out.lengths)
    assert (toks[~emitted] == -1).all() and (~emitted).any()
    np.testing.assert_array_equal(final.tokens, out.tokens)
    np.testing.assert_array_equal(final.lengths, out.lengths)


# ---- compile caching -------------------------------------------------------------------------

def test_same_shapes_do_not_retrace(model, prompts):
    ids, lens = prompts
    kw = dict(max_new_tokens=N, top_k=SAMPLED["top_k"], **F32)
    generate(model, ids, lengths=lens, temperature=0.8, top_p=0.9, eos_id=1, key=jax.random.key(0), **kw)
    traces, calls = dict(gen.TRACE_COUNTS), dict(toy_model.CALLS)
    assert traces["prefill"] >= 1 and traces["decode_loop"] >= 1 and calls["decode"] >= 1
    # new values of everything traced: tokens, lengths, temperature, top_p, EOS ids, pad_id, key
    out = generate(model, (ids + 1) % V, lengths=lens[::-1].copy(), temperature=1.1, top_p=0.5,
                   eos_id=[2, 3], pad_id=-1, key=jax.random.key(5), **kw)
    assert out.tokens.shape == (3, N)
    assert dict(gen.TRACE_COUNTS) == traces
    assert dict(toy_model.CALLS) == calls
    # a new static setting (top_k) does compile again: the counter does see retraces
    generate(model, ids, lengths=lens, temperature=0.8, top_p=0.9, key=jax.random.key(0), **{**kw, "top_k": 9})
    assert gen.TRACE_COUNTS["prefill"] == traces["prefill"] + 1


# ---- donation -------------------------------------------------------------------------------

def test_decode_loop_donates_the_cache_buffers_and_keeps_the_counters(model, prompts):
    """The decode loop updates the cache in place: its buffers (codes, scales, residuals) and the
    token buffer are donated, consumed by the call; the per-row counters (the caches' lengths and
    overflow, token, num_new, cache_len, done, step) are not. Under an eager jax.vmap a counter
    equal across the requests came in unbatched and went out batched, and jax warned "Some
    donated buffers were not usable" on every vmapped generate; now it does not, and the tokens
    are the batched call's."""
    import warnings

    ids, lens = prompts
    graphdef, state, ids_j, lens_j, keys, knobs, cfg = gen._prepare(
        model, ids, max_new_tokens=N, kivi=KIVI, lengths=lens, temperature=0.0, top_k=None, top_p=None,
        eos_id=None, key=None, pad_id=0, max_length=None, cache_dtype=jnp.float32, attn_impl="auto")
    carry = gen._run_prompt(graphdef, state, ids_j, lens_j, keys, knobs, cfg)
    leaves = jax.tree_util.tree_flatten_with_path(carry)[0]
    names = {jax.tree_util.keystr(path): x for path, x in leaves}
    gen._run(gen._decode_loop, graphdef, state, carry, keys, knobs, cfg)
    consumed = {name for name, x in names.items() if x.is_deleted()}
    counters = {name for name in names if name.rsplit(".", 1)[-1] in gen._COUNTERS}
    # (the toy model's cache is a list of layer caches: ".cache[0].k_codes", ...)
    assert {name.rsplit(".", 1)[-1] for name in consumed} >= {"k_codes", "v_codes", "k_res", "v_res", "tokens"}
    assert counters and not consumed & counters and consumed | counters == set(names)

    same = np.full(3, 20, np.int32)  # equal lengths: the counters are equal across requests
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.vmap(lambda x, n: generate(model, x[None], lengths=n[None], max_new_tokens=N, kivi=KIVI,
                                             **F32).tokens[0])(jnp.asarray(ids), jnp.asarray(same))
    np.testing.assert_array_equal(np.asarray(got), generate(model, ids, lengths=same, max_new_tokens=N, kivi=KIVI,
                                                            **F32).tokens)
    # prompts shorter than R (no key group to quantize: the key stores stay the new cache's zeros,
    # unbatched under vmap, until a flush writes them), then a continuation: still no warning
    short, more = jnp.asarray(ids[:, :12]), jnp.asarray(ids[:, 12:15])

    def one(x, y):
        out = generate(model, x[None], max_new_tokens=N, kivi=KIVI, max_length=40, **F32)
        return generate(model, y[None], max_new_tokens=4, cache=out.cache).tokens[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.vmap(one)(short, more)
    first = generate(model, short, max_new_tokens=N, kivi=KIVI, max_length=40, **F32)
    np.testing.assert_array_equal(np.asarray(got), generate(model, more, max_new_tokens=4, cache=first.cache).tokens)


# ---- multi-turn: continuing a returned cache ------------------------------------------------

def _turns(model, ids, lens, kivi, n1=N, n2=6, seed=1):
    """Turn 1 (with an EOS, so rows stop at different steps) and turn 2's input: each row's last
    new token (generate never feeds it back) then 4, 2 or 0 more tokens."""
    free = rows(generate(model, ids, lengths=lens, max_new_tokens=n1, kivi=kivi, **F32))
    eos = free[0][3]
    out1 = generate(model, ids, lengths=lens, max_new_tokens=n1, kivi=kivi, eos_id=eos, max_length=48, **F32)
    r1 = rows(out1)
    nxt = np.random.default_rng(seed).integers(0, V, (3, 5)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([5, 3, 1], np.int32)
    return out1, r1, nxt, nl


@pytest.mark.parametrize("kivi", [None, KIVI])
def test_final_cache_holds_exactly_each_rows_tokens(model, prompts, kivi):
    """Rows that stopped early (EOS) append nothing more: the cache holds the prompt and every
    new token but the last (never fed back), layer by layer."""
    ids, lens = prompts
    out1, r1, _, _ = _turns(model, ids, lens, kivi)
    assert len({len(r) for r in r1}) > 1  # the rows stopped at different steps
    for c in out1.cache:
        np.testing.assert_array_equal(c.lengths, lens + np.asarray(out1.lengths) - 1)
        assert not np.asarray(c.overflow).any()


def test_continued_dense_cache_equals_the_full_forward(model, last, prompts):
    """Two more turns on turn 1's cache give, row by row, the greedy tokens of the cache-free
    forward over the whole conversation (prompt, turn 1's tokens, turn 2's input, ...)."""
    ids, lens = prompts
    out1, r1, nxt, nl = _turns(model, ids, lens, None)
    out2 = generate(model, nxt, lengths=nl, max_new_tokens=6, cache=out1.cache)
    r2 = rows(out2)
    nxt3 = np.random.default_rng(2).integers(0, V, (3, 2)).astype(np.int32)
    nxt3[:, 0] = [r[-1] for r in r2]
    out3 = generate(model, nxt3, lengths=np.array([1, 2, 2], np.int32), max_new_tokens=3, cache=out2.cache)
    for b in range(3):
        seq = list(ids[b, :lens[b]]) + r1[b] + list(nxt[b, 1:nl[b]])
        assert r2[b] == naive_greedy(last, seq, 6), f"row {b}"
        seq += r2[b] + list(nxt3[b, 1:[1, 2, 2][b]])
        assert rows(out3)[b] == naive_greedy(last, seq, 3), f"row {b}, turn 3"
        assert int(out3.cache[0].lengths[b]) == len(seq) + 2


def _eager_stream(model, prompt, fed, n, kivi, chunk=()):
    """One row alone through the model's own calls (no generate): the prompt prefilled, each
    token of ``fed`` a decode step, ``chunk`` (if any) in one extend=True call, then n greedy
    steps. Returns the n tokens and the tokens the cache holds but the last one."""
    prefill = jitted(lambda m, x, c, ln: m(x, c, lengths=ln), model)
    decode = jitted(lambda m, x, c: m(x, c), model)
    cache = model.init_cache(1, 48, kivi=kivi, dtype=jnp.float32)
    logits, cache = prefill(jnp.asarray([prompt], jnp.int32), cache, jnp.asarray([len(prompt)], jnp.int32))
    logits = logits[:, len(prompt) - 1:len(prompt)]
    for t in fed:
        logits, cache = decode(jnp.asarray([[t]], jnp.int32), cache)
    if len(chunk):
        logits, cache = jitted(lambda m, x, c: m(x, c, extend=True), model)(jnp.asarray([chunk], jnp.int32), cache)
    out = []
    for _ in range(n):
        out.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = decode(jnp.asarray([[out[-1]]], jnp.int32), cache)
    return out, int(gen._cache_lengths(cache, 1)[0]) - 1


def test_continued_kivi_cache_equals_one_stream_per_row(model, prompts):
    """KIVI (R=16: flushes and spills in both turns, while other rows have stopped): a continued
    batch gives each row the tokens of that row alone streamed through the model's own decode
    calls, every token after the prompt appended in order (Algorithm 1)."""
    ids, lens = prompts
    out1, r1, nxt, nl = _turns(model, ids, lens, KIVI)
    out2 = generate(model, nxt, lengths=nl, max_new_tokens=6, cache=out1.cache)
    for b in range(3):
        want, held = _eager_stream(model, list(ids[b, :lens[b]]), r1[b][:-1] + list(nxt[b, :nl[b]]), 6, KIVI)
        assert rows(out2)[b] == want, f"row {b}"
        assert int(out2.cache[0].lengths[b]) == held


@pytest.mark.parametrize("layout, rare", [("tokens", "layer"), ("tokens", "step"), ("mosaic", "step")])
def test_models_llama_continues_each_row_as_alone(layout, rare, monkeypatch):
    """The Llama of models/ (a layer-stacked cache; KIVI's key flush decided per layer or once a
    step, both layouts) takes a continuation in one extend=True call: a continued batch, some
    rows stopped early, prompts of different lengths, gives each row the tokens of that row
    alone through the model's own calls (prefill, decode steps, one extend call of its chunk)."""
    llama = pytest.importorskip("models.llama")
    from models.config import ModelConfig

    monkeypatch.setattr(llama, "RARE_WRITES", rare)
    d = 128 if layout == "mosaic" else 16
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=d)
    m = llama.init_random(cfg, jax.random.key(7), init_std=0.5)
    kivi = kivi_jax.KIVIConfig(group_size=16 if d == 16 else 32, residual_length=32, layout=layout)
    ids, lens = np.random.default_rng(3).integers(0, V, (3, 20)).astype(np.int32), np.array([20, 9, 2], np.int32)
    free = rows(generate(m, ids, lengths=lens, max_new_tokens=N, kivi=kivi, **F32))
    out1 = generate(m, ids, lengths=lens, max_new_tokens=N, kivi=kivi, eos_id=free[1][2], max_length=48, **F32)
    r1 = rows(out1)
    assert len({len(r) for r in r1}) > 1 and out1.cache.layers.config.layout == layout
    nxt = np.random.default_rng(4).integers(0, V, (3, 6)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([2, 6, 4], np.int32)
    out2 = generate(m, nxt, lengths=nl, max_new_tokens=5, cache=out1.cache)
    for b in range(3):
        want, held = _eager_stream(m, list(ids[b, :lens[b]]), r1[b][:-1], 5, kivi, chunk=nxt[b, :nl[b]])
        assert rows(out2)[b] == want, f"row {b}"
        assert int(out2.cache.lengths[b]) == held


@pytest.mark.parametrize("layout", ["tokens", "mosaic"])
def test_models_llama_extend_attends_to_the_dequantized_cache(layout):
    """extend=True on a KIVI cache (R=32, keys flushed, values spilled) gives the logits of the
    same call on a dense cache holding the KIVI cache's dequantized tokens: the new tokens see
    the cache as decode steps read it. And on that dense cache, the logits of a cache-free
    forward over the whole sequence, each row's new tokens at their own positions."""
    llama = pytest.importorskip("models.llama")
    from models.cache import StackedCache
    from models.config import ModelConfig

    d = 128 if layout == "mosaic" else 32
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=d)
    m = llama.init_random(cfg, jax.random.key(8), init_std=0.5)
    kivi = kivi_jax.KIVIConfig(residual_length=32, layout=layout)
    rng = np.random.default_rng(5)
    ids, lens = rng.integers(0, V, (2, 70)).astype(np.int32), np.array([70, 40], np.int32)
    chunk, nl = rng.integers(0, V, (2, 6)).astype(np.int32), np.array([6, 2], np.int32)
    cache = m.init_cache(2, 96, kivi=kivi, dtype=jnp.float32)
    _, cache = jitted(lambda mm, x, c, n: mm(x, c, lengths=n), m)(ids, cache, lens)
    extend = jitted(lambda mm, x, c, n: mm(x, c, lengths=n, extend=True), m)
    k_hat, v_hat = jax.vmap(lambda one: one.materialize())(cache.layers)  # [L, B, Hkv, C >= 96, D]
    dense = StackedCache(kivi_jax.DenseCache(k_hat, v_hat, cache.layers.lengths, cache.layers.overflow,
                                             k_hat.shape[3]))
    got, after = extend(chunk, cache, nl)
    want, _ = extend(chunk, dense, nl)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(got[b, :nl[b]]), np.asarray(want[b, :nl[b]]), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(after.lengths), lens + nl)
    # the dense cache of the same prompt (not dequantized): extend == the full forward at those positions
    plain = m.init_cache(2, 96, kivi=None, dtype=jnp.float32)
    _, plain = jitted(lambda mm, x, c, n: mm(x, c, lengths=n), m)(ids, plain, lens)
    ext, _ = extend(chunk, plain, nl)
    for b in range(2):
        seq = np.concatenate([ids[b, :lens[b]], chunk[b, :nl[b]]])[None]
        full, _ = m(jnp.asarray(seq))
        np.testing.assert_allclose(np.asarray(ext[b, :nl[b]]), np.asarray(full[0, lens[b]:]), rtol=2e-4, atol=2e-4)


def test_stream_continues_like_generate(model, prompts):
    ids, lens = prompts
    outs = [_turns(model, ids, lens, KIVI) for _ in range(2)]  # (each continuation consumes its cache)
    (a, _, nxt, nl), (b, *_) = outs
    want = generate(model, nxt, lengths=nl, max_new_tokens=6, cache=a.cache)
    got = yield_all(generate_stream(model, nxt, lengths=nl, max_new_tokens=6, cache=b.cache))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    for x, y in zip(jax.tree_util.tree_leaves(got.cache), jax.tree_util.tree_leaves(want.cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def yield_all(stream):
    try:
        while True:
            next(stream)
    except StopIteration as stop:
        return stop.value


def test_continuing_donates_the_cache(model, prompts):
    ids, lens = prompts
    out1, _, nxt, nl = _turns(model, ids, lens, None)
    generate(model, nxt, lengths=nl, max_new_tokens=2, cache=out1.cache)
    assert out1.cache[0].k.is_deleted()


class NoActiveLM(toy_model.ToyLM):
    def __call__(self, input_ids, cache, lengths=None, attn_impl="reference"):
        return super().__call__(input_ids, cache, lengths=lengths, attn_impl=attn_impl)


def test_bad_continuations_raise(model, prompts):
    ids, lens = prompts
    out1, _, nxt, nl = _turns(model, ids, lens, KIVI)
    cache = out1.cache
    held = np.asarray(cache[0].lengths)
    cases = [
        (dict(kivi=KIVI), ["kivi=KIVIConfig", "must be None with cache="]),
        (dict(cache_dtype=jnp.float32), ["cache_dtype=", "must be None with cache="]),
        (dict(prefill_rows=1), ["prefill_rows=1", "must be None with cache="]),
        (dict(max_length=64), ["max_length=64", "capacity 48"]),
        (dict(lengths=np.array([5, 3, 48 - held[2] + 1], np.int32)),
         [f"rows [2] hold [{held[2]}] of max_length=48 tokens and add [{48 - held[2] + 1}]"]),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError) as e:
            generate(model, np.zeros((3, 48), np.int32), **{"lengths": nl, "max_new_tokens": 2, "cache": cache, **kw})
        for w in words:
            assert w in str(e.value), (kw, str(e.value))
    with pytest.raises(ValueError, match=r"cache has no object with per-row lengths \[..., B=2\]"):
        generate(model, nxt[:2], lengths=nl[:2], max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match="needs a model whose decode call takes active="):
        generate(NoActiveLM(vocab=V, seed=0), nxt, lengths=nl, max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match=r"cache=str object is not a cache"):
        generate(model, nxt, lengths=nl, max_new_tokens=2, cache="junk")
    flagged = tuple(c.__class__(**{**vars(c), "overflow": c.overflow.at[1].set(True)}) for c in cache)
    with pytest.raises(ValueError, match=r"cache rows \[1\] have overflow set"):
        generate(model, nxt, lengths=nl, max_new_tokens=2, cache=flagged)
    # nothing was consumed by the refused calls: the cache still continues
    assert rows(generate(model, nxt, lengths=nl, max_new_tokens=2, cache=cache))
    # ... once: that call donated it
    with pytest.raises(ValueError, match=r"cache= holds deleted buffers: it was donated to an earlier generate"):
        generate(model, nxt, lengths=nl, max_new_tokens=2, cache=cache)


# ---- argument checks -----------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=0), ["max_new_tokens=0", ">= 1"]),
    (dict(temperature=-0.5), ["temperature=-0.5", ">= 0"]),
    (dict(temperature=float("nan")), ["temperature=nan"]),
    (dict(temperature=1.0, top_k=0, key=0), ["top_k=0", ">= 1"]),
    (dict(temperature=1.0, top_p=0.0, key=0), ["top_p=0.0", "(0, 1]"]),
    (dict(temperature=1.0, top_p=1.5, key=0), ["top_p=1.5", "(0, 1]"]),
    (dict(max_length=4), ["max_length=4", "T=9"]),
    (dict(lengths=[9, 0]), ["lengths=[0]", "[1, T=9]"]),
    (dict(lengths=[9, 10]), ["lengths=[10]", "[1, T=9]"]),
    (dict(lengths=[9]), ["lengths", "(2,)"]),
    (dict(temperature=1.0), ["key=None", "temperature > 0"]),
    (dict(eos_id=-1), ["eos_id=-1"]),
    (dict(pad_id=2**40), ["pad_id=1099511627776", "int32"]),
    (dict(pad_id=1.5), ["pad_id=1.5"]),
    (dict(kivi="2bit"), ["kivi='2bit'", "KIVIConfig"]),
    (dict(cache_dtype=jnp.int8), ["cache_dtype=int8", "floating"]),
    (dict(temperature=1e-50, key=0), ["temperature=1e-50", "0 in float32"]),
    (dict(lengths=np.array([9, 2**32 + 2])), ["lengths", "outside int32", "4294967298"]),
    (dict(kivi=kivi_jax.KIVIConfig(group_size=16, residual_length=16, sink_tokens=20)),
     ["sink_tokens=20", "max_length=13"]),  # (the cache's own check, made at the call)
])
def test_bad_arguments_raise(model, kw, words):
    ids = np.zeros((2, 9), np.int32)
    if kw.get("key") == 0:
        kw["key"] = jax.random.key(0)
    kw.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError) as e:
        generate(model, ids, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(ValueError):  # the stream checks at the call, not at the first next()
        generate_stream(model, ids, **kw)


def test_bad_input_ids_raise(model):
    with pytest.raises(ValueError, match=r"input_ids must be an integer array \[B, T\]"):
        generate(model, np.zeros((9,), np.int32), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, np.zeros((2, 3), np.float32), max_new_tokens=2)
    # ids outside the vocabulary within a prompt: XLA's gather would clamp them silently
    ids = np.zeros((2, 5), np.int32)
    ids[1, 2], ids[0, 4] = V, -2
    with pytest.raises(ValueError, match=rf"2 token id\(s\) outside \[0, vocab_size={V}\), e\.g\. \[-2, {V}\]"):
        generate(model, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"eos_id=\[{V + 3}\] outside the model's vocabulary"):
        generate(model, np.zeros((2, 5), np.int32), max_new_tokens=2, eos_id=[1, V + 3])
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size="):
        generate_stream(model, ids, max_new_tokens=2)
    # NumPy int64 ids past int32 would wrap (2**32 + 5 -> 5) before the vocabulary check
    with pytest.raises(ValueError, match=r"input_ids hold 1 value\(s\) outside int32, e\.g\. \[4294967301\]"):
        generate(model, np.array([[1, 2**32 + 5]]), max_new_tokens=2)
    # the padding after a row's length is never read: any value there is fine (here -2 and V)
    out = generate(model, ids, lengths=[4, 2], max_new_tokens=2)
    np.testing.assert_array_equal(out.tokens, generate(model, np.where(ids < 0, 0, ids % V), lengths=[4, 2],
                                                       max_new_tokens=2).tokens)


# ---- the real model --------------------------------------------------------------------------

def test_models_llama_greedy_equals_full_forward():
    llama = pytest.importorskip("models.llama")
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    m = llama.init_random(cfg, jax.random.key(3), init_std=0.5)
    ids = np.random.default_rng(1).integers(0, 101, (2, 9)).astype(np.int32)
    lens = np.array([9, 4], np.int32)
    out = generate(m, ids, lengths=lens, max_new_tokens=8, attn_impl="reference")
    last = last_logits_fn(m, forward=lambda mm, x: mm(x)[0])  # cache-free forward of the model
    for b in range(2):
        assert rows(out)[b] == naive_greedy(last, ids[b, : lens[b]], 8)


def _small_llama():
    llama = pytest.importorskip("models.llama")
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    return llama.init_random(cfg, jax.random.key(5), init_std=0.5)


def test_models_llama_logits_at_is_the_full_logits_row():
    m = _small_llama()
    ids = np.random.default_rng(2).integers(0, 8192, (3, 11)).astype(np.int32)
    full, _ = m(ids)
    at = np.array([10, 0, 6], np.int32)
    one, _ = m(ids, logits_at=at)
    assert one.shape == (3, 1, 8192)
    np.testing.assert_allclose(np.asarray(one[:, 0]), np.asarray(full)[np.arange(3), at], rtol=1e-5, atol=1e-5)
    for bad, words in (([1, 2], r"shape \(3,\)"), ([0, 11, 2], r"out of range.*\[0, T=11\)"),
                       ([0.0, 1.0, 2.0], "integer")):
        with pytest.raises(ValueError, match=words):
            m(ids, logits_at=np.asarray(bad))


def test_prefill_runs_the_lm_head_on_last_positions_only():
    """generate's prefill asks a model that takes logits_at= for each prompt's last position:
    the B x T x vocab float32 logits of the whole prompt (0.5 GB per 4096-token row at a 32k
    vocabulary, more than a KIVI-2 cache row) are never materialized. Same tokens either way."""
    import dataclasses

    m = _small_llama()
    b, t = 4, 64
    ids = np.random.default_rng(3).integers(0, 8192, (b, t)).astype(np.int32)
    lens = np.array([64, 10, 33, 1], np.int32)
    args = gen._prepare(m, ids, max_new_tokens=4, kivi=kivi_jax.KIVIConfig(group_size=16, residual_length=32),
                        lengths=lens, temperature=0.0, top_k=None, top_p=None, eos_id=None, key=None, pad_id=0,
                        max_length=None, cache_dtype=None, attn_impl=None)
    graphdef, state, ids_j, lens_j, keys, knobs, cfg = args
    assert cfg.logits_at
    temps = {}
    for on in (True, False):
        c = dataclasses.replace(cfg, logits_at=on)
        compiled = gen._prefill.lower(graphdef, state, ids_j, lens_j, keys, knobs, cfg=c).compile()
        temps[on] = compiled.memory_analysis().temp_size_in_bytes
        carry = gen._prefill(graphdef, state, ids_j, lens_j, keys, knobs, cfg=c)
        temps[on, "first"] = np.asarray(carry.tokens[:, 0]).tolist()
    assert temps[True, "first"] == temps[False, "first"]
    # the logits' bytes are the difference, less XLA's buffer reuse and the other temps' (the
    # quantizer's NaN mask moved it from 0.90002 to 0.89977 of them, on the CPU)
    assert temps[False] - temps[True] >= b * t * 8192 * 4 * 0.85, temps


# ---- prefill in row slices -------------------------------------------------------------------

@pytest.mark.parametrize("kivi", [None, kivi_jax.KIVIConfig(group_size=16, residual_length=32),
                                  kivi_jax.KIVIConfig(group_size=16, residual_length=32, sink_tokens=4, rotate="kv")],
                         ids=["dense", "kivi", "kivi-sinks-rotated"])
def test_prefill_in_row_slices_equals_whole_batch(kivi):
    """prefill_rows=2 over 5 rows runs slices 0-1, 2-3 and 3-4 (the last redoes row 3) and
    writes each into the whole cache: same tokens and the same final cache as one call."""
    m = _small_llama()
    ids = np.random.default_rng(4).integers(0, 8192, (5, 40)).astype(np.int32)
    lens = np.array([40, 7, 33, 1, 21], np.int32)
    outs = {r: generate(m, ids, lengths=lens, max_new_tokens=6, kivi=kivi, attn_impl="reference", prefill_rows=r)
            for r in (None, 2, 1)}
    for r in (2, 1):
        assert rows(outs[r]) == rows(outs[None]), r
        for a, b in zip(jax.tree_util.tree_leaves(outs[r].cache), jax.tree_util.tree_leaves(outs[None].cache)):
            a, b = np.asarray(a), np.asarray(b)
            if np.issubdtype(a.dtype, np.floating):  # float32 matmuls of another batch size round differently
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
            else:  # code words, lengths, flags: a code on a rounding boundary may flip, nothing more
                assert np.mean(a != b) <= 1e-3, (r, a.dtype, a.shape, np.mean(a != b))


def test_prefill_rows_default_follows_prompt_tokens(monkeypatch):
    m = _small_llama()

    def rows_for(b, t, max_new_tokens_extra=2, **kw):
        ids = np.zeros((b, t), np.int32)
        return gen._prepare(m, ids, max_new_tokens=max_new_tokens_extra, kivi=None, lengths=None, temperature=0.0, top_k=None,
                            top_p=None, eos_id=None, key=None, pad_id=0, max_length=None, cache_dtype=None,
                            attn_impl=None, **kw)[-1].prefill_rows

    monkeypatch.setattr(gen, "PREFILL_TOKENS", 100)
    assert rows_for(8, 30) == 3          # 100 // 30 rows per call
    assert rows_for(3, 30) is None       # the whole batch fits: one call, as before
    assert rows_for(4, 500) == 1         # a prompt longer than the budget: one row per call
    assert rows_for(8, 30, prefill_rows=8) is None
    assert rows_for(8, 30, prefill_rows=5) == 5
    # a prompt under half the cache: the slice's own cache rows would outweigh its activations
    assert rows_for(8, 30, max_new_tokens_extra=31) is None
    assert rows_for(8, 30, max_new_tokens_extra=30) == 3
    assert rows_for(8, 30, max_new_tokens_extra=31, prefill_rows=5) == 5  # explicit: as asked


def test_default_matmul_impl_policy(monkeypatch):
    """generate's matmul_impl=None: the in-place stacked matmul on one GPU only (both caches)."""
    m = _small_llama()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    monkeypatch.setattr(gen.jax, "default_backend", lambda: "cpu")
    assert gen._default_matmul_impl(m, None) is None  # no GPU
    monkeypatch.setattr(gen.jax, "default_backend", lambda: "gpu")
    assert gen._default_matmul_impl(m, None) == "pallas"
    assert gen._default_matmul_impl(m, mesh) is None  # the kernel has no shard_map
    assert gen._default_matmul_impl(lambda ids, cache=None: None, None) is None  # no keyword


def test_prefill_slices_bound_the_prefill_temporaries():
    """The compiled prefill's temporaries (activations) follow the rows per call, not B."""
    m = _small_llama()
    b, t = 8, 256
    ids = np.random.default_rng(5).integers(0, 8192, (b, t)).astype(np.int32)
    temps = {}
    for r in (None, 1):
        graphdef, state, ids_j, lens_j, keys, knobs, cfg = gen._prepare(
            m, ids, max_new_tokens=2, kivi=None, lengths=None, temperature=0.0, top_k=None, top_p=None, eos_id=None,
            key=None, pad_id=0, max_length=None, cache_dtype=None, attn_impl="reference", prefill_rows=r)
        compiled = gen._prefill.lower(graphdef, state, ids_j, lens_j, keys, knobs, cfg=cfg).compile()
        temps[r] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[1] <= temps[None] / 3, temps


def test_bad_prefill_rows_raise(model):
    ids = np.zeros((4, 9), np.int32)
    for bad in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match=rf"prefill_rows={bad!r}.*integer >= 1"):
            generate(model, ids, max_new_tokens=2, prefill_rows=bad)
    # the toy model's cache is a tuple of per-layer caches: no write_rows to fill slices into
    with pytest.raises(ValueError, match="prefill_rows=2 < B=4 needs a cache with write_rows"):
        generate(model, ids, max_new_tokens=2, prefill_rows=2)
    assert rows(generate(model, ids, max_new_tokens=2, prefill_rows=4)) == rows(generate(model, ids, max_new_tokens=2))


def test_stacked_cache_write_rows_checks_its_rows():
    m = _small_llama()
    kivi = kivi_jax.KIVIConfig(group_size=16, residual_length=32)
    full, sub = m.init_cache(4, 64, kivi=kivi), m.init_cache(2, 64, kivi=kivi)
    _, sub = m(np.ones((2, 20), np.int32), sub)
    got = full.write_rows(1, sub)
    for g, f, s in zip(*(jax.tree_util.tree_leaves(c.layers) for c in (got, full, sub))):
        g, f, s = np.asarray(g), np.asarray(f), np.asarray(s)
        np.testing.assert_array_equal(g[:, 1:3], s)
        np.testing.assert_array_equal(g[:, [0, 3]], f[:, [0, 3]])
    with pytest.raises(ValueError, match="same format"):
        full.write_rows(0, m.init_cache(2, 64))
    with pytest.raises(ValueError, match="same format"):  # another capacity
        full.write_rows(0, m.init_cache(2, 128, kivi=kivi))
    with pytest.raises(ValueError, match="at most 4 rows"):
        full.write_rows(0, m.init_cache(5, 64, kivi=kivi))
    for start in (3, 4, -1):  # dynamic_update_slice would clamp them onto rows 2-3, silently
        with pytest.raises(ValueError, match=rf"start={start} must be in \[0, 2\]: 2 rows written into a batch of 4"):
            full.write_rows(start, sub)
    np.testing.assert_array_equal(  # a traced start is the caller's (generate's slices keep it in range)
        np.asarray(jax.jit(lambda i: full.write_rows(i, sub).lengths)(2)), [0, 0, 20, 20])
