"""Opt-in extensions of KIVIConfig (issue 8): attention sinks, Hadamard rotation, mixed bit
widths, a separate key group size -- each against the independent float64 model
(tests/reference_kivi.py: ReferenceKIVICacheExt), the Pallas path in interpret mode, the
memory accounting, and the invalid combinations.

Small shapes (G = 16, R = 32, head_dim 32) keep CPU time low.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cache_jit
import reference_kivi as ref
from reference_kivi import keys_values
from kivi_jax import KIVICache, KIVIConfig, decode_attention, rotation

G, R, D = 16, 32, 32
HKV, HQ = 2, 4

_prefill = cache_jit.prefill
_step = cache_jit.step
_materialize = cache_jit.materialize


def make(cfg, b, max_length, dtype=jnp.float32, head_dim=D):
    cache = KIVICache.init(cfg, batch=b, num_kv_heads=HKV, head_dim=head_dim, max_length=max_length, dtype=dtype)
    rf = ref.ReferenceKIVICacheExt(k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
                                   residual_length=cfg.residual_length, batch=b, num_kv_heads=HKV,
                                   head_dim=head_dim, dtype=dtype, sink_tokens=cfg.sink_tokens,
                                   rotate=cfg.rotate, key_group_size=cfg.key_group_size)
    return cache, rf


def check_contents(cache, rf, rtol):
    """Per row: length, quantized counts and the materialized K_hat, V_hat equal the model's."""
    kh, vh = (np.asarray(a.astype(jnp.float32), np.float64) for a in _materialize(cache))
    nq_k, nq_v = np.asarray(cache.num_quantized_keys), np.asarray(cache.num_quantized_values)
    for r in range(cache.batch_size):
        L = rf.length(r)
        assert int(cache.lengths[r]) == L
        assert (nq_k[r], nq_v[r]) == rf.num_quantized(r), f"row {r}"
        np.testing.assert_allclose(kh[r, :, :L], rf.keys(r), rtol=rtol, atol=rtol, err_msg=f"keys row {r}")
        np.testing.assert_allclose(vh[r, :, :L], rf.values(r), rtol=rtol, atol=rtol, err_msg=f"values row {r}")


# ---- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(sink_tokens=2.0), "sink_tokens"),
    (dict(rotate="q"), "rotate"),
    (dict(rotate=True), "rotate"),
    (dict(key_group_size=24), "key_group_size"),
    (dict(key_group_size=8), "key_group_size"),
    (dict(key_group_size=64, residual_length=32), "key_group_size"),  # must divide R
])
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        KIVIConfig(**kw)


def test_invalid_combinations_at_init():
    with pytest.raises(ValueError, match=r"rotate='kv'.*head_dim=48"):
        KIVICache.init(KIVIConfig(group_size=16, residual_length=32, rotate="kv"), batch=1, num_kv_heads=1,
                       head_dim=48, max_length=64)
    KIVICache.init(KIVIConfig(group_size=16, residual_length=32), batch=1, num_kv_heads=1, head_dim=48,
                   max_length=64)  # fine without rotation
    with pytest.raises(ValueError, match=r"sink_tokens=64 must be < max_length=64"):
        KIVICache.init(KIVIConfig(sink_tokens=64), batch=1, num_kv_heads=1, head_dim=64, max_length=64)
    with pytest.raises(ValueError, match="head_dim=48"):
        KIVIConfig(rotate="k", group_size=16).bytes_per_token(num_kv_heads=1, head_dim=48)


def test_defaults_are_plain_kivi():
    """The extensions' defaults change nothing: same config, same buffers as spelling them out."""
    assert KIVIConfig() == KIVIConfig(2, 2, 32, 128)
    c = KIVIConfig()
    assert (c.sink_tokens, c.rotate, c.key_group_size, c.key_group) == (0, "none", None, 32)
    rng = np.random.default_rng(0)
    k, v = keys_values(rng, 2, HKV, 70, D)
    lens = jnp.asarray([70, 33], jnp.int32)
    a = _prefill(make(KIVIConfig(group_size=G, residual_length=R), 2, 80)[0], k, v, lens)
    b = _prefill(make(KIVIConfig(group_size=G, residual_length=R, key_group_size=G, rotate="none",
                                 sink_tokens=0), 2, 80)[0], k, v, lens)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- rotation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_hadamard_is_the_orthonormal_sylvester_matrix(d):
    h = rotation.hadamard_numpy(d)
    np.testing.assert_array_equal(h, ref.hadamard_reference(d))
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-14)
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("impl", rotation.ROTATE_IMPLS)
def test_rotation_is_invertible_to_float_rounding(impl, monkeypatch):
    monkeypatch.setattr(rotation, "ROTATE_IMPL", impl)
    x = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32) * 10
    back = np.asarray(rotation.rotate(rotation.rotate(jnp.asarray(x)), transpose=True))
    err = np.abs(back - x) / np.abs(x).max()
    # float32 rounding of two products, nothing more (bf16x3 on a GPU: x's bits past two bf16 parts)
    assert err.max() < (2.0 ** -14 if impl == "bf16x3" and jax.default_backend() == "gpu" else 4 * np.finfo(np.float32).eps)
    with pytest.raises(ValueError, match="head_dim=48"):
        rotation.hadamard_numpy(48)


@pytest.mark.parametrize("impl", rotation.ROTATE_IMPLS)
@pytest.mark.parametrize("d", [1, 2, 8, 128])
def test_rotation_is_x_times_the_sylvester_matrix(impl, d, monkeypatch):
    """Both implementations against x · H in float64 (H from the test's own Sylvester recursion)."""
    monkeypatch.setattr(rotation, "ROTATE_IMPL", impl)
    x = np.random.default_rng(d).standard_normal((2, 3, d)).astype(np.float32) * 3
    want = x.astype(np.float64) @ ref.hadamard_reference(d)
    got = np.asarray(jax.jit(lambda x: rotation.rotate(x))(jnp.asarray(x)))  # a fresh function: traced with impl
    assert got.dtype == np.float32
    # float32 sums of d terms of size ~|x|; on a GPU bf16x3 drops x's bits past its two bf16
    # parts (~2^-16 |x|); off a GPU the bf16 algorithms run in float32
    ulp = 2.0 ** -15 if impl == "bf16x3" else 8 * np.finfo(np.float32).eps
    np.testing.assert_allclose(got, want, rtol=0, atol=ulp * np.abs(x).max() * np.sqrt(d))


@pytest.mark.parametrize("impl", rotation.ROTATE_IMPLS)
def test_rotation_of_bf16_is_exact_to_float32_rounding(impl, monkeypatch):
    """A bf16 x (a cache's stored k, v; the model's q) times +-1 needs no low parts: every
    implementation gives x·H to float32 rounding of the sums."""
    monkeypatch.setattr(rotation, "ROTATE_IMPL", impl)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 6, 128)) * 5, jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    got = np.asarray(jax.jit(lambda x: rotation.rotate(x))(x))  # a fresh function: traced with impl
    want = x64 @ ref.hadamard_reference(128)
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(x64).max() * np.sqrt(128))


def test_rotation_impl_is_checked(monkeypatch):
    monkeypatch.setattr(rotation, "ROTATE_IMPL", "fft")
    with pytest.raises(ValueError, match="ROTATE_IMPL='fft'.*f32"):
        rotation.rotate(jnp.ones((2, 8)))


def test_rotation_flattens_an_outlier_channel():
    """Why rotate: K·H spreads one huge channel over all channels (smaller min/max ranges)."""
    k = np.random.default_rng(2).standard_normal((256, 64))
    k[:, 3] *= 20.0  # an outlier channel: its range dominates the per-channel groups
    kr = k @ rotation.hadamard_numpy(64)
    assert np.ptp(kr, axis=0).max() < 0.5 * np.ptp(k, axis=0).max()


# ---- every option step by step against the float64 model ------------------------------------


CASES = {
    "sinks5": (KIVIConfig(group_size=G, residual_length=R, sink_tokens=5), jnp.float32, 2e-5),
    "sinks4-bf16": (KIVIConfig(group_size=G, residual_length=R, sink_tokens=4), jnp.bfloat16, 1e-3),
    "rotate-kv": (KIVIConfig(group_size=G, residual_length=R, rotate="kv"), jnp.float32, 2e-5),
    "rotate-k": (KIVIConfig(group_size=G, residual_length=R, rotate="k"), jnp.float32, 2e-5),
    "rotate-v": (KIVIConfig(group_size=G, residual_length=R, rotate="v"), jnp.float32, 2e-5),
    "sinks3-rotate-kv": (KIVIConfig(group_size=G, residual_length=R, rotate="kv", sink_tokens=3), jnp.float32, 2e-5),
    "k2v4": (KIVIConfig(k_bits=2, v_bits=4, group_size=G, residual_length=R), jnp.float32, 2e-5),
    "k4v2": (KIVIConfig(k_bits=4, v_bits=2, group_size=G, residual_length=R), jnp.float32, 2e-5),
    "k1v8": (KIVIConfig(k_bits=1, v_bits=8, group_size=G, residual_length=R), jnp.float32, 2e-5),
    "kg16-g32": (KIVIConfig(group_size=32, residual_length=32, key_group_size=16), jnp.float32, 2e-5),
    "all": (KIVIConfig(k_bits=4, v_bits=2, group_size=32, residual_length=64, key_group_size=16, rotate="kv",
                       sink_tokens=4), jnp.float32, 2e-5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_reference_step_by_step(name):
    """Ragged prompts (empty, shorter than the sinks, exactly the sinks, longer), then decode
    steps across several key flushes and value spills: every step's attention output and the
    final materialized cache equal the float64 model's.

    Rotation: head_dim 64 and inputs on a grid of 1/64 (|x| < 64), so K·H is exact in float32
    whatever the summation order (H = +-1/8): the library's float32 product and the model's
    float64 one store the same numbers, and no code can flip at a rounding boundary.
    """
    cfg, dtype, tol = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    b, t, steps = 5, 72, 75
    d = 64 if cfg.rotate != "none" else D
    inputs = (lambda *shape: tuple(np.round(x * 64) / 64 for x in keys_values(rng, *shape))) \
        if cfg.rotate != "none" else (lambda *shape: keys_values(rng, *shape))
    lengths = np.array([0, 2, cfg.sink_tokens, 41, 72])
    cache, rf = make(cfg, b, t + steps, dtype, head_dim=d)
    k, v = inputs(b, HKV, t, d)
    pad = np.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    k, v = np.where(pad, 1e4, k), np.where(pad, -1e4, v)  # padding must never enter a group or a sink
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    rf.prefill(k, v, lengths)
    check_contents(cache, rf, 1e-5 if dtype == jnp.float32 else 2.0**-7)
    for s in range(steps):
        kt, vt = inputs(b, HKV, 1, d)
        q = rng.standard_normal((b, HQ, 1, d)).astype(np.float32)
        cache, out = _step(cache, jnp.asarray(kt), jnp.asarray(vt), jnp.asarray(q))
        rf.append(kt, vt)
        np.testing.assert_allclose(np.asarray(out), rf.attend(q), rtol=tol, atol=tol, err_msg=f"step {s}")
    check_contents(cache, rf, 1e-5 if dtype == jnp.float32 else 2.0**-7)
    assert not np.asarray(cache.overflow).any()
    # the run crossed flushes and spills in every row, sinks included
    r_len = cfg.residual_length
    assert min(len(row.kq) for row in rf.rows) >= r_len and min(len(row.vq) for row in rf.rows) >= steps - r_len - 5


def test_sinks_stay_exact_and_groups_start_after_them():
    """S = 5: tokens 0..4 are stored exactly forever; the first key group is tokens 5..5+G."""
    cfg = KIVIConfig(group_size=G, residual_length=R, sink_tokens=5)
    rng = np.random.default_rng(3)
    k, v = keys_values(rng, 1, HKV, 100, D)
    cache = _prefill(make(cfg, 1, 128)[0], jnp.asarray(k), jnp.asarray(v), jnp.asarray([100], jnp.int32))
    kh, vh = (np.asarray(a) for a in _materialize(cache))
    np.testing.assert_array_equal(kh[0, :, :5], k[0, :, :5])
    np.testing.assert_array_equal(vh[0, :, :5], v[0, :, :5])
    # body length 95: keys 5 .. 5+64 quantized, 69..99 in the residual; values 5 .. 5+63 quantized
    assert int(cache.num_quantized_keys[0]) == 5 + 64 and int(cache.num_quantized_values[0]) == 5 + 63
    np.testing.assert_array_equal(kh[0, :, 69:100], k[0, :, 69:100])
    np.testing.assert_array_equal(vh[0, :, 68:100], v[0, :, 68:100])
    # the stored key group 0 is exactly tokens 5..20 quantized per channel
    _, scale, mn, xhat = ref.quantize_reference(k[0, :, 5:21], bits=2, group_size=G, axis=1, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(cache.k_min[0, :, 0]), mn[:, 0])
    np.testing.assert_allclose(kh[0, :, 5:21], xhat, rtol=1e-5, atol=1e-5)  # float32 scale: an ulp


# ---- the Pallas path (interpret mode) -----------------------------------------------------------


@pytest.mark.parametrize("cfg,window", [
    (KIVIConfig(group_size=G, residual_length=R, sink_tokens=4, rotate="kv"), None),
    (KIVIConfig(k_bits=4, v_bits=2, group_size=32, residual_length=R, key_group_size=16, sink_tokens=3,
                rotate="k"), 100),
    # the shape of the README's recommended setting: 16 sinks, rotation, one value group per head,
    # key groups half as long
    (KIVIConfig(sink_tokens=16, rotate="kv", group_size=D, key_group_size=D // 2, residual_length=R), 120),
    # key groups longer than value groups (the kernel takes both sizes)
    (KIVIConfig(group_size=G, key_group_size=2 * G, residual_length=R), 90),
])
@pytest.mark.parametrize("rotate_impl", ["f32", "bf16x6"])  # the CPU's and the GPU's default
def test_pallas_with_extensions_equals_reference(cfg, window, rotate_impl, monkeypatch):
    from kivi_jax import attention_pallas

    monkeypatch.setattr(rotation, "ROTATE_IMPL", rotate_impl)

    rng = np.random.default_rng(7)
    b, t = 4, 300
    lengths = np.array([2, 37, 190, 300])  # shorter than the sinks, tail only, bulk + tail
    cache, _ = make(cfg, b, t + 8)
    k, v = keys_values(rng, b, HKV, t, D)
    cache = _prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    kt, vt = keys_values(rng, b, HKV, 1, D)
    cache = jax.jit(KIVICache.append)(cache, jnp.asarray(kt), jnp.asarray(vt))
    q = jnp.asarray(rng.standard_normal((b, HQ, 1, D)).astype(np.float32))
    got = np.asarray(attention_pallas.decode_attention(q, cache, window=window, interpret=True))
    want = np.asarray(decode_attention(q, cache, impl="reference", window=window))
    # the reference path is the float64 model's equal (test_decode_matches_reference_step_by_step)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert np.abs(got).max() > 0.1


# ---- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    KIVIConfig(),
    KIVIConfig(sink_tokens=4, rotate="kv"),
    KIVIConfig(k_bits=4, v_bits=2),
    KIVIConfig(k_bits=1, v_bits=8, key_group_size=16),
])
def test_nbytes_equals_the_analytic_formula(cfg):
    """Buffers = capacity x bytes_per_token + residual_bytes (+ lengths and overflow flags)."""
    kw = dict(num_kv_heads=3, head_dim=64, dtype=jnp.bfloat16)
    cache = jax.eval_shape(lambda: KIVICache.init(cfg, batch=1, max_length=4096, **kw))
    nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    tc = cfg.capacity(4096)
    assert 4096 - cfg.sink_tokens <= tc < 4096 - cfg.sink_tokens + 512
    assert nbytes - 4 - 1 == tc * cfg.bytes_per_token(**kw) + cfg.residual_bytes(**kw)
    if cfg == KIVIConfig():  # the paper's 3 bits per number + the 128-token residual at 4k
        assert cfg.bytes_per_token(**kw) * 8 / (2 * 3 * 64) == 3.0
