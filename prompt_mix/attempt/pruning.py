"""Attention-based pruning: keep the source prompts that a trained ATTEMPT(-m) run attends to most.

After an ATTEMPT(-m) run, its eval table `eval/attention_<step>.json` (`interpret.save_attention_table`)
holds the mean attention a_j of each target task (rows) on each candidate (columns: the t sources, then
`target`). The sources are ranked by

```
score_j = mean over the selected target tasks k of A[k, j]       (tasks without examples are skipped)
```

(one task's row with `task=`, every task equally otherwise), and the top k are kept: either as a new prompt
library holding only them (plus any prompt named in `extra`, e.g. the run's `target_init`), or as a gin file
that rebinds `SOURCE_PROMPTS` (and `PROMPT_LIBRARY`). No trainable shape of ATTEMPT depends on the number
of sources, so the same run's checkpoint restores into the pruned model as it is: eval, export or further
training with the pruned set restore the `peft` tree, and the `prompt_library` collection is rebuilt from
the pruned set: the gin file binds `restore_trained.rebuild_from_source = ['prompt_library']`, since a
trained run's checkpoint otherwise restores the source prompts it was trained with.

NumPy only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from prompt_mix import atomic
from prompt_mix.attempt import interpret
from prompt_mix.attempt import library as library_lib


@dataclasses.dataclass(frozen=True)
class SourceAttention:
  """A source's mean attention over the selected target tasks, and its rank (1 = most attended)."""

  name: str
  attention: float
  rank: int


def rank_by_attention(table: interpret.AttentionTable, task: Optional[str] = None) -> list[SourceAttention]:
  """The sources of `table`, most attended first (the `target` column is not a source).

  Args:
    table: an attention table (`interpret.load_attention_table`).
    task: one target task (a row name); None averages the tasks that have examples, each with weight 1.
  """
  names = list(table.candidate_names)
  columns = [i for i, n in enumerate(names) if n != interpret.TARGET_COLUMN]
  if not columns:
    raise ValueError(f"the attention table has no source columns (candidates {names})")
  weights = np.asarray(table.mean_attention, np.float64)
  if task is not None:
    if task not in table.task_names:
      raise ValueError(f"task {task!r} is not a row of the attention table (tasks {list(table.task_names)})")
    rows = weights[[table.task_names.index(task)]]
  else:
    rows = weights
  rows = rows[~np.all(np.isnan(rows), axis=1)]
  if rows.size == 0 or np.any(np.isnan(rows)):
    raise ValueError(f"the attention table has no complete row for {task or 'any task'} (rows with NaN: "
                     "tasks without evaluated examples)")
  scores = rows[:, columns].mean(axis=0)
  order = np.argsort(-scores, kind="stable")
  return [SourceAttention(names[columns[i]], float(scores[i]), r + 1) for r, i in enumerate(order)]


def top_k(ranking: Sequence[SourceAttention], k: int) -> list[str]:
  """The k most attended names, in ranking order."""
  if not 1 <= k <= len(ranking):
    raise ValueError(f"top_k={k} must be in [1, {len(ranking)}] (the table has {len(ranking)} sources)")
  return [s.name for s in ranking[:k]]


def write_pruned_library(source: library_lib.PromptLibrary, keep: Sequence[str], output: str,
                         extra: Sequence[str] = (), overwrite: bool = False) -> library_lib.PromptLibrary:
  """Copies prompts `keep` (and `extra`) of `source` into a new library at `output`, entries unchanged.

  Raises:
    ValueError: a name is not in `source`, or `output` already holds prompts and `overwrite` is False, or
      `output` is the source library itself.
  """
  names = list(dict.fromkeys(list(keep) + list(extra)))
  missing = [n for n in names if n not in source]
  if missing:
    raise ValueError(f"{source.manifest_path}: prompts {missing} are not in the library (it holds "
                     f"{source.names()})")
  if os.path.realpath(output) == os.path.realpath(source.path):
    raise ValueError(f"the pruned library {output} is the source library itself: choose another directory")
  pruned = library_lib.PromptLibrary(output)
  if len(pruned) and not overwrite:
    raise ValueError(f"{pruned.manifest_path} already holds prompts {pruned.names()}; pass overwrite=True "
                     "(--overwrite) to replace them")
  for name in pruned.names():
    if name not in names:
      pruned.remove(name)
  for name in names:
    entry = source.info(name)
    pruned.add(name, source.load(name), backbone=entry["backbone"], task=entry["task"], note=entry["note"],
               overwrite=True)
  return pruned


def gin_binding(keep: Sequence[str], library_path: Optional[str] = None) -> str:
  """Gin text that selects the kept sources (`SOURCE_PROMPTS`) and, when given, the pruned library."""
  lines = ["# The sources kept by attention pruning (python -m prompt_mix.attempt.library prune).",
           f"SOURCE_PROMPTS = {list(keep)!r}",
           "# Restoring the run's checkpoint takes the kept sources from the library, not the checkpoint.",
           "restore_trained.rebuild_from_source = ['prompt_library']"]
  if library_path is not None:
    lines.append(f"PROMPT_LIBRARY = {os.fspath(library_path)!r}")
  return "\n".join(lines) + "\n"


def write_gin(path: str, keep: Sequence[str], library_path: Optional[str] = None) -> str:
  """Writes `gin_binding(keep, library_path)` to `path` (atomically); returns the text."""
  text = gin_binding(keep, library_path)
  with atomic.atomic_file(os.fspath(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  return text


def format_ranking(ranking: Sequence[SourceAttention], keep: Sequence[str] = ()) -> str:
  lines = [f"{'rank':>4}  {'source':<20} {'attention':>9}"]
  for s in ranking:
    lines.append(f"{s.rank:>4}  {s.name:<20} {s.attention:>9.4f}{'  kept' if s.name in keep else ''}")
  return "\n".join(lines)
