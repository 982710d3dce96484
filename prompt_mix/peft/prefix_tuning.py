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
default d_model) and hidden size H = `mlp_hidden` (512). Li & Liang share one MLP across the layers of an
attention kind (its output holds every layer's keys and values); the backbone creates a plug-in module
per attention site and has no stack-level hook, so here **each site has its own P' and MLP**:

```
peft/<site>/prefix_tuning/embedding   [l, d']             ('prompt', 'prompt_embed')
peft/<site>/prefix_tuning/mlp_wi      [d', H]             ('prompt_embed', None)
peft/<site>/prefix_tuning/mlp_bi      [H]
peft/<site>/prefix_tuning/mlp_wo      [H, 2, h, d_kv]     (the 2 is key, value)
peft/<site>/prefix_tuning/mlp_bo      [2, h, d_kv]
```

l*d' + d'*H + H + H*2*h*d_kv + 2*h*d_kv parameters per site. After training, `bake` evaluates the MLPs
once and returns the flat prefixes with the equivalent `PTuningV2` delta (same logits, no MLP).

With `num_tasks=N` every leaf gains a leading `tasks` axis (a bank of N independently trained prefixes,
gathered per example by `task_ids`). Prefix leaves are replicated (decision 5), hence the `None` axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import gin
import jax.numpy as jnp

from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any

FLAT_AXES = ("prompt", None, None)  # [l, h, d_kv], replicated.
REPARAM_LEAVES = ("embedding", "mlp_wi", "mlp_bi", "mlp_wo", "mlp_bo")

_normal = nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding's init, as HF PEFT's PrefixEncoder.
_zeros = nn.initializers.zeros


def reparameterized_kv(embedding: Array, wi: Array, bi: Array, wo: Array, bo: Array
                       ) -> tuple[Array, Array]:
  """Li & Liang's MLP: `tanh(P' W_i + b_i) W_o + b_o`, split into keys and values.

  Args:
    embedding: [..., l, d'] (a leading `tasks` axis, if any, is shared by every argument).
    wi: [..., d', H]; bi: [..., H]; wo: [..., H, 2, h, d_kv]; bo: [..., 2, h, d_kv].
  Returns:
    (keys, values), each [..., l, h, d_kv] float32.
  """
  hidden = jnp.tanh(jnp.einsum("...ld,...dh->...lh", embedding, wi) + bi[..., None, :])
  out = jnp.einsum("...lh,...hcjd->...lcjd", hidden, wo) + bo[..., None, :, :, :]
  return out[..., 0, :, :], out[..., 1, :, :]


class PrefixKV(nn.Module):
  """The prefix of one attention site.

  Attributes:
    delta: the `PrefixTuning` configuration.
  """

  delta: "PrefixTuning"

  @nn.compact
  def __call__(self, q: Array, ctx: plugins.Context) -> tuple[Array, Array]:
    """q [B, q, h, d_kv] -> (keys, values), each [B, l, h, d_kv] (each example's task prefix)."""
    delta = self.delta
    h, dk = q.shape[2], q.shape[3]
    l, n = delta.length, delta.num_tasks
    param = lambda name, init, shape, axes: tasks_lib.peft_param(self, name, init, shape, axes, n)
    if delta.reparameterize:
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
    if delta.reparameterize:
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
    reparameterize: True trains P' and a per-site MLP (Li & Liang); False trains flat prefixes
      (P-tuning v2).
    prefix_embed_dim: d' of P' (default d_model); only with `reparameterize`.
    mlp_hidden: H, the MLP's hidden size; only with `reparameterize`.
    num_tasks: None for one prefix, N for a bank gathered per example by `task_ids`.
    name: the scope name at each site (`peft/<site>/<name>/...`).
  """

  length: int = 10
  stacks: Sequence[str] = selection.STACKS
  attentions: Sequence[str] = ("attention",)
  layers: selection.LayerSpec = selection.ALL
  reparameterize: bool = True
  prefix_embed_dim: Optional[int] = None
  mlp_hidden: int = 512
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
    if self.mlp_hidden < 1 or (self.prefix_embed_dim is not None and self.prefix_embed_dim < 1):
      raise ValueError(f"{kind}: mlp_hidden ({self.mlp_hidden}) and prefix_embed_dim "
                       f"({self.prefix_embed_dim}) must be positive")

  def acts_at(self, site: plugins.Site) -> bool:
    """True when this delta gives a prefix at attention `site`."""
    return selection.selects(site, self.stacks, self.layers, self._kinds, f"{type(self).__name__}.layers")

  def attention_kv(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.acts_at(site):
      return None
    return PrefixKV(self, name=self.name)

  def num_sites(self, config: T5Config) -> int:
    """The number of attention sites with a prefix."""
    return sum(self.acts_at(s) for s in plugins.sublayer_sites(config))

  def param_count(self, config: T5Config) -> int:
    """Trainable parameters (module docstring formulas), times N for a bank."""
    l, hkv = self.length, config.num_heads * config.head_dim
    if self.reparameterize:
      d_emb, hid = self.prefix_embed_dim or config.emb_dim, self.mlp_hidden
      per_site = l * d_emb + d_emb * hid + hid + hid * 2 * hkv + 2 * hkv
    else:
      per_site = 2 * l * hkv
    return per_site * self.num_sites(config) * (self.num_tasks or 1)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PTuningV2(PrefixTuning):
  """P-tuning v2 (deep prompt tuning): `PrefixTuning` with flat prefixes, no MLP, by default."""

  reparameterize: bool = False
  name: str = "p_tuning_v2"


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def bake(variables: Mapping[str, Any], method: plugins.Deltas) -> tuple[dict, tuple]:
  """Evaluates every reparameterized prefix's MLPs once: flat prefixes and the equivalent P-tuning v2.

  Args:
    variables: the model's variables (boxed with logical axes or not) with the `peft` collection.
    method: the deltas; each `PrefixTuning` with `reparameterize=True` is baked.
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
    sites = sorted({k[:-2] for k in flat if len(k) >= 2 and k[-2:] == (delta.name, "embedding")})
    if not sites:
      raise ValueError(f"bake: no reparameterized prefix leaves '<site>/{delta.name}/embedding' in peft "
                       f"for {delta!r}")
    for site in sites:
      scope = site + (delta.name,)
      path = "/".join(scope)
      missing = [n for n in REPARAM_LEAVES if scope + (n,) not in flat]
      if missing:
        raise ValueError(f"bake: peft/{path} lacks {missing} (has the MLP leaves {REPARAM_LEAVES})")
      leaves = {n: flat.pop(scope + (n,)) for n in REPARAM_LEAVES}
      boxed = _is_box(leaves["embedding"])
      values = {n: jnp.asarray(x.unbox() if _is_box(x) else x) for n, x in leaves.items()}
      keys, vals = reparameterized_kv(*(values[n] for n in REPARAM_LEAVES))
      if boxed:
        box = leaves["embedding"]
        axes = ("tasks",) * (keys.ndim - 3) + FLAT_AXES
        wrap = lambda x: nn.LogicallyPartitioned(x, axes, mesh=box.mesh, rules=box.rules)
        keys, vals = wrap(keys), wrap(vals)
      flat[scope + ("key",)] = keys
      flat[scope + ("value",)] = vals
    fields = {f.name: getattr(delta, f.name) for f in dataclasses.fields(PrefixTuning)}
    baked.append(PTuningV2(**dict(fields, reparameterize=False)))
  new_variables = dict(variables)
  new_variables["peft"] = flax.traverse_util.unflatten_dict(flat)
  return new_variables, tuple(baked)
