"""The CLI's operating commands: ``run`` a pipeline config, ``retry`` a failed export from a stage, and
``status`` / ``cancel`` / ``list`` exports, against the configured broker.

With ``CELERY_BROKER_URL`` unset they use the embedded default, as ``serve`` does: a private Redis whose data
lives in ``EXPORT_ROOT/.redis`` (shared with a ``serve`` running on the same export root, else started for the
duration of the command), and, for ``run`` and ``retry``, a worker subprocess logging JSON to
``EXPORT_ROOT/logs/worker.log``. With a broker configured, the deployment's workers do the work.

Exit status: 0 done, 1 the export failed / was cancelled / is unknown, 2 the config or arguments are wrong
(nothing was started), 130 interrupted (the export is cancelled).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import structlog

from pipeline.embedded import EmbeddedRedis, environment_for
from pipeline.jobs import FINISHED

log = structlog.get_logger("pipeline.runner")
POLL_EVERY = 0.25  # seconds between status polls while following an export


@dataclass
class LocalPipeline:
    """What a command started for itself (nothing when a broker is configured)."""

    export_root: Path
    redis: EmbeddedRedis | None = None
    worker: subprocess.Popen | None = None
    worker_log: Path | None = None

    def start_worker(self, concurrency: int | None = None, loglevel: str = "info") -> None:
        """On the embedded Redis: a worker for the rest of the command (queued work waits for it in Redis).
        With a configured broker the deployment's workers are used and nothing is started."""
        from pipeline.cli import worker_command

        if self.redis is None or self.worker is not None:
            return
        self.worker_log = self.export_root / "logs" / "worker.log"
        self.worker_log.parent.mkdir(parents=True, exist_ok=True)
        cmd = worker_command(concurrency, loglevel, f"run-{os.getpid()}@%h")
        env = {**os.environ, "NPX_LOG_FORMAT": os.environ.get("NPX_LOG_FORMAT", "json")}
        with open(self.worker_log, "ab") as out:
            self.worker = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("worker started", log_file=str(self.worker_log), pid=self.worker.pid)

    def worker_died(self) -> int | None:
        """The worker's exit status if it has exited, else None."""
        return None if self.worker is None else self.worker.poll()


def set_roots(data_root: Path | None = None, export_root: Path | None = None) -> None:
    """Point this process (and the children it starts) at these roots; None leaves NPX_* as they are."""
    from pipeline.settings import reset_settings

    if data_root is not None:
        os.environ["NPX_DATA_ROOT"] = str(Path(data_root).resolve())
    if export_root is not None:
        os.environ["NPX_EXPORT_ROOT"] = str(Path(export_root).resolve())
    reset_settings()


@contextmanager
def local_pipeline() -> Iterator[LocalPipeline]:
    """The broker for one command: the configured one, or the embedded Redis for the duration of the block
    (and the worker the block starts with ``start_worker``). The process is reconfigured to use it."""
    from pipeline.celery_app import reconfigure
    from pipeline.serve import stop_child
    from pipeline.settings import get_settings

    export_root = get_settings().export_root.resolve()
    export_root.mkdir(parents=True, exist_ok=True)
    os.environ["NPX_EXPORT_ROOT"] = str(export_root)
    local = LocalPipeline(export_root)
    try:
        if "CELERY_BROKER_URL" not in os.environ:
            local.redis = EmbeddedRedis(export_root / ".redis").start()
            os.environ.update(environment_for(local.redis.url))
        reconfigure()
        yield local
    finally:
        if local.worker is not None:
            stop_child(local.worker, "worker")
        if local.redis is not None:
            local.redis.stop()
            for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
                os.environ.pop(key, None)


# --- following an export --------------------------------------------------------------------------------
class ProgressLine:
    """A live progress line on a terminal (``\\r``-redrawn bar, percent, current step); on anything else one
    plain line whenever the step changes, at most one per second in between."""

    WIDTH = 30

    def __init__(self, out: TextIO = sys.stderr):
        self.out = out
        self.tty = out.isatty()
        self.last_text: str | None = None
        self.last_time = 0.0
        self.drawn = 0

    def show(self, status: dict[str, Any]) -> None:
        percent = float(status.get("progress") or 0.0)
        step = status.get("current_step") or status.get("status") or ""
        if self.tty:
            filled = int(self.WIDTH * percent / 100)
            line = f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:5.1f}%  {step}"
            pad = max(0, self.drawn - len(line))
            self.out.write(line + " " * pad)
            self.drawn = len(line)
            self.out.flush()
            return
        kind = step.split(" ")[0] if step else ""  # "Processing frame 3/40" -> "Processing"
        now = time.monotonic()
        if step != self.last_text and (kind != (self.last_text or "").split(" ")[0] or now - self.last_time >= 1.0):
            self.out.write(f"{percent:5.1f}%  {step}\n")
            self.out.flush()
            self.last_text, self.last_time = step, now

    def close(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\n")
            self.out.flush()


def follow(export_id: str, local: LocalPipeline | None = None, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Poll the export until it has finished, drawing its progress; returns the final status. Raises
    ``RuntimeError`` if the command's own worker dies meanwhile."""
    from pipeline import service

    line = ProgressLine(out)
    try:
        while True:
            status = service.export_status(export_id)
            line.show(status)
            if status["status"] in FINISHED:
                return status
            if local is not None and local.worker_died() is not None:
                raise RuntimeError(f"the worker exited with status {local.worker.returncode}; "
                                   f"see {local.worker_log}")
            time.sleep(POLL_EVERY)
    finally:
        line.close()


def report(status: dict[str, Any], local: LocalPipeline | None = None, out: TextIO = sys.stderr) -> int:
    """Print the outcome: the archive path on stdout when completed (0), else the error on ``out`` (1)."""
    if status["status"] == "completed":
        print(f"export {status['task_id']} completed: {status.get('total_frames_processed')} frames, "
              f"{status.get('total_annotations_exported')} annotations", file=out)
        from pipeline import service

        print(service.archive_for_download(status["task_id"]))
        return 0
    if status["status"] == "cancelled":
        print(f"export {status['task_id']} was cancelled", file=out)
        return 1
    error = status.get("error_details") or {}
    print(f"export {status['task_id']} failed in {error.get('stage') or 'an unknown stage'}: "
          f"{error.get('message') or status.get('message')}", file=out)
    for key in ("error", "frame", "file", "batch", "attempts"):
        if error.get(key) is not None:
            print(f"  {key}: {error[key]}", file=out)
    if error.get("stage") in ("convert", "merge", "compress"):
        print(f"  rerun it with: nextpoints-export retry {status['task_id']} --stage {error['stage']}"
              + (" --only-failed" if error["stage"] == "convert" else ""), file=out)
    if local is not None and local.worker_log is not None:
        print(f"  worker log: {local.worker_log}", file=out)
    return 1


def _follow_and_report(export_id: str, local: LocalPipeline) -> int:
    from pipeline import service

    try:
        return report(follow(export_id, local), local)
    except KeyboardInterrupt:
        print(f"\ninterrupted: cancelling export {export_id}", file=sys.stderr)
        try:
            service.cancel_export(export_id)
        except Exception as exc:  # noqa: BLE001 - it may have just finished
            print(f"(not cancelled: {exc})", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"export {export_id}: {exc}", file=sys.stderr)
        return 1


# --- the commands ---------------------------------------------------------------------------------------
def run_config(config_path: Path, *, data_root: Path | None = None, export_root: Path | None = None,
               concurrency: int | None = None, loglevel: str = "info", detach: bool = False) -> int:
    """``nextpoints-export run CONFIG``: validate the config, then run its export through the pipeline."""
    from pipeline import service
    from pipeline.config import ConfigError, load_config
    from pipeline.errors import PipelineError
    from pipeline.serve import DEMO_PROJECT, demo_data
    from pipeline.settings import get_settings

    try:
        config = load_config(config_path, data_root=data_root)
    except ConfigError as err:
        print(f"invalid config:\n{err}", file=sys.stderr)
        return 2
    set_roots(data_root, export_root)
    if data_root is None and "NPX_DATA_ROOT" not in os.environ:  # a fresh machine: the demo project
        root = get_settings().export_root.resolve() / "demo-data"
        if config.project.name == DEMO_PROJECT and config.project.path is None:
            root = demo_data(get_settings().export_root.resolve())
        set_roots(data_root=root)
    try:
        config.project.locate(get_settings().data_root)
    except PipelineError as err:
        print(f"{config_path}: project: {err}", file=sys.stderr)
        return 2
    if detach and not _has_shared_broker():
        return 2

    with local_pipeline() as local:
        try:
            started = service.start_configured_export(config)
        except PipelineError as err:
            print(f"{config_path}: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            print(str(err), file=sys.stderr)
            return 1
        export_id = started["task_id"]
        structlog.contextvars.bind_contextvars(export_id=export_id)
        log.info("export started", config=str(config_path), project=started["project"],
                 export_format=started["export_format"])
        print(f"export {export_id} started ({started['project']}, {started['export_format']})", file=sys.stderr)
        if detach:
            print(export_id)
            return 0
        local.start_worker(concurrency, loglevel)
        return _follow_and_report(export_id, local)


def _has_shared_broker() -> bool:
    """``--detach`` leaves the export to the deployment's workers: that needs a broker that outlives us."""
    if "CELERY_BROKER_URL" in os.environ:
        return True
    print("--detach needs a shared broker (CELERY_BROKER_URL): the embedded one stops with this command",
          file=sys.stderr)
    return False


def retry(export_id: str, stage: str, *, all_batches: bool = False, export_root: Path | None = None,
          concurrency: int | None = None, loglevel: str = "info", detach: bool = False) -> int:
    """``nextpoints-export retry ID --stage S``: rerun a failed export from a stage and follow it."""
    from pipeline import service
    from pipeline.errors import JobNotFound, PipelineError

    set_roots(export_root=export_root)
    structlog.contextvars.bind_contextvars(export_id=export_id)
    if detach and not _has_shared_broker():
        return 2
    with local_pipeline() as local:
        try:
            service.retry_export(export_id, stage, all_batches=all_batches)
        except JobNotFound as err:
            print(str(err), file=sys.stderr)
            return 1
        except PipelineError as err:
            print(str(err), file=sys.stderr)
            return 2
        print(f"export {export_id}: rerunning from {stage}", file=sys.stderr)
        if detach:
            return 0
        local.start_worker(concurrency, loglevel)
        return _follow_and_report(export_id, local)


def status(export_id: str, *, export_root: Path | None = None) -> int:
    from pipeline import service
    from pipeline.errors import JobNotFound

    set_roots(export_root=export_root)
    with local_pipeline():
        try:
            print(json.dumps(service.export_status(export_id), indent=1))
        except JobNotFound as err:
            print(str(err), file=sys.stderr)
            return 1
    return 0


def cancel(export_id: str, *, export_root: Path | None = None) -> int:
    from pipeline import service
    from pipeline.errors import JobNotCancellable, JobNotFound

    set_roots(export_root=export_root)
    with local_pipeline():
        try:
            print(json.dumps(service.cancel_export(export_id), indent=1))
        except (JobNotFound, JobNotCancellable) as err:
            print(str(err), file=sys.stderr)
            return 1
    return 0


LIST_COLUMNS = (("task_id", 36), ("status", 10), ("progress", 8), ("export_format", 13), ("project", 20),
                ("created_at", 19), ("current_step", 0))


def list_exports(*, limit: int = 20, as_json: bool = False, export_root: Path | None = None,
                 out: TextIO = sys.stdout) -> int:
    from pipeline import service

    set_roots(export_root=export_root)
    with local_pipeline():
        items, total = service.list_exports(limit=limit)
    if as_json:
        print(json.dumps({"items": items, "total": total}, indent=1), file=out)
        return 0
    print("  ".join(name.upper().ljust(width) for name, width in LIST_COLUMNS).rstrip(), file=out)
    for item in items:
        cells = []
        for name, width in LIST_COLUMNS:
            value = item.get(name)
            if value is None:
                text = "-"
            elif name == "progress":
                text = f"{value:.1f}"
            elif name == "created_at":  # UTC, to the second
                text = str(value)[:19].replace("T", " ")
            else:
                text = str(value)
            cells.append(text[:width].ljust(width) if width else text)
        print("  ".join(cells).rstrip(), file=out)
    print(f"({len(items)} of {total})", file=out)
    return 0
