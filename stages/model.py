"""The internal model every source produces and every format consumes.

Frames, calibrations and boxes are expressed with the conventions of ``stages.geometry``: quaternions
[w, x, y, z], poses child→parent, box size (length, width, height), box centre in the *main lidar* frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.geometry import Pose


@dataclass(frozen=True)
class SensorCalib:
    """One sensor's calibration. ``pose`` is sensor→ego (base_link)."""

    channel: str  # the source's channel name, e.g. "lidar-fusion", "camera-front"
    sensor_type: str  # lidar | camera | radar | imu | gps
    pose: Pose
    width: int | None = None  # cameras only
    height: int | None = None
    intrinsic: np.ndarray | None = None  # (3, 3), cameras only
    distortion: dict[str, float] | None = None
    camera_model: str | None = None  # pinhole | fisheye | omnidirectional

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel, "sensor_type": self.sensor_type,
            "translation": [float(v) for v in self.pose.translation],
            "rotation": [float(v) for v in self.pose.rotation],
            "width": self.width, "height": self.height,
            "intrinsic": None if self.intrinsic is None else np.asarray(self.intrinsic).tolist(),
            "distortion": self.distortion, "camera_model": self.camera_model,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SensorCalib":
        return SensorCalib(
            channel=d["channel"], sensor_type=d["sensor_type"],
            pose=Pose(np.asarray(d["translation"], dtype=np.float64), np.asarray(d["rotation"], dtype=np.float64)),
            width=d.get("width"), height=d.get("height"),
            intrinsic=None if d.get("intrinsic") is None else np.asarray(d["intrinsic"], dtype=np.float64),
            distortion=d.get("distortion"), camera_model=d.get("camera_model"),
        )


@dataclass(frozen=True)
class FrameRef:
    """A frame as discovered: its id, time and the files that make it up (any may be missing: None).

    Cheap to build for thousands of frames; nothing is read but directory listings.
    """

    frame_id: str  # the file stem, e.g. "1708676399593999872" or "000950"
    timestamp_us: int  # Unix microseconds (derived from the stem by the source)
    lidar: dict[str, str]  # source lidar channel -> point cloud path
    cameras: dict[str, str | None]  # source camera channel -> image path, None when the image is missing
    ego_pose: str | None = None  # path of the pose file, None when missing
    label: str | None = None  # path of the label file, None = no objects

    def to_json(self) -> dict[str, Any]:
        return {"frame_id": self.frame_id, "timestamp_us": self.timestamp_us, "lidar": self.lidar,
                "cameras": self.cameras, "ego_pose": self.ego_pose, "label": self.label}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "FrameRef":
        return FrameRef(frame_id=d["frame_id"], timestamp_us=int(d["timestamp_us"]), lidar=dict(d["lidar"]),
                        cameras=dict(d["cameras"]), ego_pose=d.get("ego_pose"), label=d.get("label"))


@dataclass
class BoxLabel:
    """One labelled object in one frame, in the main lidar frame."""

    obj_id: str
    obj_type: str  # the source's type name, as written ("car", "Pedestrian", ...)
    center: np.ndarray  # (3,) metres, main lidar frame
    size: np.ndarray  # (3,) length, width, height in metres
    rotation: np.ndarray  # (4,) [w, x, y, z], main lidar frame
    attributes: list[str] = field(default_factory=list)  # split from obj_attr ("static,door open")
    num_pts: int | None = None  # as written by the labelling tool, if any
    score: float | None = None  # confidence, for labels that carry one


@dataclass
class LoadedFrame:
    """A frame with its data read: what a format's ``convert_frame`` receives."""

    ref: FrameRef
    points: np.ndarray | None  # (N, 5) float32 x, y, z, intensity, ring in the main lidar frame; None if skipped
    ego_pose: Pose  # ego→global (policy for missing poses applied by the source/discover)
    boxes: list[BoxLabel]  # after the request's annotation filter
    lidar_pts: np.ndarray  # (len(boxes),) int64: main-lidar points inside each box (closed bounds)
    is_key_frame: bool = True
    warnings: list[str] = field(default_factory=list)
