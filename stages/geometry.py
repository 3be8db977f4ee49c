"""The one home of geometry: poses, quaternion order, box conventions, points-in-box counting.

Conventions used everywhere in this project:
- Quaternions are **[w, x, y, z]** numpy arrays (nuScenes order). Sources convert on read.
- A ``Pose`` maps points from its child frame into its parent frame: ``p_parent = R @ p_child + t``.
  E.g. a sensor calibration is sensor→ego, an ego pose is ego→global.
- A box has ``center`` (3,), ``size`` = (length, width, height) in metres, and ``rotation`` [w,x,y,z]; the box's
  own x axis is its length/heading axis. (nuScenes stores ``size`` as [w, l, h]; only the nuScenes writer swaps.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a [w, x, y, z] quaternion (normalised first); (..., 4) → (..., 3, 3) for a stack."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=-2)


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """[w, x, y, z] unit quaternion of a rotation matrix, with w >= 0 (a canonical sign, for stable output)."""
    m = np.asarray(m, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a*b of [w, x, y, z] quaternions (apply b first, then a)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ])


def quat_from_xyzw(x: float, y: float, z: float, w: float) -> np.ndarray:
    """[w, x, y, z] from the scalar-last components NextPoints writes."""
    return np.array([w, x, y, z], dtype=np.float64)


def euler_xyz_to_quat(rx: float, ry: float, rz: float) -> np.ndarray:
    """[w, x, y, z] of R = Rx(rx) · Ry(ry) · Rz(rz) (radians), the SUSTechPOINTS / legacy NextPoints convention."""
    cx, sx = np.cos(rx), np.sin(rx)
    cy, sy = np.cos(ry), np.sin(ry)
    cz, sz = np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return matrix_to_quat(rot_x @ rot_y @ rot_z)


def yaw_of(q: np.ndarray) -> float:
    """Heading (rotation about z) of the box x axis, in radians in (-pi, pi]."""
    m = quat_to_matrix(q)
    return float(np.arctan2(m[1, 0], m[0, 0]))


@dataclass(frozen=True)
class Pose:
    """A rigid transform child→parent: ``p_parent = rotation_matrix @ p_child + translation``."""

    translation: np.ndarray  # (3,) metres
    rotation: np.ndarray  # (4,) [w, x, y, z]

    @staticmethod
    def identity() -> "Pose":
        return Pose(np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0]))

    @staticmethod
    def from_matrix(m: np.ndarray) -> "Pose":
        m = np.asarray(m, dtype=np.float64)
        return Pose(m[:3, 3].copy(), matrix_to_quat(m[:3, :3]))

    def matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = quat_to_matrix(self.rotation)
        m[:3, 3] = self.translation
        return m

    def inverse(self) -> "Pose":
        r = quat_to_matrix(self.rotation)
        return Pose(-r.T @ self.translation, matrix_to_quat(r.T))

    def compose(self, inner: "Pose") -> "Pose":
        """self ∘ inner: first apply ``inner`` then ``self`` (e.g. ego→global ∘ sensor→ego = sensor→global)."""
        return Pose.from_matrix(self.matrix() @ inner.matrix())

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform an (N, 3) array of points from child to parent frame (vectorised)."""
        r = quat_to_matrix(self.rotation)
        return np.asarray(points, dtype=np.float64) @ r.T + self.translation

    def is_identity(self, tol: float = 1e-9) -> bool:
        return bool(np.allclose(self.matrix(), np.eye(4), atol=tol))


def box_to_parent(pose: Pose, center: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and [w,x,y,z] rotation of a box expressed in ``pose``'s parent frame."""
    new_center = quat_to_matrix(pose.rotation) @ np.asarray(center, dtype=np.float64) + pose.translation
    new_rot = quat_multiply(pose.rotation, np.asarray(rotation, dtype=np.float64))
    new_rot /= np.linalg.norm(new_rot)
    return new_center, new_rot


def points_in_boxes(points: np.ndarray, centers: np.ndarray, sizes_lwh: np.ndarray,
                    rotations: np.ndarray) -> np.ndarray:
    """Number of points inside each box.

    ``points`` (N, >=3), ``centers`` (B, 3), ``sizes_lwh`` (B, 3) as (length, width, height), ``rotations`` (B, 4)
    [w,x,y,z]. Points are rotated into each box's frame and tested with closed bounds ``|p| <= size/2``, the same
    inclusive test as ``nuscenes.utils.geometry_utils.points_in_box``.
    """
    rots = quat_to_matrix(np.asarray(rotations, dtype=np.float64).reshape(-1, 4))
    return points_in_boxes_banded(points, centers, sizes_lwh, rots, 0.0)[0]


PAIRS_PER_CHUNK = 1 << 17  # (point, box) candidate pairs tested at a time: ~15 MB of temporaries


def points_in_boxes_banded(points: np.ndarray, centers: np.ndarray, sizes_lwh: np.ndarray,
                           rotation_matrices: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(inside, near) point counts per box: ``inside`` = points with ``|p| <= size/2 - tolerance`` on every
    axis of the box frame, ``near`` = the other points with ``|p| <= size/2 + tolerance`` on every axis (those a
    computation of the same box with other rounding may count either way). ``tolerance`` 0: ``inside`` is the
    closed test of ``points_in_boxes``. ``rotation_matrices`` (B, 3, 3) map box frame → points' frame. Points
    with a non-finite coordinate are in no box (as in the devkit, where every comparison with NaN fails).

    Vectorised over points and boxes. A coarse prefilter first: points are bucketed by x into cells (an O(N)
    radix sort of int16 cell numbers), and each box takes the points of the cells its bounding sphere spans
    (a binary search). Those (point, box) pairs are then tested together, ``PAIRS_PER_CHUNK`` at a time to
    bound memory: bounding cube first, then the box frame for the pairs left. Cost O(N + pairs), no Python
    loop over boxes.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    n_boxes = centers.shape[0]
    inside = np.zeros(n_boxes, dtype=np.int64)
    near = np.zeros(n_boxes, dtype=np.int64)
    xyz = np.asarray(points)[:, :3]
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.all():
        xyz = xyz[finite]
    if n_boxes == 0 or len(xyz) == 0:
        return inside, near
    half = np.asarray(sizes_lwh, dtype=np.float64).reshape(-1, 3) / 2.0
    radius = np.linalg.norm(half, axis=1) + tolerance
    rots = np.asarray(rotation_matrices, dtype=np.float64).reshape(-1, 3, 3)

    x = xyz[:, 0].astype(np.float64)
    x0 = float(x.min())
    cell = max(0.25, (float(x.max()) - x0) / 30000.0)  # cell numbers fit int16
    cells = ((x - x0) / cell).astype(np.int16)
    order = np.argsort(cells, kind="stable")
    sorted_cells = cells[order]
    px, py, pz = (np.ascontiguousarray(xyz[order, k], dtype=np.float64) for k in range(3))  # in cell order
    first = np.clip(np.floor((centers[:, 0] - radius - x0) / cell), -1, 32767).astype(np.int64)
    last = np.clip(np.floor((centers[:, 0] + radius - x0) / cell), -1, 32767).astype(np.int64)
    lo = np.searchsorted(sorted_cells, first, side="left")
    hi = np.searchsorted(sorted_cells, last, side="right")
    lengths = hi - lo
    ends = np.cumsum(lengths)
    cx, cy, cz = centers.T
    r9 = rots.reshape(-1, 9)
    b0 = 0
    while b0 < n_boxes:
        # boxes b0..b1-1 make one chunk (at least one box, however many pairs it has)
        b1 = max(b0 + 1, int(np.searchsorted(ends, ends[b0] - lengths[b0] + PAIRS_PER_CHUNK, side="right")))
        b1 = min(b1, n_boxes)
        counts = lengths[b0:b1]
        total = int(counts.sum())
        b_start = b0
        b0 = b1
        if not total:
            continue
        box = np.repeat(np.arange(b_start, b1), counts)
        pos = np.arange(total) - np.repeat(np.cumsum(counts) - counts - lo[b_start:b1], counts)
        # bounding cube of each box's sphere
        r = radius[box]
        dx, dy, dz = px[pos] - cx[box], py[pos] - cy[box], pz[pos] - cz[box]
        keep = np.flatnonzero((np.abs(dx) <= r) & (np.abs(dy) <= r) & (np.abs(dz) <= r))
        box, dx, dy, dz = box[keep], dx[keep], dy[keep], dz[keep]
        # box frame: local = R^T @ d, one axis at a time
        rot, h = r9[box], half[box]
        ok_in = np.ones(len(box), dtype=bool)
        ok_near = np.ones(len(box), dtype=bool)
        for k in range(3):
            local = np.abs(dx * rot[:, k] + dy * rot[:, 3 + k] + dz * rot[:, 6 + k])
            ok_in &= local <= h[:, k] - tolerance
            ok_near &= local <= h[:, k] + tolerance
        inside += np.bincount(box[ok_in], minlength=n_boxes)
        near += np.bincount(box[ok_near & ~ok_in], minlength=n_boxes)
    return inside, near
