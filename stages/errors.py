"""Errors raised by the conversion stages.

Every error about the input names the frame and the file that caused it, so that it can end up verbatim in
the export job's error report.
"""
from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """Base class of every error the stages raise on purpose."""


class LocatedError(ExportError):
    """An error about one input file, naming the frame and the file (either may be unknown)."""

    def __init__(self, problem: str, *, path: str | Path | None = None, frame: str | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.frame = frame
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.frame is not None:
            parts.append(f"frame {self.frame}")
        if self.path is not None:
            parts.append(f"file {self.path}")
        where = ", ".join(parts)
        return f"{where}: {self.problem}" if where else self.problem

    def at_frame(self, frame: str) -> "LocatedError":
        """Name ``frame`` when the reader that raised this did not know it (returns self)."""
        if self.frame is None:
            self.frame = frame
            self.args = (self._message(),)
        return self

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self), "problem": self.problem,
                "frame": self.frame, "file": self.path}


class InputError(LocatedError):
    """The input project is wrong: a malformed label, a truncated point cloud, a missing calibration...

    Input errors are permanent: retrying the task cannot fix them.
    """


class PointCloudError(InputError):
    """A point cloud file cannot be read (bad header, truncated data, garbled compression)."""


class InputUnavailable(LocatedError):
    """An input file is there but could not be read just now: permission denied, an I/O error of the shared
    storage, a folder where a file should be. Unlike ``InputError`` this may pass, so the pipeline retries the
    task with backoff before it gives up. (A missing file is an ``InputError``: it will not appear by itself.)"""


def unreadable(exc: OSError, path: str | Path, frame: str | None = None) -> LocatedError:
    """The error for an ``OSError`` raised while reading input ``path``: a missing file is permanent
    (``InputError``), anything else (``InputUnavailable``) is worth a retry."""
    if isinstance(exc, FileNotFoundError):
        return InputError("file not found", path=path, frame=frame)
    return InputUnavailable(f"cannot read file: {exc.strerror or exc}", path=path, frame=frame)


class CancelledExport(ExportError):
    """Raised inside a batch when the export was cancelled; the batch stops at a frame boundary."""


class RequestError(ValueError):
    """A request the output format cannot honour; ``field`` is the request field at fault (dotted path)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(reason)
