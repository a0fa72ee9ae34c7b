"""Small synthetic CT series with header quirks, written with the project's writer."""

from __future__ import annotations

import gzip
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from uem_ich_jax.ct.dicom_write import write_dicom_series
from uem_ich_jax.ct.volume import CTVolume, Provenance


def make_volume(
    *,
    num_slices: int = 4,
    rows: int = 6,
    columns: int = 7,
    pixel_spacing: tuple[float, float] = (0.5, 0.6),
    slice_offsets_mm: Sequence[float] | None = None,
    slice_spacing_mm: float = 2.5,
    tilt_deg: float = 0.0,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    seed: int = 0,
) -> CTVolume:
  """Build an axial volume of random integer HU in [-1000, 1500].

  The slices lie at `slice_offsets_mm` along the normal (by default evenly
  `slice_spacing_mm` apart). A nonzero `tilt_deg` tilts the image planes about
  the left-right axis while the slices still stack straight along +z (feet to
  head), the geometry a tilted gantry produces. dcm2niix reports that tilt with
  the same sign as `tilt_deg`.
  """
  if slice_offsets_mm is None:
    slice_offsets_mm = [index * slice_spacing_mm for index in range(num_slices)]
  offsets = np.asarray(slice_offsets_mm, dtype=np.float64)
  angle = np.radians(tilt_deg)
  row_cosine = np.array([1.0, 0.0, 0.0])
  column_cosine = np.array([0.0, np.cos(angle), -np.sin(angle)])
  normal = np.cross(row_cosine, column_cosine)
  # Slices move along +z; a shift of `offset` along the normal needs
  # offset / cos(angle) along z.
  z_axis = np.array([0.0, 0.0, 1.0])
  positions = np.asarray(origin) + offsets[:, None] * z_axis / float(z_axis @ normal)
  affine = np.eye(4)
  mean_step = (positions[-1] - positions[0]) / max(len(offsets) - 1, 1)
  affine[:3, 0] = mean_step if len(offsets) > 1 else normal * slice_spacing_mm
  affine[:3, 1] = column_cosine * pixel_spacing[0]
  affine[:3, 2] = row_cosine * pixel_spacing[1]
  affine[:3, 3] = positions[0]
  rng = np.random.default_rng(seed)
  hu = rng.integers(-1000, 1501, size=(len(offsets), rows, columns)).astype(np.float32)
  return CTVolume(
      hu=hu,
      positions=positions,
      affine=affine,
      spacing=(float(np.median(np.diff(offsets))) if len(offsets) > 1 else slice_spacing_mm,
               *pixel_spacing),
      provenance=Provenance(gantry_tilt_deg=tilt_deg),
  )


def write_series(
    folder: pathlib.Path, volume: CTVolume | None = None, **kwargs
) -> list[pathlib.Path]:
  """Write `volume` (a default `make_volume()` when None) as a series in `folder`."""
  return write_dicom_series(volume if volume is not None else make_volume(), folder, **kwargs)


def edit_file(
    path: pathlib.Path, edit: Callable[[Dataset], None], *, enforce_file_format: bool = True
) -> None:
  """Read a written file, apply `edit` to its dataset and save it in place.

  Pass `enforce_file_format=False` to save file meta that `edit` made invalid.
  """
  dataset = pydicom.dcmread(path)
  edit(dataset)
  dataset.save_as(path, enforce_file_format=enforce_file_format)


def strip_preamble(path: pathlib.Path) -> None:
  """Rewrite a file as a bare implicit VR dataset: no preamble, "DICM" prefix or file meta."""
  dataset = pydicom.dcmread(path)
  dataset.preamble = None
  del dataset.file_meta
  pydicom.dcmwrite(path, dataset, enforce_file_format=False, implicit_vr=True, little_endian=True)


def cut_before_tag(path: pathlib.Path, group: int, element: int) -> None:
  """Cut a file off just before a data element (explicit VR little endian), as a short copy does."""
  data = path.read_bytes()
  offset = data.find(group.to_bytes(2, "little") + element.to_bytes(2, "little"), 132)
  if offset < 0:
    raise ValueError(f"{path}: element ({group:04X},{element:04X}) not found")
  path.write_bytes(data[:offset])


def gzip_file(path: pathlib.Path) -> None:
  """Replace a file's content with its gzip compression, keeping the name."""
  path.write_bytes(gzip.compress(path.read_bytes()))


def set_stored_values(
    dataset: Dataset,
    values: np.ndarray,
    *,
    bits_stored: int,
    pixel_representation: int,
    garbage_high_bits: bool = True,
) -> None:
  """Store `values` in BitsStored bits of 16-bit words, with junk in the bits above.

  The junk bits (an alternating pattern) are what an overlay or a careless
  exporter leaves there; a correct reader masks them off.
  """
  words = values.astype(np.int64) & ((1 << bits_stored) - 1)
  if garbage_high_bits:
    junk = np.where(np.indices(values.shape).sum(axis=0) % 2 == 0, 0xA000, 0x5000)
    words |= junk & ~((1 << bits_stored) - 1) & 0xFFFF
  dataset.BitsStored = bits_stored
  dataset.HighBit = bits_stored - 1
  dataset.PixelRepresentation = pixel_representation
  dataset.PixelData = words.astype("<u2").tobytes()


def write_hu_modulo_4096(volume: CTVolume, folder: pathlib.Path) -> list[pathlib.Path]:
  """Write `volume` as 12-bit unsigned slices with intercept 0, negative HU stored modulo 4096.

  This is how the RSNA 2019 release stores some series: air (-1000 HU) is
  stored as 3096.
  """
  paths = write_dicom_series(volume, folder)
  for path, hu in zip(paths, volume.hu):

    def edit(dataset, hu=hu):
      set_stored_values(
          dataset, np.mod(hu.astype(np.int64), 4096), bits_stored=12, pixel_representation=0,
          garbage_high_bits=False,
      )
      dataset.RescaleIntercept = "0"

    edit_file(path, edit)
  return paths


def truncate_file(path: pathlib.Path, keep_fraction: float = 0.6) -> None:
  """Cut a file's end off, as an interrupted copy does."""
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep_fraction)])


def set_pixel_padding(dataset: Dataset, value: int, range_limit: int | None = None) -> None:
  """Set PixelPaddingValue (and PixelPaddingRangeLimit) with the VR that matches the pixels."""
  vr = "SS" if int(dataset.PixelRepresentation) == 1 else "US"
  dataset.add_new(0x00280120, vr, value)
  if range_limit is not None:
    dataset.add_new(0x00280121, vr, range_limit)


def nifti_in_volume_order(image, volume: CTVolume) -> np.ndarray:
  """Rearrange a dcm2niix NIfTI image into `volume`'s (slice, row, column) order.

  The axis mapping comes from the two affines. Each in-plane NIfTI axis is
  matched by direction to the volume's row or column step, which finds
  dcm2niix's row flip. The NIfTI slice axis is flipped when it runs against the
  slice normal. The slice axis is matched by order only, because dcm2niix's plain
  output of a tilted or unevenly spaced series does not place each slice at
  its DICOM position. The in-plane origin is checked against the first slice.
  """
  data = image.get_fdata(dtype=np.float64)  # nibabel applies scl_slope and scl_inter.
  if data.ndim == 4:
    data = data[..., 0]
  lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
  our_axis = [0, 0, 0]
  flips = [False, False, False]
  for nifti_axis in (0, 1):
    direction = lps_affine[:3, nifti_axis] / np.linalg.norm(lps_affine[:3, nifti_axis])
    cosines = {
        axis: float(direction @ volume.affine[:3, axis]) / np.linalg.norm(volume.affine[:3, axis])
        for axis in (1, 2)
    }
    axis = max(cosines, key=lambda key: abs(cosines[key]))
    if abs(cosines[axis]) < 0.999:
      raise AssertionError(f"NIfTI axis {nifti_axis} matches no in-plane axis: {cosines}")
    our_axis[nifti_axis] = axis
    flips[nifti_axis] = cosines[axis] < 0
  our_axis[2] = 0
  flips[2] = float(lps_affine[:3, 2] @ volume.slice_normal) < 0
  if sorted(our_axis) != [0, 1, 2]:
    raise AssertionError(f"NIfTI axes map to {our_axis}")

  # The NIfTI index of our voxel (0, 0, 0), and its position in the first slice plane.
  first_index = [data.shape[axis] - 1 if flips[axis] else 0 for axis in range(3)]
  point = (lps_affine @ np.array([*first_index, 1.0]))[:3]
  offset_mm = point - volume.positions[0]
  in_plane = offset_mm - (offset_mm @ volume.slice_normal) * volume.slice_normal
  if np.linalg.norm(in_plane) > 1e-2:
    raise AssertionError(f"NIfTI first voxel is {in_plane} mm off the volume's first voxel")

  for axis in range(3):
    if flips[axis]:
      data = np.flip(data, axis=axis)
  return np.transpose(data, axes=np.argsort(our_axis))
