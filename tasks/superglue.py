"""SuperGLUE tasks: MultiRC, BoolQ, WiC, WSC, CB, and ReCoRD (an ATTEMPT source task)."""

from __future__ import annotations

from prompt_mix.data import metrics
from prompt_mix.data import postprocessors
from prompt_mix.data import preprocessors
from prompt_mix.data import registration as reg
from prompt_mix.data import splits

from . import label_words as label_words_lib

SUPER_GLUE_VERSION = "1.0.2"
_WORDS = label_words_lib.LABEL_WORDS
_BOOL = ("False", "True")  # TFDS super_glue class names of the binary tasks.


def _tfds(config: str) -> str:
  return f"super_glue/{config}:{SUPER_GLUE_VERSION}"


def _prefix(short: str, original: str, bare: str = "") -> preprocessors.TaskPrefix:
  """`short` by default; the original code prefixes with its task names ('superglue-boolq')."""
  return preprocessors.TaskPrefix(short, original=original, bare=bare)


BOOLQ = reg.TaskSpec(
    name="superglue_boolq", tfds_name=_tfds("boolq"),
    features={"question": reg.TEXT, "passage": reg.TEXT, "label": reg.CLASS},
    plan=splits.halve_validation(),
    formatter=preprocessors.classification(
        _prefix("boolq", "superglue-boolq"), [("question", "question"), ("passage", "passage")],
        _WORDS["superglue_boolq"],
        "superglue_boolq"),
    postprocess_fn=postprocessors.class_id(_WORDS["superglue_boolq"]), metric_fns=(metrics.accuracy,),
    label_words=_WORDS["superglue_boolq"], label_names={"label": _BOOL})

CB = reg.TaskSpec(
    name="superglue_cb", tfds_name=_tfds("cb"),
    features={"premise": reg.TEXT, "hypothesis": reg.TEXT, "label": reg.CLASS},
    plan=splits.halve_validation(),
    formatter=preprocessors.classification(
        _prefix("cb", "superglue-cb"), [("premise", "premise"), ("hypothesis", "hypothesis")],
        _WORDS["superglue_cb"],
        "superglue_cb"),
    postprocess_fn=postprocessors.class_id(_WORDS["superglue_cb"]),
    metric_fns=(metrics.macro_f1(num_classes=3), metrics.accuracy),
    label_words=_WORDS["superglue_cb"], label_names={"label": ("entailment", "contradiction", "neutral")})

WIC = reg.TaskSpec(
    name="superglue_wic", tfds_name=_tfds("wic"),
    features={"sentence1": reg.TEXT, "sentence2": reg.TEXT, "word": reg.TEXT, "label": reg.CLASS},
    plan=splits.halve_validation(),
    formatter=preprocessors.classification(
        _prefix("wic", "superglue-wic"),
        [("sentence1", "sentence1"), ("sentence2", "sentence2"), ("word", "word")],
        _WORDS["superglue_wic"], "superglue_wic"),
    postprocess_fn=postprocessors.class_id(_WORDS["superglue_wic"]), metric_fns=(metrics.accuracy,),
    label_words=_WORDS["superglue_wic"], label_names={"label": _BOOL})

WSC = reg.TaskSpec(
    name="superglue_wsc", tfds_name=_tfds("wsc.fixed"),
    features={"text": reg.TEXT, "span1_index": reg.INT32, "span1_text": reg.TEXT,
              "span2_index": reg.INT32, "span2_text": reg.TEXT, "label": reg.CLASS},
    plan=splits.halve_validation(),
    formatter=preprocessors.wsc(_prefix("wsc", "superglue-wsc.fixed"), _WORDS["superglue_wsc"],
                                "superglue_wsc"),
    postprocess_fn=postprocessors.class_id(_WORDS["superglue_wsc"]), metric_fns=(metrics.accuracy,),
    label_words=_WORDS["superglue_wsc"], label_names={"label": _BOOL})

MULTIRC = reg.TaskSpec(
    name="superglue_multirc", tfds_name=_tfds("multirc"),
    features={"paragraph": reg.TEXT, "question": reg.TEXT, "answer": reg.TEXT, "label": reg.CLASS,
              "idx": {"paragraph": reg.INT32, "question": reg.INT32}},
    # Dev / test halves keep all answers of a question together (the EM metric is per question).
    plan=splits.halve_validation(group_by=("idx/paragraph", "idx/question")),
    formatter=preprocessors.multirc(_prefix("multirc", "superglue-multirc"), _WORDS["superglue_multirc"],
                                    "superglue_multirc"),
    postprocess_fn=postprocessors.multirc(_WORDS["superglue_multirc"]),
    metric_fns=(metrics.multirc_f1, metrics.multirc_exact_match),
    label_words=_WORDS["superglue_multirc"], label_names={"label": _BOOL})

RECORD = reg.TaskSpec(
    name="superglue_record", tfds_name=_tfds("record"),
    features={"passage": reg.TEXT, "query": reg.TEXT, "entities": reg.TEXTS, "answers": reg.TEXTS},
    plan=splits.carve_train(),
    # The original writes 'record query: ...' and prefixes its task name to that.
    formatter=preprocessors.record(_prefix("record", "superglue-record record", bare="record")),
    postprocess_fn=postprocessors.qa, metric_fns=(metrics.squad,),
    train_transform=preprocessors.one_example_per_answer)

SPECS = [MULTIRC, BOOLQ, WIC, WSC, CB, RECORD]
for _spec in SPECS:
  reg.register(_spec)
