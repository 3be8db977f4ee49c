"""The NextPoints project layout (``<root>/<name>/nextpoints/``), read into the internal model.

Layout (see ``../shared/docs/input-formats.md``, section 1)::

    calib/<channel>.json            sensor→ego (base_link) pose per sensor, camera_config for cameras
    lidar/<lidar_channel>/<ts>.pcd  the main lidar channel's stems define the frames
    camera/<channel>/<ts>.jpg       .jpg / .jpeg / .png, may be missing for some frames
    ego_pose/<ts>.json              optional: ego→map pose
    label/<ts>.json                 optional: a list of boxes in the main lidar frame

Frame ids are integer nanosecond timestamps; ``timestamp_us = ns // 1000``. Quaternions are scalar-last on disk
and converted to [w, x, y, z] here; legacy labels carry Euler angles {x, y, z} (radians, R = Rx·Ry·Rz).

Settings (``settings`` of ``open_project``): ``main_lidar`` (str) forces the lidar channel whose frames define
the recording. Any other key is rejected.
"""
from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import InputError
from stages.geometry import Pose, euler_xyz_to_quat, quat_from_xyzw
from stages.model import BoxLabel, FrameRef, SensorCalib
from stages.sources.base import ProjectSource, read_json_input

INNER_DIR = "nextpoints"
DEFAULT_MAIN_LIDAR = "lidar-fusion"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # preference order when one stem has several images
SETTINGS_KEYS = frozenset({"main_lidar"})


def _inner(project_dir: Path) -> Path:
    """``<root>/<name>`` → ``<root>/<name>/nextpoints`` when that is where the data lives."""
    project_dir = Path(project_dir)
    if not (project_dir / "lidar").is_dir() and (project_dir / INNER_DIR).is_dir():
        return project_dir / INNER_DIR
    return project_dir


def _list_dir(path: Path) -> list[os.DirEntry]:
    """One ``os.scandir`` of ``path`` ([] when it does not exist): cheap for thousands of files."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return []


def _stems(path: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """stem → file path for the files of ``path`` ending in one of ``suffixes`` (first suffix wins)."""
    found: dict[str, tuple[int, str]] = {}
    for entry in _list_dir(path):
        name = entry.name
        if name.startswith("."):
            continue
        lower = name.lower()
        for rank, suffix in enumerate(suffixes):
            if lower.endswith(suffix):
                stem = name[: -len(suffix)]
                if stem not in found or rank < found[stem][0]:
                    found[stem] = (rank, entry.path)
                break
    return {stem: p for stem, (_, p) in found.items()}



class _Where:
    """Where a value comes from, so that every error names the frame, the file and the field."""

    def __init__(self, path, frame: str | None = None, prefix: str = ""):
        self.path, self.frame, self.prefix = path, frame, prefix

    def error(self, field: str, problem: str) -> InputError:
        return InputError(f"{self.prefix}{field}: {problem}", path=self.path, frame=self.frame)


def _number(value: Any, field: str, where: _Where) -> float:
    """A finite float, or an InputError saying which field is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise where.error(field, f"must be finite, got {value!r}")
    return float(value)


def _mapping(obj: Any, key: str, field: str, where: _Where) -> dict:
    """``obj[key]`` which must be a JSON object; ``field`` is its dotted name for messages."""
    if not isinstance(obj, dict) or key not in obj or obj[key] is None:
        raise where.error(field, "missing")
    value = obj[key]
    if not isinstance(value, dict):
        raise where.error(field, f"must be an object, got {value!r}")
    return value


def _vector(obj: dict, field: str, where: _Where, keys: str = "xyz") -> list[float]:
    out = []
    for k in keys:
        if k not in obj:
            raise where.error(f"{field}.{k}", "missing")
        out.append(_number(obj[k], f"{field}.{k}", where))
    return out


def _rotation(rot: dict, field: str, where: _Where) -> np.ndarray:
    """[w, x, y, z] of a scalar-last quaternion, or of legacy Euler angles {x, y, z} (R = Rx·Ry·Rz)."""
    if "w" in rot:
        q = quat_from_xyzw(*_vector(rot, field, where, "xyzw"))
        norm = float(np.linalg.norm(q))
        if norm < 1e-6:
            raise where.error(field, "is a zero quaternion")
        q = q / norm
        return -q if q[0] < 0 else q
    return euler_xyz_to_quat(*_vector(rot, field, where, "xyz"))


def _pose(obj: Any, field: str, where: _Where) -> Pose:
    """A ``{transform: {translation {x,y,z}, rotation {x,y,z,w}}}`` record (child→parent, metres)."""
    if not isinstance(obj, dict):
        raise where.error(field, f"must be an object, got {obj!r}")
    transform = _mapping(obj, "transform", f"{field}.transform", where)
    translation = _vector(_mapping(transform, "translation", f"{field}.transform.translation", where),
                          f"{field}.transform.translation", where)
    rotation = _rotation(_mapping(transform, "rotation", f"{field}.transform.rotation", where),
                         f"{field}.transform.rotation", where)
    return Pose(np.asarray(translation, dtype=np.float64), rotation)


def parse_labels(objects: Any, path: str, frame: str) -> list[BoxLabel]:
    """Boxes of one NextPoints label file (already JSON-decoded) in the main lidar frame.

    ``psr.position`` in metres, ``psr.scale`` = (length, width, height) in metres (each > 0), ``psr.rotation``
    a scalar-last quaternion or legacy Euler {x, y, z}. ``obj_attr`` is split on commas. Raises ``InputError``
    naming ``frame`` and ``path`` for anything malformed. A missing ``obj_id`` gets a frame-local id (the box
    becomes an instance of its own); an ``obj_id`` repeated within the frame is an error.
    """
    if not isinstance(objects, list):
        raise InputError(f"label file must hold a JSON list of objects, got {type(objects).__name__}",
                         path=path, frame=frame)
    boxes: list[BoxLabel] = []
    seen: dict[str, int] = {}
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise InputError(f"object {i} must be a JSON object, got {obj!r}", path=path, frame=frame)
        raw_id = obj.get("obj_id")
        obj_id = str(raw_id).strip() if raw_id is not None else ""
        where = _Where(path, frame, f"object {i} (obj_id {obj_id!r}) " if obj_id else f"object {i} ")
        if not obj_id:
            obj_id = f"_unnamed_{frame}_{i}"
        if obj_id in seen:
            raise where.error("obj_id", f"repeats the obj_id of object {seen[obj_id]} in the same frame")
        seen[obj_id] = i
        obj_type = obj.get("obj_type")
        if not isinstance(obj_type, str) or not obj_type.strip():
            raise where.error("obj_type", f"must be a non-empty string, got {obj_type!r}")
        psr = _mapping(obj, "psr", "psr", where)
        center = _vector(_mapping(psr, "position", "psr.position", where), "psr.position", where)
        size = _vector(_mapping(psr, "scale", "psr.scale", where), "psr.scale", where)
        for axis, value in zip("xyz", size):
            if value <= 0:
                raise where.error(f"psr.scale.{axis}", f"must be positive, got {value!r}")
        rotation = _rotation(_mapping(psr, "rotation", "psr.rotation", where), "psr.rotation", where)
        attr = obj.get("obj_attr")
        if attr is None:
            attributes = []
        elif isinstance(attr, str):
            attributes = [a.strip() for a in attr.split(",") if a.strip()]
        elif isinstance(attr, list) and all(isinstance(a, str) for a in attr):
            attributes = [a.strip() for a in attr if a.strip()]
        else:
            raise where.error("obj_attr", f"must be a comma-separated string, got {attr!r}")
        num_pts = obj.get("num_pts")
        if num_pts is not None:
            value = _number(num_pts, "num_pts", where)
            if value < 0 or value != int(value):
                raise where.error("num_pts", f"must be a non-negative integer, got {num_pts!r}")
            num_pts = int(value)
        score = obj.get("score", obj.get("confidence"))
        if score is not None:
            score = _number(score, "score", where)
        boxes.append(BoxLabel(obj_id=obj_id, obj_type=obj_type.strip(), center=np.asarray(center),
                              size=np.asarray(size), rotation=rotation, attributes=attributes,
                              num_pts=num_pts, score=score))
    return boxes


class NextPointsSource(ProjectSource):
    """Reader of one NextPoints project; ``project_dir`` may be ``<root>/<name>`` or ``<root>/<name>/nextpoints``."""

    layout = "nextpoints"

    def __init__(self, project_dir: Path, settings: dict[str, Any] | None = None):
        super().__init__(_inner(Path(project_dir)), settings)
        unknown = sorted(set(self.settings) - SETTINGS_KEYS)
        if unknown:
            raise ValueError(f"unknown nextpoints source settings {unknown}; known: {sorted(SETTINGS_KEYS)}")

    @property
    def project_name(self) -> str:
        resolved = self.project_dir.resolve()
        return resolved.parent.name if resolved.name == INNER_DIR else resolved.name

    @classmethod
    def detect(cls, project_dir: Path) -> bool:
        """A ``calib/`` folder holding ``<channel>.json`` files and a ``lidar/`` folder of channel folders
        (a SUSTechPOINTS scene has ``lidar/*.pcd`` directly and ``calib/camera/``)."""
        root = _inner(Path(project_dir))
        lidar_entries = _list_dir(root / "lidar")
        calib_entries = _list_dir(root / "calib")
        has_channels = any(e.is_dir() for e in lidar_entries)
        has_calib_files = any(e.is_file() and e.name.endswith(".json") for e in calib_entries)
        return has_channels and has_calib_files

    # -- calibration ---------------------------------------------------------------------------------------------

    @cached_property
    def _calib(self) -> dict[str, SensorCalib]:
        calib: dict[str, SensorCalib] = {}
        files = sorted((e.path for e in _list_dir(self.project_dir / "calib")
                        if e.is_file() and e.name.endswith(".json")))
        for path in files:
            item = self._parse_calib(path)
            if item.channel in calib:
                raise InputError(f"a second calibration for channel {item.channel!r}", path=path)
            calib[item.channel] = item
        return calib

    @staticmethod
    def _parse_calib(path: str) -> SensorCalib:
        """One ``calib/<channel>.json``: the sensor→ego pose and, for cameras, the pinhole intrinsics (pixels)."""
        d = read_json_input(path)
        where = _Where(path)
        if not isinstance(d, dict):
            raise InputError("calibration must be a JSON object", path=path)
        channel = d.get("channel") or Path(path).stem
        sensor_type = d.get("sensor_type")
        if sensor_type not in ("lidar", "camera", "radar", "imu", "gps"):
            raise where.error("sensor_type", f"must be lidar|camera|radar|imu|gps, got {sensor_type!r}")
        pose = _pose(d.get("pose"), "pose", where)
        if sensor_type != "camera":
            return SensorCalib(channel=str(channel), sensor_type=sensor_type, pose=pose)
        config = _mapping(d, "camera_config", "camera_config (required for a camera)", where)
        width = _number(config.get("width"), "camera_config.width", where)
        height = _number(config.get("height"), "camera_config.height", where)
        if width <= 0 or height <= 0 or width != int(width) or height != int(height):
            raise where.error("camera_config", f"width/height must be positive integers, got {width}x{height}")
        intr = _mapping(config, "intrinsic", "camera_config.intrinsic", where)
        fx, fy, cx, cy = (_number(intr.get(k), f"camera_config.intrinsic.{k}", where)
                          for k in ("fx", "fy", "cx", "cy"))
        skew = _number(intr.get("skew", 0.0), "camera_config.intrinsic.skew", where)
        intrinsic = np.array([[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        dist_raw = config.get("distortion_coefficients") or {}
        if not isinstance(dist_raw, dict):
            raise where.error("camera_config.distortion_coefficients", "must be an object")
        distortion = {k: _number(v, f"camera_config.distortion_coefficients.{k}", where)
                      for k, v in sorted(dist_raw.items())}
        return SensorCalib(channel=str(channel), sensor_type="camera", pose=pose, width=int(width),
                           height=int(height), intrinsic=intrinsic, distortion=distortion,
                           camera_model=config.get("model") or "pinhole")

    @cached_property
    def _lidar_folders(self) -> list[str]:
        return sorted(e.name for e in _list_dir(self.project_dir / "lidar") if e.is_dir())

    @cached_property
    def _main_lidar(self) -> str:
        folders = self._lidar_folders
        wanted = self.settings.get("main_lidar")
        if wanted is not None:
            if wanted not in folders:
                raise InputError(f"main_lidar {wanted!r} has no folder under lidar/ (found {folders})",
                                 path=self.project_dir / "lidar")
            return str(wanted)
        if DEFAULT_MAIN_LIDAR in folders:
            return DEFAULT_MAIN_LIDAR
        calibrated = [ch for ch, c in sorted(self._calib.items()) if c.sensor_type == "lidar" and ch in folders]
        if calibrated:
            return calibrated[0]
        if folders:
            return folders[0]
        raise InputError("no lidar channel folder under lidar/", path=self.project_dir / "lidar")

    @property
    def main_lidar(self) -> str:
        return self._main_lidar

    def calibration(self) -> dict[str, SensorCalib]:
        """Every calibrated sensor by channel; the main lidar must have its ``calib/<channel>.json``."""
        calib = self._calib
        main = self.main_lidar
        if main not in calib:
            raise InputError(f"no calibration for the main lidar {main!r}",
                             path=self.project_dir / "calib" / f"{main}.json")
        return dict(calib)

    @property
    def camera_channels(self) -> list[str]:
        return sorted(ch for ch, c in self._calib.items() if c.sensor_type == "camera")

    # -- frames --------------------------------------------------------------------------------------------------

    def frames(self) -> list[FrameRef]:
        """All frames of the main lidar sorted by their nanosecond stem; one directory listing per folder."""
        lidar_dir = self.project_dir / "lidar" / self.main_lidar
        clouds = _stems(lidar_dir, (".pcd",))
        bad = sorted(s for s in clouds if not s.isdigit())
        if bad:
            raise InputError(f"point cloud name {bad[0]!r} is not an integer nanosecond timestamp "
                             f"({len(bad)} such files)", path=clouds[bad[0]], frame=bad[0])
        images = {ch: _stems(self.project_dir / "camera" / ch, IMAGE_SUFFIXES) for ch in self.camera_channels}
        poses = _stems(self.project_dir / "ego_pose", (".json",))
        labels = _stems(self.project_dir / "label", (".json",))
        out = []
        for stem in sorted(clouds, key=int):
            out.append(FrameRef(frame_id=stem, timestamp_us=int(stem) // 1000, lidar={self.main_lidar: clouds[stem]},
                                cameras={ch: found.get(stem) for ch, found in images.items()},
                                ego_pose=poses.get(stem), label=labels.get(stem)))
        return out

    def read_points(self, frame: FrameRef) -> np.ndarray:
        """(N, 5) float32 x, y, z, intensity, ring of the main lidar, in the main lidar frame (metres)."""
        from stages.pcd import read_points_xyzir

        return self.read_cloud_file(frame, frame.lidar.get(self.main_lidar), read_points_xyzir)

    def read_ego_pose(self, frame: FrameRef) -> Pose | None:
        """ego→global (map) pose of ``frame`` in metres, or None when it has no pose file."""
        if frame.ego_pose is None:
            return None
        return _pose(read_json_input(frame.ego_pose, frame.frame_id), "ego pose",
                     _Where(frame.ego_pose, frame.frame_id))

    def read_labels(self, frame: FrameRef) -> list[BoxLabel]:
        """Boxes of ``frame`` in the main lidar frame; [] when the frame has no label file."""
        if frame.label is None:
            return []
        return parse_labels(read_json_input(frame.label, frame.frame_id), frame.label, frame.frame_id)
