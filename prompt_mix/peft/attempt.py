"""ATTEMPT: attentional mixtures of soft prompts (Asai et al., 2022), as a `Delta` at the encoder input.

For each example, with X [n, d] its frozen token embeddings (before any prompt), the t frozen source
prompts P_1..P_t [m, d] of a prompt library and the trainable target prompt P_target = P_{t+1}:

```
x          = max over the non-padding positions of X                         [d]
p_j        = max over the m positions of P_j,  j = 1..t+1                    [d]
z          = LayerNorm(W_up SiLU(W_down x))                                  [d]
a          = softmax_j(p_j . z / T),  T = d * e by default                   [t+1]
P_instance = P_target + sum_{j=1..t+1} a_j P_j                               [m, d]
```

P_instance is prepended to the encoder input like a prompt-tuning prompt. Variables (paths in the model's
variable tree; `attempt` is this delta's module, created in the encoder's scope):

```
peft/encoder/attempt/target_prompt                       [m, d] or [N, m, d]  ('tasks',) 'prompt','prompt_embed'
peft/encoder/attempt/attention_gate/w_down               [d, r]
peft/encoder/attempt/attention_gate/w_up                 [r, d]
peft/encoder/attempt/attention_gate/layer_norm_{scale,bias} [d]
prompt_library/encoder/attempt/sources                   [t, m, d]  ('sources','prompt','prompt_embed'), frozen
intermediates/encoder/attempt/attention_weights          (a,): a [B, t+1], or [B, m, t+1] per token
```

Candidates are ordered as `source_names` then the target (`candidate_names`). The source prompts are read
from the library when the model is initialized and live in the frozen `prompt_library` collection: the
trainer differentiates `peft` only, and the trainable shapes do not depend on t, so sources can be added to
or removed from the candidate set without retraining anything else.

Ablations (fields of `Attempt`):
  use_target=False       no target prompt: a over the t sources only, P_instance = sum_j a_j P_j.
  constant_attention     a_j = 1/c for the c candidates (no gate G at all).
  source_names=('x',)    a single source prompt.
  per_token              one softmax per prompt position i (the original's `attn_method="token"`):
                         s_{j,i} = P_j[i] . z / T, a_{i,:} = softmax_j(s_{:,i}),
                         P_instance[i] = P_target[i] + sum_j a_{i,j} P_j[i]; the weights are [B, m, c].
  unmasked_pooling       x = max over all n positions, padding embeddings included (the original pads
                         every input to a fixed length and pools over it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix.peft import attempt_gate as gate_lib
from prompt_mix.attempt import interpret
from prompt_mix.attempt import library as library_lib
from prompt_mix.peft import selection
from prompt_mix.peft import tasks
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import plugins

Array = Any

MODULE_NAME = "attempt"  # The delta's module, in the encoder's scope.
SOURCES_COLLECTION = "prompt_library"  # The frozen collection of source prompts.
SOURCES = "sources"  # Its leaf [t, m, d].
SOURCE_AXES = ("sources", "prompt", "prompt_embed")
TARGET = "target_prompt"  # The trainable target prompt(s) in `peft`.
GATE_NAME = gate_lib.GATE_NAME  # The gate's subtree in `peft`.
ATTENTION_WEIGHTS = "attention_weights"  # Sown into `intermediates`.
FROZEN_GATE_COLLECTION = "attempt_frozen"  # G's LayerNorm when `train_gate_layer_norm=False`.
TARGET_CANDIDATE = "target"  # The target's name among the candidates (last).
UNIFORM = "uniform"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Attempt(plugins.Delta):
  """ATTEMPT (single-task) or ATTEMPT-m (`num_tasks=N`) at the encoder input.

  Attributes:
    library_path: the prompt library directory (`library.PromptLibrary`) holding the source prompts and
      the prompt named by `target_init`.
    source_names: the library prompts P_1..P_t mixed in, in this order (may be empty: then ATTEMPT is
      prompt tuning reparameterized as 2 P_target; one name is the single-source ablation).
    prompt_length: m; must equal the library's prompt length.
    target_init: the library prompt that initializes P_target ('mnli' for non-QA targets, 'squad' for QA
      in the paper), or 'uniform' for U(-init_range, init_range). ATTEMPT-m starts every task from it.
    init_range: the range of the uniform init.
    bottleneck: r of the gate G.
    temperature: T of the softmax; None for d * e.
    num_tasks: None for one target prompt [m, d]; N for ATTEMPT-m's [N, m, d], selected per example by the
      batch's `task_ids` (G is shared).
    use_target: False is the 'no target' ablation (softmax over the sources only, no P_target term).
    constant_attention: True is the 'no attention' ablation: uniform a, and no gate.
    per_token: a softmax per prompt position (module docstring).
    unmasked_pooling: pool the input over all positions, padding included (the original's behaviour).
    gate_init_std: std of the normal init of W_down and W_up.
    gate_init: a pre-trained gate G to start from instead of the random init (ATTEMPT's gate transfer):
      any directory `load_gate` reads (an export's `npy/` directory of a run that trained G, e.g. on the
      source tasks; or the original release's `attn_W_down.pt`, `attn_W_up.pt`). W_down and W_up are
      required, the LayerNorm is taken when present. Read whenever the model is initialized; a restored
      checkpoint's gate replaces it.
    train_gate_layer_norm: True (the paper: G's LayerNorm is among the trained parameters, 2rd + 2d) or
      False (the original code: only W_down and W_up train; the LayerNorm keeps its initial values, or
      those `gate_init` loads, in the frozen `attempt_frozen` collection).
  """

  library_path: Optional[str] = None
  source_names: Sequence[str] = ()
  prompt_length: int = 100
  target_init: str = "mnli"
  init_range: float = 0.5
  bottleneck: int = 100
  temperature: Optional[float] = None
  num_tasks: Optional[int] = None
  use_target: bool = True
  constant_attention: bool = False
  per_token: bool = False
  unmasked_pooling: bool = False
  gate_init_std: float = 0.01
  gate_init: Optional[str] = None
  train_gate_layer_norm: bool = True

  def __post_init__(self):
    names = selection.as_tuple(self.source_names, "Attempt.source_names") or ()
    object.__setattr__(self, "source_names", names)
    if self.library_path is not None:
      object.__setattr__(self, "library_path", os.fspath(self.library_path))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"Attempt.source_names lists {duplicates} more than once: {names}")
    if self.prompt_length < 1:
      raise ValueError(f"Attempt.prompt_length must be >= 1, got {self.prompt_length}")
    if not self.use_target and not names:
      raise ValueError("Attempt(use_target=False) needs at least one source prompt: there is nothing to mix")
    if not self.use_target and self.num_tasks is not None:
      raise ValueError(f"Attempt(num_tasks={self.num_tasks}) needs use_target=True: the target prompts are "
                       "the only per-task leaves")
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"Attempt.num_tasks must be None or >= 1, got {self.num_tasks}")
    if self.constant_attention and self.per_token:
      raise ValueError("Attempt: constant_attention and per_token exclude each other (constant attention "
                       "has no scores to compute per token)")
    gate_lib.validate_temperature(self.temperature, "Attempt")
    if self.gate_init is not None:
      object.__setattr__(self, "gate_init", os.fspath(self.gate_init))
      if self.constant_attention:
        raise ValueError(f"Attempt(gate_init={self.gate_init!r}) with constant_attention=True: constant "
                         "attention has no gate G to initialize")
    if self.library_path is None and (names or self.needs_library_target):
      raise ValueError(f"Attempt(source_names={names}, target_init={self.target_init!r}) reads the prompt "
                       "library but Attempt.library_path is not set (bind it, e.g. to %PROMPT_LIBRARY; or "
                       "use target_init='uniform' without sources)")

  @property
  def needs_library_target(self) -> bool:
    return self.use_target and self.target_init != UNIFORM

  @property
  def candidate_names(self) -> tuple[str, ...]:
    """The names of the attention candidates, in the order of the weights' last axis."""
    return self.source_names + ((TARGET_CANDIDATE,) if self.use_target else ())

  def input_rows(self, site: plugins.Site) -> Optional[nn.Module]:
    if site.stack == "encoder" and site.kind == "input":
      return AttemptPrompt(self, name=MODULE_NAME)
    return None

  def write_evaluation(self, means, directory, step):
    """Writes `attention_<step>.json` (the heatmap's table: each task's mean attention over the candidates,
    averaged over the prompt positions for `per_token`) and returns `attention/<task>/<candidate>` scalars.
    """
    by_task = means.get(f"encoder/{MODULE_NAME}/{ATTENTION_WEIGHTS}")
    if not by_task:
      return {}
    candidates = self.candidate_names
    tasks_ = list(by_task)
    table = np.stack([np.asarray(by_task[t]).reshape(-1, len(candidates)).mean(0) for t in tasks_])
    if directory:
      sources = [c for c in candidates if c != TARGET_CANDIDATE]
      interpret.save_attention_table(os.path.join(directory, f"attention_{step}.json"), table, tasks_,
                                     sources)
    return {f"attention/{task}/{name}": float(table[i, j])
            for i, task in enumerate(tasks_) for j, name in enumerate(candidates)}


def load_sources(delta: Attempt, d: int) -> np.ndarray:
  """The source prompts of `delta` from its library: float32 [t, m, d], shapes checked."""
  library = library_lib.PromptLibrary(delta.library_path)
  missing = [n for n in delta.source_names if n not in library]
  if missing:
    raise ValueError(f"{library.manifest_path}: Attempt.source_names {list(missing)} are not in the library "
                     f"(it holds {library.names() or 'no prompts'})")
  stack = library.load_stack(delta.source_names)
  _check_prompt_shape(library, stack.shape[1:], delta, d)
  return stack


def _check_prompt_shape(library: library_lib.PromptLibrary, shape, delta: Attempt, d: int) -> None:
  if tuple(shape) != (delta.prompt_length, d):
    raise ValueError(f"{library.manifest_path}: prompts have shape {tuple(shape)} but "
                     f"Attempt(prompt_length={delta.prompt_length}) on a backbone with d_model={d} needs "
                     f"({delta.prompt_length}, {d})")


def source_collection(delta: Attempt, d: int) -> dict:
  """The `prompt_library` collection that `model.init` builds for `delta`, without running the model.

  Swap it into restored variables to change the candidate set (the `peft` tree does not depend on t).
  """
  if not delta.source_names:
    return {}
  boxed = nn.LogicallyPartitioned(jnp.asarray(load_sources(delta, d)), SOURCE_AXES)
  return {"encoder": {MODULE_NAME: {SOURCES: boxed}}}


class AttemptPrompt(nn.Module):
  """Builds P_instance [B, m, d] from the input's embeddings (module docstring)."""

  delta: Attempt

  def _sources(self, d: int) -> Optional[Array]:
    cfg = self.delta
    if not cfg.source_names:
      return None
    if not self.has_variable(SOURCES_COLLECTION, SOURCES) and not self.is_mutable_collection(SOURCES_COLLECTION):
      raise ValueError(f"{self.scope.path_text}: the variables lack the frozen '{SOURCES_COLLECTION}' "
                       f"collection ({SOURCES_COLLECTION}/encoder/{MODULE_NAME}/{SOURCES}); pass every "
                       "collection that model.init returned, or add attempt.source_collection(delta, d)")
    var = self.variable(SOURCES_COLLECTION, SOURCES,
                        lambda: nn.LogicallyPartitioned(jnp.asarray(load_sources(cfg, d)), SOURCE_AXES))
    sources = jnp.asarray(nn.unbox(var.value), jnp.float32)
    expected = (len(cfg.source_names), cfg.prompt_length, d)
    if sources.shape != expected:
      where = "/".join(p for p in (SOURCES_COLLECTION, self.scope.path_text.strip("/"), SOURCES) if p)
      raise ValueError(f"{where} has shape {sources.shape}; "
                       f"Attempt(source_names={cfg.source_names}, prompt_length={cfg.prompt_length}) with "
                       f"d_model={d} needs {expected}")
    return sources

  def _target_init(self, d: int):
    cfg = self.delta
    if cfg.target_init == UNIFORM:
      return lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -cfg.init_range,
                                                   cfg.init_range)
    library = library_lib.PromptLibrary(cfg.library_path)
    if cfg.target_init not in library:
      raise ValueError(f"{library.manifest_path}: Attempt.target_init={cfg.target_init!r} is not in the "
                       f"library (it holds {library.names() or 'no prompts'}); or use 'uniform'")

    def init(_, shape):
      prompt = library.load(cfg.target_init)
      _check_prompt_shape(library, prompt.shape, cfg, d)
      return jnp.asarray(prompt, jnp.float32).reshape(shape)

    return init

  @nn.compact
  def __call__(self, embedded: Array, mask: Array, ctx: plugins.Context) -> Array:
    """embedded [B, n, d] (frozen token embeddings), mask [B, n] -> P_instance [B, m, d] (float32)."""
    cfg = self.delta
    d = embedded.shape[-1]
    m = cfg.prompt_length
    sources = self._sources(d)  # [t, m, d] or None
    target = None
    if cfg.use_target:
      # Once initialized the library is not read again (it need not exist where a trained model runs).
      init = None if self.has_variable(tasks.PEFT, TARGET) else self._target_init(d)
      table = tasks.peft_param(self, TARGET, init, (m, d), ("prompt", "prompt_embed"), cfg.num_tasks)
      target = tasks.per_example(table, ctx, cfg.num_tasks)  # [B, m, d]
    num_candidates = len(cfg.candidate_names)
    batch = embedded.shape[0]

    if cfg.constant_attention:
      weights = jnp.full((batch, num_candidates), 1.0 / num_candidates, jnp.float32)
    else:
      x = gate_lib.pool_input(embedded, mask, cfg.unmasked_pooling)  # [B, d]
      gate = gate_lib.AttentionGate(cfg.bottleneck, cfg.gate_init_std,
                                    layer_norm_collection=tasks.PEFT if cfg.train_gate_layer_norm
                                    else FROZEN_GATE_COLLECTION, name=GATE_NAME)
      fresh_gate = GATE_NAME not in self.variables.get(tasks.PEFT, {})
      z = gate(x)  # [B, d]
      if cfg.gate_init is not None and fresh_gate and self.is_mutable_collection(tasks.PEFT):
        _initialize_gate(gate, cfg.gate_init)
        z = gate(x)
      temperature = cfg.temperature or gate_lib.default_temperature(d)
      scores = []
      if cfg.per_token:  # s[b, i, j] = P_j[i] . z_b
        if sources is not None:
          scores.append(jnp.einsum("jmd,bd->bmj", sources, z))
        if target is not None:
          scores.append(jnp.einsum("bmd,bd->bm", target, z)[..., None])
      else:  # s[b, j] = max_i P_j[i] . z_b
        if sources is not None:
          scores.append(jnp.einsum("jd,bd->bj", gate_lib.pool_prompts(sources), z))
        if target is not None:
          scores.append(jnp.einsum("bd,bd->b", gate_lib.pool_prompts(target), z)[:, None])
      weights = gate_lib.attention(jnp.concatenate(scores, axis=-1), temperature)
    self.sow(model_lib.INTERMEDIATES, ATTENTION_WEIGHTS, weights)

    # P_instance = [P_target] + sum_j a_j P_j, the target being candidate t+1.
    t = len(cfg.source_names)
    rows = jnp.zeros((batch, m, d), jnp.float32)
    if cfg.per_token:
      if sources is not None:
        rows = rows + jnp.einsum("bmj,jmd->bmd", weights[..., :t], sources)
      if target is not None:
        rows = rows + (1.0 + weights[..., t:t + 1]) * target
    else:
      if sources is not None:
        rows = rows + jnp.einsum("bj,jmd->bmd", weights[:, :t], sources)
      if target is not None:
        rows = rows + (1.0 + weights[:, t, None, None]) * target
    return rows

  def flops(self, counter, site: plugins.Site, tokens: float) -> tuple[int, int]:
    """FLOPs of the gate G, the attention scores and the mixture (`prompt_mix/flops.py`); the sources
    are frozen. Returns the m prepended rows, all of which depend on the trainable leaves."""
    del tokens
    cfg = self.delta
    b, d, m = counter.batch, site.d_model, cfg.prompt_length
    t = len(cfg.source_names)
    where = f"{site.stack}/{self.name}"
    if not cfg.constant_attention:
      r = cfg.bottleneck
      counter.matmul(f"{where}/gate/w_down", "method", 1, b, d, r, 0, True)  # The pooled input is frozen.
      counter.matmul(f"{where}/gate/w_up", "method", 1, b, r, d, b, True)
      if cfg.per_token:
        if t:  # einsum('jmd,bd->bmj', sources, z)
          counter.matmul(f"{where}/scores", "method", 1, b, d, t * m, b, False)
        if cfg.use_target:  # einsum('bmd,bd->bm', target, z)
          counter.matmul(f"{where}/target_score", "method", b, m, d, 1, m, True)
      else:
        if t:  # einsum('jd,bd->bj', pooled sources, z)
          counter.matmul(f"{where}/scores", "method", 1, b, d, t, b, False)
        if cfg.use_target:  # einsum('bd,bd->b', pooled target, z)
          counter.matmul(f"{where}/target_score", "method", b, 1, d, 1, 1, True)
    if t:  # The mixture of the frozen sources; its weights depend unless the attention is constant.
      weights_dep = 0 if cfg.constant_attention else b
      if cfg.per_token:  # einsum('bmj,jmd->bmd')
        counter.matmul(f"{where}/mixture", "method", m, b, t, d, weights_dep, False)
      else:  # einsum('bj,jmd->bmd')
        counter.matmul(f"{where}/mixture", "method", 1, b, t, m * d, weights_dep, False)
    return m, m


# ------------------------------------------------------------------------------------------ outputs
def attention_weights(intermediates: Mapping[str, Any]) -> Array:
  """ATTEMPT's attention weights from the `intermediates` that `loss_fn` / `score_batch` /
  `predict_batch` return: [B, t+1] (or [B, m, t+1] per token), candidates in `Attempt.candidate_names`
  order. Accepts the `intermediates` collection or an aux dict that holds it.
  """
  tree = intermediates
  if model_lib.INTERMEDIATES in tree and "encoder" not in tree:
    tree = tree[model_lib.INTERMEDIATES]
  try:
    sown = tree["encoder"][MODULE_NAME][ATTENTION_WEIGHTS]
  except (KeyError, TypeError):
    found = sorted(model_lib.flatten(tree)) if isinstance(tree, Mapping) else tree
    raise KeyError(f"no ATTEMPT attention weights at encoder/{MODULE_NAME}/{ATTENTION_WEIGHTS} in the "
                   f"intermediates (found {found})") from None
  return sown[0] if isinstance(sown, (tuple, list)) else sown


# ------------------------------------------------------------------------------------------ loading
_GATE_LEAVES = ("w_down", "w_up", "layer_norm_scale", "layer_norm_bias")
# The original release's files (torch.save of the nn.Linear / nn.LayerNorm parameters): Linear weights are
# [out, in], i.e. the transposes of W_down [d, r] and W_up [r, d].
_RELEASE_GATE_FILES = {"w_down": ("attn_W_down.pt", True), "w_up": ("attn_W_up.pt", True),
                       "layer_norm_scale": ("layer_norm_weight.pt", False),
                       "layer_norm_bias": ("layer_norm_bias.pt", False)}


def _gate_node(peft: Mapping[str, Any]) -> Mapping[str, Any]:
  try:
    return peft["encoder"][MODULE_NAME][GATE_NAME]
  except (KeyError, TypeError):
    raise KeyError(f"the peft tree has no encoder/{MODULE_NAME}/{GATE_NAME} subtree (found "
                   f"{sorted(model_lib.flatten(peft))})") from None


def _replace_leaf(old: Any, new: np.ndarray, where: str) -> Any:
  old_value = old.value if isinstance(old, nn.LogicallyPartitioned) else old
  if tuple(old_value.shape) != tuple(new.shape):
    raise ValueError(f"{where}: shape {tuple(new.shape)} does not fit the model's {tuple(old_value.shape)}")
  new = jnp.asarray(new, jnp.float32)
  return old.replace_boxed(new) if isinstance(old, nn.LogicallyPartitioned) else new


def _with_leaf(peft: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(peft)))
  flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


def _read_gate_source(source: Union[str, os.PathLike, Mapping[str, Any]]) -> dict[str, tuple[Any, str]]:
  """{leaf: (array, where)} from a peft tree, a directory of .npy files or the original's .pt files."""
  found = {}
  if isinstance(source, Mapping):
    flat = model_lib.flatten(nn.unbox(source))
    for key, value in flat.items():
      parts = key.split("/")
      if len(parts) >= 2 and parts[-2] == GATE_NAME and parts[-1] in _GATE_LEAVES:
        found[parts[-1]] = (np.asarray(value), f"peft tree key {key}")
      elif len(parts) == 1 and parts[0] in _GATE_LEAVES:
        found[parts[0]] = (np.asarray(value), f"gate subtree key {key}")
    if not found:
      raise KeyError(f"no {GATE_NAME} leaves {_GATE_LEAVES} in the given tree (keys {sorted(flat)})")
    return found
  directory = os.fspath(source)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"gate directory {directory} does not exist")
  for sub in ("", GATE_NAME, os.path.join("encoder", MODULE_NAME, GATE_NAME)):
    for leaf in _GATE_LEAVES:
      file = os.path.join(directory, sub, leaf + ".npy")
      if os.path.exists(file):
        found[leaf] = (np.load(file, allow_pickle=False), file)
    if found:
      return found
  for leaf, (name, transpose) in _RELEASE_GATE_FILES.items():
    file = os.path.join(directory, name)
    if os.path.exists(file):
      array = _read_torch(file)
      found[leaf] = (array.T if transpose else array, file)
  if not found:
    raise FileNotFoundError(
        f"{directory} holds no gate: expected {', '.join(l + '.npy' for l in _GATE_LEAVES)} (here, under "
        f"{GATE_NAME}/ or encoder/{MODULE_NAME}/{GATE_NAME}/) or the original release's "
        f"{', '.join(n for n, _ in _RELEASE_GATE_FILES.values())}")
  return found


def _read_torch(file: str) -> np.ndarray:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {file} needs PyTorch (`pip install torch`)") from None
  value = torch.load(file, map_location="cpu", weights_only=True)
  if not isinstance(value, torch.Tensor):
    raise ValueError(f"{file} holds a {type(value).__name__}, expected a tensor")
  return value.detach().to(torch.float32).cpu().numpy()


def load_gate(peft: Mapping[str, Any], source: Union[str, os.PathLike, Mapping[str, Any]],
              require_layer_norm: bool = False) -> dict:
  """Returns `peft` with the gate G replaced by a pre-trained one (e.g. trained on the source tasks).

  Args:
    peft: the model's `peft` collection (boxed or not).
    source: a `peft` tree of another ATTEMPT run (or its `attention_gate` subtree); a directory of
      `w_down.npy, w_up.npy, layer_norm_scale.npy, layer_norm_bias.npy` (directly, under
      `attention_gate/` or under `encoder/attempt/attention_gate/`, the per-leaf export layout); or a
      directory of the original release (`attn_W_down.pt`, `attn_W_up.pt`, and optionally
      `layer_norm_weight.pt`, `layer_norm_bias.pt`: PyTorch [out, in] weights, transposed here).
    require_layer_norm: raise when the source lacks the LayerNorm (by default the model's is kept, as the
      original does without `--load_layer_norm`).
  """
  found = _read_gate_source(source)
  needed = _GATE_LEAVES if require_layer_norm else ("w_down", "w_up")
  missing = [leaf for leaf in needed if leaf not in found]
  if missing:
    where = sorted({w for _, w in found.values()})
    raise ValueError(f"gate source {source if not isinstance(source, Mapping) else where} lacks {missing}")
  node = _gate_node(peft)
  for leaf, (array, where) in found.items():
    if leaf not in node and leaf.startswith("layer_norm") and not require_layer_norm:
      continue  # A frozen LayerNorm (train_gate_layer_norm=False) is not in peft: Attempt.gate_init loads it.
    if leaf not in node:
      raise KeyError(f"peft encoder/{MODULE_NAME}/{GATE_NAME} has no leaf {leaf!r}" + (
          " (G's LayerNorm is frozen with train_gate_layer_norm=False: load it at initialization with "
          "Attempt.gate_init)" if leaf.startswith("layer_norm") else ""))
    peft = _with_leaf(peft, ("encoder", MODULE_NAME, GATE_NAME, leaf),
                      _replace_leaf(node[leaf], np.asarray(array, np.float32), where))
  return peft


def _initialize_gate(gate: nn.Module, source: str) -> None:
  """Overwrites the leaves `gate` has just created with the pre-trained G of `source` (`gate_init`)."""
  found = _read_gate_source(source)
  missing = [leaf for leaf in ("w_down", "w_up") if leaf not in found]
  if missing:
    raise ValueError(f"Attempt.gate_init={source!r} lacks {missing} (found {sorted(found)})")
  for leaf, (array, where) in found.items():
    collection = tasks.PEFT if leaf.startswith("w_") else gate.layer_norm_collection
    old = gate.get_variable(collection, leaf)
    gate.put_variable(collection, leaf, _replace_leaf(old, np.asarray(array, np.float32), where))


def load_target(peft: Mapping[str, Any], source: Union[str, os.PathLike, np.ndarray],
                task: Optional[int] = None) -> dict:
  """Returns `peft` with the target prompt(s) replaced.

  Args:
    source: an array or a `.npy` / torch `.pt` file (e.g. the original release's `prefix_embeddings.pt`):
      [m, d] (copied into every task of ATTEMPT-m, or into row `task`), or [N, m, d] for all N tasks.
    task: with ATTEMPT-m and an [m, d] source, the one task row to replace.
  """
  if isinstance(source, np.ndarray):
    array, where = source.astype(np.float32), "the given array"
  else:
    file = os.fspath(source)
    if file.endswith(".npy"):
      if not os.path.exists(file):
        raise FileNotFoundError(f"target prompt file {file} does not exist")
      array = np.load(file, allow_pickle=False).astype(np.float32)
    elif os.path.exists(file):
      array = _read_torch(file)
    else:
      raise FileNotFoundError(f"target prompt file {file} does not exist")
    where = file
  try:
    old = peft["encoder"][MODULE_NAME][TARGET]
  except (KeyError, TypeError):
    raise KeyError(f"the peft tree has no encoder/{MODULE_NAME}/{TARGET} (found "
                   f"{sorted(model_lib.flatten(peft))})") from None
  old_value = np.asarray(old.value if isinstance(old, nn.LogicallyPartitioned) else old)
  if old_value.ndim == 3 and array.ndim == 2:
    if task is None:
      new = np.broadcast_to(array, (old_value.shape[0],) + array.shape)
    else:
      if not 0 <= task < old_value.shape[0]:
        raise ValueError(f"task {task} is out of range for {old_value.shape[0]} target prompts")
      new = old_value.copy()
      if array.shape != old_value.shape[1:]:
        raise ValueError(f"{where}: shape {array.shape} does not fit the model's {old_value.shape[1:]}")
      new[task] = array
  else:
    if task is not None:
      raise ValueError(f"task={task} needs ATTEMPT-m target prompts [N, m, d] and an [m, d] source; the "
                       f"model's are {old_value.shape}, the source's {array.shape}")
    new = array
  return _with_leaf(peft, ("encoder", MODULE_NAME, TARGET), _replace_leaf(old, np.asarray(new), where))
