"""Automatic retries: which errors are worth another attempt, and how long to wait before it.

A task that fails with a *transient* error (the shared storage hiccuped, Redis dropped a connection, a read
timed out) is sent again with exponential backoff, up to ``max_retries`` times, before its export fails; an
error in the input or the request fails the export at once, since no retry can fix it. The decision is
taken in ``pipeline.tasks.export_stage`` (so a retried task never marks its job failed) with Celery's own
``Task.retry``: same task id, ``retries`` counted in the message.

The policy of an export is stored in its job record (from its pipeline config's ``retry`` section), else the
service-wide one from the environment (``NPX_MAX_RETRIES``, ``NPX_RETRY_BACKOFF``, ...).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import redis.exceptions
from kombu.exceptions import OperationalError

from pipeline.settings import Settings, get_settings
from stages.errors import InputError, InputUnavailable

# Redis/kombu connection trouble and timeouts; ``redis.exceptions.ConnectionError`` is not an OSError.
_TRANSIENT_TYPES = (InputUnavailable, TimeoutError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    OperationalError)


def is_transient(exc: BaseException) -> bool:
    """True for errors another attempt may not meet: ``InputUnavailable``, an ``OSError`` other than a missing
    file (permission, I/O error, disk full, stale handle), Redis/kombu connection errors and timeouts. False
    for ``InputError``, ``ValueError`` (a request the format cannot honour) and anything else."""
    if isinstance(exc, InputError):
        return False
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int  # attempts after the first one
    backoff: float  # seconds before the first retry; doubles with every further retry
    backoff_max: float  # at most this many seconds between attempts
    jitter: bool  # wait a random part of the delay (retries of many batches do not fall on Redis together)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "RetryPolicy":
        s = settings or get_settings()
        return cls(s.max_retries, s.retry_backoff, s.retry_backoff_max, s.retry_jitter)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, settings: Settings | None = None) -> "RetryPolicy":
        """A stored policy; missing fields (or no policy) take the service-wide values."""
        default = cls.from_settings(settings)
        return cls(**{**asdict(default), **{k: v for k, v in (data or {}).items() if v is not None}})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def should_retry(self, exc: BaseException, retries: int) -> bool:
        """Retry after ``exc``, when the task has been retried ``retries`` times already?"""
        return is_transient(exc) and retries < self.max_retries

    def countdown(self, retries: int) -> float:
        """Seconds to wait before retry number ``retries + 1`` (Celery's exponential backoff, in float)."""
        delay = min(self.backoff_max, self.backoff * (2 ** retries))
        return round(random.uniform(0, delay) if self.jitter else delay, 3)
