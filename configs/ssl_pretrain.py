"""Self-supervised pretraining of the encoder: SparK sparse masking plus a GLCM texture loss.

The encoder (ConvNeXt-V2 with coordinate attention) receives only the visible
32x32 cells of each slice, and a light UNet decoder reconstructs the masked cells.
The loss is the masked MSE plus `ssl.glcm_weight` times the distance between
the GLCM texture features of reconstruction and input over the masked cells.
No labels are read. At the end the encoder is written to WORKDIR/export/encoder,
where supervised configs pick it up:

    uem-ich build-dataset synthetic_ich --config=slices --data-dir=/tmp/tfds
    uem-ich train --config=configs/ssl_pretrain.py:synthetic --workdir=/tmp/ssl \
        --config.data.data_dir=/tmp/tfds
    uem-ich train --config=configs/classification_synthetic.py --workdir=/tmp/cls \
        --config.data.data_dir=/tmp/tfds --config.init_from=/tmp/ssl/export/encoder

Variants: `synthetic` (the phantom slices, sized for a CPU), `rsna` (RSNA 2019
slices at 384 px, for accelerators; needs the RSNA dataset built first),
`smoke` (a few steps on tiny data, for tests). Reconstruction pictures go to
WORKDIR/images every `image_every` steps and at the end.
"""

import importlib.util
import pathlib

import ml_collections

VARIANTS = ("synthetic", "rsna", "smoke")


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
    raise ValueError(f"unknown variant {arg!r} of ssl_pretrain; use one of {VARIANTS}")
  config = _base().get_config()
  config.stage = "ssl_pretrain"
  config.data.name = "synthetic_ich/slices"
  config.data.augment = True

  config.model.name = "convnext_v2"
  config.model.variant = "atto"
  config.model.head = None
  config.model.drop_path_rate = 0.0
  config.model.coordinate_attention_stages = (2, 3)
  config.model.decoder_width = 128  # SparK uses 768 with ConvNeXt-S/B

  config.ssl = ml_collections.ConfigDict()
  config.ssl.mask_ratio = 0.75  # fraction of 32x32 cells hidden from the encoder
  config.ssl.norm_pix_loss = True  # per-cell normalised targets, as SparK
  config.ssl.glcm_weight = 0.1  # lambda of the texture term; 0 turns it off
  config.ssl.glcm_distances = (1, 2, 4)
  config.ssl.glcm_angles = (0, 45, 90, 135)  # degrees
  config.ssl.glcm_levels = 16  # bins of the soft joint histogram (energy)

  # One learning rate for encoder and decoder. With head_prefix "decoder", the
  # densify/ arrays (per-scale norms, mask tokens, projections) follow encoder_lr.
  config.optim.encoder_lr = 1e-3
  config.optim.head_lr = 1e-3
  config.optim.head_prefix = "decoder"
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.04
  config.optim.clip_norm = 5.0
  config.optim.warmup_steps = 100

  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  config.num_steps = 2000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.image_every = 500
  config.best_metric = "val_loss"
  config.best_mode = "min"

  if variant == "rsna":
    # TODO: the RSNA 2019 builder does not exist yet. Until it does, training
    # stops at the start with an error that names the missing dataset and the
    # builders that exist.
    config.data.name = "rsna_ich/slices"
    config.model.dtype = "bfloat16"
    config.model.decoder_width = 512
    config.data.batch_size = 256
    config.data.eval_batch_size = 256
    config.optim.encoder_lr = 4e-4 * config.data.batch_size / 256
    config.optim.head_lr = config.optim.encoder_lr
    config.optim.warmup_steps = 2000
    config.num_steps = 100_000
    config.eval_every = 5000
    config.checkpoint_every = 5000
    config.image_every = 5000
  elif variant == "smoke":
    # "auto" runs the C++ kernels on CPU, which XLA compiles as a plain call
    # and which run fastest there. Smoke runs are mostly compilation.
    config.model.depthwise = "auto"
    config.model.decoder_width = 32
    config.data.augment = False
    config.data.batch_size = 4
    config.data.eval_batch_size = 8
    config.num_steps = 4
    config.optim.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint_every = 2
    config.image_every = 2
    config.image_count = 2
  return config
