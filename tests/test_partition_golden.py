"""Golden partition specs: where every parameter of each stage's model goes on an fsdp mesh.

A change to the rule table, the model's parameter names or their shapes shows
up here as a readable diff. After a deliberate change, rewrite the files with

    UEM_ICH_UPDATE_GOLDEN=1 pytest tests/test_partition_golden.py

and review the diff before committing it.
"""

import math
import os
import pathlib

import pytest
from flax import nnx

from uem_ich_jax.train import config_file, mesh, stages

GOLDEN = pathlib.Path(__file__).with_name("golden")
FSDP = 8

CASES = {
    "multitask_atto": ("multitask_synthetic.py", ["--config.multitask.detection=True"]),
    "aggregator_atto": ("aggregator_synthetic.py", []),
    "ssl_atto": ("ssl_pretrain.py", []),
}


def spec_table(config_name: str, overrides: list[str], repo: pathlib.Path) -> str:
  """One line per parameter: path, shape and partition spec, then the replicated share."""
  config = config_file.load(str(repo / "configs" / config_name), overrides)
  stage = stages.get_stage(config.stage)
  model = nnx.eval_shape(lambda: stage.build_model(config.model, seed=0))
  _, params, _, _ = stages.split_model(model)
  lines = []
  total = replicated = 0
  for name, leaf in sorted(stages.flatten(params).items()):
    spec = mesh.partition_spec(name, leaf.shape, FSDP, min_shard_size=config.min_shard_size)
    size = math.prod(leaf.shape)
    total += size
    replicated += size if spec == mesh.PartitionSpec() else 0
    lines.append(f"{name} {tuple(leaf.shape)} {tuple(spec)}")
  lines.append(f"# replicated share of parameters at fsdp={FSDP}: {replicated / total:.4f}")
  return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_partition_specs_match_golden(request, case):
  config_name, overrides = CASES[case]
  table = spec_table(config_name, overrides, request.config.rootpath)
  path = GOLDEN / f"partition_specs_{case}.txt"
  if os.environ.get("UEM_ICH_UPDATE_GOLDEN") == "1":
    path.write_text(table)
  assert path.is_file(), f"{path} is missing; write it with UEM_ICH_UPDATE_GOLDEN=1"
  assert table == path.read_text(), (
      f"partition specs of {case} differ from {path}; if the change is intended, rewrite it with"
      " UEM_ICH_UPDATE_GOLDEN=1 and review the diff"
  )


@pytest.mark.parametrize("case", sorted(CASES))
def test_replicated_share_under_limit(request, case):
  config_name, overrides = CASES[case]
  config = config_file.load(str(request.config.rootpath / "configs" / config_name), overrides)
  table = spec_table(config_name, overrides, request.config.rootpath)
  share = float(table.rstrip().rsplit(" ", 1)[-1])
  assert share > 0
  assert share <= config.max_replicated_share
