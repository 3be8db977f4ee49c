"""The interface every output format implements (one module per format in ``stages/formats/``).

A format sees frames one at a time in ``convert_frame`` (inside a batch task, possibly on another machine)
and all rows at once in ``merge``. Rows are plain dicts of JSON-able scalars/lists; the convert stage stores
them per batch as Arrow IPC files, one file per table name, and hands ``merge`` one concatenated
``pyarrow.Table`` per table name. Nothing outside the format module knows its file layout or row schema.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from stages.model import LoadedFrame
from stages.request import CoordinateSystem

if TYPE_CHECKING:
    from stages.plan import ExportPlan
    from stages.request import ExportRequest


class OutputFormat(ABC):
    name: ClassVar[str]  # the request's export_format value, e.g. "nuscenes_v1.0"
    mapping_name: ClassVar[str | None] = None  # configs/mappings/<name>.yaml, loaded into plan.mappings
    # top-level sections of the mapping that are name tables (a config's override may add names to them)
    open_mapping_sections: ClassVar[tuple[str, ...]] = ()
    default_coordinate_system: ClassVar[str] = "global"  # used when the request leaves it unset

    def __init__(self, plan: "ExportPlan", output_dir: Path):
        self.plan = plan
        self.output_dir = Path(output_dir)

    @classmethod
    def check_request(cls, request: "ExportRequest") -> None:
        """Raise ``ValueError`` with a user-facing reason when the request makes no sense for this format
        (e.g. a coordinate_system the format cannot express). Called by discover and by the API (→ 422)."""

    @classmethod
    def reads_ego_poses(cls, request: "ExportRequest") -> bool:
        """Whether discover reads the project's ego poses for this request (else every plan pose is the identity).
        By default: unless ``coordinate_system`` is ``ego_vehicle``, which puts the global frame on the ego."""
        return request.coordinate_system != CoordinateSystem.ego_vehicle

    @classmethod
    def check_mapping(cls, mapping: dict[str, Any], layout: str | None = None) -> None:
        """Raise ``ValueError`` naming the offending entry when ``mapping`` (the mapping file, possibly with a
        config's overrides merged in) is not usable. Called before an export starts."""

    @abstractmethod
    def convert_frame(self, frame: LoadedFrame) -> dict[str, list[dict[str, Any]]]:
        """Write this frame's sensor files under ``output_dir`` and return its rows per table name.

        Must be idempotent: converting the same frame again overwrites the same files.
        """

    @abstractmethod
    def annotations_in(self, rows: dict[str, list[dict[str, Any]]]) -> int:
        """How many annotations the rows ``convert_frame`` returned for one frame export: summed over all
        frames, merge's ``annotations`` count (so a batch's progress count agrees with the final one)."""

    @abstractmethod
    def merge(self, tables: dict[str, pa.Table]) -> dict[str, int]:
        """Link rows across frames, write the format's final tables under ``output_dir``; return counts
        (at least ``frames`` and ``annotations``)."""
