"""The T5 building blocks, numerically those of T5X's `t5x/examples/t5/layers.py`.

RMS layer norm (eps 1e-6, computed in float32), bias-free dense layers with 2-D kernels, no 1/sqrt(d_kv)
scaling of attention logits (it is folded into the query initializer), bucketed relative position bias.
Each dense layer, layer norm and attention consults the method plug-ins of `plugins.py` at the `Site` it
is given.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any
NEG_INF = -1e10  # T5X's large negative logit for masked positions.

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def param(module: nn.Module, name: str, init: Callable, shape, axes: tuple[str, ...]) -> Array:
  """A float32 backbone parameter in the 'params' collection, annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh with axis rules)."""
  return nn.with_logical_constraint(x, axes)


class LayerNorm(nn.Module):
  """T5 RMS norm: x / sqrt(mean(x^2) + eps) * scale, no centering and no bias; float32 inside.

  Attributes:
    site: the plug-in site of this norm (its `projection` is the norm's name); the `projection` hooks
      there wrap the output (e.g. a trainable bias). None: no plug-ins.
  """

  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  site: Optional[plugins.Site] = None
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, x: Array, ctx: Optional[plugins.Context] = None) -> Array:
    """[..., d] -> [..., d]."""
    inputs = x
    x = jnp.asarray(x, jnp.float32)
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean2 + self.epsilon), self.dtype)
    y = y * jnp.asarray(scale, self.dtype)
    if self.site is not None:
      for module, delta_ctx in plugins.calls(self.deltas, "projection", self.site, ctx):
        y = jnp.asarray(module(inputs, y, delta_ctx), self.dtype)
    return y


class Embed(nn.Module):
  """The shared token embedding `[vocab, d]`; `attend` gives logits against it (tied output layer).

  Lookups are in `dtype`; `attend` computes in `attend_dtype` (float32, as T5X) whatever the activations'
  dtype, so tied logits, losses and scores keep float32 precision under bfloat16 activations.
  """

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  attend_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = param(self, "embedding", nn.initializers.normal(stddev=1.0),
                           (self.num_embeddings, self.features), ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    """[B, n] int -> [B, n, d]."""
    return jnp.asarray(jnp.take(self.embedding, tokens, axis=0), self.dtype)

  def attend(self, query: Array) -> Array:
    """[B, n, d] -> [B, n, vocab] in `attend_dtype`."""
    query = jnp.asarray(query, self.attend_dtype)
    return jnp.dot(query, jnp.asarray(self.embedding, self.attend_dtype).T)

  def table(self) -> Array:
    return self.embedding


class Dense(nn.Module):
  """A bias-free projection with a 2-D float32 kernel `[in, out]`, plus the deltas of the plug-ins.

  Attributes:
    features: output size.
    kernel_axes: logical names of the kernel's two axes.
    site: the plug-in site of this projection (`site.projection` is its name): `projection_input` hooks
      transform its input, then `projection` hooks wrap its output, in delta order.
  """

  features: int
  kernel_axes: tuple[str, str]
  site: plugins.Site
  deltas: plugins.Deltas = ()
  kernel_init: Callable = default_kernel_init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, ctx: plugins.Context) -> Array:
    """[..., in] -> [..., out]."""
    kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.kernel_axes)
    x = jnp.asarray(x, self.dtype)
    for module, delta_ctx in plugins.calls(self.deltas, "projection_input", self.site, ctx):
      x = jnp.asarray(module(x, delta_ctx), self.dtype)
    y = jnp.dot(x, jnp.asarray(kernel, self.dtype))
    for module, delta_ctx in plugins.calls(self.deltas, "projection", self.site, ctx):
      y = jnp.asarray(module(x, y, delta_ctx), self.dtype)
    return y


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's bucketing of `key_position - query_position` (T5X `_relative_position_bucket`)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """The bucketed relative position bias `rel_embedding [heads, buckets]`, shared by a stack's layers."""

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.rel_embedding = param(
        self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))

  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    """q_positions [q], k_positions [k] (int) -> bias [1, h, q, k]."""
    buckets = relative_position_bucket(k_positions[None, :] - q_positions[:, None], self.bidirectional,
                                       self.num_buckets, self.max_distance)
    values = jnp.take(jnp.asarray(self.rel_embedding, self.dtype), buckets, axis=1)  # [h, q, k]
    return values[None]


class MlpBlock(nn.Module):
  """T5 feed-forward: wi (ReLU, v1.0) or gated wi_0 * wi_1 (GELU, v1.1), dropout, wo."""

  config: T5Config
  site: plugins.Site
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, x: Array, ctx: plugins.Context) -> Array:
    """[B, n, d] -> [B, n, d]."""
    cfg = self.config
    d, ff = cfg.emb_dim, cfg.mlp_dim

    def dense(name, fin, fout, axes):
      return Dense(fout, axes, self.site.at(name, fin, fout), self.deltas, dtype=cfg.dtype, name=name)

    hidden = []
    for idx in range(len(cfg.mlp_activations)):
      name = "wi" if len(cfg.mlp_activations) == 1 else f"wi_{idx}"
      hidden.append(dense(name, d, ff, ("embed", "mlp"))(x, ctx))
    # Rematerialized: the backward pass recomputes the activations from the projections' outputs (which
    # it keeps anyway), so the forward writes only the product, in one pass over [B, n, d_ff].
    h = jax.checkpoint(functools.partial(_activate, cfg.mlp_activations))(*hidden)
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic=ctx.deterministic)
    return dense("wo", ff, d, ("mlp", "embed"))(h, ctx)


def _activate(activations: tuple[str, ...], *hidden: Array) -> Array:
  """The product of each projection's activation (gated for v1.1: gelu(wi_0 x) * (wi_1 x))."""
  return functools.reduce(jnp.multiply, [_ACTIVATIONS[a](h) for a, h in zip(activations, hidden)])


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # tanh approximation, as T5X (and HF's "gelu_new").
    "gelu_new": nn.gelu,
    "silu": nn.silu,
    "linear": lambda x: x,
}


class Attention(nn.Module):
  """Multi-head dot-product attention with the plug-ins' extra keys/values and logit terms.

  Self-attention in decode mode keeps `cached_key`/`cached_value` `[B, L, h, d_kv]` in the 'cache'
  collection; the stack passes the write position `cache_index` and its relative position table.
  """

  config: T5Config
  site: plugins.Site
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array], bias: Optional[Array],
               ctx: plugins.Context, q_positions: Array, k_positions: Array,
               cache_index: Optional[Array] = None,
               relpos: Optional[Callable[[Array, Array], Array]] = None) -> Array:
    """Attends `inputs_q [B, q, d]` to `inputs_kv [B, k, d]`.

    Args:
      mask: [B, 1, q, k] bool over sequence keys (None: all visible).
      bias: [1 or B, h, q, k] additive bias (relative positions), or None.
      q_positions / k_positions: [q] / [k] int positions, for the plug-ins' logit terms.
      cache_index: decode-mode write position (self-attention only); None otherwise.
      relpos: decode mode: `relpos(q_positions, k_positions) -> [1, h, q, k]` for the cached keys.
    Returns:
      [B, q, d].
    """
    cfg = self.config
    h, dk, d = cfg.num_heads, cfg.head_dim, cfg.emb_dim

    def dense(name, fin, fout, axes, **kw):
      return Dense(fout, axes, self.site.at(name, fin, fout), self.deltas, dtype=cfg.dtype, name=name, **kw)

    depth_scaling = np.sqrt(dk).astype(np.float32)
    query_init = lambda *a: default_kernel_init(*a) / depth_scaling
    q = dense("query", d, h * dk, ("embed", "joined_kv"), kernel_init=query_init)(inputs_q, ctx)
    k = dense("key", d, h * dk, ("embed", "joined_kv"))(inputs_kv, ctx)
    v = dense("value", d, h * dk, ("embed", "joined_kv"))(inputs_kv, ctx)
    split = lambda x: x.reshape(x.shape[:2] + (h, dk))
    q, k, v = split(q), split(k), split(v)
    q = constrain(q, ("batch", "length", "heads", "kv"))

    if ctx.decode and self.site.kind == "self_attention":
      k, v, mask, bias, k_positions = self._update_cache(k, v, mask, bias, q_positions, k_positions,
                                                         cache_index, relpos)

    logit_dtype = jnp.float32 if cfg.float32_attention_logits else cfg.dtype
    # The products run on head-major copies [B, h, n, d_kv]: XLA's CPU batched matmuls take several times
    # as long on the [B, n, h, d_kv] layout (its batch axes are not leading), and the two transposes are
    # cheap. The plug-in hooks still see q and k in their natural [B, n, h, d_kv] shapes.
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=logit_dtype)
    logits = logits.astype(logit_dtype)
    if mask is not None:
      logits = logits + jnp.where(mask, 0.0, NEG_INF).astype(logit_dtype)
    if bias is not None:
      logits = logits + bias.astype(logit_dtype)
    for module, delta_ctx in plugins.calls(self.deltas, "attention_logits", self.site, ctx):
      logits = logits + module(q, k, q_positions, k_positions, delta_ctx).astype(logit_dtype)

    extra_k, extra_v = plugins.extra_kv(self.deltas, self.site, q, ctx)
    if extra_k is not None:
      extra_logits = jnp.einsum("bhqd,bhld->bhql", qh, heads_first(extra_k).astype(q.dtype),
                                preferred_element_type=logit_dtype).astype(logit_dtype)
      logits = jnp.concatenate([extra_logits, logits], axis=-1)
      vh = jnp.concatenate([heads_first(extra_v).astype(v.dtype), vh], axis=2)

    # softmax(logits) @ v, normalized after the mixing: exp(logits - max) @ v / sum(exp(logits - max)).
    # The division then runs on [B, h, q, d_kv] instead of the weights [B, h, q, k], which saves passes
    # over the largest activation of the layer forward and backward (dropout commutes with the scaling).
    # The dropout mask is shared by all queries (T5X's `dot_product_attention` broadcasts it over q).
    unnormalized = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    denominator = jnp.sum(unnormalized, axis=-1)  # [B, h, q]
    weights = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(unnormalized.astype(cfg.dtype),
                                                                      deterministic=ctx.deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh.astype(cfg.dtype), preferred_element_type=logit_dtype)
    out = heads_first((out / denominator[..., None]).astype(cfg.dtype))  # [B, q, h, d_kv]
    out = out.reshape(out.shape[:2] + (h * dk,))
    return dense("out", h * dk, d, ("joined_kv", "embed"))(out, ctx)

  def _update_cache(self, k, v, mask, bias, q_positions, k_positions, cache_index, relpos):
    """Writes the new keys/values at `cache_index` and returns the whole cache with its mask and bias."""
    initializing = cache_index is None or not self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if initializing:  # The init call only sizes the cache: [B, L, h, d_kv] with L the full length.
      return k, v, mask, bias, k_positions
    length = cached_key.value.shape[1]
    start = (0, cache_index, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                                    start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value,
                                                      v.astype(cached_value.value.dtype), start)
    k_positions = jnp.arange(length, dtype=jnp.int32)
    causal = k_positions[None, :] <= q_positions[:, None]  # [q, L]
    return (cached_key.value, cached_value.value, causal[None, None], relpos(q_positions, k_positions),
            k_positions)
