"""FLOP counts of T5 training steps, scoring and greedy decoding, by hand formulas per matmul.

`tools/benchmark.py` divides these counts by measured times to report achieved FLOP/s. The counts are
what the computation *needs*, from the shapes alone (never from a profile), under the rules below.

Counting rules
--------------
1. **Matmuls only.** Every matrix multiply is listed with its shape: the backbone's projections
   (`query, key, value, out`, `wi`/`wi_0, wi_1`, `wo`), the attention scores `Q K^T` and mixing `P V`,
   the output layer (`logits_dense`, or the tied embedding), and a method's own matmuls, which each of
   its plug-in modules declares (below). A multiply-add is 2 FLOPs: `[M, K] @ [K, N]` is 2MKN.
   Elementwise work (layer norms, softmax, activations, residual adds, masks, scalings and biases, the
   loss's log-sum-exp over the vocabulary, the optimizer update) and gathers (embedding lookup, relative
   position bias, per-task rows) are not counted. For the shapes benchmarked they are a few percent of
   the matmul work; XLA's own count, which includes them, is reported beside ours.
2. **Dense attention.** Scores and mixing cover all T_q x T_k query/key pairs, masked ones included
   (padding, causal), as a dense implementation (ours, HF's) computes them. Extra keys (prefixes,
   key-value prompts) add to T_k. Training and scoring use these dense counts; decoding (rule 6) does not.
3. **Forward:** every matmul once.
4. **Backward: only what the gradient of the trainable collection needs.** A value *depends* on the
   trainable leaves when one of them is among its inputs; its cotangent is needed exactly where it
   depends. For `C = A @ B`:
   * `dA = dC B^T` is computed for the rows of A that depend: 2 * rows * K * N (nothing if A does not);
   * `dB = A^T dC` is computed if B depends: 2MKN. A frozen backbone kernel never does; a trainable
     matrix (a low-rank update, an adapter, a prefix MLP, every backbone kernel under full fine-tuning)
     does.
   So a frozen projection whose input depends costs 1x its forward FLOPs backward (dX, no dW), 2x under
   full fine-tuning (dX and dW); the attention core costs 2x (dQ and dK; dP and dV); and a matmul
   upstream of every trainable leaf costs nothing. Under an encoder prompt (rows prepended at the encoder
   input) that prunes:
   * the decoder's layer-0 self-attention sublayer entirely (it reads only the frozen decoder-side
     embeddings), and its layer-0 cross-attention query projection and dQ;
   * in encoder layer 0 only the m prompt rows depend, until the first attention mixes them into every
     position: the query/key/value projections' dX is needed for m of the m+n rows; in the attention
     core dQ for the m prompt queries, dK and dV for the m prompt keys, and dP for the (query, key)
     pairs that involve a prompt row, (m+n)^2 - n^2 of them. From there on every row depends.
   A trainable term after a layer norm (e.g. a bias on its output) makes every row of the norm's output
   depend.
5. **What autodiff executes** differs from rule 4 in one way: JAX differentiates whole arrays, so the
   first encoder layer's dX is computed for all m+n rows (zeros at the token rows). `row_pruning=False`
   counts that way; `train_step_flops(..., row_pruning=False)` plus elementwise work is what XLA's
   `cost_analysis` of a compiled step reports (tests/test_flops.py checks it).
6. **Greedy decoding** (`decode_flops`) counts what cached decoding needs: the encoder forward once; the
   cross-attention keys and values once (they are the same at every step); the method's decoder rows
   and its decoder `stack_state` once (a prefill); then per generated position one row through the
   decoder: the projections, self-attention over the positions so far (the rows, the previous tokens and
   itself; a causal prefix, not the whole cache), cross-attention over the encoder positions, and the
   output layer.

Batch-independent method matmuls (a prefix MLP, position tables without a `tasks` axis, a `stack_state`
module's) are counted once per step: that is how often they run.

Declaring a method's FLOPs
--------------------------
This module names no method. The walk below visits every plug-in site of the backbone in order, asks the
method's deltas for their modules there (`plugins.modules`), and hands each module's `flops` method the
counter (the walk) and the site. The declaration adds the module's matmuls with `counter.matmul(name,
'method', batch, m, k, n, a_rows, b_depends)` (rule 4: `a_rows` of A's m rows depend, `b_depends` when B
is trainable or computed from trainable leaves) and returns what the walk needs to go on. Rows are
counted per example: "dependent rows" are how many of an activation's `rows` rows depend on the
trainable leaves (rule 4); pass `counter.rows(dep, rows)` as a dX row count to get rule 5's count
when `row_pruning=False`. `counter.batch` is B, `counter.config` the `T5Config`, `counter.train` whether
a backward pass is counted; the site's geometry (`d_model`, `num_heads`, `head_dim`, `in_features`,
`out_features`) and `site.where` (a readable path for term names) come with the site.

| hook               | declaration                                  | returns                                 |
|--------------------|----------------------------------------------|-----------------------------------------|
| `stack_state`      | `(counter, site)`                            | None (matmuls once per stack and step)  |
| `input_rows`       | `(counter, site, tokens)`                    | (rows prepended, how many depend)       |
| `hidden_rows`      | `(counter, site, rows, dep)`                 | the layer input's dependent rows        |
| `attention_kv`     | `(counter, site, tq, tk)`                    | the number of extra keys (they depend)  |
| `attention_logits` | `(counter, site, tq, tk)`                    | True when the term is trainable         |
| `projection_input` | `(counter, site, rows, dep)`                 | the new input's dependent rows          |
| `projection`       | `(counter, site, rows, dep_x, dep_y)`        | the new output's dependent rows         |
| `sublayer`         | `(counter, site, rows, dep_x, dep_normed, dep_y)` | the new output's dependent rows    |

The arguments mirror the module call: `tokens` are the stack's token positions (0 for the decoder's
prefill), `tq`/`tk` the attention's query and sequence-key counts, `dep_x`/`dep_y` the dependent rows of
the hook's `x` and `y`, `dep_normed` those of a sublayer's normed input. A `projection` module also acts
at the layer norms (`site.projection` is the norm's name; no matmul of its own) and at the tied output
layer. A plug-in module without a `flops` method is an error naming the hook, its class and the site.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

KINDS = ("projection", "attention", "logits", "method")


@dataclasses.dataclass(frozen=True)
class Term:
  """The FLOPs of one matmul (or a sum of identical ones), forward and backward.

  Attributes:
    name: where it runs, e.g. `encoder/layers_0/attention/query` or `encoder/layers_0/attention/scores`.
    kind: 'projection' (backbone kernels), 'attention' (scores and mixing), 'logits' or 'method'.
  """

  name: str
  kind: str
  forward: float
  backward: float = 0.0

  @property
  def total(self) -> float:
    return self.forward + self.backward


@dataclasses.dataclass
class Count:
  """A sum of `Term`s, with breakdowns."""

  terms: list[Term]

  @property
  def forward(self) -> float:
    return sum(t.forward for t in self.terms)

  @property
  def backward(self) -> float:
    return sum(t.backward for t in self.terms)

  @property
  def total(self) -> float:
    return self.forward + self.backward

  def by_kind(self) -> dict[str, tuple[float, float]]:
    """{kind: (forward, backward)} in `KINDS` order (kinds with no FLOPs omitted)."""
    out = {}
    for kind in KINDS:
      fwd = sum(t.forward for t in self.terms if t.kind == kind)
      bwd = sum(t.backward for t in self.terms if t.kind == kind)
      if fwd or bwd:
        out[kind] = (fwd, bwd)
    return out

  def term(self, name: str) -> Term:
    for t in self.terms:
      if t.name == name:
        return t
    raise KeyError(f"no FLOP term {name!r}; terms: {[t.name for t in self.terms]}")

  def table(self, unit: float = 1e9) -> str:
    """A plain-text breakdown by kind, in GFLOP by default."""
    lines = [f"{'kind':<12}{'forward':>12}{'backward':>12}{'total':>12}"]
    for kind, (fwd, bwd) in self.by_kind().items():
      lines.append(f"{kind:<12}{fwd / unit:>12.3f}{bwd / unit:>12.3f}{(fwd + bwd) / unit:>12.3f}")
    lines.append(f"{'all':<12}{self.forward / unit:>12.3f}{self.backward / unit:>12.3f}"
                 f"{self.total / unit:>12.3f}")
    return "\n".join(lines)


class _Walk:
  """Walks the T5 of `config` with `deltas` plugged in, adding the `Term`s of rules 1-6.

  It is also the counter that plug-in modules' `flops` declarations receive (module docstring):
  `matmul`, `rows`, `batch`, `config`, `train`, `row_pruning`.

  Dependency is tracked per activation as a row count: `dep` of the `rows` rows of a `[B, rows, .]`
  activation depend on the trainable leaves. Partial counts only arise from prepended rows (which lead
  the sequence) before the first attention mixes them in, so a count is all the walk needs.
  """

  def __init__(self, config: T5Config, deltas: plugins.Deltas, batch: int, train: bool,
               row_pruning: bool = True):
    self.config = config
    self.deltas = tuple(deltas)
    self.batch = batch
    self.train = train
    self.row_pruning = row_pruning
    self.full = any(d.trains_backbone for d in self.deltas)
    if self.full and len(self.deltas) > 1:
      raise ValueError("flops: full fine-tuning composed with other methods (whose leaves then stay "
                       "frozen) has no formulas here")
    self._terms: dict[tuple[str, str], list[float]] = collections.OrderedDict()

  # ---------------------------------------------------------------------------------- the counter API
  def add(self, name: str, kind: str, forward: float, backward: float = 0.0) -> None:
    """Adds FLOPs to the term `name` (rule 4's backward only when a training step is counted)."""
    acc = self._terms.setdefault((name, kind), [0.0, 0.0])
    acc[0] += float(forward)
    acc[1] += float(backward) if self.train else 0.0

  def matmul(self, name: str, kind: str, batch: float, m: float, k: float, n: float, a_rows: float,
             b_depends: bool) -> None:
    """`batch` x ([m, k] @ [k, n]); `a_rows` of A's m rows depend; `b_depends`: B depends (rule 4)."""
    forward = 2.0 * batch * m * k * n
    self.add(name, kind, forward, 2.0 * batch * a_rows * k * n + (forward if b_depends else 0.0))

  def rows(self, dep: float, rows: float) -> float:
    """Rule 5: autodiff computes a partially dependent array's cotangent on all its rows."""
    return rows if (dep and not self.row_pruning) else dep

  def count(self) -> Count:
    return Count([Term(name, kind, fwd, bwd) for (name, kind), (fwd, bwd) in self._terms.items()])

  # ---------------------------------------------------------------------------------- plug-ins
  def declared(self, hook: str, site: plugins.Site) -> list[Callable[..., Any]]:
    """The `flops` declarations of the modules the deltas give for `hook(site)`, in delta order."""
    found = []
    for module in plugins.modules(self.deltas, hook, site):
      declare = getattr(module, "flops", None)
      if not callable(declare):
        raise ValueError(f"flops: no FLOP declaration for the {hook} plug-in {type(module).__name__} at "
                         f"{site.where}: give {type(module).__name__} a `flops` method (see 'Declaring "
                         "a method's FLOPs' in prompt_mix/flops.py)")
      found.append(declare)
    return found

  def stack_state(self, stack: str) -> None:
    """The matmuls of the deltas' `stack_state` modules of `stack` (once per stack and step)."""
    site = plugins.site(self.config, stack, -1, "stack")
    for declare in self.declared("stack_state", site):
      declare(self, site)

  # ---------------------------------------------------------------------------------- backbone pieces
  def dense(self, site: plugins.Site, rows: float, dep: float, kind: str = "projection",
            input_hooks: bool = True) -> float:
    """The backbone projection at `site` on `[B, rows, in]` and its plug-ins; returns the output's
    dependent rows.

    `projection_input` plug-ins transform the input first (unless `input_hooks` is False: the tied output
    layer has none), then the matmul, then the `projection` plug-ins wrap the output.
    """
    if input_hooks:
      for declare in self.declared("projection_input", site):
        dep = declare(self, site, rows, dep)
    self.matmul(site.where, kind, self.batch, rows, site.in_features, site.out_features,
                self.rows(dep, rows), self.full)
    out = rows if self.full else dep
    for declare in self.declared("projection", site):
      out = declare(self, site, rows, dep, out)
    return rows if self.full else out

  def norm(self, site: plugins.Site, rows: float, dep: float) -> float:
    """A layer norm at `site` (no matmul) and its `projection` plug-ins; returns its output's dependent
    rows (every row when a trainable term acts on it)."""
    out = dep
    for declare in self.declared("projection", site):
      out = declare(self, site, rows, dep, out)
    return out

  def attention_core(self, where: str, tq: float, tk: float, extra: float, dep_q: float, dep_k: float,
                     dep_v: float, logit_terms: bool, keys_seen: Optional[float] = None) -> float:
    """Scores and mixing of `[B, h, tq, tk+extra]`; returns the output's dependent rows.

    `keys_seen` (decoding): the number of keys attended per query, instead of the dense tk + extra.
    """
    cfg, b = self.config, self.batch
    h, dk = cfg.num_heads, cfg.head_dim
    keys = (tk if keys_seen is None else keys_seen) + extra
    rk, rv = dep_k + extra, dep_v + extra  # Extra keys/values are trainable (or computed from it).
    if logit_terms:  # A trainable logit term makes every score depend.
      pairs = tq * keys
    else:
      pairs = tq * keys - (tq - dep_q) * (keys - rk) if (dep_q or rk) else 0.0
    rq = self.rows(dep_q, tq)
    if not self.row_pruning:  # Rule 5, with the extra keys a separate array and the values concatenated.
      pairs = tq * keys if pairs else 0.0
      rk = ((keys - extra) if dep_k else 0.0) + extra
      rv = keys if rv else 0.0
    forward = 2.0 * b * h * tq * keys * dk
    self.add(f"{where}/scores", "attention", forward, 2.0 * b * h * dk * (rq * keys + tq * rk))
    self.add(f"{where}/mix", "attention", forward, 2.0 * b * h * dk * (pairs + tq * rv))
    return tq if (rk or rv or logit_terms) else dep_q

  def attention_plugins(self, site: plugins.Site, tq: float, tk: float) -> tuple[float, bool]:
    """(extra keys, whether a trainable logit term acts) at an attention site, adding their matmuls."""
    extra = 0.0
    for declare in self.declared("attention_kv", site):
      extra += declare(self, site, tq, tk)
    logit_terms = False
    for declare in self.declared("attention_logits", site):
      logit_terms = bool(declare(self, site, tq, tk)) or logit_terms
    return extra, logit_terms

  def sublayer(self, site: plugins.Site, rows: float, dep_x: float, dep_normed: float,
               dep_y: float) -> float:
    """The `sublayer` plug-ins on a sublayer's output; returns the new output's dependent rows."""
    for declare in self.declared("sublayer", site):
      dep_y = declare(self, site, rows, dep_x, dep_normed, dep_y)
    return dep_y

  def attention_block(self, stack: str, layer: int, kind: str, tq: float, dep_x: float,
                      kv_rows: Optional[float] = None, dep_kv: Optional[float] = None,
                      kv_project: Optional[float] = None, keys_seen: Optional[float] = None) -> float:
    """Pre-norm attention sublayer with residual; returns the residual stream's dependent rows.

    Args:
      kv_rows / dep_kv: the key/value source (None: self-attention on the block's own normed input).
      kv_project: rows whose keys/values are projected here (decoding: 1 new row, or 0 for cached
        cross-attention keys); default all `kv_rows`.
      keys_seen: decoding: keys attended per query (rule 6).
    """
    cfg = self.config
    site = plugins.site(cfg, stack, layer, kind)
    d, hk = cfg.emb_dim, cfg.num_heads * cfg.head_dim
    dep_n = self.norm(site.at(plugins.PRE_NORMS[(stack, kind)], d, d), tq, dep_x)
    if kv_rows is None:
      kv_rows, dep_kv = tq, dep_n
    kv_project = kv_rows if kv_project is None else kv_project
    dep_q = self.dense(site.at("query", d, hk), tq, dep_n)
    dep_k = dep_v = dep_kv
    if kv_project:
      dep_k = self.dense(site.at("key", d, hk), kv_project, min(dep_kv, kv_project))
      dep_v = self.dense(site.at("value", d, hk), kv_project, min(dep_kv, kv_project))
      if kv_project < kv_rows:  # Decoding: cached keys/values of earlier positions (no gradients).
        dep_k = dep_v = dep_kv
    extra, logit_terms = self.attention_plugins(site, tq, kv_rows)
    dep_o = self.attention_core(site.where, tq, kv_rows, extra, dep_q, dep_k, dep_v, logit_terms,
                                keys_seen)
    dep_y = self.dense(site.at("out", hk, d), tq, dep_o)
    dep_y = self.sublayer(site, tq, dep_x, dep_n, dep_y)
    return max(dep_x, dep_y)

  def mlp_block(self, stack: str, layer: int, rows: float, dep_x: float) -> float:
    cfg = self.config
    site = plugins.site(cfg, stack, layer, "mlp")
    d, f = cfg.emb_dim, cfg.mlp_dim
    dep_n = self.norm(site.at(plugins.PRE_NORMS[(stack, "mlp")], d, d), rows, dep_x)
    names = ("wi",) if len(cfg.mlp_activations) == 1 else tuple(
        f"wi_{i}" for i in range(len(cfg.mlp_activations)))
    dep_h = max(self.dense(site.at(n, d, f), rows, dep_n) for n in names)
    dep_y = self.dense(site.at("wo", f, d), rows, dep_h)
    dep_y = self.sublayer(site, rows, dep_x, dep_n, dep_y)
    return max(dep_x, dep_y)

  def input_rows(self, stack: str, tokens: float) -> tuple[float, float]:
    """(rows prepended at the stack input, how many of them depend on trainable leaves)."""
    site = plugins.site(self.config, stack, -1, "input")
    rows = dep = 0
    for declare in self.declared("input_rows", site):
      length, dependent = declare(self, site, tokens)
      rows += length
      dep += dependent
    return rows, dep

  def hidden_rows(self, stack: str, layer: int, rows: float, dep_x: float) -> float:
    site = plugins.site(self.config, stack, layer, "layer")
    for declare in self.declared("hidden_rows", site):
      dep_x = declare(self, site, rows, dep_x)
    return dep_x

  def final_norm(self, stack: str, rows: float, dep: float) -> float:
    cfg = self.config
    depth = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    site = plugins.site(cfg, stack, depth, "output").at(plugins.FINAL_NORMS[stack], cfg.emb_dim,
                                                          cfg.emb_dim)
    return self.norm(site, rows, dep)

  # ---------------------------------------------------------------------------------- stacks
  def encoder(self, inputs: int) -> tuple[float, float]:
    """The encoder on `inputs` tokens; returns (encoded rows, dependent rows)."""
    self.stack_state("encoder")
    prepended, dep = self.input_rows("encoder", inputs)
    rows = inputs + prepended
    dep_x = rows if self.full else dep
    for i in range(self.config.num_encoder_layers):
      if i:
        dep_x = self.hidden_rows("encoder", i, rows, dep_x)
      dep_x = self.attention_block("encoder", i, "attention", rows, dep_x)
      dep_x = self.mlp_block("encoder", i, rows, dep_x)
    return rows, self.final_norm("encoder", rows, dep_x)

  def decoder(self, targets: int, enc_rows: float, dep_enc: float) -> None:
    self.stack_state("decoder")
    prepended, dep = self.input_rows("decoder", targets)
    rows = targets + prepended
    dep_x = rows if self.full else dep
    for i in range(self.config.num_decoder_layers):
      if i:
        dep_x = self.hidden_rows("decoder", i, rows, dep_x)
      dep_x = self.attention_block("decoder", i, "self_attention", rows, dep_x)
      dep_x = self.attention_block("decoder", i, "cross_attention", rows, dep_x, enc_rows, dep_enc)
      dep_x = self.mlp_block("decoder", i, rows, dep_x)
    dep_x = self.final_norm("decoder", rows, dep_x)
    # The logits cover the target positions only (the prepended rows are dropped).
    dep_out = targets if dep_x >= rows else max(0.0, dep_x - prepended)
    self.logits(targets, dep_out)

  def logits(self, rows: float, dep: float) -> None:
    """The output layer: `logits_dense`, or `x @ embedding^T` (tied; the embedding is trainable only
    under full fine-tuning), with its `projection` plug-ins."""
    cfg = self.config
    tied = cfg.logits_via_embedding
    site = plugins.site(cfg, "decoder", cfg.num_decoder_layers, "logits").at(
        "logits" if tied else "logits_dense", cfg.emb_dim, cfg.vocab_size)
    self.dense(site, rows, dep, kind="logits", input_hooks=not tied)


def train_step_flops(config: T5Config, deltas: plugins.Deltas, batch: int, inputs: int, targets: int,
                     row_pruning: bool = True) -> Count:
  """FLOPs of one training step (forward and backward w.r.t. the trainable collection), rules 1-5.

  Args:
    deltas: the method (empty: the plain backbone with nothing trainable: the forward only).
    batch, inputs, targets: B and the encoder/decoder token lengths (before any prepended rows).
    row_pruning: False counts the first layer's dX on all rows, as autodiff executes it (rule 5).
  """
  walk = _Walk(config, deltas, batch, train=True, row_pruning=row_pruning)
  walk.decoder(targets, *walk.encoder(inputs))
  return walk.count()


def forward_flops(config: T5Config, deltas: plugins.Deltas, batch: int, inputs: int,
                  targets: int) -> Count:
  """FLOPs of one forward pass to the logits (what `score_batch` needs), rules 1-3."""
  walk = _Walk(config, deltas, batch, train=False)
  walk.decoder(targets, *walk.encoder(inputs))
  return walk.count()


def decode_flops(config: T5Config, deltas: plugins.Deltas, batch: int, inputs: int,
                 length: int) -> Count:
  """FLOPs of greedy decoding of `length` positions with a KV cache (rule 6)."""
  walk = _Walk(config, deltas, batch, train=False)
  enc_rows, _ = walk.encoder(inputs)
  cfg = walk.config
  n_layers = cfg.num_decoder_layers
  walk.stack_state("decoder")
  prepended, _ = walk.input_rows("decoder", 0)
  # Cross-attention keys and values, once.
  d, hk = cfg.emb_dim, cfg.num_heads * cfg.head_dim
  for i in range(n_layers):
    site = plugins.site(cfg, "decoder", i, "cross_attention")
    walk.dense(site.at("key", d, hk), enc_rows, 0)
    walk.dense(site.at("value", d, hk), enc_rows, 0)
  # The prefill of the method's decoder rows, then one row per step.
  chunks = ([(prepended, 0)] if prepended else []) + [(1, prepended + s) for s in range(length)]
  for rows, start in chunks:
    for i in range(n_layers):
      # Causal: the rows at positions start..start+rows-1 see start+1..start+rows keys, on average
      # start + (rows + 1) / 2.
      walk.attention_block("decoder", i, "self_attention", rows, 0, kv_rows=start + rows, dep_kv=0,
                           kv_project=rows, keys_seen=start + (rows + 1) / 2)
      walk.attention_block("decoder", i, "cross_attention", rows, 0, kv_rows=enc_rows, dep_kv=0,
                           kv_project=0)
      walk.mlp_block("decoder", i, rows, 0)
    if not (rows == prepended and start == 0 and prepended):
      walk.logits(rows, 0)
  return walk.count()


_HLO_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_HLO_DOT = re.compile(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


@dataclasses.dataclass(frozen=True)
class HloDot:
  """One `dot` instruction of an HLO module: operand shapes and dimension numbers."""

  dtype: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_contracting: tuple[int, ...]
  rhs_contracting: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  out: tuple[int, ...]

  @property
  def flops(self) -> float:
    """2 x (output elements) x (contracted size)."""
    return 2.0 * math.prod(self.out) * math.prod(self.lhs[d] for d in self.lhs_contracting)


def hlo_dots(hlo_text: str) -> list[HloDot]:
  """The `dot` instructions of an HLO module's text (e.g. `compiled.as_text()`), in order."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = _HLO_DEF.match(line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(int(x) for x in m.group(3).split(",") if x))

  def dims(line, name):
    m = re.search(name + r"=\{([\d,]*)\}", line)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()

  dots = []
  for line in hlo_text.splitlines():
    if " dot(" not in line:
      continue
    dtype, out = shapes[_HLO_DEF.match(line).group(1)]
    lhs_name, rhs_name = _HLO_DOT.search(line).groups()
    dots.append(HloDot(dtype, shapes[lhs_name][1], shapes[rhs_name][1], dims(line, "lhs_contracting_dims"),
                       dims(line, "rhs_contracting_dims"), dims(line, "lhs_batch_dims"),
                       dims(line, "rhs_batch_dims"), out))
  return dots


def hlo_dot_flops(hlo_text: str) -> float:
  """The FLOPs of the `dot` instructions of an HLO module's text (e.g. `compiled.as_text()`).

  What XLA executes in matmuls, to compare with the counts above (rule 5). Other instructions
  (elementwise, reductions) are left out, as in rule 1.
  """
  return sum(dot.flops for dot in hlo_dots(hlo_text))


def describe(deltas: Sequence[plugins.Delta]) -> str:
  """A short name of a method for tables."""
  return plugins.describe(deltas)
