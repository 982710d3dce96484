"""(IA)^3: the method checks, its formula as a weight edit, and HF PEFT parity (PyTorch CPU).

The acceptance test of the plug-in contract: the method is one file (prompt_mix/peft/ia3.py) and one gin
file, and works through everything that reads the registry (binaries, parameter table, benchmark, export).
"""

import dataclasses
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as checks
from prompt_mix import export_formats
from prompt_mix import methods
from prompt_mix.peft import ia3 as ia3_lib
from prompt_mix.t5 import model as model_lib

SYNTHETIC = checks.synthetic_task_batch()


def _random_scales(variables, seed=1):
  leaves, tree = jax.tree_util.tree_flatten(variables["peft"])
  rng = np.random.RandomState(seed)
  leaves = [np.asarray(1.0 + 0.5 * rng.randn(*x.shape), np.float32) for x in leaves]
  return dict(variables, peft=jax.tree_util.tree_unflatten(tree, leaves))


def test_step_trains_only_the_vectors_and_loss_goes_down():
  variables, _ = checks.check_step_trains_only_method((ia3_lib.IA3(),), batch=SYNTHETIC)
  flat = model_lib.flatten(variables["peft"])
  cfg = checks.tiny_config()
  hk, ff = cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  attentions = cfg.num_encoder_layers + 2 * cfg.num_decoder_layers
  assert sum(x.size for x in flat.values()) == 2 * hk * attentions + ff * (
      cfg.num_encoder_layers + cfg.num_decoder_layers)
  assert all(np.all(x == 1.0) for x in flat.values())  # Ones: the backbone at init.
  checks.check_loss_goes_down((ia3_lib.IA3(),), learning_rate=0.1)


def test_cached_decoding_and_mixed_task_banks():
  delta = ia3_lib.IA3()
  checks.check_cached_equals_uncached((delta,))
  variables = checks.check_mixed_task_equals_task_by_task((dataclasses.replace(delta, num_tasks=3),), 3)
  assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(variables["peft"]))


def test_the_vectors_rescale_keys_values_and_the_ffn_hidden_activation():
  """Equal to the backbone with W_k, W_v columns scaled by l_k, l_v and W_o rows scaled by l_ff."""
  batch = checks.make_batch()
  model = checks.make_model((ia3_lib.IA3(),))
  variables = _random_scales(checks.init(model, batch))
  flat_peft = model_lib.flatten(variables["peft"])
  params = model_lib.flatten(variables["params"])
  edited = dict(params)
  for path, scale in flat_peft.items():
    module = path[:-len("/ia3/scale")]
    kernel = params[f"{module}/kernel"]
    edited[f"{module}/kernel"] = kernel * (scale[:, None] if module.endswith("/wo") else scale[None, :])
  backbone = checks.make_model(())
  expected = backbone.logits({"params": flax.traverse_util.unflatten_dict(edited, sep="/")}, batch)
  np.testing.assert_allclose(np.asarray(model.logits(variables, batch)), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)


def test_configuration_errors_name_the_value():
  with pytest.raises(ValueError, match="'k'"):
    ia3_lib.IA3(targets=("k",))
  with pytest.raises(ValueError, match="IA3.feedforward names 'wi'"):
    ia3_lib.IA3(feedforward=("wi",))


def test_the_registry_builds_it_from_its_gin_file():
  assert "ia3" in methods.names()
  (delta,) = methods.deltas("ia3")
  assert delta == ia3_lib.IA3()
  assert "ia3" in methods.markdown_table()


# ----------------------------------------------------------------------------------------- PEFT parity
HF_VOCAB, HF_CONFIG = checks.HF_VOCAB, checks.HF_CONFIG
_rel_err = checks.rel_err


@pytest.mark.parametrize("tied", [False, True])
def test_peft_from_pretrained_on_our_export_gives_our_logits(tmp_path, tied):
  """PEFT's IA3Config for T5 (target_modules k, v, wo; feedforward wo) loaded from what we export."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from prompt_mix.t5 import hf_checkpoint  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(HF_CONFIG, logits_via_embedding=tied,
                               mlp_activations=("relu",) if tied else HF_CONFIG.mlp_activations)
  rng = np.random.RandomState(0)
  enc = rng.randint(2, HF_VOCAB, (3, 7))
  enc[1, 4:] = 0
  tgt = rng.randint(2, HF_VOCAB, (3, 5))
  tgt[0, 3:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), int), tgt[:, :-1]], 1)
  batch = dict(encoder_input_tokens=jnp.asarray(enc), decoder_input_tokens=jnp.asarray(dec_in),
               decoder_target_tokens=jnp.asarray(tgt))
  model = model_lib.EncoderDecoderModel(config, (ia3_lib.IA3(),))
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
  params = jax.tree_util.tree_map(lambda x: np.asarray(0.5 * rng.randn(*x.shape), np.float32),
                                  variables["params"])
  variables = _random_scales(dict(variables, params=params))

  out = export_formats.save_peft_adapter(variables, model, tmp_path / "adapter")
  adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["peft_type"] == "IA3"
  assert (sorted(adapter_config["target_modules"]), adapter_config["feedforward_modules"]) == (
      ["k", "v", "wo"], ["wo"])
  hf = hf_checkpoint.hf_t5_model(config, params)
  wrapped = peft.PeftModel.from_pretrained(hf, out)
  wrapped.eval()
  # PEFT's own IA3Config builds the same layout: the same keys and shapes as our file.
  reference = peft.get_peft_model(hf_checkpoint.hf_t5_model(config, params), peft.IA3Config(
      task_type="SEQ_2_SEQ_LM", target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
  theirs_state = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
  _, ours_state = export_formats.read_peft_adapter(out)
  assert {k: tuple(v.shape) for k, v in ours_state.items()} == theirs_state

  ours = np.asarray(jax.jit(model.logits)(variables, batch))
  logits = checks.torch_logits(wrapped, enc, dec_in)
  real = tgt > 0  # Padded target positions are masked differently (T5X masks them as keys too).
  assert _rel_err(ours[real], logits[real]) < 1e-5
  plain = checks.torch_logits(wrapped, enc, dec_in, without_adapter=True)
  assert _rel_err(plain[real], logits[real]) > 1e-2  # The vectors are not a no-op at these values.

  # Read back: the same delta and leaves.
  delta, tree = export_formats.peft_adapter_delta_and_tree(out, config)
  assert delta == ia3_lib.IA3()
  for path, value in model_lib.flatten(variables["peft"]).items():
    np.testing.assert_array_equal(model_lib.flatten(tree)[path], value)
