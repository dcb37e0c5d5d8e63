"""The Flask app: ``create_app(config)``, flaskr's way.

Routes: api/queues.py (``/api/v1`` queues and tasks), api/assistant.py (``/api/v1/assistant``),
api/monitoring.py (``/health``, ``/metrics``). ``auth`` is in api/auth.py, error handlers in
api/errors.py, what a handler works on (database, config) in api/current.py.
"""
from __future__ import annotations

import threading
import time
import warnings

from apiflask import APIFlask
from apiflask.schema_adapters.marshmallow import parser
from flask import current_app, g, redirect, request, url_for

from api import assistant, current, docs, errors, metrics, monitoring, queues, tasks, web
from api.auth import verify
from api.identity import INSTANCE_HEADER, load_or_create_token
from api.schemas import ErrorOut
from helpers import log
from helpers.config import Config, load_config
from helpers.config import reload as reload_config
from helpers.engine import get_database
from helpers.validation import QUEUE_NAME_RE, QUEUE_NAME_RULE, shown

# APIFlask hands apispec each response schema once more after it met it nested in another;
# the refs resolve to the same class, so this warning says nothing true about our spec.
warnings.filterwarnings("ignore", message=r".* has already been added to the spec", category=UserWarning)


API_MODULES = (queues, tasks, assistant, monitoring)
API_BLUEPRINTS = frozenset(module.bp.name for module in API_MODULES)  # the JSON API: not the dashboard


def create_app(config: Config | None = None, instance: str = "", reload: threading.Event | None = None) -> APIFlask:
    """The API for ``config`` (default: the loaded configuration). ``instance`` is a nonce
    sent back on every response, so the daemon knows it is its own API that answers. Once
    ``reload`` is set (the API process's SIGHUP), the next request reads the config again."""
    config = config or load_config()
    app = APIFlask("oos", title="OOS", version="1", spec_path="/api/v1/openapi.json", docs_path=None)
    app.config.update(MAX_CONTENT_LENGTH=config.api_max_request_bytes, VALIDATION_ERROR_STATUS_CODE=422,
                      VALIDATION_ERROR_SCHEMA=ErrorOut, HTTP_ERROR_SCHEMA=ErrorOut, SPEC_FORMAT="json",
                      AUTO_OPERATION_ID=True,  # get_task, enqueue_tasks...: a generated client's method names
                      INFO={"description": "Inspect and control the OOS task queue. Every /api route "
                                           "needs `Authorization: Bearer <token>`."})
    app.extensions["oos"] = {"config": config, "db": get_database(config),
                             "token": load_or_create_token(config), "instance": instance,
                             "http": metrics.HttpCollector(),
                             # ?wait= holds a server thread: at most half of them wait at once
                             "waiters": threading.BoundedSemaphore(max(1, config.api_threads // 2)),
                             "streams": threading.BoundedSemaphore(max(1, config.assistant_max_streams)),
                             "reload": reload, "reload_lock": threading.Lock()}
    app.logger.disabled = True  # errors are answered as JSON and logged with structlog
    errors.register(app)
    app.spec_processor(document_rules)
    # webargs drops unknown query parameters whatever the schema says: a misspelt filter would
    # widen a call to everything (dead-letter/purge?older_then=86400 purged every dead task).
    # With None, the schema's ``unknown`` (RAISE: a 422 naming the parameter) decides.
    parser.DEFAULT_UNKNOWN_BY_LOCATION = {**parser.DEFAULT_UNKNOWN_BY_LOCATION, "query": None, "querystring": None}
    app.before_request(before)
    app.after_request(after)
    app.url_map.converters["session_id"] = assistant.SessionId
    for module in API_MODULES:
        app.register_blueprint(module.bp)
    web.register(app, config)
    app.register_blueprint(docs.bp)  # /docs: Swagger UI, served from here
    # The root of the address a new user opens: the dashboard (which asks for a login). Not
    # part of the API's document.
    app.add_url_rule("/", "root", app.doc(hide=True)(lambda: redirect(url_for("web.overview"))))
    return app


# Answers a route gives besides its declared one, by (method, path): {status: description}.
OTHER_ANSWERS = {
    ("post", "/api/v1/queue/{name}/tasks"): {"200": "every task already existed (an idempotency or unique key)"},
    ("post", "/api/v1/assistant/sessions/{session_id}/messages"): {
        "200": "with ?wait=: the reply came within the wait (the message with its reply)"},
    ("post", "/api/v1/assistant/memories"): {"404": "no session with that session_id"},
}
# Rules across a body's fields, as JSON Schema says them: what the schema classes check in a
# validates_schema (api/schemas.py) or the route (one_or_many).
BODY_RULES = {
    "MemoryIn": {"anyOf": [{"required": ["session_id"]}, {"required": ["user_id"]}]},
}
ENQUEUE = "/api/v1/queue/{name}/tasks"
STREAM = "/api/v1/assistant/sessions/{session_id}/messages/{message_id}/stream"


def document_rules(spec: dict) -> dict:
    """What the decorators cannot say in the OpenAPI document: the queue-name rule on every
    queue name, path or query; the 400 every operation answers for a bad value; the other
    answers some routes give; a request body, where there is one, is required (but where none
    of its fields is: the body may then be left out); the rules across a body's fields; the reply stream is
    text/event-stream, not JSON."""
    bad = {"description": "a bad value: `error.field` names it",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["responses"].setdefault("400", bad)
            for status, description in OTHER_ANSWERS.get((method, path), {}).items():
                declared = bad if status.startswith("4") else \
                    next(iter(r for s, r in operation["responses"].items() if s.startswith("2")), {})
                operation["responses"].setdefault(status, dict(declared, description=description))
            _first_sentence_as_summary(operation)
            # apiflask's "get_tasks_get_task": the view's own name is unique and reads better
            operation["operationId"] = operation["operationId"].split("_", 2)[2]
            if "requestBody" in operation:
                operation["responses"].setdefault("413", dict(bad, description="the body is over api.max_request_bytes"))
                operation["responses"].setdefault("415", dict(bad, description="the body is not application/json"))
            if "requestBody" in operation:  # a body none of whose fields is required may be left out
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                name = body.get("$ref", "").rsplit("/", 1)[-1]
                operation["requestBody"]["required"] = bool(body.get("required") or name in BODY_RULES or
                                                            spec["components"]["schemas"].get(name, {}).get("required"))
            for parameter in operation.get("parameters", []):
                if (parameter["name"] == "name" and path.startswith("/api/v1/queue/{name}")) or \
                        (parameter["name"] == "queue" and parameter["in"] == "query"):
                    parameter["schema"].update(pattern=QUEUE_NAME_RE.pattern, minLength=1, maxLength=100,
                                               description=f"a queue name: {QUEUE_NAME_RULE}")
    schemas = spec["components"]["schemas"]
    for name, rule in BODY_RULES.items():
        schemas[name].update(rule)
    for name, schema in schemas.items():
        if name.rstrip("0123456789").endswith("Out"):  # an answer may gain fields: a client must not refuse them
            schema.pop("additionalProperties", None)
    _enqueue_forms(spec)
    _merge_copies(spec)
    stream = spec["paths"].get(STREAM, {}).get("get")
    if stream is not None:
        stream["responses"]["200"]["content"] = {"text/event-stream": {}}  # events: lib/stream.py
    return spec


def _first_sentence_as_summary(operation: dict) -> None:
    """The docstring's first sentence as the summary (its first line may stop mid-sentence)."""
    summary, description = operation.get("summary", ""), operation.get("description", "")
    if not summary or summary.endswith((".", ")")) or not description:
        return
    text = " ".join(f"{summary} {description}".split())
    end = text.find(". ")
    operation["summary"] = text if end < 0 else text[:end + 1]
    operation["description"] = f"{summary} {description}"


def _enqueue_forms(spec: dict) -> None:
    """An enqueue's body is one of three forms (EnqueueIn reads them all): one task, ``{"tasks":
    [...]}``, or a bare list of tasks. Said as a oneOf of those, a generated client gets a type
    for each."""
    schemas = spec["components"]["schemas"]
    tasks = schemas["EnqueueIn"]["properties"]["tasks"]
    schemas["TaskBatchIn"] = {"type": "object", "properties": {"tasks": tasks}, "required": ["tasks"],
                              "additionalProperties": False}
    spec["paths"][ENQUEUE]["post"]["requestBody"]["required"] = True
    body = spec["paths"][ENQUEUE]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {"oneOf": [{"$ref": "#/components/schemas/TaskIn"}, {"$ref": "#/components/schemas/TaskBatchIn"},
                                dict(tasks, type="array")]}
    del schemas["EnqueueIn"]


def _merge_copies(spec: dict) -> None:
    """apispec names a schema met twice (as an answer, and nested in another) ``TaskOut`` and
    ``TaskOut1``; the same definition is one component, or a generated client gets two types."""
    schemas = spec["components"]["schemas"]
    copies = {name: name.rstrip("0123456789") for name in schemas
              if name[-1].isdigit() and schemas.get(name.rstrip("0123456789")) == schemas[name]}

    def point(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.rsplit("/", 1)[-1] in copies:
                node["$ref"] = f"#/components/schemas/{copies[ref.rsplit('/', 1)[-1]]}"
            for value in node.values():
                point(value)
        elif isinstance(node, list):
            for value in node:
                point(value)

    for name in copies:
        del schemas[name]
    point(spec)


def before():
    g.started = time.perf_counter()
    reload_if_asked()
    if request.url_rule is None or request.blueprint not in API_BLUEPRINTS:
        return None  # no route (the 404 says more), or the dashboard, whose forms post form data
    if request.method in ("POST", "PUT", "PATCH") and request.content_length and not request.is_json:
        return errors.error_body(415, "send the body as application/json", "Content-Type")
    if request.args and request.blueprint != "monitoring" and authorized() \
            and not reads_query(current_app.view_functions[request.endpoint]):
        # As a query schema would: a parameter the route does not take may be a misspelt one
        # (POST .../purge?task=x would cancel every task of the queue). Not /health and
        # /metrics: probes and scrapers add their own.
        name = next(iter(request.args))
        return errors.error_body(422, f"{shown(name)}: Unknown field.", name)
    return None


def authorized() -> bool:
    """Whether the request carries the operator's token. A request without it is answered 401
    by its route before anything about its parameters is said."""
    given = request.headers.get("Authorization", "")
    return given.startswith("Bearer ") and verify(given.removeprefix("Bearer ").strip()) is not None


def reload_if_asked() -> None:
    """The daemon reloaded its config and told us (SIGHUP): read it again, as it did."""
    oos = current_app.extensions["oos"]
    if oos["reload"] is None or not oos["reload"].is_set():
        return
    with oos["reload_lock"]:
        if not oos["reload"].is_set():
            return  # another request thread did it
        oos["reload"].clear()
        try:
            config, _ = reload_config(oos["config"])
        except ValueError as e:
            log.get_logger().error(f"reload refused: {e}; the API keeps its config", error=str(e))
            return
        oos["config"] = config
        current_app.config["MAX_CONTENT_LENGTH"] = config.api_max_request_bytes
        log.get_logger().info("API config reloaded")


def reads_query(view) -> bool:
    """Whether a route declares query parameters (``@bp.input(..., location="query")``)."""
    return any(location == "query" for _, location, *_ in getattr(view, "_spec", {}).get("args", ()))


def after(response):
    metrics.observe_request(current.http_metrics(), request, response,
                            time.perf_counter() - g.get("started", time.perf_counter()))
    response.headers["X-Content-Type-Options"] = "nosniff"
    if current.instance():
        response.headers[INSTANCE_HEADER] = current.instance()
    return response
