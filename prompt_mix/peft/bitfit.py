"""BitFit (Ben Zaken et al. 2021): train only biases. T5 has none, so BitFit adds zero-initialized ones.

Through the wrapping `projection` hook, a bias `[out]` is added to the output of every targeted dense
layer, layer norm and the output layer. The default is the BitFit baseline of the ATTEMPT and Compacter
papers (their code unfreezes every `.bias` of a T5 whose dense layers and layer norms carry biases, and
the LM head's bias): 202,752 dense biases + 47,616 layer-norm biases + 32,128 LM-head biases = 282,496 on
T5 v1.0 base. `targets` takes names or groups of names:

| group          | names                                                                                   |
|----------------|-----------------------------------------------------------------------------------------|
| 'dense'        | attention `query, key, value, out`; MLP `wi` or `wi_0, wi_1`, `wo`; `logits_dense` (v1.1)  |
| 'layer_norm'   | `pre_attention_layer_norm`, `pre_self_attention_layer_norm`, `pre_cross_attention_layer_norm`, `pre_mlp_layer_norm`, `encoder_norm`, `decoder_norm` |
| 'lm_head'      | the output layer: `logits_dense` (v1.1) or the tied `logits` (v1.0: x E^T / sqrt(d) + b)  |

`targets=('dense',)` is the dense-only BitFit (this library's earlier default: 202,752 on T5-base). Names
absent from the backbone (`wi` on v1.1, `logits_dense` on v1.0) simply do not occur. Zero-initialized,
so training starts exactly at the backbone. Leaves live under what they wrap:

```
peft/encoder/layers_i/attention/{query,key,value,out}/bitfit/bias       [out]  (None,)
peft/decoder/layers_i/{self_attention,encoder_decoder_attention}/{query,key,value,out}/bitfit/bias
peft/{encoder,decoder}/layers_i/mlp/{wi | wi_0,wi_1, wo}/bitfit/bias
peft/{encoder,decoder}/layers_i/pre_*_layer_norm/bitfit/bias             [d]
peft/encoder/encoder_norm/bitfit/bias, peft/decoder/decoder_norm/bitfit/bias
peft/decoder/logits_dense/bitfit/bias (v1.1) or peft/decoder/bitfit/bias (v1.0)   [vocab]
```

Parameters = the sum of the output sizes of everything targeted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from prompt_mix.peft import lora as lora_lib
from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.peft import torch_compat
from prompt_mix.t5 import plugins

Array = Any


class BiasModule(nn.Module):
  """A bias `[out]` (zero-initialized) added to the output of the projection or norm it wraps.

  Attributes:
    features: the output size (the site's `out_features`).
    num_tasks: None, or N for one bias per task.
  """

  features: int
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array, y: Array, ctx: plugins.Context) -> Array:
    """x [B, n, in], y [B, n, out] -> y + bias."""
    del x
    bias = tasks_lib.peft_param(self, "bias", torch_compat.zeros, (self.features,), (None,), self.num_tasks)
    bias = jnp.asarray(bias, y.dtype)
    if self.num_tasks is not None:
      bias = tasks_lib.per_example(bias, ctx, self.num_tasks)[:, None, :]
    return y + bias

  def flops(self, counter, site: plugins.Site, rows: float, dep_x: float, dep_y: float) -> float:
    """A bias adds no matmul (`prompt_mix/flops.py`), but every output row now depends on it."""
    del counter, site, dep_x, dep_y
    return rows


GROUPS = {
    "dense": lora_lib.PROJECTIONS,
    "layer_norm": tuple(dict.fromkeys(plugins.PRE_NORMS.values())) + tuple(plugins.FINAL_NORMS.values()),
    "lm_head": ("logits_dense", "logits"),
}
NAMES = tuple(dict.fromkeys(n for names in GROUPS.values() for n in names))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BitFit(plugins.Delta):
  """Zero-initialized biases on dense layers, layer norms and the output layer.

  Attributes:
    targets: names and/or groups ('dense', 'layer_norm', 'lm_head'; module docstring). Default: all three
      groups, the ATTEMPT/Compacter baseline; ('dense',) is dense layers only.
    stacks: 'encoder' and/or 'decoder'.
    num_tasks: None, or N for a bank of N bias sets selected per example by `task_ids`.
    name: the module's name under what it wraps (`.../query/<name>/bias`).
  """

  targets: Sequence[str] = tuple(GROUPS)
  stacks: Sequence[str] = selection.STACKS
  num_tasks: Optional[int] = None
  name: str = "bitfit"

  def __post_init__(self):
    for field in ("targets", "stacks"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"BitFit.{field}"))
    selection.check_names(self.targets, tuple(GROUPS) + NAMES, "BitFit.targets")
    selection.check_stacks(self.stacks, "BitFit.stacks")
    names = frozenset(n for t in self.targets for n in GROUPS.get(t, (t,)))
    object.__setattr__(self, "_names", names)

  def projection(self, site: plugins.Site) -> Optional[nn.Module]:
    if site.projection not in self._names or site.stack not in self.stacks:
      return None
    return BiasModule(site.out_features, self.num_tasks, name=self.name)
