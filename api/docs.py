"""``/docs``: the API's document read in Swagger UI, from this server alone.

Swagger UI's files (5.x: it reads OpenAPI 3.1) come from the pinned ``flask-swagger-ui``
package's ``dist`` folder (no CDN, no build step; its blueprint, with an inline script, is not used);
the page starts it from ``static/docs.js``, so the Content-Security-Policy allows no inline
script. Like ``/api/v1/openapi.json``, the page is open; "Authorize" takes the API token for
the calls tried from it.
"""
from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from apiflask import APIBlueprint
from flask import abort, render_template, send_from_directory

bp = APIBlueprint("docs", __name__, enable_openapi=False)
DIST = Path(flask_swagger_ui.__file__).parent / "dist"
FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
# Swagger UI sets style attributes as it renders (a style-src without them leaves it unstyled).
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
          "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")


@bp.get("/docs")
def docs():
    return render_template("docs/swagger.html")


@bp.get("/docs/vendor/<name>")
def vendor(name):
    if name not in FILES:
        abort(404, f"no file {name}")
    return send_from_directory(DIST, name, max_age=86400)


@bp.after_request
def headers(response):
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
