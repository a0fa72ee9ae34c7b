"""Tests for the three CT windows and their uint8 storage form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uem_ich_jax.ct import windowing


@pytest.mark.parametrize(
    "name, hu_to_expected",
    [
        ("brain", {-1000: -1.0, 0: -1.0, 20: -0.5, 40: 0.0, 60: 0.5, 80: 1.0, 1000: 1.0}),
        ("subdural", {-20: -1.0, 30: -0.5, 80: 0.0, 180: 1.0, 500: 1.0}),
        ("bone", {-1024: -1.0, -500: -1.0, 500: 0.0, 1000: 0.5, 1500: 1.0, 3000: 1.0}),
    ],
)
def test_windows_known_values(name, hu_to_expected):
  channel = windowing.WINDOW_NAMES.index(name)
  hu = np.array(list(hu_to_expected), dtype=np.float32)
  expected = np.array(list(hu_to_expected.values()), dtype=np.float32)
  np.testing.assert_allclose(windowing.windows(hu)[..., channel], expected, atol=1e-6)


def test_windows_channel_order_and_constants():
  assert windowing.WINDOW_NAMES == ("brain", "subdural", "bone")
  assert windowing.WINDOWS["brain"] == (40.0, 80.0)
  assert windowing.WINDOWS["subdural"] == (80.0, 200.0)
  assert windowing.WINDOWS["bone"] == (500.0, 2000.0)


@pytest.mark.parametrize("shape", [(), (7,), (2, 5, 6), (2, 3, 4, 5)])
def test_windows_any_leading_shape(shape):
  hu = np.random.default_rng(0).integers(-1024, 3000, size=shape).astype(np.int16)
  out = windowing.windows(hu)
  assert out.shape == shape + (3,)
  assert out.dtype == np.float32
  assert np.all(out >= -1.0)
  assert np.all(out <= 1.0)


def test_windows_jax_matches_numpy():
  hu = np.random.default_rng(1).uniform(-1100, 3100, size=(3, 16, 16)).astype(np.float32)
  expected = windowing.windows(hu)
  eager = windowing.windows(jnp.asarray(hu))
  jitted = jax.jit(windowing.windows)(jnp.asarray(hu))
  assert isinstance(eager, jax.Array)
  assert eager.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(eager), expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jitted), expected, atol=1e-6)


def test_windows_uint8_endpoints():
  stored = windowing.windows_uint8(np.array([-2000.0, 3000.0]))
  assert stored.dtype == np.uint8
  np.testing.assert_array_equal(stored[0], [0, 0, 0])
  np.testing.assert_array_equal(stored[1], [255, 255, 255])


def test_uint8_path_agrees_with_float_path():
  hu = np.random.default_rng(2).uniform(-1100, 3100, size=(4, 32, 32)).astype(np.float32)
  direct = windowing.windows(hu)
  via_storage = windowing.uint8_to_model_input(windowing.windows_uint8(hu))
  assert via_storage.dtype == np.float32
  assert np.max(np.abs(via_storage - direct)) <= 1 / 255 + 1e-6


def test_uint8_to_model_input_levels():
  levels = np.array([0, 255, 51], dtype=np.uint8)
  np.testing.assert_allclose(
      windowing.uint8_to_model_input(levels), [-1.0, 1.0, 51 * 2 / 255 - 1], atol=1e-6
  )
  jitted = jax.jit(windowing.uint8_to_model_input)(jnp.asarray(levels))
  np.testing.assert_allclose(np.asarray(jitted), [-1.0, 1.0, 51 * 2 / 255 - 1], atol=1e-6)
