"""Backbone loading refuses what would be silently wrong and blames the right leaf.

- NaN / infinite weights in every format (T5X msgpack, T5X Orbax, HF safetensors, HF pytorch_model.bin) are
  an error naming the leaf and the count, even in an embedding row no example uses.
- One mis-shaped leaf is named as the culprit: the config is inferred from what most leaves agree on, so
  neither the correct leaves nor a correct given config are blamed.
- A NaN embedding in an HF checkpoint with tied copies is reported as NaN, not as copies that "differ".
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import serialization

from prompt_mix.t5 import checkpoints
from prompt_mix.t5 import hf_checkpoint
from prompt_mix.t5.config import T5Config
from prompt_mix.t5.param_tree import flatten
from prompt_mix.t5.param_tree import unflatten

CheckpointError = checkpoints.CheckpointError
# A small v1.1 (gated, untied) backbone and its v1.0 (relu, tied) sibling.
V1_1 = T5Config(vocab_size=40, emb_dim=8, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                head_dim=3, mlp_dim=16, mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                relative_attention_num_buckets=8, relative_attention_max_distance=128)
V1_0 = V1_1.replace(mlp_activations=("relu",), logits_via_embedding=True)


def _params(config, seed=0) -> dict:
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      checkpoints.expected_param_shapes(config))


def _write_msgpack(directory, target) -> str:
  os.makedirs(directory, exist_ok=True)
  contents = {"version": 3, "optimizer": {"target": target, "state": {"step": np.int32(0)}}}
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  return str(directory)


def _with(params, key, value) -> dict:
  flat = dict(flatten(params))
  flat[key] = value
  return unflatten(flat)


def _write_hf(directory, config, state) -> str:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(checkpoints.config_to_hf_dict(config), f)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
  return str(directory)


# ----------------------------------------------------------------------------------------------- NaN / inf


def test_nan_in_an_unused_embedding_row_of_a_msgpack_checkpoint(tmp_path):
  params = _params(V1_1)
  embedding = params["token_embedder"]["embedding"].copy()
  embedding[37, 2] = np.nan  # A row no byte-vocabulary example ever looks up.
  step = _write_msgpack(tmp_path / "checkpoint_0", _with(params, "token_embedder/embedding", embedding))
  with pytest.raises(CheckpointError, match=r"non-finite weights in 1 leaves.*\n    token_embedder/embedding: "
                                            r"1 of 320 values are NaN"):
    checkpoints.load_backbone(step)


def test_inf_in_an_orbax_checkpoint_names_the_leaf(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = _params(V1_1)
  kernel = params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"].copy()
  kernel[:2, 0] = np.inf
  ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", {"params": _with(params, "decoder/layers_1/mlp/wo/kernel",
                                                                     kernel)})
  with pytest.raises(CheckpointError, match=r"decoder/layers_1/mlp/wo/kernel: 2 of 128 values are infinite"):
    checkpoints.load_backbone(tmp_path / "ckpt")


def test_nan_embedding_of_a_tied_hf_checkpoint_is_reported_as_nan(tmp_path):
  state = hf_checkpoint.t5x_tree_to_hf_state_dict(_params(V1_0), V1_0)  # Copies: embed_tokens, lm_head.
  shared = state["shared.weight"].copy()
  shared[5, 5] = np.nan
  for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
    state[key] = shared
  with pytest.raises(CheckpointError) as info:
    checkpoints.load_backbone(_write_hf(tmp_path / "hf", V1_0, state))
  message = str(info.value)
  assert "shared.weight (-> token_embedder/embedding): 1 of 320 values are NaN" in message
  assert "differ from shared.weight" not in message


def test_nan_in_a_pytorch_bin_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  state = hf_checkpoint.t5x_tree_to_hf_state_dict(_params(V1_1), V1_1)
  state["encoder.block.1.layer.0.SelfAttention.q.weight"][0, :] = np.nan
  os.makedirs(tmp_path / "bin")
  with open(tmp_path / "bin" / "config.json", "w") as f:
    json.dump(checkpoints.config_to_hf_dict(V1_1), f)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "bin" / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight \(-> "
                                            r"encoder/layers_1/attention/query/kernel\): 8 of 96 values are NaN"):
    checkpoints.load_backbone(tmp_path / "bin")


def test_finite_checkpoints_still_load(tmp_path):
  params = _params(V1_1)
  loaded, config = checkpoints.load_backbone(_write_msgpack(tmp_path / "checkpoint_0", params))
  assert config.replace(mlp_activations=V1_1.mlp_activations) == V1_1.replace(
      relative_attention_max_distance=config.relative_attention_max_distance)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("key, bad_shape, expected", [
    ("encoder/layers_0/attention/query/kernel", (8, 16), "[8, 12]"),  # The leaf head_dim was read from.
    ("token_embedder/embedding", (40, 9), "[40, 8]"),                 # The leaf vocab and d were read from.
    ("encoder/layers_0/mlp/wi_0/kernel", (8, 20), "[8, 16]"),         # The leaf d_ff was read from.
    ("decoder/relpos_bias/rel_embedding", (2, 8), "[4, 8]"),
])
@pytest.mark.parametrize("given_config", [False, True])
def test_one_misshaped_leaf_is_the_one_blamed(tmp_path, key, bad_shape, expected, given_config):
  params = _with(_params(V1_1), key, np.zeros(bad_shape, np.float32))
  step = _write_msgpack(tmp_path / "checkpoint_0", params)
  with pytest.raises(CheckpointError) as info:
    checkpoints.load_backbone(step, config=V1_1 if given_config else None)
  message = str(info.value)
  assert "does not match" not in message, message  # The (correct) config is not blamed.
  assert "wrong shape (1):" in message, message
  assert f"{key}: expected {expected}, found [{bad_shape[0]}, {bad_shape[1]}]" in message
