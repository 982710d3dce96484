"""The package works as an installed wheel, outside the checkout.

The wheel is built from a copy of the project's sources (`pip wheel --no-deps --no-build-isolation`, with
this environment's setuptools) and installed with `pip install --no-deps` into a fresh virtual environment
whose only access to third-party packages is a `.pth` file naming this environment's site-packages.
Installing the dependencies themselves (TensorFlow, JAX, ... several GB) would take most of CI's time and
needs the network; what this test checks is the package itself: that the wheel holds every module and gin
file, that nothing reads files relative to the repository, and that the console scripts and `python -m`
binaries run from an unrelated directory. The demo's `--quick` mode also runs from such an install, but
takes minutes of its own (it trains four models) and `tests/test_demo.py` already runs it from the
checkout, so here its gin files are resolved and parsed from the installed package instead. The checkout cannot leak in: the commands run in an empty
directory outside it, without PYTHONPATH, and the test asserts `prompt_mix.__file__` is in the fresh venv.
(That the dependency ranges resolve and install is checked with pip itself; see docs/infrastructure.md.)
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = ("prompt-mix-train", "prompt-mix-eval", "prompt-mix-infer", "prompt-mix-export",
                   "prompt-mix-demo", "prompt-mix-library", "prompt-mix-heatmap")
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"
SOURCES = ("pyproject.toml", "README.md", "prompt_mix", "tasks")


def _outer_site_packages() -> list[str]:
  """This environment's site-packages directories (its own and any it reaches through a .pth file)."""
  return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def _clean_env(venv: pathlib.Path) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
  env.update(PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
  return env


def _run(args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, (f"{' '.join(map(str, args[:3]))} failed ({proc.returncode}):\n"
                                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """Builds the wheel from a copy of the sources (the checkout stays untouched: no build/, egg-info)."""
  import setuptools  # pylint: disable=g-import-not-at-top
  major = int(setuptools.__version__.split(".")[0])
  assert major >= 77, (f"setuptools {setuptools.__version__} cannot build this project (the SPDX license "
                       "string needs setuptools>=77): pip install -c constraints.txt setuptools (as .ci/run)")
  work = tmp_path_factory.mktemp("wheel")
  source = work / "src"
  for name in SOURCES:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      source.mkdir(exist_ok=True)
      shutil.copy2(ROOT / name, source / name)
  dist = work / "dist"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", dist, source], cwd=work, env=dict(os.environ, PYTHONWARNINGS="ignore"))
  wheels = list(dist.glob("prompt_mix-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def test_wheel_holds_every_module_gin_file_and_console_script(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "prompt_mix").rglob("*.py")}
  expected |= {"prompt_mix_tasks/" + p.relative_to(ROOT / "tasks").as_posix()
               for p in (ROOT / "tasks").rglob("*.py")}
  gin_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "prompt_mix" / "configs").rglob("*.gin")}
  assert {"models", "methods", "runs", "demo"} <= {pathlib.Path(g).parts[2] for g in gin_files}
  assert sorted((expected | gin_files) - names) == []
  # Nothing from outside the package (tests, tools, docs) is installed.
  assert all(n.split("/")[0] in ("prompt_mix", "prompt_mix_tasks") or ".dist-info/" in n for n in names)
  info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  entry_points = zipfile.ZipFile(wheel).read(info).decode()
  for script in CONSOLE_SCRIPTS:
    assert f"{script} = " in entry_points, script
  metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA")))
  metadata = metadata.decode()
  assert "Requires-Python: >=3.11" in metadata and "License-Expression: Apache-2.0" in metadata
  requirements = [l.split(";")[0] for l in metadata.splitlines() if l.startswith("Requires-Dist:")]
  assert requirements and not [r for r in requirements if "==" in r], requirements  # Ranges, not pins.


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
  """A fresh venv with only the wheel installed; third-party packages come from this environment."""
  venv = tmp_path_factory.mktemp("venv") / "env"
  _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent, env=dict(os.environ))
  python = venv / "bin" / "python"
  env = _clean_env(venv)
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv.parent,
                 env).stdout.strip()
  pathlib.Path(purelib, "outer_environment.pth").write_text("\n".join(_outer_site_packages()) + "\n")
  # pip comes from this environment too (through the .pth file); it installs into the fresh venv.
  _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel],
       venv.parent, env)
  return venv


def test_installed_wheel_runs_outside_the_checkout(venv, tmp_path):
  work = tmp_path / "elsewhere"
  work.mkdir()
  assert ROOT not in work.parents
  env = _clean_env(venv)
  python, bin_dir = venv / "bin" / "python", venv / "bin"
  where = json.loads(_run([python, "-c", (
      "import json, prompt_mix, prompt_mix_tasks\n"
      "from prompt_mix import gin_utils\n"
      "print(json.dumps([prompt_mix.__file__, prompt_mix_tasks.__file__, gin_utils.default_gin_search_paths()]))"
  )], work, env).stdout.strip().splitlines()[-1])
  for path in where[:2]:
    assert pathlib.Path(path).is_relative_to(venv), (path, venv)
  assert where[2][0] == "." and pathlib.Path(where[2][1]).is_relative_to(venv)
  for script in CONSOLE_SCRIPTS:
    assert (bin_dir / script).exists(), script

  # train (console script) -> eval (python -m) -> export (console script), gin files from the package.
  model_dir = work / "run"
  common = ["--gin_file=models/tiny_bytes.gin", "--gin_file=methods/prompt_tuning.gin",
            f'--gin.MODEL_DIR="{model_dir}"', "--gin.RANDOM_INIT_BACKBONE=True",
            "--gin.PromptTuning.length=4", LENGTHS]
  _run([bin_dir / "prompt-mix-train", "--gin_file=runs/finetune.gin", *common, "--gin.BATCH_SIZE=8",
        '--gin.MIXTURE_OR_TASK_NAME="synthetic_max"', "--gin.TRAIN_STEPS=2", "--gin.DROPOUT_RATE=0.0"],
       work, env)
  assert (model_dir / "config.gin").exists()
  assert json.loads((model_dir / "train_metrics.json").read_text())["step"] == 2
  _run([python, "-m", "prompt_mix.eval", "--gin_file=runs/eval.gin", *common, "--gin.BATCH_SIZE=4",
        '--gin.EVAL_MIXTURE_OR_TASK_NAME="synthetic_max"'], work, env)
  metrics = json.loads((model_dir / "eval" / "eval_metrics_2.json").read_text())
  assert "synthetic_max/accuracy" in metrics
  export_dir = work / "export"
  _run([bin_dir / "prompt-mix-export", f"--gin_file={model_dir / 'config.gin'}",
        f'--gin.MODEL_DIR="{model_dir}"', f'--gin.EXPORT_DIR="{export_dir}"',
        "--gin.EXPORT_FORMATS=['npy', 'safetensors', 'peft']"], work, env)
  assert (export_dir / "npy" / "encoder" / "prompt_tuning" / "prompt.npy").exists()
  assert (export_dir / "peft.safetensors").exists()
  assert json.loads((export_dir / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == \
      "PROMPT_TUNING"
  assert not list(work.glob("*.gin")), "nothing may have been read from or written to the working directory"


DEMO_RUNS = (("demo/backbone.gin",), ("demo/backbone.gin", "runs/export.gin"), ("demo/source_prompts.gin",),
             ("demo/attempt.gin",), ("demo/attempt.gin", "runs/eval.gin"), ("demo/prompt_tuning.gin",),
             ("demo/prompt_tuning.gin", "runs/eval.gin"), ("demo/attempt.gin", "runs/export.gin"))


def test_installed_wheel_has_the_demo_configs_and_the_heatmap_tool(venv, tmp_path):
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = _clean_env(venv)
  python, bin_dir = venv / "bin" / "python", venv / "bin"
  # Every file combination the demo passes to the binaries parses from the package's own configs.
  source = f"""
import importlib, json, gin
from prompt_mix import demo, gin_utils, launch
for name in launch.REGISTERED_MODULES:
  importlib.import_module(name)
parsed = []
for files in {DEMO_RUNS!r}:
  gin.clear_config()
  gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(), list(files), [], finalize_config=False)
  parsed.append(gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
print(json.dumps([demo.__file__, parsed]))
"""
  demo_file, parsed = json.loads(_run([python, "-c", source], work, env).stdout.strip().splitlines()[-1])
  assert pathlib.Path(demo_file).is_relative_to(venv)
  expected = {"demo/backbone.gin": "synthetic_pretraining", "demo/source_prompts.gin": "synthetic_sources",
              "demo/attempt.gin": "synthetic_tgt_max", "demo/prompt_tuning.gin": "synthetic_tgt_max"}
  assert parsed == [expected[files[0]] for files in DEMO_RUNS]
  # The heatmap command of an install (the checkout's tools/ is not there).
  table = work / "attention.json"
  _run([python, "-c", "from prompt_mix.attempt import interpret; interpret.save_attention_table("
        f"{str(table)!r}, [[0.2, 0.5, 0.3]], ['rte'], ['mnli', 'qqp'])"], work, env)
  _run([bin_dir / "prompt-mix-heatmap", f"--table={table}", f"--output={work / 'heatmap.png'}",
        "--title=installed"], work, env)
  assert (work / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
