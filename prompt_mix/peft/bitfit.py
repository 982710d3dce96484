"""BitFit (Ben Zaken et al. 2021): train only biases. T5 has none, so BitFit adds zero-initialized ones.

Through the `projection(site, name)` hook, every dense layer of the backbone gets a bias `[out]` added to
its output: attention `query, key, value, out`, MLP `wi` or `wi_0, wi_1` and `wo`, and the untied v1.1
output layer `logits_dense`. Zero-initialized, so training starts exactly at the backbone.

Only dense layers get a bias, as the spec says: T5's RMS layer norm has a scale and no bias (and no
centering), so there is no norm bias to free, and the tied v1.0 output layer (logits against the
embedding) is not a dense layer and gets none. Leaves live under the projection:

```
peft/encoder/layers_i/attention/{query,key,value,out}/bitfit/bias       [out]  (None,)
peft/decoder/layers_i/{self_attention,encoder_decoder_attention}/{query,key,value,out}/bitfit/bias
peft/{encoder,decoder}/layers_i/mlp/{wi | wi_0,wi_1, wo}/bitfit/bias
peft/decoder/logits_dense/bitfit/bias                                     [vocab] (v1.1 only)
```

Parameters = the sum of the output sizes of all selected dense layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from prompt_mix.peft import adapters
from prompt_mix.peft import lora as lora_lib
from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
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
    bias = tasks_lib.peft_param(self, "bias", adapters.zeros, (self.features,), (None,), self.num_tasks)
    bias = jnp.asarray(bias, y.dtype)
    if self.num_tasks is not None:
      bias = tasks_lib.per_example(bias, ctx, self.num_tasks)[:, None, :]
    return y + bias

  def flops(self, counter, site: plugins.Site, rows: float, dep_x: float, dep_y: float) -> float:
    """A bias adds no matmul (`prompt_mix/flops.py`), but every output row now depends on it."""
    del counter, site, dep_x, dep_y
    return rows


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BitFit(plugins.Delta):
  """Zero-initialized biases on dense layers.

  Attributes:
    targets: projection names (default: all of `lora.PROJECTIONS`; names absent from the backbone,
      e.g. `wi` on v1.1 or `logits_dense` on v1.0, simply do not occur).
    stacks: 'encoder' and/or 'decoder'.
    num_tasks: None, or N for a bank of N bias sets selected per example by `task_ids`.
    name: the module's name under each projection (`.../query/<name>/bias`).
  """

  targets: Sequence[str] = lora_lib.PROJECTIONS
  stacks: Sequence[str] = selection.STACKS
  num_tasks: Optional[int] = None
  name: str = "bitfit"

  def __post_init__(self):
    for field in ("targets", "stacks"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"BitFit.{field}"))
    selection.check_names(self.targets, lora_lib.PROJECTIONS, "BitFit.targets")
    selection.check_stacks(self.stacks, "BitFit.stacks")

  def projection(self, site: plugins.Site) -> Optional[nn.Module]:
    if site.projection not in self.targets or site.stack not in self.stacks:
      return None
    return BiasModule(site.out_features, self.num_tasks, name=self.name)
