"""Houlsby, parallel and scaled parallel adapters: the method checks, the formulas, selection.

Mixed-task banks and cached decoding are checked with the other unified-view deltas in test_mam.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as checks
from prompt_mix.peft import adapters
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import plugins

ADAPTERS = {
    "houlsby": adapters.HoulsbyAdapter(bottleneck=4),
    "parallel": adapters.ParallelAdapter(bottleneck=4, sublayers=("attention", "mlp")),
    "scaled_parallel": adapters.ScaledParallelAdapter(bottleneck=4, sublayers=("attention", "mlp")),
}


def test_step_trains_only_the_adapters():
  # The three kinds side by side (distinct names), one step. With `up` zero, `down` gets no gradient on
  # the very first step; the 'bert' init (normal 0.02 for both kernels) makes every leaf move at once.
  # The default (identity) init is trained in test_loss_goes_down_from_the_identity_init.
  deltas = tuple(dataclasses.replace(delta, init="bert", name=name) for name, delta in ADAPTERS.items())
  _, new = checks.check_step_trains_only_method(deltas, batch=checks.synthetic_task_batch())
  flat = model_lib.flatten(new["peft"])
  for name in ADAPTERS:
    assert f"decoder/layers_1/cross_attention_{name}/down/kernel" in flat
    assert f"encoder/layers_0/mlp_{name}/up/bias" in flat


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_loss_goes_down_from_the_identity_init(name):
  # s = 4 multiplies the adapter's step: a smaller learning rate for the same effective one.
  checks.check_loss_goes_down((ADAPTERS[name],), learning_rate=0.05 / ADAPTERS[name].scale)


def test_fresh_adapters_give_exactly_the_backbone():
  """With 'lora' init (`up` zero) a fresh adapter is the identity; He et al.'s Houlsby runs use 'bert'."""
  assert ADAPTERS["houlsby"].init == "bert" and ADAPTERS["parallel"].init == "lora"
  batch = checks.make_batch()
  backbone = checks.make_model(())
  variables = checks.init(backbone, batch)
  expected = np.asarray(backbone.logits(variables, batch))
  for delta in ADAPTERS.values():
    delta = dataclasses.replace(delta, init="lora")
    model = checks.make_model((delta,))
    peft = checks.init(model, batch)["peft"]
    got = np.asarray(model.logits({"params": variables["params"], "peft": peft}, batch))
    np.testing.assert_array_equal(got, expected, err_msg=type(delta).__name__)


def _apply(delta_module, x_normed, y, seed=0):
  """Initializes and applies one adapter module alone; returns (output, flat peft leaves)."""
  ctx = plugins.Context(task_ids=None, embedding=jnp.zeros((1, 1)), batch_size=x_normed.shape[0])
  residual = x_normed + 1.0  # The sublayer's residual input (the adapters here do not read it).
  variables = delta_module.init(jax.random.PRNGKey(seed), residual, x_normed, y, ctx)
  peft = jax.tree_util.tree_map(lambda v: v + 0.1, nn.unbox(variables["peft"]))  # Non-zero `up`.
  return delta_module.apply({"peft": peft}, residual, x_normed, y, ctx), model_lib.flatten(peft)


@pytest.mark.parametrize("parallel,scale,parallel_input", [
    (False, 1.0, "residual"), (True, 1.0, "residual"), (True, 4.0, "residual"), (True, 4.0, "normed")])
def test_adapter_formula(parallel, scale, parallel_input):
  """Sequential: reads the block's output; parallel: its residual input (He et al.) or its normed input."""
  rng = np.random.RandomState(0)
  x_normed, y = (jnp.asarray(rng.randn(2, 3, 8), jnp.float32) for _ in range(2))
  module = adapters.AdapterModule(5, parallel=parallel, parallel_input=parallel_input, scale=scale)
  out, p = _apply(module, x_normed, y)
  residual = np.asarray(x_normed) + 1.0  # What `_apply` hands as the residual input.
  src = (residual if parallel_input == "residual" else np.asarray(x_normed)) if parallel else np.asarray(y)
  hidden = np.maximum(src @ p["down/kernel"] + p["down/bias"], 0.0)
  expected = np.asarray(y) + scale * (hidden @ p["up/kernel"] + p["up/bias"])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_init_follows_he_et_al():
  x = jnp.ones((1, 2, 64))
  module = adapters.AdapterModule(16)
  ctx = plugins.Context(task_ids=None, embedding=jnp.zeros((1, 1)), batch_size=1)
  p = model_lib.flatten(nn.unbox(module.init(jax.random.PRNGKey(0), x, x, x, ctx)["peft"]))
  assert np.all(p["up/kernel"] == 0) and np.all(p["up/bias"] == 0) and np.all(p["down/bias"] == 0)
  bound = 1 / np.sqrt(64)  # kaiming_uniform(a=sqrt(5)) of a [64 -> 16] Linear.
  assert np.abs(p["down/kernel"]).max() <= bound and np.abs(p["down/kernel"]).max() > 0.8 * bound


def _peft_paths(delta):
  model = checks.make_model((delta,))
  return set(model_lib.flatten(nn.unbox(model.abstract_init(checks.make_batch())["peft"])))


def test_selection_by_sublayer_stack_and_layer():
  paths = _peft_paths(adapters.HoulsbyAdapter(bottleneck=2, sublayers=("cross_attention",)))
  assert {p.rsplit("/", 2)[0] for p in paths} == {
      "decoder/layers_0/cross_attention_adapter", "decoder/layers_1/cross_attention_adapter"}
  paths = _peft_paths(adapters.ParallelAdapter(bottleneck=2, sublayers="self_attention",
                                               stacks=["decoder"], layers=[-1], use_bias=False))
  assert paths == {"decoder/layers_1/self_attention_adapter/down/kernel",
                   "decoder/layers_1/self_attention_adapter/up/kernel"}
  paths = _peft_paths(adapters.ScaledParallelAdapter(bottleneck=2, stacks=("encoder",), name="pa"))
  assert {p.rsplit("/", 2)[0] for p in paths} == {"encoder/layers_0/mlp_pa", "encoder/layers_1/mlp_pa"}


def test_two_adapters_compose_at_one_sublayer():
  deltas = (adapters.HoulsbyAdapter(bottleneck=2, sublayers=("mlp",)),
            adapters.ScaledParallelAdapter(bottleneck=3, name="pa"))
  paths = set(model_lib.flatten(nn.unbox(
      checks.make_model(deltas).abstract_init(checks.make_batch())["peft"])))
  assert "encoder/layers_1/mlp_adapter/down/kernel" in paths
  assert "encoder/layers_1/mlp_pa/down/kernel" in paths


def test_bad_options_name_the_value():
  with pytest.raises(ValueError, match="'ffn'"):
    adapters.HoulsbyAdapter(sublayers=("ffn",))
  with pytest.raises(ValueError, match="'middle'"):
    adapters.ParallelAdapter(stacks=("middle",))
  with pytest.raises(ValueError, match="bottleneck must be >= 1, got 0"):
    adapters.ScaledParallelAdapter(bottleneck=0)
  with pytest.raises(ValueError, match="'xavier'"):
    adapters.HoulsbyAdapter(init="xavier")
  with pytest.raises(ValueError, match="HoulsbyAdapter.layers is empty"):
    adapters.HoulsbyAdapter(layers=[])
  with pytest.raises(ValueError, match=r"HoulsbyAdapter.layers=\('last',\): expected \('first', k\) or \('last', k\)"):
    adapters.HoulsbyAdapter(layers=["last"])
  with pytest.raises(ValueError, match="5 is out of range for the encoder stack of 2 layers"):
    _peft_paths(adapters.HoulsbyAdapter(layers=(5,)))


def test_adapter_input_layer_norm_is_pytorchs():
  """layer_norm='in': PyTorch's nn.LayerNorm (scale, bias, eps 1e-5) on the adapter's input."""
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(1)
  x_normed, y = (jnp.asarray(rng.randn(2, 3, 8), jnp.float32) for _ in range(2))
  out, p = _apply(adapters.AdapterModule(5, layer_norm="in"), x_normed, y)
  norm = torch.nn.LayerNorm(8, eps=1e-5)
  with torch.no_grad():
    norm.weight.copy_(torch.tensor(np.asarray(p["layer_norm_scale"])))
    norm.bias.copy_(torch.tensor(np.asarray(p["layer_norm_bias"])))
    normed = norm(torch.tensor(np.asarray(y))).numpy()
  hidden = np.maximum(normed @ p["down/kernel"] + p["down/bias"], 0.0)
  expected = np.asarray(y) + hidden @ p["up/kernel"] + p["up/bias"]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
