"""The `bhsd` TFDS builder: BHSD / MBH-Seg 2024 and MBH-Seg 2025 head CT with hemorrhage masks.

Reads the releases as downloaded (NIfTI volumes, one or more raters' label
volumes, the case-level CSV) through `uem_ich_jax.ct`, merges the raters by a
per-voxel majority vote and writes array_record without TensorFlow. The
README next to this file describes the layouts accepted and every decision
taken where the release is unclear.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import clinical, ct
from uem_ich_jax.ct.resample import TILT_TOLERANCE_DEG
from uem_ich_jax.datasets import common
from uem_ich_jax.datasets.common import split_nifti_suffix
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

SLICES = "slices"
SCANS = "scans"
CASE_SCANS = "case_scans"

# Release folders, as named in the Hugging Face archives (WuBiao/BHSD,
# mbhseg/mbhseg25). Each source is one value of the `source` feature.
BHSD_FOLDER = "label_192"
BHSD_IMAGES = "images"
# The release names this folder with a space; the underscore spelling is
# accepted too, because unpacking tools sometimes replace the space.
BHSD_LABEL_FOLDERS = ("ground truths", "ground_truths")
MBH_TRAIN_VOXEL = "MBH_Train_2025_voxel-label"
MBH_VAL_VOXEL = ("MBH_Val_2025_voxel-label", "MBH_val_label_2025")
MBH_CASE_LEVEL = "MBH_Train_2025_case-label"
# TODO: BHSD's unlabel_2000/ (anybleed, nobleed) is not read, because it gives
# only `any` and the features have no way to mark subtype labels as unknown.
CASE_CSV_NAME = "case-wise_annotation.csv"
DATASET_JSON = "dataset.json"

SOURCE_BHSD = "bhsd_label_192"
SOURCE_MBH_TRAIN = "mbh2025_train_voxel"
SOURCE_MBH_VAL = "mbh2025_val_voxel"
SOURCE_MBH_CASE = "mbh2025_train_case"

# `ID_<PatientID>_ID_<StudyInstanceUID>`, both RSNA 2019 ids: 8 and 10 lowercase
# hex digits in the release, but any hex length is accepted.
_CASE_NAME = re.compile(r"^(ID_[0-9a-fA-F]+)_(ID_[0-9a-fA-F]+)$")
_RATER_FILE = re.compile(r"^label_annot_(\d+)$")

# Names a release label map may give each class, after lowercasing and
# dropping everything but letters. BHSD's dataset.json spells the subtypes out
# (`epidural`), nnU-Net conversions of MBH-Seg 2025 use abbreviations (`EDH`).
# "ICH" is left out on purpose: it means intracerebral in some papers and
# intracranial (any) in others.
_CLASS_NAME_ALIASES = {
    "background": 0,
    "bg": 0,
    "epidural": 1,
    "epiduralhemorrhage": 1,
    "epiduralhaemorrhage": 1,
    "extradural": 1,
    "edh": 1,
    "intraparenchymal": 2,
    "intraparenchymalhemorrhage": 2,
    "intraparenchymalhaemorrhage": 2,
    "iph": 2,
    "intraventricular": 3,
    "intraventricularhemorrhage": 3,
    "intraventricularhaemorrhage": 3,
    "ivh": 3,
    "subarachnoid": 4,
    "subarachnoidhemorrhage": 4,
    "subarachnoidhaemorrhage": 4,
    "sah": 4,
    "subdural": 5,
    "subduralhemorrhage": 5,
    "subduralhaemorrhage": 5,
    "sdh": 5,
}

# The `labels` of White65534/BHSD dataset.json (commit cd8a4eb), used when the
# manual folder contains no dataset.json (no MBH-Seg 2025 label map file is known).
BUILTIN_LABELS = {
    "0": "background",
    "1": "epidural",
    "2": "intraparenchymal",
    "3": "intraventricular",
    "4": "subarachnoid",
    "5": "subdural",
}

_CSV_ID_COLUMN = "patientID_studyID"

# Largest class id a label volume may hold (the CT layer rejects others).
_MAX_RELEASE_CLASS_ID = 5

_DESCRIPTION = """\
BHSD (Brain Hemorrhage Segmentation Dataset, label_192) and MBH-Seg 2025 head CT
from the RSNA 2019 collection, with voxel masks of the five hemorrhage subtypes
(several raters merged by majority vote) and case-level labels. Every example
carries a patient-level `fold` and the RSNA PatientID as `patient_id`.
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Get the data under its licence (BHSD: Hugging Face WuBiao/BHSD, mirrored as
Wendy-Fly/BHSD, and White65534/BHSD on GitHub for dataset.json; MBH-Seg 2025:
Hugging Face mbhseg/mbhseg25) and unpack it into the manual folder as:

  <manual_dir>/
    dataset.json                      BHSD label map and 96/96 split (optional)
    {BHSD_FOLDER}/{BHSD_IMAGES}/ID_<patient>_ID_<study>.nii.gz
    {BHSD_FOLDER}/ground truths/ID_<patient>_ID_<study>.nii.gz
    {MBH_TRAIN_VOXEL}/ID_<patient>_ID_<study>/image.nii.gz, label_annot_<k>.nii.gz
    {MBH_VAL_VOXEL[0]}/ (or {MBH_VAL_VOXEL[1]}/)   same per-case layout
    {MBH_CASE_LEVEL}/ID_<patient>_ID_<study>.nii.gz, {CASE_CSV_NAME}

Any of the folders may be missing. Files whose names lack the .nii.gz suffix
(some BHSD archives) are read by content and reported. dataset.json may also
sit in {BHSD_FOLDER}/; without one the BHSD label map is used and a warning
says so.
"""


class ClassMapError(InputError):
  """A release label map that cannot be mapped onto the project's class ids."""


class CaseLabelError(InputError):
  """A case-level CSV that cannot be read: missing columns or conflicting rows."""


@dataclasses.dataclass
class BhsdConfig(tfds.core.BuilderConfig):
  """One `bhsd` build.

  Attributes:
    layout: `slices` (one example per slice of a voxel-labelled case), `scans`
      (one per voxel-labelled case) or `case_scans` (one per volume of the
      MBH-Seg 2025 case-level set, labels only).
    image_size: rows and columns of every stored slice, after padding to a
      square field of view.
    num_folds: number of patient-level folds.
    seed: seed of the patient-to-fold assignment.
  """

  layout: str = SLICES
  image_size: int = 384
  num_folds: int = 5
  seed: int = 0


# ---------------------------------------------------------------------------
# Names


def parse_case_name(case_id: str) -> tuple[str, str]:
  """Return (patient id, study id) of an `ID_<patient>_ID_<study>` case name.

  The patient id is the RSNA 2019 PatientID (for example `ID_1a2b3c4d`), the
  study id its StudyInstanceUID.

  Raises:
    ValueError: the name is not of that form.
  """
  match = _CASE_NAME.match(case_id)
  if not match:
    raise ValueError(
        f"case name {case_id!r} is not of the form ID_<patient hex>_ID_<study hex>"
    )
  return match.group(1), match.group(2)


# ---------------------------------------------------------------------------
# Class map


def _normalise_class_name(name: str) -> str:
  return re.sub(r"[^a-z]", "", name.lower())


def parse_class_map(labels: dict, source: str) -> dict[int, int]:
  """Map release class ids onto the project's ids (0 background, 1 EDH ... 5 SDH) by name.

  Accepts the MSD form (`{"0": "background", "1": "epidural"}`) and the nnU-Net
  v2 form (`{"background": 0, "EDH": 1}`). The order of the release ids is
  never assumed: each id is mapped by its class name.

  Raises:
    ClassMapError: an unknown class name, an id that is not an integer, two
      ids for one class, or no entry for background or for a subtype.
  """
  if not isinstance(labels, dict) or not labels:
    raise ClassMapError(f"{source}: `labels` must be a non-empty object, got {labels!r}")
  pairs = []
  for key, value in labels.items():
    if isinstance(value, str):
      raw_id, name = key, value
    else:
      raw_id, name = value, key
    try:
      release_id = int(raw_id)
    except (TypeError, ValueError) as error:
      raise ClassMapError(
          f"{source}: label map entry {key!r}: {value!r} has no integer class id"
      ) from error
    pairs.append((release_id, str(name)))

  mapping: dict[int, int] = {}
  release_id_of: dict[int, int] = {}
  for release_id, name in pairs:
    project_id = _CLASS_NAME_ALIASES.get(_normalise_class_name(name))
    if project_id is None:
      raise ClassMapError(
          f"{source}: unknown class name {name!r} (id {release_id}); expected background or"
          f" one of {', '.join(uem_ich_jax.SUBTYPES)} (or EDH, IPH, IVH, SAH, SDH)"
      )
    if project_id in release_id_of:
      raise ClassMapError(
          f"{source}: ids {release_id_of[project_id]} and {release_id} both name class"
          f" {name!r}"
      )
    if release_id in mapping:
      raise ClassMapError(f"{source}: id {release_id} appears twice")
    release_id_of[project_id] = release_id
    mapping[release_id] = project_id
  missing = [
      name
      for name, project_id in {"background": 0, **uem_ich_jax.MASK_CLASS_IDS}.items()
      if project_id not in release_id_of
  ]
  if missing:
    raise ClassMapError(f"{source}: the label map has no entry for {', '.join(missing)}")
  out_of_range = sorted(i for i in mapping if not 0 <= i <= _MAX_RELEASE_CLASS_ID)
  if out_of_range:
    raise ClassMapError(
        f"{source}: class ids {out_of_range} are outside 0..{_MAX_RELEASE_CLASS_ID}"
    )
  return mapping


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
  """Class map and official split, as read from dataset.json."""

  class_map: dict[int, int]
  class_map_source: str
  # Case name to "training" or "test", from dataset.json's lists.
  official_split: dict[str, str]


def _official_split(document: dict) -> dict[str, str]:
  split = {}
  for entry in document.get("training", []):
    path = entry.get("image", "") if isinstance(entry, dict) else str(entry)
    split[split_nifti_suffix(pathlib.PurePosixPath(path).name)[0]] = "training"
  for entry in document.get("test", []):
    path = entry.get("image", "") if isinstance(entry, dict) else str(entry)
    split[split_nifti_suffix(pathlib.PurePosixPath(path).name)[0]] = "test"
  return split


def read_release_info(manual_dir: pathlib.Path) -> ReleaseInfo:
  """Read the class map and official split from dataset.json, or fall back to BHSD's map.

  Raises:
    ClassMapError: dataset.json is invalid, its label map cannot be mapped, or
      two dataset.json files give different maps.
  """
  candidates = [manual_dir / DATASET_JSON, manual_dir / BHSD_FOLDER / DATASET_JSON]
  found = [path for path in candidates if path.is_file()]
  if not found:
    logger.warning(
        "bhsd: no %s in %s or %s/; using the BHSD label map %s",
        DATASET_JSON, manual_dir, BHSD_FOLDER, BUILTIN_LABELS,
    )
    return ReleaseInfo(
        parse_class_map(BUILTIN_LABELS, "built-in"), "built-in (BHSD dataset.json)", {}
    )
  maps, split = [], {}
  for path in found:
    try:
      document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
      raise ClassMapError(f"{path}: cannot read as JSON: {error}") from error
    if "labels" not in document:
      raise ClassMapError(f"{path}: no `labels` entry, so the class ids cannot be mapped")
    maps.append(parse_class_map(document["labels"], str(path)))
    split.update(_official_split(document))
  if any(other != maps[0] for other in maps[1:]):
    raise ClassMapError(
        f"{' and '.join(map(str, found))} give different label maps: {maps}"
    )
  return ReleaseInfo(maps[0], str(found[0].relative_to(manual_dir)), split)


def class_lookup(class_map: dict[int, int]) -> np.ndarray:
  """Build a 256-entry table from release id to project id, 255 for ids not in the map."""
  table = np.full(256, 255, dtype=np.uint8)
  for release_id, project_id in class_map.items():
    table[release_id] = project_id
  return table


# ---------------------------------------------------------------------------
# Case-level CSV


class _InvalidRow(ValueError):
  """Error for one CSV row whose labels cannot be used; the message gives the reason."""


def _binary(value: str, column: str) -> int:
  try:
    number = float(value)
  except ValueError:
    number = float("nan")
  if number not in (0.0, 1.0):
    raise _InvalidRow(f"column {column} is {value!r}, expected 0 or 1")
  return int(number)


@dataclasses.dataclass
class CaseLabels:
  """Labels of the case-level CSVs.

  Attributes:
    labels: case name to uint8 labels in SLICE_LABELS order.
    rejected: case names whose rows cannot be used (a value other than 0/1,
      rows that disagree, `any` that differs from the subtypes). The builder
      leaves these cases out wherever they appear, instead of reading them as
      negative or taking their labels from the mask.
  """

  labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  rejected: set[str] = dataclasses.field(default_factory=set)


def read_case_labels(
    path: pathlib.Path, report: common.BuildReport | None = None
) -> CaseLabels:
  """Read `case-wise_annotation.csv` into case name -> uint8 labels in SLICE_LABELS order.

  Columns are found by name (any order, surrounding spaces and a UTF-8 BOM
  ignored). Identical repeated rows are kept once. A case with a value other
  than 0 or 1, rows that disagree, or an `any` that differs from the maximum
  of its subtypes goes into `rejected` and is reported, so that the case is
  left out instead of being read as negative; the build goes on.

  Raises:
    CaseLabelError: the file is empty or a column is missing.
  """
  result = CaseLabels()
  problems: dict[str, str] = {}
  with path.open(newline="", encoding="utf-8-sig") as file:
    reader = csv.reader(file)
    try:
      header = [name.strip() for name in next(reader)]
    except StopIteration as error:
      raise CaseLabelError(f"{path}: empty file, expected a header row") from error
    needed = (_CSV_ID_COLUMN,) + uem_ich_jax.SLICE_LABELS
    missing = [name for name in needed if name not in header]
    if missing:
      raise CaseLabelError(
          f"{path}: missing columns {', '.join(missing)}; header is {', '.join(header)}"
      )
    index = {name: header.index(name) for name in needed}
    for line, row in enumerate(reader, start=2):
      if not any(cell.strip() for cell in row):
        continue
      case_id = ""
      if index[_CSV_ID_COLUMN] < len(row):
        case_id = split_nifti_suffix(row[index[_CSV_ID_COLUMN]].strip())[0]
      if not case_id:
        if report is not None:
          report.skip(f"{path}:{line}", f"invalid CSV row: no {_CSV_ID_COLUMN}")
        continue
      try:
        if len(row) < len(header):
          raise _InvalidRow(f"{len(row)} fields, the header has {len(header)}")
        values = np.array(
            [_binary(row[index[name]].strip(), name) for name in uem_ich_jax.SLICE_LABELS],
            dtype=np.uint8,
        )
      except _InvalidRow as error:
        problems.setdefault(case_id, f"invalid CSV label: line {line}: {error}")
        continue
      earlier = result.labels.get(case_id)
      if earlier is not None and not np.array_equal(earlier, values):
        problems.setdefault(
            case_id,
            f"conflicting CSV rows: line {line} has {values.tolist()}, an earlier row"
            f" {earlier.tolist()}",
        )
        continue
      result.labels[case_id] = values
      if values[0] != values[1:].max():
        problems.setdefault(case_id, "CSV any differs from its subtypes")
  for case_id in sorted(problems):
    result.labels.pop(case_id, None)
    result.rejected.add(case_id)
    if report is not None:
      report.skip(f"{path}#{case_id}", problems[case_id])
  return result


# ---------------------------------------------------------------------------
# Rater merge


def merge_raters(masks: list[np.ndarray]) -> np.ndarray:
  """Merge several raters' class-id masks by a per-voxel majority vote.

  Each voxel gets the class most raters gave it. Ties are broken as follows:
    - background tied with one or more blood classes: a blood class wins,
      because a rater who drew blood there saw something;
    - two or more blood classes tied: the class with the larger total volume
      over all raters in this case (sum of its voxels in every rater's mask)
      wins, so a disputed rim joins the dominant bleed. At equal totals the
      lower class id wins.
  The highest class id never wins just by being highest. One rater gives
  that rater's mask unchanged.

  Args:
    masks: uint8 arrays of one shape with project class ids 0..5.

  Returns:
    The merged uint8 mask.
  """
  if not masks:
    raise ValueError("merge_raters needs at least one mask")
  shape = masks[0].shape
  if any(mask.shape != shape for mask in masks):
    raise ValueError(f"rater masks differ in shape: {[mask.shape for mask in masks]}")
  if len(masks) == 1:
    return masks[0].astype(np.uint8, copy=True)

  num_classes = len(uem_ich_jax.SUBTYPES) + 1
  totals = np.zeros(num_classes, dtype=np.int64)
  for mask in masks:
    totals += np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
  # Priority 0 for background, then 1..5 for the blood classes from the
  # smallest total volume to the largest. At equal totals the lower id ranks
  # higher. Scores are votes * 6 + priority, so the priority only breaks ties.
  blood = sorted(range(1, num_classes), key=lambda class_id: (totals[class_id], -class_id))
  priority = np.zeros(num_classes, dtype=np.int32)
  for rank, class_id in enumerate(blood, start=1):
    priority[class_id] = rank

  merged = np.empty(shape, dtype=np.uint8)
  # Slice by slice, to bound the memory of the vote table.
  for index in range(shape[0]):
    votes = np.zeros((num_classes,) + shape[1:], dtype=np.int32)
    for mask in masks:
      for class_id in range(num_classes):
        votes[class_id] += mask[index] == class_id
    score = votes * num_classes + priority[:, None, None]
    merged[index] = np.argmax(score, axis=0).astype(np.uint8)
  return merged


def slice_labels_from_mask(mask: np.ndarray) -> np.ndarray:
  """Labels (slice, 6) in SLICE_LABELS order: a subtype is present on a slice with any voxel of it."""
  labels = np.zeros((mask.shape[0], len(uem_ich_jax.SLICE_LABELS)), dtype=np.uint8)
  for name, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
    labels[:, uem_ich_jax.SLICE_LABELS.index(name)] = (mask == class_id).any(axis=(1, 2))
  labels[:, 0] = labels[:, 1:].max(axis=1)
  return labels


# ---------------------------------------------------------------------------
# Finding the cases


@dataclasses.dataclass(frozen=True)
class VoxelCase:
  """One voxel-labelled case: its image and one label volume per rater."""

  case_id: str
  patient_id: str
  source: str
  image_path: pathlib.Path
  # Rater name ("1", "5" for MBH-Seg 2025 label_annot_<k>; "bhsd" for BHSD) -> file.
  label_paths: tuple[tuple[str, pathlib.Path], ...]


@dataclasses.dataclass(frozen=True)
class CaseLevelScan:
  """One volume of the MBH-Seg 2025 case-level set and its labels."""

  case_id: str
  patient_id: str
  image_path: pathlib.Path
  labels: np.ndarray
  in_csv: bool


def _nifti_files(folder: pathlib.Path, report: common.BuildReport) -> dict[str, pathlib.Path]:
  """Case name -> file for every file in `folder`, noting names without a NIfTI suffix."""
  files = {}
  for path in sorted(folder.iterdir()):
    if not path.is_file() or path.name.startswith("."):
      continue
    stem, has_suffix = split_nifti_suffix(path.name)
    if path.suffix == ".csv" or path.name == DATASET_JSON:
      continue
    if not has_suffix:
      report.note(str(path), "file name without .nii/.nii.gz suffix: read by content")
    if stem in files:
      report.skip(str(path), f"duplicate case: {stem} also stored as {files[stem].name}")
      continue
    files[stem] = path
  return files


def _checked_patient(case_id: str, path: pathlib.Path, report: common.BuildReport) -> str | None:
  try:
    return parse_case_name(case_id)[0]
  except ValueError as error:
    report.skip(str(path), f"case name not ID_<patient>_ID_<study>: {error}")
    return None


def _bhsd_cases(manual_dir: pathlib.Path, report: common.BuildReport) -> list[VoxelCase]:
  root = manual_dir / BHSD_FOLDER
  if not (root / BHSD_IMAGES).is_dir():
    return []
  label_folder = next(
      (root / name for name in BHSD_LABEL_FOLDERS if (root / name).is_dir()), None
  )
  images = _nifti_files(root / BHSD_IMAGES, report)
  labels = _nifti_files(label_folder, report) if label_folder else {}
  cases = []
  for case_id, image_path in images.items():
    patient_id = _checked_patient(case_id, image_path, report)
    if patient_id is None:
      continue
    if case_id not in labels:
      report.skip(str(image_path), "no label volume: nothing under 'ground truths/'")
      continue
    cases.append(
        VoxelCase(case_id, patient_id, SOURCE_BHSD, image_path, (("bhsd", labels[case_id]),))
    )
  for case_id in sorted(set(labels) - set(images)):
    report.skip(str(labels[case_id]), "label volume without image")
  return cases


def _mbh_voxel_cases(
    folder: pathlib.Path, source: str, report: common.BuildReport
) -> list[VoxelCase]:
  cases = []
  for case_dir in sorted(path for path in folder.iterdir() if path.is_dir()):
    patient_id = _checked_patient(case_dir.name, case_dir, report)
    if patient_id is None:
      continue
    image_path, raters = None, []
    for path in sorted(case_dir.iterdir()):
      if not path.is_file() or path.name.startswith("."):
        continue
      stem, has_suffix = split_nifti_suffix(path.name)
      rater = _RATER_FILE.match(stem)
      if stem != "image" and not rater:
        report.skip(str(path), "unexpected file in a case folder: not image or label_annot_<k>")
        continue
      if not has_suffix:
        report.note(str(path), "file name without .nii/.nii.gz suffix: read by content")
      if stem == "image":
        image_path = path
      else:
        raters.append((rater.group(1), path))
    if image_path is None:
      report.skip(str(case_dir), "no image volume in the case folder")
      continue
    if not raters:
      # TODO: validation cases released without labels are reported and left
      # out; an image-only config would let predictions run on them.
      report.skip(str(image_path), "no label volume: no label_annot_<k> in the case folder")
      continue
    raters.sort(key=lambda item: int(item[0]))
    cases.append(VoxelCase(case_dir.name, patient_id, source, image_path, tuple(raters)))
  return cases


def find_voxel_cases(manual_dir: pathlib.Path, report: common.BuildReport) -> list[VoxelCase]:
  """Find the voxel-labelled cases of every layout present, one entry per case name.

  A case found in several sources is built once: MBH-Seg 2025 training (one
  file per rater) is preferred, then MBH-Seg 2025 validation, then BHSD; the
  other copies are reported and left out.
  """
  sources = []
  if (manual_dir / MBH_TRAIN_VOXEL).is_dir():
    sources.append(_mbh_voxel_cases(manual_dir / MBH_TRAIN_VOXEL, SOURCE_MBH_TRAIN, report))
  for name in MBH_VAL_VOXEL:
    if (manual_dir / name).is_dir():
      sources.append(_mbh_voxel_cases(manual_dir / name, SOURCE_MBH_VAL, report))
  sources.append(_bhsd_cases(manual_dir, report))

  chosen: dict[str, VoxelCase] = {}
  for cases in sources:
    for case in cases:
      if case.case_id in chosen:
        first_copy = chosen[case.case_id]
        report.skip(
            str(case.image_path),
            f"duplicate case: {case.case_id} is built from {first_copy.source}"
            f" ({first_copy.image_path})",
        )
        continue
      chosen[case.case_id] = case
  return list(chosen.values())


def find_case_level_csvs(manual_dir: pathlib.Path) -> list[pathlib.Path]:
  """List the case-level CSVs in the case-level folder or at the top of the manual folder."""
  candidates = [manual_dir / CASE_CSV_NAME, manual_dir / MBH_CASE_LEVEL / CASE_CSV_NAME]
  return [path for path in candidates if path.is_file()]


def read_all_case_labels(manual_dir: pathlib.Path, report: common.BuildReport) -> CaseLabels:
  """Case labels from every case-level CSV found; a case two CSVs disagree on is rejected.

  Raises:
    CaseLabelError: a CSV is empty or lacks a column.
  """
  merged = CaseLabels()
  for path in find_case_level_csvs(manual_dir):
    read = read_case_labels(path, report)
    merged.rejected |= read.rejected
    for case_id, values in read.labels.items():
      earlier = merged.labels.get(case_id)
      if earlier is not None and not np.array_equal(earlier, values):
        report.skip(
            f"{path}#{case_id}",
            f"conflicting CSV rows: {values.tolist()} here, {earlier.tolist()} in another CSV",
        )
        merged.rejected.add(case_id)
        continue
      merged.labels[case_id] = values
  for case_id in merged.rejected:
    merged.labels.pop(case_id, None)
  return merged


def find_case_level_scans(
    manual_dir: pathlib.Path, case_labels: CaseLabels, report: common.BuildReport
) -> list[CaseLevelScan]:
  """List the case-level volumes with their labels: a CSV row, or zeros for a case not in it.

  The release lists only positive cases in its CSV (577 rows, all `any` = 1),
  so a volume without a row is negative. A volume whose row was rejected is
  left out and reported.
  """
  folder = manual_dir / MBH_CASE_LEVEL
  if not folder.is_dir():
    return []
  scans = []
  files = _nifti_files(folder, report)
  for case_id, path in files.items():
    patient_id = _checked_patient(case_id, path, report)
    if patient_id is None:
      continue
    if case_id in case_labels.rejected:
      report.skip(str(path), f"unusable row in {CASE_CSV_NAME}: not read as negative")
      continue
    in_csv = case_id in case_labels.labels
    labels = case_labels.labels.get(
        case_id, np.zeros(len(uem_ich_jax.SLICE_LABELS), np.uint8)
    )
    scans.append(CaseLevelScan(case_id, patient_id, path, labels, in_csv))
  csv_only = sorted(case_id for case_id in case_labels.labels if case_id not in files)
  for case_id in csv_only:
    report.note(f"{MBH_CASE_LEVEL}/{CASE_CSV_NAME}#{case_id}", "CSV row without a case-level volume")
  return scans


# ---------------------------------------------------------------------------
# Reading one case


def note_non_finite(volume: ct.CTVolume, path: pathlib.Path, report: common.BuildReport) -> None:
  """Note a volume whose NaN or infinite voxels the CT layer set to air."""
  if volume.provenance.non_finite_voxels:
    report.note(
        str(path),
        f"non-finite voxels set to air: {volume.provenance.non_finite_voxels}",
    )


@dataclasses.dataclass(frozen=True)
class ReadCase:
  """One voxel case as read: volume and merged mask on the stored grid, labels and volumes."""

  volume: ct.CTVolume
  mask: np.ndarray
  slice_labels: np.ndarray
  labels: np.ndarray
  hematoma_ml: np.ndarray
  num_raters: int


def _read_raters(
    case: VoxelCase, lookup: np.ndarray, report: common.BuildReport
) -> list[tuple[str, pathlib.Path, np.ndarray]]:
  """Read every rater's mask in project class ids; unreadable or invalid ones are reported."""
  raters = []
  for rater, label_path in case.label_paths:
    try:
      rater_volume, raw = ct.read_nifti_pair(case.image_path, label_path)
    except ct.CTReadError as error:
      report.skip(str(label_path), f"unreadable label volume: {error}")
      continue
    provenance = rater_volume.provenance
    if provenance.mask_stored_as_255:
      report.skip(str(label_path), "label volume is binary 0/255, not class ids")
      continue
    if provenance.mask_geometry == ct.MASK_REORIENTED:
      report.note(
          str(label_path),
          "label stored in another axis order or direction than the image: reoriented by its"
          " affine",
      )
    elif provenance.mask_geometry == ct.MASK_IMAGE_GEOMETRY_ASSUMED:
      report.note(str(label_path), "label affine differs from the image's: image geometry used")
    mask = lookup[raw]
    if (mask == 255).any():
      unknown = sorted(set(np.unique(raw[mask == 255]).tolist()))
      report.skip(str(label_path), f"class ids not in the label map: {unknown}")
      continue
    raters.append((rater, label_path, mask))
  return raters


def read_voxel_case(
    case: VoxelCase,
    lookup: np.ndarray,
    csv_labels: np.ndarray | None,
    image_size: int,
    report: common.BuildReport,
) -> ReadCase | None:
  """Read, merge and resize one voxel case; None (and a report entry) when it is left out."""
  # NOTE: the image is decoded once here and once more per rater by
  # read_nifti_pair (2-6 reads per case). The voxel-labelled sets contain a
  # few hundred cases, so this costs minutes at most.
  try:
    volume = ct.read_nifti(case.image_path)
  except ct.CTReadError as error:
    report.skip(str(case.image_path), f"unreadable image: {error}")
    return None
  note_non_finite(volume, case.image_path, report)
  raters = _read_raters(case, lookup, report)
  if not raters:
    report.skip(str(case.image_path), "no readable label volume")
    return None

  positive = csv_labels is not None and bool(csv_labels[0])
  voting = []
  for rater, label_path, mask in raters:
    if not mask.any() and positive:
      report.note(
          str(label_path),
          f"all-zero rater label for a positive case: rater {rater} left out of the vote",
      )
      continue
    if not mask.any() and any(other.any() for _, _, other in raters):
      report.note(
          str(label_path), f"all-zero rater label: rater {rater} marked no blood, others did"
      )
    voting.append(mask)
  if not voting:
    report.skip(
        str(case.image_path),
        "all-zero label for a positive case: the CSV lists blood, every rater's mask is empty",
    )
    return None

  merged = merge_raters(voting)
  ml = clinical.hematoma_ml(merged, volume)
  hematoma_ml = np.asarray([ml[name] for name in uem_ich_jax.SUBTYPES], dtype=np.float32)

  tilt = volume.provenance.gantry_tilt_deg
  if abs(tilt) >= TILT_TOLERANCE_DEG:
    corrected = ct.correct_tilt(volume)
    merged = ct.resample_mask(merged, volume, corrected)
    volume = corrected
    report.note(str(case.image_path), f"gantry tilt corrected: {tilt:.2f} degrees")

  slice_labels = slice_labels_from_mask(merged)
  mask_labels = slice_labels.max(axis=0)
  labels = mask_labels
  if csv_labels is not None:
    labels = csv_labels
    if not np.array_equal(csv_labels, mask_labels):
      report.note(
          str(case.image_path),
          f"CSV labels differ from the mask: CSV {csv_labels.tolist()},"
          f" mask {mask_labels.tolist()} (CSV kept as the scan labels)",
      )
  volume, merged = common.square_inplane(volume, merged, image_size)
  return ReadCase(volume, merged, slice_labels, labels, hematoma_ml, len(voting))


# ---------------------------------------------------------------------------
# Builder


def _configs() -> list[BhsdConfig]:
  return [
      BhsdConfig(
          name=SLICES,
          layout=SLICES,
          description="one example per slice of the voxel-labelled cases (BHSD, MBH-Seg 2025)",
      ),
      BhsdConfig(
          name=SCANS,
          layout=SCANS,
          description="one example per voxel-labelled case, with per-slice labels and volumes",
      ),
      BhsdConfig(
          name=CASE_SCANS,
          layout=CASE_SCANS,
          description="one example per MBH-Seg 2025 case-level volume, scan labels only",
      ),
  ]


class Bhsd(tfds.core.GeneratorBasedBuilder):
  """BHSD and MBH-Seg 2025: head CT with five-subtype hemorrhage masks and case labels."""

  name = "bhsd"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: slices, scans and case_scans."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = SLICES
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    text = tfds.features.Text()
    num_labels = len(uem_ich_jax.SLICE_LABELS)
    # Which release folder the case came from, and its BHSD dataset.json split
    # ("training", "test", or "" when dataset.json does not list it).
    provenance = {"source": text, "official_split": text}
    if config.layout == SLICES:
      features = common.slice_features(
          config.image_size, mask=True, extra={**provenance, "num_raters": np.int32}
      )
    elif config.layout == SCANS:
      features = common.scan_features(
          config.image_size,
          mask=True,
          extra={
              **provenance,
              "num_raters": np.int32,
              "slice_labels": tfds.features.Tensor(shape=(None, num_labels), dtype=np.uint8),
              # mL of blood per subtype in `uem_ich_jax.SUBTYPES` order, from the
              # merged mask on the native grid and the image's affine.
              "hematoma_ml": tfds.features.Tensor(
                  shape=(len(uem_ich_jax.SUBTYPES),), dtype=np.float32
              ),
          },
      )
    elif config.layout == CASE_SCANS:
      features = common.scan_features(
          config.image_size, mask=False, extra={"source": text, "in_csv": np.bool_}
      )
    else:
      raise ValueError(
          f"unknown layout {config.layout!r}; expected {SLICES!r}, {SCANS!r} or {CASE_SCANS!r}"
      )
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
        homepage="https://github.com/White65534/BHSD",
    )

  @staticmethod
  def missing_config_source(manual_dir: pathlib.Path, config_name: str) -> str | None:
    """Return why config `config_name` has no input folder in `manual_dir`, or None.

    `uem-ich build-dataset` skips such a config when no config is named,
    because a release without the case-level set (or without voxel labels)
    is complete as downloaded.
    """
    if config_name == CASE_SCANS:
      if not (manual_dir / MBH_CASE_LEVEL).is_dir():
        return f"no {MBH_CASE_LEVEL}/ folder in {manual_dir}"
      return None
    voxel_folders = [BHSD_FOLDER, MBH_TRAIN_VOXEL, *MBH_VAL_VOXEL]
    if not any((manual_dir / folder).is_dir() for folder in voxel_folders):
      return f"none of {', '.join(folder + '/' for folder in voxel_folders)} in {manual_dir}"
    return None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    if not manual_dir.is_dir():
      raise common.ReleaseNotFoundError(
          f"manual folder {manual_dir} not found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    report = common.BuildReport(self.name)
    case_labels = read_all_case_labels(manual_dir, report)
    # Both plans are listed in every config (file names only, no pixels), so
    # that a patient gets the same fold in slices, scans and case_scans.
    voxel_plan = find_voxel_cases(manual_dir, report)
    case_plan = find_case_level_scans(manual_dir, case_labels, report)
    if not voxel_plan and not case_plan:
      raise common.ReleaseNotFoundError(
          f"{manual_dir}: no BHSD or MBH-Seg 2025 case found (looked for {BHSD_FOLDER}/,"
          f" {MBH_TRAIN_VOXEL}/, {' or '.join(MBH_VAL_VOXEL)}/ and {MBH_CASE_LEVEL}/)"
      )
    folds = self._folds(
        [case.patient_id for case in voxel_plan] + [scan.patient_id for scan in case_plan]
    )
    if self.builder_config.layout == CASE_SCANS:
      return {"train": self._generate_examples(case_plan, folds, report)}

    release = read_release_info(manual_dir)
    self.info.metadata["class_map"] = {str(k): v for k, v in sorted(release.class_map.items())}
    self.info.metadata["class_map_source"] = release.class_map_source
    # Background and the five subtype ids: the multi-task stage checks its head against this.
    self.info.metadata["num_mask_classes"] = 6
    return {"train": self._generate_examples(voxel_plan, folds, report, release, case_labels)}

  def _folds(self, patients: Iterable[str]) -> dict[str, int]:
    # Folds come from every case found, before reading, so a file that fails
    # to read does not move other patients to other folds.
    config = self.builder_config
    return common.patient_folds(patients, config.num_folds, config.seed)

  def _finish(self, folds: list[int], report: common.BuildReport) -> None:
    common.store_build_metadata(
        self.info.metadata, num_folds=self.builder_config.num_folds, folds=folds, report=report
    )

  def _generate_examples(
      self,
      plan: list,
      fold_of: dict[str, int],
      report: common.BuildReport,
      release: ReleaseInfo | None = None,
      case_labels: CaseLabels | None = None,
  ) -> Iterator[tuple[int, dict]]:
    if self.builder_config.layout == CASE_SCANS:
      return self._generate_case_level(plan, fold_of, report)
    return self._generate_voxel(plan, fold_of, release, case_labels, report)

  def _generate_voxel(
      self,
      plan: list[VoxelCase],
      fold_of: dict[str, int],
      release: ReleaseInfo,
      case_labels: CaseLabels,
      report: common.BuildReport,
  ) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    lookup = class_lookup(release.class_map)
    written_folds: list[int] = []
    for case in plan:
      if case.case_id in case_labels.rejected:
        report.skip(
            str(case.image_path), f"unusable row in {CASE_CSV_NAME}: case left out"
        )
        continue
      read = read_voxel_case(
          case, lookup, case_labels.labels.get(case.case_id), config.image_size, report
      )
      if read is None:
        continue
      fold = fold_of[case.patient_id]
      common_fields = {
          "spacing": np.asarray(read.volume.spacing, np.float32),
          "affine": np.asarray(read.volume.affine, np.float32),
          "scan_id": case.case_id,
          "patient_id": case.patient_id,
          "fold": fold,
          "source": case.source,
          "official_split": release.official_split.get(case.case_id, ""),
          "num_raters": read.num_raters,
      }
      image = ct.windows_uint8(read.volume.hu)
      if config.layout == SCANS:
        written_folds.append(fold)
        yield len(written_folds) - 1, {
            **common_fields,
            "image": image,
            "mask": read.mask,
            "labels": read.labels,
            "slice_labels": read.slice_labels,
            "hematoma_ml": read.hematoma_ml,
        }
        continue
      for slice_index in range(image.shape[0]):
        written_folds.append(fold)
        yield len(written_folds) - 1, {
            **common_fields,
            "image": image[slice_index],
            "mask": read.mask[slice_index],
            "labels": read.slice_labels[slice_index],
            "slice_index": slice_index,
        }
    self._finish(written_folds, report)

  def _generate_case_level(
      self, plan: list[CaseLevelScan], fold_of: dict[str, int], report: common.BuildReport
  ) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    written_folds: list[int] = []
    for scan in plan:
      try:
        volume = ct.read_nifti(scan.image_path)
      except ct.CTReadError as error:
        report.skip(str(scan.image_path), f"unreadable image: {error}")
        continue
      note_non_finite(volume, scan.image_path, report)
      tilt = volume.provenance.gantry_tilt_deg
      if abs(tilt) >= TILT_TOLERANCE_DEG:
        volume = ct.correct_tilt(volume)
        report.note(str(scan.image_path), f"gantry tilt corrected: {tilt:.2f} degrees")
      volume, _ = common.square_inplane(volume, None, config.image_size)
      fold = fold_of[scan.patient_id]
      written_folds.append(fold)
      yield len(written_folds) - 1, {
          "image": ct.windows_uint8(volume.hu),
          "labels": scan.labels,
          "spacing": np.asarray(volume.spacing, np.float32),
          "affine": np.asarray(volume.affine, np.float32),
          "scan_id": scan.case_id,
          "patient_id": scan.patient_id,
          "fold": fold,
          "source": SOURCE_MBH_CASE,
          "in_csv": scan.in_csv,
      }
    self._finish(written_folds, report)
