"""The deployment files run the commands the tests run.

``start_celery.sh`` / ``stop_celery.sh`` start and stop a real worker and beat on the session's Redis (pid
files, logs, warm shutdown), and the processes they start run exactly ``worker_command()`` /
``beat_command()``, the command lines the session's worker fixture is built from; ``docker-compose.yml`` and
``configs/supervisord.conf`` run those same ``nextpoints-export`` commands, and their API command serves.
"""
from __future__ import annotations

import configparser
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import yaml

from conftest import REPO_ROOT, wait_until

CLI = Path(sys.executable).parent / "nextpoints-export"  # the console script installed beside this Python


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_start_and_stop_scripts_run_a_worker_and_beat_on_the_configured_broker(pipeline_env, celery_worker,
                                                                                 tmp_path):
    from pipeline.celery_app import app
    from pipeline.cli import beat_command, worker_command
    from pipeline.settings import QUEUES

    run_dir = tmp_path / "run"
    env = {**pipeline_env.env, "NPX_RUN_DIR": str(run_dir), "NPX_CLI": str(CLI),
           "CELERY_WORKER_CONCURRENCY": "1", "NPX_STOP_TIMEOUT": "30"}
    started = subprocess.run(["bash", "start_celery.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
    pids: dict[str, int] = {}
    try:
        assert started.returncode == 0, started.stderr
        pids = {name: int((run_dir / f"{name}.pid").read_text()) for name in ("worker", "beat")}

        def new_worker():
            return [name for reply in app.control.ping(timeout=1) for name in reply
                    if name != celery_worker.hostname]

        [hostname] = wait_until(new_worker, 60, 0.5, what="the started worker to answer a ping")
        queues = app.control.inspect(destination=[hostname], timeout=5).active_queues()[hostname]
        assert {q["name"] for q in queues} == set(QUEUES)
        wait_until(lambda: "beat: Starting" in (run_dir / "beat.log").read_text(errors="replace"), 60, 0.5,
                   what="beat to start")
        # the pid files name the Celery processes themselves, running the fixture's command lines
        tail = lambda cmd: cmd[cmd.index("pipeline.celery_app"):]  # noqa: E731 - the interpreter's path aside
        assert tail(psutil.Process(pids["worker"]).cmdline()) == tail(worker_command(1))
        beat_cmdline = psutil.Process(pids["beat"]).cmdline()
        assert tail(beat_cmdline)[:4] == tail(beat_command(Path("x")))[:4]  # schedule file: the export root's
        assert beat_cmdline[-1].startswith(str(pipeline_env.export_root))
        # a second start finds them running and starts nothing
        again = subprocess.run(["bash", "start_celery.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout
    finally:
        stopped = subprocess.run(["bash", "stop_celery.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGKILL" not in stopped.stdout  # warm shutdown within the timeout
    assert not list(run_dir.glob("*.pid"))
    wait_until(lambda: not any(_alive(pid) for pid in pids.values()), 30, 0.2, what="worker and beat to exit")
    assert celery_worker.hostname in {name for reply in app.control.ping(timeout=1) for name in reply}


def _compose_commands() -> dict[str, list[str]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return {name: service.get("command") for name, service in compose["services"].items()}


def _supervisor_commands() -> dict[str, list[str]]:
    conf = configparser.RawConfigParser()
    conf.read(REPO_ROOT / "configs" / "supervisord.conf")
    return {section.removeprefix("program:"): shlex.split(conf[section]["command"])
            for section in conf.sections() if section.startswith("program:")}


def test_compose_and_supervisor_run_the_scripts_commands():
    compose, supervisor = _compose_commands(), _supervisor_commands()
    assert compose["worker"] == ["nextpoints-export", "worker"]  # what start_celery.sh runs (its $NPX)
    assert compose["beat"] == ["nextpoints-export", "beat"]
    assert compose["flower"][:2] == ["nextpoints-export", "flower"]
    assert {"redis", "api", "worker", "beat", "flower"} <= set(compose)
    for name in ("worker", "beat", "flower", "api"):
        assert supervisor[name] == compose[name], name
    script = (REPO_ROOT / "start_celery.sh").read_text()
    assert "start worker worker" in script and "start beat beat" in script and "start flower flower" in script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api_command_of_compose_and_supervisor_serves(pipeline_env, tmp_path):
    command = _compose_commands()["api"]
    assert command[:2] == ["uvicorn", "api.main:app"]
    port = _free_port()
    args = list(command[2:])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        api = subprocess.Popen([sys.executable, "-m", *command[:2], *args], cwd=REPO_ROOT, env=pipeline_env.env,
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, 60, 0.2, what=f"the API to serve; log: {log}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=5) as response:  # OpenAPI UI
            assert response.status == 200 and b"swagger" in response.read().lower()
    finally:
        api.terminate()
        api.wait(30)
