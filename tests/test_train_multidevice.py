"""The trainer on 8 forced CPU devices against 1 device, in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 works only before JAX
starts, and this test process may have started it with 1 device already.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from uem_ich_jax.data import pipeline
from uem_ich_jax.datasets.synthetic_ich import SyntheticIch, SyntheticIchConfig

# One subprocess runs a (data 4, fsdp 2) mesh and a 1-device mesh for three
# train steps on the same batches. It then writes a checkpoint from the
# 8-device state and restores it onto the 1-device layout. Last, it runs a
# short `train` and `evaluate` on the 8-device mesh.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from uem_ich_jax.train import checkpoint, config_file, mesh, trainer

    spec, workdir, data_dir, dataset = sys.argv[1:5]
    assert jax.device_count() == 8, jax.devices()

    def setup(data, fsdp, devices):
      config = config_file.load(spec, [
          "--config.model.width=32", "--config.min_shard_size=256",
          f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
          "--config.data.batch_size=8", "--config.optim.warmup_steps=0",
      ])
      return trainer.build(config, devices)

    rng = np.random.default_rng(0)
    batches = [{
        "image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        "labels": rng.integers(0, 2, (8, 6)).astype(np.int32),
        "valid": np.ones((8,), bool),
    } for _ in range(3)]

    def run(setup):
      state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
      losses = []
      for batch in batches:
        metrics = trainer.empty_metrics(setup)
        state, metrics = setup.train_step(state, metrics, trainer.model_batch(setup, batch))
        losses.append(float(metrics[0].compute()["loss"]))
      return state, losses

    eight = setup(4, 2, None)
    single = setup(1, 1, jax.devices()[:1])
    state8, losses8 = run(eight)
    state1, losses1 = run(single)
    leaves8 = jax.tree_util.tree_flatten_with_path(state8["params"])[0]
    sharded = [jax.tree_util.keystr(path) for path, leaf in leaves8
               if not leaf.sharding.is_fully_replicated]
    param_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)))

    manager = checkpoint.CheckpointManager(workdir)
    manager.save(3, state8)
    manager.close()
    manager = checkpoint.CheckpointManager(workdir, read_only=True)
    restored = manager.restore(3, single.abstract_state)
    manager.close()
    restore_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                       for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(restored)))
    restored_devices = sorted({d.id for leaf in jax.tree.leaves(restored) for d in leaf.devices()})

    # Any layout to any other: the (4, 2) checkpoint onto a (2, 4) mesh, and
    # a checkpoint of the 1-device run onto the (4, 2) mesh.
    def restore_onto(target, step):
      manager = checkpoint.CheckpointManager(workdir, read_only=True)
      state = manager.restore(step, target.abstract_state)
      manager.close()
      return state

    def max_diff(a, b):
      return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def layout_matches(state, target):
      return all(leaf.sharding.is_equivalent_to(sharding, leaf.ndim) for leaf, sharding in
                 zip(jax.tree.leaves(state), jax.tree.leaves(target.state_shardings)))

    wide = setup(2, 4, None)
    onto_wide = restore_onto(wide, 3)
    manager = checkpoint.CheckpointManager(workdir)
    manager.save(4, state1)
    manager.close()
    onto_eight = restore_onto(eight, 4)
    relayout = dict(
        wide_diff=max_diff(state8, onto_wide), wide_layout=layout_matches(onto_wide, wide),
        eight_diff=max_diff(state1, onto_eight), eight_layout=layout_matches(onto_eight, eight),
        wide_sharded=sum(not leaf.sharding.is_fully_replicated
                         for leaf in jax.tree.leaves(onto_wide["params"])),
    )

    # The whole loop on the (4, 2) mesh: global batches, padded evaluation.
    config = config_file.load(spec, [
        f"--config.data.data_dir={data_dir}", f"--config.data.name={dataset}",
        "--config.mesh.fsdp=2", "--config.min_shard_size=256", "--config.model.width=32",
        "--config.data.eval_batch_size=8", "--config.num_steps=2", "--config.eval_every=2",
        "--config.checkpoint_every=2", "--config.optim.warmup_steps=1",
    ])
    trainer.train(config, workdir + "/run")
    evaluation = trainer.evaluate(workdir + "/run")
    print("RESULT " + json.dumps(dict(
        losses8=losses8, losses1=losses1, sharded=sharded, param_diff=param_diff,
        restore_diff=restore_diff, restored_devices=restored_devices,
        n_test=evaluation["n_test"], n_validation=evaluation["n_validation"],
        replicated_share=mesh.replicated_share(state8["params"], eight.state_shardings["params"]),
        **relayout,
    )))
    """
)


def _cpu_env(device_count: int, **extra: str) -> dict[str, str]:
  """Return this environment with `device_count` forced CPU devices and the shared compile cache."""
  return dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
      JAX_PLATFORMS="cpu",
      # Same persistent compilation cache as test_train_loop.py.
      JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(tempfile.gettempdir()) / "uem_ich_jax_jit_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      **extra,
  )


@pytest.fixture(scope="module")
def data_source(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  config = SyntheticIchConfig(
      name="slices_eight_tiny", num_scans=10, num_slices=3, image_size=32, num_folds=5
  )
  builder = SyntheticIch(config=config, data_dir=str(directory), file_format="array_record")
  builder.download_and_prepare()
  return directory, builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def result(request, tmp_path_factory, data_source):
  config = request.config.rootpath / "configs" / "classification_synthetic.py"
  data_dir, _ = data_source
  env = _cpu_env(8)
  workdir = tmp_path_factory.mktemp("eight")
  completed = subprocess.run(
      [
          sys.executable,
          "-c",
          SCRIPT,
          f"{config}:smoke",
          str(workdir),
          str(data_dir),
          "synthetic_ich/slices_eight_tiny",
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert lines, completed.stdout[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_eight_devices_train_like_one(result):
  # Tolerance: the sharded program sums gradients in another order, so float32
  # rounding differs; 1e-5 relative on the loss, 1e-5 absolute on parameters
  # and Adam moments after three steps at learning rates up to 1e-3.
  assert result["sharded"], "no parameter was sharded over fsdp; the test would prove nothing"
  assert result["replicated_share"] < 0.5
  for loss8, loss1 in zip(result["losses8"], result["losses1"]):
    assert loss8 == pytest.approx(loss1, rel=1e-5)
  assert result["param_diff"] < 1e-5


@pytest.mark.slow
def test_checkpoint_from_eight_devices_restores_on_one(result):
  assert result["restore_diff"] == 0.0
  assert result["restored_devices"] == [0]


@pytest.mark.slow
def test_checkpoints_restore_across_mesh_layouts(result):
  # (4, 2) saved, (2, 4) restored; 1 device saved, (4, 2) restored.
  assert result["wide_sharded"] > 0, "nothing sharded on the (2, 4) mesh; the test proves nothing"
  assert result["wide_diff"] == 0.0
  assert result["wide_layout"]
  assert result["eight_diff"] == 0.0
  assert result["eight_layout"]


@pytest.mark.slow
def test_eight_device_run_evaluates_every_example_once(result, data_source):
  _, source = data_source
  # 10 scans x 3 slices: the test and validation folds do not fill whole
  # batches of 8, so the padded rows must be dropped again.
  assert result["n_test"] == len(pipeline.fold_indices(source, [0]))
  assert result["n_validation"] == len(pipeline.fold_indices(source, [1]))


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_two_hosts(request, tmp_path, data_source):
  # Two processes with 2 CPU devices each, joined by jax.distributed on
  # loopback with gloo collectives: the multi-host path (per-process input
  # shards, one global batch, per-process iterator checkpoints).
  data_dir, _ = data_source
  config = request.config.rootpath / "configs" / "classification_synthetic.py"
  port = _free_port()
  processes = []
  for process_id in range(2):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        UEM_ICH_NUM_PROCESSES="2",
        UEM_ICH_PROCESS_ID=str(process_id),
        JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(tempfile.gettempdir()) / "uem_ich_jax_jit_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    command = [
        sys.executable, "-m", "uem_ich_jax.cli", "train", f"--config={config}:smoke",
        f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}",
        "--config.data.name=synthetic_ich/slices_eight_tiny", "--config.mesh.fsdp=2",
        "--config.min_shard_size=256", "--config.model.width=32", "--config.num_steps=2",
        "--config.eval_every=2",
        "--config.checkpoint_every=2", "--config.optim.warmup_steps=1",
    ]
    processes.append(
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]

  data_files = sorted(path.name for path in (tmp_path / "checkpoints" / "2" / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  # The summary JSON is the last thing `uem-ich train` prints.
  stdout = outputs[0][0]
  summary = json.loads(stdout[stdout.index('{\n  "train"'):])
  assert summary["step"] == 2
  assert "auc_macro" in summary["validation"]


# The aggregator's token cache on a (data 4, fsdp 2) mesh against 1 device:
# the tokens gathered back to the host from the sharded encoder must match.
CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from uem_ich_jax.train import aggregate, config_file, token_cache, trainer

    spec = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    slice_mask = np.ones((8, 4), bool)
    slice_mask[::3, 2:] = False
    batch = {
        "image": rng.uniform(-1, 1, (8, 4, 64, 64, 3)).astype(np.float32),
        "slice_mask": slice_mask,
        "labels": rng.integers(0, 2, (8, 6)).astype(np.int32),
        "valid": np.ones((8,), bool),
    }
    tokens = []
    for data, fsdp, devices in ((4, 2, None), (1, 1, jax.devices()[:1])):
      config = config_file.load(spec, [
          f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
          "--config.min_shard_size=256", "--config.data.batch_size=8",
          "--config.data.eval_batch_size=8", "--config.aggregator.cache_tokens=1",
          "--config.model.image_size=64",
      ])
      setup = trainer.build(config, devices)
      state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
      cache = token_cache.TokenCache(
          iter([batch]), batches=1, keep=("slice_mask", "labels", "valid"), seed=0,
          max_bytes=2**30,
      )
      aggregate.prepare_train_input(setup, state, cache)
      tokens.append(next(cache)["tokens"])
    print("RESULT " + json.dumps(dict(
        shape=list(tokens[0].shape),
        diff=float(np.max(np.abs(tokens[0] - tokens[1]))),
        padded_max=float(np.max(np.abs(tokens[0][0, 2:]))),
    )))
    """
)


@pytest.mark.slow
def test_token_cache_on_eight_devices_matches_one(request):
  config = request.config.rootpath / "configs" / "aggregator_synthetic.py"
  env = _cpu_env(8)
  completed = subprocess.run(
      [sys.executable, "-c", CACHE_SCRIPT, f"{config}:smoke"],
      env=env, capture_output=True, text=True, timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
  assert lines, completed.stdout[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  # 8 scans x 4 slices of 64 px: a 2 x 2 token grid of 320 channels (atto's last stage).
  assert result["shape"] == [8, 4, 2, 2, 320]
  # Padded slices are encoded fully masked, so their tokens are 0.
  assert result["padded_max"] == 0.0
  # Same parameters and inputs; only the reduction order differs.
  assert result["diff"] < 1e-4
