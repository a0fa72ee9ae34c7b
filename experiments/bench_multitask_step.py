"""Time the curriculum's multi-task training step on one fixed batch, with and without parts of it.

Uses the data that experiments/curriculum_synthetic.py built, and a randomly
initialised model with the curriculum's multi-task settings:

    python experiments/bench_multitask_step.py --workdir=work/curriculum

Prints the median of 5 timed steps (after 2 untimed ones) for the full step,
the step with depthwise convolutions through `lax.conv` (the default on CPU
is shifted multiply-adds), the step without detection, and the step with
`model.classify_at_stride4`.
The input pipeline is not timed.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import curriculum_synthetic  # noqa: E402

from uem_ich_jax.train import trainer  # noqa: E402

VARIANTS = {
    "full step": {},
    "depthwise as lax.conv": {"model.depthwise": "conv"},
    "without detection": {"multitask.detection": False},
    "classify_at_stride4": {"model.classify_at_stride4": True},
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  args = parser.parse_args()
  # The driver's own defaults give the multi-task stage's config.
  driver_args = curriculum_synthetic.parse_args([f"--workdir={args.workdir}"])
  names = {layout: f"synthetic_ich/{layout}_curriculum" for layout in ("slices", "scans")}
  spec, overrides = curriculum_synthetic.stage_overrides(
      names, args.workdir / "tfds", args.workdir, driver_args
  )["multitask"]
  overrides = dict(overrides, init_from="random")
  for name, change in VARIANTS.items():
    config = curriculum_synthetic._config(spec, dict(overrides, **change))
    setup = trainer.build(config)
    iterator = trainer.train_iterator(config, trainer.dataset_source(config), setup.folds)
    batch = trainer.model_batch(setup, next(iterator))
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    metrics = trainer.empty_metrics(setup)
    step = trainer.compile_train_step(setup, state, metrics, batch)
    times = []
    for index in range(7):
      start = time.perf_counter()
      state, metrics = step(state, metrics, batch)
      jax.block_until_ready(state)
      if index >= 2:
        times.append(time.perf_counter() - start)
    print(f"{name}: {statistics.median(times):.3f} s a step", flush=True)


if __name__ == "__main__":
  main()
