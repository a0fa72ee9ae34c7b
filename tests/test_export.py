"""`uem-ich export` and `serve.load_exported`: the exported programs against the in-process model."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from uem_ich_jax import cli, phantom
from uem_ich_jax.data import pipeline
from uem_ich_jax.infer import export, predict, scan_predict, serve
from uem_ich_jax.train import checkpoint

# The trained smoke runs (`runs`, and the `data_dir` it needs) live in
# test_scan_predict.py unless they were moved to conftest.py, which pytest
# then provides without an import.
try:
  from test_scan_predict import data_dir, runs  # noqa: F401
except ImportError:
  pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- No training ---


def test_platforms_parsed_and_checked():
  assert export.parse_platforms("cpu") == ("cpu",)
  assert export.parse_platforms("cpu, CUDA,tpu,cpu") == ("cpu", "cuda", "tpu")
  assert export.parse_platforms(["cpu", "rocm"]) == ("cpu", "rocm")
  with pytest.raises(export.ExportError, match=r"invalid \(unknown: \['gpu'\]\)"):
    export.parse_platforms("cpu,gpu")
  with pytest.raises(export.ExportError, match="invalid"):
    export.parse_platforms("")


def test_even_slice_indices_match_pipeline():
  for num_slices, count in ((9, 8), (11, 8), (64, 64), (300, 64), (5, 1)):
    np.testing.assert_array_equal(
        serve.even_slice_indices(num_slices, count),
        pipeline.even_slice_indices(num_slices, count),
    )


def test_missing_manifest_names_the_folder(tmp_path):
  with pytest.raises(serve.ServeError, match=f"{tmp_path / 'manifest.json'} not found: pass the folder"):
    serve.load_exported(tmp_path)


def test_newer_schema_rejected(tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": "2.0"}))
  with pytest.raises(serve.ServeError, match="schema_version '2.0'"):
    serve.read_manifest(tmp_path)


INPUT_MANIFEST = {"input": {"shape": [None, 8, 8, 3], "range": [-1.0, 1.0]}}


def test_input_values_checked_against_range():
  images = np.zeros((2, 8, 8, 3), np.float32)
  serve.check_input_values(images, INPUT_MANIFEST)
  images[0, 0, 0] = 1.0 + serve.INPUT_RANGE_TOLERANCE / 2  # rounding is tolerated
  serve.check_input_values(images, INPUT_MANIFEST)
  cases = [
      (np.nan, r"1 NaN or infinite values; expected windowed images in \[-1, 1\]"),
      (np.inf, "1 NaN or infinite values"),
      (500.0, r"values from 0 to 500; expected windowed images in \[-1, 1\]"),
      (-1.01, r"values from -1.01 to"),
  ]
  for value, message in cases:
    bad = np.zeros((2, 8, 8, 3), np.float32)
    bad[1, 2, 3, 0] = value
    with pytest.raises(serve.ServeError, match=message):
      serve.check_input_values(bad, INPUT_MANIFEST)
  # The range comes from the manifest.
  with pytest.raises(serve.ServeError, match=r"expected windowed images in \[0, 1\]"):
    serve.check_input_values(np.full((1, 8, 8, 3), -0.5, np.float32),
                             {"input": {"range": [0.0, 1.0]}})


def test_bad_values_rejected_before_program_runs():
  model = object.__new__(serve.ExportedModel)
  model.directory = "exported"
  model.manifest = INPUT_MANIFEST
  model.batch_size = 2
  model._scan_call = None
  model._slice_call = lambda batch: pytest.fail("the program ran on invalid input")
  for value in (np.nan, 500.0):
    images = np.full((3, 8, 8, 3), value, np.float32)
    with pytest.raises(serve.ServeError, match=r'manifest\["input"\]'):
      model(images)


def test_export_rejects_other_stages(request, tmp_path):
  from uem_ich_jax.train import config_file

  config = config_file.load(
      str(request.config.rootpath / "configs" / "classification_synthetic.py:smoke"), []
  )
  checkpoint.save_config(tmp_path / "cls", config)
  with pytest.raises(export.ExportError, match="'classification' run; export needs a multitask"):
    export.export_run(tmp_path / "cls", tmp_path / "out")
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ Trained runs ---


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
  """Export `runs` with the aggregator through the CLI, and return the folder and the stdout."""
  multitask_dir, aggregator_dir = runs
  out_dir = tmp_path_factory.mktemp("exported")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = cli.main(["export", str(multitask_dir), str(out_dir), f"--aggregator={aggregator_dir}"])
  assert rc == 0
  return out_dir, stdout.getvalue()


@pytest.fixture(scope="module")
def scan_images(runs):
  """Model input of a 6-slice phantom scan: fewer slices than the aggregator's max_slices (8)."""
  scan = phantom.generate_scan(
      79, (6, 48, 48), spacing_mm=(8.0, 230 / 48, 230 / 48), subtypes=("subdural",)
  )
  geometry = predict.input_geometry(checkpoint.load_config(runs[0]))
  images, _ = predict.model_input(scan.volume, geometry)
  return images


@pytest.mark.slow
def test_cli_export_writes_manifest(runs, exported):
  multitask_dir, aggregator_dir = runs
  out_dir, stdout = exported
  assert sorted(path.name for path in out_dir.iterdir()) == [
      "manifest.json", "scan_head.stablehlo", "slice_model.stablehlo"
  ]
  assert "wrote slice_model.stablehlo, scan_head.stablehlo and manifest.json" in stdout
  manifest = json.loads((out_dir / "manifest.json").read_text())
  assert manifest["schema_version"] == serve.SCHEMA_VERSION
  assert manifest["platforms"] == ["cpu"]
  assert manifest["input"]["shape"] == [None, 64, 64, 3]
  assert manifest["input"]["dtype"] == "float32"
  assert manifest["image_size"] == 64
  assert manifest["labels"] == list(predict.LABELS)
  assert [window["name"] for window in manifest["windows"]] == ["brain", "subdural", "bone"]
  assert manifest["source"]["workdir"] == str(multitask_dir)
  assert manifest["source"]["step"] == 2
  assert set(manifest["outputs"]) == {
      "probabilities", "mask", "box_boxes", "box_scores", "box_classes", "box_valid", "tokens"
  }
  assert manifest["outputs"]["mask"] == {"shape": [None, 64, 64], "dtype": "uint8"}
  assert manifest["thresholds"]["score_threshold"] == pytest.approx(0.05)
  assert set(manifest["thresholds"]["slice"].values()) == {0.5}
  aggregator = manifest["aggregator"]
  assert aggregator["file"] == "scan_head.stablehlo"
  assert aggregator["input"] == "tokens"
  assert aggregator["workdir"] == str(aggregator_dir)
  assert aggregator["max_slices"] == 8
  # The parameters are constants in the program: 3.8M float32 parameters.
  assert (out_dir / "slice_model.stablehlo").stat().st_size > 4 * 3_000_000


@pytest.mark.slow
def test_exported_outputs_match_model(runs, exported, scan_images):
  multitask_dir, aggregator_dir = runs
  model = serve.load_exported(exported[0])
  outputs = model.predict_scan(scan_images)

  slice_model, slice_config = checkpoint.restore_model(multitask_dir)
  scan_model, _ = checkpoint.restore_model(aggregator_dir)
  settings = scan_predict.slice_settings(slice_config, scan_model.token_features)
  expected = scan_predict.run_slice_model(slice_model, scan_images, settings)
  assert set(outputs) == set(expected) | {"scan_probabilities", "scan_slices_used"}
  for name, value in expected.items():
    assert outputs[name].shape == value.shape, name
    assert outputs[name].dtype == value.dtype, name
  np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
  np.testing.assert_array_equal(outputs["mask"], expected["mask"])
  np.testing.assert_array_equal(outputs["box_valid"], expected["box_valid"])
  np.testing.assert_array_equal(outputs["box_classes"], expected["box_classes"])
  np.testing.assert_allclose(outputs["box_boxes"], expected["box_boxes"], atol=1e-3)
  np.testing.assert_allclose(outputs["box_scores"], expected["box_scores"], atol=1e-5)
  np.testing.assert_allclose(outputs["tokens"], expected["tokens"], atol=1e-4)

  # The exported head ran on 6 slices padded to max_slices 8 and masked, but
  # in-process it runs on the 6 slices alone.
  np.testing.assert_array_equal(outputs["scan_slices_used"], np.arange(6))
  scan_probabilities = scan_predict.scan_probabilities_from_tokens(scan_model, expected["tokens"])
  np.testing.assert_allclose(outputs["scan_probabilities"], scan_probabilities, atol=1e-5)


@pytest.mark.slow
def test_wrong_shape_names_expected_shape(exported):
  model = serve.load_exported(exported[0])
  with pytest.raises(serve.ServeError, match=r"shape \(2, 32, 32, 3\), expected \('N', 64, 64, 3\)"):
    model(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(serve.ServeError, match=r"shape \(64, 64, 3\)"):
    model(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(serve.ServeError, match="dtype uint8, expected float32"):
    model(np.zeros((1, 64, 64, 3), np.uint8))
  with pytest.raises(serve.ServeError, match="NaN or infinite"):
    model(np.full((1, 64, 64, 3), np.nan, np.float32))
  with pytest.raises(serve.ServeError, match="values from 500 to 500"):
    model.predict_scan(np.full((2, 64, 64, 3), 500.0, np.float32))


SERVE_WITHOUT_TRAINING_CODE = """
import sys
for name in ("flax", "optax", "orbax", "orbax.checkpoint", "uem_ich_jax.train",
             "uem_ich_jax.models", "uem_ich_jax.data", "tensorflow_datasets", "grain"):
  sys.modules[name] = None  # Any import of these now raises ImportError.
import numpy as np
from uem_ich_jax.infer import serve

folder, arrays = sys.argv[1], np.load(sys.argv[2])
model = serve.load_exported(folder)
outputs = model.predict_scan(arrays["images"])
np.testing.assert_allclose(outputs["probabilities"], arrays["probabilities"], atol=1e-5)
np.testing.assert_array_equal(outputs["mask"], arrays["mask"])
np.testing.assert_allclose(outputs["scan_probabilities"], arrays["scan_probabilities"], atol=1e-5)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("flax", "optax", "orbax"))
print("loaded", [name for name in loaded if sys.modules[name] is not None])
"""


@pytest.mark.slow
def test_serve_runs_without_training_code(exported, scan_images, tmp_path):
  model = serve.load_exported(exported[0])
  expected = model.predict_scan(scan_images)
  arrays = tmp_path / "arrays.npz"
  np.savez(
      arrays,
      images=scan_images,
      probabilities=expected["probabilities"],
      mask=expected["mask"],
      scan_probabilities=expected["scan_probabilities"],
  )
  env = dict(os.environ)
  # The same compiled programs as this process, read from the persistent cache.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  result = subprocess.run(
      [sys.executable, "-c", SERVE_WITHOUT_TRAINING_CODE, str(exported[0]), str(arrays)],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded []" in result.stdout
