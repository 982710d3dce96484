"""Checks every PEFT method must pass, on a tiny backbone (imported by the per-method test files).

Each check runs real code: the model's loss, the library's train step with optax, cached decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import step as step_lib

VOCAB = 40


def tiny_config(**overrides) -> config_lib.T5Config:
  """The 'tiny' preset with a small vocabulary and no dropout (fast, deterministic)."""
  return config_lib.preset("tiny", vocab_size=VOCAB, dropout_rate=0.0, **overrides)


def make_model(deltas, **overrides) -> model_lib.EncoderDecoderModel:
  return model_lib.EncoderDecoderModel(tiny_config(**overrides), tuple(deltas), z_loss=0.0)


def make_batch(batch_size=4, inputs=6, targets=3, task_ids=None, seed=0) -> dict:
  """Random tokens in [2, VOCAB) with some padding; targets end in EOS (1)."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (batch_size, inputs))
  enc[0, inputs - 2:] = 0
  tgt = rng.randint(2, VOCAB, (batch_size, targets))
  tgt[:, -1] = 1
  dec_in = np.concatenate([np.zeros((batch_size, 1), int), tgt[:, :-1]], axis=1)
  batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
               decoder_loss_weights=(tgt > 0).astype(np.float32))
  if task_ids is not None:
    batch["task_ids"] = np.asarray(task_ids, np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def jit_init(model, batch) -> dict:
  """All variables of `model`, initialized by a jitted init (faster than eager on these tiny shapes)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))


def tiny_library(path, names=("a", "b"), shape=(3, 8)) -> str:
  """A prompt library at `path` holding random N(0, 1) prompts of `shape` named `names`; returns its path."""
  from prompt_mix.attempt import library as library_lib  # pylint: disable=g-import-not-at-top
  lib = library_lib.PromptLibrary(path)
  rng = np.random.RandomState(0)
  for name in names:
    lib.add(name, rng.normal(size=shape).astype(np.float32), backbone="tiny", task=name)
  return lib.path


def init(model, batch, seed=0) -> dict:
  import flax.linen as nn
  return nn.unbox(model.init(jax.random.PRNGKey(seed), batch))


def train(model, variables, batch, steps, learning_rate=0.05):
  """Runs `steps` Adam steps of the library's train step; returns (variables, losses)."""
  trainable, frozen = model_lib.split_trainable(variables, model.trains_backbone)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(trainable)
  step = jax.jit(step_lib.make_train_step(model, optimizer))
  losses = []
  for i in range(steps):
    trainable, opt_state, loss, _ = step(trainable, opt_state, frozen, batch, None)
    losses.append(float(loss))
  return model_lib.merge_trainable(trainable, frozen, model.trains_backbone), losses


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def check_step_trains_only_method(deltas, batch=None):
  """After one step the backbone is bit-identical (unless full FT) and every method leaf changed."""
  model = make_model(deltas)
  batch = batch or make_batch()
  variables = init(model, batch)
  assert "peft" in variables or model.trains_backbone, "the method declared no trainable leaves"
  trainable_before, _ = model_lib.split_trainable(variables, model.trains_backbone)
  new, _ = train(model, variables, batch, steps=1)
  if not model.trains_backbone:
    assert _leaves_equal(variables["params"], new["params"]), "the backbone changed"
  for name in variables:
    if name not in ("params", "peft"):
      assert _leaves_equal(variables[name], new[name]), f"frozen collection {name!r} changed"
  trainable_after, _ = model_lib.split_trainable(new, model.trains_backbone)
  before, after = model_lib.flatten(trainable_before), model_lib.flatten(trainable_after)
  assert before.keys() == after.keys()
  unchanged = [k for k in before if np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
  assert not unchanged, f"trainable leaves that did not change after a step: {unchanged}"
  return variables, new


def check_cached_equals_uncached(deltas, batch=None, variables=None, length=5, **overrides):
  """Greedy cached decoding agrees with teacher-forced full forwards on the decoded tokens.

  `overrides` change the tiny backbone's config (e.g. depths, heads).
  """
  model = make_model(deltas, **overrides)
  batch = batch or make_batch()
  if variables is None:
    variables = init(model, batch)
    # Perturb the method's leaves so zero-initialized deltas (LoRA B, adapters) are not no-ops.
    if "peft" in variables:
      leaves, tree = jax.tree_util.tree_flatten(variables["peft"])
      keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
      leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
      variables = dict(variables, peft=jax.tree_util.tree_unflatten(tree, leaves))
  dec_batch = dict(batch, decoder_input_tokens=jnp.zeros((batch["encoder_input_tokens"].shape[0], length),
                                                         jnp.int32))
  predictions, aux = model.predict_batch(variables, dec_batch, decoder="greedy")
  predictions = np.asarray(predictions)
  targets = predictions.copy()
  dec_in = np.concatenate([np.zeros((targets.shape[0], 1), int), targets[:, :-1]], axis=1)
  # Cached decoding sees every decoded position, even a decoded pad id 0; so must the full forward
  # (its padding mask reads decoder_target_tokens > 0), hence the non-zero stand-in for the mask.
  full = dict(batch, decoder_input_tokens=jnp.asarray(dec_in),
              decoder_target_tokens=jnp.asarray(np.where(targets == 0, 2, targets)))
  logits = np.asarray(model.logits(variables, full))
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  for b in range(targets.shape[0]):
    # Positions up to and including the first EOS were decoded; the full forward must agree there.
    eos = np.where(targets[b] == 1)[0]
    stop = eos[0] + 1 if len(eos) else targets.shape[1]
    np.testing.assert_array_equal(np.argmax(logits[b, :stop], -1), targets[b, :stop])
    score = sum(log_probs[b, i, targets[b, i]] for i in range(stop))
    np.testing.assert_allclose(float(aux["scores"][b]), score, rtol=1e-4, atol=1e-4)
  return predictions


def check_mixed_task_equals_task_by_task(deltas, num_tasks, batch_size=4):
  """A batch mixing tasks gives, per example, what a single-task batch of that task gives."""
  model = make_model(deltas)
  task_ids = np.arange(batch_size) % num_tasks
  batch = make_batch(batch_size, task_ids=task_ids)
  variables = init(model, batch)
  leaves, tree = jax.tree_util.tree_flatten(variables["peft"])
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  variables = dict(variables, peft=jax.tree_util.tree_unflatten(tree, leaves))
  mixed = np.asarray(model.logits(variables, batch))
  for t in range(num_tasks):
    single = dict(batch, task_ids=jnp.full((batch_size,), t, jnp.int32))
    logits = np.asarray(model.logits(variables, single))
    rows = task_ids == t
    np.testing.assert_allclose(mixed[rows], logits[rows], rtol=1e-5, atol=1e-5)
  return variables


def synthetic_task_batch(batch_size=16, inputs=6, seed=0) -> dict:
  """A learnable task for a frozen random backbone: the target is a fixed function of the first token."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (batch_size, inputs))
  label = 2 + (enc[:, 0] % 3)  # Three classes, read off the first input token.
  tgt = np.stack([label, np.ones_like(label)], axis=1)
  dec_in = np.concatenate([np.zeros((batch_size, 1), int), tgt[:, :-1]], axis=1)
  return {k: jnp.asarray(v) for k, v in dict(
      encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
      decoder_loss_weights=np.ones(tgt.shape, np.float32)).items()}


def check_loss_goes_down(deltas, steps=40, learning_rate=0.05, ratio=0.5, **overrides):
  """The method alone (backbone frozen) fits a small synthetic task: final loss < ratio * initial.

  `overrides` change the tiny backbone's config (a wider d lets short prompts carry a task).
  """
  model = make_model(deltas, **overrides)
  batch = synthetic_task_batch()
  variables = init(model, batch)
  _, losses = train(model, variables, batch, steps=steps, learning_rate=learning_rate)
  assert np.isfinite(losses).all(), losses
  assert losses[-1] < ratio * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (need < {ratio}x)"
  return losses


# A small T5 v1.1-style backbone for parity tests against HF transformers / PEFT (untied, gated GELU).
HF_VOCAB = 64
HF_CONFIG = config_lib.T5Config(
    vocab_size=HF_VOCAB, emb_dim=16, num_heads=4, head_dim=6, mlp_dim=32, num_encoder_layers=2,
    num_decoder_layers=3, mlp_activations=("gelu", "linear"), logits_via_embedding=False,
    dropout_rate=0.0)


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_logits(model, enc, dec_in, *, without_adapter: bool = False) -> np.ndarray:
  """A PyTorch (PEFT) T5's logits [B, t, V] for int token arrays enc [B, n], dec_in [B, t] (0 = padding);
  `without_adapter`: the backbone alone (`disable_adapter`)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  context = model.disable_adapter() if without_adapter else contextlib.nullcontext()
  with torch.no_grad(), context:
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
