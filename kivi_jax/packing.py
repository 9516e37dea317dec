"""Bit-packing of quantization codes into uint32 words: the layout the GPU kernel reads.

Layout ("consecutive, pair-split"). Codes of ``bits`` bits are packed ``c = 32 // bits`` to a
uint32 word along one *pack axis* (for a KV cache [B, H, T, D]: the token axis T, for keys and
values alike; the last axis D stays contiguous so one load of a word row is a wide, coalesced
read of D words). A word's low 16 bits hold its even elements and its high 16 bits its odd
ones, each half in order: element ``e`` lives in

    word row  = e // c
    bit shift = bits * ((e % c) // 2) + 16 * (e % 2)

so a chunk of ``n c`` consecutive elements is exactly ``n`` consecutive word rows: a kernel
loads each word once and unpacks it in one thread's registers (the ``c`` codes of a word being
consecutive tokens of one channel). The split halves are for the GPU kernel's magic-number
dequantization: ``(word >> bits * j) & (mask | mask << 16)`` puts elements 2j and 2j + 1 at
bits 0 and 16, the mantissas of two 16-bit floats, so one AND/OR makes both
(:mod:`pallas_kernels.kivi_decode`). A cache that fills the axis in order only ever ORs new bits
into zeroed words. A final, partial word holds the tail.

(Until 2026-12-01 the halves were not split: element e sat at bit ``bits * (e % c)``. Until
2026-11-30 the layout was a "16-row interleave" — element e in row 16 (e // 16c) +
e % 16 at bit bits ((e % 16c) // 16) — whose kernel reloaded a whole 16-row block for every
chunk; pallas_kernels/NOTES.md has the timings that retired it.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

VALID_BITS = (1, 2, 4, 8)
ROWS = 16  # word rows per allocation block (block_len): what capacities are rounded to


def codes_per_word(bits: int) -> int:
    check_bits("bits", bits)
    return 32 // bits


def check_bits(name: str, bits) -> None:
    # 2.0 == 2 and True == 1 would pass a plain membership test and break shapes later
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in VALID_BITS:
        raise ValueError(f"{name}={bits!r} is not supported; allowed: {VALID_BITS}")


def block_len(bits: int) -> int:
    """Elements of 16 word rows: the unit cache capacities are rounded to, so that every
    kernel chunk (a power of two <= the smallest block) divides a store."""
    return ROWS * codes_per_word(bits)


def packed_len(length: int, bits: int) -> int:
    """Number of word rows that hold ``length`` elements along the pack axis."""
    return -(-length // codes_per_word(bits))


def word_row_and_shift(e, bits: int):
    """Word row and bit shift of element index ``e`` (int or int array) along the pack axis."""
    c = codes_per_word(bits)
    i = e % c
    return e // c, bits * (i // 2) + 16 * (i % 2)


def _shifts(bits: int) -> jnp.ndarray:
    """Bit shift of each of a word's ``c`` elements, in order: [c] uint32."""
    return jnp.asarray(word_row_and_shift(np.arange(codes_per_word(bits)), bits)[1], jnp.uint32)


def pack(codes: jnp.ndarray, bits: int, axis: int) -> jnp.ndarray:
    """Packs integer codes in [0, 2**bits) along ``axis`` into uint32 words.

    codes [..., L, ...] -> words [..., packed_len(L, bits), ...] (uint32).
    """
    c = codes_per_word(bits)
    x = jnp.moveaxis(codes.astype(jnp.uint32), axis, -1)
    length = x.shape[-1]
    rows = packed_len(length, bits)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, rows * c - length)]).reshape(*x.shape[:-1], rows, c)
    # the codes' bits are disjoint, so their sum is their OR
    return jnp.moveaxis(jnp.sum(x << _shifts(bits), axis=-1, dtype=jnp.uint32), -1, axis)


def unpack(words: jnp.ndarray, bits: int, axis: int, length: int) -> jnp.ndarray:
    """Inverse of :func:`pack`: words along ``axis`` -> uint32 codes with ``length`` elements."""
    c = codes_per_word(bits)
    if words.shape[axis] != packed_len(length, bits):
        raise ValueError(
            f"words have {words.shape[axis]} rows along axis {axis}; length={length} at "
            f"bits={bits} needs {packed_len(length, bits)}"
        )
    w = jnp.moveaxis(words.astype(jnp.uint32), axis, -1)
    mask = jnp.uint32((1 << bits) - 1) if bits < 32 else jnp.uint32(0xFFFFFFFF)
    codes = (w[..., None] >> _shifts(bits)) & mask
    codes = codes.reshape(*w.shape[:-1], w.shape[-1] * c)[..., :length]
    return jnp.moveaxis(codes, -1, axis)


def pack_numpy_reference(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Element-by-element statement of the layout (slow; for tests and docs)."""
    x = np.moveaxis(np.asarray(codes, dtype=np.uint64), axis, 0)
    out = np.zeros((packed_len(x.shape[0], bits),) + x.shape[1:], dtype=np.uint64)
    for e in range(x.shape[0]):
        row, shift = word_row_and_shift(e, bits)
        out[row] |= x[e] << np.uint64(shift)
    return np.moveaxis(out.astype(np.uint32), 0, axis)
