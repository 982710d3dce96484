"""Training-state checkpoints with Orbax: atomic, resumable, keep-N plus the best.

A training checkpoint holds what training changes (docs/design.md, Variables): the `peft` tree, the optax state
of `peft`, the step, and a small JSON `data_state` (e.g. how many batches the input pipeline has
consumed). The frozen backbone is never written; it comes back from `INITIAL_CHECKPOINT_PATH`. Two
optional items make a trained run self-contained: `frozen`, the method's frozen collections other than the
backbone (e.g. the source prompts a method read from a prompt library when the run started; small), and
`variable_specs`, the shape, dtype and logical axis names of every leaf of `peft` and `frozen`, so a later
eval/infer/export rebuilds them from the checkpoint alone (see `setup.restore_trained`).

Layout under `directory` (one Orbax step directory per saved step)::

  <directory>/<step>/peft/            StandardSave (TensorStore/OCDBT) of the peft pytree
  <directory>/<step>/opt_state/       StandardSave of the optax state (absent when it has no arrays)
  <directory>/<step>/data_state/      JSON
  <directory>/<step>/frozen/          StandardSave of the frozen method collections (absent when none)
  <directory>/<step>/variable_specs/  JSON {collection: {'a/b': {'shape', 'dtype', 'axes'}}}
  <directory>/<step>/metrics/         the metrics given to `save`, for best tracking
  <directory>/<step>/commit_success.txt

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and renames it once every item and
`commit_success.txt` is written. Temporary directories are never listed as steps; on top of that, a step
directory without `commit_success.txt` (an interrupted copy, a crash on a filesystem without atomic rename)
is ignored, and removed when a writable manager opens the directory, so the next save of that step
succeeds.

Restoring goes into the structure, dtypes and shardings of an abstract target (`jax.ShapeDtypeStruct`s with
`.sharding`, e.g. from `partitioning.abstract_with_shardings`), so a run saved on one mesh resumes on another.
A step that cannot be read is a `CheckpointReadError` in a few lines (TensorStore's spec dumps cut), and
`restore_latest` says which earlier step restores intact.

Memory: two leaks of TensorStore's Python bindings, hit by Orbax on every save, made a long run's RSS creep
with every checkpoint; importing this module stops both (`tensorstore_leaks`; `tools/soak.py` measures the
slope).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Optional, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from prompt_mix.training import tensorstore_leaks

tensorstore_leaks.install()

PyTree = Any
TrainingState = dict  # {'peft': PyTree, 'opt_state': PyTree, 'step': int, 'data_state': dict}

PEFT = "peft"
OPT_STATE = "opt_state"
DATA_STATE = "data_state"
STEP = "step"
FROZEN = "frozen"
SPECS = "variable_specs"
_ITEMS = (PEFT, OPT_STATE, DATA_STATE, FROZEN, SPECS)
_STATE_KEYS = (PEFT, OPT_STATE, STEP, DATA_STATE, FROZEN, SPECS)
_ARRAY_ITEMS = (PEFT, OPT_STATE, FROZEN)
_COMMIT_FILE = "commit_success.txt"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary step directories: `<step>.orbax-checkpoint-tmp[-n]`.


class CheckpointReadError(ValueError):
  """A saved step cannot be read (`corrupt`: damaged or truncated files) or does not fit the target."""

  def __init__(self, message: str, corrupt: bool = False):
    super().__init__(message)
    self.corrupt = corrupt


# TensorStore appends its whole JSON spec ([tensorstore_spec='{...}'], kilobytes) to every error.
_TS_SPEC_RE = re.compile(r"\s*\[tensorstore_spec(?:\[\d+\])?='[^']*'\]")
_CORRUPT_MARKERS = ("DATA_LOSS", "checksum", "Error decoding", "corrupt", "truncated", "Unexpected end")
_MAX_DETAIL = 600


def short_error(e: BaseException) -> str:
  """`Type: message` without TensorStore's spec dumps, each line at most `_MAX_DETAIL` characters."""
  lines = []
  for line in _TS_SPEC_RE.sub("", str(e)).splitlines():
    line = line.rstrip()
    if line:
      lines.append(line if len(line) <= _MAX_DETAIL else line[:_MAX_DETAIL] + " ...")
  return f"{type(e).__name__}: " + "\n".join(lines[:40])


def looks_corrupt(e: BaseException) -> bool:
  """Whether a restore error reports damaged data rather than a target that does not fit."""
  text = str(e)
  return any(marker in text for marker in _CORRUPT_MARKERS)


def _has_arrays(tree: PyTree) -> bool:
  return bool(jax.tree_util.tree_leaves(tree))


def _to_abstract(tree: PyTree, item: str) -> PyTree:
  """Leaves as `ShapeDtypeStruct`s; a missing sharding becomes replicated over all devices."""
  replicated = None

  def convert(path, leaf):
    nonlocal replicated
    if isinstance(leaf, jax.ShapeDtypeStruct):
      sharding = leaf.sharding
    elif isinstance(leaf, jax.Array):
      sharding = leaf.sharding
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      sharding = None
    else:
      raise ValueError(f"restore target {item}{jax.tree_util.keystr(path)} is {leaf!r} of type "
                       f"{type(leaf).__name__}; expected an array or jax.ShapeDtypeStruct")
    if sharding is None:
      if replicated is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      sharding = replicated
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(convert, tree)


class TrainingCheckpointManager:
  """Saves and restores `{'peft', 'opt_state', 'step', 'data_state'}` under one directory.

  Retention keeps the `max_to_keep` latest steps and, when `best_metric` is set, also the `keep_best` best
  steps by that metric (so the best checkpoint survives however many later ones are written).

  Example::

    ckpt = TrainingCheckpointManager(f'{MODEL_DIR}/checkpoints', max_to_keep=3, best_metric='accuracy')
    state, step = ckpt.restore_latest(abstract_state)   # (None, None) on a fresh directory
    ...
    ckpt.save(step, {'peft': peft, 'opt_state': opt_state, 'step': step,
                     'data_state': {'batches_consumed': n}}, metrics={'accuracy': acc})
    ckpt.close()
  """

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: Optional[int] = 3,
               best_metric: Optional[str] = None, best_mode: str = "max", keep_best: int = 1,
               save_interval_steps: int = 1, async_save: bool = False, read_only: bool = False):
    """Opens (and, unless `read_only`, creates) the checkpoint directory.

    Args:
      directory: where step directories live, e.g. `MODEL_DIR/checkpoints` (a local path or any
        `etils.epath` URL such as `gs://...`).
      max_to_keep: how many latest steps to keep; None keeps all.
      best_metric: key of the `metrics` given to `save` to rank checkpoints by; None disables best tracking.
      best_mode: 'max' or 'min': whether a larger or smaller `best_metric` is better.
      keep_best: how many best steps to keep in addition to the latest ones.
      save_interval_steps: `save` without `force` writes only steps that are multiples of this.
      async_save: write in a background thread (call `wait_until_finished` or `close`). Off by default so
        a returned `save` is on disk.
      read_only: open for restoring only (eval/infer binaries watching a training directory).
    """
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if best_metric is not None and keep_best < 1:
      raise ValueError(f"keep_best must be >= 1 when best_metric={best_metric!r} is set, got {keep_best}")
    self._directory = epath.Path(directory)
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._warned_incomplete = set()
    worst = -math.inf if best_mode == "max" else math.inf

    def metric_of(metrics):
      value = metrics.get(best_metric) if isinstance(metrics, Mapping) else None
      return worst if value is None else float(value)

    policies = [checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric is not None:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=metric_of, reverse=(best_mode == "min"), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        best_fn=metric_of if best_metric is not None else None,
        best_mode=best_mode,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # Done synchronously by `_remove_incomplete_steps`.
        read_only=read_only,
        create=not read_only,
    )
    if not read_only:
      self._remove_incomplete_steps()
    self._manager = ocp.CheckpointManager(self._directory, options=options, item_names=_ITEMS)
    logging.info("Training checkpoints in %s: steps %s, latest %s", self._directory, self.all_steps(),
                 self.latest_step())

  # ------------------------------------------------------------------------------------------------------
  # Steps.

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def _is_complete(self, step: int) -> bool:
    return (self._directory / str(step) / _COMMIT_FILE).exists()

  def _remove_incomplete_steps(self) -> None:
    """Deletes leftovers of interrupted saves (process 0 only, before Orbax lists the directory).

    That is Orbax temporary directories and step directories that never got `commit_success.txt`. Done
    here synchronously rather than with Orbax's `cleanup_tmp_directories`, which runs in the background.
    """
    if jax.process_index() == 0 and self._directory.exists():
      for child in self._directory.iterdir():
        if not child.is_dir():
          continue
        if child.name.split(_TMP_SUFFIX)[0].isdigit() and _TMP_SUFFIX in child.name:
          logging.warning("Removing %s: the temporary directory of an interrupted save", child)
          child.rmtree()
        elif child.name.isdigit() and not (child / _COMMIT_FILE).exists():
          logging.warning("Removing incomplete checkpoint %s (no %s): a save was interrupted", child,
                          _COMMIT_FILE)
          child.rmtree()
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("prompt_mix_remove_incomplete_steps")

  def reload(self) -> None:
    """Re-reads the directory (for a reader whose trainer writes elsewhere)."""
    self._manager.reload()

  def all_steps(self) -> list[int]:
    """Complete steps on disk, ascending."""
    steps = []
    for step in sorted(self._manager.all_steps()):
      if self._is_complete(step):
        steps.append(int(step))
      elif step not in self._warned_incomplete:
        self._warned_incomplete.add(step)
        logging.warning("Ignoring checkpoint step %d in %s: it has no %s", step, self._directory, _COMMIT_FILE)
    return steps

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The complete step with the best `best_metric`, or None (also None without best tracking)."""
    if self._best_metric is None:
      return None
    complete = set(self.all_steps())
    ranked = [(self._manager.metrics(s), s) for s in complete]
    ranked = [(float(m[self._best_metric]), s) for m, s in ranked
              if isinstance(m, Mapping) and m.get(self._best_metric) is not None]
    if not ranked:
      return None
    pick = max if self._best_mode == "max" else min
    return pick(ranked, key=lambda vs: (vs[0], vs[1]) if self._best_mode == "max" else (vs[0], -vs[1]))[1]

  def metrics(self, step: int) -> Optional[dict]:
    """The metrics saved with `step`, or None."""
    return self._manager.metrics(step)

  # ------------------------------------------------------------------------------------------------------
  # Save.

  def save(self, step: int, state: Mapping[str, Any], *, metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Writes `state` as checkpoint `step` (atomically) and applies retention.

    Args:
      step: the training step; the directory name.
      state: `{'peft': pytree, 'opt_state': pytree, 'step': int (optional, must equal `step`),
        'data_state': JSON-serializable dict (optional), 'frozen': pytree of the frozen method collections
        (optional), 'variable_specs': JSON dict describing `peft` and `frozen` (optional)}`.
      metrics: scalars to store with the step; must contain `best_metric` when best tracking is on.
      force: save even when `step` is not a multiple of `save_interval_steps`.

    Returns:
      Whether a checkpoint was written.
    """
    step = int(step)
    unknown = sorted(set(state) - set(_STATE_KEYS))
    if unknown or PEFT not in state or OPT_STATE not in state:
      raise ValueError(f"checkpoint state for step {step} has keys {sorted(state)}: expected 'peft' and "
                       f"'opt_state', optionally 'step', 'data_state', 'frozen' and 'variable_specs'" +
                       (f"; unknown {unknown}" if unknown else ""))
    if STEP in state and int(np.asarray(state[STEP])) != step:
      raise ValueError(f"state['step'] = {int(np.asarray(state[STEP]))} differs from save(step={step})")
    data_state = dict(state.get(DATA_STATE) or {})
    specs = state.get(SPECS)
    for name, value in ((DATA_STATE, data_state), (SPECS, specs)):
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"state[{name!r}] for step {step} is not JSON-serializable: {e}") from e
    if metrics is not None:
      metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
      if self._best_metric is not None and self._best_metric not in metrics:
        raise ValueError(f"metrics for step {step} lack best_metric {self._best_metric!r}: got "
                         f"{sorted(metrics)}")
    if step in self._manager.all_steps():
      if self._is_complete(step):
        logging.info("Checkpoint step %d already exists in %s; not overwriting", step, self._directory)
        return False
    items = {DATA_STATE: ocp.args.JsonSave(data_state)}
    if specs is not None:
      items[SPECS] = ocp.args.JsonSave(specs)
    for name in _ARRAY_ITEMS:
      if name in state and _has_arrays(state[name]):  # Orbax refuses trees without arrays (EmptyState()).
        items[name] = ocp.args.StandardSave(state[name])
    saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if saved:
      logging.info("Saved checkpoint step %d to %s%s", step, self._directory,
                   f" with metrics {metrics}" if metrics else "")
    return bool(saved)

  # ------------------------------------------------------------------------------------------------------
  # Restore.

  def has_item(self, step: int, name: str) -> bool:
    """Whether step `step` holds item `name` (checkpoints of older versions lack `frozen` and the specs)."""
    return (self._directory / str(int(step)) / name).exists()

  def restore_specs(self, step: int) -> Optional[dict]:
    """The `variable_specs` JSON of `step`, or None when the step predates them."""
    step = int(step)
    if not self._is_complete(step):
      raise FileNotFoundError(f"no complete checkpoint for step {step} in {self._directory}: complete steps "
                              f"are {self.all_steps()}")
    if not self.has_item(step, SPECS):
      return None
    self.wait_until_finished()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{SPECS: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointReadError(f"cannot read {self._directory / str(step) / SPECS}: {short_error(e)}") from e
    return dict(restored[SPECS] or {})

  def restore(self, step: int, abstract_state: Mapping[str, Any]) -> TrainingState:
    """Restores step `step` into the structure, dtypes and shardings of `abstract_state`.

    Args:
      step: a complete step (see `all_steps`).
      abstract_state: `{'peft': tree, 'opt_state': tree, 'frozen': tree}` whose leaves are
        `jax.ShapeDtypeStruct`s (with `.sharding`; none means replicated) or arrays; other keys are
        ignored. Without 'opt_state' only `peft` is restored (evaluation, export); 'frozen' is optional.

    Returns:
      `{'peft', 'opt_state', 'step': step, 'data_state': dict}`, plus `'frozen'` when the target asked for
      it: the restored tree, or None when the step predates saved frozen collections (and the target has
      arrays).

    Raises:
      CheckpointReadError: the step's files are damaged or do not fit the target (a short message that
        names the step directory).
    """
    step = int(step)
    if not self._is_complete(step):
      raise FileNotFoundError(f"no complete checkpoint for step {step} in {self._directory}: complete steps "
                              f"are {self.all_steps()}")
    if PEFT not in abstract_state:
      raise ValueError(f"restore target lacks {PEFT!r}: got keys {sorted(abstract_state)}")
    # Evaluation and export restore `peft` alone; training also restores `opt_state`.
    wanted = [name for name in _ARRAY_ITEMS if name in abstract_state]
    self.wait_until_finished()
    step_dir = self._directory / str(step)
    items = {DATA_STATE: ocp.args.JsonRestore()}
    absent = set()
    for name in wanted:
      if _has_arrays(abstract_state[name]):
        if not (step_dir / name).exists():
          if name == FROZEN:  # Saved by older versions without it: the caller decides.
            absent.add(name)
            continue
          raise ValueError(f"{step_dir} has no {name!r} item but the restore target has arrays there")
        items[name] = ocp.args.StandardRestore(_to_abstract(abstract_state[name], name))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax's messages rarely say which checkpoint was read.
      if looks_corrupt(e):
        raise CheckpointReadError(f"checkpoint step {step} ({step_dir}) cannot be read: its files are "
                                  f"damaged: {short_error(e)}", corrupt=True) from e
      raise CheckpointReadError(f"restoring {step_dir} into the given target failed (does the target's tree "
                                f"match the saved one?): {short_error(e)}") from e
    state = {STEP: step, DATA_STATE: dict(restored[DATA_STATE] or {})}
    for name in wanted:
      # A target without arrays (e.g. (EmptyState(),)) is its own value.
      if name in absent:
        state[name] = None
      else:
        state[name] = restored[name] if name in items else abstract_state[name]
    logging.info("Restored checkpoint step %d from %s", step, self._directory)
    return state

  def restore_latest(self, abstract_state: Mapping[str, Any]) -> Tuple[Optional[TrainingState], Optional[int]]:
    """`(state, step)` of the latest complete step, or `(None, None)` when there is none.

    Raises:
      CheckpointReadError: the latest step cannot be read; the message names the newest earlier step
        that restores intact (each earlier step is tried), so the user can set the damaged one aside.
    """
    step = self.latest_step()
    if step is None:
      logging.info("No checkpoint in %s: starting from scratch", self._directory)
      return None, None
    try:
      return self.restore(step, abstract_state), step
    except CheckpointReadError as e:
      if not e.corrupt:
        raise
      intact = self.intact_step_before(step, abstract_state)
      if intact is not None:
        hint = (f"Step {intact} restores intact: move {self._directory / str(step)} out of "
                f"{self._directory} (keep it for inspection) and run again to resume from step {intact}.")
      else:
        hint = (f"No earlier step restores intact: move {self._directory / str(step)} out of "
                f"{self._directory} and the run starts again from step 0.")
      raise CheckpointReadError(f"{e}\n{hint}", corrupt=True) from e

  def intact_step_before(self, step: int, abstract_state: Mapping[str, Any]) -> Optional[int]:
    """The newest complete step before `step` that restores into `abstract_state`, or None.

    Each candidate is restored in full (the only proof that it is intact); used on the error path only.
    """
    for candidate in reversed([s for s in self.all_steps() if s < step]):
      try:
        self.restore(candidate, abstract_state)
      except CheckpointReadError as e:
        logging.warning("Checkpoint step %d cannot be read either: %s", candidate, e)
        continue
      return candidate
    return None

  def restore_best(self, abstract_state: Mapping[str, Any]) -> Tuple[Optional[TrainingState], Optional[int]]:
    """`(state, step)` of the best step by `best_metric`, or `(None, None)`."""
    step = self.best_step()
    if step is None:
      return None, None
    return self.restore(step, abstract_state), step

  # ------------------------------------------------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save is on disk (a no-op for synchronous saves)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "TrainingCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
