"""The aggregator stage: scan batches padded to slice buckets, the scan model, losses and runs."""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import uem_ich_jax
from uem_ich_jax.data import augment
from uem_ich_jax.data import pipeline
from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig
from uem_ich_jax.errors import InputError
from uem_ich_jax.models import scan_model as scan_model_lib
from uem_ich_jax.train import aggregate, checkpoint, config_file, ssl, stages, token_cache, trainer

SIZE = 64
DATASET = "synthetic_ich/scans_aggregate_tiny"
# The trainer exports an encoder at the model root (`stage.encoder_arrays`),
# takes the batch fields from `batch_keys_for` and pads scans to
# `config.data.slice_buckets` only once stages.py has these helpers.
ROOT_EXPORT = hasattr(stages, "exports_encoder")
STAGE_BATCH_KEYS = hasattr(stages, "batch_keys")


def _smoke_config(request, **changes) -> ml_collections.ConfigDict:
  path = request.config.rootpath / "configs" / "aggregator_synthetic.py"
  changes = {"model.image_size": SIZE, **changes}  # the smoke config is sized for 128 px builds
  overrides = [f"--config.{key}={value}" for key, value in changes.items()]
  return config_file.load(f"{path}:smoke", overrides)


def _scan(index: int, num_slices: int, *, fold: int = 0, cq500: bool = False) -> dict:
  rng = np.random.default_rng(index)
  example = {
      "image": rng.integers(0, 256, (num_slices, SIZE, SIZE, 3), dtype=np.uint8),
      "mask": rng.integers(0, 6, (num_slices, SIZE, SIZE), dtype=np.uint8),
      "labels": rng.integers(0, 2, (6,)).astype(np.uint8),
      "slice_labels": rng.integers(0, 2, (num_slices, 6)).astype(np.uint8),
      "spacing": np.array([5.0, 0.5, 0.5], np.float32),
      "scan_id": f"scan-{index}",
      "patient_id": f"patient-{index}",
      "fold": np.int32(fold),
  }
  if cq500:
    example["cq500_labels"] = rng.integers(0, 2, (14,)).astype(np.uint8)
  return example


class ScanSource:
  """An in-memory data source of scan examples with their own slice counts."""

  def __init__(self, examples):
    self._examples = list(examples)

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return dict(self._examples[index])


def _batches(dataset) -> list[dict]:
  iterator = iter(dataset)
  try:
    return list(iterator)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


class StubScanModel(nnx.Module):
  """Slice-masked mean of the pixels through a linear layer: the ScanModel interface, cheaply."""

  def __init__(self, num_classes: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, num_classes, rngs=rngs)
    self.freeze_calls = []

  def __call__(self, images, slice_mask, *, freeze_encoder=False):
    self.freeze_calls.append(freeze_encoder)
    weights = slice_mask.astype(jnp.float32)[:, :, None, None, None]
    pooled = jnp.sum(images * weights, axis=(1, 2, 3)) / jnp.maximum(
        jnp.sum(weights, axis=(1, 2, 3)) * images.shape[2] * images.shape[3], 1.0
    )
    return self.linear(pooled)


@pytest.fixture(scope="module")
def scan_model(request):
  config = _smoke_config(request)
  return aggregate.build_model(config.model, seed=0), config


@functools.lru_cache(maxsize=None)
def _jitted_eval(graphdef):
  @jax.jit
  def run(state, batch):
    return aggregate.eval_outputs(nnx.merge(graphdef, state), batch, None)

  return run


# ------------------------------------------------------------------ Input ---


def test_slice_bucket_picks_smallest_fit():
  assert pipeline.slice_bucket(3, (4, 8)) == 4
  assert pipeline.slice_bucket(4, (4, 8)) == 4
  assert pipeline.slice_bucket(5, (4, 8)) == 8
  assert pipeline.slice_bucket(5, None) == 5
  with pytest.raises(InputError, match="does not fit the largest slice bucket 8"):
    pipeline.slice_bucket(9, (4, 8))


@pytest.mark.parametrize(
    ("buckets", "message"),
    [((), "positive integer"), ((4, 0), "positive integer"), ((8, 4), "strictly increasing"),
     ((4, 4), "strictly increasing"), ((4.0,), "positive integer")],
)
def test_slice_buckets_rejected(buckets, message):
  with pytest.raises(pipeline.DataPipelineError, match=message):
    pipeline.check_slice_buckets(buckets)


def test_even_slice_indices_as_linspace():
  np.testing.assert_array_equal(pipeline.even_slice_indices(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(pipeline.even_slice_indices(4, 4), [0, 1, 2, 3])


def test_long_scan_subsampled_with_warning(caplog):
  example = _scan(0, 11)
  with caplog.at_level(logging.WARNING, logger=pipeline.logger.name):
    fitted = pipeline.FitSlices((4, 8)).map(example)
  kept = pipeline.even_slice_indices(11, 8)
  assert fitted["image"].shape == (8, SIZE, SIZE, 3)
  np.testing.assert_array_equal(fitted["image"], example["image"][kept])
  np.testing.assert_array_equal(fitted["mask"], example["mask"][kept])
  np.testing.assert_array_equal(fitted["slice_labels"], example["slice_labels"][kept])
  assert fitted["slice_mask"].tolist() == [True] * 8
  np.testing.assert_array_equal(fitted["labels"], example["labels"])
  assert "scan-0" in caplog.text
  assert "11 slices" in caplog.text


def test_slice_examples_pass_fit_unchanged():
  example = {"image": np.zeros((SIZE, SIZE, 3), np.float32), "labels": np.zeros(6)}
  assert pipeline.FitSlices((4,)).map(example) is example


def test_eval_batches_padded_to_bucket():
  source = ScanSource([_scan(0, 3), _scan(1, 5), _scan(2, 2)])
  batches = _batches(
      pipeline.eval_dataset(
          source, folds=[0], batch_size=2, shard_index=0, shard_count=1, slice_buckets=(4, 8)
      )
  )
  assert [batch["image"].shape[:2] for batch in batches] == [(2, 8), (2, 4)]
  first, second = batches
  assert first["slice_mask"].sum(axis=1).tolist() == [3, 5]
  assert first["slice_mask"][0].tolist() == [True] * 3 + [False] * 5
  np.testing.assert_array_equal(first["image"][0, 3:], 0.0)
  np.testing.assert_array_equal(first["mask"][0, 3:], 0)
  np.testing.assert_array_equal(first["slice_labels"][0, 3:], 0)
  np.testing.assert_array_equal(
      first["image"][1, :5], np.float32(2 / 255) * source[1]["image"] - 1.0
  )
  # The padding row of the last batch has the stored slices of the first scan.
  assert second["valid"].tolist() == [True, False]
  assert second["slice_mask"].sum(axis=1).tolist() == [2, 3]


def test_train_batches_padded_without_buckets():
  source = ScanSource([_scan(0, 3), _scan(1, 5)])
  batch = _batches(
      pipeline.train_dataset(
          source, folds=[0], batch_size=2, seed=0, augment=None, num_epochs=1,
          shard_index=0, shard_count=1,
      )
  )[0]
  assert batch["image"].shape == (2, 5, SIZE, SIZE, 3)
  assert sorted(batch["slice_mask"].sum(axis=1).tolist()) == [3, 5]


def test_scan_augmentation_warps_slices_alike():
  rng = np.random.default_rng(0)
  scan = {
      "image": rng.uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32),
      "mask": rng.integers(0, 6, (3, SIZE, SIZE)).astype(np.uint8),
  }
  params = augment.AugmentParams(flip=True, rotation_deg=12.0, scale=1.05)
  warped = augment.apply_augmentation(scan, params)
  for index in range(3):
    single_slice = augment.apply_augmentation(
        {"image": scan["image"][index], "mask": scan["mask"][index]}, params
    )
    np.testing.assert_array_equal(warped["image"][index], single_slice["image"])
    np.testing.assert_array_equal(warped["mask"][index], single_slice["mask"])


# ------------------------------------------------------------- Stage units ---


def test_stage_registered_with_label_keys(request):
  stage = stages.get_stage("aggregator")
  assert stage is aggregate.STAGE
  config = _smoke_config(request)
  assert stage.batch_keys_for(config) == ("image", "slice_mask", "labels", "valid")
  config.aggregator.label_set = "cq500"
  assert stage.batch_keys_for(config) == ("image", "slice_mask", "cq500_labels", "valid")
  assert aggregate.label_names("cq500") == uem_ich_jax.CQ500_LABELS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aggregator.label_set": "rsna"}, "label_set 'rsna' is not one of"),
        ({"model.num_classes": 5}, "num_classes is 5 but label_set 'mbh' has 6 labels"),
        ({"optim.encoder_lr": 1e-4}, "freeze_encoder is True but config.optim.encoder_lr"),
        (
            {"aggregator.freeze_encoder": False, "optim.encoder_lr": 0.0},
            "freeze_encoder is False but config.optim.encoder_lr is 0.0; set encoder_lr > 0",
        ),
        ({"loss.kind": "hinge"}, "loss.kind 'hinge' is not one of"),
        ({"model.max_slices": 0}, "max_slices must be a positive integer"),
        ({"data.slice_buckets": (4, 16)}, r"slice_buckets \(4, 16\) exceeds"),
        ({"data.slice_buckets": (8, 4)}, "strictly increasing"),
        ({"aggregator.cache_tokens": -1}, "cache_tokens must be a non-negative integer"),
        ({"aggregator.cache_tokens": True}, "cache_tokens must be a non-negative integer"),
        (
            {"aggregator.cache_tokens": 2, "aggregator.freeze_encoder": False,
             "optim.encoder_lr": 1e-4},
            "cache_tokens is 2 but freeze_encoder is False",
        ),
        ({"aggregator.cache_max_gib": 0.0}, "cache_max_gib must be a positive number"),
    ],
)
def test_check_config_names_the_bad_field(request, changes, message):
  config = _smoke_config(request)
  for key, value in changes.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(InputError, match=message):
    aggregate.check_config(config)


def test_check_config_accepts_cq500(request):
  config = _smoke_config(request, **{"aggregator.label_set": "cq500", "model.num_classes": 14})
  aggregate.check_config(config)
  config.aggregator.freeze_encoder = False
  config.optim.encoder_lr = 1e-4
  aggregate.check_config(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "tiny_cnn", "has no scan model"),
        ("image_size", 48, "multiple of 32"),
        ("variant", "giant", "does not describe a ConvNeXt-V2"),
        ("token_features", "mean", "token_features is 'mean', expected one of"),
    ],
)
def test_build_model_rejects_bad_model(request, field, value, message):
  config = _smoke_config(request)
  config.model[field] = value
  with pytest.raises(InputError, match=message):
    nnx.eval_shape(lambda: aggregate.build_model(config.model, seed=0))


def test_build_model_rejects_unknown_aggregator_setting(request):
  config = _smoke_config(request)
  with config.unlocked():
    config.model.aggregator.num_experts = 4
  with pytest.raises(InputError, match=r"\['num_experts'\] are not arguments of ScanAggregator"):
    nnx.eval_shape(lambda: aggregate.build_model(config.model, seed=0))
  with config.unlocked():
    del config.model.aggregator["num_experts"]
    del config.model.aggregator["num_heads"]
  with pytest.raises(InputError, match=r"lack \['num_heads'\]"):
    nnx.eval_shape(lambda: aggregate.build_model(config.model, seed=0))


def test_model_paths_keep_encoder_at_root(scan_model):
  model, _ = scan_model
  _, params, _, extra = stages.split_model(model)
  assert set(params) == {"stem_conv", "stem_norm", "stages", "coordinate_attention", "head"}
  assert set(params["head"]) == {"aggregator", "projection", "scan"}
  ssl_model = nnx.eval_shape(lambda: ssl.build_model(_ssl_model_config(), seed=0))
  encoder_names = set(stages.flatten(stages.split_model(ssl_model)[1]["encoder"]))
  root_names = {name for name in stages.flatten(params) if not name.startswith("head/")}
  assert root_names == encoder_names


def _ssl_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "convnext_v2", "variant": "atto", "coordinate_attention_stages": (2, 3),
      "drop_path_rate": 0.0, "dtype": "float32", "decoder_width": 32,
  })


def _stub_batch(num_classes: int = 6, field: str = "labels") -> dict:
  rng = np.random.default_rng(3)
  return {
      "image": jnp.asarray(rng.uniform(-1, 1, (3, 4, 32, 32, 3)), jnp.float32),
      "slice_mask": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool),
      field: jnp.asarray(rng.integers(0, 2, (3, num_classes)), jnp.uint8),
      "valid": jnp.array([True, True, False]),
  }


def test_loss_ignores_invalid_scans(request):
  config = _smoke_config(request)
  model = StubScanModel(6, nnx.Rngs(0))
  batch = _stub_batch()
  value, outputs = aggregate.loss(model, batch, config)
  assert model.freeze_calls == [True]
  assert np.isfinite(float(value))
  changed = dict(batch, image=batch["image"].at[2].set(0.5))
  changed_value, _ = aggregate.loss(model, changed, config)
  assert float(changed_value) == float(value)
  assert float(outputs["real_slices"]) == 2.5
  probabilities = aggregate.eval_outputs(model, batch, config)["probabilities"]
  assert np.all(np.isfinite(np.asarray(probabilities)))


def test_loss_is_focal_over_valid_scans(request):
  config = _smoke_config(request, **{"loss.alpha": 0.25, "loss.gamma": 2.0})
  model = StubScanModel(6, nnx.Rngs(0))
  batch = _stub_batch()
  value, _ = aggregate.loss(model, batch, config)
  logits = model(batch["image"], batch["slice_mask"])[:2]
  labels = np.asarray(batch["labels"][:2], np.float64)
  probability = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  p_true = np.where(labels == 1, probability, 1.0 - probability)
  alpha_t = np.where(labels == 1, 0.25, 0.75)
  expected = np.mean(-alpha_t * (1.0 - p_true) ** 2 * np.log(p_true))
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_cq500_mode_reads_cq500_labels(request):
  config = _smoke_config(request, **{"aggregator.label_set": "cq500", "model.num_classes": 14})
  model = StubScanModel(14, nnx.Rngs(0))
  batch = _stub_batch(14, "cq500_labels")
  outputs = aggregate.eval_outputs(model, batch, config)
  assert outputs["probabilities"].shape == (3, 14)
  np.testing.assert_array_equal(outputs["labels"], batch["cq500_labels"])
  value, _ = aggregate.loss(model, batch, config)
  assert np.isfinite(float(value))
  with pytest.raises(InputError, match="no 'cq500_labels' field"):
    aggregate.loss(model, _stub_batch(), config)

  rng = np.random.default_rng(0)
  test = {"labels": rng.integers(0, 2, (12, 14)), "probabilities": rng.uniform(size=(12, 14))}
  validation = {"labels": rng.integers(0, 2, (10, 14)), "probabilities": rng.uniform(size=(10, 14))}
  scalars, result = aggregate.evaluate(test, validation=validation, config=config)
  assert list(result["classes"]) == list(uem_ich_jax.CQ500_LABELS)
  assert result["label_set"] == "cq500"
  assert "auc_macro" in scalars
  assert f"auc_{uem_ich_jax.CQ500_LABELS[0]}" in scalars


def test_cq500_eval_batches_carry_labels():
  source = ScanSource([_scan(0, 3, cq500=True), _scan(1, 2, cq500=True)])
  batch = _batches(
      pipeline.eval_dataset(
          source, folds=[0], batch_size=2, shard_index=0, shard_count=1, slice_buckets=(4,)
      )
  )[0]
  assert batch["cq500_labels"].shape == (2, 14)
  np.testing.assert_array_equal(batch["cq500_labels"][1], source[1]["cq500_labels"])


def test_evaluate_mbh_scores_every_label(request):
  config = _smoke_config(request)
  labels = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 0]] * 2)
  probabilities = np.where(labels == 1, 0.8, 0.3)
  scalars, result = aggregate.evaluate(
      {"labels": labels, "probabilities": probabilities}, validation=None, config=config
  )
  assert scalars["auc_macro"] == pytest.approx(1.0)
  assert result["n"] == 6
  with pytest.raises(InputError, match="no valid scans"):
    aggregate.evaluate(
        {"labels": np.zeros((0, 6)), "probabilities": np.zeros((0, 6))},
        validation=None,
        config=config,
    )


# --------------------------------------------------------------- The model ---


@pytest.fixture(scope="module")
def pyramid_model(request):
  config = _smoke_config(request)
  config.model.token_features = "pyramid"
  return aggregate.build_model(config.model, seed=0), config


def test_bucket_padding_keeps_probabilities(scan_model):
  _check_bucket_padding(scan_model[0])


def test_pyramid_bucket_padding_keeps_probabilities(pyramid_model):
  _check_bucket_padding(pyramid_model[0])


def test_pyramid_tokens_max_pool_every_stage(pyramid_model):
  model, config = pyramid_model
  widths = stages.encoder_config(config.model).widths
  assert model.head.projection.kernel.shape == (sum(widths), config.model.aggregator_dim)
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 3, 64, 64, 3)), jnp.float32)
  slice_mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  tokens = np.asarray(nnx.jit(lambda m, x, mask: m.scan_features(x, mask))(model, images, slice_mask))
  assert tokens.shape == (2, 3, 2, 2, sum(widths))
  # Reference: each real slice alone through the encoder, each stage's map
  # max-pooled over its own 32 x 32 pixel cells by explicit slicing.
  maps = nnx.jit(lambda m, x: m.features(x))(model, images[0, :1])
  expected = []
  for stage_map in maps:
    cell = stage_map.shape[1] // 2
    expected.append(np.array([
        [np.asarray(stage_map[0, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]).max(axis=(0, 1))
         for c in range(2)]
        for r in range(2)
    ]))
  np.testing.assert_allclose(tokens[0, 0], np.concatenate(expected, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tokens[1, 2], 0.0)


def _check_bucket_padding(model):
  source = ScanSource([_scan(0, 3), _scan(1, 4)])
  graphdef, state = nnx.split(model)
  run = _jitted_eval(graphdef)

  def probabilities(slice_buckets):
    batch = _batches(
        pipeline.eval_dataset(
            source, folds=[0], batch_size=2, shard_index=0, shard_count=1,
            slice_buckets=slice_buckets,
        )
    )[0]
    return batch["image"].shape[1], np.asarray(run(state, _model_fields(batch))["probabilities"])

  # Scan 1 fills the batch padded to its own length; scan 0 is padded by 1 there and by 5 in the bucket.
  exact_slices, exact = probabilities(None)
  bucket_slices, bucketed = probabilities((8,))
  assert (exact_slices, bucket_slices) == (4, 8)
  np.testing.assert_allclose(bucketed, exact, atol=2e-6)
  assert not np.allclose(exact[0], exact[1], atol=1e-3)


def _model_fields(batch: dict) -> dict:
  return {key: jnp.asarray(batch[key]) for key in ("image", "slice_mask", "labels", "valid")}


@pytest.mark.slow
def test_frozen_encoder_gets_no_gradient(scan_model):
  model, config = scan_model
  source = ScanSource([_scan(0, 3), _scan(1, 4)])
  batch = _model_fields(
      _batches(
          pipeline.eval_dataset(
              source, folds=[0], batch_size=2, shard_index=0, shard_count=1, slice_buckets=(4,)
          )
      )[0]
  )
  train_view = nnx.view(model, deterministic=False, use_running_average=False)
  graphdef, params, rngs, extra = stages.split_model(train_view)

  def gradients(freeze):
    config.aggregator.freeze_encoder = freeze

    def loss_fn(params):
      return aggregate.loss(nnx.merge(graphdef, params, rngs, extra), batch, config)[0]

    return stages.flatten(jax.jit(jax.grad(loss_fn))(params))

  frozen = gradients(True)
  tuned = gradients(False)
  config.aggregator.freeze_encoder = True
  encoder = [name for name in frozen if not name.startswith("head/")]
  assert all(not np.any(frozen[name]) for name in encoder)
  assert any(np.any(frozen[name]) for name in frozen if name.startswith("head/"))
  assert any(np.any(tuned[name]) for name in encoder)


# ------------------------------------------------------------- Trainer runs ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  config = SyntheticIchConfig(
      name="scans_aggregate_tiny", layout="scans", num_scans=10, num_slices=4, image_size=SIZE,
      num_folds=5,
  )
  SyntheticIch(config=config, data_dir=str(directory), file_format="array_record").download_and_prepare()
  return directory


def _run_config(request, data_dir, **changes):
  return _smoke_config(
      request, **{"data.data_dir": str(data_dir), "data.name": DATASET, **changes}
  )


def _fresh_state(setup: trainer.Setup) -> dict:
  """Initialise `setup`'s state with the program that the trainer compiles.

  Without out_shardings the program differs, and compiling it again took
  18 s (measured on 2 shared CPU cores).
  """
  return jax.jit(setup.init_state, out_shardings=setup.state_shardings)()


@pytest.fixture(scope="module")
def frozen_run(request, data_dir, tmp_path_factory):
  """The smoke config trained for 4 steps on the tiny scans build, frozen encoder."""
  workdir = tmp_path_factory.mktemp("aggregate")
  config = _run_config(request, data_dir)
  summary = trainer.train(config, workdir)
  setup = trainer.build(config)
  initial = _fresh_state(setup)
  return workdir, config, summary, initial


@pytest.mark.slow
def test_frozen_run_moves_only_the_head(frozen_run):
  workdir, config, summary, initial = frozen_run
  assert summary["step"] == 4
  assert "auc_macro" in summary["validation"]
  manager = checkpoint.CheckpointManager(workdir, best_metric=config.best_metric, read_only=True)
  assert manager.all_steps() == [2, 4]
  assert "val_auc_macro" in manager.metrics(4)
  final = manager.restore_arrays(4)
  manager.close()
  before = stages.flatten(initial["params"])
  after = stages.flatten(final["params"])
  encoder = [name for name in before if not name.startswith("head/")]
  head = [name for name in before if name.startswith("head/")]
  for name in encoder:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name, value in stages.flatten(initial["extra"]).items():
    np.testing.assert_array_equal(stages.flatten(final["extra"])[name], value, err_msg=name)
  changed = [name for name in head if not np.array_equal(after[name], before[name])]
  assert len(changed) == len(head)
  model, _ = checkpoint.restore_model(workdir)
  assert isinstance(model, scan_model_lib.ScanModel)


@pytest.mark.slow
@pytest.mark.skipif(not ROOT_EXPORT, reason="the trainer does not export root encoders yet")
def test_run_exports_root_encoder(request, data_dir, frozen_run, tmp_path):
  workdir, config, summary, _ = frozen_run
  export = workdir / checkpoint.ENCODER_EXPORT_DIR
  assert summary["encoder_export"] == str(export)
  _, arrays = checkpoint.read_encoder_export(export)
  names = set(stages.flatten(arrays["params"]))
  assert names
  assert not any(name.startswith("head") for name in names)
  # The export starts the next aggregator run.
  chained = _run_config(request, data_dir, init_from=str(export))
  state = trainer._initialise(trainer.build(chained))
  params = stages.flatten(state["params"])
  for name, value in stages.flatten(arrays["params"]).items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_init_from_ssl_style_export(request, data_dir, tmp_path):
  config = _run_config(request, data_dir)
  ssl_model = ssl.build_model(_ssl_model_config(), seed=7)
  _, params, _, extra = stages.split_model(ssl_model)
  export = tmp_path / "export"
  checkpoint.export_encoder(
      export,
      {"params": params["encoder"], "extra": extra["encoder"]},
      {"stage": "ssl_pretrain", "step": 0, "model": config.model.to_dict()},
  )
  config.init_from = str(export)
  setup = trainer.build(config)
  state = trainer._initialise(setup)
  fresh = stages.flatten(_fresh_state(setup)["params"])
  loaded = stages.flatten(state["params"])
  exported = stages.flatten(params["encoder"])
  assert set(loaded) - set(exported) == {name for name in loaded if name.startswith("head/")}
  for name, value in exported.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  for name in loaded:
    if name.startswith("head/"):
      np.testing.assert_array_equal(loaded[name], fresh[name], err_msg=name)
  for name, value in stages.flatten(extra["encoder"]).items():
    np.testing.assert_array_equal(stages.flatten(state["extra"])[name], value, err_msg=name)


def _fake_run(workdir, stage: str, arrays: dict) -> None:
  """Write a work directory with the config of `stage` and one checkpoint of `arrays`."""
  checkpoint.save_config(workdir, ml_collections.ConfigDict({"stage": stage}))
  manager = checkpoint.CheckpointManager(workdir)
  manager.save(1, arrays)
  manager.close()


def test_init_from_ssl_work_directory_names_export(request, data_dir, tmp_path):
  ssl_model = ssl.build_model(_ssl_model_config(), seed=7)
  _, params, _, extra = stages.split_model(ssl_model)
  _fake_run(tmp_path / "ssl", "ssl_pretrain", {"params": params, "extra": extra})
  _fake_run(tmp_path / "classification", "classification", {"params": params, "extra": extra})
  config = _run_config(request, data_dir, init_from=str(tmp_path / "ssl"))
  setup = trainer.build(config)
  with pytest.raises(InputError, match="missing") as error:
    trainer._initialise(setup)
  assert "work directory of a 'ssl_pretrain' run" in str(error.value)
  assert f"use WORKDIR/export/encoder ({tmp_path / 'ssl' / 'export' / 'encoder'})" in str(
      error.value
  )
  # A stage without an encoder export gets the plain error.
  setup.config.init_from = str(tmp_path / "classification")
  with pytest.raises(InputError, match="missing") as error:
    trainer._initialise(setup)
  assert "export/encoder" not in str(error.value)


@pytest.mark.slow
@pytest.mark.skipif(
    not STAGE_BATCH_KEYS, reason="the trainer passes neither cq500_labels nor slice buckets yet"
)
def test_cq500_run_on_scans_of_mixed_length(request, data_dir, tmp_path, monkeypatch):
  lengths = [3, 4, 5, 7, 8, 2, 6, 4, 3, 8]
  source = ScanSource(
      [_scan(index, length, fold=index % 5, cq500=True) for index, length in enumerate(lengths)]
  )
  monkeypatch.setattr(trainer, "dataset_source", lambda config: source)
  config = _run_config(
      request,
      data_dir,
      **{"aggregator.label_set": "cq500", "model.num_classes": 14, "eval_every": 4},
  )
  summary = trainer.train(config, tmp_path / "cq500")
  assert summary["step"] == 4
  assert f"auc_{uem_ich_jax.CQ500_LABELS[0]}" in summary["validation"]
  result = trainer.evaluate(tmp_path / "cq500")
  assert list(result["classes"]) == list(uem_ich_jax.CQ500_LABELS)
  assert result["n_test"] == 2


# ------------------------------------------------------------ Token cache ---


def test_cached_tokens_are_the_frozen_encoders(request, data_dir):
  config = _run_config(request, data_dir, **{"aggregator.cache_tokens": 2})
  setup = trainer.build(config)
  state = _fresh_state(setup)
  source = trainer.dataset_source(config)
  images = trainer.train_iterator(config, source, setup.folds)
  # The iterator the cache wraps yields the same batches as this one.
  expected = trainer.train_iterator(config, source, setup.folds)
  cache = aggregate.train_input(setup, images, source)
  batch_size = config.data.batch_size
  scans = len(pipeline.train_shard(source, folds=setup.folds.train, batch_size=batch_size))
  # Two passes over the scans, in whole batches.
  count = -(-2 * scans // batch_size)
  aggregate.prepare_train_input(setup, state, cache)
  model = setup.eval_model(state)
  # Jitted, because op by op the encoder compiled about 250 small programs (15 s).
  scan_features = nnx.jit(lambda model, images, slice_mask: model.scan_features(images, slice_mask))
  cached = [next(cache) for _ in range(count)]
  for batch in [next(expected) for _ in range(count)]:
    tokens = scan_features(model, jnp.asarray(batch["image"]), jnp.asarray(batch["slice_mask"]))
    found = [entry for entry in cached if np.allclose(entry["tokens"], tokens, atol=1e-5)]
    assert found, "a training batch has no cached tokens"
    np.testing.assert_array_equal(found[0]["labels"], batch["labels"])
    np.testing.assert_array_equal(found[0]["slice_mask"], batch["slice_mask"])
  # The next replay draws the same batches again.
  replay = [next(cache) for _ in range(count)]
  assert sorted(id(entry) for entry in replay) == sorted(id(entry) for entry in cached)
  assert cache.batch_keys == ("tokens", "slice_mask", "labels", "valid")
  cache.close()
  close = getattr(expected, "close", None)
  if close is not None:
    close()


@pytest.mark.slow
def test_cached_run_resumes_exactly(request, data_dir, tmp_path, monkeypatch):
  changes = {"aggregator.cache_tokens": 2, "data.augment": "true", "eval_every": 100,
             "checkpoint_every": 100}
  config = _run_config(request, data_dir, **changes)
  fills = []
  original_prepare = token_cache.TokenCache.prepare

  def counted_prepare(self, encode):
    fills.append(1)
    return original_prepare(self, encode)

  monkeypatch.setattr(token_cache.TokenCache, "prepare", counted_prepare)
  trainer.train(config, tmp_path / "whole")
  trainer.train(config, tmp_path / "split", stop_after=2)
  trainer.train(config, tmp_path / "split")
  # A finished run trains nothing, so it encodes nothing.
  trainer.train(config, tmp_path / "split")
  assert len(fills) == 3
  initial = stages.flatten(_fresh_state(trainer.build(config))["params"])

  def final(workdir):
    manager = checkpoint.CheckpointManager(workdir, read_only=True)
    arrays = manager.restore_arrays(4)
    manager.close()
    return stages.flatten(arrays["params"])

  whole, split = final(tmp_path / "whole"), final(tmp_path / "split")
  for name, value in whole.items():
    np.testing.assert_array_equal(split[name], value, err_msg=name)
    if name.startswith("head/"):
      assert not np.array_equal(value, initial[name]), name
    else:
      np.testing.assert_array_equal(value, initial[name], err_msg=name)
  # The saved position is the cache's, which a plain grain iterator cannot read.
  plain = _run_config(request, data_dir, **dict(changes, **{"aggregator.cache_tokens": 0}))
  with pytest.raises(checkpoint.CheckpointError, match="saved with other input settings"):
    trainer.train(plain, tmp_path / "whole")
