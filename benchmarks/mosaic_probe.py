"""Which Mosaic GPU building blocks of a planned 2-bit decode kernel lower, on any machine.

Lowers small Pallas Mosaic GPU kernels for CUDA (``lowering_platforms=("cuda",)``: no GPU needed;
Mosaic's layout inference runs at lowering) and prints, per block, "lowered" or the error.
The plan (pallas_kernels/NOTES.md, session 9): 2-bit codes staged in shared memory as bytes and
viewed as int4 (two codes a nibble), split by masks (``x & 3``; ``(x & 0b1100) ^ 0b1000`` =
4c - 8), upcast in registers into wgmma's A-operand layout, scores over a chunk's rows reduced
for the online softmax, and p stored back to shared memory as the next wgmma's B operand.

    python -m benchmarks.mosaic_probe
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

S = jax.ShapeDtypeStruct


def lowers(fn, *args) -> str:
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        return "lowered"
    except Exception as e:  # noqa: BLE001 - the error is the result
        return f"FAIL {type(e).__name__}: {str(e)[:200]}"


def codes_times_q(n: int):
    """scoresᵀ [64, n] = the chunk's 64x128 codes (as int4 [64, 64], two codes a nibble) x qᵀ,
    two register-A wgmmas; max over the 64 rows; p = exp(s - max) stored to shared memory."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles, swizzle = plgpu.TilingTransform, plgpu.SwizzleTransform
    nibbles = (tiles((8, 64)), swizzle(32))
    b_operand = (tiles((8, n)), swizzle(2 * n))

    def a_operand(c_ref, mask, flip):
        c = plgpu.load(c_ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X) & jnp.int4(mask)
        if flip:  # the high code of a nibble: (x & 0b1100) ^ 0b1000 = 4c - 8 as a signed int4
            c = c ^ jnp.int4(-8)
        x = plgpu.layout_cast(c, plgpu.Layout.WGMMA_UPCAST_2X).astype(jnp.bfloat16)
        return plgpu.layout_cast(x, plgpu.Layout.WGMMA)

    def kernel(c_ref, q_ref, o_ref, p_out):
        def scores(acc_ref):
            plgpu.wgmma(acc_ref, a_operand(c_ref, 3, False), q_ref)
            plgpu.wgmma(acc_ref, a_operand(c_ref, -4, True), q_ref)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        def softmax(p_ref):  # (interpret mode takes no mixed register / smem scoped allocations)
            s = pl.run_scoped(scores, plgpu.ACC((64, n), jnp.float32))
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


def main():
    print(f"jax {jax.__version__}")
    for n in (16, 32, 64):  # wgmma's N: the query rows (N = 8 needs a swizzle of 16 bytes: not accepted)
        fn, args = codes_times_q(n)
        print(f"2-bit codes as int4 -> register-A wgmma x2 -> softmax rows -> p to smem, N={n}: {lowers(fn, *args)}")


if __name__ == "__main__":
    main()
