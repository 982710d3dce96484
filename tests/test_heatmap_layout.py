"""The ATTEMPT heatmap fits its canvas: title, every task and source name, the cell values and the colour
bar lie inside the figure, from 3 sources x 1 task to 30 sources x 30 tasks, and the PNG is written."""

import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from prompt_mix.attempt import interpret  # pylint: disable=g-import-not-at-top,wrong-import-position

# Names as long as real ones (SeqIO task names of GLUE/SuperGLUE/MRQA/others).
LONG_NAMES = ["super_glue_multirc_v102", "glue_mnli_matched", "mrqa_natural_questions", "paws_labeled_final",
              "winogrande_xl", "scitail_snli_format", "yelp_polarity", "super_glue_record_v102", "qqp"]


def _table(num_tasks, num_sources, with_missing_row=False):
  rng = np.random.RandomState(num_tasks * 100 + num_sources)
  values = rng.dirichlet(np.ones(num_sources + 1), size=num_tasks)
  if with_missing_row:
    values[-1] = np.nan  # A task without examples: drawn as "-".
  tasks = [f"{LONG_NAMES[i % len(LONG_NAMES)]}_{i}" for i in range(num_tasks)]
  sources = [f"src_{LONG_NAMES[(i + 3) % len(LONG_NAMES)]}_{i}" for i in range(num_sources)]
  return interpret.AttentionTable(values, tuple(tasks), tuple(sources) + (interpret.TARGET_COLUMN,))


def _drawn_texts(fig):
  """Every text artist the figure draws: titles, axis labels, cell values, and the tick labels whose tick
  lies in the axis' view (matplotlib keeps off-view tick artists that it does not draw)."""
  texts = list(fig.texts)
  for ax in fig.axes:
    texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]  # pylint: disable=protected-access
    for axis in (ax.xaxis, ax.yaxis):
      low, high = sorted(axis.get_view_interval())
      for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
          texts += [tick.label1, tick.label2]
  return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _texts_outside(fig):
  """(text, its window extent) of every drawn text not inside the figure's box."""
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  box = fig.bbox
  outside = []
  for artist in _drawn_texts(fig):
    extent = artist.get_window_extent(renderer)
    if extent.x0 < box.x0 - 0.5 or extent.y0 < box.y0 - 0.5 or extent.x1 > box.x1 + 0.5 or \
        extent.y1 > box.y1 + 0.5:
      outside.append((artist.get_text(), extent))
  return outside


def _visible_texts(fig):
  fig.canvas.draw()
  return {t.get_text() for t in _drawn_texts(fig)}


@pytest.mark.parametrize("num_tasks,num_sources", [(1, 3), (30, 30), (8, 4), (2, 30), (30, 3)])
def test_every_label_title_and_the_colour_bar_are_inside_the_figure(tmp_path, num_tasks, num_sources):
  table = _table(num_tasks, num_sources, with_missing_row=num_tasks > 1)
  title = "ATTEMPT-m attention of every target task over the source prompts (GLUE + SuperGLUE, step 30000)"
  fig = interpret.heatmap_figure(table, title=title)
  assert _texts_outside(fig) == []
  shown = _visible_texts(fig)
  # Every name is drawn in full (nothing elided), and the title is all there (possibly wrapped).
  assert set(table.task_names) <= shown and set(table.candidate_names) <= shown
  assert any(" ".join(t.split()) == title for t in shown)
  assert "-" in shown or num_tasks == 1
  colorbar_axes = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
  assert len(colorbar_axes) == 1
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  bar = colorbar_axes[0].get_tightbbox(renderer)
  assert fig.bbox.x0 <= bar.x0 and bar.x1 <= fig.bbox.x1 and fig.bbox.y0 <= bar.y0 and bar.y1 <= fig.bbox.y1
  # Each name is readable: task names do not overlap each other, and the source names, rotated by 45
  # degrees, are at least a line height apart across their slant.
  ax = [a for a in fig.axes if a.get_label() != "<colorbar>"][0]
  rows = sorted((label.get_window_extent(renderer) for label in ax.get_yticklabels()), key=lambda b: b.y0)
  for below, above in zip(rows, rows[1:]):
    assert below.y1 <= above.y0 + 0.5, (below, above)
  columns = ax.get_xticklabels()
  assert all(label.get_rotation() == 45 for label in columns)
  line = columns[0].get_fontsize() * fig.dpi / 72.0
  anchors = sorted(ax.transData.transform((j, 0))[0] for j in range(len(columns)))
  for left, right in zip(anchors, anchors[1:]):
    assert (right - left) * np.sin(np.pi / 4) >= line, (right - left, line)
  # The figure stays a size a page or a screen shows (inches).
  width, height = fig.get_size_inches()
  assert 3.5 <= width <= 30 and 2.5 <= height <= 30
  out = interpret.render_heatmap(table, str(tmp_path / "plots" / "heatmap.png"), title=title)
  data = open(out, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  if os.environ.get("PROMPT_MIX_KEEP_HEATMAPS"):  # To look at them: the directory to copy them to.
    keep = os.environ["PROMPT_MIX_KEEP_HEATMAPS"]
    os.makedirs(keep, exist_ok=True)
    os.replace(out, os.path.join(keep, f"heatmap_{num_tasks}x{num_sources}.png"))


def test_without_target_column_and_without_title():
  table = _table(3, 5)
  fig = interpret.heatmap_figure(table, include_target=False)
  assert _texts_outside(fig) == []
  shown = _visible_texts(fig)
  assert interpret.TARGET_COLUMN not in shown and set(table.source_names) <= shown
