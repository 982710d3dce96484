"""The paper's splits: disjoint, deterministic, of the documented sizes (NumPy plans and TFDS mock data)."""

import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from prompt_mix.data import splits
import prompt_mix_tasks

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "tasks.md"

# Official example counts of the TFDS raw splits (TFDS catalog), used to check the documented sizes.
RAW_SIZES = {
    "glue_mnli": {"train": 392702, "validation_mismatched": 9832, "validation_matched": 9815},
    "glue_qqp": {"train": 363846, "validation": 40430},
    "glue_qnli": {"train": 104743, "validation": 5463},
    "glue_sst2": {"train": 67349, "validation": 872},
    "glue_stsb": {"train": 5749, "validation": 1500},
    "glue_mrpc": {"train": 3668, "validation": 408},
    "glue_rte": {"train": 2490, "validation": 277},
    "glue_cola": {"train": 8551, "validation": 1043},
    "glue_wnli": {"train": 635, "validation": 71},
    "superglue_boolq": {"train": 9427, "validation": 3270},
    "superglue_cb": {"train": 250, "validation": 56},
    "superglue_wic": {"train": 5428, "validation": 638},
    "superglue_wsc": {"train": 554, "validation": 104},
    "superglue_record": {"train": 100730, "validation": 10000},
    "squad": {"train": 87599, "validation": 10570},
    "mrqa_natural_questions": {"train": 104071, "validation": 12836},
    "mrqa_hotpotqa": {"train": 72928, "validation": 5901},
    "mrqa_searchqa": {"train": 117384, "validation": 16980},
    "mrqa_newsqa": {"train": 74160, "validation": 4212},
    "winogrande": {"train_xl": 40398, "validation": 1267},
    "yelp_polarity": {"train": 560000, "test": 38000},
    "scitail": {"train": 23097, "validation": 1304, "test": 2126},
    "paws_wiki": {"train": 49401, "validation": 8000, "test": 8000},
}


# ------------------------------------------------------------------------------------ NumPy plans
def _all(plan, n, groups=None):
  out = {}
  for split in splits.SPLITS:
    positions = splits.select_positions(plan, split, n, groups)
    out[split] = np.arange(n) if positions is None else positions
  return out


@pytest.mark.parametrize("n", [7, 56, 1043])
def test_halve_validation_sizes_disjoint_cover(n):
  parts = _all(splits.halve_validation(), n)
  assert len(parts["validation"]) == n // 2 and len(parts["test"]) == n - n // 2
  assert not set(parts["validation"]) & set(parts["test"])
  assert set(parts["validation"]) | set(parts["test"]) == set(range(n))
  assert len(parts["train"]) == n  # The official train split, whole.


@pytest.mark.parametrize("n", [2500, 67349])
def test_carve_train_sizes_disjoint(n):
  plan = splits.carve_train()
  dev = splits.select_positions(plan, "validation", n)
  train = splits.select_positions(plan, "train", n)
  assert len(dev) == splits.DEV_SIZE == 1000 and len(train) == n - 1000
  assert not set(dev) & set(train)
  assert splits.select_positions(plan, "test", n) is None  # The raw validation split, whole.


def test_carve_train_keeps_a_train_split_on_tiny_data():
  plan = splits.carve_train()
  assert len(splits.select_positions(plan, "validation", 10)) == 5
  assert len(splits.select_positions(plan, "train", 10)) == 5


def test_max_train_examples_caps_after_the_dev_examples():
  plan = splits.carve_train(max_train_examples=300)
  dev = splits.select_positions(plan, "validation", 5000)
  train = splits.select_positions(plan, "train", 5000)
  assert len(train) == 300 and not set(dev) & set(train)


def test_plans_are_deterministic_and_seeded():
  a = splits.select_positions(splits.carve_train(), "validation", 5000)
  b = splits.select_positions(splits.carve_train(), "validation", 5000)
  c = splits.select_positions(splits.carve_train(seed=7), "validation", 5000)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert splits.SPLIT_SEED == 42


def test_grouped_halving_keeps_groups_together():
  rng = np.random.default_rng(0)
  groups = [f"q{g}" for g in rng.integers(0, 41, 300)]
  plan = splits.halve_validation(group_by=("idx/question",))
  parts = _all(plan, 300, groups)
  dev_groups = {groups[i] for i in parts["validation"]}
  test_groups = {groups[i] for i in parts["test"]}
  assert not dev_groups & test_groups
  assert len(dev_groups) == len(set(groups)) // 2
  assert len(parts["validation"]) + len(parts["test"]) == 300


def test_few_shot_positions():
  train = np.arange(100, 400)
  a = splits.few_shot_positions(train, 16, seed=0)
  assert len(a) == 16 and set(a) <= set(train)
  np.testing.assert_array_equal(a, splits.few_shot_positions(train, 16, seed=0))
  assert not np.array_equal(a, splits.few_shot_positions(train, 16, seed=1))
  with pytest.raises(ValueError, match="k=500"):
    splits.few_shot_positions(train, 500, seed=0)


# ------------------------------------------------------------------------------ documented sizes
def _documented_sizes():
  """name -> (train, validation, test) from the size table of docs/tasks.md."""
  sizes = {}
  for line in DOCS.read_text().splitlines():
    match = re.match(r"^\|\s*`(\w+)`\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|", line)
    if match:
      sizes[match.group(1)] = tuple(int(g.replace(",", "")) for g in match.groups()[1:])
  return sizes


def test_documented_sizes_follow_the_plans():
  documented = _documented_sizes()
  specs = prompt_mix_tasks.TASK_SPECS
  expected_names = set(specs) - {"superglue_multirc"}  # MultiRC halves by question: data-dependent.
  assert expected_names <= set(documented), sorted(expected_names - set(documented))
  for name in expected_names:
    plan = specs[name].plan
    computed = tuple(splits.split_size(plan, split, RAW_SIZES[name][plan.raw[split]])
                     for split in splits.SPLITS)
    assert documented[name] == computed, name


# ---------------------------------------------------------------------------------- TFDS mock data
def _texts(source, split):
  """The raw examples of a split as hashable tuples (mock data: random, so unique)."""
  rows = []
  for ex in source.get_dataset(split).as_numpy_iterator():
    rows.append(tuple(sorted((k, str(v)) for k, v in ex.items())))
  return rows


@pytest.fixture(scope="module")
def mock_tfds():
  """40 random examples per raw split (no files, no downloads)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("PROMPT_MIX_DATA_DIR", raising=False)
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
      yield


def test_carved_splits_on_mock_data(monkeypatch):
  monkeypatch.delenv("PROMPT_MIX_DATA_DIR", raising=False)
  with tfds.testing.mock_data(num_examples=2100, policy=tfds.testing.MockPolicy.USE_CODE):
    source = prompt_mix_tasks.TASK_SPECS["glue_sst2"].source()
    train, dev = _texts(source, "train"), _texts(source, "validation")
    assert (len(train), len(dev)) == (1100, 1000)
    assert len(set(train)) == 1100 and not set(train) & set(dev)
    assert [source.num_input_examples(s) for s in splits.SPLITS] == [1100, 1000, 2100]


def test_splits_are_deterministic_on_mock_data(mock_tfds):
  source = prompt_mix_tasks.TASK_SPECS["glue_qnli"].source()
  dev = _texts(source, "validation")
  assert len(dev) == 20 and dev == _texts(prompt_mix_tasks.TASK_SPECS["glue_qnli"].source(), "validation")


def test_halved_and_few_shot_splits_on_mock_data(mock_tfds):
  spec = prompt_mix_tasks.TASK_SPECS["superglue_cb"]
  dev, test = _texts(spec.source(), "validation"), _texts(spec.source(), "test")
  assert (len(dev), len(test)) == (20, 20) and not set(dev) & set(test)
  few = _texts(spec.source(few_shot=(16, 0)), "train")
  assert len(few) == 16 and set(few) <= set(_texts(spec.source(), "train"))
  assert few == _texts(spec.source(few_shot=(16, 0)), "train")
  assert few != _texts(spec.source(few_shot=(16, 1)), "train")


def test_multirc_halves_by_question_on_mock_data(mock_tfds):
  source = prompt_mix_tasks.TASK_SPECS["superglue_multirc"].source()

  def questions(split):
    return {(int(ex["idx"]["paragraph"]), int(ex["idx"]["question"]))
            for ex in source.get_dataset(split).as_numpy_iterator()}

  dev, test = questions("validation"), questions("test")
  assert dev and test and not dev & test
  assert source.num_input_examples("validation") + source.num_input_examples("test") == 40


def test_mnli_uses_mismatched_as_dev_and_matched_as_test():
  plan = prompt_mix_tasks.TASK_SPECS["glue_mnli"].plan
  assert plan.raw == {"train": "train", "validation": "validation_mismatched", "test": "validation_matched"}
