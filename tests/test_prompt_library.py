"""The prompt library: named [m, d] prompts with a JSON manifest, atomic writes, ATTEMPT release import."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prompt_mix.attempt import library as library_lib


def _prompt(seed, shape=(3, 8)):
  return np.random.RandomState(seed).normal(size=shape).astype(np.float32)


def test_add_list_load_remove_round_trip(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path / "lib")
  assert lib.names() == [] and lib.prompt_shape is None
  a, b = _prompt(0), _prompt(1)
  lib.add("mnli", a, backbone="t5_base", task="mnli", note="prompt tuning")
  lib.add("squad", b, backbone="t5_base", task="squad")
  assert lib.names() == ["mnli", "squad"] and "mnli" in lib and len(lib) == 2
  assert lib.prompt_shape == (3, 8)
  np.testing.assert_array_equal(lib.load("mnli"), a)
  stack = lib.load_stack(["squad", "mnli"])
  assert stack.shape == (2, 3, 8) and stack.dtype == np.float32
  np.testing.assert_array_equal(stack[0], b)
  assert lib.load_stack([]).shape == (0, 3, 8)

  manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
  assert manifest["format"] == library_lib.FORMAT and manifest["version"] == 1
  assert manifest["prompts"][0] == dict(name="mnli", file="mnli.npy", shape=[3, 8], backbone="t5_base",
                                        task="mnli", note="prompt tuning")
  assert lib.info("squad")["backbone"] == "t5_base"

  lib.remove("mnli")
  assert lib.names() == ["squad"]
  assert sorted(os.listdir(tmp_path / "lib")) == ["manifest.json", "squad.npy"]  # No temporary files left.
  # Another handle on the same directory sees the same library.
  assert library_lib.PromptLibrary(str(tmp_path / "lib")).names() == ["squad"]


def test_duplicates_need_overwrite(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path)
  lib.add("mnli", _prompt(0), task="mnli")
  with pytest.raises(ValueError, match=r"'mnli' already exists.*overwrite=True"):
    lib.add("mnli", _prompt(1))
  lib.add("mnli", _prompt(1), task="mnli-v2", overwrite=True)
  np.testing.assert_array_equal(lib.load("mnli"), _prompt(1))
  assert lib.names() == ["mnli"] and lib.info("mnli")["task"] == "mnli-v2"


def test_shape_mismatch_names_both_shapes(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path)
  lib.add("mnli", _prompt(0, (3, 8)))
  with pytest.raises(ValueError, match=r"'qqp' has shape \(4, 8\).*\(3, 8\) \(e.g. 'mnli'\)"):
    lib.add("qqp", _prompt(1, (4, 8)))
  with pytest.raises(ValueError, match=r"2-D \[m, d\], got shape \(1, 3, 8\)"):
    lib.add("qqp", _prompt(1, (1, 3, 8)))
  with pytest.raises(ValueError, match="prompt name"):
    lib.add("../evil", _prompt(1))
  with pytest.raises(ValueError, match="non-finite"):
    lib.add("nan", np.full((3, 8), np.nan, np.float32))
  assert lib.names() == ["mnli"]


def test_missing_names_are_listed(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path)
  lib.add("mnli", _prompt(0))
  with pytest.raises(KeyError, match=r"no prompt named 'sst2'.*\['mnli'\]"):
    lib.load("sst2")
  with pytest.raises(KeyError, match="sst2"):
    lib.remove("sst2")
  with pytest.raises(ValueError, match="more than once"):
    lib.load_stack(["mnli", "mnli"])


def test_manifest_validation_names_the_file(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path)
  lib.add("mnli", _prompt(0))
  lib.add("qqp", _prompt(1))
  manifest_path = tmp_path / "manifest.json"
  good = json.loads(manifest_path.read_text())

  manifest_path.write_text("{not json")
  with pytest.raises(ValueError, match=f"{manifest_path}: not valid JSON"):
    lib.names()

  def write(mutate):
    manifest = json.loads(json.dumps(good))
    mutate(manifest)
    manifest_path.write_text(json.dumps(manifest))

  write(lambda m: m["prompts"][1].pop("task"))
  with pytest.raises(ValueError, match=r"prompts\[1\] \('qqp'\) lacks keys \['task'\]"):
    lib.names()
  write(lambda m: m["prompts"][1].update(name="mnli", file="mnli.npy"))
  with pytest.raises(ValueError, match="duplicate name 'mnli'"):
    lib.names()
  write(lambda m: m["prompts"][1].update(shape=[5, 8]))
  with pytest.raises(ValueError, match=r"\(5, 8\) differs from the library's \(3, 8\)"):
    lib.names()
  write(lambda m: m.update(format="something"))
  with pytest.raises(ValueError, match="'format' is 'something'"):
    lib.names()

  manifest_path.write_text(json.dumps(good))
  np.save(tmp_path / "qqp.npy", _prompt(1, (4, 8)))
  with pytest.raises(ValueError, match=r"qqp.npy has shape \(4, 8\) but .*manifest.json records \(3, 8\)"):
    lib.load("qqp")
  os.remove(tmp_path / "qqp.npy")
  with pytest.raises(FileNotFoundError, match="qqp.npy is missing"):
    lib.load("qqp")
  os.remove(manifest_path)
  with pytest.raises(ValueError, match="manifest.json is missing"):
    lib.names()


def test_import_attempt_release_torch_and_npy(tmp_path):
  torch = pytest.importorskip("torch")
  lib = library_lib.PromptLibrary(tmp_path / "lib")
  prompt = _prompt(3, (5, 8))
  torch.save(torch.from_numpy(prompt), tmp_path / "mnli_prompt.pt")  # What the original release saves.
  entry = library_lib.import_attempt_release(str(tmp_path / "mnli_prompt.pt"), lib, "mnli",
                                             backbone="t5_base", task="mnli")
  assert entry["note"] == "imported from mnli_prompt.pt" and entry["shape"] == [5, 8]
  np.testing.assert_array_equal(lib.load("mnli"), prompt)

  torch.save({"prefix_emb": torch.from_numpy(prompt[None] * 2)}, tmp_path / "state.pt")  # [1, m, d].
  library_lib.import_attempt_release(str(tmp_path / "state.pt"), lib, "qqp")
  np.testing.assert_allclose(lib.load("qqp"), prompt * 2)

  np.save(tmp_path / "sst2.npy", prompt * 3)
  library_lib.import_attempt_release(str(tmp_path / "sst2.npy"), lib, "sst2", note="from npy")
  assert lib.info("sst2")["note"] == "from npy"

  torch.save(torch.zeros(2, 5, 8), tmp_path / "bank.pt")
  with pytest.raises(ValueError, match=r"bank.pt: a prompt is \[m, d\], got shape \(2, 5, 8\)"):
    library_lib.import_attempt_release(str(tmp_path / "bank.pt"), lib, "bank")
  torch.save(torch.zeros(6, 8), tmp_path / "short.pt")
  with pytest.raises(ValueError, match=r"'short' has shape \(6, 8\)"):
    library_lib.import_attempt_release(str(tmp_path / "short.pt"), lib, "short")


def test_import_without_torch_says_so(tmp_path, monkeypatch):
  (tmp_path / "p.pt").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"p.pt needs PyTorch"):
    library_lib.import_attempt_release(str(tmp_path / "p.pt"), library_lib.PromptLibrary(tmp_path), "p")


def test_command_line(tmp_path):
  np.save(tmp_path / "p.npy", _prompt(0))
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "prompt_mix.attempt.library", *args, f"--library={tmp_path / 'lib'}"],
      capture_output=True, text=True, check=True).stdout
  run("add", "--name=mnli", f"--file={tmp_path / 'p.npy'}", "--backbone=tiny", "--task=mnli")
  run("import", "--name=qqp", f"--file={tmp_path / 'p.npy'}")
  listing = run("list")
  assert "mnli\t(3, 8)\tbackbone=tiny\ttask=mnli" in listing and "qqp" in listing
  run("remove", "--name=mnli")
  assert library_lib.PromptLibrary(tmp_path / "lib").names() == ["qqp"]


def test_command_line_errors_are_one_line_naming_the_file(tmp_path):
  np.save(tmp_path / "ints.npy", np.arange(24, dtype=np.int32).reshape(3, 8))
  (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
  np.save(tmp_path / "p.npy", _prompt(0))
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "prompt_mix.attempt.library", *args, f"--library={tmp_path / 'lib'}"],
      capture_output=True, text=True, check=False)
  cases = [(("add", "--name=ints", f"--file={tmp_path / 'ints.npy'}"),
            f"FATAL: ValueError: {tmp_path / 'ints.npy'} holds a int32 array; a prompt is floating point"),
           (("add", "--name=broken", f"--file={tmp_path / 'broken.npy'}"),
            f"FATAL: ValueError: {tmp_path / 'broken.npy'} is not a readable .npy file"),
           (("remove", "--name=nothing"), "FATAL: KeyError: "),
           (("add", "--name=p", f"--file={tmp_path / 'missing.npy'}"), "FATAL: FileNotFoundError: ")]
  for args, start in cases:
    proc = run(*args)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith(start), proc.stderr
  assert library_lib.PromptLibrary(tmp_path / "lib").names() == []


def test_a_corrupt_prompt_file_in_the_library_is_named(tmp_path):
  lib = library_lib.PromptLibrary(tmp_path)
  lib.add("a", _prompt(0))
  (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:100])  # Truncated.
  with pytest.raises(ValueError, match=rf"{tmp_path / 'a.npy'} is not a readable .npy file"):
    lib.load("a")
