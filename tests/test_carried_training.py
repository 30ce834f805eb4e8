"""Carried-state training (data.carry_state) through the real programs on a sharded mesh:
preemption and resume, the carried states in the checkpoint, and their restore onto other meshes.
(tests/test_preemption.py resumes a carried run on one device.)

Oracles: an uninterrupted run in another process (losses compared as exact floats) and the
checkpoint read back with plain orbax.
"""

import signal

import jax
import numpy as np
import pytest

from s5scale import checkpoint, parallel, training
from tests import helpers

NUM_STEPS = 10
# data 2 x fsdp 1 x model 4 on 8 devices: rows split over data, each state's P' over model.
FLAGS = helpers.overrides(train__num_steps=NUM_STEPS, checkpoint__every_steps=100,
                          data__carry_state=True, eval__every_steps=0, mesh__data=2,
                          mesh__fsdp=1, mesh__model=4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  result = helpers.run("train", "text_small.py", workdir, FLAGS, devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_sigterm_then_resume_on_a_sharded_mesh_is_bit_identical(tmp_path, straight):
  proc = helpers.start("train", "text_small.py", tmp_path, FLAGS, devices=8)
  helpers.wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  stopped = [line for line in output.splitlines() if "preempted at step" in line]
  stopped_at = int(stopped[0].split("preempted at step ")[1].split(",")[0])
  assert 3 <= stopped_at < NUM_STEPS
  carried = helpers.saved_state(tmp_path, stopped_at)["carried"]
  # (rows, layers, P', [re, im]): the layers' states after that step's windows, not zeros.
  assert carried.shape == (8, 2, 8, 2) and np.abs(carried).max() > 0

  resumed = helpers.run("train", "text_small.py", tmp_path, FLAGS, devices=8)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert helpers.losses(tmp_path) == helpers.losses(straight)
  for key in ("params", "carried"):
    for a, b in zip(jax.tree.leaves(helpers.saved_state(tmp_path, NUM_STEPS)[key]),
                    jax.tree.leaves(helpers.saved_state(straight, NUM_STEPS)[key])):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_carried_state_restores_onto_another_mesh(straight, mesh_shape):
  on_disk = helpers.saved_state(straight, NUM_STEPS)["carried"]
  config = helpers.tiny_config(train__num_steps=NUM_STEPS, data__carry_state=True)
  config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_shape
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = parallel.make_mesh(config.mesh, devices)
  sample = {"inputs": np.zeros((8, 32), np.int32)}
  *_, abstract_state, _ = training.build_model_and_state(config, mesh, sample)
  manager = checkpoint.make_manager(str(straight), config.checkpoint)
  state, step = checkpoint.restore_latest(manager, abstract_state, None, config.to_dict())
  assert step == NUM_STEPS
  np.testing.assert_array_equal(np.asarray(state.carried), on_disk)
  # Rows over (data, fsdp) like the batch, P' over model like the S5 state.
  spec = state.carried.sharding.spec
  assert spec[0] == ("data", "fsdp") and spec[2] == "model"


def test_carried_evaluation_scores_each_item_as_one_pass(tmp_path):
  """eval.carry_state: held-out items streamed in 16-token windows with the state carried score
  the same as each item read in one window (one parallel scan, no state handed on)."""
  from s5scale import evaluation  # pylint: disable=g-import-not-at-top
  from s5scale.nn.model import S5Model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (tmp_path / "text").mkdir()
  for index in range(8):
    words = rng.choice(["state", "space", "model", "carry", "window", "scan"], 20 + 15 * index)
    (tmp_path / "text" / f"doc{index}.txt").write_text(" ".join(words))
  scores = {}
  for name, seq_len in (("windows", 16), ("one_pass", 1024)):
    config = helpers.tiny_config(data__source=str(tmp_path / "text"), data__heldout_fraction=0.5,
                                 eval__carry_state=True, eval__max_batches=0, eval__batch_size=2,
                                 eval__seq_len=seq_len)
    model = S5Model.from_config(config.model)
    params = model.init(jax.random.PRNGKey(0), np.zeros((2, 16), np.int32))["params"]
    evaluator = evaluation.Evaluator(config, model, parallel.make_mesh(config.mesh,
                                                                       jax.devices()[:1]))
    scores[name] = evaluator.evaluate_carried(params, {})
    if name == "windows":
      scores["fresh"] = evaluator.evaluate(params, {})
  assert scores["windows"]["num_predictions"] == scores["one_pass"]["num_predictions"] > 100
  assert scores["windows"]["num_batches"] > scores["one_pass"]["num_batches"]
  np.testing.assert_allclose(scores["windows"]["loss"], scores["one_pass"]["loss"], rtol=1e-5)
  # Fresh 16-token windows see less context: a different score.
  assert abs(scores["fresh"]["loss"] - scores["one_pass"]["loss"]) > 1e-4


def test_micro_batches_carry_each_rows_own_state(tmp_path):
  """optim.grad_accum_steps=2 splits the rows and their carried states into micro-batches and
  puts the final states back in row order: the losses equal the unsplit run's."""
  losses = {}
  for accum in (1, 2):
    config = helpers.tiny_config(train__num_steps=3, data__carry_state=True, eval__every_steps=0,
                                 checkpoint__every_steps=100, optim__grad_accum_steps=accum,
                                 mesh__data=2, mesh__fsdp=1, mesh__model=4)
    losses[accum] = helpers.train_in_process(config, tmp_path / f"accum{accum}")
  assert sorted(losses[1]) == [1, 2, 3]
  np.testing.assert_allclose([losses[2][s] for s in (1, 2, 3)], [losses[1][s] for s in (1, 2, 3)],
                             rtol=1e-5)
