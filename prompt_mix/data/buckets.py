"""Length buckets: each batch padded to the smallest of a few static lengths, not to the feature length.

A T5X run pads every example to `TASK_FEATURE_LENGTHS` (e.g. inputs 256), so a batch of 50-token MNLI
inputs computes mostly padding. With buckets, a batch is padded to the smallest *bucket* that holds its
longest example. Buckets are a small static set (by default the multiples of 32 up to the input
feature length; 8, 16, 32, ... up to the target feature length), so a jitted step compiles once per
bucket pair and no more. Padding never changes a result: pad positions are masked everywhere in the
backbone (attention, cross-attention, the loss weights) and in every method but one setting, ATTEMPT's
`unmasked_pooling`, which pools over the padding on purpose. `check_model` refuses it, and the loss
normalization 'NUM_TOTAL_TARGET_TOKENS' (a divisor that counts padding) with more than one target bucket.

Training (`group_by_length`, then `BucketedBatches`): the shuffled, converted examples are cut into
windows of `window_batches` batches; each window is sorted by length and cut into batches, and the batches
of a window are put in a random order drawn from (seed, window index). Batches are thus homogeneous in
length while the examples of a window still mix at random across the window's batches; the stream is a
deterministic function of the seed, so skipping `k` batches resumes it exactly (`trainer.train_dataset`).

Several hosts: each host reads its own shard. All hosts draw the same batch order in each window (same seed,
same window index), so at each step every host holds the batch of the same length rank of its window; each
host proposes its bucket and `agree_across_hosts` takes the maximum over hosts (one tiny all-gather per
step), so the global batch has one shape.

Evaluation and inference sort their (finite) examples by length and trim each batch to its bucket;
results are returned in the original order.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np

Batch = Mapping[str, np.ndarray]

INPUT_FEATURES = ("encoder_input_tokens",)
TARGET_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """The bucket settings (gin: `LengthBuckets.enabled = False` restores T5X's fixed padding).

  Attributes:
    enabled: False pads every batch to the task feature lengths, as T5X does.
    input_step: input buckets are the multiples of this up to the input feature length (which is always
      the last bucket).
    input_doubling: instead, the step times the powers of two (32, 64, 128, ...).
    target_step / target_doubling: the same for targets; by default 8, 16, 32, ...: classification
      targets are a few tokens, and answers of QA tasks spread up to long feature lengths (128 in the
      ATTEMPT runs), where doubling keeps the number of buckets (compilations) small.
    input_lengths / target_lengths: explicit buckets instead; lengths above the feature length are
      dropped, and the feature length is always added.
    window_batches: training groups examples by length within windows of this many batches; larger
      windows give tighter batches, smaller ones keep batch composition closer to random.
  """

  enabled: bool = True
  input_step: int = 32
  input_doubling: bool = False
  target_step: int = 8
  target_doubling: bool = True
  input_lengths: Optional[Sequence[int]] = None
  target_lengths: Optional[Sequence[int]] = None
  window_batches: int = 32

  def __post_init__(self):
    for name in ("input_step", "target_step", "window_batches"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LengthBuckets.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("input_lengths", "target_lengths"):
      value = getattr(self, name)
      if value is not None:
        if not value or any(int(v) < 1 for v in value):
          raise ValueError(f"LengthBuckets.{name} must be positive lengths, got {value}")
        object.__setattr__(self, name, tuple(sorted({int(v) for v in value})))

  def resolve(self, task_feature_lengths: Mapping[str, int]) -> Optional["Buckets"]:
    """The buckets for these feature lengths, or None when bucketing is off."""
    if not self.enabled:
      return None
    return Buckets(
        inputs=_boundaries(task_feature_lengths, "inputs", self.input_step, self.input_doubling,
                           self.input_lengths),
        targets=_boundaries(task_feature_lengths, "targets", self.target_step, self.target_doubling,
                            self.target_lengths))


def _boundaries(lengths: Mapping[str, int], key: str, step: int, doubling: bool,
                explicit: Optional[Sequence[int]]) -> tuple[int, ...]:
  if key not in lengths:
    raise ValueError(f"Length buckets need TASK_FEATURE_LENGTHS['{key}'], got {dict(lengths)}")
  full = int(lengths[key])
  if explicit is not None:
    values = explicit
  elif doubling:
    values = [step * 2 ** i for i in range(max(full // step, 1).bit_length())]
  else:
    values = range(step, full, step)
  return tuple(sorted({int(v) for v in values if int(v) < full} | {full}))


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Resolved bucket lengths, ascending; the last of each is the feature length."""

  inputs: tuple[int, ...]
  targets: tuple[int, ...]

  @property
  def max_shapes(self) -> int:
    """The most distinct batch shapes (compilations of a step) these buckets allow."""
    return len(self.inputs) * len(self.targets)

  def input_bucket(self, length: int) -> int:
    return _bucket(self.inputs, length, "inputs")

  def target_bucket(self, length: int) -> int:
    return _bucket(self.targets, length, "targets")

  def batch_lengths(self, batch: Batch) -> tuple[int, int]:
    """(input bucket, target bucket) that hold every example of a batch padded to the feature lengths."""
    return (self.input_bucket(max_length(batch["encoder_input_tokens"])),
            self.target_bucket(max_length(batch["decoder_target_tokens"])))


def _bucket(boundaries: Sequence[int], length: int, what: str) -> int:
  i = bisect.bisect_left(boundaries, length)
  if i == len(boundaries):
    raise ValueError(f"A batch has {what} of length {length}, longer than the feature length "
                     f"{boundaries[-1]} (buckets {list(boundaries)})")
  return boundaries[i]


def token_lengths(tokens: np.ndarray) -> np.ndarray:
  """[B, L] tokens padded with 0 -> [B] position of the last non-zero token + 1 (0 for an empty row)."""
  tokens = np.asarray(tokens)
  nonzero = tokens != 0
  return np.where(nonzero.any(axis=1), tokens.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)


def max_length(tokens: np.ndarray) -> int:
  return int(token_lengths(tokens).max(initial=0))


def trim(batch: Batch, input_length: Optional[int], target_length: Optional[int]) -> dict:
  """Slices (or zero-pads) the token features of a batch to these lengths; None leaves a side as it is.

  Only trailing padding may be cut: a non-zero input, target or loss weight beyond the new length is an
  error. `decoder_input_tokens` is the targets shifted right, so it holds the final EOS one position past
  the targets; cutting it there is exact, because the decoder is causal and the positions kept never see it.
  """
  out = dict(batch)
  for names, length in ((INPUT_FEATURES, input_length), (TARGET_FEATURES, target_length)):
    if length is None:
      continue
    for name in names:
      if name not in out:
        continue
      value = np.asarray(out[name])
      if value.shape[1] > length:
        if name != "decoder_input_tokens" and np.any(value[:, length:]):
          raise ValueError(f"Cannot trim {name} {value.shape} to length {length}: it has non-padding "
                           "values beyond it")
        value = value[:, :length]
      elif value.shape[1] < length:
        value = np.pad(value, [(0, 0), (0, length - value.shape[1])])
      out[name] = value
  return out


def check_model(model: Any, buckets: Optional[Buckets], training: bool = False) -> None:
  """Refuses settings whose results depend on the padded length when buckets are on.

  Two do: ATTEMPT's `unmasked_pooling`, and in training the loss normalization
  'NUM_TOTAL_TARGET_TOKENS', which divides by the padded target size (so by the target bucket).
  """
  if buckets is None:
    return
  if (training and getattr(model, "loss_normalizing_factor", None) == "NUM_TOTAL_TARGET_TOKENS"
      and len(buckets.targets) > 1):
    raise ValueError("loss_normalizing_factor='NUM_TOTAL_TARGET_TOKENS' divides the loss by the padded "
                     f"target size, which changes with the target buckets {list(buckets.targets)}: set "
                     f"LengthBuckets.target_lengths = [{buckets.targets[-1]}] (one target bucket), or "
                     "LengthBuckets.enabled = False")
  for delta in getattr(model, "deltas", ()):
    if getattr(delta, "unmasked_pooling", False):
      raise ValueError(f"{type(delta).__name__}(unmasked_pooling=True) pools over the padding, so its "
                       "results depend on the padded length: set LengthBuckets.enabled = False (fixed "
                       "padding, as the original ATTEMPT) or use masked pooling")


# ------------------------------------------------------------------------------------------ training
def group_by_length(ds, batch_size: int, window_batches: int, seed: int):
  """Examples padded to the feature lengths -> batches [batch_size, ...] grouped by length (module doc).

  Each window of `window_batches * batch_size` examples is sorted by (input length, target length), cut
  into `window_batches` batches, and the batches are emitted in a random order drawn from (seed, window
  index). A final partial window (finite datasets only) keeps its first whole batches' worth of examples.
  The batches are still padded to the feature lengths; `BucketedBatches` trims them.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  window = batch_size * window_batches

  def lengths(tokens):
    nonzero = tf.cast(tokens != 0, tf.int32)
    width = tf.shape(tokens)[1]
    last = width - tf.argmax(tf.reverse(nonzero, axis=[1]), axis=1, output_type=tf.int32)
    return tf.where(tf.reduce_any(tokens != 0, axis=1), last, 0)

  def to_batches(index, examples):
    count = tf.shape(examples["encoder_input_tokens"])[0] // batch_size
    examples = {k: v[:count * batch_size] for k, v in examples.items()}
    target_width = tf.shape(examples["decoder_target_tokens"])[1]
    key = (lengths(examples["encoder_input_tokens"]) * (target_width + 1)
           + lengths(examples["decoder_target_tokens"]))
    order = tf.argsort(key, stable=True)
    batches = {k: tf.reshape(tf.gather(v, order), tf.concat([[count, batch_size], tf.shape(v)[1:]], 0))
               for k, v in examples.items()}
    draws = tf.random.stateless_uniform([count], seed=tf.stack([tf.cast(seed, tf.int64), index]))
    permutation = tf.argsort(draws, stable=True)
    return tf.data.Dataset.from_tensor_slices({k: tf.gather(v, permutation) for k, v in batches.items()})

  return ds.batch(window).enumerate().flat_map(to_batches)


def agree_across_hosts(lengths: np.ndarray) -> np.ndarray:
  """The element-wise maximum of `lengths` over all processes (identity on one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return np.asarray(lengths)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(lengths, np.int32))).max(axis=0)


class BucketedBatches:
  """Iterator: numpy batches padded to the feature lengths -> the same batches trimmed to their bucket.

  Args:
    batches: an iterator of numpy batches (e.g. `group_by_length(...).as_numpy_iterator()`).
    buckets: the resolved buckets.
    agree: maps this host's (input, target) bucket to the lengths all hosts use (`agree_across_hosts`);
      it must return, on every host, a bucket pair at least as long as each host's own.
  Attributes:
    shapes: the (input, target) lengths seen so far, in order of first appearance.
  """

  def __init__(self, batches: Iterable[Batch], buckets: Buckets,
               agree: Optional[Callable[[np.ndarray], np.ndarray]] = None, what: str = "training step"):
    self._batches = iter(batches)
    self.buckets = buckets
    self._agree = agree or agree_across_hosts
    self._what = what
    self.shapes: list[tuple[int, int]] = []
    self.count = 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    local = np.asarray(self.buckets.batch_lengths(batch), np.int32)
    agreed = np.asarray(self._agree(local))
    if agreed.shape != (2,) or np.any(agreed < local):
      raise ValueError(f"Length agreement returned {agreed.tolist()} for this host's buckets "
                       f"{local.tolist()}: it must be two lengths at least as long")
    shape = (int(agreed[0]), int(agreed[1]))
    self.count += 1
    if shape not in self.shapes:
      self.shapes.append(shape)
      logging.info("Length bucket inputs=%d targets=%d first seen at batch %d: the %s compiles for it "
                   "(%d of at most %d shapes)", shape[0], shape[1], self.count, self._what,
                   len(self.shapes), self.buckets.max_shapes)
    return trim(batch, *shape)


# ------------------------------------------------------------------------------------------ evaluation
def sort_by_length(features: Mapping[str, np.ndarray], key: str = "encoder_input_tokens") -> np.ndarray:
  """[N] order of the rows by their `key` length (stable, so ties keep their order)."""
  return np.argsort(token_lengths(features[key]), kind="stable")


def trim_batch(batch: Batch, buckets: Optional[Buckets], targets: bool = True) -> dict:
  """Trims an evaluation batch to its buckets (`targets=False` keeps the targets' full length, e.g. the
  decoding length of generation). No-op when `buckets` is None."""
  if buckets is None:
    return dict(batch)
  input_length, target_length = buckets.batch_lengths(batch)
  return trim(batch, input_length, target_length if targets else None)
