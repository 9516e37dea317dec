"""KIVI's asymmetric min/max group quantization as pure JAX ops.

For a group x of G numbers (G consecutive elements along ``axis``):

    mn = min(x); scale = (max(x) - mn) / (2**bits - 1)
    code = clip(round_half_even((x - mn) / scale), 0, 2**bits - 1);  x_hat = code * scale + mn

Scale and min are stored in the input's dtype (fp16/bf16: KIVI's 3 bits per number at
2 bits, G=32). They are rounded *outward* (min down, scale up) before the codes are
computed from the stored values, so |x - x_hat| <= scale / 2 holds for the numbers we
actually keep, and no code is clipped. A constant group has scale 0 and dequantizes to
exactly its value. Arithmetic is float32 whatever the input dtype.

Exactness: the stored scale is the smallest ``dtype`` number with
scale * (2**bits - 1) >= max - min (float32 inputs: max - min rounded up to float32), and
codes are exactly round_half_even((x - mn) / scale) of the stored values (float32 inputs:
x - mn rounded to float32). Both are settled with exact comparisons, not taken from a
division: XLA computes x / s for a broadcast s as x * (1 / s) (not correctly rounded, and
0 once s >= 2**126 on CPU) and contracts a * b + c into an FMA under jit only. So eager,
jit and vmap give the same bits, and bfloat16/float16 results equal an exact model's: codes
from the exact x - mn (its float32 rounding error breaks the ties it decides), x_hat =
code * scale + mn rounded once into the dtype. float32 x_hat is within one float32 ulp of that.
Limits: a group whose (max - min) / (2**bits - 1) exceeds the dtype's max gets the max as
scale (codes and outputs stay finite; the scale / 2 bound cannot hold); XLA CPU flushes
float32 subnormals, so a group whose scale would be below ~1e-38 is treated as constant.
Non-finite inputs are not checked (that would need a host sync): a NaN makes its whole group
NaN (G tokens of a key channel, G channels of a value token; nothing outside the group), and
±inf counts as ±the dtype's max (a group of +inf alone stores min = max, scale 0; a group
holding one has a range that wide, so its finite numbers fall to the level nearest them).

Gradients: the codes are piecewise constant, so under ``jax.grad`` a group's gradient reaches
its min and max elements through the stored scale and min (the one-ulp outward steps count as
the identity); :func:`fake_quantize` is the straight-through alternative for training.

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
from jax import lax

from kivi_jax import packing
from kivi_jax.checks import check_float, is_int
from kivi_jax.eager import jit_when_eager


def _norm_axis(name: str, axis: int, ndim: int) -> int:
    if not is_int(axis):  # (True was axis 1, 1.0 "out of range")
        raise ValueError(f"{name}={axis!r} must be an integer axis in [-{ndim}, {ndim})")
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


# ---- exact float32 helpers -----------------------------------------------------------------
# XLA (CPU at least) computes x / s with s broadcast -- per group -- as x * (1 / s), which is
# not correctly rounded, and it contracts a * b + c into a fused multiply-add under jit but
# not eagerly. Left alone, a tie (x - mn) / scale = k + 1/2 can round the wrong way and
# eager, jit and vmap can disagree in the last bit. So quotients are only *estimated* by
# division and then settled by comparisons with exact products, and products are split
# so that every multiplication is exact (then an FMA or not gives the same bits).

_HI_MASK = 0xFFFFFC00  # keeps the top 14 significant bits of a float32


def _split(s):
    """s == hi + lo exactly, hi with at most 14 and lo with at most 10 significant bits."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(s, jnp.uint32) & jnp.uint32(_HI_MASK), jnp.float32)
    return hi, s - hi


def _ge_product(c, s, d, d_err=None):
    """c * s >= d decided exactly, for float32 c with at most 10 significant bits (codes and
    half-codes below 512, levels), s >= 0 and d finite. ``d_err``: d's rounding error (d stands
    for d + d_err), for a c * s that is itself a float32 number (a 16-bit s): then c * s lies on
    no side of the rounded d but the exact one's, and only c * s == d needs the error's sign."""
    hi, lo = _split(s)
    # c * hi and c * lo are exact; a rounded difference never changes sign
    t, r = c * hi - d, -(c * lo)
    if d_err is None:
        return t >= r
    return (t > r) | ((t == r) & (d_err <= 0))


def _le_product(c, s, d, d_err=None):
    """c * s <= d decided exactly (same conditions as :func:`_ge_product`)."""
    return _ge_product(-c, s, -d, None if d_err is None else -d_err)


def _two_sum_err(a, b, total):
    """The rounding error of ``total = a + b`` (Knuth's TwoSum: exact, no multiplication)."""
    bb = total - a
    return (a - (total - bb)) + (b - bb)


@jax.custom_jvp
def _round_to_odd(y, err):
    """float32 ``y = fl(v)`` and err = v - y exactly -> v rounded to odd in float32 (y when exact,
    else whichever of y and its neighbour toward v has an odd last bit). A 16-bit float's
    round-to-nearest-even of that is v's own, correctly rounded (float32 keeps more than two extra
    bits), where rounding y itself would round twice (a tie in the dtype that v is not).
    Differentiable as the identity in y (at most one ulp away; the bitcasts have no rule)."""
    b = lax.bitcast_convert_type(y, jnp.uint32)
    fix = jnp.isfinite(y) & (err != 0) & ((b & 1) == 0)  # (err != 0 implies y != 0)
    grow = (err > 0) == (y > 0)  # the magnitude goes up toward v
    stepped = jnp.where(grow, b + jnp.uint32(1), b - jnp.uint32(1))
    return lax.bitcast_convert_type(jnp.where(fix, stepped, b), jnp.float32)


@_round_to_odd.defjvp
def _round_to_odd_jvp(primals, tangents):
    return _round_to_odd(*primals), tangents[0]  # (err's derivative is 0: TwoSum's error is)


def _exact_madd(c, s, m):
    """c * s + m with c * s computed exactly in two parts (same bits with or without FMA)."""
    hi, lo = _split(s)
    return (c * hi + m) + c * lo


@jax.custom_jvp
def next_after(x, toward):
    """jnp.nextafter(x, toward) elementwise. 16-bit floats step their bit pattern (the next
    representable number is one integer step away), decided on the bits so that subnormals are
    stepped, not flushed (XLA:CPU's bfloat16 nextafter flushes them), and so that it lowers in
    Pallas's Triton kernels, whose nextafter takes only float32 and float64. Differentiable as
    the identity in x (one ulp away; jax has no rule for nextafter), so gradients flow through a
    group's stored scale and min."""
    x = jnp.asarray(x)
    toward = jnp.asarray(toward, x.dtype)
    if x.dtype.itemsize != 2:
        return jnp.nextafter(x, toward)
    bits, tbits = (lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.int32) for a in (x, toward))

    def order(b):  # the bit patterns in the numbers' order (-0 and +0 both 0x8000)
        return jnp.where(b >= 0x8000, 0x10000 - b, 0x8000 + b)

    up, same = order(tbits) > order(bits), order(tbits) == order(bits)
    negative, zero = bits >= 0x8000, (bits & 0x7FFF) == 0
    stepped = jnp.where(up != negative, bits + 1, bits - 1)  # (x != 0) the magnitude grows or shrinks
    stepped = jnp.where(zero, jnp.where(up, 1, 0x8001), stepped)  # from zero: the smallest subnormal
    out = lax.bitcast_convert_type(stepped.astype(jnp.uint16), x.dtype)
    nan = jnp.isnan(x.astype(jnp.float32)) | jnp.isnan(toward.astype(jnp.float32))
    return jnp.where(nan, x + toward, jnp.where(same, toward, out))


@next_after.defjvp
def _next_after_jvp(primals, tangents):
    x, toward = primals
    return next_after(x, toward), jnp.asarray(tangents[0], jnp.asarray(x).dtype)


def _round_outward(value_f32, dtype, direction):
    """Casts float32 ``value_f32`` to ``dtype``, stepping one ulp toward ``direction`` if rounding went the other way."""
    cast = value_f32.astype(dtype)
    fix = (cast.astype(jnp.float32) > value_f32) if direction < 0 else (cast.astype(jnp.float32) < value_f32)
    stepped = next_after(cast, jnp.full_like(cast, -jnp.inf if direction < 0 else jnp.inf))
    return jnp.where(fix, stepped, cast)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _group_extreme(x, axis: int, reduce):
    """reduce (jnp.min / jnp.max) of x along ``axis``, kept. Derivative: jnp.min's / max's (the
    tangent shared evenly among the elements equal to the result), except where none compares
    equal, when it goes to the arg-min / arg-max element: jax's own rule divides by that count of
    0. In a model's jitted gradient at XLA:CPU -O0 (the test suite's level) it was 0 for some
    groups (the operand as compared not bit-equal to the one reduced) and the inf that followed
    made every gradient upstream NaN.

    A NaN in the group gives NaN, on every backend: XLA:CPU's vectorized min/max reductions drop
    NaN (it compiles them without NaN propagation, openxla/xla#21461), so over a non-minor axis of
    a few thousand elements (a cache's keys [2, 2, 32, 32] in groups of 16 tokens) a NaN key
    vanished and its group quantized as if it were not there: a finite, wrong x_hat where the
    module promises NaN. The NaN test is a max over a 0/1 mask (no reduce_or: the Triton lowering
    of the append kernels, which quantize with this function, has none)."""
    out = reduce(x, axis=axis, keepdims=True)
    nan = jnp.max(jnp.where(jnp.isnan(x), 1.0, 0.0), axis=axis, keepdims=True) > 0
    return jnp.where(nan, jnp.asarray(jnp.nan, out.dtype), out)


@_group_extreme.defjvp
def _group_extreme_jvp(axis, reduce, primals, tangents):
    (x,), (t,) = primals, tangents
    out = _group_extreme(x, axis, reduce)
    hit = (x == out).astype(t.dtype)
    count = jnp.sum(hit, axis=axis, keepdims=True)
    arg = (jnp.argmax if reduce is jnp.max else jnp.argmin)(x, axis=axis, keepdims=True)
    first = (lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim) == arg).astype(t.dtype)
    share = jnp.where(count > 0, hit / jnp.maximum(count, 1), first)
    return out, jnp.sum(share * t, axis=axis, keepdims=True)


def group_params(xg: jax.Array, bits: int, dtype, reduce_axis: int):
    """Stored (scale, min) of groups laid out along ``reduce_axis`` of float32 ``xg``.

    Returns scale and min in ``dtype``, with ``reduce_axis`` kept (size 1). min is the group
    min rounded down into ``dtype``; scale is the smallest ``dtype`` number with
    scale * (2**bits - 1) >= max - min (exactly, whenever max - min fits float32), except that a
    16-bit scale steps down where min + scale * (2**bits - 1) would round to inf in the dtype.
    """
    levels = float(2**bits - 1)
    finfo = jnp.finfo(dtype)
    # ±inf counts as ±the dtype's max (a group of +inf alone had min +inf and a NaN scale,
    # one of -inf alone a scale of -inf: both dequantized to NaN)
    lim = (float(finfo.min), float(finfo.max))
    mn = jnp.clip(_group_extreme(xg, reduce_axis, jnp.min), *lim)
    mx = jnp.clip(_group_extreme(xg, reduce_axis, jnp.max), *lim)
    mn_s = _round_outward(mn, dtype, -1)
    mn_f = mn_s.astype(jnp.float32)
    # max - min as one subtraction (mx / levels - mn / levels loses everything when
    # |mn| >> max - min), rounded up: TwoSum gives the exact error of the subtraction.
    diff = mx - mn_f
    back = diff - mx
    err = (mx - (diff - back)) + (-mn_f - back)
    diff = jnp.where(err > 0, next_after(diff, jnp.full_like(diff, jnp.inf)), diff)
    finite = jnp.isfinite(diff)
    # estimate (huge groups whose difference overflows: divide first), then settle exactly
    scale = jnp.where(finite, diff / levels, mx / levels - mn_f / levels)
    scale_s = _round_outward(jnp.minimum(scale, float(finfo.max)), dtype, +1)
    d_ok = jnp.where(finite, diff, 0.0)
    lv = jnp.float32(levels)
    for _ in range(2):  # the estimate is at most two ulps low
        low = finite & ~_ge_product(lv, scale_s.astype(jnp.float32), d_ok)
        scale_s = jnp.where(low, next_after(scale_s, jnp.full_like(scale_s, jnp.inf)), scale_s)
    prev = next_after(scale_s, jnp.zeros_like(scale_s))
    high = finite & (scale_s > 0) & _ge_product(lv, prev.astype(jnp.float32), d_ok)
    scale_s = jnp.where(high, prev, scale_s)
    scale_s = jnp.minimum(scale_s.astype(jnp.float32), float(finfo.max)).astype(dtype)
    if jnp.dtype(dtype).itemsize == 2:
        # the top code must dequantize finitely: min + levels * scale has to round below inf in
        # the dtype, i.e. stay under max + half its ulp (the kernels compute it in the dtype,
        # without the clip dequantize_codes applies: float16 [-65504, 65504] at 2 bits had scale
        # 43680, 3 * 43680 - 65504 = 65536 -> inf). One ulp down keeps |x - x_hat| well inside
        # scale / 2. Decided exactly: levels * scale is a float32 number and TwoSum gives the
        # error of adding min (a bound taken from a constant instead was folded away by XLA:CPU
        # under jit: (C - x) - C became -x). (float32 caches: values near 3.4e38, not checked.)
        edge = float(finfo.max) + 2.0 ** (finfo.maxexp - 2) * float(finfo.eps)  # max + ulp / 2: rounds to inf
        mn_f = mn_s.astype(jnp.float32)
        for _ in range(2):
            top = lv * scale_s.astype(jnp.float32)  # exact: 8 bits times 8 or 11
            y = top + mn_f
            err = _two_sum_err(top, mn_f, y)
            over = finite & (scale_s > 0) & ((y > edge) | ((y == edge) & (err >= 0)))
            scale_s = jnp.where(over, next_after(scale_s, jnp.zeros_like(scale_s)), scale_s)
    return scale_s, mn_s


# Scales at or above this are handled in units of _HUGE_UNIT: on XLA CPU, x / s returns 0
# once s >= 2**126 (the reciprocal is flushed to zero), and x - mn or code * scale can
# overflow float32. Scaling by a power of two is exact, so results are unchanged otherwise.
_HUGE = 2.0**64
_HUGE_UNIT = 2.0**-64


def quantize_codes(xg: jax.Array, scale_s, mn_s, bits: int) -> jax.Array:
    """uint32 codes of float32 ``xg`` given stored, broadcastable scale and min.

    code = clip(round_half_even((x - mn) / scale), 0, 2**bits - 1). The quotient is
    estimated by division and settled by exact comparisons (see above), so ties go to the
    even code and every compilation mode gives the same codes.
    """
    levels = float(2**bits - 1)
    s = scale_s.astype(jnp.float32)
    m = mn_s.astype(jnp.float32)
    unit = jnp.where(s >= _HUGE, _HUGE_UNIT, 1.0)
    safe = jnp.where(s > 0, s * unit, 1.0)
    xu, mu = xg * unit, m * unit  # exact products, so no FMA question
    d = xu - mu  # >= 0
    # 16-bit dtypes: x - mn need not fit float32 (bfloat16 1e-29 - (-1.53125)); its rounding
    # error decides the comparisons where c * s equals the rounded d (a tie the exact quotient is
    # not: round-half-even took the even code). float32 inputs: x - mn rounded, as documented.
    d_err = _two_sum_err(xu, -mu, d) if jnp.dtype(scale_s.dtype).itemsize == 2 else None
    f = jnp.clip(jnp.floor(d / safe), -1.0, levels + 1.0)
    # settle f = floor(d / s), i.e. f * s <= d < (f + 1) * s (the estimate is off by at most one)
    f = (f + _le_product(f + 1.0, safe, d, d_err).astype(jnp.float32)
         - (~_le_product(f, safe, d, d_err)).astype(jnp.float32))
    above = ~_ge_product(f + 0.5, safe, d, d_err)  # d > (f + 1/2) s
    tie = _ge_product(f + 0.5, safe, d, d_err) & _le_product(f + 0.5, safe, d, d_err)
    odd = jnp.fmod(f, 2.0) != 0
    q = f + (above | (tie & odd)).astype(jnp.float32)
    q = jnp.where(s > 0, q, 0.0)
    return jnp.clip(q, 0.0, levels).astype(jnp.uint32)


def dequantize_codes(codes, scale_s, mn_s, dtype) -> jax.Array:
    """code * scale + min in float32, cast to ``dtype`` (saturating, never inf): correctly rounded
    for 16-bit dtypes, within one ulp for float32."""
    finfo = jnp.finfo(dtype)
    c = codes.astype(jnp.float32)
    s = scale_s.astype(jnp.float32)
    m = mn_s.astype(jnp.float32)
    if jnp.dtype(dtype).itemsize == 2:
        # code * scale is exact in float32 (8 + 11 bits), the sum rounded once, to odd: the
        # cast below then rounds code * scale + min correctly into the dtype (rounded to nearest
        # float32 first, bfloat16 3 * 8.67583e11 - 1.58e-7 sat on a tie and went one ulp up)
        def madd(c, s, m):
            p = c * s
            y = p + m
            return _round_to_odd(y, _two_sum_err(p, m, y))
    else:
        madd = _exact_madd
    y = madd(c, s, m)
    # huge groups: code * scale alone may overflow although the sum does not
    # (code 0 is the min itself: m * _HUGE_UNIT could underflow)
    y_huge = jnp.where(c == 0, m, madd(c, s * _HUGE_UNIT, m * _HUGE_UNIT) * _HUGE)
    y = jnp.where(s >= _HUGE, y_huge, y)
    return jnp.clip(y, float(finfo.min), float(finfo.max)).astype(dtype)


def quantize_groups(xg: jax.Array, bits: int, dtype, reduce_axis: int):
    """float32 ``xg`` with its groups along ``reduce_axis`` -> (codes uint32 like xg, scale, min
    in ``dtype`` with reduce_axis kept, size 1): :func:`group_params` then :func:`quantize_codes`."""
    scale, mn = group_params(xg, bits, dtype, reduce_axis=reduce_axis)
    return quantize_codes(xg, scale, mn, bits), scale, mn


@jit_when_eager(static_argnames=("bits", "group_size", "axis", "pack_axis"))
def quantize(x: jax.Array, *, bits: int, group_size: int, axis: int, pack_axis: int | None = None) -> QuantizedArray:
    """Quantizes ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Keys [B, H, T, D] per-channel: ``axis=2``; values per-token: ``axis=3``.
    ``pack_axis`` (default: the token axis, ``ndim - 2``) is where codes are packed.
    """
    x = jnp.asarray(x)
    dtype = check_float("x", x.dtype)
    packing.check_bits("bits", bits)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis")
    axis = _norm_axis("axis", axis, x.ndim)
    pack_axis = default_pack_axis(x.ndim) if pack_axis is None else _norm_axis("pack_axis", pack_axis, x.ndim)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer")
    n = x.shape[axis]
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide the length {n} of axis {axis}")
    xf = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    xg = xf.reshape(*xf.shape[:-1], n // group_size, group_size)
    codes, scale, mn = quantize_groups(xg, bits, dtype, reduce_axis=-1)
    codes = jnp.moveaxis(codes.reshape(xf.shape), -1, axis)
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


def _check_quantized(qa) -> None:
    if not isinstance(qa, QuantizedArray):  # (an array failed inside jit: "no attribute codes")
        raise TypeError(f"dequantize takes the QuantizedArray that quantize returns; got {type(qa).__name__}")


@jit_when_eager(validate=_check_quantized)
def dequantize(qa: QuantizedArray) -> jax.Array:
    """x_hat = code * scale + min, in the original dtype and shape."""
    _check_quantized(qa)
    codes = unpacked_codes(qa)
    scale = jnp.repeat(qa.scale, qa.group_size, axis=qa.axis)
    mn = jnp.repeat(qa.min, qa.group_size, axis=qa.axis)
    return dequantize_codes(codes, scale, mn, qa.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fake_quantize(bits, group_size, axis, x):
    return dequantize(quantize(x, bits=bits, group_size=group_size, axis=axis))


@_fake_quantize.defjvp
def _fake_quantize_jvp(bits, group_size, axis, primals, tangents):
    # straight-through: the rounding is treated as identity. A JVP rule (a custom_vjp until
    # 2026-12) serves forward mode too: jax.jvp / jacfwd raised on the custom_vjp.
    (x,), (t,) = primals, tangents
    return _fake_quantize(bits, group_size, axis, x), t


@jit_when_eager(static_argnames=("bits", "group_size", "axis"))
def fake_quantize(x: jax.Array, *, bits: int, group_size: int, axis: int) -> jax.Array:
    """dequantize(quantize(x)) with a straight-through gradient, for training-time simulation."""
    return _fake_quantize(bits, group_size, axis, x)
