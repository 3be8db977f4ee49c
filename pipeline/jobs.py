"""The export job record: one Redis hash per export, plus a sorted-set index (newest first) and a stop flag.

Keys (prefix ``npx``):

- ``npx:export:<id>``       hash, the fields of ``ExportJob`` (scalars as text, dicts as JSON, None = absent)
- ``npx:exports``           sorted set of export ids scored by creation time (epoch seconds)
- ``npx:export:<id>:stop``  set when the export is cancelled or has failed: running batches stop at the next
                            frame, tasks that start later exit at once
- ``npx:export:<id>:run:<task name>:<task id>``  the lease of the one execution of that task running now,
                            ``npx:export:<id>:done`` the tasks that succeeded (``pipeline.deliveries``)

Status moves ``pending → processing → completed | failed | cancelled``; a failed export rerun from one of its
stages (``service.retry_export``) goes back to ``processing``. Every write by a task goes through
``JobStore.update(..., allowed=...)``, a Lua script that applies the fields only while the job's status is one
of ``allowed``: a finished job is never reopened by a late task, and a deleted job is never recreated.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Iterable

import redis

from pipeline.errors import JobNotFound

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
ACTIVE = (PENDING, PROCESSING)
FINISHED = (COMPLETED, FAILED, CANCELLED)
STOP_FLAG_TTL = 7 * 24 * 3600
# What an export id may look like (the service makes uuid4s). Anything else names no export: a ':' in
# particular would address another key of the record (``<id>:stop``), so it never reaches Redis.
EXPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds, the format of every timestamp in the record."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass
class ExportJob:
    export_id: str
    project: str
    export_format: str
    request: dict[str, Any]
    status: str = PENDING
    step: str | None = None  # the stage running now: discover | convert | merge | compress
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    completed_at: str | None = None
    heartbeat: float | None = None  # epoch seconds of the last sign of life of any of its tasks
    queue: str | None = None
    priority: int | None = None
    batch_size: int | None = None
    n_frames: int | None = None  # frames selected by discover
    n_key_frames: int | None = None
    n_batches: int | None = None
    frames: int | None = None  # frames written (after merge)
    annotations: int | None = None
    filtered: dict[str, int] | None = None  # annotations dropped by the filter, per reason
    warnings: int | None = None
    error: dict[str, Any] | None = None  # {error, message, frame, file, stage, batch, attempts}
    result_path: str | None = None
    file_size: int | None = None
    progress: float = 0.0  # high-water mark, 0-100
    message: str | None = None
    retry_policy: dict[str, Any] | None = None  # automatic retries (RetryPolicy JSON); None = NPX_* settings
    reruns: int | None = None  # times the export was rerun from a stage (``retry``), and from which the last time
    rerun_stage: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_hash(self) -> dict[str, str]:
        return {f.name: encode_field(f.name, getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_hash(cls, raw: dict[bytes | str, bytes | str]) -> "ExportJob":
        values = {_text(k): decode_field(_text(k), _text(v)) for k, v in raw.items()}
        return cls(**{k: v for k, v in values.items() if k in _FIELD_NAMES})


_FIELD_NAMES = {f.name for f in fields(ExportJob)}
_INTS = {"priority", "batch_size", "n_frames", "n_key_frames", "n_batches", "frames", "annotations", "warnings",
         "file_size", "reruns"}
_FLOATS = {"heartbeat", "progress"}
_JSON = {"request", "filtered", "error", "retry_policy"}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode_field(name: str, value: Any) -> str:
    if name in _JSON:
        return json.dumps(value)
    return str(value)


def decode_field(name: str, value: str) -> Any:
    if name in _JSON:
        return json.loads(value)
    if name in _INTS:
        return int(value)
    if name in _FLOATS:
        return float(value)
    return value


# KEYS[1] job hash. ARGV[1] allowed statuses separated by spaces ('' = any); ARGV[2] n field names to delete,
# then those names, then field/value pairs to set. Returns {applied (0|1), status before}.
_UPDATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
if ARGV[1] ~= '' and not string.find(' ' .. ARGV[1] .. ' ', ' ' .. status .. ' ', 1, true) then
  return {0, status}
end
local n_del = tonumber(ARGV[2])
if n_del > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 3, 2 + n_del)) end
if #ARGV > 2 + n_del then redis.call('HSET', KEYS[1], unpack(ARGV, 3 + n_del)) end
return {1, status}
"""

# KEYS[1] job hash, ARGV[1] a progress value: store it if higher than the stored one; return the maximum.
_RAISE_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '0' end
local current = redis.call('HGET', KEYS[1], 'progress') or '0'
if tonumber(ARGV[1]) > tonumber(current) then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  return ARGV[1]
end
return current
"""


# Take the lease when it is free, already ours (a refresh), or held by ARGV[3], a holder known to be gone.
# Returns the holder after the call: ARGV[1] when taken; '' when the task (ARGV[4]) is recorded done.
_CLAIM_RUN = """
if redis.call('SISMEMBER', KEYS[2], ARGV[4]) == 1 then return '' end
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] or current == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return ARGV[1]
end
return current
"""
# Drop the lease if it is still ours; with ARGV[2] = '1' record the task done.
_RELEASE_RUN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
return 1
"""


class JobStore:
    """Reads and writes export job records in Redis (the result backend's Redis)."""

    def __init__(self, client: redis.Redis, prefix: str = "npx"):
        self.client = client
        self.prefix = prefix
        self._scripts: dict[str, Any] = {}

    # --- keys -------------------------------------------------------------------------------------------
    def key(self, export_id: str) -> str:
        """The record's key; ``JobNotFound`` for a string that cannot be an export id."""
        if not EXPORT_ID.match(export_id):
            raise JobNotFound(export_id)
        return f"{self.prefix}:export:{export_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:exports"

    def stop_key(self, export_id: str) -> str:
        return f"{self.key(export_id)}:stop"

    # --- records ----------------------------------------------------------------------------------------
    def create(self, job: ExportJob) -> ExportJob:
        created = parse_time(job.created_at) or datetime.now(timezone.utc)
        with self.client.pipeline() as pipe:
            pipe.hset(self.key(job.export_id), mapping=job.to_hash())
            pipe.zadd(self.index_key, {job.export_id: created.timestamp()})
            pipe.execute()
        return job

    def find(self, export_id: str) -> ExportJob | None:
        raw = self.client.hgetall(self.key(export_id))
        return ExportJob.from_hash(raw) if raw else None

    def get(self, export_id: str) -> ExportJob:
        job = self.find(export_id)
        if job is None:
            raise JobNotFound(export_id)
        return job

    def update(self, export_id: str, *, allowed: Iterable[str] | None = ACTIVE,
               **values: Any) -> tuple[bool, str | None]:
        """Set ``values`` (None deletes a field) atomically, only while the status is one of ``allowed``
        (None = any). Returns (applied, status before); status None means there is no such job."""
        unset = [k for k, v in values.items() if v is None]
        pairs: list[str] = []
        for k, v in values.items():
            if v is not None:
                pairs += [k, encode_field(k, v)]
        allowed_text = "" if allowed is None else " ".join(allowed)
        applied, before = self.script(_UPDATE)(keys=[self.key(export_id)],
                                               args=[allowed_text, len(unset), *unset, *pairs])
        before = _text(before) or None
        return bool(applied), before

    def fail(self, export_id: str, error: dict[str, Any], *, allowed: Iterable[str] = ACTIVE) -> bool:
        """End the job ``failed`` with ``error`` (its error report, whose ``message`` becomes the job's) while
        its status is one of ``allowed``, and raise its stop flag so that its other tasks stop. False when the
        job was not in ``allowed`` (an earlier failure, or a cancel, wins)."""
        applied, _ = self.update(export_id, allowed=allowed, status=FAILED, error=error, completed_at=utc_now(),
                                 message=error["message"])
        if applied:
            self.request_stop(export_id, FAILED)
        return applied

    def heartbeat(self, export_id: str, **values: Any) -> bool:
        """Record a sign of life (and optional fields) while the job is active."""
        applied, _ = self.update(export_id, heartbeat=round(time.time(), 3), **values)
        return applied

    def raise_progress(self, export_id: str, value: float) -> float:
        """Store ``value`` as the progress high-water mark if it is higher; return the mark."""
        return float(self.script(_RAISE_PROGRESS)(keys=[self.key(export_id)], args=[repr(float(value))]))

    def retry_policy(self, export_id: str) -> dict[str, Any] | None:
        """The export's stored automatic-retry policy (None = the service-wide one)."""
        raw = self.client.hget(self.key(export_id), "retry_policy")
        return decode_field("retry_policy", _text(raw)) if raw else None

    def script(self, source: str):
        """A registered Lua script on this store's client (registered once per store)."""
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    def page(self, offset: int = 0, limit: int = 50) -> tuple[list[ExportJob], int]:
        """Jobs newest first, and how many there are in all."""
        with self.client.pipeline() as pipe:
            pipe.zrevrange(self.index_key, offset, offset + limit - 1)
            pipe.zcard(self.index_key)
            ids, total = pipe.execute()
        if not ids:
            return [], total
        with self.client.pipeline() as pipe:
            for export_id in ids:
                pipe.hgetall(self.key(_text(export_id)))
            raws = pipe.execute()
        return [ExportJob.from_hash(raw) for raw in raws if raw], total

    def ids(self, created_before: float | None = None) -> list[str]:
        """Export ids, oldest first (all, or those created before an epoch time)."""
        high = "+inf" if created_before is None else f"({created_before}"
        return [_text(i) for i in self.client.zrangebyscore(self.index_key, "-inf", high)]

    def statuses(self, export_ids: list[str]) -> list[tuple[str | None, float | None]]:
        """(status, heartbeat) per id, one round trip."""
        with self.client.pipeline() as pipe:
            for export_id in export_ids:
                pipe.hmget(self.key(export_id), "status", "heartbeat")
            rows = pipe.execute()
        return [(_text(s) if s else None, float(h) if h else None) for s, h in rows]

    def frames_key(self, export_id: str) -> str:
        return f"{self.key(export_id)}:frames"

    def note_frame(self, export_id: str, batch: int, frame_id: str) -> None:
        """Record the frame batch ``batch`` is converting now: when its process dies or hits the hard time
        limit, the worker's main process names this frame in the error (the batch's result meta is already
        overwritten by then)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.frames_key(export_id), str(batch), frame_id)
            pipe.expire(self.frames_key(export_id), STOP_FLAG_TTL)
            pipe.execute()

    def frame_of(self, export_id: str, batch: int) -> str | None:
        raw = self.client.hget(self.frames_key(export_id), str(batch))
        return _text(raw) if raw else None

    # --- task executions (pipeline.deliveries) -----------------------------------------------------------
    def run_key(self, export_id: str, task_key: str) -> str:
        return f"{self.key(export_id)}:run:{task_key}"

    def done_key(self, export_id: str) -> str:
        return f"{self.key(export_id)}:done"

    def claim_run(self, export_id: str, task_key: str, holder: str, ttl_s: float, take_from: str = "") -> str:
        """Take (or refresh) the lease of ``task_key``'s execution for ``ttl_s``; ``take_from`` names a holder
        known to be gone whose lease may be taken over. Returns the holder after the call, or "" when the task
        is recorded done (checked in the same step, so a task finishing meanwhile is never started again)."""
        current = self.script(_CLAIM_RUN)(keys=[self.run_key(export_id, task_key), self.done_key(export_id)],
                                          args=[holder, int(ttl_s * 1000), take_from, task_key])
        return _text(current)

    def release_run(self, export_id: str, task_key: str, holder: str, done: bool) -> None:
        """Give the lease back (if still ``holder``'s) and, when ``done``, record the task as succeeded."""
        self.script(_RELEASE_RUN)(keys=[self.run_key(export_id, task_key), self.done_key(export_id)],
                                  args=[holder, "1" if done else "0", task_key, STOP_FLAG_TTL])

    def forget_done(self, export_id: str) -> None:
        """For a rerun from a stage: its tasks (same ids) run again."""
        self.client.delete(self.done_key(export_id))

    def delete(self, export_id: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.delete(self.key(export_id), self.stop_key(export_id), self.frames_key(export_id),
                        self.done_key(export_id))
            pipe.zrem(self.index_key, export_id)
            pipe.execute()

    # --- the stop flag ----------------------------------------------------------------------------------
    def request_stop(self, export_id: str, reason: str) -> None:
        self.client.set(self.stop_key(export_id), reason, ex=STOP_FLAG_TTL)

    def stop_requested(self, export_id: str) -> bool:
        return bool(self.client.exists(self.stop_key(export_id)))

    def clear_stop(self, export_id: str) -> None:
        """For a retry: let the export's tasks run again."""
        self.client.delete(self.stop_key(export_id))


@lru_cache(maxsize=1)
def _store_for_pid(pid: int) -> JobStore:
    from pipeline.celery_app import app

    return JobStore(app.backend.client)


def job_store() -> JobStore:
    """This process's job store, on the result backend's Redis (a forked worker child gets its own pool)."""
    return _store_for_pid(os.getpid())


def reset_job_store() -> None:
    _store_for_pid.cache_clear()


class StopFlag:
    """``should_stop()`` for ``convert_batch``: reads the export's stop flag at most every ``interval`` s, so a
    batch of fast frames costs a handful of GETs, and a cancel is seen within ``interval`` of the next frame."""

    def __init__(self, store: JobStore, export_id: str, interval: float = 0.5):
        self.store = store
        self.export_id = export_id
        self.interval = interval
        self._checked_at = float("-inf")
        self._stopped = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._stopped and now - self._checked_at >= self.interval:
            self._stopped = self.store.stop_requested(self.export_id)
            self._checked_at = now
        return self._stopped
