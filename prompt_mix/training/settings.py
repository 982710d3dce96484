"""Checks of the binaries' numeric settings, before any work starts.

A bad value (`TRAIN_STEPS=-5`, `'ten'`, `4.5`, `BATCH_SIZE=0`) used to exit 0 having done nothing or end
deep inside JAX or TF; here it is a one-line `ValueError` that names the setting the way the user set it
(the gin macro bound to the parameter, e.g. `TRAIN_STEPS`, else `train.train_steps`):

    ValueError: TRAIN_STEPS must be an integer >= 1, got -5 (set it with --gin.TRAIN_STEPS=...)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

from prompt_mix import gin_utils


def _name(configurable: str, parameter: str) -> str:
  return gin_utils.setting_name(configurable, parameter)


def integer(value: Any, configurable: str, parameter: str, *, minimum: int = 1,
            allow_none: bool = False) -> Optional[int]:
  """`value` as an int >= `minimum` (or None when `allow_none`); ValueError naming the setting otherwise.

  Booleans and floats are refused, even 4.0: a count is written as an integer.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
    name = _name(configurable, parameter)
    none = " or None" if allow_none else ""
    got = f"{value!r}" + (f" (a {type(value).__name__})" if not isinstance(value, numbers.Integral) or
                          isinstance(value, bool) else "")
    raise ValueError(f"{name} must be an integer >= {minimum}{none}, got {got} (set it with --gin.{name}=...)")
  return int(value)


def feature_lengths(value: Any, configurable: str, parameter: str = "task_feature_lengths") -> dict:
  """A `{'inputs': n, 'targets': t}` mapping of positive ints; ValueError naming the setting otherwise."""
  name = _name(configurable, parameter)
  if not isinstance(value, Mapping) or not value:
    raise ValueError(f"{name} must be a dict such as {{'inputs': 256, 'targets': 16}}, got {value!r}")
  for key, length in value.items():
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or int(length) < 1:
      raise ValueError(f"{name}[{key!r}] must be an integer >= 1, got {length!r} (in {name} = {value!r})")
  return dict(value)


def number(value: Any, configurable: str, parameter: str, *, minimum: float = 0.0) -> float:
  """`value` as a finite float >= `minimum` (a learning rate); ValueError naming the setting otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
      or float(value) < minimum:
    name = _name(configurable, parameter)
    raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r} (set it with "
                     f"--gin.{name}=...)")
  return float(value)
