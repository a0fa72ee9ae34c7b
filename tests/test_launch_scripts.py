"""The launch scripts in experiments/launch build the commands they should, with stand-in tools.

`gcloud`, `srun` and `uem-ich` are replaced by scripts that record their
arguments, so nothing is launched.
"""

import os
import pathlib
import shlex
import stat
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "launch"


def _recorder(directory: pathlib.Path, name: str) -> None:
  """Put a `name` on PATH that appends its arguments, one per line, to calls.txt."""
  path = directory / name
  path.write_text(
      '#!/usr/bin/env bash\n'
      f'printf "%s\\n" "{name}" "$@" "--end--" >> "{directory}/calls.txt"\n'
  )
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(script: str, args: list[str], tmp_path: pathlib.Path, **env: str):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "uem-ich"):
    _recorder(bin_dir, name)
  environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
  completed = subprocess.run(
      ["bash", str(LAUNCH / script), *args], env=environment, capture_output=True, text=True
  )
  calls_file = bin_dir / "calls.txt"
  calls = []
  if calls_file.exists():
    lines = calls_file.read_text().splitlines()
    while lines:
      end = lines.index("--end--")
      calls.append(lines[:end])
      lines = lines[end + 1 :]
  return completed, calls


def test_multi_gpu_runs_train_on_one_mesh(tmp_path):
  completed, calls = _run(
      "multi_gpu.sh",
      ["configs/multitask_synthetic.py", "--config.num_steps=7"],
      tmp_path,
      WORKDIR="/runs/a b",
      DATA_DIR="/data",
      FSDP="2",
  )
  assert completed.returncode == 0, completed.stderr
  [call] = calls
  assert call[:3] == ["uem-ich", "train", "--config=configs/multitask_synthetic.py"]
  assert "--workdir=/runs/a b" in call
  assert "--config.mesh.fsdp=2" in call
  assert "--config.model.dtype=bfloat16" in call
  # The user's overrides come last, so they win.
  assert call[-1] == "--config.num_steps=7"


def test_slurm_starts_train_per_task(tmp_path):
  completed, calls = _run(
      "slurm_multi_node.sbatch",
      ["configs/ssl_pretrain.py"],
      tmp_path,
      WORKDIR="/shared/run",
      DATA_DIR="/shared/tfds",
  )
  assert completed.returncode == 0, completed.stderr
  [call] = calls
  assert call[:4] == ["srun", "--kill-on-bad-exit=1", "uem-ich", "train"]
  assert "--config.distributed=auto" in call
  text = (LAUNCH / "slurm_multi_node.sbatch").read_text()
  assert "#SBATCH --signal=TERM@" in text
  assert "#SBATCH --requeue" in text


def test_tpu_pod_runs_train_on_every_host(tmp_path):
  completed, calls = _run(
      "tpu_pod.sh",
      ["configs/multitask_synthetic.py", "--config.data.batch_size=256"],
      tmp_path,
      TPU_NAME="pod",
      ZONE="z",
      PROJECT="p",
      WORKDIR="/mnt/run dir",
      DATA_DIR="/mnt/tfds",
  )
  assert completed.returncode == 0, completed.stderr
  [call] = calls
  assert call[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in call
  remote = shlex.split(call[-1].split("--command=", 1)[-1])
  assert remote[:3] == ["cd", "uem-ich-jax", "&&"]
  train = remote[3:]
  assert train[:3] == [".venv/bin/uem-ich", "train", "--config=configs/multitask_synthetic.py"]
  assert "--workdir=/mnt/run dir" in train
  assert "--config.distributed=on" in train
  assert train[-1] == "--config.data.batch_size=256"


@pytest.mark.parametrize(
    "script, first_missing",
    [("multi_gpu.sh", "WORKDIR"), ("slurm_multi_node.sbatch", "WORKDIR"), ("tpu_pod.sh", "TPU_NAME")],
)
def test_scripts_name_missing_settings(tmp_path, script, first_missing):
  completed, calls = _run(script, ["configs/ssl_pretrain.py"], tmp_path)
  assert completed.returncode != 0
  assert f"set {first_missing}" in completed.stderr
  assert calls == []
