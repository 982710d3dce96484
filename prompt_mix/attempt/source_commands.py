"""The library's source-choosing subcommands: `rank` (SPoT) and `prune` (ATTEMPT's attention).

```
python -m prompt_mix.attempt.library rank  --library=DIR --target_prompt=target.npy [--names=a,b]
                                           [--by=per_token_cos|avg_cos] [--output_json=ranking.json]
python -m prompt_mix.attempt.library prune --library=DIR --attention=MODEL_DIR/eval/attention_<step>.json
                                           --top_k=K [--attention_task=rte] [--output=PRUNED_DIR]
                                           [--extra=mnli] [--gin_output=pruned.gin] [--overwrite]
```

`rank` prints the library's prompts by their SPoT similarity to a briefly trained target prompt
(`transfer.py`); `prune` prints the sources by mean attention and keeps the top k (`pruning.py`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from prompt_mix import atomic
from prompt_mix.attempt import interpret
from prompt_mix.attempt import library as library_lib
from prompt_mix.attempt import pruning
from prompt_mix.attempt import transfer


def _names(value) -> list[str] | None:
  if not value:
    return None
  return [n.strip() for n in value.split(",") if n.strip()]


def rank(f: Any) -> None:
  """`rank`: both SPoT measures of every library prompt (or `--names`) against `--target_prompt`."""
  if not f.target_prompt:
    raise SystemExit("rank: --target_prompt is required (a .npy or torch .pt prompt [m, d], e.g. the "
                     "exported prompt of a short prompt-tuning run on the target task)")
  library = library_lib.PromptLibrary(f.library)
  target = library_lib.read_prompt_file(f.target_prompt)
  scores = transfer.rank_library(library, target, _names(f.names), f.by)
  print(f"SPoT similarity of the prompts of {library.path} to {f.target_prompt} (sorted by {f.by}):")
  print(transfer.format_ranking(scores, f.by))
  if f.output_json:
    payload = {"library": library.path, "target_prompt": f.target_prompt, "sorted_by": f.by,
               "sources": [dict(name=s.name, avg_cos=s.avg_cos, per_token_cos=s.per_token_cos,
                                avg_cos_rank=s.avg_cos_rank, per_token_cos_rank=s.per_token_cos_rank)
                           for s in scores]}
    with atomic.atomic_file(f.output_json) as tmp, open(tmp, "w", encoding="utf-8") as out:
      json.dump(payload, out, indent=1)


def prune(f: Any) -> None:
  """`prune`: ranks the sources by mean attention (`--attention` table) and keeps the top `--top_k`."""
  if not f.attention:
    raise SystemExit("prune: --attention is required (an ATTEMPT run's eval/attention_<step>.json)")
  if f.top_k is None:
    raise SystemExit("prune: --top_k is required (how many sources to keep)")
  table = interpret.load_attention_table(f.attention)
  ranking = pruning.rank_by_attention(table, f.attention_task)
  keep = pruning.top_k(ranking, f.top_k)
  print(f"Sources by mean attention in {f.attention} ({f.attention_task or 'mean over its tasks'}):")
  print(pruning.format_ranking(ranking, keep))
  library_path = None
  if f.output:
    source = library_lib.PromptLibrary(f.library)
    pruned = pruning.write_pruned_library(source, keep, f.output, _names(f.extra) or (), f.overwrite)
    library_path = pruned.path
    print(f"{pruned.path}: {pruned.names()}")
  elif f.extra:
    raise SystemExit("prune: --extra names prompts to copy into the pruned library; it needs --output")
  if f.gin_output:
    pruning.write_gin(f.gin_output, keep, library_path)
    print(f"wrote {f.gin_output}")
  binding = f"--gin.SOURCE_PROMPTS=\"{keep!r}\""
  if library_path:
    binding += f" --gin.PROMPT_LIBRARY=\"'{library_path}'\""
  print(f"Run on the pruned set (the same MODEL_DIR restores): {binding}")


COMMANDS: dict[str, Callable[[Any], None]] = {"rank": rank, "prune": prune}


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("target_prompt", None, "rank: the target task's prompt, .npy or .pt [m, d].")
  flags.DEFINE_string("names", None, "rank: comma-separated library prompts to rank (default: all).")
  flags.DEFINE_enum("by", transfer.DEFAULT_MEASURE, list(transfer.MEASURES), "rank: the measure to sort by.")
  flags.DEFINE_string("output_json", None, "rank: also write the ranking to this JSON file.")
  flags.DEFINE_string("attention", None, "prune: an ATTEMPT run's attention table (eval/attention_<step>.json).")
  flags.DEFINE_integer("top_k", None, "prune: how many sources to keep.", lower_bound=1)
  flags.DEFINE_string("attention_task", None, "prune: rank by this target task's row (default: mean of rows).")
  flags.DEFINE_string("output", None, "prune: write a new library holding the kept sources here.")
  flags.DEFINE_string("extra", None, "prune: comma-separated prompts copied too (e.g. the target_init prompt).")
  flags.DEFINE_string("gin_output", None, "prune: write a gin file binding SOURCE_PROMPTS (and PROMPT_LIBRARY).")
