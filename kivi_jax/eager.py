"""Eager calls of the library's array functions, compiled as one computation.

Called on plain arrays (at a prompt, in a script, as the README's tour does), ``cache.prefill``
ran op by op, each of its primitives compiled on its own: on CPU, KIVI-2 with B=2, Hkv=8, 200
tokens took 18.1 s for the prefill, 9.9 s for one append and 5.4 s for decode_attention, against
1.7, 2.2 and 0.5 s as one jitted computation each, with the same result. Under a trace (jit,
vmap, grad: a Tracer among the arguments) a function runs as written, so the programs that trace
it (generate, the models, a user's own jit) are unchanged: no nested jit in them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

import jax
import numpy as np

PACKAGES = ("kivi_jax", "pallas_kernels", "models")
_SETTINGS = (str, int, float, bool, type(None))
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def trace_settings() -> tuple:
    """What a trace reads besides its arguments: the backend, and every module-level setting of
    PACKAGES (strings, numbers, None; functions by identity). Their switches (``APPEND_IMPL``,
    ``RARE_WRITES``, ...) are read when a function is traced: a compiled eager call is reused
    only while they are as they were (a benchmark's switch or a test's monkeypatch retraces)."""
    state = [jax.default_backend(), id(jax.default_backend), id(jax.devices)]
    for name, module in list(sys.modules.items()):
        if module is None or name.partition(".")[0] not in PACKAGES:
            continue
        for key, value in vars(module).items():
            if isinstance(value, _SETTINGS):
                state.append((name, key, value))
            elif isinstance(value, _FUNCTIONS):  # (inspect.isfunction / isbuiltin, without two calls a value)
                state.append((name, key, id(value)))
    return tuple(state)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def jit_when_eager(fn=None, *, static_argnames: tuple[str, ...] = (), validate=None):
    """``fn`` jitted (``static_argnames`` static) when every array argument is a concrete array;
    as written when one is traced or is a Python scalar (whose value the code may use).
    validate(*args, **kwargs): checks that need concrete values (a named error for bad input),
    run before the jitted call, where the function itself would only see tracers. One jitted
    function per :func:`trace_settings` state (a state a trace only added modules to, by importing
    them, maps to the same one)."""
    def wrap(fn):
        signature = inspect.signature(fn)
        jits, traces = {}, [0]

        def new_jit():  # a function object of its own: jax reuses a trace of the same one across jits
            @functools.wraps(fn)
            def traced(*args, **kwargs):  # runs when a jitted call traces (a compile on its cache miss)
                traces[0] += 1
                return fn(*args, **kwargs)

            return jax.jit(traced, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            leaves = jax.tree_util.tree_leaves([v for k, v in bound.arguments.items() if k not in static_argnames])
            if not all(isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer) for x in leaves):
                return fn(*args, **kwargs)
            if not all(_hashable(v) for k, v in bound.arguments.items() if k in static_argnames):
                return fn(*args, **kwargs)  # (a bad setting, e.g. axis=[2]: fn's own check names it)
            if validate is not None:
                validate(*args, **kwargs)
            settings = trace_settings()
            if settings not in jits:
                jits[settings] = new_jit()
            before = traces[0]
            out = jits[settings](*args, **kwargs)
            if traces[0] != before:  # traced now: a trace that imports modules (a kernel path imported
                # lazily on a GPU) adds their settings, at the values it read: the same program's key too
                after = trace_settings()
                if set(settings) <= set(after):  # (only added, none changed)
                    jits.setdefault(after, jits[settings])
            return out

        call.traces = lambda: traces[0]  # how many times an eager call traced (and compiled) it
        return call

    return wrap if fn is None else wrap(fn)
