"""One model, many meshes. Oracles: the 1-device run, the array shapes on disk in each
device's shard, a second set of processes, and the exit code of a bad launch."""

import os
import re

import numpy as np
import pytest

from s5scale import parallel, training
from tests import helpers
from tests.helpers import COLLECTIVES, build_state, hlo_computations, reachable, tiny_config
from tests.helpers import ALL_GROUPS, train_in_process

# ((data, fsdp, model, context), remat): the last three split time over 4 devices
# (context-parallel recurrence, tests/test_context_parallel.py has its exactness). Remat
# recomputes the same ops, so one mesh checks it: the one that shards H the most. Every axis
# is split by some mesh here; pure data parallelism ((8, 1, 1, 1)) and (4, 1, 2, 1) are left
# out, since (2, 2, 2, 1) splits data, fsdp and model at once.
MESHES_ON_8 = [((2, 2, 2, 1), "none"), ((1, 1, 8, 1), "full"), ((2, 1, 1, 4), "none"),
               ((1, 2, 1, 4), "none"), ((1, 1, 2, 4), "none")]


def test_same_losses_on_every_mesh(tmp_path):
  # 1x1x1x1 needs a 1-device process: a mesh smaller than the device count is a config error.
  single = helpers.run("train", "text_small.py", tmp_path / "1x1x1x1",
                       helpers.overrides(train__num_steps=3, checkpoint__every_steps=100,
                                         **ALL_GROUPS), devices=1)
  assert single.returncode == 0, single.stderr[-3000:]
  reference = helpers.losses(tmp_path / "1x1x1x1")
  assert sorted(reference) == [1, 2, 3]
  for mesh, remat in MESHES_ON_8:
    axes = dict(zip(("mesh__data", "mesh__fsdp", "mesh__model", "mesh__context"), mesh))
    config = tiny_config(train__num_steps=3, checkpoint__every_steps=100, model__remat=remat,
                         **axes, **ALL_GROUPS)
    losses = train_in_process(config, tmp_path / f"{remat}_{'x'.join(map(str, mesh))}")
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=1e-5, err_msg=f"mesh {mesh}, remat {remat}")


def test_model_parallel_shards_b_and_c():
  config = tiny_config(mesh__data=2, mesh__fsdp=1, mesh__model=4)
  mesh = parallel.make_mesh(config.mesh)
  params = build_state(config, mesh).params["blocks"]["ssm"]
  layers, num_states, d_model = config.model.num_layers, config.model.ssm_size // 2, 16
  assert params["B"].shape == (layers, num_states, d_model, 2)
  assert params["C"].shape == (layers, d_model, num_states, 2)
  for shard in params["B"].addressable_shards:
    assert shard.data.shape == (layers, num_states // 4, d_model, 2)
  for shard in params["C"].addressable_shards:
    assert shard.data.shape == (layers, d_model, num_states // 4, 2)


def test_no_collective_inside_the_time_scan():
  config = tiny_config(mesh__data=2, mesh__fsdp=2, mesh__model=2, model__num_layers=2)
  mesh = parallel.make_mesh(config.mesh)
  sample = {"inputs": np.zeros((8, 32), np.int32), "targets": np.zeros((8, 32), np.int32),
            "mask": np.ones((8, 32), np.float32), "reset": np.zeros((8, 32), bool),
            "target_bytes": np.ones((8, 32), np.int32)}
  model, optimizer, schedule, abstract_state, shardings = training.build_model_and_state(
      config, mesh, sample)
  compiled = training.jit_train_step(config, mesh, model, optimizer, schedule, shardings).lower(
      abstract_state, training.abstract_batch(sample, mesh)).compile()
  computations = hlo_computations(compiled.as_text())
  whole_program = "\n".join(computations.values())
  assert any(op in whole_program for op in COLLECTIVES), "the sharded step should communicate"
  loop_bodies = re.findall(r"while\(.*body=%?([\w.\-]+)", whole_program)
  # The time scans are the innermost loops: the layer scan (which may hold the readout's
  # all-reduce) contains them.
  innermost = [b for b in loop_bodies
               if not any("while(" in computations[c] for c in reachable(computations, b))]
  assert innermost, "expected the time scan to compile to a loop"
  for body in innermost:
    text = "\n".join(computations[c] for c in reachable(computations, body))
    found = [op for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", text)]
    assert not found, f"collective {found} inside loop {body}"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  flags = helpers.overrides(train__num_steps=3, checkpoint__every_steps=100)
  single = helpers.run("train", "text_small.py", tmp_path / "single", flags, devices=4)
  assert single.returncode == 0, single.stderr[-3000:]
  port = 20000 + os.getpid() % 10000
  procs = [helpers.start("train", "text_small.py", tmp_path / "multi", flags, devices=2,
                      S5SCALE_COORDINATOR=f"localhost:{port}", S5SCALE_NUM_PROCESSES=2,
                      S5SCALE_PROCESS_ID=i) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  single_losses, multi_losses = helpers.losses(tmp_path / "single"), helpers.losses(tmp_path / "multi")
  np.testing.assert_allclose([multi_losses[s] for s in (1, 2, 3)],
                             [single_losses[s] for s in (1, 2, 3)], rtol=1e-5)


@pytest.mark.parametrize("bad, named", [
    (["--config.mesh.data=3"], "mesh."),
    (["--config.mesh.data=1", "--config.mesh.model=8", "--config.model.ssm_size=24",
      "--config.model.blocks=1"], "model.ssm_size"),
    (["--config.mesh.data=1", "--config.mesh.model=8", "--config.model.d_model=12"],
     "model.d_model"),
    (["--config.model.no_such_key=1"], "no_such_key"),
])
def test_bad_config_exits_2_before_compiling(tmp_path, bad, named):
  result = helpers.run("train", "text_small.py", tmp_path, helpers.overrides() + bad, devices=8)
  assert result.returncode == 2, result.stderr[-2000:]
  assert named in result.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
  if "no_such_key" in named:
    assert "model.d_model" in result.stderr  # the valid keys are listed
