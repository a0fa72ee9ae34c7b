"""Smoke test of experiments/bench_train_step.py: the JSON line, never the timings."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_train_step.py"

EXPECTED_KEYS = {
    "variant",
    "size",
    "batch",
    "images_per_s",
    "timm_images_per_s",
    "ratio",
    "inference_images_per_s",
    "timm_inference_images_per_s",
    "inference_ratio",
    "timm_unavailable",
    "device",
    "jax_version",
    "torch_version",
    "threads",
}


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_peak_flops_from_table_or_flag():
  bench = _load_script()

  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert bench.peak_flops(Device(), "bfloat16", None) == 989e12
  assert bench.peak_flops(Device(), "float32", None) is None
  assert bench.peak_flops(Device(), "float32", 60.0) == 60e12


@pytest.mark.slow  # compiling the steps took about 60 s on a 2-core CPU with a cold JAX cache
def test_bench_json_line(capsys):
  bench = _load_script()
  status = bench.main(
      ["--variant", "atto", "--size", "32", "--batch", "2", "--steps", "2", "--warmup", "1"]
  )
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])

  assert status == 0
  assert EXPECTED_KEYS <= set(result)
  assert result["variant"] == "atto"
  assert result["size"] == 32
  assert result["batch"] == 2
  assert result["images_per_s"] > 0
  assert result["inference_images_per_s"] > 0
  assert result["train_step_flops"] > 0
  assert result["achieved_flops_per_s"] > 0
  # No peak is known for a CPU, so no utilisation is made up.
  assert result["model_flops_utilisation"] is None
  if importlib.util.find_spec("torch") is None:
    assert result["ratio"] is None
    assert result["inference_ratio"] is None
    assert result["timm_images_per_s"] is None
    assert "torch" in result["timm_unavailable"]
  else:
    # With torch importable, ratio is null only when timm is not, and then a reason is given.
    assert (result["ratio"] is None) == (result["timm_unavailable"] is not None)


def test_bench_rejects_size_off_stride(capsys):
  bench = _load_script()
  with pytest.raises(SystemExit) as error:
    bench.main(["--size", "48"])
  assert error.value.code == 2
  assert "multiple of 32" in capsys.readouterr().err


SSL_SCRIPT = SCRIPT.with_name("bench_ssl_step.py")


@pytest.mark.slow  # compiles the SSL step twice, about 60 s on a 2-core CPU with a cold cache
def test_ssl_bench_json_line(capsys):
  spec = importlib.util.spec_from_file_location("bench_ssl_step", SSL_SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  status = bench.main(
      ["--size", "64", "--batch", "2", "--decoder-width", "32", "--steps", "1", "--warmup", "0"]
  )
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert status == 0
  assert result["size"] == 64
  assert result["seconds_with_glcm"] > 0
  assert result["seconds_without_glcm"] > 0
  assert result["glcm_share"] == pytest.approx(
      1 - result["seconds_without_glcm"] / result["seconds_with_glcm"]
  )


INPUT_SCRIPT = SCRIPT.with_name("bench_input.py")


def test_input_bench_json_line(capsys, tmp_path):
  spec = importlib.util.spec_from_file_location("bench_input", INPUT_SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  status = bench.main([
      "--size", "64", "--batch", "4", "--workers", "0", "--warmup", "1", "--batches", "2",
      "--scans", "5", "--slices", "4", "--data-dir", str(tmp_path),
  ])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert status == 0
  [row] = result["rows"]
  assert row["image_shape"] == [4, 64, 64, 3]
  assert row["slices_per_s"] > 0
  assert row["slices_per_cpu_s"] > 0
