"""The Triton IR of a Pallas kernel, lowered for CUDA on any machine (no GPU needed).

jax lowers Pallas kernels to Triton IR for the "cuda" platform on CPU too; tests read that IR
(e.g. which offset width a load uses) and ``benchmarks/kernel_sass.py`` compiles it to SASS.
"""

from __future__ import annotations

import contextlib
import re

import jax


def _target_gpu():
    """Off a GPU, an H200 as the lowering's target: jax 0.11 reads the compute capability from
    the device (an abstract one where there is none) and else refuses to lower for CUDA."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("gpu",), abstract_device=device))


def lower_to_ttir(fn, *args) -> str:
    """The Triton IR (text) of the last Pallas kernel in ``fn(*args)`` (arrays or
    ShapeDtypeStructs: nothing is allocated), lowered for CUDA."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    seen = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        result = original(*a, **k)
        seen.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = spy
    try:
        jax.clear_caches()
        with _target_gpu():
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    return seen[-1]


def load_offset_widths(ttir: str) -> dict[str, set[int]]:
    """{pointee type: offset bit widths} over the IR's tensor-of-pointer ``tt.addptr`` ops,
    e.g. {"i32": {64}, "bf16": {32}} (uint32 codes are i32 pointers in Triton IR)."""
    widths: dict[str, set[int]] = {}
    for elem, bits in re.findall(r"tt\.addptr .*: tensor<[\dx]+!tt\.ptr<(\w+)>>, tensor<[\dx]+i(\d+)>", ttir):
        widths.setdefault(elem, set()).add(int(bits))
    return widths
