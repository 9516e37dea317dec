"""The Mosaic GPU kernel's modules as lowered for CUDA, on a machine without a GPU.

A refactor of pallas_kernels/kivi_mosaic.py that should leave a kernel alone can be shown to:
each configuration's Mosaic module (the bytecode inside the custom call) is printed without its
debug locations and hashed, so two checkouts' lines compare directly (session 26: the lane_softmax
change left all ten default configurations' modules byte-identical). ``--counts`` also tallies
the ops a variant's module holds (exps, shuffles, selects, ...): a static, not a timed, measure.

    python -m benchmarks.mosaic_modules [--counts] [--out DIR]
"""

import argparse
import collections
import hashlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import kivi_mosaic as km

D = km.D
# (G query rows a KV head, bulk_partials options): the defaults and the variants kept as options
CONFIGS = [(1, {}), (4, {}), (2, {}), (4, {"narrow": False}), (1, {"rows_per_program": 2}),
           (4, {"rows_per_program": 3, "stages": 3}), (1, {"warpgroups": 3}), (4, {"group": 2}),
           (1, {"key_offset": True, "value_offset": True}), (2, {"fused": False}), (4, {"lane_softmax": False}),
           (2, {"lane_softmax": False})]
COUNTED = ("math.exp", "nvvm.shfl.sync", "llvm.inline_asm", "arith.mulf", "arith.addf", "arith.select",
           "vector.extract", "gpu.barrier")


def abstract_inputs(rows: int, tokens: int, heads: int = 1):
    """bulk_partials' arguments as ShapeDtypeStructs (q, lengths, kn, kt, vn, vt)."""
    s = jax.ShapeDtypeStruct
    return (s((rows,) + (heads,) * (heads > 1) + (D,), jnp.bfloat16), s((rows,), jnp.int32),
            s((rows, tokens, D // 2), jnp.int4), s((rows, tokens // 256, D, 16), jnp.bfloat16),
            s((rows, tokens // 64, D, 32), jnp.int4), s((rows, tokens // 128, 64, 16), jnp.bfloat16))


def modules(heads: int, options: dict, rows: int = 6, tokens: int = 1024) -> list[str]:
    """The Mosaic modules of bulk_partials(**options) lowered for CUDA, printed without debug info."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import mosaic_gpu_dialect
    from jax._src.lib.mlir import ir

    lowered = jax.jit(lambda *a: km.bulk_partials(*a, **options)).trace(
        *abstract_inputs(rows, tokens, heads)).lower(lowering_platforms=("cuda",))
    blobs = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.name == "stablehlo.custom_call" and "mosaic_gpu" in str(o.attributes["call_target_name"]):
                        blobs.append(ir.StringAttr(o.attributes["mhlo.backend_config"]["module"]).value_bytes)
                    walk(o)

    walk(lowered.compiler_ir("stablehlo").operation)
    texts = []
    for blob in blobs:
        with jax_mlir.make_ir_context() as ctx:
            mosaic_gpu_dialect.register_dialect(ctx)  # (its types: jax 0.11's modules hold them)
            ctx.allow_unregistered_dialects = True
            text = ir.Module.parse(blob).operation.get_asm(enable_debug_info=False)
            # (jax 0.11 numbers each lowered kernel's dump name: body_0, body_1, ...)
            texts.append(re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', 'mosaic_gpu.dump_basename = ""', text))
    return texts


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def op_counts(text: str) -> dict:
    """How many of each :data:`COUNTED` op a printed module holds."""
    ops = collections.Counter(re.findall(r'"stable_mosaic_gpu\.([a-z_]+\.[a-z_.]+)"', text))
    return {k: ops[k] for k in COUNTED} | {"ops": sum(ops.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", action="store_true", help="also each module's op counts")
    ap.add_argument("--out", default="", help="also write each module's text to this folder")
    a = ap.parse_args(argv)
    for heads, options in CONFIGS:
        texts = modules(heads, options)
        name = f"g{heads}" + "".join(f"_{k}{v}" for k, v in options.items())
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"{name}.mlir").write_text("\n".join(texts))
        print(name, *map(digest, texts), *(op_counts(t) for t in texts) if a.counts else ())


if __name__ == "__main__":
    main()
