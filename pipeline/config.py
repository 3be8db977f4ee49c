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
The sections whose keys belong to someone else are checked by their owners, at load time all the same:
``project.source_settings`` by the layout's reader (``stages/sources/<layout>.py``), ``export`` by the format's
request check (as the API's requests are), ``mappings`` by the format's mapping check.
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

from pipeline.errors import PipelineError, ProjectNotFound
from pipeline.paths import PROJECT_NAME
from pipeline.paths import project_dir as project_dir_under
from pipeline.retry_policy import RetryPolicy
from pipeline.settings import LARGE_QUEUE, SMALL_QUEUE, Settings, get_settings
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


def load_config(path: str | Path, defaults: str | Path | None = DEFAULTS_FILE, *,
                data_root: str | Path | None = None) -> PipelineConfig:
    """Read, merge over ``defaults`` and validate the config at ``path`` (``ConfigError`` if unusable).

    Also checks the source settings with the layout's reader (the layout forced by ``project.layout``, else
    detected when the project folder is found under ``data_root``, default ``NPX_DATA_ROOT``) and the mapping
    overrides against the format's mapping file, so that a config that loads is a config whose export can start.
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
    layout, problems = _check_source_settings(config, files, data_root)
    problems += _check_request(config, files)
    problems += _check_mappings(config, files, layout)
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.file, p.line or 0)))
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


def _check_request(config: PipelineConfig, files: list[tuple[str, Any, Any]]) -> list[ConfigProblem]:
    """The export request must make sense for its format (the check the API runs on a request, e.g. nuScenes
    has no ``coordinate_system: lidar``); the problem is at ``export.<the field the format names>``."""
    from stages.formats import get_format

    try:
        get_format(config.export.export_format.value).check_request(config.export)
    except ValueError as err:
        field = getattr(err, "field", None)
        loc = ("export", *field.split(".")) if field else ("export",)
        file, line = _where(files, loc)
        return [ConfigProblem(file, line, _dotted(loc), str(err))]
    return []


def _check_mappings(config: PipelineConfig, files: list[tuple[str, Any, Any]],
                    layout: str | None) -> list[ConfigProblem]:
    """The mapping overrides, merged over the format's mapping file, must be a valid mapping. The format's
    check names the offending entry only in its message: the override at fault is found by checking each
    override on its own, and reported at its path (``mappings.categories.van``)."""
    if not config.mappings:
        return []
    from stages.discover import load_mapping_for
    from stages.formats import get_format
    from stages.mappings import MappingOverrideError

    fmt = get_format(config.export.export_format.value)

    def refusal(overrides: dict[str, Any]) -> tuple[tuple, str] | None:
        """(path inside the overrides, or () when the format does not say; why), None if the mapping is valid."""
        try:
            load_mapping_for(fmt, layout, overrides)
        except MappingOverrideError as err:
            return err.loc, err.problem
        except (ValueError, TypeError, AttributeError) as err:
            return (), str(err)
        return None

    found = refusal(config.mappings)
    if found is None:
        return []
    refused = [found]
    if not found[0] and fmt.mapping_name:
        alone = [(leaf, refusal(_nested(leaf, value))) for leaf, value in _leaves(config.mappings)]
        refused = [(leaf, why[1]) for leaf, why in alone if why is not None] or refused  # else: only together
    problems = []
    for inner, message in refused:
        loc = ("mappings", *inner)
        problems.append(ConfigProblem(*_where(files, loc), _dotted(loc), message))
    return problems


def _leaves(tree: dict[str, Any], loc: tuple = ()) -> typing.Iterator[tuple[tuple, Any]]:
    """(path, value) of every value in nested dicts that is not itself a non-empty dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*loc, key))
        else:
            yield (*loc, key), value


def _nested(loc: tuple, value: Any) -> dict[str, Any]:
    """``{loc[0]: {loc[1]: ... value}}``"""
    for key in reversed(loc):
        value = {key: value}
    return value


def _check_source_settings(config: PipelineConfig, files: list[tuple[str, Any, Any]],
                           data_root: str | Path | None) -> tuple[str | None, list[ConfigProblem]]:
    """(the project's layout when known, problems of ``project.source_settings``).

    The settings are checked by constructing the layout's reader, whose constructor refuses unknown keys and
    bad values (it reads no file). The layout is ``project.layout``, else detected when the project folder
    exists; when it cannot be told, the settings must suit at least one layout. A key that fails alone is
    reported at ``project.source_settings.<key>``.
    """
    project = config.project
    folder = _project_folder(project, data_root)
    readers = _layout_readers(project.layout, folder)
    layout = readers[0].layout if len(readers) == 1 else project.layout
    settings = project.source_settings
    where = folder or Path(project.path or project.name or ".")
    if not settings or any(_settings_refusal(cls, where, settings) is None for cls in readers):
        return layout, []
    names = [cls.layout for cls in readers]
    declared = {name: _declared_settings(name) for name in names}
    of_layouts = f"layout {names[0]}" if len(names) == 1 else f"any layout ({', '.join(names)})"
    problems = []
    for key, value in settings.items():
        refusals = {cls.layout: r for cls in readers if (r := _settings_refusal(cls, where, {key: value}))}
        if len(refusals) < len(readers):
            continue  # some layout takes this key as it is
        if all(declared[name] and key not in declared[name] for name in names):
            known = sorted({k for name in names for k in declared[name]})
            close = difflib.get_close_matches(str(key), known, n=1)
            message = (f"unknown key (did you mean {close[0]!r}?): not a setting of {of_layouts}" if close else
                       f"unknown key: not a setting of {of_layouts} (known: {', '.join(known)})")
        else:
            message = "; ".join(r for name, r in refusals.items() if not declared[name] or key in declared[name])
        loc = ("project", "source_settings", key)
        problems.append(ConfigProblem(*_where(files, loc), _dotted(loc), message))
    if not problems:  # each key suits some layout, but no layout takes them all
        loc = ("project", "source_settings")
        message = "no layout takes these settings together: " + "; ".join(
            f"{cls.layout}: {_settings_refusal(cls, where, settings)}" for cls in readers)
        problems.append(ConfigProblem(*_where(files, loc), _dotted(loc), message))
    return layout, problems


def _project_folder(project: ProjectSection, data_root: str | Path | None) -> Path | None:
    """The project's folder if it exists now (under ``data_root``, default the service's data root)."""
    try:
        return project.locate(Path(data_root) if data_root is not None else get_settings().data_root)[1]
    except (PipelineError, OSError):
        return None


def _layout_readers(layout: str | None, folder: Path | None) -> list[type]:
    """The reader class of the forced or detected layout; every layout's when neither is known."""
    from stages.errors import InputError
    from stages.sources import _layouts, open_project  # _layouts: the reader classes, in detection order

    if layout is not None:
        return [cls for cls in _layouts() if cls.layout == layout]
    if folder is not None:
        try:
            return [type(open_project(folder))]  # detection only: no settings given
        except (InputError, ValueError):
            pass
    return _layouts()


def _settings_refusal(reader: type, folder: Path, settings: dict[str, Any]) -> str | None:
    """Why the layout's reader refuses ``settings`` (None: it takes them)."""
    from stages.errors import LocatedError

    try:
        reader(folder, settings)
    except LocatedError as err:
        return err.problem
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _declared_settings(layout: str) -> frozenset[str]:
    """The setting keys a layout declares, for "did you mean" (empty for a layout that declares none)."""
    from stages.sources import nextpoints, sustech

    declared = {"nextpoints": nextpoints.SETTINGS_KEYS, "sustech": sustech.DEFAULT_SETTINGS}
    return frozenset(declared.get(layout, ()))
