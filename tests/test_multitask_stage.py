"""The multitask stage: schedules, availability flags, scan metrics, encoder layout, runs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.evaluate import segmentation as segmentation_metrics
from uem_ich_jax.train import multitask
from uem_ich_jax.train import stages

# ------------------------------------------------------------ Pure parts ---


def test_ramp_weights_endpoints():
  start = multitask.ramp_weights(0, 20)
  end = multitask.ramp_weights(19, 20)
  middle = multitask.ramp_weights(9.5, 20)
  np.testing.assert_allclose([float(w) for w in start], (0.8, 0.2), rtol=1e-6)
  np.testing.assert_allclose([float(w) for w in end], (0.5, 0.5), rtol=1e-6)
  np.testing.assert_allclose([float(w) for w in middle], (0.65, 0.35), rtol=1e-6)
  # After the last step the weights stay at the end values.
  np.testing.assert_allclose([float(w) for w in multitask.ramp_weights(50, 20)], (0.5, 0.5), rtol=1e-6)


def test_ramp_weights_traced_step():
  weights = jax.jit(lambda step: multitask.ramp_weights(step, 11))(jnp.arange(11))
  np.testing.assert_allclose(np.asarray(weights[0]), np.linspace(0.8, 0.5, 11), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(weights[1]), np.linspace(0.2, 0.5, 11), rtol=1e-6)


def test_alternating_draws_half_segmentation_steps():
  keys = jax.vmap(lambda step: jax.random.fold_in(jax.random.key(0), step))(jnp.arange(4000))
  draws = np.asarray(jax.vmap(multitask.draw_segmentation_step)(keys))
  # Binomial(4000, 0.5) has standard deviation 31.6: 4.7 sigma either side.
  assert 1850 < draws.sum() < 2150
  # Consecutive steps are not locked together.
  assert 0.4 < np.mean(draws[1:] != draws[:-1]) < 0.6


def test_alternating_draws_follow_probability():
  keys = jax.vmap(lambda step: jax.random.fold_in(jax.random.key(1), step))(jnp.arange(2000))
  draws = np.asarray(jax.vmap(lambda key: multitask.draw_segmentation_step(key, 0.2))(keys))
  assert 0.16 < draws.mean() < 0.24


# ---------------------------------------------------------- Scan metrics ---


def test_dice_handles_empty_volumes():
  empty = np.zeros((2, 3, 3), bool)
  full = np.ones((2, 3, 3), bool)
  assert segmentation_metrics.dice(empty, empty) is None
  assert segmentation_metrics.dice(full, empty) == 0.0
  assert segmentation_metrics.dice(full, full) == 1.0


def test_group_scans_by_id_sorted_by_slice():
  ids = np.array([b"b", b"a", b"b", b"a", b"b"])
  slices = np.array([2, 1, 0, 0, 1])
  scans = segmentation_metrics.group_scans(slices, ids)
  assert [rows.tolist() for rows in scans] == [[3, 1], [2, 4, 0]]


def test_group_scans_by_slice_runs():
  scans = segmentation_metrics.group_scans(np.array([0, 1, 2, 0, 1, 0]))
  assert [rows.tolist() for rows in scans] == [[0, 1, 2], [3, 4], [5]]


def test_group_scans_rejects_repeated_slice():
  with pytest.raises(InputError, match="slice index 1 twice"):
    segmentation_metrics.group_scans(np.array([0, 1, 1]), np.array([b"a", b"a", b"a"]))


def _hand_made_scans():
  """Three scans of 2 slices of 4x4 voxels, spacing 5 x 2 x 2 mm (0.02 mL per voxel).

  Scan 0: truth 8 voxels of class 1, prediction 4 of them plus 4 false
  voxels of class 2. Scan 1: both empty. Scan 2: truth empty, prediction 2
  voxels of class 5.
  """
  truth = np.zeros((6, 4, 4), np.uint8)
  prediction = np.zeros((6, 4, 4), np.uint8)
  truth[0, :2, :] = 1  # 8 voxels
  prediction[0, :1, :] = 1  # 4 of them
  prediction[1, :1, :] = 2  # 4 false voxels
  prediction[5, 0, :2] = 5
  spacing = np.tile(np.array([[5.0, 2.0, 2.0]]), (6, 1))
  scans = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
  return prediction, truth, spacing, scans


def test_scan_metrics_dice_and_empty_counts():
  prediction, truth, spacing, scans = _hand_made_scans()
  result = segmentation_metrics.scan_metrics(prediction, truth, spacing, scans, min_volume_ml=0.1)
  # Scan 0 foreground: 2 * 4 / (8 + 8) = 0.5; scan 2: 0; scan 1 is left out.
  assert result["dice_3d"]["mean"] == pytest.approx(0.25)
  assert result["dice_3d"]["n_scored"] == 2
  assert result["dice_3d"]["n_empty_both"] == 1
  assert result["dice_3d"]["n_empty_truth_with_prediction"] == 1
  per_class = result["dice_3d_per_class"]
  # Class 1 (epidural): scan 0 2*4/(4+8); scans 1 and 2 empty for class 1.
  assert per_class["epidural"]["mean"] == pytest.approx(8 / 12)
  assert per_class["epidural"]["n_empty_both"] == 2
  # Class 2: only false voxels in scan 0.
  assert per_class["intraparenchymal"]["mean"] == 0.0
  assert per_class["subarachnoid"]["mean"] is None
  # Pooled over every voxel: 2 * 4 / (8 + 2 + 8).
  assert result["dice_pooled"] == pytest.approx(8 / 18)


def test_scan_metrics_volume_error():
  prediction, truth, spacing, scans = _hand_made_scans()
  result = segmentation_metrics.scan_metrics(prediction, truth, spacing, scans, min_volume_ml=0.1)
  np.testing.assert_allclose(result["true_ml"], [0.16, 0.0, 0.0])
  np.testing.assert_allclose(result["predicted_ml"], [0.16, 0.0, 0.04])
  volume = result["volume"]
  # Scan 0 has the right volume (wrong voxels); only it is above 0.1 mL.
  assert volume["mean_relative_error"] == pytest.approx(0.0)
  assert volume["n_relative"] == 1
  assert volume["mean_absolute_error_ml"] == pytest.approx(0.04 / 3)
  above_all = segmentation_metrics.scan_metrics(prediction, truth, spacing, scans, min_volume_ml=1.0)
  assert above_all["volume"]["mean_relative_error"] is None
  assert above_all["volume"]["n_relative"] == 0


def test_scan_metrics_relative_error():
  truth = np.zeros((1, 10, 10), np.uint8)
  prediction = np.zeros((1, 10, 10), np.uint8)
  truth[0, :5] = 3  # 50 voxels
  prediction[0, :4] = 3  # 40 voxels
  spacing = np.array([[10.0, 1.0, 1.0]])  # 0.01 mL per voxel
  result = segmentation_metrics.scan_metrics(prediction, truth, spacing, [np.array([0])], min_volume_ml=0.1)
  assert result["volume"]["mean_relative_error"] == pytest.approx(0.2)
  assert result["dice_3d"]["mean"] == pytest.approx(80 / 90)


# ------------------------------------------------------ Loss with a stub ---


class StubModel(nnx.Module):
  """Pooled linear classifier and a 1x1 conv segmenter: the UEM outputs at a fraction of its cost."""

  def __init__(self, rngs: nnx.Rngs, classes: int = 6):
    self.head = nnx.Linear(3, 6, rngs=rngs)
    self.head_segmentation = nnx.Conv(3, classes, (1, 1), rngs=rngs)
    self.head_schedule = multitask.Schedule(rngs)

  def __call__(self, images):
    logits = self.head_segmentation(images)
    return {
        "class_logits": self.head(images.mean(axis=(1, 2))),
        "segmentation": logits,
        "segmentation_aux": [logits * 0.5] * 4,
    }


def _stage_config(schedule: str = "mixed", **fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_steps = 10
  config.loss = ml_collections.ConfigDict({"kind": "focal", "alpha": 0.25, "gamma": 2.0})
  config.multitask = ml_collections.ConfigDict(
      dict(multitask.MULTITASK_DEFAULTS, schedule=schedule, **fields)
  )
  config.model = ml_collections.ConfigDict({"segmentation_classes": 6, "detection": False})
  config.eval = ml_collections.ConfigDict({"threshold_criterion": "f1"})
  return config


def _batch(batch: int = 4, size: int = 8, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, size, size), np.uint8)
  mask[:, 2:5, 3:6] = rng.integers(1, 6, size=(batch, 1, 1))
  return {
      "image": jnp.asarray(rng.uniform(-1, 1, size=(batch, size, size, 3)), jnp.float32),
      "labels": jnp.asarray(rng.integers(0, 2, size=(batch, 6)), jnp.uint8),
      "mask": jnp.asarray(mask),
      "spacing": jnp.ones((batch, 3), jnp.float32),
      "slice_index": jnp.arange(batch, dtype=jnp.int32),
      "valid": jnp.ones((batch,), bool),
  }


def _stub(seed: int = 0) -> StubModel:
  return StubModel(nnx.Rngs(params=seed, schedule=seed + 2))


def test_mixed_loss_is_weighted_sum():
  config = _stage_config(weights={"classification": 0.3, "segmentation": 2.0, "detection": 1.0})
  value, outputs = multitask.loss(_stub(), _batch(), config)
  expected = 0.3 * outputs["classification"] + 2.0 * outputs["segmentation"]
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
  assert float(outputs["classification"]) > 0
  assert float(outputs["segmentation"]) > 0
  assert float(outputs["detection"]) == 0.0


def test_availability_flags_weight_tasks():
  config = _stage_config()
  model = _stub()
  batch = _batch()
  _, full = multitask.loss(model, batch, config)
  without = dict(batch, has_mask=jnp.zeros(4, bool), has_labels=jnp.array([1, 1, 0, 0], bool))
  _, flagged = multitask.loss(model, without, config)
  assert float(flagged["segmentation"]) == 0.0
  first_two = {key: value[:2] for key, value in batch.items()}
  _, expected = multitask.loss(model, first_two, config)
  np.testing.assert_allclose(float(flagged["classification"]), float(expected["classification"]), rtol=1e-6)
  assert float(flagged["classification"]) != pytest.approx(float(full["classification"]))


def test_alternating_loss_picks_one_task():
  config = _stage_config("alternating")
  model = _stub()
  picks = []
  for step in range(10):
    model.head_schedule.stream.key.set_value(jax.random.fold_in(jax.random.key(3), step))
    batch = dict(_batch(seed=step), step=jnp.asarray(step, jnp.int32))
    value, outputs = multitask.loss(model, batch, config)
    w_seg, w_cls = multitask.ramp_weights(step, 10)
    np.testing.assert_allclose(float(outputs["weight_segmentation"]), float(w_seg), rtol=1e-6)
    if float(outputs["segmentation_steps"]):
      expected = w_seg * outputs["segmentation"]
    else:
      expected = w_cls * outputs["classification"]
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    picks.append(float(outputs["segmentation_steps"]))
  assert 0 < sum(picks) < 10


def test_alternating_gradient_only_reaches_chosen_head():
  config = _stage_config("alternating")
  model = _stub()
  graphdef, params, rngs, extra = stages.split_model(model)

  def loss_fn(params, key):
    step_rngs = jax.tree.map(lambda leaf: key if leaf.dtype == key.dtype else leaf, rngs)
    merged = nnx.merge(graphdef, params, step_rngs, extra)
    value, outputs = multitask.loss(merged, _batch(), config)
    return value, outputs["segmentation_steps"]

  seen = set()
  for step in range(8):
    grads, is_seg = jax.grad(loss_fn, has_aux=True)(params, jax.random.fold_in(jax.random.key(5), step))
    seg_norm = float(jnp.abs(grads["head_segmentation"]["kernel"]).sum())
    cls_norm = float(jnp.abs(grads["head"]["kernel"]).sum())
    if float(is_seg):
      assert seg_norm > 0
      assert cls_norm == 0
    else:
      assert cls_norm > 0
      assert seg_norm == 0
    seen.add(float(is_seg))
  assert seen == {0.0, 1.0}


def test_eval_outputs_and_evaluate():
  # 6 slices x 9 voxels of 0.001 mL: 0.054 mL in all, above this minimum.
  config = _stage_config(min_volume_ml=0.01)
  model = _stub()
  batch = _batch(batch=6)
  outputs = {key: np.asarray(value) for key, value in multitask.eval_outputs(model, batch, config).items()}
  assert outputs["predicted_mask"].dtype == np.uint8
  assert outputs["predicted_mask"].shape == (6, 8, 8)
  np.testing.assert_array_equal(outputs["mask"], np.asarray(batch["mask"]))
  # Perfect predictions give Dice 1 and no volume error.
  perfect = dict(outputs, predicted_mask=outputs["mask"])
  scalars, result = multitask.evaluate(perfect, validation=None, config=config)
  assert scalars["dice_3d"] == pytest.approx(1.0)
  assert scalars["volume_relative_error"] == pytest.approx(0.0)
  assert scalars["volume_absolute_error_ml"] == pytest.approx(0.0)
  assert result["segmentation"]["n_scans"] == 1
  assert "auc_macro" in scalars
  scalars, result = multitask.evaluate(outputs, validation=outputs, config=config)
  assert "f1_macro" in scalars
  assert 0.0 <= scalars["dice_3d"] < 1.0


def test_evaluate_skips_rows_without_masks():
  config = _stage_config()
  outputs = {
      key: np.asarray(value)
      for key, value in multitask.eval_outputs(_stub(), _batch(batch=4), config).items()
  }
  outputs["predicted_mask"] = outputs["mask"].copy()
  outputs["predicted_mask"][2:] = 0  # wrong on the last two slices
  outputs["has_mask"] = np.array([True, True, False, False])
  scalars, result = multitask.evaluate(outputs, validation=None, config=config)
  assert scalars["dice_3d"] == pytest.approx(1.0)
  assert result["segmentation"]["n_scans"] == 1
  outputs["has_mask"][:] = True
  scalars, _ = multitask.evaluate(outputs, validation=None, config=config)
  # 18 of 36 true voxels found, none false: 2 * 18 / (18 + 36).
  assert scalars["dice_3d"] == pytest.approx(2 / 3)


def test_scan_any_scored_by_predicted_volume():
  labels = np.zeros((6, 6), np.int32)
  labels[[1, 4], 0] = 1  # scans 0 and 2 have a bleed on one slice, scan 1 none
  scans = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
  # Ranked right: both positive scans above the negative one.
  result = multitask._scan_any_from_volume(labels, scans, [3.0, 0.5, 1.0])
  assert result == {"auc": 1.0, "n_scans": 3, "n_positive": 2}
  # The negative scan between the two positives: one of two pairs ranked right.
  assert multitask._scan_any_from_volume(labels, scans, [3.0, 2.0, 1.0])["auc"] == 0.5
  assert multitask._scan_any_from_volume(labels[:, 1:2] * 0, scans, [1.0, 2.0, 3.0])["auc"] is None


def test_binary_head_loss_and_evaluation():
  config = _stage_config()
  config.model.segmentation_classes = 1
  model = StubModel(nnx.Rngs(params=0, schedule=2), classes=1)
  batch = _batch()
  value, outputs = multitask.loss(model, batch, config)
  assert np.isfinite(float(value))
  assert float(outputs["segmentation"]) > 0
  evaluated = {key: np.asarray(v) for key, v in multitask.eval_outputs(model, batch, config).items()}
  assert set(np.unique(evaluated["predicted_mask"])) <= {0, 1}
  # A binary prediction of every bleed voxel scores 1 against the subtype mask.
  evaluated["predicted_mask"] = (evaluated["mask"] > 0).astype(np.uint8)
  scalars, result = multitask.evaluate(evaluated, validation=None, config=config)
  assert scalars["dice_3d"] == pytest.approx(1.0)
  assert result["segmentation"]["dice_3d_per_class"] == {}


def test_check_config_rejects_bad_values():
  config = _stage_config(schedule="round_robin")
  with pytest.raises(InputError, match="schedule 'round_robin'"):
    multitask.check_config(config)
  config = _stage_config(segmentation_probability=1.5)
  with pytest.raises(InputError, match="segmentation_probability"):
    multitask.check_config(config)
  config = _stage_config(detection=True)
  with pytest.raises(InputError, match="config.model.detection"):
    multitask.check_config(config)
  multitask.check_config(_stage_config())


@pytest.mark.parametrize("classes", [0, 2, 3, 5, 7])
def test_check_config_rejects_segmentation_classes(classes):
  config = _stage_config()
  config.model.segmentation_classes = classes
  with pytest.raises(InputError, match=rf"segmentation_classes is {classes!r}; expected 6 .* or 1"):
    multitask.check_config(config)


@pytest.mark.parametrize("classes", [6, 1])
def test_check_config_accepts_segmentation_classes(classes):
  config = _stage_config()
  config.model.segmentation_classes = classes
  multitask.check_config(config)


def test_check_config_rejects_label_and_box_classes():
  config = _stage_config()
  config.model.num_classes = 5
  with pytest.raises(InputError, match="num_classes is 5, but slice labels have 6 columns"):
    multitask.check_config(config)
  config = _stage_config()
  config.model.detection_classes = 3
  with pytest.raises(InputError, match="detection_classes is 3, but box class ids"):
    multitask.check_config(config)
  config.model.detection_classes = 5
  multitask.check_config(config)


@pytest.mark.parametrize("detection", [False, True])
def test_check_config_rejects_all_zero_mixed_weights(detection):
  zero = {"classification": 0.0, "segmentation": 0.0, "detection": 0.0}
  config = _stage_config(weights=zero, detection=detection)
  config.model.detection = detection
  with pytest.raises(InputError, match="weights of .* are all 0"):
    multitask.check_config(config)


def test_check_config_detection_weight_when_on():
  weights = {"classification": 0.0, "segmentation": 0.0, "detection": 1.0}
  # Detection off: its weight trains nothing.
  with pytest.raises(InputError, match="are all 0"):
    multitask.check_config(_stage_config(weights=weights))
  config = _stage_config(weights=weights, detection=True)
  config.model.detection = True
  multitask.check_config(config)


@pytest.mark.parametrize(
    ("fields", "task"),
    [
        ({"ramp_start": (0.0, 0.2), "ramp_end": (0.0, 0.5)}, "segmentation"),
        ({"ramp_start": (0.8, 0.0), "ramp_end": (0.5, 0.0)}, "classification"),
        (
            {"ramp_start": (0.8, 0.0), "ramp_end": (0.5, 0.0), "segmentation_probability": 0.0},
            "classification",
        ),
    ],
)
def test_check_config_rejects_zero_ramp_of_drawn_task(fields, task):
  config = _stage_config(schedule="alternating", **fields)
  with pytest.raises(InputError, match=f"both give {task} weight 0"):
    multitask.check_config(config)


def test_check_config_accepts_zero_ramp_of_undrawn_task():
  config = _stage_config(
      schedule="alternating", ramp_start=(0.8, 0.0), ramp_end=(0.5, 0.0), segmentation_probability=1.0
  )
  multitask.check_config(config)
  # One endpoint above 0 trains the task on every step but the last.
  config = _stage_config(schedule="alternating", ramp_start=(0.8, 0.2), ramp_end=(0.0, 0.5))
  multitask.check_config(config)


# ---------------------------------------------------- Encoder layout ---


def _model_config(**fields) -> ml_collections.ConfigDict:
  values = {
      "name": "convnext_v2",
      "variant": "atto",
      "num_classes": 6,
      "head": "multitask",
      "drop_path_rate": 0.0,
      "coordinate_attention_stages": (2, 3),
      "dtype": "float32",
      "embed_dim": 16,
      "segmentation_classes": 6,
      "classify_at_stride4": True,
      "detection": False,
  }
  return ml_collections.ConfigDict(values | fields)


def _random_arrays(abstract_tree, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), abstract_tree)


def test_encoder_sits_at_root_like_classification():
  from uem_ich_jax.train import classification

  multi = nnx.eval_shape(lambda: multitask.build_model(_model_config(), seed=0))
  single = nnx.eval_shape(lambda: classification.build_model(_model_config(), seed=0))
  _, multi_params, _, multi_extra = stages.split_model(multi)
  _, single_params, _, single_extra = stages.split_model(single)
  multi_flat = stages.flatten(multi_params)
  single_flat = stages.flatten(single_params)
  # Every classification-model parameter (encoder and head) has the same path and shape.
  for name, leaf in single_flat.items():
    assert multi_flat[name].shape == leaf.shape, name
  extra_names = set(multi_flat) - set(single_flat)
  assert extra_names and all(name.startswith("head_segmentation/") for name in extra_names)
  # Statistics the multi-task model adds (its heads' BatchNorm) stay out of encoder exports.
  added_extra = set(stages.flatten(multi_extra)) - set(stages.flatten(single_extra))
  assert added_extra and all(name.startswith("head") for name in added_extra)


def test_init_from_ssl_style_export():
  from uem_ich_jax.train import ssl

  ssl_model = nnx.eval_shape(lambda: ssl.build_model(_model_config(decoder_width=32), seed=0))
  _, ssl_params, _, ssl_extra = stages.split_model(ssl_model)
  exported_params = _random_arrays(ssl_params["encoder"], seed=1)
  exported_extra = _random_arrays(ssl_extra.get("encoder", {}), seed=2)

  multi = nnx.eval_shape(lambda: multitask.build_model(_model_config(), seed=0))
  _, params, _, extra = stages.split_model(multi)
  target_params = _random_arrays(params, seed=3)
  target_extra = _random_arrays(extra, seed=4)
  copied_params, copied = stages.copy_encoder(
      target_params, exported_params, head_prefix="head", source_name="ssl export"
  )
  assert copied
  copied_extra, _ = stages.copy_encoder(
      target_extra, exported_extra, head_prefix="head", source_name="ssl export"
  )
  flat = stages.flatten(copied_params)
  for name, array in stages.flatten(exported_params).items():
    np.testing.assert_array_equal(flat[name], array, err_msg=name)
  untouched = stages.flatten(target_params)
  for name in flat:
    if name.startswith("head"):
      np.testing.assert_array_equal(flat[name], untouched[name], err_msg=name)
  for name, array in stages.flatten(exported_extra).items():
    np.testing.assert_array_equal(stages.flatten(copied_extra)[name], array, err_msg=name)

  # The multitask encoder export feeds the classification model in turn.
  from uem_ich_jax.train import classification

  export = multitask.STAGE.encoder_arrays(copied_params, head_prefix="head")
  assert not any(name.startswith("head") for name in export)
  single = nnx.eval_shape(lambda: classification.build_model(_model_config(), seed=0))
  _, single_params, _, _ = stages.split_model(single)
  stages.copy_encoder(_random_arrays(single_params), export, head_prefix="head", source_name="multitask export")


def test_export_without_segmentation_head_fails_for_multitask():
  multi = nnx.eval_shape(lambda: multitask.build_model(_model_config(), seed=0))
  _, params, _, _ = stages.split_model(multi)
  arrays = _random_arrays(params)
  partial = dict(arrays)
  del partial["stem_conv"]
  with pytest.raises(InputError, match="outside the head"):
    stages.copy_encoder(arrays, partial, head_prefix="head", source_name="partial export")


# ------------------------------------------------------------- Runs ---

DATASET = "synthetic_ich/slices_multitask_tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  directory = tmp_path_factory.mktemp("tfds")
  config = SyntheticIchConfig(
      name="slices_multitask_tiny", num_scans=10, num_slices=4, image_size=64, num_folds=5
  )
  SyntheticIch(config=config, data_dir=str(directory), file_format="array_record").download_and_prepare()
  return directory


@pytest.mark.slow  # compiles the atto multi-task steps: about 90 s cold, 21 s with a warm JAX cache (2 busy CPU cores)
@pytest.mark.parametrize(
    "schedule,detection,dtype,remat",
    [
        ("alternating", True, "float32", "none"),
        # What accelerator runs use: bfloat16 compute with losses and norms in
        # float32, and rematerialised encoder blocks.
        ("mixed", False, "bfloat16", "block"),
    ],
)
def test_smoke_run_trains_and_evaluates(
    request, data_dir, tmp_path, schedule, detection, dtype, remat
):
  from uem_ich_jax.train import config_file
  from uem_ich_jax.train import trainer

  path = request.config.rootpath / "configs" / "multitask_synthetic.py"
  overrides = {
      "data.data_dir": str(data_dir),
      "data.name": DATASET,
      "multitask.schedule": schedule,
      "multitask.detection": detection,
      "model.dtype": dtype,
      "model.remat": remat,
      "init_from": "random",
  }
  config = config_file.load(f"{path}:smoke", [f"--config.{k}={v}" for k, v in overrides.items()])
  summary = trainer.train(config, tmp_path)
  assert summary["step"] == 4
  train = summary["train"]
  for name in ("loss", "classification", "segmentation", "segmentation_dice", "grad_norm"):
    assert np.isfinite(train[name]), name
  validation = summary["validation"]
  assert 0.0 <= validation["dice_3d"] <= 1.0
  assert "volume_absolute_error_ml" in validation
  if schedule == "alternating":
    assert 0.5 <= train["weight_segmentation"] <= 0.8
  assert ("map50" in validation) == detection
  result = trainer.evaluate(tmp_path)
  # Slices regroup into whole scans of 4 slices each.
  assert result["segmentation"]["n_scans"] * 4 == result["n"]
  assert "classification" in result
  assert ("detection" in result) == detection
  json.dumps(result, allow_nan=False)
