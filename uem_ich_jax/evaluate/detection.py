"""Box average precision per subtype, computed as COCO does, on the host with numpy.

Boxes are (row_min, column_min, row_max, column_max) in pixels, on pixel edges,
as `uem_ich_jax.models.detection` returns them. Class ids are 1..K (the BHSD
mask ids), and class 0 marks padding rows in both detections and ground
truth, which are dropped. So `decode` outputs and padded batches can be passed
as they are.

Matching and AP follow pycocotools' `COCOeval` for boxes with one area range
("all"), no crowd boxes and no limit on detections per image. Per image and
class, each detection in descending score order takes the unmatched
ground-truth box of highest IoU, if that IoU is at least the threshold. AP is
the mean of the interpolated precision at the 101 recall points 0, 0.01, ..., 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uem_ich_jax.errors import InputError

# COCO's IoU thresholds for mAP@[.5:.95].
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


class DetectionInputError(InputError):
  """Detections or ground truth that the box metrics cannot use. The message names the image."""


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _fields(entry: Any, names: tuple[str, ...], source: str, index: int) -> list[Any]:
  """Read `names` from a mapping (by key) or a sequence (by position)."""
  if isinstance(entry, Mapping):
    values = []
    for name in names:
      if name not in entry and name == "classes" and "box_classes" in entry:
        name = "box_classes"
      if name not in entry:
        raise DetectionInputError(
            f"{source} of image {index} is missing {name!r}; found keys {sorted(entry)}"
        )
      values.append(entry[name])
    return values
  if isinstance(entry, Sequence) and len(entry) == len(names):
    return list(entry)
  raise DetectionInputError(
      f"{source} of image {index} must be a mapping or a sequence of ({', '.join(names)}), "
      f"got {type(entry).__name__}"
  )


def _check_image(
    boxes: Any, classes: Any, scores: Any | None, num_classes: int, source: str, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Validate one image's arrays and drop its padding rows (class 0)."""
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise DetectionInputError(f"{source} boxes of image {index} must have shape (n, 4), got {boxes.shape}")

  count = boxes.shape[0]
  classes = np.asarray(classes)
  if classes.shape != (count,):
    raise DetectionInputError(
        f"{source} classes of image {index} must have shape ({count},) to match the boxes, "
        f"got {classes.shape}"
    )
  integral = np.issubdtype(classes.dtype, np.integer) or (
      np.issubdtype(classes.dtype, np.floating) and bool(np.all(np.mod(classes, 1) == 0))
  )
  if count and not integral:
    raise DetectionInputError(f"{source} classes of image {index} must be integer ids, got {classes}")
  classes = classes.astype(np.int64)

  out_of_range = (classes < 0) | (classes > num_classes)
  if out_of_range.any():
    raise DetectionInputError(
        f"{source} class {classes[out_of_range][0]} of image {index} is out of range: "
        f"expected 1..{num_classes}, or 0 for padding"
    )

  if scores is not None:
    scores = np.asarray(scores, np.float64)
    if scores.shape != (count,):
      raise DetectionInputError(
          f"{source} scores of image {index} must have shape ({count},) to match the boxes, "
          f"got {scores.shape}"
      )

  real = classes > 0
  boxes, classes = boxes[real], classes[real]
  if scores is not None:
    scores = scores[real]
    if np.isnan(scores).any():
      raise DetectionInputError(f"{source} scores of image {index} contain NaN")

  if not np.isfinite(boxes).all():
    raise DetectionInputError(f"{source} boxes of image {index} contain NaN or infinite coordinates")
  inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
  if inverted.any():
    raise DetectionInputError(
        f"{source} box {boxes[inverted][0].tolist()} of image {index} has max < min, "
        "but boxes must be (row_min, column_min, row_max, column_max)"
    )
  return boxes, classes, scores


# ---------------------------------------------------------------------------
# Matching and AP
# ---------------------------------------------------------------------------


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Compute the (n, m) IoU of boxes `a` (n, 4) and `b` (m, 4), 0 where the union is empty."""
  top_left = np.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
  overlap = np.clip(bottom_right - top_left, 0.0, None)
  intersection = overlap[..., 0] * overlap[..., 1]
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  union = area_a[:, None] + area_b[None, :] - intersection
  return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _match_image(iou: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
  """Flag each detection (rows of `iou`, in descending score order) as a true positive.

  Returns:
    (num_thresholds, n) bool.
  """
  num_detections, num_truth = iou.shape
  true_positive = np.zeros((len(thresholds), num_detections), bool)
  for t, threshold in enumerate(thresholds):
    matched = np.zeros(num_truth, bool)
    for d in range(num_detections):
      # pycocotools starts its best IoU at min(threshold, 1 - 1e-10).
      candidates = np.where(matched, -1.0, iou[d])
      best = int(np.argmax(candidates)) if num_truth else -1
      if best >= 0 and candidates[best] >= min(threshold, 1.0 - 1e-10):
        matched[best] = True
        true_positive[t, d] = True
  return true_positive


def _interpolated_ap(true_positive: np.ndarray, num_truth: int) -> float:
  """COCO's 101-point interpolated AP of detections in descending score order."""
  if true_positive.size == 0:
    return 0.0
  true_count = np.cumsum(true_positive)
  false_count = np.cumsum(~true_positive)
  recall = true_count / num_truth
  precision = true_count / np.maximum(true_count + false_count, np.finfo(np.float64).eps)
  # The precision envelope: the best precision at any higher recall.
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  index = np.searchsorted(recall, RECALL_POINTS, side="left")
  sampled = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0.0)
  return float(np.mean(sampled))


def _mean_defined(values: Sequence[float | None]) -> float | None:
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None


def _threshold_key(threshold: float) -> str:
  return f"{threshold:.2f}"


def average_precision(
    detections: Sequence[Any],
    ground_truth: Sequence[Any],
    *,
    num_classes: int = 5,
    iou_thresholds: Sequence[float] = (0.5,),
) -> dict[str, Any]:
  """Compute box AP per class and mAP over the classes that have ground truth.

  Args:
    detections: per image, (boxes (n, 4), scores (n,), classes (n,)) or a
      mapping with those keys. Class 0 rows are padding and are dropped.
    ground_truth: per image, (boxes (m, 4), classes (m,)) or a mapping with
      "boxes" and "classes" (or "box_classes"). Class 0 rows are padding.
    num_classes: K, so class ids run 1..K.
    iou_thresholds: the IoU thresholds to evaluate, each in (0, 1]. Pass
      `COCO_IOU_THRESHOLDS` for mAP@[.5:.95].

  Returns:
    A dict with
      "per_class": {class id: {"ap": {threshold key: AP or None}, "ap50":
        AP at 0.5 or None, "ap50_95": mean AP over the COCO thresholds or
        None, "num_ground_truth": int, "num_detections": int}};
      "map": {threshold key: mean AP over classes with ground truth, or None};
      "map50": mAP at 0.5, None unless 0.5 was evaluated;
      "map50_95": mAP@[.5:.95], None unless all ten COCO thresholds were evaluated;
      "iou_thresholds": the thresholds, as floats.
    Threshold keys are the thresholds with two decimals ("0.50"). A class
    without ground truth has AP None and is left out of every mean.

  Raises:
    DetectionInputError: on mismatched image counts, bad shapes, class ids
      outside 0..K, NaN scores or NaN, infinite or inverted boxes.
  """
  if num_classes < 1:
    raise DetectionInputError(f"invalid num_classes={num_classes}: expected at least 1")
  thresholds = [float(t) for t in iou_thresholds]
  if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
    raise DetectionInputError(f"invalid iou_thresholds={list(iou_thresholds)}: expected values in (0, 1]")
  if len(detections) != len(ground_truth):
    raise DetectionInputError(
        f"detections cover {len(detections)} images but ground truth covers {len(ground_truth)}"
    )

  # Per class: scores, true-positive flags (thresholds, n) and ground-truth count.
  scores_by_class: dict[int, list[np.ndarray]] = {c: [] for c in range(1, num_classes + 1)}
  matches_by_class: dict[int, list[np.ndarray]] = {c: [] for c in range(1, num_classes + 1)}
  truth_count = dict.fromkeys(range(1, num_classes + 1), 0)
  for index, (detection, truth) in enumerate(zip(detections, ground_truth)):
    boxes, scores, classes = _fields(detection, ("boxes", "scores", "classes"), "detections", index)
    boxes, classes, scores = _check_image(boxes, classes, scores, num_classes, "detections", index)
    truth_boxes, truth_classes = _fields(truth, ("boxes", "classes"), "ground truth", index)
    truth_boxes, truth_classes, _ = _check_image(
        truth_boxes, truth_classes, None, num_classes, "ground truth", index
    )
    for class_id in range(1, num_classes + 1):
      own_truth = truth_boxes[truth_classes == class_id]
      truth_count[class_id] += len(own_truth)
      own = classes == class_id
      if not own.any():
        continue
      order = np.argsort(-scores[own], kind="mergesort")
      own_boxes, own_scores = boxes[own][order], scores[own][order]
      scores_by_class[class_id].append(own_scores)
      matches_by_class[class_id].append(
          _match_image(_pairwise_iou(own_boxes, own_truth), thresholds)
      )

  per_class = {}
  for class_id in range(1, num_classes + 1):
    num_truth = truth_count[class_id]
    class_scores = np.concatenate(scores_by_class[class_id] or [np.zeros(0)])
    ap: dict[str, float | None] = {}
    if num_truth == 0:
      ap = {_threshold_key(t): None for t in thresholds}
    else:
      matches = np.concatenate(matches_by_class[class_id] or [np.zeros((len(thresholds), 0), bool)], axis=1)
      order = np.argsort(-class_scores, kind="mergesort")
      for t, threshold in enumerate(thresholds):
        ap[_threshold_key(threshold)] = _interpolated_ap(matches[t, order], num_truth)
    per_class[class_id] = {
        "ap": ap,
        "ap50": ap.get(_threshold_key(0.5)),
        "ap50_95": _coco_mean(ap, num_truth),
        "num_ground_truth": num_truth,
        "num_detections": int(class_scores.size),
    }

  mean_ap = {
      _threshold_key(t): _mean_defined([per_class[c]["ap"][_threshold_key(t)] for c in per_class])
      for t in thresholds
  }
  return {
      "per_class": per_class,
      "map": mean_ap,
      "map50": mean_ap.get(_threshold_key(0.5)),
      "map50_95": _mean_defined([per_class[c]["ap50_95"] for c in per_class]),
      "iou_thresholds": thresholds,
  }


def _coco_mean(ap: Mapping[str, float | None], num_truth: int) -> float | None:
  """Mean AP over the ten COCO thresholds, None unless all were evaluated and defined."""
  keys = [_threshold_key(t) for t in COCO_IOU_THRESHOLDS]
  if num_truth == 0 or any(ap.get(key) is None for key in keys):
    return None
  return float(np.mean([ap[key] for key in keys]))
