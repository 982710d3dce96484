"""The method registry: the gin files in `prompt_mix/configs/methods/` are the methods.

A method is one module in `prompt_mix/peft/` (its `Delta`s and their plug-in modules), its gin file
`prompt_mix/configs/methods/<name>.gin` (which binds the macro `DELTAS`) and its test. The method's name is
the gin file's stem. Everything that enumerates methods reads this registry instead of naming them: the
binaries import every `prompt_mix.peft` module (`import_all`), the tests build and train every registered
method, `tools/param_table.py` counts each one's parameters, `tools/benchmark.py --method` accepts every
name, and the README and docs tables list them.

Header of a method's gin file
-----------------------------
The leading comment block documents the method:

```
# <one-line summary: name (reference): what it does>           <- summary(name)
# Acts at: <where in the backbone it acts>                      <- header(name)['acts at']
# Docs: docs/<file>.md#<section>                                <- header(name)['docs']
# Variant of: <method>     (or)  Ablation of: <method>          <- base(name)
#
# Free text ...
```

A variant is another way to use a method (e.g. a bank of per-task prompts trained on mixed-task
batches); an ablation is a piece of a paper's ablation study. Both take their base method's "Acts at" and "Docs"
unless they state their own (`field`).

Standard macros
---------------
Tools size a method generically by binding these macros; a method's gin file binds those that apply
(`macros(name)` lists what a file binds, its includes followed):

| macro                 | meaning                                                                        |
|-----------------------|--------------------------------------------------------------------------------|
| `PROMPT_LENGTH`       | the length of a prompt, prefix, input prompt or ATTEMPT prompt                 |
| `NUM_TASKS`           | None (default), or N: a bank of N per-task leaves selected by the batch's `task_ids` |
| `LORA_RANK`, `LORA_ALPHA` | a low-rank update's rank r and alpha (scale alpha / r)                     |
| `ADAPTER_BOTTLENECK`  | an adapter's bottleneck r                                                      |
| `PROMPT_LIBRARY`      | a prompt library directory, for methods that read one (required)               |
| `SOURCE_PROMPTS`, `TARGET_INIT` | the library prompts such a method reads (`'uniform'` names none)     |

A method whose file leaves `PROMPT_LIBRARY` required can still be built without a user's library:
`library_bindings` writes a scratch library of random prompts (`attempt.library.write_scratch_library`)
holding the prompts that `SOURCE_PROMPTS` and `TARGET_INIT` name, of shape [`PROMPT_LENGTH`, d_model].

`deltas` parses gin files into gin's global configuration, which it resets: it is for tools and tests,
not for a program that holds its own gin configuration.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import pathlib
import pkgutil
import re
from typing import Any, Optional, Sequence

import gin

from prompt_mix import gin_utils

METHODS_DIR = pathlib.Path(gin_utils.CONFIG_DIR) / "methods"
PEFT_PACKAGE = "prompt_mix.peft"
HEADER_FIELDS = ("acts at", "docs", "variant of", "ablation of")
LIBRARY_MACRO = "PROMPT_LIBRARY"
LIBRARY_PROMPT_MACROS = ("SOURCE_PROMPTS", "TARGET_INIT")  # The library prompts a method reads.
LENGTH_MACRO = "PROMPT_LENGTH"
# The size macros of the table above that tools bind generically.
STANDARD_MACROS = ("PROMPT_LENGTH", "NUM_TASKS", "LORA_RANK", "LORA_ALPHA", "ADAPTER_BOTTLENECK")
TABLE_BEGIN, TABLE_END = "<!-- methods:begin -->", "<!-- methods:end -->"  # The README's table.
UNIFORM = "uniform"  # A TARGET_INIT that reads no library prompt.

_MACRO = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*(?:#.*)?$")
_INCLUDE = re.compile(r"""^include\s+['"]([^'"]+)['"]""")
_FIELD = re.compile(r"^([A-Za-z ]+):\s*(.+)$")


# ------------------------------------------------------------------------------------------ the files
def names() -> tuple[str, ...]:
  """Every registered method: the stems of `prompt_mix/configs/methods/*.gin`, sorted."""
  return tuple(sorted(p.stem for p in METHODS_DIR.glob("*.gin")))


def gin_file(name: str) -> str:
  """The path of method `name`'s gin file (raises naming the registered methods when there is none)."""
  path = METHODS_DIR / f"{name}.gin"
  if not path.is_file():
    raise ValueError(f"no method {name!r}: {METHODS_DIR} holds no {name}.gin; registered methods: "
                     f"{', '.join(names())}")
  return str(path)


def gin_path(name: str) -> str:
  """The method's gin file as `--gin_file` and `include` name it: `methods/<name>.gin`."""
  gin_file(name)
  return f"methods/{name}.gin"


def _header_lines(name: str) -> list[str]:
  lines = []
  with open(gin_file(name), encoding="utf-8") as f:
    for line in f:
      if not line.startswith("#"):
        break
      lines.append(line[1:].strip())
  return lines


def summary(name: str) -> str:
  """The first line of the method's header comment: a one-line summary."""
  lines = _header_lines(name)
  if not lines or not lines[0]:
    raise ValueError(f"{gin_file(name)} has no summary: its first line must be a comment '# <summary>'")
  return lines[0]


def header(name: str) -> dict[str, str]:
  """The fields of the method's header comment (`HEADER_FIELDS`), by lower-cased key."""
  fields = {}
  for line in _header_lines(name)[1:]:
    match = _FIELD.match(line)
    if match and match.group(1).strip().lower() in HEADER_FIELDS:
      fields[match.group(1).strip().lower()] = match.group(2).strip()
  return fields


def base(name: str) -> Optional[str]:
  """The method that `name` is a variant or an ablation of (its header's 'Variant of' / 'Ablation of'),
  or None for a method of its own."""
  fields = header(name)
  if "variant of" in fields and "ablation of" in fields:
    raise ValueError(f"{gin_file(name)}: a header states 'Variant of' or 'Ablation of', not both")
  of = fields.get("variant of", fields.get("ablation of"))
  if of is not None and of not in names():
    raise ValueError(f"{gin_file(name)}: its header names {of!r}, which is no registered method")
  return of


def is_ablation(name: str) -> bool:
  """Whether the method is an ablation of another (a paper's ablation study, not a method to use)."""
  base(name)
  return "ablation of" in header(name)


def variants(name: str) -> tuple[str, ...]:
  """The registered variants of method `name` (not its ablations), sorted."""
  return tuple(n for n in names() if base(n) == name and not is_ablation(n))


def ablations(name: str) -> tuple[str, ...]:
  """The registered ablations of method `name`, sorted."""
  return tuple(n for n in names() if base(n) == name and is_ablation(n))


def title(name: str) -> str:
  """The summary up to its first ': ' (e.g. 'Prompt tuning (Lester et al., 2021)'), or the whole summary."""
  return summary(name).split(": ", 1)[0]


def field(name: str, key: str) -> Optional[str]:
  """A header field of the method, or else of its base method (None when neither has it)."""
  value = header(name).get(key)
  of = base(name)
  if value is None and of is not None:
    return field(of, key)
  return value


def macros(name: str) -> dict[str, str]:
  """{macro: its value's gin text} that the method's gin file binds, the files it includes first."""
  return _macros(pathlib.Path(gin_file(name)), set())


def _macros(path: pathlib.Path, seen: set) -> dict[str, str]:
  if path in seen:
    return {}
  seen.add(path)
  found = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      include = _INCLUDE.match(line)
      if include:
        target = pathlib.Path(gin_utils.CONFIG_DIR) / include.group(1)
        if target.is_file():
          found.update(_macros(target, seen))
        continue
      match = _MACRO.match(line)
      if match and "." not in match.group(1) and "/" not in match.group(1):
        found[match.group(1)] = match.group(2)
  return found


def required_macros(name: str) -> tuple[str, ...]:
  """The macros the method's gin file leaves `%gin.REQUIRED`, in file order."""
  return tuple(k for k, v in macros(name).items() if v.replace(" ", "") == "%gin.REQUIRED")


def markdown_table() -> str:
  """The README's methods table: a row per method of its own, with its variants and ablations.

  Columns: the method (its summary and gin files), where it acts, its docs. `tools/param_table.py
  --readme=README.md` writes it between `TABLE_BEGIN` and `TABLE_END`; a test checks the README holds it.
  """
  lines = ["| method | where it acts | docs |", "|---|---|---|"]
  for name in names():
    if base(name) is not None:
      continue
    gin_names = [f"`{name}`"]
    for kind, members in (("variants", variants(name)), ("ablations", ablations(name))):
      if members:
        gin_names.append(f"{kind}: " + ", ".join(f"`{m}`" for m in members))
    cell = f"{summary(name).rstrip('.')} ({'; '.join(gin_names)})"
    docs = field(name, "docs") or ""
    link = f"[{docs}]({docs})" if docs else ""
    lines.append(f"| {cell} | {field(name, 'acts at') or ''} | {link} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the code
def peft_modules() -> tuple[str, ...]:
  """The full names of every module of the `prompt_mix.peft` package, sorted."""
  package = importlib.import_module(PEFT_PACKAGE)
  return tuple(sorted(f"{PEFT_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)))


def import_all() -> tuple[str, ...]:
  """Imports every module of `prompt_mix.peft`, so gin knows every method's configurables.

  Returns:
    The imported module names.
  """
  modules = peft_modules()
  for module in modules:
    importlib.import_module(module)
  return modules


def delta_classes() -> tuple[type, ...]:
  """Every public `Delta` subclass defined in a `prompt_mix.peft` module, in module then name order."""
  from prompt_mix.t5 import plugins  # pylint: disable=g-import-not-at-top
  found = []
  for module_name in import_all():
    module = importlib.import_module(module_name)
    for attr, obj in sorted(vars(module).items()):
      if (inspect.isclass(obj) and issubclass(obj, plugins.Delta) and obj is not plugins.Delta
          and obj.__module__ == module_name and not attr.startswith("_")):
        found.append(obj)
  return tuple(found)


# ------------------------------------------------------------------------------------------ building
@gin.configurable(module="prompt_mix.methods")
def macro_value(value: Any = None) -> Any:
  """Returns `value`: binding it to a macro in a gin scope evaluates the macro (`@fn()` references too)."""
  return value


def _scope(macro: str) -> str:
  return "registry_" + macro.lower()


class _Quiet(logging.Filter):
  """Drops gin's search-path messages (an error per search path a file is not under) and config dumps."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Path not found", "system_path_file_exists", "Gin configuration"))


@contextlib.contextmanager
def _quiet_gin_search():
  """Without gin's search-path errors and `parse_gin_flags`' dump of the whole configuration."""
  quiet = _Quiet()
  loggers = (logging.getLogger(), logging.getLogger("absl"))
  for logger in loggers:
    logger.addFilter(quiet)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(quiet)


def _parse(name: str, bindings: Sequence[str], model: Optional[str], evaluate: Sequence[str],
           finalize: bool) -> dict[str, Any]:
  """Parses [models/<model>.gin,] methods/<name>.gin and `bindings` into a fresh gin config; returns
  the values of the macros `evaluate`. Leaves gin's global config cleared."""
  import_all()
  files = ([f"models/{model}.gin"] if model else []) + [gin_path(name)]
  extra = [f"{_scope(m)}/prompt_mix.methods.macro_value.value = %{m}" for m in evaluate]
  gin.clear_config()
  try:
    with _quiet_gin_search():
      gin_utils.parse_gin_flags([str(gin_utils.CONFIG_DIR)], files, list(bindings) + extra,
                                finalize_config=finalize)
    values = {}
    for macro in evaluate:
      with gin.config_scope(_scope(macro)):
        values[macro] = macro_value()
    return values
  except gin_utils.MissingMacroError as e:
    raise gin_utils.MissingMacroError(f"method {name!r} ({gin_path(name)}): {e}") from e
  finally:
    gin.clear_config()


def _binds(bindings: Sequence[str], macro: str) -> bool:
  return any(re.match(rf"^\s*{re.escape(macro)}\s*=", b) for b in bindings)


def library_bindings(name: str, bindings: Sequence[str] = (), *, d_model: int,
                     directory: str | os.PathLike, model: Optional[str] = None) -> list[str]:
  """Bindings that let method `name` build without a user's prompt library.

  When the method's gin file leaves `PROMPT_LIBRARY` required and `bindings` do not bind it, writes a
  scratch library of random prompts into `directory` (the prompts that `SOURCE_PROMPTS` and
  `TARGET_INIT` name, of shape [`PROMPT_LENGTH`, d_model], after `bindings`) and returns
  `["PROMPT_LIBRARY = '<directory>'"]`; otherwise `[]`. The caller owns `directory` (it must outlive the model). Resets gin's global config.
  """
  if LIBRARY_MACRO not in required_macros(name) or _binds(bindings, LIBRARY_MACRO):
    return []
  directory = os.fspath(directory)
  binding = f"{LIBRARY_MACRO} = {directory!r}"
  wanted = [m for m in LIBRARY_PROMPT_MACROS + (LENGTH_MACRO,) if m in macros(name)]
  if LENGTH_MACRO not in wanted:
    raise ValueError(f"{gin_path(name)} reads {LIBRARY_MACRO} but binds no {LENGTH_MACRO}: the scratch "
                     "library's prompt length is unknown")
  values = _parse(name, list(bindings) + [binding], model, wanted, finalize=False)
  prompts = []
  for macro in LIBRARY_PROMPT_MACROS:
    value = values.get(macro)
    for prompt in ([value] if isinstance(value, str) else list(value or ())):
      if prompt != UNIFORM and prompt not in prompts:
        prompts.append(prompt)
  from prompt_mix.attempt import library as library_lib  # pylint: disable=g-import-not-at-top
  library_lib.write_scratch_library(directory, prompts, (values[LENGTH_MACRO], d_model))
  return [binding]


def deltas(name: str, bindings: Sequence[str] = (), *, model: Optional[str] = None,
           d_model: Optional[int] = None, scratch_dir: Optional[str | os.PathLike] = None) -> tuple:
  """The method's deltas (its `DELTAS` macro) as its gin file and `bindings` configure them.

  RESETS GIN'S GLOBAL CONFIG: the method's file is parsed into a fresh gin configuration, which is
  cleared again before returning. For tools and tests, not for a binary holding its own configuration.

  Args:
    name: a registered method (`names()`).
    bindings: gin bindings applied after the files, e.g. `['PROMPT_LENGTH = 20', 'NUM_TASKS = 4']`.
    model: a gin file stem under `prompt_mix/configs/models/` parsed before the method's, for methods
      sized from the backbone (`@preset()`), e.g. 't5_base'.
    d_model / scratch_dir: for a method that reads a prompt library when `bindings` bind no
      `PROMPT_LIBRARY`: a scratch library of random prompts of width d_model is written into
      `scratch_dir` (`library_bindings`), which must outlive the deltas.
  Returns:
    The tuple of deltas.
  Raises:
    gin_utils.GinConfigError (MissingMacroError for a required macro left unbound), ValueError.
  """
  bindings = list(bindings)
  if LIBRARY_MACRO in required_macros(name) and not _binds(bindings, LIBRARY_MACRO):
    if scratch_dir is None or d_model is None:
      raise ValueError(f"method {name!r} reads a prompt library: bind {LIBRARY_MACRO} in `bindings`, or "
                       "pass scratch_dir and d_model to write a scratch library of random prompts")
    bindings += library_bindings(name, bindings, d_model=d_model, directory=scratch_dir, model=model)
  made = _parse(name, bindings, model, ["DELTAS"], finalize=True)["DELTAS"]
  return tuple(made) if isinstance(made, (list, tuple)) else (made,)
