"""Mappings kept in ``configs/`` (channels, categories, attributes): loaded once per export by discover and
stored in the plan, so every worker converts with the same mapping. A pipeline config may override parts of
a mapping (``merge_mapping``); the merged mapping is what the plan stores."""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class MappingOverrideError(ValueError):
    """An override names a key the mapping does not have; ``loc`` is its path inside the overrides."""

    def __init__(self, loc: tuple[str, ...], problem: str):
        self.loc = loc
        self.problem = problem
        super().__init__(f"{'.'.join(loc)}: {problem}")


@lru_cache(maxsize=None)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_mapping(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The mapping file ``configs/mappings/<name>.yaml`` (e.g. ``nuscenes``, ``kitti``) as a dict (a copy)."""
    path = (config_dir or CONFIG_DIR) / "mappings" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"mapping file {path} not found")
    return copy.deepcopy(_load(str(path)))


def merge_mapping(base: dict[str, Any], overrides: dict[str, Any] | None,
                  open_sections: Iterable[str] = ()) -> dict[str, Any]:
    """``overrides`` merged over ``base`` (neither is modified): dicts merge key by key, recursively; any other
    value (a list, a scalar, null) replaces the base's. A key the base does not have is a
    ``MappingOverrideError`` (a misspelling must not be ignored), except inside the ``open_sections``: name
    tables such as ``categories`` or ``channels``, where adding a name is the point of the override."""
    open_sections = frozenset(open_sections)

    def merge(into: dict[str, Any], over: dict[str, Any], loc: tuple[str, ...], is_open: bool) -> dict[str, Any]:
        out = copy.deepcopy(into)
        for key, value in over.items():
            here = (*loc, str(key))
            if key not in into and not is_open:
                known = ", ".join(sorted(map(str, into))) or "none"
                raise MappingOverrideError(here, f"unknown key (known: {known})")
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                out[key] = merge(into[key], value, here, is_open or (not loc and key in open_sections))
            elif isinstance(value, dict) and key in into and into[key] is not None:
                raise MappingOverrideError(here, f"expected {type(into[key]).__name__}, got a mapping")
            elif isinstance(into.get(key), dict) and not isinstance(value, dict):
                raise MappingOverrideError(here, f"expected a mapping, got {type(value).__name__}")
            else:
                out[key] = copy.deepcopy(value)
        return out

    return merge(base, overrides or {}, (), False)
