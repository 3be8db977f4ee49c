"""Request logging: every API log line carries a ``request_id``, and ``export_id`` once the request names one.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) so the app runs in this middleware's task and context:
what it binds is seen by the routes and by the pipeline functions they call, and by uvicorn's access line,
which is logged when the response starts (from within our ``send``).
"""
from __future__ import annotations

import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("api")

REQUEST_ID_HEADER = b"x-request-id"
EXPORT_ID_HEADER = "X-Export-ID"  # set by the routes that create an export (routes/exports.py)
_EXPORT_ID_KEY = EXPORT_ID_HEADER.lower().encode("latin-1")
_MAX_REQUEST_ID = 64


class RequestLogMiddleware:
    """Binds ``request_id`` (the client's ``X-Request-ID`` or a fresh one, echoed back) for the whole request,
    and ``export_id`` from the path's ``task_id`` (``deps.bind_export_id``) or, for a created export, from the
    response's ``X-Export-ID`` header as soon as the response starts; then logs one ``request`` line with
    method, path, status and duration."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()  # a fresh context per request (structlog's web recipe)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"").decode("latin-1")[:_MAX_REQUEST_ID]
        request_id = given or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)

        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                created = next((v for k, v in headers if k.lower() == _EXPORT_ID_KEY), None)
                if created:  # the 202 of a new export: from here on, this request's lines are that export's
                    structlog.contextvars.bind_contextvars(export_id=created.decode("latin-1"))
                message["headers"] = [*headers, (REQUEST_ID_HEADER, request_id.encode("latin-1"))]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            export_id = scope.get("path_params", {}).get("task_id")
            if export_id:
                structlog.contextvars.bind_contextvars(export_id=export_id)
            log.info("request", method=scope["method"], path=scope["path"], status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))
