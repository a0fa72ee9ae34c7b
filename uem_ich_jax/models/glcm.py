"""Differentiable grey-level co-occurrence (GLCM) texture features.

The features follow scikit-image's `graycomatrix(..., symmetric=True,
normed=True)` followed by `graycoprops` (checked against scikit-image 0.26).
Each offset (distance d, angle a in degrees) pairs pixel (r, c) with pixel
(r + round(sin(a) * d), c + round(cos(a) * d)), which is the offset that
scikit-image's counting loop applies. Pairs are counted in both orders, so the
matrix is symmetric and its two marginals are the same distribution.

Values are mapped to level units q = (x - lo) / (hi - lo) * (levels - 1) with
(lo, hi) = `value_range`. On an integer image with value_range=(0, levels - 1),
q is the grey level itself.

- contrast, dissimilarity, homogeneity and correlation are expectations over
  the pixel pairs, computed from the image and its shifted copy. They need no
  clipping or binning, are differentiable almost everywhere (dissimilarity has
  a kink where q1 = q2), and on an integer image they equal scikit-image's
  values.
- ASM is the sum of squares of a soft joint histogram with `levels` bins, and
  energy = sqrt(ASM). Each q is clipped to [0, levels - 1] and split between
  its two nearest levels by linear interpolation (a triangular kernel), so on
  an integer image the soft histogram is the hard one. The gradient is zero
  for clipped values and has kinks at integer q. On continuous images the soft
  histogram is smoother than the histogram of the rounded image, so its
  energy is mostly lower. tests/test_glcm.py measures the largest gap to
  scikit-image's energy of the rounded image on 32x32 images. It is 0.004 on
  uniform noise. On noise smoothed with a Gaussian of sigma 4 it is 0.115 at
  8 levels and 0.060 at 16 levels.

Borders: only pairs whose two pixels both lie inside the image count, as in
scikit-image, so an offset longer than the image has no pairs.

Region: with `region`, the pair (p, p + offset) counts with weight
region(p) * region(p + offset), so a 0/1 region keeps only pairs that lie
entirely inside it. An offset with no pair of nonzero weight returns what
scikit-image returns for an all-zero matrix: 0 for every feature except
correlation, which is 1. Values and gradients stay finite there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from uem_ich_jax.errors import InputError

FEATURE_NAMES = ("contrast", "dissimilarity", "homogeneity", "correlation", "ASM", "energy")

# scikit-image treats a standard deviation below 1e-15 as zero and returns a
# correlation of 1. That threshold is below float32 rounding of the mean, so
# here a variance below this many squared level units counts as zero. A
# non-constant integer image over n pairs has variance of at least about
# 1 / (2 n), far above it for any image size this project uses.
CORRELATION_VARIANCE_FLOOR = 1e-10


def _round_half_away(value: float) -> int:
  """Round as C's `round` does (half away from zero), which scikit-image's loop uses."""
  return int(math.copysign(math.floor(abs(value) + 0.5), value))


def offsets(
    distances: Sequence[int] = (1, 2, 4), angles: Sequence[float] = (0, 45, 90, 135)
) -> tuple[tuple[int, int], ...]:
  """Return the (row, column) pixel offsets of each (distance, angle), distance-major.

  Offset i * len(angles) + j belongs to distances[i] and angles[j] (degrees).
  45 degrees gives (1, 1) at distance 2 and (3, 3) at distance 4, as in
  scikit-image.
  """
  _check_offsets(distances, angles)
  result = []
  for distance in distances:
    for angle in angles:
      radians = math.radians(angle)
      result.append(
          (_round_half_away(math.sin(radians) * distance), _round_half_away(math.cos(radians) * distance))
      )
  return tuple(result)


def _check_offsets(distances: Sequence[int], angles: Sequence[float]) -> None:
  if len(distances) == 0 or len(angles) == 0:
    raise InputError(f"distances {distances!r} and angles {angles!r} must both be non-empty")
  for distance in distances:
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 1:
      raise InputError(f"distance {distance!r} is invalid, expected a positive integer number of pixels")


def _check_arguments(image: jax.Array, levels: int, value_range: tuple[float, float]) -> None:
  if image.ndim < 2:
    raise InputError(f"image shape {image.shape} is invalid, expected (..., H, W)")
  if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
    raise InputError(f"levels {levels!r} is invalid, expected an integer of at least 2")
  lo, hi = value_range
  if not hi > lo:
    raise InputError(f"value_range {value_range!r} is invalid, expected (lo, hi) with hi > lo")


def _pair_slices(size: int, step: int) -> tuple[slice, slice]:
  """Return the slices of the first and second pixel of the pairs along one axis, both inside the image."""
  start = max(0, -step)
  stop = max(start, min(size, size - step))
  return slice(start, stop), slice(start + step, stop + step)


def _split_levels(q: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
  """Split each q between its two nearest levels, lower and lower + 1.

  Returns the lower level (int32, at most levels - 2) and the weight of the
  upper one in [0, 1]. q is clipped to [0, levels - 1] first, so q = levels - 1
  puts all its weight on the top level.
  """
  clipped = jnp.clip(q, 0.0, levels - 1.0)
  lower = jnp.clip(jnp.floor(jax.lax.stop_gradient(clipped)), 0, levels - 2)
  return lower.astype(jnp.int32), clipped - lower


def _soft_histogram(
    q_1: jax.Array, q_2: jax.Array, pair_weight: jax.Array, levels: int
) -> jax.Array:
  """Sum the soft counts C[k, l] of the pairs, first pixel at level k, into (..., levels, levels).

  With linear interpolation each pair touches at most four bins: (lower_1 + a,
  lower_2 + b) for a, b in {0, 1}. A single segment sum collects the four
  weights of each pair on the (levels - 1)^2 grid of lower-level pairs, and
  shifted copies of the four grids add up to C. This costs O(pairs), where an
  einsum of dense soft assignments costs O(pairs * levels^2) and measured
  several times slower.
  """
  lower_1, upper_1 = _split_levels(q_1, levels)
  lower_2, upper_2 = _split_levels(q_2, levels)
  leading = q_1.shape[:-2]
  histograms = math.prod(leading)
  cells = levels - 1
  histogram_index = jnp.arange(histograms, dtype=jnp.int32).reshape(leading + (1, 1))
  segment = (histogram_index * cells + lower_1) * cells + lower_2
  lower_weight_1 = 1.0 - upper_1
  lower_weight_2 = 1.0 - upper_2
  corners = jnp.stack(
      [
          lower_weight_1 * lower_weight_2,
          lower_weight_1 * upper_2,
          upper_1 * lower_weight_2,
          upper_1 * upper_2,
      ],
      axis=-1,
  ) * pair_weight[..., None]
  grids = jax.ops.segment_sum(
      corners.reshape(-1, 4), segment.reshape(-1), num_segments=histograms * cells * cells
  ).reshape(leading + (cells, cells, 4))
  keep = [(0, 0)] * len(leading)
  counts = jnp.pad(grids[..., 0], keep + [(0, 1), (0, 1)])
  counts += jnp.pad(grids[..., 1], keep + [(0, 1), (1, 0)])
  counts += jnp.pad(grids[..., 2], keep + [(1, 0), (0, 1)])
  counts += jnp.pad(grids[..., 3], keep + [(1, 0), (1, 0)])
  return counts


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """Divide, giving 0 where the denominator is 0, with finite gradients there too."""
  nonzero = denominator > 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def _pair_features(
    q_1: jax.Array, q_2: jax.Array, pair_weight: jax.Array, levels: int
) -> dict[str, jax.Array]:
  """Compute the features of the weighted pairs (q_1, q_2), all (..., H, W), reducing over H and W."""
  total = jnp.sum(pair_weight, axis=(-2, -1))

  def expect(values: jax.Array) -> jax.Array:
    return _safe_divide(jnp.sum(pair_weight * values, axis=(-2, -1)), total)

  difference = q_1 - q_2
  features = {
      "contrast": expect(difference**2),
      "dissimilarity": expect(jnp.abs(difference)),
      "homogeneity": expect(1.0 / (1.0 + difference**2)),
  }

  # Both orders of each pair count, so the marginal is the mix of q_1 and q_2.
  mean = 0.5 * (expect(q_1) + expect(q_2))
  centred_1 = q_1 - mean[..., None, None]
  centred_2 = q_2 - mean[..., None, None]
  variance = 0.5 * (expect(centred_1**2) + expect(centred_2**2))
  covariance = expect(centred_1 * centred_2)
  flat = variance < CORRELATION_VARIANCE_FLOOR
  features["correlation"] = jnp.where(flat, 1.0, covariance / jnp.where(flat, 1.0, variance))

  # C[k, l] counts one order of each pair, so the symmetric histogram is (C + C^T) / (2 N).
  counts = _soft_histogram(q_1, q_2, pair_weight, levels)
  symmetric = counts + jnp.swapaxes(counts, -1, -2)
  histogram = _safe_divide(symmetric, 2.0 * total[..., None, None])
  asm = jnp.sum(histogram**2, axis=(-2, -1))
  features["ASM"] = asm
  features["energy"] = jnp.where(asm > 0, jnp.sqrt(jnp.where(asm > 0, asm, 1.0)), 0.0)
  return features


def glcm_features(
    image: jax.Array,
    distances: Sequence[int] = (1, 2, 4),
    angles: Sequence[float] = (0, 45, 90, 135),
    levels: int = 16,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    region: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Compute scikit-image's GLCM properties of each (..., H, W) image, differentiably.

  Args:
    image: (..., H, W) real values. Integer input is cast to float32, and a
      floating input keeps its dtype.
    distances: positive pixel distances.
    angles: angles in degrees, 0 pointing along +column and 90 along +row.
    levels: number of grey levels of the soft histogram.
    value_range: (lo, hi) mapped to levels 0 and levels - 1. Like distances,
      angles and levels it must be Python numbers, because it fixes the
      compiled program.
    region: optional weights in [0, 1] (or bool), broadcastable to image.

  Returns:
    A dict with keys contrast, dissimilarity, homogeneity, correlation, ASM
    and energy, each of shape image.shape[:-2] + (len(distances), len(angles)).
  """
  pixel_offsets = offsets(distances, angles)
  image = jnp.asarray(image)
  if not jnp.issubdtype(image.dtype, jnp.floating):
    image = image.astype(jnp.float32)
  _check_arguments(image, levels, value_range)
  weight = None
  if region is not None:
    region = jnp.asarray(region)
    try:
      weight = jnp.broadcast_to(region, image.shape).astype(image.dtype)
    except ValueError as error:
      raise InputError(
          f"region shape {region.shape} is invalid, expected a shape broadcastable to image {image.shape}"
      ) from error

  return _glcm_features(
      image, weight, pixel_offsets, (len(distances), len(angles)), levels, tuple(map(float, value_range))
  )


# Jitted so that an eager call (tests, evaluation scripts) compiles one
# program instead of dispatching a few hundred small operations. Inside an
# outer jit it is inlined as usual.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _glcm_features(
    image: jax.Array,
    weight: jax.Array | None,
    pixel_offsets: tuple[tuple[int, int], ...],
    offset_grid: tuple[int, int],
    levels: int,
    value_range: tuple[float, float],
) -> dict[str, jax.Array]:
  lo, hi = value_range
  q = (image - lo) * ((levels - 1) / (hi - lo))
  height, width = q.shape[-2:]
  per_offset = []
  # Static slices keep only the pairs whose two pixels are inside the image.
  # The loop is unrolled because a lax.map over offsets, though faster to
  # compile, ran its backward pass about twice as slow on (8, 3, 384, 384).
  # TODO: compile time grows with the offset count. On a loaded 2-core CPU
  # forward plus backward of 12 offsets took about 5 s to compile even for 8x8
  # images, which slows cold test runs. It was not measured on an accelerator.
  for row_step, col_step in pixel_offsets:
    rows_1, rows_2 = _pair_slices(height, row_step)
    cols_1, cols_2 = _pair_slices(width, col_step)
    q_1 = q[..., rows_1, cols_1]
    q_2 = q[..., rows_2, cols_2]
    if weight is None:
      pair_weight = jnp.ones_like(q_1)
    else:
      pair_weight = weight[..., rows_1, cols_1] * weight[..., rows_2, cols_2]
    per_offset.append(_pair_features(q_1, q_2, pair_weight, levels))
  grid = image.shape[:-2] + offset_grid
  return {
      name: jnp.stack([features[name] for features in per_offset], axis=-1).reshape(grid)
      for name in FEATURE_NAMES
  }


def texture_distance(
    prediction: jax.Array,
    target: jax.Array,
    *,
    region: jax.Array | None = None,
    distances: Sequence[int] = (1, 2, 4),
    angles: Sequence[float] = (0, 45, 90, 135),
    levels: int = 16,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> jax.Array:
  """Compute the mean squared difference of GLCM features of two NHWC batches, per image.

  Each channel gets its own features. Contrast is divided by (levels - 1)^2
  and dissimilarity by (levels - 1) so that every feature lies in about
  [0, 1], and correlation in [-1, 1]. ASM is left out because energy carries it.
  No gradient flows into `target`.

  Args:
    prediction: (N, H, W, C).
    target: (N, H, W, C).
    region: optional (N, H, W) or (N, H, W, 1) weights shared by all channels.
    distances, angles, levels, value_range: as in `glcm_features`.

  Returns:
    (N,) mean over features, offsets and channels.
  """
  prediction = jnp.asarray(prediction)
  target = jax.lax.stop_gradient(jnp.asarray(target))
  if prediction.ndim != 4 or prediction.shape != target.shape:
    raise InputError(
        f"prediction shape {prediction.shape} and target shape {target.shape} are invalid,"
        " expected the same (N, H, W, C)"
    )
  batch = prediction.shape[0]
  channel_region = None
  if region is not None:
    region = jnp.asarray(region)
    if region.ndim == 4 and region.shape[-1] == 1:
      region = region[..., 0]
    if region.shape != prediction.shape[:3]:
      raise InputError(
          f"region shape {region.shape} is invalid, expected {prediction.shape[:3]} or"
          f" {prediction.shape[:3] + (1,)}"
      )
    channel_region = jnp.concatenate([region, region])[:, None]

  # One call on both batches, channels first, so each (image, channel) is one GLCM input.
  both = jnp.transpose(jnp.concatenate([prediction, target]), (0, 3, 1, 2))
  features = glcm_features(
      both, distances, angles, levels, value_range=value_range, region=channel_region
  )
  scaled = jnp.stack(
      [
          features["contrast"] / (levels - 1) ** 2,
          features["dissimilarity"] / (levels - 1),
          features["homogeneity"],
          features["correlation"],
          features["energy"],
      ],
      axis=-1,
  )
  squared = (scaled[:batch] - scaled[batch:]) ** 2
  return jnp.mean(squared.reshape(batch, -1), axis=-1)
