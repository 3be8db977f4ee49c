"""Output formats, registered by the request's ``export_format`` value."""
from __future__ import annotations

from stages.formats.base import OutputFormat


def available_formats() -> dict[str, type[OutputFormat]]:
    from stages.formats.nuscenes import NuScenesFormat

    formats: dict[str, type[OutputFormat]] = {NuScenesFormat.name: NuScenesFormat}
    try:
        from stages.formats.kitti import KittiFormat
    except ImportError:  # pragma: no cover - until the KITTI writer lands
        pass
    else:
        formats[KittiFormat.name] = KittiFormat
    return formats


def get_format(name: str) -> type[OutputFormat]:
    formats = available_formats()
    try:
        return formats[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; known: {', '.join(sorted(formats))}") from None
