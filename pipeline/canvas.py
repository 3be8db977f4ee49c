"""The one place the export DAG is assembled.

An export is the chain ``discover → chord(group(convert batch 0..n-1), merge) → compress``. The number of
batches is only known once discover has listed the project, so the chain is started as
``chain(discover, compress)`` and the discover task replaces itself with the chord
(``Task.replace``): the chord inherits discover's place in the chain, and compress runs when the chord body
(merge) finishes (verified with Celery 5.7 on the redis backend: ``tests/test_pipeline.py``).

Task ids are deterministic so that progress and cancel can address tasks without asking Celery:
discover (and, after the replace, merge) = ``<export_id>``, convert batch i = ``<export_id>-convert-<i:05d>``,
compress = ``<export_id>-compress``. Results carry paths and counts, never tables.

A failed export can be rerun from one stage over its staged files (``rerun_workflow``, started by
``service.retry_export``): the same tasks with the same ids, minus the stages before it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from celery import Task, chain, chord, group
from celery.canvas import Signature

from pipeline.settings import LARGE_QUEUE, SMALL_QUEUE, Settings


def convert_task_id(export_id: str, batch_index: int) -> str:
    return f"{export_id}-convert-{batch_index:05d}"


def compress_task_id(export_id: str) -> str:
    return f"{export_id}-compress"


def parse_task_id(task_id: str) -> tuple[str, int | None]:
    """(export id, convert batch index or None) of one of an export's task ids (the inverse of the above)."""
    if (m := _CONVERT_ID.match(task_id)) is not None:
        return m.group("export_id"), int(m.group("batch"))
    return task_id.removesuffix("-compress"), None


_CONVERT_ID = re.compile(r"^(?P<export_id>.+)-convert-(?P<batch>\d{5})$")


def task_ids(export_id: str, n_batches: int | None) -> list[str]:
    """Every task id an export may have (for revoke)."""
    return [export_id, *(convert_task_id(export_id, i) for i in range(n_batches or 0)), compress_task_id(export_id)]


def celery_priority(request_priority: int) -> int:
    """The request's priority (0-10, 10 = most urgent) as a redis-transport priority (0-9, 0 served first)."""
    return 9 - min(9, max(0, int(request_priority)) * 9 // 10)


def queue_for(n_frames: int, settings: Settings) -> str:
    """Big exports run on their own queue so they never sit in front of small ones."""
    return LARGE_QUEUE if n_frames >= settings.large_export_frames else SMALL_QUEUE


def export_workflow(export_id: str, project_dir: Path, request_json: dict, *, staging_dir: Path, archive: Path,
                    batch_size: int, priority: int, queue: str | None = None,
                    source: dict[str, Any] | None = None) -> Signature:
    """The export's chain as it is started: discover (which becomes the convert/merge chord) then compress.

    ``queue`` forces the queue of the convert/merge/compress tasks (None = by the discovered frame count);
    ``source`` holds discover's optional ``layout``, ``source_settings`` and ``mapping_overrides``."""
    from pipeline import tasks

    p = celery_priority(priority)
    return chain(
        tasks.discover.si(export_id, str(project_dir), request_json, str(staging_dir), batch_size,
                          queue=queue, **(source or {}))
        .set(task_id=export_id, queue=SMALL_QUEUE, priority=p),
        tasks.compress.s(export_id, str(staging_dir), str(archive))
        .set(task_id=compress_task_id(export_id), priority=p),
    )


RERUN_STAGES = ("convert", "merge", "compress")


def rerun_workflow(export_id: str, stage: str, *, staging_dir: Path, archive: Path, batches: list[int],
                   queue: str, priority: int) -> Signature:
    """The rest of a failed export, from ``stage`` on, over what is staged (``service.retry_export``):

    - ``convert``: ``rerun_batches → compress``, where ``rerun_batches`` replaces itself with
      ``chord(convert batches, merge)`` for the given ``batches`` only (the others' Arrow files are staged and
      merge reads them as they are). As with discover, the chord is built by a task in a worker: a chord
      sent from the caller's process would leave it subscribed to every batch's result.
    - ``merge``: ``merge → compress``; ``compress``: ``compress`` alone.

    The tasks keep the export's deterministic ids, so progress and cancel address them as before.
    """
    from pipeline import tasks

    if stage not in RERUN_STAGES:
        raise ValueError(f"stage must be one of {RERUN_STAGES}, got {stage!r}")
    p = celery_priority(priority)
    staging, where = str(staging_dir), dict(queue=queue, priority=p)
    if stage == "compress":  # no merge result to receive: compress reads merge.json from staging
        return tasks.compress.si(None, export_id, staging, str(archive)).set(task_id=compress_task_id(export_id),
                                                                            **where)
    compress = tasks.compress.s(export_id, staging, str(archive)).set(task_id=compress_task_id(export_id), **where)
    if stage == "convert" and batches:
        first = tasks.rerun_batches.si(export_id, staging, list(batches), queue, priority)
    else:
        first = tasks.merge.si([], export_id, staging)
    return chain(first.set(task_id=export_id, **where), compress)


def batches_chord(export_id: str, staging_dir: str, batches: Iterable[int], *, queue: str,
                  priority: int) -> chord:
    """One convert task per batch, then merge over all their results."""
    from pipeline import tasks

    p = celery_priority(priority)
    header = group(tasks.convert.si(export_id, staging_dir, i)
                   .set(task_id=convert_task_id(export_id, i), queue=queue, priority=p)
                   for i in batches)
    body = tasks.merge.s(export_id, staging_dir).set(queue=queue, priority=p)
    return chord(header, body)


def replace_with_batches(task: Task, export_id: str, staging_dir: str, batches: Iterable[int], *,
                         queue: str, priority: int):
    """Called by the discover task (all batches) and the rerun_batches task (some): replace it with the
    batches' chord, on ``queue``. The chord inherits the task's id and place in the chain.

    The links still ahead in the chain (compress) were routed when the export started, before the frame
    count was known; they are re-routed to ``queue`` here, before ``replace`` re-creates them after the chord.
    """
    for link in task.request.chain or []:
        link.setdefault("options", {})["queue"] = queue
    return task.replace(batches_chord(export_id, staging_dir, batches, queue=queue, priority=priority))
