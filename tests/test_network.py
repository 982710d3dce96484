"""The backbone: T5X's parameter tree, logical axes, cached decoding, remat and dtype policy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network

import method_checks


def test_tiny_tree_has_the_t5x_names_and_shapes():
  shapes = model_lib.flatten(network.param_shapes(config_lib.preset("tiny")))
  assert len(shapes) == 52
  assert shapes["encoder/layers_1/attention/query/kernel"].shape == (8, 12)
  assert shapes["decoder/layers_0/encoder_decoder_attention/out/kernel"].shape == (12, 8)
  assert shapes["decoder/layers_1/mlp/wi_1/kernel"].shape == (8, 16)
  assert shapes["decoder/logits_dense/kernel"].shape == (8, 32128)
  assert shapes["encoder/relpos_bias/rel_embedding"].shape == (4, 32)
  assert all(s.dtype == jnp.float32 for s in shapes.values())


def test_v1_0_is_relu_and_tied():
  shapes = model_lib.flatten(network.param_shapes(config_lib.preset("t5_small")))
  assert "decoder/logits_dense/kernel" not in shapes
  assert shapes["encoder/layers_5/mlp/wi/kernel"].shape == (512, 2048)
  assert "encoder/layers_6/mlp/wi/kernel" not in shapes
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == 60_506_624  # T5-small, published size.


def test_every_parameter_has_logical_axis_names():
  boxed = network.abstract_variables(config_lib.preset("tiny"))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == 52
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
  specs = model_lib.flatten(nn.get_partition_spec(boxed))
  assert tuple(specs["token_embedder/embedding"]) == ("vocab", "embed")
  assert tuple(specs["encoder/layers_0/attention/query/kernel"]) == ("embed", "joined_kv")
  assert tuple(specs["decoder/layers_0/mlp/wo/kernel"]) == ("mlp", "embed")


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_heads=3, head_dim=5, num_encoder_layers=1, num_decoder_layers=3),  # h*d_kv != d, unequal
    dict(mlp_activations=("relu",), logits_via_embedding=True),
])
def test_cached_decoding_equals_uncached(overrides):
  method_checks.check_cached_equals_uncached((), **overrides)


def test_beam_search_with_one_beam_equals_greedy():
  model = method_checks.make_model(())
  batch = method_checks.make_batch()
  variables = method_checks.init(model, batch)
  batch = dict(batch, decoder_input_tokens=jnp.zeros((4, 5), jnp.int32))
  greedy, _ = model.predict_batch(variables, batch, decoder="greedy")
  beam, _ = model.predict_batch(variables, batch, decoder="beam", num_decodes=1)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(beam))


def test_beam_search_scores_at_least_greedy():
  model = method_checks.make_model(())
  batch = method_checks.make_batch()
  variables = method_checks.init(model, batch)
  batch = dict(batch, decoder_input_tokens=jnp.zeros((4, 5), jnp.int32))
  _, greedy = model.predict_batch(variables, batch, decoder="greedy")
  beams, aux = model.predict_batch(variables, batch, decoder="beam", num_decodes=4, alpha=0.0,
                                   return_all_decodes=True)
  assert beams.shape == (4, 4, 5)
  # With alpha = 0 beam scores are plain log-probabilities: the best beam is at least as likely.
  assert np.all(np.asarray(aux["scores"][:, -1]) >= np.asarray(greedy["scores"]) - 1e-4)


def test_sampling_stops_at_eos_and_pads():
  model = method_checks.make_model(())
  batch = method_checks.make_batch()
  variables = method_checks.init(model, batch)
  batch = dict(batch, decoder_input_tokens=jnp.zeros((4, 8), jnp.int32))
  out, _ = model.predict_batch(variables, batch, decoder="sample", temperature=1.0, topk=5,
                               rng=jax.random.PRNGKey(0))
  out = np.asarray(out)
  for row in out:
    eos = np.where(row == 1)[0]
    if len(eos):
      assert np.all(row[eos[0] + 1:] == 0)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  batch = method_checks.make_batch()
  plain = method_checks.make_model(())
  rematted = method_checks.make_model((), remat=remat)
  variables = method_checks.init(plain, batch)
  grad = lambda m: jax.grad(lambda p: m.loss_fn(dict(variables, params=p), batch)[0])(
      variables["params"])
  g1, g2 = grad(plain), grad(rematted)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_activations_keep_float32_params():
  batch = method_checks.make_batch()
  model = method_checks.make_model((), dtype="bfloat16")
  variables = method_checks.init(model, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"]))
  logits = model.logits(variables, batch)
  assert logits.dtype == jnp.float32  # T5X computes the output layer in float32 (see below).
  reference = method_checks.make_model(()).logits(variables, batch)
  np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_logits_are_computed_in_float32_as_t5x(tied):
  """T5X: `Embed(attend_dtype=float32)` and `logits_dense` with dtype float32 under bfloat16 activations.

  The reference restated from T5X: the decoder's (bfloat16) output cast to float32, times the float32
  embedding (/ sqrt(d), tied) or the float32 `logits_dense` kernel (untied), in float32.
  """
  batch = method_checks.make_batch()
  model = method_checks.make_model((), dtype="bfloat16", logits_via_embedding=tied)
  variables = method_checks.init(model, batch)
  logits, state = model.module.apply(
      variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=False, capture_intermediates=True,
      mutable=["intermediates"])
  decoder_out = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
  assert decoder_out.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  x = np.asarray(decoder_out, np.float32)
  params = variables["params"]
  if tied:
    expected = x @ np.asarray(params["token_embedder"]["embedding"]).T / np.sqrt(np.float32(x.shape[-1]))
  else:
    expected = x @ np.asarray(params["decoder"]["logits_dense"]["kernel"])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_loss_options():
  batch = method_checks.make_batch()
  model = method_checks.make_model(())
  variables = method_checks.init(model, batch)
  base, aux = model.loss_fn(variables, batch)
  n_tokens = float(np.sum(batch["decoder_loss_weights"]))
  assert float(aux["weight_sum"]) == n_tokens
  summed = model_lib.EncoderDecoderModel(model.config, loss_normalizing_factor=None, z_loss=0.0)
  np.testing.assert_allclose(float(summed.loss_fn(variables, batch)[0]), float(base) * n_tokens,
                             rtol=1e-5)
  with_z = model_lib.EncoderDecoderModel(model.config, z_loss=1e-2)
  loss_z, aux_z = with_z.loss_fn(variables, batch)
  assert float(aux_z["z_loss"]) > 0
  np.testing.assert_allclose(float(loss_z) - float(aux_z["z_loss"]), float(base), rtol=1e-5)
  # Score = minus the (unnormalized, unsmoothed, z-free) loss, per example.
  scores = model.score_batch(variables, batch)
  np.testing.assert_allclose(-float(jnp.sum(scores)), float(base) * n_tokens, rtol=1e-5)
  smoothed = model_lib.EncoderDecoderModel(model.config, label_smoothing=0.1, z_loss=0.0)
  assert float(smoothed.loss_fn(variables, batch)[0]) != pytest.approx(float(base))


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(ValueError, match="t5_1_1_base"):
    config_lib.preset("t5_1_1_bsae")


@pytest.mark.parametrize("name", ["tiny", "t5_small", "t5_1_1_small", "mt5_small", "t5_3B"])
def test_loader_contract_equals_the_model_tree(name):
  from prompt_mix.t5 import checkpoints
  config = config_lib.preset(name)
  expected = model_lib.flatten(checkpoints.expected_param_shapes(config))
  actual = model_lib.flatten(network.param_shapes(config))
  assert expected.keys() == actual.keys()
  for key in expected:
    assert expected[key].shape == actual[key].shape, key
