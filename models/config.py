"""ModelConfig: the shape and numerics of a Llama / Mistral decoder, read from HF or GGUF metadata.

A frozen, hashable dataclass (it sits in the model's graph definition, which jit hashes), so
RoPE scaling is spelled out as fields instead of a nested dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import numpy as np

MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys without a default here (transformers has one for each, but a config that
# lacks one is not a model's)
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# transformers 5's LlamaConfig / MistralConfig defaults for the keys a config.json may omit
_HF_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, sliding_window=None),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Llama-family transformer.

    model_type: "llama" or "mistral" (Mistral = Llama + ``sliding_window``).
    head_dim: D; query heads ``num_heads``, key/value heads ``num_kv_heads`` (GQA).
    rope_type: "default" | "linear" | "llama3" with rope_factor, rope_low_freq_factor,
      rope_high_freq_factor and rope_original_max_position_embeddings as in HF ``rope_scaling``.
    sliding_window: each token attends to at most this many newest tokens (itself included);
      None = full causal attention.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}; allowed: {MODEL_TYPES}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}; allowed: {ROPE_TYPES}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0")
        if not self.rope_factor > 0:
            raise ValueError(f"rope_factor={self.rope_factor!r} must be > 0")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor} for rope_type='llama3'")
        sw = self.sliding_window
        if sw is not None and (not isinstance(sw, (int, np.integer)) or isinstance(sw, bool) or sw < 1):
            raise ValueError(f"sliding_window={sw!r} must be a positive integer or None")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if isinstance(self.eos_token_id, list):  # keep the dataclass hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ---- derived -----------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = 2 * h + h * d * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * h * i
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [D/2] float32, with rope scaling applied as transformers does."""
        d = self.head_dim
        inv = (1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.rope_factor)
        elif self.rope_type == "llama3":
            factor = self.rope_factor
            old = self.rope_original_max_position_embeddings
            lo_wl = old / self.rope_low_freq_factor
            hi_wl = old / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > lo_wl, inv / factor, inv)
            smooth = (old / wavelen - self.rope_low_freq_factor) / (self.rope_high_freq_factor - self.rope_low_freq_factor)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """From a HF ``config.json`` dict (transformers 4 ``rope_theta``/``rope_scaling`` or
        transformers 5 ``rope_parameters`` spelling), read as transformers 5 reads it:

        * a non-empty ``rope_scaling`` replaces ``rope_parameters`` whole (transformers'
          ``convert_rope_params_to_dict``: ``rope_scaling or rope_parameters``); the theta is the
          chosen dict's ``rope_theta``, else the top-level ``rope_theta``, else 10000;
        * llama3 scaling without ``original_max_position_embeddings`` uses
          ``max_position_embeddings`` (``standardize_rope_params``);
        * absent keys take LlamaConfig's / MistralConfig's defaults (``_HF_DEFAULTS``: Mistral's
          ``sliding_window`` 4096, ``num_key_value_heads`` 8; an explicit null stays null).

        The shape keys (``_HF_REQUIRED``) have no default here: a config without them is refused.
        """
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object; got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} in config.json; allowed: {MODEL_TYPES}")
        missing = [k for k in _HF_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config.json lacks the required key(s) {missing} (model_type={model_type!r})")
        defaults = _HF_DEFAULTS[model_type]
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{flag}={d[flag]!r}; biases are not supported (allowed: False)")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={rope_type!r} in config.json; allowed: {ROPE_TYPES}")
        heads = d["num_attention_heads"]
        max_pos = d.get("max_position_embeddings", defaults["max_position_embeddings"])
        sliding = d.get("sliding_window", defaults["sliding_window"]) if model_type == "mistral" else None
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim")
        if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            head_dim = hidden // heads
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(rope.get(
                "original_max_position_embeddings", max_pos if rope_type == "llama3" else 8192)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            max_position_embeddings=max_pos,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' LlamaConfig / MistralConfig accept."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        elif self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        d = dict(
            model_type=self.model_type,
            architectures=["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            attention_bias=False,
            mlp_bias=False,
        )
        if self.rope_type != "default":
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain field dict (JSON-able); inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    # ---- GGUF metadata -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source) -> "ModelConfig":
        """From a ``.gguf`` path or an open ``gguf.GGUFReader`` (metadata only, no tensor data).

        Refused (ValueError; it names the file when given a path): an architecture other than
        llama / mistral, bias tensors, ``rope_freqs.weight``, missing shape metadata.
        """
        import gguf

        if isinstance(source, gguf.GGUFReader):
            return cls._from_gguf_reader(source)
        reader = read_gguf(source)
        try:
            return cls._from_gguf_reader(reader)
        except ValueError as e:
            raise ValueError(f"{os.fspath(source)}: {e}") from e

    @classmethod
    def _from_gguf_reader(cls, reader) -> "ModelConfig":
        fields = reader.fields

        def get(key, default=None):
            f = fields.get(key)
            return default if f is None else f.contents()

        def number(key, default=None):
            # llama.cpp reads the head counts (and may read others) with get_key_or_arr: a per-layer
            # array is valid; int() of it was a bare TypeError. One value for all layers is accepted.
            v = get(key)
            if v is None:
                return default
            if isinstance(v, list):
                if len({int(x) for x in v}) != 1:
                    raise ValueError(f"{key}={v} in the GGUF differs between layers (or is empty); "
                                     f"allowed: one value for all layers")
                v = v[0]
            return int(v)

        def required(key):
            v = number(key)
            if v is None:
                raise ValueError(f"the GGUF metadata lacks the required key {key!r}")
            return v

        arch = get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise ValueError(f"general.architecture={arch!r} in the GGUF; allowed: ('llama', 'mistral')")
        names = {t.name for t in reader.tensors}
        if "rope_freqs.weight" in names:
            raise ValueError("the GGUF carries rope_freqs.weight (llama3 rope scaling baked into a tensor); "
                             "not supported: load the Hugging Face safetensors directory instead")
        biases = [t.name for t in reader.tensors if t.name.endswith(".bias")]
        if biases:
            raise ValueError(f"the GGUF carries bias tensors {biases[:4]}{' ...' if len(biases) > 4 else ''} "
                             f"({len(biases)} in all): biases are not supported (a config.json with "
                             f"attention_bias / mlp_bias is refused too)")
        heads = required(f"{arch}.attention.head_count")
        hidden = required(f"{arch}.embedding_length")
        vocab = get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else None
        if vocab is None:
            emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if emb is None:
                raise ValueError(f"the GGUF has no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight: "
                                 f"the vocabulary size is unknown")
            vocab = int(emb.shape[-1])
        # RoPE scaling as llama.cpp's loader reads it (llama-model.cpp): an absent type means
        # "linear", the factor is rope.scaling.factor else the older rope.scale_linear key, 0 or
        # absent means 1, and type "none" never scales. Reading only an explicit type "linear" left a
        # file carrying just the factor (or the old key, as the first converters wrote it) unscaled.
        scaling = get(f"{arch}.rope.scaling.type")
        factor = get(f"{arch}.rope.scaling.factor")
        if factor is None:
            factor = get(f"{arch}.rope.scale_linear")
        factor = float(factor) if factor else 1.0
        rope_type = "default"
        if scaling not in (None, "none", "linear"):
            raise ValueError(f"{arch}.rope.scaling.type={scaling!r} in the GGUF; allowed: 'none', 'linear'")
        if scaling == "linear" or (scaling is None and factor != 1.0):
            rope_type = "linear"
        if rope_type == "default":
            factor = 1.0
        # head_dim: attention.key_length, else rope.dimension_count (transformers' reading), else
        # embedding_length / head_count (llama.cpp's). The model rotates the whole head with one
        # head size for q, k and v: a rope.dimension_count (partial RoPE) or value_length that
        # differs was ignored, a silently wrong model; llama.cpp refuses the former for llama too.
        key_len = number(f"{arch}.attention.key_length")
        rot = number(f"{arch}.rope.dimension_count")
        head_dim = key_len if key_len is not None else rot if rot is not None else hidden // max(heads, 1)
        for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
            v = number(key)
            if v is not None and v != head_dim:
                src = (f"{arch}.attention.key_length" if key_len is not None else f"{arch}.rope.dimension_count"
                       if rot is not None else f"{arch}.embedding_length / {arch}.attention.head_count")
                raise ValueError(f"{key}={v} in the GGUF differs from the head size {head_dim} ({src}); allowed: "
                                 f"equal (RoPE over the whole head, one head size for queries, keys and values)")
        sliding = get(f"{arch}.attention.sliding_window")
        eos = get("tokenizer.ggml.eos_token_id")
        bos = get("tokenizer.ggml.bos_token_id")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=required(f"{arch}.feed_forward_length"),
            num_layers=required(f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=number(f"{arch}.attention.head_count_kv", heads),
            head_dim=head_dim,
            rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
            rope_type=rope_type,
            rope_factor=factor,
            # stored as float32 in the file (9.9999997e-06): round to the decimal it was written from
            rms_norm_eps=float(np.format_float_positional(np.float32(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), unique=True)),
            tie_word_embeddings="output.weight" not in names,
            sliding_window=int(sliding) if sliding else None,
            max_position_embeddings=int(get(f"{arch}.context_length", 4096)),
            model_type="mistral" if (arch == "mistral" or sliding) else "llama",
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
        )


@functools.cache
def _gguf_reader_class():
    """``gguf.GGUFReader`` reading through a plain ndarray view of its np.memmap (the same mapped
    bytes, no copy). The reader slices its buffer once or twice per metadata string, and a slice
    of an np.memmap pays for the subclass's ``__getitem__`` and ``__array_finalize__``: SmolLM2's
    98k vocabulary and merge strings took 2.2 s to parse that way, 0.7 s through the view."""
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._view

        @data.setter
        def data(self, mapped):  # GGUFReader.__init__ assigns its np.memmap here
            self._view = np.asarray(mapped)  # its base keeps the mapping alive

    return Reader


def read_gguf(path):
    """``gguf.GGUFReader`` of ``path``; a corrupt or truncated file is a ValueError naming it.

    The reader fails on such files with messages that name neither the file nor the problem
    ("file appears to be version 0", NumPy reshape or dtype-view errors, "cannot mmap an empty
    file"); the original exception is kept as the cause.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return _gguf_reader_class()(path)
    except Exception as e:  # noqa: BLE001 -- gguf raises ValueError, IndexError, struct errors ... on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                         f"it is corrupt or truncated: re-download it") from e
