"""SPoT's task embeddings: rank a library's source prompts by their similarity to a target prompt.

SPoT (Vu et al., ACL 2022, "SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer", §3.2-3.3)
takes a prompt trained briefly by prompt tuning on a task as that task's embedding, and predicts which
source tasks transfer to a target by the similarity of their prompts. For a source prompt S [m_s, d] with
rows s_i and a target prompt T [m_t, d] with rows t_j (SPoT: m_s = m_t = L):

```
cosine of average tokens      avg_cos(S, T)       = cos( (1/m_s) sum_i s_i , (1/m_t) sum_j t_j )
per-token average cosine      per_token_cos(S, T) = 1/(m_s m_t) sum_i sum_j cos(s_i, t_j)
cos(u, v) = u . v / (|u| |v|)
```

The per-token measure averages the cosine over *every pair* of rows (i, j), not only aligned positions i = j
(SPoT: "the average cosine similarity between every prompt token pair", normalized by 1/L^2). The sources are
ranked by decreasing similarity. A zero row (or a zero mean row) has no direction: it raises instead of
giving NaN.

NumPy only, so the command line starts fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

AVERAGE_TOKENS = "avg_cos"
PER_TOKEN = "per_token_cos"
MEASURES = (AVERAGE_TOKENS, PER_TOKEN)
# SPoT's Table 3: picking the top-1 source by the per-token measure gave the better target score.
DEFAULT_MEASURE = PER_TOKEN


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
  """Rows of x [..., d] divided by their norms; a zero row raises naming `what` and its position."""
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norms == 0):
    where = np.argwhere(norms[..., 0] == 0)[0].tolist()
    raise ValueError(f"{what} has a zero row at index {where}: its cosine similarity is undefined")
  return x / norms


def _as_prompts(x: Any, what: str) -> np.ndarray:
  """[m, d] -> [1, m, d]; [t, m, d] stays. float64, finite."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3 or 0 in x.shape:
    raise ValueError(f"{what} must be a prompt [m, d] or a stack [t, m, d], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what} has non-finite values")
  return x


def _check_widths(sources: np.ndarray, target: np.ndarray) -> None:
  if sources.shape[-1] != target.shape[-1]:
    raise ValueError(f"source prompts of width d={sources.shape[-1]} (shape {sources.shape}) cannot be "
                     f"compared with a target prompt of width d={target.shape[-1]} (shape {target.shape}): "
                     "they come from different backbones")


def average_token_cosine(sources: Any, target: Any) -> np.ndarray:
  """SPoT's cosine of average tokens: cos(mean_i S[i], mean_j T[j]).

  Args:
    sources: [m_s, d] or [t, m_s, d] source prompts.
    target: [m_t, d] target prompt.
  Returns:
    [t] similarities (float64), t = 1 for a single [m_s, d] source.
  """
  sources = _as_prompts(sources, "the source prompts")
  target = _as_prompts(target, "the target prompt")[0]
  _check_widths(sources, target)
  s = _unit_rows(sources.mean(axis=1), "the mean row of a source prompt")  # [t, d]
  t = _unit_rows(target.mean(axis=0), "the mean row of the target prompt")  # [d]
  return s @ t


def per_token_average_cosine(sources: Any, target: Any) -> np.ndarray:
  """SPoT's per-token average cosine: 1/(m_s m_t) sum_{i,j} cos(S[i], T[j]) over every pair of rows.

  Args / returns as `average_token_cosine`.
  """
  sources = _as_prompts(sources, "the source prompts")
  target = _as_prompts(target, "the target prompt")[0]
  _check_widths(sources, target)
  s = _unit_rows(sources, "a source prompt")  # [t, m_s, d]
  t = _unit_rows(target, "the target prompt")  # [m_t, d]
  # mean over (i, j) of s_i . t_j = (mean_i s_i) . (mean_j t_j) for unit rows: [t].
  return s.mean(axis=1) @ t.mean(axis=0)


@dataclasses.dataclass(frozen=True)
class SourceScore:
  """One source prompt's similarity to the target by both measures, and its rank by each (1 = closest)."""

  name: str
  avg_cos: float
  per_token_cos: float
  avg_cos_rank: int
  per_token_cos_rank: int

  def rank(self, measure: str) -> int:
    return self.avg_cos_rank if measure == AVERAGE_TOKENS else self.per_token_cos_rank


def _ranks(values: np.ndarray) -> np.ndarray:
  """1 for the largest value; ties keep the given order."""
  order = np.argsort(-values, kind="stable")
  ranks = np.empty(len(values), np.int64)
  ranks[order] = np.arange(1, len(values) + 1)
  return ranks


def score_sources(names: Sequence[str], sources: Any, target: Any,
                  by: str = DEFAULT_MEASURE) -> list[SourceScore]:
  """Both SPoT measures of each source against the target, sorted by measure `by` (closest first).

  Args:
    names: the t source names.
    sources: [t, m_s, d].
    target: [m_t, d].
    by: 'avg_cos' or 'per_token_cos'.
  """
  if by not in MEASURES:
    raise ValueError(f"unknown measure {by!r}; choose one of {MEASURES}")
  names = list(names)
  sources = _as_prompts(sources, "the source prompts")
  if len(names) != sources.shape[0]:
    raise ValueError(f"{len(names)} names {names} for {sources.shape[0]} source prompts")
  if not names:
    raise ValueError("no source prompts to rank")
  avg = average_token_cosine(sources, target)
  per_token = per_token_average_cosine(sources, target)
  avg_ranks, per_token_ranks = _ranks(avg), _ranks(per_token)
  scores = [SourceScore(n, float(a), float(p), int(ra), int(rp))
            for n, a, p, ra, rp in zip(names, avg, per_token, avg_ranks, per_token_ranks)]
  return sorted(scores, key=lambda s: s.rank(by))


def rank_library(library, target: Any, names: Optional[Sequence[str]] = None,
                 by: str = DEFAULT_MEASURE) -> list[SourceScore]:
  """Ranks the prompts of a `library.PromptLibrary` (all, or `names`) against `target` [m_t, d]."""
  names = list(library.names() if names is None else names)
  if not names:
    raise ValueError(f"{library.path}: the library holds no prompts to rank")
  missing = [n for n in names if n not in library]
  if missing:
    raise ValueError(f"{library.manifest_path}: prompts {missing} are not in the library (it holds "
                     f"{library.names()})")
  stack = library.load_stack(names)
  target = np.asarray(target)
  if target.ndim == 2 and target.shape[1] != stack.shape[2]:
    raise ValueError(f"the target prompt has width d={target.shape[1]} (shape {target.shape}) but the "
                     f"prompts of {library.path} have d={stack.shape[2]} (shape {stack.shape[1:]})")
  return score_sources(names, stack, target, by)


def format_ranking(scores: Sequence[SourceScore], by: str = DEFAULT_MEASURE) -> str:
  """A text table, closest source first: rank, name, both measures and the rank by each."""
  lines = [f"{'rank':>4}  {'source':<20} {'avg_cos':>8} {'(rank)':>6} {'per_token_cos':>13} {'(rank)':>6}"]
  for s in scores:
    lines.append(f"{s.rank(by):>4}  {s.name:<20} {s.avg_cos:>8.4f} {s.avg_cos_rank:>6} "
                 f"{s.per_token_cos:>13.4f} {s.per_token_cos_rank:>6}")
  return "\n".join(lines)
