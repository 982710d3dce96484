"""Prefix tuning and P-tuning v2: the method checks, sites, baking, parameter counts and gin."""


import dataclasses

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix.peft import prefix_tuning as px
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network

import method_checks



def prefix(**kw):
  return px.PrefixTuning(**{"length": 2, "mlp_hidden": 16, **kw})


def p_tuning_v2(**kw):
  return px.PTuningV2(**{"length": 2, **kw})


# ------------------------------------------------------------------------------------ method checks
@pytest.mark.parametrize("delta, count, leaf", [
    # 3 attention kinds x 5 MLP leaves; 6 sites (2 + 2 + 2 on the tiny T5) x 5; 6 sites x key, value.
    (prefix(), 3 * 5, "decoder/prefix_tuning/cross_attention/mlp_wo"),
    (prefix(reparameterization="per_site"), 6 * 5,
     "decoder/layers_1/encoder_decoder_attention/prefix_tuning/mlp_wo"),
    (p_tuning_v2(), 6 * 2, "decoder/layers_1/encoder_decoder_attention/p_tuning_v2/key"),
], ids=["shared", "per_site", "flat"])
def test_step_trains_only_the_prefixes(delta, count, leaf):
  variables, _ = method_checks.check_step_trains_only_method((delta,))
  leaves = model_lib.flatten(variables["peft"])
  assert len(leaves) == count and leaf in leaves


@pytest.mark.parametrize("make", [prefix, p_tuning_v2], ids=["reparameterized", "flat"])
def test_cached_decoding_equals_uncached(make):
  # Prefixes are not zero-initialized, so the initial values are used as they are. With seed 1 greedy
  # decoding never picks the pad id 0, which the teacher-forced comparison would treat as padding (the
  # check's default perturbation of seed 0 makes P-tuning v2 decode a 0).
  delta = make(length=3)
  model = method_checks.make_model((delta,))
  variables = method_checks.init(model, method_checks.make_batch(), seed=1)
  predictions = method_checks.check_cached_equals_uncached((delta,), variables=variables)
  assert (predictions[:, :2] != 0).all()


@pytest.mark.parametrize("make", [prefix, p_tuning_v2], ids=["reparameterized", "flat"])
def test_mixed_task_batch_equals_task_by_task(make):
  variables = method_checks.check_mixed_task_equals_task_by_task((make(num_tasks=3),), num_tasks=3)
  for path, value in model_lib.flatten(variables["peft"]).items():
    assert value.shape[0] == 3, path


@pytest.mark.parametrize("make", [prefix, p_tuning_v2], ids=["reparameterized", "flat"])
def test_loss_goes_down(make):
  method_checks.check_loss_goes_down((make(length=4),), steps=60)


@pytest.mark.parametrize("where, expected", [
    (dict(attentions=["cross_attention"]), ["decoder/layers_2/encoder_decoder_attention"]),
    (dict(attentions=["self_attention"], stacks=["encoder"]), ["encoder/layers_1/attention"]),
    (dict(attentions=["self_attention"]), ["decoder/layers_2/self_attention", "encoder/layers_1/attention"]),
])
def test_sites_follow_stacks_attentions_and_layers(where, expected):
  model = method_checks.make_model((p_tuning_v2(layers=[-1], **where),), num_decoder_layers=3)
  leaves = model_lib.flatten(method_checks.init(model, method_checks.make_batch())["peft"])
  assert sorted(leaves) == [f"{site}/p_tuning_v2/{kv}" for site in expected for kv in ("key", "value")]
  for path in leaves:
    assert leaves[path].shape == (2, 4, 3)  # [l, h, d_kv]


def test_a_prefix_acts_only_where_it_sits():
  """A decoder self-attention prefix leaves the encoder as the backbone's and changes the logits."""
  model = method_checks.make_model((p_tuning_v2(stacks=["decoder"], attentions=["self_attention"]),))
  plain_model = method_checks.make_model(())
  batch = method_checks.make_batch()
  variables = method_checks.init(model, batch)
  plain_variables = {"params": variables["params"]}
  enc = batch["encoder_input_tokens"]
  encoded = model.module.apply(variables, enc, method=network.Transformer.encode)[0]
  plain_encoded = plain_model.module.apply(plain_variables, enc, method=network.Transformer.encode)[0]
  np.testing.assert_array_equal(np.asarray(encoded), np.asarray(plain_encoded))
  plain = np.asarray(plain_model.logits(plain_variables, batch))
  assert not np.allclose(np.asarray(model.logits(variables, batch)), plain, atol=1e-4)


def test_configuration_errors_name_the_value():
  with pytest.raises(ValueError, match="'self'"):
    prefix(attentions=["self"])
  with pytest.raises(ValueError, match="'some'"):
    prefix(layers="some")
  with pytest.raises(ValueError, match="is empty"):
    prefix(attentions=[])
  with pytest.raises(ValueError, match=r"5 is out of range for the encoder stack of 2 layers"):
    model = method_checks.make_model((p_tuning_v2(layers=[5]),))
    method_checks.init(model, method_checks.make_batch())
  hash(prefix(layers=[0, 1]))


# ------------------------------------------------------------------------------------ baking
@pytest.mark.parametrize("num_tasks", [None, 2])
@pytest.mark.parametrize("form", ["shared", "per_site"])
def test_baking_keeps_the_logits(num_tasks, form):
  delta = prefix(length=3, num_tasks=num_tasks, layers=[0], reparameterization=form)
  model = method_checks.make_model((delta,))
  batch = method_checks.make_batch(task_ids=None if num_tasks is None else [0, 1, 1, 0])
  boxed = model.init(jax.random.PRNGKey(0), batch)
  before = np.asarray(model.logits(boxed, batch))

  flat_boxed, method = px.bake(boxed, model.deltas)
  assert method == (px.PTuningV2(length=3, layers=(0,), mlp_hidden=16, num_tasks=num_tasks,
                                 reparameterization=form, name="prefix_tuning"),)
  leaves = model_lib.flatten(flat_boxed["peft"])
  lead = () if num_tasks is None else (2,)
  assert sorted(leaves) == sorted(f"{site}/prefix_tuning/{kv}" for kv in ("key", "value") for site in (
      "encoder/layers_0/attention", "decoder/layers_0/self_attention",
      "decoder/layers_0/encoder_decoder_attention"))
  for box in leaves.values():
    assert box.names == ("tasks",) * len(lead) + px.FLAT_AXES and box.value.shape == lead + (3, 4, 3)
  flat_model = method_checks.make_model(method)
  # The baked tree is exactly what the flat method declares.
  abstract = flat_model.abstract_init(batch)
  assert jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(abstract["peft"])) == (
      jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(flat_boxed["peft"])))
  after = np.asarray(flat_model.logits(flat_boxed, batch))
  np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
  # Unboxed variables bake too.
  flat, _ = px.bake(nn.unbox(boxed), model.deltas)
  np.testing.assert_allclose(np.asarray(flat_model.logits(flat, batch)), before, rtol=1e-6, atol=1e-6)


def test_baking_leaves_other_deltas_and_reports_missing_leaves():
  flat_delta = p_tuning_v2()
  variables = {"params": {}, "peft": {}}
  assert px.bake(variables, (flat_delta,))[1] == (flat_delta,)
  per_site = prefix(reparameterization="per_site")
  with pytest.raises(ValueError, match="no reparameterized prefix leaves '<site>/prefix_tuning/embedding'"):
    px.bake(variables, (per_site,))
  broken = {"params": {}, "peft": {"encoder": {"layers_0": {"attention": {"prefix_tuning": {
      "embedding": np.zeros((2, 8))}}}}}}
  with pytest.raises(ValueError, match=r"peft/encoder/layers_0/attention/prefix_tuning lacks \['mlp_wi'"):
    px.bake(broken, (per_site,))
  # The shared form needs the depths to know which layers its MLP's rows belong to.
  with pytest.raises(ValueError, match="pass the backbone's config"):
    px.bake({"peft": {}}, (prefix(),))
  broken = {"peft": {"encoder": {"prefix_tuning": {"attention": {"embedding": np.zeros((2, 8))}}}}}
  with pytest.raises(ValueError, match=r"peft/encoder/prefix_tuning/attention lacks \['mlp_wi'"):
    px.bake(broken, (prefix(),), method_checks.tiny_config())


# ------------------------------------------------------------------------------------ counts
def t5_base_count(delta, config=None):
  config = config or config_lib.preset("t5_base")
  model = model_lib.EncoderDecoderModel(config, (delta,))
  abstract = model.abstract_init(network.dummy_batch())  # Shapes only: no weight is allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
  return model_lib.count_params(nn.unbox(abstract["peft"]))


def test_t5_base_parameter_counts():
  cfg = config_lib.preset("t5_base")
  h, d_kv, d = cfg.num_heads, cfg.head_dim, cfg.emb_dim
  assert (h, d_kv, d, cfg.num_encoder_layers, cfg.num_decoder_layers) == (12, 64, 768, 12, 12)
  sites = 12 + 12 + 12  # Encoder self; decoder self and cross.
  l = 100
  flat = px.PTuningV2(length=l)
  assert t5_base_count(flat) == sites * 2 * l * h * d_kv == 5_529_600 == flat.param_count(cfg)
  hid = 512
  per_site = l * d + d * hid + hid + hid * 2 * h * d_kv + 2 * h * d_kv
  reparam = px.PrefixTuning(length=l, mlp_hidden=hid, reparameterization="per_site")
  assert t5_base_count(reparam) == sites * per_site == 45_305_856 == reparam.param_count(cfg)
  # Shared (the default, as Li & Liang, He et al. and HF PEFT): one P' and MLP per attention kind emitting
  # its 12 layers' keys and values: l d + d H + H + 12 (H + 1) 2 h d_kv, for 3 kinds.
  shared = px.PrefixTuning(length=l, mlp_hidden=hid)
  per_kind = l * d + d * hid + hid + 12 * (hid + 1) * 2 * h * d_kv
  assert t5_base_count(shared) == 3 * per_kind == 29_778_432 == shared.param_count(cfg)
  # A subset: l = 30 at the encoder's first and last layers only, with a smaller P'.
  subset = px.PrefixTuning(length=30, stacks=["encoder"], layers=[0, -1], prefix_embed_dim=64,
                           mlp_hidden=128, reparameterization="per_site")
  expected = 2 * (30 * 64 + 64 * 128 + 128 + 128 * 2 * 768 + 2 * 768)
  assert t5_base_count(subset) == expected == subset.param_count(cfg)
  shared_subset = dataclasses.replace(subset, reparameterization="shared")
  expected = 30 * 64 + 64 * 128 + 128 + 2 * (128 + 1) * 2 * 768
  assert t5_base_count(shared_subset) == expected == shared_subset.param_count(cfg)


# ------------------------------------------------------------------------------------ gin
@gin.configurable
def prefix_tuning_test_deltas(deltas=gin.REQUIRED):
  return deltas


@pytest.mark.parametrize("name, cls, length", [("prefix_tuning", px.PrefixTuning, 10),
                                                ("p_tuning_v2", px.PTuningV2, 20)])
def test_gin_file_builds_the_deltas(name, cls, length):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(gin_utils.CONFIG_DIR / "methods" / f"{name}.gin")],
                                        ["prefix_tuning_test_deltas.deltas = %DELTAS"])
    deltas = prefix_tuning_test_deltas()
  finally:
    gin.clear_config()
  assert len(deltas) == 1 and type(deltas[0]) is cls
  assert deltas[0].length == length and deltas[0].reparameterize == (cls is px.PrefixTuning)
  assert deltas[0].attentions == ("attention",) and deltas[0].stacks == ("encoder", "decoder")
  method_checks.make_model(deltas)  # Hashable, usable as the model's method.
