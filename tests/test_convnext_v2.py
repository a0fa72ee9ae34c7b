"""Tests of the ConvNeXt-V2 encoder, its layers and the classification heads."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import ClassificationHead
from uem_ich_jax.models import ConvNeXtV2Config
from uem_ich_jax.models import build_convnext_v2
from uem_ich_jax.models import layers
from uem_ich_jax.models import parameter_count

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64


def _image(batch: int = 2, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, SIZE, SIZE, 3), jnp.float32)


@nnx.jit
def _logits(model, x):
  return model(x)


@nnx.jit
def _features(model, x):
  return model.features(x)


@nnx.jit
def _features_and_logits(model, x):
  stages = model.features(x)
  return stages, model.head(stages[-1])


@pytest.fixture(scope="module")
def atto():
  return build_convnext_v2("atto", drop_path_rate=0.5)


# Millions of parameters of the published ImageNet-1k classifiers (timm head,
# 1000 classes), to the precision the ConvNeXt-V2 paper prints them.
PUBLISHED_MILLIONS = {
    "atto": 3.7,
    "femto": 5.2,
    "pico": 9.1,
    "nano": 15.6,
    "tiny": 28.6,
    "base": 89,
    "large": 198,
    "huge": 660,
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_MILLIONS))
def test_parameter_count_matches_paper(variant):
  published = PUBLISHED_MILLIONS[variant]
  millions = parameter_count(variant, head="timm", num_classes=1000, coordinate_attention_stages=()) / 1e6
  half_unit = 0.05 if isinstance(published, float) else 0.5
  assert abs(millions - published) <= half_unit, f"{variant}: {millions:.3f}M"


def test_parameter_count_includes_attention():
  plain = parameter_count("atto", head=None, coordinate_attention_stages=())
  with_attention = parameter_count("atto", head=None)
  # ca_2: 160->8->160 twice; ca_3: 320->10->320 twice; BatchNorm scale and bias.
  expected = (160 * 8 + 8 + 2 * (8 * 160 + 160) + 2 * 8) + (320 * 10 + 10 + 2 * (10 * 320 + 320) + 2 * 10)
  assert with_attention - plain == expected


def test_features_shapes_at_strides(atto):
  stages = _features(atto, _image())
  assert [tuple(stage.shape) for stage in stages] == [
      (2, 16, 16, 40),
      (2, 8, 8, 80),
      (2, 4, 4, 160),
      (2, 2, 2, 320),
  ]


def test_logits_default_shape_and_dtype(atto):
  logits = _logits(atto, _image())
  assert logits.shape == (2, 6)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(1, 48, 64, 3), (1, 64, 70, 3), (1, 0, 64, 3)])
def test_input_size_not_multiple_of_32(atto, shape):
  with pytest.raises(InputError, match="multiples of 32"):
    atto.features(jnp.zeros(shape))


def test_input_wrong_channels_and_rank(atto):
  with pytest.raises(InputError, match="3 input channels"):
    atto.features(jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(InputError, match="rank 4"):
    atto.features(jnp.zeros((64, 64, 3)))


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="variant"):
    ConvNeXtV2Config(variant="giant")
  with pytest.raises(ValueError, match="placement"):
    ConvNeXtV2Config(coordinate_attention_placement="before")
  with pytest.raises(ValueError, match="stage indices"):
    ConvNeXtV2Config(coordinate_attention_stages=(4,))
  with pytest.raises(ValueError, match="drop_path_rate"):
    ConvNeXtV2Config(drop_path_rate=1.0)


def test_eval_mode_is_deterministic(atto):
  atto.eval()
  x = _image()
  np.testing.assert_array_equal(_logits(atto, x), _logits(atto, x))


def test_drop_path_only_in_training(atto):
  x = _image()
  atto.eval()
  reference = _logits(atto, x)
  # Training mode also updates the attention BatchNorm statistics: restore them.
  saved = nnx.clone(nnx.state(atto))
  atto.train()
  try:
    first = _logits(atto, x)
    second = _logits(atto, x)
  finally:
    atto.eval()
    nnx.update(atto, saved)
  # With rates up to 0.5 over 12 blocks, two draws in a row that drop nothing
  # are practically impossible.
  assert not np.allclose(first, reference)
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(_logits(atto, x), reference)


def test_drop_path_rates_grow_linearly(atto):
  rates = [block.drop_path.rate for stage in atto.stages for block in stage.blocks]
  np.testing.assert_allclose(rates, np.linspace(0.0, 0.5, 12))


def test_drop_path_is_per_sample():
  dropout = layers.drop_path(0.5, rngs=nnx.Rngs(3))
  dropout.train()
  x = jnp.ones((64, 4, 4, 8))
  y = np.asarray(dropout(x))
  per_sample = y.reshape(64, -1)
  # Each sample is either dropped entirely or kept and scaled by 1 / keep.
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
  assert 0 < np.count_nonzero(per_sample[:, 0]) < 64


def _grn_timm(x, gamma, beta):
  """GRN as timm computes it (channels last), in float64."""
  norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(1, 2), keepdims=True))
  ratio = norm / (norm.mean(axis=-1, keepdims=True) + 1e-6)
  return gamma * (x * ratio) + beta + x


@pytest.fixture(params=["native", "conv"])
def grn_sum(request, monkeypatch):
  """Run GRN's sum of squares by the C++ kernel ("native") or by jnp.sum ("conv")."""
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, request.param)
  return request.param


def test_grn_matches_timm_formula(grn_sum):
  grn = layers.GRN(16)
  rng = np.random.default_rng(0)
  gamma = rng.normal(size=16).astype(np.float32)
  beta = rng.normal(size=16).astype(np.float32)
  grn.gamma.set_value(jnp.asarray(gamma))
  grn.beta.set_value(jnp.asarray(beta))
  x = rng.normal(size=(2, 5, 5, 16)).astype(np.float32)
  x[0, :, :, 3] = 0.0
  np.testing.assert_allclose(grn(jnp.asarray(x)), _grn_timm(x, gamma, beta), rtol=1e-5, atol=1e-5)


def test_grn_zero_channel_gradient_finite(grn_sum):
  grn = layers.GRN(8)
  grn.gamma.set_value(jnp.ones(8))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)).at[:, :, :, 2].set(0.0).at[1].set(0.0)

  def loss(module, x):
    return jnp.sum(module(x) ** 2)

  grads, input_grad = nnx.grad(loss, argnums=(0, 1))(grn, x)
  assert np.all(np.isfinite(input_grad))
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))


def test_native_sum_of_squares_matches_jnp(monkeypatch):
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "native")
  x = jax.random.normal(jax.random.key(1), (3, 7, 9, 70))
  weights = jax.random.normal(jax.random.key(2), (3, 1, 1, 70))

  def weighted(sum_of_squares):
    return lambda x: jnp.sum(sum_of_squares(x) * weights)

  program = jax.jit(jax.value_and_grad(weighted(layers.spatial_sum_of_squares)))
  assert "uem_ich_spatial_sum_of_squares" in program.lower(x).as_text()
  value, grad = program(x)
  reference = jax.value_and_grad(weighted(lambda x: jnp.sum(x**2, axis=(1, 2), keepdims=True)))(x)
  np.testing.assert_allclose(value, reference[0], rtol=1e-5)
  np.testing.assert_allclose(grad, reference[1], rtol=1e-6, atol=1e-6)


def _encoder_loss(model, x):
  stages = model.features(x)
  return sum(jnp.sum(stage.astype(jnp.float32) ** 2) for stage in stages) + jnp.sum(model(x))


_encoder_grad = nnx.jit(nnx.grad(_encoder_loss, argnums=(0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("zeroed", ["image", "channel"])
def test_encoder_gradients_finite_on_zeros(atto, zeroed):
  atto.eval()
  x = _image()
  x = jnp.zeros_like(x) if zeroed == "image" else x.at[..., 1].set(0.0).at[0].set(0.0)
  grads, input_grad = _encoder_grad(atto, x)
  assert np.all(np.isfinite(input_grad))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves
  for leaf in leaves:
    assert np.all(np.isfinite(leaf))


def test_layer_norm_two_pass_variance():
  norm = layers.layer_norm(4, rngs=nnx.Rngs(0))
  # A large mean with a small spread: E[x^2] - E[x]^2 in float32 loses it.
  x = np.array([[1e4 + 0.01, 1e4 - 0.01, 1e4 + 0.02, 1e4 - 0.02]], np.float32)
  centred = x.astype(np.float64) - x.astype(np.float64).mean()
  expected = centred / np.sqrt((centred**2).mean() + 1e-6)
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, atol=2e-3)


def test_bfloat16_close_to_float32(atto):
  atto.eval()
  half = build_convnext_v2("atto", drop_path_rate=0.5, dtype=jnp.bfloat16)
  nnx.update(half, nnx.state(atto))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(half, nnx.Param)))

  x = _image()
  stages, logits = _features_and_logits(half, x)
  _, reference = _features_and_logits(atto, x)
  assert all(stage.dtype == jnp.bfloat16 for stage in stages)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # bfloat16 keeps 8 significant bits; through 12 blocks the logits stay within
  # 5% of their float32 spread (measured about 1%).
  error = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
  assert error < 0.05, error


def _randomise_attention(model, seed: int) -> None:
  """Give the attention convs a spread, so attention is far from a uniform 0.5."""
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  for attention in model.coordinate_attention.values():
    for conv in (attention.conv_h, attention.conv_w):
      conv.kernel.set_value(jax.random.normal(next(keys), conv.kernel.shape))


def test_inside_placement_feeds_attention_forward(atto):
  atto.eval()
  outputs = build_convnext_v2("atto", drop_path_rate=0.5)
  nnx.update(outputs, nnx.state(atto))
  _randomise_attention(outputs, 1)
  inside = build_convnext_v2("atto", drop_path_rate=0.5, coordinate_attention_placement="inside")
  nnx.update(inside, nnx.state(outputs))
  x = _image()
  outputs_maps = _features(outputs, x)
  inside_maps = _features(inside, x)
  for index in range(3):
    np.testing.assert_allclose(inside_maps[index], outputs_maps[index], atol=1e-6)
  # Only with "inside" does stage 3 take the attended stage-2 map as input.
  assert not np.allclose(inside_maps[3], outputs_maps[3], atol=1e-2)


def test_without_attention_stages_unchanged(atto):
  plain = build_convnext_v2("atto", drop_path_rate=0.5, coordinate_attention_stages=())
  nnx.update(plain, nnx.state(atto, nnx.Not(nnx.PathContains("coordinate_attention"))))
  atto.eval()
  x = _image()
  plain_maps = _features(plain, x)
  attended_maps = _features(atto, x)
  np.testing.assert_allclose(plain_maps[1], attended_maps[1], atol=1e-6)
  assert not np.allclose(plain_maps[2], attended_maps[2], atol=1e-3)


def test_model_without_head_rejects_call():
  model = build_convnext_v2("atto", head=None, coordinate_attention_stages=())
  with pytest.raises(ValueError, match="without a head"):
    model(_image(1))


@pytest.mark.parametrize("kind, layer_count", [("timm", 1), ("multitask", 2), ("stage2", 2)])
def test_head_kinds_shapes(kind, layer_count):
  head = ClassificationHead(32, kind=kind, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 2, 2, 32))
  logits = head(x)
  assert logits.shape == (3, 6)
  assert logits.dtype == jnp.float32
  linears = [module for _, module in nnx.iter_modules(head) if isinstance(module, nnx.Linear)]
  assert len(linears) == layer_count


def test_head_pools_feature_map():
  head = ClassificationHead(8, num_classes=2, kind="timm", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
  np.testing.assert_allclose(head(x), head(jnp.mean(x, axis=(1, 2))), atol=1e-6)


def test_head_dropout_only_in_training():
  head = ClassificationHead(32, kind="multitask", dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 32))
  np.testing.assert_array_equal(head(x), head(x))
  head.train()
  assert not np.allclose(head(x), head(x))


def test_head_rejects_unknown_kind():
  with pytest.raises(ValueError, match="head kind"):
    ClassificationHead(8, kind="mlp", rngs=nnx.Rngs(0))


@pytest.mark.slow  # compiles two atto train steps, about 30 s on 2 CPU cores
def test_remat_trains_like_plain_blocks():
  # Through the trainer, so drop path draws from the step's RNG stream inside
  # the rematerialised blocks, as in real training.
  from uem_ich_jax.train import config_file, trainer

  rng = np.random.default_rng(0)
  batch = {
      "image": rng.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32),
      "labels": rng.integers(0, 2, (4, 6)).astype(np.int32),
      "valid": np.ones((4,), bool),
  }
  results = {}
  for policy in ("none", "block"):
    config = config_file.load(str(REPO / "configs" / "classification_synthetic.py"), [
        "--config.model.name=convnext_v2", "--config.model.variant=atto",
        "--config.model.depthwise=conv", "--config.model.drop_path_rate=0.5",
        f"--config.model.remat={policy}", "--config.data.batch_size=4",
        "--config.optim.warmup_steps=0",
    ])
    setup = trainer.build(config, jax.devices()[:1])
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    metrics = trainer.empty_metrics(setup)
    device_batch = trainer.model_batch(setup, batch)
    for _ in range(2):
      state, metrics = setup.train_step(state, metrics, device_batch)
    results[policy] = (float(metrics[0].compute()["loss"]), jax.tree.leaves(state["params"]))
  assert results["block"][0] == pytest.approx(results["none"][0], rel=1e-6)
  # AdamW divides by the root of the second moment, so float rounding in a
  # near-zero gradient can move a parameter by about 1e-6 (seen at XLA's
  # optimisation level 0). A wrong random stream in the rematerialised blocks
  # moves many by about the learning rate, 1e-4 or more here.
  for a, b in zip(results["block"][1], results["none"][1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=5e-6)


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match="remat"):
    ConvNeXtV2Config(remat="everything")
