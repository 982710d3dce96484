"""MAM adapter ("mix-and-match", He et al. 2022): prefix tuning at attention + scaled parallel adapter at FFN.

He et al.'s best unified-view variant: prefixes of length l = 30 at every attention (encoder self,
decoder self, cross), where a small budget suffices, and a scaled parallel adapter (r = 512, s = 4) at
every FFN, where capacity pays. Methods compose by being several deltas, so MAM is the tuple

```
(PrefixTuning(length=30), ScaledParallelAdapter(bottleneck=512, scale=4.0, sublayers=('mlp',)))
peft/<attention site>/prefix_tuning/...                  (see prefix_tuning.py)
peft/{encoder,decoder}/layers_i/mlp_adapter/{down,up}/{kernel,bias}
```

Parameters (survey table, flat prefixes, adapters without biases): 2 l d x 3 x L + 2 r d x 2 x L, L layers
per stack and h d_kv = d; the prefixes are reparameterized by an MLP during training by default (as Li &
Liang and He et al.), which `prefix_tuning.bake` folds into flat prefixes for inference.
"""

from __future__ import annotations

from typing import Optional

import gin

from prompt_mix.peft import adapters
from prompt_mix.peft import prefix_tuning


@gin.configurable
def mam_adapter(prefix_length: int = 30, bottleneck: int = 512, scale: float = 4.0,
                reparameterize: bool = True, prefix_mlp_hidden: int = 800,
                prefix_reparameterization: str = "shared", use_bias: bool = True,
                num_tasks: Optional[int] = None
                ) -> tuple[prefix_tuning.PrefixTuning, adapters.ScaledParallelAdapter]:
  """The MAM adapter's deltas: `(PrefixTuning, ScaledParallelAdapter)`.

  Args:
    prefix_length: l, prefix length at every attention (encoder self, decoder self, cross).
    bottleneck: r of the FFN adapters.
    scale: s of the FFN adapters.
    reparameterize: train the prefixes through an MLP (`PrefixTuning.reparameterize`).
    prefix_mlp_hidden: that MLP's hidden size (He et al.'s `mid_dim` 800).
    prefix_reparameterization: 'shared' (one MLP per attention kind, as He et al.) or 'per_site'.
    use_bias: biases in the adapters' down/up projections.
    num_tasks: None, or N for a bank of N MAM adapters selected per example by `task_ids`.
  Returns:
    The two deltas, to be passed together as the model's `deltas`.
  """
  prefix = prefix_tuning.PrefixTuning(length=prefix_length, attentions=("attention",),
                                      reparameterize=reparameterize, mlp_hidden=prefix_mlp_hidden,
                                      reparameterization=prefix_reparameterization,
                                      num_tasks=num_tasks)
  adapter = adapters.ScaledParallelAdapter(bottleneck=bottleneck, scale=scale, sublayers=("mlp",),
                                           use_bias=use_bias, num_tasks=num_tasks)
  return prefix, adapter
