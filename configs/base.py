"""Defaults shared by every experiment; each experiment file starts from `get_config()`.

Not an experiment itself: launch one of the experiment files, for example

    uem-ich train --config=configs/classification_synthetic.py --workdir=/tmp/run
"""

import ml_collections

from uem_ich_jax.ct.volume import MAX_VOXELS


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "classification"  # one of uem_ich_jax.train.stages.STAGE_MODULES
  config.seed = 0  # parameters, shuffling, augmentation and dropout all derive from it

  # Devices: batch split over data x fsdp, parameters over fsdp; -1 fills.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.min_shard_size = 2**14  # arrays with fewer elements stay replicated
  # With fsdp > 1, the run stops before step 0 when more than this share of
  # the parameter bytes would be stored whole on every device.
  config.max_replicated_share = 0.1
  # Reuse the state's buffers for the updated state. Turn it off only for
  # debugging, because the old and new state are then both kept.
  config.donate = True
  # jax.distributed.initialize(): "on", "off", or "auto" to follow the environment
  # (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, UEM_ICH_NUM_PROCESSES); see
  # uem_ich_jax.train.mesh.maybe_initialize_distributed.
  config.distributed = "auto"

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_ich/slices"  # TFDS name/config, built with `uem-ich build-dataset`
  config.data.data_dir = ""  # TFDS data directory; empty: the TFDS default
  config.data.split = "train"
  config.data.num_folds = 5
  config.data.test_fold = 0  # the fold reported by `uem-ich evaluate`
  config.data.validation_fold = -1  # thresholds and best checkpoint; -1: test_fold + 1
  config.data.batch_size = 32  # global, over all processes and devices
  config.data.eval_batch_size = 32  # global; the last batch is padded, never dropped
  config.data.augment = True
  # After a rotation or zoom, take each slice's boxes from its warped mask, one
  # per 8-connected region of each class. Only for datasets whose boxes are made
  # that way (synthetic_ich). Otherwise boxes go around their warped corners.
  config.data.boxes_from_mask = False
  config.data.worker_count = 0  # grain worker processes per host
  # Train on the examples of this fraction of the training patients (seeded
  # by patient_seed, so every training seed uses the same patients).
  config.data.patient_fraction = 1.0
  config.data.patient_seed = 0
  # Largest scan `uem-ich predict` reads with this run, in voxels (slices x
  # rows x columns), checked from file headers before any pixel data is read.
  # The --max-voxels option overrides it.
  config.data.max_voxels = MAX_VOXELS

  config.model = ml_collections.ConfigDict()
  config.model.name = "convnext_v2"  # or "tiny_cnn" (smoke runs)
  config.model.variant = "atto"
  config.model.num_classes = 6
  config.model.head = "multitask"
  config.model.drop_path_rate = 0.1
  config.model.coordinate_attention_stages = (2, 3)
  config.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
  # Encoder activations the backward pass recomputes: "none", "block" (keep
  # each block's input only) or "block_dots" (also the matrix products).
  config.model.remat = "none"
  # Depthwise convolutions: "auto" (C++ kernels on CPU, lax.conv on
  # accelerators), "conv", "shifted" or "native". All take the same parameters
  # and give the same values up to rounding.
  config.model.depthwise = "auto"
  config.model.width = 8  # tiny_cnn only: channels of its first stage, doubling per stage
  config.model.depth = 2  # tiny_cnn only: stride-2 convolution stages
  config.model.pool = "avg"  # tiny_cnn only: "avg" or "avgmax" (average and max, concatenated)

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "focal"  # or "bce"
  config.loss.alpha = 0.25  # focal weight of positives (negatives get 1 - alpha); < 0: none
  config.loss.gamma = 2.0

  config.optim = ml_collections.ConfigDict()
  config.optim.encoder_lr = 1e-4  # peak learning rate of the encoder
  config.optim.head_lr = 1e-3  # peak learning rate of parameters under head_prefix
  config.optim.head_prefix = "head"
  config.optim.warmup_steps = 100
  config.optim.floor_fraction = 0.01  # the cosine ends at peak * floor_fraction, not 0
  config.optim.weight_decay = 0.05
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.clip_norm = 1.0  # global gradient norm; 0 turns clipping off
  config.optim.accumulate_steps = 1  # micro-batches per optimizer update

  config.eval = ml_collections.ConfigDict()
  config.eval.threshold_criterion = "f1"  # or "youden"; chosen on the validation fold

  config.num_steps = 2000  # train steps (micro-steps when accumulating)
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.image_every = 0  # stages that draw pictures: steps between them, plus one at the end; 0: none
  config.image_count = 8  # validation images in each picture
  config.keep_checkpoints = 2  # latest checkpoints kept, plus the best one
  config.best_metric = "val_auc_macro"  # empty: keep only the latest
  config.best_mode = "max"

  # Where the weights come from, stated explicitly: "random", a run's work
  # directory, or an encoder export such as SSL_WORKDIR/export/encoder (which
  # must cover every array outside the head). A missing or mismatched source is
  # an error, never a silent random start.
  config.init_from = "random"
  config.init_from_step = -1  # work directories only; -1: that run's best checkpoint
  config.init_from_prefixes = ("",)  # work directories only: paths to copy; "" copies all
  return config
