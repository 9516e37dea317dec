"""The models imported into a user's JAX training stack, where the earlier training tests leave
gaps: padding ids outside the vocabulary after each row's lengths (loss, gradients and
generate), the blocked prefill attention (several query blocks, a sliding window, padding)
under autodiff, the model as a submodule of a user's nnx.Module (with nnx.remat) trained by
nnx.Optimizer, per-example gradients under jax.vmap, bf16 weights over several Adam steps, a
full-sequence forward with a dense cache past max_position_embeddings, and random init (nnx.Rngs,
int seeds) against transformers' own init. References: transformers' PyTorch models and autograd
on the same weights, torch.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kivi_jax
import models
from hf_params import hf_tree

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
optax = pytest.importorskip("optax")

V = 61
def _hf(kind="llama", *, tie=False, window=None, max_pos=128, rope=None, seed=0, randomize=True):
    """A 2-layer, hidden-64 transformers model (4 query heads, 2 KV heads: GQA), eager attention,
    weights drawn large enough that attention is peaked and norms away from 1."""
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=max_pos, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_scaling=rope, **kw)
    else:
        cfg = transformers.MistralConfig(sliding_window=window, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = (transformers.LlamaForCausalLM if kind == "llama" else transformers.MistralForCausalLM)(cfg).eval()
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                        else 0.15 * torch.randn(p.shape, generator=g))
    return m


def _grads(m):
    return hf_tree(m, lambda p: p.grad.detach().double().numpy())


def _rel_errs(ours, ref):
    """{name: max |ours - ref| / max |ref|} over the leaves of two params_of-shaped trees."""
    o, r = models.llama._flatten(ours), models.llama._flatten(ref)
    assert o.keys() == r.keys()
    return {k: float(np.max(np.abs(np.asarray(o[k], np.float64) - r[k])) / np.max(np.abs(r[k]))) for k in r}


def _torch_masked_loss(m, ids, mask):
    """transformers' logits [B, T, V] (attention_mask = mask) and the mean next-token NLL over the
    targets mask marks real."""
    logits = m(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits
    tgt = torch.tensor(ids[:, 1:], dtype=torch.long)
    w = torch.tensor(mask[:, 1:], dtype=logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), tgt.reshape(-1), reduction="none")
    return logits, (nll * w.reshape(-1)).sum() / w.sum()


def _padded(t, lengths, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


# ---- padding ids the call does not read -----------------------------------------------------------
def test_out_of_vocab_padding_after_lengths_leaves_loss_grads_and_generate_as_torch():
    """Padding past a row's lengths[b] is documented as never read (not checked), and lm_loss
    takes Hugging Face's -100 or a pad id >= V there. Gathered anyway, such an id was a NaN
    embedding row whose keys and values reached the row's real tokens through 0 * NaN in the
    masked attention: NaN logits on the real tokens, a NaN loss and NaN gradients in every
    parameter (eager and jitted), and kivi_jax.generate emitting token 0 for that row. Now (rows
    padded with V and with -100): the loss, every gradient and the real tokens' logits equal
    torch's (pad 0 + attention_mask), and greedy generate continues each padded row as torch
    continues it unpadded."""
    hf = _hf(seed=2)
    lengths = np.array([12, 7, 9], np.int32)
    ids, mask = _padded(12, lengths, seed=3)
    ours_ids = np.where(mask > 0, ids, np.array([[0], [V], [-100]])).astype(np.int32)
    model = models.from_torch(hf)
    apply, params = models.functional(model)

    def loss_fn(p, x, n, mk):
        logits = apply(p, x, lengths=n)[0]
        return models.lm_loss(logits, x, mk), logits

    hf.zero_grad()
    ref_logits, ref_loss = _torch_masked_loss(hf, ids, mask)
    ref_loss.backward()
    ref = _grads(hf)
    real = mask > 0
    (loss, logits), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, ours_ids, lengths, mask)
    errs = _rel_errs(nnx.to_pure_dict(g), ref)
    print(f"\npadded with V and -100: loss {float(loss):.6f} vs torch {ref_loss.item():.6f}; worst grad "
          f"{max(errs, key=errs.get)} {max(errs.values()):.2g}")
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert max(errs.values()) <= 2e-5, errs
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits.detach().numpy()[real], atol=5e-5, rtol=0)

    # generate (a dense cache) feeds the same prompts: each row continues as torch continues it alone
    out = np.asarray(kivi_jax.generate(model, ours_ids, lengths=lengths, max_new_tokens=3, max_length=24).tokens)
    for row, n in enumerate(lengths):
        seq = torch.tensor(ids[row:row + 1, :n], dtype=torch.long)
        with torch.no_grad():
            for _ in range(3):
                seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], 1)
        assert out[row].tolist() == seq[0, n:].tolist(), row


# ---- the blocked prefill attention under autodiff -------------------------------------------------
def test_grads_over_several_prefill_query_blocks_with_window_and_padding_match_torch(monkeypatch):
    """prefill_attention runs its queries in blocks of PREFILL_BLOCK (512), each against the keys it
    can see: every other training test stays within one block. With blocks of 8 over 24 tokens, a
    sliding window of 5 that straddles the block edges, GQA and right-padded rows (lengths 24, 13,
    6): the real tokens' logits, the masked loss and every gradient equal transformers' Mistral
    with an attention_mask."""
    monkeypatch.setattr(kivi_jax.attention, "PREFILL_BLOCK", 8)
    hf = _hf("mistral", window=5, seed=4)
    lengths = np.array([24, 13, 6], np.int32)
    ids, mask = _padded(24, lengths, seed=5)
    model = models.from_torch(hf)
    assert isinstance(model, models.Mistral) and model.config.sliding_window == 5

    def loss_fn(m, x, n, mk):
        logits = m(x, lengths=n)[0]
        return models.lm_loss(logits, x, mk), logits

    (loss, logits), g = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, ids, lengths, mask)
    hf.zero_grad()
    ref_logits, ref_loss = _torch_masked_loss(hf, ids, mask)
    ref_loss.backward()
    errs = _rel_errs(nnx.to_pure_dict(g), _grads(hf))
    real = mask > 0
    print(f"\nblocks of 8, window 5: loss {float(loss):.6f} vs torch {ref_loss.item():.6f}; worst grad "
          f"{max(errs, key=errs.get)} {max(errs.values()):.2g}")
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits.detach().numpy()[real], atol=5e-5, rtol=0)
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert max(errs.values()) <= 2e-5, errs
    # the window mattered: full causal attention over the same rows gives another loss
    with torch.no_grad():
        hf.config.sliding_window = None
        assert abs(_torch_masked_loss(hf, ids, mask)[1].item() - ref_loss.item()) > 1e-3


# ---- composition: the model inside a user's module ----------------------------------------------
class _Scorer(nnx.Module):
    """A user's module: a scalar score per sequence from the LM's logits at its last real token,
    through a Flax nnx.Linear head; the LM call rematerialized (nnx.remat)."""

    def __init__(self, lm, *, rngs):
        self.lm = lm
        self.head = nnx.Linear(lm.config.vocab_size, 1, rngs=rngs)

    def __call__(self, ids, lengths):
        logits, _ = nnx.remat(lambda lm, x, n: lm(x, lengths=n, logits_at=n - 1))(self.lm, ids, lengths)
        return self.head(logits[:, 0])[:, 0]


def test_model_as_a_submodule_trains_with_nnx_optimizer_like_torch():
    """The Llama held by a user's nnx.Module (beside an nnx.Linear, under nnx.remat): the state
    nests it under the attribute's name, gradients of a score regression w.r.t. every LM parameter
    and the head equal autograd through transformers' model + torch.nn.Linear, and one
    nnx.Optimizer SGD step moves the shared Llama object itself to p - lr * torch's gradient."""
    lr = 0.3
    hf = _hf(tie=True, seed=6)
    lengths = np.array([10, 4, 7], np.int32)
    ids, mask = _padded(10, lengths, seed=7)
    target = np.array([0.5, -1.0, 2.0], np.float32)
    lm = models.from_torch(hf)
    p0 = jax.tree.map(np.asarray, models.params_of(lm))
    scorer = _Scorer(lm, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(scorer, nnx.Param))
    assert sorted(state) == ["head", "lm"] and sorted(state["head"]) == ["bias", "kernel"]
    head = torch.nn.Linear(V, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(np.asarray(state["head"]["kernel"]).T))
        head.bias.copy_(torch.tensor(np.asarray(state["head"]["bias"])) + 0.3)
    scorer.head.bias[...] = scorer.head.bias[...] + 0.3  # (nnx.Linear's bias starts at 0)

    opt = nnx.Optimizer(scorer, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(s, o, x, n, y):
        loss, g = nnx.value_and_grad(lambda s: jnp.mean((s(x, n) - y) ** 2))(s)
        o.update(s, g)
        return loss, g

    loss, g = step(scorer, opt, ids, lengths, target)

    logits = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits
    score = head(logits[torch.arange(3), torch.tensor(lengths - 1, dtype=torch.long)])[:, 0]
    ref_loss = ((score - torch.tensor(target)) ** 2).mean()
    hf.zero_grad()
    ref_loss.backward()
    g = nnx.to_pure_dict(g)
    errs = _rel_errs(g["lm"], _grads(hf))
    head_err = max(np.abs(np.asarray(g["head"]["kernel"])[:, 0] - head.weight.grad.numpy()[0]).max()
                   / np.abs(head.weight.grad.numpy()).max(),
                   abs(float(g["head"]["bias"][0]) - float(head.bias.grad[0])) / abs(float(head.bias.grad[0])))
    print(f"\nscorer: loss {float(loss):.6f} vs torch {ref_loss.item():.6f}; worst LM grad {max(errs.values()):.2g}, "
          f"head {head_err:.2g}")
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert max(errs.values()) <= 2e-5 and head_err <= 2e-5, errs
    # the step reached the Llama object the user passed in (nnx reference semantics)
    expected = jax.tree.map(lambda p, d: p - lr * d, p0, _grads(hf))
    after = _rel_errs(models.params_of(lm), expected)
    assert max(after.values()) <= 1e-5 and min(_rel_errs(p0, expected).values()) > 1e-4, after


# ---- per-example gradients under jax.vmap ----------------------------------------------------------
def test_per_example_grads_under_vmap_match_torch_per_row():
    """jax.vmap(jax.grad(loss)) over single-sequence calls (per-example gradients, as DP-SGD
    clips them), each row with its own lengths: row i's gradients w.r.t. every parameter equal
    autograd's on row i alone."""
    hf = _hf(seed=8)
    lengths = np.array([9, 5], np.int32)
    ids, mask = _padded(9, lengths, seed=9)
    apply, params = models.functional(models.from_torch(hf))

    def one(p, x, n, mk):  # x [T]: one sequence
        return models.lm_loss(apply(p, x[None], lengths=n[None])[0], x[None], mk[None])

    g = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0)))(params, ids, lengths, mask)
    g = nnx.to_pure_dict(g)
    for i in range(2):
        hf.zero_grad()
        _torch_masked_loss(hf, ids[i:i + 1, :lengths[i]], mask[i:i + 1, :lengths[i]])[1].backward()
        errs = _rel_errs(jax.tree.map(lambda a: a[i], g), _grads(hf))
        assert max(errs.values()) <= 2e-5, (i, errs)


# ---- bf16 weights over several optimizer steps ---------------------------------------------------------
def test_bf16_weights_over_adam_steps_track_float32_torch_and_keep_their_dtype():
    """nnx.Optimizer(optax.adam) on bfloat16 weights, 4 jitted steps: the loss is float32 and
    falls, every parameter stays bfloat16 (no silent promotion by the update), and the losses
    track torch.optim.Adam in float32 from the same (bf16-representable) weights within bf16
    rounding."""
    hf = _hf(seed=10)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    lengths = np.array([12, 8], np.int32)
    ids, mask = _padded(12, lengths, seed=11)
    model = models.from_torch(hf, dtype=jnp.bfloat16)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, x, n, mk):
        loss, g = nnx.value_and_grad(lambda m: models.lm_loss(m(x, lengths=n)[0], x, mk))(m)
        o.update(m, g)
        return loss

    out = [step(model, opt, ids, lengths, mask) for _ in range(4)]
    assert {str(loss.dtype) for loss in out} == {"float32"}
    losses = [float(loss) for loss in out]
    topt = torch.optim.Adam(hf.parameters(), lr=3e-3)
    ref = []
    for _ in range(4):
        topt.zero_grad()
        loss = _torch_masked_loss(hf, ids, mask)[1]
        loss.backward()
        topt.step()
        ref.append(loss.item())
    print(f"\nbf16 Adam losses {np.round(losses, 4).tolist()} vs float32 torch {np.round(ref, 4).tolist()}")
    dtypes = {str(a.dtype) for a in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {"bfloat16"}
    np.testing.assert_allclose(losses, ref, rtol=2e-2)
    assert losses[-1] < losses[0] - 0.1 and ref[-1] < ref[0] - 0.1


# ---- full-sequence forward with a dense cache, past max_position_embeddings -----------------------
def test_jitted_dense_cache_forward_past_max_positions_matches_torch_logits_and_kv():
    """max_position_embeddings is not a limit for transformers' Llama (RoPE extrapolates) nor here:
    40 tokens through a model configured for 16 (llama3 RoPE scaling from 8), nnx.jit with a dense
    cache: the logits equal transformers', and the cache holds transformers' rotated keys and
    values (its past key values) for every layer; a no-cache jax.jit forward gives the same logits.
    Ids of the wrong rank or dtype are named with what is allowed."""
    llama3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8, rope_theta=10000.0)
    hf = _hf(max_pos=16, rope=llama3, seed=12)
    ids = np.random.default_rng(13).integers(0, V, size=(2, 40)).astype(np.int32)
    model = models.from_torch(hf)
    assert model.config.max_position_embeddings == 16
    logits, cache = nnx.jit(lambda m, x, c: m(x, c))(model, ids, model.init_cache(2, 48))
    apply, params = models.functional(model)
    plain = jax.jit(apply)(params, ids)[0]
    with torch.no_grad():
        out = hf(torch.tensor(ids, dtype=torch.long), use_cache=True)
    kv = getattr(out, "cache", None)  # (transformers 5.2x renamed past_key_values)
    kv = out.past_key_values if kv is None else kv
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=5e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(plain), out.logits.numpy(), atol=5e-5, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [40, 40]
    for i in range(2):
        np.testing.assert_allclose(np.asarray(cache.layers.k[i][:, :, :40]), kv.layers[i].keys.numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(cache.layers.v[i][:, :, :40]), kv.layers[i].values.numpy(), atol=2e-5)
    for bad, shown in ((ids[0], r"shape \(40,\) dtype int32"), (ids > 3, r"shape \(2, 40\) dtype bool")):
        with pytest.raises(ValueError, match=r"input_ids must be an integer array \[B, T\]; got " + shown):
            model(bad)


# ---- random init ----------------------------------------------------------------------------------
def test_random_init_follows_transformers_init_and_takes_int_seeds():
    """models.Llama(config, rngs=nnx.Rngs(...)) and init_random(config, seed): transformers'
    parameters (transposed) by name, shape and init (normal(0, 0.02) matrices and embedding,
    unit norms); an int seed is the key of that seed (it failed inside the jitted init with
    "Invalid rng value: JitTracer"); rngs that are not nnx.Rngs are named."""
    hf = _hf(tie=False, randomize=False)  # transformers' own init (initializer_range 0.02)
    hf_params = hf_tree(hf, lambda p: p.detach().double().numpy())
    cfg = models.ModelConfig.from_hf_dict(hf.config.to_dict())
    direct = models.params_of(models.Llama(cfg, rngs=nnx.Rngs(0)))
    seeded = models.params_of(models.init_random(cfg, 5))
    keyed = models.params_of(models.init_random(cfg, jax.random.key(5)))
    for tree in (direct, seeded):
        ours = {k: np.asarray(v, np.float64) for k, v in models.llama._flatten(tree).items()}
        ref = models.llama._flatten(hf_params)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
        for k in ref:
            if k.endswith("norm"):
                assert np.array_equal(ours[k], ref[k]) and (ref[k] == 1).all(), k
            else:  # the same distribution: std 0.02 (HF's initializer_range), mean 0
                assert abs(ours[k].std() / ref[k].std() - 1) < 0.08 and abs(ref[k].std() - 0.02) < 0.002, k
                assert abs(ours[k].mean()) < 0.003, k
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seeded), jax.tree.leaves(keyed)))
    assert not np.array_equal(np.asarray(seeded["embed"]), np.asarray(direct["embed"]))
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs, e.g. nnx.Rngs\(0\); got int 0"):
        models.Llama(cfg, rngs=0)
