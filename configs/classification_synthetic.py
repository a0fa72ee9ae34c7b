"""Slice classification (any + five subtypes) on the synthetic phantom dataset.

Build the data, then train and evaluate:

    uem-ich build-dataset synthetic_ich --config=slices --data-dir=/tmp/tfds
    uem-ich train --config=configs/classification_synthetic.py \
        --workdir=/tmp/cls --config.data.data_dir=/tmp/tfds
    uem-ich evaluate --workdir=/tmp/cls

`:smoke` gives a tiny CNN and a few steps (seconds on a CPU):

    uem-ich train --config=configs/classification_synthetic.py:smoke \
        --workdir=/tmp/cls_smoke --config.data.data_dir=/tmp/tfds

To start from a pretrained encoder (configs/ssl_pretrain.py), add
`--config.init_from=SSL_WORKDIR/export/encoder`.
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _base().get_config()
  config.stage = "classification"
  config.data.name = "synthetic_ich/slices"

  config.model.name = "convnext_v2"
  config.model.variant = "atto"
  config.data.batch_size = 32
  config.num_steps = 2000
  config.optim.warmup_steps = 100

  if arg == "smoke":
    config.model.name = "tiny_cnn"
    config.model.width = 8
    config.data.batch_size = 8
    config.data.eval_batch_size = 16
    config.data.augment = False
    config.num_steps = 6
    config.optim.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 3
    config.checkpoint_every = 3
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of classification_synthetic; use '' or 'smoke'")
  return config
