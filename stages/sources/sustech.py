"""The SUSTechPOINTS scene layout (legacy input), read into the internal model.

A scene folder (see ``../shared/docs/input-formats.md`` section 2)::

    lidar/<frame>.pcd | lidar/<frame>.bin      the main lidar, channel name "lidar"; frames = these stems
    camera/<cam>/<frame>.jpg|.jpeg|.png        one folder per camera; camera channels = these folder names
    calib/camera/<cam>.json                    {"extrinsic" | "lidar_to_camera": 16 numbers, "intrinsic": 9}
    label/<frame>.json                         optional: a list of objects, or {"frame": ..., "objs": [...]}
    ego_pose/<frame>.json                      optional (see "Ego poses" below)

Coordinates. Labels and points stay in the lidar frame, as written; the lidar's calibration (lidar→ego) carries
the axis convention, so that the ego frame is x forward, y left, z up as nuScenes wants. Each camera's
calibration is camera→ego = (lidar→ego) ∘ inverse(lidar→camera). The extrinsic's rotation block must be a
rotation within 1e-3 (it is re-orthonormalised to the nearest rotation); its last row must be 0 0 0 1.

Per-project settings (``source_settings``; any other key is rejected with an ``InputError``):

``lidar_axes`` (default ``"x_forward"``)
    ``"x_forward"``: the lidar's axes already are x forward, y left, z up: lidar→ego rotation is the identity.
    ``"x_left_y_back"``: SUSTech's own recordings (lidar x points left, y backward): lidar→ego is Rz(+90°).
    There is no auto-detection: the axis convention is a property of the rig, stated per project.
``lidar_height`` (default ``0.0``)
    Height in metres of the lidar above the ego origin (the z of the lidar→ego translation).
``frame_rate_hz`` (default ``10``) and ``frame_time_base_s`` (default ``1_600_000_000``)
    Timestamps of frames whose stem is a frame number (``000950``):
    ``timestamp_us = frame_time_base_s * 1e6 + round(int(stem) * 1e6 / frame_rate_hz)``.
    A stem that is a Unix time is converted instead: ``1625625063.000`` (seconds with a decimal point), or a
    plain integer of 10 / 13 / 16 / 19 digits (seconds / ms / µs / ns). Integers of at most 9 digits are frame
    numbers. Any other stem is an ``InputError``.
``camera_image_size`` (default none)
    ``{"<cam>": [width, height]}``, or one ``[width, height]`` for every camera: the image size of a camera
    that has no image file at all. Otherwise the size is read from the header of the camera's first image.

Labels. ``psr.position`` is the box centre (lidar frame), ``psr.scale`` = (length, width, height),
``psr.rotation`` is Euler ``{x, y, z}`` radians with R = Rx·Ry·Rz, or a quaternion ``{x, y, z, w}`` (scalar last).
``obj_type`` is kept as written (``Car``, ``Pedestrian``, ...; mapping to a format's categories is the format's
job). ``obj_attr`` (a comma-separated string or a list of strings) becomes the attributes. A missing, null or
empty ``obj_id`` gets the id ``"<frame>#<index>"`` (a track of its own). Anything malformed is an
``InputError`` naming the frame and the file.

Ego poses. The example data has none and SUSTech's INS records (string values) are not documented well enough
to interpret without guessing. A pose file is read only when it holds a NextPoints-style
``{"transform": {"translation": {x, y, z}, "rotation": {x, y, z, w}}}`` (numbers or numeric strings), taken as
ego→global; any other record reads as "no pose" (``None``), and discover's missing-pose policy applies (with a
warning per frame).

Point files. ``.pcd`` via ``stages.pcd`` (padding fields are skipped); ``.bin`` is headerless little-endian
float32 x, y, z, intensity (16 bytes per point). Ring is 0 when the file has none.
"""
from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.errors import InputError, PointCloudError, unreadable
from stages.geometry import Pose, euler_xyz_to_quat, matrix_to_quat, quat_from_xyzw
from stages.model import BoxLabel, FrameRef, SensorCalib
from stages.pcd import read_points_xyzir
from stages.sources.base import ProjectSource, read_json_input

LIDAR_CHANNEL = "lidar"
POINT_SUFFIXES = (".pcd", ".bin")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIDAR_AXES = {
    "x_forward": np.eye(3),
    # lidar x (left) -> ego y, lidar y (back) -> ego -x: a +90° turn about z.
    "x_left_y_back": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
}
DEFAULT_SETTINGS: dict[str, Any] = {"lidar_axes": "x_forward", "lidar_height": 0.0, "frame_rate_hz": 10.0,
                                    "frame_time_base_s": 1_600_000_000, "camera_image_size": None}
ROTATION_TOLERANCE = 1e-3
_UNIX_DIGITS = {10: 6, 13: 3, 16: 0, 19: -3}  # digits of an integer Unix time (s, ms, µs, ns) -> power of 10 to µs
_DECIMAL_SECONDS = re.compile(r"^(\d+)\.(\d+)$")


class SustechSource(ProjectSource):
    layout = "sustech"

    def __init__(self, project_dir: Path, settings: dict[str, Any] | None = None):
        super().__init__(project_dir, settings)
        self._options = self._check_settings(self.settings)
        self._calibration: dict[str, SensorCalib] | None = None

    # --- settings -----------------------------------------------------------------------------------------

    def _check_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        def bad(problem: str) -> InputError:
            return InputError(f"SUSTechPOINTS source setting {problem}", path=self.project_dir)

        unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise bad(f"key(s) {', '.join(map(repr, unknown))} unknown; known keys: {', '.join(DEFAULT_SETTINGS)}")
        opts = {**DEFAULT_SETTINGS, **settings}
        if opts["lidar_axes"] not in LIDAR_AXES:
            raise bad(f"lidar_axes {opts['lidar_axes']!r} is not one of {', '.join(map(repr, LIDAR_AXES))}")
        for key in ("lidar_height", "frame_rate_hz", "frame_time_base_s"):
            if not _is_number(opts[key]) or not math.isfinite(opts[key]):
                raise bad(f"{key} must be a finite number, got {opts[key]!r}")
        if opts["frame_rate_hz"] <= 0:
            raise bad(f"frame_rate_hz must be positive, got {opts['frame_rate_hz']!r}")
        size = opts["camera_image_size"]
        if size is not None:
            sizes = size.values() if isinstance(size, dict) else [size]
            if not all(isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
                       for s in sizes):
                raise bad("camera_image_size must be [width, height] or {camera: [width, height]} "
                          f"with positive integers, got {size!r}")
        return opts

    def setting_warnings(self) -> list[str]:
        if "lidar_axes" in self.settings:
            return []
        # no auto-detection (see the module docstring): say which convention was assumed and how to change it
        return ["SUSTechPOINTS source setting lidar_axes not given: the lidar is taken as x forward, y left, z up "
                "(lidar->ego rotation = identity); SUSTech's own rigs have x left, y back: set source_settings "
                "{lidar_axes: x_left_y_back} (CLI: --source-setting lidar_axes=x_left_y_back), or "
                "{lidar_axes: x_forward} to confirm the default"]

    # --- layout -------------------------------------------------------------------------------------------

    @classmethod
    def detect(cls, project_dir: Path) -> bool:
        project_dir = Path(project_dir)
        lidar = project_dir / "lidar"
        has_clouds = lidar.is_dir() and any(p.suffix.lower() in POINT_SUFFIXES and p.is_file()
                                            for p in lidar.iterdir())
        return has_clouds or (project_dir / "calib" / "camera").is_dir()

    @property
    def main_lidar(self) -> str:
        return LIDAR_CHANNEL

    @property
    def _root(self) -> Path:
        return self.project_dir.resolve()

    def camera_channels(self) -> list[str]:
        """The camera folder names under ``camera/``, sorted."""
        cam_dir = self._root / "camera"
        if not cam_dir.is_dir():
            return []
        return sorted(p.name for p in cam_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    # --- calibration --------------------------------------------------------------------------------------

    def lidar_to_ego(self) -> Pose:
        """lidar→ego from the ``lidar_axes`` and ``lidar_height`` settings."""
        m = np.eye(4)
        m[:3, :3] = LIDAR_AXES[self._options["lidar_axes"]]
        m[2, 3] = float(self._options["lidar_height"])
        return Pose.from_matrix(m)

    def calibration(self) -> dict[str, SensorCalib]:
        if self._calibration is None:
            lidar_pose = self.lidar_to_ego()
            calib = {LIDAR_CHANNEL: SensorCalib(channel=LIDAR_CHANNEL, sensor_type="lidar", pose=lidar_pose)}
            for cam in self.camera_channels():
                calib[cam] = self._camera_calib(cam, lidar_pose)
            self._calibration = calib
        return dict(self._calibration)

    def _camera_calib(self, cam: str, lidar_pose: Pose) -> SensorCalib:
        path = self._root / "calib" / "camera" / f"{cam}.json"
        if not path.is_file():
            raise InputError(f"camera folder camera/{cam} has no calibration file calib/camera/{cam}.json",
                             path=path)
        data = read_json_input(path, frame=None)
        if not isinstance(data, dict):
            raise InputError("camera calibration is not a JSON object", path=path)
        keys = [k for k in ("extrinsic", "lidar_to_camera") if k in data]
        if not keys:
            raise InputError("camera calibration has neither 'extrinsic' nor 'lidar_to_camera'", path=path)
        mats = [_matrix(data[k], (4, 4), k, path) for k in keys]
        if len(mats) == 2 and not np.allclose(mats[0], mats[1], atol=1e-9):
            raise InputError("'extrinsic' and 'lidar_to_camera' disagree; keep one of them", path=path)
        lidar_to_cam = _rigid(mats[0], keys[0], path)
        if "intrinsic" not in data:
            raise InputError("camera calibration has no 'intrinsic'", path=path)
        intrinsic = _matrix(data["intrinsic"], (3, 3), "intrinsic", path)
        if not np.allclose(intrinsic[2], [0.0, 0.0, 1.0]):
            raise InputError(f"'intrinsic' last row must be 0 0 1, got {intrinsic[2].tolist()}", path=path)
        width, height = self._image_size(cam)
        return SensorCalib(channel=cam, sensor_type="camera", pose=lidar_pose.compose(lidar_to_cam.inverse()),
                           width=width, height=height, intrinsic=intrinsic, distortion=None, camera_model="pinhole")

    def _image_size(self, cam: str) -> tuple[int | None, int | None]:
        images = _by_stem(self._root / "camera" / cam, IMAGE_SUFFIXES)
        if images:
            first = images[min(images)]
            try:
                with Image.open(first) as img:  # lazy: only the header is parsed
                    return img.size
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(f"cannot read the image header: {exc}", path=first) from None
        size = self._options["camera_image_size"]
        if isinstance(size, dict):
            size = size.get(cam)
        return (int(size[0]), int(size[1])) if size else (None, None)

    # --- frames -------------------------------------------------------------------------------------------

    def frames(self) -> list[FrameRef]:
        root = self._root
        lidar_dir = root / "lidar"
        if not lidar_dir.is_dir():
            raise InputError("SUSTechPOINTS scene has no lidar/ folder", path=root)
        clouds: dict[str, Path] = {}
        for p in sorted(lidar_dir.iterdir()):
            if p.suffix.lower() not in POINT_SUFFIXES or p.name.startswith(".") or not p.is_file():
                continue
            if p.stem in clouds:
                raise InputError(f"two point clouds for frame {p.stem}: {clouds[p.stem].name} and {p.name}",
                                 path=p, frame=p.stem)
            clouds[p.stem] = p
        images = {cam: _by_stem(root / "camera" / cam, IMAGE_SUFFIXES) for cam in self.camera_channels()}
        labels = _by_stem(root / "label", (".json",))
        poses = _by_stem(root / "ego_pose", (".json",))
        refs = []
        for stem, cloud in clouds.items():
            refs.append(FrameRef(
                frame_id=stem, timestamp_us=self.timestamp_us(stem, cloud), lidar={LIDAR_CHANNEL: str(cloud)},
                cameras={cam: _opt_str(by_stem.get(stem)) for cam, by_stem in images.items()},
                ego_pose=_opt_str(poses.get(stem)), label=_opt_str(labels.get(stem))))
        refs.sort(key=lambda r: (r.timestamp_us, r.frame_id))
        for a, b in zip(refs, refs[1:]):
            if a.timestamp_us == b.timestamp_us:  # e.g. "950" and "000950": one time, two clouds
                raise InputError(f"frames {a.frame_id} and {b.frame_id} have the same time {a.timestamp_us} µs",
                                 path=b.lidar[LIDAR_CHANNEL], frame=b.frame_id)
        return refs

    def timestamp_us(self, stem: str, path: Path | None = None) -> int:
        """Unix microseconds of a frame stem (see the module docstring for the rules)."""
        if _DECIMAL_SECONDS.match(stem):  # exact decimal arithmetic: "1625625063.000" -> 1625625063000000
            return int((Decimal(stem) * 1_000_000).to_integral_value(ROUND_HALF_EVEN))
        if stem.isascii() and stem.isdigit():
            if len(stem) <= 9:
                base_us = self._options["frame_time_base_s"] * 1_000_000
                return int(round(base_us + int(stem) * 1_000_000 / self._options["frame_rate_hz"]))
            if len(stem) in _UNIX_DIGITS:
                return int((Decimal(stem).scaleb(_UNIX_DIGITS[len(stem)])).to_integral_value(ROUND_HALF_EVEN))
        raise InputError(f"frame id {stem!r} is neither a frame number (at most 9 digits) nor a Unix time "
                         "(seconds with decimals, or 10/13/16/19 digits)", path=path, frame=stem)

    # --- per-frame data -----------------------------------------------------------------------------------

    def read_points(self, frame: FrameRef) -> np.ndarray:
        return self.read_cloud_file(frame, frame.lidar.get(LIDAR_CHANNEL), _read_cloud)

    def read_ego_pose(self, frame: FrameRef) -> Pose | None:
        if frame.ego_pose is None:
            return None
        data = read_json_input(Path(frame.ego_pose), frame.frame_id)
        if not isinstance(data, dict) or "transform" not in data:
            return None  # an INS record: not interpreted (see the module docstring)
        try:
            t, r = data["transform"]["translation"], data["transform"]["rotation"]
            translation = np.array([float(t[k]) for k in "xyz"])
            rotation = quat_from_xyzw(*(float(r[k]) for k in "xyzw"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"ego pose 'transform' is malformed ({type(exc).__name__}: {exc})",
                             path=frame.ego_pose, frame=frame.frame_id) from None
        norm = np.linalg.norm(rotation)
        if not (np.all(np.isfinite(translation)) and np.isfinite(norm) and norm > 1e-9):
            raise InputError("ego pose has a non-finite translation or a zero rotation quaternion",
                             path=frame.ego_pose, frame=frame.frame_id)
        return Pose(translation, rotation / norm)

    def read_labels(self, frame: FrameRef) -> list[BoxLabel]:
        if frame.label is None:
            return []
        path = Path(frame.label)
        data = read_json_input(path, frame.frame_id)
        if isinstance(data, dict):
            if not isinstance(data.get("objs"), list):
                raise InputError("label file is an object without an 'objs' list", path=path, frame=frame.frame_id)
            data = data["objs"]
        elif not isinstance(data, list):
            raise InputError("label file is neither a list of objects nor {'objs': [...]}", path=path,
                             frame=frame.frame_id)
        return [_box(obj, i, path, frame.frame_id) for i, obj in enumerate(data)]


# --- helpers (module-private) -----------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` by stem; with several suffixes for one stem the earliest in ``suffixes`` wins."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in folder.iterdir():
        suffix = p.suffix.lower()
        if suffix in suffixes and not p.name.startswith(".") and p.is_file():
            old = found.get(p.stem)
            if old is None or suffixes.index(suffix) < suffixes.index(old.suffix.lower()):
                found[p.stem] = p
    return found



def _matrix(value: Any, shape: tuple[int, int], key: str, path: Path) -> np.ndarray:
    """A row-major matrix written as a flat list (or nested rows) of numbers."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        m = None
    n = shape[0] * shape[1]
    if m is None or m.size != n or m.ndim not in (1, 2) or not np.all(np.isfinite(m)):
        raise InputError(f"'{key}' must be {n} finite numbers (row-major {shape[0]}x{shape[1]})", path=path)
    return m.reshape(shape)


def _rigid(m: np.ndarray, key: str, path: Path) -> Pose:
    """A rigid transform from a 4x4 matrix whose rotation block is a rotation within ROTATION_TOLERANCE."""
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"'{key}' last row must be 0 0 0 1, got {m[3].tolist()}", path=path)
    rot = m[:3, :3]
    if np.abs(rot @ rot.T - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(rot) <= 0:
        raise InputError(f"'{key}' rotation block is not a rotation matrix (not orthonormal, or a reflection)",
                         path=path)
    u, _, vt = np.linalg.svd(rot)  # nearest rotation, so the quaternion round trip is exact
    return Pose(m[:3, 3].copy(), matrix_to_quat(u @ vt))


def _vector(d: Any, keys: str, what: str, path: Path, frame: str) -> list[float]:
    if not isinstance(d, dict):
        raise InputError(f"{what} is not an object with keys {', '.join(keys)}", path=path, frame=frame)
    out = []
    for k in keys:
        v = d.get(k)
        if not _is_number(v) or not math.isfinite(v):
            raise InputError(f"{what}.{k} must be a finite number, got {v!r}", path=path, frame=frame)
        out.append(float(v))
    return out


def _box(obj: Any, index: int, path: Path, frame: str) -> BoxLabel:
    where = f"object #{index}"
    if not isinstance(obj, dict):
        raise InputError(f"{where} is not a JSON object", path=path, frame=frame)
    obj_type = obj.get("obj_type")
    if not isinstance(obj_type, str) or not obj_type.strip():
        raise InputError(f"{where} has no obj_type", path=path, frame=frame)
    obj_id = obj.get("obj_id")
    if isinstance(obj_id, bool) or not isinstance(obj_id, (str, int, type(None))):
        raise InputError(f"{where} has an obj_id that is not a string or an integer: {obj_id!r}", path=path,
                         frame=frame)
    obj_id = str(obj_id).strip() if obj_id is not None else ""
    where = f"object #{index} (obj_id {obj_id!r})" if obj_id else where
    psr = obj.get("psr")
    if not isinstance(psr, dict):
        raise InputError(f"{where} has no psr", path=path, frame=frame)
    center = _vector(psr.get("position"), "xyz", f"{where} psr.position", path, frame)
    size = _vector(psr.get("scale"), "xyz", f"{where} psr.scale", path, frame)
    if min(size) <= 0:
        raise InputError(f"{where} psr.scale must be positive, got {size}", path=path, frame=frame)
    rot = psr.get("rotation")
    if isinstance(rot, dict) and "w" in rot:
        x, y, z, w = _vector(rot, "xyzw", f"{where} psr.rotation", path, frame)
        q = quat_from_xyzw(x, y, z, w)
        norm = np.linalg.norm(q)
        if norm < 1e-9:
            raise InputError(f"{where} psr.rotation is a zero quaternion", path=path, frame=frame)
        rotation = q / norm
    else:
        rotation = euler_xyz_to_quat(*_vector(rot, "xyz", f"{where} psr.rotation", path, frame))
    attr = obj.get("obj_attr")
    if attr is None:
        attributes: list[str] = []
    elif isinstance(attr, str):
        attributes = [a.strip() for a in attr.split(",") if a.strip()]
    elif isinstance(attr, list) and all(isinstance(a, str) for a in attr):
        attributes = [a.strip() for a in attr if a.strip()]
    else:
        raise InputError(f"{where} obj_attr must be a string or a list of strings, got {attr!r}", path=path,
                         frame=frame)
    num_pts = obj.get("num_pts")
    score = obj.get("score")
    return BoxLabel(obj_id=obj_id or f"{frame}#{index}", obj_type=obj_type.strip(),
                    center=np.array(center), size=np.array(size), rotation=rotation, attributes=attributes,
                    num_pts=int(num_pts) if _is_number(num_pts) else None,
                    score=float(score) if _is_number(score) else None)


def _read_cloud(path: str) -> np.ndarray:
    """``.bin`` (float32 x, y, z, intensity) or PCD, as (N, 5) float32 x, y, z, intensity, ring."""
    return _read_bin(path) if Path(path).suffix.lower() == ".bin" else read_points_xyzir(path)


def _read_bin(path: str | Path) -> np.ndarray:
    """A headerless float32 x, y, z, intensity file as (N, 5) x, y, z, intensity, ring=0."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PointCloudError("file not found", path=path) from None
    except OSError as exc:  # may pass (permission, I/O error): InputUnavailable, retried by the pipeline
        raise unreadable(exc, path) from None
    if len(raw) % 16:
        raise PointCloudError(f".bin point cloud size {len(raw)} bytes is not a multiple of 16 "
                              "(float32 x, y, z, intensity per point)", path=path)
    xyzi = np.frombuffer(raw, dtype="<f4").reshape(-1, 4)
    out = np.zeros((len(xyzi), 5), dtype=np.float32)
    out[:, :4] = xyzi
    return out
