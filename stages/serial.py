"""The serial runner: the four stages called in order in one process, no broker.

It is the debugging path (``nextpoints-export convert``) and the baseline the Celery pipeline is measured
against in ``tests/bench``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stages.compress import CompressResult, compress
from stages.convert import BatchResult, convert_batch
from stages.discover import DiscoverResult, discover
from stages.merge import MergeResult, merge_tables
from stages.request import ExportRequest


@dataclass
class SerialRun:
    discovered: DiscoverResult
    batches: list[BatchResult]
    merged: MergeResult
    packed: CompressResult


def default_export_id(project_dir: Path, request: ExportRequest, source_settings: dict[str, Any] | None = None,
                      layout: str | None = None) -> str:
    """A stable id for a serial run (same project, request, settings and layout → same id), 32 hex."""
    key = f"{Path(project_dir).resolve()}|{request.model_dump_json()}"
    if source_settings or layout:
        key += f"|{layout}|{json.dumps(source_settings or {}, sort_keys=True)}"
    return hashlib.md5(key.encode()).hexdigest()


def run_serial(project_dir: str | Path, dest: str | Path, request: ExportRequest | None = None, *,
               batch_size: int = 50, export_id: str | None = None, staging_dir: str | Path | None = None,
               source_settings: dict[str, Any] | None = None, layout: str | None = None,
               on_frame: Callable[[int, int, str], None] | None = None, keep_staging: bool = False) -> SerialRun:
    """Export ``project_dir`` to ``dest`` (a dataset folder, or an archive file when the request compresses).

    ``layout`` forces the source layout (None = detected) and ``source_settings`` are that layout's settings
    (e.g. SUSTechPOINTS' ``lidar_axes``), as in ``stages.discover.discover``."""
    request = request or ExportRequest()
    export_id = export_id or default_export_id(Path(project_dir), request, source_settings, layout)
    dest = Path(dest)
    staging = Path(staging_dir) if staging_dir else dest.parent / f".staging-{export_id}"
    found = discover(project_dir, request, staging, export_id=export_id, batch_size=batch_size,
                     source_settings=source_settings, layout=layout)
    done = 0

    def progress(_k: int, _n: int, frame_id: str) -> None:
        nonlocal done
        done += 1
        if on_frame is not None:
            on_frame(done, found.n_frames, frame_id)

    batches = [convert_batch(staging, i, on_frame=progress) for i in range(found.n_batches)]
    merged = merge_tables(staging)
    packed = compress(staging, dest)
    if not keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return SerialRun(found, batches, merged, packed)
