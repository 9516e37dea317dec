"""kivi-jax: KIVI 2-bit asymmetric KV-cache quantization in JAX, with Pallas GPU kernels."""

from kivi_jax.attention import decode_attention, extend_attention, prefill_attention
from kivi_jax.cache_dense import DenseCache
from kivi_jax.cache_kivi import KIVICache
from kivi_jax.cache_mosaic import MosaicKIVICache, resolve_layout
from kivi_jax import sharding
from kivi_jax.config import KIVIConfig, dense_bytes_per_token
from kivi_jax.generate import GenerateOutput, StreamStep, generate, generate_stream
from kivi_jax.quant import QuantizedArray, dequantize, fake_quantize, quantize
from kivi_jax.sampling import sample_logits

__all__ = [
    "DenseCache",
    "GenerateOutput",
    "StreamStep",
    "KIVICache",
    "KIVIConfig",
    "MosaicKIVICache",
    "QuantizedArray",
    "decode_attention",
    "extend_attention",
    "dense_bytes_per_token",
    "dequantize",
    "fake_quantize",
    "generate",
    "generate_stream",
    "prefill_attention",
    "quantize",
    "resolve_layout",
    "sample_logits",
    "sharding",
]
__version__ = "0.1.0"
