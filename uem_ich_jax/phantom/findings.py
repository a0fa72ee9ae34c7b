"""Findings beyond the acute bleeds: midline shift from mass effect, and skull fractures.

Midline shift is a warp of the head frame along x (patient left-right). The
head is sampled again at the displaced coordinates, so the falx, ventricles
and septum move without interpolation blur, and the bleeds placed on the
straight head are carried along by nearest-neighbour lookup. The displacement
is zero at the inner table of the skull and outside it, so bone and scalp stay
where they were.

TODO: only the midline moves. The sulci and the ventricle on the side of the
mass are not effaced, so the phantom shows no mass effect below the 2 mm
shift that sets the MassEffect label.

A fracture replaces the bone along a thin plane, limited to a disc, by soft
tissue. On the calvarium the plane is radial, so the gap runs through the full
thickness of the skull over a few slices. Elsewhere (skull base, orbital and
sinus walls) the plane has any direction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uem_ich_jax.phantom import anatomy, lesions

# Largest displacement of the warp in head-frame mm. Beyond it the warp would
# fold (its x-derivative reaches -1) on the smallest heads.
MAX_SHIFT_MM = 14.0
# Shares of the inner-table half-width that move rigidly with the septum, on
# the side the midline moves towards and on the side of the mass. Beyond them
# the displacement falls smoothly to zero at the inner table.
_RIGID_TOWARD = 0.3
_RIGID_MASS_SIDE = 0.5
# Heights (head frame, mm) where the shift rises from 0 to full, above the
# tentorium that separates the hemispheres from the posterior fossa. It falls
# back to 0 towards the vertex, where the falx is fixed to the skull.
_SHIFT_RISE_Z_MM = (anatomy.TENTORIUM_Z_MM, 64.0)
_SHIFT_FALL_Z_MM = (100.0, 140.0)

FRACTURE_KINDS = ("none", "calvarial", "other")
# A fracture gap is drawn from this width but never narrower than two pixels,
# so that partial volume does not hide it on coarse grids.
FRACTURE_GAP_MM = (1.0, 3.0)
FRACTURE_FILL_HU = (25.0, 55.0)
# Bone: noise-free HU above this value is cut by a fracture.
BONE_HU = 300.0
# Calvarial fractures start on bone between these heights; other fractures
# on bone below the lowest height of the calvarium.
CALVARIAL_Z_MM = (55.0, 135.0)
OTHER_FRACTURE_TOP_Z_MM = 36.0


def _smoothstep(edge0: float, edge1: float, value: np.ndarray) -> np.ndarray:
  t = np.clip((value - edge0) / (edge1 - edge0), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _taper(t: np.ndarray, rigid: float) -> np.ndarray:
  """1 up to `rigid`, then a half cosine down to 0 at 1, and 0 beyond."""
  phase = np.clip((t - rigid) / (1.0 - rigid), 0.0, 1.0)
  return 0.5 * (1.0 + np.cos(np.pi * phase))


def midline_displacement_mm(
    grid: anatomy.Grid, params: anatomy.HeadParams, shift_mm: float, toward: float
) -> np.ndarray:
  """Displacement along head x (mm) at every voxel of `grid`, for a septum shift of `shift_mm`.

  The displacement is `toward * shift_mm` times three factors. Across the
  head it is 1 near the midline and 0 at the inner table (see `_RIGID_TOWARD`).
  Along the head it is 1 - v^2, with v the anterior-posterior position over
  the inner-table half-length, so the falx bows and stays fixed at the front
  and back. In height it follows `_SHIFT_RISE_Z_MM` and `_SHIFT_FALL_Z_MM`.
  The septum lies at v = 0 and within the rigid part, so it moves by exactly
  `shift_mm` at the heights of the lateral ventricles.

  Args:
    grid: head-frame coordinates.
    params: the head, for the inner-table section at each height.
    shift_mm: septum displacement, head-frame mm, at most `MAX_SHIFT_MM`.
    toward: +1 to move the midline towards the patient's left, -1 to the right.
  """
  semi_x, semi_y, center_y = anatomy.inner_table_section(grid.z, params)
  v = (grid.y - center_y) / semi_y
  chord = np.clip(1.0 - v * v, 0.0, 1.0)
  half_width = semi_x * np.sqrt(chord)
  across = toward * grid.x / np.maximum(half_width, 1e-3)
  profile = np.where(
      across >= 0.0, _taper(across, _RIGID_TOWARD), _taper(-across, _RIGID_MASS_SIDE)
  )
  height = _smoothstep(*_SHIFT_RISE_Z_MM, grid.z) * (1.0 - _smoothstep(*_SHIFT_FALL_Z_MM, grid.z))
  return (toward * shift_mm * profile * height * chord).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MidlineWarp:
  """A midline-shift warp on the box of voxels it moves.

  Attributes:
    box: index box of every voxel with a non-zero displacement (the
      supratentorial slices, the rows and columns inside the inner table).
    displacement_mm: float32 head-frame x displacement on the box.
    source_rows, source_columns: int arrays on the box, the pixel whose
      straight-head content each warped pixel shows (nearest neighbour).
  """

  box: tuple[slice, slice, slice]
  displacement_mm: np.ndarray
  source_rows: np.ndarray
  source_columns: np.ndarray


def make_midline_warp(
    grid: anatomy.Grid,
    params: anatomy.HeadParams,
    shift_mm: float,
    toward: float,
    yaw_deg: float,
    pixel_mm: tuple[float, float],
) -> MidlineWarp | None:
  """Builds the warp of `midline_displacement_mm`, or None when no voxel is moved.

  Args:
    grid: head-frame coordinates of the scan.
    params: the head.
    shift_mm: septum displacement, head-frame mm.
    toward: +1 (patient left) or -1 (patient right).
    yaw_deg: the head's rotation in the image (as given to `make_grid`).
    pixel_mm: (row, column) spacing of `grid`, head-frame mm.
  """
  if not 0.0 <= shift_mm <= MAX_SHIFT_MM:
    raise ValueError(f"shift_mm must be within [0, {MAX_SHIFT_MM}] head-frame mm, got {shift_mm}")
  z = grid.z[:, 0, 0]
  moved = np.flatnonzero((z > _SHIFT_RISE_Z_MM[0]) & (z < _SHIFT_FALL_Z_MM[1]))
  if shift_mm == 0.0 or moved.size == 0:
    return None
  slab = slice(int(moved[0]), int(moved[-1]) + 1)
  # Only voxels inside the widest inner-table section can move.
  semi_x, semi_y, _ = anatomy.inner_table_section(np.array([anatomy.EQUATOR_Z_MM]), params)
  inside = (np.abs(grid.x[slab]) < semi_x[0]) & (np.abs(grid.y[slab]) < semi_y[0])
  rows = np.flatnonzero(inside.any(axis=(0, 2)))
  columns = np.flatnonzero(inside.any(axis=(0, 1)))
  if rows.size == 0 or columns.size == 0:
    return None
  box = (slab, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1))
  sub = dataclasses.replace(grid, x=grid.x[box], y=grid.y[box], z=grid.z[slab])
  displacement = midline_displacement_mm(sub, params, shift_mm, toward)
  # A head-frame step of -d along x is (-d cos(yaw), -d sin(yaw)) in image
  # (column, row) mm, because `make_grid` rotates the image frame by the yaw.
  cos, sin = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
  _, num_rows, num_columns = grid.shape
  row_index = (
      np.arange(box[1].start, box[1].stop)[None, :, None] - displacement * (sin / pixel_mm[0])
  )
  column_index = (
      np.arange(box[2].start, box[2].stop)[None, None, :] - displacement * (cos / pixel_mm[1])
  )
  return MidlineWarp(
      box=box,
      displacement_mm=displacement,
      source_rows=np.clip(np.rint(row_index), 0, num_rows - 1).astype(np.intp),
      source_columns=np.clip(np.rint(column_index), 0, num_columns - 1).astype(np.intp),
  )


def warp_head(
    grid: anatomy.Grid, params: anatomy.HeadParams, head: anatomy.Head, warp: MidlineWarp
) -> anatomy.Head:
  """Samples the head again inside the warp's box, at the displaced head-frame coordinates."""
  box = warp.box
  sub = dataclasses.replace(
      grid, x=grid.x[box] - warp.displacement_mm, y=grid.y[box], z=grid.z[box[0]]
  )
  moved = anatomy.build_head(sub, params)
  fields = {}
  for field in dataclasses.fields(anatomy.Head):
    array = getattr(head, field.name).copy()
    array[box] = getattr(moved, field.name)
    fields[field.name] = array
  return anatomy.Head(**fields)


def warp_array(array: np.ndarray, warp: MidlineWarp) -> np.ndarray:
  """Moves a (slice, row, column) array with the warp, by nearest-neighbour lookup."""
  moved = array.copy()
  slab = array[warp.box[0]]
  slices = np.arange(slab.shape[0])[:, None, None]
  moved[warp.box] = slab[slices, warp.source_rows, warp.source_columns]
  return moved


def warp_bleed(
    bleed: lesions.Bleed, warp: MidlineWarp, shape: tuple[int, int, int]
) -> lesions.Bleed:
  """Carries a bleed placed on the straight head along with the warp."""

  def full(part: np.ndarray | None, dtype) -> np.ndarray | None:
    if part is None:
      return None
    array = np.zeros(shape, dtype)
    array[bleed.box] = part
    return warp_array(array, warp)

  return lesions.Bleed(
      box=(slice(None), slice(None), slice(None)),
      core=full(bleed.core, bool),
      fraction=full(bleed.fraction, np.float32),
      blood_hu=bleed.blood_hu,
      edema_fraction=full(bleed.edema_fraction, np.float32),
  )


@dataclasses.dataclass(frozen=True)
class Fracture:
  """A break in the bone.

  Attributes:
    kind: "calvarial" or "other" (skull base, orbital or sinus wall).
    box: index box the fraction covers.
    fraction: float32 share of each voxel that the gap replaces, with a
      partial-volume ramp at its faces.
    fill_hu: density of the soft tissue in the gap.
    gap_mm: width of the gap, head-frame mm.
  """

  kind: str
  box: tuple[slice, slice, slice]
  fraction: np.ndarray
  fill_hu: float
  gap_mm: float


def _cut(
    rng: np.random.Generator,
    grid: anatomy.Grid,
    bone: np.ndarray,
    seed_index: tuple[int, int, int],
    normal: np.ndarray,
    radius_mm: float,
    kind: str,
) -> Fracture:
  """Cuts `bone` along the plane through the seed voxel with `normal`, within `radius_mm`."""
  k, r, c = seed_index
  seed = np.array([grid.x[k, r, c], grid.y[k, r, c], grid.z[k, 0, 0]], np.float32)
  z = grid.z[:, 0, 0]
  slices = np.flatnonzero(np.abs(z - seed[2]) < radius_mm + grid.slice_mm)
  slab = slice(int(slices[0]), int(slices[-1]) + 1)
  reach = radius_mm + 2 * grid.pixel_mm
  near = (np.abs(grid.x[slab] - seed[0]) < reach) & (np.abs(grid.y[slab] - seed[1]) < reach)
  rows = np.flatnonzero(near.any(axis=(0, 2)))
  columns = np.flatnonzero(near.any(axis=(0, 1)))
  box = (slab, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1))

  dx = grid.x[box] - seed[0]
  dy = grid.y[box] - seed[1]
  dz = np.broadcast_to(grid.z[slab] - seed[2], dx.shape)
  across = dx * normal[0] + dy * normal[1] + dz * normal[2]
  along = np.sqrt(np.maximum(dx * dx + dy * dy + dz * dz - across * across, 0.0))
  gap_mm = max(float(rng.uniform(*FRACTURE_GAP_MM)), 2.0 * grid.pixel_mm)
  fraction = anatomy.ramp(np.float32(gap_mm / 2) - np.abs(across), grid.pixel_mm)
  fraction *= anatomy.ramp(np.float32(radius_mm) - along, grid.pixel_mm)
  fraction *= bone[box]
  if not (fraction >= 1.0).any():
    raise lesions.NoRoomError("the fracture gap covers no whole voxel of bone")
  return Fracture(
      kind=kind,
      box=box,
      fraction=fraction.astype(np.float32),
      fill_hu=float(rng.uniform(*FRACTURE_FILL_HU)),
      gap_mm=gap_mm,
  )


def calvarial_fracture(
    rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head
) -> Fracture:
  """Places a linear fracture of the skull vault: a radial gap through the whole calvarium."""
  z = grid.z[:, 0, 0]
  ring = (head.hu > BONE_HU) & (head.depth_mm < 0.5) & (head.depth_mm > -15.0)
  heights = (z >= CALVARIAL_Z_MM[0]) & (z <= CALVARIAL_Z_MM[1])
  candidates = np.flatnonzero(ring & heights[:, None, None])
  if candidates.size == 0:
    raise lesions.NoRoomError(
        f"no calvarium between {CALVARIAL_Z_MM[0]} and {CALVARIAL_Z_MM[1]} mm on these slices"
    )
  seed_index = np.unravel_index(candidates[rng.integers(candidates.size)], ring.shape)
  k, r, c = seed_index
  # The plane contains the radial direction (from the head's axis through the
  # seed) and a direction within 17 degrees of vertical, so it crosses the
  # bone from the inner to the outer table on every slice it reaches.
  radial = np.array([grid.x[k, r, c], grid.y[k, r, c]], np.float64)
  radial /= np.linalg.norm(radial) + 1e-9
  lean = rng.uniform(-0.3, 0.3)
  normal = np.array([-radial[1] * np.cos(lean), radial[0] * np.cos(lean), np.sin(lean)])
  # NOTE: the fragments stay in line. A depressed (stepped) fragment is not
  # modelled.
  return _cut(rng, grid, ring, seed_index, normal, rng.uniform(12.0, 22.0), "calvarial")


def other_fracture(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Fracture:
  """Places a fracture below the calvarium: skull base, orbital wall or maxillary sinus wall."""
  z = grid.z[:, 0, 0]
  low = (z < OTHER_FRACTURE_TOP_Z_MM)[:, None, None]
  bone = head.hu > BONE_HU
  candidates = np.flatnonzero(bone & low)
  if candidates.size == 0:
    raise lesions.NoRoomError(
        f"no skull base or facial bone below {OTHER_FRACTURE_TOP_Z_MM} mm on these slices"
    )
  seed_index = np.unravel_index(candidates[rng.integers(candidates.size)], bone.shape)
  azimuth = rng.uniform(0.0, np.pi)
  lean = rng.uniform(-0.4, 0.4)
  normal = np.array([np.cos(azimuth) * np.cos(lean), np.sin(azimuth) * np.cos(lean), np.sin(lean)])
  return _cut(rng, grid, bone & low, seed_index, normal, rng.uniform(8.0, 14.0), "other")


FRACTURE_MAKERS = {"calvarial": calvarial_fracture, "other": other_fracture}
