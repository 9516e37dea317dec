"""kivi-jax: KIVI 2-bit asymmetric KV-cache quantization in JAX, with Pallas GPU kernels."""

from kivi_jax.attention import decode_attention, prefill_attention
from kivi_jax.cache_dense import DenseCache
from kivi_jax.cache_kivi import KIVICache
from kivi_jax.config import KIVIConfig, dense_bytes_per_token
from kivi_jax.quant import QuantizedArray, dequantize, fake_quantize, quantize

__all__ = [
    "DenseCache",
    "KIVICache",
    "KIVIConfig",
    "QuantizedArray",
    "decode_attention",
    "dense_bytes_per_token",
    "dequantize",
    "fake_quantize",
    "prefill_attention",
    "quantize",
]
__version__ = "0.1.0"
