#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh. It runs on every TPU VM, from the copy of the repository
# that tpu_pod.sh unpacks into ~/s5scale:
#   tpu_worker.sh install PYTHON_VERSION  make ~/s5scale_venv with this code and its tpu extra
#   tpu_worker.sh start PYTHON_ARGS...    start `python PYTHON_ARGS...` detached, logging to
#                                         ~/s5scale_run/job.log
#   tpu_worker.sh status                  print one line "s5scale-status: STATE HOST", STATE being
#                                         running, finished, preempted, failed CODE or lost
set -euo pipefail

CODE="$HOME/s5scale"
VENV="$HOME/s5scale_venv"
RUN="$HOME/s5scale_run"
STATUS_TAG=s5scale-status:  # tpu_pod.sh looks for this tag in the ssh output

install_code() {  # install_code PYTHON_VERSION
  # uv brings its own Python: jax >= 0.7 needs >= 3.11 and the TPU VM images ship 3.10.
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  rm -rf "$VENV"
  uv venv -q --python "$1" "$VENV"
  cd "$CODE"
  uv pip install -q --python "$VENV/bin/python" -e '.[tpu]'
}

# Detached (setsid + nohup) so the job outlives the ssh session that started it.
start_job() {  # start_job PYTHON_ARGS...
  rm -rf "$RUN"
  mkdir -p "$RUN"
  setsid nohup bash "$CODE/launch/tpu_worker.sh" run "$@" >/dev/null 2>&1 </dev/null &
  echo $! >"$RUN/pid"
}

# The job itself. Its exit code file is how tpu_pod.sh tells "finished" from "died"; it is
# written then renamed so a status query never reads half of it. A preemption notice sends
# SIGTERM to every process: the trap keeps this shell alive until the trainer has saved its
# checkpoint and exited. (A trap, unlike an ignored signal, is not inherited by the trainer.)
run_job() {  # run_job PYTHON_ARGS...
  trap : TERM
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
