"""launch/tpu_pod.sh against a fake gcloud, and launch/local.sh against a fake python.

The fake gcloud records every call and simulates one queued resource whose workers are directories
on this machine: scp copies into them and ssh really runs the command there with bash, so the
worker side (launch/tpu_worker.sh install/start/status) is executed, not just pattern-matched.
`uv` on the fake workers makes the venv's python a fake trainer that logs, then waits for the fake
gcloud to tell it to finish, crash or fail its config, or for SIGTERM (a preemption notice).
"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = str(REPO / "launch" / "tpu_pod.sh")
LOCAL = str(REPO / "launch" / "local.sh")
WORKDIR = "gs://bucket/s5/run"
CONFIG = "configs/text_small.py"
OVERRIDE = "--config.train.num_steps=700"  # valid: s5scale.validate runs first
NUM_WORKERS = 2

FAKE_GCLOUD = r'''#!{python} -S
import json, os, shutil, signal, subprocess, sys, time
started = time.time()
root = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]
state_path = os.path.join(root, "state.json")
state = json.load(open(state_path))
words = [a for a in argv if not a.startswith("-")]
group, verb = words[2], words[3]
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
homes = [os.path.join(root, "workers", f"w{i}") for i in range(state["workers"])]
out, err, rc = "", "", 0

def jobs(sig):
  for home in homes:
    try:
      os.killpg(int(open(os.path.join(home, "s5scale_run", "pid")).read()), sig)
    except (OSError, ValueError):
      pass

def control_all(code, workers):
  os.makedirs(os.path.join(root, "control"), exist_ok=True)
  for i in workers:
    open(os.path.join(root, "control", f"w{i}"), "w").write(str(code))
  wait_exit(workers)

def wait_exit(workers):
  deadline = time.time() + 10
  while time.time() < deadline and not all(
      os.path.exists(os.path.join(homes[i], "s5scale_run", "exit_code")) for i in workers):
    time.sleep(0.02)

def act(action):
  if action == "preempt_slice":  # the queued resource leaves ACTIVE
    jobs(signal.SIGTERM); wait_exit(range(len(homes)))
    state["qr"], state["node"] = "SUSPENDED", "PREEMPTED"
  elif action == "preempt_node":  # only the node says so; ssh stops working
    jobs(signal.SIGTERM); wait_exit(range(len(homes)))
    state["node"] = "PREEMPTED"
  elif action == "sigterm_in_place":  # e.g. maintenance: the trainers save and exit 0
    jobs(signal.SIGTERM); wait_exit(range(len(homes)))
  elif action == "crash":
    control_all(1, [1])
  elif action == "bad_config":
    control_all(2, range(len(homes)))
  elif action == "finish":
    # Let tpu_pod.sh's log stream show worker 0's first line before the run ends, as it would
    # over the hours of a real run.
    deadline = time.time() + 10
    streamed = os.path.join(root, "streamed.log")
    while time.time() < deadline and not (os.path.exists(streamed) and "on w0" in open(streamed).read()):
      time.sleep(0.05)
    control_all(0, range(len(homes)))

def status_poll():
  state["polls"] += 1
  step = state["scenario"].get(f'{state["launches"]}/{state["polls"]}')
  if os.path.exists(os.path.join(root, "release")):  # attach scenario
    state["polls_after_release"] += 1
    if state["polls_after_release"] == 2:
      step = ["before", "finish"]
  if step and step[0] == "before":
    act(step[1])
  return step

def run_on_workers(command):
  global out, err, rc
  selected = homes if flags["worker"] == "all" else [homes[int(flags["worker"])]]
  for home in selected:
    env = dict(os.environ, HOME=home)
    if command.startswith("tail "):  # a stream that drops soon
      command = "timeout 0.3 " + command
    done = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True)
    out += done.stdout; err += done.stderr; rc = max(rc, done.returncode)

if group == "queued-resources":
  if verb == "create":
    if state["qr"]:
      err, rc = "ALREADY_EXISTS", 1
    else:
      state["qr"] = "WAITING_FOR_RESOURCES"
  elif state["qr"] is None:
    err, rc = f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: {words[4]}", 1
  elif verb == "describe":
    out = state["qr"] + "\n"
    if state["qr"] == "WAITING_FOR_RESOURCES":  # provisioned by the next look: fresh, empty VMs
      state["qr"], state["node"] = "ACTIVE", "READY"
      for home in homes:
        os.makedirs(home)
  elif verb == "delete":
    jobs(signal.SIGKILL)
    shutil.rmtree(os.path.join(root, "workers"), ignore_errors=True)
    state["qr"] = state["node"] = None
elif verb == "describe":
  out = f'{state["node"]}\n'
elif state["qr"] != "ACTIVE" or state["node"] != "READY":
  err, rc = "ssh: connect to host 10.0.0.2 port 22: Connection refused", 255
elif verb == "scp":
  import tarfile  # only here: it is slow to import and the fake runs dozens of times per test
  with tarfile.open(words[4]) as tar:
    names = sorted({n.lstrip("./").split("/")[0] for n in tar.getnames()} - {""})
  open(os.path.join(root, "scp.log"), "a").write(json.dumps(names) + "\n")
  for home in homes:
    shutil.copy(words[4], os.path.join(home, words[5].split(":", 1)[1]))
elif verb == "ssh":
  command = flags["command"]
  step = status_poll() if "s5scale-status" in command else None
  if state["node"] != "READY":
    err, rc = "ssh: connect to host 10.0.0.2 port 22: Connection refused", 255
  else:
    run_on_workers(command)
  if "s5scale.train" in command or "s5scale.evaluate" in command:
    state["launches"] += 1; state["polls"] = 0
  if step and step[0] == "after":
    act(step[1])

if not (verb == "ssh" and flags.get("command", "").startswith("tail ")):
  # The log stream runs beside other calls, so it never writes, and writes are atomic renames.
  json.dump(state, open(state_path + ".tmp", "w")); os.replace(state_path + ".tmp", state_path)
open(os.path.join(root, "calls.jsonl"), "a").write(json.dumps({"argv": argv, "out": out, "rc": rc, "seconds": [started, time.time()]}) + "\n")
sys.stdout.write(out); sys.stdout.flush(); sys.stderr.write(err)
if flags.get("command", "").startswith("tail "):
  open(os.path.join(root, "streamed.log"), "a").write(out)
sys.exit(rc)
'''

FAKE_UV = r'''#!/usr/bin/env bash
# uv venv ... DIR: DIR/bin/python is the fake trainer. uv pip install: checks it runs in the code.
if [ "$1" = venv ]; then dir=${@: -1}; mkdir -p "$dir/bin"; cp "$FAKE_BIN/fake_trainer" "$dir/bin/python"; exit 0; fi
[ -f pyproject.toml ] || { echo "no pyproject.toml in $PWD" >&2; exit 1; }
printf '%s %s %s\n' "$(basename "$HOME")" "$PWD" "$*" >> "$FAKE_GCLOUD_DIR/installs.log"
'''

FAKE_TRAINER = r'''#!/usr/bin/env bash
worker=$(basename "$HOME")
printf '%s %s%s\n' "$worker" "$PWD" "$(printf ' %q' "$@")" >> "$FAKE_GCLOUD_DIR/jobs.log"
echo "step 1 loss 5.0 on $worker"
trap 'echo "preempted at step 3, checkpoint saved"; exit 0' TERM
for _ in $(seq 600); do
  control="$FAKE_GCLOUD_DIR/control/$worker"
  if [ -f "$control" ]; then
    code=$(cat "$control"); rm -f "$control"
    if [ "$code" = 2 ]; then echo "error: unknown config key model.bogus"; else echo "stopping with $code"; fi
    exit "$code"
  fi
  sleep 0.05
done
exit 99
'''

SCENARIOS = {  # "launch/poll": [before|after answering that status poll, action]
    # The run is lost four ways in a row: the queued resource is SUSPENDED; only the node says
    # PREEMPTED; the trainers get SIGTERM, save and exit 0 on a slice that stays ACTIVE; a
    # worker's trainer crashes. The fifth launch finishes.
    "four_losses": {"1/2": ["after", "preempt_slice"], "2/2": ["before", "preempt_node"],
                    "3/2": ["before", "sigterm_in_place"], "4/2": ["before", "crash"],
                    "5/2": ["before", "finish"]},
    "bad_config": {"1/1": ["before", "bad_config"]},
    "attach": {},
}


class FakeCloud:
  """Writes the fakes into tmp_path and reads back what they recorded."""

  def __init__(self, tmp_path, scenario):
    self.bin = tmp_path / "bin"
    self.root = tmp_path / "cloud"
    self.bin.mkdir()
    self.root.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD.replace("{python}", sys.executable)),
                       ("uv", FAKE_UV), ("fake_trainer", FAKE_TRAINER)]:
      (self.bin / name).write_text(text)
      (self.bin / name).chmod(0o755)
    (self.root / "state.json").write_text(json.dumps({
        "qr": None, "node": None, "workers": NUM_WORKERS, "launches": 0, "polls": 0,
        "polls_after_release": 0, "scenario": SCENARIOS[scenario]}))
    self.env = dict(
        os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(self.root),
        PYTHON=sys.executable,  # validates CONFIG locally with this interpreter
        FAKE_BIN=str(self.bin), TPU_NAME="s5-test", ZONE="us-west4-a",
        ACCELERATOR_TYPE="v5litepod-16", WORKDIR=WORKDIR, SPOT="1", POLL_SECONDS="0.02",
        MAX_RESTARTS="4")

  def run(self, *args, **env):
    # A hang guard, not a timing: five fake relaunches take ~20 s idle, over 60 s on a busy machine.
    return subprocess.run([TPU_POD, *args], cwd=REPO, env=dict(self.env, **env),
                          capture_output=True, text=True, timeout=300)

  def calls(self):
    path = self.root / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def lines(self, name):
    path = self.root / name
    return path.read_text().splitlines() if path.exists() else []

  def jobs(self):
    """(worker, cwd, argv) of every trainer the workers actually started."""
    return [(parts[0], parts[1], parts[2:]) for parts in map(shlex.split, self.lines("jobs.log"))]

  def kill_leftovers(self):
    for pid_file in self.root.glob("workers/*/s5scale_run/pid"):
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (OSError, ValueError):
        pass


@pytest.fixture
def make_cloud(tmp_path):
  clouds = []

  def make(scenario):
    clouds.append(FakeCloud(tmp_path, scenario))
    return clouds[-1]

  yield make
  for cloud in clouds:
    cloud.kill_leftovers()


def indices(calls, *words, worker=None):
  """Positions of the calls whose argv contains all `words` (and --worker=`worker`)."""
  found = []
  for i, call in enumerate(calls):
    argv = call["argv"]
    if all(w in argv for w in words) and (worker is None or f"--worker={worker}" in argv):
      found.append(i)
  return found


def bash_split(line):
  """argv of a printed shell command, as bash itself parses it ($'..' quoting included)."""
  done = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                        capture_output=True, text=True, check=True)
  return done.stdout.split("\0")[:-1]


def command_of(call):
  return next(a.split("=", 1)[1] for a in call["argv"] if a.startswith("--command="))


def test_recreates_slice_and_resumes_after_each_loss(make_cloud):
  cloud = make_cloud("four_losses")
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()

  creates = indices(calls, "queued-resources", "create")
  assert len(creates) == 5
  for i in creates:
    argv = calls[i]["argv"]
    for flag in ["s5-test", "--node-id=s5-test", "--zone=us-west4-a",
                 "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]:
      assert flag in argv
  assert indices(calls, "queued-resources", "describe")[0] < creates[0]  # looked before creating
  deletes = indices(calls, "queued-resources", "delete")
  for before, after in zip(creates, creates[1:]):
    assert any(before < d < after for d in deletes)  # deleted, then created again

  # Each loss was noticed through what gcloud reported, in order.
  noticed = [("queued-resources", "SUSPENDED"), ("tpu-vm", "PREEMPTED"), ("ssh", "preempted"),
             ("ssh", "failed 1")]
  for (word, answer), before, after in zip(noticed, creates, creates[1:]):
    assert any(word in c["argv"] and answer in c["out"] for c in calls[before:after])

  # Copied and installed on every worker of every slice, then launched on --worker=all.
  scps = indices(calls, "scp", worker="all")
  assert len(scps) == 5 and all(c < s for c, s in zip(creates, scps))
  for names in map(json.loads, cloud.lines("scp.log")):
    assert {"pyproject.toml", "s5scale", "configs", "launch"} <= set(names)
    assert not {".git", ".venv"} & set(names)
  installs = cloud.lines("installs.log")
  assert len(installs) == 5 * NUM_WORKERS and all("-e .[tpu]" in l for l in installs)
  launches = [i for i in indices(calls, "ssh", worker="all") if "s5scale.train" in command_of(calls[i])]
  assert len(launches) == 5 and all(c < l for c, l in zip(creates, launches))

  # What the workers really ran: the same command, hence the same workdir, every time.
  expected_argv = ["-m", "s5scale.train", f"--config={CONFIG}", f"--workdir={WORKDIR}", OVERRIDE]
  jobs = cloud.jobs()
  assert sorted(worker for worker, _, _ in jobs) == ["w0"] * 5 + ["w1"] * 5
  for _, cwd, argv in jobs:
    assert argv == expected_argv
    assert cwd.endswith("/s5scale")  # CONFIG's relative path resolves in the copied code

  assert "step 1 loss 5.0 on w0" in done.stdout  # worker 0's log is streamed
  assert "on w1" not in done.stdout
  assert "finished" in done.stderr
  assert deletes[-1] > launches[-1]  # the finished slice is given back
  assert json.loads((cloud.root / "state.json").read_text())["qr"] is None


def test_gives_up_after_max_restarts(make_cloud):
  cloud = make_cloud("four_losses")
  done = cloud.run(CONFIG, OVERRIDE, MAX_RESTARTS="0")
  assert done.returncode == 1 and "giving up" in done.stderr
  assert len(indices(cloud.calls(), "queued-resources", "create")) == 1


def test_bad_config_exits_2_without_restarting(make_cloud):
  cloud = make_cloud("bad_config")
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 2
  calls = cloud.calls()
  assert len(indices(calls, "queued-resources", "create")) == 1
  assert indices(calls, "queued-resources", "delete") == []
  assert len(cloud.jobs()) == NUM_WORKERS
  assert "unknown config key model.bogus" in done.stderr + done.stdout  # the trainer's message


def test_rerun_attaches_to_the_running_job(make_cloud):
  cloud = make_cloud("attach")
  first = subprocess.Popen([TPU_POD, CONFIG, OVERRIDE], cwd=REPO, env=cloud.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while len(cloud.jobs()) < NUM_WORKERS and time.time() < deadline:
    time.sleep(0.05)
  first.send_signal(signal.SIGTERM)  # the supervisor stops; the job must not
  assert first.wait(timeout=10) == 130
  (cloud.root / "release").touch()
  calls_before = len(cloud.calls())

  second = cloud.run(CONFIG, OVERRIDE)
  assert second.returncode == 0, second.stderr
  assert "attaching" in second.stderr
  new_calls = cloud.calls()[calls_before:]
  assert indices(new_calls, "create") == [] and indices(new_calls, "scp") == []
  assert not any("s5scale.train" in command_of(c) for c in new_calls if "ssh" in c["argv"])
  assert len(cloud.jobs()) == NUM_WORKERS  # still the one launch


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dry_run_prints_commands_and_runs_none(make_cloud, mode):
  cloud = make_cloud("four_losses")
  done = cloud.run(*(["--eval"] if mode == "eval" else []), "--dry-run", CONFIG, OVERRIDE)
  assert done.returncode == 0, done.stderr
  assert cloud.calls() == []
  printed = [bash_split(l) for l in done.stdout.splitlines() if l.startswith("gcloud ")]
  slice_name, accelerator, module = {
      "train": ("s5-test", "v5litepod-16", "s5scale.train"),
      "eval": ("s5-test-eval", "v5litepod-8", "s5scale.evaluate")}[mode]
  create = next(argv for argv in printed if argv[3:5] == ["queued-resources", "create"])
  assert slice_name in create and f"--accelerator-type={accelerator}" in create and "--spot" in create
  assert any(argv[3:5] == ["tpu-vm", "scp"] and "--worker=all" in argv for argv in printed)
  launch = [a for argv in printed if "--worker=all" in argv for a in argv
            if a.startswith("--command=") and module in a]
  assert len(launch) == 1 and f"--workdir={WORKDIR}" in launch[0] and OVERRIDE in launch[0]
  assert ("--watch" in launch[0]) == (mode == "eval")


def test_help_documents_every_input(make_cloud):
  done = make_cloud("four_losses").run("--help")
  assert done.returncode == 0
  for name in ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "WORKDIR",
               "SPOT", "MAX_RESTARTS", "POLL_SECONDS", "EVAL_ACCELERATOR_TYPE", "--eval",
               "--dry-run", "CONFIG"]:
    assert name in done.stdout


@pytest.mark.parametrize("env, message", [({"WORKDIR": "/tmp/run"}, "gs://"),
                                          ({"ZONE": ""}, "ZONE"),
                                          ({"MAX_RESTARTS": "many"}, "MAX_RESTARTS")])
def test_bad_input_exits_2_before_any_gcloud_call(make_cloud, env, message):
  cloud = make_cloud("four_losses")
  done = cloud.run(CONFIG, **env)
  assert done.returncode == 2 and message in done.stderr
  assert cloud.calls() == []


# ---------------------------------------------------------------------------------------------
# launch/local.sh with a fake python
# ---------------------------------------------------------------------------------------------

FAKE_PYTHON = r'''#!/usr/bin/env bash
# Records its environment and arguments, then exits with FAKE_EXIT_<id> or waits for SIGTERM.
id=$S5SCALE_PROCESS_ID
{ echo "coordinator=$S5SCALE_COORDINATOR"; echo "num_processes=$S5SCALE_NUM_PROCESSES"
  echo "process_id=$id"; echo "jax_platforms=$JAX_PLATFORMS"; echo "xla_flags=${XLA_FLAGS:-}"
  printf 'arg=%s\n' "$@"; } > "$FAKE_RECORD_DIR/process_$id"
echo "hello from process $id"
code_var=FAKE_EXIT_$id
if [ -n "${!code_var:-}" ]; then sleep 0.3; exit "${!code_var}"; fi
trap 'echo "got SIGTERM"; echo term >> "$FAKE_RECORD_DIR/process_$id"; kill $sleeper; exit 0' TERM
sleep 30 & sleeper=$!; wait $sleeper
exit 99
'''


def local_run(tmp_path, *args, env=None, wait=True):
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  (tmp_path / "records").mkdir(exist_ok=True)
  full_env = dict(os.environ, PYTHON=str(fake), FAKE_RECORD_DIR=str(tmp_path / "records"), **(env or {}))
  full_env.pop("XLA_FLAGS", None)
  popen = subprocess.Popen([LOCAL, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  return popen.communicate(timeout=30) + (popen.returncode,) if wait else popen


def records(tmp_path):
  out = {}
  for path in sorted((tmp_path / "records").glob("process_*")):
    lines = path.read_text().splitlines()
    out[path.name] = {"args": [l[4:] for l in lines if l.startswith("arg=")],
                      **dict(l.split("=", 1) for l in lines if "=" in l and not l.startswith("arg=")),
                      "term": "term" in lines}
  return out


def test_local_starts_n_processes_with_distinct_ids(tmp_path):
  workdir = tmp_path / "wd"
  stdout, stderr, code = local_run(tmp_path, "-n", "2", "-d", "3", CONFIG, f"--workdir={workdir}",
                                   OVERRIDE, env={"FAKE_EXIT_0": "0", "FAKE_EXIT_1": "0"})
  assert code == 0, stderr
  procs = records(tmp_path)
  assert sorted(procs) == ["process_0", "process_1"]
  assert [procs[p]["process_id"] for p in sorted(procs)] == ["0", "1"]
  coordinators = {p["coordinator"] for p in procs.values()}
  assert len(coordinators) == 1 and coordinators.pop().startswith("localhost:")
  for p in procs.values():
    assert p["num_processes"] == "2" and p["jax_platforms"] == "cpu"
    assert p["xla_flags"] == "--xla_force_host_platform_device_count=3"
    assert p["args"] == ["-m", "s5scale.train", f"--config={CONFIG}", f"--workdir={workdir}", OVERRIDE]
  for i in (0, 1):
    assert f"[p{i}] hello from process {i}" in stdout.splitlines()
    assert f"hello from process {i}" in (workdir / "logs" / f"process_{i}.log").read_text()


def test_local_propagates_first_failure_and_stops_the_others(tmp_path):
  stdout, stderr, code = local_run(tmp_path, "-n", "2", CONFIG, f"--workdir={tmp_path / 'wd'}",
                                   env={"FAKE_EXIT_1": "3"})
  assert code == 3
  procs = records(tmp_path)
  assert procs["process_0"]["term"]  # would otherwise hang waiting for its dead peer
  assert "[p0] got SIGTERM" in stdout


def test_local_forwards_sigterm_to_every_process(tmp_path):
  popen = local_run(tmp_path, "-n", "2", CONFIG, f"--workdir={tmp_path / 'wd'}", wait=False)
  deadline = time.time() + 20
  while len(records(tmp_path)) < 2 and time.time() < deadline:
    time.sleep(0.05)
  popen.send_signal(signal.SIGTERM)
  stdout, _ = popen.communicate(timeout=20)
  assert popen.returncode == 0  # the trainer's checkpoint-and-exit-0 contract passes through
  assert all(p["term"] for p in records(tmp_path).values())
  assert "[p0] got SIGTERM" in stdout and "[p1] got SIGTERM" in stdout


@pytest.mark.parametrize("args, message", [([CONFIG], "-n"), (["-n", "2"], "CONFIG"),
                                           (["-n", "2", "configs/missing.py"], "configs/missing.py"),
                                           (["-n", "two", CONFIG], "-n")])
def test_local_bad_arguments_exit_2(tmp_path, args, message):
  _, stderr, code = local_run(tmp_path, *args)
  assert code == 2 and message in stderr
  assert records(tmp_path) == {}
