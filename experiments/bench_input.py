"""Slices per second per CPU core of the training input pipeline, from array_record to device batches.

The pipeline is the trainer's own (`uem_ich_jax.data.pipeline.train_dataset`).
It reads an example from array_record, decodes it and turns it into model
input. It augments it (rotation, zoom, flips, intensity; the mask and boxes
are warped along), pads boxes and batches. Then `to_global_batch` puts the
batch on the device.
It runs on a `synthetic_ich` build at 384 px with masks and boxes, the layout
of the multi-task stage. The build is made first (or reused from
`--data-dir`) and is not timed.

For each grain worker count, the benchmark times `--batches` batches after
`--warmup` untimed ones, and reports slices/s (wall clock) and slices per
CPU-second, counting this process and its worker processes. Slices per
CPU-second is the rate one core sustains, so an accelerator that trains at R
slices/s needs about R / that figure cores of input work:

    python experiments/bench_input.py --size 384 --batch 16

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

import jax
import numpy as np

from uem_ich_jax.data import augment as augment_lib
from uem_ich_jax.data import pipeline
from uem_ich_jax.data.global_batch import to_global_batch
from uem_ich_jax.train import mesh as mesh_lib


def cpu_seconds() -> float:
  """User and system CPU time of this process and of its finished and running children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
  # Running grain workers are not in RUSAGE_CHILDREN until they exit: read
  # their counters from /proc where it exists.
  for pid in _child_pids():
    try:
      fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    ticks = os.sysconf("SC_CLK_TCK")
    total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
  return total


def _child_pids() -> list[int]:
  """Return the pids of every running descendant of this process, from /proc (empty elsewhere)."""
  found, pending = [], [os.getpid()]
  while pending:
    pid = pending.pop()
    # Each thread lists the children it started, so read every thread's list.
    for children in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
      try:
        new = [int(child) for child in children.read_text().split()]
      except OSError:
        continue
      found += new
      pending += new
  return found


def build(data_dir: pathlib.Path, size: int, num_scans: int, num_slices: int) -> object:
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  config = SyntheticIchConfig(
      name=f"slices_bench{size}_{num_scans}x{num_slices}",
      num_scans=num_scans,
      num_slices=num_slices,
      image_size=size,
      num_folds=5,
  )
  builder = SyntheticIch(config=config, data_dir=str(data_dir), file_format="array_record")
  started = time.perf_counter()
  builder.download_and_prepare()
  print(f"dataset ready in {time.perf_counter() - started:.1f} s: {data_dir}", file=sys.stderr)
  return builder.as_data_source(split="train")


def measure(source, *, batch: int, workers: int, warmup: int, batches: int) -> dict[str, float]:
  dataset = pipeline.train_dataset(
      source,
      folds=(0, 1, 2, 3, 4),
      batch_size=batch,
      seed=0,
      augment=augment_lib.AugmentConfig(boxes_from_mask=True),
      shard_index=0,
      shard_count=1,
      worker_count=workers,
  )
  sharding = mesh_lib.batch_sharding(mesh_lib.create_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1]))
  iterator = iter(dataset)

  def next_on_device():
    arrays = to_global_batch(next(iterator), sharding)
    jax.block_until_ready([value for value in arrays.values() if isinstance(value, jax.Array)])
    return arrays

  for _ in range(warmup):
    next_on_device()
  cpu_start, wall_start = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    arrays = next_on_device()
  wall = time.perf_counter() - wall_start
  cpu = cpu_seconds() - cpu_start
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
  slices = batch * batches
  return {
      "workers": workers,
      "slices_per_s": slices / wall,
      "slices_per_cpu_s": slices / cpu if cpu > 0 else float("nan"),
      "cores_busy": cpu / wall,
      "image_shape": list(arrays["image"].shape),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=384)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--workers", default="0,1,2", help="grain worker counts, comma-separated")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--scans", type=int, default=8)
  parser.add_argument("--slices", type=int, default=16)
  parser.add_argument("--data-dir", default="", help="TFDS folder to build in or reuse (default: a temporary one)")
  args = parser.parse_args(argv)
  workers = [int(value) for value in args.workers.split(",")]

  with tempfile.TemporaryDirectory() as temporary:
    data_dir = pathlib.Path(args.data_dir or temporary)
    source = build(data_dir, args.size, args.scans, args.slices)
    rows = [
        measure(source, batch=args.batch, workers=count, warmup=args.warmup, batches=args.batches)
        for count in workers
    ]

  cores = os.cpu_count()
  print(
      f"input pipeline, synthetic_ich slices at {args.size}x{args.size} px with masks and boxes,"
      f" augmentation on, batch {args.batch}, {cores} cores ({platform.processor() or 'cpu'}):"
      f" {args.warmup} warmup + {args.batches} measured batches"
  )
  print(f"{'workers':>8} {'slices/s':>10} {'slices/CPU-s':>13} {'cores busy':>11}")
  for row in rows:
    print(
        f"{row['workers']:>8} {row['slices_per_s']:>10.1f} {row['slices_per_cpu_s']:>13.1f}"
        f" {row['cores_busy']:>11.2f}"
    )
  print(json.dumps({"size": args.size, "batch": args.batch, "cpu_count": cores, "rows": rows}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
