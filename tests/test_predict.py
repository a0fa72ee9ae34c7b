"""`uem-ich predict`: model input rule, thresholds, report and overview on a tiny trained run."""

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import dicom_factory
import uem_ich_jax
from uem_ich_jax import cli, ct, phantom, quickstart
from uem_ich_jax.ct import CTReadError, CTVolume, uint8_to_model_input, windows_uint8
from uem_ich_jax.ct.volume import AIR_HU
from uem_ich_jax.infer import overview, predict
from uem_ich_jax.train import checkpoint, config_file, trainer

GE_SERIES = "ge_head_tilt_variable_spacing"


def _volume(hu, spacing=(5.0, 1.0, 1.0)):
  slices = hu.shape[0]
  # (slice, row, column) -> LPS with slices along z, rows along y, columns along x.
  affine = np.array(
      [[0, 0, spacing[2], 0], [0, spacing[1], 0, 0], [spacing[0], 0, 0, 0], [0, 0, 0, 1]],
      dtype=np.float64,
  )
  positions = np.array([[0.0, 0.0, spacing[0] * k] for k in range(slices)])
  return CTVolume(hu=hu.astype(np.float32), positions=positions, affine=affine, spacing=spacing)


def test_square_field_of_view_crops_centre():
  hu = np.arange(2 * 100 * 80, dtype=np.float32).reshape(2, 100, 80)
  square = predict.square_field_of_view(_volume(hu), 50.0)
  assert square.hu.shape == (2, 50, 50)
  np.testing.assert_array_equal(square.hu, hu[:, 25:75, 15:65])
  # New pixel (0, 0) lies where old pixel (25, 15) was.
  np.testing.assert_allclose(square.positions[0], [15.0, 25.0, 0.0])
  np.testing.assert_allclose(square.affine[:3, 3], [15.0, 25.0, 0.0])


def test_square_field_of_view_pads_with_air():
  hu = np.full((1, 40, 40), 30.0, dtype=np.float32)
  square = predict.square_field_of_view(_volume(hu, spacing=(5.0, 2.0, 2.0)), 100.0)
  assert square.hu.shape == (1, 50, 50)
  assert square.hu[0, 0, 0] == AIR_HU
  assert square.hu[0, 25, 25] == 30.0
  assert (square.hu == 30.0).sum() == 40 * 40
  np.testing.assert_allclose(square.positions[0], [-10.0, -10.0, 0.0])


def test_model_input_matches_the_dataset_encoding():
  # A phantom on the training grid must reach the model exactly as stored.
  size = 32
  scan = phantom.generate_scan(5, (4, size, size), spacing_mm=(30.0, 230 / size, 230 / size))
  images, square = predict.model_input(scan.volume, predict.InputGeometry(size, 230.0))
  expected = uint8_to_model_input(windows_uint8(scan.volume.hu))
  assert images.dtype == np.float32
  assert images.shape == (4, size, size, 3)
  np.testing.assert_allclose(images, expected, atol=1e-6)
  assert square.hu.shape == (4, size, size)


def test_choose_slices_keeps_top_slice():
  probs = np.zeros(100)
  probs[37] = 0.9
  chosen = overview.choose_slices(probs, 24)
  assert len(chosen) <= 24
  assert 37 in chosen
  assert chosen[0] == 0
  assert chosen[-1] == 99
  assert chosen == sorted(set(chosen))
  assert overview.choose_slices(probs[:5], 24) == [0, 1, 2, 3, 4]


def test_read_scan_names_a_missing_path(tmp_path):
  with pytest.raises(predict.PredictError, match="does not exist"):
    predict.read_scan(tmp_path / "nowhere")


def test_read_scan_with_several_series_needs_a_uid(tmp_path):
  first = phantom.generate_scan(1, (3, 16, 16), spacing_mm=(40.0, 14.0, 14.0), subtypes=())
  second = phantom.generate_scan(2, (5, 16, 16), spacing_mm=(24.0, 14.0, 14.0), subtypes=())
  phantom.write_dicom(first, tmp_path / "a")
  phantom.write_dicom(second, tmp_path / "b")
  with pytest.raises(CTReadError, match="--series"):
    predict.read_scan(tmp_path)
  uid = predict.read_scan(tmp_path / "b").provenance.series_uid
  assert predict.read_scan(tmp_path, series_uid=uid).num_slices == 5


def test_read_study_unwraps_12bit_series(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3, rows=40, columns=40, pixel_spacing=(5.0, 5.0))
  assert volume.hu.min() < 0
  dicom_factory.write_hu_modulo_4096(volume, tmp_path)
  read, _ = predict.read_study(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  (warning,) = [text for text in read.provenance.warnings if "modulo 4096" in text]
  assert "The wrap was undone" in warning
  geometry = predict.InputGeometry(32, 200.0)
  images, _ = predict.model_input(read, geometry)
  expected, _ = predict.model_input(volume, geometry)
  np.testing.assert_array_equal(images, expected)
  # Read as stored, the same files give another model input: the check above can fail.
  as_stored, _ = predict.model_input(ct.read_dicom_series(tmp_path), geometry)
  assert not np.array_equal(as_stored, expected)


# ------------------------------------------------------------- Trained run ---


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The quickstart's smoke config trained for its few steps, then evaluated."""
  root = tmp_path_factory.mktemp("predict_run")
  config = quickstart.load_config(True, [f"--config.data.data_dir={root / 'tfds'}"])
  quickstart.build_data(config, root / "tfds")
  trainer.train(config, root / "train")
  trainer.evaluate(root / "train")
  return root / "train"


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
  folder = tmp_path_factory.mktemp("phantom") / "dicom"
  scan = phantom.generate_scan(
      77, (12, 48, 48), spacing_mm=(8.0, 230 / 48, 230 / 48), subtypes=("intraparenchymal",)
  )
  phantom.write_dicom(scan, folder)
  return folder


def _check_report(report, output, num_slices):
  assert set(report) >= {
      "input", "series_uid", "shape", "spacing_mm", "gantry_tilt_deg", "reader_warnings",
      "model", "scan", "top_slice", "slices", "thresholds_from", "slices_as_acquired",
  }
  assert report["shape"][0] == num_slices
  assert len(report["slices"]) == num_slices
  assert [entry["index"] for entry in report["slices"]] == list(range(num_slices))
  for entry in report["slices"]:
    assert list(entry["probabilities"]) == list(uem_ich_jax.SLICE_LABELS)
    for value in entry["probabilities"].values():
      assert 0.0 <= value <= 1.0
  for name in uem_ich_jax.SLICE_LABELS:
    maximum = max(entry["probabilities"][name] for entry in report["slices"])
    assert report["scan"][name]["max_probability"] == pytest.approx(maximum)
    assert report["scan"][name]["positive"] == (maximum >= report["scan"][name]["threshold"])
  top = report["top_slice"]["index"]
  assert report["slices"][top]["probabilities"]["any"] == report["scan"]["any"]["max_probability"]
  # The file is strict JSON (no NaN) and equals the returned report.
  text = (output / "report.json").read_text()
  assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report")) == report
  with Image.open(output / "overview.png") as image:
    assert image.format == "PNG"
    assert image.width > 500
    assert image.height > 500


def test_predict_phantom_series(smoke_run, phantom_series, tmp_path):
  report = predict.predict(smoke_run, phantom_series, tmp_path)
  _check_report(report, tmp_path, 12)
  assert report["model"]["name"] == "tiny_cnn"
  assert report["model"]["step"] in (2, 4)
  assert report["model"]["depth"] == 2
  assert report["model"]["pool"] == "avg"
  config_bytes = (smoke_run / checkpoint.CONFIG_FILE).read_bytes()
  assert report["model"]["config_sha256"] == hashlib.sha256(config_bytes).hexdigest()
  # `uem-ich evaluate` ran, so the thresholds are the validation fold's.
  assert report["thresholds_from"].endswith(f"eval_step{report['model']['step']}_fold0.json")
  assert all(entry["sop_instance_uid"] for entry in report["slices"])
  positions = [entry["position_mm"] for entry in report["slices"]]
  assert np.allclose(np.diff(positions), 8.0)


def test_predict_real_ge_scan_through_the_cli(smoke_run, real_ct_dir, tmp_path, capsys):
  series = real_ct_dir / GE_SERIES
  output = tmp_path / "out"
  rc = cli.main(["predict", f"--checkpoint={smoke_run}", f"--output={output}", str(series)])
  assert rc == 0
  assert "any:" in capsys.readouterr().out
  report = json.loads((output / "report.json").read_text())
  _check_report(report, output, 28)
  assert report["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.1)
  assert report["spacing_varies"] is True
  assert "not corrected" in report["slices_as_acquired"]
  assert report["reader_warnings"]


def test_predict_nifti_file(smoke_run, tmp_path):
  scan = phantom.generate_scan(78, (10, 40, 40), spacing_mm=(9.0, 6.0, 6.0))
  image, _ = phantom.write_nifti(scan, tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz")
  report = predict.predict(smoke_run, image, tmp_path / "out")
  _check_report(report, tmp_path / "out", 10)
  assert all(entry["sop_instance_uid"] is None for entry in report["slices"])


def test_default_thresholds_without_an_evaluation(smoke_run):
  config = checkpoint.load_config(smoke_run)
  thresholds, source = predict.validation_thresholds(smoke_run, 999, config)
  assert thresholds == {name: 0.5 for name in uem_ich_jax.SLICE_LABELS}
  assert source.startswith("default 0.5")


def test_cli_predict_reports_a_bad_input(smoke_run, tmp_path, capsys):
  rc = cli.main(["predict", f"--checkpoint={smoke_run}", f"--output={tmp_path}", str(tmp_path)])
  assert rc == 2
  assert str(tmp_path) in capsys.readouterr().err


def test_overview_rejects_mismatched_slices():
  with pytest.raises(overview.OverviewError, match="same slices"):
    overview.render_overview(np.zeros((3, 8, 8)), np.zeros((2, 6)), {"any": 0.5})



def test_predict_rejects_a_pretraining_run(tmp_path):
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ssl_pretrain.py"
  checkpoint.save_config(tmp_path / "ssl", config_file.load(f"{path}:smoke", []))
  with pytest.raises(predict.PredictError, match="'ssl_pretrain' run; predict needs a classification"):
    predict.predict(tmp_path / "ssl", tmp_path, tmp_path / "out")


def test_read_study_nifti_named_junk(tmp_path):
  path = tmp_path / "scan.nii.gz"
  path.write_bytes(b"not gzip and not NIfTI" * 20)
  with pytest.raises(CTReadError, match="not a NIfTI file"):
    predict.read_study(path)


def test_predict_rejects_file_as_output(tmp_path):
  output = tmp_path / "afile"
  output.write_text("taken")
  with pytest.raises(predict.PredictError, match="is a file, not a folder"):
    predict.predict(tmp_path / "no_run", tmp_path, output)


def test_predict_rejects_zero_batch_size(tmp_path):
  with pytest.raises(predict.PredictError, match="positive number of slices, got 0"):
    predict.predict(tmp_path / "no_run", tmp_path, tmp_path / "out", batch_size=0)


def test_cli_rejects_negative_batch_size(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["predict", "--checkpoint=run", f"--output={tmp_path}", "--batch-size=-3", "scan"])
  assert exit_info.value.code == 2
  assert "--batch-size" in capsys.readouterr().err


def test_predict_removes_earlier_outputs(smoke_run, phantom_series, tmp_path):
  # A multitask prediction wrote here before; a classification run writes no mask.
  (tmp_path / "segmentation.nii.gz").write_bytes(b"old mask")
  (tmp_path / "report.html").write_text("old page")
  (tmp_path / "notes.txt").write_text("the user's own file")
  report = predict.predict(smoke_run, phantom_series, tmp_path)
  assert report["model"]["stage"] == "classification"
  assert not (tmp_path / "segmentation.nii.gz").exists()
  assert not (tmp_path / "report.html").exists()
  assert (tmp_path / "notes.txt").read_text() == "the user's own file"
  assert (tmp_path / predict.REPORT_FILE).is_file()


def test_overview_draws_boxes_in_cyan():
  hu = np.zeros((3, 64, 64), np.float32)
  probs = np.full((3, 6), 0.1)
  boxes = [np.zeros((0, 4)), np.array([[8.0, 16.0, 40.0, 48.0]]), np.zeros((0, 4))]
  with_boxes = np.asarray(overview.render_overview(hu, probs, {"any": 0.5}, boxes=boxes))
  without = np.asarray(overview.render_overview(hu, probs, {"any": 0.5}))
  assert np.all(with_boxes == overview.BOX, axis=-1).sum() > 0
  assert np.all(without == overview.BOX, axis=-1).sum() == 0


def test_overview_rejects_boxes_per_slice_mismatch():
  with pytest.raises(overview.OverviewError, match="one array of boxes per slice"):
    overview.render_overview(
        np.zeros((3, 8, 8)), np.zeros((3, 6)), {"any": 0.5}, boxes=[np.zeros((0, 4))]
    )


def test_probability_bar_heights_and_colours():
  bar = np.asarray(overview.probability_bar(np.array([0.25, 0.75]), 0.5, 100, overview._font(10)))
  left, right = bar[:, :50], bar[:, 50:]
  # Grey bar of a quarter of the height on the left, red of three quarters on the right.
  left_rows = np.flatnonzero(np.all(left == overview.BAR, axis=-1).any(axis=1))
  right_rows = np.flatnonzero(np.all(right == overview.HIGHLIGHT, axis=-1).any(axis=1))
  assert np.all(left == overview.HIGHLIGHT, axis=-1).sum() == 0
  assert abs(len(left_rows) - 0.25 * overview.BAR_HEIGHT) <= 2
  assert abs(len(right_rows) - 0.75 * overview.BAR_HEIGHT) <= 2
