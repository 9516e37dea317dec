"""An audit of generate / generate_stream's edges against a plain greedy loop written here.

The reference (:class:`PlainRow`) is one row alone through the model's own calls (the toy
model of tests/toy_model.py, or models/' Llama) -- a prefill into a float32 DenseCache, then
``logits, cache = model(token, cache)`` one token at a time, argmax each time -- with the stopping
rules of kivi_jax/generate.py's docstring applied in Python: a row stops after an EOS (kept),
after ``max_new_tokens``, or once its cache holds ``max_length`` tokens (that last token is kept,
never appended). A continuation feeds each row's new input through the same decode calls.
Nothing here goes through generate's machinery.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import toy_model  # noqa: E402

from kivi_jax.generate import generate, generate_stream  # noqa: E402

gen = importlib.import_module("kivi_jax.generate")  # (kivi_jax.generate is also the function)
GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(generate).parameters.items()
                     if p.default is not inspect.Parameter.empty}

V = 61
T = 10
LENS = np.array([10, 6, 1, 3], np.int32)  # a full-width row, a length-1 row
N = 5
REF_CAP = 48  # the reference row's cache (capacity does not change a dense cache's numbers)


@pytest.fixture(scope="module")
def model():
    return toy_model.ToyLM(vocab=V, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, num_layers=2, mlp=64,
                           seed=4)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(11).integers(0, V, (len(LENS), T)).astype(np.int32)


class PlainRow:
    """One row alone: its prompt prefilled, then greedy decode steps through the model's calls."""

    _fns = {}

    def __init__(self, model, prompt):
        prefill, self.decode = self.fns(model)
        x = np.zeros((1, T), np.int32)  # (one prompt width: one compiled prefill)
        x[0, :len(prompt)] = prompt
        cache = model.init_cache(1, REF_CAP, dtype=jnp.float32)
        logits, self.cache = prefill(jnp.asarray(x), cache, jnp.asarray([len(prompt)], jnp.int32))
        self.logits, self.held = np.asarray(logits[0, len(prompt) - 1]), len(prompt)

    @classmethod
    def fns(cls, model):
        if id(model) not in cls._fns:
            gd, st = nnx.split(model)
            pre = jax.jit(lambda s, x, c, n: nnx.merge(gd, s)(x, c, lengths=n))
            dec = jax.jit(lambda s, x, c: nnx.merge(gd, s)(x, c))
            cls._fns[id(model)] = (model, lambda *a: pre(st, *a), lambda *a: dec(st, *a))
        return cls._fns[id(model)][1:]

    def feed(self, tok):
        logits, self.cache = self.decode(jnp.asarray([[tok]], jnp.int32), self.cache)
        self.logits, self.held = np.asarray(logits[0, -1]), self.held + 1

    def go_on(self, tokens, n, eos=(), max_length=10**9):
        """A continuation: ``tokens`` fed one by one, then :meth:`greedy`."""
        for tok in tokens:
            self.feed(int(tok))
        return self.greedy(n, eos, max_length)

    def greedy(self, n, eos=(), max_length=10**9):
        """The row's new tokens; the last one is not fed (as generate leaves it)."""
        out = []
        while True:
            out.append(int(np.argmax(self.logits)))
            if out[-1] in eos or len(out) == n or self.held >= max_length:
                return out
            self.feed(out[-1])


def rows(out):
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    return [toks[b, :lens[b]].tolist() for b in range(len(lens))]


def plain(model, ids, lens, n, eos=(), max_length=10**9):
    return [PlainRow(model, ids[b, :lens[b]]).greedy(n, eos, max_length) for b in range(len(lens))]


def cache_objects(cache):
    """The per-layer caches of the toy model (a tuple), or a models/ StackedCache as one."""
    return list(cache) if isinstance(cache, tuple) else [cache]


def check_output(out, want, lens, n, pad, max_length):
    """Every GenerateOutput field against the plain loop's rows ``want``."""
    toks = np.asarray(out.tokens)
    assert toks.shape == (len(lens), n) and toks.dtype == np.int32
    assert np.asarray(out.lengths).dtype == np.int32
    assert rows(out) == want
    for b, w in enumerate(want):
        assert (toks[b, len(w):] == pad).all(), f"row {b}"
    for c in cache_objects(out.cache):  # each layer holds the prompt and every new token but the last
        np.testing.assert_array_equal(c.lengths, [lens[b] + len(w) - 1 for b, w in enumerate(want)])
        assert c.max_length == max_length and not np.asarray(c.overflow).any()


@pytest.fixture(scope="module")
def free(model, ids):
    return plain(model, ids, LENS, N)


def eos_ids(free):
    """Row 1's very first token and row 3's third: EOS ids rows 0 and 2 never meet."""
    return [free[1][0], free[3][2]]


def test_fixture_rows_differ(free):
    """The rows' free runs differ, and the EOS ids picked stop rows 1 and 3 only."""
    assert len({tuple(r) for r in free}) == len(free)
    assert all(len(set(r)) >= 3 for r in free)
    eos = eos_ids(free)
    assert not set(eos) & set(free[0] + free[2]) and eos[1] not in free[3][:2]


# ---- stopping edges -------------------------------------------------------------------------

@pytest.mark.parametrize("max_length", [T, T + N, T + N + 9], ids=["prompt-width", "exact", "larger"])
def test_stopping_edges_equal_the_plain_loop(model, ids, free, max_length):
    """EOS on row 1's very first token and row 3's third (several EOS ids, row 0 and 2 never meet
    them), and a cache of exactly the prompt width (row 0 full after its prompt: one token), of
    exactly prompt + new tokens, or larger. pad_id -1."""
    eos = eos_ids(free)
    for e in (None, eos):
        out = generate(model, ids, lengths=LENS, max_new_tokens=N, eos_id=e, pad_id=-1, max_length=max_length)
        want = plain(model, ids, LENS, N, eos=e or (), max_length=max_length)
        check_output(out, want, LENS, N, -1, max_length)
    assert [len(w) for w in want][:2] == ([1, 1] if max_length == T else [N, 1])


def test_eos_ids_as_arrays_are_the_ids(model, ids, free):
    """eos_id as a 0-d NumPy or jax integer array, or a 1-d jax array: the same ids as Python ints
    (a 1-d NumPy array was taken, the others refused as "not a sequence of token ids")."""
    eos = eos_ids(free)
    kw = dict(lengths=LENS, max_new_tokens=N, pad_id=-1)
    want = np.asarray(generate(model, ids, eos_id=eos, **kw).tokens)
    assert not np.array_equal(want, np.asarray(generate(model, ids, eos_id=eos[:1], **kw).tokens))
    for e in (jnp.asarray(eos), np.asarray(eos, np.int64)):
        assert np.array_equal(np.asarray(generate(model, ids, eos_id=e, **kw).tokens), want)
    one = np.asarray(generate(model, ids, eos_id=eos[0], **kw).tokens)
    for e in (np.int32(eos[0]), np.asarray(eos[0]), jnp.asarray(eos[0])):
        assert np.array_equal(np.asarray(generate(model, ids, eos_id=e, **kw).tokens), one)
    with pytest.raises(ValueError, match="eos_id="):
        generate(model, ids, eos_id=jnp.asarray([[eos[0]]]), **kw)


def test_one_new_token(model, ids, free):
    """max_new_tokens=1: the prefill's token only (no decode loop); the cache holds the prompts."""
    for e in (None, free[2][0]):
        out = generate(model, ids, lengths=LENS, max_new_tokens=1, eos_id=e, pad_id=7)
        check_output(out, [r[:1] for r in free], LENS, 1, 7, T + 1)
        steps = list(generate_stream(model, ids, lengths=LENS, max_new_tokens=1, eos_id=e))
        assert len(steps) == 1 and steps[0].tokens.tolist() == [r[0] for r in free] and steps[0].emitted.all()


# ---- streaming ------------------------------------------------------------------------------

def drain(stream):
    steps = []
    try:
        while True:
            steps.append(next(stream))
    except StopIteration as stop:
        return steps, stop.value


def test_stream_yields_the_plain_loop_and_stops_with_the_last_row(model, ids, free):
    """A cache of the prompt width (row 0 stops after its first token) and EOS ids that stop
    row 1 at its first token, row 3 at its third and row 2 at its fourth: the stream yields each
    row's tokens of the plain loop, ``emitted`` false once a row stopped, and ends with the last
    row, before max_new_tokens; its return value is the output."""
    eos = eos_ids(free) + [free[2][3]]
    kw = dict(lengths=LENS, max_new_tokens=N, eos_id=eos, pad_id=-1, max_length=T)
    want = plain(model, ids, LENS, N, eos=eos, max_length=T)
    assert [len(w) for w in want] == [1, 1, 4, 3]
    steps, final = drain(generate_stream(model, ids, **kw))
    assert len(steps) == max(len(w) for w in want) < N
    for s, step in enumerate(steps):
        assert step.tokens.dtype == np.int32 and step.emitted.dtype == bool
        assert step.emitted.tolist() == [len(w) > s for w in want]
        assert step.tokens.tolist() == [w[s] if len(w) > s else -1 for w in want]
    check_output(final, want, LENS, N, -1, T)
    # every row's first token an EOS: one step, then the stream ends
    firsts = [r[0] for r in free]
    steps, final = drain(generate_stream(model, ids, lengths=LENS, max_new_tokens=N, eos_id=firsts))
    assert len(steps) == 1 and steps[0].tokens.tolist() == firsts and steps[0].emitted.all()
    check_output(final, [[t] for t in firsts], LENS, N, 0, T + N)


# ---- jit, vmap ------------------------------------------------------------------------------

def test_jit_with_the_model_as_argument_and_vmap(model, ids, free):
    """generate inside nnx.jit with the model (and lengths) as traced arguments, and jax.vmap of
    a one-request generate on a cache of the prompt width (rows full after their prompt), give
    the plain loop's tokens."""
    eos = eos_ids(free)
    want = plain(model, ids, LENS, N, eos=eos, max_length=T + N)
    f = nnx.jit(lambda m, x, n: generate(m, x, lengths=n, max_new_tokens=N, eos_id=eos, pad_id=-1))
    out = f(model, jnp.asarray(ids), jnp.asarray(LENS))
    check_output(out, want, LENS, N, -1, T + N)

    want = plain(model, ids, LENS, N, eos=eos, max_length=T)

    def one(x, n):
        o = generate(model, x[None], lengths=n[None], max_new_tokens=N, eos_id=eos, pad_id=-1, max_length=T)
        return o.tokens[0], o.lengths[0], o.cache[0].lengths[0]

    toks, num, held = jax.vmap(one)(jnp.asarray(ids), jnp.asarray(LENS))
    assert [np.asarray(toks)[b, :int(num[b])].tolist() for b in range(len(LENS))] == want
    assert (np.asarray(toks)[np.arange(N)[None, :] >= np.asarray(num)[:, None]] == -1).all()
    np.testing.assert_array_equal(held, LENS + np.asarray(num) - 1)


# ---- continuing a returned cache ------------------------------------------------------------

CAP2 = 17  # turn 1's cache: row 0 (10 + 4 tokens held after turn 1) fills it during turn 2


def test_continuation_of_stopped_rows_after_refused_calls(model, ids, free):
    """Turn 1 with EOS (row 1 stops at its first token, row 3 at its third), then calls refused
    for a bad argument each -- each error names the parameter, the value and what is allowed, and
    consumes nothing -- then turn 2 on the same cache: rows continue as their plain loops do,
    row 0 stopping when its cache is full (3 of 4 tokens)."""
    eos = eos_ids(free)
    out1 = generate(model, ids, lengths=LENS, max_new_tokens=N, eos_id=eos, max_length=CAP2)
    plain_rows = [PlainRow(model, ids[b, :LENS[b]]) for b in range(len(LENS))]
    r1 = [p.greedy(N, eos, CAP2) for p in plain_rows]
    check_output(out1, r1, LENS, N, 0, CAP2)
    assert [len(r) for r in r1] == [N, 1, N, 3]
    nxt = np.random.default_rng(5).integers(0, V, (4, 4)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([1, 4, 2, 3], np.int32)
    held = LENS + np.array([len(r) for r in r1]) - 1
    bad_ids = nxt.copy()
    bad_ids[2, 1] = V
    cases = [
        (dict(max_new_tokens=-1), ["max_new_tokens=-1", ">= 1"]),
        (dict(max_new_tokens=2.5), ["max_new_tokens=2.5", "integer"]),
        (dict(max_new_tokens=2**31), ["max_new_tokens=2147483648", "< 2**31"]),
        (dict(lengths=[1, 4, 2, 5]), ["lengths=[5]", "[0, T=4]", "sits this continuation out"]),
        (dict(lengths=[1, 4, 2]), ["lengths", "shape (4,)", "shape (3,)"]),
        (dict(lengths=np.array([1.0, 4.0, 2.0, 3.0])), ["lengths", "shape (4,)", "float"]),
        (dict(lengths=[1, 4, None, 3]), ["lengths", "shape (4,)", "object"]),
        (dict(eos_id=V), [f"eos_id=[{V}]", f"vocab_size={V}"]),
        (dict(eos_id=[3, -2]), ["eos_id=[3, -2]", "[0, 2**31)"]),
        (dict(max_length=CAP2 - 1), [f"max_length={CAP2 - 1}", f"capacity {CAP2}"]),
        (dict(prefill_chunk=0), ["prefill_chunk=0", ">= 1"]),
        (dict(prefill_chunk=-2), ["prefill_chunk=-2", ">= 1"]),
        (dict(lengths=[4, 4, 2, 3]), [f"rows [0] hold [{held[0]}] of max_length={CAP2} tokens and add [4]"]),
        (dict(input_ids=bad_ids), ["input_ids", f"outside [0, vocab_size={V})", f"[{V}]"]),
    ]
    for kw, words in cases:
        for call in (generate, generate_stream):
            args = dict(input_ids=nxt, lengths=nl, max_new_tokens=4, cache=out1.cache, eos_id=eos) | kw
            with pytest.raises(ValueError) as e:
                call(model, args.pop("input_ids"), **args)
            for w in words:
                assert w in str(e.value), (kw, str(e.value))
    out2 = generate(model, nxt, lengths=nl, max_new_tokens=4, eos_id=eos, pad_id=-1, cache=out1.cache)
    r2 = [p.go_on(nxt[b, :nl[b]], 4, eos, CAP2) for b, p in enumerate(plain_rows)]
    assert len(r2[0]) == 3  # row 0's cache filled up
    check_output(out2, r2, held + nl, 4, -1, CAP2)
    assert out1.cache[0].k.is_deleted()  # the cache went to turn 2 (donated), and only there


# ---- argument bounds ------------------------------------------------------------------------

def bare_model(model):
    """The toy model as a plain function: no vocab_size to check token ids against."""
    def fn(input_ids, cache, lengths=None, active=None):
        return model(input_ids, cache, lengths=lengths, active=active)
    fn.init_cache = model.init_cache
    return fn


@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=2**31), ["max_new_tokens=2147483648", "< 2**31"]),
    (dict(max_new_tokens=2**31 - 3), ["max_new_tokens=2147483645", "T=10", "int32"]),  # T + N past int32
    (dict(max_length=2**33), ["max_length=8589934592", "< 2**31"]),
    (dict(eos_id=np.int64(2**32 + 5), bare=True), ["eos_id=np.int64(4294967301)", "[0, 2**31)"]),
    (dict(eos_id=[5, 2**31], bare=True), ["eos_id=[5, 2147483648]", "[0, 2**31)"]),
    (dict(lengths=[10, 6, None, 3]), ["lengths must be an integer array of shape (4,)", "object"]),
    (dict(lengths="abcd"), ["lengths must be an integer array of shape (4,)"]),
    (dict(input_ids=[[1, 2], [3]]), ["input_ids must be an integer array [B, T]", "list"]),
    (dict(input_ids=np.zeros((0, 3), np.int32)), ["input_ids must be an integer array [B, T] with B, T >= 1",
                                                  "(0, 3)"]),
])
def test_out_of_range_arguments_name_themselves(model, ids, kw, words):
    """Counts and ids past int32, inputs that are not arrays of numbers, an empty batch: a
    ValueError naming the parameter, the value and what is allowed (they were an OverflowError
    from inside jit, NumPy's or jax's own error, or the cache's "batch=0")."""
    kw = dict(kw)
    m = bare_model(model) if kw.pop("bare", False) else model
    x = kw.pop("input_ids", ids)
    kw.setdefault("max_new_tokens", 2)
    with pytest.raises(ValueError) as e:
        generate(m, x, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ---- models/' Llama: prefill in row slices, a continuation in one extend call -----------------

def test_llama_row_slices_then_a_continuation_refused_then_run(ids):
    """models/' Llama (a StackedCache with write_rows; a continuation goes in one extend=True call)
    against its own prefill / decode calls. Turn 1: prefill_rows=3 over 4 rows, slices 0-2 and 1-3
    (the second redoes two rows), EOS on row 2's first token (row 3 meets it at its second). A
    continuation with a matmul_impl the model refuses: it raises naming it, and the cache is still
    there (decode steps, the only calls that get matmul_impl, used to be first traced after the
    prompt's call had consumed the donated cache). Turn 2: row 0 fills its cache with its input
    (14 + 2 = 16 tokens: one new token), the others go on as their plain loops."""
    llama = pytest.importorskip("models.llama")
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16)
    m = llama.init_random(cfg, jax.random.key(4), init_std=0.5)
    cap = 16
    plain_rows = [PlainRow(m, ids[b, :LENS[b]]) for b in range(len(LENS))]
    eos = [PlainRow(m, ids[2, :LENS[2]]).greedy(1)[0]]
    r1 = [p.greedy(N, eos, cap) for p in plain_rows]
    assert [len(r) for r in r1] == [N, N, 1, 2]
    kw = dict(lengths=LENS, max_new_tokens=N, eos_id=eos, pad_id=-1, max_length=cap, prefill_rows=3,
              attn_impl="reference", cache_dtype=jnp.float32)
    assert gen._prepare(m, ids, **GENERATE_DEFAULTS | kw)[-1].prefill_rows == 3  # (slices do run)
    out1 = generate(m, ids, **kw)
    check_output(out1, r1, LENS, N, -1, cap)

    nxt = np.random.default_rng(6).integers(0, V, (4, 3)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([2, 1, 3, 1], np.int32)
    for bad, words in ((dict(matmul_impl="bogus"), "matmul_impl='bogus'"), (dict(attn_impl="bogus"), "attn_impl='bogus'")):
        with pytest.raises(ValueError, match=words):
            generate(m, nxt, lengths=nl, max_new_tokens=3, cache=out1.cache, **bad)
        assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(out1.cache)), bad
    out2 = generate(m, nxt, lengths=nl, max_new_tokens=3, eos_id=eos, pad_id=-1, cache=out1.cache,
                    attn_impl="reference")
    r2 = [p.go_on(nxt[b, :nl[b]], 3, eos, cap) for b, p in enumerate(plain_rows)]
    assert len(r2[0]) == 1  # row 0's cache is full with its input
    check_output(out2, r2, LENS + np.array([len(r) for r in r1]) - 1 + nl, 3, -1, cap)


# ---- rows that sit a continuation out ------------------------------------------------------------

@pytest.mark.parametrize("which", ["toy-decode-steps", "llama-extend-chunks"])
def test_rows_with_no_tokens_sit_a_continuation_out(model, ids, which):
    """Continuing a cache with lengths[b] == 0: row b feeds and emits nothing (num_new 0, tokens
    all pad_id, its cache length unchanged) while the other rows go on as their plain loops; in a
    third turn the rows that sat out continue as plain loops that never saw turn 2, so turn 2
    left their caches as they were. The toy model feeds through decode steps, the Llama through
    extend calls, here in chunks of 2 (a row with no tokens in any chunk)."""
    if which.startswith("llama"):
        llama = pytest.importorskip("models.llama")
        from models.config import ModelConfig

        m = llama.init_random(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=2, num_kv_heads=1, head_dim=16), jax.random.key(5), init_std=0.5)
        kw = dict(attn_impl="reference", prefill_chunk=2)
        first = dict(cache_dtype=jnp.float32)
    else:
        m, kw, first = model, {}, {}
    cap = 24
    plain_rows = [PlainRow(m, ids[b, :LENS[b]]) for b in range(len(LENS))]
    r1 = [p.greedy(3) for p in plain_rows]
    out1 = generate(m, ids, lengths=LENS, max_new_tokens=3, max_length=cap, **first, **kw)
    assert rows(out1) == r1
    held = LENS + 2
    rng = np.random.default_rng(9)
    nxt = rng.integers(0, V, (4, 3)).astype(np.int32)
    nxt[:, 0] = [r[-1] for r in r1]
    nl = np.array([3, 0, 2, 0], np.int32)
    out2 = generate(m, nxt, lengths=nl, max_new_tokens=3, pad_id=-1, cache=out1.cache, **kw)
    want2 = {b: plain_rows[b].go_on(nxt[b, :nl[b]], 3) for b in (0, 2)}
    assert rows(out2) == [want2[0], [], want2[2], []]
    assert (np.asarray(out2.tokens)[[1, 3]] == -1).all()
    np.testing.assert_array_equal(cache_objects(out2.cache)[0].lengths, held + nl + [2, 0, 2, 0])
    nxt3 = rng.integers(0, V, (4, 2)).astype(np.int32)
    nxt3[:, 0] = [want2[0][-1], r1[1][-1], want2[2][-1], r1[3][-1]]
    nl3 = np.array([0, 2, 0, 1], np.int32)
    out3 = generate(m, nxt3, lengths=nl3, max_new_tokens=2, pad_id=-1, cache=out2.cache, **kw)
    want3 = {b: plain_rows[b].go_on(nxt3[b, :nl3[b]], 2) for b in (1, 3)}
    assert rows(out3) == [[], want3[1], [], want3[3]]
