"""For every method's gin file, a checkpoint with its variable specs restores (eval/infer/export) to exactly
the variables the run had, without the model initializing any method collection again.

Each case builds a run's variables as the trainer does, saves them as the trainer saves a step (trainable
tree, frozen method collections, variable specs), then restores them with `setup.restore_trained` and
`setup.trainable_target` (what export uses), and compares every leaf, shape and sharding.
"""

import importlib

import gin
import jax
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix import launch
from prompt_mix import partitioning
from prompt_mix.attempt import library as library_lib
from prompt_mix.data import feature_converter
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import checkpointing
from prompt_mix.training import setup
from prompt_mix.training import trainer

for _name in launch.REGISTERED_MODULES:
  importlib.import_module(_name)

METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning_v2", "aprompt", "houlsby_adapter", "lora", "bitfit",
           "mam", "full_finetune", "attempt", "attempt_m"]
ATTEMPT_SOURCES = ["mnli", "sst2", "qnli", "qqp", "squad", "record"]
LENGTHS = {"inputs": 16, "targets": 4}


@pytest.fixture
def prompt_library(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path / "library")
  rng = np.random.RandomState(0)
  for name in ATTEMPT_SOURCES:
    lib.add(name, rng.uniform(-0.5, 0.5, (100, 8)).astype(np.float32), task=name)
  return lib.path


def _model(method, library):
  bindings = ["DROPOUT_RATE = 0.0"]
  if method.startswith("attempt"):
    bindings.append(f"PROMPT_LIBRARY = '{library}'")
  if method == "attempt_m":
    bindings.append("NUM_TASKS = 2")
  gin.clear_config()
  gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(),
                            ["models/tiny_bytes.gin", f"methods/{method}.gin"], bindings, finalize_config=False)
  try:
    return model_lib.EncoderDecoderModel()
  finally:
    gin.clear_config()


def _flat(tree):
  return {k: v for k, v in model_lib.flatten(tree).items()}


@pytest.mark.parametrize("method", METHODS)
def test_restore_from_specs_gives_the_run_variables(method, tmp_path, prompt_library):
  model = _model(method, prompt_library)
  mesh = partitioning.make_mesh(1)
  batch = setup.dummy_batch(feature_converter.model_input_shapes(LENGTHS, 8))
  params = setup.load_backbone_params(model, None, True, batch)
  run = setup.build_variables(model, params, jax.random.PRNGKey(3), batch, mesh)
  extras = trainer._saved_extras(model, run)  # pylint: disable=protected-access
  with checkpointing.TrainingCheckpointManager(tmp_path / "run" / "checkpoints") as manager:
    manager.save(5, {"peft": run.trainable, "opt_state": {}, **extras})

  variables, step = setup.restore_trained(model, str(tmp_path / "run"), None, batch, mesh,
                                          random_init_backbone=True)
  expected = _flat(model_lib.merge_trainable(run.trainable, run.frozen, model.trains_backbone))
  got = _flat(variables)
  assert step == 5 and sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
    assert got[key].sharding.is_equivalent_to(value.sharding, value.ndim), key

  target = setup.trainable_target(model, str(tmp_path / "run"), 5, batch, mesh)
  want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), run.trainable)
  assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), target) == want
