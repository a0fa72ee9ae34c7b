"""Tests of SparK masking: the mask helpers and the masked ConvNeXt-V2 encoder."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import build_convnext_v2
from uem_ich_jax.models import layers
from uem_ich_jax.models import sparse

SIZE = 96  # a 3x3 grid of 32x32 cells
GRID = (3, 3)
STRIDES = (4, 8, 16, 32)

# One mask per image: four random cells, one single visible cell, and the four
# corners (the middle row and the middle column fully masked).
VISIBLE = np.array(
    [
        [[1, 0, 1], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 0], [0, 0, 0], [0, 1, 0]],
        [[1, 0, 1], [0, 0, 0], [1, 0, 1]],
    ],
    bool,
)


# --- mask helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    "num_cells, ratio, expected",
    [(49, 0.6, 20), (144, 0.75, 36), (49, 0.0, 49), (4, 0.99, 1), (9, 0.5, 4), (1, 0.5, 1)],
)
def test_keep_count_rounds_like_spark(num_cells, ratio, expected):
  assert sparse.keep_count(num_cells, ratio) == expected


@pytest.mark.parametrize("num_cells, ratio", [(49, 1.0), (49, -0.1), (0, 0.5), (2.5, 0.5)])
def test_keep_count_rejects_bad_values(num_cells, ratio):
  with pytest.raises(InputError):
    sparse.keep_count(num_cells, ratio)


def test_draw_visible_keeps_exact_count():
  visible = sparse.draw_visible(jax.random.key(0), 16, (12, 12), 0.75)
  assert visible.shape == (16, 12, 12)
  assert visible.dtype == jnp.bool_
  np.testing.assert_array_equal(np.sum(visible, axis=(1, 2)), np.full(16, 36))
  # Different images get different cells.
  assert len({np.asarray(image).tobytes() for image in visible}) == 16


def test_draw_visible_reproducible_per_key():
  first = sparse.draw_visible(jax.random.key(5), 4, (7, 7), 0.6)
  again = jax.jit(sparse.draw_visible, static_argnums=(1, 2, 3))(jax.random.key(5), 4, (7, 7), 0.6)
  other = sparse.draw_visible(jax.random.key(6), 4, (7, 7), 0.6)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  np.testing.assert_array_equal(np.sum(first, axis=(1, 2)), np.full(4, 20))


def test_expand_repeats_cells():
  visible = jnp.array([[[True, False], [False, True]]])
  expanded = sparse.expand(visible, 3)
  assert expanded.shape == (1, 6, 6, 1)
  assert expanded.dtype == jnp.float32
  expected = np.kron(np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones((3, 3)))
  np.testing.assert_array_equal(expanded[0, :, :, 0], expected)


def test_mask_pyramid_shapes():
  pyramid = sparse.mask_pyramid(jnp.asarray(VISIBLE))
  assert sorted(pyramid) == [1, 4, 8, 16, 32]
  for stride, mask in pyramid.items():
    assert mask.shape == (3, SIZE // stride, SIZE // stride, 1)
  np.testing.assert_array_equal(pyramid[32][..., 0], VISIBLE.astype(np.float32))


# --- masked encoder -----------------------------------------------------------


def _randomise(model: nnx.Module, seed: int = 0) -> None:
  """Give every bias, norm and GRN parameter a spread, so each can leak if unmasked.

  At init LayerNorm and GRN biases are 0, and a missing re-mask would hide.
  """
  rng = np.random.default_rng(seed)
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, (nnx.Param, nnx.BatchStat)):
      continue
    name = str(path[-1])
    shape = variable.shape
    if name in ("bias", "beta", "gamma", "mean"):
      value = rng.normal(scale=0.5, size=shape)
    elif name == "scale":
      value = 1.0 + rng.normal(scale=0.2, size=shape)
    elif name == "var":
      value = 0.5 + np.abs(rng.normal(size=shape))
    elif "coordinate_attention" in map(str, path) and name == "kernel":
      value = rng.normal(scale=0.5, size=shape)
    else:
      continue
    variable.set_value(jnp.asarray(value, jnp.float32))


def _model(placement: str = "outputs"):
  model = build_convnext_v2(
      "atto", head=None, coordinate_attention_stages=(2, 3), coordinate_attention_placement=placement
  )
  _randomise(model)
  return model


@functools.cache
def _features_fn(placement: str, train: bool):
  """Return jitted masked and dense features() of one model, which drop train-mode BatchNorm updates."""
  model = _model(placement)
  if train:
    model.train()
  else:
    model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, x, visible):
    return nnx.merge(graphdef, state).features(x, visible)

  @jax.jit
  def dense(state, x):
    return nnx.merge(graphdef, state).features(x)

  return (lambda x, visible: features(state, x, visible)), (lambda x: dense(state, x))


def _images(seed: int = 0, batch: int = 3) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, SIZE, SIZE, 3), jnp.float32)


def _masked_fill(x: jax.Array, fill: jax.Array) -> jax.Array:
  """Keep `x` on visible cells and take `fill` under masked cells."""
  return jnp.where(sparse.expand(jnp.asarray(VISIBLE), 32) > 0, x, fill)


def _assert_zero_where_masked(maps):
  for stride, stage in zip(STRIDES, maps):
    mask = np.asarray(sparse.expand(jnp.asarray(VISIBLE), 32 // stride))
    masked_values = np.asarray(stage) * (1.0 - mask)
    assert np.all(masked_values == 0.0), f"stride {stride}: max {np.max(np.abs(masked_values))}"
    visible_values = np.asarray(stage)[np.broadcast_to(mask > 0, stage.shape)]
    assert np.count_nonzero(visible_values) > 0.9 * visible_values.size, f"stride {stride}"


@pytest.fixture(scope="module", params=["outputs", "inside"])
def placement(request):
  return request.param


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_visible_outputs_ignore_masked_pixels(placement, train):
  features, _ = _features_fn(placement, train)
  x = _images()
  visible = jnp.asarray(VISIBLE)
  reference = features(x, visible)
  _assert_zero_where_masked(reference)
  fills = {
      "zeros": jnp.zeros_like(x),
      "noise": 5.0 * _images(seed=1),
      "large": jnp.full_like(x, 1e6),
      "nan": jnp.full_like(x, jnp.nan),
  }
  for name, fill in fills.items():
    maps = features(_masked_fill(x, fill), visible)
    for stride, stage, expected in zip(STRIDES, maps, reference):
      np.testing.assert_allclose(stage, expected, rtol=1e-5, atol=1e-5, err_msg=f"{name}, stride {stride}")
  # The visible pixels do matter, so the comparisons above compared something.
  changed = features(_images(seed=2), visible)
  assert not np.allclose(changed[-1], reference[-1], atol=1e-3)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_all_visible_equals_dense(train):
  # "inside" runs every masked layer that "outputs" runs, and feeds attention on.
  features, dense = _features_fn("inside", train)
  x = _images()
  sparse_maps = features(x, jnp.ones((3, *GRID), bool))
  dense_maps = dense(x)
  # At XLA's optimisation level 0 (tests/conftest.py) the two programs sum the
  # batch statistics of training mode in other orders: up to 4e-5 apart by stride 16.
  for stride, stage, expected in zip(STRIDES, sparse_maps, dense_maps):
    np.testing.assert_allclose(stage, expected, rtol=1e-4, atol=1e-4, err_msg=f"stride {stride}")


def _masked_loss(model, x, visible):
  maps = model.features(x, visible)
  return sum(jnp.sum(jnp.square(stage.astype(jnp.float32))) for stage in maps)


# Gradients with respect to the parameters and the images. In train mode each
# call also moves the attention BatchNorm running statistics of its model.
_masked_gradients = nnx.jit(nnx.grad(_masked_loss, argnums=(0, 1)))


@functools.cache
def _train_model():
  model = _model("inside")
  model.train()
  return model


@pytest.mark.slow  # one gradient compile of the whole encoder, about 15 s on 2 CPU cores
@pytest.mark.parametrize("case", ["masked_image", "zero_image", "zero_channel", "zero_visible_cells"])
def test_masked_gradients_finite(case):
  x = _images()
  if case == "zero_image":
    x = jnp.zeros_like(x)
  elif case == "zero_channel":
    x = x.at[..., 1].set(0.0)
  elif case == "zero_visible_cells":
    x = _masked_fill(jnp.zeros_like(x), x)  # visible cells all 0, masked cells not
  param_grads, input_grads = _masked_gradients(_train_model(), x, jnp.asarray(VISIBLE))
  assert np.all(np.isfinite(input_grads))
  # No gradient reaches the masked pixels.
  masked = np.broadcast_to(np.asarray(sparse.expand(jnp.asarray(VISIBLE), 32)) == 0, x.shape)
  assert np.all(np.asarray(input_grads)[masked] == 0.0)
  leaves = jax.tree.leaves(nnx.state(param_grads, nnx.Param))
  assert leaves
  for leaf in leaves:
    assert np.all(np.isfinite(leaf))
  if case == "masked_image":
    assert np.any(np.asarray(input_grads) != 0.0)


def test_features_rejects_bad_mask_shape():
  model = build_convnext_v2("atto", head=None, coordinate_attention_stages=())
  x = jnp.zeros((2, 64, 64, 3))
  with pytest.raises(InputError, match="visible mask"):
    model.features(x, jnp.ones((2, 4, 4), bool))
  with pytest.raises(InputError, match="visible mask"):
    model.features(x, jnp.ones((2, 2, 2, 1), bool))


# --- masked layers against float64 references ---------------------------------


def _gelu64(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _block_reference(block, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A submanifold sparse ConvNeXt-V2 block in float64: visible positions only."""

  def value(variable):
    return np.asarray(variable[...], np.float64)

  x = x.astype(np.float64) * mask
  batch, height, width, channels = x.shape
  kernel = value(block.conv_dw.kernel)[:, :, 0, :]
  padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  y = np.zeros_like(x)
  for dy in range(7):
    for dx in range(7):
      y += padded[:, dy : dy + height, dx : dx + width, :] * kernel[dy, dx]
  y = (y + value(block.conv_dw.bias)) * mask
  mean = y.mean(axis=-1, keepdims=True)
  var = y.var(axis=-1, keepdims=True)
  y = (y - mean) / np.sqrt(var + 1e-6) * value(block.norm.scale) + value(block.norm.bias)
  y = _gelu64(y @ value(block.fc1.kernel) + value(block.fc1.bias)) * mask
  norm = np.sqrt(np.sum(y**2, axis=(1, 2), keepdims=True))
  ratio = norm / (norm.mean(axis=-1, keepdims=True) + 1e-6)
  y = (value(block.grn.gamma) * y * ratio + value(block.grn.beta) + y) * mask
  y = (y @ value(block.fc2.kernel) + value(block.fc2.bias)) * mask
  return x + y


def test_masked_block_matches_sparse_reference():
  model = _model()
  block = model.stages[0].blocks[0]
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 8, 40)).astype(np.float32)
  mask = np.asarray(sparse.expand(jnp.asarray(VISIBLE[:2, :2, :2]), 4))
  y = block(jnp.asarray(x * mask), jnp.asarray(mask))
  np.testing.assert_allclose(y, _block_reference(block, x, mask), rtol=1e-4, atol=1e-4)


def test_masked_grn_uses_visible_positions_only():
  grn = layers.GRN(6)
  rng = np.random.default_rng(4)
  grn.gamma.set_value(jnp.asarray(rng.normal(size=6), jnp.float32))
  grn.beta.set_value(jnp.asarray(rng.normal(size=6), jnp.float32))
  x = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  mask = np.zeros((2, 4, 4, 1), np.float32)
  mask[0, :2, :2] = 1.0
  mask[1, 3, :] = 1.0
  y = np.asarray(grn(jnp.asarray(x), jnp.asarray(mask)))
  assert np.all(y[np.broadcast_to(mask == 0, y.shape)] == 0.0)
  for index in range(2):
    visible = x[index][mask[index, ..., 0] > 0].astype(np.float64)  # (M, C)
    norm = np.sqrt(np.sum(visible**2, axis=0))
    ratio = norm / (norm.mean() + 1e-6)
    expected = np.asarray(grn.gamma[...]) * visible * ratio + np.asarray(grn.beta[...]) + visible
    np.testing.assert_allclose(y[index][mask[index, ..., 0] > 0], expected, rtol=1e-5, atol=1e-5)
