"""A transformers Llama/Mistral model's parameters laid out as ``models.params_of`` lays them out
(shared by the training audits: their references are torch autograd on the same weights)."""

import numpy as np

HF_NAMES = dict(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", q_proj="self_attn.q_proj",
                k_proj="self_attn.k_proj", v_proj="self_attn.v_proj", o_proj="self_attn.o_proj",
                gate_proj="mlp.gate_proj", up_proj="mlp.up_proj", down_proj="mlp.down_proj")


def ours(a):
    return a if a.ndim == 1 else a.T  # torch Linear is [out, in]; ours [in, out]


def hf_tree(m, get):
    """A transformers model's parameters (get(p) of each) laid out as models.params_of lays them out."""
    sd = dict(m.named_parameters())
    n = m.config.num_hidden_layers
    out = {"embed": get(sd["model.embed_tokens.weight"]), "final_norm": get(sd["model.norm.weight"]),
           "layers": {k: np.stack([ours(get(sd[f"model.layers.{i}.{hf}.weight"])) for i in range(n)])
                      for k, hf in HF_NAMES.items()}}
    if not m.config.tie_word_embeddings:
        out["lm_head"] = get(sd["lm_head.weight"]).T
    return out
