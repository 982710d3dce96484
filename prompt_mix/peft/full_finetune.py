"""Full fine-tuning, the baseline: the whole backbone is trainable (docs/design.md, Variables).

`FullFineTune` plugs nothing into the backbone; it only sets `trains_backbone`, so
`model.split_trainable` hands the trainer the `params` collection (the T5X `target` tree) instead of
`peft`: gradients, optimizer state and training checkpoints then cover every backbone weight.
Parameters per task: all of the backbone's (222,903,552 for T5 v1.0 base).
"""

from __future__ import annotations

import dataclasses

import gin

from prompt_mix.t5 import plugins


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FullFineTune(plugins.Delta):
  """Trains the backbone itself; composes with other deltas (their `peft` leaves then stay frozen)."""

  trains_backbone = True
