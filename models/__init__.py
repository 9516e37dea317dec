"""Flax NNX Llama / Mistral causal LMs whose KV cache (DenseCache or KIVICache) is an argument.

    model, tokenizer = models.load_model("smollm2-135m")          # or a HF dir, .gguf, torch model
    cache = model.init_cache(batch_size=1, max_length=512, kivi=kivi_jax.KIVIConfig())
    logits, cache = model(input_ids, cache)                        # prefill [B, T] -> [B, T, V]
    logits, cache = model(next_ids[:, None], cache)                # decode, position = cache.lengths

See models/llama.py for the call contract, models/loading.py for sources,
models/checkpoint.py for the orbax layout.
"""

from models.cache import StackedCache
from models.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
from models.config import ModelConfig
from models.llama import (Llama, Mistral, abstract_model, from_params, functional, init_random, lm_loss, model_class,
                          param_shapes, params_of)
from models.loading import SMOLLM2, from_torch, gguf_tokenizer, load_gguf, load_hf_dir, load_model, smollm2_gguf_path

__all__ = [
    "Llama", "Mistral", "ModelConfig", "SMOLLM2", "StackedCache", "abstract_model", "from_params", "from_torch",
    "functional", "gguf_tokenizer", "init_random", "lm_loss", "load_checkpoint", "load_gguf", "load_hf_dir",
    "load_model", "load_tokenizer", "model_class", "param_shapes", "params_of", "save_checkpoint", "smollm2_gguf_path",
]
