"""Mixtures: the ATTEMPT source tasks, the benchmark groups, and the ATTEMPT-m training groups.

Rates are proportional to the number of training examples, with no cap by default: the original code
concatenates the training sets of a multi-task group and shuffles them, which samples every example once
per epoch, i.e. each task in proportion to its size (in the ATTEMPT-m GLUE group MNLI is 41.5% of the
examples). `rate_num_examples.maximum` caps the rates instead, e.g. at `T5_RATE_CAP` (T5's
examples-proportional mixing with a limit): `prompt_mix_tasks.mixtures.rate_num_examples.maximum = 100000`
(MNLI then makes 25.8% of the GLUE group). The setting is read when the mixture is used, so gin applies.

The ATTEMPT-m groups are the original code's multi-task configs, task lists in config order:
GLUE `configs/attempt/eval_glue.json` (the released `attempt_mt_glue` model: 9 tasks, WNLI included),
SuperGLUE `multi_task_superglue.json` (BoolQ, CB, WiC, WSC -- not MultiRC) and Others
`multi_task_others.json` (PAWS, WinoGrande, SciTail, Yelp; its `max_train_samples: 100000` only shortens
Yelp-2, whose training split here is 100,000 already). The original numbers the tasks of a group by their
position in the config (`ORIGINAL_TASK_ORDER`); here the local task order of an ATTEMPT-m model is
`prompt_mix.data.task_ids.task_names_of(mixture)` (sorted names) unless TASK_NAMES gives one: set
`TASK_NAMES = ORIGINAL_TASK_ORDER[mixture]` to use the original's rows (e.g. its released target prompts).
"""

from __future__ import annotations

from typing import Optional

import gin
import seqio

DEFAULT_RATE_CAP: Optional[int] = None  # The paper / original code: no cap.
T5_RATE_CAP = 100_000  # The optional cap (gin: rate_num_examples.maximum).

SOURCE_TASKS = ("glue_mnli", "glue_sst2", "glue_qnli", "glue_qqp", "squad", "superglue_record")
GLUE_TASKS = ("glue_mnli", "glue_qqp", "glue_qnli", "glue_sst2", "glue_stsb", "glue_mrpc", "glue_rte",
              "glue_cola")
SUPERGLUE_TASKS = ("superglue_multirc", "superglue_boolq", "superglue_wic", "superglue_wsc", "superglue_cb")
MRQA_TASKS = ("mrqa_natural_questions", "mrqa_hotpotqa", "mrqa_searchqa", "mrqa_newsqa")
OTHERS_TASKS = ("winogrande", "yelp_polarity", "scitail", "paws_wiki")

# The original code's multi-task groups, in the order of their configs' `task_name` lists.
ORIGINAL_TASK_ORDER = {
    "attempt_m_glue_mixture": ("glue_mnli", "glue_qqp", "glue_qnli", "glue_sst2", "glue_rte", "glue_mrpc",
                               "glue_wnli", "glue_stsb", "glue_cola"),
    "attempt_m_superglue_mixture": ("superglue_boolq", "superglue_cb", "superglue_wic", "superglue_wsc"),
    "attempt_m_others_mixture": ("paws_wiki", "winogrande", "scitail", "yelp_polarity"),
}

MIXTURES = {
    "attempt_source_mixture": SOURCE_TASKS,
    "glue_mixture": GLUE_TASKS,  # The paper's 8 GLUE datasets.
    "superglue_mixture": SUPERGLUE_TASKS,
    "mrqa_mixture": MRQA_TASKS,
    "others_mixture": OTHERS_TASKS,
    # ATTEMPT-m: one shared attention module, one target prompt per task.
    **ORIGINAL_TASK_ORDER,
}


@gin.configurable
def rate_num_examples(task: seqio.Task, maximum: Optional[int] = DEFAULT_RATE_CAP) -> float:
  """Mixing rate = number of training examples of `task`, capped at `maximum` (None: no cap)."""
  return seqio.mixing_rate_num_examples(task, maximum=maximum)


for _name, _tasks in MIXTURES.items():
  seqio.MixtureRegistry.add(_name, list(_tasks), default_rate=rate_num_examples)
