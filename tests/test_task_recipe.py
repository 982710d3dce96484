"""docs/tasks.md's recipes for a new task and for a copy of a built-in task, followed as written, work in a
multi-task run: batches carry local task ids, and a prompt bank trains and evaluates on both tasks.

The recipe code below is the documentation's (same calls, same ids); only the data comes from local files
and the backbone is the tiny random one.
"""

import dataclasses
import json

import gin
import numpy as np
import pytest
import seqio

from prompt_mix import gin_utils
from prompt_mix import partitioning
from prompt_mix.data import feature_converter
from prompt_mix.data import file_source
from prompt_mix.data import task_ids as task_ids_lib
from prompt_mix.data import vocabulary
from prompt_mix.peft import prompt_tuning
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.training import setup
from prompt_mix.training import trainer
import prompt_mix_tasks

MIXTURE = "test_recipe_mixture"
COPY = "glue_rte_digits"
VARIANTS = [f"_k{k}_seed{s}" for k in (4, 16, 32) for s in (0, 1, 2)] + ["_rank", ""]


def _register_new_task_as_documented():
  """docs/tasks.md, 'Registering a new task', the first code block."""
  from prompt_mix.data import metrics, postprocessors, preprocessors, registration as reg, splits, task_ids

  task_ids.register_task_id("imdb", 100)   # a global id of its own; keep it stable once used
  words = ("negative", "positive")
  reg.register(reg.TaskSpec(
      name="imdb",
      tfds_name="imdb_reviews/plain_text:1.0.0",
      features={"text": reg.TEXT, "label": reg.CLASS},     # what TFDS yields / a local file provides
      plan=splits.carve_train(test="test"),                 # or official(), halve_validation()
      formatter=preprocessors.classification("imdb", [("sentence", "text")], words, "imdb"),
      postprocess_fn=postprocessors.class_id(words),
      metric_fns=(metrics.accuracy,),
      label_words=words))


def _register_copy_as_documented():
  """docs/tasks.md: a copy of a built-in task with other label words, under a new name, id 8 kept."""
  from prompt_mix.data import postprocessors, preprocessors, registration as reg
  from prompt_mix_tasks import label_words

  spec = prompt_mix_tasks.TASK_SPECS["glue_rte"]
  words = label_words.index_words("glue_rte")  # The original code's '0' / '1'.
  reg.register(dataclasses.replace(
      spec, name=COPY, task_id=8, label_words=words,
      formatter=preprocessors.classification("rte", [("sentence1", "sentence1"), ("sentence2", "sentence2")],
                                             words, COPY),
      postprocess_fn=postprocessors.class_id(words)))


@pytest.fixture
def recipe_tasks(tmp_path, monkeypatch, t5_vocab_path):
  monkeypatch.setenv(vocabulary.VOCAB_PATH_ENV, str(t5_vocab_path))
  monkeypatch.setenv(file_source.DATA_DIR_ENV, str(tmp_path / "data"))
  before = dict(task_ids_lib.TASK_IDS)
  try:
    _register_new_task_as_documented()
    _register_copy_as_documented()
    seqio.MixtureRegistry.add(MIXTURE, ["imdb", COPY],
                              default_rate=prompt_mix_tasks.mixtures.rate_num_examples)
    rows = {
        "imdb/train.jsonl": [{"text": f"review number {i}", "label": i % 2} for i in range(12)],
        "imdb/test.jsonl": [{"text": "fine film", "label": 1}, {"text": "dull film", "label": 0}],
        f"{COPY}/train.jsonl": [{"sentence1": f"premise {i}", "sentence2": f"claim {i}", "label": i % 2}
                                for i in range(8)],
        f"{COPY}/validation.jsonl": [{"sentence1": f"p {i}", "sentence2": f"c {i}", "label": "entailment"}
                                     for i in range(4)],
    }
    for name, examples in rows.items():
      path = tmp_path / "data" / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(json.dumps(r) + "\n" for r in examples))
    yield tmp_path
  finally:
    for name in ("imdb", COPY):
      for suffix in VARIANTS:
        if f"{name}{suffix}" in seqio.TaskRegistry.names():
          seqio.TaskRegistry.remove(f"{name}{suffix}")
    if MIXTURE in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(MIXTURE)
    task_ids_lib.TASK_IDS.clear()
    task_ids_lib.TASK_IDS.update(before)


def test_recipes_give_every_task_a_global_id(recipe_tasks):
  assert task_ids_lib.task_id("imdb") == 100
  assert task_ids_lib.task_id(COPY) == task_ids_lib.task_id(f"{COPY}_k16_seed0") == 8  # Shares RTE's.
  assert task_ids_lib.task_names_of(MIXTURE) == ["glue_rte_digits", "imdb"]
  remap = task_ids_lib.LocalTaskIds(task_ids_lib.task_names_of(MIXTURE))
  np.testing.assert_array_equal(remap(np.array([100, 8, 8])), [1, 0, 0])
  # The copy stands in for glue_rte; both in one bank cannot be told apart, and the error says why.
  with pytest.raises(ValueError, match="'glue_rte' and 'glue_rte_digits' share global task id 8"):
    task_ids_lib.LocalTaskIds(["glue_rte", COPY])


def test_converter_batches_carry_local_task_ids(recipe_tasks):
  names = task_ids_lib.task_names_of(MIXTURE)
  converter = feature_converter.TaskIdEncDecFeatureConverter(task_names=names)
  lengths = {"inputs": 16, "targets": 4}
  for task, local in (("imdb", names.index("imdb")), (COPY, names.index(COPY))):
    ds = seqio.get_mixture_or_task(task).get_dataset(lengths, split="train", shuffle=False)
    batch = next(converter(ds, lengths).batch(4).as_numpy_iterator())
    np.testing.assert_array_equal(batch["task_ids"], [local] * 4)
  (copy_example,) = [ex for ex in seqio.get_mixture_or_task(COPY).get_dataset(
      None, split="validation", shuffle=False).take(1).as_numpy_iterator()]
  assert copy_example["targets_pretokenized"] == b"0"  # The copy's words: class 0 is '0'.


def test_prompt_bank_trains_and_evaluates_on_the_recipe_tasks(recipe_tasks):
  """A bank of 3 prompts (the mixture's two tasks and glue_mrpc, absent from the data) trains 2 steps: the
  rows of the two tasks move, glue_mrpc's row stays its initial value, and both tasks are evaluated.

  Batches are drawn at random (`LengthBuckets.window_batches = 1`): grouping by length would put the two
  tasks' inputs, of different lengths, in different batches, and 2 steps could see only one task."""
  tmp_path = recipe_tasks
  init = np.random.RandomState(0).uniform(-0.5, 0.5, (2, 8)).astype(np.float32)  # [m, d] for every row.
  np.save(tmp_path / "init.npy", init)
  model_dir = tmp_path / "run"
  names = ["imdb", COPY, "glue_mrpc"]
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        gin_utils.default_gin_search_paths(),
        ["models/tiny.gin", "methods/prompt_tuning.gin", "runs/finetune.gin"],
        [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{MIXTURE}'", "TRAIN_STEPS = 2",
         "BATCH_SIZE = 4", "RANDOM_INIT_BACKBONE = True", "CHECKPOINT_PERIOD = 2", "EVAL_PERIOD = 2",
         "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", f"TASK_NAMES = {names}",
         "PromptTuning.length = 2", "PromptTuning.num_tasks = 3", "PromptTuning.init = 'file'",
         f"PromptTuning.init_file = '{tmp_path / 'init.npy'}'", "DROPOUT_RATE = 0.0", "train.log_period = 1",
         "LengthBuckets.window_batches = 1"])
    metrics = trainer.train()
  finally:
    gin.clear_config()
  assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
  evaluated = json.loads((model_dir / "eval" / "eval_metrics_2.json").read_text())
  assert {"imdb/accuracy", f"{COPY}/accuracy"} <= set(evaluated)

  model = model_lib.EncoderDecoderModel(
      config_lib.preset("tiny", dropout_rate=0.0),
      (prompt_tuning.PromptTuning(length=2, num_tasks=3, init="file", init_file=str(tmp_path / "init.npy")),))
  shapes = feature_converter.model_input_shapes({"inputs": 16, "targets": 4}, 4)
  variables, step = setup.restore_trained(model, str(model_dir), None, setup.dummy_batch(shapes),
                                          partitioning.make_mesh(1), random_init_backbone=True)
  bank = np.asarray(variables["peft"]["encoder"]["prompt_tuning"]["prompt"])
  assert step == 2 and bank.shape == (3, 2, 8)
  assert not np.allclose(bank[0], init) and not np.allclose(bank[1], init)  # imdb, the copy: trained.
  np.testing.assert_array_equal(bank[2], init)  # glue_mrpc: no example, no update.


def test_a_task_without_an_id_fails_at_registration_saying_how(recipe_tasks):
  from prompt_mix.data import registration as reg
  spec = dataclasses.replace(prompt_mix_tasks.TASK_SPECS["glue_rte"], name="glue_rte_words2", task_id=None)
  with pytest.raises(KeyError, match="give its TaskSpec a task_id, or call register_task_id"):
    reg.register(spec, few_shot_ks=(), few_shot_seeds=())
  with pytest.raises(ValueError, match="taken by 'glue_rte'"):
    task_ids_lib.register_task_id("glue_rte_words2", 8)
  with pytest.raises(ValueError, match="variant"):
    task_ids_lib.register_task_id("my_task_rank", 500)
