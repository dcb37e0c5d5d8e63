"""What a request handler works on: the app's database, config and token (flaskr's ``get_db``)."""
from __future__ import annotations

import threading

from flask import current_app

from helpers.config import Config
from helpers.engine import Database


def _oos() -> dict:
    return current_app.extensions["oos"]


def db() -> Database:
    return _oos()["db"]


def config() -> Config:
    return _oos()["config"]


def token() -> str:
    return _oos()["token"]


def waiters() -> threading.BoundedSemaphore:
    """Permits to hold a request open waiting for a task (``?wait=``)."""
    return _oos()["waiters"]


def streams() -> threading.BoundedSemaphore:
    """Permits to hold a request open streaming a reply."""
    return _oos()["streams"]


def instance() -> str:
    """The nonce the daemon gave this API process ('' outside the daemon)."""
    return _oos()["instance"]


def http_metrics():
    """This app's HTTP request counts (``api.metrics.HttpCollector``)."""
    return _oos()["http"]
