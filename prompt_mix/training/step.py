"""One optimization step on the trainable collection only (docs/design.md, Variables).

Gradients are taken with respect to `peft` (or, for full fine-tuning, `params`) and nothing else, so XLA
never computes weight gradients of the frozen backbone: a prompt-tuning step costs about two forwards.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from prompt_mix.t5 import model as model_lib

Array = Any


def make_train_step(model: model_lib.EncoderDecoderModel, optimizer: optax.GradientTransformation
                    ) -> Callable:
  """Returns `step(trainable, opt_state, frozen, batch, dropout_rng) -> (trainable, opt_state, loss, aux)`.

  `frozen` holds every other collection (the backbone `params`, frozen method values); it is read, never
  differentiated. Jit the result (donating `trainable` and `opt_state` where the caller allows).
  """
  trains_backbone = model.trains_backbone

  def step(trainable, opt_state, frozen: Mapping[str, Any], batch: Mapping[str, Array], dropout_rng):
    def loss_fn(tr):
      variables = model_lib.merge_trainable(tr, frozen, trains_backbone)
      return model.loss_fn(variables, batch, dropout_rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    aux = dict(aux, grad_norm=optax.tree.norm(grads))
    return trainable, opt_state, loss, aux

  return step
