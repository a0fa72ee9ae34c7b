"""The grain pipeline: augmentation, folds, determinism, eval padding and resume."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from uem_ich_jax import data
from uem_ich_jax.ct.windowing import uint8_to_model_input
from uem_ich_jax.data import augment
from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig
from uem_ich_jax.errors import InputError

NUM_SCANS = 10
NUM_SLICES = 5
NUM_FOLDS = 3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  config = SyntheticIchConfig(
      name="slices_pipeline",
      num_scans=NUM_SCANS,
      num_slices=NUM_SLICES,
      image_size=48,
      num_folds=NUM_FOLDS,
  )
  builder = SyntheticIch(
      config=config, data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record"
  )
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def scan_source(tmp_path_factory):
  config = SyntheticIchConfig(
      name="scans_pipeline", layout="scans", num_scans=6, num_slices=4, image_size=32, num_folds=2
  )
  builder = SyntheticIch(
      config=config, data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record"
  )
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


class _WithoutMetadata:
  """A data source that hides the builder metadata, as a builder without fold ranges would."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]


def _asymmetric_example(rows=32, columns=40):
  image = np.linspace(-1, 1, rows * columns * 3, dtype=np.float32).reshape(rows, columns, 3)
  mask = np.zeros((rows, columns), np.uint8)
  mask[4:10, 3:8] = 5  # Left side only.
  mask[20:23, 30:37] = 2
  boxes = np.array([[4, 3, 10, 8], [20, 30, 23, 37]], np.float32)
  return {
      "image": image,
      "mask": mask,
      "boxes": boxes,
      "box_classes": np.array([5, 2], np.int32),
      "spacing": np.array([5.0, 1.0, 1.0], np.float32),
  }


def _mask_box(mask, class_id):
  rows, columns = np.nonzero(mask == class_id)
  return np.array([rows.min(), columns.min(), rows.max() + 1, columns.max() + 1], np.float32)


def test_flip_moves_image_mask_and_boxes():
  example = _asymmetric_example()
  out = augment.apply_augmentation(example, augment.AugmentParams(flip=True))
  np.testing.assert_array_equal(out["mask"], example["mask"][:, ::-1])
  np.testing.assert_allclose(out["image"], example["image"][:, ::-1], atol=1e-5)
  np.testing.assert_array_equal(out["box_classes"], example["box_classes"])
  for box, class_id in zip(out["boxes"], out["box_classes"]):
    np.testing.assert_allclose(box, _mask_box(out["mask"], class_id), atol=1e-4)


def test_flip_swaps_bleed_side_labels():
  import uem_ich_jax

  names = uem_ich_jax.CQ500_LABELS
  labels = np.zeros(len(names), np.uint8)
  labels[names.index("BleedLocation-Left")] = 1
  labels[names.index("SDH")] = 1
  example = dict(_asymmetric_example(), cq500_labels=labels)
  flipped = augment.apply_augmentation(example, augment.AugmentParams(flip=True))["cq500_labels"]
  assert flipped[names.index("BleedLocation-Right")] == 1
  assert flipped[names.index("BleedLocation-Left")] == 0
  assert flipped[names.index("SDH")] == 1
  assert flipped.sum() == 2
  rotated = augment.apply_augmentation(example, augment.AugmentParams(rotation_deg=10.0))
  np.testing.assert_array_equal(rotated["cq500_labels"], labels)


def test_rotation_and_scale_keep_boxes_around_mask():
  example = _asymmetric_example()
  params = augment.AugmentParams(flip=True, rotation_deg=20.0, scale=1.1)
  out = augment.apply_augmentation(example, params)
  assert set(np.unique(out["mask"]).tolist()) == {0, 2, 5}
  for box, class_id in zip(out["boxes"], out["box_classes"]):
    tight = _mask_box(out["mask"], class_id)
    # The warped box contains the warped region, with at most a pixel of
    # nearest-neighbour slack, and is not much larger than it.
    assert box[0] <= tight[0] + 1
    assert box[1] <= tight[1] + 1
    assert box[2] >= tight[2] - 1
    assert box[3] >= tight[3] - 1
    assert (box[2] - box[0]) * (box[3] - box[1]) < 3 * (tight[2] - tight[0]) * (tight[3] - tight[1])


def test_boxes_from_warped_mask_stay_tight():
  example = _asymmetric_example()
  params = augment.AugmentParams(rotation_deg=15.0, scale=1.1, boxes_from_mask=True)
  out = augment.apply_augmentation(example, params)
  np.testing.assert_array_equal(out["box_classes"], [2, 5])
  for box, class_id in zip(out["boxes"], out["box_classes"]):
    np.testing.assert_array_equal(box, _mask_box(out["mask"], class_id))
  # Around the warped corners, the same rotation gives a box larger than the region.
  corners = augment.apply_augmentation(example, dataclasses.replace(params, boxes_from_mask=False))
  corner_box = corners["boxes"][list(corners["box_classes"]).index(5)]
  tight = _mask_box(out["mask"], 5)
  assert (corner_box[2] - corner_box[0]) * (corner_box[3] - corner_box[1]) > 1.2 * (
      (tight[2] - tight[0]) * (tight[3] - tight[1])
  )


def test_boxes_from_warped_mask_need_the_spacing():
  example = _asymmetric_example()
  del example["spacing"]
  params = augment.AugmentParams(rotation_deg=15.0, boxes_from_mask=True)
  with pytest.raises(InputError, match="spacing"):
    augment.apply_augmentation(example, params)


def test_box_pushed_out_of_image_is_dropped():
  example = _asymmetric_example()
  example["boxes"] = np.array([[0, 0, 2, 2]], np.float32)
  example["box_classes"] = np.array([1], np.int32)
  out = augment.apply_augmentation(example, augment.AugmentParams(scale=3.0))
  assert out["boxes"].shape == (0, 4)
  assert out["box_classes"].shape == (0,)


def test_brightness_contrast_leave_mask_and_boxes():
  example = _asymmetric_example()
  params = augment.AugmentParams(
      brightness=np.array([0.1, -0.1, 0.05]), contrast=np.array([1.1, 0.9, 1.0])
  )
  out = augment.apply_augmentation(example, params)
  np.testing.assert_array_equal(out["mask"], example["mask"])
  np.testing.assert_array_equal(out["boxes"], example["boxes"])
  assert not np.allclose(out["image"], example["image"])
  assert out["image"].min() >= -1.0
  assert out["image"].max() <= 1.0
  # Channel 2 only gets the offset, since its contrast factor is 1.
  np.testing.assert_allclose(
      out["image"][..., 2], np.clip(example["image"][..., 2] + 0.05, -1, 1), atol=1e-6
  )


def test_augment_warps_every_slice_of_a_scan():
  example = _asymmetric_example()
  scan = {
      "image": np.stack([example["image"]] * 3),
      "mask": np.stack([example["mask"]] * 3),
  }
  out = augment.apply_augmentation(scan, augment.AugmentParams(flip=True))
  for index in range(3):
    np.testing.assert_array_equal(out["mask"][index], example["mask"][:, ::-1])


def test_random_augment_same_seed_same_result():
  example = _asymmetric_example()
  config = augment.AugmentConfig()
  first = augment.random_augment(example, np.random.default_rng(7), config)
  second = augment.random_augment(example, np.random.default_rng(7), config)
  other = augment.random_augment(example, np.random.default_rng(8), config)
  np.testing.assert_array_equal(first["image"], second["image"])
  np.testing.assert_array_equal(first["mask"], second["mask"])
  assert not np.array_equal(first["image"], other["image"])


def test_fold_indices_from_metadata_match_a_full_read(source):
  for fold in range(NUM_FOLDS):
    from_metadata = data.fold_indices(source, [fold])
    expected = [i for i in range(len(source)) if int(source[i]["fold"]) == fold]
    np.testing.assert_array_equal(from_metadata, expected)
    np.testing.assert_array_equal(data.fold_indices(_WithoutMetadata(source), [fold]), expected)


def test_fold_indices_rejects_empty_folds(source):
  with pytest.raises(data.DataPipelineError, match="folds is empty"):
    data.fold_indices(source, [])


def test_other_folds():
  assert data.other_folds(1, 3) == [0, 2]
  with pytest.raises(data.DataPipelineError, match="outside"):
    data.other_folds(3, 3)


def _train(source, seed, **kwargs):
  options = dict(folds=[0, 1], batch_size=4, seed=seed, shard_index=0, shard_count=1)
  options.update(kwargs)
  return data.train_dataset(source, **options)


def _take(dataset_or_iterator, count):
  iterator = iter(dataset_or_iterator)
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batches_shapes_and_folds(source):
  batches = _take(_train(source, seed=0), 6)
  for batch in batches:
    assert batch["image"].shape == (4, 48, 48, 3)
    assert batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0
    assert batch["image"].max() <= 1.0
    assert batch["boxes"].shape == (4, 16, 4)
    assert batch["box_classes"].shape == (4, 16)
    assert batch["valid"].all()
    assert set(batch["fold"].tolist()) <= {0, 1}


def test_train_batches_of_whole_scans(scan_source):
  dataset = data.train_dataset(
      scan_source, folds=[0, 1], batch_size=2, seed=0, shard_index=0, shard_count=1
  )
  batch = _take(dataset, 1)[0]
  assert batch["image"].shape == (2, 4, 32, 32, 3)
  assert batch["mask"].shape == (2, 4, 32, 32)
  assert batch["slice_labels"].shape == (2, 4, 6)
  assert "boxes" not in batch


def test_train_without_augment_is_stored_image(source):
  batch = _take(_train(source, seed=0, augment=None), 1)[0]
  for image, scan_id, slice_index in zip(batch["image"], batch["scan_id"], batch["slice_index"]):
    index = next(
        i
        for i in range(len(source))
        if source[i]["scan_id"] == scan_id and int(source[i]["slice_index"]) == slice_index
    )
    np.testing.assert_array_equal(image, uint8_to_model_input(source[index]["image"]))


def test_train_same_seed_same_batches(source):
  _assert_batches_equal(_take(_train(source, seed=5), 4), _take(_train(source, seed=5), 4))
  first = _take(_train(source, seed=5), 1)[0]
  other = _take(_train(source, seed=6), 1)[0]
  assert not np.array_equal(first["image"], other["image"])


def test_train_shards_are_disjoint(source):
  seen = []
  for shard_index in range(2):
    dataset = _train(source, seed=0, batch_size=2, num_epochs=1, augment=None,
                     shard_index=shard_index, shard_count=2)
    keys = [(s, int(i)) for batch in dataset for s, i in zip(batch["scan_id"], batch["slice_index"])]
    seen.append(set(keys))
    assert len(keys) == len(set(keys))
  assert not seen[0] & seen[1]
  assert len(seen[0]) == len(seen[1])


def test_resume_from_saved_state(source):
  uninterrupted = _take(_train(source, seed=3), 7)

  iterator = iter(_train(source, seed=3))
  _take(iterator, 4)
  state = iterator.get_state()
  restored = iter(_train(source, seed=3))
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 3), uninterrupted[4:])


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_padding_counts_every_example_once(source, shard_count):
  folds = [2]
  expected = {
      (source[i]["scan_id"], int(source[i]["slice_index"])) for i in data.fold_indices(source, folds)
  }
  batch_size = 4
  assert len(expected) % batch_size != 0, "pick sizes that leave a partial batch"

  seen = []
  batch_counts = []
  for shard_index in range(shard_count):
    batches = list(data.eval_dataset(source, folds=folds, batch_size=batch_size,
                                     shard_index=shard_index, shard_count=shard_count))
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape[0] == batch_size
      for valid, scan_id, slice_index in zip(batch["valid"], batch["scan_id"], batch["slice_index"]):
        if valid:
          seen.append((scan_id, int(slice_index)))
        else:
          assert scan_id == b""
  assert len(set(batch_counts)) == 1
  assert len(seen) == len(expected)
  assert set(seen) == expected


@pytest.mark.slow
def test_worker_processes_give_in_process_batches(source):
  in_process = _take(_train(source, seed=9), 3)
  iterator = iter(_train(source, seed=9, worker_count=2))
  try:
    from_workers = _take(iterator, 3)
    # Copies, so that no grain shared-memory batch outlives the iterator.
    from_workers = [{key: np.array(value) for key, value in batch.items()} for batch in from_workers]
  finally:
    iterator.close()
  _assert_batches_equal(from_workers, in_process)


_GLOBAL_BATCH_SCRIPT = """
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from uem_ich_jax.data.global_batch import to_global_batch

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
batch = {
    "image": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2),
    "valid": np.array([True] * 6 + [False] * 2),
    "scan_id": np.array([b"a"] * 8),
}
out = to_global_batch(batch, sharding)
assert isinstance(out["image"], jax.Array)
assert out["image"].sharding == sharding
assert len(out["image"].addressable_shards) == 4
assert out["image"].addressable_shards[1].data.shape == (2, 3, 2)
np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
np.testing.assert_array_equal(np.asarray(out["valid"]), batch["valid"])
assert isinstance(out["scan_id"], np.ndarray)
print("ok")
"""


def test_global_batch_on_four_cpu_devices():
  # The device count flag works only before JAX starts, so this runs in a
  # fresh interpreter.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _GLOBAL_BATCH_SCRIPT], env=env, capture_output=True, text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("ok")


def test_load_source_of_unbuilt_dataset_names_the_build_command(tmp_path):
  with pytest.raises(data.DataPipelineError, match="uem-ich build-dataset synthetic_ich") as error:
    data.load_source("synthetic_ich/slices", data_dir=str(tmp_path))
  assert str(tmp_path) in str(error.value)
  # Nothing was built as a side effect.
  assert not (tmp_path / "synthetic_ich").exists()


def test_load_source_of_unknown_dataset(tmp_path):
  with pytest.raises(data.DataPipelineError, match="no_such_set"):
    data.load_source("no_such_set/slices", data_dir=str(tmp_path))


def test_load_source_names_unbuilt_dataset(tmp_path, caplog):
  with pytest.raises(InputError, match="not built .*uem-ich build-dataset synthetic_ich --config=slices"):
    data.load_source("synthetic_ich/slices", data_dir=str(tmp_path / "tfds"))
  assert "dataset_info.json" not in caplog.text
