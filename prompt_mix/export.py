"""Exports a trained method: `python -m prompt_mix.export --gin_file=... --gin.MODEL_DIR=... --gin.EXPORT_DIR=...`.

Restores a training checkpoint's `peft` tree (the latest; `--gin.CHECKPOINT_STEP=<n>` or `'best'`) and
writes EXPORT_FORMATS (`['npy', 'safetensors', 'peft']`) under EXPORT_DIR: `.npy` per leaf with a
manifest, one safetensors file, and an HF PEFT adapter where PEFT represents the method exactly. The gin
files are the run's `config.gin` (MODEL_DIR/config.gin) or the model and method files of training;
`runs/export.gin`, which binds `export`, is always read first, so only the run's files and the EXPORT_*
macros need passing. See docs/export.md.
"""

import sys

from prompt_mix import launch
from prompt_mix.training import exporter

EXPORT_GIN = "runs/export.gin"


def _with_export_gin(argv: list[str]) -> list[str]:
  """argv with `--gin_file=runs/export.gin` first (unless given), so the run's files override it."""
  if any(arg.endswith(EXPORT_GIN) for arg in argv[1:]):
    return argv
  return argv[:1] + [f"--gin_file={EXPORT_GIN}"] + argv[1:]


def main() -> None:
  """The `prompt-mix-export` console script; the same as `python -m prompt_mix.export`."""
  sys.argv = _with_export_gin(sys.argv)
  launch.run(exporter.export)


if __name__ == "__main__":
  main()
