"""Reading and writing NIfTI CT volumes and masks.

Conventions:
  - `CTVolume.hu` is (slice, row, column) and `CTVolume.affine` maps those
    indices to DICOM patient coordinates, LPS, in mm. NIfTI stores RAS, so the
    first two world axes change sign when reading and writing, and nowhere else.
  - Reading reorients every file to the canonical layout of a standard axial
    DICOM series (ImageOrientationPatient [1,0,0, 0,1,0]): slice index
    increases toward patient Superior, row index toward Posterior, column index
    toward patient Left. Displayed with row 0 at the top and column 0 on the
    left, the patient's right is on the image's left (radiological convention).
    Only axis permutations and flips are applied, chosen from the affine by
    `nibabel.orientations.io_orientation`, so no voxel is interpolated and the
    affine stays exact. An oblique or tilted grid keeps its obliquity.
  - Writing stores the array as NIfTI (column, row, slice), the layout
    dcm2niix uses for axial series before its own flip, with the affine in both
    qform and sform (code 1, scanner). A tilted (sheared) affine is exact in the
    sform only, because a qform cannot hold shears; nibabel reads the sform.
"""

from __future__ import annotations

import gzip
import logging
import os
import pathlib
import zlib

import nibabel
import nibabel.orientations
import numpy as np

from uem_ich_jax.ct import resample
from uem_ich_jax.ct.volume import AIR_HU, CTReadError, CTVolume, Provenance

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI1_SINGLE_MAGIC = b"n+1\x00"
_NIFTI1_PAIR_MAGIC = b"ni1\x00"
_NIFTI2_MAGIC_OFFSET = 4
_NIFTI2_SINGLE_MAGIC = b"n+2\x00"

# Sign flip between LPS and RAS world coordinates (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Map from NIfTI voxel indices (column, row, slice) to ours (slice, row, column).
_NIFTI_TO_VOLUME_AXES = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)

# io_orientation rows are (world axis, direction) per array axis, in the world
# of the affine it is given. For an LPS affine: slice along +z (Superior), row
# along +y (Posterior), column along +x (Left).
_CANONICAL_LPS_ORIENTATION = np.array([[2, 1], [1, 1], [0, 1]], dtype=np.float64)

# Masks whose affine differs from the image's by more than this (mm, or unit
# direction components) get a warning.
_MASK_AFFINE_TOLERANCE = 1e-3

# BHSD / MBH-Seg class ids: 0 background, 1..5 the five subtypes.
_MAX_MASK_CLASS_ID = 5


def _load_image(path: pathlib.Path) -> nibabel.Nifti1Image | nibabel.Nifti2Image:
  """Load a single-file NIfTI-1 or NIfTI-2 image, detecting the format by content.

  The suffix is ignored: gzip is detected by its magic bytes, then NIfTI-1 by
  `n+1\\0` at byte 344 and NIfTI-2 by `n+2\\0` at byte 4, and the matching
  nibabel class parses the bytes.
  """
  if not path.exists():
    raise CTReadError(f"{path}: NIfTI file not found")
  if not path.is_file():
    raise CTReadError(f"{path}: not a file")
  try:
    content = path.read_bytes()
  except OSError as error:
    raise CTReadError(f"{path}: cannot read file: {error}") from error

  if content[:2] == _GZIP_MAGIC:
    try:
      content = gzip.decompress(content)
    except (EOFError, OSError, zlib.error) as error:
      raise CTReadError(f"{path}: gzip data is truncated or corrupt: {error}") from error

  magic1 = content[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4]
  magic2 = content[_NIFTI2_MAGIC_OFFSET : _NIFTI2_MAGIC_OFFSET + 4]
  if magic1 == _NIFTI1_SINGLE_MAGIC:
    image_class = nibabel.Nifti1Image
  elif magic2 == _NIFTI2_SINGLE_MAGIC:
    image_class = nibabel.Nifti2Image
  elif magic1 == _NIFTI1_PAIR_MAGIC:
    raise CTReadError(
        f"{path}: NIfTI-1 header of a .hdr/.img pair; only single-file NIfTI "
        "(.nii or .nii.gz) is supported"
    )
  else:
    raise CTReadError(
        f"{path}: not a NIfTI file (no NIfTI-1 magic at byte 344 and no NIfTI-2 "
        f"magic at byte 4; {len(content)} bytes after decompression)"
    )

  try:
    return image_class.from_bytes(content)
  except Exception as error:  # nibabel raises many types for malformed headers.
    raise CTReadError(f"{path}: invalid NIfTI header: {error}") from error


def _image_shape_3d(image: nibabel.spatialimages.SpatialImage, path: pathlib.Path) -> tuple:
  """Return the 3D shape, accepting trailing dimensions of size 1 (one 4D volume)."""
  shape = tuple(int(size) for size in image.shape)
  if len(shape) < 3:
    raise CTReadError(f"{path}: expected a 3D volume, got {len(shape)}D shape {shape}")
  if any(size != 1 for size in shape[3:]):
    raise CTReadError(
        f"{path}: expected one 3D volume, got shape {shape} "
        f"({int(np.prod(shape[3:]))} volumes along dimensions 4 and up)"
    )
  if any(size == 0 for size in shape[:3]):
    raise CTReadError(f"{path}: empty volume, shape {shape}")
  return shape[:3]


def _read_array(
    image: nibabel.spatialimages.SpatialImage, path: pathlib.Path, dtype=None
) -> np.ndarray:
  """Read the voxel data as 3D, with the header's scl_slope/scl_inter applied once.

  With `dtype`, the data is scaled in that float type (`get_fdata`). Without it,
  the data is `np.asanyarray(dataobj)`, which stays integer when the header sets
  no scaling.
  """
  shape = _image_shape_3d(image, path)
  try:
    if dtype is None:
      data = np.asanyarray(image.dataobj)
    else:
      data = image.get_fdata(dtype=dtype)
  except (ValueError, OSError, EOFError) as error:
    raise CTReadError(f"{path}: voxel data is truncated or unreadable: {error}") from error
  return data.reshape(shape)


def _lps_affine(image: nibabel.spatialimages.SpatialImage, path: pathlib.Path) -> np.ndarray:
  """Return the image's affine in LPS, rejecting singular or non-finite ones."""
  affine = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
  linear = affine[:3, :3]
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-12:
    raise CTReadError(f"{path}: affine is singular or not finite:\n{image.affine}")
  return affine


def _canonical_transform(affine_lps: np.ndarray) -> np.ndarray:
  """Return the nibabel orientation transform from the file layout to the canonical one."""
  file_orientation = nibabel.orientations.io_orientation(affine_lps)
  return nibabel.orientations.ornt_transform(file_orientation, _CANONICAL_LPS_ORIENTATION)


def _reorient(
    data: np.ndarray, affine_lps: np.ndarray, transform: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Permute and flip the array, and update the affine so every voxel keeps its place."""
  reoriented = nibabel.orientations.apply_orientation(data, transform)
  # inv_ornt_aff holds only 0, +-1 and whole-voxel offsets, so this is exact.
  new_affine = affine_lps @ nibabel.orientations.inv_ornt_aff(transform, data.shape)
  return np.ascontiguousarray(reoriented), new_affine


def _volume_from_array(
    hu: np.ndarray, affine: np.ndarray, path: pathlib.Path, warnings: list[str]
) -> CTVolume:
  """Build a CTVolume from a canonical array and its LPS affine."""
  num_slices = hu.shape[0]
  slice_indices = np.zeros((num_slices, 4))
  slice_indices[:, 0] = np.arange(num_slices)
  slice_indices[:, 3] = 1.0
  positions = (slice_indices @ affine.T)[:, :3]

  row_step = affine[:3, 1]
  column_step = affine[:3, 2]
  normal = np.cross(column_step, row_step)
  normal /= np.linalg.norm(normal)
  # Slice spacing is the distance between slice planes, so for a tilted affine
  # it is the stacking step projected on the normal, not the step's length.
  slice_spacing = float(abs(affine[:3, 0] @ normal))
  spacing = (slice_spacing, float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step)))

  tilt_deg = resample.gantry_tilt_deg(affine)
  if abs(tilt_deg) >= resample.TILT_TOLERANCE_DEG:
    message = f"{path}: gantry tilt {tilt_deg:.2f} degrees in the affine, not corrected"
    logger.warning(message)
    warnings = warnings + [message]
  provenance = Provenance(
      source_files=(str(path),),
      sop_instance_uids=("",) * num_slices,
      gantry_tilt_deg=tilt_deg,
      warnings=tuple(warnings),
  )
  return CTVolume(
      hu=hu,
      positions=positions,
      affine=affine,
      spacing=spacing,
      affine_is_approximate=False,
      provenance=provenance,
  )


def _read_canonical(
    path: pathlib.Path,
) -> tuple[nibabel.spatialimages.SpatialImage, np.ndarray, np.ndarray, np.ndarray, list[str]]:
  """Load an image and return it, its canonical HU, LPS affine, transform and warnings."""
  image = _load_image(path)
  warnings = []
  header = image.header
  if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
    message = f"{path}: sform and qform codes are both 0, so geometry comes from voxel sizes only"
    logger.warning(message)
    warnings.append(message)

  hu = _read_array(image, path, dtype=np.float32)
  non_finite = ~np.isfinite(hu)
  if non_finite.any():
    message = f"{path}: {int(non_finite.sum())} non-finite voxels set to air ({AIR_HU} HU)"
    logger.warning(message)
    warnings.append(message)
    hu[non_finite] = AIR_HU

  affine_file = _lps_affine(image, path)
  transform = _canonical_transform(affine_file)
  hu, affine = _reorient(hu, affine_file, transform)
  return image, hu, affine, transform, warnings


def read_nifti(path: str | os.PathLike) -> CTVolume:
  """Read a NIfTI-1 or NIfTI-2 CT file into a canonical `CTVolume`.

  The voxel values are taken as HU after the header's scl_slope/scl_inter,
  applied once (by nibabel). The array is reoriented to (slice toward
  Superior, row toward Posterior, column toward patient Left) by permuting and
  flipping axes only, so column 0 is the patient's right. The affine comes
  from the sform when its code is set, else the qform (nibabel's choice), and
  is converted from RAS to LPS. Positions, spacing and the gantry tilt (a
  sheared sform, as dcm2niix writes for uncorrected tilted series) come from
  it. A file with a fourth dimension of size 1 is read as 3D.

  Raises:
    CTReadError: missing file, not NIfTI, truncated data, .hdr/.img pair, or
      not exactly one 3D volume.
  """
  path = pathlib.Path(path)
  _, hu, affine, _, warnings = _read_canonical(path)
  return _volume_from_array(hu, affine, path, warnings)


def _mask_values(mask: np.ndarray, image_path: pathlib.Path, mask_path: pathlib.Path):
  """Check the mask's value set and return it as uint8 ids plus a note on 0/255 masks."""
  if mask.dtype.kind == "f":
    if not np.all(np.isfinite(mask)):
      raise CTReadError(f"{mask_path}: mask for {image_path} has non-finite values")
  values = np.unique(mask)
  present = set(values.tolist())
  if present <= {0, 255} and 255 in present:
    return (mask == 255).astype(np.uint8), f"{mask_path}: binary mask stored as 0/255, read as 0/1"
  if present <= set(range(_MAX_MASK_CLASS_ID + 1)):
    return mask.astype(np.uint8), None
  listed_values = ", ".join(f"{value:g}" for value in values[:12])
  more = f" and {len(values) - 12} more" if len(values) > 12 else ""
  raise CTReadError(
      f"{mask_path}: mask for {image_path} has values {{{listed_values}{more}}}; expected binary 0/1 "
      f"or 0/255, or class ids 0..{_MAX_MASK_CLASS_ID}"
  )


def read_nifti_pair(
    image_path: str | os.PathLike, mask_path: str | os.PathLike
) -> tuple[CTVolume, np.ndarray]:
  """Read a CT NIfTI and its segmentation mask NIfTI, both in canonical orientation.

  The mask must have the image's shape in the file and is assumed to share its
  voxel grid: it gets the image's reorientation, and the geometry comes from
  the image alone. A mask affine that differs from the image's (some MBH-Seg
  releases have this) is logged and recorded in `provenance.warnings`. Binary
  masks stored as 0/1 or 0/255 come back as 0/1 (a 0/255 mask is noted in the
  warnings), class-id masks with ids 0..5 come back unchanged.

  Returns:
    The volume (its provenance lists both files) and a uint8 mask of the same
    shape.

  Raises:
    CTReadError: either file unreadable (see `read_nifti`), shapes differ, or
      mask values outside the sets above.
  """
  image_path = pathlib.Path(image_path)
  mask_path = pathlib.Path(mask_path)
  image, hu, affine, transform, warnings = _read_canonical(image_path)

  mask_image = _load_image(mask_path)
  mask_shape = _image_shape_3d(mask_image, mask_path)
  image_shape = _image_shape_3d(image, image_path)
  if mask_shape != image_shape:
    raise CTReadError(
        f"mask {mask_path} has shape {mask_shape} but image {image_path} has shape {image_shape}"
    )
  mask = _read_array(mask_image, mask_path)
  mask, note = _mask_values(mask, image_path, mask_path)
  if note:
    logger.info(note)
    warnings.append(note)

  mask_affine = _lps_affine(mask_image, mask_path)
  image_affine = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
  difference = float(np.max(np.abs(mask_affine - image_affine)))
  if difference > _MASK_AFFINE_TOLERANCE:
    message = (
        f"{mask_path}: mask affine differs from image {image_path} by up to {difference:.4g}; "
        "using the image's geometry and assuming the mask has the image's voxel order"
    )
    if not np.array_equal(_canonical_transform(mask_affine), transform):
      message += " (the mask affine implies a different axis order or direction)"
    logger.warning(message)
    warnings.append(message)

  mask = np.ascontiguousarray(nibabel.orientations.apply_orientation(mask, transform))
  volume = _volume_from_array(hu, affine, image_path, warnings)
  provenance = volume.provenance
  volume = CTVolume(
      hu=volume.hu,
      positions=volume.positions,
      affine=volume.affine,
      spacing=volume.spacing,
      provenance=Provenance(
          source_files=(str(image_path), str(mask_path)),
          sop_instance_uids=provenance.sop_instance_uids,
          gantry_tilt_deg=provenance.gantry_tilt_deg,
          warnings=provenance.warnings,
      ),
  )
  return volume, mask


def _nifti_affine(affine_lps: np.ndarray) -> np.ndarray:
  """Convert our (slice, row, column) -> LPS affine to NIfTI's (column, row, slice) -> RAS."""
  return LPS_TO_RAS @ affine_lps @ _NIFTI_TO_VOLUME_AXES


def write_nifti(
    volume: CTVolume, path: str | os.PathLike, *, mask: np.ndarray | None = None
) -> pathlib.Path:
  """Write a volume's HU, or a mask in the volume's geometry, as NIfTI-1.

  HU are rounded to int16, and values outside the int16 range are clipped with a
  warning. A mask is written as uint8 and must have the volume's shape and
  integer values 0..255. The suffix picks the format: `.nii` or `.nii.gz`.
  For a volume in canonical orientation, which includes oblique or tilted
  volumes whose axes stay nearest to the canonical ones, `read_nifti` returns
  the same integer HU and the same affine to float32 precision (the sform is
  float32). Other layouts come back reoriented. A volume whose affine is
  approximate (varying slice spacing) is written with that affine and a
  warning, because NIfTI has one affine for all slices. Resample it first
  (`resample.resample_z`) to keep positions exact.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
    raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz suffix")

  if mask is None:
    hu = np.asarray(volume.hu)
    rounded = np.rint(hu)
    info = np.iinfo(np.int16)
    outside = (rounded < info.min) | (rounded > info.max)
    if outside.any():
      logger.warning(
          "%s: %d voxels outside the int16 range clipped", path, int(np.count_nonzero(outside))
      )
    data = np.clip(rounded, info.min, info.max).astype(np.int16)
  else:
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
      raise ValueError(f"{path}: mask shape {mask.shape} differs from volume shape {volume.shape}")
    if mask.dtype.kind not in "biu" or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
      raise ValueError(
          f"{path}: mask must contain integers 0..255, got dtype {mask.dtype} "
          f"with values {mask.min()}..{mask.max()}"
      )
    data = mask.astype(np.uint8)

  if volume.affine_is_approximate:
    logger.warning(
        "%s: slice spacing varies, so the written affine places slices only approximately", path
    )

  affine = _nifti_affine(np.asarray(volume.affine, dtype=np.float64))
  image = nibabel.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
  image.header.set_xyzt_units("mm", "sec")
  image.set_qform(affine, code=1)  # Shears, if any, are dropped from the qform only.
  image.set_sform(affine, code=1)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.to_filename(str(path))
  return path
