"""Smoke test of experiments/bench_xla_cpu_libraries.py: a row per library, never the timings."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_xla_cpu_libraries.py"


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_xla_cpu_libraries", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_prints_a_row_per_library(capsys):
  bench = _load_script()
  code = bench.main(["--variant", "atto", "--size", "32", "--batch", "1", "--rounds", "1",
                     "--libraries", "ynnpack,eigen"])
  assert code == 0
  rows = [line.split() for line in capsys.readouterr().out.splitlines()]
  names = [row[0] for row in rows if row and row[0] in bench.LIBRARIES]
  assert names == ["ynnpack", "eigen"]


def test_unknown_library_rejected():
  with pytest.raises(SystemExit):
    _load_script().main(["--libraries", "eigen,bogus"])
