"""Reading a DICOM CT series into a `CTVolume`.

Slices are grouped by SeriesInstanceUID and sorted by their position along the
slice normal. HU are computed from the raw stored values, and the slice
spacing, gantry tilt and affine are measured from ImagePositionPatient and
ImageOrientationPatient, never from SliceThickness or GantryDetectorTilt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from uem_ich_jax.ct.volume import AIR_HU, CTReadError, CTVolume, Provenance

logger = logging.getLogger(__name__)

# Successive slice distances count as uniform when none deviates from their
# median by more than the larger of these two.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_RELATIVE = 0.01
# Measured tilts below this are reported as 0 (rounding in the position strings).
TILT_TOLERANCE_DEG = 0.01
# Two slices whose positions along the normal are closer than this are the
# same slice position.
DUPLICATE_TOLERANCE_MM = 1e-3
# Image orientation cosines of all slices must agree to this.
ORIENTATION_TOLERANCE = 1e-4

_HEADER_TAGS = (
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "Rows",
    "SOPClassUID",
)


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


def _candidate_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise CTReadError(f"{path}: no such file or folder")
  files = []
  for root, _, names in os.walk(path):
    files.extend(pathlib.Path(root) / name for name in names)
  return sorted(files)


def _read_header(path: pathlib.Path) -> Dataset | None:
  """Read `path`'s header, or return None when it is not a DICOM image.

  Files without the 128-byte preamble and "DICM" prefix count as non-DICOM.
  """
  try:
    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
  except InvalidDicomError:
    logger.debug("%s: not a DICOM file, ignored", path)
    return None
  # pydicom raises many exception types on a damaged header (EOFError,
  # struct.error, ValueError, ...), and a damaged file is reported, not fatal.
  except Exception as error:  # pylint: disable=broad-except
    raise CTReadError(f"{path}: unreadable DICOM header ({error})") from error
  if "Rows" not in dataset:
    logger.debug("%s: DICOM without an image (no Rows), ignored", path)
    return None
  return dataset


def _scan_headers(
    files: Iterable[pathlib.Path],
) -> tuple[dict[str, list[tuple[pathlib.Path, Dataset]]], list[str]]:
  """Group image files by SeriesInstanceUID, and return warnings for damaged files too."""
  groups: dict[str, list[tuple[pathlib.Path, Dataset]]] = {}
  warnings = []
  for path in files:
    try:
      header = _read_header(path)
    except CTReadError as error:
      warnings.append(f"skipped {error}")
      logger.warning("skipped %s", error)
      continue
    if header is None:
      continue
    uid = str(header.get("SeriesInstanceUID", ""))
    groups.setdefault(uid, []).append((path, header))
  return groups, warnings


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
  are ignored and files with a damaged header are skipped with a warning.

  Returns:
    The series sorted by SeriesInstanceUID.
  """
  groups, _ = _scan_headers(_candidate_files(pathlib.Path(folder)))
  return [_series_from_group(uid, groups[uid]) for uid in sorted(groups)]


def _describe_series(groups: dict[str, list[tuple[pathlib.Path, Dataset]]]) -> str:
  lines = []
  for uid in sorted(groups):
    series = _series_from_group(uid, groups[uid])
    lines.append(f"  {uid or '(no SeriesInstanceUID)'}: {series.description!r}, {series.num_files} files")
  return "\n".join(lines)


# -- Pixel values -------------------------------------------------------------


class _MissingDecoderError(CTReadError):
  """Compressed pixel data that no installed pydicom plugin decodes."""


def _raw_native_array(dataset: Dataset, source: str) -> np.ndarray:
  """Return the uncompressed pixel data as unsigned integers of BitsAllocated."""
  bits_allocated = int(dataset.BitsAllocated)
  if bits_allocated not in (8, 16, 32):
    raise CTReadError(f"{source}: BitsAllocated {bits_allocated} is not supported")
  byte_order = "<" if dataset.file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRBigEndian else ">"
  dtype = np.dtype(f"{byte_order}u{bits_allocated // 8}")
  rows, columns = int(dataset.Rows), int(dataset.Columns)
  expected = rows * columns * dtype.itemsize
  data = dataset.PixelData
  if len(data) < expected:
    raise CTReadError(
        f"{source}: pixel data is truncated ({len(data)} bytes, expected {expected} "
        f"for {rows}x{columns} at {bits_allocated} bits)"
    )
  return np.frombuffer(data[:expected], dtype=dtype).reshape(rows, columns)


def _decoded_array(dataset: Dataset, source: str) -> np.ndarray:
  """Decode compressed pixel data with pydicom and view it as unsigned integers."""
  transfer_syntax = UID(dataset.file_meta.TransferSyntaxUID)
  try:
    decoder = get_decoder(transfer_syntax)
  except NotImplementedError as error:
    raise CTReadError(
        f"{source}: pydicom has no decoder for transfer syntax {transfer_syntax.name}"
    ) from error
  if not decoder.is_available:
    raise _MissingDecoderError(
        f"{source}: no decoder installed for transfer syntax {transfer_syntax.name}; "
        "install the pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle "
        "packages"
    )
  try:
    array = dataset.pixel_array
  except RuntimeError as error:
    if "missing dependencies" in str(error):
      raise _MissingDecoderError(f"{source}: no decoder installed ({error})") from error
    raise CTReadError(f"{source}: pixel data cannot be decoded ({error})") from error
  except (ValueError, TypeError, EOFError) as error:
    raise CTReadError(f"{source}: pixel data cannot be decoded ({error})") from error
  array = np.ascontiguousarray(array)
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def stored_values(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return a single-frame slice's stored values as int64 (rows, columns).

  The bits above HighBit are masked off and the value is sign-extended when
  PixelRepresentation is 1, on the raw array, so the result does not depend on
  how a pydicom version treats those bits. Compressed transfer syntaxes are
  decoded by pydicom first and then masked the same way.

  Raises:
    CTReadError: missing or truncated pixel data, more than one frame or
      sample, or compressed data without an installed decoder.
  """
  source = source or str(getattr(dataset, "filename", "") or "dataset")
  if "PixelData" not in dataset:
    raise CTReadError(f"{source}: no pixel data")
  if int(dataset.get("SamplesPerPixel", 1)) != 1:
    raise CTReadError(f"{source}: SamplesPerPixel {dataset.SamplesPerPixel} is not grayscale")
  # TODO: multi-frame (Enhanced CT) files are rejected, so scanners that export
  # a whole series as one file cannot be read yet.
  if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
    raise CTReadError(f"{source}: multi-frame images ({dataset.NumberOfFrames} frames) are not supported")

  if UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
    raw = _decoded_array(dataset, source)
  else:
    raw = _raw_native_array(dataset, source)

  bits_allocated = int(dataset.BitsAllocated)
  bits_stored = int(dataset.get("BitsStored", bits_allocated))
  high_bit = int(dataset.get("HighBit", bits_stored - 1))
  if not 0 < bits_stored <= bits_allocated or not bits_stored - 1 <= high_bit < bits_allocated:
    raise CTReadError(
        f"{source}: inconsistent BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
        f"HighBit {high_bit}"
    )
  values = raw.astype(np.int64) >> (high_bit + 1 - bits_stored)
  values &= (1 << bits_stored) - 1
  if int(dataset.get("PixelRepresentation", 0)) == 1:
    sign_bit = 1 << (bits_stored - 1)
    values = np.where(values & sign_bit, values - (1 << bits_stored), values)
  return values


def _padding_mask(dataset: Dataset, values: np.ndarray) -> np.ndarray:
  """Return where `values` (stored values) are PixelPaddingValue or in its range."""
  if "PixelPaddingValue" not in dataset:
    return np.zeros(values.shape, dtype=bool)
  padding = int(dataset.PixelPaddingValue)
  limit = dataset.get("PixelPaddingRangeLimit")
  if limit is None:
    return values == padding
  low, high = sorted((padding, int(limit)))
  return (values >= low) & (values <= high)


def slice_hu(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return one slice in HU (float32), with padding and out-of-field voxels as air.

  Out of field means below `AIR_HU` after rescaling. Scanners fill the corners
  outside the reconstruction circle with such values (-1500 HU in the GE scan
  of the tests), and nothing inside the field is less dense than air.
  PixelPaddingValue (and the range up to PixelPaddingRangeLimit) also becomes
  `AIR_HU`. MONOCHROME1 only inverts the display, so it does not change HU.
  """
  values = stored_values(dataset, source)
  slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
  intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
  hu = values.astype(np.float64) * slope + intercept
  hu[_padding_mask(dataset, values)] = AIR_HU
  hu[hu < AIR_HU] = AIR_HU
  return hu.astype(np.float32)


# -- Geometry -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slice:
  path: pathlib.Path
  dataset: Dataset
  hu: np.ndarray
  position: np.ndarray


def _float_list(dataset: Dataset, keyword: str, count: int, source: str) -> np.ndarray:
  value = dataset.get(keyword)
  try:
    array = np.array([float(item) for item in value], dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise CTReadError(f"{source}: missing or invalid {keyword} ({value!r})") from error
  if array.shape != (count,) or not np.all(np.isfinite(array)):
    raise CTReadError(f"{source}: {keyword} must have {count} numbers, got {value!r}")
  return array


def _first_number(dataset: Dataset, keyword: str, source: str) -> float | None:
  """Return the first value of a possibly multi-valued decimal tag, or None."""
  if keyword not in dataset:
    return None
  try:
    value = dataset[keyword].value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
      value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)
  except (TypeError, ValueError, IndexError) as error:
    logger.warning("%s: %s ignored, not a number (%s)", source, keyword, error)
    return None


def _kernel(dataset: Dataset) -> str:
  value = dataset.get("ConvolutionKernel", "")
  if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
    return "\\".join(str(item) for item in value)
  return str(value)


def _measured_tilt_deg(step: np.ndarray, normal: np.ndarray, column_cosine: np.ndarray) -> float:
  """Return the angle between the slice step and the normal, signed as dcm2niix does.

  The sign matches the "estimated from slice vector" value dcm2niix v1.0.20260724
  prints for the GE (+18.5) and Philips (-16.5) scans in the tests: positive when
  the step leans against the column cosine (ImageOrientationPatient[3:]).
  """
  cosine = abs(float(step @ normal)) / float(np.linalg.norm(step))
  angle = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
  if angle < TILT_TOLERANCE_DEG:
    return 0.0
  return -angle if float(step @ column_cosine) > 0 else angle


def _drop_duplicates(slices: list[_Slice], along: np.ndarray, warnings: list[str]) -> list[_Slice]:
  """Drop exact duplicate slices, and raise on different slices at one position."""
  unique_slices = [slices[0]]
  for candidate in slices[1:]:
    previous = unique_slices[-1]
    if abs(float(along[id(candidate)] - along[id(previous)])) > DUPLICATE_TOLERANCE_MM:
      unique_slices.append(candidate)
      continue
    if np.array_equal(candidate.hu, previous.hu):
      message = (
          f"dropped {candidate.path}: exact duplicate of {previous.path} "
          f"(same position and pixels)"
      )
      logger.warning("%s", message)
      warnings.append(message)
      continue
    raise CTReadError(
        f"{candidate.path} and {previous.path}: different images at the same slice "
        f"position {float(along[id(candidate)]):.3f} mm"
    )
  return unique_slices


def _check_same_grid(slices: Sequence[_Slice]) -> None:
  first = slices[0]
  for item in slices[1:]:
    if item.hu.shape != first.hu.shape:
      raise CTReadError(
          f"{item.path}: image size {item.hu.shape} differs from {first.hu.shape} "
          f"of {first.path} in the same series"
      )


# -- Reading ------------------------------------------------------------------


def _select_series(
    path: str,
    groups: dict[str, list[tuple[pathlib.Path, Dataset]]],
    series_uid: str | None,
) -> list[tuple[pathlib.Path, Dataset]]:
  if not groups:
    raise CTReadError(f"{path}: no DICOM images found")
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


def _read_slices(
    members: Sequence[tuple[pathlib.Path, Dataset]], warnings: list[str]
) -> list[_Slice]:
  """Read pixel data and positions, skipping files that fail with a warning."""
  slices = []
  errors = []
  for path, header in members:
    modality = str(header.get("Modality", ""))
    if modality != "CT":
      raise CTReadError(f"{path}: modality {modality or '(missing)'} is not CT")
    try:
      dataset = pydicom.dcmread(path)
    except Exception as error:  # pylint: disable=broad-except
      # See `_read_header`: pydicom has no single error type for damaged files.
      errors.append(CTReadError(f"{path}: unreadable DICOM file ({error})"))
      continue
    try:
      hu = slice_hu(dataset, str(path))
    except _MissingDecoderError:
      raise  # Every file of the series would fail the same way.
    except CTReadError as error:
      errors.append(error)
      continue
    position = _float_list(dataset, "ImagePositionPatient", 3, str(path))
    slices.append(_Slice(path=path, dataset=dataset, hu=hu, position=position))

  if not slices and errors:
    raise errors[0]
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
) -> CTVolume:
  """Read one CT series from a folder (searched recursively) or a single file.

  Args:
    path: a folder or one DICOM file.
    series_uid: the SeriesInstanceUID to read when the folder contains several.
    min_slices: the fewest slices to accept. The default 1 reads a single
      file as a one-slice volume; pass 2 or more where a volume is needed.

  Returns:
    The volume with slices in ascending position along the slice normal.

  Raises:
    CTReadError: no DICOM images, several series and no `series_uid`, a
      non-CT modality, fewer than `min_slices` readable slices, mixed image
      sizes or orientations, different images at one position, missing
      geometry tags (in any file), or compressed pixel data without an
      installed decoder. A file that cannot be parsed or whose pixel data is
      truncated or undecodable is skipped with a warning instead, unless no
      file of the series is readable.
  """
  path = pathlib.Path(path)
  return _read_volume(
      str(path),
      _candidate_files(path),
      series_uid=series_uid,
      min_slices=min_slices,
      single_file=path.is_file(),
  )


def read_dicom_files(
    files: Sequence[str | pathlib.Path],
    *,
    series_uid: str | None = None,
    min_slices: int = 1,
) -> CTVolume:
  """Read one CT series from a list of files, such as `DicomSeries.files`.

  This reads a series that `list_dicom_series` found in a large flat folder
  without scanning the folder again. Arguments, result and errors are those
  of `read_dicom_series`.
  """
  paths = [pathlib.Path(file) for file in files]
  if not paths:
    raise CTReadError("read_dicom_files: the list of files is empty")
  missing = [path for path in paths if not path.is_file()]
  if missing:
    raise CTReadError(f"{missing[0]}: no such file ({len(missing)} of {len(paths)} files missing)")
  label = f"{len(paths)} files in {paths[0].parent}"
  return _read_volume(
      label, paths, series_uid=series_uid, min_slices=min_slices, single_file=len(paths) == 1
  )


def _read_volume(
    label: str,
    files: Sequence[pathlib.Path],
    *,
    series_uid: str | None,
    min_slices: int,
    single_file: bool,
) -> CTVolume:
  groups, warnings = _scan_headers(files)
  if single_file and not groups and warnings:
    raise CTReadError(warnings[0].removeprefix("skipped "))
  members = _select_series(label, groups, series_uid)
  slices = _read_slices(members, warnings)
  _check_same_grid(slices)
  volume = _assemble(slices, warnings)
  if volume.num_slices < min_slices:
    raise CTReadError(
        f"{label}: {volume.num_slices} readable slice(s), at least {min_slices} needed"
    )
  return volume


def _assemble(slices: list[_Slice], warnings: list[str]) -> CTVolume:
  """Sort, deduplicate and measure the slices of one series."""
  first = slices[0]
  source = str(first.path)
  orientation = _float_list(first.dataset, "ImageOrientationPatient", 6, source)
  for item in slices[1:]:
    other = _float_list(item.dataset, "ImageOrientationPatient", 6, str(item.path))
    if np.max(np.abs(other - orientation)) > ORIENTATION_TOLERANCE:
      raise CTReadError(
          f"{item.path}: ImageOrientationPatient {other.tolist()} differs from "
          f"{orientation.tolist()} of {first.path}"
      )
  row_cosine, column_cosine = orientation[:3], orientation[3:]
  normal = np.cross(row_cosine, column_cosine)
  norm = float(np.linalg.norm(normal))
  if norm < 0.5:
    raise CTReadError(f"{source}: ImageOrientationPatient {orientation.tolist()} is degenerate")
  normal /= norm
  pixel_spacing = _float_list(first.dataset, "PixelSpacing", 2, source)

  along = {id(item): float(item.position @ normal) for item in slices}
  slices = sorted(slices, key=lambda item: along[id(item)])
  slices = _drop_duplicates(slices, along, warnings)
  positions = np.stack([item.position for item in slices])
  distances = np.diff(positions @ normal)

  spacing_varies = False
  if len(slices) == 1:
    thickness = _first_number(first.dataset, "SpacingBetweenSlices", source) or _first_number(
        first.dataset, "SliceThickness", source
    )
    slice_spacing = thickness if thickness and thickness > 0 else 1.0
    step = normal * slice_spacing
    tilt = 0.0
    message = f"single slice: slice spacing {slice_spacing} mm taken from the header, not measured"
    logger.warning("%s", message)
    warnings.append(message)
  else:
    mean_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    slice_spacing = float(np.median(distances))
    deviation = float(np.max(np.abs(distances - slice_spacing)))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_RELATIVE * slice_spacing)
    tilt = _measured_tilt_deg(mean_step, normal, column_cosine)
    if deviation <= tolerance:
      step = mean_step
      slice_spacing = float(mean_step @ normal)
    else:
      spacing_varies = True
      direction = mean_step / np.linalg.norm(mean_step)
      step = direction * slice_spacing / float(direction @ normal)
      message = (
          f"slice spacing varies from {distances.min():.3f} to {distances.max():.3f} mm; "
          f"the affine uses the median {slice_spacing:.3f} mm and is approximate"
      )
      logger.warning("%s", message)
      warnings.append(message)
    if tilt != 0.0:
      message = f"gantry tilt {tilt:.2f} degrees measured from slice positions; not corrected"
      logger.warning("%s", message)
      warnings.append(message)

  affine = np.eye(4)
  affine[:3, 0] = step
  affine[:3, 1] = column_cosine * pixel_spacing[0]
  affine[:3, 2] = row_cosine * pixel_spacing[1]
  affine[:3, 3] = positions[0]

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
      gantry_tilt_deg=tilt,
      spacing_varies=spacing_varies,
      warnings=tuple(warnings),
      window_center=_first_number(header, "WindowCenter", source),
      window_width=_first_number(header, "WindowWidth", source),
      photometric_interpretation=str(header.get("PhotometricInterpretation", "")),
  )
  return CTVolume(
      hu=np.stack([item.hu for item in slices]),
      positions=positions,
      affine=affine,
      spacing=(abs(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
      affine_is_approximate=spacing_varies,
      provenance=provenance,
  )
