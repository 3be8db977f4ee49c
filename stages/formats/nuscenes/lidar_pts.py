"""``num_lidar_pts`` as the nuScenes devkit recounts it.

A user checks ``num_lidar_pts`` with ``points_in_box(box, LidarPointCloud.from_file(path).points[:3])``, ``box``
from ``NuScenes.get_sample_data(lidar_token)``. That box is not the source box: it is rebuilt from the written
tables. The annotation, the ego pose and the lidar calibration are read back as written (rounded to
``coordinate_precision``). The box is moved global → ego → lidar with pyquaternion, and the devkit tests its
corners with its own arithmetic. A point within ~1e-16 m of a face (annotators snap faces onto points) can
fall on either side of the source box and of the rebuilt one. So the count is made on the rebuilt box, in two
steps:

1. vectorised over all boxes (``stages.geometry.points_in_boxes_banded``): the box rebuilt in float64 with
   ``stages.geometry``, points well inside (``BAND_M`` from every face) counted, points in the band flagged;
2. only for a box with a point in the band: the devkit's own steps, replayed operation by operation on the
   same written values (``_devkit_count``), decide every point. This replays ``Box``,
   ``NuScenes.get_sample_data`` and ``points_in_box`` of nuscenes-devkit 1.2.0. The devkit itself is not
   imported: importing it loads matplotlib and OpenCV, 2 s and ~90 MB per convert worker.

Nothing here changes the annotation filter (``min_points``), which counts with the source box at convert time.
"""
from __future__ import annotations

import numpy as np
from pyquaternion import Quaternion

from stages.geometry import points_in_boxes_banded, quat_to_matrix

# Far wider than the float64 disagreement of two computations of one box (~1e-12 m at 1 km), far narrower than
# anything a lidar resolves: only points that really sit on a face fall in it.
BAND_M = 1e-6


def devkit_lidar_pts(points: np.ndarray, translations: np.ndarray, sizes_wlh: np.ndarray, rotations: np.ndarray,
                     ego_translation, ego_rotation, lidar_translation, lidar_rotation) -> np.ndarray:
    """Points of ``points`` (N, >=3, lidar frame, float32 as written to the ``.pcd.bin``) in each box, counted as
    the devkit counts them.

    Every other argument holds the values as written to the tables: the annotations' global ``translation``
    (B, 3), ``size`` (B, 3) [w, l, h] and ``rotation`` (B, 4) [w, x, y, z]; the lidar sample_data's ego_pose
    (ego→global) and calibrated_sensor (lidar→ego) translation and rotation.
    """
    t = np.asarray(translations, dtype=np.float64).reshape(-1, 3)
    if t.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    wlh = np.asarray(sizes_wlh, dtype=np.float64).reshape(-1, 3)
    r_ego, r_lidar = quat_to_matrix(ego_rotation), quat_to_matrix(lidar_rotation)
    # global → ego → lidar, in the row-vector form of R^T @ (p - t)
    centers = ((t - np.asarray(ego_translation, dtype=np.float64)) @ r_ego
               - np.asarray(lidar_translation, dtype=np.float64)) @ r_lidar
    box_rotations = (r_lidar.T @ r_ego.T) @ quat_to_matrix(np.asarray(rotations, dtype=np.float64).reshape(-1, 4))
    counts, near = points_in_boxes_banded(points, centers, wlh[:, [1, 0, 2]], box_rotations, BAND_M)
    undecided = np.flatnonzero(near)
    if len(undecided):
        xyz = points[:, :3].T  # (3, N) float32, as LidarPointCloud.points[:3]
        for b in undecided:  # rare: boxes with a point on a face
            counts[b] = _devkit_count(xyz, t[b], wlh[b], rotations[b], ego_translation, ego_rotation,
                                      lidar_translation, lidar_rotation)
    return counts


def _devkit_count(xyz: np.ndarray, translation, size_wlh, rotation, ego_translation, ego_rotation,
                  lidar_translation, lidar_rotation) -> int:
    """``points_in_box(box, xyz).sum()`` for the box ``NuScenes.get_sample_data`` rebuilds from these written
    values: the devkit's operations, in its order (nuscenes-devkit 1.2.0; tests compare with the devkit)."""
    # Box(record['translation'], record['size'], Quaternion(record['rotation']))
    center = np.array([float(v) for v in translation])
    wlh = np.array([float(v) for v in size_wlh])
    orientation = Quaternion([float(v) for v in rotation])
    # get_sample_data: box.translate(-pose t); box.rotate(Quaternion(pose q).inverse); same for calibrated_sensor
    for trans, rot in ((ego_translation, ego_rotation), (lidar_translation, lidar_rotation)):
        center += -np.array([float(v) for v in trans])
        q = Quaternion([float(v) for v in rot]).inverse
        center = np.dot(q.rotation_matrix, center)
        orientation = q * orientation
    # Box.corners()
    w, l, h = wlh * 1.0
    x_corners = l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
    y_corners = w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
    z_corners = h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])
    corners = np.dot(orientation.rotation_matrix, np.vstack((x_corners, y_corners, z_corners)))
    x, y, z = center
    corners[0, :] = corners[0, :] + x
    corners[1, :] = corners[1, :] + y
    corners[2, :] = corners[2, :] + z
    # points_in_box(box, points)
    p1 = corners[:, 0]
    i, j, k = corners[:, 4] - p1, corners[:, 1] - p1, corners[:, 3] - p1
    v = xyz - p1.reshape((-1, 1))
    iv, jv, kv = np.dot(i, v), np.dot(j, v), np.dot(k, v)
    mask = ((0 <= iv) & (iv <= np.dot(i, i))) & ((0 <= jv) & (jv <= np.dot(j, j))) & ((0 <= kv) & (kv <= np.dot(k, k)))
    return int(np.count_nonzero(mask))
