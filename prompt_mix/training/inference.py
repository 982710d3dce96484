"""Predictions of a trained method on a task or mixture (what `python -m prompt_mix.infer` runs).

Writes JSONL, one line per example: `task`, `inputs`, `targets`, `prediction`, `score` (log-probability of
the prediction) and every value the method sows per example, under its name (ATTEMPT:
`attention_weights`, the weights over its candidates). The tasks of a mixture are interleaved, so each
batch mixes tasks and one loaded backbone serves them all (mixed-task serving, docs/design.md).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Union

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from prompt_mix import atomic
from prompt_mix import partitioning
from prompt_mix.data import buckets as buckets_lib
from prompt_mix.data import feature_converter as feature_converter_lib
from prompt_mix.data import task_ids as task_ids_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import evaluation
from prompt_mix.training import settings
from prompt_mix.training import setup


def interleaved_examples(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                         max_examples_per_task: Optional[int] = None) -> tf.data.Dataset:
  """The examples of every task of a mixture (or of one task), interleaved round-robin, in order."""
  tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
  datasets = []
  for task in tasks:
    ds = task.get_dataset(sequence_length=dict(task_feature_lengths), split=split, shuffle=False,
                          num_epochs=1, use_cached=False)
    if max_examples_per_task:
      ds = ds.take(max_examples_per_task)
    datasets.append(ds)
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, choice, stop_on_empty_dataset=False)


@gin.configurable
def infer(model_dir: str = gin.REQUIRED,
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
          max_examples_per_task: Optional[int] = None,
          num_partitions: int = 1,
          task_names: Optional[Sequence[str]] = None,
          output_file: Optional[str] = None,
          length_buckets: Optional[buckets_lib.LengthBuckets] = None) -> str:
  """Writes predictions of the run in `model_dir`; returns the JSONL path.

  Args:
    output_file: defaults to `<model_dir>/infer/<mixture_or_task_name>-<split>-<step>.jsonl`.
    length_buckets: default the gin-configured `buckets.LengthBuckets()`. With buckets on, each window
      of `window_batches` batches is predicted shortest input first, each batch's inputs padded to their
      bucket only; lines are written in the examples' order either way.
  """
  for name, value in (("batch_size", batch_size), ("num_decodes", num_decodes),
                      ("num_partitions", num_partitions)):
    settings.integer(value, "infer", name)
  settings.integer(max_examples_per_task, "infer", "max_examples_per_task", allow_none=True)
  settings.feature_lengths(task_feature_lengths, "infer")
  mixture = seqio.get_mixture_or_task(mixture_or_task_name)
  length_buckets = length_buckets or buckets_lib.LengthBuckets()
  buckets = length_buckets.resolve(task_feature_lengths)
  buckets_lib.check_model(model, buckets)
  mesh = partitioning.make_mesh(num_partitions)
  shapes = feature_converter_lib.model_input_shapes(task_feature_lengths, batch_size)
  variables, step = setup.restore_trained(model, model_dir, initial_checkpoint_path,
                                          setup.dummy_batch(shapes), mesh, checkpoint_step,
                                          random_init_backbone)
  task_names = setup.resolve_task_names(model, mixture_or_task_name, task_names)
  converter = feature_converter_lib.TaskIdEncDecFeatureConverter(task_names=task_names)
  examples = interleaved_examples(mixture_or_task_name, task_feature_lengths, split, max_examples_per_task)
  features = converter(examples, dict(task_feature_lengths))
  texts = examples.map(lambda ex: {"inputs": ex["inputs_pretokenized"],
                                   "targets": ex["targets_pretokenized"],
                                   "task_id": tf.reshape(ex["task_id"], [])})
  vocabulary = mixture.output_features["targets"].vocabulary
  predict = jax.jit(lambda v, b: model.predict_batch(v, b, decoder=decoder, num_decodes=num_decodes,
                                                     alpha=alpha))

  output_file = output_file or os.path.join(model_dir, "infer",
                                            f"{mixture_or_task_name}-{split}-{step}.jsonl")
  window = batch_size * length_buckets.window_batches if buckets else batch_size
  count = 0
  with atomic.atomic_file(output_file) as tmp, open(tmp, "w") as f:
    windows = tf.data.Dataset.zip((features, texts)).batch(window).as_numpy_iterator()
    for window_features, text in windows:
      # With buckets, each window is predicted shortest first and written back in its own order.
      order = (buckets_lib.sort_by_length(window_features) if buckets
               else np.arange(len(text["task_id"])))
      rows: dict[int, dict] = {}
      for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        n = len(chosen)
        batch = buckets_lib.trim_batch({k: v[chosen] for k, v in window_features.items()}, buckets,
                                       targets=False)  # The full target length is the decoding length.
        padded = evaluation.pad_batch(batch, batch_size)
        model.check_task_ids(padded)
        tokens, aux = predict(variables, {k: jnp.asarray(v) for k, v in padded.items()})
        tokens, scores = np.asarray(tokens)[:n], np.asarray(aux["scores"])[:n]
        sown = evaluation.per_example_intermediates(aux["intermediates"], batch_size)
        for j, b in enumerate(chosen):
          task_id = int(text["task_id"][b])
          row = {"task": task_ids_lib.task_name(task_id),
                 "inputs": text["inputs"][b].decode(), "targets": text["targets"][b].decode(),
                 "prediction": vocabulary.decode(tokens[j].tolist()),
                 "score": float(scores[j])}
          for path, values in sown.items():  # What the method sowed per example, by its name.
            row[path.rsplit("/", 1)[-1]] = values[j].tolist()
          rows[int(b)] = row
      for b in range(len(order)):
        f.write(json.dumps(rows[b]) + "\n")
        count += 1
  logging.info("Wrote %d predictions of step %d to %s", count, step, output_file)
  print(output_file)
  return output_file
