"""generate(prefill_chunk=c): a prompt (new, or continuing a cache) fed c tokens a model call.

The references are the model's own calls, row by row (no generate machinery): an empty cache,
one ``extend=True`` call a chunk, then greedy decode steps; for a dense cache, the cache-free
forward over the whole sequence (chunking a dense cache changes nothing but rounding); and the
float64 NumPy model of DESIGN's algorithm (tests/test_chunk_audit.py, independent of the library):
the same tokens, and a final cache holding each row's history as Algorithm 1 stores it.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax.generate import generate, generate_stream
from test_chunk_audit import Llama64, check_row_cache, materialized, reference_turn

gen = importlib.import_module("kivi_jax.generate")  # (kivi_jax.generate is also the function)
llama = pytest.importorskip("models.llama")
from models.config import ModelConfig  # noqa: E402

V = 101
F32 = dict(cache_dtype=jnp.float32)
CAP = 96


@functools.lru_cache(maxsize=None)
def _model(head_dim: int):
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=head_dim)
    return llama.init_random(cfg, jax.random.key(7), init_std=0.5)


# (cache, head_dim): dense; KIVI-2 in both layouts with R = 32, so a 16-token chunk's tokens are
# quantized (keys flushed, values spilled) before the next chunks attend to them
CASES = {"dense": (None, 32),
         "kivi-tokens": (kivi_jax.KIVIConfig(residual_length=32, layout="tokens"), 32),
         "kivi-mosaic": (kivi_jax.KIVIConfig(residual_length=32, layout="mosaic"), 128)}


_CALLS = {}


def _calls(m):
    """The model's extend and decode calls, jitted once a model."""
    if id(m) not in _CALLS:
        _CALLS[id(m)] = (m, jax.jit(lambda x, c, n: m(x, c, lengths=n, extend=True)), jax.jit(lambda x, c: m(x, c)))
    return _CALLS[id(m)][1:]


def _row_alone(m, kivi, chunks, n, width=16):
    """One row through the model's own calls: each token list of ``chunks`` one extend call into
    an empty cache (padded to a multiple of ``width``: few shapes to compile), then n greedy
    decode steps. -> (tokens, the cache's length after them)."""
    extend, decode = _calls(m)
    cache = m.init_cache(1, CAP, kivi=kivi, dtype=jnp.float32)
    for ch in chunks:
        x = np.zeros((1, -(-len(ch) // width) * width), np.int32)
        x[0, :len(ch)] = ch
        logits, cache = extend(jnp.asarray(x), cache, jnp.asarray([len(ch)], jnp.int32))
        logits = logits[:, len(ch) - 1:len(ch)]
    out = []
    for _ in range(n):
        out.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = decode(jnp.asarray([[out[-1]]], jnp.int32), cache)
    return out, int(cache.lengths[0]) - 1


def _split(seq, c):
    return [list(seq[i:i + c]) for i in range(0, len(seq), c)]


def _rows(out):
    return [list(map(int, t[:n])) for t, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]


def _float64_turns(m, kivi, out, turns):
    """generate's tokens and final cache (``out``, after the turns) against the float64 model.
    turns: per turn (per-row token lists, chunk, max_new_tokens, eos_id, the turn's output rows).
    A row's history is what generate's cache holds: each turn's input, then its new tokens but
    the last (never fed back). Stores: float32 through two layers, keys ~10 (observed <= 1e-4)."""
    r64, km_vm = Llama64(m, kivi), materialized(out.cache)
    for b in range(len(turns[0][0])):
        like = [(km_vm[0][layer, b], km_vm[1][layer, b]) for layer in range(m.config.num_layers)]
        row = r64.new_row()
        for ids, chunk, max_new, eos, got in turns:
            reference_turn(r64, row, ids[b], chunk, got[b], like)
            # (it stopped for a reason: N tokens, EOS, or a full cache)
            assert len(got[b]) == max_new or got[b][-1] == eos or row[0][0].shape[1] >= CAP, f"row {b}"
        held = row[0][0].shape[1]
        assert int(out.cache.lengths[b]) == held
        check_row_cache(*km_vm, b, row, kivi, held, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def prompts():
    ids = np.random.default_rng(3).integers(0, V, (3, 70)).astype(np.int32)
    return ids, np.array([70, 41, 9], np.int32)  # rows ending in the 5th, 3rd and 1st chunk of 16


@pytest.mark.parametrize("case", CASES)
def test_chunked_prompt_equals_each_row_fed_chunk_by_chunk(case, prompts):
    kivi, d = CASES[case]
    m, (ids, lens) = _model(d), prompts
    out = generate(m, ids, lengths=lens, max_new_tokens=5, kivi=kivi, max_length=CAP, prefill_chunk=16, **F32)
    for b in range(3):
        want, held = _row_alone(m, kivi, _split(ids[b, :lens[b]], 16), 5)
        assert _rows(out)[b] == want, f"row {b}"
        assert int(out.cache.lengths[b]) == held == lens[b] + 4
    _float64_turns(m, kivi, out, [([ids[b, :lens[b]] for b in range(3)], 16, 5, None, _rows(out))])
    if kivi is None:  # a dense cache: each new token is the argmax of the cache-free forward before it
        for b in range(3):
            new = _rows(out)[b]
            full, _ = m(jnp.asarray([list(ids[b, :lens[b]]) + new]))
            assert np.argmax(np.asarray(full[0, lens[b] - 1:-1]), -1).tolist() == new, f"row {b}"
    else:  # chunks see the chunks before them quantized: not one call's tokens (R = 32 < 70)
        one = generate(m, ids, lengths=lens, max_new_tokens=5, kivi=kivi, max_length=CAP, **F32)
        assert _rows(one) != _rows(out)
        # a chunk at least as long as the prompt (however large) is the prompt in one call
        for c in (70, 2**70, np.int64(2**62)):
            whole = generate(m, ids, lengths=lens, max_new_tokens=5, kivi=kivi, max_length=CAP, prefill_chunk=c, **F32)
            assert _rows(whole) == _rows(one)


@pytest.mark.parametrize("case", ["dense", "kivi-tokens"])
def test_chunked_continuation_equals_each_row_fed_chunk_by_chunk(case, prompts):
    """generate(cache=..., prefill_chunk=4) on a batch whose rows stopped at different steps,
    with 10, 3 and 7 new tokens: each row as its own calls, its new tokens 4 an extend call."""
    kivi, d = CASES[case]
    m, (ids, lens) = _model(d), prompts
    ids, lens = ids[:, :40], np.minimum(lens, 40)
    free = _rows(generate(m, ids, lengths=lens, max_new_tokens=6, kivi=kivi, **F32))
    out1 = generate(m, ids, lengths=lens, max_new_tokens=6, kivi=kivi, eos_id=free[1][2], max_length=CAP, **F32)
    r1 = _rows(out1)
    assert len({len(r) for r in r1}) > 1
    nxt = np.random.default_rng(4).integers(0, V, (3, 10)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([10, 3, 7], np.int32)
    out2 = generate(m, nxt, lengths=nl, max_new_tokens=4, cache=out1.cache, prefill_chunk=4)
    for b in range(3):
        want, held = _row_alone(m, kivi, [list(ids[b, :lens[b]]) + r1[b][:-1]] + _split(nxt[b, :nl[b]], 4), 4,
                                width=4)
        assert _rows(out2)[b] == want, f"row {b}"
        assert int(out2.cache.lengths[b]) == held
    _float64_turns(m, kivi, out2, [([ids[b, :lens[b]] for b in range(3)], 40, 6, free[1][2], r1),
                                   ([nxt[b, :nl[b]] for b in range(3)], 4, 4, None, _rows(out2))])


@pytest.mark.parametrize("case", ["kivi-tokens", "kivi-mosaic"])
def test_extend_into_an_empty_cache_stores_what_the_prefill_stores(case, prompts):
    """A chunked prompt's first chunk is an extend into an empty cache: it stores the prefill's
    numbers (Algorithm 1 from an empty cache) and gives its logits up to rounding."""
    kivi, d = CASES[case]
    m, (ids, lens) = _model(d), prompts
    prefill = jax.jit(lambda x, c, n: m(x, c, lengths=n))
    extend, _ = _calls(m)
    lp, a = prefill(ids, m.init_cache(3, CAP, kivi=kivi, dtype=jnp.float32), lens)
    le, b = extend(ids, m.init_cache(3, CAP, kivi=kivi, dtype=jnp.float32), lens)
    np.testing.assert_array_equal(np.asarray(b.lengths), lens)
    ka, va = jax.vmap(lambda one: one.materialize())(a.layers)  # [L, B, Hkv, C, D]
    kb, vb = jax.vmap(lambda one: one.materialize())(b.layers)
    for r in range(3):
        for x, y in ((ka, kb), (va, vb)):
            np.testing.assert_array_equal(np.asarray(x[:, r, :, :lens[r]]), np.asarray(y[:, r, :, :lens[r]]))
        np.testing.assert_allclose(np.asarray(le[r, :lens[r]]), np.asarray(lp[r, :lens[r]]), rtol=1e-4, atol=1e-4)


def test_chunks_compile_once_for_any_prompt_length(prompts):
    m, (ids, lens) = _model(32), prompts
    kivi = CASES["kivi-tokens"][0]
    run = lambda t: generate(m, ids[:, :t], lengths=np.minimum(lens, t), max_new_tokens=3, kivi=kivi,  # noqa: E731
                             max_length=CAP, prefill_chunk=16, **F32)
    run(50)
    before = dict(gen.TRACE_COUNTS)
    run(70)
    run(33)
    assert {k: gen.TRACE_COUNTS[k] - before.get(k, 0) for k in ("feed", "feed_chunk", "prefill")} == \
        {"feed": 0, "feed_chunk": 0, "prefill": 0}


def test_chunked_prompt_under_vmap_and_stream(prompts):
    """jax.vmap over single requests and generate_stream give generate's batched tokens."""
    m, (ids, lens) = _model(32), prompts
    kivi = CASES["kivi-tokens"][0]
    kw = dict(max_new_tokens=4, kivi=kivi, max_length=CAP, prefill_chunk=16, **F32)
    want = generate(m, ids, lengths=lens, **kw)

    def one(x, n):
        o = generate(m, x[None], lengths=n[None], **kw)
        return o.tokens[0], o.lengths[0]

    toks, num = jax.vmap(one)(jnp.asarray(ids), jnp.asarray(lens))
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(num), np.asarray(want.lengths))
    steps = list(generate_stream(m, ids, lengths=lens, **kw))
    got = np.stack([s.tokens for s in steps], 1)
    np.testing.assert_array_equal(got, np.asarray(want.tokens)[:, :got.shape[1]])


def test_bad_prefill_chunk_raises(prompts):
    m, (ids, lens) = _model(32), prompts
    cache = m.init_cache(3, CAP)
    for bad in (0, -3, 2.5, "16", True, False, np.True_, np.float32(16), np.int8(-1), jnp.asarray(16), [16]):
        for call, kw in ((generate, {}), (generate_stream, {}), (generate, {"cache": cache})):
            with pytest.raises(ValueError, match=r"prefill_chunk=.* must be None \(the whole prompt in one call\) or "
                                                 r"an integer >= 1"):
                call(m, ids, lengths=lens, max_new_tokens=2, prefill_chunk=bad, **kw)
    with pytest.raises(ValueError, match=r"prefill_rows=1 must be None with prefill_chunk=16"):
        generate(m, ids, lengths=lens, max_new_tokens=2, prefill_chunk=16, prefill_rows=1)

    def no_extend(input_ids, cache, lengths=None, active=None):  # a model without extend=
        return m(input_ids, cache, lengths=lengths, active=active)
    no_extend.init_cache = m.init_cache
    with pytest.raises(ValueError, match=r"prefill_chunk=16 needs a model whose call takes extend="):
        generate(no_extend, ids, lengths=lens, max_new_tokens=2, prefill_chunk=16)
