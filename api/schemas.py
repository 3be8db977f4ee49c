"""Response models of the HTTP API (the request body is ``stages.request.ExportRequest``).

Field names follow NextPoints' export API (CELERY_EXPORT_GUIDE.md), so existing clients keep working.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

ExportState = Literal["pending", "processing", "completed", "failed", "cancelled"]


class ExportCreated(BaseModel):
    """Answer to ``POST /api/projects/{project}/export/{format}`` (status 202)."""

    task_id: str = Field(description="the export id: poll, download and cancel with it")
    status: Literal["pending"] = "pending"
    message: str
    created_at: datetime
    estimated_duration: int | None = Field(None, description="rough wall time of the export, in seconds")


class ExportStatus(BaseModel):
    """One export job as ``GET /api/projects/export/tasks/{task_id}`` reports it."""

    task_id: str
    status: ExportState
    progress: float = Field(ge=0, le=100, description="percent done, aggregated over all batches")
    current_step: str | None = None
    message: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    file_size: int | None = Field(None, description="archive size in bytes, once completed")
    total_frames_processed: int | None = None
    total_annotations_exported: int | None = None
    error_details: dict[str, Any] | None = Field(
        None, description="what failed: {error, message, frame, file, stage, batch, attempts}")
    # extras beyond NextPoints' shape
    project: str | None = None
    export_format: str | None = None
    filtered: dict[str, int] | None = Field(None, description="annotations dropped by the filter, per reason")
    warnings: int | None = Field(None, description="non-fatal input problems (missing image, pose...)")
    queue: str | None = Field(None, description="the Celery queue its batches run on")
    priority: int | None = Field(None, ge=0, le=10)
    n_frames: int | None = Field(None, description="frames selected for export (known after discover)")
    n_batches: int | None = Field(None, description="convert tasks (known after discover)")


class ExportList(BaseModel):
    """A page of export jobs, newest first."""

    items: list[ExportStatus]
    total: int = Field(description="number of jobs on record, over all pages")
    offset: int
    limit: int


class Error(BaseModel):
    """Every non-2xx answer: a message, or FastAPI's list of ``{loc, msg, type}`` for a 422."""

    detail: str | list[dict[str, Any]]
