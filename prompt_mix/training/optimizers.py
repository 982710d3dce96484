"""Optimizers for the trainable collection: Adafactor as T5X uses it for prompts, AdamW as ATTEMPT does.

`make_optimizer` is what gin binds. Learning-rate schedules have a linear warmup followed by a constant,
linear, cosine or inverse-square-root decay; parameter groups (selected by a regular expression on the
leaf path, e.g. ATTEMPT's `attention_gate`) may have their own learning rate.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import flax
import gin
import jax.numpy as jnp
import optax

from prompt_mix.training import settings

DECAYS = ("constant", "linear", "cosine", "rsqrt")


@gin.configurable
def make_schedule(learning_rate: float, warmup_steps: int = 0, decay: str = "constant",
                  total_steps: Optional[int] = None, end_value: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay` until `total_steps`."""
  if decay not in DECAYS:
    raise ValueError(f"make_schedule: decay {decay!r} is not one of {DECAYS}")
  if decay in ("linear", "cosine") and not total_steps:
    raise ValueError(f"make_schedule: decay {decay!r} needs total_steps (TRAIN_STEPS)")
  decay_steps = max((total_steps or 0) - warmup_steps, 1)
  if decay == "constant":
    after = optax.constant_schedule(learning_rate)
  elif decay == "linear":
    after = optax.linear_schedule(learning_rate, end_value, decay_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_value / learning_rate
                                        if learning_rate else 0.0)
  else:  # T5's rsqrt: lr * sqrt(warmup) / sqrt(step) after warmup.
    base = max(warmup_steps, 1)
    after = lambda step: learning_rate * jnp.sqrt(base / jnp.maximum(step + base, base))
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _base(name: str, schedule: optax.Schedule, weight_decay: float,
          adafactor_decay_rate: float, multiply_by_parameter_scale: bool,
          adafactor_clipping_threshold: Optional[float]) -> optax.GradientTransformation:
  if name == "adafactor":
    # T5X prompt tuning: Adafactor with a constant 0.3, decay rate 0.8, no parameter scaling.
    return optax.adafactor(learning_rate=schedule, decay_rate=adafactor_decay_rate,
                           multiply_by_parameter_scale=multiply_by_parameter_scale,
                           clipping_threshold=adafactor_clipping_threshold,
                           weight_decay_rate=weight_decay or None)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  if name == "adam":
    return optax.adam(schedule)
  if name == "sgd":
    return optax.sgd(schedule)
  raise ValueError(f"make_optimizer: unknown optimizer {name!r} (adafactor, adamw, adam, sgd)")


class ScheduledTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that can also say its learning rates, for the training summaries.

  `learning_rates(count)` -> {group: rate} of the update number `count` (0 for the first update, as optax
  counts); the group is 'default' or a regex of `group_learning_rates`. (A NamedTuple subclass without
  `__slots__`, so an instance can carry the attribute; optax sees an ordinary transformation.)
  """


@gin.configurable
def make_optimizer(name: str = "adafactor", learning_rate: float = 0.3, warmup_steps: int = 0,
                   decay: str = "constant", total_steps: Optional[int] = None,
                   weight_decay: float = 0.0, clip_grad_norm: Optional[float] = None,
                   group_learning_rates: Optional[Mapping[str, float]] = None,
                   adafactor_decay_rate: float = 0.8, multiply_by_parameter_scale: bool = False,
                   adafactor_clipping_threshold: Optional[float] = 1.0
                   ) -> optax.GradientTransformation:
  """The optimizer of the trainable collection.

  Args:
    name: 'adafactor' (T5X), 'adamw' (ATTEMPT's code), 'adam' or 'sgd'.
    group_learning_rates: {regex: learning rate}; a leaf whose '/'-joined path matches a regex (first
      match wins) gets that rate with the same schedule shape, e.g. {'attention_gate': 0.1}.
    clip_grad_norm: clip the global gradient norm before the update.
  Returns:
    A `ScheduledTransformation`: `tx.learning_rates(count)` gives each group's rate (the trainer logs it).
  """
  settings.number(learning_rate, "make_optimizer", "learning_rate")
  settings.integer(warmup_steps, "make_optimizer", "warmup_steps", minimum=0)
  if total_steps is not None:  # Bound to TRAIN_STEPS, which gin evaluates before `train` checks it.
    settings.integer(total_steps, "make_optimizer", "total_steps")
  schedules = {}

  def tx_for(group, lr):
    schedules[group] = make_schedule(lr, warmup_steps, decay, total_steps)
    return _base(name, schedules[group], weight_decay, adafactor_decay_rate, multiply_by_parameter_scale,
                 adafactor_clipping_threshold)

  groups = dict(group_learning_rates or {})
  if groups:
    transforms = {"default": tx_for("default", learning_rate),
                  **{p: tx_for(p, lr) for p, lr in groups.items()}}
    labels = lambda tree: flax.traverse_util.unflatten_dict(group_of_each_leaf(tree, groups), sep="/")
    tx = optax.multi_transform(transforms, labels)
  else:
    tx = tx_for("default", learning_rate)
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  tx = optax.with_extra_args_support(tx)
  scheduled = ScheduledTransformation(tx.init, tx.update)
  scheduled.learning_rates = lambda count: {group: float(fn(count)) for group, fn in schedules.items()}
  return scheduled


def group_of_each_leaf(tree: Any, group_learning_rates: Mapping[str, float]) -> dict[str, str]:
  """{'a/b/leaf': the first matching regex of `group_learning_rates`, or 'default'}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {path: next((p for p in group_learning_rates if re.search(p, path)), "default")
          for path in flat}
