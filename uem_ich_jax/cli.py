"""The `uem-ich` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from uem_ich_jax.errors import InputError


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
  )
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
      "--series", default=None, help="SeriesInstanceUID to read when the folder holds several"
  )
  inspect.set_defaults(run=_inspect)

  build = commands.add_parser(
      "build-dataset", help="build a TFDS dataset as array_record (no TensorFlow needed)"
  )
  build.add_argument("name", help="dataset name, for example synthetic_ich")
  build.add_argument("--data-dir", required=True, help="TFDS data directory to write to")
  build.add_argument(
      "--manual-dir", default=None, help="folder holding the manually downloaded release"
  )
  build.add_argument(
      "--config", default=None, help="builder config name; every config when omitted"
  )
  build.set_defaults(run=_build_dataset)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(
      level=logging.DEBUG if args.verbose else logging.INFO,
      format="%(levelname)s %(name)s: %(message)s",
  )
  try:
    return args.run(args)
  except InputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
