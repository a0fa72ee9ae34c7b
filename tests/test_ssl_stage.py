"""The ssl_pretrain stage: loss terms, optimisation, evaluation and the picture grid."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import sparse
from uem_ich_jax.models import spark
from uem_ich_jax.train import ssl
from uem_ich_jax.train import stages


def _config(**ssl_fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      "name": "convnext_v2",
      "variant": "atto",
      "coordinate_attention_stages": (2, 3),
      "drop_path_rate": 0.0,
      "dtype": "float32",
      "decoder_width": 32,
  })
  config.ssl = ml_collections.ConfigDict(dict(ssl.SSL_DEFAULTS, **ssl_fields))
  return config


def _images(batch: int = 2, size: int = 64) -> jax.Array:
  """Smooth shapes in [-1, 1]: a ramp plus a bright disc, different per image."""
  rows, columns = np.mgrid[0:size, 0:size] / size
  images = []
  for index in range(batch):
    disc = ((rows - 0.3 - 0.2 * index) ** 2 + (columns - 0.6) ** 2) < 0.05
    grey = 0.8 * (rows - 0.5) + 0.6 * disc - 0.2 * index
    images.append(np.stack([grey, 0.5 * grey, -grey], axis=-1))
  return jnp.asarray(np.clip(images, -1.0, 1.0), jnp.float32)


class StubModel(nnx.Module):
  """A 1x1 conv on the visible pixels: the SparK interface at a fraction of its cost."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 3, (1, 1), rngs=rngs)
    self.mask_stream = rngs["mask"]

  draw_visible = spark.SparK.draw_visible

  def __call__(self, images, visible):
    return self.conv(images * sparse.expand(visible, 32)).astype(jnp.float32)


@pytest.fixture
def stub():
  return StubModel(nnx.Rngs(params=0, mask=1))


@pytest.fixture(scope="module")
def model():
  return ssl.build_model(_config().model, seed=0)


@pytest.fixture
def texture_calls(monkeypatch):
  """Count the calls of the GLCM texture distance that the stage makes."""
  calls = []
  original = ssl.glcm.texture_distance

  def counting(*args, **kwargs):
    calls.append(kwargs)
    return original(*args, **kwargs)

  monkeypatch.setattr(ssl.glcm, "texture_distance", counting)
  return calls


def test_stage_registry_fields():
  assert ssl.STAGE.name == "ssl_pretrain"
  assert ssl.STAGE.batch_keys == ("image", "valid")
  metrics = ssl.STAGE.train_metrics.single_from_model_output(
      loss=1.0, mse=0.5, glcm=2.0, masked_fraction=0.75
  )
  assert set(metrics.compute()) == {"loss", "mse", "glcm", "masked_fraction"}


def test_build_model_rejects_other_models():
  config = _config()
  config.model.name = "tiny_cnn"
  with pytest.raises(InputError, match="tiny_cnn"):
    ssl.build_model(config.model, seed=0)


def test_glcm_term_skipped_at_weight_zero(stub, texture_calls):
  batch = {"image": _images(), "valid": jnp.array([True, True])}
  value, outputs = ssl.loss(stub, batch, _config(glcm_weight=0.0))
  assert texture_calls == []
  assert float(outputs["glcm"]) == 0.0
  assert float(value) == float(outputs["mse"])
  assert float(outputs["masked_fraction"]) == pytest.approx(0.75)


def test_glcm_term_added_with_weight(stub, texture_calls):
  batch = {"image": _images(), "valid": jnp.array([True, True])}
  value, outputs = ssl.loss(stub, batch, _config(glcm_weight=0.5, glcm_levels=8))
  assert len(texture_calls) == 1
  assert texture_calls[0]["levels"] == 8
  assert texture_calls[0]["distances"] == (1, 2, 4)
  assert float(outputs["glcm"]) > 0.0
  np.testing.assert_allclose(value, outputs["mse"] + 0.5 * outputs["glcm"], rtol=1e-6)


def test_glcm_region_is_masked_pixels(stub, texture_calls):
  batch = {"image": _images(), "valid": jnp.array([True, True])}
  ssl.loss(stub, batch, _config(glcm_weight=0.1, mask_ratio=0.5))
  region = np.asarray(texture_calls[0]["region"])[..., 0]
  assert region.shape == (2, 64, 64)
  # Two of four 32x32 cells are masked: half the pixels, in whole cells.
  np.testing.assert_array_equal(region.mean(axis=(1, 2)), [0.5, 0.5])
  cells = region.reshape(2, 2, 32, 2, 32)
  assert np.all(cells.min(axis=(2, 4)) == cells.max(axis=(2, 4)))


def test_invalid_rows_do_not_count():
  images = _images()
  valid = jnp.array([True, False])
  config = _config(glcm_weight=0.2)
  # Two stubs with the same seeds draw the same masks.
  value, _ = ssl.loss(StubModel(nnx.Rngs(params=0, mask=1)), {"image": images, "valid": valid}, config)
  changed = images.at[1].set(jnp.roll(images[1], 7, axis=1))
  changed_value, _ = ssl.loss(
      StubModel(nnx.Rngs(params=0, mask=1)), {"image": changed, "valid": valid}, config
  )
  assert float(changed_value) == float(value)
  other_changed = images.at[0].set(jnp.roll(images[0], 7, axis=1))
  other_row, _ = ssl.loss(
      StubModel(nnx.Rngs(params=0, mask=1)), {"image": other_changed, "valid": valid}, config
  )
  assert float(other_row) != float(value)


def test_eval_outputs_use_fixed_masks(stub):
  batch = {"image": _images(), "valid": jnp.array([True, True])}
  first = ssl.eval_outputs(stub, batch)
  stub.mask_stream()  # advance the stream, which training masks come from
  second = ssl.eval_outputs(stub, batch)
  assert first["mse"].shape == (2,)
  assert first["glcm"].shape == (2,)
  np.testing.assert_array_equal(first["mse"], second["mse"])
  np.testing.assert_array_equal(first["glcm"], second["glcm"])


def test_evaluate_weights_texture_term():
  outputs = {"mse": np.array([1.0, 3.0]), "glcm": np.array([2.0, 4.0])}
  scalars, result = ssl.evaluate(outputs, validation=None, config=_config(glcm_weight=0.1))
  assert scalars == pytest.approx({"loss": 2.3, "mse": 2.0, "glcm": 3.0})
  assert result["n"] == 2
  with pytest.raises(InputError, match="empty"):
    ssl.evaluate(
        {"mse": np.zeros(0), "glcm": np.zeros(0)}, validation=None, config=_config()
    )


@pytest.mark.slow
def test_adam_steps_reduce_loss(model):
  # One GLCM offset and 4 levels: the term and its gradient are in the step,
  # with one offset to compile where the defaults have twelve.
  config = _config(glcm_weight=0.1, glcm_distances=(1,), glcm_angles=(0,), glcm_levels=4)
  train_view = nnx.view(model, deterministic=False, use_running_average=False)
  graphdef, params, rngs, extra = stages.split_model(train_view)
  batch = {"image": _images(), "valid": jnp.array([True, True])}
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, extra):
    def loss_fn(params):
      # The same RNG state every step: the same masks, so the loss measures fitting.
      module = nnx.merge(graphdef, params, rngs, extra)
      value, outputs = ssl.loss(module, batch, config)
      return value, (outputs, stages.split_model(module)[3])

    (value, (outputs, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, extra, value, outputs

  opt_state = optimizer.init(params)
  values = []
  for _ in range(8):
    params, opt_state, extra, value, outputs = step(params, opt_state, extra)
    values.append(float(value))
  assert np.all(np.isfinite(values))
  assert float(outputs["glcm"]) > 0.0
  assert values[-1] < 0.95 * values[0], values


def test_write_images_png(model, tmp_path):
  images = np.asarray(_images(batch=2))
  path = tmp_path / "pictures" / "step_10.png"
  ssl.write_images(model, images, path, _config())
  with Image.open(path) as picture:
    assert picture.format == "PNG"
    assert picture.size == (4 * 64, ssl.HEADER_HEIGHT + 2 * 64)
    pixels = np.asarray(picture.convert("L"))

  visible = np.asarray(
      model.draw_visible(jnp.asarray(images), 0.75, key=jax.random.key(ssl.EVAL_MASK_SEED))
  )
  pixel_visible = np.asarray(sparse.expand(jnp.asarray(visible), 32))[..., 0] > 0
  grey = np.round((np.clip(images[..., 0], -1, 1) + 1) * 127.5).astype(np.uint8)
  for row in range(2):
    top = ssl.HEADER_HEIGHT + row * 64
    tiles = [pixels[top : top + 64, column * 64 : (column + 1) * 64] for column in range(4)]
    np.testing.assert_array_equal(tiles[0], grey[row])
    mask = pixel_visible[row]
    np.testing.assert_array_equal(tiles[1][mask], grey[row][mask])
    np.testing.assert_array_equal(tiles[3][mask], grey[row][mask])
    # Masked cells show the hatch in the masked column and the reconstruction when pasted.
    assert set(np.unique(tiles[1][~mask])) == {64, 128}
    np.testing.assert_array_equal(tiles[3][~mask], tiles[2][~mask])
  assert pixels[: ssl.HEADER_HEIGHT].max() > 0  # the column titles


def test_write_images_limits_rows(model, tmp_path):
  images = np.repeat(np.asarray(_images(batch=1)), 10, axis=0)
  path = tmp_path / "grid.png"
  ssl.write_images(model, images, path, _config(norm_pix_loss=False))
  with Image.open(path) as picture:
    assert picture.size == (4 * 64, ssl.HEADER_HEIGHT + ssl.MAX_IMAGE_ROWS * 64)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mask_ratio", 0.0, "mask_ratio must be a number in"),
        ("mask_ratio", 1.0, "mask_ratio must be a number in"),
        ("glcm_weight", -0.1, "glcm_weight must be a finite number"),
        ("glcm_levels", 1, "glcm_levels must be an integer of at least 2"),
        ("glcm_distances", (), "glcm_distances must be positive"),
        ("glcm_distances", (0,), "glcm_distances must be positive"),
        ("glcm_angles", (), "glcm_angles must be finite"),
    ],
)
def test_check_config_names_the_bad_field(field, value, message):
  with pytest.raises(InputError, match=message):
    ssl.check_config(_config(**{field: value}))


def test_check_config_accepts_the_defaults():
  ssl.check_config(_config())
  # With the texture term off its settings are not read.
  ssl.check_config(_config(glcm_weight=0.0, glcm_levels=1))


@pytest.mark.parametrize(
    ("size", "message"), [((32, 32), "single 32x32 cell"), ((48, 64), "positive multiples of 32")]
)
def test_draw_visible_rejects_unusable_sizes(stub, size, message):
  with pytest.raises(InputError, match=message):
    stub.draw_visible(jnp.zeros((1, *size, 3)), 0.75)
