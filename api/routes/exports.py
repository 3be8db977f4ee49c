"""Export endpoints, shaped like NextPoints' export API (CELERY_EXPORT_GUIDE.md).

Each handler validates, calls one ``pipeline.service`` function and shapes its answer. Pipeline errors
become HTTP statuses in ``api/errors.py``. Handlers are sync: the pipeline calls block on Redis, so FastAPI
runs them in its thread pool.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse

from api.deps import bind_export_id
from api.middleware import EXPORT_ID_HEADER
from api.schemas import Error, ExportCreated, ExportList, ExportStatus
from pipeline import service
from stages.request import ExportFormatName, ExportRequest

router = APIRouter(prefix="/api/projects", tags=["exports"], dependencies=[Depends(bind_export_id)])

ProjectName = Annotated[str, Path(description="the project's folder name under the data root")]
TaskId = Annotated[str, Path(description="the export id returned by the POST")]
RequestBody = Annotated[ExportRequest, Body(description="what to export; unknown keys are rejected")]

NOT_FOUND = {404: {"model": Error, "description": "unknown project or export"}}
CONFLICT = {409: {"model": Error}}
MEDIA_TYPES = {".zip": "application/zip", ".gz": "application/gzip", ".zst": "application/zstd"}


def _start(project: str, request: ExportRequest, export_format: ExportFormatName,
           response: Response) -> ExportCreated:
    """The path fixes the format; a body that asks for another one is a mistake, not a choice."""
    if "export_format" in request.model_fields_set and request.export_format != export_format:
        raise RequestValidationError([{
            "loc": ("body", "export_format"), "type": "value_error", "input": request.export_format.value,
            "msg": f"this endpoint exports {export_format.value!r}; "
                   f"drop export_format or use the {request.export_format.name} endpoint"}])
    job = service.start_export(project, request, export_format=export_format.value)
    response.headers[EXPORT_ID_HEADER] = job["task_id"]  # the request log middleware tags its lines with it
    return ExportCreated(**job)


@router.post("/{project}/export/nuscenes", status_code=status.HTTP_202_ACCEPTED, response_model=ExportCreated,
             responses=NOT_FOUND, summary="Start a nuScenes v1.0 export")
def export_nuscenes(project: ProjectName, request: RequestBody, response: Response) -> ExportCreated:
    return _start(project, request, ExportFormatName.nuscenes, response)


@router.post("/{project}/export/kitti", status_code=status.HTTP_202_ACCEPTED, response_model=ExportCreated,
             responses=NOT_FOUND, summary="Start a KITTI 3D object export")
def export_kitti(project: ProjectName, request: RequestBody, response: Response) -> ExportCreated:
    return _start(project, request, ExportFormatName.kitti, response)


@router.get("/export/tasks", response_model=ExportList, summary="List exports, newest first")
def list_exports(offset: Annotated[int, Query(ge=0)] = 0,
                 limit: Annotated[int, Query(ge=1, le=500)] = 50) -> ExportList:
    items, total = service.list_exports(offset=offset, limit=limit)
    return ExportList(items=items, total=total, offset=offset, limit=limit)


@router.get("/export/tasks/{task_id}", response_model=ExportStatus, responses=NOT_FOUND,
            summary="Status and progress of one export")
def export_status(task_id: TaskId) -> dict:
    return service.export_status(task_id)


@router.delete("/export/tasks/{task_id}", response_model=ExportStatus, responses={**NOT_FOUND, **CONFLICT},
               summary="Cancel an export (409 once it has finished)")
def cancel_export(task_id: TaskId) -> dict:
    return service.cancel_export(task_id)


@router.get("/export/download/{task_id}", response_class=FileResponse, responses={**NOT_FOUND, **CONFLICT},
            summary="Download the archive of a completed export (409 before completion)")
def download_export(task_id: TaskId) -> FileResponse:
    archive, filename = service.download(task_id)
    if archive.is_dir():
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"export {task_id} was made with compress_output=false: its output is a folder "
                            "on the server (under the export root), not an archive to download")
    return FileResponse(archive, filename=filename,
                        media_type=MEDIA_TYPES.get(archive.suffix, "application/octet-stream"))
