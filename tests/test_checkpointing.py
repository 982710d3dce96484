"""Tests of prompt_mix.training.checkpointing on toy peft trees with real optax state."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_mix.training import checkpointing
from conftest import subprocess_env


def _peft(seed: float = 0.0):
  return {"encoder": {"prompt": jnp.full((3, 4), seed, jnp.float32)},
          "decoder": {"layers_0": {"lora_a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + seed}}}


def _state(step: int):
  """A state after `step` adam updates, so mu/nu/count are all non-trivial."""
  tx = optax.adam(1e-2)
  peft = _peft(1.0)
  opt_state = tx.init(peft)
  for _ in range(step):
    grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1.0, peft)
    updates, opt_state = tx.update(grads, opt_state, peft)
    peft = optax.apply_updates(peft, updates)
  return {"peft": peft, "opt_state": opt_state, "step": step, "data_state": {"batches_consumed": step * 2}}


def _abstract():
  peft = _peft()
  return {"peft": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), peft),
          "opt_state": jax.eval_shape(optax.adam(1e-2).init, peft)}


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_with_adam_state(tmp_path):
  saved = _state(3)
  with checkpointing.TrainingCheckpointManager(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(3, saved)
    restored, step = ckpt.restore_latest(_abstract())
  assert step == 3
  assert restored["step"] == 3 and restored["data_state"] == {"batches_consumed": 6}
  _assert_trees_equal(restored["peft"], saved["peft"])
  _assert_trees_equal(restored["opt_state"], saved["opt_state"])  # ScaleByAdamState + EmptyState
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert int(restored["opt_state"][0].count) == 3


def test_restore_into_target_sharding(tmp_path):
  device = jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = _abstract()
  target["peft"] = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target["peft"])
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, _state(1))
    restored, _ = ckpt.restore_latest(target)
  leaf = restored["peft"]["encoder"]["prompt"]
  assert isinstance(leaf, jax.Array) and leaf.sharding == sharding


def test_no_checkpoint_returns_none(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path / "fresh") as ckpt:
    assert ckpt.restore_latest(_abstract()) == (None, None)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []


def test_keep_n_and_latest_after_several_saves(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, _state(step))
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]
  with checkpointing.TrainingCheckpointManager(tmp_path, max_to_keep=2) as reopened:
    restored, step = reopened.restore_latest(_abstract())
  assert step == 4
  _assert_trees_equal(restored["opt_state"], _state(4)["opt_state"])


def test_interrupted_saves_are_ignored(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    ckpt.save(2, _state(2))
    # What a crash leaves behind: Orbax's temporary directory for step 5 (renamed only once complete) and a
    # step directory that never got its commit marker (a filesystem without atomic rename, a partial copy).
    (tmp_path / "5.orbax-checkpoint-tmp" / "peft").mkdir(parents=True)
    (tmp_path / "6" / "peft").mkdir(parents=True)
    ckpt.reload()
    assert ckpt.latest_step() == 2
    restored, step = ckpt.restore_latest(_abstract())
    assert step == 2 and restored["data_state"] == {"batches_consumed": 4}
  # A new writer cleans both up, and step 6 can then be saved for real.
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    assert not (tmp_path / "6").exists()
    assert not (tmp_path / "5.orbax-checkpoint-tmp").exists()
    assert ckpt.save(6, _state(6))
    assert ckpt.all_steps() == [2, 6]


def test_best_checkpoint_survives_keep_n(tmp_path):
  accuracies = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2, 5: 0.3}
  with checkpointing.TrainingCheckpointManager(tmp_path, max_to_keep=2, best_metric="accuracy") as ckpt:
    for step, acc in accuracies.items():
      ckpt.save(step, _state(step), metrics={"accuracy": np.float32(acc)})
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
    restored, step = ckpt.restore_best(_abstract())
    assert step == 2
    _assert_trees_equal(restored["peft"], _state(2)["peft"])
    with pytest.raises(ValueError, match=r"lack best_metric 'accuracy'.*\['loss'\]"):
      ckpt.save(6, _state(6), metrics={"loss": 1.0})


def test_best_mode_min(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path, max_to_keep=1, best_metric="loss",
                                               best_mode="min") as ckpt:
    for step, loss in ((1, 2.0), (2, 0.5), (3, 1.0)):
      ckpt.save(step, _state(step), metrics={"loss": loss})
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2


def test_optimizer_without_arrays(tmp_path):
  peft = _peft(2.0)
  tx = optax.set_to_zero()
  state = {"peft": peft, "opt_state": tx.init(peft), "step": 7}
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    ckpt.save(7, state)
    restored, _ = ckpt.restore_latest({"peft": peft, "opt_state": jax.eval_shape(tx.init, peft)})
  _assert_trees_equal(restored["peft"], peft)
  assert restored["opt_state"] == optax.EmptyState() and restored["data_state"] == {}


def test_bad_state_errors_name_the_problem(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    with pytest.raises(ValueError, match=r"unknown \['params'\]"):
      ckpt.save(1, {**_state(1), "params": {}})
    with pytest.raises(ValueError, match=r"state\['step'\] = 1 differs from save\(step=2\)"):
      ckpt.save(2, _state(1))
    with pytest.raises(ValueError, match="data_state.*not JSON-serializable"):
      ckpt.save(1, {**_state(1), "data_state": {"rng": object()}})
    ckpt.save(1, _state(1))
    wrong = _abstract()
    wrong["peft"]["encoder"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(ValueError, match=r"restoring .*1 into the given target failed"):
      ckpt.restore(1, wrong)
    with pytest.raises(FileNotFoundError, match=r"step 9 .* complete steps are \[1\]"):
      ckpt.restore(9, _abstract())


def test_async_save_is_on_disk_after_wait(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path, async_save=True) as ckpt:
    ckpt.save(4, _state(4))
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 4
    restored, _ = ckpt.restore_latest(_abstract())
  _assert_trees_equal(restored["peft"], _state(4)["peft"])


_OTHER_MESH_SCRIPT = r"""
import sys
import jax, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from prompt_mix import partitioning
from prompt_mix.training import checkpointing
assert jax.device_count() == 8
w = np.arange(64, dtype=np.float32).reshape(8, 8)
mesh8 = partitioning.make_mesh(num_partitions=1)
peft = {"w": jax.device_put(w, NamedSharding(mesh8, P("data", None)))}
tx = optax.adam(1e-3)
with checkpointing.TrainingCheckpointManager(sys.argv[1]) as ckpt:
  ckpt.save(10, {"peft": peft, "opt_state": tx.init(peft)})
mesh42 = partitioning.make_mesh(num_partitions=2)
target_sharding = NamedSharding(mesh42, P(None, "model"))
abstract_peft = {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=target_sharding)}
abstract = {"peft": abstract_peft, "opt_state": jax.eval_shape(tx.init, abstract_peft)}
abstract["opt_state"] = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding if x.ndim else None),
    abstract["opt_state"])
with checkpointing.TrainingCheckpointManager(sys.argv[1], read_only=True) as ckpt:
  state, step = ckpt.restore_latest(abstract)
assert step == 10
assert state["peft"]["w"].sharding == target_sharding, state["peft"]["w"].sharding
assert state["opt_state"][0].mu["w"].sharding == target_sharding
np.testing.assert_array_equal(np.asarray(state["peft"]["w"]), w)
print("OTHER_MESH_OK")
"""


def test_resume_on_a_different_mesh(tmp_path):
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _OTHER_MESH_SCRIPT, str(tmp_path / "ckpt")], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert "OTHER_MESH_OK" in proc.stdout, proc.stderr[-4000:]


def _corrupt(step_dir):
  """Flips a byte in the middle of every data file of the step's peft item (CRC-checked by TensorStore)."""
  for path in (step_dir / "peft" / "d").iterdir():
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_latest_step_names_the_intact_earlier_one(tmp_path):
  with checkpointing.TrainingCheckpointManager(tmp_path, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step))
  _corrupt(tmp_path / "3")
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    with pytest.raises(checkpointing.CheckpointReadError) as info:
      ckpt.restore_latest(_abstract())
  message = str(info.value)
  assert message.startswith(f"checkpoint step 3 ({tmp_path / '3'}) cannot be read: its files are damaged: ")
  assert "checksum" in message and "tensorstore_spec" not in message and len(message) < 1200, message
  assert message.splitlines()[-1] == (f"Step 2 restores intact: move {tmp_path / '3'} out of {tmp_path} (keep "
                                      "it for inspection) and run again to resume from step 2.")
  _corrupt(tmp_path / "2")
  _corrupt(tmp_path / "1")
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    with pytest.raises(checkpointing.CheckpointReadError, match=r"No earlier step restores intact"):
      ckpt.restore_latest(_abstract())


def test_frozen_collections_and_specs_round_trip_and_are_optional(tmp_path):
  frozen = {"prompt_library": {"encoder": {"attempt": {"sources": jnp.arange(24.0).reshape(2, 3, 4)}}}}
  specs = {"version": 1, "collections": {"prompt_library": {"encoder/attempt/sources": {
      "shape": [2, 3, 4], "dtype": "float32", "axes": ["sources", "prompt", "prompt_embed"]}}}}
  target = {**_abstract(), "frozen": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             frozen)}
  with checkpointing.TrainingCheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, {**_state(1), "frozen": frozen, "variable_specs": specs})
    ckpt.save(2, _state(2))  # As an older version saved: neither item.
    restored = ckpt.restore(1, target)
    _assert_trees_equal(restored["frozen"], frozen)
    assert ckpt.restore_specs(1) == specs
    assert ckpt.restore(2, target)["frozen"] is None and ckpt.restore_specs(2) is None
