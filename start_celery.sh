#!/usr/bin/env bash
# Start the Celery side of nextpoints-export in the background: a worker on both export queues, beat
# (cleanup + stale-job check) and, with --flower (or WITH_FLOWER=1), Flower on :5555.
#
# The broker is CELERY_BROKER_URL (default redis://localhost:6379/0); for a private Redis on one machine use
# `nextpoints-export serve` instead. Pid files and logs go to $NPX_RUN_DIR (default ./run).
# The commands are `nextpoints-export worker|beat|flower`, which exec the same Celery command lines the tests
# start (pipeline/cli.py: worker_command, beat_command, flower_command).
set -euo pipefail

RUN_DIR="${NPX_RUN_DIR:-./run}"
NPX="${NPX_CLI:-nextpoints-export}"
mkdir -p "$RUN_DIR"

running() { [[ -f "$RUN_DIR/$1.pid" ]] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

start() {
    local name=$1; shift
    if running "$name"; then
        echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
        return
    fi
    # `nextpoints-export <cmd>` execs celery, so $! is celery's own pid: stop_celery.sh signals it directly
    nohup "$NPX" "$@" >>"$RUN_DIR/$name.log" 2>&1 &
    echo $! >"$RUN_DIR/$name.pid"
    echo "$name started (pid $!, log $RUN_DIR/$name.log)"
}

start worker worker ${CELERY_WORKER_CONCURRENCY:+--concurrency "$CELERY_WORKER_CONCURRENCY"}
start beat beat
if [[ "${1:-}" == "--flower" || "${WITH_FLOWER:-0}" == "1" ]]; then
    start flower flower --port "${FLOWER_PORT:-5555}"
fi
