"""Joint training of slice classification, segmentation and detection on the phantom slices.

One ConvNeXt-V2 encoder with the classification head at the root, the
SegFormer segmentation head and, with `multitask.detection`, the FCOS
detection head on the segmentation neck. Start from the pretrained encoder:

    uem-ich build-dataset synthetic_ich --config=slices --data-dir=/tmp/tfds
    uem-ich train --config=configs/ssl_pretrain.py --workdir=/tmp/ssl \
        --config.data.data_dir=/tmp/tfds
    uem-ich train --config=configs/multitask_synthetic.py --workdir=/tmp/multitask \
        --config.data.data_dir=/tmp/tfds --config.init_from=/tmp/ssl/export/encoder
    uem-ich evaluate --workdir=/tmp/multitask

Variants: `synthetic` (default) and `smoke` (a few steps on tiny data, for
tests). `--config.multitask.schedule=alternating` gives the upstream schedule
(a segmentation or a classification step, weights ramping from 0.8/0.2 to
0.5/0.5); `--config.multitask.detection=True` adds the detection head and its
loss.
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
    raise ValueError(f"unknown variant {arg!r} of multitask_synthetic; use one of {VARIANTS}")
  config = _base().get_config()
  config.stage = "multitask"
  config.data.name = "synthetic_ich/slices"
  config.data.augment = True
  config.data.boxes_from_mask = True  # the phantom's boxes are its mask's regions

  config.multitask = ml_collections.ConfigDict()
  config.multitask.schedule = "mixed"  # or "alternating" (the upstream schedule)
  # mixed: weight of each task loss in the sum.
  config.multitask.weights = ml_collections.ConfigDict(
      {"classification": 1.0, "segmentation": 1.0, "detection": 1.0}
  )
  # alternating: chance of a segmentation step; (segmentation, classification)
  # weights at the first and last step, linear in between.
  config.multitask.segmentation_probability = 0.5
  config.multitask.ramp_start = (0.8, 0.2)
  config.multitask.ramp_end = (0.5, 0.5)
  config.multitask.detection = False  # FCOS head on the segmentation neck, and its loss
  # Segmentation loss: focal_weight * focal CE + dice_weight * (1 - soft Dice),
  # deep-supervision outputs of the four stages added with aux_weights.
  config.multitask.focal_weight = 0.2
  config.multitask.dice_weight = 0.8
  config.multitask.aux_weights = (0.4, 0.3, 0.2, 0.1)
  config.multitask.focal_alpha = 0.75  # one constant scale for every class
  config.multitask.focal_gamma = 2.0
  config.multitask.dice_epsilon = 1.0  # added to numerator and denominator of the batch Dice
  config.multitask.detection_alpha = 0.25
  config.multitask.detection_gamma = 2.0
  config.multitask.center_radius = 1.5  # FCOS centre sampling radius, in strides
  config.multitask.score_threshold = 0.05  # detections below this score are dropped
  config.multitask.max_detections = 20  # per slice, after NMS
  config.multitask.min_volume_ml = 1.0  # relative volume error counts scans above this (mL)

  config.model.name = "convnext_v2"
  config.model.variant = "atto"
  config.model.head = "multitask"
  config.model.drop_path_rate = 0.1
  config.model.coordinate_attention_stages = (2, 3)
  config.model.segmentation_classes = 6  # background + five subtypes; 1 for a binary head
  config.model.embed_dim = 64  # SegFormer neck width; the upstream uses 256
  # True: classify at stride 4 and upsample the logits (faster on CPUs, not
  # the upstream order, so upstream head weights give different outputs).
  config.model.classify_at_stride4 = False
  # The model builder reads config.model only; this follows multitask.detection.
  config.model.detection = config.multitask.get_ref("detection")

  config.optim.encoder_lr = 5e-4
  config.optim.head_lr = 1e-3
  config.optim.head_prefix = "head"  # every head, and the schedule state, lives under head*
  config.optim.warmup_steps = 100

  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  config.num_steps = 2000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.best_metric = "val_dice_3d"
  config.best_mode = "max"

  if variant == "smoke":
    # "auto" runs the C++ kernels on CPU, which XLA compiles as a plain call
    # and which run fastest there. Smoke runs are mostly compilation.
    config.model.depthwise = "auto"
    config.model.embed_dim = 16
    config.model.drop_path_rate = 0.0
    config.model.classify_at_stride4 = True
    config.data.augment = False
    config.data.batch_size = 4
    config.data.eval_batch_size = 8
    config.num_steps = 4
    config.optim.warmup_steps = 1
    config.log_every = 2
    config.eval_every = 2
    config.checkpoint_every = 2
  return config
