"""The nuScenes v1.0 output format (``export_format: nuscenes_v1.0``).

Dataset tree written under the export's output folder (the nuScenes ``dataroot``)::

    <version>/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,sample_annotation,
               sample_data,scene,sensor,visibility}.json + splits.json     merge
    samples/<CHANNEL>/<project>__<CHANNEL>__<timestamp_us>.{pcd.bin,jpg}     convert, key frames
    sweeps/<CHANNEL>/...                                                    convert, non-key frames
    maps/<map_token>.png                                                    merge (a 1×1 semantic prior)

(A key-frame camera image filled in from the nearest frame, ``missing_image_policy: nearest``, is named with its
sample's timestamp; its sample_data ``timestamp`` is the image's own. See ``convert.py``.)

One project is one nuScenes log and one scene, named after the project. Modules: ``convert.py`` (per-frame
files and rows), ``tables.py`` (links and table writing), ``mapping.py`` (``configs/mappings/nuscenes.yaml``),
``vocabulary.py`` (official names), ``tokens.py`` (deterministic tokens), ``lidar_pts.py`` (``num_lidar_pts`` as
the devkit recounts it), ``rounding.py`` (how table floats are written). The rules this follows are in
``../shared/docs/nuscenes-rules.md``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from stages.errors import RequestError
from stages.formats.base import OutputFormat
from stages.formats.images import ImageIndex
from stages.formats.nuscenes.convert import FrameConverter
from stages.formats.nuscenes.mapping import NuScenesMapping
from stages.model import LoadedFrame
from stages.request import CoordinateSystem

if TYPE_CHECKING:
    from stages.plan import ExportPlan
    from stages.request import ExportRequest

__all__ = ["NuScenesFormat"]


class NuScenesFormat(OutputFormat):
    name = "nuscenes_v1.0"
    mapping_name = "nuscenes"
    open_mapping_sections = ("categories", "channels", "layouts")

    def __init__(self, plan: "ExportPlan", output_dir: Path):
        super().__init__(plan, output_dir)
        self.mapping = NuScenesMapping.from_dict(plan.mappings, plan.layout)
        self.channel_map, self.skipped_channels = self.mapping.channel_map(plan.calibration, plan.main_lidar)
        self._converter: FrameConverter | None = None

    @classmethod
    def check_mapping(cls, mapping: dict[str, Any], layout: str | None = None) -> None:
        NuScenesMapping.from_dict(mapping, layout)

    @classmethod
    def check_request(cls, request: "ExportRequest") -> None:
        if request.coordinate_system == CoordinateSystem.lidar:
            raise RequestError("coordinate_system", "nuScenes stores boxes in the global frame and sensor data in the sensor frame; "
                             "coordinate_system 'lidar' has no meaning here, use 'global' or 'ego_vehicle'")
        if not request.export_options.include_ego_pose:
            raise RequestError("export_options.include_ego_pose", "nuScenes cannot leave out ego poses: every "
                               "sample_data links to an ego_pose row, which the devkit and mmdetection3d use to place "
                               "boxes and sensors; keep include_ego_pose true (with coordinate_system ego_vehicle "
                               "every ego pose is the identity, for a project without localisation)")

    @property
    def converter(self) -> FrameConverter:
        if self._converter is None:
            opts = self.plan.request.export_options
            self._converter = FrameConverter(
                project=self.plan.project_name, output_dir=self.output_dir, mapping=self.mapping,
                channel_map=self.channel_map, calibration=self.plan.calibration, main_lidar=self.plan.main_lidar,
                include_pointcloud=opts.include_pointcloud, include_images=opts.include_images,
                frames=self.plan.frames, ego_poses=self.plan.ego_poses,
                coordinate_precision=opts.coordinate_precision)
        return self._converter

    def convert_frame(self, frame: LoadedFrame) -> dict[str, list[dict[str, Any]]]:
        """Write the frame's lidar file (``samples/`` or ``sweeps/``) and camera JPEGs; return its rows."""
        return self.converter.convert(frame)

    def annotations_in(self, rows: dict[str, list[dict[str, Any]]]) -> int:
        return len(rows.get("sample_annotation", ()))

    def merge(self, tables: Mapping[str, pa.Table]) -> dict[str, int]:
        """Link and write the tables under ``<output_dir>/<request.version>/``; returns counts (frames, samples,
        sample_data, annotations, instances, dropped_unknown_types and per-type ``dropped_unknown_type.<t>``,
        skipped channels, missing images and those filled from the nearest frame, attributes...).

        Tables are built and written one at a time, each from only the staged columns it needs (``tables`` may
        be a ``stages.merge.BatchTables``, which reads them on demand)."""
        # imported here: tables.py needs pyarrow.compute (~9 MB RSS), which convert workers need not load
        from stages.formats.nuscenes.tables import TableBuilder, write_dataset

        plan = self.plan
        builder = TableBuilder(
            project=plan.project_name, frame_order={f.frame_id: i for i, f in enumerate(plan.frames)},
            first_timestamp_us=min(f.timestamp_us for f in plan.frames), mapping=self.mapping,
            channel_map=self.channel_map, skipped_channels=self.skipped_channels, calibration=plan.calibration)
        # one project is one scene, named after the project
        written = write_dataset(self.output_dir, plan.request.version, builder.build(tables),
                                {self.mapping.split_name: [plan.project_name]},
                                plan.request.export_options.coordinate_precision)
        counts = dict(builder.counts)
        counts.update({f"table.{name}": n for name, n in written.items()})
        counts["frames"] = len(plan.frames)
        counts["scenes"] = written["scene"]
        if plan.request.export_options.include_images:
            missing = [(i, ch) for i, f in enumerate(plan.frames) for ch, path in f.cameras.items()
                       if path is None and ch in self.channel_map]
            counts["missing_images"] = len(missing)
            if self.mapping.missing_image_policy == "nearest":
                images = ImageIndex(plan.frames)
                counts["filled_images"] = sum(1 for i, ch in missing if plan.key_frames[i]
                                              and images.nearest(ch, plan.frames[i].timestamp_us) is not None)
        return dict(sorted(counts.items()))
