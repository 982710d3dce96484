"""Raw splits from local JSONL / TSV files instead of TFDS, for data a user already has on disk.

When a data directory is configured, every prompt_mix task reads its raw splits from

    {DATA_DIR}/{task_name}/{raw_split}.jsonl      (or .tsv)

e.g. `/data/glue_mnli/train.jsonl`, `/data/glue_mnli/validation_matched.jsonl`. `raw_split` is the TFDS
split name the task reads (see docs/tasks.md); the paper's train/dev/test derivation (`splits.py`) is
applied on top exactly as for TFDS. The data directory comes from (first set wins)
  1. gin: `prompt_mix.data.file_source.get_data_dir.data_dir = %DATA_DIR`;
  2. the environment variable `PROMPT_MIX_DATA_DIR`;
and when neither is set, tasks read TFDS. A configured directory without the file is an error naming the
missing path (there is no silent fallback to a download).

Fields are the TFDS feature names of the task (e.g. `premise`, `hypothesis`, `label`); nested TFDS features
are nested JSON objects (`{"idx": {"question": 3}}`) or, in TSV headers, '/'-joined paths (`idx/question`).
List features (`answers`, `entities`) are JSON arrays (in TSV: a JSON array in the cell). Extra fields are
ignored. Files are UTF-8 (a leading byte-order mark is allowed).

Labels. A class label is a 0-based TFDS class index or, where the TFDS class names are words, the name
(`"entailment"`). Where the dataset's own labels are numerals (WinoGrande's answers `1` / `2`, Yelp-2's
classes `1` / `2`; TFDS stores them as class 0 / 1), a file holds the dataset's own labels: `1` is class 0,
`2` class 1 (`get_numeral_labels` switches to 0-based class ids). A label must be an integer (`1.7` is an
error, `1.0` reads as 1) inside the task's classes.

TSV quoting. By default a `.tsv` file is read with standard CSV quoting (what Python's `csv` module, pandas'
`to_csv(sep='\\t')` and HF `datasets` exports write): a field may be enclosed in double quotes, inside
which `""` is one quote and tabs and newlines are text. Raw TSV files whose quotes are plain text (GLUE's
original files) need `get_tsv_quoting.quoting = 'none'`; read with the default, such a file usually stops
with an error that says so.

Every file is read and checked completely when its split is first used, before any TensorFlow pipeline
runs: a bad JSON line, a missing field, a bad or out-of-range label, a byte that is not UTF-8, a TSV row
with the wrong number of fields or an empty file raises `DataFileError` (a `ValueError`) naming the file,
the line, and what to do.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterator, Mapping, Optional, Sequence

import gin
import tensorflow as tf

DATA_DIR_ENV = "PROMPT_MIX_DATA_DIR"
EXTENSIONS = (".jsonl", ".tsv")
TSV_QUOTING = ("standard", "none")
NUMERAL_LABELS = ("dataset", "class_id")

FeatureSpec = Mapping[str, Any]  # Nested dict of tf.TensorSpec, mirroring the TFDS features.


class DataFileError(ValueError):
  """A local data file cannot be read as the task needs; the message names the file and line."""


@gin.configurable
def get_data_dir(data_dir: Optional[str] = None) -> Optional[str]:
  """The local data directory (`data_dir`, else $PROMPT_MIX_DATA_DIR), or None to read TFDS."""
  return data_dir or os.environ.get(DATA_DIR_ENV) or None


@gin.configurable
def get_tsv_quoting(quoting: str = "standard") -> str:
  """How `.tsv` files quote fields.

  Args:
    quoting: 'standard' (default): CSV quoting as Python's `csv` module, pandas and HF `datasets` write
      it; a quoted field may hold tabs, newlines and `""` (one quote). 'none': raw TSV, every character
      is text (GLUE's original files); a field cannot hold a tab or a newline.
  """
  if quoting not in TSV_QUOTING:
    raise ValueError(f"get_tsv_quoting.quoting must be one of {TSV_QUOTING}, got {quoting!r}")
  return quoting


@gin.configurable
def get_numeral_labels(numeral_labels: str = "dataset") -> str:
  """How a local file's labels read for tasks whose own labels are numerals (WinoGrande, Yelp-2).

  Args:
    numeral_labels: 'dataset' (default): the dataset's own labels, as the original files write them:
      WinoGrande's answer `1` / `2` (option1 / option2), Yelp-2's `1` / `2` (negative / positive).
      'class_id': 0-based TFDS class ids (0 / 1), as an export of the TFDS or HF `datasets` version holds.
  """
  if numeral_labels not in NUMERAL_LABELS:
    raise ValueError(f"get_numeral_labels.numeral_labels must be one of {NUMERAL_LABELS}, "
                     f"got {numeral_labels!r}")
  return numeral_labels


def split_path(data_dir: str, dir_name: str, raw_split: str) -> pathlib.Path:
  """The existing `{data_dir}/{dir_name}/{raw_split}.{jsonl|tsv}`; FileNotFoundError naming it if absent."""
  candidates = [pathlib.Path(data_dir) / dir_name / f"{raw_split}{ext}" for ext in EXTENSIONS]
  for path in candidates:
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"Task {dir_name!r}: no local file for raw split {raw_split!r}: expected {candidates[0]} "
      f"(or {candidates[1]}). The data directory comes from {DATA_DIR_ENV} / the gin binding "
      f"get_data_dir.data_dir; unset it to read TFDS instead.")


def flatten_spec(spec: FeatureSpec, prefix: str = "") -> dict[str, tf.TensorSpec]:
  """{'idx': {'question': s}} -> {'idx/question': s}."""
  flat = {}
  for key, value in spec.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_spec(value, path + "/"))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  nested: dict[str, Any] = {}
  for path, value in flat.items():
    node = nested
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested


def _lookup(row: Mapping[str, Any], path: str) -> Any:
  """`row['idx']['question']` or `row['idx/question']` for path 'idx/question'; KeyError if absent."""
  if path in row:
    return row[path]
  node: Any = row
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(path)
    node = node[part]
  return node


# --------------------------------------------------------------------------------------------- values
class _RowError(ValueError):
  pass


def _is_numeral(name: str) -> bool:
  return name.strip().lstrip("-").isdigit()


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _as_integer(value: Any) -> int:
  """An int from an int, an integral float or a numeric string ('2', '2.0'); _RowError otherwise."""
  if isinstance(value, bool):
    raise _RowError(f"expected an integer, got {value!r}")
  if isinstance(value, str):
    text = value.strip()
    try:
      return int(text)
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        raise _RowError(f"expected an integer, got {value!r}") from None
  if isinstance(value, float):
    if not math.isfinite(value) or value != int(value):
      raise _RowError(f"expected an integer, got {value!r}")
    return int(value)
  if isinstance(value, int):
    return value
  raise _RowError(f"expected an integer, got {value!r}")


def _class_label(value: Any, names: Optional[Sequence[str]], num_classes: Optional[int]) -> int:
  """A class index in [0, num_classes) from a label as a file writes it (see the module docstring)."""
  names = list(names) if names is not None else None
  numerals = bool(names) and all(_is_numeral(n) for n in names)
  if numerals and get_numeral_labels() == "dataset":
    try:
      label = str(_as_integer(value))
    except _RowError:
      label = None
    if label not in names:
      mapping = ", ".join(f"{n} = class {i}" for i, n in enumerate(names))
      raise _RowError(
          f"label {value!r} is not one of the dataset's own labels {names} ({mapping}); a file of 0-based "
          f"class ids needs the gin binding "
          f"prompt_mix.data.file_source.get_numeral_labels.numeral_labels = 'class_id'")
    return names.index(label)
  if not numerals and isinstance(value, str) and names is not None and value.strip() in names:
    return names.index(value.strip())
  try:
    label = _as_integer(value)
  except _RowError:
    hint = f" or one of {names}" if names is not None else ""
    if isinstance(value, str) and not _is_number(value):
      raise _RowError(f"expected a number{hint}, got {value!r}") from None
    raise _RowError(f"expected an integer class id{hint}, got {value!r}") from None
  num_classes = len(names) if names is not None else num_classes
  if num_classes is not None and not 0 <= label < num_classes:
    classes = f" ({', '.join(f'{i} = {n}' for i, n in enumerate(names))})" if names else ""
    hint = ""
    if numerals:
      hint = ("; a file of the dataset's own labels needs the gin binding "
              "prompt_mix.data.file_source.get_numeral_labels.numeral_labels = 'dataset'")
    raise _RowError(f"class id {value!r} is outside [0, {num_classes}){classes}{hint}")
  return label


def _parse_scalar(value: Any, spec: tf.TensorSpec, names: Optional[Sequence[str]],
                  num_classes: Optional[int]) -> Any:
  if spec.dtype == tf.string:
    if not isinstance(value, str):
      raise _RowError(f"expected a string, got {value!r}")
    return value
  if spec.dtype.is_floating:
    if isinstance(value, str):
      try:
        value = float(value.strip())
      except ValueError:
        raise _RowError(f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise _RowError(f"expected a finite number, got {value!r}")
    return value
  if names is not None or num_classes is not None:
    return _class_label(value, names, num_classes)
  return _as_integer(value)


def _parse_value(value: Any, spec: tf.TensorSpec, names: Optional[Sequence[str]],
                 num_classes: Optional[int], from_tsv: bool) -> Any:
  if spec.shape.rank == 0:
    return _parse_scalar(value, spec, names, num_classes)
  if from_tsv and isinstance(value, str):
    try:
      value = json.loads(value) if value.strip() else []
    except json.JSONDecodeError:
      raise _RowError(f"expected a JSON array, got {value!r}") from None
  if not isinstance(value, list):
    raise _RowError(f"expected a list, got {value!r}")
  return [_parse_scalar(v, tf.TensorSpec([], spec.dtype), names, num_classes) for v in value]


# ----------------------------------------------------------------------------------------------- rows
def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
  """(line number, decoded line with its ending) of a UTF-8 file; a BOM before line 1 is dropped."""
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise DataFileError(
            f"{path}:{line_no}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8; save the "
            f"file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
      yield line_no, text


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
  for line_no, line in _lines(path):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFileError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                          f"be one JSON object") from None
    if not isinstance(row, dict):
      raise DataFileError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
    yield line_no, row


def _quoting_hint(quoting: str) -> str:
  if quoting == "standard":
    return ("; if this is a raw TSV whose quotes are plain text (e.g. GLUE's original files), set the gin "
            "binding prompt_mix.data.file_source.get_tsv_quoting.quoting = 'none'")
  return ("; if its fields are quoted (written by Python's csv module, pandas or an HF export), set "
          "prompt_mix.data.file_source.get_tsv_quoting.quoting = 'standard'")


def _tsv_rows(path: pathlib.Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
  quoting = get_tsv_quoting()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  def text() -> Iterator[str]:
    for _, line in _lines(path):
      yield line

  if quoting == "standard":
    reader = csv.reader(text(), delimiter="\t", quotechar='"', doublequote=True, strict=True)
  else:
    reader = csv.reader(text(), delimiter="\t", quoting=csv.QUOTE_NONE)
  header: Optional[list[str]] = None
  start = 1
  while True:
    try:
      record = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise DataFileError(f"{path}:{reader.line_num}: {e}{_quoting_hint(quoting)}") from None
    first_line, start = start, reader.line_num + 1
    if not record or not any(field.strip() for field in record):
      continue
    if header is None:
      header = record
      duplicates = sorted({h for h in header if header.count(h) > 1})
      if duplicates:
        raise DataFileError(f"{path}:{first_line}: the header repeats the columns {duplicates}")
      continue
    if len(record) != len(header):
      last = reader.line_num
      lines = "" if first_line == last else f" (one record over lines {first_line}-{last})"
      raise DataFileError(
          f"{path}:{first_line}: {len(record)} fields{lines} but the header has {len(header)} {header}: "
          f"a tab inside an unquoted field, or a quote that is text{_quoting_hint(quoting)}")
    yield first_line, dict(zip(header, record))


def _rows(path: pathlib.Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """(line number, row) of a JSONL or TSV file; blank lines are skipped."""
  return _jsonl_rows(path) if path.suffix == ".jsonl" else _tsv_rows(path)


def count_examples(path: pathlib.Path) -> int:
  """Number of examples (non-blank rows) of a JSONL / TSV file."""
  return sum(1 for _ in _rows(path))


def read_examples(path: pathlib.Path, spec: FeatureSpec,
                  label_names: Optional[Mapping[str, Sequence[str]]] = None,
                  num_classes: Optional[Mapping[str, int]] = None) -> Iterator[dict[str, Any]]:
  """Parsed examples (nested like `spec`) of a file; `DataFileError` names the file, line and field.

  Args:
    label_names: field path -> class names (labels may be written as names; they bound the class ids).
    num_classes: field path -> number of classes, for class fields without names.
  """
  flat_spec = flatten_spec(spec)
  label_names = label_names or {}
  num_classes = num_classes or {}
  from_tsv = path.suffix == ".tsv"
  for line_no, row in _rows(path):
    parsed = {}
    for key, feature_spec in flat_spec.items():
      try:
        value = _lookup(row, key)
      except KeyError:
        raise DataFileError(f"{path}:{line_no}: missing field {key!r}; this task needs {sorted(flat_spec)}, "
                            f"the row has {sorted(row)}") from None
      try:
        parsed[key] = _parse_value(value, feature_spec, label_names.get(key), num_classes.get(key), from_tsv)
      except _RowError as e:
        raise DataFileError(f"{path}:{line_no}: field {key!r}: {e}") from None
    yield _unflatten(parsed)


def _signature(path: pathlib.Path, spec: FeatureSpec, label_names, num_classes) -> tuple:
  stat = path.stat()
  names = tuple(sorted((k, tuple(v)) for k, v in (label_names or {}).items()))
  counts = tuple(sorted((num_classes or {}).items()))
  specs = tuple(sorted((k, repr(v)) for k, v in flatten_spec(spec).items()))
  return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, specs, names, counts, get_tsv_quoting(),
          get_numeral_labels())


_CHECKED: dict[tuple, int] = {}  # signature -> number of examples of a file read and checked whole.


def check_file(path: pathlib.Path, spec: FeatureSpec,
               label_names: Optional[Mapping[str, Sequence[str]]] = None,
               num_classes: Optional[Mapping[str, int]] = None) -> int:
  """Reads and checks every row of the file; returns its number of examples.

  Raises `DataFileError` for the first bad row, and for a file without examples. The result is kept per
  (file, size, modification time, spec, settings), so a file is read once however often its splits are
  used.
  """
  key = _signature(path, spec, label_names, num_classes)
  if key not in _CHECKED:
    n = sum(1 for _ in read_examples(path, spec, label_names, num_classes))
    if n == 0:
      raise DataFileError(f"{path}: the file holds no examples (an empty file, blank lines, or a TSV header "
                          f"only); write its examples, or remove it and unset {DATA_DIR_ENV} to read TFDS")
    _CHECKED[key] = n
  return _CHECKED[key]


def load_split(path: pathlib.Path, spec: FeatureSpec,
               label_names: Optional[Mapping[str, Sequence[str]]] = None,
               num_classes: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """A `tf.data.Dataset` of the file's examples (structure and dtypes of `spec`), with known cardinality.

  The whole file is checked first (`check_file`), so a bad row raises `DataFileError` here, in Python,
  rather than from inside the TensorFlow pipeline.

  Args:
    path: a `.jsonl` or `.tsv` file.
    spec: nested dict of `tf.TensorSpec` (shape [] or [None]), e.g.
      `{'premise': tf.TensorSpec([], tf.string), 'label': tf.TensorSpec([], tf.int64)}`.
    label_names: field path -> class names, so labels may be written as names.
    num_classes: field path -> number of classes of class fields without names (range check).
  """
  n = check_file(path, spec, label_names, num_classes)
  ds = tf.data.Dataset.from_generator(lambda: read_examples(path, spec, label_names, num_classes),
                                      output_signature=dict(spec))
  return ds.apply(tf.data.experimental.assert_cardinality(n))

