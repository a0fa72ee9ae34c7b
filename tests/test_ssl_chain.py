"""Pretraining feeds supervised training: SSL run, encoder export, init_from, pictures."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from uem_ich_jax import cli
from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig
from uem_ich_jax.errors import InputError
from uem_ich_jax.train import checkpoint, config_file, stages, trainer

DATASET = "synthetic_ich/slices_ssl_tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  # 64 px gives a 2x2 grid of 32-pixel cells, so a 0.75 mask ratio hides three.
  config = SyntheticIchConfig(
      name="slices_ssl_tiny", num_scans=10, num_slices=4, image_size=64, num_folds=5
  )
  builder = SyntheticIch(config=config, data_dir=str(directory), file_format="array_record")
  builder.download_and_prepare()
  return directory


def _overrides(data_dir, **changes):
  values = {"data.data_dir": str(data_dir), "data.name": DATASET} | changes
  return [f"--config.{key}={value}" for key, value in values.items()]


def _config(request, name, data_dir, **changes):
  path = request.config.rootpath / "configs" / name
  return config_file.load(str(path), _overrides(data_dir, **changes))


@pytest.fixture(scope="module")
def ssl_run(request, data_dir, tmp_path_factory):
  """`uem-ich train` on configs/ssl_pretrain.py:smoke (4 steps)."""
  workdir = tmp_path_factory.mktemp("ssl")
  config = request.config.rootpath / "configs" / "ssl_pretrain.py"
  status = cli.main(["train", f"--config={config}:smoke", f"--workdir={workdir}", *_overrides(data_dir)])
  return workdir, status


@pytest.mark.slow  # compiling the SSL step took about 90 s on a 2-core CPU with a cold cache
def test_ssl_run_exports_encoder_and_pictures(ssl_run):
  workdir, status = ssl_run
  assert status == 0
  export = workdir / checkpoint.ENCODER_EXPORT_DIR
  manifest = json.loads((export / checkpoint.ENCODER_MANIFEST).read_text())
  assert manifest["step"] == 4
  assert manifest["stage"] == "ssl_pretrain"
  assert manifest["model"]["variant"] == "atto"
  pictures = sorted(path.name for path in (workdir / "images").glob("*.png"))
  assert pictures == ["step0000002.png", "step0000004.png"]
  with Image.open(workdir / "images" / "step0000004.png") as picture:
    assert picture.width == 4 * 64  # input, masked, reconstruction, pasted
  # The saved validation loss ranks checkpoints, lowest best.
  assert checkpoint.load_config(workdir).best_mode == "min"


@pytest.mark.slow  # uses the SSL run
def test_supervised_stage_starts_from_the_export(request, data_dir, ssl_run):
  workdir, _ = ssl_run
  export = workdir / checkpoint.ENCODER_EXPORT_DIR
  _, arrays = checkpoint.read_encoder_export(export)
  config = _config(request, "classification_synthetic.py", data_dir, init_from=str(export))
  setup = trainer.build(config)
  state = trainer._initialise(setup)
  # The program of the trainer's initialisation (out_shardings included), so
  # the compilation cache serves it instead of a second compile.
  fresh = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()

  params = stages.flatten(state["params"])
  exported = stages.flatten(arrays["params"])
  assert set(params) - set(exported) == {name for name in params if name.startswith("head/")}
  for name, array in exported.items():
    np.testing.assert_array_equal(params[name], array, err_msg=name)
  # BatchNorm running statistics of coordinate attention come along too.
  for name, array in stages.flatten(arrays["extra"]).items():
    np.testing.assert_array_equal(stages.flatten(state["extra"])[name], array, err_msg=name)
  head = stages.flatten(fresh["params"])
  for name in params:
    if name.startswith("head/"):
      np.testing.assert_array_equal(params[name], head[name])


@pytest.mark.slow  # uses the SSL run
def test_export_encoder_command_exports_a_chosen_step(ssl_run, capsys):
  workdir, _ = ssl_run
  assert cli.main(["export-encoder", f"--workdir={workdir}", "--step=2"]) == 0
  manifest = json.loads(
      (workdir / checkpoint.ENCODER_EXPORT_DIR / checkpoint.ENCODER_MANIFEST).read_text()
  )
  assert manifest["step"] == 2
  assert capsys.readouterr().out.strip().endswith("export/encoder")


def test_export_encoder_rejects_a_run_without_encoder(request, tmp_path):
  path = request.config.rootpath / "configs" / "classification_synthetic.py"
  config = config_file.load(f"{path}:smoke", [])
  checkpoint.save_config(tmp_path, config)
  with pytest.raises(InputError, match="only runs of the stages .*ssl_pretrain.* export"):
    trainer.export_encoder(tmp_path)


def test_rsna_variant_names_the_missing_dataset(request, tmp_path):
  config = config_file.load(str(request.config.rootpath / "configs" / "ssl_pretrain.py:rsna"), [])
  config.mesh.data = 1
  config.data.batch_size = 1
  config.data.eval_batch_size = 1
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(InputError, match="rsna_ich/slices.* is not built.*uem-ich build-dataset rsna_ich"):
    trainer.train(config, tmp_path / "run")
