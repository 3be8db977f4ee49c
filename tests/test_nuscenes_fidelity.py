"""What the devkit reads back from a nuScenes export is what the source says, to the last point and the last bit.

The devkit (``NuScenes``, ``get_sample_data``, ``LidarPointCloud``, ``points_in_box``) and pyquaternion are the
reference throughout; the sources are read from their files (JSON, JPEG bytes), not through the exporter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import Box, LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion

from stages.request import ExportOptions, ExportRequest
from stages.serial import run_serial
from stages.sources.sustech import SustechSource

SUSTECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sustech-example"
SUSTECH_AXES = {"lidar_axes": "x_left_y_back"}


def export(project: Path, dest: Path, source_settings: dict | None = None, version: str | None = None, **options):
    request = ExportRequest(export_options=ExportOptions(compress_output=False, **options),
                            **({"version": version} if version else {}))
    run = run_serial(project, dest, request, source_settings=source_settings)
    return run, NuScenes(version=request.version, dataroot=str(dest), verbose=False)


# --- num_lidar_pts: the devkit's recount, box by box, on the real scene ----------------------------------------

@pytest.fixture(scope="module", params=[None, 3], ids=["full-precision", "coordinate_precision-3"])
def real_export(request, tmp_path_factory):
    dest = tmp_path_factory.mktemp("sustech-fidelity") / "dataset"
    return export(SUSTECH, dest, SUSTECH_AXES, coordinate_precision=request.param)


def test_num_lidar_pts_of_every_real_box_is_the_devkits_recount_of_the_written_box(real_export):
    run, nusc = real_export
    source = SustechSource(SUSTECH, SUSTECH_AXES)
    frames = {f.timestamp_us: f for f in source.frames()}
    checked = differs_from_source_box = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        xyz = LidarPointCloud.from_file(path).points[:3]
        ref = frames[sample["timestamp"]]
        labels = source.read_labels(ref)
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert int(points_in_box(box, xyz).sum()) == ann["num_lidar_pts"], (ref.frame_id, ann["token"])
            # the same count with the source box (as labelled, in the lidar frame) can differ by a point on a face
            src = min(labels, key=lambda b: np.linalg.norm(b.center - box.center))
            source_box = Box(src.center, [src.size[1], src.size[0], src.size[2]], Quaternion(*src.rotation))
            differs_from_source_box += int(points_in_box(source_box, xyz).sum()) != ann["num_lidar_pts"]
            checked += 1
    assert checked == run.merged.annotations == len(nusc.sample_annotation) > 80
    assert differs_from_source_box >= 1  # the scene has a point on a face (578 vs 577 points, full precision)
