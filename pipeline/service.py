"""The facade the HTTP API (and the CLI) calls: start, poll, cancel, list, download and rerun exports.

Errors are ``pipeline.errors`` exceptions: ``ProjectNotFound``/``JobNotFound`` (404), ``JobNotCancellable``/
``ExportNotReady``/``JobNotRetryable`` (409), ``InvalidExportRequest`` (422).
"""
from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pipeline import canvas, progress
from pipeline.celery_app import app
from pipeline.errors import (ExportNotReady, InvalidExportRequest, JobNotCancellable, JobNotFound, JobNotRetryable,
                             ProjectNotFound)
from pipeline.jobs import (ACTIVE, CANCELLED, COMPLETED, FAILED, FINISHED, PENDING, PROCESSING, ExportJob, job_store,
                           utc_now)
from pipeline.paths import archive_for, project_dir as find_project_dir, remove_export_files, staging_for
from pipeline.retry_policy import RetryPolicy
from pipeline.settings import get_settings
from stages.convert import missing_batches
from stages.discover import load_mapping_for
from stages.errors import InputError
from stages.formats import get_format
from stages.request import ExportFormatName, ExportRequest
from stages.plan import MERGE_FILE, ExportPlan
from stages.sources import open_project

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

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


def _expected_frames(project_dir: Path, request: ExportRequest, layout: str | None = None,
                     source_settings: dict[str, Any] | None = None) -> int:
    """Frames the request will select, from a directory listing (for ``estimated_duration``); also checks that
    the project opens with this layout and these source settings."""
    try:
        n = len(open_project(project_dir, source_settings, layout=layout).frames())
    except (InputError, ValueError) as err:
        raise InvalidExportRequest("project", str(err)) from None
    n = math.ceil(n / request.frame_step)
    return min(n, request.max_frames) if request.max_frames else n


def start_export(project: str, request: ExportRequest, *, export_format: str | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
    """Validate, record the job ``pending`` and start its workflow. Returns the new job's status, plus
    ``estimated_duration`` (seconds). ``batch_size`` (frames per convert task) defaults to NPX_BATCH_SIZE."""
    settings = get_settings()
    request = _with_format(request, export_format)
    source_dir = find_project_dir(settings.data_root, project)
    if source_dir is None:
        raise ProjectNotFound(project)
    return _queue_export(project, source_dir, request, batch_size=batch_size or settings.batch_size)


def start_configured_export(config: "PipelineConfig") -> dict[str, Any]:
    """Start the export a pipeline config describes (``pipeline.config``): its project (by name or path, a
    relative path under the data root), layout and source settings, request, batch size, queue, retry policy
    and mapping overrides. Same answer as ``start_export``."""
    settings = get_settings()
    project, source_dir = config.project.locate(settings.data_root)
    if config.mappings:  # load_config checked them already; a config built in code is checked here
        try:
            load_mapping_for(get_format(config.export.export_format.value), config.project.layout, config.mappings)
        except ValueError as err:
            raise InvalidExportRequest("mappings", str(err)) from None
    source = {"layout": config.project.layout, "source_settings": config.project.source_settings or None,
              "mapping_overrides": config.mappings or None}
    return _queue_export(project, source_dir, config.export, batch_size=config.batch_size or settings.batch_size,
                         queue=config.queue_name, source={k: v for k, v in source.items() if v},
                         retry=config.retry_policy(settings))


def _queue_export(project: str, source_dir: Path, request: ExportRequest, *, batch_size: int,
                  queue: str | None = None, source: dict[str, Any] | None = None,
                  retry: RetryPolicy | None = None) -> dict[str, Any]:
    """Check, record the job ``pending`` and send its workflow (``canvas.export_workflow``)."""
    settings = get_settings()
    source = source or {}
    _check_request(request)
    n_frames = _expected_frames(source_dir, request, source.get("layout"), source.get("source_settings"))

    export_id = str(uuid.uuid4())
    request_json = request.model_dump(mode="json")
    job = ExportJob(export_id=export_id, project=project, export_format=request.export_format.value,
                    request=request_json, priority=request.priority, batch_size=batch_size, queue=queue,
                    retry_policy=retry.to_json() if retry else None, message="Export queued")
    store = job_store()
    store.create(job)
    workflow = canvas.export_workflow(
        export_id, source_dir, request_json, staging_dir=staging_for(settings.export_root, export_id),
        archive=archive_for(settings.export_root, export_id, request), batch_size=batch_size,
        priority=request.priority, queue=queue, source=source)
    try:
        workflow.apply_async()
    except Exception as exc:
        store.delete(export_id)
        raise RuntimeError(f"could not queue export {export_id}: {exc}") from exc
    log.info("export queued", export_id=export_id, project=project, export_format=job.export_format,
             expected_frames=n_frames, batch_size=batch_size, queue=queue or "auto")
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


def retry_export(export_id: str, stage: str, all_batches: bool = False) -> dict[str, Any]:
    """Rerun a failed export from ``stage`` (convert | merge | compress) over its staged files: the job goes
    back to ``processing`` (error cleared, stop flag lifted) and ends ``completed`` or ``failed`` again.

    - ``convert``: the batches that have no staged result (the one that failed and those it stopped), never
      one that succeeded, or with ``all_batches`` every batch again (e.g. after the input was fixed in
      several places); then merge and compress. (Nothing to convert left: it starts at merge.)
    - ``merge``: merge then compress; every batch must have its staged result. No batch is touched.
    - ``compress``: compress only, from the merged tables.

    ``JobNotRetryable`` when the export has not failed, or its staged files do not allow that stage. (The
    failed run's other batches stop at their next frame once it failed; a batch still finishing meanwhile only
    rewrites its own folder, atomically, with the same content.)
    """
    if stage not in canvas.RERUN_STAGES:
        raise InvalidExportRequest("stage", f"must be one of {', '.join(canvas.RERUN_STAGES)}, got {stage!r}")
    settings = get_settings()
    store = job_store()
    job = store.get(export_id)
    if job.status != FAILED:
        raise JobNotRetryable(export_id, f"it is {job.status}: only failed exports can be rerun")
    staging = staging_for(settings.export_root, export_id)
    try:
        plan = ExportPlan.load(staging)
    except FileNotFoundError:
        raise JobNotRetryable(export_id, f"its plan is not staged ({staging}): it failed in discover or its "
                                         "files were cleaned up; start a new export") from None
    missing = missing_batches(plan)
    if stage == "convert":
        batches = list(range(len(plan.batches))) if all_batches else missing
    elif missing:
        raise JobNotRetryable(export_id, f"batches {missing[:10]} have no staged result: "
                                         "rerun from convert")
    else:
        batches = []
    if stage == "compress" and not (staging / MERGE_FILE).is_file():
        raise JobNotRetryable(export_id, "its tables were not merged: rerun from merge")

    request = ExportRequest.model_validate(job.request)
    queue = job.queue or canvas.queue_for(len(plan.frames), settings)
    workflow = canvas.rerun_workflow(export_id, stage, staging_dir=staging,
                                     archive=archive_for(settings.export_root, export_id, request),
                                     batches=batches, queue=queue, priority=job.priority or request.priority)
    store.clear_stop(export_id)
    store.forget_done(export_id)  # the rerun's tasks keep their ids: they must run again
    applied, before = store.update(export_id, allowed=(FAILED,), status=PROCESSING,
                                   step="convert" if batches else ("compress" if stage == "compress" else "merge"),
                                   error=None, completed_at=None, heartbeat=round(time.time(), 3),
                                   message=f"Rerun from {stage}", reruns=(job.reruns or 0) + 1, rerun_stage=stage,
                                   queue=queue)
    if not applied:
        raise JobNotRetryable(export_id, f"it is {before or 'gone'}: only failed exports can be rerun")
    try:
        workflow.apply_async()
    except Exception as exc:
        store.update(export_id, allowed=(PROCESSING,), status=FAILED, error=job.error, message=job.message,
                     completed_at=utc_now())
        store.request_stop(export_id, FAILED)  # as every failed job: nothing of it may run on
        raise RuntimeError(f"could not queue the rerun of export {export_id}: {exc}") from exc
    log.info("export rerun", export_id=export_id, stage=stage, all_batches=all_batches, batches=len(batches),
             staged_batches=len(plan.batches) - len(missing), queue=queue)
    return export_status(export_id)


def list_exports(offset: int = 0, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
    """A page of exports, newest first, and the total number on record. Progress is each job's stored
    high-water mark (a listing reads no batch results)."""
    jobs, total = job_store().page(offset, limit)
    return [status_of(job, progress.compute(job, None)) for job in jobs], total


def archive_for_download(export_id: str) -> Path:
    """The archive of a completed export (a folder for ``compress_output: false``)."""
    return download(export_id)[0]


def download(export_id: str) -> tuple[Path, str]:
    """The archive of a completed export (a folder for ``compress_output: false``) and the file name it is
    offered under, ``<project>_<archive name>``, from one read of the job record."""
    job = job_store().get(export_id)
    if job.status != COMPLETED or not job.result_path:
        raise ExportNotReady(export_id, job.status)
    path = Path(job.result_path)
    if not path.exists():
        raise JobNotFound(export_id)  # completed, but the archive was cleaned up meanwhile
    return path, f"{job.project}_{path.name}"


def ping() -> None:
    """Raise unless the pipeline's Redis (broker, result backend, job records) answers."""
    job_store().client.ping()
