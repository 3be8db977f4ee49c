"""Where an export's files live on the shared storage, and how they are removed.

- project input: ``DATA_ROOT/<project>/nextpoints`` or else ``DATA_ROOT/<project>``
- staging:       ``EXPORT_ROOT/staging/<export_id>/`` (plan, per-batch Arrow files, the dataset tree)
- archive:       ``EXPORT_ROOT/<export_id>.<ext>`` (a folder ``EXPORT_ROOT/<export_id>`` for ``none``), written
                 by compress through ``EXPORT_ROOT/.<archive name>.<pid>.tmp`` + rename
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from stages.compress import archive_path
from stages.request import ExportRequest

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Export ids are uuid4 strings; cleanup only ever deletes export-root entries named after one.
EXPORT_ENTRY = re.compile(r"^\.?(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(\..*)?$")


def project_dir(data_root: Path, project: str) -> Path | None:
    """The input folder of ``project`` (None when the name is invalid or no such folder exists)."""
    if not PROJECT_NAME.match(project):
        return None
    base = Path(data_root) / project
    for candidate in (base / "nextpoints", base):
        if candidate.is_dir():
            return candidate
    return None


def archive_for(export_root: Path, export_id: str, request: ExportRequest) -> Path:
    return archive_path(export_root, export_id, request.export_options.archive_format)


def staging_for(export_root: Path, export_id: str) -> Path:
    return Path(export_root) / "staging" / export_id


def remove_export_files(export_root: Path, export_id: str) -> list[Path]:
    """Remove the staging folder, the archive (any format) and compress's temp files of one export.

    Safe to call repeatedly and concurrently (several stopping tasks of a cancelled export all call it).
    Returns what was removed.
    """
    export_root = Path(export_root)
    removed = []
    candidates = [staging_for(export_root, export_id)]
    if export_root.is_dir():
        candidates += [p for p in export_root.iterdir()
                       if (m := EXPORT_ENTRY.match(p.name)) and m.group("id") == export_id]
    for path in candidates:
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed
