"""`TaskSpec` and the registration of a task with its few-shot and rank-classification variants.

One `TaskSpec` describes a dataset end to end (source, splits, format, label words, postprocessing,
metrics); `register(spec)` adds to `seqio.TaskRegistry`:

  <name>                 train / validation / test of the paper's splits
  <name>_k<k>_seed<s>    few-shot: `train` = k training examples drawn with seed s; same validation / test
  <name>_rank            classification only: validation / test expanded for rank classification

Every task yields `inputs`, `targets` (tokenized with the shared `DeferredVocabulary`, EOS appended),
`task_id` (int32 scalar, the base task's global id), the pretokenized strings, and the evaluation
features of its formatter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from prompt_mix.data import preprocessors
from prompt_mix.data import rank_classification
from prompt_mix.data import sources
from prompt_mix.data import splits as splits_lib
from prompt_mix.data import task_ids
from prompt_mix.data import vocabulary as vocabulary_lib

VOCABULARY = vocabulary_lib.DeferredVocabulary()

# Raw feature specs (what TFDS yields and a local file must provide).
TEXT = tf.TensorSpec([], tf.string)
TEXTS = tf.TensorSpec([None], tf.string)
CLASS = tf.TensorSpec([], tf.int64)  # TFDS ClassLabel.
INT32 = tf.TensorSpec([], tf.int32)
FLOAT = tf.TensorSpec([], tf.float32)


def output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> dict[str, seqio.Feature]:
  """inputs / targets (SentencePiece, EOS appended) and the int32 `task_id` [1]."""
  vocabulary = vocabulary or VOCABULARY
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "task_id": seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
                               dtype=tf.int32, rank=1),  # [1]: SeqIO's evaluator measures axis 0.
  }


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Everything that defines one task.

  Attributes:
    name: registry name, e.g. 'glue_mnli' (also the local data sub-directory).
    tfds_name: TFDS dataset, e.g. 'glue/mnli:2.0.0'.
    features: nested `tf.TensorSpec`s of the raw features the formatter reads (and a local file must
      provide).
    plan: how train / validation / test come from the raw splits (`splits.py`).
    formatter: raw example -> {'inputs', 'targets', eval features} (`preprocessors.py`).
    postprocess_fn: decoded text -> metric value (`postprocessors.py`).
    metric_fns: SeqIO metric functions (`metrics.py`).
    label_words: the class words of a classification task (index = TFDS class id); enables `_rank`.
    label_names: field path -> TFDS class names, so local files may write labels by name.
    train_transform: optional transform of the raw train split (ReCoRD: one example per answer).
    task_id: global id; default `task_ids.task_id(name)`. When set, `register` enters it in
      `task_ids.TASK_IDS` under `name` (it may be a built-in task's id: the copy then shares it).
    source_text: human-readable source for docs, e.g. 'TFDS glue/mnli'.
  """

  name: str
  tfds_name: str
  features: Mapping[str, Any]
  plan: splits_lib.SplitPlan
  formatter: preprocessors.Formatter
  postprocess_fn: Callable[..., Any]
  metric_fns: tuple[Callable[..., Mapping[str, float]], ...]
  label_words: Optional[tuple[str, ...]] = None
  label_names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  train_transform: Optional[Callable[[tf.data.Dataset], tf.data.Dataset]] = None
  task_id: Optional[int] = None

  @property
  def global_task_id(self) -> int:
    return task_ids.task_id(self.name) if self.task_id is None else self.task_id

  @property
  def num_classes(self) -> dict[str, int]:
    """Field path -> number of classes: of each named label field, and of `label` from the label words."""
    counts = {path: len(names) for path, names in self.label_names.items()}
    if self.label_words and "label" in self.features and "label" not in counts:
      counts["label"] = len(self.label_words)
    return counts

  def source(self, few_shot: Optional[tuple[int, int]] = None,
             splits: Sequence[str] = splits_lib.SPLITS) -> sources.SplitSource:
    return sources.SplitSource(self.name, self.tfds_name, self.features, self.plan, few_shot=few_shot,
                               splits=splits, label_names=self.label_names,
                               train_transform=self.train_transform, num_classes=self.num_classes)


def few_shot_name(name: str, k: int, seed: int) -> str:
  """'superglue_cb', 16, 0 -> 'superglue_cb_k16_seed0'."""
  return f"{name}_k{k}_seed{seed}"


def rank_name(name: str) -> str:
  return f"{name}_rank"


def _common_preprocessors(spec: TaskSpec, extra: Sequence[Callable[..., Any]] = ()) -> list[Any]:
  return [
      preprocessors.format_with(spec.formatter),
      *extra,
      seqio.preprocessors.tokenize,
      functools.partial(preprocessors.add_task_id, task_id=spec.global_task_id),
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos_after_trim,
  ]


def _check_task_id(spec: TaskSpec) -> None:
  """Enters `spec.task_id` in the global table (shared ids allowed), or checks that the name has an id."""
  if spec.task_id is not None:
    task_ids.register_task_id(spec.name, spec.task_id, shared=True)
  else:
    task_ids.task_id(spec.name)  # KeyError saying how to give it one.


def _add(name: str, **kwargs) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    raise ValueError(f"Task {name!r} is already registered")
  return seqio.TaskRegistry.add(name, **kwargs)


def register_base(spec: TaskSpec) -> seqio.Task:
  """Registers `spec.name`: the paper's train / validation / test."""
  _check_task_id(spec)
  return _add(spec.name, source=spec.source(), preprocessors=_common_preprocessors(spec),
              output_features=output_features(), postprocess_fn=spec.postprocess_fn,
              metric_fns=list(spec.metric_fns))


def register_few_shot(spec: TaskSpec, k: int, seed: int) -> seqio.Task:
  """Registers `<name>_k<k>_seed<seed>`: k training examples drawn with `seed`."""
  _check_task_id(spec)
  return _add(few_shot_name(spec.name, k, seed), source=spec.source(few_shot=(k, seed)),
              preprocessors=_common_preprocessors(spec), output_features=output_features(),
              postprocess_fn=spec.postprocess_fn, metric_fns=list(spec.metric_fns))


def register_rank(spec: TaskSpec, length_normalize: bool = False) -> seqio.Task:
  """Registers `<name>_rank`: validation / test, one row per label word, scored by rank metrics."""
  if not spec.label_words:
    raise ValueError(f"{spec.name}: rank classification needs label words")
  _check_task_id(spec)
  expand = rank_classification.expand_choices_preprocessor(spec.label_words)
  return _add(rank_name(spec.name), source=spec.source(splits=("validation", "test")),
              preprocessors=_common_preprocessors(spec, extra=[expand]),
              output_features=output_features(),
              postprocess_fn=rank_classification.postprocessor(spec.postprocess_fn),
              metric_fns=[rank_classification.score_metric(spec.metric_fns, length_normalize)])


def register(spec: TaskSpec, few_shot_ks: Sequence[int] = splits_lib.FEW_SHOT_KS,
             few_shot_seeds: Sequence[int] = splits_lib.FEW_SHOT_SEEDS) -> TaskSpec:
  """Registers the task, its few-shot variants (every k x seed) and, with label words, its `_rank`."""
  register_base(spec)
  for k in few_shot_ks:
    for seed in few_shot_seeds:
      register_few_shot(spec, k, seed)
  if spec.label_words:
    register_rank(spec)
  return spec

