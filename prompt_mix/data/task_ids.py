"""Task ids: a stable global table (name -> int) and the remap to local indices of a task list.

Every example carries an int32 scalar `task_id` (its *global* id, from `TASK_IDS`); the feature converter
turns it into the batch feature `task_ids [B]`. A method with per-task leaves (ATTEMPT-m target prompts
stacked `[N, m, d]`, a bank of prompts) needs *local* indices 0..N-1: the position of each example's task
in the list of N task names the leaves were built for. `LocalTaskIds(task_names)` does that remap.

The table is append-only: ids of released tasks never change, so checkpoints and exported prompt banks
keep their meaning. Few-shot (`glue_rte_k16_seed0`) and rank-classification (`glue_rte_rank`) variants
share the id of their base task. A user task gets its id from `register_task_id(name, id)` or from its
`TaskSpec(task_id=...)` (`registration.register` enters it here); a copy of a built-in task that keeps the
built-in's id (docs/tasks.md) shares it: it stands in for that task in a bank, and the two cannot be in
one bank together.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import numpy as np

# Append new tasks at the end; never renumber.
TASK_IDS: dict[str, int] = {
    # The six source tasks of ATTEMPT.
    "glue_mnli": 0,
    "glue_qqp": 1,
    "glue_qnli": 2,
    "glue_sst2": 3,
    "squad": 4,
    "superglue_record": 5,
    # GLUE targets.
    "glue_stsb": 6,
    "glue_mrpc": 7,
    "glue_rte": 8,
    "glue_cola": 9,
    # SuperGLUE targets.
    "superglue_multirc": 10,
    "superglue_boolq": 11,
    "superglue_wic": 12,
    "superglue_wsc": 13,
    "superglue_cb": 14,
    # MRQA 2019.
    "mrqa_natural_questions": 15,
    "mrqa_hotpotqa": 16,
    "mrqa_searchqa": 17,
    "mrqa_newsqa": 18,
    # Others.
    "winogrande": 19,
    "yelp_polarity": 20,
    "scitail": 21,
    "paws_wiki": 22,
    # Not in the paper's tables, in the released ATTEMPT-m GLUE group.
    "glue_wnli": 23,
}

_VARIANT = re.compile(r"^(?P<base>.+?)(?:_k\d+_seed\d+)?(?:_rank)?$")


def base_task_name(name: str) -> str:
  """'superglue_cb_k16_seed0' -> 'superglue_cb'; 'glue_rte_rank' -> 'glue_rte'; base names unchanged."""
  match = _VARIANT.match(name)
  return match.group("base") if match else name


def next_free_task_id() -> int:
  """A global id no task has (one above the largest)."""
  return max(TASK_IDS.values()) + 1


def register_task_id(name: str, global_id: int, shared: bool = False) -> int:
  """Gives task `name` the global id `global_id`; re-adding the same pair is a no-op.

  Call it before registering the task, or set `TaskSpec.task_id` (`registration.register` calls this).

  Args:
    name: a base task name (not a `_k<k>_seed<s>` / `_rank` variant name, which take their base's id).
    global_id: a non-negative int.
    shared: allow an id that another task has: the new task then counts as that task for task ids (a
      copy of a built-in task with other label words). Without it a taken id is an error.
  """
  if base_task_name(name) != name:
    raise ValueError(f"Task name {name!r} ends like a variant of {base_task_name(name)!r} (_k<k>_seed<s> / "
                     f"_rank are the few-shot and rank-classification variants); choose another name")
  if isinstance(global_id, bool) or not isinstance(global_id, int) or global_id < 0:
    raise ValueError(f"Task {name!r}: a global task id is a non-negative int, got {global_id!r}")
  if TASK_IDS.get(name, global_id) != global_id:
    raise ValueError(f"Task {name!r} already has global id {TASK_IDS[name]}, not {global_id}")
  holders = sorted(k for k, v in TASK_IDS.items() if v == global_id and k != name)
  if holders and not shared:
    raise ValueError(f"Global task id {global_id} is taken by {holders[0]!r}: give {name!r} a free id "
                     f"(e.g. {next_free_task_id()}), or pass shared=True to make it count as {holders[0]!r}")
  TASK_IDS[name] = global_id
  return global_id


def task_id(name: str) -> int:
  """The global id of a task (or of its base task, for few-shot and rank variants)."""
  base = base_task_name(name)
  if base not in TASK_IDS:
    raise KeyError(f"Task {name!r} (base {base!r}) has no global id in prompt_mix.data.task_ids.TASK_IDS; "
                   f"give its TaskSpec a task_id, or call register_task_id({base!r}, id) before registering "
                   f"it (a free id: {next_free_task_id()})")
  return TASK_IDS[base]


def task_name(global_id: int) -> str:
  """Inverse of `task_id` for base tasks (of a shared id: the task that had it first)."""
  for name, value in TASK_IDS.items():
    if value == global_id:
      return name
  raise KeyError(f"No task has global id {global_id} in prompt_mix.data.task_ids.TASK_IDS")


def task_names_of(mixture_or_task_name: str) -> list[str]:
  """The base task names of a registered SeqIO mixture (or task), sorted by name, SeqIO's own order.

  This is the canonical order of the `tasks` axis of ATTEMPT-m prompts for that mixture.
  """
  import seqio  # Deferred: keeps this module importable without TensorFlow.
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  names = []
  for task in tasks:
    base = base_task_name(task.name)
    if base not in names:
      names.append(base)
  return sorted(names)


class LocalTaskIds:
  """Maps global task ids to local indices 0..N-1 by position in `task_names`.

  Example:
    remap = LocalTaskIds(["glue_rte", "glue_mrpc"])
    remap(np.array([8, 7, 8]))       # -> [0, 1, 0]
    ds = ds.map(remap.tf_map("task_ids"))   # the same inside a tf.data pipeline
  """

  def __init__(self, task_names: Sequence[str]):
    if not task_names:
      raise ValueError("LocalTaskIds needs at least one task name")
    self.task_names = [base_task_name(n) for n in task_names]
    if len(set(self.task_names)) != len(self.task_names):
      raise ValueError(f"Duplicate tasks in {list(task_names)}")
    global_ids = [task_id(n) for n in self.task_names]
    first = {}
    for name, gid in zip(self.task_names, global_ids):
      if gid in first:
        raise ValueError(f"Tasks {first[gid]!r} and {name!r} share global task id {gid}, so their examples "
                         f"cannot be told apart in one bank: give one of them an id of its own "
                         f"(TaskSpec.task_id, e.g. {next_free_task_id()})")
      first[gid] = name
    size = max(TASK_IDS.values()) + 1
    self.table = np.full([max(size, max(global_ids) + 1)], -1, np.int32)  # global -> local, -1 = absent
    self.table[global_ids] = np.arange(len(global_ids), dtype=np.int32)

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  def _describe(self, global_id: int) -> str:
    try:
      return f"task {task_name(int(global_id))!r} (global id {int(global_id)})"
    except KeyError:
      return f"global task id {int(global_id)}"

  def __call__(self, global_ids) -> np.ndarray:
    """[...] int global ids -> [...] int32 local ids; a task outside `task_names` raises naming it."""
    global_ids = np.asarray(global_ids)
    out_of_table = (global_ids < 0) | (global_ids >= len(self.table))
    local = np.where(out_of_table, -1, self.table[np.clip(global_ids, 0, len(self.table) - 1)])
    missing = np.unique(global_ids[local < 0])
    if missing.size:
      raise ValueError(f"{', '.join(self._describe(g) for g in missing)} not among the {self.num_tasks} "
                       f"tasks of this model: {self.task_names}")
    return local.astype(np.int32)

  def tf_map(self, key: str = "task_ids", name_table: Optional[Mapping[str, int]] = None):
    """A `ds.map` function remapping feature `key` in graph mode (asserting every id is known)."""
    import tensorflow as tf  # Deferred, as above.
    table = tf.constant(self.table)
    names = dict(name_table or TASK_IDS)
    by_id = ["<unknown>"] * len(self.table)
    for name, gid in names.items():
      if gid < len(by_id):
        by_id[gid] = name
    by_id_t = tf.constant(by_id)
    allowed = ", ".join(self.task_names)

    def fn(features):
      ids = tf.cast(features[key], tf.int32)
      safe = tf.clip_by_value(ids, 0, len(self.table) - 1)
      local = tf.where((ids >= 0) & (ids < len(self.table)), tf.gather(table, safe), -1)
      bad = tf.reshape(local < 0, [-1])
      first_bad = tf.reshape(safe, [-1])[tf.argmax(tf.cast(bad, tf.int32))]
      check = tf.debugging.Assert(
          tf.logical_not(tf.reduce_any(bad)),
          ["Task", tf.gather(by_id_t, first_bad), "(global id", first_bad, ") is not among the tasks:",
           allowed], summarize=1)
      with tf.control_dependencies([check]):
        local = tf.identity(local)
      return {**features, key: local}

    return fn
