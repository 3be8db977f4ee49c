"""At most one execution of each export task at a time, and none once it has succeeded.

Celery with late acks delivers at least once. When a worker loses its Redis connection, the messages of the
tasks it is running are restored to the queue and delivered again while the first executions go on, and such a
message may also arrive after its task has finished. A second discover would re-plan the staging folder under
the running batches, a second merge rewrite the tables that compress is packing, a second compress pack a
staging folder the first has removed. So:

- every execution of a task (its name and id: merge shares discover's id) holds a lease in Redis while it
  runs, refreshed by a thread every ``LEASE_TTL / 3`` s, lapsing ``LEASE_TTL`` s after its holder stopped;
- a task that succeeded (or replaced itself with the next part of the canvas) is recorded done;
- a delivery of a task that is done is dropped; one whose lease is held by another execution is sent again
  for ``RECHECK_AFTER`` s later (same id, chain and chord, its result state untouched) and dropped;
- a lease whose holder process is gone on this host is taken over at once: a worker process killed mid-task
  has its task sent again by Celery (``retry_on_worker_lost``), and that execution need not wait for the lease
  to lapse. (On another host, it waits for the lapse.)

A rerun from a stage (``service.retry_export``) forgets the done records first: its tasks keep their ids.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid

import structlog
from celery.exceptions import Ignore

from pipeline.jobs import JobStore

log = structlog.get_logger("pipeline.deliveries")
LEASE_TTL = 60.0  # s
RECHECK_AFTER = 5.0  # s, before a delivery that found its task running elsewhere looks again
HOST = socket.gethostname()


class DuplicateDelivery(Ignore):
    """This delivery of a task is not executed: the task is done, or running elsewhere."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True


def holder_gone(holder: str) -> bool:
    """Is ``holder`` (``host:pid:token``) a process of this host that no longer runs?"""
    try:
        host, pid, _token = holder.rsplit(":", 2)
        return host == HOST and not _pid_alive(int(pid))
    except ValueError:
        return False


class Execution:
    """The lease of one execution of ``task`` (bound Celery task) for export ``export_id``."""

    def __init__(self, store: JobStore, export_id: str, task):
        self.store = store
        self.export_id = export_id
        self.task = task
        self.key = f"{task.name}:{task.request.id}"
        self.holder = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._held = False
        self._stop = threading.Event()

    def claim(self) -> None:
        """Hold the lease, or raise ``DuplicateDelivery`` (after sending the task again when it runs
        elsewhere)."""
        current = self.store.claim_run(self.export_id, self.key, self.holder, LEASE_TTL)
        if current not in (self.holder, "") and holder_gone(current):
            log.info("lease taken over", task=self.key, gone=current)
            current = self.store.claim_run(self.export_id, self.key, self.holder, LEASE_TTL, take_from=current)
        if current == "":
            log.info("duplicate delivery dropped", task=self.key, reason="the task has succeeded")
            raise DuplicateDelivery()
        if current != self.holder:
            self.task.signature_from_request(self.task.request, countdown=RECHECK_AFTER).apply_async()
            log.info("duplicate delivery deferred", task=self.key, running=current, recheck_in_s=RECHECK_AFTER)
            raise DuplicateDelivery()
        self._held = True
        threading.Thread(target=self._refresh, name=f"lease {self.key}", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_TTL / 3):
            try:
                current = self.store.claim_run(self.export_id, self.key, self.holder, LEASE_TTL)
            except Exception as exc:  # noqa: BLE001 - Redis away for a moment: the next refresh tries again
                log.warning("lease refresh failed", task=self.key, error=type(exc).__name__)
                continue
            if current != self.holder:
                log.warning("lease lost", task=self.key, holder=current)

    def release(self, done: bool) -> None:
        """Stop refreshing, give the lease back and, when ``done``, record the task as succeeded."""
        if not self._held:
            return
        self._stop.set()
        self._held = False
        try:
            self.store.release_run(self.export_id, self.key, self.holder, done)
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself; a done record is then missing
            log.warning("lease release failed", task=self.key, done=done, error=type(exc).__name__)
