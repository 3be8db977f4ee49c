"""Retries, automatic and by hand, against the session's real Redis and worker (conftest.py):

- a transient error (an input that cannot be read just now) is retried with backoff and the export completes;
  an error in the input fails at once, after one attempt;
- a failed export keeps its staged files, and ``retry --stage merge|convert`` reruns it from that stage over
  them, without converting again what was converted.
"""
from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis.exceptions

from conftest import REPO_ROOT, wait_until
from pipeline.retry_policy import RetryPolicy, is_transient
from stages.errors import InputError, InputUnavailable, PointCloudError
from stages.request import ExportRequest
from test_pipeline import batch_metas, follow, worker_log_lines

FRAMES = 10  # two batches of 5 (conftest.PIPELINE_BATCH_SIZE)
PROJECT = "retry-10"
pytestmark = pytest.mark.usefixtures("celery_worker")


@pytest.fixture(scope="module")
def project(pipeline_env) -> str:
    from stages.synth import generate_project

    generate_project(pipeline_env.data_root, PROJECT, FRAMES, cameras=2, seed=5)
    return PROJECT


def copy_of(pipeline_env, project: str, name: str) -> Path:
    """A private copy of the project to break; returns its nextpoints folder."""
    shutil.copytree(pipeline_env.data_root / project, pipeline_env.data_root / name)
    return pipeline_env.data_root / name / "nextpoints"


def start(project: str, **config) -> str:
    """Start an export the way ``nextpoints-export run`` does, from a pipeline config; its id."""
    from pipeline import service
    from pipeline.config import PipelineConfig

    return service.start_configured_export(
        PipelineConfig.model_validate({"project": {"name": project}, **config}))["task_id"]


def stage_lines(worker, export_id: str, event: str, stage: str | None = None) -> list[dict]:
    return [line for line in worker_log_lines(worker) if line.get("export_id") == export_id
            and line["event"] == event and (stage is None or line.get("stage") == stage)]


def staged_batches(staging: Path) -> dict[str, tuple[int, int, str]]:
    """Every staged batch file: (inode, mtime in ns, sha256)."""
    out = {}
    for path in sorted((staging / "batches").rglob("*")):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(staging))] = (st.st_ino, st.st_mtime_ns, digest)
    return out


def tables(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {name: zf.read(name) for name in zf.namelist() if name.startswith("v1.0-trainval/")}


@pytest.fixture
def large_queue_paused(celery_worker):
    """The worker takes nothing from the large_export queue until ``resume()`` (discover, on small_export, runs)."""
    from pipeline.celery_app import app
    from pipeline.settings import LARGE_QUEUE

    assert app.control.cancel_consumer(LARGE_QUEUE, destination=[celery_worker.hostname], reply=True)
    resumed = []

    def resume():
        if not resumed:
            app.control.add_consumer(LARGE_QUEUE, destination=[celery_worker.hostname], reply=True)
            resumed.append(True)

    yield resume
    resume()


# --- which errors retry --------------------------------------------------------------------------------
def test_transient_errors_retry_and_errors_in_the_input_or_request_do_not():
    assert all(is_transient(e) for e in (
        InputUnavailable("cannot read file: Permission denied", path="x.pcd"), PermissionError(errno.EACCES, "x"),
        IsADirectoryError(errno.EISDIR, "x"), OSError(errno.EIO, "I/O error"), TimeoutError(),
        redis.exceptions.ConnectionError("lost"), redis.exceptions.TimeoutError()))
    assert not any(is_transient(e) for e in (
        InputError("not valid JSON", path="label/1.json"), PointCloudError("truncated"),
        FileNotFoundError(errno.ENOENT, "gone"), ValueError("coordinate_system 'lidar' has no meaning"),
        KeyError("x"), RuntimeError("bug")))
    policy = RetryPolicy(max_retries=3, backoff=2.0, backoff_max=5.0, jitter=False)
    assert [policy.countdown(n) for n in range(4)] == [2.0, 4.0, 5.0, 5.0]
    assert policy.should_retry(OSError(errno.EIO, "x"), 2) and not policy.should_retry(OSError(errno.EIO, "x"), 3)


# --- automatic retries -----------------------------------------------------------------------------------
def test_a_transient_read_error_is_retried_with_backoff_and_the_export_completes(project, pipeline_env,
                                                                              celery_worker):
    """A folder where frame 7's point cloud should be (an unreadable input, like a storage hiccup) until
    the test puts the file back during the backoff."""
    root = copy_of(pipeline_env, project, "retry-transient")
    pcd = sorted((root / "lidar" / "lidar-fusion").glob("*.pcd"))[7]  # batch 1
    pcd.rename(pcd.with_suffix(".keep"))
    pcd.mkdir()

    export_id = start("retry-transient", retry={"max_retries": 5, "backoff": 1.0, "jitter": False})
    wait_until(lambda: (batch_metas(export_id) + [None, None])[1] and batch_metas(export_id)[1]["status"] == "RETRY",
               60, 0.05, what="batch 1 to wait for its retry")
    pcd.rmdir()
    pcd.with_suffix(".keep").rename(pcd)

    final = follow(export_id)[-1]
    assert final["status"] == "completed", final
    assert final["total_frames_processed"] == FRAMES and final["error_details"] is None
    [retrying, *_] = stage_lines(celery_worker, export_id, "stage retrying", "convert")
    assert (retrying["batch"], retrying["attempt"], retrying["error"]) == (1, 1, "InputUnavailable")
    assert retrying["frame"] == pcd.stem and retrying["file"] == str(pcd) and retrying["next_attempt_in_s"] == 1.0
    attempts = [line["attempt"] for line in stage_lines(celery_worker, export_id, "stage started", "convert")
                if line["batch"] == 1]
    assert attempts[0] == 1 and attempts[-1] >= 2


def test_a_malformed_label_fails_the_export_at_once_after_a_single_attempt(project, pipeline_env, celery_worker):
    root = copy_of(pipeline_env, project, "retry-bad-label")
    label = sorted((root / "label").glob("*.json"))[6]  # batch 1
    label.write_text('[{"obj_id": "1", "obj_type": "car", "psr": ')

    export_id = start("retry-bad-label", retry={"max_retries": 5, "backoff": 0.1})
    final = follow(export_id)[-1]
    assert final["status"] == "failed"
    error = final["error_details"]
    assert (error["error"], error["stage"], error["batch"], error["attempts"]) == ("InputError", "convert", 1, 1)
    assert error["file"] == str(label) and error["frame"] == label.stem
    assert not stage_lines(celery_worker, export_id, "stage retrying")
    assert len([line for line in stage_lines(celery_worker, export_id, "stage started", "convert")
                if line["batch"] == 1]) == 1


# --- rerunning a failed export from a stage ------------------------------------------------------------
def test_a_failed_merge_is_rerun_from_merge_without_converting_again(project, pipeline_env, celery_worker,
                                                                     large_queue_paused):
    """Merge is made to fail with a file where it must create the tables' folder, then rerun from merge once
    the file is gone. The rerun's compress is made to fail too (a folder where the archive goes), so that the
    staged batches can be compared after the rerun's merge, before a successful compress removes them; a
    rerun from compress then completes the export, with the tables of a clean run."""
    from pipeline import service
    from pipeline.jobs import job_store

    clean_id = service.start_export(project, ExportRequest())["task_id"]

    # its batches run on the paused large queue: the file goes in once discover has staged the plan
    export_id = start(project, queue="large", retry={"max_retries": 1, "backoff": 0.1, "jitter": False})
    wait_until(lambda: job_store().get(export_id).step == "convert", 60, 0.05, what="discover to stage the plan")
    staging = pipeline_env.export_root / "staging" / export_id
    blocker = staging / "output" / "v1.0-trainval"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    large_queue_paused()

    failed = follow(export_id)[-1]
    assert failed["status"] == "failed", failed
    error = failed["error_details"]
    assert (error["stage"], error["attempts"]) == ("merge", 2)  # an OSError: retried once by its policy
    assert error["error"] in ("FileExistsError", "NotADirectoryError")
    before = staged_batches(staging)
    assert sorted(p for p in before if p.endswith("result.json")) == ["batches/00000/result.json",
                                                                      "batches/00001/result.json"]

    blocker.unlink()
    archive_blocker = pipeline_env.export_root / f"{export_id}.zip"
    (archive_blocker / "in-the-way").mkdir(parents=True)
    rerun = service.retry_export(export_id, "merge")
    assert (rerun["status"], rerun["error_details"], rerun["current_step"]) == ("processing", None, "Merging tables")
    seen = follow(export_id)
    assert seen[-1]["status"] == "failed" and seen[-1]["error_details"]["stage"] == "compress", seen[-1]
    assert all(s["status"] == "processing" for s in seen[:-1])
    assert staged_batches(staging) == before  # merge ran again; not one batch file was rewritten
    assert (staging / "output" / "v1.0-trainval" / "sample.json").is_file()

    shutil.rmtree(archive_blocker)
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "retry", export_id, "--stage", "compress"],
                         env=pipeline_env.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == str(archive_blocker)
    final = service.export_status(export_id)
    assert final["status"] == "completed" and final["progress"] == 100 and final["error_details"] is None
    assert sorted(line["batch"] for line in stage_lines(celery_worker, export_id, "stage started", "convert")) == [0, 1]
    assert len(stage_lines(celery_worker, export_id, "stage started", "merge")) == 3  # 2 failed attempts + rerun
    record = job_store().get(export_id)
    assert (record.reruns, record.rerun_stage) == (2, "compress")

    assert follow(clean_id)[-1]["status"] == "completed"
    rerun_tables = tables(service.archive_for_download(export_id))
    assert len(rerun_tables) >= 13 and rerun_tables == tables(service.archive_for_download(clean_id))


def test_retry_stage_merge_from_the_cli_completes_the_export_with_a_clean_runs_tables(
        project, pipeline_env, celery_worker, large_queue_paused):
    """The issue's acceptance as written: merge fails, ``nextpoints-export retry ID --stage merge`` completes the
    export, no convert batch runs again, and the archive's tables equal a clean run's."""
    from pipeline import service
    from pipeline.jobs import job_store

    clean_id = service.start_export(project, ExportRequest())["task_id"]
    export_id = start(project, queue="large", retry={"max_retries": 0})
    wait_until(lambda: job_store().get(export_id).step == "convert", 60, 0.05, what="discover to stage the plan")
    blocker = pipeline_env.export_root / "staging" / export_id / "output" / "v1.0-trainval"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    large_queue_paused()
    failed = follow(export_id)[-1]
    assert failed["status"] == "failed" and failed["error_details"]["stage"] == "merge", failed
    converts_before = stage_lines(celery_worker, export_id, "stage started", "convert")

    blocker.unlink()
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "retry", export_id, "--stage", "merge"],
                         env=pipeline_env.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    final = service.export_status(export_id)
    assert final["status"] == "completed" and final["progress"] == 100 and final["error_details"] is None
    assert stage_lines(celery_worker, export_id, "stage started", "convert") == converts_before
    assert follow(clean_id)[-1]["status"] == "completed"
    assert tables(service.archive_for_download(export_id)) == tables(service.archive_for_download(clean_id))


def test_retry_from_convert_converts_only_the_batches_without_a_result(project, pipeline_env, celery_worker):
    """From the CLI: ``nextpoints-export retry ID --stage convert`` (= ``--only-failed``) once the broken point
    cloud is fixed. Five batches of two frames on two worker processes: the last batch (broken) starts only after
    others have finished, and those are not converted again."""
    from datetime import datetime, timezone

    from pipeline import service

    root = copy_of(pipeline_env, project, "retry-convert")
    pcd = sorted((root / "lidar" / "lidar-fusion").glob("*.pcd"))[9]  # batch 4, the last
    good = pcd.read_bytes()
    pcd.write_bytes(good[:3000])
    export_id = service.start_export("retry-convert", ExportRequest(), batch_size=2)["task_id"]
    failed = follow(export_id)[-1]
    assert failed["status"] == "failed" and failed["error_details"]["batch"] == 4
    staging = pipeline_env.export_root / "staging" / export_id
    started = {line["batch"] for line in stage_lines(celery_worker, export_id, "stage started", "convert")}
    wait_until(lambda: {line["batch"] for line in worker_log_lines(celery_worker)
                        if line.get("export_id") == export_id and line.get("stage") == "convert"
                        and line["event"] in ("stage finished", "stage stopped", "stage failed")} >= started,
               30, 0.1, what="the batches running beside the broken one to end")
    converted = {int(p.parent.name) for p in (staging / "batches").glob("*/result.json")}
    assert converted and 4 not in converted

    pcd.write_bytes(good)
    rerun_from = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "retry", export_id, "--stage", "convert"],
                         env=pipeline_env.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == str(pipeline_env.export_root / f"{export_id}.zip")
    final = service.export_status(export_id)
    assert final["status"] == "completed" and final["total_frames_processed"] == FRAMES
    rerun = [line["batch"] for line in stage_lines(celery_worker, export_id, "stage started", "convert")
             if line["timestamp"] > rerun_from]
    assert sorted(rerun) == sorted(set(range(5)) - converted)


@pytest.mark.parametrize("flag", ["--only-failed", "--all-batches"])
def test_choosing_batches_is_refused_for_a_stage_that_converts_none(flag):
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "retry", "some-export", "--stage", "merge", flag],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "--stage merge converts none" in cli.stderr


def test_only_a_failed_export_with_its_staged_files_can_be_rerun(project):
    from pipeline import service
    from pipeline.errors import InvalidExportRequest, JobNotRetryable

    export_id = service.start_export(project, ExportRequest(max_frames=5))["task_id"]
    assert follow(export_id)[-1]["status"] == "completed"
    with pytest.raises(JobNotRetryable, match="only failed exports"):
        service.retry_export(export_id, "merge")
    with pytest.raises(InvalidExportRequest):
        service.retry_export(export_id, "discover")
