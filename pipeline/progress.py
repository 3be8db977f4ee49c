"""Progress of an export, from its job record and its convert tasks' result metadata.

Every convert task reports ``PROGRESS {done, total, frame}`` after each frame and ends ``SUCCESS {frames,
annotations, ...}``; their ids are deterministic (``canvas.convert_task_id``), so one Lua script reads the job
hash and MGETs all batch metas in a single round trip, however many batches. A second (only when the value
rose) stores the high-water mark atomically, so progress never goes backwards, even when a batch is redelivered
after a worker crash and starts over.

Scale: discover 0-2 %, convert 2-90 % (by frames), merge 90-95 %, compress 95-99 %, 100 only when completed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import canvas
from pipeline.jobs import CANCELLED, COMPLETED, FAILED, PENDING, ExportJob, JobStore

STEP_RANGES = {"discover": (0.0, 2.0), "convert": (2.0, 90.0), "merge": (90.0, 95.0), "compress": (95.0, 99.0)}
STEP_TEXT = {"discover": "Discovering frames", "merge": "Merging tables", "compress": "Compressing archive"}

# KEYS[1] job hash; ARGV[1] the result-meta key of convert batch i without its "%05d" suffix.
# Returns {flat HGETALL, MGET of every batch's meta}. (The meta keys are derived inside the script because
# their number is in the hash; fine on a single Redis, not on a cluster.)
_SNAPSHOT = """
local job = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #job, 2 do
  if job[i] == 'n_batches' then n = tonumber(job[i + 1]) end
end
local metas = {}
local chunk = {}
for i = 0, n - 1 do
  chunk[#chunk + 1] = ARGV[1] .. string.format('%05d', i)
  if #chunk == 1000 or i == n - 1 then
    local got = redis.call('MGET', unpack(chunk))
    for j = 1, #chunk do metas[#metas + 1] = got[j] end
    chunk = {}
  end
end
return {job, metas}
"""


@dataclass
class Progress:
    progress: float  # 0-100
    current_step: str
    frames_done: int | None = None  # frames converted so far (live, during conversion)
    annotations: int | None = None  # annotations of the finished batches (live)


def convert_meta_prefix(backend, export_id: str) -> str:
    """The result-meta key of batch i is this prefix + f"{i:05d}"."""
    key = backend.get_key_for_task(canvas.convert_task_id(export_id, 0))
    key = key.decode() if isinstance(key, bytes) else key
    assert key.endswith("00000")
    return key[:-5]


def read_snapshot(store: JobStore, backend, export_id: str) -> tuple[ExportJob | None, list[dict | None]]:
    """The job record and every batch's decoded result meta (None = not started), in one round trip."""
    raw_job, raw_metas = store.script(_SNAPSHOT)(keys=[store.key(export_id)],
                                                 args=[convert_meta_prefix(backend, export_id)])
    if not raw_job:
        return None, []
    job = ExportJob.from_hash(dict(zip(raw_job[::2], raw_job[1::2])))
    metas = [json.loads(m) if m else None for m in raw_metas]
    return job, metas


def batch_counts(metas: list[dict | None]) -> tuple[int, int]:
    """(frames converted, annotations of finished batches) from the batches' result metas."""
    frames = annotations = 0
    for meta in metas:
        if not meta:
            continue
        result = meta.get("result")
        if meta.get("status") == "SUCCESS" and isinstance(result, dict):
            frames += int(result.get("frames", 0))
            annotations += int(result.get("annotations", 0))
        elif meta.get("status") == "PROGRESS" and isinstance(result, dict):
            frames += int(result.get("done", 0))
    return frames, annotations


def compute(job: ExportJob, metas: list[dict | None] | None) -> Progress:
    """Progress of ``job`` (before the high-water mark is applied). ``metas`` None = not read (listing)."""
    if job.status == COMPLETED:
        return Progress(100.0, "Completed", job.frames, job.annotations)
    if job.status == PENDING:
        return Progress(0.0, "Queued")
    if job.status == CANCELLED:
        return Progress(job.progress, "Cancelled")
    if job.status == FAILED:
        stage = (job.error or {}).get("stage") or job.step or "export"
        return Progress(job.progress, f"Failed in {stage}")
    step = job.step or "discover"
    low, high = STEP_RANGES.get(step, (0.0, 99.0))
    if step == "convert" and metas is None:  # a listing: the stored high-water mark is enough
        return Progress(max(low, job.progress), f"Processing {job.n_frames or 0} frames")
    if step == "convert":
        n = job.n_frames or 0
        frames, annotations = batch_counts(metas or [])
        frames = min(frames, n)
        value = low + (high - low) * (frames / n if n else 0.0)
        return Progress(round(value, 1), f"Processing frame {frames}/{n}", frames, annotations)
    return Progress(max(low, job.progress), STEP_TEXT.get(step, step), job.frames, job.annotations)


def current(store: JobStore, backend, export_id: str) -> tuple[ExportJob | None, Progress | None]:
    """The job and its progress for a poll: at most two round trips (snapshot, then the high-water mark)."""
    job, metas = read_snapshot(store, backend, export_id)
    if job is None:
        return None, None
    now = compute(job, metas)
    if job.status in (PENDING, COMPLETED, FAILED, CANCELLED):
        return job, now
    if now.progress > job.progress:
        now.progress = float(store.raise_progress(export_id, now.progress))
    else:
        now.progress = job.progress
    return job, now
