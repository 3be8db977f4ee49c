"""The one place where pipeline errors become HTTP statuses (routes just let them propagate)."""
from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from pipeline.errors import (ExportNotReady, InvalidExportRequest, JobNotCancellable, JobNotFound, JobNotRetryable,
                             PipelineError, ProjectNotFound)

STATUS_OF: dict[type[PipelineError], int] = {
    ProjectNotFound: status.HTTP_404_NOT_FOUND,
    JobNotFound: status.HTTP_404_NOT_FOUND,
    JobNotCancellable: status.HTTP_409_CONFLICT,
    ExportNotReady: status.HTTP_409_CONFLICT,
    JobNotRetryable: status.HTTP_409_CONFLICT,  # for a retry route; the CLI is the only caller so far
}


def _detail_with(status_code: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_code)

    return handler


# InvalidExportRequest fields that name a path parameter rather than a body field
PATH_FIELDS = {"project"}


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """Shaped like FastAPI's own 422s (``loc`` names the field), so clients handle one format."""
    assert isinstance(exc, InvalidExportRequest)
    where = "path" if exc.field in PATH_FIELDS else "body"
    error = {"loc": [where, *exc.field.split(".")], "msg": exc.reason, "type": "value_error"}
    return JSONResponse({"detail": [error]}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def install_error_handlers(app: FastAPI) -> None:
    for error, status_code in STATUS_OF.items():
        app.add_exception_handler(error, _detail_with(status_code))
    app.add_exception_handler(InvalidExportRequest, _invalid_request)
