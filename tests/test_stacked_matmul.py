"""The stacked-weight matmul kernel (interpret mode) against float64 NumPy, and the models'
decode step with matmul_impl="pallas" against the XLA step."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kivi_jax import matmul as kj_matmul
from pallas_kernels.stacked_matmul import stacked_matmul


@pytest.mark.parametrize("m, k, n, block_k, block_n, splits, dtype", [
    (5, 384, 192, 128, 64, None, jnp.float32),   # M padded to 16; 3 K-blocks in 2 uneven splits
    (5, 384, 192, 128, 64, 2, jnp.float32),
    (96, 256, 128, 64, 32, 3, jnp.bfloat16),     # the paper batch; 4 K-blocks in splits of 2
    (17, 128, 64, 128, 64, 1, jnp.float16),
])
def test_kernel_matches_numpy(m, k, n, block_k, block_n, splits, dtype):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((3, k, n)), dtype)
    for layer in (0, 2):
        got = stacked_matmul(x, w, jnp.int32(layer), block_k=block_k, block_n=block_n, splits=splits, interpret=True)
        ref = np.asarray(x, np.float64) @ np.asarray(w[layer], np.float64)
        assert got.shape == (m, n) and got.dtype == dtype
        err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
        assert err <= (1e-6 if dtype == jnp.float32 else 1e-2), (layer, err)
        other = np.asarray(x, np.float64) @ np.asarray(w[1], np.float64)  # the layer index is honoured
        assert np.max(np.abs(np.asarray(got, np.float64) - other)) > 10 * err * np.max(np.abs(ref))


def test_kernel_bad_arguments():
    x, w = jnp.ones((4, 128)), jnp.ones((2, 128, 64))
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and w \[L, K, N\]"):
        stacked_matmul(x, jnp.ones((2, 64, 64)), 0, interpret=True)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        stacked_matmul(x, w, 0, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="N=64 must be a multiple of block_n=128"):
        stacked_matmul(x, w, 0, block_n=128, interpret=True)
    with pytest.raises(ValueError, match=r"splits=3 must be in \[1, K / block_k = 2\]"):
        stacked_matmul(x, w, 0, splits=3, interpret=True)  # K=128, block_k=64
    with pytest.raises(ValueError, match="impl='cuda'"):
        kj_matmul.layer_matmul(x, w, 0, impl="cuda")
    for impl in ("xla", "pallas"):  # a layer past the stack: the slice clamped it, the kernel read past it
        for layer in (2, -1, np.int32(5)):
            with pytest.raises(ValueError, match=rf"layer={int(layer)} must be in \[0, L=2\)"):
                kj_matmul.layer_matmul(x, w, layer, impl=impl)


def test_layer_matmul_falls_back_where_no_tile_fits():
    assert kj_matmul.kernel_blocks(4096, 11008) == (64, 64)
    assert kj_matmul.kernel_blocks(576, 1536) == (64, 64)
    assert kj_matmul.kernel_blocks(100, 64) is None  # gcd(100, 64) = 4 < 16
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 100)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 100, 64)), jnp.float32)
    np.testing.assert_allclose(np.asarray(kj_matmul.layer_matmul(x, w, 1, impl="pallas")),
                               np.asarray(x) @ np.asarray(w[1]), rtol=1e-5, atol=1e-5)


def test_pipeline_keeps_the_stages_that_fit_shared_memory():
    """At M=512 (a Mistral-7B-shaped batch of 512) 4 stages of x [512, 64] and w [64, 64] bf16
    asked for 294912 bytes where the H200 has 232448 (e2e-2026-12-02-run34-mistral): 3 fit."""
    sm = importlib.import_module("pallas_kernels.stacked_matmul")  # (the package exports the function)

    assert 4 * (512 + 64) * 64 * 2 == 294912 > sm.SMEM_BYTES >= 3 * (512 + 64) * 64 * 2
    assert sm.pipeline_stages(512, 64, 64, 2, 4) == 3
    assert sm.pipeline_stages(128, 64, 64, 2, 4) == 4  # the decode batches measured: unchanged
    assert sm.pipeline_stages(512, 64, 64, 4, 4) == 1
    with pytest.raises(ValueError, match="M=4096 padded rows with block_k=64, block_n=64 need 532480 bytes"):
        sm.pipeline_stages(4096, 64, 64, 2, 4)
    with pytest.raises(ValueError, match=r"x has M=600 rows \(1024 padded\); at most 512"):
        stacked_matmul(jnp.ones((600, 128)), jnp.ones((2, 128, 64)), 0, interpret=True)


def test_layer_matmul_leaves_many_rows_to_xla(monkeypatch):
    """More than ROWS rows (a prefill, or a batch of 512) go to XLA's GEMM; up to ROWS to the kernel."""
    calls = []
    monkeypatch.setattr(kj_matmul, "stacked_matmul", lambda x, *a, **k: calls.append(x.shape) or x[:, :64] * 0)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((2, 128, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 100, 128)), jnp.float32)  # 300 rows
    np.testing.assert_allclose(np.asarray(kj_matmul.layer_matmul(x, w, 1, impl="pallas")),
                               np.asarray(x) @ np.asarray(w[1]), rtol=1e-5, atol=1e-5)
    assert calls == []
    kj_matmul.layer_matmul(x[:, :kj_matmul.ROWS // 3], w, 1, impl="pallas")
    assert calls == [(3 * (kj_matmul.ROWS // 3), 128)]


def _model():
    from models.config import ModelConfig
    from models import llama

    cfg = ModelConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    return llama.init_random(cfg, jax.random.key(8), init_std=0.3)


@pytest.mark.parametrize("kivi", [None, "kivi"])
def test_decode_step_with_in_place_matrices_equals_xla(kivi):
    import kivi_jax as kj

    m = _model()
    cfg = kj.KIVIConfig(group_size=16, residual_length=32) if kivi else None
    ids = np.random.default_rng(2).integers(0, 257, (3, 21)).astype(np.int32)
    cache = m.init_cache(3, 40, kivi=cfg)
    _, cache = m(ids, cache)
    tok = ids[:, -1:]
    want, want_cache = m(tok, cache, attn_impl="reference")
    got, got_cache = m(tok, cache, attn_impl="reference", matmul_impl="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(float(np.abs(b).max()), 1.0))
        else:
            assert np.mean(a != b) <= 1e-3
    with pytest.raises(ValueError, match="matmul_impl='cublas'"):
        m(tok, cache, matmul_impl="cublas")


def test_in_place_step_scans_no_matrix():
    """With matmul_impl="pallas" the layer scan's scanned inputs are the norms and the layer
    index only: no [L, K, N] matrix is sliced per layer (what XLA:GPU copies)."""
    from models import llama

    m = _model()
    apply, params = llama.functional(m)
    cache = m.init_cache(2, 40)
    tok = np.zeros((2, 1), np.int32)
    for impl, want_matrices in (("xla", 7), ("pallas", 0)):
        jaxpr = jax.make_jaxpr(lambda p, c: apply(p, tok, c, attn_impl="reference", matmul_impl=impl))(params, cache)
        scan = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
        body = getattr(scan.params["jaxpr"], "jaxpr", scan.params["jaxpr"])
        # a scanned-over matrix is [L, K, N] outside the body and [K, N] inside (jax 0.11's scan
        # has no num_consts / num_carry params: the body's inputs are paired by position)
        sliced = sum(o.aval.ndim == 3 and i.aval.ndim == 2 for o, i in zip(scan.invars, body.invars, strict=True))
        assert sliced == want_matrices, impl


def test_generate_with_in_place_matrices_gives_the_xla_tokens(monkeypatch):
    from kivi_jax.generate import generate

    calls = []
    kernel = kj_matmul.stacked_matmul
    monkeypatch.setattr(kj_matmul, "stacked_matmul", lambda *a, **k: calls.append(a[1].shape) or kernel(*a, **k))
    m = _model()
    ids = np.random.default_rng(6).integers(0, 257, (2, 13)).astype(np.int32)
    want = generate(m, ids, max_new_tokens=5, attn_impl="reference", matmul_impl="xla")  # (None: the kernel on a GPU)
    assert not calls
    got = generate(m, ids, max_new_tokens=5, attn_impl="reference", matmul_impl="pallas")
    assert len(calls) == 7 and (3, 64, 128) in calls  # the decode step's 7 matrices, traced once
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    with pytest.raises(ValueError, match="matmul_impl=3"):
        generate(m, ids, max_new_tokens=5, matmul_impl=3)
    from kivi_jax import sharding

    with pytest.raises(ValueError, match="matmul_impl='pallas' runs on one device"):
        generate(m, ids, max_new_tokens=5, matmul_impl="pallas", mesh=sharding.make_mesh(1, 1))


@pytest.mark.parametrize("shape, wide", [((32, 4096, 11008), False), ((40, 5120, 13824), True)])
def test_any_stack_size_lowers_with_wide_enough_offsets(shape, wide):
    """A 13B model's [40, 5120, 13824] bf16 stack (2.8e9 elements) is read with 64-bit offsets;
    a 7B model's with 32-bit ones. Lowered for CUDA on this machine, nothing allocated."""
    from pallas_kernels.triton_ir import load_offset_widths, lower_to_ttir

    s = jax.ShapeDtypeStruct
    ttir = lower_to_ttir(lambda x, w, i: stacked_matmul(x, w, i), s((96, shape[1]), jnp.bfloat16),
                         s(shape, jnp.bfloat16), s((), jnp.int32))
    assert load_offset_widths(ttir)["bf16"] == ({32, 64} if wide else {32})  # x: 32-bit; w: 64 when big
