r"""Trainable parameters of every registered method, computed from shapes; and the README's methods table.

One row per method gin file of the registry (`prompt_mix.methods`: `prompt_mix/configs/methods/*.gin`),
ablations included, as the file configures it, each followed by its rows of `VARIANTS` (the same file
with other macro bindings). Each method is built from its gin file on the backbone preset's gin file (`models/
<preset>.gin`, T5 v1.0 base by default), plugged into the backbone and initialized with `jax.eval_shape`,
so no weight is allocated; the `peft` collection (or `params` for full fine-tuning) is counted with
`prompt_mix.peft.report`. A method that reads a prompt library is built on a scratch library of random
prompts (its source prompts are frozen and not counted). A macro a file leaves required is bound from
`REQUIRED` (NUM_TASKS = 1: a bank of one). A new method's gin file gets its row without any edit here.

  python tools/param_table.py                           # Markdown table on stdout.
  python tools/param_table.py --preset=t5_1_1_base
  python tools/param_table.py --update=docs/methods.md  # Rewrites the table between the markers
                                                        # <!-- param_table:begin --> / <!-- param_table:end -->.
  python tools/param_table.py --readme=README.md        # Rewrites the README's methods table between
                                                        # <!-- methods:begin --> / <!-- methods:end -->.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp

from prompt_mix import gin_utils
from prompt_mix import methods
from prompt_mix.peft import report as report_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins

_PRESET = flags.DEFINE_string("preset", "t5_base", "Backbone preset (prompt_mix.t5.config.PRESETS).")
_UPDATE = flags.DEFINE_string("update", None, "A Markdown file whose table between the markers is replaced.")
_README = flags.DEFINE_string("readme", None, "A Markdown file (README.md) whose methods table between "
                              f"{methods.TABLE_BEGIN} and {methods.TABLE_END} is replaced by the registry's.")

BEGIN, END = "<!-- param_table:begin -->", "<!-- param_table:end -->"

# Further rows: (method, macro bindings, note). Bindings only: a row never names a class.
VARIANTS: Sequence[tuple[str, tuple[str, ...], str]] = (
    ("prompt_tuning", ("PROMPT_LENGTH = 20",), ""),
    ("prefix_tuning", ("PREFIX_REPARAMETERIZATION = 'per_site'",), "one MLP per attention site"),
    ("p_tuning_v2", ("PROMPT_LENGTH = 10",), "as prefix tuning's l = 10 baked for inference"),
    ("p_tuning_v2", ("PROMPT_LENGTH = 100",), ""),
    ("attempt_m", ("NUM_TASKS = 9",), "9 target prompts and the shared gate, all counted"),
)
# Values for macros that a method's gin file leaves `%gin.REQUIRED` (PROMPT_LIBRARY: a scratch library).
REQUIRED = {"NUM_TASKS": "1"}


@dataclasses.dataclass
class Row:
  label: str
  configuration: str
  trainable: int
  percent: float
  gin_file: str
  note: str = ""


def count(config: config_lib.T5Config, deltas: Sequence[plugins.Delta]) -> report_lib.ParameterReport:
  """The report of `deltas` on `config`, from `jax.eval_shape` (nothing allocated)."""
  model = model_lib.EncoderDecoderModel(config, tuple(deltas))
  batch = network.dummy_batch()
  if plugins.num_tasks(deltas):  # A bank: the batch says which task each example is.
    batch["task_ids"] = jnp.zeros((1,), jnp.int32)
  abstract = model.abstract_init(batch)
  return report_lib.parameter_report(abstract, trains_backbone=model.trains_backbone)


def row_bindings(name: str, bindings: Sequence[str] = ()) -> list[str]:
  """`bindings`, plus `REQUIRED`'s value for each macro the file leaves required and they leave unbound."""
  out = list(bindings)
  for macro in methods.required_macros(name):
    if macro in REQUIRED and not any(b.split("=")[0].strip() == macro for b in out):
      out.append(f"{macro} = {REQUIRED[macro]}")
  return out


def configuration(name: str, bindings: Sequence[str]) -> str:
  """The standard size macros the method's file binds (`methods.STANDARD_MACROS`), as `bindings` leave
  them; None values omitted."""
  values = {k: v for k, v in methods.macros(name).items() if k in methods.STANDARD_MACROS}
  for binding in bindings:
    key, _, value = binding.partition("=")
    if key.strip() in methods.STANDARD_MACROS:
      values[key.strip()] = value.strip()
  shown = [f"{k}={v}" for k, v in sorted(values.items()) if v != "None"]
  return ", ".join(shown) or "defaults"


def build_rows(preset: str) -> list[Row]:
  config = config_lib.preset(preset)
  model = preset if (gin_utils.CONFIG_DIR / "models" / f"{preset}.gin").is_file() else None
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    wanted = []
    for name in methods.names():  # Each file as it is, then its VARIANTS rows.
      wanted += [(name, (), "")] + [v for v in VARIANTS if v[0] == name]
    for name, extra, note in wanted:
      bindings = row_bindings(name, extra)
      deltas = methods.deltas(name, bindings, model=model, d_model=config.emb_dim, scratch_dir=scratch)
      report = count(config, deltas)
      rows.append(Row(methods.title(name), configuration(name, bindings), report.trainable, report.percent,
                      f"{name}.gin", note))
      logging.info("%s (%s): %d", name, ", ".join(bindings) or "defaults", report.trainable)
  return rows


def markdown(rows: Sequence[Row], preset: str) -> str:
  backbone = count(config_lib.preset(preset), ()).backbone
  lines = [f"Trainable parameters on `{preset}` ({backbone:,} backbone parameters), computed by "
           f"`tools/param_table.py` with `jax.eval_shape`, per task unless NUM_TASKS binds a bank (then for "
           "all its tasks):", "",
           "| method | configuration | trainable | % of backbone | gin file |",
           "|---|---|---:|---:|---|"]
  for r in rows:
    label = f"{r.label}, {r.note}" if r.note else r.label
    lines.append(f"| {label} | `{r.configuration}` | {r.trainable:,} | {r.percent:.4f}% | "
                 f"`methods/{r.gin_file}` |")
  return "\n".join(lines)


def update(path: str, table: str, begin: str = BEGIN, end: str = END) -> None:
  """Replaces the text between the markers `begin` and `end` of `path` with `table`."""
  with open(path) as f:
    text = f.read()
  start, stop = text.find(begin), text.find(end)
  if start < 0 or stop < start:
    raise ValueError(f"{path}: no '{begin}' ... '{end}' markers to put the table between")
  text = text[:start + len(begin)] + "\n" + table + "\n" + text[stop:]
  with open(path, "w") as f:
    f.write(text)


def main(argv: Sequence[str]) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _README.value:
    update(_README.value, methods.markdown_table(), methods.TABLE_BEGIN, methods.TABLE_END)
    logging.info("Wrote the methods table into %s", _README.value)
    if not _UPDATE.value:
      return 0
  table = markdown(build_rows(_PRESET.value), _PRESET.value)
  if _UPDATE.value:
    update(_UPDATE.value, table)
    logging.info("Wrote the table into %s", _UPDATE.value)
  else:
    sys.stdout.write(table + "\n")
  return 0


if __name__ == "__main__":
  app.run(main)
