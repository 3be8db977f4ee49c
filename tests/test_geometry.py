"""points_in_boxes against the devkit's points_in_box, box by box: arbitrary 3D rotations, non-finite points,
boxes spanning many x-cells, and chunks of candidate pairs small enough that boxes are split over many chunks."""
from __future__ import annotations

import numpy as np
import pytest
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion

import stages.geometry as geometry
from stages.geometry import points_in_boxes, points_in_boxes_banded


def _scene(seed: int, n_points: int, n_boxes: int):
    rng = np.random.default_rng(seed)
    points = (rng.normal(size=(n_points, 4)) * [25, 25, 2, 1]).astype(np.float32)
    centers = rng.normal(size=(n_boxes, 3)) * [20, 20, 1]
    centers[:3] += [500, -500, 0]  # a few boxes far from every point
    sizes_lwh = rng.uniform(0.3, 12.0, size=(n_boxes, 3))
    quats = rng.normal(size=(n_boxes, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)  # [w, x, y, z]: any 3D rotation
    return points, centers, sizes_lwh, quats


def _devkit_counts(points, centers, sizes_lwh, quats):
    xyz = points[:, :3].T.astype(np.float64)
    return np.array([
        points_in_box(Box(c, [s[1], s[0], s[2]], Quaternion(q)), xyz).sum()
        for c, s, q in zip(centers, sizes_lwh, quats)])


@pytest.mark.parametrize("pairs_per_chunk", [geometry.PAIRS_PER_CHUNK, 997])
def test_counts_equal_the_devkit(monkeypatch, pairs_per_chunk):
    monkeypatch.setattr(geometry, "PAIRS_PER_CHUNK", pairs_per_chunk)
    points, centers, sizes, quats = _scene(1, 50_000, 60)
    counts = points_in_boxes(points, centers, sizes, quats)
    expected = _devkit_counts(points, centers, sizes, quats)
    assert expected.sum() > 1000 and (expected == 0).any()  # the scene has full and empty boxes
    np.testing.assert_array_equal(counts, expected)


def test_non_finite_points_are_in_no_box():
    points, centers, sizes, quats = _scene(2, 5_000, 10)
    clean = points_in_boxes(points, centers, sizes, quats)
    spoiled = np.concatenate([points, np.array([[np.nan, 0, 0, 1], [0, np.inf, 0, 1], [*centers[0], 1]],
                                               dtype=np.float32)])
    counts = points_in_boxes(spoiled, centers, sizes, quats)
    assert counts[0] == clean[0] + 1  # the finite point at box 0's centre counts; NaN/inf ones nowhere
    np.testing.assert_array_equal(counts[1:], clean[1:])


def test_band_splits_points_near_a_face():
    points = np.array([[0.5, 0, 0], [0.5 + 5e-7, 0, 0], [0.5 - 5e-7, 0, 0], [0.4, 0, 0], [0.6, 0, 0]],
                      dtype=np.float64)
    inside, near = points_in_boxes_banded(points, np.zeros((1, 3)), np.ones((1, 3)), np.eye(3)[None], 1e-6)
    assert (inside[0], near[0]) == (1, 3)  # only 0.4 is surely inside; the three within 1e-6 of the face are near
    assert points_in_boxes(points, np.zeros((1, 3)), np.ones((1, 3)), [[1, 0, 0, 0]])[0] == 3  # closed test: 0.4, 0.5, 0.5-
