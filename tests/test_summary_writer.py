"""The training metric writer: TensorBoard scalars without TensorFlow summary ops (which keep memory on
every call and made long runs creep), the other summary kinds still through clu's TensorFlow writer."""

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from prompt_mix.training import summary_writer


def _scalars(logdir) -> dict:
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_reach_tensorboard_without_tensorflow_summary_ops(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("tf.summary.scalar was called")

  monkeypatch.setattr(tf.summary, "scalar", refuse)
  writer = summary_writer.create_writer(str(tmp_path))
  for step in (10, 20, 30):
    writer.write_scalars(step, {"loss": 1.0 / step, "grad_norm": np.float32(step)})
  writer.flush()
  writer.close()
  assert _scalars(tmp_path) == {"loss": [(10, 0.1), (20, 0.05), (30, 0.03333)],
                                "grad_norm": [(10, 10.0), (20, 20.0), (30, 30.0)]}


def test_other_summaries_still_work_and_processes_above_0_only_log(tmp_path):
  writer = summary_writer.create_writer(str(tmp_path / "main"))
  writer.write_texts(1, {"note": "hello"})
  writer.write_scalars(1, {"loss": 2.0})
  writer.close()
  assert _scalars(tmp_path / "main") == {"loss": [(1, 2.0)]}
  assert list((tmp_path / "main").glob("events.out.tfevents.*"))
  quiet = summary_writer.create_writer(str(tmp_path / "other"), just_logging=True)
  quiet.write_scalars(1, {"loss": 2.0})
  quiet.close()
  assert not (tmp_path / "other").exists()
