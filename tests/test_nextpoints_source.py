"""The NextPoints source reads a project's layout, calibration and labels, and names the frame and the file of
every malformed label."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyquaternion import Quaternion

from stages.errors import InputError
from stages.sources import open_project
from stages.sources.nextpoints import NextPointsSource
from stages.synth import FIRST_TIMESTAMP_NS, FRAME_STEP_NS

STEM = [str(FIRST_TIMESTAMP_NS + i * FRAME_STEP_NS) for i in range(10)]  # synth frame ids by index
SUSTECH_EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sustech-example"


def rotation_angle(a: Quaternion, b: Quaternion) -> float:
    """Angle (rad) of the rotation taking ``a`` to ``b``."""
    return abs((a.inverse * b).normalised.radians)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"objs": []}', "must hold a JSON list"),
    ('[{"obj_id": "1", "obj_type": "car"}]', "psr: missing"),
    ('[{"obj_id": "1", "obj_type": "car", "psr": {"scale": {"x": 1, "y": 1, "z": 1}, '
     '"rotation": {"x": 0, "y": 0, "z": 0, "w": 1}}}]', "psr.position: missing"),
    ('[{"obj_id": "1", "obj_type": "car", "psr": {"position": {"x": 0, "y": 0, "z": 0}, '
     '"rotation": {"x": 0, "y": 0, "z": 0, "w": 1}}}]', "psr.scale: missing"),
    ('[{"obj_id": "1", "obj_type": "car", "psr": {"position": {"x": "3.5", "y": 0, "z": 0}, '
     '"scale": {"x": 1, "y": 1, "z": 1}, "rotation": {"x": 0, "y": 0, "z": 0, "w": 1}}}]',
     "psr.position.x: must be a number"),
    ('[{"obj_id": "1", "obj_type": "car", "psr": {"position": {"x": 0, "y": 0, "z": 0}, '
     '"scale": {"x": 4, "y": 0, "z": 1.5}, "rotation": {"x": 0, "y": 0, "z": 0, "w": 1}}}]',
     "psr.scale.y: must be positive"),
    ('[{"obj_id": "1", "obj_type": "car", "psr": {"position": {"x": 0, "y": 0, "z": 0}, '
     '"scale": {"x": 4, "y": 2, "z": -1}, "rotation": {"x": 0, "y": 0, "z": 0, "w": 1}}}]',
     "psr.scale.z: must be positive"),
])
def test_a_malformed_label_is_an_input_error_naming_frame_and_file(small_project, content, problem):
    label = small_project / "label" / f"{STEM[1]}.json"
    label.write_text(content)
    source = open_project(small_project)
    frame = source.frames()[1]
    with pytest.raises(InputError) as err:
        source.read_labels(frame)
    assert err.value.frame == STEM[1] and err.value.path == str(label) and problem in err.value.problem
    assert STEM[1] in str(err.value) and str(label) in str(err.value)


def test_nextpoints_layout_detection_paths_and_settings(small_project):
    assert NextPointsSource.detect(small_project) and NextPointsSource.detect(small_project.parent)
    assert not NextPointsSource.detect(SUSTECH_EXAMPLE)
    for path in (small_project, small_project.parent):
        source = open_project(path)
        assert isinstance(source, NextPointsSource) and source.project_name == "small"
        assert source.main_lidar == "lidar-fusion" and len(source.frames()) == 6
    with pytest.raises(ValueError, match="unknown nextpoints source settings"):
        NextPointsSource(small_project, {"lidar_axis": "x-left"})
    with pytest.raises(InputError, match="main_lidar 'lidar-top'"):
        NextPointsSource(small_project, {"main_lidar": "lidar-top"}).main_lidar


def test_legacy_euler_labels_and_obj_attr_are_read(small_project):
    source = open_project(small_project)
    frames = source.frames()
    euler = source.read_labels(frames[3])  # synth writes frame 3 with Euler angles
    raw = json.loads(Path(frames[3].label).read_text())
    assert "w" not in raw[0]["psr"]["rotation"] and len(euler) == len(raw)
    for box, obj in zip(euler, raw):
        r = obj["psr"]["rotation"]
        q = (Quaternion(axis=[1, 0, 0], angle=r["x"]) * Quaternion(axis=[0, 1, 0], angle=r["y"])
             * Quaternion(axis=[0, 0, 1], angle=r["z"]))
        assert rotation_angle(Quaternion(box.rotation), q) < 1e-9
    label = Path(frames[0].label)
    objects = json.loads(label.read_text())
    objects[0].update(obj_attr="static, door open", num_pts=12, score=0.75)
    label.write_text(json.dumps(objects))
    box = source.read_labels(frames[0])[0]
    assert box.attributes == ["static", "door open"] and box.num_pts == 12 and box.score == 0.75


def test_calibration_is_sensor_to_ego_with_camera_intrinsics(synth_project_rotated):
    source = open_project(synth_project_rotated)
    calib = source.calibration()
    raw = json.loads((synth_project_rotated / "calib" / "lidar-fusion.json").read_text())
    t, r = raw["pose"]["transform"]["translation"], raw["pose"]["transform"]["rotation"]
    lidar = calib["lidar-fusion"]
    assert lidar.sensor_type == "lidar" and list(lidar.pose.translation) == [t["x"], t["y"], t["z"]]
    assert rotation_angle(Quaternion(lidar.pose.rotation), Quaternion(r["w"], r["x"], r["y"], r["z"])) < 1e-9
    cams = {ch: c for ch, c in calib.items() if c.sensor_type == "camera"}
    assert len(cams) == 6
    for ch, cam in cams.items():
        config = json.loads((synth_project_rotated / "calib" / f"{ch}.json").read_text())["camera_config"]
        i = config["intrinsic"]
        assert (cam.width, cam.height) == (config["width"], config["height"])
        assert cam.intrinsic.tolist() == [[i["fx"], i["skew"], i["cx"]], [0, i["fy"], i["cy"]], [0, 0, 1]]


def test_frames_are_sorted_numerically_with_gaps_as_none(tmp_path, small_project):
    lidar = small_project / "lidar" / "lidar-fusion"
    # a shorter stem sorts first numerically but last as text
    (lidar / f"{STEM[0]}.pcd").rename(lidar / "999.pcd")
    (small_project / "label" / f"{STEM[5]}.json").unlink()
    (small_project / "ego_pose" / f"{STEM[5]}.json").unlink()
    frames = open_project(small_project).frames()
    assert [f.frame_id for f in frames] == ["999", *STEM[1:6]]
    assert frames[0].timestamp_us == 0 and frames[1].timestamp_us == int(STEM[1]) // 1000
    assert frames[-1].label is None and frames[-1].ego_pose is None
    assert open_project(small_project).read_ego_pose(frames[-1]) is None
    assert open_project(small_project).read_labels(frames[-1]) == []


def test_an_unreadable_point_cloud_names_the_frame_and_file(small_project):
    source = open_project(small_project)
    frame = source.frames()[2]
    Path(frame.lidar["lidar-fusion"]).write_bytes(b"# .PCD v0.7\nFIELDS x y z\ngarbage")
    with pytest.raises(InputError) as err:
        source.read_points(frame)
    assert err.value.frame == STEM[2] and err.value.path == frame.lidar["lidar-fusion"]
