"""ConvNeXt-V2 (Woo et al. 2023) in Flax NNX, NHWC, with optional coordinate attention.

The layout follows timm's `convnextv2_*` models, so that timm and upstream UEM-ICH
weights load one to one (see `uem_ich_jax.convert`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import layers
from uem_ich_jax.models import sparse
from uem_ich_jax.models.coord_attention import CoordinateAttention
from uem_ich_jax.models.heads import ClassificationHead

# Published sizes: blocks per stage and channels per stage.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

# Total stride of the four stages. Input height and width must be multiples of it.
TOTAL_STRIDE = 32

PLACEMENTS = ("outputs", "inside")


@dataclasses.dataclass(frozen=True)
class ConvNeXtV2Config:
  """Everything that shapes a `ConvNeXtV2` model.

  Attributes:
    variant: one of `VARIANTS`.
    in_channels: input channels (3: the brain, subdural and bone windows).
    num_classes: logits of the classification head.
    head: one of `heads.HEAD_KINDS`, or None for an encoder without a head.
    head_dropout: dropout rate of the head; None keeps the head's own default.
    drop_path_rate: stochastic depth of the last block; rates grow linearly
      from 0 over all blocks, as in timm.
    coordinate_attention_stages: 0-based stages followed by coordinate
      attention; the upstream uses (2, 3). Empty for plain ConvNeXt-V2.
    coordinate_attention_placement: "outputs" (the upstream) applies attention
      to the maps that `features` returns and never feeds it to later stages.
      "inside" feeds the attended map to the next stage.
    coordinate_attention_reduction: the hidden width is
      max(min_channels, C // reduction).
    coordinate_attention_min_channels: lower bound of that width.
    dtype: compute dtype (float32 or bfloat16). Parameters are always float32.
    depthwise: how depthwise convolutions are computed, one of
      `layers.DEPTHWISE_IMPLEMENTATIONS`; "auto" picks the fast one for the
      backend. The parameters are the same for all.
    remat: what the backward pass recomputes, one of `REMAT_POLICIES`.
      "none" keeps every activation. "block" keeps only each block's input
      and recomputes the rest of the block in the backward pass, trading
      compute for activation memory. "block_dots" also keeps the outputs of
      the matrix multiplications in each block.
  """

  variant: str = "atto"
  in_channels: int = 3
  num_classes: int = 6
  head: str | None = "multitask"
  head_dropout: float | None = None
  drop_path_rate: float = 0.0
  coordinate_attention_stages: tuple[int, ...] = (2, 3)
  coordinate_attention_placement: str = "outputs"
  coordinate_attention_reduction: int = 32
  coordinate_attention_min_channels: int = 8
  dtype: jnp.dtype = jnp.float32
  depthwise: str = "auto"
  remat: str = "none"

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown ConvNeXt-V2 variant {self.variant!r}; expected one of {tuple(VARIANTS)}")
    if self.coordinate_attention_placement not in PLACEMENTS:
      raise ValueError(
          f"coordinate_attention_placement must be one of {PLACEMENTS}, "
          f"got {self.coordinate_attention_placement!r}"
      )
    stages = tuple(self.coordinate_attention_stages)
    if any(stage not in range(4) for stage in stages):
      raise ValueError(f"coordinate_attention_stages must be stage indices 0..3, got {stages}")
    object.__setattr__(self, "coordinate_attention_stages", tuple(sorted(set(stages))))
    if self.depthwise not in layers.DEPTHWISE_IMPLEMENTATIONS:
      raise ValueError(
          f"depthwise must be one of {layers.DEPTHWISE_IMPLEMENTATIONS}, got {self.depthwise!r}"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

  @property
  def depths(self) -> tuple[int, ...]:
    return VARIANTS[self.variant][0]

  @property
  def widths(self) -> tuple[int, ...]:
    return VARIANTS[self.variant][1]


# Rematerialisation policy of a block: the jax.checkpoint policy of what the
# backward pass may keep, or None to run the block without rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _call_block(block: "Block", x: jax.Array, mask: jax.Array | None) -> jax.Array:
  return block(x, mask)


class Block(nnx.Module):
  """ConvNeXt-V2 block: dwconv 7x7, LN, Linear C->4C, GELU, GRN, Linear 4C->C, drop path, residual."""

  def __init__(
      self,
      channels: int,
      drop_path_rate: float,
      *,
      dtype: jnp.dtype,
      depthwise: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.conv_dw = layers.DepthwiseConv(
        channels, 7, dtype=dtype, implementation=depthwise, rngs=rngs
    )
    self.norm = layers.layer_norm(channels, dtype=dtype, rngs=rngs)
    self.fc1 = layers.linear(channels, 4 * channels, dtype=dtype, rngs=rngs)
    self.grn = layers.GRN(4 * channels, dtype=dtype)
    self.fc2 = layers.linear(4 * channels, channels, dtype=dtype, rngs=rngs)
    self.drop_path = layers.drop_path(drop_path_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Apply the block. With a float (N, H, W, 1) `mask`, masked positions stay 0.

    Under a mask, `x` must already be 0 at masked positions. The depthwise conv
    then treats masked neighbours as zeros (a submanifold sparse conv). LayerNorm,
    the Linears and GELU act per position, so the bias values they leave at
    masked positions never reach visible ones. GRN masks its own statistics.
    """
    if mask is None:
      y = self.norm(self.conv_dw(x))
      y = self.grn(layers.gelu(self.fc1(y)))
      y = self.fc2(y)
      return x + self.drop_path(y).astype(x.dtype)

    y = layers.zero_masked(self.conv_dw(x), mask)
    y = self.grn(layers.gelu(self.fc1(self.norm(y))), mask)
    y = layers.zero_masked(self.fc2(y), mask)
    return x + self.drop_path(y).astype(x.dtype)


class Stage(nnx.Module):
  """Optional downsampling (LN, then conv 2x2 stride 2), then the blocks."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      drop_path_rates: Sequence[float],
      *,
      downsample: bool,
      dtype: jnp.dtype,
      depthwise: str = "auto",
      remat: str = "none",
      rngs: nnx.Rngs,
  ):
    self.remat = remat
    if downsample:
      self.downsample_norm = layers.layer_norm(in_channels, dtype=dtype, rngs=rngs)
      self.downsample_conv = layers.patch_conv(
          in_channels, out_channels, 2, dtype=dtype, rngs=rngs
      )
    else:
      self.downsample_norm = None
      self.downsample_conv = None
    self.blocks = nnx.List([
        Block(out_channels, rate, dtype=dtype, depthwise=depthwise, rngs=rngs)
        for rate in drop_path_rates
    ])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Apply the stage, with `mask` the float (N, H, W, 1) visible map at the output stride or None.

    The 2x2 downsampling windows never straddle a mask cell, so a dense conv
    followed by zeroing masked outputs equals a sparse conv, even though
    LayerNorm's bias makes masked inputs non-zero.
    """
    if self.downsample_conv is not None:
      x = self.downsample_conv(self.downsample_norm(x))
      if mask is not None:
        x = layers.zero_masked(x, mask)
    policy = REMAT_POLICIES[self.remat]
    run_block = _call_block if policy is None else nnx.remat(_call_block, policy=policy)
    for block in self.blocks:
      x = run_block(block, x, mask)
    return x


class ConvNeXtV2(nnx.Module):
  """ConvNeXt-V2 encoder with optional coordinate attention and classification head.

  Input: NHWC images, H and W multiples of 32. `features(x)` returns the four
  stage maps at strides 4, 8, 16 and 32 in the compute dtype, after coordinate
  attention where it is configured. `features(x, visible)` runs the encoder as
  SparK's sparse encoder on the visible 32x32 cells only. `__call__(x)` returns
  float32 logits and is dense only.

  The model starts in evaluation mode (no drop path or dropout, BatchNorm uses
  running statistics); call `model.train()` before training and `model.eval()`
  after. Drop path and dropout draw from the `dropout` stream of `rngs`.
  """

  def __init__(self, config: ConvNeXtV2Config, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.dtype
    widths = config.widths
    depths = config.depths

    self.stem_conv = layers.patch_conv(config.in_channels, widths[0], 4, dtype=dtype, rngs=rngs)
    self.stem_norm = layers.layer_norm(widths[0], dtype=dtype, rngs=rngs)

    rates = np.linspace(0.0, config.drop_path_rate, sum(depths)).tolist()
    stages = []
    start = 0
    for index, (depth, width) in enumerate(zip(depths, widths)):
      stages.append(
          Stage(
              widths[index - 1] if index else width,
              width,
              rates[start : start + depth],
              downsample=index > 0,
              dtype=dtype,
              depthwise=config.depthwise,
              remat=config.remat,
              rngs=rngs,
          )
      )
      start += depth
    self.stages = nnx.List(stages)

    self.coordinate_attention = nnx.Dict({
        str(stage): CoordinateAttention(
            widths[stage],
            reduction=config.coordinate_attention_reduction,
            min_channels=config.coordinate_attention_min_channels,
            dtype=dtype,
            rngs=rngs,
        )
        for stage in config.coordinate_attention_stages
    })

    if config.head is None:
      self.head = None
    else:
      self.head = ClassificationHead(
          widths[-1],
          config.num_classes,
          kind=config.head,
          dropout_rate=config.head_dropout,
          dtype=dtype,
          rngs=rngs,
      )

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise InputError(f"ConvNeXt-V2 expects NHWC images of rank 4, got shape {tuple(x.shape)}")
    _, height, width, channels = x.shape
    if channels != self.config.in_channels:
      raise InputError(
          f"ConvNeXt-V2 expects {self.config.in_channels} input channels (NHWC), got shape {tuple(x.shape)}"
      )
    if height % TOTAL_STRIDE or width % TOTAL_STRIDE or height == 0 or width == 0:
      raise InputError(
          f"ConvNeXt-V2 needs height and width that are positive multiples of {TOTAL_STRIDE}, "
          f"got {height}x{width}; pad or resize the input"
      )

  def _check_visible(self, x: jax.Array, visible: jax.Array) -> None:
    batch, height, width, _ = x.shape
    expected = (batch, height // TOTAL_STRIDE, width // TOTAL_STRIDE)
    if tuple(visible.shape) != expected:
      raise InputError(
          f"the visible mask must have shape (N, H/{TOTAL_STRIDE}, W/{TOTAL_STRIDE}) = {expected} "
          f"for images of shape {tuple(x.shape)}, got {tuple(visible.shape)}"
      )

  def features(self, x: jax.Array, visible: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Return the four NHWC stage maps at strides 4, 8, 16 and 32.

    Args:
      x: (N, H, W, C) images.
      visible: None for the dense encoder, or a bool (or 0/1) mask
        (N, H/32, W/32) with True where a 32x32 cell is visible. The input is
        zeroed under masked cells, every layer keeps masked positions at 0, and
        all four maps are exactly 0 there. Visible outputs do not depend on the
        pixels under the mask, even NaN or inf ones, because masking selects
        zeros instead of multiplying.
    """
    self._check_input(x)
    dtype = self.config.dtype
    masks = None
    if visible is not None:
      self._check_visible(x, visible)
      masks = sparse.mask_pyramid(visible)

    x = x.astype(dtype)
    if masks is None:
      x = self.stem_norm(self.stem_conv(x))
    else:
      x = layers.zero_masked(x, masks[1])
      x = layers.zero_masked(self.stem_norm(self.stem_conv(x)), masks[4])

    inside = self.config.coordinate_attention_placement == "inside"
    outputs = []
    for index, stage in enumerate(self.stages):
      mask = None if masks is None else masks[4 * 2**index]
      x = stage(x, mask)
      key = str(index)
      if key in self.coordinate_attention:
        attended = self.coordinate_attention[key](x, mask)
        outputs.append(attended)
        if inside:
          x = attended
      else:
        outputs.append(x)
    return tuple(outputs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Return (N, num_classes) float32 logits from the last stage map."""
    if self.head is None:
      raise ValueError("this ConvNeXt-V2 was built without a head (head=None); call features() instead")
    return self.head(self.features(x)[-1])


def build_convnext_v2(variant: str = "atto", *, seed: int = 0, **options) -> ConvNeXtV2:
  """Build a `ConvNeXtV2` from a variant name and `ConvNeXtV2Config` fields.

  Parameters are drawn from `seed` (stream `params`); drop path and dropout
  use stream `dropout` of the same seed.
  """
  config = ConvNeXtV2Config(variant=variant, **options)
  return ConvNeXtV2(config, rngs=nnx.Rngs(seed))


def parameter_count(variant: str, **options) -> int:
  """Count the parameters of a variant without allocating them (`nnx.eval_shape`).

  Running statistics of BatchNorm are not parameters and are not counted.
  """
  config = ConvNeXtV2Config(variant=variant, **options)
  abstract = nnx.eval_shape(lambda: ConvNeXtV2(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
