"""The backbone a run was started with: recorded in `MODEL_DIR/backbone.json`, checked on every resume.

A training checkpoint holds the method's variables only; the frozen backbone comes back from
INITIAL_CHECKPOINT_PATH at every start. Resuming on another backbone of the same width would train on
silently (the `peft` shapes fit), so the first start records

```json
{"config": {"vocab_size": 384, "emb_dim": 8, ...},      the architecture fields of T5Config
 "fingerprint": "sha256:...",                            of the loaded weights (below)
 "initial_checkpoint_path": "/ckpt/checkpoint_1000000",  or null for random_init_backbone
 "random_init_backbone": false}
```

and a later start that finds checkpoints refuses a backbone whose config or fingerprint differs, naming
both. A start before any checkpoint exists re-records (nothing was trained on the old one). The path alone
is not compared: a checkpoint copied elsewhere has the same fingerprint.

The fingerprint is a SHA-256 over every leaf's name, shape, and `SAMPLE` values taken at an even stride
over the flattened leaf: a few milliseconds even for an 11B backbone, and two different checkpoints (a
fine-tuned one and its base included) differ in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
import numpy as np

from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import param_tree

RECORD_FILE = "backbone.json"
SAMPLE = 1024
# The fields of T5Config that describe the backbone's weights and architecture (not dropout or dtypes).
ARCHITECTURE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers",
                       "head_dim", "mlp_dim", "mlp_activations", "logits_via_embedding",
                       "relative_attention_num_buckets", "relative_attention_max_distance")


class BackboneMismatchError(ValueError):
  """A resume loads a different backbone than the run was trained on."""


def fingerprint(params: Mapping[str, Any]) -> str:
  """'sha256:<hex>' of the leaves' names, shapes and a strided sample of their values (module docstring)."""
  digest = hashlib.sha256()
  for name, value in sorted(param_tree.flatten(params).items()):
    array = np.asarray(jax.device_get(value) if isinstance(value, jax.Array) else value)
    flat = array.reshape(-1)
    stride = max(1, flat.size // SAMPLE)
    sample = np.ascontiguousarray(flat[::stride][:SAMPLE], dtype=np.float32)
    digest.update(f"{name}:{list(array.shape)};".encode())
    digest.update(sample.tobytes())
  return "sha256:" + digest.hexdigest()


def architecture(config: config_lib.T5Config) -> dict:
  fields = dataclasses.asdict(config)
  return {k: list(fields[k]) if isinstance(fields[k], tuple) else fields[k] for k in ARCHITECTURE_FIELDS}


def make_record(config: config_lib.T5Config, params: Mapping[str, Any],
                initial_checkpoint_path: Optional[str], random_init_backbone: bool) -> dict:
  return {"config": architecture(config), "fingerprint": fingerprint(params),
          "initial_checkpoint_path": initial_checkpoint_path, "random_init_backbone": bool(random_init_backbone)}


def _origin(record: Mapping[str, Any]) -> str:
  if record.get("random_init_backbone"):
    return "a random backbone (random_init_backbone=True)"
  return str(record.get("initial_checkpoint_path"))


def read_record(model_dir: str) -> Optional[dict]:
  """The run's backbone record, or None before the first start (local paths and `gs://` alike)."""
  path = epath.Path(model_dir) / RECORD_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the run's backbone record ({e}); it is written at the first "
                     "start: restore it from a copy, or delete it to record the backbone of this start") from e


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two records (config fields, then the fingerprint)."""
  diffs = []
  old_config, new_config = recorded.get("config", {}), current.get("config", {})
  for field in ARCHITECTURE_FIELDS:
    if old_config.get(field) != new_config.get(field):
      diffs.append(f"{field}: run {old_config.get(field)!r}, now {new_config.get(field)!r}")
  if recorded.get("fingerprint") != current.get("fingerprint"):
    diffs.append(f"weights fingerprint: run {recorded.get('fingerprint')}, now {current.get('fingerprint')}")
  return diffs


def check_or_record(model_dir: str, record: Mapping[str, Any], has_checkpoints: bool) -> None:
  """Writes `record` on a first start; on a resume, refuses a backbone that differs from the recorded one.

  Args:
    model_dir: the run's MODEL_DIR.
    record: `make_record(...)` of the backbone this start loaded.
    has_checkpoints: whether the run has training checkpoints (a resume).

  Raises:
    BackboneMismatchError: naming both backbones and every difference.
  """
  from prompt_mix import gin_utils  # pylint: disable=g-import-not-at-top
  path = os.fspath(epath.Path(model_dir) / RECORD_FILE)
  recorded = read_record(model_dir)
  if recorded is not None and has_checkpoints:
    diffs = differences(recorded, record)
    if diffs:
      raise BackboneMismatchError(
          f"{model_dir} was trained on a different backbone than this start loads: the run's is "
          f"{_origin(recorded)} ({path}), this start's is {_origin(record)}:\n"
          + "\n".join(f"  {d}" for d in diffs)
          + "\nResume with the run's backbone (INITIAL_CHECKPOINT_PATH and model gin file), or train in a new "
            "MODEL_DIR.")
    if recorded.get("initial_checkpoint_path") != record.get("initial_checkpoint_path"):
      logging.info("The backbone moved from %s to %s (same weights fingerprint)",
                   recorded.get("initial_checkpoint_path"), record.get("initial_checkpoint_path"))
    return
  if recorded is None and has_checkpoints:
    logging.warning("%s has checkpoints but no %s (a run of an older version): recording this start's "
                    "backbone %s; it cannot be checked against the one the checkpoints were trained on",
                    model_dir, RECORD_FILE, _origin(record))
  elif recorded is not None and differences(recorded, record):
    logging.warning("%s: no checkpoint yet, so the backbone record is replaced by this start's (%s)",
                    model_dir, _origin(record))
  if jax.process_index() == 0:
    gin_utils.write_text_atomically(path, json.dumps(dict(record), indent=2) + "\n", "the backbone record")


def check_for_use(model_dir: str, record: Mapping[str, Any]) -> None:
  """At eval/infer: a warning (not an error) when the backbone differs from the one the run trained on.

  Evaluating a trained method on another backbone can be deliberate (transfer); it is never silent.
  """
  recorded = read_record(model_dir)
  if recorded is None:
    return
  diffs = differences(recorded, record)
  if diffs:
    logging.warning("%s was trained on %s, but this run loads %s: %s", model_dir, _origin(recorded),
                    _origin(record), "; ".join(diffs))
