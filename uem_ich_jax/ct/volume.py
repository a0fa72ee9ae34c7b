"""The one volume type every reader returns, and the error every reader raises."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

AIR_HU = -1024.0

# Largest volume a reader accepts, in voxels, unless the caller passes another
# limit. 2**31 voxels (1024 x 1024 x 2048) take 8 GiB as float32, more than
# any head CT. Readers check it against the header, before reading voxel data.
# It is also the default of `config.data.max_voxels`, which `uem-ich predict`
# passes to the readers unless --max-voxels overrides it.
# TODO: the TFDS builders in datasets/ read with this default, and
# `uem-ich build-dataset` has no option to set another limit.
MAX_VOXELS = 2**31


def apply_air_floor(hu: np.ndarray) -> np.ndarray:
  """Return `hu` with every value below `AIR_HU` raised to `AIR_HU`, in the same dtype.

  Nothing inside the scan field is less dense than air, so lower values are
  padding or out-of-field fill, which scanners write as anything from -1025 to
  -3024 HU. Every reader applies this one rule, so one scan gives the same HU
  from DICOM and from NIfTI.
  """
  return np.maximum(hu, np.asarray(AIR_HU, dtype=hu.dtype))


# Values of Provenance.mask_geometry.
# The mask's affine equals the image's.
MASK_SAME_GRID = "same grid"
# The mask's affine stores the image's grid in another axis order or
# direction; the mask was permuted and flipped by it, which is exact.
MASK_REORIENTED = "reoriented by its affine"
# The mask's affine is invalid or describes another grid; the mask was taken
# to share the image's voxel order, which may be wrong.
MASK_IMAGE_GEOMETRY_ASSUMED = "image geometry assumed"


class CTReadError(InputError):
  """Input that cannot be read as CT; the message names the file and the reason."""


class VolumeTooLargeError(CTReadError):
  """A header that describes more voxels than the reader's `max_voxels` limit.

  Attributes:
    description: the file or series and its size, for example
      "scan.nii: header shape (512, 512, 40000) has 10,485,760,000 voxels".
    num_voxels: the number of voxels the header describes.
    max_voxels: the limit that was exceeded.
  """

  def __init__(self, description: str, num_voxels: int, max_voxels: int):
    super().__init__(
        f"{description}, more than the {max_voxels:,} accepted (the max_voxels argument, by"
        " default uem_ich_jax.ct.volume.MAX_VOXELS)"
    )
    self.description = description
    self.num_voxels = num_voxels
    self.max_voxels = max_voxels


@dataclasses.dataclass(frozen=True)
class Provenance:
  """Source files, UIDs and reader warnings of a volume."""

  source_files: tuple[str, ...] = ()
  # One per slice, in slice order; empty strings for NIfTI or phantom input.
  sop_instance_uids: tuple[str, ...] = ()
  series_uid: str = ""
  study_uid: str = ""
  patient_id: str = ""
  series_description: str = ""
  kernel: str = ""
  modality: str = "CT"
  # Angle between the slice stacking direction and the slice normal, measured
  # from positions and orientation, with the sign dcm2niix reports.
  gantry_tilt_deg: float = 0.0
  spacing_varies: bool = False
  warnings: tuple[str, ...] = ()
  # First WindowCenter/WindowWidth of the DICOM header (HU), None when absent.
  window_center: float | None = None
  window_width: float | None = None
  # MONOCHROME1 means display inverted; HU are the same either way.
  photometric_interpretation: str = ""
  # Voxels that were NaN, infinite or beyond float32 in the file and became
  # AIR_HU (NIfTI only; DICOM stores integers).
  non_finite_voxels: int = 0
  # Set by read_nifti_pair only. True when the mask was binary 0/255, read as 0/1.
  mask_stored_as_255: bool = False
  # Set by read_nifti_pair only: how the mask was put on the image's grid.
  # MASK_SAME_GRID, MASK_REORIENTED or MASK_IMAGE_GEOMETRY_ASSUMED.
  mask_geometry: str = ""


@dataclasses.dataclass(frozen=True)
class CTVolume:
  """A CT volume in Hounsfield units with its patient geometry.

  Attributes:
    hu: float32 array (slice, row, column) in HU.
    positions: (slice, 3) position of each slice's first voxel in DICOM patient
      coordinates (LPS), mm.
    affine: 4x4 map from voxel indices (slice, row, column) to LPS mm. Exact
      when slice spacing is uniform; built from the median spacing otherwise.
    spacing: (slice, row, column) in mm. The slice entry is the distance between
      slice planes along their normal, the median when it varies.
    affine_is_approximate: True when the affine cannot place every slice
      exactly (varying spacing); use `positions` for those.
    provenance: source files, UIDs and what the reader noticed.
  """

  hu: np.ndarray
  positions: np.ndarray
  affine: np.ndarray
  spacing: tuple[float, float, float]
  affine_is_approximate: bool = False
  provenance: Provenance = Provenance()

  def __post_init__(self):
    if self.hu.ndim != 3:
      raise ValueError(f"hu must be (slice, row, column), got shape {self.hu.shape}")
    if self.positions.shape != (self.hu.shape[0], 3):
      raise ValueError(
          f"positions must be ({self.hu.shape[0]}, 3), got {self.positions.shape}"
      )
    if self.affine.shape != (4, 4):
      raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.hu.shape)

  @property
  def num_slices(self) -> int:
    return self.hu.shape[0]

  @property
  def slice_normal(self) -> np.ndarray:
    """Unit normal of the slice planes (row direction x column direction), LPS."""
    row_step = self.affine[:3, 1]  # Moving down a column (increasing row index).
    column_step = self.affine[:3, 2]  # Moving along a row (increasing column index).
    normal = np.cross(column_step, row_step)
    return normal / np.linalg.norm(normal)

  @property
  def slice_positions_mm(self) -> np.ndarray:
    """Each slice's position along the slice normal, mm."""
    return self.positions @ self.slice_normal
