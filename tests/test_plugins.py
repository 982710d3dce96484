"""The plug-in contract (prompt_mix/t5/plugins.py) as a specification, with toy deltas at every hook.

What a delta is handed (the site's geometry, tensors in their natural shapes, its own row span and stack
state), that identity plug-ins leave the backbone exactly as it is, that each hook acts where the contract
says (checked as an equivalent edit of the backbone's weights), and the backbone's errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as mc
from prompt_mix.peft.aprompt import APrompt
from prompt_mix.peft.prompt_tuning import PromptTuning
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins

SEEN: list[tuple[str, plugins.Site, dict]] = []  # (hook, site, what the module was handed), per trace.


def _shape(x) -> Optional[tuple]:
  return None if x is None else tuple(x.shape)


class Rows(nn.Module):
  length: int

  @nn.compact
  def __call__(self, embedded, mask, ctx):
    SEEN.append(("input_rows", None, dict(embedded=_shape(embedded), mask=_shape(mask), rows=ctx.rows,
                                          state=ctx.state)))
    row = self.param("row", nn.initializers.normal(1.0), (embedded.shape[-1],))
    return jnp.broadcast_to(row, (embedded.shape[0], self.length, embedded.shape[-1]))


class Record(nn.Module):
  """Identity at any hook; records the shapes it is handed."""

  hook: str
  site: plugins.Site

  def __call__(self, *args):
    *tensors, ctx = args
    SEEN.append((self.hook, self.site, dict(shapes=[_shape(t) for t in tensors], rows=ctx.rows,
                                            state=ctx.state, carries_rows=ctx.carries_rows)))
    if self.hook == "stack_state":
      return jnp.float32(7.0)
    if self.hook == "hidden_rows":
      x, = tensors
      start, length = ctx.rows
      return x[:, start:start + length]
    if self.hook == "attention_kv":
      q, = tensors
      zeros = jnp.zeros((q.shape[0], 0, q.shape[2], q.shape[3]), q.dtype)
      return zeros, zeros
    if self.hook == "attention_logits":
      q, k = tensors[:2]
      return jnp.zeros((1, q.shape[2], q.shape[1], k.shape[1]), jnp.float32)
    if self.hook == "projection_input":
      return tensors[0]
    return tensors[-1]  # projection: y; sublayer: y.


@dataclasses.dataclass(frozen=True)
class Toy(plugins.Delta):
  """Acts at every hook; identity everywhere except its `rows` prepended input rows (0: none)."""

  rows: int = 2
  stacks: tuple = ("encoder", "decoder")

  def _record(self, hook, site):
    # Sublayer modules of one layer share its scope: one name per site kind.
    return Record(hook, site, name=f"toy_{hook}_{site.kind}") if site.stack in self.stacks else None

  def stack_state(self, site):
    return self._record("stack_state", site)

  def input_rows(self, site):
    return Rows(self.rows, name="toy_rows") if self.rows and site.stack in self.stacks else None

  def hidden_rows(self, site):
    return self._record("hidden_rows", site) if self.rows else None

  def attention_kv(self, site):
    return self._record("attention_kv", site)

  def attention_logits(self, site):
    return self._record("attention_logits", site)

  def projection_input(self, site):
    return self._record("projection_input", site)

  def projection(self, site):
    return self._record("projection", site)

  def sublayer(self, site):
    return self._record("sublayer", site)


def _plain_logits(batch, variables, **overrides):
  return np.asarray(mc.make_model((), **overrides).logits({"params": variables["params"]}, batch))


@pytest.mark.parametrize("tied", [False, True])
def test_every_hook_is_handed_the_site_geometry_and_natural_shapes(tied):
  cfg = mc.tiny_config(logits_via_embedding=tied)
  model = mc.make_model((Toy(rows=0),), logits_via_embedding=tied)
  batch = mc.make_batch(batch_size=3, inputs=6, targets=4)
  SEEN.clear()
  variables = mc.init(model, batch)
  h, dk, d = cfg.num_heads, cfg.head_dim, cfg.emb_dim
  by_hook: dict[str, list] = {}
  for hook, site, got in SEEN:
    by_hook.setdefault(hook, []).append((site, got))
    if site is not None:
      assert (site.d_model, site.num_heads, site.head_dim) == (d, h, dk), site
      assert site.num_layers == (cfg.num_encoder_layers if site.stack == "encoder" else
                                 cfg.num_decoder_layers)
  # Every projection and layer norm is a wrapped site whose in/out features are the tensors' sizes.
  projections = [(s, g) for s, g in by_hook["projection"]]
  names = {(s.stack, s.kind, s.projection) for s, _ in projections}
  for site in plugins.projection_sites(cfg):
    assert (site.stack, site.kind, site.projection) in names, site.where
  for site, got in projections:
    x, y = got["shapes"]
    assert x[-1] == site.in_features and y[-1] == site.out_features, site.where
  norms = {s.projection for s, _ in projections if s.projection.endswith("norm")}
  assert norms == {"pre_attention_layer_norm", "pre_self_attention_layer_norm",
                   "pre_cross_attention_layer_norm", "pre_mlp_layer_norm", "encoder_norm", "decoder_norm"}
  assert {s.projection for s, _ in by_hook["projection_input"]} == {
      s.projection for s in plugins.projection_sites(cfg) if s.projection != "logits"}
  # Attention hooks: q and k as [B, n, h, d_kv].
  for site, got in by_hook["attention_kv"]:
    (q,) = got["shapes"]
    assert q[0] == 3 and q[2:] == (h, dk), site.where
  for site, got in by_hook["attention_logits"]:
    q, k, q_pos, k_pos = got["shapes"]
    assert q[2:] == (h, dk) and k[2:] == (h, dk) and q_pos == (q[1],) and k_pos == (k[1],)
    if site.kind == "cross_attention":
      assert k[1] == 6 and q[1] == 4
  for site, got in by_hook["sublayer"]:
    x, x_normed, y = got["shapes"]
    assert x == x_normed == y and x[-1] == d
  assert {s.stack for s, _ in by_hook["stack_state"]} == {"encoder", "decoder"}
  # The stack state reaches the delta's own modules in that stack.
  assert all(float(got["state"]) == 7.0 for _, got in by_hook["sublayer"])


def test_identity_plugins_at_every_hook_leave_the_backbone_exact():
  batch = mc.make_batch()
  model = mc.make_model((Toy(rows=0),))
  variables = mc.init(model, batch)
  np.testing.assert_array_equal(np.asarray(model.logits(variables, batch)), _plain_logits(batch, variables))
  predictions, _ = model.predict_batch(variables, batch, decoder="greedy")
  plain = mc.make_model(())
  expected, _ = plain.predict_batch({"params": variables["params"]}, batch, decoder="greedy")
  np.testing.assert_array_equal(np.asarray(predictions), np.asarray(expected))


def test_each_delta_is_handed_its_own_row_span_per_stack():
  batch = mc.make_batch()
  deltas = (PromptTuning(length=3, init="uniform"), Toy(rows=2, stacks=("encoder",)),
            Toy(rows=4, stacks=("decoder",)))
  # Distinct module names for the two toys.
  model = mc.make_model(deltas)
  SEEN.clear()
  mc.init(model, batch)
  spans = {(site.stack if site else "input", got["rows"]) for hook, site, got in SEEN
           if hook in ("hidden_rows", "sublayer")}
  assert spans == {("encoder", (3, 2)), ("decoder", (0, 4))}


def test_rows_stay_spanned_during_cached_decoding():
  """Cached steps carry no rows in their activations but still know where the rows sit in the cache."""
  batch = mc.make_batch()
  model = mc.make_model((Toy(rows=2, stacks=("decoder",)),))
  variables = mc.init(model, batch)
  SEEN.clear()
  model.predict_batch(variables, dict(batch, decoder_input_tokens=jnp.zeros((4, 3), jnp.int32)))
  steps = [got for hook, site, got in SEEN if hook == "sublayer" and site.stack == "decoder"]
  assert {got["rows"] for got in steps} == {(0, 2)}
  assert {got["carries_rows"] for got in steps} == {True, False}  # The prefill, then cached steps.
  assert model.num_decoder_rows(variables) == 2


# ------------------------------------------------------------------------------ hooks as weight edits
@dataclasses.dataclass(frozen=True)
class Edit(plugins.Delta):
  """A fixed, parameter-free change `fn` at one hook of every site matching `kind` and projection `target`."""

  hook: str
  kind: str
  target: Optional[str] = None
  fn: Any = None

  def _at(self, site):
    if site.kind != self.kind or (self.target and site.projection != self.target):
      return None
    return Apply(self.fn)

  def projection_input(self, site):
    return self._at(site) if self.hook == "projection_input" else None

  def projection(self, site):
    return self._at(site) if self.hook == "projection" else None

  def sublayer(self, site):
    return self._at(site) if self.hook == "sublayer" else None


class Apply(nn.Module):
  fn: Any

  def __call__(self, *args):
    return self.fn(*args[:-1])


def _with_kernels(variables, fn):
  """`params` with `fn(path, kernel)` applied to every MLP `wo` kernel."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: fn(x) if "wo" in jax.tree_util.keystr(path) else x, variables["params"])
  return {"params": params}


SCALE = np.linspace(0.5, 1.5, 16).astype(np.float32)  # d_ff of the tiny preset.


@pytest.mark.parametrize("hook, fn, edit", [
    # The input of `wo` scaled per feature = rows of the `wo` kernel scaled: (l * h) W = h (diag(l) W).
    ("projection_input", lambda x: x * SCALE, lambda w: w * SCALE[:, None]),
    # The output of `wo` doubled = the kernel doubled.
    ("projection", lambda x, y: 2.0 * y, lambda w: 2.0 * w),
    # The MLP block's output replaced by zero = a zero `wo` kernel.
    ("sublayer", lambda x, x_normed, y: 0.0 * y, lambda w: 0.0 * w),
])
def test_hooks_act_where_the_contract_says(hook, fn, edit):
  batch = mc.make_batch()
  delta = Edit(hook, "mlp", "wo" if hook != "sublayer" else None, fn)
  model = mc.make_model((delta,))
  variables = mc.init(model, batch)
  got = np.asarray(model.logits(variables, batch))
  expected = _plain_logits(batch, _with_kernels(variables, edit))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(got - _plain_logits(batch, variables)).max() > 1e-3  # The edit really changes the model.


# ------------------------------------------------------------------------------ APrompt composition
def test_aprompt_hides_its_own_rows_in_each_stack_after_another_deltas_rows():
  """[PromptTuning(encoder), APrompt(both stacks, deep rows at the last layer)] equals the same weights in
  per-stack APrompts: the APrompt rows sit after the prompt in the encoder and first in the decoder."""
  batch = mc.make_batch()
  small = dict(input_length=2, qk_length=0, kv_length=0, max_length=16, decoder_max_length=16,
               layers=("last", 1))
  prompt = PromptTuning(length=2, init="uniform")
  joint = mc.make_model((prompt, APrompt(**small)))
  split = mc.make_model((prompt, APrompt(stacks=("encoder",), **small), APrompt(stacks=("decoder",), **small)))
  variables = mc.init(joint, batch)
  assert mc.init(split, batch)["peft"].keys() == variables["peft"].keys()
  np.testing.assert_allclose(np.asarray(joint.logits(variables, batch)),
                             np.asarray(split.logits(variables, batch)), rtol=1e-6, atol=1e-6)
  # What hides them: APrompt's layer-0 self-attention term masks exactly the key positions of its own span.
  aprompt = joint.deltas[1]
  cfg = joint.config
  for stack, kind, spans in (("encoder", "attention", ((0, 2), (2, 2))), ("decoder", "self_attention",
                                                                          (None, (0, 2)))):
    hide = aprompt.attention_logits(plugins.site(cfg, stack, 0, kind))
    ctx = plugins.Context(task_ids=None, embedding=jnp.zeros((1, 1)), spans=spans, index=1)
    q = jnp.zeros((1, 6, cfg.num_heads, cfg.head_dim))
    term = np.asarray(hide.apply({}, q, q, jnp.arange(6), jnp.arange(6), ctx))
    hidden = np.where(term[0, 0, 0] < -1e9)[0].tolist()
    assert hidden == list(range(spans[1][0], sum(spans[1]))), (stack, hidden)


# ------------------------------------------------------------------------------ backbone errors
@dataclasses.dataclass(frozen=True)
class BadRows(plugins.Delta):
  """Deep rows at layer 1 with `input` input rows (0: none) and `hidden` hidden rows."""

  input: int = 0
  hidden: int = 2

  def input_rows(self, site):
    return Rows(self.input, name="bad_rows") if self.input and site.stack == "encoder" else None

  def hidden_rows(self, site):
    if site.stack != "encoder":
      return None
    return Apply(lambda x: x[:, :self.hidden])


def test_hidden_rows_without_input_rows_is_an_error_naming_the_delta():
  model = mc.make_model((BadRows(input=0),))
  with pytest.raises(ValueError, match=r"BadRows gives hidden rows at encoder layer 1 but no input rows"):
    mc.init(model, mc.make_batch())


def test_hidden_rows_of_the_wrong_length_is_an_error_naming_both_lengths():
  model = mc.make_model((BadRows(input=2, hidden=3),))
  with pytest.raises(ValueError, match=r"BadRows: hidden rows at encoder layer 1 have shape \(4, 3, 8\); "
                                       r"its input rows have length 2"):
    mc.init(model, mc.make_batch())


def test_deltas_with_different_task_banks_are_refused():
  with pytest.raises(ValueError, match=r"different num_tasks \[2, 3\]"):
    plugins.num_tasks((PromptTuning(length=2, num_tasks=2), PromptTuning(length=2, num_tasks=3, name="b")))
  assert plugins.num_tasks((PromptTuning(length=2, num_tasks=3), Toy())) == 3
  assert plugins.num_tasks((Toy(),)) is None


def test_task_ids_outside_the_bank_are_refused_before_the_jitted_call():
  """A bank of N gathers `task_ids[b]` inside jit, where id N would read NaN and -1 the last row."""
  model = mc.make_model((PromptTuning(length=2, num_tasks=3, init="uniform"),))
  for bad, named in (([0, 3, 1, 4], r"\[3, 4\]"), ([-1, 0, 0, 0], r"\[-1\]")):
    with pytest.raises(ValueError, match=named + r" are out of range for the method's bank of 3 tasks"):
      model.check_task_ids({"task_ids": np.asarray(bad)})
  model.check_task_ids({"task_ids": np.asarray([0, 1, 2, 2])})
  mc.make_model((PromptTuning(length=2),)).check_task_ids({"task_ids": np.asarray([7])})  # No bank.
