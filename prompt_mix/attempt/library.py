"""The prompt library: a directory of named soft prompts that ATTEMPT mixes (the source prompts).

Layout of a library directory:

```
<library>/manifest.json        the index, below
<library>/<name>.npy           one prompt, float32 [m, d]
```

`manifest.json`:

```json
{"format": "prompt_mix.prompt_library", "version": 1,
 "prompts": [{"name": "mnli", "file": "mnli.npy", "shape": [100, 768], "backbone": "t5_base",
              "task": "mnli", "note": "prompt tuning, 300k steps"}]}
```

Every prompt of a library has the same shape [m, d] (ATTEMPT stacks them into [t, m, d]). Writes are
atomic (a temporary file in the same directory, then `os.replace`): the prompt file first, then the
manifest, so a reader never sees a manifest entry without its file. Removing a prompt rewrites the manifest
first and deletes the file after.

Command line:

```
python -m prompt_mix.attempt.library list   --library=DIR
python -m prompt_mix.attempt.library add    --library=DIR --name=mnli --file=mnli.npy --backbone=t5_base \
                                            --task=mnli [--note=...] [--overwrite]
python -m prompt_mix.attempt.library import --library=DIR --name=mnli --file=prefix_embeddings.pt ...
python -m prompt_mix.attempt.library remove --library=DIR --name=mnli
python -m prompt_mix.attempt.library rank   --library=DIR --target_prompt=target.npy     (source_commands.py)
python -m prompt_mix.attempt.library prune  --library=DIR --attention=MODEL_DIR/eval/attention_<step>.json --top_k=K ...
```

A command that fails prints one line, `FATAL: <what went wrong, naming the file or prompt>`, and exits with
status 1 (no traceback). Prompt files must hold floats: an integer array is refused, not converted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from prompt_mix import atomic

MANIFEST = "manifest.json"
FORMAT = "prompt_mix.prompt_library"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ENTRY_KEYS = ("name", "file", "shape", "backbone", "task", "note")


class PromptLibrary:
  """A directory of named prompts [m, d] with a JSON manifest (format in the module docstring).

  The directory need not exist yet: `add` creates it; reading an absent library gives no names.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)

  def __repr__(self) -> str:
    return f"PromptLibrary({self.path!r})"

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.path, MANIFEST)

  # ---------------------------------------------------------------------------------------- reading
  def entries(self) -> list[dict]:
    """The validated manifest entries, in the order they were added."""
    if not os.path.exists(self.manifest_path):
      if os.path.isdir(self.path) and any(f.endswith(".npy") for f in os.listdir(self.path)):
        raise ValueError(f"{self.manifest_path} is missing but {self.path} holds .npy files: it is not a "
                         "prompt library (or its manifest was deleted)")
      return []
    try:
      with open(self.manifest_path, "r", encoding="utf-8") as f:
        manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.manifest_path}: not valid JSON ({e})") from None
    return _validate_manifest(manifest, self.manifest_path)

  def names(self) -> list[str]:
    return [e["name"] for e in self.entries()]

  def __contains__(self, name: str) -> bool:
    return name in self.names()

  def __len__(self) -> int:
    return len(self.entries())

  def info(self, name: str) -> dict:
    """The manifest entry of `name`: name, file, shape, backbone, task, note."""
    for entry in self.entries():
      if entry["name"] == name:
        return dict(entry)
    raise KeyError(f"{self.manifest_path}: no prompt named {name!r}; the library holds "
                   f"{self.names() or 'no prompts'}")

  @property
  def prompt_shape(self) -> Optional[tuple[int, int]]:
    """(m, d) shared by every prompt of the library, or None while it is empty."""
    entries = self.entries()
    return tuple(entries[0]["shape"]) if entries else None

  def load(self, name: str) -> np.ndarray:
    """Prompt `name` as float32 [m, d], checked against its manifest entry."""
    entry = self.info(name)
    file = os.path.join(self.path, entry["file"])
    if not os.path.exists(file):
      raise FileNotFoundError(f"{self.manifest_path} lists prompt {name!r} but its file {file} is missing")
    array = load_npy(file)
    if array.shape != tuple(entry["shape"]):
      raise ValueError(f"{file} has shape {array.shape} but {self.manifest_path} records "
                       f"{tuple(entry['shape'])} for prompt {name!r}")
    if array.dtype != np.float32:
      raise ValueError(f"{file} has dtype {array.dtype}; library prompts are float32")
    return array

  def load_stack(self, names: Sequence[str]) -> np.ndarray:
    """Prompts `names` stacked in that order: float32 [t, m, d] (t = len(names), may be 0)."""
    names = list(names)
    if len(set(names)) != len(names):
      duplicates = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f"{self.manifest_path}: prompts {duplicates} requested more than once in {names}")
    if not names:
      shape = self.prompt_shape
      if shape is None:
        raise ValueError(f"{self.path}: an empty stack of an empty library has no shape")
      return np.zeros((0,) + shape, np.float32)
    return np.stack([self.load(n) for n in names])

  # ---------------------------------------------------------------------------------------- writing
  def add(self, name: str, array: Any, *, backbone: str = "", task: str = "", note: str = "",
          overwrite: bool = False) -> dict:
    """Stores `array` [m, d] as prompt `name`; returns its manifest entry.

    Raises:
      ValueError: on a bad name, a non-2-D or non-finite array, a shape other than the library's (m, d),
        or an existing `name` without `overwrite=True`.
    """
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f"{self.path}: prompt name {name!r} must match {_NAME.pattern} (it is a file name)")
    array = np.asarray(array)
    if array.ndim != 2:
      raise ValueError(f"{self.path}: prompt {name!r} must be 2-D [m, d], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f"{self.path}: prompt {name!r} has non-float dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{self.path}: prompt {name!r} has non-finite values")
    entries = self.entries()
    existing = [e for e in entries if e["name"] == name]
    if existing and not overwrite:
      raise ValueError(f"{self.manifest_path}: a prompt named {name!r} already exists (shape "
                       f"{tuple(existing[0]['shape'])}, task {existing[0]['task']!r}); pass overwrite=True "
                       "to replace it")
    others = [e for e in entries if e["name"] != name]
    if others and tuple(others[0]["shape"]) != array.shape:
      raise ValueError(f"{self.manifest_path}: prompt {name!r} has shape {array.shape} but the library "
                       f"holds prompts of shape {tuple(others[0]['shape'])} (e.g. {others[0]['name']!r}); "
                       "every prompt of a library has the same [m, d]")
    entry = dict(name=name, file=f"{name}.npy", shape=list(array.shape), backbone=str(backbone),
                 task=str(task), note=str(note))
    os.makedirs(self.path, exist_ok=True)
    with atomic.atomic_file(os.path.join(self.path, entry["file"])) as tmp, open(tmp, "wb") as f:
      np.save(f, array, allow_pickle=False)
    if existing:
      entries = [entry if e["name"] == name else e for e in entries]
    else:
      entries = entries + [entry]
    self._write_manifest(entries)
    return dict(entry)

  def remove(self, name: str) -> None:
    """Deletes prompt `name` (manifest first, then its file)."""
    entry = self.info(name)
    self._write_manifest([e for e in self.entries() if e["name"] != name])
    file = os.path.join(self.path, entry["file"])
    if os.path.exists(file):
      os.remove(file)

  def _write_manifest(self, entries: list[dict]) -> None:
    manifest = dict(format=FORMAT, version=VERSION, prompts=entries)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    with atomic.atomic_file(self.manifest_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


SCRATCH_NOTE = "scratch: random prompt, carries no information"


def write_scratch_library(path: str, names: Sequence[str], shape: Sequence[int], seed: int = 0,
                          scale: float = 0.5) -> PromptLibrary:
  """A library of random prompts U(-scale, scale) of `shape` [m, d] under `names`, at `path`.

  For tools and tests that build a method reading a prompt library (its gin file needs PROMPT_LIBRARY)
  without a user's library: to count its parameters, time its step or train it on toy data. The prompts
  carry no information. A name the library already holds is kept as it is (so a call per method may
  share one directory); a library holding prompts of another shape is an error naming both shapes.

  Returns:
    The library.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"write_scratch_library: shape must be [m, d] with m, d >= 1, got {list(shape)}")
  library = PromptLibrary(path)
  held = library.prompt_shape
  if held is not None and tuple(held) != shape:
    raise ValueError(f"{library.manifest_path}: the library holds prompts of shape {tuple(held)}; scratch "
                     f"prompts of shape {shape} cannot join it (use another directory)")
  rng = np.random.RandomState(seed)
  for name in names:
    array = rng.uniform(-scale, scale, shape).astype(np.float32)
    if name not in library:
      library.add(name, array, backbone="scratch", task=name, note=SCRATCH_NOTE)
  return library


def _validate_manifest(manifest: Any, path: str) -> list[dict]:
  """Checks the manifest structure; returns its entries. Errors name `path` and the offending entry."""
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}")
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
  if manifest.get("version") != VERSION:
    raise ValueError(f"{path}: unsupported version {manifest.get('version')!r} (this reader knows {VERSION})")
  prompts = manifest.get("prompts")
  if not isinstance(prompts, list):
    raise ValueError(f"{path}: 'prompts' must be a list, got {type(prompts).__name__}")
  seen, shape = set(), None
  for i, entry in enumerate(prompts):
    where = f"{path}: prompts[{i}]"
    if not isinstance(entry, dict):
      raise ValueError(f"{where} must be an object, got {entry!r}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
      raise ValueError(f"{where} ({entry.get('name')!r}) lacks keys {missing}")
    name = entry["name"]
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f"{where}: bad name {name!r}")
    if name in seen:
      raise ValueError(f"{where}: duplicate name {name!r}")
    seen.add(name)
    if entry["file"] != f"{name}.npy":
      raise ValueError(f"{where} ({name!r}): file {entry['file']!r}, expected {name + '.npy'!r}")
    s = entry["shape"]
    if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
      raise ValueError(f"{where} ({name!r}): shape must be [m, d] of positive ints, got {s!r}")
    if shape is not None and tuple(s) != shape:
      raise ValueError(f"{where} ({name!r}): shape {tuple(s)} differs from the library's {shape}")
    shape = tuple(s)
    for key in ("backbone", "task", "note"):
      if not isinstance(entry[key], str):
        raise ValueError(f"{where} ({name!r}): {key!r} must be a string, got {entry[key]!r}")
  return [dict(e) for e in prompts]


def load_npy(path: str) -> np.ndarray:
  """`np.load` of a `.npy` file; a damaged or non-`.npy` file is a ValueError naming it."""
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path} is not a readable .npy file (truncated or corrupt?): {type(e).__name__}: "
                     f"{e}") from e


def read_prompt_file(path: str) -> np.ndarray:
  """A prompt [m, d] from a `.npy` file or a `torch.save`d tensor (the ATTEMPT release's `.pt` files).

  A `.pt` file may hold a tensor, or a dict / state dict with exactly one tensor. A leading axis of size 1
  ([1, m, d]) is dropped.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  if path.endswith(".npy"):
    array = load_npy(path)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"reading {path} needs PyTorch (`pip install torch`); or convert it to .npy "
                        "first") from None
    try:
      value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  # UnpicklingError, RuntimeError, EOFError...
      raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?): {type(e).__name__}: "
                       f"{e}") from e
    if isinstance(value, dict):
      tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
      if len(tensors) != 1:
        raise ValueError(f"{path} holds a dict with keys {sorted(value)}; expected exactly one tensor")
      value = next(iter(tensors.values()))
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path} holds a {type(value).__name__}, expected a tensor [m, d]")
    array = value.detach().to(torch.float32).cpu().numpy()
  if array.ndim == 3 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 2:
    raise ValueError(f"{path}: a prompt is [m, d], got shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise ValueError(f"{path} holds a {array.dtype} array; a prompt is floating point (converting integers "
                     "would silently make a different prompt)")
  return np.asarray(array, np.float32)


def import_attempt_release(file: str, library: PromptLibrary, name: str, *, backbone: str = "",
                           task: str = "", note: Optional[str] = None, overwrite: bool = False) -> dict:
  """Adds a prompt of the original ATTEMPT release (`torch.save`d [m, d] tensor, or `.npy`) to `library`.

  Returns the new manifest entry. The note defaults to the source file name.
  """
  array = read_prompt_file(file)
  if note is None:
    note = f"imported from {os.path.basename(file)}"
  return library.add(name, array, backbone=backbone, task=task, note=note, overwrite=overwrite)


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  from prompt_mix.attempt import source_commands  # pylint: disable=g-import-not-at-top
  if len(argv) == 2 and argv[1] in source_commands.COMMANDS:  # rank, prune
    if not f.library:
      raise SystemExit("--library is required")
    return source_commands.COMMANDS[argv[1]](f)
  commands = ("list", "add", "import", "remove") + tuple(source_commands.COMMANDS)
  if len(argv) != 2 or argv[1] not in commands:
    raise SystemExit(f"usage: python -m prompt_mix.attempt.library {{{'|'.join(commands)}}} --library=DIR "
                     "[--name=... --file=... --backbone=... --task=... --note=... --overwrite]")
  command = argv[1]
  if not f.library:
    raise SystemExit("--library is required")
  library = PromptLibrary(f.library)
  if command == "list":
    entries = library.entries()
    if not entries:
      print(f"{library.path}: empty")
    for e in entries:
      print(f"{e['name']}\t{tuple(e['shape'])}\tbackbone={e['backbone']}\ttask={e['task']}\t{e['note']}")
    return
  if not f.name:
    raise SystemExit(f"{command}: --name is required")
  if command == "remove":
    library.remove(f.name)
    return
  if not f.file:
    raise SystemExit(f"{command}: --file is required")
  if command == "add":
    entry = library.add(f.name, read_prompt_file(f.file), backbone=f.backbone, task=f.task,
                        note=f.note or "", overwrite=f.overwrite)
  else:
    entry = import_attempt_release(f.file, library, f.name, backbone=f.backbone, task=f.task,
                                   note=f.note, overwrite=f.overwrite)
  print(f"{library.path}: {entry['name']} {tuple(entry['shape'])}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("library", None, "The prompt library directory.")
  flags.DEFINE_string("name", None, "Prompt name (add, import, remove).")
  flags.DEFINE_string("file", None, "A .npy [m, d] or torch-saved .pt prompt (add, import).")
  flags.DEFINE_string("backbone", "", "Backbone preset the prompt was trained with, e.g. t5_base.")
  flags.DEFINE_string("task", "", "Task the prompt was trained on.")
  flags.DEFINE_string("note", None, "Free-form note.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing prompt of the same name.")
  from prompt_mix.attempt import source_commands  # pylint: disable=g-import-not-at-top
  source_commands.define_flags()


def _main_with_errors(argv: Sequence[str]) -> None:
  """`_main`, with a failure as one `FATAL:` line naming the file or prompt (no traceback)."""
  try:
    _main(argv)
  except (ValueError, KeyError, OSError, ImportError) as e:
    message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    raise SystemExit(f"FATAL: {type(e).__name__}: {' '.join(str(message).split())}") from None


def main() -> None:
  """The `prompt-mix-library` console script; the same as `python -m prompt_mix.attempt.library`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main_with_errors)


if __name__ == "__main__":
  main()
