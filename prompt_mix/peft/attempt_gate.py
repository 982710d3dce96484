"""ATTEMPT's attention module G and the input-prompt attention it computes (Asai et al., 2022, eq. 3).

For an input X [n, d] (frozen token embeddings, before any prompt) and candidate prompts P_1..P_c [m, d]:

```
x   = max over the non-padding positions of X                       [d]   (`pool_input`)
p_j = max over the m positions of P_j                               [d]   (`pool_prompts`)
z   = LayerNorm(W_up SiLU(W_down x))                                [d]   (`AttentionGate`)
a_j = softmax_j(p_j . z / T),  T = d * e by default                 [c]   (`attention`)
```

`AttentionGate` holds W_down [d, r], W_up [r, d] and a LayerNorm with scale and bias (PyTorch's
`nn.LayerNorm`, eps 1e-5, as the original code uses): 2rd + 2d trainable values, declared in `peft`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_mix.peft import tasks
from prompt_mix.peft import torch_compat

Array = Any
GATE_NAME = "attention_gate"  # The gate's subtree in `peft`: a per-group learning rate selects it by name.


def default_temperature(d: int) -> float:
  """The original's softmax temperature T = d * e."""
  return d * math.e


def pool_input(embedded: Array, mask: Array, unmasked: bool = False) -> Array:
  """Max over positions, per feature: [B, n, d] -> [B, d] (float32).

  Args:
    embedded: [B, n, d] token embeddings.
    mask: [B, n] True at real tokens.
    unmasked: True takes the max over all n positions, padding embeddings included (the original ATTEMPT
      code pads every input to a fixed length and pools over it). False (default) pools over the
      non-padding positions only; an all-padding row gives zeros.
  """
  embedded = jnp.asarray(embedded, jnp.float32)
  if unmasked:
    return jnp.max(embedded, axis=1)
  mask = jnp.asarray(mask, bool)
  pooled = jnp.max(jnp.where(mask[:, :, None], embedded, -jnp.inf), axis=1)
  return jnp.where(jnp.any(mask, axis=1)[:, None], pooled, 0.0)


def pool_prompts(prompts: Array) -> Array:
  """Max over the prompt positions, per feature: [..., m, d] -> [..., d]."""
  return jnp.max(jnp.asarray(prompts, jnp.float32), axis=-2)


def attention(scores: Array, temperature: float, axis: int = -1) -> Array:
  """softmax(scores / T) along `axis` (float32)."""
  return jax.nn.softmax(jnp.asarray(scores, jnp.float32) / temperature, axis=axis)


class AttentionGate(nn.Module):
  """G: projects the pooled input into prompt space, z = LayerNorm(W_up SiLU(W_down x)).

  Leaves (under this module's scope `.../attention_gate/`):
    w_down            [d, r]  ('prompt_embed', None)   in `peft`
    w_up              [r, d]  (None, 'prompt_embed')   in `peft`
    layer_norm_scale  [d]     ('prompt_embed',)        initialized to ones, in `layer_norm_collection`
    layer_norm_bias   [d]     ('prompt_embed',)        initialized to zeros, likewise

  Attributes:
    bottleneck: r (100 in the paper).
    init_std: W_down and W_up start as N(0, init_std^2) (the original initializes its linear layers with
      std 0.01).
    epsilon: the LayerNorm epsilon (PyTorch's default 1e-5).
    layer_norm_collection: `peft` (trained: the paper counts the LayerNorm in G's parameters) or a frozen
      collection (the original code trains only W_down and W_up: its LayerNorm keeps its initial or
      loaded values).
  """

  bottleneck: int = 100
  init_std: float = 0.01
  epsilon: float = 1e-5
  layer_norm_collection: str = tasks.PEFT

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, d] -> z [B, d] (float32)."""
    d, r = x.shape[-1], self.bottleneck
    if r < 1:
      raise ValueError(f"{self.scope.path_text}: bottleneck must be >= 1, got {r}")
    normal = lambda rng, shape: self.init_std * jax.random.normal(rng, shape, jnp.float32)
    w_down = tasks.peft_param(self, "w_down", normal, (d, r), ("prompt_embed", None))
    w_up = tasks.peft_param(self, "w_up", normal, (r, d), (None, "prompt_embed"))
    scale = tasks.peft_param(self, "layer_norm_scale", torch_compat.ones, (d,), ("prompt_embed",),
                             collection=self.layer_norm_collection)
    bias = tasks.peft_param(self, "layer_norm_bias", torch_compat.zeros, (d,), ("prompt_embed",),
                            collection=self.layer_norm_collection)
    h = nn.silu(jnp.asarray(x, jnp.float32) @ w_down)
    return torch_compat.layer_norm(h @ w_up, scale, bias, self.epsilon)


def gate_param_count(d: int, r: int, train_layer_norm: bool = True) -> int:
  """Trainable values of G: W_down + W_up (+ LayerNorm scale and bias) = 2rd (+ 2d)."""
  return 2 * r * d + (2 * d if train_layer_norm else 0)


def validate_temperature(temperature: Optional[float], what: str) -> None:
  if temperature is not None and not temperature > 0:
    raise ValueError(f"{what}: temperature must be > 0 (or None for d * e), got {temperature!r}")
