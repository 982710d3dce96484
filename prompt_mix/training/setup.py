"""Building the variables of a run: the frozen backbone, the method's collections, their shardings.

`params` comes from `INITIAL_CHECKPOINT_PATH` (any format `checkpoints.load_backbone` reads), or from a
random initialization only when a run asks for it explicitly (`random_init_backbone=True`: pre-training a
toy backbone, as the demo does). Never a silent fallback to random weights.

A trained run is self-contained: its checkpoints hold the trainable tree, the method's frozen collections
other than the backbone (`method_collections`, e.g. source prompts read from a prompt library at the
first start) and their `variable_specs` (shapes, dtypes, logical axis names). `restore_trained` rebuilds
those collections from the checkpoint alone, never from their original source, so a library changed or
removed after training changes nothing. Checkpoints of older versions (no specs) fall back to building
the collections from their source, with a warning that says so. A change made on purpose, such as
evaluating a run with a pruned set of source prompts, names the collections to build from their source as
configured now: `restore_trained.rebuild_from_source = ['prompt_library']` (what `prune`'s gin file binds).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix import partitioning
from prompt_mix.t5 import checkpoints
from prompt_mix.t5 import model as model_lib

Array = Any


@dataclasses.dataclass
class RunVariables:
  """Every variable of a run, placed on the mesh.

  Attributes:
    trainable: `peft` (or the backbone for full fine-tuning), sharded.
    frozen: every other collection (`params`, frozen method values), sharded.
    trainable_boxed: abstract boxed tree of `trainable` (logical names), for optimizer-state shardings.
    trainable_shardings / frozen_shardings: `NamedSharding` trees.
    frozen_boxed: abstract boxed tree of `frozen` (logical names).
  """

  trainable: Any
  frozen: dict
  trainable_boxed: Any
  trainable_shardings: Any
  frozen_shardings: Any
  frozen_boxed: Any = None


def dummy_batch(shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """Int32 ones of the model batch shapes (what `init` traces with)."""
  return {k: jnp.ones(s, jnp.int32) if k != "task_ids" else jnp.zeros(s, jnp.int32)
          for k, s in shapes.items() if k != "decoder_loss_weights"}


RANDOM_BACKBONE_SEED = 0


def load_backbone_params(model: model_lib.EncoderDecoderModel, initial_checkpoint_path: Optional[str],
                         random_init_backbone: bool, batch: Mapping[str, Array]) -> Any:
  """The backbone tree (numpy or jax arrays, unboxed).

  A random backbone always comes from `RANDOM_BACKBONE_SEED`, initialized by the plain backbone (the
  model without its method), so train, eval and infer of the same run see the same one and nothing the
  method reads at init (a prompt library) is needed for it.
  """
  if initial_checkpoint_path:
    if random_init_backbone:
      raise ValueError("Both INITIAL_CHECKPOINT_PATH and random_init_backbone=True are set: choose one")
    params, _ = checkpoints.load_backbone(initial_checkpoint_path, model.config)
    logging.info("Loaded the backbone from %s", initial_checkpoint_path)
    return params
  if not random_init_backbone:
    raise ValueError("INITIAL_CHECKPOINT_PATH is required: pass --gin.INITIAL_CHECKPOINT_PATH=\"...\" "
                     "(a T5X, Orbax or HF checkpoint), or set random_init_backbone=True to train a "
                     "backbone from scratch on purpose")
  logging.warning("Initializing the backbone at random (random_init_backbone=True)")
  plain = dataclasses.replace(model, deltas=())
  return nn.unbox(plain.init(jax.random.PRNGKey(RANDOM_BACKBONE_SEED), batch)["params"])


def build_variables(model: model_lib.EncoderDecoderModel, params: Any, rng: Array,
                    batch: Mapping[str, Array], mesh: jax.sharding.Mesh,
                    rules=None) -> RunVariables:
  """Initializes the method's collections on `params` and shards everything by logical axis names."""
  abstract = model.abstract_init(batch)  # Boxed shapes of every collection (no allocation).
  method_boxed = {k: v for k, v in abstract.items() if k != "params"}
  method_shardings = partitioning.logical_to_sharding(method_boxed, mesh, rules) if method_boxed else {}
  params_shardings = partitioning.logical_to_sharding(abstract["params"], mesh, rules)
  params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params), params_shardings)
  init_method = jax.jit(lambda r, p: partitioning.strip_boxes(model.init_method(r, p, batch)),
                        out_shardings=method_shardings)
  method_vars = init_method(rng, params) if method_boxed else {}

  everything = {"params": params, **method_vars}
  shardings = {"params": params_shardings, **method_shardings}
  boxed = {"params": abstract["params"], **method_boxed}
  name = "params" if model.trains_backbone else "peft"
  if name not in everything:
    raise ValueError("The method has no trainable variables (no 'peft' collection): check DELTAS")
  frozen = {k: v for k, v in everything.items() if k != name}
  return RunVariables(
      trainable=everything[name], frozen=frozen, trainable_boxed=boxed[name],
      trainable_shardings=shardings[name],
      frozen_shardings={k: v for k, v in shardings.items() if k != name},
      frozen_boxed={k: v for k, v in boxed.items() if k != name})


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


BACKBONE = "params"
SPECS_VERSION = 1


def trainable_name(model: model_lib.EncoderDecoderModel) -> str:
  """The trainable collection: `peft`, or the backbone `params` for full fine-tuning."""
  return BACKBONE if model.trains_backbone else "peft"


def method_collections(frozen: Mapping[str, Any]) -> dict:
  """The frozen collections other than the backbone: a method's frozen values (e.g. source prompts)."""
  return {k: v for k, v in frozen.items() if k != BACKBONE}


def variable_specs(boxed: Mapping[str, Any]) -> dict:
  """A JSON description of boxed abstract collections, saved with each checkpoint.

  Returns:
    `{'version': 1, 'collections': {collection: {'a/b/c': {'shape': [...], 'dtype': 'float32',
    'axes': [logical names] or None}}}}`.
  """
  collections = {}
  for collection, tree in boxed.items():
    leaves = {}
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/").items():
      boxed_leaf = isinstance(leaf, nn.LogicallyPartitioned)
      value = leaf.value if boxed_leaf else leaf
      leaves[path] = {"shape": [int(d) for d in value.shape], "dtype": np.dtype(value.dtype).name,
                      "axes": list(leaf.names) if boxed_leaf else None}
    collections[collection] = leaves
  return {"version": SPECS_VERSION, "collections": collections}


def boxed_from_specs(specs: Mapping[str, Any]) -> dict:
  """The boxed abstract collections (`LogicallyPartitioned(ShapeDtypeStruct)`) `variable_specs` describes."""
  if specs.get("version") != SPECS_VERSION:
    raise ValueError(f"variable_specs version {specs.get('version')!r}; this version reads {SPECS_VERSION}")
  out = {}
  for collection, leaves in specs["collections"].items():
    flat = {}
    for path, leaf in leaves.items():
      value = jax.ShapeDtypeStruct(tuple(leaf["shape"]), jnp.dtype(leaf["dtype"]))
      axes = leaf.get("axes")
      flat[tuple(path.split("/"))] = nn.LogicallyPartitioned(value, tuple(axes)) if axes is not None else value
    out[collection] = flax.traverse_util.unflatten_dict(flat)
  return out


def abstract_init_with(model: model_lib.EncoderDecoderModel, batch: Mapping[str, Array],
                       given: Mapping[str, Any]) -> dict:
  """The boxed shapes of every collection when the `given` ones exist already.

  Only what `given` lacks is initialized (abstractly), so nothing a given collection was built from (a
  prompt library, a file) is read again.
  """
  rng = jax.random.PRNGKey(0)

  def init(variables):
    _, state = model.module.apply(
        variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], task_ids=batch.get("task_ids"), enable_dropout=False,
        rngs={"params": rng, "dropout": rng}, mutable=flax.core.DenyList([model_lib.INTERMEDIATES]))
    return dict(state)

  return jax.eval_shape(init, dict(given))


def _check_no_new_leaves(abstract: Mapping[str, Any], given: Mapping[str, Any], where: str,
                         rebuilt: Sequence[str] = ()) -> None:
  """The model must not build method variables the checkpoint lacks (a different method or size)."""
  new = []
  for collection, tree in abstract.items():
    if collection == BACKBONE or collection in rebuilt:
      continue
    have = set(model_lib.flatten(given.get(collection, {})))
    new += [f"{collection}/{k}" for k in sorted(set(model_lib.flatten(tree)) - have)]
  if new:
    shown = ", ".join(new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else "")
    raise ValueError(f"the model builds variables that {where} does not have: {shown}. Are the model and "
                     "method gin files the training run's (its config.gin)?")


@gin.configurable(denylist=["model", "model_dir", "initial_checkpoint_path", "batch", "mesh", "step",
                            "random_init_backbone", "rules"])
def restore_trained(model: model_lib.EncoderDecoderModel, model_dir: str,
                    initial_checkpoint_path: Optional[str], batch: Mapping[str, Array],
                    mesh: jax.sharding.Mesh, step: Optional[int | str] = None,
                    random_init_backbone: bool = False, rules=None,
                    rebuild_from_source: Sequence[str] = ()) -> tuple[dict, int]:
  """All variables of a trained run: the backbone plus the trainable and frozen method collections of a
  training checkpoint (module docstring).

  Args:
    model_dir: the training run's MODEL_DIR (checkpoints under `<model_dir>/checkpoints`).
    step: a step number, 'best' (by the run's best metric) or None for the latest.
    rebuild_from_source: frozen method collections (e.g. 'prompt_library') to build from their source as
      the model is configured now instead of restoring them from the checkpoint (a pruned set of source
      prompts); the trainable tree and every other collection still come from the checkpoint.
  Returns:
    (variables, step restored).
  """
  checkpoint_dir(model_dir)  # Fails before loading the backbone when there is nothing to restore.
  step = resolve_step(model_dir, step)
  specs = read_specs(model_dir, step)
  params = load_backbone_params(model, initial_checkpoint_path, random_init_backbone, batch)
  from prompt_mix.training import run_record  # pylint: disable=g-import-not-at-top
  run_record.check_for_use(model_dir, run_record.make_record(model.config, params, initial_checkpoint_path,
                                                             random_init_backbone))
  name = trainable_name(model)
  where = f"checkpoint step {step} of {model_dir}"
  if specs is None:  # An older version's checkpoint: the frozen collections come from their source.
    run = build_variables(model, params, jax.random.PRNGKey(0), batch, mesh, rules)
    methods = method_collections(run.frozen)
    if methods:
      logging.warning("%s predates saved frozen collections: %s are rebuilt from their source (e.g. the "
                      "prompt library) as it is now; if it changed since training, results differ",
                      where, sorted(methods))
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.trainable)
    trainable, _ = restore_run_state(model_dir, step, target)
    return model_lib.merge_trainable(trainable, run.frozen, model.trains_backbone), step
  given = boxed_from_specs(specs)
  rebuilt = tuple(rebuild_from_source)
  held = sorted(k for k in method_collections(given) if k != name)
  unknown = sorted(set(rebuilt) - set(held))
  if unknown:
    raise ValueError(f"restore_trained.rebuild_from_source names {unknown}, which {where} does not hold as "
                     f"frozen method collections (it holds {held})")
  given = {k: v for k, v in given.items() if k not in rebuilt}
  abstract = abstract_init_with(model, batch, given)
  _check_no_new_leaves(abstract, given, where, rebuilt)
  targets = partitioning.abstract_with_shardings(abstract, mesh, rules)
  frozen_target = method_collections({k: v for k, v in targets.items() if k not in (name, *rebuilt)})
  trainable, frozen = restore_run_state(model_dir, step, targets[name], frozen_target)
  variables = dict(frozen or {})
  if rebuilt:
    built = build_variables(model, params, jax.random.PRNGKey(0), batch, mesh, rules).frozen
    variables.update({k: built[k] for k in rebuilt})
    logging.warning("%s: %s built from their source as configured now (rebuild_from_source), not restored",
                    where, list(rebuilt))
  if name != BACKBONE:
    shardings = partitioning.logical_to_sharding(abstract[BACKBONE], mesh, rules)
    variables[BACKBONE] = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params), shardings)
  variables[name] = trainable
  logging.info("Restored %s with %s from the checkpoint", where, sorted(k for k in variables if k != BACKBONE))
  return variables, step


def read_specs(model_dir: str, step: int) -> Optional[dict]:
  """The `variable_specs` saved with `step`, or None for a checkpoint of an older version."""
  from prompt_mix.training import checkpointing  # pylint: disable=g-import-not-at-top
  with checkpointing.TrainingCheckpointManager(checkpoint_dir(model_dir), read_only=True) as manager:
    return manager.restore_specs(step)


def resolve_step(model_dir: str, step: Optional[int | str] = None, best_metric: Optional[str] = None,
                 best_mode: str = "max") -> int:
  """The step number that `step` (None: latest, 'best', or a number) names in `model_dir`'s checkpoints.

  Raises:
    FileNotFoundError naming the checkpoint directory when it or the step does not exist.
  """
  from prompt_mix.training import checkpointing  # pylint: disable=g-import-not-at-top
  directory = checkpoint_dir(model_dir)
  with checkpointing.TrainingCheckpointManager(directory, read_only=True) as manager:
    steps = manager.all_steps()
    resolved = step
    if step is None:
      resolved = manager.latest_step()
    elif step == "best":
      resolved = _best_step(manager, directory, best_metric, best_mode)
    if resolved is None or resolved not in steps:
      which = "" if resolved is None else f" {resolved}"
      raise FileNotFoundError(f"No training checkpoint{which} in {directory} (steps there: {steps})")
  return int(resolved)


def trainable_target(model: model_lib.EncoderDecoderModel, model_dir: str, step: int,
                     batch: Mapping[str, Array], mesh: jax.sharding.Mesh, rules=None) -> Any:
  """The restore target of a checkpoint's trainable tree: from its `variable_specs` when it has them (no
  model init, so nothing a method reads at init is needed), else from the model (`abstract_trainable`)."""
  specs = read_specs(model_dir, step)
  name = trainable_name(model)
  if specs is not None and name in specs.get("collections", {}):
    return partitioning.abstract_with_shardings(boxed_from_specs(specs)[name], mesh, rules)
  return abstract_trainable(model, batch, mesh, rules)


def checkpoint_dir(model_dir: str) -> str:
  """`<model_dir>/checkpoints`; FileNotFoundError naming it when it does not exist."""
  directory = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No training checkpoints in {directory} (is MODEL_DIR the training run's?)")
  return directory


def abstract_trainable(model: model_lib.EncoderDecoderModel, batch: Mapping[str, Array],
                       mesh: jax.sharding.Mesh, rules=None) -> Any:
  """The trainable tree (`peft`, or the backbone for full fine-tuning) as sharded `ShapeDtypeStruct`s.

  The same structure, dtypes and shardings as `build_variables(...).trainable`, from shapes alone: no
  backbone is loaded and nothing is allocated (a restore target for export).
  """
  abstract = model.abstract_init(batch)
  name = "params" if model.trains_backbone else "peft"
  if name not in abstract:
    raise ValueError("The method has no trainable variables (no 'peft' collection): check DELTAS")
  return partitioning.abstract_with_shardings(abstract[name], mesh, rules)


def restore_checkpoint(model_dir: str, target: Any, step: Optional[int | str] = None,
                       best_metric: Optional[str] = None, best_mode: str = "max") -> tuple[Any, int]:
  """The trainable tree of one training checkpoint of `model_dir`, restored into `target`.

  Args:
    target: the trainable tree as `jax.ShapeDtypeStruct`s with shardings (`trainable_target`).
    step: a step number, None for the latest, or 'best': the best step by `best_metric` (`best_mode`
      'max' or 'min'); without `best_metric`, the one metric the run saved with its checkpoints.
  Returns:
    (trainable tree, step restored).
  Raises:
    FileNotFoundError naming the checkpoint directory when it or the step does not exist.
  """
  step = resolve_step(model_dir, step, best_metric, best_mode)
  trainable, _ = restore_run_state(model_dir, step, target)
  return trainable, step


def restore_run_state(model_dir: str, step: int, target: Any,
                      frozen_target: Optional[Mapping[str, Any]] = None) -> tuple[Any, Optional[dict]]:
  """(trainable tree, frozen method collections or None) of checkpoint `step`, checked to be finite.

  Raises:
    CheckpointReadError: the step is damaged (naming an earlier step that restores intact) or does not fit.
    FloatingPointError: the step holds NaN or infinite values (an older version could save them), naming
      each leaf.
  """
  from prompt_mix.training import checkpointing  # pylint: disable=g-import-not-at-top
  from prompt_mix.training import finite  # pylint: disable=g-import-not-at-top
  directory = checkpoint_dir(model_dir)
  abstract = {"peft": target}
  if frozen_target:
    abstract["frozen"] = dict(frozen_target)
  with checkpointing.TrainingCheckpointManager(directory, read_only=True) as manager:
    try:
      restored = manager.restore(step, abstract)
    except checkpointing.CheckpointReadError as e:
      if not e.corrupt:
        raise
      intact = manager.intact_step_before(step, abstract)
      hint = (f"step {intact} restores intact: pass --gin.CHECKPOINT_STEP={intact}" if intact is not None
              else "no earlier step restores intact")
      raise checkpointing.CheckpointReadError(f"{e}\n{hint}", corrupt=True) from e
  trainable, frozen = restored["peft"], restored.get("frozen")
  if frozen_target and frozen is None:
    raise ValueError(f"checkpoint step {step} of {directory} has variable specs but no frozen collections "
                     f"{sorted(frozen_target)}: the step is incomplete")
  bad = {**finite.nonfinite_counts(trainable, "trainable/"), **finite.nonfinite_counts(frozen or {}, "frozen/")}
  if bad:
    raise FloatingPointError(f"checkpoint step {step} of {directory} holds NaN or infinite values (written "
                             f"before the trainer checked what it saves); pick an earlier step with "
                             f"CHECKPOINT_STEP:\n{finite.describe(bad)}")
  return trainable, frozen


def _best_step(manager, directory: str, best_metric: Optional[str], best_mode: str) -> Optional[int]:
  """The best complete step by the metrics saved with the checkpoints (None when none has one)."""
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
  saved = {s: manager.metrics(s) or {} for s in manager.all_steps()}
  if best_metric is None:
    names = sorted({k for m in saved.values() for k in m})
    if not names:
      raise ValueError(f"CHECKPOINT_STEP='best': the checkpoints in {directory} carry no metrics (the run "
                       "had no BEST_METRIC); pass a step number")
    if len(names) > 1:
      raise ValueError(f"CHECKPOINT_STEP='best' needs BEST_METRIC: the checkpoints in {directory} carry "
                       f"metrics {names}")
    best_metric = names[0]
  ranked = [(float(m[best_metric]), s) for s, m in saved.items() if m.get(best_metric) is not None]
  ranked = [(v, s) for v, s in ranked if np.isfinite(v)]  # Steps saved without an evaluation.
  if not ranked:
    return None
  if best_mode == "max":
    return max(ranked)[1]
  return min(ranked, key=lambda vs: (vs[0], -vs[1]))[1]


def resolve_task_names(model: model_lib.EncoderDecoderModel, mixture_or_task_name: str,
                       task_names: Optional[list[str]]) -> Optional[list[str]]:
  """The local order of `task_ids` for methods with a `tasks` axis (ATTEMPT-m, prompt banks).

  Given names win; otherwise, when a delta has `num_tasks`, the mixture's tasks in sorted order
  (`task_ids.task_names_of`), which must number `num_tasks`. Without a tasks axis: None (global ids).
  """
  from prompt_mix.data import task_ids  # pylint: disable=g-import-not-at-top
  size = model.num_tasks  # The bank the deltas share (they must agree: `plugins.num_tasks`).
  if task_names:
    names = list(task_names)
  elif size:
    names = task_ids.task_names_of(mixture_or_task_name)
  else:
    return None
  if size and size != len(names):
    raise ValueError(f"The method has a tasks axis of {size} but the task order has {len(names)} "
                     f"tasks {names}: set NUM_TASKS = {len(names)} or TASK_NAMES")
  return names
