"""Tests for the scan aggregator and scan head: PyTorch parity, positional encoding, masking,
memory options, padding buckets and state loading."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.aggregator import ScanAggregator
from uem_ich_jax.models.aggregator import ScanHead
from uem_ich_jax.models.aggregator import load_torch_state
from uem_ich_jax.models.aggregator import pad_slices
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


def _loaded_model(state: dict[str, np.ndarray], **options) -> ScanAggregator:
  model = ScanAggregator(*FIXTURE_CONFIG, rngs=nnx.Rngs(0), **options)
  load_torch_state(model, state)
  model.eval()
  return model


def _small_model() -> ScanAggregator:
  model = ScanAggregator(12, 2, 1, 16, 4, 2, rngs=nnx.Rngs(1))
  model.eval()
  return model


@pytest.mark.parametrize("attention_chunk", [0, 5])
def test_matches_pytorch_fixture(fixture, state, attention_chunk):
  model = _loaded_model(state, attention_chunk=attention_chunk)
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


# A dropout rate this small rounds the keep probability and the 1 / keep
# scale to exactly 1 in float32. Training mode then takes the written-out
# attention path (the one with dropout) while the outputs stay deterministic.
NEGLIGIBLE_DROPOUT = 1e-9
SMALL_CONFIG = (12, 2, 2, 16, 6, 4)  # feature_dim, heads, layers, FFN, max_slices, spatial_size


def _features(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _value_and_grads(model: ScanAggregator, features: jax.Array, mask: jax.Array):
  """Return a scalar of both outputs at the real slices, and its parameter gradients."""

  def loss_fn(model):
    pooled, spatial = model(features, mask)
    spatial_real = spatial * mask[:, :, None, None, None]
    return jnp.sum(pooled**2) + jnp.sum(jnp.sin(spatial_real))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  return loss, jax.tree.leaves(nnx.state(grads, nnx.Param))


def _assert_same_values_and_grads(first, second, atol: float) -> None:
  np.testing.assert_allclose(float(first[0]), float(second[0]), rtol=1e-6, atol=atol)
  assert len(first[1]) == len(second[1])
  for a, b in zip(first[1], second[1], strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, NEGLIGIBLE_DROPOUT])
def test_chunked_attention_matches_unchunked(dropout):
  features = _features((2, 5, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  results = []
  for chunk in (0, 7, 32):  # 80 tokens: off, chunks that do not divide it, chunks that do
    model = ScanAggregator(*SMALL_CONFIG, dropout=dropout, attention_chunk=chunk, rngs=nnx.Rngs(2))
    results.append(_value_and_grads(model, features, mask))
  _assert_same_values_and_grads(results[0], results[1], atol=1e-5)
  _assert_same_values_and_grads(results[0], results[2], atol=1e-5)


def test_dropout_path_matches_fused_path():
  features = _features((1, 3, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 0]], bool)
  fused = ScanAggregator(*SMALL_CONFIG, dropout=0.0, rngs=nnx.Rngs(2))
  written_out = ScanAggregator(*SMALL_CONFIG, dropout=NEGLIGIBLE_DROPOUT, rngs=nnx.Rngs(2))
  _assert_same_values_and_grads(
      _value_and_grads(fused, features, mask), _value_and_grads(written_out, features, mask), 1e-5
  )


def test_attention_dropout_active_in_training():
  features = _features((1, 3, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 0]], bool)
  model = ScanAggregator(*SMALL_CONFIG, dropout=0.5, attention_chunk=16, rngs=nnx.Rngs(2))
  first, _ = model(features, mask)
  second, _ = model(features, mask)
  assert np.max(np.abs(np.asarray(first) - np.asarray(second))) > 1e-3
  model.eval()
  third, _ = model(features, mask)
  fourth, _ = model(features, mask)
  np.testing.assert_array_equal(np.asarray(third), np.asarray(fourth))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_remat_matches_plain(dropout):
  # With dropout on, both models draw the same keys in the same order, so the
  # masks match too.
  features = _features((2, 4, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  plain = ScanAggregator(*SMALL_CONFIG, dropout=dropout, rngs=nnx.Rngs(4))
  remat = ScanAggregator(*SMALL_CONFIG, dropout=dropout, remat=True, rngs=nnx.Rngs(4))
  # The second call checks that the remat path advances the dropout streams as the plain loop does.
  for _ in range(2):
    _assert_same_values_and_grads(
        _value_and_grads(plain, features, mask), _value_and_grads(remat, features, mask), 1e-4
    )


def test_token_pool_shapes():
  model = ScanAggregator(*SMALL_CONFIG, token_pool=2, rngs=nnx.Rngs(0))
  model.eval()
  assert model.pos_encoding[...].shape == (6, 2, 2, 12)
  pooled, spatial = model(_features((2, 3, 4, 4, 12)), jnp.ones((2, 3), bool))
  assert pooled.shape == (2, 12)
  assert spatial.shape == (2, 3, 2, 2, 12)


def test_token_pool_averages_blocks():
  # Features constant within each 2 x 2 block pool to the same tokens as the
  # 2 x 2 map of block values, so both models must agree.
  pooled_model = ScanAggregator(*SMALL_CONFIG, token_pool=2, rngs=nnx.Rngs(5))
  small_model = ScanAggregator(12, 2, 2, 16, 6, 2, rngs=nnx.Rngs(5))
  pooled_model.eval()
  small_model.eval()
  blocks = _features((1, 3, 2, 2, 12))
  expanded = jnp.repeat(jnp.repeat(blocks, 2, axis=2), 2, axis=3)
  mask = jnp.asarray([[1, 1, 0]], bool)
  pooled_a, spatial_a = pooled_model(expanded, mask)
  pooled_b, spatial_b = small_model(blocks, mask)
  np.testing.assert_allclose(np.asarray(pooled_a), np.asarray(pooled_b), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(spatial_a)[0, :2], np.asarray(spatial_b)[0, :2], atol=1e-5, rtol=0)


def test_token_pool_masked_pooling():
  model = ScanAggregator(*SMALL_CONFIG, token_pool=2, rngs=nnx.Rngs(0))
  model.eval()
  features = np.asarray(_features((1, 4, 4, 4, 12)))
  mask = jnp.asarray([[1, 1, 0, 0]], bool)
  changed = features.copy()
  changed[0, 2:] = 50.0
  pooled, _ = model(jnp.asarray(features), mask)
  pooled_changed, _ = model(jnp.asarray(changed), mask)
  np.testing.assert_allclose(np.asarray(pooled_changed), np.asarray(pooled), atol=1e-5, rtol=0)


def test_token_pool_rejects_non_divisor():
  with pytest.raises(InputError, match="divisor of spatial_size 4"):
    ScanAggregator(*SMALL_CONFIG, token_pool=3, rngs=nnx.Rngs(0))


def test_token_pool_loads_upstream_weights(state):
  model = ScanAggregator(*FIXTURE_CONFIG, token_pool=2, rngs=nnx.Rngs(0))
  load_torch_state(model, state)
  np.testing.assert_array_equal(model.norm.scale[...], state["norm.weight"])


@pytest.mark.parametrize("options", [{}, {"attention_chunk": 16}, {"token_pool": 2}])
def test_padding_bucket_invariance(options):
  model = ScanAggregator(*SMALL_CONFIG, rngs=nnx.Rngs(6), **options)
  model.eval()
  features = _features((2, 3, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)
  padded_features, padded_mask = pad_slices(features, mask, 6)
  assert padded_features.shape == (2, 6, 4, 4, 12)
  np.testing.assert_array_equal(np.asarray(padded_mask[:, 3:]), False)

  pooled, spatial = model(features, mask)
  pooled_padded, spatial_padded = model(padded_features, padded_mask)
  np.testing.assert_allclose(np.asarray(pooled_padded), np.asarray(pooled), atol=1e-5, rtol=0)
  real = np.asarray(mask)
  np.testing.assert_allclose(
      np.asarray(spatial_padded)[:, :3][real], np.asarray(spatial)[real], atol=1e-5, rtol=0
  )


def test_pad_slices_rejects_longer_scan():
  with pytest.raises(InputError, match="scan has 3 slices, more than the requested 2"):
    pad_slices(jnp.zeros((1, 3, 2, 2, 12)), jnp.ones((1, 3), bool), 2)


def test_scan_without_real_slice_is_finite():
  # A padded batch element, as an evaluation batch padded to a fixed size has.
  model = ScanAggregator(*SMALL_CONFIG, rngs=nnx.Rngs(0))
  model.eval()
  features = _features((2, 3, 4, 4, 12))
  mask = jnp.asarray([[1, 1, 0], [0, 0, 0]], bool)
  pooled, _ = model(features, mask)
  alone, _ = model(features[:1], mask[:1])
  np.testing.assert_array_equal(np.asarray(pooled[1]), 0.0)
  np.testing.assert_allclose(np.asarray(pooled[0]), np.asarray(alone[0]), atol=1e-6, rtol=0)


def test_rejects_negative_attention_chunk():
  with pytest.raises(InputError, match="attention_chunk is -1"):
    ScanAggregator(*SMALL_CONFIG, attention_chunk=-1, rngs=nnx.Rngs(0))


def test_scan_head_shapes():
  head = ScanHead(12, 14, rngs=nnx.Rngs(0))
  assert head.fc1.kernel[...].shape == (12, 6)
  logits = head(_features((3, 12)))
  assert logits.shape == (3, 14)
  assert logits.dtype == jnp.float32
  wide = ScanHead(12, 6, hidden_dim=20, rngs=nnx.Rngs(0))
  assert wide.fc1.kernel[...].shape == (12, 20)


def test_scan_head_dropout_only_in_training():
  head = ScanHead(64, 6, rngs=nnx.Rngs(0))
  pooled = _features((4, 64))
  assert np.max(np.abs(np.asarray(head(pooled)) - np.asarray(head(pooled)))) > 1e-4
  head.eval()
  np.testing.assert_array_equal(np.asarray(head(pooled)), np.asarray(head(pooled)))


def test_scan_head_rejects_wrong_width():
  head = ScanHead(12, 6, rngs=nnx.Rngs(0))
  with pytest.raises(InputError, match=r"expected \(B, 12\)"):
    head(jnp.zeros((2, 10)))


def test_attention_dropout_option():
  model = ScanAggregator(*SMALL_CONFIG, dropout=0.3, attention_dropout=0.0, rngs=nnx.Rngs(0))
  assert model.layers[0].self_attn.dropout.rate == 0.0
  assert model.layers[0].dropout1.rate == 0.3
  upstream = ScanAggregator(*SMALL_CONFIG, dropout=0.3, rngs=nnx.Rngs(0))
  assert upstream.layers[0].self_attn.dropout.rate == 0.3


def _forward_jaxpr(model: ScanAggregator) -> str:
  graphdef, state = nnx.split(model)

  def forward(state, features, mask):
    return nnx.merge(graphdef, state)(features, mask)[0]

  return str(jax.make_jaxpr(forward)(state, jnp.zeros((1, 2, 4, 4, 12)), jnp.ones((1, 2), bool)))


def test_remat_and_chunks_checkpoint_layers():
  plain = ScanAggregator(*SMALL_CONFIG, rngs=nnx.Rngs(0))
  remat = ScanAggregator(*SMALL_CONFIG, remat=True, rngs=nnx.Rngs(0))
  chunked = ScanAggregator(*SMALL_CONFIG, attention_chunk=8, rngs=nnx.Rngs(0))
  for model in (plain, remat, chunked):
    model.eval()
  # jax.checkpoint shows up in a jaxpr as the `remat2` primitive (jax 0.10).
  assert "remat" not in _forward_jaxpr(plain)
  remat_jaxpr = _forward_jaxpr(remat)
  assert remat_jaxpr.count("remat") == 1  # one checkpointed step of a scan over the layers
  assert remat_jaxpr.count("scan") == 1
  chunked_jaxpr = _forward_jaxpr(chunked)
  assert chunked_jaxpr.count("remat") == SMALL_CONFIG[2]
  assert chunked_jaxpr.count("scan") == SMALL_CONFIG[2]


def _bench_module():
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_aggregator_memory.py"
  spec = importlib.util.spec_from_file_location("bench_aggregator_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_memory_bench_small(capsys):
  bench = _bench_module()
  assert bench.main(["--small", "--variants", "default,chunk"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["tokens"] == 96
  assert set(result["variants"]) == {"default", "chunk"}
  for modes in result["variants"].values():
    assert set(modes) == {"inference", "training"}
    for memory in modes.values():
      assert memory["temp_bytes"] > 0
      assert memory["argument_bytes"] > 0
  # Chunks of 16 queries hold a sixth of the 96 x 96 score matrix at a time.
  default, chunked = result["variants"]["default"], result["variants"]["chunk"]
  assert chunked["inference"]["temp_bytes"] < default["inference"]["temp_bytes"]
  assert chunked["training"]["temp_bytes"] < default["training"]["temp_bytes"]


def test_memory_bench_rejects_unknown_variant():
  bench = _bench_module()
  with pytest.raises(SystemExit):
    bench.main(["--small", "--variants", "flash"])
