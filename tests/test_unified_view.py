"""Parameter counts of the unified-view methods on T5 v1.0 base (eval_shape, no allocation), and gin."""


import dataclasses

import flax.linen as nn
import gin
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix.peft import adapters
from prompt_mix.peft import bitfit
from prompt_mix.peft import full_finetune
from prompt_mix.peft import lora
from prompt_mix.peft import mam
from prompt_mix.peft import prefix_tuning
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network

import method_checks as checks

BASE = config_lib.preset("t5_base")
d, hkv, d_ff, L = BASE.emb_dim, BASE.num_heads * BASE.head_dim, BASE.mlp_dim, BASE.num_encoder_layers
ATTENTIONS, FFNS = 3 * L, 2 * L  # Encoder self + decoder self + cross per layer pair; one FFN per layer.


@pytest.fixture(scope="module")
def base_counts():
  """Trainable leaves of every method on T5-base, from one abstract init of a model holding them all.

  Each method's leaves are told apart by their module names; returns {method: parameter count} and the
  backbone's count.
  """
  prefix, spa = mam.mam_adapter(reparameterize=False, use_bias=False)  # The survey's flat count.
  deltas = (adapters.HoulsbyAdapter(bottleneck=64, name="houlsby"),
            adapters.ParallelAdapter(bottleneck=64, sublayers=("attention", "mlp"), use_bias=False,
                                     name="pa"),
            adapters.ScaledParallelAdapter(name="spa_default"),
            lora.LoRA(rank=8, targets=("query", "value")),
            lora.LoRA(rank=102, targets=("wi", "wo"), name="lora_ffn"),
            bitfit.BitFit(), bitfit.BitFit(targets=("dense",), name="bitfit_dense"), prefix, spa,
            prefix_tuning.PrefixTuning(length=30, reparameterization="per_site", name="prefix_reparam"),
            dataclasses.replace(mam.mam_adapter()[0], name="mam_prefix"),
            full_finetune.FullFineTune())
  model = model_lib.EncoderDecoderModel(BASE, deltas)
  abstract = model.abstract_init(network.dummy_batch(1, 4, 4))
  flat = model_lib.flatten(nn.unbox(abstract["peft"]))
  counts = {}
  for path, leaf in flat.items():
    parts = path.split("/")
    method = next(m for m in ("houlsby", "pa", "spa_default", "lora", "lora_ffn", "bitfit", "bitfit_dense",
                              "prefix_tuning",
                              "prefix_reparam", "mam_prefix", "adapter")
                  if m in parts or any(p.endswith("_" + m) for p in parts))
    counts[method] = counts.get(method, 0) + int(np.prod(leaf.shape))
  assert sum(counts.values()) == model_lib.count_params(abstract["peft"])
  trainable, _ = model_lib.split_trainable(abstract, model.trains_backbone)
  counts["full_finetune"] = model_lib.count_params(nn.unbox(trainable))
  return counts


def test_adapter_counts_follow_the_survey(base_counts):
  r = 64
  # Houlsby: after every attention and FFN, with biases (He et al.'s adapters are nn.Linear layers).
  assert base_counts["houlsby"] == (2 * r * d + r + d) * (ATTENTIONS + FFNS) == 5_948_160
  # Without biases, exactly the table: 2rd x 3 x 12 (attention) + 2rd x 2 x 12 (ffn).
  assert base_counts["pa"] == 2 * r * d * 3 * 12 + 2 * r * d * 2 * 12 == 5_898_240
  assert base_counts["houlsby"] == adapters.adapter_param_count(d, r, ATTENTIONS + FFNS)


def test_lora_counts_follow_the_survey(base_counts):
  # W_q, W_v of every attention: 2 r (d + h d_kv), the table's 4rd x 3 x 12 since h d_kv = d.
  assert base_counts["lora"] == 2 * 8 * (d + hkv) * ATTENTIONS == 4 * 8 * d * 3 * 12 == 884_736
  # FFN (wi: d -> 4d, wo: 4d -> d): the table's 10rd x 2 x 12.
  assert d_ff == 4 * d
  assert base_counts["lora_ffn"] == 10 * 102 * d * 2 * 12 == 18_800_640


def test_bitfit_counts_every_dense_output_norm_and_the_lm_head(base_counts):
  encoder_layer = 3 * hkv + d + d_ff + d  # q, k, v, o; wi, wo
  decoder_layer = 2 * (3 * hkv + d) + d_ff + d  # self and cross attention; wi, wo
  dense = L * (encoder_layer + decoder_layer)
  assert base_counts["bitfit_dense"] == dense == 202_752  # targets=('dense',); v1.0: tied logits.
  norms = (2 * L + 1 + 3 * L + 1) * d  # 2 per encoder layer + encoder_norm; 3 per decoder layer + decoder_norm.
  head = 32128  # The tied output layer's bias, [vocab].
  assert base_counts["bitfit"] == dense + norms + head == 282_496  # The ATTEMPT/Compacter baseline.


def test_mam_counts_follow_the_survey(base_counts):
  l, r = 30, 512
  flat_prefix = 2 * l * hkv * ATTENTIONS
  assert base_counts["prefix_tuning"] == flat_prefix == 2 * l * d * 3 * 12 == 1_658_880
  assert base_counts["adapter"] == 2 * r * d * 2 * 12 == 18_874_368
  # Reparameterized prefixes (training), per site: P' [l, d] and an MLP d -> 512 -> 2 h d_kv at each site.
  per_site = prefix_tuning.PrefixTuning(length=30, reparameterization="per_site")
  assert base_counts["prefix_reparam"] == per_site.param_count(BASE)
  spa = (2 * r * d + r + d) * FFNS
  assert base_counts["spa_default"] == spa == 18_905_088
  assert base_counts["prefix_reparam"] + spa == 62_275_584  # Training, per-site MLPs of H = 512.
  # The defaults of mam.gin / mam_adapter(): He et al.'s shared MLP per attention kind with mid_dim
  # H = 800 emitting all 12 layers (l d + d H + H + 12 (H + 1) 2 h d_kv per kind), adapters with biases.
  shared = 3 * (l * d + d * 800 + 800 + 12 * 801 * 2 * hkv)
  assert base_counts["mam_prefix"] == shared == 46_206_816
  assert base_counts["mam_prefix"] + spa == 65_111_904  # Training.
  assert flat_prefix + spa == 20_563_968  # Inference, after prefix_tuning.bake.


def test_full_finetune_trains_the_whole_backbone(base_counts):
  assert base_counts["full_finetune"] == 222_903_552  # HF's count for t5-base.


@gin.configurable
def unified_view_test_deltas(deltas=gin.REQUIRED):
  return deltas


GIN_FILES = {
    "houlsby_adapter": [adapters.HoulsbyAdapter],
    "parallel_adapter": [adapters.ParallelAdapter],
    "scaled_parallel_adapter": [adapters.ScaledParallelAdapter],
    "lora": [lora.LoRA],
    "bitfit": [bitfit.BitFit],
    "full_finetune": [full_finetune.FullFineTune],
    "mam": [prefix_tuning.PrefixTuning, adapters.ScaledParallelAdapter],
}


@pytest.mark.parametrize("name", sorted(GIN_FILES))
def test_gin_file_builds_the_deltas(name):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(gin_utils.CONFIG_DIR / "methods" / f"{name}.gin")],
        ["unified_view_test_deltas.deltas = %DELTAS"])
    deltas = tuple(unified_view_test_deltas())
  finally:
    gin.clear_config()
  assert [type(x) for x in deltas] == GIN_FILES[name]
  if name == "mam":
    assert deltas[0].length == 30 and (deltas[1].bottleneck, deltas[1].scale) == (512, 4.0)
  if name == "lora":
    assert deltas[0].targets == ("query", "value") and deltas[0].scale == 1.0
  checks.make_model(deltas).abstract_init(checks.make_batch())  # Hashable and buildable.
