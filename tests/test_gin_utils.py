"""Tests of prompt_mix.gin_utils: --gin. rewriting, search paths and includes, one-line errors."""

import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import gin
import pytest

from prompt_mix import gin_utils

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@gin.configurable
def _toy_train(model_dir=gin.REQUIRED, train_steps=1, feature_lengths=None):
  return model_dir, train_steps, feature_lengths


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))
  return path


def test_rewrite_gin_args_like_t5x():
  args = ["prog", "--gin_file=runs/a.gin", '--gin.MODEL_DIR="/tmp/x"', "--gin.TRAIN_STEPS=10",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 4}", "--gin.train/utils.fn.x=a=b", "pos"]
  assert gin_utils.rewrite_gin_args(args) == [
      "prog", "--gin_file=runs/a.gin", '--gin_bindings=MODEL_DIR = "/tmp/x"', "--gin_bindings=TRAIN_STEPS = 10",
      "--gin_bindings=TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 4}",
      "--gin_bindings=train/utils.fn.x = a=b", "pos"]
  with pytest.raises(gin_utils.GinConfigError, match=r"'--gin.MODEL_DIR' must be of the form --gin.NAME=VALUE"):
    gin_utils.rewrite_gin_args(["--gin.MODEL_DIR"])


def test_include_resolves_through_search_paths(tmp_path):
  base_dir, run_dir = tmp_path / "configs", tmp_path / "experiments"
  _write(base_dir / "models" / "toy_base.gin", """
      MODEL_DIR = %gin.REQUIRED
      TRAIN_STEPS = 100
      _toy_train.model_dir = %MODEL_DIR
      _toy_train.train_steps = %TRAIN_STEPS
      """)
  # A name no other search path has: gin's search paths are process-wide, and the package's
  # configs/ (added by other tests in this process) has a models/base.gin.
  _write(run_dir / "runs" / "short.gin", """
      include 'models/toy_base.gin'
      TRAIN_STEPS = 5
      """)
  gin_utils.parse_gin_flags([str(base_dir), str(run_dir)], ["runs/short.gin"],
                            ['MODEL_DIR = "/tmp/run"', "_toy_train.feature_lengths = {'inputs': 8}"])
  assert _toy_train() == ("/tmp/run", 5, {"inputs": 8})
  assert gin_utils.require_macro("MODEL_DIR") == "/tmp/run"
  assert gin_utils.require_macro("TRAIN_STEPS") == 5


def test_missing_required_macro_is_one_line(tmp_path):
  _write(tmp_path / "base.gin", """
      MODEL_DIR = %gin.REQUIRED
      _toy_train.model_dir = %MODEL_DIR
      """)
  with pytest.raises(gin_utils.MissingMacroError) as info:
    gin_utils.parse_gin_flags([str(tmp_path)], ["base.gin"], [])
  assert str(info.value) == "MODEL_DIR is required: pass --gin.MODEL_DIR=..."


def test_require_macro_unbound_or_required(tmp_path):
  _write(tmp_path / "base.gin", "MODEL_DIR = %gin.REQUIRED\n")
  gin_utils.parse_gin_flags([str(tmp_path)], ["base.gin"], [], finalize_config=False)
  with pytest.raises(gin_utils.MissingMacroError, match=r"^MODEL_DIR is required: pass --gin\.MODEL_DIR=\.\.\.$"):
    gin_utils.require_macro("MODEL_DIR")
  with pytest.raises(gin_utils.MissingMacroError, match=r"^INITIAL_CHECKPOINT_PATH is required"):
    gin_utils.require_macro("INITIAL_CHECKPOINT_PATH")
  with pytest.raises(gin_utils.MissingMacroError, match="model_dir is required"):
    gin_utils.require(_toy_train()[0], "model_dir")  # %gin.REQUIRED passed through an unfinalized config


def test_missing_file_names_it_and_the_search_paths(tmp_path):
  with pytest.raises(gin_utils.GinConfigError) as info:
    gin_utils.parse_gin_flags([str(tmp_path)], ["runs/nope.gin"], [])
  message = str(info.value)
  assert message.startswith("gin file 'runs/nope.gin': Unable to open file: runs/nope.gin")
  assert str(tmp_path) in message and "\n" not in message


def test_bad_file_and_bad_include_name_the_file(tmp_path):
  _write(tmp_path / "broken.gin", "_toy_train.train_steps = (\n")
  with pytest.raises(gin_utils.GinConfigError, match=r"^gin file 'broken.gin'") as info:
    gin_utils.parse_gin_flags([str(tmp_path)], ["broken.gin"], [])
  assert "\n" not in str(info.value)
  _write(tmp_path / "outer.gin", "include 'missing_inner.gin'\n")
  with pytest.raises(gin_utils.GinConfigError, match=r"^gin file 'outer.gin'.*missing_inner.gin"):
    gin_utils.parse_gin_flags([str(tmp_path)], ["outer.gin"], [])
  _write(tmp_path / "typo.gin", "_toy_trian.train_steps = 3\n")
  with pytest.raises(gin_utils.GinConfigError, match=r"^gin file 'typo.gin': ValueError: No configurable "
                                                      r"matching '_toy_trian'"):
    gin_utils.parse_gin_flags([str(tmp_path)], ["typo.gin"], [])


def test_bad_binding_names_it_and_hints_at_quotes():
  with pytest.raises(gin_utils.GinConfigError) as info:
    gin_utils.parse_gin_flags([], [], ["MODEL_DIR = /tmp/x"])
  message = str(info.value)
  assert message.startswith("gin binding 'MODEL_DIR = /tmp/x'") and "\n" not in message
  assert "string values need quotes: --gin.MODEL_DIR='\"/tmp/x\"'" in message


def test_default_search_paths_are_the_cwd_then_the_package_configs():
  assert gin_utils.default_gin_search_paths() == [".", str(gin_utils.CONFIG_DIR)]
  for folder in ("models", "methods", "runs", "demo"):
    assert (gin_utils.CONFIG_DIR / folder).is_dir(), folder


_BINARY = r"""
import gin
from absl import logging
from prompt_mix import gin_utils

@gin.configurable
def train(model_dir=gin.REQUIRED, steps=1):
  print("TRAIN", model_dir, steps)

def main(argv):
  gin_utils.parse_gin_from_flags()
  print("MACRO", gin_utils.require_macro("MODEL_DIR"))
  train()

if __name__ == "__main__":
  gin_utils.run(main)
"""


def test_run_end_to_end(tmp_path):
  binary = _write(tmp_path / "toy_binary.py", _BINARY)
  _write(tmp_path / "conf" / "run.gin", """
      MODEL_DIR = %gin.REQUIRED
      train.model_dir = %MODEL_DIR
      train.steps = 3
      """)
  base = [sys.executable, str(binary), f"--gin_search_paths={tmp_path / 'conf'}", "--gin_file=run.gin"]
  ok = subprocess.run(base + ['--gin.MODEL_DIR="/tmp/m"', "--gin.train.steps=7"], capture_output=True,
                      text=True, timeout=120, check=False)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "MACRO /tmp/m" in ok.stdout and "TRAIN /tmp/m 7" in ok.stdout
  missing = subprocess.run(base, capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == "FATAL: MODEL_DIR is required: pass --gin.MODEL_DIR=..."
  assert "Traceback" not in missing.stderr


def test_a_macro_binding_nothing_uses_names_the_closest_macro(tmp_path):
  _write(tmp_path / "run.gin", """
      MODEL_DIR = %gin.REQUIRED
      CHECKPOINT_PERIOD = 1000
      _toy_train.model_dir = %MODEL_DIR
      _toy_train.train_steps = %CHECKPOINT_PERIOD
      """)
  with pytest.raises(gin_utils.GinConfigError) as info:
    gin_utils.parse_gin_flags([str(tmp_path)], ["run.gin"], ['MODEL_DIR = "/tmp/r"', "CHECKPOINT_PERIDO = 2"])
  message = str(info.value)
  assert message.startswith("gin binding 'CHECKPOINT_PERIDO = 2': no binding uses the macro CHECKPOINT_PERIDO")
  assert "did you mean CHECKPOINT_PERIOD? (--gin.CHECKPOINT_PERIOD=...)" in message and "\n" not in message
  gin.clear_config()
  with pytest.raises(gin_utils.GinConfigError, match=r"macros this configuration reads are CHECKPOINT_PERIOD, "
                                                     r"MODEL_DIR"):
    gin_utils.parse_gin_flags([str(tmp_path)], ["run.gin"], ['MODEL_DIR = "/tmp/r"', "ZZZ = 2"])
  gin.clear_config()
  # Used macros, parameter bindings and macros the binary reads itself (`allowed_macros`) are fine.
  gin_utils.parse_gin_flags([str(tmp_path)], ["run.gin"], ['MODEL_DIR = "/tmp/r"', "CHECKPOINT_PERIOD = 2",
                                                           "_toy_train.feature_lengths = {'inputs': 8}",
                                                           "EXTRA = 1"], allowed_macros=["EXTRA"])
  assert _toy_train() == ("/tmp/r", 2, {"inputs": 8})


def test_search_path_probing_logs_no_errors(tmp_path, caplog):
  """gin's resource reader logged "Path not found" at error level for each search path it probed."""
  _write(tmp_path / "second" / "models" / "probe_only_here.gin", "_toy_train.train_steps = 4\n")
  with caplog.at_level(logging.DEBUG):
    gin_utils.parse_gin_flags([str(tmp_path / "first"), str(tmp_path / "second")],
                              ["models/probe_only_here.gin"], [])
  assert _toy_train(model_dir="x")[1] == 4
  assert not [r for r in caplog.records if "Path not found" in r.getMessage()], caplog.text


def test_gin_config_is_written_atomically_and_kept_per_start(tmp_path, monkeypatch):
  gin.parse_config("_toy_train.train_steps = 7")
  _toy_train(model_dir="m")  # Makes the binding operative.
  run = tmp_path / "run"
  first = gin_utils.write_gin_config(str(run), start_step=0)
  assert first == str(run / "config.gin") and "_toy_train.train_steps = 7" in (run / "config.gin").read_text()
  gin_utils.write_gin_config(str(run), start_step=100)
  history = sorted(p.name for p in (run / gin_utils.CONFIG_HISTORY_DIR).iterdir())
  assert len(history) == 2 and history[0].endswith("-step0.gin") and history[1].endswith("-step100.gin")

  before = (run / "config.gin").read_text()

  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)  # The write of the new config fails half-way.
  with pytest.raises(OSError, match=r"cannot write the gin config to .*run/config_history/.*: No space left"):
    gin_utils.write_gin_config(str(run), start_step=200)
  assert (run / "config.gin").read_text() == before  # The previous config is whole.
  assert sorted(p.name for p in (run / gin_utils.CONFIG_HISTORY_DIR).iterdir()) == history
  assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_fatal_message_keeps_the_whole_message_as_one_block():
  from prompt_mix import launch  # pylint: disable=g-import-not-at-top
  error = ValueError("/ckpt is not the T5 backbone of the config:\n  wrong shape (1):\n"
                     "    encoder/layers_0/mlp/wo/kernel: expected [16, 8], found [16, 9]\n"
                     "  In call to configurable 'train' (<function train at 0x7f00>)")
  lines = launch.fatal_message(error).splitlines()
  assert lines[0] == "FATAL: ValueError: /ckpt is not the T5 backbone of the config:"
  assert lines[1:3] == ["  wrong shape (1):", "    encoder/layers_0/mlp/wo/kernel: expected [16, 8], found [16, 9]"]
  assert all(line.startswith(" ") for line in lines[1:]) and "In call to configurable" not in "\n".join(lines)
  assert launch.fatal_message(KeyError("no prompt named 'x'")).startswith("FATAL: KeyError: no prompt named 'x'")
  assert launch.fatal_message(OSError(28, "No space left on device", "/m/config.gin")).startswith(
      "FATAL: OSError: [Errno 28] No space left on device: '/m/config.gin'")


def test_late_callbacks_into_a_closed_event_loop_are_not_printed():
  """After a corrupt checkpoint's FATAL, TensorStore reads still in flight completed into Orbax's closed
  event loop and each printed "RuntimeError: Event loop is closed" through `sys.unraisablehook`."""
  import types  # pylint: disable=g-import-not-at-top
  from prompt_mix import launch  # pylint: disable=g-import-not-at-top
  seen = []
  hook = launch.quiet_closed_event_loop(seen.append)
  late = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("something else"))
  hook(late)
  hook(other)
  assert seen == [other]
