"""A tiny real attention LM with the generation cache protocol, for tests.

Flax NNX; random weights; token embeddings; per layer RMSNorm, q/k/v projections with
RoPE, GQA attention, an MLP; an untied output head. Protocol (see kivi_jax.generate):

    cache = model.init_cache(batch_size, max_length, kivi=None | KIVIConfig, dtype=float32)
    logits, cache = model(input_ids [B, T], cache, lengths=[B])   # prefill (lengths given or T > 1)
    logits, cache = model(token [B, 1], cache[, active=[B]])      # decode at position cache.lengths

The cache is a tuple of per-layer DenseCache / KIVICache. Prefill runs
``kivi_jax.prefill_attention`` on the prompt and stores it with ``cache.prefill``; decode does
``cache.append`` then ``kivi_jax.decode_attention``. ``forward(input_ids)`` is the plain
full-sequence causal forward with no cache at all: the independent reference.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx

import kivi_jax

#: trace-time call counts (the model's __call__ only runs while jit traces it).
CALLS: collections.Counter = collections.Counter()


def _normal(rngs, shape, std):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def rms_norm(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, pos, theta=10000.0):
    """x [B, H, T, D], pos [B, T] int -> rotate-half RoPE."""
    d = x.shape[-1]
    inv = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    ang = pos.astype(jnp.float32)[:, None, :, None] * inv  # [B, 1, T, D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class ToyLayer(nnx.Module):
    def __init__(self, d_model, num_heads, num_kv_heads, head_dim, mlp, rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        s = d_model ** -0.5
        self.wq = _normal(rngs, (d_model, num_heads * head_dim), 2.0 * s)  # sharp, content-driven attention
        self.wk = _normal(rngs, (d_model, num_kv_heads * head_dim), 2.0 * s)
        self.wv = _normal(rngs, (d_model, num_kv_heads * head_dim), 2.0 * s)
        self.wo = _normal(rngs, (num_heads * head_dim, d_model), 2.0 * (num_heads * head_dim) ** -0.5)
        self.w1 = _normal(rngs, (d_model, mlp), s)
        self.w2 = _normal(rngs, (mlp, d_model), mlp ** -0.5)

    def qkv(self, x, pos):
        b, t, _ = x.shape
        h = rms_norm(x)

        def heads(w, n):
            return (h @ w[...]).reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)

        q = rope(heads(self.wq, self.num_heads), pos)
        k = rope(heads(self.wk, self.num_kv_heads), pos)
        return q, k, heads(self.wv, self.num_kv_heads)

    def out(self, x, o):
        b, _, t, _ = o.shape
        x = x + o.transpose(0, 2, 1, 3).reshape(b, t, -1) @ self.wo[...]
        return x + jax.nn.gelu(rms_norm(x) @ self.w1[...]) @ self.w2[...]


class ToyLM(nnx.Module):
    def __init__(self, *, vocab=97, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2,
                 mlp=128, seed=0):
        rngs = nnx.Rngs(seed)
        self.vocab, self.num_kv_heads, self.head_dim = vocab, num_kv_heads, head_dim
        self.embed = _normal(rngs, (vocab, d_model), 1.0)
        self.layers = nnx.List([ToyLayer(d_model, num_heads, num_kv_heads, head_dim, mlp, rngs)
                                for _ in range(num_layers)])
        self.head = _normal(rngs, (d_model, vocab), 3.0 * d_model ** -0.5)

    def init_cache(self, batch_size, max_length, kivi=None, dtype=jnp.float32):
        kw = dict(batch=batch_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                  max_length=max_length, dtype=dtype)
        if kivi is None:
            return tuple(kivi_jax.DenseCache.init(**kw) for _ in self.layers)
        return tuple(kivi_jax.KIVICache.init(kivi, **kw) for _ in self.layers)

    def _logits(self, x):
        return rms_norm(x) @ self.head[...]

    def __call__(self, input_ids, cache, lengths=None, attn_impl="reference", active=None):
        b, t = input_ids.shape
        x = self.embed[...][input_ids]
        new = []
        if lengths is not None or t > 1:  # prefill from an empty cache
            CALLS["prefill"] += 1
            pos = jnp.broadcast_to(jnp.arange(t), (b, t))
            for layer, c in zip(self.layers, cache):
                q, k, v = layer.qkv(x, pos)
                o = kivi_jax.prefill_attention(q, k, v, lengths)
                new.append(c.prefill(k, v, lengths))
                x = layer.out(x, o)
        else:  # decode one token per row at position cache.lengths
            CALLS["decode"] += 1
            pos = cache[0].lengths[:, None]
            for layer, c in zip(self.layers, cache):
                q, k, v = layer.qkv(x, pos)
                c = c.append(k, v, active)  # (active [B] bool or None: the rows that append)
                o = kivi_jax.decode_attention(q, c, impl=attn_impl)
                new.append(c)
                x = layer.out(x, o)
        return self._logits(x), tuple(new)

    def forward(self, input_ids):
        """Full-sequence causal forward, no cache: logits [B, T, vocab]."""
        b, t = input_ids.shape
        x = self.embed[...][input_ids]
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        for layer in self.layers:
            q, k, v = layer.qkv(x, pos)
            x = layer.out(x, kivi_jax.prefill_attention(q, k, v))
        return self._logits(x)
