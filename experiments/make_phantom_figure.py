"""Draw phantom slices in the three model windows with the bleed outlined.

One row per case shows one slice in the brain, subdural and bone windows: a
normal scan, one scan per hemorrhage subtype (the slice with the most blood),
then the findings behind the other CQ500 labels. The mask outline is drawn in
the subtype's colour on the brain and subdural windows. The midline-shift row
marks the skull's symmetry plane (`uem_ich_jax.clinical.estimate_midline`) in
white dots on the brain window, so the displaced septum and falx stand out
from it; the fracture row outlines the gap in the bone window. Run from the
repository root:

  python experiments/make_phantom_figure.py --output docs/phantom_windows.png
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from uem_ich_jax import MASK_CLASS_IDS, SUBTYPES, clinical
from uem_ich_jax.ct import windowing
from uem_ich_jax.phantom import generate_scan

# Outline colour per mask class id (RGB).
COLORS = {
    MASK_CLASS_IDS["epidural"]: (255, 80, 80),
    MASK_CLASS_IDS["intraparenchymal"]: (255, 200, 0),
    MASK_CLASS_IDS["intraventricular"]: (0, 200, 255),
    MASK_CLASS_IDS["subarachnoid"]: (80, 255, 80),
    MASK_CLASS_IDS["subdural"]: (255, 0, 255),
}
FRACTURE_COLOR = (255, 120, 0)
LABEL_HEIGHT = 18
# Grid of every scan: 1.2 mm pixels keep the whole head and the file small.
SHAPE = (32, 192, 192)
SPACING_MM = (5.0, 1.2, 1.2)
# Finding rows: title, keyword arguments of `generate_scan`.
FINDINGS = (
    ("subdural with 8 mm midline shift", dict(subtypes=("subdural",), midline_shift_mm=8.0)),
    ("calvarial fracture", dict(subtypes=(), fracture="calvarial")),
    ("chronic subdural (class 5, 0-25 HU)", dict(subtypes=(), chronic=True)),
)


def _pick_slice(mask: np.ndarray, num_slices: int) -> int:
  """Returns the slice with the most blood, or one at the level of the ventricles."""
  area = (mask > 0).sum(axis=(1, 2))
  if area.any():
    return int(np.argmax(area))
  return int(num_slices * 0.45)


def _tile(hu: np.ndarray, mask: np.ndarray, channel: int, outline: bool) -> np.ndarray:
  gray = windowing.windows_uint8(hu)[..., channel]
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  if outline:
    for class_id, color in COLORS.items():
      _outline(rgb, mask == class_id, color)
  return rgb


def _outline(rgb: np.ndarray, region: np.ndarray, color: tuple[int, int, int]) -> None:
  edge = region & ~ndimage.binary_erosion(region)
  rgb[edge] = color


def _mark_midline(rgb: np.ndarray, scan, k: int) -> None:
  """Dots the estimated midsagittal plane of slice k into the tile."""
  volume = scan.volume
  midline = clinical.estimate_midline(volume)
  normal = midline.normal
  offset = (volume.positions[k] - midline.point_mm[k]) @ normal
  row_term = volume.affine[:3, 1] @ normal
  column_term = volume.affine[:3, 2] @ normal
  head = volume.hu[k] > -200
  for row in range(0, rgb.shape[0], 3):
    column = int(round(-(offset + row * row_term) / column_term))
    if 0 <= column < rgb.shape[1] and head[row, column]:
      rgb[row, column] = (255, 255, 255)


def _row(scan, k: int, title: str, outline: bool) -> Image.Image:
  hu, mask = scan.volume.hu[k], scan.mask[k]
  tiles = [
      _tile(hu, mask, channel, outline and channel < 2) for channel in range(windowing.NUM_CHANNELS)
  ]
  if scan.midline_shift_mm > 0:
    _mark_midline(tiles[0], scan, k)
  if scan.fracture_mask[k].any():
    gap = ndimage.binary_dilation(scan.fracture_mask[k], iterations=2)
    _outline(tiles[2], gap, FRACTURE_COLOR)
  tiles = [Image.fromarray(t) for t in tiles]
  width = sum(t.width for t in tiles)
  row = Image.new("RGB", (width, tiles[0].height + LABEL_HEIGHT))
  x = 0
  for tile in tiles:
    row.paste(tile, (x, LABEL_HEIGHT))
    x += tile.width
  names = " / ".join(windowing.WINDOW_NAMES)
  ImageDraw.Draw(row).text((4, 3), f"{title}  (slice {k}; {names} windows)", fill=(255, 255, 255))
  return row


def make_figure(seed: int, output: pathlib.Path) -> None:
  cases = [("normal", dict(subtypes=()))] + [(name, dict(subtypes=(name,))) for name in SUBTYPES]
  rows = []
  for offset, (title, arguments) in enumerate(cases + list(FINDINGS)):
    scan = generate_scan(seed + offset, SHAPE, spacing_mm=SPACING_MM, **arguments)
    if scan.fracture_mask.any():
      k = int(np.argmax(scan.fracture_mask.sum(axis=(1, 2))))
    elif scan.midline_shift_mm > 0:
      # The slice the normal row shows, at the level of the ventricles.
      k = _pick_slice(np.zeros_like(scan.mask), scan.volume.num_slices)
    else:
      k = _pick_slice(scan.mask, scan.volume.num_slices)
    rows.append(_row(scan, k, title, outline=bool(scan.mask[k].any())))
  figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
  y = 0
  for row in rows:
    figure.paste(row, (0, y))
    y += row.height
  output.parent.mkdir(parents=True, exist_ok=True)
  figure.save(output, optimize=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=1, help="seed of the first scan; each row adds 1")
  parser.add_argument(
      "--output", type=pathlib.Path, default=pathlib.Path("docs/phantom_windows.png"), help="PNG path"
  )
  args = parser.parse_args()
  make_figure(args.seed, args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
