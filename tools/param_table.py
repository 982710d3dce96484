r"""Trainable parameters per task of every method in `prompt_mix.peft`, computed from shapes.

Each method is instantiated, plugged into the backbone preset (T5 v1.0 base by default) and initialized
with `jax.eval_shape`, so no weight is allocated; the `peft` collection (or `params` for full
fine-tuning) is counted with `prompt_mix.peft.report`. The configurations are those of `EXAMPLES` below;
any other public `Delta` subclass found in a `prompt_mix.peft` module is counted with its defaults, so a
new method appears in the table as soon as it lands (add an `EXAMPLES` entry to choose its configuration).

  python tools/param_table.py                         # Markdown table on stdout.
  python tools/param_table.py --preset=t5_1_1_base
  python tools/param_table.py --update=docs/methods.md  # Rewrites the table between the markers
                                                        # <!-- param_table:begin --> / <!-- param_table:end -->.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from prompt_mix import gin_utils
import prompt_mix.peft
from prompt_mix.peft import report as report_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins

_PRESET = flags.DEFINE_string("preset", "t5_base", "Backbone preset (prompt_mix.t5.config.PRESETS).")
_UPDATE = flags.DEFINE_string("update", None, "A Markdown file whose table between the markers is replaced.")

METHODS_DIR = pathlib.Path(gin_utils.CONFIG_DIR) / "methods"
BEGIN, END = "<!-- param_table:begin -->", "<!-- param_table:end -->"


class Example(NamedTuple):
  """A row of the table: `module.attr(**kwargs)` gives a delta or a tuple of deltas."""

  label: str
  module: str  # Under prompt_mix.peft.
  attr: str
  kwargs: dict
  gin_file: str = ""


EXAMPLES: Sequence[Example] = (
    Example("Prompt tuning", "prompt_tuning", "PromptTuning", dict(length=100), "prompt_tuning.gin"),
    Example("Prompt tuning", "prompt_tuning", "PromptTuning", dict(length=20), "prompt_tuning.gin"),
    Example("Prefix tuning (per-site MLP, training)", "prefix_tuning", "PrefixTuning",
            dict(length=10, mlp_hidden=512), "prefix_tuning.gin"),
    Example("Prefix tuning, baked (= inference)", "prefix_tuning", "PTuningV2", dict(length=10),
            "prefix_tuning.gin"),
    Example("P-tuning v2", "prefix_tuning", "PTuningV2", dict(length=20), "p_tuning_v2.gin"),
    Example("P-tuning v2", "prefix_tuning", "PTuningV2", dict(length=100), "p_tuning_v2.gin"),
    Example("MAM adapter", "mam", "mam_adapter", dict(), "mam.gin"),
)


@dataclasses.dataclass
class Row:
  label: str
  configuration: str
  trainable: int
  percent: float
  gin_file: str


def _describe(kwargs: dict) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "defaults"


def _as_deltas(made: Any) -> tuple:
  deltas = made if isinstance(made, (tuple, list)) else (made,)
  for delta in deltas:
    if not isinstance(delta, plugins.Delta):
      raise TypeError(f"expected a Delta or a tuple of Deltas, got {type(delta).__name__}")
  return tuple(deltas)


def count(config: config_lib.T5Config, deltas: Sequence[plugins.Delta]) -> report_lib.ParameterReport:
  """The report of `deltas` on `config`, from `jax.eval_shape` (nothing allocated)."""
  model = model_lib.EncoderDecoderModel(config, tuple(deltas))
  abstract = model.abstract_init(network.dummy_batch())
  return report_lib.parameter_report(abstract, trains_backbone=model.trains_backbone)


def _peft_modules() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(prompt_mix.peft.__path__) if not m.name.startswith("_"))


def discovered_examples(listed: Sequence[Example]) -> list[Example]:
  """Public Delta subclasses defined in `prompt_mix.peft` modules that `listed` does not cover."""
  covered = {(e.module, e.attr) for e in listed}
  found = []
  for name in _peft_modules():
    try:
      module = importlib.import_module(f"prompt_mix.peft.{name}")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Skipping prompt_mix.peft.%s: %s", name, e)
      continue
    for attr, obj in sorted(vars(module).items()):
      if (inspect.isclass(obj) and issubclass(obj, plugins.Delta) and obj is not plugins.Delta
          and obj.__module__ == module.__name__ and not attr.startswith("_")
          and (name, attr) not in covered):
        found.append(Example(attr, name, attr, {}, _gin_file(attr, name)))
  return found


def _gin_file(attr: str, module: str) -> str:
  """The method's gin file under prompt_mix/configs/methods (snake-cased class name, or the module's), or ''."""
  snake = "".join("_" + c.lower() if c.isupper() and i and not attr[i - 1].isupper() else c.lower()
                  for i, c in enumerate(attr))
  for name in (snake, module):
    if (METHODS_DIR / f"{name}.gin").exists():
      return f"{name}.gin"
  return ""


def build_rows(preset: str) -> list[Row]:
  config = config_lib.preset(preset)
  rows = []
  for example in list(EXAMPLES) + discovered_examples(EXAMPLES):
    try:
      factory: Callable = getattr(importlib.import_module(f"prompt_mix.peft.{example.module}"), example.attr)
      deltas = _as_deltas(factory(**example.kwargs))
    except (ImportError, AttributeError) as e:
      logging.warning("Skipping %s (%s.%s): not importable: %s", example.label, example.module,
                      example.attr, e)
      continue
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Skipping %s: %s(%s) failed: %s", example.label, example.attr,
                      _describe(example.kwargs), e)
      continue
    report = count(config, deltas)
    rows.append(Row(example.label, _describe(example.kwargs), report.trainable, report.percent,
                    example.gin_file))
    logging.info("%s (%s): %d", example.label, _describe(example.kwargs), report.trainable)
  return rows


def markdown(rows: Sequence[Row], preset: str) -> str:
  backbone = count(config_lib.preset(preset), ()).backbone
  lines = [f"Trainable parameters per task on `{preset}` ({backbone:,} backbone parameters), computed by "
           f"`tools/param_table.py` with `jax.eval_shape`:", "",
           "| method | configuration | trainable per task | % of backbone | gin file |",
           "|---|---|---:|---:|---|"]
  for r in rows:
    gin_file = f"`methods/{r.gin_file}`" if r.gin_file else ""
    lines.append(f"| {r.label} | `{r.configuration}` | {r.trainable:,} | {r.percent:.4f}% | {gin_file} |")
  return "\n".join(lines)


def update(path: str, table: str) -> None:
  """Replaces the text between the markers of `path` with `table`."""
  with open(path) as f:
    text = f.read()
  start, end = text.find(BEGIN), text.find(END)
  if start < 0 or end < start:
    raise ValueError(f"{path}: no '{BEGIN}' ... '{END}' markers to put the table between")
  text = text[:start + len(BEGIN)] + "\n" + table + "\n" + text[end:]
  with open(path, "w") as f:
    f.write(text)


def main(argv: Sequence[str]) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  table = markdown(build_rows(_PRESET.value), _PRESET.value)
  if _UPDATE.value:
    update(_UPDATE.value, table)
    logging.info("Wrote the table into %s", _UPDATE.value)
  else:
    sys.stdout.write(table + "\n")
  return 0


if __name__ == "__main__":
  app.run(main)
