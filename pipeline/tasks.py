"""The export tasks: thin wrappers that run one stage of ``stages/`` for one export.

Every task runs its stage inside ``export_stage(...)``, which binds the log context, exits at once when the
export was cancelled (or failed elsewhere), and records any failure in the job record (error, frame, file,
stage, batch) before re-raising it. The DAG itself is assembled in ``pipeline.canvas``.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import structlog
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from pipeline import canvas
from pipeline.celery_app import app
from pipeline.jobs import CANCELLED, COMPLETED, FAILED, PENDING, PROCESSING, StopFlag, job_store, utc_now
from pipeline.paths import remove_export_files
from pipeline.settings import get_settings
from stages.compress import compress as compress_stage
from stages.convert import convert_batch, read_batch_result
from stages.discover import discover as discover_stage
from stages.errors import CancelledExport, InputError
from stages.merge import merge_tables, remove_staging
from stages.plan import ExportPlan
from stages.request import ExportRequest

log = structlog.get_logger("pipeline.tasks")
HEARTBEAT_EVERY = 5.0  # seconds between heartbeats written by a running batch


def error_details(exc: BaseException, stage: str, batch: int | None) -> dict[str, Any]:
    """The job's error report: ``{error, message, frame, file, stage, batch}``."""
    if isinstance(exc, InputError):
        details = exc.to_dict()
    else:
        details = {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                   "frame": None, "file": None}
        if isinstance(exc, SoftTimeLimitExceeded):
            details["message"] = f"time limit of {get_settings().task_time_limit} s exceeded"
    return {**details, "stage": stage, "batch": batch}


def record_failure(export_id: str, stage: str, batch: int | None, exc: BaseException) -> None:
    """End the job ``failed`` with the error (first failure wins) and stop its other batches."""
    store = job_store()
    details = error_details(exc, stage, batch)
    applied, _ = store.update(export_id, status=FAILED, error=details, completed_at=utc_now(),
                              message=details["message"])
    if applied:
        store.request_stop(export_id, "failed")
    log.error("stage failed", error=details["error"], message=details["message"], file=details["file"],
              frame=details["frame"], exc_info=not isinstance(exc, InputError))


class ExportStopped(Ignore):
    """The task ends without a result because its export was cancelled or has failed elsewhere."""


def stop_here(export_id: str) -> None:
    """This task stops because its export was cancelled or failed elsewhere. A cancelled export loses its
    files (every stopping task removes them, after it has stopped writing); a failed one keeps its finished
    batches staged for a retry."""
    job = job_store().find(export_id)
    if job is None or job.status == CANCELLED:
        remove_export_files(get_settings().export_root, export_id)
    log.info("stage stopped", status=job.status if job else None)
    raise ExportStopped()


def exit_if_stopped(export_id: str) -> None:
    if job_store().stop_requested(export_id):
        stop_here(export_id)


@contextmanager
def export_stage(task, export_id: str, stage: str, batch: int | None = None) -> Iterator[dict[str, Any]]:
    """Run one stage of ``export_id`` in ``task``: bind the log context, exit at once if the export was
    stopped, log the start and the end (with the counts the stage puts in the yielded dict), turn a
    ``CancelledExport`` into a quiet stop, and record any other failure in the job before re-raising it."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(export_id=export_id, stage=stage,
                                           **({"batch": batch} if batch is not None else {}))
    delivery = task.request.delivery_info or {}
    started = time.perf_counter()
    report: dict[str, Any] = {}

    def finished() -> None:
        log.info("stage finished", seconds=round(time.perf_counter() - started, 3), **report)

    try:
        exit_if_stopped(export_id)  # a task that starts after a cancel does nothing
        log.info("stage started", task_id=task.request.id, queue=delivery.get("routing_key"),
                 redelivered=bool(delivery.get("redelivered")))
        yield report
        finished()
    except CancelledExport:
        stop_here(export_id)
    except ExportStopped:
        raise
    except Ignore:  # Task.replace: this task's work is done, the replacement continues it
        finished()
        raise
    except Exception as exc:
        record_failure(export_id, stage, batch, exc)
        raise
    # the context stays bound until the next task starts (celery_app clears it on task_prerun), so that
    # Celery's own "Task ... succeeded/failed" line carries the export id too


@app.task(name="export.discover", bind=True)
def discover(self, export_id: str, project_dir: str, request_json: dict, staging_dir: str, batch_size: int):
    store = job_store()
    with export_stage(self, export_id, "discover") as report:
        applied, before = store.update(export_id, allowed=(PENDING,), status=PROCESSING, step="discover",
                                       started_at=utc_now(), heartbeat=time.time())
        if not applied and not store.heartbeat(export_id, step="discover"):  # redelivered: still processing?
            log.warning("no active job for this export", status=before)
            raise ExportStopped()
        request = ExportRequest.model_validate(request_json)
        found = discover_stage(project_dir, request, staging_dir, export_id=export_id, batch_size=batch_size)
        exit_if_stopped(export_id)
        queue = canvas.queue_for(found.n_frames, get_settings())
        store.heartbeat(export_id, step="convert", n_frames=found.n_frames, n_key_frames=found.n_key_frames,
                        n_batches=found.n_batches, batch_size=batch_size, queue=queue, warnings=found.warnings)
        report.update(frames=found.n_frames, key_frames=found.n_key_frames, batches=found.n_batches,
                      warnings=found.warnings, next_queue=queue)
        return canvas.replace_with_batches(self, export_id, staging_dir, found.n_batches, queue=queue,
                                           priority=request.priority)


@app.task(name="export.convert", bind=True)
def convert(self, export_id: str, staging_dir: str, batch_index: int) -> dict[str, Any]:
    store = job_store()
    with export_stage(self, export_id, "convert", batch_index) as report:
        done = None
        if (self.request.delivery_info or {}).get("redelivered"):  # it may have finished before a crash
            done = read_batch_result(ExportPlan.load(staging_dir), batch_index)
        if done is None:
            last_beat = time.monotonic()

            def on_frame(k: int, n: int, frame_id: str) -> None:
                nonlocal last_beat
                structlog.contextvars.bind_contextvars(frame=frame_id)
                self.update_state(state="PROGRESS", meta={"done": k, "total": n, "frame": frame_id,
                                                          "pid": os.getpid()})
                if time.monotonic() - last_beat >= HEARTBEAT_EVERY:
                    store.heartbeat(export_id)
                    last_beat = time.monotonic()

            done = convert_batch(staging_dir, batch_index, should_stop=StopFlag(store, export_id),
                                 on_frame=on_frame)
            structlog.contextvars.unbind_contextvars("frame")
        exit_if_stopped(export_id)  # cancelled during the last frame: do not report a finished batch
        store.heartbeat(export_id)
        result = {"batch": batch_index, "frames": done.frames, "annotations": done.annotations,
                  "warnings": len(done.warnings)}
        report.update(result)
        return result


@app.task(name="export.merge", bind=True)
def merge(self, batch_results: list[dict[str, Any]], export_id: str, staging_dir: str) -> dict[str, Any]:
    store = job_store()
    with export_stage(self, export_id, "merge") as report:
        store.heartbeat(export_id, step="merge")
        merged = merge_tables(staging_dir)
        exit_if_stopped(export_id)
        store.heartbeat(export_id, frames=merged.frames, annotations=merged.annotations,
                        filtered=merged.filtered, warnings=len(merged.warnings))
        result = {"frames": merged.frames, "annotations": merged.annotations, "counts": merged.counts,
                  "warnings": len(merged.warnings)}
        report.update(frames=merged.frames, annotations=merged.annotations, warnings=len(merged.warnings),
                      filtered=merged.filtered)
        return result


@app.task(name="export.compress", bind=True)
def compress(self, merged: dict[str, Any], export_id: str, staging_dir: str, dest: str) -> dict[str, Any]:
    store = job_store()
    with export_stage(self, export_id, "compress") as report:
        store.heartbeat(export_id, step="compress")
        packed = compress_stage(staging_dir, dest)
        applied, _ = store.update(export_id, allowed=(PROCESSING,), status=COMPLETED, step=None,
                                  completed_at=utc_now(), result_path=packed.path, file_size=packed.size,
                                  progress=100.0, message="Export completed")
        if not applied:  # cancelled while compressing
            stop_here(export_id)
        remove_staging(staging_dir)
        report.update(path=packed.path, size=packed.size, files=packed.files)
        return packed.to_json()
