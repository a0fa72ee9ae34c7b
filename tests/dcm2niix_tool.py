"""Where the tests find the dcm2niix command, which the `test` extra installs."""

import pathlib
import shutil
import sys

import pytest


def binary() -> str:
  """Return the dcm2niix next to this Python, else the one on PATH; skip the test without one."""
  beside_python = pathlib.Path(sys.executable).parent / "dcm2niix"
  if beside_python.is_file():
    return str(beside_python)
  found = shutil.which("dcm2niix")
  if found is None:
    pytest.skip("dcm2niix not installed (pip install dcm2niix)")
  return found
