"""The training loop of `prompt_mix.train`: T5X's `train` for a frozen backbone and a trainable method.

One jitted step updates the trainable collection (docs/design.md, Variables) on a `('data','model')` mesh; the
data come from SeqIO; every `checkpoint_period` steps the trainable state, the optimizer state, the step
and the data position are saved atomically with Orbax, and a restarted run resumes from the latest save
with the same data order. Evaluation runs every `eval_period` steps through SeqIO's evaluator.

What keeps a run honest (docs/reliability.md): numeric settings are checked first; the backbone is
recorded at the first start and a resume on another one is refused (`run_record`); the state about to be
saved is checked for NaN/inf, so no non-finite checkpoint is ever written; the method's frozen
collections (e.g. ATTEMPT's source prompts) are saved with every checkpoint and restored from it on
resume; each start keeps its own copy of the gin config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from prompt_mix import gin_utils
from prompt_mix import partitioning
from prompt_mix.data import buckets as buckets_lib
from prompt_mix.data import feature_converter as feature_converter_lib
from prompt_mix.peft import report as report_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import checkpointing
from prompt_mix.training import evaluation
from prompt_mix.training import finite
from prompt_mix.training import optimizers
from prompt_mix.training import run_record
from prompt_mix.training import settings
from prompt_mix.training import setup
from prompt_mix.training import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or the state to be saved became NaN or infinite; the last good checkpoint is kept."""


def train_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  converter: seqio.FeatureConverter, seed: int, skip_batches: int = 0,
                  split: str = "train", shard: Optional[seqio.ShardInfo] = None,
                  length_buckets: Optional[buckets_lib.LengthBuckets] = None,
                  agree: Optional[Callable[[np.ndarray], np.ndarray]] = None):
  """An endless iterator of numpy model batches for this host, starting after `skip_batches`.

  Deterministic for a given seed, so skipping the batches already trained on resumes the stream exactly.
  With length buckets (`length_buckets`, default the gin-configured `LengthBuckets()`), examples are
  grouped by length within windows and each batch is padded to its bucket (`prompt_mix.data.buckets`);
  all hosts agree on each batch's lengths through `agree` (default: the maximum over processes).

  Args:
    shard: this host's shard of the data (default `partitioning.host_shard_info()`).
  """
  shard = shard or partitioning.host_shard_info()
  if batch_size % shard.num_shards:
    raise ValueError(f"BATCH_SIZE {batch_size} is not divisible by the {shard.num_shards} hosts")
  local_batch = batch_size // shard.num_shards
  length_buckets = length_buckets or buckets_lib.LengthBuckets()
  buckets = length_buckets.resolve(task_feature_lengths)
  task = seqio.get_mixture_or_task(mixture_or_task_name)
  ds = task.get_dataset(sequence_length=dict(task_feature_lengths), split=split, shuffle=True,
                        seed=seed, num_epochs=None, shard_info=shard, use_cached=False)
  ds = converter(ds, dict(task_feature_lengths))
  if buckets is None:
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    ds = buckets_lib.group_by_length(ds, local_batch, length_buckets.window_batches, seed)
  if skip_batches:
    ds = ds.skip(skip_batches)
  batches = ds.prefetch(2).as_numpy_iterator()
  if buckets is None:
    return batches
  logging.info("Length buckets: inputs %s, targets %s", list(buckets.inputs), list(buckets.targets))
  return buckets_lib.BucketedBatches(batches, buckets, agree)


def _batch_shardings(mesh, batch: Mapping[str, np.ndarray]):
  return {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(partitioning.DATA_AXIS))
          for k in batch}


@gin.configurable
def train(model_dir: str = gin.REQUIRED,
          model: model_lib.EncoderDecoderModel = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          initial_checkpoint_path: Optional[str] = None,
          random_init_backbone: bool = False,
          optimizer: Optional[optax.GradientTransformation] = None,
          eval_period: Optional[int] = None,
          eval_mixture_or_task_name: Optional[str] = None,
          eval_split: str = "validation",
          eval_batch_size: Optional[int] = None,
          checkpoint_period: Optional[int] = None,
          keep_checkpoints: int = 3,
          best_metric: Optional[str] = None,
          best_mode: str = "max",
          num_partitions: int = 1,
          seed: int = 0,
          log_period: int = 10,
          task_names: Optional[Sequence[str]] = None,
          dropout: bool = True,
          stop_after_steps: Optional[int] = None,
          keep_eval_outputs: Optional[int] = 5) -> dict:
  """Trains the method of `model` on `mixture_or_task_name`; returns the final metrics.

  Args:
    model_dir: where checkpoints, TensorBoard summaries, the gin config and eval outputs go.
    model: the backbone config and the method (`EncoderDecoderModel.deltas = %DELTAS`).
    initial_checkpoint_path: the frozen backbone (T5X msgpack/Orbax or an HF directory).
    random_init_backbone: start from random backbone weights on purpose (toy backbones only).
    optimizer: an optax transformation (default `optimizers.make_optimizer()`: T5X's Adafactor, 0.3).
    eval_period: evaluate every this many steps (and at the end); None: no evaluation.
    eval_mixture_or_task_name: what to evaluate on; defaults to `mixture_or_task_name`.
    best_metric: '<task>/<metric>' (as SeqIO reports it) whose best checkpoint is kept.
    task_names: local task order for `task_ids` (ATTEMPT-m / prompt banks with a `tasks` axis).
    stop_after_steps: end this process after that many steps of this run (resumable; for tests).
    keep_eval_outputs: per-step evaluation files (predictions, metrics, attention) of this many latest
      evaluated steps are kept under `<model_dir>/eval`; None keeps all.
  """
  _check_settings(train_steps=train_steps, batch_size=batch_size, eval_period=eval_period,
                  eval_batch_size=eval_batch_size, checkpoint_period=checkpoint_period,
                  keep_checkpoints=keep_checkpoints, num_partitions=num_partitions, seed=seed,
                  log_period=log_period, stop_after_steps=stop_after_steps,
                  keep_eval_outputs=keep_eval_outputs, task_feature_lengths=task_feature_lengths)
  os.makedirs(model_dir, exist_ok=True)
  mesh = partitioning.make_mesh(num_partitions)
  rules = partitioning.standard_logical_axis_rules()
  task_names = setup.resolve_task_names(model, mixture_or_task_name, task_names)
  converter = feature_converter_lib.TaskIdEncDecFeatureConverter(task_names=task_names)
  shapes = feature_converter_lib.model_input_shapes(task_feature_lengths, batch_size)
  init_batch = setup.dummy_batch(shapes)
  rng = jax.random.PRNGKey(seed)
  init_rng, dropout_rng = jax.random.split(rng)

  params = setup.load_backbone_params(model, initial_checkpoint_path, random_init_backbone, init_batch)
  backbone = run_record.make_record(model.config, params, initial_checkpoint_path, random_init_backbone)
  run = setup.build_variables(model, params, init_rng, init_batch, mesh, rules)
  del params
  logging.info("Trainable parameters:\n%s", report_lib.format_report(
      _variables(model, run.trainable, run.frozen), model.trains_backbone))

  tx = optimizer or optimizers.make_optimizer(total_steps=train_steps)
  opt_shardings = partitioning.optimizer_state_shardings(tx, run.trainable_boxed, mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(run.trainable)

  manager = checkpointing.TrainingCheckpointManager(
      os.path.join(model_dir, "checkpoints"), max_to_keep=keep_checkpoints, best_metric=best_metric,
      best_mode=best_mode)
  run_record.check_or_record(model_dir, backbone, manager.latest_step() is not None)
  abstract_state = {
      "peft": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                     run.trainable),
      "opt_state": jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt_state),
      "data_state": {"batches": 0},
      "frozen": _abstract(setup.method_collections(run.frozen)),
  }
  restored, start_step = manager.restore_latest(abstract_state)
  trainable = run.trainable
  if restored is not None:
    trainable, opt_state = restored["peft"], restored["opt_state"]
    run = _with_saved_frozen(run, restored.get("frozen"), start_step)
    logging.info("Resumed from step %d (%s)", start_step, manager.directory)
  start_step = start_step or 0
  skip = int(restored["data_state"]["batches"]) if restored is not None else 0  # One batch per step.
  saved_extras = _saved_extras(model, run)

  gin_utils.write_gin_config(model_dir, start_step=start_step)

  step_fn = step_lib.make_train_step(model, tx)
  batch_sharding = None
  jitted = None
  evaluator = None
  if eval_period:
    evaluator = evaluation.Evaluator(
        model, eval_mixture_or_task_name or mixture_or_task_name, converter, task_feature_lengths,
        split=eval_split, batch_size=eval_batch_size or batch_size,
        log_dir=os.path.join(model_dir, EVAL_DIR), keep_outputs=keep_eval_outputs)
  writer = _metric_writer(model_dir)
  buckets_lib.check_model(model, buckets_lib.LengthBuckets().resolve(task_feature_lengths), training=True)
  data = train_dataset(mixture_or_task_name, task_feature_lengths, batch_size, converter, seed, skip)
  tokens, tick_tokens = 0, 0  # Padded tokens of the global batches so far (buckets vary the length).

  metrics: dict[str, Any] = {}
  tick, tick_step = time.time(), start_step
  end_step = train_steps if stop_after_steps is None else min(train_steps, start_step + stop_after_steps)
  step = start_step
  for step in range(start_step + 1, end_step + 1):
    batch = next(data)
    model.check_task_ids(batch)
    tokens += jax.process_count() * (batch["encoder_input_tokens"].size
                                     + batch["decoder_target_tokens"].size)
    if jitted is None:
      batch_sharding = _batch_shardings(mesh, batch)
      jitted = jax.jit(step_fn, in_shardings=(run.trainable_shardings, opt_shardings,
                                              run.frozen_shardings, batch_sharding, None),
                       out_shardings=(run.trainable_shardings, opt_shardings, None, None),
                       donate_argnums=(0, 1))
    device_batch = partitioning.shard_batch(batch, mesh)
    step_rng = jax.random.fold_in(dropout_rng, step) if dropout else None
    trainable, opt_state, loss, aux = jitted(trainable, opt_state, run.frozen, device_batch, step_rng)

    must_save = bool(checkpoint_period and step % checkpoint_period == 0) or step == end_step
    if step % log_period == 0 or must_save or step == start_step + 1:
      # The NaN guard: checked whenever the host syncs anyway, and always before a save, so a
      # non-finite state is never written and the last good checkpoint stays the latest.
      loss_value, grad_norm = float(loss), float(aux["grad_norm"])
      if not (np.isfinite(loss_value) and np.isfinite(grad_norm)):
        _close_on_error(manager)
        raise NonFiniteLossError(
            f"Loss {loss_value} / gradient norm {grad_norm} at step {step}: stopping. "
            f"{_last_good(manager)}; lower the learning rate or enable clipping "
            "(make_optimizer.clip_grad_norm).")
      now = time.time()
      steps_per_sec = (step - tick_step) / max(now - tick, 1e-9)
      tokens_per_sec = (tokens - tick_tokens) / max(now - tick, 1e-9)
      scalars = {"loss": loss_value, "z_loss": float(aux["z_loss"]), "grad_norm": grad_norm,
                 "steps_per_sec": steps_per_sec, "tokens_per_sec": tokens_per_sec,
                 **_learning_rate_scalars(tx, step)}
      writer.write_scalars(step, scalars)
      logging.info("step %d/%d loss %.4f | %.2f steps/s, %.0f tokens/s, ETA %.0fs", step, train_steps,
                   loss_value, steps_per_sec, scalars["tokens_per_sec"],
                   (train_steps - step) / max(steps_per_sec, 1e-9))
      metrics.update(scalars)
      if step == start_step + 1:
        metrics["first_loss"] = loss_value  # This run's first step: how far the loss fell.
      tick, tick_step, tick_tokens = now, step, tokens

    eval_metrics = None
    if evaluator is not None and (step % eval_period == 0 or step == train_steps):
      eval_metrics = evaluator.evaluate(_variables(model, trainable, run.frozen), step)
      writer.write_scalars(step, {k: v for k, v in eval_metrics.items() if _is_number(v)})
      metrics.update(eval_metrics)
    if must_save:
      _check_state_to_save(trainable, opt_state, step, manager)
      save_metrics = None
      if best_metric:  # Steps saved without an evaluation rank last.
        worst = float("-inf") if best_mode == "max" else float("inf")
        save_metrics = {best_metric: (eval_metrics or {}).get(best_metric, worst)}
      manager.save(step, {"peft": trainable, "opt_state": opt_state, "step": step,
                          "data_state": {"batches": step}, **saved_extras}, metrics=save_metrics)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  metrics["step"] = step
  if jax.process_index() == 0:  # One writer (all processes hold the same global values).
    gin_utils.write_text_atomically(os.path.join(model_dir, "train_metrics.json"), json.dumps(
        {k: v for k, v in metrics.items() if _is_number(v)}, indent=2), "the training metrics")
  return metrics


EVAL_DIR = "eval"  # Where evaluations during training go: the same place as the eval binary's.


def _check_settings(task_feature_lengths, **counts) -> None:
  """One-line errors naming a bad numeric setting (`TRAIN_STEPS=-5`, `BATCH_SIZE=0`, `'ten'`, 4.5)."""
  optional = {"eval_period", "eval_batch_size", "checkpoint_period", "stop_after_steps", "keep_eval_outputs"}
  for name, value in counts.items():
    settings.integer(value, "train", name, minimum=0 if name == "seed" else 1, allow_none=name in optional)
  settings.feature_lengths(task_feature_lengths, "train")


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _saved_extras(model, run: setup.RunVariables) -> dict:
  """What each checkpoint carries beyond the trainable state: the frozen method collections and the
  variable specs that let eval/infer/export rebuild them without their source (setup.restore_trained)."""
  methods = setup.method_collections(run.frozen)
  boxed = {setup.trainable_name(model): run.trainable_boxed,
           **setup.method_collections(run.frozen_boxed or {})}
  return {"frozen": methods, "variable_specs": setup.variable_specs(boxed)}


def _with_saved_frozen(run: setup.RunVariables, saved: Optional[dict], step: int) -> setup.RunVariables:
  """`run` with its frozen method collections replaced by the ones saved with checkpoint `step`.

  A resume keeps training with what the run started with, even when the source (a prompt library) changed
  since; the change is logged. A checkpoint of an older version (nothing saved) keeps the source's values.
  """
  methods = setup.method_collections(run.frozen)
  if not methods:
    return run
  if saved is None:
    logging.warning("Checkpoint step %d predates saved frozen collections: %s come from their source "
                    "(e.g. the prompt library) as it is now", step, sorted(methods))
    return run
  changed = [name for name in methods if _differs(methods[name], saved[name])]
  if changed:
    logging.warning("The source of %s changed since this run started (e.g. a prompt library entry was "
                    "overwritten); training continues with the values saved in checkpoint step %d",
                    changed, step)
  return dataclasses.replace(run, frozen={**run.frozen, **saved})


def _differs(a, b) -> bool:
  """Whether two trees differ in structure, shapes or any value (compared on device)."""
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    return True
  if any(x.shape != y.shape for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))):
    return True
  equal = jax.jit(lambda x, y: jnp.all(jnp.stack([jnp.array_equal(u, v) for u, v in zip(
      jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y))])))(a, b)
  return not bool(equal)


def _last_good(manager: checkpointing.TrainingCheckpointManager) -> str:
  latest = manager.latest_step()
  if latest is None:
    return f"No checkpoint was saved yet in {manager.directory}"
  return f"The last good checkpoint (step {latest}) is kept in {manager.directory}"


def _check_state_to_save(trainable, opt_state, step: int,
                         manager: checkpointing.TrainingCheckpointManager) -> None:
  """The NaN guard on what is saved: the updated trainable state and the optimizer state (the loss of a
  step comes from the weights before its update, so it cannot vouch for them)."""
  bad = {**finite.nonfinite_counts(trainable, "trainable/"), **finite.nonfinite_counts(opt_state, "opt_state/")}
  if bad:
    _close_on_error(manager)
    raise NonFiniteLossError(
        f"The state after step {step} holds NaN or infinite values; it is not saved. {_last_good(manager)}; "
        f"lower the learning rate or enable clipping (make_optimizer.clip_grad_norm):\n{finite.describe(bad)}")


def _close_on_error(manager: checkpointing.TrainingCheckpointManager) -> None:
  """Closes the checkpoint manager before a fatal error leaves the loop (its background threads and event
  loop otherwise die at interpreter exit, printing a traceback after the FATAL line)."""
  try:
    manager.wait_until_finished()
    manager.close()
  except Exception:  # pylint: disable=broad-except  # The error being raised matters more.
    logging.exception("Closing the checkpoint manager failed")


def _variables(model, trainable, frozen) -> dict:
  return model_lib.merge_trainable(trainable, frozen, model.trains_backbone)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def _learning_rate_scalars(tx, step: int) -> dict[str, float]:
  """{'learning_rate': ..., 'learning_rate/<group>': ...}: the rates step `step` (1-based) applied.

  Known for optimizers from `optimizers.make_optimizer` (which say their schedules); empty for others.
  """
  rates = getattr(tx, "learning_rates", None)
  if rates is None:
    return {}
  return {"learning_rate" if group == "default" else f"learning_rate/{group}": rate
          for group, rate in rates(step - 1).items()}  # optax counts updates from 0.


def _metric_writer(model_dir: str):
  # Not clu's default writer: TensorFlow's summary ops keep memory on every call (summary_writer.py).
  from prompt_mix.training import summary_writer  # pylint: disable=g-import-not-at-top
  return summary_writer.create_writer(model_dir, just_logging=jax.process_index() > 0)
