"""Preemption, bit-exact resume, killed and damaged checkpoints, resharded restore.

Oracles: an uninterrupted run in another process, the checkpoint files on disk (read back with
plain orbax, no s5scale code), and the processes' exit codes and logs.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from s5scale import checkpoint, parallel, preemption
from s5scale import training
from tests import helpers
from tests.helpers import tiny_config

NUM_STEPS = 12
# With the SSM state carried from step to step (data.carry_state), so a resume must restore the
# carried states and the streams' positions too; tests/test_carried_training.py resumes it on a
# sharded mesh.
FLAGS = helpers.overrides(train__num_steps=NUM_STEPS, checkpoint__every_steps=4,
                       checkpoint__async_save=True, data__carry_state=True)


def complete_steps(workdir) -> list[int]:
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def run_status(workdir) -> dict:
  with open(os.path.join(workdir, "run_status.json")) as f:
    return json.load(f)


def assert_same_tree(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = helpers.run("train", "text_small.py", workdir, FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path, uninterrupted):
  k = random.randint(1, NUM_STEPS - 4)
  proc = helpers.start("train", "text_small.py", tmp_path, FLAGS)
  helpers.wait_for_step(tmp_path, k, proc)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  preempted = [line for line in output.splitlines() if "preempted at step" in line]
  assert preempted and "checkpoint saved" in preempted[0], output[-3000:]
  stopped_at = int(preempted[0].split("preempted at step ")[1].split(",")[0])
  assert stopped_at < NUM_STEPS and stopped_at in complete_steps(tmp_path)
  assert run_status(tmp_path) == {"status": "preempted", "step": stopped_at}

  resumed = helpers.run("train", "text_small.py", tmp_path, FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint step {stopped_at}" in resumed.stderr
  assert run_status(tmp_path) == {"status": "finished", "step": NUM_STEPS}
  assert helpers.losses(tmp_path) == helpers.losses(uninterrupted)  # exact float equality
  for key in ("params", "carried"):
    assert_same_tree(helpers.saved_state(tmp_path, NUM_STEPS)[key],
                     helpers.saved_state(uninterrupted, NUM_STEPS)[key])


@pytest.mark.slow
def test_two_process_preemption(tmp_path):
  # JAX's notifier reaches the other host through the coordination service, asynchronously:
  # enough steps after the signal that the run cannot finish before the agreed stop, even on a
  # loaded machine (with 12, a full suite once saw both hosts finish first).
  num_steps = 40
  flags = helpers.overrides(train__num_steps=num_steps, checkpoint__every_steps=100)

  def launch(workdir, port):
    return [helpers.start("train", "text_small.py", workdir, flags, devices=2,
                       S5SCALE_COORDINATOR=f"localhost:{port}", S5SCALE_NUM_PROCESSES=2,
                       S5SCALE_PROCESS_ID=i) for i in range(2)]

  def finish(procs):
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    return outputs

  base_port = 21000 + os.getpid() % 5000
  finish(launch(tmp_path / "straight", base_port))
  procs = launch(tmp_path / "interrupted", base_port + 1)
  helpers.wait_for_step(tmp_path / "interrupted", 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # one host is preempted; both must stop together
  outputs = finish(procs)
  stops = [next(line for line in o.splitlines() if "preempted at step" in line) for o in outputs]
  steps = {int(s.split("preempted at step ")[1].split(",")[0]) for s in stops}
  assert len(steps) == 1, stops
  assert complete_steps(tmp_path / "interrupted") == [steps.pop()]
  finish(launch(tmp_path / "interrupted", base_port + 2))
  assert helpers.losses(tmp_path / "interrupted") == helpers.losses(tmp_path / "straight")
  assert_same_tree(helpers.saved_state(tmp_path / "interrupted", num_steps)["params"],
                   helpers.saved_state(tmp_path / "straight", num_steps)["params"])


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous(tmp_path, uninterrupted):
  flags = helpers.overrides(train__num_steps=NUM_STEPS, checkpoint__every_steps=1,
                            data__carry_state=True)
  for attempt in range(5):
    workdir = tmp_path / f"attempt{attempt}"
    proc = helpers.start("train", "text_small.py", workdir, flags)
    helpers.wait_for_step(workdir, 3, proc)
    # Saves run every step; kill as soon as one is being written.
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(workdir / "checkpoints")
      if any("tmp" in n for n in names) and complete_steps(workdir):
        proc.kill()
        break
    proc.wait()
    names = os.listdir(workdir / "checkpoints")
    if any("tmp" in n for n in names) and complete_steps(workdir):
      break
  else:
    pytest.fail("never caught a checkpoint mid-write in 5 attempts")
  previous = complete_steps(workdir)[-1]
  resumed = helpers.run("train", "text_small.py", workdir, flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint step {previous}" in resumed.stderr
  # The resumed run continues exactly as an uninterrupted one (same data, same RNG).
  assert helpers.losses(workdir)[NUM_STEPS] == helpers.losses(uninterrupted)[NUM_STEPS]


def truncate_largest_array_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_then_exits_2(tmp_path, uninterrupted):
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  steps = complete_steps(workdir)  # [4, 8, 12] with keep=3
  truncate_largest_array_file(workdir / "checkpoints" / str(steps[-1]))
  flags = helpers.overrides(train__num_steps=NUM_STEPS + 2, checkpoint__every_steps=4,
                            data__carry_state=True)
  result = helpers.run("train", "text_small.py", workdir, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"checkpoint step {steps[-1]}" in result.stderr and "damaged" in result.stderr
  assert f"resumed from checkpoint step {steps[-2]}" in result.stderr

  only_damaged = tmp_path / "only"
  shutil.copytree(uninterrupted, only_damaged)
  for step in complete_steps(only_damaged)[:-1]:
    shutil.rmtree(only_damaged / "checkpoints" / str(step))
  truncate_largest_array_file(only_damaged / "checkpoints" / str(NUM_STEPS))
  result = helpers.run("train", "text_small.py", only_damaged, flags)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "no readable checkpoint" in result.stderr


def test_resharded_restore(tmp_path):
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2, mesh__data=4,
                         mesh__fsdp=1, mesh__model=2)
  result = helpers.run("train", "text_small.py", tmp_path, flags, devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  on_disk = helpers.saved_state(tmp_path, 2)
  config = tiny_config(train__num_steps=2)
  sample = {"inputs": np.zeros((8, 32), np.int32)}
  for mesh_shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    config.mesh.data, config.mesh.fsdp, config.mesh.model = mesh_shape
    mesh = parallel.make_mesh(config.mesh, devices)
    *_, abstract_state, _ = training.build_model_and_state(config, mesh, sample)
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint)
    state, step = checkpoint.restore_latest(manager, abstract_state, None, config.to_dict())
    assert step == 2
    assert_same_tree(state.params, on_disk["params"])
    assert_same_tree(state.opt_state, on_disk["opt_state"])
    b_matrix = state.params["blocks"]["ssm"]["B"]
    assert b_matrix.sharding.mesh.shape == dict(zip(("data", "fsdp", "model"), mesh_shape),
                                                 context=1)


@pytest.mark.parametrize("when", ["imports", "compilation"])
def test_sigterm_before_training_exits_0_leaving_checkpoints(tmp_path, uninterrupted, when):
  import shutil
  shutil.copytree(uninterrupted, tmp_path / "run")
  workdir = tmp_path / "run"
  steps_before = complete_steps(workdir)
  proc = helpers.start("train", "text_small.py", workdir,
                    helpers.overrides(train__num_steps=NUM_STEPS + 8, data__carry_state=True))
  if when == "imports":
    time.sleep(0.5)
  else:  # the restore is logged just before the train step is compiled
    for line in proc.stdout:
      if "resumed from" in line:
        break
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  assert complete_steps(workdir) == steps_before
  assert max(helpers.losses(workdir)) == NUM_STEPS  # no step was trained
  # The copied run's "finished" marker no longer describes this run.
  assert run_status(workdir) == {"status": "preempted", "step": NUM_STEPS}


def test_init_from_loads_parameters_only(tmp_path, uninterrupted):
  # A zero learning rate leaves the loaded parameters unchanged through one step.
  flags = helpers.overrides(train__num_steps=1, checkpoint__every_steps=1, optim__learning_rate=0.0,
                         optim__ssm_learning_rate=0.0, optim__warmup_steps=1,
                         checkpoint__init_from=str(uninterrupted))
  result = helpers.run("train", "text_small.py", tmp_path, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "initialised parameters from" in result.stderr
  assert complete_steps(tmp_path) == [1]  # a fresh run: its own step count and optimizer
  assert_same_tree(helpers.saved_state(tmp_path, 1)["params"],
                   helpers.saved_state(uninterrupted, NUM_STEPS)["params"])


# ---------------------------------------------------------------------------------------------
# jax.distributed on TPU VMs, and no SIGTERM swallowed without it
# ---------------------------------------------------------------------------------------------

TPU_WORKER = os.path.join(helpers.REPO, "launch", "tpu_worker.sh")
ENV_DUMPER = """#!/usr/bin/env bash
env -0 > "$HOME/trainer_env.tmp" && mv "$HOME/trainer_env.tmp" "$HOME/trainer_env"
"""


def env_from_tpu_worker(tmp_path) -> dict:
  """The environment launch/tpu_worker.sh really gives the trainer on a TPU VM (its `start`)."""
  home = tmp_path / "home"
  (home / "s5scale" / "launch").mkdir(parents=True)
  shutil.copy(TPU_WORKER, home / "s5scale" / "launch" / "tpu_worker.sh")
  python = home / "s5scale_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(ENV_DUMPER)
  python.chmod(0o755)
  plain = {k: v for k, v in os.environ.items()
           if not k.startswith(("S5SCALE_", "TPU_", "MEGASCALE_"))}
  subprocess.run(["bash", TPU_WORKER, "start", "-m", "s5scale.train"], check=True, timeout=60,
                 env=dict(plain, HOME=str(home), S5SCALE_TPU_DEVICES=str(home / "accel*"),
                          S5SCALE_LIBTPU_LOCKFILE=str(home / "libtpu_lockfile")))
  dump = home / "trainer_env"
  deadline = time.time() + 30
  while not dump.exists() and time.time() < deadline:
    time.sleep(0.05)
  return dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)


@pytest.fixture
def recorded_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for key in list(os.environ):
    if key.startswith(("S5SCALE_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(key)
  return calls


def test_initialize_distributed_on_a_simulated_tpu_vm(tmp_path, monkeypatch, recorded_initialize):
  parallel.initialize_distributed()  # a laptop: nothing to join
  assert recorded_initialize == []
  for key, value in env_from_tpu_worker(tmp_path).items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  # No arguments: JAX reads the slice (and multislice) layout from the TPU VM metadata.
  assert recorded_initialize == [((), {})]


@pytest.mark.parametrize("env, processes", [
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, 4),  # GKE, one slice
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h0", "TPU_WORKER_HOSTNAMES": "h0,h1",
      "MEGASCALE_NUM_SLICES": "2"}, 4),            # multislice that exports its layout
])
def test_initialize_distributed_in_cluster_environments(monkeypatch, recorded_initialize, env,
                                                        processes):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  assert recorded_initialize == [((), {})]
  assert parallel.launched_process_count() == processes


@pytest.mark.slow
def test_processes_without_a_coordinator_fall_back_to_their_own_sigterm(tmp_path):
  # Two processes told they are 2 but given no coordinator: no jax.distributed client, hence no
  # preemption sync point. Each must say so at start-up and still stop on its own SIGTERM.
  flags = helpers.overrides(train__num_steps=100000, checkpoint__every_steps=100000)
  procs = [helpers.start("train", "text_small.py", tmp_path / f"p{i}", flags,
                      S5SCALE_NUM_PROCESSES=2, S5SCALE_PROCESS_ID=i) for i in range(2)]
  try:
    for i, proc in enumerate(procs):
      helpers.wait_for_step(tmp_path / f"p{i}", 2, proc)
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
    error = next(line for line in output.splitlines() if "no jax.distributed client" in line)
    assert error.startswith("E") and "SIGTERM falls back to the local handler" in error
    stop = next(line for line in output.splitlines() if "preempted at step" in line)
    assert "checkpoint saved" in stop


@pytest.fixture
def watcher_factory():
  previous = signal.getsignal(signal.SIGTERM)
  yield preemption.PreemptionWatcher
  signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("client", [False, True])
def test_several_processes_stop_on_sigterm_with_or_without_a_client(monkeypatch, caplog,
                                                                    watcher_factory, client):
  # A multi-host TPU slice where jax.distributed was never initialised: JAX still counts every
  # host, but its sync point answers False forever (there is no client to carry the notice).
  from jax.experimental import multihost_utils
  synced_at = 3
  asked = []
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: client)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or (client and step == synced_at))
  watcher = watcher_factory()
  with caplog.at_level("INFO"):
    watcher.connect(1)
  errors = [r for r in caplog.records if r.levelname == "ERROR"]
  assert bool(errors) == (not client)
  assert all("SIGTERM falls back to the local handler" in r.getMessage() for r in errors)
  assert [watcher.reached(step) for step in range(2)] == [False, False]
  if client:
    assert [watcher.reached(step) for step in (2, 3)] == [False, True] and asked == [0, 1, 2, 3]
  else:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watcher.signalled and time.time() < deadline:
      time.sleep(0.01)
    assert watcher.reached(2) and asked == []  # its own signal decides; the sync point is unused
