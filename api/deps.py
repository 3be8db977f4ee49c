"""Dependencies shared by the routes.

There is no settings dependency on purpose: the routes never read settings, ``pipeline.service`` reads the one
``pipeline.settings.Settings`` itself (and the app's lifespan reads the log format from it).
"""
from __future__ import annotations

import structlog
from fastapi import Request


async def bind_export_id(request: Request) -> None:
    """Bind the path's ``task_id`` as ``export_id``, so the pipeline's log lines during this request carry it.

    Async on purpose: it runs in the request's own task, whose context the (sync) handler's thread copies.
    """
    task_id = request.path_params.get("task_id")
    if task_id is not None:
        structlog.contextvars.bind_contextvars(export_id=task_id)
