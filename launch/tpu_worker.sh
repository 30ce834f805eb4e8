#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh. It runs on every TPU VM, from the copy of the repository
# that tpu_pod.sh unpacks into ~/s5scale:
#   tpu_worker.sh install PYTHON_VERSION  make ~/s5scale_venv with this code and its tpu extra
#   tpu_worker.sh start PYTHON_ARGS...    stop stale trainers, clear the libtpu lock, start
#                                         `python PYTHON_ARGS...` detached, logging to
#                                         ~/s5scale_run/job.log; prints "s5scale-started: HOST"
#   tpu_worker.sh status                  print one line "s5scale-status: STATE HOST", STATE being
#                                         running, finished, preempted, failed CODE or lost
set -euo pipefail

CODE="$HOME/s5scale"
VENV="$HOME/s5scale_venv"
RUN="$HOME/s5scale_run"
STATUS_TAG=s5scale-status:  # tpu_pod.sh looks for these tags in the ssh output
STARTED_TAG=s5scale-started:
# What a trainer holds while it owns the TPU. A new one fails with "Device or resource busy" (or
# waits on the lock file) while an old one still holds them. Overridable for tests.
TPU_DEVICES=${S5SCALE_TPU_DEVICES:-"/dev/accel* /dev/vfio/*"}
LIBTPU_LOCKFILE=${S5SCALE_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
STALE_GRACE_SECONDS=${S5SCALE_STALE_GRACE_SECONDS:-30}  # SIGTERM, then SIGKILL after this

install_code() {  # install_code PYTHON_VERSION
  # uv brings its own Python: jax >= 0.7 needs >= 3.11 and the TPU VM images ship 3.10.
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  rm -rf "$VENV"
  uv venv -q --python "$1" "$VENV"
  cd "$CODE"
  uv pip install -q --python "$VENV/bin/python" -e '.[tpu]'
}

# Processes with one of the TPU device files open (readable for our own processes without root).
device_holders() {
  local pattern patterns
  read -ra patterns <<<"$TPU_DEVICES"  # split without expanding the globs
  for pattern in "${patterns[@]}"; do
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$pattern" 2>/dev/null
  done | cut -d/ -f3 | sort -u
}

# A relaunch on the same slice must not meet the previous trainer: the last job's process group
# (it may hang in a collective after a peer died) and anything else still holding the TPU. They
# get SIGTERM (a trainer that can still save does), then SIGKILL.
stop_stale_trainers() {
  local pids=() pid waited=0
  if [[ -f $RUN/pid ]] && kill -0 -- "-$(cat "$RUN/pid")" 2>/dev/null; then
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
    if [[ -f $RUN/pid ]] && kill -0 -- "-$(cat "$RUN/pid")" 2>/dev/null; then pids+=(group); fi
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

# Detached (setsid + nohup) so the job outlives the ssh session that started it.
start_job() {  # start_job PYTHON_ARGS...
  stop_stale_trainers
  rm -rf "$RUN"
  mkdir -p "$RUN"
  setsid nohup bash "$CODE/launch/tpu_worker.sh" run "$@" >/dev/null 2>&1 </dev/null &
  echo $! >"$RUN/pid"
  echo "$STARTED_TAG $(hostname)"
}

# The job itself. Its exit code file is how tpu_pod.sh tells "finished" from "died"; it is
# written then renamed so a status query never reads half of it. A preemption notice sends
# SIGTERM to every process: the trap keeps this shell alive until the trainer has saved its
# checkpoint and exited. (A trap, unlike an ignored signal, is not inherited by the trainer.)
run_job() {  # run_job PYTHON_ARGS...
  trap : TERM
  # s5scale.parallel.initialize_distributed then calls jax.distributed.initialize(), which reads
  # the slice (and multislice) layout from the TPU VM metadata. Harmless on a single host.
  export S5SCALE_DISTRIBUTED=1
  local code=0
  (cd "$CODE" && exec "$VENV/bin/python" "$@") >"$RUN/job.log" 2>&1 || code=$?
  echo "$code" >"$RUN/exit_code.tmp"
  mv "$RUN/exit_code.tmp" "$RUN/exit_code"
}

# A job that exits 0 after the trainer's preemption save is "preempted", not finished.
print_status() {
  local state
  if [[ -f $RUN/exit_code ]]; then
    local code
    code=$(cat "$RUN/exit_code")
    if [[ $code != 0 ]]; then state="failed $code"
    elif grep -q 'preempted at step' "$RUN/job.log"; then state=preempted
    else state=finished; fi
  elif [[ -f $RUN/pid ]] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then
    state=running
  else
    state=lost
  fi
  echo "$STATUS_TAG $state $(hostname)"
}

command=${1:?usage: tpu_worker.sh install|start|run|status ...}
shift
case "$command" in
  install) install_code "$@" ;;
  start) start_job "$@" ;;
  run) run_job "$@" ;;
  status) print_status ;;
  *) echo "tpu_worker.sh: unknown command $command" >&2; exit 2 ;;
esac
