"""KITTI 3D object writer (``export_format: kitti``).

Layout under ``output_dir`` (``<idx>`` = the frame's position in the plan, ``frames[i]`` → ``i:06d``, so an index
does not depend on how frames were batched)::

    training/velodyne/<idx>.bin   float32 x, y, z, intensity, in the velodyne frame (below)
    training/label_2/<idx>.txt    one line per object, in the reference camera frame; DontCare lines last
    training/calib/<idx>.txt      P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo (the same for every frame)
    training/image_2/<idx>.jpg    the reference camera's image, copied byte for byte (.png when the source is a
                                  PNG, or with ``image_format: png`` in the mapping: re-encoded, slower); a frame
                                  without one gets the nearest frame's (``missing_image_policy: nearest``) or
                                  none and is left out of ImageSets (``skip``)
    training/pose/<idx>.txt       with ``include_ego_pose`` (default): velodyne→global as one line of 12 numbers, the
                                  3x4 row-major matrix (the form of a KITTI odometry poses.txt line); global = the
                                  project's world frame (the source's ego poses, missing ones interpolated)
    training/frame_ids.txt        "<idx> <frame_id> <timestamp_us>" per frame: the way back to the source
    ImageSets/{train,val,trainval,test}.txt   indices (of frames with image_2 when images are exported); all in
                                              train/trainval unless the mapping's split says so

Frames and conventions:

- **velodyne frame** = the request's ``coordinate_system``: ``lidar`` → the main lidar's own frame (points are
  the source points unchanged); ``ego_vehicle`` → base_link (points moved by the lidar→ego calibration).
  ``global`` is rejected: KITTI stores every frame in its own sensor frame and has no world frame. KITTI assumes
  x forward, y left, z up; when the lidar is mounted otherwise (e.g. SUSTech's x-left lidars), the points stay
  in the lidar frame and ``Tr_velo_to_cam`` carries the true rotation, so every geometric relation in the files
  is exact. Tools that hard-code KITTI's axes (``yaw_velo = -ry - pi/2``, "bottom + h/2 along velodyne z")
  then misread boxes; a warning says so, and how to fix it: exporting with ``ego_vehicle`` (base_link is
  x-forward, z-up) when the lidar→ego calibration carries the lidar's mounting rotation, else that calibration
  (for SUSTech scenes: the ``lidar_axes`` source setting) first.
- **camera frame**: the reference camera's optical frame (x right, y down, z forward) — the mapping's
  ``reference_camera``, by default the first of camera-front / front / CAM_FRONT in the project. ``R0_rect`` is
  the identity (source images are not rectified), ``P0 = P1 = P2 = P3 = [K | 0]`` with K the reference camera's
  intrinsic (only image_2 is written; the copies keep 4-matrix parsers working). Lens distortion is not applied
  (a warning names a distorted or non-pinhole reference camera). ``Tr_velo_to_cam`` = camera←velodyne,
  ``Tr_imu_to_velo`` = velodyne←ego: KITTI's "imu" is the ego vehicle (base_link) here, so it is the inverse
  lidar calibration for ``lidar`` and the identity for ``ego_vehicle``.
- **labels** (see ``labels.py``): ``type truncated occluded alpha left top right bottom h w l x y z rotation_y``.
  ``location`` (x y z) is the centre of the box's bottom face in the camera frame = centre + h/2 along camera y
  (KITTI boxes are upright in the camera frame); ``rotation_y`` = ``atan2(-d_z, d_x)`` for the box heading d in
  the camera frame, in [-pi, pi); ``alpha = rotation_y - atan2(x, z)``. A reader gets the centre back as
  ``inv(Tr_velo_to_cam) · inv(R0_rect) · (location - (0, h/2, 0))``. Boxes tilted w.r.t. the camera's up axis
  lose the tilt (counted ``tilted_boxes``); their centre is still exact.
- **2D box**: the extent of the 8 projected corners (edges cut at 1 cm in front of the camera), clipped to
  ``[0, W-1] x [0, H-1]``. ``truncated`` = fraction of corners outside the image or behind the camera;
  ``occluded`` = 0 (NextPoints labels carry no occlusion).
- **boxes outside the image** (behind the camera or projecting beside it): kept by default, because lidar
  detectors train on every box — written with bbox ``0 0 0 0`` and truncated 1 (KITTI's evaluation ignores
  truncation > 0.5), counted ``out_of_image_kept``; ``out_of_image: drop`` drops them instead
  (``dropped_out_of_image``). A DontCare object outside the image marks no region and is always dropped.
- **classes**: ``configs/mappings/kitti.yaml`` maps source types (NextPoints and SUSTech names) to KITTI classes;
  ``null`` leaves a type out (``dropped_no_kitti_class.<type>``), an unlisted type is skipped
  (``dropped_unknown_type.<type>``) or fails the export (``unknown_type_policy: error``). DontCare lines carry
  KITTI's placeholders (-1 dimensions, -1000 location, -10 angles) and only their 2D region.
- numbers: geometry with ``coordinate_precision`` decimals (6 when unset: KITTI's usual 2 would move centres by
  up to 5 mm), pixels with 2, calibration with 12 significant digits.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from stages.errors import ExportError, InputError, RequestError
from stages.formats.base import OutputFormat
from stages.formats.images import ImageIndex, note_filled_image
from stages.formats.kitti.labels import KITTI_CAM_FROM_VELO, KittiBoxes, PinholeCamera, kitti_boxes
from stages.formats.kitti.mapping import KittiMapping
from stages.model import LoadedFrame, SensorCalib
from stages.request import CoordinateSystem

if TYPE_CHECKING:
    from stages.plan import ExportPlan
    from stages.request import ExportRequest

FRAMES_TABLE = "kitti_frames"
OBJECTS_TABLE = "kitti_objects"
SPLITS = ("train", "val", "trainval", "test")
DEFAULT_DECIMALS = 6
# Warn when the velodyne axes differ from KITTI's (x forward, z up seen from the camera) by more than this.
AXES_WARNING_DEG = 5.0


class KittiFormat(OutputFormat):
    name = "kitti"
    mapping_name = "kitti"
    open_mapping_sections = ("classes",)
    default_coordinate_system = "lidar"

    @classmethod
    def check_mapping(cls, mapping: dict[str, Any], layout: str | None = None) -> None:
        KittiMapping.from_dict(mapping)

    @classmethod
    def reads_ego_poses(cls, request: "ExportRequest") -> bool:
        # the velodyne frame never depends on them (coordinate_system only picks lidar or base_link): poses are
        # read for the pose files alone
        return request.export_options.include_ego_pose

    @classmethod
    def check_request(cls, request: "ExportRequest") -> None:
        if request.coordinate_system == CoordinateSystem.global_:
            raise RequestError("coordinate_system", "KITTI has no global frame: every frame is stored in its own velodyne (sensor) frame; "
                             "request coordinate_system 'lidar' (velodyne = the main lidar) or 'ego_vehicle' "
                             "(velodyne = base_link)")
        opts = request.export_options
        if opts.include_sweeps and opts.key_frame_interval > 1:
            raise RequestError("export_options.include_sweeps", "KITTI 3D object has no sweeps: every exported frame is a labelled sample; drop "
                             "include_sweeps, or thin frames with frame_step instead of key_frame_interval")

    def __init__(self, plan: "ExportPlan", output_dir: Path):
        super().__init__(plan, output_dir)
        self.mapping = KittiMapping.from_dict(plan.mappings)
        try:
            self.camera_channel = self.mapping.reference_channel(plan.calibration)
        except ValueError as err:
            raise InputError(str(err), path=plan.project_dir) from None
        calib = plan.calibration[self.camera_channel]
        if calib.intrinsic is None or not calib.width or not calib.height:
            raise InputError(f"reference camera {self.camera_channel} has no intrinsic or image size",
                             path=plan.project_dir)
        lidar_to_ego = plan.calibration[plan.main_lidar].pose.matrix()
        cam_from_lidar = np.linalg.inv(calib.pose.matrix()) @ lidar_to_ego
        self.camera = PinholeCamera(cam_from_lidar, np.asarray(calib.intrinsic, dtype=np.float64),
                                    int(calib.width), int(calib.height))
        ego_velo = plan.request.coordinate_system == CoordinateSystem.ego_vehicle
        self.velo_from_lidar = lidar_to_ego if ego_velo else np.eye(4)
        cam_from_velo = cam_from_lidar @ np.linalg.inv(self.velo_from_lidar)
        velo_from_ego = self.velo_from_lidar @ np.linalg.inv(lidar_to_ego)
        self.calib_text = _calib_text(self.camera.K, cam_from_velo, velo_from_ego)
        self.ego_from_velo = np.linalg.inv(velo_from_ego)
        self.setup_warnings = _setup_warnings(self.camera_channel, calib, cam_from_velo, lidar_to_ego,
                                              ego_velo, plan.layout)
        precision = plan.request.export_options.coordinate_precision
        self.decimals = DEFAULT_DECIMALS if precision is None else precision
        self.index_of = {ref.frame_id: i for i, ref in enumerate(plan.frames)}
        self._images: ImageIndex | None = None

    @property
    def images(self) -> ImageIndex:
        """The plan's frames with a reference image, for ``missing_image_policy: nearest`` (built on first use)."""
        if self._images is None:
            self._images = ImageIndex(self.plan.frames)
        return self._images

    # -- convert ---------------------------------------------------------------------------------------------

    def convert_frame(self, frame: LoadedFrame) -> dict[str, list[dict[str, Any]]]:
        index = self.index_of[frame.ref.frame_id]
        stem = f"{index:06d}"
        training = self.output_dir / "training"
        if index == 0:
            frame.warnings.extend(self.setup_warnings)  # once per export, on a frame every export has
        opts = self.plan.request.export_options

        lines, objects = self._label_lines(frame, index)
        _write_atomic(training / "label_2" / f"{stem}.txt", "".join(f"{line}\n" for line in lines).encode())
        _write_atomic(training / "calib" / f"{stem}.txt", self.calib_text.encode())
        if opts.include_ego_pose:
            global_from_velo = frame.ego_pose.matrix() @ self.ego_from_velo
            _write_atomic(training / "pose" / f"{stem}.txt", f"{_matrix_text(global_from_velo[:3])}\n".encode())
        wrote_points = opts.include_pointcloud and frame.points is not None
        if wrote_points:
            _write_atomic(training / "velodyne" / f"{stem}.bin", self._velodyne_bytes(frame.points))
        elif opts.include_pointcloud:
            frame.warnings.append("no point cloud loaded: velodyne file not written")
        wrote_image = filled = False
        if opts.include_images:
            src, image_frame = frame.ref.cameras.get(self.camera_channel), frame.ref.frame_id
            if src is None and self.mapping.missing_image_policy == "nearest":
                j = self.images.nearest(self.camera_channel, frame.ref.timestamp_us)
                if j is not None:  # None: no frame of the export has a reference image
                    used = self.plan.frames[j]
                    src, image_frame, filled = used.cameras[self.camera_channel], used.frame_id, True
                    note_filled_image(frame, self.camera_channel, f"image_2/{stem}", used)
            if src is None:
                frame.warnings.append(f"missing image for reference camera {self.camera_channel}: "
                                      f"image_2/{stem} not written, {stem} left out of ImageSets")
            else:
                self._write_image(Path(src), training / "image_2", stem, image_frame)
                wrote_image = True
        row = {"index": index, "frame_id": frame.ref.frame_id, "timestamp_us": frame.ref.timestamp_us,
               "objects": len(lines), "image": wrote_image, "image_filled": filled, "pointcloud": wrote_points,
               "pose": opts.include_ego_pose}
        out: dict[str, list[dict[str, Any]]] = {FRAMES_TABLE: [row]}
        if objects:
            out[OBJECTS_TABLE] = objects
        return out

    def annotations_in(self, rows: dict[str, list[dict[str, Any]]]) -> int:
        return sum(row["objects"] for row in rows.get(FRAMES_TABLE, ()))

    def _label_lines(self, frame: LoadedFrame, index: int) -> tuple[list[str], list[dict[str, Any]]]:
        """label_2 lines (DontCare last, as KITTI tools expect) and one object row per source box."""
        boxes = frame.boxes
        classes: list[str | None] = []
        outcomes: list[str] = []
        for box in boxes:
            cls, known = self.mapping.class_of(box.obj_type, box.attributes)
            if not known and self.mapping.unknown_type_policy == "error":
                raise InputError(f"object type {box.obj_type!r} (obj_id {box.obj_id}) has no KITTI class in "
                                 f"configs/mappings/kitti.yaml and unknown_type_policy is error",
                                 path=frame.ref.label, frame=frame.ref.frame_id)
            classes.append(cls)
            outcomes.append("written" if cls is not None else ("no_kitti_class" if known else "unknown_type"))
        if not boxes:
            return [], []
        geo = kitti_boxes(np.stack([b.center for b in boxes]), np.stack([b.size for b in boxes]),
                          np.stack([b.rotation for b in boxes]), self.camera)
        tilted = np.degrees(geo.tilt) > self.mapping.max_tilt_deg
        lines, dont_care = [], []
        for i, cls in enumerate(classes):
            if outcomes[i] != "written":
                continue
            if not geo.visible[i] and (cls == "DontCare" or self.mapping.out_of_image == "drop"):
                outcomes[i] = "out_of_image"
                continue
            if not geo.visible[i]:
                outcomes[i] = "written_out_of_image"
            if cls == "DontCare":
                dont_care.append(self._dont_care_line(geo, i))
            else:
                lines.append(self._label_line(cls, geo, i))
        objects = [{"index": index, "obj_id": box.obj_id, "source_type": box.obj_type, "kitti_class": cls,
                    "outcome": outcome, "tilted": bool(tilt) and outcome.startswith("written")}
                   for box, cls, outcome, tilt in zip(boxes, classes, outcomes, tilted)]
        return lines + dont_care, objects

    def _label_line(self, cls: str, geo: KittiBoxes, i: int) -> str:
        d = self.decimals
        left, top, right, bottom = geo.bbox[i]
        h, w, length = geo.hwl[i]
        x, y, z = geo.location[i]
        return (f"{cls} {geo.truncation[i]:.3f} 0 {geo.alpha[i]:.{d}f} "
                f"{left:.2f} {top:.2f} {right:.2f} {bottom:.2f} "
                f"{h:.{d}f} {w:.{d}f} {length:.{d}f} {x:.{d}f} {y:.{d}f} {z:.{d}f} {geo.rotation_y[i]:.{d}f}")

    @staticmethod
    def _dont_care_line(geo: KittiBoxes, i: int) -> str:
        left, top, right, bottom = geo.bbox[i]
        return f"DontCare -1 -1 -10 {left:.2f} {top:.2f} {right:.2f} {bottom:.2f} -1 -1 -1 -1000 -1000 -1000 -10"

    def _velodyne_bytes(self, points: np.ndarray) -> bytes:
        xyzi = np.asarray(points[:, :4], dtype=np.float32)
        if not np.array_equal(self.velo_from_lidar, np.eye(4)):
            xyzi = xyzi.copy()
            r, t = self.velo_from_lidar[:3, :3], self.velo_from_lidar[:3, 3]
            xyzi[:, :3] = (points[:, :3].astype(np.float64) @ r.T + t).astype(np.float32)
        return np.ascontiguousarray(xyzi, dtype="<f4").tobytes()

    def _write_image(self, src: Path, folder: Path, stem: str, frame_id: str) -> None:
        if not src.is_file():
            raise InputError("image file not found", path=src, frame=frame_id)
        suffix = src.suffix.lower()
        if self.mapping.image_format == "png" and suffix != ".png":
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{stem}.png"
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                with Image.open(src) as img:
                    img.convert("RGB").save(tmp, format="PNG", compress_level=1)
            except OSError as err:
                raise InputError(f"unreadable image: {err}", path=src, frame=frame_id) from None
            os.replace(tmp, dest)
            return
        dest = folder / f"{stem}{'.jpg' if suffix == '.jpeg' else suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    # -- merge -----------------------------------------------------------------------------------------------

    def merge(self, tables: dict[str, pa.Table]) -> dict[str, int]:
        frames = sorted(tables[FRAMES_TABLE].to_pylist(), key=lambda r: r["index"]) if FRAMES_TABLE in tables \
            else []
        indices = [r["index"] for r in frames]
        if indices != list(range(len(self.plan.frames))):
            missing = sorted(set(range(len(self.plan.frames))) - set(indices))
            raise ExportError(f"KITTI merge: converted frames do not cover the plan (missing indices "
                              f"{missing[:10]}, {len(indices)} rows for {len(self.plan.frames)} frames)")
        # a frame without image_2 (include_images, but no reference image to write) stays out of ImageSets:
        # mmdetection3d's and OpenPCDet's KITTI loaders read image_2 of every listed index
        images_asked = self.plan.request.export_options.include_images
        listed = [r["index"] for r in frames if r["image"] or not images_asked]
        splits = self.mapping.split.assign(listed)
        for split in SPLITS:
            _write_atomic(self.output_dir / "ImageSets" / f"{split}.txt",
                          "".join(f"{i:06d}\n" for i in splits[split]).encode())
        _write_atomic(self.output_dir / "training" / "frame_ids.txt",
                      "".join(f"{r['index']:06d} {r['frame_id']} {r['timestamp_us']}\n" for r in frames).encode())

        counts: Counter = Counter()
        counts["frames"] = len(frames)
        counts["annotations"] = sum(r["objects"] for r in frames)
        counts["images"] = sum(bool(r["image"]) for r in frames)
        if images_asked:
            counts["missing_images"] = sum(self.plan.frames[r["index"]].cameras.get(self.camera_channel) is None
                                           for r in frames)
            counts["filled_images"] = sum(bool(r.get("image_filled")) for r in frames)
            counts["not_in_imagesets"] = len(frames) - len(listed)
        counts["pointclouds"] = sum(bool(r["pointcloud"]) for r in frames)
        counts["poses"] = sum(bool(r["pose"]) for r in frames)
        for split in SPLITS:
            counts[f"split.{split}"] = len(splits[split])
        objects = tables[OBJECTS_TABLE].to_pylist() if OBJECTS_TABLE in tables else []
        for obj in objects:
            outcome = obj["outcome"]
            if outcome.startswith("written"):
                counts[f"class.{obj['kitti_class']}"] += 1
                counts["tilted_boxes"] += bool(obj["tilted"])
                if outcome == "written_out_of_image":
                    counts["out_of_image_kept"] += 1
            elif outcome == "out_of_image":
                counts["dropped_out_of_image"] += 1
            else:
                counts[f"dropped_{outcome}.{obj['source_type']}"] += 1
        return dict(counts)


def _calib_text(K: np.ndarray, cam_from_velo: np.ndarray, velo_from_ego: np.ndarray) -> str:
    """The calib file, in KITTI's line order (tools read P2, R0_rect, Tr_velo_to_cam by position)."""
    p = np.zeros((3, 4))
    p[:, :3] = K
    lines = [f"P{i}: {_matrix_text(p)}" for i in range(4)]
    lines += [f"R0_rect: {_matrix_text(np.eye(3))}", f"Tr_velo_to_cam: {_matrix_text(cam_from_velo[:3])}",
              f"Tr_imu_to_velo: {_matrix_text(velo_from_ego[:3])}"]
    return "\n".join(lines) + "\n"


def _matrix_text(m: np.ndarray) -> str:
    """A matrix row-major with 12 significant digits (calibration and pose files)."""
    return " ".join(f"{v:.12e}" for v in np.asarray(m, dtype=np.float64).ravel())


def _axes_deviation_deg(cam_from_frame: np.ndarray) -> float:
    """How far (degrees) a frame's axes, seen from the camera, are from KITTI's velodyne axes."""
    rot = cam_from_frame[:3, :3] @ KITTI_CAM_FROM_VELO.T
    return float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))))


def _setup_warnings(channel: str, calib: SensorCalib, cam_from_velo: np.ndarray, lidar_to_ego: np.ndarray,
                    ego_velo: bool, layout: str) -> list[str]:
    """Export-wide warnings (reported once, on frame 0): non-KITTI velodyne axes, a distorted camera.

    The axes advice depends on where the fix is: when base_link (the ego frame) has KITTI's axes, exporting with
    ``ego_vehicle`` fixes it; when base_link is off too, the lidar→ego calibration lacks the lidar's mounting
    rotation (e.g. a SUSTech x-left lidar read with the default ``lidar_axes``), and only fixing that helps."""
    warnings = []
    deviation = _axes_deviation_deg(cam_from_velo)
    if deviation > AXES_WARNING_DEG:
        cam_from_ego = np.linalg.inv(calib.pose.matrix())
        ego_deviation = _axes_deviation_deg(cam_from_ego)
        problem = (f"the velodyne frame is {deviation:.1f} deg away from KITTI's axes (x forward, y left, z up) as "
                   f"seen from {channel}: Tr_velo_to_cam is exact, but tools that assume KITTI's axes "
                   f"(yaw = -ry - pi/2) will misread boxes; ")
        if not ego_velo and ego_deviation <= AXES_WARNING_DEG:
            advice = "export with coordinate_system ego_vehicle (base_link has KITTI's axes here)"
        else:
            identity = np.allclose(lidar_to_ego[:3, :3], np.eye(3), atol=1e-9)
            calib_text = "the lidar->ego calibration is the identity" if identity else "the lidar->ego calibration"
            where = (f"{calib_text}, so base_link is {ego_deviation:.1f} deg off as well and coordinate_system "
                     f"ego_vehicle cannot help: ")
            if layout == "sustech":
                fix = ("set the SUSTechPOINTS source setting lidar_axes to the rig's convention (x_left_y_back for "
                       "SUSTech's own recordings, lidar x left and y back), then export with coordinate_system "
                       "ego_vehicle")
            else:
                fix = ("correct the main lidar's lidar->ego calibration (its mounting rotation) in the project's "
                       "calib, then export with coordinate_system ego_vehicle")
            advice = where + fix
        warnings.append(problem + advice)
    distortion = calib.distortion or {}
    if (calib.camera_model not in (None, "pinhole")) or any(abs(float(v or 0)) > 1e-9 for v in distortion.values()):
        warnings.append(f"reference camera {channel} is {calib.camera_model or 'pinhole'} with distortion "
                        f"{distortion}: KITTI's P2 is a pinhole model; images are written as they are "
                        f"(not undistorted) and 2D boxes ignore the distortion")
    return warnings


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so a retried batch never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
