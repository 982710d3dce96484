"""PyTorch's initializers and LayerNorm, for methods whose reference implementation is PyTorch code.

Kernels are stored `[in, out]` (torch's `nn.Linear.weight` is `[out, in]`), so `fan_in` is `shape[0]`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = Any
Initializer = Callable[[Array, tuple[int, ...]], Array]


def kaiming_uniform_sqrt5(rng: Array, shape: tuple[int, ...]) -> Array:
  """`nn.Linear`'s weight init, kaiming_uniform(a=sqrt(5)), for a kernel `[in, ...]`.

  With a = sqrt(5) the gain is sqrt(1/3) and the bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
  """
  return linear_uniform(shape[0])(rng, shape)


def linear_uniform(fan_in: int) -> Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): `nn.Linear`'s init of its weight and of its bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def zeros(rng: Array, shape: tuple[int, ...]) -> Array:
  del rng
  return jnp.zeros(shape, jnp.float32)


def ones(rng: Array, shape: tuple[int, ...]) -> Array:
  del rng
  return jnp.ones(shape, jnp.float32)


def bert_normal(rng: Array, shape: tuple[int, ...]) -> Array:
  """BERT's `init_bert_weights`: normal(0, 0.02) (He et al.'s `adapter_init_option='bert'`)."""
  return 0.02 * jax.random.normal(rng, shape, jnp.float32)


def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float = 1e-5) -> Array:
  """`nn.LayerNorm` over the last axis: (x - mean) / sqrt(biased var + eps) * scale + bias."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
