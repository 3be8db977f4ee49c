"""The facade the HTTP API (and the CLI) calls: start, poll, cancel, list and download exports.

Errors are ``pipeline.errors`` exceptions: ``ProjectNotFound``/``JobNotFound`` (404), ``JobNotCancellable``/
``ExportNotReady`` (409), ``InvalidExportRequest`` (422).
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import structlog

from pipeline import canvas, progress
from pipeline.celery_app import app
from pipeline.errors import ExportNotReady, InvalidExportRequest, JobNotCancellable, JobNotFound, ProjectNotFound
from pipeline.jobs import ACTIVE, CANCELLED, COMPLETED, FINISHED, PENDING, ExportJob, job_store, utc_now
from pipeline.paths import archive_for, project_dir as find_project_dir, remove_export_files, staging_for
from pipeline.settings import get_settings
from stages.errors import InputError
from stages.formats import get_format
from stages.request import ExportFormatName, ExportRequest
from stages.sources import open_project

log = structlog.get_logger("pipeline.service")

# names a caller may use for a format, besides the request's enum values
FORMAT_ALIASES = {"nuscenes": ExportFormatName.nuscenes.value, "kitti": ExportFormatName.kitti.value}

# rough cost model for ``estimated_duration`` (seconds): fixed overhead + per frame, divided over workers
_OVERHEAD_S, _PER_FRAME_S = 3.0, 0.15


def estimate_duration(n_frames: int, workers: int | None = None) -> int:
    """A rough wall time in seconds for exporting ``n_frames`` frames with ``workers`` worker processes."""
    workers = max(1, workers or get_settings().worker_concurrency)
    return int(math.ceil(_OVERHEAD_S + _PER_FRAME_S * max(0, n_frames) / workers))


def _with_format(request: ExportRequest, export_format: str | None) -> ExportRequest:
    if export_format is None:
        return request
    name = FORMAT_ALIASES.get(export_format, export_format)
    try:
        fmt = ExportFormatName(name)
    except ValueError:
        known = sorted({*FORMAT_ALIASES, *(f.value for f in ExportFormatName)})
        raise InvalidExportRequest("export_format", f"unknown format {export_format!r}; known: {known}") from None
    return request.model_copy(update={"export_format": fmt})


def _check_request(request: ExportRequest) -> None:
    try:
        get_format(request.export_format.value).check_request(request)
    except ValueError as err:
        raise InvalidExportRequest(getattr(err, "field", None) or "request", str(err)) from None


def _expected_frames(project_dir: Path, request: ExportRequest) -> int:
    """Frames the request will select, from a directory listing (for ``estimated_duration``)."""
    try:
        n = len(open_project(project_dir).frames())
    except InputError as err:
        raise InvalidExportRequest("project", str(err)) from None
    n = math.ceil(n / request.frame_step)
    return min(n, request.max_frames) if request.max_frames else n


def start_export(project: str, request: ExportRequest, *, export_format: str | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
    """Validate, record the job ``pending`` and start its workflow. Returns the new job's status, plus
    ``estimated_duration`` (seconds). ``batch_size`` (frames per convert task) defaults to NPX_BATCH_SIZE."""
    settings = get_settings()
    batch_size = batch_size or settings.batch_size
    request = _with_format(request, export_format)
    source_dir = find_project_dir(settings.data_root, project)
    if source_dir is None:
        raise ProjectNotFound(project)
    _check_request(request)
    n_frames = _expected_frames(source_dir, request)

    export_id = str(uuid.uuid4())
    request_json = request.model_dump(mode="json")
    job = ExportJob(export_id=export_id, project=project, export_format=request.export_format.value,
                    request=request_json, priority=request.priority, batch_size=batch_size,
                    message="Export queued")
    store = job_store()
    store.create(job)
    workflow = canvas.export_workflow(
        export_id, source_dir, request_json, staging_dir=staging_for(settings.export_root, export_id),
        archive=archive_for(settings.export_root, export_id, request), batch_size=batch_size,
        priority=request.priority)
    try:
        workflow.apply_async()
    except Exception as exc:
        store.delete(export_id)
        raise RuntimeError(f"could not queue export {export_id}: {exc}") from exc
    log.info("export queued", export_id=export_id, project=project, export_format=job.export_format,
             expected_frames=n_frames)
    return {**status_of(job, progress.compute(job, None)), "estimated_duration": estimate_duration(n_frames)}


def status_of(job: ExportJob, now: progress.Progress) -> dict[str, Any]:
    """The status dict of a job (the API's ExportStatus shape)."""
    if job.status == COMPLETED:
        message = f"Export completed: {job.frames or 0} frames, {job.annotations or 0} annotations"
    elif job.status in FINISHED or job.status == PENDING:
        message = job.message or job.status
    else:
        message = now.current_step
    return {
        "task_id": job.export_id, "status": job.status, "progress": now.progress,
        "current_step": now.current_step, "message": message,
        "created_at": job.created_at, "started_at": job.started_at, "completed_at": job.completed_at,
        "file_size": job.file_size,
        "total_frames_processed": job.frames if job.frames is not None else now.frames_done,
        "total_annotations_exported": job.annotations if job.annotations is not None else now.annotations,
        "error_details": job.error,
        "project": job.project, "export_format": job.export_format, "filtered": job.filtered,
        "warnings": job.warnings, "queue": job.queue, "priority": job.priority,
        "n_frames": job.n_frames, "n_batches": job.n_batches,
    }


def export_status(export_id: str) -> dict[str, Any]:
    """The live status of an export: a constant number of Redis round trips, however many batches."""
    job, now = progress.current(job_store(), app.backend, export_id)
    if job is None:
        raise JobNotFound(export_id)
    return status_of(job, now)


def cancel_export(export_id: str) -> dict[str, Any]:
    """Cancel a pending or processing export: its tasks stop (queued ones are revoked, running batches stop at
    the next frame), its files are removed, and the job ends ``cancelled`` now. ``JobNotCancellable`` once
    it has finished."""
    store = job_store()
    job = store.get(export_id)
    if job.finished:
        raise JobNotCancellable(export_id, job.status)
    store.request_stop(export_id, "cancelled")  # first, so that no task starts new work from here on
    applied, before = store.update(export_id, allowed=ACTIVE, status=CANCELLED, completed_at=utc_now(),
                                   message="Export cancelled")
    if not applied:
        if before is None:
            raise JobNotFound(export_id)
        raise JobNotCancellable(export_id, before)
    app.control.revoke(canvas.task_ids(export_id, job.n_batches))
    remove_export_files(get_settings().export_root, export_id)  # the stopping tasks remove what they add later
    log.info("export cancelled", export_id=export_id, was=before)
    return export_status(export_id)


def list_exports(offset: int = 0, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
    """A page of exports, newest first, and the total number on record. Progress is each job's stored
    high-water mark (a listing reads no batch results)."""
    jobs, total = job_store().page(offset, limit)
    return [status_of(job, progress.compute(job, None)) for job in jobs], total


def archive_for_download(export_id: str) -> Path:
    """The archive of a completed export (a folder for ``compress_output: false``)."""
    job = job_store().get(export_id)
    if job.status != COMPLETED or not job.result_path:
        raise ExportNotReady(export_id, job.status)
    path = Path(job.result_path)
    if not path.exists():
        raise JobNotFound(export_id)  # completed, but the archive was cleaned up meanwhile
    return path
