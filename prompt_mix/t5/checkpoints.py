"""Loading a T5 backbone from any released checkpoint format, detected from the path.

```
params, config = load_backbone("gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000")
params, config = load_backbone("/ckpts/flan-t5-base", config=preset("t5_1_1_base"))  # HF directory
```

Formats (`detect_format`):
- 't5x_msgpack': a T5X step directory `checkpoint_<step>/` with its `checkpoint` msgpack file, or that file
  itself (any name; it is recognised by its contents). Leaves are inline or TensorStore zarr arrays
  (relative paths; `gs://` checkpoints are read through TensorStore's GCS driver).
- 't5x_orbax': an Orbax checkpoint: a T5X step directory holding the `state` item, or a PyTree checkpoint
  directory (`_METADATA` / OCDBT manifest) whose tree has `target`, `optimizer/target` or `params`.
- 'hf': a Hugging Face directory, `config.json` + `model.safetensors` | `pytorch_model.bin` (or sharded).

The backbone comes back as the T5X tree (see `param_tree`), float32 numpy arrays, checked against the
config: missing, unexpected and mis-shaped keys are errors that name them, a given config that disagrees
with the checkpoint is an error naming each field, and NaN or infinite weights are an error naming each
leaf with its count. Nothing is ever initialized randomly.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from absl import logging
from etils import epath

from prompt_mix.t5 import hf_checkpoint
from prompt_mix.t5 import t5x_checkpoint
from prompt_mix.t5.config import T5Config
from prompt_mix.t5.hf_checkpoint import config_to_hf_dict
from prompt_mix.t5.hf_checkpoint import hf_t5_model
from prompt_mix.t5.hf_checkpoint import t5x_tree_to_hf_state_dict
from prompt_mix.t5.param_tree import CheckpointError
from prompt_mix.t5.param_tree import check_config
from prompt_mix.t5.param_tree import check_finite
from prompt_mix.t5.param_tree import flatten
from prompt_mix.t5.param_tree import config_from_facts
from prompt_mix.t5.param_tree import expected_param_shapes
from prompt_mix.t5.param_tree import infer_config
from prompt_mix.t5.param_tree import infer_facts
from prompt_mix.t5.param_tree import validate_params

__all__ = [
    "CheckpointError", "FORMATS", "detect_format", "load_backbone", "infer_config",
    "expected_param_shapes", "validate_params", "t5x_tree_to_hf_state_dict", "config_to_hf_dict",
    "hf_t5_model",
]

FORMATS = ("t5x_msgpack", "t5x_orbax", "hf")
_STEP_DIR_RE = re.compile(r"checkpoint_\d+")
# msgpack map headers: fixmap, map16, map32. A T5X checkpoint file is one map.
_MSGPACK_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _first_bytes(path: epath.Path, n: int = 32) -> bytes:
  with path.open("rb") as fp:
    return fp.read(n)


def _detect_file(path: epath.Path) -> str:
  if path.name in hf_checkpoint.WEIGHT_FILES + (hf_checkpoint.CONFIG_FILE,) and hf_checkpoint.is_hf_dir(
      path.parent):
    return "hf"
  head = _first_bytes(path)
  if head.startswith(b"model_checkpoint_path"):
    raise CheckpointError(f"{path} is a TensorFlow (Mesh TF) checkpoint index; convert it to T5X "
                          "with T5X's `convert_tf_checkpoint` first")
  if head and head[0] in _MSGPACK_MAP_FIRST_BYTES:
    return "t5x_msgpack"
  raise CheckpointError(f"{path}: unknown checkpoint format: a file that is not a T5X msgpack checkpoint "
                        f"(it starts with {head[:16]!r}) nor a file of a Hugging Face directory")


def detect_format(path: str | os.PathLike) -> str:
  """'t5x_msgpack' | 't5x_orbax' | 'hf' for a checkpoint path (see the module docstring).

  Raises:
    CheckpointError: naming the path and what it holds when it is none of them.
  """
  path = epath.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path} does not exist")
  if not path.is_dir():
    return _detect_file(path)
  if t5x_checkpoint.is_orbax_dir(path):
    return "t5x_orbax"
  if (path / t5x_checkpoint.MSGPACK_FILE).exists() and not (path / t5x_checkpoint.MSGPACK_FILE).is_dir():
    return "t5x_msgpack"
  if hf_checkpoint.is_hf_dir(path):
    return "hf"
  entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
  steps = [e.rstrip("/") for e in entries if _STEP_DIR_RE.fullmatch(e.rstrip("/"))]
  if steps:
    steps.sort(key=lambda s: int(s.split("_")[1]))
    raise CheckpointError(f"{path} is a T5X model directory with steps {', '.join(steps)}; pass one of "
                          f"them, e.g. {path / steps[-1]}")
  if (path / hf_checkpoint.CONFIG_FILE).exists():
    raise CheckpointError(f"{path} has a config.json but no weights (looked for "
                          f"{', '.join(hf_checkpoint.WEIGHT_FILES)}); found {entries}")
  shown = entries[:30] + ([f"... {len(entries) - 30} more"] if len(entries) > 30 else [])
  raise CheckpointError(
      f"{path}: unknown checkpoint format: expected a T5X checkpoint (a `checkpoint` msgpack file), an "
      f"Orbax checkpoint (`_METADATA`, `manifest.ocdbt`, or a `state/` item) or a Hugging Face directory "
      f"(`config.json` + weights); found {shown or 'an empty directory'}")


def load_backbone(path: str | os.PathLike,
                  config: Optional[T5Config] = None) -> tuple[dict[str, Any], T5Config]:
  """Reads the frozen T5 backbone of a checkpoint.

  Args:
    path: a T5X step directory or msgpack file, an Orbax checkpoint, or a Hugging Face directory;
      local or `gs://`.
    config: the expected config. Every field the checkpoint determines must agree with it (shapes,
      depths, gated MLP, tied logits; for HF also the activations and the relative-position distance).
      None infers the config from the checkpoint.

  Returns:
    (params, config): the T5X backbone tree of float32 numpy arrays, and `config` (or the inferred one).

  Raises:
    CheckpointError: unknown format, unreadable/corrupt files (named), a config mismatch (each field with
      both values), a tree that is not the config's backbone (each missing, unexpected and mis-shaped
      key with its shapes), or non-finite weights (each leaf with its NaN/inf count).
  """
  fmt = detect_format(path)
  source = os.fspath(path)
  logging.info("Loading the T5 backbone from %s (format %s)", source, fmt)
  if fmt == "hf":
    hf_dir = epath.Path(path)
    params, found = hf_checkpoint.read_hf_backbone(hf_dir if hf_dir.is_dir() else hf_dir.parent)
    facts = {f: getattr(found, f) for f in (
        "vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
        "num_decoder_layers", "mlp_activations", "logits_via_embedding",
        "relative_attention_num_buckets", "relative_attention_max_distance")}
  else:
    reader = (t5x_checkpoint.read_msgpack_backbone if fmt == "t5x_msgpack"
              else t5x_checkpoint.read_orbax_backbone)
    params = reader(path)
    facts = infer_facts(params, source)
    found = None if config is not None else config_from_facts(facts, source)
  if config is not None:
    check_config(config, facts, source)
    found = config
  validate_params(params, found, source)
  if fmt != "hf":  # The HF reader checks its state dict itself, naming the HF keys.
    check_finite(flatten(params), source)
  return params, found
