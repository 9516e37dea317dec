"""Training-stack use: jax.grad of the LM loss through the scanned layers, checked against
PyTorch autograd on the same weights, and one optax step lowering the loss."""

import jax
import numpy as np
import pytest

import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((0.2 * torch.randn(p.shape, generator=g)) + (1.0 if p.ndim == 1 else 0.0))
    return m


IDS = np.random.default_rng(0).integers(0, 61, size=(3, 16)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[2, 11:] = 0  # a padded row: its tail must not count


def _torch_loss_and_grads(hf):
    hf.zero_grad()
    logits = hf(torch.tensor(IDS, dtype=torch.long)).logits[:, :-1]
    tgt = torch.tensor(IDS[:, 1:], dtype=torch.long)
    m = torch.tensor(MASK[:, 1:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tgt.reshape(-1), reduction="none")
    loss = (nll * m.reshape(-1)).sum() / m.sum()
    loss.backward()
    return float(loss.detach()), hf


def test_grad_of_lm_loss_matches_torch_autograd():
    hf = _hf_llama()
    model = models.from_torch(hf)
    apply, params = models.functional(model)

    def loss_fn(p):
        return models.lm_loss(apply(p, IDS)[0], IDS, MASK)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    ref_loss, hf = _torch_loss_and_grads(hf)
    g = _pure(grads)
    ref = {
        "embed": hf.model.embed_tokens.weight.grad.numpy(),  # tied: embedding + output head
        "q_proj[1]": hf.model.layers[1].self_attn.q_proj.weight.grad.numpy().T,
        "down_proj[0]": hf.model.layers[0].mlp.down_proj.weight.grad.numpy().T,
        "attn_norm[0]": hf.model.layers[0].input_layernorm.weight.grad.numpy(),
        "final_norm": hf.model.norm.weight.grad.numpy(),
    }
    ours = {
        "embed": g["embed"], "q_proj[1]": g["layers"]["q_proj"][1], "down_proj[0]": g["layers"]["down_proj"][0],
        "attn_norm[0]": g["layers"]["attn_norm"][0], "final_norm": g["final_norm"],
    }
    errs = {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k])) / np.max(np.abs(ref[k]))) for k in ref}
    print(f"\nloss {float(loss):.6f} vs torch {ref_loss:.6f}; grad rel errs " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert max(errs.values()) <= 1e-4


def _pure(state):
    from flax import nnx

    return nnx.to_pure_dict(state)


def test_one_optax_step_lowers_the_loss():
    optax = pytest.importorskip("optax")
    cfg = models.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    model = models.init_random(cfg, jax.random.key(0), init_std=0.1)
    apply, params = models.functional(model)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def loss_fn(p):
        return models.lm_loss(apply(p, IDS)[0], IDS, MASK)

    @jax.jit
    def train_step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    p1, opt_state, loss0 = train_step(params, opt_state)
    loss1 = float(jax.jit(loss_fn)(p1))
    # the loss of random weights sits near log(V); one Adam step must move it down measurably
    print(f"\nloss {float(loss0):.4f} -> {loss1:.4f} after one Adam step (log V = {np.log(61):.4f})")
    assert abs(float(loss0) - np.log(61)) < 0.5
    assert loss1 < float(loss0) - 0.05
    # the step changed the parameters (and the original model is untouched: params are values)
    assert not np.allclose(np.asarray(_pure(p1)["embed"]), np.asarray(models.params_of(model)["embed"]))
