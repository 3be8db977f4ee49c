"""Logging, configured once per process: structlog for our lines, and the standard library's (Celery,
uvicorn, kombu) routed through the same processors, so every line is one JSON object (or one console line)
carrying the context bound with ``structlog.contextvars``: ``export_id``, ``stage``, ``batch``, ``frame``.

The Celery app connects ``configure_logging`` to Celery's ``setup_logging`` signal, so workers and beat use
it instead of Celery's own formatter.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]

_configured: tuple[str, int] | None = None


# Celery's own lines about our tasks ("Task export.convert[<export_id>-convert-00003] received") are logged
# where no context is bound (the worker's main process); every export task id starts with its export id.
_EXPORT_TASK = re.compile(r"export\.(?:discover|convert|merge|compress)\["
                          r"(?P<id>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})")


def add_export_id_from_task_line(logger, name, event_dict):
    if "export_id" not in event_dict and isinstance(event_dict.get("event"), str):
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
        return
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
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
    _configured = (fmt, level)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
