"""Label words per task: the target text of each class (index = TFDS class id).

The defaults are natural words, so a frozen T5 starts from meaningful targets and rank classification
compares words. The original ATTEMPT code uses the class index as text ('0', '1', '2'); `index_words`
gives that table. To train with other words, register a task with your own table (docs/tasks.md).
"""

from __future__ import annotations

LABEL_WORDS: dict[str, tuple[str, ...]] = {
    # GLUE (TFDS glue class order).
    "glue_mnli": ("entailment", "neutral", "contradiction"),
    "glue_qqp": ("not_duplicate", "duplicate"),
    "glue_qnli": ("entailment", "not_entailment"),
    "glue_sst2": ("negative", "positive"),
    "glue_mrpc": ("not_equivalent", "equivalent"),
    "glue_rte": ("entailment", "not_entailment"),
    "glue_cola": ("unacceptable", "acceptable"),
    "glue_wnli": ("not_entailment", "entailment"),  # TFDS order: 0 is not_entailment (unlike RTE).
    # SuperGLUE (TFDS super_glue class order).
    "superglue_multirc": ("False", "True"),
    "superglue_boolq": ("False", "True"),
    "superglue_wic": ("False", "True"),
    "superglue_wsc": ("False", "True"),
    "superglue_cb": ("entailment", "contradiction", "neutral"),
    # Others.
    "winogrande": ("option1", "option2"),
    "yelp_polarity": ("negative", "positive"),
    "scitail": ("entailment", "neutral"),
    "paws_wiki": ("not_paraphrase", "paraphrase"),
}


def index_words(name: str) -> tuple[str, ...]:
  """The original ATTEMPT code's label words for a task: '0', '1', ... ."""
  if name not in LABEL_WORDS:
    raise KeyError(f"{name!r} is not a classification task with label words; known: {sorted(LABEL_WORDS)}")
  return tuple(str(i) for i in range(len(LABEL_WORDS[name])))
