"""Token selection and generation audited against Hugging Face transformers (torch, CPU).

The references are transformers' own code, not ours: ``TemperatureLogitsWarper``,
``TopKLogitsWarper`` and ``TopPLogitsWarper`` applied in the order its ``generate`` applies
them (temperature, then top_k, then top_p); ``torch.argmax`` (its greedy pick); and
``model.generate`` of its PyTorch Llama on the real SmolLM2 weights for stopping and padding.
Logits are fresh random draws: several seeds, vocabularies of 50, 97, 256 and 5000 tokens.

Two documented differences (kivi_jax.sampling: ties go to the lower token id, top_k keeps
exactly k tokens) are asserted as what they are: at a tie on the top_k boundary HF keeps every
tied token, we keep k; at a tie on the top_p boundary both keep as many tokens, we the lower ids.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax import sampling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper  # noqa: E402

gen = importlib.import_module("kivi_jax.generate")  # the module (kivi_jax.generate is the function)
sys.path.insert(0, os.path.dirname(__file__))
import toy_model  # noqa: E402


# ---- references ---------------------------------------------------------------------------

def hf_warped(logits, temperature, top_k, top_p) -> np.ndarray:
    """[V] float32 logits after HF's warpers, in generate's order (-inf: filtered out)."""
    s = torch.tensor(np.asarray(logits, np.float32)[None])
    s = TemperatureLogitsWarper(float(temperature))(None, s)
    if top_k is not None:
        s = TopKLogitsWarper(int(top_k))(None, s)
    if top_p is not None and top_p < 1.0:  # (generate adds TopP only below 1)
        s = TopPLogitsWarper(float(top_p))(None, s)
    return s[0].numpy()


def softmax64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def hf_distribution(logits, temperature, top_k, top_p):
    """(finite [V] bool: the tokens HF may draw, probs [V] float64: its softmax of the warped logits)."""
    w = hf_warped(logits, temperature, top_k, top_p)
    return np.isfinite(w), softmax64(w)


def our_distribution(logits, temperature, top_k, top_p, monkeypatch):
    """(finite [V] bool, probs [V] float64): the distribution ``sampling.sample`` draws from.

    Read off exactly by standing in for ``jax.random.categorical`` (the sampler's one random
    draw per row): the stand-in records the logits it is given and returns every position, so
    ``sample`` returns the token id of each of those positions. Eager (no jit cache keeps it)."""
    seen = []

    def record(key, lg, *args, **kw):
        jax.debug.callback(lambda x: seen.append(np.asarray(x, np.float64)), lg)
        return jnp.arange(lg.shape[-1])

    cfg = sampling.check_sampling(temperature, top_k, top_p)
    assert not cfg.greedy
    with monkeypatch.context() as m:
        m.setattr(jax.random, "categorical", record)
        ids = np.asarray(sampling.sample(jnp.asarray(logits, jnp.float32)[None], jax.random.key(0)[None],
                                         temperature=temperature, top_p=top_p, cfg=cfg))[0]
        jax.effects_barrier()
    assert len(seen) == 1, "the sampler no longer draws once per row with jax.random.categorical: update the probe"
    lg = seen[0]
    assert lg.shape == ids.shape and len(set(ids.tolist())) == len(ids), (lg.shape, ids.shape)
    v = len(logits)
    finite, probs = np.zeros(v, bool), np.zeros(v)
    keep = lg > -np.inf
    finite[ids[keep]] = True
    probs[ids[keep]] = softmax64(lg[keep])
    return finite, probs


def random_logits(v: int, seed: int, masked: bool = False) -> np.ndarray:
    """[V] float32 fresh normal logits of a random scale (1 to 4); masked: a fifth of them -inf."""
    rng = np.random.default_rng(1000 * v + seed)
    x = (rng.normal(size=v) * rng.uniform(1.0, 4.0)).astype(np.float32)
    if masked:
        x[rng.random(v) < 0.2] = -np.inf
    return x


# (temperature, top_k, top_p); top_k "V" / "V+13": the vocabulary size / more than it
CONFIGS = [
    (1.0, None, None), (0.7, None, None), (1.0, 10, None), (1.0, None, 0.9), (1.3, 20, 0.8), (0.5, 3, 0.5),
    (1.0, "V", None), (1.0, "V+13", 0.95),  # top_k >= vocab
    (1.0, None, 1e-6), (0.8, 7, 1e-6),  # top_p near 0: the best token only
    (1.0, None, 0.999), (1.0, None, 0.9999), (1.0, None, 0.99999), (1.2, 40, 0.99999),  # top_p near 1
    (1e-3, None, None), (1e-3, 5, 0.9),  # tiny temperature (HF's logits / T stay finite here)
    (50.0, None, 0.5), (1e4, 30, 0.99),  # large temperature: nearly flat
]


def _resolve(k, v):
    return {"V": v, "V+13": v + 13}.get(k, k) if isinstance(k, str) else k


@pytest.mark.parametrize("v", [50, 97, 256, 5000])
def test_sampler_distribution_equals_hf_warpers(v, monkeypatch):
    """The set of drawable tokens equals the set HF's warpers leave finite, and the
    probabilities equal HF's softmax over the warped logits, for every config and seed."""
    for seed, masked in [(0, False), (1, False), (2, True)]:
        logits = random_logits(v, seed, masked)
        for t, k, p in CONFIGS:
            k = _resolve(k, v)
            want_set, want = hf_distribution(logits, t, k, p)
            got_set, got = our_distribution(logits, t, k, p, monkeypatch)
            diff = np.flatnonzero(got_set != want_set)
            assert diff.size == 0, (f"V={v} seed={seed} masked={masked} T={t} top_k={k} top_p={p}: drawable sets "
                                    f"differ at ids {diff[:8].tolist()} (ours {got_set[diff[:8]].tolist()}), "
                                    f"{got_set.sum()} vs HF's {want_set.sum()} tokens")
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7,
                                       err_msg=f"V={v} seed={seed} masked={masked} T={t} top_k={k} top_p={p}")


def test_top_p_near_one_is_taken_in_float64():
    """1 - top_p goes to the sampler computed in float64 (1 - float32(0.999999) is 1.3% off),
    through sample_logits and generate's traced knob alike."""
    p = 0.999999
    want = np.float32(1.0 - p)
    assert abs(float(1 - np.float32(p)) - (1 - p)) > 0.01 * (1 - p)  # what float32 top_p would give
    assert sampling.top_p_rest(p) == want and sampling.top_p_rest(np.float64(p)) == want
    assert sampling.top_p_rest(None) == 0
    knobs = gen._prepare(toy_model.ToyLM(vocab=11, seed=0), np.zeros((1, 3), np.int32), max_new_tokens=2,
                         kivi=None, lengths=None, temperature=1.0, top_k=None, top_p=p, eos_id=None,
                         key=jax.random.key(0), pad_id=0, max_length=None, cache_dtype=None, attn_impl=None)[5]
    assert knobs.top_p_rest == want


def test_bad_sampler_inputs_raise_named_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\] with V >= 1; got shape \(2, 0\)"):
        kivi_jax.sample_logits(jnp.zeros((2, 0)), key, temperature=1.0)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\].*got shape \(5,\)"):
        kivi_jax.sample_logits(jnp.zeros(5), key)
    np.testing.assert_array_equal(kivi_jax.sample_logits([[0.0, 2.0, 1.0]], None), [1])  # array-likes are fine
    for kw, words in [(dict(top_k=0), "top_k=0"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), r"\(0, 1\]"),
                      (dict(temperature=-1.0), "temperature=-1.0")]:
        with pytest.raises(ValueError, match=words):
            kivi_jax.sample_logits(jnp.zeros((2, 5)), key, **{"temperature": 1.0, **kw})
    cfg = sampling.check_sampling(1.0, None, 0.9)
    with pytest.raises(ValueError, match="top_p=0.9 and rest="):
        sampling.sample(jnp.zeros((1, 5)), key[None], temperature=1.0, top_p=0.9, rest=0.1, cfg=cfg)


# ---- empirical frequencies through the public, jitted sample_logits -------------------------

N_DRAWS = 50_000


@pytest.mark.parametrize("t, k, p", [(1.0, None, None), (0.7, 10, None), (1.0, None, 0.8), (1.5, 25, 0.9),
                                     (0.4, None, 0.95), (1.0, 500, 0.6)])
def test_sample_logits_frequencies_match_hf(t, k, p):
    """N draws (one row each, its own key) of sample_logits on fresh V=97 logits: every token's
    frequency is within 5 sigma of HF's probability, binomial sigma = sqrt(p (1 - p) / N) (6 x 97
    bounds at 5 sigma: a false alarm below 1e-3 for the whole test), no token HF filters is drawn,
    and the chi-square over the bins expected >= 5 draws stays under a bound of its dof + 6 sigma."""
    v = 97
    logits = random_logits(v, 7)
    keep, want = hf_distribution(logits, t, k, p)
    toks = np.asarray(kivi_jax.sample_logits(jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, v)), jax.random.key(11),
                                             temperature=t, top_k=k, top_p=p))
    freq = np.bincount(toks, minlength=v) / N_DRAWS
    assert not freq[~keep].any(), f"drew filtered tokens {np.flatnonzero(freq * ~keep).tolist()}"
    sigma = np.sqrt(want * (1 - want) / N_DRAWS)
    z = np.abs(freq - want) / np.maximum(sigma, 1e-12)
    bad = np.flatnonzero((np.abs(freq - want) > 5 * sigma + 1.0 / N_DRAWS))
    assert bad.size == 0, f"tokens {bad.tolist()}: freq {freq[bad]} vs HF {want[bad]} (z {z[bad]})"
    bins = want * N_DRAWS >= 5
    chi2 = float(np.sum((freq[bins] - want[bins]) ** 2 * N_DRAWS / want[bins]))
    dof = int(bins.sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


# ---- greedy --------------------------------------------------------------------------------

def test_greedy_equals_torch_argmax_ties_included():
    """temperature=0 picks torch.argmax's token (HF's greedy pick; the first maximum on ties):
    integer logits (many ties), bfloat16 logits (ties after rounding), rows with -inf entries,
    an all-equal row, and NaN (both treat it as the maximum, the first one)."""
    rng = np.random.default_rng(3)
    v = 97
    rows = [rng.integers(-3, 4, size=(64, v)).astype(np.float32)]  # ~1/7 of each row at the max
    masked = rng.normal(size=(16, v)).astype(np.float32)
    masked[rng.random((16, v)) < 0.5] = -np.inf
    rows.append(masked)
    special = np.zeros((4, v), np.float32)
    special[1, [5, 50]] = np.nan
    special[2, :] = -np.inf
    special[2, [40, 41]] = 2.0
    special[3] = rng.normal(size=v)
    special[3, 60] = np.inf
    special[3, 70] = np.inf
    rows.append(special)
    x = np.concatenate(rows)
    assert (np.sum(x == x.max(-1, keepdims=True), -1) > 1).sum() >= 40  # ties do occur
    want = torch.argmax(torch.tensor(x), dim=-1).numpy()
    np.testing.assert_array_equal(kivi_jax.sample_logits(jnp.asarray(x), None), want)
    xb = jnp.asarray(rng.normal(size=(64, 5000)) * 3, jnp.bfloat16)  # bf16: 8 bits of mantissa
    want_b = torch.argmax(torch.tensor(np.asarray(xb.astype(jnp.float32))), dim=-1).numpy()
    np.testing.assert_array_equal(kivi_jax.sample_logits(xb, None), want_b)


def test_greedy_pick_does_not_depend_on_the_reduction_order():
    """A GPU folds a row's (value, index) pairs in another order than the CPU: jnp.argmax's
    reducer keeps whichever of two NaNs it meets second, so an H100 picked the later NaN (run145).
    Greedy's reducer, folded in every order and grouping over all rows of three values from NaN,
    +-inf, +-0 and ties, gives torch.argmax's pick."""
    import itertools

    vals = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 2.0]
    rows = np.array(list(itertools.product(vals, repeat=3)), np.float32)  # [343, 3]
    want = torch.argmax(torch.tensor(rows), dim=-1).numpy()
    pair = [(jnp.asarray(rows[:, i]), jnp.full(len(rows), i, jnp.int32)) for i in range(3)]
    for a, b, c in itertools.permutations(range(3)):
        left = sampling._keep_first(sampling._keep_first(pair[a], pair[b]), pair[c])
        right = sampling._keep_first(pair[a], sampling._keep_first(pair[b], pair[c]))
        np.testing.assert_array_equal(left[1], want, err_msg=f"(({a}, {b}), {c})")
        np.testing.assert_array_equal(right[1], want, err_msg=f"({a}, ({b}, {c}))")


# ---- ties: documented differences, held to HF's counts ------------------------------------

def test_top_k_tie_keeps_exactly_k_lower_ids_where_hf_keeps_all_tied():
    """Documented: on a tie at the k-th value we keep exactly k tokens, the lower ids of the tie;
    HF's TopKLogitsWarper keeps every token >= the k-th value. Ours is HF's set less the tied
    tokens of the highest ids. Coarse logits (one decimal) tie at many ranks, and include -0.0
    and +0.0, equal to == and to HF (lax.top_k alone orders +0 above -0 whatever the ids)."""
    rng = np.random.default_rng(5)
    cases = [(np.array([-0.0, 0.0, -0.0, 0.0, -1.0, 2.0], np.float32), k) for k in (2, 3, 4)]
    for v, k in [(37, 5), (37, 20), (256, 9), (256, 100), (256, 255)]:  # (eager top_k compiles per shape, k)
        for _ in range(2):
            cases.append((np.round(rng.normal(size=v), 1).astype(np.float32), k))
    assert sum(bool(np.any(np.signbit(x) & (x == 0))) for x, _ in cases) >= 5  # -0.0 does occur
    for i, (logits, k) in enumerate(cases):
        kth = np.sort(logits)[::-1][k - 1]
        hf_set, _ = hf_distribution(logits, 1.0, k, None)
        ours, _ = our_distribution(logits, 1.0, k, None, pytest.MonkeyPatch())
        tied = np.flatnonzero(logits == kth)
        above = int((logits > kth).sum())
        assert ours.sum() == k and hf_set.sum() == above + len(tied), (i, ours.sum(), hf_set.sum())
        assert (ours <= hf_set).all()
        np.testing.assert_array_equal(np.flatnonzero(ours & (logits == kth)), tied[: k - above], err_msg=f"case {i}")


def test_top_p_tie_keeps_as_many_as_hf_the_lower_ids():
    """At a tie on the nucleus boundary HF keeps as many tokens as we do (its ascending sort
    keeps the higher ids of the tie, ours the lower ones, as documented)."""
    x = np.array([0.0, 3.0, 3.0, 1.0, 3.0, 3.0], np.float32)
    for p in (0.2, 0.4, 0.6, 0.7, 0.8):
        hf_set, _ = hf_distribution(x, 1.0, None, p)
        ours, _ = our_distribution(x, 1.0, None, p, pytest.MonkeyPatch())
        assert ours.sum() == hf_set.sum(), (p, ours, hf_set)
        ties = np.flatnonzero(x == 3.0)
        n = int(ours.sum())
        if n < len(ties):
            np.testing.assert_array_equal(np.flatnonzero(ours), ties[:n])


# ---- generate vs transformers' generate on SmolLM2 ------------------------------------------

# SmolLM2 token ids of "Once upon a time, there was a little girl who", "The capital of France is",
# "def fibonacci(n):" (its tokenizer; hard-coded so the test need not load it)
PROMPTS = [[6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 617], [504, 3575, 282, 4649, 314],
           [1604, 3987, 46477, 24, 94, 727]]
N_NEW = 20
HF_PAD = 2  # SmolLM2's pad (= its EOS); HF feeds the pad to finished rows, so it must be a real token


# our stacked parameter -> transformers' per-layer module (model.layers.{i}.<name>.weight), and
# whether torch stores it transposed ([out, in])
HF_LAYER = {"attn_norm": ("input_layernorm", False), "q_proj": ("self_attn.q_proj", True),
            "k_proj": ("self_attn.k_proj", True), "v_proj": ("self_attn.v_proj", True),
            "o_proj": ("self_attn.o_proj", True), "mlp_norm": ("post_attention_layernorm", False),
            "gate_proj": ("mlp.gate_proj", True), "up_proj": ("mlp.up_proj", True), "down_proj": ("mlp.down_proj", True)}


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """(transformers' LlamaForCausalLM, float32, eager attention; our Flax model): the same
    weights, SmolLM2 read from the packaged GGUF by our loader and copied into transformers' model
    built from the config. (transformers' own GGUF loader takes 15 s of this file's budget; the
    slow tests in tests/models hold our loader to its logits.)"""
    import models
    from flax import nnx

    ours, _ = models.load_gguf(smollm2_gguf, tokenizer=False)
    params = nnx.to_pure_dict(models.functional(ours)[1])
    cfg = {k: v for k, v in ours.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="eager"))
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    for name, (theirs, transposed) in HF_LAYER.items():
        w = np.asarray(params["layers"][name])
        for i in range(w.shape[0]):
            sd[f"model.layers.{i}.{theirs}.weight"] = w[i].T if transposed else w[i]
    missing, unexpected = hf.load_state_dict({k: torch.tensor(np.array(v, np.float32)) for k, v in sd.items()},
                                             strict=False)
    assert missing == ["lm_head.weight"] and not unexpected and hf.config.tie_word_embeddings, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied: the embedding
    return hf.eval(), ours


def hf_generate(hf, eos):
    """HF's batched greedy generate, prompts left-padded (its convention) -> ([B, W] new tokens,
    [B] min top-1 / top-2 logit margin over the steps). W <= N_NEW: HF stops when all rows have."""
    t = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), t), HF_PAD)
    mask = torch.zeros((len(PROMPTS), t), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, t - len(p):] = torch.tensor(p)
        mask[b, t - len(p):] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (after jax has started, torch's thread pool ran this 10x slower on 2 cores)
    try:
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                            pad_token_id=HF_PAD, return_dict_in_generate=True, output_logits=True)
    finally:
        torch.set_num_threads(threads)
    top2 = torch.stack(g.logits, 1).topk(2, -1).values
    return g.sequences[:, t:].numpy(), (top2[..., 0] - top2[..., 1]).min(1).values.numpy()


def test_generate_greedy_eos_and_padding_equal_hf_generate(smollm2_pair):
    """Our generate (dense cache, right-padded ragged prompts, greedy, 20 new tokens) against
    transformers' generate on the same weights and the same EOS ids: the tokens, where each row
    stops (EOS kept and counted) and the padding after it. The EOS ids come from HF's own run
    without them: row 2's first token and a later token of row 1 that row 0 never produces, so
    one row stops after its first token, one mid-way and one runs all 20."""
    hf, ours = smollm2_pair
    t = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), t), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = p
    lens = np.array([len(p) for p in PROMPTS], np.int32)

    free, _ = hf_generate(hf, HF_PAD)
    assert free.shape == (3, N_NEW) and not (free == HF_PAD).any()  # (no row meets SmolLM2's own EOS)
    eos = [int(free[2, 0]), next(int(x) for x in free[1, 1:] if x not in free[0])]
    assert eos[0] not in free[0] and eos[0] not in free[1], eos

    want, margin = hf_generate(hf, eos)  # [B, W]: HF pads finished rows with HF_PAD, stops when all have
    want_len = np.array([next((i + 1 for i, x in enumerate(r) if x in eos), N_NEW) for r in want])
    assert want_len[0] == N_NEW and want_len[2] == 1 and 1 < want_len[1] < N_NEW, want_len
    full = np.full((3, N_NEW), HF_PAD)
    full[:, : want.shape[1]] = want
    after = np.arange(N_NEW)[None] >= want_len[:, None]
    assert (full[after] == HF_PAD).all()  # HF's padding starts where its rows stop
    np.testing.assert_array_equal(full[~after], free[~after])  # (and the tokens before are the free run's)

    out = kivi_jax.generate(ours, ids, lengths=lens, max_new_tokens=N_NEW, eos_id=eos, pad_id=-1,
                            cache_dtype=jnp.float32)  # (our pad_id need not be a token, as HF's must)
    np.testing.assert_array_equal(out.lengths, want_len)
    np.testing.assert_array_equal(out.tokens, np.where(after, -1, full),
                                  err_msg=f"eos={eos}; HF's min top-1 - top-2 logit margin per row {margin}")
