"""Slice geometry of a DICOM CT series: position, orientation, pixel and slice spacing, tilt.

Slice spacing, collinearity and gantry tilt are measured from
ImagePositionPatient and ImageOrientationPatient, never from SliceThickness or
GantryDetectorTilt.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from uem_ich_jax.ct.dicom_tags import _tag_value
from uem_ich_jax.ct.volume import CTReadError

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


def _mm(value: float) -> str:
  """Format a coordinate for a message, short even for absurd values such as 1e200."""
  return f"{value:.6g}"


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
