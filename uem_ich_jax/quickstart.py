"""`uem-ich quickstart`: data, training, held-out evaluation and predictions in one command.

The steps, each timed and each reusing what an earlier run left in the work
directory:

1. build `synthetic_ich` at the size `configs/quickstart.py` names into DIR/tfds;
2. train that config in DIR/train (the trainer resumes from its checkpoints);
3. evaluate the best checkpoint on the test fold (held-out patients), with
   thresholds chosen on the validation fold, and print the table;
4. write DIR/results.json;
5. write a phantom DICOM series that is not in the dataset and predict on it,
   and on every `--scan` folder, into DIR/predict_<name>.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

import uem_ich_jax
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

# Phantom seeds of the dataset start at `config.dataset.seed`; this one is far
# above any build size the quickstart uses, so the phantom scan is unseen.
PHANTOM_SEED = 900_001
PHANTOM_SUBTYPES = ("intraparenchymal", "subdural")
# 24 slices of 5 mm, whatever the training grid: enough to hold both bleeds.
PHANTOM_SLICES = 24
PHANTOM_SLICE_MM = 5.0


class QuickstartError(InputError):
  """The quickstart cannot run; the message names the file or setting."""


def config_path() -> pathlib.Path:
  """configs/quickstart.py of the source tree (the package is installed editable)."""
  # TODO: configs/ is not installed with the package, so a non-editable install
  # has no quickstart config; ship the configs as package data to fix that.
  path = pathlib.Path(uem_ich_jax.__file__).resolve().parents[1] / "configs" / "quickstart.py"
  if not path.is_file():
    raise QuickstartError(
        f"{path} does not exist; the quickstart needs the source tree (pip install -e .)"
    )
  return path


def load_config(smoke: bool = False, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  from uem_ich_jax.train import config_file

  spec = f"{config_path()}:smoke" if smoke else str(config_path())
  return config_file.load(spec, list(overrides))


def _print(message: str) -> None:
  print(message, flush=True)


def build_data(config: ml_collections.ConfigDict, data_dir: pathlib.Path) -> dict[str, Any]:
  """Build the dataset `config.dataset` describes into `data_dir`, or reuse it when built."""
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  fields = config.dataset
  name = config.data.name.partition("/")[2]
  builder_config = SyntheticIchConfig(
      name=name,
      layout="slices",
      num_scans=fields.num_scans,
      num_slices=fields.num_slices,
      image_size=fields.image_size,
      field_of_view_mm=fields.field_of_view_mm,
      coverage_mm=fields.coverage_mm,
      num_folds=fields.num_folds,
      seed=fields.seed,
      followup_every=fields.followup_every,
      description="uem-ich quickstart build",
  )
  builder = SyntheticIch(config=builder_config, data_dir=str(data_dir), file_format="array_record")
  start = time.perf_counter()
  reused = builder.is_prepared()
  if reused:
    _print(f"[1/5] dataset {config.data.name} already built in {data_dir}")
  else:
    _print(
        f"[1/5] building {config.data.name}: {fields.num_scans} scans x {fields.num_slices}"
        f" slices x {fields.image_size} px into {data_dir}"
    )
    builder.download_and_prepare()
  seconds = time.perf_counter() - start
  num_examples = builder.info.splits["train"].num_examples
  _print(f"      {num_examples} slices ({seconds:.0f} s)")
  return {"name": config.data.name, "num_examples": num_examples, "reused": reused}


def train_model(config: ml_collections.ConfigDict, train_dir: pathlib.Path) -> dict[str, Any]:
  """Train (or resume) the run; the trainer logs steps/s and the ETA as it goes."""
  from uem_ich_jax.train import trainer

  _print(
      f"[2/5] training {config.model.name}"
      + (f"-{config.model.variant}" if config.model.name == "convnext_v2" else "")
      + f" for {config.num_steps} steps of {config.data.batch_size} slices in {train_dir}"
  )
  try:
    summary = trainer.train(config, train_dir)
  except trainer.NonFiniteLossError as error:
    raise QuickstartError(str(error)) from error
  _print(f"      trained to step {summary['step']}")
  return summary


def evaluate_model(train_dir: pathlib.Path) -> dict[str, Any]:
  """Score the best checkpoint on the held-out test fold and print the table."""
  from uem_ich_jax.evaluate import metrics
  from uem_ich_jax.train import trainer

  _print("[3/5] evaluating on held-out patients (thresholds from the validation fold)")
  result = trainer.evaluate(train_dir)
  _print(
      f"      step {result['step']}, test fold {result['folds']['test']},"
      f" validation fold {result['folds']['validation']}"
  )
  _print(metrics.format_table(result))
  return result


def _safe_name(path: pathlib.Path) -> str:
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.resolve().name).strip("_")
  return name or "scan"


def write_phantom(config: ml_collections.ConfigDict, folder: pathlib.Path) -> pathlib.Path:
  """Write an unseen phantom scan with a bleed as a DICOM series (reused when present)."""
  from uem_ich_jax import phantom

  if folder.is_dir() and any(folder.iterdir()):
    return folder
  # A finer grid than the training data, as a real scan would be; predict
  # crops and resizes it like any other series.
  size = 2 * config.dataset.image_size
  scan = phantom.generate_scan(
      PHANTOM_SEED,
      (PHANTOM_SLICES, size, size),
      spacing_mm=(
          PHANTOM_SLICE_MM,
          config.dataset.field_of_view_mm / size,
          config.dataset.field_of_view_mm / size,
      ),
      subtypes=PHANTOM_SUBTYPES,
      patient_id="quickstart-phantom",
  )
  phantom.write_dicom(scan, folder)
  truth = {
      "scan_labels": {name: int(value) for name, value in scan.scan_labels.items()},
      "slices_with_blood": [int(k) for k in np.flatnonzero((scan.mask > 0).any(axis=(1, 2)))],
  }
  (folder.parent / "phantom_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
  return folder


def run_predictions(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    train_dir: pathlib.Path,
    scans: Sequence[str | os.PathLike],
) -> dict[str, Any]:
  """Predict on the phantom series and on every `--scan`; a failing scan is reported, not fatal."""
  from uem_ich_jax.infer import predict

  _print("[5/5] predicting")
  targets = [("phantom", write_phantom(config, workdir / "phantom_dicom"))]
  used = {"phantom"}
  for scan in scans:
    name = _safe_name(pathlib.Path(scan))
    while name in used:
      name += "_"
    used.add(name)
    targets.append((name, pathlib.Path(scan)))

  outcomes = {}
  for name, path in targets:
    output = workdir / f"predict_{name}"
    try:
      report = predict.predict(train_dir, path, output)
    except InputError as error:
      logger.error("prediction on %s failed: %s", path, error)
      outcomes[name] = {"input": str(path), "error": str(error)}
      continue
    scan = report["scan"]["any"]
    verdict = "positive" if scan["positive"] else "negative"
    _print(
        f"      {path}: any {verdict}, max {scan['max_probability']:.3f} at slice {scan['slice']}"
        f" of {report['shape'][0]} -> {output}"
    )
    outcomes[name] = {
        "input": str(path),
        "output": str(output),
        "any_positive": scan["positive"],
        "any_max_probability": scan["max_probability"],
        "top_slice": scan["slice"],
    }
  return outcomes


def _load_average() -> list[float] | None:
  try:
    return [round(value, 2) for value in os.getloadavg()]
  except OSError:
    return None


def run(
    workdir: str | os.PathLike,
    *,
    scans: Sequence[str | os.PathLike] = (),
    smoke: bool = False,
) -> dict[str, Any]:
  """Run the five steps in `workdir` and return what DIR/results.json holds."""
  import jax

  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = workdir / "tfds"
  train_dir = workdir / "train"
  config = load_config(smoke, [f"--config.data.data_dir={data_dir}"])
  timings = {}
  load_start = _load_average()

  start = time.perf_counter()
  data = build_data(config, data_dir)
  timings["build_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  summary = train_model(config, train_dir)
  timings["train_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  result = evaluate_model(train_dir)
  timings["evaluate_seconds"] = time.perf_counter() - start

  auc = {name: result["classes"][name]["auc"] for name in uem_ich_jax.SLICE_LABELS}
  results = {
      "auc": auc,
      "checkpoint": str(train_dir),
      "step": result["step"],
      "auc_macro": result["auc"]["macro"],
      "auc_micro": result["auc"].get("micro"),
      "evaluation": result,
      "training": {"final_train": summary.get("train"), "final_validation": summary.get("validation")},
      "dataset": {**data, "data_dir": str(data_dir), **config.dataset.to_dict()},
      "model": config.model.to_dict(),
      "config": "configs/quickstart.py" + (":smoke" if smoke else ""),
      "timings": timings,
      "machine": {
          "backend": jax.default_backend(),
          "devices": jax.device_count(),
          "cpu_count": os.cpu_count(),
          "load_average_at_start": load_start,
      },
  }
  path = _write_results(workdir, results)
  _print(f"[4/5] wrote {path}: AUC " + ", ".join(f"{k} {_format_auc(v)}" for k, v in auc.items()))

  start = time.perf_counter()
  results["predictions"] = run_predictions(config, workdir, train_dir, scans)
  timings["predict_seconds"] = time.perf_counter() - start
  timings["total_seconds"] = sum(timings.values())
  results["machine"]["load_average_at_end"] = _load_average()
  _write_results(workdir, results)
  _print(f"done; {path} now lists the predictions too")
  _print(
      "      "
      + ", ".join(f"{key.removesuffix('_seconds')} {value:.0f} s" for key, value in timings.items())
  )
  return results


def _format_auc(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def _write_results(workdir: pathlib.Path, results: dict[str, Any]) -> pathlib.Path:
  path = workdir / "results.json"
  path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
  return path
