"""Registers and main-loop SASS of the Pallas decode kernel, on a machine with no GPU.

jax lowers the Pallas kernel to Triton IR for CUDA on CPU too; the ``triton`` wheel (its own
ptxas and cuobjdump inside) compiles that IR for sm_90. Install it in a separate environment
(its pins need not match jax's) and point TRITON_PYTHON at it:

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.5.0
    TRITON_PYTHON=/tmp/tvenv/bin/python python -m benchmarks.kernel_sass \\
        '{"variant": "dequant", "chunk": 32}' '{"variant": "dequant", "chunk": 64, "num_warps": 8}'

Prints, per configuration: registers per thread, the instruction count of the longest loop (the
chunk loop) and its shared-memory / global-memory instructions by width. The wheel's Triton is
not the one inside jaxlib, so the numbers guide; only the device's timings decide
(pallas_kernels/NOTES.md).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels.triton_ir import lower_to_ttir

_COMPILE = r"""
import os, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
base = path[:-len(".ttir")]
open(base + ".ptx", "w").write(k.asm["ptx"])
open(base + ".cubin", "wb").write(k.asm["cubin"])
r = subprocess.run([bindir + "/ptxas", "-v", "--gpu-name", "sm_90a", base + ".ptx", "-o", base + ".o"],
                   capture_output=True, text=True)
print(r.stderr)
open(base + ".sass", "w").write(subprocess.run([bindir + "/cuobjdump", "-sass", base + ".cubin"],
                                               capture_output=True, text=True).stdout)
"""


def loop_stats(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward-branch range (the kernel's chunk loop)."""
    ops = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)]
    branches = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", sass)
    loops = [(int(to, 16), int(at, 16)) for at, to in branches if int(to, 16) < int(at, 16)]
    if not loops:
        return collections.Counter(op for _, op in ops)
    lo, hi = max(loops, key=lambda x: x[1] - x[0])
    return collections.Counter(op for a, op in ops if lo <= a <= hi)


def shapes(b=2, h=2, t=4096, d=128, g=32, m=16, k_bits=2, v_bits=2, dtype=jnp.bfloat16, v_scales_t=False):
    s = jax.ShapeDtypeStruct
    vs = (d // g, t) if v_scales_t else (t, d // g)
    return (s((b, h, m, d), jnp.float32), s((b, h, t * k_bits // 32, d), jnp.uint32),
            s((b, h, t // g, d), dtype), s((b, h, t // g, d), dtype), s((b, h, t * v_bits // 32, d), jnp.uint32),
            s((b, h) + vs, dtype), s((b, h) + vs, dtype),
            s((b,), jnp.int32), s((b,), jnp.int32), s((b,), jnp.int32), s((b,), jnp.int32))


SCALE = 128 ** -0.5  # the glue's scale on the products for head_dim 128 (the shapes' D)


def dense_shapes(b=2, h=2, t=4096, d=128, m=16, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    return (s((b, h, m, d), jnp.float32), s((b, h, t, d), dtype), s((b, h, t, d), dtype)) + (s((b,), jnp.int32),) * 4


def probe(opts: dict, triton_python: str, workdir: pathlib.Path) -> str:
    """opts: kivi_decode_partials keywords (k_bits, v_bits default 2), or {"kernel": "dense",
    "tokens": T, ...} for dense_decode_partials (T not a multiple of chunk: masked loads)."""
    from pallas_kernels import dense_decode, kivi_decode

    opts = dict(opts)
    name = re.sub(r"\W+", "_", json.dumps(opts))[:80]
    if opts.pop("kernel", "kivi") == "dense":
        args = dense_shapes(t=opts.pop("tokens", 4096))
        fn = functools.partial(dense_decode.dense_decode_partials, scale=SCALE, **opts)
    else:
        k_bits, v_bits = opts.pop("k_bits", 2), opts.pop("v_bits", 2)
        args = shapes(k_bits=k_bits, v_bits=v_bits, v_scales_t=opts.get("v_scales_t", False))
        fn = functools.partial(kivi_decode.kivi_decode_partials, k_bits=k_bits, v_bits=v_bits, group_size=32,
                               scale=SCALE, **opts)
    ttir = workdir / (name + ".ttir")
    ttir.write_text(lower_to_ttir(fn, *args))
    out = subprocess.run([triton_python, "-c", _COMPILE, str(ttir), str(opts.get("num_warps", 4)),
                          str(opts.get("num_stages", 2))], capture_output=True, text=True)
    if out.returncode:
        return f"compile failed: {out.stderr[-800:]}"
    regs = re.search(r"Used (\d+) registers", out.stdout)
    stats = loop_stats(ttir.with_suffix(".sass").read_text())
    memory = {k: v for k, v in sorted(stats.items()) if k.startswith(("LDS", "STS", "LDSM", "LDG", "BAR"))}
    return f"regs {regs.group(1) if regs else '?'}, loop {sum(stats.values())} instr, memory {memory}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    triton_python = os.environ.get("TRITON_PYTHON")
    if not triton_python:
        sys.exit("set TRITON_PYTHON to a python with the triton wheel installed (see this module's doc)")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kernel_sass_"))
    for spec in argv or ['{"variant": "swap"}']:
        print(spec, probe(json.loads(spec), triton_python, workdir), flush=True)


if __name__ == "__main__":
    main()
