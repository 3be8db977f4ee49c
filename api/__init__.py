"""The HTTP face of the export service: FastAPI app, request/response models, routes, download streaming.

Talks to ``pipeline.service`` only; the request body model is ``stages.request.ExportRequest``.
"""
