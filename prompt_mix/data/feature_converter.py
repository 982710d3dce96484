"""The model's feature converter: SeqIO's encoder-decoder conversion plus `task_ids` (docs/design.md, Data).

Task features:  inputs [n] int32, targets [t] int32 (EOS appended), task_id [1] int32 (global id).
Model features (T5X names, after batching):
  encoder_input_tokens  [B, n]    decoder_input_tokens [B, t]    decoder_target_tokens [B, t]
  decoder_loss_weights  [B, t]    task_ids             [B]

No packing: a soft prompt is prepended per example, and `task_ids` selects per-example prompts, so two
examples must never share a row. `task_names` optionally remaps global ids to local indices 0..N-1
(ATTEMPT-m's `[N, m, d]` target prompts), failing on a task outside the list.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from prompt_mix.data import task_ids as task_ids_lib

FeatureSpec = seqio.FeatureConverter.FeatureSpec


@gin.configurable
class TaskIdEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` (unpacked) that also carries `task_id` into the batch as `task_ids`.

  `task_feature_lengths` stay T5X's `{'inputs': n, 'targets': t}`; `task_id` needs no length.

  Args:
    task_names: if given, `task_ids` are local indices into this list (see `task_ids.LocalTaskIds`);
      otherwise the global ids of `task_ids.TASK_IDS`.
    default_task_id: used for datasets without a `task_id` feature; None (the default) makes such a
      dataset an error that says how to add the feature.
    pack: must stay False (kept for gin symmetry with SeqIO's converters).
  """

  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      "task_ids": FeatureSpec(dtype=tf.int32, rank=0),
  }

  def __init__(self, task_names: Optional[Sequence[str]] = None, default_task_id: Optional[int] = None,
               pack: bool = False, **kwargs):
    if pack:
      raise ValueError("TaskIdEncDecFeatureConverter cannot pack: per-example prompts and task_ids need "
                       "one example per row (use pack=False)")
    super().__init__(pack=False, **kwargs)
    self._local = task_ids_lib.LocalTaskIds(task_names) if task_names else None
    self._default_task_id = default_task_id

  @property
  def task_names(self) -> Optional[list[str]]:
    return None if self._local is None else list(self._local.task_names)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    # SeqIO's evaluator hands over the measured length of every output feature, `task_id` included;
    # it has no length to trim or pad to.
    lengths = {k: v for k, v in task_feature_lengths.items() if k != "task_id"}
    return super().__call__(ds, lengths)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    spec = ds.element_spec
    if "task_id" not in spec:
      if self._default_task_id is None:
        raise ValueError("The dataset has no 'task_id' feature: register the task with "
                         "prompt_mix.data.preprocessors.add_task_id (prompt_mix tasks have it), or "
                         "set TaskIdEncDecFeatureConverter.default_task_id")
      ds = ds.map(lambda ex: {**ex, "task_id": tf.constant([self._default_task_id], tf.int32)})
    elif spec["task_id"].dtype != tf.int32 or spec["task_id"].shape.rank not in (0, 1):
      raise ValueError(f"Feature 'task_id' must be int32 [1] (or a scalar), got {spec['task_id']}")
    ds = super()._convert_features(ds, task_feature_lengths)  # Pads inputs/targets; task_id passes.
    if self._local is not None:
      ds = ds.map(self._local.tf_map("task_ids"), num_parallel_calls=tf.data.AUTOTUNE)
    return ds

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted["task_ids"] = tf.reshape(features["task_id"], [])  # [1] (or []) -> the example's scalar.
    return converted

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths["task_ids"] = 1  # A scalar per example; SeqIO's validation wants an entry (rank 0: unchecked).
    return lengths


def model_input_shapes(task_feature_lengths: Mapping[str, int], batch_size: int) -> dict[str, tuple[int, ...]]:
  """Shapes of one model batch, e.g. for `model.init`: `task_ids` is `[B]`, token features `[B, len]`."""
  lengths = TaskIdEncDecFeatureConverter().get_model_feature_lengths(task_feature_lengths)
  return {k: (batch_size,) if k == "task_ids" else (batch_size, v) for k, v in lengths.items()}
