#!/usr/bin/env bash
# Runs s5scale training (or its eval job) on a Cloud TPU pod slice and keeps it running for days:
# requests the slice as a queued resource, ships this checkout to every worker, starts the job on
# all of them, streams worker 0's log, and recreates the slice and relaunches whenever the slice
# is preempted or the workers die. The run resumes from its checkpoints in WORKDIR.
# `launch/tpu_pod.sh --help` documents every input.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths on the TPU VMs, relative to the login user's home directory; launch/tpu_worker.sh does the
# work there.
REMOTE_TARBALL=s5scale.tar.gz
REMOTE_CODE=s5scale
REMOTE_WORKER="bash $REMOTE_CODE/launch/tpu_worker.sh"
REMOTE_LOG=s5scale_run/job.log
# Each worker answers a status query with one line starting with this tag.
STATUS_TAG=s5scale-status:
# Flag names that map to input variables (--tpu-name=x sets TPU_NAME=x).
VALUE_FLAGS=" tpu-name zone project accelerator-type runtime-version workdir max-restarts"
VALUE_FLAGS+=" poll-seconds eval-accelerator-type eval-runtime-version "

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] CONFIG [--config.key=value ...]
       launch/tpu_pod.sh --eval [options] CONFIG [--config.key=value ...]

Creates a Cloud TPU slice (queued resource) if needed, installs this checkout on every worker,
runs `python -m s5scale.train --config=CONFIG --workdir=WORKDIR [overrides]` on all workers, streams
worker 0's log and supervises the run: when the slice is preempted or the workers die it deletes
and recreates the slice and relaunches with the same WORKDIR, so the run resumes from its last
checkpoint. Exits 0 when training finishes, 2 on a bad config or bad input (never restarted),
1 when MAX_RESTARTS is exhausted. Ctrl-C stops only this supervisor; the job keeps running and
running the same command again re-attaches to it.

With --eval it runs `python -m s5scale.evaluate --config=CONFIG --workdir=WORKDIR --watch` the same
way on its own small slice named TPU_NAME-eval.

Every input is a flag or an environment variable (the flag wins):
  --tpu-name=NAME          TPU_NAME          slice (and queued resource) name. Required.
  --zone=ZONE              ZONE              e.g. us-west4-a. Required.
  --project=PROJECT        PROJECT           GCP project; default: gcloud's configured project.
  --accelerator-type=T     ACCELERATOR_TYPE  e.g. v5litepod-256, v4-128. Required for training.
  --runtime-version=V      RUNTIME_VERSION   TPU VM image; default from the accelerator type
                                             (v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                                             v6e: v2-alpha-tpuv6e, v2/v3/v4: tpu-ubuntu2204-base).
  --workdir=gs://B/DIR     WORKDIR           run directory shared by all workers. Required, gs://.
  --spot                   SPOT=1            request Spot capacity (preemptible). Default 0.
  --max-restarts=N         MAX_RESTARTS      slice recreations before giving up. Default 20.
  --poll-seconds=S         POLL_SECONDS      seconds between health checks. Default 60.
  --eval                                     run the eval job instead of training.
  --eval-accelerator-type=T EVAL_ACCELERATOR_TYPE  eval slice type. Default v5litepod-8.
  --eval-runtime-version=V EVAL_RUNTIME_VERSION    default from EVAL_ACCELERATOR_TYPE.
  --dry-run                                  print every gcloud command instead of running it.
  -h, --help                                 show this help.
Environment only:
  REMOTE_PYTHON_VERSION  Python for the workers' venv, installed by uv (jax needs >= 3.11 and the
                         TPU images ship 3.10). Default 3.12.
  DELETE_WHEN_DONE       1 (default): delete the slice after the job finishes; 0: keep it.
  MAX_MISSED_POLLS       consecutive failed health checks (ssh errors on a READY slice) before the
                         workers count as dead. Default 10.

CONFIG must be a file inside this repository: only the repository is copied to the workers.
Example:
  TPU_NAME=s5-audio ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-256 SPOT=1 \
  WORKDIR=gs://my-bucket/s5/audio_large launch/tpu_pod.sh configs/audio_large.py
EOF
}

log() { printf '[tpu_pod %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Bad input exits 2 like the trainer does, so callers can tell it from a failure.
die_bad_input() { log "error: $*"; log "see launch/tpu_pod.sh --help"; exit 2; }

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

parse_args() {
  MODE="train"
  DRY_RUN=0
  CONFIG=""
  OVERRIDES=()
  while (($#)); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --eval) MODE="eval" ;;
      --spot) SPOT=1 ;;
      --config.*=*) OVERRIDES+=("$1") ;;
      --config|--config=*) die_bad_input "pass CONFIG as a positional argument, not $1" ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) || die_bad_input "flag $1 needs a value"
        set_flag "$1" "$2"
        shift ;;
      -*) die_bad_input "unknown flag $1" ;;
      *)
        [[ -z $CONFIG ]] || die_bad_input "unexpected argument '$1' (overrides: --config.a.b=v)"
        CONFIG=$1 ;;
    esac
    shift
  done
}

set_flag() {  # set_flag --some-name value: sets SOME_NAME=value
  local name=${1#--}
  case "$VALUE_FLAGS" in
    *" $name "*) ;;
    *) die_bad_input "unknown flag --$name" ;;
  esac
  printf -v "$(echo "$name" | tr 'a-z-' 'A-Z_')" '%s' "$2"
}

require_match() {  # require_match NAME REGEX WHAT: bad input unless $NAME matches REGEX
  [[ ${!1} =~ $2 ]] || die_bad_input "$1 must be $3, got '${!1}'"
}

default_runtime_version() {  # accelerator type -> TPU VM image that carries its driver
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) die_bad_input "no default RUNTIME_VERSION for accelerator type '$1'; set RUNTIME_VERSION" ;;
  esac
}

validate_inputs() {
  [[ -n $CONFIG ]] || die_bad_input "missing CONFIG (for example configs/audio_large.py)"
  local config_file=${CONFIG%%:*}  # config_flags allows configs/x.py:arg
  [[ -f $config_file ]] || die_bad_input "config file not found: $config_file"
  local config_abs
  config_abs="$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")"
  case "$config_abs" in
    "$REPO_ROOT"/*) REMOTE_CONFIG="${config_abs#"$REPO_ROOT"/}${CONFIG#"$config_file"}" ;;
    *) die_bad_input "config $config_file is outside $REPO_ROOT (only that is copied to workers)" ;;
  esac

  local name
  for name in TPU_NAME ZONE WORKDIR; do
    [[ -n ${!name:-} ]] || die_bad_input "missing $name (flag --$(echo "$name" | tr 'A-Z_' 'a-z-'))"
  done
  # Every worker writes checkpoints into WORKDIR, so it must be storage they all share.
  require_match WORKDIR '^gs://.+' "a gs:// path shared by all workers"
  require_match SPOT '^[01]$' "0 or 1"
  require_match MAX_RESTARTS '^[0-9]+$' "a whole number"
  require_match MAX_MISSED_POLLS '^[1-9][0-9]*$' "a whole number >= 1"
  require_match POLL_SECONDS '^[0-9]+([.][0-9]+)?$' "a number of seconds"
  require_match DELETE_WHEN_DONE '^[01]$' "0 or 1"

  if [[ $MODE == eval ]]; then
    SLICE="$TPU_NAME-eval"
    ACCELERATOR=$EVAL_ACCELERATOR_TYPE
    RUNTIME=${EVAL_RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR")}
    JOB=(-m s5scale.evaluate "--config=$REMOTE_CONFIG" "--workdir=$WORKDIR" --watch)
  else
    [[ -n $ACCELERATOR_TYPE ]] || die_bad_input "missing ACCELERATOR_TYPE, e.g. v5litepod-256"
    SLICE=$TPU_NAME
    ACCELERATOR=$ACCELERATOR_TYPE
    RUNTIME=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR")}
    JOB=(-m s5scale.train "--config=$REMOTE_CONFIG" "--workdir=$WORKDIR")
  fi
  JOB+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  PYTHONPATH="$REPO_ROOT" "${PYTHON:-$REPO_ROOT/.venv/bin/python}" -m s5scale.validate "--config=$config_abs${CONFIG#"$config_file"}" ${OVERRIDES[@]+"${OVERRIDES[@]}"} || die_bad_input "CONFIG $CONFIG with these overrides is not valid (see above; PYTHON picks the interpreter)"
  SCOPE=("--zone=$ZONE")
  [[ -z $PROJECT ]] || SCOPE+=("--project=$PROJECT")
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die_bad_input "gcloud is not on PATH (install the Google Cloud SDK)"
  fi
}

# ---------------------------------------------------------------------------------------------
# gcloud calls. Each goes through gcloud_run so --dry-run prints it instead; it prints on fd 3
# (the original stdout) so commands whose output is captured still show up.
# ---------------------------------------------------------------------------------------------

gcloud_run() {
  if ((DRY_RUN)); then
    { printf 'gcloud'; printf ' %q' "$@"; printf '\n'; } >&3
    return 0
  fi
  gcloud "$@"
}

# Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), NOT_FOUND
# when it does not exist, or UNKNOWN when the API call failed for another reason (retried later).
queued_resource_state() {
  if ((DRY_RUN)); then
    gcloud_run compute tpus queued-resources describe "$SLICE" "${SCOPE[@]}" \
      --format='value(state.state)'
    echo "$DRY_RUN_STATE"
    return
  fi
  local state
  if state=$(gcloud compute tpus queued-resources describe "$SLICE" "${SCOPE[@]}" \
      --format='value(state.state)' 2>"$TMP_DIR/describe.err"); then
    echo "${state:-UNKNOWN}"
  elif grep -q NOT_FOUND "$TMP_DIR/describe.err"; then
    echo NOT_FOUND
  else
    log "describe failed: $(tail -n 1 "$TMP_DIR/describe.err")"
    echo UNKNOWN
  fi
}

# The TPU node can report PREEMPTED before its queued resource leaves ACTIVE; asked only when ssh
# to the workers fails.
node_state() {
  gcloud_run compute tpus tpu-vm describe "$SLICE" "${SCOPE[@]}" --format='value(state)' \
    2>/dev/null || echo UNKNOWN
}

create_slice() {
  local args=(compute tpus queued-resources create "$SLICE" --node-id="$SLICE" "${SCOPE[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  ((!SPOT)) || args+=(--spot)
  log "requesting $ACCELERATOR slice $SLICE ($RUNTIME, spot=$SPOT)"
  gcloud_run "${args[@]}"
  DRY_RUN_STATE=ACTIVE
}

# --force also deletes the TPU node; we wait until the name is free because creating a queued
# resource under a name that is still DELETING fails.
delete_slice() {
  log "deleting slice $SLICE"
  gcloud_run compute tpus queued-resources delete "$SLICE" "${SCOPE[@]}" --force --quiet
  DRY_RUN_STATE=NOT_FOUND
  until [[ $(queued_resource_state) == NOT_FOUND ]]; do pause; done
}

wait_until_active() {
  local state previous=""
  while :; do
    state=$(queued_resource_state)
    [[ $state == "$previous" ]] || log "slice $SLICE is $state"
    previous=$state
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED)
        log "the request for $SLICE FAILED; gcloud compute tpus queued-resources describe tells why"
        exit 1 ;;
      SUSPENDING|SUSPENDED) delete_slice; create_slice ;;  # preempted before we could use it
      NOT_FOUND) create_slice ;;
    esac
    pause
  done
}

# At start-up: reuse a healthy slice (our job may still run on it), replace a dead one.
ensure_slice() {
  local state
  state=$(queued_resource_state)
  SLICE_WAS_THERE=0
  case "$state" in
    NOT_FOUND) create_slice ;;
    SUSPENDING|SUSPENDED|FAILED)
      log "slice $SLICE exists but is $state; recreating it"
      delete_slice
      create_slice ;;
    *) SLICE_WAS_THERE=1 ;;
  esac
  wait_until_active
}

pause() { ((DRY_RUN)) || sleep "$POLL_SECONDS"; }

# ---------------------------------------------------------------------------------------------
# Code and job on the workers
# ---------------------------------------------------------------------------------------------

# Packed once, so every relaunch runs the code the run started with even if the checkout changes.
pack_code() {
  TARBALL="$TMP_DIR/$REMOTE_TARBALL"
  if ((DRY_RUN)); then
    echo "# pack $REPO_ROOT (without .git, .venv, workdirs) into $TARBALL" >&3
    return
  fi
  tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
    --exclude='*.egg-info' -czf "$TARBALL" .
}

ssh_all() {  # ssh_all COMMAND: run a shell command on every worker
  gcloud_run compute tpus tpu-vm ssh "$SLICE" --worker=all "${SCOPE[@]}" --quiet --command="$1"
}

install_code() {
  log "copying the code to every worker of $SLICE and installing it"
  gcloud_run compute tpus tpu-vm scp "$TARBALL" "$SLICE:$REMOTE_TARBALL" --worker=all \
    "${SCOPE[@]}" --quiet
  ssh_all "set -e; cd ~; rm -rf $REMOTE_CODE; mkdir -p $REMOTE_CODE
tar -xzf $REMOTE_TARBALL -C $REMOTE_CODE; $REMOTE_WORKER install $REMOTE_PYTHON_VERSION"
}

launch_job() {
  log "starting ${JOB[1]} on every worker of $SLICE with workdir $WORKDIR"
  ssh_all "$REMOTE_WORKER start$(printf ' %q' "${JOB[@]}")"
}

remote_status_command() {
  echo "$REMOTE_WORKER status 2>/dev/null || echo \"$STATUS_TAG lost \$(hostname)\""
}

# Reduces the workers' status lines (stdin) to one outcome. A single dead worker is enough to
# restart: the others would hang in their next collective.
classify_statuses() {
  local tag word code rest bad_config=0 dead=0 running=0 preempted=0 finished=0
  while read -r tag word code rest; do
    [[ $tag == "$STATUS_TAG" ]] || continue
    case "$word" in
      failed) if [[ $code == 2 ]]; then bad_config=1; else dead=1; fi ;;
      lost) dead=1 ;;
      running) running=1 ;;
      preempted) preempted=1 ;;
      finished) finished=1 ;;
    esac
  done
  if ((bad_config)); then echo bad_config
  elif ((dead)); then echo dead
  elif ((running)); then echo running
  elif ((preempted)); then echo preempted
  elif ((finished)); then echo finished
  else echo unknown; fi
}

# Sets OUTCOME to running, finished, bad_config, preempted (slice lost), dead (job lost) or
# unknown (no answer this time).
check_run() {
  local state statuses
  state=$(queued_resource_state)
  case "$state" in
    ACTIVE) ;;
    UNKNOWN) OUTCOME=unknown; return ;;  # API hiccup: look again next poll
    *) log "slice $SLICE is $state (preempted or deleted)"; OUTCOME=preempted; return ;;
  esac
  if ((DRY_RUN)); then
    ssh_all "$(remote_status_command)"
    statuses="$STATUS_TAG finished"
  elif ! statuses=$(ssh_all "$(remote_status_command)" 2>"$TMP_DIR/status.err"); then
    state=$(node_state)
    case "$state" in
      PREEMPTED|TERMINATED|STOPPING|STOPPED|DELETING)
        log "TPU node $SLICE is $state"; OUTCOME=preempted; return ;;
    esac
    statuses=""
  fi
  OUTCOME=$(classify_statuses <<<"$statuses")
  if [[ $OUTCOME == unknown ]]; then
    MISSED_POLLS=$((MISSED_POLLS + 1))
    log "no status from the workers ($MISSED_POLLS/$MAX_MISSED_POLLS):" \
      "$(tail -n 1 "$TMP_DIR/status.err" 2>/dev/null)"
    if ((MISSED_POLLS >= MAX_MISSED_POLLS)); then OUTCOME=dead; fi
  else
    MISSED_POLLS=0
  fi
}

# Worker 0's log, in the background. Reconnects (after ssh drops) print only new lines.
start_log_stream() {  # start_log_stream TAIL_LINES (+1: whole log)
  if ((DRY_RUN)); then
    gcloud_run compute tpus tpu-vm ssh "$SLICE" --worker=0 "${SCOPE[@]}" --quiet \
      --command="tail -n $1 -F $REMOTE_LOG"
    return
  fi
  gcloud compute tpus tpu-vm ssh "$SLICE" --worker=0 "${SCOPE[@]}" --quiet \
    --command="tail -n $1 -F $REMOTE_LOG" </dev/null 2>>"$TMP_DIR/stream.err" &
  LOG_STREAM_PID=$!
}

ensure_log_stream() {
  if [[ -z $LOG_STREAM_PID ]] || ! kill -0 "$LOG_STREAM_PID" 2>/dev/null; then
    [[ -z $LOG_STREAM_PID ]] || wait "$LOG_STREAM_PID" 2>/dev/null || true
    start_log_stream 0
  fi
}

stop_log_stream() {
  [[ -n ${LOG_STREAM_PID:-} ]] || return 0
  # gcloud runs ssh as its child; it must not keep printing after we move on.
  pkill -TERM -P "$LOG_STREAM_PID" 2>/dev/null || true
  kill -TERM "$LOG_STREAM_PID" 2>/dev/null || true
  wait "$LOG_STREAM_PID" 2>/dev/null || true
  LOG_STREAM_PID=""
}

show_worker0_log_tail() {
  gcloud_run compute tpus tpu-vm ssh "$SLICE" --worker=0 "${SCOPE[@]}" --quiet \
    --command="tail -n 30 $REMOTE_LOG" >&2 || true
}

# ---------------------------------------------------------------------------------------------
# Supervision
# ---------------------------------------------------------------------------------------------

relaunch_on_new_slice() {
  stop_log_stream
  delete_slice
  create_slice
  wait_until_active
  install_code
  launch_job
  start_log_stream +1
}

supervise() {
  local restarts=0
  while :; do
    pause
    check_run
    case "$OUTCOME" in
      running|unknown) ensure_log_stream ;;
      finished)
        stop_log_stream
        log "job finished on $SLICE (workdir $WORKDIR)"
        if ((DELETE_WHEN_DONE)); then delete_slice; fi
        return 0 ;;
      bad_config)
        stop_log_stream
        show_worker0_log_tail
        log "the job exited 2: bad config or input (see the log above). Not restarting;" \
          "$SLICE is kept."
        exit 2 ;;
      preempted|dead)
        if ((restarts >= MAX_RESTARTS)); then
          log "job $OUTCOME and MAX_RESTARTS=$MAX_RESTARTS restarts are used up; giving up"
          exit 1
        fi
        restarts=$((restarts + 1))
        log "job $OUTCOME; restart $restarts/$MAX_RESTARTS: recreating $SLICE," \
          "resuming from $WORKDIR"
        relaunch_on_new_slice ;;
    esac
  done
}

on_exit() {
  stop_log_stream
  rm -rf "$TMP_DIR"
}

on_interrupt() {
  log "supervisor stopped; the job keeps running on $SLICE. Run the same command to re-attach."
  exit 130
}

main() {
  TPU_NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-} WORKDIR=${WORKDIR:-}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-} RUNTIME_VERSION=${RUNTIME_VERSION:-} SPOT=${SPOT:-0}
  MAX_RESTARTS=${MAX_RESTARTS:-20} POLL_SECONDS=${POLL_SECONDS:-60}
  EVAL_ACCELERATOR_TYPE=${EVAL_ACCELERATOR_TYPE:-v5litepod-8}
  EVAL_RUNTIME_VERSION=${EVAL_RUNTIME_VERSION:-}
  REMOTE_PYTHON_VERSION=${REMOTE_PYTHON_VERSION:-3.12} DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-1}
  MAX_MISSED_POLLS=${MAX_MISSED_POLLS:-10}
  parse_args "$@"
  validate_inputs

  exec 3>&1
  TMP_DIR=$(mktemp -d)
  LOG_STREAM_PID=""
  MISSED_POLLS=0
  DRY_RUN_STATE=NOT_FOUND  # --dry-run shows the path from nothing to a finished run
  trap on_exit EXIT
  trap on_interrupt INT TERM

  pack_code
  ensure_slice
  OUTCOME=""
  if ((SLICE_WAS_THERE)); then check_run; fi
  if [[ $OUTCOME == running ]]; then
    log "the job is already running on $SLICE; attaching to it"
    start_log_stream 100
  else
    install_code
    launch_job
    start_log_stream +1
  fi
  supervise
}

main "$@"
