"""LoRA (Hu et al. 2021): W x + s * B(A(x)) on chosen projections, through the `projection(site, name)` hook.

For a projection with kernel `W [in, out]` the delta is `s * x @ a @ b` with `a [in, r]` initialized like
HF PEFT's `lora_A` (kaiming-uniform, a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and `b [r, out]` zero,
so training starts at the backbone. The scale follows PEFT: s = lora_alpha / r.

Projections (the backbone's `Dense` names): attention `query, key, value, out` and MLP `wi` (v1.0) or
`wi_0, wi_1` (v1.1), `wo`, and the v1.1 output layer `logits_dense`. The default, `query` and `value`,
is Hu et al.'s and PEFT's T5 default (`target_modules=['q', 'v']`). Leaves live under the projection:

```
peft/encoder/layers_i/attention/query/lora/a       [d, r]       (None, None)
peft/encoder/layers_i/attention/query/lora/b       [r, h*d_kv]  (None, None)
peft/decoder/layers_i/{self_attention,encoder_decoder_attention}/{query,...}/lora/{a,b}
peft/{encoder,decoder}/layers_i/mlp/{wi,wi_0,wi_1,wo}/lora/{a,b}
peft/decoder/logits_dense/lora/{a,b}
```

The axes are unnamed (None): PEFT leaves are replicated (docs/design.md, Partitioning).

Parameters per adapted projection: r * (in + out); on W_q and W_v of one attention 2 r (d + h d_kv)
(the survey's 4rd when h d_kv = d). `num_tasks=N` gives every leaf a leading `tasks` axis.

`peft_key` / `our_path` map our leaves to HF PEFT's state-dict names (torch weights are `[out, in]`,
ours `[in, out]`: transpose), and `merge_into_backbone` folds a trained LoRA into the kernels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix import export_formats
from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.peft import torch_compat
from prompt_mix.t5 import plugins

Array = Any

ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
MLP_PROJECTIONS = ("wi", "wi_0", "wi_1", "wo")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("logits_dense",)


def _gaussian_a(rng: Array, shape: tuple[int, ...]) -> Array:
  """PEFT's `init_lora_weights='gaussian'`: lora_A ~ normal(0, 1/r)."""
  return jax.random.normal(rng, shape, jnp.float32) / shape[1]


# PEFT's `init_lora_weights` -> (a init, b init). False keeps torch Linear's default init for both
# (kaiming-uniform(a=sqrt(5)): fan_in is `in` for A and r for B), so B is not zero.
_INITS = {True: (torch_compat.kaiming_uniform_sqrt5, torch_compat.zeros),
          "gaussian": (_gaussian_a, torch_compat.zeros),
          False: (torch_compat.kaiming_uniform_sqrt5, torch_compat.kaiming_uniform_sqrt5)}


class LoraModule(nn.Module):
  """y + s * x @ a @ b for one projection (the `projection` hook wraps its output).

  Attributes:
    out_features: the projection's output size (from its `Site`).
    rank: r.
    scale: s = alpha / r.
    dropout_rate: dropout on the LoRA input (PEFT's `lora_dropout`).
    num_tasks: None or N (leaves `[N, ...]`, gathered per example by `ctx.task_ids`).
    init_lora_weights: see `LoRA`.
  """

  out_features: int
  rank: int
  scale: float
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  init_lora_weights: Union[bool, str] = True

  @nn.compact
  def __call__(self, x: Array, y: Array, ctx: plugins.Context) -> Array:
    """x [B, n, in], y [B, n, out] -> y + s x a b [B, n, out]."""
    a_init, b_init = _INITS[self.init_lora_weights]
    a = tasks_lib.peft_param(self, "a", a_init, (x.shape[-1], self.rank),
                             (None, None), self.num_tasks)
    b = tasks_lib.peft_param(self, "b", b_init, (self.rank, self.out_features),
                             (None, None), self.num_tasks)
    if self.dropout_rate:
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=ctx.deterministic)
    a, b = jnp.asarray(a, x.dtype), jnp.asarray(b, x.dtype)
    if self.num_tasks is None:
      h = jnp.dot(jnp.dot(x, a), b)
    else:
      a, b = (tasks_lib.per_example(w, ctx, self.num_tasks) for w in (a, b))
      h = jnp.einsum("bnr,bro->bno", jnp.einsum("bni,bir->bnr", x, a), b)
    return y + jnp.asarray(h * jnp.asarray(self.scale, h.dtype), y.dtype)

  def flops(self, counter, site: plugins.Site, rows: float, dep_x: float, dep_y: float) -> float:
    """FLOPs of s * (x a) b (`prompt_mix/flops.py`): dA, d(xa), dB always, dX where x depends; every
    output row depends."""
    del dep_y
    counter.matmul(f"{site.where}/lora_a", "method", counter.batch, rows, site.in_features, self.rank,
                   counter.rows(dep_x, rows), True)
    counter.matmul(f"{site.where}/lora_b", "method", counter.batch, rows, self.rank, site.out_features,
                   rows, True)
    return rows


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoRA(plugins.Delta):
  """LoRA on chosen projections.

  Attributes:
    rank: r.
    alpha: PEFT's `lora_alpha`; the scale is s = alpha / r (He et al.'s s = 4 is alpha = 4 r).
    targets: projection names (see `PROJECTIONS`); default `('query', 'value')`.
    stacks: 'encoder' and/or 'decoder'.
    attentions: for attention projections, which attentions: 'self_attention' (encoder self and
      decoder self), 'cross_attention', or 'attention' (all) (`selection`).
    layers: 'all', ('first', k), ('last', k) or layer indices of each selected stack (`selection`).
      (`logits_dense` is not a layer and is adapted whenever targeted and the decoder is selected.)
    dropout_rate: PEFT's `lora_dropout`, on the LoRA input.
    num_tasks: None, or N for a bank of N LoRAs selected per example by `task_ids`.
    init_lora_weights: as PEFT's: True (default: A kaiming-uniform(a=sqrt(5)), B zero), 'gaussian'
      (A ~ normal(0, 1/r), B zero) or False (B kaiming-uniform too: not the backbone at init, but every
      leaf gets a gradient on the first step).
    name: the module's name under each projection (`.../query/<name>/{a,b}`); distinct names let two
      LoRAs (e.g. different ranks on attention and FFN) act on one model.
  """

  rank: int = 8
  alpha: float = 8.0
  targets: Sequence[str] = ("query", "value")
  stacks: Sequence[str] = selection.STACKS
  attentions: Sequence[str] = ("attention",)
  layers: selection.LayerSpec = selection.ALL
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  init_lora_weights: Union[bool, str] = True
  name: str = "lora"

  def __post_init__(self):
    for field in ("targets", "stacks", "attentions"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"LoRA.{field}"))
    object.__setattr__(self, "layers", selection.check_layers(self.layers, "LoRA.layers"))
    selection.check_names(self.targets, PROJECTIONS, "LoRA.targets")
    selection.check_stacks(self.stacks, "LoRA.stacks")
    object.__setattr__(self, "_attention_kinds", selection.site_kinds(self.attentions, "LoRA.attentions",
                                                                      selection.ATTENTIONS))
    if self.rank < 1:
      raise ValueError(f"LoRA.rank must be >= 1, got {self.rank}")
    if self.init_lora_weights not in _INITS:
      raise ValueError(f"LoRA.init_lora_weights: unknown {self.init_lora_weights!r}; choose from "
                       f"{tuple(_INITS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def acts_at(self, site: plugins.Site) -> bool:
    """Whether this LoRA adapts the projection at `site` (`site.projection`)."""
    if site.projection not in self.targets or site.stack not in self.stacks:
      return False
    if site.kind == "logits":
      return True
    if site.kind in selection.ATTENTION_KINDS and site.kind not in self._attention_kinds:
      return False
    return selection.layer_selected(site, self.layers, "LoRA.layers")

  def projection(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.acts_at(site):
      return None
    return LoraModule(site.out_features, self.rank, self.scale, self.dropout_rate, self.num_tasks,
                      self.init_lora_weights, name=self.name)

  # ------------------------------------------------------------------------------------------ HF PEFT
  peft_types = ("LORA",)

  def to_peft(self, leaves, config):
    """LORA with `target_modules` = the exact module names, `r`, `lora_alpha` (transposed weights)."""
    del config
    pattern = re.compile(f"/{re.escape(self.name)}/[ab]$")
    export_formats.expect_leaves(leaves, [k for k in leaves if pattern.search(k)], self)
    for path, value in leaves.items():
      r = value.shape[1] if path.endswith("/a") else value.shape[0]
      if np.ndim(value) != 2 or r != self.rank:
        raise ValueError(f"{path}: shape {list(np.shape(value))} is not a rank-{self.rank} LoRA matrix")
    state = to_peft_state_dict(flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in leaves.items()}), self.name)
    modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k).removeprefix(_PEFT_PREFIX) for k in state})
    adapter = export_formats.adapter_config(
        "LORA", r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout_rate, target_modules=modules,
        fan_in_fan_out=False, bias="none", use_rslora=False, use_dora=False, init_lora_weights=True,
        modules_to_save=None, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
        layers_pattern=None)
    return adapter, state

  @classmethod
  def from_peft(cls, adapter, tensors, config, name=None, approximate=False):
    """LORA -> `.../<proj>/<name>/{a,b}` (transposed). Exact for `bias='none'` without DoRA,
    `rank_pattern`/`alpha_pattern` or `modules_to_save`; rsLoRA's scale becomes alpha = lora_alpha sqrt(r).

    Without a backbone `config` only the tree is meaningful (the delta is a best guess of its selection).
    """
    del approximate
    problems = []
    if adapter.get("bias", "none") != "none":
      problems.append(f"bias={adapter['bias']!r} (trained biases)")
    if adapter.get("use_dora"):
      problems.append("use_dora=true")
    for field in ("rank_pattern", "alpha_pattern"):
      if adapter.get(field):
        problems.append(f"{field}={adapter[field]}")
    if adapter.get("modules_to_save"):
      problems.append(f"modules_to_save={adapter['modules_to_save']}")
    if problems:
      raise ValueError(f"LoRA options without a counterpart here: {', '.join(problems)}")
    name = name or "lora"
    tree = from_peft_state_dict(tensors, name)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}
    candidates = _selections(flat, adapter, config, name)
    if config is None:
      return candidates[0], tree
    for delta in candidates:  # The selection whose leaves on this backbone are the adapter's.
      try:
        if _leaf_shapes(delta, config) == {k: tuple(np.shape(v)) for k, v in flat.items()}:
          return delta, tree
      except ValueError:  # A selection that does not fit this backbone's depths.
        continue
    return candidates[0], tree


def lora_param_count(in_features: int, out_features: int, rank: int, num_projections: int) -> int:
  """r * (in + out) per adapted projection."""
  return rank * (in_features + out_features) * num_projections


# ------------------------------------------------------------------------------ HF PEFT names
# Our attention module names -> HF T5 (`T5Block.layer[i]`, the attention module).
_HF_ATTENTION = {
    ("encoder", "attention"): (0, "SelfAttention"),
    ("decoder", "self_attention"): (0, "SelfAttention"),
    ("decoder", "encoder_decoder_attention"): (1, "EncDecAttention"),
}
_HF_PROJECTION = {"query": "q", "key": "k", "value": "v", "out": "o",
                  "wi": "wi", "wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"}
_HF_MLP = {"wi": "DenseReluDense.wi", "wi_0": "DenseReluDense.wi_0", "wi_1": "DenseReluDense.wi_1",
           "wo": "DenseReluDense.wo"}
_PEFT_PREFIX = "base_model.model."
_OUR_PATH = re.compile(
    r"^(encoder|decoder)/layers_(\d+)/(attention|self_attention|encoder_decoder_attention|mlp)/"
    r"(query|key|value|out|wi|wi_0|wi_1|wo)/[A-Za-z0-9_]+/(a|b)$")
_OUR_LOGITS_PATH = re.compile(r"^decoder/logits_dense/[A-Za-z0-9_]+/(a|b)$")


def peft_key(path: str) -> str:
  """Our LoRA leaf path (in the `peft` tree) -> HF PEFT's saved state-dict key.

  E.g. `encoder/layers_0/attention/query/lora/a` ->
  `base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` and
  `decoder/layers_2/mlp/wo/lora/b` ->
  `base_model.model.decoder.block.2.layer.2.DenseReluDense.wo.lora_B.weight`.
  A model in memory names the same tensor with the adapter name before `.weight`
  (`...q.lora_A.default.weight`). Values transpose: torch `lora_A [r, in]` is our `a [in, r]`.
  The LoRA module's own name (`lora` by default, `LoRA.name`) is not part of the PEFT key.
  """
  path = path.strip("/")
  lora_ab = {"a": "lora_A", "b": "lora_B"}
  if _OUR_LOGITS_PATH.match(path):
    return f"{_PEFT_PREFIX}lm_head.{lora_ab[path[-1]]}.weight"
  match = _OUR_PATH.match(path)
  if match is None:
    raise ValueError(f"not a LoRA leaf path of this library: {path!r} (expected e.g. "
                     "'encoder/layers_0/attention/query/lora/a')")
  stack, layer, module, projection, ab = match.groups()
  if module == "mlp":
    if projection not in _HF_MLP:
      raise ValueError(f"{path!r}: {projection!r} is not an MLP projection")
    block = 1 if stack == "encoder" else 2
    name = f"layer.{block}.{_HF_MLP[projection]}"
  else:
    if (stack, module) not in _HF_ATTENTION:
      raise ValueError(f"{path!r}: the {stack} has no {module!r}")
    if projection not in ATTENTION_PROJECTIONS:
      raise ValueError(f"{path!r}: {projection!r} is not an attention projection")
    block, attention = _HF_ATTENTION[(stack, module)]
    name = f"layer.{block}.{attention}.{_HF_PROJECTION[projection]}"
  return f"{_PEFT_PREFIX}{stack}.block.{layer}.{name}.{lora_ab[ab]}.weight"


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\."
    r"(SelfAttention|EncDecAttention|DenseReluDense)\.(q|k|v|o|wi|wi_0|wi_1|wo)\."
    r"(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_PEFT_LM_HEAD = re.compile(r"^(?:base_model\.model\.)?lm_head\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def our_path(key: str, name: str = "lora") -> str:
  """HF PEFT state-dict key (saved, or in memory with an adapter name) -> our LoRA leaf path.

  `name` is the LoRA module's name (`LoRA.name`). Inverse of `peft_key`.
  """
  ab = {"lora_A": "a", "lora_B": "b"}
  match = _PEFT_LM_HEAD.match(key)
  if match:
    return f"decoder/logits_dense/{name}/{ab[match.group(1)]}"
  match = _PEFT_KEY.match(key)
  if match is None:
    raise ValueError(f"not an HF PEFT LoRA key of a T5 model: {key!r}")
  stack, layer, block, module, projection, lora = match.groups()
  lora_module = name
  if module == "DenseReluDense":
    module_path = f"mlp/{projection}"
  elif module == "SelfAttention":
    module_path = f"{'attention' if stack == 'encoder' else 'self_attention'}/"
  else:
    module_path = "encoder_decoder_attention/"
  if module != "DenseReluDense":
    inverse = {v: k for k, v in _HF_PROJECTION.items() if k in ATTENTION_PROJECTIONS}
    if projection not in inverse:
      raise ValueError(f"{key!r}: {projection!r} is not an attention projection")
    module_path += inverse[projection]
  path = f"{stack}/layers_{layer}/{module_path}/{lora_module}/{ab[lora]}"
  if peft_key(path).removeprefix(_PEFT_PREFIX) != _normalize(key):
    raise ValueError(f"{key!r}: block index {block} does not hold {module} in a T5 {stack} layer")
  return path


def _normalize(key: str) -> str:
  key = key.removeprefix(_PEFT_PREFIX)
  return re.sub(r"\.(lora_A|lora_B)\.[A-Za-z0-9_]+\.weight$", r".\1.weight", key)


def to_peft_state_dict(peft_tree: Any, name: str = "lora") -> dict[str, np.ndarray]:
  """Our LoRA leaves (a `peft` tree, no tasks axis) -> {PEFT key: torch-layout array [out, in]}.

  Leaves of other methods are ignored; `name` is the LoRA module's name (`LoRA.name`). A leaf with a
  leading tasks axis cannot be written as one PEFT adapter.
  """
  out = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(peft_tree)),
                                                     sep="/").items():
    if not re.search(f"/{re.escape(name)}/[ab]$", path):
      continue
    value = np.asarray(value)
    if value.ndim != 2:
      raise ValueError(f"{path}: shape {value.shape}: a per-task LoRA (leading tasks axis) has no single "
                       "PEFT adapter; export one task's slice")
    out[peft_key(path)] = value.T
  return out


def from_peft_state_dict(state_dict: Mapping[str, Any], name: str = "lora") -> dict:
  """{PEFT key: [out, in] array} (LoRA keys only) -> a nested `peft` tree of our leaves `[in, out]`."""
  flat = {tuple(our_path(k, name).split("/")): np.asarray(v).T for k, v in state_dict.items()}
  return flax.traverse_util.unflatten_dict(flat)


def merge_into_backbone(params: Any, peft_tree: Any, lora: LoRA) -> Any:
  """Folds a trained (single-task) LoRA into the backbone kernels: W <- W + s * a @ b.

  The result runs without the LoRA delta and gives the same outputs (up to float rounding).
  """
  if lora.num_tasks is not None:
    raise ValueError(f"merge_into_backbone: a LoRA with num_tasks={lora.num_tasks} has one delta per "
                     "task; there is no single merged backbone")
  flat_params = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(params)), sep="/")
  flat_peft = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(peft_tree)), sep="/")
  merged = dict(flat_params)
  suffix = f"/{lora.name}/a"
  for path, a in flat_peft.items():
    if not path.endswith(suffix):
      continue
    prefix = path[: -len(suffix)]
    kernel_path = f"{prefix}/kernel"
    if kernel_path not in merged:
      raise ValueError(f"merge_into_backbone: LoRA leaf {path} has no backbone kernel {kernel_path}")
    b = flat_peft[f"{prefix}/{lora.name}/b"]
    merged[kernel_path] = merged[kernel_path] + lora.scale * jnp.dot(a, b)
  return flax.traverse_util.unflatten_dict(merged, sep="/")


def _leaf_shapes(delta: LoRA, config: Any) -> dict[str, tuple]:
  from prompt_mix.t5 import model as model_lib  # pylint: disable=g-import-not-at-top
  batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                     "decoder_target_tokens")}
  model = model_lib.EncoderDecoderModel(config, (delta,))
  return {k: tuple(v.shape) for k, v in model_lib.flatten(nn.unbox(model.abstract_init(batch)["peft"])).items()}


def _selections(flat: Mapping[str, np.ndarray], adapter: Mapping[str, Any], config: Any,
                name: str) -> list[LoRA]:
  """LoRA(targets, stacks, attentions, layers) candidates covering the adapter's projections.

  The layers of each stack are written with positive indices, or with negative ones for the second half
  of each stack (so 'first and last layer' of unequal stacks is `(0, -1)`); the caller keeps the one whose
  leaves are the adapter's.
  """
  pattern = re.compile(r"^(encoder|decoder)/(?:layers_(\d+)/)?(attention|self_attention|"
                       r"encoder_decoder_attention|mlp|logits_dense)/?([a-z_0-9]*)/")
  targets, attentions = set(), set()
  layers: dict[str, set[int]] = {}
  for path in flat:
    match = pattern.match(path)
    if match is None:
      raise ValueError(f"not a LoRA leaf path: {path}")
    stack, layer, module, projection = match.groups()
    layers.setdefault(stack, set())
    if module == "logits_dense":
      targets.add("logits_dense")
      continue
    targets.add(projection)
    layers[stack].add(int(layer))
    if module in ("attention", "self_attention"):
      attentions.add("self_attention")
    elif module == "encoder_decoder_attention":
      attentions.add("cross_attention")
  selections = [selection.ALL]
  if config is not None:
    depth = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    if any(used and used != set(range(depth[s])) for s, used in layers.items()):
      positive = {i for used in layers.values() for i in used}
      mixed = {i if i < depth[s] / 2 else i - depth[s] for s, used in layers.items() for i in used}
      selections = [tuple(sorted(positive)), tuple(sorted(mixed))]
  rank = int(adapter["r"])
  alpha = float(adapter["lora_alpha"])
  if adapter.get("use_rslora"):
    alpha = alpha * float(np.sqrt(rank))  # PEFT's rsLoRA scale lora_alpha / sqrt(r) as our alpha / r.
  return [LoRA(rank=rank, alpha=alpha, targets=tuple(sorted(targets)), stacks=tuple(sorted(layers)),
               attentions=("attention",) if len(attentions) != 1 else tuple(attentions), layers=layers_,
               dropout_rate=float(adapter.get("lora_dropout") or 0.0), name=name)
          for layers_ in selections]
