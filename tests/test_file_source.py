"""Tasks read local JSONL / TSV files instead of TFDS when a data directory is configured."""

import json

import gin
import numpy as np
import pytest
import seqio

from prompt_mix.data import file_source
from prompt_mix.data import metrics
from prompt_mix.data import postprocessors
from prompt_mix.data import preprocessors
from prompt_mix.data import registration as reg
from prompt_mix.data import splits
from prompt_mix.data import task_ids
from prompt_mix.data import vocabulary
import prompt_mix_tasks  # pylint: disable=unused-import


@pytest.fixture
def data_dir(tmp_path, monkeypatch, t5_vocab_path):
  monkeypatch.setenv(vocabulary.VOCAB_PATH_ENV, str(t5_vocab_path))
  monkeypatch.setenv(file_source.DATA_DIR_ENV, str(tmp_path))
  return tmp_path


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rte_rows(n, offset=0):
  return [{"sentence1": f"premise number {i}", "sentence2": f"hypothesis {i}",
           "label": "entailment" if i % 2 else 1, "idx": i} for i in range(offset, offset + n)]


def _texts(name, split):
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  return [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode(), ex)
          for ex in ds.as_numpy_iterator()]


def test_jsonl_task_applies_the_paper_splits(data_dir):
  _write_jsonl(data_dir / "glue_rte" / "train.jsonl", _rte_rows(5))
  _write_jsonl(data_dir / "glue_rte" / "validation.jsonl", _rte_rows(7, offset=100))
  train, dev, test = (_texts("glue_rte", s) for s in splits.SPLITS)
  assert (len(train), len(dev), len(test)) == (5, 3, 4)
  assert train[1][:2] == ("rte sentence1: premise number 1 sentence2: hypothesis 1", "entailment")
  assert train[0][1] == "not_entailment"  # Label 1 as an integer class id.
  assert not {t[0] for t in dev} & {t[0] for t in test}
  assert {t[0] for t in dev} | {t[0] for t in test} == {
      f"rte sentence1: premise number {i} sentence2: hypothesis {i}" for i in range(100, 107)}
  ex = train[1][2]
  vocab = vocabulary.get_vocabulary()
  assert list(ex["inputs"]) == vocab.encode(train[1][0]) + [1] and int(ex["task_id"][0]) == 8


def test_tsv_with_nested_fields_and_lists(data_dir):
  rows = ["paragraph\tquestion\tanswer\tlabel\tidx/paragraph\tidx/question"]
  for q in range(4):
    for a in range(2):
      rows.append(f"Para {q}.\tQuestion {q}?\tAnswer {a}\t{'True' if a else 'False'}\t0\t{q}")
  (data_dir / "superglue_multirc").mkdir()
  (data_dir / "superglue_multirc" / "validation.tsv").write_text("\n".join(rows) + "\n")
  dev, test = _texts("superglue_multirc", "validation"), _texts("superglue_multirc", "test")
  assert len(dev) == len(test) == 4  # Two whole questions each.
  assert {t[2]["group"] for t in dev}.isdisjoint({t[2]["group"] for t in test})
  assert dev[0][0].startswith("multirc question: Question ")

  squad = ["question\tcontext\tanswers/text", 'Who won?\tDenver won.\t["Denver", "Denver Broncos"]']
  (data_dir / "squad").mkdir()
  (data_dir / "squad" / "validation.tsv").write_text("\n".join(squad) + "\n")
  (test_example,) = _texts("squad", "test")
  assert test_example[:2] == ("squad question: Who won ? context: Denver won .", "Denver")
  assert list(test_example[2]["answers"]) == [b"Denver", b"Denver Broncos"]


def test_missing_file_names_the_path(data_dir):
  with pytest.raises(FileNotFoundError, match=f"{data_dir}/glue_cola/validation.jsonl"):
    _texts("glue_cola", "validation")


def test_missing_field_names_file_line_and_key(data_dir):
  _write_jsonl(data_dir / "glue_sst2" / "validation.jsonl",
               [{"sentence": "good", "label": 1}, {"text": "bad", "label": 0}])
  with pytest.raises(Exception, match=r"validation.jsonl:2: missing field 'sentence'"):
    _texts("glue_sst2", "test")


def test_bad_label_names_file_line_and_value(data_dir):
  _write_jsonl(data_dir / "glue_mnli" / "validation_matched.jsonl",
               [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
  with pytest.raises(Exception, match=r"validation_matched.jsonl:1: field 'label': expected a number or one "
                                      r"of \['entailment', 'neutral', 'contradiction'\], got 'maybe'"):
    _texts("glue_mnli", "test")


def test_gin_binding_sets_the_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv(file_source.DATA_DIR_ENV, raising=False)
  assert file_source.get_data_dir() is None
  with gin.unlock_config():
    gin.bind_parameter("prompt_mix.data.file_source.get_data_dir.data_dir", str(tmp_path))
  try:
    assert file_source.get_data_dir() == str(tmp_path)
  finally:
    gin.clear_config()


def test_a_user_task_registered_as_documented(data_dir):
  """docs/tasks.md, 'Registering a new task', with local files."""
  name = "test_local_reviews"
  words = ("negative", "positive")
  new_id = task_ids.register_task_id(name, max(task_ids.TASK_IDS.values()) + 1)
  try:
    reg.register(reg.TaskSpec(
        name=name, tfds_name="imdb_reviews/plain_text:1.0.0",
        features={"text": reg.TEXT, "label": reg.CLASS}, plan=splits.carve_train(test="test"),
        formatter=preprocessors.classification("reviews", [("sentence", "text")], words, name),
        postprocess_fn=postprocessors.class_id(words), metric_fns=(metrics.accuracy,), label_words=words),
        few_shot_ks=(4,), few_shot_seeds=(0,))
    _write_jsonl(data_dir / name / "train.jsonl", [{"text": f"review {i}", "label": i % 2} for i in range(12)])
    _write_jsonl(data_dir / name / "test.jsonl", [{"text": "fine", "label": 1}])
    assert [len(_texts(name, s)) for s in splits.SPLITS] == [6, 6, 1]
    assert len(_texts(f"{name}_k4_seed0", "train")) == 4
    (row,) = _texts(name, "test")
    assert row[:2] == ("reviews sentence: fine", "positive") and int(row[2]["task_id"][0]) == new_id
    rank_rows = _texts(f"{name}_rank", "test")
    assert [r[1] for r in rank_rows] == list(words)
  finally:
    for task in (name, f"{name}_k4_seed0", f"{name}_rank"):
      seqio.TaskRegistry.remove(task)
    task_ids.TASK_IDS.pop(name)


def test_read_examples_parses_types(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tmp_path / "x.jsonl"
  _write_jsonl(path, [{"score": "3.5", "words": ["a", "b"], "idx": {"q": 2}}])
  spec = {"score": tf.TensorSpec([], tf.float32), "words": tf.TensorSpec([None], tf.string),
          "idx": {"q": tf.TensorSpec([], tf.int32)}}
  (ex,) = list(file_source.read_examples(path, spec))
  assert ex == {"score": 3.5, "words": ["a", "b"], "idx": {"q": 2}}
  ds = file_source.load_split(path, spec)
  assert int(ds.cardinality()) == 1
  out = next(ds.as_numpy_iterator())
  assert out["idx"]["q"] == 2 and np.isclose(out["score"], 3.5)


# ------------------------------------------------------------------------------------ TSV quoting
TRICKY = ['He said "hi".', 'tab\tinside', 'two\nlines', '"quoted whole"', 'trailing quote"', '', '""',
          'crlf\r\ninside', 'plain']


def _sentence_spec():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"sentence": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64)}


def test_tsv_written_by_the_csv_module_round_trips(tmp_path):
  import csv  # pylint: disable=g-import-not-at-top
  path = tmp_path / "train.tsv"
  rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(TRICKY)]
  with path.open("w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t")
    writer.writeheader()
    writer.writerows(rows)
  assert '""hi""' in path.read_text()  # Quoted as the csv module quotes.
  assert list(file_source.read_examples(path, _sentence_spec())) == rows


def test_tsv_in_pandas_style_round_trips(tmp_path):
  """What `DataFrame.to_csv(path, sep='\\t')` writes (and HF `Dataset.to_csv(sep='\\t')`, through pandas):
  an unnamed index column first, QUOTE_MINIMAL quoting with doubled quotes. Written out by hand here."""
  path = tmp_path / "train.tsv"
  path.write_text('\tsentence\tlabel\n0\t"He said ""hi""."\t1\n1\t"tab\tinside"\t0\n2\t"two\nlines"\t1\n'
                  '3\t"""quoted whole"""\t0\n4\tplain\t1\n', encoding="utf-8")
  assert list(file_source.read_examples(path, _sentence_spec())) == [
      {"sentence": 'He said "hi".', "label": 1}, {"sentence": "tab\tinside", "label": 0},
      {"sentence": "two\nlines", "label": 1}, {"sentence": '"quoted whole"', "label": 0},
      {"sentence": "plain", "label": 1}]


def test_tsv_written_by_pandas_round_trips(tmp_path):
  pd = pytest.importorskip("pandas", reason="pandas is not installed; the hand-written pandas-style file "
                                            "above covers its format")
  path = tmp_path / "train.tsv"
  frame = pd.DataFrame({"sentence": TRICKY, "label": [i % 2 for i in range(len(TRICKY))]})
  frame.to_csv(path, sep="\t")
  got = list(file_source.read_examples(path, _sentence_spec()))
  assert got == [{"sentence": s, "label": i % 2} for i, s in enumerate(TRICKY)]


def test_quoted_tsv_through_a_task(data_dir):
  import csv  # pylint: disable=g-import-not-at-top
  (data_dir / "glue_sst2").mkdir()
  with (data_dir / "glue_sst2" / "validation.tsv").open("w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(["sentence", "label"])
    writer.writerow(['a "great"\tfilm', "positive"])
  (row,) = _texts("glue_sst2", "test")
  assert row[:2] == ('sst2 sentence: a "great"\tfilm', "positive")


def test_raw_tsv_needs_quoting_none_and_says_so(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text('sentence\tlabel\n"Hello," he said.\t1\nsay "hi"\t0\n', encoding="utf-8")
  with pytest.raises(file_source.DataFileError,
                     match=r"train.tsv:2: .*get_tsv_quoting.quoting = 'none'"):
    list(file_source.read_examples(path, _sentence_spec()))
  with gin.unlock_config():
    gin.bind_parameter("prompt_mix.data.file_source.get_tsv_quoting.quoting", "none")
  try:
    got = list(file_source.read_examples(path, _sentence_spec()))
  finally:
    gin.clear_config()
  assert got == [{"sentence": '"Hello," he said.', "label": 1}, {"sentence": 'say "hi"', "label": 0}]


def test_tsv_row_with_the_wrong_number_of_fields(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("sentence\tlabel\ngood\t1\nan unquoted\ttab\t0\n", encoding="utf-8")
  with pytest.raises(file_source.DataFileError, match=r"train.tsv:3: 3 fields but the header has 2"):
    file_source.check_file(path, _sentence_spec())


# ------------------------------------------------------------------- errors name file, line, value
def _check(tmp_path, content: bytes, name="train.jsonl", **kwargs):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(file_source.DataFileError) as info:
    file_source.load_split(path, _sentence_spec(), **kwargs)
  message = str(info.value)
  assert "\n" not in message and message.startswith(str(path))
  return message


@pytest.mark.parametrize("label, expected", [
    ("1.7", "expected an integer class id, got 1.7"), ("1.5e0", "expected an integer class id, got 1.5"),
    ('"1.7"', "expected an integer class id, got '1.7'"), ("true", "expected an integer class id, got True"),
    ('"one"', "expected a number, got 'one'")])
def test_non_integer_label_is_an_error(tmp_path, label, expected):
  good = b'{"sentence": "fine", "label": 1}\n'
  message = _check(tmp_path, good + f'{{"sentence": "x", "label": {label}}}\n'.encode(),
                   num_classes={"label": 2})
  assert message.endswith(f":2: field 'label': {expected}")


def test_integral_float_label_reads_as_its_integer(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"sentence": "x", "label": 1.0}\n{"sentence": "y", "label": "0.0"}\n')
  assert [ex["label"] for ex in file_source.read_examples(path, _sentence_spec(), num_classes={"label": 2})] \
      == [1, 0]


def test_label_out_of_range(tmp_path):
  message = _check(tmp_path, b'{"sentence": "x", "label": 3}\n',
                   label_names={"label": ("entailment", "neutral", "contradiction")})
  assert message.endswith("train.jsonl:1: field 'label': class id 3 is outside [0, 3) "
                          "(0 = entailment, 1 = neutral, 2 = contradiction)")
  message = _check(tmp_path, b'{"sentence": "x", "label": -1}\n', num_classes={"label": 2})
  assert "class id -1 is outside [0, 2)" in message


def test_bad_json_line(tmp_path):
  message = _check(tmp_path, b'{"sentence": "x", "label": 1}\n{"sentence": "y", "label": 0\n')
  assert ":2: not valid JSON (Expecting ',' delimiter at column" in message


def test_missing_field(tmp_path):
  message = _check(tmp_path, b'{"sentence": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
  assert ":3: missing field 'sentence'" in message


@pytest.mark.parametrize("content, name", [(b"", "train.jsonl"), (b"\n\n  \n", "train.jsonl"),
                                           (b"sentence\tlabel\n", "train.tsv"), (b"", "train.tsv")])
def test_empty_file(tmp_path, content, name):
  assert "the file holds no examples" in _check(tmp_path, content, name=name)


def test_non_utf8_byte(tmp_path):
  message = _check(tmp_path, b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n')
  assert ":2: byte 0xe9 at column 18 is not UTF-8" in message
  message = _check(tmp_path, b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n", name="train.tsv")
  assert ":3: byte 0xe9 at column 4 is not UTF-8" in message


def test_byte_order_mark_is_accepted(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_bytes("sentence\tlabel\nok\t1\n".encode("utf-8-sig"))
  assert list(file_source.read_examples(path, _sentence_spec())) == [{"sentence": "ok", "label": 1}]


def test_task_errors_come_before_tensorflow(data_dir):
  """A bad row anywhere in the file stops `get_dataset` with a plain DataFileError (the binaries print it
  as a one-line FATAL), not an error from inside the TF pipeline."""
  rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(50)] + [{"sentence": "bad", "label": 1.7}]
  _write_jsonl(data_dir / "glue_sst2" / "validation.jsonl", rows)
  with pytest.raises(file_source.DataFileError, match=r"validation.jsonl:51: field 'label'"):
    seqio.get_mixture_or_task("glue_sst2").get_dataset(None, split="test", shuffle=False)


# -------------------------------------------------------------------- datasets' own numeral labels
@pytest.mark.parametrize("numeral_labels, labels, ok", [
    ("dataset", ["1", "2", 2, 1], True), ("dataset", [0, 1], False),
    ("class_id", [0, 1, "1", "0"], True), ("class_id", [1, 2], False)])
def test_winogrande_labels(data_dir, numeral_labels, labels, ok):
  rows = [{"sentence": f"It was _ {i}.", "option1": "A", "option2": "B", "label": label}
          for i, label in enumerate(labels)]
  _write_jsonl(data_dir / "winogrande" / "validation.jsonl", rows)
  with gin.unlock_config():
    gin.bind_parameter("prompt_mix.data.file_source.get_numeral_labels.numeral_labels", numeral_labels)
  try:
    if ok:
      targets = [t[1] for t in _texts("winogrande", "test")]
    else:
      with pytest.raises(file_source.DataFileError) as info:
        _texts("winogrande", "test")
  finally:
    gin.clear_config()
  if ok:
    first = 1 if numeral_labels == "dataset" else 0  # The label of option1.
    assert targets == ["option1" if _int(label) == first else "option2" for label in labels]
  else:
    other = "class_id" if numeral_labels == "dataset" else "dataset"
    assert f"numeral_labels = '{other}'" in str(info.value)


def _int(label):
  return int(label)


def test_yelp_polarity_labels_are_the_datasets_own(data_dir):
  _write_jsonl(data_dir / "yelp_polarity" / "test.jsonl",
               [{"text": "Great tacos!", "label": 2}, {"text": "Cold fries.", "label": "1"}])
  assert [t[:2] for t in _texts("yelp_polarity", "test")] == [
      ("yelp_polarity sentence: Great tacos!", "positive"), ("yelp_polarity sentence: Cold fries.", "negative")]
