#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh. It runs on every TPU VM, from the copy of the repository
# that tpu_pod.sh unpacks into ~/s5scale:
#   tpu_worker.sh install PYTHON_VERSION  make ~/s5scale_venv with this code and its tpu extra,
#                                         pinned by requirements.lock
#   tpu_worker.sh start GENERATION LOG_DIR PYTHON_ARGS...
#                                         stop stale trainers, clear the libtpu lock, start
#                                         `python PYTHON_ARGS...` detached, logging to
#                                         ~/s5scale_run/job.log (copied to LOG_DIR/HOST when it
#                                         ends); prints "s5scale-started: HOST"
#   tpu_worker.sh status [HANG_SECONDS]   print one line "s5scale-status: STATE HOST", STATE being
#                                         running, hung AGE (log silent for AGE >= HANG_SECONDS),
#                                         exited (0), stopped (0 after a SIGTERM or maintenance
#                                         notice), failed CODE or lost
#   tpu_worker.sh collect [LINES]         copy the log to LOG_DIR/HOST; print its last LINES lines,
#                                         each as "s5scale-tail: HOST LINE"
set -euo pipefail

CODE="$HOME/s5scale"
VENV="$HOME/s5scale_venv"
RUN="$HOME/s5scale_run"
STATUS_TAG=s5scale-status:  # tpu_pod.sh looks for these tags in the ssh output
STARTED_TAG=s5scale-started:
TAIL_TAG=s5scale-tail:
LOGS="$HOME/s5scale_logs"  # every earlier generation's job.log, kept across relaunches
# What a trainer holds while it owns the TPU. A new one fails with "Device or resource busy" (or
# waits on the lock file) while an old one still holds them. Overridable for tests.
TPU_DEVICES=${S5SCALE_TPU_DEVICES:-"/dev/accel* /dev/vfio/*"}
LIBTPU_LOCKFILE=${S5SCALE_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
STALE_GRACE_SECONDS=${S5SCALE_STALE_GRACE_SECONDS:-30}  # SIGTERM, then SIGKILL after this
# TPU VMs hear of host maintenance only here (no SIGTERM); a value other than NONE is a notice.
MAINTENANCE_URL=${S5SCALE_MAINTENANCE_URL:-http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event}
MAINTENANCE_POLL_SECONDS=${S5SCALE_MAINTENANCE_POLL_SECONDS:-5}

install_code() {  # install_code PYTHON_VERSION
  # uv brings its own Python: jax >= 0.7 needs >= 3.11 and the TPU VM images ship 3.10.
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  rm -rf "$VENV"
  uv venv -q --python "$1" "$VENV"
  cd "$CODE"
  # The lock pins every dependency to what CI tested, so a recreated slice installs the same.
  uv pip install -q --python "$VENV/bin/python" -c requirements.lock -e '.[tpu]'
}

# Processes with one of the TPU device files open (readable for our own processes without root).
device_holders() {
  local pattern patterns
  read -ra patterns <<<"$TPU_DEVICES"  # split without expanding the globs
  for pattern in "${patterns[@]}"; do
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$pattern" 2>/dev/null
  done | cut -d/ -f3 | sort -u
}

# Zombies do not count: where init is slow to reap, a finished job's shell lingers as one, and
# kill -0 would still see it.
alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }
# start_job's setsid makes the job's shell lead its own session and process group.
group_alive() { ps -o stat= -s "$1" 2>/dev/null | grep -qv '^Z'; }

# A relaunch on the same slice must not meet the previous trainer: the last job's process group
# (it may hang in a collective after a peer died) and anything else still holding the TPU. They
# get SIGTERM (a trainer that can still save does), then SIGKILL.
stop_stale_trainers() {
  local pids=() pid waited=0
  if [[ -f $RUN/pid ]] && group_alive "$(cat "$RUN/pid")"; then
    echo "stopping the previous job (process group $(cat "$RUN/pid")) on $(hostname)" >&2
    kill -TERM -- "-$(cat "$RUN/pid")" 2>/dev/null || true
  fi
  mapfile -t pids < <(device_holders)
  if ((${#pids[@]})); then
    echo "stopping stale TPU holders on $(hostname): ${pids[*]}" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
  while :; do
    mapfile -t pids < <(device_holders)
    if [[ -f $RUN/pid ]] && group_alive "$(cat "$RUN/pid")"; then pids+=(group); fi
    ((${#pids[@]})) || break
    if ((waited >= STALE_GRACE_SECONDS * 10)); then
      echo "still running after ${STALE_GRACE_SECONDS}s; killing them" >&2
      [[ ! -f $RUN/pid ]] || kill -KILL -- "-$(cat "$RUN/pid")" 2>/dev/null || true
      for pid in "${pids[@]}"; do [[ $pid == group ]] || kill -KILL "$pid" 2>/dev/null || true; done
      sleep 0.2
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  # libtpu leaves its lock file behind; it may belong to another user (sudo on a TPU VM is free).
  rm -f "$LIBTPU_LOCKFILE" 2>/dev/null || sudo -n rm -f "$LIBTPU_LOCKFILE" 2>/dev/null || true
}

# The last job's log moves to ~/s5scale_logs/GENERATION.log before $RUN is cleared, so a
# relaunch never erases the traceback that caused it.
keep_last_log() {
  [[ -f $RUN/job.log ]] || return 0
  mkdir -p "$LOGS"
  mv "$RUN/job.log" "$LOGS/$(cat "$RUN/generation" 2>/dev/null || echo unknown).log"
}

# Detached (setsid + nohup) so the job outlives the ssh session that started it.
start_job() {  # start_job GENERATION LOG_DIR PYTHON_ARGS...
  stop_stale_trainers
  keep_last_log
  rm -rf "$RUN"
  mkdir -p "$RUN"
  echo "$1" >"$RUN/generation"
  echo "$2" >"$RUN/log_dir"
  shift 2
  setsid nohup bash "$CODE/launch/tpu_worker.sh" run "$@" >/dev/null 2>&1 </dev/null &
  echo $! >"$RUN/pid"
  echo "$STARTED_TAG $(hostname)"
}

# Best effort: the log in WORKDIR outlives the VM (a preempted slice takes its disk with it).
copy_log() {
  timeout 120 gcloud storage cp --quiet "$RUN/job.log" "$(cat "$RUN/log_dir")/$(hostname)" \
    >/dev/null 2>&1 || echo "could not copy the log to $(cat "$RUN/log_dir")" >&2
}

# A maintenance notice gets the answer a preemption gets: SIGTERM to every process of the job
# (this function's own shell shares the group), so the trainer saves and exits 0.
watch_maintenance() {  # watch_maintenance PID
  local event
  while kill -0 "$1" 2>/dev/null; do
    event=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' "$MAINTENANCE_URL" 2>/dev/null) || event=""
    if [[ -n $event && $event != NONE ]]; then
      echo "s5scale: maintenance event $event on $(hostname): stopping the job" >>"$RUN/job.log"
      kill -TERM -- "-$$" 2>/dev/null || true
      return
    fi
    sleep "$MAINTENANCE_POLL_SECONDS"
  done
}

# The job itself. Its exit code file is how tpu_pod.sh tells "exited" from "died"; it is written
# then renamed so a status query never reads half of it. A preemption notice sends SIGTERM to
# every process: the traps keep this shell and the trainer's parent alive until the trainer has
# saved its checkpoint and exited, and "signalled" records that the stop was asked for. (A trap,
# unlike an ignored signal, is not inherited by the trainer.) The trainer's parent waits for it in
# the foreground, the one wait that a signal cannot cut short, and records its exit code. Every
# writer appends to the log, so the maintenance watcher's line is never overwritten.
run_job() {  # run_job PYTHON_ARGS...
  trap ': >"$RUN/signalled"' TERM
  # s5scale.parallel.initialize_distributed then calls jax.distributed.initialize(), which reads
  # the slice (and multislice) layout from the TPU VM metadata. Harmless on a single host.
  export S5SCALE_DISTRIBUTED=1
  local code pid watcher
  : >"$RUN/job.log"
  # `|| rc=$?`: the subshell inherits set -e, which would otherwise end it before it records a
  # failing trainer's code (a bad config's 2 would read as 255, a crash).
  (
    cd "$CODE"
    trap : TERM
    rc=0
    "$VENV/bin/python" "$@" || rc=$?
    echo "$rc" >"$RUN/job_code"
  ) >>"$RUN/job.log" 2>&1 &
  pid=$!
  watch_maintenance "$pid" &
  watcher=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
  kill "$watcher" 2>/dev/null || true
  code=$(cat "$RUN/job_code" 2>/dev/null || echo 255)  # 255: its parent was killed too
  copy_log
  echo "$code" >"$RUN/exit_code.tmp"
  mv "$RUN/exit_code.tmp" "$RUN/exit_code"
}

# Whether an exit 0 was a finish or a clean stop is the trainer's to say (WORKDIR/run_status.json);
# "stopped" only says that this host was told to stop. A running job whose log has not changed for
# HANG_SECONDS is "hung" (stuck in a collective after a peer died, say).
print_status() {  # print_status [HANG_SECONDS]
  local state hang=${1:-0} age
  if [[ -f $RUN/exit_code ]]; then
    local code
    code=$(cat "$RUN/exit_code")
    if [[ $code != 0 ]]; then state="failed $code"
    elif [[ -f $RUN/signalled ]]; then state=stopped
    else state=exited; fi
  elif [[ -f $RUN/pid ]] && alive "$(cat "$RUN/pid")"; then
    state=running
    age=$(($(date +%s) - $(stat -c %Y "$RUN/job.log" 2>/dev/null || date +%s)))
    if ((hang > 0 && age >= hang)); then state="hung $age"; fi
  else
    state=lost
  fi
  echo "$STATUS_TAG $state $(hostname)"
}

# For the supervisor after a failure: the log into WORKDIR now (a hung or killed job never gets
# to copy its own), and its tail for the supervisor to print.
collect_log() {  # collect_log [LINES]
  [[ -f $RUN/job.log ]] || return 0
  copy_log
  local host line
  host=$(hostname)
  tail -n "${1:-40}" "$RUN/job.log" | while IFS= read -r line; do
    echo "$TAIL_TAG $host $line"
  done
}

command=${1:?usage: tpu_worker.sh install|start|run|status|collect ...}
shift
case "$command" in
  install) install_code "$@" ;;
  start) start_job "$@" ;;
  run) run_job "$@" ;;
  status) print_status "$@" ;;
  collect) collect_log "$@" ;;
  *) echo "tpu_worker.sh: unknown command $command" >&2; exit 2 ;;
esac
