"""launch/local.sh: two jax.distributed processes train, stop together on SIGTERM, and resume.

Oracles: the processes' own logs (stdout with [pI] prefixes and WORKDIR/logs/process_I.log),
exit codes, the checkpoint directories and metrics.jsonl on disk.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from s5scale import checkpoint
from tests import helpers

NUM_STEPS = 300   # far more than run before the SIGTERM lands, so the first run must stop early
LAUNCH = os.path.join(helpers.REPO, "launch", "local.sh")


def local_sh(workdir) -> list[str]:
  flags = helpers.overrides(train__num_steps=NUM_STEPS, checkpoint__every_steps=1000,
                         eval__every_steps=0)
  return [LAUNCH, "-n", "2", "-d", "1", "configs/text_small.py", f"--workdir={workdir}", *flags]


def env() -> dict:
  """This interpreter; XLA_FLAGS dropped (conftest's 8 devices would be 8 per process)."""
  variables = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return dict(variables, PYTHON=sys.executable, KILL_AFTER_SECONDS="120")


def logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  return [r["step"] for r in helpers.read_jsonl(path)] if os.path.exists(path) else []


def checkpoint_steps(workdir) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def steps_in(pattern: str, text: str) -> list[int]:
  return [int(step) for step in re.findall(pattern, text)]


@pytest.mark.slow
def test_local_sh_two_processes_stop_on_sigterm_and_resume(tmp_path):
  launcher = subprocess.Popen(local_sh(tmp_path), env=env(), cwd=helpers.REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while len(logged_steps(tmp_path)) < 3 and launcher.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert launcher.poll() is None, launcher.communicate()[0][-3000:]
    assert len(logged_steps(tmp_path)) >= 3, "no steps logged within 300 s"
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=300)[0]
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, output[-3000:]

  # Both processes stop at the same agreed step, with its checkpoint saved and complete.
  stops = {i: steps_in(rf"\[p{i}\].*preempted at step (\d+), checkpoint saved", output)
           for i in range(2)}
  assert len(stops[0]) == 1 and stops[0] == stops[1], output[-3000:]
  stopped_at = stops[0][0]
  assert 0 < stopped_at < NUM_STEPS
  assert checkpoint_steps(tmp_path) == [stopped_at]
  for i in range(2):
    with open(tmp_path / "logs" / f"process_{i}.log") as log:
      assert f"preempted at step {stopped_at}, checkpoint saved" in log.read()
  assert max(logged_steps(tmp_path)) <= stopped_at

  resumed = subprocess.run(local_sh(tmp_path), env=env(), cwd=helpers.REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  for i in range(2):
    assert steps_in(rf"\[p{i}\].*resumed from checkpoint step (\d+)", resumed.stdout) == \
        [stopped_at], resumed.stdout[-3000:]
    assert re.search(rf"\[p{i}\].*finished: {NUM_STEPS} steps", resumed.stdout)
  steps_after = [s for s in logged_steps(tmp_path) if s > stopped_at]
  assert steps_after == list(range(stopped_at + 1, NUM_STEPS + 1))
  assert checkpoint_steps(tmp_path)[-1] == NUM_STEPS


# ---------------------------------------------------------------------------------------------
# Saves every 2 steps on two processes, one of them preempted: no hang, one agreed stop
# ---------------------------------------------------------------------------------------------

SAVING_STEPS = 40
REPEATS = 5
DEADLOCK_TIMEOUT_S = 120   # a healthy repetition takes 15-40 s on 2 busy cores


def trainer_pids(launcher_pid: int) -> dict[int, int]:
  """process index -> pid of local.sh's trainer children, read from /proc."""
  pids = {}
  for task in os.listdir(f"/proc/{launcher_pid}/task"):
    with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
      children = [int(pid) for pid in f.read().split()]
    for pid in children:
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          if b"s5scale.train" not in f.read():
            continue
        with open(f"/proc/{pid}/environ", "rb") as f:
          env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        pids[int(env[b"S5SCALE_PROCESS_ID"])] = pid
      except (FileNotFoundError, KeyError):
        continue
  return pids


def preempted_steps(log_text: str) -> list[int]:
  return steps_in(r"preempted at step (\d+), checkpoint saved", log_text)


def free_port() -> int:
  """A port the kernel just handed out; less likely taken by a parallel job than a random one."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def run_with_one_process_preempted(workdir, signal_after_step: int, victim: int,
                                   compile_cache) -> str:
  """Launches 2 processes saving every 2 steps; SIGTERMs only process `victim` once step
  `signal_after_step` is logged; returns the launcher's output. Fails on a hang."""
  flags = helpers.overrides(train__num_steps=SAVING_STEPS, checkpoint__every_steps=2,
                            eval__every_steps=0)
  command = [LAUNCH, "-n", "2", "-d", "1", "-p", str(free_port()), "configs/text_small.py",
             f"--workdir={workdir}", *flags]
  # JAX's persistent cache: the repetitions after the first skip most of the compile time.
  cached = dict(env(), JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # Its own process group, so that a hung run's trainers are killed with it.
  launcher = subprocess.Popen(command, env=cached, cwd=helpers.REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
  try:
    deadline = time.time() + DEADLOCK_TIMEOUT_S
    while (max(logged_steps(workdir), default=0) < signal_after_step and launcher.poll() is None
           and time.time() < deadline):
      time.sleep(0.01)
    trainers = trainer_pids(launcher.pid) if launcher.poll() is None else {}
    if victim not in trainers:
      if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
      pytest.fail(f"no trainer {victim} to signal at step {signal_after_step} (launcher exit "
                  f"{launcher.poll()})\n{launcher.communicate()[0][-3000:]}")
    os.kill(trainers[victim], signal.SIGTERM)
    output = launcher.communicate(timeout=max(1.0, deadline - time.time()))[0]
  except subprocess.TimeoutExpired:
    os.killpg(launcher.pid, signal.SIGKILL)
    output = launcher.communicate(timeout=30)[0]
    pytest.fail(f"hung: no exit {DEADLOCK_TIMEOUT_S} s after start\n{output[-3000:]}")
  assert launcher.returncode == 0, output[-3000:]
  return output


@pytest.mark.slow
def test_saves_every_2_steps_with_one_process_preempted_never_hang(tmp_path):
  rng = random.Random()
  for attempt in range(REPEATS):
    workdir = tmp_path / f"run{attempt}"
    signal_after_step, victim = rng.randint(2, 12), rng.randrange(2)
    output = run_with_one_process_preempted(workdir, signal_after_step, victim,
                                            tmp_path / "compile_cache")
    context = f"signal after step {signal_after_step} to p{victim}\n{output[-3000:]}"
    # The oracles: each process's own log file, the marker and the checkpoint files on disk.
    stops = [preempted_steps((workdir / "logs" / f"process_{i}.log").read_text())
             for i in range(2)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], context
    stopped_at = stops[0][0]
    assert signal_after_step <= stopped_at < SAVING_STEPS, context
    assert json.loads((workdir / "run_status.json").read_text()) == dict(
        status="preempted", step=stopped_at)
    names = os.listdir(workdir / "checkpoints")
    assert not [n for n in names if not n.isdigit()], names  # no step left half-written
    assert checkpoint_steps(workdir)[-1] == stopped_at, context
    assert checkpoint.missing_parts(workdir / "checkpoints", stopped_at) == []
    assert max(logged_steps(workdir)) == stopped_at
