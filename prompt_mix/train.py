"""Trains a method on a frozen T5: `python -m prompt_mix.train --gin_file=... --gin.MODEL_DIR=...`.

See `prompt_mix/configs/runs/finetune.gin` for the macros (MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
TRAIN_STEPS, BATCH_SIZE, INITIAL_CHECKPOINT_PATH, EVAL_PERIOD, ...).
"""

from prompt_mix import launch
from prompt_mix.training import trainer


def main() -> None:
  """The `prompt-mix-train` console script; the same as `python -m prompt_mix.train`."""
  launch.run(trainer.train)


if __name__ == "__main__":
  main()
