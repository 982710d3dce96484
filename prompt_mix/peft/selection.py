"""The one selection vocabulary of the methods: stacks, layers and sublayers, checked once at construction.

Every method that acts at a subset of the backbone says where with the same three fields:

* `stacks`: any of 'encoder', 'decoder'.
* `layers`: which layers of each selected stack --

  | spelling          | layers                                                          |
  |-------------------|-----------------------------------------------------------------|
  | 'all'             | every layer (the default)                                       |
  | ('first', k)      | layers 0 .. k-1                                                 |
  | ('last', k)       | the last k layers                                               |
  | [i, j, ...]       | those indices; negative ones count from the end of each stack   |

* `sublayers` (or, for a method that only acts in attentions, `attentions`): user-facing names of the
  backbone's sublayer kinds (`plugins.Site.kind`):

  | name               | site kinds selected                                        |
  |--------------------|------------------------------------------------------------|
  | 'attention'        | every attention: encoder self, decoder self, cross         |
  | 'self_attention'   | encoder self-attention and decoder self-attention          |
  | 'cross_attention'  | decoder cross-attention (encoder-decoder attention)        |
  | 'mlp'              | the feed-forward block of every layer                      |

  Combined with `stacks`, 'self_attention' with stacks=('decoder',) is the decoder's self-attention only,
  and stacks=('encoder',) the encoder's.

Ranges are checked per stack when a site is seen (the stacks' depths may differ), with an error naming the
method's field, the stack and its depth.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from prompt_mix.t5 import plugins

LayerSpec = Union[str, Sequence[Any]]

STACKS = plugins.STACKS
ATTENTION_KINDS = plugins.ATTENTION_KINDS
SUBLAYERS = {
    "attention": frozenset(ATTENTION_KINDS),
    "self_attention": frozenset({"attention", "self_attention"}),
    "cross_attention": frozenset({"cross_attention"}),
    "mlp": frozenset({"mlp"}),
}
ATTENTIONS = ("attention", "self_attention", "cross_attention")  # The names of SUBLAYERS that are attentions.
ALL = "all"


def as_tuple(value, what: str) -> Optional[tuple]:
  """A gin list or a single string as a tuple (a delta must stay hashable: it is a module attribute)."""
  if value is None:
    return None
  if isinstance(value, str):
    return (value,)
  try:
    return tuple(value)
  except TypeError:
    raise TypeError(f"{what} must be a sequence, got {value!r}") from None


def check_names(values: Sequence[str], allowed: Sequence[str], what: str, noun: str = "") -> None:
  """Raises naming the first of `values` that is not in `allowed` (and rejects an empty selection)."""
  if not values:
    raise ValueError(f"{what} is empty: select at least one of {tuple(allowed)}")
  for value in values:
    if value not in allowed:
      raise ValueError(f"{what}: unknown {noun + ' ' if noun else ''}{value!r}; choose from {tuple(allowed)}")


def check_stacks(stacks: Any, what: str) -> tuple[str, ...]:
  """`stacks` as a tuple of stack names, checked."""
  stacks = as_tuple(stacks, what)
  check_names(stacks, STACKS, what, "stack")
  return stacks


def site_kinds(sublayers: Sequence[str], what: str, allowed: Sequence[str] = tuple(SUBLAYERS)) -> frozenset:
  """The `Site.kind`s that the user-facing `sublayers` names select (table in the module docstring)."""
  attentions_only = tuple(allowed) == ATTENTIONS
  if attentions_only and "mlp" in (sublayers or ()):
    raise ValueError(f"{what}: unknown attention 'mlp' ('mlp' is not an attention: a method that acts at "
                     f"the MLP says so with its own fields); choose from {tuple(allowed)}")
  check_names(sublayers, allowed, what, "attention" if attentions_only else "sublayer")
  kinds = frozenset()
  for name in sublayers:
    kinds |= SUBLAYERS[name]
  return kinds


def check_layers(spec: LayerSpec, what: str) -> LayerSpec:
  """Validates a layer selection and makes it hashable: 'all', ('first', k), ('last', k) or (i, ...)."""
  if isinstance(spec, str):
    if spec != ALL:
      raise ValueError(f"{what}={spec!r}: expected 'all', ('first', k), ('last', k) or a list of layer "
                       "indices")
    return spec
  spec = as_tuple(spec, what)
  if not spec:
    raise ValueError(f"{what} is empty: use 'all' or a list of layer indices")
  if isinstance(spec[0], str):
    if len(spec) != 2 or spec[0] not in ("first", "last") or not _is_int(spec[1]) or spec[1] < 1:
      raise ValueError(f"{what}={spec!r}: expected ('first', k) or ('last', k) with an int k >= 1")
    return spec
  for layer in spec:
    if not _is_int(layer):
      raise ValueError(f"{what}={spec!r}: layer indices must be ints, got {layer!r}")
  return spec


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def chosen_layers(spec: LayerSpec, num_layers: int, stack: str = "", what: str = "layers") -> frozenset:
  """The layer indices of a stack of `num_layers` that `spec` selects.

  Raises (naming the stack) when ('first'|'last', k) asks for more layers than the stack has or an index
  is out of range.
  """
  if spec == ALL:
    return frozenset(range(num_layers))
  if isinstance(spec[0], str):
    which, k = spec
    if k > num_layers:
      raise ValueError(f"{what}={spec!r}: the {stack} stack has only {num_layers} layers")
    return frozenset(range(k)) if which == "first" else frozenset(range(num_layers - k, num_layers))
  out = set()
  for layer in spec:
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
      raise ValueError(f"{what}={tuple(spec)}: {layer} is out of range for the {stack} stack of "
                       f"{num_layers} layers")
    out.add(index)
  return frozenset(out)


def layer_selected(site: plugins.Site, spec: LayerSpec, what: str = "layers") -> bool:
  """True when `site.layer` is among the layers `spec` selects in `site`'s stack."""
  return site.layer in chosen_layers(spec, site.num_layers, site.stack, what)


def selects(site: plugins.Site, stacks: Sequence[str], layers: LayerSpec, kinds: frozenset,
            what: str = "layers") -> bool:
  """True when a method with these `stacks`, `layers` and site `kinds` acts at the sublayer `site`."""
  return (site.stack in stacks and site.kind in kinds
          and layer_selected(site, layers, what))
