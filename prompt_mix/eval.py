"""Evaluates a trained method: `python -m prompt_mix.eval --gin_file=... --gin.MODEL_DIR=...`.

Restores the backbone (INITIAL_CHECKPOINT_PATH) and the training run's `peft` (latest, a step, or the best),
evaluates through SeqIO on EVAL_MIXTURE_OR_TASK_NAME / EVAL_SPLIT (generation and, for `_rank` tasks,
rank classification), and writes `eval/eval_metrics_<step>.json` (plus, for ATTEMPT, the mean attention
per task in `eval/attention_<step>.json`, which `prompt-mix-heatmap` draws).
"""

from prompt_mix import launch
from prompt_mix.training import evaluation


def main() -> None:
  """The `prompt-mix-eval` console script; the same as `python -m prompt_mix.eval`."""
  launch.run(evaluation.evaluate)


if __name__ == "__main__":
  main()
