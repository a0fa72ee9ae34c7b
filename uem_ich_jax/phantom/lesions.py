"""The five acute hemorrhage subtypes, each with its typical shape, place and density.

Each subtype function returns a `Bleed`: the voxels that hold blood (the mask)
and a soft fraction around them for partial volume. Positions come from the
`Head` fields, so a bleed sits where that subtype sits in a real head.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from uem_ich_jax.phantom import anatomy

# Mean acute blood density per bleed. Noise adds at most 12 HU either way (the
# generator clips it), so every mask voxel stays within 50-90 HU.
BLOOD_HU_RANGE = (62.0, 78.0)
# Above this height the supratentorial convexity starts (head frame, mm).
CONVEXITY_Z_MM = (55.0, 135.0)
# Top of the third ventricle, below the bodies of the lateral ventricles.
THIRD_VENTRICLE_TOP_Z_MM = 72.0


class NoRoomError(RuntimeError):
  """No voxel of the scan can hold this bleed (the slices miss its region)."""


@dataclasses.dataclass(frozen=True)
class Bleed:
  """One hemorrhage.

  Attributes:
    box: index box the other arrays cover.
    core: bool, voxels that hold blood (the mask of this bleed).
    fraction: float32 blood fraction, 1 on `core`, a partial-volume ramp around it.
    blood_hu: mean density of the blood.
    edema_fraction: float32 or None, hypodense edema around the blood.
  """

  box: tuple[slice, slice, slice]
  core: np.ndarray
  fraction: np.ndarray
  blood_hu: float
  edema_fraction: np.ndarray | None = None


def _blood_hu(rng: np.random.Generator) -> float:
  return float(rng.uniform(*BLOOD_HU_RANGE))


def _pick_slice_z(rng: np.random.Generator, grid: anatomy.Grid, low: float, high: float) -> float:
  """Picks a height within [low, high] that some slice of the scan covers."""
  z = grid.z[:, 0, 0]
  inside = z[(z >= low) & (z <= high)]
  if inside.size == 0:
    raise NoRoomError(f"no slice between {low} and {high} mm")
  return float(rng.choice(inside))


def _full_box() -> tuple[slice, slice, slice]:
  return (slice(None), slice(None), slice(None))


def _slab(grid: anatomy.Grid, low: float, high: float) -> tuple[slice, slice, slice]:
  z = grid.z[:, 0, 0]
  index = np.nonzero((z >= low) & (z <= high))[0]
  if index.size == 0:
    raise NoRoomError(f"no slice between {low} and {high} mm")
  return (slice(int(index[0]), int(index[-1]) + 1), slice(None), slice(None))


def _convexity_collection(
    rng: np.random.Generator,
    grid: anatomy.Grid,
    head: anatomy.Head,
    radius_mm: float,
    height_mm: float,
    thickness_mm: float,
    power: float,
    z_range: tuple[float, float],
    one_side: bool,
) -> tuple[tuple[slice, slice, slice], np.ndarray, float]:
  """Signed distance to a collection under the inner table, thickest at a random point.

  The thickness falls from `thickness_mm` at the centre to 0 at `radius_mm`
  (in-plane) and `height_mm` (vertical) as (1 - q^2)^power: power 1 gives the
  lens of an epidural hematoma, a small power the long flat crescent of a
  subdural one.
  """
  center_z = _pick_slice_z(rng, grid, *z_range)
  k = int(np.argmin(np.abs(grid.z[:, 0, 0] - center_z)))
  # Centre on the inner table of that slice, on one side and at least 25 mm
  # from the midline, so the collection lies over the convexity.
  surface = np.abs(head.depth_mm[k]) < grid.pixel_mm
  side = float(rng.choice((-1.0, 1.0)))
  candidates = surface & (grid.x[k] * side > 25.0)
  rows, columns = np.nonzero(candidates)
  if rows.size == 0:
    raise NoRoomError(f"no convexity on the slice at {center_z:.0f} mm")
  pick = int(rng.integers(rows.size))
  cx, cy = grid.x[k, rows[pick], columns[pick]], grid.y[k, rows[pick], columns[pick]]

  box = _slab(grid, center_z - height_mm, center_z + height_mm)
  depth = head.depth_mm[box]
  planar = np.sqrt((grid.x[box] - cx) ** 2 + (grid.y[box] - cy) ** 2)
  # Along-surface distance, normalised: the depth is removed from the in-plane
  # distance so that deep voxels under the centre count as near it.
  along = np.sqrt(np.maximum(planar**2 - depth**2, 0.0)) / radius_mm
  vertical = (grid.z[box] - center_z) / height_mm
  q2 = along**2 + vertical**2
  thickness = thickness_mm * np.clip(1.0 - q2, 0.0, None) ** power
  distance = np.minimum(depth, thickness - depth)
  distance = np.where(q2 < 1.0, distance, -10.0)
  if one_side:
    # Both collections stay on one side of the falx.
    distance = np.minimum(distance, grid.x[box] * side - 1.0)
  return box, distance.astype(np.float32), float(side)


def _bleed_from_distance(box, distance: np.ndarray, px: float, blood_hu: float) -> Bleed:
  core = distance >= 0.0
  if not core.any():
    raise NoRoomError("the bleed has no voxel on this grid")
  fraction = anatomy.ramp(distance, px)
  fraction[core] = 1.0
  return Bleed(box=box, core=core, fraction=fraction, blood_hu=blood_hu)


def epidural(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Biconvex lens under the skull, limited in extent (the dura is fixed at the sutures)."""
  box, distance, _ = _convexity_collection(
      rng,
      grid,
      head,
      radius_mm=rng.uniform(22.0, 34.0),
      height_mm=rng.uniform(14.0, 24.0),
      thickness_mm=rng.uniform(9.0, 20.0),
      power=1.0,
      z_range=(45.0, 125.0),
      one_side=True,
  )
  return _bleed_from_distance(box, distance, grid.pixel_mm, _blood_hu(rng))


def subdural(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Crescent along the convexity, crossing sutures but not the falx."""
  box, distance, _ = _convexity_collection(
      rng,
      grid,
      head,
      radius_mm=rng.uniform(60.0, 105.0),
      height_mm=rng.uniform(35.0, 55.0),
      thickness_mm=rng.uniform(5.0, 15.0),
      power=0.5,
      z_range=CONVEXITY_Z_MM,
      one_side=True,
  )
  return _bleed_from_distance(box, distance, grid.pixel_mm, _blood_hu(rng))


def intraparenchymal(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Lobulated clot in the parenchyma (basal ganglia, thalamus or lobar), with edema."""
  radius = rng.uniform(7.0, 18.0)
  deep = head.parenchyma & (head.brain_depth_mm > radius * 0.6 + 4.0)
  z = grid.z[:, 0, 0]
  deep &= ((z > anatomy.TENTORIUM_Z_MM) & (z < 125.0))[:, None, None]
  index = np.flatnonzero(deep)
  if index.size == 0:
    raise NoRoomError("no parenchyma deep enough for a clot")
  k, r, c = np.unravel_index(index[rng.integers(index.size)], deep.shape)
  center = np.array([grid.x[k, r, c], grid.y[k, r, c], z[k]], np.float32)

  edema_mm = rng.uniform(2.0, 7.0)
  box = _slab(grid, center[2] - radius * 1.5 - edema_mm, center[2] + radius * 1.5 + edema_mm)
  dx = grid.x[box] - center[0]
  dy = grid.y[box] - center[1]
  dz = grid.z[box] - center[2]
  distance_to_center = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-6)
  # Lobulation: the radius varies with direction by a few low-order harmonics.
  azimuth = np.arctan2(dy, dx)
  elevation = dz / distance_to_center
  p = [float(v) for v in rng.uniform(0.0, 2 * np.pi, size=3)]
  lobes = (
      1.0
      + 0.18 * np.sin(3 * azimuth + p[0])
      + 0.12 * np.sin(5 * azimuth + p[1] + 2 * elevation)
      + 0.15 * np.cos(2 * elevation * np.pi + p[2])
  )
  stretch = rng.uniform(0.75, 1.3)
  surface = radius * lobes * (1.0 + (stretch - 1.0) * (dy / distance_to_center) ** 2)
  distance = (surface - distance_to_center).astype(np.float32)
  # Blood stays inside the brain.
  distance = np.minimum(distance, head.brain_depth_mm[box])
  bleed = _bleed_from_distance(box, distance, grid.pixel_mm, _blood_hu(rng))
  edema = anatomy.ramp(distance + edema_mm, grid.pixel_mm * 2.0)
  edema *= head.parenchyma[box]
  return dataclasses.replace(bleed, edema_fraction=edema)


def intraventricular(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Blood in the ventricles: layering in the dependent (posterior) horns, or a cast."""
  ventricles = head.ventricles
  if not ventricles.any():
    raise NoRoomError("no ventricle on these slices")
  if rng.uniform() < 0.6:
    # Supine patient: blood settles posteriorly, with a flat level.
    level = np.quantile(grid.y[ventricles], rng.uniform(0.6, 0.85))
    core = ventricles & (grid.y > level)
  else:
    # Cast of one lateral ventricle, plus the third and fourth ventricles
    # (midline, below the lateral ventricles' bodies).
    side = float(rng.choice((-1.0, 1.0)))
    midline = (np.abs(grid.x) < 4.0) & (grid.z < THIRD_VENTRICLE_TOP_Z_MM)
    core = ventricles & ((grid.x * side > 0) | midline)
  if not core.any():
    raise NoRoomError("the ventricular blood has no voxel on this grid")
  return Bleed(box=_full_box(), core=core, fraction=core.astype(np.float32), blood_hu=_blood_hu(rng))


def subarachnoid(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Thin blood in sulci and basal cisterns: diffuse around the circle of Willis, or focal."""
  csf = head.csf_space
  z = grid.z[:, 0, 0]
  if rng.uniform() < 0.5:
    # Aneurysmal pattern: suprasellar and perimesencephalic cisterns and the
    # Sylvian fissures.
    center = np.array([0.0, -5.0, rng.uniform(46.0, 58.0)], np.float32)
    radius = rng.uniform(20.0, 38.0)
    # Cisterns and fissures only, not the thin space over the convexity.
    csf = csf & (head.brain_depth_mm > 0.0)
  else:
    # Convexity pattern: sulci over one region.
    surface = csf & (head.brain_depth_mm < 12.0) & ((z > 60.0) & (z < 140.0))[:, None, None]
    index = np.flatnonzero(surface)
    if index.size == 0:
      raise NoRoomError("no convexity sulcus on these slices")
    k, r, c = np.unravel_index(index[rng.integers(index.size)], surface.shape)
    center = np.array([grid.x[k, r, c], grid.y[k, r, c], z[k]], np.float32)
    radius = rng.uniform(18.0, 35.0)

  box = _slab(grid, center[2] - radius, center[2] + radius)
  distance = np.sqrt(
      (grid.x[box] - center[0]) ** 2
      + (grid.y[box] - center[1]) ** 2
      + (grid.z[box] - center[2]) ** 2
  )
  core = csf[box] & (distance < radius)
  # Blood in a cleft thinner than a pixel still shows through partial volume,
  # so the blood widens the clefts it fills by one pixel in-plane. It stays out
  # of bone and ventricles.
  cross = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)
  core = ndimage.binary_dilation(core, structure=cross)
  core &= (head.depth_mm[box] > 0.0) & ~head.ventricles[box]
  if not core.any():
    raise NoRoomError("the subarachnoid blood has no voxel on this grid")
  blood_hu = float(rng.uniform(BLOOD_HU_RANGE[0], BLOOD_HU_RANGE[0] + 8.0))
  return Bleed(box=box, core=core, fraction=core.astype(np.float32), blood_hu=blood_hu)


MAKERS = {
    "epidural": epidural,
    "intraparenchymal": intraparenchymal,
    "intraventricular": intraventricular,
    "subarachnoid": subarachnoid,
    "subdural": subdural,
}


# Density of a chronic subdural collection (hypodense, close to CSF), HU.
CHRONIC_HU_RANGE = (4.0, 22.0)


def chronic_subdural(rng: np.random.Generator, grid: anatomy.Grid, head: anatomy.Head) -> Bleed:
  """Hypodense crescent along the convexity: a chronic subdural hematoma.

  Same shape and place as the acute `subdural`, a little thicker, with the
  density of old, liquefied blood (`CHRONIC_HU_RANGE`, 0-25 HU before noise).
  """
  box, distance, _ = _convexity_collection(
      rng,
      grid,
      head,
      radius_mm=rng.uniform(55.0, 100.0),
      height_mm=rng.uniform(35.0, 55.0),
      thickness_mm=rng.uniform(7.0, 18.0),
      power=0.5,
      z_range=CONVEXITY_Z_MM,
      one_side=True,
  )
  return _bleed_from_distance(box, distance, grid.pixel_mm, float(rng.uniform(*CHRONIC_HU_RANGE)))
