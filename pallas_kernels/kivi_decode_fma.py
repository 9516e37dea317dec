"""Kernel body of the ``"fma"`` variant: no dot, no tile reshape, ~1 integer op per code.

For few query heads per KV head (GQA ratio 1-2, e.g. Llama-2-7B) a matrix unit would
idle on 15 of 16 rows; plain FMAs on the codes do the work instead, and the unpacking is
what must be cheap. Per packed block (16 word rows x D; ``c = 32 / bits`` slots of 16
consecutive tokens), slot j's codes sit at bit p = bits*j of every word. Instead of
shifting them down, we mask them in place and make a float of them with the exponent
trick::

    f = bitcast_f32((w & (mask << p)) | 0x4B000000) - 2**23   # == code * 2**p, exact

(one AND-OR, which ptxas fuses into a single LOP3, and one FSUB per code), and fold
2**-p into the per-slot weights: the key scale into q (q·k̂ = Σ_d (q_d s_d 2^-p) f_d +
q·min) and the value scale into the probabilities (p_t s_t 2^-p per channel group).
Slots with p >= 16 use ``w >> 16`` (one shift per word, shared by c/2 codes) so that
code * 2**p stays below 2**23 and exact.

Online softmax per 16-token slot with a *lazy* rescale: the accumulators are rescaled only
when the running max grows (``lax.cond``), which after the first few slots is rare.
Accumulators are [16, G] tiles per channel group (one per word row), summed over rows
once at the end. Results are the usual flash-decoding partials (o, m, l).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -1e30


def _as_float(x_u32):
    return lax.bitcast_convert_type(x_u32 | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0


def kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
           o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, chunks_per_split, num_queries):
    """One (row, KV head, split) program. Chunk = one unit of U = max(key, value block) tokens."""
    g = group_size
    d = q_ref.shape[1]
    n_groups = d // g
    k_blk, v_blk = 16 * (32 // k_bits), 16 * (32 // v_bits)
    unit = max(k_blk, v_blk)
    split = pl.program_id(2)
    lo = jnp.maximum(lo_ref[()], split * chunks_per_split)
    hi = jnp.maximum(lo, jnp.minimum(hi_ref[()], (split + 1) * chunks_per_split))
    start = start_ref[()]
    qs = [q_ref[pl.ds(i, 1), :].astype(jnp.float32) for i in range(num_queries)]  # [1, D] each

    def slot_words(ref, bits, blk, t0, j, cols=None):
        """(words, p): the word tile holding 16-token slot j of the unit, and the bit offset."""
        b, jj = divmod(16 * j, blk)
        jj //= 16
        p = bits * jj
        key = (id(ref), b, cols)
        if key not in cache_w:
            rows = pl.ds(16 * ((t0 // blk) + b), 16)
            w = ref[rows, :] if cols is None else ref[rows, pl.ds(cols * g, g)]
            cache_w[key] = (w, w >> jnp.uint32(16))
        w, w_hi = cache_w[key]
        return (w, p) if p < 16 else (w_hi, p - 16)

    def body(c, carry):
        ms, ls, accs, accm = carry  # per query: m, l [1,1]; accs: [n_groups] of [16, G]; accm [n_groups] [16,1]
        ms, ls = list(ms), list(ls)
        accs = [list(a) for a in accs]
        accm = [list(a) for a in accm]
        t0 = c * unit
        cache_w.clear()
        for j in range(unit // 16):
            w, p = slot_words(kc_ref, k_bits, k_blk, t0, j)
            fk = _as_float(w & jnp.uint32(((1 << k_bits) - 1) << p))  # [16, D] = code * 2**p
            grp = pl.ds((t0 + 16 * j) // g, 1)
            ks = ks_ref[grp, :].astype(jnp.float32) * (2.0 ** -p)
            km = km_ref[grp, :].astype(jnp.float32)
            tok = t0 + 16 * j + lax.broadcasted_iota(jnp.int32, (16, 1), 0)
            vws = [slot_words(vc_ref, v_bits, v_blk, t0, j, cols=gi) for gi in range(n_groups)]
            fvs = [_as_float(w_v & jnp.uint32(((1 << v_bits) - 1) << p_v)) for w_v, p_v in vws]
            rows = pl.ds(t0 + 16 * j, 16)
            vss = [vs_ref[rows, pl.ds(gi, 1)].astype(jnp.float32) * (2.0 ** -vws[gi][1]) for gi in range(n_groups)]
            vms = [vm_ref[rows, pl.ds(gi, 1)].astype(jnp.float32) for gi in range(n_groups)]
            for i in range(num_queries):
                s = jnp.sum(qs[i] * ks * fk, axis=1, keepdims=True) + jnp.sum(qs[i] * km, axis=1, keepdims=True)
                s = jnp.where(tok >= start, s, NEG)  # [16, 1]
                m_new = jnp.maximum(ms[i], jnp.max(s, axis=0, keepdims=True))

                def rescale(args, m_old=ms[i], m_new=m_new):
                    l, a, am = args
                    f = jnp.exp(m_old - m_new)
                    return l * f, tuple(x * f for x in a), tuple(x * f for x in am)

                ls[i], a_i, am_i = lax.cond(jnp.max(m_new - ms[i]) > 0, rescale, lambda args: args,
                                            (ls[i], tuple(accs[i]), tuple(accm[i])))
                accs[i], accm[i] = list(a_i), list(am_i)
                ms[i] = m_new
                pr = jnp.exp(s - m_new)  # [16, 1]
                ls[i] = ls[i] + jnp.sum(pr, axis=0, keepdims=True)
                for gi in range(n_groups):
                    accs[i][gi] = accs[i][gi] + (pr * vss[gi]) * fvs[gi]
                    accm[i][gi] = accm[i][gi] + pr * vms[gi]
        return tuple(ms), tuple(ls), tuple(tuple(a) for a in accs), tuple(tuple(a) for a in accm)

    cache_w: dict = {}
    init = (tuple(jnp.full((1, 1), NEG, jnp.float32) for _ in range(num_queries)),
            tuple(jnp.zeros((1, 1), jnp.float32) for _ in range(num_queries)),
            tuple(tuple(jnp.zeros((16, g), jnp.float32) for _ in range(n_groups)) for _ in range(num_queries)),
            tuple(tuple(jnp.zeros((16, 1), jnp.float32) for _ in range(n_groups)) for _ in range(num_queries)))
    ms, ls, accs, accm = lax.fori_loop(lo, hi, body, init)
    for i in range(num_queries):
        for gi in range(n_groups):
            o = jnp.sum(accs[i][gi], axis=0, keepdims=True) + jnp.sum(accm[i][gi], axis=0, keepdims=True)
            o_ref[pl.ds(i, 1), pl.ds(gi * g, g)] = o
        m_ref[pl.ds(i, 1)] = ms[i].reshape(1)
        l_ref[pl.ds(i, 1)] = ls[i].reshape(1)


def kernel_mma(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
               o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, chunks_per_split, precision):
    """Variant ``"mma"``: the same masked-code unpacking, but all M (>= 16, padded) query rows
    of a KV head go through tensor-core dots per 16-token slot (GQA ratios 4-8)."""
    g = group_size
    m_rows, d = q_ref.shape
    n_groups = d // g
    k_blk, v_blk = 16 * (32 // k_bits), 16 * (32 // v_bits)
    unit = max(k_blk, v_blk)
    split = pl.program_id(2)
    lo = jnp.maximum(lo_ref[()], split * chunks_per_split)
    hi = jnp.maximum(lo, jnp.minimum(hi_ref[()], (split + 1) * chunks_per_split))
    start = start_ref[()]
    q = q_ref[...].astype(jnp.float32)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    def words(ref, bits, blk, t0, j, cols=None):
        b, jj = divmod(16 * j, blk)
        p = bits * (jj // 16)
        rows = pl.ds(16 * ((t0 // blk) + b), 16)
        w = ref[rows, :] if cols is None else ref[rows, pl.ds(cols * g, g)]
        return (w, p) if p < 16 else (w >> jnp.uint32(16), p - 16)

    def body(c, carry):
        m, l, accs, accm = carry  # m, l [M, 1]; accs n_groups x [M, G]; accm n_groups x [M, 1]
        accs, accm = list(accs), list(accm)
        t0 = c * unit
        for j in range(unit // 16):
            w, p = words(kc_ref, k_bits, k_blk, t0, j)
            fk = _as_float(w & jnp.uint32(((1 << k_bits) - 1) << p))  # [16, D]
            grp = pl.ds((t0 + 16 * j) // g, 1)
            ks = ks_ref[grp, :].astype(jnp.float32) * (2.0 ** -p)
            km = km_ref[grp, :].astype(jnp.float32)
            s = dot(q * ks, fk.T) + jnp.sum(q * km, axis=1, keepdims=True)  # [M, 16]
            tok = t0 + 16 * j + lax.broadcasted_iota(jnp.int32, (1, 16), 1)
            s = jnp.where(tok >= start, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))

            def rescale(args, m_old=m, m_new=m_new):
                l_, a, am = args
                f = jnp.exp(m_old - m_new)
                return l_ * f, tuple(x * f for x in a), tuple(x * f for x in am)

            l, a_t, am_t = lax.cond(jnp.max(m_new - m) > 0, rescale, lambda args: args,
                                    (l, tuple(accs), tuple(accm)))
            accs, accm, m = list(a_t), list(am_t), m_new
            pr = jnp.exp(s - m)  # [M, 16]
            l = l + jnp.sum(pr, axis=1, keepdims=True)
            rows = pl.ds(t0 + 16 * j, 16)
            for gi in range(n_groups):
                w_v, p_v = words(vc_ref, v_bits, v_blk, t0, j, cols=gi)
                fv = _as_float(w_v & jnp.uint32(((1 << v_bits) - 1) << p_v))  # [16, G]
                vs = vs_ref[rows, pl.ds(gi, 1)].astype(jnp.float32).reshape(1, 16) * (2.0 ** -p_v)
                vm = vm_ref[rows, pl.ds(gi, 1)].astype(jnp.float32).reshape(1, 16)
                accs[gi] = accs[gi] + dot(pr * vs, fv)
                accm[gi] = accm[gi] + jnp.sum(pr * vm, axis=1, keepdims=True)
        return m, l, tuple(accs), tuple(accm)

    init = (jnp.full((m_rows, 1), NEG, jnp.float32), jnp.zeros((m_rows, 1), jnp.float32),
            tuple(jnp.zeros((m_rows, g), jnp.float32) for _ in range(n_groups)),
            tuple(jnp.zeros((m_rows, 1), jnp.float32) for _ in range(n_groups)))
    m, l, accs, accm = lax.fori_loop(lo, hi, body, init)
    for gi in range(n_groups):
        o_ref[:, pl.ds(gi * g, g)] = accs[gi] + accm[gi]
    m_ref[...] = m.reshape(m_rows)
    l_ref[...] = l.reshape(m_rows)
