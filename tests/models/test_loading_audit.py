"""An independent audit of models/loading.py and the GGUF half of models/config.py.

GGUF files are written here in llama.cpp's convention (gguf.GGUFWriter; q/k rows permuted as
convert_hf_to_gguf.py permutes them) from small random transformers models, with mixed tensor
types: the loaded model's logits must be those of the torch model whose weights are
``gguf.quants.dequantize`` of the same bytes, un-permuted by transformers' own GGUF code
(LlamaTensorProcessor), not by models.loading. Metadata is read as llama.cpp's loader reads it
(rope scaling keys, per-layer head counts, head sizes), and what cannot be loaded faithfully is
a ValueError naming the file, the tensor or key, what was found and what is allowed.
"""

import re

import numpy as np
import pytest

import models

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from gguf.quants import dequantize, quantize  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

Q = gguf.GGMLQuantizationType
H, I, V, HEADS, KV, D = 64, 256, 101, 8, 2, 8  # I = 256: ffn_down rows hold one K-quant super-block
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
IDS = np.random.default_rng(0).integers(0, V, size=(1, 20)).astype(np.int32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_model(kind="llama", seed=0, **kw):
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=HEADS,
               num_key_value_heads=KV, max_position_embeddings=128, rms_norm_eps=3e-5, rope_theta=1234.5,
               tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(kw)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    m = cls[1](cls[0](**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return m.eval()


def _permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# float16 scale fields (byte offsets in a block) of types gguf-py cannot quantize: random
# blocks with sane scales are valid data of that type
_F16_AT = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,)}


def _encode(v, qt, rng):
    if qt == Q.F32:
        return v.astype(np.float32), None
    if qt == Q.F16:
        return v.astype(np.float16), None
    if qt not in _F16_AT:
        return quantize(v, qt), qt
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, size=(v.shape[0], v.shape[1] // bs, ts), dtype=np.uint8)
    for off in _F16_AT[qt]:
        b[..., off:off + 2] = rng.uniform(0.005, 0.015, size=b.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    return b.reshape(v.shape[0], -1), qt


def _header(w, c, **meta):
    """llama.* shape metadata as convert_hf_to_gguf writes it; meta: key suffix -> value (None drops it)."""
    kv = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
          "rope.dimension_count": c.head_dim, "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
          "rope.freq_base": c.rope_parameters["rope_theta"], **meta}
    for k, v in kv.items():
        key = f"{w.arch}.{k}"
        if v is None:
            continue
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, list):
            w.add_array(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        else:
            w.add_uint32(key, v)


def write_gguf(m, path, qtypes=lambda name: Q.F32, edit=None, **meta):
    """m as a llama-architecture GGUF: tensors in the type qtypes(gguf name) gives (norms F32 as
    llama.cpp keeps them), no output.weight when tied; edit: gguf name -> fn(array) applied first."""
    c = m.config
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    _header(w, c, **meta)
    for k, v in m.state_dict().items():
        v = v.float().numpy()
        if k in _TOP:
            if k == "lm_head.weight" and c.tie_word_embeddings:
                continue
            name = _TOP[k]
        else:
            i, rest = int(k.split(".")[2]), k.split(".", 3)[3]
            v = {"self_attn.q_proj.weight": lambda a: _permute(a, c.num_attention_heads),
                 "self_attn.k_proj.weight": lambda a: _permute(a, c.num_key_value_heads)}.get(rest, lambda a: a)(v)
            name = f"blk.{i}.{_LAYER[rest]}"
        v = (edit or {}).get(name, lambda a: a)(v)
        data, qt = _encode(v, Q.F32 if v.ndim == 1 else qtypes(name), rng)
        w.add_tensor(name, data, raw_shape=data.shape if qt else None, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def torch_twin(m, path):
    """m with every weight replaced by gguf's dequantization of the file's bytes, q/k un-permuted
    by transformers' GGUF loader code."""
    c = m.config
    proc = LlamaTensorProcessor(config=dict(num_attention_heads=c.num_attention_heads,
                                            num_key_value_heads=c.num_key_value_heads))
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _LAYER.items()}
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = proc.process(dequantize(t.data, t.tensor_type), t.name).weights
        if t.name in top:
            name = top[t.name]
        else:
            _, i, rest = t.name.split(".", 2)
            name = f"model.layers.{i}.{layer[rest]}"
        sd[name] = torch.tensor(np.array(w, np.float32))
    twin = type(m)(c).eval()
    missing, unexpected = twin.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if c.tie_word_embeddings else set())
    if c.tie_word_embeddings:
        twin.tie_weights()
    return twin


def logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids, dtype=torch.long)).logits.numpy()


# ---- mixed quantization types: the dequantized numbers, shapes and q/k layout ------------------
_MIX = {  # (layer 0, layer 1); ffn_down's rows are 256 long, room for K-quant super-blocks
    "attn_q.weight": (Q.Q4_0, Q.Q5_1), "attn_k.weight": (Q.Q4_1, Q.Q5_0), "attn_v.weight": (Q.Q8_0, Q.BF16),
    "attn_output.weight": (Q.F16, Q.Q4_0), "ffn_gate.weight": (Q.Q8_0, Q.IQ4_NL), "ffn_up.weight": (Q.BF16, Q.Q5_0),
    "ffn_down.weight": (Q.Q4_K, Q.Q6_K), "token_embd.weight": (Q.F16,) * 2, "output.weight": (Q.Q8_0,) * 2,
}


def _mixed(name):
    i = int(name.split(".")[1]) if name.startswith("blk.") else 0
    return _MIX[name.split(".", 2)[-1] if name.startswith("blk.") else name][i]


def test_mixed_quant_types_gguf_matches_torch_on_the_dequantized_weights(tmp_path):
    """GQA 8:2, rope_theta 1234.5, rms eps 3e-5, untied head; twelve tensor types in one file.
    load_model of a GGUF without tokenizer metadata returns (model, None) (it raised a
    RuntimeError from transformers' tokenizer loader, the weights being fine)."""
    hf = hf_model()
    path = write_gguf(hf, tmp_path / "mixed.gguf", qtypes=_mixed)
    kinds = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds == {Q.F32, *(q for pair in _MIX.values() for q in pair)}
    model, tok = models.load_model(path)
    c = model.config
    assert tok is None
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == \
        (HEADS, KV, D, 1234.5, 3e-5, False)
    twin = torch_twin(hf, path)
    ours = np.asarray(model(IDS)[0])
    err = rel_err(ours, logits(twin, IDS))
    # the same weights un-permuted the other way round (a layout bug would show this large)
    wq = models.params_of(model)["layers"]["q_proj"][1]
    assert np.array_equal(np.asarray(wq), twin.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)
    err_orig = rel_err(ours, logits(hf, IDS))  # the quantization is visible: this is not the float model
    print(f"\nmixed-type GGUF vs torch on its dequantized weights: rel err {err:.3g} (vs unquantized: {err_orig:.3g})")
    assert err <= 1e-4
    assert err_orig > 1e-2


def test_tied_mistral_window_gguf_q8_matches_torch(tmp_path):
    """No output.weight: the head is token_embd (Q8_0 here); llama.attention.sliding_window=8 on a
    llama-architecture file makes a Mistral with that window (20 tokens, so it matters)."""
    hf = hf_model("mistral", sliding_window=8, tie_word_embeddings=True, seed=3)
    path = write_gguf(hf, tmp_path / "tied.gguf", qtypes=lambda name: Q.Q8_0, **{"attention.sliding_window": 8})
    model, _ = models.load_gguf(path, tokenizer=False)
    assert isinstance(model, models.Mistral) and model.config.sliding_window == 8 and model.lm_head is None
    ref = logits(torch_twin(hf, path), IDS)
    assert rel_err(model(IDS)[0], ref) <= 1e-4
    nowin = models.from_params(models.ModelConfig(**{**model.config.to_dict(), "sliding_window": None}),
                               models.params_of(model))
    assert rel_err(nowin(IDS)[0], ref) > 1e-2  # the window is in effect



def test_cli_names_a_gguf_without_a_tokenizer(tmp_path, capsys):
    """The CLI on a GGUF whose weights load but that carries no tokenizer: one line naming the file
    and what is missing (exit 2), not a Hugging Face directory's tokenizer.json."""
    from kivi_jax import cli

    path = write_gguf(hf_model(seed=5), tmp_path / "notok.gguf", qtypes=lambda name: Q.F16)
    cli._load.cache_clear()
    try:
        assert cli.main(["generate", "hi", "--model", str(path), "--max-new-tokens", "1"]) == 2
    finally:
        cli._load.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a GGUF file without a tokenizer (no tokenizer.ggml.model" in err, err
    assert str(path) in err

# ---- metadata read as llama.cpp reads it ----------------------------------------------------------
def _meta_only(tmp_path, name, arch="llama", **meta):
    """A GGUF holding only the shape metadata (and a vocab size): enough for ModelConfig.from_gguf."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=3e-5,
                                   max_position_embeddings=128, rope_theta=1234.5)
    w = gguf.GGUFWriter(str(tmp_path / name), arch)
    _header(w, cfg, vocab_size=V, **meta)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / name


@pytest.mark.parametrize("meta, factor", [
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, 4.0),
    ({"rope.scaling.factor": 4.0}, 4.0),  # no type: llama.cpp's default type is "linear"
    ({"rope.scale_linear": 2.5}, 2.5),  # the key before rope.scaling.factor
    ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, 1.0),  # "none" never scales
    ({"rope.scaling.factor": 0.0}, 1.0),  # 0 means unscaled
    ({}, 1.0),
], ids=["type+factor", "factor-only", "scale_linear", "none", "zero", "absent"])
def test_gguf_rope_scaling_keys_read_as_llama_cpp(tmp_path, meta, factor):
    """llama.cpp: rope_freq_scale = 1 / (rope.scaling.factor or rope.scale_linear), type default
    "linear"; "none" forces scale 1. The factor-only and scale_linear files loaded unscaled."""
    c = models.ModelConfig.from_gguf(_meta_only(tmp_path, "rope.gguf", **meta))
    hf_cfg = transformers.LlamaConfig(hidden_size=H, num_attention_heads=HEADS, rope_theta=1234.5,
                                      rope_scaling={"rope_type": "linear", "factor": factor} if factor != 1 else None)
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf_cfg).inv_freq.numpy()
    np.testing.assert_allclose(c.rope_inv_freq(), want, rtol=1e-6)
    assert (c.rope_type, c.rope_factor) == (("linear", factor) if factor != 1 or "rope.scaling.type" in meta
                                            and meta["rope.scaling.type"] == "linear" else ("default", 1.0))


def test_gguf_per_layer_head_counts(tmp_path):
    """llama.cpp reads the head counts per layer (get_key_or_arr): one value for every layer
    loads; int() of the array was a bare TypeError naming nothing."""
    c = models.ModelConfig.from_gguf(_meta_only(tmp_path, "arr.gguf", **{"attention.head_count": [HEADS] * 2,
                                                                          "attention.head_count_kv": [KV] * 2}))
    assert (c.num_heads, c.num_kv_heads) == (HEADS, KV)
    p = _meta_only(tmp_path, "mixed.gguf", **{"attention.head_count_kv": [KV, 1]})
    with pytest.raises(ValueError, match=re.escape(f"{p}: llama.attention.head_count_kv=[2, 1] in the GGUF differs "
                                                   f"between layers (or is empty); allowed: one value for all layers")):
        models.ModelConfig.from_gguf(p)


def test_gguf_head_size_keys(tmp_path):
    """RoPE over part of the head (rope.dimension_count < key_length) or a value head size other
    than the key's loaded as full-head RoPE, silently; llama.cpp refuses the first for llama."""
    p = _meta_only(tmp_path, "partial.gguf", **{"attention.key_length": D, "rope.dimension_count": D // 2})
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: llama.rope.dimension_count=4 in the GGUF differs from the head size 8 (llama.attention.key_length); "
            f"allowed: equal")):
        models.ModelConfig.from_gguf(p)
    p = _meta_only(tmp_path, "vlen.gguf", **{"attention.value_length": 2 * D, "rope.dimension_count": None})
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: llama.attention.value_length=16 in the GGUF differs from the head size 8 "
            f"(llama.embedding_length / llama.attention.head_count)")):
        models.ModelConfig.from_gguf(p)
    # no key_length: rope.dimension_count is the head size (as transformers reads it), then
    # embedding_length / head_count (as llama.cpp does)
    assert models.ModelConfig.from_gguf(_meta_only(tmp_path, "rot.gguf", **{"rope.dimension_count": 16})).head_dim == 16
    assert models.ModelConfig.from_gguf(_meta_only(tmp_path, "none.gguf", **{"rope.dimension_count": None})).head_dim == 8


def test_unsupported_architecture_and_rope_type_are_named(tmp_path):
    p = _meta_only(tmp_path, "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=re.escape(f"{p}: general.architecture='qwen2' in the GGUF; allowed: "
                                                   f"('llama', 'mistral')")):
        models.load_model(p)
    p = _meta_only(tmp_path, "yarn.gguf", **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match=re.escape(f"{p}: llama.rope.scaling.type='yarn' in the GGUF; allowed: "
                                                   f"'none', 'linear'")):
        models.load_model(p)


# ---- tensors that do not fit: the file and tensor are named --------------------------------------
def test_gguf_tensor_of_the_wrong_shape_is_named(tmp_path):
    """A wrong shape in one layer was NumPy's "all input arrays must have the same shape"; in
    every layer, from_params' summary; neither named the file or the GGUF tensor."""
    hf = hf_model(seed=5)
    p = write_gguf(hf, tmp_path / "k.gguf", edit={"blk.1.attn_k.weight": lambda a: a[:D]})
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: tensor 'blk.1.attn_k.weight' (F32) has shape [64, 8]; the metadata asks for [64, 16] = "
            f"[embedding_length 64, head_count_kv 2 * head_dim 8]")):
        models.load_gguf(p, tokenizer=False)
    p = write_gguf(hf, tmp_path / "vocab.gguf", vocab_size=V - 1)
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: tensor 'token_embd.weight' (F32) has shape [64, 101]; the metadata asks for [64, 100] = "
            f"[embedding_length 64, vocab_size 100]")):
        models.load_gguf(p, tokenizer=False)


def test_gguf_tensor_type_gguf_cannot_dequantize_lists_the_allowed(tmp_path):
    hf = hf_model(seed=6)
    p = write_gguf(hf, tmp_path / "f64.gguf")
    # rewrite one norm as F64 (llama.cpp has the type; gguf-py cannot dequantize it)
    w = gguf.GGUFWriter(str(tmp_path / "f64b.gguf"), "llama")
    _header(w, hf.config)
    for t in gguf.GGUFReader(str(p)).tensors:
        data = np.array(t.data)
        if t.name == "blk.0.ffn_norm.weight":
            data = data.astype(np.float64)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'f64b.gguf'}: tensor 'blk.0.ffn_norm.weight' has type F64, which the gguf package "
            f"cannot dequantize; allowed: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, ")) as e:
        models.load_gguf(tmp_path / "f64b.gguf", tokenizer=False)
    assert all(t in str(e.value) for t in ("BF16", "Q4_K", "Q6_K", "IQ4_NL"))


def test_hf_directory_tensor_of_the_wrong_shape_names_file_and_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_model(seed=7).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"].T.copy()
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(
            f"{f}: weight 'model.layers.1.mlp.down_proj.weight' has shape [256, 64]; the config expects [64, 256] "
            f"(hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=8")):
        models.load_model(tmp_path)
