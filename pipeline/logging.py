"""Logging, configured once per process: structlog for our lines, and the standard library's (Celery,
uvicorn, kombu, and Python warnings as ``py.warnings``) routed through the same processors, so every line is
one JSON object (or one console line) carrying the context bound with ``structlog.contextvars``:
``export_id``, ``stage``, ``batch``, ``frame``.

Who binds what: the API's middleware binds ``request_id`` and the request's ``export_id``
(``api/middleware.py``); every task binds ``export_id``, ``stage`` and ``batch`` and, while converting a
frame, ``frame`` (``pipeline/tasks.py``); the CLI binds the ``export_id`` it runs. One export's whole trace,
API to last task, is then ``jq 'select(.export_id == "<id>")'`` over the JSON logs.

Formats: ``json`` in production (``NPX_LOG_FORMAT``, the default of serve, the API and workers), ``console``
(readable, coloured on a terminal) for development and the interactive CLI commands.

The Celery app connects ``configure_logging`` to Celery's ``setup_logging`` signal, so workers and beat use
it instead of Celery's own formatter; uvicorn's loggers are routed to the root handler here, whether uvicorn
was started by ``serve`` or on its own (``uvicorn api.main:app``).
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]

_configured: tuple[str, int] | None = None
# libraries that install handlers of their own: their lines go through the root handler (our renderer) instead
ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "kombu", "tornado", "flower")


# Celery's own lines about our tasks ("Task export.convert[<export_id>-convert-00003] received") are logged
# by the worker's main process, whatever context it has bound; every export task id starts with its export
# id, and that id is the line's.
_EXPORT_TASK = re.compile(r"export\.(?:discover|convert|merge|compress|rerun_batches)\["
                          r"(?P<id>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})")


def add_export_id_from_task_line(logger, name, event_dict):
    if isinstance(event_dict.get("event"), str):
        match = _EXPORT_TASK.search(event_dict["event"])
        if match:
            event_dict["export_id"] = match.group("id")
    return event_dict


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _foreign_processors() -> list:
    """For standard-library records (Celery, kombu, uvicorn): the shared chain, plus the export id found in
    Celery's task lines."""
    return [*_shared_processors(), add_export_id_from_task_line]


def configure_logging(fmt: LogFormat = "json", level: int | str = logging.INFO) -> None:
    """Configure structlog and the root logger. Idempotent: a second call with the same arguments is a no-op."""
    global _configured
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if _configured == (fmt, level):
        _route_libraries()
        return
    structlog.configure(
        # filter_by_level first: a debug line (one per converted frame) costs nothing at INFO
        processors=[structlog.stdlib.filter_by_level, *_shared_processors(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    render = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        render += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        render += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_foreign_processors(), processors=render)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python warnings (Celery's SecurityWarning, deprecations) go to the "py.warnings" logger, hence through
    # the same renderer, instead of as raw text on stderr that breaks the one-JSON-object-per-line logs
    logging.captureWarnings(True)
    _route_libraries()
    _configured = (fmt, level)


def _route_libraries() -> None:
    for name in ROUTED_LOGGERS:
        routed = logging.getLogger(name)
        routed.handlers[:] = []
        routed.propagate = True


def configure_cli_logging(level: int | str = logging.INFO) -> None:
    """For the interactive commands: ``NPX_LOG_FORMAT`` when it is set, else the readable console format."""
    import os

    configure_logging("json" if os.environ.get("NPX_LOG_FORMAT", "").lower() == "json" else "console", level)
