"""The ``auth`` every /api route requires.

The token comes from config/``OOS_API_TOKEN``, or is generated once into the data directory
(``api/identity.py``). ``auth`` checks a request against the token of the app serving it, so
two apps in one process (tests) each keep their own.
"""
from __future__ import annotations

from apiflask import HTTPTokenAuth
from flask import request

from api import current
from api.errors import error_body
from api.identity import load_or_create_token, token_matches

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
