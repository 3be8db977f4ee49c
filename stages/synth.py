"""A synthetic NextPoints project generator, for tests and benchmarks at any number of frames.

``generate_project(out_root, name, frames, cameras=6, seed=0, preset="default")`` writes
``out_root/name/nextpoints/`` in the NextPoints layout (calib, lidar/lidar-fusion, camera/<channel>, ego_pose,
label; frame ids are nanosecond timestamps at 10 Hz from 1708676399593999872) and returns that directory.
Output is byte-identical for the same arguments.

The world: the ego drives at 8 m/s counter-clockwise around a stadium-shaped loop (semicircles of radius 60 m
joined by 150 m straights), starting at the beginning of a curve so its pose rotates from the first frame.
Around it: vehicles in the three lanes and a bike lane that keep pace with the ego (smoothly varying speed),
pedestrians walking along both sidewalks, and static objects (``obj_attr: "static"``): parked vehicles,
a row of traffic cones / barriers and construction vehicles. No two boxes ever overlap; every box sits 6 cm
above the flat ground. Boxes within 50 m of the ego are labelled, in the lidar frame, yaw-only in the ego frame.

Points (x, y, z, intensity float32, binary PCD): the ground (≤ 2 cm of noise, always ≥ 5 cm below any box
bottom) plus points on every labelled box's surface shrunk by 3 cm, so each object point is ≥ 3 cm inside its
own box and outside all others: points-in-box counts are unambiguous.

Presets:
- ``default``: the lidar calibration is the identity (lidar = base_link); the ground is at z = -1.8 m.
- ``rotated_lidar``: lidar→ego is translation (0.9, 0.05, 1.8) and rotation Rz(+90°)·Ry(1°)·Rx(-0.8°), so
  base_link is on the ground; labels and points are written in that lidar frame.
Cameras (first ``cameras`` of CAMERA_CHANNELS) are pinhole, zero distortion, IMAGE_WIDTH×IMAGE_HEIGHT, 1.5 m
above the ground, looking out at yaws 0, +55, -55, 180, +110, -110 degrees.

Quirks of real data (only when frames >= 5): frame index 2 has no label file, frame index 3's labels use
legacy Euler rotations {x, y, z} (R = Rx·Ry·Rz, radians), frame index 4 misses one camera image
(camera-back-left, or the last camera when fewer than 5 cameras). Images are three pre-encoded JPEGs per camera
reused for every frame.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from stages.geometry import matrix_to_quat
from stages.pcd import write_pcd

LIDAR_CHANNEL = "lidar-fusion"
CAMERA_CHANNELS = ("camera-front", "camera-front-left", "camera-front-right",
                   "camera-back", "camera-back-left", "camera-back-right")
CAMERA_YAWS_DEG = (0.0, 55.0, -55.0, 180.0, 110.0, -110.0)
CAMERA_POSITIONS = ((1.7, 0.0), (1.5, 0.5), (1.5, -0.5), (-0.8, 0.0), (0.9, 0.6), (0.9, -0.6))  # (x, y) in ego
IMAGE_WIDTH, IMAGE_HEIGHT, CAMERA_HFOV_DEG = 640, 360, 70.0
FIRST_TIMESTAMP_NS, FRAME_STEP_NS = 1708676399593999872, 100_000_000
PRESETS = ("default", "rotated_lidar")
QUIRK_NO_LABEL, QUIRK_EULER_LABEL, QUIRK_MISSING_IMAGE = 2, 3, 4
EGO_SPEED, STRAIGHT, RADIUS = 8.0, 150.0, 60.0
LOOP = 2 * STRAIGHT + 2 * np.pi * RADIUS
MAP_ORIGIN = np.array([1200.0, 800.0, 0.0])
LABEL_RANGE, SURFACE_MARGIN, BOX_LIFT = 50.0, 0.03, 0.06
GROUND_POINTS = 16000
# (length, width, height) in metres
SIZES = {"car": (4.6, 1.9, 1.6), "van": (5.2, 2.0, 2.1), "pickup": (5.3, 2.0, 1.85), "truck": (8.5, 2.5, 3.4),
         "bus": (11.5, 2.9, 3.2), "trailer": (9.5, 2.5, 3.6), "construction_vehicle": (6.5, 2.8, 3.2),
         "motorcycle": (2.1, 0.8, 1.45), "bicycle": (1.75, 0.6, 1.2), "pedestrian": (0.6, 0.65, 1.75),
         "traffic_cone": (0.4, 0.4, 0.7), "barrier": (2.0, 0.5, 1.0)}
# vehicles keeping pace with the ego: (type, lateral offset d (left +), arc-length offset from the ego)
TRAFFIC = (("car", 0.0, 16.0), ("motorcycle", 0.0, -13.0), ("car", 0.0, 34.0),
           ("truck", 3.5, 6.0), ("car", 3.5, -14.0), ("van", 3.5, 26.0), ("car", 3.5, -30.0),
           ("bus", -3.5, -2.0), ("car", -3.5, 18.0), ("pickup", -3.5, -22.0), ("car", -3.5, 35.0),
           ("bicycle", -5.8, 8.0), ("bicycle", -5.8, -16.0))
# rows along the loop: (types, lateral offset, (min, max) gap between boxes, speed along the row, static?)
ROWS = ((("car", "car", "van", "pickup", "trailer"), -7.7, (2.0, 12.0), 0.0, True),
        (("traffic_cone", "traffic_cone", "barrier"), 5.6, (2.0, 14.0), 0.0, True),
        (("construction_vehicle",), 8.5, (30.0, 80.0), 0.0, True),
        (("pedestrian",), -10.8, (3.0, 25.0), 1.3, False),
        (("pedestrian",), 11.0, (3.0, 25.0), -1.2, False))


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _lidar_pose(preset: str) -> tuple[np.ndarray, np.ndarray]:
    """Lidar→ego (rotation matrix, translation) of a preset."""
    if preset == "default":
        return np.eye(3), np.zeros(3)
    p, r = np.radians(1.0), np.radians(-0.8)
    rot_y = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    return _rot_z(np.pi / 2) @ rot_y @ rot_x, np.array([0.9, 0.05, 1.8])


def _track(s: np.ndarray, d: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map-frame (x, y, heading) at arc length ``s`` along the loop, shifted ``d`` metres to its left."""
    s = np.mod(np.asarray(s, dtype=np.float64), LOOP)
    a1, a2, a3 = STRAIGHT, STRAIGHT + np.pi * RADIUS, 2 * STRAIGHT + np.pi * RADIUS
    phi1, phi2 = (s - a1) / RADIUS, (s - a3) / RADIUS
    seg = [s < a1, s < a2, s < a3]
    x = np.select(seg, [s, a1 + RADIUS * np.sin(phi1), a1 - (s - a2)], -RADIUS * np.sin(phi2))
    y = np.select(seg, [0.0 * s, RADIUS - RADIUS * np.cos(phi1), 2 * RADIUS + 0.0 * s], RADIUS + RADIUS * np.cos(phi2))
    h = np.select(seg, [0.0 * s, phi1, np.pi + 0.0 * s], np.pi + phi2)
    return x - d * np.sin(h), y + d * np.cos(h), h


def _world(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All objects: type, size, lane offset, and the parameters of their arc-length motion s(t)."""
    types, d, s0, speed, amp, omega, phase, static = [], [], [], [], [], [], [], []
    for kind, lane, offset in TRAFFIC:  # s = s_ego(t) + offset + amp·sin(omega·t + phase): |Δv| ≤ ~0.6 m/s
        types.append(kind); d.append(lane); s0.append(offset); speed.append(EGO_SPEED)
        amp.append(rng.uniform(0.5, 2.0)); omega.append(rng.uniform(0.1, 0.3)); phase.append(rng.uniform(0, 6.28))
        static.append(False)
    for kinds, lane, (gmin, gmax), row_speed, is_static in ROWS:
        s, prev_half = rng.uniform(0.0, gmax), 0.0
        while True:
            kind = kinds[rng.integers(len(kinds))]
            s += prev_half + rng.uniform(gmin, gmax) + SIZES[kind][0] / 2
            if s + SIZES[kind][0] / 2 + gmin > LOOP - 1.0:  # keep the wrap-around gap
                break
            types.append(kind); d.append(lane); s0.append(s); speed.append(row_speed)
            amp.append(0.0); omega.append(0.0); phase.append(0.0); static.append(is_static)
            prev_half = SIZES[kind][0] / 2
    n = len(types)
    # sizes vary ±4 %; widths stay within lane clearances
    size = np.array([SIZES[t] for t in types]) * rng.uniform(0.96, 1.04, (n, 3))
    return {"type": np.array(types), "size": size, "d": np.array(d), "s0": np.array(s0),
            "speed": np.array(speed), "amp": np.array(amp), "omega": np.array(omega), "phase": np.array(phase),
            "static": np.array(static), "pace": np.arange(n) < len(TRAFFIC)}


def _frame_state(world: dict, t: float, ego_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Map-frame (x, y) centres and headings of all objects at time ``t``."""
    s = world["s0"] + world["speed"] * t + world["amp"] * np.sin(world["omega"] * t + world["phase"])
    s = np.where(world["pace"], s - EGO_SPEED * t + ego_s, s)
    x, y, h = _track(s, world["d"])
    h = np.where(world["speed"] < 0, h + np.pi, h)
    return np.stack([x, y], axis=1) + MAP_ORIGIN[:2], h


def _xyz(v) -> dict:
    return {"x": round(float(v[0]), 6), "y": round(float(v[1]), 6), "z": round(float(v[2]), 6)}


def _quat(m: np.ndarray) -> dict:
    w, x, y, z = matrix_to_quat(m)
    return {"x": round(float(x), 8), "y": round(float(y), 8), "z": round(float(z), 8), "w": round(float(w), 8)}


def _euler_xyz(m: np.ndarray) -> dict:
    """Legacy Euler angles (rx, ry, rz) with R = Rx·Ry·Rz."""
    ry = np.arcsin(np.clip(m[0, 2], -1.0, 1.0))
    return _xyz([np.arctan2(-m[1, 2], m[2, 2]), ry, np.arctan2(-m[0, 1], m[0, 0])])


def _pose_json(parent: str, child: str, rot: np.ndarray, trans: np.ndarray) -> dict:
    return {"parent_frame_id": parent, "child_frame_id": child,
            "transform": {"translation": _xyz(trans), "rotation": _quat(rot)}}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_calibs(proj: Path, preset: str, cameras: int, ground_z: float) -> None:
    rot, trans = _lidar_pose(preset)
    _write_json(proj / "calib" / f"{LIDAR_CHANNEL}.json",
                {"channel": LIDAR_CHANNEL, "sensor_type": "lidar",
                 "pose": _pose_json("base_link", LIDAR_CHANNEL, rot, trans), "ignore_areas": []})
    optical_to_body = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    focal = IMAGE_WIDTH / (2 * np.tan(np.radians(CAMERA_HFOV_DEG) / 2))
    for ch, yaw, (x, y) in list(zip(CAMERA_CHANNELS, CAMERA_YAWS_DEG, CAMERA_POSITIONS))[:cameras]:
        pose = _pose_json("base_link", ch, _rot_z(np.radians(yaw)) @ optical_to_body,
                          np.array([x, y, ground_z + 1.5]))
        config = {"width": IMAGE_WIDTH, "height": IMAGE_HEIGHT, "model": "pinhole",
                  "intrinsic": {"fx": round(focal, 4), "fy": round(focal, 4), "cx": IMAGE_WIDTH / 2,
                                "cy": IMAGE_HEIGHT / 2, "skew": 0.0},
                  "distortion_coefficients": {"k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "k3": 0.0}}
        _write_json(proj / "calib" / f"{ch}.json", {"channel": ch, "sensor_type": "camera", "pose": pose,
                                                     "camera_config": config, "ignore_areas": []})


def _camera_jpegs(cam_index: int, variants: int = 3) -> list[bytes]:
    """A few distinct sky/road gradient JPEGs for one camera, encoded once."""
    rows = np.linspace(0.0, 1.0, IMAGE_HEIGHT)[:, None]
    cols = np.linspace(0.0, 1.0, IMAGE_WIDTH)[None, :]
    out = []
    for v in range(variants):
        tint = (40 * cam_index + 25 * v) % 255
        sky = np.stack(np.broadcast_arrays(120 + 80 * cols * (1 - rows), 160 + 0 * rows * cols,
                                           200 + tint * 0.2 + 0 * cols), axis=2)
        road = np.stack(np.broadcast_arrays(70 + 30 * rows + 0 * cols, 70 + 30 * rows + tint * 0.1 * cols,
                                            75 + 25 * rows + 0 * cols), axis=2)
        img = np.where((rows < 0.5)[..., None], sky, road).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _surface_points(rng, centers, sizes, yaws, ranges) -> np.ndarray:
    """(N, 4) x, y, z, intensity on the sides and tops of boxes (ego frame) shrunk by SURFACE_MARGIN."""
    l, w, h = sizes.T
    area = np.stack([w * h, w * h, l * h, l * h, l * w], axis=1)  # faces +x, -x, +y, -y, +z
    n = np.clip(740.0 * np.sqrt(area.sum(axis=1)) / np.maximum(ranges, 5.0), 25, 900).astype(np.int64)
    idx = np.repeat(np.arange(len(n)), n)
    cum = np.cumsum(area / area.sum(axis=1, keepdims=True), axis=1)[idx]
    face = (rng.random(len(idx))[:, None] > cum[:, :-1]).sum(axis=1)
    local = rng.uniform(-1.0, 1.0, (len(idx), 3))
    axis, sign = np.array([0, 0, 1, 1, 2])[face], np.array([1.0, -1.0, 1.0, -1.0, 1.0])[face]
    local[np.arange(len(idx)), axis] = sign
    local *= sizes[idx] / 2 - SURFACE_MARGIN
    c, s = np.cos(yaws[idx]), np.sin(yaws[idx])
    xyz = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1)
    return np.column_stack([xyz + centers[idx], rng.uniform(20.0, 120.0, len(idx))])


def _ground_points(rng, ground_z: float) -> np.ndarray:
    r = 2.5 + (LABEL_RANGE - 2.5) * rng.random(GROUND_POINTS) ** 1.6  # denser near the sensor
    a = rng.uniform(-np.pi, np.pi, GROUND_POINTS)
    z = ground_z - 0.02 * rng.random(GROUND_POINTS)
    return np.column_stack([r * np.cos(a), r * np.sin(a), z, rng.uniform(2.0, 20.0, GROUND_POINTS)])


def generate_project(out_root: Path, name: str, frames: int, cameras: int = 6, seed: int = 0,
                     preset: str = "default") -> Path:
    """Write a synthetic NextPoints project to ``out_root/name/nextpoints`` and return that directory."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; expected one of {PRESETS}")
    if frames < 1 or not 0 <= cameras <= len(CAMERA_CHANNELS):
        raise ValueError(f"need frames >= 1 and 0 <= cameras <= {len(CAMERA_CHANNELS)}")
    proj = Path(out_root) / name / "nextpoints"
    cam_channels = CAMERA_CHANNELS[:cameras]
    for sub in ["calib", f"lidar/{LIDAR_CHANNEL}", "ego_pose", "label"] + [f"camera/{c}" for c in cam_channels]:
        (proj / sub).mkdir(parents=True, exist_ok=True)
    lidar_rot, lidar_t = _lidar_pose(preset)
    ground_z = lidar_t[2] - 1.8  # ground 1.8 m below the lidar, in the ego frame
    _write_calibs(proj, preset, cameras, ground_z)
    rng = np.random.default_rng(seed)
    world = _world(rng)
    jpegs = [_camera_jpegs(i) for i in range(cameras)]
    quirks = frames >= 5
    missing_cam = cam_channels[4 if cameras >= 5 else -1] if cameras else None
    obj_ids = np.array([str(i + 1) for i in range(len(world["type"]))])

    for i in range(frames):
        stem, t = str(FIRST_TIMESTAMP_NS + i * FRAME_STEP_NS), i * FRAME_STEP_NS * 1e-9
        ego_s = STRAIGHT + EGO_SPEED * t
        ex, ey, eh = (float(v) for v in _track(ego_s))
        ego_rot, ego_t = _rot_z(eh), np.array([ex, ey, 0.0]) + MAP_ORIGIN
        _write_json(proj / "ego_pose" / f"{stem}.json", _pose_json("map", "base_link", ego_rot, ego_t))

        xy, heading = _frame_state(world, t, ego_s)
        rel = xy - ego_t[:2]
        ranges = np.hypot(rel[:, 0], rel[:, 1])
        keep = np.flatnonzero(ranges <= LABEL_RANGE)
        sizes = world["size"][keep]
        centers = np.column_stack([rel[keep] @ ego_rot[:2, :2], ground_z + BOX_LIFT + sizes[:, 2] / 2])
        yaws = heading[keep] - eh

        frng = np.random.default_rng([seed, i])
        pts = np.vstack([_ground_points(frng, ground_z), _surface_points(frng, centers, sizes, yaws, ranges[keep])])
        xyz = (pts[:, :3] - lidar_t) @ lidar_rot  # ego → lidar: R^T (p - t)
        write_pcd(proj / "lidar" / LIDAR_CHANNEL / f"{stem}.pcd",
                  {k: xyz[:, j].astype(np.float32) for j, k in enumerate("xyz")}
                  | {"intensity": pts[:, 3].astype(np.float32)}, data="binary")

        if not (quirks and i == QUIRK_NO_LABEL):
            labels = []
            for k, c, size, yaw in zip(keep, centers, sizes, yaws):
                rot = lidar_rot.T @ _rot_z(yaw)
                labels.append({"obj_id": str(obj_ids[k]), "obj_type": str(world["type"][k]),
                               "obj_attr": "static" if world["static"][k] else None, "num_pts": None,
                               "psr": {"position": _xyz(lidar_rot.T @ (c - lidar_t)),
                                       "rotation": _euler_xyz(rot) if quirks and i == QUIRK_EULER_LABEL
                                       else _quat(rot),
                                       "scale": _xyz(size)}})
            _write_json(proj / "label" / f"{stem}.json", labels)

        for ch, variants in zip(cam_channels, jpegs):
            if not (quirks and i == QUIRK_MISSING_IMAGE and ch == missing_cam):
                (proj / "camera" / ch / f"{stem}.jpg").write_bytes(variants[i % len(variants)])
    return proj
