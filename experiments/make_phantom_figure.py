"""Draw phantom slices in the three model windows with the bleed outlined.

One row per case (a normal scan, then one scan per hemorrhage subtype) shows
the slice with the most blood in the brain, subdural and bone windows. The
mask outline is drawn in the subtype's colour on the brain and subdural
windows. Run from the repository root:

  python experiments/make_phantom_figure.py --output docs/phantom_windows.png
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from uem_ich_jax import MASK_CLASS_IDS, SUBTYPES
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
LABEL_HEIGHT = 18


def _pick_slice(mask: np.ndarray, num_slices: int) -> int:
  """Returns the slice with the most blood, or one at the level of the ventricles."""
  area = (mask > 0).sum(axis=(1, 2))
  if area.any():
    return int(np.argmax(area))
  return int(num_slices * 0.45)


def _tile(hu: np.ndarray, mask: np.ndarray, channel: int, outline: bool) -> Image.Image:
  gray = windowing.windows_uint8(hu)[..., channel]
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  if outline:
    for class_id, color in COLORS.items():
      region = mask == class_id
      edge = region & ~ndimage.binary_erosion(region)
      rgb[edge] = color
  return Image.fromarray(rgb)


def make_figure(seed: int, output: pathlib.Path) -> None:
  cases = [("normal", ())] + [(name, (name,)) for name in SUBTYPES]
  rows = []
  for offset, (title, subtypes) in enumerate(cases):
    scan = generate_scan(seed + offset, subtypes=subtypes)
    k = _pick_slice(scan.mask, scan.volume.num_slices)
    hu, mask = scan.volume.hu[k], scan.mask[k]
    tiles = [
        _tile(hu, mask, channel, outline=channel < 2 and bool(subtypes))
        for channel in range(windowing.NUM_CHANNELS)
    ]
    width = sum(t.width for t in tiles)
    row = Image.new("RGB", (width, tiles[0].height + LABEL_HEIGHT))
    x = 0
    for tile in tiles:
      row.paste(tile, (x, LABEL_HEIGHT))
      x += tile.width
    names = " / ".join(windowing.WINDOW_NAMES)
    ImageDraw.Draw(row).text((4, 3), f"{title}  (slice {k}; {names} windows)", fill=(255, 255, 255))
    rows.append(row)
  figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
  y = 0
  for row in rows:
    figure.paste(row, (0, y))
    y += row.height
  output.parent.mkdir(parents=True, exist_ok=True)
  figure.save(output)


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
