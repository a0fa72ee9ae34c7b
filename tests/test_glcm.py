"""GLCM texture features against scikit-image and a pair-by-pair numpy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.feature import graycomatrix, graycoprops

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import glcm

DISTANCES = (1, 2, 4)
ANGLES = (0, 45, 90, 135)
# Fewer offsets for tests that do not compare with scikit-image: each distinct
# call compiles one program whose size grows with the number of offsets.
FEW_OFFSETS = {"distances": (1, 4), "angles": (0, 135)}


def skimage_features(image: np.ndarray, levels: int) -> dict[str, np.ndarray]:
  matrix = graycomatrix(
      image.astype(np.uint8), DISTANCES, np.deg2rad(ANGLES), levels=levels, symmetric=True, normed=True
  )
  return {name: graycoprops(matrix, name) for name in glcm.FEATURE_NAMES}


def skimage_offsets() -> list[tuple[int, int]]:
  """Read skimage's offsets off a non-symmetric GLCM of an image whose pixels are all distinct."""
  size = 9
  image = np.arange(size * size).reshape(size, size)
  found = []
  for distance in DISTANCES:
    for angle in ANGLES:
      matrix = graycomatrix(image.astype(np.uint8), [distance], [np.deg2rad(angle)], levels=size * size)
      first, second = np.argwhere(matrix[:, :, 0, 0])[0]
      found.append((int(second // size - first // size), int(second % size - first % size)))
  return found


def reference_features(
    q: np.ndarray, region: np.ndarray, levels: int
) -> dict[str, np.ndarray]:
  """Enumerate the weighted symmetric pairs of one (H, W) image in level units, in float64."""
  height, width = q.shape
  centres = np.arange(levels)
  result = {name: np.zeros((len(DISTANCES), len(ANGLES))) for name in glcm.FEATURE_NAMES}
  for index, (row_step, col_step) in enumerate(glcm.offsets(DISTANCES, ANGLES)):
    pairs = []
    for row in range(height):
      for col in range(width):
        other_row, other_col = row + row_step, col + col_step
        if 0 <= other_row < height and 0 <= other_col < width:
          weight = region[row, col] * region[other_row, other_col]
          pairs.append((q[row, col], q[other_row, other_col], weight))
    cell = np.unravel_index(index, (len(DISTANCES), len(ANGLES)))
    total = sum(weight for _, _, weight in pairs)
    if total == 0:
      result["correlation"][cell] = 1.0
      continue
    first = np.array([pair[0] for pair in pairs])
    second = np.array([pair[1] for pair in pairs])
    weights = np.array([pair[2] for pair in pairs])
    difference = first - second
    result["contrast"][cell] = np.sum(weights * difference**2) / total
    result["dissimilarity"][cell] = np.sum(weights * np.abs(difference)) / total
    result["homogeneity"][cell] = np.sum(weights / (1 + difference**2)) / total
    mean = np.sum(weights * (first + second)) / (2 * total)
    variance = np.sum(weights * ((first - mean) ** 2 + (second - mean) ** 2)) / (2 * total)
    covariance = np.sum(weights * (first - mean) * (second - mean)) / total
    result["correlation"][cell] = covariance / variance
    histogram = np.zeros((levels, levels))
    for value_1, value_2, weight in pairs:
      kernel_1 = np.maximum(0, 1 - np.abs(np.clip(value_1, 0, levels - 1) - centres))
      kernel_2 = np.maximum(0, 1 - np.abs(np.clip(value_2, 0, levels - 1) - centres))
      histogram += weight * (np.outer(kernel_1, kernel_2) + np.outer(kernel_2, kernel_1))
    histogram /= 2 * total
    result["ASM"][cell] = np.sum(histogram**2)
    result["energy"][cell] = np.sqrt(result["ASM"][cell])
  return result


def test_offsets_match_skimage():
  assert list(glcm.offsets(DISTANCES, ANGLES)) == skimage_offsets()


def test_offsets_diagonal_magnitudes():
  table = glcm.offsets(DISTANCES, ANGLES)
  assert table[1 * len(ANGLES) + 1] == (1, 1)
  assert table[2 * len(ANGLES) + 1] == (3, 3)
  assert table[2 * len(ANGLES) + 3] == (3, -3)


@pytest.mark.parametrize("levels", [8, 16])
@pytest.mark.parametrize("shape", [(12, 12), (9, 14), (17, 6), (3, 5)])
def test_quantised_matches_skimage(levels, shape):
  # One batched call covers three random images (seeds 0, 1, 2).
  images = np.stack([np.random.default_rng(seed).integers(0, levels, shape) for seed in range(3)])
  features = glcm.glcm_features(images, DISTANCES, ANGLES, levels, value_range=(0, levels - 1))
  for index, image in enumerate(images):
    expected = skimage_features(image, levels)
    for name in ("contrast", "dissimilarity", "homogeneity", "correlation"):
      np.testing.assert_allclose(
          features[name][index], expected[name], rtol=1e-5, atol=1e-5, err_msg=f"{name}, seed {index}"
      )
    # The soft histogram of an integer image is the hard one, up to float32 rounding.
    for name in ("ASM", "energy"):
      np.testing.assert_allclose(
          features[name][index], expected[name], rtol=1e-5, atol=1e-6, err_msg=f"{name}, seed {index}"
      )


def test_constant_image_matches_skimage():
  image = np.full((6, 7), 5)
  features = glcm.glcm_features(image, DISTANCES, ANGLES, 8, value_range=(0, 7))
  expected = skimage_features(image, 8)
  for name in glcm.FEATURE_NAMES:
    np.testing.assert_allclose(features[name], expected[name], atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(features["correlation"], 1.0)


def test_batched_shape_and_values():
  images = np.random.default_rng(3).integers(0, 8, (2, 3, 10, 11))
  features = glcm.glcm_features(images, DISTANCES, ANGLES, 8, value_range=(0, 7))
  for name in glcm.FEATURE_NAMES:
    assert features[name].shape == (2, 3, len(DISTANCES), len(ANGLES))
  expected = skimage_features(images[1, 2], 8)
  np.testing.assert_allclose(features["contrast"][1, 2], expected["contrast"], rtol=1e-5)
  np.testing.assert_allclose(features["energy"][1, 2], expected["energy"], rtol=1e-5)


def test_value_range_maps_to_levels():
  levels = 16
  image = np.random.default_rng(4).integers(0, levels, (10, 10))
  scaled = image / (levels - 1) * 2.0 - 1.0
  features = glcm.glcm_features(scaled.astype(np.float32), DISTANCES, ANGLES, levels)
  expected = skimage_features(image, levels)
  for name in glcm.FEATURE_NAMES:
    np.testing.assert_allclose(features[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


# Worst |soft energy - skimage energy of the rounded image| over seeds 0-5 of
# 32x32 images, measured with this implementation: 0.004 on uniform noise,
# 0.071 (8 levels) and 0.022 (16 levels) on noise smoothed with sigma 2, and
# 0.115 (8 levels) and 0.060 (16 levels) with sigma 4.
ENERGY_TOLERANCE = {8: 0.12, 16: 0.065}


@pytest.mark.parametrize("levels", [8, 16])
def test_continuous_energy_near_rounded(levels):
  worst = 0.0
  for seed in range(6):
    rng = np.random.default_rng(seed)
    images = [rng.uniform(0, levels - 1, (32, 32))]
    for sigma in (2, 4):
      smooth = gaussian_filter(rng.normal(size=(32, 32)), sigma)
      images.append((smooth - smooth.min()) / (smooth.max() - smooth.min()) * (levels - 1))
    for q in images:
      features = glcm.glcm_features(q.astype(np.float32), DISTANCES, ANGLES, levels, value_range=(0, levels - 1))
      expected = skimage_features(np.rint(q), levels)["energy"]
      worst = max(worst, float(np.max(np.abs(np.asarray(features["energy"]) - expected))))
  assert worst < ENERGY_TOLERANCE[levels]
  # A soft histogram that ignored the fractional part would match exactly, so
  # require the continuous values to make a measurable difference.
  assert worst > 1e-3


@pytest.mark.parametrize("kind", ["binary", "weights"])
def test_region_matches_reference(kind):
  levels = 8
  rng = np.random.default_rng(5)
  # Values beyond [0, levels - 1] check the clipping of the soft histogram.
  q = rng.uniform(-1.0, levels, (9, 10))
  if kind == "binary":
    region = (rng.uniform(size=q.shape) < 0.7).astype(np.float64)
  else:
    region = rng.uniform(size=q.shape)
  features = glcm.glcm_features(
      q.astype(np.float32), DISTANCES, ANGLES, levels, value_range=(0, levels - 1), region=region
  )
  expected = reference_features(q, region, levels)
  for name in glcm.FEATURE_NAMES:
    np.testing.assert_allclose(features[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_full_region_equals_no_region():
  image = np.random.default_rng(6).integers(0, 8, (8, 9))
  plain = glcm.glcm_features(image, levels=8, value_range=(0, 7), **FEW_OFFSETS)
  masked = glcm.glcm_features(image, levels=8, value_range=(0, 7), region=np.ones((8, 9), bool), **FEW_OFFSETS)
  for name in glcm.FEATURE_NAMES:
    np.testing.assert_allclose(masked[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_empty_region_gives_zero_features():
  image = np.random.default_rng(7).uniform(-1, 1, (8, 8)).astype(np.float32)
  features = glcm.glcm_features(image, region=np.zeros((8, 8)), **FEW_OFFSETS)
  for name in ("contrast", "dissimilarity", "homogeneity", "ASM", "energy"):
    np.testing.assert_array_equal(features[name], 0.0, err_msg=name)
  np.testing.assert_array_equal(features["correlation"], 1.0)


def total_feature(image, region=None):
  features = glcm.glcm_features(image, region=region, **FEW_OFFSETS)
  return sum(jnp.sum(value) for value in features.values())


@pytest.mark.parametrize(
    "case",
    ["constant", "zero", "empty_region", "offset_longer_than_image", "random"],
)
def test_gradients_finite(case):
  rng = np.random.default_rng(8)
  region = None
  image = rng.uniform(-1, 1, (2, 8, 8)).astype(np.float32)
  if case == "constant":
    image = np.full((2, 8, 8), 0.3, np.float32)
  elif case == "zero":
    image = np.zeros((2, 8, 8), np.float32)
  elif case == "empty_region":
    region = np.zeros((2, 8, 8), np.float32)
  elif case == "offset_longer_than_image":
    image = image[:, :3, :3]
  gradient = jax.grad(total_feature)(jnp.asarray(image), region)
  assert gradient.shape == image.shape
  assert bool(jnp.all(jnp.isfinite(gradient)))


@pytest.mark.parametrize("name", glcm.FEATURE_NAMES)
def test_gradient_matches_finite_differences(name):
  levels = 8
  rng = np.random.default_rng(9)
  # Keep every value 0.1 away from a level, where the soft histogram has kinks.
  q = rng.integers(0, levels - 1, (7, 8)) + rng.uniform(0.1, 0.9, (7, 8))
  region = rng.uniform(0.5, 1.0, q.shape)
  mix = rng.normal(size=(2, len(ANGLES)))
  direction = rng.normal(size=q.shape)
  with jax.enable_x64(True):

    def objective(image):
      features = glcm.glcm_features(image, (1, 4), ANGLES, levels, value_range=(0, levels - 1), region=region)
      return jnp.sum(features[name] * mix)

    gradient = jax.grad(objective)(jnp.asarray(q))
    assert gradient.dtype == jnp.float64
    step = 1e-6
    numeric = (objective(q + step * direction) - objective(q - step * direction)) / (2 * step)
    analytic = jnp.sum(gradient * direction)
    assert float(jnp.abs(analytic)) > 1e-6
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, atol=1e-8)


def test_jit_matches_eager():
  image = np.random.default_rng(10).uniform(-1, 1, (2, 9, 9)).astype(np.float32)
  compiled = jax.jit(functools.partial(glcm.glcm_features, levels=16, **FEW_OFFSETS))(image)
  eager = glcm.glcm_features(image, levels=16, **FEW_OFFSETS)
  for name in glcm.FEATURE_NAMES:
    np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-5, atol=1e-6, err_msg=name)


def nhwc_pair(seed: int):
  rng = np.random.default_rng(seed)
  prediction = rng.uniform(-1, 1, (3, 10, 10, 2)).astype(np.float32)
  target = rng.uniform(-1, 1, (3, 10, 10, 2)).astype(np.float32)
  return jnp.asarray(prediction), jnp.asarray(target)


def test_texture_distance_identical_is_zero():
  prediction, _ = nhwc_pair(11)
  distance = glcm.texture_distance(prediction, prediction, **FEW_OFFSETS)
  assert distance.shape == (3,)
  np.testing.assert_allclose(distance, 0.0, atol=1e-12)


def test_texture_distance_positive_and_per_image():
  prediction, target = nhwc_pair(12)
  distance = glcm.texture_distance(prediction, target, **FEW_OFFSETS)
  assert distance.shape == (3,)
  assert bool(jnp.all(distance > 0))
  # Making only image 0 identical to its target leaves the other two unchanged.
  partial = glcm.texture_distance(prediction.at[0].set(target[0]), target, **FEW_OFFSETS)
  np.testing.assert_allclose(partial[0], 0.0, atol=1e-12)
  np.testing.assert_allclose(partial[1:], distance[1:], rtol=1e-6)


def test_texture_distance_scaling():
  levels = 16
  prediction, target = nhwc_pair(13)
  distance = glcm.texture_distance(prediction, target, levels=levels, **FEW_OFFSETS)
  first = glcm.glcm_features(jnp.moveaxis(prediction, -1, 1), levels=levels, **FEW_OFFSETS)
  second = glcm.glcm_features(jnp.moveaxis(target, -1, 1), levels=levels, **FEW_OFFSETS)
  scales = {"contrast": (levels - 1) ** 2, "dissimilarity": levels - 1, "homogeneity": 1, "correlation": 1, "energy": 1}
  squared = [((first[name] - second[name]) / scale) ** 2 for name, scale in scales.items()]
  expected = jnp.mean(jnp.stack(squared, axis=-1).reshape(3, -1), axis=-1)
  np.testing.assert_allclose(distance, expected, rtol=1e-5)


def test_texture_distance_region_shapes():
  prediction, target = nhwc_pair(14)
  region = np.random.default_rng(14).uniform(size=(3, 10, 10)) < 0.8
  three = glcm.texture_distance(prediction, target, region=region, **FEW_OFFSETS)
  four = glcm.texture_distance(prediction, target, region=region[..., None], **FEW_OFFSETS)
  unmasked = glcm.texture_distance(prediction, target, **FEW_OFFSETS)
  np.testing.assert_allclose(three, four, rtol=1e-6)
  assert not np.allclose(three, unmasked)


def test_texture_distance_gradient_to_prediction_only():
  prediction, target = nhwc_pair(15)
  region = np.ones((3, 10, 10, 1), np.float32)
  loss = lambda p, t: jnp.mean(glcm.texture_distance(p, t, region=region, **FEW_OFFSETS))
  prediction_gradient, target_gradient = jax.grad(loss, argnums=(0, 1))(prediction, target)
  assert bool(jnp.all(jnp.isfinite(prediction_gradient)))
  assert float(jnp.max(jnp.abs(prediction_gradient))) > 0
  np.testing.assert_array_equal(target_gradient, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"levels": 1},
        {"levels": 8.0},
        {"value_range": (1.0, -1.0)},
        {"distances": (0, 1)},
        {"distances": ()},
        {"region": np.ones((5, 5))},
    ],
)
def test_invalid_arguments_raise(kwargs):
  image = np.zeros((8, 8), np.float32)
  with pytest.raises(InputError):
    glcm.glcm_features(image, **kwargs)


def test_texture_distance_invalid_shapes_raise():
  prediction, target = nhwc_pair(16)
  with pytest.raises(InputError):
    glcm.texture_distance(prediction, target[:2])
  with pytest.raises(InputError):
    glcm.texture_distance(prediction, target, region=np.ones((3, 10, 10, 2)))


def split_kernel(values: jax.Array, levels: int) -> jax.Array:
  """Spread each value over its two nearest levels, (..., levels), differentiable as in the module.

  At an integer value the derivative moves weight towards the next level up,
  because the lower level comes from a floor without gradient.
  """
  clipped = jnp.clip(values, 0, levels - 1)
  lower = jnp.clip(jnp.floor(jax.lax.stop_gradient(clipped)), 0, levels - 2)
  upper = (clipped - lower)[..., None]
  centres = jnp.arange(levels)
  return (1 - upper) * (centres == lower[..., None]) + upper * (centres == lower[..., None] + 1)


def autodiff_features(q: jax.Array, region: jax.Array, levels: int) -> jax.Array:
  """Stack the six features of one (H, W) image in level units, by direct formulas that JAX differentiates."""
  height, width = q.shape
  rows = []
  for row_step, col_step in glcm.offsets(DISTANCES, ANGLES):
    rows_1 = slice(max(0, -row_step), min(height, height - row_step))
    cols_1 = slice(max(0, -col_step), min(width, width - col_step))
    rows_2 = slice(rows_1.start + row_step, rows_1.stop + row_step)
    cols_2 = slice(cols_1.start + col_step, cols_1.stop + col_step)
    first, second = q[rows_1, cols_1], q[rows_2, cols_2]
    weight = region[rows_1, cols_1] * region[rows_2, cols_2]
    total = jnp.sum(weight)
    difference = first - second
    mean = jnp.sum(weight * (first + second)) / (2 * total)
    variance = jnp.sum(weight * ((first - mean) ** 2 + (second - mean) ** 2)) / (2 * total)
    covariance = jnp.sum(weight * (first - mean) * (second - mean)) / total
    counts = jnp.einsum("hw,hwk,hwl->kl", weight, split_kernel(first, levels), split_kernel(second, levels))
    histogram = (counts + counts.T) / (2 * total)
    asm = jnp.sum(histogram**2)
    rows.append(jnp.stack([
        jnp.sum(weight * difference**2) / total,
        jnp.sum(weight * jnp.abs(difference)) / total,
        jnp.sum(weight / (1 + difference**2)) / total,
        covariance / variance,
        asm,
        jnp.sqrt(asm),
    ]))
  return jnp.stack(rows)


GRADIENT_LEVELS = 8


def _module_objective(image, weights, mix):
  features = glcm.glcm_features(
      image, DISTANCES, ANGLES, GRADIENT_LEVELS, value_range=(0, GRADIENT_LEVELS - 1), region=weights
  )
  stacked = jnp.stack([features[name].reshape(-1) for name in glcm.FEATURE_NAMES], axis=-1)
  return jnp.sum(stacked * mix)


def _reference_objective(image, weights, mix):
  return jnp.sum(autodiff_features(image, weights, GRADIENT_LEVELS) * mix)


# Jitted at module level, so both cases of the test below share two compiled
# programs. Run op by op, the twelve offsets compiled hundreds of small programs.
_module_gradients = jax.jit(jax.value_and_grad(_module_objective, argnums=(0, 1)))
_reference_gradients = jax.jit(jax.value_and_grad(_reference_objective, argnums=(0, 1)))


@pytest.mark.parametrize("kind", ["integer", "continuous"])
def test_gradients_match_autodiff(kind):
  # Integer values hit the ties that the hand-written backward pass must
  # treat as JAX does: |d| at d = 0, the clip at both bounds and level edges.
  levels = GRADIENT_LEVELS
  rng = np.random.default_rng(17)
  if kind == "integer":
    q = rng.integers(0, levels, (7, 9)).astype(np.float32)
  else:
    q = rng.uniform(-0.5, levels - 0.5, (7, 9)).astype(np.float32)
  region = rng.uniform(0.5, 1.0, q.shape).astype(np.float32)
  mix = jnp.asarray(rng.normal(size=(len(DISTANCES) * len(ANGLES), len(glcm.FEATURE_NAMES))), jnp.float32)

  value, (image_gradient, weight_gradient) = _module_gradients(q, region, mix)
  expected_value, (expected_image, expected_weight) = _reference_gradients(q, region, mix)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  assert float(jnp.max(jnp.abs(image_gradient))) > 1e-3
  np.testing.assert_allclose(image_gradient, expected_image, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(weight_gradient, expected_weight, rtol=1e-4, atol=1e-4)


def test_pair_statistics_shift_gradient():
  # The shift's cotangent comes from a closed form, not from autodiff.
  rng = np.random.default_rng(18)
  offsets = glcm.offsets((1, 2), ANGLES)
  with jax.enable_x64(True):
    q = jnp.asarray(rng.uniform(0, 7, (2, 6, 7)))
    weight = jnp.asarray(rng.uniform(0.5, 1.0, (2, 6, 7)))
    mix = jnp.asarray(rng.normal(size=(2, len(offsets), len(glcm.PAIR_SUMS))))

    def objective(shift):
      sums, _ = glcm._pair_statistics(q, shift, weight, offsets, 8)
      return jnp.sum(sums * mix)

    shift = jnp.asarray([[[3.0]], [[4.0]]])
    gradient = jax.grad(objective)(shift)
    step = 1e-6
    for index in range(2):
      bump = jnp.zeros_like(shift).at[index].set(step)
      numeric = (objective(shift + bump) - objective(shift - bump)) / (2 * step)
      np.testing.assert_allclose(float(gradient[index, 0, 0]), float(numeric), rtol=1e-6)


def test_image_chunks_match_one_call(monkeypatch):
  rng = np.random.default_rng(19)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 3, 8, 8)), jnp.float32)
  region = jnp.asarray(rng.uniform(size=(2, 1, 8, 8)) < 0.8, jnp.float32)

  def total(image):
    return total_feature(image, region)

  whole_value, whole_gradient = jax.value_and_grad(total)(images)
  # Two images of 8x8 per chunk: three steps over six images, the last one padded.
  monkeypatch.setattr(glcm, "CHUNK_PIXELS", 2 * 64)
  glcm._glcm_features.clear_cache()
  try:
    chunked_value, chunked_gradient = jax.value_and_grad(total)(images)
  finally:
    glcm._glcm_features.clear_cache()
  np.testing.assert_allclose(chunked_value, whole_value, rtol=1e-6)
  np.testing.assert_allclose(chunked_gradient, whole_gradient, rtol=1e-5, atol=1e-7)


def test_empty_image_and_numpy_levels():
  with pytest.raises(InputError, match="H, W >= 1"):
    glcm.glcm_features(jnp.zeros((0, 0)))
  features = glcm.glcm_features(jnp.zeros((4, 4)), (1,), (0,), np.int64(8))
  assert features["energy"].shape == (1, 1)
