"""SparK model and loss: shapes, masked-cell loss, per-cell normalisation, no leak of masked pixels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import sparse
from uem_ich_jax.models import spark
from uem_ich_jax.train import stages

DECODER_WIDTH = 32


@pytest.fixture(scope="module")
def model() -> spark.SparK:
  return spark.build_spark("atto", decoder_width=DECODER_WIDTH, seed=0)


def _forward(graphdef, state, images, visible):
  return nnx.merge(graphdef, state)(images, visible)


forward = jax.jit(_forward, static_argnums=0)


def _images(key: int, shape=(2, 64, 64, 3)) -> jax.Array:
  return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


def _numpy_normalised_cells(target: np.ndarray, patch: int) -> np.ndarray:
  """(N, gh, gw, p, p, C) cells of `target`, each normalised with ddof=1, by explicit loops."""
  batch, height, width, channels = target.shape
  cells = np.zeros((batch, height // patch, width // patch, patch, patch, channels))
  for n in range(batch):
    for i in range(height // patch):
      for j in range(width // patch):
        cell = target[n, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].astype(np.float64)
        cells[n, i, j] = (cell - cell.mean()) / np.sqrt(cell.var(ddof=1) + 1e-6)
  return cells


@pytest.mark.parametrize("height, width", [(64, 64), (96, 128)])
def test_reconstruction_shape_matches_input(model, height, width):
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  visible = jax.ShapeDtypeStruct((2, height // 32, width // 32), jnp.bool_)
  output = jax.eval_shape(functools.partial(_forward, graphdef), state, images, visible)
  assert output.shape == (2, height, width, 3)
  assert output.dtype == jnp.float32


def test_decoder_widths_halve_per_block(model):
  widths = [block.conv2.out_features for block in model.decoder.blocks]
  assert widths == [16, 8, 4, 2, 1]
  projections = [densify.projection.out_features for densify in model.densify]
  assert projections == [32, 16, 8, 4]
  assert model.densify[0].projection.kernel_size == (1, 1)
  assert model.densify[1].projection.kernel_size == (3, 3)


def test_upsampling_doubles_odd_sizes():
  block = spark.UpBlock(4, dtype=jnp.float32, rngs=nnx.Rngs(0))
  output = block(jnp.ones((1, 3, 5, 4)))
  assert output.shape == (1, 6, 10, 2)


def test_encoder_parameters_under_encoder(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert "stem_conv" in params["encoder"]
  assert model.encoder.head is None
  assert set(params) == {"encoder", "densify", "decoder"}


def test_invalid_decoder_width_raises():
  config = spark.ConvNeXtV2Config(variant="atto", head=None)
  with pytest.raises(InputError, match="decoder_width"):
    spark.SparK(config, decoder_width=48, rngs=nnx.Rngs(0))


def test_patchify_cell_order_and_inverse():
  x = _images(0, (2, 64, 96, 3))
  cells = spark.patchify(x, 32)
  assert cells.shape == (2, 2, 3, 32 * 32 * 3)
  np.testing.assert_array_equal(cells[1, 1, 2], x[1, 32:64, 64:96, :].reshape(-1))
  np.testing.assert_array_equal(spark.unpatchify(cells, 32), x)


def test_normalisation_matches_numpy_reference():
  target = np.asarray(_images(1, (2, 64, 32, 3)))
  expected = _numpy_normalised_cells(target, 16)
  normalised = np.asarray(spark.normalise_per_cell(jnp.asarray(target), 16))
  actual = normalised.reshape(2, 4, 16, 2, 16, 3).transpose(0, 1, 3, 2, 4, 5)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_denormalise_inverts_normalisation():
  target = _images(2, (2, 64, 64, 3)) * 0.3 + 0.2
  restored = spark.denormalise(spark.normalise_per_cell(target), target)
  np.testing.assert_allclose(restored, target, atol=1e-5)


def test_loss_matches_numpy_reference():
  target = np.asarray(_images(3))
  prediction = np.asarray(_images(4))
  visible = np.array([[[True, False], [False, False]], [[False, True], [True, True]]])
  loss, per_example = spark.reconstruction_loss(
      jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(visible)
  )

  cells = _numpy_normalised_cells(target, 32)
  predicted = prediction.reshape(2, 2, 32, 2, 32, 3).transpose(0, 1, 3, 2, 4, 5)
  errors = np.mean((predicted - cells) ** 2, axis=(3, 4, 5))
  masked = ~visible
  # Row 0 has three masked cells and row 1 one: the loss is their global mean.
  np.testing.assert_allclose(loss, errors[masked].mean(), rtol=1e-5)
  np.testing.assert_allclose(per_example[0], errors[0][masked[0]].mean(), rtol=1e-5)
  np.testing.assert_allclose(per_example[1], errors[1][masked[1]].mean(), rtol=1e-5)


def test_loss_without_normalisation_uses_raw_target():
  target = _images(5)
  visible = jnp.zeros((2, 2, 2), bool)
  loss, _ = spark.reconstruction_loss(target + 0.5, target, visible, normalise=False)
  np.testing.assert_allclose(loss, 0.25, rtol=1e-5)


def test_loss_ignores_visible_cells():
  target = _images(6)
  prediction = _images(7)
  visible = jnp.array([[[True, False], [False, True]], [[False, False], [True, False]]])
  loss, _ = spark.reconstruction_loss(prediction, target, visible)

  visible_changed = prediction.at[0, :32, :32].add(5.0)  # cell (0, 0) of row 0 is visible
  changed_loss, _ = spark.reconstruction_loss(visible_changed, target, visible)
  assert float(changed_loss) == float(loss)

  masked_changed = prediction.at[0, :32, 32:].add(5.0)  # cell (0, 1) of row 0 is masked
  changed_loss, _ = spark.reconstruction_loss(masked_changed, target, visible)
  assert float(changed_loss) > float(loss) + 1.0


def test_loss_weights_exclude_rows():
  target = _images(8)
  prediction = _images(9)
  visible = jnp.zeros((2, 2, 2), bool)
  weights = jnp.array([True, False])
  loss, per_example = spark.reconstruction_loss(prediction, target, visible, weights=weights)
  np.testing.assert_allclose(loss, per_example[0], rtol=1e-6)

  changed, _ = spark.reconstruction_loss(
      prediction.at[1].add(3.0), target, visible, weights=weights
  )
  assert float(changed) == float(loss)


def test_loss_rejects_mismatched_mask():
  images = _images(10)
  with pytest.raises(InputError, match="visible mask shape"):
    spark.reconstruction_loss(images, images, jnp.ones((2, 3, 2), bool))


def test_gradients_finite_and_reach_every_part(model):
  train_view = nnx.view(model, deterministic=False, use_running_average=False)
  # Plain arrays, as the trainer passes them: merged Variables then belong to
  # the trace of the loss and BatchNorm may update them there.
  graphdef, params, rngs, extra = stages.split_model(train_view)
  images = _images(11)
  visible = sparse.draw_visible(jax.random.key(0), 2, (2, 2), 0.75)

  @jax.jit
  def loss_and_grad(params, rngs, extra):
    def loss_fn(params):
      module = nnx.merge(graphdef, params, rngs, extra)
      loss, _ = spark.reconstruction_loss(module(images, visible), images, visible)
      return loss, nnx.state(module, nnx.BatchStat)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, batch_stats), grads = loss_and_grad(params, rngs, extra)
  assert np.isfinite(float(loss))
  flat = stages.flatten(grads)
  for name, grad in flat.items():
    assert np.all(np.isfinite(grad)), name
  assert np.any(flat["encoder/stem_conv/kernel"] != 0)
  assert np.any(flat["densify/3/mask_token"] != 0)
  assert np.any(flat["decoder/projection/kernel"] != 0)
  # Training mode updates the decoder's running statistics from the batch.
  running_mean = nnx.to_pure_dict(batch_stats)["decoder"]["blocks"][0]["norm1"]["mean"]
  assert np.any(np.asarray(running_mean) != 0)


def test_masked_pixels_do_not_reach_reconstruction(model):
  graphdef, state = nnx.split(model)
  images = _images(12)
  visible = jnp.array([[[True, False], [False, False]], [[False, False], [False, True]]])
  pixel_visible = sparse.expand(visible, 32) > 0
  reconstruction = forward(graphdef, state, images, visible)

  noise = _images(13) * 100.0
  masked_changed = jnp.where(pixel_visible, images, noise)
  np.testing.assert_array_equal(forward(graphdef, state, masked_changed, visible), reconstruction)

  # Control: the same change on visible pixels does change the reconstruction.
  visible_changed = jnp.where(pixel_visible, noise, images)
  assert not np.allclose(forward(graphdef, state, visible_changed, visible), reconstruction)


def test_draw_visible_uses_mask_stream(model):
  images = jnp.zeros((2, 64, 96, 3))
  first = model.draw_visible(images, 0.5)
  assert first.shape == (2, 2, 3)
  assert np.all(np.sum(first, axis=(1, 2)) == 3)
  fixed = model.draw_visible(images, 0.5, key=jax.random.key(3))
  np.testing.assert_array_equal(fixed, model.draw_visible(images, 0.5, key=jax.random.key(3)))
  draws = [np.asarray(model.draw_visible(images, 0.5)) for _ in range(4)]
  assert any(not np.array_equal(draw, first) for draw in draws)


def test_draw_visible_rejects_nothing_masked(model):
  with pytest.raises(InputError, match="nothing is left to reconstruct"):
    model.draw_visible(jnp.zeros((2, 32, 32, 3)), 0.75)
