"""Derivatives for the kernel paths: a Pallas kernel has no autodiff rule of its own (jax.grad
through a pallas_call raised a bare AssertionError, or "JVP with aliasing not supported" for the
kernels that write a cache in place), while training code differentiates a model with a cache."""

from __future__ import annotations

import jax


def with_reference_derivative(kernel, reference, *args):
    """``kernel(*args)``, with ``reference``'s derivative under jax.jvp / jax.grad (``reference``
    computes the same function in XLA). The forward program is the kernel's alone; the reference
    is traced only where a derivative is taken. ``args`` are pytrees of arrays (integer leaves get
    float0 tangents); the kernel's and the reference's outputs have the same structure."""

    @jax.custom_jvp
    def f(*args):
        return kernel(*args)

    @f.defjvp
    def _(primals, tangents):
        _, out_dot = jax.jvp(reference, primals, tangents)
        return f(*primals), out_dot

    return f(*args)
