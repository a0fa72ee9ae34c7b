"""Shared test fixtures: paths to the real scans and fixtures outside the repository."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
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
