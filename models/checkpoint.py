"""Orbax checkpoints of a model: its parameters (bit-exact) and its ModelConfig.

Layout (an orbax composite checkpoint, one directory)::

    path/params/   orbax StandardSave of the pure parameter dict (see models.param_shapes)
    path/meta/     JSON: {"format": "kivi-jax-model", "version": 1, "class", "dtype", "config",
                          "sha256": {"layers/q_proj": hex digest of the array's bytes, ...}}

Loading checks every array's SHA-256 against the saved one (``verify=True``), so a damaged
file is an error, never silently different weights.
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


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(model: Llama, path, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the model's parameters and config to directory ``path`` (absolute path returned).

    overwrite: replace an existing kivi-jax checkpoint at ``path`` (otherwise that is an error).
    Anything else at ``path`` (a file, a directory that is not a checkpoint) is never replaced.
    The new checkpoint is written beside ``path`` first and swapped in only once complete, so a
    save that fails leaves the old checkpoint as it was."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a models.Llama / models.Mistral; got {type(model).__name__}")
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"checkpoint path={str(path)!r} exists; pass overwrite=True to replace it")
        if path.is_symlink() or not is_checkpoint(path):
            raise FileExistsError(f"checkpoint path={str(path)!r} exists and is not a kivi-jax model checkpoint "
                                  f"(a {'symlink' if path.is_symlink() else 'file' if path.is_file() else 'directory'}"
                                  f"); overwrite=True replaces only a directory written by models.save_checkpoint")
    ocp, ckptr = _checkpointer()
    params = params_of(model)
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
            "dtype": jnp.dtype(model.dtype).name, "config": model.config.to_dict(), "sha256": _digests(params)}
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if not path.exists():
        _save(ckptr, path, args)  # orbax writes a temporary directory and renames it when complete
        return path
    # replacing a checkpoint: write the new one beside it, then swap (orbax's force=True would
    # delete the old one first, and a failed save would lose both)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = path.with_name(f".{path.name}.new-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    try:
        _save(ckptr, new, args)
    except BaseException:
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
    array's SHA-256 against the one saved."""
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path={str(path)!r} does not exist; write one with "
                                f"models.save_checkpoint(model, path)")
    if not is_checkpoint(path):
        raise ValueError(f"checkpoint path={str(path)!r} is not a kivi-jax model checkpoint "
                         f"(expected subdirectories 'params' and 'meta' written by models.save_checkpoint)")
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


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
