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

import jax
import numpy as np


def jit_when_eager(fn=None, *, static_argnames: tuple[str, ...] = (), validate=None):
    """``fn`` jitted (``static_argnames`` static) when every array argument is a concrete array;
    as written when one is traced or is a Python scalar (whose value the code may use).
    validate(*args, **kwargs): checks that need concrete values (a named error for bad input),
    run before the jitted call, where the function itself would only see tracers."""
    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            leaves = jax.tree_util.tree_leaves([v for k, v in bound.arguments.items() if k not in static_argnames])
            if not all(isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer) for x in leaves):
                return fn(*args, **kwargs)
            if validate is not None:
                validate(*args, **kwargs)
            return jitted(*args, **kwargs)

        call.jitted = jitted
        return call

    return wrap if fn is None else wrap(fn)
