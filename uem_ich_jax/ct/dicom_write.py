"""Writing a `CTVolume` as a DICOM CT series, one file per slice.

The files are uncompressed (explicit VR little endian), store integer values
with RescaleSlope/RescaleIntercept, and carry the volume's geometry in
ImagePositionPatient, ImageOrientationPatient and PixelSpacing, so that
`read_dicom_series` and dcm2niix read the same HU and geometry back.
"""

from __future__ import annotations

import datetime
import logging
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from uem_ich_jax.ct.volume import CTVolume

logger = logging.getLogger(__name__)

# Called with each slice's dataset and its index in slice order, just before
# the file is written. Tests use it to add header quirks.
DatasetEditor = Callable[[Dataset, int], None]


def _ds(value: float) -> str:
  """Format a number as a DICOM decimal string (at most 16 characters)."""
  return format_number_as_ds(float(value))


def _stored_values(
    hu: np.ndarray, slope: float, intercept: float
) -> tuple[np.ndarray, int]:
  """Return integer stored values and the PixelRepresentation that fits them.

  Unsigned 16-bit storage is used when every value fits, signed otherwise.
  """
  if slope == 0:
    raise ValueError("rescale_slope must not be 0")
  stored = np.rint((hu.astype(np.float64) - intercept) / slope)
  low, high = float(stored.min()), float(stored.max())
  if low >= 0 and high <= np.iinfo(np.uint16).max:
    return stored.astype("<u2"), 0
  if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
    return stored.astype("<i2"), 1
  raise ValueError(
      f"HU range [{hu.min()}, {hu.max()}] does not fit 16-bit stored values with "
      f"slope {slope} and intercept {intercept}; choose another rescale_intercept "
      "or rescale_slope"
  )


def _orientation(volume: CTVolume) -> tuple[list[float], list[float]]:
  """Return ImageOrientationPatient and PixelSpacing from the affine."""
  row_step = volume.affine[:3, 1]  # Down a column: one row further.
  column_step = volume.affine[:3, 2]  # Along a row: one column further.
  row_spacing = float(np.linalg.norm(row_step))
  column_spacing = float(np.linalg.norm(column_step))
  if row_spacing == 0 or column_spacing == 0:
    raise ValueError(f"affine has a zero in-plane step:\n{volume.affine}")
  orientation = [*(column_step / column_spacing), *(row_step / row_spacing)]
  return orientation, [row_spacing, column_spacing]


def write_dicom_series(
    volume: CTVolume,
    folder: str | pathlib.Path,
    *,
    series_description: str = "",
    patient_id: str = "ANONYMOUS",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    frame_of_reference_uid: str | None = None,
    window: tuple[float, float] = (40.0, 80.0),
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    kernel: str = "",
    series_number: int = 1,
    file_name: str = "{index:04d}.dcm",
    edit_dataset: DatasetEditor | None = None,
) -> list[pathlib.Path]:
  """Write `volume` as one CT Image Storage file per slice.

  HU are rounded to integers. Stored values are uint16 when
  `(HU - rescale_intercept) / rescale_slope` fits, int16 otherwise.
  InstanceNumber counts from 1 in slice order, and SliceThickness is
  `volume.spacing[0]`. UIDs that are not given are fresh ones from
  `pydicom.uid.generate_uid`.

  NOTE: GantryDetectorTilt is written as `provenance.gantry_tilt_deg`, whose
  sign is dcm2niix's. Scanners do not agree on the tag's sign (the Philips
  test scan has +16.5 in the tag where the geometry gives -16.5), so readers,
  this project's included, measure tilt from the positions instead.

  Args:
    volume: the volume to write.
    folder: output folder, created when missing.
    series_description: SeriesDescription.
    patient_id: PatientID; PatientName is set to the same string.
    study_uid: StudyInstanceUID.
    series_uid: SeriesInstanceUID.
    sop_instance_uids: one SOPInstanceUID per slice.
    frame_of_reference_uid: FrameOfReferenceUID; derived from the series UID
      when None, so the same series UID always gets the same frame.
    window: (WindowCenter, WindowWidth) in HU.
    rescale_intercept: RescaleIntercept.
    rescale_slope: RescaleSlope.
    kernel: ConvolutionKernel; the provenance's kernel when empty.
    series_number: SeriesNumber.
    file_name: file name pattern, formatted with `index` (0-based slice index)
      and `instance` (InstanceNumber).
    edit_dataset: called as `edit_dataset(dataset, index)` on each slice's
      dataset before it is written.

  Returns:
    The written paths, in slice order.

  Raises:
    ValueError: the HU do not fit 16-bit stored values, the affine has a zero
      in-plane step, or `sop_instance_uids` has the wrong length.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  num_slices = volume.num_slices
  stored, pixel_representation = _stored_values(
      volume.hu, rescale_slope, rescale_intercept
  )
  orientation, pixel_spacing = _orientation(volume)
  normal = volume.slice_normal

  study_uid = study_uid or generate_uid()
  series_uid = series_uid or generate_uid()
  if frame_of_reference_uid is None:
    frame_of_reference_uid = generate_uid(entropy_srcs=[series_uid, "frame of reference"])
  if sop_instance_uids is None:
    sop_instance_uids = [generate_uid() for _ in range(num_slices)]
  if len(sop_instance_uids) != num_slices:
    raise ValueError(
        f"sop_instance_uids has {len(sop_instance_uids)} entries for {num_slices} slices"
    )
  now = datetime.datetime.now(datetime.timezone.utc)
  kernel = kernel or volume.provenance.kernel

  paths = []
  for index in range(num_slices):
    dataset = _slice_dataset(
        pixels=stored[index],
        pixel_representation=pixel_representation,
        position=volume.positions[index],
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_location=float(volume.positions[index] @ normal),
    )
    dataset.SOPInstanceUID = sop_instance_uids[index]
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uids[index]
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.FrameOfReferenceUID = frame_of_reference_uid
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = now.strftime("%Y%m%d")
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = now.strftime("%H%M%S")
    dataset.PatientID = patient_id
    dataset.PatientName = patient_id
    dataset.SeriesDescription = series_description
    dataset.SeriesNumber = series_number
    dataset.InstanceNumber = index + 1
    dataset.SliceThickness = _ds(volume.spacing[0])
    dataset.GantryDetectorTilt = _ds(volume.provenance.gantry_tilt_deg)
    if kernel:
      dataset.ConvolutionKernel = kernel
    dataset.WindowCenter = _ds(window[0])
    dataset.WindowWidth = _ds(window[1])
    dataset.RescaleIntercept = _ds(rescale_intercept)
    dataset.RescaleSlope = _ds(rescale_slope)
    dataset.RescaleType = "HU"
    if edit_dataset is not None:
      edit_dataset(dataset, index)

    path = folder / file_name.format(index=index, instance=index + 1)
    dataset.save_as(path, enforce_file_format=True)
    paths.append(path)
  logger.debug("wrote %d slices of series %s to %s", num_slices, series_uid, folder)
  return paths


def _slice_dataset(
    *,
    pixels: np.ndarray,
    pixel_representation: int,
    position: np.ndarray,
    orientation: list[float],
    pixel_spacing: list[float],
    slice_location: float,
) -> Dataset:
  """Build the image and geometry part of one slice's dataset."""
  file_meta = FileMetaDataset()
  file_meta.MediaStorageSOPClassUID = CTImageStorage
  file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

  dataset = Dataset()
  dataset.file_meta = file_meta
  dataset.SpecificCharacterSet = "ISO_IR 100"
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  dataset.SOPClassUID = CTImageStorage
  dataset.Modality = "CT"
  dataset.Manufacturer = "uem-ich-jax"
  dataset.PatientPosition = "HFS"
  dataset.ImagePositionPatient = [_ds(value) for value in position]
  dataset.ImageOrientationPatient = [_ds(value) for value in orientation]
  dataset.PixelSpacing = [_ds(value) for value in pixel_spacing]
  dataset.SliceLocation = _ds(slice_location)
  dataset.SamplesPerPixel = 1
  dataset.PhotometricInterpretation = "MONOCHROME2"
  dataset.Rows, dataset.Columns = (int(size) for size in pixels.shape)
  dataset.BitsAllocated = 16
  dataset.BitsStored = 16
  dataset.HighBit = 15
  dataset.PixelRepresentation = pixel_representation
  dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
  return dataset
