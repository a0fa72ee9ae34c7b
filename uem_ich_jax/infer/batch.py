"""`uem-ich predict` on many studies: a CSV or a folder tree in, one folder per study out.

Studies come from one of two sources:

  CSV     A header row with the column `input` and the optional columns
          `id` and `series_uid`. `input` is a DICOM folder or file, or a
          NIfTI file, and a relative path is taken from the CSV file's
          folder. `id` names the study (default: the input's name without
          .nii/.nii.gz). `series_uid` is the DICOM series to read (default:
          the CQ500 series rule). Studies keep the CSV's row order.
  folder  With `--batch`, every NIfTI file (.nii, .nii.gz) under the folder
          is a study. So is every leaf folder (one without subfolders)
          that contains a DICOM file, which is a file named .dcm, .dicom,
          .dic or .ima, or one with "DICM" at byte 128. Links are followed,
          and each folder is visited once. Studies are listed depth first
          by name, as a file manager lists the tree: a folder's files and
          subfolders in one name order. A study's id is its path relative
          to the folder, with "/" written as "__". A study whose
          series sit in separate subfolders therefore becomes one study per
          series folder, so list such a study folder in a CSV instead to
          choose among its series.

Outputs go to OUT/<folder>/ (the files of a single-scan prediction) and
OUT/summary.csv (`SUMMARY_COLUMNS`, one row per study, in study order). The
folder is the id made safe by `safe_study_id`, so every output stays inside
OUT whatever the ids contain. The summary gives both the id as given and its
folder.

Restart: a study is predicted into OUT/.partial-<folder>/ and renamed to
OUT/<folder>/ only after its report.json is written, so
OUT/<folder>/report.json exists only for a finished study. Running the same command again skips
those studies (their summary rows are rebuilt from report.json) and
predicts the rest, failed and half-written ones included.

The runs are restored once, before the first study that needs a
prediction. A study that fails (a missing path, an unreadable scan) is
logged and recorded in the summary with its error, and the batch goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

import tqdm
from tqdm.contrib import logging as tqdm_logging

from uem_ich_jax.ct import dicom_files
from uem_ich_jax.errors import InputError
from uem_ich_jax.infer import predict

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = (
    "id",
    "folder",
    "input",
    "series_uid",
    "status",
    "error",
    "any_probability",
    "positive_labels",
    "aggregator_positive_labels",
    "blood_ml",
    "seconds",
)
PARTIAL_PREFIX = ".partial-"
MAX_ID_LENGTH = 80
_HASH_LENGTH = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Names that Windows reserves for devices, whatever the suffix.
_RESERVED_STEMS = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)}
)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_DICM_OFFSET = 128


class BatchError(InputError):
  """A batch input (CSV, folder tree) that cannot be used at all; the message names it."""


@dataclasses.dataclass(frozen=True)
class Study:
  """One study of a batch.

  Attributes:
    folder: the output folder name under OUT: `id` made safe by
      `safe_study_id`, and suffixed with -2, -3, ... when it repeats.
    id: the study id as given (CSV) or derived from the input's path.
    input: the scan path as given (CSV) or found (folder tree).
    path: `input` resolved against the CSV's folder.
    series_uid: the DICOM series to read, or None for the series rule.
  """

  folder: str
  id: str
  input: str
  path: pathlib.Path
  series_uid: str | None = None


# ------------------------------------------------------------ Study ids ---


def safe_study_id(name: str) -> str:
  """Return `name` as a folder name that stays inside the output folder.

  Keeps ASCII letters, digits, ".", "_" and "-" (accents are dropped, other
  characters become "_"), strips leading dots and dashes, and caps the length
  at `MAX_ID_LENGTH`. A name that had to change gets a hash of the original,
  so two different names never end up as the same id.
  """
  ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
  cleaned = _UNSAFE.sub("_", ascii_name).lstrip(".-").rstrip(".")
  stem = cleaned.split(".")[0].upper()
  reserved = stem in _RESERVED_STEMS or name == SUMMARY_FILE
  if name and cleaned == name and len(name) <= MAX_ID_LENGTH and not reserved:
    return name
  digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
  cleaned = cleaned[: MAX_ID_LENGTH - _HASH_LENGTH - 1].rstrip(".")
  return f"{cleaned}-{digest}" if cleaned else f"study-{digest}"


def _unique_folders(studies: list[Study]) -> list[Study]:
  """Suffix repeated folders with -2, -3, ... (case-insensitively, for macOS and Windows disks)."""
  seen: set[str] = set()
  unique = []
  for study in studies:
    folder = study.folder
    count = 1
    while folder.casefold() in seen:
      count += 1
      folder = f"{study.folder}-{count}"
    if folder != study.folder:
      logger.warning("study folder %r repeats; %s (id %r) is written to %s", study.folder,
                     study.input, study.id, folder)
    seen.add(folder.casefold())
    unique.append(dataclasses.replace(study, folder=folder))
  return unique


def _default_name(path: str) -> str:
  name = pathlib.PurePath(path).name or path
  for suffix in _NIFTI_SUFFIXES:
    if name.lower().endswith(suffix) and len(name) > len(suffix):
      return name[: -len(suffix)]
  return name


# ---------------------------------------------------------- Study lists ---


def studies_from_csv(path: str | os.PathLike) -> list[Study]:
  """Read the studies of a CSV with the column `input` and the optional `id` and `series_uid`."""
  path = pathlib.Path(path)
  try:
    with path.open(newline="", encoding="utf-8-sig") as file:
      rows = list(csv.DictReader(file))
      columns = rows[0].keys() if rows else []
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise BatchError(f"{path}: cannot be read as a CSV file ({error})") from error
  if not rows:
    raise BatchError(f"{path}: no studies; expected a header row with `input` and one row per study")
  if "input" not in columns:
    raise BatchError(
        f"{path}: no `input` column (columns: {', '.join(map(str, columns))}); expected `input`"
        " and optionally `id` and `series_uid`"
    )
  studies = []
  for number, row in enumerate(rows, start=2):
    text = (row.get("input") or "").strip()
    if not text:
      if any((value or "").strip() for value in row.values() if isinstance(value, str)):
        raise BatchError(f"{path}, line {number}: `input` is empty")
      continue  # A blank line.
    name = (row.get("id") or "").strip() or _default_name(text)
    series_uid = (row.get("series_uid") or "").strip() or None
    studies.append(Study(safe_study_id(name), name, text, path.parent / text, series_uid))
  return _unique_folders(studies)


def _holds_dicom(folder: pathlib.Path, names: Sequence[str]) -> bool:
  # NOTE: a folder whose files have no DICOM suffix and no preamble (raw datasets) is not
  # found. The DICOM reader accepts such files, so list that folder in a CSV instead.
  for name in names:
    if name.startswith("."):
      continue
    file = folder / name
    if pathlib.PurePath(name).suffix.lower() in _DICOM_SUFFIXES:
      return True
    try:
      with file.open("rb") as handle:
        handle.seek(_DICM_OFFSET)
        if handle.read(4) == b"DICM":
          return True
    except OSError:
      continue
  return False


def _is_nifti_name(name: str) -> bool:
  return name.lower().endswith(_NIFTI_SUFFIXES) and not name.startswith(".")


def discover_studies(root: str | os.PathLike) -> list[Study]:
  """Find the studies of a folder tree by the rule in this module's docstring, in tree order."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise BatchError(f"{root}: not a folder; --batch needs a folder of studies (or pass a CSV)")
  studies = []
  for folder, subfolders, names in dicom_files.walk_once(root):
    subfolders.sort()
    names.sort()
    folder = pathlib.Path(folder)
    relative = folder.relative_to(root)
    for name in names:
      if _is_nifti_name(name):
        studies.append(_found_study(root, relative / name))
    files = [name for name in names if not _is_nifti_name(name)]
    if not subfolders and files and _holds_dicom(folder, files):
      studies.append(_found_study(root, relative))
  if not studies:
    raise BatchError(
        f"{root}: no studies found: no NIfTI files, and no folder without subfolders that"
        " contains DICOM files (.dcm, .dicom, .dic, .ima, or a DICM header)"
    )
  # By path components, not the path string, so that "a/b" stays next to "a"
  # and before "a-b", whatever the characters sort as.
  studies.sort(key=lambda study: pathlib.PurePath(study.input).parts)
  return _unique_folders(studies)


def _found_study(root: pathlib.Path, relative: pathlib.PurePath) -> Study:
  parts = list(relative.parts) or [root.name]
  parts[-1] = _default_name(parts[-1])
  study_id = "__".join(parts)
  return Study(safe_study_id(study_id), study_id, str(root / relative), root / relative)


# ---------------------------------------------------------------- Rows ---


def _format(value: float | None, digits: int) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def summary_row(study: Study, report: dict[str, Any] | None, seconds: float | None,
                error: str = "") -> dict[str, str]:
  """Return the summary.csv row of a study: from its report, or with the error when it failed."""
  row = {column: "" for column in SUMMARY_COLUMNS}
  row.update(id=study.id, folder=study.folder, input=study.input,
             series_uid=study.series_uid or "")
  row["seconds"] = _format(seconds, 2)
  if report is None:
    row.update(status="failed", error=error)
    return row
  row["status"] = "ok"
  row["series_uid"] = report.get("series_uid") or ""
  scan = report["scan"]
  row["any_probability"] = _format(scan["any"]["max_probability"], 4)
  row["positive_labels"] = ";".join(name for name in report["labels"] if scan[name]["positive"])
  aggregator = report.get("aggregator")
  if aggregator is not None:
    row["aggregator_positive_labels"] = ";".join(
        name for name in aggregator["labels"] if aggregator["scan"][name]["positive"]
    )
  segmentation = report.get("segmentation")
  if segmentation is not None:
    row["blood_ml"] = _format(segmentation["volume_ml"]["any"], 2)
  return row


def write_summary(path: pathlib.Path, rows: Sequence[dict[str, str]]) -> None:
  """Write summary.csv through a temporary file, so a crash never leaves half a table."""
  partial = path.with_name(f"{PARTIAL_PREFIX}{path.name}")
  with partial.open("w", newline="", encoding="utf-8") as file:
    writer = csv.DictWriter(file, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(partial, path)


def finished_report(study_dir: pathlib.Path) -> dict[str, Any] | None:
  """Return the report of a finished study, or None when `study_dir` contains no valid report.json."""
  path = study_dir / predict.REPORT_FILE
  try:
    report = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return report if isinstance(report, dict) and "scan" in report else None


# ---------------------------------------------------------------- Batch ---


@dataclasses.dataclass
class BatchResult:
  """Outcome of a batch: one summary row per study, in study order."""

  rows: list[dict[str, str]]
  summary_path: pathlib.Path
  skipped: int = 0

  @property
  def failed(self) -> int:
    return sum(row["status"] == "failed" for row in self.rows)


def _predict_study(
    study: Study, output_dir: pathlib.Path, runs: Any, options: dict[str, Any]
) -> dict[str, Any]:
  """Predict one study into a temporary folder and rename it into place when complete."""
  final = output_dir / study.folder
  partial = output_dir / f"{PARTIAL_PREFIX}{study.folder}"
  shutil.rmtree(partial, ignore_errors=True)
  report = predict.predict(
      options["checkpoint_dir"],
      study.path,
      partial,
      series_uid=study.series_uid,
      runs=runs,
      **{key: value for key, value in options.items() if key != "checkpoint_dir"},
  )
  # A folder left without report.json by an older run or a crash is replaced.
  shutil.rmtree(final, ignore_errors=True)
  os.replace(partial, final)
  return report


def run_batch(
    checkpoint_dir: str | os.PathLike,
    studies: Sequence[Study],
    output_dir: str | os.PathLike,
    *,
    step: int | None = None,
    batch_size: int | None = None,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
    progress: bool | None = None,
    max_voxels: int | None = None,
) -> BatchResult:
  """Predict every study into OUTPUT/<folder>/ and write OUTPUT/summary.csv after each one.

  Studies with a valid OUTPUT/<folder>/report.json are skipped. `progress` shows
  a tqdm bar on stderr (None: only when stderr is a terminal). `max_voxels`
  is the largest scan read (None: the run's config, see
  `predict.voxel_limit`); a larger study fails with its size in the summary.

  Raises:
    InputError: the runs cannot be used (wrong stage, missing checkpoint) or
      the output folder cannot be created. Failures of single studies are
      recorded in the summary instead.
  """
  output_dir = pathlib.Path(output_dir)
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise BatchError(f"failed to create the output folder {output_dir}: {error}") from error
  summary_path = output_dir / SUMMARY_FILE
  runs = None
  options = {
      "checkpoint_dir": checkpoint_dir,
      "batch_size": batch_size,
      "aggregator_dir": aggregator_dir,
      "aggregator_step": aggregator_step,
      "max_voxels": max_voxels,
  }
  result = BatchResult(rows=[], summary_path=summary_path)
  bar = tqdm.tqdm(studies, unit="study", disable=None if progress is None else not progress)
  with tqdm_logging.logging_redirect_tqdm(), bar:
    for study in bar:
      bar.set_postfix_str(study.folder[:30])
      report = finished_report(output_dir / study.folder)
      if report is not None:
        result.skipped += 1
        seconds = (report.get("timings_s") or {}).get("total")
        result.rows.append(summary_row(study, report, seconds))
        write_summary(summary_path, result.rows)
        continue
      if runs is None:
        # Restored at the first study that needs it, so a finished batch restores
        # nothing. An error here is about the runs, not a study, and stops the batch.
        runs = predict.restore_runs(
            checkpoint_dir, step=step, aggregator_dir=aggregator_dir,
            aggregator_step=aggregator_step,
        )
      start = time.perf_counter()
      try:
        report = _predict_study(study, output_dir, runs, options)
      except Exception as error:  # pylint: disable=broad-except
        # One bad study must not stop the batch; the error goes to the summary.
        message = f"{type(error).__name__}: {error}"
        logger.error("study %r (%s) failed: %s", study.id, study.input, message,
                     exc_info=not isinstance(error, InputError))
        result.rows.append(summary_row(study, None, time.perf_counter() - start, message))
      else:
        result.rows.append(summary_row(study, report, time.perf_counter() - start))
      write_summary(summary_path, result.rows)
  return result
