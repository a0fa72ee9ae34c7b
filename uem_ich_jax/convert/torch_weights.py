"""Load timm and upstream UEM-ICH PyTorch weights into `ConvNeXtV2`.

Two key layouts are understood:

- "timm": a timm `convnextv2_*` classifier (`stem.0.weight`,
  `stages.1.downsample.1.weight`, `stages.0.blocks.0.mlp.fc1.weight`,
  `head.norm.weight`, `head.fc.weight`, ...). timm's `.fcmae` weights are this
  layout without `head.*`: load them with `include_head=False`.
- "upstream": the upstream UEM-ICH encoder (`backbone.*` from a timm
  `features_only` model, which writes `stem_0` and `stages_0` for `stem.0` and
  `stages.0`, plus `ca_blocks.ca_N.*` for coordinate attention after stage N).

Files: `.npz` and `.safetensors` are read without PyTorch; `.pth`, `.pt` and
`.bin` need PyTorch and are read with `torch.load(..., weights_only=True)`, which
never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import zipfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2

logger = logging.getLogger(__name__)

LAYOUTS = ("timm", "upstream")

# Checkpoint entries that contain the state dict, tried in this order. The upstream
# saves its encoder as {"encoder_state_dict": ...}; many training scripts use
# "state_dict" or "model".
CHECKPOINT_KEYS = ("encoder_state_dict", "state_dict", "model")

# PyTorch bookkeeping that has no counterpart in the Flax model.
IGNORED_SUFFIXES = (".num_batches_tracked",)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")

# At most this many names per category in an error message.
MAX_LISTED = 50


class WeightLoadError(InputError):
  """A weight file that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class _Target:
  """One Flax variable and how a PyTorch tensor maps onto it."""

  variable: nnx.Variable
  kind: str  # "conv" (OIHW), "linear" ((out, in) or (out, in, 1, 1)) or "vector"


def _torch_shapes(target: _Target) -> tuple[tuple[int, ...], ...]:
  """Return the PyTorch shapes that convert to the target's shape."""
  shape = tuple(target.variable.shape)
  if target.kind == "conv":
    kh, kw, cin, cout = shape
    return ((cout, cin, kh, kw),)
  if target.kind == "linear":
    cin, cout = shape
    return ((cout, cin), (cout, cin, 1, 1))
  return (shape,)


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    # OIHW -> HWIO. A depthwise (C, 1, kh, kw) kernel becomes (kh, kw, 1, C).
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "linear":
    return value.reshape(value.shape[0], value.shape[1]).T
  return value


def _add_conv(targets: dict[str, _Target], prefix: str, conv: nnx.Module) -> None:
  targets[f"{prefix}.weight"] = _Target(conv.kernel, "conv")
  targets[f"{prefix}.bias"] = _Target(conv.bias, "vector")


def _add_linear(targets: dict[str, _Target], prefix: str, linear: nnx.Linear) -> None:
  targets[f"{prefix}.weight"] = _Target(linear.kernel, "linear")
  targets[f"{prefix}.bias"] = _Target(linear.bias, "vector")


def _add_norm(targets: dict[str, _Target], prefix: str, norm: nnx.Module) -> None:
  targets[f"{prefix}.weight"] = _Target(norm.scale, "vector")
  targets[f"{prefix}.bias"] = _Target(norm.bias, "vector")


def parameter_map(model: ConvNeXtV2, layout: str = "timm", *, include_head: bool = True) -> dict[str, _Target]:
  """Return PyTorch key -> target variable for every tensor of the layout.

  `include_head` adds timm's `head.norm` and `head.fc` (timm layout only, and
  only for a model built with head="timm").
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown weight layout {layout!r}; expected one of {LAYOUTS}")
  if layout == "timm":
    stem, stages = "stem.{}", "stages.{}"
  else:
    stem, stages = "backbone.stem_{}", "backbone.stages_{}"

  targets: dict[str, _Target] = {}
  _add_conv(targets, stem.format(0), model.stem_conv)
  _add_norm(targets, stem.format(1), model.stem_norm)
  for index, stage in enumerate(model.stages):
    prefix = stages.format(index)
    if stage.downsample_conv is not None:
      _add_norm(targets, f"{prefix}.downsample.0", stage.downsample_norm)
      _add_conv(targets, f"{prefix}.downsample.1", stage.downsample_conv)
    for number, block in enumerate(stage.blocks):
      block_prefix = f"{prefix}.blocks.{number}"
      targets[f"{block_prefix}.conv_dw.weight"] = _Target(block.conv_dw.kernel, "conv")
      targets[f"{block_prefix}.conv_dw.bias"] = _Target(block.conv_dw.bias, "vector")
      _add_norm(targets, f"{block_prefix}.norm", block.norm)
      _add_linear(targets, f"{block_prefix}.mlp.fc1", block.fc1)
      targets[f"{block_prefix}.mlp.grn.weight"] = _Target(block.grn.gamma, "vector")
      targets[f"{block_prefix}.mlp.grn.bias"] = _Target(block.grn.beta, "vector")
      _add_linear(targets, f"{block_prefix}.mlp.fc2", block.fc2)

  if layout == "upstream":
    for stage, attention in model.coordinate_attention.items():
      prefix = f"ca_blocks.ca_{stage}"
      _add_linear(targets, f"{prefix}.conv1", attention.conv1)
      _add_norm(targets, f"{prefix}.bn1", attention.bn1)
      targets[f"{prefix}.bn1.running_mean"] = _Target(attention.bn1.mean, "vector")
      targets[f"{prefix}.bn1.running_var"] = _Target(attention.bn1.var, "vector")
      _add_linear(targets, f"{prefix}.conv_h", attention.conv_h)
      _add_linear(targets, f"{prefix}.conv_w", attention.conv_w)
  # TODO: the upstream classification heads' key names are not mapped yet, so an
  # upstream checkpoint loads the encoder only and the head stays at its init.

  if include_head and layout == "timm" and model.head is not None and model.head.kind == "timm":
    _add_norm(targets, "head.norm", model.head.norm)
    _add_linear(targets, "head.fc", model.head.fc)
  return targets


def detect_layout(state_dict: Mapping[str, np.ndarray]) -> str:
  """Return "upstream" when any key starts with `backbone.` or `ca_blocks.`, else "timm"."""
  if any(key.startswith(("backbone.", "ca_blocks.")) for key in state_dict):
    return "upstream"
  return "timm"


def _listing(names: list[str]) -> str:
  listed = ", ".join(names[:MAX_LISTED])
  if len(names) > MAX_LISTED:
    listed += f", ... ({len(names) - MAX_LISTED} more)"
  return listed


def load_state_dict(
    model: ConvNeXtV2,
    state_dict: Mapping[str, np.ndarray],
    *,
    layout: str | None = None,
    include_head: bool = True,
    source: str = "state dict",
) -> None:
  """Copy PyTorch tensors (as numpy arrays) into `model`'s variables in place.

  Every key must map to a variable, and every variable of the layout must get a
  key of a matching shape. Otherwise nothing is written, and one
  `WeightLoadError` lists all missing keys, unexpected keys and wrong shapes.
  With `include_head=False`, `head.*` keys are skipped and the head keeps its
  initial values. `layout` None means `detect_layout`.
  """
  if layout is None:
    layout = detect_layout(state_dict)
  targets = parameter_map(model, layout, include_head=include_head)
  provided = {key: value for key, value in state_dict.items() if not key.endswith(IGNORED_SUFFIXES)}
  if not include_head:
    provided = {key: value for key, value in provided.items() if not key.startswith("head.")}

  missing = sorted(set(targets) - set(provided))
  unexpected = sorted(set(provided) - set(targets))
  wrong_shapes = []
  for key in sorted(set(targets) & set(provided)):
    shape = tuple(np.shape(provided[key]))
    allowed = _torch_shapes(targets[key])
    if shape not in allowed:
      wrong_shapes.append(f"{key} has shape {shape}, expected {' or '.join(map(str, allowed))}")

  if missing or unexpected or wrong_shapes:
    problems = []
    if missing:
      problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
      problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong_shapes:
      problems.append(f"{len(wrong_shapes)} wrong shapes: {_listing(wrong_shapes)}")
    hint = ""
    if any(key.startswith("head.") for key in unexpected + missing):
      hint = " (for head.* keys: build the model with head='timm', or pass include_head=False)"
    raise WeightLoadError(
        f"{source} does not fit ConvNeXt-V2 {model.config.variant} in the {layout!r} layout: "
        + "; ".join(problems)
        + hint
    )

  for key, target in targets.items():
    value = _to_flax(np.asarray(provided[key]), target.kind)
    target.variable.set_value(jnp.asarray(value, dtype=target.variable.dtype))
  logger.debug("loaded %d tensors from %s (%s layout)", len(targets), source, layout)


def _unwrap_checkpoint(checkpoint: object, path: pathlib.Path) -> Mapping[str, object]:
  if not isinstance(checkpoint, Mapping):
    raise WeightLoadError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
  for key in CHECKPOINT_KEYS:
    if isinstance(checkpoint.get(key), Mapping):
      logger.info("%s: using the state dict under %r", path, key)
      return checkpoint[key]
  return checkpoint


def _tensor_to_numpy(value: object, key: str, path: pathlib.Path) -> np.ndarray:
  if hasattr(value, "detach"):
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      tensor = tensor.float()
    return tensor.numpy()
  if isinstance(value, (np.ndarray, int, float)):
    return np.asarray(value)
  raise WeightLoadError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise WeightLoadError(
        f"{path}: reading a PyTorch checkpoint needs PyTorch, which is not installed; "
        "install it (pip install torch) or convert the file to .safetensors or .npz where PyTorch is available"
    ) from error
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many types for bad or unsafe files
    raise WeightLoadError(f"{path}: torch.load(weights_only=True) failed: {error}") from error
  state_dict = _unwrap_checkpoint(checkpoint, path)
  return {key: _tensor_to_numpy(value, key, path) for key, value in state_dict.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a flat name -> array state dict from `.npz`, `.safetensors` or a PyTorch file.

  A PyTorch checkpoint with a dict under one of `CHECKPOINT_KEYS` is unwrapped
  to that dict (the first one present).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightLoadError(f"{path}: weight file not found")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
      raise WeightLoadError(f"{path}: cannot read .npz weights: {error}") from error
  if suffix == ".safetensors":
    try:
      return dict(safetensors.numpy.load_file(path))
    except (OSError, safetensors.SafetensorError) as error:
      raise WeightLoadError(f"{path}: cannot read .safetensors weights: {error}") from error
  if suffix in TORCH_SUFFIXES:
    return _read_torch(path)
  raise WeightLoadError(
      f"{path}: unsupported weight file type {suffix!r}; expected .npz, .safetensors, {', '.join(TORCH_SUFFIXES)}"
  )


def load_weights(
    model: ConvNeXtV2,
    path: str | os.PathLike,
    *,
    layout: str | None = None,
    include_head: bool = True,
) -> None:
  """Read a weight file and load it into `model` in place (see `load_state_dict`)."""
  state_dict = read_state_dict(path)
  load_state_dict(model, state_dict, layout=layout, include_head=include_head, source=str(path))
