"""Does SSL pretraining help when labels are scarce? SSL encoder vs random init on synthetic_ich.

1. Build a synthetic_ich slice dataset (patient-level folds).
2. Pretrain the encoder with configs/ssl_pretrain.py:synthetic on the training
   folds (images only, all training patients).
3. For each seed, train slice classification (ConvNeXt-V2 atto with coordinate
   attention) on `--fraction` of the training patients, twice: from the SSL
   encoder and from random weights, with the same steps, seeds and patients.
   Score the best checkpoint of each (chosen on the validation fold) on the
   held-out test fold.
4. Print a Markdown table and write WORKDIR/results.json.

    python experiments/ssl_vs_random.py --workdir=/tmp/ssl_vs_random

The defaults fit in about 30 minutes on 2 CPU cores. Steps and sizes were set
to fit that budget before any result was seen, and are the same for both arms.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _build(data_dir: pathlib.Path, args: argparse.Namespace) -> str:
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  name = f"slices_ssl_n{args.num_scans}_z{args.num_slices}_px{args.image_size}"
  config = SyntheticIchConfig(
      name=name,
      layout="slices",
      num_scans=args.num_scans,
      num_slices=args.num_slices,
      image_size=args.image_size,
      description="ssl_vs_random experiment build",
  )
  builder = SyntheticIch(config=config, data_dir=str(data_dir), file_format="array_record")
  if not builder.is_prepared():
    print(f"building synthetic_ich/{name} into {data_dir}", flush=True)
    builder.download_and_prepare()
  return f"synthetic_ich/{name}"


def _config(spec: str, overrides: dict[str, object]):
  from uem_ich_jax.train import config_file

  return config_file.load(
      str(REPO / "configs" / spec), [f"--config.{key}={value}" for key, value in overrides.items()]
  )


def _pretrain(workdir: pathlib.Path, data: dict[str, object], args: argparse.Namespace) -> pathlib.Path:
  from uem_ich_jax.train import trainer

  config = _config(
      "ssl_pretrain.py:synthetic",
      data
      | {
          "num_steps": args.ssl_steps,
          "eval_every": args.ssl_steps,
          "checkpoint_every": args.ssl_steps,
          "image_every": args.ssl_steps,
          "log_every": 25,
          "data.batch_size": args.batch_size,
          "optim.warmup_steps": max(1, args.ssl_steps // 20),
      },
  )
  summary = trainer.train(config, workdir)
  return pathlib.Path(summary["encoder_export"])


def _classify(
    workdir: pathlib.Path, data: dict[str, object], init_from: str, seed: int, args: argparse.Namespace
) -> dict[str, object]:
  from uem_ich_jax.train import trainer

  config = _config(
      "classification_synthetic.py",
      data
      | {
          "seed": seed,
          "init_from": init_from,
          "data.patient_fraction": args.fraction,
          "data.patient_seed": seed,
          "data.batch_size": args.batch_size,
          "num_steps": args.cls_steps,
          "eval_every": args.cls_steps // 4,
          "checkpoint_every": args.cls_steps // 4,
          "log_every": 25,
          "optim.warmup_steps": max(1, args.cls_steps // 10),
      },
  )
  trainer.train(config, workdir)
  result = trainer.evaluate(workdir)
  return {
      "auc_any": result["classes"]["any"]["auc"],
      "auc_macro": result["auc"]["macro"],
      "step": result["step"],
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
  parser.add_argument("--fraction", type=float, default=0.1, help="labelled patients used")
  parser.add_argument("--num-scans", type=int, default=200)
  parser.add_argument("--num-slices", type=int, default=16)
  parser.add_argument("--image-size", type=int, default=96)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--ssl-steps", type=int, default=300)
  parser.add_argument("--cls-steps", type=int, default=150)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
  seeds = [int(seed) for seed in args.seeds.split(",")]
  start = time.perf_counter()

  data_dir = args.workdir / "tfds"
  data = {"data.data_dir": str(data_dir), "data.name": _build(data_dir, args)}
  encoder = _pretrain(args.workdir / "ssl", data, args)
  print(f"SSL encoder: {encoder} ({time.perf_counter() - start:.0f} s so far)", flush=True)

  rows = []
  for seed in seeds:
    for arm, init_from in (("ssl", str(encoder)), ("random", "random")):
      result = _classify(args.workdir / f"cls_{arm}_seed{seed}", data, init_from, seed, args)
      rows.append({"seed": seed, "init": arm, **result})
      print(f"seed {seed} {arm}: {result} ({time.perf_counter() - start:.0f} s so far)", flush=True)

  lines = ["| init | seed | test AUC any | test AUC macro |", "|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['init']} | {row['seed']} | {row['auc_any']:.3f} | {row['auc_macro']:.3f} |")
  for arm in ("ssl", "random"):
    values = [row for row in rows if row["init"] == arm]
    any_auc = np.array([row["auc_any"] for row in values], float)
    macro = np.array([row["auc_macro"] for row in values], float)
    lines.append(
        f"| {arm} | mean ± sd | {any_auc.mean():.3f} ± {any_auc.std(ddof=1) if len(any_auc) > 1 else 0:.3f}"
        f" | {macro.mean():.3f} ± {macro.std(ddof=1) if len(macro) > 1 else 0:.3f} |"
    )
  table = "\n".join(lines)
  print(table)
  elapsed = time.perf_counter() - start
  print(f"total {elapsed / 60:.1f} min")
  (args.workdir / "results.json").write_text(
      json.dumps({"args": vars(args) | {"workdir": str(args.workdir)}, "rows": rows,
                  "minutes": elapsed / 60}, indent=2)
      + "\n"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
