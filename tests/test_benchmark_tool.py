"""tools/benchmark.py end to end on the tiny preset: every comparison it offers runs and reports numbers
that agree with the FLOP counter (the timings themselves are not asserted: tests never time)."""

import json
import pathlib
import subprocess
import sys

from prompt_mix import flops
from prompt_mix.peft import attempt
from prompt_mix.peft import lora
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = ["--size=tiny", "--inputs=6", "--prompt=3", "--targets=2", "--steps=2", "--warmup=0",
          "--matmul_size=64", "--json"]


def run_tool(*args: str) -> dict:
  proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *SHAPES, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert lines, proc.stdout[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def check_train(r: dict, deltas: tuple, batch: int = 2) -> None:
  expected = flops.train_step_flops(config_lib.preset("tiny"), deltas, batch, 6, 2)
  assert r["flops_needed"] == expected.total
  assert r["median_s"] > 0 and len(r["times_s"]) == 2 and r["peak_memory"] > 0
  assert r["flops_dots"] >= r["flops_needed"]


def test_attempt_versus_prompt_tuning_are_timed_interleaved():
  r = run_tool("--batch=2", "--method=attempt", "--versus=prompt_tuning", "--sources=2")
  check_train(r["train"], (attempt.Attempt(library_path="unused", source_names=("a", "b"), prompt_length=3),))
  check_train(r["versus"]["train"], (prompt_tuning.PromptTuning(length=3),))
  assert r["versus"]["method"] == "prompt_tuning" and r["versus"]["paired_ratio"] > 0


def test_compare_peft_loads_our_export_into_hf_peft():
  """--compare-peft builds HF PEFT's model from our export of the method (any method with a counterpart)."""
  # B is random (not zero) so that the comparison checks the exported update, on attention and MLP.
  r = run_tool("--batch=2", "--method=lora", "--rank=2", "--compare-peft",
               "--gin_bindings=LoRA.targets = ['query', 'value', 'wo']",
               "--gin_bindings=LoRA.init_lora_weights = False")
  check_train(r["train"], (lora.LoRA(rank=2, alpha=2.0, targets=("query", "value", "wo")),))
  peft = r["peft"]
  assert peft["peft_type"] == "LORA" and peft["logits_rel_error"] < 1e-5
  assert peft["train"]["median_s"] > 0 and peft["score"]["median_s"] > 0
  assert peft["trainable_params"] == r["train"]["trainable_params"]


def test_compare_peft_says_why_a_method_has_no_counterpart():
  r = run_tool("--batch=2", "--method=houlsby_adapter", "--bottleneck=2", "--compare-peft", "--notrain")
  reason = r["peft"]["unavailable"]  # The export's own refusal, naming the method.
  assert "HoulsbyAdapter" in reason and "PEFT counterpart" in reason


def test_prompt_tuning_inference_and_mixed_task():
  r = run_tool("--batch=8", "--method=prompt_tuning", "--inference", "--mixed-task", "--compare-peft")
  check_train(r["train"], (prompt_tuning.PromptTuning(length=3),), batch=8)
  # PEFT refuses to load a prompt-learning adapter as trainable; the tool makes its prompt trainable.
  assert r["peft"]["peft_type"] == "PROMPT_TUNING" and r["peft"]["logits_rel_error"] < 1e-5
  assert r["peft"]["trainable_params"] == r["train"]["trainable_params"]
  assert r["score"]["median_s"] > 0 and r["greedy"]["generated_tokens_per_s"] > 0
  mixed = r["mixed_task"]
  check_train(mixed["bank"]["train"], (prompt_tuning.PromptTuning(length=3, num_tasks=8),), batch=8)
  assert mixed["paired_ratio"]["train"] > 0 and mixed["paired_ratio"]["score"] > 0
  for kind in ("score", "greedy"):
    serving = mixed["serving"][kind]
    assert serving["speedup"] > 0 and len(serving["mixed"]["times_s"]) >= 2


def test_length_profiles_have_their_median_and_95th_percentile():
  code = ("import sys; sys.path.insert(0, 'tools'); import benchmark, numpy as np, json; "
          "print(json.dumps({name: [float(np.median(x)), float(np.percentile(x, 95)), int(x.min()), "
          "int(x.max())] for name in benchmark.PROFILES "
          "for x in [benchmark.profile_lengths(name, 100000, 10000)]}))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stats = json.loads(proc.stdout.splitlines()[-1])
  for name, (median, p95) in {"mnli": (50, 110), "rte": (70, 170), "boolq": (140, 320)}.items():
    got_median, got_p95, shortest, longest = stats[name]
    assert abs(got_median - median) <= 0.02 * median and abs(got_p95 - p95) <= 0.02 * p95, (name, stats[name])
    assert shortest >= 2 and longest <= 10000


def test_length_profile_and_rank_eval_run_side_by_side():
  r = run_tool("--batch=4", "--method=prompt_tuning", "--notrain", "--length-profile=rte",
               "--feature_length=96", "--rank-eval", "--options=3")
  lp = r["length_profile"]
  assert lp["profile"] == "rte" and lp["batches"] == 2 and lp["feature_length"] == 96
  for mode in ("fixed", "peft_dynamic", "buckets"):
    assert lp[mode]["examples_per_s"] > 0 and len(lp[mode]["times_s"]) == 2, mode
  # Fixed padding pads every batch to 96; HF's dynamic padding and our buckets pad less (the buckets are
  # multiples of 32 up to 96, each batch's smallest).
  assert lp["fixed"]["padded_input_tokens_per_example"] == 96
  assert lp["peft_dynamic"]["padded_input_tokens_per_example"] <= 96
  assert all(n in (32, 64, 96) and t == 2 for n, t in lp["bucket_shapes"])
  assert lp["buckets"]["padded_input_tokens_per_example"] <= 96
  assert lp["buckets_vs_fixed"] > 0 and lp["buckets_vs_peft_dynamic"] > 0
  rank = r["rank_eval"]
  assert rank["options"] == 3 and rank["inputs"] == 4
  assert rank["max_score_difference"] < 1e-4  # The same scores either way.
  assert rank["speedup"] > 0 and rank["encode_once"]["examples_per_s"] > 0
