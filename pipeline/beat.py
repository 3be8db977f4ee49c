"""Periodic housekeeping run by ``celery beat`` (schedule in ``celery_app.beat_schedule``):

- ``export.beat.cleanup``: exports older than ``NPX_CLEANUP_MAX_AGE_HOURS`` lose their archive, staging and
  job record; leftover files of exports no record knows about are removed once they are that old too.
- ``export.beat.fail_stale``: an active job none of whose tasks is running or waiting any more (its messages
  were lost with the broker's data, or a task died in a way nothing reported) is ended ``failed``: no job stays
  ``processing`` or ``pending`` for ever. A job is a suspect once it has been silent (no heartbeat; for a
  pending job, since its creation) for longer than the task time limit, and is failed only when the broker
  holds no message of it either, so exports queued behind a long backlog, or whose lost worker's message is
  waiting for its visibility timeout, are left alone.
  (A hard time limit or a batch that keeps killing its worker fails the job at once: ``tasks._record_lost_task``.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import structlog

from pipeline import canvas
from pipeline.celery_app import app
from pipeline.jobs import ACTIVE, PENDING, PROCESSING, JobStore, job_store, parse_time
from pipeline.paths import EXPORT_ENTRY, remove_export_files
from pipeline.settings import QUEUES, Settings, get_settings

log = structlog.get_logger("pipeline.beat")


def cleanup_old_exports(store: JobStore, settings: Settings, now: float | None = None) -> list[str]:
    """Remove every export created more than the max age ago (unless still active); return their ids."""
    now = time.time() if now is None else now
    cutoff = now - settings.cleanup_max_age_hours * 3600
    old = store.ids(created_before=cutoff)
    removed = []
    for export_id, (status, _heartbeat) in zip(old, store.statuses(old)):
        if status in ACTIVE:
            continue  # still running after max age: fail_stale decides about it
        remove_export_files(settings.export_root, export_id)
        store.delete(export_id)
        removed.append(export_id)
    removed += _remove_orphans(store, settings.export_root, cutoff)
    if removed:
        log.info("old exports removed", count=len(removed))
    return removed


def _remove_orphans(store: JobStore, export_root: Path, cutoff: float) -> list[str]:
    """Archives and staging folders older than the cutoff whose export has no record (any more)."""
    entries = []
    for folder in (Path(export_root), Path(export_root) / "staging"):
        if folder.is_dir():
            entries += [p for p in folder.iterdir() if EXPORT_ENTRY.match(p.name)]
    orphans = set()
    for path in entries:
        export_id = EXPORT_ENTRY.match(path.name).group("id")
        try:
            old = path.lstat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if old and not store.client.exists(store.key(export_id)):
            orphans.add(export_id)
    for export_id in orphans:
        remove_export_files(export_root, export_id)
    return sorted(orphans)


def exports_in_broker() -> set[str]:
    """Ids of the exports that have a task message in the broker: waiting in an export queue (any priority),
    or delivered to a worker and not acknowledged yet (running, reserved, or held for a retry countdown).

    Reads the redis transport's own keys: a list per queue and priority, and the ``unacked`` hash."""
    found: set[str] = set()
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        lists = [channel._q_for_pri(queue, step) for queue in QUEUES for step in channel.priority_steps]
        with channel.client.pipeline(transaction=False) as pipe:
            for name in lists:
                pipe.lrange(name, 0, -1)
            pipe.hvals(channel.unacked_key)
            *queued, unacked = pipe.execute()
    messages = [json.loads(raw) for listing in queued for raw in listing]
    messages += [json.loads(raw)[0] for raw in unacked]  # unacked: [message, exchange, routing key]
    for message in messages:
        task_id = (message.get("headers") or {}).get("id")
        if task_id:
            found.add(canvas.parse_task_id(task_id)[0])
    return found


def fail_stale_jobs(store: JobStore, settings: Settings, now: float | None = None,
                    in_broker: Callable[[], set[str]] = exports_in_broker) -> list[str]:
    """End ``failed`` every active job silent for longer than the task time limit (processing: since its last
    heartbeat; pending: since it was created) of which the broker holds no message (``in_broker``)."""
    now = time.time() if now is None else now
    ids = store.ids()
    suspects = []
    for export_id, (status, heartbeat) in zip(ids, store.statuses(ids)):
        if status == PROCESSING and heartbeat is not None:
            last_sign = heartbeat
        elif status == PENDING:
            job = store.find(export_id)
            created = parse_time(job.created_at) if job else None
            last_sign = created.timestamp() if created else None
        else:
            continue
        if last_sign is not None and now - last_sign > settings.task_time_limit:
            suspects.append((export_id, status, int(now - last_sign)))
    if not suspects:
        return []
    waiting = in_broker()
    stale = []
    for export_id, status, silent in suspects:
        if export_id in waiting:
            continue
        message = (f"no sign of life from the export's tasks for {silent} s and none of them is queued "
                   f"(worker or broker data lost)")
        error = {"error": "StaleExport", "message": message, "frame": None, "file": None, "stage": None,
                 "batch": None}
        if store.fail(export_id, error, allowed=(status,)):
            stale.append(export_id)
            log.warning("stale export failed", export_id=export_id, status=status, silent_seconds=silent)
    return stale


@app.task(name="export.beat.cleanup")
def cleanup() -> list[str]:
    return cleanup_old_exports(job_store(), get_settings())


@app.task(name="export.beat.fail_stale")
def fail_stale() -> list[str]:
    return fail_stale_jobs(job_store(), get_settings())
