"""Stage 1, discover: list the project, select frames, resolve poses, split into batches, write the plan."""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.formats import get_format
from stages.geometry import Pose, matrix_to_quat, quat_to_matrix
from stages.mappings import load_mapping, merge_mapping
from stages.model import FrameRef
from stages.plan import ExportPlan
from stages.request import CoordinateSystem, ExportRequest
from stages.sources import open_project
from stages.errors import InputError


@dataclass
class DiscoverResult:
    export_id: str
    staging_dir: str
    plan_path: str
    n_frames: int
    n_key_frames: int
    n_batches: int
    batch_sizes: list[int]
    warnings: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _select(frames: list[FrameRef], req: ExportRequest) -> list[FrameRef]:
    """Frame selection: start/end (inclusive; a frame id, or else an index, negative ones counting from the end as
    in Python: -1 is the last frame), then step, then max_frames. An index outside [-n, n) is an ``InputError``
    naming the field (never wrapped around)."""
    ids = [f.frame_id for f in frames]
    n = len(frames)

    def position(value: str | int, name: str) -> int:
        text = str(value)
        if text in ids:
            return ids.index(text)
        if text.lstrip("-").isdigit() and -n <= int(text) < n:
            return int(text) % n
        raise InputError(f"{name} {value!r} is neither a frame id of this project nor a frame index "
                         f"from {-n} to {n - 1}")

    start = position(req.start_frame, "start_frame") if req.start_frame is not None else 0
    end = position(req.end_frame, "end_frame") if req.end_frame is not None else len(frames) - 1
    selected = frames[start:end + 1:req.frame_step]
    if req.max_frames is not None:
        selected = selected[:req.max_frames]
    return selected


def _slerp_pose(a: Pose, b: Pose, t: float) -> Pose:
    qa, qb = a.rotation / np.linalg.norm(a.rotation), b.rotation / np.linalg.norm(b.rotation)
    dot = float(np.dot(qa, qb))
    if dot < 0:
        qb, dot = -qb, -dot
    if dot > 0.9995:
        q = qa + t * (qb - qa)
    else:
        theta = np.arccos(dot)
        q = (np.sin((1 - t) * theta) * qa + np.sin(t * theta) * qb) / np.sin(theta)
    q = matrix_to_quat(quat_to_matrix(q))
    return Pose(a.translation + t * (b.translation - a.translation), q)


def resolve_ego_poses(frames: list[FrameRef], poses: list[Pose | None]) -> tuple[list[Pose], list[dict[str, Any]]]:
    """Missing-pose policy: a frame without a pose file gets the pose interpolated in time between the nearest
    frames that have one (linear translation, slerp rotation), or the nearest one's pose at the ends. With no
    pose at all, every frame gets the identity (global frame = ego frame). Each filled-in frame is a warning."""
    known = [i for i, p in enumerate(poses) if p is not None]
    warnings: list[dict[str, Any]] = []
    if not known:
        if frames:
            warnings.append({"frame": None, "file": None,
                             "warning": "no ego poses in the project: identity used for every frame"})
        return [Pose.identity() for _ in frames], warnings
    out: list[Pose] = []
    for i, pose in enumerate(poses):
        if pose is not None:
            out.append(pose)
            continue
        before = max((k for k in known if k < i), default=None)
        after = min((k for k in known if k > i), default=None)
        if before is None or after is None:
            near = after if before is None else before
            out.append(poses[near])
            how = f"copied from frame {frames[near].frame_id}"
        else:
            t0, t1, t = frames[before].timestamp_us, frames[after].timestamp_us, frames[i].timestamp_us
            out.append(_slerp_pose(poses[before], poses[after], (t - t0) / max(t1 - t0, 1)))
            how = f"interpolated between frames {frames[before].frame_id} and {frames[after].frame_id}"
        warnings.append({"frame": frames[i].frame_id, "file": None, "warning": f"missing ego pose: {how}"})
    return out, warnings


def load_mapping_for(fmt, layout: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The format's mapping file with ``overrides`` merged in, checked by the format (``ValueError``)."""
    if not fmt.mapping_name:
        if overrides:
            raise ValueError(f"format {fmt.name} has no mapping to override")
        return {}
    mapping = merge_mapping(load_mapping(fmt.mapping_name), overrides, fmt.open_mapping_sections)
    if overrides:
        fmt.check_mapping(mapping, layout)
    return mapping


def discover(project_dir: str | Path, request: ExportRequest, staging_dir: str | Path, *, export_id: str,
             batch_size: int = 50, source_settings: dict[str, Any] | None = None,
             project_name: str | None = None, layout: str | None = None,
             mapping_overrides: dict[str, Any] | None = None) -> DiscoverResult:
    """List ``project_dir``, decide what to export and write ``plan.json`` into ``staging_dir``.

    ``layout`` forces the source layout (None = detected), ``source_settings`` are the layout's settings
    (e.g. SUSTechPOINTS' ``lidar_axes``), ``mapping_overrides`` are merged over the format's mapping file
    (``stages.mappings.merge_mapping``); the plan stores the merged mapping, so every batch uses it.

    Returns only small data (counts and paths). Raises ``InputError`` for an unusable project and
    ``ValueError`` for a request the format cannot honour.
    """
    fmt = get_format(request.export_format.value)
    if request.coordinate_system is None:
        request = request.model_copy(update={"coordinate_system": CoordinateSystem(fmt.default_coordinate_system)})
    fmt.check_request(request)
    source = open_project(project_dir, source_settings, layout=layout)
    mappings = load_mapping_for(fmt, source.layout, mapping_overrides)
    calibration = source.calibration()
    frames = _select(source.frames(), request)
    if not frames:
        raise InputError("no frames to export (empty project or empty frame selection)", path=project_dir)

    opts = request.export_options
    interval = opts.key_frame_interval
    key_frames = [i % interval == 0 for i in range(len(frames))]
    if not opts.include_sweeps and interval > 1:
        frames = [f for f, k in zip(frames, key_frames) if k]
        key_frames = [True] * len(frames)

    if fmt.reads_ego_poses(request):
        ego_poses, warnings = resolve_ego_poses(frames, [source.read_ego_pose(f) for f in frames])
    else:
        ego_poses, warnings = [Pose.identity() for _ in frames], []
    warnings = [{"frame": None, "file": None, "warning": w} for w in source.setting_warnings()] + warnings

    staging = Path(staging_dir)
    if staging.exists():
        shutil.rmtree(staging)  # a re-run of discover starts from a clean plan
    staging.mkdir(parents=True)
    batch_size = max(1, int(batch_size))
    batches = [list(range(i, min(i + batch_size, len(frames)))) for i in range(0, len(frames), batch_size)]
    plan = ExportPlan(
        export_id=export_id, project_name=project_name or source.project_name,
        project_dir=str(source.project_dir.resolve()), layout=source.layout, source_settings=source.settings,
        request=request, calibration=calibration, main_lidar=source.main_lidar, frames=frames,
        ego_poses=ego_poses, key_frames=key_frames, batches=batches, staging_dir=str(staging.resolve()),
        mappings=mappings, warnings=warnings,
    )
    plan_path = plan.save()
    return DiscoverResult(export_id=export_id, staging_dir=plan.staging_dir, plan_path=str(plan_path),
                          n_frames=len(frames), n_key_frames=sum(key_frames), n_batches=len(batches),
                          batch_sizes=[len(b) for b in batches], warnings=len(warnings))
