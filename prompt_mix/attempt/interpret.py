"""Interpreting ATTEMPT: per-task mean attention over the candidates, its heatmap, and soft prompts'
nearest tokens.

NumPy only (no JAX; matplotlib only when a heatmap is drawn), so the tools that use it start fast.

The attention table file (what eval writes and `prompt-mix-heatmap` / `tools/attention_heatmap.py`
render with `render_heatmap`) is JSON or NPZ, chosen by the extension:

```json
{"format": "prompt_mix.attempt_attention", "version": 1,
 "task_names": ["rte", "boolq"],                                   N target tasks (rows)
 "candidate_names": ["mnli", "sst2", "qnli", "qqp", "squad", "record", "target"],   t+1 columns
 "mean_attention": [[0.1, ...], [...]],                            [N, t+1], NaN (JSON null) for no data
 "num_examples": [277, 3270]}                                      [N] examples averaged per task
```

The NPZ file holds the same keys as arrays (`format` and `version` as 0-d arrays).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import textwrap
from typing import Any, Optional, Sequence

import numpy as np

from prompt_mix import atomic

FORMAT = "prompt_mix.attempt_attention"
VERSION = 1
TARGET_COLUMN = "target"


# ------------------------------------------------------------------------------------------ attention
def attention_sums(weights: Any, task_ids: Optional[Any], num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-task sums of the attention weights and example counts, to accumulate over eval batches.

  Args:
    weights: [B, c] attention weights (or [B, m, c] per-token weights, averaged over the m positions).
    task_ids: [B] int task of each example, or None when every example is task 0.
    num_tasks: N.
  Returns:
    (sums [N, c] float64, counts [N] int64).
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim == 3:
    weights = weights.mean(axis=1)
  if weights.ndim != 2:
    raise ValueError(f"attention weights must be [B, c] or [B, m, c], got shape {weights.shape}")
  batch = weights.shape[0]
  task_ids = np.zeros((batch,), np.int64) if task_ids is None else np.asarray(task_ids, np.int64)
  if task_ids.shape != (batch,):
    raise ValueError(f"task_ids has shape {task_ids.shape}, expected ({batch},) to match the weights")
  if batch and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
    bad = task_ids[(task_ids < 0) | (task_ids >= num_tasks)]
    raise ValueError(f"task_ids {sorted(set(bad.tolist()))} are out of range for num_tasks={num_tasks}")
  sums = np.zeros((num_tasks, weights.shape[1]), np.float64)
  np.add.at(sums, task_ids, weights)
  counts = np.bincount(task_ids, minlength=num_tasks).astype(np.int64)
  return sums, counts


def mean_attention_per_task(weights: Any, task_ids: Optional[Any], num_tasks: int) -> np.ndarray:
  """[B, c] (or [B, m, c]) weights, [B] task ids -> [N, c] mean weights per task (NaN rows: no example)."""
  sums, counts = attention_sums(weights, task_ids, num_tasks)
  return means_from_sums(sums, counts)


def means_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """[N, c] sums / [N] counts, NaN where a task has no examples."""
  counts = np.asarray(counts)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)


@dataclasses.dataclass(frozen=True)
class AttentionTable:
  """Mean attention per target task (rows) over the candidates (columns: the sources, then 'target')."""

  mean_attention: np.ndarray  # [N, c]
  task_names: tuple[str, ...]
  candidate_names: tuple[str, ...]
  num_examples: Optional[np.ndarray] = None  # [N]

  @property
  def source_names(self) -> tuple[str, ...]:
    return tuple(n for n in self.candidate_names if n != TARGET_COLUMN)


def _columns(table: np.ndarray, source_names: Sequence[str], where: str) -> tuple[str, ...]:
  names = tuple(source_names)
  if table.shape[1] == len(names) + 1 and TARGET_COLUMN not in names:
    return names + (TARGET_COLUMN,)
  if table.shape[1] == len(names):
    return names
  raise ValueError(f"{where}: the table has {table.shape[1]} columns but {len(names)} source names "
                   f"{list(names)} were given (expected t or t+1 columns, the last being the target)")


def save_attention_table(path: str, table: Any, task_names: Sequence[str], source_names: Sequence[str],
                         num_examples: Optional[Any] = None) -> AttentionTable:
  """Writes the mean-attention table [N, t+1] (or [N, t] without target) to `path` (.json or .npz).

  Args:
    table: [N, c] from `mean_attention_per_task`.
    task_names: the N target tasks (rows).
    source_names: the t source prompts; a 't+1'-th column is named 'target'.
    num_examples: optional [N] examples behind each row.
  """
  path = os.fspath(path)
  table = np.asarray(table, np.float64)
  if table.ndim != 2:
    raise ValueError(f"{path}: the attention table must be [N, c], got shape {table.shape}")
  task_names = tuple(str(n) for n in task_names)
  if len(task_names) != table.shape[0]:
    raise ValueError(f"{path}: {len(task_names)} task names {list(task_names)} for a table of "
                     f"{table.shape[0]} rows")
  columns = _columns(table, source_names, path)
  counts = None if num_examples is None else np.asarray(num_examples, np.int64)
  if counts is not None and counts.shape != (table.shape[0],):
    raise ValueError(f"{path}: num_examples has shape {counts.shape}, expected ({table.shape[0]},)")
  result = AttentionTable(table, task_names, columns, counts)
  if path.endswith(".json"):
    payload = dict(format=FORMAT, version=VERSION, task_names=list(task_names),
                   candidate_names=list(columns),
                   mean_attention=[[None if math.isnan(v) else float(v) for v in row] for row in table])
    if counts is not None:
      payload["num_examples"] = counts.tolist()
    with atomic.atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=1)
  elif path.endswith(".npz"):
    arrays = dict(format=np.array(FORMAT), version=np.array(VERSION), task_names=np.array(task_names),
                  candidate_names=np.array(columns), mean_attention=table)
    if counts is not None:
      arrays["num_examples"] = counts
    with atomic.atomic_file(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **arrays)
  else:
    raise ValueError(f"{path}: the attention table is written as .json or .npz")
  return result


def load_attention_table(path: str) -> AttentionTable:
  """Reads a file written by `save_attention_table`; errors name the file and the bad key."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"attention table {path} does not exist")
  if path.endswith(".json"):
    try:
      with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
      raise ValueError(f"{path}: expected a JSON object")
    get = data.get
  elif path.endswith(".npz"):
    npz = np.load(path, allow_pickle=False)
    data = {k: npz[k] for k in npz.files}
    get = lambda k: (data[k].item() if k in ("format", "version") and k in data else data.get(k))
  else:
    raise ValueError(f"{path}: an attention table is a .json or .npz file")
  if get("format") != FORMAT:
    raise ValueError(f"{path}: 'format' is {get('format')!r}, expected {FORMAT!r}")
  if get("version") != VERSION:
    raise ValueError(f"{path}: unsupported version {get('version')!r} (this reader knows {VERSION})")
  for key in ("task_names", "candidate_names", "mean_attention"):
    if get(key) is None:
      raise ValueError(f"{path}: missing key {key!r}")
  raw = get("mean_attention")
  if isinstance(raw, list):
    raw = [[np.nan if v is None else v for v in row] for row in raw]
  table = np.asarray(raw, np.float64)
  tasks = tuple(str(n) for n in get("task_names"))
  columns = tuple(str(n) for n in get("candidate_names"))
  if table.ndim != 2 or table.shape != (len(tasks), len(columns)):
    raise ValueError(f"{path}: mean_attention has shape {table.shape}, expected ({len(tasks)}, "
                     f"{len(columns)}) from task_names and candidate_names")
  counts = get("num_examples")
  counts = None if counts is None else np.asarray(counts, np.int64)
  if counts is not None and counts.shape != (len(tasks),):
    raise ValueError(f"{path}: num_examples has shape {counts.shape}, expected ({len(tasks)},)")
  return AttentionTable(table, tasks, columns, counts)


# ------------------------------------------------------------------------------------------ heatmap
# Layout of the heatmap, in inches and points: the figure grows with the table and its labels, so every
# cell, name, the title and the colour bar fit whatever the number of sources (3-30) and tasks (1-30).
_CELL_WIDTH, _CELL_HEIGHT = 0.55, 0.34   # inches per column / row; a cell holds "0.00" at _VALUE_SIZE
_LABEL_SIZE, _VALUE_SIZE, _TITLE_SIZE = 9, 7, 11  # points
_CHAR_WIDTH = 0.62  # a character's mean width, as a fraction of the font size (DejaVu Sans)


def _text_inches(text: str, points: float) -> float:
  return len(text) * _CHAR_WIDTH * points / 72.0


def heatmap_figure(table: AttentionTable, include_target: bool = True, title: Optional[str] = None,
                   cmap: str = "Blues"):
  """The paper's heatmap (Asai et al., 2022, fig. 6) of `table` as a matplotlib Figure.

  Rows: the N target tasks; columns: the t sources (and the target prompt's own weight a_{t+1} unless
  `include_target` is False); each cell prints its value ("-" for a task without examples). The figure is
  sized from the number of rows and columns and the longest names, and laid out with matplotlib's
  constrained layout, so nothing is clipped.
  """
  from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

  columns = list(table.candidate_names)
  values = np.asarray(table.mean_attention, np.float64)
  if not include_target and TARGET_COLUMN in columns:
    keep = [i for i, c in enumerate(columns) if c != TARGET_COLUMN]
    columns, values = [columns[i] for i in keep], values[:, keep]
  rows = list(table.task_names)
  n_rows, n_cols = values.shape
  # Column names are rotated 45 degrees: they need ~0.71 of their length below and beside the grid.
  col_label = max([_text_inches(c, _LABEL_SIZE) for c in columns] + [0.0]) * 0.71
  row_label = max([_text_inches(r, _LABEL_SIZE) for r in rows] + [0.0])
  grid_width, grid_height = n_cols * _CELL_WIDTH, n_rows * _CELL_HEIGHT
  width = max(4.0, row_label + grid_width + col_label * 0.71 + 1.6)  # + axis label, colour bar
  height = max(2.8, grid_height + col_label + 1.6)  # + axis label, title
  if title:
    chars_per_line = max(20, int((width - 0.3) * 72.0 / (_CHAR_WIDTH * _TITLE_SIZE)))
    title = "\n".join(textwrap.wrap(title, chars_per_line)) or title
    height += 0.25 * title.count("\n")
  # A Figure of its own with an Agg canvas (not pyplot's global state): no display is needed.
  fig = figure_lib.Figure(figsize=(width, height), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  finite = values[np.isfinite(values)]
  vmax = float(finite.max()) if finite.size else 1.0
  image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-6),
                    aspect="auto")
  ax.set_xticks(range(n_cols), labels=columns, rotation=45, ha="right", rotation_mode="anchor",
                fontsize=_LABEL_SIZE)
  ax.set_yticks(range(n_rows), labels=rows, fontsize=_LABEL_SIZE)
  ax.set_xlabel("source prompts" + (" (and the target prompt)" if TARGET_COLUMN in columns else ""))
  ax.set_ylabel("target tasks")
  for i in range(n_rows):
    for j in range(n_cols):
      v = values[i, j]
      ax.text(j, i, "-" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
              fontsize=_VALUE_SIZE, color="white" if np.isfinite(v) and v > 0.6 * vmax else "black")
  # At most ~0.25 inch wide, however tall the grid (matplotlib's default aspect of 20 widens it with height).
  colorbar = fig.colorbar(image, ax=ax, aspect=max(20.0, grid_height / 0.25))
  colorbar.set_label("mean attention")
  if title:
    ax.set_title(title, fontsize=_TITLE_SIZE)
  return fig


def render_heatmap(table: AttentionTable, output: str, include_target: bool = True,
                   title: Optional[str] = None, cmap: str = "Blues", dpi: int = 150) -> str:
  """Draws `heatmap_figure(table, ...)` to the PNG `output` (its directory is created); returns `output`."""
  fig = heatmap_figure(table, include_target=include_target, title=title, cmap=cmap)
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  with atomic.atomic_file(output) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  return output


def _define_heatmap_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("table", None, "Attention table (.json or .npz) written by eval.")
  flags.DEFINE_string("output", None, "PNG to write.")
  flags.DEFINE_bool("no_target", False, "Leave out the target prompt's column.")
  flags.DEFINE_string("title", None, "Figure title.")
  flags.DEFINE_string("cmap", "Blues", "Matplotlib colormap.")
  flags.DEFINE_integer("dpi", 150, "Resolution of the PNG.")


def _heatmap_main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not f.table or not f.output:
    raise app.UsageError("--table and --output are required")
  table = load_attention_table(f.table)
  render_heatmap(table, f.output, include_target=not f.no_target, title=f.title, cmap=f.cmap, dpi=f.dpi)
  print(f"wrote {f.output}: {len(table.task_names)} tasks x {len(table.candidate_names)} candidates",
        file=sys.stderr)


def heatmap_main() -> None:
  """`prompt-mix-heatmap --table=attention.json --output=heatmap.png [--no_target] [--title=...]`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_heatmap_flags()
  app.run(_heatmap_main)


# ------------------------------------------------------------------------------------------ tokens
def nearest_tokens(prompts: Any, embedding: Any, k: int = 5,
                   max_id: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """The k vocabulary rows most cosine-similar to each prompt position (Lester et al., 2021, sec. 7).

  Args:
    prompts: [..., m, d] soft prompts.
    embedding: [V, d] the frozen token embedding table.
    k: neighbours per position.
    max_id: only consider ids < max_id (e.g. 32000 to skip T5's sentinels and padding rows).
  Returns:
    (ids [..., m, k] int64, similarities [..., m, k] float32), most similar first.
  """
  prompts = np.asarray(prompts, np.float32)
  embedding = np.asarray(embedding, np.float32)
  if embedding.ndim != 2:
    raise ValueError(f"the embedding table must be [V, d], got shape {embedding.shape}")
  if prompts.shape[-1] != embedding.shape[1]:
    raise ValueError(f"prompts of width {prompts.shape[-1]} (shape {prompts.shape}) against an embedding "
                     f"table of width {embedding.shape[1]} (shape {embedding.shape})")
  if max_id is not None:
    if not 0 < max_id <= embedding.shape[0]:
      raise ValueError(f"max_id={max_id} must be in [1, {embedding.shape[0]}]")
    embedding = embedding[:max_id]
  if not 0 < k <= embedding.shape[0]:
    raise ValueError(f"k={k} must be in [1, {embedding.shape[0]}] (the candidate vocabulary size)")
  eps = 1e-12
  unit_e = embedding / np.maximum(np.linalg.norm(embedding, axis=-1, keepdims=True), eps)
  unit_p = prompts / np.maximum(np.linalg.norm(prompts, axis=-1, keepdims=True), eps)
  sims = unit_p @ unit_e.T  # [..., m, V]
  top = np.argpartition(-sims, k - 1, axis=-1)[..., :k]
  top_sims = np.take_along_axis(sims, top, axis=-1)
  order = np.argsort(-top_sims, axis=-1, kind="stable")
  ids = np.take_along_axis(top, order, axis=-1).astype(np.int64)
  return ids, np.take_along_axis(top_sims, order, axis=-1).astype(np.float32)
