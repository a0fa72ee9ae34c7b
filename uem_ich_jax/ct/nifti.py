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
  - Reading checks the header before any voxel is read: the shape, datatype
    and vox_offset must describe data that the file holds, at most
    `MAX_VOXELS` voxels of real integer or float values (RGB and complex data
    are rejected). HU below `AIR_HU` become `AIR_HU`, the rule the DICOM
    reader applies too.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pathlib
import zlib

import nibabel
import nibabel.orientations
import numpy as np

from uem_ich_jax.ct import resample
from uem_ich_jax.ct.volume import (
    AIR_HU,
    MASK_IMAGE_GEOMETRY_ASSUMED,
    MASK_REORIENTED,
    MASK_SAME_GRID,
    MAX_VOXELS,
    CTReadError,
    CTVolume,
    Provenance,
    VolumeTooLargeError,
    apply_air_floor,
)

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI1_SINGLE_MAGIC = b"n+1\x00"
_NIFTI1_PAIR_MAGIC = b"ni1\x00"
_NIFTI2_MAGIC_OFFSET = 4
_NIFTI2_SINGLE_MAGIC = b"n+2\x00"
# Enough bytes for either header: NIfTI-1 is 348 bytes, NIfTI-2 is 540.
_MAX_HEADER_BYTES = 540

# Voxel sizes and origin coordinates outside these bounds (mm) are not a CT
# scan. They come from damaged headers or from units other than mm.
_VOXEL_SIZE_RANGE_MM = (1e-3, 1e3)
_MAX_ABS_ORIGIN_MM = 1e5

# Largest vox_offset accepted (bytes). Header extensions take kilobytes, so a
# larger offset means a damaged header, and it would overflow the read sizes.
_MAX_VOX_OFFSET = 2**32

# Max bytes accepted after the voxel data of a gzip file. A NIfTI file ends
# with its voxel data, so a long tail is a decompression bomb or a damaged file.
_MAX_TRAILING_BYTES = 16 * 2**20

# HU above this get a warning. Stored CT values end near 3071 HU (12-bit
# data) or roughly 3e4 HU (extended scales for metal), so larger values mean
# wrong scaling (scl_slope/scl_inter) or data that is not CT.
_MAX_PLAUSIBLE_HU = 1e5

# NIfTI xyzt_units spatial codes (the low 3 bits) that are not mm. Code 0
# (unknown), which nibabel writes by default, is read as mm.
_NON_MM_SPATIAL_UNITS = {1: "meter", 3: "micron"}

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

# Float label values this close to an integer are that integer. Interpolation
# and float32 scaling (scl_slope 1/255) leave values such as 0.9999; values
# farther off, such as 0.5, mean the labels were blended and cannot be recovered.
_LABEL_ROUNDING_TOLERANCE = 1e-3


def _image_class(head: bytes, path: pathlib.Path) -> type:
  """Return the nibabel class for a single-file NIfTI, from the magic bytes in `head`."""
  magic1 = head[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4]
  magic2 = head[_NIFTI2_MAGIC_OFFSET : _NIFTI2_MAGIC_OFFSET + 4]
  if magic1 == _NIFTI1_SINGLE_MAGIC:
    return nibabel.Nifti1Image
  if magic2 == _NIFTI2_SINGLE_MAGIC:
    return nibabel.Nifti2Image
  if magic1 == _NIFTI1_PAIR_MAGIC:
    raise CTReadError(
        f"{path}: NIfTI-1 header of a .hdr/.img pair; only single-file NIfTI "
        "(.nii or .nii.gz) is supported"
    )
  short = ""
  if len(head) < _NIFTI1_MAGIC_OFFSET + 4:
    short = f"; the data has only {len(head)} bytes, less than a NIfTI-1 header"
  raise CTReadError(
      f"{path}: not a NIfTI file (no NIfTI-1 magic at byte 344 and no NIfTI-2 "
      f"magic at byte 4{short})"
  )


def _raw_header(image_class: type, head: bytes, path: pathlib.Path) -> nibabel.Nifti1Header:
  """Parse the header as stored, without nibabel's fixes.

  nibabel's checks silently replace zero voxel sizes by 1 and negative ones by
  their absolute value, so the geometry checks need the header before them.
  """
  header_class = image_class.header_class
  try:
    return header_class(head[: header_class.template_dtype.itemsize], check=False)
  except Exception as error:  # nibabel raises many types for malformed headers.
    raise CTReadError(f"{path}: invalid NIfTI header: {error}") from error


def _voxel_dtype(header: nibabel.Nifti1Header, path: pathlib.Path) -> np.dtype:
  """Return the stored voxel dtype, rejecting types that cannot hold CT values or labels."""
  code = int(header["datatype"])
  try:
    dtype = header.get_data_dtype()
  except Exception as error:  # nibabel raises HeaderDataError or KeyError for unknown codes.
    raise CTReadError(f"{path}: unsupported NIfTI datatype code {code}: {error}") from error
  label = nibabel.nifti1.data_type_codes.label.get(code, str(dtype))
  if dtype.kind == "c":
    raise CTReadError(
        f"{path}: voxel datatype {label} (code {code}) is complex; CT values must be real"
    )
  if dtype.kind not in "iuf":
    raise CTReadError(
        f"{path}: voxel datatype {label} (code {code}) is not a single integer or float "
        "value per voxel (RGB and other colour data cannot be read as CT)"
    )
  return dtype


def _data_end(header: nibabel.Nifti1Header, path: pathlib.Path, max_voxels: int) -> int:
  """Check dim, datatype and vox_offset, and return the byte where the voxel data ends."""
  dim = [int(size) for size in header["dim"]]
  num_dims = dim[0]
  if not 1 <= num_dims <= 7:
    raise CTReadError(f"{path}: invalid NIfTI header: dim[0] is {num_dims}, expected 1..7")
  shape = tuple(dim[1 : num_dims + 1])
  if any(size < 0 for size in shape):
    raise CTReadError(f"{path}: invalid NIfTI header: negative size in shape {shape}")
  num_voxels = math.prod(shape)
  if num_voxels > max_voxels:
    raise VolumeTooLargeError(
        f"{path}: header shape {shape} has {num_voxels:,} voxels", num_voxels, max_voxels
    )
  dtype = _voxel_dtype(header, path)

  offset = float(header["vox_offset"])
  minimum = header.single_vox_offset
  if not (math.isfinite(offset) and offset == int(offset) and minimum <= offset <= _MAX_VOX_OFFSET):
    raise CTReadError(
        f"{path}: invalid NIfTI header: vox_offset {offset:g} is not a whole byte offset "
        f"between the end of the header (byte {minimum}) and {_MAX_VOX_OFFSET:g}"
    )
  return int(offset) + num_voxels * dtype.itemsize


def _check_scaling(header: nibabel.Nifti1Header, path: pathlib.Path) -> None:
  """Reject a finite nonzero scl_slope with a non-finite scl_inter, because the values are unknown.

  A scl_slope of 0, NaN or infinity means no scaling, so its scl_inter is
  unused. The NIfTI-1 standard states this for slope 0, and nibabel 5.4 (`get_slope_inter`)
  extends it to non-finite slopes.
  """
  slope = float(header["scl_slope"])
  intercept = float(header["scl_inter"])
  if slope != 0 and math.isfinite(slope) and not math.isfinite(intercept):
    raise CTReadError(
        f"{path}: scl_slope is {slope:g} but scl_inter is {intercept}, not a finite number, so "
        "the scaled voxel values are unknown; set scl_inter to the intended offset (0 for none)"
    )


def _scaling_warning(header: nibabel.Nifti1Header, path: pathlib.Path) -> str | None:
  """Return a warning when a non-finite scl_slope makes the reader drop a nonzero scl_inter."""
  slope = float(header["scl_slope"])
  intercept = float(header["scl_inter"])
  if math.isfinite(slope) or not math.isfinite(intercept) or intercept == 0:
    return None
  return (
      f"{path}: scl_slope is {slope}, which means no scaling, so scl_inter {intercept:g} is "
      "ignored and the stored values are read as HU"
  )


def _read_checked(
    stream, path: pathlib.Path, file_size: int | None, max_voxels: int
) -> tuple[type, nibabel.Nifti1Header, bytes]:
  """Read a header from `stream`, check it, then read exactly the bytes it describes.

  `file_size` is the size of an uncompressed file, so a header that claims more
  data than the file contains is rejected before reading. For gzip data it is
  None: the bytes the header describes are kept, and at most
  `_MAX_TRAILING_BYTES` more are decompressed and discarded, so a small file
  that decompresses to gigabytes is rejected without filling memory.
  """
  head = stream.read(_MAX_HEADER_BYTES)
  image_class = _image_class(head, path)
  header = _raw_header(image_class, head, path)
  data_end = _data_end(header, path, max_voxels)
  _check_scaling(header, path)
  shape = tuple(int(size) for size in header["dim"][1 : int(header["dim"][0]) + 1])
  truncated = (
      f"{path}: voxel data is truncated: the header implies {data_end:,} bytes "
      f"(shape {shape}, {header.get_data_dtype()}, from byte {int(header['vox_offset'])})"
  )
  if file_size is not None and file_size < data_end:
    raise CTReadError(f"{truncated}, but the file has {file_size:,} bytes")
  content = head + stream.read(max(data_end - len(head), 0))
  if len(content) < data_end:
    raise CTReadError(f"{truncated}, but the data ends after {len(content):,} bytes")
  if file_size is None:
    _drain_gzip_tail(stream, path, len(content) - data_end)
  return image_class, header, content[:data_end]


def _drain_gzip_tail(stream, path: pathlib.Path, trailing: int) -> None:
  """Decompress to the end of the gzip stream, so its CRC is checked, without keeping the bytes."""
  while trailing <= _MAX_TRAILING_BYTES:
    chunk = stream.read(2**20)
    if not chunk:
      return
    trailing += len(chunk)
  raise CTReadError(
      f"{path}: more than {_MAX_TRAILING_BYTES:,} bytes of data follow the voxel data; "
      "a NIfTI file holds one volume and ends with its voxel data"
  )


def _load_image(
    path: pathlib.Path, max_voxels: int | None = None
) -> tuple[nibabel.Nifti1Image | nibabel.Nifti2Image, nibabel.Nifti1Header]:
  """Load a single-file NIfTI-1 or NIfTI-2 image, detecting the format by content.

  The suffix is ignored: gzip is detected by its magic bytes, then NIfTI-1 by
  `n+1\\0` at byte 344 and NIfTI-2 by `n+2\\0` at byte 4, and the matching
  nibabel class parses the bytes. Returns the image and its header as stored
  (see `_raw_header`). `max_voxels` None means `MAX_VOXELS`.
  """
  if max_voxels is None:
    max_voxels = MAX_VOXELS
  if not path.exists():
    raise CTReadError(f"{path}: NIfTI file not found")
  if not path.is_file():
    raise CTReadError(f"{path}: not a file")
  try:
    with path.open("rb") as file:
      compressed = file.read(2) == _GZIP_MAGIC
      file.seek(0)
      if compressed:
        try:
          with gzip.GzipFile(fileobj=file) as stream:
            image_class, header, content = _read_checked(stream, path, None, max_voxels)
        except (EOFError, OSError, zlib.error) as error:
          raise CTReadError(f"{path}: gzip data is truncated or corrupt: {error}") from error
      else:
        image_class, header, content = _read_checked(
            file, path, os.fstat(file.fileno()).st_size, max_voxels
        )
  except OSError as error:
    raise CTReadError(f"{path}: cannot read file: {error}") from error

  try:
    return image_class.from_bytes(content), header
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
  no scaling. Values beyond the float range become inf without a numpy warning,
  and the callers deal with them.
  """
  shape = _image_shape_3d(image, path)
  try:
    with np.errstate(over="ignore", invalid="ignore"):
      if dtype is None:
        data = np.asanyarray(image.dataobj)
      else:
        data = image.get_fdata(dtype=dtype)
  except (ValueError, OSError, EOFError) as error:
    raise CTReadError(f"{path}: voxel data is truncated or unreadable: {error}") from error
  except MemoryError as error:
    raise CTReadError(f"{path}: not enough memory to read shape {shape}") from error
  return data.reshape(shape)


def _check_units_and_pixdim(header: nibabel.Nifti1Header, path: pathlib.Path) -> None:
  """Reject headers whose affine would rest on invalid voxel sizes or units.

  Without an sform (sform_code 0), nibabel builds the affine from the qform or
  from pixdim alone, and both scale by pixdim[1..3]. nibabel reads a zero size
  as 1 mm and a negative one as its absolute value, which would give a volume
  of the wrong size or, for the qform, possibly the wrong direction, so those
  are errors here.
  """
  units_code = int(header["xyzt_units"]) % 8
  if units_code in _NON_MM_SPATIAL_UNITS:
    raise CTReadError(
        f"{path}: spatial units are {_NON_MM_SPATIAL_UNITS[units_code]} (xyzt_units "
        f"{int(header['xyzt_units'])}); only mm is supported. If the voxel sizes and "
        "affine are in mm, set xyzt_units to mm (code 2)"
    )
  if int(header["sform_code"]) > 0:
    return
  voxel_sizes = [float(size) for size in header["pixdim"][1:4]]
  if not all(math.isfinite(size) and size > 0 for size in voxel_sizes):
    source = "the qform" if int(header["qform_code"]) > 0 else "pixdim alone"
    sizes = ", ".join(f"{size:g}" for size in voxel_sizes)
    raise CTReadError(
        f"{path}: voxel sizes pixdim[1..3] = ({sizes}) must be positive and finite, "
        f"because without an sform (sform_code 0) the geometry comes from {source}"
    )


def _affine_problem(affine: np.ndarray) -> str | None:
  """Return why an affine cannot be a CT scan's geometry, or None when it can."""
  if not np.all(np.isfinite(affine)):
    return "affine is not finite"
  with np.errstate(over="ignore"):  # Overflow gives inf sizes, which are out of range.
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
  low, high = _VOXEL_SIZE_RANGE_MM
  if np.any(voxel_sizes < low) or np.any(voxel_sizes > high):
    sizes = ", ".join(f"{size:g}" for size in voxel_sizes)
    return f"voxel sizes ({sizes}) mm are outside {low:g}..{high:g} mm"
  # The determinant divided by the product of the column lengths is 1 for
  # orthogonal voxel axes and 0 for axes that lie in one plane.
  if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(voxel_sizes)):
    return "affine is singular (voxel axes are parallel or coplanar)"
  origin = affine[:3, 3]
  if np.any(np.abs(origin) > _MAX_ABS_ORIGIN_MM):
    coordinates = ", ".join(f"{value:g}" for value in origin)
    return f"origin ({coordinates}) mm is farther than {_MAX_ABS_ORIGIN_MM:g} mm from 0"
  return None


def _lps_affine(image: nibabel.spatialimages.SpatialImage, path: pathlib.Path) -> np.ndarray:
  """Return the image's affine in LPS, rejecting one that cannot be a CT scan's geometry."""
  with np.errstate(invalid="ignore", over="ignore"):
    affine = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
  problem = _affine_problem(affine)
  if problem:
    raise CTReadError(f"{path}: {problem}:\n{image.affine}")
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
    hu: np.ndarray,
    affine: np.ndarray,
    path: pathlib.Path,
    warnings: list[str],
    non_finite_voxels: int = 0,
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
      non_finite_voxels=non_finite_voxels,
  )
  return CTVolume(
      hu=hu,
      positions=positions,
      affine=affine,
      spacing=spacing,
      affine_is_approximate=False,
      provenance=provenance,
  )


def _qform_sform_warning(header: nibabel.Nifti1Header, path: pathlib.Path) -> str | None:
  """Return a warning when the qform and sform point the voxel axes in different directions.

  The sform is used, but tools that prefer the qform would flip or swap axes,
  for example left and right. Shears and small rotations are not compared,
  because a qform cannot hold the shear of a tilted series.
  """
  if int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0:
    return None
  try:
    with np.errstate(invalid="ignore", over="ignore"):
      qform = header.get_qform()
      sform = header.get_sform()
    if not np.all(np.isfinite(qform)):
      return f"{path}: qform is not finite; using the sform"
    qform_axes = nibabel.orientations.aff2axcodes(qform)
    sform_axes = nibabel.orientations.aff2axcodes(sform)
  except Exception as error:  # nibabel raises several types for invalid quaternions.
    return f"{path}: qform is invalid ({error}); using the sform"
  if qform_axes == sform_axes:
    return None
  return (
      f"{path}: qform axes {''.join(qform_axes)} and sform axes {''.join(sform_axes)} "
      "disagree; using the sform, but tools that read the qform show another orientation"
  )


def _read_canonical(
    path: pathlib.Path, max_voxels: int | None = None
) -> tuple[nibabel.spatialimages.SpatialImage, np.ndarray, np.ndarray, np.ndarray, list[str], int]:
  """Load an image; return it, its canonical HU, LPS affine, transform, warnings and non-finite count."""
  image, raw_header = _load_image(path, max_voxels)
  _check_units_and_pixdim(raw_header, path)
  warnings = []
  scaling_warning = _scaling_warning(raw_header, path)
  if scaling_warning:
    warnings.append(scaling_warning)
  if int(raw_header["sform_code"]) == 0 and int(raw_header["qform_code"]) == 0:
    warnings.append(
        f"{path}: sform and qform codes are both 0, so geometry comes from voxel sizes only"
    )
  form_warning = _qform_sform_warning(image.header, path)
  if form_warning:
    warnings.append(form_warning)
  for message in warnings:
    logger.warning(message)

  affine_file = _lps_affine(image, path)
  hu = _read_array(image, path, dtype=np.float32)
  non_finite = ~np.isfinite(hu)
  if non_finite.any():
    message = (
        f"{path}: {int(non_finite.sum())} voxels non-finite or beyond the float32 range "
        f"after scaling, set to air ({AIR_HU:g} HU)"
    )
    logger.warning(message)
    warnings.append(message)
    hu[non_finite] = AIR_HU
  above = int(np.count_nonzero(hu > _MAX_PLAUSIBLE_HU))
  if above:
    message = (
        f"{path}: {above} voxels above {_MAX_PLAUSIBLE_HU:g} HU (max {float(hu.max()):g}), "
        "beyond any CT scale; check scl_slope and scl_inter"
    )
    logger.warning(message)
    warnings.append(message)
  hu = apply_air_floor(hu)

  transform = _canonical_transform(affine_file)
  hu, affine = _reorient(hu, affine_file, transform)
  return image, hu, affine, transform, warnings, int(non_finite.sum())


def read_nifti(path: str | os.PathLike, *, max_voxels: int | None = None) -> CTVolume:
  """Read a NIfTI-1 or NIfTI-2 CT file into a canonical `CTVolume`.

  The voxel values are taken as HU after the header's scl_slope/scl_inter,
  applied once (by nibabel). The array is reoriented to (slice toward
  Superior, row toward Posterior, column toward patient Left) by permuting and
  flipping axes only, so column 0 is the patient's right. The affine comes
  from the sform when its code is set, else the qform (nibabel's choice), and
  is converted from RAS to LPS. Positions, spacing and the gantry tilt (a
  sheared sform, as dcm2niix writes for uncorrected tilted series) come from
  it. A file with a fourth dimension of size 1 is read as 3D.

  HU below `AIR_HU` (scanners' out-of-field fill, -1500 or -3024 in dcm2niix
  output) become `AIR_HU`, as in the DICOM reader. NaN, infinite, or beyond
  float32 after scaling become `AIR_HU` with a warning, and their number is
  `provenance.non_finite_voxels`. Warnings, also stored
  in `provenance.warnings`, note a missing sform and qform, a qform whose axes
  disagree with the sform's, HU above 1e5, a gantry tilt, and a nonzero
  scl_inter ignored because scl_slope is NaN or infinite (no scaling).

  `max_voxels` is the largest volume accepted, checked against the header
  before any voxel is read; None means `MAX_VOXELS`.

  Raises:
    CTReadError: the file is missing, not single-file NIfTI, or truncated. Or
      the header is invalid: dim, datatype or vox_offset out of range, RGB or
      complex voxels, more than `max_voxels` voxels, not exactly one 3D
      volume, or a finite nonzero scl_slope with a NaN or infinite scl_inter. Or the geometry is invalid: spatial units of meter or micron,
      zero or negative pixdim without an sform, or an affine that is not
      finite or singular, with voxel sizes outside 0.001..1000 mm, or with an
      origin farther than 1e5 mm from 0.
  """
  path = pathlib.Path(path)
  _, hu, affine, _, warnings, non_finite = _read_canonical(path, max_voxels)
  return _volume_from_array(hu, affine, path, warnings, non_finite)


def _round_near_integer_labels(mask: np.ndarray) -> tuple[np.ndarray, float]:
  """Round float labels that all lie within `_LABEL_ROUNDING_TOLERANCE` of an integer.

  Returns the rounded labels and the largest deviation rounded away. A mask
  that is not float, or that has a value farther from an integer, comes back
  unchanged with deviation 0, so the caller's value check reports it.
  """
  if mask.dtype.kind != "f" or not np.all(np.isfinite(mask)):
    return mask, 0.0
  rounded = np.rint(mask)
  deviation = float(np.max(np.abs(mask - rounded), initial=0.0))
  if deviation > _LABEL_ROUNDING_TOLERANCE:
    return mask, 0.0
  return rounded, deviation


def _mask_values(
    mask: np.ndarray, image_path: pathlib.Path, mask_path: pathlib.Path
) -> tuple[np.ndarray, list[str]]:
  """Check the mask's value set, log how it was stored, and return uint8 ids and those notes."""
  if mask.dtype.kind == "f" and not np.all(np.isfinite(mask)):
    raise CTReadError(f"{mask_path}: mask for {image_path} has non-finite values")
  notes = []
  mask, deviation = _round_near_integer_labels(mask)
  if deviation > 0:
    notes.append(
        f"{mask_path}: float labels rounded to the nearest integer "
        f"(largest change {deviation:.3g})"
    )
    logger.warning(notes[-1])
  values = np.unique(mask)
  present = set(values.tolist())
  if present <= {0, 255} and 255 in present:
    notes.append(f"{mask_path}: binary mask stored as 0/255, read as 0/1")
    logger.info(notes[-1])
    return (mask == 255).astype(np.uint8), notes
  if present <= set(range(_MAX_MASK_CLASS_ID + 1)):
    return mask.astype(np.uint8), notes
  listed_values = ", ".join(f"{value:g}" for value in values[:12])
  more = f" and {len(values) - 12} more" if len(values) > 12 else ""
  raise CTReadError(
      f"{mask_path}: mask for {image_path} has values {{{listed_values}{more}}}; expected binary "
      f"0/1 or 0/255, or class ids 0..{_MAX_MASK_CLASS_ID} (float labels may be off by at most "
      f"{_LABEL_ROUNDING_TOLERANCE:g})"
  )


def _mask_affine_warning(
    mask_image: nibabel.spatialimages.SpatialImage,
    mask_path: pathlib.Path,
    image_affine: np.ndarray,
    image_path: pathlib.Path,
    transform: np.ndarray,
) -> str | None:
  """Return a warning when the mask's affine is unusable or differs from the image's."""
  assumption = "using the image's geometry and assuming the mask has the image's voxel order"
  with np.errstate(invalid="ignore", over="ignore"):
    mask_affine = LPS_TO_RAS @ np.asarray(mask_image.affine, dtype=np.float64)
  problem = _affine_problem(mask_affine)
  if problem:
    return f"{mask_path}: mask geometry is invalid ({problem}); {assumption}"
  difference = float(np.max(np.abs(mask_affine - image_affine)))
  if difference <= _MASK_AFFINE_TOLERANCE:
    return None
  message = (
      f"{mask_path}: mask affine differs from image {image_path} by up to {difference:.4g}; "
      f"{assumption}"
  )
  if not np.array_equal(_canonical_transform(mask_affine), transform):
    message += " (the mask affine implies a different axis order or direction)"
  return message


def _mask_by_own_affine(
    mask_image: nibabel.spatialimages.SpatialImage,
    mask: np.ndarray,
    image_affine: np.ndarray,
    image_shape: tuple[int, ...],
) -> np.ndarray | None:
  """Return the mask in canonical order by its own affine, or None when that is not the image's grid.

  This matches a mask stored with other axis order or directions than its
  image (flipped, or axes swapped) exactly, because reorienting only permutes
  and flips voxels. `image_affine` is the image's canonical LPS affine.
  """
  with np.errstate(invalid="ignore", over="ignore"):
    mask_affine = LPS_TO_RAS @ np.asarray(mask_image.affine, dtype=np.float64)
  if _affine_problem(mask_affine):
    return None
  reoriented, canonical_affine = _reorient(mask, mask_affine, _canonical_transform(mask_affine))
  if reoriented.shape != tuple(image_shape):
    return None
  if float(np.max(np.abs(canonical_affine - image_affine))) > _MASK_AFFINE_TOLERANCE:
    return None
  return reoriented


def read_nifti_pair(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    *,
    max_voxels: int | None = None,
) -> tuple[CTVolume, np.ndarray]:
  """Read a CT NIfTI and its segmentation mask NIfTI, both in canonical orientation.

  A mask whose affine equals the image's gets the image's reorientation. A
  mask whose affine describes the same voxel grid stored in another axis
  order or direction (flipped, axes swapped) is reoriented by its own affine,
  which is exact, and noted. Otherwise the mask affine is invalid or describes
  another grid (some MBH-Seg releases have this). Then the mask must have the
  image's shape in the file and is assumed to share its voxel order, which is
  logged and recorded in `provenance.warnings`. `provenance.mask_geometry`
  records which of the three happened. The geometry always comes from the image.
  Binary masks stored as 0/1 or 0/255 come back as 0/1 (a 0/255 mask is
  noted in the warnings and in `provenance.mask_stored_as_255`), class-id
  masks with ids 0..5 come back unchanged. Float labels within 1e-3 of an
  integer, as interpolation or float32 scaling leave them, are rounded with a
  warning. The mask gets no HU floor.

  Returns:
    The volume (its provenance lists both files) and a uint8 mask of the same
    shape.

  Raises:
    CTReadError: either file unreadable (see `read_nifti`, which also
      describes `max_voxels`; the mask's own geometry is not checked),
      shapes differ, or mask values outside the sets above.
  """
  image_path = pathlib.Path(image_path)
  mask_path = pathlib.Path(mask_path)
  image, hu, affine, transform, warnings, non_finite = _read_canonical(image_path, max_voxels)

  mask_image, _ = _load_image(mask_path, max_voxels)
  mask_shape = _image_shape_3d(mask_image, mask_path)
  image_shape = _image_shape_3d(image, image_path)
  mask = _read_array(mask_image, mask_path)
  mask, notes = _mask_values(mask, image_path, mask_path)
  warnings.extend(notes)
  stored_as_255 = any("stored as 0/255" in note for note in notes)

  image_affine = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
  message = _mask_affine_warning(mask_image, mask_path, image_affine, image_path, transform)
  reoriented = None
  if message:
    reoriented = _mask_by_own_affine(mask_image, mask, affine, hu.shape)
  if reoriented is not None:
    geometry = MASK_REORIENTED
    message = (
        f"{mask_path}: mask stored in another axis order or direction than image"
        f" {image_path}; reoriented by its affine (exact)"
    )
    mask = reoriented
  else:
    if mask_shape != image_shape:
      raise CTReadError(
          f"mask {mask_path} has shape {mask_shape} but image {image_path} has shape {image_shape}"
      )
    geometry = MASK_IMAGE_GEOMETRY_ASSUMED if message else MASK_SAME_GRID
    mask = np.ascontiguousarray(nibabel.orientations.apply_orientation(mask, transform))
  if message:
    logger.warning(message)
    warnings.append(message)

  volume = _volume_from_array(hu, affine, image_path, warnings, non_finite)
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
          non_finite_voxels=non_finite,
          mask_stored_as_255=stored_as_255,
          mask_geometry=geometry,
      ),
  )
  return volume, mask


def _nifti_affine(affine_lps: np.ndarray) -> np.ndarray:
  """Convert our (slice, row, column) -> LPS affine to NIfTI's (column, row, slice) -> RAS."""
  return LPS_TO_RAS @ affine_lps @ _NIFTI_TO_VOLUME_AXES


def _hu_as_int16(hu: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Round HU to int16, clipping values outside its range with a warning."""
  if hu.dtype.kind not in "biuf":
    raise ValueError(f"{path}: HU must be real numbers, got dtype {hu.dtype}")
  non_finite = int(np.count_nonzero(~np.isfinite(hu)))
  if non_finite:
    raise ValueError(
        f"{path}: {non_finite} HU values are NaN or infinite, and NIfTI int16 cannot store "
        "them; replace them first, for example with AIR_HU"
    )
  rounded = np.rint(hu)
  info = np.iinfo(np.int16)
  outside = (rounded < info.min) | (rounded > info.max)
  if outside.any():
    logger.warning(
        "%s: %d voxels outside the int16 range clipped", path, int(np.count_nonzero(outside))
    )
  return np.clip(rounded, info.min, info.max).astype(np.int16)


def _mask_as_uint8(mask: np.ndarray, shape: tuple[int, ...], path: pathlib.Path) -> np.ndarray:
  """Return the mask as uint8, rounding float labels that are within 1e-3 of an integer."""
  if mask.shape != shape:
    raise ValueError(f"{path}: mask shape {mask.shape} differs from volume shape {shape}")
  if mask.dtype.kind == "f" and not np.all(np.isfinite(mask)):
    raise ValueError(f"{path}: mask contains NaN or infinite values")
  mask, deviation = _round_near_integer_labels(mask)
  if deviation > 0:
    logger.warning(
        "%s: float mask labels rounded to the nearest integer (largest change %.3g)",
        path,
        deviation,
    )
  integral = mask.dtype.kind in "biu" or (
      mask.dtype.kind == "f" and np.array_equal(mask, np.rint(mask))
  )
  if integral and mask.min(initial=0) >= 0 and mask.max(initial=0) <= 255:
    return mask.astype(np.uint8)
  raise ValueError(
      f"{path}: mask must contain integers 0..255 (float labels may be off by at most "
      f"{_LABEL_ROUNDING_TOLERANCE:g}), got dtype {mask.dtype} with values "
      f"{mask.min(initial=0)}..{mask.max(initial=0)}"
  )


def write_nifti(
    volume: CTVolume, path: str | os.PathLike, *, mask: np.ndarray | None = None
) -> pathlib.Path:
  """Write a volume's HU, or a mask in the volume's geometry, as NIfTI-1.

  HU are rounded to int16, and values outside the int16 range are clipped with a
  warning. A mask is written as uint8 and must have the volume's shape and
  integer values 0..255. Float labels within 1e-3 of an integer, as
  interpolation leaves them, are rounded with a warning. The suffix picks the
  format: `.nii` or `.nii.gz`.
  For a volume in canonical orientation, which includes oblique or tilted
  volumes whose axes stay nearest to the canonical ones, `read_nifti` returns
  the same integer HU and the same affine to float32 precision (the sform is
  float32). Other layouts come back reoriented. A volume whose affine is
  approximate (varying slice spacing) is written with that affine and a
  warning, because NIfTI has one affine for all slices. Resample it first
  (`resample.resample_z`) to keep positions exact.

  Returns:
    The path written.

  Raises:
    ValueError: wrong suffix, NaN or infinite HU, a mask of another shape or
      with values that are not labels 0..255, or an affine that `read_nifti`
      would reject (not finite, singular, voxel sizes or origin out of range).
  """
  path = pathlib.Path(path)
  if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
    raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz suffix")

  problem = _affine_problem(np.asarray(volume.affine, dtype=np.float64))
  if problem:
    raise ValueError(f"{path}: cannot write this volume, because its {problem}")
  if mask is None:
    data = _hu_as_int16(np.asarray(volume.hu), path)
  else:
    data = _mask_as_uint8(np.asarray(mask), volume.shape, path)

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
