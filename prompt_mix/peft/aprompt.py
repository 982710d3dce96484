"""APrompt (Wang et al., EMNLP 2023): input prompts plus query-key and key-value attention prompts.

The paper has no public code; this follows the co-authors' E2VPT "query-key-value" mode
(`QUERY_PROMPT_MODE=3` of E2VPT's ViT) mapped onto T5 and the backbone's plug-in surface (`plugins.py`).
At every chosen layer of every chosen stack:

| prompt               | per task, per site                | hook                                     | effect                                       |
|----------------------|-----------------------------------|------------------------------------------|----------------------------------------------|
| input `P_i^j`        | `[m, d]`                          | `input_rows` (stack input) for layer 0;  | layer 0: rows prepended to the embeddings;   |
|                      |                                   | `hidden_rows` (layer j >= 1)             | layer j: they replace the rows at its input  |
| query-key `P_q, P_k` | `[N_q, h*l_qk]`, `[N_k, h*l_qk]`  | `attention_logits`                       | logits[b,h,i,j] += P_q[i,h] . P_k[j,h]       |
| key-value `P_k, P_v` | `[l_kv, h*d_kv]` each             | `attention_kv`                           | l_kv extra key/value positions per head      |

Query-key prompts are E2VPT's prompts "appended along the feature axis of queries and keys": with
q' = [q, P_q[i]] and k' = [k, P_k[j]] per head, q'.k' = q.k + P_q[i].P_k[j], and T5 has no 1/sqrt(d_kv)
scaling, so the term is exactly additive. Positions are absolute and include the prompt rows (and, in the
decoder, the decoder's rows); N is `max_length` for encoder positions and `decoder_max_length` for decoder
positions, so cross-attention uses `P_q [decoder_max_length, .]` and `P_k [max_length, .]`. Positions >= N
get no term. Extra keys (key-value prompts) carry no query-key features (the surface adds logit terms to
sequence keys only); E2VPT also gives its key-value keys query-key features, which this omits.

Leaves, in the `peft` collection (h heads of size d_kv, tables are stored with joined heads like the
backbone's `joined_kv` kernels, head-major: `[., h*x]` reshapes to `[., h, x]`):

```
{encoder,decoder}/input_prompt/prompt                                   [m, d]             ('prompt', 'prompt_embed')
{encoder,decoder}/layers_j/input_prompt/prompt             (j >= 1)     [m, d]
encoder/layers_j/attention/qk_prompt/{query,key}                        [N_q|N_k, h*l_qk]  ('prompt', 'prompt_embed')
decoder/layers_j/{self_attention,encoder_decoder_attention}/qk_prompt/{query,key}
{encoder/layers_j/attention,decoder/layers_j/{self_attention,encoder_decoder_attention}}/kv_prompt/{key,value}
                                                                        [l_kv, h*d_kv]     ('prompt', 'prompt_embed')
```

With `num_tasks=T` every leaf gains a leading `tasks` axis (`peft_param`) and each example uses its task.

Parameters per task (`param_counts`): with L_s the chosen layers of stack s, A the chosen attentions,
  input = m * d * sum_s |L_s|
  qk    = h * l_qk * sum over QK attentions of (N_q + N_k)   (encoder self 2 N_e, decoder self 2 N_d,
                                                              cross N_d + N_e)
  kv    = 2 * l_kv * h * d_kv * (number of KV attentions).

Layers before a stack's first chosen layer: the rows still need positions from the stack input, so the
stack input gets zero rows (no parameters) and, in those earlier layers, self-attention hides the rows
from every query (a NEG_INF logit on their key positions): the text positions compute exactly what the
plain backbone computes (relative position bias depends only on position differences), and the real
prompts of the first chosen layer replace the rows. After a chosen layer, an unchosen layer lets the
previous layer's outputs at the row positions pass through (as prompt tuning does at every layer).
Hiding needs the rows' positions: the backbone hands every module its delta's own row span in the current
stack (`ctx.rows`), so they are right whatever other deltas prepend before it, in each stack separately.

`kv_ratio_lengths` / `aprompt_at_kv_ratio` split a fixed attention-prompt budget between key-value and
query-key prompts (the paper's "attention prompt balancing" ablation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import layers as t5_layers
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any

# `Site.kind` of each stack's self-attention: where rows (sequence positions of that stack) are keys.
_SELF_ATTENTION = {"encoder": "attention", "decoder": "self_attention"}
INPUT_INITS = ("uniform", "vocab")
VOCAB_INIT_TOKENS = 5000  # Lester et al.: sample among the 5,000 most frequent pieces.


# ------------------------------------------------------------------------------------------ helpers
def _uniform(scale: float) -> Callable[[Array, tuple[int, ...]], Array]:
  def init(rng, shape):
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)
  return init


def _vocab_rows(embedding: Array) -> Callable[[Array, tuple[int, ...]], Array]:
  """Init of an `[m, d]` prompt: rows of the frozen embedding sampled among the first 5,000 tokens
  (without replacement when m <= 5,000)."""
  def init(rng, shape):
    if shape[-1] != embedding.shape[-1]:
      raise ValueError(f"vocabulary init of a prompt of shape {shape}: the embedding has width "
                       f"{embedding.shape[-1]}")
    pool = min(VOCAB_INIT_TOKENS, embedding.shape[0])
    ids = jax.random.choice(rng, pool, shape[:1], replace=shape[0] > pool)
    return jnp.asarray(jnp.take(embedding, ids, axis=0), jnp.float32)
  return init


# ------------------------------------------------------------------------------------------ modules
def _prompt_rows(module: nn.Module, ctx: plugins.Context) -> Array:
  """Declares `prompt [m, d]` (or `[T, m, d]`) in `module` and returns it per example: [B, m, d]."""
  d = ctx.embedding.shape[-1]
  if module.init_kind == "vocab":
    init = _vocab_rows(ctx.embedding)
  else:
    init = _uniform(module.init_scale)
  prompt = tasks_lib.peft_param(module, "prompt", init, (module.length, d), ("prompt", "prompt_embed"),
                                module.num_tasks)
  return tasks_lib.per_example(prompt, ctx, module.num_tasks)


class InputPrompt(nn.Module):
  """Layer-0 input prompt `P^0 [m, d]`, prepended at the stack input (`input_rows` hook).

  Attributes:
    length: m.
    init_kind: 'uniform' (U(-init_scale, init_scale)) or 'vocab' (sampled frozen embedding rows).
    init_scale: bound of the uniform init.
    num_tasks: None or T (a `[T, m, d]` bank gathered per example).
  """

  length: int
  init_kind: str = "uniform"
  init_scale: float = 0.5
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, embedded: Array, mask: Array, ctx: plugins.Context) -> Array:
    """embedded [B, n, d], mask [B, n] (unused) -> rows [B, m, d]."""
    del embedded, mask
    return _prompt_rows(self, ctx)

  def flops(self, counter, site: plugins.Site, tokens: float) -> tuple[int, int]:
    """No matmul (`prompt_mix/flops.py`); the m prepended rows are trainable."""
    del counter, site, tokens
    return self.length, self.length


class DeepPrompt(nn.Module):
  """Input prompt `P^j [m, d]` of layer j >= 1: replaces the rows at the layer's input (`hidden_rows`)."""

  length: int
  init_kind: str = "uniform"
  init_scale: float = 0.5
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array, ctx: plugins.Context) -> Array:
    """x [B, r+n, d] (the layer's input) -> [B, m, d]."""
    del x
    return _prompt_rows(self, ctx)

  def flops(self, counter, site: plugins.Site, rows: float, dep: float) -> float:
    """No matmul (`prompt_mix/flops.py`); the m replaced rows now depend (on top of the leading rows
    that already do, unless every row does)."""
    del counter, site
    return rows if dep >= rows else min(rows, dep + self.length)


class ZeroRows(nn.Module):
  """Placeholder rows `[B, m, d]` of zeros at the stack input when layer 0 is not chosen (no parameters)."""

  length: int

  def __call__(self, embedded: Array, mask: Array, ctx: plugins.Context) -> Array:
    del mask, ctx
    return jnp.zeros((embedded.shape[0], self.length, embedded.shape[-1]), embedded.dtype)

  def flops(self, counter, site: plugins.Site, tokens: float) -> tuple[int, int]:
    """No matmul (`prompt_mix/flops.py`); m rows, none of them trainable."""
    del counter, site, tokens
    return self.length, 0


class HideRows(nn.Module):
  """NEG_INF on the key positions of this delta's own rows (`ctx.rows`) in a self-attention (layers before
  the first chosen one), so no query attends to the placeholder rows."""

  def __call__(self, q: Array, k: Array, q_positions: Array, k_positions: Array,
               ctx: plugins.Context) -> Array:
    """q [B, q, h, d_kv], k [B, k, h, d_kv], positions [q], [k] -> [1, h, q, k]."""
    start, length = ctx.rows
    rows = (k_positions >= start) & (k_positions < start + length)
    term = jnp.where(rows, t5_layers.NEG_INF, 0.0).astype(jnp.float32)
    return jnp.broadcast_to(term[None, None, None, :], (1, q.shape[2], q_positions.shape[0],
                                                        k_positions.shape[0]))

  def flops(self, counter, site: plugins.Site, tq: float, tk: float) -> bool:
    """A constant mask (`prompt_mix/flops.py`): no matmul, no trainable term."""
    del counter, site, tq, tk
    return False


class QueryKeyPrompt(nn.Module):
  """Query-key prompts: the logit term P_q[i] . P_k[j] per head (E2VPT's feature-axis QK prompts).

  Attributes:
    length: l_qk, the prompt's feature length per head.
    query_positions / key_positions: N_q / N_k, rows of the position tables; positions >= N get no term.
    init_scale: U(-init_scale, init_scale) for both tables (both random: a zero table stops the other's
      gradient).
    num_tasks: None or T.
  """

  length: int
  query_positions: int
  key_positions: int
  init_scale: float = 0.1
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, q: Array, k: Array, q_positions: Array, k_positions: Array,
               ctx: plugins.Context) -> Array:
    """q [B, q, h, d_kv], k [B, k, h, d_kv], positions [q], [k] (absolute, int) -> [1 or B, h, q, k]."""
    h = q.shape[2]
    init = _uniform(self.init_scale)
    axes = ("prompt", "prompt_embed")
    query = tasks_lib.peft_param(self, "query", init, (self.query_positions, h * self.length), axes,
                                 self.num_tasks)
    key = tasks_lib.peft_param(self, "key", init, (self.key_positions, h * self.length), axes,
                               self.num_tasks)
    pq = self._at(query, q_positions, ctx, h)  # [1 or B, q, h, l]
    pk = self._at(key, k_positions, ctx, h)  # [1 or B, k, h, l]
    return jnp.einsum("bqhl,bkhl->bhqk", pq, pk)

  def flops(self, counter, site: plugins.Site, tq: float, tk: float) -> bool:
    """einsum('bqhl,bkhl->bhqk') with b = 1, or B with a tasks axis (`prompt_mix/flops.py`); the term is
    trainable, so every score depends."""
    copies = counter.batch if self.num_tasks else 1
    counter.matmul(f"{site.where}/qk_prompt", "method", copies * site.num_heads, tq, self.length, tk, tq,
                   True)
    return True

  def _at(self, table: Array, positions: Array, ctx: plugins.Context, h: int) -> Array:
    """Rows of `table [(T,) N, h*l]` at `positions [p]` (zero at positions >= N) -> [1 or B, p, h, l]."""
    n = table.shape[-2]
    valid = (positions >= 0) & (positions < n)
    rows = jnp.take(table, jnp.clip(positions, 0, n - 1), axis=-2)
    rows = jnp.where(valid[:, None], rows, 0.0)
    if self.num_tasks is None:
      rows = rows[None]
    else:
      rows = tasks_lib.per_example(rows, ctx, self.num_tasks)
    return rows.reshape(rows.shape[:2] + (h, self.length))


class KeyValuePrompt(nn.Module):
  """Key-value prompts: `l_kv` extra key and value positions per head, [B, l_kv, h, d_kv] each."""

  length: int
  init_scale: float = 0.1
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, q: Array, ctx: plugins.Context) -> tuple[Array, Array]:
    """q [B, q, h, d_kv] -> (keys, values), each [B, l_kv, h, d_kv]."""
    h, dk = q.shape[2], q.shape[3]
    init = _uniform(self.init_scale)
    axes = ("prompt", "prompt_embed")
    out = []
    for name in ("key", "value"):
      table = tasks_lib.peft_param(self, name, init, (self.length, h * dk), axes, self.num_tasks)
      table = tasks_lib.per_example(table, ctx, self.num_tasks)  # [B, l, h*dk]
      out.append(table.reshape((table.shape[0], self.length, h, dk)))
    return out[0], out[1]

  def flops(self, counter, site: plugins.Site, tq: float, tk: float) -> int:
    """No matmul (`prompt_mix/flops.py`); returns the l_kv extra (trainable) keys."""
    del counter, site, tq, tk
    return self.length


# ------------------------------------------------------------------------------------------ the delta
@gin.configurable
@dataclasses.dataclass(frozen=True)
class APrompt(plugins.Delta):
  """APrompt: input, query-key and key-value prompts at the chosen layers (module docstring).

  Attributes:
    input_length: m, rows of each input prompt; 0 disables input prompts (ablation "w/o input").
    qk_length: l_qk, per-head feature length of the query-key prompts; 0 disables them ("w/o QK").
    kv_length: l_kv, extra key/value positions per head; 0 disables them ("w/o KV").
    max_length: N for encoder positions, including the prompt rows (encoder self-attention queries and
      keys, cross-attention keys).
    decoder_max_length: N for decoder positions, including decoder rows (decoder self-attention queries
      and keys, cross-attention queries).
    layers: 'all', ('first', k), ('last', k) or a list of layer indices (negative from the end), applied
      to each stack in `stacks` (the paper's "prompt positions" ablation).
    stacks: 'encoder' and/or 'decoder'.
    qk_attentions / kv_attentions: where the query-key / key-value prompts act: 'attention' (every
      attention), 'self_attention' (encoder and decoder self-attention), 'cross_attention'.
    input_init: 'uniform' (U(-input_init_scale, input_init_scale), prompt tuning's default) or 'vocab'
      (rows of the frozen embedding among the first 5,000 tokens).
    input_init_scale / qk_init_scale / kv_init_scale: uniform init bounds (0.1 is close to E2VPT's
      xavier-uniform bound sqrt(6 / 784) = 0.0875 for its prompts).
    num_tasks: None, or T for a bank of T APrompts selected per example by `task_ids`.
    name_prefix: prefix of the module names (`{prefix}_input_prompt`, ...), so that two APrompts can
      be combined in one model; '' gives `input_prompt`, `qk_prompt`, `kv_prompt`.
  """

  input_length: int = 10
  qk_length: int = 10
  kv_length: int = 10
  max_length: int = 512
  decoder_max_length: int = 128
  layers: selection.LayerSpec = selection.ALL
  stacks: Sequence[str] = selection.STACKS
  qk_attentions: Sequence[str] = ("attention",)
  kv_attentions: Sequence[str] = ("attention",)
  input_init: str = "uniform"
  input_init_scale: float = 0.5
  qk_init_scale: float = 0.1
  kv_init_scale: float = 0.1
  num_tasks: Optional[int] = None
  name_prefix: str = ""

  def __post_init__(self):
    # Gin hands sequences over as lists; a delta must stay hashable (it is a Flax module attribute).
    for field in ("qk_attentions", "kv_attentions"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"APrompt.{field}"))
    object.__setattr__(self, "stacks", selection.check_stacks(self.stacks, "APrompt.stacks"))
    object.__setattr__(self, "layers", selection.check_layers(self.layers, "APrompt.layers"))
    for field in ("input_length", "qk_length", "kv_length"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"APrompt.{field} must be an int >= 0, got {value!r}")
    if not (self.input_length or self.qk_length or self.kv_length):
      raise ValueError("APrompt: input_length, qk_length and kv_length are all 0; nothing would be trained")
    for field in ("max_length", "decoder_max_length"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"APrompt.{field} must be an int >= 1, got {value!r}")
    for field in ("qk_attentions", "kv_attentions"):
      object.__setattr__(self, f"_{field[:2]}_kinds", selection.site_kinds(
          getattr(self, field), f"APrompt.{field}", selection.ATTENTIONS))
    if self.input_init not in INPUT_INITS:
      raise ValueError(f"APrompt.input_init: unknown {self.input_init!r}; choose from {INPUT_INITS}")
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"APrompt.num_tasks must be None or >= 1, got {self.num_tasks}")

  # ---------------------------------------------------------------------------------- selection
  def chosen(self, stack: str, num_layers: int) -> frozenset:
    """The chosen layer indices of `stack` (empty when the stack is not selected)."""
    if stack not in self.stacks:
      return frozenset()
    return selection.chosen_layers(self.layers, num_layers, stack, "APrompt.layers")

  def _site_chosen(self, site: plugins.Site) -> bool:
    return site.layer in self.chosen(site.stack, site.num_layers)

  def _first_chosen(self, site: plugins.Site) -> Optional[int]:
    layers = self.chosen(site.stack, site.num_layers)
    return min(layers) if layers else None

  def _name(self, base: str) -> str:
    return f"{self.name_prefix}_{base}" if self.name_prefix else base

  def table_rows(self, site: plugins.Site) -> tuple[int, int]:
    """(N_q, N_k): rows of the query-key position tables at an attention site."""
    if site.kind == "attention":
      return self.max_length, self.max_length
    if site.kind == "self_attention":
      return self.decoder_max_length, self.decoder_max_length
    return self.decoder_max_length, self.max_length

  # ---------------------------------------------------------------------------------- hooks
  def input_rows(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.input_length:
      return None
    first = self._first_chosen(site)
    if first is None:
      return None
    if first > 0:  # Positions for the deep prompts of the first chosen layer; hidden until then.
      return ZeroRows(self.input_length, name=self._name("input_prompt"))
    return InputPrompt(self.input_length, self.input_init, self.input_init_scale, self.num_tasks,
                       name=self._name("input_prompt"))

  def hidden_rows(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.input_length or site.layer < 1 or not self._site_chosen(site):
      return None
    return DeepPrompt(self.input_length, self.input_init, self.input_init_scale, self.num_tasks,
                      name=self._name("input_prompt"))

  def attention_logits(self, site: plugins.Site) -> Optional[nn.Module]:
    if self._site_chosen(site):
      if not self.qk_length or site.kind not in self._qk_kinds:
        return None
      n_q, n_k = self.table_rows(site)
      return QueryKeyPrompt(self.qk_length, n_q, n_k, self.qk_init_scale, self.num_tasks,
                            name=self._name("qk_prompt"))
    first = self._first_chosen(site)
    if (self.input_length and first is not None and site.layer < first
        and site.kind == _SELF_ATTENTION[site.stack]):
      return HideRows(name=self._name("hide_rows"))
    return None

  def attention_kv(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.kv_length or site.kind not in self._kv_kinds or not self._site_chosen(site):
      return None
    return KeyValuePrompt(self.kv_length, self.kv_init_scale, self.num_tasks, name=self._name("kv_prompt"))

  # ---------------------------------------------------------------------------------- parameter counts
  def attention_sites(self, config: T5Config, kinds: frozenset) -> list[plugins.Site]:
    """The chosen attention sites (of the given `Site.kind`s) of a backbone with `config`'s depths."""
    sites = []
    for stack, n, stack_kinds in (("encoder", config.num_encoder_layers, ("attention",)),
                                  ("decoder", config.num_decoder_layers,
                                   ("self_attention", "cross_attention"))):
      for layer in sorted(self.chosen(stack, n)):
        sites += [plugins.site(config, stack, layer, kind) for kind in stack_kinds if kind in kinds]
    return sites

  def qk_sites(self, config: T5Config) -> list[plugins.Site]:
    """The chosen attention sites of the `qk_attentions` kinds (query-key prompts when qk_length > 0)."""
    return self.attention_sites(config, self._qk_kinds)

  def kv_sites(self, config: T5Config) -> list[plugins.Site]:
    """The chosen attention sites of the `kv_attentions` kinds (key-value prompts when kv_length > 0)."""
    return self.attention_sites(config, self._kv_kinds)

  def param_counts(self, config: T5Config) -> dict[str, int]:
    """Trainable parameters per task: {'input', 'qk', 'kv', 'total'} (formulas in the module docstring)."""
    h, dk, d = config.num_heads, config.head_dim, config.emb_dim
    chosen = (len(self.chosen("encoder", config.num_encoder_layers))
              + len(self.chosen("decoder", config.num_decoder_layers)))
    counts = dict(input=self.input_length * d * chosen, qk=0, kv=0)
    counts["qk"] = h * self.qk_length * sum(sum(self.table_rows(s)) for s in self.qk_sites(config))
    counts["kv"] = 2 * self.kv_length * h * dk * len(self.kv_sites(config))
    counts["total"] = counts["input"] + counts["qk"] + counts["kv"]
    return counts


# ------------------------------------------------------------------------------------------ KV ratio
def kv_ratio_lengths(aprompt: APrompt, config: T5Config, budget: int, kv_ratio: float) -> tuple[int, int]:
  """(l_qk, l_kv) spending `kv_ratio` of `budget` on key-value prompts and the rest on query-key prompts.

  `budget` counts the attention-prompt parameters per task (query-key + key-value, over the sites that
  `aprompt` selects for each kind on a backbone with `config`'s shapes); input prompts are outside it
  (the paper fixes their length). Each length is the largest that fits its share:
    l_kv = floor(kv_ratio * budget / (2 h d_kv * #KV sites)),
    l_qk = floor((1 - kv_ratio) * budget / (h * sum over QK sites of (N_q + N_k))).
  kv_ratio = 0 gives query-key prompts only, 1 key-value prompts only.
  """
  if not 0.0 <= kv_ratio <= 1.0:
    raise ValueError(f"kv_ratio must be in [0, 1], got {kv_ratio}")
  if budget <= 0:
    raise ValueError(f"budget must be > 0 parameters, got {budget}")
  h, dk = config.num_heads, config.head_dim
  kv_unit = 2 * h * dk * len(aprompt.kv_sites(config))
  qk_unit = h * sum(sum(aprompt.table_rows(s)) for s in aprompt.qk_sites(config))
  lengths = []
  for share, unit, what in ((1.0 - kv_ratio, qk_unit, "query-key"), (kv_ratio, kv_unit, "key-value")):
    if share == 0.0:
      lengths.append(0)
      continue
    if unit == 0:
      raise ValueError(f"kv_ratio={kv_ratio} gives {what} prompts a share of the budget but APrompt "
                       f"selects no {what} attention site")
    length = int(math.floor(share * budget / unit + 1e-9))
    if length < 1:
      raise ValueError(f"budget={budget} with kv_ratio={kv_ratio}: the {what} share "
                       f"{share * budget:.0f} is below one prompt position ({unit} parameters)")
    lengths.append(length)
  return lengths[0], lengths[1]


@gin.configurable
def aprompt_at_kv_ratio(budget: int = gin.REQUIRED, kv_ratio: float = gin.REQUIRED,
                        config: T5Config = gin.REQUIRED) -> APrompt:
  """The gin-configured `APrompt()` with `qk_length`, `kv_length` from `kv_ratio_lengths`."""
  base = APrompt()
  qk_length, kv_length = kv_ratio_lengths(base, config, budget, kv_ratio)
  return dataclasses.replace(base, qk_length=qk_length, kv_length=kv_length)
