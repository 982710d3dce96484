r"""Soak test of the train binary: memory growth (RSS per 1k steps) and disk growth over a long run.

Runs `python -m prompt_mix.train` on the tiny byte-vocabulary backbone for `--steps` steps with
checkpoints every `--checkpoint_period` and evaluations every `--eval_period` steps, samples the
process's resident set size (`/proc/<pid>/status` VmRSS) each time it logs a step, and fits a line to the
samples after `--warmup` steps:

  python tools/soak.py --steps=5000 --checkpoint_period=50 --eval_period=200 --warmup=1000

  RSS growth after warm-up: +0.02 MB per 1k steps (+0.020 KB/step; median window-to-window rise of ...)
  RSS floor slope after warm-up: +0.05 MB per 1k steps (+0.051 KB/step; lowest sample of each 200 steps, ...)
  RSS slope through all samples: -0.30 MB per 1k steps (-0.307 KB/step) over 401 samples, steps 1000..5000
  RSS at step 1000: 1234.5 MB, at the end: 1236.0 MB; residual noise (std) 3.4 MB
  disk: checkpoints 0.1 MB, eval 0.2 MB

The headline is the median rise of the RSS floor (the lowest sample of each window, so transient peaks of
evaluations and saves do not count) from one window to the next: what a long run leaks per step. A
healthy run shows no growth after warm-up beyond the noise. Line fits through the floor and through all
samples are printed too (a single large release of memory by the allocator moves those). RSS is
meaningful on a loaded machine, step timings are not (none are reported). `--method` picks the method gin
file (`--gin.NAME=VALUE` flags after `--` go to the binary), `--json` prints one `RESULT {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP_RE = re.compile(r"\] step (\d+)/(\d+) loss ")
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"


def rss_kb(pid: int) -> Optional[int]:
  """The resident set size of process `pid` in KB (VmRSS), or None once it has exited."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def fit_slope(steps: Sequence[int], rss: Sequence[float], warmup: int, window: int) -> dict:
  """Lines through the (step, RSS KB) samples after `warmup`: slope per 1k steps, and noise.

  Two fits: through every sample, and through the lowest sample of each `window` steps (the floor). The
  allocator's transient peaks (an evaluation's buffers, a checkpoint's) make single samples noisy by many
  MB; a leak raises the floor too, so the floor's slope is the figure to read.
  """
  steps, rss = np.asarray(steps, np.float64), np.asarray(rss, np.float64)
  keep = steps >= warmup
  if keep.sum() < 3:
    raise ValueError(f"only {int(keep.sum())} RSS samples after the warm-up of {warmup} steps: run more "
                     "steps, a shorter --warmup or a smaller --log_period")
  x, y = steps[keep], rss[keep]
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  bins = ((x - x[0]) // window).astype(int)
  floor_x = np.array([x[bins == b][np.argmin(y[bins == b])] for b in np.unique(bins)])
  floor_y = np.array([y[bins == b].min() for b in np.unique(bins)])
  floor_slope = float(np.polyfit(floor_x, floor_y, 1)[0]) if len(floor_x) >= 3 else float("nan")
  # The median of the window-to-window floor steps: one large release of memory (the allocator giving back
  # an arena) moves a line fit a lot and this not at all.
  steps_between = np.diff(floor_x)
  median_growth = (float(np.median(np.diff(floor_y) / np.maximum(steps_between, 1))) if len(floor_x) >= 3
                   else float("nan"))
  return {"slope_kb_per_1k_steps": float(slope * 1000), "slope_kb_per_step": float(slope),
          "floor_slope_kb_per_1k_steps": floor_slope * 1000, "floor_windows": int(len(floor_x)),
          "median_floor_growth_kb_per_1k_steps": median_growth * 1000,
          "window": int(window), "noise_std_kb": float(residual.std()), "samples": int(keep.sum()),
          "first_step": int(x[0]), "last_step": int(x[-1]), "rss_at_warmup_kb": float(y[0]),
          "rss_at_end_kb": float(y[-1])}


def directory_kb(path: str) -> float:
  total = 0
  for base, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(base, name))
      except OSError:
        pass
  return total / 1024


def train_command(model_dir: str, args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
  command = [sys.executable, "-m", "prompt_mix.train", "--gin_file=models/tiny_bytes.gin",
             f"--gin_file={args.method}", "--gin_file=runs/finetune.gin", f'--gin.MODEL_DIR="{model_dir}"',
             '--gin.MIXTURE_OR_TASK_NAME="synthetic_max"', f"--gin.TRAIN_STEPS={args.steps}",
             "--gin.BATCH_SIZE=8", "--gin.RANDOM_INIT_BACKBONE=True", "--gin.DROPOUT_RATE=0.0",
             f"--gin.CHECKPOINT_PERIOD={args.checkpoint_period}", LENGTHS,
             f"--gin.train.log_period={args.log_period}"]
  if args.eval_period:
    command += [f"--gin.EVAL_PERIOD={args.eval_period}", "--gin.train.eval_batch_size=8"]
  if args.method.endswith("prompt_tuning.gin"):
    command.append("--gin.PromptTuning.length=4")
  return command + list(extra)


def soak(args: argparse.Namespace, extra: Sequence[str]) -> dict:
  workdir = args.workdir or tempfile.mkdtemp(prefix="prompt_mix_soak_")
  model_dir = os.path.join(workdir, "run")
  if os.path.exists(model_dir):
    shutil.rmtree(model_dir)
  env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
  command = train_command(model_dir, args, extra)
  steps, samples = [], []
  tail: list[str] = []
  with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True, bufsize=1) as proc:
    for line in proc.stderr:
      tail = (tail + [line])[-30:]
      match = _STEP_RE.search(line)
      if match:
        rss = rss_kb(proc.pid)
        if rss is not None:
          steps.append(int(match.group(1)))
          samples.append(rss)
          if args.verbose:
            print(f"step {steps[-1]}: RSS {rss / 1024:.1f} MB", flush=True)
    proc.wait()
  if proc.returncode != 0:
    raise RuntimeError(f"the train binary failed ({proc.returncode}):\n{''.join(tail)}")
  periods = [p for p in (args.checkpoint_period, args.eval_period) if p and p <= args.steps // 4]
  window = args.window or max(periods + [10 * args.log_period])
  result = fit_slope(steps, samples, args.warmup, window)
  result.update(command=command, steps=args.steps, checkpoint_period=args.checkpoint_period,
                eval_period=args.eval_period, warmup=args.warmup,
                checkpoints_kb=directory_kb(os.path.join(model_dir, "checkpoints")),
                eval_kb=directory_kb(os.path.join(model_dir, "eval")), model_dir=model_dir,
                rss_samples={"steps": steps, "rss_kb": samples})
  if not args.keep and not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return result


def report(r: dict) -> str:
  return "\n".join([
      f"RSS growth after warm-up: {r['median_floor_growth_kb_per_1k_steps'] / 1024:+.2f} MB per 1k steps "
      f"({r['median_floor_growth_kb_per_1k_steps'] / 1000:+.3f} KB/step; median window-to-window rise of "
      f"the lowest sample of each {r['window']} steps)",
      f"RSS floor slope after warm-up: {r['floor_slope_kb_per_1k_steps'] / 1024:+.2f} MB per 1k steps "
      f"({r['floor_slope_kb_per_1k_steps'] / 1000:+.3f} KB/step; lowest sample of each {r['window']} steps, "
      f"{r['floor_windows']} windows)",
      f"RSS slope through all samples: {r['slope_kb_per_1k_steps'] / 1024:+.2f} MB per 1k steps "
      f"({r['slope_kb_per_step']:+.3f} KB/step) over {r['samples']} samples, steps "
      f"{r['first_step']}..{r['last_step']}",
      f"RSS at step {r['first_step']}: {r['rss_at_warmup_kb'] / 1024:.1f} MB, at the end: "
      f"{r['rss_at_end_kb'] / 1024:.1f} MB; residual noise (std) {r['noise_std_kb'] / 1024:.2f} MB",
      f"disk: checkpoints {r['checkpoints_kb'] / 1024:.2f} MB, eval {r['eval_kb'] / 1024:.2f} MB"])


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5000)
  parser.add_argument("--checkpoint_period", type=int, default=50)
  parser.add_argument("--eval_period", type=int, default=200, help="0: no evaluation")
  parser.add_argument("--warmup", type=int, default=1000, help="samples before this step are not fitted")
  parser.add_argument("--log_period", type=int, default=10, help="one RSS sample per logged step")
  parser.add_argument("--window", type=int, default=None,
                      help="steps per floor window (default: the larger period that fits 4 times in the run, or 10 "
                           "log periods)")
  parser.add_argument("--method", default="methods/prompt_tuning.gin")
  parser.add_argument("--workdir", default=None, help="kept; default a temporary directory, removed")
  parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  result = soak(args, extra)
  print(report(result))
  if args.json:
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
