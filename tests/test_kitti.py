"""A NextPoints project exported to KITTI 3D object gives back every box, point and calibration (issue 4).

The exported files are read with the small KITTI parser below, which follows the object devkit: a label's
location is the bottom-face centre in the rectified camera frame (x right, y down, z forward), so the box centre
is ``location - (0, h/2, 0)`` there, and ``rotation_y`` turns the camera x axis onto the box heading about the
camera y axis. nuscenes-devkit's ``KittiDB`` is the second, third-party reader. Source boxes, points and
calibrations are read straight from the project's JSON and PCD files (pyquaternion, pypcd4), not through the
exporter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.utils.data_classes import Box
from nuscenes.utils.kitti import KittiDB
from pypcd4 import PointCloud
from pyquaternion import Quaternion

from stages.convert import convert_batch
from stages.discover import discover
from stages.errors import InputError
from stages.formats.kitti import KittiFormat
from stages.formats.kitti.labels import KITTI_CAM_FROM_VELO, PinholeCamera, kitti_boxes
from stages.formats.kitti.mapping import KittiMapping
from stages.mappings import load_mapping
from stages.merge import merge_tables
from stages.plan import ExportPlan
from stages.request import ExportOptions, ExportRequest
from stages.serial import SerialRun, run_serial

PRESETS = ("default", "rotated")
REFERENCE_CAMERA = "camera-front"
# What the synthetic project's types must become (written out here, independently of the YAML); None = left out.
EXPECTED_CLASS = {"car": "Car", "van": "Van", "pickup": "Car", "truck": "Truck", "bus": "Truck", "trailer": "Misc",
                  "construction_vehicle": "Misc", "motorcycle": "Cyclist", "bicycle": "Cyclist",
                  "pedestrian": "Pedestrian", "traffic_cone": None, "barrier": None}
CENTRE_TOL_M, YAW_TOL_RAD = 1e-3, 1e-4
SUSTECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sustech-example"  # read-only


# -- the test's own KITTI reader ------------------------------------------------------------------------------

def read_calib(path: Path) -> dict[str, np.ndarray]:
    """calib/<idx>.txt → {"P0".."P3": 3x4, "R0_rect": 3x3, "Tr_velo_to_cam": 3x4, "Tr_imu_to_velo": 3x4}."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, values = line.split(":", 1)
            v = np.array(values.split(), dtype=np.float64)
            out[key] = v.reshape(3, 3) if key == "R0_rect" else v.reshape(3, 4)
    return out


def read_labels(path: Path) -> list[dict]:
    objs = []
    for line in path.read_text().splitlines():
        p = line.split(" ")  # KITTI tools split on single spaces
        assert len(p) == 15, line
        objs.append({"type": p[0], "truncated": float(p[1]), "occluded": int(p[2]), "alpha": float(p[3]),
                     "bbox": np.array(p[4:8], dtype=float), "hwl": np.array(p[8:11], dtype=float),
                     "location": np.array(p[11:14], dtype=float), "ry": float(p[14])})
    return objs


def homogeneous(m: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:m.shape[0], :m.shape[1]] = m
    return out


def velo_from_rect(calib: dict[str, np.ndarray]) -> np.ndarray:
    """4x4: rectified camera → velodyne, i.e. inv(Tr_velo_to_cam) · inv(R0_rect)."""
    return np.linalg.inv(homogeneous(calib["Tr_velo_to_cam"])) @ np.linalg.inv(homogeneous(calib["R0_rect"]))


def kitti_box_in_velo(obj: dict, calib: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(centre, heading unit vector) of a KITTI label in the velodyne frame: the bottom-centre location brought
    back with inv(Tr)·inv(R0), plus h/2 along KITTI's up (camera -y) expressed in the velodyne frame."""
    m = velo_from_rect(calib)
    bottom = m[:3, :3] @ obj["location"] + m[:3, 3]
    up = m[:3, :3] @ np.array([0.0, -1.0, 0.0])
    heading = m[:3, :3] @ np.array([np.cos(obj["ry"]), 0.0, -np.sin(obj["ry"])])
    return bottom + obj["hwl"][0] / 2 * up, heading


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + np.pi) % (2 * np.pi) - np.pi)


# -- the source project, read directly ------------------------------------------------------------------------

def stems(project: Path) -> list[str]:
    return sorted(p.stem for p in (project / "lidar" / "lidar-fusion").glob("*.pcd"))


def rotation_of(r: dict) -> np.ndarray:
    if "w" in r:
        return Quaternion(r["w"], r["x"], r["y"], r["z"]).rotation_matrix
    (cx, cy, cz), (sx, sy, sz) = np.cos([r["x"], r["y"], r["z"]]), np.sin([r["x"], r["y"], r["z"]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_x @ rot_y @ rot_z  # legacy Euler labels: R = Rx·Ry·Rz


def source_boxes(project: Path, stem: str) -> list[dict]:
    """Boxes of a frame in the lidar frame, in file order ([] without a label file)."""
    path = project / "label" / f"{stem}.json"
    if not path.is_file():
        return []
    return [{"type": o["obj_type"], "center": np.array([o["psr"]["position"][k] for k in "xyz"]),
             "size": np.array([o["psr"]["scale"][k] for k in "xyz"]), "rot": rotation_of(o["psr"]["rotation"])}
            for o in json.loads(path.read_text())]


def sensor_to_ego(project: Path, channel: str) -> np.ndarray:
    t = json.loads((project / "calib" / f"{channel}.json").read_text())["pose"]["transform"]
    q, p = t["rotation"], t["translation"]
    m = np.eye(4)
    m[:3, :3] = Quaternion(q["w"], q["x"], q["y"], q["z"]).rotation_matrix
    m[:3, 3] = [p["x"], p["y"], p["z"]]
    return m


def camera_config(project: Path, channel: str) -> tuple[np.ndarray, int, int]:
    c = json.loads((project / "calib" / f"{channel}.json").read_text())["camera_config"]
    i = c["intrinsic"]
    return np.array([[i["fx"], i["skew"], i["cx"]], [0, i["fy"], i["cy"]], [0, 0, 1]]), c["width"], c["height"]


def source_points(project: Path, stem: str) -> np.ndarray:
    pc = PointCloud.from_path(project / "lidar" / "lidar-fusion" / f"{stem}.pcd")
    return np.column_stack([pc.pc_data[f] for f in ("x", "y", "z", "intensity")]).astype(np.float32)


# -- exports --------------------------------------------------------------------------------------------------

def kitti_request(coordinate_system: str = "lidar", max_frames: int | None = None, **options) -> ExportRequest:
    return ExportRequest(export_format="kitti", coordinate_system=coordinate_system, max_frames=max_frames,
                         export_options=ExportOptions(compress_output=False, **options))


@pytest.fixture(scope="module")
def projects(synth_project: Path, synth_project_rotated: Path) -> dict[str, Path]:
    return {"default": synth_project, "rotated": synth_project_rotated}


@pytest.fixture(scope="module")
def exports(projects, tmp_path_factory) -> dict[str, tuple[SerialRun, Path]]:
    root = tmp_path_factory.mktemp("kitti")
    out = {}
    for preset, project in projects.items():
        dest = root / f"kitti-{preset}"
        out[preset] = (run_serial(project, dest, kitti_request("lidar")), dest)
    dest = root / "kitti-rotated-ego"
    out["rotated-ego"] = (run_serial(projects["rotated"], dest, kitti_request("ego_vehicle")), dest)
    return out


def kept(boxes: list[dict]) -> list[dict]:
    """The source boxes a KITTI label file holds, in order (the synth has no DontCare types)."""
    return [b for b in boxes if EXPECTED_CLASS[b["type"]] is not None]


# -- the acceptance tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_every_box_round_trips_to_its_lidar_centre_size_and_yaw(preset, projects, exports):
    project, (run, dest) = projects[preset], exports[preset]
    checked = 0
    for idx, stem in enumerate(stems(project)):
        calib = read_calib(dest / "training" / "calib" / f"{idx:06d}.txt")
        np.testing.assert_array_equal(calib["R0_rect"], np.eye(3))
        labels = read_labels(dest / "training" / "label_2" / f"{idx:06d}.txt")
        boxes = kept(source_boxes(project, stem))
        assert [o["type"] for o in labels] == [EXPECTED_CLASS[b["type"]] for b in boxes], stem
        for obj, box in zip(labels, boxes):
            centre, heading = kitti_box_in_velo(obj, calib)
            np.testing.assert_allclose(obj["hwl"], box["size"][[2, 1, 0]], atol=1e-6)
            assert np.linalg.norm(centre - box["center"]) < CENTRE_TOL_M, (stem, obj, box)
            source_yaw = np.arctan2(box["rot"][1, 0], box["rot"][0, 0])  # heading (box x axis) in the lidar frame
            assert angle_diff(np.arctan2(heading[1], heading[0]), source_yaw) < YAW_TOL_RAD, (stem, obj)
            assert -np.pi <= obj["ry"] <= np.pi and -np.pi <= obj["alpha"] <= np.pi
            assert obj["occluded"] == 0
            checked += 1
    assert checked == run.merged.annotations > 200


def test_kitti_up_is_the_lidar_up_when_the_lidar_is_level(projects, exports):
    """With lidar = base_link, "bottom + h/2 along lidar z" (what lidar detectors do) is exactly KITTI's centre."""
    calib = read_calib(exports["default"][1] / "training" / "calib" / "000000.txt")
    np.testing.assert_allclose(velo_from_rect(calib)[:3, :3] @ [0, -1, 0], [0, 0, 1], atol=1e-12)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_2d_box_lies_inside_the_image_and_bounds_the_projected_corners(preset, projects, exports):
    project, (run, dest) = projects[preset], exports[preset]
    K, width, height = camera_config(project, REFERENCE_CAMERA)
    cam_from_lidar = np.linalg.inv(sensor_to_ego(project, REFERENCE_CAMERA)) @ sensor_to_ego(project, "lidar-fusion")
    fully_in_view = out_of_view = 0
    for idx, stem in enumerate(stems(project)):
        labels = read_labels(dest / "training" / "label_2" / f"{idx:06d}.txt")
        for obj, box in zip(labels, kept(source_boxes(project, stem))):
            left, top, right, bottom = obj["bbox"]
            assert 0 <= left <= right <= width - 1 and 0 <= top <= bottom <= height - 1, (stem, obj)
            assert 0 <= obj["truncated"] <= 1
            corners = Box(box["center"], box["size"][[1, 0, 2]], Quaternion(matrix=box["rot"])).corners()  # (3, 8)
            cam = cam_from_lidar[:3, :3] @ corners + cam_from_lidar[:3, 3:]
            if (cam[2] <= 0).all():
                assert obj["truncated"] == 1 and not obj["bbox"].any(), (stem, obj)  # behind: kept, no 2D box
                out_of_view += 1
                continue
            if (cam[2] > 0).all():
                uv = (K @ cam)[:2] / cam[2]
                inside = (uv[0] >= 0) & (uv[0] <= width - 1) & (uv[1] >= 0) & (uv[1] <= height - 1)
                assert obj["truncated"] == pytest.approx(1 - inside.mean(), abs=1e-3)
                expected = [max(uv[0].min(), 0), max(uv[1].min(), 0), min(uv[0].max(), width - 1),
                            min(uv[1].max(), height - 1)]
                if expected[0] < expected[2] and expected[1] < expected[3]:
                    np.testing.assert_allclose(obj["bbox"], expected, atol=0.006)
                    fully_in_view += inside.all()
    assert fully_in_view > 20 and out_of_view > 20
    assert run.merged.counts["out_of_image_kept"] >= out_of_view


@pytest.mark.parametrize("preset", PRESETS)
def test_velodyne_files_hold_the_source_points(preset, projects, exports):
    project, (_, dest) = projects[preset], exports[preset]
    for idx, stem in enumerate(stems(project)):
        raw = np.fromfile(dest / "training" / "velodyne" / f"{idx:06d}.bin", dtype="<f4")
        assert raw.size % 4 == 0
        np.testing.assert_array_equal(raw.reshape(-1, 4), source_points(project, stem))


@pytest.mark.parametrize("preset", PRESETS)
def test_p2_projects_a_box_centre_where_the_camera_sees_it(preset, projects, exports):
    project, (_, dest) = projects[preset], exports[preset]
    K, _, _ = camera_config(project, REFERENCE_CAMERA)
    cam_from_lidar = np.linalg.inv(sensor_to_ego(project, REFERENCE_CAMERA)) @ sensor_to_ego(project, "lidar-fusion")
    projected = 0
    for idx, stem in enumerate(stems(project)):
        calib = read_calib(dest / "training" / "calib" / f"{idx:06d}.txt")
        for box in source_boxes(project, stem):
            p_cam = cam_from_lidar[:3, :3] @ box["center"] + cam_from_lidar[:3, 3]
            if p_cam[2] < 1.0:
                continue
            expected = (K @ p_cam)[:2] / p_cam[2]
            x_rect = calib["R0_rect"] @ (calib["Tr_velo_to_cam"] @ np.append(box["center"], 1.0))
            uvw = calib["P2"] @ np.append(x_rect, 1.0)
            np.testing.assert_allclose(uvw[:2] / uvw[2], expected, atol=1e-6)
            projected += 1
    assert projected > 50


@pytest.mark.parametrize("preset", PRESETS)
def test_imagesets_list_every_index_and_images_are_the_reference_camera(preset, projects, exports):
    project, (run, dest) = projects[preset], exports[preset]
    n = len(stems(project))
    every = [f"{i:06d}" for i in range(n)]
    sets = {s: (dest / "ImageSets" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert sets == {"train": every, "val": [], "trainval": every, "test": []}
    assert run.merged.frames == n
    frame_ids = [line.split() for line in (dest / "training" / "frame_ids.txt").read_text().splitlines()]
    assert [(f[0], f[1]) for f in frame_ids] == list(zip(every, stems(project)))
    for idx, stem in enumerate(stems(project)):
        assert (dest / "training" / "image_2" / f"{idx:06d}.jpg").read_bytes() == \
            (project / "camera" / REFERENCE_CAMERA / f"{stem}.jpg").read_bytes()
    assert len(list((dest / "training" / "label_2").glob("*.txt"))) == n
    assert (dest / "training" / "label_2" / "000002.txt").read_text() == ""  # frame 2 has no label file


@pytest.mark.parametrize("preset", PRESETS)
def test_nuscenes_devkit_kittidb_reads_back_the_boxes(preset, projects, exports):
    """KittiDB (third-party reader) puts each label back into its 'nuScenes lidar' frame, our velodyne frame turned
    by +90° about z; its corners match the source box corners (Misc and DontCare are skipped by KittiDB)."""
    project, (_, dest) = projects[preset], exports[preset]
    db = KittiDB(root=str(dest), splits=("training",))
    matched = 0
    for idx, stem in enumerate(stems(project)):
        got = db.get_boxes(f"training_{idx:06d}")
        boxes = [b for b in kept(source_boxes(project, stem)) if EXPECTED_CLASS[b["type"]] != "Misc"]
        assert len(got) == len(boxes)
        for g, box in zip(got, boxes):
            g.rotate(db.kitti_to_nu_lidar_inv)
            ref = Box(box["center"], box["size"][[1, 0, 2]], Quaternion(matrix=box["rot"]))
            # KittiDB reads the calibration as float32: allow its rounding (~1e-7 relative at 50 m)
            np.testing.assert_allclose(g.corners(), ref.corners(), atol=2e-3)
            matched += 1
    assert matched > 150


def test_ego_vehicle_export_of_a_rotated_lidar_has_kittis_own_axes(projects, exports):
    """coordinate_system ego_vehicle puts the velodyne frame on base_link (x forward, z up): KITTI's fixed-axes
    shortcuts (centre = bottom + h/2 along velodyne z, yaw = -ry - pi/2) then hold exactly, while the labels,
    which live in the camera frame, are the same bytes as in the lidar-frame export."""
    project = projects["rotated"]
    (run_lidar, lidar_dest), (run_ego, ego_dest) = exports["rotated"], exports["rotated-ego"]
    ego_from_lidar = sensor_to_ego(project, "lidar-fusion")
    assert any("KITTI's axes" in w["warning"] for w in run_lidar.merged.warnings)
    assert not any("KITTI's axes" in w["warning"] for w in run_ego.merged.warnings)
    checked = 0
    for idx, stem in enumerate(stems(project)):
        name = f"{idx:06d}"
        assert (ego_dest / "training" / "label_2" / f"{name}.txt").read_bytes() == \
            (lidar_dest / "training" / "label_2" / f"{name}.txt").read_bytes()
        calib = read_calib(ego_dest / "training" / "calib" / f"{name}.txt")
        np.testing.assert_allclose(calib["Tr_velo_to_cam"][:, :3], KITTI_CAM_FROM_VELO, atol=1e-9)
        np.testing.assert_allclose(calib["Tr_imu_to_velo"], np.eye(4)[:3], atol=1e-12)
        m = velo_from_rect(calib)
        for obj, box in zip(read_labels(ego_dest / "training" / "label_2" / f"{name}.txt"),
                            kept(source_boxes(project, stem))):
            centre = m[:3, :3] @ obj["location"] + m[:3, 3] + [0, 0, obj["hwl"][0] / 2]
            heading = ego_from_lidar[:3, :3] @ box["rot"][:, 0]
            source_centre = ego_from_lidar[:3, :3] @ box["center"] + ego_from_lidar[:3, 3]
            assert np.linalg.norm(centre - source_centre) < CENTRE_TOL_M
            assert angle_diff(-obj["ry"] - np.pi / 2, np.arctan2(heading[1], heading[0])) < YAW_TOL_RAD
            checked += 1
        pts = np.fromfile(ego_dest / "training" / "velodyne" / f"{name}.bin", dtype="<f4").reshape(-1, 4)
        src = source_points(project, stem).astype(np.float64)
        np.testing.assert_allclose(pts[:, :3], src[:, :3] @ ego_from_lidar[:3, :3].T + ego_from_lidar[:3, 3],
                                   atol=1e-4)
        np.testing.assert_array_equal(pts[:, 3], src[:, 3])
    assert checked == run_ego.merged.annotations > 200


@pytest.mark.parametrize("settings, coordinate_system, advice", [
    ({}, "lidar", "set the SUSTechPOINTS source setting lidar_axes"),
    ({}, "ego_vehicle", "set the SUSTechPOINTS source setting lidar_axes"),
    ({"lidar_axes": "x_left_y_back"}, "lidar", "export with coordinate_system ego_vehicle"),
    ({"lidar_axes": "x_left_y_back"}, "ego_vehicle", None),
])
def test_the_axes_warning_of_a_sustech_scene_gives_the_fix_that_works(settings, coordinate_system, advice, tmp_path):
    """The real scene's lidar is x-left: with the default lidar_axes (lidar->ego = identity) base_link is x-left
    too, so ego_vehicle alone cannot give KITTI's axes; with x_left_y_back it can, and then nothing is warned."""
    run = run_serial(SUSTECH, tmp_path / "out", kitti_request(coordinate_system, include_images=False,
                                                              include_pointcloud=False),
                     source_settings=settings)
    warnings = [w["warning"] for w in run.merged.warnings if "KITTI's axes" in w["warning"]]
    if advice is None:
        assert warnings == []
        calib = read_calib(tmp_path / "out" / "training" / "calib" / "000000.txt")
        rot = calib["Tr_velo_to_cam"][:, :3] @ KITTI_CAM_FROM_VELO.T
        assert np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))) < 5.0  # the advice was right
        return
    [warning] = warnings
    assert advice in warning
    if "lidar_axes" in advice:
        assert "lidar->ego calibration is the identity" in warning and "ego_vehicle cannot help" in warning


def imagesets(out: Path) -> dict[str, list[str]]:
    return {s: (out / "ImageSets" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}


@pytest.fixture(scope="module")
def sustech_kitti(tmp_path_factory) -> tuple[SerialRun, Path]:
    """The real SUSTechPOINTS scene (frame 000950 has no camera image) exported to KITTI."""
    dest = tmp_path_factory.mktemp("sustech-kitti") / "out"
    return run_serial(SUSTECH, dest, kitti_request("ego_vehicle"), source_settings={"lidar_axes": "x_left_y_back"}), dest


def test_every_index_in_imagesets_of_the_real_scene_has_image_label_calib_and_velodyne(sustech_kitti):
    """mmdetection3d's and OpenPCDet's KITTI loaders read all four files of every listed index."""
    run, out = sustech_kitti
    sets = imagesets(out)
    assert sorted(sets["train"]) == sorted(sets["trainval"]) == [f"{i:06d}" for i in range(4)]
    for idx in {i for listed in sets.values() for i in listed}:
        for folder, suffix in (("image_2", ".jpg"), ("label_2", ".txt"), ("calib", ".txt"), ("velodyne", ".bin")):
            assert (out / "training" / folder / f"{idx}{suffix}").is_file(), (folder, idx)


def test_the_frame_without_an_image_gets_the_nearest_frames_image_with_a_warning(sustech_kitti):
    """missing_image_policy: nearest (the default), as for nuScenes: 000950 (index 0) gets 000965's image."""
    run, out = sustech_kitti
    frame_ids = [line.split()[1] for line in (out / "training" / "frame_ids.txt").read_text().splitlines()]
    assert frame_ids[:2] == ["000950", "000965"]
    assert (out / "training" / "image_2" / "000000.jpg").read_bytes() == \
        (SUSTECH / "camera" / "front" / "000965.jpg").read_bytes()
    assert (out / "training" / "image_2" / "000001.jpg").read_bytes() == \
        (SUSTECH / "camera" / "front" / "000965.jpg").read_bytes()
    warned = [w["warning"] for w in run.merged.warnings if w["frame"] == "000950" and "camera front" in w["warning"]]
    assert warned == ["missing image for camera front: image_2/000000 uses the image of frame 000965 (+1500.0 ms), "
                      "the nearest in time"]
    counts = run.merged.counts
    assert counts["images"] == 4 and counts["missing_images"] == counts["filled_images"] == 1
    assert counts["not_in_imagesets"] == 0


def test_with_missing_image_policy_skip_the_frame_is_left_out_of_imagesets_and_counted(tmp_path):
    staging = tmp_path / "staging"
    found = discover(SUSTECH, kitti_request("lidar", include_pointcloud=False), staging, export_id="k",
                     batch_size=2, source_settings={"lidar_axes": "x_left_y_back"})
    plan = ExportPlan.load(staging)
    plan.mappings["missing_image_policy"] = "skip"
    plan.save()
    for i in range(found.n_batches):
        convert_batch(staging, i)
    merged = merge_tables(staging)
    out = plan.output_dir
    assert imagesets(out)["train"] == ["000001", "000002", "000003"]
    assert not (out / "training" / "image_2" / "000000.jpg").exists()
    assert (out / "training" / "label_2" / "000000.txt").is_file()  # the labels are still written
    counts = merged.counts
    assert counts["not_in_imagesets"] == counts["missing_images"] == 1 and counts["filled_images"] == 0
    assert counts["split.train"] == 3 and counts["frames"] == 4
    assert any("000000 left out of ImageSets" in w["warning"] for w in merged.warnings if w["frame"] == "000950")
    with pytest.raises(ValueError, match="missing_image_policy must be one of"):
        KittiMapping.from_dict({**load_mapping("kitti"), "missing_image_policy": "interpolate"})


def test_global_coordinate_system_is_rejected(projects, tmp_path):
    request = kitti_request("global")
    with pytest.raises(ValueError, match="KITTI has no global frame"):
        KittiFormat.check_request(request)
    with pytest.raises(ValueError, match="KITTI has no global frame"):
        run_serial(projects["default"], tmp_path / "out", request)
    assert not (tmp_path / "out").exists()


def test_counts_say_what_happened_to_every_label(projects, exports):
    project, (run, _) = projects["default"], exports["default"]
    counts = run.merged.counts
    boxes = [b for stem in stems(project) for b in source_boxes(project, stem)]
    for kitti_class in ("Car", "Van", "Truck", "Cyclist", "Pedestrian", "Misc"):
        assert counts[f"class.{kitti_class}"] == sum(EXPECTED_CLASS[b["type"]] == kitti_class for b in boxes)
    for source_type in ("traffic_cone", "barrier"):
        assert counts[f"dropped_no_kitti_class.{source_type}"] == sum(b["type"] == source_type for b in boxes)
    assert counts["annotations"] == sum(EXPECTED_CLASS[b["type"]] is not None for b in boxes)
    assert counts["tilted_boxes"] == 0 and counts["images"] == counts["pointclouds"] == counts["frames"]


# -- options ---------------------------------------------------------------------------------------------------

def test_without_images_pointclouds_and_poses_only_labels_and_calib_are_written(projects, tmp_path):
    run = run_serial(projects["default"], tmp_path / "out",
                     kitti_request(include_images=False, include_pointcloud=False, include_ego_pose=False,
                                   max_frames=3))
    training = tmp_path / "out" / "training"
    assert sorted(p.name for p in training.iterdir()) == ["calib", "frame_ids.txt", "label_2"]
    assert run.merged.counts["images"] == run.merged.counts["pointclouds"] == run.merged.counts["poses"] == 0
    assert imagesets(tmp_path / "out")["train"] == ["000000", "000001", "000002"]  # lidar-only: all listed


@pytest.mark.parametrize("coordinate_system", ["lidar", "ego_vehicle"])
def test_include_ego_pose_writes_each_frames_velodyne_to_global_pose(coordinate_system, projects, tmp_path):
    """pose/<idx>.txt maps velodyne points to the project's world frame: a box centre taken there from the
    velodyne file's frame lands where the source's ego pose and lidar calibration put it."""
    project = projects["rotated"]
    run = run_serial(project, tmp_path / "out", kitti_request(coordinate_system, max_frames=4,
                                                              include_images=False, include_pointcloud=False))
    assert run.merged.counts["poses"] == run.merged.counts["frames"] == 4
    ego_from_lidar = sensor_to_ego(project, "lidar-fusion")
    for idx, stem in enumerate(stems(project)[:4]):
        pose = np.loadtxt(tmp_path / "out" / "training" / "pose" / f"{idx:06d}.txt").reshape(3, 4)
        src = json.loads((project / "ego_pose" / f"{stem}.json").read_text())["transform"]
        t, q = src["translation"], src["rotation"]
        global_from_ego = homogeneous(Quaternion(q["w"], q["x"], q["y"], q["z"]).rotation_matrix)
        global_from_ego[:3, 3] = [t["x"], t["y"], t["z"]]
        calib = read_calib(tmp_path / "out" / "training" / "calib" / f"{idx:06d}.txt")
        for obj, box in zip(read_labels(tmp_path / "out" / "training" / "label_2" / f"{idx:06d}.txt"),
                            kept(source_boxes(project, stem))):
            centre_velo, _ = kitti_box_in_velo(obj, calib)
            expected = (global_from_ego @ ego_from_lidar @ np.append(box["center"], 1))[:3]
            np.testing.assert_allclose(pose[:, :3] @ centre_velo + pose[:, 3], expected, atol=CENTRE_TOL_M)


def test_mapping_options_split_drop_png_and_reference_camera(projects, tmp_path):
    """The mapping's split, out_of_image drop, png images and reference camera, applied through the plan."""
    project = projects["default"]
    staging = tmp_path / "staging"
    found = discover(project, kitti_request(max_frames=8), staging, export_id="k", batch_size=3)
    plan = ExportPlan.load(staging)
    plan.mappings.update({"split": {"val_fraction": 0.25, "test_fraction": 0.25}, "out_of_image": "drop",
                          "image_format": "png", "reference_camera": "camera-back"})
    plan.save()
    for i in range(found.n_batches):
        convert_batch(staging, i)
    merged = merge_tables(staging)
    out = plan.output_dir
    sets = {s: (out / "ImageSets" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert sets["train"] == [f"{i:06d}" for i in range(4)] and sets["val"] == ["000004", "000005"]
    assert sets["test"] == ["000006", "000007"] and sets["trainval"] == sets["train"] + sets["val"]
    assert sorted(p.suffix for p in (out / "training" / "image_2").iterdir()) == [".png"] * 8
    K, width, height = camera_config(project, "camera-back")
    calib = read_calib(out / "training" / "calib" / "000000.txt")
    np.testing.assert_allclose(calib["P2"][:, :3], K)
    labels = [o for i in range(8) for o in read_labels(out / "training" / "label_2" / f"{i:06d}.txt")]
    assert labels and all(o["truncated"] < 1 and o["bbox"][2] > o["bbox"][0] for o in labels)
    assert merged.counts["dropped_out_of_image"] > 0 and "out_of_image_kept" not in merged.counts


@pytest.mark.parametrize("export", ["default", "rotated", "rotated-ego"])
def test_every_calib_file_has_kittis_seven_matrices_in_order(export, projects, exports):
    """P0..P3 (12 values), R0_rect (9), Tr_velo_to_cam (12), Tr_imu_to_velo (12): KITTI readers take them by
    name or by position; in lidar mode Tr_imu_to_velo is the inverse lidar calibration."""
    run, dest = exports[export]
    project = projects["rotated" if export.startswith("rotated") else "default"]
    files = sorted((dest / "training" / "calib").glob("*.txt"))
    assert len(files) == run.merged.counts["frames"]
    for path in files:
        lines = [line.split(":", 1) for line in path.read_text().splitlines()]
        assert [(key, len(values.split())) for key, values in lines] == [
            ("P0", 12), ("P1", 12), ("P2", 12), ("P3", 12), ("R0_rect", 9), ("Tr_velo_to_cam", 12),
            ("Tr_imu_to_velo", 12)]
    calib = read_calib(files[0])
    expected = np.eye(4) if export.endswith("ego") else np.linalg.inv(sensor_to_ego(project, "lidar-fusion"))
    np.testing.assert_allclose(calib["Tr_imu_to_velo"], expected[:3], atol=1e-9)
    np.testing.assert_allclose(calib["R0_rect"], np.eye(3))
    # one camera, unrectified: every P is [K | 0] with K the reference camera's intrinsic (stereo baselines 0)
    for name in ("P0", "P1", "P3"):
        np.testing.assert_array_equal(calib[name], calib["P2"], err_msg=name)
    np.testing.assert_array_equal(calib["P2"][:, 3], 0)
    assert calib["P2"][0, 0] > 100 and calib["P2"][2].tolist() == [0, 0, 1, 0]


def test_coordinate_precision_sets_the_decimals_of_label_geometry(projects, exports, tmp_path):
    """label_2's alpha, h w l, x y z and rotation_y get coordinate_precision decimals (6 when unset); pixels keep 2."""
    _, full = exports["default"]
    run = run_serial(projects["default"], tmp_path / "out", kitti_request(max_frames=3, coordinate_precision=2,
                                                                          include_images=False,
                                                                          include_pointcloud=False))
    geometry = [3, *range(8, 15)]
    compared = 0
    for idx in range(3):
        rounded = (tmp_path / "out" / "training" / "label_2" / f"{idx:06d}.txt").read_text().splitlines()
        precise = (full / "training" / "label_2" / f"{idx:06d}.txt").read_text().splitlines()
        assert len(rounded) == len(precise)
        for short, long in zip(rounded, precise):
            a, b = short.split(" "), long.split(" ")
            assert all(len(a[i].split(".")[1]) == 2 and len(b[i].split(".")[1]) == 6 for i in geometry)
            assert all(len(a[i].split(".")[1]) == 2 for i in range(4, 8))  # 2D box: pixels
            assert all(abs(float(a[i]) - float(b[i])) <= 0.005 + 1e-9 for i in geometry)
            compared += 1
    assert compared > 20 and run.merged.annotations == compared


def test_include_sweeps_is_refused_with_the_reason(projects, tmp_path):
    from stages.errors import RequestError

    request = kitti_request(include_sweeps=True, key_frame_interval=2)
    with pytest.raises(RequestError, match="KITTI 3D object has no sweeps") as err:
        KittiFormat.check_request(request)
    assert err.value.field == "export_options.include_sweeps"
    with pytest.raises(RequestError, match="KITTI 3D object has no sweeps"):
        run_serial(projects["default"], tmp_path / "out", request)
    assert not (tmp_path / "out").exists()
    KittiFormat.check_request(kitti_request(include_sweeps=True))  # every frame a key frame: nothing to refuse


def test_the_mapping_tells_mapped_left_out_and_unknown_types_apart():
    mapping = KittiMapping.from_dict(load_mapping("kitti"))
    assert mapping.class_of("hovercraft") == (None, False)
    assert mapping.class_of("Traffic-Cone") == (None, True)  # listed as null: left out on purpose
    assert mapping.class_of("bicycle") == ("Cyclist", True) and mapping.class_of("Bicycle") == ("Misc", True)
    assert mapping.class_of("CAR") == ("Car", True) and mapping.class_of("BICYCLE") == (None, False)  # ambiguous
    assert mapping.class_of("pedestrian", ["sitting"]) == ("Person_sitting", True)
    with pytest.raises(ValueError, match="Bus"):
        KittiMapping.from_dict({"classes": {"bus": "Bus"}})


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_unknown_types_are_skipped_and_counted_or_fail_naming_the_frame_and_label_file(policy, projects, tmp_path):
    project, staging = projects["default"], tmp_path / "staging"
    discover(project, kitti_request(max_frames=2), staging, export_id="k", batch_size=2)
    plan = ExportPlan.load(staging)
    plan.mappings["classes"] = {"car": "Car"}
    plan.mappings["unknown_type_policy"] = policy
    plan.save()
    if policy == "error":
        with pytest.raises(InputError, match="has no KITTI class") as err:
            convert_batch(staging, 0)
        assert err.value.frame == plan.frames[0].frame_id and err.value.path.endswith(".json")
        return
    convert_batch(staging, 0)
    counts = merge_tables(staging).counts
    boxes = [b for stem in stems(project)[:2] for b in source_boxes(project, stem)]
    assert counts["class.Car"] == counts["annotations"] == sum(b["type"] == "car" for b in boxes) > 0
    for source_type in {b["type"] for b in boxes} - {"car"}:
        assert counts[f"dropped_unknown_type.{source_type}"] == sum(b["type"] == source_type for b in boxes)


# -- label geometry ------------------------------------------------------------------------------------------

def test_rotation_y_is_minus_yaw_minus_half_pi_on_kittis_own_rig():
    cam_from_velo = np.eye(4)
    cam_from_velo[:3, :3] = KITTI_CAM_FROM_VELO
    camera = PinholeCamera(cam_from_velo, np.array([[700.0, 0, 600], [0, 700, 180], [0, 0, 1]]), 1242, 375)
    yaws = np.linspace(-3.1, 3.1, 13)
    quats = [Quaternion(axis=[0, 0, 1], angle=y).elements for y in yaws]
    boxes = kitti_boxes(np.tile([15.0, 2.0, -0.8], (13, 1)), np.tile([4.0, 1.8, 1.5], (13, 1)), quats, camera)
    assert all(angle_diff(ry, -y - np.pi / 2) < 1e-12 for ry, y in zip(boxes.rotation_y, yaws))
    np.testing.assert_allclose(boxes.location, np.tile([-2.0, 0.8 + 0.75, 15.0], (13, 1)), atol=1e-12)
    np.testing.assert_allclose(boxes.alpha, (boxes.rotation_y - np.arctan2(-2.0, 15.0) + np.pi) % (2 * np.pi) - np.pi)


def test_a_box_reaching_behind_the_camera_gets_a_clipped_2d_box():
    camera = PinholeCamera(np.eye(4), np.array([[500.0, 0, 320], [0, 500, 180], [0, 0, 1]]), 640, 360)
    # camera frame is the "lidar" frame here: a 4 m box centred 0.5 m in front of the camera, heading along z
    heading_z = Quaternion(axis=[0, 1, 0], angle=-np.pi / 2).elements
    boxes = kitti_boxes(np.array([[1.0, 0.5, 0.5], [0.0, 0.0, -5.0]]), np.array([[4.0, 1.8, 1.5]] * 2),
                        np.array([heading_z] * 2), camera)
    assert boxes.visible.tolist() == [True, False]
    left, top, right, bottom = boxes.bbox[0]
    assert 0 <= left < right <= 639 and 0 <= top < bottom <= 359
    assert right == 639 and bottom == 359  # the part beside/below the camera runs off the image
    # 4 corners behind the camera; of the 4 in front (z = 2.5 m) only (x, y) = (0.1, -0.25) projects inside
    assert boxes.truncation.tolist() == [7 / 8, 1.0]
    assert boxes.bbox[1].tolist() == [0.0, 0.0, 0.0, 0.0]
