"""Export of a trained run's `peft` tree: the function behind `python -m prompt_mix.export`.

Restores one training checkpoint's trainable tree (the latest, a given step, or the best) into a target
built from the model's shapes alone (`setup.abstract_trainable`: the backbone is neither loaded nor
needed), then writes the requested formats under `export_dir`:

```
'npy'          <export_dir>/npy/manifest.json + <export_dir>/npy/<path>.npy per leaf
'safetensors'  <export_dir>/peft.safetensors
'peft'         <export_dir>/peft_adapter/{adapter_config.json, adapter_model.safetensors} (HF PEFT)
```

Every format is checked before anything is written, so a method PEFT cannot represent fails the export
in one line and leaves `export_dir` untouched. A checkpoint with NaN or infinite values (an older version
could save one) is refused, naming each such leaf, and nothing is written. See
`prompt_mix/export_formats.py` and docs/export.md.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

from absl import logging
import gin
import jax

from prompt_mix import export_formats
from prompt_mix import partitioning
from prompt_mix.data import feature_converter as feature_converter_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import t5x_checkpoint
from prompt_mix.training import settings
from prompt_mix.training import setup

FORMATS = ("npy", "safetensors", "peft", "t5x")
NPY_DIR = "npy"
SAFETENSORS_FILE = "peft.safetensors"
PEFT_ADAPTER_DIR = "peft_adapter"


def _check_formats(formats: Union[str, Sequence[str]]) -> tuple[str, ...]:
  formats = (formats,) if isinstance(formats, str) else tuple(formats)
  if not formats:
    raise ValueError(f"EXPORT_FORMATS is empty: choose among {list(FORMATS)}")
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise ValueError(f"EXPORT_FORMATS: unknown {unknown}; choose among {list(FORMATS)}")
  return tuple(dict.fromkeys(formats))


@gin.configurable
def export(model_dir: str = gin.REQUIRED,
           export_dir: str = gin.REQUIRED,
           formats: Sequence[str] = FORMATS,
           model: model_lib.EncoderDecoderModel = gin.REQUIRED,
           step: Optional[Union[int, str]] = None,
           task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
           task_index: Optional[int] = None,
           base_model_name_or_path: Optional[str] = None,
           best_metric: Optional[str] = None,
           best_mode: str = "max",
           num_partitions: int = 1) -> dict[str, str]:
  """Writes the `peft` tree of one training checkpoint of `model_dir` in `formats`.

  Args:
    model_dir: the training run's MODEL_DIR (checkpoints under `<model_dir>/checkpoints`).
    export_dir: where the formats go (module docstring); each one is replaced atomically.
    formats: a subset of ('npy', 'safetensors', 'peft', 't5x'); 't5x' (full fine-tuning only) writes the
      trained backbone as a T5X checkpoint `<export_dir>/t5x/checkpoint_<step>`.
    model: the run's model (backbone config and method), as training built it.
    step: None (latest), a step number, or 'best' (by `best_metric` / `best_mode`, or the one metric the
      run saved with its checkpoints).
    task_feature_lengths: the run's lengths (the trainable shapes are built from a batch of them).
    task_index: for leaves with a leading tasks axis, the task written as the PEFT adapter ('npy' and
      'safetensors' always hold every task).
    base_model_name_or_path: recorded in the PEFT adapter's config (the HF backbone's name or path).
    num_partitions: model-parallel size of the mesh the checkpoint is restored onto.
  Returns:
    {format: path written}.
  """
  formats = _check_formats(formats)
  if not export_dir:
    raise ValueError("EXPORT_DIR is empty: pass --gin.EXPORT_DIR=\\\"/path/to/export\\\"")
  if os.path.exists(export_dir) and not os.path.isdir(export_dir):
    raise ValueError(f"EXPORT_DIR {export_dir} is a file, not a directory: choose a directory (it is "
                     "created when missing)")
  settings.integer(num_partitions, "export", "num_partitions")
  settings.integer(task_index, "export", "task_index", minimum=0, allow_none=True)
  settings.feature_lengths(task_feature_lengths, "export")
  if "t5x" in formats and not model.trains_backbone:
    raise export_formats.ExportError("'t5x' writes a backbone checkpoint: only full fine-tuning trains the "
                                     "backbone; export this method as 'npy', 'safetensors' or 'peft'")
  if model.trains_backbone and "peft" in formats:
    raise export_formats.ExportError("full fine-tuning trains the backbone itself: a PEFT adapter cannot "
                                     "hold it; export 'npy' or 'safetensors'")
  mesh = partitioning.make_mesh(num_partitions)
  shapes = feature_converter_lib.model_input_shapes(task_feature_lengths, 1)
  step = setup.resolve_step(model_dir, step, best_metric, best_mode)
  # From the checkpoint's variable specs when it has them: nothing the method read at init is needed.
  target = setup.trainable_target(model, model_dir, step, setup.dummy_batch(shapes), mesh)
  # Refuses (FloatingPointError naming each leaf) a step holding NaN or infinite values.
  trainable, step = setup.restore_checkpoint(model_dir, target, step)
  # Every leaf to the host once (gathered across hosts if sharded); all processes take part in that.
  flat = export_formats.flatten_leaves(trainable)
  tree = export_formats.unflatten_leaves(flat)
  adapter = None
  if "peft" in formats:  # Fails before anything is written when PEFT cannot represent the method.
    adapter = export_formats.peft_adapter(tree, model, base_model_name_or_path, task_index)
  metadata = {"step": step, "model_dir": os.path.abspath(model_dir)}
  written = {}
  if jax.process_index() == 0:
    os.makedirs(export_dir, exist_ok=True)
    if "npy" in formats:
      written["npy"] = export_formats.save_npy(tree, os.path.join(export_dir, NPY_DIR), model.deltas,
                                               metadata)
    if "safetensors" in formats:
      written["safetensors"] = export_formats.save_safetensors(
          tree, os.path.join(export_dir, SAFETENSORS_FILE), model.deltas, metadata)
    if adapter is not None:
      written["peft"] = export_formats.save_peft_adapter(
          tree, model, os.path.join(export_dir, PEFT_ADAPTER_DIR), base_model_name_or_path, task_index)
    if "t5x" in formats:  # The fine-tuned backbone, loadable as any run's INITIAL_CHECKPOINT_PATH.
      written["t5x"] = t5x_checkpoint.write_msgpack_backbone(tree, os.path.join(export_dir, "t5x"), step)
    for name, path in written.items():
      logging.info("Exported step %d of %s as %s: %s", step, model_dir, name, path)
  return written
