"""SUSTechPOINTS scenes: the real example scene and variants of it built at test time are read into the internal
model exactly as written, and export to nuScenes data that the devkit loads with the same boxes and projections.

The real scene lives in ../shared (read-only); every variant is a copy in tmp_path, never in the repository.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pyquaternion import Quaternion

from stages.errors import InputError, PointCloudError
from stages.geometry import Pose, quat_to_matrix, yaw_of
from stages.pcd import read_points_xyzir
from stages.sources import open_project
from stages.sources.sustech import SustechSource

SUSTECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sustech-example"
FRAMES = ["000950", "000965", "000970", "000975"]
CAMERAS = ["front", "left", "right"]
AXES = {"lidar_axes": "x_left_y_back"}
RZ90 = Quaternion(axis=[0, 0, 1], degrees=90).rotation_matrix


# --- helpers ----------------------------------------------------------------------------------------------

def copy_scene(tmp_path: Path, name: str = "scene") -> Path:
    """A private, writable copy of the real scene (variants are made by editing the copy)."""
    dst = tmp_path / name
    shutil.copytree(SUSTECH, dst)
    return dst


def raw_labels(scene: Path, frame: str) -> list[dict]:
    data = json.loads((scene / "label" / f"{frame}.json").read_text())
    return data["objs"] if isinstance(data, dict) else data


def raw_calib(scene: Path, cam: str) -> tuple[np.ndarray, np.ndarray]:
    """(lidar→camera 4x4, intrinsic 3x3) as written in the calibration file."""
    d = json.loads((scene / "calib" / "camera" / f"{cam}.json").read_text())
    return np.array(d["extrinsic"], dtype=float).reshape(4, 4), np.array(d["intrinsic"], dtype=float).reshape(3, 3)


def euler_reference(rot: dict) -> np.ndarray:
    """R = Rx·Ry·Rz built with pyquaternion, independently of stages.geometry."""
    q = (Quaternion(axis=[1, 0, 0], angle=rot["x"]) * Quaternion(axis=[0, 1, 0], angle=rot["y"])
         * Quaternion(axis=[0, 0, 1], angle=rot["z"]))
    return q.rotation_matrix


def project(intrinsic: np.ndarray, points_cam: np.ndarray) -> np.ndarray:
    """Pixel coordinates of (N, 3) camera-frame points."""
    uvw = points_cam @ intrinsic.T
    return uvw[:, :2] / uvw[:, 2:3]


def frame_ref(source: SustechSource, frame_id: str):
    return next(f for f in source.frames() if f.frame_id == frame_id)


def boxes_by_id(source: SustechSource, frame_id: str) -> dict:
    return {b.obj_id: b for b in source.read_labels(frame_ref(source, frame_id))}


# --- the real scene, read --------------------------------------------------------------------------------

def test_the_real_scene_is_detected_as_a_sustech_scene():
    assert SustechSource.detect(SUSTECH)
    source = open_project(SUSTECH, AXES)
    assert isinstance(source, SustechSource) and source.layout == "sustech"
    assert source.main_lidar == "lidar" and source.project_name == "sustech-example"


def test_frames_are_the_lidar_stems_with_their_images_labels_and_times():
    frames = SustechSource(SUSTECH).frames()
    assert [f.frame_id for f in frames] == FRAMES
    # frame numbers at the default 10 Hz from the default base epoch
    assert [f.timestamp_us for f in frames] == [1_600_000_000_000_000 + int(s) * 100_000 for s in FRAMES]
    for f in frames:
        assert f.lidar == {"lidar": str(SUSTECH.resolve() / "lidar" / f"{f.frame_id}.pcd")}
        assert f.label == str(SUSTECH.resolve() / "label" / f"{f.frame_id}.json")
        assert f.ego_pose is None
        has_images = f.frame_id != "000950"
        assert f.cameras == {c: str(SUSTECH.resolve() / "camera" / c / f"{f.frame_id}.jpg") if has_images else None
                             for c in CAMERAS}


def test_calibration_has_the_lidar_and_every_camera_with_its_intrinsic_and_image_size():
    calib = SustechSource(SUSTECH, AXES).calibration()
    assert sorted(calib) == ["front", "left", "lidar", "right"]
    assert calib["lidar"].sensor_type == "lidar" and calib["lidar"].intrinsic is None
    for cam in CAMERAS:
        _, intrinsic = raw_calib(SUSTECH, cam)
        with Image.open(SUSTECH / "camera" / cam / "000965.jpg") as img:
            size = img.size
        c = calib[cam]
        assert c.sensor_type == "camera" and c.camera_model == "pinhole"
        assert (c.width, c.height) == size == (2048, 1536)
        np.testing.assert_array_equal(c.intrinsic, intrinsic)


def test_with_sustech_axes_the_cameras_look_forward_left_and_right_in_the_ego_frame():
    calib = SustechSource(SUSTECH, AXES).calibration()
    looks = {cam: quat_to_matrix(calib[cam].pose.rotation) @ [0, 0, 1] for cam in CAMERAS}  # optical axis in ego
    for cam, direction in {"front": [1, 0, 0], "left": [0, 1, 0], "right": [0, -1, 0]}.items():
        assert np.dot(looks[cam], direction) > np.cos(np.radians(10)), (cam, looks[cam])


@pytest.mark.parametrize("settings", [{}, AXES, {**AXES, "lidar_height": 1.9}])
def test_camera_calibration_reproduces_the_source_projection(settings):
    """Any lidar point projects to the same pixel through (lidar→ego, camera→ego, K) as through K·extrinsic."""
    source = SustechSource(SUSTECH, settings)
    calib = source.calibration()
    lidar_to_ego = calib["lidar"].pose
    centres = np.array([[o["psr"]["position"][k] for k in "xyz"] for f in FRAMES for o in raw_labels(SUSTECH, f)])
    for cam in CAMERAS:
        extrinsic, intrinsic = raw_calib(SUSTECH, cam)
        expected_cam = centres @ extrinsic[:3, :3].T + extrinsic[:3, 3]
        ours_cam = calib[cam].pose.inverse().apply(lidar_to_ego.apply(centres))
        np.testing.assert_allclose(ours_cam, expected_cam, atol=1e-9)
        front = expected_cam[:, 2] > 0.5
        assert front.any()
        np.testing.assert_allclose(project(calib[cam].intrinsic, ours_cam[front]),
                                   project(intrinsic, expected_cam[front]), atol=1e-6)


def test_the_lidar_axis_setting_rotates_the_lidar_by_rz_plus_90_degrees():
    default = SustechSource(SUSTECH).calibration()
    sustech = SustechSource(SUSTECH, {**AXES, "lidar_height": 1.9}).calibration()
    assert default["lidar"].pose.is_identity()
    np.testing.assert_allclose(quat_to_matrix(sustech["lidar"].pose.rotation), RZ90, atol=1e-12)
    np.testing.assert_allclose(sustech["lidar"].pose.translation, [0, 0, 1.9])
    # the lidar x axis (left in SUSTech rigs) is the ego's left, its y axis (back) the ego's back
    np.testing.assert_allclose(sustech["lidar"].pose.apply(np.array([[1.0, 0, 0], [0, 1.0, 0]])),
                               [[0, 1, 1.9], [-1, 0, 1.9]], atol=1e-12)
    # every camera moves with the lidar: camera→ego(setting) = (Rz90, +1.9 z) ∘ camera→ego(default)
    shift = Pose.from_matrix(np.block([[RZ90, np.array([[0], [0], [1.9]])], [np.zeros((1, 3)), np.ones((1, 1))]]))
    for cam in CAMERAS:
        np.testing.assert_allclose(sustech[cam].pose.matrix(), shift.compose(default[cam].pose).matrix(), atol=1e-9)


def test_labels_are_read_as_written_with_euler_rx_ry_rz_rotations_and_camelcase_types():
    source = SustechSource(SUSTECH, AXES)
    types = set()
    for frame in FRAMES:
        objs = raw_labels(SUSTECH, frame)
        boxes = source.read_labels(frame_ref(source, frame))
        assert len(boxes) == len(objs)
        for obj, box in zip(objs, boxes):
            psr = obj["psr"]
            assert box.obj_id == obj["obj_id"] and box.obj_type == obj["obj_type"]
            np.testing.assert_array_equal(box.center, [psr["position"][k] for k in "xyz"])
            np.testing.assert_array_equal(box.size, [psr["scale"][k] for k in "xyz"])
            np.testing.assert_allclose(quat_to_matrix(box.rotation), euler_reference(psr["rotation"]), atol=1e-12)
            assert box.attributes == [] and box.num_pts is None
            types.add(box.obj_type)
    assert types == {"Bus", "Car", "Motor", "Pedestrian", "Rider", "Truck"}
    # the real labels do carry roll and pitch, so full rotations (not only yaw) matter
    assert any(o["psr"]["rotation"]["x"] != 0 for o in raw_labels(SUSTECH, "000950"))


def test_the_real_point_clouds_with_padding_fields_read_as_xyzir():
    source = SustechSource(SUSTECH)
    for ref in source.frames():
        points = source.read_points(ref)
        assert points.dtype == np.float32 and points.shape[1] == 5 and len(points) > 60_000
        assert np.isfinite(points).all()


# --- variants of the real scene --------------------------------------------------------------------------

def test_a_label_file_written_as_objs_reads_like_a_list(tmp_path):
    scene = copy_scene(tmp_path)
    objs = raw_labels(scene, "000965")
    (scene / "label" / "000965.json").write_text(json.dumps({"frame": "000965", "objs": objs}))
    as_dict = SustechSource(scene).read_labels(frame_ref(SustechSource(scene), "000965"))
    as_list = SustechSource(SUSTECH).read_labels(frame_ref(SustechSource(SUSTECH), "000965"))
    assert len(as_dict) == len(as_list) == len(objs)
    for a, b in zip(as_dict, as_list):
        assert (a.obj_id, a.obj_type) == (b.obj_id, b.obj_type)
        for field in ("center", "size", "rotation"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_quaternion_rotations_and_obj_attr_are_read(tmp_path):
    scene = copy_scene(tmp_path)
    objs = raw_labels(scene, "000970")
    for obj in objs:
        q = Quaternion(matrix=euler_reference(obj["psr"]["rotation"]))
        obj["psr"]["rotation"] = {"x": q.x, "y": q.y, "z": q.z, "w": q.w}  # scalar last on disk
    objs[0]["obj_attr"] = "static, door open"
    objs[1]["obj_attr"] = None
    (scene / "label" / "000970.json").write_text(json.dumps(objs))
    euler = boxes_by_id(SustechSource(SUSTECH), "000970")
    quat = boxes_by_id(SustechSource(scene), "000970")
    assert quat.keys() == euler.keys()
    for obj_id, box in quat.items():
        np.testing.assert_allclose(quat_to_matrix(box.rotation), quat_to_matrix(euler[obj_id].rotation), atol=1e-12)
    assert quat[objs[0]["obj_id"]].attributes == ["static", "door open"]
    assert quat[objs[1]["obj_id"]].attributes == []


def test_a_calib_with_lidar_to_camera_instead_of_extrinsic_reads_the_same(tmp_path):
    scene = copy_scene(tmp_path)
    for cam in CAMERAS:
        path = scene / "calib" / "camera" / f"{cam}.json"
        d = json.loads(path.read_text())
        d["lidar_to_camera"] = d.pop("extrinsic")
        path.write_text(json.dumps(d))
    ours, real = SustechSource(scene, AXES).calibration(), SustechSource(SUSTECH, AXES).calibration()
    for cam in CAMERAS:
        np.testing.assert_array_equal(ours[cam].pose.matrix(), real[cam].pose.matrix())
        np.testing.assert_array_equal(ours[cam].intrinsic, real[cam].intrinsic)


def test_stray_calib_keys_are_ignored_but_two_disagreeing_extrinsics_are_an_error(tmp_path):
    # the real left.json carries a stale "extrinsic_ok" next to "extrinsic": the latter is used
    left = json.loads((SUSTECH / "calib" / "camera" / "left.json").read_text())
    assert "extrinsic_ok" in left
    extrinsic, _ = raw_calib(SUSTECH, "left")
    calib = SustechSource(SUSTECH).calibration()
    np.testing.assert_allclose(calib["left"].pose.inverse().matrix(), extrinsic, atol=1e-12)

    scene = copy_scene(tmp_path)
    path = scene / "calib" / "camera" / "left.json"
    left["lidar_to_camera"] = left["extrinsic_ok"]
    path.write_text(json.dumps(left))
    with pytest.raises(InputError, match="disagree") as err:
        SustechSource(scene).calibration()
    assert err.value.path == str(path.resolve())


def test_a_bin_lidar_file_reads_as_float32_xyz_intensity(tmp_path):
    scene = copy_scene(tmp_path)
    pcd = scene / "lidar" / "000970.pcd"
    xyzi = read_points_xyzir(pcd)[:, :4]
    pcd.unlink()
    xyzi.astype("<f4").tofile(scene / "lidar" / "000970.bin")
    source = SustechSource(scene)
    assert SustechSource.detect(scene)
    ref = frame_ref(source, "000970")
    assert ref.lidar["lidar"].endswith("000970.bin")
    points = source.read_points(ref)
    assert points.dtype == np.float32 and points.shape == (len(xyzi), 5)
    np.testing.assert_array_equal(points[:, :4], xyzi)
    assert not points[:, 4].any()

    with open(scene / "lidar" / "000970.bin", "ab") as f:
        f.write(b"\0" * 6)  # a truncated point: not a multiple of 16 bytes
    with pytest.raises(PointCloudError, match="multiple of 16") as err:
        source.read_points(ref)
    assert err.value.frame == "000970" and err.value.path.endswith("000970.bin")


def test_a_missing_point_cloud_names_the_frame_and_file(tmp_path):
    scene = copy_scene(tmp_path)
    source = SustechSource(scene)
    ref = frame_ref(source, "000975")
    (scene / "lidar" / "000975.pcd").unlink()
    with pytest.raises(PointCloudError) as err:
        source.read_points(ref)
    assert err.value.frame == "000975" and err.value.path.endswith("000975.pcd")


def _car(**psr_changes) -> dict:
    """A well-formed label object with parts of its psr replaced (None removes the part)."""
    psr = {"position": {"x": 1, "y": 0, "z": 0}, "scale": {"x": 1, "y": 1, "z": 1},
           "rotation": {"x": 0, "y": 0, "z": 0}}
    psr.update(psr_changes)
    return {"obj_id": "1", "obj_type": "Car", "psr": {k: v for k, v in psr.items() if v is not None}}


MALFORMED = {
    "not json": "[{",
    "neither list nor objs": json.dumps({"frame": "000965"}),
    "object not a dict": json.dumps([42]),
    "no obj_type": json.dumps([{**_car(), "obj_type": None}]),
    "no psr": json.dumps([{"obj_id": "1", "obj_type": "Car"}]),
    "position not numbers": json.dumps([_car(position={"x": "1", "y": 0, "z": 0})]),
    "zero size": json.dumps([_car(scale={"x": 0, "y": 1, "z": 1})]),
    "no rotation": json.dumps([_car(rotation=None)]),
    "zero quaternion": json.dumps([_car(rotation={"x": 0, "y": 0, "z": 0, "w": 0})]),
    "obj_attr a number": json.dumps([{**_car(), "obj_attr": 3}]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_label_is_an_input_error_naming_frame_and_file(tmp_path, case):
    scene = copy_scene(tmp_path)
    path = scene / "label" / "000965.json"
    path.write_text(MALFORMED[case])
    source = SustechSource(scene)
    with pytest.raises(InputError) as err:
        source.read_labels(frame_ref(source, "000965"))
    assert err.value.frame == "000965" and err.value.path == str(path.resolve())
    assert "000965" in str(err.value) and str(path.resolve()) in str(err.value)


def test_a_missing_obj_id_gets_a_frame_unique_id(tmp_path):
    scene = copy_scene(tmp_path)
    objs = raw_labels(scene, "000965")
    del objs[0]["obj_id"]
    objs[1]["obj_id"] = ""
    (scene / "label" / "000965.json").write_text(json.dumps(objs))
    boxes = SustechSource(scene).read_labels(frame_ref(SustechSource(scene), "000965"))
    assert [b.obj_id for b in boxes[:2]] == ["000965#0", "000965#1"]


@pytest.mark.parametrize("settings, message", [
    ({"lidar_axis": "x_left_y_back"}, "unknown"),
    ({"lidar_axes": "x_right"}, "lidar_axes"),
    ({"frame_rate_hz": 0}, "frame_rate_hz"),
    ({"lidar_height": "1.8"}, "lidar_height"),
    ({"camera_image_size": [2048]}, "camera_image_size"),
])
def test_unknown_or_invalid_settings_are_rejected(settings, message):
    with pytest.raises(InputError, match=message):
        SustechSource(SUSTECH, settings)


def test_frame_numbers_use_the_frame_rate_and_unix_stems_are_seconds(tmp_path):
    source = SustechSource(SUSTECH, {"frame_rate_hz": 20, "frame_time_base_s": 1_700_000_000})
    assert [f.timestamp_us for f in source.frames()] == [1_700_000_000_000_000 + int(s) * 50_000 for s in FRAMES]

    scene = copy_scene(tmp_path)
    stems = {"000950": "1625625063.000", "000965": "1625625063.100", "000970": "1625625063.2", "000975": "1625625064"}
    for old, new in stems.items():
        for folder, suffix in [("lidar", ".pcd"), ("label", ".json")] + [(f"camera/{c}", ".jpg") for c in CAMERAS]:
            path = scene / folder / f"{old}{suffix}"
            if path.exists():
                path.rename(path.with_name(f"{new}{suffix}"))
    frames = SustechSource(scene).frames()
    assert [f.frame_id for f in frames] == list(stems.values())
    assert [f.timestamp_us for f in frames] == [1625625063_000_000, 1625625063_100_000, 1625625063_200_000,
                                                1625625064_000_000]
    assert frames[1].cameras["front"].endswith("1625625063.100.jpg") and frames[0].cameras["front"] is None

    (scene / "lidar" / "frame_a.pcd").write_bytes(b"")
    with pytest.raises(InputError, match="frame_a"):
        SustechSource(scene).frames()


def test_ego_pose_files_with_a_transform_are_read_and_ins_records_are_not(tmp_path):
    scene = copy_scene(tmp_path)
    (scene / "ego_pose").mkdir()
    q = Quaternion(axis=[0, 0, 1], degrees=30)
    (scene / "ego_pose" / "000965.json").write_text(json.dumps({"transform": {
        "translation": {"x": "10.5", "y": -2, "z": 0.25}, "rotation": {"x": q.x, "y": q.y, "z": q.z, "w": str(q.w)}}}))
    (scene / "ego_pose" / "000970.json").write_text(json.dumps({"lat": "22.59", "lng": "113.97", "azimuth": "12.5"}))
    source = SustechSource(scene)
    frames = {f.frame_id: f for f in source.frames()}
    pose = source.read_ego_pose(frames["000965"])
    np.testing.assert_allclose(pose.translation, [10.5, -2, 0.25])
    np.testing.assert_allclose(quat_to_matrix(pose.rotation), q.rotation_matrix, atol=1e-12)
    assert source.read_ego_pose(frames["000970"]) is None  # INS record: not interpreted
    assert source.read_ego_pose(frames["000975"]) is None  # no file

    (scene / "ego_pose" / "000975.json").write_text(json.dumps({"transform": {"translation": {"x": 1}}}))
    with pytest.raises(InputError, match="transform") as err:
        source.read_ego_pose(SustechSource(scene).frames()[3])
    assert err.value.frame == "000975"


def test_a_camera_without_any_image_takes_its_size_from_the_settings(tmp_path):
    scene = copy_scene(tmp_path)
    for image in (scene / "camera" / "right").iterdir():
        image.unlink()
    assert SustechSource(scene).calibration()["right"].width is None
    calib = SustechSource(scene, {"camera_image_size": {"right": [1920, 1080]}}).calibration()
    assert (calib["right"].width, calib["right"].height) == (1920, 1080)
    assert (calib["front"].width, calib["front"].height) == (2048, 1536)  # a real image wins
    assert all(f.cameras["right"] is None for f in SustechSource(scene).frames())


def test_a_camera_folder_without_calibration_is_an_input_error(tmp_path):
    scene = copy_scene(tmp_path)
    (scene / "calib" / "camera" / "left.json").unlink()
    with pytest.raises(InputError, match="calib/camera/left.json"):
        SustechSource(scene).calibration()


def test_a_nextpoints_project_is_not_taken_for_a_sustech_scene(synth_project):
    assert not SustechSource.detect(synth_project)
    assert open_project(synth_project).layout == "nextpoints"


# --- the real scene, exported to nuScenes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The real scene exported with SUSTech's lidar axes, loaded by the devkit."""
    from nuscenes.nuscenes import NuScenes

    from stages.request import ExportOptions, ExportRequest
    from stages.serial import run_serial

    dest = tmp_path_factory.mktemp("sustech-nuscenes") / "dataset"
    request = ExportRequest(export_options=ExportOptions(compress_output=False))
    run = run_serial(SUSTECH, dest, request, source_settings=AXES)
    nusc = NuScenes(version=request.version, dataroot=str(dest), verbose=False)
    source = SustechSource(SUSTECH, AXES)
    by_time = {f.timestamp_us: f for f in source.frames()}
    samples = {by_time[s["timestamp"]].frame_id: s for s in nusc.sample}
    return {"run": run, "nusc": nusc, "source": source, "samples": samples}


def _lidar_boxes(exported, frame_id: str) -> tuple[dict, list]:
    """(annotation token -> source box, source boxes with no annotation) for one frame, matched by centre."""
    nusc, source = exported["nusc"], exported["source"]
    _, boxes, _ = nusc.get_sample_data(exported["samples"][frame_id]["data"]["LIDAR_TOP"])
    matched, unmatched = {}, []
    for src in source.read_labels(frame_ref(source, frame_id)):
        dist = [np.linalg.norm(b.center - src.center) for b in boxes]
        if dist and min(dist) < 1e-3:
            matched[boxes[int(np.argmin(dist))].token] = (boxes[int(np.argmin(dist))], src)
        else:
            unmatched.append(src)
    return matched, unmatched


def test_the_real_scene_exports_to_nuscenes_with_every_label_present_or_reported(exported):
    nusc, run = exported["nusc"], exported["run"]
    assert sorted(exported["samples"]) == FRAMES and len(nusc.scene) == 1
    counts = run.merged.counts
    unmatched_types: dict[str, int] = {}
    total = 0
    for frame_id, sample in exported["samples"].items():
        matched, unmatched = _lidar_boxes(exported, frame_id)
        assert len(matched) == len(sample["anns"])  # every annotation is a source label, once
        total += len(matched) + len(unmatched)
        for box in unmatched:
            unmatched_types[box.obj_type] = unmatched_types.get(box.obj_type, 0) + 1
    assert total == sum(len(raw_labels(SUSTECH, f)) for f in FRAMES)
    # a label that is not exported is reported, with its reason, per type
    assert {t: counts.get(f"dropped_unknown_type.{t}") for t in unmatched_types} == unmatched_types
    assert counts["annotations"] + sum(unmatched_types.values()) == total
    assert unmatched_types == {} and counts["dropped_unknown_types"] == 0  # every type of the real scene maps
    for ann in nusc.sample_annotation:
        assert len(ann["attribute_tokens"]) <= 1


def test_exported_boxes_in_the_lidar_frame_equal_the_source_boxes(exported):
    from nuscenes.eval.common.utils import quaternion_yaw

    checked = 0
    for frame_id in FRAMES:
        for box, src in _lidar_boxes(exported, frame_id)[0].values():
            np.testing.assert_allclose(box.center, src.center, atol=1e-3)
            np.testing.assert_allclose(box.wlh, [src.size[1], src.size[0], src.size[2]], atol=1e-3)
            np.testing.assert_allclose(box.rotation_matrix, quat_to_matrix(src.rotation), atol=1e-4)  # roll, pitch too
            # yaw as the devkit's detection eval defines it: the heading of the box's x (length) axis
            yaw_diff = quaternion_yaw(box.orientation) - yaw_of(src.rotation)
            assert abs(np.angle(np.exp(1j * yaw_diff))) < 1e-4
            checked += 1
    assert checked == exported["run"].merged.annotations


def test_box_centres_project_into_every_camera_as_with_the_source_calibration(exported):
    from nuscenes.utils.geometry_utils import view_points

    nusc = exported["nusc"]
    channels = {"front": "CAM_FRONT", "left": "CAM_FRONT_LEFT", "right": "CAM_FRONT_RIGHT"}
    projected = 0
    for frame_id in FRAMES[1:]:
        sample = exported["samples"][frame_id]
        matched, _ = _lidar_boxes(exported, frame_id)
        for cam, channel in channels.items():
            extrinsic, intrinsic = raw_calib(SUSTECH, cam)
            sd = nusc.get("sample_data", sample["data"][channel])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            assert (sd["width"], sd["height"]) == (2048, 1536)
            for token, (_, src) in matched.items():
                box = nusc.get_box(token)  # global frame
                box.translate(-np.array(pose["translation"]))
                box.rotate(Quaternion(pose["rotation"]).inverse)
                box.translate(-np.array(cs["translation"]))
                box.rotate(Quaternion(cs["rotation"]).inverse)
                expected_cam = extrinsic[:3, :3] @ src.center + extrinsic[:3, 3]
                np.testing.assert_allclose(box.center, expected_cam, atol=1e-3)
                if expected_cam[2] < 0.5:
                    continue
                ours = view_points(box.center.reshape(3, 1), np.array(cs["camera_intrinsic"]), normalize=True)[:2, 0]
                theirs = (intrinsic @ expected_cam)[:2] / expected_cam[2]
                assert np.abs(ours - theirs).max() < 1.0, (frame_id, cam, src.obj_id, ours, theirs)
                projected += 1
    assert projected > 30


def test_the_frame_without_images_gets_the_nearest_frames_images_with_a_warning(exported):
    """missing_image_policy: nearest (the default): 000950 has no image; each camera's key frame is 000965's."""
    nusc, run = exported["nusc"], exported["run"]
    for frame_id in FRAMES:
        assert set(exported["samples"][frame_id]["data"]) == {"LIDAR_TOP", "CAM_FRONT", "CAM_FRONT_LEFT",
                                                              "CAM_FRONT_RIGHT"}
    for channel in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"):
        filled = nusc.get("sample_data", exported["samples"]["000950"]["data"][channel])
        assert filled["timestamp"] == exported["samples"]["000965"]["timestamp"]
    warned = {w["warning"] for w in run.merged.warnings if w.get("frame") == "000950"}
    assert {w.split(":")[0] for w in warned} == {f"missing image for camera {c}" for c in CAMERAS}
    assert all("uses the image of frame 000965" in w for w in warned)
    assert nusc.get("sample_data", exported["samples"]["000950"]["data"]["LIDAR_TOP"])["is_key_frame"] is True


def test_the_exported_lidar_calibration_is_rz_plus_90_and_points_stay_in_the_lidar_frame(exported):
    from nuscenes.utils.data_classes import LidarPointCloud

    nusc, source = exported["nusc"], exported["source"]
    sd = nusc.get("sample_data", exported["samples"]["000965"]["data"]["LIDAR_TOP"])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    np.testing.assert_allclose(Quaternion(cs["rotation"]).rotation_matrix, RZ90, atol=1e-9)
    np.testing.assert_allclose(cs["translation"], [0, 0, 0], atol=1e-12)
    cloud = LidarPointCloud.from_file(str(Path(nusc.dataroot) / sd["filename"]))
    np.testing.assert_array_equal(cloud.points[:4].T, source.read_points(frame_ref(source, "000965"))[:, :4])


def test_two_clouds_for_one_frame_or_one_time_are_an_input_error(tmp_path):
    scene = copy_scene(tmp_path)
    shutil.copyfile(scene / "lidar" / "000965.pcd", scene / "lidar" / "965.pcd")
    with pytest.raises(InputError, match="same time"):
        SustechSource(scene).frames()
    (scene / "lidar" / "965.pcd").rename(scene / "lidar" / "000965.bin")
    with pytest.raises(InputError, match="two point clouds") as err:
        SustechSource(scene).frames()
    assert err.value.frame == "000965"


def test_sustech_riders_are_two_wheelers_with_a_rider_not_pedestrians(exported):
    """A SUSTechPOINTS "Rider" box holds the person and the cycle: it exports as a ridden motorcycle."""
    nusc = exported["nusc"]
    riders = 0
    for frame_id, _sample in exported["samples"].items():
        matched, _ = _lidar_boxes(exported, frame_id)
        for token, (_box, src) in matched.items():
            if src.obj_type != "Rider":
                continue
            riders += 1
            ann = nusc.get("sample_annotation", token)
            assert ann["category_name"] == "vehicle.motorcycle"
            assert [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]] == ["cycle.with_rider"]
    assert riders > 0


# --- the serial convert command ---------------------------------------------------------------------------

def _lidar_calibration(dataset: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rotation matrix, translation) of LIDAR_TOP's calibrated_sensor in an exported nuScenes dataset."""
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes("v1.0-trainval", str(dataset), verbose=False)
    cs = next(c for c in nusc.calibrated_sensor if nusc.get("sensor", c["sensor_token"])["channel"] == "LIDAR_TOP")
    return Quaternion(cs["rotation"]).rotation_matrix, np.array(cs["translation"])


def _axes_warnings(dataset: Path) -> list[dict]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return [w for w in manifest["warnings"] if "lidar_axes" in w["warning"]]


def test_the_convert_command_passes_the_layout_and_source_settings_to_the_scene(tmp_path):
    from pipeline.cli import main

    assert main(["convert", str(SUSTECH), str(tmp_path / "out"), "--layout", "sustech",
                 "--source-setting", "lidar_axes=x_left_y_back", "--source-setting", "lidar_height=1.9"]) == 0
    dataset = tmp_path / "out" / "sustech-example"
    rotation, translation = _lidar_calibration(dataset)
    np.testing.assert_allclose(rotation, RZ90, atol=1e-9)
    np.testing.assert_allclose(translation, [0, 0, 1.9], atol=1e-12)
    assert _axes_warnings(dataset) == []  # the axes were stated: nothing to warn about


def test_a_scene_read_with_the_default_lidar_axes_says_so_once_and_how_to_change_it(tmp_path):
    from pipeline.cli import main

    assert main(["convert", str(SUSTECH), str(tmp_path / "out")]) == 0
    dataset = tmp_path / "out" / "sustech-example"
    rotation, _ = _lidar_calibration(dataset)
    np.testing.assert_allclose(rotation, np.eye(3), atol=1e-12)
    [warning] = _axes_warnings(dataset)
    assert warning["frame"] is None and "x forward" in warning["warning"]
    assert "--source-setting lidar_axes=x_left_y_back" in warning["warning"]


def test_the_convert_command_refuses_a_bad_source_setting_or_layout(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["convert", str(SUSTECH), str(tmp_path / "out"), "--source-setting", "lidar_axes=sideways"]) == 1
    assert "lidar_axes 'sideways' is not one of" in capsys.readouterr().err
    assert main(["convert", str(SUSTECH), str(tmp_path / "out"), "--layout", "waymo"]) == 1
    assert "unknown layout 'waymo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(SUSTECH), str(tmp_path / "out"), "--source-setting", "lidar_axes"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


# --- SUSTechPOINTS types in the format mappings ------------------------------------------------------------

# The CamelCase types input-formats.md lists for SUSTechPOINTS labels, and what they must become (written out
# here, independently of the YAML files).
DOCUMENTED_TYPES = {  # type: (nuScenes category, KITTI class or None = deliberately left out)
    "Car": ("vehicle.car", "Car"), "Pedestrian": ("human.pedestrian.adult", "Pedestrian"),
    "Van": ("vehicle.car", "Van"), "Bus": ("vehicle.bus.rigid", "Truck"), "Truck": ("vehicle.truck", "Truck"),
    "Rider": ("vehicle.motorcycle", "Cyclist"), "Motor": ("vehicle.motorcycle", "Misc"),
    "Cyclist": ("vehicle.bicycle", "Cyclist"), "Bicycle": ("vehicle.bicycle", "Misc"),
    "Cone": ("movable_object.trafficcone", None), "TrafficBarrier": ("movable_object.barrier", None),
}
NOT_NUSCENES = {"Tram", "FireHydrant", "SaftyTriangle", "DontCare"}  # left out of nuScenes on purpose


def test_every_documented_sustech_type_maps_to_an_official_nuscenes_category_and_a_kitti_class():
    from stages.formats.kitti.mapping import KittiMapping
    from stages.formats.nuscenes.mapping import NuScenesMapping
    from stages.formats.nuscenes.vocabulary import CATEGORIES
    from stages.mappings import load_mapping

    nuscenes = NuScenesMapping.from_dict(load_mapping("nuscenes"), "sustech")
    kitti = KittiMapping.from_dict(load_mapping("kitti"))
    for obj_type, (category, kitti_class) in DOCUMENTED_TYPES.items():
        assert nuscenes.category_of(obj_type) == category and category in CATEGORIES, obj_type
        assert kitti.class_of(obj_type) == (kitti_class, True), obj_type


def test_every_sustech_type_of_one_mapping_is_listed_in_the_other():
    """A type the nuScenes mapping knows is never an unknown type for KITTI (and the reverse), so exporting the
    same scene to either format reports the same labels as exported or left out on purpose."""
    from stages.formats.kitti.mapping import KittiMapping
    from stages.formats.nuscenes.mapping import NuScenesMapping
    from stages.formats.nuscenes.vocabulary import CATEGORIES
    from stages.mappings import load_mapping

    nuscenes = NuScenesMapping.from_dict(load_mapping("nuscenes"), "sustech")
    kitti = KittiMapping.from_dict(load_mapping("kitti"))
    camel_case = lambda names: {n for n in names if n[:1].isupper()}  # noqa: E731 - SUSTech's spelling
    in_nuscenes = camel_case(load_mapping("nuscenes")["categories"])
    in_kitti = camel_case(load_mapping("kitti")["classes"])
    for obj_type in sorted(in_nuscenes | set(DOCUMENTED_TYPES)):
        assert nuscenes.category_of(obj_type) in CATEGORIES, obj_type
        assert kitti.class_of(obj_type)[1], f"{obj_type} is not in configs/mappings/kitti.yaml"
    for obj_type in sorted(in_kitti - NOT_NUSCENES):
        assert nuscenes.category_of(obj_type) in CATEGORIES, f"{obj_type} is not in configs/mappings/nuscenes.yaml"
    assert all(nuscenes.category_of(t) is None for t in NOT_NUSCENES)
