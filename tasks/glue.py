"""GLUE tasks: MNLI, QQP, QNLI, SST-2 (also ATTEMPT source tasks), STS-B, MRPC, RTE, CoLA, and WNLI (not
in the paper's tables; part of the original code's multi-task GLUE group)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from prompt_mix.data import metrics
from prompt_mix.data import postprocessors
from prompt_mix.data import preprocessors
from prompt_mix.data import registration as reg
from prompt_mix.data import splits

from . import label_words as label_words_lib

GLUE_VERSION = "2.0.0"

_CLASS_NAMES = {  # TFDS glue ClassLabel names, so local files may write labels by name.
    "glue_mnli": ("entailment", "neutral", "contradiction"),
    "glue_qqp": ("not_duplicate", "duplicate"),
    "glue_qnli": ("entailment", "not_entailment"),
    "glue_sst2": ("negative", "positive"),
    "glue_mrpc": ("not_equivalent", "equivalent"),
    "glue_rte": ("entailment", "not_entailment"),
    "glue_cola": ("unacceptable", "acceptable"),
    "glue_wnli": ("not_entailment", "entailment"),
}


def classification_spec(name: str, config: str, prefix: str, fields: Sequence[tuple[str, str]],
                        plan: splits.SplitPlan, metric_fns: Sequence[Callable],
                        label_words: Optional[Sequence[str]] = None) -> reg.TaskSpec:
  """A GLUE classification task '<prefix> <field>: <text> ...' -> label word.

  Args:
    fields: (label shown in the input, TFDS feature) pairs; every feature is text.
    label_words: defaults to `label_words.LABEL_WORDS[name]`.
  """
  words = tuple(label_words or label_words_lib.LABEL_WORDS[name])
  features = {key: reg.TEXT for _, key in fields}
  features["label"] = reg.CLASS
  return reg.TaskSpec(
      name=name, tfds_name=f"glue/{config}:{GLUE_VERSION}", features=features, plan=plan,
      formatter=preprocessors.classification(preprocessors.TaskPrefix(prefix), fields, words, name),
      postprocess_fn=postprocessors.class_id(words), metric_fns=tuple(metric_fns), label_words=words,
      label_names={"label": _CLASS_NAMES[name]})


MNLI = classification_spec(
    "glue_mnli", "mnli", "mnli", [("premise", "premise"), ("hypothesis", "hypothesis")],
    splits.official(validation="validation_mismatched", test="validation_matched"), [metrics.accuracy])
QQP = classification_spec(
    "glue_qqp", "qqp", "qqp", [("question1", "question1"), ("question2", "question2")],
    splits.carve_train(), [metrics.f1, metrics.accuracy])
QNLI = classification_spec(
    "glue_qnli", "qnli", "qnli", [("question", "question"), ("sentence", "sentence")],
    splits.carve_train(), [metrics.accuracy])
SST2 = classification_spec(
    "glue_sst2", "sst2", "sst2", [("sentence", "sentence")], splits.carve_train(), [metrics.accuracy])
MRPC = classification_spec(
    "glue_mrpc", "mrpc", "mrpc", [("sentence1", "sentence1"), ("sentence2", "sentence2")],
    splits.halve_validation(), [metrics.f1, metrics.accuracy])
RTE = classification_spec(
    "glue_rte", "rte", "rte", [("sentence1", "sentence1"), ("sentence2", "sentence2")],
    splits.halve_validation(), [metrics.accuracy])
COLA = classification_spec(
    "glue_cola", "cola", "cola", [("sentence", "sentence")], splits.halve_validation(),
    [metrics.matthews_corrcoef])
WNLI = classification_spec(  # A small dataset: the original halves its validation set, like RTE's.
    "glue_wnli", "wnli", "wnli", [("sentence1", "sentence1"), ("sentence2", "sentence2")],
    splits.halve_validation(), [metrics.accuracy])

STSB = reg.TaskSpec(
    name="glue_stsb", tfds_name=f"glue/stsb:{GLUE_VERSION}",
    features={"sentence1": reg.TEXT, "sentence2": reg.TEXT, "label": reg.FLOAT},
    plan=splits.halve_validation(),
    formatter=preprocessors.stsb(preprocessors.TaskPrefix("stsb"),
                                 [("sentence1", "sentence1"), ("sentence2", "sentence2")]),
    postprocess_fn=postprocessors.string_to_float(default=-1.0),
    metric_fns=(metrics.pearson, metrics.spearman))

SPECS = [MNLI, QQP, QNLI, SST2, STSB, MRPC, RTE, COLA, WNLI]
for _spec in SPECS:
  reg.register(_spec)
