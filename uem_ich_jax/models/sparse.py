"""SparK-style random masks on the encoder's stride-32 grid, as explicit arrays.

A mask is a boolean array (N, gh, gw) with True where a 32x32-pixel cell is
visible. The encoder takes it as an argument (`ConvNeXtV2.features(x,
visible)`) and turns it into float maps at each stride with `mask_pyramid`.
Everything here has static shapes, so it runs under `jax.jit` when `batch`,
`grid` and `mask_ratio` are static.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from uem_ich_jax.errors import InputError

# Pixels per mask cell along each side: the encoder's total stride, as in SparK,
# which has no separate patch-size setting.
CELL_SIZE = 32

# Strides of the maps in `mask_pyramid`: pixels, then the four stages.
PYRAMID_STRIDES = (1, 4, 8, 16, 32)


def keep_count(num_cells: int, mask_ratio: float) -> int:
  """Return how many cells stay visible per image: round(num_cells * (1 - mask_ratio)), at least 1.

  SparK rounds with Python's `round` (20 of 49 cells at ratio 0.6), where
  FCMAE truncates (19 of 49).
  """
  if isinstance(num_cells, bool) or not isinstance(num_cells, numbers.Integral) or num_cells < 1:
    raise InputError(f"num_cells must be a positive integer, got {num_cells!r}")
  if not 0.0 <= mask_ratio < 1.0:
    raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
  return max(1, round(int(num_cells) * (1.0 - mask_ratio)))


def draw_visible(key: jax.Array, batch: int, grid: tuple[int, int], mask_ratio: float) -> jax.Array:
  """Draw a bool (batch, gh, gw) mask with exactly `keep_count` visible (True) cells per image.

  Each image ranks its cells by uniform noise from `key` and keeps the first
  `keep_count`, so the same key gives the same mask. `batch`, `grid` and
  `mask_ratio` fix the shapes and must be static under `jax.jit`.
  """
  if len(grid) != 2 or min(grid) < 1:
    raise InputError(f"grid must be two positive sizes (gh, gw), got {grid!r}")
  if batch < 1:
    raise InputError(f"batch must be positive, got {batch!r}")
  grid_h, grid_w = int(grid[0]), int(grid[1])
  num_cells = grid_h * grid_w
  keep = keep_count(num_cells, mask_ratio)
  noise = jax.random.uniform(key, (batch, num_cells))
  kept = jnp.argsort(noise, axis=1)[:, :keep]
  rows = jnp.arange(batch)[:, None]
  visible = jnp.zeros((batch, num_cells), jnp.bool_).at[rows, kept].set(True)
  return visible.reshape(batch, grid_h, grid_w)


def expand(visible: jax.Array, factor: int) -> jax.Array:
  """Repeat each cell of a (N, gh, gw) mask `factor` times along H and W.

  Returns a float32 (N, gh * factor, gw * factor, 1) map of 0 and 1 that
  broadcasts against NHWC feature maps.
  """
  if visible.ndim != 3:
    raise InputError(f"the visible mask must have shape (N, gh, gw), got {tuple(visible.shape)}")
  if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
    raise InputError(f"the repeat factor must be a positive integer, got {factor!r}")
  cells = (visible > 0).astype(jnp.float32)
  cells = jnp.repeat(jnp.repeat(cells, factor, axis=1), factor, axis=2)
  return cells[..., None]


def mask_pyramid(visible: jax.Array) -> dict[int, jax.Array]:
  """Map each stride in `PYRAMID_STRIDES` to the visible mask at that resolution.

  Stride s gets `expand(visible, CELL_SIZE // s)`: stride 1 matches the input
  pixels and stride 32 is the grid itself, each (N, h, w, 1) float32.
  """
  return {stride: expand(visible, CELL_SIZE // stride) for stride in PYRAMID_STRIDES}
