"""Errors raised by the conversion stages.

Every error about the input names the frame and the file that caused it, so that it can end up verbatim in
the export job's error report.
"""
from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """Base class of every error the stages raise on purpose."""


class InputError(ExportError):
    """The input project is wrong: a malformed label, a truncated point cloud, a missing calibration...

    Input errors are permanent: retrying the task cannot fix them.
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, frame: str | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.frame = frame
        parts = []
        if frame is not None:
            parts.append(f"frame {frame}")
        if self.path is not None:
            parts.append(f"file {self.path}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {problem}" if where else problem)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self), "problem": self.problem,
                "frame": self.frame, "file": self.path}


class PointCloudError(InputError):
    """A point cloud file cannot be read (bad header, truncated data, garbled compression)."""


class CancelledExport(ExportError):
    """Raised inside a batch when the export was cancelled; the batch stops at a frame boundary."""


class RequestError(ValueError):
    """A request the output format cannot honour; ``field`` is the request field at fault (dotted path)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(reason)
