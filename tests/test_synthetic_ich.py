"""The synthetic_ich builder (array_record, no TensorFlow) and `uem-ich build-dataset`."""

import collections

import numpy as np
import pytest

import uem_ich_jax
from uem_ich_jax import cli, clinical
from uem_ich_jax.ct.volume import CTVolume
from uem_ich_jax.datasets import build
from uem_ich_jax.datasets.synthetic_ich import (
    SyntheticIch,
    SyntheticIchConfig,
    fold_ranges,
    plan_scans,
)

NUM_SCANS = 8
NUM_SLICES = 6
SIZE = 64
NUM_FOLDS = 3


def _build(data_dir, layout):
  config = SyntheticIchConfig(
      name=f"{layout}_tiny",
      layout=layout,
      num_scans=NUM_SCANS,
      num_slices=NUM_SLICES,
      image_size=SIZE,
      num_folds=NUM_FOLDS,
  )
  builder = SyntheticIch(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), "slices")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), "scans")


def test_slices_feature_shapes_and_dtypes(slices):
  assert len(slices) == NUM_SCANS * NUM_SLICES
  example = slices[0]
  assert example["image"].shape == (SIZE, SIZE, 3)
  assert example["image"].dtype == np.uint8
  assert example["mask"].shape == (SIZE, SIZE)
  assert example["mask"].dtype == np.uint8
  assert example["labels"].shape == (6,)
  assert example["boxes"].ndim == 2
  assert example["boxes"].shape[1] == 4
  assert example["boxes"].dtype == np.float32
  assert example["box_classes"].shape == (example["boxes"].shape[0],)
  assert example["spacing"].shape == (3,)
  assert example["affine"].shape == (4, 4)
  assert example["affine"].dtype == np.float32
  assert isinstance(example["scan_id"], bytes)
  assert isinstance(example["patient_id"], bytes)
  assert 0 <= int(example["fold"]) < NUM_FOLDS


def test_slices_keep_generation_order(slices):
  for index in range(len(slices)):
    assert int(slices[index]["slice_index"]) == index % NUM_SLICES


def test_slice_labels_agree_with_mask(slices):
  positives = 0
  for index in range(len(slices)):
    example = slices[index]
    mask, labels = example["mask"], example["labels"]
    # Label order: any, then the subtypes whose mask class ids are 1..5.
    assert labels[0] == int((mask > 0).any())
    for name, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
      position = uem_ich_jax.SLICE_LABELS.index(name)
      assert labels[position] == int((mask == class_id).any()), (index, name)
    assert set(example["box_classes"].tolist()) == set(np.unique(mask[mask > 0]).tolist())
    for box, class_id in zip(example["boxes"], example["box_classes"]):
      r0, c0, r1, c1 = box.astype(int)
      assert (mask[r0:r1, c0:c1] == class_id).any()
    positives += int(labels[0])
  assert positives > 0, "the tiny build has no bleeding slice; the label checks tested nothing"


def test_image_holds_three_windows(slices):
  image = slices[NUM_SLICES // 2]["image"]
  # Brain, subdural and bone windows differ on the same slice.
  assert not np.array_equal(image[..., 0], image[..., 2])
  assert image.min() == 0
  assert image.max() > 200


def test_no_patient_in_two_folds(slices):
  folds_of_patient = collections.defaultdict(set)
  scans_of_patient = collections.defaultdict(set)
  for index in range(len(slices)):
    example = slices[index]
    folds_of_patient[example["patient_id"]].add(int(example["fold"]))
    scans_of_patient[example["patient_id"]].add(example["scan_id"])
  assert all(len(folds) == 1 for folds in folds_of_patient.values())
  assert any(len(ids) > 1 for ids in scans_of_patient.values()), "no follow-up scan"
  assert {f for folds in folds_of_patient.values() for f in folds} == set(range(NUM_FOLDS))


def test_metadata_fold_ranges_match_examples(slices):
  metadata = dict(slices.dataset_info.metadata.items())
  assert metadata["num_folds"] == NUM_FOLDS
  stored = [int(slices[i]["fold"]) for i in range(len(slices))]
  assert metadata["fold_ranges"]["train"] == fold_ranges(stored)


def test_two_builds_identical(slices, tmp_path):
  again = _build(tmp_path, "slices")
  assert len(again) == len(slices)
  for index in range(len(slices)):
    first, second = slices[index], again[index]
    assert first.keys() == second.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], second[key], err_msg=f"{key} of {index}")


def test_scans_layout(scans):
  assert len(scans) == NUM_SCANS
  for index in range(len(scans)):
    example = scans[index]
    assert example["image"].shape == (NUM_SLICES, SIZE, SIZE, 3)
    assert example["mask"].shape == (NUM_SLICES, SIZE, SIZE)
    assert example["slice_labels"].shape == (NUM_SLICES, 6)
    np.testing.assert_array_equal(example["labels"], example["slice_labels"].max(axis=0))
    for name, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
      present = bool((example["mask"] == class_id).any())
      volume = example["hematoma_ml"][uem_ich_jax.SUBTYPES.index(name)]
      assert present == (volume > 0), (index, name, volume)
    np.testing.assert_allclose(example["spacing"][0], 120.0 / NUM_SLICES, rtol=1e-6)


def test_scans_cq500_labels_and_shift(scans):
  names = uem_ich_jax.CQ500_LABELS
  for index in range(len(scans)):
    example = scans[index]
    cq500 = dict(zip(names, example["cq500_labels"].tolist()))
    assert example["cq500_labels"].shape == (14,)
    assert example["cq500_labels"].dtype == np.uint8
    labels = dict(zip(uem_ich_jax.SLICE_LABELS, example["labels"].tolist()))
    assert cq500["ICH"] == labels["any"]
    assert cq500["IPH"] == labels["intraparenchymal"]
    assert cq500["SDH"] == labels["subdural"]
    assert cq500["CalvarialFracture"] + cq500["OtherFracture"] == cq500["Fracture"]
    shift = float(example["midline_shift_mm"])
    assert cq500["MassEffect"] == int(shift >= 2.0)
    assert cq500["MidlineShift"] == int(shift >= 5.0)
    if cq500["ICH"] == 0:
      assert cq500["BleedLocation-Left"] == cq500["BleedLocation-Right"] == 0


def test_scans_affine_gives_hematoma_volume(scans):
  # The stored affine is enough to compute volumes in real geometry.
  for index in range(len(scans)):
    example = scans[index]
    affine = example["affine"].astype(np.float64)
    num_slices = example["mask"].shape[0]
    positions = (affine @ np.stack(
        [np.arange(num_slices), np.zeros(num_slices), np.zeros(num_slices), np.ones(num_slices)]
    ))[:3].T
    volume = CTVolume(
        hu=np.zeros(example["mask"].shape, np.float32),
        positions=positions,
        affine=affine,
        spacing=tuple(float(s) for s in example["spacing"]),
    )
    volumes = clinical.hematoma_ml(example["mask"], volume)
    expected = [volumes[name] for name in uem_ich_jax.SUBTYPES]
    np.testing.assert_allclose(example["hematoma_ml"], expected, rtol=1e-4, atol=1e-6)


def test_plan_scans_balanced_and_deterministic():
  config = SyntheticIchConfig(name="plan", num_scans=40, num_folds=5, followup_every=3)
  plan = plan_scans(config)
  assert plan == plan_scans(config)
  assert [p.seed for p in plan] == list(range(40))
  folds = {p.patient_id: p.fold for p in plan}
  sizes = collections.Counter(folds.values())
  assert max(sizes.values()) - min(sizes.values()) <= 1
  counts = collections.Counter(p.patient_id for p in plan)
  assert max(counts.values()) == 2


def test_plan_scans_rejects_zero_scans():
  with pytest.raises(ValueError, match="num_scans"):
    plan_scans(SyntheticIchConfig(name="empty", num_scans=0))


def test_fold_ranges_run_length():
  assert fold_ranges([0, 0, 2, 2, 2, 0]) == [[0, 2, 0], [2, 5, 2], [5, 6, 0]]
  assert fold_ranges([]) == []


def test_cli_build_dataset(tmp_path, capsys):
  assert cli.main(["build-dataset", "synthetic_ich", "--data-dir", str(tmp_path), "--config",
                   "slices"]) == 0
  output = capsys.readouterr().out
  written = tmp_path / "synthetic_ich" / "slices" / str(SyntheticIch.VERSION)
  assert str(written) in output
  assert "train: 960 examples" in output
  assert list(written.glob("*.array_record-*"))


def test_build_default_configs_skip_large():
  builder_class = build._builder_class("synthetic_ich")
  assert build._config_names(builder_class, None) == ["slices", "scans"]
  assert build._config_names(builder_class, "slices_large") == ["slices_large"]


def test_cli_unknown_dataset(tmp_path, capsys):
  status = cli.main(["build-dataset", "no_such_set", "--data-dir", str(tmp_path)])
  assert status == 2
  known = capsys.readouterr().err.split("known datasets: ")[1].strip()
  assert "synthetic_ich" in known.split(", ")


def test_cli_unknown_config(tmp_path, capsys):
  status = cli.main(
      ["build-dataset", "synthetic_ich", "--data-dir", str(tmp_path), "--config", "x"]
  )
  assert status == 2
  assert "available configs: slices" in capsys.readouterr().err


def test_build_unknown_dataset_raises(tmp_path):
  with pytest.raises(build.DatasetBuildError, match=r"known datasets: (\w+, )*synthetic_ich"):
    build.build_dataset("no_such_set", data_dir=str(tmp_path))


def test_cli_unwritable_data_dir(tmp_path, capsys):
  not_a_folder = tmp_path / "file"
  not_a_folder.write_text("x")
  status = cli.main(["build-dataset", "synthetic_ich", "--data-dir", str(not_a_folder / "sub")])
  assert status == 2
  assert "is not a writable folder" in capsys.readouterr().err


def test_cli_interrupt_exits_130(tmp_path, monkeypatch, capsys):
  def interrupted_build(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(build, "build_dataset", interrupted_build)
  status = cli.main(["build-dataset", "synthetic_ich", "--data-dir", str(tmp_path)])
  assert status == 130
  assert "interrupted" in capsys.readouterr().err
