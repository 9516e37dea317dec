"""kivi_jax.eager: the array API called on plain arrays runs as one jitted computation (same
result as the function traced), with its concrete-value checks kept; under a trace it runs as
written, with no nested jit in the caller's program."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax as kj
from kivi_jax import eager

CFG = kj.KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=32)


def _inputs(t=70):
    ks = jax.random.split(jax.random.key(3), 5)
    n = lambda k, shape: jax.random.normal(k, shape, jnp.float32)  # noqa: E731
    return n(ks[0], (2, 2, t, 64)), n(ks[1], (2, 2, t, 64)), n(ks[2], (2, 2, 1, 64)), n(ks[3], (2, 2, 1, 64)), \
        n(ks[4], (2, 4, 1, 64))


@pytest.mark.parametrize("cls", [kj.KIVICache, kj.DenseCache])
def test_eager_calls_are_jitted_and_equal_the_traced_function(cls):
    k, v, kt, vt, q = _inputs()
    init = (dict(config=CFG) if cls is kj.KIVICache else {}) | dict(batch=2, num_kv_heads=2, head_dim=64,
                                                                     max_length=128, dtype=jnp.float32)
    cache = cls.init(**init)
    lengths = jnp.array([70, 41])

    def steps(cache):
        cache = cache.prefill(k, v, lengths=lengths).append(kt, vt)
        return kj.decode_attention(q, cache, impl="reference"), cache

    before = cls.prefill.traces(), cls.append.traces()
    eager_out, eager_cache = steps(cache)
    assert (cls.prefill.traces(), cls.append.traces()) == (before[0] + 1, before[1] + 1)
    traced_out, traced_cache = jax.jit(steps)(cache)
    np.testing.assert_array_equal(eager_out, traced_out)
    for a, b in zip(jax.tree_util.tree_leaves(eager_cache), jax.tree_util.tree_leaves(traced_cache)):
        np.testing.assert_array_equal(a, b)
    # and against float64: the output is softmax-weighted values of a real prefix
    assert np.isfinite(np.asarray(eager_out)).all() and float(jnp.abs(eager_out).max()) > 0


def test_concrete_checks_still_raise_where_the_jitted_prefill_would_only_flag():
    k, v, *_ = _inputs()
    cache = kj.KIVICache.init(CFG, batch=2, num_kv_heads=2, head_dim=64, max_length=128, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"lengths=\[71\] out of range: each must be in \[0, T=70\]"):
        cache.prefill(k, v, lengths=jnp.array([70, 71]))
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 70, 32\); the cache holds B=2, Hkv=2, D=64"):
        cache.prefill(k[..., :32], v[..., :32])
    # traced, a bad length is flagged, as before (the function as written)
    flagged = jax.jit(lambda n: cache.prefill(k, v, lengths=n).overflow)(jnp.array([70, 71]))
    assert flagged.tolist() == [False, True]


def test_an_unhashable_setting_gets_the_functions_own_error():
    """A static setting jit cannot hash (axis=[2], group_size=np.array(32)) runs the function as
    written, so its own check names the parameter, as under jit, instead of jax's hashing error."""
    x = _inputs()[0]
    with pytest.raises(ValueError, match=r"axis=\[2\] must be an integer axis in \[-4, 4\)"):
        kj.quantize(x, bits=2, group_size=32, axis=[2])
    with pytest.raises(ValueError, match=r"group_size=array\(32\) must be a positive integer"):
        kj.quantize(x, bits=2, group_size=np.array(32), axis=2)


def test_traced_calls_run_as_written_without_a_nested_jit():
    k, v, kt, vt, q = _inputs()
    cache = kj.KIVICache.init(CFG, batch=2, num_kv_heads=2, head_dim=64, max_length=128, dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(lambda c: c.prefill(k, v).append(kt, vt))(cache)
    names = {e.params.get("name") for e in jaxpr.jaxpr.eqns if e.primitive.name in ("pjit", "jit")}
    assert not names & {"prefill", "append", "decode_attention"}, names


def test_python_scalars_keep_the_function_as_written():
    seen = []

    @eager.jit_when_eager
    def f(x, n):
        seen.append(type(n))
        return x * n

    assert float(f(jnp.float32(2.0), 3)) == 6.0 and seen == [int]  # n stayed a Python int
    assert float(f(jnp.float32(2.0), jnp.int32(3))) == 6.0 and seen[-1] is not int  # traced once, jitted
    assert float(f(jnp.float32(2.0), np.int32(4))) == 8.0


def test_a_changed_setting_retraces(monkeypatch):
    """Module settings read at trace time are part of a compiled eager call's key (a benchmark's
    switch, a test's monkeypatch): a changed one is not served the old trace."""
    monkeypatch.setattr(eager, "SETTING_FOR_THIS_TEST", 2.0, raising=False)

    @eager.jit_when_eager
    def f(x):
        return x * eager.SETTING_FOR_THIS_TEST

    assert float(f(jnp.float32(1.5))) == 3.0
    assert float(f(jnp.float32(2.5))) == 5.0 and f.traces() == 1
    monkeypatch.setattr(eager, "SETTING_FOR_THIS_TEST", 3.0)
    assert float(f(jnp.float32(1.5))) == 4.5 and f.traces() == 2


def test_a_module_imported_by_the_trace_does_not_retrace_the_next_call():
    """A first call whose trace imports a module of the packages (decode_attention's kernel path
    on a GPU imports kivi_jax.attention_pallas) adds that module's settings: the next call, with
    them as the trace read them, reuses the program (on the H200 it traced and compiled again,
    gpu run at b1447de); a changed setting of that module still retraces."""
    import types

    name = "kivi_jax._imported_by_a_trace"
    assert name not in sys.modules

    @eager.jit_when_eager
    def f(x):
        if name not in sys.modules:  # the lazy import, at trace time
            module = types.ModuleType(name)
            module.SCALE = 2.0
            sys.modules[name] = module
        return x * sys.modules[name].SCALE

    try:
        assert float(f(jnp.float32(1.5))) == 3.0 and f.traces() == 1
        assert float(f(jnp.float32(2.5))) == 5.0 and f.traces() == 1
        sys.modules[name].SCALE = 3.0
        assert float(f(jnp.float32(1.5))) == 4.5 and f.traces() == 2
    finally:
        sys.modules.pop(name, None)


def test_the_lazily_imported_kernel_path_is_compiled_once():
    """The case the test above models, as it happened on the H200 (run115): in a fresh process
    the first eager decode_attention(impl="pallas") imports the kernel path while it traces; the
    second identical call reuses that program (here the kernel runs interpreted). Before the fix:
    2 traces."""
    import subprocess

    code = (
        "import sys, jax, jax.numpy as jnp, kivi_jax as kj\n"
        "assert 'kivi_jax.attention_pallas' not in sys.modules\n"
        "cfg = kj.KIVIConfig(residual_length=32)\n"
        "k = jax.random.normal(jax.random.key(0), (1, 1, 40, 64))\n"
        "c = kj.KIVICache.init(cfg, batch=1, num_kv_heads=1, head_dim=64, max_length=64, dtype=jnp.float32)\n"
        "c = c.prefill(k, -k, lengths=jnp.array([40]))\n"
        "q = jax.random.normal(jax.random.key(1), (1, 1, 1, 64))\n"
        "a = kj.decode_attention(q, c, impl='pallas')\n"
        "b = kj.decode_attention(q, c, impl='pallas')\n"
        "print(kj.decode_attention.traces(), bool((a == b).all()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True"]


def test_decode_attention_follows_a_patched_backend(monkeypatch):
    """decode_attention(impl="auto") asks _on_gpu() when traced: a patched one (a new function,
    here of the same answer) is traced again, not served the old trace."""
    from kivi_jax import attention

    k, v, kt, vt, q = _inputs()
    cache = kj.KIVICache.init(CFG, batch=2, num_kv_heads=2, head_dim=64, max_length=128, dtype=jnp.float32)
    cache = cache.prefill(k, v, lengths=jnp.array([70, 41]))
    ref = kj.decode_attention(q, cache)
    before = kj.decode_attention.traces()
    assert np.array_equal(kj.decode_attention(q, cache), ref) and kj.decode_attention.traces() == before
    asked, on_gpu = [], attention._on_gpu()  # the same answer: on a GPU ref ran the kernel
    monkeypatch.setattr(attention, "_on_gpu", lambda: asked.append(1) or on_gpu)
    got = kj.decode_attention(q, cache)
    assert kj.decode_attention.traces() == before + 1 and asked
    np.testing.assert_array_equal(got, ref)
