"""The run configs for choosing sources, through the real binaries on the tiny byte backbone:

1. gate pre-training (runs/attempt_gate_pretrain.gin: ATTEMPT-m on the source mixture) writes an attention
   table; `library prune` keeps its top 2 sources, and an eval of the pruned set restores the same
   checkpoint (the peft tree does not depend on the number of sources);
2. its exported gate starts a target run (runs/attempt_gate_transfer.gin): the trainer's variables at step 0
   (`setup.build_variables` on the run's gin files) hold the pre-trained gate;
3. runs/spot_target.gin is a short prompt-tuning run whose one checkpoint is the task embedding (the demo
   trains, exports and ranks such a prompt end to end).

The paper-scale configs are shrunk on the command line (tiny backbone, 4-row prompts, 16/4 tokens).
"""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix import partitioning
from prompt_mix.attempt import interpret
from prompt_mix.attempt import library as library_lib
from prompt_mix.data import feature_converter
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import setup

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["src_max", "src_min", "src_after_max", "src_before_min"]  # The tasks of 'synthetic_sources'.
M, D = 4, 8
SMALL = ["--gin.preset.name='tiny'", "--gin.preset.vocab_size=384", "--gin.DROPOUT_RATE=0.0",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}", "--gin.BATCH_SIZE=20",
         "--gin.RANDOM_INIT_BACKBONE=True", f"--gin.PROMPT_LENGTH={M}", "--gin.Attempt.bottleneck=4",
         "--gin.WARMUP_STEPS=0"]


def _env() -> dict:
  return dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")


def _run(*args) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"{' '.join(args[:2])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


def _full_set(lib) -> list[str]:
  return [f'--gin.PROMPT_LIBRARY="{lib.path}"', f"--gin.SOURCE_PROMPTS={SOURCES!r}"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A library (4 random sources + 'init'), and a 4-step gate pre-training run evaluated at its end
  (training writes its eval tables to MODEL_DIR, the eval binary to MODEL_DIR/eval or its output_dir)."""
  work = tmp_path_factory.mktemp("sources")
  lib = library_lib.PromptLibrary(work / "library")
  rng = np.random.RandomState(0)
  for name in SOURCES + ["init"]:
    lib.add(name, rng.normal(size=(M, D)).astype(np.float32), task=name)
  model_dir = work / "gate"
  common = ["--gin_file=runs/attempt_gate_pretrain.gin", *SMALL, "--gin.TARGET_INIT='init'", "--gin.MIXTURE_OR_TASK_NAME='synthetic_sources'", "--gin.NUM_TASKS=4",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4"]
  _run("prompt_mix.train", *common, *_full_set(lib), "--gin.EVAL_PERIOD=4")
  return work, lib, model_dir, common


def test_pruned_sources_restore_the_same_checkpoint(pretrained):
  work, lib, model_dir, common = pretrained
  table = interpret.load_attention_table(str(model_dir / "eval" / "attention_4.json"))
  assert table.candidate_names == tuple(SOURCES) + ("target",)
  assert table.task_names == tuple(f"synthetic_{s}" for s in sorted(SOURCES))
  pruned_dir, gin_file = work / "pruned", work / "pruned.gin"
  proc = _run("prompt_mix.attempt.library", "prune", f"--library={lib.path}",
              f"--attention={model_dir / 'eval' / 'attention_4.json'}", "--top_k=2", f"--output={pruned_dir}",
              "--extra=init", f"--gin_output={gin_file}")
  ranked = [line.split()[1] for line in proc.stdout.splitlines()[2:6]]
  means = np.nanmean(table.mean_attention[:, :4], axis=0)
  assert ranked == [SOURCES[i] for i in np.argsort(-means, kind="stable")]
  keep = ranked[:2]
  assert library_lib.PromptLibrary(pruned_dir).names() == keep + ["init"]

  # The pruned set's eval restores the pre-training run's step-4 checkpoint: the same flags, the pruned gin
  # file (SOURCE_PROMPTS, PROMPT_LIBRARY) after the run's.
  out = work / "eval_pruned"
  proc = _run("prompt_mix.eval", *common, "--gin_file=runs/eval.gin",
              f"--gin_file={gin_file}", "--gin.EVAL_MIXTURE_OR_TASK_NAME='synthetic_sources'",
              f"--gin.evaluate.output_dir='{out}'")
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["step"] == 4
  pruned = interpret.load_attention_table(str(out / "attention_4.json"))
  assert pruned.candidate_names == tuple(keep) + ("target",)
  np.testing.assert_allclose(np.nansum(pruned.mean_attention, axis=1), 1.0, rtol=1e-5)


@gin.configurable
def _train_settings(train_steps=gin.REQUIRED, checkpoint_period=gin.REQUIRED) -> dict:
  return {"train_steps": train_steps, "checkpoint_period": checkpoint_period}


def _build(files, bindings) -> tuple[model_lib.EncoderDecoderModel, dict]:
  """A run's model and its variables at step 0, built from its gin files as `train` builds them."""
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(gin_utils.CONFIG_DIR))
    gin.parse_config_files_and_bindings([str(gin_utils.CONFIG_DIR / f) for f in files],
                                        [b[len("--gin."):] for b in bindings] +
                                        ["_train_settings.train_steps = %TRAIN_STEPS",
                                         "_train_settings.checkpoint_period = %CHECKPOINT_PERIOD"])
    model = model_lib.EncoderDecoderModel()
    batch = setup.dummy_batch(feature_converter.model_input_shapes({"inputs": 16, "targets": 4}, 20))
    params = setup.load_backbone_params(model, None, True, batch)
    run = setup.build_variables(model, params, jax.random.PRNGKey(0), batch, partitioning.make_mesh(1))
    config = _train_settings()
  finally:
    gin.clear_config()
  return model, {"peft": {k: np.asarray(v) for k, v in model_lib.flatten(nn.unbox(run.trainable)).items()},
                 **config}


def test_target_run_starts_from_the_pretrained_gate(pretrained):
  work, lib, _, common = pretrained
  export = work / "gate_export"
  _run("prompt_mix.export", *common, "--gin_file=runs/export.gin", f"--gin.EXPORT_DIR='{export}'",
       "--gin.EXPORT_FORMATS=['npy']", *_full_set(lib))
  gate_dir = export / "npy" / "encoder" / "attempt" / "attention_gate"
  gate = {leaf: np.load(gate_dir / f"{leaf}.npy")
          for leaf in ("w_down", "w_up", "layer_norm_scale", "layer_norm_bias")}
  assert not np.allclose(gate["w_down"], 0)

  bindings = [*SMALL, *_full_set(lib), "--gin.TARGET_INIT='init'", f"--gin.PRETRAINED_GATE='{export / 'npy'}'",
              "--gin.MIXTURE_OR_TASK_NAME='synthetic_tgt_max'", "--gin.MODEL_DIR='/unused'",
              "--gin.TRAIN_STEPS=10"]
  model, step0 = _build(["runs/attempt_gate_transfer.gin"], bindings)
  assert model.deltas[0].gate_init == str(export / "npy")
  for leaf, value in gate.items():
    np.testing.assert_array_equal(step0["peft"][f"encoder/attempt/attention_gate/{leaf}"], value)
  np.testing.assert_array_equal(step0["peft"]["encoder/attempt/target_prompt"], lib.load("init"))


def test_spot_target_config_is_a_short_prompt_tuning_run(pretrained):
  _, lib, _, _ = pretrained
  small = [a for a in SMALL if "Attempt." not in a]
  model, step0 = _build(["runs/spot_target.gin"], [*small, "--gin.MIXTURE_OR_TASK_NAME='synthetic_tgt_max'",
                                                   "--gin.MODEL_DIR='/unused'", "--gin.SPOT_STEPS=300"])
  assert (step0["train_steps"], step0["checkpoint_period"]) == (300, 300)  # One save: the embedding.
  assert list(step0["peft"]) == ["encoder/prompt_tuning/prompt"]
  assert step0["peft"]["encoder/prompt_tuning/prompt"].shape == lib.prompt_shape  # Comparable with the sources.
