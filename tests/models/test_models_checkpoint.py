"""Orbax checkpoints: bit-exact parameters and config, clear errors for missing / foreign / corrupt."""

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
