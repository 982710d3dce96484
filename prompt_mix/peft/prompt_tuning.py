"""Prompt tuning (Lester et al., 2021): m trainable rows prepended to a stack's input embeddings.

```
peft/encoder/prompt_tuning/prompt        [m, d]     ('prompt', 'prompt_embed')
peft/encoder/prompt_tuning/prompt        [N, m, d]  ('tasks', 'prompt', 'prompt_embed')   (a bank of N)
```

The prompt acts through the `input_rows` hook at `Site(stack, -1, 'input')`: the backbone prepends the
rows `[B, m, d]` to the token embeddings `[B, n, d]` and grows the masks by m ones, so the encoder
self-attention and the decoder's cross-attention see the prompt positions (which also take part in the
relative position bias, as in T5X's prompt tuning). Trainable parameters per task: m * d (76,800 for
T5-base at m = 100).

Initializations (`init`):

* 'uniform': U(-0.5, 0.5), Lester et al.'s random baseline.
* 'vocab': rows of the frozen token embedding, sampled without replacement among the first
  `vocab_population` (5,000) tokens, or fewer if the vocabulary is smaller (with replacement only when
  m exceeds that population).
* 'class_labels': row i is the mean of the embeddings of the subword pieces of `class_labels[i]`, encoded
  with `vocabulary`; the remaining rows are sampled as for 'vocab'.
* 'file': a `.npy` file (SPoT-style transfer) of shape [m, d] (every task starts from it) or [N, m, d]
  (one row per task of a bank, N = num_tasks).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_mix import export_formats
from prompt_mix.peft import tasks as tasks_lib
from prompt_mix.t5 import plugins

Array = Any
Initializer = Callable[[Array, tuple[int, ...]], Array]

INITS = ("uniform", "vocab", "class_labels", "file")
STACKS = ("encoder", "decoder")
PROMPT_AXES = ("prompt", "prompt_embed")
VOCAB_POPULATION = 5000  # Lester et al. sample among the 5,000 most frequent SentencePiece tokens.


# ------------------------------------------------------------------------------------------ initializers
def uniform_init(scale: float = 0.5) -> Initializer:
  """U(-scale, scale) of the requested shape."""

  def init(rng, shape):
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)

  return init


def vocab_init(embedding: Array, population: int = VOCAB_POPULATION) -> Initializer:
  """Rows of `embedding [V, d]` sampled among its first min(population, V) rows.

  Sampling is without replacement unless m exceeds the population. The requested shape is [m, d].
  """
  population = min(int(population), int(embedding.shape[0]))
  if population < 1:
    raise ValueError(f"vocab_init: population must be >= 1, got {population}")

  def init(rng, shape):
    m, d = shape
    if d != embedding.shape[1]:
      raise ValueError(f"vocab_init: prompt width {d} differs from the embedding width {embedding.shape[1]}")
    index = jax.random.choice(rng, population, (m,), replace=m > population)
    return jnp.take(jnp.asarray(embedding, jnp.float32), index, axis=0)

  return init


@functools.lru_cache(maxsize=8)
def _sentencepiece(path: str):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"PromptTuning vocabulary: no SentencePiece model at {path}")
  return sentencepiece.SentencePieceProcessor(model_file=path)


def encode_label(vocabulary: Any, label: str) -> list[int]:
  """Token ids of `label` with a `seqio.Vocabulary`-like object (`encode(str) -> list[int]`) or a path
  to a SentencePiece model (no EOS is added, as `seqio.SentencePieceVocabulary.encode`)."""
  if isinstance(vocabulary, (str, os.PathLike)):
    vocabulary = _sentencepiece(os.fspath(vocabulary))
  encode = getattr(vocabulary, "encode", None)
  if encode is None:
    raise TypeError(f"PromptTuning vocabulary must have encode(str) -> list[int] or be a SentencePiece "
                    f"model path, got {type(vocabulary).__name__}")
  return [int(i) for i in np.asarray(encode(label)).reshape(-1)]


def label_embeddings(embedding: Array, labels: Sequence[str], vocabulary: Any) -> Array:
  """[len(labels), d]: the mean of each label's subword embeddings (rows of `embedding [V, d]`)."""
  rows = []
  for label in labels:
    ids = encode_label(vocabulary, label)
    if not ids:
      raise ValueError(f"PromptTuning class label {label!r} encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < embedding.shape[0]]
    if bad:
      raise ValueError(f"PromptTuning class label {label!r} encodes to ids {ids}; {bad} are outside the "
                       f"embedding's vocabulary of {embedding.shape[0]}")
    rows.append(jnp.mean(jnp.take(jnp.asarray(embedding, jnp.float32), jnp.asarray(ids), axis=0), axis=0))
  return jnp.stack(rows)


def class_label_init(embedding: Array, labels: Sequence[str], vocabulary: Any,
                     population: int = VOCAB_POPULATION) -> Initializer:
  """Rows 0..k-1: the labels' mean subword embeddings; rows k..m-1: sampled as `vocab_init`."""
  sample = vocab_init(embedding, population)

  def init(rng, shape):
    if len(labels) > shape[0]:
      raise ValueError(f"PromptTuning: {len(labels)} class labels do not fit a prompt of length {shape[0]}")
    prompt = sample(rng, shape)
    return prompt.at[:len(labels)].set(label_embeddings(embedding, labels, vocabulary))

  return init


def load_prompt_file(path: Union[str, os.PathLike], length: int, width: int,
                     num_tasks: Optional[int]) -> np.ndarray:
  """Reads a `.npy` prompt: [m, d], or [N, m, d] for a bank of N = num_tasks; float32."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"PromptTuning init file {path} does not exist")
  value = np.load(path)
  accepted = [(length, width)] + ([(num_tasks, length, width)] if num_tasks else [])
  if tuple(value.shape) not in accepted:
    expected = " or ".join(f"[{', '.join(map(str, s))}]" for s in accepted)
    raise ValueError(f"PromptTuning init file {path} holds shape {list(value.shape)}, expected {expected} "
                     f"(m={length}, d={width}" + (f", N=num_tasks={num_tasks})" if num_tasks else ")"))
  return value.astype(np.float32)


# ------------------------------------------------------------------------------------------ module
class PromptRows(nn.Module):
  """The prompt of one stack: returns its rows per example.

  Attributes:
    delta: the `PromptTuning` configuration.
  """

  delta: "PromptTuning"

  @nn.compact
  def __call__(self, embedded: Array, mask: Array, ctx: plugins.Context) -> Array:
    """embedded [B, n, d], mask [B, n] -> rows [B, m, d] (each example's task prompt)."""
    delta = self.delta
    m, d = delta.length, embedded.shape[-1]
    num_tasks = delta.num_tasks
    if self.has_variable(tasks_lib.PEFT, "prompt"):  # Initialized: the file need not exist any more.
      init = None
    elif delta.init == "file":
      value = load_prompt_file(delta.init_file, m, d, num_tasks)
      if value.ndim == 3:  # One prompt per task: declare the whole [N, m, d] leaf at once.
        prompt = tasks_lib.peft_param(self, "prompt", lambda rng, shape: jnp.asarray(value), value.shape,
                                      ("tasks",) + PROMPT_AXES)
        return tasks_lib.per_example(prompt, ctx, num_tasks)
      init = lambda rng, shape: jnp.asarray(value)
    else:
      init = delta.initializer(ctx.embedding)
    prompt = tasks_lib.peft_param(self, "prompt", init, (m, d), PROMPT_AXES, num_tasks)
    return tasks_lib.per_example(prompt, ctx, num_tasks)

  def flops(self, counter, site: plugins.Site, tokens: float) -> tuple[int, int]:
    """No matmul (`prompt_mix/flops.py`); the m prepended rows are trainable."""
    del counter, site, tokens
    return self.delta.length, self.delta.length


# ------------------------------------------------------------------------------------------ delta
@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptTuning(plugins.Delta):
  """Prompt tuning: a trainable prompt P [m, d] prepended to a stack's input embeddings.

  Attributes:
    length: m, the number of prompt rows.
    stack: 'encoder' (Lester et al.) or 'decoder'.
    init: 'uniform', 'vocab', 'class_labels' or 'file' (module docstring).
    class_labels: the label strings for init='class_labels' (at most m).
    vocabulary: for init='class_labels': a `seqio.Vocabulary`-like object with `encode(str) -> list[int]`,
      or the path of a SentencePiece model (gin-bindable as a string).
    init_file: for init='file': a `.npy` path of shape [m, d] or [num_tasks, m, d].
    num_tasks: None for one prompt, N for a bank `[N, m, d]` gathered per example by `task_ids`.
    vocab_population: 'vocab' / 'class_labels' sample among the first this-many tokens.
    name: the scope name of the prompt (`peft/<stack>/<name>/prompt`); distinct names let several
      prompts act on one stack.
  """

  length: int = 100
  stack: str = "encoder"
  init: str = "vocab"
  class_labels: Sequence[str] = ()
  # Excluded from equality and hashing: seqio vocabularies define __eq__ without __hash__.
  vocabulary: Any = dataclasses.field(default=None, compare=False)
  init_file: Optional[str] = None
  num_tasks: Optional[int] = None
  vocab_population: int = VOCAB_POPULATION
  name: str = "prompt_tuning"

  def __post_init__(self):
    # Gin hands sequences over as lists; the delta must stay hashable (it is a module attribute).
    labels = (self.class_labels,) if isinstance(self.class_labels, str) else tuple(self.class_labels or ())
    object.__setattr__(self, "class_labels", labels)
    if self.init_file is not None:
      object.__setattr__(self, "init_file", os.fspath(self.init_file))
    if not isinstance(self.length, int) or self.length < 1:
      raise ValueError(f"PromptTuning.length must be a positive int, got {self.length!r}")
    if self.stack not in STACKS:
      raise ValueError(f"PromptTuning.stack must be one of {STACKS}, got {self.stack!r}")
    if self.init not in INITS:
      raise ValueError(f"PromptTuning.init must be one of {INITS}, got {self.init!r}")
    if self.num_tasks is not None and self.num_tasks < 1:
      raise ValueError(f"PromptTuning.num_tasks must be None or >= 1, got {self.num_tasks}")
    if self.init == "class_labels":
      if not labels:
        raise ValueError("PromptTuning(init='class_labels') needs class_labels")
      if self.vocabulary is None:
        raise ValueError("PromptTuning(init='class_labels') needs a vocabulary (an object with encode(), "
                         "or a SentencePiece model path)")
      if len(labels) > self.length:
        raise ValueError(f"PromptTuning: {len(labels)} class labels {labels} do not fit length={self.length}")
    if self.init == "file" and not self.init_file:
      raise ValueError("PromptTuning(init='file') needs init_file (a .npy path)")

  def initializer(self, embedding: Array) -> Initializer:
    """`init(rng, [m, d])` for the non-file inits, given the frozen embedding `[V, d]`."""
    if self.init == "uniform":
      return uniform_init(0.5)
    if self.init == "vocab":
      return vocab_init(embedding, self.vocab_population)
    if self.init == "class_labels":
      return class_label_init(embedding, self.class_labels, self.vocabulary, self.vocab_population)
    raise ValueError(f"PromptTuning.initializer: init={self.init!r} has no rng initializer")

  def input_rows(self, site: plugins.Site) -> Optional[nn.Module]:
    if site.stack != self.stack or site.kind != "input":
      return None
    return PromptRows(self, name=self.name)

  def param_count(self, d_model: int) -> int:
    """Trainable parameters: m * d per task (times N for a bank)."""
    return self.length * d_model * (self.num_tasks or 1)

  # ------------------------------------------------------------------------------------------ HF PEFT
  # PEFT's seq2seq PROMPT_TUNING prepends `num_virtual_tokens` rows to the encoder input embeddings and m
  # ones to the encoder mask; P_TUNING saves its encoder's output table, read the same way.
  peft_types = ("PROMPT_TUNING", "P_TUNING")

  def to_peft(self, leaves, config):
    """PROMPT_TUNING with `num_transformer_submodules=1`: the table is exactly our `[m, d]` prompt."""
    if self.stack != "encoder":
      raise plugins.ExportError(
          f"{self!r} prepends rows to the decoder input: HF PEFT's seq2seq PROMPT_TUNING prepends virtual "
          "tokens to the encoder input only (PeftModelForSeq2SeqLM.forward uses the first "
          "num_virtual_tokens rows of its table; the decoder half of a num_transformer_submodules=2 table "
          "is never used), so no PEFT adapter represents it; no adapter written")
    key = f"encoder/{self.name}/prompt"
    export_formats.expect_leaves(leaves, [key], self)
    prompt = np.asarray(leaves[key])
    if prompt.shape != (self.length, config.emb_dim):
      raise ValueError(f"{key}: shape {list(prompt.shape)}, expected [{self.length}, {config.emb_dim}] "
                       "(length, d_model)")
    adapter = export_formats.adapter_config(
        "PROMPT_TUNING", num_virtual_tokens=self.length, token_dim=config.emb_dim,
        # One submodule: the table is exactly our [m, d] prompt, prepended to the encoder input. (PEFT's
        # seq2seq default, 2, adds m rows that its seq2seq forward never reads.)
        num_transformer_submodules=1, num_attention_heads=config.num_heads,
        num_layers=config.num_encoder_layers, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
        tokenizer_name_or_path=None, tokenizer_kwargs=None, modules_to_save=None)
    return adapter, {export_formats.PEFT_PROMPT_KEY: prompt}

  @classmethod
  def from_peft(cls, adapter, tensors, config, name=None, approximate=False):
    """The first `num_virtual_tokens` rows of `prompt_embeddings` -> `encoder/<name>/prompt [m, d]`."""
    del config, approximate
    m = int(adapter["num_virtual_tokens"])
    submodules = adapter.get("num_transformer_submodules") or export_formats.PEFT_SEQ2SEQ_SUBMODULES
    table = np.asarray(tensors[export_formats.PEFT_PROMPT_KEY])
    if table.ndim != 2 or table.shape[0] != m * submodules:
      raise ValueError(f"{export_formats.PEFT_PROMPT_KEY} has shape {list(table.shape)}, expected "
                       f"[{m * submodules}, d] (num_virtual_tokens {m} x num_transformer_submodules "
                       f"{submodules})")
    delta = cls(length=m, stack="encoder", init="uniform", name=name or "prompt_tuning")
    return delta, {"encoder": {delta.name: {"prompt": np.array(table[:m], np.float32)}}}
