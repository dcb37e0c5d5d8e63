"""The dashboard: server-rendered pages under ``/ui``, served by the API process.

Log in with the API token (every action) or the read-only token (``oos token --read-only``:
sees everything, acts on nothing). The login lives in a signed session cookie (HttpOnly,
SameSite=Strict); every form carries a CSRF token (Flask-WTF); every action is written to the
audit log; pages send a Content-Security-Policy that allows only this origin's own files
(htmx and Chart.js are vendored in api/static/vendor, no build step). Task payloads never
travel in a URL: the task search is a POST.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from functools import wraps

from apiflask import APIBlueprint
from flask import abort, flash, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf

from api import current
from api.identity import load_or_create_token, token_matches
from helpers import (
    audit,
    blockers,
    bulk,
    history,
    periodic,
    reports,
    task_metrics,
    times,
    worker_requests,
    workflow,
)
from helpers import breaker as breakers
from helpers import queue_manager as queues
from helpers.process import worker_id
from helpers.validation import InvalidField, queue_name
from lib import plans, stream
from lib.assistant import Assistant, NotFound
from lib.llm_providers import provider_status, providers_from_config
from lib.memory import Memories

# An APIBlueprint only so that APIFlask's OpenAPI builder can pass over it: pages are not API.
bp = APIBlueprint("web", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
                  static_url_path="/static", enable_openapi=False)
csrf = CSRFProtect()
SESSION_HOURS = 12
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")
LOGIN = "SELECT role, token_hash, expires_at FROM dashboard_logins WHERE id = ?"
NEW_LOGIN = "INSERT INTO dashboard_logins (id, role, token_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
def register(app, config) -> None:
    """Mount the dashboard on ``app``: its session secret comes from the API token (a new token
    logs everyone out), CSRF is checked on the dashboard's forms only (the REST API uses the
    bearer token)."""
    token = load_or_create_token(config)
    app.config.update(SECRET_KEY=hmac.new(token.encode(), b"oos dashboard session", hashlib.sha256).digest(),
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_NAME="oos_session", PERMANENT_SESSION_LIFETIME=SESSION_HOURS * 3600,
                      WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    load_or_create_token(config, read_only=True)  # made at start, so `oos token --read-only` finds it
    app.session_interface = DashboardSessions()
    csrf.init_app(app)
    app.register_blueprint(bp)


class DashboardSessions(SecureCookieSessionInterface):
    """The login cookie is the dashboard's alone: other paths do not open it (verifying and
    decoding it cost each API request about 60 us, a sixth of the single-task POST)."""

    def open_session(self, app, request):
        if not request.path.startswith(bp.url_prefix):
            return self.make_null_session(app)
        return super().open_session(app, request)


# -- every request: who, CSRF, headers ------------------------------------------------------

@bp.before_request
def check():
    if request.method == "POST":
        csrf.protect()  # CSRFError -> 400, before anything is read or written
    if request.endpoint in ("web.login", "web.static"):
        return None
    g.role = logged_in()
    if g.role is None:
        session.clear()
        return redirect(url_for("web.login"))
    return None


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_of(role: str) -> str:
    """The token a role logs in with, as configured now (a changed one ends its logins)."""
    return current.token() if role == "operator" else load_or_create_token(current.config(), read_only=True)


def logged_in() -> str | None:
    """The role of this request's login, if the server still knows it (not logged out, not
    expired, made with the role's current token)."""
    login = session.get("login")
    if not isinstance(login, str):
        return None
    rows = current.db().execute(LOGIN, (login,))
    if not rows or rows[0]["expires_at"] < time.time():
        return None
    role = rows[0]["role"]
    return role if hmac.compare_digest(rows[0]["token_hash"], fingerprint(token_of(role))) else None


@bp.after_request
def headers(response):
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if request.endpoint != "web.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(CSRFError)
def csrf_refused(error):
    return render_template("web/error.html", status=400, message=f"refused: {error.description}"), 400


@bp.errorhandler(400)
@bp.errorhandler(403)
@bp.errorhandler(404)
def refused(error):
    return render_template("web/error.html", status=error.code, message=error.description), error.code


@bp.app_context_processor
def page_context():
    return {"role": g.get("role"), "csrf_token": generate_csrf, "when": times.iso}


def operator(view):
    """An action: the read-only role is refused (403), and the action is audited."""
    @wraps(view)
    def act(*args, **kwargs):
        if g.get("role") != "operator":
            abort(403, "the read-only login cannot act")
        return view(*args, **kwargs)
    return act


def audited(action: str, target: str, detail: str = "") -> None:
    audit.record(current.db(), g.get("role") or "-", action, target, detail, request.remote_addr)


# -- login ----------------------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        given = request.form.get("token", "")
        role = ("operator" if token_matches(given, current.token()) else
                "viewer" if token_matches(given, token_of("viewer")) else None)
        if role:
            now, login = time.time(), secrets.token_urlsafe(24)
            db = current.db()
            db.execute("DELETE FROM dashboard_logins WHERE expires_at < ?", (now,))  # the expired ones
            db.execute(NEW_LOGIN, (login, role, fingerprint(given), now, now + SESSION_HOURS * 3600))
            session.clear()
            session.permanent = True
            session["login"] = login
            g.role = role
            audited("login", role)
            return redirect(url_for("web.overview"))
        error = "wrong token"
        audited("login refused", "-")
    return render_template("web/login.html", error=error), 401 if error else 200


@bp.post("/logout")
def logout():
    g.role = logged_in()
    audited("logout", g.role or "-")
    if isinstance(session.get("login"), str):  # the cookie opens nothing from now on, wherever copied
        current.db().execute("DELETE FROM dashboard_logins WHERE id = ?", (session["login"],))
    session.clear()
    return redirect(url_for("web.login"))


# -- pages ----------------------------------------------------------------------------------

@bp.get("/")
def overview():
    return render_template("web/overview.html", **overview_data())


@bp.get("/overview/live")
def overview_live():
    """The overview's live part, swapped in every few seconds by htmx."""
    return render_template("web/_overview_live.html", **overview_data())


def overview_data() -> dict:
    db, config = current.db(), current.config()
    daemon = reports.daemon_status(db, config)
    return dict(queues=reports.all_queues(db, config, daemon=daemon), daemon=daemon)


@bp.get("/history.json")
def history_json():
    """The charts' data: per minute over the last ``hours`` (at most a week)."""
    try:
        hours = float(request.args.get("hours", 6))
        if not math.isfinite(hours):
            raise ValueError
    except ValueError:
        abort(400, "hours: expected a number")
    hours = min(168.0, max(0.1, hours))
    return history.series(current.db(), time.time() - hours * 3600)


@bp.get("/queues")
def queue_list(error: str | None = None, form: dict | None = None):
    return render_template("web/queues.html", queues=reports.all_queues(current.db(), current.config()),
                           error=error, form=form or {}), 400 if error else 200


@bp.post("/enqueue")
@operator
def enqueue():
    """One task from the Queues page's form, checked as the API checks it (the payload is JSON)."""
    form = {k: request.form.get(k, "").strip() for k in ("queue", "task", "payload", "priority", "delay")}
    try:
        name = queue_name(form["queue"])
        spec = {"task": form["task"], "payload": json.loads(form["payload"] or "null")}
        for field in ("priority", "delay"):
            if form[field]:
                spec[field] = float(form[field]) if field == "delay" else int(form[field])
        made = queues.QueueManager(name, current.db(), current.config()).enqueue_many([spec], batch=False)[0]
    except json.JSONDecodeError as e:
        return queue_list(f"payload: not JSON ({e})", form)
    except ValueError as e:  # InvalidField names the field; int()/float() say what they read
        return queue_list(str(e) if isinstance(e, InvalidField) else f"priority or delay: {e}", form)
    audited("enqueue", f"queue {name}", f"task {form['task']}, id {made.id}")  # the payload stays out of the log
    flash(f"enqueued task {made.id}" if made.created else f"task {made.id} already held that key")
    return redirect(url_for("web.task_detail", task_id=made.id))


@bp.post("/queues/<name>/<action>")
@operator
def queue_action(name, action):
    db, config = current.db(), current.config()
    queue = reports.queue(db, config, name)
    if action == "pause":
        queue.pause()
    elif action == "resume":
        queue.resume()
    elif action == "purge":
        flash(f"cancelled {queue.purge()} tasks of {name}")
    elif action == "reset-breaker":
        breakers.reset(db, name)
    else:
        abort(404, f"no action {action!r}")
    audited(action, f"queue {name}")
    return redirect(url_for("web.queue_list"))


@bp.route("/tasks", methods=["GET", "POST"])
def task_list():
    """Filters come in a POST form (a payload search must not be in a URL, nor in a log line)."""
    form = request.form if request.method == "POST" else {}
    filters = {k: form.get(k) or None for k in ("queue", "state", "name", "text")}
    before = form.get("before")
    try:
        items, cursor = queues.browse(current.db(), before=int(before) if before else None, limit=50, **filters)
    except (InvalidField, ValueError) as e:
        return render_template("web/tasks.html", items=[], cursor=None, filters=filters, states=queues.STATES,
                               error=str(e)), 400
    return render_template("web/tasks.html", items=items, cursor=cursor, filters=filters, states=queues.STATES,
                           error=None)


@bp.get("/tasks/<int:task_id>")
def task_detail(task_id):
    db = current.db()
    task = queues.get_task(db, task_id)
    if task is None:
        abort(404, f"no task {task_id}")
    flow = workflow.status(db, task.workflow) if task.workflow else None
    return render_template("web/task.html", task=task, why=blockers.why(db, current.config(), task_id), flow=flow,
                           now=time.time())


@bp.post("/tasks/<int:task_id>/<action>")
@operator
def task_action(task_id, action):
    db = current.db()
    task = queues.get_task(db, task_id)
    if task is None:
        abort(404, f"no task {task_id}")
    back = url_for("web.task_detail", task_id=task_id)
    if action == "cancel":
        outcome = queues.cancel_task(db, task_id) or "already finished"
    elif action == "retry":
        outcome = "queued again" if queues.retry_dead(db, task.queue, task_id, None, time.time()) else "not dead"
    elif action == "purge":
        outcome = "deleted" if queues.purge_dead(db, task.queue, task_id, None, 0.0, time.time()) else "not dead"
        back = url_for("web.dead_letter")
    elif action == "run-now":
        outcome = "due now" if queues.run_now(db, task_id) else "not waiting for a delay or a backoff"
    else:
        abort(404, f"no action {action!r}")
    flash(f"task {task_id}: {outcome}")
    audited(action, f"task {task_id}")
    return redirect(back)


SELECTED_MAX = 500  # rows a page shows at most (the dead letter's 100, the tasks' 50)


@bp.post("/selected/<action>")
@operator
def selected_action(action):
    """One action on the tasks ticked in a list: replay or delete dead ones, cancel, run now."""
    db, now = current.db(), time.time()
    try:
        ids = sorted({int(i) for i in request.form.getlist("ids")})
    except ValueError:
        abort(400, "ids: expected task ids")
    if not ids or len(ids) > SELECTED_MAX:
        abort(400, f"ids: tick between 1 and {SELECTED_MAX} tasks")
    acts = {"retry": lambda t: queues.retry_dead(db, t.queue, t.id, None, now),
            "purge": lambda t: queues.purge_dead(db, t.queue, t.id, None, 0.0, now),
            "cancel": lambda t: queues.cancel_task(db, t.id, now) is not None,
            "run-now": lambda t: queues.run_now(db, t.id)}
    if action not in acts:
        abort(404, f"no action {action!r}")
    done = sum(bool(acts[action](task)) for task in filter(None, (queues.get_task(db, i) for i in ids)))
    audited(f"{action} selected", f"{len(ids)} tasks", f"ids {', '.join(map(str, ids))}; {done} done")
    flash(f"{action} of {len(ids)} selected tasks: {done} done")
    return redirect(url_for("web.dead_letter") if action in ("retry", "purge") else url_for("web.task_list"))


@bp.route("/dead", methods=["GET", "POST"])
def dead_letter():
    """Dead tasks, newest first; filters (with a payload search) come in a POST form."""
    form = request.form if request.method == "POST" else {}
    filters = {k: form.get(k) or None for k in ("queue", "name", "text")}
    before = form.get("before")
    db, error = current.db(), None
    try:
        items, cursor = queues.browse(db, state="dead", before=int(before) if before else None, limit=100, **filters)
        # A payload search is not counted: that would read every dead payload, not just a page's.
        total = None if filters["text"] else queues.count_dead(db, filters["queue"], filters["name"])
    except (InvalidField, ValueError) as e:
        items, cursor, total, error = [], None, 0, str(e)
    return render_template("web/dead.html", items=items, cursor=cursor, total=total, filters=filters,
                           error=error), 400 if error else 200


@bp.post("/dead/<action>")
@operator
def dead_action(action):
    """Replay or delete every dead task the filters match, as a background task (helpers/bulk.py)."""
    filters = {k: request.form.get(k) or None for k in ("queue", "name", "text")}
    try:
        job = bulk.request(current.db(), action, **filters)
    except InvalidField as e:
        abort(400, str(e))
    # The payload search is only said to be there: it must not reach a log line.
    audited(f"{action} all dead", f"queue {filters['queue'] or '*'}",
          f"task name {filters['name'] or '*'}{'; payload search' if filters['text'] else ''}; task {job}")
    flash(f"{'Replaying' if action == 'retry' else 'Deleting'} the matching dead tasks in the background: task {job}")
    return redirect(url_for("web.task_detail", task_id=job))


@bp.get("/workers")
def worker_list():
    return render_template("web/workers.html", daemon=reports.daemon_status(current.db(), current.config()))


@bp.post("/workers/<int:pid>/<action>")
@operator
def worker_action(pid, action):
    """Drain or stop one of this host's daemon's workers; its daemon acts within a second."""
    daemon = reports.daemon_status(current.db(), current.config())
    if not any(w["pid"] == pid for w in daemon["workers"]) or not daemon["running"]:
        abort(404, f"no running worker {pid}")
    try:
        worker_requests.ask(current.db(), worker_id(pid), action)
    except InvalidField as e:
        abort(404, str(e))
    flash(f"worker {pid}: asked to {action}")
    audited(f"{action} worker", f"worker {worker_id(pid)}")
    return redirect(url_for("web.worker_list"))


@bp.get("/database")
def database():
    return render_template("web/database.html", db=reports.database(current.db(), current.config()))


@bp.get("/assistant")
def assistant_overview():
    db, config = current.db(), current.config()
    return render_template("web/assistant.html", sessions=Assistant(config, db).list_sessions(100),
                           memories=Memories(db).list(limit=100),
                           providers=provider_status(db, providers_from_config(config)))


@bp.get("/assistant/<session_id:session_id>")
def assistant_session(session_id):
    db, config = current.db(), current.config()
    chat = Assistant(config, db)
    try:
        found = chat.get_session(session_id)
    except NotFound as e:
        abort(404, str(e))
    messages = chat.messages(session_id, limit=500)
    pending = {m["id"]: stream.text_so_far(db, m["id"]) for m in messages if m.get("reply_status") == "pending"}
    return render_template("web/session.html", session=found, messages=messages, pending=pending,
                           plans={m["id"]: plans.view(db, m["id"]) for m in messages if m.get("plan")},
                           memories=chat.memories.list(session_id=session_id, limit=100))


@bp.get("/schedules")
def schedule_list():
    schedules = periodic.listing(current.db(), periodic.configured(current.config()))
    return render_template("web/schedules.html", schedules=schedules)


@bp.get("/metrics")
def task_metric_list():
    """Per task name: the last hour and the last day, and per minute over the last 6 hours."""
    db, now = current.db(), time.time()
    return render_template("web/metrics.html", hour=task_metrics.summary(db, now - 3600),
                           day=task_metrics.summary(db, now - 86400))


@bp.get("/task-metrics.json")
def task_metrics_json():
    """The metrics page's charts: per minute, per task name, over the last 6 hours."""
    return task_metrics.series(current.db(), time.time() - 6 * 3600)


@bp.get("/audit")
def audit_log():
    rows = audit.latest(current.db())
    return render_template("web/audit.html", rows=rows)
