"""Time the depthwise convolutions of `uem_ich_jax.models.layers`, forward and backward.

    python experiments/bench_depthwise.py

The shapes are those the encoder (7x7) and the SegFormer head (3x3) see in
the curriculum (atto, 96 px, batch 16), and one of a 384 px run. For each, it
prints the median time of a jitted value and gradient of each implementation
on the default backend (lax.conv, the shifted sum, and on CPU the C++ kernels),
the ratios to lax.conv, and the largest difference from lax.conv's outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from uem_ich_jax.models import layers

# (batch, side, channels, kernel side): atto's four stages at 96 px, the
# SegFormer fusion depthwise at stride 4 (4 x embed 64), and a 384 px stage 1.
SHAPES = (
    (16, 24, 40, 7),
    (16, 12, 80, 7),
    (16, 6, 160, 7),
    (16, 3, 320, 7),
    (16, 24, 256, 3),
    (4, 96, 96, 7),
)


def _time(implementation: str, x, kernel, bias, repeats: int) -> float:
  def loss(x, kernel, bias):
    y = layers.depthwise_conv(x, kernel, bias, implementation=implementation)
    return jnp.sum(y * y)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(x, kernel, bias))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(x, kernel, bias))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per shape (default 10)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f"backend: {jax.default_backend()}")
  for batch, side, channels, kernel_side in SHAPES:
    x = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_side, kernel_side, 1, channels)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(channels,)), jnp.float32)
    implementations = ["conv", "shifted"]
    if jax.default_backend() == "cpu":
      implementations.append("native")
    reference = layers.depthwise_conv(x, kernel, bias, implementation="conv")
    parts = []
    conv_seconds = None
    for implementation in implementations:
      seconds = _time(implementation, x, kernel, bias, args.repeats)
      conv_seconds = conv_seconds or seconds
      difference = float(jnp.max(jnp.abs(
          layers.depthwise_conv(x, kernel, bias, implementation=implementation) - reference
      )))
      parts.append(
          f"{implementation} {seconds * 1e3:.1f} ms ({conv_seconds / seconds:.1f}x lax.conv's speed,"
          f" max difference {difference:.1e})"
      )
    print(f"x {batch}x{side}x{side}x{channels}, kernel {kernel_side}x{kernel_side}: " + "; ".join(parts), flush=True)

if __name__ == "__main__":
  main()
