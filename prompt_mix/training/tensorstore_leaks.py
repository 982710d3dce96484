"""Stops two leaks of TensorStore's Python bindings that Orbax hits on every checkpoint save.

Both leaks keep Python objects that nothing references, so a long run's RSS creeps with every save
(docs/reliability.md, "Long runs stay flat"; `tools/soak.py` measures the slope). `install()` applies both
workarounds once per process; `training.checkpointing` calls it on import.

1. `tensorstore.experimental_collect_matching_metrics` leaks the objects it returns (about 3 KB per call,
   growing with the counters). Orbax calls it before and after every item it writes, only to log a raw
   write throughput. `install` replaces Orbax's `get_tensorstore_raw_bytes` with 0: the logged raw
   throughput reads 0, nothing else changes.

2. `tensorstore.KvStore.Spec.to_json()` (TensorStore 0.1.86, the newest release) keeps one extra reference
   to every value it converts from C++ JSON to Python, so every string of the returned spec (the checkpoint
   path among them) is never freed: about 0.26 KB per call for a short path, plus the length of the path.
   Orbax's OCDBT spec builder calls it once per array it writes and twice more per save to merge the
   per-process files, so a save of N arrays keeps about (N + 2) x (0.25 KB + the step directory's path).
   The spec's `repr`, printed by TensorStore's C++ code as a Python literal, does not leak: when the leak is
   detected (`to_json_leaks`), `install` replaces `to_json()` by one that parses the `repr` into the same
   dict (`to_json_from_repr`). `to_json(include_defaults=True)`, which Orbax does not call, still goes to
   TensorStore. Once a TensorStore release stops leaking, the probe sees that and nothing is replaced.

`PROMPT_MIX_TENSORSTORE_LEAK_FIXES=0` in the environment leaves TensorStore and Orbax untouched (to compare,
or if a replacement ever misbehaves).
"""

from __future__ import annotations

import codecs
import os
import re
import sys
from typing import Any

from absl import logging
import tensorstore as ts

ENV_SWITCH = "PROMPT_MIX_TENSORSTORE_LEAK_FIXES"
_REPR_PREFIX = "KvStore.Spec("
_installed: dict[str, bool] | None = None


def to_json_leaks() -> bool:
  """Whether `KvStore.Spec.to_json()` keeps a reference to the values it returns (probe: one call)."""
  value = ts.KvStore.Spec({"driver": "memory", "path": "prompt_mix_probe/"}).to_json()["path"]
  # Referenced by `value` and by getrefcount's argument; a third reference is the leaked one.
  return sys.getrefcount(value) > 2


_TOKEN = re.compile(r"""\s*(?:
    (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>True|False|None)
  | (?P<punct>[{}\[\]:,])
)""", re.VERBOSE | re.DOTALL)
_NAMES = {"True": True, "False": False, "None": None}


def _tokens(text: str) -> list[tuple[str, str]]:
  """[(kind, text)] of a Python literal of JSON; ValueError at anything else."""
  tokens, position = [], 0
  while position < len(text.rstrip()):
    match = _TOKEN.match(text, position)
    if match is None:
      raise ValueError(f"unexpected text at {position}: {text[position:position + 20]!r}")
    tokens.append((match.lastgroup, match.group(match.lastgroup)))
    position = match.end()
  return tokens


def _string(token: str) -> str:
  """A quoted literal's value: ASCII escapes, and each non-ASCII byte of the UTF-8 text as `\\xNN`."""
  body = token[1:-1].encode("ascii")  # UnicodeError if the printer ever emits raw non-ASCII text.
  return codecs.decode(body, "unicode_escape").encode("latin-1").decode("utf-8")


def parse_python_literal(text: str) -> Any:
  """The JSON value printed by TensorStore as a Python literal (dicts, lists, strings, numbers, True,
  False, None).

  Not `ast.literal_eval`: CPython 3.11's AST construction is not thread-safe (concurrent calls fail with
  "AST constructor recursion depth mismatch"), and Orbax builds specs from several threads at once.

  Raises:
    ValueError: `text` is not such a literal.
  """
  tokens = _tokens(text)
  position = 0

  def take(kind=None, value=None):
    nonlocal position
    if position >= len(tokens):
      raise ValueError("the literal ends early")
    token = tokens[position]
    if (kind and token[0] != kind) or (value and token[1] != value):
      raise ValueError(f"expected {value or kind}, found {token[1]!r}")
    position += 1
    return token

  def each_until(bracket, read_one):
    """Calls `read_one` per comma-separated item up to `bracket` (a trailing comma is allowed)."""
    while tokens[position:position + 1] != [("punct", bracket)]:
      read_one()
      if tokens[position:position + 1] != [("punct", bracket)]:
        take("punct", ",")
    take()

  def value():
    kind, token = take()
    if kind == "string":
      return _string(token)
    if kind == "number":
      return float(token) if any(c in token for c in ".eE") else int(token)
    if kind == "name":
      return _NAMES[token]
    if token == "{":
      result = {}

      def member():
        key = _string(take("string")[1])
        take("punct", ":")
        result[key] = value()

      each_until("}", member)
      return result
    if token == "[":
      items = []
      each_until("]", lambda: items.append(value()))
      return items
    raise ValueError(f"unexpected {token!r}")

  result = value()
  if position != len(tokens):
    raise ValueError(f"text after the literal: {tokens[position][1]!r}")
  return result


def to_json_from_repr(spec: "ts.KvStore.Spec") -> Any:
  """`spec.to_json()` read from `repr(spec)`, which leaks nothing.

  Raises:
    ValueError: the repr is not `KvStore.Spec(<python literal>)` with byte-escaped strings (another
      TensorStore printer); the caller then uses TensorStore's own `to_json`.
  """
  text = repr(spec)
  if not (text.startswith(_REPR_PREFIX) and text.endswith(")")):
    raise ValueError(f"unexpected KvStore.Spec repr: {text[:80]!r}")
  try:
    return parse_python_literal(text[len(_REPR_PREFIX):-1])
  except UnicodeError as e:
    raise ValueError(f"KvStore.Spec repr has a string that is not byte-escaped UTF-8: {e}") from e


def _stop_metric_leak() -> bool:
  """Replaces Orbax's per-save TensorStore counter query with 0 (leak 1); True when it was found."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  except ImportError:  # Another Orbax layout: nothing to replace.
    return False
  if not hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
    return False

  def no_raw_bytes(direction=None) -> int:
    del direction
    return 0

  tensorstore_utils.get_tensorstore_raw_bytes = no_raw_bytes
  return True


def _stop_to_json_leak() -> bool:
  """Replaces `KvStore.Spec.to_json` when it leaks (leak 2); True when it was replaced."""
  if not to_json_leaks():
    return False
  original = ts.KvStore.Spec.to_json
  probe = ts.KvStore.Spec({"driver": "file", "path": "/prompt_mix/é probe/"})
  try:
    if to_json_from_repr(probe) != original(probe):
      raise ValueError("the repr reads back differently")
  except ValueError as e:
    logging.warning("TensorStore's KvStore.Spec.to_json leaks, but its repr cannot stand in (%s): each "
                    "checkpoint save keeps about 0.3 KB per array", e)
    return False

  def to_json(self, include_defaults: bool = False):
    if not include_defaults:
      try:
        return to_json_from_repr(self)
      except ValueError:
        pass
    return original(self, include_defaults=include_defaults)

  to_json.__doc__ = original.__doc__
  to_json.__wrapped__ = original
  ts.KvStore.Spec.to_json = to_json
  return True


def install() -> dict[str, bool]:
  """Applies both workarounds (idempotent); returns which ones took effect in this process."""
  global _installed
  if _installed is None and os.environ.get(ENV_SWITCH, "1") == "0":
    logging.info("%s=0: TensorStore's leaks are not worked around", ENV_SWITCH)
    _installed = {"metric_query": False, "kvstore_spec_to_json": False}
  if _installed is None:
    _installed = {"metric_query": _stop_metric_leak(), "kvstore_spec_to_json": _stop_to_json_leak()}
  return dict(_installed)
