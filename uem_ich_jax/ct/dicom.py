"""Reading a DICOM CT series into a `CTVolume`.

Slices are grouped by SeriesInstanceUID and sorted by their position along the
slice normal. HU are computed from the raw stored values, and the slice
spacing, gantry tilt and affine are measured from ImagePositionPatient and
ImageOrientationPatient, never from SliceThickness or GantryDetectorTilt.

Which files are read: every regular file under the folder, following
symbolic links to files and folders and visiting each folder once. A file
that fails to parse is skipped with a warning (logged and stored in
`Provenance.warnings`) when it looks like a DICOM file. It does when it has
the "DICM" prefix, or when it is not text and its name has no suffix, a
numeric suffix (UID-style names) or the suffix .dcm, .dicom, .dic or .ima.
Other files (README.txt, .DS_Store, .json, .nii) are ignored with a debug log.
Files without the 128-byte preamble and file meta information are read when
they parse as a DICOM image dataset anyway.

A file whose header, pixel data, rescale or geometry is invalid, and a
localizer image (ImageType LOCALIZER) inside the series, is skipped with a
warning, and the read fails only when no file of the series is left.
Differences between valid slices (image size, orientation, pixel spacing, two
images at one position) are errors, because no slice can be singled out as
the wrong one.

The reader's parts live in sibling modules: `dicom_files` (finding files and
grouping them by series from headers), `dicom_tags` (single header values),
`dicom_pixels` (pixel data to stored values and HU) and `dicom_geometry`
(slice geometry). This module reads whole series and re-exports their public
names.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from uem_ich_jax.ct.dicom_files import _MAX_REASONS, _candidate_files, _scan_headers
from uem_ich_jax.ct.dicom_geometry import (
    COLLINEAR_TOLERANCE_MM,
    DUPLICATE_TOLERANCE_MM,
    MAX_PIXEL_SPACING_MM,
    MAX_POSITION_MM,
    ORIENTATION_TOLERANCE,
    ORIENTATION_UNIT_TOLERANCE,
    ORTHOGONALITY_TOLERANCE,
    PIXEL_SPACING_TOLERANCE_RELATIVE,
    SPACING_TOLERANCE_MM,
    SPACING_TOLERANCE_RELATIVE,
    TILT_TOLERANCE_DEG,
    _check_same_grid,
    _drop_duplicates,
    _measure_stack,
    _pixel_spacing,
    _Slice,
    _slice_orientation,
    _slice_position,
    _StackGeometry,
)
from uem_ich_jax.ct.dicom_pixels import (
    MAX_ABS_HU,
    MAX_IMAGE_PIXELS,
    _MissingDecoderError,
    may_store_hu_modulo_4096,
    slice_hu,
    stored_values,
    unwrapped_slice_hu,
)
from uem_ich_jax.ct.dicom_tags import _first_number, _kernel, _tag_value
from uem_ich_jax.ct.volume import (
    MAX_VOXELS,
    CTReadError,
    CTVolume,
    Provenance,
    VolumeTooLargeError,
)

__all__ = [
    "COLLINEAR_TOLERANCE_MM",
    "DUPLICATE_TOLERANCE_MM",
    "MAX_ABS_HU",
    "MAX_IMAGE_PIXELS",
    "MAX_VOXELS",
    "MAX_PIXEL_SPACING_MM",
    "MAX_POSITION_MM",
    "ORIENTATION_TOLERANCE",
    "ORIENTATION_UNIT_TOLERANCE",
    "ORTHOGONALITY_TOLERANCE",
    "PIXEL_SPACING_TOLERANCE_RELATIVE",
    "SPACING_TOLERANCE_MM",
    "SPACING_TOLERANCE_RELATIVE",
    "TILT_TOLERANCE_DEG",
    "DicomSeries",
    "list_dicom_series",
    "read_dicom_files",
    "read_dicom_series",
    "slice_hu",
    "stored_values",
    "unwrapped_slice_hu",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DicomSeries:
  """One series found in a folder, from headers only.

  Attributes:
    series_uid: SeriesInstanceUID ("" when the files have none).
    description: SeriesDescription of the first file.
    modality: Modality of the first file.
    files: the series' image files, sorted by path (not by position).
  """

  series_uid: str
  description: str
  modality: str
  files: tuple[pathlib.Path, ...]

  @property
  def num_files(self) -> int:
    return len(self.files)


def _series_from_group(uid: str, members: list[tuple[pathlib.Path, Dataset]]) -> DicomSeries:
  first = members[0][1]
  return DicomSeries(
      series_uid=uid,
      description=str(first.get("SeriesDescription", "")),
      modality=str(first.get("Modality", "")),
      files=tuple(path for path, _ in members),
  )


def list_dicom_series(folder: str | pathlib.Path) -> list[DicomSeries]:
  """List the image series under `folder` (searched recursively).

  Only headers are read (no pixel data), so this is cheap enough to regroup a
  flat folder of single-slice files such as the RSNA release. Non-DICOM files
  are ignored and damaged DICOM files are skipped with a warning.

  Returns:
    The series sorted by SeriesInstanceUID.
  """
  scan = _scan_headers(_candidate_files(pathlib.Path(folder)))
  return [_series_from_group(uid, scan.groups[uid]) for uid in sorted(scan.groups)]


def _describe_series(groups: dict[str, list[tuple[pathlib.Path, Dataset]]]) -> str:
  lines = []
  for uid in sorted(groups):
    series = _series_from_group(uid, groups[uid])
    lines.append(f"  {uid or '(no SeriesInstanceUID)'}: {series.description!r}, {series.num_files} files")
  return "\n".join(lines)


def _select_series(
    path: str,
    groups: dict[str, list[tuple[pathlib.Path, Dataset]]],
    series_uid: str | None,
) -> list[tuple[pathlib.Path, Dataset]]:
  if series_uid is not None:
    if series_uid not in groups:
      raise CTReadError(
          f"{path}: series {series_uid} not found; the series found are:\n"
          + _describe_series(groups)
      )
    return groups[series_uid]
  if len(groups) > 1:
    raise CTReadError(
        f"{path}: {len(groups)} series found; choose one with series_uid "
        "(--series on the command line):\n"
        + _describe_series(groups)
    )
  return next(iter(groups.values()))


def _localizer_image_type(dataset: Dataset, source: str) -> str | None:
  """Return ImageType as text when it marks a localizer (scout) image, else None."""
  value = _tag_value(dataset, "ImageType", source)
  if value is None:
    return None
  values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
  words = [str(item).strip().upper() for item in values]
  return "\\".join(words) if "LOCALIZER" in words else None


def _read_slice(path: pathlib.Path, unwrap_12bit: bool = False) -> _Slice:
  """Read one file's geometry and pixels, or raise CTReadError naming the file and the flaw.

  With `unwrap_12bit`, a slice that `may_store_hu_modulo_4096` flags is read
  with `unwrapped_slice_hu`.
  """
  source = str(path)
  try:
    # force=True also reads files without preamble, which the header scan accepted.
    dataset = pydicom.dcmread(path, force=True)
  except Exception as error:  # pylint: disable=broad-except
    # See `_scan_file`: pydicom has no single error type for damaged files.
    raise CTReadError(f"{path}: unreadable DICOM file ({error})") from error
  # A localizer is a projection image, so it has no place in the stack of slices.
  image_type = _localizer_image_type(dataset, source)
  if image_type is not None:
    raise CTReadError(f"{path}: localizer image (ImageType {image_type}), not an axial slice")
  position = _slice_position(dataset, source)
  orientation = _slice_orientation(dataset, source)
  pixel_spacing = _pixel_spacing(dataset, source)
  if unwrap_12bit and may_store_hu_modulo_4096(dataset, source):
    hu = unwrapped_slice_hu(dataset, source)
  else:
    hu = slice_hu(dataset, source)
  return _Slice(
      path=path, dataset=dataset, hu=hu, position=position, orientation=orientation,
      pixel_spacing=pixel_spacing,
  )


def _read_slices(
    label: str,
    members: Sequence[tuple[pathlib.Path, Dataset]],
    warnings: list[str],
    unwrap_12bit: bool = False,
) -> list[_Slice]:
  """Read every file of the series, skipping invalid ones with a warning.

  Raises:
    CTReadError: a file whose modality is not CT, compressed data without an
      installed decoder (every file would fail alike), or no valid file left.
  """
  slices = []
  errors = []
  for path, header in members:
    modality = str(header.get("Modality", ""))
    if modality != "CT":
      raise CTReadError(f"{path}: modality {modality or '(missing)'} is not CT")
    try:
      slices.append(_read_slice(path, unwrap_12bit))
    except _MissingDecoderError:
      raise
    except CTReadError as error:
      errors.append(str(error))
    except Exception as error:  # pylint: disable=broad-except
      # pydicom converts tag values lazily, and its errors vary by VR and version.
      # Such a file is skipped like any other invalid file.
      errors.append(f"{path}: cannot be read as a CT slice ({type(error).__name__}: {error})")

  if not slices:
    if len(errors) == 1:
      raise CTReadError(errors[0])
    raise CTReadError(
        f"{label}: none of the {len(members)} files of the series is a valid CT slice; "
        "first reasons:\n  " + "\n  ".join(errors[:_MAX_REASONS])
    )
  for error in errors:
    message = f"skipped {error}"
    logger.warning("%s", message)
    warnings.append(message)
  return slices


def read_dicom_series(
    path: str | pathlib.Path,
    *,
    series_uid: str | None = None,
    min_slices: int = 1,
    max_voxels: int | None = None,
    unwrap_12bit: bool = False,
) -> CTVolume:
  """Read one CT series from a folder (searched recursively) or a single file.

  Args:
    path: a folder or one DICOM file.
    series_uid: the SeriesInstanceUID to read when the folder contains several.
    min_slices: the fewest slices to accept. The default 1 reads a single
      file as a one-slice volume; pass 2 or more where a volume is needed.
    max_voxels: the largest series accepted, as the sum of Rows x Columns
      over its files, checked from headers before any pixel data is read.
      None means `MAX_VOXELS`.
    unwrap_12bit: read the slices that `may_store_hu_modulo_4096` flags
      with `unwrapped_slice_hu`, so that their negative HU (air) come back
      as HU from -1024 up to 3071 (for slope 1). False reads them as
      stored. Either way one warning per series counts them and names the
      first.

  Returns:
    The volume with slices in ascending position along the slice normal.

  Raises:
    CTReadError: no DICOM images (the message counts the files examined and
      gives the first reasons), several series and no `series_uid`, a non-CT
      modality, fewer than `min_slices` valid slices, valid slices that differ
      in image size, orientation or pixel spacing, different images at one
      position, compressed pixel data without an installed decoder, or a
      series larger than `max_voxels` (`VolumeTooLargeError`). A file that
      cannot be parsed, whose pixel data, rescale or geometry tags are
      invalid, or that is a localizer image (ImageType LOCALIZER), is skipped
      with a warning instead, unless no file of the series is valid.
  """
  path = pathlib.Path(path)
  return _read_volume(
      str(path),
      _candidate_files(path),
      series_uid=series_uid,
      min_slices=min_slices,
      single_file=path.is_file(),
      max_voxels=max_voxels,
      unwrap_12bit=unwrap_12bit,
  )


def read_dicom_files(
    files: Sequence[str | pathlib.Path],
    *,
    series_uid: str | None = None,
    min_slices: int = 1,
    max_voxels: int | None = None,
    unwrap_12bit: bool = False,
) -> CTVolume:
  """Read one CT series from a list of files, such as `DicomSeries.files`.

  This reads a series that `list_dicom_series` found in a large flat folder
  without scanning the folder again. Arguments, result and errors are those
  of `read_dicom_series`; in addition, every path must be a regular file.
  """
  paths = [pathlib.Path(file) for file in files]
  if not paths:
    raise CTReadError("read_dicom_files: the list of files is empty")
  folders = [path for path in paths if path.is_dir()]
  if folders:
    raise CTReadError(
        f"{folders[0]}: is a folder, not a file; read folders with read_dicom_series"
    )
  not_files = [path for path in paths if not path.is_file()]
  if not_files:
    reason = "not a regular file" if not_files[0].exists() else "no such file"
    raise CTReadError(
        f"{not_files[0]}: {reason} ({len(not_files)} of {len(paths)} paths are not files)"
    )
  label = f"{len(paths)} files in {paths[0].parent}"
  return _read_volume(
      label, paths, series_uid=series_uid, min_slices=min_slices, single_file=len(paths) == 1,
      max_voxels=max_voxels, unwrap_12bit=unwrap_12bit,
  )


def _read_volume(
    label: str,
    files: Sequence[pathlib.Path],
    *,
    series_uid: str | None,
    min_slices: int,
    single_file: bool,
    max_voxels: int | None,
    unwrap_12bit: bool,
) -> CTVolume:
  scan = _scan_headers(files)
  if not scan.groups:
    if single_file and scan.warnings:
      raise CTReadError(scan.warnings[0].removeprefix("skipped "))
    raise CTReadError(scan.describe_failure(label))
  members = _select_series(label, scan.groups, series_uid)
  _check_series_size(label, members, MAX_VOXELS if max_voxels is None else max_voxels)
  warnings = list(scan.warnings)
  slices = _read_slices(label, members, warnings, unwrap_12bit)
  _check_same_grid(slices)
  volume = _assemble(slices, warnings, unwrap_12bit)
  if volume.num_slices < min_slices:
    raise CTReadError(
        f"{label}: {volume.num_slices} valid slice(s), at least {min_slices} needed"
    )
  return volume


def _check_series_size(
    label: str, members: Sequence[tuple[pathlib.Path, Dataset]], max_voxels: int
) -> None:
  """Raise when the headers' Rows x Columns add up to more than `max_voxels`.

  This runs before any pixel data is read, so a folder of many large headers
  cannot make the reader allocate the volume. A file whose Rows or Columns is
  not an integer, or whose image exceeds `MAX_IMAGE_PIXELS`, counts as 0
  here, because the slice reader skips it with a warning.
  """
  total = 0
  for _, header in members:
    try:
      pixels = int(header.get("Rows") or 0) * int(header.get("Columns") or 0)
    except (TypeError, ValueError):
      continue
    if 0 < pixels <= MAX_IMAGE_PIXELS:
      total += pixels
  if total > max_voxels:
    raise VolumeTooLargeError(
        f"{label}: the {len(members)} files of the series have {total:,} voxels in all",
        total,
        max_voxels,
    )


def _wrap_warning(slices: Sequence[_Slice], unwrapped: bool) -> str | None:
  """Return a warning when slices are 12-bit unsigned with an intercept that cannot give air.

  `unwrapped` is True when `_read_slice` undid the wrap of those slices.
  """
  wrapped = [item for item in slices if may_store_hu_modulo_4096(item.dataset, str(item.path))]
  if not wrapped:
    return None
  intercept = _first_number(wrapped[0].dataset, "RescaleIntercept", str(wrapped[0].path))
  return (
      f"{len(wrapped)} of {len(slices)} slices (first {wrapped[0].path}) have BitsStored 12, "
      f"PixelRepresentation 0 and RescaleIntercept {intercept:g}, so they cannot store air. "
      "Their negative HU may be stored modulo 4096, as in the RSNA 2019 release. "
      + (
          "The wrap was undone: their stored values were read as HU from -1024 up to 3071 "
          "(for RescaleSlope 1)"
          if unwrapped
          else "They are read as stored, so wrapped air reads as +3072 HU or more"
      )
  )


def _assemble(slices: list[_Slice], warnings: list[str], unwrapped: bool = False) -> CTVolume:
  """Sort, deduplicate and measure the slices of one series (already on one grid).

  `unwrapped` is True when the slices were read with `unwrap_12bit`.
  """
  first = slices[0]
  source = str(first.path)
  row_cosine, column_cosine = first.orientation[:3], first.orientation[3:]
  normal = np.cross(row_cosine, column_cosine)
  normal /= float(np.linalg.norm(normal))
  pixel_spacing = first.pixel_spacing

  along = {id(item): float(item.position @ normal) for item in slices}
  slices = sorted(slices, key=lambda item: along[id(item)])
  slices = _drop_duplicates(slices, along, warnings)
  positions = np.stack([item.position for item in slices])
  wrap_warning = _wrap_warning(slices, unwrapped)
  if wrap_warning:
    logger.warning("%s", wrap_warning)
    warnings.append(wrap_warning)

  if len(slices) == 1:
    thickness = _first_number(first.dataset, "SpacingBetweenSlices", source) or _first_number(
        first.dataset, "SliceThickness", source
    )
    slice_spacing = thickness if thickness and 0 < thickness <= MAX_POSITION_MM else 1.0
    geometry = _StackGeometry(
        step=normal * slice_spacing, origin=positions[0], slice_spacing=slice_spacing,
        tilt_deg=0.0, spacing_varies=False, off_line=False,
    )
    message = f"single slice: slice spacing {slice_spacing} mm taken from the header, not measured"
    logger.warning("%s", message)
    warnings.append(message)
  else:
    geometry = _measure_stack(slices, positions, normal, column_cosine, warnings)
    if geometry.tilt_deg != 0.0:
      message = (
          f"gantry tilt {geometry.tilt_deg:.2f} degrees measured from slice positions; "
          "not corrected"
      )
      logger.warning("%s", message)
      warnings.append(message)

  affine = np.eye(4)
  affine[:3, 0] = geometry.step
  affine[:3, 1] = column_cosine * pixel_spacing[0]
  affine[:3, 2] = row_cosine * pixel_spacing[1]
  affine[:3, 3] = geometry.origin

  header = slices[0].dataset
  provenance = Provenance(
      source_files=tuple(str(item.path) for item in slices),
      sop_instance_uids=tuple(str(item.dataset.get("SOPInstanceUID", "")) for item in slices),
      series_uid=str(header.get("SeriesInstanceUID", "")),
      study_uid=str(header.get("StudyInstanceUID", "")),
      patient_id=str(header.get("PatientID", "")),
      series_description=str(header.get("SeriesDescription", "")),
      kernel=_kernel(header),
      modality=str(header.get("Modality", "")),
      gantry_tilt_deg=geometry.tilt_deg,
      spacing_varies=geometry.spacing_varies,
      warnings=tuple(warnings),
      window_center=_first_number(header, "WindowCenter", source),
      window_width=_first_number(header, "WindowWidth", source),
      photometric_interpretation=str(header.get("PhotometricInterpretation", "")),
  )
  return CTVolume(
      hu=np.stack([item.hu for item in slices]),
      positions=positions,
      affine=affine,
      spacing=(abs(geometry.slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
      affine_is_approximate=geometry.spacing_varies or geometry.off_line,
      provenance=provenance,
  )
