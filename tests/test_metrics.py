"""Metrics and postprocessors against sklearn / scipy on random predictions, the official SQuAD / MRQA
script's definitions (re-stated below), and hand-computed cases."""

import gin
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from prompt_mix.data import metrics
from prompt_mix.data import postprocessors

SEEDS = [0, 1, 2]


def _random_classes(seed, n=200, num_classes=2, invalid_rate=0.0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, num_classes, n)
  predictions = rng.integers(0, num_classes, n)
  invalid = rng.random(n) < invalid_rate
  predictions[invalid] = postprocessors.INVALID
  return targets.tolist(), predictions.tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed):
  targets, predictions = _random_classes(seed, num_classes=3, invalid_rate=0.1)
  expected = 100 * sklearn.metrics.accuracy_score(targets, predictions)
  assert metrics.accuracy(targets, predictions) == {"accuracy": pytest.approx(expected)}


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_matches_sklearn_and_counts_invalid_as_wrong(seed):
  targets, predictions = _random_classes(seed, invalid_rate=0.15)
  # An invalid prediction is replaced by the wrong class before sklearn's binary F1.
  fixed = [1 - t if p == postprocessors.INVALID else p for t, p in zip(targets, predictions)]
  expected = 100 * sklearn.metrics.f1_score(targets, fixed)
  assert metrics.f1(targets, predictions)["f1"] == pytest.approx(expected)


def test_f1_hand_case():
  # tp=1 (idx 0), fn=1 (idx 1: invalid on a positive), fp=1 (idx 2: invalid on a negative -> 1).
  targets = [1, 1, 0, 0]
  predictions = [1, -1, -1, 0]
  precision, recall = 1 / 2, 1 / 2
  assert metrics.f1(targets, predictions)["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed):
  targets, predictions = _random_classes(seed, num_classes=3, invalid_rate=0.1)
  expected = 100 * sklearn.metrics.f1_score(targets, predictions, labels=[0, 1, 2], average="macro")
  assert metrics.macro_f1(3)(targets, predictions)["macro_f1"] == pytest.approx(expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_matthews_matches_sklearn(seed):
  targets, predictions = _random_classes(seed)
  expected = 100 * sklearn.metrics.matthews_corrcoef(targets, predictions)
  assert metrics.matthews_corrcoef(targets, predictions)["matthews_corrcoef"] == pytest.approx(expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_pearson_spearman_match_scipy(seed):
  rng = np.random.default_rng(seed)
  targets = np.round(rng.uniform(0, 5, 100) * 5) / 5
  predictions = np.clip(targets + rng.normal(0, 1, 100), 0, 5)
  assert metrics.pearson(targets, predictions)["pearson"] == pytest.approx(
      100 * scipy.stats.pearsonr(targets, predictions)[0])
  assert metrics.spearman(targets, predictions)["spearman"] == pytest.approx(
      100 * scipy.stats.spearmanr(targets, predictions)[0])


def test_correlations_of_constant_predictions_are_zero():
  assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"pearson": 0.0}
  assert metrics.spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"spearman": 0.0}


def test_multirc_groups_answers_per_question():
  def rows(group, values):
    return [{"group": group, "value": v} for v in values]

  # Question a: both answers right. b: one of two wrong. c: its single answer right.
  targets = rows("0/a", [1, 0]) + rows("0/b", [1, 1]) + rows("1/c", [0])
  predictions = rows("0/a", [1, 0]) + rows("0/b", [1, 0]) + rows("1/c", [0])
  assert metrics.multirc_exact_match(targets, predictions) == {"exact_match": pytest.approx(100 * 2 / 3)}
  flat_t = [t["value"] for t in targets]
  flat_p = [p["value"] for p in predictions]
  assert metrics.multirc_f1(targets, predictions)["f1"] == pytest.approx(
      100 * sklearn.metrics.f1_score(flat_t, flat_p))


@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an   apple,  a PEAR. ", "apple pear"),
    ("U.S. (2016)", "us 2016"),
    ("the", ""),
    ("Theater", "theater"),  # 'the' only as a word.
])
def test_squad_normalization(text, expected):
  assert metrics.normalize_squad(text) == expected


def test_squad_takes_the_max_over_gold_answers():
  targets = [["Broncos", "the Denver Broncos"], ["Denver Broncos"], ["Carolina Panthers", "Panthers"]]
  predictions = ["Denver Broncos", "Denver", "Seattle"]
  # EM: 1, 0, 0. F1: 1, 2*(1*0.5)/1.5, 0.
  result = metrics.squad(targets, predictions)
  assert result["em"] == pytest.approx(100 / 3)
  assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_squad_token_f1_hand_case():
  # Prediction 'a b c d' vs gold 'b c e' (no articles): common 2, precision 2/4, recall 2/3.
  result = metrics.squad([["bee cee eee"]], ["aye bee cee dee"])
  p, r = 2 / 4, 2 / 3
  assert result == {"em": 0.0, "f1": pytest.approx(100 * 2 * p * r / (p + r))}


def test_class_id_postprocessor():
  fn = postprocessors.class_id(("entailment", "neutral", "contradiction"))
  assert fn("neutral") == 1
  assert fn(b" contradiction ") == 2
  assert fn("maybe") == postprocessors.INVALID


def test_string_to_float_postprocessor():
  fn = postprocessors.string_to_float()
  assert fn("3.4") == 3.4
  assert fn("three") == -1.0


def test_qa_postprocessor_returns_all_gold_answers():
  example = {"answers": np.array([b"Denver Broncos", b"Broncos"], dtype=object)}
  assert postprocessors.qa("Denver Broncos", example=example, is_target=True) == ["Denver Broncos", "Broncos"]
  assert postprocessors.qa(b"Broncos", example=example, is_target=False) == "Broncos"


def test_multirc_postprocessor_reads_group():
  fn = postprocessors.multirc(("False", "True"))
  assert fn("True", example={"group": b"3/7"}, is_target=True) == {"group": "3/7", "value": 1}
  with pytest.raises(ValueError, match="group"):
    fn("True", example={}, is_target=True)


# ----------------------------------------------------------------------- official SQuAD / MRQA scoring
# A re-statement of the official scripts' definitions: SQuAD v1.1 `evaluate-v1.1.py` and MRQA 2019
# `mrqa_official_eval.py` (adapted from it; the functions below are identical in both).
def _official_normalize_answer(s):
  import re  # pylint: disable=g-import-not-at-top
  import string  # pylint: disable=g-import-not-at-top

  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  def lower(text):
    return text.lower()

  return white_space_fix(remove_articles(remove_punc(lower(s))))


def _official_f1_score(prediction, ground_truth):
  import collections  # pylint: disable=g-import-not-at-top
  prediction_tokens = _official_normalize_answer(prediction).split()
  ground_truth_tokens = _official_normalize_answer(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def _official_exact_match_score(prediction, ground_truth):
  return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


def _official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
  return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


def _official_evaluate(golds_per_example, predictions):
  f1 = exact_match = 0
  for ground_truths, prediction in zip(golds_per_example, predictions):
    exact_match += _official_metric_max_over_ground_truths(_official_exact_match_score, prediction,
                                                           ground_truths)
    f1 += _official_metric_max_over_ground_truths(_official_f1_score, prediction, ground_truths)
  return {"em": 100.0 * exact_match / len(predictions), "f1": 100.0 * f1 / len(predictions)}


# (gold answers, prediction): the issue's cases, punctuation inside and around tokens, articles, case,
# whitespace, non-ASCII punctuation (not removed by the official script), repeated tokens, empty strings.
QA_PAIRS = [
    (["U.S. Army"], "Army"),
    (["1–2 (3)"], "1–2"),
    (["U.S. Army"], "U.S. Army"),
    (["U.S. Army"], "U . S . Army"),
    (["Denver Broncos", "The Broncos"], "the Denver broncos!"),
    (["an apple a day"], "Apple, day."),
    (["theatre"], "the theatre"),
    (["Theodore Roosevelt"], "Roosevelt, Theodore"),
    (["24-10"], "24 - 10"),
    (["$5.3 billion"], "5.3 billion dollars"),
    (["“Yes”"], '"Yes"'),
    (["Zürich"], "Zurich"),
    (["François Hollande"], "François"),
    (["New York New York"], "New York"),
    (["a", "the"], ""),
    ([""], "something"),
    (["Mary's lamb"], "marys lamb"),
    (["  spaced\tout\n answer "], "spaced out answer"),
    (["1,000,000"], "1 000 000"),
    (["A.B.C.", "abc"], "A B C"),
    (["left-wing"], "left wing politics"),
    (["e.g."], "eg"),
    (["cat cat dog"], "cat dog dog"),
]


@pytest.mark.parametrize("golds, prediction", QA_PAIRS)
def test_squad_metric_equals_the_official_script_on_each_pair(golds, prediction):
  ours = metrics.squad([golds], [prediction])
  official = _official_evaluate([golds], [prediction])
  assert ours["em"] == pytest.approx(official["em"]) and ours["f1"] == pytest.approx(official["f1"])
  for gold in golds:
    assert metrics.normalize_squad(gold) == _official_normalize_answer(gold)


def test_squad_metric_equals_the_official_script_on_the_whole_set():
  golds = [g for g, _ in QA_PAIRS]
  predictions = [p for _, p in QA_PAIRS]
  ours, official = metrics.squad(golds, predictions), _official_evaluate(golds, predictions)
  assert ours == {"em": pytest.approx(official["em"]), "f1": pytest.approx(official["f1"])}


def test_the_issue_examples_score_as_the_official_script():
  assert metrics.squad([["U.S. Army"]], ["Army"])["f1"] == pytest.approx(200 / 3)  # 66.7, not 50.0.
  assert metrics.squad([["1–2 (3)"]], ["1–2"])["f1"] == pytest.approx(200 / 3)  # 66.7, not 85.7.


# ----------------------------------------------------------------- QA postprocessing: official / padded
def _squad_example(gold, context):
  """The SQuAD task's formatted example (its real formatter), as SeqIO hands it to the postprocessor."""
  import prompt_mix_tasks  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = prompt_mix_tasks.TASK_SPECS["squad"].formatter({
      "question": tf.constant("Which one?"), "context": tf.constant(context),
      "answers": {"text": tf.constant([gold])}})
  return {k: v.numpy() for k, v in out.items()}


def _score(example, prediction):
  targets = [postprocessors.qa(example["targets"], example=example, is_target=True)]
  return metrics.squad(targets, [postprocessors.qa(prediction, example=example, is_target=False)])


@pytest.mark.parametrize("gold, context, prediction, official_f1, padded_f1", [
    # The model writes padded text (what it is trained on): 'U . S . Army' or 'Army'.
    ("U.S. Army", "He served in the U.S. Army.", "Army", 200 / 3, 50.0),
    ("U.S. Army", "He served in the U.S. Army.", "U . S . Army", 100.0, 100.0),
    ("1–2 (3)", "It ended 1–2 (3) after extra time.", "1 – 2", 200 / 3, 600 / 7),
])
def test_qa_scoring_official_by_default_and_padded_as_an_option(gold, context, prediction, official_f1,
                                                                padded_f1):
  example = _squad_example(gold, context)
  assert example["targets"].decode() == postprocessors.pad_punctuation(gold)  # Trained on padded text.
  assert [a.decode() for a in example["gold_answers"]] == [gold]
  official = _score(example, prediction)
  recovered = postprocessors.qa(prediction, example=example, is_target=False)
  assert official["f1"] == pytest.approx(official_f1)
  assert official["f1"] == pytest.approx(_official_evaluate([[gold]], [recovered])["f1"])
  with gin.unlock_config():
    gin.bind_parameter("prompt_mix.data.postprocessors.get_qa_scoring.qa_scoring", "padded")
  try:
    padded = _score(example, prediction)
  finally:
    gin.clear_config()
  # T5's / the original's scoring: padded gold, prediction as generated, the same normalization.
  assert padded["f1"] == pytest.approx(padded_f1)
  assert padded["f1"] == pytest.approx(
      _official_evaluate([[postprocessors.pad_punctuation(gold)]], [prediction])["f1"])


def test_padded_joined_scoring_is_the_original_codes_single_joined_gold():
  """The original code's target (and so its only gold) is all padded answers joined by spaces."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import prompt_mix_tasks  # pylint: disable=g-import-not-at-top
  out = prompt_mix_tasks.TASK_SPECS["mrqa_newsqa"].formatter({
      "question": tf.constant("Who won?"), "context": tf.constant("The Denver Broncos won."),
      "answers": tf.constant(["Denver Broncos", "Broncos"])})
  example = {k: v.numpy() for k, v in out.items()}
  scores = {}
  for mode in ("official", "padded", "padded_joined"):
    with gin.unlock_config():
      gin.bind_parameter("prompt_mix.data.postprocessors.get_qa_scoring.qa_scoring", mode)
    try:
      scores[mode] = _score(example, "Broncos")["f1"]
    finally:
      gin.clear_config()
  # Gold 'denver broncos broncos' (3 tokens) vs 'broncos': precision 1, recall 1/3 -> F1 0.5.
  assert scores == {"official": 100.0, "padded": 100.0, "padded_joined": pytest.approx(50.0)}


def test_recover_span():
  context = "Units of the U.S. Army and the U. S. Navy met in 1–2 days."
  assert postprocessors.recover_span("U . S . Army", context) == "U.S. Army"
  assert postprocessors.recover_span("U . S . Navy", context) == "U. S. Navy"
  assert postprocessors.recover_span("Army", context) == "Army"  # Verbatim: kept.
  assert postprocessors.recover_span("1 – 2 days", context) == "1–2 days"
  assert postprocessors.recover_span("Air Force", context) == "Air Force"  # Not a span: unchanged.
  assert postprocessors.recover_span("", context) == ""


def test_qa_scoring_setting_is_checked():
  with pytest.raises(ValueError, match="qa_scoring must be one of"):
    postprocessors.get_qa_scoring("t5")


PAD_CASES = ["U.S. Army", "1–2 (3)", "a_b-c", "Zürich café", "“quoted”", "€5 $5 100%", "tab\there  two",
             "new\nline", "nbsp\u00a0here", "vt\x0bx", " leading and trailing. ", "", "...", "naïve résumé",
             "日本語、テスト。", "emoji 🙂 ok", "x\u2028y", "combining e\u0301", "under_score __init__"]


@pytest.mark.parametrize("text", PAD_CASES)
def test_python_pad_punctuation_equals_the_tf_formatter(text):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_mix.data import preprocessors  # pylint: disable=g-import-not-at-top
  expected = preprocessors.pad_punctuation(tf.constant(text)).numpy().decode()
  assert postprocessors.pad_punctuation(text) == expected


def test_python_pad_punctuation_equals_the_tf_formatter_on_random_text():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_mix.data import preprocessors  # pylint: disable=g-import-not-at-top
  pool = list("aZ09_ .,;:'\"()[]-–—“”‘’€$%&*+/\\|~`^@#!?\t\n\r\f\x0b\u00a0\u2009äéß日本🙂\u0301")
  rng = np.random.RandomState(0)
  texts = ["".join(rng.choice(pool, size=rng.randint(0, 30))) for _ in range(300)]
  padded_tf = preprocessors.pad_punctuation(tf.constant(texts)).numpy()
  for text, expected in zip(texts, padded_tf):
    assert postprocessors.pad_punctuation(text) == expected.decode(), repr(text)


def test_pad_punctuation_differs_from_t5s_as_documented():
  """T5's `_pad_punctuation` pads `[[:punct:]]` (ASCII punctuation, `_` included) and does not strip; ours
  (the original ATTEMPT code's) pads every non-letter/number/mark but `_`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_mix.data import preprocessors  # pylint: disable=g-import-not-at-top

  def t5_pad(text):  # t5.data.preprocessors._pad_punctuation, restated.
    text = tf.strings.regex_replace(text, r"([[:punct:]])", r" \1 ")
    return tf.strings.regex_replace(text, r"\s+", " ").numpy().decode()

  ours = lambda text: preprocessors.pad_punctuation(tf.constant(text)).numpy().decode()
  assert t5_pad("U.S. Army") == "U . S . Army" == ours("U.S. Army")  # ASCII punctuation: the same.
  assert t5_pad("1–2") == "1–2" and ours("1–2") == "1 – 2"  # Non-ASCII punctuation: only ours.
  assert t5_pad("a_b") == "a _ b" and ours("a_b") == "a_b"  # Underscore: only T5's.
  assert t5_pad("(x)") == " ( x ) " and ours("(x)") == "( x )"  # Ours is stripped.
