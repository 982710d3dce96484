"""Bottleneck adapters of He et al.'s unified view: Houlsby (sequential), parallel and scaled parallel.

All three act through the backbone's `sublayer(site)` hook, which hands a sublayer's normed input
`x_normed [B, n, d]` (the output of `pre_*_layer_norm`) and its output `y [B, n, d]` (before dropout and
the residual add) and takes back the new `y`:

| method                   | new y                                   | He et al.'s form                 |
|--------------------------|-----------------------------------------|----------------------------------|
| `HoulsbyAdapter`         | y + up(relu(down(y)))                   | sequential, h <- h + dh          |
| `ParallelAdapter`        | y + up(relu(down(x_normed)))            | parallel,   h <- h + dh          |
| `ScaledParallelAdapter`  | y + s * up(relu(down(x_normed)))        | parallel,   h <- h + s * dh      |

`down` is `[d, r]` and `up` is `[r, d]`, each with a bias (He et al.'s and Houlsby's adapters are
`nn.Linear` layers; `use_bias=False` gives the survey table's 2rd exactly). Initialization follows He et
al.'s code (`adapter_init_option="lora"`): `down` kaiming-uniform(a=sqrt(5)) like a PyTorch Linear,
`up` and both biases zero, so a fresh adapter is the identity and training starts at the backbone.

The parallel adapter reads the sublayer's *normed* input: T5 is pre-norm and the hook exposes the normed
input, which is what the sublayer itself reads. (He et al.'s mBART code feeds the un-normed residual
stream; that input is not part of the plug-in surface.)

Leaves live where the adapter acts, one module per sublayer, named `{site.kind}_{name}`:

```
peft/encoder/layers_i/attention_adapter/{down,up}/{kernel,bias}
peft/decoder/layers_i/{self_attention,cross_attention,mlp}_adapter/{down,up}/{kernel,bias}
peft/{encoder,decoder}/layers_i/mlp_adapter/down/kernel       [d, r]   ('prompt_embed', None)
                                           /down/bias         [r]      (None,)
                                           /up/kernel         [r, d]   (None, 'prompt_embed')
                                           /up/bias           [d]      ('prompt_embed',)
```

Logical axes: `prompt_embed` for d and None for r (PEFT leaves are replicated, decision 5). With
`num_tasks=N` every leaf gains a leading `tasks` axis and each example uses its task's adapter.
Parameters per adapted sublayer: 2rd + r + d (2rd without biases); the survey's table counts
2rd x 3 x L for attention (encoder self, decoder self, cross) and 2rd x 2 x L for FFN, L layers per stack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import plugins

Array = Any


def kaiming_uniform_sqrt5(rng: Array, shape: tuple[int, ...]) -> Array:
  """PyTorch's `nn.Linear` weight init, kaiming_uniform(a=sqrt(5)), for a kernel `[in, out]`.

  With a = sqrt(5) the gain is sqrt(1/3) and the bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
  """
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def zeros(rng: Array, shape: tuple[int, ...]) -> Array:
  del rng
  return jnp.zeros(shape, jnp.float32)


def bert_normal(rng: Array, shape: tuple[int, ...]) -> Array:
  """BERT's `init_bert_weights`: normal(0, 0.02) (He et al.'s `adapter_init_option='bert'`)."""
  return 0.02 * jax.random.normal(rng, shape, jnp.float32)


# `init` option -> (down kernel init, up kernel init); biases always start at zero.
INITS = {"lora": (kaiming_uniform_sqrt5, zeros), "bert": (bert_normal, bert_normal)}


class TaskDense(nn.Module):
  """x @ kernel (+ bias) with PEFT leaves, optionally one per task.

  Attributes:
    features: output size.
    axes: logical names of the kernel's (in, out) axes; the bias takes the second.
    kernel_init / bias_init: `init(rng, shape)`; called per task with `num_tasks`.
    use_bias: whether there is a bias.
    num_tasks: None (shared leaves) or N (leaves `[N, ...]`, gathered by `ctx.task_ids`).
  """

  features: int
  axes: tuple[str, str]
  kernel_init: Callable[..., Array] = kaiming_uniform_sqrt5
  bias_init: Callable[..., Array] = zeros
  use_bias: bool = True
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array, ctx: plugins.Context) -> Array:
    """x [B, n, in] -> [B, n, features], computed in x's dtype."""
    kernel = tasks_lib.peft_param(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                                  self.axes, self.num_tasks)
    kernel = jnp.asarray(kernel, x.dtype)
    if self.num_tasks is None:
      y = jnp.dot(x, kernel)
    else:
      y = jnp.einsum("bni,bio->bno", x, tasks_lib.per_example(kernel, ctx, self.num_tasks))
    if self.use_bias:
      bias = tasks_lib.peft_param(self, "bias", self.bias_init, (self.features,), self.axes[1:],
                                  self.num_tasks)
      bias = jnp.asarray(bias, x.dtype)
      if self.num_tasks is None:
        y = y + bias
      else:
        y = y + tasks_lib.per_example(bias, ctx, self.num_tasks)[:, None, :]
    return y


class AdapterModule(nn.Module):
  """One adapter at one sublayer: `down [d, r]`, ReLU, `up [r, d]` (zero-initialized), times `scale`.

  Attributes:
    bottleneck: r.
    parallel: False (Houlsby): the bottleneck reads the sublayer output y; True: its normed input.
    scale: s, multiplies the bottleneck's output.
    use_bias: biases on `down` and `up`.
    dropout_rate: dropout on the bottleneck activations (off when `ctx.deterministic`).
    num_tasks: None or N (see `TaskDense`).
    init_option: a key of `INITS` (not `init`, which would shadow `nn.Module.init`).
  """

  bottleneck: int
  parallel: bool = False
  scale: float = 1.0
  use_bias: bool = True
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  init_option: str = "lora"

  @nn.compact
  def __call__(self, residual: Array, x_normed: Array, y: Array, ctx: plugins.Context) -> Array:
    """x_normed, y [B, n, d] -> y + s * up(relu(down(x_normed if parallel else y))) [B, n, d]."""
    del residual
    x = x_normed if self.parallel else y
    d = y.shape[-1]
    down_init, up_init = INITS[self.init_option]
    h = TaskDense(self.bottleneck, ("prompt_embed", None), kernel_init=down_init,
                  use_bias=self.use_bias, num_tasks=self.num_tasks, name="down")(x, ctx)
    h = nn.relu(h)
    if self.dropout_rate:
      h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=ctx.deterministic)
    h = TaskDense(d, (None, "prompt_embed"), kernel_init=up_init, use_bias=self.use_bias,
                  num_tasks=self.num_tasks, name="up")(h, ctx)
    if self.scale != 1.0:
      h = h * jnp.asarray(self.scale, h.dtype)
    return y + jnp.asarray(h, y.dtype)

  def flops(self, counter, site: plugins.Site, rows: float, dep_x: float, dep_normed: float,
            dep_y: float) -> float:
    """FLOPs of `down` and `up` (`prompt_mix/flops.py`); dX of the bottleneck's input where it depends.
    Every output row depends."""
    del dep_x
    d = site.d_model
    dep_in = dep_normed if self.parallel else dep_y
    counter.matmul(f"{site.where}/adapter_down", "method", counter.batch, rows, d, self.bottleneck,
                   counter.rows(dep_in, rows), True)
    counter.matmul(f"{site.where}/adapter_up", "method", counter.batch, rows, self.bottleneck, d, rows,
                   True)
    return rows


@dataclasses.dataclass(frozen=True)
class _Adapter(plugins.Delta):
  """Shared options of the adapters (see the module docstring).

  Attributes:
    bottleneck: r, the bottleneck size.
    sublayers: where to act: any of 'attention' (encoder self, decoder self and cross),
      'self_attention', 'cross_attention', 'mlp' (see `selection`).
    stacks: 'encoder' and/or 'decoder'.
    layers: 'all', ('first', k), ('last', k) or layer indices of each selected stack (`selection`).
    scale: s, multiplies the adapter's output.
    use_bias: biases on `down` and `up` (He et al.'s adapters have them).
    dropout_rate: dropout inside the bottleneck.
    num_tasks: None for one adapter, N for a bank of N adapters selected per example by `task_ids`.
    name: the module is `{site.kind}_{name}`, e.g. `mlp_adapter`; change it to stack two adapters at
      the same sublayer.
    init: 'lora' (default; He et al.'s `adapter_init_option`): `down` kaiming-uniform(a=sqrt(5)), `up`
      zero, so the adapter starts as the identity; 'bert': both kernels normal(0, 0.02) (not the
      identity at init, but every leaf gets a gradient on the first step).
  """

  bottleneck: int = 64
  sublayers: Sequence[str] = ("attention", "mlp")
  stacks: Sequence[str] = selection.STACKS
  layers: selection.LayerSpec = selection.ALL
  scale: float = 1.0
  use_bias: bool = True
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  name: str = "adapter"
  init: str = "lora"

  parallel = False  # Class constant: which input feeds the bottleneck.

  def __post_init__(self):
    cls = type(self).__name__
    for field in ("sublayers", "stacks"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"{cls}.{field}"))
    object.__setattr__(self, "layers", selection.check_layers(self.layers, f"{cls}.layers"))
    selection.check_stacks(self.stacks, f"{cls}.stacks")
    object.__setattr__(self, "_kinds", selection.site_kinds(self.sublayers, f"{cls}.sublayers"))
    if self.bottleneck < 1:
      raise ValueError(f"{cls}.bottleneck must be >= 1, got {self.bottleneck}")
    if self.init not in INITS:
      raise ValueError(f"{cls}.init: unknown {self.init!r}; choose from {tuple(INITS)}")

  def sublayer(self, site: plugins.Site) -> Optional[nn.Module]:
    if not selection.selects(site, self.stacks, self.layers, self._kinds, f"{type(self).__name__}.layers"):
      return None
    return AdapterModule(self.bottleneck, self.parallel, self.scale, self.use_bias, self.dropout_rate,
                         self.num_tasks, self.init, name=f"{site.kind}_{self.name}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HoulsbyAdapter(_Adapter):
  """Sequential adapter after attention and FFN: y <- y + up(relu(down(y))) (Houlsby et al. 2019).

  Defaults to r = 64 after every attention and FFN (Houlsby et al.'s placement).
  """

  parallel = False


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ParallelAdapter(_Adapter):
  """Parallel adapter: y <- y + up(relu(down(x_normed))) (He et al. 2022).

  Defaults to the FFN with r = 512, where He et al. find it pays at a large budget (their "PA (ffn)").
  """

  bottleneck: int = 512
  sublayers: Sequence[str] = ("mlp",)
  parallel = True


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ScaledParallelAdapter(_Adapter):
  """Scaled parallel adapter: y <- y + s * up(relu(down(x_normed))).

  Defaults to MAM's FFN component: r = 512, s = 4, at the FFN.
  """

  bottleneck: int = 512
  sublayers: Sequence[str] = ("mlp",)
  scale: float = 4.0
  parallel = True


def adapter_param_count(d_model: int, bottleneck: int, num_sites: int, use_bias: bool = True) -> int:
  """Parameters of adapters at `num_sites` sublayers: (2rd + r + d) each, 2rd without biases."""
  per_site = 2 * bottleneck * d_model + (bottleneck + d_model if use_bias else 0)
  return per_site * num_sites
