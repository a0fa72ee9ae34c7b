"""The scan-level model: the ConvNeXt-V2 encoder per slice, then the scan aggregator and head.

The encoder's parameters sit at the model root with the same paths as in
`ConvNeXtV2` (stem_*, stages/..., coordinate_attention/...), so an encoder
export from pretraining or the multi-task stage loads by path. Everything
else lives under `head` (`head/aggregator`, `head/scan`, and
`head/projection` when the aggregator width differs from the encoder's),
which is the head group of the optimizer and of `config.optim.head_prefix`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.aggregator import ScanAggregator
from uem_ich_jax.models.aggregator import ScanHead
from uem_ich_jax.models.convnext_v2 import TOTAL_STRIDE
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2Config

# ScanAggregator arguments that ScanModel sets itself.
_FIXED_AGGREGATOR_ARGUMENTS = ("self", "feature_dim", "max_slices", "spatial_size", "dtype", "rngs")
# ScanAggregator arguments without a default.
REQUIRED_AGGREGATOR_SETTINGS = ("num_heads", "num_layers", "dim_feedforward")
# Slice token sources:
#   "last": the last stage's stride-32 map, as upstream (its weights load only here);
#   "pyramid": every stage's map max-pooled to the stride-32 grid and concatenated
#     along channels, so a bleed a few pixels wide, which the fine stages see,
#     still reaches the aggregator.
TOKEN_FEATURES = ("last", "pyramid")


def aggregator_options() -> tuple[str, ...]:
  """Name the keyword arguments of `ScanAggregator` that `aggregator` settings may give."""
  names = inspect.signature(ScanAggregator.__init__).parameters
  return tuple(name for name in names if name not in _FIXED_AGGREGATOR_ARGUMENTS)


def _max_pool_to(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Max-pool an NHWC map whose sides are multiples of `grid` down to `grid`."""
  n, height, width, channels = x.shape
  rows, columns = height // grid[0], width // grid[1]
  return x.reshape(n, grid[0], rows, grid[1], columns, channels).max(axis=(2, 4))


def tokens_from_maps(maps: tuple[jax.Array, ...], token_features: str) -> jax.Array:
  """Return (N, H/32, W/32, C) slice tokens from the four stage maps, by `token_features`.

  "last" is the stride-32 map. "pyramid" max-pools every stage's map to the
  stride-32 grid and concatenates them along channels.
  """
  if token_features not in TOKEN_FEATURES:
    raise InputError(f"token_features is {token_features!r}, expected one of {TOKEN_FEATURES}")
  if token_features == "last":
    return maps[-1]
  grid = tuple(maps[-1].shape[1:3])
  return jnp.concatenate([_max_pool_to(stage_map, grid) for stage_map in maps], axis=-1)


class ScanHeadStack(nnx.Module):
  """The per-scan part: optional projection, the slice-token aggregator, the scan head."""

  def __init__(
      self,
      encoder_dim: int,
      num_classes: int,
      *,
      image_size: int,
      max_slices: int,
      aggregator: Mapping[str, Any],
      dim: int | None,
      hidden_dim: int | None,
      dropout: float,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    dim = encoder_dim if dim is None else dim
    if dim == encoder_dim:
      self.projection = None
    else:
      self.projection = nnx.Linear(
          encoder_dim, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
      )
    self.aggregator = ScanAggregator(
        dim,
        max_slices=max_slices,
        spatial_size=image_size // TOTAL_STRIDE,
        dtype=dtype,
        rngs=rngs,
        **aggregator,
    )
    self.scan = ScanHead(
        dim, num_classes, hidden_dim=hidden_dim, dropout=dropout, dtype=dtype, rngs=rngs
    )

  def __call__(self, features: jax.Array, slice_mask: jax.Array) -> jax.Array:
    """Map stride-32 slice maps (B, S, h, w, C) to (B, K) float32 logits."""
    if self.projection is not None:
      features = self.projection(features)
    pooled, _ = self.aggregator(features, slice_mask)
    return self.scan(pooled)


class ScanModel(ConvNeXtV2):
  """ConvNeXt-V2 over every slice of a scan, the scan aggregator, and per-scan logits.

  Input: images (B, S, H, W, 3) in [-1, 1] with H = W = `image_size`, and a
  `slice_mask` (B, S) that is True for real slices and False for padding.
  Padded slices go through the encoder fully masked (every map is exactly 0
  there, and they are left out of the GRN, coordinate attention and BatchNorm
  statistics), are hidden as attention keys and are left out of the pooled
  mean. So the logits of a scan do not depend on how many padded slices follow
  it. Every scan needs at least one real slice.

  With `token_features="pyramid"` the tokens are every stage's map max-pooled
  to the stride-32 grid and concatenated (atto: 40 + 80 + 160 + 320 = 600
  channels), and `head/projection` maps them to the aggregator width. The
  upstream reads only the last stage, so its weights load only with "last".

  Starts in evaluation mode like `ConvNeXtV2`.
  """

  def __init__(
      self,
      config: ConvNeXtV2Config,
      *,
      num_classes: int,
      image_size: int,
      max_slices: int,
      aggregator: Mapping[str, Any] | None = None,
      aggregator_dim: int | None = None,
      head_hidden_dim: int | None = None,
      head_dropout: float = 0.4,
      token_features: str = "last",
      rngs: nnx.Rngs,
  ):
    if token_features not in TOKEN_FEATURES:
      raise InputError(f"token_features is {token_features!r}, expected one of {TOKEN_FEATURES}")
    if image_size <= 0 or image_size % TOTAL_STRIDE:
      raise InputError(
          f"image_size is {image_size}, expected a positive multiple of {TOTAL_STRIDE}"
      )
    if max_slices < 1:
      raise InputError(f"max_slices is {max_slices}, expected at least 1")
    aggregator = dict(aggregator or {})
    unknown = sorted(set(aggregator) - set(aggregator_options()))
    if unknown:
      raise InputError(
          f"aggregator settings {unknown} are not arguments of ScanAggregator; it accepts"
          f" {list(aggregator_options())}"
      )
    missing = [name for name in REQUIRED_AGGREGATOR_SETTINGS if name not in aggregator]
    if missing:
      raise InputError(f"aggregator settings lack {missing}; they have no default")

    super().__init__(dataclasses.replace(config, head=None), rngs=rngs)
    self.image_size = image_size
    self.max_slices = max_slices
    self.token_features = token_features
    token_width = config.widths[-1] if token_features == "last" else sum(config.widths)
    # ConvNeXtV2 stored `head` as a static None, so the module must be marked as data.
    self.head = nnx.data(ScanHeadStack(
        token_width,
        num_classes,
        image_size=image_size,
        max_slices=max_slices,
        aggregator=aggregator,
        dim=aggregator_dim,
        hidden_dim=head_hidden_dim,
        dropout=head_dropout,
        dtype=config.dtype,
        rngs=rngs,
    ))
    # ScanAggregator and ScanHead build their dropout in training mode.
    self.eval()

  def _check_scan_input(self, images: jax.Array, slice_mask: jax.Array) -> None:
    if images.ndim != 5:
      raise InputError(f"scan images must be (B, S, H, W, C), got shape {tuple(images.shape)}")
    batch, slices, height, width, _ = images.shape
    if (height, width) != (self.image_size, self.image_size):
      raise InputError(
          f"scan images are {height}x{width}, but the model was built for image_size"
          f" {self.image_size} (its positional encoding has {self.image_size // TOTAL_STRIDE}"
          " tokens per side)"
      )
    if slices > self.max_slices:
      raise InputError(
          f"scans have {slices} slices, more than max_slices {self.max_slices}; pad to slice"
          " buckets no larger than max_slices"
      )
    if tuple(slice_mask.shape) != (batch, slices):
      raise InputError(
          f"slice_mask has shape {tuple(slice_mask.shape)}, expected {(batch, slices)}"
      )

  def scan_features(self, images: jax.Array, slice_mask: jax.Array) -> jax.Array:
    """Return the token maps of every slice, (B, S, H/32, W/32, C), by `token_features`.

    The B * S slices go through the encoder as one batch; padded slices are
    encoded as fully masked inputs, so their maps and tokens are 0.
    """
    self._check_scan_input(images, slice_mask)
    batch, slices, height, width, channels = images.shape
    flat = images.reshape(batch * slices, height, width, channels)
    grid = (height // TOTAL_STRIDE, width // TOTAL_STRIDE)
    visible = jnp.broadcast_to(
        slice_mask.astype(bool).reshape(batch * slices, 1, 1), (batch * slices, *grid)
    )
    tokens = tokens_from_maps(self.features(flat, visible), self.token_features)
    return tokens.reshape(batch, slices, *tokens.shape[1:])

  def __call__(
      self, images: jax.Array, slice_mask: jax.Array, *, freeze_encoder: bool = False
  ) -> jax.Array:
    """Return (B, num_classes) float32 logits per scan.

    With `freeze_encoder`, the encoder runs in evaluation mode (no drop path,
    BatchNorm running statistics, which are then not updated) and its
    features are cut from the gradient, whatever mode the model is in.
    """
    if freeze_encoder:
      encoder = nnx.view(self, deterministic=True, use_running_average=True)
      features = jax.lax.stop_gradient(encoder.scan_features(images, slice_mask))
    else:
      features = self.scan_features(images, slice_mask)
    return self.head(features, slice_mask)
