"""Liveness for load balancers and compose health checks: 200 while the pipeline's Redis answers, else 503."""
from __future__ import annotations

from fastapi import APIRouter, Response, status

from pipeline import service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 when Redis (broker, result backend, job records) answers, 503 otherwise")
def healthz(response: Response) -> dict:
    try:
        service.ping()
    except Exception as exc:  # any failure to reach Redis means "not healthy", whatever its type
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "unavailable", "redis": False, "detail": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "redis": True}
