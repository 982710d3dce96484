"""Finding non-finite values (NaN, +-inf) in a tree of arrays, named by leaf, before they are kept.

The trainer checks the state it is about to save (not only the loss of the step before), so a NaN
checkpoint is never written and never called good; restoring and exporting refuse one that an older
version wrote. Errors name each offending leaf with its count:

    peft/encoder/lora/layers_0/query/lora_a: 768 of 768 values are NaN or infinite
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
_MAX_LISTED = 20


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple) -> str:
  """'a/b/0' for a jax key path."""
  return "/".join(_key_name(k) for k in path)


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _device_counts(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
      lambda x: jnp.sum(~jnp.isfinite(x)) if _is_float(x.dtype) else jnp.zeros((), jnp.int32), tree)


def nonfinite_counts(tree: PyTree, prefix: str = "") -> dict[str, tuple[int, int]]:
  """{leaf path: (non-finite count, size)} for the leaves of `tree` that hold a NaN or an infinity.

  Device arrays (sharded, on any number of hosts) are reduced on device: one small transfer. Host
  (numpy) trees are checked on the host. Non-float leaves never count.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    return {}
  if any(isinstance(leaf, jax.Array) for _, leaf in leaves):
    counts = jax.device_get(_device_counts(tree))
    flat_counts = jax.tree_util.tree_leaves(counts)
  else:
    flat_counts = [host_nonfinite_count(leaf) for _, leaf in leaves]
  found = {}
  for (path, leaf), count in zip(leaves, flat_counts):
    if int(count):
      found[prefix + path_name(path)] = (int(count), int(np.size(leaf)))
  return found


def host_nonfinite_count(value: Any) -> int:
  """Non-finite values of one host array (0 for non-float arrays); a float64 sum is the fast path."""
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    return 0
  if array.dtype.name == "bfloat16":
    array = array.astype(np.float32)
  # NaN and infinities propagate through a sum, and float64 cannot overflow summing float32 values.
  if np.isfinite(np.sum(array, dtype=np.float64)):
    return 0
  return int(np.count_nonzero(~np.isfinite(array)))


def describe(found: Mapping[str, tuple[int, int]]) -> str:
  """One line per offending leaf: 'path: n of N values are NaN or infinite' (at most 20, then a count)."""
  items = sorted(found.items())
  lines = [f"  {path}: {count} of {size} values are NaN or infinite" for path, (count, size) in
           items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    lines.append(f"  ... and {len(items) - _MAX_LISTED} more leaves")
  return "\n".join(lines)
