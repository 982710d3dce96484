"""The method registry (prompt_mix/methods.py): the gin files of prompt_mix/configs/methods/ are the methods.

Every registered method documents itself in its file's header, binds the standard size macros that apply
to it, builds from its file alone, and is listed in the README and docs tables that are generated from
the registry; the binaries import every method module through the registry.
"""

import pathlib
import re
import sys

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_mix import gin_utils
from prompt_mix import launch
from prompt_mix import methods
from prompt_mix.attempt import library as library_lib
from prompt_mix.peft import prompt_tuning
from prompt_mix.peft import report as report_lib
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from prompt_mix.t5 import network
from prompt_mix.t5 import plugins

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = config_lib.preset("tiny")
# Two values of each standard size macro; the trainable count must follow the macro.
SIZES = {"PROMPT_LENGTH": (3, 5), "LORA_RANK": (2, 4), "ADAPTER_BOTTLENECK": (2, 4), "NUM_TASKS": (1, 3)}


def build(name, bindings, tmp_path):
  return methods.deltas(name, bindings, model="tiny", d_model=TINY.emb_dim, scratch_dir=tmp_path)


def trainable(deltas):
  model = model_lib.EncoderDecoderModel(TINY, tuple(deltas))
  batch = network.dummy_batch()
  if plugins.num_tasks(deltas):
    batch["task_ids"] = jnp.zeros((1,), jnp.int32)
  return report_lib.parameter_report(model.abstract_init(batch), model.trains_backbone).trainable


def required(name):
  return ["NUM_TASKS = 1"] if "NUM_TASKS" in methods.required_macros(name) else []


def slug(heading):
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_methods_are_the_gin_files():
  files = sorted(p.stem for p in (gin_utils.CONFIG_DIR / "methods").glob("*.gin"))
  assert list(methods.names()) == files and "attempt" in files and "lora" in files
  assert methods.gin_path("lora") == "methods/lora.gin"
  with pytest.raises(ValueError, match="no method 'lora2'.*registered methods: aprompt"):
    methods.gin_file("lora2")


@pytest.mark.parametrize("name", methods.names())
def test_header_summarizes_and_links_docs_that_exist(name):
  assert methods.summary(name) and "\n" not in methods.summary(name)
  assert methods.field(name, "acts at"), f"{name}: no 'Acts at:' (nor a base method's)"
  docs = methods.field(name, "docs")
  path, _, anchor = docs.partition("#")
  text = (ROOT / path).read_text()
  if anchor:
    headings = [slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")]
    assert anchor in headings, f"{name}: {docs} has no such heading"
  base = methods.base(name)
  assert base is None or (base in methods.names() and methods.base(base) is None)


def test_variants_and_ablations_name_their_base():
  assert "attempt_m" in methods.variants("attempt") and "attempt_no_target" in methods.ablations("attempt")
  assert methods.is_ablation("aprompt_no_kv") and not methods.is_ablation("attempt_m")
  assert set(methods.ablations("aprompt")) == {n for n in methods.names() if n.startswith("aprompt_")}


def test_macros_follow_includes_and_name_the_required_ones():
  assert methods.macros("attempt_m")["SOURCE_PROMPTS"].startswith("['mnli'")
  assert methods.required_macros("attempt_m") == ("PROMPT_LIBRARY", "NUM_TASKS")
  assert methods.required_macros("prompt_tuning") == ()
  assert methods.macros("lora")["LORA_RANK"] == "8"


def test_binaries_import_every_method_module_through_the_registry():
  assert not [m for m in launch.REGISTERED_MODULES if m.startswith(methods.PEFT_PACKAGE)]
  launch.import_registered()
  assert set(methods.peft_modules()) <= set(sys.modules)
  assert "prompt_mix.peft.lora" in methods.peft_modules()


@pytest.mark.parametrize("name", methods.names())
def test_every_method_builds_from_its_file_with_registered_delta_classes(name, tmp_path):
  deltas = build(name, required(name), tmp_path)
  assert deltas and all(type(d) in methods.delta_classes() for d in deltas), deltas


@pytest.mark.parametrize("name", [n for n in methods.names() if not methods.is_ablation(n)])
def test_standard_size_macros_size_the_method(name, tmp_path):
  """A tool binding PROMPT_LENGTH, LORA_RANK, ADAPTER_BOTTLENECK or NUM_TASKS changes what it builds."""
  bound = [m for m in SIZES if m in methods.macros(name)]
  for macro in bound:
    small, large = SIZES[macro]
    counts = []
    for value in (small, large):
      others = [b for b in required(name) if not b.startswith(macro)]
      counts.append(trainable(build(name, others + [f"{macro} = {value}"], tmp_path / f"{macro}{value}")))
    assert counts[0] < counts[1], (name, macro, counts)


def test_deltas_take_bindings_and_leave_gin_cleared(tmp_path):
  gin.parse_config("TEST_MACRO_LEFT_BEFORE = 1")
  deltas = methods.deltas("prompt_tuning", ["PROMPT_LENGTH = 7", "NUM_TASKS = 3"])
  assert deltas == (prompt_tuning.PromptTuning(length=7, num_tasks=3),)
  assert gin.config_str().strip() == ""  # The global gin config is reset (documented).
  with pytest.raises(gin_utils.MissingMacroError, match="attempt_m.*NUM_TASKS is required"):
    methods.deltas("attempt_m", [], d_model=8, scratch_dir=tmp_path)
  with pytest.raises(ValueError, match="reads a prompt library: bind PROMPT_LIBRARY"):
    methods.deltas("attempt")


def test_library_bindings_write_a_scratch_library_of_the_named_prompts(tmp_path):
  bindings = methods.library_bindings(
      "attempt", ["SOURCE_PROMPTS = ['a', 'b']", "TARGET_INIT = 'c'", "PROMPT_LENGTH = 3"], d_model=8,
      directory=tmp_path / "lib")
  assert bindings == [f"PROMPT_LIBRARY = {str(tmp_path / 'lib')!r}"]
  library = library_lib.PromptLibrary(tmp_path / "lib")
  assert library.names() == ["a", "b", "c"] and library.prompt_shape == (3, 8)
  assert np.abs(library.load("a")).max() <= 0.5
  assert methods.library_bindings("attempt", ["PROMPT_LIBRARY = '/data/lib'"], d_model=8,
                                  directory=tmp_path / "x") == []
  assert methods.library_bindings("prompt_tuning", [], d_model=8, directory=tmp_path / "y") == []
  uniform = methods.library_bindings("attempt", ["SOURCE_PROMPTS = []", "TARGET_INIT = 'uniform'"],
                                     d_model=8, directory=tmp_path / "empty")
  assert uniform and library_lib.PromptLibrary(tmp_path / "empty").names() == []


def test_scratch_library_keeps_prompts_and_refuses_another_shape(tmp_path):
  first = library_lib.write_scratch_library(tmp_path, ["a"], (3, 8))
  kept = first.load("a")
  library_lib.write_scratch_library(tmp_path, ["a", "b"], (3, 8), seed=5)
  assert np.array_equal(first.load("a"), kept) and first.names() == ["a", "b"]
  with pytest.raises(ValueError, match=r"holds prompts of shape \(3, 8\); scratch prompts of shape \(4, 8\)"):
    library_lib.write_scratch_library(tmp_path, ["c"], (4, 8))


def test_readme_methods_table_is_generated_from_the_registry():
  readme = (ROOT / "README.md").read_text()
  begin, end = readme.find(methods.TABLE_BEGIN), readme.find(methods.TABLE_END)
  assert 0 <= begin < end, "README.md lacks the methods table markers"
  table = readme[begin + len(methods.TABLE_BEGIN):end].strip()
  missing = [n for n in methods.names() if f"`{n}`" not in table]
  regenerate = "run python tools/param_table.py --readme=README.md"
  assert not missing, f"README's methods table lacks {missing}: {regenerate}"
  assert table == methods.markdown_table(), f"README's methods table is stale: {regenerate}"


def test_docs_parameter_table_has_a_row_per_method():
  text = (ROOT / "docs" / "methods.md").read_text()
  table = text[text.index("<!-- param_table:begin -->"):text.index("<!-- param_table:end -->")]
  missing = [n for n in methods.names() if f"`methods/{n}.gin`" not in table]
  assert not missing, (f"docs/methods.md's table lacks {missing}: run python tools/param_table.py "
                       "--update=docs/methods.md")
