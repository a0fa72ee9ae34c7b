"""K-fold evaluation: fold plan, skipping finished folds, tables against numpy, plots, errors."""

import csv
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics

import uem_ich_jax
from uem_ich_jax import cli
from uem_ich_jax.evaluate import kfold
from uem_ich_jax.evaluate import metrics as metrics_lib
from uem_ich_jax.train import checkpoint, config_file, trainer

NAMES = list(uem_ich_jax.SLICE_LABELS)
DATASET_FOLDS = 5


def _config(request, **changes):
  path = request.config.rootpath / "configs" / "classification_synthetic.py"
  overrides = [f"--config.{key}={value}" for key, value in changes.items()]
  return config_file.load(f"{path}:smoke", overrides)


def _fake_source():
  # 8 examples per fold; pipeline.fold_indices reads each example's fold.
  return [{"fold": index % DATASET_FOLDS} for index in range(8 * DATASET_FOLDS)]


def _fake_outputs(seed, n=40):
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, len(NAMES))) < 0.4).astype(np.int32)
  logits = rng.normal(size=labels.shape) + 1.5 * labels
  return {"probabilities": 1.0 / (1.0 + np.exp(-logits)), "labels": labels}


class FakeTrainer:
  """Stand-ins for `trainer.train` and `trainer.evaluate` that write what the real ones write."""

  def __init__(self, stage="classification"):
    self.stage = stage
    self.trained = []

  def train(self, config, workdir):
    self.trained.append(config.data.test_fold)
    checkpoint.save_config(workdir, config)
    return {"step": config.num_steps}

  def evaluate(self, workdir, *, step=None, output=None):
    config = checkpoint.load_config(workdir)
    folds = trainer.split_folds(config.data)
    step = config.num_steps
    test = _fake_outputs(seed=folds.test[0])
    if self.stage == "classification":
      validation = _fake_outputs(seed=100 + folds.test[0])
      result = metrics_lib.evaluate_classification(
          test["labels"], test["probabilities"], validation["labels"],
          validation["probabilities"], NAMES,
      )
      saved = test
    else:
      mse = test["probabilities"][:, 0]
      result = {"loss": float(mse.mean()), "mse": float(mse.mean()), "n": int(mse.size)}
      saved = {"mse": mse}
    result = {"workdir": str(workdir), "step": step, "folds": {
        "train": list(folds.train), "validation": list(folds.validation), "test": list(folds.test)
    }, **result}
    np.savez(output.with_name(f"predictions_step{step}_fold{folds.test[0]}.npz"), **saved)
    output.write_text(json.dumps(result))
    return result


@pytest.fixture
def fake_trainer(monkeypatch):
  fake = FakeTrainer()
  monkeypatch.setattr(trainer, "train", fake.train)
  monkeypatch.setattr(trainer, "evaluate", fake.evaluate)
  monkeypatch.setattr(trainer, "dataset_source", lambda config: _fake_source())
  return fake


def _fold_results(workdir, num_folds):
  return [
      json.loads((workdir / f"fold_{k}" / kfold.RESULT_FILE).read_text()) for k in range(num_folds)
  ]


def _assert_png(path):
  assert path.is_file(), path
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert min(image.size) > 100


def test_kfold_folds_tables_and_plots(request, tmp_path, fake_trainer):
  summary = kfold.run_kfold(_config(request), tmp_path, folds=3)
  assert fake_trainer.trained == [0, 1, 2]
  results = _fold_results(tmp_path, 3)
  for k, result in enumerate(results):
    assert (tmp_path / f"fold_{k}" / checkpoint.CONFIG_FILE).is_file()
    assert result["folds"]["test"] == [k]
    assert result["folds"]["validation"] == [(k + 1) % DATASET_FOLDS]
    assert k not in result["folds"]["train"]
    assert result["folds"]["validation"][0] not in result["folds"]["train"]
  assert [fold["test_fold"] for fold in summary["folds"]] == [0, 1, 2]

  # Markdown: the macro AUC row against numpy over the per-fold JSONs.
  markdown = (tmp_path / kfold.MARKDOWN_FILE).read_text()
  values = [result["auc"]["macro"] for result in results]
  expected = f"| auc/macro | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} | 3 |"
  assert expected in markdown
  any_auc = [result["classes"]["any"]["auc"] for result in results]
  assert f"| any | {np.mean(any_auc):.3f} ± {np.std(any_auc, ddof=1):.3f} |" in markdown

  # CSV: one row per fold, then mean, std and n of every metric.
  with open(tmp_path / kfold.CSV_FILE, newline="") as file:
    rows = list(csv.DictReader(file))
  assert [row["fold"] for row in rows] == ["0", "1", "2", "mean", "std", "n"]
  assert [row["validation_fold"] for row in rows[:3]] == ["1", "2", "3"]
  columns = {"auc/macro": ("auc", "macro"), "classes/subdural/f1": ("classes", "subdural", "f1")}
  for column, path in columns.items():
    per_fold = []
    for result in results:
      value = result
      for key in path:
        value = value[key]
      per_fold.append(value)
    np.testing.assert_allclose([float(row[column]) for row in rows[:3]], per_fold)
    np.testing.assert_allclose(float(rows[3][column]), np.mean(per_fold))
    np.testing.assert_allclose(float(rows[4][column]), np.std(per_fold, ddof=1))
    assert rows[5][column] == "3"

  saved = json.loads((tmp_path / kfold.SUMMARY_FILE).read_text())
  auc = saved["summary"]["auc"]["macro"]
  np.testing.assert_allclose([auc["mean"], auc["std"]], [np.mean(values), np.std(values, ddof=1)])
  _assert_png(tmp_path / kfold.ROC_FILE)
  _assert_png(tmp_path / kfold.CALIBRATION_FILE)
  # The pooled ECE is that of the three folds' predictions together.
  outputs = [_fake_outputs(seed=k) for k in range(3)]
  pooled = metrics_lib.expected_calibration_error(
      np.concatenate([o["labels"][:, 0] for o in outputs]),
      np.concatenate([o["probabilities"][:, 0] for o in outputs]),
  )
  np.testing.assert_allclose(saved["calibration"]["ece_pooled_folds"]["any"], pooled)


def test_kfold_rerun_skips_finished_folds(request, tmp_path, fake_trainer, caplog):
  config = _config(request)
  kfold.run_kfold(config, tmp_path, folds=3)
  assert fake_trainer.trained == [0, 1, 2]
  (tmp_path / "fold_1" / kfold.RESULT_FILE).unlink()
  (tmp_path / kfold.MARKDOWN_FILE).unlink()
  with caplog.at_level(logging.INFO, logger="uem_ich_jax"):
    kfold.run_kfold(config, tmp_path, folds=3)
  assert fake_trainer.trained == [0, 1, 2, 1]
  assert "fold 1/3 (test fold 0, validation fold 1): " in caplog.text
  assert "skipping this fold" in caplog.text
  assert "ETA" in caplog.text
  assert (tmp_path / kfold.MARKDOWN_FILE).is_file()


def test_kfold_rejects_a_changed_config(request, tmp_path, fake_trainer):
  kfold.run_kfold(_config(request), tmp_path, folds=3)
  with pytest.raises(kfold.KFoldError, match=r"num_steps: 6 -> 8"):
    kfold.run_kfold(_config(request, num_steps=8), tmp_path, folds=3)
  # Fields that cannot change a result may change.
  kfold.run_kfold(_config(request, log_every=1), tmp_path, folds=3)


@pytest.mark.parametrize(
    ("folds", "message"), [(6, "exceeds config.data.num_folds = 5"), (2, "at least 3, got 2")]
)
def test_kfold_rejects_bad_fold_counts(request, tmp_path, fake_trainer, folds, message):
  with pytest.raises(kfold.KFoldError, match=message):
    kfold.run_kfold(_config(request), tmp_path, folds=folds)
  assert fake_trainer.trained == []


def test_kfold_rejects_dataset_with_fewer_folds(request, tmp_path, fake_trainer, monkeypatch):
  monkeypatch.setattr(trainer, "dataset_source", lambda config: [{"fold": k % 4} for k in range(40)])
  with pytest.raises(kfold.KFoldError, match="fold 4 of dataset .* has no examples"):
    kfold.run_kfold(_config(request), tmp_path, folds=3)


def test_kfold_rejects_unused_dataset_folds(request, tmp_path, fake_trainer):
  config = _config(request, **{"data.num_folds": 3})
  with pytest.raises(kfold.KFoldError, match="beyond config.data.num_folds = 3"):
    kfold.run_kfold(config, tmp_path, folds=3)


def test_kfold_without_probabilities_skips_plots(request, tmp_path, monkeypatch, caplog):
  fake = FakeTrainer(stage="ssl_pretrain")
  monkeypatch.setattr(trainer, "train", fake.train)
  monkeypatch.setattr(trainer, "evaluate", fake.evaluate)
  monkeypatch.setattr(trainer, "dataset_source", lambda config: _fake_source())
  with caplog.at_level(logging.INFO, logger="uem_ich_jax"):
    kfold.run_kfold(_config(request), tmp_path, folds=3)
  assert "no plots" in caplog.text
  assert not (tmp_path / kfold.ROC_FILE).exists()
  markdown = (tmp_path / kfold.MARKDOWN_FILE).read_text()
  mse = [result["mse"] for result in _fold_results(tmp_path, 3)]
  assert f"| mse | {np.mean(mse):.3f} ± {np.std(mse, ddof=1):.3f} | 3 |" in markdown
  with open(tmp_path / kfold.CSV_FILE, newline="") as file:
    rows = list(csv.DictReader(file))
  np.testing.assert_allclose(float(rows[3]["mse"]), np.mean(mse))


def test_kfold_warns_on_supervised_init_from(request, tmp_path, caplog):
  source = tmp_path / "source"
  checkpoint.save_config(source, _config(request))  # test fold 0, validation 1, train 2-4
  config = _config(request, init_from=str(source))
  with caplog.at_level(logging.WARNING, logger="uem_ich_jax"):
    seen = kfold.reported_folds_seen_by_init(config, 3)
  assert seen == [1, 2]
  assert "results are optimistic" in caplog.text
  assert kfold.reported_folds_seen_by_init(_config(request), 3) == []


def test_cli_kfold_argument_errors(request, tmp_path, capsys, fake_trainer):
  config = request.config.rootpath / "configs" / "classification_synthetic.py"
  assert cli.main(["evaluate", f"--workdir={tmp_path}", "--folds=3"]) == 2
  assert "--folds and --config go together" in capsys.readouterr().err
  rc = cli.main(["evaluate", f"--config={config}:smoke", "--folds=9", f"--workdir={tmp_path}"])
  assert rc == 2
  assert "exceeds config.data.num_folds" in capsys.readouterr().err
  rc = cli.main([
      "evaluate", f"--config={config}:smoke", "--folds=3", "--step=3", f"--workdir={tmp_path}"
  ])
  assert rc == 2
  rc = cli.main([
      "evaluate", f"--config={config}:smoke", "--folds=3", f"--workdir={tmp_path}",
      "--config.num_steps=4",
  ])
  assert rc == 0
  assert "| auc/macro |" in capsys.readouterr().out
  assert json.loads((tmp_path / "fold_2" / kfold.RESULT_FILE).read_text())["step"] == 4


# Metrics added for the plots ---------------------------------------------------


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = (rng.random(300) < 0.3).astype(int)
  scores = np.round(rng.random(300) * 0.7 + 0.3 * labels, 2)  # ties included
  fpr, tpr, thresholds = metrics_lib.roc_curve(labels, scores)
  sk_fpr, sk_tpr, sk_thresholds = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
  np.testing.assert_allclose(np.trapezoid(tpr, fpr), metrics_lib.roc_auc(labels, scores))
  assert metrics_lib.roc_curve([1, 1], [0.2, 0.3]) is None


def test_expected_calibration_error_known_values():
  # Bin 0: mean 0.05, half positive (gap 0.45); bin 9: mean 0.95, all positive (gap 0.05).
  labels = [0, 1, 1, 1]
  probabilities = [0.05, 0.05, 0.95, 0.95]
  np.testing.assert_allclose(metrics_lib.expected_calibration_error(labels, probabilities), 0.25)
  bins = metrics_lib.reliability_bins([1, 0], [1.0, 0.0], num_bins=4)
  np.testing.assert_array_equal(bins["count"], [1, 0, 0, 1])  # 1.0 falls in the last bin
  np.testing.assert_allclose(metrics_lib.expected_calibration_error([1, 0], [1.0, 0.0]), 0.0)
  np.testing.assert_allclose(metrics_lib.expected_calibration_error([0, 0], [0.7, 0.7]), 0.7)


def test_flatten_result_keeps_numbers_and_flags():
  flat = metrics_lib.flatten_result(
      {"a": {"b": 1.5, "c": None, "d": True, "names": ["x"]}, "e": 3, "f": "text"}
  )
  assert flat == {"a/b": 1.5, "a/c": None, "a/d": 1, "e": 3}


# One real k-fold run ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  directory = tmp_path_factory.mktemp("tfds")
  config = SyntheticIchConfig(
      name="slices_kfold_tiny", num_scans=10, num_slices=4, image_size=32, num_folds=DATASET_FOLDS
  )
  builder = SyntheticIch(config=config, data_dir=str(directory), file_format="array_record")
  builder.download_and_prepare()
  return directory


@pytest.mark.slow
def test_kfold_trains_and_evaluates_tiny_cnn(
    request, tmp_path, tiny_data_dir, monkeypatch, caplog
):
  config = _config(
      request,
      **{
          "data.data_dir": str(tiny_data_dir),
          "data.name": "synthetic_ich/slices_kfold_tiny",
          "num_steps": 4,
          "eval_every": 2,
          "checkpoint_every": 2,
      },
  )
  real_train = trainer.train
  trained = []

  def crash_in_fold_1(fold_config, workdir):
    trained.append(fold_config.data.test_fold)
    if fold_config.data.test_fold == 1:
      real_train(fold_config, workdir, stop_after=2)
      raise RuntimeError("simulated crash")
    return real_train(fold_config, workdir)

  monkeypatch.setattr(trainer, "train", crash_in_fold_1)
  with pytest.raises(RuntimeError, match="simulated crash"):
    kfold.run_kfold(config, tmp_path, folds=3)
  assert (tmp_path / "fold_0" / kfold.RESULT_FILE).is_file()
  assert not (tmp_path / "fold_1" / kfold.RESULT_FILE).exists()

  def record(fold_config, workdir):
    trained.append(fold_config.data.test_fold)
    return real_train(fold_config, workdir)

  monkeypatch.setattr(trainer, "train", record)
  with caplog.at_level(logging.INFO, logger="uem_ich_jax"):
    summary = kfold.run_kfold(config, tmp_path, folds=3)
  assert trained == [0, 1, 1, 2]
  assert "fold_0/kfold_eval.json exists, skipping this fold" in caplog.text
  # The trainer resumed the half-trained fold from its checkpoint.
  assert re.search(r"resumed from \S*fold_1\S* at step 2", caplog.text)
  results = _fold_results(tmp_path, 3)
  for k, result in enumerate(results):
    assert result["folds"]["test"] == [k]
    assert result["folds"]["validation"] == [k + 1]
    saved = checkpoint.load_config(tmp_path / f"fold_{k}")
    assert (saved.data.test_fold, saved.num_steps) == (k, 4)
    # The saved predictions are the ones the result was computed from.
    with np.load(tmp_path / f"fold_{k}" / f"predictions_step{result['step']}_fold{k}.npz") as npz:
      labels, probabilities = npz["labels"], npz["probabilities"]
    assert labels.shape == (result["n_test"], len(NAMES))
    for column, name in enumerate(NAMES):
      assert result["classes"][name]["auc"] == metrics_lib.roc_auc(
          labels[:, column], probabilities[:, column]
      )
  assert summary["summary"]["n_folds"] == 3
  _assert_png(tmp_path / kfold.ROC_FILE)
  _assert_png(tmp_path / kfold.CALIBRATION_FILE)

  # A rerun trains nothing.
  def no_training(*args, **kwargs):
    raise AssertionError("a finished fold was trained again")

  monkeypatch.setattr(trainer, "train", no_training)
  again = kfold.run_kfold(config, tmp_path, folds=3)
  assert again["summary"] == summary["summary"]
