"""The `physionet_ct_ich` TFDS builder: PhysioNet CT-ICH 1.3.1 (75 head CT scans, NIfTI).

The release ("Computed Tomography Images for Intracranial Hemorrhage Detection
and Segmentation") has one NIfTI CT per patient in `ct_scans/NNN.nii`, a
binary hemorrhage mask per scan in `masks/NNN.nii`, slice labels in
`hemorrhage_diagnosis_raw_ct.csv` and age and gender in
`Patient_demographics.csv`. Patient numbers run 049..130 without 059..065.

Reading rules, where the release does not pin them down:
  - SliceNumber in the CSV counts from 1 along the stored NIfTI z axis (the
    third array axis as nibabel reads it). The builder maps it through the
    file's affine to the slice order of `uem_ich_jax.ct.read_nifti` (inferior
    to superior), and leaves out a scan whose SliceNumbers are not exactly
    1..N for its N stored slices, naming the file and the numbers.
  - `any` is 1 - No_Hemorrhage. A slice where that disagrees with the five
    subtype columns is kept and reported.
  - Masks are binary (no subtype): every stored value above 0 is blood. The
    stored value sets are recorded in the metadata (`mask_value_sets`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import math
import pathlib
import re
from collections.abc import Iterator

import nibabel
import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.ct.nifti import LPS_TO_RAS
from uem_ich_jax.datasets import common
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

NAME = "physionet_ct_ich"
SLICES = "slices"
SCANS = "scans"

DIAGNOSIS_CSV = "hemorrhage_diagnosis_raw_ct.csv"
DEMOGRAPHICS_CSV = "Patient_demographics.csv"
CT_FOLDER = "ct_scans"
MASK_FOLDER = "masks"

# Subtype columns of the diagnosis CSV and the project's names for them.
SUBTYPE_COLUMNS = {
    "Epidural": "epidural",
    "Intraparenchymal": "intraparenchymal",
    "Intraventricular": "intraventricular",
    "Subarachnoid": "subarachnoid",
    "Subdural": "subdural",
}
NO_HEMORRHAGE_COLUMN = "No_Hemorrhage"
FRACTURE_COLUMN = "Fracture_Yes_No"
REQUIRED_COLUMNS = ("PatientNumber", "SliceNumber", *SUBTYPE_COLUMNS, NO_HEMORRHAGE_COLUMN,
                    FRACTURE_COLUMN)

# Subtype abbreviations in the demographics file's second header row.
DEMOGRAPHICS_SUBTYPES = {
    "EDH": "epidural",
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SAH": "subarachnoid",
    "SDH": "subdural",
}

# Scan and mask files: the patient number, zero-padded to 3 digits in the
# release; other paddings and gzip are accepted.
SCAN_FILE_PATTERN = re.compile(r"^(\d+)\.nii(\.gz)?$", re.IGNORECASE)

# Tolerance on the voxel-index map between the stored file and the read
# volume, which is a signed permutation up to float32 rounding of the affine.
_INDEX_MAP_TOLERANCE = 1e-3

# Tolerance (mm) between the CT and mask affines for reading the mask on its own.
_MASK_AFFINE_TOLERANCE = 1e-3

_DESCRIPTION = """\
PhysioNet CT-ICH 1.3.1: 75 non-contrast head CT scans (82 patients collected,
numbers 049..130 without 059..065 released) with per-slice labels (any,
epidural, intraparenchymal, intraventricular, subarachnoid, subdural, and
skull fracture) and a binary hemorrhage mask per slice (0/1, not BHSD class
ids). Images are the brain, subdural and bone windows, padded to a square and
resized to the config's image_size. Every example carries a patient-level
`fold`; train on folds != k and evaluate on fold k.
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download "Computed Tomography Images for Intracranial Hemorrhage Detection and
Segmentation" version 1.3.1 from PhysioNet
(https://physionet.org/content/ct-ich/1.3.1/). PhysioNet lists 1.3.1 as
restricted access: sign in and accept the data use agreement and licence shown
on that page. Extract the zip into the manual dir. The manual dir must then contain, directly
or inside the one extracted release folder:

  ct_scans/049.nii ... ct_scans/130.nii     CT volumes (uncompressed NIfTI)
  masks/049.nii ... masks/130.nii           hemorrhage masks, same names
  hemorrhage_diagnosis_raw_ct.csv           slice labels
  Patient_demographics.csv                  age and gender (optional)

Then run: uem-ich build-dataset physionet_ct_ich --manual-dir=DIR --data-dir=OUT
"""


class ReleaseLayoutError(InputError):
  """The manual dir does not contain a readable PhysioNet CT-ICH release."""


class SliceNumberError(InputError):
  """The CSV's SliceNumbers for a scan do not fit its stored slices."""


@dataclasses.dataclass
class PhysionetCtIchConfig(tfds.core.BuilderConfig):
  """Layout and size of one `physionet_ct_ich` build.

  Attributes:
    layout: `slices` (one example per slice) or `scans` (one per scan).
    image_size: rows and columns of every stored slice, in pixels; slices are
      padded to a square before resizing, so the aspect ratio is kept.
    num_folds: number of patient-level folds.
    seed: seed of the fold assignment (`common.patient_folds`).
  """

  layout: str = SLICES
  image_size: int = 384
  num_folds: int = 5
  seed: int = 0


# ---------------------------------------------------------------------------
# Release files


def find_release_root(manual_dir: str | pathlib.Path) -> pathlib.Path:
  """Return the folder holding `ct_scans/`: the manual dir or one folder below it.

  Raises:
    common.ReleaseNotFoundError: no such folder.
    ReleaseLayoutError: more than one such folder below the manual dir.
  """
  manual_dir = pathlib.Path(manual_dir)
  if (manual_dir / CT_FOLDER).is_dir():
    return manual_dir
  found = sorted(path.parent for path in manual_dir.glob(f"*/{CT_FOLDER}") if path.is_dir())
  if len(found) == 1:
    return found[0]
  if found:
    names = ", ".join(str(path) for path in found)
    raise ReleaseLayoutError(
        f"{manual_dir} contains several releases ({names}); pass one of them as the manual dir"
    )
  raise common.ReleaseNotFoundError(
      f"no {CT_FOLDER}/ folder in the manual dir {manual_dir} or in a folder directly below it."
      f"\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
  )


def list_scan_files(folder: pathlib.Path, report: common.BuildReport) -> dict[int, pathlib.Path]:
  """Map patient number to file for `NNN.nii` files; report other names and duplicates."""
  by_number: dict[int, list[pathlib.Path]] = collections.defaultdict(list)
  if not folder.is_dir():
    return {}
  for path in sorted(folder.iterdir()):
    match = SCAN_FILE_PATTERN.match(path.name)
    if match is None or not path.is_file():
      report.skip(path, "unexpected file name: expected the patient number, as in 049.nii")
      continue
    by_number[int(match.group(1))].append(path)
  files = {}
  for number, paths in sorted(by_number.items()):
    if len(paths) > 1:
      names = ", ".join(path.name for path in paths)
      for path in paths:
        report.skip(path, f"several files for one patient: {names}")
      continue
    files[number] = paths[0]
  return files


# ---------------------------------------------------------------------------
# Slice labels (hemorrhage_diagnosis_raw_ct.csv)


@dataclasses.dataclass(frozen=True)
class SliceRow:
  """One CSV row: labels in `uem_ich_jax.SLICE_LABELS` order and the fracture flag."""

  labels: tuple[int, ...]
  fracture: int
  # True when No_Hemorrhage does not equal "none of the five subtypes".
  any_disagrees: bool


@dataclasses.dataclass
class PatientLabels:
  """The CSV rows of one patient, keyed by SliceNumber, and what is wrong with them."""

  rows: dict[int, SliceRow] = dataclasses.field(default_factory=dict)
  problems: list[str] = dataclasses.field(default_factory=list)


def _parse_integer(text: str) -> int:
  """Parse an integer written as `12`, ` 12 ` or `12.0`; raise ValueError otherwise."""
  text = text.strip()
  try:
    return int(text)
  except ValueError:
    value = float(text)
    if not value.is_integer():
      raise ValueError(f"{text!r} is not an integer") from None
    return int(value)


def _parse_flag(text: str, column: str) -> int:
  value = _parse_integer(text)
  if value not in (0, 1):
    raise ValueError(f"{column} is {text.strip()!r}, expected 0 or 1")
  return value


def _parse_slice_row(row: dict[str, str]) -> SliceRow:
  subtypes = {name: _parse_flag(row[column], column) for column, name in SUBTYPE_COLUMNS.items()}
  no_hemorrhage = _parse_flag(row[NO_HEMORRHAGE_COLUMN], NO_HEMORRHAGE_COLUMN)
  fracture = _parse_flag(row[FRACTURE_COLUMN], FRACTURE_COLUMN)
  any_label = 1 - no_hemorrhage
  labels = (any_label, *(subtypes[name] for name in uem_ich_jax.SUBTYPES))
  return SliceRow(labels, fracture, any_disagrees=any_label != max(subtypes.values()))


def read_diagnosis_csv(path: pathlib.Path, report: common.BuildReport) -> dict[int, PatientLabels]:
  """Read the slice labels per patient number.

  The file is read as `utf-8-sig`, so a byte order mark before the first
  header field is dropped, and header names are compared without surrounding
  spaces. A row whose PatientNumber cannot be read is reported and dropped
  (the patient's slice count check then fails). Other invalid values, and a
  SliceNumber listed twice with different values, are recorded as problems of
  the patient. A repeated identical row is reported and read once.

  Raises:
    ReleaseLayoutError: the header lacks a required column.
  """
  patients: dict[int, PatientLabels] = collections.defaultdict(PatientLabels)
  with open(path, newline="", encoding="utf-8-sig") as file:
    reader = csv.reader(file)
    header = [name.strip() for name in next(reader, [])]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
      raise ReleaseLayoutError(
          f"{path}: header {header} lacks the columns {missing}; expected {list(REQUIRED_COLUMNS)}"
      )
    for line, values in enumerate(reader, start=2):
      if not any(value.strip() for value in values):
        continue
      row = dict(zip(header, values))
      try:
        number = _parse_integer(row.get("PatientNumber", ""))
      except ValueError:
        patient = row.get("PatientNumber")
        report.skip(f"{path}:{line}", f"invalid CSV row: PatientNumber {patient!r}")
        continue
      labels = patients[number]
      try:
        if len(values) != len(header):
          raise ValueError(f"{len(values)} fields, the header has {len(header)}")
        slice_number = _parse_integer(row["SliceNumber"])
        parsed = _parse_slice_row(row)
      except ValueError as error:
        labels.problems.append(f"line {line}: {error}")
        continue
      previous = labels.rows.get(slice_number)
      if previous is None:
        labels.rows[slice_number] = parsed
      elif previous == parsed:
        report.note(f"{path}:{line}", f"repeated CSV row: patient {number} slice {slice_number}")
      else:
        labels.problems.append(f"line {line}: SliceNumber {slice_number} listed twice with "
                               "different labels")
  return dict(patients)


def describe_numbers(numbers: list[int]) -> str:
  """Write sorted integers as ranges, for example `1-12, 14`."""
  parts = []
  for number in numbers:
    if parts and number == parts[-1][1] + 1:
      parts[-1][1] = number
    else:
      parts.append([number, number])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def check_slice_numbers(slice_numbers: list[int], num_slices: int, ct_path: pathlib.Path) -> None:
  """Raise SliceNumberError unless the SliceNumbers are exactly 1..num_slices."""
  # NOTE: counting from 1 is inferred from public loaders of the release, not
  # checked on its files. A 0-based CSV makes every scan fail here, loudly.
  numbers = sorted(slice_numbers)
  if numbers == list(range(1, num_slices + 1)):
    return
  hint = ""
  if numbers == list(range(num_slices)):
    hint = "; they look 0-based, but this builder reads SliceNumber as counting from 1"
  raise SliceNumberError(
      f"{DIAGNOSIS_CSV} lists SliceNumber {describe_numbers(numbers) or 'none'} for {ct_path},"
      f" which has {num_slices} slices; expected 1-{num_slices}{hint}"
  )


# ---------------------------------------------------------------------------
# Demographics (Patient_demographics.csv)


@dataclasses.dataclass(frozen=True)
class Demographics:
  """Age (NaN when missing), gender as written, and the marked subtypes of one patient."""

  age_years: float
  gender: str
  subtypes: frozenset[str]


def read_demographics(path: pathlib.Path, report: common.BuildReport) -> dict[int, Demographics]:
  """Read age, gender and the marked subtypes per patient number.

  The file has two header rows. The first names the columns, and the age
  column's name contains a newline. The second gives the subtype abbreviations
  (IVH, IPH, SAH, EDH, SDH) under "Hemorrhage type ...". A subtype cell counts
  as marked when it is neither empty nor 0. Rows without a patient number are
  skipped.
  """
  with open(path, newline="", encoding="utf-8-sig") as file:
    rows = list(csv.reader(file))
  if len(rows) < 2:
    report.note(path, "invalid demographics file: fewer than two header rows,"
                " so age and gender are left empty")
    return {}
  header = [" ".join(name.split()).lower() for name in rows[0]]
  subheader = [name.strip().upper() for name in rows[1]]

  def column(prefix: str) -> int | None:
    return next((i for i, name in enumerate(header) if name.startswith(prefix)), None)

  number_column = column("patient number")
  age_column = column("age")
  gender_column = column("gender")
  if number_column is None:
    report.note(path, f"invalid demographics file: no Patient Number column in {rows[0]}")
    return {}
  subtype_columns = {
      DEMOGRAPHICS_SUBTYPES[name]: i
      for i, name in enumerate(subheader)
      if name in DEMOGRAPHICS_SUBTYPES
  }
  result = {}
  for values in rows[1:]:
    cells = values + [""] * (len(header) - len(values))
    try:
      number = _parse_integer(cells[number_column])
    except ValueError:
      continue
    age = math.nan
    if age_column is not None:
      try:
        age = float(cells[age_column])
      except ValueError:
        pass
    gender = cells[gender_column].strip() if gender_column is not None else ""
    marked = frozenset(
        name for name, i in subtype_columns.items() if cells[i].strip() not in ("", "0")
    )
    result[number] = Demographics(age, gender, marked)
  return result


# ---------------------------------------------------------------------------
# Scans and masks


def stored_slice_indices(path: pathlib.Path, volume: ct.CTVolume) -> np.ndarray:
  """Return, for each stored z index k of the NIfTI file, the slice index it has in `volume`.

  `ct.read_nifti` reorients the stored array by permuting and flipping axes.
  The map from stored voxel indices to volume indices is
  inv(volume affine) . (RAS to LPS) . (file affine), a signed permutation;
  its third column gives where stored slice k went.

  Raises:
    ct.CTReadError: the stored z axis did not become the slice axis, so the
      CSV's SliceNumbers cannot be placed on slices.
  """
  image = nibabel.load(str(path))
  to_volume = np.linalg.inv(volume.affine) @ LPS_TO_RAS @ np.asarray(image.affine, np.float64)
  z_step = to_volume[:3, 2]
  inplane_to_slice = to_volume[0, :2]
  if (abs(abs(z_step[0]) - 1) > _INDEX_MAP_TOLERANCE
      or np.any(np.abs(z_step[1:]) > _INDEX_MAP_TOLERANCE)
      or np.any(np.abs(inplane_to_slice) > _INDEX_MAP_TOLERANCE)):
    codes = "".join(nibabel.orientations.aff2axcodes(image.affine))
    raise ct.CTReadError(
        f"{path}: the stored z axis is not the axial slice axis (voxel axes {codes}),"
        f" so {DIAGNOSIS_CSV}'s SliceNumber cannot be matched to slices"
    )
  num_stored = int(image.shape[2])
  indices = np.rint(z_step[0] * np.arange(num_stored) + to_volume[0, 3]).astype(np.int64)
  if sorted(indices.tolist()) != list(range(volume.num_slices)):
    raise ct.CTReadError(
        f"{path}: stored slices map to volume slices {indices.tolist()},"
        f" not to 0..{volume.num_slices - 1}"
    )
  return indices


@dataclasses.dataclass(frozen=True)
class BinaryMask:
  """A 0/1 mask in the volume's slice order, the values stored in the file, and how it was read."""

  mask: np.ndarray
  stored_values: tuple[float, ...]
  # Set when the mask's affine differs from the CT's and the mask was read on
  # the CT's voxel grid instead.
  geometry_note: str | None = None


def read_binary_mask(
    mask_path: pathlib.Path, ct_path: pathlib.Path, volume: ct.CTVolume
) -> BinaryMask:
  """Read a mask NIfTI and binarise it (stored value > 0 is blood).

  The mask is read through `ct.read_nifti` with its own affine, so a mask
  that stores the CT's grid in another axis order or direction comes out on
  the CT's grid. When its canonical affine still differs from the CT's, it is
  read again with `ct.read_nifti_pair`, which puts it on the CT's voxel grid
  (its shape in the file must equal the CT's) and accepts only 0/1, 0/255 or
  class ids 0..5; the difference is returned as a note.

  Raises:
    ct.CTReadError: the mask cannot be read, or it is on another grid and its
      shape in the file differs from the CT's.
  """
  # TODO: a mask whose own geometry read_nifti rejects (for example zero
  # pixdim) is left out, although read_nifti_pair could read it on the CT grid.
  mask_volume = ct.read_nifti(mask_path)
  stored_values = tuple(float(value) for value in np.unique(mask_volume.hu))
  same_grid = mask_volume.shape == volume.shape and np.allclose(
      mask_volume.affine, volume.affine, atol=_MASK_AFFINE_TOLERANCE
  )
  if same_grid:
    return BinaryMask((mask_volume.hu > 0).astype(np.uint8), stored_values)
  _, mask = ct.read_nifti_pair(ct_path, mask_path)
  difference = "shape" if mask_volume.shape != volume.shape else "affine"
  note = f"mask {difference} differs from the CT's: mask read on the CT's voxel grid"
  return BinaryMask((mask > 0).astype(np.uint8), stored_values, note)


def format_values(values: tuple[float, ...]) -> str:
  """Write a value set as `0,255` (integers without a decimal point)."""
  return ",".join(f"{value:g}" for value in values)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A patient whose CT, mask and CSV rows are all present, ready to be read."""

  number: int
  ct_path: pathlib.Path
  mask_path: pathlib.Path
  labels: PatientLabels
  demographics: Demographics | None

  @property
  def patient_id(self) -> str:
    return f"{self.number:03d}"


@dataclasses.dataclass(frozen=True)
class ProcessedScan:
  """One scan ready to store, in the volume's slice order (inferior to superior)."""

  image: np.ndarray
  mask: np.ndarray
  slice_labels: np.ndarray
  slice_fracture: np.ndarray
  slice_numbers: np.ndarray
  spacing: np.ndarray
  affine: np.ndarray
  mask_values: tuple[float, ...]


def read_scan(candidate: Candidate, image_size: int, report: common.BuildReport) -> ProcessedScan:
  """Read, label and window one scan; odd but usable findings go to `report` as notes.

  Raises:
    InputError: the CT or mask cannot be read, or the SliceNumbers do not fit.
  """
  volume = ct.read_nifti(candidate.ct_path)
  if volume.provenance.non_finite_voxels:
    report.note(
        candidate.ct_path,
        f"non-finite voxels set to air: {volume.provenance.non_finite_voxels}",
    )
  volume_index = stored_slice_indices(candidate.ct_path, volume)
  rows = candidate.labels.rows
  check_slice_numbers(list(rows), len(volume_index), candidate.ct_path)

  num_slices = volume.num_slices
  slice_labels = np.zeros((num_slices, len(uem_ich_jax.SLICE_LABELS)), np.uint8)
  slice_fracture = np.zeros(num_slices, np.uint8)
  slice_numbers = np.zeros(num_slices, np.int32)
  for stored_index, index in enumerate(volume_index):
    row = rows[stored_index + 1]
    slice_labels[index] = row.labels
    slice_fracture[index] = row.fracture
    slice_numbers[index] = stored_index + 1

  binary = read_binary_mask(candidate.mask_path, candidate.ct_path, volume)
  _note_inconsistencies(candidate, binary, slice_labels, slice_numbers, report)

  volume, mask = common.square_inplane(volume, binary.mask, image_size)
  return ProcessedScan(
      image=ct.windows_uint8(volume.hu),
      mask=mask,
      slice_labels=slice_labels,
      slice_fracture=slice_fracture,
      slice_numbers=slice_numbers,
      spacing=np.asarray(volume.spacing, np.float32),
      affine=np.asarray(volume.affine, np.float32),
      mask_values=binary.stored_values,
  )


def _note_inconsistencies(
    candidate: Candidate,
    binary: BinaryMask,
    slice_labels: np.ndarray,
    slice_numbers: np.ndarray,
    report: common.BuildReport,
) -> None:
  """Report kept scans whose labels, mask or demographics disagree."""
  disagreeing = sorted(n for n, row in candidate.labels.rows.items() if row.any_disagrees)
  if disagreeing:
    report.note(candidate.ct_path, "No_Hemorrhage disagrees with the subtypes: SliceNumber "
                f"{describe_numbers(disagreeing)} (any = 1 - No_Hemorrhage kept)")
  if binary.geometry_note:
    report.note(candidate.mask_path, binary.geometry_note)
  values = set(binary.stored_values)
  if not (values <= {0.0, 1.0} or values <= {0.0, 255.0}):
    report.note(candidate.mask_path, "unexpected mask values: stored "
                f"{{{format_values(binary.stored_values)}}}, binarised as value > 0")
  # Checked at full resolution, before resizing can erase small regions.
  mask_present = binary.mask.any(axis=(1, 2))
  labelled = slice_labels[:, 0] == 1
  mismatched = sorted(int(n) for n in slice_numbers[mask_present != labelled])
  if mismatched:
    report.note(candidate.mask_path, "mask and labels disagree: SliceNumber "
                f"{describe_numbers(mismatched)} (mask kept as stored)")
  demographics = candidate.demographics
  if demographics is not None:
    present = {name for name in uem_ich_jax.SUBTYPES
               if slice_labels[:, uem_ich_jax.SLICE_LABELS.index(name)].any()}
    if present != demographics.subtypes:
      report.note(candidate.ct_path, "demographics disagree with the slice labels: marked "
                  f"{sorted(demographics.subtypes)}, slices {sorted(present)}")


def find_candidates(
    manual_dir: str | pathlib.Path, report: common.BuildReport
) -> tuple[list[Candidate], list[int]]:
  """Match CT files, masks and CSV rows; return the readable patients and every number found.

  Patients missing a file or with invalid CSV rows are reported and left out.
  """
  root = find_release_root(manual_dir)
  diagnosis_path = common.find_file_ignoring_case(root, DIAGNOSIS_CSV)
  if diagnosis_path is None:
    raise common.ReleaseNotFoundError(
        f"{root} has no {DIAGNOSIS_CSV}\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  labels = read_diagnosis_csv(diagnosis_path, report)
  demographics_path = common.find_file_ignoring_case(root, DEMOGRAPHICS_CSV)
  demographics = {}
  if demographics_path is None:
    report.note(root / DEMOGRAPHICS_CSV, "missing demographics file: age and gender left empty")
  else:
    demographics = read_demographics(demographics_path, report)

  ct_files = list_scan_files(root / CT_FOLDER, report)
  mask_files = list_scan_files(root / MASK_FOLDER, report)
  numbers = sorted(set(labels) | set(ct_files))
  candidates = []
  for number in numbers:
    ct_path = ct_files.get(number)
    mask_path = mask_files.get(number)
    if ct_path is None:
      report.skip(root / CT_FOLDER / f"{number:03d}.nii",
                  f"missing CT file: patient {number} has rows in {DIAGNOSIS_CSV}")
    elif number not in labels:
      report.skip(ct_path, f"no slice labels: patient {number} has no rows in {DIAGNOSIS_CSV}")
    elif labels[number].problems:
      report.skip(diagnosis_path, f"invalid slice labels: patient {number}: "
                  + "; ".join(labels[number].problems))
    elif mask_path is None:
      report.skip(root / MASK_FOLDER / ct_path.name, f"missing mask: no mask for {ct_path}")
    else:
      candidates.append(
          Candidate(number, ct_path, mask_path, labels[number], demographics.get(number)))
  for number in sorted(set(mask_files) - set(ct_files)):
    report.skip(mask_files[number], "mask without a CT file")
  return candidates, numbers


# ---------------------------------------------------------------------------
# Builder


class PhysionetCtIch(tfds.core.GeneratorBasedBuilder):
  """PhysioNet CT-ICH 1.3.1: 75 head CT scans with slice labels and binary hemorrhage masks."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: slices and scans layouts, patient folds."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      PhysionetCtIchConfig(name=SLICES, layout=SLICES,
                           description="one example per slice, 384 px"),
      PhysionetCtIchConfig(name=SCANS, layout=SCANS,
                           description="one example per scan, 384 px"),
  ]
  DEFAULT_CONFIG_NAME = SLICES

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    demographics = {"age_years": np.float32, "gender": tfds.features.Text()}
    if config.layout == SLICES:
      features = common.slice_features(config.image_size, mask=True, extra={
          # Skull fracture on this slice (Fracture_Yes_No).
          "fracture": np.uint8,
          # The CSV's SliceNumber: stored NIfTI z index + 1.
          "slice_number": np.int32,
          **demographics,
      })
    elif config.layout == SCANS:
      features = common.scan_features(config.image_size, mask=True, extra={
          "slice_labels": tfds.features.Tensor(
              shape=(None, len(uem_ich_jax.SLICE_LABELS)), dtype=np.uint8),
          "fracture": np.uint8,
          "slice_fracture": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
          "slice_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          **demographics,
      })
    else:
      raise ValueError(f"unknown layout {config.layout!r}; expected {SLICES!r} or {SCANS!r}")
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        homepage="https://physionet.org/content/ct-ich/1.3.1/",
        # Example i of the split is key i, so the fold ranges in the metadata
        # index the data source directly.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    report = common.BuildReport(NAME)
    candidates, patient_numbers = find_candidates(dl_manager.manual_dir, report)
    # Folds over every patient found, so a broken file moves no other patient.
    # TODO: the upstream stratified its 3 PhysioNet folds on the 7 labels
    # (iterstrat, seed 966); these folds are balanced by patient count only.
    folds = common.patient_folds(
        [f"{number:03d}" for number in patient_numbers],
        self.builder_config.num_folds,
        self.builder_config.seed,
    )
    return {"train": self._generate_examples(candidates, folds, report)}

  def _generate_examples(
      self, candidates: list[Candidate], folds: dict[str, int], report: common.BuildReport
  ) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    example_folds = []
    mask_value_sets = collections.Counter()
    for candidate in candidates:
      try:
        scan = read_scan(candidate, config.image_size, report)
      except InputError as error:
        reason = "unreadable scan"
        if isinstance(error, SliceNumberError):
          reason = "slice numbers do not fit"
        report.skip(candidate.ct_path, f"{reason}: {error}")
        continue
      mask_value_sets[format_values(scan.mask_values)] += 1
      fold = folds[candidate.patient_id]
      for key, example in self._examples(candidate, scan, fold, start=len(example_folds)):
        example_folds.append(fold)
        yield key, example

    # Written with the dataset info once all examples are generated, so the
    # ranges and counts describe what was stored.
    self.info.metadata["mask_value_sets"] = dict(mask_value_sets)
    # Background and blood: the multi-task stage checks its head against this.
    self.info.metadata["num_mask_classes"] = 2
    logger.info("%s: stored mask value sets (values: scans): %s", NAME, dict(mask_value_sets))
    common.store_build_metadata(
        self.info.metadata, num_folds=config.num_folds, folds=example_folds, report=report
    )

  def _examples(
      self, candidate: Candidate, scan: ProcessedScan, fold: int, start: int
  ) -> Iterator[tuple[int, dict]]:
    shared = {
        "spacing": scan.spacing,
        "affine": scan.affine,
        "scan_id": candidate.patient_id,
        "patient_id": candidate.patient_id,
        "fold": fold,
        "age_years": np.float32(candidate.demographics.age_years if candidate.demographics
                                else math.nan),
        "gender": candidate.demographics.gender if candidate.demographics else "",
    }
    if self.builder_config.layout == SCANS:
      yield start, {
          **shared,
          "image": scan.image,
          "mask": scan.mask,
          "labels": scan.slice_labels.max(axis=0),
          "slice_labels": scan.slice_labels,
          "fracture": np.uint8(scan.slice_fracture.max()),
          "slice_fracture": scan.slice_fracture,
          "slice_numbers": scan.slice_numbers,
      }
      return
    for index in range(len(scan.image)):
      yield start + index, {
          **shared,
          "image": scan.image[index],
          "mask": scan.mask[index],
          "labels": scan.slice_labels[index],
          "fracture": scan.slice_fracture[index],
          "slice_number": scan.slice_numbers[index],
          "slice_index": index,
      }
