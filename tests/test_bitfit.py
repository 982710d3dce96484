"""BitFit: the method checks, zero-initialized biases on exactly the dense layers.

Mixed-task banks and cached decoding are checked with the other unified-view deltas in test_mam.py.
"""

import jax
import numpy as np
import pytest

import method_checks as checks
from prompt_mix.peft import bitfit
from prompt_mix.t5 import model as model_lib


def test_step_trains_only_the_biases():
  checks.check_step_trains_only_method((bitfit.BitFit(),), batch=checks.synthetic_task_batch())


def test_loss_goes_down():
  checks.check_loss_goes_down((bitfit.BitFit(),))


def test_dense_targets_put_a_bias_on_every_dense_layer_zero_at_init():
  batch = checks.make_batch()
  model = checks.make_model((bitfit.BitFit(targets=("dense",)),))
  variables = checks.init(model, batch)
  kernels = {p[: -len("/kernel")]: v.shape for p, v in model_lib.flatten(variables["params"]).items()
             if p.endswith("/kernel")}
  biases = {p[: -len("/bitfit/bias")]: v for p, v in model_lib.flatten(variables["peft"]).items()}
  assert biases.keys() == kernels.keys()  # Every dense layer, logits_dense included (tiny is v1.1).
  for path, bias in biases.items():
    assert bias.shape == (kernels[path][1],), path
    assert not np.any(bias), path
  backbone = checks.make_model(())
  np.testing.assert_array_equal(np.asarray(model.logits(variables, batch)),
                                np.asarray(backbone.logits({"params": variables["params"]}, batch)))
  # A bias adds to its projection's output: on logits_dense it shifts every position's logits.
  peft = jax.tree_util.tree_map(np.zeros_like, variables["peft"])
  peft["decoder"]["logits_dense"]["bitfit"]["bias"] = np.arange(checks.VOCAB, dtype=np.float32)
  shifted = np.asarray(model.logits(dict(variables, peft=peft), batch))
  np.testing.assert_allclose(shifted - np.asarray(model.logits(variables, batch)),
                             np.broadcast_to(np.arange(checks.VOCAB), shifted.shape), atol=1e-4)


def test_selection_and_bad_options():
  model = checks.make_model((bitfit.BitFit(targets=["wo"], stacks="encoder"),))
  paths = set(model_lib.flatten(model.abstract_init(checks.make_batch())["peft"]))
  assert paths == {"encoder/layers_0/mlp/wo/bitfit/bias", "encoder/layers_1/mlp/wo/bitfit/bias"}
  with pytest.raises(ValueError, match="'bias'"):
    bitfit.BitFit(targets=("bias",))


@pytest.mark.parametrize("tied", [False, True])
def test_default_is_the_attempt_baseline_dense_norms_and_lm_head(tied):
  """Biases on every dense layer, every layer norm and the output layer, zero at init (the backbone)."""
  batch = checks.make_batch()
  model = checks.make_model((bitfit.BitFit(),), logits_via_embedding=tied)
  variables = checks.init(model, batch)
  params = model_lib.flatten(variables["params"])
  biases = {p[: -len("/bitfit/bias")]: v for p, v in model_lib.flatten(variables["peft"]).items()}
  wrapped = {p.rsplit("/", 1)[0]: v.shape[-1] for p, v in params.items()
             if p.endswith("/kernel") or p.endswith("/scale")}
  head = {"decoder": checks.VOCAB} if tied else {}  # Tied: the bias of x E^T / sqrt(d), in the decoder.
  assert {p: b.shape[0] for p, b in biases.items()} == {**wrapped, **head}
  assert not any(np.any(b) for b in biases.values())
  backbone = checks.make_model((), logits_via_embedding=tied)
  np.testing.assert_array_equal(np.asarray(model.logits(variables, batch)),
                                np.asarray(backbone.logits({"params": variables["params"]}, batch)))
  # The LM-head bias shifts every position's logits, tied or not.
  peft = jax.tree_util.tree_map(np.zeros_like, variables["peft"])
  head_bias = peft["decoder"]["bitfit"] if tied else peft["decoder"]["logits_dense"]["bitfit"]
  head_bias["bias"] = np.arange(checks.VOCAB, dtype=np.float32)
  shifted = np.asarray(model.logits(dict(variables, peft=peft), batch))
  np.testing.assert_allclose(shifted - np.asarray(model.logits(variables, batch)),
                             np.broadcast_to(np.arange(checks.VOCAB), shifted.shape), atol=1e-4)
