"""The FLOP counter: a hand count on the tiny preset, and XLA's own counts of compiled computations."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_mix import flops
from prompt_mix.peft import adapters
from prompt_mix.peft import aprompt
from prompt_mix.peft import full_finetune
from prompt_mix.peft import lora
from prompt_mix.peft import mam
from prompt_mix.peft import prefix_tuning
from prompt_mix.peft import prompt_tuning
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import step as step_lib


def hand_count_prompt_tuning(b, n, m, t):
  """Prompt tuning on the tiny preset, written out matmul by matmul (flops.py rules 1-4).

  tiny: d=8, h=4, d_kv=3 (h*d_kv=12), gated MLP 16, 2 encoder and 2 decoder layers, untied logits over
  32128. Returns (forward, backward).
  """
  d, h, dk, hk, f, vocab = 8, 4, 3, 12, 16, 32128
  T = n + m  # Encoder rows.
  mm = lambda rows, k, cols: 2 * b * rows * k * cols  # A [b, rows, k] @ [k, cols].
  att = lambda tq, tk: 2 * b * h * tq * tk * dk  # Scores (or mixing) of one attention.

  enc_layer = 4 * mm(T, d, hk) + 2 * att(T, T) + 2 * mm(T, d, f) + mm(T, f, d)
  dec_layer = (4 * mm(t, d, hk) + 2 * att(t, t)  # Self-attention.
               + 2 * mm(t, d, hk) + 2 * mm(T, d, hk) + 2 * att(t, T)  # Cross: q, out; k, v; core.
               + 2 * mm(t, d, f) + mm(t, f, d))
  logits = mm(t, d, vocab)
  forward = 2 * enc_layer + 2 * dec_layer + logits

  # Encoder layer 0: only the m prompt rows depend on the prompt until its attention mixes them in.
  enc0 = (3 * mm(m, d, hk)  # dX of q, k, v on the prompt rows.
          + 2 * b * h * dk * (m * T + T * m)  # dQ (prompt queries), dK (prompt keys).
          + 2 * b * h * dk * (T * T - n * n + T * m)  # dP (pairs with a prompt row), dV (prompt values).
          + mm(T, hk, d) + 2 * mm(T, d, f) + mm(T, f, d))  # out and the MLP: every row.
  enc1 = 4 * mm(T, d, hk) + 2 * 2 * att(T, T) + 2 * mm(T, d, f) + mm(T, f, d)
  # Decoder layer 0: the self-attention reads frozen embeddings only (nothing); cross-attention needs
  # no query projection and no dQ.
  dec0 = (2 * mm(T, d, hk) + att(t, T) + 2 * att(t, T)  # k, v; dK; dP and dV.
          + mm(t, hk, d) + 2 * mm(t, d, f) + mm(t, f, d))
  dec1 = (4 * mm(t, d, hk) + 2 * 2 * att(t, t) + 2 * mm(t, d, hk) + 2 * mm(T, d, hk)
          + 2 * 2 * att(t, T) + 2 * mm(t, d, f) + mm(t, f, d))
  backward = enc0 + enc1 + dec0 + dec1 + logits
  return forward, backward


def test_prompt_tuning_step_matches_the_hand_count():
  b, n, m, t = 2, 5, 3, 4
  count = flops.train_step_flops(config_lib.preset("tiny"), (prompt_tuning.PromptTuning(length=m),),
                                 b, n, t)
  forward, backward = hand_count_prompt_tuning(b, n, m, t)
  assert count.forward == forward
  assert count.backward == backward
  assert count.term("decoder/layers_0/self_attention/query").backward == 0
  assert count.term("decoder/layers_1/self_attention/query").backward > 0


def test_scoring_is_the_forward_and_full_fine_tuning_adds_weight_gradients():
  config = config_lib.preset("tiny")
  b, n, t = 2, 5, 4
  forward = flops.forward_flops(config, (), b, n, t)
  assert forward.backward == 0
  full = flops.train_step_flops(config, (full_finetune.FullFineTune(),), b, n, t)
  assert full.forward == forward.forward
  # Projections and logits: dX and dW, each as costly as the forward; the attention core: dQ, dK, dP, dV.
  for kind, (fwd, bwd) in full.by_kind().items():
    assert bwd == 2 * fwd, kind


def test_decoding_counts_the_cross_attention_keys_once():
  config = config_lib.preset("tiny")
  b, n, length = 2, 5, 3
  count = flops.decode_flops(config, (), b, n, length)
  d, hk, h, dk = 8, 12, 4, 3
  assert count.term("decoder/layers_0/encoder_decoder_attention/key").forward == 2 * b * n * d * hk
  assert count.term("decoder/layers_0/encoder_decoder_attention/query").forward == (
      length * 2 * b * 1 * d * hk)
  # Causal self-attention over 1, 2, 3 keys.
  assert count.term("decoder/layers_0/self_attention/scores").forward == 2 * b * h * dk * (1 + 2 + 3)
  assert count.term("decoder/logits_dense").forward == length * 2 * b * d * 32128


# ------------------------------------------------------------------------------------ XLA's counts
CONFIG = config_lib.T5Config(vocab_size=512, emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256,
                             num_encoder_layers=2, num_decoder_layers=2,
                             mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                             dropout_rate=0.0)
B, N, T = 2, 24, 6

METHODS = {
    "backbone": (),
    "prompt_tuning": (prompt_tuning.PromptTuning(length=8, init="uniform"),),
    "decoder_prompt": (prompt_tuning.PromptTuning(length=8, init="uniform", stack="decoder"),),
    "prompt_bank": (prompt_tuning.PromptTuning(length=8, init="uniform", num_tasks=3),),
    "lora": (lora.LoRA(rank=4, targets=lora.PROJECTIONS),),
    "p_tuning_v2": (prefix_tuning.PTuningV2(length=5),),
    "prefix_tuning": (prefix_tuning.PrefixTuning(length=5),),
    "houlsby": (adapters.HoulsbyAdapter(bottleneck=16),),
    "mam": mam.mam_adapter(prefix_length=4, bottleneck=32),
    "aprompt_from_layer_1": (aprompt.APrompt(max_length=64, decoder_max_length=16, layers=[1]),),
    "prompt_tuning+lora": (prompt_tuning.PromptTuning(length=8, init="uniform"), lora.LoRA(rank=4)),
    "full_finetune": (full_finetune.FullFineTune(),),
}


def setup(name):
  deltas = METHODS[name]
  model = model_lib.EncoderDecoderModel(CONFIG, deltas)
  rng = np.random.RandomState(0)
  batch = dict(encoder_input_tokens=rng.randint(2, 512, (B, N)), decoder_input_tokens=rng.randint(2, 512, (B, T)),
               decoder_target_tokens=rng.randint(2, 512, (B, T)))
  if name == "prompt_bank":
    batch["task_ids"] = np.array([0, 2])
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return deltas, model, batch, nn.unbox(model.init(jax.random.PRNGKey(0), batch))


def compiled(f, *args):
  return jax.jit(f).lower(*args).compile()


@pytest.mark.parametrize("name", ["backbone", "prompt_tuning", "lora", "prefix_tuning"])
def test_forward_is_within_a_few_percent_of_xla_cost_analysis(name):
  """XLA's count includes elementwise work (rule 1): a little above ours, never below."""
  deltas, model, batch, variables = setup(name)
  cost = compiled(model.logits, variables, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = flops.forward_flops(CONFIG, deltas, B, N, T).forward
  assert ours <= cost["flops"] <= 1.03 * ours


@pytest.mark.parametrize("name", sorted(METHODS))
def test_xla_executes_exactly_the_counted_dots(name):
  """The dots of the compiled forward and training step are exactly rules 1-3 and 5."""
  deltas, model, batch, variables = setup(name)
  forward = flops.hlo_dot_flops(compiled(model.logits, variables, batch).as_text())
  assert forward == flops.forward_flops(CONFIG, deltas, B, N, T).forward
  if not deltas:
    return
  trainable, frozen = model_lib.split_trainable(variables, model.trains_backbone)
  optimizer = optax.sgd(0.1)
  step = step_lib.make_train_step(model, optimizer)
  executed = flops.hlo_dot_flops(
      compiled(step, trainable, optimizer.init(trainable), frozen, batch, None).as_text())
  assert executed == flops.train_step_flops(CONFIG, deltas, B, N, T, row_pruning=False).total
  needed = flops.train_step_flops(CONFIG, deltas, B, N, T).total
  assert needed <= executed
  if name in ("prompt_tuning", "prompt_bank", "decoder_prompt"):
    assert needed < executed  # Autodiff computes the first layer's dX on every row (rule 5).


def test_unknown_plugin_is_named():
  class Odd(nn.Module):
    def __call__(self, x, y, ctx):
      return y

  class OddDelta(prompt_tuning.plugins.Delta):
    def projection(self, site):
      return Odd()

  # The first projection site the walk meets is the layer norm in front of encoder layer 0's attention.
  with pytest.raises(ValueError, match="no FLOP declaration for the projection plug-in Odd at "
                     "encoder/layers_0/attention/pre_attention_layer_norm"):
    flops.train_step_flops(CONFIG, (OddDelta(),), B, N, T)


# ------------------------------------------------------------------------------------ the newer hooks
# Toy plug-ins at the hooks no shipped method uses yet, each with its `flops` declaration: a trainable
# bias after every layer norm (`projection` at a norm site), an (IA)^3-style scale of the MLP's `wo`
# input (`projection_input`), and a stack state computed by a matmul that input rows then read.
class NormBias(nn.Module):
  @nn.compact
  def __call__(self, x, y, ctx):
    return y + tasks_lib.peft_param(self, "bias", nn.initializers.normal(1.0), (y.shape[-1],), (None,))

  def flops(self, counter, site, rows, dep_x, dep_y):
    return rows  # No matmul; every row after the norm now depends.


class InputScale(nn.Module):
  @nn.compact
  def __call__(self, x, ctx):
    return x * tasks_lib.peft_param(self, "scale", nn.initializers.ones, (x.shape[-1],), (None,))

  def flops(self, counter, site, rows, dep):
    return rows


class StateTable(nn.Module):
  length: int

  @nn.compact
  def __call__(self, ctx):
    d = ctx.embedding.shape[-1]
    table = tasks_lib.peft_param(self, "table", nn.initializers.normal(1.0), (self.length, d), (None, None))
    w = tasks_lib.peft_param(self, "w", nn.initializers.normal(0.1), (d, d), (None, None))
    return table @ w  # [l, d], once per stack.

  def flops(self, counter, site):
    d = site.d_model
    counter.matmul(f"{site.stack}/state", "method", 1, self.length, d, d, self.length, True)


class StateRows(nn.Module):
  length: int

  def __call__(self, embedded, mask, ctx):
    return jnp.broadcast_to(ctx.state[None], (embedded.shape[0],) + ctx.state.shape)

  def flops(self, counter, site, tokens):
    return self.length, self.length


@dataclasses.dataclass(frozen=True)
class ToyDelta(prompt_tuning.plugins.Delta):
  what: str = "norm_bias"

  def projection(self, site):
    if self.what == "norm_bias" and site.projection.endswith("norm"):
      return NormBias(name="norm_bias")
    return None

  def projection_input(self, site):
    return InputScale(name="scale") if self.what == "wo_scale" and site.projection == "wo" else None

  def stack_state(self, site):
    return StateTable(3, name="state") if self.what == "state" and site.stack == "decoder" else None

  def input_rows(self, site):
    return StateRows(3, name="rows") if self.what == "state" and site.stack == "decoder" else None


@pytest.mark.parametrize("what", ["norm_bias", "wo_scale", "state"])
def test_layer_norm_projection_input_and_stack_state_plugins_are_counted_exactly(what):
  """The walk handles every hook generically: XLA executes exactly the counted dots."""
  deltas = (ToyDelta(what),)
  model = model_lib.EncoderDecoderModel(CONFIG, deltas)
  _, _, batch, _ = setup("backbone")
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
  forward = flops.hlo_dot_flops(compiled(model.logits, variables, batch).as_text())
  assert forward == flops.forward_flops(CONFIG, deltas, B, N, T).forward
  trainable, frozen = model_lib.split_trainable(variables, model.trains_backbone)
  optimizer = optax.sgd(0.1)
  step = step_lib.make_train_step(model, optimizer)
  executed = flops.hlo_dot_flops(
      compiled(step, trainable, optimizer.init(trainable), frozen, batch, None).as_text())
  count = flops.train_step_flops(CONFIG, deltas, B, N, T, row_pruning=False)
  assert executed == count.total
  needed = flops.train_step_flops(CONFIG, deltas, B, N, T)
  if what == "norm_bias":  # The first norm's bias makes every row of encoder layer 0 depend.
    assert needed.term("encoder/layers_0/attention/query").backward > 0
  if what == "state":  # Counted once per step, its weight gradient included.
    d = CONFIG.emb_dim
    assert needed.term("decoder/state").forward == 2 * 3 * d * d
    assert needed.term("decoder/state").backward == 2 * 2 * 3 * d * d


def test_hlo_dots_read_shapes_and_dimension_numbers():
  """A batched einsum and a transposed matmul, as the benchmark's matmul floor re-runs them."""
  def f(a, b, w):
    return jnp.einsum("bqd,bkd->bqk", a, b).sum() + (a[0] @ w.T).sum()

  a, b, w = jnp.ones((2, 3, 5)), jnp.ones((2, 4, 5)), jnp.ones((7, 5))
  dots = flops.hlo_dots(jax.jit(f).lower(a, b, w).compile().as_text())
  by_out = {dot.out: dot for dot in dots}
  batched, plain = by_out[(2, 3, 4)], by_out[(3, 7)]
  assert (batched.lhs, batched.rhs, batched.lhs_batch, batched.rhs_batch) == ((2, 3, 5), (2, 4, 5), (0,), (0,))
  assert (batched.lhs_contracting, batched.rhs_contracting) == ((2,), (2,))
  assert batched.flops == 2 * 2 * 3 * 4 * 5 and plain.flops == 2 * 3 * 7 * 5
  assert plain.dtype == "f32" and plain.lhs_contracting == (1,) and plain.rhs_contracting == (1,)
