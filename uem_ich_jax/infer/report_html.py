"""report.html: one self-contained page to read a multitask prediction slice by slice.

The page needs no network access. Its CSS and script are inline, and every
picture is a base64 data URI:

  slices   each slice once per window (brain, subdural, bone, as in
           `ct.windowing.WINDOWS`), as a grayscale JPEG of the square field of
           view, at most `MAX_DISPLAY_PIXELS` on a side
  masks    the blood mask on the model-input grid, one palette PNG per slice
           with blood (transparent background), scaled over the slice
  boxes    drawn from the report's `box_model_px` in an SVG layer whose
           coordinates are model-input pixels
  curve    the six slice probabilities (`any` drawn thicker) against the slice
           position in mm, as inline SVG, with a marker at the shown slice

The reader changes the slice with the mouse wheel over the slice, the slider,
or the arrow keys. Page Up and Page Down step 10 slices, and Home and End jump
to the ends. Buttons switch the window, checkboxes toggle the mask and the
boxes, and a click on the curve jumps to the nearest slice. `#slice=N` in the
address opens slice N. The scan labels, blood volumes, warnings and series
come from the report as static HTML.

Every string from the report (series description, paths, warnings, class
names) is HTML-escaped, and the script's data is JSON with `<`, `>` and `&`
escaped, which the script only ever places into the page as text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from uem_ich_jax.ct.windowing import WINDOW_NAMES, WINDOWS, windows_uint8
from uem_ich_jax.errors import InputError

HTML_FILE = "report.html"
# Side of the slice pictures. A 512-pixel square is the usual CT matrix, so the
# cap only shrinks larger fields of view, which keeps a 40-slice page small.
MAX_DISPLAY_PIXELS = 512
JPEG_QUALITY = 85
# One colour per label, shared by the curve, the mask and the boxes.
LABEL_COLORS = {
    "any": "#ff4040",
    "epidural": "#ffb300",
    "intraparenchymal": "#4fc3f7",
    "intraventricular": "#b388ff",
    "subarachnoid": "#69f0ae",
    "subdural": "#ff80ab",
}
DEFAULT_COLOR = "#ffffff"
# The inline curve, in SVG user units.
CURVE_WIDTH = 560
CURVE_HEIGHT = 230
CURVE_MARGIN = {"left": 42, "right": 12, "top": 12, "bottom": 40}


class ReportHtmlError(InputError):
  """The HTML report cannot be built or written; the message names the array or file."""


# ---------------------------------------------------------------- Pictures ---


def _data_uri(image: Image.Image, image_format: str, **options: Any) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **options)
  encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
  return f"data:image/{image_format.lower()};base64,{encoded}"


def display_pixels(square_shape: Sequence[int], limit: int = MAX_DISPLAY_PIXELS) -> int:
  """Return the side of the slice pictures: the square's larger side, at most `limit`."""
  return int(min(max(square_shape[-2], square_shape[-1]), limit))


def slice_images(square_hu: np.ndarray, side: int) -> dict[str, list[str]]:
  """Encode every slice of (S, rows, columns) HU once per window as a `side` square JPEG URI.

  The square field of view can have unequal pixel counts along rows and
  columns (unequal pixel spacing), so the resize to a square restores its true
  shape in mm.
  """
  # TODO: every slice is embedded in every window, about 0.1 MB per slice for a
  # 512-pixel GE head CT, so a thin-slice series of 300 slices makes a 30 MB page.
  images: dict[str, list[str]] = {name: [] for name in WINDOW_NAMES}
  for hu in square_hu:
    levels = windows_uint8(hu)  # (rows, columns, 3), channel order WINDOW_NAMES.
    for channel, name in enumerate(WINDOW_NAMES):
      gray = Image.fromarray(np.ascontiguousarray(levels[..., channel]), mode="L")
      gray = gray.resize((side, side), Image.Resampling.BILINEAR)
      images[name].append(_data_uri(gray, "JPEG", quality=JPEG_QUALITY))
  return images


def _hex_rgb(color: str) -> tuple[int, int, int]:
  return tuple(int(color[k : k + 2], 16) for k in (1, 3, 5))


def mask_palette(classes: dict[str, str]) -> dict[int, str]:
  """Return the colour of every nonzero mask class id, from the report's `segmentation.classes`.

  A binary head's class 1 ("blood (any subtype)") takes the colour of `any`.
  """
  palette = {}
  for class_id, name in classes.items():
    if int(class_id) == 0:
      continue
    palette[int(class_id)] = LABEL_COLORS.get(name, LABEL_COLORS["any"])
  return palette


def mask_images(mask: np.ndarray, palette: dict[int, str]) -> list[str | None]:
  """Encode each slice of a (S, N, N) class-id mask as a palette PNG URI, None for no blood.

  Palette index 0 is transparent, and index k has the colour of class k.
  """
  colors = np.zeros((256, 3), np.uint8)
  for class_id, color in palette.items():
    colors[class_id] = _hex_rgb(color)
  uris: list[str | None] = []
  for classes in np.asarray(mask, np.uint8):
    if not classes.any():
      uris.append(None)
      continue
    image = Image.fromarray(classes, mode="P")
    image.putpalette(colors.reshape(-1).tolist())
    uris.append(_data_uri(image, "PNG", transparency=0, optimize=True))
  return uris


# ------------------------------------------------------------------- Curve ---


def _slice_axis(report: dict[str, Any]) -> tuple[list[float], str]:
  """Return each slice's value on the curve's x axis and the axis title.

  The slice position in mm when every slice has a distinct finite one, else
  the slice index.
  """
  positions = [entry.get("position_mm") for entry in report["slices"]]
  valid = all(isinstance(value, (int, float)) and math.isfinite(value) for value in positions)
  if valid and len(set(positions)) == len(positions):
    return [float(value) for value in positions], "slice position (mm)"
  return [float(entry["index"]) for entry in report["slices"]], "slice index"


def _path(xs: Sequence[float], ys: Sequence[float | None]) -> str:
  """Return SVG path data through the points, with a gap at every missing y."""
  commands, pen_down = [], False
  for x, y in zip(xs, ys):
    if y is None:
      pen_down = False
      continue
    commands.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
    pen_down = True
  return " ".join(commands)


def curve_svg(report: dict[str, Any]) -> tuple[str, list[float]]:
  """Draw the slice probabilities against the slice position as SVG markup.

  Returns the markup and each slice's x in the SVG's user units, which the
  script uses for the marker and to find the slice nearest a click.
  """
  values, axis_title = _slice_axis(report)
  low, high = min(values), max(values)
  if high == low:
    low, high = low - 1.0, high + 1.0
  left, top = CURVE_MARGIN["left"], CURVE_MARGIN["top"]
  plot_width = CURVE_WIDTH - left - CURVE_MARGIN["right"]
  plot_height = CURVE_HEIGHT - top - CURVE_MARGIN["bottom"]
  bottom = top + plot_height
  xs = [left + (value - low) / (high - low) * plot_width for value in values]

  def y_of(probability: float) -> float:
    return bottom - probability * plot_height

  parts = [
      f'<svg id="curve" viewBox="0 0 {CURVE_WIDTH} {CURVE_HEIGHT}" role="img"'
      ' aria-label="slice probabilities; click to show a slice">',
      f'<rect class="plot" x="{left}" y="{top}" width="{plot_width}" height="{plot_height}"/>',
  ]
  right = left + plot_width
  for probability in (0.0, 0.5, 1.0):
    y = y_of(probability)
    parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>')
    parts.append(
        f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
        f"{probability:g}</text>"
    )
  for value, x, anchor in ((low, left, "start"), (high, right, "end")):
    parts.append(
        f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="{anchor}">'
        f"{value:.1f}</text>"
    )
  parts.append(
      f'<text class="tick" x="{left + plot_width / 2:.1f}" y="{CURVE_HEIGHT - 6}"'
      f' text-anchor="middle">{html.escape(axis_title)}</text>'
  )
  threshold = report.get("scan", {}).get("any", {}).get("threshold")
  if isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0:
    y = y_of(threshold)
    parts.append(
        f'<line class="threshold" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}">'
        f"<title>threshold of any: {threshold:.2f}</title></line>"
    )
  # `any` last, so that it is drawn on top of the subtypes.
  labels = [name for name in report["labels"] if name != "any"] + ["any"]
  for name in labels:
    ys = [
        None if entry["probabilities"].get(name) is None else y_of(entry["probabilities"][name])
        for entry in report["slices"]
    ]
    css_class = "series any" if name == "any" else "series"
    parts.append(
        f'<path class="{css_class}" stroke="{LABEL_COLORS.get(name, DEFAULT_COLOR)}"'
        f' d="{_path(xs, ys)}"><title>{html.escape(name)}</title></path>'
    )
  parts.append(
      f'<line id="curve-marker" x1="{xs[0]:.1f}" x2="{xs[0]:.1f}" y1="{top}" y2="{bottom}"/>'
  )
  parts.append("</svg>")
  return "\n".join(parts), [round(x, 2) for x in xs]


def curve_legend(labels: Sequence[str]) -> str:
  """Return the legend of the curve's label colours as HTML."""
  items = []
  for name in labels:
    css_class = "swatch any" if name == "any" else "swatch"
    color = LABEL_COLORS.get(name, DEFAULT_COLOR)
    items.append(
        f'<span class="legend-item"><span class="{css_class}" style="background:{color}"></span>'
        f"{html.escape(name)}</span>"
    )
  return '<div class="legend">' + "".join(items) + "</div>"


# ----------------------------------------------------------------- Summary ---


def _text(value: Any) -> str:
  """Return `value` as escaped HTML text, "n/a" for None."""
  return "n/a" if value is None else html.escape(str(value))


def _number(value: Any, digits: int = 2) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return "n/a"
  return f"{value:.{digits}f}"


def _verdict(positive: Any) -> str:
  if positive is None:
    return "<td>n/a</td>"
  return '<td class="positive">positive</td>' if positive else '<td>negative</td>'


def labels_section(report: dict[str, Any]) -> str:
  """Return the scan labels table: each label's highest slice probability and the aggregator's."""
  aggregator = report.get("aggregator") or {}
  aggregated = aggregator.get("scan") or {}
  head = "<tr><th>label</th><th>highest slice p (slice)</th><th>threshold</th><th>slices</th>"
  if aggregated:
    head += "<th>aggregator p</th><th>threshold</th><th>scan</th>"
  rows = [head + "</tr>"]
  for name in report["labels"]:
    entry = report["scan"].get(name, {})
    row = (
        f"<tr><td>{_text(name)}</td>"
        f"<td>{_number(entry.get('max_probability'))} ({_text(entry.get('slice'))})</td>"
        f"<td>{_number(entry.get('threshold'))}</td>{_verdict(entry.get('positive'))}"
    )
    if aggregated:
      scan = aggregated.get(name)
      if scan is None:
        row += "<td>n/a</td><td>n/a</td><td>n/a</td>"
      else:
        row += (
            f"<td>{_number(scan.get('probability'))}</td><td>{_number(scan.get('threshold'))}</td>"
            f"{_verdict(scan.get('positive'))}"
        )
    rows.append(row + "</tr>")
  notes = [f"Slice thresholds from {_text(report.get('thresholds_from'))}."]
  if aggregated:
    notes.append(f"Aggregator thresholds from {_text(aggregator.get('thresholds_from'))}.")
  return (
      "<section><h2>Scan labels</h2><table>" + "".join(rows) + "</table>"
      f'<p class="note">{" ".join(notes)}</p></section>'
  )


def volumes_section(report: dict[str, Any]) -> str:
  """Return the blood volume per subtype (mL) and the bleed side."""
  segmentation = report.get("segmentation") or {}
  rows = ["<tr><th>blood</th><th>volume (mL)</th></tr>"]
  for name, volume in (segmentation.get("volume_ml") or {}).items():
    rows.append(f"<tr><td>{_text(name)}</td><td>{_number(volume)}</td></tr>")
  side = segmentation.get("bleed_side")
  if side:
    side_text = (
        f"{_text(side.get('side'))} (left {_number(side.get('left_ml'))} mL,"
        f" right {_number(side.get('right_ml'))} mL)"
    )
  else:
    side_text = "not estimated"
  return (
      "<section><h2>Blood volume</h2><table>" + "".join(rows) + "</table>"
      f'<p class="note">Bleed side: {side_text}. Segmentation head:'
      f" {_text(segmentation.get('head'))}.</p></section>"
  )


def warnings_section(report: dict[str, Any]) -> str:
  """Return the prediction's and the reader's warnings as a list."""
  items = [f"<li>{_text(warning)}</li>" for warning in report.get("warnings") or []]
  items += [f"<li>reader: {_text(warning)}</li>" for warning in report.get("reader_warnings") or []]
  body = "<ul>" + "".join(items) + "</ul>" if items else "<p>none</p>"
  return f'<section id="warnings"><h2>Warnings</h2>{body}</section>'


def series_section(report: dict[str, Any]) -> str:
  """Return the series used and the model that read it, as a definition list."""
  shape = report.get("shape") or []
  spacing = report.get("spacing_mm") or []
  model_input = report.get("model_input") or {}
  model = report.get("model") or {}
  entries = [
      ("input", _text(report.get("input"))),
      ("series description", _text(report.get("series_description"))),
      ("series UID", _text(report.get("series_uid"))),
      ("slices × rows × columns", " × ".join(_text(value) for value in shape)),
      ("spacing (mm)", " × ".join(_number(value, 3) for value in spacing)),
      ("gantry tilt (degrees)", _number(report.get("gantry_tilt_deg"), 1)),
      ("slice spacing varies", _text(report.get("spacing_varies"))),
      ("slices", _text(report.get("slices_as_acquired"))),
      (
          "model input",
          f"{_text(model_input.get('image_size'))} px over"
          f" {_text(model_input.get('field_of_view_mm'))} mm",
      ),
      (
          "model",
          f"{_text(model.get('name'))} {_text(model.get('variant'))}, step"
          f" {_text(model.get('step'))}, {_text(model.get('workdir'))}",
      ),
  ]
  rows = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in entries)
  return f'<section id="series"><h2>Series</h2><dl>{rows}</dl></section>'


# ------------------------------------------------------------------- Page ---


def _script_json(data: dict[str, Any]) -> str:
  """Return `data` as JSON that is safe inside a <script> element.

  Escaping `<`, `>` and `&` as \\u escapes means no string can close the
  element or open a comment, and JSON.parse restores them.
  """
  text = json.dumps(data, allow_nan=False, separators=(",", ":"))
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _viewer_slices(report: dict[str, Any]) -> list[dict[str, Any]]:
  """Return what the caption and box layer need of each slice."""
  slices = []
  for entry in report["slices"]:
    boxes = [
        {"class": box.get("class"), "score": box.get("score"), "box": box.get("box_model_px")}
        for box in entry.get("boxes") or []
    ]
    slices.append({
        "position_mm": entry.get("position_mm"),
        "any": entry["probabilities"].get("any"),
        "blood_ml": entry.get("blood_ml"),
        "boxes": boxes,
    })
  return slices


def _check_arrays(report: dict[str, Any], square_hu: np.ndarray, mask: np.ndarray) -> None:
  count = len(report["slices"])
  if square_hu.ndim != 3 or square_hu.shape[0] != count:
    raise ReportHtmlError(
        f"square_hu has shape {square_hu.shape}, expected (slices, rows, columns) with the"
        f" report's {count} slices"
    )
  if mask.ndim != 3 or mask.shape[0] != count or mask.shape[1] != mask.shape[2]:
    raise ReportHtmlError(
        f"the mask has shape {mask.shape}, expected ({count}, N, N) on the model-input grid"
    )
  image_size = (report.get("model_input") or {}).get("image_size")
  if image_size is not None and mask.shape[1] != image_size:
    raise ReportHtmlError(
        f"the mask has {mask.shape[1]}-pixel slices but the report's model input has"
        f" {image_size}, so the boxes would not line up"
    )


def render_report_html(
    report: dict[str, Any],
    square_hu: np.ndarray,
    mask: np.ndarray,
    *,
    max_display_pixels: int = MAX_DISPLAY_PIXELS,
) -> str:
  """Return the page of one prediction.

  Args:
    report: the report of `scan_predict.predict_scan`.
    square_hu: (S, rows, columns) HU of the square field of view, as
      `predict.model_input` returns it.
    mask: (S, N, N) class ids on the model-input grid (N = image_size), the
      grid of the boxes' `box_model_px`.
    max_display_pixels: the largest side of a slice picture.
  """
  square_hu = np.asarray(square_hu)
  mask = np.asarray(mask)
  _check_arrays(report, square_hu, mask)
  side = display_pixels(square_hu.shape, max_display_pixels)
  segmentation = report.get("segmentation") or {}
  classes = segmentation.get("classes") or {"0": "background", "1": "blood (any subtype)"}
  curve, curve_x = curve_svg(report)
  top = (report.get("top_slice") or {}).get("index", 0)
  data = {
      "windows": list(WINDOW_NAMES),
      "images": slice_images(square_hu, side),
      "masks": mask_images(mask, mask_palette(classes)),
      "slices": _viewer_slices(report),
      "curve_x": curve_x,
      "initial_slice": int(top),
      "colors": LABEL_COLORS,
  }
  input_path = str(report.get("input"))
  name = report.get("series_description") or pathlib.Path(input_path).name or input_path
  any_label = report["scan"].get("any", {})
  verdict = "positive" if any_label.get("positive") else "negative"
  model_note = (report.get("model") or {}).get("note")
  buttons = "".join(
      f'<button type="button" data-window="{name_}" aria-pressed="false">'
      f"{name_} {center:g}/{width:g}</button>"
      for name_, (center, width) in WINDOWS.items()
  )
  detection = report.get("detection")
  boxes_note = "" if detection else " (no detection head)"
  replacements = {
      "TITLE": html.escape(f"ICH prediction: {name}"),
      "HEADING": html.escape(f"{name}: any {verdict}"),
      "NOTE": f'<p class="model-note">{_text(model_note)}</p>' if model_note else "",
      "BUTTONS": buttons,
      "BOXES_DISABLED": "" if detection else " disabled",
      "BOXES_NOTE": boxes_note,
      "IMAGE_SIZE": str(mask.shape[1]),
      # Box captions 1/32 of the slice high, in model-input pixels.
      "BOX_FONT": f"{mask.shape[1] / 32:.2f}",
      "LAST_SLICE": str(len(report["slices"]) - 1),
      "CURVE": curve,
      "LEGEND": curve_legend(report["labels"]),
      "SUMMARY": "\n".join([
          labels_section(report),
          volumes_section(report),
          warnings_section(report),
          series_section(report),
      ]),
      "CSS": _CSS,
      "SCRIPT": _SCRIPT,
  }
  replacements["DATA"] = _script_json(data)
  # One pass over the template, so that a report string that looks like a
  # token is never replaced in turn.
  return re.sub(r"@@([A-Z_]+)@@", lambda match: replacements[match.group(1)], _PAGE)


def write_report_html(
    path: str | os.PathLike,
    report: dict[str, Any],
    square_hu: np.ndarray,
    mask: np.ndarray,
    *,
    max_display_pixels: int = MAX_DISPLAY_PIXELS,
) -> pathlib.Path:
  """Render the page of one prediction (see `render_report_html`) and write it to `path`."""
  path = pathlib.Path(path)
  page = render_report_html(report, square_hu, mask, max_display_pixels=max_display_pixels)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
  except OSError as error:
    raise ReportHtmlError(f"failed to write the HTML report to {path}: {error}") from error
  return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>
@@CSS@@
</style>
</head>
<body>
<header>
<h1>@@HEADING@@</h1>
@@NOTE@@
</header>
<main>
<section id="viewer">
<div class="toolbar">
<span class="windows" role="group" aria-label="window">@@BUTTONS@@</span>
<label><input type="checkbox" id="show-mask" checked> blood mask</label>
<label><input type="checkbox" id="show-boxes" checked@@BOXES_DISABLED@@> boxes@@BOXES_NOTE@@</label>
</div>
<div id="stage">
<img id="slice-image" alt="CT slice">
<img id="mask-image" alt="" hidden>
<svg id="box-layer" viewBox="0 0 @@IMAGE_SIZE@@ @@IMAGE_SIZE@@" preserveAspectRatio="none"
 style="font-size: @@BOX_FONT@@px"></svg>
</div>
<input type="range" id="slice-slider" min="0" max="@@LAST_SLICE@@" step="1" value="0"
 aria-label="slice">
<p id="caption">slice <output id="slice-index">0</output> (0 to @@LAST_SLICE@@),
<span id="slice-details"></span></p>
<p class="note">Mouse wheel over the slice, the slider, or the arrow keys change the slice.
Click the curve to jump to a slice.</p>
<noscript><p>The slice viewer needs JavaScript, the tables below do not.</p></noscript>
</section>
<section id="curve-panel">
<h2>Slice probabilities</h2>
@@CURVE@@
@@LEGEND@@
</section>
<div id="summary">
@@SUMMARY@@
</div>
</main>
<script type="application/json" id="report-data">@@DATA@@</script>
<script>
@@SCRIPT@@
</script>
</body>
</html>
"""

_CSS = """
body { margin: 0; background: #151515; color: #e8e8e8;
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { padding: 10px 18px; border-bottom: 1px solid #333; }
h1 { font-size: 20px; margin: 4px 0; }
h2 { font-size: 16px; margin: 12px 0 6px; }
main { display: flex; flex-wrap: wrap; gap: 18px; padding: 12px 18px; align-items: flex-start; }
#viewer { flex: 0 0 auto; width: min(520px, 94vw); }
#curve-panel { flex: 1 1 480px; max-width: 760px; }
#summary { flex: 1 1 100%; display: flex; flex-wrap: wrap; gap: 24px; }
#summary section { flex: 0 1 auto; max-width: 720px; }
.toolbar { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 8px; }
.windows button { background: #2a2a2a; color: #e8e8e8; border: 1px solid #555;
  padding: 3px 8px; cursor: pointer; }
.windows button[aria-pressed="true"] { background: #3d5a80; border-color: #8fb3e0; }
#stage { position: relative; width: 100%; aspect-ratio: 1 / 1; background: #000;
  overflow: hidden; }
#stage img, #stage svg { position: absolute; inset: 0; width: 100%; height: 100%; }
#mask-image { image-rendering: pixelated; opacity: 0.45; }
#box-layer rect { fill: none; stroke-width: 2; vector-effect: non-scaling-stroke; }
#box-layer text { paint-order: stroke; stroke: #000; stroke-width: 0.12em; }
#slice-slider { width: 100%; margin: 8px 0 2px; }
#curve { width: 100%; height: auto; cursor: crosshair; user-select: none; }
#curve .plot { fill: #1d1d1d; stroke: #444; }
#curve .grid { stroke: #3a3a3a; }
#curve .threshold { stroke: #ff4040; stroke-dasharray: 4 4; opacity: 0.6; }
#curve .tick { fill: #aaa; font-size: 11px; }
#curve .series { fill: none; stroke-width: 1.4; opacity: 0.9; }
#curve .series.any { stroke-width: 3.2; opacity: 1; }
#curve-marker { stroke: #fff; stroke-width: 1.5; }
.legend { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 4px; }
.swatch { display: inline-block; width: 14px; height: 3px; margin: 0 5px 3px 0;
  vertical-align: middle; }
.swatch.any { height: 6px; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #333; padding: 3px 10px 3px 0; text-align: left; }
td.positive { color: #ff6b6b; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dt { color: #aaa; }
dd { margin: 0; overflow-wrap: anywhere; }
.note { color: #aaa; font-size: 12px; }
.model-note { color: #ffcc66; margin: 4px 0; }
"""

# The script writes report strings only through textContent and attribute
# values, never as markup.
_SCRIPT = """
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var count = data.slices.length;
  var state = { slice: 0, window: data.windows[0] };
  var sliceImage = document.getElementById("slice-image");
  var maskImage = document.getElementById("mask-image");
  var boxLayer = document.getElementById("box-layer");
  var stage = document.getElementById("stage");
  var slider = document.getElementById("slice-slider");
  var indexOutput = document.getElementById("slice-index");
  var details = document.getElementById("slice-details");
  var showMask = document.getElementById("show-mask");
  var showBoxes = document.getElementById("show-boxes");
  var curve = document.getElementById("curve");
  var marker = document.getElementById("curve-marker");
  var windowButtons = document.querySelectorAll("button[data-window]");

  function format(value, digits, unit) {
    return typeof value === "number" ? value.toFixed(digits) + unit : "n/a";
  }

  function drawBoxes(boxes) {
    while (boxLayer.firstChild) {
      boxLayer.removeChild(boxLayer.firstChild);
    }
    boxes.forEach(function (entry) {
      var box = entry.box;
      if (!box || box.some(function (value) { return typeof value !== "number"; })) {
        return;
      }
      var color = data.colors[entry["class"]] || "#ffffff";
      var rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("x", box[1]);
      rect.setAttribute("y", box[0]);
      rect.setAttribute("width", Math.max(box[3] - box[1], 0));
      rect.setAttribute("height", Math.max(box[2] - box[0], 0));
      rect.setAttribute("stroke", color);
      var label = document.createElementNS(SVG_NS, "text");
      label.setAttribute("x", box[1]);
      label.setAttribute("y", box[0] > 2 ? box[0] - 0.3 : box[2] + 1);
      label.setAttribute("dominant-baseline", box[0] > 2 ? "auto" : "hanging");
      label.setAttribute("fill", color);
      label.textContent = String(entry["class"]) + " " + format(entry.score, 2, "");
      boxLayer.appendChild(rect);
      boxLayer.appendChild(label);
    });
  }

  function show(index) {
    index = Math.max(0, Math.min(count - 1, Math.round(index)));
    state.slice = index;
    var entry = data.slices[index];
    sliceImage.src = data.images[state.window][index];
    var mask = data.masks[index];
    if (mask) {
      maskImage.src = mask;
    } else {
      maskImage.removeAttribute("src");
    }
    maskImage.hidden = !(mask && showMask.checked);
    drawBoxes(entry.boxes);
    boxLayer.style.display = showBoxes.checked ? "" : "none";
    slider.value = String(index);
    indexOutput.textContent = String(index);
    details.textContent = format(entry.position_mm, 1, " mm") + ", any " +
        format(entry.any, 2, "") + ", blood " + format(entry.blood_ml, 2, " mL") + ", " +
        entry.boxes.length + (entry.boxes.length === 1 ? " box" : " boxes");
    marker.setAttribute("x1", data.curve_x[index]);
    marker.setAttribute("x2", data.curve_x[index]);
    document.body.setAttribute("data-slice", String(index));
  }

  function selectWindow(name) {
    state.window = name;
    windowButtons.forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-window") === name));
    });
    show(state.slice);
  }

  // A mouse wheel notch (about 100 px, or lines or pages) steps one slice, and
  // a touchpad steps once per 50 px of accumulated scroll.
  var wheelRest = 0;
  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    wheelRest = event.deltaMode === 0 ? wheelRest + event.deltaY : Math.sign(event.deltaY) * 50;
    if (Math.abs(wheelRest) >= 50) {
      show(state.slice + Math.sign(wheelRest));
      wheelRest = 0;
    }
  }, { passive: false });

  document.addEventListener("keydown", function (event) {
    if (event.target === slider || event.altKey || event.ctrlKey || event.metaKey) {
      return;
    }
    var steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1,
                  PageDown: 10, PageUp: -10 };
    var target;
    if (event.key in steps) {
      target = state.slice + steps[event.key];
    } else if (event.key === "Home") {
      target = 0;
    } else if (event.key === "End") {
      target = count - 1;
    } else {
      return;
    }
    event.preventDefault();
    show(target);
  });

  slider.addEventListener("input", function () { show(Number(slider.value)); });
  showMask.addEventListener("change", function () { show(state.slice); });
  showBoxes.addEventListener("change", function () { show(state.slice); });
  windowButtons.forEach(function (button) {
    button.addEventListener("click", function () {
      selectWindow(button.getAttribute("data-window"));
    });
  });

  curve.addEventListener("click", function (event) {
    var point = curve.createSVGPoint();
    point.x = event.clientX;
    point.y = event.clientY;
    var x = point.matrixTransform(curve.getScreenCTM().inverse()).x;
    var nearest = 0;
    for (var i = 1; i < count; i++) {
      if (Math.abs(data.curve_x[i] - x) < Math.abs(data.curve_x[nearest] - x)) {
        nearest = i;
      }
    }
    show(nearest);
  });

  var requested = /(?:^#|&)slice=(\\d+)/.exec(window.location.hash);
  state.slice = requested ? Number(requested[1]) : data.initial_slice;
  selectWindow(data.windows[0]);
})();
"""
