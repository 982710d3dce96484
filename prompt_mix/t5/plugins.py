"""The plug-in surface of the backbone (contract v2): where a PEFT method acts and what it is handed.

A method is a tuple of `Delta`s. The backbone knows no method by name: at each plug-in point it asks every
delta for a Flax module (`None` when the delta does not act there), creates it in its own scope -- so the
delta's variables live at the path where it acts, e.g. `encoder/layers_3/attention/kv_prompt/key` -- and
calls it with the tensors it acts on, in their natural shapes, and a `Context`. Every hook takes a `Site`,
which carries the geometry a method needs (d_model, heads, head_dim; for a projection its name and
in/out features): a module infers its sizes from the site and its inputs and never reads `module.parent`.

| hook               | site.kind                            | module call                                           | returns                          |
|--------------------|--------------------------------------|-------------------------------------------------------|----------------------------------|
| `stack_state`      | 'stack' (layer -1)                   | `(ctx)`                                               | any pytree: `ctx.state` of this delta's modules in that stack |
| `input_rows`       | 'input' (layer -1)                   | `(embedded [B,n,d], mask [B,n], ctx)`                 | rows `[B,m,d]`, prepended        |
| `hidden_rows`      | 'layer' (layer >= 1)                 | `(x [B,r+n,d], ctx)`                                  | `[B,m,d]`: replace `ctx.rows`    |
| `attention_kv`     | attention kinds                      | `(q [B,q,h,d_kv], ctx)`                               | `(k, v)` each `[B,l,h,d_kv]`, extra |
| `attention_logits` | attention kinds                      | `(q [B,q,h,d_kv], k [B,k,h,d_kv], q_pos [q], k_pos [k], ctx)` | `[B or 1,h,q,k]`, added |
| `projection_input` | a projection (`site.projection`)     | `(x [B,n,in], ctx)`                                   | the new input `[B,n,in]`         |
| `projection`       | a projection (`site.projection`)     | `(x [B,n,in], y [B,n,out], ctx)`                      | the new output `[B,n,out]` (wraps) |
| `sublayer`         | attention kinds, 'mlp'               | `(x [B,n,d], x_normed [B,n,d], y [B,n,d], ctx)`       | the new `y [B,n,d]`              |

Site kinds: 'stack' and 'input' (layer -1), 'layer' (the input of layer >= 1), the attentions 'attention'
(encoder self-attention), 'self_attention' and 'cross_attention' (decoder), 'mlp', 'output' (the stack's
final layer norm, layer = num_layers) and 'logits' (the decoder's output layer, layer = num_layers).

Projections (`site.projection`, with `in_features`/`out_features`): `query, key, value, out` (attention
kinds), `wi` or `wi_0, wi_1`, and `wo` (mlp), `logits_dense` (untied v1.1 output layer) or `logits` (the
tied v1.0 output layer, `x @ embedding^T / sqrt(d)`), and the layer norms, whose output a `projection`
hook wraps like a projection's: `pre_attention_layer_norm` (encoder), `pre_self_attention_layer_norm`,
`pre_cross_attention_layer_norm` (decoder), `pre_mlp_layer_norm` (at the kind of the sublayer they
precede), `encoder_norm` / `decoder_norm` (kind 'output').

Rows. Each delta's `input_rows` are prepended in delta order; the backbone hands every module of a delta
its own span in the current stack as `ctx.rows = (start, length)` (None when it has no rows there).
`hidden_rows` at layer i replace, at the input of layer i, exactly those positions. Extra keys/values
(`attention_kv`) are always visible and carry no relative position bias. A `sublayer` hook sees the
block's residual input `x`, its normed input and its output `y` after the block's dropout, and returns the
`y` that is added to the residual stream. `attention_logits` act on the
sequence keys only (not on extra keys). `ctx.state` is the value the delta's own `stack_state` module
computed once for the stack (e.g. a prefix MLP shared by all layers).

Scopes (where a module's variables live): `stack_state` and `input_rows` modules in the stack's scope
(`encoder/<name>`), `hidden_rows` and `sublayer` modules in the layer's (`encoder/layers_i/<name>`; a
delta acting at several sublayers of a layer names its modules per `site.kind`), attention hooks in the
attention's (`.../attention/<name>`), projection hooks in the projection's or layer norm's
(`.../attention/query/<name>`; the tied output layer's in the decoder's).

Besides its hooks a delta declares its capabilities (all optional, see `Delta`): `num_tasks` (a bank of
per-task leaves selected by the batch's `task_ids`), `trains_backbone`, HF PEFT export and import
(`to_peft` / `from_peft`), and evaluation artefacts (`write_evaluation`). A plug-in module may declare its
FLOPs (`flops`, see `prompt_mix/flops.py`) so the benchmark counts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

Array = Any

STACKS = ("encoder", "decoder")
ATTENTION_KINDS = ("attention", "self_attention", "cross_attention")
# The attention kinds of each stack, in the order a layer runs them.
STACK_ATTENTIONS = {"encoder": ("attention",), "decoder": ("self_attention", "cross_attention")}
# The backbone module of each attention kind (its scope name inside a layer).
ATTENTION_MODULES = {"attention": "attention", "self_attention": "self_attention",
                     "cross_attention": "encoder_decoder_attention"}
# The layer norm in front of each sublayer kind, per stack.
PRE_NORMS = {("encoder", "attention"): "pre_attention_layer_norm",
             ("decoder", "self_attention"): "pre_self_attention_layer_norm",
             ("decoder", "cross_attention"): "pre_cross_attention_layer_norm",
             ("encoder", "mlp"): "pre_mlp_layer_norm", ("decoder", "mlp"): "pre_mlp_layer_norm"}
FINAL_NORMS = {"encoder": "encoder_norm", "decoder": "decoder_norm"}
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")


@dataclasses.dataclass(frozen=True)
class Site:
  """Where a hook is consulted, with the backbone geometry a method needs.

  Attributes:
    stack: 'encoder' | 'decoder'.
    layer: the layer index; -1 for the stack input ('stack', 'input'); num_layers for 'output', 'logits'.
    kind: see the module docstring.
    num_layers: depth of this stack, so a delta can pick 'last k' layers.
    d_model: width of the residual stream.
    num_heads / head_dim: h and d_kv of the attentions.
    projection: at a projection (or layer norm) site, its name; None elsewhere.
    in_features / out_features: the projection's input and output sizes (None elsewhere).
  """

  stack: str
  layer: int
  kind: str
  num_layers: int
  d_model: int
  num_heads: int
  head_dim: int
  projection: Optional[str] = None
  in_features: Optional[int] = None
  out_features: Optional[int] = None

  def at(self, projection: str, in_features: int, out_features: int) -> "Site":
    """The site of the projection (or layer norm) `projection` inside this sublayer."""
    return dataclasses.replace(self, projection=projection, in_features=in_features,
                               out_features=out_features)

  @property
  def where(self) -> str:
    """A readable path, e.g. `encoder/layers_3/attention/query`, for errors and FLOP terms."""
    parts = [self.stack]
    if 0 <= self.layer < self.num_layers:
      parts.append(f"layers_{self.layer}")
    if self.kind in ATTENTION_MODULES:
      parts.append(ATTENTION_MODULES[self.kind])
    elif self.kind == "mlp":
      parts.append("mlp")
    elif self.kind in ("input", "stack", "layer"):
      parts.append(self.kind)
    if self.projection:
      parts.append(self.projection)
    return "/".join(parts)


def site(config: Any, stack: str, layer: int, kind: str) -> Site:
  """The `Site` of a backbone with `config` (a `T5Config`)."""
  depth = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
  return Site(stack, layer, kind, depth, config.emb_dim, config.num_heads, config.head_dim)


def sublayer_sites(config: Any, stacks: Sequence[str] = STACKS) -> list[Site]:
  """Every attention and MLP site of a backbone with `config`, stack by stack and layer by layer."""
  sites = []
  for stack in stacks:
    depth = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    for layer in range(depth):
      for kind in STACK_ATTENTIONS[stack] + ("mlp",):
        sites.append(site(config, stack, layer, kind))
  return sites


def projection_sites(config: Any) -> list[Site]:
  """Every projection site of a backbone with `config` (attention and MLP projections, the output layer).

  Layer norms are not listed (they are wrapped through the same hook; see the module docstring).
  """
  d, hk = config.emb_dim, config.num_heads * config.head_dim
  out = []
  for sub in sublayer_sites(config):
    if sub.kind == "mlp":
      names = ("wi",) if len(config.mlp_activations) == 1 else tuple(
          f"wi_{i}" for i in range(len(config.mlp_activations)))
      out += [sub.at(n, d, config.mlp_dim) for n in names] + [sub.at("wo", config.mlp_dim, d)]
    else:
      out += [sub.at(n, d, hk) for n in ("query", "key", "value")] + [sub.at("out", hk, d)]
  logits = site(config, "decoder", config.num_decoder_layers, "logits")
  name = "logits" if config.logits_via_embedding else "logits_dense"
  out.append(logits.at(name, d, config.vocab_size))
  return out


@flax.struct.dataclass
class Context:
  """What every plug-in module may read at call time.

  Attributes:
    task_ids: [B] int32 task of each example, or None for a single-task batch.
    embedding: [vocab, d] the frozen token embedding table (float32), e.g. for vocabulary inits.
    states: per delta, the value of its `stack_state` module in the current stack (None if it has none).
    batch_size: B.
    deterministic: True disables dropout.
    decode: True during cached autoregressive decoding.
    spans: per delta, its (start, length) of prepended rows in the current stack, or None.
    carries_rows: False in cached decoding steps after the prefill: the rows are in the cache, not in
      this call's activations (their positions still count in `spans`).
    index: the delta this context was handed to (set by `calls`); -1 for the backbone's own context.
  """

  task_ids: Optional[Array]
  embedding: Array
  states: tuple = ()
  batch_size: int = flax.struct.field(pytree_node=False, default=1)
  deterministic: bool = flax.struct.field(pytree_node=False, default=True)
  decode: bool = flax.struct.field(pytree_node=False, default=False)
  spans: tuple = flax.struct.field(pytree_node=False, default=())
  carries_rows: bool = flax.struct.field(pytree_node=False, default=True)
  index: int = flax.struct.field(pytree_node=False, default=-1)

  @property
  def rows(self) -> Optional[tuple[int, int]]:
    """(start, length) of the calling delta's own rows in the current stack, or None."""
    return self.spans[self.index] if 0 <= self.index < len(self.spans) else None

  @property
  def state(self) -> Any:
    """The calling delta's `stack_state` value in the current stack (None if it has none)."""
    return self.states[self.index] if 0 <= self.index < len(self.states) else None

  @property
  def total_rows(self) -> int:
    """Rows prepended by all deltas in the current stack."""
    return sum(span[1] for span in self.spans if span is not None)


class Delta:
  """Base class of a method's contribution. Subclasses are frozen dataclasses that gin can bind.

  Every hook returns an (unbound) Flax module to be created in the caller's scope, or None (the default:
  the delta does not act there). The class attributes below are capabilities a delta declares.
  """

  # Full fine-tuning is the one method that trains the backbone itself.
  trains_backbone: ClassVar[bool] = False
  # None: every leaf is shared by all examples; N: the delta's leaves have a leading tasks axis of N and
  # each example uses row `task_ids[b]` (a bank of per-task leaves). Subclasses declare it as a field.
  num_tasks: Optional[int] = None
  # HF PEFT `peft_type`s that `from_peft` reads (see `to_peft`).
  peft_types: ClassVar[tuple[str, ...]] = ()

  # ------------------------------------------------------------------------------------------ hooks
  def stack_state(self, site: Site) -> Optional[nn.Module]:
    return None

  def input_rows(self, site: Site) -> Optional[nn.Module]:
    return None

  def hidden_rows(self, site: Site) -> Optional[nn.Module]:
    return None

  def attention_kv(self, site: Site) -> Optional[nn.Module]:
    return None

  def attention_logits(self, site: Site) -> Optional[nn.Module]:
    return None

  def projection_input(self, site: Site) -> Optional[nn.Module]:
    return None

  def projection(self, site: Site) -> Optional[nn.Module]:
    return None

  def sublayer(self, site: Site) -> Optional[nn.Module]:
    return None

  # ------------------------------------------------------------------------------------------ capabilities
  def to_peft(self, leaves: Mapping[str, Any], config: Any) -> tuple[dict, dict]:
    """HF PEFT's `(adapter_config fields, {state-dict key: array})` of this delta's leaves (one task).

    `leaves` are this delta's `peft` leaves by '/'-joined path (a bank's leaves already sliced to one
    task). The default refuses: raise `ExportError` with the method's own reason.
    """
    del leaves, config
    raise ExportError(f"{type(self).__name__} has no HF PEFT counterpart; export 'npy' or "
                          "'safetensors' instead")

  @classmethod
  def from_peft(cls, adapter_config: Mapping[str, Any], tensors: Mapping[str, Any], config: Any,
                name: Optional[str] = None, approximate: bool = False) -> tuple["Delta", dict]:
    """(the delta, its nested `peft` tree) of an HF PEFT adapter whose `peft_type` is in `peft_types`."""
    raise ExportError(f"{cls.__name__} reads no HF PEFT adapter")

  def write_evaluation(self, means: Mapping[str, Mapping[str, Any]], directory: Optional[str],
                       step: int) -> dict[str, float]:
    """Evaluation artefacts of this delta, called by the evaluator after each evaluation.

    Args:
      means: {intermediate path: {task name: the mean over that task's examples}} of every value the
        model sowed per example ([B, ...]) into `intermediates`, e.g. 'encoder/attempt/attention_weights'.
      directory: where the evaluation writes its files (None: write nothing).
      step: the evaluated step.
    Returns:
      Scalars to log beside the metrics ({name: value}); the default writes and returns nothing.
    """
    del means, directory, step
    return {}


class ExportError(ValueError):
  """The trained leaves have no exact HF PEFT representation (nothing was written)."""


Deltas = Sequence[Delta]


def calls(deltas: Deltas, hook: str, site: Site, ctx: Context) -> list[tuple[nn.Module, Context]]:
  """(module, the context handed to it) for every delta acting at `hook(site)`, in delta order."""
  found = []
  for index, delta in enumerate(deltas):
    module = getattr(delta, hook)(site)
    if module is not None:
      found.append((module, ctx.replace(index=index)))
  return found


def modules(deltas: Deltas, hook: str, site: Site) -> list[nn.Module]:
  """The non-None modules that `deltas` give for `hook(site)`, in delta order (no context)."""
  return [m for m in (getattr(delta, hook)(site) for delta in deltas) if m is not None]


def num_tasks(deltas: Deltas) -> Optional[int]:
  """The size N of the task bank the deltas share (None: no delta has a tasks axis).

  Deltas with a tasks axis must agree on N: one batch's `task_ids` index every bank.
  """
  sizes = {d.num_tasks for d in deltas if d.num_tasks is not None}
  if len(sizes) > 1:
    raise ValueError(f"the method's deltas declare different num_tasks {sorted(sizes)}: one batch's "
                     f"task_ids index every bank, so they must agree ({describe(deltas)})")
  return sizes.pop() if sizes else None


def describe(deltas: Deltas) -> str:
  """A short name of a method for tables and errors: its deltas' class names joined by '+'."""
  return "+".join(type(d).__name__ for d in deltas) or "backbone"


def extra_kv(deltas: Deltas, site: Site, q: Array, ctx: Context) -> tuple[Optional[Array], Optional[Array]]:
  """Concatenated extra keys and values of all deltas at an attention site: `[B, l, h, d_kv]` each."""
  keys, values = [], []
  for module, delta_ctx in calls(deltas, "attention_kv", site, ctx):
    k, v = module(q, delta_ctx)
    keys.append(k)
    values.append(v)
  if not keys:
    return None, None
  return jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
