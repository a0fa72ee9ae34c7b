"""The `rsna_ich` TFDS builder: RSNA 2019 Intracranial Hemorrhage Detection (Kaggle, stage 2).

The release is one flat folder of single-slice DICOM files and a long-format
label CSV. The build runs in two passes:

1. On the driver, every file's header is read (no pixel decoding) and the CSV
   is parsed. Files are checked, grouped into series by
   (StudyInstanceUID, SeriesInstanceUID), sorted along the slice normal, given
   labels, patient folds and example keys. Header-level faults (the truncated
   `ID_6431af929.dcm`, missing tags, missing labels) go into the bad-file
   report here.
2. Per series, the pixels are read through `uem_ich_jax.ct.read_dicom_files`,
   the 12-bit wrap of this release is undone, slices are made square and
   resized, and the three windows stored. This pass runs as a plain Python
   generator, or as an Apache Beam pipeline when `apache_beam` is installed
   (any Beam runner; DirectRunner by default).

Faults that only decoding reveals (a file the CT reader rejects, different
images at one position) drop the affected slices or series and are reported
too: the generator collects them as it goes, and the Beam pipeline collects
them in a `tfds.core.BeamMetadataDict` entry, which TFDS writes after the
pipeline has run. For the same reason `fold_ranges` is computed from the keys
and folds of the examples actually written, not from the plan. Both paths
write the same examples, keys and metadata.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
import pathlib
import re
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pydicom
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct
# unwrap_stored_values is imported for callers of this module, which used to define it.
from uem_ich_jax.ct.dicom_pixels import (  # noqa: F401
    WRAP_INTERCEPT_ABOVE,
    unwrap_stored_values,
    unwrapped_slice_hu,
)
from uem_ich_jax.datasets import common
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)


class _ReleaseUidFilter(logging.Filter):
  """Drop pydicom's per-file complaint about the release's UIDs ("ID_5d0b3e8f21" is no valid UI)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Invalid value for VR UI: 'ID_")


# Without this, pydicom logs one line per file and UID (about 3 million lines
# for the full release).
logging.getLogger("pydicom").addFilter(_ReleaseUidFilter())

_DESCRIPTION = """\
RSNA 2019 Intracranial Hemorrhage Detection (Kaggle, stage 2 training set):
non-contrast head CT slices with six labels each (any, epidural,
intraparenchymal, intraventricular, subarachnoid, subdural), regrouped into
series. Images are the brain, subdural and bone windows as uint8, slices padded
to square and resized. Every example carries a patient-level `fold`
(PatientID); train on folds != k and evaluate on fold k.
"""

_CITATION = """\
@article{flanders2020construction,
  title={Construction of a Machine Learning Dataset through Collaboration: The RSNA 2019 Brain CT Hemorrhage Challenge},
  author={Flanders, Adam E and Prevedello, Luciano M and Shih, George and others},
  journal={Radiology: Artificial Intelligence},
  volume={2}, number={3}, pages={e190211}, year={2020}
}
"""

SLICES = "slices"
SCANS = "scans"

# Folder of the Kaggle archive; the manual dir may be that folder or contain it.
RELEASE_FOLDER = "rsna-intracranial-hemorrhage-detection"
# The current archive calls the image folder stage_2_train; several 2019
# solution repositories call it stage_2_train_images.
IMAGE_FOLDERS = ("stage_2_train", "stage_2_train_images")
LABELS_CSV = "stage_2_train.csv"
# The release's CSV lists each image's subtypes in this order, `any` last.
CSV_SUBTYPES = (
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"
)
# Files of the release that cannot be decoded. The header pass finds this one
# by its short PixelData. The name is listed too, so that the report names it
# even if that check missed it.
KNOWN_CORRUPTED = frozenset({"ID_6431af929"})
_STEM_PATTERN = re.compile(r"ID_[0-9a-f]{9}")

_REQUIRED_TAGS = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
    # Type 1 in the CT Image module: without them the HU are unknown.
    "RescaleSlope", "RescaleIntercept",
)


class RsnaLabelsError(InputError):
  """`stage_2_train.csv` cannot be used; the message names the rows and the fault."""


@dataclasses.dataclass
class RsnaIchConfig(tfds.core.BuilderConfig):
  """Layout and size of one `rsna_ich` build.

  Attributes:
    layout: `slices` (one example per slice) or `scans` (one per series).
    image_size: rows and columns of every stored slice, in pixels.
    num_folds: number of patient-level folds.
    seed: seed of the patient-to-fold permutation (`common.patient_folds`).
  """

  layout: str = SLICES
  image_size: int = 384
  num_folds: int = 5
  seed: int = 0


# ---------------------------------------------------------------------------
# Labels CSV


@dataclasses.dataclass
class LabelTable:
  """Labels of `stage_2_train.csv`, per image stem, in `uem_ich_jax.SLICE_LABELS` order.

  Attributes:
    labels: image stem (`ID_` + 9 hex digits) to uint8 (6,).
    duplicate_rows: rows dropped because an identical row came before.
    incomplete: stem to the subtypes it has no row for (those images are
      left out of `labels`).
    any_mismatch: stems whose `any` differs from the maximum of the five
      subtypes (kept as written).
    invalid: stem to the reason its rows cannot be used (a label other than
      0 or 1, conflicting rows, an unknown subtype); those images are left
      out of `labels`.
    bad_rows: "line N: reason" of rows that name no image (wrong number of
      fields, an ID without a subtype suffix).
  """

  labels: dict[str, np.ndarray]
  duplicate_rows: int = 0
  incomplete: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  any_mismatch: list[str] = dataclasses.field(default_factory=list)
  invalid: dict[str, str] = dataclasses.field(default_factory=dict)
  bad_rows: list[str] = dataclasses.field(default_factory=list)


def read_labels(path: str | os.PathLike) -> LabelTable:
  """Parse the release's `ID,Label` CSV (six rows per image, `ID_<image>_<subtype>`).

  Identical repeated rows are dropped and counted. An image with a label
  other than 0 or 1, an unknown subtype, or two rows that give one subtype
  different labels goes into `invalid`, because no label can be chosen for
  it; the builder leaves it out and reports it, and the build goes on.

  Raises:
    RsnaLabelsError: a missing or unexpected header, or no image with usable
      labels at all (for example the sample submission, whose labels are 0.5).
  """
  path = pathlib.Path(path)
  positions = {name: index for index, name in enumerate(uem_ich_jax.SLICE_LABELS)}
  values: dict[str, dict[str, tuple[int, int]]] = {}
  table = LabelTable(labels={})
  with path.open(newline="", encoding="utf-8-sig") as file:
    reader = csv.reader(file)
    header = next(reader, None)
    if header is None or [field.strip() for field in header] != ["ID", "Label"]:
      raise RsnaLabelsError(f"{path}: expected the header 'ID,Label', found {header!r}")
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      if len(row) != 2:
        table.bad_rows.append(f"line {line}: expected 2 fields, found {row!r}")
        continue
      identifier, label_text = row[0].strip(), row[1].strip()
      stem, _, subtype = identifier.rpartition("_")
      if not stem:
        table.bad_rows.append(f"line {line}: ID {identifier!r} does not end in _<subtype>")
        continue
      if subtype not in positions:
        table.invalid.setdefault(
            stem,
            f"line {line}: ID {identifier!r} does not end in _<subtype> with a subtype among"
            f" {', '.join(CSV_SUBTYPES)}",
        )
        continue
      if label_text not in ("0", "1"):
        table.invalid.setdefault(
            stem, f"line {line}: label {label_text!r} of {identifier} is not 0 or 1"
        )
        continue
      label = int(label_text)
      image = values.setdefault(stem, {})
      if subtype in image:
        first_label, first_line = image[subtype]
        if first_label != label:
          table.invalid.setdefault(
              stem,
              f"conflicting labels for subtype {subtype}: line {first_line} has"
              f" {identifier},{first_label} and line {line} has {identifier},{label}",
          )
        else:
          table.duplicate_rows += 1
        continue
      image[subtype] = (label, line)

  for stem, image in values.items():
    if stem in table.invalid:
      continue
    missing = [name for name in CSV_SUBTYPES if name not in image]
    if missing:
      table.incomplete[stem] = missing
      continue
    labels = np.zeros(len(positions), np.uint8)
    for subtype, (label, _) in image.items():
      labels[positions[subtype]] = label
    if labels[0] != labels[1:].max():
      table.any_mismatch.append(stem)
    table.labels[stem] = labels
  if not table.labels and (table.invalid or table.bad_rows):
    if table.bad_rows:
      first = table.bad_rows[0]
    else:
      first = "image {}: {}".format(*next(iter(table.invalid.items())))
    raise RsnaLabelsError(
        f"{path}: no image has usable labels; first problem: {first}. Expected rows"
        " ID_<image>_<subtype>,<0 or 1> (is this the sample submission instead of"
        " stage_2_train.csv?)"
    )
  return table


# ---------------------------------------------------------------------------
# Header pass (driver)


@dataclasses.dataclass(frozen=True)
class SliceHeader:
  """Header fields of one file, as the header pass keeps them."""

  path: str
  stem: str
  patient_id: str
  study_uid: str
  series_uid: str
  # (Rows, Columns, ImageOrientationPatient rounded, PixelSpacing rounded).
  grid: tuple
  along_normal_mm: float
  wrapped: bool


@dataclasses.dataclass(frozen=True)
class SeriesPlan:
  """One series to read in the second pass, with its slices in position order.

  `first_key` is the key of the series (scans) or of its first slice
  (slices); slice j of the plan gets key `first_key + j` whether or not it
  decodes, so keys never depend on what another worker found.
  """

  first_key: int
  patient_id: str
  study_uid: str
  series_uid: str
  fold: int
  files: tuple[str, ...]
  stems: tuple[str, ...]
  wrapped: tuple[bool, ...]
  labels: np.ndarray  # uint8 (slices, 6), `uem_ich_jax.SLICE_LABELS` order.


def _numbers(dataset: pydicom.Dataset, keyword: str, count: int) -> list[float]:
  value = dataset[keyword].value
  items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
  numbers = [float(item) for item in items]
  if len(numbers) != count or not all(math.isfinite(number) for number in numbers):
    raise ValueError(f"{keyword} {value!r} is not {count} finite numbers")
  return numbers


def _first_number(dataset: pydicom.Dataset, keyword: str, default: float) -> float:
  if keyword not in dataset or dataset[keyword].value in (None, ""):
    return default
  value = dataset[keyword].value
  if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
    value = value[0]
  return float(value)


def read_header(path: pathlib.Path) -> SliceHeader | str:
  """Read and check one file's header; return the reason when the file must be left out.

  PixelData is not read: its element length is compared with Rows x Columns x
  BitsAllocated/8 and with the file size, which finds truncated pixel data
  without decoding it.
  """
  try:
    with warnings.catch_warnings():
      # The release's UIDs ("ID_5d0b3e8f21") are not valid UI values, and
      # pydicom warns once per file.
      warnings.simplefilter("ignore", UserWarning)
      dataset = pydicom.dcmread(path, defer_size=1024)
      missing = [keyword for keyword in _REQUIRED_TAGS if keyword not in dataset]
      if missing:
        return f"missing DICOM tags: {', '.join(missing)}"
      modality = str(dataset.get("Modality", ""))
      if modality != "CT":
        return f"not CT: Modality {modality or '(missing)'}"
      position = np.asarray(_numbers(dataset, "ImagePositionPatient", 3))
      orientation = np.asarray(_numbers(dataset, "ImageOrientationPatient", 6))
      pixel_spacing = _numbers(dataset, "PixelSpacing", 2)
      rows, columns = int(dataset.Rows), int(dataset.Columns)
      bits_allocated = int(dataset.BitsAllocated)
      bits_stored = int(dataset.get("BitsStored", bits_allocated))
      pixel_representation = int(dataset.get("PixelRepresentation", 0))
      intercept = _first_number(dataset, "RescaleIntercept", 0.0)
      study_uid, series_uid = str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID)
      patient_id = str(dataset.PatientID)
  except Exception as error:  # pylint: disable=broad-except
    # pydicom raises many types on a damaged header (EOFError, struct.error,
    # ValueError, ...); any of them leaves this one file out.
    return f"unreadable DICOM header: {type(error).__name__}: {error}"

  if "PixelData" not in dataset:
    return "no pixel data: the file has no PixelData element"
  transfer_syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None) if hasattr(
      dataset, "file_meta") else None
  if transfer_syntax is None or not transfer_syntax.is_compressed:
    element = dataset.get_item("PixelData", keep_deferred=True)
    expected = rows * columns * bits_allocated // 8
    length = int(getattr(element, "length", len(element.value or b"")))
    if length < expected:
      return f"truncated PixelData: {length} bytes, expected {expected} for {rows}x{columns}"
    value_tell = getattr(element, "value_tell", None)
    if value_tell is not None and value_tell + length > path.stat().st_size:
      return (
          f"truncated file: PixelData needs {length} bytes from offset {value_tell}, the file"
          f" has {path.stat().st_size}"
      )
  if not all(value for value in (study_uid, series_uid, patient_id)):
    return "empty PatientID, StudyInstanceUID or SeriesInstanceUID"

  normal = np.cross(orientation[:3], orientation[3:])
  norm = float(np.linalg.norm(normal))
  if norm < 0.5:
    return f"invalid ImageOrientationPatient {orientation.tolist()}: the two axes are parallel"
  wrapped = (
      bits_stored == 12 and pixel_representation == 0 and intercept > WRAP_INTERCEPT_ABOVE
  )
  return SliceHeader(
      path=str(path),
      stem=path.stem,
      patient_id=patient_id,
      study_uid=study_uid,
      series_uid=series_uid,
      grid=(rows, columns, tuple(np.round(orientation, 4)), tuple(np.round(pixel_spacing, 4))),
      along_normal_mm=float(position @ (normal / norm)),
      wrapped=wrapped,
  )


def find_release(manual_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Return (image folder, labels CSV) under `manual_dir`, accepting both folder names.

  Raises:
    common.ReleaseNotFoundError: no image folder or no CSV.
    InputError: both image folder names present.
  """
  roots = [manual_dir, manual_dir / RELEASE_FOLDER]
  for root in roots:
    folders = [root / name for name in IMAGE_FOLDERS if (root / name).is_dir()]
    if len(folders) > 1:
      raise InputError(
          f"{root}: both {folders[0].name}/ and {folders[1].name}/ exist; keep one of them"
      )
    if folders:
      csv_path = root / LABELS_CSV
      if not csv_path.is_file():
        raise common.ReleaseNotFoundError(f"{csv_path}: not found; download it with the images")
      return folders[0], csv_path
  raise common.ReleaseNotFoundError(
      f"{manual_dir}: no {' or '.join(IMAGE_FOLDERS)} folder found here or in"
      f" {RELEASE_FOLDER}/; see the manual download instructions of rsna_ich"
  )


def plan_series(
    image_folder: pathlib.Path,
    labels: LabelTable,
    config: RsnaIchConfig,
    report: common.BuildReport,
) -> list[SeriesPlan]:
  """Read every header, report faults, and plan the series in example order.

  Series are ordered by (fold, PatientID, StudyInstanceUID, SeriesInstanceUID),
  so that each fold is one run of keys and `fold_ranges` has one row per fold.
  """
  # TODO: the header pass runs in one process on the driver (about 640 files/s
  # measured on dummy data, so roughly 20 minutes for 752k files, an
  # estimate); a process pool would cut that on a many-core driver.
  headers: list[SliceHeader] = []
  with os.scandir(image_folder) as entries:
    listed = sorted(pathlib.Path(entry.path) for entry in entries)
  paths = []
  for path in listed:
    if path.is_dir():
      report.skip(str(path), "subfolder in the image folder: not read")
    elif not path.is_file():
      report.skip(str(path), "not a regular file (a dangling link?)")
    else:
      paths.append(path)
  first_path_of_stem: dict[str, pathlib.Path] = {}
  for path in paths:
    if path.suffix.lower() != ".dcm":
      report.skip(str(path), "not a DICOM file name: expected ID_<9 hex digits>.dcm")
      continue
    if path.stem in first_path_of_stem:
      # The CSV keys labels by stem, so a second file of one stem (ID_x.dcm
      # and ID_x.DCM) cannot be distinguished from the first.
      report.skip(
          str(path), f"duplicate file name: {path.stem} also stored as {first_path_of_stem[path.stem].name}"
      )
      continue
    first_path_of_stem[path.stem] = path
    header = read_header(path)
    if isinstance(header, str):
      if path.stem in KNOWN_CORRUPTED:
        header = f"{header} (known corrupted file of the release)"
      report.skip(str(path), header)
      continue
    if not _STEM_PATTERN.fullmatch(header.stem):
      report.note(str(path), "unusual file name: the stem is not ID_ and 9 hex digits")
    if header.stem in KNOWN_CORRUPTED:
      report.note(str(path), "known corrupted file of the release: its header passed the checks")
    if header.stem not in labels.labels:
      reason = "no labels in stage_2_train.csv"
      if header.stem in labels.invalid:
        reason = f"invalid labels in stage_2_train.csv: {labels.invalid[header.stem]}"
      elif header.stem in labels.incomplete:
        reason = f"incomplete labels: no row for {', '.join(labels.incomplete[header.stem])}"
      report.skip(str(path), reason)
      continue
    if header.stem in labels.any_mismatch:
      report.note(str(path), "label any differs from the maximum of the five subtypes")
    headers.append(header)

  found = {path.stem for path in paths}
  for stem in sorted(set(labels.labels) - found):
    report.skip(f"{LABELS_CSV}#{stem}", "labels without an image file")
  for stem in sorted(set(labels.incomplete) - found):
    missing = ", ".join(labels.incomplete[stem])
    report.skip(f"{LABELS_CSV}#{stem}", f"incomplete labels without an image file: no row for {missing}")
  for stem in sorted(set(labels.invalid) - found):
    report.skip(f"{LABELS_CSV}#{stem}", f"invalid labels without an image file: {labels.invalid[stem]}")
  for row in labels.bad_rows:
    report.skip(f"{LABELS_CSV}, {row.partition(':')[0]}", f"invalid CSV row: {row.partition(': ')[2]}")
  if labels.duplicate_rows:
    report.note(LABELS_CSV, f"duplicate rows removed: {labels.duplicate_rows}")

  groups: dict[tuple[str, str], list[SliceHeader]] = {}
  for header in headers:
    groups.setdefault((header.study_uid, header.series_uid), []).append(header)

  series = []
  for (study_uid, series_uid), members in groups.items():
    members = _same_grid(members, report)
    members.sort(key=lambda header: (header.along_normal_mm, header.stem))
    patients = sorted({header.patient_id for header in members})
    if len(patients) > 1:
      report.note(
          f"{study_uid}/{series_uid}",
          f"several PatientIDs in one series: {', '.join(patients)}; using {patients[0]}",
      )
    series.append((patients[0], study_uid, series_uid, members))

  folds = common.patient_folds(
      [patient for patient, *_ in series], config.num_folds, config.seed
  )
  series.sort(key=lambda item: (folds[item[0]], item[0], item[1], item[2]))
  plans = []
  next_key = 0
  for patient, study_uid, series_uid, members in series:
    plans.append(
        SeriesPlan(
            first_key=next_key,
            patient_id=patient,
            study_uid=study_uid,
            series_uid=series_uid,
            fold=folds[patient],
            files=tuple(header.path for header in members),
            stems=tuple(header.stem for header in members),
            wrapped=tuple(header.wrapped for header in members),
            labels=np.stack([labels.labels[header.stem] for header in members]),
        )
    )
    next_key += len(members) if config.layout == SLICES else 1
  return plans


def _same_grid(members: list[SliceHeader], report: common.BuildReport) -> list[SliceHeader]:
  """Keep the files on the series' most common grid and report the others.

  The CT reader rejects a whole series whose slices differ in size,
  orientation or pixel spacing, so the odd files are left out here.
  """
  counts: dict[tuple, int] = {}
  for header in members:
    counts[header.grid] = counts.get(header.grid, 0) + 1
  if len(counts) == 1:
    return list(members)
  grid = max(counts, key=lambda key: (counts[key], key))
  for header in members:
    if header.grid != grid:
      report.skip(
          header.path,
          f"different image grid from its series: {header.grid[:2]} vs {grid[:2]}",
      )
  return [header for header in members if header.grid == grid]


# ---------------------------------------------------------------------------
# Pixel pass (generator or Beam workers)


@dataclasses.dataclass
class SeriesResult:
  """Examples and bad-file entries of one series, as one worker returns them."""

  examples: list[tuple[int, dict]]
  problems: list[common.BadFile]


def unwrap_12bit_hu(path: str) -> np.ndarray:
  """Read one slice whose negative HU are stored modulo 4096, and return its HU.

  The CT layer's `unwrapped_slice_hu` undoes the wrap (see
  `unwrap_stored_values`) and applies the file's own slope and intercept, so
  padding, the air floor and the HU checks are the CT layer's.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    dataset = pydicom.dcmread(path)
  return unwrapped_slice_hu(dataset, path)


def process_series(plan: SeriesPlan, *, layout: str, image_size: int) -> SeriesResult:
  """Read one planned series and return its examples, or report why it cannot be read."""
  problems: list[common.BadFile] = []
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      volume = ct.read_dicom_files(plan.files)
  except ct.CTReadError as error:
    reason = f"series unreadable by the CT reader: {error}"
    return SeriesResult([], [common.BadFile(path, reason) for path in plan.files])

  # Matched by path, not by stem: two files may share a stem (ID_x.dcm, ID_x.DCM).
  kept = [os.path.abspath(path) for path in volume.provenance.source_files]
  index_of = {os.path.abspath(path): index for index, path in enumerate(plan.files)}
  plan_indices = [index_of[path] for path in kept]
  if plan_indices != sorted(plan_indices):
    # Both passes sort by position along the slice normal; a different order
    # would give keys that disagree with slice_index.
    raise RuntimeError(
        f"series {plan.series_uid}: the CT reader's slice order {kept} differs from the"
        f" header pass's order {list(plan.stems)}"
    )
  kept_paths = set(kept)
  for path in plan.files:
    if os.path.abspath(path) not in kept_paths:
      detail = next(
          (text for text in volume.provenance.warnings if path in text), "no reason given"
      )
      problems.append(common.BadFile(path, f"left out by the CT reader: {detail}"))

  hu = np.array(volume.hu, copy=True)
  for slice_index, plan_index in enumerate(plan_indices):
    if plan.wrapped[plan_index]:
      hu[slice_index] = unwrap_12bit_hu(plan.files[plan_index])
  volume = dataclasses.replace(volume, hu=hu)
  volume, _ = common.square_inplane(volume, None, image_size)
  image = ct.windows_uint8(volume.hu)
  spacing = np.asarray(volume.spacing, np.float32)
  affine = np.asarray(volume.affine, np.float32)
  labels = plan.labels[plan_indices]
  if layout == SCANS:
    example = {
        "image": image,
        "labels": labels.max(axis=0),
        "slice_labels": labels,
        "spacing": spacing,
        "affine": affine,
        "scan_id": plan.series_uid,
        "study_uid": plan.study_uid,
        "patient_id": plan.patient_id,
        "fold": plan.fold,
        "sop_instance_uids": [plan.stems[index] for index in plan_indices],
        "hu_unwrapped": np.asarray([plan.wrapped[index] for index in plan_indices], np.bool_),
    }
    return SeriesResult([(plan.first_key, example)], problems)
  examples = []
  for slice_index, plan_index in enumerate(plan_indices):
    examples.append((plan.first_key + plan_index, {
        "image": image[slice_index],
        "labels": labels[slice_index],
        "spacing": spacing,
        "affine": affine,
        "slice_index": slice_index,
        "scan_id": plan.series_uid,
        "study_uid": plan.study_uid,
        "patient_id": plan.patient_id,
        "fold": plan.fold,
        "sop_instance_uid": plan.stems[plan_index],
        "hu_unwrapped": bool(plan.wrapped[plan_index]),
    }))
  return SeriesResult(examples, problems)


def fold_ranges_from_keys(key_folds: Sequence[tuple[int, int]]) -> dict:
  """Return `fold_ranges` metadata from the (key, fold) of every written example."""
  return {"train": common.fold_ranges(fold for _, fold in sorted(key_folds))}


def final_report(
    header_entries: Sequence[common.BadFile], decode_entries: Sequence[common.BadFile]
) -> dict:
  """Merge both passes' entries into one report, log it and return its metadata."""
  report = common.BuildReport("rsna_ich")
  report.entries.extend(header_entries)
  for entry in decode_entries:
    (report.note if entry.kept else report.skip)(entry.path, entry.reason)
  report.log()
  return report.to_metadata()


def _series_examples(result: SeriesResult) -> list[tuple[int, dict]]:
  return result.examples


def _series_problems(result: SeriesResult) -> list[common.BadFile]:
  return result.problems


def _key_and_fold(key_example: tuple[int, dict]) -> tuple[int, int]:
  return key_example[0], int(key_example[1]["fold"])


# ---------------------------------------------------------------------------
# Builder


def beam_available() -> bool:
  """Check whether `apache_beam` can be imported (the optional `beam` extra)."""
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


class RsnaIch(tfds.core.GeneratorBasedBuilder):
  """RSNA 2019 intracranial hemorrhage slices, regrouped into series, with patient folds."""

  name = "rsna_ich"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: slices and scans layouts, patient folds."}
  BUILDER_CONFIGS = [
      RsnaIchConfig(name=SLICES, layout=SLICES, description="One example per slice, 384 px."),
      RsnaIchConfig(name=SCANS, layout=SCANS, description="One example per series, 384 px."),
  ]
  DEFAULT_CONFIG_NAME = SLICES
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Accept the competition rules and download the data of "RSNA Intracranial
  Hemorrhage Detection" from https://www.kaggle.com/competitions/rsna-intracranial-hemorrhage-detection/data
  (for example `kaggle competitions download -c rsna-intracranial-hemorrhage-detection`),
  and unzip it into the manual dir, so that it contains either

    stage_2_train/ID_xxxxxxxxx.dcm ...   (or stage_2_train_images/)
    stage_2_train.csv

  or the folder rsna-intracranial-hemorrhage-detection/ holding them. The
  test images and the sample submission are not used (they have no labels).
  """

  def __init__(self, *, use_beam: bool | None = None, **kwargs):
    """Create the builder.

    Args:
      use_beam: generate with Apache Beam (True), with a plain generator
        (False), or with Beam whenever `apache_beam` is importable (None).
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`.
    """
    if use_beam and not beam_available():
      raise ImportError(
          "use_beam=True needs apache_beam; install the beam extra: pip install -e '.[beam]'"
      )
    self._use_beam = beam_available() if use_beam is None else use_beam
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    text = tfds.features.Text()
    if config.layout == SLICES:
      features = common.slice_features(size, mask=False, extra={
          "study_uid": text,
          # The file stem, which is the SOPInstanceUID and the CSV's image ID.
          "sop_instance_uid": text,
          # True when the slice's negative HU were stored modulo 4096 and undone.
          "hu_unwrapped": np.bool_,
      })
    elif config.layout == SCANS:
      features = common.scan_features(size, mask=False, extra={
          "slice_labels": tfds.features.Tensor(
              shape=(None, len(uem_ich_jax.SLICE_LABELS)), dtype=np.uint8
          ),
          "study_uid": text,
          "sop_instance_uids": tfds.features.Sequence(text),
          "hu_unwrapped": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      })
    else:
      raise ValueError(f"unknown layout {config.layout!r}; expected {SLICES!r} or {SCANS!r}")
    # BeamMetadataDict stores PCollections as metadata once the pipeline ran.
    metadata = tfds.core.BeamMetadataDict() if self._use_beam else tfds.core.MetadataDict()
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        homepage="https://www.kaggle.com/competitions/rsna-intracranial-hemorrhage-detection",
        citation=_CITATION,
        metadata=metadata,
        # Example i of the split is key i's rank, so fold ranges index the data
        # source directly; the grain pipeline shuffles at read time.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    image_folder, csv_path = find_release(pathlib.Path(dl_manager.manual_dir))
    labels = read_labels(csv_path)
    report = common.BuildReport("rsna_ich")
    plans = plan_series(image_folder, labels, config, report)
    logger.info(
        "rsna_ich: %d series, %d slices planned from %s",
        len(plans), sum(len(plan.files) for plan in plans), image_folder,
    )
    self.info.metadata["num_folds"] = config.num_folds
    if not plans:
      common.raise_if_no_examples(0, report)
    if self._use_beam:
      return {"train": self._beam_examples(plans, report.entries)}
    return {"train": self._generate_examples(plans, report.entries)}

  def _generate_examples(
      self, plans: list[SeriesPlan], header_entries: list[common.BadFile]
  ) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    key_folds = []
    problems = []
    for plan in plans:
      result = process_series(plan, layout=config.layout, image_size=config.image_size)
      problems.extend(result.problems)
      for key, example in result.examples:
        key_folds.append((key, int(example["fold"])))
        yield key, example
    if not key_folds:
      report = common.BuildReport("rsna_ich")
      report.entries.extend(header_entries)
      report.entries.extend(problems)
      common.raise_if_no_examples(0, report)
    # TFDS writes the metadata after the generator is exhausted.
    self.info.metadata["fold_ranges"] = fold_ranges_from_keys(key_folds)
    self.info.metadata["bad_files"] = final_report(header_entries, problems)

  def _beam_examples(self, plans: list[SeriesPlan], header_entries: list[common.BadFile]):
    """Return the PTransform that reads the series on Beam workers."""
    beam = tfds.core.lazy_imports.apache_beam
    config = self.builder_config
    metadata = self.info.metadata
    process = functools.partial(
        process_series, layout=config.layout, image_size=config.image_size
    )

    @beam.ptransform_fn
    def generate(pipeline):
      results = (
          pipeline
          | "CreateSeries" >> beam.Create(plans)
          # Spreads the series over workers on distributed runners.
          | "Reshuffle" >> beam.Reshuffle()
          | "ReadSeries" >> beam.Map(process)
      )
      examples = results | "Examples" >> beam.FlatMap(_series_examples)
      metadata["fold_ranges"] = (
          examples
          | "KeyAndFold" >> beam.Map(_key_and_fold)
          | "CollectKeyFolds" >> beam.combiners.ToList()
          | "FoldRanges" >> beam.Map(fold_ranges_from_keys)
      )
      metadata["bad_files"] = (
          results
          | "Problems" >> beam.FlatMap(_series_problems)
          | "CollectProblems" >> beam.combiners.ToList()
          | "Report" >> beam.Map(lambda problems: final_report(header_entries, problems))
      )
      return examples

    return generate()  # pylint: disable=no-value-for-parameter
