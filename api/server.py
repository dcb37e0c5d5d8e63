"""The API process: waitress serving ``create_app()`` on ``api_host:api_port``.

The daemon starts it as a child (``main``) with a nonce, restarts it if it dies, and sends
READY=1 only once ``answers_as(config, nonce)``: its own child answers, not some other server
that holds the port. A child that cannot listen exits with ``exit_codes.API`` (7).
"""
from __future__ import annotations

import json
import resource
import signal
import threading
import urllib.error
import urllib.request

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from api.identity import INSTANCE_HEADER
from helpers import exit_codes, log
from helpers.config import Config
from helpers.process import die_with_parent, leave
from helpers.registry import load_task_modules

RET_BIND = exit_codes.API  # the address is taken or not allowed


def url(config: Config, path: str = "/health") -> str:
    host = config.api_host if config.api_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{config.api_port}{path}"


def answers_as(config: Config, nonce: str | None, timeout: float = 1.0) -> bool:
    """True if the API address answers HTTP (any status: 503 from /health is an answer) and,
    unless ``nonce`` is None, the answer carries ``nonce``: it is our own child speaking."""
    try:
        response = urllib.request.urlopen(url(config), timeout=timeout)
        response.close()
    except urllib.error.HTTPError as e:
        response = e
    except (OSError, ValueError):
        return False
    return nonce is None or response.headers.get(INSTANCE_HEADER) == nonce


class JsonErrorTask(ErrorTask):
    """What waitress answers itself, before the app (a body over 4x the limit, a header section
    too large, a malformed request): JSON like every other answer, not its plain text."""

    def execute(self):
        error = self.request.error
        field = {413: "body", 431: "headers"}.get(error.code)
        message = {413: "request body too large", 431: "request headers too large"}.get(
            error.code, f"malformed request: {error.body}")
        body = json.dumps({"error": {"code": error.code, "message": message, "field": field}}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def main(config: Config, modules: tuple[str, ...] = (), nonce: str = "") -> None:
    """Entry point of the API process. ``modules`` are the task modules, so tasks enqueued
    over HTTP get their handler's ``max_attempts`` and ``timeout``."""
    die_with_parent()
    log.configure(config.log_level, process="api")
    logger = log.get_logger()
    from waitress import create_server

    from api.app import create_app  # the routes are the API process's alone: the manager imports
    # this module, and needs none of them

    load_task_modules(modules)  # they imported in the daemon before it started us
    # Idle or slow clients must not crowd out /health: room for many connections (as many
    # file descriptors as we may have), and a connection silent for 10 s is closed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = max(100, min(config.api_connection_limit, hard - 64))
    try:
        # Bodies somewhat over the limit reach Flask, which answers a JSON 413; waitress
        # itself cuts off only the grossly oversized (4x) without reading them.
        # SIGHUP: the daemon reloaded its config; the next request reads it too (the handler
        # only records it).
        reload = threading.Event()
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
        server = create_server(create_app(config, instance=nonce, reload=reload), host=config.api_host,
                               port=config.api_port,
                               threads=config.api_threads, ident="oos",
                               max_request_body_size=4 * config.api_max_request_bytes,
                               channel_timeout=10, connection_limit=limit, cleanup_interval=2)
        server.channel_class = JsonErrorChannel
    except OSError as e:
        logger.critical("API cannot listen", host=config.api_host, port=config.api_port, error=str(e))
        leave(RET_BIND)
    # SIGTERM keeps its default action: a request cut off mid-way rolls its transaction back.
    logger.info("API listening", url=url(config, ""))
    server.run()
    leave(0)
