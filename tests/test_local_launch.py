"""launch/local.sh: two jax.distributed processes train, stop together on SIGTERM, and resume.

Oracles: the processes' own logs (stdout with [pI] prefixes and WORKDIR/logs/process_I.log),
exit codes, the checkpoint directories and metrics.jsonl on disk.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

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
