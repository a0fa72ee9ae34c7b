"""Shared test fixtures: paths to the real scans and fixtures outside the repository."""

import fcntl
import os
import pathlib
import shutil

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tests jit the same small programs many times (new closures, same HLO), so a
# persistent compilation cache turns most compiles into reads. It must be set
# before the first compile, because JAX fixes the cache then. Tests that need
# several CPU devices start their own subprocess with XLA_FLAGS set.
if not jax.config.jax_compilation_cache_dir:
  jax.config.update(
      "jax_compilation_cache_dir",
      os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache")),
  )
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# Depthwise convolutions through the C++ kernels, also on several forced CPU
# devices. There, "auto" would pick the shifted sum, which compiles about 3x
# slower than lax.conv, and the suite is mostly compilation. Tests of the
# other forms ask for them by name. Subprocesses inherit the setting.
os.environ.setdefault("UEM_ICH_CPU_DEPTHWISE", "native")
# XLA's backend at optimisation level 0: compiling took 28-47% less CPU time
# per test file (measured on 2 shared cores), and the programs run slower,
# which matters little here. In this suite the results differed from the
# default level by float rounding only (about 1e-6 after two AdamW steps).
# Must be set before JAX starts its CPU backend.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "dcm_qa_ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> pathlib.Path:
  """The dcm_qa_ct scans (GE and Philips, both with gantry tilt)."""
  if not REAL_CT.is_dir():
    pytest.skip(f"real head CT scans not found at {REAL_CT}; they are not in the repository")
  return REAL_CT


FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """Random-weight PyTorch modules with inputs and expected outputs."""
  if not FIXTURES.is_dir():
    pytest.skip(f"PyTorch parity fixtures not found at {FIXTURES}; they are not in the repository")
  return FIXTURES


# ---------------------------------------------------- Trained smoke runs ---

# Image size and dataset names of the tiny synthetic data the smoke runs train on.
PREDICT_IMAGE_SIZE = 64
PREDICT_SLICES_DATASET = "synthetic_ich/slices_predict_tiny"
PREDICT_SCANS_DATASET = "synthetic_ich/scans_predict_tiny"


def _build_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """Return the folder `name` that `build(folder)` fills once per test run, read-only afterwards.

  Under pytest-xdist the workers of one run share it: the first to take the
  lock builds it, and the others wait and reuse it. A build that fails leaves
  no completion mark, so the next worker builds again.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    folder = tmp_path_factory.mktemp(name)
    build(folder)
    return folder
  # Each worker's base folder sits in one folder per run, shared by all workers.
  shared = tmp_path_factory.getbasetemp().parent
  folder = shared / name
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / ".complete").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      (folder / ".complete").touch()
  return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Tiny synthetic slice and scan datasets (10 scans of 4 slices) in a TFDS data directory."""
  from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

  def build(directory):
    for layout in ("slices", "scans"):
      config = SyntheticIchConfig(
          name=f"{layout}_predict_tiny", layout=layout, num_scans=10, num_slices=4,
          image_size=PREDICT_IMAGE_SIZE, num_folds=5,
      )
      builder = SyntheticIch(config=config, data_dir=str(directory), file_format="array_record")
      builder.download_and_prepare()

  return _build_once(tmp_path_factory, "tfds", build)


def _train_smoke(request, spec, workdir, overrides):
  """Train the smoke variant of configs/`spec` for 2 steps in `workdir`."""
  from uem_ich_jax.train import config_file, trainer

  path = request.config.rootpath / "configs" / spec
  two_steps = {"num_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1}
  config = config_file.load(
      f"{path}:smoke", [f"--config.{key}={value}" for key, value in (two_steps | overrides).items()]
  )
  trainer.train(config, workdir)
  return workdir


# Session scope: the two runs take about a minute to train on 2 CPU cores, and
# every prediction test module shares them.
@pytest.fixture(scope="session")
def runs(request, data_dir, tmp_path_factory):
  """A multitask run with detection (2 steps), and an aggregator run on its frozen encoder export."""
  from uem_ich_jax.train import checkpoint

  def train(root):
    _train_smoke(request, "multitask_synthetic.py", root / "multitask", {
        "data.data_dir": str(data_dir),
        "data.name": PREDICT_SLICES_DATASET,
        "multitask.detection": True,
        "init_from": "random",
    })
    _train_smoke(request, "aggregator_synthetic.py", root / "aggregator", {
        "data.data_dir": str(data_dir),
        "data.name": PREDICT_SCANS_DATASET,
        "model.image_size": PREDICT_IMAGE_SIZE,
        "init_from": str(root / "multitask" / checkpoint.ENCODER_EXPORT_DIR),
    })

  root = _build_once(tmp_path_factory, "runs", train)
  return root / "multitask", root / "aggregator"
