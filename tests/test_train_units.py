"""Trainer parts without a training run: schedules, losses, sharding rules, config parsing."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from uem_ich_jax.errors import InputError
from uem_ich_jax.train import config_file, losses, mesh, optim, trainer

CONFIG = "configs/classification_synthetic.py"


@pytest.fixture
def repo_config(request):
  return str(request.config.rootpath / CONFIG)


# ------------------------------------------------------------- Schedule ---


def test_schedule_warms_up_linearly_then_holds_the_floor():
  schedule = optim.warmup_cosine(2.0, total_steps=100, warmup_steps=10, floor_fraction=0.05)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 2.0, rtol=1e-6)
  # Halfway through the cosine: the mean of peak and floor.
  np.testing.assert_allclose(float(schedule(55)), (2.0 + 0.1) / 2, rtol=1e-5)
  for step in (100, 150, 10_000):
    np.testing.assert_allclose(float(schedule(step)), 0.1, rtol=1e-6)
  values = [float(schedule(step)) for step in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert min(values) >= 0.1 - 1e-7


@pytest.mark.parametrize(
    "kwargs", [dict(warmup_steps=100), dict(warmup_steps=-1), dict(floor_fraction=1.5)]
)
def test_schedule_rejects_impossible_settings(kwargs):
  settings = dict(total_steps=100, warmup_steps=10, floor_fraction=0.0) | kwargs
  with pytest.raises(InputError):
    optim.warmup_cosine(1.0, **settings)


def _optim_config(**changes):
  config = ml_collections.ConfigDict(
      dict(
          encoder_lr=1e-3,
          head_lr=1e-1,
          head_prefix="head",
          warmup_steps=0,
          floor_fraction=1.0,
          weight_decay=0.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          clip_norm=0.0,
          accumulate_steps=1,
      )
  )
  config.update(changes)
  return config


def test_encoder_and_head_get_their_own_learning_rates():
  params = {"stem": {"kernel": jnp.ones((3,))}, "head": {"kernel": jnp.ones((3,))}}
  tx, _ = optim.create_optimizer(_optim_config(), params, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves each parameter by its learning rate.
  np.testing.assert_allclose(updates["stem"]["kernel"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["head"]["kernel"], -1e-1, rtol=1e-4)


def test_accumulation_applies_the_mean_gradient_every_k_steps():
  params = {"head": {"kernel": jnp.zeros((2,))}}
  tx, _ = optim.create_optimizer(
      _optim_config(accumulate_steps=2, b1=0.0, b2=0.0), params, total_steps=10
  )
  state = tx.init(params)
  first, state = tx.update({"head": {"kernel": jnp.array([1.0, -3.0])}}, state, params)
  np.testing.assert_array_equal(first["head"]["kernel"], 0.0)
  second, _ = tx.update({"head": {"kernel": jnp.array([3.0, 1.0])}}, state, params)
  # Mean gradient (2, -1); with b1 = b2 = 0 Adam moves by lr * sign.
  np.testing.assert_allclose(second["head"]["kernel"], [-0.1, 0.1], rtol=1e-4)


# --------------------------------------------------------------- Losses ---


def test_focal_loss_matches_a_hand_computation():
  logits = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
  labels = np.array([[1, 0], [0, 1]], np.float32)
  alpha, gamma = 0.25, 2.0
  expected = np.zeros_like(logits)
  for index in np.ndindex(logits.shape):
    p = 1 / (1 + math.exp(-logits[index]))
    if labels[index]:
      expected[index] = -alpha * (1 - p) ** gamma * math.log(p)
    else:
      expected[index] = -(1 - alpha) * p**gamma * math.log(1 - p)
  got = losses.sigmoid_focal(jnp.asarray(logits), jnp.asarray(labels), alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_focal_loss_without_focusing_or_weighting_is_bce():
  logits = jnp.array([[-4.0, 0.0, 7.0]])
  labels = jnp.array([[1.0, 0.0, 1.0]])
  np.testing.assert_allclose(
      losses.sigmoid_focal(logits, labels, alpha=-1.0, gamma=0.0),
      losses.sigmoid_bce(logits, labels),
      rtol=1e-6,
  )
  expected = [math.log1p(math.exp(4.0)), math.log(2.0), math.log1p(math.exp(-7.0))]
  np.testing.assert_allclose(losses.sigmoid_bce(logits, labels)[0], expected, rtol=1e-6)


def test_losses_are_float32_for_bfloat16_logits():
  logits = jnp.full((2, 6), 30.0, jnp.bfloat16)
  labels = jnp.zeros((2, 6))
  assert losses.sigmoid_focal(logits, labels).dtype == jnp.float32
  assert losses.sigmoid_bce(logits, labels).dtype == jnp.float32


def test_masked_mean_ignores_padding_rows():
  values = jnp.array([[1.0, 3.0], [100.0, 100.0], [5.0, 7.0]])
  mask = jnp.array([True, False, True])
  np.testing.assert_allclose(losses.masked_mean(values, mask), 4.0)


# ------------------------------------------------------------- Sharding ---


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("stages/2/blocks/0/fc1/kernel", (160, 640), PartitionSpec(None, "fsdp")),
        ("stem_conv/kernel", (4, 4, 3, 128), PartitionSpec(None, None, None, "fsdp")),
        ("stages/2/blocks/0/fc1/bias", (65536,), PartitionSpec()),
        ("stages/3/grn/gamma", (1, 1, 1, 40000), PartitionSpec()),
        ("head/fc2/kernel", (256, 6), PartitionSpec()),  # below min_shard_size
        ("opt_state/1/0/mu/stages/0/fc1/kernel", (640, 160), PartitionSpec("fsdp", None)),
        ("opt_state/1/0/count", (), PartitionSpec()),
        ("odd/kernel", (129, 129), PartitionSpec()),  # nothing divides by 4
    ],
)
def test_sharding_rule_table(name, shape, expected):
  assert mesh.partition_spec(name, shape, 4, min_shard_size=4096) == expected


def test_nothing_is_sharded_without_an_fsdp_axis():
  assert mesh.partition_spec("big/kernel", (4096, 4096), 1) == PartitionSpec()


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ({"data": -1, "fsdp": 1}, 8, (8, 1)),
        ({"data": -1, "fsdp": 2}, 8, (4, 2)),
        ({"data": 2, "fsdp": -1}, 8, (2, 4)),
        ({"data": 1}, 1, (1, 1)),
    ],
)
def test_mesh_shape_fills_the_minus_one_axis(sizes, devices, expected):
  assert mesh.mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize(
    "sizes", [{"data": -1, "fsdp": 3}, {"data": 2, "fsdp": 2}, {"data": -1, "fsdp": -1}, {"model": 2}]
)
def test_mesh_shape_rejects_sizes_that_do_not_fit(sizes):
  with pytest.raises(mesh.MeshError):
    mesh.mesh_shape(sizes, 8)


def test_mesh_on_one_device_and_replicated_share():
  single = mesh.create_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1])
  tree = {"a": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}
  shardings = mesh.tree_shardings(tree, single)
  assert mesh.replicated_share(tree, shardings) == 1.0


def test_replicated_share_limit_stops_fsdp_runs():
  with pytest.raises(mesh.MeshError, match="23.7% of the parameter bytes"):
    mesh.check_replicated_share(0.237, 2, 0.1)
  mesh.check_replicated_share(0.05, 2, 0.1)
  # Without fsdp every parameter is replicated on purpose.
  mesh.check_replicated_share(1.0, 1, 0.1)


def test_distributed_mode_is_checked():
  with pytest.raises(mesh.MeshError, match="config.distributed"):
    mesh.maybe_initialize_distributed("yes")
  assert mesh.maybe_initialize_distributed("off") is False


# ---------------------------------------------------------------- Folds ---


def test_folds_keep_validation_apart_from_test():
  data = ml_collections.ConfigDict(dict(num_folds=5, test_fold=4, validation_fold=-1))
  folds = trainer.split_folds(data)
  assert folds.test == (4,)
  assert folds.validation == (0,)
  assert folds.train == (1, 2, 3)
  data.validation_fold = 4
  with pytest.raises(trainer.ConfigError, match="validation_fold"):
    trainer.split_folds(data)


# --------------------------------------------------------------- Config ---


def test_config_file_with_argument_and_overrides(repo_config):
  config = config_file.load(
      f"{repo_config}:smoke",
      [
          "--config.optim.head_lr=3e-4",
          "--config.num_steps=12",
          "--config.data.augment=true",
          "--config.data.name=synthetic_ich/slices_large",
          "--config.model.coordinate_attention_stages=(1, 3)",
          "--config.init_from_prefixes=stem_conv",
      ],
  )
  assert config.model.name == "tiny_cnn"  # from :smoke
  assert config.optim.head_lr == 3e-4
  assert isinstance(config.optim.head_lr, float)
  assert config.num_steps == 12
  assert isinstance(config.num_steps, int)
  assert config.data.augment is True
  assert config.data.name == "synthetic_ich/slices_large"
  assert config.model.coordinate_attention_stages == (1, 3)
  assert config.init_from_prefixes == ("stem_conv",)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.head_rate=1", "did you mean head_lr"),
        ("--config.nothing.at_all=1", "no field 'nothing'"),
        ("--config.num_steps=ten", "expected a number"),
        ("--config.num_steps=2.5", "expected an integer"),
        ("--config.data.augment=maybe", "expected true or false"),
        ("--config.optim=1", "group of fields"),
        ("--config.num_steps", "of the form"),
    ],
)
def test_bad_overrides_name_the_key(repo_config, override, message):
  with pytest.raises(config_file.ConfigError, match=message):
    config_file.load(repo_config, [override])


def test_bad_config_files(tmp_path, repo_config):
  with pytest.raises(config_file.ConfigError, match="does not exist"):
    config_file.load_config_file(str(tmp_path / "missing.py"))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(config_file.ConfigError, match="no get_config"):
    config_file.load_config_file(str(empty))
  with pytest.raises(config_file.ConfigError, match="unknown variant"):
    config_file.load_config_file(f"{repo_config}:huge")


def test_loaded_config_is_locked(repo_config):
  config = config_file.load(repo_config)
  with pytest.raises(AttributeError):
    config.new_field = 1


def test_rule_table_shards_convnext_over_fsdp():
  from flax import nnx

  from uem_ich_jax.models import convnext_v2
  from uem_ich_jax.train import stages

  config = convnext_v2.ConvNeXtV2Config(variant="atto")
  model = nnx.eval_shape(lambda: convnext_v2.ConvNeXtV2(config, rngs=nnx.Rngs(0)))
  _, params, _, _ = stages.split_model(model)
  total = replicated = 0
  large_replicated = []
  for name, leaf in stages.flatten(params).items():
    size = math.prod(leaf.shape)
    total += size
    if mesh.partition_spec(name, leaf.shape, 8) == PartitionSpec():
      replicated += size
      if size >= 2**14:
        large_replicated.append(name)
  assert large_replicated == []
  # Norms, GRN, biases and the head stay whole: about 5% of atto's parameters.
  assert replicated / total < 0.08


def test_checkpoints_keep_latest_and_best(tmp_path):
  from uem_ich_jax.train import checkpoint

  manager = checkpoint.CheckpointManager(tmp_path, keep=2, best_metric="val_auc_macro")
  for step, auc in ((1, 0.9), (2, 0.5), (3, 0.6), (4, 0.7), (5, None)):
    metrics = None if auc is None else {"val_auc_macro": auc}
    manager.save(step, {"w": jnp.full((3,), float(step))}, metrics=metrics)
  manager.close()

  reader = checkpoint.CheckpointManager(tmp_path, best_metric="val_auc_macro", read_only=True)
  assert reader.all_steps() == [1, 4, 5]
  assert reader.best_step() == 1
  assert reader.metrics(4) == {"val_auc_macro": 0.7}
  np.testing.assert_array_equal(reader.restore_arrays(1)["w"], [1.0, 1.0, 1.0])
  reader.close()


def test_best_step_falls_back_to_latest_without_metrics(tmp_path):
  from uem_ich_jax.train import checkpoint

  manager = checkpoint.CheckpointManager(tmp_path, keep=3, best_metric="val_auc_macro")
  for step in (1, 2):
    manager.save(step, {"w": jnp.zeros((2,))})
  manager.close()
  reader = checkpoint.CheckpointManager(tmp_path, best_metric="val_auc_macro", read_only=True)
  assert reader.best_step() == 2
  reader.close()



# --------------------------------------------------------------- TinyCNN ---


def _tiny_cnn(repo_config, **fields):
  from uem_ich_jax.train import classification

  model = config_file.load(repo_config).model.copy_and_resolve_references()
  model.name = "tiny_cnn"
  model.update(fields)
  return classification.build_model(model, seed=0)


def _parameter_shapes(model) -> dict[str, tuple[int, ...]]:
  from uem_ich_jax.train import stages

  _, params, _, _ = stages.split_model(model)
  return {name: tuple(leaf.shape) for name, leaf in stages.flatten(params).items()}


def test_tiny_cnn_defaults_keep_two_stage_names(repo_config):
  shapes = _parameter_shapes(_tiny_cnn(repo_config, width=4))
  # The names and shapes of checkpoints written before `depth` and `pool` existed.
  assert sorted({name.split("/")[0] for name in shapes}) == [
      "encoder_conv1", "encoder_conv2", "encoder_norm", "head"
  ]
  assert shapes["head/kernel"] == (8, 6)


def test_tiny_cnn_depth_and_avgmax_pool(repo_config):
  model = _tiny_cnn(repo_config, width=4, depth=4, pool="avgmax")
  shapes = _parameter_shapes(model)
  assert shapes["encoder_conv4/kernel"] == (3, 3, 16, 32)
  assert "encoder_conv5/kernel" not in shapes
  assert "encoder_norm3/scale" in shapes
  assert "encoder_norm4/scale" not in shapes  # no norm on the last stage
  assert shapes["head/kernel"] == (64, 6)  # average and max of 32 channels
  logits = model(jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 6)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "fields, message", [({"depth": 0}, "depth"), ({"pool": "median"}, "pool")]
)
def test_tiny_cnn_rejects_bad_fields(repo_config, fields, message):
  with pytest.raises(InputError, match=message):
    _tiny_cnn(repo_config, **fields)
