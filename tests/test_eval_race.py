"""The eval job beside a trainer that rotates its checkpoints: it never crashes, records each step
as evaluated or skipped, and the trainer keeps the step the eval job has pinned."""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from s5scale import checkpoint, checkpoint_follower
from tests import helpers

NUM_STEPS = 100  # ~20 s of saves: the watcher is reading long before the trainer ends
EVERY = 2


def start(module: str, workdir, flags: list[str], log_path) -> subprocess.Popen:
  log = open(log_path, "w")  # a file, not a pipe: neither process may block on a full pipe
  return subprocess.Popen(helpers.command(module, "text_small.py", workdir, flags),
                          env=helpers.env_for(), stdout=log, stderr=subprocess.STDOUT, text=True,
                          cwd=helpers.REPO)


def test_watch_beside_a_trainer_that_keeps_one_step(tmp_path):
  flags = helpers.overrides(train__num_steps=NUM_STEPS, checkpoint__every_steps=EVERY,
                         checkpoint__keep=1, eval__every_steps=0, eval__max_batches=1)
  watcher = start("evaluate", tmp_path, flags + ["--watch", "--poll_seconds=0.05"],
                  tmp_path / "watch.log")
  trainer = start("train", tmp_path, flags, tmp_path / "train.log")
  try:
    assert trainer.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert watcher.wait(timeout=600) == 0, (tmp_path / "watch.log").read_text()[-3000:]
  finally:
    for process in (trainer, watcher):
      if process.poll() is None:
        process.kill()
  watch_log = (tmp_path / "watch.log").read_text()
  # orbax's own async readers may print a traceback for a restore that the trainer cut short;
  # none may come from s5scale's code.
  assert f'File "{helpers.REPO}/s5scale' not in watch_log

  saved = set(range(EVERY, NUM_STEPS + 1, EVERY))  # the trainer's save schedule
  records = helpers.read_jsonl(tmp_path / "eval" / "metrics.jsonl")
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)) and set(steps) <= saved
  for record in records:
    assert record["split"] == "heldout"
    assert record["data"] == data_keys_on_disk(tmp_path), record
    if "skipped" in record:
      assert set(record) == {"step", "split", "data", "skipped"} and record["skipped"], record
    else:
      assert math.isfinite(record["heldout/loss"]) and record["heldout/num_batches"] == 1
  final = [r for r in records if r["step"] == NUM_STEPS]
  assert final and "skipped" not in final[0]
  assert len(records) >= 2, "the watcher read no step while the trainer was running"
  if saved - set(steps):  # rotation deleted steps the watcher never saw: it says so
    assert "missed" in watch_log and "Raise checkpoint.keep (now 1)" in watch_log


def data_keys_on_disk(workdir) -> dict:
  """The data a record scored: the split keys of the run's config.json as written on disk."""
  data = json.loads((workdir / "config.json").read_text())["data"]
  return {key: data[key] for key in ("source", "mixture", "heldout_fraction", "heldout_source")}


def save_tiny_step(manager, step: int) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.full(2, step, np.float32)}),
      config=ocp.args.JsonSave({}), meta=ocp.args.JsonSave({})))
  manager.wait_until_finished()


def steps_on_disk(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(checkpoint.checkpoint_dir(workdir))
                if name.isdigit())


def test_the_trainer_keeps_the_step_an_eval_job_pinned(tmp_path):
  workdir = str(tmp_path)
  config = runs_checkpoint_config(keep=1)
  manager = checkpoint.make_manager(workdir, config)
  save_tiny_step(manager, 1)
  checkpoint.pin_steps(workdir, "heldout", [1])
  for step in (2, 3):
    save_tiny_step(manager, step)
  assert steps_on_disk(workdir) == [1, 3]  # 1 pinned, 2 rotated out, 3 the newest
  checkpoint.pin_steps(workdir, "heldout", [1, 3])  # rewrites the job's pin
  save_tiny_step(manager, 4)
  assert steps_on_disk(workdir) == [1, 3, 4]
  checkpoint.pin_steps(workdir, "heldout", [])
  save_tiny_step(manager, 5)
  assert steps_on_disk(workdir) == [5]
  checkpoint.pin_steps(workdir, "heldout", [5])
  checkpoint.pin_steps(workdir, "heldout_step_rescale2", [6])  # a second eval job's pin
  for step in (6, 7, 8):
    save_tiny_step(manager, step)
  assert steps_on_disk(workdir) == [5, 6, 8]
  # A pin left by a killed eval job stops protecting its steps after PIN_TTL_S.
  checkpoint.pin_steps(workdir, "heldout_step_rescale2", [])
  pin_file = checkpoint.pins_dir(workdir) / "heldout.json"
  pin_file.write_text(json.dumps(dict(steps=[5], time=0.0)))
  save_tiny_step(manager, 9)
  assert steps_on_disk(workdir) == [9]
  manager.close()


def runs_checkpoint_config(keep: int):
  import ml_collections
  return ml_collections.ConfigDict(dict(keep=keep, keep_every=0, async_save=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  flags = helpers.overrides(train__num_steps=2, checkpoint__every_steps=2, eval__every_steps=0)
  result = helpers.run("train", "text_small.py", workdir, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, flags


def test_a_step_deleted_after_listing_is_skipped(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  manager = checkpoint.open_readonly(str(workdir))
  assert checkpoint_follower.list_steps(manager) == [2]
  shutil.rmtree(workdir / "checkpoints" / "2")  # the trainer's rotation, between list and read
  with pytest.raises(checkpoint_follower.StepSkipped, match="deleted by checkpoint rotation"):
    checkpoint_follower.read_step(manager, 2, abstract={}, config_dict={})


@pytest.mark.parametrize("part", ["state", "config", "meta", "data_iter",
                                  checkpoint.STEP_METADATA])
def test_removed_part_of_a_step_is_a_skip_or_exit_2_naming_it(trained, tmp_path, part):
  source, flags = trained
  workdir = tmp_path / "copy"
  shutil.copytree(source, workdir)
  target = workdir / "checkpoints" / "2" / part
  assert target.exists()
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  result = helpers.run("evaluate", "text_small.py", workdir, flags + ["--step=2"])
  output = result.stdout + result.stderr
  assert "Traceback" not in output
  assert result.returncode == 2, output[-3000:]
  assert "step 2" in output or "--step=2" in output
  records_path = workdir / "eval" / "metrics.jsonl"
  records = helpers.read_jsonl(records_path) if records_path.exists() else []
  assert all("skipped" in r for r in records)  # no evaluation of an incomplete step
  if records:
    assert records == [{"step": 2, "split": "heldout", "data": data_keys_on_disk(workdir),
                        "skipped": records[0]["skipped"]}]
    assert part in records[0]["skipped"]


def sigterm_is_caught(pid: int) -> bool:
  """Whether the process has installed a SIGTERM handler (bit 15 of /proc's SigCgt mask)."""
  with open(f"/proc/{pid}/status") as status:
    caught = next(int(l.split()[1], 16) for l in status if l.startswith("SigCgt:"))
  return bool(caught & (1 << (15 - 1)))


def test_watch_job_exits_0_on_sigterm(tmp_path):
  """A preempted eval slice: the --watch job, waiting for a trainer's first checkpoint, stops with
  exit 0 (its launcher then relaunches it without counting a failure)."""
  flags = helpers.overrides(eval__max_batches=1)
  log_path = tmp_path / "watch.log"
  watcher = start("evaluate", tmp_path, flags + ["--watch", "--poll_seconds=0.05"], log_path)
  try:
    deadline = time.time() + 300
    while not sigterm_is_caught(watcher.pid):
      assert watcher.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
      time.sleep(0.1)
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=120) == 0, log_path.read_text()[-3000:]
  finally:
    if watcher.poll() is None:
      watcher.kill()
  assert "SIGTERM: the eval job stops" in log_path.read_text()
