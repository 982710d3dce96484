r"""Training-step and inference benchmarks, against the machine's matmul rate and against HF PEFT.

Every figure is measured in this run: the jitted training step (`training.step.make_train_step` with
Adafactor or Adam, on a backbone of random weights from `EncoderDecoderModel.init`), its median time over
`--steps` steps after `--warmup` steps, tokens per second, achieved FLOP/s from the FLOPs the step needs
(`prompt_mix.flops`, counting rules in its docstring) and their fraction of the fp32 matmul rate measured
here (a jitted `--matmul_size`^3 matmul, best of several), and peak memory (CPU: the process's RSS
high-water, `resource.getrusage`; GPU: `peak_bytes_in_use`).

  python tools/benchmark.py --size=t5_1_1_small --method=prompt_tuning --batch=8 --inputs=128 \
      --prompt=100 --targets=8 --steps=10
  ... --compare-peft      the same shapes with HF PEFT (PyTorch CPU, torch threads = cores), same process
  ... --inference         scoring (`score_batch`) and greedy decoding (`predict_batch`) throughput
  ... --mixed-task        a bank of 8 (NUM_TASKS = 8, task_ids 0..7) vs the single-task method, and a mixed
                          batch served in one call vs task by task
  ... --versus=METHOD     another method's step on the same shapes, timed interleaved, and the ratio
  ... --sweep=prompt      prompt lengths 0..400 (`--sweep=batch`: batch sizes), one subprocess per point
  ... --profile           per-op time of the jitted step (jax.profiler trace), by kind of op
  ... --dtype=bfloat16    bf16 activations (float32 params) for accelerators

`--method` (and `--versus`): any registered method, i.e. the stem of a gin file in
`prompt_mix/configs/methods/` (`prompt_mix.methods`), built from that file. The size flags bind the
registry's standard macros where the method's file binds them: `--prompt` -> PROMPT_LENGTH (0: the plain
backbone), `--rank` -> LORA_RANK and LORA_ALPHA, `--bottleneck` -> ADAPTER_BOTTLENECK, `--sources` ->
SOURCE_PROMPTS (random prompts of a scratch library written to a temporary directory, for a method that
reads PROMPT_LIBRARY), NUM_TASKS for `--mixed-task`'s bank; `--gin_bindings` (repeatable, or `--gin.NAME=
VALUE`) applies any other binding after them. `--compare-peft` builds the HF PEFT model from what our
export writes (`export_formats.peft_adapter`), loaded with `PeftModel.from_pretrained` on the HF T5 of the
same backbone weights; a method without a PEFT counterpart says why.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_mix import export_formats
from prompt_mix import flops as flops_lib
from prompt_mix import gin_utils
from prompt_mix import methods
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import plugins
from prompt_mix.training import step as step_lib

METHODS = methods.names()  # The registry: every gin file of prompt_mix/configs/methods/.
SWEEPS = {"prompt": (0, 25, 50, 100, 200, 400), "batch": (1, 2, 4, 8, 16, 32)}
RESULT = "RESULT "  # Prefix of the JSON line a sweep point prints for its parent.

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "t5_1_1_small", "A preset of prompt_mix.t5.config.PRESETS.")
flags.DEFINE_enum("method", "prompt_tuning", METHODS, "The method to train.")
flags.DEFINE_integer("batch", 8, "Batch size B.")
flags.DEFINE_integer("inputs", 128, "Encoder input tokens per example.")
flags.DEFINE_integer("prompt", 100, "PROMPT_LENGTH: prompt / prefix length (0: the plain backbone, forward "
                     "only).")
flags.DEFINE_integer("targets", 8, "Decoder target tokens per example (and greedy decoding length).")
flags.DEFINE_integer("steps", 10, "Measured steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Unmeasured steps after compilation.")
flags.DEFINE_enum("optimizer", "adafactor", ("adafactor", "adam"), "Optimizer of the trainable leaves.")
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "Activation dtype (params stay float32).")
flags.DEFINE_float("dropout", 0.0, "Dropout rate during the training step (both implementations).")
flags.DEFINE_integer("rank", 8, "LORA_RANK (and LORA_ALPHA = rank).")
flags.DEFINE_integer("bottleneck", 64, "ADAPTER_BOTTLENECK: adapter bottleneck.")
flags.DEFINE_integer("sources", None, "Methods reading a prompt library: this many random source prompts "
                     "(SOURCE_PROMPTS); default: the gin file's source prompts, as random prompts.")
flags.DEFINE_integer("matmul_size", 2048, "n of the n^3 fp32 matmul that measures the machine's rate.")
flags.DEFINE_bool("train", True, "Benchmark the training step.")
flags.DEFINE_bool("compare-peft", False, "Also time HF PEFT (PyTorch CPU) on the same shapes.")
flags.DEFINE_bool("inference", False, "Also time scoring and greedy decoding.")
flags.DEFINE_bool("mixed-task", False, "Also time a mixed-task batch of a bank of 8 (NUM_TASKS) vs one, "
                  "and serving it in one call vs task by task.")
flags.DEFINE_enum("sweep", None, tuple(SWEEPS), "Scaling curve over prompt length or batch size.")
flags.DEFINE_list("sweep_values", None, "Values of the sweep (default: prompt 0..400, batch 1..32).")
flags.DEFINE_enum("versus", None, METHODS, "Also time this method's step on the same shapes, the two "
                  "steps interleaved, and print the ratio (e.g. --method=attempt --versus=prompt_tuning).")
flags.DEFINE_enum("length-profile", None, ("mnli", "rte", "boolq"),
                  "Training examples/s on inputs whose lengths follow this task-like profile (approximate "
                  "lognormal, PROFILES): fixed padding to --feature_length (T5X), HF PEFT with dynamic "
                  "padding to each random batch's longest, and ours with length buckets, interleaved; "
                  "--steps batches of --batch examples each, the same examples for all three.")
flags.DEFINE_integer("feature_length", 256, "--length-profile: the input feature length (fixed padding's "
                     "length; longer inputs are truncated to it, as T5X does). Targets: --targets.")
flags.DEFINE_bool("rank-eval", False, "Rank-classification scoring of --batch inputs with --options label "
                  "words each: one encoder pass per input (score_options) vs one full row per option "
                  "(score_batch), interleaved, and the largest score difference.")
flags.DEFINE_integer("options", 3, "--rank-eval: label words per input.")
flags.DEFINE_bool("profile", False, "Trace the measured steps and print per-op time by kind.")
flags.DEFINE_bool("json", False, "Print the results as one JSON line (used by --sweep).")


# ------------------------------------------------------------------------------------------ machine
def matmul_rate(n: int, dtype=jnp.float32, repeats: int = 7) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul, best of `repeats` (after one warm-up call)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  return 2.0 * n ** 3 / time_calls(lambda: f(a, b).block_until_ready(), repeats, 0)["min_s"]


def peak_memory_bytes() -> int:
  """GPU/TPU: the device's peak bytes in use; CPU: this process's RSS high-water."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
  """Peak RSS during a `with` block, sampled every 5 ms (for the PyTorch side, which shares the process)."""

  def __enter__(self):
    self.start = self.peak = rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def load_average() -> float:
  return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ models
def method_bindings(method: str, prompt: int, num_tasks: Optional[int] = None) -> list[str]:
  """The bindings of `--method`'s standard macros from the flags (those its gin file binds), then
  `--gin_bindings`.

  `num_tasks`: NUM_TASKS for a bank (None: the file's value; 1 where the file requires one).
  """
  bound = methods.macros(method)
  values = {"PROMPT_LENGTH": prompt, "LORA_RANK": FLAGS.rank, "LORA_ALPHA": float(FLAGS.rank),
            "ADAPTER_BOTTLENECK": FLAGS.bottleneck}
  if FLAGS.sources is not None:
    values["SOURCE_PROMPTS"] = [f"source_{i}" for i in range(FLAGS.sources)]
  if num_tasks is not None:
    values["NUM_TASKS"] = num_tasks
  elif "NUM_TASKS" in methods.required_macros(method):
    values["NUM_TASKS"] = 1
  return [f"{k} = {v!r}" for k, v in values.items() if k in bound] + list(FLAGS.gin_bindings or ())


def make_deltas(method: str, prompt: int, inputs: int, targets: int, d_model: int,
                library_dir: Optional[str], num_tasks: Optional[int] = None) -> tuple:
  """The deltas of `method` built from its gin file with `method_bindings` (an empty tuple, the plain
  backbone, for prompt length 0 on a method with a PROMPT_LENGTH).

  `inputs` and `targets` are not used (the gin file sizes what depends on lengths); `library_dir` holds
  the scratch prompt library of a method that reads one (it must outlive the deltas).
  """
  del inputs, targets
  if prompt == 0 and methods.LENGTH_MACRO in methods.macros(method):
    return ()
  model = FLAGS.size if (gin_utils.CONFIG_DIR / "models" / f"{FLAGS.size}.gin").is_file() else None
  return methods.deltas(method, method_bindings(method, prompt, num_tasks), model=model, d_model=d_model,
                        scratch_dir=library_dir)


def make_batch(batch: int, inputs: int, targets: int, vocab: int, task_ids=None, seed: int = 0) -> dict:
  """Random tokens (no padding), decoder inputs shifted right from the targets, as SeqIO builds them."""
  rng = np.random.RandomState(seed)
  high = min(vocab, 32000)
  tgt = rng.randint(2, high, (batch, targets)).astype(np.int32)
  out = dict(encoder_input_tokens=rng.randint(2, high, (batch, inputs)).astype(np.int32),
             decoder_target_tokens=tgt,
             decoder_input_tokens=np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1),
             decoder_loss_weights=np.ones((batch, targets), np.float32))
  if task_ids is not None:
    out["task_ids"] = np.asarray(task_ids, np.int32)
  return {k: jnp.asarray(v) for k, v in out.items()}


def make_optimizer(name: str) -> optax.GradientTransformation:
  if name == "adafactor":  # T5X prompt tuning's settings.
    return optax.adafactor(learning_rate=0.3, decay_rate=0.8, multiply_by_parameter_scale=False,
                           clipping_threshold=1.0)
  return optax.adam(0.3)


@dataclasses.dataclass
class Setup:
  model: model_lib.EncoderDecoderModel
  variables: dict
  batch: dict
  deltas: tuple


def build(config: config_lib.T5Config, deltas: tuple, batch: dict, eos_id: int = 1) -> Setup:
  model = model_lib.EncoderDecoderModel(config, deltas, eos_id=eos_id)
  init_batch = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), init_batch))
  return Setup(model, dict(variables), batch, deltas)


# ------------------------------------------------------------------------------------------ timing
def time_calls(call: Callable[[], Any], steps: int, warmup: int) -> dict:
  """Times `call()` (which must block): the first call (compilation), `warmup` more, then `steps`."""
  return interleaved({"call": call}, steps, warmup)["call"]


SETTLE_S = 0.25  # Pause before each timed call of `interleaved`.


def interleaved(calls: dict[str, Callable[[], Any]], steps: int, warmup: int,
                settle_s: float = SETTLE_S) -> dict[str, dict]:
  """Times several calls round-robin (the order reversed every other round), so that a change in the
  machine's load during the run falls on all of them alike. Each call runs once (compilation) and
  `warmup` times before the rounds. Each timed call starts after a pause of `settle_s`, so that the thread
  pools of the previous call (XLA's, or PyTorch's OpenMP threads), which may spin after their work is done,
  cannot overlap it (measured with and without the pause, the HF PEFT ratio was the same: docs/benchmarks.md).
  Returns {name: {first_s, median_s, min_s,
  max_s, times_s}}, plus 'paired_ratio': {name: median over rounds of (its time / the first call's time in
  that round)}."""
  first = {}
  for name, call in calls.items():
    t0 = time.perf_counter()
    call()
    first[name] = time.perf_counter() - t0
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  names = list(calls)
  for i in range(steps):
    for name in (names if i % 2 == 0 else names[::-1]):
      time.sleep(settle_s)
      t0 = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - t0)
  out: dict[str, Any] = {name: dict(first_s=first[name], median_s=float(np.median(ts)), min_s=min(ts),
                                    max_s=max(ts), times_s=ts) for name, ts in times.items()}
  base = times[names[0]]
  out["paired_ratio"] = {name: float(np.median(np.asarray(ts) / np.asarray(base))) for name, ts in times.items()}
  return out


def hlo_op_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} of a compiled HLO module: 'matmul' for dots and fusions that hold one,
  else the opcode ('fusion' for elementwise/reduce fusions, 'copy', 'transpose', 'gather', ...)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  has_dot = {name: any(re.search(r" (dot|convolution)\(", l) for l in lines)
             for name, lines in computations.items()}
  kinds = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
      if not m:
        continue
      name, opcode = m.group(1), m.group(2)
      kind = opcode
      if opcode in ("dot", "convolution"):
        kind = "matmul"
      elif opcode in ("fusion", "call", "custom-call"):
        called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
        kind = "matmul" if any(has_dot.get(c, False) for c in called) else "fusion"
      kinds[name] = kind
  return kinds


def matmul_floor(hlo_text: str, repeats: int = 7) -> dict:
  """Each distinct dot of a compiled step timed alone (jitted, best of `repeats`), times its count.

  The sum is the time the step's matmuls take when each runs by itself on the whole machine: a floor
  for the step, whatever the rest costs.
  """
  counts = collections.Counter(flops_lib.hlo_dots(hlo_text))
  total_s, total_flops, rows = 0.0, 0.0, []
  for dot, count in counts.items():
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}[dot.dtype]
    lhs = jax.random.normal(jax.random.PRNGKey(0), dot.lhs, dtype)
    rhs = jax.random.normal(jax.random.PRNGKey(1), dot.rhs, dtype)
    numbers = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
    f = jax.jit(lambda a, b, numbers=numbers: jax.lax.dot_general(a, b, numbers))
    # Two warm-up calls after compilation: the first runs after a step's trace are slow.
    best = time_calls(lambda: f(lhs, rhs).block_until_ready(), repeats, 2)["min_s"]
    total_s += best * count
    total_flops += dot.flops * count
    rows.append((best * count, count, dot))
  rows.sort(key=lambda r: -r[0])
  return dict(seconds=total_s, flops=total_flops, distinct=len(counts), dots=sum(counts.values()),
              top=[(f"{c} x {d.lhs}.{d.rhs} contracting {d.lhs_contracting}/{d.rhs_contracting} batch "
                    f"{d.lhs_batch}", 1000 * t, d.flops * c / t / 1e9) for t, c, d in rows[:8]])


def profile_step(call: Callable[[], Any], steps: int, hlo_text: str, logdir: str) -> dict:
  """Runs `call` `steps` times under jax.profiler; returns per-op-kind and per-op time per step (ms).

  Times are summed over the XLA threads (on a 2-core CPU two ops may run at once), so the shares are of
  the summed op time.
  """
  jax.profiler.start_trace(logdir)
  for _ in range(steps):
    call()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                key=os.path.getmtime)[-1]
  data = jax.profiler.ProfileData.from_file(path)
  kinds = hlo_op_kinds(hlo_text)
  per_op = collections.Counter()
  for plane in data.planes:
    if not (plane.name.startswith("/device:") or plane.name == "/host:CPU"):
      continue
    for line in plane.lines:
      if plane.name == "/host:CPU" and not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        name = event.name
        if name.startswith(("ThreadpoolListener", "end: ")) or name not in kinds:
          continue
        per_op[name] += event.duration_ns / 1e6 / steps
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[kinds[name]] += ms
  return dict(per_kind=dict(per_kind.most_common()), top_ops=per_op.most_common(15))


# ------------------------------------------------------------------------------------------ ours
@dataclasses.dataclass
class TrainStep:
  """A compiled training step of a `Setup` and the state it carries from call to call."""

  call: Callable[[], Any]  # One step (blocks until done); returns the loss.
  hlo: str
  cost: dict
  state: list  # [trainable, optimizer state].


def compile_train_step(setup: Setup) -> TrainStep:
  model = setup.model
  trainable, frozen = model_lib.split_trainable(setup.variables, model.trains_backbone)
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # Donated: keep setup.variables intact.
  optimizer = make_optimizer(FLAGS.optimizer)
  opt_state = optimizer.init(trainable)
  step = step_lib.make_train_step(model, optimizer)
  dropout_rng = jax.random.PRNGKey(1) if FLAGS.dropout > 0 else None
  jitted = jax.jit(step, donate_argnums=(0, 1))
  compiled = jitted.lower(trainable, opt_state, frozen, setup.batch, dropout_rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = [trainable, opt_state]

  def call():
    state[0], state[1], loss, _ = compiled(state[0], state[1], frozen, setup.batch, dropout_rng)
    loss.block_until_ready()
    return loss

  return TrainStep(call, compiled.as_text(), dict(cost), state)


def bench_train(setup: Setup, config, steps: int, warmup: int, profile: bool = False,
                train_step: Optional[TrainStep] = None, timing: Optional[dict] = None) -> dict:
  """Times the training step (or reports `timing` measured elsewhere, e.g. by `interleaved`)."""
  train_step = train_step or compile_train_step(setup)
  call = train_step.call
  timing = timing or time_calls(call, steps, warmup)
  b, n, t = (setup.batch["encoder_input_tokens"].shape[0], setup.batch["encoder_input_tokens"].shape[1],
             setup.batch["decoder_target_tokens"].shape[1])
  needed = flops_lib.train_step_flops(config, setup.deltas, b, n, t)
  out = dict(timing, flops_needed=needed.total, flops_forward=needed.forward,
             flops_backward=needed.backward, flops_dots=flops_lib.hlo_dot_flops(train_step.hlo),
             flops_xla=float(train_step.cost.get("flops", 0.0)), tokens_per_s=b * (n + t) / timing["median_s"],
             examples_per_s=b / timing["median_s"], peak_memory=peak_memory_bytes(),
             loss=float(call()), trainable_params=model_lib.count_params(train_step.state[0]))
  if profile:
    with tempfile.TemporaryDirectory() as logdir:
      out["profile"] = profile_step(call, steps, train_step.hlo, logdir)
    out["profile"]["matmul_floor"] = matmul_floor(train_step.hlo)
  return out


def score_call(setup: Setup) -> Callable[[], Any]:
  """`score_batch` of the setup's batch, jitted, as a blocking call."""
  score = jax.jit(setup.model.score_batch)
  return lambda: score(setup.variables, setup.batch).block_until_ready()


def bench_score(setup: Setup, config, steps: int, warmup: int) -> dict:
  timing = time_calls(score_call(setup), steps, warmup)
  b, n = setup.batch["encoder_input_tokens"].shape
  t = setup.batch["decoder_target_tokens"].shape[1]
  needed = flops_lib.forward_flops(config, setup.deltas, b, n, t).total
  return dict(timing, flops_needed=needed, examples_per_s=b / timing["median_s"],
              tokens_per_s=b * (n + t) / timing["median_s"])


def bench_decode(setup: Setup, config, length: int, steps: int, warmup: int) -> dict:
  """Greedy decoding of exactly `length` tokens (the model's eos_id is -1: no row stops early)."""
  predict = jax.jit(lambda v, b: setup.model.predict_batch(v, b, decoder="greedy",
                                                           max_decode_length=length)[0])
  timing = time_calls(lambda: predict(setup.variables, setup.batch).block_until_ready(), steps, warmup)
  b, n = setup.batch["encoder_input_tokens"].shape
  needed = flops_lib.decode_flops(config, setup.deltas, b, n, length).total
  return dict(timing, flops_needed=needed, examples_per_s=b / timing["median_s"],
              generated_tokens_per_s=b * length / timing["median_s"])


# ------------------------------------------------------------------------------------------ HF PEFT
@dataclasses.dataclass
class PeftTrainer:
  """HF PEFT's model and optimizer on our backbone weights, and a training step on any batch."""

  wrapped: Any
  optimizer: Any
  trainable: list

  @staticmethod
  def kwargs(batch: dict) -> dict:
    """Our batch features as the HF model's arguments; padded label positions are -100 (ignored by the
    loss), as the HF seq2seq data collators pad them."""
    import torch  # pylint: disable=g-import-not-at-top
    t = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items() if k != "decoder_loss_weights"}
    labels = t["decoder_target_tokens"].masked_fill(t["decoder_target_tokens"] == 0, -100)
    return dict(input_ids=t["encoder_input_tokens"], attention_mask=(t["encoder_input_tokens"] > 0).long(),
                decoder_input_ids=t["decoder_input_tokens"], labels=labels)

  def step(self, kwargs: dict):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.wrapped(**kwargs).loss
    loss.backward()
    self.optimizer.step()
    return loss


def peft_export(setup: Setup) -> tuple[Optional[tuple[dict, dict]], str]:
  """Our HF PEFT export of the setup's method and weights: ((adapter_config, {key: array}), '') from
  `export_formats.peft_adapter`, or (None, the export's reason) for a method without a PEFT counterpart."""
  try:
    return export_formats.peft_adapter(setup.variables, setup.model), ""
  except export_formats.ExportError as e:
    return None, str(e)


def peft_model(config, params, adapter: tuple[dict, dict]):
  """`PeftModel.from_pretrained(hf, adapter_dir)` on the HF T5 of our backbone `params`, the adapter
  directory written from our export (`peft_export`) to a temporary directory; the adapter's parameters
  (every parameter the backbone did not have) are made trainable, its backbone's stay frozen. (PEFT
  refuses `is_trainable=True` for prompt learning adapters.)"""
  import peft  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from prompt_mix.t5 import hf_checkpoint  # pylint: disable=g-import-not-at-top
  adapter_config, tensors = adapter
  hf = hf_checkpoint.hf_t5_model(config, params)
  with tempfile.TemporaryDirectory() as adapter_dir:
    with open(os.path.join(adapter_dir, export_formats.ADAPTER_CONFIG_FILE), "w") as f:
      json.dump(adapter_config, f)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(adapter_dir, export_formats.ADAPTER_WEIGHTS_FILE),
                                metadata={"format": "pt"})
    backbone = {id(p) for p in hf.parameters()}
    wrapped = peft.PeftModel.from_pretrained(hf, adapter_dir)
  for p in wrapped.parameters():
    p.requires_grad_(id(p) not in backbone)
  return wrapped


def peft_logits_error(setup: Setup, wrapped) -> float:
  """max |theirs - ours| / max |ours| of the logits on the setup's batch (eval mode, no dropout)."""
  import torch  # pylint: disable=g-import-not-at-top
  batch = setup.batch
  ours = np.asarray(jax.jit(setup.model.logits)(setup.variables, batch), np.float32)
  enc = np.asarray(batch["encoder_input_tokens"])
  wrapped.eval()
  with torch.no_grad():
    theirs = wrapped(input_ids=torch.tensor(enc).long(), attention_mask=torch.tensor(enc > 0).long(),
                     decoder_input_ids=torch.tensor(np.asarray(batch["decoder_input_tokens"])).long()).logits
  return float(np.abs(theirs.numpy() - ours).max() / np.abs(ours).max())


def peft_trainer(config, params, adapter: tuple[dict, dict]) -> PeftTrainer:
  """HF PEFT's model, built from our export of the method (`peft_model`), and its optimizer, on our
  backbone weights: PyTorch CPU, threads = cores."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  wrapped = peft_model(config, params, adapter)
  wrapped.train()
  trainable = [p for p in wrapped.parameters() if p.requires_grad]
  if FLAGS.optimizer == "adafactor":
    from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
    optimizer = Adafactor(trainable, lr=0.3, scale_parameter=False, relative_step=False,
                          warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
  else:
    optimizer = torch.optim.Adam(trainable, lr=0.3)
  return PeftTrainer(wrapped, optimizer, trainable)


def bench_peft(setup: Setup, config, adapter: tuple[dict, dict], steps: int, warmup: int) -> dict:
  """HF PEFT on the same backbone weights, method and shapes: PyTorch CPU, threads = cores."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  trainer = peft_trainer(config, setup.variables["params"], adapter)
  logits_error = peft_logits_error(setup, trainer.wrapped)
  kwargs = PeftTrainer.kwargs(setup.batch)
  trainer.wrapped.train()
  with RssSampler() as rss:
    train = time_calls(lambda: trainer.step(kwargs), steps, warmup)
  trainer.wrapped.eval()
  with torch.no_grad():
    score = time_calls(lambda: trainer.wrapped(**kwargs).logits, steps, warmup)
  return dict(train=train, score=score, rss_peak=rss.peak, rss_growth=rss.peak - rss.start,
              threads=torch.get_num_threads(), torch=torch.__version__, peft=peft.__version__,
              trainable_params=sum(p.numel() for p in trainer.trainable),
              peft_type=adapter[0].get("peft_type"), logits_rel_error=logits_error)


def versus_peft(setup: Setup, config, adapter: tuple[dict, dict], steps: int, warmup: int) -> dict:
  """Our training step and HF PEFT's on the same batch, timed round-robin (`interleaved`); the ratio is
  the median over rounds of PEFT's time / ours."""
  ours = train_step_fn(setup)
  trainer = peft_trainer(config, setup.variables["params"], adapter)
  kwargs = PeftTrainer.kwargs(setup.batch)
  trainer.wrapped.train()
  timings = interleaved({"ours": lambda: ours(setup.batch), "peft": lambda: trainer.step(kwargs)}, steps,
                        warmup)
  return dict(ours=timings["ours"], peft=timings["peft"], peft_over_ours=timings["paired_ratio"]["peft"])


# ------------------------------------------------------------------------------------------ workloads
# Approximate length profiles of real tasks in T5 SentencePiece tokens (EOS included): the median and 95th
# percentile of the encoder input, and the range of target lengths (label word + EOS). Approximations for
# a benchmark, not measurements of the datasets (docs/benchmarks.md).
PROFILES = {"mnli": (50, 110, (2, 4)), "rte": (70, 170, (2, 5)), "boolq": (140, 320, (2, 3))}
Z95 = 1.6448536269514722  # The standard normal's 95th percentile.


def profile_lengths(name: str, count: int, max_length: int, seed: int = 0) -> np.ndarray:
  """[count] input lengths from the profile's lognormal (median, p95), clipped to [2, max_length]."""
  median, p95, _ = PROFILES[name]
  sigma = (np.log(p95) - np.log(median)) / Z95
  lengths = np.exp(np.random.RandomState(seed).normal(np.log(median), sigma, count))
  return np.clip(np.rint(lengths), 2, max_length).astype(np.int64)


def profile_examples(name: str, count: int, input_length: int, target_length: int, vocab: int,
                     seed: int = 0) -> dict:
  """`count` examples of the profile as model features padded to the feature lengths (EOS = 1 last)."""
  rng = np.random.RandomState(seed + 1)
  high = min(vocab, 32000)
  lengths = profile_lengths(name, count, input_length, seed)
  low, top = PROFILES[name][2]
  target_lengths = np.minimum(rng.randint(low, top + 1, count), target_length)
  inputs = np.zeros((count, input_length), np.int32)
  targets = np.zeros((count, target_length), np.int32)
  for i in range(count):
    inputs[i, :lengths[i] - 1], inputs[i, lengths[i] - 1] = rng.randint(2, high, lengths[i] - 1), 1
    t = target_lengths[i]
    targets[i, :t - 1], targets[i, t - 1] = rng.randint(2, high, t - 1), 1
  return dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
              decoder_input_tokens=np.concatenate([np.zeros((count, 1), np.int32), targets[:, :-1]], 1),
              decoder_loss_weights=(targets > 0).astype(np.float32))


def train_step_fn(setup: Setup) -> Callable[[dict], Any]:
  """Our jitted training step on any batch shape (one compilation per shape), carrying its own state."""
  model = setup.model
  trainable, frozen = model_lib.split_trainable(setup.variables, model.trains_backbone)
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)
  optimizer = make_optimizer(FLAGS.optimizer)
  state = [trainable, optimizer.init(trainable)]
  jitted = jax.jit(step_lib.make_train_step(model, optimizer), donate_argnums=(0, 1))
  dropout_rng = jax.random.PRNGKey(1) if FLAGS.dropout > 0 else None

  def run(batch):
    state[0], state[1], loss, _ = jitted(state[0], state[1], frozen, batch, dropout_rng)
    return loss.block_until_ready()

  return run


def length_profile(config, method: str, b: int, m: int, t: int, library_dir: str) -> dict:
  """Training examples/s on the --length-profile workload, three ways, interleaved round-robin.

  The same `--steps` x `b` examples for all: 'fixed' (ours, every batch padded to the feature lengths, as
  T5X and the ATTEMPT original), 'peft_dynamic' (HF PEFT, random batches padded to their longest input and
  target, as its data collators do) and 'buckets' (ours, the library's training grouping:
  `buckets.group_by_length` over one window of all the batches, each padded to its bucket). Each of our
  bucket shapes is compiled before the timing; examples/s is total examples over total time.
  """
  from prompt_mix.data import buckets as buckets_lib  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  name, n, steps = FLAGS["length-profile"].value, FLAGS.feature_length, FLAGS.steps
  examples = profile_examples(name, steps * b, n, t, config.vocab_size)
  deltas = make_deltas(method, m, n, t, config.emb_dim, library_dir)
  setup = build(config, deltas, {k: jnp.asarray(v[:b]) for k, v in examples.items()}, eos_id=-1)
  as_jax = lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}

  random_batches = [{k: v[i * b:(i + 1) * b] for k, v in examples.items()} for i in range(steps)]
  fixed = [as_jax(batch) for batch in random_batches]
  dynamic = [buckets_lib.trim(batch, buckets_lib.max_length(batch["encoder_input_tokens"]),
                              buckets_lib.max_length(batch["decoder_target_tokens"]))
             for batch in random_batches]
  resolved = buckets_lib.LengthBuckets().resolve({"inputs": n, "targets": t})
  grouped = buckets_lib.group_by_length(tf.data.Dataset.from_tensor_slices(examples), b, steps, seed=0)
  bucketed = [as_jax(batch) for batch in buckets_lib.BucketedBatches(
      grouped.as_numpy_iterator(), resolved, agree=lambda x: x)]
  assert len(bucketed) == steps

  def cycling(run, batches):
    position = [0]

    def call():
      batch = batches[position[0] % len(batches)]
      position[0] += 1
      return run(batch)

    return call

  ours_fixed, ours_buckets = train_step_fn(setup), train_step_fn(setup)
  for shape in {tuple(v.shape for v in batch.values()): batch for batch in bucketed}.values():
    ours_buckets(shape)  # Compile every bucket shape before timing.
  calls = {"fixed": cycling(ours_fixed, fixed), "buckets": cycling(ours_buckets, bucketed)}
  adapter = peft_export(setup)[0] if deltas else None
  with_peft = adapter is not None
  if with_peft:
    hf = peft_trainer(config, setup.variables["params"], adapter)
    hf_batches = [PeftTrainer.kwargs(batch) for batch in dynamic]
    hf.step(hf_batches[0])  # Warm-up.
    calls = {"fixed": calls["fixed"], "peft_dynamic": cycling(hf.step, hf_batches),
             "buckets": calls["buckets"]}
  timings = interleaved(calls, steps, 0)
  padded = {"fixed": fixed, "peft_dynamic": dynamic, "buckets": bucketed}
  out = dict(profile=name, median=PROFILES[name][0], p95=PROFILES[name][1], feature_length=n,
             batch=b, batches=steps, prompt=m, targets=t,
             real_input_tokens_per_example=float(buckets_lib.token_lengths(
                 examples["encoder_input_tokens"]).mean()),
             bucket_shapes=sorted({(int(x["encoder_input_tokens"].shape[1]),
                                    int(x["decoder_target_tokens"].shape[1])) for x in bucketed}))
  for mode in calls:
    total = float(np.sum(timings[mode]["times_s"]))
    out[mode] = dict(timings[mode], total_s=total, examples_per_s=steps * b / total,
                     padded_input_tokens_per_example=float(np.mean(
                         [x["encoder_input_tokens"].shape[1] for x in padded[mode]])))
  out["buckets_vs_fixed"] = out["buckets"]["examples_per_s"] / out["fixed"]["examples_per_s"]
  if with_peft:
    out["buckets_vs_peft_dynamic"] = (out["buckets"]["examples_per_s"]
                                      / out["peft_dynamic"]["examples_per_s"])
  return out


def rank_eval(setup: Setup, b: int, n: int, t: int, options: int) -> dict:
  """Scoring `b` inputs with `options` label words each: one encoder pass per input (`score_options`)
  against one full row per (input, label word) (`score_batch`), interleaved, on the same inputs."""
  rng = np.random.RandomState(2)
  high = min(setup.model.config.vocab_size, 32000)
  inputs = rng.randint(2, high, (b, n)).astype(np.int32)
  inputs[:, -1] = 1
  words = np.zeros((options, t), np.int32)
  for c in range(options):
    length = min(2 + c % 3, t)
    words[c, :length - 1], words[c, length - 1] = rng.randint(2, high, length - 1), 1
  targets = np.tile(words, (b, 1))
  shifted = np.concatenate([np.zeros((b * options, 1), np.int32), targets[:, :-1]], 1)
  decoder = dict(decoder_target_tokens=targets, decoder_loss_weights=(targets > 0).astype(np.float32),
                 decoder_input_tokens=shifted)
  as_jax = lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}
  rows = as_jax(dict(decoder, encoder_input_tokens=np.repeat(inputs, options, 0)))
  grouped = as_jax(dict(decoder, encoder_input_tokens=inputs,
                        encoder_row=np.repeat(np.arange(b, dtype=np.int32), options)))
  score_rows, score_once = jax.jit(setup.model.score_batch), jax.jit(setup.model.score_options)
  difference = float(np.abs(np.asarray(score_rows(setup.variables, rows))
                            - np.asarray(score_once(setup.variables, grouped))).max())
  timings = interleaved({"row_per_option": lambda: score_rows(setup.variables, rows).block_until_ready(),
                         "encode_once": lambda: score_once(setup.variables, grouped).block_until_ready()},
                        FLAGS.steps, FLAGS.warmup)
  return dict(inputs=b, options=options, input_length=n, max_score_difference=difference,
              row_per_option=dict(timings["row_per_option"],
                                  examples_per_s=b / timings["row_per_option"]["median_s"]),
              encode_once=dict(timings["encode_once"],
                               examples_per_s=b / timings["encode_once"]["median_s"]),
              speedup=1 / timings["paired_ratio"]["encode_once"])


# ------------------------------------------------------------------------------------------ report
def gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB"


def describe_train(r: dict, rate: float) -> list[str]:
  achieved = r["flops_needed"] / r["median_s"]
  return [
      f"  {1000 * r['median_s']:.1f} ms/step (median of {len(r['times_s'])}; min {1000 * r['min_s']:.1f}, "
      f"max {1000 * r['max_s']:.1f}; first call incl. compilation {r['first_s']:.1f} s)",
      f"  {r['tokens_per_s']:.0f} tokens/s ({r['examples_per_s']:.2f} examples/s), "
      f"{r['trainable_params']:,} trainable parameters, loss {r['loss']:.3f}",
      f"  FLOPs needed {r['flops_needed'] / 1e9:.2f} GFLOP/step (forward {r['flops_forward'] / 1e9:.2f}, "
      f"backward {r['flops_backward'] / 1e9:.2f}); XLA executes {r['flops_dots'] / 1e9:.2f} GFLOP in dots, "
      f"{r['flops_xla'] / 1e9:.2f} GFLOP in its cost analysis",
      f"  achieved {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / rate:.0f}% of the measured matmul rate "
      f"(dots executed: {r['flops_dots'] / r['median_s'] / 1e9:.1f} GFLOP/s = "
      f"{100 * r['flops_dots'] / r['median_s'] / rate:.0f}%)",
      f"  peak memory {gib(r['peak_memory'])}"]


def describe_profile(p: dict) -> list[str]:
  total = sum(p["per_kind"].values())
  lines = ["  profile (op time summed over XLA threads, per step):"]
  for kind, ms in p["per_kind"].items():
    lines.append(f"    {kind:<22}{ms:>10.1f} ms {100 * ms / total:>6.1f}%")
  lines.append("    top ops:")
  for name, ms in p["top_ops"]:
    lines.append(f"      {name:<40}{ms:>10.1f} ms")
  floor = p.get("matmul_floor")
  if floor:
    lines.append(f"  matmul floor: the step's {floor['dots']} dots ({floor['distinct']} distinct), each timed "
                 f"alone: {1000 * floor['seconds']:.1f} ms for {floor['flops'] / 1e9:.2f} GFLOP = "
                 f"{floor['flops'] / floor['seconds'] / 1e9:.1f} GFLOP/s")
    for name, ms, rate in floor["top"]:
      lines.append(f"      {ms:>8.1f} ms {rate:>7.1f} GFLOP/s  {name}")
  return lines


def header(config_name: str, method: str, b: int, n: int, m: int, t: int) -> str:
  return (f"{method} on {config_name} ({FLAGS.dtype}), batch {b}, inputs {n}, prompt {m}, targets {t}, "
          f"{FLAGS.optimizer}, dropout {FLAGS.dropout}")


def run_point(method: str, b: int, m: int, library_dir: str) -> dict:
  """All requested measurements of one configuration; prints them unless --json."""
  n, t = FLAGS.inputs, FLAGS.targets
  config = config_lib.preset(FLAGS.size, dtype=FLAGS.dtype, dropout_rate=FLAGS.dropout)
  say = (lambda *a: None) if FLAGS.json else print
  results = dict(method=method, size=FLAGS.size, dtype=FLAGS.dtype, batch=b, inputs=n, prompt=m,
                 targets=t, optimizer=FLAGS.optimizer, dropout=FLAGS.dropout,
                 device=str(jax.local_devices()[0].device_kind), cores=os.cpu_count(),
                 load_average_start=load_average())
  say("command: python tools/benchmark.py " + " ".join(sys.argv[1:]))
  rate = matmul_rate(FLAGS.matmul_size)
  results["matmul_flops_per_s"] = rate
  say(f"machine: {results['device']}, {os.cpu_count()} cores, jax {jax.__version__}; fp32 "
      f"{FLAGS.matmul_size}^3 matmul {rate / 1e9:.1f} GFLOP/s (best of 7); load average "
      f"{results['load_average_start']:.2f}")
  if FLAGS.dtype == "bfloat16":
    results["matmul_bf16_flops_per_s"] = matmul_rate(FLAGS.matmul_size, jnp.bfloat16)
    say(f"  bf16 matmul {results['matmul_bf16_flops_per_s'] / 1e9:.1f} GFLOP/s")
  deltas = make_deltas(method, m, n, t, config.emb_dim, library_dir)
  batch = make_batch(b, n, t, config.vocab_size)
  setup = build(config, deltas, batch, eos_id=-1)
  say(header(FLAGS.size, method if deltas else "backbone (no trainable leaves: forward only)", b, n, m, t))

  if FLAGS.train and FLAGS.versus:
    other_deltas = make_deltas(FLAGS.versus, m, n, t, config.emb_dim, library_dir)
    other = build(config, other_deltas, batch, eos_id=-1)
    step, other_step = compile_train_step(setup), compile_train_step(other)
    timings = interleaved({FLAGS.versus: other_step.call, method: step.call}, FLAGS.steps, FLAGS.warmup)
    r = bench_train(setup, config, FLAGS.steps, FLAGS.warmup, FLAGS.profile, step, timings[method])
    v = bench_train(other, config, FLAGS.steps, FLAGS.warmup, False, other_step, timings[FLAGS.versus])
    results["train"], results["versus"] = r, dict(method=FLAGS.versus, train=v,
                                                  paired_ratio=timings["paired_ratio"][method])
    say(f"train step ({method}; steps interleaved with {FLAGS.versus}'s):")
    for line in describe_train(r, rate):
      say(line)
    say(f"train step of {FLAGS.versus} on the same shapes:")
    for line in describe_train(v, rate):
      say(line)
    say(f"  {method} / {FLAGS.versus}: {r['median_s'] / v['median_s']:.3f} on medians, "
        f"{timings['paired_ratio'][method]:.3f} on the median of per-round ratios")
  elif FLAGS.train:
    r = bench_train(setup, config, FLAGS.steps, FLAGS.warmup, FLAGS.profile)
    results["train"] = r
    say("train step:")
    for line in describe_train(r, rate):
      say(line)
    if FLAGS.profile:
      for line in describe_profile(r["profile"]):
        say(line)

  if FLAGS.inference:
    s = bench_score(setup, config, FLAGS.steps, FLAGS.warmup)
    results["score"] = s
    say(f"scoring (score_batch): {1000 * s['median_s']:.1f} ms/batch, {s['examples_per_s']:.1f} examples/s, "
        f"{s['tokens_per_s']:.0f} tokens/s, {s['flops_needed'] / s['median_s'] / 1e9:.1f} GFLOP/s = "
        f"{100 * s['flops_needed'] / s['median_s'] / rate:.0f}% of matmul")
    g = bench_decode(setup, config, t, max(3, FLAGS.steps // 2), 1)
    results["greedy"] = g
    say(f"greedy decoding (predict_batch, {t} tokens): {1000 * g['median_s']:.1f} ms/batch, "
        f"{g['examples_per_s']:.1f} examples/s, {g['generated_tokens_per_s']:.1f} generated tokens/s, "
        f"{g['flops_needed'] / g['median_s'] / 1e9:.1f} GFLOP/s")

  if FLAGS["mixed-task"].value and not deltas:
    say("mixed-task comparison skipped: the plain backbone has no bank")
  elif FLAGS["mixed-task"].value and "NUM_TASKS" not in methods.macros(method):
    say(f"mixed-task comparison skipped: {method}'s gin file binds no NUM_TASKS (no bank of per-task leaves)")
  elif FLAGS["mixed-task"].value:
    mixed = mixed_task(config, method, b, n, m, t, library_dir)
    results["mixed_task"] = mixed
    say("mixed-task batch (a bank of 8, NUM_TASKS = 8, task_ids 0..7) vs single-task batch, interleaved:")
    for kind in ("train", "score"):
      one, bank = mixed["single"][kind]["median_s"], mixed["bank"][kind]["median_s"]
      say(f"  {kind:<6} single {1000 * one:.1f} ms, bank {1000 * bank:.1f} ms: bank/single "
          f"{bank / one:.3f} on medians, {mixed['paired_ratio'][kind]:.3f} on the median of per-round ratios")
    if "serving" in mixed:
      say(f"serving the same {b} examples of 8 tasks: one mixed batch vs task by task ({b // 8} per call), "
          "interleaved:")
      for kind, r in mixed["serving"].items():
        say(f"  {kind:<6} task by task {1000 * r['task_by_task']['median_s']:.1f} ms, mixed "
            f"{1000 * r['mixed']['median_s']:.1f} ms: mixed is {r['speedup']:.2f}x faster (median "
            "per-round ratio)")
    else:
      say(f"serving comparison skipped: --batch={b} is not a multiple of the 8 tasks")

  if FLAGS["length-profile"].value:
    lp = length_profile(config, method, b, m, t, library_dir)
    results["length_profile"] = lp
    say(f"length profile '{lp['profile']}' (approximate lognormal: median {lp['median']}, p95 {lp['p95']} "
        f"tokens; mean {lp['real_input_tokens_per_example']:.1f} real input tokens per example), "
        f"{lp['batches']} batches of {b}, the same examples each way, interleaved:")
    labels = {"fixed": f"fixed padding to {lp['feature_length']} (T5X)",
              "peft_dynamic": "HF PEFT, dynamic padding to each batch's longest",
              "buckets": f"ours, length buckets {lp['bucket_shapes']}"}
    for mode, label in labels.items():
      if mode in lp:
        r = lp[mode]
        say(f"  {label}: {r['examples_per_s']:.2f} examples/s ({r['total_s']:.1f} s in all; "
            f"{r['padded_input_tokens_per_example']:.1f} padded input tokens per example)")
    say(f"  buckets vs fixed padding: {lp['buckets_vs_fixed']:.2f}x examples/s" + (
        f"; vs HF PEFT dynamic padding: {lp['buckets_vs_peft_dynamic']:.2f}x"
        if "buckets_vs_peft_dynamic" in lp else f" (no HF PEFT counterpart for {method})"))

  if FLAGS["rank-eval"].value:
    rk = rank_eval(setup, b, n, t, FLAGS.options)
    results["rank_eval"] = rk
    say(f"rank classification, {b} inputs x {rk['options']} label words, inputs {n} tokens, interleaved:")
    say(f"  row per option (score_batch on {b * rk['options']} rows): "
        f"{rk['row_per_option']['examples_per_s']:.1f} inputs/s; one encoder pass per input "
        f"(score_options): {rk['encode_once']['examples_per_s']:.1f} inputs/s; {rk['speedup']:.2f}x "
        f"(median per-round ratio); largest score difference {rk['max_score_difference']:.2e}")

  if FLAGS["compare-peft"].value:
    adapter, reason = peft_export(setup)
    if adapter is None:
      results["peft"] = dict(unavailable=reason)
      say(f"--compare-peft: {method} has no HF PEFT counterpart: {reason}")
    else:
      p = bench_peft(setup, config, adapter, FLAGS.steps, FLAGS.warmup)
      results["peft"] = p
      needed = results["train"]["flops_needed"] if "train" in results else (
          flops_lib.train_step_flops(config, deltas, b, n, t).total)
      pt = p["train"]["median_s"]
      say(f"HF PEFT (torch {p['torch']}, peft {p['peft']}, {p['threads']} threads), our export loaded as "
          f"its {p['peft_type']} adapter, {p['trainable_params']:,} trainable parameters; its logits differ "
          f"from ours by {p['logits_rel_error']:.1e} (relative):")
      say(f"  train {1000 * pt:.1f} ms/step (median of {len(p['train']['times_s'])}; min "
          f"{1000 * p['train']['min_s']:.1f}), {b * (n + t) / pt:.0f} tokens/s, "
          f"{needed / pt / 1e9:.1f} GFLOP/s = {100 * needed / pt / rate:.0f}% of matmul; peak RSS "
          f"{gib(p['rss_peak'])} (+{gib(p['rss_growth'])} during its steps)")
      say(f"  score {1000 * p['score']['median_s']:.1f} ms/batch")
      if "train" in results:
        say(f"  ours vs HF PEFT: train step {pt / results['train']['median_s']:.2f}x faster (timed one after "
            "the other)")
        vs = versus_peft(setup, config, adapter, FLAGS.steps, FLAGS.warmup)
        results["versus_peft"] = vs
        floor = results["train"].get("profile", {}).get("matmul_floor", {}).get("seconds")
        say(f"  interleaved round-robin: ours {1000 * vs['ours']['median_s']:.1f} ms, HF PEFT "
            f"{1000 * vs['peft']['median_s']:.1f} ms: ours {vs['peft_over_ours']:.2f}x faster (median of the "
            "per-round ratios)" + (f"; ours = {vs['ours']['median_s'] / floor:.2f}x the matmul floor"
                                   if floor else ""))
      if "score" in results:
        say(f"  ours vs HF PEFT: scoring {p['score']['median_s'] / results['score']['median_s']:.2f}x "
            "faster")
  results["load_average_end"] = load_average()
  say(f"load average at the end {results['load_average_end']:.2f}")
  return results


def mixed_task(config, method: str, b: int, n: int, m: int, t: int, library_dir: str) -> dict:
  """Mixed-task batches, with a bank of 8 (NUM_TASKS = 8, task_ids 0..7 cycled over the batch) of
  `method`'s per-task leaves. Two comparisons, each timed interleaved:

  - 'bank' vs 'single': training and scoring with the bank against the single-task method (NUM_TASKS as
    its gin file has it) on the same shapes (does the per-example gather cost anything?);
  - serving: the mixed batch scored and greedily decoded in one call each, against the same examples
    served task by task (8 calls on the B/8 examples of each task), as a server without mixed-task
    batches must do.
  """
  setups, steps, scores = {}, {}, {}
  for name, num_tasks in (("single", None), ("bank", 8)):
    deltas = make_deltas(method, m, n, t, config.emb_dim, library_dir, num_tasks=num_tasks)
    batch = make_batch(b, n, t, config.vocab_size, task_ids=None if num_tasks is None else
                       np.arange(b) % num_tasks)
    setups[name] = setup = build(config, deltas, batch, eos_id=-1)
    steps[name] = compile_train_step(setup)
    scores[name] = score_call(setup)
  train = interleaved({k: v.call for k, v in steps.items()}, FLAGS.steps, FLAGS.warmup)
  score = interleaved(scores, FLAGS.steps, FLAGS.warmup)
  out = {name: dict(train=bench_train(setups[name], config, FLAGS.steps, FLAGS.warmup,
                                      train_step=steps[name], timing=train[name]),
                    score=score[name]) for name in setups}
  out["paired_ratio"] = dict(train=train["paired_ratio"]["bank"], score=score["paired_ratio"]["bank"])
  if b % 8 == 0:
    out["serving"] = serving(setups["bank"], t)
  return out


def serving(setup: Setup, length: int) -> dict:
  """One mixed-task batch against the same examples task by task: scoring and greedy decoding."""
  model, variables, batch = setup.model, setup.variables, setup.batch
  task_ids = np.asarray(batch["task_ids"])
  per_task = [{k: v[task_ids == k_task] for k, v in batch.items()} for k_task in range(8)]
  score = jax.jit(model.score_batch)
  predict = jax.jit(lambda v, x: model.predict_batch(v, x, decoder="greedy", max_decode_length=length)[0])
  out = {}
  for kind, f in (("score", score), ("greedy", predict)):
    calls = {"task_by_task": lambda f=f: jax.block_until_ready([f(variables, x) for x in per_task]),
             "mixed": lambda f=f: f(variables, batch).block_until_ready()}
    timing = interleaved(calls, FLAGS.steps if kind == "score" else max(3, FLAGS.steps // 2), 1)
    out[kind] = dict(task_by_task=timing["task_by_task"], mixed=timing["mixed"],
                     speedup=1 / timing["paired_ratio"]["mixed"])
  return out


def run_sweep(kind: str) -> None:
  values = [int(v) for v in (FLAGS.sweep_values or SWEEPS[kind])]
  passthrough = [a for a in sys.argv[1:] if not a.startswith(("--sweep", "--json", "--compare-peft",
                                                              "--mixed-task", "--profile", "--versus"))]
  rows = []
  for value in values:
    arg = f"--prompt={value}" if kind == "prompt" else f"--batch={value}"
    cmd = [sys.executable, os.path.abspath(__file__), *passthrough, arg, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode or not lines:
      print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
      raise SystemExit(f"sweep point {arg} failed (exit {proc.returncode})")
    r = json.loads(lines[-1][len(RESULT):])
    rows.append(r)
    tr = r.get("train", {})
    sc = r.get("score", {})
    print(f"{kind}={value}: " + (f"{1000 * tr['median_s']:.1f} ms/step, "
                                 f"{tr['flops_needed'] / tr['median_s'] / 1e9:.1f} GFLOP/s "
                                 f"({100 * tr['flops_needed'] / tr['median_s'] / r['matmul_flops_per_s']:.0f}%), "
                                 f"{tr['tokens_per_s']:.0f} tokens/s, peak {gib(tr['peak_memory'])}"
                                 if tr else "") +
          (f"; score {1000 * sc['median_s']:.1f} ms" if sc else "") +
          f"; load {r['load_average_start']:.2f}", flush=True)
  print()
  col = "prompt" if kind == "prompt" else "batch"
  print(f"| {col} | ms/step | tokens/s | GFLOP needed | GFLOP/s | % of matmul | peak RSS | "
        + ("score ms | greedy ms |" if rows and "score" in rows[0] else ""))
  print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if rows and "score" in rows[0] else ""))
  for r in rows:
    tr = r["train"]
    line = (f"| {r[col]} | {1000 * tr['median_s']:.1f} | {tr['tokens_per_s']:.0f} | "
            f"{tr['flops_needed'] / 1e9:.1f} | {tr['flops_needed'] / tr['median_s'] / 1e9:.1f} | "
            f"{100 * tr['flops_needed'] / tr['median_s'] / r['matmul_flops_per_s']:.0f}% | "
            f"{gib(tr['peak_memory'])} |")
    if "score" in r:
      line += f" {1000 * r['score']['median_s']:.1f} | {1000 * r['greedy']['median_s']:.1f} |"
    print(line)


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.sweep:
    run_sweep(FLAGS.sweep)
    return
  with tempfile.TemporaryDirectory() as library_dir:
    results = run_point(FLAGS.method, FLAGS.batch, FLAGS.prompt, library_dir)
  if FLAGS.json:
    for r in (results.get("train"), ):
      if r:
        r.pop("profile", None)
    print(RESULT + json.dumps(results, default=float))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(gin_utils.rewrite_gin_args(argv)))
