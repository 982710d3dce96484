"""Evaluation through SeqIO's evaluator: generation (greedy/beam) and scoring (rank classification).

`evaluate` is what `python -m prompt_mix.eval` runs; `Evaluator` is also used during training.

SeqIO asks for `predict_fn` (tasks with `metric_fns` on decoded text) and `score_fn` (tasks with
`score_metric_fns`, e.g. the rank-classification variants); both run jitted model calls over the
evaluator's enumerated, cached datasets. Methods that sow `attention_weights` (ATTEMPT) get them averaged
per task and written next to the metrics, for the heatmap tool.
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
from prompt_mix.attempt import interpret
from prompt_mix.data import feature_converter as feature_converter_lib
from prompt_mix.data import task_ids as task_ids_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import settings
from prompt_mix.training import setup

ATTENTION_KEY = "attention_weights"
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


def batches(ds, batch_size: int):
  """Yields (indices [b], padded numpy features [batch_size, ...], b) from an enumerated dataset."""
  for indices, features in ds.batch(batch_size).as_numpy_iterator():
    yield indices, pad_batch(features, batch_size), len(indices)


def find_sown(intermediates: Any, name: str) -> list:
  """Every value sown under `name` in an `intermediates` tree (Flax stores sown values as tuples)."""
  found = []

  def visit(tree):
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        if key == name:
          found.extend(value if isinstance(value, (tuple, list)) else [value])
        else:
          visit(value)

  visit(intermediates)
  return found


class Evaluator:
  """SeqIO evaluation of a model's variables on a task or mixture.

  Args:
    model: the model (its method included).
    mixture_or_task_name: what to evaluate.
    converter: the feature converter (it carries `task_ids`).
    task_feature_lengths: {'inputs': n, 'targets': t}.
    split: the evaluation split.
    batch_size: examples per jitted call.
    log_dir: SeqIO writes per-task predictions and metrics under `<log_dir>/inference_eval`.
    decoder / num_decodes / alpha: generation settings of `predict_batch`.
    num_examples: cap on examples per task (None: all).
    keep_outputs: keep the per-step files of this many latest evaluated steps (`rotate_outputs`); None
      keeps all.
  """

  def __init__(self, model: model_lib.EncoderDecoderModel, mixture_or_task_name: str,
               converter: seqio.FeatureConverter, task_feature_lengths: Mapping[str, int],
               split: str = "validation", batch_size: int = 32, log_dir: Optional[str] = None,
               decoder: str = "greedy", num_decodes: int = 4, alpha: float = 0.6,
               num_examples: Optional[int] = None, keep_outputs: Optional[int] = None):
    self.model = model
    self.keep_outputs = keep_outputs
    self._converter = converter
    self.batch_size = batch_size
    self.log_dir = log_dir
    loggers = (seqio.PyLoggingLogger,) + ((seqio.JSONLogger,) if log_dir else ())
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
    self.last_attention: dict[int, np.ndarray] = {}  # task id -> mean attention weights
    self._batch_cache: dict[int, tuple[Any, list]] = {}  # id(dataset) -> (dataset, its numpy batches)

  def _batches(self, ds) -> list:
    """The (indices, padded features, n) batches of one of SeqIO's evaluation datasets, read once.

    SeqIO hands the same cached dataset object (one per task) to every evaluation. Iterating it again each
    time through TF grew the process's memory by about 50 KB per evaluation; its numpy batches are kept
    instead (the evaluation split's features, e.g. about 25 MB for 10k examples of 512 + 128 tokens).
    """
    entry = self._batch_cache.get(id(ds))
    if entry is None or entry[0] is not ds:
      entry = (ds, list(batches(ds, self.batch_size)))
      self._batch_cache[id(ds)] = entry
    return entry[1]

  def evaluate(self, variables: Mapping[str, Any], step: int) -> dict[str, float]:
    """Runs the evaluation; returns {'<task>/<metric>': value}."""
    attention_sums: dict[int, list] = {}  # task id -> [sum of weights, count]

    def predict_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      out = []
      for indices, features, n in self._batches(ds):
        tokens, aux = self._predict(variables, {k: jnp.asarray(v) for k, v in features.items()})
        tokens = np.asarray(tokens)[:n]
        for i, row in zip(indices, tokens):
          out.append((int(i), row.tolist()))  # Full rows (SeqIO stacks them; its decode stops at EOS).
        for weights in find_sown(aux["intermediates"], ATTENTION_KEY):
          task_ids = features.get("task_ids", np.zeros(len(tokens), np.int32))
          for t, w in zip(task_ids[:n], np.asarray(weights, np.float64)[:n]):
            entry = attention_sums.setdefault(int(t), [0.0, 0])
            entry[0] = entry[0] + w
            entry[1] += 1
      return out

    def score_fn(ds, model_feature_shapes=None):
      del model_feature_shapes
      out = []
      for indices, features, n in self._batches(ds):
        scores = np.asarray(self._score(variables, {k: jnp.asarray(v) for k, v in features.items()}))
        out.extend((int(i), float(s)) for i, s in zip(indices, scores[:n]))
      return out

    all_metrics, _ = self._evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                              score_fn=score_fn)
    results = all_metrics.result() or {}
    flat = {}
    for task, task_metrics in results.items():
      for name, value in task_metrics.items():
        value = getattr(value, "value", value)  # clu metric values
        if isinstance(value, (int, float, np.floating, np.integer)):
          flat[f"{task}/{name}"] = float(value)
    self.last_attention = {t: total / n for t, (total, n) in sorted(attention_sums.items())}
    logging.info("Evaluation at step %d: %s", step, flat)
    if self.log_dir and jax.process_index() == 0:  # One writer: every process holds the same metrics.
      with open(os.path.join(self.log_dir, f"eval_metrics_{step}.json"), "w") as f:
        json.dump(flat, f, indent=2)
      if self.last_attention:
        self._save_attention(step)
      if self.keep_outputs:
        rotate_outputs(self.log_dir, self.keep_outputs)
    return flat


  def _save_attention(self, step: int) -> None:
    """Writes `attention_<step>.json`: mean attention per task over the candidates, named for the heatmap."""
    candidates = next((d.candidate_names for d in self.model.deltas if hasattr(d, "candidate_names")),
                      None)
    if candidates is None:
      return
    ids = sorted(self.last_attention)
    local = getattr(self._converter, "task_names", None)
    names = [local[i] if local else task_ids_lib.task_name(i) for i in ids]
    table = np.stack([np.asarray(self.last_attention[i]).reshape(-1, len(candidates)).mean(0)
                      for i in ids])
    sources = [c for c in candidates if c != interpret.TARGET_COLUMN]
    interpret.save_attention_table(os.path.join(self.log_dir, f"attention_{step}.json"), table, names,
                                   sources)


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
             output_dir: Optional[str] = None) -> dict:
  """Evaluates the run in `model_dir`; returns {'<task>/<metric>': value}.

  Args:
    checkpoint_step: None (latest), a step number, or 'best'.
    decoder / num_decodes / alpha: 'greedy' or 'beam' generation (T5X length penalty alpha).
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
                                   split=split, batch_size=batch_size, log_dir=output_dir,
                                   decoder=decoder, num_decodes=num_decodes, alpha=alpha)
  metrics = evaluator.evaluate(variables, step)
  logging.info("Metrics of step %d written to %s", step, output_dir)
  print(json.dumps({"step": step, **metrics}, indent=2))
  return metrics
