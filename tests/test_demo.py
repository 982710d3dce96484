"""The demo's pipeline at a smaller size (`--quick`): every step runs and leaves its outputs, SPoT's ranking
of the sources included."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_demo_runs_the_whole_pipeline(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "prompt_mix.demo", f"--workdir={tmp_path}", "--quick"],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "What the demo did:" in proc.stdout and "ATTEMPT's mean attention" in proc.stdout
  assert "SPoT (prompt similarity, before training) vs ATTEMPT (attention)" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert len(summary["steps"]) == 13
  for _, output, _ in summary["steps"]:
    assert pathlib.Path(output).exists(), output
  assert list((tmp_path / "backbone" / "export" / "t5x").glob("checkpoint_*/checkpoint"))
  assert (tmp_path / "attention_heatmap.png").stat().st_size > 1000
  assert (tmp_path / "attempt" / "export" / "peft.safetensors").exists()
  library = json.loads((tmp_path / "prompt_library" / "manifest.json").read_text())
  assert len(library["prompts"]) == 4
  # SPoT's ranking of the four sources, from the target's prompt at the early checkpoint.
  assert sorted(s["name"] for s in summary["spot"]["sources"]) == sorted(p["name"] for p in library["prompts"])
  assert (tmp_path / "prompt_tuning" / "spot_export" / "npy" / "encoder" / "prompt_tuning" / "prompt.npy").exists()
  # At --quick sizes only the backbone, trained from scratch, learns reliably: 5-10 steps of a PEFT run move
  # one batch's loss by less than the batch-to-batch spread (ATTEMPT's went 1.64 -> 1.75). That each method
  # learns is specified by method_checks.check_loss_goes_down; here every run's loss must stay finite.
  for run in ("backbone", "source_prompts", "attempt", "prompt_tuning"):
    metrics = json.loads((tmp_path / run / "train_metrics.json").read_text())
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["first_loss"]), (run, metrics)
  backbone = json.loads((tmp_path / "backbone" / "train_metrics.json").read_text())
  assert backbone["loss"] < 0.5 * backbone["first_loss"], backbone
