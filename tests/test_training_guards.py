"""The trainer's guards against silent wrong results, run in-process on the tiny byte-vocabulary backbone.

- The NaN guard checks the state it saves: a step whose update overflows is never written, never called
  good, and the error names the non-finite leaves. Export (and eval) refuse a NaN checkpoint.
- Bad numeric settings are one-line errors naming the setting as the user set it (the gin macro).
- A resume on a different backbone (config or weights) is refused, naming both.
- Evaluations during training land in MODEL_DIR/eval (where the eval binary writes), rotated.
- Each start keeps its own copy of the gin config.
"""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_mix import gin_utils
from prompt_mix.peft import lora
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import checkpoints
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import t5x_checkpoint
from prompt_mix.training import checkpointing
from prompt_mix.training import evaluation
from prompt_mix.training import exporter
from prompt_mix.training import run_record
from prompt_mix.training import trainer

import prompt_mix_tasks  # pylint: disable=unused-import  # Registers synthetic_max.

LENGTHS = {"inputs": 16, "targets": 4}
TINY_BYTES = config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _model(delta=None, config=TINY_BYTES):
  return model_lib.EncoderDecoderModel(config, (delta or prompt_tuning.PromptTuning(length=4),))


def _train(model_dir, model=None, steps=2, **kw):
  args = dict(model_dir=str(model_dir), model=model or _model(), mixture_or_task_name="synthetic_max",
              task_feature_lengths=LENGTHS, train_steps=steps, batch_size=8, random_init_backbone=True,
              optimizer=optax.adam(0.05), checkpoint_period=2, log_period=1, dropout=False)
  args.update(kw)
  if args.get("initial_checkpoint_path"):
    args["random_init_backbone"] = False
  return trainer.train(**args)


def _saved_steps(model_dir):
  directory = os.path.join(model_dir, "checkpoints")
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []


# ------------------------------------------------------------------------------------------- NaN guard


def test_nan_guard_never_saves_the_overflowed_update(tmp_path):
  """LoRA with Adam at lr 1e39: step 1's loss is finite (computed before the update), its update is not."""
  model = _model(lora.LoRA(rank=2))
  with pytest.raises(trainer.NonFiniteLossError) as info:
    _train(tmp_path / "run", model, steps=4, optimizer=optax.adam(1e39), checkpoint_period=1)
  message = str(info.value)
  assert "The state after step 1 holds NaN or infinite values; it is not saved" in message
  assert "No checkpoint was saved yet" in message and "step None" not in message
  assert "trainable/encoder/layers_0/attention/query/lora/" in message
  assert _saved_steps(tmp_path / "run") == []


def test_nan_checkpoint_of_an_older_version_is_refused_by_export(tmp_path):
  model = _model()
  peft = {"encoder": {"prompt_tuning": {"prompt": jnp.full((4, 8), jnp.nan).at[0].set(1.0)}}}
  with checkpointing.TrainingCheckpointManager(tmp_path / "run" / "checkpoints") as manager:
    manager.save(3, {"peft": peft, "opt_state": optax.adam(1.0).init(peft)})
  with pytest.raises(FloatingPointError,
                     match=r"step 3 .* holds NaN.*\n  trainable/encoder/prompt_tuning/prompt: 24 of 32 values"):
    exporter.export(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), formats=["npy"],
                    model=model, task_feature_lengths=LENGTHS)
  assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------------------- settings


def _bind(model_dir, *bindings):
  gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(),
                            ["models/tiny_bytes.gin", "methods/prompt_tuning.gin", "runs/finetune.gin"],
                            [f'MODEL_DIR = "{model_dir}"', 'MIXTURE_OR_TASK_NAME = "synthetic_max"',
                             "RANDOM_INIT_BACKBONE = True", "TRAIN_STEPS = 2", *bindings])


@pytest.mark.parametrize("binding, message", [
    ("TRAIN_STEPS = -5", "TRAIN_STEPS must be an integer >= 1, got -5 (set it with --gin.TRAIN_STEPS=...)"),
    ("TRAIN_STEPS = 'ten'", "TRAIN_STEPS must be an integer >= 1, got 'ten' (a str)"),
    ("TRAIN_STEPS = 4.5", "TRAIN_STEPS must be an integer >= 1, got 4.5 (a float)"),
    ("BATCH_SIZE = 0", "BATCH_SIZE must be an integer >= 1, got 0"),
    ("BATCH_SIZE = -8", "BATCH_SIZE must be an integer >= 1, got -8"),
    ("CHECKPOINT_PERIOD = 0", "CHECKPOINT_PERIOD must be an integer >= 1 or None, got 0"),
    ("EVAL_PERIOD = True", "EVAL_PERIOD must be an integer >= 1 or None, got True (a bool)"),
    ("TASK_FEATURE_LENGTHS = {'inputs': 0, 'targets': 4}", "TASK_FEATURE_LENGTHS['inputs'] must be an integer"),
    ("LEARNING_RATE = 'fast'", "LEARNING_RATE must be a finite number >= 0, got 'fast'"),
])
def test_bad_numeric_settings_name_the_setting(tmp_path, binding, message):
  _bind(tmp_path / "run", binding)
  with pytest.raises(ValueError) as info:
    trainer.train()
  assert message in str(info.value)
  assert not (tmp_path / "run" / "checkpoints").exists()  # Refused before any work.


# ------------------------------------------------------------------------------------------- backbone


def _backbone(directory, seed, config=TINY_BYTES):
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32),
                        checkpoints.expected_param_shapes(config))
  return t5x_checkpoint.write_msgpack_backbone(params, directory, 0)


def test_resume_on_another_backbone_is_refused_naming_both(tmp_path):
  first, other = _backbone(tmp_path / "a", 0), _backbone(tmp_path / "b", 1)
  run = tmp_path / "run"
  _train(run, initial_checkpoint_path=first)
  record = json.loads((run / run_record.RECORD_FILE).read_text())
  assert record["initial_checkpoint_path"] == first and record["config"]["vocab_size"] == 384

  with pytest.raises(run_record.BackboneMismatchError) as info:  # Same config, other weights.
    _train(run, steps=4, initial_checkpoint_path=other)
  message = str(info.value)
  assert first in message and other in message and "weights fingerprint: run sha256:" in message
  assert _saved_steps(run) == [2]

  wider_vocab = _model(config=TINY_BYTES.replace(vocab_size=512))  # models/tiny.gin over tiny_bytes.
  with pytest.raises(run_record.BackboneMismatchError, match=r"vocab_size: run 384, now 512"):
    _train(run, wider_vocab, steps=4)
  assert json.loads((run / run_record.RECORD_FILE).read_text()) == record  # Not overwritten.

  moved = tmp_path / "moved"
  os.rename(tmp_path / "a", moved)  # Same weights elsewhere: accepted.
  _train(run, steps=4, initial_checkpoint_path=os.path.join(moved, "checkpoint_0"))
  assert _saved_steps(run) == [2, 4]


# ------------------------------------------------------------------------------------------- outputs


def test_eval_outputs_go_to_eval_and_are_rotated(tmp_path):
  run = tmp_path / "run"
  _train(run, steps=3, eval_period=1, eval_batch_size=8, keep_eval_outputs=2, checkpoint_period=3)
  assert not list(run.glob("eval_metrics_*.json")) and not (run / "inference_eval").exists()
  assert sorted(p.name for p in (run / "eval").glob("eval_metrics_*.json")) == [
      "eval_metrics_2.json", "eval_metrics_3.json"]
  predictions = sorted(p.name for p in (run / "eval" / "inference_eval").glob("*.jsonl"))
  assert predictions == ["synthetic_max-000002.jsonl", "synthetic_max-000003.jsonl",
                         "synthetic_max-metrics.jsonl"]
  history = (run / "eval" / "inference_eval" / "synthetic_max-metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in history] == [1, 2, 3]  # The metric history is kept whole.

  history_dir = run / gin_utils.CONFIG_HISTORY_DIR
  assert len(list(history_dir.glob("*-step0.gin"))) == 1 and (run / "config.gin").exists()


def test_rotate_outputs_keeps_the_latest_steps_of_every_kind(tmp_path):
  (tmp_path / "inference_eval").mkdir()
  for step in (100, 200, 300):
    (tmp_path / f"eval_metrics_{step}.json").write_text("{}")
    (tmp_path / f"attention_{step}.json").write_text("{}")
    (tmp_path / "inference_eval" / f"glue_rte-{step:06}.jsonl").write_text("")
  (tmp_path / "inference_eval" / "glue_rte-metrics.jsonl").write_text("")
  removed = evaluation.rotate_outputs(str(tmp_path), keep=1)
  assert sorted(os.path.basename(p) for p in removed) == sorted(
      ["eval_metrics_100.json", "attention_100.json", "glue_rte-000100.jsonl",
       "eval_metrics_200.json", "attention_200.json", "glue_rte-000200.jsonl"])
  assert sorted(p.name for p in (tmp_path / "inference_eval").iterdir()) == [
      "glue_rte-000300.jsonl", "glue_rte-metrics.jsonl"]


def test_evaluations_read_each_eval_dataset_once(tmp_path, monkeypatch):
  """Iterating SeqIO's cached evaluation datasets through TF at every evaluation grew RSS by about 50 KB
  per evaluation; their numpy batches are read once and reused, with the same metrics."""
  from prompt_mix import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_mix.data import feature_converter  # pylint: disable=g-import-not-at-top
  from prompt_mix.training import setup  # pylint: disable=g-import-not-at-top
  model = _model()
  batch = setup.dummy_batch(feature_converter.model_input_shapes(LENGTHS, 8))
  run = setup.build_variables(model, setup.load_backbone_params(model, None, True, batch),
                              jax.random.PRNGKey(0), batch, partitioning.make_mesh(1))
  variables = {**run.frozen, "peft": run.trainable}
  reads = []
  original = evaluation.materialize
  monkeypatch.setattr(evaluation, "materialize", lambda ds: reads.append(ds) or original(ds))
  evaluator = evaluation.Evaluator(model, "synthetic_max",
                                   feature_converter.TaskIdEncDecFeatureConverter(task_names=None), LENGTHS,
                                   batch_size=8, log_dir=str(tmp_path / "eval"))
  first = evaluator.evaluate(variables, 1)
  second = evaluator.evaluate(variables, 2)
  assert first == second and "synthetic_max/accuracy" in first
  assert len(reads) == 1
