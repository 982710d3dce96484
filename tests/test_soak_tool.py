"""tools/soak.py: the RSS slope fit, and one short run of the train binary end to end (the figure itself
is not asserted: a leak needs thousands of steps to show; docs/reliability.md has the measured ones)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import soak  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_fit_slope_reads_the_floor_through_transient_peaks():
  steps = np.arange(0, 5000, 10)
  leak = 2.0 * steps  # 2 KB per step.
  peaks = np.where(steps % 200 < 30, 50_000.0, 0.0)  # An evaluation's buffers, freed again.
  result = soak.fit_slope(steps, 1_000_000 + leak + peaks, warmup=1000, window=200)
  assert result["floor_slope_kb_per_1k_steps"] == pytest.approx(2000, rel=1e-3)
  assert result["first_step"] == 1000 and result["last_step"] == 4990 and result["floor_windows"] == 20
  flat = soak.fit_slope(steps, np.full(len(steps), 1e6), warmup=1000, window=200)
  assert flat["floor_slope_kb_per_1k_steps"] == pytest.approx(0, abs=1e-6)
  with pytest.raises(ValueError, match="only 0 RSS samples after the warm-up of 9000 steps"):
    soak.fit_slope(steps, leak, warmup=9000, window=200)


def test_short_soak_of_the_train_binary(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), "--steps=40", "--checkpoint_period=10",
                         "--eval_period=20", "--warmup=10", "--log_period=2", f"--workdir={tmp_path}", "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "RSS floor slope after warm-up:" in proc.stdout
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
  assert result["samples"] == 16 and result["rss_samples"]["steps"][-1] == 40
  assert np.isfinite(result["slope_kb_per_1k_steps"]) and result["checkpoints_kb"] > 0 and result["eval_kb"] > 0
  assert (tmp_path / "run" / "eval" / "eval_metrics_40.json").exists()


def test_one_release_of_memory_does_not_hide_a_leak():
  steps = np.arange(0, 6000, 10)
  rss = 1_000_000 + 1.0 * steps - np.where(steps >= 3000, 100_000.0, 0.0)  # 1 KB/step, one arena freed.
  result = soak.fit_slope(steps, rss, warmup=1000, window=200)
  assert result["median_floor_growth_kb_per_1k_steps"] == pytest.approx(1000, rel=1e-3)
  assert result["floor_slope_kb_per_1k_steps"] < 0  # What a line fit makes of it.
