"""Training writes TensorBoard scalars a person reads in TensorBoard: loss, learning rate (per parameter
group), steps/s, the evaluation metrics and ATTEMPT's attention per task and candidate, at the steps they
belong to."""

import gin
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import prompt_mix_tasks  # pylint: disable=unused-import  # Registers the synthetic tasks.
from prompt_mix import gin_utils
from prompt_mix.training import optimizers
from prompt_mix.training import trainer


def _scalars(model_dir) -> dict:
  """{tag: {step: value}} from the event files in `model_dir` (TF2 summaries are stored as tensors)."""
  events = event_accumulator.EventAccumulator(str(model_dir), size_guidance={"tensors": 0, "scalars": 0})
  events.Reload()
  out = {}
  for tag in events.Tags()["tensors"]:
    out[tag] = {e.step: float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)))
                for e in events.Tensors(tag)}
  for tag in events.Tags()["scalars"]:
    out[tag] = {e.step: e.value for e in events.Scalars(tag)}
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("tb") / "run"
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        gin_utils.default_gin_search_paths(),
        ["models/tiny_bytes.gin", "methods/prompt_tuning.gin", "runs/finetune.gin"],
        [f"MODEL_DIR = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'synthetic_max'", "TRAIN_STEPS = 4",
         "BATCH_SIZE = 4", "RANDOM_INIT_BACKBONE = True", "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}",
         "PromptTuning.length = 4", "LEARNING_RATE = 0.2", "WARMUP_STEPS = 2", "EVAL_PERIOD = 2",
         "make_optimizer.group_learning_rates = {'prompt': 0.02}", "train.log_period = 1"])
    metrics = trainer.train()
  finally:
    gin.clear_config()
  return model_dir, metrics


def test_loss_learning_rate_and_speed_are_written_each_logged_step(run):
  model_dir, metrics = run
  scalars = _scalars(model_dir)
  for tag in ("loss", "steps_per_sec", "grad_norm", "learning_rate", "learning_rate/prompt"):
    assert sorted(scalars[tag]) == [1, 2, 3, 4], (tag, scalars.get(tag))
  assert np.isfinite(list(scalars["loss"].values())).all()
  assert scalars["loss"][4] == pytest.approx(metrics["loss"], rel=1e-6)
  assert all(v > 0 for v in scalars["steps_per_sec"].values())
  # Linear warmup over 2 steps, then constant: the rate each step's update used (optax counts from 0).
  schedule = optimizers.make_schedule(0.2, warmup_steps=2)
  expected = {step: float(schedule(step - 1)) for step in (1, 2, 3, 4)}
  assert scalars["learning_rate"] == pytest.approx(expected)
  assert scalars["learning_rate"] == pytest.approx({1: 0.0, 2: 0.1, 3: 0.2, 4: 0.2})
  assert scalars["learning_rate/prompt"] == pytest.approx({k: v / 10 for k, v in expected.items()})


def test_eval_metrics_are_written_at_the_eval_steps(run):
  model_dir, metrics = run
  scalars = _scalars(model_dir)
  assert sorted(scalars["synthetic_max/accuracy"]) == [2, 4]
  assert scalars["synthetic_max/accuracy"][4] == pytest.approx(metrics["synthetic_max/accuracy"])


def test_an_optax_optimizer_of_ones_own_trains_without_a_learning_rate_scalar():
  assert trainer._learning_rate_scalars(optimizers.optax.sgd(0.1), 3) == {}  # pylint: disable=protected-access
  tx = optimizers.make_optimizer(learning_rate=0.5, decay="linear", total_steps=10)
  assert trainer._learning_rate_scalars(tx, 6) == pytest.approx({"learning_rate": 0.25})  # pylint: disable=protected-access


def test_attempt_attention_per_task_and_candidate_is_written_at_the_eval_steps(tmp_path):
  """ATTEMPT-m on two tasks: each task's mean attention over each candidate (the sources, then 'target')
  is a scalar `attention/<task>/<candidate>` at the eval steps, equal to the eval's attention table."""
  from prompt_mix import methods  # pylint: disable=g-import-not-at-top
  from prompt_mix.attempt import interpret  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "run"
  bindings = ["NUM_TASKS = 2"]
  bindings += methods.library_bindings("attempt_m", bindings, d_model=8, directory=tmp_path / "library")
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        gin_utils.default_gin_search_paths(),
        ["models/tiny_bytes.gin", methods.gin_path("attempt_m"), "runs/finetune.gin"],
        bindings + [f"MODEL_DIR = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'synthetic_targets'",
                    "TRAIN_STEPS = 2", "BATCH_SIZE = 4", "RANDOM_INIT_BACKBONE = True", "EVAL_PERIOD = 2",
                    "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", "train.log_period = 1"])
    trainer.train()
  finally:
    gin.clear_config()
  table = interpret.load_attention_table(str(model_dir / "eval" / "attention_2.json"))
  assert len(table.task_names) == 2 and table.candidate_names[-1] == "target"
  scalars = _scalars(model_dir)
  for i, task in enumerate(table.task_names):
    for j, candidate in enumerate(table.candidate_names):
      tag = f"attention/{task}/{candidate}"
      assert sorted(scalars[tag]) == [2], tag
      assert scalars[tag][2] == pytest.approx(float(table.mean_attention[i, j]), rel=1e-5), tag
    assert sum(scalars[f"attention/{task}/{c}"][2] for c in table.candidate_names) == pytest.approx(1.0)
