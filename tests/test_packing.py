"""The packed uint32 layout (kivi_jax.packing) against its docstring formula and the NumPy statement."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kivi_jax import packing

BITS = (1, 2, 4, 8)


def formula(e: int, bits: int):
    """The layout as the module docstring writes it (c = 32 // bits codes a word): even
    elements in the low half, odd ones in the high half, each half in order."""
    c = 32 // bits
    return e // c, bits * ((e % c) // 2) + 16 * (e % 2)


def test_codes_per_word_and_block_len():
    assert [packing.codes_per_word(b) for b in BITS] == [32, 16, 8, 4]
    assert [packing.block_len(b) for b in BITS] == [512, 256, 128, 64]


@pytest.mark.parametrize("bits", BITS)
def test_word_row_and_shift_matches_docstring(bits):
    e = np.arange(3 * packing.block_len(bits) + 37)
    rows, shifts = packing.word_row_and_shift(e, bits)
    want = np.array([formula(int(i), bits) for i in e])
    np.testing.assert_array_equal(rows, want[:, 0])
    np.testing.assert_array_equal(shifts, want[:, 1])
    # every (row, shift) slot is used once: the layout is a bijection onto the words
    assert len(set(zip(rows.tolist(), shifts.tolist()))) == len(e)
    assert shifts.max() == 32 - bits


@pytest.mark.parametrize("bits", BITS)
def test_packed_len(bits):
    c = 32 // bits
    for length, want in [(0, 0), (1, 1), (c - 1, 1), (c, 1), (c + 1, 2), (16 * c, 16), (16 * c + 1, 17),
                         (3 * 16 * c, 48), (7 * c + 3, 8)]:
        assert packing.packed_len(length, bits) == want, (length, bits)
        rows, _ = packing.word_row_and_shift(np.arange(length), bits)
        assert (rows.max() + 1 if length else 0) == want  # exactly the rows the elements use


def test_numpy_reference_by_hand():
    # 2 bits, 40 elements: word e // 16; even elements from bit 0 up, odd ones from bit 16 up;
    # the last word is partial
    codes = np.arange(40) % 4
    words = packing.pack_numpy_reference(codes, 2, axis=0)
    assert words.shape == (3,) and words.dtype == np.uint32
    for r in range(3):
        mine = [e for e in range(40) if e // 16 == r]
        want = (sum(int(codes[e]) << (2 * k) for k, e in enumerate(mine[0::2]))
                + sum(int(codes[e]) << (16 + 2 * k) for k, e in enumerate(mine[1::2])))
        assert int(words[r]) == want
    # codes 0,1,2,3,0,...: the even ones 0,2,0,2,.. in the low half, the odd ones 1,3,1,3,.. above
    assert int(words[0]) == 0x8888 | 0xDDDD << 16


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_unpack(codes, bits, axis):
    words = packing.pack(codes, bits, axis=axis)
    return words, packing.unpack(words, bits, axis=axis, length=codes.shape[axis])


@given(bits=st.sampled_from(BITS), length=st.integers(0, 600), rest=st.integers(1, 3),
       axis=st.sampled_from([0, 1, -1]), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_reference_and_round_trips(bits, length, rest, axis, seed):
    rng = np.random.default_rng(seed)
    shape = [length, rest] if axis == 0 else [rest, length]
    codes = rng.integers(0, 2**bits, shape).astype(np.uint32)
    ax = 0 if axis == 0 else 1
    words, back = _pack_unpack(jnp.asarray(codes), bits, ax)
    assert words.dtype == jnp.uint32
    assert words.shape[ax] == packing.packed_len(length, bits)
    np.testing.assert_array_equal(np.asarray(words), packing.pack_numpy_reference(codes, bits, axis=ax))
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_all_ones_codes_fill_words(bits):
    # maximal codes over whole blocks use every bit of every word: no bits lost or overlapping
    codes = jnp.full((2 * packing.block_len(bits), 3), 2**bits - 1, jnp.uint32)
    words = np.asarray(packing.pack(codes, bits, axis=0))
    assert (words == np.uint32(0xFFFFFFFF)).all()


def test_pack_4d_token_axis_under_jit():
    # the cache's layout: [B, H, T, D] packed along T with D contiguous
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, (2, 3, 300, 8)).astype(np.uint32)
    f = jax.jit(lambda c: packing.unpack(packing.pack(c, 2, 2), 2, 2, 300))
    words = packing.pack(jnp.asarray(codes), 2, axis=2)
    assert words.shape == (2, 3, packing.packed_len(300, 2), 8)
    np.testing.assert_array_equal(np.asarray(words), packing.pack_numpy_reference(codes, 2, axis=2))
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(codes))), codes)


def test_word_rows_give_consecutive_elements():
    # the kernel's view: n word rows; shift by bits * j, mask both halves -> elements 2j (bits
    # 0..) and 2j + 1 (bits 16..): elements n0 c .. (n0 + n) c - 1 in order
    for bits in BITS:
        c = 32 // bits
        codes = np.random.default_rng(bits).integers(0, 2**bits, 16 * c).astype(np.uint32)
        words = np.asarray(packing.pack(jnp.asarray(codes), bits, 0))
        pairs = (words[:, None] >> (bits * np.arange(c // 2))) & ((2**bits - 1) * 0x10001)  # [16, c/2]
        unpacked = np.stack([pairs & 0xFFFF, pairs >> 16], -1).reshape(16, c)
        np.testing.assert_array_equal(unpacked.reshape(-1), codes)
        np.testing.assert_array_equal(unpacked[3:5].reshape(-1), codes[3 * c: 5 * c])


def test_unpack_rejects_wrong_word_count():
    words = jnp.zeros((16, 4), jnp.uint32)
    with pytest.raises(ValueError, match="length=300"):
        packing.unpack(words, 2, axis=0, length=300)


@pytest.mark.parametrize("bad", [0, 3, 16, 2.0, True, "2", None])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        packing.codes_per_word(bad)
    with pytest.raises(ValueError, match="k_bits"):
        packing.check_bits("k_bits", bad)
