"""FLOP counts of T5 training steps, scoring and greedy decoding, by hand formulas per matmul.

`tools/benchmark.py` divides these counts by measured times to report achieved FLOP/s. The counts are
what the computation *needs*, from the shapes alone (never from a profile), under the rules below.

Counting rules
--------------
1. **Matmuls only.** Every matrix multiply is listed with its shape: the backbone's projections
   (`query, key, value, out`, `wi`/`wi_0, wi_1`, `wo`), the attention scores `Q K^T` and mixing `P V`,
   the output layer (`logits_dense`, or the tied embedding), and a method's own matmuls (LoRA's `x A B`,
   adapters' `down`/`up`, prefix-tuning MLPs, ATTEMPT's gate, scores and mixture, APrompt's query-key
   terms). A multiply-add is 2 FLOPs: `[M, K] @ [K, N]` is 2MKN. Elementwise work (layer norms, softmax,
   activations, residual adds, masks, the loss's log-sum-exp over the vocabulary, the optimizer update)
   and gathers (embedding lookup, relative position bias, per-task rows) are not counted. For the shapes
   benchmarked they are a few percent of the matmul work; XLA's own count, which includes them, is
   reported beside ours.
2. **Dense attention.** Scores and mixing cover all T_q x T_k query/key pairs, masked ones included
   (padding, causal), as a dense implementation (ours, HF's) computes them. Extra keys (prefixes,
   key-value prompts) add to T_k. Training and scoring use these dense counts; decoding (rule 6) does not.
3. **Forward:** every matmul once.
4. **Backward: only what the gradient of the trainable collection needs.** A value *depends* on the
   trainable leaves when one of them is among its inputs; its cotangent is needed exactly where it
   depends. For `C = A @ B`:
   * `dA = dC B^T` is computed for the rows of A that depend: 2 * rows * K * N (nothing if A does not);
   * `dB = A^T dC` is computed if B depends: 2MKN. A frozen backbone kernel never does; a trainable
     matrix (LoRA's A and B, an adapter, a prefix MLP, every backbone kernel under full fine-tuning) does.
   So a frozen projection whose input depends costs 1x its forward FLOPs backward (dX, no dW), 2x under
   full fine-tuning (dX and dW); the attention core costs 2x (dQ and dK; dP and dV); and a matmul
   upstream of every trainable leaf costs nothing. Under an encoder prompt (prompt tuning, ATTEMPT) that
   prunes:
   * the decoder's layer-0 self-attention sublayer entirely (it reads only the frozen decoder-side
     embeddings), and its layer-0 cross-attention query projection and dQ;
   * in encoder layer 0 only the m prompt rows depend, until the first attention mixes them into every
     position: the query/key/value projections' dX is needed for m of the m+n rows; in the attention
     core dQ for the m prompt queries, dK and dV for the m prompt keys, and dP for the (query, key)
     pairs that involve a prompt row, (m+n)^2 - n^2 of them. From there on every row depends.
5. **What autodiff executes** differs from rule 4 in one way: JAX differentiates whole arrays, so the
   first encoder layer's dX is computed for all m+n rows (zeros at the token rows). `row_pruning=False`
   counts that way; `train_step_flops(..., row_pruning=False)` plus elementwise work is what XLA's
   `cost_analysis` of a compiled step reports (tests/test_flops.py checks it).
6. **Greedy decoding** (`decode_flops`) counts what cached decoding needs: the encoder forward once; the
   cross-attention keys and values once (they are the same at every step); the method's decoder rows
   once (a prefill); then per generated position one row through the decoder: the projections,
   self-attention over the positions so far (the rows, the previous tokens and itself; a causal prefix,
   not the whole cache), cross-attention over the encoder positions, and the output layer.

Batch-independent method matmuls (a prefix MLP, APrompt's query-key tables without a `tasks` axis) are
counted once per step: that is how often they run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional, Sequence

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

  Dependency is tracked per activation as a row count: `dep` of the `rows` rows of a `[B, rows, .]`
  activation depend on the trainable leaves. Partial counts only arise from prepended rows (which lead
  the sequence) before the first attention mixes them in, so a count is all the walk needs.
  """

  def __init__(self, config: T5Config, deltas: plugins.Deltas, batch: int, train: bool,
               row_pruning: bool = True):
    self.cfg = config
    self.deltas = tuple(deltas)
    self.batch = batch
    self.train = train
    self.row_pruning = row_pruning
    self.full = any(d.trains_backbone for d in self.deltas)
    if self.full and len(self.deltas) > 1:
      raise ValueError("flops: full fine-tuning composed with other methods (whose leaves then stay "
                       "frozen) has no formulas here")
    self._terms: dict[tuple[str, str], list[float]] = collections.OrderedDict()

  # ---------------------------------------------------------------------------------- accumulation
  def add(self, name: str, kind: str, forward: float, backward: float = 0.0) -> None:
    acc = self._terms.setdefault((name, kind), [0.0, 0.0])
    acc[0] += float(forward)
    acc[1] += float(backward) if self.train else 0.0

  def count(self) -> Count:
    return Count([Term(name, kind, fwd, bwd) for (name, kind), (fwd, bwd) in self._terms.items()])

  def matmul(self, name: str, kind: str, batch: float, m: float, k: float, n: float, a_rows: float,
             b_depends: bool) -> None:
    """`batch` x ([m, k] @ [k, n]); `a_rows` of A's m rows depend; `b_depends`: B depends (rule 4)."""
    forward = 2.0 * batch * m * k * n
    self.add(name, kind, forward, 2.0 * batch * a_rows * k * n + (forward if b_depends else 0.0))

  def _rows(self, dep: float, rows: float) -> float:
    """Rule 5: autodiff computes a partially dependent array's cotangent on all its rows."""
    return rows if (dep and not self.row_pruning) else dep

  # ---------------------------------------------------------------------------------- backbone pieces
  def dense(self, site: plugins.Site, name: str, where: str, rows: float, dep: float, fin: int,
            fout: int, kind: str = "projection") -> float:
    """A backbone projection on `[B, rows, fin]` and its plug-ins; returns the output's dependent rows."""
    self.matmul(f"{where}/{name}", kind, self.batch, rows, fin, fout, self._rows(dep, rows), self.full)
    out = dep
    for module in plugins.modules(self.deltas, "projection", site.at(name, fin, fout)):
      cls = type(module).__name__
      if cls == "LoraModule":  # s * (x A) B: dA, d(xA), dB always; dX where x depends.
        r = module.rank
        self.matmul(f"{where}/{name}/lora_a", "method", self.batch, rows, fin, r,
                    self._rows(dep, rows), True)
        self.matmul(f"{where}/{name}/lora_b", "method", self.batch, rows, r, fout, rows, True)
      elif cls != "BiasModule":  # A bias adds no matmul, but every row now depends.
        raise ValueError(f"flops: no formula for the projection plug-in {cls} at {where}/{name}")
      out = rows
    return rows if self.full else out

  def attention_core(self, where: str, tq: float, tk: float, extra: float, dep_q: float, dep_k: float,
                     dep_v: float, logit_terms: bool, keys_seen: Optional[float] = None) -> float:
    """Scores and mixing of `[B, h, tq, tk+extra]`; returns the output's dependent rows.

    `keys_seen` (decoding): the number of keys attended per query, instead of the dense tk + extra.
    """
    cfg, b = self.cfg, self.batch
    h, dk = cfg.num_heads, cfg.head_dim
    keys = (tk if keys_seen is None else keys_seen) + extra
    rk, rv = dep_k + extra, dep_v + extra  # Extra keys/values are trainable (or computed from it).
    if logit_terms:  # A trainable logit term makes every score depend.
      pairs = tq * keys
    else:
      pairs = tq * keys - (tq - dep_q) * (keys - rk) if (dep_q or rk) else 0.0
    rq = self._rows(dep_q, tq)
    if not self.row_pruning:  # Rule 5, with the extra keys a separate array and the values concatenated.
      pairs = tq * keys if pairs else 0.0
      rk = ((keys - extra) if dep_k else 0.0) + extra
      rv = keys if rv else 0.0
    forward = 2.0 * b * h * tq * keys * dk
    self.add(f"{where}/scores", "attention", forward, 2.0 * b * h * dk * (rq * keys + tq * rk))
    self.add(f"{where}/mix", "attention", forward, 2.0 * b * h * dk * (pairs + tq * rv))
    return tq if (rk or rv or logit_terms) else dep_q

  def attention_plugins(self, site: plugins.Site, where: str, tq: float, tk: float
                        ) -> tuple[float, bool]:
    """(extra keys, whether a trainable logit term acts) at an attention site, adding their matmuls."""
    cfg = self.cfg
    h, dk = cfg.num_heads, cfg.head_dim
    extra = 0.0
    for module in plugins.modules(self.deltas, "attention_kv", site):
      cls = type(module).__name__
      if cls == "PrefixKV":
        delta = module.delta
        extra += delta.length
        if delta.reparameterize:  # tanh(P' W_i + b_i) W_o + b_o, for every task of a bank.
          tasks = delta.num_tasks or 1
          d_emb = delta.prefix_embed_dim or cfg.emb_dim
          self.matmul(f"{where}/prefix_mlp_wi", "method", tasks, delta.length, d_emb, delta.mlp_hidden,
                      delta.length, True)
          self.matmul(f"{where}/prefix_mlp_wo", "method", tasks, delta.length, delta.mlp_hidden,
                      2 * h * dk, delta.length, True)
      elif cls == "KeyValuePrompt":
        extra += module.length
      else:
        raise ValueError(f"flops: no formula for the attention_kv plug-in {cls} at {where}")
    logit_terms = False
    for module in plugins.modules(self.deltas, "attention_logits", site):
      cls = type(module).__name__
      if cls == "QueryKeyPrompt":  # einsum('bqhl,bkhl->bhqk') with b = 1, or B with a tasks axis.
        copies = self.batch if module.num_tasks else 1
        self.matmul(f"{where}/qk_prompt", "method", copies * h, tq, module.length, tk, tq, True)
        logit_terms = True
      elif cls != "HideRows":  # HideRows adds a constant mask: nothing to count.
        raise ValueError(f"flops: no formula for the attention_logits plug-in {cls} at {where}")
    return extra, logit_terms

  def sublayer(self, site: plugins.Site, where: str, rows: float, dep_h: float, dep_y: float) -> float:
    """Adapters on a sublayer's output; returns the new output's dependent rows."""
    d = self.cfg.emb_dim
    for module in plugins.modules(self.deltas, "sublayer", site):
      cls = type(module).__name__
      if cls != "AdapterModule":
        raise ValueError(f"flops: no formula for the sublayer plug-in {cls} at {where}")
      r = module.bottleneck
      dep_in = dep_h if module.parallel else dep_y
      self.matmul(f"{where}/adapter_down", "method", self.batch, rows, d, r, self._rows(dep_in, rows),
                  True)
      self.matmul(f"{where}/adapter_up", "method", self.batch, rows, r, d, rows, True)
      dep_y = rows
    return dep_y

  def attention_block(self, stack: str, layer: int, kind: str, name: str, tq: float, dep_x: float,
                      kv_rows: Optional[float] = None, dep_kv: Optional[float] = None,
                      kv_project: Optional[float] = None, keys_seen: Optional[float] = None) -> float:
    """Pre-norm attention sublayer with residual; returns the residual stream's dependent rows.

    Args:
      kv_rows / dep_kv: the key/value source (None: self-attention on the block's own input).
      kv_project: rows whose keys/values are projected here (decoding: 1 new row, or 0 for cached
        cross-attention keys); default all `kv_rows`.
      keys_seen: decoding: keys attended per query (rule 6).
    """
    cfg = self.cfg
    n_layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    site = plugins.site(cfg, stack, layer, kind)
    where = f"{stack}/layers_{layer}/{name}"
    d, hk = cfg.emb_dim, cfg.num_heads * cfg.head_dim
    if kv_rows is None:
      kv_rows, dep_kv = tq, dep_x
    kv_project = kv_rows if kv_project is None else kv_project
    dep_q = self.dense(site, "query", where, tq, dep_x, d, hk)
    dep_k = dep_v = dep_kv
    if kv_project:
      dep_k = self.dense(site, "key", where, kv_project, min(dep_kv, kv_project), d, hk)
      dep_v = self.dense(site, "value", where, kv_project, min(dep_kv, kv_project), d, hk)
      if kv_project < kv_rows:  # Decoding: cached keys/values of earlier positions (no gradients).
        dep_k = dep_v = dep_kv
    extra, logit_terms = self.attention_plugins(site, where, tq, kv_rows)
    dep_o = self.attention_core(where, tq, kv_rows, extra, dep_q, dep_k, dep_v, logit_terms, keys_seen)
    dep_y = self.dense(site, "out", where, tq, dep_o, hk, d)
    dep_y = self.sublayer(site, where, tq, dep_x, dep_y)
    return max(dep_x, dep_y)

  def mlp_block(self, stack: str, layer: int, rows: float, dep_x: float) -> float:
    cfg = self.cfg
    n_layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    site = plugins.site(cfg, stack, layer, "mlp")
    where = f"{stack}/layers_{layer}/mlp"
    names = ("wi",) if len(cfg.mlp_activations) == 1 else tuple(
        f"wi_{i}" for i in range(len(cfg.mlp_activations)))
    dep_h = max(self.dense(site, n, where, rows, dep_x, cfg.emb_dim, cfg.mlp_dim) for n in names)
    dep_y = self.dense(site, "wo", where, rows, dep_h, cfg.mlp_dim, cfg.emb_dim)
    dep_y = self.sublayer(site, where, rows, dep_x, dep_y)
    return max(dep_x, dep_y)

  def input_rows(self, stack: str, n_layers: int) -> tuple[int, int]:
    """(rows prepended at the stack input, how many of them depend on trainable leaves)."""
    site = plugins.site(self.cfg, stack, -1, "input")
    rows = dep = 0
    for module in plugins.modules(self.deltas, "input_rows", site):
      cls = type(module).__name__
      if cls == "PromptRows":
        length = module.delta.length
      elif cls == "AttemptPrompt":
        length = module.delta.prompt_length
        self.attempt(module.delta)
      elif cls in ("InputPrompt", "ZeroRows"):
        length = module.length
      else:
        raise ValueError(f"flops: no formula for the input_rows plug-in {cls} at {stack}")
      rows += length
      dep += 0 if cls == "ZeroRows" else length
    return rows, dep

  def hidden_rows(self, stack: str, layer: int, n_layers: int, rows: float, dep_x: float) -> float:
    site = plugins.site(self.cfg, stack, layer, "layer")
    for module in plugins.modules(self.deltas, "hidden_rows", site):
      if type(module).__name__ != "DeepPrompt":
        raise ValueError(f"flops: no formula for the hidden_rows plug-in {type(module).__name__}")
      dep_x = rows if dep_x >= rows else min(rows, dep_x + module.length)
    return dep_x

  def attempt(self, delta) -> None:
    """ATTEMPT's gate G, attention scores and mixture (`attempt.AttemptPrompt`); sources are frozen."""
    b, d, m = self.batch, self.cfg.emb_dim, delta.prompt_length
    t = len(delta.source_names)
    where = "encoder/attempt"
    if not delta.constant_attention:
      r = delta.bottleneck
      self.matmul(f"{where}/gate/w_down", "method", 1, b, d, r, 0, True)  # The pooled input is frozen.
      self.matmul(f"{where}/gate/w_up", "method", 1, b, r, d, b, True)
      if delta.per_token:
        if t:  # einsum('jmd,bd->bmj', sources, z)
          self.matmul(f"{where}/scores", "method", 1, b, d, t * m, b, False)
        if delta.use_target:  # einsum('bmd,bd->bm', target, z)
          self.matmul(f"{where}/target_score", "method", b, m, d, 1, m, True)
      else:
        if t:  # einsum('jd,bd->bj', pooled sources, z)
          self.matmul(f"{where}/scores", "method", 1, b, d, t, b, False)
        if delta.use_target:  # einsum('bd,bd->b', pooled target, z)
          self.matmul(f"{where}/target_score", "method", b, 1, d, 1, 1, True)
    if t:  # The mixture of the frozen sources; its weights depend unless the attention is constant.
      weights_dep = 0 if delta.constant_attention else b
      if delta.per_token:  # einsum('bmj,jmd->bmd')
        self.matmul(f"{where}/mixture", "method", m, b, t, d, weights_dep, False)
      else:  # einsum('bj,jmd->bmd')
        self.matmul(f"{where}/mixture", "method", 1, b, t, m * d, weights_dep, False)

  # ---------------------------------------------------------------------------------- stacks
  def encoder(self, inputs: int) -> tuple[float, float]:
    """The encoder on `inputs` tokens; returns (encoded rows, dependent rows)."""
    cfg = self.cfg
    n_layers = cfg.num_encoder_layers
    prepended, dep = self.input_rows("encoder", n_layers)
    rows = inputs + prepended
    dep_x = rows if self.full else dep
    for i in range(n_layers):
      if i:
        dep_x = self.hidden_rows("encoder", i, n_layers, rows, dep_x)
      dep_x = self.attention_block("encoder", i, "attention", "attention", rows, dep_x)
      dep_x = self.mlp_block("encoder", i, rows, dep_x)
    return rows, dep_x

  def decoder(self, targets: int, enc_rows: float, dep_enc: float) -> None:
    cfg = self.cfg
    n_layers = cfg.num_decoder_layers
    prepended, dep = self.input_rows("decoder", n_layers)
    rows = targets + prepended
    dep_x = rows if self.full else dep
    for i in range(n_layers):
      if i:
        dep_x = self.hidden_rows("decoder", i, n_layers, rows, dep_x)
      dep_x = self.attention_block("decoder", i, "self_attention", "self_attention", rows, dep_x)
      dep_x = self.attention_block("decoder", i, "cross_attention", "encoder_decoder_attention", rows,
                                   dep_x, enc_rows, dep_enc)
      dep_x = self.mlp_block("decoder", i, rows, dep_x)
    # The logits cover the target positions only (the prepended rows are dropped).
    dep_out = targets if dep_x >= rows else max(0.0, dep_x - prepended)
    self.logits(targets, dep_out)

  def logits(self, rows: float, dep: float) -> None:
    cfg = self.cfg
    if cfg.logits_via_embedding:  # x @ embedding^T: the embedding is trainable only for full FT.
      self.matmul("decoder/logits", "logits", self.batch, rows, cfg.emb_dim, cfg.vocab_size,
                  self._rows(dep, rows), self.full)
    else:
      n = cfg.num_decoder_layers
      self.dense(plugins.site(cfg, "decoder", n, "logits"), "logits_dense", "decoder", rows, dep,
                 cfg.emb_dim, cfg.vocab_size, kind="logits")


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
  cfg = walk.cfg
  n_layers = cfg.num_decoder_layers
  prepended, _ = walk.input_rows("decoder", n_layers)
  # Cross-attention keys and values, once.
  hk = cfg.num_heads * cfg.head_dim
  for i in range(n_layers):
    site = plugins.site(cfg, "decoder", i, "cross_attention")
    where = f"decoder/layers_{i}/encoder_decoder_attention"
    walk.dense(site, "key", where, enc_rows, 0, cfg.emb_dim, hk)
    walk.dense(site, "value", where, enc_rows, 0, cfg.emb_dim, hk)
  # The prefill of the method's decoder rows, then one row per step.
  chunks = ([(prepended, 0)] if prepended else []) + [(1, prepended + s) for s in range(length)]
  for rows, start in chunks:
    for i in range(n_layers):
      # Causal: the rows at positions start..start+rows-1 see start+1..start+rows keys, on average
      # start + (rows + 1) / 2.
      walk.attention_block("decoder", i, "self_attention", "self_attention", rows, 0,
                           kv_rows=start + rows, dep_kv=0, kv_project=rows,
                           keys_seen=start + (rows + 1) / 2)
      walk.attention_block("decoder", i, "cross_attention", "encoder_decoder_attention", rows, 0,
                           kv_rows=enc_rows, dep_kv=0, kv_project=0)
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
