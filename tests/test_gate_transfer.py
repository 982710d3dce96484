"""Gate transfer (`Attempt.gate_init`): a target run starts from a gate G pre-trained elsewhere (e.g. on
the source tasks), read at initialization from an export's per-leaf `.npy` layout or the original release."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from prompt_mix.attempt import library as library_lib
from prompt_mix.peft import attempt as attempt_lib
from prompt_mix.peft import attempt_gate

import method_checks

M, D, R = 3, 8, 5


@pytest.fixture
def library(tmp_path) -> str:
  lib = library_lib.PromptLibrary(tmp_path / "library")
  rng = np.random.RandomState(0)
  for name in ("a", "b", "init"):
    lib.add(name, rng.normal(size=(M, D)).astype(np.float32), task=name)
  return lib.path


def _attempt(library, **kw):
  return attempt_lib.Attempt(**{**dict(library_path=library, source_names=("a", "b"), prompt_length=M,
                                       target_init="init", bottleneck=R, temperature=0.7), **kw})


def _gate(tree):
  return {k: np.asarray(v) for k, v in nn.unbox(tree)["encoder"]["attempt"]["attention_gate"].items()}


def _pretrained(tmp_path, layer_norm=True):
  """A gate written as an export's npy layout: <dir>/encoder/attempt/attention_gate/<leaf>.npy."""
  rng = np.random.RandomState(3)
  gate = {"w_down": rng.normal(size=(D, R)), "w_up": rng.normal(size=(R, D)),
          "layer_norm_scale": rng.normal(size=(D,)), "layer_norm_bias": rng.normal(size=(D,))}
  gate = {k: v.astype(np.float32) for k, v in gate.items()}
  directory = tmp_path / ("gate" if layer_norm else "gate_no_ln")
  leaves = directory / "encoder" / "attempt" / "attention_gate"
  leaves.mkdir(parents=True)
  for k, v in gate.items():
    if layer_norm or not k.startswith("layer_norm"):
      np.save(leaves / f"{k}.npy", v)
  return directory, gate


@pytest.mark.parametrize("kw", [dict(), dict(num_tasks=2), dict(per_token=True)])
def test_initialization_starts_from_the_pretrained_gate(library, tmp_path, kw):
  directory, gate = _pretrained(tmp_path)
  batch = method_checks.make_batch(task_ids=[0, 1, 0, 1] if kw.get("num_tasks") else None)
  plain = method_checks.init(method_checks.make_model([_attempt(library, **kw)]), batch)
  model = method_checks.make_model([_attempt(library, gate_init=str(directory), **kw)])
  variables = method_checks.init(model, batch)
  for k, v in _gate(variables["peft"]).items():
    np.testing.assert_array_equal(v, gate[k])
  # Nothing else changes: the target prompt and the frozen sources are those of a run without gate_init.
  np.testing.assert_array_equal(variables["peft"]["encoder"]["attempt"]["target_prompt"],
                                plain["peft"]["encoder"]["attempt"]["target_prompt"])
  np.testing.assert_array_equal(nn.unbox(variables["prompt_library"])["encoder"]["attempt"]["sources"],
                                nn.unbox(plain["prompt_library"])["encoder"]["attempt"]["sources"])
  # The weights come from the pre-trained G: the same as loading it after init with load_gate.
  _, aux = model.loss_fn(variables, batch)
  loaded = dict(plain, peft=attempt_lib.load_gate(plain["peft"], directory))
  _, aux_loaded = model.loss_fn(loaded, batch)
  np.testing.assert_allclose(attempt_lib.attention_weights(aux), attempt_lib.attention_weights(aux_loaded),
                             rtol=1e-6)
  # The trainer's initialization (model.init_method on the backbone, under jit) starts from it too.
  method = jax.jit(lambda r, p: model.init_method(r, p, batch))(jax.random.PRNGKey(1), variables["params"])
  for k, v in _gate(method["peft"]).items():
    np.testing.assert_array_equal(v, gate[k])
  assert jax.tree_util.tree_map(np.shape, nn.unbox(model.abstract_init(batch)["peft"])) == (
      jax.tree_util.tree_map(np.shape, nn.unbox(variables["peft"])))


def test_applying_trained_variables_ignores_gate_init(library, tmp_path):
  """Once `peft` exists (a restored checkpoint), the model uses its gate, not the gate_init files."""
  batch = method_checks.make_batch()
  trained = method_checks.init(method_checks.make_model([_attempt(library)]), batch, seed=5)
  model = method_checks.make_model([_attempt(library, gate_init=str(tmp_path / "gone"))])
  _, aux = model.loss_fn(trained, batch)
  _, expected = method_checks.make_model([_attempt(library)]).loss_fn(trained, batch)
  np.testing.assert_array_equal(attempt_lib.attention_weights(aux), attempt_lib.attention_weights(expected))


def test_without_layer_norm_files_the_models_layer_norm_stays(library, tmp_path):
  directory, gate = _pretrained(tmp_path, layer_norm=False)
  model = method_checks.make_model([_attempt(library, gate_init=directory)])
  loaded = _gate(method_checks.init(model, method_checks.make_batch())["peft"])
  np.testing.assert_array_equal(loaded["w_down"], gate["w_down"])
  np.testing.assert_array_equal(loaded["layer_norm_scale"], np.ones(D, np.float32))
  np.testing.assert_array_equal(loaded["layer_norm_bias"], np.zeros(D, np.float32))


def test_gate_init_errors_name_the_file(library, tmp_path):
  batch = method_checks.make_batch()
  directory, _ = _pretrained(tmp_path)
  wrong = _attempt(library, gate_init=str(directory), bottleneck=4)
  with pytest.raises(ValueError, match=r"w_down.npy: shape \(8, 5\) does not fit the model's \(8, 4\)"):
    method_checks.init(method_checks.make_model([wrong]), batch)
  with pytest.raises(FileNotFoundError, match="gate directory .*missing does not exist"):
    method_checks.init(method_checks.make_model([_attempt(library, gate_init=str(tmp_path / "missing"))]),
                       batch)
  (tmp_path / "partial").mkdir()
  np.save(tmp_path / "partial" / "w_up.npy", np.zeros((R, D), np.float32))
  with pytest.raises(ValueError, match=r"lacks \['w_down'\]"):
    method_checks.init(method_checks.make_model([_attempt(library, gate_init=str(tmp_path / "partial"))]),
                       batch)
  with pytest.raises(ValueError, match="constant attention has no gate G"):
    _attempt(library, gate_init=str(directory), constant_attention=True)


def test_release_gate_files_initialize_the_gate(library, tmp_path):
  torch = pytest.importorskip("torch")
  _, gate = _pretrained(tmp_path)
  release = tmp_path / "release"  # The original's torch.save of nn.Linear weights ([out, in]).
  release.mkdir()
  torch.save(torch.from_numpy(gate["w_down"].T.copy()), release / "attn_W_down.pt")
  torch.save(torch.from_numpy(gate["w_up"].T.copy()), release / "attn_W_up.pt")
  model = method_checks.make_model([_attempt(library, gate_init=str(release))])
  loaded = _gate(method_checks.init(model, method_checks.make_batch())["peft"])
  np.testing.assert_array_equal(loaded["w_down"], gate["w_down"])
  np.testing.assert_array_equal(loaded["w_up"], gate["w_up"])


def test_frozen_gate_layer_norm_is_the_original_codes_switch(tmp_path):
  """train_gate_layer_norm=False: only W_down and W_up train (the original code); the LayerNorm sits in the
  frozen `attempt_frozen` collection at its initial values, or at the ones gate_init loads."""
  mc = method_checks
  library = library_lib.PromptLibrary(tmp_path / "library")
  rng = np.random.RandomState(0)
  for name in ("a", "b"):
    library.add(name, rng.uniform(-0.5, 0.5, (3, 8)).astype(np.float32))
  delta = attempt_lib.Attempt(library_path=str(library.path), source_names=("a", "b"), target_init="uniform",
                              prompt_length=3, bottleneck=2, train_gate_layer_norm=False)
  variables, trained = mc.check_step_trains_only_method((delta,))
  gate = variables["peft"]["encoder"]["attempt"]["attention_gate"]
  assert sorted(gate) == ["w_down", "w_up"]
  frozen = variables[attempt_lib.FROZEN_GATE_COLLECTION]["encoder"]["attempt"]["attention_gate"]
  np.testing.assert_array_equal(frozen["layer_norm_scale"], np.ones(8))
  np.testing.assert_array_equal(frozen["layer_norm_bias"], np.zeros(8))
  d = 8
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables["peft"])) == (
      3 * d + attempt_gate.gate_param_count(d, 2, train_layer_norm=False))
  # gate_init loads a release's LayerNorm into the frozen collection.
  for leaf, shape in (("w_down", (d, 2)), ("w_up", (2, d)), ("layer_norm_scale", (d,)),
                      ("layer_norm_bias", (d,))):
    np.save(tmp_path / f"{leaf}.npy", rng.randn(*shape).astype(np.float32))
  loaded = mc.init(mc.make_model((dataclasses.replace(delta, gate_init=str(tmp_path)),)), mc.make_batch())
  frozen = loaded[attempt_lib.FROZEN_GATE_COLLECTION]["encoder"]["attempt"]["attention_gate"]
  np.testing.assert_array_equal(frozen["layer_norm_scale"], np.load(tmp_path / "layer_norm_scale.npy"))
  np.testing.assert_array_equal(loaded["peft"]["encoder"]["attempt"]["attention_gate"]["w_up"],
                                np.load(tmp_path / "w_up.npy"))
  with pytest.raises(KeyError, match="frozen with train_gate_layer_norm=False"):
    attempt_lib.load_gate(variables["peft"], tmp_path, require_layer_norm=True)
