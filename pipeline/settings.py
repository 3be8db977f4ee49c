"""Every setting of the export service, read once from the environment (one pydantic-settings class).

Environment variables (defaults in brackets):

- ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` [redis://localhost:6379/0]: a shared Redis in production;
  ``nextpoints-export serve`` points both at a private embedded Redis (unix socket) when they are unset.
- ``CELERY_TASK_TIME_LIMIT`` [14400 s = 4 h]: hard limit of one task; the soft limit is 60 s less.
- ``CELERY_WORKER_CONCURRENCY`` [number of CPUs]: worker processes per worker.
- ``NPX_DATA_ROOT`` [./data]: projects live at ``DATA_ROOT/<project>/nextpoints`` or ``DATA_ROOT/<project>``.
- ``NPX_EXPORT_ROOT`` [./exports]: archives at ``EXPORT_ROOT/<id>.<ext>``, staging at
  ``EXPORT_ROOT/staging/<id>``.
- ``NPX_BATCH_SIZE`` [25]: frames per convert task.
- ``NPX_LARGE_EXPORT_FRAMES`` [500]: exports with at least this many frames run on the ``large_export`` queue.
- ``NPX_CLEANUP_MAX_AGE_HOURS`` [72]: beat removes finished exports (archive, staging, job record) older than
  this.
- ``NPX_MAX_RETRIES`` [3], ``NPX_RETRY_BACKOFF`` [2 s], ``NPX_RETRY_BACKOFF_MAX`` [120 s], ``NPX_RETRY_JITTER``
  [true]: the automatic retry of a task that hit a transient error (see ``pipeline.retry_policy``): at most
  ``max_retries`` more attempts, the n-th after ``min(backoff_max, backoff * 2**(n-1))`` seconds (a random part
  of it with jitter). A pipeline config's ``retry`` section overrides them for its export.
- ``NPX_LOG_FORMAT`` [json]: ``json`` (one JSON object per line) or ``console`` (readable). The interactive CLI
  commands (``run``, ``retry``, ``status``...) log to the console unless it is set.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SMALL_QUEUE = "small_export"
LARGE_QUEUE = "large_export"
QUEUES = (SMALL_QUEUE, LARGE_QUEUE)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    broker_url: str = Field("redis://localhost:6379/0", validation_alias="CELERY_BROKER_URL")
    # None = the broker's Redis (the same URL works for both, unix sockets included)
    result_backend: str | None = Field(None, validation_alias="CELERY_RESULT_BACKEND")
    task_time_limit: int = Field(4 * 3600, ge=60, validation_alias="CELERY_TASK_TIME_LIMIT")
    worker_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                                    validation_alias="CELERY_WORKER_CONCURRENCY")

    data_root: Path = Field(Path("data"), validation_alias="NPX_DATA_ROOT")
    export_root: Path = Field(Path("exports"), validation_alias="NPX_EXPORT_ROOT")
    batch_size: int = Field(25, ge=1, validation_alias="NPX_BATCH_SIZE")
    large_export_frames: int = Field(500, ge=1, validation_alias="NPX_LARGE_EXPORT_FRAMES")
    cleanup_max_age_hours: float = Field(72.0, gt=0, validation_alias="NPX_CLEANUP_MAX_AGE_HOURS")
    cleanup_interval_s: float = Field(3600.0, gt=0, validation_alias="NPX_CLEANUP_INTERVAL_S")  # beat's period
    max_retries: int = Field(3, ge=0, le=100, validation_alias="NPX_MAX_RETRIES")
    retry_backoff: float = Field(2.0, ge=0, validation_alias="NPX_RETRY_BACKOFF")
    retry_backoff_max: float = Field(120.0, ge=0, validation_alias="NPX_RETRY_BACKOFF_MAX")
    retry_jitter: bool = Field(True, validation_alias="NPX_RETRY_JITTER")
    log_format: Literal["json", "console"] = Field("json", validation_alias="NPX_LOG_FORMAT")

    @property
    def backend_url(self) -> str:
        """The result backend URL: the broker's Redis unless set. Kombu (broker) and Celery's redis backend
        both accept ``redis+socket:///path/redis.sock`` (Celery splits off ``redis+`` to pick the backend and
        parses the ``socket://`` rest; a bare ``socket://`` is not a backend name)."""
        return self.result_backend or self.broker_url

    @property
    def soft_time_limit(self) -> int:
        return max(30, self.task_time_limit - 60)

    @property
    def visibility_timeout(self) -> int:
        """Seconds before an unacked message is redelivered: must exceed the longest task (acks_late)."""
        return self.task_time_limit + 3600

    @property
    def result_expires(self) -> int:
        """Seconds task results live: longer than the longest export (so progress can always read them)."""
        return max(7 * 24 * 3600, int(self.cleanup_max_age_hours * 3600))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read from the environment on first use)."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the CLI change the environment before starting children)."""
    get_settings.cache_clear()
