"""ATTEMPT: the instance prompt and attention weights against an independent NumPy implementation, the
frozen source library, parameter counts on T5-base shapes, ATTEMPT-m, loading a pre-trained gate, the gin
files, and a small transfer experiment where the attention finds the matching source prompt."""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_mix import gin_utils
from prompt_mix.peft import attempt as attempt_lib
from prompt_mix.peft import attempt_gate as gate_lib
from prompt_mix.attempt import library as library_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import plugins
from prompt_mix.training import optimizers
from prompt_mix.training import step as step_lib

import method_checks

M, D = 3, 8  # Prompt length and the tiny backbone's d_model.
SOURCES = ("a", "b", "c")


@pytest.fixture
def library(tmp_path) -> str:
  """A library of three random sources [M, D] and an 'init' prompt (the target's init)."""
  lib = library_lib.PromptLibrary(tmp_path / "library")
  rng = np.random.RandomState(0)
  for name in SOURCES + ("init",):
    lib.add(name, rng.normal(size=(M, D)).astype(np.float32), backbone="tiny", task=name)
  return lib.path


def _attempt(library, **kw) -> attempt_lib.Attempt:
  kw = {**dict(library_path=library, source_names=SOURCES, prompt_length=M, target_init="init",
               bottleneck=5), **kw}
  return attempt_lib.Attempt(**kw)


def _perturb(tree, seed, scale=0.5):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------------------- NumPy reference
def _reference(embedded, mask, sources, target, gate, temperature, *, unmasked, use_target, per_token,
               constant):
  """Eq. 3-4 of the paper, one example at a time, in float64. Returns (rows [B,m,d], weights)."""
  embedded, sources = np.asarray(embedded, np.float64), np.asarray(sources, np.float64)
  all_rows, all_weights = [], []
  for b in range(embedded.shape[0]):
    x = embedded[b].max(axis=0) if unmasked else embedded[b][np.asarray(mask[b], bool)].max(axis=0)
    candidates = [sources[j] for j in range(sources.shape[0])]
    if use_target:
      candidates.append(np.asarray(target[b], np.float64))
    c = len(candidates)
    if constant:
      a = np.full((c,), 1.0 / c)
    else:
      h = x @ np.asarray(gate["w_down"], np.float64)
      h = h / (1.0 + np.exp(-h))  # SiLU
      u = h @ np.asarray(gate["w_up"], np.float64)
      z = (u - u.mean()) / np.sqrt(u.var() + 1e-5) * gate["layer_norm_scale"] + gate["layer_norm_bias"]
      if per_token:
        s = np.array([[p[i] @ z for p in candidates] for i in range(candidates[0].shape[0])]) / temperature
        a = np.exp(s - s.max(axis=1, keepdims=True))
        a = a / a.sum(axis=1, keepdims=True)  # [m, c]
      else:
        s = np.array([p.max(axis=0) @ z for p in candidates]) / temperature
        a = np.exp(s - s.max())
        a = a / a.sum()  # [c]
    rows = np.asarray(target[b], np.float64).copy() if use_target else np.zeros_like(candidates[0])
    for j, p in enumerate(candidates):
      rows = rows + (a[:, j:j + 1] * p if a.ndim == 2 else a[j] * p)
    all_rows.append(rows)
    all_weights.append(a)
  return np.stack(all_rows), np.stack(all_weights)


def _embedded_batch(seed=0, batch=4, n=6):
  """Random embeddings with padding whose embeddings dominate the max (so the two poolings differ)."""
  rng = np.random.RandomState(seed)
  embedded = rng.normal(size=(batch, n, D)).astype(np.float32)
  mask = np.ones((batch, n), bool)
  mask[0, -2:] = False
  mask[2, -3:] = False
  embedded[~mask] = 3.0 + rng.uniform(size=embedded[~mask].shape)
  return jnp.asarray(embedded), jnp.asarray(mask)


VARIANTS = {
    "default": dict(),
    "unmasked_pooling": dict(unmasked_pooling=True),
    "no_target": dict(use_target=False),
    "per_token": dict(per_token=True),
    "per_token_unmasked": dict(per_token=True, unmasked_pooling=True),
    "per_token_no_target": dict(per_token=True, use_target=False),
    "constant": dict(constant_attention=True),
    "constant_no_target": dict(constant_attention=True, use_target=False),
    "single_source": dict(source_names=("b",)),
    "attempt_m": dict(num_tasks=3),
    "default_temperature": dict(temperature=None),
}


def _run_module(delta, embedded, mask, task_ids=None, seed=0):
  module = attempt_lib.AttemptPrompt(delta)
  ctx = plugins.Context(task_ids=task_ids, embedding=jnp.zeros((40, D)), batch_size=embedded.shape[0])
  variables = nn.unbox(module.init({"params": jax.random.PRNGKey(seed)}, embedded, mask, ctx))
  if "peft" in variables:
    variables = dict(variables, peft=_perturb(variables["peft"], seed + 1))
  rows, state = module.apply(variables, embedded, mask, ctx, mutable=[model_lib.INTERMEDIATES])
  weights = state[model_lib.INTERMEDIATES][attempt_lib.ATTENTION_WEIGHTS][0]
  return variables, np.asarray(rows), np.asarray(weights)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_instance_prompt_and_weights_equal_numpy(library, variant):
  kw = {**dict(temperature=0.7), **VARIANTS[variant]}
  delta = _attempt(library, **kw)
  embedded, mask = _embedded_batch()
  task_ids = jnp.asarray([0, 2, 1, 2], jnp.int32) if delta.num_tasks else None
  variables, rows, weights = _run_module(delta, embedded, mask, task_ids)

  peft = variables.get("peft", {})
  sources = library_lib.PromptLibrary(library).load_stack(delta.source_names)
  np.testing.assert_array_equal(variables["prompt_library"]["sources"], sources)  # Frozen, from the library.
  target = None
  if delta.use_target:
    table = np.asarray(peft["target_prompt"])
    target = table[np.asarray(task_ids)] if delta.num_tasks else np.broadcast_to(table, (4, M, D))
  gate = {k: np.asarray(v, np.float64) for k, v in peft.get(gate_lib.GATE_NAME, {}).items()}
  assert bool(gate) != delta.constant_attention  # Constant attention has no gate at all.
  temperature = delta.temperature or D * math.e
  ref_rows, ref_weights = _reference(embedded, mask, sources, target, gate, temperature,
                                     unmasked=delta.unmasked_pooling, use_target=delta.use_target,
                                     per_token=delta.per_token, constant=delta.constant_attention)
  c = len(delta.candidate_names)
  assert weights.shape == ((4, M, c) if delta.per_token else (4, c))
  assert rows.shape == (4, M, D)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rows, ref_rows, rtol=1e-5, atol=1e-5)
  if not delta.constant_attention:
    assert np.ptp(weights, axis=-1).max() > 1e-3, "the weights are uniform: the check would be vacuous"


def test_masked_and_unmasked_pooling_differ_on_padded_inputs(library):
  embedded, mask = _embedded_batch()
  _, masked, _ = _run_module(_attempt(library, temperature=0.7), embedded, mask)
  _, unmasked, _ = _run_module(_attempt(library, temperature=0.7, unmasked_pooling=True), embedded, mask)
  padded = ~np.asarray(mask).all(axis=1)
  assert not np.allclose(masked[padded], unmasked[padded])
  np.testing.assert_allclose(masked[~padded], unmasked[~padded], rtol=1e-6)  # No padding, same result.


def test_loss_score_and_predict_return_the_weights(library):
  delta = _attempt(library, temperature=0.7)
  model = method_checks.make_model([delta])
  batch = method_checks.make_batch()
  variables = method_checks.init(model, batch)
  variables = dict(variables, peft=_perturb(variables["peft"], 3))
  embedded = np.asarray(variables["params"]["token_embedder"]["embedding"])[np.asarray(
      batch["encoder_input_tokens"])]
  peft = variables["peft"]["encoder"]["attempt"]
  _, expected = _reference(embedded, np.asarray(batch["encoder_input_tokens"]) > 0,
                           variables["prompt_library"]["encoder"]["attempt"]["sources"],
                           np.broadcast_to(peft["target_prompt"], (4, M, D)), peft["attention_gate"],
                           0.7, unmasked=False, use_target=True, per_token=False, constant=False)
  _, aux = model.loss_fn(variables, batch)
  np.testing.assert_allclose(attempt_lib.attention_weights(aux["intermediates"]), expected, rtol=1e-5)
  np.testing.assert_allclose(attempt_lib.attention_weights(aux), expected, rtol=1e-5)
  _, intermediates = model.score_batch(variables, batch, return_intermediates=True)
  np.testing.assert_allclose(attempt_lib.attention_weights(intermediates), expected, rtol=1e-5)
  predict_batch = dict(batch, decoder_input_tokens=jnp.zeros((4, 3), jnp.int32))
  _, aux = model.predict_batch(variables, predict_batch)
  np.testing.assert_allclose(attempt_lib.attention_weights(aux["intermediates"]), expected, rtol=1e-5)
  with pytest.raises(KeyError, match="no ATTEMPT attention weights"):
    attempt_lib.attention_weights({"encoder": {}})


# ------------------------------------------------------------------------------- training and shapes
@pytest.mark.parametrize("kw", [dict(), dict(num_tasks=2, per_token=True)], ids=["attempt", "attempt_m_token"])
def test_step_trains_only_target_and_gate(library, kw):
  delta = _attempt(library, **kw)
  batch = method_checks.make_batch(task_ids=[0, 1, 1, 0] if delta.num_tasks else None)
  variables, new = method_checks.check_step_trains_only_method([delta], batch)
  trained = set(model_lib.flatten(variables["peft"]))
  assert trained == {"encoder/attempt/target_prompt", "encoder/attempt/attention_gate/w_down",
                     "encoder/attempt/attention_gate/w_up", "encoder/attempt/attention_gate/layer_norm_scale",
                     "encoder/attempt/attention_gate/layer_norm_bias"}
  np.testing.assert_array_equal(new["prompt_library"]["encoder"]["attempt"]["sources"],
                                library_lib.PromptLibrary(library).load_stack(SOURCES))


def _abstract_peft(delta, config, num_tasks=None):
  model = model_lib.EncoderDecoderModel(config, (delta,))
  batch = dict(encoder_input_tokens=jnp.ones((2, 4), jnp.int32), decoder_input_tokens=jnp.ones((2, 2), jnp.int32),
               decoder_target_tokens=jnp.ones((2, 2), jnp.int32))
  if num_tasks:
    batch["task_ids"] = jnp.zeros((2,), jnp.int32)
  return model.abstract_init(batch)


@pytest.fixture
def base_library(tmp_path) -> str:
  """Six source prompts [100, 768] named as the paper's source tasks."""
  lib = library_lib.PromptLibrary(tmp_path / "base")
  rng = np.random.RandomState(0)
  for name in ("mnli", "sst2", "qnli", "qqp", "squad", "record"):
    lib.add(name, rng.uniform(-0.5, 0.5, (100, 768)).astype(np.float32), backbone="t5_base", task=name)
  return lib.path


@pytest.mark.parametrize("num_tasks", [None, 1, 3, 8])
def test_parameter_counts_on_t5_base(base_library, num_tasks):
  delta = attempt_lib.Attempt(library_path=base_library,
                              source_names=("mnli", "sst2", "qnli", "qqp", "squad", "record"),
                              prompt_length=100, bottleneck=100, num_tasks=num_tasks)
  shapes = _abstract_peft(delta, config_lib.preset("t5_base"), num_tasks)
  count = model_lib.count_params(nn.unbox(shapes["peft"]))
  assert gate_lib.gate_param_count(768, 100) == 76_800 + 76_800 + 1_536 == 155_136
  if num_tasks is None:
    assert count == 231_936 == 76_800 + 76_800 + 76_800 + 1_536
  else:
    assert count == 76_800 * num_tasks + 155_136
  # The sources are frozen values of their own collection, with their logical axes.
  sources = shapes["prompt_library"]["encoder"]["attempt"]["sources"]
  assert sources.value.shape == (6, 100, 768) and sources.names == ("sources", "prompt", "prompt_embed")
  target = shapes["peft"]["encoder"]["attempt"]["target_prompt"]
  assert target.names == (("tasks",) if num_tasks else ()) + ("prompt", "prompt_embed")


def test_mixed_task_batch_equals_task_by_task(library):
  method_checks.check_mixed_task_equals_task_by_task([_attempt(library, num_tasks=3, temperature=0.7)],
                                                     num_tasks=3)


def test_cached_decoding_equals_uncached(library):
  method_checks.check_cached_equals_uncached([_attempt(library, temperature=0.7)])


def test_sources_can_be_added_and_removed_without_retraining(library):
  """A peft tree trained with sources (a, b) serves (a, b, c) and (c,): only the candidate set changes."""
  model_ab = method_checks.make_model([_attempt(library, source_names=("a", "b"))])
  batch = method_checks.make_batch()
  variables = method_checks.init(model_ab, batch)
  peft = _perturb(variables["peft"], 5)
  for names in [("a", "b", "c"), ("c",)]:
    delta = _attempt(library, source_names=names)
    model = method_checks.make_model([delta])
    assert jax.tree_util.tree_map(np.shape, nn.unbox(_abstract_peft(delta, model.config)["peft"])) == (
        jax.tree_util.tree_map(np.shape, peft))
    swapped = dict(variables, peft=peft, prompt_library=attempt_lib.source_collection(delta, D))
    _, aux = model.loss_fn(swapped, batch)
    weights = np.asarray(attempt_lib.attention_weights(aux))
    assert weights.shape == (4, len(names) + 1)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r"sources has shape \(2, 3, 8\).*needs \(3, 3, 8\)"):
    method_checks.make_model([_attempt(library)]).loss_fn(dict(variables, peft=peft), batch)
  with pytest.raises(ValueError, match="lack the frozen 'prompt_library' collection"):
    model_ab.loss_fn({k: v for k, v in variables.items() if k != "prompt_library"}, batch)


def test_configuration_errors_name_the_problem(library, tmp_path):
  batch = method_checks.make_batch()
  with pytest.raises(ValueError, match=r"\['zzz'\] are not in the library"):
    method_checks.init(method_checks.make_model([_attempt(library, source_names=("a", "zzz"))]), batch)
  with pytest.raises(ValueError, match="target_init='mnli' is not in the library"):
    method_checks.init(method_checks.make_model([_attempt(library, target_init="mnli")]), batch)
  with pytest.raises(ValueError, match=r"prompts have shape \(3, 8\) but Attempt\(prompt_length=4\)"):
    method_checks.init(method_checks.make_model([_attempt(library, prompt_length=4)]), batch)
  with pytest.raises(ValueError, match="library_path is not set"):
    attempt_lib.Attempt(source_names=("a",))
  with pytest.raises(ValueError, match="needs at least one source"):
    attempt_lib.Attempt(target_init="uniform", use_target=False)
  with pytest.raises(ValueError, match=r"lists \['a'\] more than once"):
    _attempt(library, source_names=["a", "b", "a"])
  with pytest.raises(ValueError, match="exclude each other"):
    _attempt(library, per_token=True, constant_attention=True)
  # Uniform init and no sources need no library: prompt tuning reparameterized as 2 P_target.
  delta = attempt_lib.Attempt(target_init="uniform", prompt_length=M, bottleneck=2)
  assert delta.candidate_names == ("target",)
  variables = method_checks.init(method_checks.make_model([delta]), batch)
  assert "prompt_library" not in variables
  # Once initialized, the library is not read again (it may be gone where the trained model runs).
  model = method_checks.make_model([_attempt(library)])
  variables = method_checks.init(model, batch)
  moved = _attempt(library, library_path=str(tmp_path / "gone"))
  method_checks.make_model([moved]).loss_fn(variables, batch)


# ------------------------------------------------------------------------------- loading G and targets
def test_load_gate_from_npy_torch_and_peft_trees(library, tmp_path):
  torch = pytest.importorskip("torch")
  model = method_checks.make_model([_attempt(library)])
  peft = method_checks.init(model, method_checks.make_batch())["peft"]
  trained = _perturb(peft, 7)
  gate = {k: np.asarray(v) for k, v in trained["encoder"]["attempt"]["attention_gate"].items()}

  loaded = attempt_lib.load_gate(peft, trained)  # From another run's peft tree.
  for k in gate:
    np.testing.assert_array_equal(loaded["encoder"]["attempt"]["attention_gate"][k], gate[k])
  np.testing.assert_array_equal(loaded["encoder"]["attempt"]["target_prompt"],
                                peft["encoder"]["attempt"]["target_prompt"])  # Target untouched.

  export = tmp_path / "export" / "encoder" / "attempt" / "attention_gate"  # Per-leaf .npy layout.
  export.mkdir(parents=True)
  for k, v in gate.items():
    np.save(export / f"{k}.npy", v)
  loaded = attempt_lib.load_gate(peft, tmp_path / "export", require_layer_norm=True)
  for k in gate:
    np.testing.assert_array_equal(loaded["encoder"]["attempt"]["attention_gate"][k], gate[k])

  release = tmp_path / "release"  # The original's torch.save of nn.Linear weights ([out, in]).
  release.mkdir()
  torch.save(torch.from_numpy(gate["w_down"].T.copy()), release / "attn_W_down.pt")
  torch.save(torch.from_numpy(gate["w_up"].T.copy()), release / "attn_W_up.pt")
  loaded = attempt_lib.load_gate(peft, release)
  for k in ("w_down", "w_up"):
    np.testing.assert_array_equal(loaded["encoder"]["attempt"]["attention_gate"][k], gate[k])
  np.testing.assert_array_equal(loaded["encoder"]["attempt"]["attention_gate"]["layer_norm_scale"],
                                peft["encoder"]["attempt"]["attention_gate"]["layer_norm_scale"])
  with pytest.raises(ValueError, match=r"lacks \['layer_norm_scale', 'layer_norm_bias'\]"):
    attempt_lib.load_gate(peft, release, require_layer_norm=True)
  torch.save(torch.zeros(4, 8), release / "attn_W_down.pt")
  with pytest.raises(ValueError, match=r"attn_W_down.pt: shape \(8, 4\) does not fit the model's \(8, 5\)"):
    attempt_lib.load_gate(peft, release)
  with pytest.raises(FileNotFoundError, match="holds no gate"):
    attempt_lib.load_gate(peft, tmp_path)


def test_load_target_prompts(library, tmp_path):
  torch = pytest.importorskip("torch")
  model = method_checks.make_model([_attempt(library, num_tasks=3)])
  peft = method_checks.init(model, method_checks.make_batch(task_ids=[0, 1, 2, 0]))["peft"]
  prompt = np.random.RandomState(1).normal(size=(M, D)).astype(np.float32)
  torch.save(torch.from_numpy(prompt), tmp_path / "prefix_embeddings.pt")
  loaded = attempt_lib.load_target(peft, tmp_path / "prefix_embeddings.pt", task=1)
  table = np.asarray(loaded["encoder"]["attempt"]["target_prompt"])
  np.testing.assert_array_equal(table[1], prompt)
  np.testing.assert_array_equal(table[0], peft["encoder"]["attempt"]["target_prompt"][0])
  np.save(tmp_path / "all.npy", prompt)
  table = np.asarray(attempt_lib.load_target(peft, tmp_path / "all.npy")["encoder"]["attempt"]["target_prompt"])
  np.testing.assert_array_equal(table, np.broadcast_to(prompt, (3, M, D)))
  with pytest.raises(ValueError, match=r"shape \(2, 8\) does not fit"):
    attempt_lib.load_target(peft, prompt[:2], task=0)


# ------------------------------------------------------------------------------- gin
@gin.configurable
def _attempt_test_deltas(deltas=gin.REQUIRED):
  return deltas


GIN_FILES = {
    "attempt.gin": dict(),
    "attempt_m.gin": dict(num_tasks=3),
    "attempt_no_target.gin": dict(use_target=False),
    "attempt_constant_attention.gin": dict(constant_attention=True),
    "attempt_single_source.gin": dict(source_names=("mnli",)),
    "attempt_per_token.gin": dict(per_token=True),
}


@pytest.mark.parametrize("name", list(GIN_FILES))
def test_gin_files_build_the_delta(name, tmp_path):
  lib = library_lib.PromptLibrary(tmp_path / "lib")
  rng = np.random.RandomState(0)
  for source in ("mnli", "sst2", "qnli", "qqp", "squad", "record"):
    lib.add(source, rng.normal(size=(100, D)).astype(np.float32), task=source)
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(gin_utils.CONFIG_DIR))
    gin.parse_config_files_and_bindings(
        [str(gin_utils.CONFIG_DIR / "models" / "tiny.gin"), str(gin_utils.CONFIG_DIR / "methods" / name)],
        [f"PROMPT_LIBRARY = '{lib.path}'", "NUM_TASKS = 3", "_attempt_test_deltas.deltas = %DELTAS"])
    (delta,) = _attempt_test_deltas()
    model = model_lib.EncoderDecoderModel()  # As the binaries build it: models/*.gin bind %DELTAS.
  finally:
    gin.clear_config()
  assert tuple(model.deltas) == (delta,) and model.config.emb_dim == D
  expected = dict(library_path=lib.path, source_names=("mnli", "sst2", "qnli", "qqp", "squad", "record"),
                  prompt_length=100, bottleneck=100, target_init="mnli", temperature=None, num_tasks=None,
                  use_target=True, constant_attention=False, per_token=False, unmasked_pooling=False)
  expected.update(GIN_FILES[name])
  assert isinstance(delta, attempt_lib.Attempt)
  assert {k: getattr(delta, k) for k in expected} == expected
  # The delta builds on the (tiny) backbone: 100 x d prompts from the library.
  peft = model_lib.flatten(nn.unbox(_abstract_peft(delta, model.config, delta.num_tasks)["peft"]))
  assert ("encoder/attempt/target_prompt" in peft) == delta.use_target
  assert ("encoder/attempt/attention_gate/w_down" in peft) != delta.constant_attention


# ------------------------------------------------------------------------------- transfer
def _constant_task_batch(labels, seed, task_ids=None, n=6):
  """Random inputs (some padded); the target is one task-specific token then EOS."""
  rng = np.random.RandomState(seed)
  labels = np.asarray(labels)
  enc = rng.randint(2, method_checks.VOCAB, (len(labels), n))
  enc[::3, n - 2:] = 0
  tgt = np.stack([labels, np.ones_like(labels)], axis=1)
  dec = np.concatenate([np.zeros((len(labels), 1), int), tgt[:, :-1]], axis=1)
  batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt,
               decoder_loss_weights=np.ones(tgt.shape, np.float32))
  if task_ids is not None:
    batch["task_ids"] = np.asarray(task_ids, np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _train(model, variables, batches, steps, optimizer):
  trainable, frozen = model_lib.split_trainable(variables)
  opt_state = optimizer.init(trainable)
  step = jax.jit(step_lib.make_train_step(model, optimizer))
  losses = []
  for i in range(steps):
    trainable, opt_state, loss, _ = step(trainable, opt_state, frozen, batches[i % len(batches)], None)
    losses.append(float(loss))
  return model_lib.merge_trainable(trainable, frozen), losses


def test_attention_concentrates_on_the_matching_source(tmp_path):
  """Source prompts trained by prompt tuning on three tasks; ATTEMPT on a fresh sample of task 'a'.

  The tiny backbone is widened to d=32 so that a 4-row prompt can carry a task. The source prompts are
  trained together as a prompt-tuning bank (one compile), the backbone is shared by both stages.
  """
  widen = dict(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64)
  labels = {"a": 5, "b": 9, "c": 13}
  m = 4
  try:
    from prompt_mix.peft.prompt_tuning import PromptTuning  # pylint: disable=g-import-not-at-top
    bank = PromptTuning(length=m, init="uniform", num_tasks=3)
    bank_leaf = ("encoder", "prompt_tuning", "prompt")
  except ImportError:  # ATTEMPT with only a target, per task, is prompt tuning reparameterized.
    bank = attempt_lib.Attempt(target_init="uniform", prompt_length=m, num_tasks=3, constant_attention=True)
    bank_leaf = ("encoder", "attempt", "target_prompt")
  model = method_checks.make_model([bank], **widen)
  task_ids = np.arange(24) % 3
  batches = [_constant_task_batch([list(labels.values())[t] for t in task_ids], s, task_ids) for s in (0, 1)]
  variables = method_checks.init(model, batches[0])
  variables, losses = _train(model, variables, batches, 100, optax.adam(0.3))
  assert losses[-1] < 0.5 * losses[0], losses
  backbone = variables["params"]
  prompts = np.asarray(variables["peft"][bank_leaf[0]][bank_leaf[1]][bank_leaf[2]])
  if isinstance(bank, attempt_lib.Attempt):
    prompts = 2 * prompts  # P_instance = P_target + 1 * P_target.
  lib = library_lib.PromptLibrary(tmp_path / "sources")
  for (name, _), prompt in zip(labels.items(), prompts):
    lib.add(name, prompt, backbone="tiny-d32", task=name)

  delta = attempt_lib.Attempt(library_path=lib.path, source_names=tuple(labels), prompt_length=m,
                              target_init="uniform", init_range=0.1, bottleneck=4)
  model = method_checks.make_model([delta], **widen)
  batches = [_constant_task_batch([labels["a"]] * 16, s) for s in (100, 101)]
  variables = dict(method_checks.init(model, batches[0], seed=3), params=backbone)
  # The gate trains with its own (larger) learning rate, selected by its subtree name.
  optimizer = optimizers.make_optimizer("adam", learning_rate=0.01,
                                        group_learning_rates={gate_lib.GATE_NAME: 0.3})
  variables, losses = _train(model, variables, batches, 60, optimizer)
  assert losses[-1] < 0.7 * losses[0], losses
  _, aux = model.loss_fn(variables, _constant_task_batch([labels["a"]] * 16, 200))
  mean = np.asarray(attempt_lib.attention_weights(aux)).mean(axis=0)
  assert delta.candidate_names == ("a", "b", "c", "target")
  assert mean[0] > 0.5 and mean[0] > 3 * mean[1:].max(), mean
