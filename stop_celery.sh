#!/usr/bin/env bash
# Stop what start_celery.sh started. SIGTERM is Celery's warm shutdown: the worker finishes (or, past
# $NPX_STOP_TIMEOUT seconds, is killed and hands back, thanks to acks_late) its running batches.
set -euo pipefail

RUN_DIR="${NPX_RUN_DIR:-./run}"
TIMEOUT="${NPX_STOP_TIMEOUT:-60}"

stop() {
    local name=$1 pidfile="$RUN_DIR/$1.pid"
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
        for ((i = 0; i < TIMEOUT * 5; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name did not stop within ${TIMEOUT}s: SIGKILL"
            pkill -KILL -P "$pid" 2>/dev/null || true  # its pool processes
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
    echo "$name stopped"
}

stop flower
stop beat
stop worker
