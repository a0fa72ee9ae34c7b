"""Images/s of our ConvNeXt-V2 training step and inference, against timm's PyTorch model.

Ours is the trainer's own jitted classification step from `trainer.build`
(forward, BCE loss, gradients, clipping, AdamW and metric accumulation, with
the state donated), on one CPU device. When torch and timm can be imported,
timm's `convnextv2_<variant>` then runs the equivalent PyTorch step on the same
input in the same process: forward, BCE-with-logits on the same number of
outputs, backward, gradient clipping, AdamW. Inference is the forward pass and
sigmoid in evaluation mode for both. Everything is float32 on the CPU, and both
sides get the same warmup and measured steps on one fixed random batch, so
input loading is not timed.

torch and timm are never project dependencies. Install them in a separate
virtual environment together with the project, as experiments/BENCHMARKS.md
shows, then run, for example:

  BENCH_VENV/bin/python experiments/bench_train_step.py --size 384 --batch 4 --variant tiny

Prints a table, then one JSON line. `ratio` is our images/s over timm's for
the training step and `inference_ratio` the same for inference. Both are null,
with `timm_unavailable` giving the reason, when torch or timm cannot be
imported, and with `--backend gpu` or `tpu`, since timm runs on the CPU here.

On an accelerator (`--backend gpu --dtype bfloat16`), the JSON line also gives
the model FLOP utilisation: the FLOPs that XLA counts for the compiled step
over the median step time, divided by the device's peak (`--peak-tflops`, or
a table of some GPUs' dense bfloat16 peaks).
"""

from __future__ import annotations

# TODO: on 2-core CPUs our inference runs at 1.27x to 1.42x timm's images/s
# (float32), short of the 1.5x target. Training runs at 0.91x to 1.26x, about
# its 1x target. The exact GELU's fusions lead the inference profile
# (experiments/BENCHMARKS.md, and profile_step.py).

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import uem_ich_jax
from uem_ich_jax.errors import InputError
from uem_ich_jax.models import HEAD_KINDS
from uem_ich_jax.models import convnext_v2
from uem_ich_jax.train import trainer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
NUM_CLASSES = len(uem_ich_jax.SLICE_LABELS)


# ---------------------------------------------------------------- Timing ---


def time_steps(run_step: Callable[[], Any], *, warmup: int, steps: int) -> dict[str, float]:
  """Run `run_step` `warmup` times untimed, then `steps` times, timing each call.

  `run_step` must return only after its work has finished, so that each time is
  one whole step. JAX calls must block on their outputs, but PyTorch on the CPU
  is synchronous.
  """
  for _ in range(warmup):
    run_step()
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    seconds.append(time.perf_counter() - start)
  return {"total_seconds": sum(seconds), "median_seconds": statistics.median(seconds)}


def images_per_second(timing: dict[str, float], batch: int, steps: int) -> float:
  return batch * steps / timing["total_seconds"]


# ------------------------------------------------------------------- Ours ---


def _load_base_config():
  # configs/ is not a package: load the shared defaults by path.
  spec = importlib.util.spec_from_file_location("uem_ich_configs_base", CONFIGS / "base.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def bench_config(args: argparse.Namespace):
  """Build the default training config, changed only where the benchmark needs it."""
  config = _load_base_config()
  config.stage = "classification"
  config.model.name = "convnext_v2"
  config.model.variant = args.variant
  config.model.num_classes = NUM_CLASSES
  config.model.head = args.head
  config.model.coordinate_attention_stages = args.coordinate_attention_stages
  config.model.drop_path_rate = args.drop_path_rate
  config.model.dtype = args.dtype
  # BCE, so that the loss is the one the PyTorch side computes.
  config.loss.kind = "bce"
  config.data.batch_size = args.batch
  config.data.eval_batch_size = args.batch
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.seed = args.seed
  return config


def random_batch(args: argparse.Namespace) -> dict[str, np.ndarray]:
  """NHWC images in [-1, 1] (the windowed input range) and random 0/1 labels."""
  generator = np.random.default_rng(args.seed)
  shape = (args.batch, args.size, args.size, 3)
  return {
      "image": generator.uniform(-1.0, 1.0, shape).astype(np.float32),
      "labels": generator.integers(0, 2, (args.batch, NUM_CLASSES)).astype(np.int32),
      "valid": np.ones((args.batch,), bool),
  }


def bench_device(args: argparse.Namespace) -> jax.Device:
  """Return the first device of `--backend` (cpu, gpu or tpu)."""
  try:
    return jax.devices(args.backend)[0]
  except RuntimeError as error:
    raise InputError(f"--backend {args.backend}: no such device here ({error})") from error


def bench_ours(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Time the trainer's jitted train step and eval step on one device of `--backend`."""
  config = bench_config(args)
  setup = trainer.build(config, devices=[bench_device(args)])
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
  metrics = trainer.empty_metrics(setup)
  device_batch = trainer.model_batch(setup, batch)

  start = time.perf_counter()
  train_step = trainer.compile_train_step(setup, state, metrics, device_batch)
  train_compile_seconds = time.perf_counter() - start
  train_flops = compiled_flops(train_step)

  # The step donates state and metrics, so each call must use the previous outputs.
  carry = {"state": state, "metrics": metrics}

  def run_train_step():
    carry["state"], carry["metrics"] = train_step(carry["state"], carry["metrics"], device_batch)
    jax.block_until_ready(carry)

  train = time_steps(run_train_step, warmup=args.warmup, steps=args.steps)
  state = carry["state"]
  loss = float(carry["metrics"][0].compute()["loss"])
  if not np.isfinite(loss):
    logging.warning("our training loss is %s, so the timed steps may not be representative", loss)

  start = time.perf_counter()
  eval_step = setup.eval_step.lower(state, device_batch).compile()
  eval_compile_seconds = time.perf_counter() - start
  inference = time_steps(
      lambda: jax.block_until_ready(eval_step(state, device_batch)),
      warmup=args.warmup,
      steps=args.steps,
  )
  return {
      "train": train,
      "inference": inference,
      "train_compile_seconds": train_compile_seconds,
      "inference_compile_seconds": eval_compile_seconds,
      "train_flops": train_flops,
  }


def compiled_flops(compiled: Any) -> float | None:
  """Return the FLOPs per call that XLA's cost analysis counts for a compiled program, or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Not every backend implements the cost analysis.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# Dense bfloat16 peak FLOP/s of some accelerators, from their vendors' data
# sheets (without sparsity). Others need --peak-tflops.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops(device: jax.Device, dtype: str, given_tflops: float | None) -> float | None:
  """Return the device's peak FLOP/s for `dtype`: --peak-tflops, else the table for bfloat16."""
  if given_tflops is not None:
    return given_tflops * 1e12
  if dtype != "bfloat16":
    return None
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_BF16_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None


# ------------------------------------------------------------------- timm ---


def import_timm() -> tuple[Any, Any, str | None]:
  """Return (torch, timm, None), or (None, None, the reason they cannot be used)."""
  try:
    import torch
  # Loading torch's shared libraries can fail with OSError instead of ImportError.
  except (ImportError, OSError) as error:
    return None, None, f"torch is not importable ({error})"
  try:
    import timm
  except (ImportError, OSError) as error:
    return None, None, f"timm is not importable ({error})"
  return torch, timm, None


def bench_timm(
    args: argparse.Namespace, batch: dict[str, np.ndarray], torch: Any, timm: Any, threads: int
) -> dict[str, Any]:
  """Time timm's ConvNeXt-V2 training step and inference on the same batch."""
  torch.set_num_threads(threads)
  torch.manual_seed(args.seed)
  # NOTE: timm's model has no coordinate attention, and its head is LayerNorm and
  # Linear. Ours follows --head and --coordinate-attention-stages.
  model = timm.create_model(
      f"convnextv2_{args.variant}",
      pretrained=False,
      num_classes=NUM_CLASSES,
      drop_path_rate=args.drop_path_rate,
  )
  images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  labels = torch.from_numpy(batch["labels"].astype(np.float32))

  # The AdamW settings and clipping norm of the default config, with weight decay
  # on matrices and kernels only, as in uem_ich_jax.train.optim.
  optim = _load_base_config().optim
  decayed = [p for p in model.parameters() if p.ndim > 1]
  not_decayed = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW(
      [
          {"params": decayed, "weight_decay": optim.weight_decay},
          {"params": not_decayed, "weight_decay": 0.0},
      ],
      lr=optim.encoder_lr,
      betas=(optim.b1, optim.b2),
      eps=optim.eps,
  )

  # With --dtype bfloat16, timm computes in bfloat16 too (CPU autocast, float32
  # parameters), as ours does, so the ratio compares like with like.
  def compute_precision():
    if args.dtype == "bfloat16":
      return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def run_train_step():
    optimizer.zero_grad(set_to_none=True)
    with compute_precision():
      logits = model(images)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
    optimizer.step()

  model.train()
  train = time_steps(run_train_step, warmup=args.warmup, steps=args.steps)

  def run_inference():
    with torch.inference_mode(), compute_precision():
      torch.sigmoid(model(images).float())

  model.eval()
  inference = time_steps(run_inference, warmup=args.warmup, steps=args.steps)
  return {"train": train, "inference": inference}


# ----------------------------------------------------------------- Report ---


def cpu_name() -> str:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.is_file():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def _ratio(ours: float, theirs: float | None) -> float | None:
  return None if theirs is None else ours / theirs


def print_table(result: dict[str, Any]) -> None:
  print(
      f"ConvNeXt-V2 {result['variant']}, {result['size']}x{result['size']} px, batch"
      f" {result['batch']}, {result['dtype']} on {result['device']}:"
      f" {result['warmup']} warmup + {result['steps']} measured steps each"
  )
  columns = ("train img/s", "median step s", "infer img/s", "median infer s")
  print(f"{'':16} {columns[0]:>12} {columns[1]:>14} {columns[2]:>12} {columns[3]:>15}")
  for name, prefix in (("ours (JAX)", ""), ("timm (PyTorch)", "timm_")):
    if result[f"{prefix}images_per_s"] is None:
      continue
    print(
        f"{name:16} {result[f'{prefix}images_per_s']:12.3f}"
        f" {result[f'{prefix}step_seconds_median']:14.3f}"
        f" {result[f'{prefix}inference_images_per_s']:12.3f}"
        f" {result[f'{prefix}inference_seconds_median']:15.3f}"
    )
  if result["achieved_flops_per_s"] is not None:
    line = f"train step: {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s (XLA's FLOP count)"
    if result["model_flops_utilisation"] is not None:
      line += f", {100 * result['model_flops_utilisation']:.1f}% of the device's peak"
    print(line)
  if result["ratio"] is None:
    print(f"ratio: null ({result['timm_unavailable']})")
  else:
    print(
        f"ratio (ours / timm images/s): train {result['ratio']:.3f},"
        f" inference {result['inference_ratio']:.3f}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Run both benchmarks and return the JSON-ready result."""
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load_before = os.getloadavg()
  batch = random_batch(args)

  ours = bench_ours(args, batch)
  torch, timm, unavailable = import_timm()
  if args.backend != "cpu":
    # timm runs on the CPU only here, so a ratio against it would compare devices.
    torch, timm, unavailable = None, None, f"timm is compared on the CPU only, not on {args.backend}"
  theirs = None if torch is None else bench_timm(args, batch, torch, timm, threads)
  device = bench_device(args)
  peak = peak_flops(device, args.dtype, args.peak_tflops)
  load_after = os.getloadavg()

  def rate(timing: dict[str, Any] | None, kind: str) -> float | None:
    return None if timing is None else images_per_second(timing[kind], args.batch, args.steps)

  def median(timing: dict[str, Any] | None, kind: str) -> float | None:
    return None if timing is None else timing[kind]["median_seconds"]

  images_per_s = rate(ours, "train")
  inference_images_per_s = rate(ours, "inference")
  timm_images_per_s = rate(theirs, "train")
  timm_inference_images_per_s = rate(theirs, "inference")
  flops = ours["train_flops"]
  achieved = None if flops is None else flops / ours["train"]["median_seconds"]
  return {
      "variant": args.variant,
      "size": args.size,
      "batch": args.batch,
      "warmup": args.warmup,
      "steps": args.steps,
      "head": args.head,
      "coordinate_attention_stages": list(args.coordinate_attention_stages),
      "drop_path_rate": args.drop_path_rate,
      "images_per_s": images_per_s,
      "step_seconds_median": median(ours, "train"),
      "train_compile_seconds": ours["train_compile_seconds"],
      "inference_images_per_s": inference_images_per_s,
      "inference_seconds_median": median(ours, "inference"),
      "inference_compile_seconds": ours["inference_compile_seconds"],
      "timm_images_per_s": timm_images_per_s,
      "timm_step_seconds_median": median(theirs, "train"),
      "timm_inference_images_per_s": timm_inference_images_per_s,
      "timm_inference_seconds_median": median(theirs, "inference"),
      "ratio": _ratio(images_per_s, timm_images_per_s),
      "inference_ratio": _ratio(inference_images_per_s, timm_inference_images_per_s),
      "timm_unavailable": unavailable,
      "dtype": args.dtype,
      # XLA's count for the compiled step (forward, backward, optimizer), so
      # rematerialised work counts too.
      "train_step_flops": flops,
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak,
      "model_flops_utilisation": None if achieved is None or peak is None else achieved / peak,
      "device": (
          f"cpu ({cpu_name()}, {threads} cores)" if args.backend == "cpu" else device.device_kind
      ),
      "jax_backend": device.platform,
      "jax_version": jax.__version__,
      "torch_version": None if torch is None else torch.__version__,
      "timm_version": None if timm is None else timm.__version__,
      # XLA's CPU thread pool is left at its default. Only torch's thread count is set here.
      "threads": {
          "cores": threads,
          "torch": None if torch is None else threads,
          "xla": "default",
      },
      # torch's wheel bundles GNU OpenMP, whose idle threads spin before they sleep
      # unless this is PASSIVE. On a busy 2-core CPU, that spinning made timm's atto
      # inference steps about 30x slower (experiments/BENCHMARKS.md).
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "load_average_before": [round(value, 2) for value in load_before],
      "load_average_after": [round(value, 2) for value in load_after],
  }


def _stages(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated stage indices such as 2,3, got {text!r}"
    )


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--size",
      type=_positive,
      default=384,
      help="image height and width in px, a multiple of 32 (default 384)",
  )
  parser.add_argument("--batch", type=_positive, default=4, help="images per step (default 4)")
  parser.add_argument(
      "--variant", default="tiny", choices=tuple(convnext_v2.VARIANTS), help="(default tiny)"
  )
  parser.add_argument(
      "--steps", type=_positive, default=10, help="measured steps per benchmark (default 10)"
  )
  parser.add_argument(
      "--warmup",
      type=int,
      default=2,
      help="untimed steps after compiling and before the measured ones (default 2)",
  )
  parser.add_argument(
      "--head", choices=HEAD_KINDS, help="our classification head (default: configs/base.py's)"
  )
  parser.add_argument(
      "--coordinate-attention-stages",
      type=_stages,
      help="stages followed by coordinate attention in our model, such as 2,3 (default:"
      " configs/base.py's). An empty string gives plain ConvNeXt-V2",
  )
  parser.add_argument(
      "--drop-path-rate",
      type=float,
      help="stochastic depth of both models (default: configs/base.py's)",
  )
  parser.add_argument(
      "--seed", type=int, default=0, help="seed of the parameters, drop path and the random batch"
  )
  parser.add_argument(
      "--backend",
      default="cpu",
      choices=("cpu", "gpu", "tpu"),
      help="device of our step (default cpu); timm is compared on the CPU only",
  )
  parser.add_argument(
      "--dtype",
      default="float32",
      choices=("float32", "bfloat16"),
      help="compute dtype of both models (timm's through CPU autocast); parameters stay float32",
  )
  parser.add_argument(
      "--peak-tflops",
      type=float,
      help="the device's peak TFLOP/s for --dtype, for the utilisation figure (default: a"
      " table of some GPUs, bfloat16 only)",
  )
  args = parser.parse_args(argv)
  defaults = _load_base_config().model
  if args.head is None:
    args.head = defaults.head
  if args.coordinate_attention_stages is None:
    args.coordinate_attention_stages = tuple(defaults.coordinate_attention_stages)
  if args.drop_path_rate is None:
    args.drop_path_rate = defaults.drop_path_rate
  if args.size % convnext_v2.TOTAL_STRIDE:
    parser.error(f"--size must be a multiple of {convnext_v2.TOTAL_STRIDE}, got {args.size}")
  if args.warmup < 0:
    parser.error(f"--warmup must be at least 0, got {args.warmup}")

  try:
    result = run(args)
  except InputError as error:
    print(f"bench_train_step: invalid setting: {error}", file=sys.stderr)
    return 2
  print_table(result)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  sys.exit(main())
