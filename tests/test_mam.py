"""MAM adapter (prefix tuning + scaled parallel adapter) and other compositions of the unified view."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np

import method_checks as checks
from prompt_mix.peft import adapters
from prompt_mix.peft import bitfit
from prompt_mix.peft import full_finetune
from prompt_mix.peft import lora
from prompt_mix.peft import mam
from prompt_mix.peft import prefix_tuning
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import model as model_lib

SYNTHETIC = checks.synthetic_task_batch()


def _mam(**kwargs):
  return mam.mam_adapter(prefix_length=3, bottleneck=4, prefix_mlp_hidden=6, **kwargs)


def _random_method_variables(deltas, batch, scale=0.05, seed=1):
  """The tiny backbone's initial variables plus method leaves drawn from `scale` * N(0, 1).

  Drawn with NumPy on the shapes of `abstract_init` (cheaper than an eager Flax init of every delta), so
  zero-initialized deltas (adapters' `up`, LoRA's B, BitFit) act.
  """
  abstract = nn.unbox(checks.make_model(deltas).abstract_init(batch))
  rng = np.random.RandomState(seed)
  peft = jax.tree_util.tree_map(lambda x: (scale * rng.randn(*x.shape)).astype(np.float32),
                                abstract["peft"])
  return dict(checks.init(checks.make_model(()), batch), peft=peft)


def test_mam_is_prefix_plus_scaled_parallel_adapter():
  prefix, adapter = mam.mam_adapter()
  assert isinstance(prefix, prefix_tuning.PrefixTuning) and prefix.length == 30
  assert prefix.attentions == ("attention",) and prefix.stacks == ("encoder", "decoder")
  assert isinstance(adapter, adapters.ScaledParallelAdapter)
  assert (adapter.bottleneck, adapter.scale, adapter.sublayers) == (512, 4.0, ("mlp",))
  paths = set(model_lib.flatten(checks.make_model(_mam()).abstract_init(checks.make_batch())["peft"]))
  assert "decoder/prefix_tuning/cross_attention/embedding" in paths  # One shared MLP per attention kind.
  assert "encoder/layers_0/mlp_adapter/up/kernel" in paths
  assert not any("attention_adapter" in p for p in paths)


def test_mam_step_trains_only_the_method():
  prefix, adapter = _mam()  # 'bert' init: with `up` zero, `down` gets no gradient on the first step.
  checks.check_step_trains_only_method((prefix, dataclasses.replace(adapter, init="bert")), batch=SYNTHETIC)


def test_mam_loss_goes_down():
  checks.check_loss_goes_down(_mam(), learning_rate=0.01)


def _everything():
  """Every delta of the unified view in one model, plus prompt tuning: methods compose as deltas."""
  return (prompt_tuning.PromptTuning(length=2, init="uniform"),
          adapters.HoulsbyAdapter(bottleneck=2, name="houlsby"),
          adapters.ParallelAdapter(bottleneck=2, sublayers=("attention", "mlp"), name="pa"),
          lora.LoRA(rank=2, targets=lora.PROJECTIONS), bitfit.BitFit()) + _mam()


def test_prompt_tuning_plus_lora_and_the_rest_decode_with_the_cache():
  # Prompt tuning + LoRA + Houlsby + parallel + MAM (prefix + scaled parallel) + BitFit, and
  # FullFineTune (which plugs nothing in): cached greedy decoding equals the full forward.
  deltas = _everything() + (full_finetune.FullFineTune(),)
  batch = checks.make_batch()
  variables = _random_method_variables(deltas, batch)
  flat = model_lib.flatten(variables["peft"])
  assert flat["encoder/prompt_tuning/prompt"].shape == (2, 8)
  assert flat["decoder/layers_1/self_attention/value/lora/b"].shape == (2, 12)
  checks.check_cached_equals_uncached(deltas, batch=batch, variables=variables)
  plain = checks.make_model(()).logits({"params": variables["params"]}, batch)
  assert not np.allclose(checks.make_model(deltas).logits(variables, batch), plain)  # The deltas act.


def test_banks_of_three_tasks_mix_in_one_batch():
  # An adapter at every sublayer, LoRA and BitFit, each a bank of 3 (the parallel adapters share the
  # adapter's per-task path; prompt tuning's and prefix tuning's banks are checked in their own tests).
  deltas = (adapters.HoulsbyAdapter(bottleneck=2, num_tasks=3),
            lora.LoRA(rank=2, targets=("query", "value", "logits_dense"), num_tasks=3),
            bitfit.BitFit(num_tasks=3))
  variables = checks.check_mixed_task_equals_task_by_task(deltas, num_tasks=3)
  flat = model_lib.flatten(variables["peft"])
  assert flat["decoder/layers_1/cross_attention_adapter/down/kernel"].shape == (3, 8, 2)
  assert flat["encoder/layers_0/attention/value/lora/a"].shape == (3, 8, 2)
  assert flat["decoder/logits_dense/lora/b"].shape == (3, 2, checks.VOCAB)
  assert flat["decoder/logits_dense/bitfit/bias"].shape == (3, checks.VOCAB)
