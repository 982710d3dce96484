"""Bottleneck adapters of He et al.'s unified view: Houlsby (sequential), parallel and scaled parallel.

All three act through the backbone's `sublayer(site)` hook, which hands a pre-norm block's residual input
`x [B, n, d]`, its normed input `x_normed` (the output of `pre_*_layer_norm`) and its output `y` after the
block's dropout, and takes back the `y` that is added to the residual stream:

| method                   | new y                                   | He et al.'s form                 |
|--------------------------|-----------------------------------------|----------------------------------|
| `HoulsbyAdapter`         | y + up(relu(down(LN?(y))))              | sequential, h <- h + dh          |
| `ParallelAdapter`        | y + up(relu(down(LN?(x))))              | parallel,   h <- h + dh          |
| `ScaledParallelAdapter`  | y + s * up(relu(down(LN?(x))))          | parallel,   h <- h + s * dh      |

As in He et al.'s code and AdapterHub: the adapter's output is added after the block's dropout, the
adapter has its own dropout inside the bottleneck (after the ReLU, `dropout_rate`), and it may normalize
its input with its own LayerNorm (`layer_norm='in'`: PyTorch's `nn.LayerNorm`, scale and bias, eps 1e-5;
He et al.'s `adapter_layernorm_option`; their runs use 'none', the default). The parallel adapter reads the
block's residual input `x` as He et al.'s (pre-norm) mBART does; `parallel_input='normed'` feeds it the
normed input the block itself reads instead.

`down` is `[d, r]` and `up` is `[r, d]`, each with a bias (He et al.'s and Houlsby's adapters are
`nn.Linear` layers; `use_bias=False` gives the survey table's 2rd exactly). Initialization follows He et
al.'s `adapter_init_option`: 'bert' for the Houlsby adapter (their Houlsby runs: both kernels
normal(0, 0.02), biases zero), 'lora' for the parallel ones (`down` kaiming-uniform(a=sqrt(5)) like a
PyTorch Linear, `up` and both biases zero, so a fresh adapter is the identity).

Leaves live where the adapter acts, one module per sublayer, named `{site.kind}_{name}`:

```
peft/encoder/layers_i/attention_adapter/{down,up}/{kernel,bias}
peft/decoder/layers_i/{self_attention,cross_attention,mlp}_adapter/{down,up}/{kernel,bias}
peft/{encoder,decoder}/layers_i/mlp_adapter/down/kernel       [d, r]   ('prompt_embed', None)
                                           /down/bias         [r]      (None,)
                                           /up/kernel         [r, d]   (None, 'prompt_embed')
                                           /up/bias           [d]      ('prompt_embed',)
```

Logical axes: `prompt_embed` for d and None for r (PEFT leaves are replicated, docs/design.md, Partitioning). With
`num_tasks=N` every leaf gains a leading `tasks` axis and each example uses its task's adapter.
Parameters per adapted sublayer: 2rd + r + d (2rd without biases; + 2d with `layer_norm='in'`, whose
`layer_norm/{scale,bias}` live beside `down` and `up`); the survey's table counts
2rd x 3 x L for attention (encoder self, decoder self, cross) and 2rd x 2 x L for FFN, L layers per stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from prompt_mix.peft import selection
from prompt_mix.peft import torch_compat
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import plugins

Array = Any


# `init` option -> (down kernel init, up kernel init); biases always start at zero.
INITS = {"lora": (torch_compat.kaiming_uniform_sqrt5, torch_compat.zeros),
         "bert": (torch_compat.bert_normal, torch_compat.bert_normal)}
LAYER_NORMS = ("none", "in")
PARALLEL_INPUTS = ("residual", "normed")


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
  kernel_init: Callable[..., Array] = torch_compat.kaiming_uniform_sqrt5
  bias_init: Callable[..., Array] = torch_compat.zeros
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
  """One adapter at one sublayer: (LN,) `down [d, r]`, ReLU, dropout, `up [r, d]`, times `scale`.

  Attributes:
    bottleneck: r.
    parallel: False (Houlsby): the bottleneck reads the block's output y; True: its input.
    parallel_input: 'residual' (the block's residual input x, He et al.) or 'normed' (its normed input).
    scale: s, multiplies the bottleneck's output.
    use_bias: biases on `down` and `up`.
    layer_norm: 'none', or 'in' for a LayerNorm (scale and bias) on the adapter's input.
    dropout_rate: dropout on the bottleneck activations (off when `ctx.deterministic`).
    num_tasks: None or N (see `TaskDense`).
    init_option: a key of `INITS` (not `init`, which would shadow `nn.Module.init`).
  """

  bottleneck: int
  parallel: bool = False
  parallel_input: str = "residual"
  scale: float = 1.0
  use_bias: bool = True
  layer_norm: str = "none"
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  init_option: str = "lora"

  @nn.compact
  def __call__(self, residual: Array, x_normed: Array, y: Array, ctx: plugins.Context) -> Array:
    """residual, x_normed, y [B, n, d] -> y + s * up(drop(relu(down(LN?(input))))) [B, n, d]."""
    if self.parallel:
      x = residual if self.parallel_input == "residual" else x_normed
    else:
      x = y
    d = y.shape[-1]
    if self.layer_norm == "in":
      scale = tasks_lib.peft_param(self, "layer_norm_scale", torch_compat.ones, (d,), ("prompt_embed",),
                                   self.num_tasks)
      bias = tasks_lib.peft_param(self, "layer_norm_bias", torch_compat.zeros, (d,), ("prompt_embed",),
                                  self.num_tasks)
      if self.num_tasks is not None:
        scale = tasks_lib.per_example(scale, ctx, self.num_tasks)[:, None, :]
        bias = tasks_lib.per_example(bias, ctx, self.num_tasks)[:, None, :]
      x = torch_compat.layer_norm(jnp.asarray(x, jnp.float32), scale, bias).astype(x.dtype)
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
    dropout_rate: dropout inside the bottleneck (after the ReLU).
    layer_norm: 'none' or 'in' (a LayerNorm with scale and bias on the adapter's input).
    parallel_input: for the parallel adapters, 'residual' (the block's residual input, He et al.) or
      'normed' (the block's normed input).
    num_tasks: None for one adapter, N for a bank of N adapters selected per example by `task_ids`.
    name: the module is `{site.kind}_{name}`, e.g. `mlp_adapter`; change it to stack two adapters at
      the same sublayer.
    init: He et al.'s `adapter_init_option`: 'bert' (both kernels normal(0, 0.02): not the identity at
      init, every leaf gets a gradient on the first step) or 'lora' (`down` kaiming-uniform(a=sqrt(5)),
      `up` zero: the adapter starts as the identity). Houlsby defaults to 'bert', the parallel adapters
      to 'lora', as He et al.'s runs.
  """

  bottleneck: int = 64
  sublayers: Sequence[str] = ("attention", "mlp")
  stacks: Sequence[str] = selection.STACKS
  layers: selection.LayerSpec = selection.ALL
  scale: float = 1.0
  use_bias: bool = True
  dropout_rate: float = 0.0
  layer_norm: str = "none"
  parallel_input: str = "residual"
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
    if self.layer_norm not in LAYER_NORMS:
      raise ValueError(f"{cls}.layer_norm: unknown {self.layer_norm!r}; choose from {LAYER_NORMS}")
    if self.parallel_input not in PARALLEL_INPUTS:
      raise ValueError(f"{cls}.parallel_input: unknown {self.parallel_input!r}; choose from {PARALLEL_INPUTS}")

  def sublayer(self, site: plugins.Site) -> Optional[nn.Module]:
    if not selection.selects(site, self.stacks, self.layers, self._kinds, f"{type(self).__name__}.layers"):
      return None
    return AdapterModule(self.bottleneck, self.parallel, self.parallel_input, self.scale, self.use_bias,
                         self.layer_norm, self.dropout_rate, self.num_tasks, self.init,
                         name=f"{site.kind}_{self.name}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HoulsbyAdapter(_Adapter):
  """Sequential adapter after attention and FFN: y <- y + up(relu(down(y))) (Houlsby et al. 2019).

  Defaults to r = 64 after every attention and FFN (Houlsby et al.'s placement), 'bert' init (He et al.).
  """

  init: str = "bert"
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
