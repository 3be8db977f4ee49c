"""Errors the pipeline facade (``pipeline.service``) raises; the API maps each to one HTTP status."""
from __future__ import annotations


class PipelineError(Exception):
    """Base class of the facade's errors."""


class ProjectNotFound(PipelineError):
    """No project folder of that name under the data root (404)."""

    def __init__(self, project: str, reason: str = "no such project under the data root"):
        self.project = project
        self.reason = reason
        super().__init__(f"project {project!r}: {reason}")


class JobNotFound(PipelineError):
    """No export job with that id (404)."""

    def __init__(self, export_id: str):
        self.export_id = export_id
        super().__init__(f"no export {export_id!r}")


class JobNotCancellable(PipelineError):
    """The export already ended (completed, failed or cancelled) (409)."""

    def __init__(self, export_id: str, status: str):
        self.export_id = export_id
        self.status = status
        super().__init__(f"export {export_id} is {status}: only pending or processing exports can be cancelled")


class ExportNotReady(PipelineError):
    """The archive of an export that has not completed was asked for (409)."""

    def __init__(self, export_id: str, status: str):
        self.export_id = export_id
        self.status = status
        super().__init__(f"export {export_id} is {status}: its archive exists once it is completed")


class InvalidExportRequest(PipelineError):
    """The request cannot be honoured for this format or project (422)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class JobNotRetryable(PipelineError):
    """The export cannot be rerun from the asked stage: it has not failed, or its staged files do not allow it
    (409)."""

    def __init__(self, export_id: str, reason: str):
        self.export_id = export_id
        self.reason = reason
        super().__init__(f"export {export_id} cannot be rerun: {reason}")
