"""GGUF files written here from small random transformers models (gguf.GGUFWriter, the layout
llama.cpp's converter writes): the loader reads them as transformers' model computes, refuses
tensors it would leave unused (biases above all), and names the file when it is unreadable."""

import re

import numpy as np
import pytest

import models

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS = 4, 2
_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
}


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's q/k row interleaving (written independently of
    models.loading.unpermute_qk, which undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama(attention_bias=False, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=attention_bias, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return m.eval()


def write_gguf(m, path, extra=None):
    """m's weights (biases included, if any) and shape metadata as a llama-architecture GGUF."""
    c = m.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    for k, v in m.state_dict().items():
        v = v.float().numpy()
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if k in top:
            w.add_tensor(top[k], v)
            continue
        i, rest = int(k.split(".")[2]), k.split(".", 3)[3]
        if rest.startswith("self_attn.q_proj"):
            v = _permute(v, HEADS)
        elif rest.startswith("self_attn.k_proj"):
            v = _permute(v, KV_HEADS)
        w.add_tensor(f"blk.{i}.{_HF_TO_GGUF[rest]}", v)
    for name, v in (extra or {}).items():
        w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ref_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 97, size=(1, 24)).astype(np.int32)


def test_float32_gguf_matches_transformers(tmp_path):
    """The control for the refusals below: the same writer, no extra tensors, loads and computes
    transformers' logits."""
    hf = hf_llama()
    model, tok = models.load_gguf(write_gguf(hf, tmp_path / "m.gguf"), tokenizer=False)
    ref = ref_logits(hf, IDS)
    err = float(np.max(np.abs(np.asarray(model(IDS)[0], np.float64) - ref)) / np.max(np.abs(ref)))
    assert tok is None and err <= 1e-4


def test_gguf_with_attention_biases_is_refused(tmp_path):
    """llama.cpp's llama graph adds blk.N.attn_{q,k,v,output}.bias when present; dropping them
    gave wrong logits silently (the HF directory of the same model is refused)."""
    hf = hf_llama(attention_bias=True)
    path = write_gguf(hf, tmp_path / "bias.gguf")
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: the GGUF carries bias tensors ['blk.0.attn_q.bias', 'blk.0.attn_k.bias', "
            f"'blk.0.attn_v.bias', 'blk.0.attn_output.bias'] ... (8 in all): biases are not supported")):
        models.load_gguf(path, tokenizer=False)
    with pytest.raises(ValueError, match=r"bias.gguf: the GGUF carries bias tensors"):
        models.load_model(path)
    with pytest.raises(ValueError, match=r"bias.gguf: the GGUF carries bias tensors"):
        models.ModelConfig.from_gguf(path)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"attention_bias=True; biases are not supported"):
        models.load_model(tmp_path / "hf")


def test_gguf_tensors_the_model_does_not_use_are_refused(tmp_path):
    hf = hf_llama()
    extra = {"blk.2.attn_norm.weight": np.ones(64, np.float32),  # a layer beyond block_count=2
             "blk.0.attn_q_norm.weight": np.ones(16, np.float32)}  # a tensor of another architecture
    path = write_gguf(hf, tmp_path / "extra.gguf", extra)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: unexpected tensors ['blk.2.attn_norm.weight', 'blk.0.attn_q_norm.weight'] (2 in all): the config "
            f"(model_type='llama', num_layers=2, tie_word_embeddings=False) does not use them")):
        models.load_gguf(path, tokenizer=False)


def test_unreadable_gguf_names_the_file(tmp_path):
    blob = write_gguf(hf_llama(), tmp_path / "good.gguf").read_bytes()
    cases = {"version0.gguf": b"GGUF" + b"\0" * 20, "empty.gguf": b"", "text.gguf": b"not a gguf at all\n",
             "head.gguf": blob[:100], "half.gguf": blob[:len(blob) // 2]}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        for load in (lambda: models.load_model(p), lambda: models.ModelConfig.from_gguf(p)):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: not a readable GGUF file \(\w+: .*\); "
                                                 r"it is corrupt or truncated: re-download it$") as e:
                load()
            assert e.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_gguf(tmp_path / "nothing.gguf")


def test_gguf_missing_shape_metadata_names_the_key(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "nometa.gguf"), "llama")
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((97, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"nometa.gguf: the GGUF metadata lacks the required key "
                                         r"'llama.attention.head_count'"):
        models.load_gguf(tmp_path / "nometa.gguf", tokenizer=False)


def test_read_gguf_parses_what_gguf_parses_from_the_same_mapping(tmp_path):
    """read_gguf reads through a plain view of gguf's np.memmap (3x faster on SmolLM2's vocabulary):
    every field (strings, string arrays, numbers) and tensor equals gguf.GGUFReader's own, and the
    tensors are read-only views of the mapped file, not copies."""
    from models.config import read_gguf

    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcĠéz 日本"), size=rng.integers(1, 9))) for _ in range(300)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(words)
    w.add_token_types([int(t) for t in rng.integers(1, 5, size=300)])
    w.add_token_merges([f"{a} {b}" for a, b in zip(words, words[1:])])
    w.add_float32("test.eps", 9.5e-6)
    w.add_array("test.ints", [int(i) for i in rng.integers(-2**31, 2**31, size=17)])
    w.add_tensor("a.weight", rng.standard_normal((7, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = str(tmp_path / "meta.gguf")
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert isinstance(ours, gguf.GGUFReader) and list(ours.fields) == list(theirs.fields)
    for key, f in theirs.fields.items():
        g = ours.fields[key]
        assert (g.name, g.types, g.data, g.offset) == (f.name, f.types, f.data, f.offset), key
        assert len(g.parts) == len(f.parts) and all(np.array_equal(a, b) for a, b in zip(g.parts, f.parts)), key
        assert g.contents() == f.contents(), key
    assert ours.fields["tokenizer.ggml.tokens"].contents() == words
    assert [t.name for t in ours.tensors] == ["a.weight", "b.weight"] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
        assert not a.data.flags.writeable and np.shares_memory(a.data, ours.data)
    assert isinstance(ours.data.base, np.memmap)  # the file's mapping, not a copy of it
