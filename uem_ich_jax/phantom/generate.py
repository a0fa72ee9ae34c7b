"""Seeded synthetic head CT with the five acute hemorrhage subtypes and the CQ500 findings.

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

Besides the acute bleeds, a scan can have a chronic subdural collection (mask
class 5), a calvarial or other skull fracture, and a midline shift from the
mass of its bleeds (see `findings`). Its `scan_labels` hold the six slice
labels and the 14 CQ500 labels (`cq500_labels` gives the rules).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import numbers
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from uem_ich_jax import CQ500_LABELS, MASK_CLASS_IDS, SLICE_LABELS, SUBTYPES, clinical
from uem_ich_jax.ct.volume import CTVolume, Provenance
from uem_ich_jax.errors import InputError
from uem_ich_jax.phantom import anatomy, findings, lesions
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

# New findings, drawn from their own generator when subtypes are drawn: share
# of scans with a chronic subdural collection, and odds of each fracture kind.
CHRONIC_FRACTION = 0.2
FRACTURE_ODDS = {"calvarial": 0.18, "other": 0.15}
# Midline shift from mass effect. The net mass is the supratentorial volume
# of space-occupying blood (epidural, intraparenchymal, subdural, chronic
# included) on one side minus the other. It shifts the septum away from the
# larger side by SHIFT_MM_PER_ML per mL beyond SHIFT_FREE_ML, times a drawn
# compliance of the brain, up to `findings.MAX_SHIFT_MM`: about 5 mm for a
# net 50 mL.
SPACE_OCCUPYING = ("epidural", "intraparenchymal", "subdural")
SHIFT_FREE_ML = 15.0
SHIFT_MM_PER_ML = 0.15
SHIFT_COMPLIANCE = (0.7, 1.3)
# A drawn shift below this is not applied and is recorded as 0, because it
# would move the septum by less than a pixel of the usual grids.
MIN_DRAWN_SHIFT_MM = 1.0
# Label thresholds on the septum shift. MassEffect starts at 2 mm because the
# phantom has no other sign of mass effect (sulcal and ventricular effacement
# are not modelled). MidlineShift starts at 5 mm, the usual clinical threshold
# for a significant shift.
MASS_EFFECT_SHIFT_MM = 2.0
MIDLINE_SHIFT_LABEL_MM = 5.0

# Boxes are drawn per bleed, as a reader would, not per island of mask pixels.
# Pieces of one class at most this far apart on a slice share a box. A bleed
# smaller than this area on a slice gets none. With boxes per 8-connected
# region, a quarter of the intraparenchymal boxes of the 96 px curriculum data
# were one or two pixels long, and subarachnoid slices averaged two boxes.
BOX_MERGE_GAP_MM = 5.0
BOX_MIN_AREA_MM2 = 20.0

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


def _place(maker, description: str, rng: np.random.Generator, grid, head):
  """Calls `maker(rng, grid, head)` until it finds room, at most `PLACEMENT_ATTEMPTS` times."""
  last_error = None
  for _ in range(PLACEMENT_ATTEMPTS):
    try:
      return maker(rng, grid, head)
    except lesions.NoRoomError as error:
      last_error = error
  raise ValueError(
      f"cannot place a {description} on this grid ({last_error}); "
      "use more slices or a larger field of view"
  )


def _place_finding(maker, description: str, rng, grid, head, *, forced: bool, seed: int):
  """Places a new finding. A drawn one that finds no room is left out with a log line."""
  try:
    return _place(maker, description, rng, grid, head)
  except ValueError as error:
    if forced:
      raise InputError(str(error)) from error
    logger.info("seed %d: %s", seed, error)
    return None


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


def boxes_from_mask(
    mask: np.ndarray,
    pixel_mm: tuple[float, float],
    *,
    merge_gap_mm: float = BOX_MERGE_GAP_MM,
    min_area_mm2: float = BOX_MIN_AREA_MM2,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """Finds one box per bleed of each class on each slice, as a reader would draw them.

  The bleeds of a class on a slice are its 8-connected regions after joining
  regions that are at most `merge_gap_mm` apart (the mask is dilated by half
  the gap, in whole pixels, before labelling). Each box spans the bleed's own
  pixels, not the dilation. A bleed of less than `min_area_mm2` on the slice
  gets no box. The mask, slice labels and volumes keep every voxel; only the
  boxes follow this rule.

  Args:
    mask: (slice, row, column) class ids.
    pixel_mm: (row, column) pixel spacing.
    merge_gap_mm: regions with at most this gap between them form one bleed.
    min_area_mm2: smallest bleed area that gets a box.

  Returns:
    Per slice, float32 (row_min, column_min, row_max, column_max) boxes in
    pixels (min inclusive, max exclusive) and their int32 class ids. Boxes are
    sorted by class id, then by the raster order of each bleed's first pixel.
  """
  row_mm, column_mm = (float(value) for value in pixel_mm)
  if not (row_mm > 0 and column_mm > 0):
    raise ValueError(f"pixel_mm must be two positive spacings, got {pixel_mm}")
  # Dilating both regions by r pixels closes gaps of up to 2r pixels.
  radius = int(merge_gap_mm / max(row_mm, column_mm) // 2)
  min_pixels = min_area_mm2 / (row_mm * column_mm)
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
    joined = region
    if radius:
      joined = ndimage.binary_dilation(region, structure=_SLICE_CONNECTIVITY, iterations=radius)
    bleeds, _ = ndimage.label(joined, structure=_SLICE_CONNECTIVITY)
    bleeds[~region] = 0
    for label, found in enumerate(ndimage.find_objects(bleeds), start=1):
      if found is None:
        continue
      # `found` is the tight box of the bleed's own pixels: the dilation was
      # cleared from `bleeds` above.
      if np.count_nonzero(bleeds[found] == label) < min_pixels:
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


@dataclasses.dataclass(frozen=True)
class _FindingsPlan:
  """New findings requested for one scan, before placement."""

  chronic: bool
  fracture: str
  compliance: float
  toward_without_mass: float


def _check_findings(
    chronic: bool | None, fracture: str | None, midline_shift_mm: float | None
) -> None:
  if chronic is not None and not isinstance(chronic, (bool, np.bool_)):
    raise InputError(f"chronic must be True, False or None (drawn), got {chronic!r}")
  if fracture is not None and fracture not in findings.FRACTURE_KINDS:
    raise InputError(
        f"fracture must be one of {findings.FRACTURE_KINDS} or None (drawn), got {fracture!r}"
    )
  if midline_shift_mm is not None:
    if isinstance(midline_shift_mm, bool) or not isinstance(midline_shift_mm, numbers.Real):
      raise InputError(f"midline_shift_mm must be a number of mm or None, got {midline_shift_mm!r}")
    if not 0.0 <= midline_shift_mm <= findings.MAX_SHIFT_MM:
      raise InputError(
          f"midline_shift_mm must be within [0, {findings.MAX_SHIFT_MM}] mm, got {midline_shift_mm}"
      )


def _plan_findings(
    rng: np.random.Generator, drawing: bool, chronic: bool | None, fracture: str | None
) -> _FindingsPlan:
  """Draws the new findings. A forced value wins, and forced subtypes turn the others off."""
  # Every draw happens whatever is forced, so that forcing one finding keeps
  # the others of the same seed.
  chronic_draw = rng.uniform()
  fracture_draw = rng.uniform()
  compliance = float(rng.uniform(*SHIFT_COMPLIANCE))
  toward = float(rng.choice((-1.0, 1.0)))
  if chronic is None:
    chronic = drawing and chronic_draw < CHRONIC_FRACTION
  if fracture is None:
    fracture = "none"
    if drawing:
      threshold = 0.0
      for kind, odds in FRACTURE_ODDS.items():
        threshold += odds
        if fracture_draw < threshold:
          fracture = kind
          break
  return _FindingsPlan(
      chronic=bool(chronic), fracture=fracture, compliance=compliance, toward_without_mass=toward
  )


def _mass_ml_by_side(
    bleeds: Sequence[lesions.Bleed], grid: anatomy.Grid, voxel_ml: float
) -> tuple[float, float]:
  """Sums the supratentorial blood of space-occupying bleeds on the head's left and right, mL."""
  left = right = 0
  above = grid.z[:, 0, 0] > anatomy.TENTORIUM_Z_MM
  for bleed in bleeds:
    core = bleed.core & above[bleed.box[0]][:, None, None]
    x = grid.x[bleed.box][core]
    left += int(np.count_nonzero(x > 0))
    right += int(np.count_nonzero(x < 0))
  return left * voxel_ml, right * voxel_ml


def _midline_shift(
    plan: _FindingsPlan, drawing: bool, forced_mm: float | None, left_ml: float, right_ml: float,
    max_mm: float,
) -> tuple[float, float]:
  """Computes the septum shift (patient mm) and its direction (+1 left, -1 right) from the mass."""
  net_ml = left_ml - right_ml
  toward = -float(np.sign(net_ml)) if net_ml else plan.toward_without_mass
  if forced_mm is not None:
    return float(forced_mm), toward
  if not drawing:
    return 0.0, toward
  shift = SHIFT_MM_PER_ML * (abs(net_ml) - SHIFT_FREE_ML) * plan.compliance
  if shift < MIN_DRAWN_SHIFT_MM:
    return 0.0, toward
  return float(min(shift, max_mm)), toward


def _side_ml(
    mask: np.ndarray, grid: anatomy.Grid, warp: findings.MidlineWarp | None, voxel_ml: float
) -> tuple[float, float]:
  """Sums the blood on the head's left and right, by the hemisphere each voxel came from."""
  if warp is None:
    x = grid.x[mask > 0]
  else:
    x = grid.x.copy()
    x[warp.box] -= warp.displacement_mm
    x = x[mask > 0]
  on_plane = 0.5 * np.count_nonzero(x == 0)
  left = np.count_nonzero(x > 0) + on_plane
  right = np.count_nonzero(x < 0) + on_plane
  return float(left * voxel_ml), float(right * voxel_ml)


def cq500_labels(
    scan_labels: dict[str, int], bleed_side: str, chronic_ml: float, fracture: str,
    midline_shift_mm: float,
) -> dict[str, int]:
  """Derives the 14 CQ500 scan labels (`uem_ich_jax.CQ500_LABELS`) of a phantom scan.

  ICH and its subtypes come from the mask (`scan_labels`). A side is bleeding
  under the rule of `clinical.side_from_ml`. MassEffect needs a septum shift
  of at least `MASS_EFFECT_SHIFT_MM`, and MidlineShift one of at least
  `MIDLINE_SHIFT_LABEL_MM`.
  """
  labels = {
      "ICH": scan_labels["any"],
      "IPH": scan_labels["intraparenchymal"],
      "IVH": scan_labels["intraventricular"],
      "SDH": scan_labels["subdural"],
      "EDH": scan_labels["epidural"],
      "SAH": scan_labels["subarachnoid"],
      "BleedLocation-Left": int(bleed_side in ("left", "bilateral")),
      "BleedLocation-Right": int(bleed_side in ("right", "bilateral")),
      "ChronicBleed": int(chronic_ml > 0.0),
      "Fracture": int(fracture != "none"),
      "CalvarialFracture": int(fracture == "calvarial"),
      "OtherFracture": int(fracture == "other"),
      "MassEffect": int(midline_shift_mm >= MASS_EFFECT_SHIFT_MM),
      "MidlineShift": int(midline_shift_mm >= MIDLINE_SHIFT_LABEL_MM),
  }
  return {name: labels[name] for name in CQ500_LABELS}


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
    chronic: bool | None = None,
    fracture: str | None = None,
    midline_shift_mm: float | None = None,
) -> PhantomScan:
  """Generates one synthetic head CT and its ground truth.

  The acute bleeds, anatomy, position and noise come from
  `numpy.random.default_rng(seed)`. The chronic subdural collection, the
  fracture and the midline shift come from a second generator,
  `default_rng([seed, 1])`, so a scan without them is the same as before they
  existed.

  Args:
    seed: seed of `numpy.random.default_rng`; the same arguments give the same
      scan.
    shape: (slice, row, column).
    spacing_mm: (slice, row, column) spacing; slices are contiguous.
    subtypes: names from `uem_ich_jax.SUBTYPES` to place (an empty tuple gives
      a normal scan), or None to draw: 30% normal, the rest one to three
      subtypes. With subtypes given, the findings below are absent unless
      forced.
    patient_id: defaults to an id derived from the seed. Scans given the same
      patient id share the head anatomy (sizes, sulci, ventricles, densities).
    scan_id: defaults to an id derived from the seed.
    tilt_deg: gantry tilt in degrees, with dcm2niix's sign; shears the slice
      positions along the anterior-posterior axis.
    noise_hu: noise standard deviation; drawn from 4-5 HU when None.
    chronic: True adds a chronic (hypodense) subdural collection, False
      leaves it out, None draws it (in `CHRONIC_FRACTION` of scans) when
      `subtypes` is None.
    fracture: "calvarial", "other" or "none"; None draws it (`FRACTURE_ODDS`)
      when `subtypes` is None.
    midline_shift_mm: septum displacement in patient mm, within
      [0, `findings.MAX_SHIFT_MM`], away from the side with more
      space-occupying blood (a drawn side when there is none). None derives it
      from the blood when `subtypes` is None and gives 0 otherwise.

  Raises:
    ValueError: unknown subtype, invalid shape, spacing, tilt or noise, or a
      forced subtype that no slice of this grid can hold (a drawn one is left
      out with a warning). `InputError` (a ValueError) for an invalid
      `chronic`, `fracture` or `midline_shift_mm`, or a forced finding that
      this grid cannot hold (a drawn one is left out).
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
  _check_findings(chronic, fracture, midline_shift_mm)

  rng = np.random.default_rng(seed)
  drawing = subtypes is None
  names = _draw_subtypes(rng) if drawing else _check_subtypes(subtypes)
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
  if midline_shift_mm is not None and midline_shift_mm > findings.MAX_SHIFT_MM * fit:
    raise InputError(
        f"midline_shift_mm {midline_shift_mm} is more than {findings.MAX_SHIFT_MM * fit:.1f} mm, "
        f"the most this field of view allows (the head is scaled by {fit:.2f} to fit)"
    )
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
  center_mm = (rng.uniform(-4.0, 4.0), rng.uniform(-6.0, 6.0))
  yaw_deg = rng.uniform(-5.0, 5.0)
  grid = anatomy.make_grid(
      shape,
      canonical_spacing,
      slice_z_mm=heights,
      row_shift_mm=row_shift / fit,
      center_mm=center_mm,
      yaw_deg=yaw_deg,
  )
  head = anatomy.build_head(grid, params)

  # Bleeds are placed on the straight head; painting waits for the midline
  # shift, which depends on their size. The edema draw stays right after its
  # bleed so that the random stream keeps its order.
  placed = []
  for name in names:
    try:
      bleed = _place(lesions.MAKERS[name], f"{name} hemorrhage", rng, grid, head)
    except ValueError as error:
      if subtypes is not None:
        raise
      # A drawn subtype that this grid cannot hold is left out; the labels
      # come from the mask, so they stay true.
      logger.warning("seed %d: %s", seed, error)
      continue
    edema_hu = None if bleed.edema_fraction is None else np.float32(rng.uniform(6.0, 12.0))
    placed.append((name, bleed, edema_hu))

  findings_rng = np.random.default_rng([seed, 1])
  plan = _plan_findings(findings_rng, drawing, chronic, fracture)
  chronic_bleed = None
  if plan.chronic:
    chronic_bleed = _place_finding(
        lesions.chronic_subdural, "chronic subdural collection", findings_rng, grid, head,
        forced=chronic is not None, seed=seed,
    )

  voxel_ml = float(np.prod(spacing_mm)) / 1000.0
  mass = [bleed for name, bleed, _ in placed if name in SPACE_OCCUPYING]
  mass += [chronic_bleed] if chronic_bleed is not None else []
  shift_mm, toward = _midline_shift(
      plan, drawing, midline_shift_mm, *_mass_ml_by_side(mass, grid, voxel_ml),
      max_mm=findings.MAX_SHIFT_MM * fit,
  )
  warp = None
  if shift_mm > 0.0:
    warp = findings.make_midline_warp(
        grid, params, shift_mm / fit, toward, yaw_deg, canonical_spacing[1:]
    )
    if warp is None:
      if midline_shift_mm is not None:
        raise InputError(
            "no slice of this grid reaches the lateral ventricles, so a midline shift "
            "cannot show; use more slices"
        )
      shift_mm = 0.0
  if warp is not None:
    head = findings.warp_head(grid, params, head, warp)
    placed = [(name, findings.warp_bleed(b, warp, shape), e) for name, b, e in placed]
    if chronic_bleed is not None:
      chronic_bleed = findings.warp_bleed(chronic_bleed, warp, shape)

  fracture_found = None
  if plan.fracture != "none":
    fracture_found = _place_finding(
        findings.FRACTURE_MAKERS[plan.fracture], f"{plan.fracture} fracture", findings_rng,
        grid, head, forced=fracture is not None, seed=seed,
    )

  hu = head.hu
  mask = np.zeros(shape, np.uint8)
  blood_hu = np.zeros(shape, np.float32)
  chronic_core = None
  if chronic_bleed is not None:
    region = hu[chronic_bleed.box]
    region += chronic_bleed.fraction * (np.float32(chronic_bleed.blood_hu) - region)
    mask[chronic_bleed.box][chronic_bleed.core] = MASK_CLASS_IDS["subdural"]
    blood_hu[chronic_bleed.box][chronic_bleed.core] = chronic_bleed.blood_hu
    chronic_core = np.zeros(shape, bool)
    chronic_core[chronic_bleed.box] = chronic_bleed.core
  for name, bleed, edema_hu in placed:
    region = hu[bleed.box]
    if edema_hu is not None:
      region -= bleed.edema_fraction * edema_hu
    region += bleed.fraction * (np.float32(bleed.blood_hu) - region)
    mask[bleed.box][bleed.core] = MASK_CLASS_IDS[name]
    blood_hu[bleed.box][bleed.core] = bleed.blood_hu
    if chronic_core is not None:
      # Acute blood over a chronic collection is acute.
      chronic_core[bleed.box][bleed.core] = False
  if chronic and not chronic_core.any():
    # Acute bleeds drawn on a small grid can cover the whole collection.
    raise InputError(
        "the forced chronic subdural collection is covered by acute blood on this grid, so no"
        " voxel of it shows; use more slices, a larger field of view or subtypes=()"
    )
  # A later bleed's edema or edge ramp may have lowered an earlier bleed's
  # blood, so every mask voxel gets back the density of the bleed it belongs to.
  bleeding = mask > 0
  hu[bleeding] = blood_hu[bleeding]

  fracture_mask = np.zeros(shape, bool)
  if fracture_found is not None:
    # The gap stays out of the blood, so every mask voxel keeps its density.
    fraction = fracture_found.fraction * ~bleeding[fracture_found.box]
    if not (fraction >= 1.0).any():
      message = f"the {plan.fracture} fracture gap lies wholly in blood on this grid, so it cannot show"
      if fracture is not None:
        raise InputError(f"{message}; use more slices or a larger field of view")
      logger.info("seed %d: %s; it is left out", seed, message)
      fracture_found = None
  if fracture_found is not None:
    region = hu[fracture_found.box]
    region += fraction * (np.float32(fracture_found.fill_hu) - region)
    fracture_mask[fracture_found.box] = fraction >= 1.0
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
  boxes, box_classes = boxes_from_mask(mask, spacing_mm[1:])
  left_ml, right_ml = _side_ml(mask, grid, warp, voxel_ml)
  side = clinical.side_from_ml(left_ml, right_ml)
  chronic_ml = 0.0 if chronic_core is None else float(np.count_nonzero(chronic_core)) * voxel_ml
  fracture_kind = "none" if fracture_found is None else fracture_found.kind
  scan_labels = scan_labels_from_mask(mask)
  scan_labels.update(cq500_labels(scan_labels, side, chronic_ml, fracture_kind, shift_mm))
  return PhantomScan(
      volume=volume,
      mask=mask,
      slice_labels=slice_labels_from_mask(mask),
      scan_labels=scan_labels,
      boxes=boxes,
      box_classes=box_classes,
      hematoma_ml=hematoma_ml_from_mask(mask, spacing_mm),
      patient_id=pid,
      scan_id=sid,
      bleed_ml_left=left_ml,
      bleed_ml_right=right_ml,
      bleed_side=side,
      midline_shift_mm=shift_mm,
      midline_shift_toward={1.0: "left", -1.0: "right"}[toward] if shift_mm > 0 else "none",
      fracture=fracture_kind,
      fracture_mask=fracture_mask,
      chronic_ml=chronic_ml,
  )
