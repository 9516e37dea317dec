"""Argument checks shared across the package (no kivi_jax imports: any module may use them)."""

from __future__ import annotations

import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np

FLOATS = ("float32", "bfloat16", "float16")  # what the caches store and the kernels take


def is_int(x) -> bool:
    """An integer (Python or NumPy), not a bool: True and 1.0 are not sizes, axes or windows."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_float(name: str, dtype):
    """dtype as a NumPy dtype if it is one of FLOATS, else a ValueError naming ``name``."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:  # (numpy's own "data type 'foo' not understood" named no parameter)
        raise ValueError(f"{name} dtype {dtype!r} is not a dtype; allowed: {', '.join(FLOATS)}") from None
    if dtype.name not in FLOATS:
        raise ValueError(f"{name} dtype {dtype} is not supported; allowed: {', '.join(FLOATS)}")
    return dtype


def check_window(window) -> None:
    """A sliding window: None or an integer >= 1 (a float or a bool would silently become a
    different mask)."""
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window={window!r} must be None or an integer >= 1")


def concrete_int(name: str, value, allowed: str) -> int:
    """``value`` as a Python int when it is a concrete integer (a Python or NumPy integer, or a
    concrete integer jax scalar; not a bool, a float or a traced value), else a ValueError naming
    ``name``, the value and ``allowed``."""
    if not isinstance(value, (bool, jax.core.Tracer)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    shown = f"a traced {value.aval.str_short()}" if isinstance(value, jax.core.Tracer) else repr(value)
    raise ValueError(f"{name}={shown} must be {allowed}")


def check_token_ids(name: str, ids, vocab_size: int, lengths=None, active=None) -> None:
    """Concrete token ids [B, T] inside [0, vocab_size), or a ValueError naming ``name``, how many
    are outside and which (an id >= V makes an embedding gather return NaN rows or clamp, a
    negative one wraps around: a silent wrong answer). Only the ids a call reads are checked:
    each row's first lengths[b] (when given), the active [B] rows (when given). Skipped when any
    of them is traced (jit, vmap, grad): the check is one host read of concrete ids."""
    if any(isinstance(a, jax.core.Tracer) for a in (ids, lengths, active)):
        return
    host = np.asarray(ids)
    if host.size == 0:
        return
    bad = (host < 0) | (host >= vocab_size)
    if not bad.any():
        return
    if host.ndim == 2:
        b, t = host.shape
        if lengths is not None and np.shape(lengths) == (b,):
            bad &= np.arange(t)[None, :] < np.asarray(lengths)[:, None]
        if active is not None and np.shape(active) == (b,):
            bad &= np.asarray(active, bool)[:, None]
    if bad.any():
        values = np.unique(host[bad])
        raise ValueError(f"{name} hold {int(bad.sum())} token id(s) outside [0, vocab_size={vocab_size}), e.g. "
                         f"{values[:5].tolist()}{' ...' if values.size > 5 else ''}")
