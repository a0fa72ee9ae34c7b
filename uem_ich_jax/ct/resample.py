"""Resampling CT volumes: uniform slice spacing, gantry-tilt correction, in-plane size.

Conventions:
  - `CTVolume.hu` is (slice, row, column) and its affine maps those indices to
    LPS mm. Voxel values sit at pixel centres, which are the integer indices.
  - Along the slice normal, the true per-slice positions (`volume.positions`)
    are used, never the affine's slice column, so varying spacing is exact.
  - Reslicing places every output voxel in LPS and samples the source there.
    Each of the two source slices that bracket the voxel along the normal is
    sampled bilinearly at the voxel's projection onto its plane, and the two
    values are interpolated linearly along the normal. A gantry tilt only
    shifts each source slice within its plane, so this removes it.
  - A point is outside the source when it lies beyond the first or last slice
    plane, or beyond the outermost pixel centres of the sheared stack. Such
    points become air (`AIR_HU`), or 0 in masks.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import scipy.ndimage

from uem_ich_jax.ct.volume import AIR_HU, CTVolume

logger = logging.getLogger(__name__)

# Tilts below this are rounding in the positions, as in the DICOM reader.
TILT_TOLERANCE_DEG = 0.01
# Slack for points that land on a boundary: pixels in plane, mm along the normal.
_INPLANE_TOLERANCE = 1e-3
_NORMAL_TOLERANCE_MM = 1e-3
# Output points sampled per chunk, which bounds memory to about 100 MB per chunk.
_CHUNK_POINTS = 1 << 21


def gantry_tilt_deg(affine: np.ndarray) -> float:
  """Return the signed angle between an affine's slice stacking direction and the slice normal.

  The sign follows dcm2niix v1.0.20260724, which reports +18.5 for the GE
  head series of the real-scan tests and -16.5 for the Philips series, whose
  GantryDetectorTilt is +16.5. Positive means the stacking step leans against
  the row direction (the affine's row column), negative means along it. Zero
  for an orthogonal affine.
  """
  affine = np.asarray(affine, dtype=np.float64)
  stack_step = affine[:3, 0]
  row_unit = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
  column_unit = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
  normal = np.cross(column_unit, row_unit)
  normal /= np.linalg.norm(normal)
  along_normal = float(stack_step @ normal)
  along_row = float(stack_step @ row_unit) * (1.0 if along_normal >= 0 else -1.0)
  along_column = float(stack_step @ column_unit)
  magnitude = np.degrees(np.arctan2(np.hypot(along_row, along_column), abs(along_normal)))
  return float(-magnitude if along_row > 0 else magnitude)


@dataclasses.dataclass(frozen=True)
class _SourceFrame:
  """Source slices sorted along the normal, in coordinates of the first sorted slice.

  Frame coordinates of an LPS point p are (row, column, height): p equals
  positions[0] + row * row_step + column * column_step + height * normal.
  """

  order: np.ndarray  # Volume slice index of each sorted slice.
  positions: np.ndarray  # (slice, 3) LPS origin of each sorted slice.
  # (slice, 3) frame coordinates of each sorted slice's origin. Heights increase.
  slice_origins: np.ndarray
  normal: np.ndarray
  row_step: np.ndarray
  column_step: np.ndarray
  to_frame: np.ndarray  # 3x3 map from an LPS offset to frame coordinates.

  @property
  def heights(self) -> np.ndarray:
    return self.slice_origins[:, 2]

  def frame_coordinates(self, point: np.ndarray) -> np.ndarray:
    """Return frame coordinates of LPS points (..., 3)."""
    return (np.asarray(point, dtype=np.float64) - self.positions[0]) @ self.to_frame.T

  def frame_steps(self, step: np.ndarray) -> np.ndarray:
    """Return the frame-coordinate change of an LPS displacement (..., 3)."""
    return np.asarray(step, dtype=np.float64) @ self.to_frame.T


def _source_frame(volume: CTVolume) -> _SourceFrame:
  affine = np.asarray(volume.affine, dtype=np.float64)
  row_step = affine[:3, 1]
  column_step = affine[:3, 2]
  normal = volume.slice_normal
  order = np.argsort(volume.slice_positions_mm, kind="stable")
  positions = np.asarray(volume.positions, dtype=np.float64)[order]
  to_frame = np.linalg.inv(np.stack([row_step, column_step, normal], axis=1))
  slice_origins = (positions - positions[0]) @ to_frame.T
  if np.any(np.diff(slice_origins[:, 2]) < _NORMAL_TOLERANCE_MM):
    raise ValueError("volume has two slices at the same position along the normal")
  return _SourceFrame(
      order=order,
      positions=positions,
      slice_origins=slice_origins,
      normal=normal,
      row_step=row_step,
      column_step=column_step,
      to_frame=to_frame,
  )


def _sample_frame(
    values: np.ndarray,
    frame: _SourceFrame,
    rows: np.ndarray,
    columns: np.ndarray,
    heights: np.ndarray,
    order: int,
    fill_value: float,
) -> np.ndarray:
  """Sample `values` (slice, row, column) at frame coordinates; see the module conventions."""
  num_slices, num_rows, num_columns = values.shape
  slice_heights = frame.heights
  if num_slices == 1:
    lower = np.zeros(rows.shape, dtype=np.int64)
    upper = lower
    weight = np.zeros(rows.shape)
  else:
    lower = np.searchsorted(slice_heights, heights, side="right") - 1
    lower = np.clip(lower, 0, num_slices - 2)
    upper = lower + 1
    gap = slice_heights[upper] - slice_heights[lower]
    weight = np.clip((heights - slice_heights[lower]) / gap, 0.0, 1.0)
  inside = (heights >= slice_heights[0] - _NORMAL_TOLERANCE_MM) & (
      heights <= slice_heights[-1] + _NORMAL_TOLERANCE_MM
  )

  # Row and column of the point within each bracketing slice's own plane.
  lower_rows = rows - frame.slice_origins[lower, 0]
  lower_columns = columns - frame.slice_origins[lower, 1]
  upper_rows = rows - frame.slice_origins[upper, 0]
  upper_columns = columns - frame.slice_origins[upper, 1]
  # The stack is linear between two slices, so the point's place in the sheared
  # stack is the interpolation of its places in the two slice planes.
  stack_rows = (1 - weight) * lower_rows + weight * upper_rows
  stack_columns = (1 - weight) * lower_columns + weight * upper_columns
  inside &= (stack_rows >= -_INPLANE_TOLERANCE) & (
      stack_rows <= num_rows - 1 + _INPLANE_TOLERANCE
  )
  inside &= (stack_columns >= -_INPLANE_TOLERANCE) & (
      stack_columns <= num_columns - 1 + _INPLANE_TOLERANCE
  )

  def sample(sorted_index, slice_rows, slice_columns):
    # A point inside the stack can be up to one shear step outside one of its
    # two slices, and then takes that slice's edge pixel (clipping).
    coordinates = np.stack(
        [
            frame.order[sorted_index].astype(np.float64),
            np.clip(slice_rows, 0, num_rows - 1),
            np.clip(slice_columns, 0, num_columns - 1),
        ]
    )
    return scipy.ndimage.map_coordinates(
        values, coordinates, order=order, mode="nearest", prefilter=False
    )

  if order == 0:
    take_lower = weight <= 0.5
    result = sample(
        np.where(take_lower, lower, upper),
        np.where(take_lower, lower_rows, upper_rows),
        np.where(take_lower, lower_columns, upper_columns),
    )
  else:
    lower_values = sample(lower, lower_rows, lower_columns).astype(np.float64)
    upper_values = sample(upper, upper_rows, upper_columns).astype(np.float64)
    result = (1 - weight) * lower_values + weight * upper_values
  return np.where(inside, result, fill_value)


def _resample_parallel_slice(
    values: np.ndarray,
    frame: _SourceFrame,
    origin: np.ndarray,
    row_change: np.ndarray,
    column_change: np.ndarray,
    inplane_shape: tuple[int, int],
    order: int,
    fill_value: float,
) -> np.ndarray:
  """Resample one output slice that is parallel to the source slices.

  Same result as `_sample_frame`, but the whole slice has one height, so it
  needs at most two 2D affine transforms and no per-point coordinate arrays.
  """
  num_slices, num_rows, num_columns = values.shape
  slice_heights = frame.heights
  height = origin[2]
  if num_slices == 1:
    lower, upper, weight = 0, 0, 0.0
  else:
    lower = int(np.clip(np.searchsorted(slice_heights, height, side="right") - 1, 0, num_slices - 2))
    upper = lower + 1
    gap = slice_heights[upper] - slice_heights[lower]
    weight = float(np.clip((height - slice_heights[lower]) / gap, 0.0, 1.0))
  if not (
      slice_heights[0] - _NORMAL_TOLERANCE_MM <= height <= slice_heights[-1] + _NORMAL_TOLERANCE_MM
  ):
    return np.full(inplane_shape, fill_value, dtype=np.float64)

  matrix = np.array([[row_change[0], column_change[0]], [row_change[1], column_change[1]]])
  output_rows = np.arange(inplane_shape[0], dtype=np.float64)[:, None]
  output_columns = np.arange(inplane_shape[1], dtype=np.float64)[None, :]

  def slice_offset(sorted_index):
    return origin[:2] - frame.slice_origins[sorted_index, :2]

  # A diagonal matrix passed as a vector takes scipy's faster zoom-and-shift path.
  is_diagonal = abs(matrix[0, 1]) < 1e-12 and abs(matrix[1, 0]) < 1e-12
  transform = np.diag(matrix) if is_diagonal else matrix

  def sample(sorted_index):
    return scipy.ndimage.affine_transform(
        values[frame.order[sorted_index]],
        transform,
        offset=slice_offset(sorted_index),
        output_shape=inplane_shape,
        order=order,
        mode="nearest",
        prefilter=False,
    ).astype(np.float64)

  # Inside test on the point's place in the sheared stack, as in _sample_frame.
  stack_offset = (1 - weight) * slice_offset(lower) + weight * slice_offset(upper)
  stack_rows = stack_offset[0] + output_rows * matrix[0, 0] + output_columns * matrix[0, 1]
  stack_columns = stack_offset[1] + output_rows * matrix[1, 0] + output_columns * matrix[1, 1]
  inside = (stack_rows >= -_INPLANE_TOLERANCE) & (stack_rows <= num_rows - 1 + _INPLANE_TOLERANCE)
  inside &= (stack_columns >= -_INPLANE_TOLERANCE) & (
      stack_columns <= num_columns - 1 + _INPLANE_TOLERANCE
  )

  if order == 0:
    result = sample(lower if weight <= 0.5 else upper)
  elif weight == 0.0:
    result = sample(lower)
  elif weight == 1.0:
    result = sample(upper)
  else:
    result = (1 - weight) * sample(lower) + weight * sample(upper)
  return np.where(inside, result, fill_value)


def _resample_slices(
    values: np.ndarray,
    frame: _SourceFrame,
    origins: np.ndarray,
    row_step: np.ndarray,
    column_step: np.ndarray,
    inplane_shape: tuple[int, int],
    order: int,
    fill_value: float,
    dtype: np.dtype,
) -> np.ndarray:
  """Resample onto output slices j with voxels origins[j] + row * row_step + column * column_step."""
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
  num_rows, num_columns = inplane_shape
  origin_coordinates = frame.frame_coordinates(origins)  # (slice, 3)
  row_change = frame.frame_steps(row_step)
  column_change = frame.frame_steps(column_step)
  output = np.empty((len(origins), num_rows, num_columns), dtype=dtype)

  def store(start, stop, sampled):
    if np.issubdtype(dtype, np.integer):
      sampled = np.rint(sampled)
    output[start:stop] = sampled.reshape(stop - start, num_rows, num_columns)

  # Output slices parallel to the source slices (resample_z, correct_tilt and
  # most target grids) take the fast path. Parallel means the height varies by
  # under 1e-4 mm across a slice, which covers affines stored as float32.
  height_variation = abs(row_change[2]) * (num_rows - 1) + abs(column_change[2]) * (num_columns - 1)
  if height_variation < 1e-4:
    for j, origin in enumerate(origin_coordinates):
      sampled = _resample_parallel_slice(
          values, frame, origin, row_change, column_change, inplane_shape, order, fill_value
      )
      store(j, j + 1, sampled)
    return output

  row_index = np.arange(num_rows, dtype=np.float64)[None, :, None]
  column_index = np.arange(num_columns, dtype=np.float64)[None, None, :]
  chunk = max(1, _CHUNK_POINTS // (num_rows * num_columns))
  for start in range(0, len(origins), chunk):
    stop = min(start + chunk, len(origins))
    # Frame coordinates are affine in the output indices, so build each one by
    # broadcasting instead of forming LPS points.
    coordinates = [
        (
            origin_coordinates[start:stop, axis][:, None, None]
            + row_index * row_change[axis]
            + column_index * column_change[axis]
        ).ravel()
        for axis in range(3)
    ]
    store(start, stop, _sample_frame(values, frame, *coordinates, order, fill_value))
  return output


def _nearest_source_index(
    frame: _SourceFrame, origins: np.ndarray, row_step, column_step, inplane_shape
) -> np.ndarray:
  """Return, per output slice, the source slice nearest along the normal to its centre, or -1.

  -1 marks output slices whose centre lies beyond the first or last source plane.
  """
  centres = origins + (inplane_shape[0] - 1) / 2 * row_step
  centres = centres + (inplane_shape[1] - 1) / 2 * column_step
  heights = frame.frame_coordinates(centres)[:, 2]
  slice_heights = frame.heights
  nearest = np.argmin(np.abs(heights[:, None] - slice_heights[None, :]), axis=1)
  outside = (heights < slice_heights[0] - _NORMAL_TOLERANCE_MM) | (
      heights > slice_heights[-1] + _NORMAL_TOLERANCE_MM
  )
  return np.where(outside, -1, frame.order[nearest]).astype(np.int64)


def _covering_inplane_grid(frame: _SourceFrame, shape: tuple[int, int, int]):
  """Return (first row, first column, rows, columns) covering every sheared source slice.

  The grid stays on the first sorted slice's pixel lattice, so an untilted
  volume keeps its in-plane grid and its pixels are copied, not interpolated.
  """
  offsets = frame.slice_origins
  _, num_rows, num_columns = shape
  first_row = int(np.floor(offsets[:, 0].min() + _INPLANE_TOLERANCE))
  last_row = int(np.ceil(offsets[:, 0].max() + num_rows - 1 - _INPLANE_TOLERANCE))
  first_column = int(np.floor(offsets[:, 1].min() + _INPLANE_TOLERANCE))
  last_column = int(np.ceil(offsets[:, 1].max() + num_columns - 1 - _INPLANE_TOLERANCE))
  return first_row, first_column, last_row - first_row + 1, last_column - first_column + 1


def _describe_history(volume: CTVolume, action: str) -> tuple[str, ...]:
  """Keep the source warnings, marked as such, and append what resampling did."""
  earlier = tuple(f"before resampling: {warning}" for warning in volume.provenance.warnings)
  tilt = volume.provenance.gantry_tilt_deg
  if abs(tilt) >= TILT_TOLERANCE_DEG:
    action += f"; source gantry tilt {tilt:.2f} degrees removed by reslicing"
  return earlier + (action,)


def _resliced_volume(
    volume: CTVolume, along_out: np.ndarray, order: int, action: str, single_spacing_mm: float
) -> tuple[CTVolume, np.ndarray]:
  """Reslice onto planes normal to the slice normal at positions `along_out` (mm, increasing).

  `single_spacing_mm` is the slice spacing recorded when there is one output slice.
  """
  frame = _source_frame(volume)
  first_row, first_column, num_rows, num_columns = _covering_inplane_grid(frame, volume.shape)
  base = frame.positions[0] + first_row * frame.row_step + first_column * frame.column_step
  first_height = float(frame.positions[0] @ frame.normal)
  origins = base + (along_out - first_height)[:, None] * frame.normal
  hu = _resample_slices(
      np.asarray(volume.hu, dtype=np.float32),
      frame,
      origins,
      frame.row_step,
      frame.column_step,
      (num_rows, num_columns),
      order,
      AIR_HU,
      np.float32,
  )
  nearest = _nearest_source_index(
      frame, origins, frame.row_step, frame.column_step, (num_rows, num_columns)
  )

  gaps = np.diff(along_out)
  spacing_varies = bool(len(gaps) and np.ptp(gaps) > _NORMAL_TOLERANCE_MM)
  slice_spacing = float(np.median(gaps)) if len(gaps) else float(single_spacing_mm)
  affine = np.eye(4)
  affine[:3, 0] = frame.normal * slice_spacing
  affine[:3, 1] = frame.row_step
  affine[:3, 2] = frame.column_step
  affine[:3, 3] = origins[0]
  provenance = dataclasses.replace(
      volume.provenance,
      sop_instance_uids=("",) * len(origins),
      gantry_tilt_deg=0.0,
      spacing_varies=spacing_varies,
      warnings=_describe_history(volume, action),
  )
  resliced = CTVolume(
      hu=hu,
      positions=origins,
      affine=affine,
      spacing=(slice_spacing, float(volume.spacing[1]), float(volume.spacing[2])),
      affine_is_approximate=spacing_varies,
      provenance=provenance,
  )
  return resliced, nearest


def resample_z(
    volume: CTVolume, spacing_mm: float, *, order: int = 1
) -> tuple[CTVolume, np.ndarray]:
  """Resample to uniform slice spacing along the slice normal, removing any gantry tilt.

  Output slice j lies at `along[0] + j * spacing_mm` along the normal, where
  `along` are the true source slice positions, up to the last source slice.
  The in-plane axes are the source's. The in-plane grid is enlarged to cover
  every sheared source slice, on the first slice's pixel lattice, so an
  untilted volume keeps its rows and columns. The output affine is orthogonal,
  with its slice column along the normal. `provenance.gantry_tilt_deg` becomes
  0, `sop_instance_uids` become empty strings, and the source warnings are kept
  with the tilt that was removed.

  Args:
    volume: source volume; its slices may come in any order along the normal.
    spacing_mm: output slice spacing along the normal.
    order: 1 for linear (bilinear in plane, linear along the normal), 0 for
      nearest source voxel.

  Returns:
    The resampled volume and, per output slice, the index (into `volume`'s
    slices) of the source slice nearest to it along the normal, for carrying
    slice labels over.
  """
  if not spacing_mm > 0:
    raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
  along = volume.slice_positions_mm
  extent = float(along.max() - along.min())
  num_slices = int(np.floor((extent + _NORMAL_TOLERANCE_MM) / spacing_mm)) + 1
  along_out = float(along.min()) + spacing_mm * np.arange(num_slices)
  return _resliced_volume(
      volume,
      along_out,
      order,
      f"resampled to {spacing_mm:g} mm slices along the normal",
      spacing_mm,
  )


def correct_tilt(volume: CTVolume, *, order: int = 1) -> CTVolume:
  """Remove a gantry tilt by reslicing, keeping each slice plane where it was.

  The output slices lie on the source slice planes, so only the in-plane shear
  is interpolated (as in dcm2niix's `_Tilt_1` output). The in-plane grid grows
  as in `resample_z`. When the source spacing varies, the positions stay exact
  and the affine uses the median spacing (`affine_is_approximate`). A volume
  without tilt is returned unchanged.
  """
  if abs(volume.provenance.gantry_tilt_deg) < TILT_TOLERANCE_DEG and (
      abs(gantry_tilt_deg(volume.affine)) < TILT_TOLERANCE_DEG
  ):
    return volume
  along_out = np.sort(volume.slice_positions_mm)
  corrected, _ = _resliced_volume(
      volume, along_out, order, "slice planes kept", volume.spacing[0]
  )
  return corrected


def resample_to_grid(
    volume: CTVolume, affine: np.ndarray, shape: tuple[int, int, int], *, order: int = 1
) -> CTVolume:
  """Resample onto any grid given by an LPS affine of (slice, row, column) indices and a shape.

  Each output voxel is sampled as in `resample_z`, so the target grid may be
  tilted, oblique or at any spacing. Used to compare with other software's
  output grids and to put results back into a source geometry.
  """
  affine = np.asarray(affine, dtype=np.float64)
  frame = _source_frame(volume)
  origins = affine[:3, 3] + np.arange(shape[0])[:, None] * affine[:3, 0]
  hu = _resample_slices(
      np.asarray(volume.hu, dtype=np.float32),
      frame,
      origins,
      affine[:3, 1],
      affine[:3, 2],
      (shape[1], shape[2]),
      order,
      AIR_HU,
      np.float32,
  )
  provenance = dataclasses.replace(
      volume.provenance,
      sop_instance_uids=("",) * shape[0],
      gantry_tilt_deg=gantry_tilt_deg(affine),
      spacing_varies=False,
      warnings=_describe_history(volume, "resampled onto a given grid"),
  )
  normal = np.cross(affine[:3, 2], affine[:3, 1])
  normal /= np.linalg.norm(normal)
  return CTVolume(
      hu=hu,
      positions=origins,
      affine=affine,
      spacing=(
          float(abs(affine[:3, 0] @ normal)),
          float(np.linalg.norm(affine[:3, 1])),
          float(np.linalg.norm(affine[:3, 2])),
      ),
      provenance=provenance,
  )


def resample_mask(mask: np.ndarray, source: CTVolume, target: CTVolume) -> np.ndarray:
  """Resample a mask of `source` onto the voxels of `target`, nearest neighbour.

  `target` is any volume in the same patient space: the output of
  `resample_z`, `correct_tilt` or `resample_to_grid` to carry a mask forward,
  or the original volume to bring a mask back. Its per-slice positions are
  used, so varying spacing is exact. Class ids stay ids, and voxels outside
  the source are 0. The result has the mask's dtype (bool stays bool).
  """
  mask = np.asarray(mask)
  if mask.shape != source.shape:
    raise ValueError(f"mask shape {mask.shape} differs from source volume shape {source.shape}")
  # map_coordinates does not take bool input.
  values = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
  resampled = _resample_slices(
      values,
      _source_frame(source),
      np.asarray(target.positions, dtype=np.float64),
      target.affine[:3, 1],
      target.affine[:3, 2],
      target.shape[1:],
      0,
      0,
      values.dtype,
  )
  return resampled.astype(mask.dtype, copy=False)


def _inplane_zoom(shape: tuple[int, int, int], new_shape: tuple[int, int]):
  """Return the per-axis zoom for resizing (row, column) to `new_shape`."""
  if len(new_shape) != 2 or min(new_shape) < 1:
    raise ValueError(f"in-plane shape must be two positive sizes, got {new_shape}")
  return (1.0, new_shape[0] / shape[1], new_shape[1] / shape[2])


def resize_inplane(volume: CTVolume, shape: tuple[int, int], *, order: int = 1) -> CTVolume:
  """Resize every slice to (rows, columns), keeping the field of view edge to edge.

  Pixel-centre convention: a pixel is a square around its centre, and the
  outer edges of the first and last pixels stay where they were. So the new
  spacing is old * old_size / new_size, and new pixel i has its centre at old
  index (i + 0.5) * old_size / new_size - 0.5 (scipy's `grid_mode=True`).
  Samples between the outer centre and the edge repeat the edge pixel. The
  affine, positions and spacing are updated exactly to match.
  """
  zoom = _inplane_zoom(volume.shape, shape)
  hu = scipy.ndimage.zoom(
      np.asarray(volume.hu, dtype=np.float32),
      zoom,
      order=order,
      mode="nearest",
      grid_mode=True,
  )
  if hu.shape[1:] != tuple(shape):
    raise RuntimeError(f"scipy.ndimage.zoom returned shape {hu.shape}, expected {shape}")
  row_scale = volume.shape[1] / shape[0]
  column_scale = volume.shape[2] / shape[1]
  affine = np.asarray(volume.affine, dtype=np.float64).copy()
  # The first new centre is half a new pixel inside the old first pixel's edge.
  shift = (row_scale / 2 - 0.5) * affine[:3, 1] + (column_scale / 2 - 0.5) * affine[:3, 2]
  affine[:3, 1] *= row_scale
  affine[:3, 2] *= column_scale
  affine[:3, 3] += shift
  return dataclasses.replace(
      volume,
      hu=hu,
      positions=np.asarray(volume.positions, dtype=np.float64) + shift,
      affine=affine,
      spacing=(
          volume.spacing[0],
          volume.spacing[1] * row_scale,
          volume.spacing[2] * column_scale,
      ),
  )


def resize_mask_inplane(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Resize a mask like `resize_inplane`, with nearest neighbour so ids stay ids."""
  mask = np.asarray(mask)
  if mask.ndim != 3:
    raise ValueError(f"mask must be (slice, row, column), got shape {mask.shape}")
  zoom = _inplane_zoom(mask.shape, shape)
  values = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
  resized = scipy.ndimage.zoom(values, zoom, order=0, mode="nearest", grid_mode=True)
  if resized.shape[1:] != tuple(shape):
    raise RuntimeError(f"scipy.ndimage.zoom returned shape {resized.shape}, expected {shape}")
  return resized.astype(mask.dtype, copy=False)
