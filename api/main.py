"""The FastAPI app: ``uvicorn api.main:app`` (OpenAPI UI at ``/docs``).

One export through the API: ``routes/exports.py`` validates the request and calls ``pipeline.service``;
pipeline errors become statuses in ``errors.py``; ``middleware.py`` tags every log line with the request's
``request_id`` and ``export_id``.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import RequestLogMiddleware
from api.routes import exports, health
from pipeline.logging import configure_logging
from pipeline.settings import get_settings


# At import, before uvicorn's first line ("Started server process"), so that every line of the API process goes
# through the one structlog configuration (uvicorn's loggers included), however uvicorn was started.
configure_logging(get_settings().log_format)


@asynccontextmanager
async def lifespan(app: FastAPI):
    configure_logging(get_settings().log_format)  # no-op unless the settings changed since the import
    yield


app = FastAPI(
    title="nextpoints-export",
    summary="Export NextPoints point-cloud annotation projects to nuScenes v1.0 and KITTI, asynchronously.",
    version="0.1.0",
    lifespan=lifespan,
)
app.add_middleware(RequestLogMiddleware)
install_error_handlers(app)
app.include_router(exports.router)
app.include_router(health.router)
