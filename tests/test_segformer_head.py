"""Tests of the SegFormer head port: parity with the upstream PyTorch module, loading and resizing."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.segformer_head import SegFormerHead
from uem_ich_jax.models.segformer_head import load_torch_state
from uem_ich_jax.models.segformer_head import resize_bilinear

FIXTURE = "upstream_segformer_head"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  """The fixture's description, state dict, NHWC inputs and NHWC expected outputs."""
  folder = fixtures_dir / FIXTURE
  if not folder.is_dir():
    pytest.skip(f"SegFormer head fixture not found at {folder}")
  meta = json.loads((folder / "fixture.json").read_text())
  with np.load(folder / "params.npz") as archive:
    state = {key: archive[key] for key in archive.files}

  def load_nhwc(name: str) -> np.ndarray:
    return np.load(folder / name).transpose(0, 2, 3, 1)

  inputs = tuple(load_nhwc(meta["inputs"][f"stage{i}"]) for i in range(4))
  expected = {key: load_nhwc(name) for key, name in meta["outputs"].items()}
  return meta, state, inputs, expected


def _head(meta) -> SegFormerHead:
  return SegFormerHead(meta["in_channels"], meta["embed_dim"], meta["num_classes"], rngs=nnx.Rngs(1))


def test_head_matches_pytorch_outputs(fixture):
  meta, state, inputs, expected = fixture
  head = _head(meta)
  load_torch_state(head, state)
  main, aux = head(tuple(jnp.asarray(x) for x in inputs), tuple(meta["target_size"]))
  assert main.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(main), expected["main"], atol=TOLERANCE, rtol=0)
  assert len(aux) == 4

  for i, output in enumerate(aux):
    np.testing.assert_allclose(np.asarray(output), expected[f"aux{i}"], atol=TOLERANCE, rtol=0)


def test_load_missing_key_raises(fixture):
  meta, state, _, _ = fixture
  head = _head(meta)
  before = np.asarray(head.fusion.pwconv.kernel[...]).copy()
  broken = dict(state)
  del broken["boundary_refine2.bn1.running_var"]
  with pytest.raises(InputError, match=r"missing keys: boundary_refine2\.bn1\.running_var"):
    load_torch_state(head, broken)
  # Nothing is written when the state dict does not fit.
  np.testing.assert_array_equal(np.asarray(head.fusion.pwconv.kernel[...]), before)


def test_load_wrong_shape_raises(fixture):
  meta, state, _, _ = fixture
  broken = dict(state)
  broken["mix_ffn.2.dwconv.weight"] = np.zeros((320, 3, 3, 1), np.float32)
  with pytest.raises(InputError, match=r"mix_ffn\.2\.dwconv\.weight has shape \(320, 3, 3, 1\), expected \(320, 1, 3, 3\)"):
    load_torch_state(_head(meta), broken)


def test_load_unexpected_key_raises(fixture):
  meta, state, _, _ = fixture
  with pytest.raises(InputError, match=r"unexpected keys: decoder\.extra"):
    load_torch_state(_head(meta), {**state, "decoder.extra": np.zeros(3, np.float32)})


def _torch_bilinear_1d(size_in: int, size_out: int) -> np.ndarray:
  """The (out, in) interpolation matrix of PyTorch bilinear with align_corners=False."""
  matrix = np.zeros((size_out, size_in))
  scale = size_in / size_out
  for o in range(size_out):
    source = max((o + 0.5) * scale - 0.5, 0.0)
    low = min(int(np.floor(source)), size_in - 1)
    high = min(low + 1, size_in - 1)
    frac = source - low
    matrix[o, low] += 1 - frac
    matrix[o, high] += frac
  return matrix


@pytest.mark.parametrize(
    "size_in, size_out",
    [
        ((2, 3), (8, 12)),
        ((4, 4), (16, 16)),
        ((5, 3), (7, 11)),
        ((8, 12), (3, 5)),
        ((7, 9), (5, 4)),
    ],
)
def test_resize_matches_pytorch_bilinear(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(1, *size_in, 2)).astype(np.float32)
  rows = _torch_bilinear_1d(size_in[0], size_out[0])
  cols = _torch_bilinear_1d(size_in[1], size_out[1])
  expected = np.einsum("oh,nhwc,pw->nopc", rows, x, cols)
  got = np.asarray(resize_bilinear(jnp.asarray(x), size_out))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_head_output_shapes():
  head = SegFormerHead([4, 8, 8, 16], 8, 3, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  features = tuple(
      jnp.asarray(rng.normal(size=(1, 8 // 2**i, 8 // 2**i, c)), jnp.float32)
      for i, c in enumerate([4, 8, 8, 16])
  )
  main, aux = head(features, (32, 32))
  assert main.shape == (1, 32, 32, 3)
  for output in aux:
    assert output.shape == (1, 32, 32, 3)
  assert bool(jnp.all(jnp.isfinite(main)))


def test_head_wrong_feature_width_raises():
  head = SegFormerHead([4, 8, 8, 16], 8, 3, rngs=nnx.Rngs(0))
  features = tuple(jnp.zeros((1, 4, 4, c)) for c in [4, 8, 9, 16])
  with pytest.raises(InputError, match="feature 2 has shape"):
    head(features, (16, 16))


def _small_features(seed: int = 0, widths=(4, 8, 8, 16), size: int = 8):
  rng = np.random.default_rng(seed)
  return tuple(
      jnp.asarray(rng.normal(size=(2, size // 2**i, size // 2**i, c)), jnp.float32)
      for i, c in enumerate(widths)
  )


def test_neck_is_the_refined_stride4_map():
  head = SegFormerHead([4, 8, 8, 16], 8, 3, rngs=nnx.Rngs(0))
  features = _small_features()
  neck = head.neck(features)
  assert neck.shape == (2, 8, 8, 8)
  main, aux, decoded_neck = head.decode(features, (32, 32))
  np.testing.assert_allclose(np.asarray(decoded_neck), np.asarray(neck), rtol=1e-6)
  called_main, called_aux = head(features, (32, 32))
  np.testing.assert_allclose(np.asarray(called_main), np.asarray(main), rtol=1e-6)
  for got, expected in zip(called_aux, aux):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


def test_classify_at_stride4_upsamples_logits():
  full = SegFormerHead([4, 8, 8, 16], 8, 3, rngs=nnx.Rngs(0))
  fast = SegFormerHead([4, 8, 8, 16], 8, 3, classify_at_stride4=True, rngs=nnx.Rngs(0))
  features = _small_features(seed=1)
  fast_main, _ = fast(features, (32, 32))
  full_main, _ = full(features, (32, 32))
  assert fast_main.shape == full_main.shape == (2, 32, 32, 3)
  # Same weights, different order of classification and upsampling. The
  # initial logits are tiny, so the comparison is relative.
  assert not np.allclose(np.asarray(fast_main), np.asarray(full_main), rtol=1e-3, atol=0)
  # At the stride-4 size itself the two orders agree.
  np.testing.assert_allclose(
      np.asarray(fast(features, (8, 8))[0]), np.asarray(full(features, (8, 8))[0]), rtol=1e-5, atol=0
  )


def test_binary_head_has_one_logit_map():
  head = SegFormerHead([4, 8, 8, 16], 8, 1, rngs=nnx.Rngs(0))
  main, aux = head(_small_features(), (16, 16))
  assert main.shape == (2, 16, 16, 1)
  assert all(output.shape == (2, 16, 16, 1) for output in aux)
