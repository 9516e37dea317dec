"""Audit of orbax checkpoints (models/checkpoint.py) and the kivi-jax command (kivi_jax/cli.py).

Checkpoints: a restored model continues decoding a cache (dense, KIVI in the tokens and the
Mosaic layout, bf16 and float32) with bit-identical logits, the cache itself survives an orbax
round trip, and nothing at the path is lost by an overwrite that is refused or fails (the
tokenizer's save included).
CLI: flag validation not covered by tests/test_cli.py, the errors for a checkpoint without a
tokenizer or a corrupt one given as --model, exit codes, and the printed timing and memory
figures recomputed from the clock readings and the cache's own arrays; `convert`, and generate,
chat and eval on a checkpoint give what they give on the model it was converted from.
"""

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import sys
import types

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # tests/models would otherwise shadow the models package (see tests/models/conftest.py)
    sys.path.append(_ROOT)
if "models" in sys.modules and getattr(sys.modules["models"], "__file__", None) is None:
    del sys.modules["models"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kivi_jax as kj  # noqa: E402
import models  # noqa: E402
from kivi_jax import cli  # noqa: E402


def _bits(tree):
    """keystr -> (dtype, shape, raw bytes) of every leaf."""
    return {jax.tree_util.keystr(k): (np.asarray(v).dtype, np.shape(v), np.asarray(v).tobytes())
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _tiny(head_dim=16, model_type="llama", **kw):
    return models.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                              num_kv_heads=1, head_dim=head_dim, model_type=model_type, **kw)


# ---- checkpoints: a restored model and cache continue decoding exactly -------------------------
CACHES = {  # name -> (head_dim, KIVIConfig or None, prompt length: past R so quantized blocks exist)
    "dense": (32, None, 45),
    "tokens": (32, kj.KIVIConfig(layout="tokens", group_size=16, residual_length=32), 45),
    "mosaic": (128, kj.KIVIConfig(layout="mosaic"), 140),
}


@pytest.mark.parametrize("kind, dtype", [("dense", jnp.float32), ("tokens", jnp.bfloat16), ("tokens", jnp.float32),
                                         ("mosaic", jnp.bfloat16)])
def test_restored_model_and_cache_continue_decoding_bit_exactly(tmp_path, kind, dtype):
    import orbax.checkpoint as ocp
    from flax import nnx

    head_dim, kivi, T = CACHES[kind]
    cfg = _tiny(head_dim=head_dim)
    model = models.init_random(cfg, jax.random.key(11), dtype=dtype)
    apply, params = models.functional(model)
    prefill = jax.jit(lambda p, ids, c, n: apply(p, ids, c, lengths=n))
    step = jax.jit(lambda p, tok, c: apply(p, tok, c))

    lens = jnp.array([T, T - 9], jnp.int32)  # ragged rows
    ids = jax.random.randint(jax.random.key(12), (2, T), 0, cfg.vocab_size)
    logits, cache = prefill(params, ids, model.init_cache(batch_size=2, max_length=192, kivi=kivi), lens)
    tok = jnp.argmax(logits[jnp.arange(2), lens - 1], -1)
    for _ in range(2):  # real decode steps before saving
        logits, cache = step(params, tok[:, None], cache)
        tok = jnp.argmax(logits[:, -1], -1)
    layers = type(cache.layers).__name__
    assert layers == {"dense": "DenseCache", "tokens": "KIVICache", "mosaic": "MosaicKIVICache"}[kind]
    assert np.asarray(cache.lengths).tolist() == [T + 2, T - 7]

    path = models.save_checkpoint(model, tmp_path / "model")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "cache", cache)
    ckptr.wait_until_finished()

    back = models.load_checkpoint(path)
    assert type(back) is type(model) and back.config == cfg and back.dtype == jnp.dtype(dtype)
    assert _bits(models.params_of(back)) == _bits(models.params_of(model))
    back_graph, back_params = nnx.split(back)
    assert back_graph == nnx.graphdef(model)  # so the jitted step of the original runs the restored model
    cache2 = ckptr.restore(tmp_path / "cache", jax.eval_shape(lambda: cache))
    assert jax.tree.structure(cache2) == jax.tree.structure(cache)  # static config and capacity included
    assert _bits(cache2) == _bits(cache)
    if kivi is not None:
        assert cache2.layers.config == cache.layers.config and cache2.layers.config.layout == kind

    a, b, tok_a, tok_b = cache, cache2, tok, tok
    for _ in range(3):
        la, a = step(params, tok_a[:, None], a)
        lb, b = step(back_params, tok_b[:, None], b)
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
        tok_a, tok_b = jnp.argmax(la[:, -1], -1), jnp.argmax(lb[:, -1], -1)
        np.testing.assert_array_equal(np.asarray(tok_a), np.asarray(tok_b))
    assert _bits(a) == _bits(b)
    assert np.asarray(b.lengths).tolist() == [T + 5, T - 4] and not np.asarray(b.overflow).any()


def test_every_config_field_round_trips(tmp_path):
    """Non-default values in every ModelConfig field (llama3 rope, tied embeddings, token ids)."""
    import dataclasses

    cfg = _tiny(rope_theta=123456.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.5,
                rope_high_freq_factor=3.0, rope_original_max_position_embeddings=512, rms_norm_eps=3e-5,
                tie_word_embeddings=True, max_position_embeddings=777, bos_token_id=4, eos_token_id=(5, 6))
    defaults = _tiny()
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    assert changed == {f.name for f in dataclasses.fields(cfg)} - {
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "model_type", "sliding_window"}  # (sliding_window: a Mistral's, round-tripped in test_models_checkpoint)
    model = models.init_random(cfg, jax.random.key(2), dtype=jnp.bfloat16)
    back = models.load_checkpoint(models.save_checkpoint(model, tmp_path / "m"))
    assert type(back) is models.Llama and back.config == cfg
    assert {f.name: getattr(back.config, f.name) for f in dataclasses.fields(cfg)} == dataclasses.asdict(cfg)
    assert _bits(models.params_of(back)) == _bits(models.params_of(model))
    ids = np.arange(10, dtype=np.int32).reshape(1, 10)
    np.testing.assert_array_equal(np.asarray(model(ids)[0]), np.asarray(back(ids)[0]))


# ---- checkpoints: errors, and nothing lost -------------------------------------------------------
@pytest.fixture(scope="module")
def two_models():
    cfg = _tiny()
    return (models.init_random(cfg, jax.random.key(0), dtype=jnp.float32),
            models.init_random(cfg, jax.random.key(1), dtype=jnp.float32))


def test_overwrite_never_replaces_what_is_not_a_checkpoint(tmp_path, two_models):
    """overwrite=True deleted whatever was at the path (orbax's force=True is an rmtree): a
    directory of the user's files, a plain file."""
    model = two_models[0]
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    f = tmp_path / "file.bin"
    f.write_bytes(b"\x00data")
    for p, what in ((d, "a directory"), (f, "a file")):
        with pytest.raises(FileExistsError) as e:
            models.save_checkpoint(model, p, overwrite=True)
        assert f"path={str(p)!r} exists and is not a kivi-jax model checkpoint ({what})" in str(e.value)
        assert "overwrite=True replaces only" in str(e.value)
    assert sorted(os.listdir(d)) == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"
    assert f.read_bytes() == b"\x00data"
    assert sorted(os.listdir(tmp_path)) == ["file.bin", "mine"]


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, two_models, monkeypatch):
    """The write of the new checkpoint fails (disk full, say): the old one is still there, loads,
    and no half-written directory is left beside it."""
    import orbax.checkpoint as ocp

    old, new = two_models
    path = models.save_checkpoint(old, tmp_path / "ck")

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ocp.CompositeCheckpointHandler, "save", fail)
        with pytest.raises(OSError, match="No space left"):
            models.save_checkpoint(new, path, overwrite=True)
        with pytest.raises(OSError, match="No space left"):  # a new path: nothing left behind either
            models.save_checkpoint(new, tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert _bits(models.params_of(models.load_checkpoint(path))) == _bits(models.params_of(old))
    # and an overwrite that succeeds replaces it, leaving nothing else
    assert models.save_checkpoint(new, path, overwrite=True) == path
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert _bits(models.params_of(models.load_checkpoint(path))) == _bits(models.params_of(new))
    with pytest.raises(FileExistsError, match=f"checkpoint path={re.escape(repr(str(path)))} exists; pass "
                                              "overwrite=True"):
        models.save_checkpoint(old, path)
    assert _bits(models.params_of(models.load_checkpoint(path))) == _bits(models.params_of(new))


def _edit_meta(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "meta" / "metadata"
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))
    return dst


def test_meta_that_does_not_fit_is_a_named_error(tmp_path, two_models):
    """A checkpoint whose recorded config, class, version or format is not what its arrays are
    or this code reads: a ValueError naming the field and its value."""
    src = models.save_checkpoint(two_models[0], tmp_path / "src")

    def wider(m):
        m["config"]["hidden_size"] = 128

    def cls(m):
        m["class"] = "Mistral"

    def version(m):
        m["version"] = 2

    def fmt(m):
        m["format"] = "something-else"

    cases = [(wider, "is corrupt or does not match its config"),
             (cls, "checkpoint class='Mistral' does not match its config model_type='llama'"),
             (version, "checkpoint version=2; this code reads version 1"),
             (fmt, "is not a kivi-jax model checkpoint (meta format='something-else'; expected 'kivi-jax-model')")]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ValueError) as e:
            models.load_checkpoint(_edit_meta(src, tmp_path / f"c{i}", edit))
        assert message in str(e.value), (edit.__name__, str(e.value))
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is not a kivi-jax model checkpoint"):
        models.load_checkpoint(f)
    with pytest.raises(TypeError, match="model must be a models.Llama / models.Mistral; got dict"):
        models.save_checkpoint(models.params_of(two_models[0]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- the command line -----------------------------------------------------------------------------
def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(result, *fragments):
    code, out, err = result
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kivi-jax: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# flag values tests/test_cli.py does not try; each is refused by the parser, before any model loads
@pytest.mark.parametrize("argv, fragment", [
    (["generate", "hi", "--max-new-tokens", "-3"], "argument --max-new-tokens: -3 must be >= 1"),
    (["generate", "hi", "--max-new-tokens", "1.5"], "argument --max-new-tokens: '1.5' is not an integer"),
    (["generate", "hi", "--residual-length", "0"], "argument --residual-length: 0 must be >= 1"),
    (["generate", "hi", "--residual-length", "abc"], "argument --residual-length: 'abc' is not an integer"),
    (["generate", "hi", "--group-size", "8"], "argument --group-size: 8 must be >= 16"),
    (["generate", "hi", "--group-size", "-32"], "argument --group-size: -32 must be >= 16"),
    (["generate", "hi", "--key-group-size", "24"], "argument --key-group-size: 24 must be a power of two >= 16"),
    (["generate", "hi", "--sink-tokens", "-1"], "argument --sink-tokens: -1 must be >= 0"),
    (["generate", "hi", "--k-bits", "0"], "argument --k-bits: '0' is not one of 1, 2, 4, 8"),
    (["generate", "hi", "--v-bits", "16"], "argument --v-bits: '16' is not one of 1, 2, 4, 8"),
    (["generate", "hi", "--k-bits", "2.0"], "argument --k-bits: '2.0' is not one of 1, 2, 4, 8"),
    (["generate", "hi", "--temperature", "inf"], "argument --temperature: inf must be in [0.0, 1000000.0]"),
    (["generate", "hi", "--top-p", "1.5"], "argument --top-p: 1.5 must be in (0.0, 1.0]"),
    (["generate", "hi", "--rotate", "q"], "argument --rotate: invalid choice: 'q'"),
    (["chat", "--max-length", "0"], "argument --max-length: 0 must be >= 1"),
    (["chat", "--max-length", "-5"], "argument --max-length: -5 must be >= 1"),
    (["eval", "ppl", "--windows", "0"], "argument --windows: 0 must be >= 1"),
    (["eval", "ppl", "--tokens", "1"], "argument --tokens: 1 must be >= 2"),
    (["eval", "ppl", "--prefill", "0"], "argument --prefill: 0 must be >= 1"),
    (["eval", "ppl", "--texts", ","], "argument --texts: empty list"),
    (["eval", "ppl", "--methods", ""], "--methods: no method given"),
    (["eval", "ppl", "--group-size", "48"], "argument --group-size: 48 must be a power of two >= 16"),
    (["eval", "passkey", "--trials", "0"], "argument --trials: 0 must be >= 1"),
    (["eval", "passkey", "--batch-tokens", "63"], "argument --batch-tokens: 63 must be >= 64"),
    (["eval", "passkey", "--lengths", "512,abc"], "argument --lengths: 'abc' is not an integer"),
    (["eval", "passkey", "--lengths", "512,-64"], "argument --lengths: -64 must be >= 64"),
    (["eval", "passkey", "--seed", "-1"], "argument --seed: -1 must be >= 0"),
    (["eval", "passkey", "--depths", "nan"], "argument --depths: nan must be in [0.0, 1.0]"),
])
def test_more_bad_flags_are_one_line_and_exit_2(capsys, argv, fragment):
    _one_line_error(_run(capsys, *argv), fragment)


def test_every_supported_bit_width_parses():
    parser = cli.build_parser()
    for b in (1, 2, 4, 8):
        args = parser.parse_args(["generate", "hi", "--k-bits", str(b), "--v-bits", str(b)])
        assert (args.k_bits, args.v_bits) == (b, b)
        assert cli._kivi_config(args, args.k_bits, args.v_bits).k_bits == b  # and KIVIConfig takes it
    d = parser.parse_args(["generate", "hi"])
    assert (d.k_bits, d.v_bits, d.group_size, d.residual_length, d.dense) == (2, 2, 32, 128, False)


def test_no_command_and_help_exit_codes(capsys):
    _one_line_error(_run(capsys), "the following arguments are required: {generate,chat,eval,convert}")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return models.save_checkpoint(models.init_random(_tiny(), jax.random.key(5)), tmp_path_factory.mktemp("c") / "ck")


@pytest.mark.parametrize("argv", [["generate", "hi"], ["eval", "passkey", "--fillers", "synthetic", "--methods",
                                                        "dense"], ["convert"]], ids=["generate", "eval", "convert"])
def test_checkpoint_without_tokenizer_as_model_says_so(capsys, tmp_path, tiny_checkpoint, argv):
    """A checkpoint saved without tokenizer= loads (weights and config) but holds no tokenizer:
    the error says that and how to save one with it, not that a Hugging Face directory needs
    tokenizer.json."""
    cli._load.cache_clear()
    extra = ["--out", str(tmp_path / "out")] if argv[0] in ("eval", "convert") else []
    _one_line_error(_run(capsys, *argv, "--model", str(tiny_checkpoint), *extra),
                    f"model {str(tiny_checkpoint)!r} is a kivi-jax checkpoint saved without a tokenizer: save it "
                    "with models.save_checkpoint(model, path, tokenizer=tokenizer) or `kivi-jax convert`")
    if argv[0] == "convert":
        assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_as_model_is_one_line(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "meta" / "metadata").write_text("{not json")
    cli._load.cache_clear()
    _one_line_error(_run(capsys, "generate", "hi", "--model", str(bad)),
                    f"cannot load model {str(bad)!r}: checkpoint at {str(bad)!r} is corrupt")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_run(capsys, "generate", "hi", "--model", str(empty)), f"cannot load model {str(empty)!r}")


# ---- printed figures follow from the clock and the cache ------------------------------------------
class _Tokenizer:
    """A word a token (id 5 each); no chat template."""
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [5] * len(text.split())}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("w " for i in ids if i != 2)


def _fake_run(monkeypatch, *, layers=3, kv_heads=2, head_dim=64, dtype="float32"):
    """cli._load gives a stand-in model; generate_stream yields 4 tokens then EOS at set clock
    readings and returns a real (empty, filled-in lengths) cache of the requested kind."""
    import kivi_jax
    from kivi_jax.generate import GenerateOutput, StreamStep

    config = types.SimpleNamespace(head_dim=head_dim, max_position_embeddings=4096, eos_token_id=2,
                                   num_kv_heads=kv_heads, num_layers=layers)
    model = types.SimpleNamespace(config=config, dtype=jnp.dtype(dtype))
    monkeypatch.setattr(cli, "_load", lambda source, dtype="float32": (model, _Tokenizer()))
    clock = iter([100.0, 102.0, 102.5, 102.75, 103.0, 103.25, 103.5])  # t0, 5 arrivals, end
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    seen = {}

    def stream(m, ids, *, max_new_tokens, kivi, **kw):
        seen.update(prompt=ids.shape[1], max_new_tokens=max_new_tokens, kivi=kivi)
        one = kivi_jax.DenseCache if kivi is None else kivi_jax.KIVICache
        kivi = kivi if kivi is None or kivi.layout != "auto" else dataclasses.replace(kivi, layout="tokens")
        kw = dict(batch=1, num_kv_heads=kv_heads, head_dim=head_dim, max_length=ids.shape[1] + max_new_tokens,
                  dtype=jnp.dtype(dtype))
        cache = models.cache.StackedCache.stack(one.init(**kw) if kivi is None else one.init(kivi, **kw), layers)

        def steps():
            for t in (7, 8, 9, 10, 2):
                yield StreamStep(tokens=np.array([t], np.int32), emitted=np.array([True]))
            held = cache.layers.lengths + (ids.shape[1] + 4)
            return GenerateOutput(tokens=None, lengths=None, cache=models.cache.StackedCache(
                dataclasses.replace(cache.layers, lengths=held)))

        return steps()

    monkeypatch.setattr(kivi_jax, "generate_stream", stream)
    return seen


def _floats(pattern, text):
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return [float(g) for g in m.groups()]


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "kivi2"])
def test_printed_rates_and_sizes_follow_from_what_ran(capsys, monkeypatch, dense):
    seen = _fake_run(monkeypatch)
    code, out, err = _run(capsys, "generate", "one two three", "--no-chat", "--max-new-tokens", "8",
                          *(["--dense"] if dense else []))
    assert code == 0, err
    assert out == "w w w w \n" and seen["prompt"] == 3 and seen["max_new_tokens"] == 8
    assert (seen["kivi"] is None) == dense
    # clock: t0 = 100; tokens (EOS the 5th) at 102, 102.5, 102.75, 103, 103.25; end 103.5
    n, total, overall, decoding, prompt, first = _floats(
        r"\[(\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s overall\), ([\d.]+) tokens/s decoding; prompt (\d+) "
        r"tokens, first token after ([\d.]+) s", err)
    assert (n, total, prompt, first) == (5, 3.5, 3, 2.0)
    assert overall == round(5 / 3.5, 1)
    assert decoding == round(3 / (103.25 - 102.5), 1)  # tokens 3..5 over the time from token 2 to 5

    cap, held = 3 + 8, 3 + 4
    itemsize = 4
    dense_tok = 2 * 64 * itemsize * 2 * 3  # K and V, head_dim 64, float32, 2 KV heads, 3 layers
    if dense:
        nbytes = 2 * 3 * 2 * cap * 64 * itemsize + 3 * (4 + 1)  # K, V + lengths (int32) and overflow (bool)
        assert f"[cache: dense float32, {held} tokens held, buffers {cli._fmt_bytes(nbytes)} (capacity {cap} " \
               f"tokens, {cli._fmt_bytes(dense_tok)} per token)]" in err
        return
    line = next(x for x in err.splitlines() if x.startswith("[cache: KIVI"))
    assert "K2/V2 bits, G=32, R=128, tokens layout" in line and f"{held} tokens held" in line
    (ratio,) = _floats(r"\(([\d.]+)x; the 128-token", line)
    kivi_nbytes = kj.KIVICache.init(kj.KIVIConfig(layout="tokens"), batch=1, num_kv_heads=2, head_dim=64,
                                    max_length=cap, dtype=jnp.float32).nbytes * 3
    assert ratio == round(dense_tok * cap / kivi_nbytes, 2)
    # per token: 2-bit codes of K and V (64 * 4 / 8 bytes) + a float32 scale and min per 32 numbers of each
    per_tok = (64 * 4 / 8 + 4 * itemsize * 64 / 32) * 2 * 3
    (r1, r2) = _floats(r"per token: KIVI .* \(([\d.]+)x\); at the full 4096-token context: .* \(([\d.]+)x\)", err)
    assert r1 == round(dense_tok / per_tok, 1) == 8.0
    resid = 2 * 128 * 64 * itemsize * 2 * 3
    assert r2 == round(dense_tok * 4096 / (per_tok * 4096 + resid), 1)


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (BrokenPipeError(), 0)])
def test_interrupt_and_broken_pipe_exit_codes(capsys, monkeypatch, error, code):
    import kivi_jax

    _fake_run(monkeypatch)

    def stream(*a, **k):
        def steps():
            raise error
            yield

        return steps()

    monkeypatch.setattr(kivi_jax, "generate_stream", stream)
    assert cli.main(["generate", "hi", "--no-chat"]) == code
    err = capsys.readouterr().err
    assert ("interrupted" in err) == (code == 130)


# ---- a checkpoint with its tokenizer: nothing lost on failure, usable from the command line ----------
def _smol_cfg(**kw):
    """A tiny random model of SmolLM2's vocabulary; head_dim 64 so KIVI's default G=32 applies."""
    return models.ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2,
                              num_kv_heads=1, head_dim=64, tie_word_embeddings=True, max_position_embeddings=512,
                              bos_token_id=1, eos_token_id=2, **kw)


def _ids(tok):
    text = "Grüße, 東京 🚀 naïve café"
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return tok(text)["input_ids"], list(chat["input_ids"] if hasattr(chat, "keys") else chat)


def test_failed_save_with_a_tokenizer_keeps_the_old_checkpoint(tmp_path, smol_tokenizer, monkeypatch):
    """The tokenizer's save_pretrained fails half way (its first file written), or orbax fails
    after the tokenizer was written: the old checkpoint, tokenizer and all, still loads as it was,
    and nothing is left beside it."""
    import orbax.checkpoint as ocp

    old = models.init_random(_smol_cfg(), jax.random.key(0))
    new = models.init_random(_smol_cfg(), jax.random.key(1))
    path = models.save_checkpoint(old, tmp_path / "ck", tokenizer=smol_tokenizer)
    want_ids = _ids(smol_tokenizer)
    real_save = type(smol_tokenizer).save_pretrained
    calls = []

    def half_save(directory, *a, **k):
        calls.append(directory)
        real_save(smol_tokenizer, directory, *a, **k)  # the files are there ...
        assert sorted(os.listdir(directory)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
        raise OSError(28, "No space left on device")  # ... and then the disk is full

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device (orbax)")

    def unchanged():
        assert sorted(os.listdir(tmp_path)) == ["ck"]
        back, tok = models.load_model(path)
        assert _bits(models.params_of(back)) == _bits(models.params_of(old))
        assert tok is not None and _ids(tok) == want_ids

    with monkeypatch.context() as m:
        m.setattr(smol_tokenizer, "save_pretrained", half_save)
        for target, overwrite in ((path, True), (tmp_path / "other", False)):
            with pytest.raises(OSError, match="No space left on device$"):
                models.save_checkpoint(new, target, tokenizer=smol_tokenizer, overwrite=overwrite)
            unchanged()
    assert len(calls) == 2 and all(os.path.dirname(c) == str(tmp_path) for c in calls)
    with monkeypatch.context() as m:
        m.setattr(ocp.CompositeCheckpointHandler, "save", fail)
        with pytest.raises(OSError, match="orbax"):
            models.save_checkpoint(new, path, tokenizer=smol_tokenizer, overwrite=True)
        unchanged()
    # an overwrite that succeeds replaces the weights and the tokenizer: saved without one, it has none
    models.save_checkpoint(new, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"] and not (path / "tokenizer").exists()
    back, tok = models.load_model(path)
    assert tok is None and _bits(models.params_of(back)) == _bits(models.params_of(new))


def _hf_dir(model, tokenizer, path: pathlib.Path) -> pathlib.Path:
    """``model`` as a Hugging Face directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.numpy import save_file

    from models.loading import _HF_LAYER

    p = jax.tree.map(np.asarray, models.params_of(model))
    tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    for ours, (theirs, transpose) in _HF_LAYER.items():
        for i, w in enumerate(p["layers"][ours]):
            tensors[f"model.layers.{i}.{theirs}"] = np.ascontiguousarray(w.T if transpose else w)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_and_checkpoint(tmp_path_factory, smol_tokenizer):
    """A tiny random model as a Hugging Face directory, and `kivi-jax convert` of it."""
    d = tmp_path_factory.mktemp("cli-ck")
    model = models.init_random(_smol_cfg(), jax.random.key(7))
    hf = _hf_dir(model, smol_tokenizer, d / "hf")
    cli._load.cache_clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["convert", "--model", str(hf), "--out", str(d / "ck")]) == 0
    return model, hf, d / "ck", err.getvalue()


def _recording(monkeypatch):
    """Wraps kivi_jax.generate_stream: the prompt ids and the emitted tokens of every call."""
    import kivi_jax

    real, calls = kivi_jax.generate_stream, []

    def stream(model, ids, **kw):
        call = dict(ids=np.asarray(ids).tolist(), tokens=[])
        calls.append(call)
        inner = real(model, ids, **kw)

        def steps():
            while True:
                try:
                    step = next(inner)
                except StopIteration as stop:
                    return stop.value
                if step.emitted[0]:
                    call["tokens"].append(int(step.tokens[0]))
                yield step

        return steps()

    monkeypatch.setattr(kivi_jax, "generate_stream", stream)
    return calls


def test_convert_writes_the_model_and_its_tokenizer(capsys, tmp_path, hf_and_checkpoint, smol_tokenizer):
    model, hf, ck, err = hf_and_checkpoint
    assert f"wrote {ck} (float32 weights, config and tokenizer, " in err and f"pass it as --model {ck}" in err
    back, tok = models.load_model(ck)
    assert back.config == model.config and _bits(models.params_of(back)) == _bits(models.params_of(model))
    assert _ids(tok) == _ids(smol_tokenizer)
    # --out exists: refused without --overwrite; --overwrite replaces only a checkpoint
    _one_line_error(_run(capsys, "convert", "--model", str(hf), "--out", str(ck)),
                    f"--out: checkpoint path={str(ck)!r} exists; pass overwrite=True to replace it "
                    "(--overwrite replaces a kivi-jax checkpoint)")
    _one_line_error(_run(capsys, "convert", "--model", str(hf), "--out", str(hf), "--overwrite"),
                    f"--out: checkpoint path={str(hf)!r} exists and is not a kivi-jax model checkpoint (a directory)")
    assert (hf / "model.safetensors").is_file()
    ck2 = shutil.copytree(ck, tmp_path / "ck2")
    cli._load.cache_clear()
    code, out, err = _run(capsys, "convert", "--model", str(ck2), "--out", str(ck2), "--overwrite", "--dtype",
                          "bfloat16")  # in place, to bfloat16
    assert code == 0 and out == "" and "(bfloat16 weights, config and tokenizer" in err, err
    half, tok2 = models.load_checkpoint(ck2), models.checkpoint.load_tokenizer(ck2)
    assert half.dtype == jnp.bfloat16 and _ids(tok2) == _ids(smol_tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["ck2"]


@pytest.mark.parametrize("flags", [[], ["--dense", "--no-chat"]], ids=["kivi2-chat-template", "dense-plain"])
def test_generate_on_a_checkpoint_is_generate_on_its_source(capsys, monkeypatch, hf_and_checkpoint, smol_tokenizer,
                                                           flags):
    """Greedy: the same prompt ids (chat template applied by the restored tokenizer) and the same tokens."""
    _, hf, ck, _ = hf_and_checkpoint
    prompt = "Grüße aus Köln 🚀"
    calls = _recording(monkeypatch)
    outs = []
    for source in (hf, ck):
        cli._load.cache_clear()
        code, out, err = _run(capsys, "generate", prompt, "--model", str(source), "--max-new-tokens",
                              "6", *flags)
        assert code == 0, err
        outs.append(out)
    (a, b) = calls
    assert a == b and len(a["tokens"]) >= 1 and outs[0] == outs[1]
    tok = smol_tokenizer
    if flags:
        assert a["ids"] == [tok(prompt)["input_ids"]]
    else:  # the template's default system turn, the user's, the assistant's opening: 3 <|im_start|> (id 1)
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        assert a["ids"] == [tok(text, add_special_tokens=False)["input_ids"]] and a["ids"][0].count(1) == 3


def test_chat_and_eval_on_a_checkpoint_are_chat_and_eval_on_its_source(capsys, monkeypatch, tmp_path,
                                                                       hf_and_checkpoint):
    _, hf, ck, _ = hf_and_checkpoint
    calls = _recording(monkeypatch)
    chats, records = [], []
    for i, source in enumerate((hf, ck)):
        cli._load.cache_clear()
        monkeypatch.setattr(sys, "stdin", io.StringIO("Bonjour ✓\nEncore ?\n"))
        code, out, err = _run(capsys, "chat", "--model", str(source), "--max-new-tokens", "4", "--max-length", "128",
                              "--system", "Be brief.")
        assert code == 0 and err.count("[turn ") == 2, err
        chats.append(out)
        code, out, err = _run(capsys, "eval", "passkey", "--model", str(source), "--fillers", "synthetic",
                              "--methods", "kivi-2", "--lengths", "256", "--depths", "0.5", "--no-progress",
                              "--out", str(tmp_path / str(i)))
        assert code == 0, err
        (result,) = (tmp_path / str(i)).glob("passkey-*.json")
        records.append(json.loads(result.read_text())["records"])
    assert len(calls) == 4 and calls[:2] == calls[2:] and chats[0] == chats[1]
    assert records[0] == records[1] and len(records[0]) == 1
