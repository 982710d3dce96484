"""Multi-task PEFT leaves (docs/design.md, Multi-task by construction): a leading `tasks` axis gathered per example by `task_ids`.

A method declares its trainable leaves with `peft_param`. With `num_tasks=None` the leaf has its natural
shape and is shared by every example; with `num_tasks=N` it gains a leading `tasks` axis of size N and each
example of a batch uses row `task_ids[b]`. So one loaded backbone serves a bank of independently trained
prompts (stacked along `tasks`) in a single batch.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_mix.t5 import plugins

Array = Any
PEFT = "peft"  # The collection of trainable variables.


def peft_param(module: nn.Module, name: str, init: Callable[..., Array], shape: tuple[int, ...],
               axes: tuple[str, ...], num_tasks: Optional[int] = None,
               collection: str = PEFT) -> Array:
  """Declares a PEFT leaf in `collection` (with logical axis names) and returns its value.

  Args:
    init: `init(rng, shape) -> array`; with tasks it is called once per task, so every task starts from
      the same kind of initialization (e.g. sampled vocabulary rows, independently per task).
    shape / axes: the per-task shape and its logical axis names.
    num_tasks: None for a shared leaf, N for a `[N, *shape]` leaf with a leading 'tasks' axis.
  Returns:
    The stored value: `shape` or `[N, *shape]` (float32).
  """
  if len(axes) != len(shape):
    raise ValueError(f"{module.scope.path_text}/{name}: {len(axes)} axis names {axes} for shape {shape}")
  if num_tasks is None:
    full_init = lambda: init(module.make_rng("params"), shape)
    full_axes = axes
  else:
    if num_tasks < 1:
      raise ValueError(f"{module.scope.path_text}/{name}: num_tasks must be >= 1, got {num_tasks}")

    def full_init():
      rng = module.make_rng("params")
      rngs = jax.random.split(rng, num_tasks)
      return jnp.stack([init(r, shape) for r in rngs])

    full_axes = ("tasks",) + tuple(axes)
  var = module.variable(collection, name, lambda: nn.LogicallyPartitioned(full_init(), full_axes))
  return nn.unbox(var.value)


def per_example(value: Array, ctx: plugins.Context, num_tasks: Optional[int]) -> Array:
  """[*shape] or [N, *shape] -> [B, *shape]: broadcast a shared leaf, or gather each example's task row."""
  if num_tasks is None:
    return jnp.broadcast_to(value[None], (ctx.batch_size,) + value.shape)
  if ctx.task_ids is None:
    if num_tasks == 1:
      return jnp.broadcast_to(value, (ctx.batch_size,) + value.shape[1:])
    raise ValueError(f"A PEFT leaf has a tasks axis of size {num_tasks} but the batch has no 'task_ids'.")
  return jnp.take(value, ctx.task_ids, axis=0)
