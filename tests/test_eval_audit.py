"""Audit of kivi_jax.eval against expectations built here, independently of the library:

* a float64 NumPy Llama (weights read from the model) whose cache is the materialized view
  DESIGN.md §1 defines -- after L tokens, keys [0, L - L % R) quantized per channel (groups of G
  tokens), values [0, max(L - R, 0)) per token (groups of G channels), the rest full precision --
  gives the per-token NLLs of dense, KIVI and the ablations, with and without a prompt prefix,
  and the greedy passkey answers of dense and KIVI on ragged, padded batches;
* torch's own LM loss gives the dense perplexity of the transformers twin of the model;
* a byte-level tokenizer makes every token count in the passkey prompt and the windows checkable.

Small: a 2-layer model over a 256-symbol vocabulary, ~100-token texts.
"""

import json
import pathlib
import re
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # tests/models would otherwise shadow the models package (see tests/models/conftest.py)
    sys.path.append(_ROOT)
if "models" in sys.modules and getattr(sys.modules["models"], "__file__", None) is None:
    del sys.modules["models"]

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kivi_jax.eval import data, methods, passkey, ppl  # noqa: E402

G, R = 16, 32  # small KIVI settings so ~100 tokens see prefill quantization, flushes and value spills


# ---- a byte-level tokenizer: one token per UTF-8 byte ------------------------------------------
class ByteTok:
    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [list(t.encode()) for t in text]}
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", "replace")


# ---- the float64 reference -------------------------------------------------------------------------
def _quant(x, bits, g, axis):
    """float64 asymmetric min/max quantization (round half to even) of groups of g along axis; x_hat."""
    x = np.moveaxis(x, axis, -1)
    y = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    mn, mx = y.min(-1, keepdims=True), y.max(-1, keepdims=True)
    sc = (mx - mn) / (2**bits - 1)
    code = np.where(sc > 0, np.clip(np.round((y - mn) / np.where(sc > 0, sc, 1.0)), 0, 2**bits - 1), 0)
    return np.moveaxis((code * sc + mn).reshape(x.shape), -1, axis)


class RefLlama:
    """float64 Llama. prefill(ids): causal full-precision attention over the prompt, all logits;
    step(tok): one decode step that appends, then attends over the cache as KIVI holds it
    (kivi = (k_bits, v_bits, key_axis, value_axis) or None for dense)."""

    def __init__(self, model, kivi=None):
        import models

        p = models.params_of(model)
        f = lambda a: np.asarray(a, np.float64)  # noqa: E731
        self.w = {k: f(v) for k, v in p["layers"].items()}
        self.embed, self.final_norm = f(p["embed"]), f(p["final_norm"])
        self.head = self.embed.T if p.get("lm_head") is None else f(p["lm_head"])
        self.c, self.kivi = model.config, kivi

    def _norm(self, x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.c.rms_norm_eps)

    def _rope(self, x, pos):  # x [T, H, D]
        d = x.shape[-1]
        ang = pos[:, None, None] * self.c.rope_theta ** (-np.arange(0, d, 2) / d)
        a, b = x[..., :d // 2], x[..., d // 2:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)

    def _view(self, k, v):
        """k, v [Hkv, L, D]: what the cache attends over after L tokens (DESIGN.md §1)."""
        if self.kivi is None:
            return k, v
        kb, vb, kax, vax = self.kivi
        L = k.shape[1]
        n = L - L % R
        m = n if vax == "channel" else max(L - R, 0)
        k, v = k.copy(), v.copy()
        if n:
            k[:, :n] = _quant(k[:, :n], kb, G, 1 if kax == "channel" else 2)
        if m:
            v[:, :m] = _quant(v[:, :m], vb, G, 1 if vax == "channel" else 2)
        return k, v

    def _run(self, ids, pos0):
        c, w = self.c, self.w
        t, hq, hkv, d = len(ids), c.num_heads, c.num_kv_heads, c.head_dim
        pos = np.arange(pos0, pos0 + t, dtype=np.float64)
        x = self.embed[np.asarray(ids)]
        for i in range(c.num_layers):
            h = self._norm(x, w["attn_norm"][i])
            q = self._rope((h @ w["q_proj"][i]).reshape(t, hq, d), pos).transpose(1, 0, 2)
            k = self._rope((h @ w["k_proj"][i]).reshape(t, hkv, d), pos).transpose(1, 0, 2)
            v = (h @ w["v_proj"][i]).reshape(t, hkv, d).transpose(1, 0, 2)
            if pos0 == 0:  # the prompt: causal, full precision
                self.k[i], self.v[i] = k, v
                kk, vv = np.repeat(k, hq // hkv, 0), np.repeat(v, hq // hkv, 0)
                s = q @ kk.transpose(0, 2, 1) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
            else:  # one decode step: append, then attend over the cache's view
                self.k[i] = np.concatenate([self.k[i], k], 1)
                self.v[i] = np.concatenate([self.v[i], v], 1)
                kv, vv = self._view(self.k[i], self.v[i])
                kk, vv = np.repeat(kv, hq // hkv, 0), np.repeat(vv, hq // hkv, 0)
                s = q @ kk.transpose(0, 2, 1) / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            o = (p / p.sum(-1, keepdims=True)) @ vv  # [Hq, T, D]
            x = x + o.transpose(1, 0, 2).reshape(t, hq * d) @ w["o_proj"][i]
            h = self._norm(x, w["mlp_norm"][i])
            g = h @ w["gate_proj"][i]
            x = x + (g / (1 + np.exp(-g)) * (h @ w["up_proj"][i])) @ w["down_proj"][i]
        return self._norm(x, self.final_norm) @ self.head

    def prefill(self, ids):
        self.k, self.v = [None] * self.c.num_layers, [None] * self.c.num_layers
        self.length = len(ids)
        return self._run(ids, 0)

    def step(self, tok):
        out = self._run([tok], self.length)[0]
        self.length += 1
        return out


def _nll(logits, targets):
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def ref_nll(ref: RefLlama, ids, prefill_len):
    """[N - 1]: tokens 1..P scored by the prompt's logits, the rest by decode steps."""
    out = list(_nll(ref.prefill(ids[:prefill_len]), ids[1:prefill_len + 1]))
    for j in range(prefill_len, len(ids) - 1):
        out.append(_nll(ref.step(int(ids[j]))[None], [ids[j + 1]])[0])
    return np.asarray(out)


# ---- the model: a transformers Llama and its kivi-jax twin ------------------------------------------
@pytest.fixture(scope="module")
def twin():
    """(torch LlamaForCausalLM, the models.Llama loaded from it): vocab 256, 2 layers, GQA 4/2,
    head_dim 32, tied embeddings; matrices normal(0, 0.25) so logits depend sharply on the input."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import models

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=1024)
    tm = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.25)
    model, tok = models.load_model(tm)
    assert tok is None and model.config.head_dim == 32 and model.config.tie_word_embeddings
    return tm, model


def _ids(b, n, seed):
    return np.random.default_rng(seed).integers(0, 256, (b, n)).astype(np.int32)


# ---- perplexity --------------------------------------------------------------------------------------
# One shape for most calls (B = 2 rows of N = 98 tokens, a prompt of P = 33 > R tokens, the 64 decode
# steps in one chunk), so the jitted prefill and decode chunk compile once per cache format.
N, P, CHUNK = 98, 33, 64
SPECS = {"dense": None, "kivi-2/4": (2, 4, "channel", "token"), "kivi-2-ktoken": (2, 2, "token", "token"),
         "kivi-2-vchannel": (2, 2, "channel", "channel")}


def _rows():
    """Row 0 random; row 1 one token repeated (constant values: per-channel value groups have max == min)."""
    ids = _ids(2, N, seed=2)
    ids[1] = 7
    return ids


def test_dense_perplexity_is_torch_loss(twin):
    """Token i predicts token i + 1, every token after the first is scored once (the prompt's from
    the prefill logits), the mean is over all rows' tokens: exp(torch's own LM loss)."""
    import torch

    tm, model = twin
    ids = _ids(2, N, seed=1)
    nll = ppl.teacher_forced_nll(model, ids, methods.parse_method("dense"), prefill_len=P, chunk=CHUNK)
    with torch.no_grad():
        t = torch.as_tensor(ids, dtype=torch.long)
        loss = tm(input_ids=t, labels=t).loss.item()
    assert nll.shape == (2, N - 1)
    assert abs(ppl.perplexity(nll) / np.exp(loss) - 1) < 1e-5
    assert ppl.perplexity(nll) > 10  # a model that is not sure: the figure means something


@pytest.mark.parametrize("spec", list(SPECS))
def test_teacher_forced_nll_equals_float64_loop(twin, spec):
    """Per-token NLLs == the float64 loop with a cache quantized here per DESIGN.md §1: dense; KIVI
    K2/V4 (k/v bits swapped would show); keys per-token (the ablation: groups of G channels of one
    token); values per-channel (groups of G tokens, the keys' block rule). The prompt's prefill
    quantizes keys [0, 32) and values [0, 1); the decode steps flush at 64 and 96 tokens."""
    _, model = twin
    ids = _rows()
    got = ppl.teacher_forced_nll(model, ids, methods.parse_method(spec, group_size=G, residual_length=R),
                                 prefill_len=P, chunk=CHUNK)
    want = np.stack([ref_nll(RefLlama(model, SPECS[spec]), row, P) for row in ids])
    np.testing.assert_allclose(got, want, atol=3e-4, rtol=0)
    if spec != "dense":
        dense = np.stack([ref_nll(RefLlama(model), row, P) for row in ids])
        assert np.max(np.abs(want[0] - dense[0])) > 0.05  # the quantization shows, far above the tolerance
        np.testing.assert_allclose(got[:, :P], dense[:, :P], atol=3e-4, rtol=0)  # the prompt reads no cache


def test_teacher_forced_nll_from_one_prompt_token(twin):
    """prefill_len=1 (the README's setting): token 0 is the prompt, 1..N-2 are decode steps; the
    steps before R tokens are held read nothing quantized. The 96 steps: a chunk of 64, a partial one of 32."""
    _, model = twin
    ids = _rows()
    got = ppl.teacher_forced_nll(model, ids, methods.parse_method("kivi-2/4", group_size=G, residual_length=R),
                                 prefill_len=1, chunk=CHUNK)
    want = np.stack([ref_nll(RefLlama(model, SPECS["kivi-2/4"]), row, 1) for row in ids])
    dense = np.stack([ref_nll(RefLlama(model), row, 1) for row in ids])
    np.testing.assert_allclose(got, want, atol=3e-4, rtol=0)
    np.testing.assert_allclose(got[:, :R - 1], dense[:, :R - 1], atol=3e-4, rtol=0)
    assert np.max(np.abs(want[0, R - 1:] - dense[0, R - 1:])) > 0.05


def _texts(monkeypatch):
    """Two random printable texts (bytes 32..126) in place of the essays and Wikipedia."""
    rng = np.random.default_rng(5)
    texts = {name: bytes(rng.integers(32, 127, 3 * N).astype(np.uint8)).decode() for name in ("essays", "wiki")}
    monkeypatch.setattr(data, "load_text", lambda name: texts[name])
    return texts


def _check_rows(result, texts, windows, model):
    """Every figure of every (method, text) row against the float64 loop over the windows cut here."""
    s = result["settings"]
    assert (s["chunk_len"], s["prefill_len"], s["decode_steps_per_window"]) == (N, P, N - 1 - P)
    dense_ppl = {}
    for r in sorted(result["results"], key=lambda r: r["method"] != "dense"):
        cut = [list(texts[r["text"]].encode()[w * N:(w + 1) * N]) for w in range(windows)]  # consecutive, from 0
        nll = np.stack([ref_nll(RefLlama(model, SPECS[r["method"]]), np.asarray(c), P) for c in cut])
        assert r["windows"] == windows and r["tokens_scored"] == windows * (N - 1)
        assert r["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-3)  # all tokens pooled, not a mean of ppls
        assert r["ppl_first_window"] == pytest.approx(np.exp(nll[0].mean()), rel=1e-3)
        assert r["ppl_per_window"] == pytest.approx([np.exp(x.mean()) for x in nll], rel=1e-3)
        bs = s["bin_size"]
        bins = [nll[:, j:j + bs].mean() for j in range(0, N - 1, bs)]  # (bins of 16: the last holds one column)
        assert r["nll_bins"] == pytest.approx(bins, abs=1e-3)
        if r["method"] == "dense":
            dense_ppl[r["text"]] = r["ppl"]
        assert r["vs_dense"] == pytest.approx(r["ppl"] / dense_ppl[r["text"]] - 1, abs=1e-12)


def test_run_pools_windows_and_texts(twin, monkeypatch):
    _, model = twin
    texts = _texts(monkeypatch)
    ms = methods.parse_methods("dense,kivi-2/4", group_size=G, residual_length=R)
    res = ppl.run(model, ByteTok(), ms, texts=("essays", "wiki"), num_chunks=1, chunk_len=N, prefill_len=P,
                  chunk_steps=CHUNK, bin_size=16, progress=False, model_name="twin")
    assert [(r["method"], r["text"]) for r in res["results"]] == [
        ("dense", "essays"), ("dense", "wiki"), ("kivi-2/4", "essays"), ("kivi-2/4", "wiki")]
    _check_rows(res, texts, 1, model)
    s = res["settings"]
    assert (s["group_size"], s["residual_length"], s["dtype"], s["texts"]) == (G, R, "float32", ["essays", "wiki"])
    assert [(m["name"], m.get("k_bits"), m.get("v_bits")) for m in s["methods"]] == [
        ("dense", None, None), ("kivi-2/4", 2, 4)]


def test_cli_eval_ppl_writes_what_it_computed(twin, monkeypatch, tmp_path, capsys):
    """kivi-jax eval ppl end to end on the twin (two windows of one text): the JSON holds the commit,
    the model, the flags' settings and the figures of the float64 loop; the table prints them."""
    from kivi_jax import cli
    from kivi_jax.eval import plot, report

    _, model = twin
    texts = _texts(monkeypatch)
    monkeypatch.setattr(cli, "_load", lambda source, dtype="float32": (model, ByteTok()))
    monkeypatch.setattr(plot, "plot_ppl", lambda result, path: pathlib.Path(path).write_bytes(b"png"))
    monkeypatch.delenv("KIVI_COMMIT", raising=False)
    code = cli.main(["eval", "ppl", "--texts", "essays", "--windows", "2", "--tokens", str(N), "--prefill", str(P),
                     "--methods", "dense,kivi-2/4", "--group-size", str(G), "--residual-length", str(R),
                     "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    (path,) = tmp_path.glob("ppl-smollm2-*.json")
    res = json.loads(path.read_text())
    assert path.name == f"ppl-smollm2-{res['date'][:10]}.json"
    assert res["commit"] == report._git("rev-parse", "HEAD") and res["model"] == "smollm2-135m"
    assert (res["settings"]["windows_per_text"], res["settings"]["group_size"], res["settings"]["residual_length"]) \
        == (2, G, R)
    _check_rows(res, texts, 2, model)
    by = {r["method"]: r for r in res["results"]}
    row = next(line for line in out.splitlines() if line.startswith("| KIVI-K2/V4 |"))
    assert f"{by['kivi-2/4']['ppl']:.2f} ({100 * by['kivi-2/4']['vs_dense']:+.1f}%)" in row
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().strip() == out.strip()
    assert f"(prefill {P} tokens, whose next-token NLLs count too)" in out  # what the figures pool


def test_run_and_token_chunks_refuse_empty_and_zero_inputs(twin):
    """Bad inputs are a ValueError naming the parameter, raised before any work: texts=() raised
    NumPy's "need at least one array to concatenate", bin_size=0 a ZeroDivisionError after every
    method had run, token_chunks(num_chunks=0) looped forever (0 characters doubled)."""
    _, model = twin
    ms = methods.parse_methods("dense")
    kw = dict(num_chunks=1, chunk_len=N, progress=False)
    for bad, match in ((dict(texts=()), r"texts=\(\) must be a non-empty"), (dict(bin_size=0), "bin_size=0"),
                       (dict(prefill_len=N), f"prefill_len={N} must be an integer in \\[1, chunk_len-1={N - 1}\\]")):
        with pytest.raises(ValueError, match=match):
            ppl.run(model, ByteTok(), ms, **{"texts": ("essays",), **kw, **bad})
    with pytest.raises(ValueError, match=r"methods=\[\]"):
        ppl.run(model, ByteTok(), [], texts=("essays",), **kw)
    with pytest.raises(ValueError, match=r"texts: 'essays': the text has 0 tokens; 1 chunks of 98 need 98"):
        with pytest.MonkeyPatch.context() as mp:  # an empty text: which text, and how many tokens it has
            mp.setattr(data, "load_text", lambda name: "" if name == "essays" else "x" * 200)
            ppl.run(model, ByteTok(), ms, texts=("wiki", "essays"), **kw)

    class Counting(ByteTok):
        calls = 0

        def __call__(self, text, add_special_tokens=False):
            Counting.calls += 1
            if Counting.calls > 50:
                raise RuntimeError("token_chunks keeps tokenizing")
            return super().__call__(text)

    for bad in (dict(num_chunks=0, chunk_len=8), dict(num_chunks=2, chunk_len=0), dict(num_chunks=1, chunk_len=8,
                                                                                        max_chars=0)):
        Counting.calls = 0
        with pytest.raises(ValueError, match=f"{next(k for k, v in bad.items() if v == 0)}=0 must be"):
            data.token_chunks(Counting(), "some text " * 10, **bad)
    # a short text: every token, then the error saying how many there are
    np.testing.assert_array_equal(data.token_chunks(ByteTok(), "abcdef", num_chunks=2, chunk_len=3),
                                  [[97, 98, 99], [100, 101, 102]])
    with pytest.raises(ValueError, match="the text has 6 tokens; 2 chunks of 4 need 8"):
        data.token_chunks(ByteTok(), "abcdef", num_chunks=2, chunk_len=4)


def test_token_chunks_are_the_texts_own_tokens_at_the_cut(smol_tokenizer):
    """A prefix cut inside a word tokenizes that word differently: with the prefix holding just one
    token more than the window, the window's last token was not the text's (essays, max_chars=239:
    the 57th token)."""
    try:
        text = data.essays_text()
    except data.DataError as e:
        pytest.skip(str(e))
    full = smol_tokenizer(text[:5000], add_special_tokens=False)["input_ids"]
    enc = smol_tokenizer([text[:c] for c in range(200, 320)], add_special_tokens=False)["input_ids"]
    cuts = [(c, len(ids) - 1) for c, ids in zip(range(200, 320), enc) if ids[:-1] != full[:len(ids) - 1]]
    assert cuts  # prefixes whose second-to-last token is not the text's
    for c, k in cuts[:3]:
        got = data.token_chunks(smol_tokenizer, text, num_chunks=1, chunk_len=k, max_chars=c)
        np.testing.assert_array_equal(got[0], full[:k])


# ---- passkey -------------------------------------------------------------------------------------------
ESSAYS = "\n\n".join(f"Essay sentence number {i} is about the {'cat' if i % 2 else 'dog'}{'!' if i % 5 else '.'}"
                     for i in range(400))


@pytest.fixture
def fake_essays(monkeypatch):
    """ESSAYS as the essays text; passkey's filler cache emptied before and after."""
    monkeypatch.setattr(data, "essays_text", lambda: ESSAYS)
    passkey._filler_units.cache_clear()
    yield
    passkey._filler_units.cache_clear()


def _fixed(key="12345"):
    return sum(len(s.encode()) for s in (passkey.HEADER, passkey.QUESTION, passkey.NEEDLE.format(key=key)))


def _filler_sentences(filler):
    if filler == "synthetic":
        return [" " + s for s in passkey.SYNTHETIC] * 100
    return [" " + s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", ESSAYS))]


@pytest.mark.parametrize("filler", ["synthetic", "essays"])
def test_passkey_prompt_is_header_filler_needle_question(fake_essays, filler):
    """Byte tokens: the context is exactly the header, the filler's first whole sentences (as many as
    the length leaves room for: adding the next would exceed it), the needle at the sentence boundary
    nearest the requested depth; then the question."""
    tok = ByteTok()
    sents = _filler_sentences(filler)
    for length, depth, key in ((320, 0.0, "10000"), (400, 0.5, "54321"), (400, 0.3, "99999"), (777, 1.0, "12321"),
                               (777, 0.64, "40404")):
        p = passkey.build_prompt(tok, length=length, depth=depth, key=key, filler=filler)
        budget = length - _fixed(key)
        k = 0
        while sum(map(len, sents[:k + 1])) <= budget:
            k += 1
        units = sents[:k]
        used = sum(map(len, units))
        assert p.length == _fixed(key) + used <= length < p.length + len(sents[k])
        cum = np.cumsum([0] + [len(u) for u in units])
        at = p.needle_start - p.filler_start
        assert at in cum and abs(at - depth * used) == np.min(np.abs(cum - depth * used))
        i = int(np.nonzero(cum == at)[0][0])
        want = passkey.HEADER + "".join(units[:i]) + passkey.NEEDLE.format(key=key) + "".join(units[i:])
        assert tok.decode(p.context_ids) == want and tok.decode(p.question_ids) == passkey.QUESTION
        assert (p.filler_len, p.needle_end - p.needle_start) == (used, len(passkey.NEEDLE.format(key=key)))


def test_passkey_prompt_refuses_lengths_without_filler(fake_essays, monkeypatch):
    """A length with room for no whole filler sentence is an error naming the length that works
    (it gave a prompt with the needle right after the header at every depth), and so is a filler
    that runs out (it gave a short prompt under the requested length)."""
    tok = ByteTok()
    first = {"synthetic": len(" " + passkey.SYNTHETIC[0]), "essays": len(_filler_sentences("essays")[0])}
    assert first["essays"] > 16 and first["synthetic"] > 16
    for filler, n in first.items():
        least = _fixed() + n
        p = passkey.build_prompt(tok, length=least, depth=0.5, key="12345", filler=filler)
        assert p.filler_len == n and p.length == least
        with pytest.raises(ValueError, match=f"length={least - 1} leaves {n - 1} tokens of filler.* at least {least}"):
            passkey.build_prompt(tok, length=least - 1, depth=0.5, key="12345", filler=filler)
    with pytest.raises(ValueError, match=f"length={_fixed() + 15} leaves 15 tokens of filler; it must be at least"):
        passkey.build_prompt(tok, length=_fixed() + 15, depth=0.5, key="12345")
    total = len(" ".join(ESSAYS.split())) + 1  # every sentence with its leading space
    passkey.build_prompt(tok, length=_fixed() + total, depth=0.5, key="12345", filler="essays")
    with pytest.raises(ValueError, match=f"needs {total + 1} tokens of filler; the essays filler has only {total}"):
        passkey.build_prompt(tok, length=_fixed() + total + 1, depth=0.5, key="12345", filler="essays")


def _answer(key, variant):
    """8 bytes: the key then a stop; the key and a 6th digit; its first 4 digits; text then the key."""
    return [f" {key}. ", f" {key}7 ", f" {key[:4]}.  ", f"is{key}."][variant]


def test_passkey_counts_the_answers_of_their_own_prompts(twin, fake_essays, monkeypatch):
    """Batches of equal size (the last padded with its last prompt), each answer recorded with its
    own prompt, correct exactly when the first digits are the key, counted per filler x length x
    method; the table says correct/total."""
    _, model = twin
    batches = []

    def fake_answer_batch(model, prompts, ms, num_answer=8, bucket=256):
        batches.append([p.key for p in prompts])
        return {m.name: np.asarray([list(_answer(p.key, int(p.key) % 4 if m.name == "dense" else 0).encode())
                                    for p in prompts]) for m in ms}

    monkeypatch.setattr(passkey, "answer_batch", fake_answer_batch)
    ms = methods.parse_methods("dense,kivi-2", group_size=G, residual_length=R)
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    res = passkey.run(model, ByteTok(), ms, lengths=[300, 400], depths=depths, fillers=["synthetic", "essays"],
                      trials=2, seed=3, max_batch_tokens=1300, progress=False, model_name="twin")
    recs = res["records"]
    assert len(recs) == 2 * 2 * 5 * 2 * 2
    # 10 prompts a length: 300 -> 4 a batch (4, 4, 2 + 2 repeats); 400 -> 3 a batch (3, 3, 3, 1 + 2 repeats)
    assert [len(b) for b in batches] == [4, 4, 4, 3, 3, 3, 3] * 2
    assert batches[2][2:] == [batches[2][1]] * 2 and batches[6][1:] == [batches[6][0]] * 2
    for r in recs:
        assert r["answer"] == _answer(r["key"], int(r["key"]) % 4 if r["method"] == "dense" else 0)
        assert r["correct"] == (r["method"] == "kivi-2" or int(r["key"]) % 4 in (0, 3))
        assert r["prompt_tokens"] <= r["length"] and r["depth"] in depths
    acc = {(a["filler"], a["length"], a["method"]): a for a in res["accuracy"]}
    assert len(acc) == 8
    for (f, n, m), a in acc.items():
        keys = [r["key"] for r in recs if (r["filler"], r["length"], r["method"]) == (f, n, m)]
        assert len(keys) == len(set(keys)) == a["total"] == 10
        want = 10 if m == "kivi-2" else sum(int(k) % 4 in (0, 3) for k in keys)
        assert a["correct"] == want and a["accuracy"] == want / 10
    assert 0 < sum(a["correct"] for a in res["accuracy"] if a["method"] == "dense") < 40
    table = passkey.markdown(res)
    for f in ("synthetic", "essays"):
        for n in (300, 400):
            assert f"| {n} | {acc[(f, n, 'dense')]['correct']}/10 | 10/10 |" in table


def test_passkey_answers_equal_float64_greedy_decoding(twin):
    """KIVI-2's answers for a ragged, padded batch == float64 greedy decoding of each prompt alone:
    the context prefilled (full-precision attention; the cache quantized as its prefill stores it),
    each question token a decode step, then 8 greedy tokens, each step reading the quantized cache."""
    _, model = twin
    tok = ByteTok()
    prompts = [passkey.build_prompt(tok, length=n, depth=d, key=k)
               for n, d, k in ((300, 0.2, "31415"), (420, 0.9, "27182"), (352, 0.5, "16180"))]
    m = methods.parse_method("kivi-2", group_size=G, residual_length=R)
    got = passkey.answer_batch(model, prompts, [m])["kivi-2"]
    assert got.shape == (3, passkey.ANSWER_TOKENS)
    for row, p in zip(got, prompts):
        ref = RefLlama(model, (2, 2, "channel", "token"))
        ref.prefill(p.context_ids)
        for t in p.question_ids:
            lg = ref.step(int(t))
        want = []
        for _ in range(passkey.ANSWER_TOKENS):
            top = np.sort(lg)[-2:]
            assert top[1] - top[0] > 1e-3  # no near-tie that float32 could break the other way
            want.append(int(np.argmax(lg)))
            lg = ref.step(want[-1])
        assert row.tolist() == want


def test_cli_eval_passkey_checks_the_length_for_every_filler(twin, fake_essays, monkeypatch, capsys, tmp_path):
    """--lengths that leave room for a synthetic sentence but not the first essays sentence: a one-line
    error before anything runs (only the first filler was checked: the essays prompts came out with
    no filler at all)."""
    from kivi_jax import cli

    _, model = twin
    monkeypatch.setattr(cli, "_load", lambda source, dtype="float32": (model, ByteTok()))
    monkeypatch.setattr(passkey, "run", lambda *a, **k: pytest.fail("passkey.run ran"))
    n = _fixed() + 30  # room for " The grass is green." (20 bytes), not the essays' first sentence
    code = cli.main(["eval", "passkey", "--lengths", f"400,{n}", "--fillers", "synthetic,essays",
                     "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"kivi-jax: error: --lengths: length={n} leaves 30 tokens of filler, fewer than the "
                                 f"first essays filler sentence's {len(_filler_sentences('essays')[0])}; it must be at "
                                 f"least {_fixed() + len(_filler_sentences('essays')[0])}")


def test_passkey_run_refuses_empty_lists(twin):
    _, model = twin
    kw = dict(lengths=[300], depths=[0.5], fillers=["synthetic"], methods=methods.parse_methods("dense"),
              progress=False)
    for name in ("depths", "lengths", "fillers", "methods"):  # depths=[]: a ZeroDivisionError while batching
        with pytest.raises(ValueError, match=f"{name}=\\[\\] must be a non-empty sequence"):
            passkey.run(model, ByteTok(), **{**kw, name: []})
    for name, rep in (("lengths", [300, 300]), ("depths", [0.5, 0.5]), ("fillers", ["synthetic"] * 2)):
        with pytest.raises(ValueError, match="repeats a value; each must appear once"):  # (merged, totals doubled)
            passkey.run(model, ByteTok(), **{**kw, name: rep})


def test_perplexity_of_huge_nll_is_inf():
    from kivi_jax.eval import ppl

    assert ppl.perplexity([1.0, 3.0]) == pytest.approx(np.exp(2.0))
    assert ppl.perplexity([800.0, 700.0]) == float("inf")  # (math.exp raised OverflowError)


def test_result_file_names_tell_models_apart(tmp_path):
    """Only the packaged model's name is 'smollm2'; a path is its last part whole: any source
    starting "smollm2" was tagged 'smollm2' and Path.stem cut 'Llama-3.1-8B' to 'llama-3', so
    results of different models on one day overwrote each other. A tag's dot is no suffix: the
    file of SmolLM2-360M-Instruct.Q8_0.gguf was ppl-smollm2-360m-instruct.json, the date lost."""
    from kivi_jax.eval import report

    tags = {s: report.model_tag(s) for s in ("smollm2-135m", "SmolLM2-360M-Instruct.Q8_0.gguf", "/m/Llama-3.1-8B/",
                                             "~/m/Llama-3.2-1B", "ckpt dir/My Model.gguf")}
    assert tags == {"smollm2-135m": "smollm2", "SmolLM2-360M-Instruct.Q8_0.gguf": "smollm2-360m-instruct.q8_0",
                    "/m/Llama-3.1-8B/": "llama-3.1-8b", "~/m/Llama-3.2-1B": "llama-3.2-1b",
                    "ckpt dir/My Model.gguf": "my-model"}
    assert report.result_paths(tmp_path, "ppl", "/m/Llama-3.1-8B", "2026-01-02") == {
        ext: tmp_path / f"ppl-llama-3.1-8b-2026-01-02.{ext}" for ext in ("json", "md", "png")}
    # a bfloat16 run of the same model and day gets its own files (it overwrote the float32 run's)
    assert report.result_paths(tmp_path, "passkey", "smollm2-135m", "2026-01-02", "bfloat16")["json"] == \
        tmp_path / "passkey-smollm2-bfloat16-2026-01-02.json"
    assert report.result_paths(tmp_path, "passkey", "smollm2-135m", "2026-01-02", "float32")["json"] == \
        tmp_path / "passkey-smollm2-2026-01-02.json"
