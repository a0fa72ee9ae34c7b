"""The synthetic scan type the phantom generator returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from uem_ich_jax.ct.volume import CTVolume


@dataclasses.dataclass(frozen=True)
class PhantomScan:
  """One synthetic head CT with its ground truth.

  Attributes:
    volume: the scan in HU with its geometry (a `CTVolume`).
    mask: uint8 (slice, row, column) with the BHSD class ids: 0 background,
      1 epidural, 2 intraparenchymal, 3 intraventricular, 4 subarachnoid,
      5 subdural.
    slice_labels: uint8 (slice, 6) in the order of `uem_ich_jax.SLICE_LABELS`.
    scan_labels: name to 0/1: every entry of `uem_ich_jax.SLICE_LABELS` and of
      `uem_ich_jax.CQ500_LABELS` (see `uem_ich_jax.phantom.generate` for the
      rules).
    boxes: per slice, float32 (n, 4) boxes (row_min, column_min, row_max,
      column_max) in pixels, min inclusive and max exclusive, one per
      8-connected region of one class on that slice.
    box_classes: per slice, int32 (n,) mask class id of each box.
    hematoma_ml: subtype name to blood volume in mL; a chronic subdural
      collection counts as subdural.
    patient_id: the patient this scan belongs to (several scans may share one).
    scan_id: unique id of this scan.
    bleed_ml_left, bleed_ml_right: blood of every class (chronic included) on
      the patient's left and right of the head's own midsagittal plane, mL.
      A voxel's side is that of the hemisphere it belongs to before any
      midline shift, so blood pushed over the skull's midline keeps its side.
    bleed_side: "left", "right", "bilateral" or "none", from those volumes
      with the rule of `uem_ich_jax.clinical.side_from_ml`.
    midline_shift_mm: maximum displacement of the septum pellucidum from the
      midsagittal plane, patient mm; 0.0 without mass effect.
    midline_shift_toward: side the midline moved to ("left", "right", or
      "none" without a shift).
    fracture: "none", "calvarial" or "other" (skull base, orbital or sinus
      wall).
    fracture_mask: bool (slice, row, column), voxels of bone that the
      fracture gap replaced completely.
    chronic_ml: volume of the chronic (hypodense) subdural collection in the
      mask (class 5), mL; 0.0 without one.
  """

  volume: CTVolume
  mask: np.ndarray
  slice_labels: np.ndarray
  scan_labels: dict[str, int]
  boxes: tuple[np.ndarray, ...]
  box_classes: tuple[np.ndarray, ...]
  hematoma_ml: dict[str, float]
  patient_id: str
  scan_id: str
  bleed_ml_left: float
  bleed_ml_right: float
  bleed_side: str
  midline_shift_mm: float
  midline_shift_toward: str
  fracture: str
  fracture_mask: np.ndarray
  chronic_ml: float
