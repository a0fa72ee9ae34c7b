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
import numbers
from collections.abc import Callable, Sequence

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
  if image.ndim < 2 or 0 in image.shape[-2:]:
    raise InputError(f"image shape {image.shape} is invalid, expected (..., H, W) with H, W >= 1")
  if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
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
    lower_1: jax.Array, lower_2: jax.Array, split_1: jax.Array, split_2: jax.Array, levels: int
) -> jax.Array:
  """Sum the soft counts C[k, l] of the pairs, first pixel at level k, into (n, levels, levels).

  Takes the `_split_levels` lower levels (n, H', W') of both pixels of each
  pair and their weighted splits (n, H', W', 2). With linear interpolation
  each pair touches at most four bins: (lower_1 + a, lower_2 + b) for a, b in
  {0, 1}. A single segment sum collects the four weights of each pair on the
  (levels - 1)^2 grid of lower-level pairs, and shifted copies of the four
  grids add up to C. This costs O(pairs), where an einsum of dense soft
  assignments costs O(pairs * levels^2) and measured several times slower.
  """
  count = lower_1.shape[0]
  cells = levels - 1
  histogram_index = jnp.arange(count, dtype=jnp.int32).reshape(count, 1, 1)
  segment = (histogram_index * cells + lower_1) * cells + lower_2
  # corners[..., a, b] = split_1[..., a] * split_2[..., b], the pair weight times k_a(u_1) k_b(u_2).
  corners = split_1[..., :, None] * split_2[..., None, :]
  grids = jax.ops.segment_sum(
      corners.reshape(-1, 4), segment.reshape(-1), num_segments=count * cells * cells
  ).reshape(count, cells, cells, 4)
  keep = [(0, 0)]
  counts = jnp.pad(grids[..., 0], keep + [(0, 1), (0, 1)])
  counts += jnp.pad(grids[..., 1], keep + [(0, 1), (1, 0)])
  counts += jnp.pad(grids[..., 2], keep + [(1, 0), (0, 1)])
  counts += jnp.pad(grids[..., 3], keep + [(1, 0), (1, 0)])
  return counts


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """Divide, giving 0 where the denominator is 0, with finite gradients there too."""
  nonzero = denominator > 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


# The weighted pair sums that `_pair_statistics` returns, in order. With pair
# weight P = w_1 * w_2, shifted values s = q - shift and d = q_1 - q_2, they
# are the sums over the pairs of P, P s_1, P s_2, P s_1^2, P s_2^2, P s_1 s_2,
# P d^2, P |d| and P / (1 + d^2).
PAIR_SUMS = (
    "weight",
    "first",
    "second",
    "first_squared",
    "second_squared",
    "product",
    "contrast",
    "dissimilarity",
    "homogeneity",
)

Pads = tuple[tuple[int, int], tuple[int, int]]


def _offset_pairs(
    array: jax.Array, row_step: int, col_step: int, trailing: int = 0
) -> tuple[jax.Array, jax.Array, Pads, Pads]:
  """Return the first and second pixels of the pairs of one offset, and the pads that undo each slice.

  The image axes are the last two of `array`, or the two before its last
  `trailing` axes.
  """
  height, width = array.shape[array.ndim - trailing - 2 : array.ndim - trailing]
  rows_1, rows_2 = _pair_slices(height, row_step)
  cols_1, cols_2 = _pair_slices(width, col_step)
  rest = (slice(None),) * trailing

  def pads(rows: slice, cols: slice) -> Pads:
    return (rows.start, height - rows.stop), (cols.start, width - cols.stop)

  return (
      array[(Ellipsis, rows_1, cols_1) + rest],
      array[(Ellipsis, rows_2, cols_2) + rest],
      pads(rows_1, cols_1),
      pads(rows_2, cols_2),
  )


def _pair_terms(shifted_1: jax.Array, shifted_2: jax.Array, pair_weight: jax.Array) -> list[jax.Array]:
  """Return the per-pair summands of `PAIR_SUMS`, in that order."""
  difference = shifted_1 - shifted_2
  squared = difference * difference
  return [
      pair_weight,
      pair_weight * shifted_1,
      pair_weight * shifted_2,
      pair_weight * shifted_1 * shifted_1,
      pair_weight * shifted_2 * shifted_2,
      pair_weight * shifted_1 * shifted_2,
      pair_weight * squared,
      pair_weight * jnp.abs(difference),
      pair_weight / (1.0 + squared),
  ]


# Pixels per step of the loop over images: a step takes CHUNK_PIXELS // (H * W)
# images, at least one. A step keeps a few arrays of (images, H, W) per offset,
# so small steps stay in cache and reuse their memory. Without the loop, XLA's
# temporary buffer at (24, 384, 384) reached 1.7 GB, and zeroing its fresh
# pages took much of the time on a 2-core CPU.
CHUNK_PIXELS = 1 << 17


def _map_images(
    function: Callable[[tuple[jax.Array, ...]], tuple[jax.Array, ...]],
    arrays: Sequence[jax.Array],
    height: int,
    width: int,
) -> tuple[jax.Array, ...]:
  """Apply `function` to chunks of images, looping over chunks, and join the results.

  The first array is (..., H, W), and every array starts with the same
  leading shape (...). `function` maps a tuple of arrays with leading shape
  (chunk,) to a tuple of such arrays. Images are independent, so chunking
  changes no result.
  """
  leading = arrays[0].shape[:-2]
  count = math.prod(leading)
  flat = [array.reshape((count,) + array.shape[len(leading) :]) for array in arrays]
  chunk = max(1, CHUNK_PIXELS // (height * width))
  if count <= chunk:
    results = function(tuple(flat))
  else:
    steps = -(-count // chunk)
    padding = steps * chunk - count
    # Padded images are all zero, weight included, so they stay finite and are dropped.
    blocks = tuple(
        jnp.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1)).reshape((steps, chunk) + array.shape[1:])
        for array in flat
    )
    results = jax.lax.map(function, blocks)
    results = tuple(result.reshape((steps * chunk,) + result.shape[2:])[:count] for result in results)
  return tuple(result.reshape(leading + result.shape[1:]) for result in results)


def _image_statistics(
    q: jax.Array,
    shift: jax.Array,
    weight: jax.Array,
    pixel_offsets: tuple[tuple[int, int], ...],
    levels: int,
) -> tuple[jax.Array, jax.Array]:
  """Compute `_pair_statistics` of (n, H, W) images, without the loop over images."""
  shifted = q - shift
  zero = jnp.zeros((), q.dtype)
  axes = (q.ndim - 2, q.ndim - 1)
  # Split every pixel once, not once per offset and pair role.
  lower, upper = _split_levels(q, levels)
  upper_weight = weight * upper
  split = jnp.stack([weight - upper_weight, upper_weight], axis=-1)
  sums, counts = [], []
  for row_step, col_step in pixel_offsets:
    shifted_1, shifted_2, _, _ = _offset_pairs(shifted, row_step, col_step)
    weight_1, weight_2, _, _ = _offset_pairs(weight, row_step, col_step)
    terms = _pair_terms(shifted_1, shifted_2, weight_1 * weight_2)
    # One variadic reduction reads each pair once for all nine sums. Nine
    # jnp.sum calls measured 8 times slower on a 2-core CPU.
    offset_sums = jax.lax.reduce(
        terms, [zero] * len(terms), lambda left, right: [a + b for a, b in zip(left, right)], axes
    )
    sums.append(jnp.stack(offset_sums, axis=-1))
    lower_1, lower_2, _, _ = _offset_pairs(lower, row_step, col_step)
    split_1, split_2, _, _ = _offset_pairs(split, row_step, col_step, trailing=1)
    counts.append(_soft_histogram(lower_1, lower_2, split_1, split_2, levels))
  return jnp.stack(sums, axis=-2), jnp.stack(counts, axis=-3)


# A custom VJP, because autodiff keeps several (..., H, W) arrays per offset
# alive for the backward pass and makes about twenty passes over memory per
# offset. Here the backward pass recomputes what it needs from q and the
# weights in elementwise loops that XLA fuses.
# TODO: the speed-up was measured on a 2-core CPU only (jax 0.10.2), not on
# an accelerator, where the scatter, the gathers and the loop over images may
# cost differently.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pair_statistics(
    q: jax.Array,
    shift: jax.Array,
    weight: jax.Array,
    pixel_offsets: tuple[tuple[int, int], ...],
    levels: int,
) -> tuple[jax.Array, jax.Array]:
  """Compute the pair sums and soft histograms of each offset of (..., H, W) images.

  Args:
    q: (..., H, W) values in level units.
    shift: (..., 1, 1) subtracted from q in the pair sums (not in the
      histograms), so that the raw moments stay small.
    weight: (..., H, W) pixel weights. A pair weighs the product of its two.
    pixel_offsets: (row, column) offsets.
    levels: number of histogram levels.

  Returns:
    `PAIR_SUMS` as (..., len(pixel_offsets), 9) and the soft histograms C[k, l]
    of the pairs with first pixel at level k, (..., len(pixel_offsets), levels, levels).
  """
  return _map_images(
      lambda arrays: _image_statistics(*arrays, pixel_offsets, levels), (q, shift, weight), *q.shape[-2:]
  )


def _pair_statistics_forward(
    q: jax.Array,
    shift: jax.Array,
    weight: jax.Array,
    pixel_offsets: tuple[tuple[int, int], ...],
    levels: int,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
  sums, counts = _pair_statistics(q, shift, weight, pixel_offsets, levels)
  return (sums, counts), (q, shift, weight, sums)


def _clip_slope(q: jax.Array, levels: int) -> jax.Array:
  """Return the derivative of clip(q, 0, levels - 1) as JAX defines it: 1 inside, 1/2 at either bound, 0 outside."""
  inside = jnp.where((q > 0) & (q < levels - 1), 1.0, 0.0)
  return jnp.where((q == 0) | (q == levels - 1), 0.5, inside).astype(q.dtype)


def _corner_values(table: jax.Array, lower_1: jax.Array, lower_2: jax.Array) -> jax.Array:
  """Look up the (n, levels, levels) `table` at the four bins of each pair.

  Returns (n, H', W', 4) with table[i, lower_1 + a, lower_2 + b] at index
  2 a + b, for the lower levels (n, H', W') of the pairs of image i.
  """
  count = lower_1.shape[0]
  # corners[i, k, l] contains the four bins of a pair whose lower levels are (k, l).
  corners = jnp.stack(
      [table[:, :-1, :-1], table[:, :-1, 1:], table[:, 1:, :-1], table[:, 1:, 1:]], axis=-1
  )
  cells = corners.shape[1]
  image_index = jnp.arange(count, dtype=jnp.int32).reshape(count, 1, 1)
  index = (image_index * cells + lower_1) * cells + lower_2
  return corners.reshape(-1, 4).at[index].get(mode="promise_in_bounds")


def _pair_gradients(
    first: dict[str, jax.Array],
    second: dict[str, jax.Array],
    sums_cotangent: jax.Array,
    counts_cotangent: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Differentiate the terms of the pairs (first, second) of one offset by hand.

  `first` and `second` hold the per-pixel arrays of `_pixel_arrays`, (n, H',
  W') each, for the two pixels of every pair. `sums_cotangent` is (n, 9) and
  `counts_cotangent` (n, levels, levels). Returns the cotangents of q at the
  first and the second pixel, then those of the weight, all (n, H', W'). The
  derivatives of |d| and of the clip at its bounds follow JAX's conventions,
  so the gradients equal those of autodiff through the same sums.
  """
  pair_weight = first["weight"] * second["weight"]
  shifted_1, shifted_2 = first["shifted"], second["shifted"]

  # Pair sums: g[k] is the cotangent of PAIR_SUMS[k].
  g = [sums_cotangent[:, k, None, None] for k in range(len(PAIR_SUMS))]
  difference = shifted_1 - shifted_2
  squared = difference * difference
  reciprocal = 1.0 / (1.0 + squared)
  # JAX differentiates |d| as 1 at d = 0.
  sign = jnp.where(difference >= 0, 1.0, -1.0).astype(difference.dtype)
  # The derivative of the difference terms with respect to s_1, and minus that with respect to s_2.
  difference_slope = 2.0 * g[6] * difference + g[7] * sign - 2.0 * g[8] * difference * reciprocal * reciprocal
  sums_slope_1 = g[1] + 2.0 * g[3] * shifted_1 + g[5] * shifted_2 + difference_slope
  sums_slope_2 = g[2] + 2.0 * g[4] * shifted_2 + g[5] * shifted_1 - difference_slope
  sums_value = (
      g[0]
      + g[1] * shifted_1
      + g[2] * shifted_2
      + g[3] * shifted_1 * shifted_1
      + g[4] * shifted_2 * shifted_2
      + g[5] * shifted_1 * shifted_2
      + g[6] * squared
      + g[7] * jnp.abs(difference)
      + g[8] * reciprocal
  )

  # Soft histogram: the pair adds P * k_a(u_1) * k_b(u_2) to C[lower_1 + a, lower_2 + b],
  # with k_0(u) = 1 - u and k_1(u) = u.
  upper_1, upper_2 = first["upper"], second["upper"]
  corners = _corner_values(counts_cotangent, first["lower"], second["lower"])
  corner_00, corner_01, corner_10, corner_11 = (corners[..., k] for k in range(4))
  lower_mix_2 = corner_00 + upper_2 * (corner_01 - corner_00)
  upper_mix_2 = corner_10 + upper_2 * (corner_11 - corner_10)
  histogram_value = lower_mix_2 + upper_1 * (upper_mix_2 - lower_mix_2)
  histogram_slope_1 = (upper_mix_2 - lower_mix_2) * first["clip_slope"]
  lower_mix_1 = corner_00 + upper_1 * (corner_10 - corner_00)
  upper_mix_1 = corner_01 + upper_1 * (corner_11 - corner_01)
  histogram_slope_2 = (upper_mix_1 - lower_mix_1) * second["clip_slope"]

  value = sums_value + histogram_value
  return (
      pair_weight * (sums_slope_1 + histogram_slope_1),
      pair_weight * (sums_slope_2 + histogram_slope_2),
      second["weight"] * value,
      first["weight"] * value,
  )


def _pixel_arrays(q: jax.Array, shift: jax.Array, weight: jax.Array, levels: int) -> dict[str, jax.Array]:
  """Compute once per pixel what the backward pass reads for every offset."""
  lower, upper = _split_levels(q, levels)
  return {
      "shifted": q - shift,
      "weight": weight,
      "lower": lower,
      "upper": upper,
      "clip_slope": _clip_slope(q, levels),
  }


def _image_statistics_gradient(
    q: jax.Array,
    shift: jax.Array,
    weight: jax.Array,
    sums_cotangent: jax.Array,
    counts_cotangent: jax.Array,
    pixel_offsets: tuple[tuple[int, int], ...],
    levels: int,
) -> tuple[jax.Array, jax.Array]:
  """Return the cotangents of q and weight for `_pair_statistics` of (n, H, W) images.

  A loop over offsets, not an unrolled one, keeps the arrays of a single
  offset alive at a time. Unrolled, XLA computed the lookups of all offsets
  first, and on (1, 384, 384) with 12 offsets they outgrew a 32 MB cache and
  ran 3 times slower than 8 offsets.

  The loop needs the same shapes for every offset, so the pairs are (p, p +
  offset) for every pixel p of the image. The image is padded with weight 0
  for the second pixels, so a pair that leaves the image has weight 0 and
  adds nothing, as if it were not counted.
  """
  height, width = q.shape[-2:]
  row_steps = [row_step for row_step, _ in pixel_offsets]
  col_steps = [col_step for _, col_step in pixel_offsets]
  top, bottom = max(0, -min(row_steps)), max(0, max(row_steps))
  left, right = max(0, -min(col_steps)), max(0, max(col_steps))
  first = _pixel_arrays(q, shift, weight, levels)
  padded = {
      name: jnp.pad(array, [(0, 0), (top, bottom), (left, right)]) for name, array in first.items()
  }
  starts = jnp.array([(top + row_step, left + col_step) for row_step, col_step in pixel_offsets], jnp.int32)

  def add_offset(carry, inputs):
    q_first, q_second, weight_first, weight_second = carry
    start, sums_cotangent_offset, counts_cotangent_offset = inputs
    # All indices int32, so that this also traces with 64-bit types enabled.
    window = (jnp.zeros((), jnp.int32), start[0], start[1])
    second = {
        name: jax.lax.dynamic_slice(array, window, q.shape) for name, array in padded.items()
    }
    q_1, q_2, weight_1, weight_2 = _pair_gradients(first, second, sums_cotangent_offset, counts_cotangent_offset)

    def add_window(accumulator: jax.Array, values: jax.Array) -> jax.Array:
      return jax.lax.dynamic_update_slice(
          accumulator, jax.lax.dynamic_slice(accumulator, window, q.shape) + values, window
      )

    carry = (q_first + q_1, add_window(q_second, q_2), weight_first + weight_1, add_window(weight_second, weight_2))
    return carry, None

  zeros = jnp.zeros_like(q)
  padded_zeros = jnp.zeros_like(padded["shifted"])
  (q_first, q_second, weight_first, weight_second), _ = jax.lax.scan(
      add_offset,
      (zeros, padded_zeros, zeros.astype(weight.dtype), padded_zeros.astype(weight.dtype)),
      (starts, jnp.moveaxis(sums_cotangent, 1, 0), jnp.moveaxis(counts_cotangent, 1, 0)),
  )
  crop = (Ellipsis, slice(top, top + height), slice(left, left + width))
  return q_first + q_second[crop], weight_first + weight_second[crop]


def _pair_statistics_backward(
    pixel_offsets: tuple[tuple[int, int], ...],
    levels: int,
    residuals: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    cotangents: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  q, shift, weight, sums = residuals
  sums_cotangent, counts_cotangent = cotangents
  q_gradient, weight_gradient = _map_images(
      lambda arrays: _image_statistics_gradient(*arrays, pixel_offsets, levels),
      (q, shift, weight, sums_cotangent, counts_cotangent),
      *q.shape[-2:],
  )
  # The shifted pair sums move with the shift as d/d(shift) of sum P s_1 = -sum P,
  # of sum P s_1^2 = -2 sum P s_1 and of sum P s_1 s_2 = -sum P (s_1 + s_2), so
  # their own values give the shift's cotangent. The difference terms do not move.
  g = [sums_cotangent[..., k] for k in range(len(PAIR_SUMS))]
  total, first, second = sums[..., 0], sums[..., 1], sums[..., 2]
  shift_gradient = -jnp.sum(
      (g[1] + g[2]) * total + 2.0 * g[3] * first + 2.0 * g[4] * second + g[5] * (first + second), axis=-1
  )
  return q_gradient, shift_gradient.reshape(shift.shape), weight_gradient


_pair_statistics.defvjp(_pair_statistics_forward, _pair_statistics_backward)


def _moment_features(sums: jax.Array) -> dict[str, jax.Array]:
  """Compute contrast, dissimilarity, homogeneity and correlation from (..., 9) `PAIR_SUMS`.

  The moments are raw, so q should be shifted near its mean first, or the
  variance loses float32 digits to cancellation.
  """
  total = sums[..., 0]

  def expect(index: int) -> jax.Array:
    return _safe_divide(sums[..., index], total)

  features = {"contrast": expect(6), "dissimilarity": expect(7), "homogeneity": expect(8)}
  # Both orders of each pair count, so the marginal is the mix of q_1 and q_2.
  mean = 0.5 * (expect(1) + expect(2))
  variance = 0.5 * (expect(3) + expect(4)) - mean**2
  covariance = expect(5) - mean**2
  flat = variance < CORRELATION_VARIANCE_FLOOR
  features["correlation"] = jnp.where(flat, 1.0, covariance / jnp.where(flat, 1.0, variance))
  return features


def _histogram_features(counts: jax.Array, total: jax.Array) -> dict[str, jax.Array]:
  """Compute ASM and energy from the (..., levels, levels) counts C of pairs of total weight `total`."""
  # C[k, l] counts one order of each pair, so the symmetric histogram is (C + C^T) / (2 N).
  symmetric = counts + jnp.swapaxes(counts, -1, -2)
  histogram = _safe_divide(symmetric, 2.0 * total[..., None, None])
  asm = jnp.sum(histogram**2, axis=(-2, -1))
  return {"ASM": asm, "energy": jnp.where(asm > 0, jnp.sqrt(jnp.where(asm > 0, asm, 1.0)), 0.0)}


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
  levels = int(levels)
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
  if weight is None:
    weight = jnp.ones_like(q)
  # The moments are raw sums, so they are taken of q minus each image's
  # weighted mean: no feature depends on a constant shift, and a small |q|
  # keeps the float32 variance from cancelling. The shift is a constant for
  # the gradient, which is exact because the features do not change with it.
  weight_total = jnp.sum(weight, axis=(-2, -1), keepdims=True)
  shift = jax.lax.stop_gradient(_safe_divide(jnp.sum(weight * q, axis=(-2, -1), keepdims=True), weight_total))
  # TODO: the forward pass unrolls the offsets, so its compile time grows with
  # the offset count. It was not measured on an accelerator.
  sums, counts = _pair_statistics(q, shift, weight, pixel_offsets, levels)
  features = _moment_features(sums)
  features.update(_histogram_features(counts, sums[..., 0]))
  grid = image.shape[:-2] + offset_grid
  return {name: features[name].reshape(grid) for name in FEATURE_NAMES}


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
    channel_region = region[:, None]

  def scaled_features(images: jax.Array) -> jax.Array:
    # Channels first, so each (image, channel) is one GLCM input.
    features = glcm_features(
        jnp.transpose(images, (0, 3, 1, 2)),
        distances,
        angles,
        levels,
        value_range=value_range,
        region=channel_region,
    )
    return jnp.stack(
        [
            features["contrast"] / (levels - 1) ** 2,
            features["dissimilarity"] / (levels - 1),
            features["homogeneity"],
            features["correlation"],
            features["energy"],
        ],
        axis=-1,
    )

  # Two calls, because one call on both batches would differentiate the
  # target's features too and then drop that gradient.
  squared = (scaled_features(prediction) - scaled_features(target)) ** 2
  return jnp.mean(squared.reshape(batch, -1), axis=-1)
