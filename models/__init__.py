"""Flax NNX Llama / Mistral on a KV cache argument, with HF / GGUF / torch loading and orbax checkpoints."""

from models.cache import StackedCache
from models.config import ModelConfig
from models.llama import (Llama, Mistral, from_params, functional, init_random, lm_loss, model_class, param_shapes,
                          params_of)

__all__ = ["Llama", "Mistral", "ModelConfig", "StackedCache", "from_params", "functional", "init_random",
           "lm_loss", "model_class", "param_shapes", "params_of"]
