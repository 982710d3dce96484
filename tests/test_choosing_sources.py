"""Choosing sources: SPoT's two similarity measures (against a hand computation, explicit NumPy loops and
scikit-learn's cosine), the `rank` and `prune` commands of the prompt library, and attention-based pruning."""

import json
import math
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest

from prompt_mix.attempt import interpret
from prompt_mix.attempt import library as library_lib
from prompt_mix.attempt import pruning
from prompt_mix.attempt import transfer

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- SPoT's measures
def test_measures_by_hand():
  """S = [[1,0],[0,1]], T = [[1,1],[1,0]].

  cosine of average tokens: mean S = (1/2, 1/2), mean T = (1, 1/2):
    cos = (1/2 + 1/4) / (sqrt(1/2) sqrt(5/4)) = 3 / sqrt(10).
  per-token average cosine, over all 4 pairs (i, j):
    cos(s1,t1) = 1/sqrt(2), cos(s1,t2) = 1, cos(s2,t1) = 1/sqrt(2), cos(s2,t2) = 0  ->  (1 + sqrt(2)) / 4.
  (Aligned positions only would give (1/sqrt(2) + 0) / 2: a different number, which the test rules out.)
  """
  source = np.array([[1.0, 0.0], [0.0, 1.0]])
  target = np.array([[1.0, 1.0], [1.0, 0.0]])
  np.testing.assert_allclose(transfer.average_token_cosine(source, target), [3 / math.sqrt(10)], rtol=1e-12)
  np.testing.assert_allclose(transfer.per_token_average_cosine(source, target), [(1 + math.sqrt(2)) / 4],
                             rtol=1e-12)
  assert not np.isclose(transfer.per_token_average_cosine(source, target)[0], (1 / math.sqrt(2)) / 2)


def _cos(u, v):
  return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_measures_equal_explicit_loops_and_sklearn():
  """Random stacks [t, m_s, d] against a target [m_t, d] of another length: the formulas written out."""
  from sklearn.metrics.pairwise import cosine_similarity  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  sources = rng.normal(size=(3, 5, 7)).astype(np.float32)
  target = rng.normal(size=(4, 7)).astype(np.float32)
  for s, avg, per_token in zip(sources, transfer.average_token_cosine(sources, target),
                               transfer.per_token_average_cosine(sources, target)):
    mean_s = sum(s[i] for i in range(5)) / 5
    mean_t = sum(target[j] for j in range(4)) / 4
    assert avg == pytest.approx(_cos(mean_s, mean_t), rel=1e-5)
    pairs = [_cos(s[i], target[j]) for i in range(5) for j in range(4)]
    assert per_token == pytest.approx(sum(pairs) / (5 * 4), rel=1e-5)
    assert avg == pytest.approx(cosine_similarity(s.mean(0, keepdims=True), target.mean(0, keepdims=True))[0, 0],
                                rel=1e-5)
    assert per_token == pytest.approx(cosine_similarity(s, target).mean(), rel=1e-5)


def test_measures_reject_undefined_cosines_and_mismatched_widths():
  with pytest.raises(ValueError, match=r"a source prompt has a zero row at index \[0, 1\]"):
    transfer.per_token_average_cosine(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)))
  with pytest.raises(ValueError, match="the mean row of the target prompt has a zero row"):
    transfer.average_token_cosine(np.ones((2, 2)), np.array([[1.0, -1.0], [-1.0, 1.0]]))
  with pytest.raises(ValueError, match="width d=3 .* width d=2"):
    transfer.average_token_cosine(np.ones((2, 3)), np.ones((2, 2)))
  with pytest.raises(ValueError, match="non-finite"):
    transfer.average_token_cosine(np.full((2, 2), np.nan), np.ones((2, 2)))
  with pytest.raises(ValueError, match="unknown measure"):
    transfer.score_sources(["a"], np.ones((1, 2, 2)), np.ones((2, 2)), by="l2")


@pytest.fixture
def library(tmp_path) -> library_lib.PromptLibrary:
  """Sources 'near' (the target plus noise), 'far' (its negation) and 'mid' (random), [4, 6]."""
  rng = np.random.RandomState(1)
  target = rng.normal(size=(4, 6)).astype(np.float32)
  lib = library_lib.PromptLibrary(tmp_path / "library")
  lib.add("far", -target, task="far")
  lib.add("mid", rng.normal(size=(4, 6)).astype(np.float32), task="mid")
  lib.add("near", target + 0.1 * rng.normal(size=(4, 6)).astype(np.float32), task="near", note="n")
  np.save(tmp_path / "target.npy", target)
  return lib


def test_rank_library_orders_by_either_measure(library, tmp_path):
  target = np.load(tmp_path / "target.npy")
  for by in transfer.MEASURES:
    scores = transfer.rank_library(library, target, by=by)
    assert [s.name for s in scores] == ["near", "mid", "far"]
    assert [s.rank(by) for s in scores] == [1, 2, 3]
  near = transfer.rank_library(library, target, names=["near"])[0]
  stack = library.load_stack(["near"])
  assert near.avg_cos == pytest.approx(transfer.average_token_cosine(stack, target)[0])
  assert near.per_token_cos == pytest.approx(transfer.per_token_average_cosine(stack, target)[0])
  with pytest.raises(ValueError, match=r"prompts \['zzz'\] are not in the library"):
    transfer.rank_library(library, target, names=["zzz"])
  with pytest.raises(ValueError, match=r"the target prompt has width d=5"):
    transfer.rank_library(library, target[:, :5])


def _library_cli(*args):
  return subprocess.run([sys.executable, "-m", "prompt_mix.attempt.library", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_rank_command_prints_both_measures(library, tmp_path):
  proc = _library_cli("rank", f"--library={library.path}", f"--target_prompt={tmp_path / 'target.npy'}",
                      f"--output_json={tmp_path / 'ranking.json'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert "avg_cos" in lines[1] and "per_token_cos" in lines[1]
  assert [line.split()[1] for line in lines[2:5]] == ["near", "mid", "far"]
  ranking = json.loads((tmp_path / "ranking.json").read_text())
  assert ranking["sorted_by"] == transfer.DEFAULT_MEASURE
  assert [s["name"] for s in ranking["sources"]] == ["near", "mid", "far"]
  target = np.load(tmp_path / "target.npy")
  expected = transfer.per_token_average_cosine(library.load("near"), target)[0]
  assert ranking["sources"][0]["per_token_cos"] == pytest.approx(expected)

  proc = _library_cli("rank", f"--library={library.path}")
  assert proc.returncode != 0 and "--target_prompt is required" in proc.stderr


# ------------------------------------------------------------------------------- attention pruning
def _table(tmp_path) -> str:
  path = tmp_path / "attention_10.json"
  table = np.array([[0.1, 0.5, 0.2, 0.2],      # task 'x'
                    [np.nan] * 4,              # task 'empty': no examples
                    [0.4, 0.1, 0.3, 0.2]])     # task 'y'
  interpret.save_attention_table(path, table, ["x", "empty", "y"], ["near", "mid", "far"])
  return str(path)


def test_rank_by_attention_averages_tasks_or_takes_one(tmp_path):
  table = interpret.load_attention_table(_table(tmp_path))
  ranking = pruning.rank_by_attention(table)
  # Means over the tasks with examples: near (0.1+0.4)/2 = 0.25, mid 0.3, far 0.25 (ties keep column order).
  assert [(s.name, s.rank) for s in ranking] == [("mid", 1), ("near", 2), ("far", 3)]
  assert [s.attention for s in ranking] == pytest.approx([0.3, 0.25, 0.25])
  assert [s.name for s in pruning.rank_by_attention(table, "y")] == ["near", "far", "mid"]
  assert pruning.top_k(ranking, 2) == ["mid", "near"]
  with pytest.raises(ValueError, match=r"top_k=4 must be in \[1, 3\]"):
    pruning.top_k(ranking, 4)
  with pytest.raises(ValueError, match="no complete row for empty"):
    pruning.rank_by_attention(table, "empty")
  with pytest.raises(ValueError, match="task 'zzz' is not a row"):
    pruning.rank_by_attention(table, "zzz")


def test_prune_command_writes_a_library_and_a_gin_file(library, tmp_path):
  library.add("init", np.ones((4, 6), np.float32), task="init")
  pruned_dir, gin_file = tmp_path / "pruned", tmp_path / "pruned.gin"
  proc = _library_cli("prune", f"--library={library.path}", f"--attention={_table(tmp_path)}", "--top_k=2",
                      f"--output={pruned_dir}", "--extra=init", f"--gin_output={gin_file}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--gin.SOURCE_PROMPTS=\"['mid', 'near']\"" in proc.stdout
  pruned = library_lib.PromptLibrary(pruned_dir)
  assert pruned.names() == ["mid", "near", "init"]
  for name in pruned.names():
    np.testing.assert_array_equal(pruned.load(name), library.load(name))
    assert pruned.info(name) == library.info(name)
  gin.clear_config()
  try:
    gin.parse_config(gin_file.read_text())
    assert gin.query_parameter("%SOURCE_PROMPTS") == ["mid", "near"]
    assert gin.query_parameter("%PROMPT_LIBRARY") == str(pruned_dir)
  finally:
    gin.clear_config()
  # An existing pruned library is kept unless --overwrite.
  proc = _library_cli("prune", f"--library={library.path}", f"--attention={_table(tmp_path)}", "--top_k=1",
                      f"--output={pruned_dir}")
  assert proc.returncode != 0 and "already holds prompts" in proc.stderr
  proc = _library_cli("prune", f"--library={library.path}", f"--attention={_table(tmp_path)}", "--top_k=1",
                      f"--output={pruned_dir}", "--overwrite", "--attention_task=y")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert pruned.names() == ["near"]
  with pytest.raises(ValueError, match="is the source library itself"):
    pruning.write_pruned_library(library, ["near"], library.path)
