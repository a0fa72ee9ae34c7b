"""Shared test fixtures: paths to the real scans and fixtures outside the repository."""

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tests jit the same small programs many times (new closures, same HLO), so a
# persistent compilation cache turns most compiles into reads. It must be set
# before the first compile, because JAX fixes the cache then. Tests that need
# several CPU devices start their own subprocess with XLA_FLAGS set.
if not jax.config.jax_compilation_cache_dir:
  jax.config.update(
      "jax_compilation_cache_dir",
      os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache")),
  )
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# Depthwise convolutions through lax.conv: on CPU the default shifted form
# compiles about 3x slower, and the suite is mostly compilation. Tests of the
# shifted form ask for it by name. Subprocesses inherit the setting.
os.environ.setdefault("UEM_ICH_CPU_DEPTHWISE", "conv")
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "dcm_qa_ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> pathlib.Path:
  """The dcm_qa_ct scans (GE and Philips, both with gantry tilt)."""
  if not REAL_CT.is_dir():
    pytest.skip(f"real head CT scans not found at {REAL_CT}; they are not in the repository")
  return REAL_CT


FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """Random-weight PyTorch modules with inputs and expected outputs."""
  if not FIXTURES.is_dir():
    pytest.skip(f"PyTorch parity fixtures not found at {FIXTURES}; they are not in the repository")
  return FIXTURES
