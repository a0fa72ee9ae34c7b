"""K-fold evaluation: one training run per reported fold, summarised with tables and plots.

For each k in 0..K-1, `run_kfold` trains the config in WORKDIR/fold_k with
fold k as the test fold and fold k+1 (mod the dataset's fold count) as the
validation fold. The run chooses its best checkpoint and its thresholds on
the validation fold, and `trainer.evaluate` then scores that checkpoint on
fold k. Every fold starts from the same initialisation (the
config's seed and `init_from`). Fold k is never seen before its evaluation.

A rerun skips the folds whose result JSON exists and resumes a half-trained
fold from its checkpoints, so a crash loses at most the steps since the
last checkpoint. The results go to WORKDIR/kfold_results.md, kfold_results.csv
and kfold_summary.json, with roc.png and calibration.png beside them when the
stage outputs probabilities.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from uem_ich_jax.data import pipeline
from uem_ich_jax.errors import InputError
from uem_ich_jax.evaluate import metrics as metrics_lib
from uem_ich_jax.train import checkpoint as checkpoint_lib
from uem_ich_jax.train import stages
from uem_ich_jax.train import trainer
from uem_ich_jax.train import writer as writer_lib

logger = logging.getLogger(__name__)

MIN_FOLDS = 3
RESULT_FILE = "kfold_eval.json"
SUMMARY_FILE = "kfold_summary.json"
MARKDOWN_FILE = "kfold_results.md"
CSV_FILE = "kfold_results.csv"
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
CALIBRATION_BINS = 10
# Config fields that cannot change a fold's result, so a rerun may change them.
NEUTRAL_FIELDS = (
    "data.data_dir", "data.eval_batch_size", "data.worker_count", "distributed", "log_every", "mesh"
)
# The rows of the per-fold Markdown table for results with classification keys.
CLASSIFICATION_HEADLINE = (
    "auc/macro", "auc/micro", "macro/f1", "macro/sensitivity", "macro/specificity"
)
CLASS_HEADLINE = ("auc", "f1", "sensitivity", "specificity", "threshold")


class KFoldError(InputError):
  """A k-fold request that the config, the dataset or the work directory cannot serve."""


@dataclasses.dataclass(frozen=True)
class FoldRun:
  """One reported fold: its config, work directory and result file."""

  index: int
  config: ml_collections.ConfigDict
  folds: trainer.Folds
  workdir: pathlib.Path
  result_path: pathlib.Path


# ------------------------------------------------------------------- Plan ---


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
  """Return a copy of `config` that tests on `fold` and validates on the fold after it."""
  copied = config.copy_and_resolve_references()
  copied.data.test_fold = fold
  copied.data.validation_fold = -1
  return copied


def plan_folds(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, num_folds: int
) -> list[FoldRun]:
  """Check the request and return the runs of folds 0..num_folds-1, in WORKDIR/fold_<k>."""
  if num_folds < MIN_FOLDS:
    raise KFoldError(
        f"--folds must be at least {MIN_FOLDS}, got {num_folds}: a standard deviation over fewer"
        " reported folds says little"
    )
  dataset_folds = config.data.num_folds
  if num_folds > dataset_folds:
    raise KFoldError(
        f"--folds={num_folds} exceeds config.data.num_folds = {dataset_folds}: the dataset"
        f" {config.data.name} is split into {dataset_folds} patient folds, so at most"
        f" {dataset_folds} can be reported"
    )
  if config.data.validation_fold >= 0:
    logger.warning(
        "config.data.validation_fold = %d is ignored: fold k is validated on fold k+1 (mod %d)",
        config.data.validation_fold,
        dataset_folds,
    )
  workdir = pathlib.Path(workdir)
  runs = []
  for index in range(num_folds):
    fold = fold_config(config, index)
    run_dir = workdir / f"fold_{index}"
    runs.append(
        FoldRun(
            index=index,
            config=fold,
            folds=trainer.split_folds(fold.data),
            workdir=run_dir,
            result_path=run_dir / RESULT_FILE,
        )
    )
  return runs


def check_dataset_folds(config: ml_collections.ConfigDict) -> None:
  """Check that every fold 0..config.data.num_folds-1 of the dataset has examples.

  NOTE: a dataset without `fold_ranges` in its metadata is read once per fold here.
  """
  source = trainer.dataset_source(config)
  dataset_folds = config.data.num_folds
  for fold in range(dataset_folds):
    if pipeline.fold_indices(source, [fold]).size == 0:
      raise KFoldError(
          f"fold {fold} of dataset {config.data.name} has no examples, but"
          f" config.data.num_folds = {dataset_folds}; set it to the number of folds the dataset"
          " was built with"
      )
  used = pipeline.fold_indices(source, range(dataset_folds)).size
  if used < len(source):
    # Training on fewer folds than the dataset has would leave patients unused
    # and misstate the fold sizes in the results.
    raise KFoldError(
        f"{len(source) - used} of {len(source)} examples of {config.data.name} lie in folds"
        f" beyond config.data.num_folds = {dataset_folds}; set config.data.num_folds to the"
        " number of folds the dataset was built with (choose fewer test folds with --folds)"
    )


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  # The JSON round trip makes a new config comparable with a saved config.json.
  plain = checkpoint_lib.load_config_text(config.to_json_best_effort()).to_dict()
  flat = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  walk(plain, "")
  return flat


def check_saved_config(run: FoldRun) -> None:
  """Raise when `run.workdir` contains a run of another config, whose results would mix in."""
  if not (run.workdir / checkpoint_lib.CONFIG_FILE).is_file():
    return
  saved = _flat_config(checkpoint_lib.load_config(run.workdir))
  current = _flat_config(run.config)
  changed = [
      key for key in sorted(set(saved) | set(current))
      if saved.get(key) != current.get(key)
      and not any(key == field or key.startswith(f"{field}.") for field in NEUTRAL_FIELDS)
  ]
  if changed:
    details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:5])
    raise KFoldError(
        f"{run.workdir} contains a run of another config ({details}); its fold would not"
        " match the others. Delete that folder to rerun the fold, or use another --workdir"
    )


def _source_label_folds(init_from: str) -> tuple[str, list[int]] | None:
  """Return (stage, folds whose labels it saw) of a supervised `init_from` source, else None."""
  path = pathlib.Path(init_from)
  manifest = path / checkpoint_lib.ENCODER_MANIFEST
  if manifest.is_file():
    workdir = json.loads(manifest.read_text()).get("workdir")
    if not workdir:
      return None
    path = pathlib.Path(workdir)
  if not (path / checkpoint_lib.CONFIG_FILE).is_file():
    return None
  source = checkpoint_lib.load_config(path)
  try:
    stage = stages.get_stage(source.stage)
  except (InputError, ImportError):
    stage = None
  if stage is not None and getattr(stage, "encoder_path", None) is not None:
    # A stage that exports an encoder is self-supervised pretraining (today only
    # ssl_pretrain), which reads images but no labels.
    return None
  try:
    folds = trainer.split_folds(source.data)
  except InputError:
    return None
  return str(source.stage), sorted(folds.train + folds.validation)


def reported_folds_seen_by_init(config: ml_collections.ConfigDict, num_folds: int) -> list[int]:
  """Return the reported folds whose labels the `init_from` source was trained or selected on.

  Such folds give optimistic results, so a warning names them.
  """
  if str(config.init_from) == trainer.RANDOM_INIT or not config.init_from:
    return []
  seen = _source_label_folds(str(config.init_from))
  if seen is None:
    return []
  stage, source_folds = seen
  overlap = sorted(set(source_folds) & set(range(num_folds)))
  if overlap:
    logger.warning(
        "config.init_from %s comes from a %r run that trained or chose checkpoints on the labels"
        " of folds %s; the reported folds %s are among them, so their results are optimistic",
        config.init_from, stage, source_folds, overlap,
    )
  return overlap


# -------------------------------------------------------------------- Run ---


def _load_result(path: pathlib.Path) -> dict[str, Any] | None:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    logger.warning("%s is not valid JSON (%s); evaluating that fold again", path, error)
    return None


def run_fold(run: FoldRun) -> dict[str, Any]:
  """Train (or resume) one fold's run and evaluate its best checkpoint on the test fold."""
  trainer.train(run.config, run.workdir)
  return trainer.evaluate(run.workdir, output=run.result_path)


def run_kfold(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, folds: int
) -> dict[str, Any]:
  """Train and evaluate folds 0..folds-1 of `config`, then write tables and plots to `workdir`.

  Returns the summary that kfold_summary.json stores.
  Raises KFoldError for a bad `folds`, a dataset with fewer folds than
  `config.data.num_folds`, or a fold folder of another config.
  """
  workdir = pathlib.Path(workdir)
  runs = plan_folds(config, workdir, folds)
  for run in runs:
    check_saved_config(run)
  check_dataset_folds(config)
  seen_by_init = reported_folds_seen_by_init(config, folds)

  results: list[dict[str, Any]] = []
  started = time.perf_counter()
  durations: list[float] = []
  for position, run in enumerate(runs, start=1):
    label = (
        f"fold {position}/{folds} (test fold {run.folds.test[0]}, validation fold"
        f" {run.folds.validation[0]})"
    )
    result = _load_result(run.result_path)
    if result is not None:
      logger.info("%s: %s exists, skipping this fold", label, run.result_path)
    else:
      logger.info("%s: training in %s", label, run.workdir)
      fold_start = time.perf_counter()
      result = run_fold(run)
      durations.append(time.perf_counter() - fold_start)
    results.append(result)
    elapsed = time.perf_counter() - started
    remaining = folds - position
    # The ETA assumes the remaining folds take as long as the folds trained in this call.
    eta = float(np.mean(durations)) * remaining if durations else float("nan")
    logger.info(
        "%s done; elapsed %s, ETA %s",
        label,
        writer_lib.format_eta(elapsed),
        writer_lib.format_eta(eta) if remaining else "0:00:00",
    )

  summary = summarize(config, runs, results, seen_by_init=seen_by_init)
  if jax.process_index() == 0:
    write_outputs(workdir, runs, results, summary)
  return summary


# ---------------------------------------------------------------- Results ---


def _fold_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
  """Return the metrics of one fold's result, without the run's bookkeeping."""
  bookkeeping = ("workdir", "step", "folds", "headline")
  return {key: value for key, value in result.items() if key not in bookkeeping}


def _predictions(run: FoldRun, result: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
  path = run.result_path.with_name(f"predictions_step{result['step']}_fold{run.folds.test[0]}.npz")
  if not path.is_file():
    logger.info("%s not found; fold %d has no per-example outputs to plot", path, run.index)
    return None
  with np.load(path) as arrays:
    return {key: arrays[key] for key in arrays.files}


def summarize(
    config: ml_collections.ConfigDict,
    runs: Sequence[FoldRun],
    results: Sequence[Mapping[str, Any]],
    *,
    seen_by_init: Sequence[int] = (),
) -> dict[str, Any]:
  """Combine the fold results into the summary that kfold_summary.json stores."""
  return {
      "stage": config.stage,
      "dataset": config.data.name,
      "n_folds": len(runs),
      "dataset_folds": config.data.num_folds,
      "init_from": str(config.init_from),
      "reported_folds_seen_by_init_from": list(seen_by_init),
      "folds": [
          {
              "test_fold": run.folds.test[0],
              "validation_fold": run.folds.validation[0],
              "train_folds": list(run.folds.train),
              "step": result.get("step"),
              "workdir": str(run.workdir),
              "result": str(run.result_path),
          }
          for run, result in zip(runs, results)
      ],
      "summary": metrics_lib.summarize_folds([_fold_metrics(result) for result in results]),
  }


def _stats(values: Sequence[float | int | None]) -> tuple[float | None, float | None, int]:
  numbers = [float(value) for value in values if value is not None]
  mean = float(np.mean(numbers)) if numbers else None
  std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None
  return mean, std, len(numbers)


def _cell(value: float | int | None) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, int):
    return str(value)
  return f"{value:.3f}"


def table_metrics(
    flat_results: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> list[str]:
  """Return the metric paths of the per-fold Markdown table: the headline ones for
  classification, else all."""
  keys = list(dict.fromkeys(key for flat in flat_results for key in flat))
  if "auc/macro" not in keys:
    return keys
  headline = [key for key in CLASSIFICATION_HEADLINE if key in keys]
  for name in class_names:
    wanted = [f"classes/{name}/{metric}" for metric in CLASS_HEADLINE] + [f"ece/{name}"]
    headline += [key for key in wanted if key in keys]
  return headline


def write_csv(
    path: pathlib.Path, runs: Sequence[FoldRun], flat_results: Sequence[Mapping[str, Any]],
    steps: Sequence[int | None],
) -> None:
  """Write one row per fold, then the mean, sample std and count over folds of each metric."""
  keys = list(dict.fromkeys(key for flat in flat_results for key in flat))
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["fold", "test_fold", "validation_fold", "step", *keys])
    for run, flat, step in zip(runs, flat_results, steps):
      cells = ["" if flat.get(key) is None else repr(flat[key]) for key in keys]
      writer.writerow([run.index, run.folds.test[0], run.folds.validation[0], step, *cells])
    stats = [_stats([flat.get(key) for flat in flat_results]) for key in keys]
    for row, position in (("mean", 0), ("std", 1), ("n", 2)):
      cells = ["" if stat[position] is None else repr(stat[position]) for stat in stats]
      writer.writerow([row, "", "", "", *cells])


def format_markdown(
    summary: Mapping[str, Any],
    runs: Sequence[FoldRun],
    flat_results: Sequence[Mapping[str, Any]],
    calibration: Mapping[str, Any] | None,
) -> str:
  """Format kfold_results.md: the per-class summary, the metrics per fold, and the folds."""
  folds = summary["summary"]
  num_folds = summary["n_folds"]
  lines = [
      f"# {num_folds}-fold evaluation: {summary['stage']} on {summary['dataset']}",
      "",
      f"Test folds 0..{num_folds - 1} of the dataset's {summary['dataset_folds']} patient folds."
      f" Fold k is validated on fold k+1 (mod {summary['dataset_folds']}), which chooses the"
      " checkpoint and the thresholds; fold k is used only for these results. Cells give the"
      " mean ± sample standard deviation (ddof=1) over the folds that define the value, and n"
      " counts those folds.",
      "",
  ]
  if summary["reported_folds_seen_by_init_from"]:
    lines += [
        f"**Warning:** the weights in `init_from` ({summary['init_from']}) were trained with the"
        f" labels of folds {summary['reported_folds_seen_by_init_from']}, so their results are"
        " optimistic.",
        "",
    ]
  if "classes" in folds and "macro" in folds:
    lines += ["## Per class", "", metrics_lib.format_markdown_table(folds), ""]

  keys = table_metrics(flat_results, folds.get("class_names", []))
  header = ["metric", "mean ± std", "n", *(f"fold {run.folds.test[0]}" for run in runs)]
  lines += ["## Metrics per fold", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key in keys:
    values = [flat.get(key) for flat in flat_results]
    mean, std, count = _stats(values)
    text = "n/a"
    if mean is not None:
      text = f"{mean:.3f}"
    if std is not None:
      text += f" ± {std:.3f}"
    lines.append("| " + " | ".join([key, text, str(count), *map(_cell, values)]) + " |")
  lines.append("")

  if calibration:
    ece = calibration["ece_pooled_folds"]
    cells = ", ".join(f"{name} {value:.3f}" for name, value in ece.items() if name != "pooled")
    lines += [
        "## Calibration",
        "",
        f"Expected calibration error over the test folds pooled ({calibration['bins']} equal-width"
        f" bins): {cells}; all classes together {ece['pooled']:.3f}. See {CALIBRATION_FILE} and"
        f" {ROC_FILE}.",
        "",
    ]

  lines += [
      "## Folds",
      "",
      "| test fold | validation fold | training folds | checkpoint step | run |",
      "|---|---|---|---|---|",
  ]
  for fold in summary["folds"]:
    lines.append(
        f"| {fold['test_fold']} | {fold['validation_fold']} |"
        f" {', '.join(map(str, fold['train_folds']))} | {fold['step']} | {fold['workdir']} |"
    )
  return "\n".join(lines) + "\n"


def write_plots(
    workdir: pathlib.Path,
    runs: Sequence[FoldRun],
    results: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> dict[str, Any] | None:
  """Draw roc.png and calibration.png from the folds' saved predictions.

  Returns the calibration errors, or None (with a log line) when the stage
  has no per-class probabilities to plot.
  """
  class_names = summary["summary"].get("class_names") or []
  loaded = [_predictions(run, result) for run, result in zip(runs, results)]
  usable = [
      arrays for arrays in loaded
      if arrays is not None and "probabilities" in arrays and "labels" in arrays
  ]
  if not class_names or len(usable) < len(runs):
    logger.info(
        "no plots: the %s results lack class names or per-example probabilities and labels",
        summary["stage"],
    )
    return None
  for run, arrays in zip(runs, usable):
    shape = arrays["probabilities"].shape
    if len(shape) != 2 or shape[1] != len(class_names) or arrays["labels"].shape != shape:
      logger.info(
          "no plots: fold %d's probabilities have shape %s and its labels %s; expected (n, %d)",
          run.index, shape, arrays["labels"].shape, len(class_names),
      )
      return None

  # Imported here, because importing matplotlib takes about 0.4 s (2 CPU cores) and only the
  # plots need it.
  from uem_ich_jax.evaluate import plots

  auc_summary = {name: summary["summary"]["classes"][name]["auc"] for name in class_names}
  fold_outputs = [
      (run.folds.test[0], arrays["labels"], arrays["probabilities"])
      for run, arrays in zip(runs, usable)
  ]
  plots.plot_roc(workdir / ROC_FILE, fold_outputs, class_names, auc_summary)
  labels = np.concatenate([arrays["labels"] for arrays in usable])
  probabilities = np.concatenate([arrays["probabilities"] for arrays in usable])
  pooled = plots.plot_calibration(
      workdir / CALIBRATION_FILE, labels, probabilities, class_names, num_bins=CALIBRATION_BINS
  )
  per_fold = [
      {
          name: metrics_lib.expected_calibration_error(
              arrays["labels"][:, column], arrays["probabilities"][:, column], CALIBRATION_BINS
          )
          for column, name in enumerate(class_names)
      }
      for arrays in usable
  ]
  logger.info("wrote %s and %s", workdir / ROC_FILE, workdir / CALIBRATION_FILE)
  return {"bins": CALIBRATION_BINS, "ece_pooled_folds": pooled, "ece_per_fold": per_fold}


def write_outputs(
    workdir: pathlib.Path,
    runs: Sequence[FoldRun],
    results: Sequence[Mapping[str, Any]],
    summary: dict[str, Any],
) -> None:
  """Write the plots, kfold_results.csv, kfold_results.md and kfold_summary.json to `workdir`."""
  workdir.mkdir(parents=True, exist_ok=True)
  calibration = write_plots(workdir, runs, results, summary)
  flat_results = [metrics_lib.flatten_result(_fold_metrics(result)) for result in results]
  if calibration is not None:
    summary["calibration"] = calibration
    for flat, errors in zip(flat_results, calibration["ece_per_fold"]):
      flat.update({f"ece/{name}": value for name, value in errors.items()})
  write_csv(workdir / CSV_FILE, runs, flat_results, [result.get("step") for result in results])
  (workdir / MARKDOWN_FILE).write_text(format_markdown(summary, runs, flat_results, calibration))
  summary["files"] = {
      "markdown": str(workdir / MARKDOWN_FILE),
      "csv": str(workdir / CSV_FILE),
      "roc": str(workdir / ROC_FILE) if calibration is not None else None,
      "calibration": str(workdir / CALIBRATION_FILE) if calibration is not None else None,
  }
  (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
  logger.info(
      "wrote %s, %s and %s", workdir / MARKDOWN_FILE, workdir / CSV_FILE, workdir / SUMMARY_FILE
  )
