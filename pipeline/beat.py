"""Periodic housekeeping run by ``celery beat`` (schedule in ``celery_app.beat_schedule``):

- ``export.beat.cleanup``: exports older than ``NPX_CLEANUP_MAX_AGE_HOURS`` lose their archive, staging and
  job record; leftover files of exports no record knows about are removed once they are that old too.
- ``export.beat.fail_stale``: a ``processing`` job whose tasks are gone (worker machine lost, hard time limit)
  is ended ``failed`` once its heartbeat is older than the task time limit: no job stays ``processing``.
"""
from __future__ import annotations

import time
from pathlib import Path

import structlog

from pipeline.celery_app import app
from pipeline.jobs import ACTIVE, PROCESSING, JobStore, job_store
from pipeline.paths import EXPORT_ENTRY, remove_export_files
from pipeline.settings import Settings, get_settings

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


def fail_stale_jobs(store: JobStore, settings: Settings, now: float | None = None) -> list[str]:
    """End ``failed`` every processing job whose last heartbeat is older than the task time limit."""
    now = time.time() if now is None else now
    ids = store.ids()
    stale = []
    for export_id, (status, heartbeat) in zip(ids, store.statuses(ids)):
        if status != PROCESSING or heartbeat is None or now - heartbeat <= settings.task_time_limit:
            continue
        silent = int(now - heartbeat)
        message = f"no sign of life from the export's tasks for {silent} s (worker lost or time limit hit)"
        error = {"error": "StaleExport", "message": message, "frame": None, "file": None, "stage": None,
                 "batch": None}
        if store.fail(export_id, error, allowed=(PROCESSING,)):
            stale.append(export_id)
            log.warning("stale export failed", export_id=export_id, silent_seconds=silent)
    return stale


@app.task(name="export.beat.cleanup")
def cleanup() -> list[str]:
    return cleanup_old_exports(job_store(), get_settings())


@app.task(name="export.beat.fail_stale")
def fail_stale() -> list[str]:
    return fail_stale_jobs(job_store(), get_settings())
