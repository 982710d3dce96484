"""Tests of prompt_mix.partitioning.

The multi-device checks need 8 CPU devices, which `XLA_FLAGS=--xla_force_host_platform_device_count=8`
only provides when set before JAX initializes its backend; pytest's process already has one device. So
this file doubles as a script: `_run_device_checks` runs it in a subprocess with the flag set, the
subprocess runs every `_check_*` function and prints a JSON report, and each test reads its entry.
"""

import json
import os
import pathlib
import subprocess
import sys
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from prompt_mix import partitioning
from conftest import subprocess_env

_REPORT_MARK = "PARTITIONING_REPORT:"


class ToyModel(nn.Module):
  """Embedding + one attention-like projection + a soft prompt, with T5X/prompt_mix logical names."""

  @nn.compact
  def __call__(self, tokens):  # tokens [B, n]
    init = nn.initializers.normal(0.02)
    embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (16, 8))
    query = self.param("query", nn.with_logical_partitioning(init, ("embed", "joined_kv")), (8, 4))
    wi = self.param("wi", nn.with_logical_partitioning(init, ("embed", "mlp")), (8, 6))
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (8,))
    prompt = self.param("prompt", nn.with_logical_partitioning(init, ("prompt", "prompt_embed")), (3, 8))
    x = jnp.take(embedding, tokens, axis=0)                             # [B, n, d]
    x = jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape), x], axis=1) * scale
    return jnp.einsum("bnd,dk->bnk", x, query), jnp.einsum("bnd,dm->bnm", x, wi)


def _boxed_toy_params():
  return jax.eval_shape(ToyModel().init, jax.random.key(0), jnp.zeros((4, 5), jnp.int32))["params"]


# ---------------------------------------------------------------------------------------------------------
# Checks run in the 8-device subprocess.


def _check_mesh_shape():
  assert jax.device_count() == 8, jax.device_count()
  mesh = partitioning.make_mesh(num_partitions=2)
  assert mesh.axis_names == ("data", "model"), mesh.axis_names
  assert dict(mesh.shape) == {"data": 4, "model": 2}, dict(mesh.shape)
  assert dict(partitioning.make_mesh().shape) == {"data": 8, "model": 1}
  try:
    partitioning.make_mesh(num_partitions=3)
  except ValueError as e:
    assert "num_partitions=3" in str(e) and "8 devices" in str(e), str(e)
  else:
    raise AssertionError("num_partitions=3 over 8 devices did not raise")


def _check_boxed_param_specs():
  mesh = partitioning.make_mesh(num_partitions=2)
  shardings = partitioning.logical_to_sharding(_boxed_toy_params(), mesh)
  specs = {k: v.spec for k, v in shardings.items()}
  expected = {"embedding": P("model", None), "query": P(None, "model"), "wi": P(None, "model"),
              "scale": P(None), "prompt": P(None, None)}
  assert specs == expected, specs
  assert all(s.mesh == mesh for s in shardings.values())


def _check_optax_state_specs():
  import optax  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(num_partitions=2)
  stateless = optax.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))  # state: ()
  tx = optax.chain(optax.clip_by_global_norm(1.0), stateless, optax.adam(1e-3))
  boxed_opt = jax.eval_shape(tx.init, _boxed_toy_params())
  shardings = partitioning.logical_to_sharding(boxed_opt, mesh)
  opt_state = jax.eval_shape(tx.init, partitioning.strip_boxes(_boxed_toy_params()))
  assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(opt_state)
  assert shardings[1] == ()
  adam = shardings[2][0]
  assert adam.count.spec == P(), adam.count.spec
  assert adam.mu["embedding"].spec == P("model", None), adam.mu["embedding"].spec
  assert adam.nu["query"].spec == P(None, "model"), adam.nu["query"].spec


def _check_sharded_matmul_matches():
  mesh = partitioning.make_mesh(num_partitions=2)
  boxed = _boxed_toy_params()
  shardings = partitioning.logical_to_sharding(boxed, mesh)
  params = partitioning.strip_boxes(ToyModel().init(jax.random.key(1), jnp.zeros((4, 5), jnp.int32))["params"])
  tokens = np.arange(40, dtype=np.int32).reshape(8, 5) % 16
  expected = ToyModel().apply({"params": params}, tokens)

  sharded_params = jax.device_put(params, shardings)
  assert sharded_params["query"].sharding.spec == P(None, "model")
  batch = partitioning.shard_batch({"tokens": tokens}, mesh)
  assert batch["tokens"].sharding.spec == P("data"), batch["tokens"].sharding
  assert len(batch["tokens"].addressable_shards) == 8
  assert batch["tokens"].addressable_shards[0].data.shape == (2, 5)
  out_sharding = jax.sharding.NamedSharding(mesh, P("data", None, "model"))
  fn = jax.jit(lambda p, b: ToyModel().apply({"params": p}, b["tokens"]), in_shardings=(shardings, None),
               out_shardings=(out_sharding, out_sharding))
  got = fn(sharded_params, batch)
  for g, e in zip(got, expected):
    assert g.sharding.spec == P("data", None, "model"), g.sharding
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)


def _check_axes_tree_and_abstract():
  mesh = partitioning.make_mesh(num_partitions=2)
  axes = {"encoder": {"relpos": ("heads", "relpos_buckets"), "w": P("embed", "mlp")},
          "tasks_prompt": ("tasks", "prompt", "prompt_embed"), "step": None}
  specs = jax.tree_util.tree_map(lambda s: s.spec, partitioning.logical_to_sharding(axes, mesh))
  assert specs == {"encoder": {"relpos": P("model", None), "w": P(None, "model")},
                   "tasks_prompt": P(None, None, None), "step": P()}, specs
  abstract = partitioning.abstract_with_shardings(_boxed_toy_params(), mesh)
  assert abstract["embedding"].shape == (16, 8)
  assert abstract["embedding"].sharding.spec == P("model", None)


def _check_shard_batch_error():
  mesh = partitioning.make_mesh(num_partitions=2)
  try:
    partitioning.shard_batch({"targets": np.zeros((6, 3), np.int32)}, mesh)
  except ValueError as e:
    assert "targets" in str(e) and "(6, 3)" in str(e) and "size 4" in str(e), str(e)
  else:
    raise AssertionError("batch of 6 over data=4 did not raise")


def _check_indivisible_param_error():
  mesh = partitioning.make_mesh(num_partitions=8)
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 6), jnp.float32), ("embed", "mlp"))}
  try:
    partitioning.logical_to_sharding(boxed, mesh)
  except ValueError as e:
    assert "['w']" in str(e) and "(4, 6)" in str(e) and "'mlp'" in str(e), str(e)
  else:
    raise AssertionError("mlp=6 over model=8 did not raise")


def _main():
  results = {}
  for name, fn in sorted(globals().items()):
    if name.startswith("_check_"):
      try:
        fn()
        results[name] = "ok"
      except Exception:  # pylint: disable=broad-except
        results[name] = traceback.format_exc()
  print(_REPORT_MARK + json.dumps(results))


# ---------------------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def device_report():
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve())], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(_REPORT_MARK):
      return json.loads(line[len(_REPORT_MARK):])
  pytest.fail(f"8-device subprocess exited with {proc.returncode} and no report:\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("check", sorted(n for n in dir(sys.modules[__name__]) if n.startswith("_check_")))
def test_on_eight_devices(device_report, check):
  assert device_report.get(check) == "ok", device_report.get(check, f"{check} did not run")


def test_default_rules_match_t5x_and_replicate_peft_axes():
  rules = dict(partitioning.standard_logical_axis_rules())
  expected = {"batch": "data", "vocab": "model", "embed": None, "mlp": "model", "heads": "model", "kv": None,
              "joined_kv": "model", "relpos_buckets": None, "length": None, "prompt": None,
              "prompt_embed": None, "tasks": None, "sources": None}
  assert {k: rules[k] for k in expected} == expected


def test_additional_rules_override():
  rules = partitioning.standard_logical_axis_rules(additional_rules=[("embed", "model"), ("experts", None)])
  assert [r for r in rules if r[0] == "embed"] == [("embed", "model")]
  assert rules[:2] == (("embed", "model"), ("experts", None))
  assert partitioning.logical_to_mesh_axes(("embed", "mlp"), rules) == P("model", None)


def test_rules_are_gin_configurable():
  import gin  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    gin.parse_config("standard_logical_axis_rules.additional_rules = [('prompt', 'model')]")
  try:
    rules = partitioning.standard_logical_axis_rules()
    assert rules[0] == ("prompt", "model")
  finally:
    gin.clear_config()


def test_unknown_logical_name_names_the_path():
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"\['encoder'\]\['w'\].*'emebd'"):
    partitioning.logical_to_sharding({"encoder": {"w": ("emebd", "mlp")}}, mesh)


def test_rank_mismatch_names_the_path():
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 6, 2), jnp.float32), ("embed", "mlp"))}
  with pytest.raises(ValueError, match=r"\['w'\]: 2 logical axes .* shape \(4, 6, 2\)"):
    partitioning.logical_to_sharding(boxed, mesh)


def test_initialize_distributed_is_a_no_op_on_one_host():
  assert partitioning.initialize_distributed() is False
  with pytest.raises(ValueError, match="process_id=3"):
    partitioning.initialize_distributed("localhost:1234", num_processes=2, process_id=3)


def test_host_shard_info_single_process():
  info = partitioning.host_shard_info()
  assert (info.index, info.num_shards) == (0, 1)


if __name__ == "__main__":
  _main()
