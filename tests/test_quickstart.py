"""`uem-ich quickstart --smoke` end to end: data, training, evaluation, results.json, predictions."""

import json
import math

import pytest

import uem_ich_jax
from uem_ich_jax import cli

GE_SERIES = "ge_head_tilt_variable_spacing"


def _strict_json(path):
  return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path, real_ct_dir, capsys):
  workdir = tmp_path / "qs"
  scan = real_ct_dir / GE_SERIES
  rc = cli.main(["quickstart", f"--workdir={workdir}", "--smoke", f"--scan={scan}"])
  assert rc == 0
  out = capsys.readouterr().out
  for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
    assert step in out
  assert "AUC" in out  # the metrics table

  results = _strict_json(workdir / "results.json")
  assert list(results["auc"]) == list(uem_ich_jax.SLICE_LABELS)
  for value in results["auc"].values():
    assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)
  assert results["checkpoint"] == str(workdir / "train")
  assert (workdir / "train" / "config.json").is_file()
  evaluation = results["evaluation"]
  assert evaluation["n_test"] > 0
  assert set(evaluation["classes"]["any"]) >= {"f1", "sensitivity", "specificity", "threshold"}
  assert set(results["timings"]) >= {
      "build_seconds", "train_seconds", "evaluate_seconds", "predict_seconds", "total_seconds"
  }
  assert all(math.isfinite(value) and value >= 0 for value in results["timings"].values())

  predictions = results["predictions"]
  assert set(predictions) == {"phantom", GE_SERIES}
  for name, outcome in predictions.items():
    assert "error" not in outcome, outcome
    report = _strict_json(workdir / f"predict_{name}" / "report.json")
    assert report["model"]["workdir"] == str(workdir / "train")
    assert (workdir / f"predict_{name}" / "overview.png").is_file()
  assert _strict_json(workdir / "predict_phantom" / "report.json")["shape"][0] == 24
  assert _strict_json(workdir / f"predict_{GE_SERIES}" / "report.json")["shape"][0] == 28
  truth = _strict_json(workdir / "phantom_truth.json")
  assert truth["scan_labels"]["any"] == 1

  # A second run reuses the data and the trained run.
  rc = cli.main(["quickstart", f"--workdir={workdir}", "--smoke"])
  assert rc == 0
  assert "already built" in capsys.readouterr().out
