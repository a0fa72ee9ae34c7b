"""Augmentation of CT slices with their masks and boxes, in numpy.

One affine warp (horizontal flip, rotation, scale about the image centre) moves
the image (bilinear), the mask (nearest) and the boxes together. Brightness and
contrast change the image only, per window channel. Images are float32 model
input in [-1, 1], shaped (..., rows, columns, channels) with the mask
(..., rows, columns), so a slice and a whole scan take the same path.

Boxes are (row_min, column_min, row_max, column_max) in pixel-edge coordinates:
pixel (r, c) covers [r, r + 1) x [c, c + 1), so a box that covers exactly
pixels r0..r1 is (r0, ., r1 + 1, .). A warped box is the bounding box of its
four warped corners, clipped to the image; boxes left with no area are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

import uem_ich_jax
from uem_ich_jax.errors import InputError

# Value warped in from outside the image: -1 is air (the lowest level) in
# every window.
_FILL_VALUE = -1.0


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges the random augmentation draws from; each example draws its own values.

  Attributes:
    flip_probability: chance of a left-right flip.
    max_rotation_deg: rotation angle is uniform in [-max, max] degrees.
    scale_range: zoom factor is uniform in this range (above 1 enlarges).
    max_brightness: offset added to each window channel, uniform in
      [-max, max], in model-input units (the channel spans [-1, 1]).
    contrast_range: each channel is scaled about its mean by a factor uniform
      in this range.
    boxes_from_mask: after a warp, take the boxes from the warped mask (one
      per 8-connected region of each class, as `synthetic_ich` defines them)
      instead of around the warped box corners, which a rotation inflates.
      Only for datasets whose boxes are made from their masks that way.
  """

  flip_probability: float = 0.5
  max_rotation_deg: float = 15.0
  scale_range: tuple[float, float] = (0.9, 1.1)
  max_brightness: float = 0.1
  contrast_range: tuple[float, float] = (0.9, 1.1)
  boxes_from_mask: bool = False


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """The values drawn for one example, and `boxes_from_mask` from the config."""

  flip: bool = False
  rotation_deg: float = 0.0
  scale: float = 1.0
  brightness: np.ndarray | None = None  # (channels,), None for no change.
  contrast: np.ndarray | None = None  # (channels,), None for no change.
  boxes_from_mask: bool = False

  @property
  def is_identity_warp(self) -> bool:
    return not self.flip and self.rotation_deg == 0.0 and self.scale == 1.0


def sample_params(rng: np.random.Generator, config: AugmentConfig, channels: int) -> AugmentParams:
  """Draw one example's augmentation values from `config` with `rng`."""
  return AugmentParams(
      flip=bool(rng.random() < config.flip_probability),
      rotation_deg=float(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)),
      scale=float(rng.uniform(*config.scale_range)),
      brightness=rng.uniform(-config.max_brightness, config.max_brightness, size=channels),
      contrast=rng.uniform(*config.contrast_range, size=channels),
      boxes_from_mask=config.boxes_from_mask,
  )


def warp_matrix(params: AugmentParams, rows: int, columns: int) -> np.ndarray:
  """3x3 map from input to output (row, column) pixel-centre coordinates.

  The flip comes first, then rotation and scale, all about the image centre.
  """
  centre = np.array([(rows - 1) / 2.0, (columns - 1) / 2.0])
  to_centre = np.eye(3)
  to_centre[:2, 2] = -centre
  from_centre = np.eye(3)
  from_centre[:2, 2] = centre
  flip = np.diag([1.0, -1.0 if params.flip else 1.0, 1.0])
  angle = np.deg2rad(params.rotation_deg)
  rotate_scale = np.eye(3)
  rotate_scale[:2, :2] = params.scale * np.array(
      [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
  )
  return from_centre @ rotate_scale @ flip @ to_centre


def _warp_planes(planes: np.ndarray, matrix: np.ndarray, order: int, fill: float) -> np.ndarray:
  """Warp each (rows, columns) plane of `planes` (n, rows, columns)."""
  # scipy pulls each output pixel from input position inverse @ output.
  inverse = np.linalg.inv(matrix)
  out = np.empty_like(planes)
  for index, plane in enumerate(planes):
    out[index] = ndimage.affine_transform(
        plane,
        inverse[:2, :2],
        offset=inverse[:2, 2],
        order=order,
        mode="constant",
        cval=fill,
    )
  return out


def warp_image(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Warp float image (..., rows, columns, channels) bilinearly."""
  *lead, rows, columns, channels = image.shape
  planes = np.moveaxis(image.reshape(-1, rows, columns, channels), -1, 1)
  planes = planes.reshape(-1, rows, columns).astype(np.float32)
  warped = _warp_planes(planes, matrix, order=1, fill=_FILL_VALUE)
  warped = np.moveaxis(warped.reshape(-1, channels, rows, columns), 1, -1)
  return warped.reshape(*lead, rows, columns, channels)


def warp_mask(mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Warp integer mask (..., rows, columns) with nearest-neighbour sampling."""
  *lead, rows, columns = mask.shape
  warped = _warp_planes(mask.reshape(-1, rows, columns), matrix, order=0, fill=0)
  return warped.reshape(*lead, rows, columns)


def warp_boxes(
    boxes: np.ndarray, classes: np.ndarray, matrix: np.ndarray, rows: int, columns: int
) -> tuple[np.ndarray, np.ndarray]:
  """Warp (n, 4) edge-coordinate boxes; returns the kept boxes and their classes."""
  boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
  classes = np.asarray(classes).reshape(-1)
  if boxes.shape[0] == 0:
    return boxes, classes
  r0, c0, r1, c1 = boxes.T
  corners = np.stack(
      [
          np.stack([r0, c0], -1),
          np.stack([r0, c1], -1),
          np.stack([r1, c0], -1),
          np.stack([r1, c1], -1),
      ],
      axis=1,
  )  # (n, 4 corners, 2)
  # The matrix works on pixel centres, which sit half a pixel inside the edges.
  centres = corners - 0.5
  moved = centres @ matrix[:2, :2].T + matrix[:2, 2] + 0.5
  low = moved.min(axis=1)
  high = moved.max(axis=1)
  limit = np.array([rows, columns], dtype=np.float64)
  low = np.clip(low, 0.0, limit)
  high = np.clip(high, 0.0, limit)
  warped = np.concatenate([low, high], axis=-1).astype(np.float32)
  keep = (warped[:, 2] > warped[:, 0]) & (warped[:, 3] > warped[:, 1])
  return warped[keep], classes[keep]


def _boxes_from_slice_mask(
    mask: np.ndarray, spacing: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
  """Return the boxes and classes of one (rows, columns) class-id mask.

  `spacing` is the example's (slice, row, column) spacing in mm; the box rule
  (see `phantom.generate.boxes_from_mask`) is in mm. The warp's zoom is left
  out of the pixel size: the rule is a reader's habit, not an exact size.
  """
  from uem_ich_jax.phantom import generate

  if mask.ndim != 2:
    raise InputError(f"boxes_from_mask needs a (rows, columns) mask per example, got shape {mask.shape}")
  if spacing is None:
    raise InputError("boxes_from_mask needs the example's 'spacing' (mm) to draw boxes by size")
  spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
  if spacing.shape != (3,):
    raise InputError(f"boxes_from_mask needs a (slice, row, column) spacing, got {spacing.tolist()}")
  boxes, classes = generate.boxes_from_mask(mask[None], spacing[1:])
  return boxes[0], classes[0]


def adjust_intensity(image: np.ndarray, brightness: np.ndarray, contrast: np.ndarray) -> np.ndarray:
  """Scale each channel about its mean by `contrast`, add `brightness`, clip to [-1, 1]."""
  axes = tuple(range(image.ndim - 1))
  mean = image.mean(axis=axes, keepdims=True)
  adjusted = (image - mean) * contrast + mean + brightness
  return np.clip(adjusted, -1.0, 1.0).astype(np.float32)


# Positions of BleedLocation-Left and -Right in `uem_ich_jax.CQ500_LABELS`.
_SIDE_LABELS = (
    uem_ich_jax.CQ500_LABELS.index("BleedLocation-Left"),
    uem_ich_jax.CQ500_LABELS.index("BleedLocation-Right"),
)


def apply_augmentation(example: dict[str, Any], params: AugmentParams) -> dict[str, Any]:
  """Apply `params` to the `image`, `mask` and `boxes`/`box_classes` of an example.

  A flip mirrors the patient, so the CQ500 bleed side labels swap. The
  augmented image shows another patient in the same frame, so `affine` and
  the other features pass through unchanged; `mask` and `boxes` are optional.
  """
  out = dict(example)
  if params.flip and "cq500_labels" in example:
    labels = np.array(example["cq500_labels"], copy=True)
    left, right = _SIDE_LABELS
    labels[..., [left, right]] = labels[..., [right, left]]
    out["cq500_labels"] = labels
  image = np.asarray(example["image"], dtype=np.float32)
  rows, columns = image.shape[-3], image.shape[-2]

  if not params.is_identity_warp:
    matrix = warp_matrix(params, rows, columns)
    image = warp_image(image, matrix)
    if "mask" in example:
      out["mask"] = warp_mask(np.asarray(example["mask"]), matrix)
    if "boxes" in example and params.boxes_from_mask and "mask" in out:
      out["boxes"], out["box_classes"] = _boxes_from_slice_mask(
          out["mask"], example.get("spacing")
      )
    elif "boxes" in example:
      out["boxes"], out["box_classes"] = warp_boxes(
          example["boxes"], example["box_classes"], matrix, rows, columns
      )

  if params.brightness is not None and params.contrast is not None:
    image = adjust_intensity(image, params.brightness, params.contrast)
  out["image"] = image
  return out


def random_augment(
    example: dict[str, Any], rng: np.random.Generator, config: AugmentConfig
) -> dict[str, Any]:
  """Draw values from `config` with `rng` and apply them to `example`."""
  channels = np.shape(example["image"])[-1]
  return apply_augmentation(example, sample_params(rng, config, channels))
