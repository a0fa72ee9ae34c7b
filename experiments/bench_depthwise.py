"""Time the two depthwise convolutions of `uem_ich_jax.models.layers`, forward and backward.

    python experiments/bench_depthwise.py

The shapes are those the encoder (7x7) and the SegFormer head (3x3) see in
the curriculum (atto, 96 px, batch 16), and one of a 384 px run. For each, it
prints the median time of a jitted value and gradient of each implementation
on the default backend, their ratio, and the largest difference between their
outputs.
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
    difference = float(jnp.max(jnp.abs(
        layers.depthwise_conv(x, kernel, bias, implementation="conv")
        - layers.depthwise_conv(x, kernel, bias, implementation="shifted")
    )))
    conv = _time("conv", x, kernel, bias, args.repeats)
    shifted = _time("shifted", x, kernel, bias, args.repeats)
    print(
        f"x {batch}x{side}x{side}x{channels}, kernel {kernel_side}x{kernel_side}:"
        f" lax.conv {conv * 1e3:.1f} ms, shifted {shifted * 1e3:.1f} ms,"
        f" lax.conv / shifted {conv / shifted:.1f}, max difference {difference:.1e}",
        flush=True,
    )


if __name__ == "__main__":
  main()
