"""Every error the API answers is JSON: ``{"error": {"code", "message", "field"}}``.

``register(app)`` installs the handlers: schema errors (422), bad values (400, the field taken
from ``InvalidField.field``), too-large payloads (413), Werkzeug's own errors, database errors
(507 disk full, 503 otherwise), and anything else (500, logged, no traceback in the body).
"""
from __future__ import annotations

from apiflask import abort
from apiflask.exceptions import HTTPError
from flask import request
from werkzeug.exceptions import HTTPException

from api import current
from helpers import log
from helpers.engine import DATABASE_ERRORS, disk_full
from helpers.queue_manager import PayloadTooLarge
from helpers.validation import InvalidField, shown


def error_body(code: int, message: str, field: str | None, headers=None):
    return {"error": {"code": code, "message": message, "field": field}}, code, headers or {}


def or_404(value, what: str):
    """``value``, or a 404 saying there is no ``what`` (e.g. "task 7") when it is None."""
    if value is None:
        abort(404, f"no {what}")
    return value


def register(app) -> None:
    app.error_processor(schema_or_abort)
    app.register_error_handler(HTTPException, werkzeug_error)
    app.register_error_handler(PayloadTooLarge, lambda e: error_body(413, str(e), e.field))
    app.register_error_handler(ValueError, bad_value)
    app.register_error_handler(RecursionError, lambda e: error_body(400, "body: JSON nested too deeply", "body"))
    for error in DATABASE_ERRORS:
        app.register_error_handler(error, database_error)
    app.register_error_handler(Exception, unexpected)


def schema_or_abort(error: HTTPError):
    if error.status_code == 422 and isinstance(error.detail, dict):
        field, message = first_problem(error.detail)
        return error_body(422, message, field)
    return error_body(error.status_code, error.message or "error", None, headers=error.headers)


def werkzeug_error(error: HTTPException):
    messages = {413: f"request body over {current.config().api_max_request_bytes} bytes",
                405: f"method {request.method} is not allowed here",
                404: f"no such path: {shown(request.path)}",
                400: "the body is not valid JSON" if request.is_json else error.description}
    field = "body" if error.code in (400, 413) else None
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
    return error_body(error.code or 500, messages.get(error.code, error.description), field, headers)


def bad_value(error: ValueError):
    if isinstance(error, InvalidField):
        return error_body(400, str(error), error.field)
    # Someone else's ValueError: its text speaks of Python's internals, not of the request. With
    # a JSON body, it came from reading it (json reads an integer of over 4300 digits so).
    if request.is_json:
        return error_body(400, "body: a value in it is malformed or out of range", "body")
    return error_body(400, "a value in the request is malformed or out of range", None)


def database_error(error: Exception):
    text = str(error)
    log.get_logger().error("database error in request", path=request.path, error=text)
    if "decode" in text:  # the database answers, but a stored value is damaged
        return error_body(500, "a stored value is damaged and cannot be read (run `oos status` and "
                               "see the daemon's integrity check); nothing was changed", None)
    if disk_full(error):
        return error_body(507, "the disk is full: nothing was written; retry when space is freed", None)
    return error_body(503, f"the database is unavailable ({text}); nothing was written", None)


def unexpected(error: Exception):
    log.get_logger().error("unexpected error in request", path=request.path,
                           error=f"{type(error).__name__}: {error}", exc_info=True)
    return error_body(500, "internal error; see the daemon's log", None)


def first_problem(detail: dict) -> tuple[str | None, str]:
    """The first field and message of a marshmallow error tree, named as the queue names
    them (``tasks[2].payload``), so a field reads the same whichever check refused it."""
    path = []
    node = detail
    for location in ("json", "query", "path"):
        if location in node:
            node = node[location]
            break
    while isinstance(node, dict) and node:
        key = sorted(node, key=str)[0]
        path.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        node = node[key]
    message = node[0] if isinstance(node, list) and node else str(node)
    if path and path[-1] == "._schema":
        path.pop()
    # Nothing deeper: the body as a whole (e.g. a list, not an object).
    field = "".join(path).removeprefix(".") or "body"
    return field, f"{field}: {message}"
