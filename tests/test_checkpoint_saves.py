"""When the trainer saves (checkpoint.every_steps, checkpoint.every_minutes) and the run-status
marker it leaves for a supervisor.

Oracles: the step directories orbax leaves on disk, the marker file read back as JSON, and
arrays read back with orbax alone against the values saved.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from s5scale import checkpoint
from tests import helpers


class _Mesh:
  shape = {"data": 1}


def saved_steps(workdir, num_steps: int, every_steps: int, every_minutes: float,
                pause_before: tuple[int, ...] = ()) -> list[int]:
  """Runs the loop's save decisions over steps 1..num_steps on a tiny state, pausing 1.5 s
  before each step in `pause_before`; returns the complete steps on disk."""
  config = ml_collections.ConfigDict(dict(every_steps=every_steps, every_minutes=every_minutes,
                                          keep=100, keep_every=0, async_save=True))
  state = {"w": jnp.arange(4.0)}
  with checkpoint.Saver(checkpoint.make_manager(str(workdir), config)) as saver:
    for step in range(1, num_steps + 1):
      if step in pause_before:
        saver.wait_until_finished()  # the time policy declines while a save is being written
        time.sleep(1.5)
      if saver.due(step):
        saver.save(step, state, None, {}, _Mesh())
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def test_steps_alone_when_every_minutes_is_0(tmp_path):
  assert saved_steps(tmp_path, 7, every_steps=3, every_minutes=0) == [3, 6]


def test_every_minutes_saves_once_the_interval_has_passed(tmp_path):
  # 1/60 minute = 1 s. A run with no checkpoint is due at once; then only after the pause.
  assert saved_steps(tmp_path, 6, every_steps=100, every_minutes=1 / 60,
                     pause_before=(4,)) == [1, 4]


def test_either_trigger_saves(tmp_path):
  assert saved_steps(tmp_path, 7, every_steps=3, every_minutes=1 / 60,
                     pause_before=(5,)) == [1, 3, 5, 6]


def test_replicated_arrays_above_and_below_the_split_size_read_back_exactly(tmp_path):
  # Replicated over 8 devices, the large array's write is split among its replicas (1 MiB each),
  # the small one's is left to its first replica (checkpoint.MIN_BYTES_PER_REPLICA_SLICE).
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                          jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  values = {"large": rng.normal(size=(8, checkpoint.MIN_BYTES_PER_REPLICA_SLICE // 4)),
            "small": rng.normal(size=(8, 16))}
  values = {k: v.astype(np.float32) for k, v in values.items()}
  config = ml_collections.ConfigDict(dict(every_steps=1, every_minutes=0, keep=1, keep_every=0,
                                          async_save=False))
  with checkpoint.Saver(checkpoint.make_manager(str(tmp_path), config)) as saver:
    saver.save(1, jax.device_put(values, replicated), None, {}, _Mesh())
  restored = helpers.saved_state(tmp_path, 1)
  for name, value in values.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def read_status(workdir) -> dict:
  return json.loads((workdir / checkpoint.RUN_STATUS).read_text())


def test_run_status_marker_says_finished(tmp_path):
  flags = helpers.overrides(train__num_steps=3, checkpoint__every_steps=3, eval__every_steps=0)
  result = helpers.run("train", "text_small.py", tmp_path, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_status(tmp_path) == {"status": "finished", "step": 3}
