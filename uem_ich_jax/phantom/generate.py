"""Seeded synthetic head CT with any of the five acute hemorrhage subtypes.

Mask class ids follow the BHSD `dataset.json` label map: 0 background,
1 epidural, 2 intraparenchymal, 3 intraventricular, 4 subarachnoid,
5 subdural (`uem_ich_jax.MASK_CLASS_IDS`). MBH-Seg 2025 uses the same ids.
The comment in the UEM-ICH upstream's `mbh_inference.py` that lists 1 as
subdural and 5 as intraventricular contradicts `dataset.json`; this module
follows `dataset.json`.

Geometry is standard axial DICOM: ImageOrientationPatient [1,0,0,0,1,0], so
rows run anterior to posterior, columns from patient right to patient left,
and slices ascend from inferior to superior. The affine maps (slice, row,
column) to LPS mm, so a bleed on the patient's left has larger column indices
and a larger x.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from uem_ich_jax import MASK_CLASS_IDS, SLICE_LABELS, SUBTYPES
from uem_ich_jax.ct.volume import CTVolume, Provenance
from uem_ich_jax.phantom import anatomy, lesions
from uem_ich_jax.phantom.scan import PhantomScan

logger = logging.getLogger(__name__)

# Share of scans without a bleed when subtypes are drawn, and the odds of one,
# two or three subtypes in the others.
NORMAL_FRACTION = 0.3
SUBTYPE_COUNT_ODDS = (0.55, 0.3, 0.15)
# Noise is clipped at this many standard deviations so that blood stays within
# 50-90 HU (see `lesions.BLOOD_HU_RANGE`).
NOISE_CLIP_SD = 2.4
MAX_NOISE_HU = 5.0
# In-plane size the full head needs (left-right, anterior-posterior), mm; a
# smaller field of view shrinks the head to fit.
HEAD_EXTENT_MM = (170.0, 212.0)
# Attempts at placing a bleed before giving up on a forced subtype.
PLACEMENT_ATTEMPTS = 8

# In-plane 8-connectivity, never across slices: boxes are per slice.
_SLICE_CONNECTIVITY = np.array(
    [np.zeros((3, 3), bool), np.ones((3, 3), bool), np.zeros((3, 3), bool)]
)


def _draw_subtypes(rng: np.random.Generator) -> tuple[str, ...]:
  if rng.uniform() < NORMAL_FRACTION:
    return ()
  count = 1 + int(rng.choice(len(SUBTYPE_COUNT_ODDS), p=SUBTYPE_COUNT_ODDS))
  picked = rng.choice(len(SUBTYPES), size=count, replace=False)
  return tuple(SUBTYPES[i] for i in sorted(picked))


def _check_subtypes(subtypes: Sequence[str]) -> tuple[str, ...]:
  if isinstance(subtypes, str):
    raise ValueError(f"subtypes must be a sequence of names, got the string {subtypes!r}")
  unknown = [name for name in subtypes if name not in MASK_CLASS_IDS]
  if unknown:
    raise ValueError(f"unknown hemorrhage subtypes {unknown}; known: {list(SUBTYPES)}")
  return tuple(dict.fromkeys(subtypes))


def _slice_heights(rng: np.random.Generator, num_slices: int, slice_mm: float) -> np.ndarray:
  """Head-frame height of each slice: skull base to vertex when the stack is long enough."""
  extent = num_slices * slice_mm
  # Short stacks stay centred near the ventricles, long ones reach from the
  # skull base to the vertex, and longer ones add air above and below.
  middle = min(
      anatomy.HEAD_TOP_Z_MM - extent / 2,
      max(anatomy.VENTRICLE_Z_MM, anatomy.HEAD_BOTTOM_Z_MM + extent / 2),
  )
  middle += rng.uniform(-3.0, 3.0)
  return middle + (np.arange(num_slices) - (num_slices - 1) / 2) * slice_mm


def _geometry(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], tilt_deg: float
) -> tuple[np.ndarray, np.ndarray]:
  """Slice positions and affine (LPS mm) of an axial stack, sheared by the gantry tilt.

  With a tilted gantry the slice planes stay axial here and each slice starts
  `slice_mm * tan(tilt)` further anterior than the one below it. That is the
  sign dcm2niix reports (and `CTVolume.provenance.gantry_tilt_deg` records)
  when it estimates the tilt from the slice positions.
  """
  num_slices, rows, columns = shape
  slice_mm, row_mm, column_mm = spacing_mm
  shear = -slice_mm * np.tan(np.radians(tilt_deg))
  slice_step = np.array([0.0, shear, slice_mm])
  first = np.array(
      [
          -(columns - 1) / 2 * column_mm,
          -(rows - 1) / 2 * row_mm - (num_slices - 1) / 2 * shear,
          -(num_slices - 1) / 2 * slice_mm,
      ]
  )
  positions = first[None, :] + np.arange(num_slices)[:, None] * slice_step[None, :]
  affine = np.eye(4)
  affine[:3, 0] = slice_step
  affine[:3, 1] = [0.0, row_mm, 0.0]
  affine[:3, 2] = [column_mm, 0.0, 0.0]
  affine[:3, 3] = first
  return positions, affine


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], sd_hu: float) -> np.ndarray:
  """Gaussian noise with a little in-plane correlation, clipped at `NOISE_CLIP_SD`."""
  white = rng.standard_normal(shape, dtype=np.float32)
  noise = white + 0.5 * (np.roll(white, 1, axis=1) + np.roll(white, 1, axis=2))
  noise *= np.float32(1.0 / np.sqrt(1.5))
  np.clip(noise, -NOISE_CLIP_SD, NOISE_CLIP_SD, out=noise)
  noise *= np.float32(sd_hu)
  return noise


def _place_bleed(
    name: str, rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head
) -> lesions.Bleed:
  last_error = None
  for _ in range(PLACEMENT_ATTEMPTS):
    try:
      return lesions.MAKERS[name](rng, grid, head)
    except lesions.NoRoomError as error:
      last_error = error
  raise ValueError(
      f"cannot place a {name} hemorrhage on this grid ({last_error}); "
      "use more slices or a larger field of view"
  )


def slice_labels_from_mask(mask: np.ndarray) -> np.ndarray:
  """(slice, 6) uint8 labels in the order of `SLICE_LABELS`; `any` is the max of the rest."""
  labels = np.zeros((mask.shape[0], len(SLICE_LABELS)), np.uint8)
  for name in SUBTYPES:
    present = (mask == MASK_CLASS_IDS[name]).any(axis=(1, 2))
    labels[:, SLICE_LABELS.index(name)] = present
  labels[:, 0] = labels[:, 1:].max(axis=1)
  return labels


def scan_labels_from_mask(mask: np.ndarray) -> dict[str, int]:
  """Scan labels: each of `SLICE_LABELS` is 1 when any voxel of the scan has it."""
  counts = np.bincount(mask.ravel(), minlength=len(SUBTYPES) + 1)
  labels = {name: int(counts[MASK_CLASS_IDS[name]] > 0) for name in SUBTYPES}
  return {"any": max(labels.values()), **labels}


def boxes_from_mask(mask: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """Finds one box per 8-connected region of each class on each slice.

  Boxes are float32 (row_min, column_min, row_max, column_max) in pixels,
  min inclusive and max exclusive, sorted by class id and then by the raster
  order of each region's first pixel.
  """
  boxes: list[list[tuple[int, int, int, int]]] = [[] for _ in range(mask.shape[0])]
  classes: list[list[int]] = [[] for _ in range(mask.shape[0])]
  # Labelling only the slices with blood saves most of the work.
  bleeding = np.nonzero(mask.any(axis=(1, 2)))[0]
  first, stop = (int(bleeding[0]), int(bleeding[-1]) + 1) if bleeding.size else (0, 0)
  sub = mask[first:stop]
  for class_id in range(1, len(SUBTYPES) + 1):
    region = sub == class_id
    if not region.any():
      continue
    regions, _ = ndimage.label(region, structure=_SLICE_CONNECTIVITY)
    for found in ndimage.find_objects(regions):
      if found is None:
        continue
      index = first + found[0].start
      boxes[index].append((found[1].start, found[2].start, found[1].stop, found[2].stop))
      classes[index].append(class_id)
  box_arrays = tuple(np.array(b, np.float32).reshape(-1, 4) for b in boxes)
  class_arrays = tuple(np.array(c, np.int32) for c in classes)
  return box_arrays, class_arrays


def hematoma_ml_from_mask(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
  """Blood volume per subtype, mL: voxel count times voxel volume."""
  voxel_ml = float(np.prod(spacing_mm)) / 1000.0
  counts = np.bincount(mask.ravel(), minlength=len(SUBTYPES) + 1)
  return {name: float(counts[MASK_CLASS_IDS[name]]) * voxel_ml for name in SUBTYPES}


def _default_ids(seed: int, patient_id: str | None, scan_id: str | None) -> tuple[str, str]:
  digest = hashlib.sha256(f"uem-ich-phantom-{seed}".encode()).hexdigest()
  return patient_id or f"PHANTOM-{digest[:10]}", scan_id or f"PHANTOM-{digest[:10]}-{seed}"


def generate_scan(
    seed: int,
    shape: tuple[int, int, int] = (32, 256, 256),
    *,
    spacing_mm: tuple[float, float, float] = (5.0, 0.9, 0.9),
    subtypes: Sequence[str] | None = None,
    patient_id: str | None = None,
    scan_id: str | None = None,
    tilt_deg: float = 0.0,
    noise_hu: float | None = None,
) -> PhantomScan:
  """Generates one synthetic head CT and its ground truth.

  Args:
    seed: seed of `numpy.random.default_rng`; the same arguments give the same
      scan.
    shape: (slice, row, column).
    spacing_mm: (slice, row, column) spacing; slices are contiguous.
    subtypes: names from `uem_ich_jax.SUBTYPES` to place (an empty tuple gives
      a normal scan), or None to draw: 30% normal, the rest one to three
      subtypes.
    patient_id: defaults to an id derived from the seed. Scans given the same
      patient id share the head anatomy (sizes, sulci, ventricles, densities).
    scan_id: defaults to an id derived from the seed.
    tilt_deg: gantry tilt in degrees, with dcm2niix's sign; shears the slice
      positions along the anterior-posterior axis.
    noise_hu: noise standard deviation; drawn from 4-5 HU when None.

  Raises:
    ValueError: unknown subtype, invalid shape, spacing, tilt or noise, or a
      forced subtype that no slice of this grid can hold (a drawn one is left
      out with a warning).
  """
  shape = tuple(int(n) for n in shape)
  spacing_mm = tuple(float(s) for s in spacing_mm)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be 3 positive sizes (slice, row, column), got {shape}")
  if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
    raise ValueError(f"spacing_mm must be 3 positive sizes, got {spacing_mm}")
  if not -45.0 < tilt_deg < 45.0:
    raise ValueError(f"tilt_deg must be within (-45, 45), got {tilt_deg}")
  if noise_hu is not None and not 0.0 <= noise_hu <= MAX_NOISE_HU:
    raise ValueError(f"noise_hu must be within [0, {MAX_NOISE_HU}], got {noise_hu}")

  rng = np.random.default_rng(seed)
  names = _draw_subtypes(rng) if subtypes is None else _check_subtypes(subtypes)
  noise_sd = float(rng.uniform(4.0, MAX_NOISE_HU)) if noise_hu is None else float(noise_hu)

  # Anatomy is drawn in a canonical head frame; a small field of view scales
  # the grid instead of cutting the head.
  fit = min(
      1.0,
      shape[2] * spacing_mm[2] / HEAD_EXTENT_MM[0],
      shape[1] * spacing_mm[1] / HEAD_EXTENT_MM[1],
  )
  if fit < 1.0:
    logger.debug("field of view of %s voxels is small: head scaled by %.2f", shape, fit)
  # Scans of one given patient share the head, so a follow-up scan shows the
  # same anatomy. Position, noise and bleeds still come from `seed`.
  if patient_id is None:
    params = anatomy.draw_head_params(rng)
  else:
    patient_digest = hashlib.sha256(f"uem-ich-phantom-patient-{patient_id}".encode()).digest()
    params = anatomy.draw_head_params(np.random.default_rng(list(patient_digest[:16])))
  positions, affine = _geometry(shape, spacing_mm, tilt_deg)
  heights = _slice_heights(rng, shape[0], spacing_mm[0])
  row_shift = positions[:, 1] - positions[0, 1] - (positions[-1, 1] - positions[0, 1]) / 2
  canonical_spacing = tuple(s / fit for s in spacing_mm)
  grid = anatomy.make_grid(
      shape,
      canonical_spacing,
      slice_z_mm=heights,
      row_shift_mm=row_shift / fit,
      center_mm=(rng.uniform(-4.0, 4.0), rng.uniform(-6.0, 6.0)),
      yaw_deg=rng.uniform(-5.0, 5.0),
  )
  head = anatomy.build_head(grid, params)

  # TODO: mass effect (midline shift, effaced sulci and ventricles) is not
  # modelled, so a large bleed covers anatomy instead of displacing it.
  hu = head.hu
  mask = np.zeros(shape, np.uint8)
  blood_hu = np.zeros(shape, np.float32)
  for name in names:
    try:
      bleed = _place_bleed(name, rng, grid, head)
    except ValueError as error:
      if subtypes is not None:
        raise
      # A drawn subtype that this grid cannot hold is left out; the labels
      # come from the mask, so they stay true.
      logger.warning("seed %d: %s", seed, error)
      continue
    region = hu[bleed.box]
    if bleed.edema_fraction is not None:
      region -= bleed.edema_fraction * np.float32(rng.uniform(6.0, 12.0))
    region += bleed.fraction * (np.float32(bleed.blood_hu) - region)
    mask[bleed.box][bleed.core] = MASK_CLASS_IDS[name]
    blood_hu[bleed.box][bleed.core] = bleed.blood_hu
  # A later bleed's edema or edge ramp may have lowered an earlier bleed's
  # blood, so every mask voxel gets back the density of the bleed it belongs to.
  bleeding = mask > 0
  hu[bleeding] = blood_hu[bleeding]
  hu += _noise(rng, shape, noise_sd)

  pid, sid = _default_ids(seed, patient_id, scan_id)
  volume = CTVolume(
      hu=hu,
      positions=positions,
      affine=affine,
      spacing=spacing_mm,
      provenance=Provenance(
          patient_id=pid,
          series_description=f"uem-ich phantom seed {seed}",
          kernel="PHANTOM",
          gantry_tilt_deg=float(tilt_deg),
      ),
  )
  boxes, box_classes = boxes_from_mask(mask)
  return PhantomScan(
      volume=volume,
      mask=mask,
      slice_labels=slice_labels_from_mask(mask),
      scan_labels=scan_labels_from_mask(mask),
      boxes=boxes,
      box_classes=box_classes,
      hematoma_ml=hematoma_ml_from_mask(mask, spacing_mm),
      patient_id=pid,
      scan_id=sid,
  )
