"""Tests of report.html: the page builder alone, then the page in headless Chromium.

The browser tests drive Debian's `chromium` package through the Chrome
DevTools Protocol over `--remote-debugging-pipe` (NUL-separated JSON on file
descriptors 3 and 4), so they need no downloaded browser and no network.
"""

import base64
import copy
import fcntl
import html
import io
import json
import math
import os
import re
import select
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import uem_ich_jax
from uem_ich_jax.ct.windowing import WINDOW_NAMES
from uem_ich_jax.infer import report_html

SLICES = 8
SQUARE_PIXELS = 64
IMAGE_SIZE = 32
BOX = [8.0, 10.0, 16.0, 20.0]
HOSTILE = '</script><script>window.injected = 1</script><img src=x onerror="window.injected = 2">'


# ------------------------------------------------------------ Synthetic scan ---


def _square_hu(slices=SLICES, pixels=SQUARE_PIXELS, noise_hu=0.0, seed=0):
  """Return a round head (skull ring, brain) with a blob of blood that moves from slice to slice."""
  rows, columns = np.mgrid[:pixels, :pixels]
  center = (pixels - 1) / 2
  radius = np.hypot(rows - center, columns - center)
  hu = np.full((slices, pixels, pixels), -1000.0, np.float32)
  hu[:, radius < 0.44 * pixels] = 1000.0
  hu[:, radius < 0.39 * pixels] = 35.0
  for index in range(slices):
    blob_column = 0.3 * pixels + index * 0.4 * pixels / max(slices - 1, 1)
    blob = np.hypot(rows - 0.35 * pixels, columns - blob_column) < 0.08 * pixels
    hu[index, blob] = 75.0
  rng = np.random.default_rng(seed)
  return hu + rng.normal(0.0, noise_hu, hu.shape).astype(np.float32) if noise_hu else hu


def _mask(slices=SLICES, image_size=IMAGE_SIZE):
  """Return a class-id mask with intraparenchymal blood on slices 3 to 5 and subdural on 4."""
  mask = np.zeros((slices, image_size, image_size), np.uint8)
  mask[3:6, 8:16, 10:20] = uem_ich_jax.MASK_CLASS_IDS["intraparenchymal"]
  mask[4, 20:24, 4:8] = uem_ich_jax.MASK_CLASS_IDS["subdural"]
  return mask


def _report(slices=SLICES, image_size=IMAGE_SIZE):
  """Return a report as `scan_predict` writes it: 6-class head, detection, aggregator."""
  labels = list(uem_ich_jax.SLICE_LABELS)
  entries = []
  for index in range(slices):
    peak = 0.05 + 0.9 * math.exp(-((index - 4) ** 2) / 2)
    boxes = []
    if 3 <= index <= 5:
      boxes.append({
          "class": "intraparenchymal", "class_id": 2, "score": 0.91,
          "box_model_px": list(BOX), "box_source_px": [value * 2 for value in BOX],
      })
    entries.append({
        "index": index,
        "position_mm": -20.0 + 5.0 * index,
        "sop_instance_uid": None,
        "probabilities": {name: round(peak / (1 + k), 4) for k, name in enumerate(labels)},
        "blood_voxels": 80 if 3 <= index <= 5 else 0,
        "blood_ml": 0.4 if 3 <= index <= 5 else 0.0,
        "boxes": boxes,
    })
  scan = {
      name: {"max_probability": 0.95 / (1 + k), "slice": 4, "threshold": 0.5,
             "positive": 0.95 / (1 + k) >= 0.5}
      for k, name in enumerate(labels)
  }
  classes = {"0": "background"}
  classes.update({str(uem_ich_jax.MASK_CLASS_IDS[name]): name for name in uem_ich_jax.SUBTYPES})
  return {
      "schema_version": "2.0",
      "input": "/data/scan1",
      "series_uid": "1.2.3",
      "series_description": "HEAD 5mm",
      "shape": [slices, SQUARE_PIXELS, SQUARE_PIXELS],
      "spacing_mm": [5.0, 0.45, 0.45],
      "gantry_tilt_deg": 0.0,
      "spacing_varies": False,
      "reader_warnings": [],
      "slices_as_acquired": "each slice is classified as acquired",
      "model_input": {"image_size": image_size, "field_of_view_mm": 230.0, "rule": "square"},
      "model": {"workdir": "/runs/multitask", "step": 2, "stage": "multitask",
                "name": "uem", "variant": "atto"},
      "labels": labels,
      "thresholds_from": "default 0.5",
      "scan": scan,
      "top_slice": {"index": 4, "position_mm": 0.0, "any": 0.95},
      "slices": entries,
      "segmentation": {
          "file": "segmentation.nii.gz", "classes": classes, "head": "6 classes (argmax)",
          "field_of_view_covers_scan": True, "voxels": 240,
          "volume_ml": {"any": 1.2, **{name: 0.0 for name in uem_ich_jax.SUBTYPES}},
          "bleed_side": {"side": "left", "left_ml": 1.0, "right_ml": 0.2,
                         "midline_normal_lps": [1.0, 0.0, 0.0]},
      },
      "detection": {"score_threshold": 0.05, "max_detections": 20, "box_format": "edges",
                    "count": 3},
      "aggregator": {
          "thresholds_from": "default 0.5",
          "scan": {name: {"probability": 0.7, "threshold": 0.5, "positive": True}
                   for name in labels},
      },
      "warnings": ["the scan is wider than the field of view"],
      "outputs": {"report": "report.json", "html": "report.html"},
  }


def _hostile_report():
  """Return `_report()` with a script-injecting string in every free-text field."""
  report = _report()
  report["series_description"] = HOSTILE
  report["input"] = "/data/" + HOSTILE
  report["series_uid"] = HOSTILE
  report["warnings"] = [HOSTILE]
  report["reader_warnings"] = [HOSTILE]
  report["thresholds_from"] = HOSTILE
  report["model"]["workdir"] = HOSTILE
  report["model"]["note"] = HOSTILE
  report["segmentation"]["bleed_side"]["side"] = HOSTILE
  report["slices"][4]["boxes"][0]["class"] = HOSTILE
  return report


def _data_uris(page, kind):
  return re.findall(rf"data:image/{kind};base64,([A-Za-z0-9+/=]+)", page)


def _decode(uri_payload):
  return Image.open(io.BytesIO(base64.b64decode(uri_payload)))


def _page_data(page):
  match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
  return json.loads(match.group(1))


# ------------------------------------------------------------- Page builder ---


def test_page_is_self_contained():
  page = report_html.render_report_html(_report(), _square_hu(), _mask())
  assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
  assert "<link" not in page
  assert "@import" not in page
  assert "url(" not in page
  # The only address in the page is the SVG namespace that createElementNS needs.
  assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
  assert len(_data_uris(page, "jpeg")) == SLICES * len(WINDOW_NAMES)
  assert len(_data_uris(page, "png")) == 3  # slices 3, 4 and 5 have blood


def test_slice_pictures_differ_by_window_and_slice():
  square_hu = _square_hu()
  images = report_html.slice_images(square_hu, 48)
  assert list(images) == list(WINDOW_NAMES)
  for uris in images.values():
    assert len(uris) == SLICES
    assert len(set(uris)) == SLICES
  brain = _decode(images["brain"][2].split(",", 1)[1])
  assert brain.format == "JPEG"
  assert brain.mode == "L"
  assert brain.size == (48, 48)
  assert images["brain"][2] != images["bone"][2]
  # Brain tissue (35 HU) is mid-grey in the brain window and near black in the bone window.
  bone = np.asarray(_decode(images["bone"][2].split(",", 1)[1]))
  assert 100 < np.asarray(brain)[24, 24] < 150
  assert bone[24, 24] < 110


def test_display_side_is_capped():
  assert report_html.display_pixels((40, 471, 471)) == 471
  assert report_html.display_pixels((40, 566, 560)) == report_html.MAX_DISPLAY_PIXELS
  assert report_html.display_pixels((40, 300, 320), limit=256) == 256


def test_mask_pictures_have_class_colors():
  palette = report_html.mask_palette(_report()["segmentation"]["classes"])
  uris = report_html.mask_images(_mask(), palette)
  assert [uri is not None for uri in uris] == [False, False, False, True, True, True, False, False]
  image = _decode(uris[4].split(",", 1)[1]).convert("RGBA")
  assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
  pixels = np.asarray(image)
  assert pixels[0, 0, 3] == 0  # background is transparent
  expected = report_html.LABEL_COLORS["subdural"]
  assert tuple(pixels[21, 5, :3]) == tuple(int(expected[k : k + 2], 16) for k in (1, 3, 5))
  assert pixels[21, 5, 3] == 255


def test_binary_mask_takes_any_color():
  palette = report_html.mask_palette({"0": "background", "1": "blood (any subtype)"})
  assert palette == {1: report_html.LABEL_COLORS["any"]}


def test_hostile_strings_are_escaped():
  page = report_html.render_report_html(_hostile_report(), _square_hu(), _mask())
  assert HOSTILE not in page
  assert "<script>window" not in page
  assert page.count("<script") == 2
  assert page.count("</script>") == 2
  assert "<img src=x" not in page
  assert html.escape(HOSTILE) in page
  # The script's data keeps the string intact behind JSON escapes.
  data = _page_data(page)
  assert data["slices"][4]["boxes"][0]["class"] == HOSTILE


def test_token_lookalike_left_as_text():
  report = _report()
  report["series_description"] = "@@SCRIPT@@ @@DATA@@"
  page = report_html.render_report_html(report, _square_hu(), _mask())
  assert page.count("@@SCRIPT@@ @@DATA@@") >= 2  # the title and the heading
  assert page.count('"use strict"') == 1


def test_forty_slice_page_size():
  # A 512-pixel field of view with 4 HU noise, which JPEG compresses worse than real anatomy.
  square_hu = _square_hu(slices=40, pixels=512, noise_hu=4.0)
  report = _report(slices=40, image_size=384)
  mask = np.zeros((40, 384, 384), np.uint8)
  mask[10:20, 100:160, 120:200] = 2
  page = report_html.render_report_html(report, square_hu, mask)
  megabytes = len(page.encode("utf-8")) / 1e6
  assert megabytes < 10.0, f"{megabytes:.1f} MB"
  sides = {_decode(payload).size for payload in _data_uris(page, "jpeg")[:3]}
  assert sides == {(512, 512)}


def test_curve_follows_slice_positions():
  report = _report()
  svg, xs = report_html.curve_svg(report)
  assert len(xs) == SLICES
  assert all(later > earlier for earlier, later in zip(xs, xs[1:]))
  assert "slice position (mm)" in svg
  assert svg.count('class="series') == len(report["labels"])
  assert svg.count('class="series any"') == 1

  report["slices"][2]["position_mm"] = None
  report["slices"][5]["probabilities"]["any"] = None
  svg, fallback = report_html.curve_svg(report)
  assert "slice index" in svg
  assert all(later > earlier for earlier, later in zip(fallback, fallback[1:]))
  any_path = re.search(r'class="series any"[^>]* d="([^"]*)"', svg).group(1)
  assert any_path.count("M") == 2  # the missing probability splits the line


def test_mismatched_arrays_rejected():
  with pytest.raises(report_html.ReportHtmlError, match="square_hu has shape"):
    report_html.render_report_html(_report(), _square_hu(slices=SLICES - 1), _mask())
  with pytest.raises(report_html.ReportHtmlError, match="model input has 32"):
    report_html.render_report_html(_report(), _square_hu(), _mask(image_size=16))


def test_unwritable_path_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  path = blocker / "report.html"
  with pytest.raises(report_html.ReportHtmlError, match=re.escape(str(path))):
    report_html.write_report_html(path, _report(), _square_hu(), _mask())


def test_summary_lists_report_sections():
  page = report_html.render_report_html(_report(), _square_hu(), _mask())
  assert "the scan is wider than the field of view" in page
  assert "HEAD 5mm" in page
  assert "1.2.3" in page
  assert "<td>1.20</td>" in page  # volume of any, mL
  assert "aggregator p" in page
  assert page.count('data-window="') == len(WINDOW_NAMES)


# ---------------------------------------------------------------- Browser ---


def _chromium():
  for name in ("chromium", "chromium-browser"):
    path = shutil.which(name)
    if path:
      return path
  pytest.skip("no chromium or chromium-browser binary on PATH (Debian: apt-get install chromium)")


def _browser_flags(profile_dir):
  # Root needs --no-sandbox. A fresh profile keeps runs independent.
  return ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile_dir}"]


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory):
  path = tmp_path_factory.mktemp("report_html") / "report.html"
  report_html.write_report_html(path, _hostile_report(), _square_hu(), _mask())
  return path


def test_screenshot_not_blank(hostile_page, tmp_path):
  binary = _chromium()
  screenshot = tmp_path / "page.png"
  subprocess.run(
      [binary, *_browser_flags(tmp_path / "profile"), f"--screenshot={screenshot}",
       "--window-size=1200,900", "--virtual-time-budget=3000", hostile_page.as_uri()],
      check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )
  with Image.open(screenshot) as image:
    assert image.format == "PNG"
    pixels = np.asarray(image.convert("L"), np.float32)
  assert pixels.std() > 10.0
  # The skull ring is white in the brain window, and the page background is dark.
  assert np.count_nonzero(pixels > 240) > 2000
  assert np.median(pixels) < 60


def _high_fd(fd):
  """Return a duplicate of `fd` numbered 10 or above, and close `fd`, to keep 3 and 4 free."""
  high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
  os.close(fd)
  return high


class _DevTools:
  """A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`.

  Chromium reads commands from its file descriptor 3 and writes replies and
  events to 4, each a JSON message ended by a NUL byte.
  """

  def __init__(self, binary, profile_dir):
    command_read, command_write = (_high_fd(fd) for fd in os.pipe())
    reply_read, reply_write = (_high_fd(fd) for fd in os.pipe())
    # bash, because dash redirects only file descriptors 0 to 9.
    shell = f'exec "$0" "$@" 3<&{command_read} 4>&{reply_write}'
    self.process = subprocess.Popen(
        ["bash", "-c", shell, binary, *_browser_flags(profile_dir), "--remote-debugging-pipe"],
        pass_fds=(command_read, reply_write),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(command_read)
    os.close(reply_write)
    self._commands, self._replies = command_write, reply_read
    self._buffer = b""
    self._last_id = 0

  def _read_message(self, deadline):
    while b"\0" not in self._buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise TimeoutError("Chromium sent no DevTools reply in time")
      ready, _, _ = select.select([self._replies], [], [], remaining)
      if ready:
        chunk = os.read(self._replies, 1 << 16)
        if not chunk:
          raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.process.poll()})")
        self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  def call(self, method, session_id=None, timeout_s=10.0, **params):
    self._last_id += 1
    message = {"id": self._last_id, "method": method, "params": params}
    if session_id is not None:
      message["sessionId"] = session_id
    data = json.dumps(message).encode() + b"\0"
    while data:
      data = data[os.write(self._commands, data):]
    deadline = time.monotonic() + timeout_s
    while True:
      reply = self._read_message(deadline)
      if reply.get("id") != self._last_id:
        continue  # an event
      if "error" in reply:
        raise RuntimeError(f"{method} failed: {reply['error']}")
      return reply["result"]

  def close(self):
    try:
      self.call("Browser.close", timeout_s=5.0)
    except (RuntimeError, TimeoutError, OSError):
      pass
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    os.close(self._commands)
    os.close(self._replies)


class _Tab:
  """One page of the browser, with the steps the tests take on it."""

  def __init__(self, devtools):
    self.devtools = devtools
    target = devtools.call(
        "Target.createTarget", url="about:blank", width=1200, height=900, newWindow=True
    )
    self.session = devtools.call(
        "Target.attachToTarget", targetId=target["targetId"], flatten=True
    )["sessionId"]

  def call(self, method, **params):
    return self.devtools.call(method, session_id=self.session, **params)

  def evaluate(self, expression):
    result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression} raised {result['exceptionDetails']}")
    return result["result"].get("value")

  def open(self, url):
    # about:blank in between, because a change of the hash alone does not reload.
    self.call("Page.navigate", url="about:blank")
    self.call("Page.navigate", url=url)
    deadline = time.monotonic() + 10.0
    while not self.evaluate(
        "document.readyState === 'complete' && document.body.hasAttribute('data-slice')"
    ):
      assert time.monotonic() < deadline, f"{url} did not finish loading"
      time.sleep(0.05)

  def state(self):
    return self.evaluate("""JSON.stringify({
        slice: Number(document.getElementById('slice-index').textContent),
        src: document.getElementById('slice-image').getAttribute('src'),
        mask_shown: !document.getElementById('mask-image').hidden,
        boxes: document.querySelectorAll('#box-layer rect').length,
        boxes_shown: getComputedStyle(document.getElementById('box-layer')).display !== 'none',
        marker: Number(document.getElementById('curve-marker').getAttribute('x1')),
    })""")

  def center(self, element_id):
    rect = self.evaluate(
        f"JSON.stringify(document.getElementById('{element_id}').getBoundingClientRect())"
    )
    rect = json.loads(rect)
    return rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] / 2

  def click(self, x, y):
    for kind in ("mousePressed", "mouseReleased"):
      self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

  def wheel(self, x, y, delta_y):
    self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=delta_y)

  def key(self, name, code):
    for kind in ("keyDown", "keyUp"):
      self.call(
          "Input.dispatchKeyEvent", type=kind, key=name, code=name,
          windowsVirtualKeyCode=code, nativeVirtualKeyCode=code,
      )


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
  binary = _chromium()
  devtools = _DevTools(binary, tmp_path_factory.mktemp("chromium_profile"))
  try:
    yield _Tab(devtools)
  finally:
    devtools.close()


def _wait_for(tab, condition, timeout_s=5.0):
  """Poll the page state until `condition(state)` is true or `timeout_s` passes, and return it."""
  deadline = time.monotonic() + timeout_s
  while True:
    state = json.loads(tab.state())
    if condition(state) or time.monotonic() > deadline:
      return state
    time.sleep(0.05)


def test_scroll_changes_shown_slice(tab, hostile_page):
  tab.open(hostile_page.as_uri() + "#slice=2")
  images = _page_data(hostile_page.read_text())["images"]
  before = json.loads(tab.state())
  assert before["slice"] == 2
  assert before["src"] == images["brain"][2]

  x, y = tab.center("stage")
  tab.wheel(x, y, 120)
  after = _wait_for(tab, lambda state: state["slice"] != 2)
  assert after["slice"] == 3
  assert after["src"] == images["brain"][3]
  assert after["marker"] > before["marker"]

  tab.wheel(x, y, -120)
  tab.wheel(x, y, -120)
  assert _wait_for(tab, lambda state: state["slice"] == 1)["slice"] == 1


def test_keys_and_slider_change_slice(tab, hostile_page):
  tab.open(hostile_page.as_uri() + "#slice=2")
  tab.key("ArrowDown", 40)
  tab.key("ArrowDown", 40)
  assert _wait_for(tab, lambda state: state["slice"] == 4)["slice"] == 4
  tab.key("ArrowUp", 38)
  assert _wait_for(tab, lambda state: state["slice"] == 3)["slice"] == 3
  tab.key("End", 35)
  assert _wait_for(tab, lambda state: state["slice"] == SLICES - 1)["slice"] == SLICES - 1

  # The slider has focus after a click, so its own arrow keys move it by one.
  tab.click(*tab.center("slice-slider"))
  clicked = _wait_for(tab, lambda state: state["slice"] != SLICES - 1)["slice"]
  assert 0 < clicked < SLICES - 1
  tab.key("ArrowRight", 39)
  assert _wait_for(tab, lambda state: state["slice"] == clicked + 1)["slice"] == clicked + 1


def test_curve_click_jumps_to_slice(tab, hostile_page):
  tab.open(hostile_page.as_uri() + "#slice=0")
  point = tab.evaluate("""(() => {
      const curve = document.getElementById('curve');
      const data = JSON.parse(document.getElementById('report-data').textContent);
      const point = curve.createSVGPoint();
      point.x = data.curve_x[6];
      point.y = 60;
      const screen = point.matrixTransform(curve.getScreenCTM());
      return [screen.x, screen.y];
  })()""")
  tab.click(*point)
  assert _wait_for(tab, lambda state: state["slice"] == 6)["slice"] == 6


def test_window_buttons_and_toggles(tab, hostile_page):
  tab.open(hostile_page.as_uri() + "#slice=4")
  images = _page_data(hostile_page.read_text())["images"]
  state = json.loads(tab.state())
  assert state["mask_shown"] is True
  assert state["boxes"] == 1
  assert state["boxes_shown"] is True

  tab.click(*tab.center("show-mask"))
  assert _wait_for(tab, lambda state: not state["mask_shown"])["mask_shown"] is False
  tab.click(*tab.center("show-boxes"))
  assert _wait_for(tab, lambda state: not state["boxes_shown"])["boxes_shown"] is False

  bone_button = tab.evaluate("""JSON.stringify(
      document.querySelector('button[data-window=bone]').getBoundingClientRect())""")
  rect = json.loads(bone_button)
  tab.click(rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] / 2)
  state = _wait_for(tab, lambda state: state["src"] == images["bone"][4])
  assert state["src"] == images["bone"][4]
  assert state["slice"] == 4


def test_hostile_strings_stay_text(tab, hostile_page):
  tab.open(hostile_page.as_uri())
  assert tab.evaluate("typeof window.injected") == "undefined"
  assert tab.evaluate("document.querySelector('h1').textContent").startswith(HOSTILE)
  assert tab.evaluate("document.querySelectorAll('script').length") == 2
  assert tab.evaluate("document.querySelectorAll('img').length") == 2
  assert tab.evaluate("document.querySelector('#box-layer text').textContent").startswith(HOSTILE)
