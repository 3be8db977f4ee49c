"""KITTI label geometry: boxes of the internal model (main lidar frame) → KITTI ``label_2`` fields in the
reference camera frame, vectorised over all boxes of a frame.

Conventions (KITTI object devkit): the camera frame has x right, y down, z forward. A KITTI box is upright in
that frame: ``location`` is the centre of its bottom face, i.e. ``centre + (0, h/2, 0)``; ``rotation_y`` is the
rotation about the camera y axis that takes the camera x axis onto the box's length (heading) axis, so the
heading direction in the camera frame is ``(cos ry, 0, -sin ry)`` and ``ry = atan2(-d_z, d_x)`` for a heading
``d``. (With KITTI's own axes, camera x = -velo y, y = -velo z, z = velo x, this is the familiar
``ry = -yaw_velo - pi/2``.) ``alpha = ry - atan2(x, z)`` of the location, wrapped to [-pi, pi).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.geometry import quat_to_matrix

# The 8 corners of a unit box as signs along its (length, width, height) axes, and its 12 edges (corner pairs
# differing in one sign).
_CORNER_SIGNS = np.array([[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)], dtype=np.float64)
_EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)
                   if np.count_nonzero(_CORNER_SIGNS[i] != _CORNER_SIGNS[j]) == 1])
# Corners closer to the image plane than this (metres along the optical axis) count as behind the camera; box
# edges crossing it are cut there, so a box reaching behind the camera still gets its visible 2D extent.
NEAR_PLANE_M = 0.01
# Rotation camera←velodyne of KITTI's own rig (x forward, y left, z up lidar; x right, y down, z forward camera).
KITTI_CAM_FROM_VELO = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return (np.asarray(a, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi


@dataclass(frozen=True)
class PinholeCamera:
    """The reference camera as KITTI sees it: ``cam_from_lidar`` (4x4, main lidar → camera optical frame),
    intrinsic ``K`` (3x3) and image size in pixels."""

    cam_from_lidar: np.ndarray
    K: np.ndarray
    width: int
    height: int


@dataclass
class KittiBoxes:
    """KITTI label fields of B boxes, in the reference camera frame."""

    location: np.ndarray  # (B, 3) bottom-face centre, metres
    hwl: np.ndarray  # (B, 3) height, width, length
    rotation_y: np.ndarray  # (B,) radians in [-pi, pi)
    alpha: np.ndarray  # (B,) radians in [-pi, pi)
    bbox: np.ndarray  # (B, 4) left, top, right, bottom pixels, inside [0, W-1] x [0, H-1]; 0s when not visible
    truncation: np.ndarray  # (B,) fraction of the 8 corners outside the image (or behind the camera)
    visible: np.ndarray  # (B,) bool: some part of the box projects into the image
    tilt: np.ndarray  # (B,) radians between the box's up axis and the camera's up (-y): lost by KITTI's yaw-only box


def kitti_boxes(centers: np.ndarray, sizes_lwh: np.ndarray, rotations: np.ndarray,
                camera: PinholeCamera) -> KittiBoxes:
    """KITTI fields of boxes given in the main lidar frame (centre (B,3), size (l,w,h) (B,3), [w,x,y,z] (B,4)).

    The centre is kept exactly (location = centre in the camera + h/2 along camera y); the heading is projected
    onto the camera's x-z plane, which is exact whenever the box is upright in the camera frame (``tilt`` 0).
    The 2D box is the extent of the projected corners, with box edges cut at the near plane, clipped to the
    image; a box with no part in the image gets ``visible`` False, bbox 0 0 0 0 and truncation 1.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes_lwh, dtype=np.float64).reshape(-1, 3)
    n = len(centers)
    rot_cl, t_cl = camera.cam_from_lidar[:3, :3], camera.cam_from_lidar[:3, 3]
    box_rots = np.stack([quat_to_matrix(q) for q in np.asarray(rotations, dtype=np.float64).reshape(-1, 4)]) \
        if n else np.zeros((0, 3, 3))
    axes = np.einsum("ij,bjk->bik", rot_cl, box_rots)  # box axes (columns) in the camera frame
    center_cam = centers @ rot_cl.T + t_cl

    heading = axes[:, :, 0]
    rotation_y = wrap_angle(np.arctan2(-heading[:, 2], heading[:, 0]))
    location = center_cam + np.column_stack([np.zeros(n), sizes[:, 2] / 2, np.zeros(n)])
    alpha = wrap_angle(rotation_y - np.arctan2(location[:, 0], location[:, 2]))
    tilt = np.arccos(np.clip(-axes[:, 1, 2], -1.0, 1.0))

    half_extents = _CORNER_SIGNS[None, :, :] * sizes[:, None, :] / 2  # (B, 8, 3) in the box's own axes
    corners = center_cam[:, None, :] + np.einsum("bij,bkj->bki", axes, half_extents)
    bbox, truncation, visible = _image_extent(corners, camera)
    return KittiBoxes(location=location, hwl=sizes[:, [2, 1, 0]], rotation_y=rotation_y, alpha=alpha, bbox=bbox,
                      truncation=truncation, visible=visible, tilt=tilt)


def _project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(..., 3) camera points with z > 0 → (..., 2) pixels."""
    uvw = points @ K.T
    return uvw[..., :2] / uvw[..., 2:3]


def _image_extent(corners: np.ndarray, camera: PinholeCamera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D boxes, truncations and visibility of boxes given by their (B, 8, 3) camera-frame corners."""
    n = len(corners)
    w_max, h_max = camera.width - 1.0, camera.height - 1.0
    z = corners[..., 2]
    in_front = z > NEAR_PLANE_M
    # Where an edge crosses the near plane, its crossing point is part of the visible outline.
    a, b = corners[:, _EDGES[:, 0]], corners[:, _EDGES[:, 1]]
    za, zb = a[..., 2], b[..., 2]
    crossing = (za > NEAR_PLANE_M) != (zb > NEAR_PLANE_M)
    t = np.where(crossing, (NEAR_PLANE_M - za) / np.where(crossing, zb - za, 1.0), 0.0)
    cut = a + t[..., None] * (b - a)
    cut[..., 2] = NEAR_PLANE_M
    outline = np.concatenate([corners, cut], axis=1)
    valid = np.concatenate([in_front, crossing], axis=1)
    safe = np.where(valid[..., None], outline, np.array([0.0, 0.0, 1.0]))
    uv = _project(safe, camera.K)
    u_min = np.where(valid, uv[..., 0], np.inf).min(axis=1, initial=np.inf)
    u_max = np.where(valid, uv[..., 0], -np.inf).max(axis=1, initial=-np.inf)
    v_min = np.where(valid, uv[..., 1], np.inf).min(axis=1, initial=np.inf)
    v_max = np.where(valid, uv[..., 1], -np.inf).max(axis=1, initial=-np.inf)
    bbox = np.column_stack([np.clip(u_min, 0.0, w_max), np.clip(v_min, 0.0, h_max),
                            np.clip(u_max, 0.0, w_max), np.clip(v_max, 0.0, h_max)]).reshape(n, 4)
    visible = (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
    bbox[~visible] = 0.0

    corner_uv = uv[:, :8]
    inside = in_front & (corner_uv[..., 0] >= 0) & (corner_uv[..., 0] <= w_max) \
        & (corner_uv[..., 1] >= 0) & (corner_uv[..., 1] <= h_max)
    truncation = np.where(visible, 1.0 - inside.sum(axis=1) / 8.0, 1.0)
    return bbox, truncation, visible
