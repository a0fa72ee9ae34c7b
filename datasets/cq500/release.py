"""Reading the CQ500 release and the BHX boxes: names, reads.csv, BHX CSVs and the series choice.

Only headers and CSV files are read here; HU and geometry come from
`uem_ich_jax.ct` in the builder. The layout this module expects:

  <manual_dir>/reads.csv
  <manual_dir>/[qctNN/][CQ500-CT-<N>/]CQ500CT<N> CQ500CT<N>/Unknown Study/
      CT <description>/CT000000.dcm ...
  <manual_dir>/**/1_Initial_Manual_Labeling.csv (and the other two BHX files; optional)

A patient folder is any folder whose name is a CQ500 case name, once or twice
("CQ500CT12 CQ500CT12", "CQ500-CT-12"); everything under it belongs to that
case. reads.csv writes the case as "CQ500-CT-12", the folder as
"CQ500CT12 CQ500CT12", so cases are joined on the integer.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import logging
import math
import os
import pathlib
import re
from collections.abc import Iterable

import numpy as np

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.ct import series_choice
from uem_ich_jax.ct.series_choice import (
    MAX_AXIAL_ANGLE_DEG,
    MIN_SERIES_IMAGES,
    TARGET_SPACING_MM,
    SeriesInfo,
    SeriesRanking,
    bone_kernel_reason,
    contrast_reason,
    describe_series,
    measure_spacing,
    normalize_description,
    reformat_reason,
    rejection_reason,
)
from uem_ich_jax.datasets.common import BuildReport, ReleaseNotFoundError
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)


class Cq500LayoutError(InputError):
  """A CQ500 or BHX file that cannot be used at all; the message names it and the reason."""


# --- Case names --------------------------------------------------------------

_CASE = r"CQ500[-_ ]?CT[-_ ]?(\d+)"
_CASE_NAME = re.compile(_CASE, re.IGNORECASE)
# The release's folder repeats the case name after a space; one copy (the zip
# name, "CQ500-CT-12") is accepted as well. Double spaces occur in the release.
_CASE_FOLDER = re.compile(rf"{_CASE}(?:\s+{_CASE})?", re.IGNORECASE)
_CASE_ZIP = re.compile(rf"{_CASE}\.zip", re.IGNORECASE)


def case_id(number: int) -> str:
  """Return the canonical id of case `number` ("CQ500-CT-12"), used as scan and patient id."""
  return f"CQ500-CT-{number}"


def case_number(name: str) -> int | None:
  """Return the case number of a reads.csv name ("CQ500-CT-12" or "CQ500CT12"), or None."""
  match = _CASE_NAME.fullmatch(name.strip())
  return int(match.group(1)) if match else None


def folder_case_number(name: str) -> int | None:
  """Return the case number of a patient folder name, or None when it is not one.

  Raises:
    Cq500LayoutError: the name contains two different case numbers.
  """
  match = _CASE_FOLDER.fullmatch(name.strip())
  if not match:
    return None
  first, second = match.group(1), match.group(2)
  if second is not None and int(first) != int(second):
    raise Cq500LayoutError(f"folder {name!r} names two different cases, {first} and {second}")
  return int(first)


# --- Finding the release files -----------------------------------------------

READS_CSV = "reads.csv"
# BHX files, in the order in which the builder prefers their boxes: boxes drawn
# by the radiologists first, then the two extrapolated sets.
BHX_FILES = (
    "1_Initial_Manual_Labeling.csv",
    "3_Extrapolation_to_Selected_Series.csv",
    "2_Extrapolation_to_All_Series.csv",
)


@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
  """Paths of the release's parts: reads.csv, patient folders by case number, BHX files."""

  reads_csv: pathlib.Path
  patient_folders: dict[int, pathlib.Path]
  bhx_files: dict[str, pathlib.Path]


def find_release_files(root: str | os.PathLike, report: BuildReport) -> ReleaseFiles:
  """Walk `root` once and find reads.csv, the patient folders and the BHX files.

  A second folder of a case, a zip archive left unextracted and a folder name
  with two different case numbers are reported and left out.

  Raises:
    ReleaseNotFoundError: `root` is not a folder, or it has no reads.csv or
      no patient folder.
    Cq500LayoutError: reads.csv is found twice.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ReleaseNotFoundError(
        f"{root}: the CQ500 manual folder does not exist or is not a folder"
    )
  reads_files: list[pathlib.Path] = []
  folders: dict[int, pathlib.Path] = {}
  bhx: dict[str, list[pathlib.Path]] = {}
  bhx_names = {name.lower(): name for name in BHX_FILES}
  visited = set()
  for current, subfolders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(current)
    if real in visited:
      subfolders[:] = []
      continue
    visited.add(real)
    subfolders.sort()
    other_folders = []
    for name in subfolders:
      path = pathlib.Path(current) / name
      try:
        number = folder_case_number(name)
      except Cq500LayoutError as error:
        report.skip(str(path), f"invalid patient folder name: {error}")
        continue
      if number is None:
        other_folders.append(name)
      elif number in folders:
        report.skip(
            str(path), f"second folder of a case: {case_id(number)} is read from {folders[number]}"
        )
      else:
        folders[number] = path
    # Patient folders are read later, whole; the walk does not enter them.
    subfolders[:] = other_folders
    for name in sorted(names):
      path = pathlib.Path(current) / name
      if name.lower() == READS_CSV:
        reads_files.append(path)
      elif name.lower() in bhx_names:
        bhx.setdefault(bhx_names[name.lower()], []).append(path)
      elif _CASE_ZIP.fullmatch(name):
        report.skip(str(path), "zip archive not extracted: unzip it in place and build again")

  if not reads_files:
    raise ReleaseNotFoundError(f"{root}: reads.csv not found; see the manual download instructions")
  if len(reads_files) > 1:
    listed = ", ".join(str(path) for path in reads_files)
    raise Cq500LayoutError(f"{root}: several reads.csv files found ({listed}); keep one")
  if not folders:
    raise ReleaseNotFoundError(
        f"{root}: no patient folder found (folders named like 'CQ500CT12 CQ500CT12');"
        " extract the CQ500-CT-<N>.zip archives there"
    )
  bhx_files = {}
  for name, paths in bhx.items():
    bhx_files[name] = paths[0]
    for extra in paths[1:]:
      report.skip(str(extra), f"second copy of the BHX file {name}: {paths[0]} is used")
  return ReleaseFiles(reads_files[0], dict(sorted(folders.items())), bhx_files)


# --- reads.csv ---------------------------------------------------------------

READERS = ("R1", "R2", "R3")
# Finding names of the reads.csv columns (`R1:<finding>`) to the project's
# names in `uem_ich_jax.CQ500_LABELS`. The names agree today; the map is kept
# explicit so that a renamed column fails here instead of shifting labels.
READS_FINDINGS = {
    "ICH": "ICH",
    "IPH": "IPH",
    "IVH": "IVH",
    "SDH": "SDH",
    "EDH": "EDH",
    "SAH": "SAH",
    "BleedLocation-Left": "BleedLocation-Left",
    "BleedLocation-Right": "BleedLocation-Right",
    "ChronicBleed": "ChronicBleed",
    "Fracture": "Fracture",
    "CalvarialFracture": "CalvarialFracture",
    "OtherFracture": "OtherFracture",
    "MassEffect": "MassEffect",
    "MidlineShift": "MidlineShift",
}
# The six scan labels in `uem_ich_jax.SLICE_LABELS` order, each the CQ500 finding it is.
SCAN_LABEL_FINDINGS = {
    "any": "ICH",
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
}


@dataclasses.dataclass(frozen=True)
class CaseReads:
  """The three readers' findings of one case.

  Attributes:
    number: the case number.
    name: the name as written in reads.csv.
    category: the batch, "B1" or "B2" as written.
    readers: uint8 (3, 14), reader R1..R3 by `uem_ich_jax.CQ500_LABELS`.
  """

  number: int
  name: str
  category: str
  readers: np.ndarray

  @property
  def majority(self) -> np.ndarray:
    """uint8 (14,): 1 where at least two of the three readers marked the finding."""
    return (self.readers.sum(axis=0) >= 2).astype(np.uint8)

  @property
  def scan_labels(self) -> np.ndarray:
    """uint8 (6,): the majority findings in `uem_ich_jax.SLICE_LABELS` order."""
    majority = dict(zip(uem_ich_jax.CQ500_LABELS, self.majority))
    return np.asarray(
        [majority[SCAN_LABEL_FINDINGS[name]] for name in uem_ich_jax.SLICE_LABELS], np.uint8
    )


def reads_columns() -> dict[tuple[int, str], str]:
  """Return the reads.csv column of each (reader index, project label name)."""
  finding_of_label = {label: finding for finding, label in READS_FINDINGS.items()}
  return {
      (reader, label): f"{READERS[reader]}:{finding_of_label[label]}"
      for reader in range(len(READERS))
      for label in uem_ich_jax.CQ500_LABELS
  }


def _binary(value: str) -> int:
  try:
    number = float(value)
  except ValueError:
    raise ValueError(f"{value!r} is not 0 or 1") from None
  if number not in (0.0, 1.0):
    raise ValueError(f"{value!r} is not 0 or 1")
  return int(number)


def read_reads_csv(path: str | os.PathLike, report: BuildReport) -> dict[int, CaseReads]:
  """Read reads.csv into the readers' findings per case number.

  Columns are found by name (surrounding spaces and a UTF-8 BOM ignored). A
  row with a name that is not a case name, or a value that is not 0 or 1, is
  reported and left out. A case written twice with the same values is kept
  once; with different values both rows are left out.

  Raises:
    Cq500LayoutError: a required column is missing.
  """
  path = pathlib.Path(path)
  columns = reads_columns()
  rows: dict[int, list[CaseReads]] = {}
  with path.open(newline="", encoding="utf-8-sig") as file:
    reader = csv.reader(file)
    header = [name.strip() for name in next(reader, [])]
    required = ["name", "Category", *columns.values()]
    missing = [name for name in required if name not in header]
    if missing:
      raise Cq500LayoutError(
          f"{path}: column(s) {', '.join(missing)} missing; expected name, Category and"
          " R1:<finding> .. R3:<finding> for the 14 CQ500 findings"
      )
    index = {name: header.index(name) for name in required}
    for line, row in enumerate(reader, start=2):
      if not any(cell.strip() for cell in row):
        continue
      where = f"{path}:{line}"
      try:
        row = row + [""] * (len(header) - len(row))
        name = row[index["name"]].strip()
        number = case_number(name)
        if number is None:
          raise ValueError(f"name {name!r} is not a CQ500 case name")
        readers = np.zeros((len(READERS), len(uem_ich_jax.CQ500_LABELS)), np.uint8)
        for (reader_index, label), column in columns.items():
          try:
            value = _binary(row[index[column]].strip())
          except ValueError as error:
            raise ValueError(f"column {column}: {error}") from error
          readers[reader_index, uem_ich_jax.CQ500_LABELS.index(label)] = value
      except ValueError as error:
        report.skip(where, f"invalid reads.csv row: {error}")
        continue
      category = row[index["Category"]].strip()
      rows.setdefault(number, []).append(CaseReads(number, name, category, readers))

  reads = {}
  for number, entries in sorted(rows.items()):
    first = entries[0]
    if all(np.array_equal(e.readers, first.readers) and e.category == first.category
           for e in entries[1:]):
      if len(entries) > 1:
        report.note(
            str(path),
            f"duplicate reads.csv row: {case_id(number)} written {len(entries)} times alike",
        )
      reads[number] = first
    else:
      report.skip(
          str(path),
          f"conflicting reads.csv rows: {case_id(number)} written {len(entries)} times"
          " with different values",
      )
  return reads


# --- BHX boxes ---------------------------------------------------------------

# BHX labelName (lower case) to the mask class id. "Chronic" has no class id
# in the project's 1..5 map; its boxes are counted and left out.
BHX_CLASS_IDS = {
    "epidural": uem_ich_jax.MASK_CLASS_IDS["epidural"],
    "intraparenchymal": uem_ich_jax.MASK_CLASS_IDS["intraparenchymal"],
    "intraventricular": uem_ich_jax.MASK_CLASS_IDS["intraventricular"],
    "subarachnoid": uem_ich_jax.MASK_CLASS_IDS["subarachnoid"],
    "subdural": uem_ich_jax.MASK_CLASS_IDS["subdural"],
}
BHX_CHRONIC = "chronic"
_BHX_COLUMNS = ("SOPInstanceUID", "SeriesInstanceUID", "data", "labelName")


@dataclasses.dataclass(frozen=True)
class BhxBox:
  """One BHX box on the source slice `sop_uid`, in that slice's pixel edges (max exclusive).

  `class_id` is the mask class id, or 0 for a "Chronic" box.
  """

  sop_uid: str
  series_uid: str
  class_id: int
  row_min: float
  column_min: float
  row_max: float
  column_max: float


def parse_bhx_data(text: str) -> tuple[float, float, float, float]:
  """Parse a BHX `data` cell into (row_min, column_min, row_max, column_max) pixel edges.

  The cell is a Python dict literal, `{'x': .., 'y': .., 'width': .., 'height': ..}`,
  with (x, y) the top-left corner, as BHX loaders fill image[y:y+h, x:x+w].
  NOTE: the corner convention comes from such loaders; the release does not
  document it.

  Raises:
    ValueError: not a dict literal, a key missing, a value not finite, or a
      width or height not positive.
  """
  try:
    data = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError) as error:
    raise ValueError(f"data {text!r} is not a dict literal") from error
  if not isinstance(data, dict):
    raise ValueError(f"data {text!r} is not a dict literal")
  values = {}
  for key in ("x", "y", "width", "height"):
    if key not in data:
      raise ValueError(f"data {text!r} has no {key!r}")
    try:
      values[key] = float(data[key])
    except (TypeError, ValueError) as error:
      raise ValueError(f"data {key!r} is not a number: {data[key]!r}") from error
    if not math.isfinite(values[key]):
      raise ValueError(f"data {key!r} is not finite: {data[key]!r}")
  if values["width"] <= 0 or values["height"] <= 0:
    raise ValueError(f"data {text!r} has a width or height that is not positive")
  return (
      values["y"], values["x"], values["y"] + values["height"], values["x"] + values["width"]
  )


def bhx_class_id(label_name: str) -> int | None:
  """Return the mask class id of a BHX labelName, 0 for "Chronic", None when unknown."""
  name = label_name.strip().lower()
  if name.startswith(BHX_CHRONIC):
    return 0
  for subtype, class_id in BHX_CLASS_IDS.items():
    if name.startswith(subtype):
      return class_id
  return None


def read_bhx_csv(path: str | os.PathLike, report: BuildReport) -> list[BhxBox]:
  """Read one BHX file's boxes. Columns are found by name, so an extra index column is harmless.

  A row with an invalid `data` cell or an unknown labelName is reported and left
  out; identical rows are kept once.

  Raises:
    Cq500LayoutError: a required column is missing.
  """
  path = pathlib.Path(path)
  boxes = []
  seen = set()
  with path.open(newline="", encoding="utf-8-sig") as file:
    reader = csv.DictReader(file)
    fields = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in _BHX_COLUMNS if name not in fields]
    if missing:
      raise Cq500LayoutError(f"{path}: BHX column(s) {', '.join(missing)} missing")
    reader.fieldnames = fields
    for line, row in enumerate(reader, start=2):
      where = f"{path}:{line}"
      label = (row.get("labelName") or "").strip()
      class_id = bhx_class_id(label)
      if class_id is None:
        report.skip(where, f"unknown BHX labelName: {label!r}")
        continue
      try:
        edges = parse_bhx_data(row.get("data") or "")
      except ValueError as error:
        report.skip(where, f"invalid BHX box: {error}")
        continue
      sop_uid = (row.get("SOPInstanceUID") or "").strip()
      if not sop_uid:
        report.skip(where, "invalid BHX box: SOPInstanceUID is empty")
        continue
      box = BhxBox(sop_uid, (row.get("SeriesInstanceUID") or "").strip(), class_id, *edges)
      if box not in seen:
        seen.add(box)
        boxes.append(box)
  return boxes


# --- Choosing one series per study -------------------------------------------

# The rule lives in `uem_ich_jax.ct.series_choice`, because `uem-ich predict`
# chooses the series of a study folder by the same code. The names imported
# from there at the top are kept here for the builder and its tests.


def rank_series(infos: Iterable[SeriesInfo]) -> SeriesRanking:
  """Rank a study's series by `series_choice.rank_series`, measuring with this module's name.

  Spacing is measured through `release.measure_spacing`, looked up at call
  time, so a test that replaces that name here affects the ranking.
  """
  return series_choice.rank_series(infos, measure=lambda files: measure_spacing(files))
