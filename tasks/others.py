"""The paper's "others": WinoGrande, Yelp-2, SciTail, PAWS-Wiki."""

from __future__ import annotations

from prompt_mix.data import metrics
from prompt_mix.data import postprocessors
from prompt_mix.data import preprocessors
from prompt_mix.data import registration as reg
from prompt_mix.data import splits

from . import label_words as label_words_lib

_WORDS = label_words_lib.LABEL_WORDS
YELP_MAX_TRAIN_EXAMPLES = 100_000  # The paper caps Yelp-2 training data at 100k examples.


def _spec(name, tfds_name, prefix, fields, plan, class_names) -> reg.TaskSpec:
  """A classification task; `class_names`: the TFDS class names (index = class id), which are the labels a
  local file writes. Numeral names ('1', '2') are the dataset's own labels: see `file_source`."""
  words = _WORDS[name]
  features = {key: reg.TEXT for _, key in fields}
  features["label"] = reg.CLASS
  return reg.TaskSpec(
      name=name, tfds_name=tfds_name, features=features, plan=plan,
      formatter=preprocessors.classification(preprocessors.TaskPrefix(prefix), fields, words, name),
      postprocess_fn=postprocessors.class_id(words), metric_fns=(metrics.accuracy,), label_words=words,
      label_names={"label": class_names})


# Both options are shown (the original code printed option1 twice); train_xl is the training set.
WINOGRANDE = _spec(
    "winogrande", "winogrande:1.2.0", "winogrande",
    [("sentence", "sentence"), ("option1", "option1"), ("option2", "option2")],
    splits.carve_train(train="train_xl", test="validation"), ("1", "2"))  # The answer: option 1 or 2.
YELP = _spec(
    "yelp_polarity", "yelp_polarity_reviews:0.2.0", "yelp_polarity", [("sentence", "text")],
    splits.carve_train(test="test", max_train_examples=YELP_MAX_TRAIN_EXAMPLES),
    ("1", "2"))  # Yelp's classes: 1 negative, 2 positive.
SCITAIL = _spec(
    "scitail", "sci_tail:1.0.0", "scitail", [("premise", "premise"), ("hypothesis", "hypothesis")],
    splits.official(), ("entails", "neutral"))
PAWS_WIKI = _spec(
    "paws_wiki", "paws_wiki/labeled_final_tokenized:1.1.0", "paws",
    [("sentence1", "sentence1"), ("sentence2", "sentence2")], splits.official(),
    ("different_meaning", "paraphrase"))

SPECS = [WINOGRANDE, YELP, SCITAIL, PAWS_WIKI]
for _spec_ in SPECS:
  reg.register(_spec_)
