"""Prompt tuning: the method checks, the four inits, masks, parameter counts, gin, and HF PEFT parity."""

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix.peft import prompt_tuning as pt
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network

from conftest import shared_path
import method_checks



def prompt(**kw):
  return pt.PromptTuning(**{"length": 3, "init": "uniform", **kw})


def leaf(variables, stack="encoder"):
  return np.asarray(variables["peft"][stack]["prompt_tuning"]["prompt"])


def embedding(variables):
  return np.asarray(variables["params"]["token_embedder"]["embedding"])


# ------------------------------------------------------------------------------------ method checks
def test_step_trains_only_the_prompt():
  variables, _ = method_checks.check_step_trains_only_method((prompt(),))
  assert list(model_lib.flatten(variables["peft"])) == ["encoder/prompt_tuning/prompt"]


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_cached_decoding_equals_uncached(stack):
  method_checks.check_cached_equals_uncached((prompt(stack=stack),))


def test_mixed_task_batch_equals_task_by_task():
  variables = method_checks.check_mixed_task_equals_task_by_task((prompt(num_tasks=3),), num_tasks=3)
  assert leaf(variables).shape == (3, 3, 8)


def test_loss_goes_down(monkeypatch):
  """The check on a wider tiny backbone (d = 32, 4 heads of 8), with Lester et al.'s large learning rate.

  On the default d = 8 backbone an input prompt cannot reach half the initial loss: the decoder's logits
  are an RMS-normed 8-dim state times a random frozen kernel, so they stay within a few nats whatever the
  prompt (3.44 -> 2.78 after 100 steps), while a prefix at every attention can (test_prefix_tuning).
  """
  wide = dict(emb_dim=32, head_dim=8, mlp_dim=64)
  make_model = method_checks.make_model
  monkeypatch.setattr(method_checks, "make_model", lambda deltas: make_model(deltas, **wide))
  method_checks.check_loss_goes_down((prompt(length=8),), steps=40, learning_rate=0.3)


def test_decoder_attends_to_the_prompt_positions():
  """The encoder mask grows by m ones (also for padded inputs) and cross-attention reads those rows."""
  model = method_checks.make_model((prompt(),))
  batch = method_checks.make_batch()  # Example 0 ends in padding.
  variables = method_checks.init(model, batch)
  module, enc = model.module, batch["encoder_input_tokens"]
  encoded, mask = module.apply(variables, enc, method=network.Transformer.encode)
  assert encoded.shape == (4, 3 + 6, 8) and mask.shape == (4, 9)
  np.testing.assert_array_equal(np.asarray(mask[:, :3]), True)
  np.testing.assert_array_equal(np.asarray(mask[:, 3:]), np.asarray(enc > 0))

  def logits(encoded, mask):
    return np.asarray(module.apply(variables, encoded, mask, batch["decoder_input_tokens"],
                                   batch["decoder_target_tokens"], method=network.Transformer.decode))

  base = logits(encoded, mask)
  np.testing.assert_allclose(base, np.asarray(model.logits(variables, batch)), rtol=1e-6, atol=1e-6)
  # Changing only the encoder outputs at the prompt positions changes the decoder's logits...
  assert not np.allclose(base, logits(encoded.at[:, :3].multiply(-1.0), mask), atol=1e-4)
  # ...unless the cross-attention mask hides them.
  hidden = mask.at[:, :3].set(False)
  np.testing.assert_allclose(logits(encoded, hidden), logits(encoded.at[:, :3].multiply(-1.0), hidden),
                             rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ inits
def init_variables(delta, vocab_size=method_checks.VOCAB, num_tasks=None):
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=vocab_size, dropout_rate=0.0),
                                        (delta,))
  batch = method_checks.make_batch(task_ids=None if num_tasks is None else np.zeros(4))
  return method_checks.init(model, batch)


def test_uniform_init_is_within_bounds():
  value = np.asarray(pt.uniform_init(0.5)(jax.random.PRNGKey(0), (100, 8)))
  assert value.min() >= -0.5 and value.max() <= 0.5 and value.std() > 0.2
  variables = init_variables(prompt(length=20))
  value = leaf(variables)
  assert value.shape == (20, 8) and value.min() >= -0.5 and value.max() <= 0.5


def assert_rows_of(value, table):
  """Each row of `value` is exactly a row of `table`; returns those row indices."""
  found = []
  for row in value:
    hits = np.where((table == row).all(axis=1))[0]
    assert len(hits), f"row {row} is not a row of the embedding"
    found.append(int(hits[0]))
  return found


def test_vocab_init_samples_rows_among_the_first_5000():
  variables = init_variables(prompt(length=30, init="vocab"), vocab_size=6000)
  rows = assert_rows_of(leaf(variables), embedding(variables))
  assert max(rows) < 5000 and len(set(rows)) == 30  # Without replacement.
  # A vocabulary smaller than 5000: the whole vocabulary is the population.
  variables = init_variables(prompt(length=10, init="vocab"))
  assert max(assert_rows_of(leaf(variables), embedding(variables))) < method_checks.VOCAB
  # A bank: each task samples its own rows.
  variables = init_variables(prompt(length=10, init="vocab", num_tasks=2), num_tasks=2)
  banks = leaf(variables)
  assert banks.shape == (2, 10, 8) and not np.array_equal(banks[0], banks[1])
  for value in banks:
    assert_rows_of(value, embedding(variables))


def test_vocab_init_reads_the_loaded_backbone():
  """`init_method` on a loaded backbone samples that backbone's embedding rows (not a random one's)."""
  model = method_checks.make_model((prompt(length=6, init="vocab"),))
  batch = method_checks.make_batch()
  params = method_checks.init(model, batch)["params"]
  loaded = np.random.RandomState(3).randn(method_checks.VOCAB, 8).astype(np.float32)
  params = dict(params, token_embedder={"embedding": jnp.asarray(loaded)})
  state = nn.unbox(model.init_method(jax.random.PRNGKey(0), params, batch))
  assert_rows_of(np.asarray(state["peft"]["encoder"]["prompt_tuning"]["prompt"]), loaded)


class FakeVocabulary:
  """A seqio.Vocabulary-like object: `encode(str) -> list[int]`."""

  PIECES = {"positive": [5, 7], "negative": [9], "neutral": [11, 12, 13]}

  def encode(self, text):
    return self.PIECES[text]


def test_class_label_init_is_the_mean_of_each_labels_pieces():
  labels = ("positive", "negative", "neutral")
  variables = init_variables(prompt(length=5, init="class_labels", class_labels=list(labels),
                                    vocabulary=FakeVocabulary()))
  value, table = leaf(variables), embedding(variables)
  for i, label in enumerate(labels):
    np.testing.assert_allclose(value[i], table[FakeVocabulary.PIECES[label]].mean(0), rtol=1e-6)
  assert_rows_of(value[3:], table)  # The remaining rows are sampled from the vocabulary.


def test_class_label_init_with_the_real_sentencepiece_model():
  path = shared_path("fixtures", "t5_sentencepiece.model")
  ids = [37, 1704, 4216, 3, 20400]  # 'The quick brown fox' (../shared/README.md).
  seqio = pytest.importorskip("seqio")
  for vocabulary in (str(path), seqio.SentencePieceVocabulary(str(path))):
    delta = prompt(length=4, init="class_labels", class_labels=("The quick brown fox", "yes"),
                   vocabulary=vocabulary)
    assert pt.encode_label(vocabulary, "The quick brown fox") == ids
    variables = init_variables(delta, vocab_size=config_lib.T5_VOCAB_SIZE)
    value, table = leaf(variables), embedding(variables)
    np.testing.assert_allclose(value[0], table[ids].mean(0), rtol=1e-6)
    np.testing.assert_allclose(value[1], table[pt.encode_label(vocabulary, "yes")].mean(0), rtol=1e-6)


def test_file_init_loads_and_rejects_a_wrong_shape(tmp_path):
  single = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
  np.save(tmp_path / "p.npy", single)
  variables = init_variables(prompt(init="file", init_file=str(tmp_path / "p.npy")))
  np.testing.assert_array_equal(leaf(variables), single)
  # [m, d] for a bank: every task starts from it; [N, m, d]: one prompt per task.
  variables = init_variables(prompt(init="file", init_file=tmp_path / "p.npy", num_tasks=2), num_tasks=2)
  np.testing.assert_array_equal(leaf(variables), np.stack([single, single]))
  bank = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  np.save(tmp_path / "bank.npy", bank)
  delta = prompt(init="file", init_file=str(tmp_path / "bank.npy"), num_tasks=2)
  variables = init_variables(delta, num_tasks=2)
  np.testing.assert_array_equal(leaf(variables), bank)
  # Once initialized, the file is not read again (it may be gone at serving time).
  (tmp_path / "bank.npy").unlink()
  model = method_checks.make_model((delta,))
  model.logits(variables, method_checks.make_batch(task_ids=[0, 1, 0, 1]))

  np.save(tmp_path / "wrong.npy", np.zeros((4, 8), np.float32))
  with pytest.raises(ValueError, match=r"wrong\.npy holds shape \[4, 8\], expected \[3, 8\]"):
    init_variables(prompt(init="file", init_file=str(tmp_path / "wrong.npy")))
  with pytest.raises(ValueError, match=r"bank2\.npy holds shape \[2, 3, 8\]"):
    np.save(tmp_path / "bank2.npy", bank)
    init_variables(prompt(init="file", init_file=str(tmp_path / "bank2.npy")))
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    init_variables(prompt(init="file", init_file=str(tmp_path / "missing.npy")))


def test_configuration_errors_name_the_value():
  with pytest.raises(ValueError, match="'middle'"):
    prompt(stack="middle")
  with pytest.raises(ValueError, match="'zeros'"):
    prompt(init="zeros")
  with pytest.raises(ValueError, match="needs a vocabulary"):
    prompt(init="class_labels", class_labels=["a"])
  with pytest.raises(ValueError, match="2 class labels"):
    prompt(length=1, init="class_labels", class_labels=["a", "b"], vocabulary=FakeVocabulary())
  with pytest.raises(ValueError, match="init_file"):
    prompt(init="file")
  with pytest.raises(ValueError, match="outside the embedding's vocabulary of 40"):
    init_variables(prompt(init="class_labels", class_labels=["x"], vocabulary=type(
        "Big", (), {"encode": lambda self, s: [41]})()))
  hash(prompt(init="class_labels", class_labels=["a"], vocabulary=FakeVocabulary()))  # Stays hashable.


# ------------------------------------------------------------------------------------ counts
def t5_base_peft(delta, num_tasks=None):
  model = model_lib.EncoderDecoderModel(config_lib.preset("t5_base"), (delta,))
  batch = network.dummy_batch()
  if num_tasks:
    batch["task_ids"] = jnp.zeros((1,), jnp.int32)
  abstract = model.abstract_init(batch)
  assert isinstance(jax.tree_util.tree_leaves(abstract)[0], jax.ShapeDtypeStruct)  # Nothing allocated.
  return model_lib.flatten(nn.unbox(abstract["peft"]))


def test_t5_base_parameter_count():
  shapes = t5_base_peft(pt.PromptTuning(length=100))
  assert {k: v.shape for k, v in shapes.items()} == {"encoder/prompt_tuning/prompt": (100, 768)}
  assert model_lib.count_params(shapes) == 76_800 == pt.PromptTuning(length=100).param_count(768)
  bank = pt.PromptTuning(length=100, num_tasks=3, init="uniform")
  assert model_lib.count_params(t5_base_peft(bank, num_tasks=3)) == 3 * 76_800 == bank.param_count(768)


def test_logical_axes():
  model = method_checks.make_model((prompt(num_tasks=2),))
  abstract = model.abstract_init(method_checks.make_batch(task_ids=[0, 1, 0, 1]))
  box = abstract["peft"]["encoder"]["prompt_tuning"]["prompt"]
  assert box.names == ("tasks", "prompt", "prompt_embed")


# ------------------------------------------------------------------------------------ gin
@gin.configurable
def prompt_tuning_test_deltas(deltas=gin.REQUIRED):
  return deltas


def test_gin_file_builds_the_deltas():
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(gin_utils.CONFIG_DIR / "methods" / "prompt_tuning.gin")],
                                        ["prompt_tuning_test_deltas.deltas = %DELTAS",
                                         "PROMPT_LENGTH = 7"])
    deltas = prompt_tuning_test_deltas()
  finally:
    gin.clear_config()
  assert deltas == [pt.PromptTuning(length=7, stack="encoder", init="vocab")]
  method_checks.make_model(deltas)


# ------------------------------------------------------------------------------------ HF PEFT parity
def hf_and_ours(tmp_path, config):
  """A random HF T5 of `config`, saved and read back through `load_backbone`: (hf_model, params, config)."""
  torch = pytest.importorskip("torch")
  from prompt_mix.t5 import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_mix.t5 import hf_checkpoint  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = hf_checkpoint.hf_t5_model(config)
  with torch.no_grad():  # Layer norm scales away from 1 so that they matter.
    for name, p in hf.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  hf.save_pretrained(tmp_path / "hf")
  params, loaded = checkpoints.load_backbone(tmp_path / "hf")
  assert loaded.logits_via_embedding == config.logits_via_embedding
  assert tuple(loaded.mlp_activations) == tuple(config.mlp_activations)
  return hf, params, loaded


SMALL = dict(vocab_size=64, emb_dim=16, num_heads=4, head_dim=6, mlp_dim=32, num_encoder_layers=2,
             num_decoder_layers=3, dropout_rate=0.0)


@pytest.mark.parametrize("style", ["v1_1_gated_untied", "v1_0_relu_tied"])
def test_logits_match_hf_peft_prompt_tuning(tmp_path, style):
  """HF PEFT's seq2seq prompt tuning prepends the prompt to the encoder only; we match it exactly.

  PEFT (`PeftModelForSeq2SeqLM.forward`, PROMPT_TUNING branch) embeds `input_ids`, concatenates the first
  `num_virtual_tokens` rows of its prompt embedding in front, and prepends `num_virtual_tokens` ones to
  `attention_mask`; the decoder inputs are untouched (its `decoder_attention_mask` is not extended for
  prompt tuning). Its prompt table holds `num_virtual_tokens * num_transformer_submodules` (= 2 for
  SEQ_2_SEQ_LM) rows, but only the first m reach the model in `forward`: we set those to our prompt.
  That is exactly `PromptTuning(stack='encoder')`: rows in front of the encoder embeddings, the encoder
  mask and the cross-attention mask grown by m ones.
  """
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  if style == "v1_1_gated_untied":
    config = config_lib.T5Config(**SMALL, mlp_activations=("gelu", "linear"), logits_via_embedding=False)
  else:
    config = config_lib.T5Config(**SMALL, mlp_activations=("relu",), logits_via_embedding=True)
  hf, params, config = hf_and_ours(tmp_path, config)
  m = 5
  model = model_lib.EncoderDecoderModel(dataclasses.replace(config, dropout_rate=0.0),
                                        (pt.PromptTuning(length=m, init="uniform"),))
  rng = np.random.RandomState(0)
  enc = rng.randint(2, 64, (3, 7))
  enc[0, 4:] = 0  # Padding.
  enc[2, 6:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), int), rng.randint(2, 64, (3, 4))], axis=1)
  tgt = np.concatenate([dec_in[:, 1:], np.ones((3, 1), int)], axis=1)
  batch = {k: jnp.asarray(v) for k, v in dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                                                decoder_target_tokens=tgt).items()}
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
  variables = dict(variables, params=jax.tree_util.tree_map(jnp.asarray, params))
  ours = np.asarray(model.logits(variables, batch))
  ours_plain = np.asarray(model_lib.EncoderDecoderModel(config).logits({"params": variables["params"]},
                                                                       batch))

  with torch.no_grad():
    kwargs = dict(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                  decoder_input_ids=torch.tensor(dec_in))
    plain = hf(**kwargs).logits.numpy()
    wrapped = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                              num_virtual_tokens=m))
    table = wrapped.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * m, 16)
    table[:m] = torch.from_numpy(leaf(variables).copy())
    logits = wrapped(**kwargs).logits.numpy()

  def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()

  assert rel_err(ours_plain, plain) < 1e-5  # The backbone alone.
  assert not np.allclose(logits, plain, atol=1e-3)  # The prompt matters...
  assert rel_err(ours, logits) < 1e-5  # ...and acts as PEFT's does.
