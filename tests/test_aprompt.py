"""APrompt: the method checks for the full method and each ablation, the query-key term against numpy,
deep-prompt replacement, parameter counts on T5-base shapes, and the gin files."""

import dataclasses
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as mc
from prompt_mix import gin_utils
from prompt_mix.peft import aprompt as aprompt_lib
from prompt_mix.peft import selection
from prompt_mix.peft.aprompt import APrompt
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import layers
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins

GIN_DIR = gin_utils.CONFIG_DIR / "methods"

# Tiny lengths: 2 rows + 6 input tokens = 8 < N = 10 encoder positions; 2 decoder rows + 5 decoded tokens
# = 7 < 8 decoder positions.
SMALL = dict(input_length=2, qk_length=2, kv_length=2, max_length=10, decoder_max_length=8)
FULL = APrompt(**SMALL)
ABLATIONS = {
    "no_input": APrompt(**dict(SMALL, input_length=0)),
    "no_qk": APrompt(**dict(SMALL, qk_length=0)),
    "no_kv": APrompt(**dict(SMALL, kv_length=0)),
    "no_attention": APrompt(**dict(SMALL, qk_length=0, kv_length=0)),
    # Prompt positions: rows hidden in layer 0, real prompts from layer 1 (the tiny stacks have 2 layers).
    "last_layer": APrompt(**dict(SMALL, layers=("last", 1))),
}


def _side_by_side(num_tasks=None):
  """The ablations as one method (distinct module names): one compiled model checks them all.

  Their rows sit side by side: no_qk, no_kv, no_attention and last_layer put 2 rows each at offsets 0, 2,
  4, 6 (so last_layer hides rows 6..7 in layer 0: the backbone hands it that span); 8 rows + 6 tokens,
  8 decoder rows + 5 tokens, so N = 16 for both.
  """
  deltas = []
  for name, delta in ABLATIONS.items():
    deltas.append(dataclasses.replace(delta, name_prefix=name, max_length=16, decoder_max_length=16,
                                      num_tasks=num_tasks))
  return tuple(deltas)


# ------------------------------------------------------------------------------ the method checks
def test_full_step_trains_only_aprompt_and_cached_decoding_agrees():
  variables, _ = mc.check_step_trains_only_method([FULL])
  flat = model_lib.flatten(variables["peft"])
  assert sum(x.size for x in flat.values()) == FULL.param_counts(mc.tiny_config())["total"]
  _check_cached_equals_uncached([FULL])


def test_full_mixed_task_equals_task_by_task():
  variables = mc.check_mixed_task_equals_task_by_task([dataclasses.replace(FULL, num_tasks=3)], 3)
  for path, leaf in model_lib.flatten(variables["peft"]).items():
    assert leaf.shape[0] == 3, (path, leaf.shape)


def test_ablations_step_trains_only_them_and_cached_decoding_agrees():
  deltas = _side_by_side()
  variables, _ = mc.check_step_trains_only_method(deltas)
  flat = model_lib.flatten(variables["peft"])
  cfg = mc.tiny_config()
  for delta in deltas:
    mine = {k: v for k, v in flat.items() if f"/{delta.name_prefix}_" in f"/{k}"}
    assert sum(x.size for x in mine.values()) == delta.param_counts(cfg)["total"], delta.name_prefix
    kinds = {k.split("/")[-2].split(delta.name_prefix + "_")[1] for k in mine}
    expected = {kind for kind, length in (("input_prompt", delta.input_length),
                                          ("qk_prompt", delta.qk_length),
                                          ("kv_prompt", delta.kv_length)) if length}
    assert kinds == expected, (delta.name_prefix, kinds)
  # last_layer: placeholder rows at the stack inputs (no parameters) and prompts at layer 1 only.
  assert not any("last_layer_" in k for k in flat if not k.split("/")[1] == "layers_1"), sorted(flat)
  _check_cached_equals_uncached(deltas)


def test_ablations_mixed_task_equals_task_by_task():
  mc.check_mixed_task_equals_task_by_task(_side_by_side(num_tasks=3), num_tasks=3)


# Input prompts alone need more rows than 2 to halve the loss of the tiny (d = 8) model.
LOSS_CASES = {"full": FULL, **{k: v for k, v in ABLATIONS.items() if k != "last_layer"},
              "no_attention": dataclasses.replace(ABLATIONS["no_attention"], input_length=4)}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_loss_goes_down(name):
  mc.check_loss_goes_down([LOSS_CASES[name]], steps=40, learning_rate=0.1)


def _perturbed(variables, seed):
  """`variables` with 0.3 N(0, 1) added to every method leaf (what `mc.check_cached_equals_uncached`
  does with seed 1)."""
  leaves, tree = jax.tree_util.tree_flatten(variables["peft"])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return dict(variables, peft=jax.tree_util.tree_unflatten(tree, leaves))


def _check_cached_equals_uncached(deltas, length=5):
  """`mc.check_cached_equals_uncached`, retried with another perturbation when the greedy decode emits the
  pad id 0 before EOS: the check's teacher-forced forward takes `decoder_target_tokens > 0` as its
  padding mask, so a decoded 0 is masked there but not in the cache (true of the plain backbone too)."""
  model = mc.make_model(deltas)
  batch = mc.make_batch()
  base = mc.init(model, batch)
  for seed in (1, 2, 3, 4):
    variables = _perturbed(base, seed)
    try:
      return mc.check_cached_equals_uncached(deltas, batch, variables, length)
    except AssertionError:
      dec = dict(batch, decoder_input_tokens=jnp.zeros((batch["encoder_input_tokens"].shape[0], length),
                                                       jnp.int32))
      predictions = np.asarray(model.predict_batch(variables, dec, decoder="greedy")[0])
      before_eos = [row[:(list(row).index(1) if 1 in row else len(row))] for row in predictions]
      if not any((row == 0).any() for row in before_eos):
        raise
  pytest.fail("every perturbation decoded the pad id 0 before EOS")


# ------------------------------------------------------------------------------ query-key term
def _numpy_attention(x_q, x_kv, params, mask, bias, qk_term, h, dk):
  """T5 attention by hand: no 1/sqrt(d_kv) scaling, NEG_INF mask, additive bias and query-key term."""
  split = lambda y: y.reshape(y.shape[:2] + (h, dk))
  q = split(x_q @ params["query"]["kernel"])
  k = split(x_kv @ params["key"]["kernel"])
  v = split(x_kv @ params["value"]["kernel"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + np.where(mask, 0.0, layers.NEG_INF) + bias + qk_term
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x_q.shape[:2] + (h * dk,))
  return out @ params["out"]["kernel"]


def _explicit_qk(pq, pk, q_positions, k_positions, h, l):
  """sum_l P_q[i, h, l] P_k[j, h, l] for i < N_q and j < N_k, else 0: [1, h, q, k], by loops."""
  pq, pk = pq.reshape(pq.shape[0], h, l), pk.reshape(pk.shape[0], h, l)
  term = np.zeros((1, h, len(q_positions), len(k_positions)))
  for a, i in enumerate(q_positions):
    for b, j in enumerate(k_positions):
      if i < pq.shape[0] and j < pk.shape[0]:
        for head in range(h):
          term[0, head, a, b] = float(np.dot(pq[i, head], pk[j, head]))
  return term


@pytest.mark.parametrize("kind", ["attention", "cross_attention"])
def test_query_key_term_matches_numpy(kind):
  """Backbone `Attention` with APrompt (query-key prompts only) == hand-written attention + P_q[i].P_k[j].

  Encoder self-attention over positions 0..5 with N = 4 (positions 4, 5 get no term); cross-attention
  with one decoder query at absolute position 3 (a cached decoding step) over 6 encoder positions, N_q = 2
  so that query gets no term, and at query position 1 it does.
  """
  cfg = mc.tiny_config()
  h, dk = cfg.num_heads, cfg.head_dim
  delta = APrompt(input_length=0, qk_length=3, kv_length=0, max_length=4, decoder_max_length=2)
  stack = "encoder" if kind == "attention" else "decoder"
  site = plugins.site(cfg, stack, 0, kind)
  attention = layers.Attention(cfg, site, (delta,))
  rng = np.random.RandomState(0)
  b, n = 2, 6
  x_kv = rng.randn(b, n, cfg.emb_dim).astype(np.float32)
  mask_kv = np.ones((b, n), bool)
  mask_kv[0, 4:] = False
  ctx = plugins.Context(task_ids=None, embedding=jnp.zeros((mc.VOCAB, cfg.emb_dim)), batch_size=b)
  if kind == "attention":
    x_q, q_pos = x_kv, np.arange(n)
  else:
    x_q = rng.randn(b, 2, cfg.emb_dim).astype(np.float32)
    q_pos = np.array([1, 3])
  k_pos = np.arange(n)
  mask = np.ones((b, 1, len(q_pos), n), bool) & mask_kv[:, None, None, :]
  bias = rng.randn(1, h, len(q_pos), n).astype(np.float32)

  def run(variables=None):
    args = (jnp.asarray(x_q), jnp.asarray(x_kv), jnp.asarray(mask), jnp.asarray(bias), ctx,
            jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32))
    if variables is None:
      return attention.init(jax.random.PRNGKey(0), *args)
    return attention.apply(variables, *args)

  variables = nn.unbox(jax.jit(run)())
  prompts = variables["peft"]["qk_prompt"]
  assert prompts["query"].shape == ((4 if kind == "attention" else 2), h * 3)
  assert prompts["key"].shape == (4, h * 3)
  out = np.asarray(jax.jit(run)(variables))
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  term = _explicit_qk(np.asarray(prompts["query"]), np.asarray(prompts["key"]), q_pos, k_pos, h, 3)
  assert np.abs(term).max() > 1e-3  # The term is really there...
  expected = _numpy_attention(x_q, x_kv, params, mask, bias, term, h, dk)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  without = _numpy_attention(x_q, x_kv, params, mask, bias, 0.0, h, dk)
  assert np.abs(out - without).max() > 1e-4  # ...and changes the attention output.


# ------------------------------------------------------------------------------ deep prompts
def _encode_with_layers(model, variables, tokens):
  """(encoded, {layer index: that encoder layer's output [B, m+n, d]})."""
  (encoded, _), state = model.module.apply(
      variables, tokens, method=network.Transformer.encode, capture_intermediates=True,
      mutable=["intermediates"])
  inter = state["intermediates"]["encoder"]
  outputs = {i: np.asarray(inter[f"layers_{i}"]["__call__"][0]) for i in range(2)}
  return np.asarray(encoded), outputs


@functools.lru_cache(maxsize=None)
def _deep_setup(name="full"):
  """(delta, model, batch, variables) of FULL or an ablation on the checks' batch (shared shapes)."""
  delta = FULL if name == "full" else ABLATIONS[name]
  model = mc.make_model([delta])
  batch = mc.make_batch()
  return delta, model, batch, mc.init(model, batch)


def test_deep_prompt_replaces_the_rows():
  """Layer 1's input rows are its own prompt: layer 0's outputs at those positions do not leak."""
  delta, model, batch, variables = _deep_setup()
  cfg, m = model.config, delta.input_length
  tokens = batch["encoder_input_tokens"]
  _, outputs = _encode_with_layers(model, variables, tokens)

  # Run encoder layer 1 alone on layer 0's output, and on it with garbage at the prompt positions.
  x0 = outputs[0]
  garbage = x0.copy()
  garbage[:, :m] = 100.0 * np.random.RandomState(3).randn(*garbage[:, :m].shape)
  params, peft = variables["params"], variables["peft"]
  positions = jnp.arange(x0.shape[1], dtype=jnp.int32)
  row_mask = jnp.concatenate([jnp.ones((tokens.shape[0], m), bool), tokens > 0], axis=1)
  attn_mask = row_mask[:, None, :, None] & row_mask[:, None, None, :]
  bias = layers.RelativePositionBias(
      cfg.num_heads, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
      bidirectional=True).apply({"params": params["encoder"]["relpos_bias"]}, positions, positions)
  ctx = plugins.Context(task_ids=None, embedding=params["token_embedder"]["embedding"],
                        batch_size=tokens.shape[0], spans=((0, m),))
  layer1 = network.EncoderLayer(cfg, 1, (delta,))
  layer_vars = {"params": params["encoder"]["layers_1"], "peft": peft["encoder"]["layers_1"]}
  run = jax.jit(lambda x: layer1.apply(layer_vars, x, attn_mask, bias, positions, ctx))
  np.testing.assert_allclose(np.asarray(run(jnp.asarray(x0))), outputs[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(run(jnp.asarray(garbage))), outputs[1], rtol=1e-5, atol=1e-5)


def test_deep_prompt_values_change_the_output():
  """Changing layer 1's prompt changes the encoded text positions (the rows really act)."""
  delta, model, batch, variables = _deep_setup()
  tokens = batch["encoder_input_tokens"]
  encoded, _ = _encode_with_layers(model, variables, tokens)
  peft = jax.tree_util.tree_map(lambda x: x, variables["peft"])
  prompt = peft["encoder"]["layers_1"]["input_prompt"]["prompt"]
  peft["encoder"]["layers_1"]["input_prompt"]["prompt"] = prompt + 1.0
  changed, _ = _encode_with_layers(model, dict(variables, peft=peft), tokens)
  m = delta.input_length
  assert np.abs(changed[:, m:] - encoded[:, m:]).max() > 1e-3


def test_layers_before_the_first_chosen_one_ignore_the_rows():
  """With prompts at the last layer only, layer 0 computes the plain backbone on the text positions."""
  delta, model, batch, variables = _deep_setup("last_layer")
  for stack in ("encoder", "decoder"):  # zero placeholder rows, no parameters; prompts at layer 1
    assert set(variables["peft"][stack]) == {"layers_1"}
    assert variables["peft"][stack]["layers_1"]["input_prompt"]["prompt"].shape == (2, 8)
  tokens = batch["encoder_input_tokens"]
  _, outputs = _encode_with_layers(model, variables, tokens)
  plain = mc.make_model([])
  _, plain_outputs = _encode_with_layers(plain, {"params": variables["params"]}, tokens)
  np.testing.assert_allclose(outputs[0][:, 2:], plain_outputs[0], rtol=1e-5, atol=1e-5)


def test_vocab_init_takes_rows_of_the_frozen_embedding():
  embedding = jnp.asarray(np.random.RandomState(0).randn(mc.VOCAB, 8), jnp.float32)
  ctx = plugins.Context(task_ids=jnp.array([1, 0]), embedding=embedding, batch_size=2)
  module = aprompt_lib.InputPrompt(5, init_kind="vocab", num_tasks=2)
  tokens = jnp.ones((2, 3), jnp.int32)
  rows, variables = module.init_with_output(jax.random.PRNGKey(0), embedding[tokens], tokens > 0, ctx)
  prompt = np.asarray(nn.unbox(variables["peft"])["prompt"])  # [tasks, m, d]
  assert prompt.shape == (2, 5, 8)
  for task in range(2):
    matches = [np.where((np.asarray(embedding) == row).all(-1))[0] for row in prompt[task]]
    assert all(len(m) == 1 for m in matches)
    assert len({int(m[0]) for m in matches}) == 5  # distinct tokens
  np.testing.assert_array_equal(np.asarray(rows), prompt[[1, 0]])


# ------------------------------------------------------------------------------ parameter counts
T5_BASE_FULL = dict(input=10 * 768 * 24,
                    qk=12 * 10 * 12 * (2 * 512 + 2 * 128 + (128 + 512)),
                    kv=2 * 10 * 12 * 64 * 36)


def _abstract_peft(delta, preset="t5_base"):
  model = model_lib.EncoderDecoderModel(config_lib.preset(preset), (delta,))
  batch = network.dummy_batch()
  if delta.num_tasks:
    batch["task_ids"] = jnp.zeros((1,), jnp.int32)
  return model_lib.flatten(nn.unbox(model.abstract_init(batch)["peft"]))


def test_param_counts_on_t5_base_match_the_formulas():
  cfg = config_lib.preset("t5_base")
  full = APrompt()  # m = l_qk = l_kv = 10, N = 512 (encoder), 128 (decoder), every layer and attention.
  counts = full.param_counts(cfg)
  assert counts == dict(T5_BASE_FULL, total=sum(T5_BASE_FULL.values())) == dict(
      input=184_320, qk=2_764_800, kv=552_960, total=3_502_080)
  leaves = _abstract_peft(full)
  assert sum(x.size for x in leaves.values()) == counts["total"]
  assert leaves["encoder/input_prompt/prompt"].shape == (10, 768)
  assert leaves["encoder/layers_11/input_prompt/prompt"].shape == (10, 768)
  assert leaves["decoder/layers_3/encoder_decoder_attention/qk_prompt/query"].shape == (128, 120)
  assert leaves["decoder/layers_3/encoder_decoder_attention/qk_prompt/key"].shape == (512, 120)
  assert leaves["encoder/layers_0/attention/kv_prompt/value"].shape == (10, 768)

  # A selective bank of 2 tasks: encoder layers 0, 5 and 11, QK on self-attention, KV on everything.
  selective = APrompt(input_length=4, qk_length=5, kv_length=3, layers=[0, 5, -1], stacks=["encoder"],
                      qk_attentions=["self_attention"], num_tasks=2)
  counts = selective.param_counts(cfg)
  assert counts == dict(input=4 * 768 * 3, qk=12 * 5 * 3 * 2 * 512, kv=2 * 3 * 12 * 64 * 3,
                        total=4 * 768 * 3 + 12 * 5 * 3 * 2 * 512 + 2 * 3 * 12 * 64 * 3)
  leaves = _abstract_peft(selective)
  assert sum(x.size for x in leaves.values()) == 2 * counts["total"]
  assert {p.split("/")[1] for p in leaves if p.count("/") > 2} == {"layers_0", "layers_5", "layers_11"}


def test_kv_ratio_lengths_at_a_fixed_budget():
  cfg = config_lib.preset("t5_base")
  base = APrompt()
  expected = {0.0: (7, 0), 0.25: (5, 9), 0.5: (3, 18), 0.75: (1, 27), 1.0: (0, 36)}
  for ratio, lengths in expected.items():
    assert aprompt_lib.kv_ratio_lengths(base, cfg, 2_000_000, ratio) == lengths
    qk, kv = lengths
    if qk or kv:
      counts = dataclasses.replace(base, qk_length=qk, kv_length=kv).param_counts(cfg)
      assert counts["qk"] + counts["kv"] <= 2_000_000
      assert abs(counts["kv"] - ratio * 2_000_000) <= 2 * 12 * 64 * 36  # within one key-value position
  with pytest.raises(ValueError, match="below one prompt position"):
    aprompt_lib.kv_ratio_lengths(base, cfg, 100_000, 0.5)


# ------------------------------------------------------------------------------ configuration
def test_layer_selection_and_errors():
  assert selection.chosen_layers("all", 3) == {0, 1, 2}
  assert selection.chosen_layers(("first", 2), 12) == {0, 1}
  assert selection.chosen_layers(("last", 2), 12) == {10, 11}
  assert selection.chosen_layers((0, -1), 12) == {0, 11}
  with pytest.raises(ValueError, match="encoder stack of 2 layers"):
    selection.chosen_layers((5,), 2, "encoder")
  with pytest.raises(ValueError, match="only 2 layers"):
    selection.chosen_layers(("last", 3), 2, "decoder")
  with pytest.raises(ValueError, match="all 0"):
    APrompt(input_length=0, qk_length=0, kv_length=0)
  with pytest.raises(ValueError, match="'middle'"):
    APrompt(layers=("middle", 2))
  with pytest.raises(ValueError, match="unknown attention 'mlp'"):
    APrompt(kv_attentions=["mlp"])
  with pytest.raises(ValueError, match="unknown stack"):
    APrompt(stacks=["encoders"])


GIN_FILES = sorted(GIN_DIR.glob("aprompt*.gin"))


@gin.configurable("aprompt_test_sink")
def _sink(deltas=gin.REQUIRED):
  return deltas


def test_gin_files_parse_and_build():
  names = {p.name for p in GIN_FILES}
  assert {"aprompt.gin", "aprompt_no_input.gin", "aprompt_no_qk.gin", "aprompt_no_kv.gin",
          "aprompt_no_attention.gin", "aprompt_kv_ratio.gin"} <= names
  cfg = config_lib.preset("t5_base")
  built = {}
  for path in GIN_FILES:
    gin.clear_config()
    try:
      gin.parse_config_files_and_bindings(
          [str(path)], ["aprompt_test_sink.deltas = %DELTAS", "preset.name = 't5_base'"])
      deltas = _sink()
    finally:
      gin.clear_config()
    assert len(deltas) == 1 and isinstance(deltas[0], APrompt), path.name
    built[path.name] = deltas[0]
    assert deltas[0].param_counts(cfg)["total"] > 0
  assert built["aprompt.gin"] == APrompt()
  assert built["aprompt_no_input.gin"].input_length == 0
  assert built["aprompt_no_qk.gin"].qk_length == 0
  assert built["aprompt_no_kv.gin"].kv_length == 0
  ratio = built["aprompt_kv_ratio.gin"]
  assert (ratio.qk_length, ratio.kv_length) == (3, 18)
  # The full gin-built method plugs into the tiny backbone.
  leaves = _abstract_peft(built["aprompt_last_layer.gin"], "tiny")
  assert sum(x.size for x in leaves.values()) == built["aprompt_last_layer.gin"].param_counts(
      config_lib.preset("tiny"))["total"]
