"""Runs a trained method on a task or mixture: `python -m prompt_mix.infer --gin_file=... --gin.MODEL_DIR=...`.

Writes JSONL, one line per example: `task`, `inputs`, `targets`, `prediction`, `score` (log-probability of
the prediction) and, for ATTEMPT, `attention` (the weights over the candidates). The tasks of a mixture
are interleaved, so each batch mixes tasks and one loaded backbone serves them all (mixed-task serving, docs/design.md).
"""

from prompt_mix import launch
from prompt_mix.training import inference


def main() -> None:
  """The `prompt-mix-infer` console script; the same as `python -m prompt_mix.infer`."""
  launch.run(inference.infer)


if __name__ == "__main__":
  main()
