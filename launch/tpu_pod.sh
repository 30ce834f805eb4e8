#!/usr/bin/env bash
# Runs s5scale training (or its eval job) on a Cloud TPU pod slice (or K slices: multislice) and
# keeps it running for days: requests the slices as one queued resource, ships this checkout to
# every worker, starts the job on all of them, streams worker 0's log, relaunches in place when the
# job dies, hangs or stops on healthy slices and recreates the slices when they are lost. The run
# resumes from its checkpoints in WORKDIR. Only MAX_RESTARTS failures in a row without a new
# checkpoint (exit 1) or bad input (exit 2) ends it.
# `launch/tpu_pod.sh --help` documents every input; launch/tpu_pod_lib.sh holds the gcloud calls.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths on the TPU VMs, relative to the login user's home directory; launch/tpu_worker.sh does the
# work there.
REMOTE_TARBALL=s5scale.tar.gz
REMOTE_CODE=s5scale
REMOTE_WORKER="bash $REMOTE_CODE/launch/tpu_worker.sh"
REMOTE_LOG=s5scale_run/job.log
# Each worker answers a status query (a start) with one line starting with this tag.
STATUS_TAG=s5scale-status:
STARTED_TAG=s5scale-started:
TAIL_TAG=s5scale-tail:
# Flag names that map to input variables (--tpu-name=x sets TPU_NAME=x).
VALUE_FLAGS=" tpu-name zone project accelerator-type runtime-version workdir max-restarts"
VALUE_FLAGS+=" poll-seconds eval-accelerator-type eval-runtime-version num-slices hang-minutes"
VALUE_FLAGS+=" network subnetwork service-account "

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] CONFIG [--config.key=value ...]
       launch/tpu_pod.sh --eval [options] CONFIG [--config.key=value ...]

Creates a Cloud TPU slice (queued resource) if needed, installs this checkout on every worker,
runs `python -m s5scale.train --config=CONFIG --workdir=WORKDIR [overrides]` on all workers, streams
worker 0's log and supervises the run, resuming from the last checkpoint in WORKDIR each time:
- the job dies, hangs (a worker's log silent for HANG_MINUTES) or stops cleanly (a preemption or
  maintenance notice; WORKDIR/run_status.json says "preempted") while the queued resource is
  ACTIVE and every node READY: relaunch in place (stale trainers are stopped and the libtpu lock
  cleared first), keeping the capacity;
- the slice is preempted, FAILED (e.g. no capacity), vanishes, or a worker stays unreachable:
  delete and recreate it, then relaunch.
The failing workers' log tails are printed; every worker's log of every launch is copied to
WORKDIR/logs/GENERATION/HOST. Every gcloud call has a timeout and a bounded number of tries; a
relaunch that fails counts as a restart. Exits 0 when training finishes (run_status.json says
"finished"), 2 on a bad config, bad input, a request FAILED for quota, or another supervisor's
lock (WORKDIR/supervisor.lock), 1 when MAX_RESTARTS restarts in a row brought no new checkpoint.
Ctrl-C stops only this supervisor; the job keeps running and running the same command again
re-attaches to it.

With --eval it runs `python -m s5scale.evaluate --config=CONFIG --workdir=WORKDIR --watch` the same
way on its own small slice named TPU_NAME-eval, locked by WORKDIR/supervisor-eval.lock. An eval
job stopped by a preemption or maintenance notice exits 0 and is relaunched without using a
restart.

Every input is a flag or an environment variable (the flag wins):
  --tpu-name=NAME          TPU_NAME          queued resource name (and node name; with
                                             NUM_SLICES>1 the nodes are NAME-0, NAME-1, ...).
  --zone=ZONE              ZONE              e.g. us-west4-a. Required.
  --project=PROJECT        PROJECT           GCP project; default: gcloud's configured project.
  --accelerator-type=T     ACCELERATOR_TYPE  e.g. v5litepod-256, v5p-128, v6e-64, v4-128 (v5e
                                             slices are v5litepod-N). Required for training.
  --runtime-version=V      RUNTIME_VERSION   TPU VM image; default from the accelerator type
                                             (v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                                             v6e: v2-alpha-tpuv6e, v2/v3/v4: tpu-ubuntu2204-base).
  --num-slices=K           NUM_SLICES        slices of ACCELERATOR_TYPE in one queued resource
                                             (multislice, mesh.dcn_*). Default 1. Losing any slice
                                             relaunches all of them.
  --workdir=gs://B/DIR     WORKDIR           run directory shared by all workers. Required, gs://.
  --spot                   SPOT=1            request Spot capacity (preemptible). Default 0.
  --reserved               RESERVED=1        use the project's reservation. Default 0.
  --best-effort            BEST_EFFORT=1     best-effort capacity (v5e, v6e). Default 0. At most
                                             one of SPOT, RESERVED, BEST_EFFORT.
  --network=N              NETWORK           VPC network of the nodes. Default: gcloud's.
  --subnetwork=S           SUBNETWORK        its subnetwork. Default: gcloud's.
  --service-account=SA     SERVICE_ACCOUNT   the nodes' service account (it needs WORKDIR's
                                             bucket). Default: the compute default account.
  --max-restarts=N         MAX_RESTARTS      relaunches in a row (in place or on new slices) with
                                             no new checkpoint step in WORKDIR/checkpoints before
                                             giving up; a new step resets the count. Default 5.
  --hang-minutes=M         HANG_MINUTES      a running worker whose log has not changed for M
                                             minutes (may be fractional) counts as dead. 0: off.
                                             Default 60 for training, 0 for --eval (it is silent
                                             between checkpoints).
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
  MAX_MISSED_POLLS       polls in a row one worker may fail to answer (on a READY node) before it
                         counts as lost and the slice is recreated. Default 10.
  GCLOUD_ATTEMPTS        tries of each gcloud step (create, delete, scp, install, launch).
                         Default 3.
  RETRY_SECONDS          pause between tries. Default 30.
  GCLOUD_SECONDS         time limit of a describe, create or delete call. Default 300.
  SSH_SECONDS            time limit of a status poll or launch over ssh. Default 300.
  SCP_SECONDS            time limit of copying the code to a node. Default 600.
  INSTALL_SECONDS        time limit of installing the code on a node. Default 1800.
  DELETE_WAIT_SECONDS    how long a deleted slice may take to disappear. Default 1800.
  SSH_CONNECT_SECONDS    ssh -oConnectTimeout. Default 30.
  SSH_ALIVE_SECONDS      ssh -oServerAliveInterval (3 missed answers drop the connection).
                         Default 30.
  TAIL_LINES             lines of a failing worker's log printed here. Default 40.
  LOCK_REFRESH_SECONDS   how often the supervisor rewrites its lock. Default 300.
  LOCK_STALE_SECONDS     a lock older than this is a dead supervisor's, taken over. Default 3600.
On the workers (set in their environment, e.g. by a startup script; tests set them):
  S5SCALE_MAINTENANCE_URL           the maintenance-event metadata polled by tpu_worker.sh; a value
                                    other than NONE stops the job like a SIGTERM.
  S5SCALE_MAINTENANCE_POLL_SECONDS  its polling interval. Default 5.

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
      --reserved) RESERVED=1 ;;
      --best-effort) BEST_EFFORT=1 ;;
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
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) die_bad_input "no default RUNTIME_VERSION for accelerator type '$1'; set RUNTIME_VERSION" ;;
  esac
}

# Cloud TPU calls v5e slices v5litepod-N; "v5e-N" is rejected by the API only after queueing.
check_accelerator() {  # check_accelerator NAME
  if [[ ${!1} =~ ^v5e-([0-9]+)$ ]]; then
    die_bad_input "$1=${!1} is not a Cloud TPU accelerator type: v5e slices are named" \
      "v5litepod-N; use $1=v5litepod-${BASH_REMATCH[1]}"
  fi
  require_match "$1" '^[a-z0-9]+-[0-9]+$' "an accelerator type such as v5litepod-256"
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
  for name in SPOT RESERVED BEST_EFFORT; do require_match "$name" '^[01]$' "0 or 1"; done
  ((SPOT + RESERVED + BEST_EFFORT <= 1)) ||
    die_bad_input "SPOT, RESERVED and BEST_EFFORT are exclusive: set at most one"
  [[ -z $HANG_MINUTES ]] || require_match HANG_MINUTES '^[0-9]+([.][0-9]+)?$' "a number of minutes"
  require_match TAIL_LINES '^[0-9]+$' "a whole number"
  require_match LOCK_REFRESH_SECONDS '^[0-9]+$' "a whole number of seconds"
  require_match LOCK_STALE_SECONDS '^[0-9]+$' "a whole number of seconds"
  require_match MAX_RESTARTS '^[0-9]+$' "a whole number"
  require_match MAX_MISSED_POLLS '^[1-9][0-9]*$' "a whole number >= 1"
  require_match DELETE_WHEN_DONE '^[01]$' "0 or 1"
  require_match NUM_SLICES '^[1-9][0-9]*$' "a whole number >= 1"
  require_match GCLOUD_ATTEMPTS '^[1-9][0-9]*$' "a whole number >= 1"
  require_match DELETE_WAIT_SECONDS '^[0-9]+$' "a whole number of seconds"
  for name in POLL_SECONDS RETRY_SECONDS GCLOUD_SECONDS SSH_SECONDS SCP_SECONDS INSTALL_SECONDS \
      SSH_CONNECT_SECONDS SSH_ALIVE_SECONDS; do
    require_match "$name" '^[0-9]+([.][0-9]+)?$' "a number of seconds"
  done

  if [[ $MODE == eval ]]; then
    check_accelerator EVAL_ACCELERATOR_TYPE
    SLICE="$TPU_NAME-eval"
    NUM_SLICES=1
    ACCELERATOR=$EVAL_ACCELERATOR_TYPE
    RUNTIME=${EVAL_RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR")}
    JOB=(-m s5scale.evaluate "--config=$REMOTE_CONFIG" "--workdir=$WORKDIR" --watch)
    LOCK="$WORKDIR/supervisor-eval.lock"
  else
    [[ -n $ACCELERATOR_TYPE ]] || die_bad_input "missing ACCELERATOR_TYPE, e.g. v5litepod-256"
    check_accelerator ACCELERATOR_TYPE
    SLICE=$TPU_NAME
    ACCELERATOR=$ACCELERATOR_TYPE
    RUNTIME=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR")}
    JOB=(-m s5scale.train "--config=$REMOTE_CONFIG" "--workdir=$WORKDIR")
    LOCK="$WORKDIR/supervisor.lock"
  fi
  JOB+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  # Whole seconds, rounded up, for the workers' `status` (0: no hang check).
  HANG_SECONDS=$(awk -v m="${HANG_MINUTES:-$([[ $MODE == eval ]] && echo 0 || echo 60)}" \
    'BEGIN { s = m * 60; print (s == int(s)) ? s : int(s) + 1 }')
  # The same validator as the entry points, before any cloud call: a bad key costs no slice.
  PYTHONPATH="$REPO_ROOT" "${PYTHON:-$REPO_ROOT/.venv/bin/python}" -m s5scale.validate \
    "--config=$config_abs${CONFIG#"$config_file"}" ${OVERRIDES[@]+"${OVERRIDES[@]}"} \
    || die_bad_input "CONFIG $CONFIG with these overrides is not valid (see above; PYTHON picks the interpreter)"
  NODES=("$SLICE")
  if ((NUM_SLICES > 1)); then
    local i
    NODES=()
    for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$SLICE-$i"); done
  fi
  SCOPE=("--zone=$ZONE")
  [[ -z $PROJECT ]] || SCOPE+=("--project=$PROJECT")
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die_bad_input "gcloud is not on PATH (install the Google Cloud SDK)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Supervision
# ---------------------------------------------------------------------------------------------

pause() { refresh_lock; ((DRY_RUN)) || sleep "$POLL_SECONDS"; }

# At start-up: reuse a healthy slice (our job may still run on it), replace a dead one. Sets
# SLICE_WAS_THERE. Fails like wait_until_active.
ensure_slice() {
  describe_queued_resource
  SLICE_WAS_THERE=0
  case "$QR_STATE" in
    NOT_FOUND) create_slice || return 1 ;;
    SUSPENDING|SUSPENDED|FAILED)
      [[ $QR_STATE != FAILED ]] || log_failure
      log "slice $SLICE exists but is $QR_STATE; recreating it"
      delete_slice && create_slice || return 1 ;;
    *) SLICE_WAS_THERE=1 ;;
  esac
  wait_until_active
}

# The first launch of this supervisor: attach to a job that still runs, else (re)start it, in
# place when the slice was already there.
start_run() {
  ensure_slice || return 1
  if ((SLICE_WAS_THERE)); then
    check_run
    case "$OUTCOME" in
      running)
        log "the job is already running on $SLICE; attaching to it"
        start_log_stream 100
        return 0 ;;
      lost) return 1 ;;  # the next restart recreates the slice
    esac
  fi
  install_code && launch_job && start_log_stream +1
}

# The job died, hung or stopped but the slice is healthy: start it again on the same workers
# (tpu_worker.sh start stops stale trainers and clears the libtpu lock first).
relaunch_in_place() {
  stop_log_stream
  launch_job && start_log_stream +1
}

relaunch_on_new_slice() {
  stop_log_stream
  delete_slice && create_slice && wait_until_active && install_code && launch_job &&
    start_log_stream +1
}

# A run that weeks of preemptions interrupt must not run out of restarts: only failures in a row
# count, and a checkpoint step newer than the last one seen starts the count again.
note_progress() {
  local step
  step=$(latest_checkpoint_step)
  ((step > PROGRESS_STEP)) || return 0
  ((RESTARTS == 0)) ||
    log "new checkpoint step $step (was $PROGRESS_STEP): the restart count starts again"
  RESTARTS=0 PROGRESS_STEP=$step
}

# Relaunches after OUTCOME dead/stopped/lost/start_failed, or exits 1 when MAX_RESTARTS restarts
# in a row brought no progress. An eval job stopped by a notice has not failed: no restart used.
restart() {
  # A clean stop copied its own logs, and a lost slice cannot be asked.
  if [[ $OUTCOME == dead ]]; then collect_logs; fi
  local counted=1 how=recreate
  if [[ $MODE == eval && $OUTCOME == stopped ]]; then counted=0; fi
  if ((counted)); then
    note_progress
    if ((RESTARTS >= MAX_RESTARTS)); then
      log "job stopped ($OUTCOME: $REASON) after $MAX_RESTARTS restarts in a row with no new" \
        "checkpoint (MAX_RESTARTS); giving up. $SLICE is kept as it is."
      exit 1
    fi
    RESTARTS=$((RESTARTS + 1))
  fi
  if [[ $OUTCOME == dead ]] || { [[ $OUTCOME == stopped ]] && nodes_ready; }; then how=in_place; fi
  local what="recreating $SLICE"
  [[ $how == recreate ]] || what="relaunching in place on $SLICE"
  log "job $OUTCOME ($REASON); restart $RESTARTS/$MAX_RESTARTS: $what, resuming from $WORKDIR"
  if [[ $how == in_place ]]; then relaunch_in_place; else relaunch_on_new_slice; fi && {
    OUTCOME=running; return; }
  OUTCOME=start_failed REASON="the relaunch failed"
}

# OUTCOME comes from start_run / check_run (see check_run); REASON says why a run stopped.
supervise() {
  RESTARTS=0
  while :; do
    case "$OUTCOME" in
      running|unknown)
        ensure_log_stream
        pause
        check_run ;;
      finished)
        stop_log_stream
        log "job finished on $SLICE (workdir $WORKDIR)"
        if ((DELETE_WHEN_DONE)); then
          delete_slice || log "could not delete $SLICE; delete it by hand"
        fi
        return 0 ;;
      bad_config)
        stop_log_stream
        collect_logs
        log "the job exited 2: bad config or input (see the log above). Not restarting;" \
          "$SLICE is kept."
        exit 2 ;;
      dead|stopped|lost|start_failed)
        stop_log_stream
        restart ;;
    esac
  done
}

on_exit() {
  stop_log_stream
  release_lock
  rm -rf "$TMP_DIR"
}

on_interrupt() {
  log "supervisor stopped; the job keeps running on $SLICE. Run the same command to re-attach."
  exit 130
}

main() {
  TPU_NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-} WORKDIR=${WORKDIR:-}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-} RUNTIME_VERSION=${RUNTIME_VERSION:-} SPOT=${SPOT:-0}
  RESERVED=${RESERVED:-0} BEST_EFFORT=${BEST_EFFORT:-0} NETWORK=${NETWORK:-}
  SUBNETWORK=${SUBNETWORK:-} SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-} HANG_MINUTES=${HANG_MINUTES:-}
  NUM_SLICES=${NUM_SLICES:-1} MAX_RESTARTS=${MAX_RESTARTS:-5} POLL_SECONDS=${POLL_SECONDS:-60}
  EVAL_ACCELERATOR_TYPE=${EVAL_ACCELERATOR_TYPE:-v5litepod-8}
  EVAL_RUNTIME_VERSION=${EVAL_RUNTIME_VERSION:-}
  REMOTE_PYTHON_VERSION=${REMOTE_PYTHON_VERSION:-3.12} DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-1}
  MAX_MISSED_POLLS=${MAX_MISSED_POLLS:-10} GCLOUD_ATTEMPTS=${GCLOUD_ATTEMPTS:-3}
  RETRY_SECONDS=${RETRY_SECONDS:-30} GCLOUD_SECONDS=${GCLOUD_SECONDS:-300}
  SSH_SECONDS=${SSH_SECONDS:-300} SCP_SECONDS=${SCP_SECONDS:-600}
  INSTALL_SECONDS=${INSTALL_SECONDS:-1800} DELETE_WAIT_SECONDS=${DELETE_WAIT_SECONDS:-1800}
  SSH_CONNECT_SECONDS=${SSH_CONNECT_SECONDS:-30} SSH_ALIVE_SECONDS=${SSH_ALIVE_SECONDS:-30}
  TAIL_LINES=${TAIL_LINES:-40} LOCK_REFRESH_SECONDS=${LOCK_REFRESH_SECONDS:-300}
  LOCK_STALE_SECONDS=${LOCK_STALE_SECONDS:-3600}
  parse_args "$@"
  validate_inputs

  exec 3>&1
  TMP_DIR=$(mktemp -d)
  LOG_STREAM_PID=""
  declare -gA EXPECTED=() MISSED=()  # node/host -> 1; node/host -> polls missed in a row
  UNREACHABLE=0 REASON="" QR_STATE="" QR_ERROR="" FAILING=() LAUNCHES=0 GENERATION="" LOCK_HELD=0
  DRY_RUN_STATE=NOT_FOUND  # --dry-run shows the path from nothing to a finished run
  trap on_exit EXIT
  trap on_interrupt INT TERM

  acquire_lock
  PROGRESS_STEP=$(latest_checkpoint_step)
  pack_code
  if start_run; then OUTCOME=running; else OUTCOME=start_failed REASON="the start failed"; fi
  supervise
}

# shellcheck source=launch/tpu_pod_lib.sh
source "$REPO_ROOT/launch/tpu_pod_lib.sh"
main "$@"
