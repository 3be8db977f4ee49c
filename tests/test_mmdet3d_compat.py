"""mmdetection3d's nuScenes converter reads every sample of an export without a KeyError.

mmdetection3d cannot be installed here (it needs torch and mmcv), so this replays the access pattern of its
``tools/dataset_converters/nuscenes_converter.py`` with the devkit: ``get_available_scenes`` (the first sample's
LIDAR_TOP file must exist), then ``_fill_trainval_infos`` for every sample: ``sample['data']`` of LIDAR_TOP and
of all six cameras, ``get_sample_data`` / ``get_sample_data_path`` of each, their ``calibrated_sensor`` and
``ego_pose`` (``obtain_sensor2top``), the lidar sweeps walked through ``sd_rec['prev']``, ``box_velocity`` per
annotation and ``num_lidar_pts + num_radar_pts > 0`` as ``valid_flag``; plus ``get_2d_boxes`` (its 2D/mono3D
export), which asserts each camera sample_data is a key frame and projects the sample's boxes into it.

The synthetic project's frame 4 misses its camera-back-left image: with the default ``missing_image_policy:
nearest`` every sample still has all six cameras.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nuscenes import NuScenes
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion

from stages.request import ExportOptions, ExportRequest
from stages.serial import run_serial

VERSION = "v1.0-trainval"  # mmdetection3d accepts v1.0-trainval, v1.0-test, v1.0-mini only
CAMERA_TYPES = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
MAX_SWEEPS = 10
# mmdet3d's NuScenesDataset.NameMapping (category name -> detection class)
NAME_MAPPING = {
    "movable_object.barrier": "barrier", "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus", "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone", "vehicle.trailer": "trailer", "vehicle.truck": "truck"}


@pytest.fixture(scope="module", params=["key_frames", "sweeps"])
def mmdet3d_export(request, synth_project, tmp_path_factory) -> Path:
    """All 20 frames samples, or every 2nd frame a sample and the others sweeps (then frame 4's
    CAM_BACK_LEFT is filled from frame 3, a sweep)."""
    options = {"include_sweeps": True, "key_frame_interval": 2} if request.param == "sweeps" else {}
    dest = tmp_path_factory.mktemp(f"mmdet3d-{request.param}") / "out"
    run_serial(synth_project, dest, ExportRequest(export_options=ExportOptions(compress_output=False, **options)))
    return dest


def obtain_sensor2top(nusc: NuScenes, sensor_token: str, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, sensor_type: str):
    """mmdetection3d's ``obtain_sensor2top``: a sensor's sample_data → its transform into the key-frame lidar."""
    sd_rec = nusc.get("sample_data", sensor_token)
    cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    data_path = str(nusc.get_sample_data_path(sd_rec["token"]))
    sweep = {"data_path": data_path, "type": sensor_type, "sample_data_token": sd_rec["token"],
             "sensor2ego_translation": cs_record["translation"], "sensor2ego_rotation": cs_record["rotation"],
             "ego2global_translation": pose_record["translation"], "ego2global_rotation": pose_record["rotation"],
             "timestamp": sd_rec["timestamp"]}
    l2e_r_s_mat = Quaternion(sweep["sensor2ego_rotation"]).rotation_matrix
    e2g_r_s_mat = Quaternion(sweep["ego2global_rotation"]).rotation_matrix
    R = (l2e_r_s_mat.T @ e2g_r_s_mat.T) @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)
    T = (np.array(sweep["sensor2ego_translation"]) @ e2g_r_s_mat.T + np.array(sweep["ego2global_translation"]))
    T -= (np.array(e2g_t) @ np.linalg.inv(e2g_r_mat).T + np.array(l2e_t) @ np.linalg.inv(l2e_r_mat).T)
    sweep["sensor2lidar_rotation"] = R.T
    sweep["sensor2lidar_translation"] = T
    return sweep


def get_available_scenes(nusc: NuScenes) -> list[dict]:
    available = []
    for scene in nusc.scene:
        sample_rec = nusc.get("sample", scene["first_sample_token"])
        sd_rec = nusc.get("sample_data", sample_rec["data"]["LIDAR_TOP"])
        lidar_path, _, _ = nusc.get_sample_data(sd_rec["token"])
        if Path(lidar_path).is_file():
            available.append(scene)
    return available


def get_2d_boxes(nusc: NuScenes, sample_data_token: str) -> int:
    """The core of mmdetection3d's ``get_2d_boxes``: the camera key frame's boxes projected into its image."""
    sd_rec = nusc.get("sample_data", sample_data_token)
    assert sd_rec["sensor_modality"] == "camera", "Error: get_2d_boxes only works for camera sample_data!"
    if not sd_rec["is_key_frame"]:
        raise ValueError("The 2D re-projections are available only for keyframes.")
    s_rec = nusc.get("sample", sd_rec["sample_token"])
    cs_rec = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_rec = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    camera_intrinsic = np.array(cs_rec["camera_intrinsic"])
    in_view = 0
    for token in s_rec["anns"]:
        ann_rec = nusc.get("sample_annotation", token)
        assert ann_rec["visibility_token"] in ["", "1", "2", "3", "4"]
        box = nusc.get_box(ann_rec["token"])
        box.translate(-np.array(pose_rec["translation"]))
        box.rotate(Quaternion(pose_rec["rotation"]).inverse)
        box.translate(-np.array(cs_rec["translation"]))
        box.rotate(Quaternion(cs_rec["rotation"]).inverse)
        corners_3d = box.corners()
        in_front = np.argwhere(corners_3d[2, :] > 0).flatten()
        corners_3d = corners_3d[:, in_front]
        if corners_3d.shape[1]:
            corners = view_points(corners_3d, camera_intrinsic, True).T[:, :2]
            assert np.isfinite(corners).all()
            in_view += 1
        velocity = nusc.box_velocity(box.token)[:2]
        assert velocity.shape == (2,)
    return in_view


def test_mmdet3d_converter_access_pattern_reads_every_sample(mmdet3d_export):
    dest = mmdet3d_export
    nusc = NuScenes(version=VERSION, dataroot=str(dest), verbose=False)
    assert len(get_available_scenes(nusc)) == len(nusc.scene) == 1
    infos, sweeps_seen, boxes_in_view = [], 0, 0
    for sample in nusc.sample:
        assert set(sample["data"]) >= {"LIDAR_TOP", *CAMERA_TYPES}
        lidar_token = sample["data"]["LIDAR_TOP"]
        sd_rec = nusc.get("sample_data", lidar_token)
        cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
        pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
        lidar_path, boxes, _ = nusc.get_sample_data(lidar_token)
        assert Path(lidar_path).is_file()
        nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])
        info = {"lidar_path": lidar_path, "token": sample["token"], "sweeps": [], "cams": {},
                "lidar2ego_translation": cs_record["translation"], "lidar2ego_rotation": cs_record["rotation"],
                "ego2global_translation": pose_record["translation"],
                "ego2global_rotation": pose_record["rotation"], "timestamp": sample["timestamp"]}
        l2e_t, e2g_t = info["lidar2ego_translation"], info["ego2global_translation"]
        l2e_r_mat = Quaternion(info["lidar2ego_rotation"]).rotation_matrix
        e2g_r_mat = Quaternion(info["ego2global_rotation"]).rotation_matrix

        for cam in CAMERA_TYPES:
            cam_token = sample["data"][cam]
            cam_path, _, cam_intrinsic = nusc.get_sample_data(cam_token)
            assert Path(cam_path).is_file() and np.asarray(cam_intrinsic).shape == (3, 3)
            cam_info = obtain_sensor2top(nusc, cam_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, cam)
            assert Path(cam_info["data_path"]).is_file()
            assert np.isfinite(cam_info["sensor2lidar_rotation"]).all()
            assert np.isfinite(cam_info["sensor2lidar_translation"]).all()
            cam_info.update(cam_intrinsic=cam_intrinsic)
            info["cams"][cam] = cam_info
            boxes_in_view += get_2d_boxes(nusc, cam_token)

        # the lidar sweeps of this key frame, walked backwards through prev
        sd_rec = nusc.get("sample_data", lidar_token)
        sweeps = []
        while len(sweeps) < MAX_SWEEPS:
            if sd_rec["prev"] == "":
                break
            sweep = obtain_sensor2top(nusc, sd_rec["prev"], l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, "lidar")
            assert Path(sweep["data_path"]).is_file() and sweep["timestamp"] < info["timestamp"]
            sweeps.append(sweep)
            sd_rec = nusc.get("sample_data", sd_rec["prev"])
        info["sweeps"] = sweeps
        sweeps_seen += len(sweeps)

        annotations = [nusc.get("sample_annotation", token) for token in sample["anns"]]
        locs = np.array([b.center for b in boxes]).reshape(-1, 3)
        dims = np.array([b.wlh for b in boxes]).reshape(-1, 3)
        rots = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes]).reshape(-1, 1)
        velocity = np.array([nusc.box_velocity(token)[:2] for token in sample["anns"]]).reshape(-1, 2)
        valid_flag = np.array([(a["num_lidar_pts"] + a["num_radar_pts"]) > 0 for a in annotations],
                              dtype=bool).reshape(-1)
        for i in range(len(boxes)):  # velocity from global into the lidar frame
            velo = np.array([*velocity[i], 0.0]) @ np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T
            velocity[i] = velo[:2]
        # every velocity is a number or nan (an instance seen once), never an error or an infinity
        assert not np.isinf(velocity).any()
        names = np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes])
        gt_boxes = np.concatenate([locs, dims, -rots - np.pi / 2], axis=1)
        assert len(gt_boxes) == len(annotations) == len(names) == len(valid_flag)
        assert valid_flag.all()
        info.update(gt_boxes=gt_boxes, gt_names=names, gt_velocity=velocity, valid_flag=valid_flag,
                    num_lidar_pts=np.array([a["num_lidar_pts"] for a in annotations]),
                    num_radar_pts=np.array([a["num_radar_pts"] for a in annotations]))
        infos.append(info)

    assert len(infos) == len(nusc.sample) > 0
    assert boxes_in_view > 0
    assert sweeps_seen > 0  # earlier lidar sample_data (sweeps, or earlier key frames) reached through prev
