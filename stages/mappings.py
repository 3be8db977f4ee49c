"""Mappings kept in ``configs/`` (channels, categories, attributes): loaded once per export by discover and
stored in the plan, so every worker converts with the same mapping."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@lru_cache(maxsize=None)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_mapping(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The mapping file ``configs/mappings/<name>.yaml`` (e.g. ``nuscenes``, ``kitti``) as a dict (a copy)."""
    path = (config_dir or CONFIG_DIR) / "mappings" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"mapping file {path} not found")
    import copy

    return copy.deepcopy(_load(str(path)))
