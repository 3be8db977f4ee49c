"""Request logging: every API log line carries a ``request_id``, and ``export_id`` once the request names one.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) so the app runs in this middleware's task and context:
what it binds is seen by the routes and by the pipeline functions they call.
"""
from __future__ import annotations

import json
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("api")

REQUEST_ID_HEADER = b"x-request-id"
_MAX_REQUEST_ID = 64


class RequestLogMiddleware:
    """Binds ``request_id`` (the client's ``X-Request-ID`` or a fresh one, echoed back) for the whole request,
    and ``export_id`` from the path's ``task_id`` or, for a created export (202), from the response's
    ``task_id``; then logs one ``request`` line with method, path, status and duration."""

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
        created_body: list[bytes] | None = None  # body of a 202, which names the new export

        async def send_and_watch(message: Message) -> None:
            nonlocal status, created_body
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode("latin-1"))]
                if status == 202:
                    created_body = []
            elif message["type"] == "http.response.body" and created_body is not None:
                created_body.append(message.get("body", b""))
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            export_id = scope.get("path_params", {}).get("task_id") or _task_id_of(created_body)
            if export_id:
                structlog.contextvars.bind_contextvars(export_id=export_id)
            log.info("request", method=scope["method"], path=scope["path"], status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))


def _task_id_of(body: list[bytes] | None) -> str | None:
    if not body:
        return None
    try:
        task_id = json.loads(b"".join(body)).get("task_id")
    except (ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None
