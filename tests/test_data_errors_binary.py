"""A bad local data file stops `python -m prompt_mix.train` with one FATAL line naming the file and line,
before any TensorFlow pipeline runs (no traceback)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bad_data_file_is_one_fatal_line(tmp_path, t5_vocab_path):
  """(The other data-file errors take the same path: tests/test_file_source.py checks their messages.)"""
  content = [{"sentence": "good", "label": 1}, {"sentence": "odd", "label": 1.7}]
  message = ("train.jsonl:2: field 'label': expected an integer class id or one of ['negative', 'positive'], "
             "got 1.7")
  path = tmp_path / "data" / "glue_sst2" / "train.jsonl"
  path.parent.mkdir(parents=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in content))
  env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             PROMPT_MIX_DATA_DIR=str(tmp_path / "data"), PROMPT_MIX_VOCAB_PATH=str(t5_vocab_path))
  args = [sys.executable, "-m", "prompt_mix.train", "--gin_file=models/tiny.gin",
          "--gin_file=methods/prompt_tuning.gin", "--gin_file=runs/finetune.gin",
          f'--gin.MODEL_DIR="{tmp_path / "run"}"', '--gin.MIXTURE_OR_TASK_NAME="glue_sst2"',
          "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2", "--gin.RANDOM_INIT_BACKBONE=True",
          "--gin.PromptTuning.length=2", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"]
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and "DataFileError" in fatal[0] and message in fatal[0], proc.stderr[-3000:]
  assert str(path.parent) in fatal[0]
  assert "Traceback" not in proc.stderr
