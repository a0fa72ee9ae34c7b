"""The segmentation files of a prediction: a NIfTI that viewers overlay, and a DICOM SEG.

NIfTI grid. `segmentation.nii.gz` is written on the grid of the series as read
when its slice spacing is uniform and it has no gantry tilt. Otherwise it is
written on the grid of `ct.resample_z`: orthogonal, slices along the slice
normal from the first slice plane, rows and columns on the first slice's pixel
lattice, grown to cover the sheared slices. The mask is carried there by
nearest neighbour (`ct.resample_mask`). Neither a tilt nor varying spacing
fits one NIfTI affine that viewers honour. NIfTI's qform cannot hold the
shear of a tilt, and the images of ITK-based viewers (3D Slicer, ITK-SNAP) have
orthonormal axes. One affine also cannot place unevenly spaced slices.

The slice spacing of the resampled grid follows dcm2niix (v1.0.20260724,
`nii_saveNII3Deq`), so the file overlays on dcm2niix's corrected conversion:
  - uniform spacing with a tilt: the source spacing, so the slice planes stay
    where they were. That is the grid of dcm2niix's `_Tilt_1` output (and of
    `ct.correct_tilt`).
  - varying spacing: the smallest gap between neighbouring slices. When that
    gap needs more than twice the source slice count, twice the source slice
    count spans the first to the last slice plane instead. That is dcm2niix's
    `_Eq_1` output, or `_Tilt_Eq_1` when the series is also tilted.
Measured on the real-scan tests: the grid equals dcm2niix's `_Tilt_Eq_1` for
the GE series (tilted, varying spacing) in shape and affine. For the Philips
series (tilted, uniform), shape, axes and spacing equal `_Tilt_1`. There
dcm2niix writes an origin about 80 mm off the first slice plane and puts its
pixel lattice on the last slice. This grid keeps the origin of the DICOM
positions. Where dcm2niix's `_Eq` slice count is not capped at twice the
source count, its last slice can lie up to half the last gap before the last
slice plane. `resample_z` continues to that plane, so the file can then have
more slices than dcm2niix's output at the same affine.

DICOM SEG. `segmentation.dcm` is a BINARY Segmentation (highdicom) of the
source series on its own frames, so it is exact for tilted and unevenly
spaced series alike. It has one segment per class of the model's class map
("blood" for a binary head, the five subtypes for a 6-class head), whether or
not the mask contains it. Frames of a segment on a slice without its voxels
are left out (highdicom's default), except for an all-empty mask: highdicom
0.28 then writes every frame, empty, because a SEG needs at least one frame.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import warnings
from typing import Any

import numpy as np

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.ct import resample
from uem_ich_jax.infer.predict import PredictError

logger = logging.getLogger(__name__)

NIFTI_FILE = "segmentation.nii.gz"
DICOM_SEG_FILE = "segmentation.dcm"
GRID_AS_READ = "as_read"
GRID_RESAMPLE_Z = "resample_z"
# Series number of the SEG. DICOM requires one, and scanners seldom number
# their own series this high.
SEG_SERIES_NUMBER = 9901
# Type 2 attributes (present, possibly empty) of the patient and study modules
# that highdicom copies from the source. Anonymised series may lack them.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class DicomSegError(PredictError):
  """A DICOM SEG that cannot be written for a reason in the source data."""


# ------------------------------------------------------------- NIfTI grid ---


@dataclasses.dataclass(frozen=True)
class OutputGrid:
  """The grid `segmentation.nii.gz` is written on.

  Attributes:
    kind: `GRID_AS_READ` or `GRID_RESAMPLE_Z`.
    volume: a volume on that grid; only its geometry is used.
    why: the reason for the choice, as text.
    tilt_removed_deg: the gantry tilt removed by resampling (0.0 when none).
    dcm2niix_output: the suffix of dcm2niix's output with this grid ("" for
      its plain output, "_Tilt_1", "_Eq_1" or "_Tilt_Eq_1").
  """

  kind: str
  volume: ct.CTVolume
  why: str
  tilt_removed_deg: float
  dcm2niix_output: str

  def report(self) -> dict[str, Any]:
    """Return the report's `segmentation.grid` section."""
    volume = self.volume
    return {
        "kind": self.kind,
        "spacing_mm": [float(value) for value in volume.spacing],
        "shape": [int(value) for value in volume.shape],
        "affine_lps": np.asarray(volume.affine, np.float64).round(6).tolist(),
        "tilt_removed_deg": round(float(self.tilt_removed_deg), 4),
        "dcm2niix_output": self.dcm2niix_output,
        "why": self.why,
    }


def equalised_spacing_mm(slice_positions_mm: np.ndarray) -> float:
  """Return dcm2niix's `_Eq` slice spacing for slices at these positions along the normal (mm).

  This is the smallest positive gap, unless covering the series at that gap
  takes more than twice the slice count. Then it is the spacing that spans the
  first to the last slice in exactly twice the slice count.
  """
  positions = np.sort(np.asarray(slice_positions_mm, np.float64))
  if len(positions) < 2:
    raise ValueError(f"an equalised spacing needs at least 2 slices, got {len(positions)}")
  gaps = np.diff(positions)
  positive = gaps[gaps > 0]
  if not len(positive):
    raise ValueError("all slices lie at one position along the normal")
  smallest = float(positive.min())
  extent = float(positions[-1] - positions[0])
  # dcm2niix counts slices up to half the last gap before the last slice plane.
  count = math.ceil((extent - 0.5 * gaps[-1]) / smallest)
  if count > 2 * len(positions):
    return extent / (2 * len(positions) - 1)
  return smallest


def _is_tilted(volume: ct.CTVolume) -> bool:
  tolerance = resample.TILT_TOLERANCE_DEG
  return (
      abs(volume.provenance.gantry_tilt_deg) >= tolerance
      or abs(resample.gantry_tilt_deg(volume.affine)) >= tolerance
  )


def _measured_tilt_deg(volume: ct.CTVolume) -> float:
  if abs(volume.provenance.gantry_tilt_deg) >= resample.TILT_TOLERANCE_DEG:
    return float(volume.provenance.gantry_tilt_deg)
  return resample.gantry_tilt_deg(volume.affine)


def output_grid(volume: ct.CTVolume) -> OutputGrid:
  """Choose the grid of `segmentation.nii.gz` for a scan as read (see the module docstring)."""
  tilted = _is_tilted(volume)
  uneven = bool(volume.provenance.spacing_varies or volume.affine_is_approximate)
  if not tilted and not uneven:
    return OutputGrid(
        kind=GRID_AS_READ,
        volume=volume,
        why="the slice spacing is uniform and there is no gantry tilt, so one NIfTI affine"
        " places every slice of the series as read",
        tilt_removed_deg=0.0,
        dcm2niix_output="",
    )

  reasons = []
  if tilted:
    tilt = _measured_tilt_deg(volume)
    reasons.append(
        f"the gantry tilt of {tilt:.2f} degrees is a shear, which a NIfTI qform cannot hold and"
        " ITK-based viewers (3D Slicer, ITK-SNAP), whose image axes are orthonormal, cannot show"
    )
  if uneven:
    gaps = np.diff(np.sort(volume.slice_positions_mm))
    spacing = equalised_spacing_mm(volume.slice_positions_mm)
    reasons.append(
        f"the slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm, which one"
        " affine cannot place"
    )
    rule = (
        f"{spacing:.4f} mm, dcm2niix's equalised spacing (the smallest gap, or twice the"
        " slice count across the series when that takes fewer slices)"
    )
  else:
    spacing = float(volume.spacing[0])
    rule = f"{spacing:.4f} mm, the source spacing, so the slice planes stay in place"
  suffix = "_1"
  if uneven:
    suffix = "_Eq" + suffix
  if tilted:
    suffix = "_Tilt" + suffix
  # Nearest neighbour: only the geometry of the resampled HU is used.
  resampled, _ = ct.resample_z(volume, spacing, order=0)
  why = (
      "; ".join(reasons)
      + f". The mask is resampled (nearest neighbour) along the slice normal to {rule};"
      f" dcm2niix's {suffix} output has the same axes and slice spacing"
  )
  return OutputGrid(
      kind=GRID_RESAMPLE_Z,
      volume=resampled,
      why=why,
      tilt_removed_deg=_measured_tilt_deg(volume) if tilted else 0.0,
      dcm2niix_output=suffix,
  )


def mask_on_grid(mask: np.ndarray, volume: ct.CTVolume, grid: OutputGrid) -> np.ndarray:
  """Return the mask of `volume` (as read) on `grid`, nearest neighbour, as uint8 class ids."""
  if grid.kind == GRID_AS_READ:
    return np.asarray(mask, np.uint8)
  return ct.resample_mask(np.asarray(mask, np.uint8), volume, grid.volume)


def write_nifti(
    path: pathlib.Path, mask: np.ndarray, volume: ct.CTVolume, grid: OutputGrid
) -> None:
  """Write the mask of `volume` (as read) as NIfTI on `grid`."""
  ct.write_nifti(grid.volume, path, mask=mask_on_grid(mask, volume, grid))


# -------------------------------------------------------------- DICOM SEG ---


def has_dicom_source(volume: ct.CTVolume) -> bool:
  """Return whether every slice of `volume` came from one DICOM file with a SOP instance UID."""
  provenance = volume.provenance
  return (
      len(provenance.source_files) == volume.num_slices
      and len(provenance.sop_instance_uids) == volume.num_slices
      and all(provenance.sop_instance_uids)
  )


def _segment_descriptions(segmentation_classes: int, model_name: str) -> list:
  """Return one highdicom `SegmentDescription` per class of the model's class map."""
  import highdicom
  from pydicom.sr.codedict import codes

  algorithm = highdicom.AlgorithmIdentificationSequence(
      name=f"uem-ich-jax {model_name}",
      version=uem_ich_jax.__version__,
      family=codes.cid7162.ArtificialIntelligence,
  )
  if segmentation_classes == 1:
    segments = [(1, "blood", codes.SCT.IntracranialHemorrhage)]
  else:
    # TODO: pydicom 3.0's SNOMED CT dictionary has no concept for the five
    # subtypes, so they get codes of this project's private scheme; SCT codes
    # checked against a SNOMED CT release would let viewers recognise them.
    segments = [
        (
            uem_ich_jax.MASK_CLASS_IDS[name],
            name,
            highdicom.sr.CodedConcept(
                value=name.upper(), scheme_designator="99UEMICH", meaning=f"{name} hemorrhage"
            ),
        )
        for name in uem_ich_jax.SUBTYPES
    ]
  return [
      highdicom.seg.SegmentDescription(
          segment_number=number,
          segment_label=label,
          segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
          segmented_property_type=property_type,
          algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
          algorithm_identification=algorithm,
      )
      for number, label, property_type in sorted(segments)
  ]


def _source_datasets(volume: ct.CTVolume) -> list:
  """Read the source headers in slice order and check them against the volume's provenance.

  Type 2 patient and study attributes that a source lacks are added empty,
  which is what DICOM prescribes for an unknown type 2 value.
  """
  import pydicom

  datasets = []
  missing: set[str] = set()
  for path, uid in zip(volume.provenance.source_files, volume.provenance.sop_instance_uids):
    try:
      dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
      raise DicomSegError(f"failed to read the source slice {path}: {error}") from error
    if str(dataset.get("SOPInstanceUID", "")) != uid:
      raise DicomSegError(
          f"{path} now has SOPInstanceUID {dataset.get('SOPInstanceUID')!r}, but {uid!r} was"
          " read, so the series changed during the prediction; predict it again"
      )
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:
      if keyword not in dataset:
        setattr(dataset, keyword, "")
        missing.add(keyword)
    datasets.append(dataset)
  if missing:
    logger.info(
        "the source series lacks %s; %s has them empty", ", ".join(sorted(missing)), DICOM_SEG_FILE
    )
  return datasets


def write_dicom_seg(
    path: pathlib.Path,
    mask: np.ndarray,
    volume: ct.CTVolume,
    segmentation_classes: int,
    model_name: str,
) -> dict[str, Any]:
  """Write `mask` (class ids on `volume`'s slices as read) as a DICOM SEG of the source series.

  Returns the report's `segmentation.dicom_seg` section.

  Raises:
    DicomSegError: the volume has no DICOM source, a source file cannot be
      read or changed, or highdicom rejects the source data.
  """
  import highdicom

  if not has_dicom_source(volume):
    raise DicomSegError("the input is not a DICOM series, so there are no frames to reference")
  mask = np.asarray(mask, np.uint8)
  if mask.shape != volume.shape:
    raise ValueError(f"mask shape {mask.shape} differs from the volume shape {volume.shape}")
  descriptions = _segment_descriptions(segmentation_classes, model_name)
  sources = _source_datasets(volume)
  try:
    with warnings.catch_warnings():
      # The patient name is copied from the source as it is; highdicom warns
      # about single-component names such as "ANONYMOUS".
      warnings.filterwarnings("ignore", message=".*intended person name", category=UserWarning)
      segmentation = highdicom.seg.Segmentation(
          source_images=sources,
          pixel_array=mask,
          segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
          segment_descriptions=descriptions,
          series_instance_uid=highdicom.UID(),
          series_number=SEG_SERIES_NUMBER,
          sop_instance_uid=highdicom.UID(),
          instance_number=1,
          manufacturer="uem-ich-jax",
          manufacturer_model_name=model_name,
          software_versions=uem_ich_jax.__version__,
          device_serial_number="none",
          series_description="UEM-ICH hemorrhage segmentation (research use)",
          content_qualification=highdicom.ContentQualificationValues.RESEARCH,
      )
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # highdicom validates the source headers and raises these on bad data.
    raise DicomSegError(f"highdicom rejected the source series: {error}") from error
  try:
    segmentation.save_as(path)
  except OSError as error:
    raise PredictError(f"failed to write {path}: {error}") from error
  return {
      "file": path.name,
      "sop_instance_uid": str(segmentation.SOPInstanceUID),
      "series_instance_uid": str(segmentation.SeriesInstanceUID),
      "referenced_series_uid": volume.provenance.series_uid,
      "segmentation_type": "BINARY",
      "frames": int(segmentation.NumberOfFrames),
      "segments": {
          str(int(item.SegmentNumber)): str(item.SegmentLabel) for item in descriptions
      },
  }
