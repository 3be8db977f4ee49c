"""The HTTP API, through FastAPI's TestClient, against the session's real Redis and real worker (conftest.py).

No assertion depends on how fast the worker is: an export that must not have finished is a job record whose
workflow was never sent (``queued_export``), and exports that must finish are polled with a deadline.
"""
from __future__ import annotations

import io
import json
import logging
import re
import uuid
import zipfile
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from conftest import wait_until

# The request body of NextPoints' CELERY_EXPORT_GUIDE.md, verbatim.
GUIDE_BODY = {
    "export_format": "nuscenes_v1.0",
    "coordinate_system": "ego_vehicle",
    "frame_selection": {"frame_step": 1, "max_frames": 100},
    "annotation_filter": {"object_types": ["car", "pedestrian", "bicycle"], "min_points": 10},
    "export_options": {"include_images": True, "include_pointcloud": True, "compress_output": True},
}
# The same request in ExportRequest's own (flat) frame selection.
BODY = {**{k: v for k, v in GUIDE_BODY.items() if k != "frame_selection"}, **GUIDE_BODY["frame_selection"]}
PROJECT = "api-project"
FINISHED = {"completed", "failed", "cancelled"}
EXPORT_TIMEOUT = 180  # s, deadline for one small export on the session worker


@pytest.fixture(scope="module")
def project(pipeline_env) -> str:
    """A 6-frame, 2-camera NextPoints project in the data root."""
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, PROJECT, 6, cameras=2, seed=1)
    return PROJECT


@pytest.fixture(scope="module")
def client(pipeline_env):
    from api.main import app

    with TestClient(app) as test_client:  # runs the lifespan: logging configured once
        yield test_client


def queued_export(project: str) -> str:
    """The job record of an export still waiting for a worker (its workflow is never sent), so that tests of
    "not finished yet" do not race the session's worker."""
    from pipeline.jobs import ExportJob, job_store
    from stages.request import ExportRequest

    export_id = str(uuid.uuid4())
    job_store().create(ExportJob(export_id=export_id, project=project, export_format="nuscenes_v1.0",
                                 request=ExportRequest().model_dump(mode="json"), message="Export queued"))
    return export_id


def start(client, project: str, body: dict | None = None, fmt: str = "nuscenes") -> dict:
    response = client.post(f"/api/projects/{project}/export/{fmt}", json=BODY if body is None else body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_finished(client, task_id: str) -> dict:
    def finished():
        status = client.get(f"/api/projects/export/tasks/{task_id}").json()
        return status if status["status"] in FINISHED else None

    return wait_until(finished, timeout=EXPORT_TIMEOUT, interval=0.2, what=f"export {task_id} to finish")


@pytest.fixture(scope="module")
def completed_export(client, project, celery_worker) -> dict:
    """A finished zip export of the project: its final status."""
    body = {"coordinate_system": "global", "export_options": {"output_format": "zip"}}
    status = wait_finished(client, start(client, project, body)["task_id"])
    assert status["status"] == "completed", status
    return status


# --- starting and polling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [GUIDE_BODY, BODY], ids=["guide", "flat"])
def test_the_guides_request_starts_an_export_and_the_status_reflects_it(client, project, body):
    created = start(client, project, body)
    assert created["status"] == "pending"
    assert set(created) == {"task_id", "status", "message", "created_at", "estimated_duration"}
    assert created["estimated_duration"] > 0

    response = client.get(f"/api/projects/export/tasks/{created['task_id']}")
    assert response.status_code == 200
    status = response.json()
    assert status["task_id"] == created["task_id"]
    assert status["status"] in {"pending", "processing", "completed"}, status
    assert 0 <= status["progress"] <= 100
    assert status["created_at"] == created["created_at"]
    assert status["project"] == project and status["export_format"] == "nuscenes_v1.0"
    for key in ("current_step", "message", "started_at", "completed_at", "file_size", "total_frames_processed",
                "total_annotations_exported", "error_details"):
        assert key in status


# The body of the README's curl example (global frame, cars and pedestrians, min_points 5).
README_BODY = {"export_format": "nuscenes_v1.0", "coordinate_system": "global",
               "annotation_filter": {"object_types": ["car", "pedestrian"], "min_points": 5},
               "export_options": {"include_images": True, "include_pointcloud": True, "compress_output": True}}


@pytest.fixture(scope="module")
def project_50(pipeline_env) -> str:
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, "api-drive-50", 50, cameras=6, seed=3)
    return "api-drive-50"


@pytest.mark.parametrize("body", [GUIDE_BODY, README_BODY], ids=["guide", "readme"])
def test_the_guides_body_on_50_frames_completes_and_the_download_loads_in_the_devkit(client, pipeline_env,
                                                                                      celery_worker, tmp_path,
                                                                                      project_50, body):
    """Over HTTP end to end: POST, poll (progress never decreases, 100 exactly at completed, the step names
    frame counts), download, unpack, ``NuScenes()`` with the expected sample and annotation counts."""
    from nuscenes import NuScenes

    project_dir = pipeline_env.data_root / project_50 / "nextpoints"
    labels = [obj for p in sorted((project_dir / "label").glob("*.json")) for obj in json.loads(p.read_text())]
    types = body["annotation_filter"]["object_types"]
    min_points = body["annotation_filter"]["min_points"]
    wanted = [obj for obj in labels if obj["obj_type"] in types]

    task_id = start(client, project_50, body)["task_id"]
    seen = []

    def finished():
        seen.append(client.get(f"/api/projects/export/tasks/{task_id}").json())
        return seen[-1] if seen[-1]["status"] in FINISHED else None

    final = wait_until(finished, timeout=EXPORT_TIMEOUT, interval=0.05, what="the 50-frame export")
    assert final["status"] == "completed", final
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress) and progress[-1] == 100
    assert all(s["progress"] < 100 for s in seen if s["status"] != "completed")
    assert any(re.fullmatch(r"Processing frame \d+/50", s["current_step"]) for s in seen), \
        [s["current_step"] for s in seen]

    response = client.get(f"/api/projects/export/download/{task_id}")
    assert response.status_code == 200 and int(response.headers["content-length"]) == len(response.content)
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        zf.extractall(tmp_path / "dataset")
    nusc = NuScenes(version="v1.0-trainval", dataroot=str(tmp_path / "dataset"), verbose=False)
    assert len(nusc.sample) == final["total_frames_processed"] == 50
    assert len(nusc.sample_annotation) == final["total_annotations_exported"] > 0
    # every label of the asked types is exported or counted as removed by min_points; nothing else is exported
    assert final["total_annotations_exported"] + final["filtered"].get("min_points", 0) == len(wanted)
    assert final["filtered"]["object_types"] == len(labels) - len(wanted)
    categories = {nusc.get("category", nusc.get("instance", a["instance_token"])["category_token"])["name"]
                  for a in nusc.sample_annotation}
    official = {"car": "vehicle.car", "pedestrian": "human.pedestrian.adult", "bicycle": "vehicle.bicycle"}
    assert categories <= {official[t] for t in types} and len(categories) >= 2
    assert min(a["num_lidar_pts"] for a in nusc.sample_annotation) >= min_points


def test_the_path_fixes_the_format_and_a_body_asking_for_another_is_refused(client, project):
    created = start(client, project, {"coordinate_system": "lidar", "max_frames": 1}, fmt="kitti")
    assert client.get(f"/api/projects/export/tasks/{created['task_id']}").json()["export_format"] == "kitti"

    response = client.post(f"/api/projects/{project}/export/nuscenes", json={"export_format": "kitti"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "export_format"]


def test_a_project_that_does_not_exist_is_404(client, pipeline_env):
    response = client.post("/api/projects/no-such-project/export/nuscenes", json={})
    assert response.status_code == 404
    assert "no-such-project" in response.json()["detail"]


@pytest.mark.parametrize("method, path", [
    ("get", "/api/projects/export/tasks/{id}"),
    ("delete", "/api/projects/export/tasks/{id}"),
    ("get", "/api/projects/export/download/{id}"),
])
def test_an_unknown_task_is_404(client, method, path):
    unknown = "00000000-0000-4000-8000-000000000000"
    response = getattr(client, method)(path.format(id=unknown))
    assert response.status_code == 404
    assert unknown in response.json()["detail"]


@pytest.mark.parametrize("method, path", [
    ("get", "/api/projects/export/tasks/{id}"),
    ("delete", "/api/projects/export/tasks/{id}"),
    ("get", "/api/projects/export/download/{id}"),
])
def test_a_task_id_that_addresses_another_redis_key_is_404(client, project, method, path):
    """``<id>:stop`` is the stop flag of a real export (a string key, not a job hash): it names no export."""
    real = start(client, project, {"max_frames": 1})["task_id"]
    client.delete(f"/api/projects/export/tasks/{real}")  # cancelled: its stop flag exists now
    for hostile in (f"{real}:stop", "*", "..%2F..%2Fetc"):
        response = getattr(client, method)(path.format(id=hostile))
        assert response.status_code == 404, (hostile, response.status_code, response.text)
        assert "detail" in response.json()


@pytest.mark.parametrize("body, loc", [
    ({"annotation_filter": {"min_points": -1}}, ["body", "annotation_filter", "min_points"]),
    ({"export_options": {"compres_output": True}}, ["body", "export_options", "compres_output"]),
    ({"priority": 11}, ["body", "priority"]),
    ({"export_options": {"output_format": "rar"}}, ["body", "export_options", "output_format"]),
    ({"frame_step": 0}, ["body", "frame_step"]),
])
def test_an_invalid_body_is_422_naming_the_field(client, project, body, loc):
    response = client.post(f"/api/projects/{project}/export/nuscenes", json=body)
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [loc]


def test_a_request_the_format_cannot_honour_is_422_with_the_reason(client, project):
    response = client.post(f"/api/projects/{project}/export/nuscenes", json={"coordinate_system": "lidar"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "coordinate_system"] and "coordinate_system" in error["msg"]


def test_a_kitti_export_in_global_coordinates_is_422_saying_why(client, project):
    response = client.post(f"/api/projects/{project}/export/kitti", json={"coordinate_system": "global"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "coordinate_system"] and "KITTI has no global frame" in error["msg"]
    # left unset, each format uses its own natural frame
    assert client.post(f"/api/projects/{project}/export/kitti", json={}).status_code == 202


@pytest.mark.parametrize("raw_project", [
    "%2E%2E",                      # ".." once decoded: the data root's parent
    "..%2Foutside",                # "../outside", a real project beside the data root
    "..%2F..%2Fetc",
    "%2E%2E%2Foutside",
    "..%5Coutside",                # backslash
    "outside%00",
    ".hidden",
    "a%20b",
])
def test_a_hostile_project_name_is_refused_and_touches_nothing_outside_the_data_root(
        client, pipeline_env, raw_project):
    from stages.synth import generate_project

    root = pipeline_env.root  # the data root's parent: make "../outside" and ".." real projects
    if not (root / "outside").exists():
        generate_project(root, "outside", 2, cameras=1)
        generate_project(root.parent, root.name, 2, cameras=1)
    total_before = client.get("/api/projects/export/tasks").json()["total"]

    for path in (f"/api/projects/{raw_project}/export/nuscenes", f"/api/projects/{raw_project}/export/kitti",
                 "/api/projects/a/../../outside/export/nuscenes"):
        response = client.post(path, json={})
        assert response.status_code in (404, 422), (path, response.status_code, response.text)

    assert client.get("/api/projects/export/tasks").json()["total"] == total_before  # no export was started


# --- download and cancel -------------------------------------------------------------------------------------

def test_download_before_completion_is_409(client, project):
    task_id = queued_export(project)
    response = client.get(f"/api/projects/export/download/{task_id}")
    assert response.status_code == 409
    assert "pending" in response.json()["detail"]


def test_a_queued_export_can_be_cancelled_once(client, project):
    task_id = queued_export(project)
    cancelled = client.delete(f"/api/projects/export/tasks/{task_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["completed_at"]
    again = client.delete(f"/api/projects/export/tasks/{task_id}")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert client.get(f"/api/projects/export/download/{task_id}").status_code == 409


def test_a_completed_export_downloads_as_a_zip_named_after_project_and_task(client, completed_export,
                                                                            pipeline_env):
    task_id = completed_export["task_id"]
    response = client.get(f"/api/projects/export/download/{task_id}")
    assert response.status_code == 200
    archive = pipeline_env.export_root / f"{task_id}.zip"
    assert int(response.headers["content-length"]) == archive.stat().st_size == completed_export["file_size"]
    assert response.headers["content-type"] == "application/zip"
    assert f'filename="{PROJECT}_{task_id}.zip"' in response.headers["content-disposition"]
    assert response.content == archive.read_bytes()
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        assert zf.testzip() is None
        assert any(name.endswith("manifest.json") for name in zf.namelist())


def test_cancelling_a_completed_export_is_409_and_keeps_it(client, completed_export):
    task_id = completed_export["task_id"]
    response = client.delete(f"/api/projects/export/tasks/{task_id}")
    assert response.status_code == 409
    assert "completed" in response.json()["detail"]
    assert client.get(f"/api/projects/export/tasks/{task_id}").json()["status"] == "completed"
    assert client.get(f"/api/projects/export/download/{task_id}").status_code == 200


def test_an_uncompressed_export_is_a_folder_and_downloading_it_is_409(client, project, celery_worker):
    body = {"coordinate_system": "global", "max_frames": 2,
            "export_options": {"compress_output": False, "include_images": False}}
    status = wait_finished(client, start(client, project, body)["task_id"])
    assert status["status"] == "completed", status
    response = client.get(f"/api/projects/export/download/{status['task_id']}")
    assert response.status_code == 409
    assert "compress_output=false" in response.json()["detail"]


# --- listing ---------------------------------------------------------------------------------------------------

def test_the_list_is_newest_first_and_paged(client, project):
    cheap = {"max_frames": 1, "export_options": {"include_images": False}}
    created = [start(client, project, cheap)["task_id"] for _ in range(3)]
    newest_first = created[::-1]

    first = client.get("/api/projects/export/tasks", params={"offset": 0, "limit": 2}).json()
    second = client.get("/api/projects/export/tasks", params={"offset": 2, "limit": 2}).json()
    assert (first["offset"], first["limit"], second["offset"], second["limit"]) == (0, 2, 2, 2)
    assert first["total"] == second["total"] >= 3
    assert [item["task_id"] for item in first["items"]] == newest_first[:2]
    assert second["items"][0]["task_id"] == newest_first[2]
    assert len(second["items"]) == min(2, second["total"] - 2)
    stamps = [item["created_at"] for item in first["items"] + second["items"]]
    assert stamps == sorted(stamps, reverse=True)

    for params in ({"limit": 0}, {"offset": -1}):
        assert client.get("/api/projects/export/tasks", params=params).status_code == 422


# --- health and logging ----------------------------------------------------------------------------------------

def test_healthz_is_200_while_redis_answers(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["redis"] is True


def test_healthz_is_503_when_redis_is_unreachable(client, pipeline_env, monkeypatch, tmp_path):
    from pipeline.celery_app import reconfigure

    dead = f"redis+socket://{tmp_path / 'nobody.sock'}"
    monkeypatch.setenv("CELERY_BROKER_URL", dead)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", dead)
    reconfigure()
    try:
        response = client.get("/healthz")
    finally:
        monkeypatch.undo()
        reconfigure()
    assert response.status_code == 503
    assert response.json()["redis"] is False
    assert client.get("/healthz").status_code == 200


class JsonLines(logging.Handler):
    """Collects the lines the root logger writes, formatted by the app's own formatter."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@contextmanager
def api_log_lines():
    root = logging.getLogger()
    handler = JsonLines(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


def test_every_api_log_line_of_an_export_carries_its_export_id(client, project, monkeypatch):
    import structlog

    from pipeline import service

    real_status = service.export_status

    def export_status_logging_without_context(export_id):  # like any library line logged inside a handler
        structlog.get_logger("probe").info("probe")
        return real_status(export_id)

    monkeypatch.setattr(service, "export_status", export_status_logging_without_context)
    with api_log_lines() as lines:
        created = client.post(f"/api/projects/{project}/export/nuscenes", json={}, headers={"X-Request-ID": "req-1"})
        task_id = created.json()["task_id"]
        polled = client.get(f"/api/projects/export/tasks/{task_id}")
        cancelled = client.delete(f"/api/projects/export/tasks/{task_id}")  # 200, or 409 if it already ended
    assert (created.status_code, polled.status_code) == (202, 200)
    assert created.headers["x-request-id"] == "req-1"

    requests = [line for line in lines if line["event"] == "request"]
    assert [(r["method"], r["status"]) for r in requests] == [("POST", 202), ("GET", 200),
                                                               ("DELETE", cancelled.status_code)]
    assert all(isinstance(r["duration_ms"], float) and r["path"].startswith("/api/projects/") for r in requests)
    assert {line["event"] for line in lines} >= {"request", "export queued", "probe"}
    lines = [line for line in lines if line["logger"] != "httpx"]  # the test client's own lines
    assert all(line.get("export_id") == task_id for line in lines), lines
    assert all(line.get("request_id") for line in lines), lines
    assert requests[0]["request_id"] == "req-1"
