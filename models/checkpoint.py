"""Orbax checkpoints of a model: its parameters (bit-exact) and its ModelConfig.

Layout (an orbax composite checkpoint, one directory)::

    path/params/   orbax StandardSave of the pure parameter dict (see models.param_shapes)
    path/meta/     JSON: {"format": "kivi-jax-model", "version": 1, "class", "dtype", "config",
                          "sha256": {"layers/q_proj": hex digest of the array's bytes, ...},
                          "tokenizer": null, or {"dir": "tokenizer", "sha256": {file: hex digest}}}
    path/tokenizer/  (when saved with tokenizer=) the transformers tokenizer's save_pretrained
                     files: tokenizer.json, tokenizer_config.json, chat_template.jinja, ...

Loading checks every array's and tokenizer file's SHA-256 against the saved one
(``verify=True``), so a damaged file is an error, never silently different weights or token ids.
(A checkpoint whose meta has no "tokenizer" key, written before it existed, has none.)
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import shutil
import uuid

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.llama import Llama, abstract_model, model_class, params_of

FORMAT = "kivi-jax-model"
VERSION = 1
TOKENIZER_DIR = "tokenizer"  # save_checkpoint(..., tokenizer=) writes it here


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(model: Llama, path, *, tokenizer=None, overwrite: bool = False) -> pathlib.Path:
    """Writes the model's parameters and config to directory ``path`` (absolute path returned).

    tokenizer: a transformers tokenizer to keep with the weights (``save_pretrained`` into
    ``path/tokenizer/``, chat template included; the SHA-256 of its files goes in the meta), so
    that :func:`models.load_model` and ``kivi-jax --model path`` return it. None: weights and
    config only. Its vocabulary must fit the model's (``len(tokenizer) <= vocab_size``).
    overwrite: replace an existing kivi-jax checkpoint at ``path`` (otherwise that is an error).
    Anything else at ``path`` (a file, a directory that is not a checkpoint) is never replaced.
    The new checkpoint (tokenizer included) is written beside ``path`` first and moved there only
    once complete, so a save that fails leaves the old checkpoint as it was and nothing beside it."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a models.Llama / models.Mistral; got {type(model).__name__}")
    if tokenizer is not None:
        _check_tokenizer(tokenizer, model)
    path = pathlib.Path(path).expanduser().absolute()
    replacing = path.exists() or path.is_symlink()
    if replacing:
        if not overwrite:
            raise FileExistsError(f"checkpoint path={str(path)!r} exists; pass overwrite=True to replace it")
        if path.is_symlink() or not is_checkpoint(path):
            raise FileExistsError(f"checkpoint path={str(path)!r} exists and is not a kivi-jax model checkpoint "
                                  f"(a {'symlink' if path.is_symlink() else 'file' if path.is_file() else 'directory'}"
                                  f"); overwrite=True replaces only a directory written by models.save_checkpoint")
    ocp, ckptr = _checkpointer()
    params = params_of(model)
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
            "dtype": jnp.dtype(model.dtype).name, "config": model.config.to_dict(), "sha256": _digests(params),
            "tokenizer": None}
    # the whole checkpoint is written beside path, then moved there (orbax's force=True would
    # delete an old one first, and a failed save would lose both)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = path.with_name(f".{path.name}.new-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    staged = path.with_name(f".{path.name}.tokenizer-{tag}")
    try:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staged))
            meta["tokenizer"] = {"dir": TOKENIZER_DIR, "sha256": _file_digests(staged)}
        _save(ckptr, new, ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        if tokenizer is not None:
            os.replace(staged, new / TOKENIZER_DIR)
        if not replacing:
            os.rename(new, path)  # (refused if something else has appeared at path meanwhile)
            return path
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)
        raise
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _check_tokenizer(tokenizer, model: Llama) -> None:
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer (with save_pretrained); "
                        f"got {type(tokenizer).__name__}")
    n, vocab = len(tokenizer), model.config.vocab_size
    if n > vocab:
        raise ValueError(f"tokenizer has {n} tokens, more than the model's vocab_size={vocab}: "
                         f"it is not this model's tokenizer")


def _file_digests(directory: pathlib.Path) -> dict[str, str]:
    """relative POSIX path -> SHA-256 of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _save(ckptr, path: pathlib.Path, args) -> None:
    try:
        ckptr.save(path, args)
        ckptr.wait_until_finished() if hasattr(ckptr, "wait_until_finished") else None
    except BaseException:  # orbax leaves its half-written temporary directory behind
        for tmp in path.parent.glob(f"{glob.escape(path.name)}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_checkpoint(path) -> bool:
    """True when ``path`` looks like a directory written by :func:`save_checkpoint`."""
    p = pathlib.Path(path)
    return (p / "meta").is_dir() and (p / "params").is_dir()


def _read_meta(path: pathlib.Path) -> dict:
    ocp, ckptr = _checkpointer()
    try:
        meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt: its meta entry cannot be read "
                         f"({_short(e)})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a kivi-jax model checkpoint (meta format="
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}; expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint version={meta.get('version')!r}; this code reads version {VERSION}")
    return meta


def _digests(params: dict) -> dict[str, str]:
    flat = {}

    def walk(d, prefix):
        for k in sorted(d):
            if isinstance(d[k], dict):
                walk(d[k], f"{prefix}{k}/")
            else:
                a = jax.device_get(d[k])
                flat[f"{prefix}{k}"] = hashlib.sha256(a.tobytes()).hexdigest()

    walk(params, "")
    return flat


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def load_checkpoint(path, *, dtype=None, verify: bool = True) -> Llama:
    """The model saved at ``path``: parameters restored bit-exactly in their saved dtype (or cast
    to ``dtype``), config as saved. A missing, foreign or corrupt checkpoint raises
    (FileNotFoundError / ValueError naming the path and what is wrong). verify: check every
    array's SHA-256 against the one saved. The tokenizer, if one was saved with the model:
    :func:`load_tokenizer` (:func:`models.load_model` returns both)."""
    path = _existing(path)
    meta = _read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
        saved_dtype = jnp.dtype(meta["dtype"])
    except Exception as e:
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt: bad config in meta ({type(e).__name__}: {e})") from e
    if model_class(config).__name__ != meta.get("class"):
        raise ValueError(f"checkpoint class={meta.get('class')!r} does not match its config "
                         f"model_type={config.model_type!r}")
    graphdef, abstract = nnx.split(abstract_model(config, saved_dtype))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_default_sharding()),
                          nnx.to_pure_dict(abstract))
    ocp, ckptr = _checkpointer()
    try:
        params = ckptr.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt or does not match its config "
                         f"({_short(e)})") from e
    if verify:
        saved, got = meta.get("sha256") or {}, _digests(params)
        bad = sorted(k for k in got if saved.get(k) != got[k])
        if bad or set(saved) != set(got):
            raise ValueError(f"checkpoint at {str(path)!r} is corrupt: arrays {bad or sorted(set(saved) ^ set(got))} "
                             f"do not match the SHA-256 saved with them")
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        from models.llama import from_params

        model = from_params(config, params_of(model), dtype)
    return model


def load_tokenizer(path, *, verify: bool = True):
    """The transformers tokenizer saved in the checkpoint at ``path`` (``save_checkpoint(...,
    tokenizer=)``), or None where it was saved without one. A missing or changed tokenizer file
    (verify: its SHA-256 against the one saved), or one transformers cannot read, is a ValueError."""
    path = _existing(path)
    saved = _read_meta(path).get("tokenizer")
    if saved is None:
        return None
    if (not isinstance(saved, dict) or saved.get("dir") != TOKENIZER_DIR or not isinstance(saved.get("sha256"), dict)
            or not saved["sha256"]):
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt: bad tokenizer entry in meta ({saved!r:.200})")
    d = path / TOKENIZER_DIR
    if not d.is_dir():
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt: it was saved with a tokenizer but its "
                         f"{TOKENIZER_DIR!r} directory is missing")
    if verify:
        want, got = saved["sha256"], _file_digests(d)
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if bad:
            raise ValueError(f"checkpoint at {str(path)!r} is corrupt: tokenizer files {bad} are missing, added or "
                             f"do not match the SHA-256 saved with them")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint at {str(path)!r} is corrupt: its tokenizer cannot be read ({_short(e)})") from e


def _existing(path) -> pathlib.Path:
    """``path`` as an absolute path, checked to be a kivi-jax checkpoint directory."""
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path={str(path)!r} does not exist; write one with "
                                f"models.save_checkpoint(model, path)")
    if not is_checkpoint(path):
        raise ValueError(f"checkpoint path={str(path)!r} is not a kivi-jax model checkpoint "
                         f"(expected subdirectories 'params' and 'meta' written by models.save_checkpoint)")
    return path


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
