"""XLA compiler options for programs that only run models forward.

jaxlib 0.10's CPU backend hands matrix products, with the elementwise work XLA
fuses around them, to YNNPACK by default. For ConvNeXt-V2 tiny at 384 px,
batch 4, on 2 Intel Xeon cores (AVX-512), XLA's own matrix products (Eigen)
ran the forward pass 1.1x to 1.2x faster than YNNPACK's in one process,
round-robin (experiments/bench_xla_cpu_libraries.py).
The training step, whose gradients are mostly products with a long reduction
over positions, ran 1.8x slower with Eigen's products, so training programs
keep the default (experiments/BENCHMARKS.md).

Other backends get no options: cuDNN, cuBLAS and the TPU compiler choose for
themselves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# An empty list of fusion kinds turns YNNPACK fusions off.
_CPU_FORWARD = {"xla_cpu_experimental_ynn_fusion_type": ""}


def forward_options(platform: str) -> dict[str, str]:
  """Return the compiler options for a forward-only program on `platform` ("cpu", "gpu", "tpu")."""
  return dict(_CPU_FORWARD) if platform == "cpu" else {}


def forward_jit(function: Callable[..., Any], **jit_options: Any) -> Callable[..., Any]:
  """Return `jax.jit(function, **jit_options)` compiled with `forward_options` of the default backend.

  The backend is looked up at the first call, not here, so that a module can
  define its jitted functions at import before `jax.distributed.initialize`
  runs (which must come before any backend is started).
  """
  jitted: dict[str, Callable[..., Any]] = {}

  @functools.wraps(function)
  def call(*args, **kwargs):
    platform = jax.default_backend()
    if platform not in jitted:
      jitted[platform] = jax.jit(
          function, compiler_options=forward_options(platform), **jit_options
      )
    return jitted[platform](*args, **kwargs)

  return call
