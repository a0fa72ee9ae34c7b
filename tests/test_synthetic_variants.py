"""The `synthetic_ich` variants that store phantom scans under each real builder's features."""

import collections
import dataclasses
import importlib
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax.data import pipeline
from uem_ich_jax.datasets.synthetic_ich import (
    REAL_CONFIGS,
    SyntheticIch,
    SyntheticIchConfig,
    VariantFeatureError,
    fold_ranges,
    num_slices_of,
    variant_name,
)
from uem_ich_jax.datasets.synthetic_ich import variants

REAL_DATASETS = ("rsna_ich", "physionet_ct_ich", "bhsd", "cq500")
VARIANT_NAMES = [variant_name(dataset, config) for dataset, config, _ in REAL_CONFIGS]


def _real_builder_class(dataset):
  importlib.import_module(f"uem_ich_jax.datasets.{dataset}")
  return tfds.builder_cls(dataset)


def _real_features_json(dataset, config, image_size, tmp_path):
  """Return the real builder's features at `image_size`, read without the variants module."""
  builder_class = _real_builder_class(dataset)
  real_config = dataclasses.replace(
      builder_class.builder_configs[config], name=f"{config}_test", image_size=image_size
  )
  builder = builder_class(config=real_config, data_dir=str(tmp_path / "absent"))
  return json.dumps(builder.info.features.to_json(), sort_keys=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every variant built once, as {variant name: data source}."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources = {}
  for name in VARIANT_NAMES:
    builder = SyntheticIch(config=name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    sources[name] = builder.as_data_source(split="train")
  return sources


def _examples(source):
  return [source[index] for index in range(len(source))]


# ------------------------------------------------------------ Configs ---


def test_variant_table_lists_every_real_config():
  real = {
      (dataset, name)
      for dataset in REAL_DATASETS
      for name in _real_builder_class(dataset).builder_configs
  }
  assert {(dataset, config) for dataset, config, _ in REAL_CONFIGS} == real


def test_variants_registered_but_not_built_by_default():
  configs = SyntheticIch.builder_configs
  for dataset, config, layout in REAL_CONFIGS:
    variant = configs[variant_name(dataset, config)]
    assert variant.mirrors == f"{dataset}/{config}"
    assert variant.layout == layout
    assert variant.image_size == 64
  assert set(SyntheticIch.DEFAULT_BUILD_CONFIGS) == {"slices", "scans"}


@pytest.mark.parametrize("dataset,config", [(d, c) for d, c, _ in REAL_CONFIGS])
def test_variant_features_equal_real(dataset, config, tmp_path):
  variant = SyntheticIch(
      config=variant_name(dataset, config), data_dir=str(tmp_path / "synthetic")
  )
  stored = json.dumps(variant.info.features.to_json(), sort_keys=True)
  assert stored == _real_features_json(dataset, config, 64, tmp_path)


@pytest.mark.parametrize("dataset,config", [(d, c) for d, c, _ in REAL_CONFIGS])
def test_every_real_feature_has_filler(dataset, config):
  features = set(variants.real_features(dataset, config, 64))
  assert features <= variants.known_features(dataset), features - variants.known_features(dataset)


def test_unknown_feature_names_dataset_config_and_feature():
  features = tfds.features.FeaturesDict({
      "fold": np.int32,
      "reader_confidence": tfds.features.Tensor(shape=(3,), dtype=np.float32),
  })
  with pytest.raises(VariantFeatureError, match=r"cq500/scans: .*'reader_confidence'"):
    variants.fill_example(
        features,
        dataset="cq500",
        config="scans",
        scan=None,
        windows=np.zeros((1, 8, 8, 3), np.uint8),
        fold=0,
        slice_index=None,
    )


def test_unknown_real_config_rejected():
  with pytest.raises(VariantFeatureError, match="cq500 has no config 'case_scans'"):
    variants.real_features("cq500", "case_scans", 64)


def test_extra_slices_needs_mirrors():
  assert num_slices_of(SyntheticIchConfig(name="plain", num_slices=6), 5) == 6
  with pytest.raises(ValueError, match="extra_slices needs `mirrors`"):
    num_slices_of(SyntheticIchConfig(name="odd", extra_slices=2), 1)


# -------------------------------------------------------------- Builds ---


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_folds_match_metadata(built, name):
  source = built[name]
  metadata = dict(source.dataset_info.metadata.items())
  examples = _examples(source)
  assert metadata["fold_ranges"]["train"] == fold_ranges([int(e["fold"]) for e in examples])
  assert metadata["bad_files"]["skipped"] == 0
  folds_of_patient = collections.defaultdict(set)
  for example in examples:
    folds_of_patient[example["patient_id"]].add(int(example["fold"]))
  assert all(len(folds) == 1 for folds in folds_of_patient.values())


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_images_and_geometry(built, name):
  for example in _examples(built[name]):
    image = example["image"]
    assert image.dtype == np.uint8
    assert image.shape[-3:] == (64, 64, 3)
    assert image.max() > 200, "no bone in the bone window"
    assert example["spacing"][1] == pytest.approx(230.0 / 64)
    assert example["affine"][3].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("name", [n for n in VARIANT_NAMES if n.endswith("scans")])
def test_scan_variants_vary_in_length(built, name):
  lengths = set()
  for example in _examples(built[name]):
    num_slices = example["image"].shape[0]
    lengths.add(num_slices)
    for key in ("mask", "slice_labels", "slice_fracture", "slice_numbers", "hu_unwrapped",
                "sop_instance_uids"):
      if key in example:
        assert len(example[key]) == num_slices, key
    if "slice_labels" in example:
      np.testing.assert_array_equal(example["labels"], example["slice_labels"].max(axis=0))
  assert lengths == {6, 7, 8}


def test_physionet_masks_binary_and_match_labels(built):
  for name in ("physionet_ct_ich_slices", "physionet_ct_ich_scans"):
    positive = 0
    for example in _examples(built[name]):
      mask = example["mask"]
      assert set(np.unique(mask).tolist()) <= {0, 1}, name
      assert int(example["labels"][0]) == int(mask.any()), name
      positive += int(mask.any())
    assert positive > 0, f"{name} has no bleed; the checks tested nothing"


def test_physionet_slice_numbers_count_from_one(built):
  examples = _examples(built["physionet_ct_ich_slices"])
  for example in examples:
    assert int(example["slice_number"]) == int(example["slice_index"]) + 1
    assert np.isnan(example["age_years"])
  scans = _examples(built["physionet_ct_ich_scans"])
  np.testing.assert_array_equal(scans[0]["slice_numbers"], np.arange(1, 7))
  for scan in scans:
    assert int(scan["fracture"]) == int(scan["slice_fracture"].max())


def test_class_id_masks_agree_with_labels(built):
  for name in ("bhsd_slices", "bhsd_scans"):
    for example in _examples(built[name]):
      mask, labels = example["mask"], example["labels"]
      for subtype, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
        position = uem_ich_jax.SLICE_LABELS.index(subtype)
        assert labels[position] == int((mask == class_id).any()), (name, subtype)
  for scan in _examples(built["bhsd_scans"]):
    for subtype, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
      volume = scan["hematoma_ml"][uem_ich_jax.SUBTYPES.index(subtype)]
      assert (volume > 0) == bool((scan["mask"] == class_id).any()), subtype


def test_cq500_slices_have_scan_labels_and_boxes(built):
  examples = _examples(built["cq500_slices"])
  assert "labels" not in examples[0]
  boxes = 0
  for example in examples:
    cq500 = dict(zip(uem_ich_jax.CQ500_LABELS, example["cq500_labels"].tolist()))
    assert cq500["ICH"] == int(example["scan_labels"][0])
    assert bool(example["boxes_known"])
    for box, class_id in zip(example["boxes"], example["box_classes"]):
      assert 1 <= class_id <= 5
      assert 0 <= box[0] < box[2] <= 64, box
      assert 0 <= box[1] < box[3] <= 64, box
      boxes += 1
  assert boxes > 0, "no box in cq500_slices; the box checks tested nothing"


def test_cq500_scans_readers_agree(built):
  for scan in _examples(built["cq500_scans"]):
    assert scan["reader_cq500_labels"].shape == (3, 14)
    for row in scan["reader_cq500_labels"]:
      np.testing.assert_array_equal(row, scan["cq500_labels"])


def test_rsna_slice_uids_unique(built):
  uids = [e["sop_instance_uid"] for e in _examples(built["rsna_ich_slices"])]
  assert len(set(uids)) == len(uids)
  scans = _examples(built["rsna_ich_scans"])
  assert [len(s["sop_instance_uids"]) for s in scans] == [s["image"].shape[0] for s in scans]


# ------------------------------------------------ Stage field checks ---


def _smoke_config(request, config_file_name, data_dir, dataset, **changes):
  from uem_ich_jax.train import config_file

  path = request.config.rootpath / "configs" / config_file_name
  overrides = {"data.data_dir": data_dir, "data.name": f"synthetic_ich/{dataset}", **changes}
  return config_file.load(f"{path}:smoke", [f"--config.{k}={v}" for k, v in overrides.items()])


def _data_dir(source):
  # The data source's folder is DATA_DIR/synthetic_ich/CONFIG/VERSION.
  return str(pathlib.Path(source.dataset_info.data_dir).parents[2])


def test_missing_feature_fails_before_training(request, built):
  from uem_ich_jax.train import trainer

  config = _smoke_config(
      request, "classification_synthetic.py", _data_dir(built["cq500_slices"]), "cq500_slices"
  )
  with pytest.raises(pipeline.DataPipelineError, match=r"cq500_slices' has no feature 'labels'"):
    trainer.dataset_source(config)


def test_scan_dataset_rejected_by_slice_stage(request, built):
  from uem_ich_jax.train import trainer

  config = _smoke_config(
      request, "ssl_pretrain.py", _data_dir(built["bhsd_scans"]), "bhsd_scans"
  )
  with pytest.raises(pipeline.DataPipelineError, match=r"stores scans .* needs slices"):
    trainer.dataset_source(config)


def test_layout_named_before_missing_fields(request, built):
  from uem_ich_jax.train import trainer

  # bhsd_scans also lacks `slice_index`, but the layout is what to change.
  config = _smoke_config(
      request, "multitask_synthetic.py", _data_dir(built["bhsd_scans"]), "bhsd_scans"
  )
  with pytest.raises(pipeline.DataPipelineError, match=r"stores scans .* needs slices"):
    trainer.dataset_source(config)


def test_slice_dataset_rejected_by_scan_stage(request, built):
  from uem_ich_jax.train import trainer

  config = _smoke_config(
      request, "aggregator_synthetic.py", _data_dir(built["bhsd_slices"]), "bhsd_slices"
  )
  with pytest.raises(pipeline.DataPipelineError, match=r"stores slices .* needs scans"):
    trainer.dataset_source(config)


def test_multitask_needs_boxes_only_with_detection(request, built):
  from uem_ich_jax.train import multitask, stages, trainer

  data_dir = _data_dir(built["bhsd_slices"])
  config = _smoke_config(request, "multitask_synthetic.py", data_dir, "bhsd_slices")
  keys = stages.batch_keys(multitask.STAGE, config)
  assert "boxes" not in keys
  assert "mask" in keys
  assert len(trainer.dataset_source(config)) == len(built["bhsd_slices"])
  with_boxes = _smoke_config(
      request, "multitask_synthetic.py", data_dir, "bhsd_slices", **{"multitask.detection": True}
  )
  with pytest.raises(pipeline.DataPipelineError, match="no feature 'boxes', 'box_classes'"):
    trainer.dataset_source(with_boxes)


def test_multitask_rejects_binary_masks_for_six_classes(request, built):
  from uem_ich_jax.errors import InputError
  from uem_ich_jax.train import trainer

  source = built["physionet_ct_ich_slices"]
  assert dict(source.dataset_info.metadata.items())["num_mask_classes"] == 2
  data_dir = _data_dir(source)
  config = _smoke_config(request, "multitask_synthetic.py", data_dir, "physionet_ct_ich_slices")
  with pytest.raises(InputError, match="masks with 2 classes .* set it to 1 for a binary head"):
    trainer.dataset_source(config)
  binary = _smoke_config(
      request, "multitask_synthetic.py", data_dir, "physionet_ct_ich_slices",
      **{"model.segmentation_classes": 1},
  )
  assert len(trainer.dataset_source(binary)) == len(source)


def test_class_id_variants_store_six_mask_classes(built):
  for name in ("bhsd_slices", "bhsd_scans"):
    assert dict(built[name].dataset_info.metadata.items())["num_mask_classes"] == 6
  assert "num_mask_classes" not in dict(built["rsna_ich_slices"].dataset_info.metadata.items())


# ----------------------------------------------------------- Smoke runs ---

# One smoke run per stage on a layout that its own synthetic data lacks: no
# slice labels (cq500_slices), no boxes (bhsd_slices), binary masks
# (physionet_ct_ich_slices), scans of 6 to 8 slices (rsna_ich_scans).
SMOKE_PAIRS = [
    ("classification_synthetic.py", "physionet_ct_ich_slices", {}),
    ("multitask_synthetic.py", "bhsd_slices", {"init_from": "random"}),
    ("aggregator_synthetic.py", "rsna_ich_scans",
     {"model.image_size": variants.VARIANT_IMAGE_SIZE}),
]


# Each pair trains its smoke config for a few steps. With a cold JAX cache on
# 2 CPU cores, the runs took 44 s (multitask), 21 s (aggregator) and 4 s
# (classification). SSL is left out because it reads only `image`, which every
# slice layout has. `test_missing_feature_fails_before_training` and the tests
# near it check the fields.
@pytest.mark.slow
@pytest.mark.parametrize("config_file_name,dataset,changes", SMOKE_PAIRS)
def test_stage_smoke_on_real_layout(request, built, tmp_path, config_file_name, dataset, changes):
  from uem_ich_jax.train import trainer

  data_dir = _data_dir(built[dataset])
  config = _smoke_config(request, config_file_name, data_dir, dataset, **changes)
  summary = trainer.train(config, tmp_path)
  assert summary["step"] == config.num_steps
  for name, value in summary["train"].items():
    assert np.isfinite(value), name


# ------------------------------------------------- Scan batching ---


def _per_slice_features(features):
  """Name the scan features with one entry per slice: a leading dimension of unknown length."""
  return {
      name for name, feature in features.items() if feature.shape and feature.shape[0] is None
  }


@pytest.mark.parametrize("dataset,config", [(d, c) for d, c, layout in REAL_CONFIGS
                                            if layout == "scans"])
def test_real_per_slice_features_are_slice_fields(dataset, config):
  per_slice = _per_slice_features(variants.real_features(dataset, config, 64))
  assert "image" in per_slice
  assert per_slice <= set(pipeline.SLICE_FIELDS), per_slice - set(pipeline.SLICE_FIELDS)


@pytest.mark.parametrize("name", [n for n in VARIANT_NAMES if n.endswith("scans")])
def test_scans_of_different_lengths_batch(built, name):
  source = built[name]
  batch = next(iter(pipeline.train_dataset(
      source, folds=[0, 1, 2, 3, 4], batch_size=3, seed=0, augment=None,
      shard_index=0, shard_count=1, slice_buckets=(8,),
  )))
  per_slice = _per_slice_features(source.dataset_info.features) | {"slice_mask"}
  for key in per_slice:
    assert np.shape(batch[key])[:2] == (3, 8), key
  lengths = batch["slice_mask"].sum(axis=1)
  assert set(lengths.tolist()) <= {6, 7, 8}
  if "hu_unwrapped" in batch:
    assert not batch["hu_unwrapped"].any()
    for row, length in enumerate(lengths):
      assert all(batch["sop_instance_uids"][row, length:] == b"")
      assert all(batch["sop_instance_uids"][row, :length] != b"")


def test_long_scans_subsample_every_slice_field(built):
  source = built["physionet_ct_ich_scans"]
  batch = next(iter(pipeline.train_dataset(
      source, folds=[0, 1, 2, 3, 4], batch_size=2, seed=0, augment=None,
      shard_index=0, shard_count=1, slice_buckets=(4,),
  )))
  for key in ("image", "mask", "slice_labels", "slice_fracture", "slice_numbers"):
    assert np.shape(batch[key])[:2] == (2, 4), key
  for row in batch["slice_numbers"]:
    # even_slice_indices keeps the first and the last slice.
    assert row[0] == 1
    assert row[-1] in (6, 7, 8)
