"""Smoke test of experiments/profile_step.py: it finds operation events and prints them by kind."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "profile_step.py"


def test_inference_profile_lists_kinds_of_operation():
  # A subprocess, because the script must set XLA_FLAGS before JAX's backend starts.
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--step", "inference", "--variant", "atto", "--size", "32",
       "--batch", "1", "--steps", "1", "--top", "3"],
      capture_output=True, text=True, timeout=300, env=dict(os.environ),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("inference step, ConvNeXt-V2 atto 32x32 px, batch 1:")
  kinds_header = lines.index(f"{'s/step':>8}  share  kind of operation")
  first_kind = lines[kinds_header + 1].split()
  assert float(first_kind[0]) > 0
  assert first_kind[1].endswith("%")
  assert any("slowest operations" in line for line in lines)
