"""Batches of scoring rows that share encoder inputs: one encoder pass per input (`model.score_options`).

SeqIO's evaluator hands `score_fn` one row per (input, label word) of a rank-classification task
(`rank_classification.expand_choices`), each a full model row `encoder_input_tokens [n]`,
`decoder_* [t]`, `task_ids []`. Rows with the same input tokens and task id have the same encoder output,
so `group_rows` finds them (by content, not by position: any order and any duplicates are fine), and
`plan_calls` packs whole groups into calls of N inputs and R = N * C rows, C the largest group (a group
larger than the batch is split, its input then encoded once per piece). Every call has the same N and R,
so a jitted scorer compiles once per (input, target) bucket. A task with one row per input gets N = R =
`batch_size`: the same work as row-per-option scoring.

Call features (`call_batch`):
  encoder_input_tokens [N, n]   task_ids [N]   (the inputs; padding inputs repeat the last one)
  encoder_row [R] int32         decoder_input_tokens / decoder_target_tokens / decoder_loss_weights [R, t]
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from prompt_mix.data import buckets as buckets_lib

INPUT_KEYS = ("encoder_input_tokens", "task_ids")


def group_rows(features: Mapping[str, np.ndarray]) -> list[np.ndarray]:
  """Row positions grouped by identical (task id, input tokens up to their length), in order of first
  appearance; rows keep their order within a group."""
  tokens = np.asarray(features["encoder_input_tokens"])
  task_ids = features.get("task_ids")
  lengths = buckets_lib.token_lengths(tokens)
  groups: dict[tuple, list[int]] = {}
  for i in range(tokens.shape[0]):
    key = (None if task_ids is None else int(task_ids[i]), tokens[i, :lengths[i]].tobytes())
    groups.setdefault(key, []).append(i)
  return [np.asarray(rows, np.int64) for rows in groups.values()]


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the rows are scored.

  Attributes:
    inputs_per_call: N, encoder rows of every call.
    rows_per_call: R, option rows of every call.
    calls: per call, the row positions of each of its inputs (at most N inputs, at most R rows in all).
  """

  inputs_per_call: int
  rows_per_call: int
  calls: tuple[tuple[np.ndarray, ...], ...]


def plan_calls(groups: Sequence[np.ndarray], batch_size: int,
               sort_lengths: Optional[np.ndarray] = None) -> Plan:
  """Packs whole groups into calls (module doc).

  Args:
    groups: row positions per input (`group_rows`).
    batch_size: the most option rows per call.
    sort_lengths: [rows] length of each row's input; given, inputs are scored shortest first so that each
      call's inputs have similar lengths (length buckets).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not groups:
    return Plan(1, 1, ())
  per_input = min(max(len(g) for g in groups), batch_size)
  entries = [g[i:i + per_input] for g in groups for i in range(0, len(g), per_input)]
  if sort_lengths is not None:
    order = np.argsort([sort_lengths[e[0]] for e in entries], kind="stable")
    entries = [entries[i] for i in order]
  inputs_per_call = max(1, batch_size // per_input)
  calls = tuple(tuple(entries[i:i + inputs_per_call]) for i in range(0, len(entries), inputs_per_call))
  return Plan(inputs_per_call, inputs_per_call * per_input, calls)


def call_batch(features: Mapping[str, np.ndarray], call: Sequence[np.ndarray], plan: Plan,
               buckets: Optional[buckets_lib.Buckets] = None) -> tuple[dict, np.ndarray]:
  """The padded features of one call, and the positions [r] of its real rows (score i is row rows[i]).

  With `buckets`, inputs and targets are trimmed to the buckets of the call's longest.
  """
  representative = np.asarray([rows[0] for rows in call])
  representative = np.concatenate(
      [representative, np.repeat(representative[-1:], plan.inputs_per_call - len(call))])
  rows = np.concatenate(list(call))
  encoder_row = np.concatenate([np.full(len(r), j, np.int32) for j, r in enumerate(call)])
  pad = plan.rows_per_call - len(rows)
  padded_rows = np.concatenate([rows, np.repeat(rows[-1:], pad)])
  encoder_row = np.concatenate([encoder_row, np.repeat(encoder_row[-1:], pad)]).astype(np.int32)
  batch = {}
  for key, value in features.items():
    value = np.asarray(value)
    batch[key] = value[representative] if key in INPUT_KEYS else value[padded_rows]
  batch["encoder_row"] = encoder_row
  if buckets is not None:
    batch = buckets_lib.trim(batch, *buckets.batch_lengths(batch))
  return batch, rows
