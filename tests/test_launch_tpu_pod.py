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

def log_storage(out, rc):
  open(os.path.join(root, "calls.jsonl"), "a").write(json.dumps(
      {"argv": argv, "out": out, "rc": rc, "seconds": [started, time.time()]}) + "\n")

if argv[0] == "storage":  # gs://B/P is the file FAKE_GCS_DIR/B/P; no slice state involved
  verb, urls = argv[1], [a for a in argv[2:] if not a.startswith("-")]
  local = lambda url: os.path.join(os.environ["FAKE_GCS_DIR"], url[len("gs://"):])
  out, err, rc = "", "", 0
  missing = f"ERROR: (gcloud.storage.{verb}) The following URLs matched no objects or files:\n-{urls[0]}\n"
  if verb == "ls":
    path = local(urls[0])
    if os.path.isdir(path):
      base = urls[0].rstrip("/")
      out = "".join(f"{base}/{n}/\n" if os.path.isdir(os.path.join(path, n)) else f"{base}/{n}\n"
                    for n in sorted(os.listdir(path)))
    else:
      err, rc = missing, 1
  elif verb == "cat":
    if os.path.isfile(local(urls[0])):
      out = open(local(urls[0])).read()
    else:
      err, rc = missing, 1
  elif verb == "rm":
    if os.path.isfile(local(urls[0])):
      os.remove(local(urls[0]))
    else:
      err, rc = missing, 1
  elif verb == "cp":
    src, dst = urls
    if dst.startswith("gs://") and "--if-generation-match=0" in argv and os.path.exists(local(dst)):
      err, rc = "ERROR: HTTPError 412: At least one of the pre-conditions you specified did not hold.\n", 1
    else:
      src = local(src) if src.startswith("gs://") else src
      dst = local(dst) if dst.startswith("gs://") else dst
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copy(src, dst + ".tmp"); os.replace(dst + ".tmp", dst)
  log_storage(out, rc)
  sys.stdout.write(out); sys.stderr.write(err)
  sys.exit(rc)

state_path = os.path.join(root, "state.json")
state = json.load(open(state_path))
words = [a for a in argv if not a.startswith("-")]
group, verb = words[2], words[3]
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
faults = state["faults"]
out, err, rc = "", "", 0
REFUSED = "ssh: connect to host 10.0.0.2 port 22: Connection refused"

def homes(node=None):
  nodes = [node] if node else state["nodes"]
  return [os.path.join(root, "workers", n, f"w{i}") for n in nodes for i in range(state["workers"])]

def log_call(**extra):
  open(os.path.join(root, "calls.jsonl"), "a").write(json.dumps(
      {"argv": argv, "out": out, "rc": rc, "seconds": [started, time.time()], **extra}) + "\n")

def jobs(sig, selected=None):
  for home in selected or homes():
    try:
      os.killpg(int(open(os.path.join(home, "s5scale_run", "pid")).read()), sig)
    except (OSError, ValueError):
      pass

def control(code, selected):
  os.makedirs(os.path.join(root, "control"), exist_ok=True)
  for home in selected:  # named like the worker's hostname: NODE-wI
    name = os.path.basename(os.path.dirname(home)) + "-" + os.path.basename(home)
    path = os.path.join(root, "control", name)
    open(path + ".tmp", "w").write(str(code)); os.replace(path + ".tmp", path)  # read whole
  wait_exit(selected)

def wait_exit(selected):
  deadline = time.time() + 10
  while time.time() < deadline and not all(
      os.path.exists(os.path.join(home, "s5scale_run", "exit_code")) for home in selected):
    time.sleep(0.02)

def remove_slice():
  jobs(signal.SIGKILL)
  shutil.rmtree(os.path.join(root, "workers"), ignore_errors=True)
  state["nodes"] = {}
  faults["unreachable_polls"] = 0  # that host is gone with the slice

def act(action):
  if action == "preempt_slice":  # the queued resource leaves ACTIVE
    jobs(signal.SIGTERM); wait_exit(homes())
    state["qr"] = "SUSPENDED"; state["nodes"] = {n: "PREEMPTED" for n in state["nodes"]}
  elif action == "preempt_node":  # only the node says so; ssh stops working
    jobs(signal.SIGTERM); wait_exit(homes())
    state["nodes"] = {n: "PREEMPTED" for n in state["nodes"]}
  elif action == "preempt_last_node":  # multislice: one slice is reclaimed, the other hangs on
    last = sorted(state["nodes"])[-1]
    jobs(signal.SIGTERM, homes(last)); wait_exit(homes(last))
    state["nodes"][last] = "PREEMPTED"
  elif action == "sigterm_in_place":  # e.g. maintenance: the trainers save and exit 0
    jobs(signal.SIGTERM); wait_exit(homes())
  elif action == "crash":  # worker 1 dies; worker 0's trainer is left running (stuck)
    control(1, homes()[1:2])
  elif action == "stale":  # as crash, plus a stray process holding worker 0's TPU device
    home = homes()[0]
    stray = subprocess.Popen(["bash", "-c", 'exec 9<"$1"; exec sleep 300', "_",
                              os.path.join(home, "dev", "accel0")], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open(os.path.join(root, "strays"), "a").write(f"{stray.pid}\n")
    control(1, homes()[1:2])
  elif action == "bad_config":
    control(2, homes())
  elif action == "vanish":  # the service removes the reclaimed slice before we delete it
    remove_slice(); state["qr"] = None
  elif action == "fail_capacity":
    remove_slice(); state["qr"] = "FAILED"
    state["qr_error"] = "There is no more capacity in the zone us-west4-a; try again later."
  elif action == "unreachable":  # worker 1 stops answering ssh for 3 polls
    faults["unreachable_polls"] = 3
  elif action == "maintenance":  # worker 1's metadata server announces host maintenance
    open(os.path.join(homes()[1], "maintenance-event"), "w").write("TERMINATE_ON_HOST_MAINTENANCE")
  elif action == "hang":  # worker 1's trainer stays alive but stops logging
    os.makedirs(os.path.join(root, "control"), exist_ok=True)
    name = os.path.join(root, "control", os.path.basename(os.path.dirname(homes()[1])) + "-w1")
    open(name + ".tmp", "w").write("hang"); os.replace(name + ".tmp", name)
  elif action == "traceback":  # worker 3 (of 4) dies with a Python traceback
    control("traceback", homes()[3:4])
  elif action == "finish":
    # Let tpu_pod.sh's log stream show worker 0's first line before the run ends, as it would
    # over the hours of a real run.
    deadline = time.time() + 10
    streamed = os.path.join(root, "streamed.log")
    while time.time() < deadline and not (os.path.exists(streamed) and "on " in open(streamed).read()):
      time.sleep(0.05)
    control(0, homes())

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

def worker_env(home):
  # Each fake worker is its own machine: its hostname, TPU device and libtpu lock file.
  return dict(os.environ, HOME=home, PATH=os.path.join(home, "bin") + ":" + os.environ["PATH"],
              S5SCALE_TPU_DEVICES=os.path.join(home, "dev", "accel*"),
              S5SCALE_LIBTPU_LOCKFILE=os.path.join(home, "tmp", "libtpu_lockfile"),
              S5SCALE_STALE_GRACE_SECONDS="2",
              S5SCALE_MAINTENANCE_URL="file://" + os.path.join(home, "maintenance-event"),
              S5SCALE_MAINTENANCE_POLL_SECONDS="0.1")

def run_on_workers(node, command, skip=()):
  global out, err, rc
  selected = homes(node) if flags["worker"] == "all" else [homes(node)[int(flags["worker"])]]
  for home in selected:
    if home in skip:
      err += f"ssh: connect to host {home}: Connection timed out\n"; rc = 255
      continue
    if command.startswith("tail "):  # a stream that drops soon
      command = "timeout 0.3 " + command
    done = subprocess.run(["bash", "-c", command], cwd=home, env=worker_env(home),
                          capture_output=True, text=True)
    out += done.stdout; err += done.stderr; rc = max(rc, done.returncode)

def make_workers():
  for node in state["nodes"]:
    for home in homes(node):
      for sub in ("bin", "dev", "tmp"):
        os.makedirs(os.path.join(home, sub))
      open(os.path.join(home, "dev", "accel0"), "w").close()
      hostname = os.path.join(home, "bin", "hostname")
      open(hostname, "w").write(f"#!/bin/sh\necho {node}-{os.path.basename(home)}\n")
      os.chmod(hostname, 0o755)

node = words[5].split(":", 1)[0] if verb == "scp" else words[4]
streaming = verb == "ssh" and flags.get("command", "").startswith("tail ")
if group == "queued-resources":
  if verb == "create":
    if "bogus" in flags["accelerator-type"]:
      err, rc = "ERROR: (gcloud...create) INVALID_ARGUMENT: accelerator type not in zone", 1
    elif state["qr"]:
      err, rc = "ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: " + node, 1
    elif faults.get("quota"):
      state["qr"] = "FAILED"
      state["qr_error"] = "Quota 'TPUV5sLitepodPerProjectPerZoneForTPUAPI' exhausted. Limit 0 in region us-west4"
    else:
      state["qr"], state["qr_error"] = "WAITING_FOR_RESOURCES", ""
      count = int(flags.get("node-count", 1))
      names = [f'{flags["node-prefix"]}-{i}' for i in range(count)] if "node-prefix" in flags else [flags["node-id"]]
      state["nodes"] = {n: "CREATING" for n in names}
      if faults.get("lose_create_answer", 0) > 0:  # created, but the answer never arrives
        faults["lose_create_answer"] -= 1
        err, rc = "ERROR: gcloud crashed (ConnectionError): connection reset by peer", 1
  elif state["qr"] is None:
    err, rc = f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: {node}", 1
  elif verb == "describe":
    out = state["qr"] + ("\t" + state["qr_error"] if "failedData" in flags.get("format", "") else "") + "\n"
    if state["qr"] == "WAITING_FOR_RESOURCES":  # provisioned by the next look: fresh, empty VMs
      state["qr"] = "ACTIVE"
      state["nodes"] = {n: "READY" for n in state["nodes"]}
      make_workers()
      faults["refuse"] = faults.get("refuse_after_active", 0)
  elif verb == "delete":
    remove_slice()
    state["qr"] = None
elif verb == "describe":
  if node in state["nodes"]:
    out = f'{state["nodes"][node]}\n'
  else:
    err, rc = f"ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: {node}", 1
elif state["qr"] != "ACTIVE" or state["nodes"].get(node) != "READY":
  err, rc = REFUSED, 255
elif not streaming and faults.get("refuse", 0) > 0:  # sshd not ready just after ACTIVE
  faults["refuse"] -= 1
  err, rc = REFUSED, 255
elif verb == "scp":
  if faults.get("hang_scp", 0) > 0:  # the copy stalls until something kills it
    faults["hang_scp"] -= 1
    json.dump(state, open(state_path + ".tmp", "w")); os.replace(state_path + ".tmp", state_path)
    log_call(hung=True)
    time.sleep(120)
if verb == "scp" and rc == 0:
  import tarfile  # only here: it is slow to import and the fake runs dozens of times per test
  with tarfile.open(words[4]) as tar:
    names = sorted({n.lstrip("./").split("/")[0] for n in tar.getnames()} - {""})
  open(os.path.join(root, "scp.log"), "a").write(json.dumps(names) + "\n")
  with tarfile.open(words[4]) as tar:
    files = sorted(m.name.removeprefix("./") for m in tar.getmembers() if m.isfile())
  open(os.path.join(root, "scp_files.log"), "a").write(json.dumps(files) + "\n")
  for home in homes(node):
    shutil.copy(words[4], os.path.join(home, words[5].split(":", 1)[1]))
elif verb == "ssh" and rc == 0 and group == "tpu-vm":
  command = flags["command"]
  step = status_poll() if "s5scale-status" in command else None
  skip = ()
  if step is not None or "s5scale-status" in command:
    if faults.get("unreachable_polls", 0) > 0:
      faults["unreachable_polls"] -= 1
      skip = homes(node)[1:2]
  if "s5scale.train" in command or "s5scale.evaluate" in command:
    for home in homes(node):  # the maintenance is over by the relaunch that follows its stop
      if os.path.exists(os.path.join(home, "maintenance-event")):
        os.remove(os.path.join(home, "maintenance-event"))
  if state["nodes"].get(node) != "READY":
    err, rc = REFUSED, 255
  else:
    run_on_workers(node, command, skip)
  if "s5scale.train" in command or "s5scale.evaluate" in command:
    state["launches"] += 1; state["polls"] = 0
  if step and step[0] == "after":
    act(step[1])

if not streaming:
  # The log stream runs beside other calls, so it never writes, and writes are atomic renames.
  json.dump(state, open(state_path + ".tmp", "w")); os.replace(state_path + ".tmp", state_path)
log_call()
sys.stdout.write(out); sys.stdout.flush(); sys.stderr.write(err)
if streaming:
  open(os.path.join(root, "streamed.log"), "a").write(out)
sys.exit(rc)
'''

FAKE_UV = r'''#!/usr/bin/env bash
# uv venv ... DIR: DIR/bin/python is the fake trainer. uv pip install: checks it runs in the code.
if [ "$1" = venv ]; then dir=${@: -1}; mkdir -p "$dir/bin"; cp "$FAKE_BIN/fake_trainer" "$dir/bin/python"; exit 0; fi
[ -f pyproject.toml ] || { echo "no pyproject.toml in $PWD" >&2; exit 1; }
printf '%s %s %s\n' "$(hostname)" "$PWD" "$*" >> "$FAKE_GCLOUD_DIR/installs.log"
'''

# Like libtpu, it will not start while another process holds its TPU device or while the lock
# file is there, and it leaves the lock file behind when it exits.
FAKE_TRAINER = r'''#!/usr/bin/env bash
worker=$(hostname)
printf '%s %s%s\n' "$worker" "$PWD" "$(printf ' %q' "$@")" >> "$FAKE_GCLOUD_DIR/jobs.log"
device="$HOME/dev/accel0"
if [ -e "$S5SCALE_LIBTPU_LOCKFILE" ] || [ -n "$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$device" 2>/dev/null)" ]; then
  echo "$worker" >> "$FAKE_GCLOUD_DIR/busy.log"
  echo "TPU initialization failed: open($device): Device or resource busy"; exit 1
fi
: > "$S5SCALE_LIBTPU_LOCKFILE"
exec 9<"$device"
for arg in "$@"; do case $arg in --workdir=gs://*) workdir="$FAKE_GCS_DIR/${arg#--workdir=gs://}" ;; esac; done
mkdir -p "$FAKE_GCLOUD_DIR/control"
# The preemption sync point: one process told to stop tells its peers of the same launch.
sync_stop="$FAKE_GCLOUD_DIR/control/sync_stop-$(cat "$HOME/s5scale_run/generation")"
# Process 0 of a trainer saves a new checkpoint step (unless FAKE_NO_PROGRESS) and writes the
# run status just before a clean exit, as s5scale.train does.
is_trainer=0
case " $* " in *" s5scale.train "*) is_trainer=1 ;; esac
save() {
  case "$worker" in *-w0) ;; *) return 0 ;; esac
  [ "$is_trainer" = 1 ] || return 0
  local step
  step=$(( $(ls "$workdir/checkpoints" 2>/dev/null | grep -c '^[0-9]*$') * 100 ))
  if [ -z "${FAKE_NO_PROGRESS:-}" ]; then step=$((step + 100)); mkdir -p "$workdir/checkpoints/$step"; fi
  printf '{"status": "%s", "step": %d}\n' "$STATUS" "$step" > "$workdir/run_status.json.tmp"
  mv "$workdir/run_status.json.tmp" "$workdir/run_status.json"
}
stop() { echo "preempted at step 3, checkpoint saved"; STATUS=preempted save; : > "$sync_stop"; exit 0; }
trap stop TERM
echo "step 1 loss 5.0 on $worker"
hang=0
for i in $(seq 1200); do
  control="$FAKE_GCLOUD_DIR/control/$worker"
  if [ -f "$control" ]; then
    code=$(cat "$control"); rm -f "$control"
    case $code in
      hang) hang=1 ;;  # alive, silent
      traceback) printf 'Traceback (most recent call last):\n  File "s5scale/training.py", line 9, in train\nRuntimeError: fake collective failed on %s\n' "$worker"; exit 1 ;;
      2) echo "error: unknown config key model.bogus"; exit 2 ;;
      0) STATUS=finished save; echo "stopping with 0"; exit 0 ;;
      *) echo "stopping with $code"; exit "$code" ;;
    esac
  fi
  if [ -f "$sync_stop" ]; then stop; fi
  if [ "$hang" = 0 ] && [ $((i % 5)) = 0 ]; then echo "step $i"; fi
  sleep 0.05
done
exit 99
'''

FINISH = {"1/2": ["before", "finish"]}
SCENARIOS = {  # "launch/poll": [before|after answering that status poll, action]; launches and
    # polls count ssh calls (one per node)
    # The run is lost four ways in a row: the queued resource is SUSPENDED; only the node says
    # PREEMPTED (each recreates the slice); the trainers get SIGTERM, save and exit 0 on a slice
    # that stays ACTIVE and READY; a worker's trainer crashes (both relaunch in place). The fifth
    # launch finishes.
    "four_losses": {"1/2": ["after", "preempt_slice"], "2/2": ["before", "preempt_node"],
                    "3/2": ["before", "sigterm_in_place"], "4/2": ["before", "crash"],
                    "5/2": ["before", "finish"]},
    "bad_config": {"1/1": ["before", "bad_config"]},
    "attach": {},
    "finish": FINISH,
    "vanish": {"1/2": ["before", "vanish"], "2/2": ["before", "finish"]},
    "fail_capacity": {"1/2": ["before", "fail_capacity"], "2/2": ["before", "finish"]},
    "unreachable": {"1/1": ["before", "unreachable"], "1/5": ["before", "finish"]},
    "unreachable_lost": {"1/1": ["before", "unreachable"], "2/2": ["before", "finish"]},
    "stale": {"1/2": ["before", "stale"], "2/2": ["before", "finish"]},
    # Two slices: launches 1-2, then the second slice is reclaimed at its poll of the second
    # check; both are recreated (launches 3-4) and finish.
    "multislice": {"2/4": ["before", "preempt_last_node"], "4/2": ["before", "finish"]},
}


class FakeCloud:
  """Writes the fakes into tmp_path and reads back what they recorded."""

  def __init__(self, tmp_path, scenario, workers=NUM_WORKERS, **faults):
    self.bin = tmp_path / "bin"
    self.root = tmp_path / "cloud"
    self.bin.mkdir()
    self.root.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD.replace("{python}", sys.executable)),
                       ("uv", FAKE_UV), ("fake_trainer", FAKE_TRAINER)]:
      (self.bin / name).write_text(text)
      (self.bin / name).chmod(0o755)
    (self.root / "state.json").write_text(json.dumps({
        "qr": None, "qr_error": "", "nodes": {}, "workers": workers, "launches": 0,
        "polls": 0, "polls_after_release": 0, "faults": faults,
        "scenario": SCENARIOS[scenario] if isinstance(scenario, str) else scenario}))
    self.gcs = tmp_path / "gcs"  # gs://B/P lies at gcs/B/P
    self.env = dict(
        os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(self.root),
        FAKE_GCS_DIR=str(self.gcs), PYTHON=sys.executable,  # validates CONFIG locally with this interpreter
        FAKE_BIN=str(self.bin), TPU_NAME="s5-test", ZONE="us-west4-a",
        ACCELERATOR_TYPE="v5litepod-16", WORKDIR=WORKDIR, SPOT="1", POLL_SECONDS="0.02",
        RETRY_SECONDS="0.02", MAX_RESTARTS="4")

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
    groups = [int(p.read_text()) for p in self.root.glob("workers/*/*/s5scale_run/pid")]
    groups += [int(pid) for pid in self.lines("strays")]
    for group in groups:
      try:
        os.killpg(group, signal.SIGKILL)
      except (OSError, ValueError):
        pass


@pytest.fixture
def make_cloud(tmp_path):
  clouds = []

  def make(scenario, **faults):
    clouds.append(FakeCloud(tmp_path, scenario, **faults))
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


def launch_calls(calls, module="s5scale.train"):
  return [i for i in indices(calls, "ssh", worker="all") if module in command_of(calls[i])]


def status_polls(calls):
  return [i for i in indices(calls, "ssh", worker="all") if "s5scale-status" in command_of(calls[i])]


def test_recreates_slice_or_relaunches_in_place_after_each_loss(make_cloud):
  cloud = make_cloud("four_losses")
  done = cloud.run(CONFIG, OVERRIDE)
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()

  creates = indices(calls, "queued-resources", "create")
  assert len(creates) == 3  # the first slice and one per lost slice; the clean stop and the
  # crash reuse the third
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
  launches = launch_calls(calls)
  assert len(launches) == 5 and all(c < l for c, l in zip(creates, launches))
  noticed = [("queued-resources", "SUSPENDED"), ("tpu-vm", "PREEMPTED"), ("ssh", "stopped"),
             ("ssh", "failed 1")]
  for (word, answer), before, after in zip(noticed, launches, launches[1:]):
    assert any(word in c["argv"] and answer in c["out"] for c in calls[before:after])
  # The clean stop and the crash on a healthy slice: relaunched in place, which stopped worker 0's
  # stuck trainer.
  assert not indices(calls[launches[2]:launches[4]], "create")
  assert not indices(calls[launches[2]:launches[4]], "delete")
  assert "stopping the previous job" in done.stderr

  # Copied and installed on every worker of every slice, then launched on --worker=all.
  scps = indices(calls, "scp", worker="all")
  assert len(scps) == 3 and all(c < s for c, s in zip(creates, scps))
  for names in map(json.loads, cloud.lines("scp.log")):
    assert {"pyproject.toml", "s5scale", "configs", "launch"} <= set(names)
    assert not {".git", ".venv"} & set(names)
  installs = cloud.lines("installs.log")
  assert len(installs) == 3 * NUM_WORKERS
  assert all("-c requirements.lock -e .[tpu]" in l for l in installs)  # pinned

  # What the workers really ran: the same command, hence the same workdir, every time.
  expected_argv = ["-m", "s5scale.train", f"--config={CONFIG}", f"--workdir={WORKDIR}", OVERRIDE]
  jobs = cloud.jobs()
  assert sorted(worker for worker, _, _ in jobs) == ["s5-test-w0"] * 5 + ["s5-test-w1"] * 5
  for _, cwd, argv in jobs:
    assert argv == expected_argv
    assert cwd.endswith("/s5scale")  # CONFIG's relative path resolves in the copied code
  assert cloud.lines("busy.log") == []  # no trainer met a TPU still held by an old one

  assert "step 1 loss 5.0 on s5-test-w0" in done.stdout  # worker 0's log is streamed
  assert "on s5-test-w1" not in done.stdout
  assert "finished" in done.stderr
  assert deletes[-1] > launches[-1]  # the finished slice is given back
  assert json.loads((cloud.root / "state.json").read_text())["qr"] is None


def test_gives_up_when_max_restarts_are_used_up(make_cloud):
  cloud = make_cloud("four_losses")
  # Two preemptions with no checkpoint saved in between; one restart allowed.
  done = cloud.run(CONFIG, OVERRIDE, MAX_RESTARTS="1", FAKE_NO_PROGRESS="1")
  assert done.returncode == 1
  assert "giving up" in done.stderr and "node s5-test PREEMPTED" in done.stderr  # the reason
  assert len(indices(cloud.calls(), "queued-resources", "create")) == 2


# ---------------------------------------------------------------------------------------------
# Faults of the real cloud, one at a time: each still ends in a finished run (exit 0)
# ---------------------------------------------------------------------------------------------

def finished_once(cloud, done, creates=1, launches=1):
  assert done.returncode == 0, done.stderr
  calls = cloud.calls()
  assert len(indices(calls, "queued-resources", "create")) == creates
  assert len(launch_calls(calls)) == launches
  assert "job finished" in done.stderr
  return calls


def test_ssh_refused_right_after_active_is_retried(make_cloud):
  cloud = make_cloud("finish", refuse_after_active=2)
  done = cloud.run(CONFIG, OVERRIDE)
  calls = finished_once(cloud, done)
  scps = indices(calls, "scp")
  assert [calls[i]["rc"] for i in scps] == [255, 255, 0]  # refused twice, then copied
  assert "try 2/3" in done.stderr


def test_hanging_scp_is_killed_and_retried(make_cloud):
  cloud = make_cloud("finish", hang_scp=1)
  started = time.time()
  # 8 s: a healthy fake copy takes well under a second, even on a loaded machine.
  done = cloud.run(CONFIG, OVERRIDE, SCP_SECONDS="8")
  calls = finished_once(cloud, done)
  scps = [calls[i] for i in indices(calls, "scp")]
  assert scps[0].get("hung") and scps[-1]["rc"] == 0 and len(scps) == 2
  assert "scp to s5-test failed (try 1/3, exit 124): timed out after 8s" in done.stderr
  assert time.time() - started < 100  # the fake hangs 120 s unless killed


def test_delete_answering_not_found_is_fine(make_cloud):
  cloud = make_cloud("vanish")
  done = cloud.run(CONFIG, OVERRIDE)
  calls = finished_once(cloud, done, creates=2, launches=2)
  first_delete = indices(calls, "queued-resources", "delete")[0]
  assert calls[first_delete]["rc"] == 1  # NOT_FOUND: the slice was already gone
  assert first_delete < indices(calls, "queued-resources", "create")[1]


def test_failed_with_capacity_message_mid_run_is_retried(make_cloud):
  cloud = make_cloud("fail_capacity")
  done = cloud.run(CONFIG, OVERRIDE)
  calls = finished_once(cloud, done, creates=2, launches=2)
  assert "FAILED: There is no more capacity in the zone us-west4-a" in done.stderr
  failed = [i for i in indices(calls, "queued-resources", "describe") if "FAILED" in calls[i]["out"]]
  assert failed and failed[0] < indices(calls, "queued-resources", "delete")[0]


def test_one_unreachable_worker_does_not_blank_the_poll(make_cloud):
  cloud = make_cloud("unreachable")
  done = cloud.run(CONFIG, OVERRIDE)
  calls = finished_once(cloud, done)  # no restart
  polls = [calls[i] for i in status_polls(calls)]
  assert [p["rc"] for p in polls[:4]] == [255, 255, 255, 0]
  # Worker 0 kept answering for itself while worker 1 did not.
  assert all("running s5-test-w0" in p["out"] and "s5-test-w1" not in p["out"] for p in polls[:3])
  assert "worker s5-test/s5-test-w1 did not answer (3/10)" in done.stderr


def test_unreachable_worker_counts_as_lost_after_max_missed_polls(make_cloud):
  cloud = make_cloud("unreachable_lost")
  done = cloud.run(CONFIG, OVERRIDE, MAX_MISSED_POLLS="2")
  finished_once(cloud, done, creates=2, launches=2)
  assert "worker s5-test/s5-test-w1 unreachable for 2 polls" in done.stderr


def test_relaunch_in_place_stops_stale_trainers_and_clears_the_lock(make_cloud):
  cloud = make_cloud("stale")
  done = cloud.run(CONFIG, OVERRIDE)
  calls = finished_once(cloud, done, launches=2)  # in place: still the one slice
  relaunch = calls[launch_calls(calls)[1]]
  assert relaunch["rc"] == 0
  assert cloud.lines("busy.log") == []  # the new trainers found the TPU free and no lock file
  assert "relaunching in place" in done.stderr
  stray = int(cloud.lines("strays")[0])
  assert not os.path.exists(f"/proc/{stray}") or "Z" in pathlib.Path(f"/proc/{stray}/stat").read_text().split()[2]


def test_request_rejected_by_the_api_exits_2_at_once(make_cloud):
  cloud = make_cloud("finish")
  done = cloud.run(CONFIG, ACCELERATOR_TYPE="v9bogus-16", RUNTIME_VERSION="some-image")
  assert done.returncode == 2 and "INVALID_ARGUMENT" in done.stderr
  assert len(indices(cloud.calls(), "create")) == 1  # not retried, not restarted


@pytest.mark.parametrize("name", ["v5e-16", "v5e-256"])
def test_v5e_names_are_rejected_with_the_right_name(make_cloud, name):
  cloud = make_cloud("finish")
  done = cloud.run(CONFIG, ACCELERATOR_TYPE=name)
  assert done.returncode == 2 and f"v5litepod-{name[4:]}" in done.stderr
  assert cloud.calls() == []


def test_multislice_recreates_every_slice_when_one_is_lost(make_cloud):
  cloud = make_cloud("multislice")
  done = cloud.run(CONFIG, OVERRIDE, NUM_SLICES="2")
  calls = finished_once(cloud, done, creates=2, launches=4)
  for i in indices(calls, "queued-resources", "create"):
    argv = calls[i]["argv"]
    assert "--node-count=2" in argv and "--node-prefix=s5-test" in argv
    assert not any(a.startswith("--node-id") for a in argv)
  launched = [calls[i]["argv"][4] for i in launch_calls(calls)]
  assert launched == ["s5-test-0", "s5-test-1"] * 2  # both slices, both times
  assert any("tpu-vm" in c["argv"] and c["out"] == "PREEMPTED\n" for c in calls)
  hosts = sorted(worker for worker, _, _ in cloud.jobs())
  assert hosts == sorted([f"s5-test-{n}-w{w}" for n in (0, 1) for w in (0, 1)] * 2)


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
  # Every ssh and scp carries its own connect and keep-alive limits.
  for argv in printed:
    if argv[3:5] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"]):
      flag = "--ssh-flag" if argv[4] == "ssh" else "--scp-flag"
      assert f"{flag}=-oConnectTimeout=30" in argv and f"{flag}=-oServerAliveInterval=30" in argv


def test_dry_run_multislice_creates_once_and_launches_on_every_node(make_cloud):
  done = make_cloud("finish").run("--dry-run", CONFIG, OVERRIDE, NUM_SLICES="2")
  assert done.returncode == 0, done.stderr
  printed = [bash_split(l) for l in done.stdout.splitlines() if l.startswith("gcloud ")]
  creates = [argv for argv in printed if argv[3:5] == ["queued-resources", "create"]]
  assert len(creates) == 1 and "--node-count=2" in creates[0]
  assert "--node-prefix=s5-test" in creates[0]
  launched = [argv[5] for argv in printed if argv[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in argv
              and any(a.startswith("--command=") and "s5scale.train" in a for a in argv)]
  assert launched == ["s5-test-0", "s5-test-1"]
  copied = [argv[6] for argv in printed if argv[3:5] == ["tpu-vm", "scp"]]
  assert [c.split(":")[0] for c in copied] == ["s5-test-0", "s5-test-1"]


def test_help_documents_every_input(make_cloud):
  done = make_cloud("four_losses").run("--help")
  assert done.returncode == 0
  for name in ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "WORKDIR",
               "SPOT", "MAX_RESTARTS", "POLL_SECONDS", "EVAL_ACCELERATOR_TYPE", "--eval",
               "NUM_SLICES", "GCLOUD_ATTEMPTS", "SCP_SECONDS", "SSH_SECONDS", "MAX_MISSED_POLLS",
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
