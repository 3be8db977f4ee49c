"""Stage 3, merge: read every batch's Arrow files, hand one table per name to the format, which links rows
across frames and writes its final tables. Batch folders are only read, never modified, so merge can be
re-run (e.g. ``retry --stage merge``) on the same staged batches."""
from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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


class BatchTables(Mapping[str, pa.Table]):
    """The staged tables of every batch, read on access: ``tables[name]`` reads that table's Arrow files of all
    batches (in batch order) and concatenates them. Nothing is cached, so a format that handles one table at a
    time holds only that one in memory. ``read(name, columns)`` keeps only some columns."""

    def __init__(self, plan: ExportPlan):
        self._files: dict[str, list[Path]] = {}
        for i in range(len(plan.batches)):
            for path in sorted(plan.batch_dir(i).glob("*.arrow")):
                self._files.setdefault(path.stem, []).append(path)

    def read(self, name: str, columns: Sequence[str] | None = None) -> pa.Table | None:
        """Table ``name`` over all batches (only ``columns`` when given, in that order); None when no batch has it."""
        parts = []
        for path in self._files.get(name, ()):
            with ipc.open_file(str(path)) as reader:
                table = reader.read_all()
            parts.append(table if columns is None else table.select(list(columns)))
        return pa.concat_tables(parts, promote_options="permissive") if parts else None

    def __getitem__(self, name: str) -> pa.Table:
        table = self.read(name)
        if table is None:
            raise KeyError(name)
        return table

    def __contains__(self, name: object) -> bool:  # without reading the table
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_batch_tables(plan: ExportPlan) -> BatchTables:
    """The tables of all batches by name, read on access (see ``BatchTables``). Every batch must be done."""
    missing = missing_batches(plan)
    if missing:
        raise ExportError(f"cannot merge: batches {missing[:10]} have not been converted")
    return BatchTables(plan)


def merge_tables(staging_dir: str | Path) -> MergeResult:
    """Merge the staged batches of the export in ``staging_dir`` into the format's tables under ``output/``."""
    plan = ExportPlan.load(staging_dir)
    tables = read_batch_tables(plan)
    fmt = get_format(plan.request.export_format.value)(plan, plan.output_dir)
    counts = fmt.merge(tables)
    filtered: Counter = Counter()
    warnings = list(plan.warnings)
    sweep_labels = 0
    for i in range(len(plan.batches)):
        result = read_batch_result(plan, i)
        filtered.update(result.filtered)
        warnings.extend(result.warnings)
        sweep_labels += result.sweep_labels
    if sweep_labels:  # labels of sweep frames: read, never exported (only samples are annotated)
        counts = {**counts, "sweep_labels_not_exported": sweep_labels}
    merged = MergeResult(frames=int(counts.get("frames", len(plan.frames))),
                         annotations=int(counts.get("annotations", 0)), counts=counts,
                         filtered=dict(filtered), warnings=warnings)
    write_json_atomic(Path(staging_dir) / MERGE_FILE, merged.to_json())
    return merged


def remove_staging(staging_dir: str | Path) -> None:
    shutil.rmtree(staging_dir, ignore_errors=True)
