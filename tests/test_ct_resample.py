"""Tests for slice resampling, gantry-tilt correction and in-plane resizing.

Synthetic volumes carry HU fields that are linear in patient coordinates, so
linear interpolation must reproduce them exactly wherever a sample is inside
the source. The real-scan tests compare with dcm2niix's tilt-corrected output.
"""

import dataclasses
import pathlib
import subprocess

import numpy as np
import pytest

import dcm2niix_tool
from uem_ich_jax.ct import nifti, resample
from uem_ich_jax.ct.volume import AIR_HU, CTVolume, Provenance

# HU = GRADIENT . p + OFFSET for an LPS point p in mm.
GRADIENT = np.array([1.5, -2.0, 3.0])
OFFSET = 40.0


def linear_field(points: np.ndarray) -> np.ndarray:
  return points @ GRADIENT + OFFSET


def stacked_volume(
    heights_mm,
    tilt_deg: float = 0.0,
    inplane_shape=(20, 16),
    pixel_mm=(0.5, 0.75),
    values=None,
) -> CTVolume:
  """A GE-like stack: slices moved along +z by `heights_mm`, planes tilted about x.

  The row step follows the column cosine (0, cos, -sin), so the slice normal is
  (0, sin, cos) and the tilt has dcm2niix's sign (positive here, as for GE).
  """
  angle = np.radians(tilt_deg)
  row_step = pixel_mm[0] * np.array([0.0, np.cos(angle), -np.sin(angle)])
  column_step = pixel_mm[1] * np.array([1.0, 0.0, 0.0])
  origin = np.array([-4.0, -6.0, 10.0])
  heights = np.asarray(heights_mm, dtype=np.float64)
  positions = origin + heights[:, None] * np.array([0.0, 0.0, 1.0])
  rows, columns = inplane_shape
  if values is None:
    grid = (
        positions[:, None, None, :]
        + np.arange(rows)[None, :, None, None] * row_step
        + np.arange(columns)[None, None, :, None] * column_step
    )
    values = linear_field(grid).astype(np.float32)
  step = positions[-1] - positions[0]
  step = step / max(len(heights) - 1, 1)
  affine = np.eye(4)
  affine[:3, 0] = step
  affine[:3, 1] = row_step
  affine[:3, 2] = column_step
  affine[:3, 3] = positions[0]
  gaps = np.diff(heights)
  varies = bool(len(gaps) and np.ptp(gaps) > 1e-6)
  normal_spacing = float(np.median(gaps) * np.cos(angle)) if len(gaps) else 1.0
  return CTVolume(
      hu=values,
      positions=positions,
      affine=affine,
      spacing=(normal_spacing, pixel_mm[0], pixel_mm[1]),
      affine_is_approximate=varies,
      provenance=Provenance(
          gantry_tilt_deg=resample.gantry_tilt_deg(affine), spacing_varies=varies
      ),
  )


def voxel_points(volume: CTVolume) -> np.ndarray:
  """LPS point of every voxel from the per-slice positions, (slice, row, column, 3)."""
  rows, columns = volume.shape[1:]
  return (
      volume.positions[:, None, None, :]
      + np.arange(rows)[None, :, None, None] * volume.affine[:3, 1]
      + np.arange(columns)[None, None, :, None] * volume.affine[:3, 2]
  )


def inside_parallelepiped(volume: CTVolume, points: np.ndarray, margin: float, row_margin=0.0):
  """Which points lie inside a linearly stacked source, and which are within `margin` of its edge.

  Solves p = positions[0] + s * stack + r * row_step + c * column_step. With
  `row_margin`, "inside" also needs r at least that many rows from either edge.
  """
  stack = volume.positions[-1] - volume.positions[0]
  basis = np.stack([stack, volume.affine[:3, 1], volume.affine[:3, 2]], axis=1)
  s, r, c = np.moveaxis((points - volume.positions[0]) @ np.linalg.inv(basis).T, -1, 0)
  limits = [(s, 1.0), (r, volume.shape[1] - 1), (c, volume.shape[2] - 1)]
  inside = np.ones(points.shape[:-1], dtype=bool)
  near_edge = np.zeros(points.shape[:-1], dtype=bool)
  for coordinate, high in limits:
    scaled_margin = margin / max(high, 1)
    inside &= (coordinate >= 0) & (coordinate <= high)
    near_edge |= (np.abs(coordinate) < scaled_margin) | (np.abs(coordinate - high) < scaled_margin)
  inside &= (r >= row_margin) & (r <= volume.shape[1] - 1 - row_margin)
  return inside, near_edge


def max_shear_rows(volume: CTVolume) -> float:
  """The largest in-plane shift between neighbouring slices, in rows.

  A point inside the stack but within this distance of its row edges can lie
  outside one of its two bracketing slices, which then gives its edge pixel
  instead of a linear extrapolation.
  """
  row_unit = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
  shifts = np.abs(np.diff(volume.positions, axis=0) @ row_unit) / volume.spacing[1]
  return float(shifts.max())


# --- gantry tilt sign ---


def test_gantry_tilt_sign_follows_dcm2niix():
  ge_like = stacked_volume([0.0, 4.0, 8.0], tilt_deg=18.5)
  philips_like = stacked_volume([0.0, 2.5, 5.0], tilt_deg=-16.5)
  assert resample.gantry_tilt_deg(ge_like.affine) == pytest.approx(18.5)
  assert resample.gantry_tilt_deg(philips_like.affine) == pytest.approx(-16.5)
  assert resample.gantry_tilt_deg(np.diag([2.0, 0.5, 0.5, 1.0])) == 0.0


# --- resample_z ---


def test_resample_z_ramp_varying_spacing():
  heights = [0.0, 1.2, 3.1, 7.4, 8.0]
  values = np.empty((5, 6, 7), dtype=np.float32)
  for k, height in enumerate(heights):
    values[k] = 10.0 * height + 5.0
  volume = stacked_volume(heights, inplane_shape=(6, 7), values=values)

  resampled, nearest = resample.resample_z(volume, 1.0)

  assert resampled.shape == (9, 6, 7)
  for j in range(9):
    np.testing.assert_allclose(resampled.hu[j], 10.0 * j + 5.0, atol=1e-4)
  np.testing.assert_array_equal(nearest, [0, 1, 1, 2, 2, 2, 3, 3, 4])
  np.testing.assert_allclose(np.diff(resampled.slice_positions_mm), 1.0)
  np.testing.assert_allclose(resampled.positions[0], volume.positions[0])
  np.testing.assert_allclose(resampled.affine[:3, 1:], volume.affine[:3, 1:])
  assert resampled.spacing == pytest.approx((1.0, 0.5, 0.75))
  assert not resampled.affine_is_approximate
  assert not resampled.provenance.spacing_varies


def test_resample_z_nearest_index_reversed_input():
  heights = [0.0, 1.2, 3.1, 7.4, 8.0]
  values = np.empty((5, 4, 4), dtype=np.float32)
  for k, height in enumerate(heights):
    values[k] = height
  volume = stacked_volume(heights, inplane_shape=(4, 4), values=values)
  reversed_volume = dataclasses.replace(
      volume,
      hu=volume.hu[::-1].copy(),
      positions=volume.positions[::-1].copy(),
      affine=volume.affine @ np.array(
          [[-1.0, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
      ),
  )
  resampled, nearest = resample.resample_z(reversed_volume, 1.0)
  np.testing.assert_array_equal(nearest, 4 - np.array([0, 1, 1, 2, 2, 2, 3, 3, 4]))
  np.testing.assert_allclose(resampled.hu[:, 0, 0], np.arange(9.0), atol=1e-5)


def test_resample_z_nearest_order_copies_slices():
  heights = [0.0, 1.2, 3.1, 7.4, 8.0]
  values = np.random.default_rng(0).integers(-1000, 1000, size=(5, 5, 6)).astype(np.float32)
  volume = stacked_volume(heights, inplane_shape=(5, 6), values=values)
  resampled, nearest = resample.resample_z(volume, 1.0, order=0)
  for j, source in enumerate(nearest):
    np.testing.assert_array_equal(resampled.hu[j], values[source])


@pytest.mark.parametrize("tilt_deg", [18.5, -16.5])
def test_resample_z_tilted_linear_field(tilt_deg):
  volume = stacked_volume([0.0, 4.0, 8.0, 12.0, 13.08, 20.08, 27.08], tilt_deg=tilt_deg)

  resampled, nearest = resample.resample_z(volume, 1.5)

  # Orthogonal output: slice column along the normal, tilt gone and recorded.
  normal = volume.slice_normal
  np.testing.assert_allclose(resampled.affine[:3, 0], 1.5 * normal, atol=1e-12)
  assert resample.gantry_tilt_deg(resampled.affine) == pytest.approx(0.0, abs=1e-9)
  assert resampled.provenance.gantry_tilt_deg == 0.0
  assert any(f"{tilt_deg:.2f} degrees removed" in w for w in resampled.provenance.warnings)
  np.testing.assert_allclose(resampled.affine[:3, 1:3], volume.affine[:3, 1:3])
  # Rows grow to cover the shear: the last slice is 27.08 mm up the stack,
  # which moves it 27.08 mm * sin(tilt) along the rows of 0.5 mm.
  shear_rows = 27.08 * np.sin(np.radians(abs(tilt_deg))) / 0.5
  assert resampled.shape[1] == 20 + int(np.ceil(shear_rows))
  assert resampled.shape[2] == 16
  assert len(nearest) == resampled.num_slices

  points = voxel_points(resampled)
  exact, _ = inside_parallelepiped(volume, points, 1e-6, row_margin=max_shear_rows(volume))
  inside, near_edge = inside_parallelepiped(volume, points, margin=1e-6)
  hu = resampled.hu
  np.testing.assert_allclose(hu[exact], linear_field(points[exact]), atol=2e-3)
  assert np.all(hu[~inside & ~near_edge] == AIR_HU)
  assert np.all(hu[inside & ~near_edge] != AIR_HU)
  assert exact.sum() > 1000


def test_resample_z_untilted_keeps_grid():
  volume = stacked_volume([0.0, 2.0, 4.0, 6.0])
  resampled, nearest = resample.resample_z(volume, 2.0)
  assert resampled.shape == volume.shape
  np.testing.assert_allclose(resampled.hu, volume.hu, atol=1e-4)
  np.testing.assert_allclose(resampled.affine, volume.affine, atol=1e-12)
  np.testing.assert_array_equal(nearest, [0, 1, 2, 3])


def test_resample_z_rejects_bad_arguments():
  volume = stacked_volume([0.0, 2.0, 4.0])
  with pytest.raises(ValueError, match="spacing_mm"):
    resample.resample_z(volume, 0.0)
  with pytest.raises(ValueError, match="order"):
    resample.resample_z(volume, 1.0, order=3)


# --- correct_tilt and resample_to_grid ---


def test_correct_tilt_keeps_slice_planes():
  volume = stacked_volume([0.0, 2.5, 5.0, 7.5, 10.0], tilt_deg=-16.5)
  corrected = resample.correct_tilt(volume)
  assert corrected.num_slices == volume.num_slices
  np.testing.assert_allclose(corrected.slice_positions_mm, volume.slice_positions_mm)
  assert corrected.provenance.gantry_tilt_deg == 0.0
  assert not corrected.affine_is_approximate
  points = voxel_points(corrected)
  inside, near_edge = inside_parallelepiped(volume, points, margin=1e-6)
  np.testing.assert_allclose(corrected.hu[inside], linear_field(points[inside]), atol=2e-3)
  assert np.all(corrected.hu[~inside & ~near_edge] == AIR_HU)


def test_correct_tilt_varying_spacing_keeps_positions():
  volume = stacked_volume([0.0, 4.0, 8.0, 9.08, 16.08], tilt_deg=18.5)
  corrected = resample.correct_tilt(volume)
  np.testing.assert_allclose(corrected.slice_positions_mm, volume.slice_positions_mm)
  assert corrected.affine_is_approximate
  assert corrected.provenance.spacing_varies
  points = voxel_points(corrected)
  inside, _ = inside_parallelepiped(volume, points, margin=1e-6)
  np.testing.assert_allclose(corrected.hu[inside], linear_field(points[inside]), atol=2e-3)


def test_correct_tilt_untilted_unchanged():
  volume = stacked_volume([0.0, 2.0, 4.0])
  assert resample.correct_tilt(volume) is volume


def test_resample_to_own_sheared_grid_is_identity():
  volume = stacked_volume([0.0, 4.0, 8.0, 12.0], tilt_deg=18.5)
  same = resample.resample_to_grid(volume, volume.affine, volume.shape)
  np.testing.assert_allclose(same.hu, volume.hu, atol=1e-3)
  assert same.provenance.gantry_tilt_deg == pytest.approx(18.5)


def test_resample_to_oblique_grid_linear_field():
  volume = stacked_volume([0.0, 3.0, 6.0, 9.0, 12.0], tilt_deg=10.0)
  angle = np.radians(25.0)
  turn = np.array(
      [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
  )
  affine = np.eye(4)
  affine[:3, 0] = turn @ [0.0, 0.0, 1.0]
  affine[:3, 1] = turn @ [0.0, 0.6, 0.0]
  affine[:3, 2] = turn @ [0.6, 0.0, 0.0]
  # The target grid reaches past the source on every side.
  affine[:3, 3] = volume.positions[0] - [2.0, 3.0, 2.0]
  target = resample.resample_to_grid(volume, affine, (16, 28, 28))
  points = voxel_points(target)
  exact, _ = inside_parallelepiped(volume, points, 1e-6, row_margin=max_shear_rows(volume))
  inside, near_edge = inside_parallelepiped(volume, points, margin=1e-6)
  assert exact.sum() > 100
  assert (~inside).sum() > 1000
  np.testing.assert_allclose(target.hu[exact], linear_field(points[exact]), atol=2e-3)
  assert np.all(target.hu[~inside & ~near_edge] == AIR_HU)
  assert np.all(target.hu[inside & ~near_edge] != AIR_HU)


# --- masks ---


def test_resample_mask_follows_nearest_slice():
  heights = [0.0, 1.2, 3.1, 7.4, 8.0]
  volume = stacked_volume(heights, inplane_shape=(6, 6))
  mask = np.zeros(volume.shape, dtype=np.uint8)
  for k in range(5):
    mask[k, 1:4, 2:5] = k + 1
  resampled, nearest = resample.resample_z(volume, 1.0)
  resampled_mask = resample.resample_mask(mask, volume, resampled)
  assert resampled_mask.dtype == np.uint8
  for j, source in enumerate(nearest):
    np.testing.assert_array_equal(resampled_mask[j], mask[source])


def test_resample_mask_round_trip_tilted():
  volume = stacked_volume([0.0, 2.0, 4.0, 6.0, 8.0], tilt_deg=18.5)
  mask = np.zeros(volume.shape, dtype=bool)
  mask[1:4, 5:12, 4:10] = True
  corrected = resample.correct_tilt(volume)
  forward = resample.resample_mask(mask, volume, corrected)
  assert forward.dtype == np.bool_
  assert forward.sum() > 0
  back = resample.resample_mask(forward, corrected, volume)
  # The slice planes are kept, so each slice moves by the same row shift there
  # and back. Rounding the shift to whole rows twice restores every voxel
  # unless a shift is exactly half a row, which these heights avoid.
  np.testing.assert_array_equal(back, mask)


def test_resample_mask_rejects_wrong_shape():
  volume = stacked_volume([0.0, 2.0, 4.0])
  with pytest.raises(ValueError, match="mask shape"):
    resample.resample_mask(np.zeros((2, 2, 2), np.uint8), volume, volume)


# --- in-plane resizing ---


@pytest.mark.parametrize("new_shape", [(10, 8), (40, 32), (15, 13)])
def test_resize_inplane_linear_field(new_shape):
  volume = stacked_volume([0.0, 2.0, 4.0], tilt_deg=12.0)
  resized = resample.resize_inplane(volume, new_shape)
  assert resized.shape == (3,) + new_shape
  row_scale = 20 / new_shape[0]
  column_scale = 16 / new_shape[1]
  assert resized.spacing == pytest.approx((volume.spacing[0], 0.5 * row_scale, 0.75 * column_scale))
  # The field of view edge to edge is unchanged.
  old_edge = volume.positions[0] - 0.5 * volume.affine[:3, 1] - 0.5 * volume.affine[:3, 2]
  new_edge = resized.positions[0] - 0.5 * resized.affine[:3, 1] - 0.5 * resized.affine[:3, 2]
  np.testing.assert_allclose(new_edge, old_edge, atol=1e-12)
  np.testing.assert_allclose(resized.affine[:3, 0], volume.affine[:3, 0])
  # Centres that map inside the old outer centres carry the exact linear field.
  rows = (np.arange(new_shape[0]) + 0.5) * row_scale - 0.5
  columns = (np.arange(new_shape[1]) + 0.5) * column_scale - 0.5
  row_inside = (rows >= 0) & (rows <= 19)
  column_inside = (columns >= 0) & (columns <= 15)
  points = voxel_points(resized)[:, row_inside][:, :, column_inside]
  np.testing.assert_allclose(
      resized.hu[:, row_inside][:, :, column_inside], linear_field(points), atol=2e-3
  )


def test_resize_mask_inplane_blocks():
  mask = np.zeros((2, 8, 6), dtype=np.uint8)
  mask[:, 2:6, 0:2] = 3
  mask[1, 4:8, 4:6] = 5
  resized = resample.resize_mask_inplane(mask, (4, 3))
  assert resized.dtype == np.uint8
  expected = mask[:, ::2, ::2]
  np.testing.assert_array_equal(resized, expected)
  as_bool = resample.resize_mask_inplane(mask == 3, (4, 3))
  assert as_bool.dtype == np.bool_
  np.testing.assert_array_equal(as_bool, expected == 3)
  upsampled = resample.resize_mask_inplane(mask, (16, 12))
  np.testing.assert_array_equal(upsampled[:, ::2, ::2], mask)
  np.testing.assert_array_equal(upsampled[:, 1::2, 1::2], mask)


def test_resampled_volume_nifti_round_trip(tmp_path):
  volume = stacked_volume([0.0, 4.0, 8.0, 9.08, 16.08], tilt_deg=18.5)
  resampled, _ = resample.resample_z(volume, 2.0)
  back = nifti.read_nifti(nifti.write_nifti(resampled, tmp_path / "resampled.nii.gz"))
  np.testing.assert_allclose(back.affine, resampled.affine, atol=1e-4)
  np.testing.assert_array_equal(back.hu, np.rint(resampled.hu))
  assert back.provenance.gantry_tilt_deg == pytest.approx(0.0, abs=1e-3)


# --- real scans compared with dcm2niix ---


def run_dcm2niix(folder: pathlib.Path, output: pathlib.Path, pattern: str) -> pathlib.Path:
  """Convert one series with dcm2niix and return the one output matching `pattern`."""
  output.mkdir(parents=True, exist_ok=True)
  subprocess.run(
      [dcm2niix_tool.binary(), "-z", "n", "-f", "%s_%d", "-o", str(output), str(folder)],
      check=True,
      capture_output=True,
      timeout=120,
  )
  matches = sorted(output.glob(pattern))
  assert len(matches) == 1, f"dcm2niix wrote {sorted(p.name for p in output.iterdir())}"
  return matches[0]


def head_difference(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """|ours - reference| in HU over voxels both call tissue, away from the scan circle's edge.

  The DICOM reader turns pixel padding outside the reconstruction circle into
  air, while dcm2niix keeps the stored padding values (about -1500 HU here).
  Voxels within 3 voxels of those are left out, because interpolating next to
  them differs by design.
  """
  import scipy.ndimage

  padding = scipy.ndimage.binary_dilation(reference < -1100, iterations=3)
  head = (reference > -200) & (ours > -200) & ~padding
  return np.abs(ours - reference)[head]


def centroid_lps(volume: CTVolume, threshold: float = -200.0) -> np.ndarray:
  indices = np.argwhere(volume.hu > threshold)
  points = (
      volume.positions[indices[:, 0]]
      + indices[:, 1:2] * volume.affine[:3, 1]
      + indices[:, 2:3] * volume.affine[:3, 2]
  )
  return points.mean(axis=0)


@pytest.fixture(scope="module")
def read_dicom_series():
  dicom = pytest.importorskip("uem_ich_jax.ct.dicom")
  return dicom.read_dicom_series


def test_ge_tilt_eq_matches_dcm2niix(real_ct_dir, tmp_path, read_dicom_series):
  volume = read_dicom_series(real_ct_dir / "ge_head_tilt_variable_spacing")
  reference = nifti.read_nifti(
      run_dcm2niix(real_ct_dir / "ge_head_tilt_variable_spacing", tmp_path, "*_Tilt_Eq_1.nii")
  )
  # dcm2niix's "Eq" grid: orthogonal, slices along the normal from the first
  # slice plane to the last at uniform spacing, rows grown to cover the shear
  # on the first slice's pixel lattice. That is resample_z's grid.
  resampled, nearest = resample.resample_z(volume, reference.spacing[0])
  assert resampled.shape == reference.shape
  np.testing.assert_allclose(resampled.affine, reference.affine, atol=2e-3)

  difference = head_difference(resampled.hu, reference.hu)
  assert difference.size > 5_000_000
  # Both interpolate linearly. Measured: median 0.26 HU, 99th percentile
  # 0.82 HU; dcm2niix rounds to int16, which alone gives up to 0.5 HU.
  assert np.median(difference) < 0.5
  assert np.percentile(difference, 99) < 1.5
  assert np.all(np.diff(nearest) >= 0)
  assert nearest[0] == 0
  assert nearest[-1] == volume.num_slices - 1


def test_philips_tilt_matches_dcm2niix(real_ct_dir, tmp_path, read_dicom_series):
  volume = read_dicom_series(real_ct_dir / "philips_head_phantom_tilt")
  reference = nifti.read_nifti(
      run_dcm2niix(real_ct_dir / "philips_head_phantom_tilt", tmp_path, "*_Tilt_1.nii")
  )
  corrected = resample.correct_tilt(volume)
  assert corrected.shape == reference.shape
  np.testing.assert_allclose(corrected.affine[:3, :3], reference.affine[:3, :3], atol=1e-4)

  # dcm2niix v1.0.20260724 keeps the slice planes and shifts each slice along
  # the rows, but it puts the pixel lattice on the last slice, not the first.
  # So its rows sit (ceil(shift) - shift) rows before ours, where shift is the
  # last slice's total shift in rows. Its written origin for this series is
  # also about 76 mm off the first slice plane. The voxels match the grid built
  # here (measured median 0.23 HU), so the origin comes from the DICOM positions.
  row_step = corrected.affine[:3, 1]
  last_slice_rows = (volume.positions[-1] - corrected.positions[0]) @ row_step / (row_step @ row_step)
  lattice_offset = np.ceil(last_slice_rows - 1e-6) - last_slice_rows
  affine = corrected.affine.copy()
  affine[:3, 3] -= lattice_offset * row_step
  ours = resample.resample_to_grid(volume, affine, reference.shape)

  difference = head_difference(ours.hu, reference.hu)
  assert difference.size > 1_500_000
  # Measured: median 0.23 HU, 99th percentile 0.50 HU, max 0.55 HU, which is
  # dcm2niix's rounding to int16.
  assert np.median(difference) < 0.5
  assert np.percentile(difference, 99) < 1.0


@pytest.mark.parametrize("series", ["ge_head_tilt_variable_spacing", "philips_head_phantom_tilt"])
def test_tilt_correction_keeps_anatomy_in_place(real_ct_dir, read_dicom_series, series):
  volume = read_dicom_series(real_ct_dir / series)
  corrected = resample.correct_tilt(volume)
  assert corrected.provenance.gantry_tilt_deg == 0.0
  assert abs(volume.provenance.gantry_tilt_deg) > 15
  np.testing.assert_allclose(centroid_lps(corrected), centroid_lps(volume), atol=0.1)


@pytest.mark.parametrize(
    "series, expected_tilt_deg",
    [("ge_head_tilt_variable_spacing", 18.5), ("philips_head_phantom_tilt", -16.5)],
)
def test_nifti_tilt_matches_dicom_tilt(real_ct_dir, tmp_path, read_dicom_series, series, expected_tilt_deg):
  # dcm2niix's uncorrected output keeps the tilt as a shear in the sform.
  run_dcm2niix(real_ct_dir / series, tmp_path, "*_Tilt*_1.nii")
  uncorrected = [path for path in tmp_path.glob("*.nii") if "_Tilt" not in path.name]
  assert len(uncorrected) == 1
  from_nifti = nifti.read_nifti(uncorrected[0])
  from_dicom = read_dicom_series(real_ct_dir / series)
  assert from_nifti.provenance.gantry_tilt_deg == pytest.approx(expected_tilt_deg, abs=0.05)
  assert from_dicom.provenance.gantry_tilt_deg == pytest.approx(expected_tilt_deg, abs=0.05)
  np.testing.assert_allclose(from_nifti.affine[:3, 1:], from_dicom.affine[:3, 1:], atol=1e-4)
  np.testing.assert_allclose(from_nifti.positions[0], from_dicom.positions[0], atol=1e-3)
