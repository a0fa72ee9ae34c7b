"""Compare a Flax module with the outputs of its PyTorch original, stored as a fixture.

A fixture folder contains `fixture.json` (the module kind, its sizes, and which
files are inputs, expected outputs and weights), the NCHW inputs and outputs as
.npy files, and the weights. Supported kinds: the timm ConvNeXt-V2 classifier,
the upstream encoder, the upstream SegFormer head and the upstream scan
aggregator. The aggregator's spatial output is compared only at real slices
(mask = 1), because padded slices' outputs carry no meaning. Usage:

  python experiments/check_parity.py ../shared/fixtures/timm_convnextv2_atto
  python experiments/check_parity.py ../shared/fixtures/upstream_aggregator
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uem_ich_jax import convert
from uem_ich_jax import models
from uem_ich_jax.errors import InputError
from uem_ich_jax.models import aggregator
from uem_ich_jax.models import segformer_head

ENCODER_KINDS = ("timm_convnextv2_classifier", "upstream_encoder")
SUPPORTED_KINDS = (*ENCODER_KINDS, "upstream_segformer_head", "upstream_aggregator")


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
      f"fixture kind {kind!r} is not an encoder kind; encoder kinds: {', '.join(ENCODER_KINDS)}"
  )


def _difference(folder: pathlib.Path, file_name: str, actual: np.ndarray, expected: np.ndarray) -> float:
  if actual.shape != expected.shape:
    raise InputError(f"{folder / file_name}: expected shape {expected.shape}, model gives {actual.shape}")
  return float(np.max(np.abs(actual.astype(np.float64) - expected)))


def _run_encoder(folder: pathlib.Path, spec: dict, weight_path: pathlib.Path) -> dict[str, float]:
  model, layout = _build_model(spec)
  convert.load_weights(model, weight_path, layout=layout)
  model.eval()

  image = _nchw_to_nhwc(_load_array(folder, spec["inputs"]["input"]))
  stage_maps = jax.jit(_forward)(model, image)

  differences = {}
  for name, file_name in spec["outputs"].items():
    expected = _load_array(folder, file_name)
    actual = np.asarray(stage_maps[name])
    if name.startswith("stage"):
      actual = _nhwc_to_nchw(actual)
    differences[name] = _difference(folder, file_name, actual, expected)
  return differences


def _forward(model: models.ConvNeXtV2, x: jax.Array) -> dict[str, jax.Array]:
  stages = model.features(x)
  outputs = {f"stage{index}": stage for index, stage in enumerate(stages)}
  if model.head is not None:
    outputs["logits"] = model.head(stages[-1])
  return outputs


def _run_segformer_head(folder: pathlib.Path, spec: dict, weight_path: pathlib.Path) -> dict[str, float]:
  head = segformer_head.SegFormerHead(
      spec["in_channels"], spec["embed_dim"], spec["num_classes"], rngs=nnx.Rngs(0)
  )
  segformer_head.load_torch_state(head, convert.read_state_dict(weight_path))
  head.eval()

  num_stages = len(spec["in_channels"])
  stage_maps = tuple(
      _nchw_to_nhwc(_load_array(folder, spec["inputs"][f"stage{index}"])) for index in range(num_stages)
  )
  target_size = tuple(spec["target_size"])

  @jax.jit
  def forward(head, stage_maps):
    main, aux = head(stage_maps, target_size)
    return {"main": main, **{f"aux{index}": logits for index, logits in enumerate(aux)}}

  outputs = forward(head, stage_maps)
  differences = {}
  for name, file_name in spec["outputs"].items():
    if name not in outputs:
      raise InputError(f"{folder}: fixture output {name!r} is not one of {sorted(outputs)}")
    actual = _nhwc_to_nchw(np.asarray(outputs[name]))
    differences[name] = _difference(folder, file_name, actual, _load_array(folder, file_name))
  return differences


def _run_aggregator(folder: pathlib.Path, spec: dict, weight_path: pathlib.Path) -> dict[str, float]:
  model = aggregator.ScanAggregator(
      spec["feature_dim"],
      spec["num_heads"],
      spec["num_layers"],
      spec["dim_feedforward"],
      spec["max_slices"],
      spec["spatial_size"],
      rngs=nnx.Rngs(0),
  )
  aggregator.load_torch_state(model, convert.read_state_dict(weight_path))
  model.eval()

  # (batch, slices, channels, height, width) to (batch, slices, height, width, channels)
  features = np.transpose(_load_array(folder, spec["inputs"]["features"]), (0, 1, 3, 4, 2))
  real = _load_array(folder, spec["inputs"]["slice_mask"]) > 0
  pooled, spatial = jax.jit(lambda model, x, mask: model(x, mask))(
      model, jnp.asarray(features), jnp.asarray(real)
  )

  outputs = spec["outputs"]
  differences = {}
  if "pooled" in outputs:
    expected = _load_array(folder, outputs["pooled"])
    differences["pooled"] = _difference(folder, outputs["pooled"], np.asarray(pooled), expected)
  if "spatial" in outputs:
    expected = _load_array(folder, outputs["spatial"])
    actual = np.transpose(np.asarray(spatial), (0, 1, 4, 2, 3))
    if actual.shape != expected.shape:
      raise InputError(
          f"{folder / outputs['spatial']}: expected shape {expected.shape}, model gives {actual.shape}"
      )
    # Padded slices' outputs carry no meaning, so only real slices are compared.
    differences["spatial"] = _difference(folder, outputs["spatial"], actual[real], expected[real])
  unknown = sorted(set(outputs) - {"pooled", "spatial"})
  if unknown:
    raise InputError(f"{folder}: unknown aggregator outputs {unknown}, expected pooled and spatial")
  return differences


_RUNNERS = {
    "timm_convnextv2_classifier": _run_encoder,
    "upstream_encoder": _run_encoder,
    "upstream_segformer_head": _run_segformer_head,
    "upstream_aggregator": _run_aggregator,
}


def run_fixture(folder: pathlib.Path, weights: str | None = None) -> dict[str, float]:
  """Run the Flax counterpart of a fixture and return output name -> max abs difference."""
  spec_path = folder / "fixture.json"
  if not spec_path.is_file():
    raise InputError(f"{spec_path}: not found; is {folder} a fixture folder?")
  try:
    spec = json.loads(spec_path.read_text())
  except json.JSONDecodeError as error:
    raise InputError(f"{spec_path}: invalid JSON: {error}") from error

  kind = spec.get("kind")
  if kind not in _RUNNERS:
    raise UnsupportedFixture(
        f"fixture kind {kind!r} is not supported yet; supported kinds: {', '.join(SUPPORTED_KINDS)}"
    )
  weight_name = weights or next((name for name in spec.get("weights", []) if name.endswith(".npz")), "params.npz")
  # GPUs default to TF32 for float32 matmuls and convs (about 1e-3 relative
  # error), which would hide real mismatches behind rounding.
  with jax.default_matmul_precision("highest"):
    return _RUNNERS[kind](folder, spec, folder / weight_name)


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
