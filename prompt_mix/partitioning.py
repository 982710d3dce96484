"""Device meshes, logical axis rules and shardings, in the T5X style.

Parameters carry *logical* axis names (`('vocab', 'embed')`, `('embed', 'joined_kv')`, ...): either as
`flax.linen.LogicallyPartitioned` boxes in the tree returned by `jax.eval_shape(model.init, ...)`, or as a
parallel pytree of name tuples. A list of rules maps each logical name to a mesh axis of a
`('data', 'model')` mesh (or to None: replicated). `logical_to_sharding` turns either form into a pytree of
`NamedSharding`s to hand to `jax.jit(in_shardings=..., out_shardings=...)`, `jax.device_put` or Orbax
restore targets.

Rules follow Flax's semantics: they are tried in order, and a rule applies to a dimension when that dimension
is still unassigned and the rule's mesh axis is not already used by another dimension of the same array
(so `('embed', 'model')` followed by `('embed', 'data')` is a fallback).

Typical use in a binary::

  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  mesh = make_mesh(num_partitions=2)
  rules = standard_logical_axis_rules()               # gin-configurable
  boxed = jax.eval_shape(model.init, rngs, batch)     # LogicallyPartitioned leaves
  shardings = logical_to_sharding(boxed, mesh, rules)  # same structure as nn.unbox(boxed)
  batch = shard_batch(numpy_batch, mesh)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import flax.linen as nn
import gin
import jax
import numpy as np

PyTree = Any
MeshAxes = Union[None, str, Tuple[str, ...]]
LogicalAxisRules = Sequence[Tuple[str, MeshAxes]]

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Logical names of PEFT leaves. They are replicated so that any single host holds the whole `peft` tree and
# can export it without a gather.
PEFT_LOGICAL_AXES = ("prompt", "prompt_embed", "tasks", "sources")


@gin.configurable
def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[LogicalAxisRules] = None,
) -> Tuple[Tuple[str, MeshAxes], ...]:
  """Logical-to-mesh axis rules for a `('data', 'model')` mesh, as T5X's `standard_logical_axis_rules`.

  With 1-D partitioning (the default): `batch -> data`; `vocab, mlp, heads, joined_kv -> model`;
  `embed, kv, relpos_buckets, abspos_buckets, length, layers, stack, mlp_activations -> None`; and the PEFT
  names `prompt, prompt_embed, tasks, sources -> None`. The 2-D variants are T5X's: 2-D activations shard
  `embed` over `model`; 2-D parameters shard `embed` over `data` (a fallback when `model` is taken).

  Args:
    activation_partitioning_dims: 1, or 2 for 2-D activation sharding.
    parameter_partitioning_dims: 1, or 2 for 2-D parameter sharding.
    additional_rules: `(logical_name, mesh_axes)` pairs that take precedence. Unlike T5X (which appends
      them, where a standard rule for the same name would win), every standard rule for a name that appears
      here is dropped, so `additional_rules=[('embed', 'model')]` really shards `embed` over `model`. New
      names (e.g. a module's own axis name) are added.

  Returns:
    A tuple of `(logical_name, mesh_axes)` pairs, highest priority first.
  """
  if (activation_partitioning_dims, parameter_partitioning_dims) == (1, 1):
    rules = [("batch", DATA_AXIS), ("vocab", MODEL_AXIS), ("embed", None), ("mlp", MODEL_AXIS),
             ("heads", MODEL_AXIS), ("kv", None), ("joined_kv", MODEL_AXIS)]
  elif (activation_partitioning_dims, parameter_partitioning_dims) == (2, 1):
    rules = [("batch", DATA_AXIS), ("vocab", MODEL_AXIS), ("mlp", MODEL_AXIS), ("heads", MODEL_AXIS),
             ("kv", None), ("joined_kv", MODEL_AXIS), ("embed", MODEL_AXIS)]
  elif (activation_partitioning_dims, parameter_partitioning_dims) == (1, 2):
    rules = [("batch", DATA_AXIS), ("vocab", MODEL_AXIS), ("mlp", MODEL_AXIS), ("heads", MODEL_AXIS),
             ("kv", None), ("joined_kv", MODEL_AXIS), ("embed", DATA_AXIS)]
  elif (activation_partitioning_dims, parameter_partitioning_dims) == (2, 2):
    rules = [("batch", DATA_AXIS), ("vocab", MODEL_AXIS), ("mlp", MODEL_AXIS), ("heads", MODEL_AXIS),
             ("kv", None), ("joined_kv", MODEL_AXIS), ("embed", MODEL_AXIS), ("embed", DATA_AXIS)]
  else:
    raise ValueError(
        f"activation_partitioning_dims={activation_partitioning_dims}, parameter_partitioning_dims="
        f"{parameter_partitioning_dims} is not supported: each must be 1 or 2")
  rules += [("relpos_buckets", None), ("abspos_buckets", None), ("length", None), ("layers", None),
            ("stack", None), ("mlp_activations", None)]
  rules += [(name, None) for name in PEFT_LOGICAL_AXES]
  if additional_rules:
    extra = []
    for rule in additional_rules:
      if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ValueError(f"additional_rules entry {rule!r} is not a (logical_name, mesh_axes) pair")
      extra.append((rule[0], tuple(rule[1]) if isinstance(rule[1], list) else rule[1]))
    overridden = {name for name, _ in extra}
    rules = extra + [rule for rule in rules if rule[0] not in overridden]
  return tuple(rules)


def make_mesh(num_partitions: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A `('data', 'model')` mesh of shape `[n_devices // num_partitions, num_partitions]`.

  Devices are laid out by `jax.make_mesh` (topology-aware on TPU). The axes are `AxisType.Auto`, so
  GSPMD propagates shardings between the annotated inputs/outputs, as under T5X's pjit.

  Args:
    num_partitions: size of the `model` axis (model parallelism); 1 is pure data parallelism.
    devices: the devices to use; defaults to all global devices, `jax.devices()`.

  Returns:
    The mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
    raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
  if n % num_partitions:
    raise ValueError(
        f"num_partitions={num_partitions} does not divide the {n} devices "
        f"({devices[0].platform if devices else 'none'}): the mesh is [{n} // num_partitions, num_partitions]")
  shape = (n // num_partitions, int(num_partitions))
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(auto, auto), devices=devices)
  logging.info("Mesh %s over %d %s devices", dict(mesh.shape), n, devices[0].platform)
  return mesh


def _is_axes_leaf(x: Any) -> bool:
  """A leaf of a logical-axes tree: a box, a PartitionSpec, None, or a non-empty plain tuple of names.

  An empty tuple stays an (empty) pytree node, as in optax states such as `optax.chain()`'s `()`; a scalar's
  axes are written None or `PartitionSpec()`.
  """
  if isinstance(x, (nn.LogicallyPartitioned, jax.sharding.PartitionSpec)) or x is None:
    return True
  return (type(x) is tuple and bool(x)  # pylint: disable=unidiomatic-typecheck
          and all(n is None or isinstance(n, str) for n in x))


def _check_rules(rules: LogicalAxisRules, mesh: jax.sharding.Mesh) -> None:
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"logical axis rule {rule!r} is not a (logical_name, mesh_axes) pair")
    mesh_axes = rule[1]
    axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    for axis in axes:
      if axis not in mesh.axis_names:
        raise ValueError(f"logical axis rule {tuple(rule)!r} names mesh axis {axis!r}, "
                         f"which is not one of the mesh axes {mesh.axis_names}")


def logical_to_mesh_axes(logical_axes: Sequence[Optional[str]], rules: LogicalAxisRules,
                         *, path: str = "<array>", shape: Optional[Sequence[int]] = None,
                         mesh: Optional[jax.sharding.Mesh] = None) -> jax.sharding.PartitionSpec:
  """The mesh PartitionSpec of one array given its logical axis names.

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: `(logical_name, mesh_axes)` pairs, highest priority first.
    path: the array's tree path, for error messages.
    shape: when given, the rank is checked and every sharded dimension must be divisible by the size of its
      mesh axes (needs `mesh`).
    mesh: the mesh, for the divisibility check.

  Returns:
    A `PartitionSpec` over mesh axis names.

  Raises:
    ValueError: naming `path` when a logical name has no rule, the rank differs from `shape`, or a dimension
      does not divide over its mesh axes.
  """
  logical_axes = tuple(logical_axes)
  rule_names = {rule[0] for rule in rules}
  unknown = [n for n in logical_axes if isinstance(n, str) and n not in rule_names]
  if unknown:
    raise ValueError(
        f"{path}: logical axis name(s) {unknown} (of {logical_axes}) have no partitioning rule; known names: "
        f"{sorted(rule_names)}. Add a rule, e.g. standard_logical_axis_rules.additional_rules = "
        f"[('{unknown[0]}', None)]")
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"{path}: {len(logical_axes)} logical axes {logical_axes} for an array of shape "
                     f"{tuple(shape)}")
  spec = nn.logical_to_mesh_axes(logical_axes, list(rules))
  if shape is not None and mesh is not None:
    for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
      if mesh_axes is None:
        continue
      axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      parts = int(np.prod([mesh.shape[a] for a in axes]))
      if size % parts:
        raise ValueError(
            f"{path}: dimension {dim} ('{logical_axes[dim]}') of shape {tuple(shape)} has size {size}, not "
            f"divisible by mesh axes {axes} of size {parts}")
  return spec


def logical_to_sharding(axes_tree: PyTree, mesh: jax.sharding.Mesh,
                        rules: Optional[LogicalAxisRules] = None) -> PyTree:
  """A pytree of `NamedSharding`s from logical axis annotations.

  Args:
    axes_tree: either the boxed tree from `jax.eval_shape(model.init, ...)` (or of an optax state initialized
      from it: optax maps through the boxes, so `mu`/`nu` keep their names), whose `nn.LogicallyPartitioned`
      leaves give names and unboxed array leaves are replicated; or a tree whose leaves are non-empty tuples
      of logical names (one per dimension), `PartitionSpec`s of logical names, or None (replicated, e.g. a
      scalar). The two forms can be mixed.
    mesh: the device mesh.
    rules: `(logical_name, mesh_axes)` pairs; default `standard_logical_axis_rules()` (with its gin bindings).

  Returns:
    A tree of `NamedSharding`s with the structure of `strip_boxes(axes_tree)` (each box replaced by its
    sharding).

  Raises:
    ValueError: naming the leaf path for an unknown logical name, a rank mismatch, an indivisible dimension,
      or a rule that names a mesh axis the mesh lacks.
  """
  rules = tuple(standard_logical_axis_rules() if rules is None else rules)
  _check_rules(rules, mesh)

  def to_sharding(path, leaf):
    name = jax.tree_util.keystr(path) or "<root>"
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      shape = getattr(value, "shape", None)
      spec = logical_to_mesh_axes(leaf.names, rules, path=name, shape=shape, mesh=mesh)
    elif leaf is None:
      spec = jax.sharding.PartitionSpec()
    elif isinstance(leaf, jax.sharding.PartitionSpec) or type(leaf) is tuple:  # pylint: disable=unidiomatic-typecheck
      spec = logical_to_mesh_axes(tuple(leaf), rules, path=name)
    elif hasattr(leaf, "shape"):  # An unannotated array (e.g. optax's `count`): replicated.
      spec = jax.sharding.PartitionSpec()
    else:
      raise ValueError(f"{name}: leaf {leaf!r} of type {type(leaf).__name__} is neither a logical-axes "
                       "annotation nor an array")
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(to_sharding, axes_tree, is_leaf=_is_axes_leaf)


def abstract_with_shardings(boxed_tree: PyTree, mesh: jax.sharding.Mesh,
                            rules: Optional[LogicalAxisRules] = None) -> PyTree:
  """`jax.ShapeDtypeStruct`s carrying their `NamedSharding`, from a boxed `jax.eval_shape` tree.

  This is the restore target Orbax wants (`CheckpointManager.restore_latest(abstract_state)`), and the
  `out_shardings` of a jitted init.

  Args:
    boxed_tree: output of `jax.eval_shape(model.init, ...)` or of an optax `init` on it.
    mesh: the device mesh.
    rules: as in `logical_to_sharding`.

  Returns:
    The unboxed tree, each leaf a `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
  """
  shardings = logical_to_sharding(boxed_tree, mesh, rules)
  values = strip_boxes(boxed_tree)
  return jax.tree_util.tree_map(
      lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)


def strip_boxes(tree: PyTree) -> PyTree:
  """`tree` with each `nn.LogicallyPartitioned` replaced by its value, no sharding constraint applied.

  Unlike `nn.unbox`, this never calls `with_sharding_constraint`, so it is safe on `ShapeDtypeStruct`s and
  inside or outside a mesh context.
  """
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict:
  """Places a batch on the mesh with its leading (batch) axis sharded over `data`, the rest replicated.

  On one host `batch` is the global batch; with several processes each passes its own slice (read with
  `host_shard_info()`) and the global batch is their concatenation in process order.

  Args:
    batch: a mapping of feature name to array `[B, ...]` (numpy or jax), e.g. `encoder_input_tokens [B, n]`.
    mesh: the device mesh.

  Returns:
    A dict of global `jax.Array`s `[B * process_count, ...]` sharded as `PartitionSpec('data')`.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  data_size = mesh.shape[DATA_AXIS]
  out = {}
  for key, value in batch.items():
    value = np.asarray(value) if not isinstance(value, jax.Array) else value
    if value.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch feature needs a leading batch axis")
    if jax.process_count() == 1 and value.shape[0] % data_size:
      raise ValueError(
          f"batch[{key!r}] of shape {tuple(value.shape)}: batch size {value.shape[0]} is not divisible by the "
          f"'{DATA_AXIS}' mesh axis of size {data_size} (mesh {dict(mesh.shape)})")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def host_shard_info():
  """The SeqIO shard of the input data this process reads: `ShardInfo(process_index, process_count)`.

  Assumes each process feeds distinct examples, i.e. the `model` axis does not span processes (true for
  `make_mesh` whenever `num_partitions` <= local device count).
  """
  import seqio  # pylint: disable=g-import-not-at-top  # Imports TensorFlow: deferred to when data is read.
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           heartbeat_timeout_seconds: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when any multi-host setting is given; single host otherwise.

  Must run before any other JAX call that touches devices.

  Args:
    coordinator_address: `host:port` of process 0.
    num_processes: total number of processes.
    process_id: this process's index in `[0, num_processes)`.
    heartbeat_timeout_seconds: how long a process may be silent before the others abort (JAX's default,
      100 s, when None); a peer that dies makes the survivors exit instead of waiting forever.

  Returns:
    Whether the distributed runtime was initialized.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    logging.info("Single-host run: jax.distributed is not initialized")
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  logging.info("jax.distributed.initialize(coordinator_address=%r, num_processes=%r, process_id=%r)",
               coordinator_address, num_processes, process_id)
  extra = {} if heartbeat_timeout_seconds is None else {"heartbeat_timeout_seconds": heartbeat_timeout_seconds}
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, **extra)
  logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def optimizer_state_shardings(tx, boxed_params: PyTree, mesh: jax.sharding.Mesh,
                              rules: Optional[LogicalAxisRules] = None) -> PyTree:
  """Shardings of `tx.init(params)`, from the parameters' logical names.

  Optax maps its per-parameter statistics through the boxes, so `mu`/`nu` keep the parameter's names.
  Factored statistics (Adafactor's `v_row`/`v_col`, one axis fewer than the parameter) cannot keep them:
  those are small vectors and are replicated.
  """
  abstract = jax.eval_shape(tx.init, boxed_params)

  def fix(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) != len(leaf.value.shape):
      return leaf.replace_boxed(leaf.value).replace(names=(None,) * len(leaf.value.shape))
    return leaf

  abstract = jax.tree_util.tree_map(fix, abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return logical_to_sharding(abstract, mesh, rules)
