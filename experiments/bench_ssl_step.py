"""Share of the SSL training step spent on the GLCM texture term, at 384x384 by default.

Builds the trainer's own jitted `ssl_pretrain` step (sparse encoder, decoder,
masked MSE, texture term, gradients, AdamW) twice from configs/ssl_pretrain.py:
once with `ssl.glcm_weight` 0.1 and once with 0, which skips the texture term
entirely. The two steps run alternately on the same fixed batch, so machine
noise hits both alike, and the share is 1 - (median without) / (median with).

    python experiments/bench_ssl_step.py --size 384 --batch 8

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from uem_ich_jax.train import config_file
from uem_ich_jax.train import trainer

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ssl_pretrain.py"


def build_step(args: argparse.Namespace, glcm_weight: float) -> dict[str, Any]:
  """Compile the SSL train step with `glcm_weight` on one CPU device; return step and carry."""
  config = config_file.load(f"{CONFIG}:synthetic", [])
  config.ssl.glcm_weight = glcm_weight
  config.ssl.glcm_levels = args.levels
  config.model.variant = args.variant
  config.model.decoder_width = args.decoder_width
  config.data.batch_size = args.batch
  config.data.eval_batch_size = args.batch
  config.mesh.data = 1
  config.mesh.fsdp = 1
  setup = trainer.build(config, devices=[jax.devices("cpu")[0]])
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
  metrics = trainer.empty_metrics(setup)
  generator = np.random.default_rng(0)
  images = generator.uniform(-1.0, 1.0, (args.batch, args.size, args.size, 3)).astype(np.float32)
  batch = trainer.model_batch(setup, {"image": images, "valid": np.ones((args.batch,), bool)})
  start = time.perf_counter()
  step = trainer.compile_train_step(setup, state, metrics, batch)
  compile_seconds = time.perf_counter() - start
  return {"step": step, "state": state, "metrics": metrics, "batch": batch,
          "compile_seconds": compile_seconds}


def run_once(run: dict[str, Any]) -> float:
  """Run one donated step, wait for it, and return its seconds."""
  start = time.perf_counter()
  run["state"], run["metrics"] = run["step"](run["state"], run["metrics"], run["batch"])
  jax.block_until_ready((run["state"], run["metrics"]))
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=384, help="image height and width")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variant", default="atto")
  parser.add_argument("--decoder-width", type=int, default=128)
  parser.add_argument("--levels", type=int, default=16, help="soft histogram levels")
  parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args(argv)

  with_term = build_step(args, 0.1)
  without_term = build_step(args, 0.0)
  for _ in range(args.warmup):
    run_once(with_term)
    run_once(without_term)
  seconds_with, seconds_without = [], []
  for _ in range(args.steps):
    seconds_with.append(run_once(with_term))
    seconds_without.append(run_once(without_term))

  median_with = statistics.median(seconds_with)
  median_without = statistics.median(seconds_without)
  share = 1.0 - median_without / median_with
  print(f"SSL step, ConvNeXt-V2 {args.variant}, decoder {args.decoder_width}, "
        f"{args.batch} x {args.size}x{args.size}, {args.levels} levels, {args.steps} steps each")
  print(f"  with the GLCM term     {median_with:8.3f} s/step (median)")
  print(f"  without the GLCM term  {median_without:8.3f} s/step (median)")
  print(f"  GLCM share of the step {100 * share:7.1f} %")
  print(json.dumps({
      "variant": args.variant,
      "size": args.size,
      "batch": args.batch,
      "decoder_width": args.decoder_width,
      "levels": args.levels,
      "seconds_with_glcm": median_with,
      "seconds_without_glcm": median_without,
      "glcm_share": share,
      "compile_seconds": [with_term["compile_seconds"], without_term["compile_seconds"]],
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "machine": platform.machine(),
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
