"""CPU time of our training step or inference per kind of XLA operation.

Builds the same model, config and random batch as bench_train_step.py, runs
the compiled step a few times under `jax.profiler` with XLA's per-operation
trace events on, and prints seconds per step:

- by kind: the operation names without their number, such as `ynn_fusion`
  (a matrix product, with the elementwise work fused into it, run by YNNPACK)
  or `pad_slice_fusion` (the shifted sums of the depthwise convolution);
- the slowest single operations, each with its output shape and what it computes.

    python experiments/profile_step.py --size 384 --batch 4 --variant tiny --step train

The events are the operations as the CPU runtime starts them. Two may run at
once on different cores, so the sum can exceed the wall time per step, which
is printed too. Matrix products that XLA hands to Eigen (the inference step on
CPU, see uem_ich_jax/compile_options.py) get events of a few microseconds, as
if only their dispatch were traced, so their time shows only in the wall time.
"""

from __future__ import annotations

import os

# Per-operation trace events must be on before the CPU backend starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402  (after the flag above)

from uem_ich_jax.train import trainer  # noqa: E402

# Trace events of the runtime itself, not of an operation of the program.
_RUNTIME_PREFIXES = ("ThunkExecutor", "$", "Slinky", "PjRt", "PjitFunction", "ParseArguments",
                     "CommonPjRt", "Handle inputs", "end: ")


def compiled_step(args: argparse.Namespace):
  """Return (compiled program, a function running it once and waiting for it)."""
  config = bench_train_step.bench_config(args)
  setup = trainer.build(config, devices=[bench_train_step.bench_device(args)])
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
  batch = trainer.model_batch(setup, bench_train_step.random_batch(args))
  if args.step == "inference":
    compiled = setup.eval_step.lower(state, batch).compile()
    return compiled, lambda: jax.block_until_ready(compiled(state, batch))

  metrics = trainer.empty_metrics(setup)
  compiled = setup.train_step.lower(state, metrics, batch).compile()
  carry = {"state": state, "metrics": metrics}

  def run_once():
    # The step donates state and metrics, so each call takes the previous outputs.
    carry["state"], carry["metrics"] = compiled(carry["state"], carry["metrics"], batch)
    jax.block_until_ready(carry)

  return compiled, run_once


def operation_seconds(trace_dir: pathlib.Path, steps: int) -> collections.Counter:
  """Sum the trace's complete events per operation name, in seconds per step."""
  files = sorted(trace_dir.rglob("*.trace.json.gz"))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(files[-1]) as stream:
    events = json.load(stream)["traceEvents"]
  seconds: collections.Counter = collections.Counter()
  for event in events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    if event["name"].startswith(_RUNTIME_PREFIXES):
      continue
    seconds[event["name"]] += event["dur"] / 1e6 / steps
  return seconds


def describe(hlo_text: str, name: str) -> str:
  """Return `name`'s output shape and the operations of its fused computation, from the HLO text."""
  match = re.search(rf"%{re.escape(name)} = (\S+) \w+\(.*?(?:calls=%([\w.\-]+)|$)", hlo_text, re.M)
  if match is None:
    return "?"
  shape, computation = match.group(1), match.group(2)
  if computation is None:
    return shape
  body = re.search(rf"^%?{re.escape(computation)} .*?\{{\n(.*?)\n\}}", hlo_text, re.S | re.M)
  if body is None:
    return shape
  operations = collections.Counter(re.findall(r"= \S+ ([a-z][\w\-]*)\(", body.group(1)))
  for skipped in ("parameter", "bitcast", "broadcast", "constant"):
    operations.pop(skipped, None)
  listed = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in operations.most_common(4))
  return f"{shape}  {listed}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=384, help="image size in px (default 384)")
  parser.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
  parser.add_argument("--variant", default="tiny", help="ConvNeXt-V2 variant (default tiny)")
  parser.add_argument("--step", choices=("train", "inference"), default="train")
  parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
  parser.add_argument("--top", type=int, default=15, help="single operations listed (default 15)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch < 1 or args.size % 32:
    parser.error("--steps and --batch must be at least 1, --size a multiple of 32")
  defaults = bench_train_step._load_base_config().model
  args.head = defaults.head
  args.coordinate_attention_stages = tuple(defaults.coordinate_attention_stages)
  args.drop_path_rate = defaults.drop_path_rate
  args.dtype, args.seed, args.backend = "float32", 0, "cpu"

  compiled, run_once = compiled_step(args)
  run_once()
  run_once()
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    start = time.perf_counter()
    for _ in range(args.steps):
      run_once()
    wall = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    seconds = operation_seconds(pathlib.Path(folder), args.steps)

  by_kind: collections.Counter = collections.Counter()
  for name, value in seconds.items():
    by_kind[re.sub(r"\.\d+$", "", name)] += value
  total = sum(seconds.values())
  if total <= 0:
    # The flag at the top had no effect: JAX's CPU backend had started before.
    print(
        "profile_step: no XLA operation events found in the trace; run it as a script, so that"
        " XLA_FLAGS is set before JAX starts its CPU backend",
        file=sys.stderr,
    )
    return 1
  print(
      f"{args.step} step, ConvNeXt-V2 {args.variant} {args.size}x{args.size} px, batch"
      f" {args.batch}: {wall:.3f} s wall per step, {total:.3f} s in operation events"
  )
  print(f"\n{'s/step':>8}  {'share':>5}  kind of operation")
  for kind, value in by_kind.most_common(15):
    print(f"{value:8.3f}  {value / total:5.1%}  {kind}")
  hlo_text = compiled.as_text()
  print(f"\n{'s/step':>8}  slowest operations: output shape, operations inside")
  for name, value in seconds.most_common(args.top):
    print(f"{value:8.4f}  {name}: {describe(hlo_text, name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
