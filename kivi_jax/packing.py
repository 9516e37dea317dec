"""Bit-packing of quantization codes into uint32 words: the layout the GPU kernel reads.

Layout ("16-row interleave"). Codes of ``bits`` bits are packed ``c = 32 // bits`` to a
uint32 word along one *pack axis* (for a KV cache [B, H, T, D]: the token axis T, for
keys and values alike; the last axis D stays contiguous so one load of a word row is a
wide, coalesced read of D words). Along the pack axis, elements form blocks of ``16 c``;
element ``e`` lives in

    word row  = 16 * (e // (16 c)) + e % 16
    bit shift = bits * ((e % (16 c)) // 16)

so a block of 16 word rows holds ``16 c`` consecutive elements and unpacking slot ``j``
(one shift and one mask) yields 16 *consecutive* elements ``16 j .. 16 j + 15``. A kernel
that loads one 16-row tile gets ``c`` contiguous 16-token chunks without any gather, and
a cache that fills the axis in order only ever ORs new bits into zeroed words. A final,
partial block of ``n`` elements uses ``min(16, n)`` word rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

VALID_BITS = (1, 2, 4, 8)
ROWS = 16  # word rows per block: elements of one slot that come out of one unpack


def codes_per_word(bits: int) -> int:
    check_bits("bits", bits)
    return 32 // bits


def check_bits(name: str, bits) -> None:
    # 2.0 == 2 and True == 1 would pass a plain membership test and break shapes later
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in VALID_BITS:
        raise ValueError(f"{name}={bits!r} is not supported; allowed: {VALID_BITS}")


def block_len(bits: int) -> int:
    """Elements per full block along the pack axis (16 word rows)."""
    return ROWS * codes_per_word(bits)


def packed_len(length: int, bits: int) -> int:
    """Number of word rows that hold ``length`` elements along the pack axis."""
    blk = block_len(bits)
    return ROWS * (length // blk) + min(ROWS, length % blk)


def word_row_and_shift(e, bits: int):
    """Word row and bit shift of element index ``e`` (int or int array) along the pack axis."""
    blk = block_len(bits)
    return ROWS * (e // blk) + e % ROWS, bits * ((e % blk) // ROWS)


def pack(codes: jnp.ndarray, bits: int, axis: int) -> jnp.ndarray:
    """Packs integer codes in [0, 2**bits) along ``axis`` into uint32 words.

    codes [..., L, ...] -> words [..., packed_len(L, bits), ...] (uint32).
    """
    c = codes_per_word(bits)
    x = jnp.moveaxis(codes.astype(jnp.uint32), axis, 0)
    length, rest = x.shape[0], x.shape[1:]
    blk = ROWS * c
    n_full, tail = divmod(length, blk)
    parts = []
    if n_full:
        full = x[: n_full * blk].reshape(n_full, c, ROWS, *rest)
        shifts = (jnp.arange(c, dtype=jnp.uint32) * bits).reshape(1, c, 1, *([1] * len(rest)))
        parts.append(jnp.sum(full << shifts, axis=1, dtype=jnp.uint32).reshape(n_full * ROWS, *rest))
    if tail:
        part = x[n_full * blk :]
        if tail >= ROWS:
            slots = -(-tail // ROWS)
            part = jnp.pad(part, [(0, slots * ROWS - tail)] + [(0, 0)] * len(rest))
            part = part.reshape(slots, ROWS, *rest)
            shifts = (jnp.arange(slots, dtype=jnp.uint32) * bits).reshape(slots, 1, *([1] * len(rest)))
            part = jnp.sum(part << shifts, axis=0, dtype=jnp.uint32)
        parts.append(part)
    if not parts:  # an empty axis packs to zero word rows
        return jnp.moveaxis(jnp.zeros((0,) + rest, jnp.uint32), 0, axis)
    words = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return jnp.moveaxis(words, 0, axis)


def unpack(words: jnp.ndarray, bits: int, axis: int, length: int) -> jnp.ndarray:
    """Inverse of :func:`pack`: words along ``axis`` -> uint32 codes with ``length`` elements."""
    c = codes_per_word(bits)
    if words.shape[axis] != packed_len(length, bits):
        raise ValueError(
            f"words have {words.shape[axis]} rows along axis {axis}; length={length} at "
            f"bits={bits} needs {packed_len(length, bits)}"
        )
    w = jnp.moveaxis(words.astype(jnp.uint32), axis, 0)
    rest = w.shape[1:]
    mask = jnp.uint32((1 << bits) - 1) if bits < 32 else jnp.uint32(0xFFFFFFFF)
    blk = ROWS * c
    n_full, tail = divmod(length, blk)
    parts = []
    if n_full:
        full = w[: n_full * ROWS].reshape(n_full, 1, ROWS, *rest)
        shifts = (jnp.arange(c, dtype=jnp.uint32) * bits).reshape(1, c, 1, *([1] * len(rest)))
        parts.append(((full >> shifts) & mask).reshape(n_full * blk, *rest))
    if tail:
        part = w[n_full * ROWS :]
        if tail >= ROWS:
            slots = -(-tail // ROWS)
            shifts = (jnp.arange(slots, dtype=jnp.uint32) * bits).reshape(slots, 1, *([1] * len(rest)))
            part = ((part[None] >> shifts) & mask).reshape(slots * ROWS, *rest)[:tail]
        else:
            part = part & mask
        parts.append(part)
    if not parts:
        return jnp.moveaxis(jnp.zeros((0,) + rest, jnp.uint32), 0, axis)
    codes = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return jnp.moveaxis(codes, 0, axis)


def pack_numpy_reference(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Element-by-element statement of the layout (slow; for tests and docs)."""
    x = np.moveaxis(np.asarray(codes, dtype=np.uint64), axis, 0)
    out = np.zeros((packed_len(x.shape[0], bits),) + x.shape[1:], dtype=np.uint64)
    for e in range(x.shape[0]):
        row, shift = word_row_and_shift(e, bits)
        out[row] |= x[e] << np.uint64(shift)
    return np.moveaxis(out.astype(np.uint32), 0, axis)
