"""Rank classification: score every label word as the target and predict the most likely one.

An alternative to free generation for classification tasks: the model can only answer with a label word,
and no decoding is needed. Two ways to use it:

(a) SeqIO-native, as T5X evaluates with `score_fn`: the `<task>_rank` variants (validation / test only)
    expand each example into one example per label word with `expand_choices`; SeqIO's evaluator hands
    every row to `score_fn` (T5X scores each row in full with `score_batch`; `training/evaluation.py`
    groups the rows of one input and encodes it once: `option_batches.py`, `model.score_options`, same
    scores); `score_metric` groups the scores per original example,
    takes the best label word and applies the task's usual metrics. Features added to each row:
      rank_example  int64  index of the original example (in eval order)
      rank_choice   int32  index of the label word
      rank_is_correct bool whether this label word is the gold target
(b) A plain function `rank_classify(score_fn, inputs, label_words, ...)` that builds T5X model batches
    itself, for notebooks and custom loops; `score_fn(batch) -> [B]` log-likelihoods
    (`functools.partial(model.score_batch, variables)`), or `score_options_fn`
    (`functools.partial(model.score_options, variables)`) to encode each input once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

Batch = Mapping[str, np.ndarray]
ScoreFn = Callable[[Batch], Any]


# ------------------------------------------------------------------------------- (a) SeqIO-native
def expand_choices(ds: tf.data.Dataset, label_words: Sequence[str]) -> tf.data.Dataset:
  """Formatted examples {'inputs', 'targets': gold word, ...} -> one row per label word (see module doc).

  Must run before tokenization. Examples keep their order; `rank_example` counts them from 0.
  """
  words = tf.constant(list(label_words))
  num_choices = len(label_words)

  def explode(index, ex):
    rows = {k: tf.repeat(tf.expand_dims(v, 0), num_choices, axis=0) for k, v in ex.items() if k != "targets"}
    rows.update({
        "targets": words,
        "rank_example": tf.fill([num_choices], tf.cast(index, tf.int64)),
        "rank_choice": tf.range(num_choices, dtype=tf.int32),
        "rank_is_correct": tf.equal(words, ex["targets"]),
    })
    return tf.data.Dataset.from_tensor_slices(rows)

  return ds.enumerate().flat_map(explode)


def expand_choices_preprocessor(label_words: Sequence[str]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """`expand_choices` bound to `label_words`, as a SeqIO preprocessor."""

  def preprocessor(ds: tf.data.Dataset) -> tf.data.Dataset:
    return expand_choices(ds, label_words)

  return preprocessor


def _count_tokens(example: Optional[Mapping[str, Any]]) -> int:
  if example is None or "targets" not in example:
    return 1
  return max(int(np.count_nonzero(np.asarray(example["targets"]))), 1)


def postprocessor(base_postprocess_fn: Callable[..., Any]) -> Callable[..., Any]:
  """The rank variant's SeqIO postprocessor, wrapping the base task's.

  For targets it returns a dict describing the row: {'example', 'choice', 'is_correct', 'num_tokens',
  'gold': base_postprocess(row's word, is_target=True), 'if_chosen': base_postprocess(row's word,
  is_target=False)}; `score_metric` needs nothing else. Predictions (if a rank task is also decoded) go
  through the base postprocessor unchanged.
  """

  def fn(output_or_target: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False):
    if not is_target:
      return base_postprocess_fn(output_or_target, example=example, is_target=False)
    if example is None or "rank_example" not in example:
      raise ValueError("Rank classification targets need the example's rank_* features; is this a "
                       "`<task>_rank` task?")
    return {
        "example": int(example["rank_example"]),
        "choice": int(example["rank_choice"]),
        "is_correct": bool(example["rank_is_correct"]),
        "num_tokens": _count_tokens(example),
        "gold": base_postprocess_fn(output_or_target, example=example, is_target=True),
        "if_chosen": base_postprocess_fn(output_or_target, example=example, is_target=False),
    }

  return fn


def score_metric(base_metric_fns: Sequence[Callable[..., Mapping[str, float]]],
                 length_normalize: bool = False) -> Callable[..., dict[str, float]]:
  """A SeqIO score metric: per example, the label word with the highest score is the prediction.

  Ties go to the first label word. `length_normalize` divides each score by the target's token count.
  Examples without a gold row (an unlabelled split) are skipped with a warning.
  """

  def rank_classification(targets: Sequence[Mapping[str, Any]], scores: Sequence[Any]) -> dict[str, float]:
    if len(targets) != len(scores):
      raise ValueError(f"{len(targets)} rank-classification rows but {len(scores)} scores")
    best: dict[int, tuple[float, int, Any]] = {}
    gold: dict[int, Any] = {}
    for row, score in zip(targets, scores):
      value = float(np.asarray(score).reshape([-1])[0])
      if length_normalize:
        value /= row["num_tokens"]
      key = row["example"]
      candidate = (value, -row["choice"], row["if_chosen"])
      if key not in best or candidate[:2] > best[key][:2]:
        best[key] = candidate
      if row["is_correct"]:
        gold[key] = row["gold"]
    missing = sorted(set(best) - set(gold))
    if missing:
      logging.warning("Rank classification: %d examples have no gold label word; skipped", len(missing))
    keys = sorted(gold)
    predictions = [best[k][2] for k in keys]
    golds = [gold[k] for k in keys]
    results: dict[str, float] = {}
    for metric_fn in base_metric_fns:
      results.update(metric_fn(golds, predictions))
    return results

  return rank_classification


# ------------------------------------------------------------------------------- (b) plain function
@dataclasses.dataclass(frozen=True)
class RankClassification:
  """Result of `rank_classify`.

  Attributes:
    predictions: [N] int, index of the best label word per input.
    scores: [N, C] float, the score of every label word (length-normalized if requested).
    label_words: the C candidates.
  """

  predictions: np.ndarray
  scores: np.ndarray
  label_words: tuple[Any, ...]

  @property
  def predicted_words(self) -> list[Any]:
    return [self.label_words[i] for i in self.predictions]


def _encode_all(texts: Sequence[Union[str, Sequence[int]]], vocabulary: Optional[seqio.Vocabulary],
                max_length: Optional[int], what: str) -> list[list[int]]:
  encoded = []
  for text in texts:
    if isinstance(text, str):
      if vocabulary is None:
        raise ValueError(f"rank_classify: {what} are strings, so a vocabulary is needed")
      ids = list(vocabulary.encode(text)) + [vocabulary.eos_id]
    else:
      ids = [int(t) for t in text]
    if max_length is not None and len(ids) > max_length:
      ids = ids[: max_length - 1] + [ids[-1]]  # Keep the final EOS.
    if not ids:
      raise ValueError(f"rank_classify: empty {what[:-1]} {text!r}")
    encoded.append(ids)
  return encoded


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros([len(rows), length], np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def make_batch(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], input_length: int,
               target_length: int, task_ids: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """T5X model features for (input, target) token rows, as SeqIO's EncDecFeatureConverter makes them."""
  encoder_input_tokens = _pad(inputs, input_length)
  decoder_target_tokens = _pad(targets, target_length)
  decoder_input_tokens = np.zeros_like(decoder_target_tokens)
  decoder_input_tokens[:, 1:] = decoder_target_tokens[:, :-1]  # BOS = 0.
  batch = {
      "encoder_input_tokens": encoder_input_tokens,
      "decoder_input_tokens": decoder_input_tokens,
      "decoder_target_tokens": decoder_target_tokens,
      "decoder_loss_weights": (decoder_target_tokens > 0).astype(np.int32),
  }
  if task_ids is not None:
    batch["task_ids"] = np.asarray(task_ids, np.int32)
  return batch


def rank_classify(score_fn: Optional[ScoreFn], inputs: Sequence[Union[str, Sequence[int]]],
                  label_words: Sequence[Union[str, Sequence[int]]], *,
                  vocabulary: Optional[seqio.Vocabulary] = None,
                  task_ids: Optional[Union[int, Sequence[int]]] = None, batch_size: int = 32,
                  input_length: Optional[int] = None, target_length: Optional[int] = None,
                  length_normalize: bool = False,
                  score_options_fn: Optional[ScoreFn] = None) -> RankClassification:
  """Scores every (input, label word) pair with `score_fn` and picks the best label word per input.

  Args:
    score_fn: `batch -> [B]` log-likelihood of each row's target, e.g.
      `functools.partial(model.score_batch, variables)`. Batches have the T5X features
      `encoder_input_tokens [B, n]`, `decoder_input_tokens [B, t]`, `decoder_target_tokens [B, t]`,
      `decoder_loss_weights [B, t]` and, with `task_ids`, `task_ids [B]`. May be None when
      `score_options_fn` is given.
    score_options_fn: instead of `score_fn`, one encoder pass per input:
      `functools.partial(model.score_options, variables)`, called with `max(1, batch_size // C)` inputs
      (`encoder_input_tokens [N, n]`, `task_ids [N]`) and their C label words each (`encoder_row [N*C]`,
      `decoder_* [N*C, t]`). The scores are those of `score_fn`.
    inputs: N input texts (or token id lists, EOS included).
    label_words: C candidate targets (texts or token id lists).
    vocabulary: encodes texts (EOS appended); default `prompt_mix.data.vocabulary.get_vocabulary()`.
    task_ids: one id for all inputs or N ids (global or local, whatever the model expects).
    batch_size: rows per `score_fn` call; the last batch is padded to full size (static shapes for
      jit), and the padding rows' scores are dropped.
    input_length / target_length: pad (and truncate) to these lengths; default: the longest.
    length_normalize: divide each score by its target's token count.
  Returns:
    RankClassification with predictions [N] and scores [N, C]; ties go to the first label word.
  """
  if vocabulary is None and any(isinstance(x, str) for x in list(inputs) + list(label_words)):
    from prompt_mix.data import vocabulary as vocabulary_lib  # pylint: disable=g-import-not-at-top
    vocabulary = vocabulary_lib.get_vocabulary()
  if not label_words:
    raise ValueError("rank_classify: no label words")
  input_ids = _encode_all(inputs, vocabulary, input_length, "inputs")
  label_ids = _encode_all(label_words, vocabulary, target_length, "label words")
  num_inputs, num_choices = len(input_ids), len(label_ids)
  input_length = input_length or max((len(x) for x in input_ids), default=1)
  target_length = target_length or max(len(x) for x in label_ids)
  if task_ids is not None:
    task_ids = np.broadcast_to(np.asarray(task_ids, np.int32), [num_inputs])

  if score_options_fn is not None:
    scores = _score_options(score_options_fn, input_ids, label_ids, input_length, target_length, task_ids,
                            batch_size)
  elif score_fn is None:
    raise ValueError("rank_classify needs score_fn or score_options_fn")
  else:
    scores = _score_rows(score_fn, input_ids, label_ids, input_length, target_length, task_ids, batch_size)
  scores = scores.reshape([num_inputs, num_choices])
  if length_normalize:
    scores = scores / np.array([len(x) for x in label_ids], np.float64)[None, :]
  return RankClassification(predictions=np.argmax(scores, axis=1) if num_inputs else np.zeros([0], int),
                            scores=scores, label_words=tuple(label_words))


def _score_rows(score_fn: ScoreFn, input_ids, label_ids, input_length: int, target_length: int,
                task_ids: Optional[np.ndarray], batch_size: int) -> np.ndarray:
  """[N * C] scores, one full row (input, label word) per pair."""
  num_inputs, num_choices = len(input_ids), len(label_ids)
  pairs = [(i, c) for i in range(num_inputs) for c in range(num_choices)]
  scores = np.zeros([num_inputs * num_choices], np.float64)
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    batch = make_batch([input_ids[i] for i, _ in padded], [label_ids[c] for _, c in padded],
                       input_length, target_length,
                       None if task_ids is None else task_ids[[i for i, _ in padded]])
    batch_scores = np.asarray(score_fn(batch), np.float64).reshape([-1])
    if batch_scores.shape[0] != batch_size:
      raise ValueError(f"score_fn returned {batch_scores.shape[0]} scores for a batch of {batch_size}")
    scores[start:start + len(chunk)] = batch_scores[: len(chunk)]
  return scores


def _score_options(score_options_fn: ScoreFn, input_ids, label_ids, input_length: int, target_length: int,
                   task_ids: Optional[np.ndarray], batch_size: int) -> np.ndarray:
  """[N * C] scores, each input encoded once with its C label words decoded on it."""
  num_inputs, num_choices = len(input_ids), len(label_ids)
  per_call = max(1, batch_size // num_choices)
  scores = np.zeros([num_inputs * num_choices], np.float64)
  for start in range(0, num_inputs, per_call):
    chunk = list(range(start, min(start + per_call, num_inputs)))
    padded = chunk + [chunk[-1]] * (per_call - len(chunk))
    targets = [label_ids[c] for _ in padded for c in range(num_choices)]
    batch = make_batch([input_ids[i] for i in padded], targets, input_length, target_length,
                       None if task_ids is None else task_ids[padded])
    batch["encoder_row"] = np.repeat(np.arange(per_call, dtype=np.int32), num_choices)
    batch_scores = np.asarray(score_options_fn(batch), np.float64).reshape([-1])
    if batch_scores.shape[0] != per_call * num_choices:
      raise ValueError(f"score_options_fn returned {batch_scores.shape[0]} scores for {per_call} inputs of "
                       f"{num_choices} label words")
    rows = len(chunk) * num_choices
    scores[start * num_choices:start * num_choices + rows] = batch_scores[:rows]
  return scores

