"""LoRA: the method checks, HF PEFT parity (PyTorch CPU) and the PEFT name mapping.

Mixed-task banks and cached decoding are checked with the other unified-view deltas in test_mam.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as checks
from prompt_mix.peft import lora as lora_lib
from prompt_mix.t5 import model as model_lib

SYNTHETIC = checks.synthetic_task_batch()


def test_step_trains_only_lora():
  # With B = 0 the A matrices get no gradient on the first step; PEFT's init_lora_weights=False (B
  # random too) makes every leaf move at once. The default init is trained in test_loss_goes_down.
  checks.check_step_trains_only_method((lora_lib.LoRA(rank=4, init_lora_weights=False),), batch=SYNTHETIC)


def test_loss_goes_down_from_zero_b():
  checks.check_loss_goes_down((lora_lib.LoRA(rank=4),))


def test_fresh_lora_gives_exactly_the_backbone_and_merging_folds_it():
  batch = checks.make_batch()
  delta = lora_lib.LoRA(rank=2, alpha=6.0, targets=lora_lib.PROJECTIONS)
  model = checks.make_model((delta,))
  variables = checks.init(model, batch)
  backbone = checks.make_model(())
  expected = np.asarray(backbone.logits({"params": variables["params"]}, batch))
  np.testing.assert_array_equal(np.asarray(model.logits(variables, batch)), expected)

  peft = jax.tree_util.tree_map(lambda x: x + 0.2, variables["peft"])
  adapted = np.asarray(model.logits(dict(variables, peft=peft), batch))
  merged = lora_lib.merge_into_backbone(variables["params"], peft, delta)
  np.testing.assert_allclose(np.asarray(backbone.logits({"params": merged}, batch)), adapted,
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(adapted, expected)


def test_selection_scale_and_init():
  delta = lora_lib.LoRA(rank=3, alpha=12, targets=["key", "wo"], stacks=["decoder"],
                        attentions="cross_attention", layers=[0])
  assert delta.scale == 4.0
  model = checks.make_model((delta,))
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), checks.make_batch()))
  flat = model_lib.flatten(variables["peft"])
  assert set(flat) == {
      "decoder/layers_0/encoder_decoder_attention/key/lora/a",
      "decoder/layers_0/encoder_decoder_attention/key/lora/b",
      "decoder/layers_0/mlp/wo/lora/a", "decoder/layers_0/mlp/wo/lora/b"}
  a, b = flat["decoder/layers_0/mlp/wo/lora/a"], flat["decoder/layers_0/mlp/wo/lora/b"]
  assert a.shape == (16, 3) and b.shape == (3, 8)  # wo: [mlp, d]
  assert np.all(b == 0)
  bound = 1 / np.sqrt(16)  # PEFT's lora_A: kaiming_uniform(a=sqrt(5)) over fan_in = 16.
  assert 0.7 * bound < np.abs(a).max() <= bound


def test_bad_options_name_the_value():
  with pytest.raises(ValueError, match="'q'"):
    lora_lib.LoRA(targets=("q",))
  with pytest.raises(ValueError, match="'mlp' is not an attention"):
    lora_lib.LoRA(attentions=("mlp",))
  with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
    lora_lib.LoRA(rank=0)
  with pytest.raises(ValueError, match="'kaiming'"):
    lora_lib.LoRA(init_lora_weights="kaiming")


# ----------------------------------------------------------------------------------------- PEFT parity
HF_VOCAB, HF_CONFIG = checks.HF_VOCAB, checks.HF_CONFIG
_rel_err = checks.rel_err


def test_logits_match_hf_peft_lora(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from prompt_mix.t5 import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_mix.t5 import hf_checkpoint  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  hf = hf_checkpoint.hf_t5_model(HF_CONFIG)
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.5)
  hf.save_pretrained(tmp_path)
  params, config = checkpoints.load_backbone(tmp_path, config=HF_CONFIG)

  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0))
  peft_model.eval()
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.5)
  saved = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(peft_model).items()}

  delta = lora_lib.LoRA(rank=4, alpha=8.0, targets=("query", "value"))
  model = model_lib.EncoderDecoderModel(config, (delta,))
  rng = np.random.RandomState(0)
  enc = rng.randint(2, HF_VOCAB, (3, 7))
  enc[1, 4:] = 0
  enc[2, 6:] = 0
  tgt = rng.randint(2, HF_VOCAB, (3, 5))
  tgt[0, 3:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), int), tgt[:, :-1]], 1)
  batch = dict(encoder_input_tokens=jnp.asarray(enc), decoder_input_tokens=jnp.asarray(dec_in),
               decoder_target_tokens=jnp.asarray(tgt))

  # Our init gives exactly the tree the PEFT file maps to: 2 projections x (2 + 3 + 3) attentions.
  expected = model_lib.flatten(nn.unbox(model.abstract_init(batch)["peft"]))
  ours = lora_lib.from_peft_state_dict(saved)
  flat = model_lib.flatten(ours)
  assert len(flat) == 2 * 2 * 8
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in expected.items()}
  # The mapping names PEFT's in-memory parameters too, and round-trips.
  for name, p in peft_model.named_parameters():
    if "lora_" in name:
      path = lora_lib.our_path(name)
      np.testing.assert_array_equal(flat[path], p.detach().numpy().T)
      assert lora_lib.peft_key(path) in saved
  exported = lora_lib.to_peft_state_dict(ours)
  assert exported.keys() == saved.keys()
  for key in saved:
    np.testing.assert_array_equal(exported[key], saved[key])

  logits = np.asarray(jax.jit(model.logits)({"params": params, "peft": ours}, batch))
  hf_logits = checks.torch_logits(peft_model, enc, dec_in)
  real = tgt > 0  # Padded target positions are masked differently (T5X masks them as keys too).
  assert _rel_err(logits[real], hf_logits[real]) < 1e-5
  # The LoRA is not a no-op at these values: the backbone alone is far off.
  plain = checks.torch_logits(peft_model, enc, dec_in, without_adapter=True)
  assert _rel_err(plain[real], hf_logits[real]) > 1e-2


def test_peft_names():
  cases = {
      "encoder/layers_0/attention/query/lora/a":
          "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
      "decoder/layers_2/self_attention/value/lora/b":
          "base_model.model.decoder.block.2.layer.0.SelfAttention.v.lora_B.weight",
      "decoder/layers_1/encoder_decoder_attention/out/lora/a":
          "base_model.model.decoder.block.1.layer.1.EncDecAttention.o.lora_A.weight",
      "encoder/layers_3/mlp/wi/lora/b":
          "base_model.model.encoder.block.3.layer.1.DenseReluDense.wi.lora_B.weight",
      "decoder/layers_0/mlp/wi_1/lora/a":
          "base_model.model.decoder.block.0.layer.2.DenseReluDense.wi_1.lora_A.weight",
      "decoder/logits_dense/lora/b": "base_model.model.lm_head.lora_B.weight",
  }
  for path, key in cases.items():
    assert lora_lib.peft_key(path) == key
    assert lora_lib.our_path(key) == path
    assert lora_lib.our_path(key.replace(".weight", ".default.weight")) == path
  assert lora_lib.our_path(cases["decoder/logits_dense/lora/b"], name="lora_ffn") == (
      "decoder/logits_dense/lora_ffn/b")
  with pytest.raises(ValueError, match="'encoder/layers_0/attention/wo/lora/a'"):
    lora_lib.peft_key("encoder/layers_0/attention/wo/lora/a")
  with pytest.raises(ValueError, match="block index 1 does not hold SelfAttention"):
    lora_lib.our_path("encoder.block.0.layer.1.SelfAttention.q.lora_A.weight")
  with pytest.raises(ValueError, match="not an HF PEFT LoRA key"):
    lora_lib.our_path("encoder.block.0.layer.0.SelfAttention.q.weight")
