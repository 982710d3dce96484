"""Command-line gin for the train/eval/infer binaries, as T5X's `gin_utils`.

Importing this module defines the absl flags

  --gin_file          (repeatable) gin files, parsed in order; relative paths are looked up in the search paths
  --gin_bindings      (repeatable) single bindings applied after the files, e.g. `--gin_bindings='X = 1'`
  --gin_search_paths  comma-separated directories for `--gin_file` and `include`; by default the current
                      directory and the package's own `prompt_mix/configs/` (models/, methods/, runs/, demo/)

and `run(main)` accepts T5X's shorthand `--gin.NAME=VALUE`, rewritten to `--gin_bindings=NAME = VALUE`.
As in T5X, VALUE is a gin literal, so strings need quotes: `--gin.MODEL_DIR=\\"/tmp/run\\"` in a shell
(`--gin.MODEL_DIR='"/tmp/run"'` also works), `--gin.TRAIN_STEPS=1000`, `--gin.TASK_FEATURE_LENGTHS=
"{'inputs': 256, 'targets': 8}"`. A binary looks like::

  from prompt_mix import gin_utils

  def main(argv):
    gin_utils.parse_gin_from_flags()
    model_dir = gin_utils.require_macro('MODEL_DIR')
    ...

  if __name__ == '__main__':
    gin_utils.run(main)

Configuration mistakes surface as one-line `GinConfigError`s naming the file, binding or macro; `run` prints
them without a traceback and exits with status 1. A command-line macro binding that no binding references
(`--gin.CHECKPOINT_PERIDO=2`, which would change nothing) is such an error too, naming the closest known
macro.
"""

from __future__ import annotations

# gin-config 0.5.0 calls `importlib.util.find_spec` after only `import importlib`; Python 3.12 no longer
# imports `importlib.util` at start-up, so a gin file looked up on the Python path failed with
# "module 'importlib' has no attribute 'util'" unless something else had imported it.
import datetime
import difflib
import importlib.util  # pylint: disable=unused-import
import logging as std_logging
import os
import pathlib
import re
import sys
from typing import Any, Callable, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import gin
from gin import config as gin_config

from prompt_mix import atomic

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# The gin files shipped inside the package (package data, so a wheel install has them too), the way T5X
# finds its own `t5x/configs`.
CONFIG_DIR = _PACKAGE_DIR / "configs"


def default_gin_search_paths() -> list[str]:
  """`['.', <package>/configs]`: the current directory, then the gin files installed with the package."""
  return [".", str(CONFIG_DIR)]


GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", default=None,
    help="Gin file to parse; repeat for several, later ones override earlier ones. Relative paths are "
         "resolved against --gin_search_paths, e.g. --gin_file=runs/prompt_tuning_glue.gin.")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", default=[],
    help="Individual gin binding applied after the gin files, e.g. --gin_bindings='TRAIN_STEPS = 10'. "
         "--gin.NAME=VALUE is shorthand for --gin_bindings='NAME = VALUE'.")
GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths", default=default_gin_search_paths(),
    help="Comma-separated directories searched for --gin_file and gin `include` paths.")


class _GinProbeFilter(std_logging.Filter):
  """Drops gin's "Path not found: models/x.gin" records.

  gin's resource reader logs one at error level for every search-path prefix it probes before the one
  that has the file, so every run printed several false errors. A file that is truly missing is still an
  error: gin raises, and `parse_gin_flags` reports it naming the file and the paths searched.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.module == "resource_reader" and str(record.msg).startswith("Path not found"))


def _install_probe_filter() -> None:
  root = std_logging.getLogger()  # gin's resource_reader logs through the root logger.
  if not any(isinstance(f, _GinProbeFilter) for f in root.filters):
    root.addFilter(_GinProbeFilter())


_install_probe_filter()


class GinConfigError(ValueError):
  """A gin file, binding or required value is wrong; the message is one line and names it."""


class MissingMacroError(GinConfigError):
  """A macro the binary needs (e.g. MODEL_DIR) is unbound or still `%gin.REQUIRED`."""


def _one_line(text: str) -> str:
  return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _missing(name: str) -> MissingMacroError:
  return MissingMacroError(f"{name} is required: pass --gin.{name}=...")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """Rewrites each `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`; other arguments are kept.

  VALUE is passed on verbatim as a gin literal (T5X's behaviour: no quoting is added).

  Args:
    args: command-line arguments, e.g. `sys.argv`.

  Returns:
    The rewritten arguments.

  Raises:
    GinConfigError: for a `--gin.` argument without `=`.
  """
  out = []
  for arg in args:
    if not arg.startswith("--gin."):
      out.append(arg)
      continue
    if "=" not in arg:
      raise GinConfigError(f"gin argument {arg!r} must be of the form --gin.NAME=VALUE")
    name, value = arg[len("--gin."):].split("=", 1)
    if not name:
      raise GinConfigError(f"gin argument {arg!r} has no NAME: expected --gin.NAME=VALUE")
    rewritten = f"--gin_bindings={name} = {value}"
    logging.info("Rewritten gin arg: %s", rewritten)
    out.append(rewritten)
  return out


def _binding_hint(binding: str) -> str:
  """A hint for the classic mistake of an unquoted string value."""
  name, _, value = binding.partition("=")
  value = value.strip()
  if value and re.fullmatch(r"[^'\"\[\]{}()@%0-9+\-.][^'\"\[\]{}()]*", value) and value not in (
      "True", "False", "None"):
    return f" (string values need quotes: --gin.{name.strip()}='\"{value}\"')"
  return ""


_REQUIRED_RE = re.compile(r"^(?:(?P<macro>[\w.]+)/macro\.value|(?P<param>\S+)) set to `%gin\.REQUIRED`")


_MACRO_RE = re.compile(r"^[A-Za-z_][\w]*(?:/[A-Za-z_][\w]*)*$")


def _binding_macro(binding: str) -> Optional[str]:
  """The macro a binding `NAME = value` sets (gin: a name without '.'), or None for a parameter binding."""
  name = binding.split("=", 1)[0].strip()
  return name if _MACRO_RE.match(name) else None


def _referenced_macros() -> set[str]:
  """Macros some binding (of a configurable or of another macro) refers to as `%NAME`."""
  return {ref.config_key[0] for ref in gin_config.iterate_references(gin_config._CONFIG)  # pylint: disable=protected-access
          if ref.configurable.wrapped is gin_config.macro}


def _defined_macros() -> set[str]:
  return {key[0] for key in gin_config._CONFIG if key[1] == "gin.macro"}  # pylint: disable=protected-access


def check_bindings_used(gin_bindings: Sequence[str], allowed_macros: Sequence[str] = ()) -> None:
  """Raises `GinConfigError` for a macro binding that no binding refers to.

  `--gin.CHECKPOINT_PERIDO=2` defines a new macro that nothing reads: the run would go on with the default
  CHECKPOINT_PERIOD. The error names the binding and the closest macro the config knows (difflib).

  Args:
    gin_bindings: the command-line bindings (`NAME = value`); parameter bindings (`fn.param = value`)
      are checked by gin itself.
    allowed_macros: macros the binary reads itself (`require_macro`), used though nothing refers to them.
  """
  referenced = _referenced_macros() | set(allowed_macros)
  for binding in gin_bindings or ():
    name = _binding_macro(binding)
    if name is None or name in referenced:
      continue
    known = sorted((_defined_macros() | referenced) - {name})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = (f"; did you mean {close[0]}? (--gin.{close[0]}=...)" if close else
            f"; the macros this configuration reads are {', '.join(sorted(referenced)) or 'none'}")
    raise GinConfigError(f"gin binding {binding!r}: no binding uses the macro {name}, so it would change "
                         f"nothing{hint}")


def setting_name(configurable: str, parameter: str) -> str:
  """How a user sets `configurable.parameter`: the macro bound to it (`TRAIN_STEPS`), else the parameter.

  For messages about bad values, so they name what the user typed.
  """
  try:
    value = gin.query_parameter(f"{configurable}.{parameter}")
  except (ValueError, KeyError):
    return f"{configurable}.{parameter}"
  if isinstance(value, gin_config.ConfigurableReference) and value.configurable.wrapped is gin_config.macro:
    return value.config_key[0]
  return f"{configurable}.{parameter}"


def parse_gin_flags(gin_search_paths: Sequence[str], gin_files: Sequence[str], gin_bindings: Sequence[str],
                    skip_unknown: Union[bool, Sequence[str]] = False, finalize_config: bool = True,
                    allowed_macros: Sequence[str] = ()) -> None:
  """Registers search paths, parses the files then the bindings, and (by default) finalizes the config.

  Equivalent to `gin.parse_config_files_and_bindings`, but each file and binding is parsed on its own so a
  failure names it.

  Args:
    gin_search_paths: directories searched for relative gin file paths and `include`s.
    gin_files: gin files, parsed in order (later ones override earlier ones).
    gin_bindings: bindings applied after the files, in order.
    skip_unknown: ignore bindings of unknown configurables (True, or a list of configurable names).
    finalize_config: lock the config and run gin's finalize checks (a `%gin.REQUIRED` left unbound fails
      here with `MissingMacroError`).
    allowed_macros: macros the caller reads directly, which a binding may set though nothing refers to
      them (see `check_bindings_used`).

  Raises:
    GinConfigError: one line naming the offending search path, file or binding (also a macro binding that
      nothing uses).
    MissingMacroError: a macro is still `%gin.REQUIRED` at finalization.
  """
  registered = gin_config._LOCATION_PREFIXES  # pylint: disable=protected-access  # gin has no getter.
  for path in gin_search_paths or ():
    if not os.path.isdir(path) and "://" not in path:
      logging.warning("gin search path %s is not a directory", path)
    if path not in registered:
      gin.add_config_file_search_path(path)
  for gin_file in gin_files or ():
    try:
      gin.parse_config_file(gin_file, skip_unknown=skip_unknown)
    except OSError as e:  # This file or one it includes; gin's message names it and the paths searched.
      raise GinConfigError(f"gin file {gin_file!r}: {_one_line(e)}") from e
    except Exception as e:  # pylint: disable=broad-except  # gin raises ValueError, SyntaxError, TokenError...
      where = ""
      if isinstance(e, SyntaxError) and e.filename and e.filename != gin_file:
        where = f" (in {e.filename}, line {e.lineno})"
      raise GinConfigError(f"gin file {gin_file!r}{where}: {type(e).__name__}: {_one_line(e)}") from e
  for binding in gin_bindings or ():
    try:
      gin.parse_config(binding, skip_unknown=skip_unknown)
    except Exception as e:  # pylint: disable=broad-except
      raise GinConfigError(
          f"gin binding {binding!r}: {type(e).__name__}: {_one_line(e)}{_binding_hint(binding)}") from e
  check_bindings_used(gin_bindings, allowed_macros)
  if finalize_config:
    try:
      gin.finalize()
    except ValueError as e:
      match = _REQUIRED_RE.match(str(e))
      if match and match.group("macro"):
        raise _missing(match.group("macro")) from e
      if match:
        param = match.group("param")
        raise MissingMacroError(f"{param} is required: pass --gin_bindings='{param} = ...'") from e
      raise GinConfigError(f"gin config: {_one_line(e)}") from e
  logging.info("Gin configuration:\n%s", gin.config_str())


def parse_gin_from_flags(skip_unknown: Union[bool, Sequence[str]] = False, finalize_config: bool = True,
                         allowed_macros: Sequence[str] = ()) -> None:
  """`parse_gin_flags` with the values of `--gin_search_paths`, `--gin_file` and `--gin_bindings`."""
  parse_gin_flags(GIN_SEARCH_PATHS.value, GIN_FILES.value or [], GIN_BINDINGS.value or [],
                  skip_unknown=skip_unknown, finalize_config=finalize_config, allowed_macros=allowed_macros)


def require_macro(name: str) -> Any:
  """The value bound to gin macro `name`.

  Literals come back as Python values and `%CONSTANT`s are resolved; a macro bound to a configurable
  reference (`@fn()`) comes back as gin's reference object.

  Args:
    name: macro name, e.g. 'MODEL_DIR'.

  Returns:
    The bound value.

  Raises:
    MissingMacroError: "NAME is required: pass --gin.NAME=..." when the macro is unbound or `%gin.REQUIRED`.
  """
  try:
    value = gin.query_parameter(f"%{name}")
  except ValueError as e:
    raise _missing(name) from e
  if isinstance(value, gin_config.ConfigurableReference) and (
      value.configurable.wrapped is gin_config._retrieve_constant):  # pylint: disable=protected-access
    value = value.scoped_configurable_fn()
  if value is gin.REQUIRED:
    raise _missing(name)
  return value


def require(value: Any, name: str) -> Any:
  """`value`, unless it is the `gin.REQUIRED` sentinel (a macro passed through unfinalized config)."""
  if value is gin.REQUIRED:
    raise _missing(name)
  return value


CONFIG_FILE = "config.gin"
CONFIG_HISTORY_DIR = "config_history"


def write_gin_config(model_dir: str, filename: str = CONFIG_FILE,
                     start_step: Optional[int] = None) -> Optional[str]:
  """Writes the operative gin config (the bindings used so far) to `model_dir/filename` from process 0, as
  T5X's `summarize_gin_config`; `export` and `eval` read it back to rebuild the run's model.

  Nothing is lost when a start fails or is different: each start also keeps its own copy,
  `model_dir/config_history/<UTC time>-step<start_step>.gin`, written before `filename`, and both are
  written atomically (a full disk leaves the previous `config.gin` whole, never a cut-off one).

  Args:
    start_step: the step this start resumes from (0 for a fresh run); names the history copy.

  Returns:
    The path written, or None on other processes.

  Raises:
    OSError: naming the file that could not be written (read-only MODEL_DIR, full disk).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  text = gin.operative_config_str()
  join = (lambda *parts: "/".join(p.rstrip("/") for p in parts)) if "://" in model_dir else os.path.join
  path = join(model_dir, filename)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  step = "" if start_step is None else f"-step{int(start_step)}"
  history = join(model_dir, CONFIG_HISTORY_DIR, f"{stamp}{step}.gin")
  n = 1
  while "://" not in history and os.path.exists(history):  # Two starts within a second.
    n += 1
    history = join(model_dir, CONFIG_HISTORY_DIR, f"{stamp}{step}-{n}.gin")
  for target in (history, path):
    write_text_atomically(target, text, what="the gin config")
  return str(path)


def write_text_atomically(path: str, text: str, what: str = "file") -> None:
  """`text` to `path` through `atomic.atomic_file`; an OSError names `path` and `what` it is.

  A URL (`gs://...`) is written in one object write, which object stores make atomic themselves.
  """
  try:
    if "://" in path:
      from etils import epath  # pylint: disable=g-import-not-at-top
      epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
      epath.Path(path).write_text(text)
      return
    with atomic.atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  except OSError as e:
    raise OSError(e.errno, f"cannot write {what} to {path}: {e.strerror or e}") from e


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """`absl.app.run(main)` that accepts `--gin.NAME=VALUE` and reports `GinConfigError`s in one line."""

  def parse(argv):
    try:
      return app.parse_flags_with_usage(rewrite_gin_args(argv))
    except GinConfigError as e:
      sys.exit(f"FATAL: {e}")

  def main_with_errors(argv):
    try:
      return main(argv)
    except GinConfigError as e:
      logging.error("%s", e)
      sys.exit(f"FATAL: {e}")

  app.run(main_with_errors, flags_parser=parse)
