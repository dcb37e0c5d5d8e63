"""The Flask app: ``create_app(config)``. Routes live in api/queues.py and api/monitoring.py.

Every error is JSON: ``{"error": {"code": 404, "message": "...", "field": "..." | null}}``.
"""
from __future__ import annotations

import sqlite3
import time

from apiflask import APIFlask, HTTPTokenAuth
from apiflask.exceptions import HTTPError
from flask import g, request
from werkzeug.exceptions import HTTPException

from api import metrics
from api.auth import load_or_create_token, token_matches
from api.schemas import ErrorOut
from helpers import log
from helpers.config import Config, load_config
from helpers.queue_manager import PayloadTooLarge, get_database

auth = HTTPTokenAuth(scheme="Bearer", description="the token from `oos token`")


def create_app(config: Config | None = None) -> APIFlask:
    config = config or load_config()
    app = APIFlask("oos", title="OOS", version="1", spec_path="/api/v1/openapi.json", docs_path=None)
    app.config.update(
        MAX_CONTENT_LENGTH=config.api_max_request_bytes,
        VALIDATION_ERROR_STATUS_CODE=422,
        VALIDATION_ERROR_SCHEMA=ErrorOut,
        HTTP_ERROR_SCHEMA=ErrorOut,
        SPEC_FORMAT="json",
        INFO={"description": "Inspect and control the OOS task queue. Every /api route needs "
                             "`Authorization: Bearer <token>`."},
    )
    app.extensions["oos"] = {"config": config, "db": get_database(config),
                             "token": load_or_create_token(config)}
    app.logger.disabled = True  # errors are answered as JSON and logged with structlog below

    @auth.verify_token
    def verify(token):
        return "operator" if token_matches(token, app.extensions["oos"]["token"]) else None

    @auth.error_processor
    def auth_error(error):
        return error_body(401, "missing or wrong bearer token", "Authorization",
                          headers={"WWW-Authenticate": 'Bearer realm="oos"'})

    @app.error_processor
    def http_error(error: HTTPError):
        if error.status_code == 422 and isinstance(error.detail, dict):
            field, message = first_problem(error.detail)
            return error_body(422, message, field)
        return error_body(error.status_code, error.message or "error", None, headers=error.headers)

    @app.errorhandler(HTTPException)
    def werkzeug_error(error: HTTPException):
        messages = {413: f"request body over {config.api_max_request_bytes} bytes",
                    405: f"method {request.method} is not allowed here",
                    404: f"no such path: {request.path}",
                    400: "the body is not valid JSON" if request.is_json else error.description}
        field = "body" if error.code in (400, 413) else None
        return error_body(error.code or 500, messages.get(error.code, error.description), field)

    @app.errorhandler(PayloadTooLarge)
    def payload_too_large(error):
        return error_body(413, str(error), field_of(error))

    @app.errorhandler(ValueError)
    def bad_value(error):
        return error_body(400, str(error), field_of(error))

    @app.errorhandler(sqlite3.Error)
    def database_error(error):
        text = str(error)
        log.get_logger().error("database error in request", path=request.path, error=text)
        if "full" in text:
            return error_body(507, "the disk is full: nothing was written; retry when space is freed", None)
        return error_body(503, f"the database is unavailable ({text}); nothing was written", None)

    @app.errorhandler(Exception)
    def unexpected(error):
        log.get_logger().error("unexpected error in request", path=request.path,
                               error=f"{type(error).__name__}: {error}", exc_info=True)
        return error_body(500, "internal error; see the daemon's log", None)

    @app.before_request
    def checks():
        g.started = time.perf_counter()
        if request.method in ("POST", "PUT", "PATCH") and request.content_length and not request.is_json:
            return error_body(415, "send the body as application/json", "Content-Type")

    @app.after_request
    def count(response):
        metrics.observe_request(request, response, time.perf_counter() - g.get("started", time.perf_counter()))
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    from api import assistant, monitoring, queues
    app.register_blueprint(queues.bp)
    app.register_blueprint(assistant.bp)
    app.register_blueprint(monitoring.bp)
    return app


def error_body(code: int, message: str, field: str | None, headers=None):
    return {"error": {"code": code, "message": message, "field": field}}, code, headers or {}


def field_of(error: Exception) -> str | None:
    """Our ValueErrors read ``"<field>: <problem>"``."""
    head, sep, _ = str(error).partition(": ")
    return head if sep and " " not in head else None


def first_problem(detail: dict) -> tuple[str | None, str]:
    """The first field and message of a marshmallow error tree, as ``tasks.2.payload``."""
    path = []
    node = detail
    for location in ("json", "query", "path"):
        if location in node:
            node = node[location]
            break
    while isinstance(node, dict) and node:
        key = sorted(node, key=str)[0]
        path.append(str(key))
        node = node[key]
    message = node[0] if isinstance(node, list) and node else str(node)
    if path and path[-1] == "_schema":
        path.pop()
    return (".".join(path) or None), f"{'.'.join(path) or 'body'}: {message}"
