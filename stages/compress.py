"""Stage 4, compress: write ``manifest.json`` (per-file sha256, counts, request, versions) into the dataset
tree and pack it as zip, tar.gz, tar.zst or a plain folder, via a temp name + atomic rename."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.plan import MERGE_FILE, ExportPlan, write_json_atomic
from stages.request import ArchiveFormat

MANIFEST = "manifest.json"
EXTENSIONS = {ArchiveFormat.zip: ".zip", ArchiveFormat.tar_gz: ".tar.gz", ArchiveFormat.tar_zst: ".tar.zst",
              ArchiveFormat.none: ""}
# Already-compressed or incompressible payloads are stored, not deflated: deflating them costs CPU for ~0 gain.
_STORED_SUFFIXES = {".jpg", ".jpeg", ".png", ".bin", ".zip", ".gz", ".zst"}


@dataclass
class CompressResult:
    path: str
    size: int
    files: int
    archive_format: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("nextpoints-export", "nuscenes-devkit", "numpy", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(plan: ExportPlan, output_dir: Path) -> dict[str, Any]:
    files = sorted(p for p in output_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    merge_path = Path(plan.staging_dir) / MERGE_FILE
    merged = json.loads(merge_path.read_text()) if merge_path.is_file() else {}
    manifest = {
        "export_id": plan.export_id, "project": plan.project_name, "layout": plan.layout,
        "request": plan.request.model_dump(mode="json"),
        "counts": merged.get("counts", {}), "filtered": merged.get("filtered", {}),
        "warnings": merged.get("warnings", []), "versions": _versions(),
        "files": {p.relative_to(output_dir).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
                  for p in files},
    }
    write_json_atomic(output_dir / MANIFEST, manifest, indent=1)
    return manifest


def archive_path(export_root: str | Path, export_id: str, archive_format: ArchiveFormat) -> Path:
    return Path(export_root) / f"{export_id}{EXTENSIONS[archive_format]}"


def compress(staging_dir: str | Path, dest: str | Path) -> CompressResult:
    """Pack the dataset tree of the export in ``staging_dir`` into ``dest`` (a file for archives, a folder for
    ``none``); the archive format comes from the request (``compress_output: false`` means ``none``)."""
    plan = ExportPlan.load(staging_dir)
    fmt = plan.request.export_options.archive_format
    output_dir = plan.output_dir
    manifest = write_manifest(plan, output_dir)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    members = sorted(p for p in output_dir.rglob("*") if p.is_file())
    try:
        size = _pack(fmt, output_dir, members, tmp, dest)
    except BaseException:  # a failed (or retried) compress leaves no half-written archive behind
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return CompressResult(path=str(dest), size=size, files=len(manifest["files"]) + 1, archive_format=fmt.value)


def _pack(fmt: ArchiveFormat, output_dir: Path, members: list[Path], tmp: Path, dest: Path) -> int:
    """Write ``members`` (files under ``output_dir``) as ``fmt`` to ``tmp``, rename it to ``dest``; its size."""
    if fmt == ArchiveFormat.none:
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(output_dir, tmp, copy_function=_link_or_copy)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        size = sum(p.stat().st_size for p in members)
    else:
        if fmt == ArchiveFormat.zip:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                for p in members:
                    stored = p.suffix.lower() in _STORED_SUFFIXES
                    zf.write(p, p.relative_to(output_dir).as_posix(),
                             compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                             compresslevel=None if stored else 6)
        elif fmt == ArchiveFormat.tar_gz:
            with tarfile.open(tmp, "w:gz", compresslevel=1) as tf:
                _add_members(tf, output_dir, members)
        else:
            import zstandard

            with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as zw:
                with tarfile.open(fileobj=zw, mode="w|") as tf:
                    _add_members(tf, output_dir, members)
        os.replace(tmp, dest)
        size = dest.stat().st_size
    return size


def _add_members(tf: tarfile.TarFile, root: Path, members: list[Path]) -> None:
    for p in members:
        tf.add(p, arcname=p.relative_to(root).as_posix(), recursive=False)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link staged files into the final folder when on the same file system (no bytes copied)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
