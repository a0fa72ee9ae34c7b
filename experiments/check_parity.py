"""Compare a Flax module with the outputs of its PyTorch original, stored as a fixture.

A fixture folder contains `fixture.json` (the module kind, its sizes, and which
files are inputs, expected outputs and weights), the NCHW inputs and outputs as
.npy files, and the weights. Usage:

  python experiments/check_parity.py ../shared/fixtures/timm_convnextv2_atto
  python experiments/check_parity.py FIXTURE_DIR --weights params.npz --tolerance 1e-4

Prints `NAME max_abs_diff=VALUE` per output, then `max_abs_diff=VALUE` over all
of them. Exit status: 0 within the tolerance, 1 above it, 2 for an unsupported
kind or an unreadable folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import jax
import numpy as np

from uem_ich_jax import convert
from uem_ich_jax import models
from uem_ich_jax.errors import InputError

SUPPORTED_KINDS = ("timm_convnextv2_classifier", "upstream_encoder")


class UnsupportedFixture(Exception):
  """A fixture kind this script cannot run yet."""


def _load_array(folder: pathlib.Path, name: str) -> np.ndarray:
  path = folder / name
  if not path.is_file():
    raise InputError(f"{path}: file named in fixture.json not found")
  return np.load(path, allow_pickle=False)


def _nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 3, 1, 2))


def _build_model(spec: dict) -> tuple[models.ConvNeXtV2, str]:
  kind = spec.get("kind")
  if kind == "timm_convnextv2_classifier":
    model = models.build_convnext_v2(
        spec["variant"],
        num_classes=spec.get("num_classes", 1000),
        head="timm",
        coordinate_attention_stages=(),
    )
    return model, "timm"
  if kind == "upstream_encoder":
    model = models.build_convnext_v2(
        spec["variant"],
        head=None,
        coordinate_attention_stages=tuple(spec.get("coordinate_attention_stages", (2, 3))),
        coordinate_attention_reduction=spec.get("ca_reduction", 32),
        coordinate_attention_min_channels=spec.get("ca_min_channels", 8),
    )
    return model, "upstream"
  raise UnsupportedFixture(
      f"fixture kind {kind!r} is not supported yet; supported kinds: {', '.join(SUPPORTED_KINDS)}"
  )


def run_fixture(folder: pathlib.Path, weights: str | None = None) -> dict[str, float]:
  """Run the Flax counterpart of a fixture and return output name -> max abs difference."""
  spec_path = folder / "fixture.json"
  if not spec_path.is_file():
    raise InputError(f"{spec_path}: not found; is {folder} a fixture folder?")
  try:
    spec = json.loads(spec_path.read_text())
  except json.JSONDecodeError as error:
    raise InputError(f"{spec_path}: invalid JSON: {error}") from error

  model, layout = _build_model(spec)
  weight_name = weights or next((name for name in spec.get("weights", []) if name.endswith(".npz")), "params.npz")
  convert.load_weights(model, folder / weight_name, layout=layout)
  model.eval()

  image = _nchw_to_nhwc(_load_array(folder, spec["inputs"]["input"]))
  # GPUs default to TF32 for float32 matmuls and convs (about 1e-3 relative
  # error), which would hide real mismatches behind rounding.
  with jax.default_matmul_precision("highest"):
    stage_maps = jax.jit(_forward)(model, image)

  differences = {}
  for name, file_name in spec["outputs"].items():
    expected = _load_array(folder, file_name)
    actual = np.asarray(stage_maps[name])
    if name.startswith("stage"):
      actual = _nhwc_to_nchw(actual)
    if actual.shape != expected.shape:
      raise InputError(f"{folder / file_name}: expected shape {expected.shape}, model gives {actual.shape}")
    differences[name] = float(np.max(np.abs(actual.astype(np.float64) - expected)))
  return differences


def _forward(model: models.ConvNeXtV2, x: jax.Array) -> dict[str, jax.Array]:
  stages = model.features(x)
  outputs = {f"stage{index}": stage for index, stage in enumerate(stages)}
  if model.head is not None:
    outputs["logits"] = model.head(stages[-1])
  return outputs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("fixture_dir", type=pathlib.Path, help="fixture folder with fixture.json")
  parser.add_argument(
      "--weights",
      help="weight file inside the folder (default: the .npz that fixture.json lists, else params.npz)",
  )
  parser.add_argument(
      "--tolerance", type=float, default=1e-4, help="largest accepted absolute difference (default 1e-4)"
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

  try:
    differences = run_fixture(args.fixture_dir, args.weights)
  except UnsupportedFixture as error:
    print(f"{args.fixture_dir}: {error}", file=sys.stderr)
    return 2
  except (InputError, KeyError) as error:
    print(f"{args.fixture_dir}: cannot run the fixture: {error}", file=sys.stderr)
    return 2

  for name, difference in differences.items():
    print(f"{name} max_abs_diff={difference:.3e}")
  largest = max(differences.values())
  print(f"max_abs_diff={largest:.3e}")
  return 0 if largest <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
