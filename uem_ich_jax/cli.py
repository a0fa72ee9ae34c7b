"""The `uem-ich` command."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from uem_ich_jax.errors import PREEMPTED_EXIT_CODE
from uem_ich_jax.errors import InputError
from uem_ich_jax.errors import TrainingPreempted


def _inspect(args: argparse.Namespace) -> int:
  from uem_ich_jax.ct import inspect as ct_inspect

  report = ct_inspect.inspect_path(args.path, series_uid=args.series)
  json.dump(report, sys.stdout, indent=2)
  sys.stdout.write("\n")
  return 0


def _build_dataset(args: argparse.Namespace) -> int:
  from uem_ich_jax.datasets import build

  build.build_dataset(
      args.name,
      data_dir=args.data_dir,
      manual_dir=args.manual_dir,
      config=args.config,
      overwrite=args.overwrite,
  )
  return 0


def _build_dataset_help(parser: argparse.ArgumentParser) -> str:
  # The dataset list imports every builder (and TFDS), so it is made only
  # when help is shown, not each time `uem-ich` starts.
  from uem_ich_jax.datasets import build

  return argparse.ArgumentParser.format_help(parser) + "\n" + build.describe_datasets() + "\n"


def _train(args: argparse.Namespace) -> int:
  from uem_ich_jax.train import config_file, trainer

  config = config_file.load(args.config, args.overrides)
  try:
    summary = trainer.train(config, args.workdir)
  except trainer.NonFiniteLossError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  json.dump(summary, sys.stdout, indent=2)
  sys.stdout.write("\n")
  return 0


def _evaluate(args: argparse.Namespace) -> int:
  from uem_ich_jax.train import trainer

  if args.config is not None or args.folds is not None:
    return _evaluate_folds(args)
  result = trainer.evaluate(args.workdir, step=args.step, output=args.output)
  # The headline of each stage's result; the full result is in the JSON file.
  keys = ("step", "folds", "n_test", "headline")
  summary = {key: result[key] for key in keys if key in result}
  json.dump(summary, sys.stdout, indent=2)
  sys.stdout.write("\n")
  return 0


def _evaluate_folds(args: argparse.Namespace) -> int:
  from uem_ich_jax.evaluate import kfold
  from uem_ich_jax.train import config_file, trainer

  if args.config is None or args.folds is None:
    raise InputError("--folds and --config go together: `uem-ich evaluate --config=FILE.py"
                     " --folds=K --workdir=OUT` trains and scores one run per fold")
  for option in ("step", "output"):
    if getattr(args, option) is not None:
      raise InputError(f"--{option} applies to one run (`uem-ich evaluate --workdir=RUN`),"
                       " not to a k-fold evaluation with --config and --folds")
  config = config_file.load(args.config, args.overrides)
  try:
    kfold.run_kfold(config, args.workdir, folds=args.folds)
  except trainer.NonFiniteLossError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  table = pathlib.Path(args.workdir) / kfold.MARKDOWN_FILE
  if table.is_file():  # Only process 0 writes it.
    sys.stdout.write(table.read_text())
  return 0


def _export_encoder(args: argparse.Namespace) -> int:
  from uem_ich_jax.train import trainer

  path = trainer.export_encoder(args.workdir, step=args.step, output=args.output)
  print(path)
  return 0


def _export_serving(args: argparse.Namespace) -> int:
  from uem_ich_jax.infer import export

  manifest = export.export_run(
      args.run_dir,
      args.out_dir,
      step=args.step,
      aggregator_dir=args.aggregator,
      aggregator_step=args.aggregator_step,
      platforms=args.platforms,
  )
  files = [manifest["slice_model"]["file"]]
  if manifest["aggregator"] is not None:
    files.append(manifest["aggregator"]["file"])
  print(
      f"exported step {manifest['source']['step']} of {args.run_dir} for"
      f" {','.join(manifest['platforms'])}: wrote {', '.join(files)} and manifest.json to"
      f" {args.out_dir}"
  )
  return 0


def _predict(args: argparse.Namespace) -> int:
  from uem_ich_jax.infer import predict

  if args.batch or args.input.lower().endswith(".csv"):
    return _predict_batch(args)
  report = predict.predict(
      args.checkpoint,
      args.input,
      args.output,
      step=args.step,
      series_uid=args.series,
      batch_size=args.batch_size,
      aggregator_dir=args.aggregator,
      aggregator_step=args.aggregator_step,
      max_voxels=args.max_voxels,
  )
  choice = report.get("series_choice")
  if choice is not None and choice["series_candidates"]:
    print(
        f"series: {choice['chosen']['series_uid']} ({choice['chosen_by']}); the other"
        f" {len(choice['series_candidates'])} are listed in report.json under series_choice"
    )
  scan = report["scan"]["any"]
  verdict = "positive" if scan["positive"] else "negative"
  print(
      f"any: {verdict} (max slice probability {_number(scan['max_probability'])} at slice"
      f" {scan['slice']}, threshold {_number(scan['threshold'])})"
  )
  if "segmentation" in report:
    print(f"blood: {_number(report['segmentation']['volume_ml']['any'], 1)} mL")
  aggregator = report.get("aggregator")
  if aggregator is not None:
    first = aggregator["labels"][0]
    scan_label = aggregator["scan"][first]
    scan_verdict = "positive" if scan_label["positive"] else "negative"
    print(
        f"scan {first} (aggregator): {scan_verdict} (probability"
        f" {_number(scan_label['probability'])}, threshold {_number(scan_label['threshold'])})"
    )
  if "timings_s" in report:
    print(f"took {_number(report['timings_s']['total'], 1)} s")
  files = report.get("outputs", {"report": "report.json", "overview": "overview.png"})
  print(f"wrote {', '.join(files.values())} to {args.output}")
  return 0


def _predict_batch(args: argparse.Namespace) -> int:
  from uem_ich_jax.infer import batch

  if args.series is not None:
    raise InputError(
        "--series-uid applies to one scan; in a batch, give each study's series in the CSV"
        " column `series_uid`"
    )
  if args.batch:
    studies = batch.discover_studies(args.input)
  else:
    studies = batch.studies_from_csv(args.input)
  result = batch.run_batch(
      args.checkpoint,
      studies,
      args.output,
      step=args.step,
      batch_size=args.batch_size,
      aggregator_dir=args.aggregator,
      aggregator_step=args.aggregator_step,
      max_voxels=args.max_voxels,
  )
  print(
      f"{len(result.rows)} studies: {len(result.rows) - result.failed} ok ({result.skipped}"
      f" finished before), {result.failed} failed; summary in {result.summary_path}"
  )
  return 1 if result.failed else 0


def _positive_int(text: str) -> int:
  """Parse a whole number >= 1 for argparse (underscores allowed, as in 2_000_000)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"invalid number {text!r}; expected a whole number >= 1"
    ) from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is invalid; expected a whole number >= 1")
  return value


def _number(value: float | None, digits: int = 3) -> str:
  """Format a report number; the report stores a NaN or infinite value as None."""
  return "undefined" if value is None else f"{value:.{digits}f}"


def _quickstart(args: argparse.Namespace) -> int:
  from uem_ich_jax import quickstart

  quickstart.run(args.workdir, scans=args.scan, smoke=args.smoke)
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="uem-ich",
      description="UEM-ICH in JAX: read head CT, build datasets, train and run the model.",
  )
  parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
  commands = parser.add_subparsers(dest="command", required=True)

  inspect = commands.add_parser(
      "inspect", help="read a DICOM series or NIfTI file and print what was read as JSON"
  )
  inspect.add_argument("path", help="DICOM folder, DICOM file, or NIfTI file")
  inspect.add_argument(
      "--series", default=None, help="SeriesInstanceUID to read when the folder contains several"
  )
  inspect.set_defaults(run=_inspect)

  build = commands.add_parser(
      "build-dataset", help="build a TFDS dataset as array_record (no TensorFlow needed)"
  )
  build.add_argument(
      "name", help="dataset name, or NAME/CONFIG (for example rsna_ich/slices); listed below"
  )
  build.add_argument("--data-dir", required=True, help="TFDS data directory to write to")
  build.add_argument(
      "--manual-dir", default=None, help="folder holding the manually downloaded release"
  )
  build.add_argument(
      "--config",
      default=None,
      help="builder config name (listed below); when omitted, the configs marked * are built",
  )
  build.add_argument(
      "--overwrite",
      action="store_true",
      help="delete a config already built in --data-dir (its NAME/CONFIG/VERSION folder only)"
      " and build it again; without it an existing build is reused",
  )
  build.format_help = lambda: _build_dataset_help(build)
  build.set_defaults(run=_build_dataset)

  train = commands.add_parser(
      "train",
      help="train a stage from a config file; resumes when the work directory contains checkpoints",
      epilog="Each --config.KEY=VALUE (with the =) overrides that field of the config.",
  )
  train.add_argument(
      "--config", required=True, help="experiment file and optional argument: FILE.py[:ARG]"
  )
  train.add_argument("--workdir", required=True, help="folder for checkpoints, logs and config")
  train.set_defaults(run=_train)

  evaluate = commands.add_parser(
      "evaluate",
      help="score a trained run on its test fold, thresholds chosen on its validation fold;"
      " with --config and --folds, train and score one run per fold",
      epilog="With --config, each --config.KEY=VALUE (with the =) overrides that field of the"
      " config. A k-fold evaluation writes kfold_results.md, kfold_results.csv,"
      " kfold_summary.json, roc.png and calibration.png to --workdir, one run per fold in"
      " WORKDIR/fold_<k>; rerunning it skips finished folds and resumes the others.",
  )
  evaluate.add_argument(
      "--workdir",
      required=True,
      help="work directory of a `uem-ich train` run; with --folds, the folder for all fold runs",
  )
  evaluate.add_argument(
      "--config",
      default=None,
      help="k-fold: experiment file and optional argument, FILE.py[:ARG]; needs --folds",
  )
  evaluate.add_argument(
      "--folds",
      type=int,
      default=None,
      help="k-fold: report test folds 0..K-1 (K at least 3, at most config.data.num_folds);"
      " fold k is validated on fold k+1 (mod config.data.num_folds)",
  )
  evaluate.add_argument(
      "--step", type=int, default=None, help="checkpoint step; the best checkpoint when omitted"
  )
  evaluate.add_argument(
      "--output", default=None, help="results JSON; default WORKDIR/eval_step<N>_fold<K>.json"
  )
  evaluate.set_defaults(run=_evaluate)

  export = commands.add_parser(
      "export-encoder",
      help="write the encoder of a pretraining run to WORKDIR/export/encoder, for init_from",
  )
  export.add_argument("--workdir", required=True, help="work directory of a pretraining run")
  export.add_argument(
      "--step", type=int, default=None, help="checkpoint step; the best checkpoint when omitted"
  )
  export.add_argument(
      "--output", default=None, help="export folder; default WORKDIR/export/encoder (replaced)"
  )
  export.set_defaults(run=_export_encoder)

  export_serving = commands.add_parser(
      "export",
      help="export a multitask run (and an aggregator run) as jax.export programs with a"
      " manifest, for serving without the training code (uem_ich_jax.infer.serve)",
  )
  export_serving.add_argument("run_dir", help="work directory of a multitask run")
  export_serving.add_argument(
      "out_dir", help="folder for manifest.json and the .stablehlo programs (files replaced)"
  )
  export_serving.add_argument(
      "--step", type=int, default=None, help="checkpoint step; the best checkpoint when omitted"
  )
  export_serving.add_argument(
      "--aggregator", default=None, help="work directory of an aggregator run, for scan labels"
  )
  export_serving.add_argument(
      "--aggregator-step",
      type=int,
      default=None,
      help="checkpoint step of the aggregator run; its best checkpoint when omitted",
  )
  export_serving.add_argument(
      "--platforms",
      default="cpu",
      help="comma-separated platforms to lower for: cpu, cuda, rocm, tpu (default cpu)",
  )
  export_serving.set_defaults(run=_export_serving)

  predict = commands.add_parser(
      "predict",
      help="run a trained classification or multitask run on every slice of a scan; writes"
      " report.json and overview.png, and with a multitask run segmentation.nii.gz,"
      " report.html and, for DICOM input, segmentation.dcm (DICOM SEG)",
  )
  predict.add_argument(
      "input",
      help="DICOM folder or file, or NIfTI file; a .csv file of studies (columns input, id,"
      " series_uid) for a batch; with --batch, a folder tree of studies",
  )
  predict.add_argument(
      "--batch",
      action="store_true",
      help="treat INPUT as a folder tree: each NIfTI file, and each folder without subfolders"
      " that contains DICOM files, is one study",
  )
  predict.add_argument(
      "--checkpoint",
      required=True,
      help="work directory of a `uem-ich train` run of the classification or multitask stage",
  )
  predict.add_argument(
      "--output",
      required=True,
      help="folder for report.json, overview.png and, with a multitask run, segmentation.nii.gz,"
      " report.html and segmentation.dcm; in a batch, one such folder per study and summary.csv",
  )
  predict.add_argument(
      "--step", type=int, default=None, help="checkpoint step; the best checkpoint when omitted"
  )
  predict.add_argument(
      "--series-uid",
      "--series",
      dest="series",
      metavar="UID",
      default=None,
      help="SeriesInstanceUID to read; by default a folder with several series is read by the"
      " CQ500 rule (the non-contrast axial soft-tissue series nearest 5 mm)",
  )
  predict.add_argument(
      "--aggregator",
      default=None,
      help="work directory of an aggregator run, for scan labels (multitask --checkpoint only)",
  )
  predict.add_argument(
      "--aggregator-step",
      type=int,
      default=None,
      help="checkpoint step of the aggregator run; its best checkpoint when omitted",
  )
  predict.add_argument(
      "--batch-size",
      type=_positive_int,
      default=None,
      help="slices per model call; default 32 for classification runs, 8 for multitask runs",
  )
  predict.add_argument(
      "--max-voxels",
      type=_positive_int,
      default=None,
      metavar="N",
      help="largest scan to read, in voxels (slices x rows x columns), checked from the file"
      " headers before any pixel data is read; default: the run's config.data.max_voxels,"
      " or 2**31 for runs saved without it",
  )
  predict.set_defaults(run=_predict)

  quickstart = commands.add_parser(
      "quickstart",
      help="build synthetic data, train, evaluate on held-out patients and predict, in one go",
  )
  quickstart.add_argument(
      "--workdir", required=True, help="folder for the data, the run and the results"
  )
  quickstart.add_argument(
      "--scan",
      action="append",
      default=[],
      help="DICOM folder to predict on after training; repeat for several",
  )
  quickstart.add_argument(
      "--smoke", action="store_true", help="tiny data and model (seconds; for tests)"
  )
  quickstart.set_defaults(run=_quickstart)
  return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  # `--config.key=value` overrides are not argparse options; take them out first.
  overrides = [arg for arg in argv if arg.startswith("--config.")]
  rest = [arg for arg in argv if not arg.startswith("--config.")]
  return rest, overrides


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = _split_overrides(argv)
  args = _parser().parse_args(argv)
  args.overrides = overrides
  takes_overrides = args.command == "train" or (
      args.command == "evaluate" and args.config is not None
  )
  if overrides and not takes_overrides:
    print(
        f"error: {overrides[0]}: config overrides apply to `uem-ich train` and"
        " `uem-ich evaluate --config` only",
        file=sys.stderr,
    )
    return 2
  logging.basicConfig(
      level=logging.DEBUG if args.verbose else logging.INFO,
      format="%(levelname)s %(name)s: %(message)s",
  )
  # TFDS or absl may have configured the root logger already, which makes
  # basicConfig a no-op. So the project's own level is set here as well.
  logging.getLogger("uem_ich_jax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
  if not args.verbose:
    # Orbax logs every save and restore through absl at INFO.
    logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    return args.run(args)
  except InputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except TrainingPreempted as error:
    print(str(error), file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  except KeyboardInterrupt:
    # Builds and training runs write to temporary paths first, so what was
    # completed is kept and the same command resumes or rebuilds.
    print(f"interrupted: uem-ich {args.command} stopped", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
