"""Hugging Face T5 checkpoints (`config.json` + safetensors or PyTorch weights) <-> the T5X tree.

A `transformers` T5 directory holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, or
either one sharded with a `*.index.json` weight map). Its state dict maps onto the T5X tree as

```
shared.weight [V, d]                                              token_embedder/embedding
{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, h]  (transposed)
                                                                  {stack}/relpos_bias/rel_embedding
encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight [out, in]  encoder/layers_i/attention/
                                                                  {query,key,value,out}/kernel (transposed)
encoder.block.i.layer.0.layer_norm.weight                         encoder/layers_i/pre_attention_layer_norm/scale
encoder.block.i.layer.1.DenseReluDense.{wi|wi_0,wi_1,wo}.weight   encoder/layers_i/mlp/.../kernel (transposed)
encoder.block.i.layer.1.layer_norm.weight                         encoder/layers_i/pre_mlp_layer_norm/scale
decoder.block.i.layer.0 (SelfAttention, layer_norm)               self_attention, pre_self_attention_layer_norm
decoder.block.i.layer.1 (EncDecAttention, layer_norm)             encoder_decoder_attention,
                                                                  pre_cross_attention_layer_norm
decoder.block.i.layer.2 (DenseReluDense, layer_norm)              mlp, pre_mlp_layer_norm
{stack}.final_layer_norm.weight                                   {stack}/{stack}_norm/scale
lm_head.weight [V, d]                                             decoder/logits_dense/kernel [d, V] (untied)
```

Tied vs untied logits. T5X's `logits_via_embedding` is "the output layer is the embedding, and the decoder
output is scaled by d_model**-0.5". In `transformers` < 5 that was `tie_word_embeddings`. `transformers` 5
forces `tie_word_embeddings=True` on every T5 config and records the scaling as `scale_decoder_outputs`
(derived from the `tie_word_embeddings` it was given); an untied `lm_head` only survives loading when the
checkpoint holds both `shared.weight` and a different `lm_head.weight`. So: the scaling decides
`logits_via_embedding`; an unscaled model without `lm_head.weight` whose config ties the embeddings has
`logits_dense = shared.T`. mT5 never scales in `transformers` 5.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import numpy as np

from prompt_mix.t5.config import T5Config
from prompt_mix.t5.param_tree import CheckpointError
from prompt_mix.t5.param_tree import check_finite
from prompt_mix.t5.param_tree import expected_shapes
from prompt_mix.t5.param_tree import flatten
from prompt_mix.t5.param_tree import fmt_shape
from prompt_mix.t5.param_tree import to_float32
from prompt_mix.t5.param_tree import unflatten
from prompt_mix.t5.param_tree import validate_params

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)

# The defaults of `transformers.T5Config`, applied (as transformers does) to fields config.json omits.
HF_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                      num_decoder_layers=None, num_heads=8, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6,
                      feed_forward_proj="relu", tie_word_embeddings=True, is_encoder_decoder=True)
_MT5_DEFAULTS = dict(vocab_size=250112, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# The T5X network's RMS norm epsilon.
LAYER_NORM_EPSILON = 1e-6
# Stored by some HF T5 checkpoints (e.g. t5-small) but unused by transformers (cross-attention has no
# relative position bias); ignored here as transformers ignores it.
UNUSED_HF_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# Copies of `shared.weight` in transformers' state dict.
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# HF activation name (after transformers' own 'gated-gelu' -> 'gelu_new') -> the network's name.
_ACT_FROM_HF = {"relu": "relu", "gelu_new": "gelu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu_new", "gelu_new": "gelu_new", "silu": "silu"}


def is_hf_dir(path: str | os.PathLike) -> bool:
  path = epath.Path(path)
  return (path / CONFIG_FILE).exists() and any((path / f).exists() for f in WEIGHT_FILES)


# ----------------------------------------------------------------------------------------------------
# config.json <-> T5Config.


def _activations_from_hf(proj: str, source: str) -> tuple[str, ...]:
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
  gated, act = len(parts) == 2, parts[-1]
  if gated and act == "gelu":  # transformers maps 'gated-gelu' to the tanh approximation.
    act = "gelu_new"
  if act not in _ACT_FROM_HF:
    raise CheckpointError(
        f"{source}: feed_forward_proj {proj!r} uses activation {act!r}, which the T5X network does not "
        f"have (it has {sorted(_ACT_FROM_HF)}; HF's non-gated 'gelu' is the exact erf GELU)")
  return (_ACT_FROM_HF[act], "linear") if gated else (_ACT_FROM_HF[act],)


def _activations_to_hf(activations: tuple[str, ...]) -> str:
  acts = tuple(activations)
  if len(acts) == 1 and acts[0] in _ACT_TO_HF:
    return _ACT_TO_HF[acts[0]]
  if len(acts) == 2 and acts[1] == "linear" and acts[0] in _ACT_TO_HF:
    return "gated-gelu" if acts[0] in ("gelu", "gelu_new") else f"gated-{_ACT_TO_HF[acts[0]]}"
  raise ValueError(f"mlp_activations {acts} have no Hugging Face T5 feed_forward_proj")


def _with_defaults(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  defaults = dict(HF_T5_DEFAULTS, **(_MT5_DEFAULTS if hf.get("model_type") == "mt5" else {}))
  absent = sorted(k for k in defaults if k not in hf)
  if absent:
    logging.info("%s: fields absent from config.json take transformers' defaults: %s", source,
                 {k: defaults[k] for k in absent})
  full = {**defaults, **{k: v for k, v in hf.items() if v is not None or k not in defaults}}
  if full["num_decoder_layers"] is None:
    full["num_decoder_layers"] = full["num_layers"]
  return full


def logits_scaled(hf: Mapping[str, Any]) -> bool:
  """Whether the HF model scales the decoder output by d_model**-0.5 (T5X's tied logits)."""
  if hf.get("model_type") == "mt5":
    return False
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def lm_head_tied(hf: Mapping[str, Any]) -> bool:
  """Whether transformers ties `lm_head` to `shared` when the weights lack `lm_head.weight`.

  transformers 5 forces the tie for mT5; a T5 config that says `tie_word_embeddings: false` (written by
  transformers < 5) has no tie, and a checkpoint of it without `lm_head.weight` is incomplete.
  """
  if hf.get("model_type") == "mt5":
    return True
  return bool(hf.get("tie_word_embeddings", HF_T5_DEFAULTS["tie_word_embeddings"]))


def hf_config_to_t5(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> T5Config:
  """`T5Config` of a Hugging Face T5 `config.json` dict (`model_type` 't5' or 'mt5')."""
  model_type = hf.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise CheckpointError(f"{source}: model_type {model_type!r} is not a T5 this network implements "
                          "('t5' or 'mt5'; umT5 has per-layer relative position biases)")
  full = _with_defaults(hf, source)
  if not full["is_encoder_decoder"]:
    raise CheckpointError(f"{source}: is_encoder_decoder is false; the backbone is an encoder-decoder")
  if not np.isclose(full["layer_norm_epsilon"], LAYER_NORM_EPSILON, rtol=0, atol=1e-12):
    raise CheckpointError(f"{source}: layer_norm_epsilon {full['layer_norm_epsilon']} differs from the "
                          f"network's fixed {LAYER_NORM_EPSILON}")
  return T5Config(
      vocab_size=int(full["vocab_size"]), emb_dim=int(full["d_model"]), num_heads=int(full["num_heads"]),
      num_encoder_layers=int(full["num_layers"]), num_decoder_layers=int(full["num_decoder_layers"]),
      head_dim=int(full["d_kv"]), mlp_dim=int(full["d_ff"]),
      mlp_activations=_activations_from_hf(full["feed_forward_proj"], source),
      logits_via_embedding=logits_scaled(full),
      relative_attention_num_buckets=int(full["relative_attention_num_buckets"]),
      relative_attention_max_distance=int(full["relative_attention_max_distance"]),
      dropout_rate=float(full["dropout_rate"]))


def config_to_hf_dict(config: T5Config) -> dict[str, Any]:
  """The `config.json` dict (kwargs of `transformers.T5Config`) of a `T5Config`.

  `tie_word_embeddings` carries `logits_via_embedding` (transformers < 5 semantics; transformers 5 turns
  it into `scale_decoder_outputs`). Under transformers 5 a model built from this dict still ties
  `lm_head` to `shared`; `hf_t5_model` builds one with a separate `lm_head`.
  """
  return dict(
      model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=config.vocab_size,
      d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
      num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
      num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      dropout_rate=config.dropout_rate, layer_norm_epsilon=LAYER_NORM_EPSILON,
      feed_forward_proj=_activations_to_hf(config.mlp_activations),
      tie_word_embeddings=bool(config.logits_via_embedding), is_encoder_decoder=True,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def hf_t5_model(config: T5Config, params: Optional[Mapping[str, Any]] = None):
  """A `transformers.T5ForConditionalGeneration` (eval mode) with exactly this backbone.

  Args:
    config: the backbone's config.
    params: a T5X tree to load (strictly); None keeps transformers' random initialization (with an
      untied `lm_head` drawn from N(0, 1) as transformers initializes untied heads).

  Untied logits need care under transformers 5: its T5 config forces `tie_word_embeddings=True`
  (setting it False afterwards unties the stacks' token embeddings from `shared` as well), so the model
  is built tied and only `lm_head` is given its own parameter; saved, it keeps a separate
  `lm_head.weight`, which `from_pretrained` honours.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("hf_t5_model needs `torch` and `transformers` (the project's test extras)") from e
  hf = dict(config_to_hf_dict(config))
  hf.pop("model_type")
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf))
  if not config.logits_via_embedding and model.lm_head.weight is model.shared.weight:
    head = torch.empty_like(model.lm_head.weight.detach())
    torch.nn.init.normal_(head, mean=0.0, std=1.0)
    model.lm_head.weight = torch.nn.Parameter(head)
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is not None:
      tied.pop("lm_head.weight", None)
  if params is not None:
    state = t5x_tree_to_hf_state_dict(params, config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return model.eval()


# ----------------------------------------------------------------------------------------------------
# State dict <-> T5X tree.


def hf_key_map(config: T5Config) -> list[tuple[str, str, bool]]:
  """[(HF key, T5X key, transposed)] for every backbone parameter of `config`."""
  pairs = [("shared.weight", "token_embedder/embedding", False)]
  mlp_names = ["wi"] if len(config.mlp_activations) == 1 else [
      f"wi_{i}" for i in range(len(config.mlp_activations))]

  def attention(hf: str, t5x: str):
    for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
      pairs.append((f"{hf}.{a}.weight", f"{t5x}/{b}/kernel", True))

  def mlp(hf: str, t5x: str):
    for name in mlp_names + ["wo"]:
      pairs.append((f"{hf}.DenseReluDense.{name}.weight", f"{t5x}/mlp/{name}/kernel", True))
    pairs.append((f"{hf}.layer_norm.weight", f"{t5x}/pre_mlp_layer_norm/scale", False))

  for stack, depth in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    pairs.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  f"{stack}/relpos_bias/rel_embedding", True))
    for i in range(depth):
      hf, t5x = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
      if stack == "encoder":
        attention(f"{hf}.0.SelfAttention", f"{t5x}/attention")
        pairs.append((f"{hf}.0.layer_norm.weight", f"{t5x}/pre_attention_layer_norm/scale", False))
        mlp(f"{hf}.1", t5x)
      else:
        attention(f"{hf}.0.SelfAttention", f"{t5x}/self_attention")
        pairs.append((f"{hf}.0.layer_norm.weight", f"{t5x}/pre_self_attention_layer_norm/scale", False))
        attention(f"{hf}.1.EncDecAttention", f"{t5x}/encoder_decoder_attention")
        pairs.append((f"{hf}.1.layer_norm.weight", f"{t5x}/pre_cross_attention_layer_norm/scale", False))
        mlp(f"{hf}.2", t5x)
    pairs.append((f"{stack}.final_layer_norm.weight", f"{stack}/{stack}_norm/scale", False))
  if not config.logits_via_embedding:
    pairs.append(("lm_head.weight", "decoder/logits_dense/kernel", True))
  return pairs


def hf_state_dict_to_t5x_tree(state_dict: Mapping[str, Any], config: T5Config, source: str,
                              lm_head_tied: bool = False) -> dict[str, Any]:
  """The T5X tree (float32) of an HF T5 state dict, every key accounted for.

  Args:
    state_dict: HF key -> array ([out, in] for linear layers).
    config: the backbone's config (from config.json).
    source: names the checkpoint in errors.
    lm_head_tied: the HF config ties `lm_head` to `shared`, so an untied-logits model without
      `lm_head.weight` takes `shared.weight` as its output layer (what transformers does).

  Raises:
    CheckpointError: naming every missing, unexpected and mis-shaped HF key, every key holding NaN or
      infinite values (before comparing copies: a NaN embedding is reported as NaN, not as a copy that
      differs), or copies of the embedding that differ from `shared.weight`.
  """
  t5x_names = {hf_key: t5x_key for hf_key, t5x_key, _ in hf_key_map(config)}
  check_finite(state_dict, source, t5x_names)
  expected = flatten(expected_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  remaining = dict(state_dict)
  flat, missing, misshaped = {}, [], []
  for hf_key, t5x_key, transposed in hf_key_map(config):
    hf_shape = expected[t5x_key][::-1] if transposed else expected[t5x_key]
    if hf_key not in remaining:
      if hf_key == "lm_head.weight" and lm_head_tied and "shared.weight" in state_dict:
        logging.info("%s: no lm_head.weight and the config ties it: logits_dense = shared.weight.T",
                     source)
        value = state_dict["shared.weight"]
      else:
        missing.append(f"{hf_key} {fmt_shape(hf_shape)} (-> {t5x_key})")
        continue
    else:
      value = remaining.pop(hf_key)
    if tuple(np.shape(value)) != hf_shape:
      misshaped.append(f"{hf_key} (-> {t5x_key}): expected {fmt_shape(hf_shape)}, "
                       f"found {fmt_shape(np.shape(value))}")
      continue
    value = to_float32(value, hf_key, source)
    flat[t5x_key] = np.ascontiguousarray(value.T) if transposed else value

  shared = state_dict.get("shared.weight")
  copies = list(EMBEDDING_COPIES) + (["lm_head.weight"] if config.logits_via_embedding else [])
  differing = []
  for key in copies:
    if key in remaining:
      value = remaining.pop(key)
      if shared is None or np.shape(value) != np.shape(shared) or not np.array_equal(
          to_float32(value, key, source), to_float32(shared, "shared.weight", source)):
        differing.append(key)
  for key in UNUSED_HF_KEYS:
    if remaining.pop(key, None) is not None:
      logging.info("%s: ignoring %s (unused by transformers' T5 too)", source, key)
  unexpected = [f"{k} {fmt_shape(np.shape(v))}" for k, v in sorted(remaining.items())]

  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
    if items:
      parts.append(f"  {title} ({len(items)}):" + "".join(f"\n    {i}" for i in items))
  if differing:
    what = ("differ from shared.weight; with the decoder output scaled (tied logits, "
            "tie_word_embeddings / scale_decoder_outputs true) the output layer must be the embedding")
    parts.append(f"  {', '.join(differing)} {what}")
  if parts:
    raise CheckpointError(f"{source} is not the Hugging Face T5 its config.json describes:\n"
                          + "\n".join(parts))
  return unflatten(flat)


def t5x_tree_to_hf_state_dict(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
  """The state dict of `transformers.T5ForConditionalGeneration` (float32 numpy) for a T5X tree.

  All of `model.state_dict()`'s keys are produced, including the copies of the embedding
  (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`) and `lm_head.weight` (the embedding when
  the logits are tied), so `model.load_state_dict(..., strict=True)` accepts it.
  """
  validate_params(params, config, "the given params")
  flat = flatten(params)
  state = {}
  for hf_key, t5x_key, transposed in hf_key_map(config):
    value = np.asarray(flat[t5x_key], np.float32)
    state[hf_key] = np.ascontiguousarray(value.T) if transposed else value
  for key in EMBEDDING_COPIES:
    state[key] = state["shared.weight"]
  if config.logits_via_embedding:
    state["lm_head.weight"] = state["shared.weight"]
  return state


# ----------------------------------------------------------------------------------------------------
# Files.


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  file = epath.Path(path) / CONFIG_FILE
  try:
    return json.loads(file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: cannot read the Hugging Face config: {e}") from e


def _read_safetensors(file: epath.Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  try:
    with safe_open(os.fspath(file), framework="np") as f:
      bf16 = []
      for key in f.keys():
        if f.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16: read those through JAX.
          bf16.append(key)
        else:
          out[key] = f.get_tensor(key)
    if bf16:
      import jax  # pylint: disable=g-import-not-at-top
      with jax.default_device(jax.devices("cpu")[0]), safe_open(os.fspath(file), framework="flax") as f:
        for key in bf16:
          out[key] = np.asarray(f.get_tensor(key), np.float32)
  except Exception as e:  # SafetensorError, OSError, ...
    raise CheckpointError(f"{file}: cannot read the safetensors file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e
  return out


def _read_torch(file: epath.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f"{file}: reading PyTorch weights needs `torch` (pip install torch), or "
                          "convert the checkpoint to safetensors") from e
  try:
    with file.open("rb") as fp:
      state = torch.load(fp, map_location="cpu", weights_only=True)
  except Exception as e:  # RuntimeError / UnpicklingError / EOFError on truncation.
    raise CheckpointError(f"{file}: cannot read the PyTorch weights (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def _read_sharded(path: epath.Path, index_name: str, reader) -> dict[str, np.ndarray]:
  index_file = path / index_name
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_file}: cannot read the weight map of the sharded checkpoint: "
                          f"{type(e).__name__}: {e}") from e
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_file = path / shard
    if not shard_file.exists():
      raise CheckpointError(f"{index_file} names the shard {shard}, which does not exist in {path}")
    for key, value in reader(shard_file).items():
      if key in out:
        raise CheckpointError(f"{shard_file}: key {key} is also in another shard")
      out[key] = value
  unlisted = sorted(set(weight_map) - set(out))
  if unlisted:
    raise CheckpointError(f"{index_file} lists keys that no shard holds: {', '.join(unlisted[:20])}")
  return out


def read_hf_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """(state dict, weights file name) of an HF directory; safetensors preferred over PyTorch."""
  path = epath.Path(path)
  if (path / SAFETENSORS_FILE).exists():
    return _read_safetensors(path / SAFETENSORS_FILE), os.fspath(path / SAFETENSORS_FILE)
  if (path / SAFETENSORS_INDEX).exists():
    return _read_sharded(path, SAFETENSORS_INDEX, _read_safetensors), os.fspath(path / SAFETENSORS_INDEX)
  if (path / TORCH_FILE).exists():
    return _read_torch(path / TORCH_FILE), os.fspath(path / TORCH_FILE)
  if (path / TORCH_INDEX).exists():
    return _read_sharded(path, TORCH_INDEX, _read_torch), os.fspath(path / TORCH_INDEX)
  raise CheckpointError(f"{path}: no Hugging Face weights (looked for {', '.join(WEIGHT_FILES)})")


def read_hf_backbone(path: str | os.PathLike) -> tuple[dict[str, Any], T5Config]:
  """(T5X tree of float32 numpy arrays, config from config.json) of an HF T5 directory."""
  hf = read_hf_config(path)
  config = hf_config_to_t5(hf, os.fspath(epath.Path(path) / CONFIG_FILE))
  state, source = read_hf_state_dict(path)
  tree = hf_state_dict_to_t5x_tree(state, config, source, lm_head_tied=lm_head_tied(hf))
  logging.info("Read %d HF tensors from %s as the T5X tree (%s)", len(state), source,
               "tied logits" if config.logits_via_embedding else "untied logits")
  return tree, config
