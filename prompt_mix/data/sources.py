"""`SplitSource`: a SeqIO DataSource serving the paper's splits of a TFDS dataset or of local files.

The raw split (TFDS `glue/mnli:2.0.0` `train`, or `{DATA_DIR}/glue_mnli/train.jsonl`) is read in its
deterministic order, reduced to the task's raw features, and filtered to the positions that
`splits.select_positions` assigns to `train` / `validation` / `test` (optionally a k-shot subset of train).
See `splits.py` for the plans and `file_source.py` for the local layout.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from prompt_mix.data import file_source
from prompt_mix.data import splits as splits_lib

FeatureSpec = file_source.FeatureSpec


@gin.configurable
def get_tfds_data_dir(tfds_data_dir: Optional[str] = None) -> Optional[str]:
  """TFDS data directory (None: TFDS's default, which honours $TFDS_DATA_DIR)."""
  return tfds_data_dir


def _select(example: Mapping[str, Any], spec: FeatureSpec, where: str) -> dict[str, Any]:
  out = {}
  for key, sub in spec.items():
    if key not in example:
      raise KeyError(f"{where}: the dataset has no feature {key!r} (it has {sorted(example)})")
    if isinstance(sub, Mapping):
      out[key] = _select(example[key], sub, f"{where}/{key}")
    else:
      value = example[key]
      out[key] = value if value.dtype == sub.dtype else tf.cast(value, sub.dtype)
  return out


class SplitSource(seqio.DataSource):
  """The paper's `train` / `validation` / `test` of one task, from TFDS or local files.

  Attributes:
    task_name: the task (and local data sub-directory) name, used in messages.
    tfds_name: 'glue/mnli:2.0.0'.
    features: nested `tf.TensorSpec`s of the raw features the task's formatter reads.
    plan: the `splits.SplitPlan`.
    few_shot: optional (k, seed): `train` is k examples of the plan's train split.
    label_names: field path -> class names (lets local files write labels by name).
    num_classes: field path -> number of classes of class fields without names (local files are checked
      against it).
    train_transform: optional `ds -> ds` applied to the train split only, after selection (ReCoRD
      trains on one example per gold answer).
  """

  def __init__(self, task_name: str, tfds_name: str, features: FeatureSpec, plan: splits_lib.SplitPlan,
               few_shot: Optional[tuple[int, int]] = None, splits: Sequence[str] = splits_lib.SPLITS,
               label_names: Optional[Mapping[str, Sequence[str]]] = None,
               train_transform: Optional[Callable[[tf.data.Dataset], tf.data.Dataset]] = None,
               num_classes: Optional[Mapping[str, int]] = None):
    for split in splits:
      if split not in splits_lib.SPLITS:
        raise ValueError(f"{task_name}: unknown split {split!r}")
    super().__init__(splits=splits, caching_permitted=True)
    self.task_name = task_name
    self.tfds_name = tfds_name
    self.features = features
    self.plan = plan
    self.few_shot = few_shot
    self.label_names = dict(label_names or {})
    self.num_classes = dict(num_classes or {})
    self.train_transform = train_transform

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def __repr__(self) -> str:
    shot = f", few_shot={self.few_shot}" if self.few_shot else ""
    return f"SplitSource({self.task_name}: {self.tfds_name}, {self.plan.kind}{shot})"

  def list_shards(self, split: str) -> Sequence[str]:
    return [f"{self.tfds_name}:{self.plan.raw[split]}"]

  # ------------------------------------------------------------------------------------------ raw data
  def raw_dataset(self, raw_split: str) -> tf.data.Dataset:
    """The raw split, reduced to `features`, in deterministic order."""
    data_dir = file_source.get_data_dir()
    if data_dir:
      path = file_source.split_path(data_dir, self.task_name, raw_split)
      logging.info("%s: reading %s", self.task_name, path)
      return file_source.load_split(path, self.features, self.label_names, self.num_classes)
    ds = tfds.load(self.tfds_name, split=raw_split, data_dir=get_tfds_data_dir(), shuffle_files=False,
                   download=True)
    where = f"TFDS {self.tfds_name}[{raw_split}]"
    return ds.map(lambda ex: _select(ex, self.features, where), num_parallel_calls=tf.data.AUTOTUNE)

  def _raw_size(self, ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
      return n
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))

  def _groups(self, ds: tf.data.Dataset) -> list[bytes]:
    paths = self.plan.group_by

    def key(ex):
      parts = []
      for path in paths:
        value = ex
        for part in path.split("/"):
          value = value[part]
        parts.append(value if value.dtype == tf.string else tf.strings.as_string(value))
      return tf.strings.join(parts, separator="/")

    return list(ds.map(key).as_numpy_iterator())

  def positions(self, split: str) -> tuple[Optional[np.ndarray], int, tf.data.Dataset]:
    """(sorted positions or None for all, raw size n, raw dataset) of `split`."""
    if split not in self.splits:
      raise ValueError(f"{self.task_name}: no split {split!r}; it has {self.splits}")
    ds = self.raw_dataset(self.plan.raw[split])
    n = self._raw_size(ds)
    groups = self._groups(ds) if self.plan.needs_groups and split != "train" else None
    positions = splits_lib.select_positions(self.plan, split, n, groups)
    if split == "train" and self.few_shot is not None:
      k, seed = self.few_shot
      base = np.arange(n) if positions is None else positions
      try:
        positions = splits_lib.few_shot_positions(base, k, seed)
      except ValueError as e:
        raise ValueError(f"{self.task_name}: {e}") from None
    return positions, n, ds

  # ----------------------------------------------------------------------------------- DataSource API
  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    """The examples of `split` in raw read order (SeqIO's Task shuffles after preprocessing)."""
    del shuffle, seed, sequence_length, use_cached, num_epochs
    positions, n, ds = self.positions(split)
    if positions is not None:
      ds = splits_lib.take_positions(ds, positions, n)
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    if split == "train" and self.train_transform is not None:
      ds = self.train_transform(ds)
    return ds

  def num_input_examples(self, split: str) -> int:
    """Examples of `split` before preprocessing (reads the raw split only to count or group)."""
    positions, n, _ = self.positions(split)
    return n if positions is None else int(len(positions))
