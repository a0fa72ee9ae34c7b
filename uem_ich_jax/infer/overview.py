"""The overview picture of a prediction: slices in the brain window, each with its `any` probability.

Layout, top to bottom: a title line, then the slice with the highest `any`
probability in the brain, subdural and bone windows. Below them, a bar chart
shows the `any` probability of every slice in scan order, with the threshold
drawn across it. Last comes a grid of up to `max_tiles` evenly spaced slices,
which always includes the top slice, each captioned with its index and
probability.
Slices at or above the `any` threshold get a red frame, a red caption and a
red bar, the others grey. With a predicted mask, every tile also shows the
outline of its blood in yellow, and with detected boxes, the boxes in cyan.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uem_ich_jax.ct.windowing import WINDOW_NAMES, windows_uint8
from uem_ich_jax.errors import InputError

BACKGROUND = (20, 20, 20)
TEXT = (235, 235, 235)
HIGHLIGHT = (230, 40, 40)
FRAME = (90, 90, 90)
OUTLINE = (255, 210, 0)  # outline of the predicted blood
BOX = (0, 220, 255)  # detected boxes
BAR = (150, 150, 150)  # per-slice probability below the threshold
BAR_HEIGHT = 64
TILE = 176  # pixels per grid tile
TOP_TILE = 288  # pixels per window of the top slice
COLUMNS = 6
MARGIN = 8
FRAME_WIDTH = 3


class OverviewError(InputError):
  """The overview cannot be drawn or written; the message names the file."""


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow built without FreeType has only the fixed bitmap font.
    return ImageFont.load_default()


def choose_slices(probs_any: np.ndarray, max_tiles: int) -> list[int]:
  """Up to `max_tiles` evenly spaced slice indices, always including the most likely one."""
  count = probs_any.shape[0]
  top = int(np.argmax(probs_any))
  if count <= max_tiles:
    return list(range(count))
  picked = {int(round(value)) for value in np.linspace(0, count - 1, max_tiles - 1)}
  picked.add(top)
  return sorted(picked)


def outline(mask: np.ndarray, size: int) -> np.ndarray:
  """Return the bool (size, size) boundary of `mask > 0` after a nearest-neighbour resize to `size`.

  A boundary pixel is inside the mask and has a 4-neighbour outside it (or
  lies on the tile's edge).
  """
  inside = Image.fromarray(np.asarray(mask > 0, np.uint8) * 255, mode="L")
  inside = np.asarray(inside.resize((size, size), Image.Resampling.NEAREST)) > 0
  padded = np.pad(inside, 1)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return inside & ~interior


def _tile(
    image: np.ndarray,
    size: int,
    mask: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> Image.Image:
  """Resize one windowed slice to `size` and draw its mask outline and boxes (in slice pixels)."""
  gray = Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BILINEAR)
  tile = gray.convert("RGB")
  if mask is not None and np.any(mask):
    pixels = np.array(tile)
    pixels[outline(mask, size)] = OUTLINE
    tile = Image.fromarray(pixels, mode="RGB")
  if boxes is not None and len(boxes):
    draw = ImageDraw.Draw(tile)
    scale = size / image.shape[0]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    for row_min, column_min, row_max, column_max in boxes[np.isfinite(boxes).all(axis=1)]:
      # Box edges are pixel edges, so the last covered pixel is at max - 1.
      draw.rectangle(
          (column_min * scale, row_min * scale, column_max * scale - 1, row_max * scale - 1),
          outline=BOX,
      )
  return tile


def probability_bar(
    probs_any: np.ndarray, threshold: float, width: int, font: ImageFont.ImageFont
) -> Image.Image:
  """Draw the `any` probability of every slice as a bar chart, with the threshold as a line."""
  bar = Image.new("RGB", (width, BAR_HEIGHT), BACKGROUND)
  draw = ImageDraw.Draw(bar)
  count = probs_any.shape[0]
  slot = width / count
  for index, probability in enumerate(probs_any):
    height = float(np.clip(probability, 0.0, 1.0)) * (BAR_HEIGHT - 1)
    left = index * slot
    right = max(left, (index + 1) * slot - (1 if slot >= 3 else 0)) - 1
    color = HIGHLIGHT if probability >= threshold else BAR
    draw.rectangle((left, BAR_HEIGHT - 1 - height, max(left, right), BAR_HEIGHT - 1), fill=color)
  line_y = round((1.0 - threshold) * (BAR_HEIGHT - 1))
  for x in range(0, width, 6):
    draw.line((x, line_y, min(x + 3, width - 1), line_y), fill=TEXT)
  draw.text((2, 0), "any, per slice", fill=TEXT, font=font)
  return bar


def _framed(tile: Image.Image, color: tuple[int, int, int]) -> Image.Image:
  framed = Image.new("RGB", (tile.width + 2 * FRAME_WIDTH, tile.height + 2 * FRAME_WIDTH), color)
  framed.paste(tile.convert("RGB"), (FRAME_WIDTH, FRAME_WIDTH))
  return framed


def render_overview(
    hu: np.ndarray,
    probs: np.ndarray,
    thresholds: Mapping[str, float],
    *,
    title: str = "",
    max_tiles: int = 24,
    mask: np.ndarray | None = None,
    boxes: Sequence[np.ndarray] | None = None,
) -> Image.Image:
  """Draw the overview of `hu` (slice, row, column; square slices) with `probs` (slice, 6).

  `mask`, when given, contains class ids on the grid of `hu`, and the
  outline of its nonzero voxels is drawn on every tile. `boxes`, when given,
  has one (boxes, 4) array per slice of (row_min, column_min, row_max,
  column_max) on the pixel edges of `hu`'s grid.
  """
  hu = np.asarray(hu)
  probs = np.asarray(probs)
  if hu.ndim != 3 or probs.ndim != 2 or probs.shape[0] != hu.shape[0]:
    raise OverviewError(
        f"need hu (slice, row, column) and probabilities (slice, labels) for the same slices,"
        f" got {hu.shape} and {probs.shape}"
    )
  if mask is not None and np.shape(mask) != hu.shape:
    raise OverviewError(f"the mask has shape {np.shape(mask)}, expected the hu shape {hu.shape}")
  if boxes is not None and len(boxes) != hu.shape[0]:
    raise OverviewError(f"need one array of boxes per slice, got {len(boxes)} for {hu.shape[0]}")
  threshold = float(thresholds["any"])
  top = int(np.argmax(probs[:, 0]))
  chosen = choose_slices(probs[:, 0], max_tiles)
  caption_font, title_font = _font(15), _font(18)
  caption_height, title_height = 22, 30

  framed_tile = TILE + 2 * FRAME_WIDTH
  framed_top = TOP_TILE + 2 * FRAME_WIDTH
  columns = min(COLUMNS, len(chosen))
  rows = -(-len(chosen) // columns)
  width = max(
      MARGIN + columns * (framed_tile + MARGIN),
      MARGIN + len(WINDOW_NAMES) * (framed_top + MARGIN),
  )
  top_height = caption_height + framed_top + MARGIN
  bar_height = BAR_HEIGHT + MARGIN
  grid_height = rows * (framed_tile + caption_height + MARGIN)
  height = MARGIN + title_height + top_height + bar_height + caption_height + grid_height + MARGIN
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)

  y = MARGIN
  draw.text((MARGIN, y), title, fill=TEXT, font=title_font)
  y += title_height

  levels = windows_uint8(hu[top])  # (row, column, 3): brain, subdural, bone.
  top_positive = probs[top, 0] >= threshold
  draw.text(
      (MARGIN, y),
      f"slice {top} (highest 'any': {probs[top, 0]:.2f})",
      fill=HIGHLIGHT if top_positive else TEXT,
      font=caption_font,
  )
  y += caption_height
  for k, name in enumerate(WINDOW_NAMES):
    x = MARGIN + k * (framed_top + MARGIN)
    tile = _tile(
        levels[..., k],
        TOP_TILE,
        None if mask is None else mask[top],
        None if boxes is None else boxes[top],
    )
    canvas.paste(_framed(tile, HIGHLIGHT if top_positive else FRAME), (x, y))
    draw.text((x + 2 * FRAME_WIDTH, y + 2 * FRAME_WIDTH), name, fill=TEXT, font=caption_font)
  y += framed_top + MARGIN

  bar = probability_bar(probs[:, 0], threshold, width - 2 * MARGIN, caption_font)
  canvas.paste(bar, (MARGIN, y))
  y += bar_height

  draw.text(
      (MARGIN, y),
      f"brain window, {len(chosen)} of {hu.shape[0]} slices; red: 'any' >= {threshold:.2f}"
      + ("; yellow: predicted blood" if mask is not None else "")
      + ("; cyan: detected boxes" if boxes is not None else ""),
      fill=TEXT,
      font=caption_font,
  )
  y += caption_height
  for position, index in enumerate(chosen):
    row, column = divmod(position, columns)
    x = MARGIN + column * (framed_tile + MARGIN)
    tile_y = y + row * (framed_tile + caption_height + MARGIN)
    positive = probs[index, 0] >= threshold
    color = HIGHLIGHT if positive else FRAME
    brain = windows_uint8(hu[index])[..., 0]
    tile = _tile(
        brain,
        TILE,
        None if mask is None else mask[index],
        None if boxes is None else boxes[index],
    )
    canvas.paste(_framed(tile, color), (x, tile_y))
    caption = f"#{index}  any {probs[index, 0]:.2f}" + ("  top" if index == top else "")
    draw.text(
        (x, tile_y + framed_tile + 2),
        caption,
        fill=HIGHLIGHT if positive else TEXT,
        font=caption_font,
    )
  return canvas


def save_overview(
    hu: np.ndarray,
    probs: np.ndarray,
    thresholds: Mapping[str, float],
    path: str | os.PathLike,
    *,
    title: str = "",
    max_tiles: int = 24,
    mask: np.ndarray | None = None,
    boxes: Sequence[np.ndarray] | None = None,
) -> pathlib.Path:
  """Render the overview and write it as PNG to `path`."""
  path = pathlib.Path(path)
  image = render_overview(
      hu, probs, thresholds, title=title, max_tiles=max_tiles, mask=mask, boxes=boxes
  )
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
  except OSError as error:
    raise OverviewError(f"failed to write the overview to {path}: {error}") from error
  return path
