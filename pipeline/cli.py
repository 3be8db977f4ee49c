"""``nextpoints-export``: the command line.

    nextpoints-export run     CONFIG.yaml [--data-root DIR] [--export-root DIR] [--concurrency N] [--detach]
    nextpoints-export retry   EXPORT_ID --stage convert|merge|compress [--only-failed|--all-batches] [--export-root DIR]
    nextpoints-export status  EXPORT_ID [--export-root DIR]
    nextpoints-export cancel  EXPORT_ID [--export-root DIR]
    nextpoints-export list    [--limit 20] [--json] [--export-root DIR]
    nextpoints-export serve   [--data-root DIR] [--export-root DIR] [--host H] [--port 8000] [--concurrency N]
    nextpoints-export convert PROJECT_DIR OUT_DIR [--format nuscenes|kitti] [--batch-size N] [--archive FMT]
                              [--coordinate-system global|ego_vehicle|lidar] [--layout nextpoints|sustech]
                              [--source-setting KEY=VALUE ...]
    nextpoints-export synth   OUT_ROOT --project NAME --frames N [--cameras 6] [--seed S] [--preset P]
    nextpoints-export worker  [--concurrency N] [--queues Q,...] [--loglevel L] [--hostname H] [-- CELERY ARGS...]
    nextpoints-export beat    [--schedule FILE] [--loglevel L] [-- CELERY BEAT ARGS...]
    nextpoints-export flower  [--port 5555] [-- CELERY FLOWER ARGS...]

Each subcommand is one ``add_<name>(subparsers)`` function that registers its parser and handler; a new
subcommand is one more such function and one line in ``COMMANDS``. ``worker``/``beat``/``flower`` exec the
exact Celery command lines built by ``worker_command``/``beat_command``/``flower_command``, which the start
scripts, supervisord, docker-compose, ``serve`` and the tests all use. ``run``/``retry``/``status``/``cancel``/
``list`` are in ``pipeline.runner`` (they use the configured broker, or the embedded one as ``serve`` does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline.settings import QUEUES, get_settings

CELERY = [sys.executable, "-m", "celery", "-A", "pipeline.celery_app"]


# --- the Celery command lines -------------------------------------------------------------------------------
def worker_command(concurrency: int | None = None, loglevel: str = "info", hostname: str | None = None,
                   extra: Sequence[str] = (), queues: Sequence[str] = QUEUES) -> list[str]:
    """A worker consuming the export queues (default both; small exports are served first)."""
    cmd = [*CELERY, "worker", "-Q", ",".join(queues), "-l", loglevel]
    if concurrency:
        cmd += ["-c", str(concurrency)]
    if hostname:
        cmd += ["-n", hostname]
    return cmd + list(extra)


def beat_command(schedule: Path | None = None, loglevel: str = "info", extra: Sequence[str] = ()) -> list[str]:
    """Beat, keeping its schedule state under the export root (the working directory may be read-only)."""
    schedule = schedule or get_settings().export_root / ".beat" / "celerybeat-schedule"
    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    return [*CELERY, "beat", "-l", loglevel, "--schedule", str(schedule), *extra]


def flower_command(port: int = 5555, extra: Sequence[str] = ()) -> list[str]:
    return [*CELERY, "flower", f"--port={port}", *extra]


def _exec(cmd: list[str]) -> int:
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # replaces this process: signals and exit status are Celery's own
    return 0  # pragma: no cover


# --- subcommands --------------------------------------------------------------------------------------------
def _roots(p, data_root: bool = True) -> None:
    if data_root:
        p.add_argument("--data-root", type=Path, help="projects folder; a config's relative project path is "
                                                      "resolved against it (default: NPX_DATA_ROOT)")
    p.add_argument("--export-root", type=Path, help="archives, staging and the embedded Redis's data "
                                                    "(default: NPX_EXPORT_ROOT)")


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run the export a YAML pipeline config describes, with a progress bar; "
                                   "prints the archive path")
    p.add_argument("config", type=Path, help="a pipeline config, e.g. configs/examples/nuscenes.yaml")
    _roots(p)
    p.add_argument("--concurrency", type=int, help="processes of the embedded worker (default: "
                                                   "CELERY_WORKER_CONCURRENCY)")
    p.add_argument("--loglevel", default="info")
    p.add_argument("--detach", action="store_true", help="print the export id and return at once (needs "
                                                         "CELERY_BROKER_URL and workers)")

    def run(args) -> int:
        from pipeline.logging import configure_cli_logging
        from pipeline.runner import run_config

        configure_cli_logging(args.loglevel)
        return run_config(args.config, data_root=args.data_root, export_root=args.export_root,
                          concurrency=args.concurrency, loglevel=args.loglevel, detach=args.detach)

    p.set_defaults(handler=run)


def add_retry(sub) -> None:
    p = sub.add_parser("retry", help="rerun a failed export from a stage over its staged files")
    p.add_argument("export_id")
    p.add_argument("--stage", required=True, choices=["convert", "merge", "compress"])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only-failed", action="store_true",
                       help="convert: only the batches without a staged result (the default: a batch that "
                            "succeeded is never converted again)")
    which.add_argument("--all-batches", action="store_true", help="convert: every batch again")
    _roots(p, data_root=False)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--loglevel", default="info")
    p.add_argument("--detach", action="store_true", help="return once the rerun is queued")

    def run(args) -> int:
        from pipeline.logging import configure_cli_logging
        from pipeline.runner import retry

        if args.stage != "convert" and (args.only_failed or args.all_batches):
            p.error(f"--only-failed / --all-batches choose the batches to convert; --stage {args.stage} "
                    "converts none")
        configure_cli_logging(args.loglevel)
        return retry(args.export_id, args.stage, all_batches=args.all_batches, export_root=args.export_root,
                     concurrency=args.concurrency, loglevel=args.loglevel, detach=args.detach)

    p.set_defaults(handler=run)


def add_status(sub) -> None:
    p = sub.add_parser("status", help="print an export's status as JSON")
    p.add_argument("export_id")
    _roots(p, data_root=False)

    def run(args) -> int:
        from pipeline.logging import configure_cli_logging
        from pipeline.runner import status

        configure_cli_logging("warning")
        return status(args.export_id, export_root=args.export_root)

    p.set_defaults(handler=run)


def add_cancel(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a pending or processing export")
    p.add_argument("export_id")
    _roots(p, data_root=False)

    def run(args) -> int:
        from pipeline.logging import configure_cli_logging
        from pipeline.runner import cancel

        configure_cli_logging("warning")
        return cancel(args.export_id, export_root=args.export_root)

    p.set_defaults(handler=run)


def add_list(sub) -> None:
    p = sub.add_parser("list", help="list exports, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _roots(p, data_root=False)

    def run(args) -> int:
        from pipeline.logging import configure_cli_logging
        from pipeline.runner import list_exports

        configure_cli_logging("warning")
        return list_exports(limit=args.limit, as_json=args.json, export_root=args.export_root)

    p.set_defaults(handler=run)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run Redis (embedded unless CELERY_BROKER_URL is set), worker, beat and the "
                                     "HTTP API in one command")
    p.add_argument("--data-root", type=Path, help="projects folder (default: NPX_DATA_ROOT, else a generated "
                                                  "demo project 'my_project' under EXPORT_ROOT/demo-data)")
    p.add_argument("--export-root", type=Path, help="archives and staging (default: NPX_EXPORT_ROOT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, help="worker processes (default: CELERY_WORKER_CONCURRENCY)")
    p.add_argument("--loglevel", default="info")

    def run(args) -> int:
        from pipeline.serve import serve

        return serve(data_root=args.data_root, export_root=args.export_root, host=args.host, port=args.port,
                     concurrency=args.concurrency, loglevel=args.loglevel)

    p.set_defaults(handler=run)


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export one project serially in this process (no broker)")
    p.add_argument("project_dir", type=Path)
    p.add_argument("out_dir", type=Path, help="the dataset (or archive) is written into this folder")
    p.add_argument("--format", choices=["nuscenes", "kitti"], default="nuscenes")
    p.add_argument("--batch-size", type=int, default=None, help="frames per batch (default: NPX_BATCH_SIZE)")
    p.add_argument("--archive", choices=["none", "zip", "tar.gz", "tar.zst"], default="none")
    p.add_argument("--coordinate-system", choices=["global", "ego_vehicle", "lidar"],
                   help="default: global for nuScenes, lidar (velodyne) for KITTI")
    p.add_argument("--layout", help="force the source layout, nextpoints or sustech (default: detected)")
    p.add_argument("--source-setting", dest="source_settings", action="append", default=[], type=_setting,
                   metavar="KEY=VALUE", help="a setting of the source layout, repeatable, e.g. "
                   "lidar_axes=x_left_y_back (SUSTechPOINTS); VALUE is read as JSON when it is JSON "
                   "(1.9, [2048, 1536]), else as a string")

    def run(args) -> int:
        from stages.compress import archive_path
        from stages.errors import ExportError
        from stages.request import ArchiveFormat, CoordinateSystem, ExportFormatName, ExportOptions, ExportRequest
        from stages.serial import default_export_id, run_serial

        archive = ArchiveFormat(args.archive)
        coordinates = args.coordinate_system or ("global" if args.format == "nuscenes" else "lidar")
        request = ExportRequest(
            export_format=ExportFormatName.nuscenes if args.format == "nuscenes" else ExportFormatName.kitti,
            coordinate_system=CoordinateSystem(coordinates),
            export_options=ExportOptions(compress_output=archive != ArchiveFormat.none,
                                         output_format=archive if archive != ArchiveFormat.none
                                         else ArchiveFormat.zip))
        name = args.project_dir.resolve().name
        if name == "nextpoints":  # DATA_ROOT/<project>/nextpoints: name the output after the project
            name = args.project_dir.resolve().parent.name
        dest = archive_path(args.out_dir, name, archive)
        settings = dict(args.source_settings)
        run_id = default_export_id(args.project_dir, request, settings, args.layout)

        def progress(done: int, total: int, frame_id: str) -> None:
            print(f"\rframe {done}/{total}", end="", file=sys.stderr, flush=True)

        try:
            result = run_serial(args.project_dir, dest, request, export_id=run_id,
                                batch_size=args.batch_size or get_settings().batch_size, on_frame=progress,
                                source_settings=settings, layout=args.layout)
        except (ExportError, ValueError) as err:
            print(f"\nexport failed: {err}", file=sys.stderr)
            return 1
        print(file=sys.stderr)
        print(json.dumps({"path": result.packed.path, "size": result.packed.size, "frames": result.merged.frames,
                          "annotations": result.merged.annotations, "batches": len(result.batches),
                          "warnings": len(result.merged.warnings), "filtered": result.merged.filtered,
                          "counts": result.merged.counts}, indent=1))
        return 0

    p.set_defaults(handler=run)


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--source-setting``: (key, the value parsed as JSON, or the text itself)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a synthetic NextPoints project")
    p.add_argument("out_root", type=Path)
    p.add_argument("--project", required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["default", "rotated_lidar"], default="default")

    def run(args) -> int:
        from stages.synth import generate_project

        path = generate_project(args.out_root, args.project, args.frames, cameras=args.cameras, seed=args.seed,
                                preset=args.preset)
        print(path)
        return 0

    p.set_defaults(handler=run)


def add_worker(sub) -> None:
    p = sub.add_parser("worker", help="exec a Celery worker on both export queues")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--queues", default=",".join(QUEUES),
                   help=f"comma-separated queues to consume (default {','.join(QUEUES)}), e.g. large_export")
    p.add_argument("--loglevel", default="info")
    p.add_argument("--hostname")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: more `celery worker` options")
    p.set_defaults(handler=lambda a: _exec(worker_command(a.concurrency, a.loglevel, a.hostname,
                                                          _rest(a.celery_args), _queues(a.queues))))


def _queues(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise SystemExit(f"--queues: unknown queue(s) {unknown or text!r}; known: {', '.join(QUEUES)}")
    return queues


def add_beat(sub) -> None:
    p = sub.add_parser("beat", help="exec Celery beat (cleanup and stale-job checks)")
    p.add_argument("--schedule", type=Path)
    p.add_argument("--loglevel", default="info")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: more `celery beat` options")
    p.set_defaults(handler=lambda a: _exec(beat_command(a.schedule, a.loglevel, _rest(a.celery_args))))


def add_flower(sub) -> None:
    p = sub.add_parser("flower", help="exec Flower, the Celery monitoring UI")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: more `celery flower` options")
    p.set_defaults(handler=lambda a: _exec(flower_command(a.port, _rest(a.celery_args))))


def _rest(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


COMMANDS: list[Callable] = [add_run, add_retry, add_status, add_cancel, add_list, add_serve, add_convert, add_synth,
                            add_worker, add_beat, add_flower]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextpoints-export",
                                     description="Export NextPoints point-cloud projects to nuScenes / KITTI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
