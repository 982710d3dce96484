"""The train / eval / infer binaries: 1 vs 8 devices, kill-and-resume, errors, outputs.

Each case runs real binaries (`python -m prompt_mix.<binary>`) or the gin-configured functions on the
synthetic byte-vocabulary tasks with the tiny backbone, started from a reproducible random backbone.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prompt_mix import partitioning
from prompt_mix.data import feature_converter
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import setup
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"


def _env(devices: int = 1) -> dict:
  return subprocess_env(PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3",
                        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train_args(model_dir, steps, extra=()):
  return [sys.executable, "-m", "prompt_mix.train", "--gin_file=models/tiny_bytes.gin",
          "--gin_file=methods/prompt_tuning.gin", "--gin_file=runs/finetune.gin",
          f'--gin.MODEL_DIR="{model_dir}"', '--gin.MIXTURE_OR_TASK_NAME="synthetic_max"',
          f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.RANDOM_INIT_BACKBONE=True",
          "--gin.PromptTuning.length=4", "--gin.DROPOUT_RATE=0.0", "--gin.LEARNING_RATE=0.1", LENGTHS,
          *extra]


def _run(args, devices=1, check=True, timeout=600):
  proc = subprocess.run(args, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def _final_peft(model_dir) -> tuple[int, dict]:
  """The latest checkpoint's peft, restored by the library on this process's single device.

  The same model as the gin files above build (tiny_bytes + PromptTuning(length=4), no dropout).
  """
  model = model_lib.EncoderDecoderModel(
      config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
      (prompt_tuning.PromptTuning(length=4),))
  shapes = feature_converter.model_input_shapes({"inputs": 16, "targets": 4}, 8)
  variables, step = setup.restore_trained(model, str(model_dir), None, setup.dummy_batch(shapes),
                                          partitioning.make_mesh(1), random_init_backbone=True)
  return step, {k: np.asarray(v) for k, v in model_lib.flatten(variables["peft"]).items()}


def _losses(model_dir) -> dict:
  return json.loads((model_dir / "train_metrics.json").read_text())


def test_one_and_eight_devices_train_alike(tmp_path):
  one, eight = tmp_path / "one", tmp_path / "eight"
  _run(_train_args(one, 4, ["--gin.CHECKPOINT_PERIOD=4"]), devices=1)
  _run(_train_args(eight, 4, ["--gin.CHECKPOINT_PERIOD=4", "--gin.NUM_PARTITIONS=2"]), devices=8)
  assert _losses(one)["loss"] == pytest.approx(_losses(eight)["loss"], rel=1e-4)
  step1, peft1 = _final_peft(one)
  step8, peft8 = _final_peft(eight)
  assert step1 == step8 == 4 and peft1.keys() == peft8.keys()
  for key in peft1:
    np.testing.assert_allclose(peft1[key], peft8[key], rtol=1e-4, atol=1e-5)


def test_killed_run_resumes_to_the_same_result(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  extra = ["--gin.CHECKPOINT_PERIOD=2"]
  _run(_train_args(straight, 8, extra))

  proc = subprocess.Popen(_train_args(killed, 8, extra), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (killed / "checkpoints" / "4" / "commit_success.txt").exists():
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < 8, f"the run was not interrupted mid-way (saved steps {saved})"

  _run(_train_args(killed, 8, extra))  # Resumes from the latest complete checkpoint.
  step_a, a = _final_peft(straight)
  step_b, b = _final_peft(killed)
  assert step_a == step_b == 8
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_eval_and_infer_after_training(tmp_path):
  model_dir = tmp_path / "run"
  _run(_train_args(model_dir, 2, ["--gin.CHECKPOINT_PERIOD=2"]))
  common = ["--gin_file=models/tiny_bytes.gin", "--gin_file=methods/prompt_tuning.gin",
            f'--gin.MODEL_DIR="{model_dir}"', "--gin.RANDOM_INIT_BACKBONE=True", "--gin.BATCH_SIZE=4",
            "--gin.PromptTuning.length=4", LENGTHS]
  _run([sys.executable, "-m", "prompt_mix.eval", "--gin_file=runs/eval.gin", *common,
        '--gin.EVAL_MIXTURE_OR_TASK_NAME="synthetic_max"'])
  metrics = json.loads((model_dir / "eval" / "eval_metrics_2.json").read_text())
  assert "synthetic_max/accuracy" in metrics

  _run([sys.executable, "-m", "prompt_mix.infer", "--gin_file=runs/infer.gin", *common,
        '--gin.MIXTURE_OR_TASK_NAME="synthetic_sources"', "--gin.MAX_EXAMPLES_PER_TASK=3"])
  rows = [json.loads(line) for line in
          (model_dir / "infer" / "synthetic_sources-validation-2.jsonl").read_text().splitlines()]
  assert len(rows) == 12
  assert {r["task"] for r in rows[:4]} == {  # Tasks interleave within a batch.
      "synthetic_src_max", "synthetic_src_min", "synthetic_src_after_max", "synthetic_src_before_min"}
  for row in rows:
    assert set(row) >= {"task", "inputs", "targets", "prediction", "score"}
    assert np.isfinite(row["score"])


@pytest.mark.parametrize("change, message", [
    (None, "MODEL_DIR is required"),
    (['--gin.MIXTURE_OR_TASK_NAME="no_such_task"'], "no_such_task"),
    (["--gin.RANDOM_INIT_BACKBONE=False", '--gin.INITIAL_CHECKPOINT_PATH="/nonexistent/checkpoint_5"'],
     "/nonexistent/checkpoint_5"),
    (["--gin.CHECKPOINT_PERIDO=2"], "did you mean CHECKPOINT_PERIOD?"),  # A typo changed nothing, exit 0.
    (["--gin.TRAIN_STEPS=-5"], "TRAIN_STEPS must be an integer >= 1, got -5"),  # Did nothing, exit 0.
    (['--gin.MODEL_DIR="/dev/null/run"'], "Not a directory: '/dev/null/run'"),  # An OSError naming the path.
])
def test_user_errors_are_one_line(tmp_path, change, message):
  args = _train_args(tmp_path / "run", 2, change or [])
  if change is None:  # No MODEL_DIR at all.
    args = [a for a in args if not a.startswith("--gin.MODEL_DIR")]
  proc = _run(args, check=False)
  assert proc.returncode != 0
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and message in fatal[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
