"""The synthetic NextPoints generator writes a realistic, deterministic project with the quirks of real data."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from PIL import Image
from pyquaternion import Quaternion

from stages.geometry import Pose, euler_xyz_to_quat, points_in_boxes, quat_from_xyzw, quat_to_matrix, yaw_of
from stages.pcd import read_points_xyzir
from stages.synth import CAMERA_CHANNELS, generate_project

FRAMES = 8


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {"default": generate_project(root, "scene", FRAMES),
            "again": generate_project(root / "again", "scene", FRAMES),
            "seed1": generate_project(root, "scene-seed1", FRAMES, seed=1),
            "rotated": generate_project(root, "scene-rotated", FRAMES, preset="rotated_lidar")}


def _stems(proj: Path) -> list[str]:
    return sorted(p.stem for p in (proj / "lidar" / "lidar-fusion").glob("*.pcd"))


def _pose(d: dict) -> Pose:
    t, r = d["transform"]["translation"], d["transform"]["rotation"]
    return Pose(np.array([t["x"], t["y"], t["z"]]), quat_from_xyzw(r["x"], r["y"], r["z"], r["w"]))


def _boxes(label_file: Path) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Label objects and their centres, (l, w, h) sizes and [w,x,y,z] rotations in the lidar frame."""
    objs = json.loads(label_file.read_text())
    centers = np.array([[o["psr"]["position"][k] for k in "xyz"] for o in objs]).reshape(-1, 3)
    sizes = np.array([[o["psr"]["scale"][k] for k in "xyz"] for o in objs]).reshape(-1, 3)
    rots = np.array([quat_from_xyzw(**r) if "w" in r else euler_xyz_to_quat(r["x"], r["y"], r["z"])
                     for r in (o["psr"]["rotation"] for o in objs)]).reshape(-1, 4)
    return objs, centers, sizes, rots


def _digest(proj: Path) -> dict[str, str]:
    return {str(p.relative_to(proj)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(proj.rglob("*")) if p.is_file()}


def test_project_has_the_nextpoints_layout(projects):
    proj = projects["default"]
    assert proj.name == "nextpoints" and proj.parent.name == "scene"
    assert sorted(p.stem for p in (proj / "calib").glob("*.json")) == sorted(("lidar-fusion",) + CAMERA_CHANNELS)
    stems = _stems(proj)
    assert len(stems) == FRAMES and all(int(b) - int(a) == 100_000_000 for a, b in zip(stems, stems[1:]))
    assert stems[0] == "1708676399593999872"
    for ch in CAMERA_CHANNELS:
        calib = json.loads((proj / "calib" / f"{ch}.json").read_text())
        cfg = calib["camera_config"]
        assert calib["sensor_type"] == "camera" and calib["pose"]["parent_frame_id"] == "base_link"
        # the optical axis (camera z) is horizontal in the ego frame
        assert abs((quat_to_matrix(_pose(calib["pose"]).rotation) @ [0, 0, 1])[2]) < 1e-6
        for img in (proj / "camera" / ch).glob("*.jpg"):
            with Image.open(img) as im:
                assert im.format == "JPEG" and im.size == (cfg["width"], cfg["height"])
    poses = [_pose(json.loads((proj / "ego_pose" / f"{s}.json").read_text())) for s in stems]
    assert abs(yaw_of(poses[-1].rotation) - yaw_of(poses[0].rotation)) > np.radians(3)
    assert np.linalg.norm(poses[-1].translation - poses[0].translation) > 4.0  # ~8 m/s
    assert _pose(json.loads((proj / "calib" / "lidar-fusion.json").read_text())["pose"]).is_identity()


def test_labels_track_many_objects_of_several_types(projects):
    proj = projects["default"]
    objs = [o for f in (proj / "label").glob("*.json") for o in json.loads(f.read_text())]
    assert len({o["obj_id"] for o in objs}) >= 20
    assert len({o["obj_type"] for o in objs}) >= 3
    assert {o["obj_attr"] for o in objs} == {None, "static"}
    assert all(o["obj_type"] != "Unknown" and o["num_pts"] is None for o in objs)


def test_quirks_of_real_data_are_present(projects):
    proj = projects["default"]
    stems = _stems(proj)
    labelled = {p.stem for p in (proj / "label").glob("*.json")}
    assert labelled == set(stems) - {stems[2]}
    euler = [o["psr"]["rotation"] for o in json.loads((proj / "label" / f"{stems[3]}.json").read_text())]
    assert euler and all("w" not in r for r in euler)
    quat = [o["psr"]["rotation"] for o in json.loads((proj / "label" / f"{stems[5]}.json").read_text())]
    assert all("w" in r for r in quat)
    missing = [(s, ch) for s in stems for ch in CAMERA_CHANNELS if not (proj / "camera" / ch / f"{s}.jpg").exists()]
    assert missing == [(stems[4], "camera-back-left")]


def test_rotated_lidar_preset_has_a_non_identity_lidar_and_ego_level_boxes(projects):
    proj = projects["rotated"]
    lidar = _pose(json.loads((proj / "calib" / "lidar-fusion.json").read_text())["pose"])
    assert not lidar.is_identity() and abs(np.degrees(yaw_of(lidar.rotation)) - 90) < 0.5
    for f in (proj / "label").glob("*.json"):
        _, centers, sizes, rots = _boxes(f)
        for c, s, q in zip(centers, sizes, rots):  # in the ego frame boxes are yaw-only and stand on the ground
            up = (quat_to_matrix(lidar.rotation) @ quat_to_matrix(q))[:, 2]
            assert np.allclose(up, [0, 0, 1], atol=1e-5)
            assert abs(lidar.apply(c[None])[0, 2] - s[2] / 2 - 0.06) < 1e-4


def test_same_seed_is_byte_identical_and_another_seed_differs(projects):
    a, b, c = _digest(projects["default"]), _digest(projects["again"]), _digest(projects["seed1"])
    assert a == b and len(a) > 8 * 9
    assert a != c


@pytest.mark.parametrize("preset", ["default", "rotated"])
def test_object_points_are_inside_their_box_with_a_2cm_margin(projects, preset):
    proj = projects[preset]
    for i, stem in enumerate(_stems(proj)):
        label = proj / "label" / f"{stem}.json"
        if not label.exists():
            continue
        points = read_points_xyzir(proj / "lidar" / "lidar-fusion" / f"{stem}.pcd")
        objs, centers, sizes, rots = _boxes(label)
        rel = points[None, :, :3].astype(np.float64) - centers[:, None, :]  # (B, N, 3)
        local = rel @ np.stack([quat_to_matrix(q) for q in rots])  # R^T · (p - c) for every box
        depth = np.min(sizes[:, None, :] / 2 - np.abs(local), axis=2)  # > 0 inside, distance to nearest face
        inside = depth >= 0
        assert np.all(depth[inside] >= 0.02), f"{stem}: a point within 2 cm of a box face"
        assert inside.sum(axis=0).max() <= 1, f"{stem}: a point in two boxes"
        assert np.all(np.abs(depth) >= 0.02), f"{stem}: a point within 2 cm outside a box face"
        if i not in (0, 3):  # the exporter's count and the devkit's, on a quaternion and an Euler frame
            continue
        counts = points_in_boxes(points, centers, sizes, rots)
        assert counts.sum() > 1000 and (counts > 0).sum() >= 0.9 * len(objs)
        for obj, n, c, s, q in zip(objs, counts, centers, sizes, rots):  # the devkit agrees exactly
            box = Box(c, [s[1], s[0], s[2]], Quaternion(q))
            assert points_in_box(box, points[:, :3].T.astype(np.float64)).sum() == n, obj["obj_id"]


def test_boxes_never_overlap(projects):
    proj = projects["default"]  # lidar = ego: boxes are yaw-only and stand on the same ground
    for f in (proj / "label").glob("*.json"):
        _, centers, sizes, rots = _boxes(f)
        yaws = np.array([yaw_of(q) for q in rots])
        axes = np.stack([np.stack([np.cos(yaws), np.sin(yaws)], 1), np.stack([-np.sin(yaws), np.cos(yaws)], 1)], 1)
        signs = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) / 2
        corners = centers[:, None, :2] + np.einsum("ck,bk,bkj->bcj", signs, sizes[:, :2], axes)  # (B, 4, 2)
        on_axes = np.einsum("bcj,akj->abkc", corners, axes)  # box b's corners on box a's axes: (A, B, 2, 4)
        lo, hi = on_axes.min(axis=3), on_axes.max(axis=3)
        own = np.arange(len(centers))
        # separating-axis test on a's own axes; the pair is apart if either box's axes separate it
        separated = np.any((lo > hi[own, own][:, None]) | (hi < lo[own, own][:, None]), axis=2)
        separated = separated | separated.T
        np.fill_diagonal(separated, True)
        assert separated.all(), f"{f.stem}: overlapping boxes"
