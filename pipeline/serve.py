"""``nextpoints-export serve``: the whole service in one command on a fresh machine.

Starts a private Redis (unless ``CELERY_BROKER_URL`` is set), a worker and beat as child processes (the same
command lines as ``nextpoints-export worker|beat``), then the HTTP API in this process with uvicorn. With no
data root at all it generates a demo project ``my_project`` under ``EXPORT_ROOT/demo-data``. Ctrl-C or
SIGTERM stops the API, then the children (warm shutdown first, so running batches are handed back to the
queue), then Redis. If a child dies, the whole service stops rather than limp on without workers.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import structlog

from pipeline.cli import beat_command, worker_command

log = structlog.get_logger("pipeline.serve")
DEMO_PROJECT, DEMO_FRAMES = "my_project", 40


def demo_data(export_root: Path) -> Path:
    from stages.synth import generate_project

    root = export_root / "demo-data"
    if not (root / DEMO_PROJECT / "nextpoints").is_dir():
        log.info("generating the demo project", project=DEMO_PROJECT, frames=DEMO_FRAMES, root=str(root))
        generate_project(root, DEMO_PROJECT, DEMO_FRAMES)
    return root


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def stop_child(child: subprocess.Popen, name: str) -> None:
    """Warm shutdown (finish or hand back running tasks), then cold (SIGQUIT), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
        if child.poll() is not None:
            break
        try:  # TERM/QUIT to the main process (Celery stops its pool itself); KILL to the whole group
            os.killpg(child.pid, sig) if sig == signal.SIGKILL else child.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            child.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    log.info("child stopped", child=name, returncode=child.returncode)


def _watch(children: dict[str, subprocess.Popen], stopping: threading.Event, died: list[str]) -> None:
    """Stop the service (SIGTERM to ourselves: uvicorn shuts down) as soon as a child exits by itself."""
    while not stopping.wait(1.0):
        for name, child in children.items():
            if child.poll() is not None:
                died.append(name)
                log.error("child exited, stopping the service", child=name, returncode=child.returncode)
                os.kill(os.getpid(), signal.SIGTERM)
                return


def serve(*, data_root: Path | None = None, export_root: Path | None = None, host: str = "127.0.0.1",
          port: int = 8000, concurrency: int | None = None, loglevel: str = "info") -> int:
    from pipeline.logging import configure_logging
    from pipeline.runner import local_pipeline, set_roots
    from pipeline.settings import get_settings

    # until uvicorn installs its own handlers, SIGTERM unwinds like Ctrl-C (so `finally` stops the children)
    signal.signal(signal.SIGTERM, _interrupt)
    set_roots(export_root=export_root)
    configure_logging(get_settings().log_format, loglevel)
    if data_root is None and "NPX_DATA_ROOT" not in os.environ:
        data_root = demo_data(get_settings().export_root.resolve())
    set_roots(data_root=data_root)

    children: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    died: list[str] = []
    try:
        with local_pipeline():  # the configured broker, or the embedded Redis until the children have stopped
            try:
                settings = get_settings()
                log.info("serving", data_root=str(settings.data_root), export_root=str(settings.export_root),
                         broker=settings.broker_url, host=host, port=port)
                # own sessions: a terminal's Ctrl-C reaches only us, and we stop the children in order
                children["worker"] = subprocess.Popen(worker_command(concurrency, loglevel), start_new_session=True)
                children["beat"] = subprocess.Popen(beat_command(loglevel=loglevel), start_new_session=True)
                threading.Thread(target=_watch, args=(children, stopping, died), daemon=True).start()
                import uvicorn

                uvicorn.run("api.main:app", host=host, port=port, log_config=None, log_level=loglevel)
            finally:
                stopping.set()
                for name, child in reversed(children.items()):
                    stop_child(child, name)
    except KeyboardInterrupt:
        pass
    return 1 if died else 0
