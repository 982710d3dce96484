"""Extractive QA: SQuAD v1.1 (an ATTEMPT source task) and the MRQA 2019 datasets NQ, HotpotQA,
SearchQA, NewsQA.

Inputs '<prefix> question: Q context: C' with punctuation padded (the format of T5 and the original code),
target the first gold answer. EM / F1 are the official SQuAD v1.1 / MRQA script's by default (the dataset's
own gold answers, max over them); `postprocessors.get_qa_scoring` switches to the padded scoring of T5 and
the original code. The original code formats the MRQA datasets with its SQuAD task, so their inputs start
with `squad`: `preprocessors.get_prefix_style.prefix_style = 'original'` does the same."""

from __future__ import annotations

from prompt_mix.data import metrics
from prompt_mix.data import postprocessors
from prompt_mix.data import preprocessors
from prompt_mix.data import registration as reg
from prompt_mix.data import splits

SQUAD_VERSION = "3.0.0"
MRQA_VERSION = "1.0.0"
ORIGINAL_MRQA_PREFIX = "squad"  # The original code's prefix of every MRQA dataset.

SQUAD = reg.TaskSpec(
    name="squad", tfds_name=f"squad/v1.1:{SQUAD_VERSION}",
    features={"question": reg.TEXT, "context": reg.TEXT, "answers": {"text": reg.TEXTS}},
    plan=splits.carve_train(),
    formatter=preprocessors.question_answering(preprocessors.TaskPrefix("squad"),
                                               answers_path=("answers", "text")),
    postprocess_fn=postprocessors.qa, metric_fns=(metrics.squad,))


def mrqa_spec(name: str, config: str, prefix: str) -> reg.TaskSpec:
  """An MRQA 2019 in-domain dataset: 1,000 training examples as dev, validation as test."""
  return reg.TaskSpec(
      name=name, tfds_name=f"mrqa/{config}:{MRQA_VERSION}",
      features={"question": reg.TEXT, "context": reg.TEXT, "answers": reg.TEXTS},
      plan=splits.carve_train(),
      formatter=preprocessors.question_answering(
          preprocessors.TaskPrefix(prefix, original=ORIGINAL_MRQA_PREFIX)),
      postprocess_fn=postprocessors.qa, metric_fns=(metrics.squad,))


NATURAL_QUESTIONS = mrqa_spec("mrqa_natural_questions", "natural_questions", "nq")
HOTPOTQA = mrqa_spec("mrqa_hotpotqa", "hotpot_qa", "hotpotqa")
SEARCHQA = mrqa_spec("mrqa_searchqa", "search_qa", "searchqa")
NEWSQA = mrqa_spec("mrqa_newsqa", "news_qa", "newsqa")

SPECS = [SQUAD, NATURAL_QUESTIONS, HOTPOTQA, SEARCHQA, NEWSQA]
for _spec in SPECS:
  reg.register(_spec)
