"""Smoke test of experiments/curriculum_synthetic.py: the three stages and both evaluations on tiny data."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = (
    "3D foreground Dice", "scan AUC any (aggregator)", "box mAP@0.5", "mean relative volume error"
)


def _driver():
  path = REPO / "experiments" / "curriculum_synthetic.py"
  spec = importlib.util.spec_from_file_location("curriculum_synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TINY = [
    "--num-scans=10", "--num-slices=8", "--image-size=64", "--batch-size=4",
    "--aggregator-batch-size=2", "--ssl-steps=2", "--multitask-steps=2",
    "--aggregator-steps=2", "--evals=1", "--embed-dim=16", "--ssl-decoder-width=32",
]


def test_curriculum_layouts_share_plan():
  from uem_ich_jax.datasets import synthetic_ich

  configs = {config.name: config for config in synthetic_ich.SyntheticIch.BUILDER_CONFIGS}
  slices, scans = configs["slices_curriculum"], configs["scans_curriculum"]
  assert (slices.layout, scans.layout) == ("slices", "scans")
  builder_module = sys.modules[synthetic_ich.SyntheticIch.__module__]
  assert builder_module.plan_scans(slices) == builder_module.plan_scans(scans)


@pytest.mark.slow  # 4 to 6 minutes on 2 shared CPU cores, most of it compiling three stages
def test_driver_writes_results_table(tmp_path):
  driver = _driver()
  workdir = tmp_path / "curriculum"
  assert driver.main([f"--workdir={workdir}", *TINY]) == 0

  markdown = (workdir / "results.md").read_text()
  for name in METRICS:
    assert f"| {name} |" in markdown
  assert f"| {driver.REFERENCE_ROW} |" in markdown
  for stage in ("build data", "ssl", "multitask", "aggregator"):
    assert f"| {stage}" in markdown

  result = json.loads((workdir / "results.json").read_text())
  assert [row["metric"] for row in result["targets"]] == list(METRICS)
  for row in result["targets"]:
    assert isinstance(row["pass"], bool)
    if row["test"] is None:
      assert row["pass"] is False
      continue
    assert math.isfinite(row["test"])
    if row["metric"] == "mean relative volume error":
      expected = row["test"] < 0.2
    else:
      expected = row["test"] >= float(row["target"].removeprefix(">= "))
    assert row["pass"] == expected
  for stage in ("ssl", "multitask", "aggregator"):
    assert result["stages"][stage]["step"] == 2
    assert result["stages"][stage]["train_seconds"] > 0
  # Each stage starts from the encoder that the previous stage exported.
  assert result["stages"]["multitask"]["overrides"]["init_from"].endswith("ssl/export/encoder")
  assert result["stages"]["aggregator"]["overrides"]["init_from"].endswith(
      "multitask/export/encoder"
  )
  assert (workdir / "multitask" / "export" / "encoder").is_dir()
