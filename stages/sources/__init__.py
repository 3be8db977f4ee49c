"""Input layouts. ``open_project`` detects a project's layout by its folders and returns its reader."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.errors import InputError
from stages.sources.base import ProjectSource


def _layouts() -> list[type[ProjectSource]]:
    # Imported lazily so a layout module can be added without touching callers; order = detection priority.
    from stages.sources.nextpoints import NextPointsSource

    layouts: list[type[ProjectSource]] = [NextPointsSource]
    try:
        from stages.sources.sustech import SustechSource
    except ImportError:  # pragma: no cover - until the legacy layout lands
        pass
    else:
        layouts.append(SustechSource)
    return layouts


def layout_names() -> list[str]:
    """The names of the known input layouts (``open_project``'s ``layout``), in detection order."""
    return [cls.layout for cls in _layouts()]


def open_project(project_dir: str | Path, settings: dict[str, Any] | None = None,
                 layout: str | None = None) -> ProjectSource:
    """Reader for ``project_dir``; ``layout`` forces a layout by name instead of detecting it."""
    project_dir = Path(project_dir)
    if not project_dir.is_dir():
        raise InputError("project folder does not exist", path=project_dir)
    for cls in _layouts():
        if (layout is None and cls.detect(project_dir)) or cls.layout == layout:
            return cls(project_dir, settings)
    known = ", ".join(c.layout for c in _layouts())
    raise InputError(f"not a known project layout ({known})" if layout is None else f"unknown layout {layout!r}",
                     path=project_dir)
