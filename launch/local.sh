#!/usr/bin/env bash
# Runs N s5scale training processes on this machine as one jax.distributed job (CPU, gloo
# collectives): the way to try multi-host behaviour (sharded data, coordinated checkpoints,
# preemption) without a pod. `launch/local.sh --help` documents the inputs.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/local.sh -n N [-d D] [-p PORT] CONFIG [--workdir=DIR] [--config.key=value ...]

Starts N processes of `python -m s5scale.train --config=CONFIG --workdir=DIR [overrides]`, each with
  S5SCALE_COORDINATOR=localhost:PORT S5SCALE_NUM_PROCESSES=N S5SCALE_PROCESS_ID=i JAX_PLATFORMS=cpu
Each line of output is prefixed with [pI]; process I also logs to DIR/logs/process_I.log (appended,
so a resumed run keeps the log of the run it resumes).

  -n N       number of processes (required).
  -d D       CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=D).
  -p PORT    coordinator port (also PORT env); default: a free port.
  --workdir=DIR  run directory; default workdirs/<config name>.
  -h, --help show this help.
Environment: PYTHON overrides the interpreter (default .venv/bin/python, else python3);
KILL_AFTER_SECONDS (default 60) is how long processes get to exit after SIGTERM before SIGKILL.

Ctrl-C or SIGTERM sends SIGTERM to every process: the trainer saves a checkpoint and exits 0, and
running the same command again resumes. A second Ctrl-C kills them. When one process fails, the
others are stopped too (they would hang in their next collective). Exit status: the first non-zero
exit status of a process, else 0; 2 on bad arguments.
EOF
}

log() { printf '[local.sh] %s\n' "$*" >&2; }
die_bad_input() { log "error: $*"; log "see launch/local.sh --help"; exit 2; }

parse_args() {
  NUM_PROCESSES="" DEVICES_PER_PROCESS="" PORT=${PORT:-} CONFIG="" WORKDIR="" FORWARDED=()
  while (($#)); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      -n|-d|-p)
        (($# >= 2)) || die_bad_input "$1 needs a value"
        case "$1" in -n) NUM_PROCESSES=$2 ;; -d) DEVICES_PER_PROCESS=$2 ;; -p) PORT=$2 ;; esac
        shift ;;
      --workdir=*) WORKDIR=${1#--workdir=} ;;
      --workdir)
        (($# >= 2)) || die_bad_input "--workdir needs a value"
        WORKDIR=$2
        shift ;;
      -*)
        [[ -n $CONFIG ]] || die_bad_input "unknown option $1 before CONFIG"
        FORWARDED+=("$1") ;;  # trainer flags such as --config.train.num_steps=10
      *)
        if [[ -z $CONFIG ]]; then CONFIG=$1; else FORWARDED+=("$1"); fi ;;
    esac
    shift
  done

  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] \
    || die_bad_input "-n N (number of processes >= 1) is required, got '$NUM_PROCESSES'"
  [[ -z $DEVICES_PER_PROCESS || $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] \
    || die_bad_input "-d must be a number of devices >= 1, got '$DEVICES_PER_PROCESS'"
  [[ -z $PORT || $PORT =~ ^[1-9][0-9]*$ ]] || die_bad_input "-p must be a port number, got '$PORT'"
  [[ -n $CONFIG ]] || die_bad_input "missing CONFIG (for example configs/text_small.py)"
  [[ -f ${CONFIG%%:*} ]] || die_bad_input "config file not found: ${CONFIG%%:*}"
  if [[ -z $WORKDIR ]]; then
    local config_name
    config_name=$(basename "${CONFIG%%:*}")
    WORKDIR="workdirs/${config_name%.py}"
  fi
}

pick_python() {
  if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"
  elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then echo "$REPO_ROOT/.venv/bin/python"
  else echo python3; fi
}

# A port nobody listens on. Another program could still take it before the coordinator binds it;
# pass -p to choose one yourself.
pick_free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  log "error: found no free port; pass -p PORT"
  exit 1
}

# Copies one process's output to the terminal with a [pI] prefix and to its log file. It ignores
# INT/TERM so the trainer can still print its "checkpoint saved" lines while shutting down. A bash
# read loop rather than awk, because mawk buffers its input and would hold lines back.
prefix_output() {  # prefix_output INDEX LOG_FILE < fifo
  trap '' INT TERM
  local line
  exec 4>>"$2"
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[p%s] %s\n' "$1" "$line"
    printf '%s\n' "$line" >&4
  done
}

start_processes() {
  local python i fifo log_file
  python=$(pick_python)
  mkdir -p "$WORKDIR/logs"
  FIFO_DIR=$(mktemp -d)
  log "starting $NUM_PROCESSES processes (coordinator localhost:$PORT, workdir $WORKDIR)"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    log_file="$WORKDIR/logs/process_$i.log"
    printf '=== local.sh start %s: process %d of %d\n' "$(date -u +%FT%TZ)" "$i" "$NUM_PROCESSES" \
      >>"$log_file"
    # A FIFO rather than a pipe, so the prefixer is our own child and we can wait for its last line.
    fifo="$FIFO_DIR/process_$i"
    mkfifo "$fifo"
    prefix_output "$i" "$log_file" <"$fifo" &
    PREFIXER_PIDS+=($!)
    # PYTHONUNBUFFERED: the output goes to a FIFO, and we want it line by line, not in 4 KiB blocks.
    S5SCALE_COORDINATOR="localhost:$PORT" S5SCALE_NUM_PROCESSES="$NUM_PROCESSES" \
      S5SCALE_PROCESS_ID="$i" JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
      PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
      "$python" -m s5scale.train "--config=$CONFIG" "--workdir=$WORKDIR" \
      ${FORWARDED[@]+"${FORWARDED[@]}"} >"$fifo" 2>&1 &
    PIDS+=($!)
    EXIT_CODES+=("")
  done
}

signal_running() {  # signal_running SIGNAL: signal every started process that has not exited
  local i
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    [[ -n ${EXIT_CODES[i]:-} ]] || kill "-$1" "${PIDS[i]}" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317  # called by the INT/TERM trap
on_signal() {
  if ((STOP_REQUESTED)); then
    log "second interrupt: killing all processes"
    signal_running KILL
  else
    log "stopping: sending SIGTERM to all processes (they checkpoint and exit)"
    STOP_REQUESTED=1
    STOP_TIME=$SECONDS
    signal_running TERM
  fi
}

# Polls rather than `wait -n` so it also works with macOS's bash 3.2, and records exit codes in
# the order processes end: the first failure is usually the cause, later ones its echoes.
wait_for_processes() {
  local i status remaining=$NUM_PROCESSES
  FIRST_FAILURE=0
  while ((remaining > 0)); do
    for ((i = 0; i < NUM_PROCESSES; i++)); do
      [[ -z ${EXIT_CODES[i]} ]] || continue
      kill -0 "${PIDS[i]}" 2>/dev/null && continue
      status=0
      wait "${PIDS[i]}" || status=$?
      EXIT_CODES[i]=$status
      remaining=$((remaining - 1))
      if ((status != 0 && FIRST_FAILURE == 0)); then
        FIRST_FAILURE=$status
        log "process $i exited with status $status; stopping the others"
        STOP_REQUESTED=1
        STOP_TIME=$SECONDS
        signal_running TERM
      fi
    done
    if ((STOP_REQUESTED && remaining > 0 && SECONDS - STOP_TIME > KILL_AFTER_SECONDS)); then
      log "processes still running ${KILL_AFTER_SECONDS}s after SIGTERM; killing them"
      signal_running KILL
      STOP_TIME=$SECONDS
    fi
    ((remaining == 0)) || sleep 0.2
  done
  finish_prefixers
}

# The prefixers end when every writer of their FIFO is gone; a grandchild the trainer left
# behind could hold it open forever, so they get a few seconds to print the last lines.
finish_prefixers() {
  local pid deadline=$((SECONDS + 3))
  for pid in "${PREFIXER_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

main() {
  parse_args "$@"
  KILL_AFTER_SECONDS=${KILL_AFTER_SECONDS:-60}
  [[ $KILL_AFTER_SECONDS =~ ^[0-9]+$ ]] || die_bad_input "KILL_AFTER_SECONDS must be a whole number"
  [[ -n $PORT ]] || PORT=$(pick_free_port)
  if [[ -n $DEVICES_PER_PROCESS ]]; then
    local device_flag="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$device_flag"
  fi
  STOP_REQUESTED=0
  STOP_TIME=0
  FIFO_DIR=""
  PIDS=() PREFIXER_PIDS=() EXIT_CODES=()
  trap '[[ -z $FIFO_DIR ]] || rm -rf "$FIFO_DIR"' EXIT
  trap on_signal INT TERM
  start_processes
  # A signal that came while starting missed the processes started after it.
  if ((STOP_REQUESTED)); then signal_running TERM; fi
  wait_for_processes
  log "exit codes: ${EXIT_CODES[*]}"
  exit "$FIRST_FAILURE"
}

main "$@"
