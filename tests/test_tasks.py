"""Every registered task yields well-formed, tokenized examples from TFDS mock data; formatters, mixtures,
task ids and the feature converter.

The data is `tfds.testing.mock_data(policy=USE_CODE)`: random examples from each builder's feature
definitions, no files and no downloads. Tokenization uses the real T5 vocabulary of ../shared/fixtures.
"""

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from prompt_mix.data import feature_converter
from prompt_mix.data import preprocessors
from prompt_mix.data import task_ids
from prompt_mix.data import vocabulary
import prompt_mix_tasks
from prompt_mix_tasks import mixtures

SPECS = prompt_mix_tasks.TASK_SPECS
MOCK_EXAMPLES = 40
EOS = 1


@pytest.fixture(scope="module")
def t5_vocab(request):
  path = request.getfixturevalue("t5_vocab_path")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(vocabulary.VOCAB_PATH_ENV, str(path))
    mp.delenv("PROMPT_MIX_DATA_DIR", raising=False)
    yield vocabulary.get_vocabulary()


@pytest.fixture(scope="module")
def t5_vocab_path():  # Module-scoped twin of conftest's fixture (same skip reason).
  from conftest import shared_path  # pylint: disable=g-import-not-at-top
  return shared_path("fixtures", "t5_sentencepiece.model")


@pytest.fixture(scope="module")
def mock_tfds(t5_vocab):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield t5_vocab


def _examples(name, split, sequence_length=None):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length, split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def _check_example(ex, spec, vocab):
  for key in ("inputs", "targets"):
    tokens = ex[key]
    assert tokens.dtype == np.int32 and tokens.ndim == 1 and tokens[-1] == EOS, (spec.name, key)
    text = ex[f"{key}_pretokenized"].decode()
    assert list(tokens) == list(vocab.encode(text)) + [EOS], (spec.name, key, text)
  assert ex["task_id"].dtype == np.int32 and ex["task_id"].shape == (1,)
  assert int(ex["task_id"][0]) == task_ids.TASK_IDS[spec.name]
  inputs = ex["inputs_pretokenized"].decode()
  targets = ex["targets_pretokenized"].decode()
  prefix = inputs.split(" ")[0]
  assert prefix and ":" not in prefix and inputs.split(" ")[1].endswith(":"), inputs[:80]
  if spec.label_words:
    assert targets in spec.label_words
  if spec.name == "glue_stsb":
    value = float(targets)
    assert 0.0 <= value <= 5.0 and abs(value * 5 - round(value * 5)) < 1e-6


def test_the_real_t5_vocabulary_is_used(t5_vocab):
  assert vocabulary.DeferredVocabulary().encode("The quick brown fox") == [37, 1704, 4216, 3, 20400]
  assert t5_vocab.vocab_size == 32100 and t5_vocab.eos_id == EOS


def test_vocabulary_defaults_to_t5_and_is_overridable(monkeypatch):
  monkeypatch.delenv(vocabulary.VOCAB_PATH_ENV, raising=False)
  assert vocabulary.get_vocabulary().sentencepiece_model_file == vocabulary.DEFAULT_VOCAB_PATH
  assert vocabulary.get_vocabulary("/x/spm.model").sentencepiece_model_file == "/x/spm.model"
  monkeypatch.setenv(vocabulary.VOCAB_PATH_ENV, "/y/spm.model")
  assert vocabulary.get_vocabulary().sentencepiece_model_file == "/y/spm.model"


def test_all_paper_tasks_and_variants_are_registered():
  assert len(SPECS) == 24  # The paper's 23 datasets and WNLI (the original's ATTEMPT-m GLUE group).
  names = set(seqio.TaskRegistry.names())
  for name, spec in SPECS.items():
    assert name in names
    for k in (4, 16, 32):
      for seed in (0, 1, 2):
        assert f"{name}_k{k}_seed{seed}" in names
    assert (f"{name}_rank" in names) == bool(spec.label_words)
  assert {task_ids.TASK_IDS[name] for name in SPECS} == set(range(24))  # The paper's block of ids, WNLI.
  assert len(set(task_ids.TASK_IDS.values())) == len(task_ids.TASK_IDS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_task_yields_well_formed_examples(mock_tfds, name):
  """Each task's test split: tokenized, EOS-terminated, prefixed, label words, task id."""
  spec = SPECS[name]
  examples = _examples(name, "test")
  assert examples, name
  for ex in examples[:8]:
    _check_example(ex, spec, mock_tfds)
  if name in ("squad", "superglue_record") or name.startswith("mrqa_"):
    for ex in examples:
      assert ex["targets_pretokenized"] in list(ex["answers"]) or not len(ex["answers"])


@pytest.mark.parametrize("name", ["glue_mnli", "superglue_multirc", "superglue_record", "yelp_polarity"])
def test_train_and_validation_splits(mock_tfds, name):
  spec = SPECS[name]
  for split in ("train", "validation"):
    examples = _examples(name, split, {"inputs": 32, "targets": 8})
    assert examples
    ex = examples[0]
    assert len(ex["inputs"]) <= 32 and ex["inputs"][-1] == EOS and len(ex["targets"]) <= 8
    assert int(ex["task_id"][0]) == spec.global_task_id
  if name == "superglue_record":  # Training: one example per gold answer.
    raw = list(spec.source().get_dataset("train").as_numpy_iterator())
    assert len(_examples(name, "train")) == sum(len(r["answers"]) for r in raw)


@pytest.mark.parametrize("name", ["superglue_boolq_k4_seed0", "superglue_cb_k16_seed1", "scitail_k32_seed2"])
def test_few_shot_tasks(mock_tfds, name):
  k = int(name.split("_k")[1].split("_")[0])
  examples = _examples(name, "train")
  assert len(examples) == k
  base = name.split("_k")[0]
  for ex in examples:
    _check_example(ex, SPECS[base], mock_tfds)


def test_mixtures_and_capped_rates(mock_tfds):
  expected = {"attempt_source_mixture": 6, "glue_mixture": 8, "superglue_mixture": 5, "mrqa_mixture": 4,
              "others_mixture": 4, "attempt_m_glue_mixture": 9, "attempt_m_superglue_mixture": 4,
              "attempt_m_others_mixture": 4}
  for name, size in expected.items():
    assert len(seqio.get_mixture_or_task(name).tasks) == size, name
  assert task_ids.task_names_of("attempt_m_superglue_mixture") == [
      "superglue_boolq", "superglue_cb", "superglue_wic", "superglue_wsc"]
  mixture = seqio.get_mixture_or_task("others_mixture")
  winogrande = seqio.get_mixture_or_task("winogrande")
  assert mixture.get_rate(winogrande) == MOCK_EXAMPLES // 2  # carve_train on mock data: n - n // 2.
  assert mixtures.rate_num_examples(winogrande, maximum=7) == 7
  # The paper / original code concatenate the training sets: no cap by default; T5's cap is the option.
  assert mixtures.DEFAULT_RATE_CAP is None and mixtures.T5_RATE_CAP == 100_000


# ------------------------------------------------------------------------------------ formatters
def _format(formatter, example):
  out = formatter({k: tf.constant(v) if not isinstance(v, dict) else {kk: tf.constant(vv) for kk, vv in v.items()}
                   for k, v in example.items()})
  return {k: v.numpy() for k, v in out.items()}


def test_mnli_format():
  out = _format(SPECS["glue_mnli"].formatter,
                {"premise": "A man eats.", "hypothesis": "Someone eats.", "label": np.int64(2)})
  assert out == {"inputs": b"mnli premise: A man eats. hypothesis: Someone eats.", "targets": b"contradiction"}


def test_winogrande_shows_both_options():
  out = _format(SPECS["winogrande"].formatter,
                {"sentence": "It did not fit because _ was big.", "option1": "trophy", "option2": "suitcase",
                 "label": np.int64(0)})
  assert out["inputs"] == (b"winogrande sentence: It did not fit because _ was big. option1: trophy "
                           b"option2: suitcase")
  assert out["targets"] == b"option1"


@pytest.mark.parametrize("label, text", [(3.47, b"3.4"), (3.53, b"3.6"), (0.0, b"0.0"), (5.0, b"5.0"),
                                         (1.1, b"1.2")])
def test_stsb_targets_on_the_0_2_grid(label, text):
  assert preprocessors.stsb_target(tf.constant(label)).numpy() == text


def test_wsc_marks_noun_and_pronoun():
  out = _format(SPECS["superglue_wsc"].formatter, {
      "text": "Mark told Pete many lies about himself , which Pete included in his book .",
      "span1_index": np.int32(0), "span1_text": "Mark", "span2_index": np.int32(6),
      "span2_text": "himself", "label": np.int64(1)})
  assert out["inputs"] == (b"wsc text: * Mark * told Pete many lies about # himself # , which Pete "
                           b"included in his book .")
  assert out["targets"] == b"True"


def test_wsc_multi_word_span_and_out_of_range_index():
  marked = preprocessors.mark_spans(tf.constant("the big dog barked"),
                                    [(tf.constant("big dog"), tf.constant(1), "*"),
                                     (tf.constant("it"), tf.constant(9), "#")])
  assert marked.numpy() == b"the * big dog * barked"


def test_multirc_format_and_group():
  out = _format(SPECS["superglue_multirc"].formatter, {
      "paragraph": "Tom <b>left</b> early.<br>Sam stayed.", "question": "Who left?", "answer": "Tom",
      "label": np.int64(1), "idx": {"paragraph": np.int32(3), "question": np.int32(7)}})
  assert out["inputs"] == b"multirc question: Who left? answer: Tom paragraph: Tom left early. Sam stayed."
  assert out["group"] == b"3/7" and out["targets"] == b"True"


def test_record_format():
  out = _format(SPECS["superglue_record"].formatter, {
      "passage": "Denver won.\n@highlight\nBroncos beat Panthers\n@highlight\nGreat game",
      "query": "@placeholder won the title.", "entities": ["Denver", "Panthers"], "answers": ["Denver"]})
  assert out["inputs"] == (b"record query: @placeholder won the title. entities: Denver, Panthers passage: "
                           b"Denver won. Broncos beat Panthers. Great game")
  assert out["targets"] == b"Denver"


def test_squad_format_pads_punctuation():
  out = _format(SPECS["squad"].formatter, {"question": "Who won?", "context": "Denver won, 24-10.",
                                           "answers": {"text": ["Denver", "Denver Broncos"]}})
  assert out["inputs"] == b"squad question: Who won ? context: Denver won , 24 - 10 ."
  assert out["targets"] == b"Denver" and list(out["answers"]) == [b"Denver", b"Denver Broncos"]


def test_out_of_range_label_names_the_task():
  with pytest.raises(tf.errors.InvalidArgumentError, match="glue_rte: label outside"):
    _format(SPECS["glue_rte"].formatter, {"sentence1": "a", "sentence2": "b", "label": np.int64(-1)})


# ------------------------------------------------------------------------- task ids and converter
def test_local_task_ids():
  remap = task_ids.LocalTaskIds(["glue_rte", "glue_mrpc_k4_seed0"])
  np.testing.assert_array_equal(remap(np.array([8, 7, 8])), [0, 1, 0])
  with pytest.raises(ValueError, match="'glue_cola' .*not among the 2 tasks"):
    remap(np.array([8, 9]))
  assert task_ids.task_id("superglue_cb_k16_seed0") == task_ids.task_id("superglue_cb_rank") == 14
  with pytest.raises(KeyError, match="no global id"):
    task_ids.task_id("imdb")


def test_feature_converter_carries_task_ids(mock_tfds):
  task = seqio.get_mixture_or_task("glue_rte")
  ds = task.get_dataset({"inputs": 32, "targets": 4}, split="validation", shuffle=False)
  converter = feature_converter.TaskIdEncDecFeatureConverter()
  batch = next(converter(ds, {"inputs": 32, "targets": 4}).batch(3).as_numpy_iterator())
  assert set(batch) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights", "task_ids"}
  assert batch["encoder_input_tokens"].shape == (3, 32) and batch["decoder_target_tokens"].shape == (3, 4)
  np.testing.assert_array_equal(batch["task_ids"], [8, 8, 8])
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], batch["decoder_target_tokens"][:, :-1])
  shapes = feature_converter.model_input_shapes({"inputs": 32, "targets": 4}, batch_size=3)
  assert shapes == {k: v.shape for k, v in batch.items()}

  local = feature_converter.TaskIdEncDecFeatureConverter(task_names=["glue_mrpc", "glue_rte"])
  batch = next(local(ds, {"inputs": 32, "targets": 4}).batch(3).as_numpy_iterator())
  np.testing.assert_array_equal(batch["task_ids"], [1, 1, 1])
  wrong = feature_converter.TaskIdEncDecFeatureConverter(task_names=["glue_mrpc"])
  with pytest.raises(tf.errors.InvalidArgumentError, match="glue_rte"):
    next(wrong(ds, {"inputs": 32, "targets": 4}).as_numpy_iterator())
  with pytest.raises(ValueError, match="cannot pack"):
    feature_converter.TaskIdEncDecFeatureConverter(pack=True)


def test_feature_converter_requires_task_id():
  ds = tf.data.Dataset.from_tensors({"inputs": tf.constant([5, 1]), "targets": tf.constant([6, 1])})
  with pytest.raises(ValueError, match="no 'task_id' feature"):
    feature_converter.TaskIdEncDecFeatureConverter()(ds, {"inputs": 4, "targets": 4})
  out = feature_converter.TaskIdEncDecFeatureConverter(default_task_id=3)(ds, {"inputs": 4, "targets": 4})
  assert next(out.as_numpy_iterator())["task_ids"] == 3


# ------------------------------------------------------------------- fidelity to the original code
# The `task_name` lists of the original code's multi-task configs (AkariAsai/ATTEMPT,
# attempt/configs/attempt/eval_glue.json -- the released attempt_mt_glue model --,
# multi_task_superglue.json, multi_task_others.json), copied from them, with this project's task names.
ORIGINAL_CONFIG_TASKS = {
    "attempt_m_glue_mixture": ["mnli", "qqp", "qnli", "sst2", "rte", "mrpc", "wnli", "stsb", "cola"],
    "attempt_m_superglue_mixture": ["superglue-boolq", "superglue-cb", "superglue-wic", "superglue-wsc.fixed"],
    "attempt_m_others_mixture": ["paws", "winogrande", "scitail", "yelp_polarity"],
}
OUR_NAME = {"mnli": "glue_mnli", "qqp": "glue_qqp", "qnli": "glue_qnli", "sst2": "glue_sst2", "rte": "glue_rte",
            "mrpc": "glue_mrpc", "wnli": "glue_wnli", "stsb": "glue_stsb", "cola": "glue_cola",
            "superglue-boolq": "superglue_boolq", "superglue-cb": "superglue_cb", "superglue-wic": "superglue_wic",
            "superglue-wsc.fixed": "superglue_wsc", "paws": "paws_wiki", "winogrande": "winogrande",
            "scitail": "scitail", "yelp_polarity": "yelp_polarity"}


def test_attempt_m_groups_are_the_original_configs_in_their_order():
  for mixture, original in ORIGINAL_CONFIG_TASKS.items():
    ours = [OUR_NAME[name] for name in original]
    assert list(mixtures.ORIGINAL_TASK_ORDER[mixture]) == ours
    assert sorted(t.name for t in seqio.get_mixture_or_task(mixture).tasks) == sorted(ours)
  assert task_ids.task_names_of("attempt_m_glue_mixture") == sorted(mixtures.ORIGINAL_TASK_ORDER[
      "attempt_m_glue_mixture"])  # The default local order stays the sorted names.


class _SizedTask:
  """Stands in for a seqio.Task in `rate_num_examples`: its number of training examples."""

  def __init__(self, name, n):
    self.name, self.n, self.cache_dir = name, n, None

  def num_input_examples(self, split):
    assert split == "train"
    return self.n


def test_glue_group_rates_concatenate_by_default_and_cap_as_an_option():
  # Training-set sizes of the 9 tasks (docs/tasks.md's table; WNLI 635).
  sizes = {"glue_mnli": 392_702, "glue_qqp": 362_846, "glue_qnli": 103_743, "glue_sst2": 66_349,
           "glue_rte": 2_490, "glue_mrpc": 3_668, "glue_wnli": 635, "glue_stsb": 5_749, "glue_cola": 8_551}
  tasks = [_SizedTask(n, k) for n, k in sizes.items()]

  def share_of_mnli(**kwargs):
    rates = {t.name: mixtures.rate_num_examples(t, **kwargs) for t in tasks}
    return rates["glue_mnli"] / sum(rates.values())

  # Concatenation: MNLI's share is its share of the examples, 392,702 / 946,733.
  assert share_of_mnli() == pytest.approx(392_702 / 946_733) == pytest.approx(0.4148, abs=1e-4)
  capped = 100_000 / (3 * 100_000 + 66_349 + 2_490 + 3_668 + 635 + 5_749 + 8_551)
  assert share_of_mnli(maximum=mixtures.T5_RATE_CAP) == pytest.approx(capped) == pytest.approx(0.2581, abs=1e-4)


def test_wnli_task():
  spec = SPECS["glue_wnli"]
  assert spec.label_words == ("not_entailment", "entailment")  # TFDS class order: 0 is not_entailment.
  assert spec.plan.kind == "halve_validation" and task_ids.task_id("glue_wnli") == 23
  out = _format(spec.formatter, {"sentence1": "The cat sat.", "sentence2": "It sat.", "label": np.int64(1)})
  assert out == {"inputs": b"wnli sentence1: The cat sat. sentence2: It sat.", "targets": b"entailment"}


def _with_prefix_style(style, fn):
  import gin  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    gin.bind_parameter("prompt_mix.data.preprocessors.get_prefix_style.prefix_style", style)
  try:
    return fn()
  finally:
    gin.clear_config()


QA_EXAMPLE = {"question": "Who?", "context": "Tom.", "answers": ["Tom"]}


@pytest.mark.parametrize("name, example, short, original, none", [
    ("superglue_boolq", {"question": "q", "passage": "p", "label": np.int64(1)},
     b"boolq question: q passage: p", b"superglue-boolq question: q passage: p", b"question: q passage: p"),
    ("superglue_wsc", {"text": "He ran .", "span1_index": np.int32(0), "span1_text": "He",
                       "span2_index": np.int32(1), "span2_text": "ran", "label": np.int64(0)},
     b"wsc text: * He * # ran # .", b"superglue-wsc.fixed text: * He * # ran # .", b"text: * He * # ran # ."),
    ("superglue_record", {"passage": "P.", "query": "@placeholder won.", "entities": ["A"], "answers": ["A"]},
     b"record query: @placeholder won. entities: A passage: P.",
     b"superglue-record record query: @placeholder won. entities: A passage: P.",
     b"record query: @placeholder won. entities: A passage: P."),
    ("mrqa_natural_questions", QA_EXAMPLE, b"nq question: Who ? context: Tom .",
     b"squad question: Who ? context: Tom .", b"question: Who ? context: Tom ."),
    ("mrqa_newsqa", QA_EXAMPLE, b"newsqa question: Who ? context: Tom .",
     b"squad question: Who ? context: Tom .", b"question: Who ? context: Tom ."),
    ("glue_mnli", {"premise": "a", "hypothesis": "b", "label": np.int64(0)},
     b"mnli premise: a hypothesis: b", b"mnli premise: a hypothesis: b", b"premise: a hypothesis: b"),
])
def test_prefix_styles(name, example, short, original, none):
  """'original' reproduces the original code's inputs: its task names, and `squad` for all four MRQA
  datasets (its code formats them with its SQuAD task, `name = "squad"`)."""
  formatter = SPECS[name].formatter
  assert _format(formatter, example)["inputs"] == short
  assert _with_prefix_style("original", lambda: _format(formatter, example))["inputs"] == original
  assert _with_prefix_style("none", lambda: _format(formatter, example))["inputs"] == none
