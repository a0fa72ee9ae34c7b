"""Robustness of every input path: one small synthetic file per hard case, and a security scan.

docs/robustness.md lists each case with its behaviour and the tests that show
it. Many of those tests are in test_ct_dicom.py and test_ct_nifti.py, and this
file adds the cases that they do not cover.
"""

import ast
import logging
import pathlib

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

import dicom_factory
from uem_ich_jax.ct import CTReadError, dicom, nifti
from uem_ich_jax.ct.dicom import list_dicom_series, read_dicom_series
from uem_ich_jax.ct.dicom_write import write_dicom_series
from uem_ich_jax.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- 12-bit wrap ----------------------------------------------------------------


def test_wrapped_12bit_read_as_stored_with_warning(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=3)
  dicom_factory.write_hu_modulo_4096(volume, tmp_path)
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  # The CT layer keeps the stored values: -1000 HU reads as 3096 HU.
  np.testing.assert_array_equal(read.hu, np.mod(volume.hu, 4096))
  (warning,) = [text for text in read.provenance.warnings if "modulo 4096" in text]
  assert warning.startswith("3 of 3 slices")
  assert "BitsStored 12, PixelRepresentation 0 and RescaleIntercept 0" in warning
  assert "cannot store air" in warning
  assert "read as stored" in warning
  assert "modulo 4096" in caplog.text


def test_wrapped_12bit_unwrapped_on_request(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3)
  assert volume.hu.min() < 0
  paths = dicom_factory.write_hu_modulo_4096(volume, tmp_path)
  read = read_dicom_series(tmp_path, unwrap_12bit=True)
  np.testing.assert_array_equal(read.hu, volume.hu)
  (warning,) = [text for text in read.provenance.warnings if "modulo 4096" in text]
  assert warning.startswith("3 of 3 slices")
  assert "The wrap was undone" in warning
  assert "read as stored" not in warning
  # The same list of files, read through read_dicom_files, gives the same HU.
  from_files = dicom.read_dicom_files(paths, unwrap_12bit=True)
  np.testing.assert_array_equal(from_files.hu, volume.hu)


def _write_unsigned_12bit_with_air(volume, folder):
  """Write `volume` as 12-bit unsigned slices with intercept -1024, which can store air."""
  paths = write_dicom_series(volume, folder)
  for path, hu in zip(paths, volume.hu):

    def edit(dataset, hu=hu):
      dicom_factory.set_stored_values(
          dataset, hu.astype(np.int64) + 1024, bits_stored=12, pixel_representation=0
      )
      dataset.RescaleIntercept = "-1024"

    dicom_factory.edit_file(path, edit)


def test_unwrap_leaves_air_capable_slices(tmp_path):
  # Slices with intercept -1024 can store air, so unwrap_12bit does not touch them.
  volume = dicom_factory.make_volume(num_slices=2)
  _write_unsigned_12bit_with_air(volume, tmp_path)
  read = read_dicom_series(tmp_path, unwrap_12bit=True)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.warnings == ()


def test_unwrapped_padding_compared_as_stored(tmp_path):
  volume = dicom_factory.make_volume(num_slices=1)
  (path,) = dicom_factory.write_hu_modulo_4096(volume, tmp_path)
  # Stored 4000 is HU -96 once unwrapped, but as PixelPaddingValue it means air.
  dataset = pydicom.dcmread(path)
  dicom_factory.set_stored_values(
      dataset, np.full(volume.hu.shape[1:], 4000), bits_stored=12, pixel_representation=0,
      garbage_high_bits=False,
  )
  words = np.frombuffer(dataset.PixelData, "<u2").copy()
  words[0] = 100
  dataset.PixelData = words.tobytes()
  dicom_factory.set_pixel_padding(dataset, 4000)
  hu = dicom.unwrapped_slice_hu(dataset, str(path))
  assert hu.flat[0] == 100.0
  assert np.all(hu.flat[1:] == -1024.0)


def test_unsigned_12bit_with_air_intercept_no_warning(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  _write_unsigned_12bit_with_air(volume, tmp_path)
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.warnings == ()


# -- Compressed pixel data ------------------------------------------------------------


def _jpeg_lossless(words: np.ndarray) -> bytes:
  """Encode 16-bit words as a JPEG lossless (process 14, predictor 1) stream.

  One Huffman table gives each difference category 0..16 a 5-bit code, so the
  stream is valid but not compact. pydicom has no encoder for this transfer
  syntax, and the test needs a file whose decoded values are known exactly.
  """
  rows, columns = words.shape
  stream = bytearray(b"\xff\xd8")  # Start of image.
  # Lossless frame: precision 16, one component, sampling 1x1.
  stream += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([16])
  stream += rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
  code_counts = [0] * 16
  code_counts[4] = 17  # 17 codes of length 5: category k has code k.
  stream += b"\xff\xc4" + (36).to_bytes(2, "big") + bytes([0]) + bytes(code_counts) + bytes(range(17))
  # Scan: one component, table 0, predictor 1 (the left neighbour), no point transform.
  stream += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0, 1, 0, 0])

  bits = []
  values = words.astype(np.int64)
  for row in range(rows):
    for column in range(columns):
      if row == 0 and column == 0:
        prediction = 1 << 15
      elif column == 0:
        prediction = values[row - 1, 0]
      else:
        prediction = values[row, column - 1]
      difference = int(values[row, column] - prediction) % (1 << 16)
      if difference == 1 << 15:
        bits.append(format(16, "05b"))  # Category 16 has no extra bits.
        continue
      if difference > 1 << 15:
        difference -= 1 << 16
      category = abs(difference).bit_length()
      bits.append(format(category, "05b"))
      if category:
        extra = difference if difference >= 0 else difference + (1 << category) - 1
        bits.append(format(extra, f"0{category}b"))
  text = "".join(bits)
  text += "1" * (-len(text) % 8)  # Pad the last byte with 1 bits.
  for start in range(0, len(text), 8):
    byte = int(text[start : start + 8], 2)
    stream.append(byte)
    if byte == 0xFF:
      stream.append(0)  # Byte stuffing.
  return bytes(stream + b"\xff\xd9")


def test_jpeg_lossless_bit_exact(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3, rows=16, columns=19)
  paths = write_dicom_series(volume, tmp_path)
  for path in paths:
    dataset = pydicom.dcmread(path)
    words = np.frombuffer(dataset.PixelData, "<u2").reshape(dataset.Rows, dataset.Columns)
    dataset.PixelData = encapsulate([_jpeg_lossless(words)])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    dataset.save_as(path, enforce_file_format=True)
  assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
  np.testing.assert_array_equal(read_dicom_series(tmp_path).hu, volume.hu)


def _pydicom_file_as_ct(name: str, folder: pathlib.Path) -> pathlib.Path:
  """Copy one of pydicom's test files into `folder`, relabelled as a CT slice with a rescale."""
  dataset = pydicom.dcmread(pydicom.data.get_testdata_file(name))
  dataset.Modality = "CT"
  dataset.RescaleSlope = "1"
  dataset.RescaleIntercept = "-1024"
  folder.mkdir()
  path = folder / name
  dataset.save_as(path, enforce_file_format=True)
  return path


@pytest.mark.parametrize("plugin", ["pylibjpeg", "pyjpegls"])
def test_jpeg_ls_bit_exact(tmp_path, monkeypatch, plugin):
  decoder = get_decoder(JPEGLSLossless)
  if plugin not in decoder.available_plugins:
    pytest.skip(f"pydicom's {plugin} plugin for JPEG-LS is not installed")
  monkeypatch.setattr(decoder, "_available", {plugin: decoder._available[plugin]})
  # No JPEG-LS encoder is a project dependency, so pydicom-data's twins stand in:
  # the same MR slice stored plain and as JPEG-LS lossless.
  plain = _pydicom_file_as_ct("MR_small.dcm", tmp_path / "plain")
  packed = _pydicom_file_as_ct("MR_small_jpeg_ls_lossless.dcm", tmp_path / "packed")
  assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == JPEGLSLossless
  expected = read_dicom_series(plain).hu
  assert np.ptp(expected) > 1000  # A real image, not a constant.
  np.testing.assert_array_equal(read_dicom_series(packed).hu, expected)


@pytest.mark.parametrize(
    "transfer_syntax, name",
    [
        (JPEGLosslessSV1, "JPEG Lossless"),
        (JPEGLSLossless, "JPEG-LS Lossless"),
        (JPEG2000Lossless, "JPEG 2000"),
        (RLELossless, "RLE Lossless"),
    ],
    ids=["jpeg_lossless", "jpeg_ls", "jpeg_2000", "rle"],
)
def test_missing_decoder_named(tmp_path, monkeypatch, transfer_syntax, name):
  (path,) = write_dicom_series(dicom_factory.make_volume(num_slices=1), tmp_path)

  def relabel(dataset):
    # The native bytes in one fragment: the reader must stop before decoding them.
    dataset.PixelData = encapsulate([dataset.PixelData])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = transfer_syntax

  dicom_factory.edit_file(path, relabel)
  monkeypatch.setattr(get_decoder(transfer_syntax), "_available", {})
  with pytest.raises(CTReadError, match=f"no decoder installed for transfer syntax {name}") as error:
    read_dicom_series(tmp_path)
  assert path.name in str(error.value)
  assert "pylibjpeg" in str(error.value)


# -- Slices: gaps, localizers, other modalities ------------------------------------------


def test_missing_slice_gap_warns(tmp_path):
  volume = dicom_factory.make_volume(num_slices=6, slice_spacing_mm=2.5)
  paths = write_dicom_series(volume, tmp_path)
  paths[3].unlink()
  read = read_dicom_series(tmp_path)
  assert read.num_slices == 5
  assert read.affine_is_approximate
  assert read.spacing[0] == pytest.approx(2.5)
  assert any(
      "slice spacing varies from 2.500 to 5.000 mm" in text for text in read.provenance.warnings
  )
  # `positions` keeps each slice's true place, the gap included.
  np.testing.assert_allclose(np.diff(read.slice_positions_mm), [2.5, 2.5, 5.0, 2.5], atol=1e-6)


def _make_localizer(dataset, index=0):
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  dataset.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # Coronal, as a scout image is.


def test_localizer_in_series_skipped(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=4)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.edit_file(paths[0], _make_localizer)
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu[1:])
  (warning,) = [text for text in read.provenance.warnings if paths[0].name in text]
  assert "localizer image (ImageType ORIGINAL\\PRIMARY\\LOCALIZER), not an axial slice" in warning
  assert paths[0].name in caplog.text


def test_localizer_series_alone_rejected(tmp_path):
  write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path, edit_dataset=_make_localizer)
  with pytest.raises(CTReadError, match="none of the 2 files .* valid CT slice") as error:
    read_dicom_series(tmp_path)
  assert "localizer image" in str(error.value)


def test_non_ct_series_beside_ct_series(tmp_path):
  head = dicom_factory.make_volume(num_slices=3, seed=1)
  head_paths = write_dicom_series(head, tmp_path / "ct", series_description="head")
  write_dicom_series(
      dicom_factory.make_volume(num_slices=2, seed=2), tmp_path / "mr",
      series_description="mr", edit_dataset=lambda dataset, index: setattr(dataset, "Modality", "MR"),
  )
  with pytest.raises(CTReadError, match="2 series found; choose one with series_uid"):
    read_dicom_series(tmp_path)
  series = {item.description: item for item in list_dicom_series(tmp_path)}
  assert series["mr"].modality == "MR"
  head_uid = str(pydicom.dcmread(head_paths[0]).SeriesInstanceUID)
  np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid=head_uid).hu, head.hu)
  with pytest.raises(CTReadError, match="modality MR is not CT"):
    read_dicom_series(tmp_path, series_uid=series["mr"].series_uid)


# -- File names -------------------------------------------------------------------------------


@pytest.mark.parametrize("preamble", [True, False], ids=["with_preamble", "raw_dataset"])
def test_extensionless_dicom_files_read(tmp_path, preamble):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  for index, path in enumerate(paths):
    if not preamble:
      dicom_factory.strip_preamble(path)
    # Names as PACS exports write them: no suffix, or a numeric one.
    path.rename(tmp_path / ("IM0000" + str(index) if index else "1.2.840.5"))
  (tmp_path / "README").write_text("exported series\n")
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.warnings == ()


# -- Size limits ---------------------------------------------------------------------------


def test_series_voxel_limit_before_pixels(tmp_path, monkeypatch):
  write_dicom_series(dicom_factory.make_volume(num_slices=3, rows=6, columns=7), tmp_path)

  def read_slice(path):
    raise AssertionError(f"pixel data of {path} read before the size check")

  monkeypatch.setattr(dicom, "_read_slice", read_slice)
  with pytest.raises(CTReadError, match="3 files of the series have 126 voxels in all, more than the 100"):
    read_dicom_series(tmp_path, max_voxels=100)
  with pytest.raises(CTReadError, match="126 voxels in all"):
    dicom.read_dicom_files(sorted(tmp_path.iterdir()), max_voxels=100)


def test_series_voxel_limit_default(tmp_path, monkeypatch):
  write_dicom_series(dicom_factory.make_volume(num_slices=3, rows=6, columns=7), tmp_path)
  assert read_dicom_series(tmp_path, max_voxels=126).num_slices == 3
  monkeypatch.setattr(dicom, "MAX_VOXELS", 125)
  with pytest.raises(CTReadError, match="more than the 125 accepted"):
    read_dicom_series(tmp_path)


def test_huge_native_slice_header_skipped(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)

  def enlarge(dataset):
    dataset.Rows = dataset.Columns = 65535

  dicom_factory.edit_file(paths[1], enlarge)
  # The series limit leaves the damaged header to the per-slice limit, which skips one file.
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu[[0, 2]])
  assert any(
      "image size 65535x65535 exceeds the limit of 16777216" in text
      for text in read.provenance.warnings
  )


def _small_nifti(path, data=None, **header_fields):
  data = np.arange(60, dtype=np.int16).reshape(3, 4, 5) * 10 - 100 if data is None else data
  image = nib.Nifti1Image(data, np.diag([-0.5, -0.5, 2.0, 1.0]))
  for key, value in header_fields.items():
    image.header[key] = value
  image.to_filename(path)
  return data


def test_nifti_max_voxels_argument(tmp_path):
  _small_nifti(tmp_path / "scan.nii")
  _small_nifti(tmp_path / "mask.nii", np.zeros((3, 4, 5), np.uint8))
  assert nifti.read_nifti(tmp_path / "scan.nii", max_voxels=60).shape == (5, 4, 3)
  with pytest.raises(CTReadError, match="scan.nii.*60 voxels, more than the 59 accepted"):
    nifti.read_nifti(tmp_path / "scan.nii", max_voxels=59)
  with pytest.raises(CTReadError, match="scan.nii.*more than the 59 accepted"):
    nifti.read_nifti_pair(tmp_path / "scan.nii", tmp_path / "mask.nii", max_voxels=59)


# -- NIfTI scaling and masks ----------------------------------------------------------------


def test_nifti_nan_slope_reads_unscaled(tmp_path, caplog):
  data = _small_nifti(tmp_path / "plain.nii", scl_slope=np.nan, scl_inter=0.0)
  read = nifti.read_nifti(tmp_path / "plain.nii")
  assert read.hu.min() == float(data.min())
  assert read.hu.max() == float(data.max())
  assert read.provenance.warnings == ()

  _small_nifti(tmp_path / "offset.nii", scl_slope=np.nan, scl_inter=5.0)
  with caplog.at_level(logging.WARNING):
    read = nifti.read_nifti(tmp_path / "offset.nii")
  assert read.hu.max() == float(data.max())  # The intercept is not applied.
  (warning,) = read.provenance.warnings
  assert "scl_slope is nan, which means no scaling, so scl_inter 5 is ignored" in warning
  assert "scl_inter 5 is ignored" in caplog.text


@pytest.mark.parametrize("intercept", [np.nan, np.inf])
def test_nifti_nan_intercept_rejected(tmp_path, intercept):
  _small_nifti(tmp_path / "scan.nii", scl_slope=2.0, scl_inter=intercept)
  with pytest.raises(CTReadError, match="scan.nii: scl_slope is 2 but scl_inter is .*not a finite"):
    nifti.read_nifti(tmp_path / "scan.nii")
  _small_nifti(tmp_path / "image.nii")
  _small_nifti(tmp_path / "mask.nii", np.zeros((3, 4, 5), np.uint8), scl_slope=1.0, scl_inter=intercept)
  with pytest.raises(CTReadError, match="mask.nii: scl_slope is 1 but scl_inter"):
    nifti.read_nifti_pair(tmp_path / "image.nii", tmp_path / "mask.nii")


def test_nifti_all_zero_mask_read(tmp_path):
  _small_nifti(tmp_path / "image.nii")
  _small_nifti(tmp_path / "mask.nii", np.zeros((3, 4, 5), np.uint8))
  volume, mask = nifti.read_nifti_pair(tmp_path / "image.nii", tmp_path / "mask.nii")
  # The CT layer does not know the case's label; dataset builders judge an empty mask.
  assert mask.shape == volume.shape
  assert not mask.any()
  assert volume.provenance.warnings == ()


# -- Security: nothing in the source tree unpickles or executes data ------------------------------

SCANNED = ("uem_ich_jax", "datasets", "experiments")
# Modules that can run code from the bytes they read.
UNSAFE_MODULES = frozenset({"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})
# Calls that run Python from a file, with the (file, function) pairs allowed to make them.
# Both run configs the user named on the command line or the repository's own configs/base.py.
CODE_LOADERS = frozenset({"exec_module", "spec_from_file_location", "run_path", "run_module"})
ALLOWED_CODE_LOADERS = frozenset({
    ("uem_ich_jax/train/config_file.py", "load_config_file"),
    ("experiments/bench_train_step.py", "_load_base_config"),
})
# Callers of config_file.load(...): they pass a config the user chose or one under configs/.
CONFIG_FILE_USERS = ("uem_ich_jax/cli.py", "uem_ich_jax/quickstart.py", "experiments/")


def _python_files():
  for folder in SCANNED:
    for path in sorted((REPO / folder).rglob("*.py")):
      yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _dotted(node) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return ""


def _keyword(call: ast.Call, name: str):
  for keyword in call.keywords:
    if keyword.arg == name:
      return keyword.value
  return None


def _is_constant(node, value) -> bool:
  return isinstance(node, ast.Constant) and node.value is value


def _unsafe_call(call: ast.Call) -> str | None:
  """Return why a call can run code from data, or None."""
  name = _dotted(call.func)
  last = name.rsplit(".", 1)[-1]
  if name in ("eval", "exec", "compile", "__import__"):
    return f"{name}() call"
  if last == "load" and name.split(".")[0] in ("np", "numpy", "jnp"):
    if _keyword(call, "allow_pickle") is not None and not _is_constant(_keyword(call, "allow_pickle"), False):
      return f"{name} with allow_pickle not False"
  if name == "torch.load" and not _is_constant(_keyword(call, "weights_only"), True):
    return "torch.load without weights_only=True"
  if name.startswith("yaml.") and last in ("load", "load_all", "unsafe_load", "full_load"):
    loader = _dotted(_keyword(call, "Loader")) if _keyword(call, "Loader") is not None else ""
    if "SafeLoader" not in loader:
      return f"{name} without Loader=yaml.SafeLoader"
  if last in ("msgpack_restore", "from_bytes", "from_state_dict") and "serialization" in name:
    return f"{name}: checkpoints are read with Orbax only"
  return None


def _violations():
  found = []
  for relative, tree in _python_files():
    functions = {}
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for child in ast.walk(node):
          functions.setdefault(id(child), node.name)
    for node in ast.walk(tree):
      where = f"{relative}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: import {alias.name}")
      elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
        found.append(f"{where}: from {node.module} import")
      elif isinstance(node, ast.Call):
        reason = _unsafe_call(node)
        if reason:
          found.append(f"{where}: {reason}")
        last = _dotted(node.func).rsplit(".", 1)[-1]
        if last in CODE_LOADERS and (relative, functions.get(id(node))) not in ALLOWED_CODE_LOADERS:
          found.append(f"{where}: {last} outside the config loader")
        if _dotted(node.func) in ("config_file.load", "config_file.load_config_file") and not (
            relative.startswith(CONFIG_FILE_USERS)
        ):
          found.append(f"{where}: a Python config loaded outside the command line and experiments")
  return found


def test_source_tree_unpickles_nothing():
  assert _violations() == []


@pytest.mark.parametrize(
    "source, reason",
    [
        ("import pickle", "import pickle"),
        ("from joblib import load", "from joblib import"),
        ("torch.load(path)", "torch.load without weights_only=True"),
        ("torch.load(path, weights_only=False)", "torch.load without weights_only=True"),
        ("np.load(path, allow_pickle=True)", "allow_pickle not False"),
        ("yaml.load(text)", "without Loader=yaml.SafeLoader"),
        ("eval(text)", "eval() call"),
        ("flax.serialization.msgpack_restore(data)", "Orbax only"),
        ("spec.loader.exec_module(module)", "exec_module outside the config loader"),
    ],
)
def test_security_scan_catches(tmp_path, monkeypatch, source, reason):
  (tmp_path / "uem_ich_jax").mkdir()
  (tmp_path / "uem_ich_jax" / "bad.py").write_text(f"def read(path, text, data, spec, module):\n  {source}\n")
  for folder in SCANNED[1:]:
    (tmp_path / folder).mkdir()
  monkeypatch.setitem(globals(), "REPO", tmp_path)
  (found,) = _violations()
  assert reason in found


def test_run_config_read_as_json_not_executed(tmp_path):
  marker = tmp_path / "executed"
  # A run folder could hold any file; a config.py there must never run.
  (tmp_path / "config.py").write_text(
      f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
      "def get_config():\n  raise SystemExit\n"
  )
  (tmp_path / "config.json").write_text('{"stage": "classification", "model": {"variant": "atto"}}\n')
  config = checkpoint.load_config(tmp_path)
  assert config.stage == "classification"
  assert config.model.variant == "atto"
  assert not marker.exists()
  (tmp_path / "config.json").write_text("import os\n")
  with pytest.raises(checkpoint.CheckpointError, match="config.json is not valid JSON"):
    checkpoint.load_config(tmp_path)
  assert not marker.exists()
