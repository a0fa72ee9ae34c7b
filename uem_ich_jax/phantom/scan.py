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
    scan_labels: name to 0/1, at least every entry of `SLICE_LABELS`.
    boxes: per slice, float32 (n, 4) boxes (row_min, column_min, row_max,
      column_max) in pixels, min inclusive and max exclusive, one per
      8-connected region of one class on that slice.
    box_classes: per slice, int32 (n,) mask class id of each box.
    hematoma_ml: subtype name to blood volume in mL.
    patient_id: the patient this scan belongs to (several scans may share one).
    scan_id: unique id of this scan.
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
