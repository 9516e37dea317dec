"""kivi_jax.eval: teacher-forced perplexity vs one full forward pass, the per-token-keys ablation
cache vs KIVICache, the passkey prompt builder, and the result tables and plots (CPU, fast:
a tiny random Llama with SmolLM2's vocabulary; the real tokenizer from the packaged GGUF)."""

import dataclasses
import pathlib
import sys
import warnings

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # tests/models would otherwise shadow the models package (see tests/models/conftest.py)
    sys.path.append(_ROOT)
if "models" in sys.modules and getattr(sys.modules["models"], "__file__", None) is None:
    del sys.modules["models"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kivi_jax  # noqa: E402
from kivi_jax.eval import ablation, methods, passkey, plot, ppl  # noqa: E402

VOCAB = 49152  # SmolLM2's, so the real tokenizer's ids fit the tiny model


@pytest.fixture(scope="module")
def tiny():
    import models

    cfg = models.ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=True, max_position_embeddings=2048)
    return models.init_random(cfg, jax.random.key(1), init_std=0.3)  # a large init: peaky, input-dependent logits


def _ids(n, b=2, seed=0):
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, n), 0, VOCAB), np.int32)


# ---- perplexity ------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill_len", [1, 5])
def test_teacher_forced_dense_equals_full_forward(tiny, prefill_len):
    """Dense cache, token by token == one causal forward pass; and each NLL is -log softmax of the
    logits at the true next token (float64 NumPy)."""
    ids = _ids(48)
    got = ppl.teacher_forced_nll(tiny, ids, methods.parse_method("dense"), prefill_len=prefill_len, chunk=64)
    ref = ppl.full_forward_nll(tiny, ids)
    assert got.shape == ref.shape == (2, 47)
    assert np.max(np.abs(got - ref)) < 2e-5
    assert abs(ppl.perplexity(got) / ppl.perplexity(ref) - 1) < 1e-5
    assert ppl.perplexity(ref) > 2.0  # a real distribution, not a degenerate one
    logits, _ = tiny(jnp.asarray(ids))
    lg = np.asarray(logits, np.float64)[:, :-1]
    mx = lg.max(-1, keepdims=True)
    lse = np.log(np.sum(np.exp(lg - mx), -1)) + mx[..., 0]
    np.testing.assert_allclose(got, lse - np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0], atol=2e-5)


def test_kivi_ppl_equals_dense_until_the_residual_fills(tiny):
    """Nothing is quantized while fewer than R tokens are held: KIVI == dense; after, it differs."""
    ids = _ids(64)
    m = methods.parse_method("kivi-2", group_size=32, residual_length=64)
    dense = ppl.teacher_forced_nll(tiny, ids, prefill_len=1, chunk=64)
    kivi = ppl.teacher_forced_nll(tiny, ids, m, prefill_len=1, chunk=64)
    np.testing.assert_allclose(kivi[:, :62], dense[:, :62], atol=2e-5)  # token 63's step holds 63 < R tokens
    short = methods.parse_method("kivi-2", group_size=32, residual_length=32)
    kq = ppl.teacher_forced_nll(tiny, ids, short, prefill_len=1, chunk=64)
    assert np.max(np.abs(kq[:, 40:] - dense[:, 40:])) > 1e-3


def test_teacher_forced_validation(tiny):
    with pytest.raises(ValueError, match="prefill_len"):
        ppl.teacher_forced_nll(tiny, _ids(8), prefill_len=8)
    with pytest.raises(ValueError, match="ids must be"):
        ppl.teacher_forced_nll(tiny, np.zeros((8,), np.int32))
    # ids outside the vocabulary: NaN (>= V) or a wrapped id (< 0) from the jitted calls, unchecked
    v = tiny.config.vocab_size
    for bad in (v, -3):
        ids = _ids(8).copy()
        ids[1, 4] = bad
        with pytest.raises(ValueError, match=rf"ids hold 1 token id\(s\) outside \[0, vocab_size={v}\), e\.g\. "
                                             rf"\[{bad}\]"):
            ppl.teacher_forced_nll(tiny, ids)
    # NumPy integers are integers
    np.testing.assert_array_equal(ppl.teacher_forced_nll(tiny, _ids(8), prefill_len=np.int64(3)),
                                  ppl.teacher_forced_nll(tiny, _ids(8), prefill_len=3))


def test_ppl_table_quotes_the_reference_only_for_its_settings():
    """The transformers reference column (G = 32, R = 128, float32, one prompt token) stays "-" for
    a row run any other way: extensions under the same method name, other G / R, a prefill."""
    def result(dtype="float32", prefill=1, **kivi):
        kv = {**dict(k_bits=2, v_bits=2, group_size=32, residual_length=128, sink_tokens=0, rotate="none",
                     key_group_size=None, layout="auto", key_axis="channel", value_axis="token"), **kivi}
        ms = [dict(name="dense", label="dense", cache="dense"),
              dict(name="kivi-2", label="KIVI-2", cache="KIVICache", **kv)]
        res = [dict(method=m["name"], text="essays", ppl=30.0, ppl_first_window=30.0) for m in ms]
        return dict(model="m", results=res, reference=ppl.REFERENCE,
                    settings=dict(texts=["essays"], windows_per_text=1, chunk_len=1024, prefill_len=prefill,
                                  dtype=dtype, methods=ms, group_size=32, residual_length=128))

    def reference_cells(r):
        rows = [line.split("|") for line in ppl.markdown(r).splitlines() if line.startswith("| dense")
                or line.startswith("| KIVI-2")]
        return [row[3].strip() for row in rows]

    assert reference_cells(result()) == ["25.68", "30.70"]
    for other in (result(sink_tokens=4, rotate="kv"), result(group_size=16), result(residual_length=64)):
        assert reference_cells(other) == ["25.68", "-"]
    assert reference_cells(result(prefill=900)) == ["-", "-"]
    assert reference_cells(result(dtype="bfloat16")) == ["-", "-"]


# ---- the ablation cache ----------------------------------------------------------------------------
def _kv(b, h, t, d, seed, outlier_channels=(3, 17, 40)):
    """Random k, v [B, H, T, D]; keys have a few channels of large magnitude, as real keys do."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    k = jax.random.normal(k1, (b, h, t, d), jnp.float32)
    k = k.at[..., list(outlier_channels)].add(jnp.asarray([15.0, -12.0, 9.0][:len(outlier_channels)]))
    v = jax.random.normal(k2, (b, h, t, d), jnp.float32)
    return k, v


def _fill(cache, k, v, prompt_lengths, steps):
    """Prefill a ragged prompt (row b: its first prompt_lengths[b] tokens), then append row b
    its own next tokens one at a time."""
    t0 = int(max(prompt_lengths))
    n = jnp.asarray(prompt_lengths, jnp.int32)
    cache = cache.prefill(k[:, :, :t0], v[:, :, :t0], n)
    rows = jnp.arange(k.shape[0])

    def step(c, s):
        idx = n + s
        return c.append(k[rows, :, idx][:, :, None], v[rows, :, idx][:, :, None]), None

    return jax.lax.scan(step, cache, jnp.arange(steps))[0]


@pytest.mark.parametrize("bits", [2])
def test_sim_cache_with_kivi_axes_equals_kivi_cache(bits):
    """SimQuantCache(keys per-channel, values per-token) materializes exactly KIVICache's K, V:
    the ablation's difference is the axis alone."""
    cfg = kivi_jax.KIVIConfig(k_bits=bits, v_bits=bits, group_size=16, residual_length=32)
    b, h, d, cap = 3, 2, 32, 160
    k, v = _kv(b, h, cap, d, seed=bits)
    lens = [5, 70, 33]
    kc = kivi_jax.KIVICache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=cap, dtype=jnp.float32)
    sc = ablation.SimQuantCache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=cap, dtype=jnp.float32,
                                     key_axis="channel", value_axis="token")
    step = jax.jit(lambda c, k, v, n: _fill(c, k, v, n, 50), static_argnums=3)
    kc, sc = step(kc, k, v, tuple(lens)), step(sc, k, v, tuple(lens))
    np.testing.assert_array_equal(np.asarray(kc.lengths), np.asarray(sc.lengths))
    kk, kv_ = kc.materialize()
    sk, sv = sc.materialize()
    for row, n in enumerate(np.asarray(kc.lengths)):
        np.testing.assert_array_equal(np.asarray(sk[row, :, :n]), np.asarray(kk[row, :, :n]))
        np.testing.assert_array_equal(np.asarray(sv[row, :, :n]), np.asarray(kv_[row, :, :n]))
    # and something was quantized: KIVI-2's K differs from the input before the residual
    assert float(jnp.max(jnp.abs(sk[1, :, :64] - k[1, :, :64]))) > 1e-3


def test_sim_cache_attends_through_its_reference_on_a_gpu(monkeypatch):
    """On a GPU impl="auto" runs the kernels, which take KIVICache and DenseCache only: a
    SimQuantCache (the eval's ablations) attends through the reference there (run117 raised a
    TypeError inside the model's layer scan), equal to its dense attention over what it
    materializes; impl="pallas" names the cache it cannot take."""
    from kivi_jax import attention

    cfg = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    b, h, d, t = 2, 2, 32, 80
    k, v = _kv(b, h, t, d, seed=11)
    c = ablation.SimQuantCache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=t, dtype=jnp.float32,
                                    key_axis="token", value_axis="token").prefill(k, v, lengths=jnp.array([80, 45]))
    q = jax.random.normal(jax.random.key(12), (b, 2 * h, 1, d), jnp.float32)
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    got = np.asarray(kivi_jax.decode_attention(q, c), np.float64)
    # float64 NumPy attention over the materialized K, V, each row to its length, GQA 2
    kk, vv = (np.asarray(x, np.float64) for x in c.materialize())
    qq = np.asarray(q, np.float64)[:, :, 0]
    for row, n in enumerate([80, 45]):
        for head in range(2 * h):
            s = kk[row, head // 2, :n] @ qq[row, head] / np.sqrt(d)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[row, head, 0], p @ vv[row, head // 2, :n] / p.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl='pallas'.*SimQuantCache"):
        kivi_jax.decode_attention(q, c, impl="pallas")


def _distinct_per_group(x, axis, g):
    """Max number of distinct values in any group of g consecutive elements along axis."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    x = x.reshape(-1, x.shape[-1] // g, g)
    return max(len(np.unique(grp)) for grp in x.reshape(-1, g))


def test_per_token_keys_quantize_along_channels_and_lose_more():
    cfg = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=16, residual_length=32)
    b, h, t, d = 1, 2, 96, 64
    k, v = _kv(b, h, t, d, seed=7)
    out = {}
    for axis in ("channel", "token"):
        c = ablation.SimQuantCache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=t, dtype=jnp.float32,
                                        key_axis=axis, value_axis="token")
        c = c.prefill(k, v)  # keys [0, 96) quantized (96 = 3 R), values [0, 64)
        out[axis] = c
    kc, _ = out["channel"].materialize()
    kt, _ = out["token"].materialize()
    # per-channel: groups of 16 tokens of one channel have <= 4 values; per-token: 16 channels of one token
    assert _distinct_per_group(kc[0, :, :96], axis=1, g=16) <= 4
    assert _distinct_per_group(kt[0, :, :96], axis=2, g=16) <= 4
    assert _distinct_per_group(kt[0, :, :96], axis=1, g=16) > 4
    assert not np.array_equal(np.asarray(kc), np.asarray(kt))
    # an outlier channel sets the scale of every per-token group it falls in; per-channel groups
    # take the offset out with their min
    err_c = float(jnp.mean((kc[..., :96, :] - k) ** 2))
    err_t = float(jnp.mean((kt[..., :96, :] - k) ** 2))
    assert err_t > 5 * err_c, (err_t, err_c)
    q = jax.random.normal(jax.random.key(8), (d,))
    score_err = {a: float(jnp.sqrt(jnp.mean(((kk[..., :96, :] - k) @ q) ** 2))) for a, kk in (("c", kc), ("t", kt))}
    assert score_err["t"] > 2 * score_err["c"], score_err
    # values are per-token in both, and identical
    np.testing.assert_array_equal(np.asarray(out["channel"].v), np.asarray(out["token"].v))


def test_sim_cache_overflow_and_validation():
    cfg = kivi_jax.KIVIConfig(group_size=16, residual_length=32)
    c = ablation.SimQuantCache.init(cfg, batch=1, num_kv_heads=1, head_dim=32, max_length=2)
    one = jnp.ones((1, 1, 1, 32))
    c = c.append(one, one).append(one, one).append(one, one)
    assert int(c.lengths[0]) == 2 and bool(c.overflow[0])
    with pytest.raises(ValueError, match="key_axis='rows'"):
        ablation.SimQuantCache.init(cfg, batch=1, num_kv_heads=1, head_dim=32, max_length=8, key_axis="rows")
    with pytest.raises(ValueError, match="plain KIVI settings only"):
        ablation.SimQuantCache.init(kivi_jax.KIVIConfig(group_size=16, residual_length=32, sink_tokens=4), batch=1,
                                    num_kv_heads=1, head_dim=32, max_length=8)


def test_methods_parse():
    assert methods.parse_method("dense").kivi is None
    m = methods.parse_method("kivi-2/4", group_size=16, residual_length=64)
    assert (m.kivi.k_bits, m.kivi.v_bits, m.kivi.group_size, m.kivi.residual_length) == (2, 4, 16, 64)
    assert not m.simulated and m.label == "KIVI-K2/V4"
    a = methods.parse_method("kivi-2-ktoken")
    assert a.simulated and a.key_axis == "token" and a.label == "KIVI-2, K per-token"
    assert methods.parse_method("kivi-2-sim").label == "KIVI-2 (sim)"
    e = dataclasses.replace(m, kivi=dataclasses.replace(m.kivi, sink_tokens=4, rotate="kv", key_group_size=32))
    assert e.label == "KIVI-K2/V4 (4 sinks, rotate kv, key groups 32)"  # run118's long-context rows all said KIVI-2
    assert [x.name for x in methods.parse_methods("dense, kivi-2,dense")] == ["dense", "kivi-2"]
    for bad in ("kivi", "kivi-3", "fp8"):
        with pytest.raises(ValueError):
            methods.parse_method(bad)


# ---- passkey -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("filler", ["synthetic", "essays"])
@pytest.mark.parametrize("length", [256, 1024])
def test_passkey_prompt_puts_the_key_at_the_depth(smol_tokenizer, filler, length):
    if filler == "essays":
        from kivi_jax.eval import data

        try:
            data.essays_text()
        except data.DataError as e:
            pytest.skip(str(e))
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        p = passkey.build_prompt(smol_tokenizer, length=length, depth=depth, key="48213", filler=filler)
        assert p.length <= length
        assert p.length >= length - 60  # whole sentences only: a sentence or so short at most
        needle = smol_tokenizer.decode(p.context_ids[p.needle_start:p.needle_end].tolist())
        assert needle == passkey.NEEDLE.format(key="48213")
        assert "48213" not in smol_tokenizer.decode(p.context_ids[:p.needle_start].tolist())
        assert "48213" not in smol_tokenizer.decode(p.context_ids[p.needle_end:].tolist())
        assert p.filler_len == len(p.context_ids) - p.filler_start - (p.needle_end - p.needle_start)
        assert abs(p.actual_depth - depth) <= 50 / p.filler_len, (depth, p.actual_depth)
        full = smol_tokenizer.decode(np.concatenate([p.context_ids, p.question_ids]).tolist())
        assert full.startswith(passkey.HEADER) and full.endswith(passkey.QUESTION)


def test_passkey_answer_check():
    assert passkey.answer_correct(" 48213. Remember", "48213")
    assert not passkey.answer_correct(" 48203.", "48213")
    assert not passkey.answer_correct(" 482130", "48213")
    assert not passkey.answer_correct(" the pass key", "48213")


def test_passkey_restored_cache_equals_the_models_own_prefill(tiny, smol_tokenizer):
    """The shared dense prefill, re-stored with the method's prefill, is the cache the model's own
    prefill builds."""
    from flax import nnx

    p = [passkey.build_prompt(smol_tokenizer, length=200, depth=d, key="31415") for d in (0.2, 0.8)]
    n = max(len(x.context_ids) for x in p)
    ids = np.zeros((2, n), np.int32)
    for i, x in enumerate(p):
        ids[i, :len(x.context_ids)] = x.context_ids
    lens = jnp.asarray([len(x.context_ids) for x in p], jnp.int32)
    gd, st = nnx.split(tiny)
    m = methods.parse_method("kivi-2", group_size=32, residual_length=64)
    dense = passkey._prefill_context(gd, st, jnp.asarray(ids), lens, methods.init_cache(tiny, methods.Method("dense"), 2, 256))
    restored = passkey._restore(dense, methods.init_cache(tiny, m, 2, 256), lens, num_tokens=n)
    direct = passkey._prefill_context(gd, st, jnp.asarray(ids), lens, methods.init_cache(tiny, m, 2, 256))
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-6)


def test_passkey_and_ppl_runs_tables_and_plots(tiny, smol_tokenizer, tmp_path):
    from kivi_jax.eval import data

    try:
        data.essays_text()
    except data.DataError as e:
        pytest.skip(str(e))
    ms = methods.parse_methods("dense,kivi-2,kivi-2-ktoken", group_size=32, residual_length=32)
    res = ppl.run(tiny, smol_tokenizer, ms, texts=("essays",), num_chunks=2, chunk_len=48, prefill_len=1, bin_size=16,
                  progress=False, model_name="tiny")
    by = {r["method"]: r for r in res["results"]}
    assert by["dense"]["tokens_scored"] == 2 * 47 and by["dense"]["vs_dense"] == 0.0
    ref = ppl.perplexity(ppl.full_forward_nll(tiny, data.token_chunks(smol_tokenizer, data.essays_text(), num_chunks=2,
                                                                      chunk_len=48)))
    assert abs(by["dense"]["ppl"] / ref - 1) < 1e-5
    table = ppl.markdown(res)
    assert "| KIVI-2, K per-token |" in table and "essays (2 x 48 tokens)" in table
    assert plot.plot_ppl(res, tmp_path / "ppl.png").stat().st_size > 10_000
    # one KIVI setting alone (as run120/121 ran): its right panel says why it is empty, no warning
    solo = dict(res, results=[r for r in res["results"] if r["method"] == "kivi-2"],
                settings=dict(res["settings"], methods=[m for m in res["settings"]["methods"] if m["name"] == "kivi-2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot.plot_ppl(solo, tmp_path / "solo.png").stat().st_size > 10_000

    pk = passkey.run(tiny, smol_tokenizer, ms[:2], lengths=[np.int64(160)], depths=[0.3, 0.7], fillers=["synthetic"],
                     trials=np.int64(1), progress=False, model_name="tiny")  # (NumPy integers are integers)
    assert len(pk["records"]) == 4 and {a["total"] for a in pk["accuracy"]} == {2}
    assert all(set(r) >= {"key", "answer", "correct", "depth"} for r in pk["records"])
    assert "| 160 |" in passkey.markdown(pk)
    assert plot.plot_passkey(pk, tmp_path / "pk.png").stat().st_size > 10_000


def test_result_metadata_names_the_commit_that_ran(monkeypatch):
    """report.metadata(): git's HEAD and whether tracked files differ from it; KIVI_COMMIT, where
    set, names the tree instead (on the device the copy's .git is another commit's) and the dirty
    flag is then unknown (None), not git's answer about the wrong commit."""
    from kivi_jax.eval import report

    monkeypatch.delenv("KIVI_COMMIT", raising=False)
    head = report._git("rev-parse", "HEAD")
    got = report.metadata()
    assert got["commit"] == head and isinstance(got["dirty_tracked_files"], bool)
    monkeypatch.setenv("KIVI_COMMIT", "abc1234")
    got = report.metadata()
    assert got["commit"] == "abc1234" and got["dirty_tracked_files"] is None
