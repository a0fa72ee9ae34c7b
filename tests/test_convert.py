"""Tests of loading timm and upstream PyTorch weights, and of check_parity.py."""

import importlib.util
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from uem_ich_jax import convert
from uem_ich_jax.convert import WeightLoadError
from uem_ich_jax.errors import InputError
from uem_ich_jax.models import build_convnext_v2

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


@nnx.jit
def _forward(model, x):
  stages = model.features(x)
  logits = model.head(stages[-1]) if model.head is not None else None
  return stages, logits


def _timm_model(seed: int = 0):
  return build_convnext_v2("atto", num_classes=6, head="timm", coordinate_attention_stages=(), seed=seed)


def _upstream_model():
  return build_convnext_v2("atto", head=None)


@pytest.fixture(scope="module")
def timm_dir(fixtures_dir):
  return fixtures_dir / "timm_convnextv2_atto"


@pytest.fixture(scope="module")
def upstream_dir(fixtures_dir):
  return fixtures_dir / "upstream_encoder_atto"


@pytest.fixture(scope="module")
def timm_weights(timm_dir):
  return convert.read_state_dict(timm_dir / "params.npz")


def _weights(model) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def _input_nhwc(folder: pathlib.Path) -> jax.Array:
  return jnp.asarray(np.transpose(np.load(folder / "input.npy"), (0, 2, 3, 1)))


def _assert_stages_match(stages, folder: pathlib.Path) -> None:
  for index, stage in enumerate(stages):
    expected = np.load(folder / f"expected_stage{index}.npy")
    actual = np.transpose(np.asarray(stage), (0, 3, 1, 2))
    assert actual.shape == expected.shape
    difference = np.max(np.abs(actual - expected))
    assert difference < TOLERANCE, f"stage {index}: max abs difference {difference}"


def test_timm_fixture_parity(timm_dir):
  model = _timm_model()
  convert.load_weights(model, timm_dir / "params.npz")
  stages, logits = _forward(model, _input_nhwc(timm_dir))
  _assert_stages_match(stages, timm_dir)
  expected = np.load(timm_dir / "expected_logits.npy")
  assert np.max(np.abs(np.asarray(logits) - expected)) < TOLERANCE


def test_upstream_fixture_parity(upstream_dir):
  model = _upstream_model()
  convert.load_weights(model, upstream_dir / "params.npz")
  stages, _ = _forward(model, _input_nhwc(upstream_dir))
  _assert_stages_match(stages, upstream_dir)


def test_loaded_values_transposed(timm_weights):
  model = _timm_model()
  convert.load_state_dict(model, timm_weights)
  stem = timm_weights["stem.0.weight"]  # (out, in, kh, kw)
  np.testing.assert_array_equal(model.stem_conv.kernel[...][1, 2, 0, 3], stem[3, 0, 1, 2])
  depthwise = timm_weights["stages.0.blocks.0.conv_dw.weight"]  # (C, 1, 7, 7)
  np.testing.assert_array_equal(model.stages[0].blocks[0].conv_dw.kernel[...][4, 5, 0, 6], depthwise[6, 0, 4, 5])
  fc1 = timm_weights["stages.0.blocks.0.mlp.fc1.weight"]  # (4C, C, 1, 1)
  np.testing.assert_array_equal(model.stages[0].blocks[0].fc1.kernel[...][3, 7], fc1[7, 3, 0, 0])


def test_detect_layout(timm_weights, upstream_dir):
  assert convert.detect_layout(timm_weights) == "timm"
  assert convert.detect_layout(convert.read_state_dict(upstream_dir / "params.npz")) == "upstream"


def test_error_lists_all_problems(timm_weights):
  weights = dict(timm_weights)
  del weights["stem.0.bias"]
  del weights["stages.2.blocks.5.mlp.grn.weight"]
  weights["stages.4.blocks.0.norm.weight"] = np.zeros(8, np.float32)
  weights["stages.1.downsample.1.weight"] = np.zeros((80, 40, 3, 3), np.float32)
  weights["head.fc.bias"] = np.zeros(7, np.float32)

  with pytest.raises(WeightLoadError) as raised:
    convert.load_state_dict(_timm_model(), weights, source="edited.npz")
  message = str(raised.value)
  assert isinstance(raised.value, InputError)
  assert "edited.npz" in message
  assert "2 missing keys" in message
  assert "stem.0.bias" in message
  assert "stages.2.blocks.5.mlp.grn.weight" in message
  assert "1 unexpected keys: stages.4.blocks.0.norm.weight" in message
  assert "2 wrong shapes" in message
  assert "stages.1.downsample.1.weight has shape (80, 40, 3, 3), expected (80, 40, 2, 2)" in message
  assert "head.fc.bias has shape (7,), expected (6,)" in message


def test_error_writes_nothing(timm_weights):
  model = _timm_model()
  before = np.asarray(model.stem_conv.kernel[...]).copy()
  weights = dict(timm_weights)
  del weights["head.fc.weight"]
  with pytest.raises(WeightLoadError, match="head.fc.weight"):
    convert.load_state_dict(model, weights)
  np.testing.assert_array_equal(model.stem_conv.kernel[...], before)


def test_head_keys_need_timm_head(timm_weights):
  model = build_convnext_v2("atto", head="multitask", coordinate_attention_stages=())
  with pytest.raises(WeightLoadError, match="include_head=False"):
    convert.load_state_dict(model, timm_weights)
  convert.load_state_dict(model, timm_weights, include_head=False)
  np.testing.assert_array_equal(model.stem_norm.scale[...], timm_weights["stem.1.weight"])


def test_fcmae_weights_without_head(timm_weights):
  weights = {key: value for key, value in timm_weights.items() if not key.startswith("head.")}
  model = _timm_model()
  with pytest.raises(WeightLoadError, match="missing keys: head"):
    convert.load_state_dict(model, weights)
  convert.load_state_dict(model, weights, include_head=False)


def test_linear_weights_with_or_without_conv_axes(timm_weights):
  squeezed = {
      key: value.reshape(value.shape[:2]) if value.ndim == 4 and value.shape[2:] == (1, 1) else value
      for key, value in timm_weights.items()
  }
  assert squeezed["stages.0.blocks.0.mlp.fc1.weight"].shape == (160, 40)
  first, second = _timm_model(), _timm_model(seed=1)
  convert.load_state_dict(first, timm_weights)
  convert.load_state_dict(second, squeezed)
  for a, b in zip(_weights(first), _weights(second), strict=True):
    np.testing.assert_array_equal(a, b)


def test_upstream_ignores_num_batches_tracked(upstream_dir):
  weights = convert.read_state_dict(upstream_dir / "params.npz")
  assert "ca_blocks.ca_2.bn1.num_batches_tracked" in weights
  model = _upstream_model()
  convert.load_state_dict(model, weights)
  np.testing.assert_array_equal(
      model.coordinate_attention["2"].bn1.var[...], weights["ca_blocks.ca_2.bn1.running_var"]
  )


def test_upstream_needs_matching_attention_stages(upstream_dir):
  model = build_convnext_v2("atto", head=None, coordinate_attention_stages=(3,))
  with pytest.raises(WeightLoadError, match="unexpected keys: ca_blocks.ca_2"):
    convert.load_weights(model, upstream_dir / "params.npz")


def test_safetensors_round_trip(timm_dir, timm_weights, tmp_path):
  path = tmp_path / "atto.safetensors"
  safetensors.numpy.save_file(timm_weights, str(path))
  from_npz, from_safetensors = _timm_model(), _timm_model(seed=1)
  convert.load_weights(from_npz, timm_dir / "params.npz")
  convert.load_weights(from_safetensors, path)
  for a, b in zip(_weights(from_npz), _weights(from_safetensors), strict=True):
    np.testing.assert_array_equal(a, b)


def test_unreadable_files(tmp_path):
  with pytest.raises(WeightLoadError, match="not found"):
    convert.read_state_dict(tmp_path / "absent.npz")
  for name in ("broken.npz", "broken.safetensors"):
    (tmp_path / name).write_bytes(b"not a weight file")
    with pytest.raises(WeightLoadError, match=name):
      convert.read_state_dict(tmp_path / name)
  (tmp_path / "weights.h5").write_bytes(b"")
  with pytest.raises(WeightLoadError, match="unsupported weight file type '.h5'"):
    convert.read_state_dict(tmp_path / "weights.h5")


def test_pth_without_pytorch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  path = tmp_path / "model.pth"
  path.write_bytes(b"")
  with pytest.raises(WeightLoadError, match="needs PyTorch, which is not installed"):
    convert.read_state_dict(path)


class _FakeTensor:
  """Enough of torch.Tensor for the reader: detach, cpu, dtype, numpy."""

  def __init__(self, value: np.ndarray):
    self.value = value
    self.dtype = f"torch.{value.dtype}"

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.value


def test_pth_with_fake_torch(upstream_dir, tmp_path, monkeypatch):
  weights = convert.read_state_dict(upstream_dir / "params.npz")
  calls = []

  def fake_load(path, **kwargs):
    calls.append(kwargs)
    return {"encoder_state_dict": {key: _FakeTensor(value) for key, value in weights.items()}, "epoch": 3}

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
  path = tmp_path / "encoder.pth"
  path.write_bytes(b"")
  model = _upstream_model()
  convert.load_weights(model, path)
  assert calls == [{"map_location": "cpu", "weights_only": True}]
  np.testing.assert_array_equal(
      model.coordinate_attention["3"].conv1.bias[...], weights["ca_blocks.ca_3.conv1.bias"]
  )


def test_pth_load_failure_named(tmp_path, monkeypatch):
  def fake_load(path, **kwargs):
    raise RuntimeError("Weights only load failed")

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
  path = tmp_path / "pickled.pt"
  path.write_bytes(b"")
  with pytest.raises(WeightLoadError, match="pickled.pt.*weights_only=True.*Weights only load failed"):
    convert.read_state_dict(path)


def _check_parity_module():
  spec = importlib.util.spec_from_file_location("check_parity", REPO / "experiments" / "check_parity.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_check_parity_script(upstream_dir, capsys):
  check_parity = _check_parity_module()
  assert check_parity.main([str(upstream_dir)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines[:-1]] == ["stage0", "stage1", "stage2", "stage3"]
  assert lines[-1].startswith("max_abs_diff=")
  assert float(lines[-1].split("=")[1]) < TOLERANCE

  assert check_parity.main([str(upstream_dir), "--tolerance", "1e-12"]) == 1


def _parity_lines(check_parity, folder: pathlib.Path, capsys) -> list[str]:
  """Run check_parity.py on a folder, check its exit status and return its output lines."""
  if not folder.is_dir():
    pytest.skip(f"parity fixture not found at {folder}")
  assert check_parity.main([str(folder)]) == 0
  return capsys.readouterr().out.strip().splitlines()


def _assert_parity_output(lines: list[str], names: list[str]) -> None:
  assert [line.split()[0] for line in lines[:-1]] == names
  for line in lines[:-1]:
    assert float(line.split("=")[1]) < TOLERANCE, line
  assert lines[-1].startswith("max_abs_diff=")
  assert float(lines[-1].split("=")[1]) < TOLERANCE


def test_check_parity_segformer_head(fixtures_dir, capsys):
  check_parity = _check_parity_module()
  lines = _parity_lines(check_parity, fixtures_dir / "upstream_segformer_head", capsys)
  _assert_parity_output(lines, ["main", "aux0", "aux1", "aux2", "aux3"])


def test_check_parity_aggregator(fixtures_dir, capsys):
  check_parity = _check_parity_module()
  folder = fixtures_dir / "upstream_aggregator"
  lines = _parity_lines(check_parity, folder, capsys)
  _assert_parity_output(lines, ["pooled", "spatial"])
  assert check_parity.main([str(folder), "--tolerance", "1e-12"]) == 1


def test_check_parity_aggregator_masks_padded_slices(fixtures_dir, tmp_path, capsys):
  # Garbage at the padded slices of the expected spatial output must not count.
  folder = fixtures_dir / "upstream_aggregator"
  if not folder.is_dir():
    pytest.skip(f"parity fixture not found at {folder}")
  for path in folder.iterdir():
    (tmp_path / path.name).symlink_to(path)
  spatial = np.load(folder / "expected_spatial.npy")
  real = np.load(folder / "mask.npy") > 0
  assert not real.all(), "the fixture should contain padded slices"
  spatial[~real] = 1e3
  (tmp_path / "expected_spatial.npy").unlink()
  np.save(tmp_path / "expected_spatial.npy", spatial)
  check_parity = _check_parity_module()
  assert check_parity.main([str(tmp_path)]) == 0
  spatial[real] += 1.0
  np.save(tmp_path / "expected_spatial.npy", spatial)
  assert check_parity.main([str(tmp_path)]) == 1
  capsys.readouterr()


def test_check_parity_unsupported_kind(tmp_path, capsys):
  check_parity = _check_parity_module()
  (tmp_path / "fixture.json").write_text(json.dumps({"kind": "upstream_fcos_head"}))
  assert check_parity.main([str(tmp_path)]) == 2
  assert "not supported yet" in capsys.readouterr().err
  (tmp_path / "fixture.json").unlink()
  assert check_parity.main([str(tmp_path)]) == 2
  assert "fixture.json" in capsys.readouterr().err
  (tmp_path / "fixture.json").write_text(json.dumps({"kind": "upstream_encoder", "variant": "atto"}))
  assert check_parity.main([str(tmp_path)]) == 2
