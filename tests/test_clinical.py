"""Tests of hematoma volume and bleed side in real scan geometry."""

import numpy as np
import pytest

from uem_ich_jax import MASK_CLASS_IDS, SUBTYPES, clinical
from uem_ich_jax.ct.volume import CTVolume
from uem_ich_jax.errors import InputError
from uem_ich_jax.phantom import generate_scan


def _volume(hu, positions, row_step, column_step, spacing=None) -> CTVolume:
  positions = np.asarray(positions, np.float64)
  affine = np.eye(4)
  affine[:3, 0] = positions[1] - positions[0] if len(positions) > 1 else [0.0, 0.0, 1.0]
  affine[:3, 1] = row_step
  affine[:3, 2] = column_step
  affine[:3, 3] = positions[0]
  if spacing is None:
    spacing = (1.0, float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step)))
  return CTVolume(
      hu=np.asarray(hu, np.float32), positions=positions, affine=affine, spacing=spacing
  )


def _head(num_slices: int = 4, size: int = 40) -> np.ndarray:
  """A left-right symmetric elliptical head (40 HU in -1000 HU air), longer along the rows."""
  rows, columns = np.mgrid[:size, :size]
  centre = (size - 1) / 2
  inside = ((rows - centre) / 17.0) ** 2 + ((columns - centre) / 13.0) ** 2 <= 1.0
  return np.broadcast_to(np.where(inside, 40.0, -1000.0), (num_slices, size, size)).copy()


def test_hematoma_ml_uneven_spacing_and_tilt():
  # Slices along z at 0, 2, 5 and 9 mm, sheared along y by a gantry tilt:
  # slabs are 2, 2.5, 3.5 and 4 mm along the normal, whatever the shear.
  z = np.array([0.0, 2.0, 5.0, 9.0])
  positions = np.stack([np.zeros(4), -0.3 * z, z], axis=1)
  volume = _volume(np.zeros((4, 6, 6)), positions, [0.0, 0.8, 0.0], [0.5, 0.0, 0.0])
  mask = np.zeros((4, 6, 6), np.uint8)
  mask[0, :2, :5] = MASK_CLASS_IDS["intraparenchymal"]  # 10 voxels.
  mask[2, 0, :5] = MASK_CLASS_IDS["intraparenchymal"]  # 5 voxels.
  mask[3, 1, :3] = MASK_CLASS_IDS["subdural"]  # 3 voxels.
  volumes = clinical.hematoma_ml(mask, volume)
  pixel_mm2 = 0.8 * 0.5
  assert volumes["intraparenchymal"] == pytest.approx(pixel_mm2 * (10 * 2.0 + 5 * 3.5) / 1000)
  assert volumes["subdural"] == pytest.approx(pixel_mm2 * 3 * 4.0 / 1000)
  assert volumes["epidural"] == 0.0
  assert set(volumes) == set(SUBTYPES)
  np.testing.assert_allclose(clinical.slab_thickness_mm(volume), [2.0, 2.5, 3.5, 4.0])


def test_hematoma_ml_oblique_pixels_and_descending_slices():
  # Rows and columns not along the axes and not orthogonal: the pixel area is
  # the parallelogram |row x column|; slices stored from top to bottom.
  row_step = np.array([0.0, 0.6, 0.8])
  column_step = np.array([1.0, 0.0, 0.0]) * 0.7 + 0.2 * row_step
  normal = np.cross(column_step, row_step)
  normal /= np.linalg.norm(normal)
  positions = np.outer([6.0, 3.0, 0.0], normal)
  volume = _volume(np.zeros((3, 4, 4)), positions, row_step, column_step)
  mask = np.full((3, 4, 4), MASK_CLASS_IDS["epidural"], np.uint8)
  area = np.linalg.norm(np.cross(row_step, column_step))
  assert clinical.hematoma_ml(mask, volume)["epidural"] == pytest.approx(area * 16 * 9.0 / 1000)


def test_hematoma_ml_single_slice_uses_spacing():
  volume = _volume(np.zeros((1, 3, 3)), [[0.0, 0.0, 0.0]], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0],
                   spacing=(7.0, 1.0, 1.0))
  mask = np.ones((1, 3, 3), np.uint8)
  assert clinical.hematoma_ml(mask, volume)["epidural"] == pytest.approx(9 * 7.0 / 1000)


def test_hematoma_ml_rejects_bad_masks():
  volume = _volume(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 2]], [0, 1, 0], [1, 0, 0])
  with pytest.raises(InputError, match="shape"):
    clinical.hematoma_ml(np.zeros((2, 3, 4), np.uint8), volume)
  with pytest.raises(InputError, match=r"class ids \[6\]"):
    clinical.hematoma_ml(np.full((2, 3, 3), 6, np.uint8), volume)
  with pytest.raises(InputError, match=r"class ids \[-1\]"):
    clinical.hematoma_ml(np.full((2, 3, 3), -1, np.int8), volume)
  with pytest.raises(InputError, match="integer class ids"):
    clinical.hematoma_ml(np.zeros((2, 3, 3), bool), volume)
  with pytest.raises(InputError, match="integer class ids"):
    clinical.hematoma_ml(np.zeros((2, 3, 3), np.float32), volume)


def test_hematoma_ml_rejects_duplicate_slices():
  volume = _volume(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 0]], [0, 1, 0], [1, 0, 0])
  with pytest.raises(InputError, match="same position"):
    clinical.hematoma_ml(np.zeros((2, 3, 3), np.uint8), volume)


def _side_case(column_sign: float):
  """A symmetric head with a bleed at high column indices; `column_sign` orients the columns."""
  hu = _head()
  mask = np.zeros(hu.shape, np.uint8)
  mask[:, 10:30, 28:32] = MASK_CLASS_IDS["subdural"]
  positions = np.stack([np.full(4, -20.0 * column_sign), np.full(4, -20.0), 5.0 * np.arange(4)], 1)
  volume = _volume(hu, positions, [0.0, 1.0, 0.0], [column_sign, 0.0, 0.0], spacing=(5.0, 1, 1))
  return mask, volume


def test_bleed_side_follows_affine():
  # Columns towards +x (patient left): the bleed at high columns is on the left.
  mask, volume = _side_case(+1.0)
  result = clinical.bleed_side(mask, volume)
  expected_ml = 4 * 20 * 4 * 5.0 / 1000
  assert result["side"] == "left"
  assert result["left_ml"] == pytest.approx(expected_ml)
  assert result["right_ml"] == 0.0
  # The same arrays with the columns running to the patient's right.
  mask, flipped = _side_case(-1.0)
  result = clinical.bleed_side(mask, flipped)
  assert result["side"] == "right"
  assert result["right_ml"] == pytest.approx(expected_ml)
  assert result["left_ml"] == 0.0


def test_bleed_side_estimated_midline_is_head_centre():
  mask, volume = _side_case(+1.0)
  midline = clinical.estimate_midline(volume)
  np.testing.assert_allclose(np.abs(midline.normal), [1.0, 0.0, 0.0], atol=1e-6)
  # Column 19.5 is the head's centre; column 0 lies at x = -20 mm.
  np.testing.assert_allclose(midline.point_mm[:, 0], -0.5, atol=1e-6)


def test_bleed_side_bilateral_and_minimum_volume():
  mask, volume = _side_case(+1.0)
  mask[1, 20, 8] = MASK_CLASS_IDS["subdural"]  # One 5 uL voxel on the right.
  assert clinical.bleed_side(mask, volume)["side"] == "left"
  mask[:, 10:30, 8:12] = MASK_CLASS_IDS["subdural"]
  result = clinical.bleed_side(mask, volume)
  assert result["side"] == "bilateral"
  assert clinical.bleed_side(mask, volume, min_side_ml=2.0)["side"] == "none"
  assert clinical.bleed_side(np.zeros_like(mask), volume)["side"] == "none"


def test_bleed_side_given_midline():
  mask, volume = _side_case(+1.0)
  # A plane far to the patient's left puts the whole bleed on the right.
  far_left = clinical.Midline(point_mm=np.array([50.0, 0.0, 0.0]), normal=np.array([1.0, 0, 0]))
  assert clinical.bleed_side(mask, volume, midline=far_left)["side"] == "right"
  # The opposite normal describes the same plane and gives the same side.
  reversed_normal = clinical.Midline(point_mm=np.array([50.0, 0, 0]), normal=np.array([-1.0, 0, 0]))
  assert clinical.bleed_side(mask, volume, midline=reversed_normal)["side"] == "right"
  coronal = clinical.Midline(point_mm=np.zeros(3), normal=np.array([0.0, 1.0, 0.0]))
  with pytest.raises(InputError, match="midsagittal"):
    clinical.bleed_side(mask, volume, midline=coronal)
  with pytest.raises(InputError, match="point_mm"):
    clinical.bleed_side(
        mask, volume, midline=clinical.Midline(point_mm=np.zeros((2, 3)), normal=np.eye(3)[0])
    )


@pytest.mark.parametrize("min_side_ml", [float("nan"), float("inf"), -0.1])
def test_bleed_side_rejects_bad_min_side_ml(min_side_ml):
  mask, volume = _side_case(+1.0)
  with pytest.raises(InputError, match="min_side_ml must be a finite number >= 0"):
    clinical.bleed_side(mask, volume, min_side_ml=min_side_ml)
  with pytest.raises(InputError, match="min_side_ml must be a finite number >= 0"):
    clinical.side_from_ml(1.0, 1.0, min_side_ml)


def test_side_from_ml_rejects_bad_volumes():
  with pytest.raises(InputError, match="left_ml must be a finite number >= 0"):
    clinical.side_from_ml(float("nan"), 1.0)
  with pytest.raises(InputError, match="right_ml must be a finite number >= 0"):
    clinical.side_from_ml(1.0, -1.0)
  assert clinical.side_from_ml(0.0, 0.0, 0.0) == "bilateral"


def _with_geometry(volume: CTVolume, *, affine=None, positions=None, spacing=None) -> CTVolume:
  return CTVolume(
      hu=volume.hu,
      positions=volume.positions if positions is None else positions,
      affine=volume.affine if affine is None else affine,
      spacing=volume.spacing if spacing is None else spacing,
  )


def test_non_finite_geometry_raises():
  mask, volume = _side_case(+1.0)
  for row, column in [(0, 1), (1, 2), (2, 3)]:
    affine = volume.affine.copy()
    affine[row, column] = np.nan
    bad = _with_geometry(volume, affine=affine)
    with pytest.raises(InputError, match="affine contains non-finite values"):
      clinical.hematoma_ml(mask, bad)
    with pytest.raises(InputError, match="affine contains non-finite values"):
      clinical.bleed_side(mask, bad)
  positions = volume.positions.copy()
  positions[2, 0] = np.inf
  with pytest.raises(InputError, match=r"positions of slices \[2\] are not finite"):
    clinical.hematoma_ml(mask, _with_geometry(volume, positions=positions))
  flat = volume.affine.copy()
  flat[:3, 2] = 0.0
  with pytest.raises(InputError, match="span no area"):
    clinical.voxel_volume_ml(_with_geometry(volume, affine=flat))
  single = _with_geometry(
      _volume(_head(1), [[0.0, 0.0, 0.0]], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]),
      spacing=(np.nan, 1.0, 1.0),
  )
  with pytest.raises(InputError, match=r"spacing\[0\] is nan"):
    clinical.hematoma_ml(np.zeros(single.shape, np.uint8), single)


def test_non_finite_midline_point_raises():
  mask, volume = _side_case(+1.0)
  midline = clinical.Midline(point_mm=np.array([np.nan, 0.0, 0.0]), normal=np.eye(3)[0])
  with pytest.raises(InputError, match="point_mm contains non-finite values"):
    clinical.bleed_side(mask, volume, midline=midline)


def test_bleed_side_without_head_raises():
  mask, volume = _side_case(+1.0)
  empty = CTVolume(
      hu=np.full(volume.shape, -1000.0, np.float32),
      positions=volume.positions,
      affine=volume.affine,
      spacing=volume.spacing,
  )
  with pytest.raises(InputError, match="midline"):
    clinical.bleed_side(mask, empty)


@pytest.mark.parametrize(
    "seed, subtypes, tilt_deg",
    [(20, ("subdural",), 0.0), (21, ("epidural",), 12.0), (22, ("intraparenchymal",), 0.0),
     (23, ("subdural", "epidural"), -10.0)],
)
def test_phantom_truth_agrees(seed, subtypes, tilt_deg):
  scan = generate_scan(
      seed, (16, 128, 128), spacing_mm=(8.0, 1.8, 1.8), subtypes=subtypes, tilt_deg=tilt_deg
  )
  volumes = clinical.hematoma_ml(scan.mask, scan.volume)
  for name in SUBTYPES:
    assert volumes[name] == pytest.approx(scan.hematoma_ml[name], rel=1e-6), name
  result = clinical.bleed_side(scan.mask, scan.volume)
  assert result["side"] == scan.bleed_side
  total = scan.bleed_ml_left + scan.bleed_ml_right
  assert result["left_ml"] == pytest.approx(scan.bleed_ml_left, abs=0.02 * total + 0.1)
  assert result["right_ml"] == pytest.approx(scan.bleed_ml_right, abs=0.02 * total + 0.1)
