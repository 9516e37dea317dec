"""The real SmolLM2-135M (Q4_1 GGUF, dequantized to float32) against transformers' PyTorch
LlamaForCausalLM loaded from the same file, and the cache paths against one full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
import models
from xla_levels import RUN_OPTIONS

pytestmark = pytest.mark.slow


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def _jitted(model_id):
    apply = _APPLY[model_id]
    prefill = jax.jit(lambda p, ids, c, n: apply(p, ids, c, lengths=n), compiler_options=RUN_OPTIONS)
    step = jax.jit(lambda p, ids, c: apply(p, ids, c), donate_argnums=2, compiler_options=RUN_OPTIONS)
    full = jax.jit(lambda p, ids: apply(p, ids)[0], compiler_options=RUN_OPTIONS)
    return prefill, step, full


_APPLY = {}


def _fns(model):
    key = id(model)
    if key not in _APPLY:
        _APPLY[key], params = models.functional(model)
        _APPLY[key, "params"] = params
    return _jitted(key), _APPLY[key, "params"]


def cached_logits(model, ids, prompt_lengths, num_steps, kivi=None):
    """Prefill ids[:, :T0] (row b real up to prompt_lengths[b]), then feed row b its own next
    tokens ids[b, n_b + s] one decode step at a time. Returns (prefill logits [B, T0, V],
    decode logits [B, num_steps, V], final cache)."""
    (prefill, step, _), params = _fns(model)
    n = np.asarray(prompt_lengths, np.int32)
    t0 = int(n.max())
    cache = model.init_cache(ids.shape[0], t0 + num_steps, kivi=kivi)
    lp, cache = prefill(params, jnp.asarray(ids[:, :t0]), cache, jnp.asarray(n))
    rows = np.arange(ids.shape[0])
    out = []
    for s in range(num_steps):
        tok = ids[rows, n + s][:, None]
        lg, cache = step(params, jnp.asarray(tok), cache)
        out.append(np.asarray(lg[:, 0]))
    return np.asarray(lp), np.stack(out, 1), cache


def test_logits_match_transformers(smollm2, hf_smollm2, essay_ids):
    torch = pytest.importorskip("torch")
    model, _ = smollm2
    ids = essay_ids[:, :256]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    (_, _, full), params = _fns(model)
    ours = np.asarray(full(params, jnp.asarray(ids)))
    err = rel_err(ours, ref)
    print(f"\nSmolLM2 float32 logits over 256 tokens vs transformers: rel err {err:.3g}, "
          f"max abs {np.max(np.abs(ours - ref)):.3g}, top-1 agree {np.mean(ours.argmax(-1) == ref.argmax(-1)):.4f}")
    assert err <= 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_32_tokens_match_transformers(smollm2, hf_smollm2):
    torch = pytest.importorskip("torch")
    model, tok = smollm2
    prompt = tok("Once upon a time, there was a little girl who")["input_ids"]
    # transformers' own cached greedy decoding (its DynamicCache), no EOS stopping
    import inspect

    # transformers renamed past_key_values to cache (5.2x); use whichever this version has
    name = "cache" if "cache" in inspect.signature(hf_smollm2.forward).parameters else "past_key_values"
    ref, past, x = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            out = hf_smollm2(x, use_cache=True, **{name: past})
            past = getattr(out, name)
            nxt = int(out.logits[0, -1].argmax())
            ref.append(nxt)
            x = torch.tensor([[nxt]])
    (prefill, step, _), params = _fns(model)
    cache = model.init_cache(1, len(prompt) + 32)
    lg, cache = prefill(params, jnp.asarray([prompt], jnp.int32), cache, jnp.asarray([len(prompt)], jnp.int32))
    ours = [int(lg[0, -1].argmax())]
    for _ in range(31):
        lg, cache = step(params, jnp.asarray([[ours[-1]]], jnp.int32), cache)
        ours.append(int(lg[0, 0].argmax()))
    print("\ngreedy:", repr(tok.decode(ours)))
    assert ours == ref
    assert tok.decode(ours).startswith(" loved to play with her toys.")  # EVAL-DATA.md's sanity line


def test_prefill_then_decode_equals_full_forward_ragged(smollm2, essay_ids):
    """Two rows, prompts of 256 and 200 tokens (right-padded), then 32 decode steps each: the
    logits equal each row's own full forward pass (positions come from per-row lengths)."""
    model, _ = smollm2
    ids = np.concatenate([essay_ids, np.roll(essay_ids, -7, axis=1)], 0)  # [2, 288]
    n = np.array([256, 200], np.int32)
    lp, ld, cache = cached_logits(model, ids, n, 32)
    assert np.array_equal(np.asarray(cache.lengths), n + 32)
    (_, _, full), params = _fns(model)
    errs = []
    for b in range(2):
        ref = np.asarray(full(params, jnp.asarray(ids[b:b + 1, : n[b] + 32])))[0]
        errs.append(rel_err(lp[b, : n[b]], ref[: n[b]]))
        errs.append(rel_err(ld[b], ref[n[b]:]))
    print(f"\nprefill/decode vs full forward rel errs {['%.2g' % e for e in errs]}")
    assert max(errs) <= 1e-4


def _kl(p_logits, q_logits):
    lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def _nll(logits, targets):
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    return -np.asarray(jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1))[..., 0]


def test_kivi_cache_runs_and_stays_close_to_dense(smollm2, essay_ids):
    """256-token prompt (keys and values partly quantized with R=128), 32 decode steps."""
    model, _ = smollm2
    n = np.array([256], np.int32)
    lp_d, ld_d, _ = cached_logits(model, essay_ids, n, 32)
    stats = {}
    for bits in (2, 4):
        kivi = kivi_jax.KIVIConfig(k_bits=bits, v_bits=bits, group_size=32, residual_length=128)
        lp_q, ld_q, cache = cached_logits(model, essay_ids, n, 32, kivi=kivi)
        assert isinstance(cache.layers, kivi_jax.KIVICache)
        assert np.all(np.isfinite(ld_q))
        # prompt attention is full precision whatever the cache: prefill logits are the dense ones
        np.testing.assert_array_equal(lp_q, lp_d)
        kl = _kl(ld_d, ld_q)
        stats[bits] = dict(
            max_abs=float(np.max(np.abs(ld_q - ld_d))), rel=rel_err(ld_q, ld_d), mean_kl=float(kl.mean()),
            top1=float(np.mean(ld_q.argmax(-1) == ld_d.argmax(-1))),
            ppl=float(np.exp(_nll(ld_q[:, :-1], essay_ids[:, 257:288]).mean())))
    ppl_dense = float(np.exp(_nll(ld_d[:, :-1], essay_ids[:, 257:288]).mean()))
    print(f"\nKIVI vs dense decode logits (32 steps after 256 prompt tokens), dense ppl {ppl_dense:.2f}:")
    for bits, s in stats.items():
        print(f"  {bits}-bit: max |diff| {s['max_abs']:.3g}, rel {s['rel']:.3g}, mean KL {s['mean_kl']:.3g}, "
              f"top-1 agree {s['top1']:.3f}, ppl {s['ppl']:.2f}")
    assert stats[2]["mean_kl"] > 1e-4  # the 2-bit cache really is quantized
    assert stats[4]["mean_kl"] < stats[2]["mean_kl"]  # more bits, closer to dense
    assert stats[2]["mean_kl"] < 0.5 and stats[2]["top1"] >= 0.6
    assert stats[4]["mean_kl"] < 0.05 and stats[4]["top1"] >= 0.9
    assert stats[2]["ppl"] < 2.0 * ppl_dense


def test_load_and_generate_without_torch(smollm2, tmp_path):
    """A fresh interpreter where importing torch fails: load_model('smollm2-135m') (weights and
    tokenizer) and a prefill + decode step run, giving the logits of the in-session model."""
    import os
    import pathlib
    import subprocess
    import sys
    import textwrap

    model, tok = smollm2
    text = "The capital of France is"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        sys.path.insert(0, {str(pathlib.Path(models.__file__).parents[1])!r})
        import numpy as np, jax.numpy as jnp, models
        model, tok = models.load_model("smollm2-135m")
        ids = np.asarray([tok({text!r})["input_ids"]], np.int32)
        cache = model.init_cache(1, ids.shape[1] + 1)
        lp, cache = model(ids, cache)
        ld, cache = model(jnp.argmax(lp[:, -1:], -1).astype(jnp.int32), cache)
        np.save({str(tmp_path / "out.npy")!r}, np.concatenate([np.asarray(lp), np.asarray(ld)], 1))
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "out.npy")
    ids = np.asarray([tok(text)["input_ids"]], np.int32)
    (_, _, full), params = _fns(model)
    nxt = np.argmax(np.asarray(full(params, jnp.asarray(ids)))[:, -1:], -1).astype(np.int32)
    want = np.asarray(full(params, jnp.asarray(np.concatenate([ids, nxt], 1))))
    assert rel_err(got, want) <= 1e-5


def test_hf_directory_of_the_real_model(smollm2, hf_smollm2, tmp_path, essay_ids):
    """SmolLM2 as a Hugging Face directory (transformers' state dict in model.safetensors, its
    config.json, tokenizer files) loads back with the same tokenizer and the logits of the GGUF
    path. (A GGUF-loaded transformers model refuses save_pretrained, so the files are written
    with safetensors directly.)"""
    import json

    from safetensors.torch import save_file

    model, tok = smollm2
    sd = {k: v.contiguous() for k, v in hf_smollm2.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_smollm2.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(tmp_path)
    from_dir, tok2 = models.load_model(tmp_path)
    assert from_dir.config.num_layers == 30 and from_dir.config.tie_word_embeddings
    text = "KIVI stores keys per-channel and values per-token: 2 bits, 32 numbers a group."
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    ids = essay_ids[:, :64]
    (_, _, full), params = _fns(model)
    a = np.asarray(full(params, jnp.asarray(ids)))
    apply2, params2 = models.functional(from_dir)
    b = np.asarray(jax.jit(lambda p, x: apply2(p, x)[0])(params2, jnp.asarray(ids)))
    assert rel_err(b, a) <= 1e-5
