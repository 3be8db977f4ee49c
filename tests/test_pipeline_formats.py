"""Issue 4 through the service: a KITTI export runs through the same Celery DAG, and the job record reports what
each annotation filter removed. Real redis-server and worker from conftest.py."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from stages.request import ExportRequest
from test_pipeline import follow

pytestmark = pytest.mark.usefixtures("celery_worker")
FRAMES = 12


@pytest.fixture(scope="module")
def project(pipeline_env) -> str:
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, "formats-12", FRAMES, cameras=2, seed=3)
    return "formats-12"


def labels(pipeline_env, project: str) -> list[dict]:
    root = pipeline_env.data_root / project / "nextpoints" / "label"
    return [o for p in root.glob("*.json") for o in json.loads(p.read_text())]


def test_a_kitti_export_runs_through_the_pipeline_and_counts_its_boxes(pipeline_env, project, tmp_path):
    from pipeline import service

    request = ExportRequest.model_validate({"export_format": "kitti",
                                            "export_options": {"output_format": "tar.gz"}})
    started = service.start_export(project, request, export_format="kitti")
    final = follow(started["task_id"])[-1]
    assert final["status"] == "completed", final
    assert final["total_frames_processed"] == FRAMES
    archive = Path(service.archive_for_download(started["task_id"]))
    assert archive.name.endswith(".tar.gz")
    with tarfile.open(archive, "r:gz") as tf:
        tf.extractall(tmp_path / "kitti", filter="data")
    label_lines = [line for p in (tmp_path / "kitti" / "training" / "label_2").glob("*.txt")
                   for line in p.read_text().splitlines() if line and not line.startswith("DontCare")]
    assert len(sorted((tmp_path / "kitti" / "training" / "velodyne").glob("*.bin"))) == FRAMES
    assert final["total_annotations_exported"] == len(label_lines) > 0


def test_the_job_reports_what_each_filter_removed(pipeline_env, project):
    from pipeline import service

    request = ExportRequest.model_validate({"annotation_filter": {
        "object_types": ["car", "truck", "van", "pedestrian"],
        "bbox_size_filter": {"max_length": 6.0}}})
    started = service.start_export(project, request, export_format="nuscenes_v1.0")
    final = follow(started["task_id"])[-1]
    assert final["status"] == "completed", final
    objs = labels(pipeline_env, project)
    by_type = [o for o in objs if o["obj_type"] in ("car", "truck", "van", "pedestrian")]
    by_size = [o for o in by_type if o["psr"]["scale"]["x"] <= 6.0]
    assert 0 < len(by_size) < len(by_type) < len(objs)
    assert final["filtered"] == {"object_types": len(objs) - len(by_type),
                                 "bbox_size_filter": len(by_type) - len(by_size)}
    assert final["total_annotations_exported"] == len(by_size)
