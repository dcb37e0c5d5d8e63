"""``/health`` and ``/metrics``: open (no token), and free of task data."""
from __future__ import annotations

from apiflask import APIBlueprint
from flask import Response

from api import current, metrics
from api.schemas import HealthOut
from helpers import reports

bp = APIBlueprint("monitoring", __name__, tag="Monitoring")


@bp.get("/health")
@bp.output(HealthOut, description="healthy")
@bp.doc(responses={503: {"description": "a check failed", "content": {"application/json": {"schema": HealthOut}}}})
def health():
    """Liveness and readiness: database, workers, disk, breakers, last backup."""
    healthy, checks = reports.health(current.db(), current.config())
    return {"status": "ok" if healthy else "fail", "checks": checks}, 200 if healthy else 503


@bp.get("/metrics")
@bp.doc(responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus():
    """Prometheus metrics."""
    return Response(metrics.render(current.db(), current.config(), current.http_metrics()), mimetype=metrics.CONTENT_TYPE.split(";")[0],
                    content_type=metrics.CONTENT_TYPE)
