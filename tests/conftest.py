"""Shared test fixtures: the `../shared` directory beside the project (skipped with a reason when absent).

The suite's models are tiny, so its time goes to XLA compiling them, not to running them. Tests compile
at XLA's backend optimization level 0 (LLVM's -O0 for the CPU kernels: the same HLO, the same operations
and rounding; CPU fast-math is off at every level) and share JAX's persistent compilation cache within one
run of the suite, subprocesses included (`subprocess_env`). Set PROMPT_MIX_TEST_FULL_XLA=1 to test with the
default compiler settings instead. Benchmarks never run with these settings.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

FAST_COMPILE = "--xla_backend_optimization_level=0"
if not os.environ.get("PROMPT_MIX_TEST_FULL_XLA"):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  # One cache per run of the suite (xdist workers and subprocesses inherit the environment), removed by
  # the process that made it when it exits.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="prompt_mix_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def subprocess_env(**overrides: str) -> dict:
  """os.environ with `overrides`; an XLA_FLAGS override keeps the suite's compile flags."""
  env = dict(os.environ, **overrides)
  if "XLA_FLAGS" in overrides and os.environ.get("XLA_FLAGS"):
    env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {overrides['XLA_FLAGS']}"
  return env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def shared_path(*parts: str) -> pathlib.Path:
  """Path of a file under `../shared`; skips the calling test with a clear reason when it is absent."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is absent: this test needs the ../shared fixtures beside the project (CI has them)")
  return path


@pytest.fixture
def t5_vocab_path() -> pathlib.Path:
  return shared_path("fixtures", "t5_sentencepiece.model")


@pytest.fixture
def t5x_tiny_checkpoint() -> pathlib.Path:
  return shared_path("fixtures", "t5x_tiny", "checkpoint_0")
