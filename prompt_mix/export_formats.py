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

The `.npy` of a prompt-tuning leaf is exactly what `PromptTuning(init='file', init_file=...)` reads
([m, d], or [N, m, d] for a bank), so an exported prompt initializes a new run (SPoT transfer);
`export_prompt_npy` writes that one array alone (one task of a bank with `task_index`).

`save_peft_adapter` writes Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)
so that `PeftModel.from_pretrained(T5ForConditionalGeneration(...), DIR)` in PyTorch gives the logits of
our model, and `load_peft_adapter` reads such a directory (e.g. an adapter trained in PyTorch) back into a
`peft` tree. A method is written only where PEFT computes exactly what we compute:

| ours                                    | PEFT (`task_type='SEQ_2_SEQ_LM'`)                                    |
|-----------------------------------------|----------------------------------------------------------------------|
| `PromptTuning(stack='encoder')`         | `PROMPT_TUNING`, `num_transformer_submodules=1`: `prompt_embeddings`   |
|   `encoder/<name>/prompt [m, d]`        |   `[m, d]`, prepended to the encoder input embeddings, masks grown by m |
| `LoRA` on any projections               | `LORA`, `target_modules` = the exact module names, `r`, `lora_alpha`  |
|   `.../<proj>/<name>/a [in, r]`         |   `base_model.model.<module>.lora_A.weight [r, in]` (transposed)      |
|   `.../<proj>/<name>/b [r, out]`        |   `base_model.model.<module>.lora_B.weight [out, r]` (transposed)     |
| `PrefixTuning` / `PTuningV2`            | refused: see below                                                    |

Why prefixes are refused. PEFT's `PREFIX_TUNING` for a seq2seq model hands its table to the decoder as
`past_key_values` (`PeftModel.get_prompt`): (1) T5's encoder never receives it, so our encoder
self-attention prefixes have no counterpart; (2) it builds cross-attention entries but then replaces the
cross-attention cache by an empty one (`EncoderDecoderCache.cross_attention_cache = DynamicCache()`), so
HF T5 recomputes cross-attention keys from the encoder output and our cross-attention prefixes have no
counterpart; (3) decoder self-attention does see the prefix, but as cached past positions: HF T5 adds its
relative position bias to them (`T5Attention.compute_bias` over all key positions, queries offset by l),
whereas our prefix keys carry no position bias (prefix tuning as Li & Liang define it), so the logits
differ whenever the decoder's relative position bias is not zero. `save_peft_adapter` raises
`ExportError` naming the sites instead of writing a different model. `peft_prefix_tuning_table` gives the
table PEFT would need for decoder self-attention prefixes (for a user who accepts the difference), and
`load_peft_adapter(..., approximate_prefix=True)` reads a PEFT prefix adapter as decoder self-attention
P-tuning v2 prefixes, an initialization rather than the same model.

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
from prompt_mix.peft import lora as lora_lib
from prompt_mix.peft import prefix_tuning as prefix_lib
from prompt_mix.peft import prompt_tuning as prompt_lib
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


class ExportError(ValueError):
  """The trained tree has no exact representation in the requested format (nothing was written)."""


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
  """Writes the prompt `peft/<stack>/<name>/prompt` as the `.npy` that `PromptTuning(init='file')` reads.

  Args:
    peft: the `peft` tree (or variables holding one).
    path: the `.npy` file to write (atomically).
    name / stack: `PromptTuning.name` and `.stack`.
    task_index: for a bank `[N, m, d]`, write row `task_index` as `[m, d]`; None writes the leaf as is
      (`[m, d]`, or `[N, m, d]`, which `PromptTuning(init='file', num_tasks=N)` reads).
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


# ------------------------------------------------------------------------------------------ HF PEFT: write
def _adapter_config(peft_type: str, base_model_name_or_path: Optional[str], **fields) -> dict:
  return dict(peft_type=peft_type, task_type=SEQ2SEQ, base_model_name_or_path=base_model_name_or_path,
              revision=None, inference_mode=True, **fields)


def _prompt_tuning_adapter(flat: dict[str, np.ndarray], delta: prompt_lib.PromptTuning, config: T5Config,
                           task_index: Optional[int]) -> tuple[dict, dict]:
  if delta.stack != "encoder":
    raise ExportError(
        f"{delta!r} prepends rows to the decoder input: HF PEFT's seq2seq PROMPT_TUNING prepends virtual "
        "tokens to the encoder input only (PeftModelForSeq2SeqLM.forward uses the first "
        "num_virtual_tokens rows of its table; the decoder half of a num_transformer_submodules=2 table is "
        "never used), so no PEFT adapter represents it; no adapter written")
  key = f"encoder/{delta.name}/prompt"
  _only(flat, [key], delta)
  prompt = _task_slice(flat[key], key, delta.num_tasks, task_index, 2)
  m, d = prompt.shape
  if (m, d) != (delta.length, config.emb_dim):
    raise ValueError(f"{key}: shape {[m, d]}, expected [{delta.length}, {config.emb_dim}] (length, d_model)")
  adapter_config = _adapter_config(
      "PROMPT_TUNING", None, num_virtual_tokens=m, token_dim=d,
      # One submodule: the table is exactly our [m, d] prompt, prepended to the encoder input. (PEFT's
      # seq2seq default, 2, adds m rows that its seq2seq forward never reads.)
      num_transformer_submodules=1, num_attention_heads=config.num_heads,
      num_layers=config.num_encoder_layers, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
      tokenizer_name_or_path=None, tokenizer_kwargs=None, modules_to_save=None)
  return adapter_config, {PEFT_PROMPT_KEY: prompt}


def _lora_adapter(flat: dict[str, np.ndarray], delta: lora_lib.LoRA,
                  task_index: Optional[int]) -> tuple[dict, dict]:
  pattern = re.compile(f"/{re.escape(delta.name)}/[ab]$")
  _only(flat, [k for k in flat if pattern.search(k)], delta)
  one_task = {}
  for path, value in flat.items():
    value = _task_slice(value, path, delta.num_tasks, task_index, 2)
    r = value.shape[1] if path.endswith("/a") else value.shape[0]
    if r != delta.rank:
      raise ValueError(f"{path}: shape {list(value.shape)} has rank {r}, but the LoRA has rank {delta.rank}")
    one_task[path] = value
  state = lora_lib.to_peft_state_dict(unflatten_leaves(one_task), delta.name)
  modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k).removeprefix("base_model.model.")
                    for k in state})
  if delta.dropout_rate:
    logging.info("LoRA dropout %.3g is written as PEFT's lora_dropout (training only)", delta.dropout_rate)
  adapter_config = _adapter_config(
      "LORA", None, r=delta.rank, lora_alpha=delta.alpha, lora_dropout=delta.dropout_rate,
      target_modules=modules, fan_in_fan_out=False, bias="none", use_rslora=False, use_dora=False,
      init_lora_weights=True, modules_to_save=None, rank_pattern={}, alpha_pattern={},
      layers_to_transform=None, layers_pattern=None)
  return adapter_config, {k: np.array(v, order="C") for k, v in state.items()}


def _only(flat: Mapping[str, Any], expected: Sequence[str], delta: plugins.Delta) -> None:
  """Raises naming the leaves that `delta`'s mapping does not cover (never drop a leaf silently)."""
  missing = [k for k in expected if k not in flat]
  extra = sorted(set(flat) - set(expected))
  if missing or extra or not expected:
    raise ExportError(f"the peft leaves do not match {delta!r}: " +
                      (f"missing {missing}; " if missing else "") +
                      (f"not part of it {extra}" if extra else "") +
                      ("it has no leaves" if not expected else ""))


def _prefix_sites(flat: Mapping[str, Any], name: str) -> list[str]:
  pattern = re.compile(f"^(.*)/{re.escape(name)}/(key|value|embedding|mlp_wi|mlp_bi|mlp_wo|mlp_bo)$")
  return sorted({m.group(1) for m in map(pattern.match, flat) if m})


_SITE_KIND = re.compile(r"^(encoder|decoder)/layers_(\d+)/(attention|self_attention|encoder_decoder_attention)$")
_WHY = {
    "attention": "PEFT gives T5's encoder no prefix (its past_key_values reach the decoder only)",
    "encoder_decoder_attention": ("PEFT replaces the cross-attention cache by an empty DynamicCache, so HF "
                                  "T5 recomputes cross keys/values from the encoder output without them"),
    "self_attention": ("HF T5 adds its relative position bias to the prefix keys (cached past positions), "
                       "ours carry none"),
}
_KIND_NAME = {"attention": "encoder self-attention", "encoder_decoder_attention": "cross-attention",
              "self_attention": "decoder self-attention"}


def prefix_refusal(sites: Sequence[str], delta: plugins.Delta) -> ExportError:
  """The error explaining, per kind of attention site, why PEFT's PREFIX_TUNING cannot represent it."""
  by_kind: dict[str, list[str]] = {}
  for site in sites:
    match = _SITE_KIND.match(site)
    kind = match.group(3) if match else "self_attention"
    by_kind.setdefault(kind, []).append(site)
  summary = "; ".join(f"{len(v)} {_KIND_NAME[k]} sites: {_WHY[k]}" for k, v in by_kind.items())
  details = "\n".join(f"  {site}" for site in sites)
  return ExportError(
      f"HF PEFT's PREFIX_TUNING cannot represent {type(delta).__name__} '{delta.name}' exactly, so no "
      f"adapter was written: {summary} (see {DOCS}; export 'npy' or 'safetensors' instead)\n"
      f"sites:\n{details}")


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
    ExportError: the method has no exact PEFT counterpart (module docstring); nothing is written.
  """
  adapter_config, tensors = peft_adapter(variables, model, base_model_name_or_path, task_index)
  with atomic.atomic_dir(directory) as tmp:
    with open(os.path.join(tmp, ADAPTER_CONFIG_FILE), "w") as f:
      json.dump(adapter_config, f, indent=2, sort_keys=True)
    _write_safetensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_FILE), {"format": "pt"})
  logging.info("Wrote the HF PEFT %s adapter to %s", adapter_config["peft_type"], directory)
  return os.fspath(directory)


def peft_adapter(variables: Mapping[str, Any], model: Any, base_model_name_or_path: Optional[str] = None,
                 task_index: Optional[int] = None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {PEFT key: array}) of `save_peft_adapter`, in memory."""
  flat = flatten_leaves(_peft_of(variables))
  deltas = tuple(model.deltas)
  mappable = (prompt_lib.PromptTuning, prefix_lib.PrefixTuning, lora_lib.LoRA)
  others = [d for d in deltas if not isinstance(d, mappable)]
  if others or len(deltas) != 1:
    raise ExportError(
        f"an HF PEFT adapter holds one method, of prompt tuning, prefix tuning or LoRA; this model's method "
        f"is {describe_method(deltas) or 'empty'}" +
        (f" ({', '.join(type(d).__name__ for d in others)} has no PEFT counterpart)" if others else "") +
        "; no adapter written (export 'npy' or 'safetensors' instead)")
  delta = deltas[0]
  if isinstance(delta, prompt_lib.PromptTuning):
    adapter_config, tensors = _prompt_tuning_adapter(flat, delta, model.config, task_index)
  elif isinstance(delta, lora_lib.LoRA):
    adapter_config, tensors = _lora_adapter(flat, delta, task_index)
  else:
    sites = _prefix_sites(flat, delta.name)
    if not sites:
      raise ExportError(f"no prefix leaves '<site>/{delta.name}/...' in the peft tree for {delta!r}")
    raise prefix_refusal(sites, delta)
  adapter_config["base_model_name_or_path"] = base_model_name_or_path
  return adapter_config, tensors


def peft_prefix_tuning_table(variables: Mapping[str, Any], model: Any,
                             task_index: Optional[int] = None) -> tuple[dict, np.ndarray]:
  """PEFT's PREFIX_TUNING config and `prompt_embeddings` table for decoder self-attention prefixes.

  NOT the same model (see the module docstring): PEFT's T5 gives these prefix keys a relative position
  bias that ours lack, which is why `save_peft_adapter` refuses prefixes. This is the table for a user
  who accepts that difference, and what the tests use to measure it (it is exact for a decoder whose
  relative position bias is zero).

  Layout (PEFT's `get_prompt` with `num_transformer_submodules=2`): the table `[l, 2 L h d_kv]` viewed as
  `[l, 2L, h, d_kv]` is concatenated with itself and cut into L groups of 4 (self key, self value, cross
  key, cross value), so decoder layer i's self-attention key and value are entries `4i mod 2L` and
  `4i+1 mod 2L`. For even L, layers i and i + L/2 therefore share their prefix.

  Args:
    variables: model variables with `peft` (reparameterized prefixes are baked first).
    model: an `EncoderDecoderModel` whose one delta is a `PrefixTuning` at decoder self-attention only,
      on every decoder layer.
  Returns:
    (adapter_config dict, prompt_embeddings [l, 2 L h d_kv] float32).
  """
  deltas = tuple(model.deltas)
  if len(deltas) != 1 or not isinstance(deltas[0], prefix_lib.PrefixTuning):
    raise ValueError(f"peft_prefix_tuning_table needs one PrefixTuning delta, got {describe_method(deltas)}")
  delta = deltas[0]
  config = model.config
  variables = {"peft": _peft_of(variables)}
  if delta.reparameterize:
    variables, (delta,) = prefix_lib.bake(variables, (delta,))
  flat = flatten_leaves(variables["peft"])
  sites = _prefix_sites(flat, delta.name)
  depth = config.num_decoder_layers
  wanted = [f"decoder/layers_{i}/self_attention" for i in range(depth)]
  if sites != wanted:
    raise ValueError(f"PEFT's T5 prefix reaches the self-attention of every decoder layer and nothing else: "
                     f"the sites must be {wanted}, got {sites}")
  h, dk, l = config.num_heads, config.head_dim, delta.length
  entries = np.zeros((l, 2 * depth, h, dk), np.float32)
  owner: dict[int, int] = {}
  for i, site in enumerate(wanted):
    k = _task_slice(flat[f"{site}/{delta.name}/key"], site, delta.num_tasks, task_index, 3)
    v = _task_slice(flat[f"{site}/{delta.name}/value"], site, delta.num_tasks, task_index, 3)
    slot = (4 * i) % (2 * depth)
    if slot in owner:
      j = owner[slot]
      if not (np.array_equal(entries[:, slot], k) and np.array_equal(entries[:, slot + 1], v)):
        raise ValueError(f"PEFT's layout gives decoder layers {j} and {i} the same prefix (even depth "
                         f"{depth}), but ours differ")
    owner[slot] = i
    entries[:, slot], entries[:, slot + 1] = k, v
  adapter_config = _adapter_config(
      "PREFIX_TUNING", None, num_virtual_tokens=l, token_dim=h * dk, num_attention_heads=h,
      num_layers=depth, num_transformer_submodules=PEFT_SEQ2SEQ_SUBMODULES, prefix_projection=False,
      encoder_hidden_size=h * dk, init_weights=None, modules_to_save=None)
  return adapter_config, entries.reshape(l, 2 * depth * h * dk)


# ------------------------------------------------------------------------------------------ HF PEFT: read
def read_peft_adapter(directory: PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config dict, {key: array}) of an HF PEFT adapter directory."""
  directory = os.fspath(directory)
  config_path = os.path.join(directory, ADAPTER_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: {directory} is not an HF PEFT adapter")
  with open(config_path) as f:
    adapter_config = json.load(f)
  weights = os.path.join(directory, ADAPTER_WEIGHTS_FILE)
  if os.path.exists(weights):
    tensors, _ = _read_safetensors(weights)
  elif os.path.exists(os.path.join(directory, "adapter_model.bin")):
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu", weights_only=True)
    tensors = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG_FILE} but no {ADAPTER_WEIGHTS_FILE}")
  return adapter_config, tensors


def _check_seq2seq(adapter_config: Mapping[str, Any], directory: str) -> None:
  task_type = adapter_config.get("task_type")
  if task_type != SEQ2SEQ:
    raise ValueError(f"{directory}/{ADAPTER_CONFIG_FILE}: task_type {task_type!r}; a T5 adapter is "
                     f"{SEQ2SEQ!r}")


def _table(tensors: Mapping[str, np.ndarray], directory: str) -> np.ndarray:
  if PEFT_PROMPT_KEY not in tensors:
    raise KeyError(f"{directory}/{ADAPTER_WEIGHTS_FILE} has no {PEFT_PROMPT_KEY!r} (keys {sorted(tensors)})")
  return np.asarray(tensors[PEFT_PROMPT_KEY])


def load_peft_adapter(directory: PathLike, *, name: Optional[str] = None,
                      approximate_prefix: bool = False) -> dict:
  """The `peft` tree (numpy) of an HF PEFT adapter of a T5, e.g. one trained in PyTorch.

  * PROMPT_TUNING (and P_TUNING, whose saved table is its encoder's output): the first
    `num_virtual_tokens` rows of `prompt_embeddings` (the rows PEFT's seq2seq forward prepends to the
    encoder input) -> `encoder/<name or 'prompt_tuning'>/prompt [m, d]`. Exact.
  * LORA -> `.../<proj>/<name or 'lora'>/{a,b}` (transposed). Exact for `bias='none'` without DoRA,
    `rank_pattern`/`alpha_pattern` or `modules_to_save`; with `use_rslora` the delta's alpha must be
    `lora_alpha * sqrt(r)` (`peft_adapter_delta` does that).
  * PREFIX_TUNING -> `decoder/layers_i/self_attention/<name or 'p_tuning_v2'>/{key,value} [l, h, d_kv]`,
    the prefix each decoder layer's self-attention gets in PEFT (`peft_prefix_tuning_table`'s layout).
    Only with `approximate_prefix=True`: our prefix keys carry no relative position bias and PEFT's do, so
    this is an initialization, not the same model.

  Raises:
    ValueError naming the file and field for anything else.
  """
  directory = os.fspath(directory)
  adapter_config, tensors = read_peft_adapter(directory)
  _check_seq2seq(adapter_config, directory)
  peft_type = adapter_config.get("peft_type")
  source = f"{directory}/{ADAPTER_CONFIG_FILE}"
  if peft_type in ("PROMPT_TUNING", "P_TUNING"):
    m = int(adapter_config["num_virtual_tokens"])
    submodules = adapter_config.get("num_transformer_submodules") or PEFT_SEQ2SEQ_SUBMODULES
    table = _table(tensors, directory)
    if table.ndim != 2 or table.shape[0] != m * submodules:
      raise ValueError(f"{directory}: {PEFT_PROMPT_KEY} has shape {list(table.shape)}, expected "
                       f"[{m * submodules}, d] (num_virtual_tokens {m} x num_transformer_submodules "
                       f"{submodules})")
    return {"encoder": {name or "prompt_tuning": {"prompt": np.array(table[:m], np.float32)}}}
  if peft_type == "LORA":
    problems = []
    if adapter_config.get("bias", "none") != "none":
      problems.append(f"bias={adapter_config['bias']!r} (trained biases)")
    if adapter_config.get("use_dora"):
      problems.append("use_dora=true")
    for field in ("rank_pattern", "alpha_pattern"):
      if adapter_config.get(field):
        problems.append(f"{field}={adapter_config[field]}")
    if adapter_config.get("modules_to_save"):
      problems.append(f"modules_to_save={adapter_config['modules_to_save']}")
    if problems:
      raise ValueError(f"{source}: LoRA options without a counterpart here: {', '.join(problems)}")
    return lora_lib.from_peft_state_dict(tensors, name or "lora")
  if peft_type == "PREFIX_TUNING":
    if not approximate_prefix:
      raise ValueError(
          f"{source}: a PEFT PREFIX_TUNING adapter of T5 acts on decoder self-attention with relative "
          "position bias on its prefix keys, which our prefixes do not have; pass approximate_prefix=True "
          "to read it as decoder self-attention P-tuning v2 prefixes (an initialization, not the same model)")
    submodules = adapter_config.get("num_transformer_submodules") or PEFT_SEQ2SEQ_SUBMODULES
    if submodules != PEFT_SEQ2SEQ_SUBMODULES:
      raise ValueError(f"{source}: num_transformer_submodules {submodules}: PEFT's T5 prefix works with "
                       f"{PEFT_SEQ2SEQ_SUBMODULES} (an encoder-decoder cache)")
    l, depth = int(adapter_config["num_virtual_tokens"]), int(adapter_config["num_layers"])
    h, width = int(adapter_config["num_attention_heads"]), int(adapter_config["token_dim"])
    table = _table(tensors, directory)
    if table.shape != (l, 2 * depth * width) or width % h:
      raise ValueError(f"{directory}: {PEFT_PROMPT_KEY} has shape {list(table.shape)}, expected "
                       f"[{l}, {2 * depth * width}] (num_virtual_tokens, 2 num_layers token_dim) with "
                       f"token_dim {width} divisible by num_attention_heads {h}")
    entries = np.asarray(table, np.float32).reshape(l, 2 * depth, h, width // h)
    logging.warning("%s: reading PEFT prefixes as decoder self-attention prefixes without relative position "
                    "bias: an initialization, not the same model", directory)
    tree: dict = {"decoder": {}}
    for i in range(depth):
      slot = (4 * i) % (2 * depth)
      tree["decoder"][f"layers_{i}"] = {"self_attention": {name or "p_tuning_v2": {
          "key": np.array(entries[:, slot]), "value": np.array(entries[:, slot + 1])}}}
    return tree
  raise ValueError(f"{source}: peft_type {peft_type!r} has no counterpart here (PROMPT_TUNING, P_TUNING, "
                   "LORA, PREFIX_TUNING)")


def peft_adapter_delta(directory: PathLike, config: T5Config, *, name: Optional[str] = None,
                       approximate_prefix: bool = False) -> plugins.Delta:
  """The delta whose `peft` leaves are exactly `load_peft_adapter(directory)`'s, for a backbone `config`.

  Checked by initializing the delta's shapes on `config`: the paths and shapes must equal the adapter's.
  """
  from prompt_mix.t5 import model as model_lib  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  tree = load_peft_adapter(directory, name=name, approximate_prefix=approximate_prefix)
  adapter_config, _ = read_peft_adapter(directory)
  peft_type = adapter_config["peft_type"]
  flat = flatten_leaves(tree)
  if peft_type in ("PROMPT_TUNING", "P_TUNING"):
    candidates = [prompt_lib.PromptTuning(length=int(adapter_config["num_virtual_tokens"]),
                                          stack="encoder", init="uniform", name=name or "prompt_tuning")]
  elif peft_type == "PREFIX_TUNING":
    depth = int(adapter_config["num_layers"])
    candidates = [prefix_lib.PTuningV2(length=int(adapter_config["num_virtual_tokens"]),
                                       stacks=("decoder",), attentions=("self_attention",),
                                       name=name or "p_tuning_v2")]
  else:
    candidates = _lora_deltas(flat, adapter_config, config, name or "lora")
  found = {k: tuple(v.shape) for k, v in flat.items()}
  batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                     "decoder_target_tokens")}
  expected = {}
  for delta in candidates:
    model = model_lib.EncoderDecoderModel(config, (delta,))
    try:
      expected = {k: tuple(v.shape) for k, v in
                  model_lib.flatten(_unbox(model.abstract_init(batch)["peft"])).items()}
    except ValueError:  # A candidate selection that does not fit this backbone's depths.
      continue
    if expected == found:
      return delta
  diff = sorted(set(expected.items()) ^ set(found.items()))
  raise ValueError(f"{directory}: no single {type(delta).__name__} on this backbone has exactly the "
                   f"adapter's leaves; differing (path, shape) for {delta!r}: {diff[:8]}")


def _lora_deltas(flat: Mapping[str, np.ndarray], adapter_config: Mapping[str, Any], config: T5Config,
                 name: str) -> list[lora_lib.LoRA]:
  """LoRA(targets, stacks, attentions, layers) candidates covering the adapter's projections.

  The layers of each stack are written with positive indices, or with negative ones for the second half
  of each stack (so 'first and last layer' of unequal stacks is `(0, -1)`); the caller keeps the one whose
  leaves are the adapter's.
  """
  pattern = re.compile(r"^(encoder|decoder)/(?:layers_(\d+)/)?(attention|self_attention|"
                       r"encoder_decoder_attention|mlp|logits_dense)/?([a-z_0-9]*)/")
  targets, attentions = set(), set()
  layers: dict[str, set[int]] = {}
  for path in flat:
    match = pattern.match(path)
    if match is None:
      raise ValueError(f"not a LoRA leaf path: {path}")
    stack, layer, module, projection = match.groups()
    layers.setdefault(stack, set())
    if module == "logits_dense":
      targets.add("logits_dense")
      continue
    targets.add(projection)
    layers[stack].add(int(layer))
    if module in ("attention", "self_attention"):
      attentions.add("self_attention")
    elif module == "encoder_decoder_attention":
      attentions.add("cross_attention")
  depth = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  selections = ["all"]
  if any(used and used != set(range(depth[s])) for s, used in layers.items()):
    positive = {i for used in layers.values() for i in used}
    mixed = {i if i < depth[s] / 2 else i - depth[s] for s, used in layers.items() for i in used}
    selections = [tuple(sorted(positive)), tuple(sorted(mixed))]
  rank = int(adapter_config["r"])
  alpha = float(adapter_config["lora_alpha"])
  if adapter_config.get("use_rslora"):
    alpha = alpha * float(np.sqrt(rank))  # PEFT's rsLoRA scale lora_alpha / sqrt(r) as our alpha / r.
  return [lora_lib.LoRA(
      rank=rank, alpha=alpha, targets=tuple(sorted(targets)), stacks=tuple(sorted(layers)),
      attentions=("attention",) if len(attentions) != 1 else tuple(attentions), layers=selection,
      dropout_rate=float(adapter_config.get("lora_dropout") or 0.0), name=name) for selection in selections]
