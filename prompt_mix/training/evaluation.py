"""Evaluation through SeqIO's evaluator: generation (greedy/beam) and scoring (rank classification).

`evaluate` is what `python -m prompt_mix.eval` runs; `Evaluator` is also used during training.

SeqIO asks for `predict_fn` (tasks with `metric_fns` on decoded text) and `score_fn` (tasks with
`score_metric_fns`, e.g. the rank-classification variants); both run jitted model calls over the
evaluator's enumerated, cached datasets. Every value a method sows per example into `intermediates`
(`[B, ...]`, e.g. ATTEMPT's attention weights) is averaged per task and handed to each delta's
`write_evaluation` hook, which writes the method's own artefacts and returns scalars to log.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_mix import partitioning
from prompt_mix.data import buckets as buckets_lib
from prompt_mix.data import feature_converter as feature_converter_lib
from prompt_mix.data import option_batches
from prompt_mix.data import task_ids as task_ids_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import settings
from prompt_mix.training import setup

INFERENCE_DIR = "inference_eval"  # SeqIO's JSONLogger output under the evaluator's log_dir.
# Files written once per evaluated step: ours under log_dir, SeqIO's predictions under inference_eval/.
# SeqIO's `<task>-metrics.jsonl` (one line appended per evaluation) is kept whole: it is the history.
_PER_STEP_FILES = (re.compile(r"^eval_metrics_(\d+)\.json$"), re.compile(r"^attention_(\d+)\.json$"))
_PER_STEP_PREDICTIONS = re.compile(r"^.+-(\d{6,})\.jsonl$")


def rotate_outputs(log_dir: str, keep: int) -> list[str]:
  """Deletes the per-step evaluation files of all but the `keep` latest evaluated steps; returns them.

  Per-step files are `eval_metrics_<step>.json`, `attention_<step>.json` and SeqIO's predictions
  `inference_eval/<task>-<step>.jsonl`; the metric histories (`inference_eval/<task>-metrics.jsonl`,
  TensorBoard) are never touched. Keeps disk use bounded over long runs, as checkpoints are.
  """
  found: dict[int, list[str]] = {}
  places = ((log_dir, _PER_STEP_FILES), (os.path.join(log_dir, INFERENCE_DIR), (_PER_STEP_PREDICTIONS,)))
  for directory, patterns in places:
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      for pattern in patterns:
        match = pattern.match(name)
        if match:
          found.setdefault(int(match.group(1)), []).append(os.path.join(directory, name))
  removed = []
  for step in sorted(found)[:-keep]:
    for path in found[step]:
      try:
        os.remove(path)
        removed.append(path)
      except FileNotFoundError:  # Another process rotated it first.
        pass
  if removed:
    logging.info("Removed %d evaluation files of steps older than the %d latest", len(removed), keep)
  return removed


def pad_batch(features: Mapping[str, np.ndarray], batch_size: int) -> dict:
  """Pads a short last batch to the jitted shape by repeating its last row (dropped afterwards)."""
  n = len(next(iter(features.values())))
  if n == batch_size:
    return dict(features)
  return {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in features.items()}


def per_example_intermediates(intermediates: Any, batch_size: int) -> dict[str, np.ndarray]:
  """{path: [B, ...] array} of every value sown per example into an `intermediates` tree.

  Flax keeps sown values as tuples; a path sown several times gets the mean of its values. Values whose
  leading axis is not the batch are not per-example and are left out.
  """
  found: dict[str, list] = {}

  def visit(tree, path):
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        visit(value, path + (str(key),))
    elif isinstance(tree, (tuple, list)):
      for value in tree:
        visit(value, path)
    elif hasattr(tree, "shape") and np.ndim(tree) >= 1 and np.shape(tree)[0] == batch_size:
      found.setdefault("/".join(path), []).append(np.asarray(tree, np.float64))

  visit(intermediates, ())
  return {path: np.mean(values, axis=0) for path, values in found.items()}


class TaskMeans:
  """Running per-task means of per-example arrays: `add(path, task_ids [n], values [n, ...])`."""

  def __init__(self):
    self._sums: dict[str, dict[int, list]] = {}

  def add(self, path: str, task_ids: np.ndarray, values: np.ndarray) -> None:
    for task, value in zip(np.asarray(task_ids).reshape(-1), values):
      entry = self._sums.setdefault(path, {}).setdefault(int(task), [0.0, 0])
      entry[0] = entry[0] + value
      entry[1] += 1

  def means(self, task_name) -> dict[str, dict[str, np.ndarray]]:
    """{path: {task_name(id): mean}}, tasks in id order."""
    return {path: {task_name(t): total / n for t, (total, n) in sorted(by_task.items())}
            for path, by_task in self._sums.items()}


def materialize(ds) -> tuple[np.ndarray, dict]:
  """An enumerated dataset of (index, features) -> (indices [N], features {name: [N, ...]})."""
  indices, parts = [], {}
  for index, features in ds.batch(1024).as_numpy_iterator():
    indices.append(index)
    for key, value in features.items():
      parts.setdefault(key, []).append(value)
  if not indices:
    return np.zeros([0], np.int64), {}
  return np.concatenate(indices), {k: np.concatenate(v) for k, v in parts.items()}


class Evaluator:
  """SeqIO evaluation of a model's variables on a task or mixture.

  Args:
    model: the model (its method included).
    mixture_or_task_name: what to evaluate.
    converter: the feature converter (it carries `task_ids`).
    task_feature_lengths: {'inputs': n, 'targets': t}.
    split: the evaluation split.
    batch_size: examples per jitted call (option rows per call when scoring).
    log_dir: SeqIO writes per-task predictions and metrics under `<log_dir>/inference_eval`.
    decoder / num_decodes / alpha: generation settings of `predict_batch`.
    num_examples: cap on examples per task (None: all).
    length_buckets: default the gin-configured `buckets.LengthBuckets()`; with buckets on, examples are
      sorted by length and each batch is trimmed to its bucket (generation keeps the full target length
      as its decoding length).
    encode_once: score the rows that share an input (the label words of a rank-classification example)
      with one encoder pass per input (`model.score_options`); False scores every row in full
      (`score_batch`), as T5X does. The scores are the same.
    keep_outputs: keep the per-step files of this many latest evaluated steps (`rotate_outputs`); None
      keeps all.
  """

  def __init__(self, model: model_lib.EncoderDecoderModel, mixture_or_task_name: str,
               converter: seqio.FeatureConverter, task_feature_lengths: Mapping[str, int],
               split: str = "validation", batch_size: int = 32, log_dir: Optional[str] = None,
               decoder: str = "greedy", num_decodes: int = 4, alpha: float = 0.6,
               num_examples: Optional[int] = None,
               length_buckets: Optional[buckets_lib.LengthBuckets] = None, encode_once: bool = True,
               keep_outputs: Optional[int] = None):
    self.model = model
    self.keep_outputs = keep_outputs
    self._converter = converter
    self.batch_size = batch_size
    self.log_dir = log_dir
    self.buckets = (length_buckets or buckets_lib.LengthBuckets()).resolve(task_feature_lengths)
    buckets_lib.check_model(model, self.buckets)
    self.encode_once = encode_once
    loggers = (seqio.PyLoggingLogger, seqio.JSONLogger) if log_dir else ()  # SeqIO's need a log_dir.
    if log_dir:
      os.makedirs(os.path.join(log_dir, INFERENCE_DIR), exist_ok=True)
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name, converter, eval_split=split, sequence_length=dict(task_feature_lengths),
        num_examples=num_examples, logger_cls=loggers,
        log_dir=os.path.join(log_dir, INFERENCE_DIR) if log_dir else None,
        async_compute_metrics=False)
    self._predict = jax.jit(lambda v, b: model.predict_batch(
        v, b, decoder=decoder, num_decodes=num_decodes, alpha=alpha))
    self._score = jax.jit(model.score_batch)
    self._score_options = jax.jit(model.score_options)
    # The last evaluation's per-task means of what the method sowed per example: {path: {task: mean}}.
    self.last_means: dict[str, dict[str, np.ndarray]] = {}
    self._materialized: dict[int, tuple[Any, tuple]] = {}  # id(dataset) -> (dataset, materialize(it))

  def _materialize(self, ds) -> tuple:
    """`materialize(ds)` of one of SeqIO's evaluation datasets, read once.

    SeqIO hands the same cached dataset object (one per task) to every evaluation. Iterating it again each
    time through TF grew the process's memory by about 50 KB per evaluation; its numpy features are kept
    instead (the evaluation split's features, e.g. about 25 MB for 10k examples of 512 + 128 tokens).
    """
    entry = self._materialized.get(id(ds))
    if entry is None or entry[0] is not ds:
      entry = (ds, materialize(ds))
      self._materialized[id(ds)] = entry
    return entry[1]

  def _order(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(features.values()))) if features else 0
    return buckets_lib.sort_by_length(features) if self.buckets and n else np.arange(n)

  def predict_rows(self, variables: Mapping[str, Any], ds,
                   sown: Optional["TaskMeans"] = None) -> list[tuple[int, list[int]]]:
    """[(index, predicted tokens)] of an enumerated model dataset (SeqIO's `predict_fn`).

    `sown` accumulates the per-task means of what the method sows per example, when given.
    """
    indices, features = self._materialize(ds)
    order = self._order(features)
    out = []
    for start in range(0, len(order), self.batch_size):
      chosen = order[start:start + self.batch_size]
      n = len(chosen)
      batch = buckets_lib.trim_batch({k: v[chosen] for k, v in features.items()}, self.buckets,
                                     targets=False)
      batch = pad_batch(batch, self.batch_size)
      self.model.check_task_ids(batch)
      tokens, aux = self._predict(variables, {k: jnp.asarray(v) for k, v in batch.items()})
      tokens = np.asarray(tokens)[:n]
      for i, row in zip(indices[chosen], tokens):
        out.append((int(i), row.tolist()))  # Full rows (SeqIO stacks them; its decode stops at EOS).
      if sown is None:
        continue
      task_ids = batch.get("task_ids", np.zeros(len(tokens), np.int32))[:n]
      for path, values in per_example_intermediates(aux["intermediates"], self.batch_size).items():
        sown.add(path, task_ids, values[:n])
    return out

  def score_rows(self, variables: Mapping[str, Any], ds) -> list[tuple[int, float]]:
    """[(index, log-likelihood of the row's target)] of an enumerated model dataset (SeqIO's `score_fn`)."""
    indices, features = self._materialize(ds)
    if not len(indices):
      return []
    out = []
    if not self.encode_once:
      order = self._order(features)
      for start in range(0, len(order), self.batch_size):
        chosen = order[start:start + self.batch_size]
        batch = buckets_lib.trim_batch({k: v[chosen] for k, v in features.items()}, self.buckets)
        batch = pad_batch(batch, self.batch_size)
        self.model.check_task_ids(batch)
        scores = np.asarray(self._score(variables, {k: jnp.asarray(v) for k, v in batch.items()}))
        out.extend((int(i), float(s)) for i, s in zip(indices[chosen], scores[:len(chosen)]))
      return out
    groups = option_batches.group_rows(features)
    lengths = buckets_lib.token_lengths(features["encoder_input_tokens"]) if self.buckets else None
    plan = option_batches.plan_calls(groups, self.batch_size, lengths)
    for call in plan.calls:
      batch, rows = option_batches.call_batch(features, call, plan, self.buckets)
      self.model.check_task_ids(batch)
      scores = np.asarray(self._score_options(variables, {k: jnp.asarray(v) for k, v in batch.items()}))
      out.extend((int(i), float(s)) for i, s in zip(indices[rows], scores[:len(rows)]))
    return out

  def evaluate(self, variables: Mapping[str, Any], step: int) -> dict[str, float]:
    """Runs the evaluation; returns {'<task>/<metric>': value} and the method's evaluation scalars."""
    sown = TaskMeans()

    def predict_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      return self.predict_rows(variables, ds, sown)

    def score_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      return self.score_rows(variables, ds)

    all_metrics, _ = self._evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                              score_fn=score_fn)
    results = all_metrics.result() or {}
    flat = {}
    for task, task_metrics in results.items():
      for name, value in task_metrics.items():
        value = getattr(value, "value", value)  # clu metric values
        if isinstance(value, (int, float, np.floating, np.integer)):
          flat[f"{task}/{name}"] = float(value)
    self.last_means = sown.means(self._task_name)
    if self.last_means:
      directory = self.log_dir if jax.process_index() == 0 else None  # One writer of the artefacts.
      for delta in self.model.deltas:
        flat.update(delta.write_evaluation(self.last_means, directory, step))
    logging.info("Evaluation at step %d: %s", step, flat)
    if self.log_dir and jax.process_index() == 0:  # One writer: every process holds the same metrics.
      with open(os.path.join(self.log_dir, f"eval_metrics_{step}.json"), "w") as f:
        json.dump(flat, f, indent=2)
      if self.keep_outputs:
        rotate_outputs(self.log_dir, self.keep_outputs)
    return flat

  def _task_name(self, task_id: int) -> str:
    local = getattr(self._converter, "task_names", None)
    return local[task_id] if local else task_ids_lib.task_name(task_id)


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED,
             model: model_lib.EncoderDecoderModel = gin.REQUIRED,
             mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             initial_checkpoint_path: Optional[str] = None,
             random_init_backbone: bool = False,
             checkpoint_step: Optional[Union[int, str]] = None,
             split: str = "validation",
             batch_size: int = 32,
             decoder: str = "greedy",
             num_decodes: int = 4,
             alpha: float = 0.6,
             num_partitions: int = 1,
             task_names: Optional[Sequence[str]] = None,
             output_dir: Optional[str] = None,
             encode_once: bool = True) -> dict:
  """Evaluates the run in `model_dir`; returns {'<task>/<metric>': value}.

  Args:
    checkpoint_step: None (latest), a step number, or 'best'.
    decoder / num_decodes / alpha: 'greedy' or 'beam' generation (T5X length penalty alpha).
    encode_once: one encoder pass per input when scoring rank-classification rows (`Evaluator`).
    output_dir: defaults to `<model_dir>/eval`.
  """
  for name, value in (("batch_size", batch_size), ("num_decodes", num_decodes),
                      ("num_partitions", num_partitions)):
    settings.integer(value, "evaluate", name)
  settings.feature_lengths(task_feature_lengths, "evaluate")
  seqio.get_mixture_or_task(mixture_or_task_name)  # A one-line error naming an unknown task.
  mesh = partitioning.make_mesh(num_partitions)
  shapes = feature_converter_lib.model_input_shapes(task_feature_lengths, batch_size)
  variables, step = setup.restore_trained(model, model_dir, initial_checkpoint_path,
                                          setup.dummy_batch(shapes), mesh, checkpoint_step,
                                          random_init_backbone)
  output_dir = output_dir or os.path.join(model_dir, "eval")
  os.makedirs(output_dir, exist_ok=True)
  task_names = setup.resolve_task_names(model, mixture_or_task_name, task_names)
  converter = feature_converter_lib.TaskIdEncDecFeatureConverter(task_names=task_names)
  evaluator = Evaluator(model, mixture_or_task_name, converter, task_feature_lengths,
                        split=split, batch_size=batch_size, log_dir=output_dir, decoder=decoder,
                        num_decodes=num_decodes, alpha=alpha, encode_once=encode_once)
  metrics = evaluator.evaluate(variables, step)
  logging.info("Metrics of step %d written to %s", step, output_dir)
  print(json.dumps({"step": step, **metrics}, indent=2))
  return metrics
