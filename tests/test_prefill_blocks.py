"""prefill_attention's query blocks equal one unblocked float64 computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import attention


def _numpy_causal(q, k, v, lengths, window):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d)
    pos = np.arange(t)
    mask = (pos[None, :] <= pos[:, None])[None, None]
    if window is not None:
        mask = mask & (pos[None, :] > pos[:, None] - window)[None, None]
    mask = mask & (pos[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore"):  # padded query rows of a short row see no key: NaN, unused
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window", [None, 300])
def test_blocked_prefill_matches_float64(window):
    t = attention.PREFILL_BLOCK * 2 + 77  # three blocks, the last partial
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 4, t, 16))
    k = jax.random.normal(ks[1], (2, 2, t, 16))
    v = jax.random.normal(ks[2], (2, 2, t, 16))
    lengths = jnp.array([t, 700])
    out = kj.prefill_attention(q, k, v, lengths, window=window)
    ref = _numpy_causal(q, k, v, lengths, window)
    # rows past a row's length see only real keys; compare every query of the real part
    np.testing.assert_allclose(np.asarray(out)[0], ref[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out)[1, :, :700], ref[1, :, :700], rtol=2e-5, atol=2e-5)


def test_bf16_fast_path_close_to_exact():
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 2, 64, 32)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 2, 64, 32)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 2, 64, 32)).astype(jnp.bfloat16)
    fast = np.asarray(kj.prefill_attention(q, k, v), np.float64)
    exact = _numpy_causal(q, k, v, [64], None)
    assert np.linalg.norm(fast - exact) / np.linalg.norm(exact) < 1e-2
