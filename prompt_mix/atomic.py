"""Atomic writes: a file or a directory appears whole under its name, or not at all.

The writer gets a temporary path beside the target (same directory, so the final `os.replace` is a rename
on one filesystem), writes there, and the rename happens only when the `with` block ends without an error.
A crash leaves the previous version in place and removes the temporary one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[str]:
  """Yields a temporary file path beside `path`; on success it is synced and renamed onto `path`."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # A fresh name that the writer creates itself, so the file gets the usual permissions (umask), not
  # mkstemp's 0600.
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(directory: PathLike) -> Iterator[str]:
  """Yields a temporary directory beside `directory`; on success it replaces `directory`.

  An existing `directory` is renamed aside, the new one renamed into place, then the old one removed, so a
  reader sees either the whole old directory or the whole new one (never a partly written one).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory} exists and is not a directory")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(directory)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.replace(directory, os.path.join(old, name))
    os.replace(tmp, directory)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
