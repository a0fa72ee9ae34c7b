"""Scan-level segmentation metrics: 3D Dice per scan and hematoma volume error.

Slices are regrouped into scans (by scan id, ordered by slice index) and every
metric is computed over whole 3D volumes, voxels pooled within a scan, then
averaged over scans. Scans whose truth and prediction are both empty have no
Dice; they are counted and left out of every mean, so they never inflate it.
A scan with an empty truth and a non-empty prediction scores Dice 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import uem_ich_jax
from uem_ich_jax.errors import InputError

# Relative volume error is averaged over scans whose true hematoma volume is
# above this (mL). Below it the ratio is dominated by a few voxels.
DEFAULT_MIN_VOLUME_ML = 1.0


def dice(prediction: np.ndarray, truth: np.ndarray) -> float | None:
  """Return the Dice coefficient of two boolean arrays, or None when both are empty."""
  prediction = np.asarray(prediction, bool)
  truth = np.asarray(truth, bool)
  total = int(prediction.sum()) + int(truth.sum())
  if total == 0:
    return None
  return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def group_scans(
    slice_index: np.ndarray, scan_ids: np.ndarray | None = None
) -> list[np.ndarray]:
  """Return, per scan, the row indices of its slices ordered by slice index.

  With `scan_ids`, rows are grouped by id (bytes or text). Without them, the
  rows must be in storage order (one process reading folds in order, as
  `trainer.collect` does), and a new scan starts wherever the slice index
  does not increase.

  Raises:
    InputError: when a scan lists the same slice index twice.
  """
  slice_index = np.asarray(slice_index).reshape(-1)
  if scan_ids is None:
    # Only right for rows in storage order; the trainer passes scan ids.
    starts = np.flatnonzero(np.diff(slice_index) <= 0) + 1
    groups = np.split(np.arange(slice_index.size), starts)
  else:
    scan_ids = np.asarray(scan_ids).reshape(-1)
    if scan_ids.shape != slice_index.shape:
      raise InputError(
          f"scan_ids has {scan_ids.size} rows but slice_index has {slice_index.size}"
      )
    _, inverse = np.unique(scan_ids, return_inverse=True)
    groups = [np.flatnonzero(inverse == scan) for scan in range(inverse.max(initial=-1) + 1)]
  scans = []
  for rows in groups:
    if rows.size == 0:
      continue
    rows = rows[np.argsort(slice_index[rows], kind="stable")]
    ordered = slice_index[rows]
    repeated = ordered[1:][np.diff(ordered) == 0]
    if repeated.size:
      raise InputError(
          f"a scan lists slice index {int(repeated[0])} twice; are slices of different scans"
          " mixed under one scan id?"
      )
    scans.append(rows)
  return scans


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _dice_summary(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
  """Mean per-scan Dice over (prediction, truth) volumes, with the empty cases counted."""
  per_scan, empty_both, false_positive = [], 0, 0
  for prediction, truth in pairs:
    value = dice(prediction, truth)
    if value is None:
      empty_both += 1
      continue
    if not truth.any():
      false_positive += 1
    per_scan.append(value)
  return {
      "mean": _mean(per_scan),
      "n_scored": len(per_scan),
      "n_empty_both": empty_both,
      "n_empty_truth_with_prediction": false_positive,
  }


def scan_metrics(
    predicted_masks: np.ndarray,
    true_masks: np.ndarray,
    spacing: np.ndarray,
    scans: Sequence[np.ndarray],
    *,
    num_classes: int = 6,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
) -> dict[str, Any]:
  """Compute 3D Dice, per-class 3D Dice and hematoma volume error over scans.

  Args:
    predicted_masks: (slices, H, W) integer class ids (0 = background).
    true_masks: (slices, H, W) integer class ids.
    spacing: (slices, 3) voxel spacing in mm (slice, row, column); each scan
      uses the spacing of its first slice.
    scans: row indices of each scan in slice order, as `group_scans` returns.
    num_classes: class ids 0..num_classes-1; per-class Dice covers 1..K-1.
      With 2 classes (binary masks) only the foreground Dice is reported.
    min_volume_ml: scans with a true volume at or below this are left out of
      the relative volume error (the absolute error still counts them).

  Returns:
    A JSON-ready dict: `dice_3d` (foreground = any hemorrhage class, mean over
    scored scans, with counts), `dice_3d_per_class`, `dice_pooled` (every
    voxel of every scan as one volume), `volume` (mean absolute error in mL
    over all scans, mean relative error over scans above `min_volume_ml`) and
    per-scan `true_ml`/`predicted_ml`.
  """
  predicted_masks = np.asarray(predicted_masks)
  true_masks = np.asarray(true_masks)
  spacing = np.asarray(spacing, np.float64).reshape(-1, 3)
  if predicted_masks.shape != true_masks.shape or predicted_masks.ndim != 3:
    raise InputError(
        f"predicted masks {predicted_masks.shape} and true masks {true_masks.shape} must both be"
        " (slices, H, W)"
    )
  if spacing.shape[0] != true_masks.shape[0]:
    raise InputError(f"spacing has {spacing.shape[0]} rows for {true_masks.shape[0]} slices")
  if not scans:
    raise InputError("no scans to evaluate; the evaluated split is empty")

  foreground_pairs = []
  class_pairs: dict[int, list] = {c: [] for c in range(1, num_classes)}
  true_ml, predicted_ml = [], []
  pooled_intersection = pooled_total = 0
  for rows in scans:
    prediction, truth = predicted_masks[rows], true_masks[rows]
    voxel_ml = float(np.prod(spacing[rows[0]])) / 1000.0
    predicted_foreground, true_foreground = prediction > 0, truth > 0
    foreground_pairs.append((predicted_foreground, true_foreground))
    if num_classes > 2:
      for c in class_pairs:
        class_pairs[c].append((prediction == c, truth == c))
    pooled_intersection += int(np.logical_and(predicted_foreground, true_foreground).sum())
    pooled_total += int(predicted_foreground.sum()) + int(true_foreground.sum())
    true_ml.append(voxel_ml * int(true_foreground.sum()))
    predicted_ml.append(voxel_ml * int(predicted_foreground.sum()))

  true_ml_array, predicted_ml_array = np.asarray(true_ml), np.asarray(predicted_ml)
  absolute = np.abs(predicted_ml_array - true_ml_array)
  large = true_ml_array > min_volume_ml
  per_class = {}
  if num_classes > 2:
    names = (None,) + tuple(uem_ich_jax.SUBTYPES)
    for c, pairs in class_pairs.items():
      name = names[c] if num_classes == len(names) else f"class{c}"
      per_class[name] = _dice_summary(pairs)
  return {
      "dice_3d": _dice_summary(foreground_pairs),
      "dice_3d_per_class": per_class,
      "dice_pooled": 2.0 * pooled_intersection / pooled_total if pooled_total else None,
      "volume": {
          "mean_absolute_error_ml": float(absolute.mean()),
          "mean_relative_error": _mean((absolute[large] / true_ml_array[large]).tolist()),
          "n_relative": int(large.sum()),
          "min_volume_ml": float(min_volume_ml),
      },
      "n_scans": len(scans),
      "true_ml": [float(v) for v in true_ml],
      "predicted_ml": [float(v) for v in predicted_ml],
  }
