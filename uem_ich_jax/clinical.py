"""Clinical quantities from a hemorrhage mask in the scan's real geometry.

Works on any `CTVolume` (DICOM, NIfTI or phantom) and a class-id mask of the
same shape, with the BHSD ids (0 background, 1 epidural, 2 intraparenchymal,
3 intraventricular, 4 subarachnoid, 5 subdural).

Geometry comes from the volume's affine and slice positions only, never from a
header's slice thickness. The in-plane pixel area is the area spanned by the
affine's row and column vectors. Each slice owns the slab between the
midpoints to its neighbours along the slice normal. That handles uneven slice
spacing and gantry tilt (a sheared stack keeps its axial slice planes, so the
slab is measured along their normal, not along the shear).

Sides follow DICOM LPS coordinates, where +x points to the patient's LEFT.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uem_ich_jax import MASK_CLASS_IDS, SUBTYPES
from uem_ich_jax.ct.volume import CTVolume
from uem_ich_jax.errors import InputError

# A side counts as bleeding when it contains at least this much blood, mL. Below
# it, a few voxels over the midline (blood in the third ventricle or the basal
# cisterns, a misplaced plane by a voxel) would make every central bleed
# bilateral.
MIN_SIDE_ML = 0.5
# Voxels above this density belong to the head when the midline is estimated:
# scalp, bone and brain, but not air or the air-filled sinuses.
HEAD_THRESHOLD_HU = -200.0
# Slices whose head section is smaller than this share of the largest section
# (vertex caps, slices below the chin) get the midline point of the others,
# because their centroid and shape locate the midline poorly.
MIN_SECTION_FRACTION = 0.25
SIDES = ("left", "right", "bilateral", "none")


@dataclasses.dataclass(frozen=True)
class Midline:
  """Midsagittal plane in DICOM patient coordinates (LPS), mm.

  Attributes:
    point_mm: (3,) a point on the plane, or (slice, 3) one point per slice, so
      that a head that moves between slices keeps its own midline on each.
    normal: (3,) unit normal pointing to the patient's left (positive x).
  """

  point_mm: np.ndarray
  normal: np.ndarray


def _check_mask(mask: np.ndarray, volume: CTVolume) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != volume.shape:
    raise InputError(
        f"mask shape {mask.shape} differs from the volume's {volume.shape}; "
        "both must be (slice, row, column) on the same grid"
    )
  if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
    raise InputError(
        f"mask must hold integer class ids 0..{len(SUBTYPES)}, got dtype {mask.dtype}; "
        "cast a class-id mask with mask.astype(np.uint8)"
    )
  if mask.size:
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high > len(SUBTYPES):
      bad = np.unique(mask[(mask < 0) | (mask > len(SUBTYPES))])
      raise InputError(
          f"mask contains invalid class ids {bad.tolist()}, outside 0..{len(SUBTYPES)} "
          f"(0 background, then {', '.join(SUBTYPES)})"
      )
  return mask


def _check_geometry(volume: CTVolume) -> None:
  """Reject an affine or slice positions that would turn every volume into NaN or 0 mL."""
  affine = np.asarray(volume.affine, np.float64)
  if not np.all(np.isfinite(affine)):
    raise InputError(
        f"volume.affine contains non-finite values {affine.tolist()}; fix the scan's"
        " orientation and spacing metadata"
    )
  positions = np.asarray(volume.positions, np.float64)
  if not np.all(np.isfinite(positions)):
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    raise InputError(
        f"volume.positions of slices {bad[:5].tolist()} are not finite; fix the scan's slice"
        " positions"
    )
  spacing = np.asarray(volume.spacing, np.float64)
  if volume.num_slices == 1 and not (np.isfinite(spacing[0]) and spacing[0] > 0):
    raise InputError(
        f"volume.spacing[0] is {spacing[0]}, but a single slice takes its thickness from it;"
        " expected a finite spacing > 0 mm"
    )
  area = np.linalg.norm(np.cross(affine[:3, 1], affine[:3, 2]))
  if area == 0:
    raise InputError(
        f"the affine's row and column steps {affine[:3, 1].tolist()} and"
        f" {affine[:3, 2].tolist()} span no area, so a pixel has no size"
    )


def _check_min_side_ml(min_side_ml: float) -> None:
  if isinstance(min_side_ml, bool) or not np.isfinite(min_side_ml) or min_side_ml < 0:
    raise InputError(f"min_side_ml must be a finite number >= 0 mL, got {min_side_ml!r}")


def pixel_area_mm2(volume: CTVolume) -> float:
  """In-plane pixel area, mm^2: the parallelogram of the affine's row and column steps."""
  row_step = np.asarray(volume.affine, np.float64)[:3, 1]
  column_step = np.asarray(volume.affine, np.float64)[:3, 2]
  return float(np.linalg.norm(np.cross(row_step, column_step)))


def slab_thickness_mm(volume: CTVolume) -> np.ndarray:
  """(slice,) thickness each slice stands for, mm, from the positions along the slice normal.

  A slice owns the slab between the midpoints to its neighbours. The first
  and last slices extend as far outwards as the gap to their one neighbour. A
  single slice uses the volume's slice spacing.

  Raises:
    InputError: two slices at the same position along the normal.
  """
  if volume.num_slices == 1:
    return np.array([float(volume.spacing[0])])
  along = np.asarray(volume.positions, np.float64) @ volume.slice_normal
  order = np.argsort(along)
  sorted_along = along[order]
  gaps = np.diff(sorted_along)
  if np.any(gaps <= 1e-6):
    k = int(np.argmin(gaps))
    raise InputError(
        f"slices {int(order[k])} and {int(order[k + 1])} lie at the same position "
        f"({sorted_along[k]:.3f} mm along the slice normal); remove the duplicate slice"
    )
  padded = np.concatenate([gaps[:1], gaps, gaps[-1:]])
  thickness = np.empty_like(along)
  thickness[order] = 0.5 * (padded[:-1] + padded[1:])
  return thickness


def voxel_volume_ml(volume: CTVolume) -> np.ndarray:
  """(slice,) volume of one voxel of each slice, mL.

  Raises:
    InputError: a non-finite affine or slice position, a pixel of no area, or
      two slices at the same position.
  """
  _check_geometry(volume)
  return pixel_area_mm2(volume) * slab_thickness_mm(volume) / 1000.0


def hematoma_ml(mask: np.ndarray, volume: CTVolume) -> dict[str, float]:
  """Blood volume per subtype, mL, in the scan's real geometry.

  Args:
    mask: integer (slice, row, column) class ids 0..5 on the volume's grid.
    volume: the scan the mask belongs to.

  Returns:
    Subtype name (`uem_ich_jax.SUBTYPES`) to mL; 0.0 for an absent subtype.

  Raises:
    InputError: mask shape differs from the volume's, the mask is not integer,
      a class id lies outside 0..5, or the geometry is invalid (see
      `voxel_volume_ml`).
  """
  mask = _check_mask(mask, volume)
  per_slice = voxel_volume_ml(volume)
  counts = np.stack(
      [np.bincount(mask[k].ravel(), minlength=len(SUBTYPES) + 1) for k in range(mask.shape[0])]
  )
  totals = per_slice @ counts
  return {name: float(totals[MASK_CLASS_IDS[name]]) for name in SUBTYPES}


def _pixel_to_lps(volume: CTVolume, k: np.ndarray, rows: np.ndarray, columns: np.ndarray):
  """LPS mm of pixel centres, from each slice's own position (exact when spacing varies)."""
  affine = np.asarray(volume.affine, np.float64)
  positions = np.asarray(volume.positions, np.float64)
  return (
      positions[k]
      + np.asarray(rows, np.float64)[:, None] * affine[:3, 1]
      + np.asarray(columns, np.float64)[:, None] * affine[:3, 2]
  )


def estimate_midline(volume: CTVolume, threshold_hu: float = HEAD_THRESHOLD_HU) -> Midline:
  """Estimates the midsagittal plane from the symmetry of the head section.

  The head is every voxel above `threshold_hu`. On each slice the plane passes
  through the centroid of the head section, which lies on the midline of a
  left-right symmetric head. Its direction is that of the longest in-plane
  axis of the head, from the second moments of all large sections together.
  That axis is the anterior-posterior one, because heads are longer than they
  are wide. Slices
  whose section is smaller than `MIN_SECTION_FRACTION` of the largest use the
  area-weighted mean point of the others.

  NOTE: the plane is the symmetry plane of the skull and scalp, not of the
  falx. Under midline shift the falx and septum lie off this plane, which is
  what a shift measurement compares against.

  Raises:
    InputError: no voxel above `threshold_hu` (not a head CT in HU).
  """
  hu = np.asarray(volume.hu)
  head = hu > threshold_hu
  areas = head.sum(axis=(1, 2)).astype(np.float64)
  if areas.max(initial=0.0) == 0.0:
    raise InputError(
        f"no voxel above {threshold_hu} HU, so the head and its midline cannot be found; "
        "pass midline= or check that the volume is in HU"
    )
  large = areas >= MIN_SECTION_FRACTION * areas.max()
  affine = np.asarray(volume.affine, np.float64)
  steps = affine[:3, 1:3]  # (3, 2): LPS mm per row and per column.

  centroids = np.zeros((volume.num_slices, 3))
  scatter = np.zeros((3, 3))
  for k in np.flatnonzero(large):
    rows, columns = np.nonzero(head[k])
    pixels = np.stack([rows, columns], axis=1).astype(np.float64)
    mean = pixels.mean(axis=0)
    centroids[k] = _pixel_to_lps(volume, np.array([k]), mean[:1], mean[1:])[0]
    centred = pixels - mean
    moments = centred.T @ centred  # Sum over the section, pixel units.
    scatter += steps @ moments @ steps.T

  eigenvalues, eigenvectors = np.linalg.eigh(scatter)
  anterior_posterior = eigenvectors[:, int(np.argmax(eigenvalues))]
  normal = np.cross(anterior_posterior, volume.slice_normal)
  normal /= np.linalg.norm(normal)
  if normal[0] < 0:
    normal = -normal

  weights = areas * large
  mean_point = (weights[:, None] * centroids).sum(axis=0) / weights.sum()
  centroids[~large] = mean_point
  return Midline(point_mm=centroids, normal=normal)


def _check_midline(midline: Midline, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
  normal = np.asarray(midline.normal, np.float64).reshape(-1)
  if normal.shape != (3,) or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) == 0:
    raise InputError(f"midline.normal must be a finite non-zero 3-vector, got {midline.normal}")
  normal = normal / np.linalg.norm(normal)
  # Both orientations describe the same plane, so the sign is a convention.
  if abs(normal[0]) < 0.5:
    raise InputError(
        f"midline.normal {normal.round(3).tolist()} is more than 60 degrees from the "
        "left-right (LPS x) axis, so it does not describe a midsagittal plane"
    )
  normal = normal * np.sign(normal[0])
  point = np.asarray(midline.point_mm, np.float64)
  if point.shape == (3,):
    point = np.broadcast_to(point, (volume.num_slices, 3))
  if point.shape != (volume.num_slices, 3):
    raise InputError(
        f"midline.point_mm must be (3,) or ({volume.num_slices}, 3), got {point.shape}"
    )
  if not np.all(np.isfinite(point)):
    raise InputError("midline.point_mm contains non-finite values; expected finite LPS mm")
  return point, normal


def side_from_ml(left_ml: float, right_ml: float, min_side_ml: float = MIN_SIDE_ML) -> str:
  """'left', 'right', 'bilateral' or 'none': the sides holding at least `min_side_ml`.

  Raises:
    InputError: a side's mL or `min_side_ml` that is not a finite number >= 0.
  """
  _check_min_side_ml(min_side_ml)
  for name, value in (("left_ml", left_ml), ("right_ml", right_ml)):
    if not np.isfinite(value) or value < 0:
      raise InputError(f"{name} must be a finite number >= 0 mL, got {value!r}")
  left, right = left_ml >= min_side_ml, right_ml >= min_side_ml
  if left and right:
    return "bilateral"
  if left:
    return "left"
  if right:
    return "right"
  return "none"


def bleed_side(
    mask: np.ndarray,
    volume: CTVolume,
    midline: Midline | None = None,
    min_side_ml: float = MIN_SIDE_ML,
) -> dict:
  """Side of the blood relative to the midsagittal plane, with the mL on each side.

  Every voxel with a class id above 0 counts, each with its slice's voxel
  volume. Its side is the sign of its signed distance to the plane along the
  normal, in LPS mm, so the side follows the affine whatever the array
  orientation (positive x is the patient's left). A voxel centre exactly on
  the plane counts half to each side. A side is bleeding when it contains at
  least `min_side_ml` of blood.

  Args:
    mask: integer (slice, row, column) class ids 0..5 on the volume's grid.
    volume: the scan in HU (the estimated midline needs the HU).
    midline: the plane to use; estimated with `estimate_midline` when None.
    min_side_ml: minimum blood on a side for it to count, mL.

  Returns:
    {"side": one of `SIDES`, "left_ml": float, "right_ml": float,
    "midline": the `Midline` used}.

  Raises:
    InputError: a bad mask or geometry (see `hematoma_ml`), a `min_side_ml`
      that is not a finite number >= 0, a midline that is not a midsagittal
      plane, or no head to estimate the midline from.
  """
  mask = _check_mask(mask, volume)
  _check_min_side_ml(min_side_ml)
  _check_geometry(volume)
  if midline is None:
    midline = estimate_midline(volume)
  points, normal = _check_midline(midline, volume)

  k, rows, columns = np.nonzero(mask)
  lps = _pixel_to_lps(volume, k, rows, columns)
  distance = np.einsum("ij,j->i", lps - points[k], normal)
  voxel_ml = voxel_volume_ml(volume)[k]
  left_ml = float(voxel_ml[distance > 0].sum() + 0.5 * voxel_ml[distance == 0].sum())
  right_ml = float(voxel_ml[distance < 0].sum() + 0.5 * voxel_ml[distance == 0].sum())
  return {
      "side": side_from_ml(left_ml, right_ml, min_side_ml),
      "left_ml": left_ml,
      "right_ml": right_ml,
      "midline": Midline(point_mm=points, normal=normal),
  }
