"""The interface every input layout implements (one module per layout in ``stages/sources/``)."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from stages.errors import InputError, InputUnavailable, PointCloudError, unreadable
from stages.geometry import Pose
from stages.model import BoxLabel, FrameRef, SensorCalib


def read_json_input(path: str | Path, frame: str | None = None) -> Any:
    """An input JSON file (label, pose, calibration); errors name the file and frame. A missing or broken file
    is an ``InputError``; any other read error an ``InputUnavailable`` (it may pass: retried by the pipeline)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError("file not found", path=path, frame=frame) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}", path=path, frame=frame) from None
    except OSError as exc:
        raise unreadable(exc, path, frame) from None


class ProjectSource(ABC):
    """A project folder read as frames + calibration in the internal model.

    ``settings`` are per-project source settings (e.g. SUSTechPOINTS' lidar axis convention); each layout
    documents the keys it reads and rejects unknown ones.
    """

    layout: ClassVar[str]  # "nextpoints" | "sustech"

    def __init__(self, project_dir: Path, settings: dict[str, Any] | None = None):
        self.project_dir = Path(project_dir)
        self.settings = dict(settings or {})

    @property
    def project_name(self) -> str:
        """The recording's name (used for scene/log names); layouts with a fixed inner folder override it."""
        return self.project_dir.resolve().name

    def setting_warnings(self) -> list[str]:
        """Export-wide warnings about how the project is read: a setting left at a default that is often wrong
        for this layout. Discover puts them in the job's and the manifest's warnings."""
        return []

    @classmethod
    @abstractmethod
    def detect(cls, project_dir: Path) -> bool:
        """True when ``project_dir`` looks like this layout (by its folders, nothing is parsed)."""

    @property
    @abstractmethod
    def main_lidar(self) -> str:
        """The source channel whose frames define the recording (e.g. "lidar-fusion")."""

    @abstractmethod
    def calibration(self) -> dict[str, SensorCalib]:
        """Every sensor's calibration, keyed by source channel name; the main lidar is always present."""

    @abstractmethod
    def frames(self) -> list[FrameRef]:
        """All frames, sorted by time. Reads directory listings only."""

    @abstractmethod
    def read_points(self, frame: FrameRef) -> np.ndarray:
        """Main-lidar points of ``frame``: (N, 5) float32 x, y, z, intensity, ring (0 when absent), lidar frame.

        Raises ``PointCloudError`` naming the frame and file when the file is missing or unreadable.
        """

    @abstractmethod
    def read_ego_pose(self, frame: FrameRef) -> Pose | None:
        """ego→global pose of ``frame``, or None when the frame has no pose file."""

    @abstractmethod
    def read_labels(self, frame: FrameRef) -> list[BoxLabel]:
        """Boxes of ``frame`` in the main lidar frame; [] when the frame has no label file.

        Raises ``InputError`` naming the frame and file for a malformed label.
        """

    @staticmethod
    def read_cloud_file(frame: FrameRef, path: str | None, reader: Callable[[str], np.ndarray]) -> np.ndarray:
        """``reader(path)``, with the frame id added to any error it raises (the readers know only the file)."""
        if path is None:
            raise PointCloudError("frame has no point cloud for the main lidar", frame=frame.frame_id)
        try:
            return reader(path)
        except InputUnavailable as err:
            raise err.at_frame(frame.frame_id)
        except PointCloudError as err:
            if err.frame is not None:
                raise
            raise PointCloudError(err.problem, path=err.path or path, frame=frame.frame_id) from err
