"""One encoder pass per input in rank classification: `model.score_options` and the evaluator's grouping
give the scores of row-per-option scoring (`score_batch` on every (input, label word) row), and the same
metrics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_mix.attempt import library as library_lib
from prompt_mix.data import buckets
from prompt_mix.data import feature_converter
from prompt_mix.data import metrics
from prompt_mix.data import option_batches
from prompt_mix.data import preprocessors
from prompt_mix.data import rank_classification
from prompt_mix.data import registration
from prompt_mix.data import task_ids as task_ids_lib
from prompt_mix.peft import aprompt
from prompt_mix.peft import attempt
from prompt_mix.peft import lora
from prompt_mix.peft import prefix_tuning
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import evaluation

import method_checks

NUM_INPUTS, NUM_OPTIONS = 5, 3


def _init(model, batch):
  return method_checks.jit_init(model, batch)


def _library(tmp_path) -> str:
  return method_checks.tiny_library(tmp_path / "library")


METHODS = {  # Each with per-task leaves selected by task_ids, or input-dependent prompts, or decoder sites.
    "prompt_tuning": lambda lib: (prompt_tuning.PromptTuning(length=3),),
    "prompt_bank": lambda lib: (prompt_tuning.PromptTuning(length=3, num_tasks=2),),
    "attempt_m": lambda lib: (attempt.Attempt(library_path=lib, source_names=("a", "b"), prompt_length=3,
                                              target_init="uniform", bottleneck=4, num_tasks=2,
                                              gate_init_std=1.0),),
    "prefix_bank": lambda lib: (prefix_tuning.PrefixTuning(length=2, mlp_hidden=8, num_tasks=2),),
    "aprompt": lambda lib: (aprompt.APrompt(input_length=2, qk_length=2, kv_length=2, max_length=16,
                                            decoder_max_length=8),),
    "lora_bank": lambda lib: (lora.LoRA(rank=2, num_tasks=2),),
}


def _inputs_and_options(seed=0):
  """N inputs of varied lengths (padded to 8), C label words of varied lengths (padded to 4)."""
  rng = np.random.RandomState(seed)
  inputs = np.zeros((NUM_INPUTS, 8), np.int32)
  for i in range(NUM_INPUTS):
    n = rng.randint(2, 9)
    inputs[i, :n - 1], inputs[i, n - 1] = rng.randint(2, method_checks.VOCAB, n - 1), 1
  words = [[5, 1], [7, 9, 1], [11, 12, 13, 1]]
  targets = rank_classification._pad(words, 4)
  return inputs, targets, np.array([0, 1, 1, 0, 1], np.int32)


def _row_batch(inputs, targets, task_ids):
  """Today's layout: one full row per (input, option)."""
  rows = np.repeat(np.arange(NUM_INPUTS), NUM_OPTIONS)
  tgt = np.tile(targets, (NUM_INPUTS, 1))
  batch = rank_classification.make_batch(list(inputs[rows]), list(tgt), 8, 4, task_ids[rows])
  batch["encoder_input_tokens"] = inputs[rows]
  return batch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_score_options_equals_row_per_option_scoring(method, tmp_path):
  model = method_checks.make_model(METHODS[method](_library(tmp_path)))
  inputs, targets, task_ids = _inputs_and_options()
  rows = _row_batch(inputs, targets, task_ids)
  variables = _init(model, {k: jnp.asarray(v) for k, v in rows.items()})
  score_batch, score_options = jax.jit(model.score_batch), jax.jit(model.score_options)
  expected = np.asarray(score_batch(variables, rows))
  options = dict(rows, encoder_input_tokens=inputs, task_ids=task_ids,
                 encoder_row=np.repeat(np.arange(NUM_INPUTS, dtype=np.int32), NUM_OPTIONS))
  got = np.asarray(score_options(variables, options))
  assert got.shape == (NUM_INPUTS * NUM_OPTIONS,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The plain rank_classify gives the same table through either path.
  token_inputs = [list(r[:buckets.token_lengths(r[None])[0]]) for r in inputs]
  words = [[5, 1], [7, 9, 1], [11, 12, 13, 1]]
  by_rows = rank_classification.rank_classify(functools.partial(score_batch, variables),
                                              token_inputs, words, task_ids=task_ids, batch_size=7)
  by_options = rank_classification.rank_classify(
      None, token_inputs, words, task_ids=task_ids, batch_size=7,
      score_options_fn=functools.partial(score_options, variables))
  np.testing.assert_allclose(by_options.scores, by_rows.scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(by_options.predictions, by_rows.predictions)
  np.testing.assert_allclose(by_rows.scores.reshape(-1), expected, rtol=1e-5, atol=1e-5)


def test_rows_group_by_input_and_task_and_pack_into_fixed_calls():
  tokens = np.array([[3, 1, 0], [4, 4, 1], [3, 1, 0], [3, 1, 0], [4, 4, 1], [3, 1, 0], [9, 1, 0]])
  task_ids = np.array([0, 0, 0, 1, 0, 0, 0])
  features = {"encoder_input_tokens": tokens, "task_ids": task_ids,
              "decoder_target_tokens": np.arange(7)[:, None] + 2}
  groups = option_batches.group_rows(features)
  assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3], [6]]  # Same input, other task: its own.
  plan = option_batches.plan_calls(groups, batch_size=7)
  assert (plan.inputs_per_call, plan.rows_per_call) == (2, 6)
  assert [[e.tolist() for e in call] for call in plan.calls] == [[[0, 2, 5], [1, 4]], [[3], [6]]]
  batch, rows = option_batches.call_batch(features, plan.calls[1], plan)
  assert rows.tolist() == [3, 6]
  np.testing.assert_array_equal(batch["encoder_input_tokens"], tokens[[3, 6]])
  np.testing.assert_array_equal(batch["task_ids"], [1, 0])
  np.testing.assert_array_equal(batch["encoder_row"], [0, 1, 1, 1, 1, 1])  # 4 padding rows repeat the last.
  np.testing.assert_array_equal(batch["decoder_target_tokens"][:, 0], [5, 8, 8, 8, 8, 8])
  # A group larger than the batch is split (its input encoded once per piece); sorting puts short first.
  big = option_batches.plan_calls([np.arange(5), np.arange(5, 6)], batch_size=2,
                                  sort_lengths=np.array([9, 9, 9, 9, 9, 1]))
  assert (big.inputs_per_call, big.rows_per_call) == (1, 2)
  assert [[e.tolist() for e in call] for call in big.calls] == [[[5]], [[0, 1]], [[2, 3]], [[4]]]
  one_row_each = option_batches.plan_calls([np.array([i]) for i in range(5)], batch_size=4)
  assert (one_row_each.inputs_per_call, one_row_each.rows_per_call) == (4, 4)  # Row-per-option's work.


# ------------------------------------------------------------------------------ through the evaluator
BYTES = seqio.ByteVocabulary()
RANK_TASKS = {"score_options_test_yes_no": (1901, ("yes", "no", "maybe")),
              "score_options_test_letters": (1902, ("a", "bb"))}
MIXTURE = "score_options_test_mixture"


def _examples(words, seed, split, shuffle_files=False, seed_arg=None):
  del split, shuffle_files, seed_arg
  rng = np.random.RandomState(seed)
  inputs = ["".join(rng.choice(list("abcdefgh"), rng.randint(2, 14))) for _ in range(9)]
  return tf.data.Dataset.from_tensor_slices({"inputs": inputs,
                                             "targets": [words[i % len(words)] for i in range(9)]})


def _register():
  if MIXTURE in seqio.MixtureRegistry.names():
    return
  for i, (name, (global_id, words)) in enumerate(RANK_TASKS.items()):
    task_ids_lib.register_task_id(name, global_id)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files=False, seed=None, words=words, i=i: _examples(words, i, split),
            splits=["validation"]),
        preprocessors=[rank_classification.expand_choices_preprocessor(words),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                       functools.partial(preprocessors.add_task_id, task_id=global_id)],
        output_features=registration.output_features(BYTES),
        postprocess_fn=rank_classification.postprocessor(lambda x, example=None, is_target=False: x),
        metric_fns=[rank_classification.score_metric([metrics.accuracy])])
  seqio.MixtureRegistry.add(MIXTURE, list(RANK_TASKS), default_rate=1.0)


def test_evaluator_encodes_each_input_once_with_the_same_scores_and_metrics(tmp_path):
  """ATTEMPT-m on a mixture of two rank tasks (3 and 2 label words): input-dependent prompts and per-task
  leaves selected by task_ids."""
  _register()
  lengths = {"inputs": 24, "targets": 8}
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        METHODS["attempt_m"](_library(tmp_path)))
  init_batch = feature_converter.model_input_shapes(lengths, 2)
  init_batch = {k: jnp.ones(s, jnp.int32) if k != "task_ids" else jnp.zeros(s, jnp.int32)
                for k, s in init_batch.items() if k != "decoder_loss_weights"}
  variables = _init(model, init_batch)
  converter = feature_converter.TaskIdEncDecFeatureConverter(task_names=list(RANK_TASKS))
  small = buckets.LengthBuckets(input_step=8, target_step=4)

  def evaluator(encode_once, length_buckets):
    return evaluation.Evaluator(model, MIXTURE, converter, lengths, batch_size=6, encode_once=encode_once,
                                length_buckets=length_buckets, log_dir=str(tmp_path / "eval"))

  reference = evaluator(False, buckets.LengthBuckets(enabled=False))  # T5X: every row, full padding.
  variants = {"once+buckets": evaluator(True, small),
              "once": evaluator(True, buckets.LengthBuckets(enabled=False)),
              "rows+buckets": evaluator(False, small)}
  encoder_rows = []
  once = variants["once+buckets"]
  scorer = once._score_options
  once._score_options = lambda v, b: (encoder_rows.append(b["encoder_input_tokens"].shape), scorer(v, b))[1]

  datasets = reference._evaluator.cached_model_datasets
  for task, ds in datasets.items():
    expected = dict(reference.score_rows(variables, ds))
    num_rows = len(expected)
    for name, variant in variants.items():
      got = dict(variant.score_rows(variables, ds))
      assert sorted(got) == sorted(expected), name
      np.testing.assert_allclose([got[i] for i in sorted(got)], [expected[i] for i in sorted(expected)],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{task} {name}")
    options = len(RANK_TASKS[task][1])
    assert num_rows == 9 * options
  # One encoder row per input: 6 // C inputs per call, 9 inputs per task.
  calls = {3: 9 // 2 + 1, 2: 9 // 3}  # C=3: 2 inputs per call (5 calls); C=2: 3 per call (3 calls).
  assert len(encoder_rows) == sum(calls.values())
  assert sorted({shape[0] for shape in encoder_rows}) == [2, 3]
  assert any(shape[1] < lengths["inputs"] for shape in encoder_rows)  # Buckets trimmed the inputs.

  metrics_reference = reference.evaluate(variables, step=0)
  assert set(metrics_reference) == {f"{t}/accuracy" for t in RANK_TASKS}
  assert once.evaluate(variables, step=0) == metrics_reference
