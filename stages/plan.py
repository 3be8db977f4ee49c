"""The export plan: everything discover decided, written once to the staging folder as ``plan.json``.

Staging layout of one export (``staging_dir``)::

    plan.json                       this plan
    batches/<NNNNN>/<table>.arrow   one folder per convert batch, Arrow IPC per table, renamed into place whole
    batches/<NNNNN>/result.json     the batch's counts and warnings (written inside the same folder)
    output/                         the dataset tree: sensor files (convert) and tables (merge)
    merge.json                      merge's counts and report
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.geometry import Pose
from stages.model import FrameRef, SensorCalib
from stages.request import ExportRequest

PLAN_FILE = "plan.json"
BATCHES_DIR = "batches"
OUTPUT_DIR = "output"
MERGE_FILE = "merge.json"


@dataclass
class ExportPlan:
    export_id: str
    project_name: str
    project_dir: str
    layout: str  # source layout name, e.g. "nextpoints"
    source_settings: dict[str, Any]
    request: ExportRequest
    calibration: dict[str, SensorCalib]
    main_lidar: str
    frames: list[FrameRef]
    ego_poses: list[Pose]  # ego→global per frame, missing-pose policy already applied
    key_frames: list[bool]  # per frame: a sample (True) or a sweep (False)
    batches: list[list[int]]  # frame indices per convert batch
    staging_dir: str
    mappings: dict[str, Any] = field(default_factory=dict)  # format mappings (channels, categories, ...)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # discover-time warnings (missing poses, ...)

    @property
    def output_dir(self) -> Path:
        return Path(self.staging_dir) / OUTPUT_DIR

    def batch_dir(self, index: int) -> Path:
        return Path(self.staging_dir) / BATCHES_DIR / f"{index:05d}"

    def to_json(self) -> dict[str, Any]:
        return {
            "export_id": self.export_id, "project_name": self.project_name, "project_dir": self.project_dir,
            "layout": self.layout, "source_settings": self.source_settings,
            "request": self.request.model_dump(mode="json"),
            "calibration": {k: v.to_json() for k, v in self.calibration.items()},
            "main_lidar": self.main_lidar,
            "frames": [f.to_json() for f in self.frames],
            "ego_poses": [[*map(float, p.translation), *map(float, p.rotation)] for p in self.ego_poses],
            "key_frames": self.key_frames, "batches": self.batches, "staging_dir": self.staging_dir,
            "mappings": self.mappings, "warnings": self.warnings,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ExportPlan":
        return ExportPlan(
            export_id=d["export_id"], project_name=d["project_name"], project_dir=d["project_dir"],
            layout=d["layout"], source_settings=d["source_settings"],
            request=ExportRequest.model_validate(d["request"]),
            calibration={k: SensorCalib.from_json(v) for k, v in d["calibration"].items()},
            main_lidar=d["main_lidar"],
            frames=[FrameRef.from_json(f) for f in d["frames"]],
            ego_poses=[Pose(np.asarray(p[:3]), np.asarray(p[3:])) for p in d["ego_poses"]],
            key_frames=list(d["key_frames"]), batches=[list(b) for b in d["batches"]],
            staging_dir=d["staging_dir"], mappings=d.get("mappings", {}), warnings=d.get("warnings", []),
        )

    def save(self) -> Path:
        path = Path(self.staging_dir) / PLAN_FILE
        write_json_atomic(path, self.to_json())
        return path

    @staticmethod
    def load(staging_dir: str | Path) -> "ExportPlan":
        with open(Path(staging_dir) / PLAN_FILE, encoding="utf-8") as f:
            return ExportPlan.from_json(json.load(f))


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = None) -> None:
    """Write JSON via a temp file + rename so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
    os.replace(tmp, path)
