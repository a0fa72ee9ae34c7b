"""The quickstart: slice classification on a small synthetic_ich build, sized for a laptop CPU.

`uem-ich quickstart --workdir=DIR` builds the dataset that `config.dataset`
describes into DIR/tfds, trains this config in DIR/train, evaluates and
predicts. The same run by hand:

    uem-ich train --config=configs/quickstart.py --workdir=DIR/train \
        --config.data.data_dir=DIR/tfds

(after building the dataset, which only the quickstart can do for a custom
size). `:smoke` is a tiny CNN on a tiny build, for the end-to-end test.

`config.dataset` is read by the quickstart (to build the data) and by
`uem-ich predict` (image size and field of view of the model input); the
trainer ignores it.
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
  """The TFDS config name of a build: every field that changes the data is in it."""
  name = (
      f"slices_qs_n{dataset.num_scans}_z{dataset.num_slices}_px{dataset.image_size}"
      f"_fov{dataset.field_of_view_mm:g}_cov{dataset.coverage_mm:g}_k{dataset.num_folds}"
      f"_s{dataset.seed}_f{dataset.followup_every}"
  )
  return name.replace(".", "p")  # TFDS config names take no dots.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _base().get_config()
  config.stage = "classification"

  config.dataset = _dataset()
  config.model.name = "convnext_v2"
  config.model.variant = "atto"
  config.model.drop_path_rate = 0.0
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.optim.encoder_lr = 1e-3
  config.optim.head_lr = 1e-3
  config.optim.warmup_steps = 50
  config.num_steps = 600
  config.log_every = 25
  config.eval_every = 150
  config.checkpoint_every = 150

  if arg == "smoke":
    config.dataset = _dataset(num_scans=10, num_slices=4, image_size=32, followup_every=0)
    config.model.name = "tiny_cnn"
    config.model.width = 8
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
