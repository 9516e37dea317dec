"""Which Mosaic GPU building blocks of a planned 2-bit decode kernel lower, on any machine.

Lowers small Pallas Mosaic GPU kernels for CUDA (``lowering_platforms=("cuda",)``: no GPU needed;
Mosaic's layout inference runs at lowering) and prints, per block, "lowered" or the error.
The plan (pallas_kernels/NOTES.md, session 9): 2-bit codes staged in shared memory as bytes and
viewed as int4 (two codes a nibble), split by masks (``x & 3``; ``(x & 0b1100) ^ 0b1000`` =
4c - 8), upcast in registers into wgmma's A-operand layout, scores over a chunk's rows reduced
for the online softmax, and p stored back to shared memory as the next wgmma's B operand.
:func:`planned_bulk_attention` states the plan's arithmetic (nibble packing, the masks, the
scale and min folds) in float64 NumPy; a test checks it against the cache's own dequantization.

    python -m benchmarks.mosaic_probe
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

S = jax.ShapeDtypeStruct

try:  # jax 0.11 registers the Mosaic GPU lowering rule only once this module is imported
    import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401
except ImportError:  # a jax without Mosaic GPU: lowers() reports the failure
    pass


def lowers(fn, *args) -> str:
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        return "lowered"
    except Exception as e:  # noqa: BLE001 - the error is the result
        return f"FAIL {type(e).__name__}: {str(e)[:200]}"


def _a_operand(c_ref, mask, flip):
    """An int4 [64, K] tile of nibbles -> one code of each nibble as bf16 in wgmma's A-operand
    layout: ``x & 3``, or the high pair as ``(x & 0b1100) ^ 0b1000`` = 4c - 8 (``flip``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = plgpu.load(c_ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X) & jnp.int4(mask)
    if flip:
        c = c ^ jnp.int4(-8)
    x = plgpu.layout_cast(c, plgpu.Layout.WGMMA_UPCAST_2X).astype(jnp.bfloat16)
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _scores(c_ref, q_ref, n):
    """scoresᵀ [64, n] of a chunk: the two code halves (nibble masks) x qᵀ, two register-A wgmmas."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(acc_ref):
        plgpu.wgmma(acc_ref, _a_operand(c_ref, 3, False), q_ref)
        plgpu.wgmma(acc_ref, _a_operand(c_ref, -4, True), q_ref)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((64, n), jnp.float32))


def codes_times_q(n: int):
    """One chunk in shared memory: scoresᵀ [64, n] from the chunk's 64x128 codes (as int4
    [64, 64], two codes a nibble) and qᵀ; max over the 64 rows; p = exp(s - max) stored to
    shared memory (the next wgmma's B operand)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles, swizzle = plgpu.TilingTransform, plgpu.SwizzleTransform
    nibbles = (tiles((8, 64)), swizzle(32))
    b_operand = (tiles((8, n)), swizzle(2 * n))

    def kernel(c_ref, q_ref, o_ref, p_out):
        def softmax(p_ref):  # (interpret mode takes no mixed register / smem scoped allocations)
            s = _scores(c_ref, q_ref, n)
            m = jnp.max(s, axis=0)
            p_ref[...] = jnp.exp(s - lax.broadcast_in_dim(m, s.shape, (1,))).astype(jnp.bfloat16)
            plgpu.commit_smem()
            o_ref[...] = s
            p_out[...] = p_ref[...]

        pl.run_scoped(softmax, plgpu.SMEM((64, n), jnp.bfloat16, transforms=b_operand))

    def fn(c, q):
        return pl.pallas_call(
            kernel, out_shape=(S((64, n), jnp.float32), S((64, n), jnp.bfloat16)),
            in_specs=[plgpu.BlockSpec(memory_space=plgpu.SMEM, transforms=nibbles),
                      plgpu.BlockSpec(memory_space=plgpu.SMEM, transforms=b_operand)],
            out_specs=[plgpu.BlockSpec(memory_space=plgpu.SMEM)] * 2, compiler_params=plgpu.CompilerParams())(c, q)

    return fn, (S((64, 64), jnp.int4), S((64, n), jnp.bfloat16))


def pipelined_scores(n: int, rows: int = 8, tokens: int = 4096):
    """The program structure: one program per (row, KV head) walks its codes [T, 64] (int4) in
    64-token chunks with ``plgpu.emit_pipeline`` (TMA into shared memory, 3 in flight), scores of
    each chunk written out. The whole arrays stay in GMEM (Mosaic takes no GMEM blocks)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles, swizzle = plgpu.TilingTransform, plgpu.SwizzleTransform

    def kernel(c_gmem, q_ref, o_gmem):
        def step(_, c_ref, o_ref):
            o_ref[...] = _scores(c_ref, q_ref, n)

        b = pl.program_id(0)
        plgpu.emit_pipeline(
            step, grid=(tokens // 64,), max_concurrent_steps=3,
            in_specs=[plgpu.BlockSpec((64, 64), lambda j: (j, 0), transforms=(tiles((8, 64)), swizzle(32)))],
            out_specs=[plgpu.BlockSpec((64, n), lambda j: (j, 0))])(c_gmem.at[b], o_gmem.at[b])

    def fn(c, q):
        return pl.pallas_call(
            kernel, grid=(rows,), out_shape=S((rows, tokens, n), jnp.float32),
            in_specs=[plgpu.BlockSpec(memory_space=plgpu.GMEM),
                      plgpu.BlockSpec((None, 64, n), lambda i: (i, 0, 0), transforms=(tiles((8, n)), swizzle(2 * n)))],
            out_specs=plgpu.BlockSpec(memory_space=plgpu.GMEM), compiler_params=plgpu.CompilerParams())(c, q)

    return fn, (S((rows, tokens, 64), jnp.int4), S((rows, 64, n), jnp.bfloat16))


# ---- the planned kernel's arithmetic, stated in NumPy (float64) ----------------------------------
# What each chunk's two wgmma pairs compute once the scales are folded out of the codes. The
# kernel is a translation of this; tests/test_bench_tools.py checks it against the cache's own
# dequantization, so the packing and the folds are right before any GPU code exists.

def int4(x):
    """Nibbles 0..15 -> their signed int4 values (what the upcast reads)."""
    x = np.asarray(x, np.int64) & 15
    return np.where(x >= 8, x - 16, x)


def split_nibbles(nib):
    """The two masks: codes in the low bit pair (0..3), and 4c - 8 for the high pair."""
    return int4(nib & 3), int4((nib & 12) ^ 8)


def keys_as_nibbles(codes):
    """codes [T, D] (keys: token rows) -> nibbles [T, D/2]: nibble j = channel j | channel D/2 + j << 2."""
    h = codes.shape[1] // 2
    return codes[:, :h] | (codes[:, h:] << 2)


def values_as_nibbles(codes, chunk=64):
    """codes [T, D] (values) -> nibbles [T/chunk, D, chunk/2]: per chunk and channel, nibble j =
    token j | token chunk/2 + j << 2 (Vᵀ rows, two K = chunk/2 operands)."""
    t, d = codes.shape
    c = codes.reshape(t // chunk, chunk, d).transpose(0, 2, 1)  # [chunks, D, chunk]
    h = chunk // 2
    return c[..., :h] | (c[..., h:] << 2)


def planned_bulk_attention(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, n, key_group=32, value_group=32,
                           chunk=64):
    """Softmax attention of q [G, D] over tokens [0, n) of one (row, KV head), from codes [T, D]
    and scales/mins (keys [T/Gk, D], values [T, D/G]) the way the planned kernel combines them:
    nibbles split by masks, key scales folded into q's columns (one per key group), value scales
    into p's (one per channel group), mins as per-group constants. float64; -> o [G, D]."""
    q = np.asarray(q, np.float64)
    g_rows, d = q.shape
    h = d // 2
    lo, hi = split_nibbles(keys_as_nibbles(np.asarray(k_codes, np.int64)))  # [T, D/2] each
    ks, km = np.asarray(k_scale, np.float64), np.asarray(k_min, np.float64)
    t_all = np.arange(lo.shape[0])
    gk = t_all // key_group
    # scoresᵀ[t] = lo·(q∘s)[:h] + hi·(q∘s/4)[h:] + 2 Σ (q∘s)[h:] + q·m, with s, m of t's key group
    qs = q[:, None, :] * ks[None]  # [G, groups, D]
    b_lo, b_hi = qs[..., :h], qs[..., h:] / 4
    const = 2 * qs[..., h:].sum(-1) + np.einsum("gd,kd->gk", q, km)  # [G, groups]
    scores = (np.einsum("tj,gtj->gt", lo, b_lo[:, gk]) + np.einsum("tj,gtj->gt", hi, b_hi[:, gk]) + const[:, gk])
    scores = np.where(t_all[None] < n, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [G, T]
    vlo, vhi = split_nibbles(values_as_nibbles(np.asarray(v_codes, np.int64), chunk))  # [chunks, D, chunk/2]
    vs, vm = np.asarray(v_scale, np.float64), np.asarray(v_min, np.float64)  # [T, D/Gv]
    gv = np.arange(d) // value_group
    o = np.zeros((g_rows, d))
    for c in range(vlo.shape[0]):
        tok = slice(c * chunk, (c + 1) * chunk)
        pc = p[:, tok]  # [G, chunk]
        ps = pc[:, :, None] * vs[tok][None]  # [G, chunk, groups]: p's columns, one per channel group
        acc_lo = np.einsum("dj,gjk->gdk", vlo[c], ps[:, :chunk // 2])
        acc_hi = np.einsum("dj,gjk->gdk", vhi[c], ps[:, chunk // 2:] / 4)
        const_v = 2 * ps[:, chunk // 2:].sum(1) + np.einsum("gt,tk->gk", pc, vm[tok])  # [G, groups]
        o += (acc_lo + acc_hi)[:, np.arange(d), gv] + const_v[:, gv]
    return o


def repack(cache, chunk=64):
    """A KIVI-2 cache's codes in the planned kernel's layout (jax, for a benchmark that times the
    kernel on a copy): k [B, H, Tc, D/2] and v [B, H, Tc/chunk, D, chunk/2] signed int4, the
    nibbles of :func:`keys_as_nibbles` / :func:`values_as_nibbles`."""
    from kivi_jax import packing

    c = cache.config
    if (c.k_bits, c.v_bits) != (2, 2):
        raise ValueError(f"the planned kernel takes 2-bit keys and values; got k_bits={c.k_bits}, v_bits={c.v_bits}")
    tc, d = cache.capacity, cache.head_dim

    def signed(x):
        return jnp.where(x >= 8, x.astype(jnp.int32) - 16, x.astype(jnp.int32)).astype(jnp.int4)

    kc = packing.unpack(cache.k_codes, 2, 2, tc)  # [B, H, Tc, D]
    vc = packing.unpack(cache.v_codes, 2, 2, tc)
    k = kc[..., :d // 2] | (kc[..., d // 2:] << 2)
    v = jnp.swapaxes(vc.reshape(vc.shape[:2] + (tc // chunk, chunk, d)), -1, -2)  # [B, H, chunks, D, chunk]
    v = v[..., :chunk // 2] | (v[..., chunk // 2:] << 2)
    return signed(k), signed(v)


def streamed_scores(n: int, rows: int, tokens: int, stages: int = 3):
    """The key side's read rate: one program per (row, head) streams its int4 codes [T, 64] in
    64-token chunks (TMA, ``stages`` in flight) through the two register-A wgmmas into one
    accumulator [64, n] (no softmax): what the codes cost to read and multiply, nothing else."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles, swizzle = plgpu.TilingTransform, plgpu.SwizzleTransform

    def kernel(c_gmem, q_ref, o_ref):
        def scoped(acc_ref):
            def step(_, c_ref):
                plgpu.wgmma(acc_ref, _a_operand(c_ref, 3, False), q_ref)
                plgpu.wgmma(acc_ref, _a_operand(c_ref, -4, True), q_ref)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step, grid=(tokens // 64,), max_concurrent_steps=stages,
                in_specs=[plgpu.BlockSpec((64, 64), lambda j: (j, 0), transforms=(tiles((8, 64)), swizzle(32)))],
            )(c_gmem.at[pl.program_id(0)])
            o_ref[...] = acc_ref[...]

        pl.run_scoped(scoped, plgpu.ACC((64, n), jnp.float32))

    def fn(c, q):
        return pl.pallas_call(
            kernel, grid=(rows,), out_shape=S((rows, 64, n), jnp.float32),
            in_specs=[plgpu.BlockSpec(memory_space=plgpu.GMEM),
                      plgpu.BlockSpec((None, 64, n), lambda i: (i, 0, 0), transforms=(tiles((8, n)), swizzle(2 * n)))],
            out_specs=plgpu.BlockSpec((None, 64, n), lambda i: (i, 0, 0)), compiler_params=plgpu.CompilerParams())(c, q)

    return fn, (S((rows, tokens, 64), jnp.int4), S((rows, 64, n), jnp.bfloat16))


def run_on_gpu():
    """Compiled on the GPU: the inner step's numbers against NumPy, and the streamed key side's
    time and read rate next to the HBM copy rate and dense bf16 keys read the same way by XLA."""
    from benchmarks import common

    rng = np.random.default_rng(0)
    out = {"env": common.environment()}
    n = 16
    fn, _ = codes_times_q(n)
    nib = rng.integers(-8, 8, (64, 64))
    q = rng.standard_normal((64, n)).astype(np.float32)
    s, p = jax.jit(fn)(jnp.asarray(nib, jnp.int4), jnp.asarray(q, jnp.bfloat16))
    lo, hi = split_nibbles(nib & 15)
    want = (lo + hi) @ np.asarray(jnp.asarray(q, jnp.bfloat16), np.float64)
    out["inner_step_max_abs_err"] = float(np.abs(np.asarray(s, np.float64) - want).max())
    want_p = np.exp(want - want.max(0, keepdims=True))
    out["inner_p_max_abs_err"] = float(np.abs(np.asarray(p, np.float64) - want_p).max())
    print(out, flush=True)
    hbm = common.hbm_copy_tbps()
    out["hbm_copy_tbps"] = hbm
    for rows, tokens in ((2048, 4096), (256, 4096)):
        for stages in (2, 3, 4):
            fn, _ = streamed_scores(n, rows, tokens, stages)
            c = jax.random.randint(jax.random.key(1), (rows, tokens, 64), -8, 8, jnp.int32).astype(jnp.int4)
            qq = jax.random.normal(jax.random.key(2), (rows, 64, n), jnp.bfloat16)
            f = jax.jit(fn)
            if stages == 2:  # the sum over chunks of each chunk's scores, first two programs
                got = np.asarray(f(c, qq)[:2], np.float64)
                lo, hi = split_nibbles(np.asarray(c[:2].astype(jnp.int32)) & 15)
                ref = np.einsum("rctk,rkn->rtn", (lo + hi).reshape(2, tokens // 64, 64, 64),
                                np.asarray(qq[:2], np.float64))
                out[f"stream_{rows}x{tokens}_max_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
            ms = common.time_fn(f, c, qq)
            nbytes = rows * tokens * 64 // 2
            out[f"stream_{rows}x{tokens}_stages{stages}_ms"] = ms
            out[f"stream_{rows}x{tokens}_stages{stages}_tbps"] = nbytes / ms / 1e9
            print({k: v for k, v in out.items() if k.startswith(f"stream_{rows}")}, flush=True)
        kd = jax.random.normal(jax.random.key(3), (rows, tokens, 128), jnp.bfloat16)
        qd = jax.random.normal(jax.random.key(4), (rows, 128), jnp.bfloat16)
        ms = common.time_fn(jax.jit(lambda k, q: jnp.einsum("rtd,rd->rt", k, q, preferred_element_type=jnp.float32)), kd, qd)
        out[f"dense_keys_{rows}x{tokens}_ms"] = ms
        del kd
    print(out, flush=True)
    (common.out_dir() / "mosaic-probe-gpu.json").write_text(__import__("json").dumps(out, indent=1))


def main():
    import sys

    if "--run" in sys.argv:
        return run_on_gpu()
    print(f"jax {jax.__version__}")
    for n in (16, 32, 64):  # wgmma's N: the query rows (N = 8 needs a swizzle of 16 bytes: not accepted)
        fn, args = codes_times_q(n)
        print(f"2-bit codes as int4 -> register-A wgmma x2 -> softmax rows -> p to smem, N={n}: {lowers(fn, *args)}")
    fn, args = pipelined_scores(16)
    print(f"one program per (row, head), emit_pipeline over 64-token int4 chunks, N=16: {lowers(fn, *args)}")
    fn, args = streamed_scores(16, 8, 4096)
    print(f"streamed key side (accumulated, no softmax), N=16: {lowers(fn, *args)}")


if __name__ == "__main__":
    main()
