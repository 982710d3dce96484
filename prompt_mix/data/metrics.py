"""Evaluation metrics, SeqIO-style: `metric(targets, predictions) -> {name: value}`, in percent.

Classification metrics take class ids from `prompt_mix.data.postprocessors.class_id`, where a prediction that is none of
the label words is INVALID (-1) and always counts as wrong: for binary F1 it becomes the opposite of the
target (T5's `f1_score_with_invalid`), for macro-F1 it is a miss of the true class.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np
import scipy.stats
import sklearn.metrics

MetricFn = Callable[..., Mapping[str, float]]


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """{'accuracy': percentage of predictions equal to their target}."""
  return {"accuracy": 100.0 * sklearn.metrics.accuracy_score(targets, predictions)}


def _with_invalid_as_wrong(targets: Sequence[int], predictions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  targets = np.asarray(targets, dtype=np.int64)
  predictions = np.asarray(predictions, dtype=np.int64)
  invalid = (predictions != 0) & (predictions != 1)
  return targets, np.where(invalid, 1 - targets, predictions)


def f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'f1': binary F1 of class 1}; invalid predictions count as wrong."""
  targets, predictions = _with_invalid_as_wrong(targets, predictions)
  return {"f1": 100.0 * sklearn.metrics.f1_score(targets, predictions, zero_division=0.0)}


def macro_f1(num_classes: int) -> MetricFn:
  """{'macro_f1': unweighted mean of the per-class F1 over classes 0..num_classes-1} (CB)."""

  def macro_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    value = sklearn.metrics.f1_score(targets, predictions, labels=list(range(num_classes)),
                                     average="macro", zero_division=0.0)
    return {"macro_f1": 100.0 * value}

  return macro_f1


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'matthews_corrcoef': Matthews correlation in percent} (CoLA)."""
  return {"matthews_corrcoef": 100.0 * sklearn.metrics.matthews_corrcoef(targets, predictions)}


def _correlation(name: str, fn, targets, predictions) -> dict[str, float]:
  targets = np.asarray(targets, dtype=np.float64)
  predictions = np.asarray(predictions, dtype=np.float64)
  if len(targets) < 2 or np.all(predictions == predictions[0]) or np.all(targets == targets[0]):
    logging.warning("%s is undefined for constant predictions or targets; reporting 0", name)
    return {name: 0.0}
  return {name: 100.0 * float(fn(targets, predictions)[0])}


def pearson(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """{'pearson': Pearson correlation in percent} (STS-B); 0 when undefined (constant values)."""
  return _correlation("pearson", scipy.stats.pearsonr, targets, predictions)


def spearman(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """{'spearman': Spearman rank correlation in percent} (STS-B); 0 when undefined."""
  return _correlation("spearman", scipy.stats.spearmanr, targets, predictions)


# ------------------------------------------------------------------------------------------ MultiRC
def multirc_f1(targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]) -> dict:
  """{'f1': binary F1 over all (question, answer) examples} (MultiRC's F1a)."""
  return f1([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets: Sequence[Mapping[str, Any]],
                        predictions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """{'exact_match': % of questions whose every answer option is classified correctly} (MultiRC's EM)."""
  per_question: dict[Any, bool] = collections.defaultdict(lambda: True)
  for target, prediction in zip(targets, predictions, strict=True):
    per_question[target["group"]] &= target["value"] == prediction["value"]
  if not per_question:
    return {"exact_match": 0.0}
  return {"exact_match": 100.0 * float(np.mean(list(per_question.values())))}


# ------------------------------------------------------------------------------------- SQuAD-style
# The official SQuAD v1.1 script (`evaluate-v1.1.py`) and the MRQA 2019 script (`mrqa_official_eval.py`,
# adapted from it) define `normalize_answer`, `f1_score`, `exact_match_score` and
# `metric_max_over_ground_truths`; T5's `qa_utils.normalize_squad` / `qa_metrics` are the same. These are
# those definitions; tests/test_metrics.py checks them against a re-statement of the scripts. Which gold
# answers and which prediction text reach them is `postprocessors.get_qa_scoring`'s choice.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_squad(text: str) -> str:
  """The official answer normalization: lower case, drop ASCII punctuation, then the words a / an / the,
  then collapse whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  prediction_tokens = prediction.split()
  target_tokens = target.split()
  common = collections.Counter(prediction_tokens) & collections.Counter(target_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{'em', 'f1'}: the official SQuAD / MRQA exact match and token F1 (bag of normalized whitespace tokens),
  each the max over the gold answers, averaged over examples, in percent.

  Args:
    targets: per example, the list of gold answers (a bare string counts as one answer).
    predictions: per example, the predicted answer text.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  ems, f1s = [], []
  for golds, prediction in zip(targets, predictions):
    golds = [golds] if isinstance(golds, str) else list(golds)
    golds = [normalize_squad(g) for g in golds] or [""]
    prediction = normalize_squad(prediction)
    ems.append(max(float(g == prediction) for g in golds))
    f1s.append(max(_token_f1(g, prediction) for g in golds))
  if not ems:
    return {"em": 0.0, "f1": 0.0}
  return {"em": 100.0 * float(np.mean(ems)), "f1": 100.0 * float(np.mean(f1s))}

