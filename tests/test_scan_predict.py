"""`uem-ich predict` with a multitask run and an aggregator run: mapping, report, files, errors."""

import dataclasses
import json
import re

import ml_collections
import nibabel
import numpy as np
import pytest
from PIL import Image

import uem_ich_jax
from uem_ich_jax import cli, clinical, ct, phantom
from uem_ich_jax.ct import CTVolume
from uem_ich_jax.infer import predict, scan_predict
from uem_ich_jax.train import aggregate, checkpoint, config_file, stages, trainer

SIZE = 64
SLICES_DATASET = "synthetic_ich/slices_predict_tiny"
SCANS_DATASET = "synthetic_ich/scans_predict_tiny"


def _volume(shape, spacing):
  """A volume with slices along z, rows along y and columns along x (LPS)."""
  affine = np.array(
      [[0, 0, spacing[2], 0], [0, spacing[1], 0, 0], [spacing[0], 0, 0, 0], [0, 0, 0, 1]],
      dtype=np.float64,
  )
  positions = np.array([[0.0, 0.0, spacing[0] * k] for k in range(shape[0])])
  return CTVolume(
      hu=np.zeros(shape, np.float32), positions=positions, affine=affine, spacing=spacing
  )


# ------------------------------------------------------------ Mapping back ---


def test_mask_to_source_inverts_cropped_input():
  # 100 x 80 pixels of 1 mm, field of view 64 mm: the square starts at (18, 8)
  # and each model pixel of a 32-pixel input covers 2 x 2 source pixels.
  volume = _volume((2, 100, 80), (5.0, 1.0, 1.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(32, 64.0))
  assert grid.starts == (18, 8)
  assert grid.pixels == (64, 64)
  assert not grid.covers_scan
  source = np.zeros((2, 100, 80), np.uint8)
  source[0, 20:30, 10:14] = 2
  source[1, 40:82, 50:72] = 5
  square = source[:, 18:82, 8:72]
  model_mask = ct.resize_mask_inplane(square, (32, 32))
  back = scan_predict.mask_to_source(model_mask, grid)
  assert back.dtype == np.uint8
  assert back.shape == source.shape
  np.testing.assert_array_equal(back, source)


def test_mask_to_source_drops_padding():
  # 40 x 40 pixels of 2 mm in a 100 mm field of view: 5 air pixels each side.
  volume = _volume((1, 40, 40), (5.0, 2.0, 2.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(25, 100.0))
  assert grid.starts == (-5, -5)
  assert grid.covers_scan
  model_mask = np.zeros((1, 25, 25), np.uint8)
  model_mask[0, 0, :] = 1  # Square rows 0-1: air padding only.
  model_mask[0, 3, 4] = 3  # Square rows 6-7, columns 8-9: source 1-2, 3-4.
  back = scan_predict.mask_to_source(model_mask, grid)
  assert back.shape == (1, 40, 40)
  assert np.count_nonzero(back) == 4
  np.testing.assert_array_equal(back[0, 1:3, 3:5], 3)


def test_boxes_to_source_scales_and_clips():
  volume = _volume((1, 100, 80), (5.0, 1.0, 1.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(32, 64.0))
  boxes = np.array([[[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 32.0, 32.0]]])
  source = scan_predict.boxes_to_source(boxes, grid)
  np.testing.assert_allclose(source[0, 0], [20.0, 12.0, 28.0, 20.0])
  np.testing.assert_allclose(source[0, 1], [18.0, 8.0, 82.0, 72.0])
  padded = scan_predict.model_grid(_volume((1, 40, 40), (5.0, 2.0, 2.0)), predict.InputGeometry(25, 100.0))
  clipped = scan_predict.boxes_to_source(np.array([0.0, 0.0, 25.0, 25.0]), padded)
  np.testing.assert_allclose(clipped, [0.0, 0.0, 40.0, 40.0])


def test_aggregator_slices_evenly_spaced():
  np.testing.assert_array_equal(scan_predict.aggregator_slices(5, 8), np.arange(5))
  used = scan_predict.aggregator_slices(12, 8)
  assert len(used) == 8
  assert used[0] == 0
  assert used[-1] == 11
  assert np.all(np.diff(used) > 0)


def test_thresholds_read_from_classification_section(tmp_path):
  config = ml_collections.ConfigDict({"data": {"test_fold": 0}})
  classes = {name: {"threshold": 0.1 * (k + 1)} for k, name in enumerate(uem_ich_jax.SLICE_LABELS)}
  path = tmp_path / "eval_step7_fold0.json"
  path.write_text(json.dumps({"classification": {"classes": classes}}))
  thresholds, source = predict.validation_thresholds(
      tmp_path, 7, config, section="classification"
  )
  assert source == str(path)
  assert thresholds["any"] == pytest.approx(0.1)
  assert thresholds["subdural"] == pytest.approx(0.6)
  # Without the section, the nested result is not found and the default applies.
  thresholds, source = predict.validation_thresholds(tmp_path, 7, config)
  assert source.startswith("default 0.5")
  assert set(thresholds.values()) == {0.5}


# ----------------------------------------------------------- Bad input ---


def _config_only_run(request, workdir, spec):
  """Write the config of `spec` (a configs/ file and variant) as a run without checkpoints."""
  config = config_file.load(str(request.config.rootpath / "configs" / spec), [])
  checkpoint.save_config(workdir, config)
  return workdir


@pytest.fixture
def config_only_runs(request, tmp_path):
  return {
      "multitask": _config_only_run(request, tmp_path / "mt", "multitask_synthetic.py:smoke"),
      "aggregator": _config_only_run(request, tmp_path / "ag", "aggregator_synthetic.py:smoke"),
      "classification": _config_only_run(
          request, tmp_path / "cls", "classification_synthetic.py:smoke"
      ),
  }


def test_missing_input_names_the_path(config_only_runs, tmp_path):
  missing = tmp_path / "no_scan_here"
  with pytest.raises(predict.PredictError, match="no_scan_here does not exist"):
    predict.predict(config_only_runs["multitask"], missing, tmp_path / "out")


def test_aggregator_flag_rejects_wrong_stages(config_only_runs, tmp_path):
  runs = config_only_runs
  scan = tmp_path / "scan.nii.gz"
  output = tmp_path / "out"
  with pytest.raises(
      predict.PredictError, match=re.escape(f"--aggregator {runs['multitask']} is a 'multitask' run")
  ):
    predict.predict(runs["multitask"], scan, output, aggregator_dir=runs["multitask"])
  with pytest.raises(
      predict.PredictError,
      match=re.escape(f"--aggregator {runs['aggregator']} needs a multitask run as --checkpoint"),
  ):
    predict.predict(runs["classification"], scan, output, aggregator_dir=runs["aggregator"])
  with pytest.raises(
      predict.PredictError, match=re.escape(f"{runs['aggregator']} is an 'aggregator' run")
  ):
    predict.predict(runs["aggregator"], scan, output)
  with pytest.raises(checkpoint.CheckpointError, match="nowhere"):
    predict.predict(runs["multitask"], scan, output, aggregator_dir=tmp_path / "nowhere")
  assert not output.exists()


def test_cli_names_the_bad_aggregator(config_only_runs, tmp_path, capsys):
  runs = config_only_runs
  rc = cli.main([
      "predict",
      f"--checkpoint={runs['classification']}",
      f"--aggregator={runs['aggregator']}",
      f"--output={tmp_path / 'out'}",
      str(tmp_path),
  ])
  assert rc == 2
  error = capsys.readouterr().err
  assert str(runs["aggregator"]) in error
  assert "needs a multitask run" in error


# ------------------------------------------------------------ Trained runs ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  directory = tmp_path_factory.mktemp("tfds")
  for layout in ("slices", "scans"):
    config = SyntheticIchConfig(
        name=f"{layout}_predict_tiny", layout=layout, num_scans=10, num_slices=4,
        image_size=SIZE, num_folds=5,
    )
    builder = SyntheticIch(config=config, data_dir=str(directory), file_format="array_record")
    builder.download_and_prepare()
  return directory


def _train(request, spec, workdir, overrides):
  path = request.config.rootpath / "configs" / spec
  two_steps = {"num_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1}
  config = config_file.load(
      f"{path}:smoke", [f"--config.{key}={value}" for key, value in (two_steps | overrides).items()]
  )
  trainer.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def runs(request, data_dir, tmp_path_factory):
  """A multitask run with detection (2 steps), and an aggregator run on its frozen encoder export."""
  root = tmp_path_factory.mktemp("runs")
  multitask_dir = _train(request, "multitask_synthetic.py", root / "multitask", {
      "data.data_dir": str(data_dir),
      "data.name": SLICES_DATASET,
      "multitask.detection": True,
      "init_from": "random",
  })
  aggregator_dir = _train(request, "aggregator_synthetic.py", root / "aggregator", {
      "data.data_dir": str(data_dir),
      "data.name": SCANS_DATASET,
      "model.image_size": SIZE,
      "init_from": str(multitask_dir / checkpoint.ENCODER_EXPORT_DIR),
  })
  return multitask_dir, aggregator_dir


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
  folder = tmp_path_factory.mktemp("phantom") / "dicom"
  scan = phantom.generate_scan(
      77, (6, 48, 48), spacing_mm=(8.0, 230 / 48, 230 / 48), subtypes=("intraparenchymal",)
  )
  phantom.write_dicom(scan, folder)
  return folder


def _strict_json(path):
  return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def _check_outputs(report, output, volume):
  """Check the report's keys, the files, and the volumes against the written mask."""
  assert report["schema_version"] == "2.0"
  assert set(report) >= {
      "input", "shape", "spacing_mm", "model", "labels", "scan", "top_slice", "slices",
      "segmentation", "detection", "aggregator", "warnings", "timings_s", "outputs",
  }
  assert set(report["timings_s"]) == set(scan_predict.STAGES) | {"total"}
  for name, seconds in report["timings_s"].items():
    assert seconds >= 0.0, name
  assert report["timings_s"]["total"] >= sum(
      report["timings_s"][name] for name in scan_predict.STAGES
  ) - 1e-6
  assert _strict_json(output / "report.json") == report
  assert sorted(path.name for path in output.iterdir()) == [
      "overview.png", "report.json", "segmentation.nii.gz"
  ]
  with Image.open(output / "overview.png") as image:
    assert image.format == "PNG"

  written = nibabel.load(output / "segmentation.nii.gz")
  assert written.get_data_dtype() == np.uint8
  mask = np.asarray(written.dataobj).transpose(2, 1, 0)
  assert mask.shape == volume.shape
  reference = ct.write_nifti(volume, output.parent / f"{output.name}_scan.nii.gz")
  np.testing.assert_allclose(written.affine, nibabel.load(reference).affine, atol=1e-4)
  np.testing.assert_allclose(ct.read_nifti(output / "segmentation.nii.gz").affine, volume.affine, atol=1e-3)

  segmentation = report["segmentation"]
  assert segmentation["voxels"] == int(np.count_nonzero(mask))
  assert sum(entry["blood_voxels"] for entry in report["slices"]) == segmentation["voxels"]
  expected = clinical.hematoma_ml(mask, volume)
  assert segmentation["volume_ml"]["any"] == pytest.approx(sum(expected.values()))
  for name in uem_ich_jax.SUBTYPES:
    assert segmentation["volume_ml"][name] == pytest.approx(expected[name])
  if segmentation["bleed_side"] is not None:
    side = segmentation["bleed_side"]
    assert side["left_ml"] + side["right_ml"] == pytest.approx(sum(expected.values()))

  assert report["detection"]["count"] == sum(len(entry["boxes"]) for entry in report["slices"])
  for entry in report["slices"]:
    for box in entry["boxes"]:
      assert box["class"] == uem_ich_jax.SUBTYPES[box["class_id"] - 1]
      assert len(box["box_model_px"]) == len(box["box_source_px"]) == 4
      assert 0.0 <= box["box_source_px"][2] <= volume.shape[1]
      assert 0.0 <= box["box_source_px"][3] <= volume.shape[2]


# The `runs` fixture trains two 2-step smoke runs. With a warm JAX cache the whole
# file took 66 s on 2 idle CPU cores, with a cold one 326 s on 2 busy cores.
@pytest.mark.slow
def test_predict_dicom_series_with_aggregator(runs, phantom_series, tmp_path):
  multitask_dir, aggregator_dir = runs
  output = tmp_path / "out"
  report = predict.predict(multitask_dir, phantom_series, output, aggregator_dir=aggregator_dir)
  _check_outputs(report, output, predict.read_scan(phantom_series))
  assert report["model"]["stage"] == "multitask"
  assert report["model"]["detection"] is True
  assert report["warnings"] == []
  aggregator = report["aggregator"]
  assert aggregator["encoder_reused"] is True
  assert aggregator["slices_used"] == list(range(6))
  assert aggregator["labels"] == list(uem_ich_jax.SLICE_LABELS)
  for entry in aggregator["scan"].values():
    assert 0.0 <= entry["probability"] <= 1.0
  # Training alone saves no evaluation, so the thresholds are the default.
  assert report["thresholds_from"].startswith("default 0.5")


def _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images):
  settings = dataclasses.replace(
      scan_predict.slice_settings(slice_config), token_features=scan_model.token_features
  )
  tokens = scan_predict.run_slice_model(slice_model, images, settings)["tokens"]
  reused = scan_predict.scan_probabilities_from_tokens(scan_model, tokens)
  direct = scan_predict.scan_probabilities_from_images(scan_model, images)
  assert reused.shape == (6,)
  np.testing.assert_allclose(reused, direct, atol=1e-5)


@pytest.mark.slow
def test_reused_tokens_match_scan_model(runs, phantom_series):
  multitask_dir, aggregator_dir = runs
  slice_model, slice_config = checkpoint.restore_model(multitask_dir)
  scan_model, scan_config = checkpoint.restore_model(aggregator_dir)
  assert scan_model.token_features == "last"
  assert scan_predict.encoder_difference(slice_model, slice_config, scan_model, scan_config) is None
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(slice_config)
  )
  _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images)


@pytest.mark.slow  # three more compiles: about 60 s with a cold JAX cache on 2 busy CPU cores
def test_reused_pyramid_tokens_match_scan_model(runs, phantom_series):
  multitask_dir, aggregator_dir = runs
  slice_model, slice_config = checkpoint.restore_model(multitask_dir)
  _, scan_config = checkpoint.restore_model(aggregator_dir)
  # A "pyramid" scan model with a fresh head around the multitask encoder.
  model_config = ml_collections.ConfigDict(scan_config.model.to_dict())
  model_config.token_features = "pyramid"
  _, params, _, extra = stages.split_model(aggregate.build_model(model_config, seed=3))
  _, encoder_params, _, encoder_extra = stages.split_model(slice_model)
  params, _ = stages.copy_encoder(
      params, stages.root_encoder_arrays(encoder_params, head_prefix="head"),
      head_prefix="head", source_name="multitask encoder",
  )
  extra, _ = stages.copy_encoder(
      extra, stages.root_encoder_arrays(encoder_extra, head_prefix="head"),
      head_prefix="head", source_name="multitask encoder",
  )
  scan_model = stages.model_from_arrays(
      lambda: aggregate.build_model(model_config, seed=3), params, extra, seed=3,
      source="pyramid test model",
  )
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(slice_config)
  )
  _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images)


@pytest.mark.slow
def test_changed_encoder_encodes_slices_again(runs, phantom_series, tmp_path):
  multitask_dir, aggregator_dir = runs
  # A copy of the aggregator run whose stem convolution differs from the multitask run's.
  manager = checkpoint.CheckpointManager(aggregator_dir, read_only=True)
  step = manager.latest_step()
  arrays = manager.restore_arrays(step)
  manager.close()
  arrays["params"]["stem_conv"]["kernel"] = arrays["params"]["stem_conv"]["kernel"] * 1.01
  changed = tmp_path / "changed"
  checkpoint.save_config(changed, checkpoint.load_config(aggregator_dir))
  manager = checkpoint.CheckpointManager(changed)
  manager.save(step, {"params": arrays["params"], "extra": arrays["extra"]})
  manager.close()

  report = predict.predict(multitask_dir, phantom_series, tmp_path / "out", aggregator_dir=changed)
  aggregator = report["aggregator"]
  assert aggregator["encoder_reused"] is False
  assert "params/stem_conv/kernel differs" in aggregator["encoder_note"]
  scan_model, _ = checkpoint.restore_model(changed)
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(checkpoint.load_config(multitask_dir))
  )
  expected = scan_predict.scan_probabilities_from_images(scan_model, images)
  for name, probability in zip(aggregator["labels"], expected):
    assert aggregator["scan"][name]["probability"] == pytest.approx(float(probability), abs=1e-6)


@pytest.mark.slow
def test_predict_nifti_subsamples_for_aggregator(runs, tmp_path):
  multitask_dir, aggregator_dir = runs
  # 11 slices: more than the aggregator's max_slices (8), and two batches of 8,
  # the second padded.
  scan = phantom.generate_scan(78, (11, 40, 40), spacing_mm=(9.0, 6.0, 6.0))
  image, _ = phantom.write_nifti(scan, tmp_path / "scan.nii.gz", tmp_path / "truth.nii.gz")
  output = tmp_path / "out"
  report = predict.predict(multitask_dir, image, output, aggregator_dir=aggregator_dir)
  volume = predict.read_scan(image)
  _check_outputs(report, output, volume)
  np.testing.assert_allclose(
      nibabel.load(output / "segmentation.nii.gz").affine, nibabel.load(image).affine, atol=1e-4
  )
  assert report["model"]["batch_size"] == scan_predict.DEFAULT_BATCH_SIZE
  assert len(report["aggregator"]["slices_used"]) == 8
  assert report["aggregator"]["slices_used"] == scan_predict.aggregator_slices(11, 8).tolist()
  assert any("max_slices 8" in warning for warning in report["warnings"])
  assert all(entry["sop_instance_uid"] is None for entry in report["slices"])


@pytest.mark.slow
def test_cli_predict_multitask(runs, phantom_series, tmp_path, capsys):
  multitask_dir, _ = runs
  output = tmp_path / "out"
  rc = cli.main(["predict", f"--checkpoint={multitask_dir}", f"--output={output}", str(phantom_series)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "any:" in printed
  assert "blood:" in printed
  report = _strict_json(output / "report.json")
  assert report["aggregator"] is None
  assert report["timings_s"]["aggregator"] == 0.0
