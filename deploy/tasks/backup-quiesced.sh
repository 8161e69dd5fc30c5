#!/usr/bin/env bash
# Mirrorline SOURCE-side script: a backup of a quiesced application on the target
# (the Storage Mirroring scripting guide's task command processing workflow).
#
#   backup-quiesced.sh --service UNIT --conid N --task NAME [--settle SECONDS]
#                      [--timeout S] [--socket PATH] [--on TRIGGER] [--task-timeout T]
#                      [-- TASK_ARG...]
#
#   1. systemctl stop UNIT, so the application has written everything it will write;
#   2. sleep --settle seconds (default 5) for the last writes to reach the file system;
#   3. mirrorline queuetask N NAME [on=TRIGGER] [timeout=T] -- TASK_ARG...: the task goes
#      into connection N's stream right after the application's last write;
#   4. systemctl start UNIT at once (the task's place in the stream is fixed when it is
#      queued, so the application need not stay down until the target has run it), and
#      also when any earlier step fails or the script is interrupted;
#   5. wait for the task's result (polling `mirrorline --json tasks N`) and report it.
#
# --timeout S limits the wait for the result (seconds, or a whole number with s, m, h
# or d; default: no limit). --socket is passed to mirrorline (default: its own).
# --on and --task-timeout are queuetask's on= and timeout= (defaults: execute, forever).
#
# Prints a one-line summary on stdout. Exit status, as `mirrorline queuetask --wait`:
# 0 if the task ran and exited 0; the task's own exit code if it exited 1-255; 1 if it
# was killed by a signal, refused, interrupted or timed out (reported once it has ended),
# or queueing, stopping or starting the service failed (a failed start turns an otherwise
# successful run into 1); 4 if --timeout passed before the task finished (it keeps
# going: see `mirrorline tasks N`); 2 for a usage error.
#
# Environment: MIRRORLINE_SYSTEMCTL replaces `systemctl` (e.g. "systemctl --user"),
# MIRRORLINE_CLI replaces `mirrorline`, MIRRORLINE_POLL_INTERVAL is the seconds between
# polls (default 1).
#
# Example (cron or a systemd timer on the source):
#   backup-quiesced.sh --service postgresql.service --conid 1 --task snapshot --timeout 1h
set -euo pipefail

prog=backup-quiesced.sh
usage() { sed -n '5,7s/^# \{0,1\}//p' "$0"; }
help() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
usage_error() { echo "$prog: $*" >&2; usage >&2; exit 2; }

unit='' conid='' task='' settle=5 timeout='' socket='' trigger='' task_timeout=''
task_args=()
while [ "$#" -gt 0 ]; do
    opt=$1
    case "$opt" in
        --) shift; task_args=("$@"); break ;;
        -h|--help) help; exit 0 ;;
        --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
        --*) [ "$#" -ge 2 ] || usage_error "$opt needs a value"; val=$2; shift 2 ;;
        *) usage_error "unexpected argument '$opt' (task arguments go after --)" ;;
    esac
    case "$opt" in
        --service) unit=$val ;;
        --conid) conid=$val ;;
        --task) task=$val ;;
        --settle) settle=$val ;;
        --timeout) timeout=$val ;;
        --socket) socket=$val ;;
        --on) trigger=$val ;;
        --task-timeout) task_timeout=$val ;;
        *) usage_error "unknown option $opt" ;;
    esac
done
[ -n "$unit" ] || usage_error "--service is required"
[ -n "$conid" ] || usage_error "--conid is required"
[ -n "$task" ] || usage_error "--task is required"
[[ "$conid" =~ ^[0-9]+$ ]] || usage_error "--conid must be one connection id, got '$conid'"
[[ "$settle" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "--settle must be a number of seconds, got '$settle'"
timeout_ms=
if [ -n "$timeout" ]; then
    [[ "$timeout" =~ ^([0-9]+)([smhd]?)$ ]] \
        || usage_error "--timeout must be whole seconds or a number with s, m, h or d, got '$timeout'"
    case "${BASH_REMATCH[2]}" in
        m) mult=60 ;; h) mult=3600 ;; d) mult=86400 ;; *) mult=1 ;;
    esac
    timeout_ms=$((10#${BASH_REMATCH[1]} * mult * 1000))
fi
poll=${MIRRORLINE_POLL_INTERVAL:-1}
[[ "$poll" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "MIRRORLINE_POLL_INTERVAL must be a number, got '$poll'"

read -r -a systemctl_cmd <<<"${MIRRORLINE_SYSTEMCTL:-systemctl}"
read -r -a cli <<<"${MIRRORLINE_CLI:-mirrorline}"
cli+=(--json)
[ -z "$socket" ] || cli+=(--socket "$socket")
command -v python3 >/dev/null 2>&1 || { echo "$prog: python3 is needed to read mirrorline's JSON" >&2; exit 1; }

# Reads one `mirrorline --json` result on stdin. `queued`: prints the task id of a
# queuetask result. `task ID`: prints "state, exit code, seq, final|pending, message"
# (tab-separated) of that task in a tasks result ("missing" if it is not listed), and its
# output tail to stderr once it is final. `message`: prints the result's message. Exits 1 on output it cannot read.
read_json='
import json, sys
try:
    result = json.loads(sys.stdin.read().strip().splitlines()[-1])
    data = result.get("data") or {}
except (ValueError, IndexError, AttributeError):
    sys.exit(1)
mode = sys.argv[1]
if mode == "message":
    print(" ".join(str(result.get("message") or "").split()))
elif mode == "queued":
    task_id = data.get("task_id", data.get("id"))
    if task_id is None and isinstance(data.get("tasks"), list) and len(data["tasks"]) == 1:
        task_id = data["tasks"][0].get("task_id", data["tasks"][0].get("id"))
    if task_id is None:
        sys.exit(1)
    print(task_id)
elif mode == "task":
    for task in data.get("tasks") or []:
        if isinstance(task, dict) and str(task.get("id", task.get("task_id"))) == sys.argv[2]:
            state, code = task.get("state") or "unknown", task.get("exit_code")
            # timed-out: op processing stopped waiting; final once the task has ended
            final = state in ("done", "failed", "interrupted", "refused") or (
                state == "timed-out" and task.get("ended", 0) is not None)
            message = " ".join(str(task.get("message") or "").split())
            seq = task.get("seq")
            print(state, "-" if code is None else code, "-" if seq is None else seq,
                  "final" if final else "pending", message or "-", sep="\t")
            if final and task.get("output"):
                sys.stderr.write(str(task["output"]).rstrip("\n") + "\n")
            break
    else:
        print("missing")
'
json_get() { python3 -c "$read_json" "$@"; }
now_ms() { date +%s%3N; }

# -- state the EXIT trap reports on ------------------------------------------------------
stop_attempted=0 started=0 start_failed=0
stopped_at='' started_at='' sleep_pid=''
summary="nothing done"

start_service() {
    if [ "$stop_attempted" = 1 ] && [ "$started" = 0 ]; then
        started=1
        if "${systemctl_cmd[@]}" start "$unit"; then
            started_at=$(now_ms)
        else
            start_failed=1
            echo "$prog: ERROR: '${systemctl_cmd[*]} start $unit' failed: $unit is DOWN" >&2
        fi
    fi
}

# shellcheck disable=SC2317  # run by the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT INT TERM HUP
    [ -z "$sleep_pid" ] || kill "$sleep_pid" 2>/dev/null || true
    start_service
    local down=''
    if [ -n "$stopped_at" ] && [ -n "$started_at" ]; then
        down=$(( (started_at - stopped_at) / 100 ))
        down="; $unit was down $((down / 10)).$((down % 10))s"
    fi
    if [ "$start_failed" = 1 ]; then
        down="; $unit FAILED TO START"
        [ "$rc" != 0 ] || rc=1
    fi
    echo "$prog: conid $conid task $task: $summary$down (exit $rc)"
    exit "$rc"
}
trap on_exit EXIT
trap 'summary="interrupted"; exit 130' INT
trap 'summary="terminated"; exit 143' TERM
trap 'summary="hung up"; exit 129' HUP

# -- 1. stop the application -------------------------------------------------------------
stop_attempted=1    # from here on the service is started again whatever happens
stopped_at=$(now_ms)
if ! "${systemctl_cmd[@]}" stop "$unit"; then
    summary="could not stop $unit; nothing queued"
    exit 1
fi

# -- 2. let it settle (in the background so a signal is handled at once) -----------------
sleep "$settle" &
sleep_pid=$!
wait "$sleep_pid"
sleep_pid=

# -- 3. queue the task -------------------------------------------------------------------
queue=(queuetask "$conid" "$task")
[ -z "$trigger" ] || queue+=("on=$trigger")
[ -z "$task_timeout" ] || queue+=("timeout=$task_timeout")
queue+=(-- "${task_args[@]}")
qrc=0
qout=$("${cli[@]}" "${queue[@]}") || qrc=$?
if [ "$qrc" != 0 ]; then
    reason=$(json_get message <<<"$qout" 2>/dev/null) || reason=
    case "$qrc" in
        3) summary="not queued: the mirrorline agent is unreachable${reason:+ ($reason)}" ;;
        *) summary="not queued: ${reason:-mirrorline queuetask exited $qrc}" ;;
    esac
    exit 1
fi
if ! task_id=$(json_get queued <<<"$qout"); then
    summary="queued, but no task id in mirrorline's answer: $qout"
    exit 1
fi

# -- 4. restart the application ----------------------------------------------------------
start_service

# -- 5. wait for the task's result -------------------------------------------------------
[ -z "$timeout_ms" ] || deadline=$(( $(now_ms) + timeout_ms ))
failures=0
state=queued code=- seq=- final=pending message=-
while :; do
    trc=0
    tout=$("${cli[@]}" tasks "$conid") || trc=$?
    if [ "$trc" = 0 ] && line=$(json_get task "$task_id" <<<"$tout"); then
        failures=0
        if [ "$line" != missing ]; then
            IFS=$'\t' read -r state code seq final message <<<"$line"
        fi
        [ "$final" != final ] || break
    else
        failures=$((failures + 1))
        if [ -z "$timeout_ms" ] && [ "$failures" -ge 30 ]; then
            summary="task $task_id queued, but its state could not be read $failures times in a row"
            exit 1
        fi
    fi
    if [ -n "$timeout_ms" ] && [ "$(now_ms)" -ge "$deadline" ]; then
        summary="task $task_id still $state after $timeout; it keeps going (mirrorline tasks $conid)"
        exit 4
    fi
    sleep "$poll" &
    sleep_pid=$!
    wait "$sleep_pid"
    sleep_pid=
done

# -- 6. report ---------------------------------------------------------------------------
# The same codes as `mirrorline queuetask --wait`: the task's own exit code when it is
# 1-255, else 1 (killed by a signal, refused, interrupted, timed out).
summary="task $task_id (seq $seq) $state, exit code $code"
[ "$message" = - ] || summary="$summary: $message"
if [ "$state" = "done" ] && [ "$code" = 0 ]; then
    exit 0
elif [ "$state" = failed ] && [[ "$code" =~ ^[0-9]+$ ]] && [ "$code" -ge 1 ] && [ "$code" -le 255 ]; then
    exit "$code"
fi
exit 1
