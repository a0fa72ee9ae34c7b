"""Forward-only programs on CPU are compiled without YNNPACK's fusions, and compute the same."""

import jax
import jax.numpy as jnp
import numpy as np

from uem_ich_jax import compile_options


def _dense(x, w, b):
  return jax.nn.gelu(x @ w + b)


def _inputs():
  rng = np.random.default_rng(0)
  return (
      jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
      jnp.asarray(rng.normal(size=(32, 48)), jnp.float32),
      jnp.asarray(rng.normal(size=(48,)), jnp.float32),
  )


def test_options_only_for_cpu():
  assert compile_options.forward_options("gpu") == {}
  assert compile_options.forward_options("tpu") == {}
  assert compile_options.forward_options("cpu")


def test_cpu_options_drop_ynnpack_fusions():
  """A renamed or removed flag in a newer jaxlib fails here, not in a user's prediction."""
  args = _inputs()
  options = compile_options.forward_options("cpu")
  plain = jax.jit(_dense).lower(*args).compile().as_text()
  chosen = jax.jit(_dense, compiler_options=options).lower(*args).compile().as_text()
  assert "ynn_fusion" in plain, "the default no longer uses YNNPACK: recheck the options"
  assert "ynn_fusion" not in chosen


def test_forward_jit_computes_as_jit_with_static_arguments():
  def scaled(power, x, w, b):
    return _dense(x, w, b) ** power

  args = _inputs()
  forward = compile_options.forward_jit(scaled, static_argnums=0)
  reference = jax.jit(scaled, static_argnums=0)
  for power in (1, 2):
    np.testing.assert_allclose(forward(power, *args), reference(power, *args), rtol=1e-5, atol=1e-5)
  assert forward.__name__ == "scaled"
