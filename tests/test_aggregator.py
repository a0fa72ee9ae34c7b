"""Tests for the scan aggregator: PyTorch parity, positional encoding, masking, state loading."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.aggregator import ScanAggregator
from uem_ich_jax.models.aggregator import load_torch_state
from uem_ich_jax.models.aggregator import positional_encoding

# The fixture's configuration: feature_dim, num_heads, num_layers, dim_feedforward, max_slices, spatial_size.
FIXTURE_CONFIG = (96, 4, 2, 128, 8, 2)


@pytest.fixture(scope="module")
def fixture(fixtures_dir: pathlib.Path) -> pathlib.Path:
  path = fixtures_dir / "upstream_aggregator"
  if not (path / "params.npz").is_file():
    pytest.skip(f"aggregator parity fixture not found at {path}")
  return path


@pytest.fixture(scope="module")
def state(fixture: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(fixture / "params.npz") as archive:
    return dict(archive)


def _loaded_model(state: dict[str, np.ndarray]) -> ScanAggregator:
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  load_torch_state(model, state)
  model.eval()
  return model


def _small_model() -> ScanAggregator:
  model = ScanAggregator(12, 2, 1, 16, 4, 2, rngs=nnx.Rngs(1))
  model.eval()
  return model


def test_matches_pytorch_fixture(fixture, state):
  model = _loaded_model(state)
  features = np.load(fixture / "input.npy").transpose(0, 1, 3, 4, 2)  # to (B, S, h, w, C)
  real = np.load(fixture / "mask.npy") > 0
  expected_pooled = np.load(fixture / "expected_pooled.npy")
  expected_spatial = np.load(fixture / "expected_spatial.npy").transpose(0, 1, 3, 4, 2)

  pooled, spatial = model(jnp.asarray(features), jnp.asarray(real))

  assert not real.all(), "the fixture should contain padded slices"
  np.testing.assert_allclose(np.asarray(pooled), expected_pooled, atol=1e-5, rtol=0)
  # Padded slices' spatial outputs carry no meaning, so only real slices are compared.
  np.testing.assert_allclose(np.asarray(spatial)[real], expected_spatial[real], atol=1e-5, rtol=0)


def test_positional_encoding_matches_buffer(state):
  stored = state["pos_encoding.pe"]
  computed = positional_encoding(*stored.shape)
  assert computed.shape == stored.shape
  np.testing.assert_allclose(computed, stored, atol=1e-6, rtol=0)


def test_positional_encoding_terms():
  encoding = positional_encoding(3, 2, 2, 12)
  omega_1 = 10000.0 ** (-6.0 / 12)
  # Slice 2, row 1, column 0 at frequency index 1 (channels 6 to 11).
  expected = [np.sin(2 * omega_1), np.cos(2 * omega_1), np.sin(omega_1), np.cos(omega_1), 0.0, 1.0]
  np.testing.assert_allclose(encoding[2, 1, 0, 6:12], expected, atol=1e-6)


def test_positional_encoding_rejects_bad_dim():
  with pytest.raises(InputError, match="multiple of 6"):
    positional_encoding(4, 2, 2, 10)


def test_padded_slices_ignored():
  model = _small_model()
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 4, 2, 2, 12)).astype(np.float32)
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  changed = features.copy()
  changed[~mask] = rng.normal(size=changed[~mask].shape) * 100.0

  pooled, spatial = model(jnp.asarray(features), jnp.asarray(mask))
  pooled_changed, spatial_changed = model(jnp.asarray(changed), jnp.asarray(mask))

  assert np.all(np.isfinite(np.asarray(pooled)))
  np.testing.assert_allclose(np.asarray(pooled_changed), np.asarray(pooled), atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      np.asarray(spatial_changed)[mask], np.asarray(spatial)[mask], atol=1e-5, rtol=0
  )


def test_real_slices_change_pooled():
  model = _small_model()
  rng = np.random.default_rng(0)
  features = rng.normal(size=(1, 3, 2, 2, 12)).astype(np.float32)
  mask = jnp.asarray([[True, True, False]])
  changed = features.copy()
  # A random change, because a shift shared by all channels of a token is removed by the LayerNorms.
  changed[0, 1] += rng.normal(size=changed[0, 1].shape).astype(np.float32)

  pooled, _ = model(jnp.asarray(features), mask)
  pooled_changed, _ = model(jnp.asarray(changed), mask)

  assert np.max(np.abs(np.asarray(pooled_changed) - np.asarray(pooled))) > 1e-3


def test_load_rejects_missing_key(state):
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  incomplete = dict(state)
  del incomplete["transformer.layers.1.linear2.weight"]
  with pytest.raises(InputError, match=r"missing keys: transformer\.layers\.1\.linear2\.weight"):
    load_torch_state(model, incomplete)


def test_load_rejects_unexpected_key(state):
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(InputError, match=r"unexpected keys: head\.weight"):
    load_torch_state(model, {**state, "head.weight": np.zeros((3, 96), np.float32)})


def test_load_rejects_wrong_shape(state):
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  bad = {**state, "norm.weight": np.zeros((95,), np.float32)}
  with pytest.raises(InputError, match=r"norm\.weight has shape \(95,\), expected \(96,\)"):
    load_torch_state(model, bad)


def test_load_rejects_wrong_positional_buffer(state):
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  bad = {**state, "pos_encoding.pe": state["pos_encoding.pe"] + 0.1}
  with pytest.raises(InputError, match="differs from the computed encoding"):
    load_torch_state(model, bad)


def test_load_writes_nothing_on_error(state):
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0))
  before = np.asarray(model.norm.scale[...]).copy()
  incomplete = dict(state)
  del incomplete["norm.bias"]
  with pytest.raises(InputError):
    load_torch_state(model, incomplete)
  np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), before)


def test_call_rejects_too_many_slices():
  model = _small_model()
  with pytest.raises(InputError, match="exceed max_slices 4"):
    model(jnp.zeros((1, 5, 2, 2, 12)), jnp.ones((1, 5), bool))


def test_call_rejects_wrong_map_shape():
  model = _small_model()
  with pytest.raises(InputError, match="expected"):
    model(jnp.zeros((1, 2, 3, 3, 12)), jnp.ones((1, 2), bool))


def test_rejects_indivisible_head_count():
  with pytest.raises(InputError, match="not divisible by num_heads 5"):
    ScanAggregator(12, 5, 1, 16, 4, 2, rngs=nnx.Rngs(0))
