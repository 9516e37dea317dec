"""Pallas GPU kernels (Triton lowering). They know arrays, not caches: see kivi_jax for the glue."""

from pallas_kernels.dense_decode import dense_decode_partials
from pallas_kernels.kivi_decode import VARIANTS, kivi_decode_partials
from pallas_kernels.stacked_matmul import stacked_matmul

__all__ = ["VARIANTS", "dense_decode_partials", "kivi_decode_partials", "stacked_matmul"]
