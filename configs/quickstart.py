"""The quickstart: slice classification on a small synthetic_ich build, sized for a laptop CPU.

`uem-ich quickstart --workdir=DIR` builds the dataset that `config.dataset`
describes into DIR/tfds, trains this config in DIR/train, evaluates and
predicts. The same run by hand:

    uem-ich train --config=configs/quickstart.py --workdir=DIR/train \
        --config.data.data_dir=DIR/tfds

(after building the dataset, which only the quickstart can do for a custom
size). `:smoke` is a tiny CNN on a tiny build, for the end-to-end test.

The quickstart reads `config.dataset` to build the data, and `uem-ich predict`
reads its image size and field of view to build the model input. The trainer
ignores it.
"""

import importlib.util
import pathlib

import ml_collections


def _base():
  # configs/ is not a package: load its base file by path.
  path = pathlib.Path(__file__).with_name("base.py")
  spec = importlib.util.spec_from_file_location("uem_ich_configs_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _dataset(**fields) -> ml_collections.ConfigDict:
  dataset = ml_collections.ConfigDict()
  dataset.num_scans = 200
  dataset.num_slices = 24
  dataset.image_size = 64
  dataset.field_of_view_mm = 230.0
  dataset.coverage_mm = 120.0
  dataset.num_folds = 5
  dataset.seed = 0
  dataset.followup_every = 3
  dataset.update(fields)
  return dataset


def dataset_config_name(dataset: ml_collections.ConfigDict) -> str:
  """Name the TFDS config of a build after every field that changes the data."""
  name = (
      f"slices_qs_n{dataset.num_scans}_z{dataset.num_slices}_px{dataset.image_size}"
      f"_fov{dataset.field_of_view_mm:g}_cov{dataset.coverage_mm:g}_k{dataset.num_folds}"
      f"_s{dataset.seed}_f{dataset.followup_every}"
  )
  return name.replace(".", "p")  # TFDS config names take no dots.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _base().get_config()
  config.stage = "classification"

  config.dataset = _dataset(num_scans=300, image_size=96)
  # TinyCNN, because ConvNeXt-V2 atto (64 px, no coordinate attention) ran at
  # about 1 step/s on a 2-core CPU and reached a validation AUC for `any` of
  # only 0.63 after 260 steps, too slow for a 15-minute quickstart.
  # Four stages with average and max pooling reached a held-out slice AUC for
  # `any` of 0.982 in 5.3 minutes on 2 CPU cores (dataset already built). The
  # two-stage, average-pooled TinyCNN reached 0.92 in 3200 steps. 3200 steps
  # of this model gave 0.984, so 1600 steps is close to its plateau. Since the
  # phantom draws the CQ500 findings too (synthetic_ich 1.1.0), the same run
  # reached 0.968 in 5.7 minutes from a fresh install. On the phantom of
  # December 2026 it reached 0.957 in 5 minutes, and a rerun gave the same.
  # On 5 December 2026, from a fresh clone at c7a4448, it reached 0.953 in
  # 11.5 minutes while the test suite shared the 2 cores.
  # TODO: find which change of that day moved 0.957 to 0.953; this model has
  # no depthwise convolution and the phantom's images did not change.
  config.model.name = "tiny_cnn"
  config.model.width = 32
  config.model.depth = 4
  config.model.pool = "avgmax"
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.optim.encoder_lr = 3e-3
  config.optim.head_lr = 3e-3
  config.optim.warmup_steps = 50
  config.num_steps = 1600
  config.log_every = 100
  config.eval_every = 400
  config.checkpoint_every = 400

  if arg == "smoke":
    config.dataset = _dataset(num_scans=10, num_slices=4, image_size=32, followup_every=0)
    config.model.name = "tiny_cnn"
    config.model.width = 8
    config.model.depth = 2
    config.model.pool = "avg"
    config.data.batch_size = 8
    config.data.eval_batch_size = 16
    config.data.augment = False
    config.num_steps = 4
    config.optim.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint_every = 2
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of quickstart; use '' or 'smoke'")
  config.data.name = f"synthetic_ich/{dataset_config_name(config.dataset)}"
  return config
