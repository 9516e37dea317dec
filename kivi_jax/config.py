"""KIVIConfig: the paper's knobs (k_bits, v_bits, group_size, residual_length), checked eagerly."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kivi_jax import packing
from kivi_jax.checks import check_float, is_int
from kivi_jax.rotation import ROTATE_CHOICES, check_head_dim as _check_rotation_dim


LAYOUTS = ("auto", "tokens", "mosaic")


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
    """Settings of a KIVI cache. Defaults are the paper's KIVI-2: 2 bits, G=32, R=128.

    k_bits / v_bits: bits per key / value code, in {1, 2, 4, 8}.
    group_size: G, numbers sharing one scale and min (keys: G tokens of one channel;
      values: G channels of one token). A power of two >= 16: the packed layout hands the
      kernel 16 tokens at a time, and a key group must hold whole 16-token slots.
    residual_length: R, newest tokens kept in full precision; a multiple of group_size.

    Extensions beyond the paper (all off by default: the defaults are plain KIVI, bit for bit):

    sink_tokens: S >= 0, the first S tokens of every row stay in full precision forever
      (attention sinks); quantization groups, the key residual and the value window count
      from token S. Must be < max_length (checked by KIVICache.init). A decode_attention
      ``window`` counts the sinks as ordinary positions (Mistral's: the newest W tokens, sinks
      before them not attended), not StreamingLLM's sinks-plus-window.
    rotate: "none" | "k" | "v" | "kv": store K·H and/or V·H (H the orthonormal Hadamard
      matrix, :mod:`kivi_jax.rotation`; head_dim a power of two, checked when the cache is
      built). Attention rotates q before the scores and the output back after p·V.
    key_group_size: tokens per key group (per channel); a power of two >= 16 dividing
      residual_length. None (default): group_size. Values keep groups of group_size channels.
    layout: how the quantized tokens are stored: "tokens" (KIVICache: codes packed along
      tokens; every option above), "mosaic" (MosaicKIVICache: the Mosaic GPU kernel's layout,
      kivi_jax.cache_mosaic; KIVI-2 only: 2 bits, groups of 32, R dividing 256, head_dim 128;
      sinks and rotation as in "tokens") or "auto" (the default): the model's ``init_cache`` picks
      "mosaic" where it runs and was measured faster (a cache on one Hopper GPU, bf16; see
      :func:`kivi_jax.cache_mosaic.resolve_layout`), "tokens" everywhere else. A cache's own
      config always names the layout it stores.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    sink_tokens: int = 0
    rotate: str = "none"
    key_group_size: int | None = None
    layout: str = "auto"

    def __post_init__(self):
        # NumPy integers (np.int64(32) from an array or a sweep) are integers: stored as int, so
        # that the checks below and every isinstance(.., int) downstream take them (group_size,
        # residual_length and key_group_size said "np.int64(32) must be a power of two >= 16")
        for name in ("k_bits", "v_bits", "group_size", "residual_length", "sink_tokens", "key_group_size"):
            value = getattr(self, name)
            if is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
        packing.check_bits("k_bits", self.k_bits)
        packing.check_bits("v_bits", self.v_bits)
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g & (g - 1):
            raise ValueError(f"group_size={g!r} must be a power of two >= 16")
        r = self.residual_length
        if not isinstance(r, int) or r < g or r % g:
            raise ValueError(f"residual_length={r!r} must be a positive multiple of group_size={g}")
        s = self.sink_tokens
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"sink_tokens={s!r} must be an integer >= 0")
        if self.rotate not in ROTATE_CHOICES:
            raise ValueError(f"rotate={self.rotate!r}; allowed: {ROTATE_CHOICES}")
        kg = self.key_group_size
        if kg is not None and (isinstance(kg, bool) or not isinstance(kg, int) or kg < 16 or kg & (kg - 1)
                               or r % kg):
            raise ValueError(f"key_group_size={kg!r} must be a power of two >= 16 dividing residual_length={r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; allowed: {LAYOUTS}")
        if self.layout == "mosaic" and self.mosaic_conflicts():
            raise ValueError("layout='mosaic' takes KIVI-2 only; got " + "; ".join(self.mosaic_conflicts()))

    def mosaic_conflicts(self) -> list[str]:
        """The settings the Mosaic layout cannot hold, each as "name=value (allowed: ...)"; [] when
        it can (KIVI-2: 2 bits, groups of 32, R dividing 256; any sinks and rotation)."""
        bad = [f"{name}={got!r} (allowed: {want!r})" for name, got, want in (
            ("k_bits", self.k_bits, 2), ("v_bits", self.v_bits, 2), ("group_size", self.group_size, 32),
            ("key_group_size", self.key_group, 32)) if got != want]
        if 256 % self.residual_length:
            bad.append(f"residual_length={self.residual_length} (allowed: 32, 64, 128, 256)")
        return bad

    @property
    def key_group(self) -> int:
        """Tokens per key group: key_group_size, or group_size when that is None."""
        return self.group_size if self.key_group_size is None else self.key_group_size

    @property
    def rotate_keys(self) -> bool:
        return self.rotate in ("k", "kv")

    @property
    def rotate_values(self) -> bool:
        return self.rotate in ("v", "kv")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide head_dim={head_dim}")
        _check_rotation_dim(head_dim, self.rotate)

    @property
    def capacity_unit(self) -> int:
        """The unit :meth:`capacity` rounds to: whole packed blocks and key groups."""
        return max(packing.block_len(self.k_bits), packing.block_len(self.v_bits), self.group_size, self.key_group)

    def capacity(self, max_length: int) -> int:
        """Token capacity of the quantized stores: the max_length - sink_tokens tokens after the
        sinks, rounded up to whole packed blocks and key groups. max_length > sink_tokens (as
        KIVICache.init requires: a smaller one returned a whole block for a cache with no body)."""
        _check_sizes(max_length=max_length)
        if self.sink_tokens >= max_length:
            raise ValueError(f"sink_tokens={self.sink_tokens} must be < max_length={max_length}")
        unit = self.capacity_unit
        return -(-(max_length - self.sink_tokens) // unit) * unit

    def bytes_per_token(self, *, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> float:
        """Analytic bytes one more token costs in the quantized stores (codes + scales + mins).

        The fixed full-precision part (R residual tokens and S sink tokens of K and V per
        head) is :meth:`residual_bytes`; a cache of n tokens holds about
        ``n * bytes_per_token + residual_bytes``.
        """
        _check_sizes(num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=num_layers)
        self.check_head_dim(head_dim)
        sb = check_float("cache", dtype).itemsize
        per_head = (head_dim * (self.k_bits + self.v_bits) / 8
                    + 2 * sb * head_dim / self.key_group + 2 * sb * head_dim / self.group_size)
        return per_head * num_kv_heads * num_layers

    def residual_bytes(self, *, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> int:
        """Bytes of the full-precision buffers: R residual + S sink tokens, of K and of V."""
        _check_sizes(num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=num_layers)
        sb = check_float("cache", dtype).itemsize
        return 2 * (self.residual_length + self.sink_tokens) * head_dim * sb * num_kv_heads * num_layers


def dense_bytes_per_token(*, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, num_layers: int = 1) -> int:
    """Bytes per token of a full-precision K/V cache."""
    _check_sizes(num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=num_layers)
    return 2 * head_dim * check_float("cache", dtype).itemsize * num_kv_heads * num_layers


def _check_sizes(**sizes) -> None:
    """Each size an integer >= 1, else a ValueError naming it (num_kv_heads=-1, head_dim=128.0 or
    num_layers=0 gave a negative, fractional or zero byte count)."""
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
