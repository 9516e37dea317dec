"""generate(prefill_chunk=c): a prompt (new, or continuing a cache) fed c tokens a model call.

The references are the model's own calls, row by row (no generate machinery): an empty cache,
one ``extend=True`` call a chunk, then greedy decode steps; for a dense cache, the cache-free
forward over the whole sequence (chunking a dense cache changes nothing but rounding); and an
independent float64 NumPy model written from DESIGN.md section 1 (below), which the tests at the
end of this file also hold ``extend_attention`` and the caches' ``extend`` to, chunk after chunk.

What a chunk must compute (``extend_attention`` then the cache's ``extend``; ``generate(...,
prefill_chunk=c)`` strings them together): each of the chunk's queries attends to the tokens the
cache already holds exactly as a decode step reads them -- keys of the complete R-blocks after the
sinks dequantized per channel (groups of Gk tokens), values older than the newest R body tokens
dequantized per token (groups of G channels), everything else, sinks included, in full precision --
and to the chunk's own tokens up to itself in full precision (a sliding window counts both); then
the chunk's tokens are appended as one append a token would. The model (``decode_view``,
``chunk_attention``, ``Llama64``) knows nothing of the library's layouts: it keeps each row's
full-precision history and quantizes from it, in float64.

Rounding ties: float32 and float64 may put a number that sits on a code boundary ((x - mn) / scale
within 1e-3 of k + 1/2) on either side; there, and only there, the reference takes whichever of the
two codes' values is nearer the library's (``like``). Everything else is the reference's own.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax import attention
from kivi_jax.generate import generate, generate_stream

gen = importlib.import_module("kivi_jax.generate")  # (kivi_jax.generate is also the function)
llama = pytest.importorskip("models.llama")
from models.config import ModelConfig  # noqa: E402


# ---- the float64 reference ----------------------------------------------------------------

def _fake_quant(x, bits, axis, like=None, tie=1e-3):
    """DESIGN's asymmetric min/max quantization of one group of x along ``axis``, dequantized."""
    mn, mx = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    scale = (mx - mn) / (2 ** bits - 1)
    ratio = (x - mn) / np.where(scale == 0, 1.0, scale)
    out = np.where(scale == 0, mn, np.clip(np.round(ratio), 0, 2 ** bits - 1) * scale + mn)  # half to even
    if like is not None:
        lo = np.floor(ratio)
        down, up = lo * scale + mn, np.minimum(lo + 1, 2 ** bits - 1) * scale + mn
        tied = (np.abs(ratio - lo - 0.5) < tie) & (scale > 0)
        out = np.where(tied, np.where(np.abs(down - like) <= np.abs(up - like), down, up), out)
    return out


def _hadamard(d):
    s = np.ones((1, 1))
    while s.shape[0] < d:
        s = np.block([[s, s], [s, -s]])
    return s / np.sqrt(d)


def decode_view(K, V, held, kivi, like=None):
    """(K, V) [H, held, D] float64 as a reader sees a row holding tokens 0..held-1 (K, V its
    full-precision history [H, >= held, D]); kivi None: a dense cache. like: the library's
    materialized (K, V) of the row, [H, >= held, D] (rounding ties only)."""
    K, V = np.array(K[:, :held], np.float64), np.array(V[:, :held], np.float64)
    if kivi is None:
        return K, V
    h = _hadamard(K.shape[-1])
    rk, rv = kivi.rotate_keys, kivi.rotate_values  # the stores hold x·H
    K, V = (K @ h if rk else K), (V @ h if rv else V)
    lk = lv = None
    if like is not None:
        lk, lv = (np.asarray(x, np.float64)[:, :held] for x in like)
        lk, lv = (lk @ h if rk else lk), (lv @ h if rv else lv)
    s, r, g, gk = kivi.sink_tokens, kivi.residual_length, kivi.group_size, kivi.key_group
    body = max(held - s, 0)
    for t in range(s, s + body - body % r, gk):  # keys: the complete R-blocks, per channel
        K[:, t:t + gk] = _fake_quant(K[:, t:t + gk], kivi.k_bits, 1, None if lk is None else lk[:, t:t + gk])
    m = max(body - r, 0)  # values: all but the newest R body tokens, per token
    for c in range(0, V.shape[-1], g):
        V[:, s:s + m, c:c + g] = _fake_quant(V[:, s:s + m, c:c + g], kivi.v_bits, 2,
                                             None if lv is None else lv[:, s:s + m, c:c + g])
    return (K @ h if rk else K), (V @ h if rv else V)


def chunk_attention(q, kc, vc, k, v, window=None):
    """One row's chunk: q [Hq, n, D] at positions L..L+n-1 over the cache as read kc, vc
    [Hkv, L, D] and its own k, v [Hkv, n, D]; causal, window counting both. -> [Hq, n, D]."""
    hq, n, d = q.shape
    if n == 0:
        return np.zeros((hq, 0, d))
    rep = hq // kc.shape[0]
    keys = np.repeat(np.concatenate([kc, k], 1), rep, axis=0)
    values = np.repeat(np.concatenate([vc, v], 1), rep, axis=0)
    qpos, kpos = kc.shape[1] + np.arange(n)[:, None], np.arange(keys.shape[1])[None, :]
    ok = (kpos <= qpos) & (True if window is None else kpos > qpos - window)
    s = np.where(ok, np.einsum("hqd,hkd->hqk", q, keys) / np.sqrt(d), -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,hkd->hqd", w, values) / w.sum(-1, keepdims=True)


class Llama64:
    """A float64 Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU; Mistral's window) over a row's
    history kept as Algorithm 1 reads it. ``feed(row, ids)`` is one chunk (or a prompt: a chunk
    into an empty row); ``feed(row, [tok], decode=True)`` a decode step (append, then attend)."""

    def __init__(self, model, kivi):
        p = jax.tree.map(lambda x: np.asarray(x, np.float64), llama.params_of(model))
        self.w, self.embed, self.final_norm, self.lm_head = p["layers"], p["embed"], p["final_norm"], p["lm_head"]
        self.c, self.kivi = model.config, kivi
        d = self.c.head_dim
        self.inv = 1.0 / self.c.rope_theta ** (np.arange(0, d, 2) / d)

    def _norm(self, x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.c.rms_norm_eps)

    def _rope(self, x, pos):  # x [T, heads, D]
        a = pos[:, None] * self.inv[None, :]
        a = np.concatenate([a, a], -1)[:, None]
        half = x.shape[-1] // 2
        return x * np.cos(a) + np.concatenate([-x[..., half:], x[..., :half]], -1) * np.sin(a)

    def new_row(self):
        z = np.zeros((self.c.num_kv_heads, 0, self.c.head_dim))
        return [[z, z] for _ in range(self.c.num_layers)]

    def feed(self, row, ids, decode=False, like=None):
        """-> logits [len(ids), V]; row (per layer [K, V] history) extended in place. like[l]:
        the library's materialized (K, V) of layer l for this row (rounding ties only)."""
        c = self.c
        hq, hkv, d, n = c.num_heads, c.num_kv_heads, c.head_dim, len(ids)
        held = row[0][0].shape[1]
        pos = held + np.arange(n)
        x = self.embed[np.asarray(ids)]
        for layer in range(c.num_layers):
            p = {k: w[layer] for k, w in self.w.items()}
            h = self._norm(x, p["attn_norm"])
            q = self._rope((h @ p["q_proj"]).reshape(n, hq, d), pos).transpose(1, 0, 2)
            k = self._rope((h @ p["k_proj"]).reshape(n, hkv, d), pos).transpose(1, 0, 2)
            v = (h @ p["v_proj"]).reshape(n, hkv, d).transpose(1, 0, 2)
            K, V = np.concatenate([row[layer][0], k], 1), np.concatenate([row[layer][1], v], 1)
            like_l = None if like is None else like[layer]
            if decode:  # DESIGN: append, then attend (the token may be quantized already)
                kc, vc = decode_view(K, V, held + 1, self.kivi, like_l)
                o = chunk_attention(q, kc[:, :held], vc[:, :held], kc[:, held:], vc[:, held:], c.sliding_window)
            else:
                kc, vc = decode_view(K, V, held, self.kivi, like_l)
                o = chunk_attention(q, kc, vc, k, v, c.sliding_window)
            row[layer] = [K, V]
            x = x + o.transpose(1, 0, 2).reshape(n, hq * d) @ p["o_proj"]
            h = self._norm(x, p["mlp_norm"])
            gate = h @ p["gate_proj"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ p["up_proj"])) @ p["down_proj"]
        return self._norm(x, self.final_norm) @ self.lm_head


def reference_turn(r64, row, ids, chunk, got, like, tol=5e-4):
    """Checks a greedy turn of generate for one row: ids fed in chunks of ``chunk`` tokens, then
    the row's new tokens ``got`` as decode steps (the last one is never fed). Each of ``got`` must
    be the float64 model's argmax; ``tol`` (4x the float32 model's logit error, ~1.2e-4 at
    logits ~15) lets a near-tie go either way, and the model goes on from the library's token."""
    for i in range(0, len(ids), chunk):
        logits = r64.feed(row, list(ids[i:i + chunk]), like=like)
    for s, tok in enumerate(got):
        if s:
            logits = r64.feed(row, [got[s - 1]], decode=True, like=like)
        best = logits[-1].max()
        assert logits[-1][tok] >= best - tol, (f"step {s}: token {tok} (logit {logits[-1][tok]:.5f}) is not the "
                                               f"float64 argmax {int(np.argmax(logits[-1]))} ({best:.5f})")


def materialized(cache):
    """A model's StackedCache read back: (K, V) [L, B, Hkv, positions, D] float64."""
    return tuple(np.asarray(x, np.float64) for x in jax.vmap(lambda one: one.materialize())(cache.layers))


def check_row_cache(km, vm, b, row, kivi, held, rtol, atol):
    """Row b of a model cache's materialized stores against the float64 history ``row``."""
    for layer, (K, V) in enumerate(row):
        want = decode_view(K, V, held, kivi, (km[layer, b], vm[layer, b]))
        for got, w in zip((km[layer, b, :, :held], vm[layer, b, :, :held]), want):
            np.testing.assert_allclose(got, w, rtol=rtol, atol=atol, err_msg=f"row {b} layer {layer}")


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


# ---- extend_attention + extend, chunk after chunk -------------------------------------------

def _cache(kivi, b, hkv, d, max_length, dtype=jnp.float32):
    if kivi is None:
        return kivi_jax.DenseCache.init(batch=b, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)
    cls = kivi_jax.MosaicKIVICache if kivi.layout == "mosaic" else kivi_jax.KIVICache
    return cls.init(kivi, batch=b, num_kv_heads=hkv, head_dim=d, max_length=max_length, dtype=dtype)


def _chunks(totals, c):
    """Row b's totals[b] tokens in chunks of c: [[tokens of each row in chunk i], ...]."""
    return [[min(max(n - i, 0), c) for n in totals] for i in range(0, max(totals), c)]


def _qkv(rng, b, hq, hkv, t, d):
    """Random chunk: keys with a few outlier channels (what makes per-channel keys matter)."""
    q = rng.standard_normal((b, hq, t, d))
    k = rng.standard_normal((b, hkv, t, d)) * np.where(rng.random(d) < 0.1, 4.0, 1.0) + rng.normal(0, 1, d)
    v = rng.standard_normal((b, hkv, t, d)) * 2
    return (x.astype(np.float32) for x in (q, k, v))


def _step_fn(q, k, v, cache, n, window):
    """One chunk: its attention (the XLA path, as off a GPU), then the cache's extend."""
    return kivi_jax.extend_attention(q, k, v, cache, n, window=window, impl="xla"), cache.extend(k, v, n)


_step = jax.jit(_step_fn, static_argnames=("window",))


def _run_chunks(kivi, d, hkv, hq, window, chunks, seed, max_length):
    """Feeds ``chunks`` to a new cache -> (per chunk (q, k, v, counts, output), final cache)."""
    rng = np.random.default_rng(seed)
    cache = _cache(kivi, len(chunks[0]), hkv, d, max_length)
    record = []
    for counts in chunks:
        q, k, v = _qkv(rng, len(counts), hq, hkv, max(counts), d)
        out, cache = _step(q, k, v, cache, jnp.asarray(counts, jnp.int32), window)
        record.append((q, k, v, counts, np.asarray(out, np.float64)))
    return record, cache


def _check_chunks(record, cache, kivi, window, rtol=1e-5, atol=2e-5):
    """Every chunk's output and the final stores against the float64 model (float32 exact
    attention and float32 stores: errors of a few float32 ulps of sums over <= 400 tokens)."""
    km, vm = (np.asarray(x, np.float64) for x in cache.materialize())
    b, hkv, _, d = km.shape
    hist = [[np.zeros((hkv, 0, d))] * 2 for _ in range(b)]
    for q, k, v, counts, out in record:
        assert np.isfinite(out).all()
        for r, n in enumerate(counts):
            K, V = hist[r]
            kc, vc = decode_view(K, V, K.shape[1], kivi, (km[r], vm[r]))
            want = chunk_attention(q[r, :, :n].astype(np.float64), kc, vc, k[r, :, :n].astype(np.float64),
                                   v[r, :, :n].astype(np.float64), window)
            np.testing.assert_allclose(out[r, :, :n], want, rtol=rtol, atol=atol, err_msg=f"row {r} at {K.shape[1]}")
            hist[r] = [np.concatenate([K, k[r, :, :n]], 1), np.concatenate([V, v[r, :, :n]], 1)]
    held = [K.shape[1] for K, _ in hist]
    assert np.asarray(cache.lengths).tolist() == held and not np.asarray(cache.overflow).any()
    for r, (K, V) in enumerate(hist):
        want = decode_view(K, V, held[r], kivi, (km[r], vm[r]))
        for got, want in zip((km[r, :, :held[r]], vm[r, :, :held[r]]), want):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"row {r} stores")


R32 = dict(residual_length=32, layout="tokens")
# id: (kivi, head_dim, Hkv, Hq, window, chunk, tokens per row, PREFILL_BLOCK). Rows of different
# lengths (one empty); totals past R (default 128, or 32), across key groups and sinks; chunks of
# 1, 7, 32, 128, 130 (in query blocks of 64: each sees the new keys before its end only) and one
# longer than every row (the whole prompt in one extend of an empty cache); GQA 1 and 4.
CHAIN = {
    "dense-gqa4-window-c7": (None, 32, 1, 4, 40, 7, [150, 70, 9, 0], None),
    "kivi2-r32-sinks5-window-c1": (kivi_jax.KIVIConfig(sink_tokens=5, **R32), 32, 2, 2, 24, 1, [45, 37, 3, 0], None),
    "kivi4-gqa4-window-c130-blocks64": (kivi_jax.KIVIConfig(k_bits=4, v_bits=4, layout="tokens"), 64, 1, 4, 40, 130,
                                        [300, 161, 33, 0], 64),
    "kivi2-c128-keygroups16-rotated-sinks": (
        kivi_jax.KIVIConfig(layout="tokens", key_group_size=16, rotate="kv", sink_tokens=3), 64, 2, 2, None, 128,
        [300, 161, 33, 0], None),
    "kivi2-c400-longer-than-the-rows": (kivi_jax.KIVIConfig(layout="tokens"), 64, 2, 2, 100, 400, [300, 161, 33, 0],
                                        None),
    "mosaic-r32-sinks6-gqa4-c32": (kivi_jax.KIVIConfig(residual_length=32, sink_tokens=6, layout="mosaic"), 128, 1, 4,
                                   None, 32, [150, 70, 9, 0], None),
}


@pytest.mark.parametrize("case", CHAIN)
def test_chunks_attend_and_append_as_algorithm_1(case, monkeypatch):
    kivi, d, hkv, hq, window, c, totals, block = CHAIN[case]
    if block:
        monkeypatch.setattr(attention, "PREFILL_BLOCK", block)
    record, cache = _run_chunks(kivi, d, hkv, hq, window, _chunks(totals, c), seed=len(case),
                                max_length=max(totals) + 3)
    _check_chunks(record, cache, kivi, window)


def test_chunks_under_vmap_are_each_requests_own():
    """jax.vmap over requests, each with its own cache and chunks: each request's outputs and
    stores are the float64 model's for it."""
    kivi = kivi_jax.KIVIConfig(sink_tokens=2, **R32)
    chunks = _chunks([60, 41, 0], 16)
    rng = np.random.default_rng(5)
    caches = jax.tree.map(lambda x: jnp.stack([x, x]), _cache(kivi, 3, 2, 32, 64))
    fn = jax.jit(jax.vmap(lambda q, k, v, c, n: _step_fn(q, k, v, c, n, 24)))
    records = [[], []]
    for counts in chunks:
        qkv = [list(_qkv(rng, 3, 4, 2, 16, 32)) for _ in range(2)]
        n = jnp.asarray([counts, counts[::-1]], jnp.int32)
        out, caches = fn(*(jnp.stack([a[i] for a in qkv]) for i in range(3)), caches, n)
        for i in range(2):
            records[i].append((*qkv[i], np.asarray(n[i]).tolist(), np.asarray(out[i], np.float64)))
    for i in range(2):
        _check_chunks(records[i], jax.tree.map(lambda x: x[i], caches), kivi, 24)


def test_cudnn_path_over_the_prefix_it_picks(monkeypatch):
    """extend_attention's cuDNN branch as it runs on a GPU (the new tokens written into the
    shortest materialized prefix holding them, a [B, 1, T, C] mask; under jax.vmap, folded into
    the batch), with jax.nn.dot_product_attention's XLA implementation standing in for cuDNN;
    bf16. A row whose new tokens end past the prefix its held ones fit (256 body tokens), GQA 4, a window and a
    sink. Against float64 attention over what the cache materializes (the stores' own fidelity
    in bf16 is test_cache's) and the new tokens, to bf16's precision (8 bits: ~1e-2 of |p·V|)."""
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention, "_extend_cudnn", functools.partial(attention._extend_cudnn, implementation="xla"))
    rng = np.random.default_rng(9)
    held, lens, t = [250, 200, 3], [10, 5, 1], 12  # row 0: held in 256 positions, its new tokens not
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    for kivi, window in ((None, None), (kivi_jax.KIVIConfig(sink_tokens=1, **R32), 7)):
        cache = _cache(kivi, 3, 1, 64, 600, jnp.bfloat16)
        k0, v0 = (rng.standard_normal((3, 1, max(held), 64)) for _ in range(2))
        cache = cache.prefill(jnp.asarray(k0, jnp.bfloat16), jnp.asarray(v0, jnp.bfloat16), jnp.asarray(held))
        q, k, v = (bf(x) for x in _qkv(rng, 3, 4, 1, t, 64))

        def fn(q, k, v, c, window=window):
            return kivi_jax.extend_attention(q, k, v, c, jnp.asarray(lens), window=window, impl="cudnn")

        out = bf(jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None)))(
            *(jnp.asarray(np.stack([x, -x]), jnp.bfloat16) for x in (q, k, v)), cache))
        km, vm = (np.asarray(x.astype(jnp.float32), np.float64) for x in cache.materialize())
        for r, (h, n) in enumerate(zip(held, lens)):
            for i, sign in enumerate((1, -1)):
                want = chunk_attention(sign * q[r, :, :n], km[r, :, :h], vm[r, :, :h], sign * k[r, :, :n],
                                       sign * v[r, :, :n], window)
                np.testing.assert_allclose(out[i, r, :, :n], want, rtol=2e-2, atol=2e-2, err_msg=f"row {r}")


def test_model_chunks_with_window_sinks_and_gqa4():
    """A model's own ``extend=True`` calls, chunk after chunk (what generate(prefill_chunk=16) makes
    of a prompt): Mistral's sliding window, KIVI-2 with R=32 and 4 sinks, 4 query heads per KV
    head, ragged rows (one done after its first chunk). Every position's logits and the final
    stores against the float64 model fed the same chunks; float32 through two layers with
    logits ~15: errors ~1e-4 (dense, against float64: 1.2e-4)."""
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=1, head_dim=32, sliding_window=24, model_type="mistral")
    m = llama.init_random(cfg, jax.random.key(3), init_std=0.5)
    kivi, c, lens = kivi_jax.KIVIConfig(sink_tokens=4, **R32), 16, [75, 40, 6]
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 80)).astype(np.int32)
    extend = jax.jit(lambda x, cache, n: m(x, cache, lengths=n, extend=True))
    cache = m.init_cache(3, 80, kivi=kivi, dtype=jnp.float32)
    logits = []
    for i, counts in enumerate(_chunks(lens, c)):
        out, cache = extend(jnp.asarray(ids[:, i * c:(i + 1) * c]), cache, jnp.asarray(counts, jnp.int32))
        logits.append((counts, np.asarray(out, np.float64)))
    km, vm = materialized(cache)
    r64 = Llama64(m, kivi)
    for b in range(3):
        like = [(km[layer, b], vm[layer, b]) for layer in range(cfg.num_layers)]
        row = r64.new_row()
        for i, (counts, out) in enumerate(logits):
            if counts[b]:
                want = r64.feed(row, list(ids[b, i * c:i * c + counts[b]]), like=like)
                np.testing.assert_allclose(out[b, :counts[b]], want, rtol=1e-4, atol=5e-4, err_msg=f"row {b} chunk {i}")
        assert int(cache.lengths[b]) == lens[b]
        check_row_cache(km, vm, b, row, kivi, lens[b], rtol=1e-4, atol=1e-4)
