"""Tests for NIfTI reading and writing: orientation, scaling, masks and bad input."""

import gzip
import itertools
import logging
import os
import struct

import nibabel
import nibabel.orientations
import numpy as np
import pytest

from uem_ich_jax import ct
from uem_ich_jax.ct import nifti
from uem_ich_jax.ct.volume import CTReadError, CTVolume


def make_volume(affine: np.ndarray, shape=(5, 6, 7), seed=0) -> CTVolume:
  """A volume with integer HU, positions taken from `affine`."""
  hu = np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.float32)
  positions = np.array([(affine @ [k, 0, 0, 1])[:3] for k in range(shape[0])])
  spacing = (
      float(np.linalg.norm(affine[:3, 0])),
      float(np.linalg.norm(affine[:3, 1])),
      float(np.linalg.norm(affine[:3, 2])),
  )
  return CTVolume(hu=hu, positions=positions, affine=affine, spacing=spacing)


def axial_affine() -> np.ndarray:
  """(slice, row, column) -> LPS for a plain axial series; float32-exact numbers."""
  return np.array(
      [
          [0.0, 0.0, 0.5, -120.0],
          [0.0, 0.75, 0.0, -100.5],
          [2.5, 0.0, 0.0, 30.25],
          [0.0, 0.0, 0.0, 1.0],
      ]
  )


def rotation(axis: int, degrees: float) -> np.ndarray:
  angle = np.radians(degrees)
  c, s = np.cos(angle), np.sin(angle)
  a, b = [i for i in range(3) if i != axis]
  matrix = np.eye(3)
  matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
  return matrix


def oblique_tilted_affine() -> np.ndarray:
  """An oblique in-plane orientation with a 15 degree gantry-style shear of the slice step."""
  row_dir = np.array([0.0, 1.0, 0.0])
  column_dir = np.array([1.0, 0.0, 0.0])
  turn = rotation(2, 7.0) @ rotation(0, -12.0)
  row_dir, column_dir = turn @ row_dir, turn @ column_dir
  normal = np.cross(column_dir, row_dir)
  tilt = np.radians(15.0)
  slice_step = 3.0 * normal - 3.0 * np.tan(tilt) * row_dir
  affine = np.eye(4)
  affine[:3, 0] = slice_step
  affine[:3, 1] = 0.45 * row_dir
  affine[:3, 2] = 0.45 * column_dir
  affine[:3, 3] = [-110.3, -95.2, 41.7]
  return affine


def voxel_world_points(volume: CTVolume) -> np.ndarray:
  """LPS position of every voxel, (slice, row, column, 3)."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
  return grid @ volume.affine[:3, :3].T + volume.affine[:3, 3]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_axial(tmp_path, suffix):
  volume = make_volume(axial_affine())
  path = nifti.write_nifti(volume, tmp_path / f"scan{suffix}")
  back = nifti.read_nifti(path)
  np.testing.assert_array_equal(back.hu, volume.hu)
  np.testing.assert_array_equal(back.affine, volume.affine)
  np.testing.assert_array_equal(back.positions, volume.positions)
  assert back.spacing == pytest.approx(volume.spacing)
  assert back.provenance.gantry_tilt_deg == 0.0
  assert back.provenance.source_files == (str(path),)
  assert back.hu.dtype == np.float32


def test_round_trip_oblique_tilted(tmp_path):
  affine = oblique_tilted_affine()
  volume = make_volume(affine, shape=(4, 9, 8))
  path = nifti.write_nifti(volume, tmp_path / "tilted.nii.gz")
  back = nifti.read_nifti(path)
  np.testing.assert_array_equal(back.hu, volume.hu)
  # The NIfTI-1 sform is float32, so the affine survives to float32 precision.
  np.testing.assert_allclose(back.affine, affine, rtol=0, atol=2e-5)
  assert back.provenance.gantry_tilt_deg == pytest.approx(15.0, abs=1e-4)
  assert any("gantry tilt 15.00 degrees" in w for w in back.provenance.warnings)
  assert back.spacing[0] == pytest.approx(3.0, abs=1e-5)


def test_written_header(tmp_path):
  volume = make_volume(oblique_tilted_affine())
  path = nifti.write_nifti(volume, tmp_path / "scan.nii")
  image = nibabel.load(path)
  header = image.header
  assert header.get_data_dtype() == np.int16
  assert int(header["sform_code"]) == 1
  assert int(header["qform_code"]) == 1
  assert image.shape == (7, 6, 5)
  # Voxel (column, row, slice) of the file is voxel (slice, row, column) of the volume.
  expected_ras = nifti.LPS_TO_RAS @ volume.affine @ [4, 3, 2, 1]
  np.testing.assert_allclose(header.get_sform() @ [2, 3, 4, 1], expected_ras, atol=1e-4)
  assert np.asarray(image.dataobj)[2, 3, 4] == volume.hu[4, 3, 2]


def test_write_mask_uint8(tmp_path):
  volume = make_volume(axial_affine())
  mask = (np.arange(np.prod(volume.shape)).reshape(volume.shape) % 6).astype(np.uint8)
  path = nifti.write_nifti(volume, tmp_path / "mask.nii.gz", mask=mask)
  assert nibabel.load(path).header.get_data_dtype() == np.uint8
  back, back_mask = nifti.read_nifti_pair(nifti.write_nifti(volume, tmp_path / "ct.nii"), path)
  np.testing.assert_array_equal(back_mask, mask)
  np.testing.assert_array_equal(back.hu, volume.hu)


def test_write_rejects_bad_mask_and_suffix(tmp_path):
  volume = make_volume(axial_affine())
  with pytest.raises(ValueError, match="shape"):
    nifti.write_nifti(volume, tmp_path / "m.nii", mask=np.zeros((1, 2, 3), np.uint8))
  with pytest.raises(ValueError, match="0..255"):
    nifti.write_nifti(volume, tmp_path / "m.nii", mask=np.full(volume.shape, 300))
  with pytest.raises(ValueError, match="suffix"):
    nifti.write_nifti(volume, tmp_path / "scan.img")


def test_write_clips_to_int16(tmp_path, caplog):
  volume = make_volume(axial_affine())
  volume.hu[0, 0, 0] = 40000.0
  volume.hu[0, 0, 1] = 12.6
  with caplog.at_level(logging.WARNING):
    back = nifti.read_nifti(nifti.write_nifti(volume, tmp_path / "scan.nii"))
  assert back.hu[0, 0, 0] == 32767
  assert back.hu[0, 0, 1] == 13
  assert "clipped" in caplog.text


ORIENTATIONS = [
    "".join(codes)
    for codes in itertools.product("LR", "PA", "SI")
] + ["SRA", "IPL", "ALS"]


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_read_canonicalises_orientation(tmp_path, axcodes):
  # A RAS affine whose voxel axes point along `axcodes`, with distinct voxel sizes.
  ornt = nibabel.orientations.axcodes2ornt(tuple(axcodes))
  linear = np.zeros((3, 3))
  for voxel_axis, (world_axis, direction) in enumerate(ornt):
    linear[int(world_axis), voxel_axis] = direction * (0.5, 0.8, 3.0)[voxel_axis]
  affine_ras = np.eye(4)
  affine_ras[:3, :3] = linear
  affine_ras[:3, 3] = [10.0, -20.0, 30.0]
  data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
  path = tmp_path / "scan.nii"
  nibabel.Nifti1Image(data, affine_ras).to_filename(path)

  volume = nifti.read_nifti(path)
  affine = volume.affine
  assert affine[2, 0] > 0  # Slice index increases toward Superior (+z LPS).
  assert affine[1, 1] > 0  # Row index increases toward Posterior (+y LPS).
  assert affine[0, 2] > 0  # Column index increases toward patient Left (+x LPS).

  # Every value sits at the same patient position as in the file.
  file_points = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
  file_lps = (file_points @ affine_ras[:3, :3].T + affine_ras[:3, 3]) * [-1, -1, 1]
  read_lps = voxel_world_points(volume)
  order = np.argsort(volume.hu.ravel())
  np.testing.assert_allclose(read_lps.reshape(-1, 3)[order], file_lps.reshape(-1, 3), atol=1e-5)


def test_patient_right_is_column_zero(tmp_path):
  # RAS+ file: the x index increases toward the patient's Right.
  data = np.zeros((4, 3, 2), dtype=np.int16)
  data[3, 0, 0] = 100  # Largest x in RAS: the patient's rightmost column.
  path = tmp_path / "scan.nii"
  nibabel.Nifti1Image(data, np.eye(4)).to_filename(path)
  volume = nifti.read_nifti(path)
  assert volume.shape == (2, 3, 4)
  assert volume.hu[0, 2, 0] == 100  # RAS y=0 is the most posterior row, index 2.


def write_scaled_int16(path, raw: np.ndarray, slope: float, inter: float) -> None:
  """Write int16 data and then set scl_slope/scl_inter in the header bytes directly."""
  nibabel.Nifti1Image(raw, np.eye(4)).to_filename(path)
  content = bytearray(path.read_bytes())
  endian = "<" if struct.unpack("<i", content[:4])[0] == 348 else ">"
  content[112:120] = struct.pack(f"{endian}ff", slope, inter)
  path.write_bytes(bytes(content))


def test_scaling_applied_once(tmp_path):
  raw = np.arange(-10, 50, dtype=np.int16).reshape(3, 4, 5)
  path = tmp_path / "scaled.nii"
  write_scaled_int16(path, raw, 2.0, -1024.0)
  # nibabel moves the header's scaling onto the data proxy when it loads.
  proxy = nibabel.load(path).dataobj
  assert (proxy.slope, proxy.inter) == (2.0, -1024.0)
  volume = nifti.read_nifti(path)
  expected = (2.0 * raw - 1024.0).transpose(2, 1, 0)[:, ::-1, ::-1]
  # Scaled values below air (raw < 0) get the air floor, as in the DICOM reader.
  np.testing.assert_array_equal(volume.hu, np.maximum(expected, -1024.0))


@pytest.mark.parametrize("compressed", [False, True])
def test_read_without_suffix(tmp_path, compressed):
  volume = make_volume(axial_affine())
  source = nifti.write_nifti(volume, tmp_path / ("scan.nii.gz" if compressed else "scan.nii"))
  plain = tmp_path / "scan_without_suffix"
  plain.write_bytes(source.read_bytes())
  assert (plain.read_bytes()[:2] == b"\x1f\x8b") == compressed
  back = nifti.read_nifti(plain)
  np.testing.assert_array_equal(back.hu, volume.hu)
  np.testing.assert_array_equal(back.affine, volume.affine)


def test_read_nifti2(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  path = tmp_path / "scan2"
  nibabel.Nifti2Image(data, np.diag([-1.0, -1.0, 2.0, 1.0])).to_filename(tmp_path / "scan2.nii")
  path.write_bytes((tmp_path / "scan2.nii").read_bytes())
  volume = nifti.read_nifti(path)
  assert volume.shape == (4, 3, 2)
  np.testing.assert_array_equal(volume.hu, data.transpose(2, 1, 0))


def test_read_4d_single_volume(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
  path = tmp_path / "scan.nii"
  nibabel.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])).to_filename(path)
  assert nifti.read_nifti(path).shape == (4, 3, 2)


def test_read_true_4d_rejected(tmp_path):
  path = tmp_path / "scan.nii"
  nibabel.Nifti1Image(np.zeros((2, 3, 4, 2), np.int16), np.eye(4)).to_filename(path)
  with pytest.raises(CTReadError, match="scan.nii.*2 volumes"):
    nifti.read_nifti(path)


def test_read_2d_rejected(tmp_path):
  path = tmp_path / "slice.nii"
  nibabel.Nifti1Image(np.zeros((2, 3), np.int16), np.eye(4)).to_filename(path)
  with pytest.raises(CTReadError, match="slice.nii.*3D"):
    nifti.read_nifti(path)


def test_read_missing_file(tmp_path):
  with pytest.raises(CTReadError, match="absent.nii.*not found"):
    nifti.read_nifti(tmp_path / "absent.nii")


def test_read_not_nifti(tmp_path):
  path = tmp_path / "notes.nii"
  path.write_text("not an image\n" * 40)
  with pytest.raises(CTReadError, match="notes.nii.*not a NIfTI"):
    nifti.read_nifti(path)
  gzipped = tmp_path / "notes.nii.gz"
  gzipped.write_bytes(gzip.compress(b"not an image\n" * 40))
  with pytest.raises(CTReadError, match="notes.nii.gz.*not a NIfTI"):
    nifti.read_nifti(gzipped)


def test_read_pair_header_rejected(tmp_path):
  nibabel.Nifti1Pair(np.zeros((2, 3, 4), np.int16), np.eye(4)).to_filename(tmp_path / "a.hdr")
  headerless = tmp_path / "a_header"
  headerless.write_bytes((tmp_path / "a.hdr").read_bytes())
  with pytest.raises(CTReadError, match="a_header.*pair"):
    nifti.read_nifti(headerless)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_read_truncated(tmp_path, suffix):
  source = nifti.write_nifti(make_volume(axial_affine()), tmp_path / f"full{suffix}")
  content = source.read_bytes()
  path = tmp_path / f"cut{suffix}"
  path.write_bytes(content[: len(content) * 2 // 3])
  with pytest.raises(CTReadError, match=f"cut{suffix}"):
    nifti.read_nifti(path)
  header_only = tmp_path / "short.nii"
  header_only.write_bytes(gzip.decompress(content)[:200] if suffix == ".nii.gz" else content[:200])
  with pytest.raises(CTReadError, match="short.nii"):
    nifti.read_nifti(header_only)


def test_read_nan_becomes_air(tmp_path):
  data = np.zeros((2, 3, 4), np.float32)
  data[0, 1, 2] = np.nan
  path = tmp_path / "float.nii"
  nibabel.Nifti1Image(data, np.eye(4)).to_filename(path)
  volume = nifti.read_nifti(path)
  assert np.all(np.isfinite(volume.hu))
  assert volume.hu.min() == -1024.0
  assert any("non-finite" in warning for warning in volume.provenance.warnings)
  assert volume.provenance.non_finite_voxels > 0


def write_pair(tmp_path, mask: np.ndarray, mask_affine=None):
  """Write a RAS+ image and a mask of the same grid (or another affine); return their paths."""
  affine_ras = np.diag([0.5, 0.5, 2.0, 1.0])
  data = np.arange(np.prod(mask.shape), dtype=np.int16).reshape(mask.shape)
  image_path = tmp_path / "ct.nii.gz"
  mask_path = tmp_path / "ct_mask.nii.gz"
  nibabel.Nifti1Image(data, affine_ras).to_filename(image_path)
  nibabel.Nifti1Image(mask, affine_ras if mask_affine is None else mask_affine).to_filename(
      mask_path
  )
  return image_path, mask_path


def test_pair_mask_follows_image(tmp_path):
  mask = np.zeros((4, 5, 3), np.uint8)
  mask[3, 1, 2] = 1
  image_path, mask_path = write_pair(tmp_path, mask)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert read_mask.dtype == np.uint8
  assert read_mask.shape == volume.shape
  # The marked voxel has the same HU (its file index) in the image.
  marked = np.argwhere(read_mask == 1)
  assert len(marked) == 1
  assert volume.hu[tuple(marked[0])] == np.ravel_multi_index((3, 1, 2), mask.shape)
  assert volume.provenance.source_files == (str(image_path), str(mask_path))
  assert volume.provenance.warnings == ()


def test_pair_mask_0_255(tmp_path):
  mask = np.zeros((4, 5, 3), np.uint8)
  mask[1:3, 2, :] = 255
  image_path, mask_path = write_pair(tmp_path, mask)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert set(np.unique(read_mask).tolist()) == {0, 1}
  assert read_mask.sum() == 6
  assert any("0/255" in warning for warning in volume.provenance.warnings)
  assert volume.provenance.mask_stored_as_255
  assert volume.provenance.mask_geometry == ct.MASK_SAME_GRID


def test_pair_mask_0_1_not_flagged(tmp_path):
  image_path, mask_path = write_pair(tmp_path, np.ones((4, 5, 3), np.uint8))
  volume, _ = nifti.read_nifti_pair(image_path, mask_path)
  assert not volume.provenance.mask_stored_as_255
  assert volume.provenance.non_finite_voxels == 0


@pytest.mark.parametrize("layout", ["flip_x", "flip_z", "swap_xy"])
def test_pair_mask_reoriented_by_own_affine(tmp_path, layout):
  mask = np.zeros((4, 5, 3), np.uint8)
  mask[3, 1, 2] = 1
  mask[0, 4, 0] = 2
  image_path, mask_path = write_pair(tmp_path, mask)
  expected_volume, expected_mask = nifti.read_nifti_pair(image_path, mask_path)
  # The same voxels stored flipped or with swapped axes, and the affine changed to match.
  image_affine = np.diag([0.5, 0.5, 2.0, 1.0])
  if layout == "swap_xy":
    stored = np.transpose(mask, (1, 0, 2))
    permute = np.eye(4)[[1, 0, 2, 3]]
  else:
    axis = 0 if layout == "flip_x" else 2
    stored = np.flip(mask, axis)
    permute = np.eye(4)
    permute[axis, axis] = -1
    permute[axis, 3] = mask.shape[axis] - 1
  nibabel.Nifti1Image(np.ascontiguousarray(stored), image_affine @ permute).to_filename(mask_path)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  np.testing.assert_array_equal(read_mask, expected_mask)
  np.testing.assert_array_equal(volume.affine, expected_volume.affine)
  assert volume.provenance.mask_geometry == ct.MASK_REORIENTED
  assert any("reoriented by its affine" in warning for warning in volume.provenance.warnings)


def test_pair_mask_class_ids_kept(tmp_path):
  mask = (np.arange(60).reshape(4, 5, 3) % 6).astype(np.uint8)
  image_path, mask_path = write_pair(tmp_path, mask)
  _, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  np.testing.assert_array_equal(np.bincount(read_mask.ravel()), np.bincount(mask.ravel()))


def test_pair_mask_float_ids(tmp_path):
  mask = (np.arange(60).reshape(4, 5, 3) % 3).astype(np.float32)
  image_path, mask_path = write_pair(tmp_path, mask)
  _, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert read_mask.dtype == np.uint8
  assert read_mask.sum() == mask.sum()


@pytest.mark.parametrize("bad_values", [(0, 7), (0, 1, 255), (0.0, 0.5)])
def test_pair_mask_bad_values(tmp_path, bad_values):
  mask = np.zeros((4, 5, 3), np.float32)
  mask.ravel()[: len(bad_values)] = bad_values
  image_path, mask_path = write_pair(tmp_path, mask)
  with pytest.raises(CTReadError, match="ct_mask.nii.gz.*values"):
    nifti.read_nifti_pair(image_path, mask_path)


def test_pair_shape_mismatch(tmp_path):
  image_path, _ = write_pair(tmp_path, np.zeros((4, 5, 3), np.uint8))
  other = tmp_path / "other_mask.nii"
  nibabel.Nifti1Image(np.zeros((4, 5, 2), np.uint8), np.eye(4)).to_filename(other)
  with pytest.raises(CTReadError, match="other_mask.nii.*ct.nii.gz"):
    nifti.read_nifti_pair(image_path, other)


def test_pair_affine_mismatch_warns(tmp_path, caplog):
  mask = np.zeros((4, 5, 3), np.uint8)
  mask[0, 0, 0] = 1
  shifted = np.diag([0.5, 0.5, 2.0, 1.0])
  shifted[:3, 3] = [0.0, 0.0, 1.5]
  image_path, mask_path = write_pair(tmp_path, mask, mask_affine=shifted)
  with caplog.at_level(logging.WARNING):
    volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert "affine differs" in caplog.text
  assert any("affine differs" in warning for warning in volume.provenance.warnings)
  # Geometry comes from the image, and the mask keeps the image's voxel order.
  # File voxel (x 0, y 0, z 0) is the patient's rightmost, most anterior column
  # and row, so it lands in the last column and row.
  np.testing.assert_allclose(volume.affine[:3, 3], [-1.5, -2.0, 0.0])
  assert read_mask[0, 4, 3] == 1
  assert read_mask.sum() == 1
  assert volume.provenance.mask_geometry == ct.MASK_IMAGE_GEOMETRY_ASSUMED


# Byte offsets of NIfTI-1 header fields (little-endian files written by nibabel).
DIM_OFFSET = 40
PIXDIM_OFFSET = 76
VOX_OFFSET_OFFSET = 108
XYZT_UNITS_OFFSET = 123
QFORM_CODE_OFFSET = 252
SFORM_CODE_OFFSET = 254
QUATERN_OFFSET = 256
SROW_X_OFFSET = 280


def write_patched(path, data: np.ndarray, patches, affine=None, compress=False):
  """Write `data` with nibabel, then overwrite header bytes.

  `patches` lists (byte offset, struct format without byte order, values).
  """
  image = nibabel.Nifti1Image(data, np.diag([-0.5, -0.5, 2.0, 1.0]) if affine is None else affine)
  content = bytearray(image.to_bytes())
  for offset, fmt, values in patches:
    struct.pack_into("<" + fmt, content, offset, *values)
  path.write_bytes(gzip.compress(bytes(content)) if compress else bytes(content))
  return path


def small_int16(shape=(6, 5, 4)) -> np.ndarray:
  return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def test_read_rgb_rejected(tmp_path):
  rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
  path = tmp_path / "colour.nii"
  nibabel.Nifti1Image(rgb, np.eye(4)).to_filename(path)
  with pytest.raises(CTReadError, match="colour.nii.*RGB"):
    nifti.read_nifti(path)


def test_read_complex_rejected(tmp_path):
  path = tmp_path / "complex.nii"
  nibabel.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)).to_filename(path)
  with pytest.raises(CTReadError, match="complex.nii.*complex"):
    nifti.read_nifti(path)


def test_pair_complex_mask_rejected(tmp_path):
  image_path, mask_path = write_pair(tmp_path, np.zeros((4, 5, 3), np.uint8))
  nibabel.Nifti1Image(np.ones((4, 5, 3), np.complex64), np.eye(4)).to_filename(mask_path)
  with pytest.raises(CTReadError, match="ct_mask.nii.gz.*complex"):
    nifti.read_nifti_pair(image_path, mask_path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_huge_shape_rejected(tmp_path, compress):
  huge = (3, 30000, 30000, 30000, 1, 1, 1, 1)
  path = write_patched(
      tmp_path / "huge.nii", small_int16(), [(DIM_OFFSET, "8h", huge)], compress=compress
  )
  with pytest.raises(CTReadError, match="huge.nii.*27,000,000,000,000 voxels"):
    nifti.read_nifti(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_shape_larger_than_file(tmp_path, compress):
  # 200**3 int16 voxels would be 16 MB, but the file contains 240 bytes of data.
  claimed = (3, 200, 200, 200, 1, 1, 1, 1)
  path = write_patched(
      tmp_path / "short.nii", small_int16(), [(DIM_OFFSET, "8h", claimed)], compress=compress
  )
  with pytest.raises(CTReadError, match="short.nii.*header implies 16,000,352 bytes"):
    nifti.read_nifti(path)


def test_read_voxel_limit(tmp_path, monkeypatch):
  path = write_patched(tmp_path / "scan.nii", small_int16(), [])
  monkeypatch.setattr(nifti, "MAX_VOXELS", 100)
  with pytest.raises(CTReadError, match="scan.nii.*120 voxels, more than the 100"):
    nifti.read_nifti(path)


def test_read_negative_dim_rejected(tmp_path):
  negative = (3, -6, 5, 4, 1, 1, 1, 1)
  path = write_patched(tmp_path / "neg.nii", small_int16(), [(DIM_OFFSET, "8h", negative)])
  with pytest.raises(CTReadError, match="neg.nii.*negative size"):
    nifti.read_nifti(path)


@pytest.mark.parametrize("offset", [1e30, float("nan"), 0.0, 100.0, 353.5])
def test_read_bad_vox_offset_rejected(tmp_path, offset):
  patches = [(VOX_OFFSET_OFFSET, "f", (offset,))]
  path = write_patched(tmp_path / "offset.nii", small_int16(), patches)
  with pytest.raises(CTReadError, match="offset.nii.*vox_offset"):
    nifti.read_nifti(path)


def no_forms(pixdim) -> list:
  """Patches that clear both form codes and set pixdim[1..3]."""
  return [(QFORM_CODE_OFFSET, "hh", (0, 0)), (PIXDIM_OFFSET + 4, "3f", pixdim)]


@pytest.mark.parametrize("pixdim", [(0.0, 0.0, 0.0), (0.5, 0.0, 2.0), (-0.5, -0.5, -2.0)])
def test_read_invalid_pixdim_without_forms(tmp_path, pixdim):
  path = write_patched(tmp_path / "nogeometry.nii", small_int16(), no_forms(pixdim))
  with pytest.raises(CTReadError, match="nogeometry.nii.*pixdim.*pixdim alone"):
    nifti.read_nifti(path)


def test_read_zero_pixdim_with_qform_only(tmp_path):
  patches = [(SFORM_CODE_OFFSET, "h", (0,)), (QFORM_CODE_OFFSET, "h", (1,))]
  patches.append((PIXDIM_OFFSET + 4, "3f", (0.0, 0.0, 0.0)))
  path = write_patched(tmp_path / "qform.nii", small_int16(), patches)
  with pytest.raises(CTReadError, match="qform.nii.*pixdim.*the qform"):
    nifti.read_nifti(path)


def test_read_zero_pixdim_with_sform(tmp_path):
  # The sform alone gives the geometry, so pixdim does not matter.
  patches = [(PIXDIM_OFFSET + 4, "3f", (0, 0, 0))]
  path = write_patched(tmp_path / "sform.nii", small_int16(), patches)
  volume = nifti.read_nifti(path)
  assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))


def test_read_positive_pixdim_without_forms(tmp_path):
  path = write_patched(tmp_path / "pixdim.nii", small_int16(), no_forms((0.5, 0.75, 3.0)))
  volume = nifti.read_nifti(path)
  assert volume.spacing == pytest.approx((3.0, 0.75, 0.5))
  assert any("both 0" in warning for warning in volume.provenance.warnings)


def test_read_nan_qform_only_rejected(tmp_path):
  patches = [(SFORM_CODE_OFFSET, "h", (0,)), (QFORM_CODE_OFFSET, "h", (1,))]
  patches.append((QUATERN_OFFSET, "3f", (float("nan"), 0.0, 0.0)))
  path = write_patched(tmp_path / "nanq.nii", small_int16(), patches)
  with pytest.raises(CTReadError, match="nanq.nii.*not finite"):
    nifti.read_nifti(path)


def test_read_nan_qform_with_sform_warns(tmp_path):
  patches = [(QFORM_CODE_OFFSET, "hh", (1, 1)), (QUATERN_OFFSET, "3f", (float("nan"), 0.0, 0.0))]
  path = write_patched(tmp_path / "nanq.nii", small_int16(), patches)
  volume = nifti.read_nifti(path)
  assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))
  assert any("qform is not finite" in warning for warning in volume.provenance.warnings)


def test_read_qform_sform_flip_warns(tmp_path):
  path = tmp_path / "flip.nii"
  image = nibabel.Nifti1Image(small_int16(), np.diag([-0.5, -0.5, 2.0, 1.0]))
  image.set_qform(np.diag([0.5, -0.5, 2.0, 1.0]), code=1)
  image.to_filename(path)
  volume = nifti.read_nifti(path)
  assert any("disagree" in warning for warning in volume.provenance.warnings)


@pytest.mark.parametrize("units", [1, 3, 1 + 8])
def test_read_non_mm_units_rejected(tmp_path, units):
  path = write_patched(tmp_path / "units.nii", small_int16(), [(XYZT_UNITS_OFFSET, "B", (units,))])
  with pytest.raises(CTReadError, match="units.nii.*spatial units are (meter|micron)"):
    nifti.read_nifti(path)


@pytest.mark.parametrize(
    "affine, reason",
    [
        (np.diag([1e-5, 1e-5, 1e-5, 1.0]), "voxel sizes"),
        (np.diag([0.5, 0.5, 5000.0, 1.0]), "voxel sizes"),
        (np.array([[0.5, 0, 0, 3e38], [0, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), "origin"),
        (np.array([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), "singular"),
    ],
)
def test_read_implausible_affine_rejected(tmp_path, affine, reason):
  path = tmp_path / "geometry.nii"
  nibabel.Nifti1Image(small_int16(), affine).to_filename(path)
  with pytest.raises(CTReadError, match=f"geometry.nii.*{reason}"):
    nifti.read_nifti(path)


def test_read_applies_air_floor(tmp_path):
  data = np.array([-3024, -2000, -1500, -1025, -1024, -1000, 0, 40], np.int16).reshape(2, 2, 2)
  path = tmp_path / "padded.nii"
  nibabel.Nifti1Image(data, np.eye(4)).to_filename(path)
  volume = nifti.read_nifti(path)
  assert volume.hu.min() == -1024.0
  assert sorted(volume.hu.ravel().tolist()) == [-1024.0] * 5 + [-1000.0, 0.0, 40.0]


def test_air_floor_matches_dicom_reader(tmp_path):
  from uem_ich_jax.ct import dicom, dicom_write  # pylint: disable=import-outside-toplevel

  volume = make_volume(axial_affine(), shape=(3, 4, 5))
  volume.hu[0, 0, :5] = [-3024, -2000, -1500, -1025, -1024]
  back_nifti = nifti.read_nifti(nifti.write_nifti(volume, tmp_path / "scan.nii"))
  dicom_write.write_dicom_series(volume, tmp_path / "dicom")
  back_dicom = dicom.read_dicom_series(tmp_path / "dicom")
  np.testing.assert_array_equal(back_nifti.hu, back_dicom.hu)
  assert back_nifti.hu.min() == -1024.0


def test_pair_mask_not_floored(tmp_path):
  mask = (np.arange(60).reshape(4, 5, 3) % 6).astype(np.uint8)
  image_path, mask_path = write_pair(tmp_path, mask)
  below_air = np.full((4, 5, 3), -2000, np.int16)
  nibabel.Nifti1Image(below_air, np.diag([0.5, 0.5, 2.0, 1.0])).to_filename(image_path)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert np.all(volume.hu == -1024.0)
  np.testing.assert_array_equal(np.bincount(read_mask.ravel()), np.bincount(mask.ravel()))


def test_pair_mask_near_integer_floats_rounded(tmp_path):
  labels = (np.arange(60).reshape(4, 5, 3) % 3).astype(np.float32)
  resampled = labels + np.where(labels > 0, -1e-4, 0.0).astype(np.float32)
  image_path, mask_path = write_pair(tmp_path, resampled)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert read_mask.dtype == np.uint8
  expected_counts = np.bincount(labels.astype(int).ravel())
  np.testing.assert_array_equal(np.bincount(read_mask.ravel()), expected_counts)
  assert any("rounded" in warning for warning in volume.provenance.warnings)


def test_pair_mask_invalid_affine_warns(tmp_path):
  mask = np.zeros((4, 5, 3), np.uint8)
  mask[1, 2, 0] = 1
  image_path, mask_path = write_pair(tmp_path, mask)
  # Both forms contain NaN, so nibabel's mask affine is NaN.
  patches = [(QUATERN_OFFSET, "3f", (np.nan, 0.0, 0.0)), (SROW_X_OFFSET, "f", (np.nan,))]
  write_patched(mask_path, mask, patches, affine=np.diag([0.5, 0.5, 2.0, 1.0]), compress=True)
  volume, read_mask = nifti.read_nifti_pair(image_path, mask_path)
  assert read_mask.sum() == 1
  assert any("mask geometry is invalid" in warning for warning in volume.provenance.warnings)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_non_finite_hu_rejected(tmp_path, bad):
  volume = make_volume(axial_affine())
  volume.hu[1, 2, 3] = bad
  with pytest.raises(ValueError, match="scan.nii.*NaN or infinite"):
    nifti.write_nifti(volume, tmp_path / "scan.nii")
  assert not (tmp_path / "scan.nii").exists()


@pytest.mark.parametrize("affine", [np.full((4, 4), np.nan), np.diag([0.0, 1.0, 1.0, 1.0])])
def test_write_invalid_affine_rejected(tmp_path, affine):
  volume = make_volume(axial_affine())
  volume = CTVolume(hu=volume.hu, positions=volume.positions, affine=affine, spacing=volume.spacing)
  with pytest.raises(ValueError, match="scan.nii.*cannot write"):
    nifti.write_nifti(volume, tmp_path / "scan.nii")


def test_write_float_mask_labels(tmp_path, caplog):
  volume = make_volume(axial_affine())
  labels = (np.arange(np.prod(volume.shape)).reshape(volume.shape) % 6).astype(np.float32)
  with caplog.at_level(logging.WARNING):
    path = nifti.write_nifti(volume, tmp_path / "mask.nii", mask=labels - 1e-4 * (labels > 0))
  assert "rounded" in caplog.text
  np.testing.assert_array_equal(np.asarray(nibabel.load(path).dataobj).transpose(2, 1, 0), labels)
  with pytest.raises(ValueError, match="0..255"):
    nifti.write_nifti(volume, tmp_path / "blended.nii", mask=labels * 0.5)
  with pytest.raises(ValueError, match="NaN"):
    nifti.write_nifti(volume, tmp_path / "nan.nii", mask=np.full(volume.shape, np.nan))


def test_read_gzip_long_tail_rejected(tmp_path):
  # 150 KB of gzip that decompresses to 32 MiB past the voxel data. Reading
  # stops at the tail limit instead of decompressing everything.
  content = nibabel.Nifti1Image(small_int16(), np.eye(4)).to_bytes()
  path = tmp_path / "tail.nii.gz"
  path.write_bytes(gzip.compress(content + bytes(32 * 2**20), compresslevel=1))
  with pytest.raises(CTReadError, match="tail.nii.gz.*follow the voxel data"):
    nifti.read_nifti(path)


def test_read_gzip_corrupt_trailer(tmp_path):
  # The voxel data decompresses, but the CRC at the end does not match.
  content = bytearray(gzip.compress(nibabel.Nifti1Image(small_int16(), np.eye(4)).to_bytes()))
  content[-8] ^= 0xFF
  path = tmp_path / "crc.nii.gz"
  path.write_bytes(bytes(content))
  with pytest.raises(CTReadError, match="crc.nii.gz.*gzip"):
    nifti.read_nifti(path)


def test_read_implausible_hu_warns(tmp_path):
  path = tmp_path / "scaled.nii"
  write_scaled_int16(path, small_int16(), 1e30, 0.0)
  volume = nifti.read_nifti(path)
  assert any("beyond any CT scale" in warning for warning in volume.provenance.warnings)


def test_read_fifo_rejected(tmp_path):
  fifo = tmp_path / "pipe.nii"
  os.mkfifo(fifo)
  with pytest.raises(CTReadError, match="pipe.nii.*not a file"):
    nifti.read_nifti(fifo)
