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
import pydicom
from pydicom.multival import MultiValue

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.ct.dicom import DUPLICATE_TOLERANCE_MM
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

TARGET_SPACING_MM = 5.0
# A series with fewer images is a localizer or a partial series, not a head scan.
MIN_SERIES_IMAGES = 8
# A slice normal further than this from the patient's superior axis is not
# axial: a coronal or sagittal reformat. Gantry tilt stays well below it.
MAX_AXIAL_ANGLE_DEG = 45.0

# Series descriptions are matched in upper case with runs of spaces made one.
_NON_CONTRAST = re.compile(r"\b(PRE|NON|WITHOUT|W/O)[- ]?(IV )?CONTRAST\b|\bNONCONTRAST\b")
_CONTRAST = re.compile(
    r"CONTRAST|\bPOST\b|\d\s*CC\b|\bIV\b|\bORAL\b|\bANGIO|\bCTA\b|\bPERFUSION\b|\bVENO"
    r"|\bARTERIAL\b|\bDELAYED\b|\bENHANCED\b|\bC\+"
)
# "C" and "C THIN" in the CQ500 series list: a description that is the
# letter C alone or followed by one word is read as contrast-enhanced.
# NOTE: inferred from the names alone, not from the headers of such series.
_CONTRAST_LETTER = re.compile(r"^C(\s+\w+)?$")
_REFORMAT = re.compile(
    r"\b(3D|MPR|DMPR|MIP|MINIP|VRT?|COR|CORONAL|SAG|SAGITTAL|OBL|OBLIQUE|REFORMAT\w*|RECON 3D)\b"
)
_REFORMAT_IMAGE_TYPES = frozenset(
    {"REFORMATTED", "MPR", "MIP", "MINIP", "VOLUME", "PROJECTION IMAGE", "CURVED", "3D",
     "VOLUME_RENDER", "VR"}
)
_SHARP_WORDS = re.compile(r"BONE|\bHRCT\b|\bLUNG\b|\bSHARP\b|\bEDGE\b|\bDETAIL\b|\bHI ?RES\b")
# Kernel tags that name a sharp reconstruction: GE (BONE, BONEPLUS, LUNG,
# EDGE, DETAIL), Siemens H/J kernels 60 and up (H60s, J70h), Philips D, E, L,
# YD, YE and YF. NOTE: any other kernel name counts as soft tissue.
_SHARP_SIEMENS = re.compile(r"^[HJ]([6-9]\d)[A-Z]?$")
_SHARP_PHILIPS = frozenset({"D", "E", "L", "YD", "YE", "YF"})
_NO_AGENT = frozenset({"", "NONE", "NO", "N", "-", "NIL"})


def normalize_description(text: str) -> str:
  """Upper-case a series description and make each run of spaces one space."""
  return re.sub(r"\s+", " ", text).strip().upper()


def contrast_reason(description: str, contrast_agent: str = "") -> str | None:
  """Return why the series is contrast-enhanced, or None for a non-contrast series.

  "PRE CONTRAST" and "NON CONTRAST" mark a non-contrast series, and the
  ContrastBolusAgent tag, when it names an agent, marks a contrast one.
  """
  agent = normalize_description(contrast_agent)
  if agent not in _NO_AGENT:
    return f"contrast: ContrastBolusAgent {contrast_agent.strip()!r}"
  text = normalize_description(description)
  if _NON_CONTRAST.search(text):
    return None
  match = _CONTRAST.search(text) or _CONTRAST_LETTER.search(text)
  if match:
    return f"contrast: description {description.strip()!r} contains {match.group(0).strip()!r}"
  return None


def reformat_reason(
    description: str, image_type: Iterable[str] = (), normal_angle_deg: float | None = None
) -> str | None:
  """Return why the series is a reformat (3D, MPR, coronal, sagittal), or None for axial images."""
  types = {normalize_description(value) for value in image_type}
  found = sorted(types & _REFORMAT_IMAGE_TYPES)
  if found:
    return f"reformat: ImageType contains {found[0]}"
  match = _REFORMAT.search(normalize_description(description))
  if match:
    return f"reformat: description {description.strip()!r} contains {match.group(0)!r}"
  if normal_angle_deg is not None and normal_angle_deg > MAX_AXIAL_ANGLE_DEG:
    return f"reformat: slices are {normal_angle_deg:.0f} degrees from axial"
  return None


def _sharp_kernel(kernel: str) -> bool:
  for part in re.split(r"[\\/,]", kernel):
    part = normalize_description(part)
    if not part:
      continue
    if _SHARP_WORDS.search(part) or part in _SHARP_PHILIPS or _SHARP_SIEMENS.match(part):
      return True
  return False


def bone_kernel_reason(description: str, kernel: str = "") -> str | None:
  """Return why the series is a bone (sharp) reconstruction, or None for a soft-tissue one."""
  match = _SHARP_WORDS.search(normalize_description(description))
  if match:
    return f"bone kernel: description {description.strip()!r} contains {match.group(0)!r}"
  if _sharp_kernel(kernel):
    return f"bone kernel: ConvolutionKernel {kernel!r}"
  return None


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
  """Header facts of one series, for the choice.

  Attributes:
    series_uid: SeriesInstanceUID.
    folder: the folder of the series' files, relative to the patient folder.
    description: SeriesDescription, or the folder name less "CT " when it is empty.
    kernel: ConvolutionKernel.
    image_type: ImageType values.
    contrast_agent: ContrastBolusAgent.
    study_uid: StudyInstanceUID.
    files: the image files.
    normal_angle_deg: angle between the slice normal and the superior axis.
    spacing_mm: median distance between slice planes, None when unmeasured.
  """

  series_uid: str
  folder: str
  description: str
  kernel: str
  image_type: tuple[str, ...]
  contrast_agent: str
  study_uid: str
  files: tuple[pathlib.Path, ...]
  normal_angle_deg: float | None
  spacing_mm: float | None

  @property
  def num_images(self) -> int:
    return len(self.files)

  def summary(self) -> dict:
    """JSON-ready description for the build log and the metadata."""
    return {
        "folder": self.folder,
        "description": self.description,
        "series_uid": self.series_uid,
        "kernel": self.kernel,
        "images": self.num_images,
        "spacing_mm": None if self.spacing_mm is None else round(self.spacing_mm, 3),
    }


def _header_text(dataset: pydicom.Dataset, keyword: str) -> str:
  value = dataset.get(keyword, "")
  if isinstance(value, (list, tuple, MultiValue)):
    return "\\".join(str(item) for item in value)
  return str(value)


def _plane_geometry(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Return (position, unit normal) of one file's slice plane, from its header."""
  dataset = pydicom.dcmread(
      path, stop_before_pixels=True, force=True,
      specific_tags=["ImagePositionPatient", "ImageOrientationPatient"],
  )
  position = np.asarray([float(v) for v in dataset.ImagePositionPatient], np.float64)
  orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], np.float64)
  if position.shape != (3,) or orientation.shape != (6,):
    raise ValueError("ImagePositionPatient or ImageOrientationPatient has the wrong length")
  normal = np.cross(orientation[:3], orientation[3:])
  length = float(np.linalg.norm(normal))
  if not length > 0:
    raise ValueError("ImageOrientationPatient has parallel or zero direction cosines")
  return position, normal / length


def measure_spacing(files: Iterable[pathlib.Path]) -> float:
  """Return the median distance between the distinct slice planes of `files`, in mm.

  Only for choosing a series: the volume's spacing comes from the CT reader.

  Raises:
    ValueError: a header without geometry, or fewer than two distinct planes.
  """
  files = list(files)
  _, normal = _plane_geometry(files[0])
  heights = np.sort([float(_plane_geometry(path)[0] @ normal) for path in files])
  gaps = np.diff(heights)
  gaps = gaps[gaps > DUPLICATE_TOLERANCE_MM]
  if not len(gaps):
    raise ValueError("fewer than two distinct slice positions")
  return float(np.median(gaps))


def describe_series(series: ct.DicomSeries, patient_folder: pathlib.Path) -> SeriesInfo:
  """Read the header facts of a series found by `ct.list_dicom_series`."""
  first = pydicom.dcmread(series.files[0], stop_before_pixels=True, force=True)
  folder = series.files[0].parent
  try:
    relative = str(folder.relative_to(patient_folder))
  except ValueError:
    relative = str(folder)
  description = series.description.strip() or re.sub(r"^CT\s+", "", folder.name)
  angle = None
  try:
    _, normal = _plane_geometry(series.files[0])
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
  except (AttributeError, ValueError, TypeError):
    pass  # No usable orientation; the CT reader reports it if the series is chosen.
  return SeriesInfo(
      series_uid=series.series_uid,
      folder=relative,
      description=description,
      kernel=_header_text(first, "ConvolutionKernel"),
      image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
      contrast_agent=_header_text(first, "ContrastBolusAgent"),
      study_uid=str(first.get("StudyInstanceUID", "")),
      files=tuple(series.files),
      normal_angle_deg=angle,
      spacing_mm=None,
  )


def rejection_reason(info: SeriesInfo) -> str | None:
  """Return why a series cannot be the study's scan (spacing aside), or None when it can."""
  if any(normalize_description(value) == "LOCALIZER" for value in info.image_type):
    return "localizer: ImageType contains LOCALIZER"
  reason = (
      contrast_reason(info.description, info.contrast_agent)
      or reformat_reason(info.description, info.image_type, info.normal_angle_deg)
      or bone_kernel_reason(info.description, info.kernel)
  )
  if reason:
    return reason
  if info.num_images < MIN_SERIES_IMAGES:
    return f"too few images: {info.num_images}, at least {MIN_SERIES_IMAGES} needed"
  return None


@dataclasses.dataclass(frozen=True)
class SeriesRanking:
  """The eligible series, best first, and the rejected ones with their reasons."""

  eligible: tuple[SeriesInfo, ...]
  rejected: tuple[tuple[SeriesInfo, str], ...]


def rank_series(infos: Iterable[SeriesInfo]) -> SeriesRanking:
  """Rank a study's series by the fixed rule.

  Rejected: localizers, contrast-enhanced series, reformats, bone kernels,
  fewer than `MIN_SERIES_IMAGES` images, and unmeasurable slice spacing. The
  rest are ranked by |spacing - 5 mm| (to 0.01 mm), then more images, then
  folder and SeriesInstanceUID, so the rank never depends on file order.
  """
  eligible = []
  rejected = []
  for info in infos:
    reason = rejection_reason(info)
    if reason is None:
      try:
        info = dataclasses.replace(info, spacing_mm=measure_spacing(info.files))
      except (AttributeError, ValueError, TypeError, OSError) as error:
        reason = f"invalid geometry: {error}"
    if reason is None:
      eligible.append(info)
    else:
      rejected.append((info, reason))
  eligible.sort(
      key=lambda info: (
          round(abs(info.spacing_mm - TARGET_SPACING_MM), 2),
          -info.num_images,
          info.folder,
          info.series_uid,
      )
  )
  return SeriesRanking(tuple(eligible), tuple(rejected))
