"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): trainable keys and values.

At every chosen attention site (`stacks`, `attentions` and `layers` in the vocabulary of `selection`: by
default encoder self-attention, decoder self-attention and cross-attention of every layer) the method
gives l extra keys and values
`P_k, P_v [l, h, d_kv]`, which the backbone prepends to the attention's own (`attention_kv` hook): they are
visible from every query, carry no relative position bias, and sit ahead of the KV cache during cached
decoding (recomputed at each step).

**P-tuning v2** (`reparameterize=False`, or `PTuningV2`) trains the prefixes directly:

```
peft/encoder/layers_i/attention/p_tuning_v2/{key,value}                          [l, h, d_kv]
peft/decoder/layers_i/{self_attention,encoder_decoder_attention}/p_tuning_v2/{key,value}
```

2 * l * h * d_kv parameters per site.

**Prefix tuning** (`reparameterize=True`) computes them during training as an MLP of a smaller
embedding, `[P_k; P_v] = tanh(P' W_i + b_i) W_o + b_o`, with P' [l, d'] (d' = `prefix_embed_dim`,
default d_model) and hidden size H = `mlp_hidden`. Where the MLP lives (`reparameterization`):

* `'shared'` (the default, as Li & Liang's and He et al.'s code and HF PEFT's `PrefixEncoder`): one P'
  and one MLP per attention kind (encoder self, decoder self, cross-attention), whose output holds the
  keys and values of every chosen layer of that kind. It runs once per stack (the `stack_state` hook);
  its kernels and biases start as PyTorch's `nn.Linear` (kaiming-uniform a=sqrt(5), bias
  U(+-1/sqrt(fan_in))), P' as `nn.Embedding` (N(0, 1)):

  ```
  peft/<stack>/prefix_tuning/<kind>/embedding   [l, d']                 ('prompt', 'prompt_embed')
  peft/<stack>/prefix_tuning/<kind>/mlp_wi      [d', H]    mlp_bi [H]
  peft/<stack>/prefix_tuning/<kind>/mlp_wo      [H, L, 2, h, d_kv]      (L chosen layers; 2 = key, value)
  peft/<stack>/prefix_tuning/<kind>/mlp_bo      [L, 2, h, d_kv]
  ```
  (<kind> is `attention` in the encoder, `self_attention` or `cross_attention` in the decoder.)
  Per attention kind: l*d' + d'*H + H + L*(H+1)*2*h*d_kv.

* `'per_site'`: each attention site has its own P' and MLP (LeCun-normal kernels, zero biases):

  ```
  peft/<site>/prefix_tuning/{embedding [l, d'], mlp_wi [d', H], mlp_bi [H], mlp_wo [H, 2, h, d_kv],
                            mlp_bo [2, h, d_kv]}
  ```
  l*d' + d'*H + H + H*2*h*d_kv + 2*h*d_kv per site: more parameters during training (the H*d' and H
  columns repeat per layer), the same prefixes at inference.

After training, `bake` evaluates the MLPs once and returns the flat prefixes with the equivalent
`PTuningV2` delta (same logits, no MLP), for either form.

With `num_tasks=N` every leaf gains a leading `tasks` axis (a bank of N independently trained prefixes,
gathered per example by `task_ids`). Prefix leaves are replicated (docs/design.md, Partitioning), hence the `None` axes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import flax
import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from prompt_mix import export_formats
from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.peft import torch_compat
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any

FLAT_AXES = ("prompt", None, None)  # [l, h, d_kv], replicated.
REPARAM_LEAVES = ("embedding", "mlp_wi", "mlp_bi", "mlp_wo", "mlp_bo")

REPARAMETERIZATIONS = ("shared", "per_site")

_normal = nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding's init, as HF PEFT's PrefixEncoder.
_zeros = nn.initializers.zeros


def reparameterized_kv(embedding: Array, wi: Array, bi: Array, wo: Array, bo: Array
                       ) -> tuple[Array, Array]:
  """Li & Liang's MLP: `tanh(P' W_i + b_i) W_o + b_o`, split into keys and values.

  Args:
    embedding: [..., l, d'] (a leading `tasks` axis, if any, is shared by every argument).
    wi: [..., d', H]; bi: [..., H]; wo: [..., H, 2, h, d_kv]; bo: [..., 2, h, d_kv]. The shared form's
      `wo [..., H, L, 2, h, d_kv]` / `bo [..., L, 2, h, d_kv]` give every layer's at once.
  Returns:
    (keys, values), each [..., l, h, d_kv] (or [..., L, l, h, d_kv]) float32.
  """
  hidden = jnp.tanh(jnp.einsum("...ld,...dh->...lh", embedding, wi) + bi[..., None, :])
  if wo.ndim - embedding.ndim == 3:  # Shared: [..., H, L, 2, h, d_kv].
    out = jnp.einsum("...lh,...hncjd->...nlcjd", hidden, wo) + bo[..., :, None, :, :, :]
  else:
    out = jnp.einsum("...lh,...hcjd->...lcjd", hidden, wo) + bo[..., None, :, :, :]
  return out[..., 0, :, :], out[..., 1, :, :]


class SharedPrefixMLP(nn.Module):
  """The shared form's P' and MLP of one attention kind: every chosen layer's prefix, once per stack.

  Attributes:
    delta: the `PrefixTuning` configuration.
    num_layers: L, the chosen layers of this kind.
  """

  delta: "PrefixTuning"
  num_layers: int
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, ctx: plugins.Context) -> tuple[Array, Array]:
    """-> (keys, values), each [(N,) L, l, h, d_kv] (N with a task bank)."""
    delta = self.delta
    h, dk, big_l = self.num_heads, self.head_dim, self.num_layers
    l, n, hid = delta.length, delta.num_tasks, delta.mlp_hidden
    d_emb = delta.prefix_embed_dim or ctx.embedding.shape[-1]
    param = lambda name, init, shape, axes: tasks_lib.peft_param(self, name, init, shape, axes, n)
    embedding = param("embedding", _normal, (l, d_emb), ("prompt", "prompt_embed"))
    wi = param("mlp_wi", torch_compat.linear_uniform(d_emb), (d_emb, hid), ("prompt_embed", None))
    bi = param("mlp_bi", torch_compat.linear_uniform(d_emb), (hid,), (None,))
    wo = param("mlp_wo", torch_compat.linear_uniform(hid), (hid, big_l, 2, h, dk), (None,) * 5)
    bo = param("mlp_bo", torch_compat.linear_uniform(hid), (big_l, 2, h, dk), (None,) * 4)
    keys, values = reparameterized_kv(embedding, wi, bi, wo, bo)
    if delta.dropout_rate:  # He et al.'s prefix dropout, on the MLP's output.
      dropout = nn.Dropout(delta.dropout_rate)
      keys = dropout(keys, deterministic=ctx.deterministic)
      values = dropout(values, deterministic=ctx.deterministic)
    return keys, values


class PrefixState(nn.Module):
  """The stack-level state of a shared prefix: {site kind: (keys, values) of its chosen layers}."""

  delta: "PrefixTuning"
  layers: tuple  # ((kind, (chosen layer, ...)), ...)
  num_heads: int
  head_dim: int

  def setup(self):
    self.mlps = {kind: SharedPrefixMLP(self.delta, len(chosen), self.num_heads, self.head_dim, name=kind)
                 for kind, chosen in self.layers}

  def __call__(self, ctx: plugins.Context) -> dict:
    return {kind: self.mlps[kind](ctx) for kind, _ in self.layers}

  def flops(self, counter, site: plugins.Site) -> None:
    """FLOPs of each kind's shared MLP, once per stack and step for every task of a bank
    (`prompt_mix/flops.py`): `P' W_i` and `tanh(.) W_o` with W_o emitting the L chosen layers."""
    delta = self.delta
    tasks, l, hid = delta.num_tasks or 1, delta.length, delta.mlp_hidden
    d_emb = delta.prefix_embed_dim or site.d_model
    for kind, chosen in self.layers:
      where = f"{site.stack}/{delta.name}/{kind}"
      counter.matmul(f"{where}/prefix_mlp_wi", "method", tasks, l, d_emb, hid, l, True)
      counter.matmul(f"{where}/prefix_mlp_wo", "method", tasks, l, hid,
                     len(chosen) * 2 * self.num_heads * self.head_dim, l, True)


class PrefixKV(nn.Module):
  """The prefix of one attention site: its own leaves, or its slice of the stack's shared MLP output.

  Attributes:
    delta: the `PrefixTuning` configuration.
    slot: with the shared MLP, this layer's index among the chosen layers of its kind; None otherwise.
    kind: with the shared MLP, the site's kind (the key of the stack state).
  """

  delta: "PrefixTuning"
  slot: Optional[int] = None
  kind: Optional[str] = None

  @nn.compact
  def __call__(self, q: Array, ctx: plugins.Context) -> tuple[Array, Array]:
    """q [B, q, h, d_kv] -> (keys, values), each [B, l, h, d_kv] (each example's task prefix)."""
    delta = self.delta
    h, dk = q.shape[2], q.shape[3]
    l, n = delta.length, delta.num_tasks
    param = lambda name, init, shape, axes: tasks_lib.peft_param(self, name, init, shape, axes, n)
    if self.slot is not None:
      keys, values = ctx.state[self.kind]  # [(N,) L, l, h, d_kv]
      keys, values = keys[..., self.slot, :, :, :], values[..., self.slot, :, :, :]
    elif delta.reparameterize:
      d_emb = delta.prefix_embed_dim or ctx.embedding.shape[-1]
      hid = delta.mlp_hidden
      embedding = param("embedding", _normal, (l, d_emb), ("prompt", "prompt_embed"))
      wi = param("mlp_wi", nn.initializers.lecun_normal(), (d_emb, hid), ("prompt_embed", None))
      bi = param("mlp_bi", _zeros, (hid,), (None,))
      wo = param("mlp_wo", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3)), (hid, 2, h, dk),
                 (None, None, None, None))
      bo = param("mlp_bo", _zeros, (2, h, dk), (None, None, None))
      keys, values = reparameterized_kv(embedding, wi, bi, wo, bo)
    else:
      keys = param("key", _normal, (l, h, dk), FLAT_AXES)
      values = param("value", _normal, (l, h, dk), FLAT_AXES)
    return tasks_lib.per_example(keys, ctx, n), tasks_lib.per_example(values, ctx, n)

  def flops(self, counter, site: plugins.Site, tq: float, tk: float) -> int:
    """FLOPs of this site's MLP `tanh(P' W_i + b_i) W_o + b_o` for every task of a bank (once per step:
    it does not depend on the batch), `prompt_mix/flops.py`; returns the l extra keys."""
    del tq, tk
    delta = self.delta
    if delta.reparameterize and self.slot is None:  # The per-site MLP; a shared one is the stack's.
      tasks = delta.num_tasks or 1
      d_emb = delta.prefix_embed_dim or site.d_model
      counter.matmul(f"{site.where}/prefix_mlp_wi", "method", tasks, delta.length, d_emb,
                     delta.mlp_hidden, delta.length, True)
      counter.matmul(f"{site.where}/prefix_mlp_wo", "method", tasks, delta.length, delta.mlp_hidden,
                     2 * site.num_heads * site.head_dim, delta.length, True)
    return delta.length


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrefixTuning(plugins.Delta):
  """Prefix tuning: l trainable keys and values per chosen attention site (module docstring).

  Attributes:
    length: l, the prefix length.
    stacks: 'encoder' and/or 'decoder' (`selection`).
    attentions: 'attention' (every attention), 'self_attention', 'cross_attention' (`selection`): the
      default, every attention of both stacks, is encoder self, decoder self and cross-attention.
    layers: 'all', ('first', k), ('last', k) or a list of layer indices (`selection`).
    reparameterize: True trains P' and an MLP (Li & Liang); False trains flat prefixes (P-tuning v2).
    reparameterization: with `reparameterize`, 'shared' (one P' and MLP per attention kind emitting every
      chosen layer's prefixes, as Li & Liang, He et al. and HF PEFT) or 'per_site' (one per site).
    prefix_embed_dim: d' of P' (default d_model); only with `reparameterize`.
    mlp_hidden: H, the MLP's hidden size; only with `reparameterize`.
    dropout_rate: dropout on the shared MLP's output (He et al.'s prefix dropout; 0 by default).
    num_tasks: None for one prefix, N for a bank gathered per example by `task_ids`.
    name: the scope name at each site (`peft/<site>/<name>/...`).
  """

  length: int = 10
  stacks: Sequence[str] = selection.STACKS
  attentions: Sequence[str] = ("attention",)
  layers: selection.LayerSpec = selection.ALL
  reparameterize: bool = True
  reparameterization: str = "shared"
  prefix_embed_dim: Optional[int] = None
  mlp_hidden: int = 512
  dropout_rate: float = 0.0
  num_tasks: Optional[int] = None
  name: str = "prefix_tuning"

  def __post_init__(self):
    kind = type(self).__name__
    object.__setattr__(self, "stacks", selection.check_stacks(self.stacks, f"{kind}.stacks"))
    object.__setattr__(self, "attentions", selection.as_tuple(self.attentions, f"{kind}.attentions"))
    object.__setattr__(self, "_kinds", selection.site_kinds(self.attentions, f"{kind}.attentions",
                                                            selection.ATTENTIONS))
    object.__setattr__(self, "layers", selection.check_layers(self.layers, f"{kind}.layers"))
    if not isinstance(self.length, int) or self.length < 1:
      raise ValueError(f"{kind}.length must be a positive int, got {self.length!r}")
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"{kind}.num_tasks must be None or >= 1, got {self.num_tasks}")
    if self.reparameterization not in REPARAMETERIZATIONS:
      raise ValueError(f"{kind}.reparameterization: unknown {self.reparameterization!r}; choose from "
                       f"{REPARAMETERIZATIONS}")
    if self.dropout_rate and not (self.reparameterize and self.shared):
      raise ValueError(f"{kind}.dropout_rate={self.dropout_rate} acts on the shared MLP's output: it needs "
                       "reparameterize=True and reparameterization='shared'")
    if self.mlp_hidden < 1 or (self.prefix_embed_dim is not None and self.prefix_embed_dim < 1):
      raise ValueError(f"{kind}: mlp_hidden ({self.mlp_hidden}) and prefix_embed_dim "
                       f"({self.prefix_embed_dim}) must be positive")

  def acts_at(self, site: plugins.Site) -> bool:
    """True when this delta gives a prefix at attention `site`."""
    return selection.selects(site, self.stacks, self.layers, self._kinds, f"{type(self).__name__}.layers")

  @property
  def shared(self) -> bool:
    """True when the prefixes come from one MLP per attention kind (the `stack_state` hook)."""
    return self.reparameterize and self.reparameterization == "shared"

  def _chosen(self, site: plugins.Site) -> tuple:
    """((kind, (chosen layers of that kind, ascending)), ...) of `site`'s stack."""
    out = []
    for kind in plugins.STACK_ATTENTIONS[site.stack]:
      chosen = tuple(i for i in range(site.num_layers)
                     if self.acts_at(dataclasses.replace(site, layer=i, kind=kind)))
      if chosen:
        out.append((kind, chosen))
    return tuple(out)

  def stack_state(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.shared or site.stack not in self.stacks:
      return None
    layers = self._chosen(site)
    return PrefixState(self, layers, site.num_heads, site.head_dim, name=self.name) if layers else None

  def attention_kv(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.acts_at(site):
      return None
    if self.shared:
      chosen = dict(self._chosen(site))[site.kind]
      return PrefixKV(self, chosen.index(site.layer), site.kind, name=self.name)
    return PrefixKV(self, name=self.name)

  def num_sites(self, config: T5Config) -> int:
    """The number of attention sites with a prefix."""
    return sum(self.acts_at(s) for s in plugins.sublayer_sites(config))

  # ------------------------------------------------------------------------------------------ HF PEFT
  peft_types = ("PREFIX_TUNING",)

  def to_peft(self, leaves, config):
    """Refused, with the reason per kind of attention site (see `peft_refusal`)."""
    del leaves
    raise peft_refusal([s.where for s in plugins.sublayer_sites(config) if self.acts_at(s)], self)

  @classmethod
  def from_peft(cls, adapter, tensors, config, name=None, approximate=False):
    """PEFT's T5 prefix as decoder self-attention P-tuning v2 prefixes: `approximate=True` only.

    Each decoder layer's self-attention gets the prefix it gets in PEFT (`peft_prefix_tuning_table`'s
    layout). Our prefix keys carry no relative position bias and PEFT's do: an initialization, not the
    same model.
    """
    del config
    if not approximate:
      raise ValueError(
          "a PEFT PREFIX_TUNING adapter of T5 acts on decoder self-attention with relative position bias "
          "on its prefix keys, which our prefixes do not have; pass approximate_prefix=True to read it as "
          "decoder self-attention P-tuning v2 prefixes (an initialization, not the same model)")
    submodules = adapter.get("num_transformer_submodules") or export_formats.PEFT_SEQ2SEQ_SUBMODULES
    if submodules != export_formats.PEFT_SEQ2SEQ_SUBMODULES:
      raise ValueError(f"num_transformer_submodules {submodules}: PEFT's T5 prefix works with "
                       f"{export_formats.PEFT_SEQ2SEQ_SUBMODULES} (an encoder-decoder cache)")
    l, depth = int(adapter["num_virtual_tokens"]), int(adapter["num_layers"])
    h, width = int(adapter["num_attention_heads"]), int(adapter["token_dim"])
    table = np.asarray(tensors[export_formats.PEFT_PROMPT_KEY])
    if table.shape != (l, 2 * depth * width) or width % h:
      raise ValueError(f"{export_formats.PEFT_PROMPT_KEY} has shape {list(table.shape)}, expected "
                       f"[{l}, {2 * depth * width}] (num_virtual_tokens, 2 num_layers token_dim) with "
                       f"token_dim {width} divisible by num_attention_heads {h}")
    entries = np.asarray(table, np.float32).reshape(l, 2 * depth, h, width // h)
    logging.warning("Reading PEFT prefixes as decoder self-attention prefixes without relative position "
                    "bias: an initialization, not the same model")
    delta = PTuningV2(length=l, stacks=("decoder",), attentions=("self_attention",),
                      name=name or "p_tuning_v2")
    tree: dict = {"decoder": {}}
    for i in range(depth):
      slot = (4 * i) % (2 * depth)
      tree["decoder"][f"layers_{i}"] = {"self_attention": {delta.name: {
          "key": np.array(entries[:, slot]), "value": np.array(entries[:, slot + 1])}}}
    return delta, tree

  def param_count(self, config: T5Config) -> int:
    """Trainable parameters (module docstring formulas), times N for a bank."""
    l, hkv = self.length, config.num_heads * config.head_dim
    d_emb, hid = self.prefix_embed_dim or config.emb_dim, self.mlp_hidden
    if self.shared:
      kinds = {}
      for site in plugins.sublayer_sites(config):
        if self.acts_at(site):
          kinds[(site.stack, site.kind)] = kinds.get((site.stack, site.kind), 0) + 1
      total = sum(l * d_emb + d_emb * hid + hid + layers * (hid + 1) * 2 * hkv for layers in kinds.values())
    elif self.reparameterize:
      total = (l * d_emb + d_emb * hid + hid + hid * 2 * hkv + 2 * hkv) * self.num_sites(config)
    else:
      total = 2 * l * hkv * self.num_sites(config)
    return total * (self.num_tasks or 1)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PTuningV2(PrefixTuning):
  """P-tuning v2 (deep prompt tuning): `PrefixTuning` with flat prefixes, no MLP, by default."""

  reparameterize: bool = False
  name: str = "p_tuning_v2"


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def bake(variables: Mapping[str, Any], method: plugins.Deltas,
         config: Optional[T5Config] = None) -> tuple[dict, tuple]:
  """Evaluates every reparameterized prefix's MLPs once: flat prefixes and the equivalent P-tuning v2.

  Args:
    variables: the model's variables (boxed with logical axes or not) with the `peft` collection.
    method: the deltas; each `PrefixTuning` with `reparameterize=True` is baked.
    config: the backbone's config; needed for the shared form (which layers the MLP's rows belong to)
      unless `variables` hold the backbone's `params`.
  Returns:
    (variables whose `peft` holds `<site>/<name>/{key,value}` [(N,) l, h, d_kv] in place of the MLP
     leaves, the deltas with each baked one replaced by a `PTuningV2` of the same name and sites).
  Raises:
    ValueError naming the delta or the site path when the leaves do not match the method.
  """
  if "peft" not in variables:
    raise ValueError(f"bake: the variables have no 'peft' collection (collections: {sorted(variables)})")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["peft"]))
  baked = []
  for delta in tuple(method):
    if not (isinstance(delta, PrefixTuning) and delta.reparameterize):
      baked.append(delta)
      continue
    if delta.shared:
      outputs = _bake_shared(flat, delta, _depths(variables, config))
    else:
      sites = sorted({k[:-2] for k in flat if len(k) >= 2 and k[-2:] == (delta.name, "embedding")})
      if not sites:
        raise ValueError(f"bake: no reparameterized prefix leaves '<site>/{delta.name}/embedding' in peft "
                         f"for {delta!r}")
      outputs = []
      for site in sites:
        keys, values, box = _evaluate_mlp(flat, site + (delta.name,))
        outputs.append((site, keys, values, box))
    for site, keys, values, box in outputs:
      if box is not None:
        axes = ("tasks",) * (keys.ndim - 3) + FLAT_AXES
        wrap = lambda x: nn.LogicallyPartitioned(x, axes, mesh=box.mesh, rules=box.rules)
        keys, values = wrap(keys), wrap(values)
      flat[site + (delta.name, "key")] = keys
      flat[site + (delta.name, "value")] = values
    fields = {f.name: getattr(delta, f.name) for f in dataclasses.fields(PrefixTuning)}
    baked.append(PTuningV2(**dict(fields, reparameterize=False, dropout_rate=0.0)))
  new_variables = dict(variables)
  new_variables["peft"] = flax.traverse_util.unflatten_dict(flat)
  return new_variables, tuple(baked)


def _evaluate_mlp(flat: dict, scope: tuple) -> tuple[Array, Array, Any]:
  """Pops the MLP leaves under `scope` and returns (keys, values, the embedding's box or None)."""
  path = "/".join(scope)
  missing = [n for n in REPARAM_LEAVES if scope + (n,) not in flat]
  if missing:
    raise ValueError(f"bake: peft/{path} lacks {missing} (has the MLP leaves {REPARAM_LEAVES})")
  leaves = {n: flat.pop(scope + (n,)) for n in REPARAM_LEAVES}
  values = {n: jnp.asarray(x.unbox() if _is_box(x) else x) for n, x in leaves.items()}
  keys, vals = reparameterized_kv(*(values[n] for n in REPARAM_LEAVES))
  box = leaves["embedding"] if _is_box(leaves["embedding"]) else None
  return keys, vals, box


def _depths(variables: Mapping[str, Any], config: Optional[T5Config]) -> dict[str, int]:
  if config is not None:
    return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  params = variables.get("params")
  if params is None:
    raise ValueError("bake: a shared prefix MLP emits the rows of several layers; pass the backbone's "
                     "config (or variables with its params) to know which")
  return {stack: sum(1 for k in params[stack] if str(k).startswith("layers_")) for stack in plugins.STACKS}


def _bake_shared(flat: dict, delta: "PrefixTuning", depths: Mapping[str, int]) -> list:
  """[(site path, keys [(N,) l, h, d_kv], values, box)] of a shared prefix's chosen layers."""
  outputs = []
  for stack, depth in depths.items():
    if stack not in delta.stacks:
      continue
    site = plugins.Site(stack, -1, "stack", depth, 0, 0, 0)
    for kind, chosen in delta._chosen(site):  # pylint: disable=protected-access
      keys, values, box = _evaluate_mlp(flat, (stack, delta.name, kind))  # [(N,) L, l, h, d_kv]
      for slot, layer in enumerate(chosen):
        outputs.append(((stack, f"layers_{layer}", plugins.ATTENTION_MODULES[kind]),
                        keys[..., slot, :, :, :], values[..., slot, :, :, :], box))
  if not outputs:
    raise ValueError(f"bake: no shared prefix leaves '<stack>/{delta.name}/<kind>/embedding' in peft for "
                     f"{delta!r}")
  return outputs


# ------------------------------------------------------------------------------------------ HF PEFT
_SITE_KIND = re.compile(r"^(encoder|decoder)/layers_(\d+)/(attention|self_attention|encoder_decoder_attention)$")
_WHY = {
    "attention": "PEFT gives T5's encoder no prefix (its past_key_values reach the decoder only)",
    "encoder_decoder_attention": ("PEFT replaces the cross-attention cache by an empty DynamicCache, so HF "
                                  "T5 recomputes cross keys/values from the encoder output without them"),
    "self_attention": ("HF T5 adds its relative position bias to the prefix keys (cached past positions), "
                       "ours carry none"),
}
_KIND_NAME = {"attention": "encoder self-attention", "encoder_decoder_attention": "cross-attention",
              "self_attention": "decoder self-attention"}


def prefix_sites(leaves: Mapping[str, Any], name: str) -> list[str]:
  """The attention sites (`encoder/layers_0/attention`, ...) holding prefix leaves of the delta `name`."""
  pattern = re.compile(f"^(.*)/{re.escape(name)}/(key|value|{'|'.join(REPARAM_LEAVES)})$")
  return sorted({m.group(1) for m in map(pattern.match, leaves) if m})


def peft_refusal(sites: Sequence[str], delta: plugins.Delta) -> plugins.ExportError:
  """The error explaining, per kind of attention site, why PEFT's PREFIX_TUNING cannot represent it.

  PEFT's seq2seq PREFIX_TUNING hands its table to the decoder as `past_key_values`: T5's encoder never
  receives it; the cross-attention entries are replaced by an empty cache; and decoder self-attention sees
  the prefix as cached past positions, to which HF T5 adds its relative position bias (ours carry none).
  """
  by_kind: dict[str, list[str]] = {}
  for site in sites:
    match = _SITE_KIND.match(site)
    kind = match.group(3) if match else "self_attention"
    by_kind.setdefault(kind, []).append(site)
  summary = "; ".join(f"{len(v)} {_KIND_NAME[k]} sites: {_WHY[k]}" for k, v in by_kind.items())
  details = "\n".join(f"  {site}" for site in sites)
  return plugins.ExportError(
      f"HF PEFT's PREFIX_TUNING cannot represent {type(delta).__name__} '{delta.name}' exactly, so no "
      f"adapter was written: {summary} (see docs/export.md; export 'npy' or 'safetensors' instead)\n"
      f"sites:\n{details}")


def peft_prefix_tuning_table(variables: Mapping[str, Any], model: Any,
                             task_index: Optional[int] = None) -> tuple[dict, np.ndarray]:
  """PEFT's PREFIX_TUNING config and `prompt_embeddings` table for decoder self-attention prefixes.

  NOT the same model (see `peft_refusal`): PEFT's T5 gives these prefix keys a relative position bias that
  ours lack, which is why the export refuses prefixes. This is the table for a user who accepts that
  difference, and what the tests use to measure it (it is exact for a decoder whose relative position
  bias is zero).

  Layout (PEFT's `get_prompt` with `num_transformer_submodules=2`): the table `[l, 2 L h d_kv]` viewed as
  `[l, 2L, h, d_kv]` is concatenated with itself and cut into L groups of 4 (self key, self value, cross
  key, cross value), so decoder layer i's self-attention key and value are entries `4i mod 2L` and
  `4i+1 mod 2L`. For even L, layers i and i + L/2 therefore share their prefix.

  Args:
    variables: model variables with `peft` (reparameterized prefixes are baked first).
    model: an `EncoderDecoderModel` whose one delta is a `PrefixTuning` at decoder self-attention only,
      on every decoder layer.
  Returns:
    (adapter_config dict, prompt_embeddings [l, 2 L h d_kv] float32).
  """
  deltas = tuple(model.deltas)
  if len(deltas) != 1 or not isinstance(deltas[0], PrefixTuning):
    raise ValueError(f"peft_prefix_tuning_table needs one PrefixTuning delta, got {plugins.describe(deltas)}")
  delta = deltas[0]
  config = model.config
  peft = variables["peft"] if "peft" in variables else variables
  variables = {"peft": peft}
  if delta.reparameterize:
    variables, (delta,) = bake(variables, (delta,), config)
  flat = export_formats.one_task(export_formats.flatten_leaves(variables["peft"]), delta.num_tasks,
                                 task_index)
  sites = prefix_sites(flat, delta.name)
  depth = config.num_decoder_layers
  wanted = [f"decoder/layers_{i}/self_attention" for i in range(depth)]
  if sites != wanted:
    raise ValueError(f"PEFT's T5 prefix reaches the self-attention of every decoder layer and nothing else: "
                     f"the sites must be {wanted}, got {sites}")
  h, dk, l = config.num_heads, config.head_dim, delta.length
  entries = np.zeros((l, 2 * depth, h, dk), np.float32)
  owner: dict[int, int] = {}
  for i, site in enumerate(wanted):
    k, v = flat[f"{site}/{delta.name}/key"], flat[f"{site}/{delta.name}/value"]
    slot = (4 * i) % (2 * depth)
    if slot in owner:
      j = owner[slot]
      if not (np.array_equal(entries[:, slot], k) and np.array_equal(entries[:, slot + 1], v)):
        raise ValueError(f"PEFT's layout gives decoder layers {j} and {i} the same prefix (even depth "
                         f"{depth}), but ours differ")
    owner[slot] = i
    entries[:, slot], entries[:, slot + 1] = k, v
  adapter = export_formats.adapter_config(
      "PREFIX_TUNING", num_virtual_tokens=l, token_dim=h * dk, num_attention_heads=h, num_layers=depth,
      num_transformer_submodules=export_formats.PEFT_SEQ2SEQ_SUBMODULES, prefix_projection=False,
      encoder_hidden_size=h * dk, init_weights=None, modules_to_save=None)
  return adapter, entries.reshape(l, 2 * depth * h * dk)
