"""Length buckets: batches padded to the smallest bucket give the results of full padding, and the training
stream stays deterministic, resumable, complete and agreed across hosts."""

import dataclasses
import json
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

from prompt_mix import partitioning
from prompt_mix.attempt import library as library_lib
from prompt_mix.data import buckets
from prompt_mix.data import feature_converter
from prompt_mix.peft import aprompt
from prompt_mix.peft import attempt
from prompt_mix.peft import prefix_tuning
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import evaluation
from prompt_mix.training import inference
from prompt_mix.training import setup
from prompt_mix.training import trainer
import prompt_mix_tasks  # noqa: F401  (registers the synthetic tasks)

import method_checks

FULL_INPUTS, FULL_TARGETS = 16, 6  # The task feature lengths of these tests.


def test_buckets_are_multiples_of_a_step_up_to_the_feature_length():
  resolved = buckets.LengthBuckets().resolve({"inputs": 100, "targets": 16})
  assert resolved.inputs == (32, 64, 96, 100) and resolved.targets == (8, 16)
  assert resolved.max_shapes == 8
  long_targets = buckets.LengthBuckets().resolve({"inputs": 256, "targets": 128})  # The ATTEMPT runs'.
  assert long_targets.inputs == (32, 64, 96, 128, 160, 192, 224, 256)
  assert long_targets.targets == (8, 16, 32, 64, 128)  # Doubling: few target buckets.
  assert buckets.LengthBuckets(input_doubling=True).resolve({"inputs": 512, "targets": 4}) == buckets.Buckets(
      inputs=(32, 64, 128, 256, 512), targets=(4,))
  explicit = buckets.LengthBuckets(input_lengths=[200, 48, 16], target_lengths=[4]).resolve(
      {"inputs": 64, "targets": 8})
  assert explicit.inputs == (16, 48, 64) and explicit.targets == (4, 8)
  assert explicit.input_bucket(17) == explicit.input_bucket(48) == 48 and explicit.target_bucket(0) == 4
  with pytest.raises(ValueError, match="inputs of length 65, longer than the feature length 64"):
    explicit.input_bucket(65)
  assert buckets.LengthBuckets(enabled=False).resolve({"inputs": 64, "targets": 8}) is None
  with pytest.raises(ValueError, match="input_step must be >= 1"):
    buckets.LengthBuckets(input_step=0)


def test_token_lengths_and_trim_cut_only_padding():
  tokens = np.array([[5, 3, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [4, 0, 7, 1, 0, 0]])
  np.testing.assert_array_equal(buckets.token_lengths(tokens), [3, 0, 4])
  batch = {"encoder_input_tokens": tokens, "task_ids": np.array([3, 4, 5]),
           "decoder_target_tokens": np.array([[6, 1, 0]] * 3),
           "decoder_input_tokens": np.array([[0, 6, 1]] * 3),  # Shifted right: EOS one past the targets.
           "decoder_loss_weights": np.array([[1, 1, 0]] * 3)}
  trimmed = buckets.trim(batch, 4, 2)
  np.testing.assert_array_equal(trimmed["encoder_input_tokens"], tokens[:, :4])
  np.testing.assert_array_equal(trimmed["decoder_input_tokens"], [[0, 6]] * 3)
  np.testing.assert_array_equal(trimmed["task_ids"], [3, 4, 5])
  assert buckets.trim(batch, 8, None)["encoder_input_tokens"].shape == (3, 8)  # Zero-padded.
  with pytest.raises(ValueError, match="Cannot trim encoder_input_tokens"):
    buckets.trim(batch, 3, None)


# ------------------------------------------------------------------------- padding changes nothing
def _init(model, batch):
  return method_checks.jit_init(model, batch)


def _library(tmp_path) -> str:
  return method_checks.tiny_library(tmp_path / "library")


METHODS = {
    "prompt_tuning": lambda lib: (prompt_tuning.PromptTuning(length=3),),
    "prompt_bank": lambda lib: (prompt_tuning.PromptTuning(length=3, num_tasks=2),),
    "attempt_m": lambda lib: (attempt.Attempt(library_path=lib, source_names=("a", "b"), prompt_length=3,
                                              target_init="uniform", bottleneck=4, num_tasks=2,
                                              gate_init_std=1.0),),
    "prefix_tuning": lambda lib: (prefix_tuning.PrefixTuning(length=2, mlp_hidden=8),),
    "aprompt": lambda lib: (aprompt.APrompt(input_length=2, qk_length=2, kv_length=2, max_length=24,
                                            decoder_max_length=10),),
}


def _padded_batch(seed: int = 0, batch_size: int = 6) -> dict:
  """Rows of real lengths 2..8 (inputs) and 1..3 (targets, EOS last), padded to the full feature lengths;
  decoder inputs shifted right over the padded targets, as SeqIO makes them."""
  rng = np.random.RandomState(seed)
  enc = np.zeros((batch_size, FULL_INPUTS), np.int32)
  tgt = np.zeros((batch_size, FULL_TARGETS), np.int32)
  for i in range(batch_size):
    n, t = rng.randint(2, 9), rng.randint(1, 4)
    enc[i, :n - 1], enc[i, n - 1] = rng.randint(2, method_checks.VOCAB, n - 1), 1
    tgt[i, :t - 1], tgt[i, t - 1] = rng.randint(2, method_checks.VOCAB, t - 1), 1
  dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt > 0).astype(np.float32), task_ids=np.arange(batch_size) % 2)


def _results(model, variables, batch):
  """Per-example scores, the loss and its z-loss, and the gradient of the trainable leaves."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  trainable, frozen = model_lib.split_trainable(variables, model.trains_backbone)
  grad_fn = jax.jit(jax.grad(lambda tr: model.loss_fn(model_lib.merge_trainable(tr, frozen), batch)[0]))
  loss, aux = jax.jit(model.loss_fn)(variables, batch)
  return dict(scores=jax.jit(model.score_batch)(variables, batch), loss=loss, z_loss=aux["z_loss"],
              grads=grad_fn(trainable))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bucketed_batches_give_the_results_of_full_padding(method, tmp_path):
  model = dataclasses.replace(method_checks.make_model(METHODS[method](_library(tmp_path))), z_loss=1e-4)
  full = _padded_batch()
  variables = _init(model, {k: jnp.asarray(v) for k, v in full.items()})
  resolved = buckets.LengthBuckets(input_step=4, target_step=2).resolve(
      {"inputs": FULL_INPUTS, "targets": FULL_TARGETS})
  lengths = resolved.batch_lengths(full)
  assert lengths == (8, 4)  # Longest input 8, longest target 3: both shorter than full padding.
  bucketed = buckets.trim(full, *lengths)
  assert bucketed["encoder_input_tokens"].shape == (6, 8)
  expected, got = _results(model, variables, full), _results(model, variables, bucketed)
  np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["z_loss"], expected["z_loss"], rtol=1e-4, atol=1e-9)
  for a, b in zip(jax.tree_util.tree_leaves(got["grads"]), jax.tree_util.tree_leaves(expected["grads"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unmasked_pooling_depends_on_padding_and_is_refused(tmp_path):
  """The control: ATTEMPT pooling over the padding (the original's behaviour) does change with the padded
  length, and the comparison above sees it; buckets refuse that setting."""
  full = _padded_batch()
  longest = int(np.argmax(buckets.token_lengths(full["encoder_input_tokens"])))
  assert buckets.token_lengths(full["encoder_input_tokens"])[longest] == 8  # No padding once trimmed to 8.
  differences = {}
  library = _library(tmp_path)
  for unmasked in (False, True):
    delta = attempt.Attempt(library_path=library, source_names=("a", "b"), prompt_length=3,
                            target_init="uniform", bottleneck=4, gate_init_std=1.0,
                            unmasked_pooling=unmasked)
    model = method_checks.make_model((delta,))
    variables = _init(model, {k: jnp.asarray(v) for k, v in full.items()})
    embedding = variables["params"]["token_embedder"]["embedding"]
    # A pad embedding that wins the max in every dimension.
    variables["params"]["token_embedder"]["embedding"] = embedding.at[0].set(5.0)
    scores_full, aux_full = model.score_batch(variables, full, return_intermediates=True)
    scores_trim, aux_trim = model.score_batch(variables, buckets.trim(full, 8, None),
                                              return_intermediates=True)
    differences[unmasked] = (
        abs(float(scores_full[longest] - scores_trim[longest])),
        float(np.abs(attempt.attention_weights(aux_full) - attempt.attention_weights(aux_trim)).max()))
  assert differences[False][0] < 1e-5 and differences[False][1] < 1e-6  # Masked pooling: no change.
  assert differences[True][0] > 1e-4 and differences[True][1] > 1e-3, differences
  resolved = buckets.LengthBuckets().resolve({"inputs": 16, "targets": 4})
  with pytest.raises(ValueError, match="unmasked_pooling=True.*LengthBuckets.enabled = False"):
    buckets.check_model(model, resolved)
  buckets.check_model(model, None)  # Fixed padding: allowed.


def test_a_loss_divided_by_the_padded_target_size_needs_one_target_bucket():
  model = dataclasses.replace(method_checks.make_model((prompt_tuning.PromptTuning(length=3),)),
                              loss_normalizing_factor="NUM_TOTAL_TARGET_TOKENS")
  lengths = {"inputs": 64, "targets": 16}
  with pytest.raises(ValueError, match=r"NUM_TOTAL_TARGET_TOKENS.*target_lengths = \[16\]"):
    buckets.check_model(model, buckets.LengthBuckets().resolve(lengths), training=True)
  buckets.check_model(model, buckets.LengthBuckets().resolve(lengths))  # Scores do not use it.
  buckets.check_model(model, buckets.LengthBuckets(target_lengths=[16]).resolve(lengths), training=True)
  buckets.check_model(dataclasses.replace(model, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"),
                      buckets.LengthBuckets().resolve(lengths), training=True)


# ------------------------------------------------------------------------- the training stream
LENGTHS = {"inputs": 16, "targets": 4}
SMALL_BUCKETS = buckets.LengthBuckets(input_step=4, target_step=2, window_batches=4)
MIXTURE = "synthetic_sources"  # Four tasks, inputs of 5..9 tokens, task ids carried into the batch.


def _stream(num_batches, skip=0, length_buckets=SMALL_BUCKETS, shard=None, agree=None, batch_size=4,
            seed=3):
  converter = feature_converter.TaskIdEncDecFeatureConverter()
  data = trainer.train_dataset(MIXTURE, LENGTHS, batch_size, converter, seed, skip,
                               shard=shard or seqio.ShardInfo(0, 1), length_buckets=length_buckets,
                               agree=agree)
  return [next(data) for _ in range(num_batches)]


def _rows(batches) -> list[tuple]:
  """Each example of the batches as a hashable row (its unpadded tokens and task id)."""
  rows = []
  for b in batches:
    n_in, n_tg = buckets.token_lengths(b["encoder_input_tokens"]), buckets.token_lengths(
        b["decoder_target_tokens"])
    for i in range(len(b["task_ids"])):
      rows.append((tuple(b["encoder_input_tokens"][i, :n_in[i]]),
                   tuple(b["decoder_target_tokens"][i, :n_tg[i]]), int(b["task_ids"][i])))
  return rows


def test_training_batches_are_bucketed_grouped_and_the_same_examples():
  window = SMALL_BUCKETS.window_batches
  bucketed = _stream(2 * window)
  fixed = _stream(2 * window, length_buckets=buckets.LengthBuckets(enabled=False))
  assert all(b["encoder_input_tokens"].shape == (4, 16) for b in fixed)
  for b in bucketed:  # Each batch is padded to the bucket of its longest input and target.
    longest = buckets.max_length(b["encoder_input_tokens"])
    assert b["encoder_input_tokens"].shape[1] == -(-longest // 4) * 4
    assert b["decoder_target_tokens"].shape[1] == 2 and b["decoder_loss_weights"].shape[1] == 2
    assert b["task_ids"].shape == (4,)
  # Grouping only reorders examples within a window: window by window, the same examples as fixed padding.
  per_window = 4 * window
  for w in range(2):
    assert sorted(_rows(bucketed)[w * per_window:(w + 1) * per_window]) == sorted(
        _rows(fixed)[w * per_window:(w + 1) * per_window])
  # ...and batches are more homogeneous: less padding than batches of the unsorted stream would need.
  padded = sum(b["encoder_input_tokens"].size for b in bucketed)
  unsorted = sum(4 * -(-buckets.max_length(b["encoder_input_tokens"]) // 4) * 4 for b in fixed)
  assert padded < unsorted
  assert len({tuple(sorted(set(b["task_ids"].tolist()))) for b in bucketed}) > 1  # Tasks still mix.


def test_training_stream_is_deterministic_and_resumes_exactly():
  run = _stream(10)
  again = _stream(10)
  resumed = _stream(6, skip=4)
  for a, b in zip(run, again):
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
  for a, b in zip(run[4:], resumed):
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
  other_seed = _stream(10, seed=4)
  assert _rows(other_seed) != _rows(run)


class _AllGather:
  """Simulated `process_allgather` + max for host threads: each host blocks until all have proposed."""

  def __init__(self, hosts: int):
    self._barrier = threading.Barrier(hosts)
    self._values = [None] * hosts
    self.proposals = []

  def for_host(self, host: int):
    def agree(lengths):
      self._values[host] = np.asarray(lengths)
      self._barrier.wait()
      agreed = np.max(self._values, axis=0)
      if host == 0:
        self.proposals.append([v.tolist() for v in self._values])
      self._barrier.wait()
      return agreed
    return agree


def test_two_hosts_read_their_shards_and_agree_on_every_batch_shape():
  gather = _AllGather(2)
  results = [None, None]

  def host(index):
    results[index] = _stream(8, shard=seqio.ShardInfo(index, 2), agree=gather.for_host(index),
                             batch_size=8)

  threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=600)
  first, second = results
  assert len(first) == len(second) == 8
  for a, b, proposal in zip(first, second, gather.proposals):
    assert a["encoder_input_tokens"].shape == b["encoder_input_tokens"].shape == (
        4, max(p[0] for p in proposal))  # One global shape: the longer of the two hosts' buckets.
    assert a["decoder_target_tokens"].shape == b["decoder_target_tokens"].shape
  # Each host read its own shard: the same examples as that shard's unbucketed stream, window by window.
  for index, batches in enumerate(results):
    fixed = _stream(8, shard=seqio.ShardInfo(index, 2), batch_size=8,
                    length_buckets=buckets.LengthBuckets(enabled=False))
    assert sorted(_rows(batches)) == sorted(_rows(fixed))
  # The shared batch order puts batches of the same length rank on both hosts: they rarely disagree.
  disagreements = sum(p[0] != p[1] for p in gather.proposals)
  assert disagreements <= len(gather.proposals) // 2, gather.proposals


def test_trainer_resumed_run_sees_the_batches_of_an_uninterrupted_run(tmp_path, monkeypatch):
  """Train 4 steps in one go, and 2 + 2 with a restart in between: the trainer reads the same batches."""
  seen: dict[str, list] = {}
  original = trainer.train_dataset

  def recording(*args, **kwargs):
    data = original(*args, length_buckets=SMALL_BUCKETS, **kwargs)
    log = seen.setdefault(current[0], [])

    class Recorder:
      def __iter__(self):
        return self

      def __next__(self):
        batch = next(data)
        log.append({k: v.tolist() for k, v in batch.items()})
        return batch

    return Recorder()

  monkeypatch.setattr(trainer, "train_dataset", recording)
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        (prompt_tuning.PromptTuning(length=2),), z_loss=0.0)
  common = dict(model=model, mixture_or_task_name=MIXTURE, task_feature_lengths=LENGTHS, train_steps=4,
                batch_size=4, random_init_backbone=True, optimizer=optax.adam(0.01), checkpoint_period=2,
                seed=5, dropout=False)
  current = ["straight"]
  trainer.train(model_dir=str(tmp_path / "straight"), **common)
  current[0] = "resumed"
  trainer.train(model_dir=str(tmp_path / "resumed"), stop_after_steps=2, **common)
  trainer.train(model_dir=str(tmp_path / "resumed"), **common)
  assert len(seen["straight"]) == len(seen["resumed"]) == 4
  assert seen["straight"] == seen["resumed"]


def test_evaluation_and_inference_predict_the_same_with_buckets(tmp_path):
  """Generation sorts examples by length and trims inputs to buckets: the same predictions, scores and
  metrics as fixed padding, and inference writes its lines in the examples' order."""
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=384, dropout_rate=0.0),
                                        (prompt_tuning.PromptTuning(length=2),), z_loss=0.0)
  model_dir = str(tmp_path / "run")
  trainer.train(model_dir=model_dir, model=model, mixture_or_task_name=MIXTURE,
                task_feature_lengths=LENGTHS, train_steps=1, batch_size=4, random_init_backbone=True,
                optimizer=optax.adam(0.01), checkpoint_period=1, dropout=False)
  small = buckets.LengthBuckets(input_step=4, target_step=2, window_batches=2)
  off = buckets.LengthBuckets(enabled=False)
  lines = {}
  for name, length_buckets in (("buckets", small), ("fixed", off)):
    path = inference.infer(model_dir=model_dir, model=model, mixture_or_task_name=MIXTURE,
                           task_feature_lengths=LENGTHS, random_init_backbone=True, batch_size=4,
                           max_examples_per_task=5, output_file=str(tmp_path / f"{name}.jsonl"),
                           length_buckets=length_buckets)
    lines[name] = [json.loads(line) for line in open(path)]
  assert len(lines["buckets"]) == len(lines["fixed"]) == 20  # 5 examples of 4 tasks, in 3 windows of 8.
  for a, b in zip(lines["buckets"], lines["fixed"]):
    assert (a["task"], a["inputs"], a["prediction"]) == (b["task"], b["inputs"], b["prediction"])
    assert a["score"] == pytest.approx(b["score"], abs=1e-4)

  variables, _ = setup.restore_trained(
      model, model_dir, None, setup.dummy_batch(feature_converter.model_input_shapes(LENGTHS, 4)),
      partitioning.make_mesh(1), random_init_backbone=True)
  converter = feature_converter.TaskIdEncDecFeatureConverter()
  evaluators = {name: evaluation.Evaluator(model, "synthetic_src_max", converter, LENGTHS, batch_size=8,
                                           log_dir=str(tmp_path / name), length_buckets=length_buckets)
                for name, length_buckets in (("buckets", small), ("fixed", off))}
  ds = evaluators["fixed"]._evaluator.cached_model_datasets["synthetic_src_max"]
  predicted = {name: dict(e.predict_rows(variables, ds)) for name, e in evaluators.items()}
  assert len(predicted["fixed"]) == 100 and predicted["buckets"] == predicted["fixed"]
  assert evaluators["buckets"].evaluate(variables, 1) == evaluators["fixed"].evaluate(variables, 1)
