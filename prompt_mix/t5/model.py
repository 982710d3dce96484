"""A T5X-style encoder-decoder model: loss, scoring and prediction around the `Transformer` module.

Batch keys (T5X's): `encoder_input_tokens [B, n]`, `decoder_input_tokens [B, t]`,
`decoder_target_tokens [B, t]`, `decoder_loss_weights [B, t]`, and optionally `task_ids [B]`.

Variables are three kinds of collections (docs/design.md, Variables): `params` (the frozen backbone, the T5X
`target` tree), `peft` (everything trainable) and any other non-`cache` collection (frozen values of a
method, e.g. ATTEMPT's source prompt library).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix import decoding
from prompt_mix.t5 import losses
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins
from prompt_mix.t5.config import T5Config

Array = Any
Variables = Mapping[str, Any]

INTERMEDIATES = "intermediates"  # Auxiliary outputs sown by methods (e.g. ATTEMPT's attention weights).


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """T5 with a method's deltas plugged in.

  Attributes:
    config: the backbone's shapes and numerics.
    deltas: the method (a tuple of `plugins.Delta`); empty for the plain backbone.
    z_loss, label_smoothing, loss_normalizing_factor: see `losses.weighted_cross_entropy`.
    eos_id: end-of-sequence token; decoding stops there.
  """

  config: T5Config
  deltas: plugins.Deltas = ()
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: Union[None, float, str] = "NUM_REAL_TARGET_TOKENS"
  eos_id: int = 1

  @property
  def module(self) -> network.Transformer:
    return network.Transformer(self.config, tuple(self.deltas))

  @property
  def trains_backbone(self) -> bool:
    return any(d.trains_backbone for d in self.deltas)

  # ---------------------------------------------------------------------------------------- init
  def init(self, rng: Array, batch: Mapping[str, Array]) -> dict:
    """All variable collections (boxed with logical axis names), initialized from `rng`."""
    return self.module.init(
        {"params": rng, "dropout": rng}, batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], batch["decoder_target_tokens"], task_ids=batch.get("task_ids"),
        enable_dropout=False)

  def init_method(self, rng: Array, params: Any, batch: Mapping[str, Array]) -> dict:
    """The method's collections (`peft` and frozen ones, boxed), initialized ON the given backbone.

    Inits that read the frozen embedding (sampled-vocabulary or class-label prompts) thus see the
    loaded checkpoint's embedding, not a random one. `params` is the backbone tree (not returned).
    """
    _, state = self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], task_ids=batch.get("task_ids"), enable_dropout=False,
        rngs={"params": rng}, mutable=flax.core.DenyList(["params", INTERMEDIATES]))
    return dict(state)

  def abstract_init(self, batch: Mapping[str, Array]) -> dict:
    """The shapes of `init`, without allocating (boxed with logical axis names)."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), batch))

  # ---------------------------------------------------------------------------------------- loss
  def logits(self, variables: Variables, batch: Mapping[str, Array], dropout_rng: Optional[Array] = None,
             mutable=False):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        _without_cache(variables), batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], task_ids=batch.get("task_ids"),
        enable_dropout=dropout_rng is not None, rngs=rngs, mutable=mutable)

  def loss_fn(self, variables: Variables, batch: Mapping[str, Array],
              dropout_rng: Optional[Array] = None) -> tuple[Array, dict]:
    """Cross entropy of the batch; dropout is on when `dropout_rng` is given.

    Returns:
      (loss, aux) where aux holds `z_loss`, `weight_sum` (target tokens), `cross_ent_loss` and any
      `intermediates` the method sowed.
    """
    logits, state = self.logits(variables, batch, dropout_rng, mutable=[INTERMEDIATES])
    loss, z_loss, weight_sum = losses.weighted_cross_entropy(
        logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"),
        label_smoothing=self.label_smoothing, z_loss=self.z_loss,
        loss_normalizing_factor=self.loss_normalizing_factor)
    aux = dict(z_loss=z_loss, weight_sum=weight_sum, cross_ent_loss=loss - z_loss,
               intermediates=state.get(INTERMEDIATES, {}))
    return loss, aux

  def score_batch(self, variables: Variables, batch: Mapping[str, Array],
                  return_intermediates: bool = False):
    """Per-example log-likelihood of the targets [B] (summed over `decoder_loss_weights` positions).

    Rank classification scores each candidate target with this and picks the best.
    """
    logits, state = self.logits(variables, batch, mutable=[INTERMEDIATES])
    token_scores = losses.token_log_likelihoods(logits, batch["decoder_target_tokens"])
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = batch["decoder_target_tokens"] > 0
    scores = jnp.sum(token_scores * weights, axis=-1)
    if return_intermediates:
      return scores, state.get(INTERMEDIATES, {})
    return scores

  def score_options(self, variables: Variables, batch: Mapping[str, Array]) -> Array:
    """`score_batch` of R option rows that share N inputs, with one encoder pass per input.

    Rank classification scores every (input, label word) pair; the encoder (with the method's prompt,
    ATTEMPT's instance prompt or per-task leaves) depends on the input only, so it runs once per input
    and each option row is decoded on its input's encoder output.

    Args:
      batch: `encoder_input_tokens [N, n]`, optional `task_ids [N]` (of the inputs), and per option row
        `encoder_row [R]` int (the input it belongs to), `decoder_input_tokens [R, t]`,
        `decoder_target_tokens [R, t]`, optional `decoder_loss_weights [R, t]`.
    Returns:
      [R] log-likelihood of each row's target: what `score_batch` gives for the rows with their inputs
      (and task ids) repeated.
    """
    params = _without_cache(variables)
    task_ids = batch.get("task_ids")
    encoded, encoder_mask = self.module.apply(params, batch["encoder_input_tokens"], task_ids,
                                              method=network.Transformer.encode)
    rows = jnp.asarray(batch["encoder_row"], jnp.int32)
    take = lambda x: jnp.take(x, rows, axis=0)
    logits = self.module.apply(
        params, take(encoded), take(encoder_mask), batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], None if task_ids is None else take(task_ids),
        method=network.Transformer.decode)
    token_scores = losses.token_log_likelihoods(logits, batch["decoder_target_tokens"])
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = batch["decoder_target_tokens"] > 0
    return jnp.sum(token_scores * weights, axis=-1)

  # ---------------------------------------------------------------------------------------- predict
  def predict_batch(self, variables: Variables, batch: Mapping[str, Array], *,
                    decoder: str = "greedy", num_decodes: int = 4, alpha: float = 0.6,
                    temperature: float = 1.0, topk: int = 0, topp: float = 0.0,
                    rng: Optional[Array] = None, max_decode_length: Optional[int] = None,
                    return_all_decodes: bool = False) -> tuple[Array, dict]:
    """Decodes with a KV cache, stopping at EOS.

    Args:
      decoder: 'greedy', 'beam' (T5X length penalty `alpha`) or 'sample' (temperature, top-k, top-p).
      max_decode_length: target length; defaults to `decoder_input_tokens.shape[1]`.
    Returns:
      (predictions [B, L] (or [B, num_decodes, L] for beam with `return_all_decodes`),
       aux with `scores` [B] (log-probability of each output; length-penalized for beam search) and
       the method's `intermediates` from the encoder pass).
    """
    params = _without_cache(variables)
    enc_tokens = batch["encoder_input_tokens"]
    batch_size = enc_tokens.shape[0]
    length = max_decode_length or batch["decoder_input_tokens"].shape[1]
    task_ids = batch.get("task_ids")
    (encoded, encoder_mask), state = self.module.apply(
        params, enc_tokens, task_ids, method=network.Transformer.encode, mutable=[INTERMEDIATES])

    # The cache is built at [B, ...]; beam search expands it (and we expand the encoder side) per beam.
    cache = self._init_cache(params, encoded, encoder_mask, batch_size, length, task_ids)
    if decoder == "beam":
      expand = lambda x: decoding.flat_batch_beam_expand(x, num_decodes)
      encoded, encoder_mask = expand(encoded), expand(encoder_mask)
      task_ids = None if task_ids is None else expand(task_ids)

    def tokens_to_logits(state_in):
      flat_ids = state_in.cur_token
      logits, new_vars = self.module.apply(
          {**params, "cache": state_in.cache}, encoded, encoder_mask, flat_ids, None, task_ids,
          decode=True, method=network.Transformer.decode, mutable=["cache"])
      return logits[:, -1, :].astype(jnp.float32), new_vars["cache"]

    inputs = jnp.zeros((batch_size, length), jnp.int32)
    if decoder == "beam":
      sequences, scores = decoding.beam_search(inputs, cache, tokens_to_logits, eos_id=self.eos_id,
                                               num_decodes=num_decodes, alpha=alpha)
      predictions = sequences if return_all_decodes else sequences[:, -1]
      scores = scores if return_all_decodes else scores[:, -1]
    elif decoder in ("greedy", "sample"):
      if decoder == "greedy":
        temperature, topk, topp = 0.0, 1, 0.0
      elif rng is None:
        raise ValueError("predict_batch(decoder='sample') needs an rng")
      predictions, scores = decoding.temperature_sample(
          inputs, cache, tokens_to_logits, eos_id=self.eos_id, decode_rng=rng,
          temperature=temperature, topk=topk, topp=topp,
          # Scores are the model's log-probabilities of the output (T5X would report them under the
          # top-k/top-p filtered distribution, which makes every greedy score 0).
          rescale_log_probs=False)
    else:
      raise ValueError(f"predict_batch: decoder must be 'greedy', 'beam' or 'sample', got {decoder!r}")
    return predictions, dict(scores=scores, intermediates=state.get(INTERMEDIATES, {}))

  def _init_cache(self, params, encoded, encoder_mask, batch_size, length, task_ids):
    """Sizes the decoder cache for the method's rows + `length` positions, then prefills the rows."""
    dummy = jnp.ones((batch_size, length), jnp.int32)
    _, state = self.module.apply(params, encoded, encoder_mask, dummy, dummy, task_ids, decode=True,
                                 method=network.Transformer.decode, mutable=["cache"])
    cache = state["cache"]
    if self.num_decoder_rows(params, batch_size, task_ids):  # Write the rows into the cache first.
      no_tokens = jnp.zeros((batch_size, 0), jnp.int32)
      _, state = self.module.apply({**params, "cache": cache}, encoded, encoder_mask, no_tokens, None,
                                   task_ids, decode=True, prefill=True,
                                   method=network.Transformer.decode, mutable=["cache"])
      cache = state["cache"]
    return cache

  def num_decoder_rows(self, variables: Variables, batch_size: int = 1,
                       task_ids: Optional[Array] = None) -> int:
    """How many rows the method prepends to the decoder input (from shapes alone; nothing runs)."""
    tokens = jnp.ones((batch_size, 1), jnp.int32)
    rows = jax.eval_shape(lambda v, t: self.module.apply(
        v, tokens, t, method=network.Transformer.decoder_rows), _without_cache(variables), task_ids)
    return rows.shape[1]

  @property
  def num_tasks(self) -> Optional[int]:
    """N when the method has a bank of N per-task leaves selected by the batch's `task_ids`, else None."""
    return plugins.num_tasks(self.deltas)

  def check_task_ids(self, batch: Mapping[str, Any]) -> None:
    """Raises naming the offending ids when a batch's `task_ids` do not index the method's task bank.

    Run it on host batches before a jitted call: inside jit an out-of-range row would be gathered as NaN
    (ids >= N) or silently wrap to the last rows (negative ids).
    """
    n = self.num_tasks
    if n is None or batch.get("task_ids") is None:
      return
    ids = np.asarray(batch["task_ids"])
    bad = sorted({int(i) for i in ids.reshape(-1) if not 0 <= int(i) < n})
    if bad:
      raise ValueError(f"task_ids {bad} are out of range for the method's bank of {n} tasks (ids 0..{n - 1}; "
                       f"{plugins.describe(self.deltas)}): check TASK_NAMES / NUM_TASKS and the mixture")


def _without_cache(variables: Variables) -> dict:
  """Unboxed variables minus any stale decoding cache."""
  return {k: v for k, v in nn.unbox(dict(variables)).items() if k != "cache"}


def split_trainable(variables: Variables, trains_backbone: bool = False) -> tuple[Any, dict]:
  """(trainable, rest): `peft` (or `params` for full fine-tuning) and the remaining collections."""
  name = "params" if trains_backbone else "peft"
  rest = {k: v for k, v in variables.items() if k != name}
  return variables.get(name, {}), rest


def merge_trainable(trainable: Any, rest: Variables, trains_backbone: bool = False) -> dict:
  name = "params" if trains_backbone else "peft"
  return {**rest, name: trainable}


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
