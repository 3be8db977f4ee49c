"""A NextPoints project exported to nuScenes v1.0 loads in the nuScenes devkit and gives back its labels.

The devkit is the reference throughout: ``NuScenes`` loads the tables, ``get_sample_data`` puts each box back
into the lidar frame, ``points_in_box`` recounts points, ``DetectionEval`` scores the ground truth. Source labels
are read here straight from the project's JSON files (quaternions via pyquaternion), not through the exporter.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from nuscenes import NuScenes
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box
from PIL import Image
from pyquaternion import Quaternion

from stages.errors import InputError
from stages.formats.nuscenes import NuScenesFormat
from stages.formats.nuscenes.mapping import NuScenesMapping
from stages.mappings import load_mapping
from stages.pcd import read_points_xyzir
from stages.request import ExportOptions, ExportRequest
from stages.serial import SerialRun, run_serial
from stages.synth import FIRST_TIMESTAMP_NS, FRAME_STEP_NS

VERSION = "v1.0-trainval"
SPLIT = "export"  # the custom split the exporter writes into splits.json
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")
CAMERAS = {"camera-front": "CAM_FRONT", "camera-front-left": "CAM_FRONT_LEFT", "camera-front-right": "CAM_FRONT_RIGHT",
           "camera-back": "CAM_BACK", "camera-back-left": "CAM_BACK_LEFT", "camera-back-right": "CAM_BACK_RIGHT"}
# What the synthetic project's types must become (written out here, independently of the YAML).
EXPECTED_CATEGORY = {"car": "vehicle.car", "van": "vehicle.car", "pickup": "vehicle.truck", "truck": "vehicle.truck",
                     "bus": "vehicle.bus.rigid", "trailer": "vehicle.trailer",
                     "construction_vehicle": "vehicle.construction", "motorcycle": "vehicle.motorcycle",
                     "bicycle": "vehicle.bicycle", "pedestrian": "human.pedestrian.adult",
                     "traffic_cone": "movable_object.trafficcone", "barrier": "movable_object.barrier"}
OFFICIAL_ATTRIBUTES = {"vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider",
                       "cycle.without_rider", "pedestrian.moving", "pedestrian.standing",
                       "pedestrian.sitting_lying_down"}
STEM = [str(FIRST_TIMESTAMP_NS + i * FRAME_STEP_NS) for i in range(40)]  # synth frame ids by index


def export(project: Path, dest: Path, batch_size: int = 50, **options) -> SerialRun:
    request = ExportRequest(export_options=ExportOptions(compress_output=False, **options))
    return run_serial(project, dest, request, batch_size=batch_size)


# -- the source labels, read independently -----------------------------------------------------------------------

def source_boxes(project: Path) -> dict[int, list[dict]]:
    """timestamp_us -> boxes of that frame's label file: centre, (l, w, h), pyquaternion rotation, in the lidar
    frame. Legacy Euler rotations are composed as Rx·Ry·Rz."""
    out = {}
    for label in sorted((project / "label").glob("*.json")):
        boxes = []
        for obj in json.loads(label.read_text()):
            p, s, r = obj["psr"]["position"], obj["psr"]["scale"], obj["psr"]["rotation"]
            if "w" in r:
                q = Quaternion(r["w"], r["x"], r["y"], r["z"])
            else:
                q = (Quaternion(axis=[1, 0, 0], angle=r["x"]) * Quaternion(axis=[0, 1, 0], angle=r["y"])
                     * Quaternion(axis=[0, 0, 1], angle=r["z"]))
            boxes.append({"obj_id": obj["obj_id"], "obj_type": obj["obj_type"], "center": np.array([p["x"], p["y"], p["z"]]),
                          "lwh": np.array([s["x"], s["y"], s["z"]]), "q": q.normalised})
        out[int(label.stem) // 1000] = boxes
    return out


def rotation_angle(a: Quaternion, b: Quaternion) -> float:
    """Angle (rad) of the rotation taking ``a`` to ``b``."""
    return abs((a.inverse * b).normalised.radians) % (2 * np.pi)


def attribute_family(category: str) -> str | None:
    """Which official attribute family applies to a category (nuScenes annotator instructions)."""
    if category in ("vehicle.bicycle", "vehicle.motorcycle"):
        return "cycle"
    if category.startswith("vehicle."):
        return "vehicle"
    if category.startswith("human.pedestrian."):
        return "pedestrian"
    return None


# -- exports shared by the module --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(synth_project, synth_project_rotated, tmp_path_factory) -> dict[str, tuple[Path, Path, SerialRun]]:
    root = tmp_path_factory.mktemp("nuscenes-exports")
    out = {}
    for preset, project in (("default", synth_project), ("rotated_lidar", synth_project_rotated)):
        dest = root / preset
        out[preset] = (project, dest, export(project, dest))
    return out


@pytest.fixture(scope="module", params=["default", "rotated_lidar"])
def exported(request, exports) -> tuple[Path, Path, SerialRun, NuScenes]:
    project, dest, run = exports[request.param]
    return project, dest, run, NuScenes(VERSION, str(dest), verbose=False)


# -- loading ----------------------------------------------------------------------------------------------------

def test_export_loads_in_the_devkit_and_passes_assert_download(exported):
    project, dest, run, nusc = exported
    assert sorted(p.stem for p in (dest / VERSION).glob("*.json")) == sorted([*TABLES, "splits"])
    assert len(nusc.scene) == 1 and nusc.scene[0]["name"] == project.parent.name
    assert len(nusc.sample) == 20
    result = subprocess.run([sys.executable, "-m", "nuscenes.tests.assert_download", "--dataroot", str(dest),
                             "--version", VERSION, "--verbose", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {c["name"] for c in nusc.category} >= set(EXPECTED_CATEGORY.values())
    assert len(nusc.category) == 23 and {a["name"] for a in nusc.attribute} == OFFICIAL_ATTRIBUTES
    assert {s["channel"] for s in nusc.sensor} == {"LIDAR_TOP", *CAMERAS.values()}


def test_every_lidar_file_loads_and_keeps_every_point_in_the_sensor_frame(exported):
    project, dest, run, nusc = exported
    lidar = [sd for sd in nusc.sample_data if sd["channel"] == "LIDAR_TOP"]
    clouds = {int(p.stem) // 1000: p for p in (project / "lidar" / "lidar-fusion").glob("*.pcd")}
    assert len(lidar) == len(clouds) == 20
    for sd in lidar:
        assert sd["filename"].startswith("samples/LIDAR_TOP/") and sd["filename"].endswith(".pcd.bin")
        assert sd["fileformat"] == "pcd" and sd["width"] == 0 and sd["height"] == 0
        cloud = LidarPointCloud.from_file(str(dest / sd["filename"]))
        source = read_points_xyzir(clouds[sd["timestamp"]])
        assert cloud.points.shape == (4, len(source))
        np.testing.assert_array_equal(cloud.points[:3].T, source[:, :3])
        raw = np.fromfile(dest / sd["filename"], dtype=np.float32).reshape(-1, 5)  # x y z intensity ring
        np.testing.assert_array_equal(raw, source)
    assert source[:, 3].std() > 0  # the synthetic clouds carry intensity (and no ring: 0, as written)


def test_every_box_comes_back_in_the_lidar_frame_as_labelled(exported):
    project, dest, run, nusc = exported
    labels = source_boxes(project)
    assert len(labels) == 19  # frame 2 has no label file
    obj_of_instance: dict[str, set[str]] = defaultdict(set)
    checked = 0
    for sample in nusc.sample:
        _, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        source = labels.get(sample["timestamp"], [])
        assert len(boxes) == len(source) == len(sample["anns"])
        centers = np.array([b["center"] for b in source]).reshape(-1, 3)
        for box in boxes:
            match = int(np.argmin(np.linalg.norm(centers - box.center, axis=1)))
            src = source[match]
            np.testing.assert_allclose(box.center, src["center"], atol=1e-3)
            np.testing.assert_allclose(box.wlh, src["lwh"][[1, 0, 2]], atol=1e-3)  # nuScenes size is w, l, h
            assert rotation_angle(box.orientation, src["q"]) < 1e-4
            yaw_diff = box.orientation.yaw_pitch_roll[0] - src["q"].yaw_pitch_roll[0]
            assert abs(np.arctan2(np.sin(yaw_diff), np.cos(yaw_diff))) < 1e-4
            ann = nusc.get("sample_annotation", box.token)
            assert ann["category_name"] == EXPECTED_CATEGORY[src["obj_type"]]
            obj_of_instance[ann["instance_token"]].add(src["obj_id"])
            checked += 1
    assert checked == len(nusc.sample_annotation) == run.merged.annotations > 500
    # an instance is one labelled object, and one object is one instance
    assert all(len(ids) == 1 for ids in obj_of_instance.values())
    assert len({next(iter(ids)) for ids in obj_of_instance.values()}) == len(nusc.instance)


def test_num_lidar_pts_recounted_with_points_in_box(exported):
    project, dest, run, nusc = exported
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        xyz = LidarPointCloud.from_file(path).points[:3]
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert int(points_in_box(box, xyz).sum()) == ann["num_lidar_pts"] > 0
            assert ann["num_radar_pts"] == 0


def _transform(doc: dict) -> tuple[np.ndarray, Quaternion]:
    t, r = doc["transform"]["translation"], doc["transform"]["rotation"]
    return np.array([t["x"], t["y"], t["z"]]), Quaternion(r["w"], r["x"], r["y"], r["z"]).normalised


def test_calibrations_and_ego_poses_are_the_projects_own(exported):
    """Every calibrated_sensor is its channel's calib JSON (sensor→ego; cameras with their fx, fy, cx, cy), and
    every sample_data's ego pose is its frame's ego_pose JSON: with a rotated lidar, a writer that wrote the
    identity would still give the boxes back in the lidar frame, so the values are checked here."""
    project, dest, run, nusc = exported
    channel_of = {"lidar-fusion": "LIDAR_TOP", **CAMERAS}
    for calib_file in sorted((project / "calib").glob("*.json")):
        calib = json.loads(calib_file.read_text())
        translation, rotation = _transform(calib["pose"])
        [sensor] = [s for s in nusc.sensor if s["channel"] == channel_of[calib["channel"]]]
        records = [c for c in nusc.calibrated_sensor if c["sensor_token"] == sensor["token"]]
        assert records, calib["channel"]
        for record in records:
            np.testing.assert_allclose(record["translation"], translation, atol=1e-6)
            assert rotation_angle(Quaternion(record["rotation"]), rotation) < 1e-6, calib["channel"]
            if calib["sensor_type"] == "camera":
                k = calib["camera_config"]["intrinsic"]
                np.testing.assert_allclose(record["camera_intrinsic"],
                                           [[k["fx"], k["skew"], k["cx"]], [0, k["fy"], k["cy"]], [0, 0, 1]], atol=1e-6)
            else:
                assert record["camera_intrinsic"] == []
    if "rotated" in str(project):
        [lidar] = [c for c in nusc.calibrated_sensor if c["camera_intrinsic"] == []]
        assert Quaternion(lidar["rotation"]).degrees > 45  # the preset's lidar is really rotated
    poses = {int(p.stem) // 1000: _transform(json.loads(p.read_text())) for p in (project / "ego_pose").glob("*.json")}
    checked = 0
    for sd in nusc.sample_data:
        if sd["is_key_frame"] and sd["timestamp"] in poses:
            ego = nusc.get("ego_pose", sd["ego_pose_token"])
            translation, rotation = poses[sd["timestamp"]]
            np.testing.assert_allclose(ego["translation"], translation, atol=1e-6)
            assert rotation_angle(Quaternion(ego["rotation"]), rotation) < 1e-6
            checked += 1
    assert checked >= 20


def test_every_camera_sample_data_carries_its_image_and_real_size(exported):
    project, dest, run, nusc = exported
    cameras = [sd for sd in nusc.sample_data if sd["sensor_modality"] == "camera"]
    assert len(cameras) == 6 * 20  # frame 4 misses one image, filled in from the nearest frame (policy nearest)
    for sd in cameras:
        assert sd["fileformat"] == "jpg" and sd["filename"].startswith(f"samples/{sd['channel']}/")
        with Image.open(dest / sd["filename"]) as im:
            assert im.format == "JPEG" and (sd["width"], sd["height"]) == im.size == (640, 360)
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        assert np.asarray(cs["camera_intrinsic"]).shape == (3, 3)


def check_sample_and_sample_data_chains(nusc: NuScenes, run: SerialRun,
                                        every_channel_in_every_sample: bool = True) -> None:
    """The sample chain, the sample_data chains per channel and their links, as nuscenes-rules.md asks."""
    scene = nusc.scene[0]
    # samples: one chain through the scene, in time order
    chain, token = [], scene["first_sample_token"]
    while token:
        chain.append(nusc.get("sample", token))
        token = chain[-1]["next"]
    assert len(chain) == scene["nbr_samples"] == len(nusc.sample) == run.merged.counts["samples"]
    assert chain[-1]["token"] == scene["last_sample_token"] and chain[0]["prev"] == ""
    assert all(b["prev"] == a["token"] and b["timestamp"] > a["timestamp"] for a, b in zip(chain, chain[1:]))
    sample_index = {s["token"]: i for i, s in enumerate(chain)}
    # sample_data: one chain per channel, in time order; one key frame per (sample, channel); one ego pose each,
    # same time; unique filenames <logfile>__<CHANNEL>__<timestamp_us>.<ext>
    logfile = nusc.log[0]["logfile"]
    by_channel = defaultdict(list)
    for sd in nusc.sample_data:
        by_channel[sd["channel"]].append(sd)
        assert nusc.get("ego_pose", sd["ego_pose_token"])["timestamp"] == sd["timestamp"]
        folder = "samples" if sd["is_key_frame"] else "sweeps"
        ext = ".pcd.bin" if sd["channel"] == "LIDAR_TOP" else ".jpg"
        stem = sd["filename"].removeprefix(f"{folder}/{sd['channel']}/{logfile}__{sd['channel']}__")
        assert stem.endswith(ext) and stem.removesuffix(ext).isdigit(), sd["filename"]
    assert len({sd["filename"] for sd in nusc.sample_data}) == len(nusc.sample_data)
    for channel, rows in by_channel.items():
        heads = [sd for sd in rows if sd["prev"] == ""]
        assert len(heads) == 1, channel
        walked, token = [], heads[0]["token"]
        while token:
            walked.append(nusc.get("sample_data", token))
            token = walked[-1]["next"]
        assert len(walked) == len(rows), channel
        assert all(b["prev"] == a["token"] and b["timestamp"] >= a["timestamp"] for a, b in zip(walked, walked[1:]))
        # the samples a channel's chain hangs on come in the samples' order
        owners = [sample_index[sd["sample_token"]] for sd in walked]
        assert owners == sorted(owners), channel
    assert len({sd["ego_pose_token"] for sd in nusc.sample_data}) == len(nusc.ego_pose) == len(nusc.sample_data)
    per_sample_channel = Counter((sd["sample_token"], sd["channel"]) for sd in nusc.sample_data if sd["is_key_frame"])
    assert set(per_sample_channel.values()) == {1}
    # every sample has a key frame of every channel that has any sample_data in the scene
    assert all(set(s["data"]) == set(by_channel) for s in nusc.sample) == every_channel_in_every_sample


def test_chains_links_and_counts_are_consistent(exported):
    project, dest, run, nusc = exported
    check_sample_and_sample_data_chains(nusc, run)
    filled = []
    for sd in nusc.sample_data:
        assert sd["is_key_frame"] is True
        if nusc.get("sample", sd["sample_token"])["timestamp"] != sd["timestamp"]:
            filled.append(sd)  # a camera filled in from the nearest frame (frame 4's CAM_BACK_LEFT)
    assert [(sd["channel"], nusc.get("sample", sd["sample_token"])["timestamp"]) for sd in filled] == [
        ("CAM_BACK_LEFT", int(STEM[4]) // 1000)]
    # annotations: one chain per instance
    for inst in nusc.instance:
        walked, token = [], inst["first_annotation_token"]
        while token:
            walked.append(nusc.get("sample_annotation", token))
            token = walked[-1]["next"]
        assert len(walked) == inst["nbr_annotations"] and walked[-1]["token"] == inst["last_annotation_token"]
        assert all(a["instance_token"] == inst["token"] for a in walked)
        assert all(b["prev"] == a["token"] for a, b in zip(walked, walked[1:]))
    assert sum(i["nbr_annotations"] for i in nusc.instance) == len(nusc.sample_annotation)
    # at most one official attribute per annotation, of the category's family
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    for ann in nusc.sample_annotation:
        names = [attr_name[t] for t in ann["attribute_tokens"]]
        family = attribute_family(ann["category_name"])
        assert [n.split(".")[0] for n in names] == ([family] if family else [])
        assert ann["visibility_token"] == "4"
    # tokens: 32 hex everywhere
    for table in TABLES:
        if table != "visibility":
            assert all(len(r["token"]) == 32 and int(r["token"], 16) >= 0 for r in getattr(nusc, table))
    counts = run.merged.counts
    assert counts["annotations"] == len(nusc.sample_annotation) and counts["instances"] == len(nusc.instance)
    assert counts["sample_data"] == len(nusc.sample_data) and counts["frames"] == 20
    assert counts["dropped_unknown_types"] == 0 and counts["missing_images"] == 1 and counts["filled_images"] == 1


def test_static_vehicles_are_parked_moving_traffic_moving_and_walkers_moving(exports):
    project, dest, run = exports["default"]
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    static = {(int(f.stem) // 1000, o["obj_id"]) for f in (project / "label").glob("*.json")
              for o in json.loads(f.read_text()) if o.get("obj_attr") == "static"}
    labels = source_boxes(project)
    seen = Counter()
    for sample in nusc.sample:
        _, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        source = labels.get(sample["timestamp"], [])
        centers = np.array([b["center"] for b in source]).reshape(-1, 3)
        for box in boxes:
            src = source[int(np.argmin(np.linalg.norm(centers - box.center, axis=1)))]
            ann = nusc.get("sample_annotation", box.token)
            names = [attr_name[t] for t in ann["attribute_tokens"]]
            family = attribute_family(ann["category_name"])
            # synth: static rows are parked; traffic keeps pace with the ego (~8 m/s); people walk at ~1.2 m/s;
            # bicycles ride without riders
            expected = {"vehicle": "vehicle.parked" if (sample["timestamp"], src["obj_id"]) in static
                        else "vehicle.moving", "pedestrian": "pedestrian.moving",
                        "cycle": "cycle.without_rider", None: None}[family]
            assert names == ([expected] if expected else []), (src, names)
            seen.update(names)
    assert seen["vehicle.parked"] and seen["vehicle.moving"] and seen["pedestrian.moving"]
    assert seen["cycle.without_rider"]


# -- the detection eval -------------------------------------------------------------------------------------------

def test_detection_eval_of_the_ground_truth_gives_ap_1(exports, tmp_path):
    project, dest, run = exports["default"]
    assert json.loads((dest / VERSION / "splits.json").read_text()) == {SPLIT: [project.parent.name]}
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    results = {}
    for sample in nusc.sample:
        boxes = []
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            name = category_to_detection_name(ann["category_name"])
            if name is None:
                continue
            boxes.append({"sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"],
                          "rotation": ann["rotation"], "velocity": list(nusc.box_velocity(token)[:2]),
                          "detection_name": name, "detection_score": 1.0,
                          "attribute_name": attr_name[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else ""})
        results[sample["token"]] = boxes
    result_path = tmp_path / "results.json"
    result_path.write_text(json.dumps({"meta": {"use_camera": False, "use_lidar": True, "use_radar": False,
                                                "use_map": False, "use_external": False}, "results": results}))
    evaluation = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(result_path), eval_set=SPLIT,
                               output_dir=str(tmp_path / "eval"), verbose=False)
    metrics, _ = evaluation.evaluate()
    present = {b.detection_name for b in evaluation.gt_boxes.all}
    assert present >= {"car", "truck", "bus", "pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier"}
    for name in present:
        assert metrics.mean_dist_aps[name] == pytest.approx(1.0), name


# -- determinism --------------------------------------------------------------------------------------------------

def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_exporting_twice_gives_byte_identical_tables_and_files(exports, tmp_path):
    project, dest, _ = exports["default"]
    export(project, tmp_path / "again", batch_size=7)  # other batches, same dataset
    first, second = _digests(dest), _digests(tmp_path / "again")
    assert [f"{VERSION}/{t}.json" for t in TABLES] == [k for k in first if k.startswith(VERSION) and "splits" not in k]
    assert first == second


# -- real-data quirks and malformed input -------------------------------------------------------------------------

def test_missing_label_gives_an_empty_sample_and_missing_image_is_filled_from_the_nearest_frame(exports):
    """Default ``missing_image_policy: nearest``: as nuScenes pairs each sample with the closest image of every
    camera, frame 4's CAM_BACK_LEFT key frame is the image of the nearest frame that has one (frames 3 and 5 are
    both 100 ms away: the earlier one), with that image's own timestamp and ego pose."""
    project, dest, run = exports["default"]
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    by_time = {s["timestamp"]: s for s in nusc.sample}
    no_label = by_time[int(STEM[2]) // 1000]
    assert not (project / "label" / f"{STEM[2]}.json").exists() and no_label["anns"] == []
    missing = by_time[int(STEM[4]) // 1000]
    assert not (project / "camera" / "camera-back-left" / f"{STEM[4]}.jpg").exists()
    assert all(set(s["data"]) == {"LIDAR_TOP", *CAMERAS.values()} for s in nusc.sample)

    filled = nusc.get("sample_data", missing["data"]["CAM_BACK_LEFT"])
    neighbour = nusc.get("sample_data", by_time[int(STEM[3]) // 1000]["data"]["CAM_BACK_LEFT"])
    assert filled["is_key_frame"] is True and filled["sample_token"] == missing["token"]
    assert filled["timestamp"] == neighbour["timestamp"] == int(STEM[3]) // 1000
    # its own file (named after the sample's time, so filenames stay unique), the neighbour's bytes
    logfile = project.parent.name
    assert filled["filename"] == f"samples/CAM_BACK_LEFT/{logfile}__CAM_BACK_LEFT__{int(STEM[4]) // 1000}.jpg"
    source = (project / "camera" / "camera-back-left" / f"{STEM[3]}.jpg").read_bytes()
    assert (dest / filled["filename"]).read_bytes() == source == (dest / neighbour["filename"]).read_bytes()
    assert (filled["width"], filled["height"]) == (neighbour["width"], neighbour["height"])
    # its own ego_pose row, with the neighbour's time and pose
    pose, neighbour_pose = (nusc.get("ego_pose", sd["ego_pose_token"]) for sd in (filled, neighbour))
    assert pose["token"] != neighbour_pose["token"] and pose["timestamp"] == neighbour_pose["timestamp"]
    assert (pose["translation"], pose["rotation"]) == (neighbour_pose["translation"], neighbour_pose["rotation"])
    lidar_pose = nusc.get("ego_pose", nusc.get("sample_data", missing["data"]["LIDAR_TOP"])["ego_pose_token"])
    assert pose["translation"] != lidar_pose["translation"]  # the ego moved between frames 3 and 4
    # the channel's chain: frame 3's image, then the copy for sample 4, then frame 5's
    assert filled["prev"] == neighbour["token"] and neighbour["next"] == filled["token"]
    assert filled["next"] == by_time[int(STEM[5]) // 1000]["data"]["CAM_BACK_LEFT"]
    # the warning names frame and camera, and the frame whose image was used
    assert {"frame": STEM[4], "warning": "missing image for camera camera-back-left: CAM_BACK_LEFT of this sample "
            f"uses the image of frame {STEM[3]} (-100.0 ms), the nearest in time"} in run.merged.warnings
    assert run.merged.counts["missing_images"] == run.merged.counts["filled_images"] == 1


@pytest.fixture(scope="module")
def skip_policy_export(synth_project, tmp_path_factory) -> tuple[Path, Path, SerialRun]:
    mapping = {**load_mapping("nuscenes"), "missing_image_policy": "skip"}
    dest = tmp_path_factory.mktemp("nuscenes-skip") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("stages.discover.load_mapping", lambda name: mapping)
        run = export(synth_project, dest)
    return synth_project, dest, run


def test_missing_image_policy_skip_drops_that_camera_from_the_sample_with_a_warning(skip_policy_export):
    project, dest, run = skip_policy_export
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    check_sample_and_sample_data_chains(nusc, run, every_channel_in_every_sample=False)
    by_time = {s["timestamp"]: s for s in nusc.sample}
    missing = by_time[int(STEM[4]) // 1000]
    assert "CAM_BACK_LEFT" not in missing["data"] and len(missing["data"]) == 6
    assert all(len(s["data"]) == 7 for s in nusc.sample if s is not missing)
    assert len([sd for sd in nusc.sample_data if sd["channel"] == "CAM_BACK_LEFT"]) == 19
    assert {"frame": STEM[4], "warning": "missing image for camera camera-back-left"} in run.merged.warnings
    assert run.merged.counts["missing_images"] == 1 and "filled_images" not in run.merged.counts
    assert all(nusc.get("sample", sd["sample_token"])["timestamp"] == sd["timestamp"] for sd in nusc.sample_data)


def test_missing_image_policy_is_validated():
    base = load_mapping("nuscenes")
    assert NuScenesMapping.from_dict(base).missing_image_policy == "nearest"
    assert NuScenesMapping.from_dict({k: v for k, v in base.items()
                                      if k != "missing_image_policy"}).missing_image_policy == "nearest"
    assert NuScenesMapping.from_dict({**base, "missing_image_policy": "skip"}).missing_image_policy == "skip"
    with pytest.raises(ValueError, match="missing_image_policy must be one of"):
        NuScenesMapping.from_dict({**base, "missing_image_policy": "interpolate"})


def test_a_malformed_label_fails_the_export_naming_frame_and_file(small_project, tmp_path):
    label = small_project / "label" / f"{STEM[3]}.json"
    label.write_text('[{"obj_id": "7", "obj_type": "car", "psr": {"position": {"x": 1, "y": 2, "z": 0}}}]')
    with pytest.raises(InputError) as err:
        export(small_project, tmp_path / "out")
    assert err.value.frame == STEM[3] and err.value.path == str(label)
    assert "object 0 (obj_id '7') psr.scale: missing" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_types_are_skipped_and_counted_or_fail_by_policy(small_project, tmp_path, monkeypatch):
    label = small_project / "label" / f"{STEM[0]}.json"
    objects = json.loads(label.read_text())
    objects[0]["obj_type"], objects[1]["obj_type"] = "hovercraft", "hovercraft"
    label.write_text(json.dumps(objects))
    run = export(small_project, tmp_path / "skip")
    assert run.merged.counts["dropped_unknown_types"] == 2
    assert run.merged.counts["dropped_unknown_type.hovercraft"] == 2
    nusc = NuScenes(VERSION, str(tmp_path / "skip"), verbose=False)
    assert len(nusc.sample[0]["anns"]) == len(objects) - 2

    strict = {**load_mapping("nuscenes"), "unknown_type_policy": "error"}
    monkeypatch.setattr("stages.discover.load_mapping", lambda name: strict)
    with pytest.raises(InputError) as err:
        export(small_project, tmp_path / "error")
    assert err.value.frame == STEM[0] and err.value.path == str(label) and "'hovercraft'" in err.value.problem


def test_every_nextpoints_type_maps_to_an_official_category():
    mapping = NuScenesMapping.from_dict(load_mapping("nuscenes"))
    types = ["bicycle", "motorcycle", "tricycle", "cycle_group", "rider", "cycle", "car", "van", "pickup", "cargo",
             "trailer", "truck", "micro_bus", "mini_bus", "bus", "construction_vehicle", "pedestrian", "animal",
             "barrier", "traffic_cone", "stone", "chair", "trash_can", "Unknown"]
    official = {"animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
                "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
                "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
                "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack",
                "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
                "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer",
                "vehicle.truck"}
    assert all(mapping.category_of(t) in official for t in types)
    assert mapping.category_of("CAR") == "vehicle.car" and mapping.category_of("hovercraft") is None


def test_a_cycle_with_a_rider_next_to_it_is_with_rider(small_project, tmp_path):
    label = small_project / "label" / f"{STEM[0]}.json"
    objects = json.loads(label.read_text())
    car = next(o for o in objects if o["obj_type"] == "car")
    bike = json.loads(json.dumps(car)) | {"obj_id": "bike-1", "obj_type": "bicycle", "obj_attr": None}
    bike["psr"]["scale"] = {"x": 1.7, "y": 0.6, "z": 1.2}
    rider = json.loads(json.dumps(bike)) | {"obj_id": "rider-1", "obj_type": "rider"}
    rider["psr"]["position"] = dict(bike["psr"]["position"], z=bike["psr"]["position"]["z"] + 0.6)
    rider["psr"]["scale"] = {"x": 0.6, "y": 0.5, "z": 1.0}
    objects = [o for o in objects if o is not car] + [bike, rider]
    label.write_text(json.dumps(objects))
    dest = tmp_path / "out"
    export(small_project, dest)
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    anns = [nusc.get("sample_annotation", t) for t in nusc.sample[0]["anns"]]
    bikes = [a for a in anns if a["category_name"] == "vehicle.bicycle"]
    with_rider = [a for a in bikes if [attr_name[t] for t in a["attribute_tokens"]] == ["cycle.with_rider"]]
    assert len(with_rider) == 1
    assert any(a["category_name"] == "human.pedestrian.adult" and
               [attr_name[t] for t in a["attribute_tokens"]][0].startswith("pedestrian.") for a in anns)


def test_png_images_become_jpegs_with_their_real_size(small_project, tmp_path):
    jpg = small_project / "camera" / "camera-front" / f"{STEM[0]}.jpg"
    with Image.open(jpg) as im:
        im.resize((320, 200)).save(jpg.with_suffix(".png"))
    jpg.unlink()
    dest = tmp_path / "out"
    export(small_project, dest)
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    sd = nusc.get("sample_data", nusc.sample[0]["data"]["CAM_FRONT"])
    with Image.open(dest / sd["filename"]) as im:
        assert im.format == "JPEG" and im.size == (sd["width"], sd["height"]) == (320, 200)


def test_sweeps_hang_on_the_following_sample_and_floats_are_rounded(small_project, tmp_path):
    dest = tmp_path / "out"
    run = export(small_project, dest, include_sweeps=True, key_frame_interval=2, coordinate_precision=3)
    nusc = NuScenes(VERSION, str(dest), verbose=False)
    samples = sorted(nusc.sample, key=lambda s: s["timestamp"])
    assert len(samples) == 3
    # frame 4 (a sample) misses its camera-front-left image: filled from frame 3, a sweep (nearest, earlier on a tie)
    check_sample_and_sample_data_chains(nusc, run)
    filled = nusc.get("sample_data", samples[2]["data"]["CAM_FRONT_LEFT"])
    assert filled["timestamp"] == int(STEM[3]) // 1000 and filled["filename"].startswith("samples/")
    sweeps = [sd for sd in nusc.sample_data if not sd["is_key_frame"]]
    assert len(sweeps) == 3 * 3  # frames 1, 3, 5: lidar + 2 cameras
    assert run.merged.counts["sweeps"] == len(sweeps)
    assert run.merged.counts["key_frame_sample_data"] == len(nusc.sample_data) - len(sweeps) == 3 * 3
    assert (run.merged.frames, run.merged.counts["samples"], run.merged.counts["sample_data"]) == (6, 3, 18)
    for sd in sweeps:
        assert sd["filename"].startswith(f"sweeps/{sd['channel']}/")
        following = [s for s in samples if s["timestamp"] > sd["timestamp"]]
        assert sd["sample_token"] == (following[0] if following else samples[-1])["token"]
    result = subprocess.run([sys.executable, "-m", "nuscenes.tests.assert_download", "--dataroot", str(dest),
                             "--version", VERSION, "--verbose", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for ann in nusc.sample_annotation:
        assert all(round(v, 3) == v for v in ann["translation"] + ann["size"])


def test_lidar_coordinate_system_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="coordinate_system 'lidar' has no meaning here"):
        NuScenesFormat.check_request(ExportRequest(coordinate_system="lidar"))


def test_missing_ego_poses_are_interpolated_or_copied_with_a_warning(small_project, tmp_path):
    """Frame 2's pose file gone: its ego pose is halfway (in time) between frames 1 and 3, translation linear and
    rotation slerped; the last frame's gone: it gets frame 4's. Each is a warning naming the frame."""
    stems = sorted(p.stem for p in (small_project / "ego_pose").glob("*.json"))
    assert len(stems) == 6
    poses = {stem: _transform(json.loads((small_project / "ego_pose" / f"{stem}.json").read_text())) for stem in stems}
    (small_project / "ego_pose" / f"{stems[2]}.json").unlink()
    (small_project / "ego_pose" / f"{stems[5]}.json").unlink()
    run = export(small_project, tmp_path / "out")
    nusc = NuScenes(VERSION, str(tmp_path / "out"), verbose=False)
    lidar_pose = {}
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        ego = nusc.get("ego_pose", sd["ego_pose_token"])
        lidar_pose[sample["timestamp"]] = (np.array(ego["translation"]), Quaternion(ego["rotation"]))
    by_stem = {stem: lidar_pose[int(stem) // 1000] for stem in stems}
    (t1, q1), (t3, q3) = poses[stems[1]], poses[stems[3]]
    assert rotation_angle(q1, q3) > 1e-3 or np.linalg.norm(t3 - t1) > 0.5  # the ego moves between them
    np.testing.assert_allclose(by_stem[stems[2]][0], (t1 + t3) / 2, atol=1e-6)
    assert rotation_angle(by_stem[stems[2]][1], Quaternion.slerp(q1, q3, 0.5)) < 1e-6
    np.testing.assert_allclose(by_stem[stems[5]][0], poses[stems[4]][0], atol=1e-6)
    assert rotation_angle(by_stem[stems[5]][1], poses[stems[4]][1]) < 1e-6
    for stem in (stems[0], stems[1], stems[3], stems[4]):  # the others are their own
        np.testing.assert_allclose(by_stem[stem][0], poses[stem][0], atol=1e-6)
    warned = {w["frame"]: w["warning"] for w in run.merged.warnings if "ego pose" in w["warning"]}
    assert warned == {stems[2]: f"missing ego pose: interpolated between frames {stems[1]} and {stems[3]}",
                      stems[5]: f"missing ego pose: copied from frame {stems[4]}"}


def test_a_project_without_ego_poses_exports_in_the_ego_frame_with_a_warning(small_project, tmp_path):
    for pose in (small_project / "ego_pose").glob("*.json"):
        pose.unlink()
    run = export(small_project, tmp_path / "out")
    nusc = NuScenes(VERSION, str(tmp_path / "out"), verbose=False)
    assert len(nusc.sample) == 6
    assert all(ego["translation"] == [0, 0, 0] and ego["rotation"] == [1, 0, 0, 0] for ego in nusc.ego_pose)
    assert [w["warning"] for w in run.merged.warnings if "ego pose" in w["warning"]] == \
        ["no ego poses in the project: identity used for every frame"]


def test_a_vehicle_below_the_moving_speed_is_stopped_and_one_above_is_moving(small_project, tmp_path):
    """Without obj_attr, a vehicle's attribute follows its global horizontal speed against the mapping's
    moving_speed_mps (0.3 m/s): 0 and 0.2 m/s → vehicle.stopped, 0.5 m/s → vehicle.moving. No ego poses, so
    the lidar frame is the global frame and the speeds are set in the labels directly."""
    for pose in (small_project / "ego_pose").glob("*.json"):
        pose.unlink()
    labels = sorted((small_project / "label").glob("*.json"))
    frames = {int(p.stem): json.loads(p.read_text()) for p in labels}
    t0 = min(frames)
    cars = set.intersection(*({o["obj_id"] for o in objs if o["obj_type"] == "car"} for objs in frames.values()))
    assert len(cars) >= 3, cars
    speed_of = dict(zip(sorted(cars)[:3], (0.0, 0.2, 0.5)))
    for stem, objs in frames.items():
        t = (stem - t0) * 1e-9
        for obj in objs:
            if obj["obj_id"] in speed_of:
                obj["obj_attr"] = None
                obj["psr"]["position"]["x"] = 10.0 * list(speed_of).index(obj["obj_id"]) + speed_of[obj["obj_id"]] * t
                obj["psr"]["position"]["y"] = 40.0
        (small_project / "label" / f"{stem}.json").write_text(json.dumps(objs))
    export(small_project, tmp_path / "out")
    nusc = NuScenes(VERSION, str(tmp_path / "out"), verbose=False)
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    seen = defaultdict(set)
    for inst in nusc.instance:
        anns = [a for a in nusc.sample_annotation if a["instance_token"] == inst["token"]]
        ys = {round(a["translation"][1], 3) for a in anns}
        if ys == {40.0}:  # one of the three cars
            speed = speed_of[sorted(speed_of)[round(anns[0]["translation"][0] / 10.0)]]
            seen[speed] |= {attr_name[t] for a in anns for t in a["attribute_tokens"]}
    assert dict(seen) == {0.0: {"vehicle.stopped"}, 0.2: {"vehicle.stopped"}, 0.5: {"vehicle.moving"}}


def test_the_version_folder_is_the_requests(small_project, tmp_path):
    request = ExportRequest(version="v1.0-mini", export_options=ExportOptions(compress_output=False))
    run_serial(small_project, tmp_path / "out", request)
    assert not (tmp_path / "out" / VERSION).exists()
    nusc = NuScenes("v1.0-mini", str(tmp_path / "out"), verbose=False)
    assert len(nusc.sample) == 6
    result = subprocess.run([sys.executable, "-m", "nuscenes.tests.assert_download", "--dataroot",
                             str(tmp_path / "out"), "--version", "v1.0-mini", "--verbose", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
