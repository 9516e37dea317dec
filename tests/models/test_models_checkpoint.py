"""Orbax checkpoints: bit-exact parameters and config, the tokenizer kept with them, clear errors
for missing / foreign / corrupt."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models

CFG = models.ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, model_type="mistral", sliding_window=5, rope_theta=5e4,
                         eos_token_id=(2, 7))


def _bits(tree):
    """Flat name -> (dtype, raw bytes) of every array."""
    return {jax.tree_util.keystr(k): (np.asarray(v).dtype, np.asarray(v).tobytes())
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = models.init_random(CFG, jax.random.key(3), dtype=jnp.bfloat16)
    path = models.save_checkpoint(model, tmp_path_factory.mktemp("ck") / "model")
    return model, path


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    model = models.init_random(CFG, jax.random.key(1), dtype=dtype)
    path = models.save_checkpoint(model, tmp_path / "m")
    back = models.load_checkpoint(path)
    assert type(back) is models.Mistral and back.config == CFG and back.dtype == jnp.dtype(dtype)
    a, b = _bits(models.params_of(model)), _bits(models.params_of(back))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) % CFG.vocab_size
    np.testing.assert_array_equal(np.asarray(model(ids)[0]), np.asarray(back(ids)[0]))


def test_load_model_reads_a_checkpoint_and_casts(saved):
    model, path = saved
    back, tok = models.load_model(path, dtype=jnp.float32)
    assert tok is None and back.dtype == jnp.float32
    want = np.asarray(models.params_of(model)["layers"]["q_proj"]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(models.params_of(back)["layers"]["q_proj"]), want)


def test_missing_and_foreign_paths(tmp_path, saved):
    model, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a kivi-jax model checkpoint"):
        models.load_checkpoint(tmp_path / "plain")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        models.save_checkpoint(model, path)


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def test_corrupt_array_data_is_an_error(tmp_path, saved):
    dst = _copy(saved, tmp_path)
    blobs = sorted((p for p in (dst / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: p.stat().st_size)
    data = bytearray(blobs[-1].read_bytes())
    for i in range(64, len(data), 5):
        data[i] ^= 0xA5
    blobs[-1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        models.load_checkpoint(dst)


def test_corrupt_meta_is_an_error(tmp_path, saved):
    dst = _copy(saved, tmp_path)
    (dst / "meta" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="meta entry cannot be read"):
        models.load_checkpoint(dst)


def test_checksum_mismatch_is_an_error(tmp_path, saved):
    """Arrays that read fine but are not the ones saved (here: the recorded digest is changed)."""
    dst = _copy(saved, tmp_path)
    meta_file = dst / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["sha256"]["layers/v_proj"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['layers/v_proj'\] do not match the SHA-256"):
        models.load_checkpoint(dst)
    assert models.load_checkpoint(dst, verify=False).config == CFG


# ---- the tokenizer kept with the weights --------------------------------------------------------
TEXTS = ["Once upon a time", "Grüße aus Köln: naïve café, 東京 🚀", "  two spaces\n\ttab <|im_end|> end",
         "KIVI stores keys per-channel and values per-token."]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Qu'est-ce que KIVI ? ½ ü"},
        {"role": "assistant", "content": "A 2-bit cache."}, {"role": "user", "content": "Merci 🙏"}]


def _chat_ids(tok, messages=CHAT):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, smol_tokenizer):
    """A tiny random model of SmolLM2's vocabulary, saved with its tokenizer."""
    cfg = models.ModelConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True)
    model = models.init_random(cfg, jax.random.key(4), dtype=jnp.float32)
    return model, models.save_checkpoint(model, tmp_path_factory.mktemp("tk") / "m", tokenizer=smol_tokenizer)


def test_tokenizer_round_trip_gives_the_same_ids(with_tokenizer, smol_tokenizer):
    model, path = with_tokenizer
    assert sorted(p.name for p in (path / "tokenizer").iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                                      "tokenizer_config.json"]
    back, tok = models.load_model(path)
    assert tok is not None and tok is not smol_tokenizer and back.config == model.config
    assert _bits(models.params_of(back)) == _bits(models.params_of(model))
    for text in TEXTS:
        want = smol_tokenizer(text)["input_ids"]
        assert tok(text)["input_ids"] == want and len(want) > 3, text
        assert tok.decode(want) == smol_tokenizer.decode(want)
    assert tok.chat_template == smol_tokenizer.chat_template
    want = _chat_ids(smol_tokenizer)
    assert _chat_ids(tok) == want and want.count(1) == 5  # <|im_start|> x 4 messages + the generation prompt
    assert (tok.eos_token_id, tok.bos_token_id, tok.all_special_tokens) == (
        smol_tokenizer.eos_token_id, smol_tokenizer.bos_token_id, smol_tokenizer.all_special_tokens)
    assert models.load_tokenizer(path)(TEXTS[1])["input_ids"] == smol_tokenizer(TEXTS[1])["input_ids"]
    assert isinstance(models.load_checkpoint(path), models.Llama)  # the model alone, as before


def test_checkpoint_without_tokenizer_has_none(saved, tmp_path):
    """A checkpoint saved without tokenizer=, and one written before the meta had the key."""
    assert models.checkpoint.load_tokenizer(saved[1]) is None
    dst = _copy(saved, tmp_path)
    meta_file = dst / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["tokenizer"] is None
    del meta["tokenizer"]
    meta_file.write_text(json.dumps(meta))
    assert models.load_model(dst)[1] is None


def test_changed_or_missing_tokenizer_files_are_an_error(tmp_path, with_tokenizer):
    src = with_tokenizer[1]
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    t = edited / "tokenizer" / "chat_template.jinja"
    t.write_text(t.read_text().replace("<|im_start|>", "<|im_end|>"))
    with pytest.raises(ValueError, match=r"tokenizer files \['chat_template.jinja'\] are missing, added or do not "
                                         "match the SHA-256"):
        models.load_model(edited)
    tok = models.checkpoint.load_tokenizer(edited, verify=False)  # what verify guards against: other ids
    assert "<|im_start|>" not in tok.chat_template
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    (extra / "tokenizer" / "special_tokens_map.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer files \['special_tokens_map.json'\]"):
        models.checkpoint.load_tokenizer(extra)
    gone = tmp_path / "gone"
    shutil.copytree(src, gone)
    shutil.rmtree(gone / "tokenizer")
    with pytest.raises(ValueError, match="saved with a tokenizer but its 'tokenizer' directory is missing"):
        models.load_model(gone)
    assert models.load_checkpoint(gone).config == with_tokenizer[0].config  # the weights still load alone


def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path, smol_tokenizer):
    small = models.init_random(dataclasses.replace(CFG, vocab_size=len(smol_tokenizer) - 1), jax.random.key(0))
    with pytest.raises(ValueError, match="tokenizer has 49152 tokens, more than the model's vocab_size=49151"):
        models.save_checkpoint(small, tmp_path / "a", tokenizer=smol_tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer .*; got dict"):
        models.save_checkpoint(small, tmp_path / "b", tokenizer={"hello": 1})
    assert list(tmp_path.iterdir()) == []

