"""Tests of the FCOS head, its target assignment, loss and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uem_ich_jax.evaluate.detection import COCO_IOU_THRESHOLDS
from uem_ich_jax.evaluate.detection import average_precision
from uem_ich_jax.models import detection
from uem_ich_jax.models.detection import FCOSHead
from uem_ich_jax.models.detection import box_iou
from uem_ich_jax.models.detection import decode
from uem_ich_jax.models.detection import fcos_loss
from uem_ich_jax.models.detection import fcos_targets
from uem_ich_jax.models.detection import generalized_box_iou

STRIDE = 4
FEATURE_SIZE = (16, 16)  # a 64 px image


def _targets(boxes, classes, **kwargs):
  boxes = jnp.asarray(boxes, jnp.float32)
  classes = jnp.asarray(classes, jnp.int32)
  assign = jax.jit(fcos_targets, static_argnames=("feature_size", "stride", "center_radius"))
  targets = assign(boxes, classes, feature_size=FEATURE_SIZE, stride=STRIDE, **kwargs)
  return jax.tree.map(np.asarray, targets)


def _location(row_cell, column_cell):
  return ((row_cell + 0.5) * STRIDE, (column_cell + 0.5) * STRIDE)


# ----------------------------------------------------------------- Head ---


def test_head_output_shapes_and_prior():
  head = FCOSHead(24, num_classes=5, tower_depth=2, rngs=nnx.Rngs(0))
  neck = jax.random.normal(jax.random.key(1), (2, 8, 10, 24))
  outputs = head(neck, STRIDE)
  assert outputs["class_logits"].shape == (2, 8, 10, 5)
  assert outputs["ltrb"].shape == (2, 8, 10, 4)
  assert outputs["centerness_logits"].shape == (2, 8, 10)
  for value in outputs.values():
    assert value.dtype == jnp.float32
  assert bool(jnp.all(outputs["ltrb"] > 0))
  # With N(0, 0.01) weights the logits stay near the prior bias.
  probabilities = jax.nn.sigmoid(outputs["class_logits"])
  np.testing.assert_allclose(float(jnp.mean(probabilities)), 0.01, rtol=0.2)


@pytest.mark.parametrize("channels, expected_groups", [(256, 32), (24, 24), (48, 24), (36, 18), (7, 7)])
def test_head_group_count_divides_channels(channels, expected_groups):
  assert detection._group_count(channels, 32) == expected_groups


def test_head_towers_use_group_count():
  head = nnx.eval_shape(lambda: FCOSHead(48, tower_depth=2, num_groups=32, rngs=nnx.Rngs(0)))
  for tower in (head.class_tower, head.box_tower):
    assert [norm.num_groups for norm in tower.norms] == [24, 24]


def test_head_bfloat16_compute_returns_float32():
  head = FCOSHead(16, tower_depth=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  outputs = head(jnp.ones((1, 4, 4, 16)), STRIDE)
  for value in outputs.values():
    assert value.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(value)))


# -------------------------------------------------------------- Targets ---


def test_targets_centre_sampling_region():
  # Rows 10..30 (centre 20), columns 10..40 (centre 25), radius 1.5 * 4 = 6.
  targets = _targets([[[10, 10, 30, 40]]], [[2]])
  positive_rows, positive_columns = np.nonzero(targets["labels"][0])
  assert set(positive_rows.tolist()) == {4, 5}
  assert set(positive_columns.tolist()) == {5, 6, 7}
  assert set(targets["labels"][0][targets["labels"][0] > 0].tolist()) == {2}


def test_targets_ltrb_rebuilds_box():
  box = np.array([9.0, 13.0, 37.0, 29.0])
  targets = _targets([[box]], [[1]])
  for row_cell, column_cell in zip(*np.nonzero(targets["labels"][0])):
    row, column = _location(row_cell, column_cell)
    left, top, right, bottom = targets["ltrb"][0, row_cell, column_cell]
    np.testing.assert_allclose([row - top, column - left, row + bottom, column + right], box, atol=1e-5)
  assert np.all(targets["ltrb"][0][targets["labels"][0] == 0] == 0)


def test_targets_tiny_box_keeps_centre_cell():
  # 1.5 x 1 px, smaller than the stride and off every location.
  targets = _targets([[[21.0, 33.0, 22.5, 34.0]]], [[3]])
  labels = targets["labels"][0]
  assert np.count_nonzero(labels) == 1
  assert labels[5, 8] == 3  # floor(21.75 / 4), floor(33.5 / 4)
  assert targets["centerness"][0, 5, 8] > 0.2
  row, column = _location(5, 8)
  left, top, right, bottom = targets["ltrb"][0, 5, 8]
  np.testing.assert_allclose([row - top, column - left, row + bottom, column + right], [21, 33, 22.5, 34])


def test_targets_overlap_smallest_area_wins():
  large = [4.0, 4.0, 60.0, 60.0]
  small = [26.0, 26.0, 38.0, 38.0]
  targets = _targets([[large, small]], [[5, 2]], center_radius=100.0)
  labels = targets["labels"][0]
  # Locations inside the small box belong to it, the others to the large one.
  for row_cell in range(16):
    for column_cell in range(16):
      row, column = _location(row_cell, column_cell)
      inside_small = 26 < row < 38 and 26 < column < 38
      inside_large = 4 < row < 60 and 4 < column < 60
      expected = 0
      if inside_large:
        expected = 5
      if inside_small:
        expected = 2
      assert labels[row_cell, column_cell] == expected, (row_cell, column_cell)
  # Order of the boxes does not matter.
  swapped = _targets([[small, large]], [[2, 5]], center_radius=100.0)
  np.testing.assert_array_equal(swapped["labels"], targets["labels"])


def test_targets_padding_rows_never_match():
  whole_image = [0.0, 0.0, 64.0, 64.0]
  targets = _targets([[whole_image, [10, 10, 20, 20]], [whole_image, whole_image]], [[0, 4], [0, 0]])
  assert set(np.unique(targets["labels"][0]).tolist()) == {0, 4}
  assert np.count_nonzero(targets["labels"][1]) == 0
  assert np.all(targets["ltrb"][1] == 0)
  assert np.all(targets["centerness"][1] == 0)


@pytest.mark.parametrize(
    "box, centre_cell",
    [([0.0, 0.0, 6.0, 64.0], (0, 8)), ([56.0, 58.0, 64.0, 64.0], (15, 15)), ([0.0, 0.0, 64.0, 64.0], (8, 8))],
)
def test_targets_box_on_border(box, centre_cell):
  targets = _targets([[box]], [[1]])
  labels = targets["labels"][0]
  assert labels[centre_cell] == 1
  positive = labels > 0
  assert np.all(targets["ltrb"][0][positive] > 0)
  assert np.all(targets["centerness"][0][positive] > 0)
  assert np.all(targets["centerness"][0][positive] <= 1)


def test_targets_without_box_rows():
  targets = fcos_targets(jnp.zeros((2, 0, 4)), jnp.zeros((2, 0), jnp.int32), FEATURE_SIZE, STRIDE)
  assert targets["labels"].shape == (2, *FEATURE_SIZE)
  assert targets["ltrb"].shape == (2, *FEATURE_SIZE, 4)
  assert int(jnp.count_nonzero(targets["labels"])) == 0


def test_targets_centre_outside_map_selects_no_cell():
  targets = _targets([[[60.0, 70.0, 62.0, 72.0]]], [[1]])
  assert np.count_nonzero(targets["labels"]) == 0


# ----------------------------------------------------------------- GIoU ---


def test_giou_known_values():
  a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
  b = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 2.0, 1.0, 3.0], [1.0, 1.0, 3.0, 3.0]])
  np.testing.assert_allclose(box_iou(a, b), [1.0, 0.0, 1 / 7], rtol=1e-6)
  np.testing.assert_allclose(generalized_box_iou(a, b), [1.0, -1 / 3, 1 / 7 - 2 / 9], rtol=1e-6)


def test_giou_degenerate_boxes_are_finite():
  point = jnp.zeros((1, 4))
  assert float(box_iou(point, point)[0]) == 0.0
  assert float(generalized_box_iou(point, point)[0]) == 0.0
  gradient = jax.grad(lambda x: jnp.sum(generalized_box_iou(x, point)))(point)
  assert bool(jnp.all(jnp.isfinite(gradient)))


def test_iou_pairwise_by_broadcasting():
  rng = np.random.default_rng(0)
  corners = rng.uniform(0, 50, (7, 2))
  a = np.concatenate([corners, corners + rng.uniform(1, 20, (7, 2))], axis=1)
  b = a[::-1][:5] + 1.5
  pairwise = np.asarray(box_iou(a[:, None], b[None, :]))
  assert pairwise.shape == (7, 5)
  for i in range(7):
    for j in range(5):
      top, left = np.maximum(a[i, :2], b[j, :2])
      bottom, right = np.minimum(a[i, 2:], b[j, 2:])
      intersection = max(bottom - top, 0) * max(right - left, 0)
      union = np.prod(a[i, 2:] - a[i, :2]) + np.prod(b[j, 2:] - b[j, :2]) - intersection
      np.testing.assert_allclose(pairwise[i, j], intersection / union, rtol=1e-5, atol=1e-6)
  giou = np.asarray(generalized_box_iou(a[:, None], b[None, :]))
  assert np.all(giou <= pairwise + 1e-6)
  assert np.all(giou >= -1.0)


# ----------------------------------------------------------------- Loss ---


def _small_head(channels=16):
  return FCOSHead(channels, tower_depth=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_loss_matches_optax(alpha):
  logits = jnp.linspace(-12.0, 12.0, 25).reshape(5, 5)
  targets = (jnp.arange(25).reshape(5, 5) % 3 == 0).astype(jnp.float32)
  expected = optax.sigmoid_focal_loss(logits, targets, alpha=None if alpha < 0 else alpha, gamma=2.0)
  actual = detection._sigmoid_focal_loss(logits, targets, alpha, 2.0)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_loss_finite_without_positives():
  head = _small_head()
  neck = jax.random.normal(jax.random.key(0), (2, *FEATURE_SIZE, 16))
  targets = fcos_targets(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), FEATURE_SIZE, STRIDE)

  def loss_fn(head):
    return fcos_loss(head(neck, STRIDE), targets, jnp.array([True, True]))

  (total, terms), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(head)
  assert terms["num_positive"] == 0
  assert float(terms["box"]) == 0.0
  assert float(terms["centerness"]) == 0.0
  assert np.isfinite(float(total))
  assert float(total) > 0
  for leaf in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_loss_ignores_invalid_examples():
  head = _small_head()
  neck = jax.random.normal(jax.random.key(0), (2, *FEATURE_SIZE, 16))
  boxes = jnp.array([[[8.0, 8.0, 40.0, 40.0]], [[20.0, 20.0, 50.0, 60.0]]])
  targets = fcos_targets(boxes, jnp.array([[1], [2]]), FEATURE_SIZE, STRIDE)
  outputs = nnx.jit(lambda head: head(neck, STRIDE))(head)
  _, both = fcos_loss(outputs, targets, jnp.array([True, True]))
  _, first = fcos_loss(outputs, targets, jnp.array([True, False]))
  only_first = jax.tree.map(lambda x: x[:1], (outputs, targets))
  _, alone = fcos_loss(*only_first, jnp.array([True]))
  assert float(first["num_positive"]) < float(both["num_positive"])
  for key in ("class", "box", "centerness", "num_positive"):
    np.testing.assert_allclose(float(first[key]), float(alone[key]), rtol=1e-5)


def test_loss_minimal_at_perfect_boxes():
  boxes = jnp.array([[[8.0, 8.0, 40.0, 40.0], [44.0, 10.0, 60.0, 30.0]]])
  targets = fcos_targets(boxes, jnp.array([[1, 4]]), FEATURE_SIZE, STRIDE)
  perfect = _perfect_outputs(targets)
  _, terms = fcos_loss(perfect, targets, jnp.array([True]))
  assert float(terms["box"]) < 1e-5
  worse = dict(perfect, ltrb=perfect["ltrb"] * 1.3)
  _, worse_terms = fcos_loss(worse, targets, jnp.array([True]))
  assert float(worse_terms["box"]) > float(terms["box"]) + 1e-3


def test_head_overfits_fixed_neck():
  channels = 16
  head = FCOSHead(channels, tower_depth=2, rngs=nnx.Rngs(0))
  neck = jax.random.normal(jax.random.key(3), (2, *FEATURE_SIZE, channels))
  boxes = np.array(
      [[[8.0, 8.0, 30.0, 34.0], [40.0, 36.0, 58.0, 60.0]], [[20.0, 12.0, 44.0, 28.0], [0.0] * 4]],
      np.float32,
  )
  classes = np.array([[1, 5], [3, 0]], np.int32)
  targets = fcos_targets(jnp.asarray(boxes), jnp.asarray(classes), FEATURE_SIZE, STRIDE)
  valid = jnp.array([True, True])
  optimizer = nnx.Optimizer(head, optax.adam(1e-2), wrt=nnx.Param)
  graph, state = nnx.split((head, optimizer))

  @jax.jit
  def train_step(state):
    head, optimizer = nnx.merge(graph, state)

    def loss_fn(head):
      return fcos_loss(head(neck, STRIDE), targets, valid)

    (_, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(head)
    optimizer.update(head, grads)
    return nnx.state((head, optimizer)), terms

  history = []
  for _ in range(80):
    state, terms = train_step(state)
    history.append(jax.tree.map(float, terms))
  first, last = history[0], history[-1]
  assert all(np.isfinite(list(terms.values())).all() for terms in history)
  assert last["class"] < first["class"] / 50
  assert last["box"] < first["box"] / 5
  # Soft centerness targets leave a BCE floor (their entropy), so the total
  # cannot fall as far as the other two terms.
  total = [terms["class"] + terms["box"] + terms["centerness"] for terms in (first, last)]
  assert total[1] < total[0] / 3

  head, _ = nnx.merge(graph, state)
  decoded = jax.tree.map(np.asarray, jax.jit(decode, static_argnums=1)(head(neck, STRIDE), STRIDE))
  detections = [(decoded["boxes"][i], decoded["scores"][i], decoded["classes"][i]) for i in range(2)]
  result = average_precision(detections, [(boxes[i], classes[i]) for i in range(2)])
  assert result["map50"] == pytest.approx(1.0)


# --------------------------------------------------------------- Decode ---


def _perfect_outputs(targets, num_classes=5):
  """Outputs that agree exactly with `targets`: confident classes, exact boxes."""
  labels = targets["labels"]
  one_hot = jax.nn.one_hot(labels - 1, num_classes)
  centerness = jnp.clip(targets["centerness"], 1e-4, 1 - 1e-4)
  return {
      "class_logits": jnp.where(one_hot > 0, 12.0, -12.0),
      "ltrb": jnp.asarray(targets["ltrb"]),
      "centerness_logits": jnp.log(centerness) - jnp.log1p(-centerness),
  }


def test_decode_perfect_outputs_give_ground_truth():
  boxes = np.array(
      [
          [[8.0, 8.0, 40.0, 40.0], [44.0, 10.0, 60.0, 30.0], [21.0, 49.0, 22.5, 50.0], [0.0] * 4],
          [[0.0, 0.0, 64.0, 20.0], [30.0, 30.0, 34.0, 60.0], [0.0] * 4, [0.0] * 4],
      ],
      np.float32,
  )
  classes = np.array([[1, 4, 2, 0], [5, 5, 0, 0]], np.int32)
  targets = fcos_targets(jnp.asarray(boxes), jnp.asarray(classes), FEATURE_SIZE, STRIDE)
  decoded = jax.jit(decode, static_argnums=1)(_perfect_outputs(targets), STRIDE)
  decoded = jax.tree.map(np.asarray, decoded)
  assert decoded["boxes"].shape == (2, 20, 4)
  for image in range(2):
    valid = decoded["valid"][image]
    real = classes[image] > 0
    assert valid.sum() == real.sum()
    found = sorted(zip(decoded["classes"][image][valid].tolist(), decoded["boxes"][image][valid].tolist()))
    expected = sorted(zip(classes[image][real].tolist(), boxes[image][real].tolist()))
    for (found_class, found_box), (expected_class, expected_box) in zip(found, expected):
      assert found_class == expected_class
      np.testing.assert_allclose(found_box, expected_box, atol=1e-4)
    assert np.all(decoded["classes"][image][~valid] == 0)
    assert np.all(decoded["scores"][image][~valid] == 0)
    assert np.all(np.diff(decoded["scores"][image][valid]) <= 0)

  detections = [
      (decoded["boxes"][i], decoded["scores"][i], decoded["classes"][i]) for i in range(2)
  ]
  ground_truth = [(boxes[i], classes[i]) for i in range(2)]
  result = average_precision(detections, ground_truth, iou_thresholds=COCO_IOU_THRESHOLDS)
  assert result["map50"] == pytest.approx(1.0)
  assert result["map50_95"] == pytest.approx(1.0)
  assert result["per_class"][3]["ap50"] is None


def _outputs_with_candidates(candidates, size=(4, 4), num_classes=5):
  """Outputs with background everywhere except `candidates` of (cell, class, logit, box)."""
  class_logits = np.full((1, *size, num_classes), -20.0, np.float32)
  ltrb = np.ones((1, *size, 4), np.float32)
  for (row_cell, column_cell), class_id, logit, box in candidates:
    class_logits[0, row_cell, column_cell, class_id - 1] = logit
    row, column = _location(row_cell, column_cell)
    ltrb[0, row_cell, column_cell] = [column - box[1], row - box[0], box[3] - column, box[2] - row]
  return {
      "class_logits": jnp.asarray(class_logits),
      "ltrb": jnp.asarray(ltrb),
      "centerness_logits": jnp.full((1, *size), 20.0),
  }


def test_nms_removes_duplicate_keeps_other_class():
  box = [2.0, 2.0, 12.0, 12.0]
  near_copy = [2.5, 2.0, 12.0, 12.5]
  outputs = _outputs_with_candidates(
      [((1, 1), 2, 5.0, box), ((1, 2), 2, 4.0, near_copy), ((2, 1), 4, 3.0, near_copy)]
  )
  decoded = jax.tree.map(np.asarray, decode(outputs, STRIDE, max_detections=5))
  assert decoded["valid"][0].tolist() == [True, True, False, False, False]
  assert decoded["classes"][0, :2].tolist() == [2, 4]
  np.testing.assert_allclose(decoded["boxes"][0, 0], box, atol=1e-5)
  expected_scores = np.sqrt(jax.nn.sigmoid(np.array([5.0, 3.0])))
  np.testing.assert_allclose(decoded["scores"][0, :2], expected_scores, rtol=1e-5)


def test_nms_keeps_same_class_below_iou_threshold():
  outputs = _outputs_with_candidates(
      [((1, 1), 2, 5.0, [0.0, 0.0, 10.0, 10.0]), ((2, 2), 2, 4.0, [5.0, 5.0, 15.0, 15.0])]
  )
  decoded = decode(outputs, STRIDE, max_detections=5)
  assert int(jnp.sum(decoded["valid"])) == 2


def test_decode_clips_to_image_and_applies_threshold():
  outputs = _outputs_with_candidates(
      [((0, 0), 1, 5.0, [-10.0, -5.0, 8.0, 30.0]), ((3, 3), 3, -8.0, [12.0, 12.0, 16.0, 16.0])]
  )
  decoded = jax.tree.map(np.asarray, decode(outputs, STRIDE, score_threshold=0.1))
  assert decoded["valid"][0].sum() == 1
  np.testing.assert_allclose(decoded["boxes"][0, 0], [0.0, 0.0, 8.0, 16.0])
  cropped = decode(outputs, STRIDE, score_threshold=0.1, image_size=(6, 14))
  np.testing.assert_allclose(cropped["boxes"][0, 0], [0.0, 0.0, 6.0, 14.0])


def test_decode_pads_when_few_candidates():
  outputs = _outputs_with_candidates([((0, 0), 1, 5.0, [0.0, 0.0, 4.0, 4.0])], size=(2, 2), num_classes=2)
  decoded = decode(outputs, STRIDE, pre_nms_top_k=3, max_detections=6)
  assert decoded["boxes"].shape == (1, 6, 4)
  assert decoded["valid"][0].tolist() == [True] + [False] * 5

