"""The API token and the ``auth`` every /api route requires.

The token comes from config/``OOS_API_TOKEN``, or is generated once into the data directory.
``auth`` checks a request against the token of the app serving it, so two apps in one process
(tests) each keep their own.
"""
from __future__ import annotations

import hmac
import os
import secrets

from apiflask import HTTPTokenAuth
from flask import request

from api import current
from api.errors import error_body
from helpers.config import Config

TOKEN_FILE = "api_token"
READONLY_TOKEN_FILE = "api_readonly_token"  # the dashboard's read-only role: sees, cannot act

auth = HTTPTokenAuth(scheme="Bearer", description="the token from `oos token`")


@auth.verify_token
def verify(token: str | None):
    """The operator's token opens every route; the dashboard's read-only token opens what only
    reads (GET), so a monitoring script needs no operator token."""
    if token_matches(token, current.token()):
        return "operator"
    if request.method in ("GET", "HEAD") and token_matches(token, load_or_create_token(current.config(), read_only=True)):
        return "viewer"
    return None


@auth.error_processor
def refused(error):
    return error_body(401, "missing or wrong bearer token", "Authorization",
                      headers={"WWW-Authenticate": 'Bearer realm="oos"'})


def load_or_create_token(config: Config, read_only: bool = False) -> str:
    """The configured token, else the one in ``<data_dir>/api_token``, created (mode 0600) on
    first use. ``read_only``: the read-only token (``api.readonly_token``, ``api_readonly_token``)."""
    configured = config.api_readonly_token if read_only else config.api_token
    if configured:
        return configured
    path = config.data_dir / (READONLY_TOKEN_FILE if read_only else TOKEN_FILE)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    config.data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its token
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
