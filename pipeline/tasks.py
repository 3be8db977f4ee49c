"""The export tasks: thin wrappers that run one stage of ``stages/`` for one export.

Every task runs its stage inside ``export_stage(...)``, which binds the log context, exits at once when the
export was cancelled (or failed elsewhere), retries a transient failure with backoff (``pipeline.retry_policy``)
and records any other failure in the job record (error, frame, file, stage, batch, attempts) before re-raising
it. The DAG itself is assembled in ``pipeline.canvas``.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import structlog
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded

from pipeline import canvas
from pipeline.celery_app import app
from pipeline.deliveries import DuplicateDelivery, Execution
from pipeline.jobs import CANCELLED, COMPLETED, PENDING, PROCESSING, StopFlag, job_store, utc_now
from pipeline.paths import remove_export_files
from pipeline.retry_policy import RetryPolicy
from pipeline.settings import get_settings
from stages.compress import compress as compress_stage
from stages.convert import convert_batch, read_batch_result
from stages.discover import discover as discover_stage
from stages.errors import CancelledExport, LocatedError
from stages.merge import merge_tables, remove_staging
from stages.plan import ExportPlan
from stages.request import ExportRequest

log = structlog.get_logger("pipeline.tasks")
HEARTBEAT_EVERY = 5.0  # seconds between heartbeats written by a running batch
LOGGED_WARNINGS_PER_BATCH = 50  # frame warnings logged one per line; the rest are counted in the batch result
# Every export task: when the process running it dies (OOM kill, segfault, SIGKILL), Celery sends it again
# (same id, attempt + 1) after a short delay, up to the task's max_retries (3) more times; a batch that keeps
# killing its worker then fails the export (``_record_lost_task``) instead of being redelivered forever.
EXPORT_TASK = {"bind": True, "retry_on_worker_lost": True, "default_retry_delay": 1}


def error_details(exc: BaseException, stage: str, batch: int | None, attempts: int = 1) -> dict[str, Any]:
    """The job's error report: ``{error, message, frame, file, stage, batch, attempts}``."""
    if isinstance(exc, LocatedError):
        details = exc.to_dict()
    else:
        details = {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                   "frame": getattr(exc, "frame", None), "file": getattr(exc, "filename", None)}
        if isinstance(exc, SoftTimeLimitExceeded):
            details["message"] = f"time limit of {get_settings().task_time_limit} s exceeded"
    if details["frame"] is None:  # e.g. a time limit: the frame being converted when it struck
        details["frame"] = structlog.contextvars.get_contextvars().get("frame")
    return {**details, "stage": stage, "batch": batch, "attempts": attempts}


def record_failure(export_id: str, stage: str, batch: int | None, exc: BaseException, attempts: int = 1) -> None:
    """End the job ``failed`` with the error (first failure wins) and stop its other batches."""
    details = error_details(exc, stage, batch, attempts)
    job_store().fail(export_id, details)
    log.error("stage failed", error=details["error"], message=details["message"], file=details["file"],
              frame=details["frame"], attempts=attempts, exc_info=not isinstance(exc, LocatedError))


def retry_policy_of(export_id: str) -> RetryPolicy:
    """The export's automatic-retry policy; the service-wide one when Redis cannot tell (it may be the very
    error being retried)."""
    try:
        stored = job_store().retry_policy(export_id)
    except Exception:  # noqa: BLE001 - a policy is needed even when Redis is down
        stored = None
    return RetryPolicy.from_json(stored)


class ExportStopped(Ignore):
    """The task ends without a result because its export was cancelled or has failed elsewhere."""


def stop_here(export_id: str, how: str = "at a checkpoint") -> None:
    """This task stops because its export was cancelled or failed elsewhere (``how``, logged: "at a
    checkpoint" between steps, "at the next frame" inside a batch, "after an error" its stop caused). A
    cancelled export loses its files (every stopping task removes them, after it has stopped writing); a
    failed one keeps its finished batches staged for a retry."""
    job = job_store().find(export_id)
    if job is None or job.status == CANCELLED:
        remove_export_files(get_settings().export_root, export_id)
    log.info("stage stopped", status=job.status if job else None, how=how)
    raise ExportStopped()


def exit_if_stopped(export_id: str) -> None:
    if job_store().stop_requested(export_id):
        stop_here(export_id)


@contextmanager
def export_stage(task, export_id: str, stage: str, batch: int | None = None) -> Iterator[dict[str, Any]]:
    """Run one stage of ``export_id`` in ``task``: bind the log context, exit at once if the export was
    stopped, log the start and the end (with the counts the stage puts in the yielded dict), turn a
    ``CancelledExport`` into a quiet stop, retry a transient error (``Task.retry``: same task id, after the
    policy's backoff) while the export's retry policy allows, and record any other failure in the job before
    re-raising it."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(export_id=export_id, stage=stage,
                                           **({"batch": batch} if batch is not None else {}))
    delivery = task.request.delivery_info or {}
    retries = task.request.retries or 0
    started = time.perf_counter()
    report: dict[str, Any] = {}
    execution = Execution(job_store(), export_id, task)
    succeeded = False

    def finished() -> None:
        nonlocal succeeded
        succeeded = True
        log.info("stage finished", seconds=round(time.perf_counter() - started, 3), **report)

    try:
        execution.claim()  # one execution per task: a second delivery of it is dropped or deferred
        exit_if_stopped(export_id)  # a task that starts after a cancel does nothing
        log.info("stage started", task_id=task.request.id, queue=delivery.get("routing_key"),
                 redelivered=bool(delivery.get("redelivered")), attempt=retries + 1)
        yield report
        finished()
    except CancelledExport:
        stop_here(export_id, "at the next frame")
    except (ExportStopped, DuplicateDelivery):
        raise
    except Ignore:  # Task.replace: this task's work is done, the replacement continues it
        finished()
        raise
    except Exception as exc:
        if _stopped(export_id):  # cancelled (its files vanish under running batches) or failed elsewhere
            stop_here(export_id, "after an error")
        policy = retry_policy_of(export_id)
        if policy.should_retry(exc, retries):
            countdown = policy.countdown(retries)
            log.warning("stage retrying", error=type(exc).__name__, message=str(exc), attempt=retries + 1,
                        max_attempts=policy.max_retries + 1, next_attempt_in_s=countdown,
                        **_located(exc))
            raise task.retry(exc=exc, countdown=countdown, max_retries=policy.max_retries)
        record_failure(export_id, stage, batch, exc, attempts=retries + 1)
        raise
    finally:
        execution.release(done=succeeded)
    # the context stays bound until the next task starts (celery_app clears it on task_prerun), so that
    # Celery's own "Task ... succeeded/failed" line carries the export id too


def _stopped(export_id: str) -> bool:
    """Was the export cancelled or has it failed elsewhere? Then an error of its task is neither retried nor
    reported: files vanishing under a cancelled batch are the cancel at work, and the first failure is the one
    the job reports. (False when Redis cannot tell.)"""
    try:
        return job_store().stop_requested(export_id)
    except Exception:  # noqa: BLE001
        return False


def _located(exc: BaseException) -> dict[str, Any]:
    """The frame and file an error names, for a log line (nothing when it names none)."""
    if isinstance(exc, LocatedError):
        return {k: v for k, v in (("frame", exc.frame), ("file", exc.path)) if v is not None}
    return {}


@app.task(name="export.discover", **EXPORT_TASK)
def discover(self, export_id: str, project_dir: str, request_json: dict, staging_dir: str, batch_size: int,
             queue: str | None = None, layout: str | None = None, source_settings: dict[str, Any] | None = None,
             mapping_overrides: dict[str, Any] | None = None):
    """Plan the export, then become the chord of its batches on ``queue`` (None = by frame count)."""
    store = job_store()
    with export_stage(self, export_id, "discover") as report:
        applied, before = store.update(export_id, allowed=(PENDING,), status=PROCESSING, step="discover",
                                       started_at=utc_now(), heartbeat=time.time())
        if not applied and not store.heartbeat(export_id, step="discover"):  # redelivered: still processing?
            log.warning("no active job for this export", status=before)
            raise ExportStopped()
        request = ExportRequest.model_validate(request_json)
        found = discover_stage(project_dir, request, staging_dir, export_id=export_id, batch_size=batch_size,
                               layout=layout, source_settings=source_settings, mapping_overrides=mapping_overrides)
        exit_if_stopped(export_id)
        queue = queue or canvas.queue_for(found.n_frames, get_settings())
        store.heartbeat(export_id, step="convert", n_frames=found.n_frames, n_key_frames=found.n_key_frames,
                        n_batches=found.n_batches, batch_size=batch_size, queue=queue, warnings=found.warnings)
        report.update(frames=found.n_frames, key_frames=found.n_key_frames, batches=found.n_batches,
                      warnings=found.warnings, next_queue=queue)
        return canvas.replace_with_batches(self, export_id, staging_dir, range(found.n_batches), queue=queue,
                                           priority=request.priority)


@app.task(name="export.rerun_batches", **EXPORT_TASK)
def rerun_batches(self, export_id: str, staging_dir: str, batches: list[int], queue: str, priority: int):
    """The start of a rerun from convert (``service.retry_export``): become the chord of ``batches``."""
    with export_stage(self, export_id, "rerun") as report:
        report.update(batches=batches)
        return canvas.replace_with_batches(self, export_id, staging_dir, batches, queue=queue, priority=priority)


@app.task(name="export.convert", **EXPORT_TASK)
def convert(self, export_id: str, staging_dir: str, batch_index: int) -> dict[str, Any]:
    store = job_store()
    with export_stage(self, export_id, "convert", batch_index) as report:
        done = None
        if (self.request.delivery_info or {}).get("redelivered"):  # it may have finished before a crash
            done = read_batch_result(ExportPlan.load(staging_dir), batch_index)
        if done is None:
            last_beat = time.monotonic()

            def on_frame_start(frame_id: str) -> None:  # what is logged while converting it names the frame
                structlog.contextvars.bind_contextvars(frame=frame_id)
                store.note_frame(export_id, batch_index, frame_id)

            def on_frame(k: int, n: int, frame_id: str) -> None:
                nonlocal last_beat
                log.debug("frame converted", done=k, total=n)
                self.update_state(state="PROGRESS", meta={"done": k, "total": n, "frame": frame_id,
                                                          "pid": os.getpid()})
                if time.monotonic() - last_beat >= HEARTBEAT_EVERY:
                    store.heartbeat(export_id)
                    last_beat = time.monotonic()

            done = convert_batch(staging_dir, batch_index, should_stop=StopFlag(store, export_id),
                                 on_frame_start=on_frame_start, on_frame=on_frame)
            structlog.contextvars.unbind_contextvars("frame")
            log_frame_warnings(done.warnings)
        exit_if_stopped(export_id)  # cancelled during the last frame: do not report a finished batch
        store.heartbeat(export_id)
        result = {"batch": batch_index, "frames": done.frames, "annotations": done.annotations,
                  "warnings": len(done.warnings)}
        report.update(result)
        return result


@signals.task_failure.connect
def _record_lost_task(sender=None, task_id: str | None = None, exception: BaseException | None = None,
                      **_kwargs) -> None:
    """Failures the task itself never sees, reported by the worker's main process: the hard time limit
    killed it, or its process died once more than its retries allow (``EXPORT_TASK``). End the export
    ``failed`` naming the stage, the batch and the frame it was converting, so that no job waits for a task
    that will not come back."""
    if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)) or task_id is None:
        return
    stage = (getattr(sender, "name", "") or "").removeprefix("export.")
    if stage not in ("discover", "rerun_batches", "convert", "merge", "compress"):
        return
    export_id, batch = canvas.parse_task_id(task_id)
    # the main process goes on receiving other exports' tasks: the context is this report's only
    with structlog.contextvars.bound_contextvars(export_id=export_id, stage=stage,
                                                 **({"batch": batch} if batch is not None else {})):
        _fail_lost_task(export_id, stage, batch, sender, exception)


def _fail_lost_task(export_id: str, stage: str, batch: int | None, sender, exception: BaseException) -> None:
    store = job_store()
    attempts = (getattr(getattr(sender, "request", None), "retries", 0) or 0) + 1
    if isinstance(exception, TimeLimitExceeded):
        problem = f"hard time limit of {get_settings().task_time_limit} s exceeded"
    else:
        problem = f"the worker process running it died ({exception}), {attempts} time(s)"
    details = {"error": type(exception).__name__, "message": problem,
               "frame": store.frame_of(export_id, batch) if batch is not None else None, "file": None,
               "stage": stage, "batch": batch, "attempts": attempts}
    if store.fail(export_id, details):
        log.error("stage failed", error=details["error"], message=problem, frame=details["frame"],
                  attempts=attempts)


def log_frame_warnings(warnings: list[dict[str, Any]]) -> None:
    """One line per frame warning (missing image, ...), naming its frame; at most LOGGED_WARNINGS_PER_BATCH."""
    for warning in warnings[:LOGGED_WARNINGS_PER_BATCH]:
        log.info("frame warning", frame=warning.get("frame"), warning=warning.get("warning"))
    if len(warnings) > LOGGED_WARNINGS_PER_BATCH:
        log.info("frame warnings not logged", count=len(warnings) - LOGGED_WARNINGS_PER_BATCH)


@app.task(name="export.merge", **EXPORT_TASK)
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


@app.task(name="export.compress", **EXPORT_TASK)
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
