"""SparK masked image modelling (Tian et al. 2023) around the ConvNeXt-V2 encoder.

The encoder receives only the visible 32x32 cells (`ConvNeXtV2.features(x,
visible)` keeps every masked position at exactly 0). Each of its four maps is
densified: LayerNorm at visible positions, a learned mask token of that scale
at masked ones, and a projection to the decoder width of that scale. A
UNet-style light decoder adds the densified maps from stride 32 down to
stride 4 and upsamples to the input resolution. The loss is the squared error
on masked cells only, against targets normalised per cell.

The layout follows SparK's `pretrain/spark.py` and `pretrain/decoder.py`
(keyu-tian/SparK); the encoder parameters live under `encoder/`, so that
subtree is the pretrained ConvNeXt-V2 without a head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import layers
from uem_ich_jax.models import sparse
from uem_ich_jax.models.convnext_v2 import TOTAL_STRIDE
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2Config

# Pixels per side of one mask cell and one loss cell: the encoder's total
# stride, as in SparK, which has no separate patch-size setting.
PATCH = TOTAL_STRIDE

# Upsampling blocks of the decoder: log2(32), from stride 32 to full resolution.
DECODER_BLOCKS = 5

# Encoder scales that feed the decoder (strides 32, 16, 8 and 4).
SKIP_SCALES = 4

# Added to the per-cell target variance before the square root (SparK and FCMAE).
TARGET_EPSILON = 1e-6

# Added to the masked-cell count, so a batch without masked cells gives 0, not NaN.
COUNT_EPSILON = 1e-8

# PyTorch's default Conv2d kernel init, kaiming_uniform(a=sqrt(5)), is
# uniform with variance 1 / (3 fan_in). SparK keeps it for the projections.
# Their biases start at 0 here, where PyTorch draws them uniformly.
TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# SparK's init of ConvTranspose2d: Kaiming normal, fan_out, ReLU gain.
UPSAMPLE_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
    in_features: int,
    out_features: int,
    size: int,
    *,
    use_bias: bool,
    kernel_init: nnx.Initializer,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(size, size),
      padding="SAME",
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=layers.ZEROS,
      rngs=rngs,
  )


class Densify(nnx.Module):
  """Turn one sparse encoder map into a dense decoder input.

  LayerNorm (epsilon 1e-6) is kept at visible positions only, masked positions
  take the scale's learned mask token, and a convolution projects the map to
  the decoder width of that scale.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.norm = layers.layer_norm(in_features, dtype=dtype, rngs=rngs)
    # SparK draws the token from a normal with std 0.02 cut at +-0.02 (1 std).
    # This uses the encoder's init, cut at 2 std, so its spread is about twice
    # SparK's; both are small next to the unit-scale LayerNorm outputs.
    self.mask_token = nnx.Param(layers.WEIGHT_INIT(rngs.params(), (in_features,), jnp.float32))
    self.projection = _conv(
        in_features,
        out_features,
        kernel_size,
        use_bias=True,
        kernel_init=TORCH_CONV_INIT,
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Densify `x` (N, h, w, C); `mask` (N, h, w, 1) is 1 at visible positions."""
    normed = self.norm(x)
    token = self.mask_token[...].astype(normed.dtype)
    dense = jnp.where(mask > 0, normed, token)
    return self.projection(dense)


class UpBlock(nnx.Module):
  """One decoder block: ConvTranspose 4x4 stride 2 (C -> C), conv3x3 + BN + ReLU6,
  conv3x3 (C -> C/2) + BN. The convolutions have no bias because BN follows."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    # Padding 2 on each side of the dilated input gives exactly 2x the input
    # size and equals PyTorch's ConvTranspose2d(4, stride=2, padding=1), whose
    # (in, out, kh, kw) weight maps to this kernel by transpose (2, 3, 1, 0).
    self.upsample = nnx.ConvTranspose(
        channels,
        channels,
        kernel_size=(4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        transpose_kernel=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=UPSAMPLE_INIT,
        bias_init=layers.ZEROS,
        rngs=rngs,
    )
    self.conv1 = _conv(
        channels, channels, 3, use_bias=False, kernel_init=layers.WEIGHT_INIT, dtype=dtype, rngs=rngs
    )
    self.norm1 = layers.batch_norm(channels, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(
        channels,
        channels // 2,
        3,
        use_bias=False,
        kernel_init=layers.WEIGHT_INIT,
        dtype=dtype,
        rngs=rngs,
    )
    self.norm2 = layers.batch_norm(channels // 2, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.upsample(x)
    x = jax.nn.relu6(self.norm1(self.conv1(x)))
    return self.norm2(self.conv2(x))


class LightDecoder(nnx.Module):
  """SparK's UNet-style decoder: widths D, D/2, ..., D/32, then a 1x1 conv to 3 channels.

  `skips[i]` (width D / 2**i) is added before block i; the first skip is at
  stride 32 and the last block has none.
  """

  def __init__(self, width: int, out_channels: int = 3, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.blocks = nnx.List(
        [UpBlock(width // 2**index, dtype=dtype, rngs=rngs) for index in range(DECODER_BLOCKS)]
    )
    self.projection = _conv(
        width // 2**DECODER_BLOCKS,
        out_channels,
        1,
        use_bias=True,
        kernel_init=layers.WEIGHT_INIT,
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, skips: tuple[jax.Array, ...]) -> jax.Array:
    x = skips[0]
    for index, block in enumerate(self.blocks):
      if 0 < index < len(skips):
        x = x + skips[index]
      x = block(x)
    return self.projection(x)


class SparK(nnx.Module):
  """ConvNeXt-V2 encoder (no head), per-scale densifiers and the light decoder.

  `__call__(images, visible)` returns the raw float32 reconstruction
  (N, H, W, 3). Trained against per-cell normalised targets, it predicts
  normalised values, which `denormalise` maps back to image values.

  The model starts in evaluation mode, like the encoder. Masks come from the
  `mask` stream of `rngs` through `draw_visible`; a trainer that refreshes
  every RNG stream per step gets fresh masks per step.
  """

  def __init__(self, config: ConvNeXtV2Config, *, decoder_width: int = 256, rngs: nnx.Rngs):
    if decoder_width < 2**DECODER_BLOCKS or decoder_width % 2**DECODER_BLOCKS:
      raise InputError(
          f"decoder_width must be a positive multiple of {2**DECODER_BLOCKS} (it halves"
          f" {DECODER_BLOCKS} times), got {decoder_width}"
      )
    config = dataclasses.replace(config, head=None)
    self.config = config
    self.decoder_width = decoder_width
    self.encoder = ConvNeXtV2(config, rngs=rngs)

    # Scale i has stride 32 / 2**i and decoder width D / 2**i. SparK projects
    # the deepest map with a 1x1 conv and the others with a 3x3.
    encoder_widths = config.widths[::-1]
    self.densify = nnx.List([
        Densify(
            encoder_widths[scale],
            decoder_width // 2**scale,
            1 if scale == 0 else 3,
            dtype=config.dtype,
            rngs=rngs,
        )
        for scale in range(SKIP_SCALES)
    ])
    self.decoder = LightDecoder(decoder_width, config.in_channels, dtype=config.dtype, rngs=rngs)
    self.mask_stream = rngs["mask"]

  def draw_visible(
      self, images: jax.Array, mask_ratio: float, *, key: jax.Array | None = None
  ) -> jax.Array:
    """Draw a bool (N, H/32, W/32) mask for `images`, True where a cell is visible.

    The key comes from the model's `mask` stream unless `key` is given (a fixed
    key gives comparable masks across evaluations).
    """
    if images.ndim != 4:
      raise InputError(f"SparK expects NHWC images of rank 4, got shape {tuple(images.shape)}")
    batch, height, width, _ = images.shape
    if height % PATCH or width % PATCH or height == 0 or width == 0:
      raise InputError(
          f"SparK needs images whose height and width are positive multiples of {PATCH}, got"
          f" {height}x{width}; pad or resize the input"
      )
    grid = (height // PATCH, width // PATCH)
    num_cells = grid[0] * grid[1]
    if num_cells < 2:
      raise InputError(
          f"images of {height}x{width} have a single {PATCH}x{PATCH} cell, and one cell always"
          f" stays visible, so nothing is left to reconstruct; use images of at least"
          f" {2 * PATCH}x{PATCH}"
      )
    if sparse.keep_count(num_cells, mask_ratio) == num_cells:
      raise InputError(
          f"images of {height}x{width} have {num_cells} cells of {PATCH}x{PATCH}, and mask_ratio"
          f" {mask_ratio} keeps all of them visible, so nothing is left to reconstruct; use"
          " larger images or a higher mask_ratio"
      )
    if key is None:
      key = self.mask_stream()
    return sparse.draw_visible(key, batch, grid, mask_ratio)

  def __call__(self, images: jax.Array, visible: jax.Array) -> jax.Array:
    """Reconstruct (N, H, W, 3) float32 from the visible cells of NHWC `images` in [-1, 1].

    `visible` is a bool (N, H/32, W/32) mask; pixels under masked cells never
    reach the encoder or the decoder.
    """
    features = self.encoder.features(images, visible)
    skips = []
    for scale, (densify, feature) in enumerate(zip(self.densify, features[::-1])):
      mask = sparse.expand(visible, 2**scale)
      skips.append(densify(feature, mask))
    return self.decoder(tuple(skips)).astype(jnp.float32)


def build_spark(
    variant: str = "atto", *, decoder_width: int = 256, seed: int = 0, **options
) -> SparK:
  """Build a `SparK` from a variant name and `ConvNeXtV2Config` fields.

  Streams: `params` from `seed`, `dropout` from `seed + 1`, `mask` from `seed + 2`.
  """
  config = ConvNeXtV2Config(variant=variant, head=None, **options)
  rngs = nnx.Rngs(params=seed, dropout=seed + 1, mask=seed + 2)
  return SparK(config, decoder_width=decoder_width, rngs=rngs)


# -------------------------------------------------------------- Loss cells ---


def _check_cells(x: jax.Array, patch: int) -> None:
  if x.ndim != 4:
    raise InputError(f"expected NHWC images of rank 4, got shape {tuple(x.shape)}")
  _, height, width, _ = x.shape
  if patch < 1 or height % patch or width % patch:
    raise InputError(
        f"image height and width must be multiples of the cell size {patch}, got {height}x{width}"
    )


def patchify(x: jax.Array, patch: int = PATCH) -> jax.Array:
  """Cut (N, H, W, C) into cells: (N, H/p, W/p, p*p*C), each cell in (row, column, channel) order."""
  _check_cells(x, patch)
  batch, height, width, channels = x.shape
  grid_h, grid_w = height // patch, width // patch
  x = x.reshape(batch, grid_h, patch, grid_w, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h, grid_w, patch * patch * channels)


def unpatchify(cells: jax.Array, patch: int = PATCH) -> jax.Array:
  """Invert `patchify`: (N, gh, gw, p*p*C) -> (N, gh*p, gw*p, C)."""
  if cells.ndim != 4 or cells.shape[-1] % (patch * patch):
    raise InputError(
        f"expected cells (N, gh, gw, {patch}*{patch}*C), got shape {tuple(cells.shape)}"
    )
  batch, grid_h, grid_w, size = cells.shape
  channels = size // (patch * patch)
  x = cells.reshape(batch, grid_h, grid_w, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * patch, grid_w * patch, channels)


def cell_statistics(cells: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Return the float32 mean and sqrt(var + 1e-6) of each cell, var with ddof=1 as SparK."""
  cells = cells.astype(jnp.float32)
  mean = jnp.mean(cells, axis=-1, keepdims=True)
  variance = jnp.var(cells, axis=-1, keepdims=True, ddof=1)
  return mean, jnp.sqrt(variance + TARGET_EPSILON)


def normalise_per_cell(target: jax.Array, patch: int = PATCH) -> jax.Array:
  """Normalise each p x p x C cell of `target` to mean 0 and unit (ddof=1) variance."""
  cells = patchify(target, patch)
  mean, std = cell_statistics(cells)
  return unpatchify((cells.astype(jnp.float32) - mean) / std, patch)


def denormalise(prediction: jax.Array, target: jax.Array, patch: int = PATCH) -> jax.Array:
  """Map per-cell normalised `prediction` back to image values with `target`'s cell statistics."""
  if prediction.shape != target.shape:
    raise InputError(
        f"prediction shape {tuple(prediction.shape)} and target shape {tuple(target.shape)}"
        " must be equal"
    )
  mean, std = cell_statistics(patchify(target, patch))
  cells = patchify(prediction.astype(jnp.float32), patch)
  return unpatchify(cells * std + mean, patch)


def reconstruction_loss(
    prediction: jax.Array,
    target: jax.Array,
    visible: jax.Array,
    *,
    weights: jax.Array | None = None,
    patch: int = PATCH,
    normalise: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Compute the squared error on masked cells, in float32.

  Each cell's error is the mean over its p*p*C values, against the target
  normalised per cell when `normalise`. The loss is the sum over masked
  cells of rows with `weights` > 0, divided by their count (+1e-8); under
  `jax.jit` on a sharded batch both sums are global. Visible cells never
  count.

  Args:
    prediction: (N, H, W, C).
    target: (N, H, W, C) images.
    visible: (N, H/p, W/p) bool or 0/1, True where the encoder saw the cell.
    weights: (N,) row weights (the batch's `valid`); None counts every row.
    patch: cell size p.
    normalise: normalise each target cell (SparK's `norm_pix_loss`).

  Returns:
    The scalar loss and the per-example mean over that row's masked cells (N,).
  """
  if prediction.shape != target.shape:
    raise InputError(
        f"prediction shape {tuple(prediction.shape)} and target shape {tuple(target.shape)}"
        " must be equal"
    )
  target_cells = patchify(target, patch).astype(jnp.float32)
  if normalise:
    mean, std = cell_statistics(target_cells)
    target_cells = (target_cells - mean) / std
  predicted_cells = patchify(prediction, patch).astype(jnp.float32)
  if tuple(visible.shape) != target_cells.shape[:3]:
    raise InputError(
        f"visible mask shape {tuple(visible.shape)} does not match the cell grid"
        f" {target_cells.shape[:3]} of images {tuple(target.shape)}"
    )
  cell_error = jnp.mean(jnp.square(predicted_cells - target_cells), axis=-1)
  masked = 1.0 - (visible > 0).astype(jnp.float32)

  per_example = jnp.sum(cell_error * masked, axis=(1, 2)) / (
      jnp.sum(masked, axis=(1, 2)) + COUNT_EPSILON
  )
  if weights is not None:
    masked = masked * weights.astype(jnp.float32)[:, None, None]
  loss = jnp.sum(cell_error * masked) / (jnp.sum(masked) + COUNT_EPSILON)
  return loss, per_example
