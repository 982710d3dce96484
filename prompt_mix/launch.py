"""What the four binaries share: multi-host and TFDS flags, registering tasks and configurables, gin
parsing, and one-line errors for what a user got wrong.

    python -m prompt_mix.train --gin_file=runs/finetune.gin --gin_file=methods/prompt_tuning.gin \\
      --gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"glue_rte\\" ...
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging

from prompt_mix import gin_utils
from prompt_mix import methods
from prompt_mix import partitioning

_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (overrides the tasks').")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

# Modules whose gin configurables and SeqIO tasks every binary can name. The methods' modules (every
# module of `prompt_mix.peft`) come from the method registry, `methods.import_all()`.
REGISTERED_MODULES = (
    "prompt_mix.t5.config",
    "prompt_mix.t5.model",
    "prompt_mix.training.optimizers",
    "prompt_mix.training.trainer",
    "prompt_mix.training.evaluation",
    "prompt_mix.training.inference",
    "prompt_mix.training.exporter",
    "prompt_mix.data.feature_converter",
    "prompt_mix_tasks",
)


def import_registered() -> None:
  """Imports `REGISTERED_MODULES` and every method module, so gin and SeqIO know all they name."""
  for name in REGISTERED_MODULES:
    importlib.import_module(name)
  methods.import_all()


# Errors that mean the configuration or the inputs are wrong: reported in one line, no traceback.
USER_ERRORS = (gin_utils.GinConfigError, ValueError, FileNotFoundError, FloatingPointError, KeyError)


def prepare() -> None:
  """Initializes multi-host JAX, the TFDS directory, the registries, then parses the gin flags."""
  partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _TFDS_DATA_DIR.value:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(_TFDS_DATA_DIR.value)
  import_registered()
  gin_utils.parse_gin_from_flags()


def run(entry: Callable[[], Any]) -> None:
  """Runs `entry()` as an absl program after `prepare()`, with one-line errors for user mistakes."""

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      sys.exit(f"FATAL: unexpected arguments {argv[1:]} (settings go through --gin_file / --gin.NAME=...)")
    prepare()
    try:
      entry()
    except gin_utils.GinConfigError:
      raise
    except USER_ERRORS as e:
      logging.debug("Traceback of the error below:", exc_info=True)
      message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      sys.exit(f"FATAL: {type(e).__name__}: {message}  (--verbosity=1 shows the traceback)")

  gin_utils.run(main)
