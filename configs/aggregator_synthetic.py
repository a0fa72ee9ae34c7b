"""Scan-level labels from whole scans: the scan aggregator on the synthetic phantom scans.

Each example is one scan. The encoder (ConvNeXt-V2 with coordinate attention,
loaded from an encoder export) maps every slice to its stride-32 feature map,
the aggregator attends over the tokens of all slices, and the scan head gives
the six MBH scan labels. As upstream, the encoder is frozen by default
(`aggregator.freeze_encoder`, which needs `optim.encoder_lr` 0); set both to
fine-tune it. Build the scans, pretrain an encoder, then train and evaluate:

    uem-ich build-dataset synthetic_ich --config=scans --data-dir=/tmp/tfds
    uem-ich train --config=configs/aggregator_synthetic.py --workdir=/tmp/agg \
        --config.data.data_dir=/tmp/tfds --config.init_from=/tmp/ssl/export/encoder
    uem-ich evaluate --workdir=/tmp/agg

The 14 CQ500 labels: `--config.aggregator.label_set=cq500
--config.model.num_classes=14` on a dataset with a `cq500_labels` field.
Variants: `synthetic` (the default, sized for a CPU) and `smoke` (a few steps
of a small aggregator on the `scans` build above, for tests and for checking
a chain of runs; see the README). Data of another image size needs
`--config.model.image_size=N`.
"""

import importlib.util
import pathlib

import ml_collections

VARIANTS = ("synthetic", "smoke")


def _base():
  # configs/ is not a package: load its base file by path.
  path = pathlib.Path(__file__).with_name("base.py")
  spec = importlib.util.spec_from_file_location("uem_ich_configs_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "synthetic"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of aggregator_synthetic; use one of {VARIANTS}")
  config = _base().get_config()
  config.stage = "aggregator"
  config.data.name = "synthetic_ich/scans"
  config.data.augment = True
  # A batch of scans is padded to the smallest of these slice counts that fits
  # its longest scan. The largest must not exceed model.max_slices, and longer
  # scans are subsampled evenly to it.
  config.data.slice_buckets = (16, 32, 48, 64)

  config.aggregator = ml_collections.ConfigDict()
  config.aggregator.label_set = "mbh"  # "mbh": `labels` (6); "cq500": `cq500_labels` (14)
  config.aggregator.freeze_encoder = True  # eval mode, no gradient; needs optim.encoder_lr 0
  # Passes of the training scans that the frozen encoder encodes once, before
  # step 0; the steps then train on these tokens only. 0: encode every step.
  config.aggregator.cache_tokens = 0
  config.aggregator.cache_max_gib = 16.0  # reject a larger cache in host memory

  config.model.name = "convnext_v2"
  config.model.variant = "atto"
  config.model.head = None  # the scan model builds its own head
  config.model.num_classes = 6  # must match the label set
  config.model.drop_path_rate = 0.0
  config.model.coordinate_attention_stages = (2, 3)
  config.model.image_size = 128  # slice rows and columns; the token grid is image_size / 32
  config.model.max_slices = 64  # length of the positional encoding, as upstream
  # atto's 320 channels are projected to this width, which the 3D positional
  # encoding needs to be a multiple of 6; None keeps the encoder width.
  config.model.aggregator_dim = 192
  config.model.aggregator = ml_collections.ConfigDict()  # ScanAggregator keyword arguments
  config.model.aggregator.num_heads = 8
  config.model.aggregator.num_layers = 2
  config.model.aggregator.dim_feedforward = 384
  config.model.aggregator.dropout = 0.1
  # Memory options of ScanAggregator; these values are off and match the upstream.
  config.model.aggregator.attention_chunk = 0  # queries per attention chunk; 0: all at once
  config.model.aggregator.remat = False  # recompute each layer in the backward pass
  config.model.aggregator.token_pool = 1  # average-pool k x k tokens per slice first
  # "last": tokens from the last stage's stride-32 map, as upstream. "pyramid":
  # every stage max-pooled to that grid and concatenated, so small bleeds that
  # only the fine stages resolve reach the aggregator (see ScanModel).
  config.model.token_features = "last"
  config.model.scan_head_hidden_dim = None  # None: half the aggregator width, as upstream
  config.model.scan_head_dropout = 0.4

  # The upstream aggregator stage: AdamW 1e-4, weight decay 1e-4, frozen encoder.
  config.optim.encoder_lr = 0.0
  config.optim.head_lr = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.warmup_steps = 20

  config.data.batch_size = 4
  config.data.eval_batch_size = 8
  config.num_steps = 400
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint_every = 100
  config.best_metric = "val_auc_macro"
  config.best_mode = "max"

  if variant == "smoke":
    # "auto" runs the C++ kernels on CPU, which XLA compiles as a plain call
    # and which run fastest there. Smoke runs are mostly compilation.
    config.model.depthwise = "auto"
    config.data.augment = False
    config.data.slice_buckets = (4, 8)
    # The image size of the `scans` build; longer scans are subsampled to max_slices.
    config.model.image_size = 128
    config.model.max_slices = 8
    config.model.aggregator_dim = 48
    config.model.aggregator.num_heads = 4
    config.model.aggregator.num_layers = 1
    config.model.aggregator.dim_feedforward = 64
    config.optim.head_lr = 1e-3
    config.optim.warmup_steps = 1
    config.data.batch_size = 2
    config.data.eval_batch_size = 4
    config.num_steps = 4
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint_every = 2
  return config
