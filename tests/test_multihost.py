"""Multi-host training on localhost: 2 processes joined by `jax.distributed` (one simulated CPU device each).

The train binary runs as processes 0 and 1 of one job (`--coordinator_address=localhost:PORT
--num_processes=2 --process_id=i`), each reading its shard of the data. Both processes report the same
global loss at every step; when process 1 is killed mid-run the survivor aborts on its own (the
heartbeat timeout) instead of hanging; both restarted resume from the latest complete checkpoint and end
exactly where an uninterrupted 2-process run ends.
"""

import os
import pathlib
import re
import signal
import socket
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
STEPS = 12
HEARTBEAT_S = 10
_STEP_RE = re.compile(r"\] step (\d+)/\d+ loss ([-0-9.naninf]+)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(model_dir, port: int, process_id: int) -> list[str]:
  return [sys.executable, "-m", "prompt_mix.train", "--gin_file=models/tiny_bytes.gin",
          "--gin_file=methods/prompt_tuning.gin", "--gin_file=runs/finetune.gin",
          f'--gin.MODEL_DIR="{model_dir}"', '--gin.MIXTURE_OR_TASK_NAME="synthetic_max"',
          f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8", "--gin.RANDOM_INIT_BACKBONE=True",
          "--gin.PromptTuning.length=4", "--gin.DROPOUT_RATE=0.0", "--gin.LEARNING_RATE=0.1",
          "--gin.CHECKPOINT_PERIOD=2", "--gin.train.log_period=1",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}",
          f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={process_id}",
          f"--heartbeat_timeout_seconds={HEARTBEAT_S}"]


def _launch(model_dir, logs, tag: str) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  env = subprocess_env(PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3",
                       XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  port = _free_port()
  started = []
  for i in range(2):
    log = logs / f"{tag}_{i}.log"
    with open(log, "w") as f:
      started.append((subprocess.Popen(_command(model_dir, port, i), cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=f), log))
  return started


def _wait(started, timeout=420) -> None:
  deadline = time.time() + timeout
  for proc, log in started:
    try:
      proc.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for p, _ in started:
        p.kill()
      raise AssertionError(f"{log.name} did not finish:\n{log.read_text()[-3000:]}") from None
    assert proc.returncode == 0, f"{log.name} failed ({proc.returncode}):\n{log.read_text()[-3000:]}"


def _losses(log: pathlib.Path) -> dict[int, str]:
  return {int(m.group(1)): m.group(2) for m in _STEP_RE.finditer(log.read_text())}


def _final_peft(model_dir):
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        (prompt_tuning.PromptTuning(length=4),))
  shapes = feature_converter.model_input_shapes({"inputs": 16, "targets": 4}, 8)
  variables, step = setup.restore_trained(model, str(model_dir), None, setup.dummy_batch(shapes),
                                          partitioning.make_mesh(1), random_init_backbone=True)
  return step, np.asarray(variables["peft"]["encoder"]["prompt_tuning"]["prompt"])


def _complete_steps(model_dir) -> list[int]:
  directory = model_dir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and
                (p / "commit_success.txt").exists()) if directory.exists() else []


def test_two_processes_agree_survive_a_killed_peer_and_resume(tmp_path):
  logs = tmp_path / "logs"
  logs.mkdir()
  reference, killed = tmp_path / "reference", tmp_path / "killed"

  started = _launch(reference, logs, "reference")
  _wait(started)
  per_process = [_losses(log) for _, log in started]
  assert sorted(per_process[0]) == list(range(1, STEPS + 1)), per_process[0]
  assert per_process[0] == per_process[1]  # The same global loss, printed the same, at every step.

  started = _launch(killed, logs, "killed")
  deadline = time.time() + 300
  while time.time() < deadline and not _complete_steps(killed):
    if any(p.poll() is not None for p, _ in started):
      break
    time.sleep(0.05)
  (peer, _), (survivor, survivor_log) = started[1], started[0]
  peer.send_signal(signal.SIGKILL)
  peer.wait()
  try:  # The survivor must notice and exit on its own, not hang in a collective.
    survivor.wait(timeout=HEARTBEAT_S * 6 + 60)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail(f"process 0 still runs after its peer was killed:\n{survivor_log.read_text()[-2000:]}")
  assert survivor.returncode != 0
  saved = _complete_steps(killed)
  assert saved and max(saved) < STEPS, f"the run was not interrupted mid-way (complete steps {saved})"

  started = _launch(killed, logs, "restart")
  _wait(started)
  assert f"Resumed from step {max(saved)}" in started[0][1].read_text()
  resumed = [_losses(log) for _, log in started]
  assert resumed[0] == resumed[1] and max(resumed[0]) == STEPS
  assert {s: resumed[0][s] for s in resumed[0]} == {s: per_process[0][s] for s in resumed[0]}

  step_a, a = _final_peft(reference)
  step_b, b = _final_peft(killed)
  assert step_a == step_b == STEPS
  np.testing.assert_array_equal(a, b)
