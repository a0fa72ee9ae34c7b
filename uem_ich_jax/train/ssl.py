"""The `ssl_pretrain` stage: SparK masked image modelling with a GLCM texture term.

Loss: squared error on the masked 32x32 cells (targets normalised per cell when
`config.ssl.norm_pix_loss`), plus `config.ssl.glcm_weight` times the GLCM
texture distance between the reconstruction and the input over the masked
pixels. Evaluation reports the same two terms per example with masks drawn
from a fixed key, so validation numbers compare across steps and runs.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx
from PIL import Image
from PIL import ImageDraw

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import glcm
from uem_ich_jax.models import sparse
from uem_ich_jax.models import spark
from uem_ich_jax.train import losses
from uem_ich_jax.train import stages

# `config.ssl` fields and the values used where a config lacks them.
SSL_DEFAULTS = {
    "mask_ratio": 0.75,  # fraction of 32x32 cells hidden from the encoder
    "norm_pix_loss": True,  # normalise each target cell (SparK's default)
    "glcm_weight": 0.1,  # weight of the texture term; 0 skips its computation
    "glcm_distances": (1, 2, 4),  # co-occurrence offsets in pixels
    "glcm_angles": (0, 45, 90, 135),  # co-occurrence directions in degrees
    "glcm_levels": 16,  # grey levels of the soft co-occurrence matrix
}

DEFAULT_DECODER_WIDTH = 256

# Evaluation and pictures draw masks from this key, whatever the config's
# seed, so that every evaluation of a run scores the same cells.
EVAL_MASK_SEED = 0

# Pictures: at most this many rows, a header of this height, and these columns.
MAX_IMAGE_ROWS = 8
HEADER_HEIGHT = 16
COLUMN_TITLES = ("input", "masked", "recon", "pasted")


def ssl_setting(config: ml_collections.ConfigDict | None, name: str) -> Any:
  """Return `config.ssl.<name>`, or its `SSL_DEFAULTS` value when the config lacks it."""
  section = None if config is None else config.get("ssl")
  if section is None:
    return SSL_DEFAULTS[name]
  return section.get(name, SSL_DEFAULTS[name])


def check_config(config: ml_collections.ConfigDict) -> None:
  """Reject `config.ssl` values that cannot train, before anything is compiled."""
  ratio = ssl_setting(config, "mask_ratio")
  if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
    raise InputError(f"config.ssl.mask_ratio must be a number in (0, 1), got {ratio!r}")
  weight = ssl_setting(config, "glcm_weight")
  if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
    raise InputError(f"config.ssl.glcm_weight must be a finite number >= 0, got {weight!r}")
  if weight == 0:
    return
  levels = ssl_setting(config, "glcm_levels")
  if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
    raise InputError(f"config.ssl.glcm_levels must be an integer of at least 2, got {levels!r}")
  distances = tuple(np.atleast_1d(ssl_setting(config, "glcm_distances")).tolist())
  if not distances or any(not isinstance(d, int) or d < 1 for d in distances):
    raise InputError(
        f"config.ssl.glcm_distances must be positive integer pixel distances, got {distances!r}"
    )
  angles = tuple(np.atleast_1d(ssl_setting(config, "glcm_angles")).tolist())
  if not angles or any(
      not isinstance(a, (int, float)) or not np.isfinite(a) for a in angles
  ):
    raise InputError(f"config.ssl.glcm_angles must be finite angles in degrees, got {angles!r}")


def build_model(model: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
  """Build the SparK model that `config.model` names, in evaluation mode.

  Streams: `params` from `seed`, `dropout` (drop path) from `seed + 1` and
  `mask` from `seed + 2`. The trainer replaces the keys of the last two with
  keys derived from (seed, step) at every step.
  """
  if model.name != "convnext_v2":
    raise InputError(
        f"config.model.name {model.name!r} cannot be pretrained with SparK; expected 'convnext_v2'"
    )

  encoder_config = stages.encoder_config(model)
  rngs = nnx.Rngs(params=seed, dropout=seed + 1, mask=seed + 2)
  return spark.SparK(
      encoder_config,
      decoder_width=model.get("decoder_width", DEFAULT_DECODER_WIDTH),
      rngs=rngs,
  )


# Running means over the steps between two log lines. `glcm` is 0 when the
# texture term is off (glcm_weight 0), because it is then never computed.
TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    mse=clu_metrics.Average.from_output("mse"),
    glcm=clu_metrics.Average.from_output("glcm"),
    masked_fraction=clu_metrics.Average.from_output("masked_fraction"),
)


def _texture_distance(
    prediction: jax.Array,
    images: jax.Array,
    visible: jax.Array,
    config: ml_collections.ConfigDict | None,
) -> jax.Array:
  """Per-example GLCM distance between a reconstruction and its input, over masked pixels."""
  if ssl_setting(config, "norm_pix_loss"):
    prediction = spark.denormalise(prediction, images)
  masked_pixels = 1.0 - sparse.expand(visible, spark.PATCH)
  return glcm.texture_distance(
      prediction,
      images.astype(jnp.float32),
      region=masked_pixels,
      distances=tuple(ssl_setting(config, "glcm_distances")),
      angles=tuple(ssl_setting(config, "glcm_angles")),
      levels=int(ssl_setting(config, "glcm_levels")),
      value_range=(-1.0, 1.0),
  ).astype(jnp.float32)


def loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the training loss of one batch with fresh masks. Rows with `valid` False do not count."""
  images = batch["image"]
  valid = batch["valid"]
  visible = model.draw_visible(images, float(ssl_setting(config, "mask_ratio")))
  prediction = model(images, visible)
  mse, _ = spark.reconstruction_loss(
      prediction,
      images,
      visible,
      weights=valid,
      normalise=bool(ssl_setting(config, "norm_pix_loss")),
  )
  weight = float(ssl_setting(config, "glcm_weight"))
  if weight:
    texture = losses.masked_mean(_texture_distance(prediction, images, visible, config), valid)
    value = mse + weight * texture
  else:
    texture = jnp.zeros((), jnp.float32)
    value = mse
  masked_fraction = 1.0 - jnp.mean(visible.astype(jnp.float32), axis=(1, 2))
  return value, {
      "loss": value,
      "mse": mse,
      "glcm": texture,
      "masked_fraction": losses.masked_mean(masked_fraction, valid),
  }


def eval_outputs(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    config: ml_collections.ConfigDict | None = None,
) -> dict[str, jax.Array]:
  """Per-example masked-cell error `mse` and texture distance `glcm`, masks from a fixed key.

  The texture distance is computed even when its loss weight is 0, so runs
  with and without the term compare on it. Without `config`, the
  `SSL_DEFAULTS` settings apply.
  """
  images = batch["image"]
  key = jax.random.key(EVAL_MASK_SEED)
  visible = model.draw_visible(images, float(ssl_setting(config, "mask_ratio")), key=key)
  prediction = model(images, visible)
  _, mse = spark.reconstruction_loss(
      prediction, images, visible, normalise=bool(ssl_setting(config, "norm_pix_loss"))
  )
  return {"mse": mse, "glcm": _texture_distance(prediction, images, visible, config)}


def evaluate(
    outputs: Mapping[str, np.ndarray],
    *,
    validation: Mapping[str, np.ndarray] | None,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Mean `mse`, `glcm` and their weighted sum `loss` over the rows; `validation` is unused."""
  del validation  # Nothing is chosen on a validation split.
  mse = np.asarray(outputs["mse"], np.float64)
  texture = np.asarray(outputs["glcm"], np.float64)
  if mse.size == 0:
    raise InputError("no valid examples to evaluate; the evaluated split is empty")
  scalars = {
      "loss": float(mse.mean() + ssl_setting(config, "glcm_weight") * texture.mean()),
      "mse": float(mse.mean()),
      "glcm": float(texture.mean()),
  }
  return scalars, dict(scalars, n=int(mse.size))


# ---------------------------------------------------------------- Pictures ---


def _to_grey(values: np.ndarray) -> np.ndarray:
  """Map [-1, 1] to uint8 0..255, clipping outside values."""
  return np.round((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _hatch(height: int, width: int) -> np.ndarray:
  """Return a mid-grey uint8 (height, width) tile with dark diagonal lines every 8 pixels."""
  rows, columns = np.indices((height, width))
  return np.where((rows + columns) % 8 == 0, 64, 128).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, visible: jax.Array
) -> jax.Array:
  # An eager forward pass compiles each operation on its own: 10 s against
  # 3.4 s jitted for atto at 64x64 on 2 CPU cores. The graph is a static
  # argument, so later pictures of a run reuse the compiled function.
  return nnx.merge(graphdef, state)(images, visible)


def write_images(
    model: nnx.Module,
    images: np.ndarray,
    path: pathlib.Path,
    config: ml_collections.ConfigDict,
) -> None:
  """Write one PNG grid: input | masked input | reconstruction | reconstruction with visible cells pasted.

  One row per example (the first `MAX_IMAGE_ROWS` of `images`, NHWC in
  [-1, 1]), the brain window (channel 0) in grey. Masked cells are hatched
  grey in the second column. Masks come from a fixed key, and the model runs
  in evaluation mode without `model` itself being switched.
  """
  images = np.asarray(images, np.float32)[:MAX_IMAGE_ROWS]
  if images.ndim != 4 or images.shape[0] == 0:
    raise InputError(f"write_images needs a non-empty NHWC batch, got shape {images.shape}")
  view = nnx.view(model, deterministic=True, use_running_average=True)
  x = jnp.asarray(images)
  key = jax.random.key(EVAL_MASK_SEED)
  visible = view.draw_visible(x, float(ssl_setting(config, "mask_ratio")), key=key)
  graphdef, state = nnx.split(view)
  prediction = _reconstruct(graphdef, state, x, visible)
  if ssl_setting(config, "norm_pix_loss"):
    prediction = spark.denormalise(prediction, x)
  pixel_visible = np.asarray(sparse.expand(visible, spark.PATCH))[..., 0] > 0

  brain = images[..., 0]
  reconstruction = np.asarray(prediction)[..., 0]
  rows, height, width = brain.shape
  hatch = _hatch(height, width)
  columns = [
      _to_grey(brain),
      np.where(pixel_visible, _to_grey(brain), hatch),
      _to_grey(reconstruction),
      _to_grey(np.where(pixel_visible, brain, reconstruction)),
  ]

  canvas = np.zeros((HEADER_HEIGHT + rows * height, len(columns) * width), np.uint8)
  for column, tiles in enumerate(columns):
    for row in range(rows):
      top = HEADER_HEIGHT + row * height
      canvas[top : top + height, column * width : (column + 1) * width] = tiles[row]
  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  for column, title in enumerate(COLUMN_TITLES):
    draw.text((column * width + 2, 2), title, fill=255)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture.save(path, format="PNG")


class _SSLStage:
  name = "ssl_pretrain"
  batch_keys = ("image", "valid")
  # Parameters under this path are the encoder that training exports.
  encoder_path = "encoder"
  train_metrics = TrainMetrics
  build_model = staticmethod(build_model)
  loss = staticmethod(loss)
  eval_outputs = staticmethod(eval_outputs)
  evaluate = staticmethod(evaluate)
  write_images = staticmethod(write_images)
  check_config = staticmethod(check_config)


STAGE = _SSLStage()
