# Sourced by launch/tpu_pod.sh: every gcloud call it makes, each bounded in time and retried a
# bounded number of times, and what it learns from them (slice state, worker statuses). A failed
# call returns non-zero to its caller, which decides; nothing here ends the supervisor except a
# request that gcloud rejects as invalid (bad input, exit 2).
# shellcheck shell=bash

# ---------------------------------------------------------------------------------------------
# One gcloud call. --dry-run prints it (on fd 3, the original stdout, so commands whose output is
# captured still show up). Otherwise it runs under `timeout` (which kills the whole process group,
# ssh children included) with its stderr kept in $TMP_DIR/gcloud.err.
# ---------------------------------------------------------------------------------------------

gcloud_try() {  # gcloud_try SECONDS ARGS...
  local seconds=$1 rc=0
  shift
  if ((DRY_RUN)); then
    { printf 'gcloud'; printf ' %q' "$@"; printf '\n'; } >&3
    return 0
  fi
  timeout -k 10 "$seconds" gcloud "$@" 2>"$TMP_DIR/gcloud.err" || rc=$?
  if ((rc == 124 || rc == 137)); then echo "timed out after ${seconds}s" >>"$TMP_DIR/gcloud.err"; fi
  return "$rc"
}

last_error() { grep -v '^[[:space:]]*$' "$TMP_DIR/gcloud.err" 2>/dev/null | tail -n 1; }

# gcloud_retry WHAT SECONDS ARGS...: up to GCLOUD_ATTEMPTS tries, RETRY_SECONDS apart. Callers may
# set ACCEPT (an error that means success, e.g. NOT_FOUND for delete) and FATAL (an error that
# means bad input: exit 2 at once).
gcloud_retry() {
  local what=$1 seconds=$2 attempt rc
  shift 2
  for ((attempt = 1; ; attempt++)); do
    rc=0
    gcloud_try "$seconds" "$@" || rc=$?
    ((rc)) || return 0
    if [[ -n ${ACCEPT:-} ]] && grep -Eq "$ACCEPT" "$TMP_DIR/gcloud.err"; then
      log "$what: $(last_error) (fine)"
      return 0
    fi
    if [[ -n ${FATAL:-} ]] && grep -Eq "$FATAL" "$TMP_DIR/gcloud.err"; then
      log "$what was rejected: $(last_error)"
      die_bad_input "gcloud rejected the request for $SLICE; check ACCELERATOR_TYPE, ZONE, PROJECT"
    fi
    log "$what failed (try $attempt/$GCLOUD_ATTEMPTS, exit $rc): $(last_error)"
    ((attempt < GCLOUD_ATTEMPTS)) || return 1
    ((DRY_RUN)) || sleep "$RETRY_SECONDS"
  done
}

ssh_flags() {  # a worker that stops answering drops the connection instead of hanging it
  echo "--ssh-flag=-oConnectTimeout=$SSH_CONNECT_SECONDS"
  echo "--ssh-flag=-oServerAliveInterval=$SSH_ALIVE_SECONDS"
  echo "--ssh-flag=-oServerAliveCountMax=3"
}

ssh_node() {  # ssh_node NODE WORKER SECONDS COMMAND: one try, output on stdout
  local flags
  mapfile -t flags < <(ssh_flags)
  gcloud_try "$3" compute tpus tpu-vm ssh "$1" --worker="$2" "${SCOPE[@]}" --quiet "${flags[@]}" \
    --command="$4"
}

# ---------------------------------------------------------------------------------------------
# The queued resource and its nodes (NODES: one per slice)
# ---------------------------------------------------------------------------------------------

# Sets QR_STATE (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ..., NOT_FOUND when it does not
# exist, UNKNOWN when the API call failed: look again later) and QR_ERROR (why it FAILED).
describe_queued_resource() {
  local answer rc=0
  QR_ERROR=""
  answer=$(gcloud_try "$GCLOUD_SECONDS" compute tpus queued-resources describe "$SLICE" \
    "${SCOPE[@]}" --format='value(state.state,state.failedData.error.message)') || rc=$?
  if ((DRY_RUN)); then
    QR_STATE=$DRY_RUN_STATE
  elif ((rc == 0)); then
    QR_STATE=${answer%%$'\t'*}
    [[ $answer != *$'\t'* ]] || QR_ERROR=${answer#*$'\t'}
    QR_STATE=${QR_STATE:-UNKNOWN}
  elif grep -q NOT_FOUND "$TMP_DIR/gcloud.err"; then
    QR_STATE=NOT_FOUND
  else
    log "describe $SLICE failed: $(last_error)"
    QR_STATE=UNKNOWN
  fi
}

# A TPU node's own state (READY, REPAIRING, PREEMPTED, UNKNOWN after a failed repair, HIDDEN, ...)
# or "" when the API call failed. Asked when ssh to its workers fails: the node can report
# PREEMPTED before its queued resource leaves ACTIVE.
node_state() {
  gcloud_try "$GCLOUD_SECONDS" compute tpus tpu-vm describe "$1" "${SCOPE[@]}" \
    --format='value(state)' || true
}

create_slice() {
  local args=(compute tpus queued-resources create "$SLICE" "${SCOPE[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  if ((NUM_SLICES > 1)); then
    args+=(--node-count="$NUM_SLICES" --node-prefix="$SLICE")  # nodes $SLICE-0, $SLICE-1, ...
  else
    args+=(--node-id="$SLICE")
  fi
  ((!SPOT)) || args+=(--spot)
  ((!RESERVED)) || args+=(--reserved)
  ((!BEST_EFFORT)) || args+=(--best-effort)
  [[ -z $NETWORK ]] || args+=(--network="$NETWORK")
  [[ -z $SUBNETWORK ]] || args+=(--subnetwork="$SUBNETWORK")
  [[ -z $SERVICE_ACCOUNT ]] || args+=(--service-account="$SERVICE_ACCOUNT")
  log "requesting $NUM_SLICES x $ACCELERATOR as $SLICE ($RUNTIME, spot=$SPOT," \
    "reserved=$RESERVED, best-effort=$BEST_EFFORT)"
  # A try that timed out may still have created it: the retry's ALREADY_EXISTS is success.
  ACCEPT=ALREADY_EXISTS FATAL='INVALID_ARGUMENT|PERMISSION_DENIED' \
    gcloud_retry "create $SLICE" "$GCLOUD_SECONDS" "${args[@]}" || return 1
  DRY_RUN_STATE=ACTIVE
}

# --force also deletes the TPU nodes. NOT_FOUND is success (a reclaimed slice may already be
# gone). We wait until the name is free: creating under a name that is still DELETING fails.
delete_slice() {
  log "deleting slice $SLICE"
  ACCEPT=NOT_FOUND gcloud_retry "delete $SLICE" "$GCLOUD_SECONDS" \
    compute tpus queued-resources delete "$SLICE" "${SCOPE[@]}" --force --quiet || return 1
  DRY_RUN_STATE=NOT_FOUND
  local deadline=$((SECONDS + DELETE_WAIT_SECONDS))
  while describe_queued_resource; [[ $QR_STATE != NOT_FOUND ]]; do
    if ((SECONDS >= deadline)); then
      log "$SLICE is still $QR_STATE ${DELETE_WAIT_SECONDS}s after delete"
      return 1
    fi
    pause
  done
}

# A shortage of capacity passes; a missing quota does not, so retrying it would only burn the
# restart budget.
log_failure() {
  if [[ $QR_ERROR =~ [Qq]uota ]]; then
    log "the request for $SLICE FAILED for quota: $QR_ERROR"
    die_bad_input "raise the quota for $ACCELERATOR in $ZONE (or pick another ZONE or type)"
  fi
  log "the request for $SLICE FAILED: ${QR_ERROR:-no message}" \
    "(a capacity shortage is retried like a preemption)"
}

# Waits through the queue (WAITING_FOR_RESOURCES can last hours; that is the point of queueing).
# Fails when the request FAILED, was suspended or vanished: the caller counts a restart.
wait_until_active() {
  local previous=""
  while :; do
    describe_queued_resource
    [[ $QR_STATE == "$previous" ]] || log "slice $SLICE is $QR_STATE"
    previous=$QR_STATE
    case "$QR_STATE" in
      ACTIVE) return 0 ;;
      FAILED) log_failure; return 1 ;;
      SUSPENDING|SUSPENDED|NOT_FOUND|DELETING) return 1 ;;
    esac
    pause
  done
}

# ---------------------------------------------------------------------------------------------
# Code and job on the workers of every node
# ---------------------------------------------------------------------------------------------

# Packed once, so every relaunch runs the code the run started with even if the checkout changes.
# Only files git tracks: data, workdirs and venvs lying in the checkout stay here. (Tracked files
# deleted from the work tree are skipped, or tar would fail on them.)
pack_code() {
  TARBALL="$TMP_DIR/$REMOTE_TARBALL"
  if ((DRY_RUN)); then
    echo "# pack the files git tracks in $REPO_ROOT into $TARBALL" >&3
    return
  fi
  local file
  git -C "$REPO_ROOT" ls-files -z | while IFS= read -r -d '' file; do
    [[ ! -e $REPO_ROOT/$file ]] || printf '%s\0' "$file"
  done | tar -C "$REPO_ROOT" --null -T - -czf "$TARBALL"
}

# scp is killed after SCP_SECONDS and retried (a worker that stops answering mid-copy would
# otherwise hang it forever, as MaxText's multihost runner also guards against).
install_code() {
  local node flags
  mapfile -t flags < <(ssh_flags | sed 's/--ssh-flag/--scp-flag/')
  for node in "${NODES[@]}"; do
    log "copying the code to every worker of $node and installing it"
    gcloud_retry "scp to $node" "$SCP_SECONDS" compute tpus tpu-vm scp "$TARBALL" \
      "$node:$REMOTE_TARBALL" --worker=all "${SCOPE[@]}" --quiet "${flags[@]}" || return 1
    retry_ssh "install on $node" "$node" "$INSTALL_SECONDS" "set -e; cd ~; rm -rf $REMOTE_CODE
mkdir -p $REMOTE_CODE; tar -xzf $REMOTE_TARBALL -C $REMOTE_CODE
$REMOTE_WORKER install $REMOTE_PYTHON_VERSION" || return 1
  done
}

retry_ssh() {  # retry_ssh WHAT NODE SECONDS COMMAND: on every worker of NODE
  local flags
  mapfile -t flags < <(ssh_flags)
  gcloud_retry "$1" "$3" compute tpus tpu-vm ssh "$2" --worker=all "${SCOPE[@]}" --quiet \
    "${flags[@]}" --command="$4"
}

# Starts the job on every worker of every node; `tpu_worker.sh start` first stops whatever still
# holds the TPU there, so a retry (or a relaunch in place) restarts all of them cleanly. Records
# the workers that answered in EXPECTED (node/host) so a poll can tell who is missing.
# Each launch is a generation: its logs go to WORKDIR/logs/GENERATION/HOST.
launch_job() {
  local attempt node out rc host
  LAUNCHES=$((LAUNCHES + 1))
  GENERATION="$(date -u +%Y%m%dT%H%M%S)-$LAUNCHES"
  log "starting ${JOB[1]} on every worker of ${NODES[*]} with workdir $WORKDIR" \
    "(logs: $WORKDIR/logs/$GENERATION)"
  for ((attempt = 1; attempt <= GCLOUD_ATTEMPTS; attempt++)); do
    EXPECTED=() MISSED=()
    rc=0
    for node in "${NODES[@]}"; do
      out=$(ssh_node "$node" all "$SSH_SECONDS" "$REMOTE_WORKER start$(printf ' %q' "$GENERATION" \
        "$WORKDIR/logs/$GENERATION" "${JOB[@]}")") || rc=$?
      while read -r tag host; do
        [[ $tag != "$STARTED_TAG" ]] || EXPECTED["$node/$host"]=1
      done <<<"$out"
      # What the workers said while starting (stale trainers stopped, ...).
      ((DRY_RUN)) ||
        grep -v '^[[:space:]]*$' "$TMP_DIR/gcloud.err" | sed "s|^|  $node: |" >&2 || true
      if ((rc)); then
        log "launch on $node failed (try $attempt/$GCLOUD_ATTEMPTS, exit $rc): $(last_error)"
        break
      fi
    done
    ((rc)) || return 0
    ((DRY_RUN)) || sleep "$RETRY_SECONDS"
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# Status polls
# ---------------------------------------------------------------------------------------------

remote_status_command() {
  echo "$REMOTE_WORKER status $HANG_SECONDS 2>/dev/null || echo \"$STATUS_TAG lost \$(hostname)\""
}

# Sets OUTCOME: running, finished, bad_config, dead (the job died or hung on a healthy slice:
# relaunch in place), stopped (every worker exited 0 for a preemption or maintenance notice),
# lost (the slice or a worker is gone: recreate) or unknown (no full answer this time). FAILING
# lists the node/host of each worker that failed or hung. Each worker that does not answer is
# unknown on its own; only MAX_MISSED_POLLS misses in a row of the same worker count as lost, so
# one flaky host does not blank the poll for the others.
check_run() {
  describe_queued_resource
  case "$QR_STATE" in
    ACTIVE) ;;
    UNKNOWN) OUTCOME=unknown; return ;;  # API hiccup: look again next poll
    FAILED) log_failure; OUTCOME=lost; REASON="slice FAILED"; return ;;
    *) log "slice $SLICE is $QR_STATE (preempted or deleted)"; OUTCOME=lost
       REASON="slice $QR_STATE"; return ;;
  esac
  local node out rc state tag word rest host
  local answered=() bad_config=0 dead=0 running=0 stopped=0 exited=0 missing=0
  UNREACHABLE=0 FAILING=()
  for node in "${NODES[@]}"; do
    rc=0
    out=$(ssh_node "$node" all "$SSH_SECONDS" "$(remote_status_command)") || rc=$?
    ((!DRY_RUN)) || out="$STATUS_TAG exited dry-run"
    while read -r tag word rest; do
      [[ $tag == "$STATUS_TAG" ]] || continue
      host=${rest##* }
      answered+=("$node/$host")
      unset "MISSED[$node/$host]"
      case "$word" in
        failed) FAILING+=("$node/$host")
                if [[ ${rest%% *} == 2 ]]; then bad_config=1; else dead=1; fi ;;
        hung) FAILING+=("$node/$host"); dead=1
              log "worker $node/$host is hung: its log has not changed for ${rest%% *}s" ;;
        lost) FAILING+=("$node/$host"); dead=1 ;;
        running) running=1 ;;
        stopped) stopped=1 ;;
        exited) exited=1 ;;
      esac
    done <<<"$out"
    ((rc)) || { unset "MISSED[$node/?]"; continue; }
    state=$(node_state "$node")
    case "$state" in
      PREEMPTED|TERMINATED|STOPPING|STOPPED|DELETING|HIDING|HIDDEN|UNKNOWN)
        log "TPU node $node is $state"; OUTCOME=lost; REASON="node $node $state"; return ;;
      REPAIRING) log "TPU node $node is REPAIRING; waiting"; missing=1; continue ;;
    esac
    log "no full answer from $node (exit $rc, node ${state:-state unknown}): $(last_error)"
    note_missing "$node" "${answered[@]}"
    missing=1
  done
  if ((UNREACHABLE)); then OUTCOME=lost
  elif ((bad_config)); then OUTCOME=bad_config
  elif ((dead)); then OUTCOME=dead; REASON="worker ${FAILING[*]} failed or hung"
  elif ((running)); then OUTCOME=running
  elif ((missing)); then OUTCOME=unknown
  elif ((stopped || exited)); then job_exit_outcome "$stopped"
  else OUTCOME=unknown; fi
}

# Every worker exited 0. The trainer says why in WORKDIR/run_status.json (process 0 writes it just
# before a clean exit). The eval job writes none: it exited 0 either after the final step or
# because it was told to stop (STOPPED=1).
job_exit_outcome() {  # job_exit_outcome STOPPED
  if [[ $MODE == eval ]]; then
    if (($1)); then OUTCOME=stopped REASON="the eval job was stopped"; else OUTCOME=finished; fi
    return
  fi
  local status
  status=$(read_run_status)
  case "$status" in
    finished) OUTCOME=finished ;;
    preempted) OUTCOME=stopped REASON="the trainers saved and stopped (run_status.json: preempted)" ;;
    *) OUTCOME=stopped
       REASON="every worker exited 0 but $WORKDIR/run_status.json says '${status:-nothing}'" ;;
  esac
}

read_run_status() {  # prints the "status" of WORKDIR/run_status.json, or nothing
  ((!DRY_RUN)) || { echo finished; return; }
  gcloud_try "$GCLOUD_SECONDS" storage cat "$WORKDIR/run_status.json" |
    sed -n 's/.*"status"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' | head -n 1
}

# Relaunching in place keeps the slice (and the capacity it holds): only when the queued resource
# is ACTIVE (check_run saw it) and every node says READY.
nodes_ready() {
  local node state
  for node in "${NODES[@]}"; do
    state=$(node_state "$node")
    ((DRY_RUN)) || [[ $state == READY ]] || { log "TPU node $node is ${state:-unknown}"; return 1; }
  done
}

# After a failure: every worker's log goes to WORKDIR/logs/GENERATION/HOST (a job that hung or
# was killed never copies its own), and the failing workers' tails are printed here.
collect_logs() {
  local node out tag host line key
  for node in "${NODES[@]}"; do
    out=$(ssh_node "$node" all "$SSH_SECONDS" "$REMOTE_WORKER collect $TAIL_LINES") || true
    ((!DRY_RUN)) || continue
    for key in ${FAILING[@]+"${FAILING[@]}"}; do
      [[ $key == "$node/"* ]] || continue
      log "last $TAIL_LINES lines of ${key#*/}'s log (all of it:" \
        "$WORKDIR/logs/${GENERATION:-GENERATION}/${key#*/}):"
      while read -r tag host line; do
        if [[ $tag == "$TAIL_TAG" && $host == "${key#*/}" ]]; then
          printf '  %s| %s\n' "$host" "$line" >&2
        fi
      done <<<"$out"
    done
  done
}

# The highest checkpoint step in WORKDIR (orbax's step folders are plain numbers), or -1.
latest_checkpoint_step() {
  local steps
  steps=$(gcloud_try "$GCLOUD_SECONDS" storage ls "$WORKDIR/checkpoints/" 2>/dev/null |
    sed -n 's|.*/\([0-9][0-9]*\)/*$|\1|p' | sort -n | tail -n 1)
  echo "${steps:--1}"
}

# note_missing NODE ANSWERED...: counts a miss for each expected worker of NODE that did not
# answer (or for the node as a whole when it is not known who). Sets UNREACHABLE (and REASON) once
# one has missed MAX_MISSED_POLLS polls in a row.
note_missing() {
  local node=$1 key known=0 blamed=0
  shift
  local answered=" $* "
  for key in "${!EXPECTED[@]}"; do
    [[ $key == "$node/"* ]] || continue
    known=1
    [[ $answered != *" $key "* ]] || continue
    blamed=1
    count_miss "$key"
  done
  if ((!known || !blamed)); then count_miss "$node/?"; fi
}

count_miss() {
  MISSED[$1]=$((${MISSED[$1]:-0} + 1))
  log "worker $1 did not answer (${MISSED[$1]}/$MAX_MISSED_POLLS)"
  if ((MISSED[$1] >= MAX_MISSED_POLLS)); then
    UNREACHABLE=1
    REASON="worker $1 unreachable for $MAX_MISSED_POLLS polls"
  fi
}

# ---------------------------------------------------------------------------------------------
# Worker 0's log, in the background. Reconnects (after ssh drops) print only new lines.
# ---------------------------------------------------------------------------------------------

start_log_stream() {  # start_log_stream TAIL_LINES (+1: whole log)
  local flags
  mapfile -t flags < <(ssh_flags)
  local args=(compute tpus tpu-vm ssh "${NODES[0]}" --worker=0 "${SCOPE[@]}" --quiet "${flags[@]}"
    --command="tail -n $1 -F $REMOTE_LOG")
  if ((DRY_RUN)); then
    gcloud_try 1 "${args[@]}"
    return
  fi
  gcloud "${args[@]}" </dev/null 2>>"$TMP_DIR/stream.err" &
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

# ---------------------------------------------------------------------------------------------
# The supervisor's lock in WORKDIR: one supervisor per run (and one per eval job). Created only
# if absent (a generation precondition), refreshed between polls, removed on exit. A lock not
# refreshed for LOCK_STALE_SECONDS belongs to a supervisor that died and is taken over.
# ---------------------------------------------------------------------------------------------

write_lock_file() {
  printf '{"host": "%s", "pid": %d, "time": "%s", "unix": %d, "token": "%s", "slice": "%s"}\n' \
    "$(hostname)" "$$" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(date +%s)" "$LOCK_TOKEN" "$SLICE" \
    >"$TMP_DIR/lock.json"
}

acquire_lock() {
  LOCK_TOKEN="$(hostname)-$$-$RANDOM$RANDOM"
  write_lock_file
  if gcloud_try "$GCLOUD_SECONDS" storage cp --if-generation-match=0 "$TMP_DIR/lock.json" "$LOCK"
  then
    LOCK_HELD=1 LOCK_REFRESHED=$SECONDS
    return
  fi
  grep -Eqi '412|precondition' "$TMP_DIR/gcloud.err" ||
    die_bad_input "cannot write the lock $LOCK: $(last_error)"
  local holder unix
  holder=$(gcloud_try "$GCLOUD_SECONDS" storage cat "$LOCK") || true
  unix=$(sed -n 's/.*"unix": *\([0-9]*\).*/\1/p' <<<"$holder")
  if [[ -n $unix ]] && (($(date +%s) - unix > LOCK_STALE_SECONDS)); then
    log "taking over $LOCK: not refreshed for over ${LOCK_STALE_SECONDS}s ($holder)"
    gcloud_try "$GCLOUD_SECONDS" storage cp "$TMP_DIR/lock.json" "$LOCK" ||
      die_bad_input "cannot write the lock $LOCK: $(last_error)"
    LOCK_HELD=1 LOCK_REFRESHED=$SECONDS
    return
  fi
  log "another supervisor holds $LOCK: ${holder:-unreadable}"
  die_bad_input "stop that supervisor first; if it is dead, remove the lock with" \
    "'gcloud storage rm $LOCK' (or wait ${LOCK_STALE_SECONDS}s from its time)"
}

# Between polls: a lock that now names someone else means another supervisor took over; two
# would fight over the slice, so this one leaves.
refresh_lock() {
  ((LOCK_HELD && !DRY_RUN && SECONDS - LOCK_REFRESHED >= LOCK_REFRESH_SECONDS)) || return 0
  local holder
  if holder=$(gcloud_try "$GCLOUD_SECONDS" storage cat "$LOCK") &&
      [[ $holder != *"\"$LOCK_TOKEN\""* ]]; then
    LOCK_HELD=0
    log "$LOCK now belongs to another supervisor: $holder"
    die_bad_input "this supervisor stops; the job is left to the other one"
  fi
  write_lock_file
  gcloud_try "$GCLOUD_SECONDS" storage cp "$TMP_DIR/lock.json" "$LOCK" ||
    log "could not refresh $LOCK: $(last_error)"
  LOCK_REFRESHED=$SECONDS
}

release_lock() {
  ((LOCK_HELD)) || return 0
  LOCK_HELD=0
  gcloud_try 60 storage rm "$LOCK" || log "could not remove $LOCK: $(last_error)"
}
