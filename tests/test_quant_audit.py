"""Audit of the public quantization ops, the packed layout and KIVIConfig against an independent,
exact model (no jax, no kivi_jax arithmetic, no tests/reference_kivi.py).

The model is DESIGN.md §1 in exact rationals (fractions.Fraction) plus the storage rules
kivi_jax/quant.py documents: scale and min stored in the input dtype (min: the group min; scale:
the smallest dtype number with scale * (2^b - 1) >= max - min, float32 inputs rounding max - min
up to float32 first), codes round_half_even((x - min) / scale) of the stored values, clipped
(float32 inputs: x - min rounded to nearest float32), x_hat = code * scale + min rounded to
nearest into the dtype. Bit layout: design-notes' "Packed layout" (element e in word e // c at
bit bits * ((e % c) // 2) + 16 * (e % 2), c = 32 / bits).
"""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import KIVIConfig, dequantize, fake_quantize, quantize
from kivi_jax.quant import unpacked_codes

DTYPES = ("float32", "bfloat16", "float16")
NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
UINT = {2: np.uint16, 4: np.uint32}


# ---- the exact model -------------------------------------------------------------------------


def fmax(dt) -> float:
    return float(ml_dtypes.finfo(NP[dt]).max)


def neighbour(v: float, dt: str, up: bool) -> float:
    """The next ``dt`` number after finite ``v`` toward +inf (up) or -inf, by its bit pattern."""
    d = NP[dt]
    ut = UINT[d.itemsize]
    raw = int(np.asarray(v, d).view(ut))
    sign = 1 << (8 * d.itemsize - 1)
    o = -(raw & (sign - 1)) if raw & sign else raw
    o += 1 if up else -1
    return float(np.asarray(((-o) | sign) if o < 0 else o, ut).view(d))


def round_to(fr: Fraction, dt: str, mode: str) -> float:
    """``fr`` rounded into ``dt``: "up", "down" or "nearest" (ties to even), |fr| <= max."""
    c = float(np.asarray(float(fr), NP[dt]))
    while Fraction(c) > fr:
        c = neighbour(c, dt, False)
    while c < fmax(dt) and Fraction(neighbour(c, dt, True)) <= fr:
        c = neighbour(c, dt, True)
    lo = c
    if Fraction(lo) == fr:
        return lo
    hi = neighbour(lo, dt, True)
    if mode != "nearest":
        return hi if mode == "up" else lo
    dl, dh = fr - Fraction(lo), Fraction(hi) - fr
    if dl != dh:
        return lo if dl < dh else hi
    return lo if int(np.asarray(lo, NP[dt]).view(UINT[NP[dt].itemsize])) % 2 == 0 else hi


def round_half_even(fr: Fraction) -> int:
    f = fr.numerator // fr.denominator
    r = fr - f
    return f + (r > Fraction(1, 2) or (r == Fraction(1, 2) and f % 2 == 1))


def model_group(vals, bits: int, dt: str):
    """One group (finite Python floats in ``dt``) -> (codes, scale, min, x_hat in dt, exact x_hat)."""
    levels = 2**bits - 1
    mn, mx = min(vals), max(vals)
    diff = Fraction(mx) - Fraction(mn)
    if dt == "float32" and diff <= fmax(dt):
        diff = Fraction(round_to(diff, dt, "up"))
    if diff == 0:
        scale = 0.0
    elif diff / levels > fmax(dt):
        scale = fmax(dt)  # documented: a range too wide for the dtype saturates
    else:
        scale = round_to(diff / levels, dt, "up")
    edge = Fraction(fmax(dt)) + (Fraction(fmax(dt)) - Fraction(neighbour(fmax(dt), dt, False))) / 2  # rounds to inf
    while dt != "float32" and scale > 0 and Fraction(mn) + levels * Fraction(scale) >= edge:
        scale = neighbour(scale, dt, False)  # the top code must stay finite in the dtype (kernels do not clip)
    codes, exact = [], []
    for v in vals:
        if scale == 0:
            c = 0
        else:
            d = Fraction(v) - Fraction(mn)
            if dt == "float32" and d <= fmax(dt):
                d = Fraction(round_to(d, dt, "nearest"))
            c = min(max(round_half_even(d / Fraction(scale)), 0), levels)
        codes.append(c)
        exact.append(c * Fraction(scale) + Fraction(mn))
    top = Fraction(fmax(dt))
    xhat = [round_to(min(max(e, -top), top), dt, "nearest") for e in exact]
    return codes, scale, mn, xhat, exact


def model_quantize(x: np.ndarray, bits: int, group_size: int, axis: int):
    """x (NumPy, in its dtype) -> codes, scale, min, x_hat (float64 arrays) and exact x_hat (object)."""
    dt = x.dtype.name
    xm = np.moveaxis(x.astype(np.float64), axis, -1)
    gshape = xm.shape[:-1] + (xm.shape[-1] // group_size, group_size)
    flat = xm.reshape(-1, group_size)
    out = [model_group([float(v) for v in row], bits, dt) for row in flat]

    def back(a, shape):
        return np.moveaxis(np.asarray(a).reshape(shape).reshape(*xm.shape[:-1], -1), -1, axis)

    codes = back([o[0] for o in out], gshape).astype(np.int64)
    scale = back([o[1] for o in out], gshape[:-1])
    mn = back([o[2] for o in out], gshape[:-1])
    xhat = back([o[3] for o in out], gshape).astype(np.float64)
    exact = back(np.array([o[4] for o in out], dtype=object), gshape)
    return codes, scale, mn, xhat, exact


def model_pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    c = 32 // bits
    x = np.moveaxis(np.asarray(codes, np.uint64), axis, 0)
    out = np.zeros((-(-x.shape[0] // c),) + x.shape[1:], np.uint64)
    for e in range(x.shape[0]):
        out[e // c] |= x[e] << np.uint64(bits * ((e % c) // 2) + 16 * (e % 2))
    return np.moveaxis(out.astype(np.uint32), 0, axis)


def ulp32(v):
    """Spacing of float32 at |v| (float64 v, clipped to float32's range)."""
    v = np.minimum(np.abs(np.asarray(v, np.float64)), 2.0**127)
    return np.spacing(v.astype(np.float32)).astype(np.float64)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis", "pack_axis"))
def _quantize_all(x, *, bits, group_size, axis, pack_axis):
    qa = quantize(x, bits=bits, group_size=group_size, axis=axis, pack_axis=pack_axis)
    return qa, unpacked_codes(qa), dequantize(qa)


def check_against_model(x: np.ndarray, bits: int, group_size: int, axis: int, pack_axis=None):
    """Asserts quantize / dequantize of ``x`` equal the model (and the error bound); returns the
    QuantizedArray."""
    qa, codes, deq = _quantize_all(jnp.asarray(x), bits=bits, group_size=group_size, axis=axis, pack_axis=pack_axis)
    codes, deq = np.asarray(codes), np.asarray(deq)
    mc, ms, mm, mx, exact = model_quantize(x, bits, group_size, axis % x.ndim)
    assert qa.scale.dtype == x.dtype and qa.min.dtype == x.dtype and deq.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(qa.min, np.float64), mm)
    np.testing.assert_array_equal(np.asarray(qa.scale, np.float64), ms)
    np.testing.assert_array_equal(codes, mc)
    np.testing.assert_array_equal(np.asarray(qa.codes), model_pack(mc, bits, qa.pack_axis))
    d64 = deq.astype(np.float64)
    if x.dtype.name == "float32":  # x_hat in float32 arithmetic: within one ulp of the correct rounding
        assert (np.abs(d64 - mx) <= ulp32(mx)).all()
    else:  # 16-bit: code * scale + min, correctly rounded into the dtype
        np.testing.assert_array_equal(d64, mx)
    # |x - x_hat| <= scale / 2 for the numbers kept (exactly), where the scale did not saturate
    s = np.repeat(np.asarray(qa.scale, np.float64), group_size, axis=axis % x.ndim)
    err = np.vectorize(lambda xe, e: abs(Fraction(float(xe)) - e), otypes=[object])(x.astype(np.float64), exact)
    half = np.vectorize(lambda v: Fraction(v) / 2, otypes=[object])(s)
    fine = s < fmax(x.dtype.name)
    if x.dtype.name == "float32":  # (x - min is rounded: half an ulp of it more)
        half = half + np.vectorize(lambda v: Fraction(float(v)), otypes=[object])(ulp32(np.abs(x) + np.abs(s) * 2**bits))
    assert (err <= half)[fine].all()
    return qa


def data(kind: str, shape, rng):
    if kind == "normal":
        return rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3) + rng.normal() * 4
    if kind == "wide":  # exponents far apart in one group: x - min not exact in float32 for bf16
        return rng.standard_normal(shape) * np.exp2(rng.integers(-60, 60, shape))
    if kind == "ties":  # small integers and halves: exact ties (x - min) / scale = k + 1/2
        return rng.integers(-4, 5, shape) * 0.5
    if kind == "offset":  # |min| >> max - min
        return 96.0 + rng.integers(0, 32, shape) * 2.0**-3
    raise AssertionError(kind)


# ---- against the model -------------------------------------------------------------------------


CASES = [  # shape, group_size, axis, pack_axis
    ((3, 40, 5), 8, 1, None),
    ((2, 5, 48), 16, -1, -2),
    ((37, 3), 1, 0, 0),
    ((1, 2, 33, 16), 16, -1, None),
    ((6,), 3, -1, -1),
    ((3, 70), 35, 1, 1),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_codes_scales_words_and_x_hat_equal_the_exact_model(dt, bits):
    rng = np.random.default_rng([bits, DTYPES.index(dt)])
    for i, (shape, g, axis, pax) in enumerate(CASES):
        if (i + bits.bit_length() + DTYPES.index(dt)) % 2:  # half the cases each (compiles are the cost)
            continue
        kind = ("normal", "wide", "ties", "offset")[(i + bits) % 4]
        x = np.clip(data(kind, shape, rng), -fmax(dt), fmax(dt)).astype(NP[dt])
        check_against_model(x, bits, g, axis, pax)


@pytest.mark.parametrize("dt", ("bfloat16", "float16"))
def test_16_bit_ties_are_decided_on_the_exact_difference(dt):
    """Before: x - min was rounded to float32 even for 16-bit inputs, where it need not fit
    (bfloat16 5.05e-29 - (-1.53125)); at a rounded tie the even code won although the exact
    quotient is past it. bfloat16, 1 bit: (x - min) / scale = 0.5 + 1.6e-29 took code 0 (x_hat
    -1.53125 for x = 5.05e-29: |x - x_hat| > scale / 2); float16, 2 bits: 2.5 + 2^-24 took 2."""
    if dt == "bfloat16":
        row, bits, want = [5.048709793414476e-29, -1.53125, 1.5234375, 0.08642578125, 0.4453125, -0.16796875,
                           1.03125, 1.0390625], 1, [1, 0, 1, 1, 1, 0, 1, 1]
    else:
        row, bits, want = [2.0**-24, -2.5, 0.5, 0.0, -1.0, 0.5, -2.5, -0.5], 2, [3, 0, 3, 2, 2, 3, 0, 2]
    x = np.asarray(row, NP[dt]).reshape(1, 8)
    assert np.array_equal(np.asarray(x, np.float64)[0], row)
    qa = check_against_model(x, bits, 8, 1)
    np.testing.assert_array_equal(np.asarray(unpacked_codes(qa))[0], want)
    deq = np.asarray(dequantize(qa), np.float64)[0]
    assert abs(deq[0] - row[0]) <= float(qa.scale[0, 0]) / 2


def test_16_bit_x_hat_is_rounded_once():
    """Before: code * scale + min was rounded to float32, then to bfloat16 (twice): 3 * 8.67583e11
    lands on a bfloat16 tie in float32, the exact sum 1.6e-7 below it; x_hat came one ulp up
    (2.61134e12 for the group max 2.59416e12, which x_hat = code * scale + min rounds to)."""
    row = [120795955200.0, 19.5, 2594160246784.0, -1.5832483768463135e-07, 1.3329554349184036e-08,
           872415232.0, -2.6574298317427747e-12, 860160.0]
    x = np.asarray(row, NP["bfloat16"]).reshape(1, 8)
    assert np.array_equal(np.asarray(x, np.float64)[0], row)
    qa = check_against_model(x, 2, 8, 1)
    assert float(qa.scale[0, 0]) * 3 == 2602750181376.0  # (a bfloat16 midpoint: 3 s + min is just below)
    assert float(dequantize(qa)[0, 2]) == 2594160246784.0


@pytest.mark.parametrize("dt", DTYPES)
def test_non_finite_groups_stay_in_their_group(dt):
    """±inf counts as ±max: a group of +inf alone (min +inf, scale NaN before) or -inf alone
    (scale -inf before) dequantized to NaN; now to ±max, scale 0. A NaN makes its own group NaN
    (documented: no host check) and nothing else."""
    top = fmax(dt)
    rows = [[np.inf] * 4, [-np.inf] * 4, [np.inf, 1.0, 2.0, 3.0], [-np.inf, np.inf, 0.0, 1.0], [np.nan, 1.0, 2.0, 3.0],
            [0.5, 1.0, 2.0, 3.0]]
    x = jnp.asarray(np.asarray(rows, np.float64), NP[dt])
    for bits in (2,):
        qa = quantize(x, bits=bits, group_size=4, axis=1)
        scale, mn = np.asarray(qa.scale, np.float64)[:, 0], np.asarray(qa.min, np.float64)[:, 0]
        deq = np.asarray(dequantize(qa), np.float64)
        np.testing.assert_array_equal(deq[0], [top] * 4)
        np.testing.assert_array_equal(deq[1], [-top] * 4)
        assert scale[0] == scale[1] == 0 and mn[0] == top and mn[1] == -top
        assert np.isfinite(deq[[0, 1, 2, 3, 5]]).all() and (scale[[0, 1, 2, 3, 5]] >= 0).all()
        assert deq[3, 0] == -top  # (+inf: the top code, within half a step of max; exactly max unless
        # min + 3 * scale would pass it, when the scale is one ulp smaller: float16 here)
        assert 0 <= top - deq[2, 0] <= scale[2] / 2 and 0 <= top - deq[3, 1] <= scale[3] / 2
        assert (deq[2, 0] == top) == (deq[3, 1] == top) == (dt != "float16")
        assert np.isnan(deq[4]).all()
        np.testing.assert_array_equal(deq[5], model_group([0.5, 1.0, 2.0, 3.0], bits, dt)[3])


@pytest.mark.parametrize("dt", DTYPES)
def test_extremes_constant_tiny_and_float16_overflowing_range(dt):
    """Constant groups exact; float16 ±60000 (max - min 120000 overflows float16, not the
    arithmetic); float16 subnormal ranges; a range of 2 * max at one bit saturates finite."""
    top = fmax(dt)
    rows = [[7.25] * 8, [-60000.0, 60000.0, 0, 1, 2, 3, -30000.0, 30000.0], [0.0, 2.0**-24, 2.0**-23, 0, 3 * 2.0**-24, 0, 0, 0],
            [-top, top, 0.0, 1.0, -1.0, top / 2, -top / 2, 2.0]]
    x = np.asarray(rows, NP[dt])
    for bits in (1, 2, 8):
        qa = check_against_model(x, bits, 8, 1)
        deq = np.asarray(dequantize(qa), np.float64)
        assert np.isfinite(deq).all() and np.isfinite(np.asarray(qa.scale, np.float64)).all()
        np.testing.assert_array_equal(deq[0], [7.25] * 8)
        if dt == "float16" and bits == 2:
            np.testing.assert_array_equal(deq[1], [-60000, 60000, 20000, 20000, 20000, 20000, -20000, 20000])
        if dt == "float16" and bits == 8:  # 3 * 2^-24 over 255 levels: every subnormal is reproduced
            np.testing.assert_array_equal(deq[2], x[2].astype(np.float64))


# ---- eager, jit, vmap ----------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
def test_jit_and_vmap_agree_bit_for_bit(dt):
    """A vmapped quantize is each row's quantize, bit for bit, on wide-range data, exact ties and
    the 16-bit tie that the exact difference decides (op-by-op eager against jit on every dtype and
    bit width: tests/test_quant.py::test_eager_equals_jit)."""
    rng = np.random.default_rng(11)
    x = data("wide", (4, 32), rng)
    x[0] = data("ties", (32,), rng)
    x[1, :8] = [5.05e-29, -1.53125, 1.5234375, 0.0864, 0.445, -0.168, 1.03, 1.04]
    x = jnp.asarray(np.clip(x, -6e4, 6e4), NP[dt])
    for bits, axis, g in ((1, 1, 8), (4, 0, 2)):
        qa = check_against_model(np.asarray(x), bits, g, axis)
        one = lambda r: dequantize(quantize(r, bits=bits, group_size=g, axis=0))  # noqa: E731
        dv = jax.jit(jax.vmap(one, in_axes=1 - axis, out_axes=1 - axis))(x)
        np.testing.assert_array_equal(np.asarray(dv), np.asarray(dequantize(qa)))


# ---- fake_quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
def test_fake_quantize_value_and_straight_through_in_both_modes(dt):
    """Forward: dequantize(quantize(x)). Derivative: the identity, in reverse mode and in forward
    mode (jax.jvp raised "can't apply forward-mode autodiff (jvp) to a custom_vjp function")."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 32)), NP[dt])
    t = jnp.asarray(rng.standard_normal((3, 32)), NP[dt])
    f = lambda x: fake_quantize(x, bits=2, group_size=16, axis=-1)  # noqa: E731
    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dequantize(quantize(x, bits=2, group_size=16, axis=1))))
    assert not np.array_equal(np.asarray(y), np.asarray(x))
    y2, ty = jax.jvp(f, (x,), (t,))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(ty), np.asarray(t))
    g = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * t.astype(jnp.float32)))(x)
    assert g.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(t))
    if dt == "float32":
        jac = jax.jacfwd(f)(x[:1])
        np.testing.assert_array_equal(np.asarray(jac).reshape(32, 32), np.eye(32))


@pytest.mark.parametrize("dt", ("bfloat16", "float16"))
def test_16_bit_quantize_dequantize_gradient_reaches_group_min_and_max(dt):
    """jax.grad of sum(w * dequantize(quantize(x))) for 16-bit x: the codes are piecewise constant,
    so group j's gradient is sum(w (1 - c / L)) at its min element and sum(w c / L) at its max
    (x_hat = c s + mn, s = (mx - mn) / L; the one-ulp roundings count as the identity). The
    16-bit dequantization's round-to-odd step must pass the gradient (its bitcasts have no rule)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.permutation(np.arange(-32, 32)).reshape(2, 32) / 8 + 1 / 64, NP[dt])  # distinct: one min, one max
    w = rng.standard_normal((2, 32)).astype(np.float32)
    kw = dict(bits=2, group_size=16, axis=1)
    g = jax.jit(jax.grad(lambda x: jnp.sum(dequantize(quantize(x, **kw)).astype(jnp.float32) * w)))(x)
    codes = np.asarray(unpacked_codes(quantize(x, **kw)), np.float64).reshape(2, 2, 16)
    xg, wg = np.asarray(x, np.float64).reshape(2, 2, 16), w.astype(np.float64).reshape(2, 2, 16)
    want = np.zeros((2, 2, 16))
    for r, j in np.ndindex(2, 2):
        want[r, j, np.argmin(xg[r, j])] += np.sum(wg[r, j] * (1 - codes[r, j] / 3))
        want[r, j, np.argmax(xg[r, j])] += np.sum(wg[r, j] * codes[r, j] / 3)
    np.testing.assert_allclose(np.asarray(g, np.float64), want.reshape(2, 32), rtol=2e-2, atol=1e-2)
    assert (np.asarray(g, np.float64) != 0).sum() == 8  # 4 groups: their min and max elements


# ---- bad input -------------------------------------------------------------------------------


def test_bad_quantize_and_dequantize_arguments_name_what_is_wrong():
    x = jnp.ones((2, 48), jnp.float32)
    for arr in (x, np.ones(3), [1.0]):  # before: AttributeError "...Tracer has no attribute codes"
        with pytest.raises(TypeError, match=r"^dequantize takes the QuantizedArray that quantize returns; got "
                                            + type(arr).__name__ + "$"):
            dequantize(arr)
    with pytest.raises(TypeError, match="QuantizedArray"):
        jax.jit(dequantize)(x)
    cases = [(dict(bits=3), r"^bits=3 is not supported; allowed: \(1, 2, 4, 8\)"),
             (dict(bits=np.int64(3)), r"^bits=np.int64\(3\) is not supported"),
             (dict(group_size=0), r"^group_size=0 must be a positive integer"),
             (dict(group_size=32), r"^group_size=32 must divide the length 48 of axis 1"),
             (dict(group_size=16.0), r"^group_size=16.0 must be a positive integer"),
             (dict(axis=2), r"^axis=2 is out of range for an array of rank 2"),
             (dict(axis=-3), r"^axis=-3 is out of range"),
             (dict(axis=None), r"^axis=None must be an integer axis in \[-2, 2\)"),
             (dict(pack_axis=2), r"^pack_axis=2 is out of range"),
             (dict(pack_axis=1.0), r"^pack_axis=1.0 must be an integer axis")]
    for kw, msg in cases:
        args = dict(bits=2, group_size=16, axis=1) | kw
        with pytest.raises(ValueError, match=msg):
            quantize(x, **args)
    with pytest.raises(ValueError, match=r"^x dtype int32 is not supported; allowed: float32, bfloat16, float16"):
        quantize(jnp.ones((2, 16), jnp.int32), bits=2, group_size=16, axis=1)
    # NumPy integers are integers (what an array or a sweep hands over)
    qa = quantize(x, bits=np.int64(2), group_size=np.int32(16), axis=np.int64(-1))
    assert (qa.bits, qa.group_size, qa.axis) == (2, 16, 1) and qa.scale.shape == (2, 3)


def test_kivi_config_takes_numpy_integers_and_names_bad_fields():
    """Before: KIVIConfig(group_size=np.int64(32)) raised "group_size=np.int64(32) must be a
    power of two >= 16" (likewise residual_length, key_group_size) while k_bits took np.int64."""
    cfg = KIVIConfig(k_bits=np.int64(4), v_bits=np.int32(2), group_size=np.int64(32),
                     residual_length=np.int64(64), sink_tokens=np.int64(4), key_group_size=np.int16(16))
    assert cfg == KIVIConfig(k_bits=4, v_bits=2, group_size=32, residual_length=64, sink_tokens=4, key_group_size=16)
    assert all(type(getattr(cfg, f)) is int for f in ("k_bits", "v_bits", "group_size", "residual_length",
                                                         "sink_tokens", "key_group_size"))
    assert hash(cfg) == hash(KIVIConfig(k_bits=4, v_bits=2, group_size=32, residual_length=64, sink_tokens=4,
                                        key_group_size=16))
    for kw, msg in [(dict(k_bits=3), r"^k_bits=3 is not supported; allowed: \(1, 2, 4, 8\)"),
                    (dict(v_bits=2.0), r"^v_bits=2.0 is not supported"),
                    (dict(group_size=48), r"^group_size=48 must be a power of two >= 16"),
                    (dict(group_size=8), r"^group_size=8 must be a power of two >= 16"),
                    (dict(group_size=32.0), r"^group_size=32.0 must be a power of two"),
                    (dict(residual_length=80), r"^residual_length=80 must be a positive multiple of group_size=32"),
                    (dict(residual_length=np.int64(0)), r"^residual_length=0 must be a positive multiple"),
                    (dict(sink_tokens=-1), r"^sink_tokens=-1 must be an integer >= 0"),
                    (dict(sink_tokens=True), r"^sink_tokens=True must be an integer >= 0"),
                    (dict(key_group_size=256), r"^key_group_size=256 must be a power of two >= 16 dividing"),
                    (dict(rotate="q"), r"^rotate='q'; allowed"),
                    (dict(layout="x"), r"^layout='x'; allowed"),
                    (dict(layout="mosaic", v_bits=4), r"^layout='mosaic' takes KIVI-2 only; got v_bits=4")]:
        with pytest.raises(ValueError, match=msg):
            KIVIConfig(**kw)


def test_byte_counts_refuse_bad_sizes_and_dtypes():
    """Before: num_kv_heads=-1 gave a negative byte count, head_dim=128.0 or num_kv_heads=2.5 a
    fractional one, num_layers=0 zero, dtype=int8 or float64 a number for a cache that cannot exist."""
    cfg = KIVIConfig()
    good = dict(num_kv_heads=8, head_dim=128)
    for fn in (cfg.bytes_per_token, cfg.residual_bytes, kj.dense_bytes_per_token):
        for name, bad in [("num_kv_heads", 0), ("num_kv_heads", -1), ("num_kv_heads", 2.5), ("num_kv_heads", True),
                          ("head_dim", 0), ("head_dim", 128.0), ("num_layers", 0), ("num_layers", -2)]:
            with pytest.raises(ValueError, match=rf"^{name}={bad!r} must be an integer >= 1$"):
                fn(**(good | {name: bad}))
        for dtype, msg in [(jnp.int8, "cache dtype int8 is not supported"), (jnp.float64, "float64 is not supported"),
                           ("foo", r"cache dtype 'foo' is not a dtype")]:
            with pytest.raises(ValueError, match=msg):
                fn(**good, dtype=dtype)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=rf"^max_length={bad!r} must be an integer >= 1$"):
            cfg.capacity(bad)


# ---- byte counts against real buffers ----------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
def test_bytes_per_token_matches_the_buffers_of_a_cache(dt):
    """A cache's buffers = B * (capacity * bytes_per_token + residual_bytes) + its lengths and
    overflow flags (5 bytes a row), for both layouts and many configs; QuantizedArray.nbytes is
    its three buffers' bytes."""
    configs = [KIVIConfig(), KIVIConfig(k_bits=4, v_bits=2, group_size=16, residual_length=32),
               KIVIConfig(k_bits=1, v_bits=8, group_size=64, residual_length=128, sink_tokens=3),
               KIVIConfig(k_bits=2, v_bits=4, group_size=16, residual_length=64, key_group_size=64),
               KIVIConfig(k_bits=8, v_bits=1, group_size=32, residual_length=32, key_group_size=16, sink_tokens=1),
               KIVIConfig(layout="mosaic"), KIVIConfig(layout="mosaic", residual_length=64, sink_tokens=4)]
    for cfg in configs:
        for b, h, d, max_length in ((1, 1, 128, 5), (2, 3, 128, 700), (3, 2, 64, 2048), (1, 4, 256, 513)):
            cls = kj.MosaicKIVICache if cfg.layout == "mosaic" else kj.KIVICache
            if d % cfg.group_size or (cls is kj.MosaicKIVICache and d != 128):
                continue
            cache = jax.eval_shape(lambda: cls.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=max_length,
                                                    dtype=NP[dt]))  # (the leaves' shapes and dtypes)
            assert cache.capacity >= max_length - cfg.sink_tokens
            total = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(cache))
            kw = dict(num_kv_heads=h, head_dim=d, dtype=NP[dt])
            per_token = cfg.bytes_per_token(**kw)
            assert total == b * (cache.capacity * per_token + cfg.residual_bytes(**kw)) + 5 * b, (cfg, b, h, d)
            # two layers: twice the bytes
            assert cfg.bytes_per_token(**kw, num_layers=2) == 2 * per_token
    x = jnp.ones((3, 40, 5), NP[dt])
    for bits, g, axis in ((2, 8, 1), (4, 5, 2), (1, 40, 1), (8, 1, 0)):
        qa = quantize(x, bits=bits, group_size=g, axis=axis)
        want = 4 * 3 * 5 * -(-40 // (32 // bits)) + 2 * NP[dt].itemsize * x.size // g
        assert qa.nbytes == want == sum(a.nbytes for a in jax.tree_util.tree_leaves(qa))
