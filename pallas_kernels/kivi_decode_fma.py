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


def as_float(x_u32):
    """uint32 x < 2**23 -> float32 x exactly: bitcast(x | 0x4B000000) is 2**23 + x."""
    return lax.bitcast_convert_type(x_u32 | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0


def _pow2_neg(p):
    """2.0 ** -p for a traced int32 p in [0, 32), exactly (built from the exponent bits)."""
    return lax.bitcast_convert_type(((127 - p) << 23).astype(jnp.int32), jnp.float32)


def program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split):
    """This program's chunk range [lo, hi) (its split of the row's bulk) and the row's token
    range [start, end): tokens outside it (a sliding window's start, the last partial chunk's
    end) are masked."""
    split = pl.program_id(2)
    lo = jnp.maximum(lo_ref[()], split * chunks_per_split)
    hi = jnp.maximum(lo, jnp.minimum(hi_ref[()], (split + 1) * chunks_per_split))
    return lo, hi, start_ref[()], end_ref[()]


def block_words(kc_ref, vc_ref, cb, n_groups, g):
    """Key words [16, D] and value words per channel group [16, G] of packed block ``cb``,
    each with its ``>> 16`` copy (the slots whose bit offset is >= 16)."""
    u16 = jnp.uint32(16)
    rows = pl.ds(16 * cb, 16)
    kw = kc_ref[rows, :]
    vws = []
    for gi in range(n_groups):
        vw = vc_ref[rows, pl.ds(gi * g, g)]
        vws.append((vw, vw >> u16))
    return (kw, kw >> u16), vws


def kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
           end_ref, o_ref, m_ref, l_ref, *, bits, group_size, chunks_per_split, num_queries):
    """One (row, KV head, split) program; keys and values share ``bits``.

    Outer loop: packed blocks of 16*c tokens (c = 32/bits): the word tiles are loaded once.
    Inner loop: slot pairs (j, j + c/2) that share the bit offset p = bits*j, the second
    read from ``w >> 16`` -- a small loop body keeps register pressure low.
    """
    g = group_size
    d = q_ref.shape[1]
    n_groups = d // g
    c = 32 // bits
    blk, half = 16 * c, c // 2
    lo, hi, start, end = program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split)
    qs = [q_ref[pl.ds(i, 1), :].astype(jnp.float32) for i in range(num_queries)]  # [1, D] each

    def block(cb, carry):
        t0 = cb * blk
        kws, vws = block_words(kc_ref, vc_ref, cb, n_groups, g)

        def pair(jp, carry):
            ms, ls, accs, accm = carry
            ms, ls = list(ms), list(ls)
            accs = [list(a) for a in accs]
            accm = [list(a) for a in accm]
            p = bits * jp
            mask = jnp.uint32((1 << bits) - 1) << p.astype(jnp.uint32)
            inv = _pow2_neg(p)
            slots = (jp, jp + half)
            fks, kss, kms, toks, vss, vms = [], [], [], [], [], []
            for h in range(2):
                t = t0 + 16 * slots[h]
                fks.append(as_float(kws[h] & mask))  # [16, D] = code * 2**p
                grp = pl.ds(t // g, 1)
                kss.append(ks_ref[grp, :].astype(jnp.float32) * inv)
                kms.append(km_ref[grp, :].astype(jnp.float32))
                toks.append(t + lax.broadcasted_iota(jnp.int32, (16, 1), 0))
                vss.append([vs_ref[pl.ds(t, 16), pl.ds(gi, 1)].astype(jnp.float32) * inv for gi in range(n_groups)])
                vms.append([vm_ref[pl.ds(t, 16), pl.ds(gi, 1)].astype(jnp.float32) for gi in range(n_groups)])
            for i in range(num_queries):
                s = [jnp.where((toks[h] >= start) & (toks[h] < end),
                               jnp.sum((qs[i] * kss[h]) * fks[h], axis=1, keepdims=True)
                               + jnp.sum(qs[i] * kms[h], axis=1, keepdims=True), NEG) for h in range(2)]
                m_new = jnp.maximum(ms[i], jnp.maximum(jnp.max(s[0], axis=0, keepdims=True),
                                                       jnp.max(s[1], axis=0, keepdims=True)))

                def rescale(args, m_old=ms[i], m_new=m_new):
                    l, a, am = args
                    f = jnp.exp(m_old - m_new)
                    return l * f, tuple(x * f for x in a), tuple(x * f for x in am)

                ls[i], a_i, am_i = lax.cond(jnp.max(m_new - ms[i]) > 0, rescale, lambda args: args,
                                            (ls[i], tuple(accs[i]), tuple(accm[i])))
                accs[i], accm[i] = list(a_i), list(am_i)
                ms[i] = m_new
                pr = [jnp.exp(s[h] - m_new) for h in range(2)]  # [16, 1]
                ls[i] = ls[i] + jnp.sum(pr[0] + pr[1], axis=0, keepdims=True)
                for gi in range(n_groups):
                    fv0 = as_float(vws[gi][0] & mask)
                    fv1 = as_float(vws[gi][1] & mask)
                    accs[i][gi] = accs[i][gi] + (pr[0] * vss[0][gi]) * fv0 + (pr[1] * vss[1][gi]) * fv1
                    accm[i][gi] = accm[i][gi] + pr[0] * vms[0][gi] + pr[1] * vms[1][gi]
            return tuple(ms), tuple(ls), tuple(tuple(a) for a in accs), tuple(tuple(a) for a in accm)

        return lax.fori_loop(0, half, pair, carry)

    init = (tuple(jnp.full((1, 1), NEG, jnp.float32) for _ in range(num_queries)),
            tuple(jnp.zeros((1, 1), jnp.float32) for _ in range(num_queries)),
            tuple(tuple(jnp.zeros((16, g), jnp.float32) for _ in range(n_groups)) for _ in range(num_queries)),
            tuple(tuple(jnp.zeros((16, 1), jnp.float32) for _ in range(n_groups)) for _ in range(num_queries)))
    ms, ls, accs, accm = lax.fori_loop(lo, hi, block, init)
    for i in range(num_queries):
        for gi in range(n_groups):
            o = jnp.sum(accs[i][gi], axis=0, keepdims=True) + jnp.sum(accm[i][gi], axis=0, keepdims=True)
            o_ref[pl.ds(i, 1), pl.ds(gi * g, g)] = o
        m_ref[pl.ds(i, 1)] = ms[i].reshape(1)
        l_ref[pl.ds(i, 1)] = ls[i].reshape(1)


def kernel_mma(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
               end_ref, o_ref, m_ref, l_ref, *, bits, group_size, chunks_per_split, precision):
    """Variant ``"mma"``: the same masked-code unpacking and loop structure as :func:`kernel`,
    but all M (>= 16, padded) query rows of a KV head go through tensor-core dots per
    16-token slot (GQA ratios 4-8)."""
    g = group_size
    m_rows, d = q_ref.shape
    n_groups = d // g
    c = 32 // bits
    blk, half = 16 * c, c // 2
    lo, hi, start, end = program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split)
    q = q_ref[...].astype(jnp.float32)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    def block(cb, carry):
        t0 = cb * blk
        kws, vws = block_words(kc_ref, vc_ref, cb, n_groups, g)

        def pair(jp, carry):
            m, l, accs, accm = carry  # m, l [M, 1]; accs n_groups x [M, G]; accm n_groups x [M, 1]
            accs, accm = list(accs), list(accm)
            p = bits * jp
            mask = jnp.uint32((1 << bits) - 1) << p.astype(jnp.uint32)
            inv = _pow2_neg(p)
            ss, ts = [], []
            for h, slot in enumerate((jp, jp + half)):
                t = t0 + 16 * slot
                fk = as_float(kws[h] & mask)  # [16, D]
                grp = pl.ds(t // g, 1)
                ks = ks_ref[grp, :].astype(jnp.float32) * inv
                km = km_ref[grp, :].astype(jnp.float32)
                s = dot(q * ks, fk.T) + jnp.sum(q * km, axis=1, keepdims=True)  # [M, 16]
                tok = t + lax.broadcasted_iota(jnp.int32, (1, 16), 1)
                ss.append(jnp.where((tok >= start) & (tok < end), s, NEG))
                ts.append(t)
            m_new = jnp.maximum(m, jnp.maximum(jnp.max(ss[0], axis=1, keepdims=True),
                                               jnp.max(ss[1], axis=1, keepdims=True)))

            def rescale(args, m_old=m, m_new=m_new):
                l_, a, am = args
                f = jnp.exp(m_old - m_new)
                return l_ * f, tuple(x * f for x in a), tuple(x * f for x in am)

            l, a_t, am_t = lax.cond(jnp.max(m_new - m) > 0, rescale, lambda args: args,
                                    (l, tuple(accs), tuple(accm)))
            accs, accm, m = list(a_t), list(am_t), m_new
            prs = [jnp.exp(s - m) for s in ss]  # [M, 16]
            l = l + jnp.sum(prs[0] + prs[1], axis=1, keepdims=True)
            for gi in range(n_groups):
                for h in range(2):
                    fv = as_float(vws[gi][h] & mask)  # [16, G]
                    rws = pl.ds(ts[h], 16)
                    vs = vs_ref[rws, pl.ds(gi, 1)].astype(jnp.float32).reshape(1, 16) * inv
                    vm = vm_ref[rws, pl.ds(gi, 1)].astype(jnp.float32).reshape(1, 16)
                    accs[gi] = accs[gi] + dot(prs[h] * vs, fv)
                    accm[gi] = accm[gi] + jnp.sum(prs[h] * vm, axis=1, keepdims=True)
            return m, l, tuple(accs), tuple(accm)

        return lax.fori_loop(0, half, pair, carry)

    init = (jnp.full((m_rows, 1), NEG, jnp.float32), jnp.zeros((m_rows, 1), jnp.float32),
            tuple(jnp.zeros((m_rows, g), jnp.float32) for _ in range(n_groups)),
            tuple(jnp.zeros((m_rows, 1), jnp.float32) for _ in range(n_groups)))
    m, l, accs, accm = lax.fori_loop(lo, hi, block, init)
    for gi in range(n_groups):
        o_ref[:, pl.ds(gi * g, g)] = accs[gi] + accm[gi]
    m_ref[...] = m.reshape(m_rows)
    l_ref[...] = l.reshape(m_rows)
