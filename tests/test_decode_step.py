"""The model's decode step updates the stacked cache in place: no copy of a whole cache buffer.

The layer scan carries the StackedCache; each layer writes only the new token's slabs
(``append_writes`` + ``cache_common.apply_writes(..., layer=i)``). Checked on the optimized
HLO of a jitted, cache-donated step (what ``kivi_jax.generate`` runs), so a regression to
scan-output caches (a fresh buffer per step, plus a copy back into the donated one) or to
whole-layer writes (``set_layer``) fails. KIVI's slab writes equal ``append`` bit for bit and
the float64 model of Algorithm 1 (tests/reference_kivi.py).
"""

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpr_walk
import kivi_jax
import models
import reference_kivi as ref
from kivi_jax import KIVICache, KIVIConfig, packing
from kivi_jax import cache_common as cc
from models.cache import StackedCache
from models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2,
                  num_kv_heads=2, head_dim=32)


def _compiled_step(batch=2, max_length=1024, kivi=None, cfg=CFG):
    model = models.init_random(cfg, dtype=jnp.float32)
    apply, params = models.functional(model)
    cache = model.init_cache(batch, max_length, kivi=kivi)

    def step(params, ids, cache):
        return apply(params, ids, cache)

    ids = jnp.zeros((batch, 1), jnp.int32)
    return jax.jit(step, donate_argnums=(2,)).lower(params, ids, cache).compile(), cache


def test_dense_decode_step_writes_cache_in_place():
    compiled, cache = _compiled_step()
    hlo = compiled.as_text()
    full = cache.layers.k  # [L, B, Hkv, max_length, D]
    shape = "f32[" + ",".join(map(str, full.shape)) + "]"
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    # outside the layer loop, nothing but parameters / tuples may produce a whole stacked buffer
    producers = [re.search(r"\s([\w\-]+)\(", ln.split("=", 1)[1]).group(1)
                 for ln in entry.splitlines()[1:] if "=" in ln and ln.split("=", 1)[1].lstrip().startswith(shape)]
    assert set(producers) <= {"parameter", "get-tuple-element"}, producers
    # no copy of a stacked buffer anywhere (the donated input is the output)
    assert not re.search(r"= " + re.escape(shape) + r"\{[\d,]*\} copy\(", hlo)
    # temporaries stay below one stacked buffer (a copying step needs at least two)
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < full.nbytes, (mem.temp_size_in_bytes, full.nbytes)


@pytest.mark.parametrize("kivi", [None, KIVIConfig(residual_length=32)])
def test_model_extend_writes_the_stacked_cache_without_copies(kivi, monkeypatch):
    """The models' extend (a continuation's chunk, jitted, the cache donated as generate does) copies
    no stacked cache buffer: with the writes inside the layer loop after the attention's reads,
    XLA's CPU copy insertion copied every stacked buffer twice a layer (the writes follow the loop:
    models.llama.EXTEND_WRITES "after", the default off a GPU). The stores sized by the capacity,
    that is: the ring (R tokens), which the extend reads and then writes, may be copied. Both modes
    give the same logits and cache, bit for bit; a bad mode is a named error."""
    from models import llama

    monkeypatch.setattr(llama, "EXTEND_WRITES", "after")
    model = models.init_random(CFG, dtype=jnp.float32)
    apply, params = models.functional(model)
    cache = model.init_cache(2, 2048, kivi=kivi)  # (no store shaped like the ring)
    ids = jnp.zeros((2, 8), jnp.int32)
    step = jax.jit(lambda p, ids, c, n: apply(p, ids, c, lengths=n, extend=True), donate_argnums=(2,))
    hlo = step.lower(params, ids, cache, jnp.asarray([8, 3], jnp.int32)).compile().as_text()
    shapes = [re.escape(",".join(map(str, getattr(cache.layers, f.name).shape))) for f in dataclasses.fields(cache.layers)
              if f.name not in ("k_res", "v_res", "lengths", "overflow") and not f.metadata.get("static")]
    copies = [ln.strip()[:120] for ln in hlo.splitlines()
              if re.search(r"= \w+\[(" + "|".join(shapes) + r")\]\{[\d,]*\} copy\(", ln)]
    assert shapes and not copies, copies
    if kivi is None:
        return
    outs = []
    for mode in llama.EXTEND_WRITES_MODES:  # a prompt (two flushes' worth), then 40 tokens continuing it
        monkeypatch.setattr(llama, "EXTEND_WRITES", mode)
        ids = jax.random.randint(jax.random.key(1), (2, 70), 0, CFG.vocab_size)
        more = jax.random.randint(jax.random.key(2), (2, 40), 0, CFG.vocab_size)
        _, c = jax.jit(lambda p, ids, c: apply(p, ids, c, lengths=jnp.asarray([70, 33])))(
            params, ids, model.init_cache(2, 2048, kivi=kivi))
        outs.append(jax.jit(lambda p, ids, c: apply(p, ids, c, lengths=jnp.asarray([40, 17]), extend=True))(
            params, more, c))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *outs)
    monkeypatch.setattr(llama, "EXTEND_WRITES", "later")
    with pytest.raises(ValueError, match=r"models.llama.EXTEND_WRITES='later'; allowed: \('after', 'in_loop'\)"):
        llama.extend_writes_mode()


def _buffer_ops(hlo: str, skip: tuple = ()):
    """[(opcode, (dtype, dims))] of every instruction with an array result outside fused
    computations (those own their result buffer); dims without the 1s, so a [1, B, ...] slice
    is a [B, ...] one; a fusion is named ``fusion:<root opcode of its fused computation>``.
    skip: also leave out the instructions of these named scopes, e.g. the rare writes' (a
    flush's own values, named ``rare_writes`` by ``cache_common.apply_writes``: the step's flush
    loop runs them directly)."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head:
            cur = comps.setdefault(head.group(1), [])
        elif line.strip() == "}":
            cur = None
        elif cur is not None:
            cur.append(line)
    instr = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+([\w\-]+)\(")
    root = {name: m.group(4) for name, lines in comps.items() for m in map(instr.match, lines) if m and m.group(1)}
    fused = {c for lines in comps.values() for ln in lines if " fusion(" in ln
             for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    ops = []
    for name, lines in comps.items():
        if name in fused:
            continue
        for ln in lines:
            m = instr.match(ln)
            if m and not any(f"/{scope}/" in ln for scope in skip):
                op = m.group(4)
                if op == "fusion":
                    op += ":" + root.get(re.search(r"calls=%?([\w.\-]+)", ln).group(1), "?")
                ops.append((op, (m.group(2), tuple(int(x) for x in m.group(3).split(",") if x and x != "1"))))
    return ops


def _hlo_key(x, shape):
    names = {"float32": "f32", "bfloat16": "bf16", "uint32": "u32"}
    return names[jnp.dtype(x.dtype).name], tuple(n for n in shape if n != 1)


@pytest.mark.parametrize("kivi", [
    KIVIConfig(2, 2, group_size=16, residual_length=32),
    KIVIConfig(4, 2, group_size=16, residual_length=48, sink_tokens=5, key_group_size=16),
    KIVIConfig(layout="mosaic"),  # MosaicKIVICache (head_dim 128)
])
def test_kivi_decode_step_writes_only_slabs(kivi):
    """No op of the KIVI decode step writes or copies a whole cache buffer, stacked or one
    layer's: the stacked buffers are only scattered into (in place, key flush included).
    A float32 cache: XLA:CPU has no bfloat16 scatter and converts the whole buffer around one.
    (A flush that rewrote the Mosaic cache's whole ring with its layout left free failed this on
    the CPU; on the H200 the same change transposed every layer's ring each layer:
    decode-step-ab-run41-p330.) The Mosaic cache's flush computes the block's keys dequantized,
    one layer's ring [B, Hkv, R, D] by construction, in the step's flush loop (the model step's
    conditional that runs the layers with the rare writes): the per-layer check skips the rare
    writes' instructions there."""
    mosaic = kivi.layout == "mosaic"
    compiled, cache = _compiled_step(max_length=512 if mosaic else 1024, kivi=kivi,
                                     cfg=dataclasses.replace(CFG, head_dim=128, hidden_size=256) if mosaic else CFG)
    big = [x for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim == 5]  # [L, B, Hkv, ., .]
    stacked = {_hlo_key(x, x.shape) for x in big}
    layer = {_hlo_key(x, x.shape[1:]) for x in big}
    ops = _buffer_ops(compiled.as_text())
    assert any(op == "fusion:scatter" for op, key in ops if key in stacked)  # the checker sees the writes
    assert {op for op, key in ops if key in stacked} <= {"parameter", "get-tuple-element", "bitcast", "scatter",
                                                          "fusion:scatter"}
    # no buffer of one layer's size: neither a per-layer append's result nor a materialized slice
    # (on a GPU a ring the Triton kernel does not take, R not a power of two, is attended in XLA:
    # kivi_window.supported; its per-layer gather of the R + S slots is that fallback's)
    ring_in_xla = jax.default_backend() == "gpu" and not mosaic and kivi.residual_length & (kivi.residual_length - 1)
    skip = ("rare_writes",) if mosaic else ("kivi_window",) if ring_in_xla else ()
    assert [(op, key) for op, key in _buffer_ops(compiled.as_text(), skip=skip) if key in layer] == []


def test_put_row_layer_matches_per_layer():
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.normal(size=(3, 2, 2, 8, 4)), jnp.float32)  # [L, B, H, T, D]
    x = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)  # two rows per batch row
    index = jnp.asarray([1, 6], jnp.int32)
    got = cc.put_row(buf, x, index, axis=1, layer=jnp.int32(2))
    want = buf.at[2].set(cc.put_row(buf[2], x, index, axis=1))
    np.testing.assert_array_equal(got, want)
    # per-layer put_row is dynamic_update_slice per row (clamped like it)
    for b in range(2):
        np.testing.assert_array_equal(want[2, b], jax.lax.dynamic_update_slice_in_dim(buf[2, b], x[b], int(index[b]), 1))


def _stacked_append_matches(one, num_layers=3, steps=5):
    st = StackedCache.stack(one, num_layers)
    rng = np.random.default_rng(1)
    b, h, d = one.batch_size, one.num_kv_heads, one.head_dim
    for _ in range(steps):
        for i in range(num_layers):
            k = jnp.asarray(rng.normal(size=(b, h, 1, d)), jnp.float32)
            v = jnp.asarray(rng.normal(size=(b, h, 1, d)), jnp.float32)
            want = st.layer(i).append(k, v)
            st = jax.jit(lambda st, i, k, v: st.append_layer(i, k, v))(st, jnp.int32(i), k, v)
            jax.tree.map(np.testing.assert_array_equal, st.layer(i), want)


def test_stacked_append_dense():
    one = kivi_jax.DenseCache.init(batch=2, num_kv_heads=2, head_dim=32, max_length=4, dtype=jnp.float32)
    _stacked_append_matches(one)  # includes full rows (max_length 4 < 5 steps): flagged, unchanged


def _bits(x):
    """x as integers of its width (bit-for-bit equality: -0.0 != 0.0, NaN == NaN)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


@jax.jit
def _stacked_kivi_run(st, k, v, lengths, kn, vn):
    """Prefill layer l with k[l], v[l] [B, H, T, D]; then per step (kn, vn [steps, L, B, H, 1, D])
    a scan over the layers as the model runs it: append_layer(i) vs set_layer(i, layer(i).append).
    Returns (prefilled, final) stacked caches and [steps, L, leaves] bool: every leaf bit-equal."""
    for i in range(st.num_layers):
        st = st.prefill_layer(i, k[i], v[i], lengths)

    def layer_step(st, x):
        i, k, v = x
        got = st.append_layer(i, k, v)
        want = st.set_layer(i, st.layer(i).append(k, v))
        same = [jnp.array_equal(_bits(a), _bits(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        return got, jnp.stack(same)

    def step(st, kv):
        return jax.lax.scan(layer_step, st, (jnp.arange(st.num_layers), *kv))

    final, same = jax.lax.scan(step, st, (kn, vn))
    return st, final, same


def _grid_kv(rng, *shape):
    """Keys with per-channel offsets and outlier channels (like a real LLM's), plain values; on
    a grid of 1/64, so rotated inputs K·H (head_dim 64, H = +-1/8) are exact in float32."""
    d = shape[-1]
    k = rng.standard_normal(shape) * np.where(rng.random(d) < 0.15, 8.0, 1.0) + rng.normal(0, 2, d)
    v = rng.standard_normal(shape)
    return tuple((np.round(x * 64) / 64).astype(np.float32) for x in (k, v))


STACKED_KIVI = {
    "k2v2": (KIVIConfig(2, 2, group_size=16, residual_length=32), jnp.float32),
    # R = 48 keys: 6 whole words of 4-bit codes per flush
    "k4v2-R48-sinks5-bf16": (KIVIConfig(4, 2, group_size=16, residual_length=48, sink_tokens=5), jnp.bfloat16),
    # 1-bit keys, R = 48: a flush writes 16-code half words at bit 0 or 16
    "k1v8-R48": (KIVIConfig(1, 8, group_size=16, residual_length=48), jnp.float32),
    "k2v4-kg16-sinks3-rotate": (KIVIConfig(2, 4, group_size=32, residual_length=64, key_group_size=16, sink_tokens=3,
                                           rotate="kv"), jnp.float32),
}


@pytest.mark.parametrize("name", list(STACKED_KIVI))
def test_stacked_append_kivi(name):
    """append_layer (KIVICache.append_writes scattered into the stacked buffers) equals append on
    that layer, bit for bit, every leaf of every layer at every step: ragged prompts (empty,
    shorter than the sinks, exactly the sinks, longer), many key flushes and value spills, rows
    that fill up (refused appends). The prefill leaves zero code bits after each row's quantized
    tokens (append adds bits there), and the final layers equal the float64 model's."""
    cfg, dtype = STACKED_KIVI[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    nl, b, h, d, t, steps = 2, 5, 2, 64, 72, 100
    lengths = np.array([0, 2, cfg.sink_tokens, 41, 72])
    max_length = t + steps - 12  # row 4 fills up 12 steps before the end
    one = KIVICache.init(cfg, batch=b, num_kv_heads=h, head_dim=d, max_length=max_length, dtype=dtype)
    k, v = _grid_kv(rng, nl, b, h, t, d)
    pad = np.arange(t)[None, None, None, :, None] >= lengths[None, :, None, None, None]
    k, v = np.where(pad, 1e4, k), np.where(pad, -1e4, v)  # padding must never reach the stores
    kn, vn = _grid_kv(rng, steps, nl, b, h, 1, d)
    prefilled, final, same = _stacked_kivi_run(StackedCache.stack(one, nl), k, v, jnp.asarray(lengths, jnp.int32),
                                               kn, vn)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(one)[0]]
    bad = [(int(s), int(i), names[j]) for s, i, j in np.argwhere(~np.asarray(same))]
    assert bad == [], f"(step, layer, leaf) where append_layer differs from append: {bad[:10]}"

    tc = one.capacity
    for i in range(nl):
        layer = prefilled.layer(i)
        for words, bits, n in ((layer.k_codes, cfg.k_bits, layer._body_quantized_keys()),
                               (layer.v_codes, cfg.v_bits, layer._body_quantized_values())):
            codes = np.asarray(packing.unpack(words, bits, 2, tc))
            np.testing.assert_array_equal(np.asarray(words), packing.pack_numpy_reference(codes, bits, 2))
            assert not (codes * (np.arange(tc)[None, None, :, None] >= np.asarray(n)[:, None, None, None])).any()

    want_overflow = lengths + steps > max_length
    assert list(np.asarray(final.overflow)) == list(want_overflow) and want_overflow.sum() == 1
    tol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    for i in range(nl):
        rf = ref.ReferenceKIVICacheExt(k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
                                       residual_length=cfg.residual_length, batch=b, num_kv_heads=h, head_dim=d,
                                       dtype=dtype, sink_tokens=cfg.sink_tokens, rotate=cfg.rotate,
                                       key_group_size=cfg.key_group_size)
        rf.prefill(k[i], v[i], lengths)
        for s in range(steps):
            rf.append(kn[s, i], vn[s, i])
        layer = final.layer(i)
        kh, vh = (np.asarray(a.astype(jnp.float32), np.float64) for a in jax.jit(KIVICache.materialize)(layer))
        for r in np.flatnonzero(~want_overflow):  # the model has no max_length: rows that never filled up
            L = rf.length(r)
            assert int(layer.lengths[r]) == L
            assert (int(layer.num_quantized_keys[r]), int(layer.num_quantized_values[r])) == rf.num_quantized(r)
            np.testing.assert_allclose(kh[r, :, :L], rf.keys(r), rtol=tol, atol=tol, err_msg=f"keys {i} {r}")
            np.testing.assert_allclose(vh[r, :, :L], rf.values(r), rtol=tol, atol=tol, err_msg=f"values {i} {r}")
        # the run crossed flushes and spills in every row
        assert min(len(row.kq) for row in rf.rows) >= cfg.residual_length and min(len(row.vq) for row in rf.rows) > 0


def test_window_partials_are_matmuls_on_gathered_operands():
    """The kernel path's residual-window partials: on the H200 at 1d6c7c7 they read slices of
    the model's layer-stacked, loop-carried v_res with one query row; XLA rewrote p·v into a
    reduction over the slots, gave the whole stacked v_res that layout and copied it every layer
    (166 of a 179 ms Llama-2-7B step, benchmarks/results/decode-step-ab-2026-11-30*). The
    formulation measured without that copy (a256a3d) gathers the tokens first: here both dots
    take gathered K and V and 16 (padded) query rows. This checks the formulation only (XLA:CPU
    lays the loop out differently; the copy itself shows on a GPU)."""
    from kivi_jax import attention_pallas

    cache = KIVICache.init(KIVIConfig(2, 2, group_size=16, residual_length=32), batch=2, num_kv_heads=2,
                           head_dim=32, max_length=256, dtype=jnp.bfloat16)
    qg = jnp.ones((2, 2, 1, 32), jnp.float32)
    jaxpr = jax.make_jaxpr(attention_pallas._window_partials)(qg, cache, jnp.zeros((2,), jnp.int32)).jaxpr
    def name(e):  # a jnp function's nested jit names what it does
        inner = e.params.get("jaxpr")
        return "/".join(q.primitive.name for q in inner.jaxpr.eqns) if inner is not None else e.primitive.name

    made_by = {v: name(e) for e in jaxpr.eqns for v in e.outvars}
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2, [e.primitive.name for e in jaxpr.eqns]
    assert all(e.invars[0].aval.shape[2] == 16 for e in dots), [e.invars[0].aval.shape for e in dots]
    assert all("gather" in made_by.get(e.invars[1], "") for e in dots), [made_by.get(e.invars[1]) for e in dots]


def _tiny_llama():
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    return models.init_random(cfg, jax.random.key(9), init_std=0.3)


@pytest.mark.parametrize("kivi", [KIVIConfig(group_size=16, residual_length=32),
                                  KIVIConfig(group_size=16, residual_length=32, sink_tokens=3, rotate="kv"), None],
                         ids=["kivi", "kivi-sinks-rotate", "dense"])
def test_model_step_kernel_reads_the_stacked_cache_in_place(kivi):
    """The model's decode step hands the kernel (KIVI's, or the dense one) the layer-stacked
    cache arrays and the layer index (XLA copies a per-layer slice passed to a custom call),
    the KIVI residual ring included (with sinks its stacked rows hold R + S slots, of which
    the kernel reads R), same logits as the reference attention."""
    m = _tiny_llama()
    ids = np.random.default_rng(3).integers(0, 101, (2, 70)).astype(np.int32)
    cache = m.init_cache(2, 100, kivi=kivi)
    _, cache = m(ids, cache, lengths=jnp.asarray([70, 41]))
    tok = ids[:, :1]
    want, _ = m(tok, cache, attn_impl="reference")
    got, _ = m(tok, cache, attn_impl="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    jaxpr = jax.make_jaxpr(lambda c: m(tok, c, attn_impl="pallas"))(cache).jaxpr
    # (on a GPU the ring may take a launch of its own: every attention kernel launch counts)
    calls = jaxpr_walk.pallas_calls(jaxpr, "dense_decode" if kivi is None else "kivi_decode")
    shapes = [v.aval.shape for call in calls for v in call.invars]
    assert (cache.layers.k if kivi is None else cache.layers.k_codes).shape in shapes
    if kivi is not None:
        assert cache.layers.k_res.shape in shapes


@pytest.mark.parametrize("matmul_impl", [None, "pallas"])
def test_vmap_over_requests_with_the_in_place_kernel(matmul_impl):
    """jax.vmap of single-request generate over the model whose decode step hands the kernel the
    stacked cache (pallas_call's batching rule adds a grid axis), with XLA's matmuls or the
    stacked-matmul kernel (what generate picks for KIVI on a GPU): the batched call's tokens."""
    m = _tiny_llama()
    ids = np.random.default_rng(3).integers(0, 101, (3, 90)).astype(np.int32)  # 90 > R: a quantized bulk
    kv = KIVIConfig(group_size=16, residual_length=32)
    got = jax.vmap(lambda x: kivi_jax.generate(m, x[None], max_new_tokens=4, kivi=kv, attn_impl="pallas",
                                               matmul_impl=matmul_impl).tokens[0])(ids)
    want = kivi_jax.generate(m, ids, max_new_tokens=4, kivi=kv, attn_impl="pallas").tokens
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kivi", [KIVIConfig(2, 2, group_size=32, residual_length=64),
                                  KIVIConfig(layout="mosaic", residual_length=32)])
def test_rare_writes_decided_once_a_step_equal_a_conditional_a_layer(kivi, monkeypatch):
    """models.llama.RARE_WRITES "step" (the key flush decided once for the step, two
    conditionals around the layer loop) gives the logits and cache of "layer" (a conditional in
    every layer) bit for bit, over steps with and without flushes, on ragged rows; its compiled
    step copies no stacked buffer (the slab check), and under jax.vmap its conditionals stay
    conditionals (the predicate is whether any request flushes)."""
    from models import llama

    mosaic = kivi.layout == "mosaic"
    cfg = dataclasses.replace(CFG, head_dim=128, hidden_size=256) if mosaic else CFG
    model = models.init_random(cfg, dtype=jnp.float32)
    apply, params = models.functional(model)
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 90)), jnp.int32)
    lengths = jnp.asarray([90, 57], jnp.int32)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (40, 2, 1)), jnp.int32)
    runs = {}
    for mode in ("layer", "step"):
        monkeypatch.setattr(llama, "RARE_WRITES", mode)
        step = jax.jit(lambda p, t, c: apply(p, t, c))  # traced anew for each mode
        _, cache = jax.jit(lambda p, x, c: apply(p, x, c, lengths=lengths))(params, ids, model.init_cache(2, 256, kivi=kivi))
        logits = []
        for t in toks:  # rows cross R = 64 (or 32) boundaries at different steps
            out, cache = step(params, t, cache)
            logits.append(out)
        runs[mode] = (np.stack(logits), cache)
    np.testing.assert_array_equal(runs["step"][0], runs["layer"][0])
    for a, b in zip(jax.tree_util.tree_leaves(runs["step"][1]), jax.tree_util.tree_leaves(runs["layer"][1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(llama, "RARE_WRITES", "step")
    compiled, cache = _compiled_step(max_length=512 if mosaic else 1024, kivi=kivi, cfg=cfg)
    big = [x for x in jax.tree_util.tree_leaves(cache.layers) if x.ndim == 5]
    stacked = {_hlo_key(x, x.shape) for x in big}
    ops = _buffer_ops(compiled.as_text())
    assert {op for op, key in ops if key in stacked} <= {"parameter", "get-tuple-element", "bitcast", "scatter",
                                                          "fusion:scatter"}
    one = jax.tree.map(lambda x: x[:, :1], model.init_cache(2, 256, kivi=kivi))  # a one-request cache
    batched = jax.tree.map(lambda x: jnp.stack([x, x]), one)
    closed = jax.make_jaxpr(jax.vmap(lambda t, c: apply(params, t, c)))(toks[:2, :1], batched)
    conds = [e for e in jaxpr_walk.eqns(closed.jaxpr, into_kernels=False) if e.primitive.name == "cond"]
    assert len(conds) == 2  # a batched predicate would have made them selects
    # the second conditional runs exactly when the first did not: its predicate is computed from
    # the first's own output, never again from the cache the first has written (XLA:GPU's
    # rematerialization recomputed not(due) after the flush loop and ran both, run60/run61)
    made = {v: e for e in jaxpr_walk.eqns(closed.jaxpr) for v in e.outvars}

    def upstream(var):  # the equations var is computed from, back to the first conditional; None: an input
        e = made.get(var)
        if e is None or e is conds[0]:
            return {e}
        return {e}.union(*(upstream(v) for v in e.invars if type(v).__name__ != "Literal"))

    ups = upstream(conds[1].invars[0])
    assert conds[0] in ups and None not in ups
    monkeypatch.setattr(llama, "RARE_WRITES", "both")
    with pytest.raises(ValueError, match=r"models.llama.RARE_WRITES='both'; allowed: \('layer', 'step'\) or None"):
        apply(params, toks[0], cache)
    # None (the default): "step" on a GPU, where it was measured faster; "layer" elsewhere
    monkeypatch.setattr(llama, "RARE_WRITES", None)
    for backend, mode in (("cpu", "layer"), ("gpu", "step")):
        monkeypatch.setattr(llama.jax, "default_backend", lambda b=backend: b)
        assert llama.rare_writes_mode() == mode
