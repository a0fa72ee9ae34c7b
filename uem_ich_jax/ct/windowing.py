"""CT display windows as the model's three input channels.

Every stage of the project feeds the model the same three windows, each clipped
to its range and scaled to [-1, 1]: brain, subdural and bone. Stored datasets
keep them as uint8 (0..255) and `uint8_to_model_input` maps them back.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

# Window name to (center, width) in HU, in channel order.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (500.0, 2000.0),
}
WINDOW_NAMES = tuple(WINDOWS)
NUM_CHANNELS = len(WINDOWS)


def _array_module(x: Any) -> types.ModuleType:
  """Return jax.numpy for jax arrays and tracers, numpy for everything else.

  Checking the type's module avoids importing jax for numpy input.
  """
  if type(x).__module__.split(".")[0] in ("jax", "jaxlib"):
    import jax.numpy as jnp

    return jnp
  return np


def windows(hu: Any) -> Any:
  """Window HU into float32 channels (..., 3) in [-1, 1].

  Channel c is `WINDOWS[WINDOW_NAMES[c]]`: values at or below center - width/2
  map to -1, at or above center + width/2 to +1, linearly in between. Any
  leading shape works. A jax array (also inside `jax.jit`) gives a jax array,
  anything else a numpy array; the arithmetic is float32 in both cases.
  """
  xp = _array_module(hu)
  hu = xp.asarray(hu, dtype=xp.float32)
  channels = []
  for center, width in WINDOWS.values():
    low = np.float32(center - width / 2)
    high = np.float32(center + width / 2)
    scaled = (xp.clip(hu, low, high) - np.float32(center)) / np.float32(width / 2)
    channels.append(scaled)
  return xp.stack(channels, axis=-1)


def windows_uint8(hu: Any) -> np.ndarray:
  """Window HU into uint8 channels (..., 3) for storage, 0 for -1 and 255 for +1.

  Rounded to the nearest level, so `uint8_to_model_input` of the result is
  within 1/255 of `windows(hu)`.
  """
  scaled = np.asarray(windows(np.asarray(hu)))
  levels = np.rint((scaled + np.float32(1)) * np.float32(255 / 2))
  return np.clip(levels, 0, 255).astype(np.uint8)


def uint8_to_model_input(x: Any) -> Any:
  """Map stored uint8 window levels (0..255) to float32 in [-1, 1].

  Takes numpy or jax input (also inside `jax.jit`) and returns the same kind.
  """
  xp = _array_module(x)
  x = xp.asarray(x, dtype=xp.float32)
  return x * np.float32(2 / 255) - np.float32(1)
