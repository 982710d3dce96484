"""The TensorStore leak workarounds: what they replace gives the same answers and keeps nothing.

Leaks are checked by reference counts (deterministic), not by RSS: a string returned by a leaking
`KvStore.Spec.to_json()` keeps a reference nobody owns. docs/reliability.md has the RSS figures.
"""

import concurrent.futures
import gc
import sys

import jax.numpy as jnp
import pytest
import tensorstore as ts

from prompt_mix.training import checkpointing  # installs the workarounds
from prompt_mix.training import tensorstore_leaks

ORIGINAL_TO_JSON = getattr(ts.KvStore.Spec.to_json, "__wrapped__", ts.KvStore.Spec.to_json)

SPECS = [
    {"driver": "file", "path": "/tmp/run/checkpoints/100.orbax-checkpoint-tmp-3/peft/"},
    {"driver": "file", "path": "/tmp/it's/"},
    {"driver": "file", "path": '/tmp/q"uote/'},
    {"driver": "file", "path": "/tmp/sp ace/tab\t/new\nline/ctl\x01/del\x7f/"},
    {"driver": "file", "path": "/tmp/é/ü/Ã/ÿ/"},  # Non-ASCII, including code points below 256.
    {"driver": "file", "path": "/tmp/模型/emoji😀/"},
    {"driver": "memory", "path": "abc"},
    {"driver": "ocdbt",
     "base": {"driver": "file", "path": "/tmp/d/", "file_io_locking": {"mode": "non_atomic"}},
     "manifest": {"driver": "file", "path": "/tmp/d/"}, "path": "x", "cache_pool": "cache_pool#ocdbt",
     "config": {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100000000}},
    {"driver": "gcs", "bucket": "my-bucket", "path": "runs/a/"},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["driver"] + ":" + s.get("path", "")[:12])
def test_to_json_reads_the_same_dict_as_tensorstore(spec):
  kvstore_spec = ts.KvStore.Spec(spec)
  expected = ORIGINAL_TO_JSON(kvstore_spec)
  assert tensorstore_leaks.to_json_from_repr(kvstore_spec) == expected
  assert kvstore_spec.to_json() == expected
  assert kvstore_spec.to_json(include_defaults=True) == ORIGINAL_TO_JSON(kvstore_spec, include_defaults=True)


def test_to_json_keeps_no_reference_to_what_it_returns():
  assert checkpointing.tensorstore_leaks is tensorstore_leaks
  path = ts.KvStore.Spec({"driver": "file", "path": "/tmp/some/run/"}).to_json()["path"]
  assert path == "/tmp/some/run/"
  assert sys.getrefcount(path) == 2  # `path` and getrefcount's argument.
  assert not tensorstore_leaks.to_json_leaks()


def test_tensorstore_itself_still_leaks_or_nothing_was_replaced():
  """The replacement exists only while TensorStore leaks; a fixed release leaves `to_json` alone."""
  path = ORIGINAL_TO_JSON(ts.KvStore.Spec({"driver": "file", "path": "/tmp/some/run/"}))["path"]
  leaks = sys.getrefcount(path) > 2
  assert tensorstore_leaks.install()["kvstore_spec_to_json"] == leaks


def test_a_save_queries_no_tensorstore_metrics_and_leaks_no_spec_strings(tmp_path, monkeypatch):
  """A checkpoint save neither calls the leaking metric query nor leaves leaked `to_json` results."""
  metric_queries = []
  monkeypatch.setattr(ts, "experimental_collect_matching_metrics",
                      lambda *a, **k: metric_queries.append(a) or [])
  to_json, returned = ts.KvStore.Spec.to_json, []

  def recording_to_json(self, include_defaults=False):
    returned.append(to_json(self, include_defaults=include_defaults))
    return returned[-1]

  monkeypatch.setattr(ts.KvStore.Spec, "to_json", recording_to_json)
  manager = checkpointing.TrainingCheckpointManager(tmp_path / "ckpt", max_to_keep=2)
  for step in (1, 2):
    manager.save(step, {"peft": {"a": jnp.ones((4, 2)) * step, "b": jnp.zeros((3,))},
                        "opt_state": {"v": jnp.zeros((3,))}}, force=True)
  manager.close()
  assert metric_queries == []
  paths = [spec["path"] for spec in returned if str(tmp_path) in spec.get("path", "")]
  assert paths, "Orbax no longer converts the checkpoint's KvStore specs to JSON: this test checks nothing"
  del returned
  # Referenced by the list, the loop variable and getrefcount's argument: nothing else holds them.
  assert [sys.getrefcount(path) for path in paths] == [3] * len(paths)


def test_the_repr_parser_reads_python_literals_of_json_and_rejects_the_rest():
  parse = tensorstore_leaks.parse_python_literal
  assert parse("{\n  'a': [1, 2.5, -3e+10, True, False, None,],\n  'b': {},\n  'c': [],\n}") == {
      "a": [1, 2.5, -3e10, True, False, None], "b": {}, "c": []}
  assert parse(r"'it\'s \\ \n \xc3\xa9 \xf0\x9f\x98\x80'") == "it's \\ \n é 😀"
  for bad in ["{", "{'a' 1}", "[1 2]", "{1: 2}", "print(1)", "[1],", "'é'", "{'a': 1}}"]:
    with pytest.raises(ValueError):
      parse(bad)


class _CyclicGarbage:
  """Garbage whose collection runs Python code: the GC may then switch threads mid-parse, as in Orbax."""

  def __init__(self):
    self.me = self

  def __del__(self):
    sum(range(50))


def test_the_repr_parser_is_safe_from_many_threads_at_once():
  """Orbax converts specs from several threads while the GC runs finalizers; `ast.literal_eval` then fails
  on CPython 3.11 ("AST constructor recursion depth mismatch"): this test fails with it."""
  value = {f"key_{i}": {"a": [1, 2.5, {"b": "x" * 10}], "c": None, "d": True} for i in range(30)}
  text = repr(value)

  def parse_repeatedly(_):
    for _ in range(30):
      for _ in range(50):
        _CyclicGarbage()
      assert tensorstore_leaks.parse_python_literal(text) == value

  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)  # Switch threads as often as possible.
  try:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      list(pool.map(parse_repeatedly, range(32)))
  finally:
    sys.setswitchinterval(interval)
    gc.collect()
