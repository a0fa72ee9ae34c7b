"""Memory of the scan aggregator at the upstream size, from XLA's compiled memory analysis.

Each variant is compiled twice on abstract inputs, so nothing large is
allocated or run. The inference program is the forward pass in eval mode. The
training program is a gradient step in train mode (dropout 0.1): the gradients
of a scalar loss on the pooled output with respect to every parameter.

The figures are what `jax.jit(...).lower(...).compile().memory_analysis()`
reports for the default backend: temporary buffers, arguments (parameters,
positional code, inputs) and outputs. They depend on the backend. On a GPU,
`jax.nn.dot_product_attention` may pick a fused kernel that never builds the
score matrix, while the CPU compiler builds it.

The upstream size is feature 768, 8 heads, 4 layers, FFN 2048, max_slices 64
and one scan of 48 slices with 12 x 12 tokens each (384 px images, stride 32),
6912 tokens. `--small` runs a tiny configuration for smoke tests. Usage:

  python experiments/bench_aggregator_memory.py
  python experiments/bench_aggregator_memory.py --small

Prints a table in MiB, then one JSON line with the byte counts per variant
key (default, chunk, remat, chunk+remat, token_pool). `--variants` compiles a
subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.models.aggregator import ScanAggregator


class Size(NamedTuple):
  """Aggregator sizes and one scan's shape."""

  feature_dim: int
  num_heads: int
  num_layers: int
  dim_feedforward: int
  max_slices: int
  spatial_size: int
  slices: int
  attention_chunk: int

  @property
  def tokens(self) -> int:
    return self.slices * self.spatial_size**2


UPSTREAM = Size(768, 8, 4, 2048, 64, 12, 48, attention_chunk=512)
SMALL = Size(24, 2, 2, 32, 8, 4, 6, attention_chunk=16)


def variants(size: Size) -> dict[str, tuple[str, dict]]:
  """Return variant key -> (label, ScanAggregator keyword options)."""
  chunk = size.attention_chunk
  return {
      "default": ("default", {}),
      "chunk": (f"attention_chunk={chunk}", {"attention_chunk": chunk}),
      "remat": ("remat", {"remat": True}),
      "chunk+remat": (f"attention_chunk={chunk} + remat", {"attention_chunk": chunk, "remat": True}),
      "token_pool": ("token_pool=2", {"token_pool": 2}),
  }


def _memory(compiled) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  return {
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes),
  }


def measure(size: Size, options: dict) -> dict[str, dict[str, int]]:
  """Compile inference and a training step for one variant and return their memory."""

  def build() -> ScanAggregator:
    return ScanAggregator(
        size.feature_dim,
        size.num_heads,
        size.num_layers,
        size.dim_feedforward,
        size.max_slices,
        size.spatial_size,
        rngs=nnx.Rngs(0),
        **options,
    )

  features = jax.ShapeDtypeStruct(
      (1, size.slices, size.spatial_size, size.spatial_size, size.feature_dim), jnp.float32
  )
  slice_mask = jax.ShapeDtypeStruct((1, size.slices), jnp.bool_)

  model = nnx.eval_shape(build)
  model.eval()
  graphdef, state = nnx.split(model)

  def infer(state, features, slice_mask):
    return nnx.merge(graphdef, state)(features, slice_mask)

  inference = jax.jit(infer).lower(state, features, slice_mask).compile()

  model = nnx.eval_shape(build)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, features, slice_mask):
    # Dropout advances the RNG counters in `rest`, and nnx allows that only for
    # Variables made in the current (grad) trace, so it gets fresh Variables.
    rest = jax.tree.map(lambda value: value, rest)
    pooled, _ = nnx.merge(graphdef, params, rest)(features, slice_mask)
    return jnp.mean(pooled**2)

  training = jax.jit(jax.grad(loss_fn)).lower(params, rest, features, slice_mask).compile()
  return {"inference": _memory(inference), "training": _memory(training)}


def _mib(value: int) -> str:
  return f"{value / 2**20:10.1f}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny sizes, for smoke tests")
  parser.add_argument(
      "--variants",
      default=",".join(variants(UPSTREAM)),
      help=f"comma-separated variants to compile (default: all of {', '.join(variants(UPSTREAM))})",
  )
  args = parser.parse_args(argv)
  size = SMALL if args.small else UPSTREAM
  known = variants(size)
  chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
  unknown = [name for name in chosen if name not in known]
  if unknown or not chosen:
    parser.error(f"unknown variants {unknown}; expected a comma-separated subset of {', '.join(known)}")

  start = time.perf_counter()
  results = {name: measure(size, known[name][1]) for name in chosen}
  elapsed = time.perf_counter() - start

  print(
      f"scan aggregator memory on {jax.default_backend()}: {size.slices} slices x "
      f"{size.spatial_size}^2 tokens = {size.tokens} tokens, batch 1, {elapsed:.0f} s to compile"
  )
  header = f"{'variant':<32} {'mode':<10} {'temp MiB':>10} {'args MiB':>10} {'output MiB':>10}"
  print(header)
  print("-" * len(header))
  for name, modes in results.items():
    for mode, memory in modes.items():
      print(
          f"{known[name][0]:<32} {mode:<10} {_mib(memory['temp_bytes'])} {_mib(memory['argument_bytes'])}"
          f" {_mib(memory['output_bytes'])}"
      )
  print(json.dumps({
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "size": size._asdict(),
      "tokens": size.tokens,
      "variants": results,
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
