"""Stage 2, convert one batch of frames: read each frame, filter its boxes, let the format write its sensor
files and rows, then store the rows as Arrow IPC files in the batch's staging folder (temp folder + rename,
so a retried batch simply replaces its own folder)."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from stages.errors import CancelledExport, LocatedError
from stages.filters import apply_filter
from stages.formats import get_format
from stages.geometry import points_in_boxes
from stages.model import LoadedFrame
from stages.plan import ExportPlan
from stages.sources import open_project

RESULT_FILE = "result.json"


@dataclass
class BatchResult:
    """A batch's counts. Labels are counted on key frames only (the formats annotate samples, not sweeps): there
    ``annotations`` (what the format exported: the batch's share of merge's ``annotations``) + ``filtered`` (per
    filter) + the format's own drops (e.g. ``dropped_unknown_types``) = the labels read. ``sweep_labels`` are
    the labels of sweep frames, read but never exported (nor filtered)."""

    batch_index: int
    frames: int
    annotations: int
    filtered: dict[str, int] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    sweep_labels: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_frame(source, plan: ExportPlan, index: int) -> tuple[LoadedFrame, Counter, int]:
    """Read frame ``index`` of the plan; on a key frame count points per box and apply the request's annotation
    filter. Returns (frame, boxes removed per filter, labels of a sweep frame). A sweep frame carries no boxes:
    its labels are only counted, so that filters and their counts are about exported frames alone."""
    ref = plan.frames[index]
    points = source.read_points(ref)
    boxes = source.read_labels(ref)
    sweep_labels = 0
    if not plan.key_frames[index]:
        sweep_labels, boxes = len(boxes), []
    if boxes:
        counts = points_in_boxes(points, np.stack([b.center for b in boxes]), np.stack([b.size for b in boxes]),
                                 np.stack([b.rotation for b in boxes]))
    else:
        counts = np.zeros(0, dtype=np.int64)
    boxes, counts, removed = apply_filter(boxes, counts, plan.request.annotation_filter)
    warnings = [f"missing image for camera {ch}" for ch, path in ref.cameras.items() if path is None]
    frame = LoadedFrame(ref=ref, points=points, ego_pose=plan.ego_poses[index], boxes=boxes, lidar_pts=counts,
                        is_key_frame=plan.key_frames[index], warnings=warnings)
    return frame, removed, sweep_labels


def convert_batch(staging_dir: str | Path, batch_index: int, *,
                  should_stop: Callable[[], bool] | None = None,
                  on_frame_start: Callable[[str], None] | None = None,
                  on_frame: Callable[[int, int, str], None] | None = None) -> BatchResult:
    """Convert batch ``batch_index`` of the plan in ``staging_dir``.

    ``should_stop()`` is checked before every frame (cancellation stops at a frame boundary by raising
    ``CancelledExport``); ``on_frame_start(frame_id)`` before and ``on_frame(done, total, frame_id)`` after
    every frame. Input errors are raised as ``InputError`` (or ``InputUnavailable`` for a file that could not
    be read just now) naming the frame and file; nothing is written for a failed batch.
    """
    started = time.perf_counter()
    plan = ExportPlan.load(staging_dir)
    indices = plan.batches[batch_index]
    source = open_project(plan.project_dir, plan.source_settings, layout=plan.layout)
    fmt = get_format(plan.request.export_format.value)(plan, plan.output_dir)
    rows: dict[str, list[dict[str, Any]]] = {}
    removed_total: Counter = Counter()
    warnings: list[dict[str, Any]] = []
    n_annotations = n_sweep_labels = 0
    for done, index in enumerate(indices):
        if should_stop is not None and should_stop():
            raise CancelledExport(f"batch {batch_index} stopped before frame {plan.frames[index].frame_id}")
        ref = plan.frames[index]
        if on_frame_start is not None:
            on_frame_start(ref.frame_id)
        try:
            frame, removed, sweep_labels = load_frame(source, plan, index)
            frame_rows = fmt.convert_frame(frame)
        except LocatedError as err:
            raise err.at_frame(ref.frame_id)
        except CancelledExport:
            raise
        except Exception as err:  # a bug or an unexpected error: still say which frame it hit
            err.frame = ref.frame_id  # read by the pipeline's error report
            err.add_note(f"while converting frame {ref.frame_id}")
            raise
        removed_total.update(removed)
        n_annotations += fmt.annotations_in(frame_rows)
        n_sweep_labels += sweep_labels
        warnings.extend({"frame": ref.frame_id, "warning": w} for w in frame.warnings)
        for table, table_rows in frame_rows.items():
            rows.setdefault(table, []).extend(table_rows)
        if on_frame is not None:
            on_frame(done + 1, len(indices), ref.frame_id)

    result = BatchResult(batch_index=batch_index, frames=len(indices), annotations=n_annotations,
                         filtered=dict(removed_total), warnings=warnings,
                         seconds=round(time.perf_counter() - started, 3), sweep_labels=n_sweep_labels)
    _write_batch(plan.batch_dir(batch_index), rows, result)
    return result


def _write_batch(batch_dir: Path, rows: dict[str, list[dict[str, Any]]], result: BatchResult) -> None:
    tmp = batch_dir.with_name(f".{batch_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for table, table_rows in rows.items():
        arrow = pa.Table.from_pylist(table_rows)
        with ipc.new_file(str(tmp / f"{table}.arrow"), arrow.schema) as writer:
            writer.write_table(arrow)
    with open(tmp / RESULT_FILE, "w", encoding="utf-8") as f:
        json.dump(result.to_json(), f)
    if batch_dir.exists():  # a retried batch replaces its earlier output whole
        old = batch_dir.with_name(f".{batch_dir.name}.{os.getpid()}.old")
        os.replace(batch_dir, old)
        shutil.rmtree(old)
    os.replace(tmp, batch_dir)


def read_batch_result(plan: ExportPlan, batch_index: int) -> BatchResult | None:
    """The stored result of a finished batch, or None when that batch has not completed."""
    path = plan.batch_dir(batch_index) / RESULT_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return BatchResult(**json.load(f))


def missing_batches(plan: ExportPlan) -> list[int]:
    """Indices of the plan's batches that have no staged result yet (not converted, or failed)."""
    return [i for i in range(len(plan.batches)) if read_batch_result(plan, i) is None]
