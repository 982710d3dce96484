"""The T5 encoder-decoder: the parameter tree and numerics of T5X's `t5x/examples/t5/network.py`.

```
token_embedder/embedding                                     [vocab, d]
{encoder,decoder}/relpos_bias/rel_embedding                  [heads, buckets]
encoder/layers_i/{pre_attention_layer_norm, attention, pre_mlp_layer_norm, mlp}
decoder/layers_i/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                  encoder_decoder_attention, pre_mlp_layer_norm, mlp}
encoder/encoder_norm, decoder/decoder_norm, decoder/logits_dense (v1.1)
```

The method plug-ins (`plugins.py`) are consulted at fixed points: each stack's start (a value shared by its
layers), the stack inputs (prepended rows), each layer's input (deep prompts replacing those rows), each
attention (extra keys/values, logit terms), each projection and layer norm, and each sublayer output. With
no deltas this is exactly T5X's T5.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_mix.t5 import layers
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any


def _remat(cls, config: T5Config):
  if config.remat == "none":
    return cls
  policy = None
  if config.remat == "dots":
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  return nn.remat(cls, policy=policy)


def _replace_rows(x: Array, deltas: plugins.Deltas, site: plugins.Site, ctx: plugins.Context) -> Array:
  """Deep prompts: each delta's `hidden_rows` overwrite the positions its own input rows occupy.

  Nothing is replaced when this call's activations carry no rows (cached decoding steps after the
  prefill: the rows are in the cache).
  """
  if not ctx.carries_rows:
    return x
  for module, delta_ctx in plugins.calls(deltas, "hidden_rows", site, ctx):
    name = type(deltas[delta_ctx.index]).__name__
    if delta_ctx.rows is None:
      raise ValueError(f"{name} gives hidden rows at {site.stack} layer {site.layer} but no input rows at "
                       "the stack input: there are no positions to replace.")
    start, length = delta_ctx.rows
    rows = jnp.asarray(module(x, delta_ctx), x.dtype)
    if rows.ndim != 3 or rows.shape[1] != length:
      raise ValueError(f"{name}: hidden rows at {site.stack} layer {site.layer} have shape "
                       f"{tuple(rows.shape)}; its input rows have length {length} ([B, {length}, d] expected).")
    x = jax.lax.dynamic_update_slice(x, rows, (0, start, 0))
  return x


def _prepend_rows(embedded: Array, mask: Array, deltas: plugins.Deltas, site: plugins.Site,
                  ctx: plugins.Context) -> tuple[Array, Array, tuple]:
  """Every delta's input rows: returns x [B, m+n, d], mask [B, m+n] and each delta's (start, length)."""
  rows, spans, offset = [], [None] * len(deltas), 0
  for module, delta_ctx in plugins.calls(deltas, "input_rows", site, ctx):
    r = jnp.asarray(module(embedded, mask, delta_ctx), embedded.dtype)
    if r.ndim != 3 or r.shape[0] != embedded.shape[0] or r.shape[2] != embedded.shape[2]:
      raise ValueError(f"{type(deltas[delta_ctx.index]).__name__}: input rows at the {site.stack} input have "
                       f"shape {tuple(r.shape)}, expected [{embedded.shape[0]}, m, {embedded.shape[2]}]")
    rows.append(r)
    spans[delta_ctx.index] = (offset, r.shape[1])
    offset += r.shape[1]
  if not rows:
    return embedded, mask, tuple(spans)
  x = jnp.concatenate(rows + [embedded], axis=1)
  mask = jnp.concatenate([jnp.ones((mask.shape[0], offset), mask.dtype), mask], axis=1)
  return x, mask, tuple(spans)


def _stack_states(deltas: plugins.Deltas, site: plugins.Site, ctx: plugins.Context) -> tuple:
  """Each delta's `stack_state` value for this stack (None where it has none)."""
  states = [None] * len(deltas)
  for module, delta_ctx in plugins.calls(deltas, "stack_state", site, ctx):
    states[delta_ctx.index] = module(delta_ctx)
  return tuple(states)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP blocks with residuals."""

  config: T5Config
  layer: int
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, positions: Array,
               ctx: plugins.Context) -> Array:
    """x [B, n, d], mask [B, 1, n, n], bias [1, h, n, n] -> [B, n, d]."""
    cfg = self.config
    if self.layer > 0:
      x = _replace_rows(x, self.deltas, plugins.site(cfg, "encoder", self.layer, "layer"), ctx)
    site = plugins.site(cfg, "encoder", self.layer, "attention")
    x = _sublayer(cfg, self.deltas, site, x, ctx,
                  lambda h: layers.Attention(cfg, site, self.deltas, name="attention")(
                      h, h, mask, bias, ctx, positions, positions))
    site = plugins.site(cfg, "encoder", self.layer, "mlp")
    return _sublayer(cfg, self.deltas, site, x, ctx,
                     lambda h: layers.MlpBlock(cfg, site, self.deltas, name="mlp")(h, ctx))


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and MLP blocks with residuals."""

  config: T5Config
  layer: int
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_mask: Optional[Array], self_bias: Optional[Array],
               cross_mask: Array, q_positions: Array, k_positions: Array, enc_positions: Array,
               ctx: plugins.Context, cache_index: Optional[Array] = None,
               relpos_table: Optional[Array] = None) -> Array:
    """x [B, q, d], encoded [B, n, d] -> [B, q, d]."""
    cfg = self.config
    if self.layer > 0:
      x = _replace_rows(x, self.deltas, plugins.site(cfg, "decoder", self.layer, "layer"), ctx)
    relpos = None
    if relpos_table is not None:
      relpos = lambda q, k: _decoder_bias(relpos_table, cfg, q, k)

    site = plugins.site(cfg, "decoder", self.layer, "self_attention")
    x = _sublayer(cfg, self.deltas, site, x, ctx,
                  lambda h: layers.Attention(cfg, site, self.deltas, name="self_attention")(
                      h, h, self_mask, self_bias, ctx, q_positions, k_positions,
                      cache_index=cache_index, relpos=relpos))
    cross = plugins.site(cfg, "decoder", self.layer, "cross_attention")
    x = _sublayer(cfg, self.deltas, cross, x, ctx,
                  lambda h: layers.Attention(cfg, cross, self.deltas, name="encoder_decoder_attention")(
                      h, encoded, cross_mask, None, ctx, q_positions, enc_positions))
    mlp = plugins.site(cfg, "decoder", self.layer, "mlp")
    return _sublayer(cfg, self.deltas, mlp, x, ctx,
                     lambda h: layers.MlpBlock(cfg, mlp, self.deltas, name="mlp")(h, ctx))


def _sublayer(cfg: T5Config, deltas: plugins.Deltas, site: plugins.Site, x: Array, ctx: plugins.Context,
              body) -> Array:
  """x + plug-ins(dropout(body(layer_norm(x)))): one pre-norm residual block.

  The `sublayer` hooks see the residual input, the normed input and the block's output after its dropout,
  and return the output added to the residual stream.
  """
  norm = plugins.PRE_NORMS[(site.stack, site.kind)]
  h = layers.LayerNorm(dtype=cfg.dtype, site=site.at(norm, cfg.emb_dim, cfg.emb_dim), deltas=deltas,
                       name=norm)(x, ctx)
  y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(body(h), deterministic=ctx.deterministic)
  for module, delta_ctx in plugins.calls(deltas, "sublayer", site, ctx):
    y = jnp.asarray(module(x, h, y, delta_ctx), y.dtype)
  return layers.constrain(x + y, ("batch", "length", "embed"))


def _decoder_bias(table: Array, cfg: T5Config, q_positions: Array, k_positions: Array) -> Array:
  buckets = layers.relative_position_bucket(k_positions[None, :] - q_positions[:, None], False,
                                            cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
  return jnp.take(jnp.asarray(table, cfg.dtype), buckets, axis=1)[None]


class Encoder(nn.Module):
  """Embeds tokens, prepends the plug-ins' rows and runs the encoder layers."""

  config: T5Config
  shared_embedding: nn.Module
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, tokens: Array, ctx: plugins.Context) -> tuple[Array, Array]:
    """tokens [B, n] -> (encoded [B, m+n, d], mask [B, m+n] bool), m = rows of the plug-ins."""
    cfg = self.config
    ctx = ctx.replace(states=_stack_states(self.deltas, plugins.site(cfg, "encoder", -1, "stack"), ctx))
    embedded = self.shared_embedding(tokens)
    x, mask, spans = _prepend_rows(embedded, tokens > 0, self.deltas,
                                   plugins.site(cfg, "encoder", -1, "input"), ctx)
    ctx = ctx.replace(spans=spans)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=ctx.deterministic)
    x = layers.constrain(x.astype(cfg.dtype), ("batch", "length", "embed"))
    length = x.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)
    attn_mask = (mask[:, None, :, None] & mask[:, None, None, :])
    bias = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, bidirectional=True,
                                       dtype=cfg.dtype, name="relpos_bias")(positions, positions)
    layer_cls = _remat(EncoderLayer, cfg)
    for i in range(cfg.num_encoder_layers):
      x = layer_cls(cfg, i, self.deltas, name=f"layers_{i}")(x, attn_mask, bias, positions, ctx)
    x = _final_norm(cfg, self.deltas, "encoder", x, ctx)
    # T5X: the encoder's last dropout is not broadcast over the length (the decoder's is).
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=ctx.deterministic)
    return x, mask


def _final_norm(cfg: T5Config, deltas: plugins.Deltas, stack: str, x: Array, ctx: plugins.Context) -> Array:
  depth = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
  name = plugins.FINAL_NORMS[stack]
  site = plugins.site(cfg, stack, depth, "output").at(name, cfg.emb_dim, cfg.emb_dim)
  return layers.LayerNorm(dtype=cfg.dtype, site=site, deltas=deltas, name=name)(x, ctx)


class Decoder(nn.Module):
  """Embeds target-side tokens, prepends the plug-ins' rows, runs the decoder layers, returns logits.

  Cached decoding (`ctx.decode`): the stack keeps one write position `cache/index`. A method with decoder
  rows needs one prefill call (`prefill=True`, zero tokens) that writes the rows into the cache first.
  With `rows_only`, the call returns the decoder rows `[B, m, d]` of the plug-ins and nothing else.
  """

  config: T5Config
  shared_embedding: nn.Module
  deltas: plugins.Deltas = ()

  @nn.compact
  def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array], ctx: plugins.Context,
               prefill: bool = False, rows_only: bool = False) -> Array:
    """Returns logits [B, q, vocab] for the q = decoder_input_tokens.shape[1] token positions."""
    cfg = self.config
    n_layers = cfg.num_decoder_layers
    ctx = ctx.replace(states=_stack_states(self.deltas, plugins.site(cfg, "decoder", -1, "stack"), ctx))
    embedded = self.shared_embedding(decoder_input_tokens)
    pad_mask = (decoder_target_tokens > 0) if decoder_target_tokens is not None else (
        jnp.ones(decoder_input_tokens.shape, bool))
    # In decode mode the first call (no cache yet) only sizes the cache, over rows + all positions.
    init_cache = ctx.decode and not self.has_variable("cache", "index")
    with_rows = not ctx.decode or prefill or init_cache
    # The spans are needed in cached steps too (the rows sit in the cache); their values are then unused.
    rows_x, rows_mask, spans = _prepend_rows(embedded, pad_mask, self.deltas,
                                             plugins.site(cfg, "decoder", -1, "input"), ctx)
    if rows_only:
      return rows_x[:, :rows_x.shape[1] - embedded.shape[1]]
    ctx = ctx.replace(spans=spans, carries_rows=with_rows)
    if with_rows:
      x, pad_mask = rows_x, rows_mask
    else:  # A cached decoding step: the rows are already in the cache.
      x = embedded
    num_rows = x.shape[1] - embedded.shape[1]
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=ctx.deterministic)
    x = layers.constrain(x.astype(cfg.dtype), ("batch", "length", "embed"))

    relpos = layers.RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance, bidirectional=False,
                                         dtype=cfg.dtype, name="relpos_bias")
    length = x.shape[1]
    enc_positions = jnp.arange(encoded.shape[1], dtype=jnp.int32)
    cross_mask = pad_mask[:, None, :, None] & encoder_mask[:, None, None, :]
    cache_index, relpos_table = None, None
    if ctx.decode:
      index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      q_positions = index.value + jnp.arange(length, dtype=jnp.int32)
      k_positions = q_positions
      self_mask = self_bias = None
      if init_cache:
        self_mask, self_bias = _causal(pad_mask), relpos(q_positions, k_positions)
      else:
        cache_index, relpos_table = index.value, relpos.rel_embedding
        index.value = index.value + length
    else:
      q_positions = k_positions = jnp.arange(length, dtype=jnp.int32)
      self_mask, self_bias = _causal(pad_mask), relpos(q_positions, k_positions)

    layer_cls = _remat(DecoderLayer, cfg)
    for i in range(n_layers):
      x = layer_cls(cfg, i, self.deltas, name=f"layers_{i}")(
          x, encoded, self_mask, self_bias, cross_mask, q_positions, k_positions, enc_positions, ctx,
          cache_index, relpos_table)
    x = _final_norm(cfg, self.deltas, "decoder", x, ctx)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=ctx.deterministic)
    x = x[:, num_rows:]
    logits_site = plugins.site(cfg, "decoder", n_layers, "logits")
    if cfg.logits_via_embedding:
      # T5X: logits against the embedding in float32 (`attend_dtype`), for stable losses and scores.
      x = jnp.asarray(x, jnp.float32)
      logits = self.shared_embedding.attend(x) / jnp.sqrt(jnp.float32(x.shape[-1]))
      for module, delta_ctx in plugins.calls(self.deltas, "projection",
                                             logits_site.at("logits", cfg.emb_dim, cfg.vocab_size), ctx):
        logits = jnp.asarray(module(x, logits, delta_ctx), jnp.float32)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"),
                            logits_site.at("logits_dense", cfg.emb_dim, cfg.vocab_size), self.deltas,
                            dtype=jnp.float32, name="logits_dense")(x, ctx)
    return layers.constrain(logits, ("batch", "length", "vocab"))


def _causal(pad_mask: Array) -> Array:
  """[B, n] -> [B, 1, n, n]: causal and padding (T5X `make_decoder_mask` without packing)."""
  n = pad_mask.shape[1]
  causal = jnp.tril(jnp.ones((n, n), bool))
  return causal[None, None] & pad_mask[:, None, :, None] & pad_mask[:, None, None, :]


class Transformer(nn.Module):
  """T5: shared embedding, encoder and decoder, with the method's deltas plugged in.

  Batch features (T5X names): `encoder_input_tokens [B, n]`, `decoder_input_tokens [B, t]`,
  `decoder_target_tokens [B, t]`, optional `task_ids [B]`.
  """

  config: T5Config
  deltas: plugins.Deltas = ()

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder, tuple(self.deltas))
    self.decoder = Decoder(cfg, self.token_embedder, tuple(self.deltas))

  def _ctx(self, batch_size, task_ids, enable_dropout, decode) -> plugins.Context:
    return plugins.Context(task_ids=task_ids, embedding=self.token_embedder.table(),
                           batch_size=batch_size, deterministic=not enable_dropout, decode=decode)

  def encode(self, encoder_input_tokens: Array, task_ids: Optional[Array] = None,
             enable_dropout: bool = False) -> tuple[Array, Array]:
    """[B, n] -> (encoded [B, m+n, d], encoder mask [B, m+n])."""
    ctx = self._ctx(encoder_input_tokens.shape[0], task_ids, enable_dropout, False)
    return self.encoder(encoder_input_tokens, ctx)

  def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None, task_ids: Optional[Array] = None,
             enable_dropout: bool = False, decode: bool = False, prefill: bool = False) -> Array:
    """-> logits [B, t, vocab]."""
    ctx = self._ctx(decoder_input_tokens.shape[0], task_ids, enable_dropout, decode)
    return self.decoder(encoded, encoder_mask, decoder_input_tokens, decoder_target_tokens, ctx,
                        prefill=prefill)

  def decoder_rows(self, decoder_input_tokens: Array, task_ids: Optional[Array] = None) -> Array:
    """The rows `[B, m, d]` the method prepends to the decoder input (m = 0 for most methods)."""
    ctx = self._ctx(decoder_input_tokens.shape[0], task_ids, False, False)
    return self.decoder(None, None, decoder_input_tokens, None, ctx, rows_only=True)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, task_ids: Optional[Array] = None,
               enable_dropout: bool = True, decode: bool = False) -> Array:
    """-> logits [B, t, vocab]."""
    encoded, encoder_mask = self.encode(encoder_input_tokens, task_ids, enable_dropout)
    return self.decode(encoded, encoder_mask, decoder_input_tokens, decoder_target_tokens, task_ids,
                       enable_dropout, decode)


def dummy_batch(batch_size: int = 1, input_length: int = 4, target_length: int = 4) -> dict:
  """All-ones token batch of the given shapes, for `init` and `eval_shape`."""
  tokens = lambda n: jnp.ones((batch_size, n), jnp.int32)
  return dict(encoder_input_tokens=tokens(input_length), decoder_input_tokens=tokens(target_length),
              decoder_target_tokens=tokens(target_length))


def abstract_variables(config: T5Config, deltas: plugins.Deltas = (), batch: Optional[dict] = None,
                       num_tasks: Optional[int] = None) -> dict:
  """Shapes (with logical-axis boxes) of all variable collections, without allocating weights."""
  batch = batch or dummy_batch()
  module = Transformer(config, tuple(deltas))
  kwargs = {}
  if num_tasks:
    kwargs["task_ids"] = jnp.zeros((batch["encoder_input_tokens"].shape[0],), jnp.int32)
  return jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                          enable_dropout=False, **kwargs))


def param_shapes(config: T5Config) -> dict:
  """The backbone tree (the 'params' collection) as nested `jax.ShapeDtypeStruct`s."""
  return nn.unbox(abstract_variables(config)["params"])
