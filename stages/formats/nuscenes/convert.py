"""Per-frame nuScenes conversion: write a frame's sensor files and return its partial table rows.

Rows returned here carry their natural keys (``frame_id``, ``channel``, source ``obj_type``...) next to the
nuScenes fields; the links that need other frames (prev/next, sweeps' sample, attributes that depend on speed)
are left to ``tables.py`` at merge time. All values are JSON scalars or flat float lists so that every batch's
Arrow schema is the same.

Frames and units: lidar files hold the main lidar's points in the **lidar sensor frame** (x, y, z metres,
intensity, ring: 5 little-endian float32 per point); annotation centres/rotations are in the **global** frame
(global = ego→global ∘ lidar→ego ∘ box); sizes are [width, length, height] metres; timestamps Unix µs.

Missing images (``missing_image_policy`` in the mapping): with ``nearest``, a key frame whose image of a camera
is missing gets, as that camera's key-frame sample_data, the image of the plan's frame nearest in time that has
one (``ImageIndex``), the way nuScenes pairs each sample with the closest image of every camera: the row keeps
that image's timestamp and gets an ego_pose of its own with the neighbour frame's time and pose. The plan lists
every frame's images and poses, so each batch decides this alone, the same way every time (idempotent, no
cross-batch state). The image is copied (not linked: the neighbour's own copy may be written by another batch
on another machine) to the *sample's* filename slot, ``samples/<CH>/<logfile>__<CH>__<sample ts>.jpg``, which
no other sample_data can use since this frame has no image of its own for that camera.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.errors import InputError
from stages.formats.images import ImageIndex, note_filled_image
from stages.formats.nuscenes.lidar_pts import devkit_lidar_pts
from stages.formats.nuscenes.mapping import NuScenesMapping, normalise_name
from stages.formats.nuscenes.rounding import round_row
from stages.formats.nuscenes.tokens import make_token
from stages.formats.nuscenes.vocabulary import LIDAR_CHANNEL
from stages.geometry import Pose, box_to_parent
from stages.model import FrameRef, LoadedFrame, SensorCalib

JPEG_QUALITY = 95  # only used when a source image is not a JPEG (PNG) and must be re-encoded


def sensor_filename(logfile: str, channel: str, timestamp_us: int, key_frame: bool, lidar: bool) -> str:
    """``samples/<CH>/<logfile>__<CH>__<ts>.pcd.bin|.jpg`` (``sweeps/`` for non-key frames), relative to dataroot."""
    folder = "samples" if key_frame else "sweeps"
    suffix = ".pcd.bin" if lidar else ".jpg"
    return f"{folder}/{channel}/{logfile}__{channel}__{timestamp_us}{suffix}"


def write_lidar(points: np.ndarray, dest: Path) -> None:
    """Write (N, 5) points as headerless little-endian float32 (x, y, z, intensity, ring), via temp + rename."""
    pts = np.ascontiguousarray(points[:, :5], dtype="<f4")
    if pts.shape[1] != 5:
        raise ValueError(f"need (N, 5) points, got {points.shape}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    pts.tofile(tmp)
    os.replace(tmp, dest)


def write_image(src: str, dest: Path, frame_id: str) -> tuple[int, int]:
    """Copy a JPEG (or re-encode another format as JPEG) to ``dest``; returns its real (width, height) in pixels,
    read from the image header. Raises ``InputError`` naming the frame and the image when it cannot be read."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with Image.open(src) as im:  # lazy: only the header is parsed unless we re-encode
            width, height = im.size
            if im.format == "JPEG":
                shutil.copyfile(src, tmp)
            else:
                im.convert("RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot read image: {exc}", path=src, frame=frame_id) from None
    os.replace(tmp, dest)
    return int(width), int(height)


class FrameConverter:
    """Converts frames of one plan; built once per batch."""

    def __init__(self, *, project: str, output_dir: Path, mapping: NuScenesMapping, channel_map: dict[str, str],
                 calibration: dict[str, SensorCalib], main_lidar: str, include_pointcloud: bool,
                 include_images: bool, frames: list[FrameRef] | None = None, ego_poses: list[Pose] | None = None,
                 coordinate_precision: int | None = None):
        """``frames`` / ``ego_poses``: every frame of the plan with its ego pose, needed by the ``nearest``
        missing-image policy (without them, missing images are skipped). ``coordinate_precision``: the decimals
        the tables will be written with (``num_lidar_pts`` is counted in the boxes as written)."""
        self.project = project
        self.output_dir = Path(output_dir)
        self.mapping = mapping
        self.channel_map = channel_map
        self.main_lidar = main_lidar
        self.lidar_calib = calibration[main_lidar]
        self.include_pointcloud = include_pointcloud
        self.include_images = include_images
        self.coordinate_precision = coordinate_precision
        self.scene_token = make_token(project, "scene", project)
        self.fill_missing = (include_images and mapping.missing_image_policy == "nearest" and frames is not None
                             and ego_poses is not None)
        self.frames = frames or []
        self.ego_poses = ego_poses or []
        self._images: ImageIndex | None = None

    @property
    def images(self) -> ImageIndex:
        if self._images is None:
            self._images = ImageIndex(self.frames)
        return self._images

    def token(self, table: str, *key: object) -> str:
        return make_token(self.project, table, *key)

    def convert(self, frame: LoadedFrame) -> dict[str, list[dict[str, Any]]]:
        ref = frame.ref
        key = frame.is_key_frame
        rows: dict[str, list[dict[str, Any]]] = {"sample_data": [], "ego_pose": []}
        sample_token = self.token("sample", ref.frame_id) if key else ""
        if key:
            rows["sample"] = [{"token": sample_token, "timestamp": ref.timestamp_us, "scene_token": self.scene_token,
                               "frame_id": ref.frame_id}]

        def add_sample_data(channel: str, filename: str, fileformat: str, width: int, height: int,
                            timestamp_us: int = ref.timestamp_us, ego_pose: Pose = frame.ego_pose) -> None:
            """One sample_data row of this frame and its ego_pose row (same timestamp). A filled-in camera
            passes the neighbour image's own timestamp and ego pose."""
            ego_token = self.token("ego_pose", channel, ref.frame_id)
            rows["ego_pose"].append({
                "token": ego_token, "timestamp": timestamp_us, "frame_id": ref.frame_id, "channel": channel,
                "translation": [float(v) for v in ego_pose.translation],
                "rotation": [float(v) for v in ego_pose.rotation]})
            rows["sample_data"].append({
                "token": self.token("sample_data", channel, ref.frame_id), "frame_id": ref.frame_id,
                "channel": channel, "sample_token": sample_token, "ego_pose_token": ego_token,
                "calibrated_sensor_token": self.token("calibrated_sensor", channel), "timestamp": timestamp_us,
                "fileformat": fileformat, "is_key_frame": bool(key), "height": int(height), "width": int(width),
                "filename": filename})

        if self.include_pointcloud and frame.points is not None:
            name = sensor_filename(self.project, LIDAR_CHANNEL, ref.timestamp_us, key, lidar=True)
            write_lidar(frame.points, self.output_dir / name)
            add_sample_data(LIDAR_CHANNEL, name, "pcd", 0, 0)
        elif self.include_pointcloud:
            frame.warnings.append("no point cloud loaded: LIDAR_TOP sample_data omitted")

        if self.include_images:
            for source, path in sorted(ref.cameras.items()):
                channel = self.channel_map.get(source)
                if channel is None:  # unmapped (reported at merge)
                    continue
                if path is None:  # missing (the convert stage adds a warning)
                    if key and self.fill_missing:
                        self._fill_missing_image(frame, source, channel, add_sample_data)
                    continue
                name = sensor_filename(self.project, channel, ref.timestamp_us, key, lidar=False)
                width, height = write_image(path, self.output_dir / name, ref.frame_id)
                add_sample_data(channel, name, "jpg", width, height)

        if key and frame.boxes:
            rows.update(self._annotations(frame, sample_token))
        return {table: table_rows for table, table_rows in rows.items() if table_rows}

    def _fill_missing_image(self, frame: LoadedFrame, source: str, channel: str, add_sample_data) -> None:
        """Policy ``nearest``: the key-frame sample_data of ``channel`` is the image of the nearest frame that has
        one, with that frame's timestamp and ego pose, copied to this sample's filename slot."""
        ref = frame.ref
        j = self.images.nearest(source, ref.timestamp_us)
        if j is None:  # no frame of the export has this camera's image: nothing to pair with
            return
        other = self.frames[j]
        name = sensor_filename(self.project, channel, ref.timestamp_us, True, lidar=False)
        width, height = write_image(other.cameras[source], self.output_dir / name, other.frame_id)
        add_sample_data(channel, name, "jpg", width, height, timestamp_us=other.timestamp_us,
                        ego_pose=self.ego_poses[j])
        note_filled_image(frame, source, f"{channel} of this sample", other)

    def _annotations(self, frame: LoadedFrame, sample_token: str) -> dict[str, list[dict[str, Any]]]:
        """Annotation rows of a key frame: boxes in the global frame, category, rider flag, lidar point count."""
        ref = frame.ref
        sensor_to_global: Pose = frame.ego_pose.compose(self.lidar_calib.pose)
        placed = [box_to_parent(sensor_to_global, b.center, b.rotation) for b in frame.boxes]
        centers = np.array([c for c, _ in placed]).reshape(-1, 3)
        rules = self.mapping.attributes
        # A cycle has a rider when another box of a rider type has its centre within the radius, horizontally.
        is_rider = np.array([normalise_name(b.obj_type) in rules.rider_types for b in frame.boxes], dtype=bool)
        rider_idx = np.flatnonzero(is_rider)
        dxy = centers[:, None, :2] - centers[None, rider_idx, :2]  # (boxes, riders, 2)
        close = np.hypot(dxy[..., 0], dxy[..., 1]) <= rules.rider_radius_m
        close[rider_idx, np.arange(len(rider_idx))] = False  # a rider is not its own rider
        has_rider = close.any(axis=1) | np.array(
            [normalise_name(b.obj_type) in rules.ridden_types for b in frame.boxes], dtype=bool)
        seen_ids: set[str] = set()
        annotations, dropped = [], []
        for i, box in enumerate(frame.boxes):
            if box.obj_id in seen_ids:
                raise InputError(f"obj_id {box.obj_id!r} appears twice in the frame", path=ref.label,
                                 frame=ref.frame_id)
            seen_ids.add(box.obj_id)
            category = self.mapping.category_of(box.obj_type)
            if category is None:
                if self.mapping.unknown_type_policy == "error":
                    raise InputError(f"object type {box.obj_type!r} (obj_id {box.obj_id!r}) has no nuScenes "
                                     "category in configs/mappings/nuscenes.yaml", path=ref.label, frame=ref.frame_id)
                dropped.append({"frame_id": ref.frame_id, "obj_id": box.obj_id, "obj_type": box.obj_type})
                continue
            center, rotation = placed[i]
            if rotation[0] < 0:  # q and -q are the same rotation: keep w >= 0 for stable output
                rotation = -rotation
            length, width, height = (float(v) for v in box.size)
            annotations.append({
                "token": self.token("sample_annotation", ref.frame_id, box.obj_id),
                "sample_token": sample_token,
                "instance_token": self.token("instance", box.obj_id, category),
                "frame_id": ref.frame_id, "timestamp": ref.timestamp_us, "obj_id": box.obj_id,
                "obj_type": box.obj_type, "obj_attr": ",".join(box.attributes), "category": category,
                "has_rider": bool(has_rider[i]),
                "visibility_token": self.mapping.default_visibility,
                "translation": [float(v) for v in center], "size": [width, length, height],
                "rotation": [float(v) for v in rotation],
                "num_lidar_pts": int(frame.lidar_pts[i]), "num_radar_pts": 0})
        if annotations and self.include_pointcloud and frame.points is not None:
            self._recount_as_written(frame, annotations)
        out: dict[str, list[dict[str, Any]]] = {}
        if annotations:
            out["sample_annotation"] = annotations
        if dropped:
            out["dropped_annotation"] = dropped
        return out

    def _recount_as_written(self, frame: LoadedFrame, annotations: list[dict[str, Any]]) -> None:
        """Set ``num_lidar_pts`` to what the devkit counts in the written lidar file, with each box as the devkit
        rebuilds it in the lidar frame from the written (rounded) annotation, ego pose and calibration
        (``lidar_pts.py``). The source-box count of the filter can differ for a point on a face."""
        digits = self.coordinate_precision

        def written(pose: Pose) -> dict[str, list[float]]:  # as the ego_pose / calibrated_sensor rows are written
            return round_row({"translation": [float(v) for v in pose.translation],
                              "rotation": [float(v) for v in pose.rotation]}, digits)

        boxes = [round_row({k: a[k] for k in ("translation", "size", "rotation")}, digits) for a in annotations]
        ego, lidar = written(frame.ego_pose), written(self.lidar_calib.pose)
        counts = devkit_lidar_pts(frame.points, [b["translation"] for b in boxes], [b["size"] for b in boxes],
                                  [b["rotation"] for b in boxes], ego["translation"], ego["rotation"],
                                  lidar["translation"], lidar["rotation"])
        for annotation, n in zip(annotations, counts):
            annotation["num_lidar_pts"] = int(n)
