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

A file whose header, pixel data, rescale or geometry is invalid is skipped
with a warning, and the read fails only when no file of the series is left.
Differences between valid slices (image size, orientation, pixel spacing, two
images at one position) are errors, because no slice can be singled out as
the wrong one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import warnings as python_warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from uem_ich_jax.ct.volume import AIR_HU, CTReadError, CTVolume, Provenance, apply_air_floor

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
# Each direction cosine vector must have length 1 and the two must be
# orthogonal to this (decimal strings in headers carry 6 to 16 digits).
# Vectors within it are normalised, and others make the file invalid.
ORIENTATION_UNIT_TOLERANCE = 1e-3
ORTHOGONALITY_TOLERANCE = 1e-3
# PixelSpacing of all slices must agree to this fraction.
PIXEL_SPACING_TOLERANCE_RELATIVE = 1e-3
# Slice positions must lie on one line to this distance, else the affine is
# approximate. Header positions are typically rounded to 0.01 mm or finer.
COLLINEAR_TOLERANCE_MM = 0.1
# No CT pixel is wider than this, so larger PixelSpacing values are damaged.
MAX_PIXEL_SPACING_MM = 100.0
# Patient coordinates beyond this are not a head scan but a damaged header.
MAX_POSITION_MM = 1e5
# Largest image accepted (Rows x Columns). CT images are 512x512, rarely 1024
# or 2048 square. The check comes before decoding, so a damaged header cannot
# make the reader allocate gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# HU beyond this (before the air floor) come from an invalid rescale, not
# from a scanner. Extended-range CT scales reach a few 10^4 HU (an estimate).
MAX_ABS_HU = 1e6

# File name suffixes that mark a DICOM file (compared in lower case).
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_GZIP_MAGIC = b"\x1f\x8b"
# A file whose first bytes contain none of these control bytes is text.
_TEXT_CHECK_BYTES = 512
_CONTROL_BYTES = frozenset(set(range(32)) - {9, 10, 12, 13}) | {127}
# Reasons quoted in the error when no image is found.
_MAX_REASONS = 3

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


def _mm(value: float) -> str:
  """Format a coordinate for a message, short even for absurd values such as 1e200."""
  return f"{value:.6g}"


# -- Finding files ------------------------------------------------------------


def _candidate_files(path: pathlib.Path) -> list[pathlib.Path]:
  """List the regular files at or under `path`, following links and visiting each folder once.

  Named pipes, devices and dangling links are left out, because opening a pipe
  blocks until a writer appears.
  """
  if path.is_file():
    return [path]
  if not path.is_dir():
    if path.exists() or path.is_symlink():
      raise CTReadError(f"{path}: not a regular file or folder")
    raise CTReadError(f"{path}: no such file or folder")
  files = []
  visited = set()
  for root, folders, names in os.walk(path, followlinks=True):
    real_root = os.path.realpath(root)
    if real_root in visited:
      # A link back to a folder already walked (a loop, or two links to one folder).
      folders[:] = []
      continue
    visited.add(real_root)
    for name in names:
      candidate = pathlib.Path(root) / name
      if candidate.is_file():
        files.append(candidate)
      else:
        logger.debug("%s: not a regular file, ignored", candidate)
  return sorted(files)


def _looks_like_dicom(path: pathlib.Path) -> bool:
  """Check whether a file without the DICM prefix was meant to be DICOM (see the module docstring).

  Text files (a README without suffix) are not, so the first bytes are read.
  """
  if path.name.startswith("."):
    return False
  suffix = path.suffix.lower()
  if not (suffix in _DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()):
    return False
  with path.open("rb") as file:
    head = file.read(_TEXT_CHECK_BYTES)
  is_text = bool(head) and not any(byte in _CONTROL_BYTES for byte in head)
  return not is_text


@dataclasses.dataclass
class _Scan:
  """What a header scan found: image files by series, and every file left out with why."""

  groups: dict[str, list[tuple[pathlib.Path, Dataset]]]
  examined: int = 0
  # "skipped FILE: reason" for damaged files that look like DICOM (also logged as warnings).
  warnings: list[str] = dataclasses.field(default_factory=list)
  # "FILE: reason" for files that are not DICOM images (logged at debug level).
  ignored: list[str] = dataclasses.field(default_factory=list)

  def skip(self, message: str) -> None:
    self.warnings.append(f"skipped {message}")
    logger.warning("skipped %s", message)

  def ignore(self, message: str) -> None:
    self.ignored.append(message)
    logger.debug("%s", message)

  def describe_failure(self, label: str) -> str:
    """Return the error for a scan that found no image, with counts and the first reasons."""
    reasons = [
        *(warning.removeprefix("skipped ") for warning in self.warnings), *self.ignored
    ][:_MAX_REASONS]
    message = (
        f"{label}: no DICOM images found among {self.examined} file(s): "
        f"{len(self.warnings)} damaged, {len(self.ignored)} not DICOM images"
    )
    if reasons:
      message += "; first reasons:\n  " + "\n  ".join(reasons)
    return message


def _header_without_preamble(path: pathlib.Path) -> Dataset | None:
  """Read a raw dataset (no preamble or file meta), or return None when it is no image."""
  try:
    with python_warnings.catch_warnings():
      # pydicom warns about the VR guesses it makes while forcing its way through.
      python_warnings.simplefilter("ignore")
      dataset = pydicom.dcmread(
          path, force=True, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS)
      )
  except Exception:  # pylint: disable=broad-except
    # Forced parsing of an arbitrary file can fail in any way, and then it is not DICOM.
    return None
  # Forced parsing of text or noise yields an empty dataset, or one without these.
  if "Rows" in dataset and "SOPClassUID" in dataset:
    return dataset
  return None


def _invalid_dicom_reason(path: pathlib.Path) -> str:
  with path.open("rb") as file:
    start = file.read(2)
  if not start:
    return "empty file (0 bytes)"
  if start == _GZIP_MAGIC:
    return "gzip-compressed, so decompress it first"
  return "not a DICOM file (no DICM prefix, and not a raw DICOM image dataset)"


def _sop_class(dataset: Dataset) -> UID | None:
  value = dataset.get("SOPClassUID") or getattr(dataset, "file_meta", {}).get(
      "MediaStorageSOPClassUID"
  )
  return UID(str(value)) if value else None


def _scan_file(path: pathlib.Path, scan: _Scan) -> None:
  try:
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
  except InvalidDicomError:
    try:
      if not _looks_like_dicom(path):
        scan.ignore(f"{path}: not a DICOM file, ignored")
        return
      header = _header_without_preamble(path)
      if header is None:
        scan.skip(f"{path}: {_invalid_dicom_reason(path)}")
        return
    except OSError as error:  # The file went away or became unreadable meanwhile.
      scan.skip(f"{path}: unreadable file ({error})")
      return
    logger.debug("%s: read without preamble and file meta information", path)
  # pydicom raises many exception types on a damaged header (EOFError,
  # struct.error, ValueError, ...), and a damaged file is reported, not fatal.
  except Exception as error:  # pylint: disable=broad-except
    scan.skip(f"{path}: unreadable DICOM header ({error})")
    return

  if "Rows" not in header:
    sop_class = _sop_class(header)
    if sop_class is not None and "Image Storage" not in sop_class.name:
      scan.ignore(f"{path}: DICOM {sop_class.name} file, not an image, ignored")
    else:
      # An image storage class (or none) without Rows: the header was cut short.
      scan.skip(
          f"{path}: DICOM {sop_class.name if sop_class else 'file'} without Rows "
          "(truncated or damaged header)"
      )
    return
  try:
    uid = str(header.get("SeriesInstanceUID", ""))
  except Exception as error:  # pylint: disable=broad-except
    scan.skip(f"{path}: invalid SeriesInstanceUID ({error})")
    return
  scan.groups.setdefault(uid, []).append((path, header))


def _scan_headers(files: Iterable[pathlib.Path]) -> _Scan:
  """Group image files by SeriesInstanceUID, and note every file left out."""
  scan = _Scan(groups={})
  for path in files:
    scan.examined += 1
    _scan_file(path, scan)
  return scan


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


# -- Header values ------------------------------------------------------------


def _tag_value(dataset: Dataset, keyword: str, source: str) -> Any:
  """Return the value of `keyword`, or None when it is absent or empty.

  Raises:
    CTReadError: pydicom cannot convert the stored value (such as "abc" in a
      decimal string), which it reports only when the value is accessed.
  """
  try:
    value = dataset.get(keyword)
  except Exception as error:  # pylint: disable=broad-except
    # The conversion error type depends on the VR and on pydicom's settings.
    raise CTReadError(f"{source}: invalid {keyword} ({error})") from error
  if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
    return None
  return value


def _single_value(dataset: Dataset, keyword: str, source: str) -> Any:
  value = _tag_value(dataset, keyword, source)
  if isinstance(value, (list, tuple, MultiValue)):
    if len(value) != 1:
      raise CTReadError(f"{source}: {keyword} must have one value, got {len(value)}: {list(value)}")
    value = value[0]
  return value


def _integer(dataset: Dataset, keyword: str, source: str, default: int | None = None) -> int:
  """Return a single integer tag, or `default` when it is absent.

  Raises:
    CTReadError: the tag is absent without a default, multi-valued or not an integer.
  """
  value = _single_value(dataset, keyword, source)
  if value is None:
    if default is None:
      raise CTReadError(f"{source}: {keyword} is missing")
    return default
  try:
    return int(value)
  except (TypeError, ValueError) as error:
    raise CTReadError(f"{source}: {keyword} is not an integer ({value!r})") from error


def _finite_number(dataset: Dataset, keyword: str, source: str, default: float) -> float:
  """Return a single finite decimal tag, or `default` when it is absent or empty."""
  value = _single_value(dataset, keyword, source)
  if value is None:
    return default
  try:
    number = float(value)
  except (TypeError, ValueError, OverflowError) as error:
    raise CTReadError(f"{source}: {keyword} is not a number ({value!r})") from error
  if not np.isfinite(number):
    raise CTReadError(f"{source}: {keyword} is not finite ({value!r})")
  return number


def _transfer_syntax(dataset: Dataset, source: str) -> UID:
  """Return the transfer syntax, from the file meta or, without one, as pydicom parsed the file.

  Raises:
    CTReadError: the UID is not a transfer syntax pydicom knows, so the pixel
      encoding is unknown.
  """
  file_meta = getattr(dataset, "file_meta", None)
  value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
  if value:
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
      raise CTReadError(f"{source}: TransferSyntaxUID {uid} is not a known transfer syntax")
    return uid
  # No TransferSyntaxUID (a raw dataset without file meta, or a damaged file
  # meta): pydicom has already found the encoding by parsing the file.
  implicit_vr, little_endian = dataset.original_encoding
  if implicit_vr is None:
    raise CTReadError(f"{source}: TransferSyntaxUID is missing")
  if implicit_vr:
    return pydicom.uid.ImplicitVRLittleEndian
  return pydicom.uid.ExplicitVRLittleEndian if little_endian else pydicom.uid.ExplicitVRBigEndian


# -- Pixel values -------------------------------------------------------------


class _MissingDecoderError(CTReadError):
  """Compressed pixel data that no installed pydicom plugin decodes."""


def _image_size(dataset: Dataset, source: str) -> tuple[int, int]:
  """Return (Rows, Columns), checked before any pixel data is allocated."""
  rows = _integer(dataset, "Rows", source)
  columns = _integer(dataset, "Columns", source)
  if rows <= 0 or columns <= 0:
    raise CTReadError(f"{source}: invalid image size Rows {rows}, Columns {columns}")
  if rows * columns > MAX_IMAGE_PIXELS:
    raise CTReadError(
        f"{source}: image size {rows}x{columns} exceeds the limit of {MAX_IMAGE_PIXELS} "
        "pixels (Rows or Columns is damaged)"
    )
  return rows, columns


def _raw_native_array(
    dataset: Dataset, source: str, rows: int, columns: int, transfer_syntax: UID
) -> np.ndarray:
  """Return the uncompressed pixel data as unsigned integers of BitsAllocated.

  The data must be exactly Rows x Columns x BitsAllocated/8 bytes, plus one pad
  byte when that is odd: a longer one means Rows, Columns or BitsAllocated is
  wrong, and reading it would misplace every pixel.
  """
  bits_allocated = _integer(dataset, "BitsAllocated", source)
  if bits_allocated not in (8, 16, 32):
    raise CTReadError(f"{source}: BitsAllocated {bits_allocated} is not supported")
  byte_order = ">" if transfer_syntax == pydicom.uid.ExplicitVRBigEndian else "<"
  dtype = np.dtype(f"{byte_order}u{bits_allocated // 8}")
  expected = rows * columns * dtype.itemsize
  data = dataset.PixelData
  if not data:
    raise CTReadError(f"{source}: pixel data is empty")
  shape = f"{rows}x{columns} at {bits_allocated} bits"
  if len(data) < expected:
    raise CTReadError(
        f"{source}: pixel data is truncated ({len(data)} bytes, expected {expected} for {shape})"
    )
  if len(data) != expected and not (expected % 2 == 1 and len(data) == expected + 1):
    raise CTReadError(
        f"{source}: pixel data is longer than the header says ({len(data)} bytes, expected "
        f"{expected} for {shape}); Rows, Columns or BitsAllocated is wrong"
    )
  return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)


def _decoded_array(dataset: Dataset, source: str, transfer_syntax: UID) -> np.ndarray:
  """Decode compressed pixel data with pydicom and view it as unsigned integers."""
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
  except (ValueError, TypeError, EOFError, AttributeError, KeyError) as error:
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
    CTReadError: missing, empty, truncated or overlong pixel data, missing or
      invalid image tags, an image larger than `MAX_IMAGE_PIXELS`, more than
      one frame or sample, an unknown transfer syntax, or compressed data
      without an installed decoder.
  """
  source = source or str(getattr(dataset, "filename", "") or "dataset")
  if "PixelData" not in dataset:
    raise CTReadError(f"{source}: no pixel data")
  samples = _integer(dataset, "SamplesPerPixel", source, default=1)
  if samples != 1:
    raise CTReadError(f"{source}: SamplesPerPixel {samples} is not grayscale")
  # TODO: multi-frame (Enhanced CT) files are rejected, so scanners that export
  # a whole series as one file cannot be read yet.
  frames = _integer(dataset, "NumberOfFrames", source, default=1)
  if frames not in (0, 1):
    raise CTReadError(f"{source}: multi-frame images ({frames} frames) are not supported")
  rows, columns = _image_size(dataset, source)

  transfer_syntax = _transfer_syntax(dataset, source)
  if transfer_syntax.is_compressed:
    raw = _decoded_array(dataset, source, transfer_syntax)
    if raw.shape != (rows, columns):
      raise CTReadError(f"{source}: decoded image is {raw.shape}, not {rows}x{columns}")
  else:
    raw = _raw_native_array(dataset, source, rows, columns, transfer_syntax)

  bits_allocated = _integer(dataset, "BitsAllocated", source)
  bits_stored = _integer(dataset, "BitsStored", source, default=bits_allocated)
  high_bit = _integer(dataset, "HighBit", source, default=bits_stored - 1)
  if not 0 < bits_stored <= bits_allocated or not bits_stored - 1 <= high_bit < bits_allocated:
    raise CTReadError(
        f"{source}: inconsistent BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
        f"HighBit {high_bit}"
    )
  values = raw.astype(np.int64) >> (high_bit + 1 - bits_stored)
  values &= (1 << bits_stored) - 1
  pixel_representation = _integer(dataset, "PixelRepresentation", source, default=0)
  if pixel_representation not in (0, 1):
    raise CTReadError(f"{source}: PixelRepresentation {pixel_representation} is neither 0 nor 1")
  if pixel_representation == 1:
    sign_bit = 1 << (bits_stored - 1)
    values = np.where(values & sign_bit, values - (1 << bits_stored), values)
  return values


def _padding_mask(dataset: Dataset, values: np.ndarray, source: str) -> np.ndarray:
  """Return where `values` (stored values) are PixelPaddingValue or in its range."""
  if _single_value(dataset, "PixelPaddingValue", source) is None:
    return np.zeros(values.shape, dtype=bool)
  padding = _integer(dataset, "PixelPaddingValue", source)
  if _single_value(dataset, "PixelPaddingRangeLimit", source) is None:
    return values == padding
  limit = _integer(dataset, "PixelPaddingRangeLimit", source)
  low, high = sorted((padding, limit))
  return (values >= low) & (values <= high)


def _rescale(dataset: Dataset, source: str) -> tuple[float, float]:
  """Return (RescaleSlope, RescaleIntercept), 1 and 0 when absent or empty.

  Raises:
    CTReadError: a value that is not a single finite number, or slope 0.
  """
  slope = _finite_number(dataset, "RescaleSlope", source, default=1.0)
  intercept = _finite_number(dataset, "RescaleIntercept", source, default=0.0)
  if slope == 0:
    raise CTReadError(f"{source}: RescaleSlope is 0, so every voxel would have one HU value")
  return slope, intercept


def slice_hu(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return one slice in HU (float32), with padding and out-of-field voxels as air.

  Out of field means below `AIR_HU` after rescaling (see `apply_air_floor`).
  Scanners fill the corners outside the reconstruction circle with such values
  (-1500 HU in the GE scan of the tests), and nothing inside the field is less
  dense than air. PixelPaddingValue (and the range up to
  PixelPaddingRangeLimit) also becomes `AIR_HU`. MONOCHROME1 only inverts the
  display, so it does not change HU.

  Raises:
    CTReadError: see `stored_values`; also an invalid RescaleSlope or
      RescaleIntercept (not one finite number, or slope 0), or HU beyond
      `MAX_ABS_HU`, which only an invalid rescale produces.
  """
  source = source or str(getattr(dataset, "filename", "") or "dataset")
  values = stored_values(dataset, source)
  slope, intercept = _rescale(dataset, source)
  hu = values.astype(np.float64) * slope + intercept
  padding = _padding_mask(dataset, values, source)
  hu[padding] = AIR_HU
  bits_allocated = _integer(dataset, "BitsAllocated", source)
  bits_stored = _integer(dataset, "BitsStored", source, default=bits_allocated)
  # The bound from the stored bit count spares a pass over the pixels in the usual case.
  bound = abs(slope) * 2.0**bits_stored + abs(intercept)
  if bound > MAX_ABS_HU and not np.all(np.abs(hu) <= MAX_ABS_HU):
    raise CTReadError(
        f"{source}: HU up to {float(np.max(np.abs(hu))):.6g} from RescaleSlope {slope:g} and "
        f"RescaleIntercept {intercept:g}; beyond {MAX_ABS_HU:g} HU the rescale is invalid"
    )
  return apply_air_floor(hu).astype(np.float32)


# -- Geometry -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slice:
  path: pathlib.Path
  dataset: Dataset
  hu: np.ndarray
  position: np.ndarray
  # Row cosines then column cosines, each normalised to length 1.
  orientation: np.ndarray
  pixel_spacing: np.ndarray


def _float_list(dataset: Dataset, keyword: str, count: int, source: str) -> np.ndarray:
  value = _tag_value(dataset, keyword, source)
  if value is None:
    raise CTReadError(f"{source}: {keyword} is missing")
  items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
  try:
    array = np.array([float(item) for item in items], dtype=np.float64)
  except (TypeError, ValueError, OverflowError) as error:
    raise CTReadError(f"{source}: invalid {keyword} ({items!r})") from error
  if array.shape != (count,) or not np.all(np.isfinite(array)):
    raise CTReadError(f"{source}: {keyword} must have {count} finite numbers, got {items!r}")
  return array


def _slice_position(dataset: Dataset, source: str) -> np.ndarray:
  position = _float_list(dataset, "ImagePositionPatient", 3, source)
  if np.max(np.abs(position)) > MAX_POSITION_MM:
    raise CTReadError(
        f"{source}: ImagePositionPatient [{', '.join(_mm(value) for value in position)}] "
        f"is more than {MAX_POSITION_MM:g} mm from the origin"
    )
  return position


def _slice_orientation(dataset: Dataset, source: str) -> np.ndarray:
  """Return ImageOrientationPatient with both cosine vectors normalised.

  Raises:
    CTReadError: a vector whose length is not 1 within
      `ORIENTATION_UNIT_TOLERANCE`, or vectors that are not orthogonal within
      `ORTHOGONALITY_TOLERANCE`, because the affine would be scaled or sheared.
  """
  orientation = _float_list(dataset, "ImageOrientationPatient", 6, source)
  vectors = []
  for name, vector in (("row", orientation[:3]), ("column", orientation[3:])):
    length = float(np.linalg.norm(vector))
    if abs(length - 1.0) > ORIENTATION_UNIT_TOLERANCE:
      raise CTReadError(
          f"{source}: ImageOrientationPatient {name} cosines {vector.tolist()} have length "
          f"{length:.6g}, not 1"
      )
    vectors.append(vector / length)
  dot = float(vectors[0] @ vectors[1])
  if abs(dot) > ORTHOGONALITY_TOLERANCE:
    raise CTReadError(
        f"{source}: ImageOrientationPatient row and column cosines are not orthogonal "
        f"(dot product {dot:.6g})"
    )
  return np.concatenate(vectors)


def _pixel_spacing(dataset: Dataset, source: str) -> np.ndarray:
  spacing = _float_list(dataset, "PixelSpacing", 2, source)
  if np.any(spacing <= 0) or np.any(spacing > MAX_PIXEL_SPACING_MM):
    raise CTReadError(
        f"{source}: PixelSpacing {spacing.tolist()} must be positive and at most "
        f"{MAX_PIXEL_SPACING_MM:g} mm"
    )
  return spacing


def _first_number(dataset: Dataset, keyword: str, source: str) -> float | None:
  """Return the first value of a possibly multi-valued decimal tag, or None."""
  try:
    value = _tag_value(dataset, keyword, source)
    if isinstance(value, (list, tuple, MultiValue)):
      value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)
  except (CTReadError, TypeError, ValueError, IndexError) as error:
    logger.warning("%s: %s ignored, not a number (%s)", source, keyword, error)
    return None


def _kernel(dataset: Dataset) -> str:
  value = dataset.get("ConvolutionKernel", "")
  if isinstance(value, (list, tuple, MultiValue)):
    return "\\".join(str(item) for item in value)
  return str(value)


def _measured_tilt_deg(step: np.ndarray, normal: np.ndarray, column_cosine: np.ndarray) -> float:
  """Return the angle between the slice step and the normal, signed as dcm2niix does.

  The sign matches the "estimated from slice vector" value dcm2niix v1.0.20260724
  prints for the GE (+18.5) and Philips (-16.5) scans in the tests: positive when
  the step leans against the column cosine (ImageOrientationPatient[3:]). It is
  not the sign of the header's GantryDetectorTilt, which is +16.5 in that
  Philips scan.
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
        f"position {_mm(float(along[id(candidate)]))} mm"
    )
  return unique_slices


def _check_same_grid(slices: Sequence[_Slice]) -> None:
  """Raise when valid slices disagree on image size, orientation or pixel spacing."""
  first = slices[0]
  for item in slices[1:]:
    if item.hu.shape != first.hu.shape:
      raise CTReadError(
          f"{item.path}: image size {item.hu.shape} differs from {first.hu.shape} "
          f"of {first.path} in the same series"
      )
    if np.max(np.abs(item.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
      raise CTReadError(
          f"{item.path}: ImageOrientationPatient {item.orientation.tolist()} differs from "
          f"{first.orientation.tolist()} of {first.path}"
      )
    difference = np.abs(item.pixel_spacing - first.pixel_spacing)
    if np.any(difference > PIXEL_SPACING_TOLERANCE_RELATIVE * first.pixel_spacing):
      raise CTReadError(
          f"{item.path}: PixelSpacing {item.pixel_spacing.tolist()} differs from "
          f"{first.pixel_spacing.tolist()} of {first.path}; one series needs one pixel grid"
      )


@dataclasses.dataclass(frozen=True)
class _StackGeometry:
  step: np.ndarray  # Affine column of the slice index, mm.
  origin: np.ndarray  # Affine translation, mm.
  slice_spacing: float  # Signed distance between slice planes along the normal, mm.
  tilt_deg: float
  spacing_varies: bool
  off_line: bool


def _measure_stack(
    slices: Sequence[_Slice], positions: np.ndarray, normal: np.ndarray,
    column_cosine: np.ndarray, warnings: list[str],
) -> _StackGeometry:
  """Measure step, spacing and tilt of two or more sorted, distinct slice positions.

  The stacking direction is the median of the slice-to-slice steps (per mm
  along the normal), and the line through the positions the median of their
  offsets along it, so one misplaced slice neither bends the direction nor
  shifts the line. A slice farther than `COLLINEAR_TOLERANCE_MM` from that
  line makes the affine approximate, with a warning.
  """
  along = positions @ normal
  distances = np.diff(along)
  per_mm = np.median(np.diff(positions, axis=0) / distances[:, None], axis=0)
  per_mm /= float(per_mm @ normal)
  anchor = np.median(positions - along[:, None] * per_mm, axis=0)
  residuals = np.linalg.norm(positions - anchor - along[:, None] * per_mm, axis=1)
  off_line = residuals > COLLINEAR_TOLERANCE_MM
  tilt = _measured_tilt_deg(per_mm, normal, column_cosine)

  slice_spacing = float(np.median(distances))
  deviation = float(np.max(np.abs(distances - slice_spacing)))
  spacing_varies = deviation > max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_RELATIVE * slice_spacing)
  if not spacing_varies and not off_line.any():
    # Exact: the affine places every slice at its header position.
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    return _StackGeometry(
        step=step, origin=positions[0], slice_spacing=float(step @ normal), tilt_deg=tilt,
        spacing_varies=False, off_line=False,
    )

  step = per_mm * slice_spacing
  origin = positions[0]
  if spacing_varies:
    message = (
        f"slice spacing varies from {distances.min():.3f} to {distances.max():.3f} mm; "
        f"the affine uses the median {slice_spacing:.3f} mm and is approximate"
    )
    logger.warning("%s", message)
    warnings.append(message)
  if off_line.any():
    origin = anchor + along[0] * per_mm
    worst = int(np.argmax(residuals))
    message = (
        f"{int(off_line.sum())} slice position(s) lie off the line through the others, up to "
        f"{_mm(float(residuals[worst]))} mm ({slices[worst].path}); the affine follows that "
        "line and is approximate, and `positions` keeps each slice's header position"
    )
    logger.warning("%s", message)
    warnings.append(message)
  return _StackGeometry(
      step=step, origin=origin, slice_spacing=slice_spacing, tilt_deg=tilt,
      spacing_varies=spacing_varies, off_line=bool(off_line.any()),
  )


# -- Reading ------------------------------------------------------------------


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


def _read_slice(path: pathlib.Path) -> _Slice:
  """Read one file's geometry and pixels, or raise CTReadError naming the file and the flaw."""
  source = str(path)
  try:
    # force=True also reads files without preamble, which the header scan accepted.
    dataset = pydicom.dcmread(path, force=True)
  except Exception as error:  # pylint: disable=broad-except
    # See `_scan_file`: pydicom has no single error type for damaged files.
    raise CTReadError(f"{path}: unreadable DICOM file ({error})") from error
  position = _slice_position(dataset, source)
  orientation = _slice_orientation(dataset, source)
  pixel_spacing = _pixel_spacing(dataset, source)
  hu = slice_hu(dataset, source)
  return _Slice(
      path=path, dataset=dataset, hu=hu, position=position, orientation=orientation,
      pixel_spacing=pixel_spacing,
  )


def _read_slices(
    label: str, members: Sequence[tuple[pathlib.Path, Dataset]], warnings: list[str]
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
      slices.append(_read_slice(path))
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
    CTReadError: no DICOM images (the message counts the files examined and
      gives the first reasons), several series and no `series_uid`, a non-CT
      modality, fewer than `min_slices` valid slices, valid slices that differ
      in image size, orientation or pixel spacing, different images at one
      position, or compressed pixel data without an installed decoder. A file
      that cannot be parsed, or whose pixel data, rescale or geometry tags are
      invalid, is skipped with a warning instead, unless no file of the series
      is valid.
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
  scan = _scan_headers(files)
  if not scan.groups:
    if single_file and scan.warnings:
      raise CTReadError(scan.warnings[0].removeprefix("skipped "))
    raise CTReadError(scan.describe_failure(label))
  members = _select_series(label, scan.groups, series_uid)
  warnings = list(scan.warnings)
  slices = _read_slices(label, members, warnings)
  _check_same_grid(slices)
  volume = _assemble(slices, warnings)
  if volume.num_slices < min_slices:
    raise CTReadError(
        f"{label}: {volume.num_slices} valid slice(s), at least {min_slices} needed"
    )
  return volume


def _assemble(slices: list[_Slice], warnings: list[str]) -> CTVolume:
  """Sort, deduplicate and measure the slices of one series (already on one grid)."""
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
