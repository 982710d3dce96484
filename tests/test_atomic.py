"""Atomic writes: the target holds the old or the new content, never a partial one, and no temporary is left."""

import os
import stat

import pytest

from prompt_mix import atomic


def test_file_is_replaced_only_when_the_writer_finishes(tmp_path):
  path = tmp_path / "out.json"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="crash"):
    with atomic.atomic_file(path) as tmp, open(tmp, "w") as f:
      f.write("half")
      raise RuntimeError("crash")
  assert path.read_text() == "old"
  with atomic.atomic_file(path) as tmp, open(tmp, "w") as f:
    f.write("new")
  assert path.read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_file_gets_the_umask_permissions_not_0600(tmp_path):
  umask = os.umask(0o022)
  try:
    with atomic.atomic_file(tmp_path / "sub" / "f.txt") as tmp, open(tmp, "w") as f:
      f.write("x")
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / "sub" / "f.txt").st_mode) == 0o644


def test_directory_is_replaced_whole(tmp_path):
  target = tmp_path / "export"
  with atomic.atomic_dir(target) as tmp:
    open(os.path.join(tmp, "a"), "w").close()
  with pytest.raises(RuntimeError):
    with atomic.atomic_dir(target) as tmp:
      open(os.path.join(tmp, "b"), "w").close()
      raise RuntimeError("crash")
  assert os.listdir(target) == ["a"]
  with atomic.atomic_dir(target) as tmp:
    open(os.path.join(tmp, "c"), "w").close()
  assert os.listdir(target) == ["c"]
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_directory_over_a_file_is_refused(tmp_path):
  (tmp_path / "export").write_text("not a directory")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    with atomic.atomic_dir(tmp_path / "export"):
      pass
