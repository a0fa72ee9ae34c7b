"""The upstream UEM-ICH SegFormer segmentation head, ported to Flax NNX (NHWC).

The upstream module (`models/segmentation_head.py`) takes the four encoder
stages (strides 4, 8, 16, 32) and returns full-size logits plus one
deep-supervision logit map per stage. Parameter names follow the PyTorch state
dict so that `load_torch_state` can copy an upstream checkpoint key by key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import layers
from uem_ich_jax.models.coord_attention import CoordinateAttention

NUM_STAGES = 4

# Dropout2d between the two boundary refinement blocks.
REFINE_DROPOUT = 0.1


def _conv3x3(
    in_features: int, out_features: int, *, groups: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Conv:
  """Build a 3x3 stride-1 conv with bias and zero padding 1 (PyTorch `padding=1`)."""
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(3, 3),
      padding=((1, 1), (1, 1)),
      feature_group_count=groups,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.WEIGHT_INIT,
      bias_init=layers.ZEROS,
      rngs=rngs,
  )


def _norm_gelu(norm: nnx.BatchNorm, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Apply `norm` in float32, then the exact GELU, and cast back to `dtype`."""
  return layers.gelu(norm(x.astype(jnp.float32))).astype(dtype)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resize NHWC `x` to `size` like PyTorch's bilinear `interpolate(align_corners=False)`.

  Both use half-pixel centres and clamp at the edges. Without antialiasing,
  JAX's triangle kernel takes the same two neighbours as PyTorch, so upsampling
  and downsampling both match (the tests check both).
  """
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  shape = (x.shape[0], size[0], size[1], x.shape[3])
  return jax.image.resize(x, shape, method="bilinear", antialias=False).astype(x.dtype)


def _depthwise3x3(conv: nnx.Conv, x: jax.Array, dtype: jnp.dtype, implementation: str) -> jax.Array:
  """Apply a depthwise `_conv3x3` through `layers.depthwise_conv`, the fast one per backend.

  The parameters stay those of the `nnx.Conv` (HWIO kernel (3, 3, 1, C)), so
  checkpoints and the upstream weight map do not change.
  """
  return layers.depthwise_conv(
      x.astype(dtype), conv.kernel[...], conv.bias[...], implementation=implementation
  )


class MixFFN(nnx.Module):
  """1x1 conv C -> 2C, depthwise 3x3, exact GELU, 1x1 conv 2C -> embed."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      *,
      dtype: jnp.dtype,
      depthwise: str = "auto",
      rngs: nnx.Rngs,
  ):
    hidden = 2 * in_channels
    self.dtype = dtype
    self.depthwise = depthwise
    self.fc1 = layers.linear(in_channels, hidden, dtype=dtype, rngs=rngs)
    self.dwconv = _conv3x3(hidden, hidden, groups=hidden, dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(hidden, out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _depthwise3x3(self.dwconv, self.fc1(x.astype(self.dtype)), self.dtype, self.depthwise)
    return self.fc2(layers.gelu(x))


class FusionConv(nnx.Module):
  """Depthwise 3x3 on the concatenated stages, 1x1 down to embed, BatchNorm, GELU."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      *,
      dtype: jnp.dtype,
      depthwise: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.depthwise = depthwise
    self.dwconv = _conv3x3(in_channels, in_channels, groups=in_channels, dtype=dtype, rngs=rngs)
    self.pwconv = layers.linear(in_channels, out_channels, dtype=dtype, rngs=rngs)
    self.bn = layers.batch_norm(out_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _depthwise3x3(self.dwconv, x, self.dtype, self.depthwise)
    return _norm_gelu(self.bn, self.pwconv(x), self.dtype)


class BoundaryRefinement(nnx.Module):
  """Residual block: conv3x3-BN-GELU, conv3x3-BN, add the input, GELU."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv1 = _conv3x3(channels, channels, dtype=dtype, rngs=rngs)
    self.bn1 = layers.batch_norm(channels, rngs=rngs)
    self.conv2 = _conv3x3(channels, channels, dtype=dtype, rngs=rngs)
    self.bn2 = layers.batch_norm(channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = _norm_gelu(self.bn1, self.conv1(x), self.dtype)
    hidden = self.bn2(self.conv2(hidden).astype(jnp.float32))
    return layers.gelu(hidden + x.astype(jnp.float32)).astype(self.dtype)


class SegFormerHead(nnx.Module):
  """Decode four encoder stages into segmentation logits, with deep supervision.

  Per stage i: MixFFN to `embed_dim`, coordinate attention, then an auxiliary
  1x1 conv to classes upsampled to `target_size`, while the main path is
  upsampled to the stride-4 (first stage) size. The four main maps are
  concatenated, fused, refined twice (Dropout2d 0.1 in between), upsampled to
  `target_size` and classified by conv3x3 -> embed/2, BN, GELU, 1x1.

  `neck` returns the refined stride-4 map alone, which other dense heads
  (detection) share. With `num_classes` 1 the head is binary: its single
  logit map is read through a sigmoid (foreground = any hemorrhage).
  `classify_at_stride4` runs the classifier on the stride-4 map and upsamples
  the logits bilinearly instead. That skips the 3x3 conv at full resolution,
  which dominates the head's cost on CPUs, but it is not the upstream
  computation, so upstream weights then give different outputs. The default
  False is the upstream order.

  Built in evaluation mode (BatchNorm running statistics, no dropout), which
  is how upstream checkpoints are compared; `.train()` switches both.
  """

  def __init__(
      self,
      in_channels: Sequence[int],
      embed_dim: int,
      num_classes: int,
      *,
      classify_at_stride4: bool = False,
      dtype: jnp.dtype = jnp.float32,
      depthwise: str = "auto",
      rngs: nnx.Rngs,
  ):
    if len(in_channels) != NUM_STAGES:
      raise InputError(
          f"invalid in_channels={list(in_channels)}: SegFormerHead expects {NUM_STAGES} stage widths"
      )
    if embed_dim < 2 or embed_dim % 2:
      raise InputError(
          f"invalid embed_dim={embed_dim}: expected an even number >= 2, because the last conv has embed_dim/2"
      )
    if num_classes < 1:
      raise InputError(f"invalid num_classes={num_classes}: expected at least 1")
    self.dtype = dtype
    self.embed_dim = embed_dim
    self.num_classes = num_classes
    self.classify_at_stride4 = classify_at_stride4
    self.in_channels = tuple(int(c) for c in in_channels)
    self.mix_ffn = nnx.List(
        [MixFFN(c, embed_dim, dtype=dtype, depthwise=depthwise, rngs=rngs) for c in self.in_channels]
    )
    self.coord_attn = nnx.List(
        [CoordinateAttention(embed_dim, dtype=dtype, rngs=rngs) for _ in self.in_channels]
    )
    self.aux_heads = nnx.List(
        [layers.linear(embed_dim, num_classes, dtype=dtype, rngs=rngs) for _ in self.in_channels]
    )
    self.fusion = FusionConv(
        NUM_STAGES * embed_dim, embed_dim, dtype=dtype, depthwise=depthwise, rngs=rngs
    )
    self.boundary_refine1 = BoundaryRefinement(embed_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(REFINE_DROPOUT, broadcast_dims=(1, 2), deterministic=True, rngs=rngs)
    self.boundary_refine2 = BoundaryRefinement(embed_dim, dtype=dtype, rngs=rngs)
    self.seg_conv = _conv3x3(embed_dim, embed_dim // 2, dtype=dtype, rngs=rngs)
    self.seg_bn = layers.batch_norm(embed_dim // 2, rngs=rngs)
    self.seg_classifier = layers.linear(embed_dim // 2, num_classes, dtype=dtype, rngs=rngs)

  def _check_features(self, features: Sequence[jax.Array]) -> None:
    if len(features) != NUM_STAGES:
      raise InputError(
          f"invalid features: expected {NUM_STAGES} maps (strides 4, 8, 16, 32), got {len(features)}"
      )
    for i, (feature, channels) in enumerate(zip(features, self.in_channels)):
      if feature.ndim != 4 or feature.shape[-1] != channels:
        raise InputError(
            f"feature {i} has shape {tuple(feature.shape)}, expected NHWC with {channels} channels"
        )

  def _stage_maps(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """Per stage: MixFFN to embed_dim, then coordinate attention, at the stage's own size."""
    self._check_features(features)
    return [self.coord_attn[i](self.mix_ffn[i](feature)) for i, feature in enumerate(features)]

  def _fuse(self, stage_maps: Sequence[jax.Array]) -> jax.Array:
    stride4_size = tuple(stage_maps[0].shape[1:3])
    x = jnp.concatenate([resize_bilinear(x, stride4_size) for x in stage_maps], axis=-1)
    x = self.fusion(x)
    return self.boundary_refine2(self.dropout(self.boundary_refine1(x)))

  def _classify(self, neck: jax.Array, target_size: tuple[int, int]) -> jax.Array:
    if self.classify_at_stride4:
      x = _norm_gelu(self.seg_bn, self.seg_conv(neck), self.dtype)
      logits = self.seg_classifier(x).astype(jnp.float32)
      return resize_bilinear(logits, target_size)
    x = _norm_gelu(self.seg_bn, self.seg_conv(resize_bilinear(neck, target_size)), self.dtype)
    return self.seg_classifier(x).astype(jnp.float32)

  def neck(self, features: Sequence[jax.Array]) -> jax.Array:
    """Return the fused and refined stride-4 map, (N, H/4, W/4, embed_dim) in `dtype`."""
    return self._fuse(self._stage_maps(features))

  def decode(
      self, features: Sequence[jax.Array], target_size: tuple[int, int]
  ) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """Return (main logits, [4 auxiliary logits], neck) from one pass over the stages.

    Logits are (N, *target_size, classes) float32; the neck is what `neck` returns.
    """
    target_size = (int(target_size[0]), int(target_size[1]))
    stage_maps = self._stage_maps(features)
    aux = [
        resize_bilinear(self.aux_heads[i](x), target_size).astype(jnp.float32)
        for i, x in enumerate(stage_maps)
    ]
    neck = self._fuse(stage_maps)
    return self._classify(neck, target_size), aux, neck

  def __call__(
      self, features: Sequence[jax.Array], target_size: tuple[int, int]
  ) -> tuple[jax.Array, list[jax.Array]]:
    """Return (main logits, [4 auxiliary logits]), each (N, *target_size, classes) float32."""
    main, aux, _ = self.decode(features, target_size)
    return main, aux


def _conv_target(prefix: str, conv: nnx.Conv) -> dict[str, tuple[nnx.Variable, str]]:
  return {f"{prefix}.weight": (conv.kernel, "conv"), f"{prefix}.bias": (conv.bias, "vector")}


def _linear_target(prefix: str, linear: nnx.Linear) -> dict[str, tuple[nnx.Variable, str]]:
  return {f"{prefix}.weight": (linear.kernel, "linear"), f"{prefix}.bias": (linear.bias, "vector")}


def _norm_target(prefix: str, norm: nnx.BatchNorm) -> dict[str, tuple[nnx.Variable, str]]:
  return {
      f"{prefix}.weight": (norm.scale, "vector"),
      f"{prefix}.bias": (norm.bias, "vector"),
      f"{prefix}.running_mean": (norm.mean, "vector"),
      f"{prefix}.running_var": (norm.var, "vector"),
  }


def parameter_map(head: SegFormerHead) -> dict[str, tuple[nnx.Variable, str]]:
  """Return PyTorch key -> (variable, kind) for every tensor of the upstream head.

  Kinds: "conv" (OIHW, depthwise (C, 1, kh, kw) included), "linear" (a 1x1
  conv, (out, in, 1, 1)) and "vector".
  """
  targets: dict[str, tuple[nnx.Variable, str]] = {}
  for i in range(NUM_STAGES):
    ffn, attention = head.mix_ffn[i], head.coord_attn[i]
    targets |= _linear_target(f"mix_ffn.{i}.fc1", ffn.fc1)
    targets |= _conv_target(f"mix_ffn.{i}.dwconv", ffn.dwconv)
    targets |= _linear_target(f"mix_ffn.{i}.fc2", ffn.fc2)
    targets |= _linear_target(f"coord_attn.{i}.conv1", attention.conv1)
    targets |= _norm_target(f"coord_attn.{i}.bn1", attention.bn1)
    targets |= _linear_target(f"coord_attn.{i}.conv_h", attention.conv_h)
    targets |= _linear_target(f"coord_attn.{i}.conv_w", attention.conv_w)
    targets |= _linear_target(f"aux_heads.{i}", head.aux_heads[i])
  targets |= _conv_target("fusion.dwconv", head.fusion.dwconv)
  targets |= _linear_target("fusion.pwconv", head.fusion.pwconv)
  targets |= _norm_target("fusion.bn", head.fusion.bn)
  for name in ("boundary_refine1", "boundary_refine2"):
    block = getattr(head, name)
    targets |= _conv_target(f"{name}.conv1", block.conv1)
    targets |= _norm_target(f"{name}.bn1", block.bn1)
    targets |= _conv_target(f"{name}.conv2", block.conv2)
    targets |= _norm_target(f"{name}.bn2", block.bn2)
  # The upstream seg_head is nn.Sequential(conv3x3, BN, GELU, conv1x1).
  targets |= _conv_target("seg_head.0", head.seg_conv)
  targets |= _norm_target("seg_head.1", head.seg_bn)
  targets |= _linear_target("seg_head.3", head.seg_classifier)
  return targets


def _torch_shape(variable: nnx.Variable, kind: str) -> tuple[int, ...]:
  shape = tuple(variable.shape)
  if kind == "conv":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == "linear":
    cin, cout = shape
    return (cout, cin, 1, 1)
  return shape


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO; (C, 1, 3, 3) -> (3, 3, 1, C)
  if kind == "linear":
    return value.reshape(value.shape[0], value.shape[1]).T
  return value


def load_torch_state(head: SegFormerHead, state: Mapping[str, np.ndarray]) -> None:
  """Copy an upstream PyTorch state dict (as numpy arrays) into `head` in place.

  Every tensor the head needs must be present with its PyTorch shape, and no
  other key is accepted (`num_batches_tracked` is ignored). Otherwise nothing is
  written and one InputError lists the missing, unexpected and mis-shaped keys.
  """
  targets = parameter_map(head)
  # TODO: this key and shape check repeats the one in convert.torch_weights and
  # in aggregator.load_torch_state; one shared checker in convert should serve all three.
  provided = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  missing = sorted(set(targets) - set(provided))
  unexpected = sorted(set(provided) - set(targets))
  wrong_shapes = []
  for key in sorted(set(targets) & set(provided)):
    expected = _torch_shape(*targets[key])
    if tuple(np.shape(provided[key])) != expected:
      wrong_shapes.append(f"{key} has shape {tuple(np.shape(provided[key]))}, expected {expected}")

  problems = []
  if missing:
    problems.append(f"missing keys: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {', '.join(unexpected)}")
  if wrong_shapes:
    problems.append(f"wrong shapes: {'; '.join(wrong_shapes)}")
  if problems:
    raise InputError(
        "state dict does not fit the SegFormer head: "
        + " | ".join(problems)
        + " (check in_channels, embed_dim and num_classes against the checkpoint)"
    )

  for key, (variable, kind) in targets.items():
    value = _to_flax(np.asarray(provided[key]), kind)
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))
