"""``/health`` and ``/metrics``: open (no token), and free of task data."""
from __future__ import annotations

from apiflask import APIBlueprint
from flask import Response, current_app

from api import metrics, reports
from api.schemas import HealthOut

bp = APIBlueprint("monitoring", __name__, tag="Monitoring")


@bp.get("/health")
@bp.output(HealthOut, description="healthy")
@bp.doc(responses={503: {"description": "a check failed", "content": {"application/json": {"schema": HealthOut}}}})
def health():
    """Liveness and readiness: database, workers, disk, breakers, last backup."""
    ext = current_app.extensions["oos"]
    healthy, checks = reports.health(ext["db"], ext["config"])
    return {"status": "ok" if healthy else "fail", "checks": checks}, 200 if healthy else 503


@bp.get("/metrics")
@bp.doc(responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def prometheus():
    """Prometheus metrics."""
    ext = current_app.extensions["oos"]
    return Response(metrics.render(ext["db"], ext["config"]), mimetype=metrics.CONTENT_TYPE.split(";")[0],
                    content_type=metrics.CONTENT_TYPE)
