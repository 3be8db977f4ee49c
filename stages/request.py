"""What a user asks of an export: one pydantic model shared by the HTTP API, YAML configs and the CLI.

Field names follow NextPoints' own export API (see ../shared/docs/input-formats.md). Unknown keys are
rejected so that a misspelled option is an error, never silently ignored.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportFormatName(str, Enum):
    nuscenes = "nuscenes_v1.0"
    kitti = "kitti"


class CoordinateSystem(str, Enum):
    global_ = "global"
    ego_vehicle = "ego_vehicle"
    lidar = "lidar"


class ArchiveFormat(str, Enum):
    zip = "zip"
    tar_gz = "tar.gz"
    tar_zst = "tar.zst"
    none = "none"


class BBoxSizeFilter(Strict):
    """Inclusive bounds in metres; None = unbounded."""

    min_length: float | None = None
    max_length: float | None = None
    min_width: float | None = None
    max_width: float | None = None
    min_height: float | None = None
    max_height: float | None = None


class AnnotationFilter(Strict):
    object_types: list[str] | None = Field(None, description="NextPoints type names, case-insensitive; None = all")
    min_points: int | None = Field(None, ge=0, description="drop boxes with fewer lidar points")
    confidence_threshold: float | None = Field(None, ge=0, le=1, description="drop labels with a lower score")
    bbox_size_filter: BBoxSizeFilter | None = None


class ExportOptions(Strict):
    include_images: bool = True
    include_pointcloud: bool = True
    include_sweeps: bool = False
    key_frame_interval: int = Field(1, ge=1, description="every Nth frame is a key frame (sample); others are sweeps")
    include_ego_pose: bool = True
    compress_output: bool = True
    output_format: ArchiveFormat = ArchiveFormat.zip
    coordinate_precision: int | None = Field(None, ge=0, le=12, description="decimals kept in table floats")

    @property
    def archive_format(self) -> ArchiveFormat:
        """What compress writes: ``output_format``, or a plain folder when ``compress_output`` is false."""
        return self.output_format if self.compress_output else ArchiveFormat.none


class FrameSelection(Strict):
    """NextPoints' nested spelling of the frame selection; lifted to the top-level fields on validation."""

    start_frame: str | int | None = None
    end_frame: str | int | None = None
    frame_step: int = Field(1, ge=1)
    max_frames: int | None = Field(None, ge=1)


class ExportRequest(Strict):
    export_format: ExportFormatName = ExportFormatName.nuscenes
    coordinate_system: CoordinateSystem | None = Field(
        None, description="None = the format's natural frame: global for nuScenes, lidar for KITTI")
    annotation_filter: AnnotationFilter = Field(default_factory=AnnotationFilter)
    export_options: ExportOptions = Field(default_factory=ExportOptions)
    start_frame: str | int | None = None
    end_frame: str | int | None = None
    frame_step: int = Field(1, ge=1)
    max_frames: int | None = Field(None, ge=1)
    version: str = Field("v1.0-trainval", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                         description="nuScenes version folder; mmdetection3d accepts v1.0-trainval|v1.0-test|v1.0-mini")
    priority: int = Field(5, ge=0, le=10)
    frame_selection: FrameSelection | None = Field(None, exclude=True,
                                                   description="alternative nested form of start/end/step/max")

    @model_validator(mode="after")
    def _lift_frame_selection(self) -> "ExportRequest":
        if self.frame_selection is None:
            return self
        nested = self.frame_selection.model_fields_set
        both = sorted(nested & self.model_fields_set)
        if both:
            raise ValueError(f"{', '.join(both)} given both in frame_selection and at the top level")
        for name in nested:
            setattr(self, name, getattr(self.frame_selection, name))
        self.frame_selection = None
        return self
