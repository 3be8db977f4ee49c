"""Stage 3, merge: read every batch's Arrow files, hand one table per name to the format, which links rows
across frames and writes its final tables. Batch folders are only read, never modified, so merge can be
re-run (e.g. ``retry --stage merge``) on the same staged batches."""
from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from stages.convert import missing_batches, read_batch_result
from stages.errors import ExportError
from stages.formats import get_format
from stages.plan import MERGE_FILE, ExportPlan, write_json_atomic


@dataclass
class MergeResult:
    frames: int
    annotations: int
    counts: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_batch_tables(plan: ExportPlan) -> dict[str, pa.Table]:
    """One concatenated table per table name over all batches, in batch order. Every batch must be done."""
    missing = missing_batches(plan)
    if missing:
        raise ExportError(f"cannot merge: batches {missing[:10]} have not been converted")
    parts: dict[str, list[pa.Table]] = {}
    for i in range(len(plan.batches)):
        for path in sorted(plan.batch_dir(i).glob("*.arrow")):
            with ipc.open_file(str(path)) as reader:
                parts.setdefault(path.stem, []).append(reader.read_all())
    return {name: pa.concat_tables(tables, promote_options="permissive") for name, tables in parts.items()}


def merge_tables(staging_dir: str | Path) -> MergeResult:
    """Merge the staged batches of the export in ``staging_dir`` into the format's tables under ``output/``."""
    plan = ExportPlan.load(staging_dir)
    tables = read_batch_tables(plan)
    fmt = get_format(plan.request.export_format.value)(plan, plan.output_dir)
    counts = fmt.merge(tables)
    filtered: Counter = Counter()
    warnings = list(plan.warnings)
    for i in range(len(plan.batches)):
        result = read_batch_result(plan, i)
        filtered.update(result.filtered)
        warnings.extend(result.warnings)
    merged = MergeResult(frames=int(counts.get("frames", len(plan.frames))),
                         annotations=int(counts.get("annotations", 0)), counts=counts,
                         filtered=dict(filtered), warnings=warnings)
    write_json_atomic(Path(staging_dir) / MERGE_FILE, merged.to_json())
    return merged


def remove_staging(staging_dir: str | Path) -> None:
    shutil.rmtree(staging_dir, ignore_errors=True)
