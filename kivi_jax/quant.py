"""KIVI's asymmetric min/max group quantization as pure JAX ops.

For a group x of G numbers (G consecutive elements along ``axis``):

    mn = min(x); scale = (max(x) - mn) / (2**bits - 1)
    code = clip(round_half_even((x - mn) / scale), 0, 2**bits - 1);  x_hat = code * scale + mn

Scale and min are stored in the input's dtype (fp16/bf16: KIVI's 3 bits per number at
2 bits, G=32). They are rounded *outward* (min down, scale up) before the codes are
computed from the stored values, so |x - x_hat| <= scale / 2 holds for the numbers we
actually keep, and no code is clipped. A constant group has scale 0 and dequantizes to
exactly its value. Arithmetic is float32 whatever the input dtype.

Codes are packed along ``pack_axis`` by :mod:`kivi_jax.packing` (for [B, H, T, D] the
token axis, for keys and values alike: the layout the Pallas kernel reads).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import packing

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_float(name: str, dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in _FLOATS]:
        raise ValueError(f"{name} dtype {dtype} is not supported; allowed: float32, bfloat16, float16")
    return dtype


def _norm_axis(name: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def default_pack_axis(ndim: int) -> int:
    """The token axis of [..., T, D]: codes pack along it so D stays contiguous."""
    return max(ndim - 2, 0)


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Packed codes plus per-group scale and min of one quantized array.

    codes: uint32 words, ``shape`` with ``pack_axis`` packed (see :mod:`kivi_jax.packing`).
    scale, min: ``shape`` with ``axis`` divided by ``group_size``, in ``dtype``.
    """

    codes: jax.Array
    scale: jax.Array
    min: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    pack_axis: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers actually held (codes + scale + min)."""
        return int(self.codes.nbytes + self.scale.nbytes + self.min.nbytes)

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / int(np.prod(self.shape))


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["codes", "scale", "min"],
    meta_fields=["bits", "group_size", "axis", "pack_axis", "shape", "dtype"],
)


def _round_outward(value_f32, dtype, direction):
    """Casts float32 ``value_f32`` to ``dtype``, stepping one ulp toward ``direction`` if rounding went the other way."""
    cast = value_f32.astype(dtype)
    fix = (cast.astype(jnp.float32) > value_f32) if direction < 0 else (cast.astype(jnp.float32) < value_f32)
    stepped = jnp.nextafter(cast, jnp.full_like(cast, -jnp.inf if direction < 0 else jnp.inf))
    return jnp.where(fix, stepped, cast)


def group_params(xg: jax.Array, bits: int, dtype, reduce_axis: int):
    """Stored (scale, min) of groups laid out along ``reduce_axis`` of float32 ``xg``.

    Returns scale and min in ``dtype``, with ``reduce_axis`` kept (size 1).
    """
    levels = float(2**bits - 1)
    finfo = jnp.finfo(dtype)
    mn = jnp.min(xg, axis=reduce_axis, keepdims=True)
    mx = jnp.max(xg, axis=reduce_axis, keepdims=True)
    mn_s = _round_outward(jnp.maximum(mn, float(finfo.min)), dtype, -1)
    mn_f = mn_s.astype(jnp.float32)
    # (mx - mn) / levels: one subtraction, no cancellation (mx / levels - mn / levels loses
    # everything when |mn| >> mx - mn, e.g. float32 groups with a large offset). Only when
    # the difference overflows float32 (huge groups) divide first.
    diff = mx - mn_f
    scale = jnp.where(jnp.isfinite(diff), diff / levels, mx / levels - mn_f / levels)
    scale = jnp.minimum(scale, float(finfo.max))
    scale_s = _round_outward(scale, dtype, +1)
    scale_s = jnp.minimum(scale_s.astype(jnp.float32), float(finfo.max)).astype(dtype)
    return scale_s, mn_s


# Scales at or above this are handled in units of _HUGE_UNIT: on XLA CPU, x / s returns 0
# once s >= 2**126 (the reciprocal is flushed to zero), and x - mn or code * scale can
# overflow float32. Scaling by a power of two is exact, so results are unchanged otherwise.
_HUGE = 2.0**64
_HUGE_UNIT = 2.0**-64


def quantize_codes(xg: jax.Array, scale_s, mn_s, bits: int) -> jax.Array:
    """uint32 codes of float32 ``xg`` given stored, broadcastable scale and min.

    code = clip(round_half_even((x - mn) / scale), 0, 2**bits - 1), computed as one
    subtraction and one (correctly rounded) division so exact ties round to even.
    """
    levels = float(2**bits - 1)
    s = scale_s.astype(jnp.float32)
    m = mn_s.astype(jnp.float32)
    unit = jnp.where(s >= _HUGE, _HUGE_UNIT, 1.0)
    safe = jnp.where(s > 0, s * unit, 1.0)
    q = jnp.round((xg * unit - m * unit) / safe)  # jnp.round is round-half-to-even
    q = jnp.where(s > 0, q, 0.0)
    return jnp.clip(q, 0.0, levels).astype(jnp.uint32)


def dequantize_codes(codes, scale_s, mn_s, dtype) -> jax.Array:
    """code * scale + min in float32, cast to ``dtype`` (saturating, never inf)."""
    finfo = jnp.finfo(dtype)
    c = codes.astype(jnp.float32)
    s = scale_s.astype(jnp.float32)
    m = mn_s.astype(jnp.float32)
    y = c * s + m
    # huge groups: code * scale alone may overflow although the sum does not
    y_huge = (c * (s * _HUGE_UNIT) + m * _HUGE_UNIT) * _HUGE
    y = jnp.where(s >= _HUGE, y_huge, y)
    return jnp.clip(y, float(finfo.min), float(finfo.max)).astype(dtype)


def quantize(x: jax.Array, *, bits: int, group_size: int, axis: int, pack_axis: int | None = None) -> QuantizedArray:
    """Quantizes ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Keys [B, H, T, D] per-channel: ``axis=2``; values per-token: ``axis=3``.
    ``pack_axis`` (default: the token axis, ``ndim - 2``) is where codes are packed.
    """
    x = jnp.asarray(x)
    dtype = _check_float("x", x.dtype)
    packing.check_bits("bits", bits)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis")
    axis = _norm_axis("axis", axis, x.ndim)
    pack_axis = default_pack_axis(x.ndim) if pack_axis is None else _norm_axis("pack_axis", pack_axis, x.ndim)
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer")
    n = x.shape[axis]
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide the length {n} of axis {axis}")
    xf = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    xg = xf.reshape(*xf.shape[:-1], n // group_size, group_size)
    scale, mn = group_params(xg, bits, dtype, reduce_axis=-1)
    codes = quantize_codes(xg, scale, mn, bits).reshape(xf.shape)
    codes = jnp.moveaxis(codes, -1, axis)
    return QuantizedArray(
        codes=packing.pack(codes, bits, pack_axis),
        scale=jnp.moveaxis(scale[..., 0], -1, axis),
        min=jnp.moveaxis(mn[..., 0], -1, axis),
        bits=int(bits),
        group_size=int(group_size),
        axis=axis,
        pack_axis=pack_axis,
        shape=tuple(x.shape),
        dtype=dtype,
    )


def unpacked_codes(qa: QuantizedArray) -> jax.Array:
    """uint32 codes of ``qa`` in the array's own shape."""
    return packing.unpack(qa.codes, qa.bits, qa.pack_axis, qa.shape[qa.pack_axis])


def dequantize(qa: QuantizedArray) -> jax.Array:
    """x_hat = code * scale + min, in the original dtype and shape."""
    codes = unpacked_codes(qa)
    scale = jnp.repeat(qa.scale, qa.group_size, axis=qa.axis)
    mn = jnp.repeat(qa.min, qa.group_size, axis=qa.axis)
    return dequantize_codes(codes, scale, mn, qa.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fake_quantize(bits, group_size, axis, x):
    return dequantize(quantize(x, bits=bits, group_size=group_size, axis=axis))


def _fake_quantize_fwd(bits, group_size, axis, x):
    return _fake_quantize(bits, group_size, axis, x), None


def _fake_quantize_bwd(bits, group_size, axis, _, g):
    return (g,)  # straight-through: the rounding is treated as identity


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def fake_quantize(x: jax.Array, *, bits: int, group_size: int, axis: int) -> jax.Array:
    """dequantize(quantize(x)) with a straight-through gradient, for training-time simulation."""
    return _fake_quantize(bits, group_size, axis, x)
