"""Every registered method's gin file builds, and trains a few steps through the train function.

The methods are the gin files of `prompt_mix/configs/methods/` (`prompt_mix.methods.names()`); nothing here
names one. Each case parses `models/tiny_bytes.gin` + `methods/<method>.gin` + `runs/finetune.gin` with
small overrides, as `prompt_mix.train` does. Methods and their variants train two steps through the
gin-configured `trainer.train()` in this process (on the synthetic tasks); the ablations of a paper's study
(header 'Ablation of: ...') are built and initialized on the same backbone but not trained -- they differ
from their trained base method by configuration only, and training each of the dozen would add minutes to
the suite for no new code path. A method that reads a prompt library gets a scratch library of random
prompts; one that requires NUM_TASKS trains on a two-task mixture with a bank of two.
"""

import json

import gin
import jax
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix import launch
from prompt_mix import methods
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network
from prompt_mix.training import trainer

launch.import_registered()

TRAINED = [m for m in methods.names() if not methods.is_ablation(m)]
ABLATIONS = [m for m in methods.names() if methods.is_ablation(m)]
D_MODEL = 8  # models/tiny_bytes.gin.


def method_bindings(method, tmp_path):
  """Bindings that make `method` run here: a scratch prompt library, a bank of 2 where N is required."""
  bindings, task = [], "synthetic_max"
  if "NUM_TASKS" in methods.required_macros(method):
    bindings.append("NUM_TASKS = 2")
    task = "synthetic_targets"  # Two tasks, for the bank's task_ids.
  bindings += methods.library_bindings(method, bindings, d_model=D_MODEL, directory=tmp_path / "library")
  return bindings, task


def test_registry_lists_every_method_once_with_a_summary():
  names = methods.names()
  assert len(names) == len(set(names)) and "prompt_tuning" in names and "attempt" in names
  for name in names:
    assert methods.summary(name) and methods.field(name, "acts at") and methods.field(name, "docs"), name
    assert methods.base(name) != name


@pytest.mark.parametrize("method", TRAINED)
def test_method_gin_file_trains(method, tmp_path):
  bindings, task = method_bindings(method, tmp_path)
  bindings += [
      f"MODEL_DIR = '{tmp_path / 'run'}'", f"MIXTURE_OR_TASK_NAME = '{task}'", "TRAIN_STEPS = 2",
      "BATCH_SIZE = 4", "RANDOM_INIT_BACKBONE = True", "CHECKPOINT_PERIOD = 2",
      "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", "train.log_period = 1",
  ]
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(),
                              ["models/tiny_bytes.gin", methods.gin_path(method), "runs/finetune.gin"],
                              bindings)
    metrics = trainer.train()
  finally:
    gin.clear_config()
  assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
  saved = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
  assert saved["step"] == 2
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("method", ABLATIONS)
def test_ablation_gin_file_builds_and_initializes(method, tmp_path):
  bindings, _ = method_bindings(method, tmp_path)
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(),
                              ["models/tiny_bytes.gin", methods.gin_path(method)], bindings)
    model = model_lib.EncoderDecoderModel()
  finally:
    gin.clear_config()
  assert model.deltas, method
  assert tuple(model.deltas) == methods.deltas(method, bindings, model="tiny_bytes")
  variables = model.init(jax.random.PRNGKey(0), network.dummy_batch())
  trainable, _ = model_lib.split_trainable(variables, model.trains_backbone)
  assert model_lib.count_params(trainable) > 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  """A diverging run stops with a message; the latest checkpoint is the last finite step's."""
  bindings = [
      f"MODEL_DIR = '{tmp_path / 'run'}'", "MIXTURE_OR_TASK_NAME = 'synthetic_max'", "TRAIN_STEPS = 20",
      "BATCH_SIZE = 4", "RANDOM_INIT_BACKBONE = True", "CHECKPOINT_PERIOD = 1",
      "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", "train.log_period = 1",
      "OPTIMIZER = 'sgd'", "LEARNING_RATE = 1e30",  # The first update sends the weights to infinity.
  ]
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(),
                              ["models/tiny_bytes.gin", "methods/full_finetune.gin", "runs/finetune.gin"],
                              bindings)
    with pytest.raises(trainer.NonFiniteLossError, match="last good checkpoint") as info:
      trainer.train()
  finally:
    gin.clear_config()
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved, "the finite first step was not saved"
  assert f"(step {saved[-1]})" in str(info.value)  # The message names the checkpoint that stays latest.
