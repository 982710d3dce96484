"""What the four binaries share: multi-host and TFDS flags, registering tasks and configurables, gin
parsing, and one-line errors for what a user got wrong.

    python -m prompt_mix.train --gin_file=runs/finetune.gin --gin_file=methods/prompt_tuning.gin \\
      --gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"glue_rte\\" ...
"""

from __future__ import annotations

import importlib
import re
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
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", None,
    "Multi-host: seconds a process may be silent before the others abort (JAX's default 100 when unset).")

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


# Errors that mean the configuration, the inputs or the filesystem are wrong: reported as one FATAL block
# (the whole message, continuation lines indented), no traceback. OSError covers a missing file, a read-only
# MODEL_DIR, a full disk.
USER_ERRORS = (gin_utils.GinConfigError, ValueError, OSError, FloatingPointError, KeyError)
# A message longer than this many lines is cut (the traceback at --verbosity=1 has it all).
MAX_FATAL_LINES = 200
_HINT = "(--verbosity=1 shows the traceback)"
# gin appends "In call to configurable 'train' (<function train at 0x...>)" to errors raised inside a
# configurable: noise for the user, dropped from the FATAL block.
_GIN_CONTEXT = re.compile(r"^\s*In call to configurable '[^']*' \(<.*>\)$")


def fatal_message(e: BaseException) -> str:
  """`FATAL: <Type>: <message>  (hint)` on one line, or, for a message of several lines, its first line then
  every further line indented: one block.

  The whole message is kept (a checkpoint error lists every mis-shaped leaf on its own line); only lines
  beyond `MAX_FATAL_LINES` are cut.
  """
  text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e  # KeyError's str() is a repr.
  lines = [line.rstrip() for line in str(text).strip().splitlines()
           if line.strip() and not _GIN_CONTEXT.match(line)]
  if not lines:
    lines = [type(e).__name__]
  if len(lines) > MAX_FATAL_LINES:
    lines = lines[:MAX_FATAL_LINES] + [f"... {len(lines) - MAX_FATAL_LINES} more lines"]
  head = f"FATAL: {type(e).__name__}: {lines[0]}"
  if len(lines) == 1:
    return f"{head}  {_HINT}"
  rest = [line if line.startswith((" ", "\t")) else "  " + line for line in lines[1:]]
  return "\n".join([head, *rest, f"  {_HINT}"])


def quiet_closed_event_loop(default: Callable[[Any], None]) -> Callable[[Any], None]:
  """A `sys.unraisablehook` that drops "RuntimeError: Event loop is closed", forwarding all else to `default`.

  When one TensorStore read of a checkpoint fails (a corrupt file), Orbax's event loop ends with the error
  while sibling reads are still in flight; each of them completes later into the closed loop, and Python
  printed a traceback per read after the FATAL line. The real error is already reported.
  """

  def hook(unraisable) -> None:
    error = getattr(unraisable, "exc_value", None)
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      logging.debug("Ignored a late callback into a closed event loop (an aborted checkpoint read)")
      return
    default(unraisable)

  return hook


def prepare() -> None:
  """Initializes multi-host JAX, the TFDS directory, the registries, then parses the gin flags."""
  partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                      _HEARTBEAT.value)
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
    sys.unraisablehook = quiet_closed_event_loop(sys.unraisablehook)
    try:
      entry()
    except gin_utils.GinConfigError:
      raise
    except USER_ERRORS as e:
      logging.debug("Traceback of the error below:", exc_info=True)
      sys.exit(fatal_message(e))

  gin_utils.run(main)
