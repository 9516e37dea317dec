"""The models inside a JAX training stack, as a user trains them: nnx.Optimizer / nnx.jit /
nnx.value_and_grad on the module, jax.jit with the module as an argument, split/merge/state round
trips, the LM loss on padded rows, bf16 weights, jax.vmap / jax.checkpoint, and gradients through a
dense or KIVI cache (prefill, then decode steps). References: transformers' PyTorch autograd on the
same weights, a float64 PyTorch forward that runs KIVI's Algorithm 1 (the quantizer's min and max
differentiable, its codes constant: what kivi_jax.quant's docstring promises), float64 NumPy."""

import dataclasses

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
IDS = np.random.default_rng(0).integers(0, V, size=(3, 16)).astype(np.int32)
LENGTHS = np.array([16, 9, 0], np.int32)  # a full row, a padded one, one with no token at all
MASK = (np.arange(16)[None] < LENGTHS[:, None]).astype(np.int32)
def _hf(kind="llama", *, tie=True, rope=None, window=None, hidden=32, heads=4, kv_heads=2, head_dim=None, seed=3):
    kw = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=tie)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_scaling=rope, **kw)
    else:
        cfg = transformers.MistralConfig(sliding_window=window, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = (transformers.LlamaForCausalLM if kind == "llama" else transformers.MistralForCausalLM)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((0.2 * torch.randn(p.shape, generator=g)) + (1.0 if p.ndim == 1 else 0.0))
    return m


def _torch_loss_grads(m, ids=IDS, mask=MASK):
    """transformers' loss (masked mean next-token NLL) and autograd's gradients, keyed like params_of."""
    m.zero_grad()
    logits = m(torch.tensor(ids, dtype=torch.long)).logits[:, :-1]
    tgt = torch.tensor(ids[:, 1:], dtype=torch.long)
    w = torch.tensor(mask[:, 1:], dtype=logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
    loss = (nll * w.reshape(-1)).sum() / w.sum()
    loss.backward()
    return float(loss.detach()), hf_tree(m, lambda p: p.grad.detach().double().numpy())


def _max_rel_err(ours, ref):
    """{name: max |ours - ref| / max |ref|} over the leaves of two params_of-shaped trees."""
    o = models.llama._flatten(ours)
    r = models.llama._flatten(ref)
    assert o.keys() == r.keys()
    return {k: float(np.max(np.abs(np.asarray(o[k], np.float64) - r[k])) / np.max(np.abs(r[k]))) for k in r}


# ---- nnx-native training --------------------------------------------------------------------
def test_nnx_optimizer_step_on_the_module_matches_torch_sgd():
    """nnx.Optimizer + nnx.jit + nnx.value_and_grad on the module itself: the loss is torch's, the
    module's parameters after one SGD step are p - lr * (torch's gradient), every one of them; and
    jax.jit with the updated module as an argument gives torch's loss at torch's updated weights."""
    lr = 0.5
    hf = _hf()
    model = models.from_torch(hf)
    p0 = jax.tree.map(np.asarray, models.params_of(model))
    opt = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids, mask):
        loss, grads = nnx.value_and_grad(lambda m: models.lm_loss(m(ids)[0], ids, mask))(model)
        opt.update(model, grads)
        return loss

    loss = step(model, opt, IDS, MASK)
    ref_loss, ref_g = _torch_loss_grads(hf)
    assert abs(float(loss) - ref_loss) <= 1e-5 * ref_loss
    expected = jax.tree.map(lambda p, g: p - lr * g, p0, ref_g)
    errs = _max_rel_err(models.params_of(model), expected)  # the module itself was updated
    moved = _max_rel_err(p0, expected)
    print(f"\nmax rel err after the step {max(errs.values()):.2g}; the step moved params by {min(moved.values()):.2g}+")
    assert max(errs.values()) <= 1e-5 and min(moved.values()) > 1e-3

    with torch.no_grad():
        for p in hf.parameters():
            p -= lr * p.grad
    ref_loss1, _ = _torch_loss_grads(hf)
    loss1 = jax.jit(lambda m, ids, mask: models.lm_loss(m(ids)[0], ids, mask))(model, IDS, MASK)
    assert abs(float(loss1) - ref_loss1) <= 1e-5 * ref_loss1 and ref_loss1 < ref_loss - 0.05


def test_split_merge_state_round_trips():
    """nnx.split/merge and params_of/from_params give the same logits bit for bit; nnx.update of an
    edited state reaches the forward (logits are linear in an untied lm_head: doubling it doubles them)."""
    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    model = models.init_random(cfg, jax.random.key(1), init_std=0.1)
    ref = np.asarray(model(IDS)[0])
    graphdef, state = nnx.split(model)
    assert np.array_equal(np.asarray(nnx.merge(graphdef, state)(IDS)[0]), ref)
    again = models.from_params(cfg, models.params_of(model))
    assert np.array_equal(np.asarray(again(IDS)[0]), ref)
    params = nnx.state(again, nnx.Param)
    params["lm_head"][...] = 2 * params["lm_head"][...]
    nnx.update(again, params)
    np.testing.assert_allclose(np.asarray(again(IDS)[0]), 2 * ref, rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.asarray(model(IDS)[0]), ref)  # the source model is untouched


# ---- gradients against torch autograd ----------------------------------------------------------
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8, rope_theta=10000.0)


@pytest.mark.parametrize("variant", ["tied-gqa", "untied-llama3-rope", "mistral-window5"])
def test_every_param_grad_matches_torch(variant):
    """Gradients of the masked LM loss w.r.t. every parameter (RoPE incl. llama3 scaling, GQA, tied
    and untied embeddings, Mistral's sliding window shorter than the sequence) equal autograd's."""
    hf = {"tied-gqa": lambda: _hf(tie=True),
          "untied-llama3-rope": lambda: _hf(tie=False, rope=LLAMA3),
          "mistral-window5": lambda: _hf("mistral", tie=False, window=5)}[variant]()
    model = models.from_torch(hf)
    mask = np.ones_like(IDS)
    mask[1, 12:] = 0
    loss, grads = nnx.value_and_grad(lambda m: models.lm_loss(m(IDS)[0], IDS, mask))(model)
    ref_loss, ref = _torch_loss_grads(hf, mask=mask)
    errs = _max_rel_err(nnx.to_pure_dict(grads), ref)
    worst = max(errs, key=errs.get)
    print(f"\n{variant}: loss {float(loss):.6f} vs torch {ref_loss:.6f}; worst grad {worst} {errs[worst]:.2g}")
    assert abs(float(loss) - ref_loss) <= 1e-5 * ref_loss
    assert errs[worst] <= 2e-5
    if variant.startswith("mistral"):  # the window mattered: full causal attention gives another loss
        full = models.from_params(dataclasses.replace(model.config, model_type="llama", sliding_window=None),
                                  models.params_of(model))
        assert abs(float(models.lm_loss(full(IDS)[0], IDS, mask)) - ref_loss) > 1e-3


def test_padded_batch_with_an_empty_row_vmap_and_remat():
    """Right-padded rows (lengths [16, 9, 0], mask from them): the loss and every gradient equal
    torch's over the real tokens only (no NaN from the row with nothing to attend); a per-example
    loss under jax.vmap equals torch's per row; jax.checkpoint changes no gradient."""
    hf = _hf(tie=False)
    apply, params = models.functional(models.from_torch(hf))

    def loss_fn(p, ids, lengths, mask):
        return models.lm_loss(apply(p, ids, lengths=lengths)[0], ids, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params, IDS, LENGTHS, MASK)
    remat = jax.jit(jax.grad(jax.checkpoint(loss_fn)))(params, IDS, LENGTHS, MASK)
    ref_loss, ref = _torch_loss_grads(hf, IDS[:2], MASK[:2])  # (row 2 has no token: it adds nothing)
    for g in (grads, remat):
        errs = _max_rel_err(nnx.to_pure_dict(g), ref)
        assert max(errs.values()) <= 2e-5, errs
    assert abs(float(loss) - ref_loss) <= 1e-5 * ref_loss

    per_example = jax.vmap(lambda ids, n, m: loss_fn(params, ids[None], n[None], m[None]))(IDS, LENGTHS, MASK)
    ref_rows = [_torch_loss_grads(hf, IDS[i:i + 1], MASK[i:i + 1])[0] for i in range(2)]
    np.testing.assert_allclose(np.asarray(per_example), ref_rows + [0.0], rtol=1e-5)


def test_bf16_weights_train_with_a_float32_loss():
    """bfloat16 weights: logits and the loss are float32, gradients bfloat16 and finite, and both
    sit within bf16 rounding of float32 autograd on the same (bf16-representable) weights."""
    hf = _hf(tie=False)
    with torch.no_grad():  # the float32 reference holds exactly the bf16 weights
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model = models.from_torch(hf, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    loss, grads = nnx.value_and_grad(lambda m: models.lm_loss(m(IDS)[0], IDS, MASK))(model)
    ref_loss, ref = _torch_loss_grads(hf)
    g = nnx.to_pure_dict(grads)
    assert loss.dtype == jnp.float32 and model(IDS)[0].dtype == jnp.float32
    assert all(a.dtype == jnp.bfloat16 and bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g))
    errs = _max_rel_err(g, ref)
    print(f"\nbf16 loss {float(loss):.5f} vs float32 torch {ref_loss:.5f}; worst grad err {max(errs.values()):.2g}")
    assert abs(float(loss) - ref_loss) <= 1e-2 * ref_loss
    assert max(errs.values()) <= 0.1


# ---- lm_loss -----------------------------------------------------------------------------------
def _np_loss(logits, ids, mask):
    lg = np.asarray(logits, np.float64)[:, :-1]
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    m = np.asarray(mask, np.float64)[:, 1:]
    tgt = np.where(m > 0, ids[:, 1:], 0)
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return float((nll * m).sum() / max(m.sum(), 1.0))


@pytest.mark.parametrize("pad_id", [-100, V, 0])
def test_lm_loss_ignores_what_masked_targets_hold(pad_id):
    """Padded targets may hold Hugging Face's ignore id -100 or a pad id >= V: masked out, they
    must not count (they made the loss NaN: an out-of-range gather is NaN, and NaN * 0 is NaN)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 16, V)).astype(np.float32)
    ids = np.where(MASK > 0, IDS, pad_id).astype(np.int32)
    ref = _np_loss(logits, IDS, MASK)
    loss, g = jax.value_and_grad(models.lm_loss)(jnp.asarray(logits), ids, MASK)
    assert abs(float(loss) - ref) <= 1e-6 * ref
    assert abs(float(jax.jit(models.lm_loss)(logits, ids, MASK.astype(bool))) - ref) <= 1e-6 * ref
    # the gradient: (softmax - onehot) / count on the real targets, 0 elsewhere (padding, last position)
    lg = logits[:, :-1].astype(np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(3)[:, None], np.arange(15)[None], np.where(MASK[:, 1:] > 0, IDS[:, 1:], 0)] -= 1
    expected = np.zeros_like(logits, dtype=np.float64)
    expected[:, :-1] = p * MASK[:, 1:, None] / MASK[:, 1:].sum()
    np.testing.assert_allclose(np.asarray(g), expected, atol=1e-7)


def test_lm_loss_with_nothing_unmasked_is_zero_with_zero_gradient():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, V)), jnp.float32)
    loss, g = jax.value_and_grad(models.lm_loss)(logits, IDS[:2, :5], np.zeros((2, 5), np.int32))
    assert float(loss) == 0.0 and not np.asarray(g).any()


def test_lm_loss_errors_name_the_argument():
    logits = jnp.zeros((3, 16, V))
    cases = [
        (dict(logits=logits[:, :1]), "logits must be [B, T, V] and input_ids [B, T]"),  # logits_at= output
        (dict(input_ids=IDS.astype(np.float32)), "input_ids must be integer token ids; got dtype float32"),
        (dict(mask=MASK[:, 1:]), "mask must have input_ids' shape (3, 16)"),
        (dict(input_ids=np.where(MASK > 0, IDS, V).astype(np.int32), mask=None),
         "input_ids (the unmasked targets) hold 22 token id(s) outside [0, vocab_size=61)"),
    ]
    for kw, msg in cases:
        args = dict(logits=logits, input_ids=IDS, mask=MASK) | kw
        with pytest.raises(ValueError) as e:
            models.lm_loss(**args)
        assert msg in str(e.value), str(e.value)


def test_model_lengths_out_of_range_is_an_error():
    """lengths past T masked nothing and a negative one everything, silently (the attention's range
    check ran inside the layer scan, on a tracer); with a cache they only set the overflow flag."""
    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
    model = models.init_random(cfg, jax.random.key(0))
    for bad, shown in ((np.array([17, 9, 0]), r"\[17\]"), (np.array([16, -1, 0]), r"\[-1\]")):
        for cache in (None, model.init_cache(3, 32)):
            with pytest.raises(ValueError, match=rf"lengths={shown} out of range: .* in \[0, T=16\]"):
                model(IDS, cache, lengths=bad)
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \(3,\); got float32"):
        model(IDS, lengths=np.array([16.0, 9.0, 0.0], np.float32))
    apply, params = models.functional(model)  # logits_at reaches the model through functional's apply
    at = np.array([3, 8, 0])
    np.testing.assert_array_equal(np.asarray(apply(params, IDS, logits_at=at)[0][:, 0]),
                                  np.asarray(model(IDS)[0])[np.arange(3), at])


# ---- gradients through a cache (prefill, then decode steps) ------------------------------------
G = R = 16
D = 16


def _quant_dequant(x, bits, dim):
    """KIVI's min/max group quantizer on groups along ``dim``, float64: min and max differentiable,
    codes (round half to even) constant; a constant group dequantizes to its min."""
    levels = 2**bits - 1
    mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (mx - mn) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.where(scale > 0, torch.round((x - mn) / safe), torch.zeros_like(x)).clamp(0, levels).detach()
    return code * scale + mn


def _reference_logits(m, ids, t0, kivi):
    """[B, T, V] float64 torch: positions < t0 a causal full-precision prompt; each later position a
    decode step over the cache as Algorithm 1 leaves it after n = t + 1 tokens (kivi): keys of the
    first floor(n / R) R tokens quantized per channel in groups of G tokens, values of the first
    max(n - R, 0) tokens per token in groups of G channels, the rest full precision."""
    sd = dict(m.named_parameters())
    c = m.config
    b, t = ids.shape
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([emb, emb], -1).cos(), torch.cat([emb, emb], -1).sin()

    def rope(a):
        return a * cos + torch.cat([-a[..., D // 2:], a[..., :D // 2]], -1) * sin

    def rms(a, w):
        return w * a * torch.rsqrt((a * a).mean(-1, keepdim=True) + c.rms_norm_eps)

    def keys(k, n):
        nq = n // R * R
        kq = _quant_dequant(k[:, :, :nq].reshape(b, nh, nq // G, G, D), 2, 3).reshape(b, nh, nq, D)
        return torch.cat([kq, k[:, :, nq:n]], 2)

    def values(v, n):
        nq = max(n - R, 0)
        vq = _quant_dequant(v[:, :, :nq].reshape(b, nh, nq, D // G, G), 2, 4).reshape(b, nh, nq, D)
        return torch.cat([vq, v[:, :, nq:n]], 2)

    x = sd["model.embed_tokens.weight"].double()[ids]
    for i in range(c.num_hidden_layers):
        def w(name):
            return sd[f"model.layers.{i}.{name}.weight"].double()

        h = rms(x, w("input_layernorm"))
        q = rope((h @ w("self_attn.q_proj").T).reshape(b, t, nh, D).transpose(1, 2))
        k = rope((h @ w("self_attn.k_proj").T).reshape(b, t, nkv, D).transpose(1, 2)).repeat_interleave(nh // nkv, 1)
        v = (h @ w("self_attn.v_proj").T).reshape(b, t, nkv, D).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        outs = []
        for j in range(t):
            n = j + 1
            kk, vv = (keys(k, n), values(v, n)) if kivi and j >= t0 else (k[:, :, :n], v[:, :, :n])
            outs.append(torch.softmax(q[:, :, j:n] @ kk.transpose(-1, -2) / D**0.5, -1) @ vv)
        x = x + torch.cat(outs, 2).transpose(1, 2).reshape(b, t, nh * D) @ w("self_attn.o_proj").T
        h = rms(x, w("post_attention_layernorm"))
        x = x + (torch.nn.functional.silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    return rms(x, sd["model.norm.weight"].double()) @ sd["lm_head.weight"].double().T


@pytest.mark.parametrize("kind", ["dense", "kivi2-pallas"])
def test_grad_through_prefill_and_decode_steps_matches_reference(kind):
    """jax.grad w.r.t. every parameter of a loss on 3 decode steps' logits after a 30-token prefill
    into a DenseCache / KIVICache (G = R = 16: the steps cross a key flush at 32 tokens and quantize
    a value token each) equals autograd through the float64 reference above. Layer 0's k_proj has
    two zero columns (channel 0 and its RoPE partner 8 of KV head 0), so those key groups are
    constant (scale 0): their gradient is split over the group's tied min, as jnp.min's is.
    "kivi2-pallas": the decode steps' attention through the Pallas kernel (interpret mode here; a
    GPU's default), which has no autodiff rule of its own: its value is the kernel's, its
    derivative reference_decode_attention's: the math of the CPU's default path (impl "auto", the
    reference over a prefix of the stores), whose own case here took 18 s of the suite and was
    dropped for this one (tests/test_quant.py::test_kivi_cache_is_differentiable differentiates
    a cache's reference path)."""
    hf = _hf(tie=False, hidden=64, heads=4, kv_heads=2, head_dim=D, seed=5)
    with torch.no_grad():
        hf.model.layers[0].self_attn.k_proj.weight[[0, 8]] = 0.0
    t0, steps = 30, 3
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, size=(2, t0 + steps)).astype(np.int32)
    weights = rng.normal(size=(2, steps, V))
    ids_t = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():  # the reference itself: transformers' logits where it is dense
        assert float((_reference_logits(hf, ids_t, t0, False).float() - hf(ids_t).logits).abs().max()) < 5e-5

    kivi = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=G, residual_length=R) if kind != "dense" else None
    attn = "pallas" if kind.endswith("pallas") else "auto"
    model = models.from_torch(hf)
    apply, params = models.functional(model)

    def loss_fn(p):
        _, cache = apply(p, ids[:, :t0], model.init_cache(2, 64, kivi=kivi))
        out = []
        for s in range(steps):
            lg, cache = apply(p, ids[:, t0 + s:t0 + s + 1], cache, attn_impl=attn)
            out.append(lg)
        lg = jnp.concatenate(out, 1)
        return jnp.sum(lg * weights) + 0.1 * jnp.sum(lg * lg), lg

    # (at the suite's XLA:CPU -O0 this KIVI program's gradient came out NaN in every parameter upstream
    # of layer 0's keys until quant._group_extreme: jnp.max's rule divided by a count of 0)
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    hf.zero_grad()
    ref_logits = _reference_logits(hf, ids_t, t0, kivi is not None)[:, t0:]
    ref_loss = (ref_logits * torch.tensor(weights)).sum() + 0.1 * (ref_logits**2).sum()
    ref_loss.backward()
    ref = hf_tree(hf, lambda p: p.grad.detach().double().numpy())
    errs = _max_rel_err(nnx.to_pure_dict(grads), ref)
    worst = max(errs, key=errs.get)
    dense_logits = _reference_logits(hf, ids_t, t0, False)[:, t0:].detach().numpy()
    print(f"\n{kind}: logits err {np.abs(np.asarray(logits) - ref_logits.detach().numpy()).max():.2g} (quantization "
          f"moved them {np.abs(ref_logits.detach().numpy() - dense_logits).max():.2g}); worst grad {worst} {errs[worst]:.2g}")
    np.testing.assert_allclose(np.asarray(logits), ref_logits.detach().numpy(), atol=5e-5, rtol=0)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert errs[worst] <= 5e-5
    assert np.abs(nnx.to_pure_dict(grads)["layers"]["k_proj"][0][:, [0, 8]]).max() > 1e-3  # the constant groups carry gradient
    if kivi is not None:  # the reference saw the quantization
        assert np.abs(ref_logits.detach().numpy() - dense_logits).max() > 1e-2


# ---- fake_quantize's straight-through gradient ----------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("axis", [-2, -1])  # keys per channel, values per token
def test_fake_quantize_gradient_is_exactly_the_cotangent(dtype, axis):
    """Straight-through: d/dx sum(w * fake_quantize(x)) == w bit for bit, in x's dtype, for every
    element (each group's min and max, constant groups too), eagerly and under jit + vmap."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 2, 64, 32)).astype(np.float32)
    x[0, 0, :32, :] = 1.5  # constant key groups (axis -2) and value groups (axis -1)
    x[1, 1, 5, :] = -0.25
    w = jnp.asarray(rng.normal(size=x.shape), dtype)
    xx = jnp.asarray(x, dtype)

    def f(a, ww):
        return jnp.sum(kivi_jax.fake_quantize(a, bits=2, group_size=32, axis=axis).astype(jnp.float32)
                       * ww.astype(jnp.float32))

    g = jax.grad(f)(xx, w)
    gv = jax.jit(jax.vmap(jax.grad(f)))(xx, w)
    assert g.dtype == dtype and gv.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    np.testing.assert_array_equal(np.asarray(gv, np.float32), np.asarray(w, np.float32))
    y = np.asarray(kivi_jax.fake_quantize(xx, bits=2, group_size=32, axis=axis), np.float32)
    assert (y[0, 0, :32] == 1.5).all() and not np.array_equal(y, np.asarray(xx, np.float32))  # it did quantize
