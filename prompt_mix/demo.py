"""The ATTEMPT workflow end to end on a fresh machine, on synthetic data: `python -m prompt_mix.demo`.

Every step runs the binaries and gin files a user runs (`python -m prompt_mix.train|eval|export`,
`prompt_mix/configs/demo/*.gin`, found in the installed package), on CPU, with no download, from any
directory:

  1. pre-train a toy T5 (full fine-tuning from random weights) on synthetic tasks that name their function
     (`"max: cabd"` -> `d`), then export it as a T5X checkpoint: the frozen backbone of every later step;
  2. train four source prompts (a bank of independent prompts, one per source task) on bare strings
     (`"cabd"`), where only the prompt can say which function to apply; put them in a prompt library;
  3. train ATTEMPT (mixing the library's prompts) and plain prompt tuning on a target task that applies a
     source's function to longer strings;
  4. evaluate both, draw the attention heatmap (target x sources), export the trained prompts.

The data are synthetic (prompt_mix/data/synthetic.py): the demo shows the machinery working together and
what ATTEMPT's attention picks, not the papers' numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/prompt_mix_demo", "Where every run and output goes.")
_QUICK = flags.DEFINE_bool("quick", False, "Few steps per run: checks the pipeline, learns little.")

SOURCES = ("src_max", "src_min", "src_after_max", "src_before_min")
TARGET = "synthetic_tgt_max"
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"
STEPS = {"backbone": 1500, "sources": 600, "target": 300}
QUICK_STEPS = {"backbone": 20, "sources": 10, "target": 10}


def _run(args: list[str], log: pathlib.Path) -> float:
  """Runs one binary (its output goes to `log`); returns its wall time. Fails loudly with the log's tail."""
  env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
  start = time.time()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
  if proc.returncode != 0:
    tail = "".join(open(log).readlines()[-15:])
    raise RuntimeError(f"`python -m {' '.join(args[:2])} ...` failed (log: {log}):\n{tail}")
  return time.time() - start


def _gin(*pairs: str) -> list[str]:
  return [f"--gin.{p}" for p in pairs]


def run_demo(workdir: str, steps: dict) -> dict:
  """Runs the pipeline under `workdir`; returns the summary (also written to `summary.json`)."""
  from prompt_mix import export_formats  # pylint: disable=g-import-not-at-top
  from prompt_mix.attempt import interpret  # pylint: disable=g-import-not-at-top
  from prompt_mix.attempt import library as library_lib  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  logs = work / "logs"
  logs.mkdir(exist_ok=True)
  rows = []

  def step(what: str, args: list[str], output: str) -> None:
    seconds = _run(args, logs / f"{len(rows) + 1:02d}_{args[0].split('.')[-1]}.log")
    rows.append((what, output, seconds))
    print(f"[{len(rows)}] {what}: {seconds:.0f}s -> {output}", flush=True)

  # 1. The backbone.
  backbone = work / "backbone"
  step("pre-train the toy backbone (full fine-tuning)",
       ["prompt_mix.train", "--gin_file=demo/backbone.gin", LENGTHS,
        *_gin(f'MODEL_DIR="{backbone}"', f"TRAIN_STEPS={steps['backbone']}")], str(backbone))
  step("export it as a T5X checkpoint",
       ["prompt_mix.export", "--gin_file=demo/backbone.gin", "--gin_file=runs/export.gin", LENGTHS,
        *_gin(f'MODEL_DIR="{backbone}"', f'EXPORT_DIR="{backbone / "export"}"',
              "EXPORT_FORMATS=['t5x']", f"TRAIN_STEPS={steps['backbone']}")],
       str(backbone / "export" / "t5x"))
  checkpoint = next((backbone / "export" / "t5x").glob("checkpoint_*"))
  frozen = [f'INITIAL_CHECKPOINT_PATH="{checkpoint}"']

  # 2. Source prompts -> library.
  sources = work / "source_prompts"
  step("train 4 source prompts (a bank, one per source task)",
       ["prompt_mix.train", "--gin_file=demo/source_prompts.gin", LENGTHS,
        *_gin(f'MODEL_DIR="{sources}"', f"TRAIN_STEPS={steps['sources']}", *frozen)], str(sources))
  step("export the source prompts",
       ["prompt_mix.export", "--gin_file=demo/source_prompts.gin", "--gin_file=runs/export.gin", LENGTHS,
        *_gin(f'MODEL_DIR="{sources}"', f'EXPORT_DIR="{sources / "export"}"', "EXPORT_FORMATS=['npy']",
              f"TRAIN_STEPS={steps['sources']}", *frozen)], str(sources / "export"))
  bank = export_formats.load_npy(sources / "export" / "npy")["encoder"]["prompt_tuning"]["prompt"]
  library_dir = work / "prompt_library"
  library = library_lib.PromptLibrary(library_dir)
  for name, prompt in zip(SOURCES, np.asarray(bank)):
    library.add(name, prompt, backbone="demo (models/demo.gin)", task=f"synthetic_{name}",
                note="demo source prompt", overwrite=True)
  rows.append(("put them in a prompt library", str(library_dir), 0.0))
  print(f"[{len(rows)}] prompt library: {library.names()}", flush=True)

  # 3. ATTEMPT and prompt tuning on the target.
  runs = {}
  for name, gin_file in (("attempt", "demo/attempt.gin"), ("prompt_tuning", "demo/prompt_tuning.gin")):
    model_dir = work / name
    method = [f"--gin_file={gin_file}", LENGTHS,
              *_gin(f'MODEL_DIR="{model_dir}"', f"TRAIN_STEPS={steps['target']}", *frozen,
                    f'PROMPT_LIBRARY="{library_dir}"' if name == "attempt" else "BATCH_SIZE=32")]
    step(f"train {name} on {TARGET}", ["prompt_mix.train", *method], str(model_dir))
    # 4. Evaluation (SeqIO metrics; ATTEMPT's mean attention per task).
    step(f"evaluate {name}",
         ["prompt_mix.eval", *method, "--gin_file=runs/eval.gin", *_gin(f'EVAL_MIXTURE_OR_TASK_NAME="{TARGET}"')],
         str(model_dir / "eval"))
    runs[name] = model_dir

  attention = runs["attempt"] / "eval" / f"attention_{steps['target']}.json"
  heatmap = work / "attention_heatmap.png"
  interpret.render_heatmap(interpret.load_attention_table(str(attention)), str(heatmap),
                           title="ATTEMPT attention (demo)")
  rows.append(("draw the attention heatmap", str(heatmap), 0.0))
  step("export ATTEMPT's trained prompt and gate",
       ["prompt_mix.export", "--gin_file=demo/attempt.gin", "--gin_file=runs/export.gin", LENGTHS,
        *_gin(f'MODEL_DIR="{runs["attempt"]}"', f'EXPORT_DIR="{runs["attempt"] / "export"}"',
              "EXPORT_FORMATS=['npy', 'safetensors']", f"TRAIN_STEPS={steps['target']}", *frozen,
              f'PROMPT_LIBRARY="{library_dir}"')], str(runs["attempt"] / "export"))

  summary = {"steps": rows, "runs": {}}
  for name, model_dir in runs.items():
    train_metrics = json.loads((model_dir / "train_metrics.json").read_text())
    eval_metrics = json.loads((model_dir / "eval" / f"eval_metrics_{steps['target']}.json").read_text())
    summary["runs"][name] = {"final_loss": train_metrics.get("loss"), **eval_metrics}
  table = json.loads(attention.read_text())
  summary["attention"] = table
  (work / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def format_summary(summary: dict) -> str:
  lines = ["", "What the demo did:", f"{'step':<52} {'seconds':>7}  output"]
  for what, output, seconds in summary["steps"]:
    lines.append(f"{what:<52} {seconds:>7.0f}  {output}")
  lines += ["", f"On {TARGET} (validation, synthetic):"]
  for name, metrics in summary["runs"].items():
    accuracy = next((v for k, v in metrics.items() if k.endswith("/accuracy")), float("nan"))
    lines.append(f"  {name:<14} accuracy {accuracy:5.1f}%   final training loss {metrics['final_loss']:.3f}")
  table = summary["attention"]
  names = table.get("candidate_names") or table.get("columns") or []
  weights = np.asarray(table.get("mean_attention", [[]]), dtype=float)
  if weights.size:
    lines += ["", "ATTEMPT's mean attention on the target task:"]
    lines += [f"  {n:<16} {w:.3f}" for n, w in zip(names, weights[0])]
  return "\n".join(lines)


def main(argv):
  del argv
  steps = QUICK_STEPS if _QUICK.value else STEPS
  start = time.time()
  summary = run_demo(_WORKDIR.value, steps)
  print(format_summary(summary))
  print(f"\nDone in {time.time() - start:.0f}s. Everything is under {_WORKDIR.value} "
        "(summary.json, attention_heatmap.png, logs/).")


def console_main() -> None:
  """The `prompt-mix-demo` console script; the same as `python -m prompt_mix.demo`."""
  app.run(main)


if __name__ == "__main__":
  console_main()
