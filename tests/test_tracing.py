"""Structured log tracing: one export's whole trace, from the HTTP request in a real API process (uvicorn, JSON
logs) to the last task in the real worker process, is one filter away: ``select(.export_id == "<id>")``.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT, wait_until

PROJECT = "trace-6"
STAGES = ("discover", "convert", "merge", "compress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            is_json = response.headers.get("content-type", "").startswith("application/json")
            return response.status, dict(response.headers), json.loads(raw) if is_json else {}
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}, {}


def configured_process(log_format: str, code: str) -> subprocess.CompletedProcess:
    """``code`` run in a fresh process (stderr not a terminal) with ``NPX_LOG_FORMAT=log_format``, its logging
    configured as the API and the workers configure theirs."""
    script = ("from pipeline.logging import configure_logging\nfrom pipeline.settings import get_settings\n"
              f"configure_logging(get_settings().log_format)\n{code}")
    env = {"NPX_LOG_FORMAT": log_format, "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def json_lines(path: Path) -> tuple[list[dict], list[str]]:
    """(JSON log lines, other lines) of a log file."""
    parsed, other = [], []
    for text in path.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            parsed.append(json.loads(text))
        elif text.strip():
            other.append(text)
    return parsed, other


@pytest.fixture(scope="module")
def traced_export(pipeline_env, celery_worker, tmp_path_factory) -> dict:
    """One export through a real API process (``uvicorn api.main:app``, NPX_LOG_FORMAT=json) and the session's
    worker: started, polled until completed, downloaded; then the API is stopped and both logs are read."""
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, PROJECT, 6, cameras=2, seed=4)
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as out:
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                                str(port)], env=pipeline_env.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: api.poll() is not None or _http("GET", f"{base}/healthz")[0] == 200, 60, 0.2,
                   what="the API to answer /healthz")
        assert api.poll() is None, log_path.read_text()[-3000:]
        code, headers, created = _http("POST", f"{base}/api/projects/{PROJECT}/export/nuscenes", {})
        assert code == 202, created
        export_id = created["task_id"]

        def finished():
            status = _http("GET", f"{base}/api/projects/export/tasks/{export_id}")[2]
            return status if status.get("status") in ("completed", "failed", "cancelled") else None

        final = wait_until(finished, 120, 0.2, what="the export to finish")
        assert final["status"] == "completed", final
        assert _http("GET", f"{base}/api/projects/export/download/{export_id}")[0] == 200
        wait_until(lambda: any(line.get("export_id") == export_id and line["event"].startswith("Task export.compress")
                               for line in json_lines(celery_worker.log_path)[0]), 30, 0.1,
                   what="the worker to log the last task's end")
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(30)
    api_lines, api_other = json_lines(log_path)
    worker_lines, _ = json_lines(celery_worker.log_path)
    return {"id": export_id, "headers": headers, "api": api_lines, "api_other": api_other, "worker": worker_lines}


def test_every_line_of_the_api_process_is_structured_json(traced_export):
    assert traced_export["api_other"] == []
    loggers = {line["logger"] for line in traced_export["api"]}
    assert {"api", "pipeline.service", "uvicorn.error", "uvicorn.access"} <= loggers


def test_the_api_lines_of_an_export_carry_its_id_from_the_first_request_on(traced_export):
    export_id = traced_export["id"]
    assert traced_export["headers"].get("x-export-id") == export_id
    mine = [line for line in traced_export["api"] if export_id in json.dumps(line)]
    assert mine and all(line.get("export_id") == export_id for line in mine)
    traced = [line for line in traced_export["api"] if line.get("export_id") == export_id]
    requests = [(line["method"], line["status"]) for line in traced if line["event"] == "request"]
    assert requests[0] == ("POST", 202) and ("GET", 200) in requests and requests[-1] == ("GET", 200)
    assert any(line["event"] == "export queued" for line in traced)
    # uvicorn's access line of the POST names no export in its text; it is tagged all the same
    assert any(line["logger"] == "uvicorn.access" and "POST" in line["event"] for line in traced)


def test_the_worker_lines_of_an_export_carry_its_id_stage_batch_and_frame(traced_export):
    export_id = traced_export["id"]
    mine = [line for line in traced_export["worker"] if export_id in json.dumps(line)]
    assert mine and all(line.get("export_id") == export_id for line in mine)
    for stage in STAGES:
        for event in ("stage started", "stage finished"):
            assert any(line["event"] == event and line.get("stage") == stage for line in mine), (stage, event)
    assert all("batch" in line for line in mine if line.get("stage") == "convert")
    frame_lines = [line for line in mine if line.get("frame")]
    assert frame_lines and all(line["stage"] == "convert" and "batch" in line for line in frame_lines)
    celery_lines = {line["event"].split("[")[0] for line in mine if line["logger"].startswith("celery")}
    assert {f"Task export.{stage}" for stage in STAGES} <= celery_lines


def test_one_filter_gives_the_whole_trace_in_order(traced_export):
    """``jq 'select(.export_id == "<id>")'`` over both processes' logs, sorted by time."""
    export_id = traced_export["id"]
    trace = sorted((line for line in traced_export["api"] + traced_export["worker"]
                    if line.get("export_id") == export_id), key=lambda line: line["timestamp"])
    events = [(line["logger"], line["event"], line.get("stage")) for line in trace]
    first_post = next(i for i, (logger, event, _) in enumerate(events) if logger == "pipeline.service")
    compress_end = max(i for i, e in enumerate(events) if e[1:] == ("stage finished", "compress"))
    discover_start = events.index(("pipeline.tasks", "stage started", "discover"))
    assert first_post < discover_start < compress_end


def test_a_python_warning_in_a_configured_process_is_a_json_log_line():
    """Celery's SecurityWarning (pickle accepted...) and deprecations are log lines like any other."""
    done = configured_process("json", "import warnings\nfrom celery.exceptions import SecurityWarning\n"
                                      "warnings.warn('you have enabled pickle', SecurityWarning)\n")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines
    [warning] = [json.loads(line) for line in lines]
    assert warning["logger"] == "py.warnings" and warning["level"] == "warning"
    assert "SecurityWarning: you have enabled pickle" in warning["event"]


def test_the_console_format_writes_readable_lines_that_still_name_the_export():
    export_id = "0c0ffee0-0000-4000-8000-000000000001"
    done = configured_process("console", f"""\
import logging, structlog
structlog.contextvars.bind_contextvars(export_id={export_id!r}, stage="convert")
structlog.get_logger("pipeline.tasks").info("stage started", batch=3)
logging.getLogger("celery.app.trace").info("Task export.convert[{export_id}-convert-00003] succeeded")
""")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and not any(line.lstrip().startswith("{") for line in lines), lines
    assert not any("\x1b[" in line for line in lines)  # no colour codes when stderr is not a terminal
    ours, celery = lines
    assert "stage started" in ours and f"export_id={export_id}" in ours and "batch=3" in ours
    assert "[pipeline.tasks]" in ours and "info" in ours
    assert "Task export.convert" in celery and f"export_id={export_id}" in celery


def test_a_celery_task_line_names_its_own_export_whatever_context_is_bound():
    """The worker's main process logs "Task export.convert[<id>-convert-00003] received" for every export; a
    context left bound there (e.g. by a lost-task report of another export) must not relabel the line."""
    from pipeline.logging import add_export_id_from_task_line

    mine, other = "4a61608a-3ba0-4063-aaa8-2a967db7ef4b", "72f1cfae-00c3-4336-9030-000000000000"
    line = {"event": f"Task export.convert[{mine}-convert-00003] received", "export_id": other}
    assert add_export_id_from_task_line(None, "info", line)["export_id"] == mine
    unrelated = {"event": "stage started", "export_id": other}
    assert add_export_id_from_task_line(None, "info", unrelated)["export_id"] == other
