"""SeqIO postprocessors: decoded text -> the values the metrics compare.

Signature (SeqIO's): `fn(output_or_target: str, example: dict | None = None, is_target: bool = False)`.
`example` is the preprocessed task example (NumPy values, strings as bytes), so a postprocessor can read
features the formatter kept for evaluation (`answers`, `group`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence
import unicodedata

import gin
import numpy as np

Postprocessor = Callable[..., Any]
INVALID = -1  # Class id of a prediction that is none of the label words.
QA_SCORING = ("official", "padded", "padded_joined")


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  return str(value)


def class_id(label_words: Sequence[str]) -> Postprocessor:
  """Label word -> class index; anything else -> INVALID (-1), which every metric counts as wrong."""
  index = {w: i for i, w in enumerate(label_words)}

  def fn(output: str, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> int:
    del example, is_target
    return index.get(_text(output).strip(), INVALID)

  return fn


def string_to_float(default: float = -1.0) -> Postprocessor:
  """'3.4' -> 3.4; unparsable text -> `default` (T5's `string_to_float`, used for STS-B)."""

  def fn(output: str, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> float:
    del example, is_target
    try:
      return float(_text(output).strip())
    except ValueError:
      return default

  return fn


def multirc(label_words: Sequence[str]) -> Postprocessor:
  """MultiRC: {'group': question key, 'value': class id}, grouped per question by the EM metric."""
  to_id = class_id(label_words)

  def fn(output: str, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> dict:
    if example is None or "group" not in example:
      raise ValueError("MultiRC postprocessing needs the example's 'group' feature (question key)")
    return {"group": _text(example["group"]), "value": to_id(output)}

  return fn


# ------------------------------------------------------------------------------------------------ QA
@gin.configurable
def get_qa_scoring(qa_scoring: str = "official") -> str:
  """How extractive QA (SQuAD, MRQA) predictions are scored; the metric is `metrics.squad` either way.

  Args:
    qa_scoring: 'official' (default): as the official SQuAD v1.1 / MRQA script, the dataset's own gold
      answers against the prediction; a prediction that is a span of the punctuation-padded context (the
      format the model reads and is trained to write) is first mapped back to that span's text in the
      unpadded context (`recover_span`). 'padded': as T5 (and the original ATTEMPT code on examples with
      one answer), the padded gold answers against the prediction as generated (padding changes the token
      counts: gold `U.S. Army` against `Army` is F1 50 there, 66.7 officially). 'padded_joined': as the
      original ATTEMPT code on every example: one gold, the padded answers joined by spaces (its target
      string), against the prediction as generated.
  """
  if qa_scoring not in QA_SCORING:
    raise ValueError(f"get_qa_scoring.qa_scoring must be one of {QA_SCORING}, got {qa_scoring!r}")
  return qa_scoring


_RE2_SPACE = "\t\n\f\r "  # RE2's \s, as in the TF formatter's regexes.
_ASCII_SPACE = " \t\n\v\f\r"  # What tf.strings.strip removes.
_RE2_SPACE_RUN = re.compile("[\t\n\f\r ]+")


def _kept(ch: str) -> bool:
  """Whether `preprocessors.pad_punctuation` leaves `ch` unpadded: `_`, whitespace, numbers, letters, marks."""
  return ch == "_" or ch in _RE2_SPACE or unicodedata.category(ch)[0] in "NLM"


def pad_punctuation(text: str) -> str:
  """Python twin of `preprocessors.pad_punctuation` (equal on every string; tests/test_metrics.py)."""
  padded = "".join(ch if _kept(ch) else f" {ch} " for ch in text)
  return _RE2_SPACE_RUN.sub(" ", padded).strip(_ASCII_SPACE)


def _padded_tokens(text: str) -> list[tuple[str, int, int]]:
  """(token, start, end) of the tokens `pad_punctuation(text)` separates by spaces, with their spans in
  `text`: runs of kept non-space characters, and each padded character alone."""
  tokens = []
  i, n = 0, len(text)
  while i < n:
    if text[i] in _RE2_SPACE:
      i += 1
    elif not _kept(text[i]):
      tokens.append((text[i], i, i + 1))
      i += 1
    else:
      j = i
      while j < n and _kept(text[j]) and text[j] not in _RE2_SPACE:
        j += 1
      tokens.append((text[i:j], i, j))
      i = j
  return tokens


def recover_span(prediction: str, context: str) -> str:
  """The text of `context` that a prediction in padded form stands for, else the prediction itself.

  A prediction found verbatim in `context` is kept. Otherwise, if its padded tokens occur in the padded
  context, the first such span of the unpadded context is returned: 'U . S . Army' in a context with
  'the U.S. Army' gives 'U.S. Army'. Anything else (not a span of the context) is returned unchanged.
  """
  if not prediction.strip() or prediction in context:
    return prediction
  wanted = [t for t, _, _ in _padded_tokens(prediction)]
  tokens = _padded_tokens(context)
  k = len(wanted)
  for i in range(len(tokens) - k + 1):
    if tokens[i][0] == wanted[0] and [t for t, _, _ in tokens[i:i + k]] == wanted:
      return context[tokens[i][1]:tokens[i + k - 1][2]]
  return prediction


def qa(output: str, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> Any:
  """QA / ReCoRD: a target becomes the list of gold answers, a prediction its text (see `get_qa_scoring`).

  Targets: `example['gold_answers']` (the dataset's own) under 'official' scoring, `example['answers']`
  (as the targets are written) under 'padded' scoring or when the example has no `gold_answers` (ReCoRD),
  those joined by spaces into one gold under 'padded_joined' (QA tasks with `gold_answers` only).
  Predictions: under 'official' scoring and with `example['context']` (tasks whose text is padded), the
  unpadded context span the prediction stands for (`recover_span`). Normalization happens in the metric.
  """
  scoring = get_qa_scoring()
  official = scoring == "official"
  if not is_target:
    prediction = _text(output)
    if official and example is not None and "context" in example:
      return recover_span(prediction, _text(example["context"]))
    return prediction
  if example is None or "answers" not in example:
    return [_text(output)]
  key = "gold_answers" if official and "gold_answers" in example else "answers"
  answers = [_text(a) for a in np.asarray(example[key]).reshape([-1])]
  if scoring == "padded_joined" and "gold_answers" in example:
    return [" ".join(answers)]
  return answers or [""]
