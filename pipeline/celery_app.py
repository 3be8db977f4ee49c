"""The Celery application: ``celery -A pipeline.celery_app worker | beat | flower | inspect ...``.

Configuration comes from ``pipeline.settings`` (environment), applied lazily so that a process may set the
environment (e.g. the embedded Redis URL) after importing this module but before the first task is sent.
"""
from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue

from pipeline.settings import LARGE_QUEUE, QUEUES, SMALL_QUEUE, Settings, get_settings

# The redis transport serves lower numbers first (it BRPOPs priority lists in ``priority_steps`` order).
# Ten steps give every request priority its own list; see ``canvas.celery_priority``.
PRIORITY_STEPS = list(range(10))


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # A task's message is acked only once the task has finished, and is requeued when the worker process
        # running it dies: a killed worker loses no batch. One message at a time per process, so a long batch
        # never holds other messages hostage.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.soft_time_limit,
        "worker_concurrency": settings.worker_concurrency,
        "broker_transport_options": {
            # an unacked message is redelivered after this: must exceed the longest task
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            # a worker consuming "small_export,large_export" serves small exports first
            "queue_order_strategy": "priority",
        },
        "result_expires": settings.result_expires,
        "task_track_started": True,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        # beat's tasks (sent without a queue) run here; canvas gives every task of an export its queue
        "task_default_queue": SMALL_QUEUE,
        "task_default_priority": 5,  # = canvas.celery_priority(5), the request default
        # events for flower / `celery events`
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        "cleanup-old-exports": {"task": "export.beat.cleanup", "schedule": settings.cleanup_interval_s},
        "fail-stale-exports": {"task": "export.beat.fail_stale",
                               "schedule": float(min(300, max(30, settings.task_time_limit // 10)))},
    }


app = Celery("nextpoints_export", include=["pipeline.tasks", "pipeline.beat"])
app.add_defaults(lambda: celery_config(get_settings()))


def reconfigure() -> None:
    """Re-read the environment and drop cached connections: for a process that changes ``CELERY_*``/``NPX_*``
    after it has already used the app (the test session pointing it at its private Redis)."""
    from pipeline import jobs
    from pipeline.settings import reset_settings

    reset_settings()
    app.conf.update(celery_config(get_settings()))
    app._backend_cache = None  # celery keeps the backend per app (thread-safe backends) or per thread
    app._local = threading.local()
    app._pool = None
    app.amqp._producer_pool = None  # control broadcasts (inspect, revoke) publish through it
    jobs.reset_job_store()


@signals.setup_logging.connect
def _setup_logging(loglevel=None, **_kwargs) -> None:
    """Workers and beat log through ``pipeline.logging`` (connecting this signal disables Celery's own)."""
    from pipeline.logging import configure_logging

    configure_logging(get_settings().log_format, loglevel or "INFO")


@signals.celeryd_init.connect
def _early_worker_logging(**_kwargs) -> None:
    """A worker warns (running as root, ...) before it sets its logging up: those warnings are log lines too."""
    _setup_logging()


@signals.task_prerun.connect
def _fresh_log_context(**_kwargs) -> None:
    """A worker process runs many tasks: none inherits the previous one's export_id/stage/batch/frame."""
    import structlog

    structlog.contextvars.clear_contextvars()


__all__ = ["app", "celery_config", "LARGE_QUEUE", "SMALL_QUEUE"]
