"""Files of a trained `peft` tree: one `.npy` per leaf, one safetensors file, and HF PEFT adapters.

Paths are the tree's '/'-joined keys, e.g. `encoder/prompt_tuning/prompt` or
`decoder/layers_2/self_attention/query/lora/a`. Leaves keep their shapes (a leading `tasks` axis included)
and dtypes (bfloat16 too), so the first two formats round-trip bit-identically:

```
save_npy(peft, DIR)            DIR/manifest.json                      {format, version, method, metadata,
                                                                        leaves: [{path, file, shape, dtype}]}
                               DIR/encoder/prompt_tuning/prompt.npy   one file per leaf, nested directories
                                                                      mirroring the path ('/' never has to
                                                                      be escaped in a file name)
save_safetensors(peft, FILE)   FILE: key = path, metadata {'format': 'prompt_mix.peft', 'method': ...}
```

The `.npy` of a prompt-tuning leaf is exactly what prompt tuning's `init='file'` reads
([m, d], or [N, m, d] for a bank), so an exported prompt initializes a new run (SPoT transfer);
`export_prompt_npy` writes that one array alone (one task of a bank with `task_index`).

`save_peft_adapter` writes Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)
so that `PeftModel.from_pretrained(T5ForConditionalGeneration(...), DIR)` in PyTorch gives the logits of
our model, and `load_peft_adapter` reads such a directory (e.g. an adapter trained in PyTorch) back into a
`peft` tree. The mappings live with their methods (`Delta.to_peft` / `Delta.from_peft` and `peft_types`):
a method is written only where PEFT computes exactly what we compute, and every other method refuses with
its own reason (`ExportError`, nothing written). docs/export.md has the table of what maps to what and why
prefixes are refused.

Multi-task trees (a leading `tasks` axis, `num_tasks=N`) have one PEFT adapter per task: pass
`task_index`. Every writer is atomic: files go to a temporary name in the same directory and are renamed
into place (`os.replace`), directories likewise.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix import atomic
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

PathLike = Union[str, os.PathLike]

FORMAT = "prompt_mix.peft"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PROMPT_KEY = "prompt_embeddings"  # PEFT's saved key of every prompt-learning table.
SEQ2SEQ = "SEQ_2_SEQ_LM"
# PEFT's seq2seq default: a prompt-learning table holds virtual tokens for 2 submodules (encoder, decoder).
PEFT_SEQ2SEQ_SUBMODULES = 2
DOCS = "docs/export.md"


# The trained tree has no exact representation in the requested format (nothing was written).
ExportError = plugins.ExportError


# ------------------------------------------------------------------------------------------ leaves
def _unbox(tree: Any) -> Any:
  """`tree` without `nn.LogicallyPartitioned` boxes (no sharding constraint applied)."""
  is_box = lambda x: isinstance(x, flax.linen.LogicallyPartitioned)
  return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _to_host(path: str, value: Any) -> np.ndarray:
  """A numpy copy of a leaf; arrays sharded over several hosts are gathered first."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    value = multihost_utils.process_allgather(value, tiled=True)
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise TypeError(f"peft leaf {path} is {type(value).__name__}, not an array")
  return np.asarray(value)


def flatten_leaves(tree: Any) -> dict[str, np.ndarray]:
  """{'a/b/c': numpy array} of a nested `peft` tree (boxed or not, on devices or not), in path order.

  Raises:
    ValueError naming a key that is not a non-empty string without '/'.
  """
  tree = flax.core.unfreeze(_unbox(tree))
  if not isinstance(tree, Mapping):
    raise TypeError(f"a peft tree must be a nested dict, got {type(tree).__name__}")
  flat = {}
  for keys, value in flax.traverse_util.flatten_dict(tree).items():
    for key in keys:
      if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"peft key {key!r} in {keys}: keys must be non-empty strings without '/'")
    path = "/".join(keys)
    flat[path] = _to_host(path, value)
  return dict(sorted(flat.items()))


def unflatten_leaves(flat: Mapping[str, Any]) -> dict:
  """The nested tree of {'a/b/c': leaf}."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _peft_of(variables: Mapping[str, Any]) -> Any:
  """The `peft` collection of model variables, or `variables` itself when it is already a peft tree."""
  if isinstance(variables, Mapping) and "peft" in variables:
    return variables["peft"]
  if isinstance(variables, Mapping) and "params" in variables:
    raise ValueError(f"the variables have no 'peft' collection (collections: {sorted(variables)})")
  return variables


def describe_method(method: Union[None, str, plugins.Deltas]) -> str:
  """A one-line description of a method: the string itself, or the deltas' reprs joined by '; '."""
  if method is None:
    return ""
  if isinstance(method, str):
    return method
  return "; ".join(repr(d) for d in tuple(method))


def _dtype(name: str, source: str) -> np.dtype:
  try:
    return np.dtype(jnp.dtype(name))
  except TypeError as e:
    raise ValueError(f"{source}: unknown dtype {name!r}") from e


def _string_metadata(metadata: Optional[Mapping[str, Any]], source: str) -> dict[str, str]:
  out = {}
  for key, value in (metadata or {}).items():
    if not isinstance(key, str):
      raise TypeError(f"{source}: metadata keys must be strings, got {key!r}")
    out[key] = value if isinstance(value, str) else json.dumps(value)
  return out


# ------------------------------------------------------------------------------------------ .npy
def save_npy(peft: Any, directory: PathLike, method: Union[None, str, plugins.Deltas] = None,
             metadata: Optional[Mapping[str, Any]] = None) -> str:
  """Writes one `.npy` per leaf (`<directory>/<path>.npy`) and `manifest.json`; replaces `directory`.

  Args:
    peft: the `peft` tree (or model variables holding one); boxed or not, on devices or on the host.
    directory: the export directory (created, or replaced as a whole).
    method: the deltas (or a description string) recorded in the manifest.
    metadata: extra JSON-serializable values recorded in the manifest (e.g. the step).
  Returns:
    The directory written.
  """
  flat = flatten_leaves(_peft_of(peft))
  if not flat:
    raise ValueError(f"save_npy({directory}): the peft tree has no leaves")
  leaves = []
  with atomic.atomic_dir(directory) as tmp:
    for path, value in flat.items():
      file = f"{path}.npy"
      os.makedirs(os.path.dirname(os.path.join(tmp, file)), exist_ok=True)
      np.save(os.path.join(tmp, file), value, allow_pickle=False)
      leaves.append(dict(path=path, file=file, shape=list(value.shape), dtype=value.dtype.name))
    manifest = dict(format=f"{FORMAT}.npy", version=FORMAT_VERSION, method=describe_method(method),
                    metadata=dict(metadata or {}), leaves=leaves)
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
      json.dump(manifest, f, indent=2)
  logging.info("Wrote %d peft leaves as .npy to %s", len(leaves), directory)
  return os.fspath(directory)


def read_npy_manifest(directory: PathLike) -> dict:
  """The parsed `manifest.json` of a `save_npy` directory."""
  path = os.path.join(os.fspath(directory), MANIFEST_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {directory} is not a save_npy export")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != f"{FORMAT}.npy" or not isinstance(manifest.get("leaves"), list):
    raise ValueError(f"{path}: not a {FORMAT}.npy manifest (format {manifest.get('format')!r})")
  return manifest


def load_npy(directory: PathLike) -> dict:
  """The nested `peft` tree (numpy arrays) of a `save_npy` directory, checked against its manifest."""
  directory = os.fspath(directory)
  manifest = read_npy_manifest(directory)
  root = os.path.realpath(directory)
  flat = {}
  for entry in manifest["leaves"]:
    path, file = entry["path"], entry["file"]
    full = os.path.realpath(os.path.join(directory, file))
    if not full.startswith(root + os.sep):
      raise ValueError(f"{directory}/{MANIFEST_FILE}: leaf {path} names a file outside the export: {file}")
    if not os.path.exists(full):
      raise FileNotFoundError(f"{full} (leaf {path}) is listed in {MANIFEST_FILE} but missing")
    value = np.load(full, allow_pickle=False)
    dtype = _dtype(entry["dtype"], full)
    if value.dtype != dtype:  # bfloat16 is stored as raw 2-byte records ('<V2').
      if value.dtype.itemsize != dtype.itemsize or value.dtype.kind != "V":
        raise ValueError(f"{full}: dtype {value.dtype}, but {MANIFEST_FILE} says {entry['dtype']}")
      value = value.view(dtype)
    if list(value.shape) != list(entry["shape"]):
      raise ValueError(f"{full}: shape {list(value.shape)}, but {MANIFEST_FILE} says {entry['shape']}")
    flat[path] = value
  return unflatten_leaves(flat)


# ------------------------------------------------------------------------------------------ safetensors
def _write_safetensors(tensors: Mapping[str, np.ndarray], file: PathLike,
                       metadata: Mapping[str, str]) -> None:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  arrays = {k: np.array(v, order="C", copy=not v.flags.c_contiguous) for k, v in tensors.items()}  # Keeps 0-d.
  with atomic.atomic_file(file) as tmp:
    safetensors_numpy.save_file(arrays, tmp, metadata=dict(metadata))


def _read_safetensors(file: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({key: array}, metadata) of a safetensors file; any dtype, bfloat16 included."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  file = os.fspath(file)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} does not exist")
  with safetensors.safe_open(file, framework="np") as f:
    metadata = dict(f.metadata() or {})
  with open(file, "rb") as f:
    entries = safetensors.deserialize(f.read())
  dtypes = dict(safetensors_numpy._TYPES, BF16=jnp.bfloat16)  # pylint: disable=protected-access
  tensors = {}
  for key, entry in entries:
    if entry["dtype"] not in dtypes:
      raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which numpy cannot hold")
    dtype = np.dtype(dtypes[entry["dtype"]])
    tensors[key] = np.frombuffer(bytes(entry["data"]), dtype=dtype).reshape(entry["shape"]).copy()
  return tensors, metadata


def save_safetensors(peft: Any, file: PathLike, method: Union[None, str, plugins.Deltas] = None,
                     metadata: Optional[Mapping[str, Any]] = None) -> str:
  """Writes every leaf to one safetensors file, keyed by its '/'-joined path.

  The header metadata holds `format` ('prompt_mix.peft'), `version`, `method` (the deltas' description)
  and the given `metadata` (non-string values JSON-encoded).
  """
  flat = flatten_leaves(_peft_of(peft))
  if not flat:
    raise ValueError(f"save_safetensors({file}): the peft tree has no leaves")
  header = dict(_string_metadata(metadata, os.fspath(file)), format=FORMAT, version=str(FORMAT_VERSION),
                method=describe_method(method))
  _write_safetensors(flat, file, header)
  logging.info("Wrote %d peft leaves to %s", len(flat), file)
  return os.fspath(file)


def load_safetensors(file: PathLike) -> dict:
  """The nested `peft` tree (numpy arrays) of a `save_safetensors` file."""
  tensors, metadata = _read_safetensors(file)
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{file}: not a {FORMAT} safetensors file (metadata format "
                     f"{metadata.get('format')!r}; an HF PEFT adapter is read by load_peft_adapter)")
  return unflatten_leaves(tensors)


def read_safetensors_metadata(file: PathLike) -> dict[str, str]:
  import safetensors  # pylint: disable=g-import-not-at-top
  with safetensors.safe_open(os.fspath(file), framework="np") as f:
    return dict(f.metadata() or {})


# ------------------------------------------------------------------------------------------ prompts
def _task_slice(value: np.ndarray, path: str, num_tasks: Optional[int], task_index: Optional[int],
                base_ndim: int) -> np.ndarray:
  """`value` of one task: the leaf itself, or row `task_index` of a leaf with a leading tasks axis."""
  if num_tasks is None:
    if value.ndim != base_ndim:
      raise ValueError(f"{path}: shape {list(value.shape)} is not {base_ndim}-dimensional as its method "
                       "declares (num_tasks=None)")
    if task_index is not None:
      raise ValueError(f"task_index={task_index}, but {path} {list(value.shape)} has no tasks axis")
    return value
  if value.ndim != base_ndim + 1 or value.shape[0] != num_tasks:
    raise ValueError(f"{path}: shape {list(value.shape)} lacks the leading tasks axis of {num_tasks}")
  if task_index is None:
    raise ExportError(f"{path} holds {num_tasks} tasks (shape {list(value.shape)}); a PEFT adapter holds "
                      "one: pass task_index (TASK_INDEX) to export one task")
  if not 0 <= task_index < num_tasks:
    raise ValueError(f"task_index={task_index} is out of range for the {num_tasks} tasks of {path}")
  return value[task_index]


def export_prompt_npy(peft: Any, path: PathLike, name: str = "prompt_tuning", stack: str = "encoder",
                      task_index: Optional[int] = None) -> str:
  """Writes the prompt `peft/<stack>/<name>/prompt` as the `.npy` that prompt tuning's `init='file'` reads.

  Args:
    peft: the `peft` tree (or variables holding one).
    path: the `.npy` file to write (atomically).
    name / stack: the prompt delta's `name` and `stack`.
    task_index: for a bank `[N, m, d]`, write row `task_index` as `[m, d]`; None writes the leaf as is
      (`[m, d]`, or `[N, m, d]`, which a bank of N prompts with `init='file'` reads).
  Returns:
    The path written.
  """
  flat = flatten_leaves(_peft_of(peft))
  key = f"{stack}/{name}/prompt"
  if key not in flat:
    prompts = [k for k in flat if k.endswith("/prompt")]
    raise KeyError(f"export_prompt_npy: no prompt leaf {key} in the peft tree (prompt leaves: {prompts})")
  value = flat[key]
  if value.ndim not in (2, 3):
    raise ValueError(f"{key}: shape {list(value.shape)} is neither [m, d] nor [N, m, d]")
  if task_index is not None:
    value = _task_slice(value, key, value.shape[0] if value.ndim == 3 else None, task_index, 2)
  with atomic.atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, value, allow_pickle=False)
  return os.fspath(path)


# ------------------------------------------------------------------------------------------ HF PEFT
def adapter_config(peft_type: str, **fields) -> dict:
  """An HF PEFT `adapter_config.json` dict of a seq2seq (T5) adapter; `fields` are the type's own."""
  return dict(peft_type=peft_type, task_type=SEQ2SEQ, base_model_name_or_path=None, revision=None,
              inference_mode=True, **fields)


def expect_leaves(leaves: Mapping[str, Any], expected: Sequence[str], delta: plugins.Delta) -> None:
  """Raises naming the leaves that `delta`'s PEFT mapping does not cover (never drop a leaf silently)."""
  missing = [k for k in expected if k not in leaves]
  extra = sorted(set(leaves) - set(expected))
  if missing or extra or not expected:
    raise ExportError(f"the peft leaves do not match {delta!r}: " +
                      (f"missing {missing}; " if missing else "") +
                      (f"not part of it {extra}" if extra else "") +
                      ("it has no leaves" if not expected else ""))


def one_task(leaves: Mapping[str, np.ndarray], num_tasks: Optional[int],
             task_index: Optional[int]) -> dict[str, np.ndarray]:
  """The leaves of one task: as they are without a tasks axis, else row `task_index` of each leaf."""
  if num_tasks is None:
    if task_index is not None:
      raise ValueError(f"task_index={task_index}, but the method has no tasks axis (num_tasks=None)")
    return dict(leaves)
  return {path: _task_slice(value, path, num_tasks, task_index, np.ndim(value) - 1)
          for path, value in leaves.items()}


def save_peft_adapter(variables: Mapping[str, Any], model: Any, directory: PathLike,
                      base_model_name_or_path: Optional[str] = None,
                      task_index: Optional[int] = None) -> str:
  """Writes an HF PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).

  Args:
    variables: the model's variables with a `peft` collection (or the `peft` tree itself).
    model: the `EncoderDecoderModel` (its `config` and `deltas` say what the leaves mean).
    directory: the adapter directory (created, or replaced as a whole).
    base_model_name_or_path: recorded in `adapter_config.json` (the HF name or path of the backbone).
    task_index: the task to export from leaves with a leading tasks axis.
  Returns:
    The directory written.
  Raises:
    ExportError: the method has no exact PEFT counterpart (the method's own reason); nothing is written.
  """
  config, tensors = peft_adapter(variables, model, base_model_name_or_path, task_index)
  with atomic.atomic_dir(directory) as tmp:
    with open(os.path.join(tmp, ADAPTER_CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    _write_safetensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_FILE), {"format": "pt"})
  logging.info("Wrote the HF PEFT %s adapter to %s", config["peft_type"], directory)
  return os.fspath(directory)


def peft_adapter(variables: Mapping[str, Any], model: Any, base_model_name_or_path: Optional[str] = None,
                 task_index: Optional[int] = None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {PEFT key: array}) of `save_peft_adapter`, in memory.

  An adapter holds one method: the model's single delta writes it (`Delta.to_peft`), from its leaves of
  one task.
  """
  deltas = tuple(model.deltas)
  if len(deltas) != 1:
    raise ExportError(f"an HF PEFT adapter holds one method; this model's method is "
                      f"{describe_method(deltas) or 'empty'}; no adapter written (export 'npy' or "
                      "'safetensors' instead)")
  delta = deltas[0]
  leaves = one_task(flatten_leaves(_peft_of(variables)), delta.num_tasks, task_index)
  config, tensors = delta.to_peft(leaves, model.config)
  config["base_model_name_or_path"] = base_model_name_or_path
  return config, {k: np.array(v, order="C") for k, v in tensors.items()}


def read_peft_adapter(directory: PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {key: array}) of an HF PEFT adapter directory."""
  directory = os.fspath(directory)
  config_path = os.path.join(directory, ADAPTER_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: {directory} is not an HF PEFT adapter")
  with open(config_path) as f:
    config = json.load(f)
  weights = os.path.join(directory, ADAPTER_WEIGHTS_FILE)
  if os.path.exists(weights):
    tensors, _ = _read_safetensors(weights)
  elif os.path.exists(os.path.join(directory, "adapter_model.bin")):
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu", weights_only=True)
    tensors = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG_FILE} but no {ADAPTER_WEIGHTS_FILE}")
  return config, tensors


def _reader(peft_type: Any, source: str) -> type:
  """The Delta class that reads HF PEFT adapters of `peft_type` (it declares it in `peft_types`)."""
  from prompt_mix import methods  # pylint: disable=g-import-not-at-top
  readers = {}
  for cls in methods.delta_classes():
    for name in cls.__dict__.get("peft_types", ()):
      readers.setdefault(name, []).append(cls)
  if peft_type not in readers:
    raise ValueError(f"{source}: peft_type {peft_type!r} has no counterpart here (read: "
                     f"{', '.join(sorted(readers))})")
  if len(readers[peft_type]) > 1:
    raise ValueError(f"peft_type {peft_type!r} is claimed by {[c.__name__ for c in readers[peft_type]]}")
  return readers[peft_type][0]


def peft_adapter_delta_and_tree(directory: PathLike, config: T5Config, *, name: Optional[str] = None,
                                approximate_prefix: bool = False) -> tuple[plugins.Delta, dict]:
  """(the delta, its nested `peft` tree of numpy arrays) of an HF PEFT adapter of a T5 on `config`.

  The method that declares the adapter's `peft_type` reads it (`Delta.from_peft`); the result is checked
  by initializing the delta's shapes on `config`: its leaf paths and shapes must be the adapter's.
  """
  from prompt_mix.t5 import model as model_lib  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  delta, tree = _from_peft(directory, config, name, approximate_prefix)
  found = {k: tuple(v.shape) for k, v in flatten_leaves(tree).items()}
  batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                     "decoder_target_tokens")}
  model = model_lib.EncoderDecoderModel(config, (delta,))
  expected = {k: tuple(v.shape) for k, v in
              model_lib.flatten(_unbox(model.abstract_init(batch)["peft"])).items()}
  if expected != found:
    diff = sorted(set(expected.items()) ^ set(found.items()))
    raise ValueError(f"{directory}: {delta!r} on this backbone does not have exactly the adapter's leaves; "
                     f"differing (path, shape): {diff[:8]}")
  return delta, tree


def load_peft_adapter(directory: PathLike, config: Optional[T5Config] = None, *, name: Optional[str] = None,
                      approximate_prefix: bool = False) -> dict:
  """The `peft` tree (numpy) of an HF PEFT adapter of a T5, e.g. one trained in PyTorch.

  The method that declares the adapter's `peft_type` reads it (see each method's `from_peft`: prompt
  tuning reads PROMPT_TUNING and P_TUNING, low-rank adaptation LORA, prefix tuning PREFIX_TUNING only with
  `approximate_prefix=True`). With `config`, the tree is checked against the delta's shapes on it.
  Raises:
    ValueError naming the file and field for anything without an exact counterpart.
  """
  if config is not None:
    return peft_adapter_delta_and_tree(directory, config, name=name, approximate_prefix=approximate_prefix)[1]
  return _from_peft(os.fspath(directory), None, name, approximate_prefix)[1]


def _from_peft(directory: str, config: Optional[T5Config], name: Optional[str],
               approximate_prefix: bool) -> tuple[plugins.Delta, dict]:
  """`Delta.from_peft` of the method that declares the adapter's `peft_type`, errors naming the file."""
  adapter, tensors = read_peft_adapter(directory)
  source = f"{directory}/{ADAPTER_CONFIG_FILE}"
  if adapter.get("task_type") != SEQ2SEQ:
    raise ValueError(f"{source}: task_type {adapter.get('task_type')!r}; a T5 adapter is {SEQ2SEQ!r}")
  cls = _reader(adapter.get("peft_type"), source)
  try:
    return cls.from_peft(adapter, tensors, config, name=name, approximate=approximate_prefix)
  except KeyError as e:
    raise ValueError(f"{source}: missing field or tensor {e}") from None


def peft_adapter_delta(directory: PathLike, config: T5Config, *, name: Optional[str] = None,
                       approximate_prefix: bool = False) -> plugins.Delta:
  """The delta whose `peft` leaves are exactly the adapter's, for a backbone `config` (checked)."""
  return peft_adapter_delta_and_tree(directory, config, name=name, approximate_prefix=approximate_prefix)[0]
