"""Tests of box average precision: hand-computed cases, input checks and pycocotools parity."""

import contextlib
import io

import numpy as np
import pytest

from uem_ich_jax.errors import InputError
from uem_ich_jax.evaluate.detection import COCO_IOU_THRESHOLDS
from uem_ich_jax.evaluate.detection import average_precision

BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [20.0, 20.0, 30.0, 40.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def _detections(boxes, scores, classes):
  return (np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(classes))


def _truth(boxes, classes):
  return (np.array(boxes, np.float32).reshape(-1, 4), np.array(classes))


def test_ap_perfect_detections():
  detections = _detections([BOX_A, BOX_B], [0.9, 0.8], [1, 2])
  result = average_precision([detections], [_truth([BOX_A, BOX_B], [1, 2])])
  assert result["per_class"][1]["ap50"] == pytest.approx(1.0)
  assert result["per_class"][2]["ap50"] == pytest.approx(1.0)
  assert result["map50"] == pytest.approx(1.0)


def test_ap_one_miss():
  # Recall stops at 1/2 with precision 1: 51 of the 101 recall points (0 .. 0.5).
  result = average_precision([_detections([BOX_A], [0.9], [1])], [_truth([BOX_A, BOX_B], [1, 1])])
  assert result["per_class"][1]["ap50"] == pytest.approx(51 / 101)
  assert result["per_class"][1]["num_ground_truth"] == 2


def test_ap_false_positive_ranked_first():
  # Precision is 1/2 at recall 1, so the envelope is 1/2 everywhere.
  result = average_precision([_detections([FAR, BOX_A], [0.9, 0.8], [1, 1])], [_truth([BOX_A], [1])])
  assert result["per_class"][1]["ap50"] == pytest.approx(0.5)


def test_ap_false_positive_ranked_last():
  result = average_precision([_detections([FAR, BOX_A], [0.3, 0.8], [1, 1])], [_truth([BOX_A], [1])])
  assert result["per_class"][1]["ap50"] == pytest.approx(1.0)


def test_ap_duplicate_counts_as_false_positive():
  # Ranked: A (TP), copy of A (FP), B (TP). Precision envelope 1 up to recall
  # 1/2 (51 points) and 2/3 above it (50 points).
  detections = _detections([BOX_A, BOX_A, BOX_B], [0.9, 0.8, 0.7], [1, 1, 1])
  result = average_precision([detections], [_truth([BOX_A, BOX_B], [1, 1])])
  assert result["per_class"][1]["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
  assert result["per_class"][1]["num_detections"] == 3


def test_ap_class_without_ground_truth_is_none():
  detections = _detections([BOX_A, BOX_B, FAR], [0.9, 0.8, 0.7], [1, 2, 3])
  result = average_precision([detections], [_truth([BOX_A], [1])])
  per_class = result["per_class"]
  assert per_class[1]["ap50"] == pytest.approx(1.0)
  for class_id in (2, 3, 4, 5):
    assert per_class[class_id]["ap50"] is None
    assert per_class[class_id]["num_ground_truth"] == 0
  # Class 2's detection is wrong but the class has no ground truth, so it is
  # left out of the mean rather than counted as 0.
  assert result["map50"] == pytest.approx(1.0)


def test_ap_wrong_class_misses():
  result = average_precision([_detections([BOX_A], [0.9], [2])], [_truth([BOX_A], [1])])
  assert result["per_class"][1]["ap50"] == 0.0
  assert result["per_class"][2]["ap50"] is None
  assert result["map50"] == 0.0


def test_ap_matches_across_images_by_score():
  # Image 0: TP (0.9) and FP (0.6). Image 1: TP (0.7). Ranked TP, TP, FP.
  detections = [_detections([BOX_A, FAR], [0.9, 0.6], [1, 1]), _detections([BOX_B], [0.7], [1])]
  ground_truth = [_truth([BOX_A], [1]), _truth([BOX_B], [1])]
  assert average_precision(detections, ground_truth)["map50"] == pytest.approx(1.0)
  # Swap the scores so that the false positive ranks second: TP, FP, TP.
  detections[0] = _detections([BOX_A, FAR], [0.9, 0.8], [1, 1])
  expected = (51 + 50 * 2 / 3) / 101
  assert average_precision(detections, ground_truth)["map50"] == pytest.approx(expected)


def test_ap_over_coco_thresholds():
  # IoU 0.62 is a hit at 0.50, 0.55 and 0.60 only.
  detections = _detections([[0.0, 0.0, 10.0, 6.2]], [0.9], [4])
  result = average_precision([detections], [_truth([BOX_A], [4])], iou_thresholds=COCO_IOU_THRESHOLDS)
  ap = result["per_class"][4]["ap"]
  assert list(ap) == [f"{t:.2f}" for t in COCO_IOU_THRESHOLDS]
  assert [ap[key] for key in ap] == pytest.approx([1.0] * 3 + [0.0] * 7)
  assert result["map50_95"] == pytest.approx(0.3)
  assert result["map50"] == pytest.approx(1.0)


def test_ap_map50_95_needs_all_thresholds():
  detections = [_detections([BOX_A], [0.9], [1])]
  ground_truth = [_truth([BOX_A], [1])]
  result = average_precision(detections, ground_truth, iou_thresholds=(0.5, 0.75))
  assert result["map"] == {"0.50": pytest.approx(1.0), "0.75": pytest.approx(1.0)}
  assert result["map50_95"] is None
  result = average_precision(detections, ground_truth, iou_thresholds=(0.75,))
  assert result["map50"] is None


def test_ap_padding_rows_dropped():
  detections = {
      "boxes": np.array([BOX_A, [0.0] * 4, [np.nan] * 4], np.float32),
      "scores": np.array([0.9, 0.0, np.nan], np.float32),
      "classes": np.array([1, 0, 0]),
  }
  ground_truth = {"boxes": np.array([BOX_A, [0.0] * 4], np.float32), "box_classes": np.array([1, 0])}
  result = average_precision([detections], [ground_truth])
  assert result["map50"] == pytest.approx(1.0)
  assert result["per_class"][1]["num_detections"] == 1
  assert result["per_class"][1]["num_ground_truth"] == 1


def test_ap_no_detections_is_zero():
  result = average_precision([_detections([], [], [])], [_truth([BOX_A], [3])])
  assert result["per_class"][3]["ap50"] == 0.0
  assert result["map50"] == 0.0


def test_ap_no_ground_truth_anywhere_is_none():
  result = average_precision([_detections([BOX_A], [0.9], [1])], [_truth([], [])])
  assert result["map50"] is None


@pytest.mark.parametrize(
    "detections, ground_truth, message",
    [
        ([_detections([BOX_A], [np.nan], [1])], [_truth([BOX_A], [1])], "NaN"),
        ([_detections([BOX_A], [0.5], [6])], [_truth([BOX_A], [1])], "out of range"),
        ([_detections([BOX_A], [0.5], [1])], [_truth([BOX_A], [-1])], "out of range"),
        ([_detections([BOX_A], [0.5, 0.4], [1])], [_truth([BOX_A], [1])], "scores"),
        ([(np.zeros((2, 3)), np.zeros(2), np.ones(2, int))], [_truth([BOX_A], [1])], r"\(n, 4\)"),
        ([_detections([BOX_A], [0.5], [1])], [_truth([BOX_A], [1, 2])], "classes"),
        ([_detections([[5.0, 0.0, 1.0, 10.0]], [0.5], [1])], [_truth([BOX_A], [1])], "max < min"),
        ([_detections([BOX_A], [0.5], [1])], [_truth([[0.0, 0.0, np.inf, 1.0]], [1])], "infinite"),
        ([_detections([BOX_A], [0.5], [1])] * 2, [_truth([BOX_A], [1])], "2 images"),
        ([{"boxes": np.zeros((0, 4))}], [_truth([BOX_A], [1])], "missing 'scores'"),
        ([_detections([BOX_A], [0.5], [1.5])], [_truth([BOX_A], [1])], "integer ids"),
        ([_detections([BOX_A], [0.5], ["a"])], [_truth([BOX_A], [1])], "integer ids"),
    ],
)
def test_ap_rejects_bad_input(detections, ground_truth, message):
  with pytest.raises(InputError, match=message):
    average_precision(detections, ground_truth)


@pytest.mark.parametrize("thresholds", [(), (0.0,), (1.5,)])
def test_ap_rejects_bad_thresholds(thresholds):
  with pytest.raises(InputError, match="iou_thresholds"):
    average_precision([], [], iou_thresholds=thresholds)


# ----------------------------------------------------------- pycocotools ---


def _random_case(rng, num_images, num_classes):
  """Ground truth and noisy detections: jittered copies, duplicates and strays."""
  detections, ground_truth = [], []
  for _ in range(num_images):
    count = int(rng.integers(0, 5))
    corners = rng.uniform(0, 80, (count, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(3, 40, (count, 2))], axis=1)
    classes = rng.integers(1, num_classes + 1, count)
    ground_truth.append((boxes, classes))

    copies = rng.integers(0, 3, count)
    jittered = np.repeat(boxes, copies, axis=0) + rng.normal(0, 3, (copies.sum(), 4))
    jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    copy_classes = np.repeat(classes, copies)
    flip = rng.random(copy_classes.shape) < 0.15
    copy_classes[flip] = rng.integers(1, num_classes + 1, flip.sum())
    strays = int(rng.integers(0, 3))
    stray_corners = rng.uniform(0, 80, (strays, 2))
    stray_boxes = np.concatenate([stray_corners, stray_corners + rng.uniform(3, 40, (strays, 2))], axis=1)
    detected_boxes = np.concatenate([jittered, stray_boxes])
    detected_classes = np.concatenate([copy_classes, rng.integers(1, num_classes + 1, strays)])
    scores = rng.random(len(detected_boxes))
    detections.append((detected_boxes, scores, detected_classes))
  return detections, ground_truth


def _coco_ap(detections, ground_truth, num_classes):
  """Per-class AP from pycocotools over all COCO thresholds, None where a class has no ground truth."""
  coco = pytest.importorskip("pycocotools.coco")
  cocoeval = pytest.importorskip("pycocotools.cocoeval")

  def to_xywh(box):
    return [float(box[1]), float(box[0]), float(box[3] - box[1]), float(box[2] - box[0])]

  images, annotations, results = [], [], []
  for image_id, ((boxes, classes), (det_boxes, scores, det_classes)) in enumerate(
      zip(ground_truth, detections), start=1
  ):
    images.append({"id": image_id})
    for box, class_id in zip(boxes, classes):
      xywh = to_xywh(box)
      annotations.append(
          {
              "id": len(annotations) + 1,
              "image_id": image_id,
              "category_id": int(class_id),
              "bbox": xywh,
              "area": xywh[2] * xywh[3],
              "iscrowd": 0,
          }
      )
    for box, score, class_id in zip(det_boxes, scores, det_classes):
      results.append(
          {"image_id": image_id, "category_id": int(class_id), "bbox": to_xywh(box), "score": float(score)}
      )
  truth = coco.COCO()
  truth.dataset = {
      "images": images,
      "annotations": annotations,
      "categories": [{"id": c} for c in range(1, num_classes + 1)],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    truth.createIndex()
    evaluation = cocoeval.COCOeval(truth, truth.loadRes(results), "bbox")
    evaluation.params.iouThrs = np.array(COCO_IOU_THRESHOLDS)
    evaluation.params.areaRng = [[0.0, 1e10]]
    evaluation.params.areaRngLbl = ["all"]
    evaluation.params.maxDets = [10_000]
    evaluation.evaluate()
    evaluation.accumulate()
  # precision: (thresholds, recall points, classes, area ranges, max dets), -1 where undefined.
  precision = evaluation.eval["precision"][:, :, :, 0, 0]
  per_class = {}
  for k in range(num_classes):
    if (precision[:, :, k] < 0).all():
      per_class[k + 1] = None
    else:
      per_class[k + 1] = precision[:, :, k].mean(axis=1)
  return per_class


@pytest.mark.parametrize("seed", range(6))
def test_ap_matches_pycocotools(seed):
  pytest.importorskip("pycocotools")
  num_classes = 3
  rng = np.random.default_rng(seed)
  detections, ground_truth = _random_case(rng, num_images=8, num_classes=num_classes)
  expected = _coco_ap(detections, ground_truth, num_classes)
  result = average_precision(
      detections, ground_truth, num_classes=num_classes, iou_thresholds=COCO_IOU_THRESHOLDS
  )
  for class_id in range(1, num_classes + 1):
    ap = result["per_class"][class_id]["ap"]
    if expected[class_id] is None:
      assert all(value is None for value in ap.values())
      continue
    np.testing.assert_allclose([ap[key] for key in ap], expected[class_id], atol=1e-9)
