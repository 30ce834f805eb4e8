"""launch/tpu_pod.sh supervising a run that lasts weeks, against the fake gcloud of
tests/test_launch_tpu_pod.py: restarts counted only in a row without progress, hung workers,
maintenance notices, every worker's log kept, the run's lock, quota, and capacity flags.

The oracles are the fake's call log, the files the fake workers and the fake bucket (gs://B/P at
tmp_path/gcs/B/P) hold afterwards, and exit codes. The fake trainer's process 0 saves a new
checkpoint step whenever it stops cleanly (unless FAKE_NO_PROGRESS) and writes
WORKDIR/run_status.json before each clean exit, as s5scale.train does.
"""

import json
import signal
import subprocess
import time

import pytest

from tests import test_launch_tpu_pod
from tests.test_launch_tpu_pod import (
    CONFIG, OVERRIDE, REPO, TPU_POD, bash_split, indices, launch_calls, status_polls)


@pytest.fixture
def make_cloud(tmp_path):
  """The fake cloud, with the local config check stubbed out: it costs seconds of CPU per run,
  and tests/test_launch_tpu_pod.py already holds the launcher to it."""
  clouds = []

  def make(scenario, **faults):
    clouds.append(test_launch_tpu_pod.FakeCloud(tmp_path, scenario, **faults))
    stub = clouds[-1].bin / "validate_ok"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    clouds[-1].env["PYTHON"] = str(stub)
    return clouds[-1]

  yield make
  for cloud in clouds:
    cloud.kill_leftovers()

FINISH_SECOND = {"2/2": ["before", "finish"]}


def run_dir(cloud):
  return cloud.gcs / "bucket" / "s5" / "run"


def generation_logs(cloud, host):
  """The copies of HOST's log in WORKDIR/logs, one per launch, oldest first."""
  return sorted((run_dir(cloud) / "logs").glob(f"*/{host}"), key=lambda p: int(p.parent.name.split("-")[-1]))


def run_status(cloud):
  return json.loads((run_dir(cloud) / "run_status.json").read_text())


def one_slice_throughout(calls):
  assert len(indices(calls, "queued-resources", "create")) == 1
  assert not any("delete" in c["argv"] for c in calls)  # the capacity was never given back


def preemptions(count, recreate_every=10):
  """`count` clean stops, each at its launch's second poll; every `recreate_every`-th reclaims
  the slice instead (the queued resource leaves ACTIVE). The launch after them finishes."""
  scenario = {f"{k}/2": ["before", "preempt_slice" if k % recreate_every == 0 else "sigterm_in_place"]
              for k in range(1, count + 1)}
  scenario[f"{count + 1}/2"] = ["before", "finish"]
  return scenario


def test_25_preemptions_with_progress_finish_within_5_restarts(make_cloud):
  cloud = make_cloud(preemptions(25))
  done = cloud.run(CONFIG, OVERRIDE, MAX_RESTARTS="5")
  assert done.returncode == 0, done.stderr[-3000:]
  calls = cloud.calls()
  assert len(launch_calls(calls)) == 26
  assert len(indices(calls, "queued-resources", "create")) == 3  # the first and two reclaims
  steps = sorted(int(p.name) for p in (run_dir(cloud) / "checkpoints").iterdir())
  assert steps == [100 * k for k in range(1, 27)]  # a new step before every relaunch
  assert run_status(cloud) == {"status": "finished", "step": 2600}
  assert done.stderr.count("the restart count starts again") == 25 - 1  # not before the first
  assert "restart 2/5" not in done.stderr and "job dead" not in done.stderr


def test_restarts_without_progress_give_up_at_max_restarts(make_cloud):
  cloud = make_cloud(preemptions(25))
  done = cloud.run(CONFIG, OVERRIDE, MAX_RESTARTS="5", FAKE_NO_PROGRESS="1")
  assert done.returncode == 1
  assert "5 restarts in a row with no new checkpoint" in done.stderr
  assert len(launch_calls(cloud.calls())) == 6  # the first launch and 5 restarts


def test_clean_stop_on_a_healthy_slice_relaunches_in_place(make_cloud):
  cloud = make_cloud({"1/2": ["before", "sigterm_in_place"], **FINISH_SECOND})
  done = cloud.run(CONFIG, OVERRIDE, DELETE_WHEN_DONE="0")
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  one_slice_throughout(calls)
  launches = launch_calls(calls)
  assert len(launches) == 2
  # Before relaunching it asked every node and was told READY.
  between = calls[launches[0]:launches[1]]
  assert any("tpu-vm" in c["argv"] and "describe" in c["argv"] and c["out"] == "READY\n" for c in between)
  assert "job stopped (the trainers saved and stopped" in done.stderr and "job dead" not in done.stderr
  assert "relaunching in place" in done.stderr


def test_hung_worker_is_detected_and_the_run_recovers(make_cloud):
  cloud = make_cloud({"1/2": ["before", "hang"], **FINISH_SECOND})
  done = cloud.run(CONFIG, OVERRIDE, HANG_MINUTES="0.05", DELETE_WHEN_DONE="0")  # 3 s
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  one_slice_throughout(calls)
  launches = launch_calls(calls)
  assert len(launches) == 2
  polls = [calls[i]["out"] for i in status_polls(calls) if launches[0] < i < launches[1]]
  hung = [out for out in polls if "hung" in out]
  assert hung and all("hung" not in line for out in polls for line in out.splitlines()
                      if "s5-test-w0" in line)  # only the silent worker
  age = int(next(l for l in hung[0].splitlines() if "hung" in l).split()[2])
  assert age >= 3
  assert "worker s5-test/s5-test-w1 is hung" in done.stderr
  # Its log, as far as it got, is in WORKDIR; the relaunch stopped its trainer.
  assert "step 1 loss 5.0 on s5-test-w1" in generation_logs(cloud, "s5-test-w1")[0].read_text()
  assert "preempted at step" in generation_logs(cloud, "s5-test-w1")[0].read_text()


def test_maintenance_notice_on_one_worker_stops_cleanly_and_resumes(make_cloud):
  cloud = make_cloud({"1/2": ["before", "maintenance"], **FINISH_SECOND})
  done = cloud.run(CONFIG, OVERRIDE, DELETE_WHEN_DONE="0")
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  one_slice_throughout(calls)
  assert len(launch_calls(calls)) == 2
  first_w1 = generation_logs(cloud, "s5-test-w1")[0].read_text()
  assert "maintenance event TERMINATE_ON_HOST_MAINTENANCE" in first_w1
  assert "preempted at step" in first_w1  # the trainer got SIGTERM and saved
  assert "preempted at step" in generation_logs(cloud, "s5-test-w0")[0].read_text()  # its peer too
  assert any("stopped s5-test-w1" in calls[i]["out"] for i in status_polls(calls))
  steps = sorted(int(p.name) for p in (run_dir(cloud) / "checkpoints").iterdir())
  assert steps == [100, 200]  # the stop's save, then the finish
  assert run_status(cloud)["status"] == "finished"
  assert "failed" not in done.stderr


def test_worker_3_traceback_is_printed_and_kept_in_the_workdir(make_cloud):
  cloud = make_cloud({"1/2": ["before", "traceback"], **FINISH_SECOND}, workers=4)
  done = cloud.run(CONFIG, OVERRIDE, DELETE_WHEN_DONE="0")
  assert done.returncode == 0, done.stderr
  assert "s5-test-w3| Traceback (most recent call last):" in done.stderr
  assert "s5-test-w3| RuntimeError: fake collective failed on s5-test-w3" in done.stderr
  assert "s5-test-w0|" not in done.stderr  # only the failing worker's tail
  first = [generation_logs(cloud, f"s5-test-w{i}")[0] for i in range(4)]
  assert len({p.parent for p in first}) == 1  # one folder per launch, one file per host
  assert "RuntimeError: fake collective failed on s5-test-w3" in first[3].read_text()
  assert len(generation_logs(cloud, "s5-test-w3")) == 2  # the relaunch's log beside it
  # The worker keeps the earlier launch's log too, on its own disk.
  kept = list((cloud.root / "workers" / "s5-test" / "w3" / "s5scale_logs").glob("*.log"))
  assert any("Traceback" in p.read_text() for p in kept)


def test_second_supervisor_on_the_same_run_exits_2_naming_the_lock(make_cloud):
  cloud = make_cloud("attach")
  first = subprocess.Popen([TPU_POD, CONFIG, OVERRIDE], cwd=REPO, env=cloud.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while len(cloud.jobs()) < 2 and time.time() < deadline:
      time.sleep(0.05)
    lock = run_dir(cloud) / "supervisor.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = cloud.run(CONFIG, OVERRIDE)
    assert second.returncode == 2
    assert "gs://bucket/s5/run/supervisor.lock" in second.stderr and f'"pid": {first.pid}' in second.stderr
    assert json.loads(lock.read_text())["pid"] == first.pid  # left alone
    assert len(indices(cloud.calls(), "queued-resources", "create")) == 1
    assert len(launch_calls(cloud.calls())) == 1
  finally:
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 130
  assert not lock.exists()  # released on the way out; the next supervisor attaches


def test_stale_lock_is_taken_over(make_cloud):
  cloud = make_cloud("finish")
  lock = run_dir(cloud) / "supervisor.lock"
  lock.parent.mkdir(parents=True)
  lock.write_text('{"host": "gone", "pid": 1, "time": "2020-01-01T00:00:00Z", "unix": 1577836800}\n')
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 0, done.stderr
  assert "taking over" in done.stderr and not lock.exists()


def test_quota_failure_exits_2_with_the_message(make_cloud):
  cloud = make_cloud("finish", quota=True)
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 2
  assert "Quota 'TPUV5sLitepodPerProjectPerZoneForTPUAPI' exhausted" in done.stderr
  calls = cloud.calls()
  assert len(indices(calls, "queued-resources", "create")) == 1  # not retried, not restarted
  assert launch_calls(calls) == []
  assert not (run_dir(cloud) / "supervisor.lock").exists()


def test_retried_create_that_already_exists_is_accepted(make_cloud):
  cloud = make_cloud("finish", lose_create_answer=1)
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  creates = [calls[i] for i in indices(calls, "queued-resources", "create")]
  assert [c["rc"] for c in creates] == [1, 1] and len(launch_calls(calls)) == 1
  assert "ALREADY_EXISTS" in done.stderr and "(fine)" in done.stderr
  assert "restart" not in done.stderr


def test_eval_job_stopped_by_a_notice_uses_no_restart(make_cloud):
  cloud = make_cloud({"1/2": ["before", "sigterm_in_place"], **FINISH_SECOND})
  done = cloud.run("--eval", CONFIG, MAX_RESTARTS="0", DELETE_WHEN_DONE="0")
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  assert len(launch_calls(calls, "s5scale.evaluate")) == 2
  assert any("gs://bucket/s5/run/supervisor-eval.lock" in c["argv"] for c in calls)
  assert "restart 0/0" in done.stderr


def test_only_tracked_files_are_shipped(make_cloud):
  probe = REPO / "untracked_probe_for_pack_code.txt"
  probe.write_text("must stay on this machine\n")
  try:
    cloud = make_cloud("finish")
    done = cloud.run(CONFIG, OVERRIDE)
  finally:
    probe.unlink()
  assert done.returncode == 0, done.stderr
  tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
  shipped = json.loads(cloud.lines("scp_files.log")[0])
  assert set(shipped) == {f for f in tracked if (REPO / f).exists()}
  assert "requirements.lock" in shipped


def test_capacity_and_network_flags_reach_the_create_call(make_cloud):
  cloud = make_cloud("finish")
  done = cloud.run("--dry-run", "--reserved", "--network=net-a", "--subnetwork=sub-a",
                   "--service-account=sa@p.iam.gserviceaccount.com", CONFIG, SPOT="0")
  assert done.returncode == 0, done.stderr
  create = next(bash_split(l) for l in done.stdout.splitlines() if " queued-resources create " in l)
  for flag in ["--reserved", "--network=net-a", "--subnetwork=sub-a",
               "--service-account=sa@p.iam.gserviceaccount.com"]:
    assert flag in create
  assert "--spot" not in create and "--best-effort" not in create
  # The same from the environment.
  done = cloud.run("--dry-run", CONFIG, SPOT="0", BEST_EFFORT="1", NETWORK="net-b")
  create = next(bash_split(l) for l in done.stdout.splitlines() if " queued-resources create " in l)
  assert "--best-effort" in create and "--network=net-b" in create and "--reserved" not in create
  # One kind of capacity at a time.
  done = cloud.run(CONFIG, "--reserved")  # SPOT=1 in the environment
  assert done.returncode == 2 and "exclusive" in done.stderr
  assert cloud.calls() == []


def test_help_documents_the_supervisor_inputs(make_cloud):
  done = make_cloud("finish").run("--help")
  for name in ["--reserved", "RESERVED", "--best-effort", "BEST_EFFORT", "NETWORK", "SUBNETWORK",
               "SERVICE_ACCOUNT", "HANG_MINUTES", "S5SCALE_MAINTENANCE_URL", "run_status.json",
               "supervisor.lock", "WORKDIR/logs", "LOCK_STALE_SECONDS"]:
    assert name in done.stdout
