"""Readers for T5X checkpoints: the msgpack format (inline and TensorStore leaves) and T5X's Orbax layout.

T5X msgpack (`t5x/checkpoints.py`, format version 3): a step directory `checkpoint_<step>/` holds a
`checkpoint` file, `flax.serialization` msgpack of `{'version': 3, 'optimizer': {'target': <params>,
'state': <optimizer state>}}`. A leaf is either an inline array (msgpack ext type 1) or, for partitioned
parameters, a serialized `tensorstore.Spec` dict

    {'driver': 'zarr', 'dtype': 'float32', 'kvstore': {'driver': 'file', 'path': 'target.encoder...'},
     'metadata': {'shape': [...], 'chunks': [...], 'compressor': {'id': 'gzip'}}}

whose path is relative to the step directory (the parameter name with '/' -> '.'). Checkpoints written to
GCS carry `{'driver': 'gcs', 'bucket': 't5x-dummy-bucket', 'path': ...}`; the bucket comes from the
checkpoint's own `gs://bucket/...` location at read time. Older TensorStore specs keep `path` at the top
level instead of under `kvstore`.

T5X Orbax (`OrbaxCheckpointManagerInterface`): `checkpoint_<step>/state/` is an Orbax PyTree checkpoint
(`_METADATA`, per-leaf zarr directories or OCDBT) of `{'target': ..., 'state': ...}`; earlier T5X
versions saved `{'version', 'optimizer': {'target', 'state'}}` into the step directory itself. Plain
Orbax PyTree checkpoints of `{'params': ...}` or of the bare tree are read too.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Mapping

from absl import logging
from etils import epath
from flax import serialization
import numpy as np

from prompt_mix import atomic
from prompt_mix.t5.param_tree import CheckpointError
from prompt_mix.t5.param_tree import flatten
from prompt_mix.t5.param_tree import to_float32
from prompt_mix.t5.param_tree import unflatten

MSGPACK_FILE = "checkpoint"
# Files that mark a directory as an Orbax PyTree checkpoint (or a step holding one).
ORBAX_PYTREE_MARKERS = ("_METADATA", "manifest.ocdbt")
ORBAX_STEP_MARKER = "_CHECKPOINT_METADATA"
# Item names under an Orbax step directory, in the order they are tried (T5X uses 'state').
ORBAX_ITEMS = ("state", "default", "params")
_SUPPORTED_VERSIONS = (2, 3)
_GCS_RE = re.compile(r"^gs://([^/]+)/?(.*)$", re.DOTALL)


def is_ts_spec(value: Any) -> bool:
  """Whether a msgpack leaf is a serialized TensorStore spec (T5X's reference to a zarr array)."""
  return isinstance(value, Mapping) and {"driver", "kvstore"} <= set(value)


def select_backbone(tree: Mapping[str, Any], source: str) -> tuple[tuple[str, ...], Mapping[str, Any]]:
  """(key path, subtree) of the backbone in a checkpoint tree.

  Follows `optimizer` -> `target` (T5X), `target` (T5X Orbax), `params` (Flax variables or train
  states) until the node holding `token_embedder`.
  """
  path: tuple[str, ...] = ()
  node = tree
  while "token_embedder" not in node:
    for key in ("optimizer", "target", "params"):
      if key in node and isinstance(node[key], Mapping):
        path, node = path + (key,), node[key]
        break
    else:
      where = "/".join(path) or "the top level"
      raise CheckpointError(
          f"{source}: no T5 backbone found: expected `optimizer/target`, `target` or `params` holding "
          f"`token_embedder`, but {where} has keys {sorted(node)}")
  return path, node


# ----------------------------------------------------------------------------------------------------
# TensorStore leaves.


def absolute_ts_spec(spec: Mapping[str, Any], ckpt_dir: str, key: str = "?") -> dict[str, Any]:
  """The spec of a T5X TensorStore leaf with its relative path resolved against `ckpt_dir`.

  For a `gs://bucket/dir` checkpoint the kvstore becomes `{'driver': 'gcs', 'bucket': 'bucket', 'path':
  'dir/<relative>'}` whatever driver it was written with; for a local checkpoint it becomes `{'driver':
  'file', 'path': '<ckpt_dir>/<relative>'}` (a checkpoint copied down from GCS reads locally). Chunking and
  compression are dropped from the metadata so the stored array opens as written.
  """
  spec = copy.deepcopy(dict(spec))
  kvstore = spec.get("kvstore")
  if not isinstance(kvstore, Mapping):
    raise CheckpointError(f"{ckpt_dir}: TensorStore spec of {key} has no kvstore dict: {spec}")
  kvstore = dict(kvstore)
  if "path" in kvstore:
    relative = kvstore["path"]
  elif "path" in spec:  # tensorstore < 0.1.14 kept the path at the top level.
    relative = spec.pop("path")
  else:
    raise CheckpointError(f"{ckpt_dir}: TensorStore spec of {key} has no path: {spec}")
  if kvstore.get("driver") not in ("file", "gfile", "gcs"):
    raise CheckpointError(f"{ckpt_dir}: TensorStore spec of {key} uses kvstore driver "
                          f"{kvstore.get('driver')!r}; T5X writes 'file', 'gfile' or 'gcs'")
  match = _GCS_RE.match(str(ckpt_dir))
  if match:
    bucket, prefix = match.group(1), match.group(2).rstrip("/")
    spec["kvstore"] = {"driver": "gcs", "bucket": bucket,
                       "path": f"{prefix}/{relative}" if prefix else relative}
  else:
    spec["kvstore"] = {"driver": "file", "path": os.path.join(str(ckpt_dir), relative)}
  metadata = dict(spec.get("metadata", {}))
  metadata.pop("chunks", None)
  metadata.pop("compressor", None)
  spec["metadata"] = metadata
  spec.pop("transform", None)
  return spec


def read_ts_leaves(specs: Mapping[str, Mapping[str, Any]], ckpt_dir: str,
                   source: str) -> dict[str, np.ndarray]:
  """Reads the TensorStore leaves {key: spec} of a T5X checkpoint, all reads in flight at once."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  resolved, locations = {}, {}
  for key, spec in specs.items():
    spec = absolute_ts_spec(spec, ckpt_dir, key)
    if spec.get("dtype") == "uint16" or spec["metadata"].get("dtype") in ("<u2", ">u2"):
      raise CheckpointError(f"{source}: {key} is stored as uint16 (T5X format version 2 bfloat16); "
                            "re-save it with T5X >= 2021-06 (format version 3)")
    kvstore = spec["kvstore"]
    locations[key] = (f"gs://{kvstore['bucket']}/{kvstore['path']}" if kvstore["driver"] == "gcs"
                      else kvstore["path"])
    resolved[key] = spec

  def fail(key: str, e: Exception):
    return CheckpointError(f"{source}: cannot read the TensorStore array of {key} at {locations[key]}: "
                           f"{e}")

  opening = {key: ts.open(spec, open=True, read=True) for key, spec in resolved.items()}
  reading = {}
  for key, future in opening.items():
    try:
      reading[key] = future.result().read()
    except Exception as e:  # TensorStore raises ValueError / OSError subclasses with status text.
      raise fail(key, e) from e
  arrays = {}
  for key, future in reading.items():
    try:
      arrays[key] = future.result()
    except Exception as e:
      raise fail(key, e) from e
  return arrays


# ----------------------------------------------------------------------------------------------------
# Msgpack checkpoints.


def msgpack_file(path: str | os.PathLike) -> epath.Path:
  """The msgpack file of a T5X checkpoint given as its step directory or as the file itself."""
  path = epath.Path(path)
  return path / MSGPACK_FILE if path.is_dir() else path


def read_msgpack(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
  """(decoded contents, checkpoint directory) of a T5X msgpack checkpoint; leaves are not resolved."""
  file = msgpack_file(path)
  try:
    raw = file.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{file}: cannot read the T5X checkpoint file: {e}") from e
  if raw.startswith(b"model_checkpoint_path"):
    raise CheckpointError(f"{file} is a TensorFlow (Mesh TF) checkpoint index, not a T5X checkpoint; "
                          "convert it with T5X's `convert_tf_checkpoint` first")
  try:
    contents = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises ExtraData, FormatError, ValueError("incomplete input"), ...
    raise CheckpointError(f"{file}: cannot decode the T5X msgpack checkpoint ({len(raw)} bytes; "
                          f"truncated or corrupt file?): {type(e).__name__}: {e}") from e
  if not isinstance(contents, dict):
    raise CheckpointError(f"{file}: a T5X checkpoint decodes to a dict, got {type(contents).__name__}")
  version = contents.get("version", 0)
  if "optimizer" in contents and version not in _SUPPORTED_VERSIONS:
    raise CheckpointError(f"{file}: T5X checkpoint format version {version!r}; supported versions are "
                          f"{_SUPPORTED_VERSIONS}")
  return contents, os.fspath(file.parent)


def read_msgpack_backbone(path: str | os.PathLike) -> dict[str, Any]:
  """The backbone tree (float32 numpy leaves) of a T5X msgpack checkpoint, TensorStore leaves read."""
  contents, ckpt_dir = read_msgpack(path)
  source = os.fspath(msgpack_file(path))
  keypath, target = select_backbone(contents, source)
  flat = flatten(target, is_leaf=is_ts_spec)
  specs = {key: leaf for key, leaf in flat.items() if is_ts_spec(leaf)}
  flat.update(read_ts_leaves(specs, ckpt_dir, source))
  flat = {key: to_float32(leaf, key, source) for key, leaf in flat.items()}
  logging.info("Read %d leaves (%d from TensorStore) of %s from %s", len(flat), len(specs),
               "/".join(keypath) or "the top level", source)
  return unflatten(flat)


# ----------------------------------------------------------------------------------------------------
# Orbax checkpoints.


def _has_any(path: epath.Path, names: tuple[str, ...]) -> bool:
  return any((path / name).exists() for name in names)


def is_orbax_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is an Orbax PyTree checkpoint or an Orbax step directory holding one."""
  path = epath.Path(path)
  if not path.is_dir():
    return False
  if _has_any(path, ORBAX_PYTREE_MARKERS + (ORBAX_STEP_MARKER,)):
    return True
  return any(_has_any(path / item, ORBAX_PYTREE_MARKERS) for item in ORBAX_ITEMS)


def orbax_pytree_dir(path: str | os.PathLike) -> epath.Path:
  """The PyTree checkpoint directory inside an Orbax step directory (or `path` itself)."""
  path = epath.Path(path)
  if _has_any(path, ORBAX_PYTREE_MARKERS):
    return path
  for item in ORBAX_ITEMS:
    if _has_any(path / item, ORBAX_PYTREE_MARKERS):
      return path / item
  found = sorted(p.name for p in path.iterdir())
  raise CheckpointError(f"{path}: an Orbax step directory without a PyTree item; looked for "
                        f"{', '.join(ORBAX_ITEMS)} holding {' or '.join(ORBAX_PYTREE_MARKERS)}; "
                        f"found {found}")


def _get(tree: Mapping[str, Any], keypath: tuple[str, ...]) -> Any:
  for key in keypath:
    tree = tree[key]
  return tree


def _nest(keypath: tuple[str, ...], value: Any) -> Any:
  for key in reversed(keypath):
    value = {key: value}
  return value


def _as_dict(tree: Any) -> Any:
  """Orbax metadata trees as plain nested dicts (leaves untouched)."""
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def read_orbax_backbone(path: str | os.PathLike) -> dict[str, Any]:
  """The backbone tree (float32 numpy leaves) of a T5X Orbax checkpoint; only the backbone is read."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = orbax_pytree_dir(path)
  source = os.fspath(directory)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(directory)
  except Exception as e:
    raise CheckpointError(f"{source}: cannot read the Orbax checkpoint metadata (truncated or corrupt "
                          f"checkpoint?): {type(e).__name__}: {e}") from e
  tree_metadata = _as_dict(getattr(metadata, "tree", metadata))
  keypath, target_metadata = select_backbone(tree_metadata, source)
  item = _nest(keypath, target_metadata)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    restored = ocp.Checkpointer(handler).restore(
        directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                               partial_restore=bool(keypath)))
  except Exception as e:
    raise CheckpointError(f"{source}: cannot restore {'/'.join(keypath) or 'the tree'} from the Orbax "
                          f"checkpoint: {type(e).__name__}: {e}") from e
  flat = {k: to_float32(v, k, source) for k, v in flatten(_get(restored, keypath)).items()}
  logging.info("Read %d leaves of %s from the Orbax checkpoint %s", len(flat),
               "/".join(keypath) or "the top level", source)
  return unflatten(flat)


def write_msgpack_backbone(params: Mapping[str, Any], directory: str | os.PathLike, step: int = 0) -> str:
  """Writes `params` as a T5X v3 msgpack checkpoint `<directory>/checkpoint_<step>/checkpoint`.

  The layout T5X reads (`{'version': 3, 'optimizer': {'target': params, 'state': {'step': step}}}`,
  inline leaves), so a backbone trained here (full fine-tuning) can be frozen and loaded by any run, or by
  T5X. Written to a temporary file first and renamed, so a crash never leaves a partial checkpoint.

  Returns:
    The checkpoint directory (what INITIAL_CHECKPOINT_PATH names).
  """
  ckpt_dir = epath.Path(directory) / f"checkpoint_{step}"
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  tree = {"version": 3, "optimizer": {
      "target": unflatten({k: np.asarray(v, np.float32) for k, v in flatten(params).items()}),
      "state": {"step": np.asarray(step, np.int32)}}}
  with atomic.atomic_file(ckpt_dir / "checkpoint") as tmp, open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  logging.info("Wrote a T5X checkpoint to %s", ckpt_dir)
  return os.fspath(ckpt_dir)
