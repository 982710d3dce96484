r"""Renders ATTEMPT's attention table as the paper's heatmap (Asai et al., 2022, fig. 6): targets x sources.

Reads the JSON or NPZ attention table that eval writes (format: `prompt_mix/attempt/interpret.py`) and
writes a PNG with one row per target task and one column per source prompt, plus the target prompt's own
weight a_{t+1} (shown before the 1 + a_{t+1} of the mixture, as in the paper). The drawing is
`prompt_mix.attempt.interpret.render_heatmap`; an installed package has the same command as
`prompt-mix-heatmap`.

  python tools/attention_heatmap.py --table=/tmp/run/attention.json --output=/tmp/run/attention.png \
      [--no_target] [--title="ATTEMPT-m, GLUE"] [--cmap=Blues] [--dpi=150]
"""

from __future__ import annotations

from prompt_mix.attempt import interpret

if __name__ == "__main__":
  interpret.heatmap_main()
