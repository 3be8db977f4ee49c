"""YAML pipeline configs: one file says what to export and how to run it (``nextpoints-export run FILE``).

    project:                 # where the input is
      name: my_project       #   a project folder under the data root (NPX_DATA_ROOT / --data-root), and/or
      path: drives/2024-06   #   its folder: absolute, or relative to the data root
      layout: sustech        #   optional: force the source layout (default: detected)
      source_settings: {lidar_axes: x_left_y_back}   # the layout's settings (stages/sources/<layout>.py)
    export: {...}            # the export request: exactly the HTTP API's body (stages.request.ExportRequest)
    batch_size: 25           # frames per convert task (null: NPX_BATCH_SIZE)
    queue: auto              # auto (by frame count) | small | large
    priority: 5              # 0-10, 10 = most urgent (same as export.priority; give one of them)
    retry: {max_retries: 3, backoff: 2, backoff_max: 120, jitter: true}   # automatic retries (null: NPX_*)
    mappings: {...}          # overrides merged over configs/mappings/<format>.yaml (categories, channels, ...)

A file is merged over ``configs/pipeline.yaml`` (the defaults) and validated with pydantic before anything
runs: an unknown or ill-typed key is a ``ConfigError`` naming the file, the line and the key's path, e.g.
``nuscenes.yaml:7: export.export_options.compres_output: unknown key (did you mean 'compress_output'?)``.
"""
from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ProjectNotFound
from pipeline.paths import PROJECT_NAME
from pipeline.paths import project_dir as project_dir_under
from pipeline.retry_policy import RetryPolicy
from pipeline.settings import LARGE_QUEUE, SMALL_QUEUE, Settings
from stages.request import ExportRequest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS_FILE = CONFIG_DIR / "pipeline.yaml"
QUEUE_NAMES = {"auto": None, "small": SMALL_QUEUE, "large": LARGE_QUEUE}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSection(_Strict):
    name: str | None = Field(None, description="a project folder under the data root")
    path: str | None = Field(None, description="the project folder: absolute, or relative to the data root")
    layout: str | None = Field(None, description="force the source layout; None = detected from the folders")
    source_settings: dict[str, Any] = Field(default_factory=dict, description="the layout's own settings")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not PROJECT_NAME.match(value):
            raise ValueError("a project name is a folder name: letters, digits, '.', '_' and '-'")
        return value

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str | None) -> str | None:
        from stages.sources import layout_names

        if value is not None and value not in layout_names():
            raise ValueError(f"unknown layout {value!r}; known: {', '.join(layout_names())}")
        return value

    @model_validator(mode="after")
    def _name_or_path(self) -> "ProjectSection":
        if self.name is None and self.path is None:
            raise ValueError("give the project's name (under the data root) or its path")
        return self

    def locate(self, data_root: Path) -> tuple[str, Path]:
        """(project name, project folder); a relative path is resolved against ``data_root``."""
        if self.path is None:
            found = project_dir_under(data_root, self.name)
            if found is None:
                raise ProjectNotFound(self.name, f"no such project under the data root {data_root}")
            return self.name, found.resolve()
        folder = Path(self.path).expanduser()
        folder = folder if folder.is_absolute() else Path(data_root) / folder
        if not folder.is_dir():
            raise ProjectNotFound(self.name or self.path, f"no folder {folder}")
        name = self.name or (folder.resolve().parent.name if folder.resolve().name == "nextpoints"
                             else folder.resolve().name)
        return name, folder.resolve()


class RetrySection(_Strict):
    """Automatic retries of transient errors; null = the service-wide value (NPX_MAX_RETRIES, ...)."""

    max_retries: int | None = Field(None, ge=0, le=100)
    backoff: float | None = Field(None, ge=0, description="seconds before the first retry, doubling after")
    backoff_max: float | None = Field(None, ge=0)
    jitter: bool | None = None


class PipelineConfig(_Strict):
    project: ProjectSection
    export: ExportRequest = Field(default_factory=ExportRequest)
    batch_size: int | None = Field(None, ge=1, description="frames per convert task; None = NPX_BATCH_SIZE")
    queue: Literal["auto", "small", "large"] = "auto"
    priority: int | None = Field(None, ge=0, le=10, description="= export.priority")
    retry: RetrySection = Field(default_factory=RetrySection)
    mappings: dict[str, Any] = Field(default_factory=dict,
                                     description="merged over configs/mappings/<format>.yaml")

    @model_validator(mode="after")
    def _one_priority(self) -> "PipelineConfig":
        if self.priority is not None:
            if "priority" in self.export.model_fields_set and self.export.priority != self.priority:
                raise ValueError("priority is given both at the top level and in export, differently")
            self.export = self.export.model_copy(update={"priority": self.priority})
        return self

    @property
    def queue_name(self) -> str | None:
        """The Celery queue the export is forced onto, None = by frame count."""
        return QUEUE_NAMES[self.queue]

    def retry_policy(self, settings: Settings | None = None) -> RetryPolicy:
        return RetryPolicy.from_json(self.retry.model_dump(), settings)


# --- loading ----------------------------------------------------------------------------------------------
@dataclass
class ConfigProblem:
    file: str
    line: int | None
    loc: str  # dotted path of the key, e.g. "export.export_options.compres_output"
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.loc}: {self.message}" if self.loc else f"{where}: {self.message}"


class ConfigError(ValueError):
    """A config file that cannot be used; ``problems`` says where and why, one per offending key."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def load_config(path: str | Path, defaults: str | Path | None = DEFAULTS_FILE) -> PipelineConfig:
    """Read, merge over ``defaults`` and validate the config at ``path`` (``ConfigError`` if unusable).

    Also checks the mapping overrides against the format's mapping file, so that a config that loads is a
    config whose export can start.
    """
    path = Path(path)
    files: list[tuple[str, Any, Any]] = []  # (name, data, yaml node tree), defaults first
    for source in ([Path(defaults)] if defaults else []) + [path]:
        files.append(_read_yaml(source))
    merged: dict[str, Any] = {}
    for _name, data, _node in files:
        merged = _deep_merge(merged, data)
    try:
        config = PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_problems(err, files)) from None
    _check_mappings(config, files)
    return config


def _read_yaml(path: Path) -> tuple[str, Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([ConfigProblem(str(path), mark.line + 1 if mark else None, "",
                                         f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(str(path), 1, "", "a pipeline config is a mapping of keys "
                                         "(project, export, batch_size, ...)")])
    return str(path), data, node


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _problems(err: ValidationError, files: list[tuple[str, Any, Any]]) -> list[ConfigProblem]:
    problems: dict[str, ConfigProblem] = {}
    for e in err.errors():
        loc = _data_loc(files, e["loc"], keep_last=e["type"] == "missing")
        if e["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif e["type"] == "missing":
            message = "required key missing"
        else:
            message = e["msg"].removeprefix("Value error, ")
        dotted = _dotted(loc)
        if dotted in problems:  # a union reports one error per member: one problem, "... or ..."
            problems[dotted].message += f", or {message[:1].lower()}{message[1:]}"
            continue
        file, line = _where(files, loc)
        problems[dotted] = ConfigProblem(file, line, dotted, message)
    return sorted(problems.values(), key=lambda p: (p.file, p.line or 0))  # in the order of the file


def _data_loc(files: list[tuple[str, Any, Any]], loc: tuple, keep_last: bool) -> tuple:
    """Pydantic's error location reduced to keys present in the data (drops union member tags, e.g. the
    ``str`` of ``("start_frame", "str")``), keeping a missing last key when it is the point of the error."""
    data: Any = {}
    for _name, d, _node in files:
        data = _deep_merge(data, d)
    out = []
    for i, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif keep_last and i == len(loc) - 1:
            pass
        else:
            continue
        out.append(part)
    return tuple(out)


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _where(files: list[tuple[str, Any, Any]], loc: tuple) -> tuple[str, int | None]:
    """The file that sets the key at ``loc`` (the last one that has it; else the config itself) and its line."""
    for name, data, node in reversed(files):
        line = _line_of(node, loc)
        if line is not None and _has(data, loc):
            return name, line
    name, _data, node = files[-1]
    return name, _line_of(node, loc)


def _has(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    return True


def _line_of(node: Any, loc: tuple) -> int | None:
    """1-based line of the deepest node along ``loc`` in a composed YAML tree (the key's line for mappings)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _did_you_mean(loc: tuple) -> str:
    known = _fields_at(PipelineConfig, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1) if known and loc else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the model found by following ``loc`` through nested model fields ([] if none)."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _check_mappings(config: PipelineConfig, files: list[tuple[str, Any, Any]]) -> None:
    """The mapping overrides, merged over the format's mapping file, must be a valid mapping."""
    if not config.mappings:
        return
    from stages.discover import load_mapping_for
    from stages.formats import get_format
    from stages.mappings import MappingOverrideError

    try:
        load_mapping_for(get_format(config.export.export_format.value), config.project.layout, config.mappings)
    except MappingOverrideError as err:
        loc = ("mappings", *err.loc)
        file, line = _where(files, loc)
        raise ConfigError([ConfigProblem(file, line, _dotted(loc), err.problem)]) from None
    except (ValueError, TypeError, AttributeError) as err:
        file, line = _where(files, ("mappings",))
        raise ConfigError([ConfigProblem(file, line, "mappings", str(err))]) from None
