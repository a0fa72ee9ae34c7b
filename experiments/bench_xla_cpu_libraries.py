"""Compare the CPU matrix-product libraries XLA offers on our step, round-robin in one process.

Compiles the trainer's eval step (`--step inference`) or train step (`--step
train`) of bench_train_step.py's model once per library, then times the
compiled programs in turn, so that a change of load on shared cores hits all
of them alike. The libraries are picked with XLA compiler options:

- ynnpack: YNNPACK fusions of products and reductions. jaxlib 0.10 uses YNNPACK
  by default on CPU, but its default list of fusion kinds is not exposed, so
  this may differ from it;
- eigen: YNNPACK fusions off, so XLA runs its own products;
- eigen_ynn_reduce: XLA's own products, YNNPACK's reductions. Without YNNPACK,
  XLA splits GRN's long sums into windowed reductions: 36 ms against 1.7 ms
  for the sum of squares of a 4 x 96 x 96 x 384 map on 2 cores;
- xnnpack, onednn: YNNPACK off and the other library's dot fusions on.

    python experiments/bench_xla_cpu_libraries.py --step inference --size 384 --batch 4

The eval step is built with uem_ich_jax/compile_options.py's options, which
these replace per program.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402

from uem_ich_jax.train import trainer  # noqa: E402

_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
LIBRARIES = {
    "ynnpack": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "eigen": _NO_YNN,
    "eigen_ynn_reduce": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "xnnpack": _NO_YNN | {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn": _NO_YNN | {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def programs(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
  """Return library name -> a function that runs its compiled step once and waits for it."""
  defaults = bench_train_step._load_base_config().model
  args.head = defaults.head
  args.coordinate_attention_stages = tuple(defaults.coordinate_attention_stages)
  args.drop_path_rate = defaults.drop_path_rate
  args.dtype, args.seed, args.backend = "float32", 0, "cpu"
  setup = trainer.build(bench_train_step.bench_config(args), devices=[jax.devices("cpu")[0]])
  batch = trainer.model_batch(setup, bench_train_step.random_batch(args))

  def fresh_state():
    return jax.jit(setup.init_state, out_shardings=setup.state_shardings)()

  runners = {}
  for name in args.libraries:
    if args.step == "inference":
      state = fresh_state()
      compiled = setup.eval_step.lower(state, batch).compile(LIBRARIES[name])
      runners[name] = lambda compiled=compiled, state=state: jax.block_until_ready(compiled(state, batch))
    else:
      carry = {"state": fresh_state(), "metrics": trainer.empty_metrics(setup)}
      lowered = setup.train_step.lower(carry["state"], carry["metrics"], batch)
      compiled = lowered.compile(LIBRARIES[name])

      def run_once(compiled=compiled, carry=carry):
        # The step donates state and metrics, so each call takes the previous outputs.
        carry["state"], carry["metrics"] = compiled(carry["state"], carry["metrics"], batch)
        jax.block_until_ready(carry)

      runners[name] = run_once
    print(f"compiled {name}", flush=True)
  return runners


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--step", choices=("inference", "train"), default="inference")
  parser.add_argument("--size", type=int, default=384, help="image size in px (default 384)")
  parser.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
  parser.add_argument("--variant", default="tiny", help="ConvNeXt-V2 variant (default tiny)")
  parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one untimed (default 7)")
  parser.add_argument(
      "--libraries", default=",".join(LIBRARIES), help=f"comma-separated, of {', '.join(LIBRARIES)}"
  )
  args = parser.parse_args(argv)
  args.libraries = args.libraries.split(",")
  unknown = sorted(set(args.libraries) - set(LIBRARIES))
  if unknown:
    parser.error(f"unknown libraries {unknown}; choose from {', '.join(LIBRARIES)}")
  if args.rounds < 1 or args.batch < 1 or args.size % 32:
    parser.error("--rounds and --batch must be at least 1, --size a multiple of 32")

  runners = programs(args)
  seconds = {name: [] for name in runners}
  for round_index in range(args.rounds + 1):
    for name, run_once in runners.items():
      start = time.perf_counter()
      run_once()
      if round_index:
        seconds[name].append(time.perf_counter() - start)

  reference = statistics.median(seconds[args.libraries[0]])
  print(f"\n{args.step} step, ConvNeXt-V2 {args.variant} {args.size} px, batch {args.batch},"
        f" {args.rounds} rounds")
  print(f"{'library':10s} {'median s':>9s} {'fastest s':>10s}  speed-up over {args.libraries[0]}")
  for name, values in seconds.items():
    median = statistics.median(values)
    print(f"{name:10s} {median:9.3f} {min(values):10.3f}  {reference / median:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
