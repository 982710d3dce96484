"""The ATTEMPT workflow end to end on a fresh machine, on synthetic data: `python -m prompt_mix.demo`.

Every step runs the binaries and gin files a user runs (`python -m prompt_mix.train|eval|export`,
`prompt_mix/configs/demo/*.gin`, found in the installed package), on CPU, with no download, from any
directory:

  1. pre-train a toy T5 (full fine-tuning from random weights) on synthetic tasks that name their function
     (`"max: cabd"` -> `d`), then export it as a T5X checkpoint: the frozen backbone of every later step;
  2. train four source prompts (a bank of independent prompts, one per source task) on bare strings
     (`"cabd"`), where only the prompt can say which function to apply; put them in a prompt library;
  3. train plain prompt tuning on a target task that applies a source's function to other strings, keeping
     its early checkpoint as SPoT's task embedding of the target, and rank the library's sources by SPoT's
     similarities to it (`python -m prompt_mix.attempt.library rank`) before any ATTEMPT run;
  4. train ATTEMPT (mixing the library's prompts) on the target;
  5. evaluate both, draw the attention heatmap (target x sources), export the trained prompts, and set
     SPoT's ranking beside ATTEMPT's learned attention.

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
# "spot": the prompt-tuning step whose prompt is SPoT's task embedding of the target (a third of the run).
STEPS = {"backbone": 1500, "sources": 600, "target": 300, "spot": 100}
QUICK_STEPS = {"backbone": 20, "sources": 10, "target": 10, "spot": 5}


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

  # 3. Prompt tuning on the target; its step-`spot` checkpoint is SPoT's task embedding of the target.
  runs = {name: work / name for name in ("attempt", "prompt_tuning")}
  methods = {
      name: [f"--gin_file=demo/{name}.gin", LENGTHS,
             *_gin(f'MODEL_DIR="{model_dir}"', f"TRAIN_STEPS={steps['target']}", *frozen,
                   f'PROMPT_LIBRARY="{library_dir}"' if name == "attempt" else "BATCH_SIZE=32")]
      for name, model_dir in runs.items()}
  step(f"train prompt_tuning on {TARGET}",
       ["prompt_mix.train", *methods["prompt_tuning"], *_gin(f"CHECKPOINT_PERIOD={steps['spot']}")],
       str(runs["prompt_tuning"]))
  spot_export = runs["prompt_tuning"] / "spot_export"
  step(f"export its step-{steps['spot']} prompt (SPoT's embedding)",
       ["prompt_mix.export", *methods["prompt_tuning"], "--gin_file=runs/export.gin",
        *_gin(f'EXPORT_DIR="{spot_export}"', "EXPORT_FORMATS=['npy']", f"CHECKPOINT_STEP={steps['spot']}")],
       str(spot_export))
  spot_file = work / "spot_ranking.json"
  step("rank the library's sources by SPoT similarity",
       ["prompt_mix.attempt.library", "rank", f"--library={library_dir}",
        f"--target_prompt={spot_export / 'npy' / 'encoder' / 'prompt_tuning' / 'prompt.npy'}",
        f"--output_json={spot_file}"], str(spot_file))
  print((logs / f"{len(rows):02d}_library.log").read_text().rstrip(), flush=True)

  # 4. ATTEMPT on the target, then 5. evaluation (SeqIO metrics; ATTEMPT's mean attention per task).
  step(f"train attempt on {TARGET}", ["prompt_mix.train", *methods["attempt"]], str(runs["attempt"]))
  for name, model_dir in runs.items():
    step(f"evaluate {name}",
         ["prompt_mix.eval", *methods[name], "--gin_file=runs/eval.gin",
          *_gin(f'EVAL_MIXTURE_OR_TASK_NAME="{TARGET}"')], str(model_dir / "eval"))

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
  summary["spot"] = json.loads(spot_file.read_text())
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
  if summary.get("spot") and weights.size:
    lines += ["", *format_source_choice(summary["spot"], names, weights[0])]
  return "\n".join(lines)


def format_source_choice(spot: dict, candidates, attention) -> list[str]:
  """SPoT's ranking (before ATTEMPT, from the target's short prompt-tuning run) beside ATTEMPT's attention.

  Rows are the sources in SPoT's order; the ranks say where each source stands by each measure.
  """
  attention = {n: float(w) for n, w in zip(candidates, attention) if n != "target"}
  order = sorted(attention, key=lambda n: -attention[n])
  lines = [f"Choosing sources for {TARGET}: SPoT (prompt similarity, before training) vs ATTEMPT (attention):",
           f"  {'source':<16} {'per_token_cos':>13} {'avg_cos':>8} {'SPoT rank':>9} {'attention':>9} "
           f"{'ATTEMPT rank':>12}"]
  for s in spot["sources"]:
    name = s["name"]
    rank = s["per_token_cos_rank"] if spot["sorted_by"] == "per_token_cos" else s["avg_cos_rank"]
    seen = name in attention
    lines.append(f"  {name:<16} {s['per_token_cos']:>13.3f} {s['avg_cos']:>8.3f} {rank:>9} "
                 f"{attention[name] if seen else float('nan'):>9.3f} "
                 f"{order.index(name) + 1 if seen else '-':>12}")
  lines.append("  (synthetic data: an illustration of the tools, not evidence about transfer)")
  return lines


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
