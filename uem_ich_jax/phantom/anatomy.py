"""The normal head: analytic tissue layers sampled on the scan grid, in HU.

Every boundary is a signed distance in mm (positive inside), turned into a
tissue fraction with a linear ramp one pixel wide. That ramp is the partial
volume effect, so edges are soft without rendering at a finer resolution. The
skull and brain outline ramps widen where the outline moves within one slice
thickness (vertex, skull base), as thick slices average it there.

Head frame, in mm: x towards patient left, y towards posterior, z towards
superior with 0 near the foramen magnum and the vertex near 165. Values are the
usual non-contrast CT numbers: grey matter 37-41 HU, white matter 28-32 HU, CSF
3-10 HU, cortical bone 1250-1550 HU.
"""

from __future__ import annotations

import dataclasses

import numpy as np

AIR_HU = -1000.0
FAT_HU = -85.0
MUSCLE_HU = 50.0
# Thickness of the dense bone around the cranial fossae; beyond it the skull
# base section is soft tissue.
SKULL_BASE_RIM_MM = 6.0

# The tentorium: below this height the intracranial space is the posterior,
# middle and anterior fossae; above it, one ellipse per slice.
TENTORIUM_Z_MM = 52.0
# Height of the widest intracranial section, and of the vertex.
EQUATOR_Z_MM = 78.0
VERTEX_Z_MM = 165.0
# Heights covered by a full scan from skull base to vertex.
HEAD_BOTTOM_Z_MM = -5.0
HEAD_TOP_Z_MM = 178.0
# Height a short stack of slices is centred on (ventricles and basal ganglia).
VENTRICLE_Z_MM = 88.0


@dataclasses.dataclass(frozen=True)
class Grid:
  """Head-frame coordinates of every voxel, mm (see the module docstring).

  Attributes:
    x: (slice, row, column) towards patient left.
    y: (slice, row, column) towards posterior.
    z: (slice, 1, 1) towards superior.
    pixel_mm: in-plane pixel size, the width of the partial-volume ramp.
    slice_mm: slice thickness (the slice spacing: slices are contiguous).
  """

  x: np.ndarray
  y: np.ndarray
  z: np.ndarray
  pixel_mm: float
  slice_mm: float

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.z.shape[0], self.x.shape[1], self.x.shape[2])


@dataclasses.dataclass(frozen=True)
class HeadParams:
  """One subject's anatomy: sizes, thicknesses, densities and pattern phases."""

  scale: float  # Head size relative to the canonical head.
  width_mm: float  # Intracranial half-width (left-right) at the equator.
  length_mm: float  # Intracranial half-length (anterior-posterior) at the equator.
  skull_mm: float  # Mean calvarium thickness.
  scalp_mm: float
  csf_gap_mm: float  # Subarachnoid space over the convexity (grows with atrophy).
  sulcus_width_mm: float
  sulcus_depth_mm: float
  sulcus_count: int  # Sulci around one axial section.
  sulcus_phases: tuple[float, ...]
  # Wave vectors (x, y, phase) of the plane waves whose sum places the fat
  # planes between the neck and face muscles.
  fat_waves: tuple[tuple[float, float, float], ...]
  ventricle_scale: float  # Ventricle width factor (grows with atrophy).
  # Physiological calcification density of the pineal gland and the choroid
  # plexus glomera, HU; 0 where that calcification is absent.
  pineal_hu: float
  choroid_hu: float
  grey_hu: float
  white_hu: float
  csf_hu: float
  bone_hu: float
  diploe_hu: float


def draw_head_params(rng: np.random.Generator) -> HeadParams:
  """Draws one subject's anatomy."""
  size = rng.uniform(0.93, 1.06)
  atrophy = rng.uniform(0.0, 1.0)
  return HeadParams(
      scale=size,
      width_mm=size * rng.uniform(60.0, 66.0),
      length_mm=size * rng.uniform(78.0, 86.0),
      skull_mm=size * rng.uniform(5.5, 7.5),
      scalp_mm=size * rng.uniform(4.0, 6.5),
      csf_gap_mm=size * (0.7 + 2.0 * atrophy),
      sulcus_width_mm=size * (0.35 + 0.8 * atrophy),
      sulcus_depth_mm=size * rng.uniform(9.0, 15.0),
      sulcus_count=int(rng.integers(24, 32)),
      sulcus_phases=tuple(float(p) for p in rng.uniform(0.0, 2 * np.pi, size=6)),
      fat_waves=_draw_waves(rng, count=3, wavelength_mm=45.0),
      ventricle_scale=rng.uniform(0.85, 1.15) * (1.0 + 0.5 * atrophy),
      pineal_hu=rng.uniform(120.0, 250.0) if rng.uniform() < 0.6 else 0.0,
      choroid_hu=rng.uniform(100.0, 220.0) if rng.uniform() < 0.5 else 0.0,
      grey_hu=rng.uniform(37.0, 41.0),
      white_hu=rng.uniform(28.5, 31.5),
      csf_hu=rng.uniform(3.0, 10.0),
      bone_hu=rng.uniform(1250.0, 1550.0),
      diploe_hu=rng.uniform(450.0, 700.0),
  )


def _draw_waves(
    rng: np.random.Generator, count: int, wavelength_mm: float
) -> tuple[tuple[float, float, float], ...]:
  angles = rng.uniform(0.0, np.pi, size=count)
  phases = rng.uniform(0.0, 2 * np.pi, size=count)
  k = 2 * np.pi / wavelength_mm
  return tuple((float(k * np.cos(a)), float(k * np.sin(a)), float(p)) for a, p in zip(angles, phases))


def make_grid(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    slice_z_mm: np.ndarray,
    row_shift_mm: np.ndarray,
    center_mm: tuple[float, float],
    yaw_deg: float,
) -> Grid:
  """Maps voxel indices to head-frame mm.

  Args:
    shape: (slice, row, column).
    spacing_mm: (slice, row, column) spacing.
    slice_z_mm: (slice,) head-frame height of each slice.
    row_shift_mm: (slice,) posterior shift of each slice; gantry tilt shears the
      stack this way.
    center_mm: (x, y) of the head centre relative to the image centre.
    yaw_deg: rotation of the head about the vertical axis.
  """
  num_slices, rows, columns = shape
  column_mm = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2) * spacing_mm[2]
  row_mm = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing_mm[1]
  image_x = column_mm[None, None, :] - np.float32(center_mm[0])
  image_y = (
      row_mm[None, :, None]
      + row_shift_mm.astype(np.float32)[:, None, None]
      - np.float32(center_mm[1])
  )
  cos, sin = np.float32(np.cos(np.radians(yaw_deg))), np.float32(np.sin(np.radians(yaw_deg)))
  x = image_x * cos + image_y * sin
  y = image_y * cos - image_x * sin
  z = slice_z_mm.astype(np.float32).reshape(num_slices, 1, 1)
  return Grid(
      x=x, y=y, z=z, pixel_mm=float(min(spacing_mm[1], spacing_mm[2])), slice_mm=float(spacing_mm[0])
  )


def ramp(distance_mm: np.ndarray, width_mm: float | np.ndarray) -> np.ndarray:
  """Tissue fraction from a signed distance (positive inside): a linear ramp `width_mm` wide."""
  fraction = distance_mm * (np.float32(1.0) / np.asarray(width_mm, np.float32))
  fraction += np.float32(0.5)
  np.clip(fraction, 0.0, 1.0, out=fraction)
  return fraction


def ellipse_distance(
    x: np.ndarray, y: np.ndarray, semi_x: np.ndarray | float, semi_y: np.ndarray | float
) -> np.ndarray:
  """Approximate signed distance to an ellipse centred at the origin, mm, positive inside.

  This is a first-order estimate (value over gradient norm). It is exact on the
  boundary and close within the few mm of scalp and skull, and drifts beyond.
  """
  u = x / semi_x
  v = y / semi_y
  radius = np.sqrt(u * u + v * v) + np.float32(1e-6)
  gradient = np.sqrt((u / semi_x) ** 2 + (v / semi_y) ** 2) + np.float32(1e-6)
  return (radius - 1.0) / (-gradient) * radius


def ellipsoid_distance(
    grid: Grid,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    yaw_deg: float = 0.0,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
  """Signed distance (mm, positive inside) to an ellipsoid, on the slices it can reach.

  Returns (index box, distance on that box) or None when no voxel is near the
  ellipsoid. The box covers the slices, rows and columns around it.
  """
  z = grid.z[:, 0, 0]
  reach = np.nonzero(np.abs(z - center[2]) < semi[2] + 2 * grid.pixel_mm)[0]
  if reach.size == 0:
    return None
  slab = slice(int(reach[0]), int(reach[-1]) + 1)
  # Rows and columns within the ellipsoid's largest semi-axis of its centre.
  reach_mm = max(semi[0], semi[1]) + 2 * grid.pixel_mm
  near = (np.abs(grid.x[slab] - center[0]) < reach_mm) & (np.abs(grid.y[slab] - center[1]) < reach_mm)
  rows = np.nonzero(near.any(axis=(0, 2)))[0]
  columns = np.nonzero(near.any(axis=(0, 1)))[0]
  if rows.size == 0 or columns.size == 0:
    return None
  box = (
      slab,
      slice(int(rows[0]), int(rows[-1]) + 1),
      slice(int(columns[0]), int(columns[-1]) + 1),
  )
  dx = grid.x[box] - np.float32(center[0])
  dy = grid.y[box] - np.float32(center[1])
  if yaw_deg:
    cos, sin = np.float32(np.cos(np.radians(yaw_deg))), np.float32(np.sin(np.radians(yaw_deg)))
    dx, dy = dx * cos + dy * sin, dy * cos - dx * sin
  dz = grid.z[slab] - np.float32(center[2])
  u, v, w = dx / semi[0], dy / semi[1], dz / semi[2]
  radius = np.sqrt(u * u + v * v + w * w) + np.float32(1e-6)
  gradient = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2)
  gradient += np.float32(1e-6)
  return box, (1.0 - radius) / gradient * radius


@dataclasses.dataclass(frozen=True)
class Head:
  """A normal head sampled on the grid, and the fields lesions are placed with.

  Attributes:
    hu: float32 noise-free HU.
    depth_mm: depth below the inner table of the skull, or below the skull
      base around the fossae on low slices. It is negative in bone, scalp and
      air, and places the epidural and subdural collections.
    brain_depth_mm: depth below the brain surface.
    csf_space: bool, sulci, cisterns, fissures and the convexity subarachnoid
      space (where subarachnoid blood goes).
    ventricles: bool, lateral, third and fourth ventricles.
    parenchyma: bool, grey and white matter, where intraparenchymal blood goes.
  """

  hu: np.ndarray
  depth_mm: np.ndarray
  brain_depth_mm: np.ndarray
  csf_space: np.ndarray
  ventricles: np.ndarray
  parenchyma: np.ndarray


def inner_table_section(
    z: np.ndarray, params: HeadParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Half-width, half-length and y centre of the inner-table ellipse at each height."""
  above = np.clip((z - EQUATOR_Z_MM) / (VERTEX_Z_MM - EQUATOR_Z_MM), 0.0, 1.0)
  below = np.clip((EQUATOR_Z_MM - z) / EQUATOR_Z_MM, 0.0, 1.5)
  profile = np.sqrt(np.clip(1.0 - above**2, 0.0, 1.0)) * (1.0 - 0.22 * below**2)
  # A floor keeps the vertex cap a small ellipse instead of a point.
  semi_x = np.maximum(params.width_mm * profile, 1.0).astype(np.float32)
  semi_y = np.maximum(params.length_mm * (0.15 + 0.85 * profile), 1.0).astype(np.float32)
  center_y = (6.0 * params.scale * np.clip((TENTORIUM_Z_MM - z) / 40.0, 0.0, 1.0)).astype(
      np.float32
  )
  return semi_x, semi_y, center_y


def _fossa_distance(grid: Grid, params: HeadParams, low: slice, semi_x, semi_y, center_y):
  """Signed distance to the union of the cranial fossae on the slices below the tentorium."""
  x, y, z = grid.x[low], grid.y[low] - center_y, grid.z[low]
  height = np.clip((TENTORIUM_Z_MM - z) / TENTORIUM_Z_MM, 0.0, 1.0)
  # Posterior fossa: cerebellum, narrowing towards the foramen magnum.
  posterior = ellipse_distance(
      x, y - semi_y * 0.38, semi_x * (0.85 - 0.3 * height), semi_y * (0.55 - 0.2 * height)
  )
  # Brainstem and the tentorial notch, joining the posterior fossa.
  stem = ellipse_distance(x, y + semi_y * 0.02, 22.0 * params.scale, 28.0 * params.scale)
  fossa = np.maximum(posterior, stem)
  # Middle fossae (temporal lobes) and anterior fossa (frontal lobes over the orbits).
  temporal_on = (z > 20.0).astype(np.float32)
  frontal_on = (z > 44.0).astype(np.float32)
  for side in (-1.0, 1.0):
    temporal = ellipse_distance(
        x - side * semi_x * 0.58, y + semi_y * 0.2, semi_x * 0.36, semi_y * 0.36
    )
    fossa = np.maximum(fossa, temporal * temporal_on - 50.0 * (1.0 - temporal_on))
  frontal = ellipse_distance(x, y + semi_y * 0.5, semi_x * 0.62, semi_y * 0.4)
  fossa = np.maximum(fossa, frontal * frontal_on - 50.0 * (1.0 - frontal_on))
  return fossa


def _sulcus_distance(
    params: HeadParams,
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    brain_depth: np.ndarray,
) -> np.ndarray:
  """Distance (mm) to the nearest sulcus centre line, for sulci running in from the surface.

  The zeros of a sine of the angle around the head set the sulci. Slow
  modulations of its phase, and a term in depth, make them wander and lean.
  """
  p = params.sulcus_phases
  phase = params.sulcus_count * theta
  phase += 2.2 * np.sin(3 * theta + p[0] + 0.021 * z)
  phase += 1.4 * np.sin(5 * theta + p[1] - 0.034 * z)
  phase += 0.7 * np.sin(13 * theta + p[4] + 0.05 * z)
  phase += 0.09 * z + p[2]
  phase += np.sin(9 * theta + p[5]) * np.clip(brain_depth, 0.0, 20.0) * np.float32(0.08)
  radius = np.sqrt(x * x + y * y)
  # Near a zero of sin(phase), |sin| times radius over the angular frequency is
  # the distance along the arc.
  return np.abs(np.sin(phase)) * radius * np.float32(1.0 / params.sulcus_count)


def _cortex(
    grid: Grid, params: HeadParams, x: np.ndarray, y: np.ndarray, brain_depth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """CSF fraction of the sulci and grey-matter fraction of the cortical ribbon.

  Sulci are CSF clefts that narrow with depth, lined by grey matter. Only the
  shell near the brain surface is computed, because the trigonometry is the
  most expensive part of the head.
  """
  px = grid.pixel_mm
  deepest = params.sulcus_depth_mm + 4.0
  shell = np.flatnonzero((brain_depth > -2.0) & (brain_depth < deepest))
  z = np.broadcast_to(grid.z, brain_depth.shape).ravel()[shell]
  xs, ys, depth = x.ravel()[shell], y.ravel()[shell], brain_depth.ravel()[shell]
  theta = np.arctan2(ys, xs)
  sulcus = _sulcus_distance(params, theta, xs, ys, z, depth)
  sulcus_depth = params.sulcus_depth_mm * (
      0.55 + 0.45 * np.sin(7 * theta + params.sulcus_phases[3] + 0.05 * z)
  )
  taper = np.clip(1.0 - depth / sulcus_depth, 0.0, 1.0)
  sulcus_csf = ramp(params.sulcus_width_mm * taper - sulcus, px)
  sulcus_csf *= ramp(sulcus_depth - depth, px)
  lining = ramp(params.sulcus_width_mm + 2.4 - sulcus, px)
  lining *= ramp(sulcus_depth + 2.5 - depth, px)

  csf = np.zeros(brain_depth.shape, np.float32)
  csf.ravel()[shell] = sulcus_csf
  grey = np.zeros(brain_depth.shape, np.float32)
  grey.ravel()[shell] = lining
  np.maximum(grey, ramp(3.2 - brain_depth, px), out=grey)
  return csf, grey


def _edge_width(z: np.ndarray, params: HeadParams, grid: Grid) -> np.ndarray:
  """Partial-volume ramp width per slice for the skull and brain outline, mm.

  A thick slice averages the outline over its height, so where the section
  shrinks fast with height (the vertex, the skull base) the edge smears over
  the change in semi-axis across the slice.
  """
  half = 0.5 * grid.slice_mm
  below = inner_table_section(z - half, params)
  above = inner_table_section(z + half, params)
  change = np.maximum(np.abs(above[0] - below[0]), np.abs(above[1] - below[1]))
  return np.sqrt(grid.pixel_mm**2 + change**2).astype(np.float32)


def _crop(grid: Grid) -> tuple[slice, slice]:
  """Rows and columns that can hold any part of the head (face included)."""
  inside = (np.abs(grid.x) < 90.0) & (grid.y > -125.0) & (grid.y < 112.0)
  rows = np.nonzero(inside.any(axis=(0, 2)))[0]
  columns = np.nonzero(inside.any(axis=(0, 1)))[0]
  if rows.size == 0 or columns.size == 0:
    return slice(0, 0), slice(0, 0)
  return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def build_head(grid: Grid, params: HeadParams) -> Head:
  """Samples the normal head of `params` on `grid`.

  The work happens on the rows and columns the head can reach; the rest is air.
  """
  rows, columns = _crop(grid)
  shape = grid.shape
  hu = np.full(shape, AIR_HU, np.float32)
  depth = np.full(shape, -100.0, np.float32)
  brain_depth = np.full(shape, -100.0, np.float32)
  csf_space = np.zeros(shape, bool)
  ventricles = np.zeros(shape, bool)
  parenchyma = np.zeros(shape, bool)
  box = (slice(None), rows, columns)
  sub = dataclasses.replace(grid, x=grid.x[box], y=grid.y[box])
  if sub.x.size:
    head = _build_cropped(sub, params)
    hu[box] = head.hu
    depth[box] = head.depth_mm
    brain_depth[box] = head.brain_depth_mm
    csf_space[box] = head.csf_space
    ventricles[box] = head.ventricles
    parenchyma[box] = head.parenchyma
  return Head(
      hu=hu,
      depth_mm=depth,
      brain_depth_mm=brain_depth,
      csf_space=csf_space,
      ventricles=ventricles,
      parenchyma=parenchyma,
  )


def _build_cropped(grid: Grid, params: HeadParams) -> Head:
  """Builds the head on a grid already cropped to the rows and columns it reaches."""
  px = grid.pixel_mm
  z = grid.z
  semi_x, semi_y, center_y = inner_table_section(z, params)
  edge = _edge_width(z, params, grid)
  y = grid.y - center_y
  x = grid.x

  inner = ellipse_distance(x, y, semi_x, semi_y)
  # The calvarium is thicker at the back and thinner over the temporal squama.
  norm = np.sqrt((x / semi_x) ** 2 + (y / semi_y) ** 2) + np.float32(1e-6)
  lateral = (x / semi_x / norm) ** 2
  posterior = y / semi_y / norm
  skull = params.skull_mm * (1.0 + 0.18 * posterior - 0.3 * lateral)

  # Intracranial depth: below the tentorium, the fossae cut the ellipse and the
  # rest of the ellipse is skull base.
  depth = inner.copy()
  low_slices = np.nonzero(z[:, 0, 0] < TENTORIUM_Z_MM)[0]
  if low_slices.size:
    low = slice(0, int(low_slices[-1]) + 1)
    fossa = _fossa_distance(grid, params, low, semi_x[low], semi_y[low], center_y[low])
    depth[low] = np.minimum(inner[low], fossa)

  brain_depth = depth - np.float32(params.csf_gap_mm)

  csf, grey = _cortex(grid, params, x, y, brain_depth)

  falx = _add_midline_and_cisterns(grid, params, y, brain_depth, csf, grey)
  ventricle_fraction = _ventricles(grid, params)
  _deep_grey(grid, params, grey)

  in_brain = ramp(brain_depth, edge)
  parenchyma = in_brain * (1.0 - csf) * (1.0 - ventricle_fraction)
  brain_hu = params.white_hu + (params.grey_hu - params.white_hu) * grey
  intracranial_hu = params.csf_hu + parenchyma * (brain_hu - params.csf_hu)
  intracranial_hu += falx * (48.0 - intracranial_hu)
  _paint_calcifications(grid, params, intracranial_hu)

  # Below the skull base there is no calvarium: its ring turns into the neck
  # muscles over these heights.
  calvarium = np.clip((z - 36.0) / 12.0, 0.0, 1.0)
  bone_hu = MUSCLE_HU + calvarium * (params.bone_hu - MUSCLE_HU)
  diploe_hu = MUSCLE_HU + calvarium * (params.diploe_hu - MUSCLE_HU)

  # Skull base: inside the inner-table ellipse but outside every fossa, a rim
  # of dense bone around the fossae and soft tissue beyond it.
  base = ramp(inner, edge) * (1.0 - ramp(depth, px))
  soft_hu = _soft_tissue_hu(grid, params, x, y, calvarium)
  base_hu = soft_hu + ramp(depth + SKULL_BASE_RIM_MM, px) * (params.bone_hu - soft_hu)

  # Layers outwards from the inner table: inner table, diploe, outer table,
  # galea, fat, skin. The scalp starts at skin density, so outside the
  # cranium the face (or air) shows through.
  table = 0.28 * skull
  cranium_hu = np.full(inner.shape, 40.0, np.float32)
  cranium_hu += ramp(inner + skull + params.scalp_mm - 1.5, edge) * (FAT_HU - 40.0)
  cranium_hu += ramp(inner + skull + 1.5, edge) * (35.0 - FAT_HU)
  cranium_hu += ramp(inner + skull, edge) * (bone_hu - 35.0)
  cranium_hu += ramp(inner + skull - table, edge) * (diploe_hu - bone_hu)
  cranium_hu += ramp(inner + table, edge) * (bone_hu - diploe_hu)
  cranium_hu += base * (base_hu - bone_hu)
  cranium_hu += ramp(depth, edge) * (intracranial_hu - cranium_hu)

  hu = _face(grid, params)
  hu += ramp(inner + skull + params.scalp_mm, edge) * (cranium_hu - hu)
  _paint_orbits_and_sinuses(grid, params, hu)

  ventricles = ventricle_fraction > 0.5
  return Head(
      hu=hu,
      depth_mm=depth,
      brain_depth_mm=brain_depth,
      csf_space=((csf > 0.5) | (brain_depth < 0)) & (depth > 0) & ~ventricles,
      ventricles=ventricles,
      parenchyma=parenchyma > 0.5,
  )


def _soft_tissue_hu(grid: Grid, params: HeadParams, x, y, calvarium) -> np.ndarray:
  """Muscle with fat planes on the slices below the calvarium; plain muscle above."""
  hu = np.full(x.shape, MUSCLE_HU, np.float32)
  low = np.nonzero(calvarium[:, 0, 0] < 1.0)[0]
  if low.size == 0:
    return hu
  b = slice(0, int(low[-1]) + 1)
  field = np.zeros(hu[b].shape, np.float32)
  for kx, ky, phase in params.fat_waves:
    field += np.sin(kx * x[b] + ky * y[b] + phase)
  # The zero set of a sum of waves is a web of curved lines: fascial fat
  # planes between the muscles, about 1.5 mm thick.
  hu[b] += ramp(0.12 - np.abs(field), 0.1) * (FAT_HU - MUSCLE_HU)
  return hu


def _face(grid: Grid, params: HeadParams) -> np.ndarray:
  """Facial soft tissue below the forehead: skin, subcutaneous fat, muscle; air elsewhere."""
  hu = np.full(grid.x.shape, AIR_HU, np.float32)
  z = grid.z[:, 0, 0]
  face = np.nonzero((z > -10.0) & (z < 52.0))[0]
  if face.size == 0:
    return hu
  f = slice(int(face[0]), int(face[-1]) + 1)
  height = np.clip(1.0 - ((grid.z[f] - 18.0) / 36.0) ** 2, 0.05, 1.0) ** 0.5
  distance = ellipse_distance(
      grid.x[f],
      grid.y[f] + params.length_mm * 0.72,
      params.width_mm * 0.95 * height,
      params.length_mm * 0.52 * height,
  )
  px = grid.pixel_mm
  tissue = ramp(distance, px) * (40.0 - AIR_HU) + AIR_HU
  tissue += ramp(distance - 1.5, px) * (FAT_HU - 40.0)
  tissue += ramp(distance - 6.0, px) * (MUSCLE_HU - FAT_HU)
  hu[f] = tissue
  return hu


def _paint(hu: np.ndarray, found, value: float, px: float) -> None:
  if found is None:
    return
  box, distance = found
  region = hu[box]
  region += ramp(distance, px) * (np.float32(value) - region)


def _paint_orbits_and_sinuses(grid: Grid, params: HeadParams, hu: np.ndarray) -> None:
  """Orbits (fat cone, globe), nasal cavity and the maxillary, ethmoid and sphenoid sinuses."""
  length, width = params.length_mm, params.width_mm
  px = grid.pixel_mm
  for side in (-1.0, 1.0):
    orbit = ((side * 0.42 * width, -0.86 * length, 36.0), (14.0, 22.0, 12.0), side * 15)
    _paint(hu, ellipsoid_distance(grid, orbit[0], tuple(a + 2.5 for a in orbit[1]), orbit[2]), 700.0, px)
    _paint(hu, ellipsoid_distance(grid, *orbit), FAT_HU, px)
    _paint(hu, ellipsoid_distance(grid, (side * 0.47 * width, -0.97 * length, 37.0), (11.5, 11.5, 11.0)), 12.0, px)
    # Maxillary sinus: bone wall, then air.
    _paint(hu, ellipsoid_distance(grid, (side * 0.38 * width, -0.86 * length, 10.0), (15.0, 17.0, 17.0)), 500.0, px)
    _paint(hu, ellipsoid_distance(grid, (side * 0.38 * width, -0.86 * length, 10.0), (13.0, 15.0, 15.0)), AIR_HU, px)
  _paint(hu, ellipsoid_distance(grid, (0.0, -0.95 * length, 12.0), (9.0, 20.0, 22.0)), AIR_HU + 100.0, px)
  _paint(hu, ellipsoid_distance(grid, (0.0, -0.95 * length, 12.0), (1.2, 18.0, 20.0)), 300.0, px)
  _paint(hu, ellipsoid_distance(grid, (0.0, -0.9 * length, 36.0), (8.0, 14.0, 8.0)), -650.0, px)
  _paint(hu, ellipsoid_distance(grid, (0.0, -0.42 * length, 27.0), (10.0, 9.0, 9.0)), AIR_HU, px)


# Ventricles of the left hemisphere (mirrored for the right) as ellipsoids:
# centre (x, y, z) and semi-axes in mm, yaw in degrees. Widths scale with the
# subject's ventricle size.
_LATERAL_VENTRICLE = (
    ((9.0, 0.0, 84.0), (4.5, 28.0, 10.0), 6.0),  # Body.
    ((10.0, -20.0, 79.0), (5.5, 12.0, 10.0), -12.0),  # Frontal horn.
    ((16.0, 24.0, 75.0), (6.5, 15.0, 10.0), -28.0),  # Atrium and occipital horn.
    ((28.0, 6.0, 54.0), (2.2, 9.0, 5.0), 15.0),  # Temporal horn.
)
_MIDLINE_VENTRICLES = (
    ((0.0, 4.0, 64.0), (2.0, 10.0, 9.0)),  # Third.
    ((0.0, 30.0, 32.0), (6.0, 4.0, 6.0)),  # Fourth.
)
# Basal ganglia and thalamus of the left hemisphere, in the same form.
_DEEP_GREY = (
    ((19.0, -10.0, 70.0), (7.0, 13.0, 9.0), -15.0),
    ((10.0, 12.0, 68.0), (8.0, 11.0, 8.0), 0.0),
)


def _paint_max(target: np.ndarray, found, px: float) -> None:
  """Raises `target` to the fraction inside an `ellipsoid_distance` result."""
  if found is None:
    return
  box, distance = found
  np.maximum(target[box], ramp(distance, px), out=target[box])


def _ventricles(grid: Grid, params: HeadParams) -> np.ndarray:
  """CSF fraction of the lateral, third and fourth ventricles."""
  s = params.scale
  widen = params.ventricle_scale
  fraction = np.zeros(grid.shape, np.float32)
  for side in (-1.0, 1.0):
    for (x, y, z), (a, b, c), yaw in _LATERAL_VENTRICLE:
      found = ellipsoid_distance(
          grid, (side * x * s, y * s, z * s), (a * s * widen, b * s, c * s), side * yaw
      )
      _paint_max(fraction, found, grid.pixel_mm)
  for (x, y, z), (a, b, c) in _MIDLINE_VENTRICLES:
    found = ellipsoid_distance(grid, (x, y * s, z * s), (a * s * widen, b * s, c * s))
    _paint_max(fraction, found, grid.pixel_mm)
  return fraction


def _paint_calcifications(grid: Grid, params: HeadParams, hu: np.ndarray) -> None:
  """Paints the pineal gland and the choroid plexus glomera (in the atria) when calcified.

  Their density stays below 300 HU, as small calcifications do on thick slices
  through partial volume.
  """
  s = params.scale
  if params.pineal_hu:
    found = ellipsoid_distance(grid, (0.0, 16.0 * s, 66.0 * s), (2.5, 3.0, 2.5))
    _paint(hu, found, params.pineal_hu, grid.pixel_mm)
  if params.choroid_hu:
    for side in (-1.0, 1.0):
      found = ellipsoid_distance(grid, (side * 18.0 * s, 25.0 * s, 75.0 * s), (3.0, 4.0, 3.0))
      _paint(hu, found, params.choroid_hu, grid.pixel_mm)


def _deep_grey(grid: Grid, params: HeadParams, grey: np.ndarray) -> None:
  """Adds the basal ganglia and thalami to the grey-matter fraction."""
  s = params.scale
  for side in (-1.0, 1.0):
    for (x, y, z), (a, b, c), yaw in _DEEP_GREY:
      found = ellipsoid_distance(grid, (side * x * s, y * s, z * s), (a * s, b * s, c * s), side * yaw)
      _paint_max(grey, found, grid.pixel_mm)


def _add_midline_and_cisterns(grid, params, y, brain_depth, csf, grey) -> np.ndarray:
  """Adds the interhemispheric and Sylvian fissures and the basal cisterns to `csf` and `grey`.

  Returns the fraction of falx (dura in the interhemispheric fissure).
  """
  px = grid.pixel_mm
  x, z = grid.x, grid.z
  falx = np.zeros(x.shape, np.float32)
  upper = np.nonzero(z[:, 0, 0] >= TENTORIUM_Z_MM)[0]
  if upper.size:
    up = slice(int(upper[0]), None)
    # The corpus callosum bridges the hemispheres between these heights, so the
    # fissure only reaches the midline in front of and behind it there.
    zu, yu = z[up], y[up]
    callosal = (zu > 62.0) & (zu < 95.0) & (np.abs(yu + 4.0) < 34.0)
    half_width = np.float32(0.5 + 0.5 * params.sulcus_width_mm)
    distance = np.abs(x[up])
    reach = ramp(brain_depth[up] + 2.0, px) * ~callosal
    np.maximum(csf[up], ramp(half_width - distance, px) * reach, out=csf[up])
    np.maximum(grey[up], ramp(half_width + 3.2 - distance, px) * reach, out=grey[up])
    falx[up] = ramp(0.45 - distance, px) * reach
  band = np.nonzero((z[:, 0, 0] > 46.0) & (z[:, 0, 0] < 68.0))[0]
  if band.size:
    b = slice(int(band[0]), int(band[-1]) + 1)
    ax = np.abs(x[b])
    # Sylvian fissures run laterally and slightly backwards from the
    # suprasellar cistern, with a gentle bend, to the lateral surface.
    run = ax - 16.0
    line = y[b] - (-16.0 + 0.3 * run + 2.5 * np.sin(run / 9.0 + params.sulcus_phases[0]))
    # The fissure opens towards the lateral surface.
    width = 0.7 + 0.04 * np.clip(run, 0.0, None) + 0.6 * params.sulcus_width_mm
    sylvian = ramp(width - np.abs(line), px) * ramp(run, px)
    np.maximum(csf[b], sylvian, out=csf[b])
    np.maximum(grey[b], ramp(width + 3.0 - np.abs(line), px) * ramp(run + 3.0, px), out=grey[b])
  cistern = np.nonzero((z[:, 0, 0] > 40.0) & (z[:, 0, 0] < 60.0))[0]
  if cistern.size:
    c = slice(int(cistern[0]), int(cistern[-1]) + 1)
    xc, yc = x[c], y[c]
    midbrain = ellipse_distance(xc, yc - 8.0, 12.0, 10.0)
    ring = ramp(2.5 + midbrain, px) * ramp(-midbrain, px)
    suprasellar = ramp(ellipse_distance(xc, yc + 12.0, 9.0, 6.0), px)
    quadrigeminal = ramp(ellipse_distance(xc, yc - 21.0, 6.0, 3.5), px)
    np.maximum(csf[c], np.maximum(ring, np.maximum(suprasellar, quadrigeminal)), out=csf[c])
  return falx
