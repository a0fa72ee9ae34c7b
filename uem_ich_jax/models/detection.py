"""FCOS detection on the shared stride-4 neck: head, target assignment, losses and decoding.

Boxes are float (row_min, column_min, row_max, column_max) in input-image
pixels, measured on pixel edges: pixel i spans [i, i + 1), so a box over rows
2..5 inclusive is (2, ., 6, .). Class ids 1..K are the BHSD mask ids (1
epidural ... 5 subdural). Class 0 is background in the targets and padding in
the ground truth and in decoded detections.

The feature location (j, i) of a map with stride s sits at pixel
((j + 0.5) * s, (i + 0.5) * s). Its box distances follow FCOS's (l, t, r, b)
order: l = column - column_min, t = row - row_min, r = column_max - column,
b = row_max - row.

Everything here works on static shapes and runs under `jax.jit`. Arrays are NHWC.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# FCOS initialises every head conv from N(0, 0.01) with zero bias.
HEAD_INIT = nnx.initializers.normal(stddev=0.01)

# The exponent of the box branch is capped, so an untrained or diverging head
# gives large but finite distances: exp(12) * stride is over 10^5 pixels at stride 1.
MAX_LOG_DISTANCE = 12.0

# Boxes narrower than this many strides get a widened box for the centerness
# target only (see `_centerness`).
MIN_CENTERNESS_BOX_STRIDES = 2.0

_EPSILON = 1e-7


def _group_count(channels: int, num_groups: int) -> int:
  """Return the largest divisor of `channels` that is at most `num_groups`."""
  for groups in range(min(num_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def _conv3x3(in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(3, 3),
      padding=((1, 1), (1, 1)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=HEAD_INIT,
      bias_init=nnx.initializers.zeros_init(),
      rngs=rngs,
  )


class ConvTower(nnx.Module):
  """`depth` times (conv3x3, GroupNorm, ReLU), with the norm in float32."""

  def __init__(
      self, channels: int, depth: int, num_groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.dtype = dtype
    groups = _group_count(channels, num_groups)
    self.convs = nnx.List([_conv3x3(channels, channels, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norms = nnx.List(
        [
            nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
            for _ in range(depth)
        ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x).astype(jnp.float32))).astype(self.dtype)
    return x


class FCOSHead(nnx.Module):
  """FCOS head for one feature level: class logits, box distances and centerness.

  A class tower and a box tower, each `tower_depth` times (conv3x3, GroupNorm,
  ReLU), read the same map. Class logits and centerness come from the class
  tower (as upstream UEM-ICH does), box distances from the box tower. Classes
  are K independent sigmoids with no background output, so `num_classes` is 5
  where the upstream classifier had 6 outputs. The classifier bias starts at
  -log((1 - p) / p), so every class starts with probability `prior_probability`.
  GroupNorm uses the largest group count that divides the channels and is at
  most `num_groups`.
  """

  def __init__(
      self,
      in_channels: int,
      num_classes: int = 5,
      *,
      tower_depth: int = 4,
      num_groups: int = 32,
      prior_probability: float = 0.01,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if in_channels < 1 or num_classes < 1 or tower_depth < 0 or num_groups < 1:
      raise ValueError(
          f"invalid FCOSHead sizes in_channels={in_channels}, num_classes={num_classes}, "
          f"tower_depth={tower_depth}, num_groups={num_groups}: expected positive sizes and tower_depth >= 0"
      )
    if not 0.0 < prior_probability < 1.0:
      raise ValueError(f"invalid prior_probability={prior_probability}: expected a value in (0, 1)")
    self.dtype = dtype
    self.num_classes = num_classes
    self.class_tower = ConvTower(in_channels, tower_depth, num_groups, dtype=dtype, rngs=rngs)
    self.box_tower = ConvTower(in_channels, tower_depth, num_groups, dtype=dtype, rngs=rngs)
    self.class_logits = _conv3x3(in_channels, num_classes, dtype=dtype, rngs=rngs)
    prior_bias = -math.log((1.0 - prior_probability) / prior_probability)
    self.class_logits.bias[...] = jnp.full((num_classes,), prior_bias, jnp.float32)
    self.box_distances = _conv3x3(in_channels, 4, dtype=dtype, rngs=rngs)
    self.centerness = _conv3x3(in_channels, 1, dtype=dtype, rngs=rngs)
    # FCOS's learned scale of the box exponent, one per feature level.
    self.scale = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, neck: jax.Array, stride: int) -> dict[str, jax.Array]:
    """Run the head on a (N, h, w, C) map of the given stride.

    Returns:
      "class_logits" (N, h, w, K), "ltrb" (N, h, w, 4) distances in input
      pixels, exp(scale * x) * stride, and "centerness_logits" (N, h, w), all
      float32.
    """
    x = neck.astype(self.dtype)
    class_features = self.class_tower(x)
    box_features = self.box_tower(x)
    class_logits = self.class_logits(class_features).astype(jnp.float32)
    centerness_logits = self.centerness(class_features).astype(jnp.float32)[..., 0]
    log_distances = self.scale[...] * self.box_distances(box_features).astype(jnp.float32)
    ltrb = jnp.exp(jnp.minimum(log_distances, MAX_LOG_DISTANCE)) * stride
    return {"class_logits": class_logits, "ltrb": ltrb, "centerness_logits": centerness_logits}


# ---------------------------------------------------------------------------
# Box geometry
# ---------------------------------------------------------------------------


def _area(boxes: jax.Array) -> jax.Array:
  height = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  width = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return height * width


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """Divide, returning 0 where `denominator` is 0, with finite gradients there too."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _intersection_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  top_left = jnp.maximum(a[..., :2], b[..., :2])
  bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
  overlap = jnp.maximum(bottom_right - top_left, 0.0)
  intersection = overlap[..., 0] * overlap[..., 1]
  return intersection, _area(a) + _area(b) - intersection


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Compute the IoU of boxes `a` (..., 4) and `b` (..., 4) elementwise, with broadcasting.

  For the pairwise (n, m) matrix pass `a[:, None]` and `b[None, :]`. A pair
  whose union is empty (two degenerate boxes) has IoU 0.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  intersection, union = _intersection_union(a, b)
  return _safe_divide(intersection, union)


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Compute the generalized IoU of `a` and `b` elementwise, with broadcasting, in [-1, 1].

  GIoU = IoU - (C - union) / C, where C is the area of the smallest box that
  contains both (Rezatofighi et al., CVPR 2019). Pairwise works as in `box_iou`.
  Degenerate terms (empty union or empty C) count as 0.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  intersection, union = _intersection_union(a, b)
  iou = _safe_divide(intersection, union)
  hull_size = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
  hull = jnp.maximum(hull_size[..., 0], 0.0) * jnp.maximum(hull_size[..., 1], 0.0)
  return iou - _safe_divide(hull - union, hull)


def _ltrb_to_box(ltrb: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
  """Turn distances (l, t, r, b) at locations (rows, columns) into boxes."""
  return jnp.stack(
      [rows - ltrb[..., 1], columns - ltrb[..., 0], rows + ltrb[..., 3], columns + ltrb[..., 2]],
      axis=-1,
  )


def _location_grid(feature_size: tuple[int, int], stride: int) -> tuple[jax.Array, jax.Array]:
  """Return the (h, w) pixel rows and columns of the feature locations."""
  height, width = feature_size
  rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) * stride
  columns = (jnp.arange(width, dtype=jnp.float32) + 0.5) * stride
  return jnp.meshgrid(rows, columns, indexing="ij")


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _centerness(boxes: jax.Array, rows: jax.Array, columns: jax.Array, stride: int) -> jax.Array:
  """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each location.

  `boxes` broadcasts against `rows` and `columns`. The box is widened about its
  centre to at least `MIN_CENTERNESS_BOX_STRIDES` strides on each side first.
  Without that, the cell that contains the centre of a box smaller than one
  stride may sit on or outside the box and get centerness 0, which would zero
  its box loss weight and its decoded score.
  """
  half_min = 0.5 * MIN_CENTERNESS_BOX_STRIDES * stride
  centre_row = 0.5 * (boxes[..., 0] + boxes[..., 2])
  centre_column = 0.5 * (boxes[..., 1] + boxes[..., 3])
  half_height = jnp.maximum(0.5 * (boxes[..., 2] - boxes[..., 0]), half_min)
  half_width = jnp.maximum(0.5 * (boxes[..., 3] - boxes[..., 1]), half_min)
  top = jnp.maximum(rows - (centre_row - half_height), 0.0)
  bottom = jnp.maximum(centre_row + half_height - rows, 0.0)
  left = jnp.maximum(columns - (centre_column - half_width), 0.0)
  right = jnp.maximum(centre_column + half_width - columns, 0.0)
  vertical = _safe_divide(jnp.minimum(top, bottom), jnp.maximum(top, bottom))
  horizontal = _safe_divide(jnp.minimum(left, right), jnp.maximum(left, right))
  return jnp.sqrt(vertical * horizontal)


def fcos_targets(
    boxes: jax.Array,
    box_classes: jax.Array,
    feature_size: tuple[int, int],
    stride: int,
    *,
    center_radius: float = 1.5,
) -> dict[str, jax.Array]:
  """Assign padded ground-truth boxes to the locations of one feature map.

  A location is positive for a box when it lies strictly inside the box and
  within `center_radius * stride` of the box centre on both axes (FCOS centre
  sampling, with the sampling region clipped to the box). The cell that contains
  the box centre is positive for the box as well, so a box smaller than one
  stride is never left without a location. Where several boxes claim a
  location the one with the smallest area wins (the first on equal areas).
  Rows with class 0 (padding) and empty boxes never match.

  Args:
    boxes: (N, M, 4) float boxes in input pixels.
    box_classes: (N, M) int class ids, 0 for padding.
    feature_size: (h, w) of the feature map.
    stride: input pixels per feature cell.
    center_radius: the centre sampling radius in strides.

  Returns:
    "labels": (N, h, w) int32, the class of the assigned box, 0 for background.
    "ltrb": (N, h, w, 4) float32 distances (l, t, r, b) to the assigned box,
      0 at background. They are negative at a centre cell that lies outside a
      tiny box.
    "centerness": (N, h, w) float32, 0 at background.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  box_classes = jnp.asarray(box_classes, jnp.int32)
  height, width = feature_size
  rows, columns = _location_grid(feature_size, stride)
  if boxes.shape[1] == 0:
    return {
        "labels": jnp.zeros((boxes.shape[0], height, width), jnp.int32),
        "ltrb": jnp.zeros((boxes.shape[0], height, width, 4), jnp.float32),
        "centerness": jnp.zeros((boxes.shape[0], height, width), jnp.float32),
    }

  # Shapes below: (N, M, h, w) for location-box pairs, (N, M, 1, 1) per box.
  box = boxes[:, :, None, None, :]
  row_min, column_min, row_max, column_max = (box[..., k] for k in range(4))
  real = (box_classes > 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  real = real[:, :, None, None]

  centre_row = 0.5 * (row_min + row_max)
  centre_column = 0.5 * (column_min + column_max)
  radius = center_radius * stride
  in_centre_region = (
      (rows > jnp.maximum(row_min, centre_row - radius))
      & (rows < jnp.minimum(row_max, centre_row + radius))
      & (columns > jnp.maximum(column_min, centre_column - radius))
      & (columns < jnp.minimum(column_max, centre_column + radius))
  )
  centre_cell_row = jnp.floor(centre_row / stride)
  centre_cell_column = jnp.floor(centre_column / stride)
  cell_rows, cell_columns = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
  )
  # A centre outside the map selects no cell here.
  is_centre_cell = (cell_rows == centre_cell_row) & (cell_columns == centre_cell_column)
  candidate = real & (in_centre_region | is_centre_cell)

  area = (row_max - row_min) * (column_max - column_min)
  candidate_area = jnp.where(candidate, area, jnp.inf)
  winner = jnp.argmin(candidate_area, axis=1)  # (N, h, w)
  positive = jnp.any(candidate, axis=1)

  assigned = jnp.take_along_axis(boxes, winner.reshape(winner.shape[0], -1, 1), axis=1)
  assigned = assigned.reshape(*winner.shape, 4)
  classes = jnp.take_along_axis(box_classes, winner.reshape(winner.shape[0], -1), axis=1)
  labels = jnp.where(positive, classes.reshape(winner.shape), 0)

  ltrb = jnp.stack(
      [
          columns - assigned[..., 1],
          rows - assigned[..., 0],
          assigned[..., 3] - columns,
          assigned[..., 2] - rows,
      ],
      axis=-1,
  )
  ltrb = jnp.where(positive[..., None], ltrb, 0.0)
  centerness = jnp.where(positive, _centerness(assigned, rows, columns, stride), 0.0)
  return {"labels": labels.astype(jnp.int32), "ltrb": ltrb, "centerness": centerness}


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def _sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
  """Elementwise sigmoid focal loss (Lin et al., 2017); alpha < 0 turns the weighting off."""
  probabilities = jax.nn.sigmoid(logits)
  cross_entropy = jnp.logaddexp(0.0, logits) - logits * targets
  p_true = probabilities * targets + (1.0 - probabilities) * (1.0 - targets)
  loss = cross_entropy * (1.0 - p_true) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
  return loss


def fcos_loss(
    outputs: dict[str, jax.Array],
    targets: dict[str, jax.Array],
    valid: jax.Array,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the FCOS loss of `FCOSHead` outputs against `fcos_targets`.

  Terms, each over valid examples only:
    class: sigmoid focal loss summed over every location and class, divided
      by max(1, number of positives);
    box: 1 - GIoU at positives, weighted by the centerness target and
      divided by the sum of those weights;
    centerness: binary cross-entropy against the centerness target, averaged
      over positives.
  The box and centerness terms are 0 when a batch has no positives, and the
  gradients stay finite.

  Args:
    outputs: "class_logits" (N, h, w, K), "ltrb" (N, h, w, 4),
      "centerness_logits" (N, h, w).
    targets: "labels", "ltrb" and "centerness" from `fcos_targets`.
    valid: (N,) bool, False for padded examples.
    alpha: focal weight of positives; negative turns the weighting off.
    gamma: focal exponent.

  Returns:
    (total, terms): the float32 sum of the three terms, and a dict with
    "class", "box", "centerness" and "num_positive".
  """
  class_logits = outputs["class_logits"].astype(jnp.float32)
  num_classes = class_logits.shape[-1]
  labels = targets["labels"]
  valid_locations = jnp.broadcast_to(jnp.asarray(valid, bool)[:, None, None], labels.shape)
  positive = (labels > 0) & valid_locations
  num_positive = jnp.sum(positive).astype(jnp.float32)
  normaliser = jnp.maximum(num_positive, 1.0)

  one_hot = jax.nn.one_hot(labels - 1, num_classes, dtype=jnp.float32)
  focal = _sigmoid_focal_loss(class_logits, one_hot, alpha, gamma)
  class_loss = jnp.sum(jnp.where(valid_locations[..., None], focal, 0.0)) / normaliser

  # Unused locations get a unit box on both sides, so the GIoU and its
  # gradient stay finite there before the mask removes them.
  unit = jnp.ones((), jnp.float32)
  predicted_ltrb = jnp.where(positive[..., None], outputs["ltrb"].astype(jnp.float32), unit)
  target_ltrb = jnp.where(positive[..., None], targets["ltrb"].astype(jnp.float32), unit)
  zeros = jnp.zeros(labels.shape, jnp.float32)
  giou = generalized_box_iou(
      _ltrb_to_box(predicted_ltrb, zeros, zeros), _ltrb_to_box(target_ltrb, zeros, zeros)
  )
  weights = jnp.where(positive, targets["centerness"].astype(jnp.float32), 0.0)
  box_loss = jnp.sum(weights * (1.0 - giou)) / jnp.maximum(jnp.sum(weights), _EPSILON)

  centerness_logits = outputs["centerness_logits"].astype(jnp.float32)
  centerness_target = targets["centerness"].astype(jnp.float32)
  binary_cross_entropy = jnp.logaddexp(0.0, centerness_logits) - centerness_logits * centerness_target
  centerness_loss = jnp.sum(jnp.where(positive, binary_cross_entropy, 0.0)) / normaliser

  total = class_loss + box_loss + centerness_loss
  terms = {
      "class": class_loss,
      "box": box_loss,
      "centerness": centerness_loss,
      "num_positive": num_positive,
  }
  return total, terms


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _class_wise_nms(
    boxes: jax.Array, classes: jax.Array, keep: jax.Array, iou_threshold: float
) -> jax.Array:
  """Greedy NMS per class over candidates sorted by descending score.

  Args:
    boxes: (k, 4); classes: (k,); keep: (k,) bool, the candidates still in play.

  Returns:
    (k,) bool, the candidates that survive.
  """
  count = boxes.shape[0]
  overlaps = box_iou(boxes[:, None], boxes[None, :]) > iou_threshold
  same_class = classes[:, None] == classes[None, :]
  later = jnp.arange(count)[None, :] > jnp.arange(count)[:, None]
  suppresses = overlaps & same_class & later

  def suppress_from(index: int, keep: jax.Array) -> jax.Array:
    return keep & ~(keep[index] & suppresses[index])

  return jax.lax.fori_loop(0, count, suppress_from, keep)


def decode(
    outputs: dict[str, jax.Array],
    stride: int,
    *,
    score_threshold: float = 0.05,
    pre_nms_top_k: int = 100,
    iou_threshold: float = 0.5,
    max_detections: int = 20,
    image_size: tuple[int, int] | None = None,
) -> dict[str, jax.Array]:
  """Turn `FCOSHead` outputs into at most `max_detections` boxes per image.

  The score of (location, class) is sqrt(sigmoid(class logit) *
  sigmoid(centerness logit)). The boxes of the `pre_nms_top_k` best pairs
  above `score_threshold` are clipped to the image, `image_size` (rows,
  columns) or else the feature size times the stride. They go through greedy
  NMS within each class, and the best `max_detections` survivors are returned
  by descending score.

  Returns:
    "boxes" (N, D, 4) float32, "scores" (N, D) float32, "classes" (N, D)
    int32 in 1..K and "valid" (N, D) bool, with D = `max_detections`. Rows
    where "valid" is False are padding, with zero box, score and class.
  """
  class_logits = outputs["class_logits"].astype(jnp.float32)
  batch, height, width, num_classes = class_logits.shape
  rows, columns = _location_grid((height, width), stride)
  boxes = _ltrb_to_box(outputs["ltrb"].astype(jnp.float32), rows, columns)
  if image_size is None:
    image_size = (height * stride, width * stride)
  boxes = jnp.clip(boxes, 0.0, jnp.array(tuple(image_size) * 2, jnp.float32))

  centerness = jax.nn.sigmoid(outputs["centerness_logits"].astype(jnp.float32))
  scores = jnp.sqrt(jax.nn.sigmoid(class_logits) * centerness[..., None])
  scores = scores.reshape(batch, height * width * num_classes)
  num_candidates = min(pre_nms_top_k, height * width * num_classes)
  candidate_scores, flat_index = jax.lax.top_k(scores, num_candidates)
  location = flat_index // num_classes
  candidate_classes = (flat_index % num_classes + 1).astype(jnp.int32)
  candidate_boxes = jnp.take_along_axis(
      boxes.reshape(batch, height * width, 4), location[..., None], axis=1
  )
  keep = candidate_scores > score_threshold
  keep = jax.vmap(_class_wise_nms, in_axes=(0, 0, 0, None))(
      candidate_boxes, candidate_classes, keep, iou_threshold
  )

  num_selected = min(max_detections, num_candidates)
  # Scores are >= 0, so marking dropped candidates -1 ranks every kept one first.
  ranked, order = jax.lax.top_k(jnp.where(keep, candidate_scores, -1.0), num_selected)
  selected = ranked >= 0.0
  selected_boxes = jnp.take_along_axis(candidate_boxes, order[..., None], axis=1)
  selected_classes = jnp.take_along_axis(candidate_classes, order, axis=1)
  padding = max_detections - num_selected
  result = {
      "boxes": jnp.where(selected[..., None], selected_boxes, 0.0),
      "scores": jnp.where(selected, ranked, 0.0),
      "classes": jnp.where(selected, selected_classes, 0).astype(jnp.int32),
      "valid": selected,
  }
  if padding:
    result = {
        key: jnp.pad(value, [(0, 0), (0, padding)] + [(0, 0)] * (value.ndim - 2))
        for key, value in result.items()
    }
  return result
