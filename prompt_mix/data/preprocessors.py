"""Text-to-text formatting in the ATTEMPT paper's style, and the `task_id` feature.

A formatter maps one raw example (TFDS features) to strings
    {'inputs': '<prefix> <field>: <text> <field>: <text> ...', 'targets': '<label word>'}
plus, for evaluation, features the postprocessors read (`answers` for QA, `group` for MultiRC). E.g. MNLI:
    {'premise': 'A man eats.', 'hypothesis': 'Someone eats.', 'label': 0}
 -> {'inputs': 'mnli premise: A man eats. hypothesis: Someone eats.', 'targets': 'entailment'}

The formatters are graph-mode TF (no py_function), so pipelines stay fast and serializable. The
per-dataset formatters reproduce the text operations of T5 / the original ATTEMPT code (WSC span marks,
MultiRC markup removal, ReCoRD highlights, SQuAD punctuation padding) without their known bugs; the
differences are listed in docs/fidelity.md.

The task prefix that starts the inputs follows `get_prefix_style` (gin), read when a dataset is built, so a
binding parsed after the tasks were registered applies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence, Union

import gin
import seqio
import tensorflow as tf

Example = Mapping[str, Any]
Formatter = Callable[[Example], dict[str, tf.Tensor]]
PREFIX_STYLES = ("short", "original", "none")


# ------------------------------------------------------------------------------------ task prefixes
@gin.configurable
def get_prefix_style(prefix_style: str = "short") -> str:
  """Which task prefix starts the inputs.

  Args:
    prefix_style: 'short' (default): short T5-style task names (`boolq`, `nq`); 'original': the original
      ATTEMPT code's (`superglue-boolq`; `squad` for all four MRQA datasets, which its code formats with
      its SQuAD task; `superglue-record record` for ReCoRD); 'none': no task prefix (the original's
      adapter baselines, `add_prefix=False`; ReCoRD keeps its `record` word, hard-coded there).
  """
  if prefix_style not in PREFIX_STYLES:
    raise ValueError(f"get_prefix_style.prefix_style must be one of {PREFIX_STYLES}, got {prefix_style!r}")
  return prefix_style


@dataclasses.dataclass(frozen=True)
class TaskPrefix:
  """A task's input prefix in each style of `get_prefix_style`.

  Attributes:
    short: the default prefix, e.g. 'boolq'.
    original: the original ATTEMPT code's, e.g. 'superglue-boolq' (None: the same as `short`).
    bare: the prefix under style 'none' ('' omits it).
  """

  short: str
  original: Union[str, None] = None
  bare: str = ""

  def resolve(self) -> str:
    style = get_prefix_style()
    if style == "original":
      return self.short if self.original is None else self.original
    return self.bare if style == "none" else self.short


Prefix = Union[str, TaskPrefix]


def resolve_prefix(prefix: Prefix) -> str:
  """The prefix text now: a `TaskPrefix` by the current style, a plain string as it is."""
  return prefix.resolve() if isinstance(prefix, TaskPrefix) else prefix


# ------------------------------------------------------------------------------------- text pieces
def join_fields(prefix: Prefix, pieces: Sequence[tuple[str, tf.Tensor]]) -> tf.Tensor:
  """'prefix f1: t1 f2: t2' from (field label, text) pairs; an empty prefix is omitted."""
  prefix = resolve_prefix(prefix)
  parts = [tf.constant(prefix)] if prefix else []
  for label, text in pieces:
    parts += [tf.constant(f"{label}:"), text]
  return tf.strings.join(parts, separator=" ")


def label_word(label: tf.Tensor, label_words: Sequence[str], task: str) -> tf.Tensor:
  """The label word of class index `label`; a label outside [0, C) fails naming the task."""
  words = tf.constant(list(label_words))
  label = tf.cast(label, tf.int32)
  check = tf.debugging.Assert(
      (label >= 0) & (label < len(label_words)),
      [f"{task}: label outside [0, {len(label_words)}) for label words {list(label_words)}:", label])
  with tf.control_dependencies([check]):
    return tf.gather(words, tf.clip_by_value(label, 0, len(label_words) - 1))


def pad_punctuation(text: tf.Tensor) -> tf.Tensor:
  r"""Spaces around every character that is not a letter, number, mark, `_` or whitespace; whitespace runs
  collapsed to one space; stripped.

  This is the original ATTEMPT code's `pad_punctuation` (its regex `[^_\s\p{N}\p{L}\p{M}]`, which is also
  mT5's). T5's own SQuAD preprocessing (`t5.data.preprocessors._pad_punctuation`) pads `[[:punct:]]`, the
  ASCII punctuation only: unlike T5's, this one also pads non-ASCII punctuation and symbols (`–`, `“`,
  `€`) and does not pad `_`, and the result is stripped. `postprocessors.pad_punctuation` is its Python
  twin (RE2's `\s` is the ASCII whitespace `[\t\n\f\r ]`).
  """
  text = tf.strings.regex_replace(text, r"([^_\s\p{N}\p{L}\p{M}])", r" \1 ")
  return tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))


def stsb_target(label: tf.Tensor) -> tf.Tensor:
  """STS-B similarity in [0, 5] rounded to T5's 0.2 grid, as text: 3.47 -> '3.4', 3.5 -> '3.6'."""
  rounded = tf.round(tf.cast(label, tf.float32) * 5.0) / 5.0
  return tf.strings.as_string(rounded, precision=1)


def remove_markup(text: tf.Tensor) -> tf.Tensor:
  """MultiRC paragraphs: '<br>' -> ' ', '<b>'/'</b>' removed (T5's `remove_markup`)."""
  text = tf.strings.regex_replace(text, "<br>", " ")
  return tf.strings.regex_replace(text, "<(/)?b>", "")


def record_passage(passage: tf.Tensor) -> tf.Tensor:
  """ReCoRD passages: the '@highlight' bullet markers become sentence breaks (T5's `record`)."""
  passage = tf.strings.regex_replace(passage, r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
  return tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")


def mark_spans(text: tf.Tensor, spans: Sequence[tuple[tf.Tensor, tf.Tensor, str]]) -> tf.Tensor:
  """Surrounds word spans with marks: 'This is a test .' with ('test', 3, '*') -> 'This is a * test * .'.

  Args:
    text: the sentence, words separated by single spaces (SuperGLUE WSC).
    spans: (span text, index of its first word, mark). All indices refer to the unmarked text. A span
      whose words fall outside the sentence is left unmarked.
  """
  words = tf.strings.split(text, sep=" ")
  num_words = tf.size(words)
  for span_text, start, mark in spans:
    length = tf.maximum(tf.size(tf.strings.split(tf.strings.strip(span_text), sep=" ")), 1)
    start = tf.cast(start, tf.int32)
    end = start + length - 1
    valid = (start >= 0) & (end < num_words)
    positions = tf.range(num_words)
    opening = tf.where(valid & (positions == start), f"{mark} ", "")
    closing = tf.where(valid & (positions == end), f" {mark}", "")
    words = tf.strings.join([opening, words, closing])
  return tf.strings.reduce_join(words, separator=" ")


# --------------------------------------------------------------------------------------- formatters
def classification(prefix: Prefix, fields: Sequence[tuple[str, str]], label_words: Sequence[str], task: str,
                   label_key: str = "label") -> Formatter:
  """Formatter for '<prefix> <label>: <text> ...' -> label word.

  Args:
    fields: (field label shown in the input, raw feature key), e.g. [('premise', 'premise')].
  """

  def fn(ex):
    inputs = join_fields(prefix, [(label, ex[key]) for label, key in fields])
    return {"inputs": inputs, "targets": label_word(ex[label_key], label_words, task)}

  return fn


def stsb(prefix: Prefix, fields: Sequence[tuple[str, str]]) -> Formatter:
  """STS-B: the target is the similarity on the 0.2 grid ('3.4')."""

  def fn(ex):
    return {"inputs": join_fields(prefix, [(label, ex[key]) for label, key in fields]),
            "targets": stsb_target(ex["label"])}

  return fn


def wsc(prefix: Prefix, label_words: Sequence[str], task: str) -> Formatter:
  """SuperGLUE WSC: '<prefix> text: # He # asked * John * ...' (noun in '*', pronoun in '#')."""

  def fn(ex):
    text = mark_spans(ex["text"], [(ex["span1_text"], ex["span1_index"], "*"),
                                   (ex["span2_text"], ex["span2_index"], "#")])
    return {"inputs": join_fields(prefix, [("text", text)]),
            "targets": label_word(ex["label"], label_words, task)}

  return fn


def multirc(prefix: Prefix, label_words: Sequence[str], task: str) -> Formatter:
  """MultiRC: one (question, candidate answer) per example; `group` = 'paragraph/question' for EM."""

  def fn(ex):
    inputs = join_fields(prefix, [("question", remove_markup(ex["question"])),
                                  ("answer", remove_markup(ex["answer"])),
                                  ("paragraph", remove_markup(ex["paragraph"]))])
    group = tf.strings.join([tf.strings.as_string(ex["idx"]["paragraph"]),
                             tf.strings.as_string(ex["idx"]["question"])], separator="/")
    return {"inputs": inputs, "targets": label_word(ex["label"], label_words, task), "group": group}

  return fn


def _first_or_empty(values: tf.Tensor) -> tf.Tensor:
  return tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(""))


def question_answering(prefix: Prefix, answers_path: Sequence[str] = ("answers",),
                       context_key: str = "context", question_key: str = "question",
                       punctuation: bool = True) -> Formatter:
  """Extractive QA: '<prefix> question: Q context: C' -> first gold answer.

  With `punctuation=True` (the format of T5 and the original code) question, context and answers get
  `pad_punctuation`. Evaluation features:
    answers       [k] the gold answers as the targets are written (padded with `punctuation`): what T5
                      and the original score against (`postprocessors.get_qa_scoring` 'padded');
    gold_answers  [k] the dataset's own gold answers: what the official SQuAD / MRQA script scores;
    context       []  with `punctuation` only: the unpadded context, from which `postprocessors.qa` takes
                      the original text of a padded predicted span before official scoring.
  """
  pad = pad_punctuation if punctuation else (lambda t: t)

  def fn(ex):
    gold = ex
    for key in answers_path:
      gold = gold[key]
    answers = pad(gold)
    inputs = join_fields(prefix, [("question", pad(ex[question_key])), ("context", pad(ex[context_key]))])
    out = {"inputs": inputs, "targets": _first_or_empty(answers), "answers": answers, "gold_answers": gold}
    if punctuation:
      out["context"] = ex[context_key]
    return out

  return fn


def record(prefix: Prefix) -> Formatter:
  """ReCoRD: '<prefix> query: Q entities: e1, e2 passage: P' -> first gold entity; `answers` = all."""

  def fn(ex):
    entities = tf.strings.reduce_join(ex["entities"], separator=", ")
    inputs = join_fields(prefix, [("query", ex["query"]), ("entities", entities),
                                  ("passage", record_passage(ex["passage"]))])
    return {"inputs": inputs, "targets": _first_or_empty(ex["answers"]), "answers": ex["answers"]}

  return fn


# ------------------------------------------------------------------------------ dataset transforms
def format_with(formatter: Formatter) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A SeqIO preprocessor applying `formatter` to every example."""
  return seqio.map_over_dataset(formatter)


@seqio.map_over_dataset
def _add_task_id(ex, task_id: int):
  return {**ex, "task_id": tf.constant([task_id], tf.int32)}


def add_task_id(ds: tf.data.Dataset, task_id: int) -> tf.data.Dataset:
  """Adds the int32 feature `task_id` [1] (the task's global id, `task_ids.TASK_IDS`).

  A length-1 vector rather than a scalar: SeqIO's evaluator measures every output feature along axis 0.
  The feature converter turns it into the scalar `task_ids` of each example.
  """
  return _add_task_id(ds, task_id=task_id)


def one_example_per_answer(ds: tf.data.Dataset, key: str = "answers") -> tf.data.Dataset:
  """Raw ReCoRD training examples -> one example per gold answer (`key` becomes that one answer).

  T5 and the original code train on every (query, answer) pair; an example without answers is dropped.
  """

  def explode(ex):
    answers = ex[key]
    repeated = {k: tf.repeat(tf.expand_dims(v, 0), tf.size(answers), axis=0)
                for k, v in ex.items() if k != key and not isinstance(v, Mapping)}
    nested = {k: v for k, v in ex.items() if isinstance(v, Mapping)}
    per_answer = tf.data.Dataset.from_tensor_slices({**repeated, key: tf.expand_dims(answers, 1)})
    if nested:
      per_answer = per_answer.map(lambda e: {**e, **nested})
    return per_answer

  return ds.flat_map(explode)
