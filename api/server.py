"""The API process: waitress serving ``create_app()`` on ``api_host:api_port``.

The daemon starts it as a child (``main``) and restarts it if it dies; ``wait_until_answering``
is how the daemon knows it is up before it sends READY=1.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from helpers import log
from helpers.config import Config

RET_BIND = 7  # the address is taken or not allowed


def url(config: Config, path: str = "/health") -> str:
    host = config.api_host if config.api_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{config.api_port}{path}"


def answers(config: Config, timeout: float = 1.0) -> bool:
    """True if the API answers HTTP at all (any status: 503 from /health is an answer)."""
    try:
        urllib.request.urlopen(url(config), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def main(config: Config, parent_pid: int | None = None) -> None:
    """Entry point of the API process."""
    from helpers.worker import die_with_parent

    die_with_parent()
    log.configure(config.log_level, process="api")
    logger = log.get_logger()
    from waitress import create_server

    from api.app import create_app

    try:
        server = create_server(create_app(config), host=config.api_host, port=config.api_port,
                               threads=config.api_threads, ident="oos",
                               max_request_body_size=config.api_max_request_bytes + 1,
                               channel_timeout=30, connection_limit=200)
    except OSError as e:
        logger.critical("API cannot listen", host=config.api_host, port=config.api_port, error=str(e))
        os._exit(RET_BIND)
    # SIGTERM keeps its default action: a request cut off mid-way rolls its transaction back.
    logger.info("API listening", url=url(config, ""))
    server.run()
    sys.stdout.flush()
    os._exit(0)
