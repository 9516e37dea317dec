"""quantize / dequantize / fake_quantize against the float64 NumPy reference, plus properties.

What a quantized group must satisfy (DESIGN.md §1, issue 2), for inputs in float32,
bfloat16 and float16:

* the stored min is the group's min (it is representable in the input dtype);
* the stored scale is (max - min) / (2^b - 1) rounded up into the dtype: never below the
  exact value (so no code clips), at most one ulp above (exactly the rounded-up value when
  max - min is exact in float32, as for bfloat16 / float16 inputs);
* codes are clip(round_half_even((x - min) / scale)) computed from the *stored* scale and
  min, in [0, 2^b - 1]; exact ties go to the even code (x - min is rounded to float32
  for float32 inputs: only at such a near-tie may a code differ from the float64 one);
* |x - (code * scale + min)| <= scale / 2 per element; constant groups are exact;
* dequantize returns the input dtype, x_hat rounded into it, never NaN or Inf.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kivi_jax
from kivi_jax import QuantizedArray, dequantize, fake_quantize, packing, quantize
from kivi_jax.quant import unpacked_codes
from xla_levels import RUN_OPTIONS
import reference_kivi as ref

def examples(n):
    """n examples in CI; the profile's count when a longer profile is loaded (conftest.py)."""
    return settings(max_examples=max(n, settings.default.max_examples) if settings.default.max_examples > 25 else n)


DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
BITS = (1, 2, 4, 8)
F32_TINY = float(np.finfo(np.float32).tiny)


def ulp(v, dtype):
    """Spacing of ``dtype`` at float64 magnitudes |v| (subnormal spacing below the normal range)."""
    fi = ref.finfo(dtype)
    a = np.abs(np.asarray(v, np.float64))
    e = np.floor(np.log2(np.maximum(a, float(fi.tiny))))
    return np.exp2(e - fi.nmant)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis"))
def _quant_jit(x, *, bits, group_size, axis):
    qa = quantize(x, bits=bits, group_size=group_size, axis=axis)
    return qa, dequantize(qa), unpacked_codes(qa)


def check_quantized(x, qa, deq, codes, *, bits, group_size, axis):
    """Asserts every property in the module docstring for input ``x`` (NumPy, in its dtype)."""
    dtype = x.dtype
    levels = 2**bits - 1
    fmax = float(ref.finfo(dtype).max)
    axis = axis % x.ndim
    gshape = list(x.shape)
    gshape[axis] //= group_size

    # structure
    assert isinstance(qa, QuantizedArray)
    assert qa.codes.dtype == jnp.uint32 and qa.scale.dtype == dtype and qa.min.dtype == dtype
    assert qa.scale.shape == tuple(gshape) and qa.min.shape == tuple(gshape)
    assert (qa.bits, qa.group_size, qa.axis, qa.shape, qa.dtype) == (bits, group_size, axis, x.shape, dtype)
    pax = qa.pack_axis
    assert qa.codes.shape[pax] == packing.packed_len(x.shape[pax], bits)
    assert deq.dtype == dtype and deq.shape == x.shape

    codes = np.asarray(codes).astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= levels

    # group views: [..., n_groups, G]
    def groups(a):
        a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
        return a.reshape(*a.shape[:-1], a.shape[-1] // group_size, group_size)

    xg, cg, dg = groups(x.astype(np.float64)), groups(codes), groups(np.asarray(deq).astype(np.float64))
    s = np.moveaxis(np.asarray(qa.scale).astype(np.float64), axis, -1)[..., None]
    m = np.moveaxis(np.asarray(qa.min).astype(np.float64), axis, -1)[..., None]
    mn, mx = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    exact = (mx - mn) / levels
    saturated = exact > fmax  # (max - min) / levels does not fit the dtype: no error bound
    ftz = (exact < 2**10 * F32_TINY) & ~saturated  # XLA CPU flushes float32 subnormals
    normal = ~saturated & ~ftz

    # stored min: the group's min itself
    np.testing.assert_array_equal(m, mn)
    # stored scale: (max - min) / levels rounded up into the dtype -- never below the exact
    # value (so no code clips); at most one ulp above the correctly rounded-up value (float32
    # inputs: max - min is rounded up to float32 first)
    ref_s = ref.round_directed(np.minimum(exact, fmax), dtype, up=True)
    ok = (s >= exact * (1 - 1e-12)) & (s <= ref.step(ref.to_dtype(ref_s, dtype), up=True).astype(np.float64))
    # except where min + levels * scale would pass the dtype's max: one ulp down, so the top code
    # dequantizes finitely in the kernels' own arithmetic (which does not clip)
    inf_at = fmax + ulp(fmax, dtype) / 2  # (float64 holds these sums exactly for 16-bit dtypes)
    edge = normal & (m + levels * ref_s >= inf_at) & (dtype != np.float32)
    assert ok[normal & ~edge].all(), (s[normal & ~ok], exact[normal & ~ok])
    assert (m + levels * s < inf_at)[edge].all() and (s >= exact * (1 - 2.0**-8))[edge].all()
    assert (s[saturated] == fmax).all()
    assert (s[mx == mn] == 0).all()

    # codes from the stored scale and min, float64, round half to even
    t = (xg - m) / np.where(s > 0, s, 1.0)
    want = np.where(s > 0, np.clip(np.round(t), 0, levels), 0)
    frac = t - np.floor(t)
    near_tie = (np.abs(frac - 0.5) < 1e-6 * np.maximum(1.0, np.abs(t))) & (dtype == np.float32)
    diff = cg != want
    bad = (diff & ~near_tie) | (np.abs(cg - want) > 1)
    bad &= np.broadcast_to(normal, bad.shape)
    assert not bad.any(), (t[bad][:8], cg[bad][:8], want[bad][:8])

    # error bound on the numbers we keep, and exactness of constant groups
    xhat = cg * s + m
    err = np.abs(xg - xhat)
    slack = 1.0 if dtype != np.float32 else 1 + 1e-6  # float32: x - min itself is rounded
    bound = np.where(normal, s / 2 * slack, np.where(ftz, mx - mn, np.inf))
    assert (err <= bound).all(), (err[err > bound][:8], bound.repeat(group_size, -1)[err > bound][:8])
    const = np.broadcast_to(mx == mn, xg.shape)
    np.testing.assert_array_equal(dg[const], xg[const])

    # dequantize: x_hat rounded into the dtype (float32 arithmetic: a couple of ulps more)
    assert np.isfinite(dg).all()
    xhat_c = np.clip(xhat, -fmax, fmax)
    tol = ulp(xhat_c, dtype) + 2 * ulp(np.maximum(np.abs(cg * s), np.abs(m)), np.float32)
    assert (np.abs(dg - xhat_c) <= tol).all()


# ---- deterministic cases -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_half_to_even_and_known_codes(dtype):
    # scale = (3 - 0) / 3 = 1, min 0: (x - min) / scale is x itself; ties go to the even code
    x = jnp.asarray([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.5]], dtype)
    qa, deq, codes = _quant_jit(x, bits=2, group_size=8, axis=1)
    np.testing.assert_array_equal(np.asarray(codes), [[0, 0, 2, 2, 3, 1, 2, 0]])
    assert float(qa.scale[0, 0]) == 1.0 and float(qa.min[0, 0]) == 0.0
    np.testing.assert_array_equal(np.asarray(deq, np.float64), [[0, 0, 2, 2, 3, 1, 2, 0]])
    # 1 bit: codes 0 / 1 with the 0.5 tie going to 0
    y = jnp.asarray([[-1.0, 1.0, 0.0, 0.5]], dtype)
    np.testing.assert_array_equal(np.asarray(_quant_jit(y, bits=1, group_size=4, axis=1)[2]), [[0, 1, 0, 1]])  # t = 0, 1, .5, .75


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_per_channel_values_per_token_shapes(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 64, 32)), dtype)
    qk = _quant_jit(x, bits=2, group_size=32, axis=2)[0]  # keys: groups of 32 tokens per channel
    qv = _quant_jit(x, bits=2, group_size=32, axis=3)[0]  # values: groups of 32 channels per token
    assert qk.scale.shape == (2, 3, 2, 32) and qv.scale.shape == (2, 3, 64, 1)
    assert qk.pack_axis == qv.pack_axis == 2  # codes packed along tokens for both
    assert qk.codes.shape == qv.codes.shape == (2, 3, packing.packed_len(64, 2), 32)
    xn = np.asarray(x)
    for axis in (2, 3):
        check_quantized(xn, *_quant_jit(x, bits=2, group_size=32, axis=axis), bits=2, group_size=32, axis=axis)
    # per-channel: the min of channel d over tokens 32..63 is the min of that slice
    x64 = xn.astype(np.float64)
    np.testing.assert_array_equal(np.asarray(qk.min[..., 1, :], np.float64), x64[:, :, 32:, :].min(2))
    np.testing.assert_array_equal(np.asarray(qv.min[..., 5, 0], np.float64), x64[:, :, 5, :].min(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_against_float64_reference(dtype, bits):
    """Random keys with outlier channels: codes, scale, min and x_hat equal the NumPy model's."""
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((2, 2, 64, 32)) * np.where(rng.random(32) < 0.1, 20.0, 1.0) + rng.normal(0, 3, 32)
    x = np.asarray(jnp.asarray(x, dtype))
    for axis in (2, 3):
        qa, deq, codes = _quant_jit(jnp.asarray(x), bits=bits, group_size=16, axis=axis)
        check_quantized(x, qa, deq, codes, bits=bits, group_size=16, axis=axis)
        rc, rs, rm, rx = ref.quantize_reference(x.astype(np.float64), bits=bits, group_size=16, axis=axis,
                                                dtype=x.dtype)
        np.testing.assert_array_equal(np.asarray(qa.min, np.float64), rm)
        if x.dtype != np.float32:  # max - min, x - min exact in float32: everything agrees exactly
            np.testing.assert_array_equal(np.asarray(qa.scale, np.float64), rs)
            np.testing.assert_array_equal(np.asarray(codes), rc)
        else:  # max - min rounded up into float32 first: the scale may be one ulp larger
            np.testing.assert_allclose(np.asarray(qa.scale, np.float64), rs, rtol=2.0**-23)
            assert (np.asarray(codes) != rc).mean() < 1e-3
        # x_hat: the same up to the dtype's rounding and (float32) the scale's last bits
        ds = np.abs(np.asarray(qa.scale, np.float64) - rs).max()
        np.testing.assert_allclose(np.asarray(deq, np.float64), rx, rtol=0,
                                   atol=float(ulp(np.abs(rx).max(), x.dtype)) + (2**bits - 1) * ds)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offset_float_groups_keep_their_resolution(dtype):
    """A group far from zero with a small spread (|min| >> max - min): no cancellation."""
    base = {jnp.float32: 1000.0, jnp.bfloat16: 1.0, jnp.float16: 100.0}[dtype]
    u = float(ulp(base, dtype))
    x = np.asarray(jnp.asarray(base + u * np.arange(64).reshape(2, 32), dtype))
    for bits in (2, 8):
        qa, deq, codes = _quant_jit(jnp.asarray(x), bits=bits, group_size=32, axis=1)
        check_quantized(x, qa, deq, codes, bits=bits, group_size=32, axis=1)
    # 8 bits, spread 31 ulps < 255 levels: every element is reproduced exactly
    np.testing.assert_array_equal(np.asarray(deq), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_are_exact(dtype, bits):
    fmax = float(ref.finfo(dtype).max)
    vals = [0.0, -0.0, 7.3, -2.5e-3, fmax, -fmax, 1e-4]
    x = np.asarray(jnp.asarray(np.repeat(np.asarray(vals)[:, None], 16, axis=1), dtype))
    qa, deq, codes = _quant_jit(jnp.asarray(x), bits=bits, group_size=16, axis=1)
    np.testing.assert_array_equal(np.asarray(deq), x)
    assert (np.asarray(qa.scale, np.float64) == 0).all()
    assert (np.asarray(codes) == 0).all()
    check_quantized(x, qa, deq, codes, bits=bits, group_size=16, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_huge_inputs_no_nan_or_inf(dtype, bits):
    fmax = float(ref.finfo(dtype).max)
    tiny = float(ref.finfo(dtype).tiny)
    rng = np.random.default_rng(bits)
    rows = [
        np.r_[tiny, fmax, np.full(14, tiny)],  # a huge scale and a tiny min: the min comes back exactly
        np.r_[-fmax, fmax, rng.uniform(-fmax, fmax, 14)],  # range 2 * fmax: saturates at 1 bit
        np.r_[-fmax, 0.0, rng.uniform(-fmax, 0, 14)],
        np.r_[fmax, fmax * 0.99, rng.uniform(0.5 * fmax, fmax, 14)],
        np.r_[-fmax, -fmax * 0.5, rng.uniform(-fmax, -0.5 * fmax, 14)],
        rng.uniform(-0.4 * fmax, 0.4 * fmax, 16),
    ]
    x = np.asarray(jnp.asarray(np.stack(rows), dtype))
    assert np.isfinite(x.astype(np.float64)).all()
    qa, deq, codes = _quant_jit(jnp.asarray(x), bits=bits, group_size=16, axis=1)
    assert np.isfinite(np.asarray(qa.scale, np.float64)).all() and np.isfinite(np.asarray(qa.min, np.float64)).all()
    check_quantized(x, qa, deq, codes, bits=bits, group_size=16, axis=1)  # bound where the scale fits
    # the group min comes back exactly (code 0), even at -max
    assert float(deq[2, 0]) == -fmax and float(deq[4, 0]) == -fmax
    assert float(deq[0, 0]) == tiny


# ---- properties --------------------------------------------------------------------------


@st.composite
def quant_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from(BITS))
    group_size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = group_size * draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["normal", "outliers", "any", "ints", "const"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "any":  # adversarial values anywhere in the dtype's normal range
        width = 16 if dtype == jnp.float16 else 32
        lim = float(ref.finfo(dtype).max) if dtype != jnp.bfloat16 else float(np.float32(3.3e38))
        x = draw(hnp.arrays(np.float32 if width == 32 else np.float16, shape,
                            elements=st.floats(-lim, lim, width=width, allow_subnormal=False)))
        x = x.astype(np.float64)
    elif kind == "ints":  # small integers: many exact ties
        x = rng.integers(-4, 5, shape).astype(np.float64)
    elif kind == "const":
        x = np.full(shape, rng.normal() * 10.0 ** rng.integers(-3, 4))
    else:
        x = rng.standard_normal(shape) * 10.0 ** draw(st.integers(-3, 3)) + draw(st.sampled_from([0.0, 1.0, -50.0]))
        if kind == "outliers":
            x = x * np.where(rng.random(shape) < 0.05, 100.0, 1.0)
    fmax = float(ref.finfo(dtype).max)
    x = np.asarray(jnp.asarray(np.clip(x, -fmax, fmax), dtype))  # finite inputs (float16 overflows early)
    return x, bits, group_size, axis


@examples(20)
@given(quant_cases())
def test_quantize_properties(case):
    x, bits, group_size, axis = case
    qa, deq, codes = _quant_jit(jnp.asarray(x), bits=bits, group_size=group_size, axis=axis)
    check_quantized(x, qa, deq, codes, bits=bits, group_size=group_size, axis=axis)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis"))
def _fq_vmap(x, *, bits, group_size, axis):
    return jax.vmap(lambda r: dequantize(quantize(r, bits=bits, group_size=group_size, axis=axis)))(x)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis"))
def _fq(x, *, bits, group_size, axis):
    return dequantize(quantize(x, bits=bits, group_size=group_size, axis=axis))


@examples(12)
@given(quant_cases())
def test_vmap_equals_each_example(case):
    """vmap over a batch == each example alone, bit for bit (batch invariance)."""
    x, bits, group_size, axis = case
    assume(x.ndim >= 2 and axis % x.ndim != 0)  # vmap over axis 0
    kw = dict(bits=bits, group_size=group_size)
    inner = axis % x.ndim - 1
    deq_v = _fq_vmap(jnp.asarray(x), axis=inner, **kw)
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(np.asarray(deq_v[i]), np.asarray(_fq(jnp.asarray(x[i]), axis=inner, **kw)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_equals_jit(dtype):
    """Bit for bit: XLA's reciprocal-for-division and FMA contraction under jit change nothing.

    One fixed shape (eager mode compiles every op per shape), all bit widths, both axes, a
    mix of offsets, outliers, exact ties and constant groups.
    """
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 64, 32)) * np.exp(rng.normal(0, 2, (1, 1, 32))) + rng.normal(0, 5, (1, 1, 32))
    x[0, :32] = rng.integers(-6, 7, (32, 32))  # small integers: ties
    x[1, :32, :4] = 3.25  # constant groups
    x = jnp.asarray(x, dtype)
    for bits, axis in ((1, 2), (2, 1), (4, 2), (8, 1)):
        # (__wrapped__: the function as written, op by op; called on arrays it runs jitted, kivi_jax.eager)
        qa_e = quantize.__wrapped__(x, bits=bits, group_size=32, axis=axis)
        qa_j, deq_j, codes_j = _quant_jit(x, bits=bits, group_size=32, axis=axis)
        for a, b in zip(jax.tree_util.tree_leaves(qa_e), jax.tree_util.tree_leaves(qa_j)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(dequantize.__wrapped__(qa_e)), np.asarray(deq_j))
        check_quantized(np.asarray(x), qa_j, deq_j, codes_j, bits=bits, group_size=32, axis=axis)


# ---- pytree, nbytes ----------------------------------------------------------------------


def test_quantized_array_is_a_pytree_with_static_metadata():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64, 32)), jnp.float16)
    qa = _quant_jit(x, bits=2, group_size=32, axis=2)[0]
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert [leaf.shape for leaf in leaves] == [qa.codes.shape, qa.scale.shape, qa.min.shape]
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (back.bits, back.group_size, back.axis, back.shape, back.dtype) == (2, 32, 2, (2, 3, 64, 32), jnp.float16)
    # crosses a jit boundary both ways; metadata stays static
    out = jax.jit(lambda q: jax.tree_util.tree_map(lambda a: a, q))(qa)
    assert isinstance(out, QuantizedArray) and out.bits == 2
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qa)), np.asarray(_fq(x, bits=2, group_size=32, axis=2)))
    # different static metadata -> different treedef
    assert jax.tree_util.tree_structure(_quant_jit(x, bits=4, group_size=32, axis=2)[0]) != treedef


def test_nbytes_counts_real_buffers():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 512, 32)), jnp.float16)
    qa = _quant_jit(x, bits=2, group_size=32, axis=2)[0]
    # 512 tokens at 2 bits = 2 full blocks = 32 word rows; fp16 scale and min per 32 tokens
    codes = 2 * 4 * 32 * 32 * 4
    params = 2 * (2 * 4 * 16 * 32 * 2)
    assert qa.nbytes == codes + params == qa.codes.nbytes + qa.scale.nbytes + qa.min.nbytes
    assert qa.bits_per_element == pytest.approx(3.0)  # KIVI-2: 2 bits + 16 bits * 2 / 32
    assert x.nbytes / qa.nbytes == pytest.approx(16 / 3)


# ---- fake_quantize -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_value_and_straight_through_gradient(dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 2, 32, 32)), dtype)
    w = jnp.asarray(rng.standard_normal((2, 2, 32, 32)), dtype)
    kw = dict(bits=2, group_size=16, axis=3)
    y = jax.jit(lambda x: fake_quantize(x, **kw))(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_fq(x, **kw)))  # = dequantize(quantize(x))
    assert not np.array_equal(np.asarray(y), np.asarray(x))
    loss = lambda x: jnp.sum((fake_quantize(x, **kw) * w).astype(jnp.float32))
    g = jax.jit(jax.grad(loss))(x)
    assert g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # straight-through: d/dx = identity
    # vmap of the value and of the gradient (axis 3 of x is axis 2 of a row)
    yv = jax.jit(jax.vmap(lambda r: fake_quantize(r, bits=2, group_size=16, axis=2)))(x)
    np.testing.assert_array_equal(np.asarray(yv), np.asarray(y))
    row_loss = lambda r, wr: jnp.sum((fake_quantize(r, bits=2, group_size=16, axis=2) * wr).astype(jnp.float32))
    gv = jax.jit(jax.vmap(jax.grad(row_loss)))(x, w)
    np.testing.assert_array_equal(np.asarray(gv), np.asarray(w))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_dequantize_gradient_flows_through_scale_and_min(bits):
    """d/dx of sum(w * dequantize(quantize(x))): the codes are piecewise constant, so a group's
    gradient goes to its min and max elements only, through x̂_i = c_i s + mn with s = (mx - mn)
    / L: d x̂_i / d mn = 1 - c_i / L, d x̂_i / d mx = c_i / L (float64 NumPy). A KIVI cache
    in a model under jax.grad takes this path (jnp.nextafter has no rule; next_after's is
    the identity)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = rng.standard_normal((3, 64))
    kw = dict(bits=bits, group_size=16, axis=1)
    g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(dequantize(quantize(x, **kw)) * w)))(jnp.asarray(x)))
    codes = np.asarray(unpacked_codes(quantize(jnp.asarray(x), **kw)), np.float64).reshape(3, 4, 16)
    levels = 2.0**bits - 1
    xg, wg = x.reshape(3, 4, 16), w.reshape(3, 4, 16)
    want = np.zeros((3, 4, 16))
    for r in range(3):
        for j in range(4):
            want[r, j, np.argmin(xg[r, j])] += np.sum(wg[r, j] * (1 - codes[r, j] / levels))
            want[r, j, np.argmax(xg[r, j])] += np.sum(wg[r, j] * codes[r, j] / levels)
    np.testing.assert_allclose(g, want.reshape(3, 64), rtol=1e-5, atol=1e-5)


def test_kivi_cache_is_differentiable():
    """jax.grad through a KIVI cache's prefill and decode attention: d/dq equals dense attention's
    over the dequantized cache (held fixed), and k, v get finite gradients."""
    rng = np.random.default_rng(5)
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 40, 32)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((1, 4, 1, 32)), jnp.float32)
    cfg = kivi_jax.KIVIConfig(group_size=16, residual_length=16)
    empty = kivi_jax.KIVICache.init(cfg, batch=1, num_kv_heads=2, head_dim=32, max_length=48, dtype=jnp.float32)
    attend = lambda q, k, v: jnp.sum(kivi_jax.decode_attention(q, empty.prefill(k, v), impl="reference") ** 2)  # noqa: E731
    gq, gk, gv = jax.jit(jax.grad(attend, argnums=(0, 1, 2)))(q, k, v)
    k_hat, v_hat = empty.prefill(k, v).materialize()
    dense = kivi_jax.DenseCache(k_hat, v_hat, jnp.asarray([40], jnp.int32), jnp.zeros((1,), bool), k_hat.shape[2])
    want = jax.grad(lambda q: jnp.sum(kivi_jax.decode_attention(q, dense, impl="reference") ** 2))(q)
    np.testing.assert_allclose(np.asarray(gq), np.asarray(want), rtol=1e-5, atol=1e-6)
    for g in (gk, gv):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_public_api_names():
    for name in ("quantize", "dequantize", "fake_quantize", "QuantizedArray", "KIVIConfig", "KIVICache",
                 "DenseCache", "decode_attention", "prefill_attention", "dense_bytes_per_token"):
        assert hasattr(kivi_jax, name)


# ---- bad inputs --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((2, 4, 48, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"group_size=32 must divide the length 48 of axis 2"):
        quantize(x, bits=2, group_size=32, axis=2)
    with pytest.raises(ValueError, match=r"group_size=32 must divide the length 48 of axis 2"):
        quantize(x, bits=2, group_size=32, axis=-2)
    for bits in (0, 3, 16, 2.0, True):
        with pytest.raises(ValueError, match=r"bits="):
            quantize(x, bits=bits, group_size=16, axis=2)
    for gs in (0, -16, 2.5, True):
        with pytest.raises(ValueError, match=r"group_size="):
            quantize(x, bits=2, group_size=gs, axis=2)
    for axis in (4, -5):
        with pytest.raises(ValueError, match=r"axis="):
            quantize(x, bits=2, group_size=16, axis=axis)
    for axis in (True, 2.0):  # True was taken as axis 1
        with pytest.raises(ValueError, match=rf"^axis={axis!r} must be an integer axis in \[-4, 4\)"):
            quantize(x, bits=2, group_size=16, axis=axis)
    with pytest.raises(ValueError, match=r"^pack_axis=True must be an integer axis"):
        quantize(x, bits=2, group_size=16, axis=2, pack_axis=True)
    with pytest.raises(ValueError, match=r"pack_axis="):
        quantize(x, bits=2, group_size=16, axis=2, pack_axis=7)
    for bad in (jnp.zeros((4, 32), jnp.int32), jnp.zeros((4, 32), jnp.uint8), np.zeros((4, 32), bool)):
        with pytest.raises(ValueError, match=r"dtype"):
            quantize(bad, bits=2, group_size=16, axis=1)
    with pytest.raises(ValueError, match=r"at least one axis"):
        quantize(jnp.float32(1.0), bits=2, group_size=1, axis=0)
    with pytest.raises(ValueError, match=r"group_size=16 must divide"):
        fake_quantize(jnp.zeros((4, 24)), bits=2, group_size=16, axis=1)


def test_bfloat16_dtype_helper_is_ml_dtypes():
    assert ref.np_dtype(jnp.bfloat16) == np.dtype(ml_dtypes.bfloat16)


def _stepped_bits(x_bits, toward_bits, dtype):
    """next_after on the 16-bit floats with these bit patterns -> the result's bit patterns. Bits in
    and out, at XLA's own optimization level: at the tests' -O0 (conftest) XLA:CPU flushes
    bfloat16 subnormals moving through a broadcast or a select, which no user's program sees."""
    from kivi_jax.quant import next_after

    def bits(xb, tb):
        f = [jax.lax.bitcast_convert_type(b, dtype) for b in (xb, tb)]
        return jax.lax.bitcast_convert_type(next_after(*f), jnp.uint16)

    return jax.jit(bits, compiler_options=RUN_OPTIONS)(x_bits, toward_bits)


def test_next_after_steps_16_bit_floats_by_their_bits():
    """quant.next_after on every bfloat16 and float16 bit pattern, toward -inf, +inf, +-0, a
    normal and a subnormal number: the neighbour in the dtype's order (subnormals stepped, not
    flushed), the target itself when equal; float32 goes to jnp.nextafter."""
    from kivi_jax.quant import next_after

    for dtype in (jnp.bfloat16, jnp.float16):
        x = jax.lax.bitcast_convert_type(jnp.arange(65536, dtype=jnp.uint32).astype(jnp.uint16), dtype)
        bits = np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16)).astype(np.int64)
        order = np.where(bits >= 0x8000, 0x10000 - bits, 0x8000 + bits)  # -0 and +0 both 0x8000
        nan = np.isnan(np.asarray(x.astype(jnp.float32)))
        for t in (-np.inf, np.inf, 0.0, -0.0, 1.0, -2.5, 1e-40):
            tb = int(np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(t, dtype), jnp.uint16)))
            t_order = 0x10000 - tb if tb >= 0x8000 else 0x8000 + tb
            toward = jnp.full(x.shape, tb, jnp.uint16)
            got = np.asarray(_stepped_bits(jax.lax.bitcast_convert_type(x, jnp.uint16), toward, dtype))
            got = got.astype(np.int64)
            got_order = np.where(got >= 0x8000, 0x10000 - got, 0x8000 + got)
            want = np.where(order < t_order, order + 1, np.where(order > t_order, order - 1, t_order))
            assert np.array_equal(got_order[~nan], want[~nan]), (dtype, t)
    y = jnp.asarray([1.0, -3.0, 0.0], jnp.float32)
    np.testing.assert_array_equal(next_after(y, jnp.inf), jnp.nextafter(y, jnp.inf))
