"""The backbone parameter tree as a contract: expected shapes, validation, and config inference.

Every checkpoint reader (T5X msgpack, T5X Orbax, Hugging Face) produces the same nested dict of float32
arrays, the T5X minimal-T5 `target` tree, and this module decides whether it is the tree a `T5Config`
describes:

```
token_embedder/embedding                                   [vocab, d]
{encoder,decoder}/relpos_bias/rel_embedding                [h, buckets]
encoder/layers_i/pre_attention_layer_norm/scale            [d]
encoder/layers_i/attention/{query,key,value}/kernel        [d, h*d_kv]
encoder/layers_i/attention/out/kernel                      [h*d_kv, d]
{encoder,decoder}/layers_i/pre_mlp_layer_norm/scale        [d]
{encoder,decoder}/layers_i/mlp/wi/kernel                   [d, d_ff]     (v1.0: one input projection)
{encoder,decoder}/layers_i/mlp/{wi_0,wi_1}/kernel          [d, d_ff]     (v1.1: gated)
{encoder,decoder}/layers_i/mlp/wo/kernel                   [d_ff, d]
decoder/layers_i/pre_self_attention_layer_norm/scale       [d]
decoder/layers_i/self_attention/{query,key,value,out}/kernel
decoder/layers_i/pre_cross_attention_layer_norm/scale      [d]
decoder/layers_i/encoder_decoder_attention/{query,key,value,out}/kernel
encoder/encoder_norm/scale, decoder/decoder_norm/scale     [d]
decoder/logits_dense/kernel                                [d, vocab]    (untied logits only)
```
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix.t5.config import T5Config

Shape = tuple[int, ...]

# `relative_attention_max_distance` is not stored in a T5X checkpoint; every released T5 uses 128.
DEFAULT_MAX_DISTANCE = 128
_LAYER_RE = re.compile(r"layers_(\d+)")
# At most this many keys per category in an error message; the rest are counted.
_MAX_LISTED = 40


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that is not the backbone its config describes."""


# ----------------------------------------------------------------------------------------------------
# Nested-dict helpers ('/'-joined keys, as T5X names parameters).


def flatten(tree: Mapping[str, Any], is_leaf: Optional[Callable[[Any], bool]] = None,
            prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Mappings are nodes unless `is_leaf` says otherwise."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping) and not (is_leaf and is_leaf(value)):
      flat.update(flatten(value, is_leaf, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _listing(items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {item}" for item in shown) + more


def fmt_shape(shape: Iterable[int]) -> str:
  return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ----------------------------------------------------------------------------------------------------
# The expected tree.


def _attention(d: int, hk: int) -> dict:
  return {"query": {"kernel": (d, hk)}, "key": {"kernel": (d, hk)}, "value": {"kernel": (d, hk)},
          "out": {"kernel": (hk, d)}}


def _mlp(config: T5Config) -> dict:
  d, f = config.emb_dim, config.mlp_dim
  n = len(config.mlp_activations)
  names = ["wi"] if n == 1 else [f"wi_{i}" for i in range(n)]
  return {**{name: {"kernel": (d, f)} for name in names}, "wo": {"kernel": (f, d)}}


def expected_shapes(config: T5Config) -> dict:
  """The backbone tree of `config` with shape tuples as leaves (see the module docstring)."""
  d, hk = config.emb_dim, config.num_heads * config.head_dim
  relpos = {"rel_embedding": (config.num_heads, config.relative_attention_num_buckets)}
  scale = {"scale": (d,)}
  encoder = {"relpos_bias": relpos, "encoder_norm": scale}
  for i in range(config.num_encoder_layers):
    encoder[f"layers_{i}"] = {"pre_attention_layer_norm": scale, "attention": _attention(d, hk),
                              "pre_mlp_layer_norm": scale, "mlp": _mlp(config)}
  decoder = {"relpos_bias": relpos, "decoder_norm": scale}
  for i in range(config.num_decoder_layers):
    decoder[f"layers_{i}"] = {
        "pre_self_attention_layer_norm": scale, "self_attention": _attention(d, hk),
        "pre_cross_attention_layer_norm": scale, "encoder_decoder_attention": _attention(d, hk),
        "pre_mlp_layer_norm": scale, "mlp": _mlp(config)}
  if not config.logits_via_embedding:
    decoder["logits_dense"] = {"kernel": (d, config.vocab_size)}
  return {"token_embedder": {"embedding": (config.vocab_size, d)}, "encoder": encoder,
          "decoder": decoder}


def expected_param_shapes(config: T5Config) -> dict:
  """The backbone ('params' collection) of `config` as nested float32 `jax.ShapeDtypeStruct`s."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), expected_shapes(config),
                      is_leaf=lambda x: isinstance(x, tuple))


def describe(config: T5Config) -> str:
  """One line naming the shapes of `config`, for messages."""
  return (f"vocab {config.vocab_size}, d_model {config.emb_dim}, {config.num_heads} heads of "
          f"{config.head_dim}, d_ff {config.mlp_dim}, {config.num_encoder_layers}+"
          f"{config.num_decoder_layers} layers, mlp {'/'.join(config.mlp_activations)}, "
          f"{'tied' if config.logits_via_embedding else 'untied'} logits, "
          f"{config.relative_attention_num_buckets} relpos buckets")


# ----------------------------------------------------------------------------------------------------
# Leaves.


def to_float32(value: Any, key: str, source: str) -> np.ndarray:
  """A float leaf as a float32 numpy array (bfloat16/float16 upcast exactly; float32 untouched)."""
  if not hasattr(value, "dtype") or not hasattr(value, "shape"):
    raise CheckpointError(f"{source}: leaf {key} is a {type(value).__name__} ({str(value)[:80]!r}), "
                          "not an array")
  arr = np.asarray(value)
  if arr.dtype == np.float32:
    return arr
  if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
    raise CheckpointError(f"{source}: leaf {key} has dtype {arr.dtype}; a T5 parameter is a float")
  return arr.astype(np.float32)


def validate_params(params: Mapping[str, Any], config: T5Config, source: str) -> None:
  """Raises `CheckpointError` naming every missing, unexpected and mis-shaped key of `params`."""
  expected = flatten(expected_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  found = flatten(params)
  missing = [f"{k} {fmt_shape(s)}" for k, s in expected.items() if k not in found]
  unexpected = [f"{k} {fmt_shape(np.shape(v))}" for k, v in found.items() if k not in expected]
  misshaped = [f"{k}: expected {fmt_shape(s)}, found {fmt_shape(np.shape(found[k]))}"
               for k, s in expected.items() if k in found and tuple(np.shape(found[k])) != s]
  wrong_dtype = [f"{k}: {np.asarray(v).dtype}" for k, v in found.items()
                 if k in expected and np.asarray(v).dtype != np.float32]
  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", misshaped), ("not float32", wrong_dtype)):
    if items:
      parts.append(f"  {title} ({len(items)}):{_listing(items)}")
  if parts:
    raise CheckpointError(f"{source} is not the T5 backbone of the config ({describe(config)}):\n"
                          + "\n".join(parts))


def nonfinite_count(value: Any) -> int:
  """How many values of a float array are NaN or infinite (a float64 sum is the fast path)."""
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating):
    return 0
  if np.isfinite(np.sum(array, dtype=np.float64)):  # NaN/inf propagate; float64 cannot overflow here.
    return 0
  return int(np.count_nonzero(~np.isfinite(array)))


def check_finite(flat: Mapping[str, Any], source: str, names: Optional[Mapping[str, str]] = None) -> None:
  """Raises `CheckpointError` naming every leaf of `flat` that holds NaN or infinite values, with counts.

  A NaN in an unused embedding row would otherwise train with exit status 0 and surface much later as a
  NaN score, or be blamed on the learning rate.

  Args:
    flat: {key: array}.
    source: names the checkpoint.
    names: optional {key: what else to call it} (e.g. the T5X name of an HF key).
  """
  bad = []
  for key, value in flat.items():
    count = nonfinite_count(value)
    if count:
      also = f" (-> {names[key]})" if names and key in names else ""
      array = np.asarray(value)
      kinds = [k for k, test in (("NaN", np.isnan), ("infinite", np.isinf)) if np.any(test(array))]
      bad.append(f"{key}{also}: {count} of {array.size} values are {' or '.join(kinds)}")
  if bad:
    raise CheckpointError(f"{source} holds non-finite weights in {len(bad)} leaves (a corrupt or "
                          f"diverged checkpoint):{_listing(bad)}")


# ----------------------------------------------------------------------------------------------------
# Config inference.


def _layer_count(stack: Mapping[str, Any], name: str, source: str) -> int:
  indices = sorted(int(m.group(1)) for k in stack if (m := _LAYER_RE.fullmatch(k)))
  if not indices:
    raise CheckpointError(f"{source}: cannot infer the depth: no {name}/layers_<i> in the checkpoint")
  if indices != list(range(len(indices))):
    gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
    raise CheckpointError(f"{source}: {name} layers are not numbered 0..{indices[-1]}: missing "
                          + ", ".join(f"{name}/layers_{i}" for i in gaps))
  return len(indices)


# Which dimension of which leaf tells each shape fact: (key pattern, {fact: axis}). Every leaf that carries a
# fact votes; the value most leaves agree on wins, so one mis-shaped leaf is reported as the culprit (by
# `validate_params`) instead of being taken as the truth and blaming every correct leaf, or the config.
_ATTENTION = r"(?:attention|self_attention|encoder_decoder_attention)"
_VOTERS = (
    (re.compile(r"^token_embedder/embedding$"), {"vocab_size": 0, "emb_dim": 1}),
    (re.compile(r"^decoder/logits_dense/kernel$"), {"emb_dim": 0, "vocab_size": 1}),
    (re.compile(r"/scale$"), {"emb_dim": 0}),
    (re.compile(r"/relpos_bias/rel_embedding$"), {"num_heads": 0, "relative_attention_num_buckets": 1}),
    (re.compile(rf"/{_ATTENTION}/(?:query|key|value)/kernel$"), {"emb_dim": 0, "heads_x_head_dim": 1}),
    (re.compile(rf"/{_ATTENTION}/out/kernel$"), {"heads_x_head_dim": 0, "emb_dim": 1}),
    (re.compile(r"/mlp/wi(?:_\d+)?/kernel$"), {"emb_dim": 0, "mlp_dim": 1}),
    (re.compile(r"/mlp/wo/kernel$"), {"mlp_dim": 0, "emb_dim": 1}),
)
# The leaf whose value wins a tie (T5X's canonical leaf for the fact).
_PRIMARY = ("token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
            "encoder/layers_0/attention/query/kernel", "encoder/layers_0/mlp/wi_0/kernel",
            "encoder/layers_0/mlp/wi/kernel")


def _votes(flat: Mapping[str, Any]) -> dict[str, collections.Counter]:
  """{fact: Counter(value -> number of leaves saying so)}, primary leaves counted first (tie-break)."""
  votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  keys = [k for k in _PRIMARY if k in flat] + sorted(k for k in flat if k not in _PRIMARY)
  for key in keys:
    shape = tuple(np.shape(flat[key]))
    for pattern, axes in _VOTERS:
      if pattern.search(key) and len(shape) == (2 if len(axes) == 2 else 1):
        for fact, axis in axes.items():
          votes[fact][int(shape[axis])] += 1
        break
  return votes


def _majority(votes: Mapping[str, collections.Counter], fact: str, fallback: int) -> int:
  counter = votes.get(fact)
  return counter.most_common(1)[0][0] if counter else fallback


def infer_facts(params: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
  """The config fields a backbone tree determines, by name (plus 'gated': the MLP has wi_0/wi_1).

  Each shape fact is the value most leaves agree on (see `_VOTERS`), so a single mis-shaped leaf does not
  decide the config. `relative_attention_max_distance`, the activation functions themselves, dropout and
  dtype are not recorded in a T5X tree and are absent here.
  """
  flat = flatten(params)

  def shape(key: str, what: str) -> Shape:
    if key not in flat:
      raise CheckpointError(f"{source}: cannot infer {what}: {key} is missing")
    return tuple(np.shape(flat[key]))

  vocab, emb = shape("token_embedder/embedding", "vocab_size and emb_dim")
  heads, buckets = shape("encoder/relpos_bias/rel_embedding", "num_heads and the relpos buckets")
  shape("decoder/relpos_bias/rel_embedding", "num_heads of the decoder")
  joined = shape("encoder/layers_0/attention/query/kernel", "head_dim")[1]
  gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
  wi = "encoder/layers_0/mlp/wi_0/kernel" if gated else "encoder/layers_0/mlp/wi/kernel"
  mlp_dim = shape(wi, "mlp_dim")[1]
  votes = _votes(flat)
  vocab, emb = _majority(votes, "vocab_size", vocab), _majority(votes, "emb_dim", emb)
  heads = _majority(votes, "num_heads", heads)
  buckets = _majority(votes, "relative_attention_num_buckets", buckets)
  joined = _majority(votes, "heads_x_head_dim", joined)
  mlp_dim = _majority(votes, "mlp_dim", mlp_dim)
  if joined % heads:
    raise CheckpointError(f"{source}: the attention kernels have {joined} columns (most of them), not a "
                          f"multiple of the {heads} heads of the relpos_bias/rel_embedding leaves")
  tree = unflatten(flat)
  return dict(
      vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads, mlp_dim=mlp_dim,
      num_encoder_layers=_layer_count(tree.get("encoder", {}), "encoder", source),
      num_decoder_layers=_layer_count(tree.get("decoder", {}), "decoder", source),
      relative_attention_num_buckets=buckets, gated=gated,
      logits_via_embedding="decoder/logits_dense/kernel" not in flat)


def config_from_facts(facts: Mapping[str, Any], source: str = "the checkpoint") -> T5Config:
  """A `T5Config` from `infer_facts`; the fields a tree does not record take the T5X values."""
  fields = {k: v for k, v in facts.items() if k != "gated"}
  activations = ("gelu", "linear") if facts["gated"] else ("relu",)
  logging.info("%s: config inferred from the parameter shapes; assuming mlp_activations=%s and "
               "relative_attention_max_distance=%d (not stored in the checkpoint)", source,
               activations, DEFAULT_MAX_DISTANCE)
  return T5Config(**fields, mlp_activations=activations,
                  relative_attention_max_distance=DEFAULT_MAX_DISTANCE)


def infer_config(params: Mapping[str, Any], source: str = "the checkpoint") -> T5Config:
  """The `T5Config` of a backbone tree: every shape field from the tree, gated MLP -> gelu (v1.1)."""
  return config_from_facts(infer_facts(params, source), source)


def check_config(config: T5Config, facts: Mapping[str, Any], source: str) -> None:
  """Raises `CheckpointError` listing each field where `config` disagrees with the checkpoint's facts."""
  mismatches = []
  for field, found in facts.items():
    if field == "gated":
      if config.gated != found:
        mismatches.append(
            f"mlp_activations: given {config.mlp_activations} "
            f"({'gated' if config.gated else 'one input projection'}), but the checkpoint's MLP is "
            f"{'gated (mlp/wi_0, mlp/wi_1)' if found else 'not gated (mlp/wi)'}")
      continue
    given = getattr(config, field)
    if field == "mlp_activations":  # 'gelu_new' is the network's 'gelu' (both the tanh approximation).
      given, found = (tuple("gelu" if a == "gelu_new" else a for a in acts) for acts in (given, found))
    if given != found:
      mismatches.append(f"{field}: given {given!r}, checkpoint has {found!r}")
  if mismatches:
    raise CheckpointError(f"The given config does not match {source}:" + _listing(mismatches))
