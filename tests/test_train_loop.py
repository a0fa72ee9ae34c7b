"""Training runs on a tiny synthetic_ich build: CLI, evaluation, resume, NaN stop, init_from."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uem_ich_jax import cli
from uem_ich_jax import errors
from uem_ich_jax.data import pipeline
from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig
from uem_ich_jax.errors import InputError
from uem_ich_jax.train import checkpoint, classification, config_file, stages, trainer

DATASET = "synthetic_ich/slices_train_tiny"

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  config = SyntheticIchConfig(
      name="slices_train_tiny", num_scans=10, num_slices=4, image_size=32, num_folds=5
  )
  SyntheticIch(config=config, data_dir=str(directory), file_format="array_record").download_and_prepare()
  return directory


def _overrides(data_dir, **changes):
  values = {"data.data_dir": str(data_dir), "data.name": DATASET} | changes
  return [f"--config.{key}={value}" for key, value in values.items()]


def _config(request, data_dir, **changes):
  path = request.config.rootpath / "configs" / "classification_synthetic.py"
  return config_file.load(f"{path}:smoke", _overrides(data_dir, **changes))


@pytest.fixture(scope="module")
def smoke_run(request, data_dir, tmp_path_factory):
  """`uem-ich train` then `uem-ich evaluate` on the smoke config (6 steps)."""
  workdir = tmp_path_factory.mktemp("smoke")
  config = request.config.rootpath / "configs" / "classification_synthetic.py"
  train_rc = cli.main(
      ["train", f"--config={config}:smoke", f"--workdir={workdir}", *_overrides(data_dir)]
  )
  evaluate_rc = cli.main(["evaluate", f"--workdir={workdir}"])
  return workdir, train_rc, evaluate_rc


@pytest.mark.slow
def test_cli_evaluate_output_paths(smoke_run, capsys):
  workdir = smoke_run[0]
  assert cli.main(["evaluate", f"--workdir={workdir}", f"--output={workdir}"]) == 2
  assert "is a folder" in capsys.readouterr().err
  nested = workdir / "new" / "folder" / "result.json"
  assert cli.main(["evaluate", f"--workdir={workdir}", f"--output={nested}"]) == 0
  assert "auc_macro" in json.loads(capsys.readouterr().out)["headline"]
  assert "auc_macro" in json.loads(nested.read_text())["headline"]
  assert list(nested.parent.glob("predictions_step*_fold*.npz"))


@pytest.mark.slow
def test_cli_train_and_evaluate_smoke(smoke_run):
  workdir, train_rc, evaluate_rc = smoke_run
  assert train_rc == 0
  assert evaluate_rc == 0
  saved = checkpoint.load_config(workdir)
  assert saved.model.name == "tiny_cnn"
  assert saved.data.name == DATASET
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

  manager = checkpoint.CheckpointManager(workdir, best_metric=saved.best_metric, read_only=True)
  steps = manager.all_steps()
  metrics = {step: manager.metrics(step) for step in steps}
  manager.close()
  assert steps == [3, 6]  # checkpoint_every 3, keep 2
  assert all("val_auc_macro" in metrics[step] for step in steps)

  results = sorted(workdir.glob("eval_step*_fold0.json"))
  assert len(results) == 1
  result = json.loads(results[0].read_text())
  assert result["folds"] == {"train": [2, 3, 4], "validation": [1], "test": [0]}
  source = trainer.dataset_source(saved)
  assert result["n_test"] == len(pipeline.fold_indices(source, [0]))
  assert result["n_validation"] == len(pipeline.fold_indices(source, [1]))
  assert set(result["classes"]) == {
      "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"
  }
  undefined = result["auc"]["n_undefined"]
  assert result["auc"]["n_defined"] + undefined == 6


@pytest.mark.slow
def test_restore_model_loads_best_checkpoint(smoke_run):
  workdir, _, _ = smoke_run
  model, config = checkpoint.restore_model(workdir)
  assert isinstance(model, classification.TinyCNN)
  manager = checkpoint.CheckpointManager(workdir, best_metric=config.best_metric, read_only=True)
  best = manager.best_step()
  arrays = manager.restore_arrays(best)
  manager.close()
  np.testing.assert_array_equal(model.head.kernel[...], arrays["params"]["head"]["kernel"])
  image = jnp.zeros((2, 32, 32, 3))
  logits = model(image)
  assert logits.shape == (2, 6)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, model(image))  # dropout is off
  with pytest.raises(InputError, match="no checkpoint of step 5"):
    checkpoint.restore_model(workdir, step=5)


def test_evaluate_counts_every_example_once(request, data_dir, tmp_path):
  config = _config(request, data_dir, **{"data.eval_batch_size": 6})
  setup = trainer.build(config)
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
  source = trainer.dataset_source(config)
  outputs = trainer.collect(setup, state, source, (0, 1))
  expected = [
      index for index in range(len(source)) if int(source[index]["fold"]) in (0, 1)
  ]
  assert len(expected) % 6, "the folds fill whole batches, so no padding would be tested"
  assert outputs["probabilities"].shape == (len(expected), 6)
  labels = np.stack([source[index]["labels"] for index in expected])
  np.testing.assert_array_equal(outputs["labels"], labels)


def _assert_same_checkpoint(expected_dir, actual_dir, *, step):
  """Assert that two runs saved bitwise equal arrays at `step`.

  Bitwise on CPU, because the same programs run on the same inputs.
  """
  arrays = []
  for workdir in (expected_dir, actual_dir):
    manager = checkpoint.CheckpointManager(workdir, read_only=True)
    arrays.append(manager.restore_arrays(step))
    manager.close()
  expected, actual = arrays
  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual)
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted(request, data_dir, tmp_path):
  # Augmentation and dropout on, so the data position and the step keys matter.
  changes = {"data.augment": "true", "num_steps": 4, "eval_every": 100, "checkpoint_every": 100}
  config = _config(request, data_dir, **changes)
  trainer.train(config, tmp_path / "whole")
  trainer.train(config, tmp_path / "split", stop_after=2)
  resumed = checkpoint.CheckpointManager(tmp_path / "split", read_only=True)
  assert resumed.all_steps() == [2]
  resumed.close()
  trainer.train(config, tmp_path / "split")
  _assert_same_checkpoint(tmp_path / "whole", tmp_path / "split", step=4)


@pytest.mark.slow
def test_sigterm_saves_then_resumes_identically(
    request, data_dir, tmp_path, monkeypatch
):
  changes = {"data.augment": "true", "num_steps": 4, "eval_every": 100, "checkpoint_every": 100}
  config = _config(request, data_dir, **changes)
  trainer.train(config, tmp_path / "whole")

  # The notice arrives while step 3's batch is prepared, as a scheduler's
  # SIGTERM arrives at any moment; step 3 still finishes and is saved.
  batches = []
  original = trainer.model_batch

  def model_batch_then_signal(*args, **kwargs):
    batches.append(1)
    if len(batches) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(trainer, "model_batch", model_batch_then_signal)
  argv = [
      "train",
      f"--config={request.config.rootpath / 'configs' / 'classification_synthetic.py'}:smoke",
      f"--workdir={tmp_path / 'preempted'}",
      *_overrides(data_dir, **changes),
  ]
  assert cli.main(argv) == errors.PREEMPTED_EXIT_CODE
  monkeypatch.undo()
  manager = checkpoint.CheckpointManager(tmp_path / "preempted", read_only=True)
  assert manager.all_steps() == [3]
  manager.close()
  assert cli.main(argv) == 0
  _assert_same_checkpoint(tmp_path / "whole", tmp_path / "preempted", step=4)


def test_preemption_watch_restores_the_previous_handler():
  def previous(signum, frame):
    del signum, frame

  old = signal.signal(signal.SIGTERM, previous)
  try:
    with trainer.PreemptionWatch() as watch:
      assert signal.getsignal(signal.SIGTERM) is not previous
      assert not watch.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, old)


def test_non_finite_loss_message_without_checkpoint():
  message = trainer.non_finite_loss_message(float("nan"), 3, 4, "/runs/a", None)
  assert "became nan between steps 3 and 4" in message
  assert "No checkpoint was saved in /runs/a yet" in message
  assert "None" not in message


def test_non_finite_loss_message_names_last_checkpoint():
  message = trainer.non_finite_loss_message(float("inf"), 11, 20, "/runs/a", 10)
  assert "became inf between steps 11 and 20" in message
  assert "The last checkpoint in /runs/a is step 10." in message
  assert "No checkpoint" not in message


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(request, data_dir, tmp_path, monkeypatch):
  real_loss = classification.loss

  def nan_loss(model, batch, config):
    value, outputs = real_loss(model, batch, config)
    return value * jnp.nan, dict(outputs, loss=value * jnp.nan)

  monkeypatch.setattr(classification._ClassificationStage, "loss", staticmethod(nan_loss))
  config = _config(request, data_dir, log_every=1)
  with pytest.raises(trainer.NonFiniteLossError, match=r"became nan between steps 1 and 1") as error:
    trainer.train(config, tmp_path)
  assert "No checkpoint was saved" in str(error.value)
  assert "step None" not in str(error.value)
  manager = checkpoint.CheckpointManager(tmp_path, read_only=True)
  assert manager.all_steps() == []
  manager.close()


@pytest.mark.slow  # uses the smoke run
def test_init_from_bad_checkpoint_raises(
    request, data_dir, tmp_path, smoke_run
):
  missing = _config(request, data_dir, init_from=str(tmp_path / "nowhere"))
  with pytest.raises(InputError, match="nowhere does not exist"):
    trainer.train(missing, tmp_path / "a")
  (tmp_path / "empty").mkdir()
  empty = _config(request, data_dir, init_from=str(tmp_path / "empty"))
  with pytest.raises(InputError, match="no checkpoints"):
    trainer.train(empty, tmp_path / "a")
  wider = _config(request, data_dir, init_from=str(smoke_run[0]), **{"model.width": 16})
  with pytest.raises(InputError, match="does not fit this model"):
    trainer.train(wider, tmp_path / "b")


@pytest.mark.slow  # uses the smoke run
def test_init_from_copies_the_parameters(request, data_dir, tmp_path, smoke_run):
  config = _config(request, data_dir, init_from=str(smoke_run[0]), init_from_prefixes="head")
  setup = trainer.build(config)
  state = trainer._initialise(setup)
  fresh = jax.jit(setup.init_state)()
  source_model, _ = checkpoint.restore_model(smoke_run[0])
  np.testing.assert_array_equal(state["params"]["head"]["kernel"], source_model.head.kernel[...])
  # Outside the prefix the fresh initialisation stays.
  np.testing.assert_array_equal(
      state["params"]["encoder_conv1"]["kernel"], fresh["params"]["encoder_conv1"]["kernel"]
  )


def test_cli_reports_config_errors(request, tmp_path, capsys):
  config = request.config.rootpath / "configs" / "classification_synthetic.py"
  rc = cli.main(["train", f"--config={config}", f"--workdir={tmp_path}", "--config.optim.lr=1"])
  assert rc == 2
  assert "config.optim has no field 'lr'" in capsys.readouterr().err
  rc = cli.main(["evaluate", f"--workdir={tmp_path}", "--config.seed=1"])
  assert rc == 2
  rc = cli.main(["evaluate", f"--workdir={tmp_path / 'none'}"])
  assert rc == 2
  assert "config.json does not exist" in capsys.readouterr().err


def test_init_from_must_name_a_source(request, data_dir, tmp_path):
  config = _config(request, data_dir, init_from="")
  with pytest.raises(trainer.ConfigError, match="set it to 'random'"):
    trainer._initialise(trainer.build(config))


def _encoder_arrays(state):
  """Every parameter but the head, shifted so that a copy differs from a fresh draw."""
  params = jax.tree.map(lambda leaf: np.asarray(leaf) + 1.0, dict(state["params"]))
  params.pop("head")
  return {"params": params, "extra": {}}


def test_init_from_export_keeps_fresh_head(request, data_dir, tmp_path):
  config = _config(request, data_dir)
  setup = trainer.build(config)
  fresh = jax.jit(setup.init_state)()
  arrays = _encoder_arrays(fresh)
  export = checkpoint.export_encoder(tmp_path / "export", arrays, {"step": 7})

  config.init_from = str(export)
  state = trainer._initialise(trainer.build(config))
  copied = stages.flatten(state["params"])
  for name, array in stages.flatten(arrays["params"]).items():
    np.testing.assert_array_equal(copied[name], array)
  np.testing.assert_array_equal(state["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])


@pytest.mark.parametrize("defect", ["missing array", "extra array", "wrong shape", "no manifest"])
def test_init_from_rejects_a_mismatched_encoder_export(request, data_dir, tmp_path, defect):
  config = _config(request, data_dir)
  arrays = _encoder_arrays(jax.jit(trainer.build(config).init_state)())
  if defect == "missing array":
    del arrays["params"]["encoder_conv2"]["bias"]
    message = "not in the export"
  elif defect == "extra array":
    arrays["params"]["encoder_conv9"] = {"kernel": np.zeros((3, 3), np.float32)}
    message = "not in the model"
  elif defect == "wrong shape":
    arrays["params"]["encoder_conv1"]["bias"] = np.zeros((5,), np.float32)
    message = "mismatched"
  else:
    message = "encoder.json is missing"
  export = checkpoint.export_encoder(tmp_path / "export", arrays, {"step": 1})
  if defect == "no manifest":
    (export / checkpoint.ENCODER_MANIFEST).unlink()
  config.init_from = str(export)
  with pytest.raises(InputError, match=message):
    trainer._initialise(trainer.build(config))


def test_patient_subset_keeps_whole_patients(data_dir):
  source = pipeline.load_source(DATASET, data_dir=str(data_dir))
  indices = np.arange(len(source))
  patients = np.asarray([source[int(i)]["patient_id"] for i in indices])
  half = pipeline.patient_subset(source, indices, 0.5, seed=0)
  kept = set(patients[half])
  assert len(kept) == round(0.5 * len(set(patients)))
  # Every example of a kept patient stays.
  np.testing.assert_array_equal(half, indices[np.isin(patients, list(kept))])
  np.testing.assert_array_equal(half, pipeline.patient_subset(source, indices, 0.5, seed=0))
  others = [set(patients[pipeline.patient_subset(source, indices, 0.5, seed=s)]) for s in range(1, 6)]
  assert any(other != kept for other in others)
  assert pipeline.patient_subset(source, indices, 1.0) is indices
  with pytest.raises(pipeline.DataPipelineError, match=r"in \(0, 1\]"):
    pipeline.patient_subset(source, indices, 0.0)


def test_init_from_accepts_a_relative_export_path(request, data_dir, tmp_path, monkeypatch):
  config = _config(request, data_dir)
  arrays = _encoder_arrays(jax.jit(trainer.build(config).init_state)())
  checkpoint.export_encoder(tmp_path / "run" / "export", arrays, {"step": 1})
  monkeypatch.chdir(tmp_path)
  config.init_from = "run/export"
  state = trainer._initialise(trainer.build(config))
  np.testing.assert_array_equal(
      state["params"]["encoder_conv1"]["kernel"], arrays["params"]["encoder_conv1"]["kernel"]
  )


def test_init_from_rejects_a_file(request, data_dir, tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  config = _config(request, data_dir, init_from=str(tmp_path / "weights.npz"))
  with pytest.raises(InputError, match="is a file; expected a run's work directory"):
    trainer._initialise(trainer.build(config))


@pytest.mark.slow  # uses the smoke run
def test_run_manager_ranks_by_the_runs_best_mode(smoke_run, tmp_path):
  workdir = smoke_run[0]
  config = checkpoint.load_config(workdir)
  manager = checkpoint.run_manager(workdir)
  steps = manager.all_steps()
  values = {step: manager.metrics(step)[config.best_metric] for step in steps}
  manager.close()
  # The same run read as "lower is better" must pick the other end.
  config.best_mode = "min" if config.best_mode == "max" else "max"
  flipped = checkpoint.run_manager(workdir, config)
  best = flipped.best_step()
  flipped.close()
  chooser = min if config.best_mode == "min" else max
  assert values[best] == chooser(values.values())
