"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, the values and the FFN's hidden activation.

```
k' = l_k * (x W_k)          the output of every attention's `key` projection      [h*d_kv]
v' = l_v * (x W_v)          the output of every attention's `value` projection    [h*d_kv]
y  = (l_ff * h) W_o         the input of every FFN's `wo` (its hidden activation) [d_ff]
```

Each vector starts at ones, so a fresh (IA)^3 is the backbone. Scaling an output is the wrapping
`projection` hook (`(x, y, ctx) -> l * y`); scaling an input is the `projection_input` hook
(`(x, ctx) -> l * x`): `feedforward` names the projections whose input is scaled, as HF PEFT's
`IA3Config.feedforward_modules` (PEFT's T5 default: `target_modules=['k', 'v', 'wo']`,
`feedforward_modules=['wo']`, which is this default). The vectors take their sizes from the site. Leaves:

```
peft/encoder/layers_i/attention/{key,value}/ia3/scale                          [h*d_kv]  (None,)
peft/decoder/layers_i/{self_attention,encoder_decoder_attention}/{key,value}/ia3/scale
peft/{encoder,decoder}/layers_i/mlp/wo/ia3/scale                                [d_ff]    (None,)
```

Parameters per task: (2 h d_kv) per attention + d_ff per FFN (T5-base: 2*768*36 + 3072*24 = 129,024).
With `num_tasks=N` every vector gains a leading `tasks` axis and each example uses its task's. It exports
to HF PEFT's `IA3` adapter (`ia3_l` weights `[out, 1]`, or `[1, in]` for feedforward modules) and reads
one back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from prompt_mix import export_formats
from prompt_mix.peft import selection
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.peft import torch_compat
from prompt_mix.t5 import hf_checkpoint
from prompt_mix.t5 import plugins

Array = Any

PROJECTIONS = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")
_PEFT_PREFIX = "base_model.model."
_IA3_LEAF = "ia3_l"


class Scale(nn.Module):
  """`l * y` of the projection it wraps (or `l * x` of its input, `feedforward`), l [features] from ones.

  Attributes:
    features: the size of what is scaled (the site's `out_features`, or `in_features` for feedforward).
    feedforward: scale the projection's input (`projection_input` hook) rather than its output.
    num_tasks: None, or N for one vector per task.
  """

  features: int
  feedforward: bool = False
  num_tasks: Optional[int] = None

  @nn.compact
  def __call__(self, *args) -> Array:
    """`(x [B, n, in], ctx) -> l * x`, or `(x, y [B, n, out], ctx) -> l * y`."""
    *tensors, ctx = args
    target = tensors[-1]
    scale = tasks_lib.peft_param(self, "scale", torch_compat.ones, (self.features,), (None,), self.num_tasks)
    scale = jnp.asarray(scale, target.dtype)
    if self.num_tasks is not None:
      scale = tasks_lib.per_example(scale, ctx, self.num_tasks)[:, None, :]
    return target * scale

  def flops(self, counter, site: plugins.Site, rows: float, *deps: float) -> float:
    """An elementwise scale adds no matmul (`prompt_mix/flops.py`); every row it scales now depends."""
    del counter, site, deps
    return rows


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IA3(plugins.Delta):
  """(IA)^3: learned rescaling vectors (module docstring).

  Attributes:
    targets: the projections rescaled (`PROJECTIONS`); default the keys, the values and the FFN's `wo`.
    feedforward: those of `targets` whose input is rescaled (PEFT's `feedforward_modules`); the others
      have their output rescaled.
    stacks: 'encoder' and/or 'decoder'.
    attentions: for attention projections, which attentions ('attention', 'self_attention',
      'cross_attention'; `selection`).
    layers: 'all', ('first', k), ('last', k) or layer indices (`selection`).
    num_tasks: None, or N for a bank of N sets of vectors selected per example by `task_ids`.
    name: the module's name under each projection (`.../key/<name>/scale`).
  """

  targets: Sequence[str] = ("key", "value", "wo")
  feedforward: Sequence[str] = ("wo",)
  stacks: Sequence[str] = selection.STACKS
  attentions: Sequence[str] = ("attention",)
  layers: selection.LayerSpec = selection.ALL
  num_tasks: Optional[int] = None
  name: str = "ia3"

  def __post_init__(self):
    for field in ("targets", "feedforward", "attentions"):
      object.__setattr__(self, field, selection.as_tuple(getattr(self, field), f"IA3.{field}") or ())
    selection.check_names(self.targets, PROJECTIONS, "IA3.targets")
    for name in self.feedforward:
      if name not in self.targets:
        raise ValueError(f"IA3.feedforward names {name!r}, which is not among IA3.targets {self.targets}")
    object.__setattr__(self, "stacks", selection.check_stacks(self.stacks, "IA3.stacks"))
    object.__setattr__(self, "layers", selection.check_layers(self.layers, "IA3.layers"))
    object.__setattr__(self, "_attention_kinds", selection.site_kinds(self.attentions, "IA3.attentions",
                                                                      selection.ATTENTIONS))
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"IA3.num_tasks must be None or >= 1, got {self.num_tasks}")

  def acts_at(self, site: plugins.Site) -> bool:
    if site.projection not in self.targets or site.stack not in self.stacks or site.kind == "logits":
      return False
    if site.kind in plugins.ATTENTION_KINDS and site.kind not in self._attention_kinds:
      return False
    return selection.layer_selected(site, self.layers, "IA3.layers")

  def projection(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.acts_at(site) or site.projection in self.feedforward:
      return None
    return Scale(site.out_features, False, self.num_tasks, name=self.name)

  def projection_input(self, site: plugins.Site) -> Optional[nn.Module]:
    if not self.acts_at(site) or site.projection not in self.feedforward:
      return None
    return Scale(site.in_features, True, self.num_tasks, name=self.name)

  # ------------------------------------------------------------------------------------------ HF PEFT
  peft_types = ("IA3",)

  def to_peft(self, leaves, config):
    """PEFT's `IA3`: `<module>.ia3_l` of shape [out, 1], or [1, in] for a feedforward module."""
    modules = _hf_modules(config)
    pattern = re.compile(f"^(.*)/{re.escape(self.name)}/scale$")
    export_formats.expect_leaves(leaves, [k for k in leaves if pattern.match(k)], self)
    state, targets, feedforward = {}, set(), set()
    for path, value in leaves.items():
      ours = pattern.match(path).group(1)
      if ours not in modules:
        raise plugins.ExportError(f"{path}: no HF T5 module corresponds to {ours}")
      module = modules[ours]
      short = module.rsplit(".", 1)[-1]
      targets.add(short)
      is_ff = ours.rsplit("/", 1)[-1] in self.feedforward
      if is_ff:
        feedforward.add(short)
      value = np.asarray(value, np.float32)
      state[f"{_PEFT_PREFIX}{module}.{_IA3_LEAF}"] = value[None, :] if is_ff else value[:, None]
    adapter = export_formats.adapter_config(
        "IA3", target_modules=sorted(targets), feedforward_modules=sorted(feedforward),
        fan_in_fan_out=False, init_ia3_weights=True, modules_to_save=None)
    return adapter, state

  @classmethod
  def from_peft(cls, adapter, tensors, config, name=None, approximate=False):
    """PEFT's `IA3` adapter of a T5 -> the delta and its `peft` tree (needs the backbone's `config`)."""
    del approximate
    if config is None:
      raise ValueError("an IA3 adapter is read with the backbone's config: load_peft_adapter(dir, config)")
    inverse = {hf: ours for ours, hf in _hf_modules(config).items()}
    feedforward = set(adapter.get("feedforward_modules") or ())
    flat, targets, ff = {}, set(), set()
    for key, value in tensors.items():
      module = re.sub(rf"\.{_IA3_LEAF}(\.[A-Za-z0-9_]+)?$", "", key).removeprefix(_PEFT_PREFIX)
      if module not in inverse:
        raise ValueError(f"{key}: not an IA3 vector of a T5 module of this backbone")
      ours = inverse[module]
      projection = ours.rsplit("/", 1)[-1]
      targets.add(projection)
      if module.rsplit(".", 1)[-1] in feedforward:
        ff.add(projection)
      flat[(*ours.split("/"), name or "ia3", "scale")] = np.asarray(value, np.float32).reshape(-1)
    stacks = tuple(s for s in plugins.STACKS if any(k[0] == s for k in flat))
    delta = cls(targets=tuple(sorted(targets)), feedforward=tuple(sorted(ff)), stacks=stacks,
                name=name or "ia3")
    return delta, flax.traverse_util.unflatten_dict(flat)


def _hf_modules(config: Any) -> dict[str, str]:
  """{our projection path: its HF T5 module name} for the backbone of `config`."""
  return {ours.rsplit("/", 1)[0]: hf.rsplit(".", 1)[0]
          for hf, ours, _ in hf_checkpoint.hf_key_map(config) if ours.endswith("/kernel")}
