"""A trained run is self-contained: the method's frozen collections (ATTEMPT's source prompts, read from a
prompt library at the first start) travel with every checkpoint, and eval/infer/export/resume rebuild them
from it. Changing or deleting the library after training changes nothing; checkpoints of older versions
(without them) fall back to the library with a warning.

Trains ATTEMPT in-process on the synthetic byte tasks with the tiny backbone (random, reproducible).
"""

import logging
import shutil

import jax
import numpy as np
import optax
import pytest

from prompt_mix import partitioning
from prompt_mix.attempt import library as library_lib
from prompt_mix.data import feature_converter
from prompt_mix.peft import attempt as attempt_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import checkpointing
from prompt_mix.training import exporter
from prompt_mix.training import setup
from prompt_mix.training import trainer

import prompt_mix_tasks  # pylint: disable=unused-import  # Registers synthetic_max.

M, D = 4, 8  # Prompt length; the tiny backbone's d_model.
LENGTHS = {"inputs": 16, "targets": 4}


def _model(library_path, target_init="init"):
  delta = attempt_lib.Attempt(library_path=str(library_path), source_names=("a", "b"), prompt_length=M,
                              target_init=target_init, bottleneck=4)
  return model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                       (delta,))


def _library(path, seed=0):
  lib = library_lib.PromptLibrary(path)
  rng = np.random.RandomState(seed)
  for name in ("a", "b", "init"):
    lib.add(name, rng.normal(size=(M, D)).astype(np.float32), task=name, overwrite=True)
  return lib


def _train(model_dir, model, steps, stop_after=None):
  return trainer.train(model_dir=str(model_dir), model=model, mixture_or_task_name="synthetic_max",
                       task_feature_lengths=LENGTHS, train_steps=steps, batch_size=8,
                       random_init_backbone=True, optimizer=optax.adam(0.05), checkpoint_period=2,
                       log_period=1, dropout=False, stop_after_steps=stop_after)


def _batch():
  rng = np.random.RandomState(1)
  tokens = lambda n: rng.randint(3, 200, size=(8, n)).astype(np.int32)
  targets = tokens(LENGTHS["targets"])
  return {"encoder_input_tokens": tokens(LENGTHS["inputs"]), "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0)))}


def _restore(model, model_dir):
  shapes = feature_converter.model_input_shapes(LENGTHS, 8)
  return setup.restore_trained(model, str(model_dir), None, setup.dummy_batch(shapes),
                               partitioning.make_mesh(1), random_init_backbone=True)


def _scores(model, model_dir):
  variables, _ = _restore(model, model_dir)
  return np.asarray(model.score_batch(variables, _batch())), variables


def _sources(variables):
  return np.asarray(variables[attempt_lib.SOURCES_COLLECTION]["encoder"][attempt_lib.MODULE_NAME][
      attempt_lib.SOURCES])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An ATTEMPT run of 2 steps, its library, and the scores of a fixed batch right after training."""
  root = tmp_path_factory.mktemp("attempt_run")
  lib = _library(root / "library")
  original = lib.load_stack(["a", "b"])
  model_dir = root / "run"
  _train(model_dir, _model(lib.path), 2)
  scores, variables = _scores(_model(lib.path), model_dir)
  np.testing.assert_array_equal(_sources(variables), original)
  return root, lib, model_dir, scores, original


def test_checkpoint_holds_the_frozen_collections_and_their_specs(trained):
  _, _, model_dir, _, original = trained
  with checkpointing.TrainingCheckpointManager(model_dir / "checkpoints", read_only=True) as manager:
    specs = manager.restore_specs(2)
  leaf = f"encoder/{attempt_lib.MODULE_NAME}/{attempt_lib.SOURCES}"
  assert specs["collections"][attempt_lib.SOURCES_COLLECTION][leaf] == {
      "shape": [2, M, D], "dtype": "float32", "axes": list(attempt_lib.SOURCE_AXES)}
  assert "encoder/attempt/target_prompt" in specs["collections"]["peft"]
  assert (model_dir / "checkpoints" / "2" / checkpointing.FROZEN).is_dir()


def test_library_overwritten_after_training_changes_no_score(trained, tmp_path):
  root, _, model_dir, scores, original = trained
  library = tmp_path / "library"
  shutil.copytree(root / "library", library)
  changed = library_lib.PromptLibrary(library)
  changed.add("a", np.full((M, D), 3.0, np.float32), overwrite=True)  # In place, same shape.
  after, variables = _scores(_model(library), model_dir)
  np.testing.assert_array_equal(after, scores)
  np.testing.assert_array_equal(_sources(variables), original)


def test_eval_and_export_without_the_library(trained, tmp_path):
  _, _, model_dir, scores, _ = trained
  gone = tmp_path / "deleted_library"  # Never created: the run must not need it.
  after, _ = _scores(_model(gone), model_dir)
  np.testing.assert_array_equal(after, scores)
  written = exporter.export(model_dir=str(model_dir), export_dir=str(tmp_path / "export"), formats=["npy"],
                            model=_model(gone), task_feature_lengths=LENGTHS)
  assert (tmp_path / "export" / "npy").is_dir() and written["npy"]


def test_eval_with_another_method_names_the_missing_variables(trained):
  _, lib, model_dir, _, _ = trained
  other = attempt_lib.Attempt(library_path=lib.path, source_names=("a", "b"), prompt_length=M,
                              target_init="init", bottleneck=4, num_tasks=None)
  from prompt_mix.peft import lora  # pylint: disable=g-import-not-at-top
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        (other, lora.LoRA(rank=2)))
  with pytest.raises(ValueError, match=r"the model builds variables that checkpoint step 2 .* does not "
                                       r"have: peft/.*lora"):
    _restore(model, model_dir)


def test_resume_keeps_the_sources_it_started_with(trained, tmp_path, caplog):
  root, _, model_dir, _, original = trained
  run, library = tmp_path / "run", tmp_path / "library"
  shutil.copytree(model_dir, run)
  shutil.copytree(root / "library", library)
  library_lib.PromptLibrary(library).add("b", np.zeros((M, D), np.float32), overwrite=True)
  with caplog.at_level(logging.WARNING):
    _train(run, _model(library), 4)
  assert "changed since this run started" in caplog.text
  _, variables = _scores(_model(library), run)
  np.testing.assert_array_equal(_sources(variables), original)


def test_checkpoint_of_an_older_version_falls_back_to_the_library(trained, tmp_path, caplog):
  root, _, model_dir, _, original = trained
  run = tmp_path / "old_run"
  shutil.copytree(model_dir, run)
  for item in (checkpointing.FROZEN, checkpointing.SPECS):
    shutil.rmtree(run / "checkpoints" / "2" / item)
  with caplog.at_level(logging.WARNING):
    _, variables = _scores(_model(root / "library"), run)
  assert "predates saved frozen collections" in caplog.text
  np.testing.assert_array_equal(_sources(variables), original)


def test_rebuild_from_source_takes_a_pruned_set_of_sources_from_the_library(trained, tmp_path):
  """A change made on purpose (attention pruning keeps source 'b' only): the named collection is built from
  the library as configured now; the trainable tree still comes from the checkpoint."""
  root, lib, model_dir, _, original = trained
  restored, _ = _restore(_model(lib.path), model_dir)
  pruned = attempt_lib.Attempt(library_path=lib.path, source_names=("b",), prompt_length=M,
                               target_init="init", bottleneck=4)
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        (pruned,))
  shapes = feature_converter.model_input_shapes(LENGTHS, 8)
  args = (model, str(model_dir), None, setup.dummy_batch(shapes), partitioning.make_mesh(1))
  with pytest.raises(ValueError, match=r"has shape \(2, 4, 8\)"):  # The checkpoint's two sources.
    setup.restore_trained(*args, random_init_backbone=True)
  with pytest.raises(ValueError, match=r"names \['prompt_libary'\], which checkpoint step 2 .* holds "
                                       r"\['prompt_library'\]"):
    setup.restore_trained(*args, random_init_backbone=True, rebuild_from_source=["prompt_libary"])
  variables, step = setup.restore_trained(*args, random_init_backbone=True,
                                          rebuild_from_source=[attempt_lib.SOURCES_COLLECTION])
  assert step == 2
  np.testing.assert_array_equal(_sources(variables), original[1:])
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables["peft"], restored["peft"])
  assert np.isfinite(np.asarray(model.score_batch(variables, _batch()))).all()
